//! What operators read: per-state statistics, the account stops, and a batch of rows at
//! a glance (the demo's progress and summary).

use super::Db;
use super::sql;
use chrono::{DateTime, Utc};

use super::AccountStop;
use super::accounts::STOP_COLUMNS;
use crate::domain::{ReportType, RequestState};

/// One line of `report_queue_stats`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StateStats {
    pub state: RequestState,
    pub count: i64,
    pub oldest_age_secs: Option<f64>,
}

pub async fn queue_stats(pool: &Db) -> Result<Vec<StateStats>, sqlx::Error> {
    sql::query_as(
        "SELECT state, count, extract(epoch FROM oldest_age)::float8 AS oldest_age_secs
           FROM report_queue_stats",
    )
    .fetch_all(pool)
    .await
}

/// The shared state `/metrics` exports beside the queue depth, read in one statement of
/// small tables and partial indexes (of `report_requests`, only the generating rows: a
/// few thousand at the most, what is in flight at the provider): every process of a
/// deployment reads, and exports, the same numbers, so alerts take their `max`.
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub struct Telemetry {
    /// The accounts with a stop now, and its scope (`create` or `all`).
    pub stopped_accounts: Vec<String>,
    pub stop_scopes: Vec<String>,
    /// Today's creates (Asia/Shanghai, as the provider counts days) by account, from
    /// the ledger: sent, answered with a task, refunded (answered without one), and
    /// unknown (sent, never answered: each assumed to have made a paid task).
    pub ledger_accounts: Vec<String>,
    pub sent: Vec<i64>,
    pub tasks: Vec<i64>,
    pub refunded: Vec<i64>,
    pub unknown: Vec<i64>,
    /// Creates taken from today's `UPSTREAM_DAILY_LIMIT` (what the limit is enforced on:
    /// reserved before a create is sent), by account.
    pub daily_accounts: Vec<String>,
    pub daily_used: Vec<i64>,
    /// Seconds since the create of the oldest task still generating (what
    /// `REPORT_GIVE_UP_AFTER` counts from); `None` when no row is generating.
    pub oldest_task_secs: Option<f64>,
    /// Paid tasks kept for a later adoption, not adopted yet.
    pub orphans_waiting: i64,
    /// Worker processes that said they were alive in the last 30 s.
    pub workers_alive: i64,
    /// Webhook deliveries still to make, and those that gave up.
    pub webhooks_pending: i64,
    pub webhooks_failed: i64,
}

pub async fn telemetry(pool: &Db) -> Result<Telemetry, sqlx::Error> {
    sql::query_as(
        "SELECT coalesce(s.accounts, '{}') AS stopped_accounts, coalesce(s.scopes, '{}') AS stop_scopes,
                coalesce(l.accounts, '{}') AS ledger_accounts, coalesce(l.sent, '{}') AS sent,
                coalesce(l.tasks, '{}') AS tasks, coalesce(l.refunded, '{}') AS refunded,
                coalesce(l.unknown, '{}') AS unknown,
                coalesce(d.accounts, '{}') AS daily_accounts, coalesce(d.used, '{}') AS daily_used,
                (SELECT extract(epoch FROM now() - min(upstream_created_at))::float8
                   FROM report_requests WHERE state = 'generating') AS oldest_task_secs,
                (SELECT count(*) FROM report_orphan_tasks WHERE adopted_at IS NULL) AS orphans_waiting,
                (SELECT count(*) FROM report_workers WHERE seen_at > now() - interval '30 seconds')
                  AS workers_alive,
                (SELECT count(*) FROM report_webhook_deliveries WHERE state = 'pending') AS webhooks_pending,
                (SELECT count(*) FROM report_webhook_deliveries WHERE state = 'failed') AS webhooks_failed
           FROM (SELECT array_agg(account ORDER BY account) AS accounts,
                        array_agg(scope ORDER BY account) AS scopes
                   FROM report_account_stops) s,
                (SELECT array_agg(account ORDER BY account) AS accounts,
                        array_agg(sent ORDER BY account) AS sent,
                        array_agg(tasks ORDER BY account) AS tasks,
                        array_agg(refunded ORDER BY account) AS refunded,
                        array_agg(unknown ORDER BY account) AS unknown
                   FROM report_create_ledger
                  WHERE day = (now() AT TIME ZONE 'Asia/Shanghai')::date) l,
                (SELECT array_agg(account ORDER BY account) AS accounts,
                        array_agg(used ORDER BY account) AS used
                   FROM report_daily_creates
                  WHERE day = (now() AT TIME ZONE 'Asia/Shanghai')::date) d",
    )
    .fetch_one(pool)
    .await
}

