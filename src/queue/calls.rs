//! Provider calls per minute, account, endpoint and outcome (`report_provider_calls`,
//! kept 8 days) and per day as the provider counts days (`report_provider_calls_daily`,
//! the ledger's): every worker process adds its own counts every few seconds, so any
//! process (the dashboard, `status`) reads the whole account's calls.

use super::sql;
use std::time::Duration;

use super::Db;
use chrono::{DateTime, Utc};

use super::secs;

/// One tally to add: (endpoint, outcome, calls).
pub type CallTally = (String, String, i64);

/// Adds `tallies` to the current minute of `account` (the database's clock). One
/// statement, whatever the number of tallies.
pub async fn record_calls(
    pool: &Db,
    account: &str,
    tallies: &[CallTally],
) -> Result<(), sqlx::Error> {
    if tallies.is_empty() {
        return Ok(());
    }
    let endpoints: Vec<&str> = tallies.iter().map(|t| t.0.as_str()).collect();
    let outcomes: Vec<&str> = tallies.iter().map(|t| t.1.as_str()).collect();
    let counts: Vec<i64> = tallies.iter().map(|t| t.2).collect();
    sql::query(
        "WITH t AS (SELECT * FROM unnest($2::text[], $3::text[], $4::bigint[]) AS t(e, o, n)),
              daily AS (
                  INSERT INTO report_provider_calls_daily AS d (day, account, endpoint, outcome, n)
                  SELECT (now() AT TIME ZONE 'Asia/Shanghai')::date, $1, e, o, n FROM t ORDER BY e, o
                  ON CONFLICT (day, account, endpoint, outcome) DO UPDATE SET n = d.n + excluded.n
                  RETURNING 1)
         INSERT INTO report_provider_calls AS c (minute, account, endpoint, outcome, n)
         SELECT date_trunc('minute', now()), $1, e, o, n FROM t
          ORDER BY e, o
         ON CONFLICT (minute, account, endpoint, outcome) DO UPDATE SET n = c.n + excluded.n",
    )
    .bind(account)
    .bind(&endpoints)
    .bind(&outcomes)
    .bind(&counts)
    .execute(pool)
    .await?;
    Ok(())
}

/// Removes minutes older than `keep` (small: at most a few dozen rows per minute).
pub async fn forget_calls_before(pool: &Db, keep: Duration) -> Result<u64, sqlx::Error> {
    let r = sql::query(
        "DELETE FROM report_provider_calls WHERE minute < now() - $1 * interval '1 second'",
    )
    .bind(secs(keep))
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

/// Calls of every account in one minute, by endpoint and outcome.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct CallsInMinute {
    pub minute: DateTime<Utc>,
    pub endpoint: String,
    pub outcome: String,
    pub n: i64,
}

/// Calls per minute over the last `within`, oldest first.
pub async fn calls_per_minute(
    pool: &Db,
    within: Duration,
) -> Result<Vec<CallsInMinute>, sqlx::Error> {
    sql::query_as(
        "SELECT minute, endpoint, outcome, sum(n)::bigint AS n FROM report_provider_calls
          WHERE minute >= date_trunc('minute', now()) - $1 * interval '1 second' AND endpoint <> 'reuse'
          GROUP BY minute, endpoint, outcome ORDER BY minute, endpoint, outcome",
    )
    .bind(secs(within))
    .fetch_all(pool)
    .await
}

/// An account's calls in the last complete minute against the QPS its processes are
/// configured with.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct QpsUse {
    pub account: String,
    /// Calls per second over the last complete minute.
    pub in_use: f64,
    /// The configured QPS (None: no process has reserved a call slot yet).
    pub allowed: Option<f64>,
}

pub async fn qps_use(pool: &Db) -> Result<Vec<QpsUse>, sqlx::Error> {
    sql::query_as(
        "WITH used AS (
             SELECT account, sum(n)::float8 / 60 AS in_use FROM report_provider_calls
              WHERE minute = date_trunc('minute', now()) - interval '1 minute' AND endpoint <> 'reuse'
              GROUP BY account)
         SELECT coalesce(p.account, u.account) AS account, coalesce(u.in_use, 0) AS in_use, p.qps AS allowed
           FROM report_account_pacing p FULL JOIN used u ON u.account = p.account
          ORDER BY 1",
    )
    .fetch_all(pool)
    .await
}

