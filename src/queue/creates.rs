//! The statements that make creates safe to pay for: the intent committed before a
//! create is sent, what happens to it when the answer comes (or does not), and the
//! orphaned tasks whose job id could not be written to their row.
//!
//! The invariant: `attempts` is incremented, by a holder of an unexpired lease, before
//! every create that may reach the provider, and only while `attempts < max_attempts`.
//! An attempt is given back only when the provider certainly made no task.

use super::sql;
use std::time::Duration;

use super::Db;
use chrono::{DateTime, Utc};

use super::{Fenced, secs};
use crate::domain::{JobId, ReportType};

/// What `begin_create` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateIntent {
    /// Send the create now: attempt number `attempt` is committed, the intent recorded
    /// at `started_at` (database time), the lease extended to cover the call.
    Go {
        attempt: i32,
        /// Earlier creates of this life that got no answer (an expired intent included).
        unanswered: i32,
        started_at: DateTime<Utc>,
    },
    /// A create sent before a cancel and retry is still on the wire: do not create;
    /// look again at `until`, when it has been answered (and adopted) or given up.
    Wait { until: DateTime<Utc> },
    /// An orphaned task of this row became its task: the row is generating.
    Adopted { job: JobId },
    /// Attempts are spent; `unanswered` of them got no answer.
    Exhausted { attempts: i32, unanswered: i32 },
    /// The row is no longer ours: no call.
    Lost,
}

#[derive(sqlx::FromRow)]
struct BeginRow {
    id: i64,
    outcome: String,
    attempts: Option<i32>,
    unanswered: Option<i32>,
    job_id: Option<JobId>,
    started_at: Option<DateTime<Utc>>,
    wait_until: Option<DateTime<Utc>>,
}

impl TryFrom<BeginRow> for CreateIntent {
    type Error = sqlx::Error;

    fn try_from(r: BeginRow) -> Result<CreateIntent, sqlx::Error> {
        let missing = |what: &str| sqlx::Error::Protocol(format!("report_begin_create: no {what}"));
        Ok(match r.outcome.as_str() {
            "go" => CreateIntent::Go {
                attempt: r.attempts.ok_or_else(|| missing("attempts"))?,
                unanswered: r.unanswered.unwrap_or(0),
                started_at: r.started_at.ok_or_else(|| missing("started_at"))?,
            },
            "wait" => CreateIntent::Wait {
                until: r.wait_until.ok_or_else(|| missing("wait_until"))?,
            },
            "adopted" => CreateIntent::Adopted {
                job: r.job_id.ok_or_else(|| missing("job_id"))?,
            },
            "exhausted" => CreateIntent::Exhausted {
                attempts: r.attempts.ok_or_else(|| missing("attempts"))?,
                unanswered: r.unanswered.unwrap_or(0),
            },
            _ => CreateIntent::Lost,
        })
    }
}

/// One row's request for a create intent. `budget` is how long the create may take
/// from now; orphans younger than `adopt_within` are adopted; an adopted task is first
/// polled `first_poll` after its creation. `account` is the account about to create (it
/// is written to the row with the intent: only it may poll the task).
#[derive(Debug, Clone)]
pub struct Begin {
    pub id: i64,
    pub token: i64,
    pub owner: String,
    pub account: String,
    pub budget: Duration,
    pub adopt_within: Duration,
    pub first_poll: Duration,
}

/// The create intent: one guarded statement before any create is sent (the function
/// `report_begin_create` in the migrations).
#[allow(clippy::too_many_arguments)]
pub async fn begin_create(
    pool: &Db,
    id: i64,
    token: i64,
    owner: &str,
    account: &str,
    budget: Duration,
    adopt_within: Duration,
    first_poll: Duration,
) -> Result<CreateIntent, sqlx::Error> {
    let begin = Begin {
        id,
        token,
        owner: owner.to_string(),
        account: account.to_string(),
        budget,
        adopt_within,
        first_poll,
    };
    let mut decided = begin_create_batch(pool, std::slice::from_ref(&begin)).await?;
    Ok(decided
        .pop()
        .map_or(CreateIntent::Lost, |(_, intent)| intent))
}

/// `begin_create` for many rows in one statement and one commit, each row decided on
/// its own. The owner and durations are the first item's (one process sends a batch).
pub async fn begin_create_batch(
    pool: &Db,
    items: &[Begin],
) -> Result<Vec<(i64, CreateIntent)>, sqlx::Error> {
    let Some(first) = items.first() else {
        return Ok(Vec::new());
    };
    let rows: Vec<BeginRow> = sql::query_as(
        "SELECT id, outcome, attempts, unanswered, job_id, started_at, wait_until
           FROM report_begin_create_batch($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(items.iter().map(|i| i.id).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.token).collect::<Vec<_>>())
    .bind(&first.owner)
    .bind(secs(first.budget))
    .bind(secs(first.adopt_within))
    .bind(secs(first.first_poll))
    .bind(items.iter().map(|i| i.account.as_str()).collect::<Vec<_>>())
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| Ok((r.id, CreateIntent::try_from(r)?)))
        .collect()
}