pub async fn account_stops(pool: &Db) -> Result<Vec<AccountStop>, sqlx::Error> {
    sql::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {STOP_COLUMNS} FROM report_account_stops ORDER BY account"
    )))
    .fetch_all(pool)
    .await
}

/// How many of `ids` are in each state.
pub async fn state_counts(pool: &Db, ids: &[i64]) -> Result<Vec<(RequestState, i64)>, sqlx::Error> {
    sql::query_as(
        "SELECT state, count(*) FROM report_requests WHERE id = ANY($1) GROUP BY state ORDER BY state",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
}

/// One request as a person reads it: what was asked, where it stands, what came back.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RequestSummary {
    pub id: i64,
    pub company_name: Option<String>,
    pub credit_code: Option<String>,
    pub org_number: Option<String>,
    pub report_type: ReportType,
    pub state: RequestState,
    pub attempts: i32,
    pub last_error_code: Option<i32>,
    pub last_error: Option<String>,
    /// The stored document's size, when there is one.
    pub byte_size: Option<i64>,
}

pub async fn request_summaries(pool: &Db, ids: &[i64]) -> Result<Vec<RequestSummary>, sqlx::Error> {
    sql::query_as(
        "SELECT r.id, r.company_name, r.credit_code, r.org_number, r.report_type, r.state, r.attempts,
                r.last_error_code, r.last_error, d.byte_size
           FROM report_requests r LEFT JOIN report_documents d ON d.request_id = r.id
          WHERE r.id = ANY($1) ORDER BY r.id",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
}

/// Rows whose last error, written within `within`, carried `code`: how many rows met the
/// same undocumented answer lately (several rows mean the account, not the rows).
pub async fn rows_lost_to(
    pool: &Db,
    code: i32,
    within: std::time::Duration,
) -> Result<i64, sqlx::Error> {
    sql::query_scalar(
        "SELECT count(*) FROM report_requests
          WHERE last_error_code = $1 AND last_error_at > now() - $2 * interval '1 second'
            AND state IN ('queued', 'generating', 'failed')",
    )
    .bind(code)
    .bind(within.as_secs_f64())
    .fetch_one(pool)
    .await
}

/// Rows that reached a final state in the last complete minute, hour and day.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Throughput {
    pub state: RequestState,
    pub last_minute: i64,
    pub last_hour: i64,
    pub last_day: i64,
}

pub async fn throughput(pool: &Db) -> Result<Vec<Throughput>, sqlx::Error> {
    sql::query_as("SELECT state, last_minute, last_hour, last_day FROM report_throughput")
        .fetch_all(pool)
        .await
}

/// A batch at a glance: rows per state, and why rows failed (most frequent first).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchSummary {
    pub states: Vec<(RequestState, i64)>,
    /// (error code, reason, rows), at most ten.
    pub failures: Vec<(Option<i32>, String, i64)>,
    /// When it is expected to finish, while it has open rows (`report_batch_forecast`).
    pub forecast: Option<BatchForecast>,
}

