//! Account-wide state shared by every process: the stop and the call pacing.

use super::sql;
use std::time::Duration;

use super::Db;
use chrono::{DateTime, Utc};

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
    /// The row whose call met the answer that (last) caused the stop, the endpoint and
    /// the answer itself.
    pub request_id: Option<i64>,
    pub endpoint: Option<String>,
    pub answer: Option<String>,
}

/// What caused a stop: an answer to one row's call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopCause<'a> {
    pub request_id: i64,
    pub endpoint: &'a str,
    pub answer: &'a str,
}

/// The columns an `AccountStop` is read from.
pub(super) const STOP_COLUMNS: &str =
    "account, scope, reason, error_code, since, until, probe_at, probes,
     probe_at <= now() AS probe_due, request_id, endpoint, answer";

/// The account's stop, if any.
pub async fn read_stop(pool: &Db, account: &str) -> Result<Option<AccountStop>, sqlx::Error> {
    sql::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {STOP_COLUMNS} FROM report_account_stops WHERE account = $1"
    )))
    .bind(account)
    .fetch_optional(pool)
    .await
}

/// Records (or updates) the account's stop. A stop whose end is known (67200007) is
/// next probed at that end; otherwise the first probe comes `first_probe_in` after it
/// began.
#[allow(clippy::too_many_arguments)]
pub async fn record_stop(
    pool: &Db,
    account: &str,
    scope: StopScope,
    code: i32,
    reason: &str,
    until: Option<DateTime<Utc>>,
    first_probe_in: Duration,
    cause: Option<StopCause<'_>>,
) -> Result<(), sqlx::Error> {
    sql::query(
        "INSERT INTO report_account_stops AS s
                (account, scope, reason, error_code, until, probe_at, request_id, endpoint, answer)
         VALUES ($1, $2, $3, $4, $5, coalesce($5, now() + $6 * interval '1 second'), $7, $8, $9)
         ON CONFLICT (account) DO UPDATE
            SET scope = CASE WHEN s.scope = 'all' OR excluded.scope = 'all' THEN 'all' ELSE 'create' END,
                reason = excluded.reason, error_code = excluded.error_code, until = excluded.until,
                probe_at = CASE WHEN excluded.until IS NOT NULL THEN greatest(s.probe_at, excluded.until)
                                ELSE s.probe_at END,
                request_id = excluded.request_id, endpoint = excluded.endpoint, answer = excluded.answer,
                updated_at = now()",
    )
    .bind(account)
    .bind(scope)
    .bind(reason)
    .bind(code)
    .bind(until)
    .bind(secs(first_probe_in))
    .bind(cause.as_ref().map(|c| c.request_id))
    .bind(cause.as_ref().map(|c| c.endpoint))
    .bind(cause.as_ref().map(|c| c.answer))
    .execute(pool)
    .await?;
    Ok(())
}

