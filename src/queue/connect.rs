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
    #[error("{url} is not a PostgreSQL URL: write postgres://user:password@host:5432/database")]
    NotPostgres { url: String },
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
        tracing::warn!(try_number = tries, retry_in = %humantime::format_duration(pause), %error, "the database is not ready; waiting for it");
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
    let scheme = url
        .trim()
        .split("://")
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    if !url.contains("://") || !matches!(scheme.as_str(), "postgres" | "postgresql") {
        return Err(DbError::NotPostgres {
            url: redact_url(url),
        });
    }
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
    // One connection first, so that what is wrong (refused, a wrong password, no such
    // database) is said at once and in its own words, not as a pool's timeout.
    let unreachable = |source| DbError::Unreachable {
        url: redact_url(url),
        source,
    };
    let probe = tokio::time::timeout(
        Duration::from_secs(10),
        <sqlx::PgConnection as sqlx::Connection>::connect_with(&options),
    )
    .await
    .map_err(|_| unreachable(sqlx::Error::PoolTimedOut))?
    .map_err(unreachable)?;
    let _ = sqlx::Connection::close(probe).await;
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

/// How the database's schema compares with this binary's migrations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schema {
    /// Every migration of this binary is applied, and none it does not know.
    Current,
    /// No migration applied yet (or not all of this binary's): `migrate` first.
    Behind { applied: Option<i64>, latest: i64 },
    /// The database has migrations this binary does not know: it is older than the
    /// schema.
    Ahead { applied: i64, latest: i64 },
}

impl Schema {
    /// One line saying what to do, or `None` when current.
    pub fn problem(&self) -> Option<String> {
        match self {
            Schema::Current => None,
            Schema::Behind { applied: None, .. } => Some(
                "the database has no report-worker schema yet: run `report-worker migrate` first"
                    .into(),
            ),
            Schema::Behind {
                applied: Some(a),
                latest,
            } => Some(format!(
                "the database's schema ({a}) is behind this binary's ({latest}): run `report-worker migrate`"
            )),
            Schema::Ahead { applied, latest } => Some(format!(
                "this binary is older than the database's schema ({applied}, this binary knows up to {latest}): use a newer report-worker"
            )),
        }
    }
}

/// The schema's state: the newest migration applied against this binary's newest.
pub async fn schema(pool: &Db) -> Result<Schema, sqlx::Error> {
    let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    let exists: bool = sql::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if !exists {
        return Ok(Schema::Behind {
            applied: None,
            latest,
        });
    }
    let known_versions: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
    let applied: Vec<i64> = match sql::query_scalar(
        "SELECT coalesce(array_agg(version), '{}') FROM _sqlx_migrations WHERE success",
    )
    .fetch_one(pool)
    .await
    {
        Ok(versions) => versions,
        // The application's and the worker's roles may not read the migrations' record:
        // they ask the function made for them (a schema older than it is behind).
        Err(e) if super::is_permission_denied(&e) => {
            match sql::query_scalar("SELECT report_schema_versions()")
                .fetch_one(pool)
                .await
            {
                Ok(versions) => versions,
                // The function came with 20261201000003: the schema is older.
                Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("42883") => {
                    let before = known_versions
                        .iter()
                        .copied()
                        .filter(|&v| v < 20261201000003);
                    return Ok(Schema::Behind {
                        applied: before.max(),
                        latest,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    let count = known_versions
        .iter()
        .filter(|v| applied.contains(v))
        .count() as i64;
    let applied = applied.iter().copied().max();
    let known = MIGRATOR.iter().count() as i64;
    Ok(match applied {
        Some(a) if a > latest => Schema::Ahead { applied: a, latest },
        _ if count < known => Schema::Behind { applied, latest },
        _ => Schema::Current,
    })
}

/// Whether the migrations have created the queue (so `run` can say what to do first).
pub async fn is_migrated(pool: &Db) -> Result<bool, sqlx::Error> {
    sql::query_scalar("SELECT to_regclass('report_requests') IS NOT NULL")
        .fetch_one(pool)
        .await
}
