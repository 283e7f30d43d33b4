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

/// `connect_worker`, waiting for a database that is not there yet (restarting, failing
/// over, starting up): each failed try is logged and retried with backoff (250 ms,
/// doubling, at most 10 s apart) until it answers, or until `give_up_after` when set.
/// Errors that waiting cannot fix (a bad URL, refused credentials, a missing database)
/// are returned at once.
pub async fn connect_worker_patiently(
    url: &str,
    max_connections: u32,
    give_up_after: Option<Duration>,
) -> Result<PgPool, DbError> {
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(250);
    let mut tries = 0u32;
    loop {
        tries += 1;
        let error = match connect_worker(url, max_connections).await {
            Ok(pool) => match super::is_migrated(&pool).await {
                Ok(_) => return Ok(pool),
                Err(source) => {
                    pool.close().await;
                    DbError::Unreachable {
                        url: redact_url(url),
                        source,
                    }
                }
            },
            Err(e) => e,
        };
        let waiting_helps =
            matches!(&error, DbError::Unreachable { source, .. } if super::is_retryable(source));
        let out_of_time = give_up_after.is_some_and(|limit| started.elapsed() + pause > limit);
        if !waiting_helps || out_of_time {
            return Err(error);
        }
        tracing::warn!(try_number = tries, retry_in = ?pause, %error, "the database is not ready; waiting for it");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(10));
    }
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
