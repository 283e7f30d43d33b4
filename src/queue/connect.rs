//! Connecting to PostgreSQL and applying the migrations in `migrations/`.

use super::sql;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::Db;
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

/// How the database hands out server connections (`DATABASE_POOL_MODE`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PoolMode {
    /// A connection is one server session (PostgreSQL itself, PgBouncer in session
    /// mode): prepared statements are cached per connection, LISTEN works on any.
    #[default]
    Session,
    /// A pooler hands out a server connection per transaction (PgBouncer in
    /// transaction mode): no named prepared statements, nothing kept in a session
    /// between transactions, no LISTEN on pooled connections.
    Transaction,
}

/// Opens a pool of at most `max_connections`; fails fast (10 s) when the server does
/// not answer, with a message that names the server but never the password.
pub async fn connect(url: &str, max_connections: u32) -> Result<Db, DbError> {
    connect_in(url, max_connections, PoolMode::Session).await
}

/// `connect` for a database reached the way `mode` says.
pub async fn connect_in(url: &str, max_connections: u32, mode: PoolMode) -> Result<Db, DbError> {
    open(url, max_connections, 0, mode).await
}

/// A pool for a worker, whose connections are all opened up front: opened lazily, the
/// first pickups of a fresh worker each waited up to 90 ms for a new connection
/// (BENCHMARKS.md, pickup latency).
pub async fn connect_worker(url: &str, max_connections: u32) -> Result<Db, DbError> {
    connect_worker_in(url, max_connections, PoolMode::Session).await
}

/// `connect_worker` for a database reached the way `mode` says.
pub async fn connect_worker_in(
    url: &str,
    max_connections: u32,
    mode: PoolMode,
) -> Result<Db, DbError> {
    open(url, max_connections, max_connections, mode).await
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
    mode: PoolMode,
) -> Result<Db, DbError> {
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(250);
    let mut tries = 0u32;
    loop {
        tries += 1;
        let error = match connect_worker_in(url, max_connections, mode).await {
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

async fn open(
    url: &str,
    max_connections: u32,
    min_connections: u32,
    mode: PoolMode,
) -> Result<Db, DbError> {
    let options: PgConnectOptions = url.parse().map_err(|source| DbError::BadUrl {
        url: redact_url(url),
        source,
    })?;
    let mut options = options.application_name("report-worker");
    if mode == PoolMode::Transaction {
        // See `Db`: no statement is kept on a server session, every statement runs in a
        // transaction of its own.
        options = options.statement_cache_capacity(0);
        super::sql::unnamed_from_now_on();
    }
    let pool = PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .min_connections(min_connections.min(max_connections))
        .acquire_timeout(Duration::from_secs(10));
    let pool = pool
        .connect_with(options)
        .await
        .map_err(|source| DbError::Unreachable {
            url: redact_url(url),
            source,
        })?;
    Ok(Db { pool, mode })
}

/// The advisory lock every `migrate` holds, whichever way it reaches the database: a
/// session lock directly, a transaction lock through a pooler (the two exclude each
/// other), so a direct and a pooled run never overlap.
const MIGRATE_LOCK: i64 = 7235632648424535154;

pub async fn migrate(db: &Db) -> Result<(), DbError> {
    let sql_error = sqlx::migrate::MigrateError::from;
    match db.mode() {
        PoolMode::Session => {
            let mut conn = db.pool().acquire().await.map_err(sql_error)?;
            sql::query("SELECT pg_advisory_lock($1)")
                .bind(MIGRATE_LOCK)
                .execute(&mut *conn)
                .await
                .map_err(sql_error)?;
            let ran = MIGRATOR.run(&mut *conn).await;
            let unlocked = sql::query("SELECT pg_advisory_unlock($1)")
                .bind(MIGRATE_LOCK)
                .execute(&mut *conn)
                .await;
            ran?;
            unlocked.map_err(sql_error)?;
        }
        PoolMode::Transaction => {
            // Through a transaction pooler a session (and its advisory lock) does not
            // outlive a transaction: the whole run is one transaction instead, under a
            // transaction-scoped advisory lock (so two runs never overlap), each
            // migration a savepoint of it.
            let mut migrator = sqlx::migrate!("./migrations");
            migrator.set_locking(false);
            let mut tx = db
                .pool()
                .begin()
                .await
                .map_err(sqlx::migrate::MigrateError::from)?;
            // The migrator's own statements are named: none may outlive this
            // transaction on its server session (DEALLOCATE ALL before and after).
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "SELECT pg_advisory_xact_lock({MIGRATE_LOCK}); DEALLOCATE ALL"
            )))
            .execute(&mut *tx)
            .await
            .map_err(sql_error)?;
            migrator.run(&mut *tx).await?;
            sqlx::raw_sql("DEALLOCATE ALL")
                .execute(&mut *tx)
                .await
                .map_err(sqlx::migrate::MigrateError::from)?;
            tx.commit()
                .await
                .map_err(sqlx::migrate::MigrateError::from)?;
        }
    }
    Ok(())
}

/// Whether the migrations have created the queue (so `run` can say what to do first).
pub async fn is_migrated(pool: &Db) -> Result<bool, sqlx::Error> {
    sql::query_scalar("SELECT to_regclass('report_requests') IS NOT NULL")
        .fetch_one(pool)
        .await
}
