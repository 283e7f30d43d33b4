//! The statements every other file of `queue` builds, through one door, so that their
//! preparation follows the database's pool mode (`PoolMode`).
//!
//! sqlx names each prepared statement (`sqlx_s_1`, `sqlx_s_2`, … per connection) and
//! keeps it on the server session. Through a transaction pooler a client connection
//! meets a different server session from one transaction to the next, where that name
//! is another client's statement or none: "prepared statement "sqlx_s_1" already
//! exists". So once a pool in transaction mode is opened, statements are prepared
//! unnamed (in the transaction that runs them: see `connect`). A process works one
//! database in one mode, so this is a process-wide switch; in session mode nothing
//! changes.

use std::sync::atomic::{AtomicBool, Ordering};

use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::{Query, QueryAs, QueryScalar};
use sqlx::{FromRow, Postgres, SqlSafeStr};

/// Whether statements are prepared as named (cached) server-side statements.
static NAMED: AtomicBool = AtomicBool::new(true);

/// From now on, statements of this process are prepared unnamed (a pool in transaction
/// mode was opened).
pub(super) fn unnamed_from_now_on() {
    NAMED.store(false, Ordering::Relaxed);
}

fn named() -> bool {
    NAMED.load(Ordering::Relaxed)
}

/// `sqlx::query`, prepared as the pool mode allows.
pub fn query<'q>(sql: impl SqlSafeStr) -> Query<'q, Postgres, PgArguments> {
    sqlx::query(sql).persistent(named())
}

/// `sqlx::query_as`, prepared as the pool mode allows.
pub fn query_as<'q, O>(sql: impl SqlSafeStr) -> QueryAs<'q, Postgres, O, PgArguments>
where
    O: for<'r> FromRow<'r, PgRow>,
{
    sqlx::query_as(sql).persistent(named())
}

/// `sqlx::query_scalar`, prepared as the pool mode allows.
pub fn query_scalar<'q, O>(sql: impl SqlSafeStr) -> QueryScalar<'q, Postgres, O, PgArguments>
where
    (O,): for<'r> FromRow<'r, PgRow>,
{
    sqlx::query_scalar(sql).persistent(named())
}
