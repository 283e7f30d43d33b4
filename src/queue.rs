//! Every SQL statement the worker and the commands run against the queue lives here:
//! enqueueing, statistics, the account-wide stop and (for the engine) claims and
//! fenced completions. Nothing else in the crate writes SQL for `report_*` tables.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use crate::domain::NewRequest;

/// The NOTIFY channel an insert (and `report_retry`) signals on.
pub const NOTIFY_CHANNEL: &str = "report_requests";

/// What happened to one enqueued request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Inserted(i64),
    /// A row with the same `dedupe_key` already exists; this is its id.
    Duplicate(i64),
}

impl Enqueued {
    pub fn id(self) -> i64 {
        match self {
            Enqueued::Inserted(id) | Enqueued::Duplicate(id) => id,
        }
    }
}

/// Inserts one request; a `dedupe_key` that is already taken is not an error.
pub async fn enqueue(pool: &PgPool, r: &NewRequest) -> Result<Enqueued, sqlx::Error> {
    let inserted: Option<i64> = sqlx::query_scalar(
        "INSERT INTO report_requests
             (company_name, credit_code, org_number, report_type, priority, run_after,
              max_attempts, dedupe_key, metadata)
         VALUES ($1, $2, $3, $4, $5, coalesce($6, now()), coalesce($7, 3), $8,
                 coalesce($9, '{}'::jsonb))
         ON CONFLICT (dedupe_key) DO NOTHING
         RETURNING id",
    )
    .bind(&r.company_name)
    .bind(&r.credit_code)
    .bind(&r.org_number)
    .bind(r.report_type.as_str())
    .bind(r.priority)
    .bind(r.run_after)
    .bind(r.max_attempts)
    .bind(&r.dedupe_key)
    .bind(&r.metadata)
    .fetch_optional(pool)
    .await?;
    if let Some(id) = inserted {
        return Ok(Enqueued::Inserted(id));
    }
    let existing: i64 = sqlx::query_scalar("SELECT id FROM report_requests WHERE dedupe_key = $1")
        .bind(&r.dedupe_key)
        .fetch_one(pool)
        .await?;
    Ok(Enqueued::Duplicate(existing))
}

/// One line of `report_queue_stats`.
#[derive(Debug, Clone, PartialEq)]
pub struct StateStats {
    pub state: String,
    pub count: i64,
    pub oldest_age_secs: Option<f64>,
}

pub async fn queue_stats(pool: &PgPool) -> Result<Vec<StateStats>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT state, count, extract(epoch FROM oldest_age)::float8 AS oldest_age_secs
           FROM report_queue_stats",
    )
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|row| {
            Ok(StateStats {
                state: row.try_get("state")?,
                count: row.try_get("count")?,
                oldest_age_secs: row.try_get("oldest_age_secs")?,
            })
        })
        .collect()
}

/// An account-wide stop as recorded in `report_account_stops`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AccountStop {
    pub account: String,
    pub reason: String,
    pub error_code: Option<i32>,
    pub since: DateTime<Utc>,
    pub until: Option<DateTime<Utc>>,
    pub probe_at: DateTime<Utc>,
    pub probes: i32,
}

pub async fn account_stops(pool: &PgPool) -> Result<Vec<AccountStop>, sqlx::Error> {
    sqlx::query_as(
        "SELECT account, reason, error_code, since, until, probe_at, probes
           FROM report_account_stops ORDER BY account",
    )
    .fetch_all(pool)
    .await
}
