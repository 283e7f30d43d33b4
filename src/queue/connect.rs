//! Connecting to PostgreSQL and applying the migrations in `migrations/`.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::redact_url;

/// The migrations, embedded at build time; the same files `sqlx migrate run` applies.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database URL {url}: {source}")]
    BadUrl { url: String, source: sqlx::Error },
    #[error("cannot connect to the database at {url}: {source}")]
    Unreachable { url: String, source: sqlx::Error },
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Opens a pool of at most `max_connections`; fails fast (10 s) when the server does
/// not answer, with a message that names the server but never the password.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    open(url, max_connections, 0).await
}

/// A pool for a worker, whose connections are all opened up front: opened lazily, the
/// first pickups of a fresh worker each waited up to 90 ms for a new connection
/// (BENCHMARKS.md, pickup latency).
pub async fn connect_worker(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    open(url, max_connections, max_connections).await
}

async fn open(url: &str, max_connections: u32, min_connections: u32) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = url.parse().map_err(|source| DbError::BadUrl {
        url: redact_url(url),
        source,
    })?;
    let options = options.application_name("report-worker");
    PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .min_connections(min_connections.min(max_connections))
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|source| DbError::Unreachable {
            url: redact_url(url),
            source,
        })
}

pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Whether the migrations have created the queue (so `run` can say what to do first).
pub async fn is_migrated(pool: &PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT to_regclass('report_requests') IS NOT NULL")
        .fetch_one(pool)
        .await
}
