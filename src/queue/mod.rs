//! The queue: every SQL statement on the `report_*` tables, split by concern.
//!
//! - `connect`: pools and the migrations in `migrations/`;
//! - `enqueue`: applications' and the CSV loader's inserts;
//! - `claim`: claiming due rows under a lease, heartbeats, releasing;
//! - `creates`: the create intent, committed before a paid create is sent, and orphans;
//! - `outcomes`: a claimed row's fenced writes (task created, snoozed, stored, failed…);
//! - `accounts`: the account-wide stop and the shared call pacing;
//! - `retention`: removing finished history in small batches;
//! - `roles`: the least-privilege roles for applications and workers;
//! - `stats`: what operators read (per-state statistics, throughput, stops);
//! - `documents`: reading stored documents back (export);
//! - `webhooks`: the deliveries announcing finished requests to their `callback_url`;
//! - `calls`: provider calls per minute, shared by every process (and spending per day);
//! - `browse`: what the dashboard reads (bounded queries, keyset pagination);
//! - `operator`: operators' actions, recorded with who did them;
//! - `learning`: observed generation times, for learned polling;
//! - `reuse`: serving a row from a document already stored for the same identifier;
//! - `fixtures`: synthetic rows for the demo and the benchmarks.
//!
//! Nothing else in the crate writes SQL for `report_*` tables. This module knows the
//! schema and the domain types; it knows nothing of HTTP or of the provider.

mod accounts;
mod browse;
mod calls;
mod claim;
mod connect;
mod creates;
mod db;
mod documents;
mod enqueue;
pub mod fixtures;
mod learning;
mod operator;
mod outcomes;
mod retention;
mod reuse;
pub mod roles;
pub mod sql;
mod stats;
mod webhooks;

use std::time::Duration;

use backon::ExponentialBuilder;

pub use accounts::*;
pub use browse::*;
pub use calls::*;
pub use claim::*;
pub use connect::{
    DbError, MIGRATOR, PoolMode, Schema, connect, connect_in, connect_worker, connect_worker_in,
    connect_worker_patiently, is_migrated, migrate, schema,
};
pub use creates::*;
pub use db::Db;
pub use documents::*;
pub use enqueue::*;
pub use learning::*;
pub use operator::*;
pub use outcomes::*;
pub use retention::*;
pub use reuse::*;
pub use stats::*;
pub use webhooks::*;

/// A CTE for a write whose loss in a crash of the database server is the same as never
/// having made it — a lease extended or given back, a poll's next time — so its commit
/// need not wait for the WAL to reach the disk: `synchronous_commit = off` for
/// that statement's own transaction only (a transaction-local setting, so nothing leaks
/// to another statement or, through PgBouncer, to another client). Its use must be
/// joined in (`FROM …, no_flush_wait`): a CTE nothing reads is never run. The WAL is
/// written in order, so the next write that does wait (a claim, a create intent, a job
/// id, a stored document) makes every earlier one durable with it: nothing paid for, nor
/// any step towards it, ever rests on a commit that was not flushed. Not for anything
/// that moves `lease_token`: a token lost with the database would be handed out again.
pub const NO_FLUSH_WAIT: &str =
    "no_flush_wait AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true))";

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::retryable_sqlstate;

    #[test]
    fn sqlstates_that_mean_not_now_are_retried() {
        for code in [
            "08000", "08006", "08P01", "57P01", "57P02", "57P03", "40001", "40P01", "53300",
            "53200", "25006", "55P03", "57014",
        ] {
            assert!(retryable_sqlstate(code), "{code}");
        }
        for code in [
            "23505", "23514", "22001", "42P01", "42703", "22P02", "P0001",
        ] {
            assert!(!retryable_sqlstate(code), "{code}");
        }
    }
}

/// What a write fenced by a claim's `lease_token` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fenced {
    /// The row was still held with that token: the write is committed.
    Written,
    /// The row is no longer ours (its lease expired and another process took it, or a
    /// person cancelled it): nothing was changed.
    Lost,
}

impl Fenced {
    fn from_rows(n: u64) -> Fenced {
        if n == 1 {
            Fenced::Written
        } else {
            Fenced::Lost
        }
    }
}

/// Why a write did not happen: what the caller can do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The database could not be reached, or asked for the statement to be tried
    /// again, for longer than the retries lasted: the write may succeed later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database refused the statement itself (a constraint, a value out of
    /// range): trying again will not help.
    #[error("refused by the database{}: {message}", constraint.as_deref().map(|c| format!(" (constraint {c})")).unwrap_or_default())]
    Refused {
        constraint: Option<String>,
        message: String,
    },
}

impl From<sqlx::Error> for WriteError {
    fn from(e: sqlx::Error) -> WriteError {
        match &e {
            sqlx::Error::Database(d) if !is_retryable(&e) => WriteError::Refused {
                constraint: d.constraint().map(str::to_string),
                message: d.message().to_string(),
            },
            _ => WriteError::Unavailable(e.to_string()),
        }
    }
}

/// Whether a failed statement is worth trying again. Connection trouble is (a restart,
/// a failover, a dropped connection), and so are the server's errors that say "not now"
/// rather than "not this": by SQLSTATE, connection exceptions (`08…`), shutdown and
/// recovery (`57P01`, `57P02`, `57P03`), serialization failures and deadlocks (`40001`,
/// `40P01`), insufficient resources (`53…`: too many connections, out of memory or
/// disk), a read-only transaction (`25006`: a replica after a failover), and our own
/// `lock_timeout`/`statement_timeout` (`55P03`, `57014`). Constraint and data errors,
/// and anything the server says about the statement itself, are not.
pub fn is_retryable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => d.code().is_some_and(|code| retryable_sqlstate(&code)),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => true,
        _ => false,
    }
}

/// Whether the database refused a statement because the role may not do it (42501).
pub fn is_permission_denied(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("42501"))
}

fn retryable_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "40001" | "40P01" | "25006" | "55P03" | "57014"
        )
}

/// How statements are retried through a restart or a dropped connection.
pub fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(10)
        .with_jitter()
}

/// The domain's enums and the job id live in `text` columns: each is decoded (and
/// validated) once, here at the database edge, and bound as its canonical text.
macro_rules! text_column {
    ($($t:ty),*) => {$(
        impl sqlx::Type<sqlx::Postgres> for $t {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::Type<sqlx::Postgres>>::type_info()
            }
            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $t {
            fn decode(
                value: sqlx::postgres::PgValueRef<'r>,
            ) -> Result<Self, sqlx::error::BoxDynError> {
                let text = <String as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
                Ok(<$t>::try_from(text)?)
            }
        }

        impl<'q> sqlx::Encode<'q, sqlx::Postgres> for $t {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<sqlx::Postgres>>::encode(self.as_str(), buf)
            }
        }
    )*};
}

text_column!(
    crate::domain::RequestState,
    crate::domain::ReportType,
    crate::domain::StopScope,
    crate::domain::JobId
);