/// One day of spending, as the provider counts days (Asia/Shanghai).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct SpendDay {
    pub day: chrono::NaiveDate,
    /// Creates answered with a job id: paid tasks.
    pub paid: i64,
    /// Creates with no usable answer: each may be a paid task without a job id here.
    pub unknown: i64,
    /// Every call (token, create, poll, download).
    pub calls: i64,
    /// Reports stored that day.
    pub stored: i64,
    /// Tasks kept as orphans (created, but their row had moved on).
    pub orphans: i64,
    /// "Too fast" answers (67200002 and HTTP 429).
    pub rate_limited: i64,
    /// Rows served from a stored document (no provider call).
    pub reused: i64,
}

/// The last `days` days (today included), newest first: `report_ledger` summed over
/// accounts, with the reports stored each day.
pub async fn spend_by_day(pool: &Db, days: i32) -> Result<Vec<SpendDay>, sqlx::Error> {
    sql::query_as(
        "WITH days AS (
             SELECT (now() AT TIME ZONE 'Asia/Shanghai')::date - g AS day FROM generate_series(0, $1 - 1) g),
         ledger AS (
             SELECT day, sum(paid_tasks) AS paid, sum(unknown_creates) AS unknown, sum(calls) AS calls,
                    sum(orphans) AS orphans, sum(rate_limited) AS rate_limited, sum(reuse_hits) AS reused
               FROM report_ledger
              WHERE day > (now() AT TIME ZONE 'Asia/Shanghai')::date - $1
              GROUP BY 1),
         stored AS (
             SELECT (minute AT TIME ZONE 'Asia/Shanghai')::date AS day, sum(n) AS stored
               FROM report_finished_minutes
              WHERE state = 'succeeded'
                AND minute >= ((now() AT TIME ZONE 'Asia/Shanghai')::date - $1 + 1) AT TIME ZONE 'Asia/Shanghai'
              GROUP BY 1)
         SELECT d.day, coalesce(l.paid, 0)::bigint AS paid, coalesce(l.unknown, 0)::bigint AS unknown,
                coalesce(l.calls, 0)::bigint AS calls, coalesce(s.stored, 0)::bigint AS stored,
                coalesce(l.orphans, 0)::bigint AS orphans, coalesce(l.rate_limited, 0)::bigint AS rate_limited,
                coalesce(l.reused, 0)::bigint AS reused
           FROM days d
           LEFT JOIN ledger l ON l.day = d.day
           LEFT JOIN stored s ON s.day = d.day
          ORDER BY d.day DESC",
    )
    .bind(days)
    .fetch_all(pool)
    .await
}

/// Today's line of the ledger (Asia/Shanghai day), summed over accounts.
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub struct LedgerDay {
    pub paid_tasks: i64,
    pub reuse_hits: i64,
    pub unknown_creates: i64,
    pub documents: i64,
    pub orphans: i64,
    pub rate_limited: i64,
    pub calls: i64,
}

pub async fn ledger_today(pool: &Db) -> Result<LedgerDay, sqlx::Error> {
    sql::query_as(
        "SELECT coalesce(sum(paid_tasks), 0)::bigint AS paid_tasks,
                coalesce(sum(reuse_hits), 0)::bigint AS reuse_hits,
                coalesce(sum(unknown_creates), 0)::bigint AS unknown_creates,
                coalesce(sum(documents), 0)::bigint AS documents,
                coalesce(sum(orphans), 0)::bigint AS orphans,
                coalesce(sum(rate_limited), 0)::bigint AS rate_limited,
                coalesce(sum(calls), 0)::bigint AS calls
           FROM report_ledger WHERE day = (now() AT TIME ZONE 'Asia/Shanghai')::date",
    )
    .fetch_one(pool)
    .await
}