/// One open batch's forecast: a row of `report_batch_forecast` (see the migration
/// `20261201000006_fair_batches.sql` for how each number is made).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct BatchForecast {
    pub batch: String,
    pub weight: f32,
    /// Its share of the account's calls now, among the groups with creates to make.
    pub share: f64,
    pub calls_per_report: f64,
    /// The share of its rows served from a stored document (no paid task).
    pub served_share: f64,
    /// From a task's create to the row's end.
    pub seconds_per_report: f64,
    /// Paid tasks still to create.
    pub creates_left: i64,
    /// Provider calls still to make for them.
    pub calls_left: i64,
    /// The account's calls per second (its QPS, or what it made in the last 10 minutes).
    pub calls_per_second: Option<f64>,
    /// When the day's create limit runs out before the batch's last create, if it does.
    pub runs_into_daily_limit_at: Option<DateTime<Utc>>,
    /// Provider days (Asia/Shanghai) its creates span, when a daily limit is known.
    pub provider_days: Option<i32>,
    pub finish_at: Option<DateTime<Utc>>,
    /// What decides the finish: qps, daily_limit, generation (only tasks being made),
    /// account_stopped, no_worker, no_calls_yet, daily_limit_zero.
    pub limited_by: String,
}

impl BatchForecast {
    /// What the forecast says, in one line for a person.
    pub fn describe(&self, now: DateTime<Utc>) -> String {
        let when = |t: DateTime<Utc>| {
            let secs = (t - now).num_seconds().max(0) as u64;
            let secs = if secs >= 60 { secs - secs % 60 } else { secs };
            format!(
                "{} (in {})",
                t.format("%Y-%m-%d %H:%M UTC"),
                humantime::format_duration(std::time::Duration::from_secs(secs))
            )
        };
        let finish = match (self.finish_at, self.limited_by.as_str()) {
            (Some(t), _) => format!("expected to finish {}", when(t)),
            (None, "no_worker") => "no forecast: no worker is running".to_string(),
            (None, "account_stopped") => {
                "no forecast: every account is stopped with no end".to_string()
            }
            (None, "no_calls_yet") => {
                "no forecast yet: no provider calls in the last 10 minutes".to_string()
            }
            (None, "daily_limit_zero") => {
                "no forecast: the daily limit leaves no creates for new rows".to_string()
            }
            (None, other) => format!("no forecast ({other})"),
        };
        let mut line = format!(
            "{finish}; {} paid tasks and {} provider calls to go ({:.1} calls a report, {:.0} % of the account's calls",
            self.creates_left,
            self.calls_left,
            self.calls_per_report,
            self.share * 100.0
        );
        if let Some(c) = self.calls_per_second {
            line.push_str(&format!(" at {c:.2}/s"));
        }
        line.push(')');
        if let Some(t) = self.runs_into_daily_limit_at {
            line.push_str(&format!(
                "; runs into the daily create limit {}, its creates span {} provider days (Asia/Shanghai)",
                when(t),
                self.provider_days.unwrap_or(2)
            ));
        }
        line
    }
}

/// The forecast of one open batch; `None` when it has no queued or generating rows.
pub async fn batch_forecast(pool: &Db, batch: &str) -> Result<Option<BatchForecast>, sqlx::Error> {
    sql::query_as(
        "SELECT batch, weight, share, calls_per_report, served_share, seconds_per_report, creates_left,
                calls_left, calls_per_second, runs_into_daily_limit_at, provider_days, finish_at, limited_by
           FROM report_batch_forecast WHERE batch = $1",
    )
    .bind(batch)
    .fetch_optional(pool)
    .await
}

pub async fn batch_summary(pool: &Db, batch: &str) -> Result<BatchSummary, sqlx::Error> {
    // From the counts the triggers keep: the same at 50 rows or 500,000.
    let states = sql::query_as(
        "SELECT state, sum(n)::bigint FROM report_batch_counts WHERE batch = $1
          GROUP BY state HAVING sum(n) <> 0 ORDER BY state",
    )
    .bind(batch)
    .fetch_all(pool)
    .await?;
    let failures = sql::query_as(
        "SELECT last_error_code, coalesce(left(last_error, 200), 'no reason recorded'), count(*)
           FROM report_requests WHERE batch = $1 AND state = 'failed'
          GROUP BY 1, 2 ORDER BY 3 DESC, 1 LIMIT 10",
    )
    .bind(batch)
    .fetch_all(pool)
    .await?;
    // The forecast is an estimate: when it cannot be made, the counts still show.
    let forecast = batch_forecast(pool, batch).await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, batch, "could not compute the batch forecast");
        None
    });
    Ok(BatchSummary {
        states,
        failures,
        forecast,
    })
}