/// Takes the right to probe a stopped account (one process at a time), pushing the next
/// probe `next_in` away. `probes` must be the count read with the stop.
pub async fn claim_probe(
    pool: &Db,
    account: &str,
    probes: i32,
    next_in: Duration,
) -> Result<bool, sqlx::Error> {
    let r = sql::query(
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
/// The provider answered normally: the stop is over. Time spent in the stop does not
/// count against any row's retry budget: open rows' streaks of transient errors that
/// began before the stop are moved forward by its length (a stop pauses the streak).
pub async fn clear_stop(pool: &Db, account: &str) -> Result<bool, sqlx::Error> {
    let cleared: Option<i64> = sql::query_scalar(
        "WITH stop AS (DELETE FROM report_account_stops WHERE account = $1 RETURNING since),
              paused AS (
                  UPDATE report_requests r
                     SET transient_since = r.transient_since + (now() - stop.since)
                    FROM stop
                   WHERE r.state IN ('queued', 'generating') AND r.transient_since < stop.since
                  RETURNING r.id)
         SELECT count(*) FROM stop",
    )
    .bind(account)
    .fetch_optional(pool)
    .await?;
    Ok(cleared == Some(1))
}

/// Reserves the account's next call slot, spaced `spacing` after the previous one
/// across every process, and returns how long to wait for it (by the database's clock,
/// so hosts with skewed clocks still share one schedule).
pub async fn reserve_call_slot(
    pool: &Db,
    account: &str,
    spacing: Duration,
) -> Result<Duration, sqlx::Error> {
    let wait: f64 = sql::query_scalar(
        "INSERT INTO report_account_pacing AS p (account, next_slot_at, qps)
         VALUES ($1, clock_timestamp() + $2 * interval '1 second', 1 / nullif($2, 0))
         ON CONFLICT (account) DO UPDATE
            SET next_slot_at = greatest(p.next_slot_at, clock_timestamp()) + $2 * interval '1 second',
                qps = excluded.qps
         RETURNING greatest(0, extract(epoch FROM (next_slot_at - $2 * interval '1 second' - clock_timestamp())))::float8",
    )
    .bind(account)
    .bind(secs(spacing))
    .fetch_one(pool)
    .await?;
    Ok(Duration::from_secs_f64(wait.max(0.0)))
}

/// The provider said "too fast" (67200002): every process's next slot moves back.
pub async fn slow_down(pool: &Db, account: &str, pause: Duration) -> Result<(), sqlx::Error> {
    sql::query(
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

/// What reserving a create against the daily limit found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// Reserved: this is today's create number `used`.
    Reserved { used: i64 },
    /// The rest of today's quota is kept for rows already paid for (retries).
    Held { used: i64 },
    /// Today's quota is spent.
    Spent { used: i64 },
}

/// Reserves one create of today's (Asia/Shanghai) `limit` for `account`, leaving
/// `headroom` creates to others (retries). One statement: processes never overshoot.
pub async fn reserve_daily_create(
    pool: &Db,
    account: &str,
    limit: i64,
    headroom: i64,
) -> Result<Quota, sqlx::Error> {
    let reserved: Option<i64> = sql::query_scalar(
        "INSERT INTO report_daily_creates AS q (account, day, used)
         SELECT $1, (now() AT TIME ZONE 'Asia/Shanghai')::date, 1 WHERE $2 - $3 >= 1
         ON CONFLICT (account, day) DO UPDATE SET used = q.used + 1 WHERE q.used < $2 - $3
         RETURNING used",
    )
    .bind(account)
    .bind(limit)
    .bind(headroom.max(0))
    .fetch_optional(pool)
    .await?;
    if let Some(used) = reserved {
        return Ok(Quota::Reserved { used });
    }
    // Not reserved: read the count again in a statement of its own (a fresh snapshot: the
    // one above may predate a concurrent reservation that took the last place).
    let used: Option<i64> = sql::query_scalar(
        "SELECT used FROM report_daily_creates
          WHERE account = $1 AND day = (now() AT TIME ZONE 'Asia/Shanghai')::date",
    )
    .bind(account)
    .fetch_optional(pool)
    .await?;
    let used = used.unwrap_or(0);
    Ok(if used >= limit {
        Quota::Spent { used }
    } else {
        Quota::Held { used }
    })
}

/// What taking one task from the account's known balance found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// No balance is known for the account (`report_set_balance` never called).
    Untracked,
    /// Taken: `remaining` tasks are left.
    Taken { remaining: i64 },
    /// Only the part kept for retries of rows already paid for is left.
    Held { remaining: i64 },
    /// Nothing is left.
    Spent,
}

/// Takes one task from `account`'s known balance (`report_account_balance`), leaving
/// its headroom to retries unless `retry`. One statement: processes never overshoot.
pub async fn take_from_balance(
    pool: &Db,
    account: &str,
    retry: bool,
) -> Result<Balance, sqlx::Error> {
    let taken: Option<i64> = sql::query_scalar(
        "UPDATE report_account_balance SET remaining = remaining - 1
          WHERE account = $1 AND remaining > CASE WHEN $2 THEN 0 ELSE headroom END
         RETURNING remaining",
    )
    .bind(account)
    .bind(retry)
    .fetch_optional(pool)
    .await?;
    if let Some(remaining) = taken {
        return Ok(Balance::Taken { remaining });
    }
    // A fresh snapshot, as for the daily count.
    let remaining: Option<i64> =
        sql::query_scalar("SELECT remaining FROM report_account_balance WHERE account = $1")
            .bind(account)
            .fetch_optional(pool)
            .await?;
    Ok(match remaining {
        None => Balance::Untracked,
        Some(0) => Balance::Spent,
        Some(remaining) => Balance::Held { remaining },
    })
}

/// Every known balance: account, tasks remaining, tasks kept for retries.
pub async fn known_balances(pool: &Db) -> Result<Vec<(String, i64, i64)>, sqlx::Error> {
    sql::query_as(
        "SELECT account, remaining, headroom FROM report_account_balance ORDER BY account",
    )
    .fetch_all(pool)
    .await
}

/// Whether a balance is known for `account` (`report_set_balance` was called).
pub async fn balance_known(pool: &Db, account: &str) -> Result<bool, sqlx::Error> {
    sql::query_scalar("SELECT EXISTS (SELECT 1 FROM report_account_balance WHERE account = $1)")
        .bind(account)
        .fetch_one(pool)
        .await
}