/// The create was certainly not made (nothing was sent, or the provider's answer proves
/// it) and will be tried again at once in this claim: its attempt is given back (and
/// counted as refunded in the ledger) and the intent cleared; the row stays held.
pub async fn refund_create(pool: &Db, id: i64, token: i64) -> Result<Fenced, sqlx::Error> {
    let n: i64 = sql::query_scalar(
        "WITH done AS (
             UPDATE report_requests r
                SET attempts = attempts - 1, creates_sent = greatest(creates_sent - 1, 0),
                    create_started_at = NULL, create_deadline = NULL, updated_at = now()
              WHERE id = $1 AND lease_token = $2 AND state = 'queued' AND create_started_at IS NOT NULL
             RETURNING r.account,
                       (SELECT o.create_started_at FROM report_requests o WHERE o.id = r.id) AS began)
         , counted AS (
             INSERT INTO report_create_counts AS c (day, account, slot, refunded)
             SELECT (began AT TIME ZONE 'Asia/Shanghai')::date, coalesce(account, ''),
                    (pg_backend_pid() % 16)::smallint, 1
               FROM done
             ON CONFLICT (day, account, slot) DO UPDATE SET refunded = c.refunded + 1
             RETURNING 1)
         SELECT count(*) FROM done",
    )
    .bind(id)
    .bind(token)
    .fetch_one(pool)
    .await?;
    Ok(Fenced::from_rows(n as u64))
}

/// The row waits for a create another claim sent before a cancel and retry: it is
/// released until that create's deadline, its intent kept.
pub async fn wait_for_create(pool: &Db, id: i64, token: i64) -> Result<Fenced, sqlx::Error> {
    let r = sql::query(
        "UPDATE report_requests
            SET run_after = greatest(run_after, create_deadline),
                lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
          WHERE id = $1 AND lease_token = $2 AND state = 'queued' AND create_deadline IS NOT NULL",
    )
    .bind(id)
    .bind(token)
    .execute(pool)
    .await?;
    Ok(Fenced::from_rows(r.rows_affected()))
}

/// After a create whose answer could not be written to its row (the row was cancelled
/// or taken over meanwhile) and got no usable answer: clears that create's intent, if it
/// is still the row's, counting it as unanswered there (a retry during the create made
/// it the new life's first attempt), so a retry of the row does not wait for a create
/// that is over.
pub async fn forget_create(
    pool: &Db,
    id: i64,
    started_at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sql::query(
        "UPDATE report_requests
            SET create_started_at = NULL, create_deadline = NULL,
                unanswered_creates = unanswered_creates + 1,
                -- A claimer that met the intent waits until its deadline: no longer.
                run_after = CASE WHEN state = 'queued' THEN least(run_after, now()) ELSE run_after END
          WHERE id = $1 AND create_started_at = $2",
    )
    .bind(id)
    .bind(started_at)
    .execute(pool)
    .await?;
    Ok(())
}

/// A create whose answer proved that no task was made, after its row was cancelled and
/// retried while it was on the wire (so the claim's own refund found the row no longer
/// its): the row still carries this create's intent, now as its new life's first
/// attempt. That attempt is given back (and counted as refunded in the ledger) and the
/// intent cleared, so the retried row creates at once instead of waiting for the
/// deadline and counting a create that certainly made nothing. One statement; nothing
/// when the row carries another intent or none.
pub async fn refund_intent(
    pool: &Db,
    id: i64,
    started_at: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    let n: i64 = sql::query_scalar(
        "WITH done AS (
             UPDATE report_requests r
                SET attempts = greatest(attempts - 1, 0), creates_sent = greatest(creates_sent - 1, 0),
                    create_started_at = NULL, create_deadline = NULL, updated_at = now(),
                    -- A claimer that met the intent waits until its deadline: no longer.
                    run_after = CASE WHEN state = 'queued' THEN least(run_after, now()) ELSE run_after END
              WHERE id = $1 AND create_started_at = $2
             RETURNING r.account),
         counted AS (
             INSERT INTO report_create_counts AS c (day, account, slot, refunded)
             SELECT ($2::timestamptz AT TIME ZONE 'Asia/Shanghai')::date, coalesce(account, ''),
                    (pg_backend_pid() % 16)::smallint, 1
               FROM done
             ON CONFLICT (day, account, slot) DO UPDATE SET refunded = c.refunded + 1
             RETURNING 1)
         SELECT count(*) FROM done",
    )
    .bind(id)
    .bind(started_at)
    .fetch_one(pool)
    .await?;
    Ok(n == 1)
}

