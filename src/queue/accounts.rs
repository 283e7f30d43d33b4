//! Account-wide state shared by every process: the stop and the call pacing.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::secs;
use crate::domain::StopScope;

/// An account-wide stop as recorded in `report_account_stops`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AccountStop {
    pub account: String,
    pub scope: StopScope,
    pub reason: String,
    pub error_code: Option<i32>,
    pub since: DateTime<Utc>,
    pub until: Option<DateTime<Utc>>,
    pub probe_at: DateTime<Utc>,
    pub probes: i32,
    /// Whether `probe_at` has come, by the database's clock.
    pub probe_due: bool,
}

/// The columns an `AccountStop` is read from.
pub(super) const STOP_COLUMNS: &str = "account, scope, reason, error_code, since, until, probe_at, probes, probe_at <= now() AS probe_due";

/// The account's stop, if any.
pub async fn read_stop(pool: &PgPool, account: &str) -> Result<Option<AccountStop>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {STOP_COLUMNS} FROM report_account_stops WHERE account = $1"
    )))
    .bind(account)
    .fetch_optional(pool)
    .await
}

/// Records (or updates) the account's stop. A stop whose end is known (67200007) is
/// next probed at that end; otherwise the first probe comes `first_probe_in` after it
/// began.
pub async fn record_stop(
    pool: &PgPool,
    account: &str,
    scope: StopScope,
    code: i32,
    reason: &str,
    until: Option<DateTime<Utc>>,
    first_probe_in: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO report_account_stops AS s (account, scope, reason, error_code, until, probe_at)
         VALUES ($1, $2, $3, $4, $5, coalesce($5, now() + $6 * interval '1 second'))
         ON CONFLICT (account) DO UPDATE
            SET scope = CASE WHEN s.scope = 'all' OR excluded.scope = 'all' THEN 'all' ELSE 'create' END,
                reason = excluded.reason, error_code = excluded.error_code, until = excluded.until,
                probe_at = CASE WHEN excluded.until IS NOT NULL THEN greatest(s.probe_at, excluded.until)
                                ELSE s.probe_at END,
                updated_at = now()",
    )
    .bind(account)
    .bind(scope)
    .bind(reason)
    .bind(code)
    .bind(until)
    .bind(secs(first_probe_in))
    .execute(pool)
    .await?;
    Ok(())
}

/// Takes the right to probe a stopped account (one process at a time), pushing the next
/// probe `next_in` away. `probes` must be the count read with the stop.
pub async fn claim_probe(
    pool: &PgPool,
    account: &str,
    probes: i32,
    next_in: Duration,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE report_account_stops
            SET probes = probes + 1, probe_at = now() + $3 * interval '1 second', updated_at = now()
          WHERE account = $1 AND probes = $2 AND probe_at <= now()",
    )
    .bind(account)
    .bind(probes)
    .bind(secs(next_in))
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// The provider answered normally: the stop is over.
pub async fn clear_stop(pool: &PgPool, account: &str) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("DELETE FROM report_account_stops WHERE account = $1")
        .bind(account)
        .execute(pool)
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Reserves the account's next call slot, spaced `spacing` after the previous one
/// across every process, and returns how long to wait for it (by the database's clock,
/// so hosts with skewed clocks still share one schedule).
pub async fn reserve_call_slot(
    pool: &PgPool,
    account: &str,
    spacing: Duration,
) -> Result<Duration, sqlx::Error> {
    let wait: f64 = sqlx::query_scalar(
        "INSERT INTO report_account_pacing AS p (account, next_slot_at)
         VALUES ($1, clock_timestamp() + $2 * interval '1 second')
         ON CONFLICT (account) DO UPDATE
            SET next_slot_at = greatest(p.next_slot_at, clock_timestamp()) + $2 * interval '1 second'
         RETURNING greatest(0, extract(epoch FROM (next_slot_at - $2 * interval '1 second' - clock_timestamp())))::float8",
    )
    .bind(account)
    .bind(secs(spacing))
    .fetch_one(pool)
    .await?;
    Ok(Duration::from_secs_f64(wait.max(0.0)))
}

/// The provider said "too fast" (67200002): every process's next slot moves back.
pub async fn slow_down(pool: &PgPool, account: &str, pause: Duration) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE report_account_pacing
            SET next_slot_at = greatest(next_slot_at, clock_timestamp() + $2 * interval '1 second')
          WHERE account = $1",
    )
    .bind(account)
    .bind(secs(pause))
    .execute(pool)
    .await?;
    Ok(())
}