/// A task whose job id could not be written to its row.
#[derive(Debug, Clone)]
pub struct Orphan {
    pub request_id: i64,
    pub job_id: JobId,
    /// The intent the create was sent under, when there was one.
    pub started_at: Option<DateTime<Utc>>,
    pub account: String,
    pub report_type: ReportType,
    pub reason: String,
}

/// What became of an orphaned task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrphanFate {
    /// Its row still waited for exactly this create (a cancel and retry while it was on
    /// the wire): the row took it over and is generating.
    Adopted,
    /// Recorded in `report_orphan_tasks`, for a later retry of its row to adopt and for
    /// operators to see.
    Recorded,
    /// The job id is already the row's: an earlier write of it committed, though its
    /// answer was lost on the way back (a connection cut at the wrong moment).
    AlreadyWritten,
}

/// Records an orphaned task, or hands it straight to its row when the row is queued,
/// has no task, and still carries the intent this create was sent under. Either way
/// the create's intent is cleared if it is still the row's, and the job id counts as a
/// paid task in the ledger (once: a job id already on its row or among the orphans is
/// not counted again). One statement.
pub async fn adopt_or_record_orphan(
    pool: &Db,
    orphan: &Orphan,
    first_poll: Duration,
) -> Result<OrphanFate, sqlx::Error> {
    let (written, adopted): (bool, Option<bool>) = sql::query_as(
        "WITH own AS (
             SELECT 1 FROM report_requests WHERE id = $1 AND upstream_job_id = $2),
         adopted AS (
             UPDATE report_requests
                SET state = 'generating', upstream_job_id = $2, upstream_created_at = now(),
                    next_poll_at = now() + $7 * interval '1 second', polls = 0,
                    create_started_at = NULL, create_deadline = NULL, account = $4,
                    coalescing_since = NULL, transient_errors = 0, transient_since = NULL,
                    lease_owner = NULL, lease_expires_at = NULL, lease_token = lease_token + 1,
                    updated_at = now()
              WHERE id = $1 AND state = 'queued' AND upstream_job_id IS NULL
                AND create_started_at = $3 AND NOT EXISTS (SELECT 1 FROM own)
             RETURNING id),
         cleared AS (
             UPDATE report_requests SET create_started_at = NULL, create_deadline = NULL
              WHERE id = $1 AND create_started_at = $3 AND NOT EXISTS (SELECT 1 FROM adopted)
             RETURNING id),
         -- (`cleared` runs whether or not it is read: data-modifying WITHs always do.)
         inserted AS (
             INSERT INTO report_orphan_tasks (job_id, request_id, account, report_type, reason, adopted_at)
             SELECT $2, $1, $4, $5, $6, CASE WHEN EXISTS (SELECT 1 FROM adopted) THEN now() END
              WHERE NOT EXISTS (SELECT 1 FROM own)
             ON CONFLICT (job_id) DO NOTHING
             RETURNING adopted_at IS NOT NULL AS adopted),
         counted AS (
             INSERT INTO report_create_counts AS c (day, account, slot, tasks)
             SELECT (coalesce($3, now()) AT TIME ZONE 'Asia/Shanghai')::date, $4,
                    (pg_backend_pid() % 16)::smallint, 1
               FROM inserted
             ON CONFLICT (day, account, slot) DO UPDATE SET tasks = c.tasks + 1
             RETURNING 1)
         SELECT EXISTS (SELECT 1 FROM own), (SELECT adopted FROM inserted)",
    )
    .bind(orphan.request_id)
    .bind(&orphan.job_id)
    .bind(orphan.started_at)
    .bind(&orphan.account)
    .bind(orphan.report_type)
    .bind(&orphan.reason)
    .bind(secs(first_poll))
    .fetch_one(pool)
    .await?;
    Ok(if written {
        OrphanFate::AlreadyWritten
    } else if adopted == Some(true) {
        OrphanFate::Adopted
    } else {
        OrphanFate::Recorded
    })
}

/// One row of `report_orphan_tasks`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct OrphanTask {
    pub job_id: JobId,
    pub request_id: i64,
    pub account: String,
    pub report_type: ReportType,
    pub created_at: DateTime<Utc>,
    pub reason: String,
    pub adopted_at: Option<DateTime<Utc>>,
}

/// Every orphaned task, oldest first.
pub async fn orphan_tasks(pool: &Db) -> Result<Vec<OrphanTask>, sqlx::Error> {
    sql::query_as(
        "SELECT job_id, request_id, account, report_type, created_at, reason, adopted_at
           FROM report_orphan_tasks ORDER BY id",
    )
    .fetch_all(pool)
    .await
}
