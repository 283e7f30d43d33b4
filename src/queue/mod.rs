//! Every SQL statement the worker and the commands run against the queue lives here:
//! enqueueing, statistics, the account-wide stop and (for the engine) claims and
//! fenced completions. Nothing else in the crate writes SQL for `report_*` tables.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

mod connect;

pub use connect::{DbError, MIGRATOR, connect, connect_worker, migrate};

use crate::domain::NewRequest;
use crate::upstream::Document;

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
    pub scope: String,
    pub reason: String,
    pub error_code: Option<i32>,
    pub since: DateTime<Utc>,
    pub until: Option<DateTime<Utc>>,
    pub probe_at: DateTime<Utc>,
    pub probes: i32,
}

pub async fn account_stops(pool: &PgPool) -> Result<Vec<AccountStop>, sqlx::Error> {
    sqlx::query_as(
        "SELECT account, scope, reason, error_code, since, until, probe_at, probes
           FROM report_account_stops ORDER BY account",
    )
    .fetch_all(pool)
    .await
}

// ---------------------------------------------------------------------------------
// The engine's statements. Every write after an upstream call is fenced by the
// `lease_token` the row was claimed with: a worker whose lease expired (or whose row
// was cancelled) changes nothing.
// ---------------------------------------------------------------------------------

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// A claimed row: what the engine needs to act on it, plus the database's clock at the
/// claim so schedules are computed in one time base across hosts.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: i64,
    pub lease_token: i64,
    pub state: String,
    pub company_name: Option<String>,
    pub credit_code: Option<String>,
    pub org_number: Option<String>,
    pub report_type: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub upstream_job_id: Option<String>,
    pub upstream_created_at: Option<DateTime<Utc>>,
    pub polls: i32,
    pub transient_errors: i32,
    pub transient_since: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub db_now: DateTime<Utc>,
}

/// Which kinds of work a claim may take (an account stop narrows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimKinds {
    pub polls: bool,
    pub creates: bool,
}

impl ClaimKinds {
    pub const ALL: ClaimKinds = ClaimKinds {
        polls: true,
        creates: true,
    };
    pub const POLLS: ClaimKinds = ClaimKinds {
        polls: true,
        creates: false,
    };
    pub const CREATES: ClaimKinds = ClaimKinds {
        polls: false,
        creates: true,
    };
    pub const NONE: ClaimKinds = ClaimKinds {
        polls: false,
        creates: false,
    };
}

/// Claims up to `limit` rows that are due: generating rows whose poll is due first
/// (they keep paid tasks inside their window), then queued rows by priority, run_after,
/// id. `FOR UPDATE SKIP LOCKED` lets any number of workers claim side by side; the
/// claim commits at once, and the row is then worked under its lease.
pub async fn claim(
    pool: &PgPool,
    owner: &str,
    lease: Duration,
    limit: i64,
    kinds: ClaimKinds,
) -> Result<Vec<Claimed>, sqlx::Error> {
    if limit <= 0 || kinds == ClaimKinds::NONE {
        return Ok(Vec::new());
    }
    sqlx::query_as(
        "WITH polls AS (
             SELECT id FROM report_requests
              WHERE $4 AND state = 'generating' AND next_poll_at <= now()
                AND (lease_expires_at IS NULL OR lease_expires_at < now())
              ORDER BY next_poll_at, id
              LIMIT $3 FOR UPDATE SKIP LOCKED),
         creates AS (
             SELECT id FROM report_requests
              WHERE $5 AND state = 'queued' AND run_after <= now()
                AND (lease_expires_at IS NULL OR lease_expires_at < now())
              ORDER BY priority, run_after, id
              LIMIT greatest(0, $3 - (SELECT count(*) FROM polls)) FOR UPDATE SKIP LOCKED),
         due AS (SELECT id FROM polls UNION ALL SELECT id FROM creates)
         UPDATE report_requests r
            SET lease_owner = $1,
                lease_expires_at = now() + $2 * interval '1 second',
                lease_token = r.lease_token + 1
           FROM due
          WHERE r.id = due.id
         RETURNING r.id, r.lease_token, r.state, r.company_name, r.credit_code, r.org_number,
                   r.report_type, r.attempts, r.max_attempts, r.upstream_job_id,
                   r.upstream_created_at, r.polls, r.transient_errors, r.transient_since,
                   r.created_at, now() AS db_now",
    )
    .bind(owner)
    .bind(secs(lease))
    .bind(limit)
    .bind(kinds.polls)
    .bind(kinds.creates)
    .fetch_all(pool)
    .await
}

/// When the next generating row's poll falls due, for an idle worker's nap.
pub async fn next_poll_due_in(pool: &PgPool) -> Result<Option<Duration>, sqlx::Error> {
    let secs: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM (min(next_poll_at) - now()))::float8
           FROM report_requests WHERE state = 'generating'",
    )
    .fetch_one(pool)
    .await?;
    Ok(secs.map(|s| Duration::from_secs_f64(s.max(0.0))))
}

/// Extends the leases this worker still holds.
pub async fn heartbeat(
    pool: &PgPool,
    owner: &str,
    held: &[(i64, i64)],
    lease: Duration,
) -> Result<u64, sqlx::Error> {
    let (ids, tokens): (Vec<i64>, Vec<i64>) = held.iter().copied().unzip();
    let r = sqlx::query(
        "UPDATE report_requests r SET lease_expires_at = now() + $4 * interval '1 second'
           FROM unnest($2::bigint[], $3::bigint[]) AS h (id, token)
          WHERE r.id = h.id AND r.lease_token = h.token AND r.lease_owner = $1",
    )
    .bind(owner)
    .bind(ids)
    .bind(tokens)
    .bind(secs(lease))
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

/// Gives rows back at once (shutdown): another worker may claim them immediately.
pub async fn release(pool: &PgPool, held: &[(i64, i64)]) -> Result<u64, sqlx::Error> {
    let (ids, tokens): (Vec<i64>, Vec<i64>) = held.iter().copied().unzip();
    let r = sqlx::query(
        "UPDATE report_requests r SET lease_owner = NULL, lease_expires_at = NULL
           FROM unnest($1::bigint[], $2::bigint[]) AS h (id, token)
          WHERE r.id = h.id AND r.lease_token = h.token",
    )
    .bind(ids)
    .bind(tokens)
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

// A note on `r.state || '' = …` in the batch statements below: written plainly, the
// state test lets the planner answer the join on `id` from the small partial claim
// index (whose leading column is not `id`), scanning all of it once per row whenever
// its statistics are stale — as they always are in a busy queue. The expression keeps
// the lookup on the primary key.

/// The upstream task exists: commit its job id, creation time and the spent attempt
/// before anything else happens. Returns false when the claim was lost.
pub async fn mark_generating(
    pool: &PgPool,
    id: i64,
    token: i64,
    job_id: &str,
    first_poll_in: Duration,
) -> Result<bool, sqlx::Error> {
    let item = Created {
        id,
        token,
        job_id: job_id.to_string(),
        first_poll_in,
    };
    Ok(mark_generating_batch(pool, std::slice::from_ref(&item)).await? == vec![id])
}

/// One row whose upstream task was just created.
#[derive(Debug, Clone)]
pub struct Created {
    pub id: i64,
    pub token: i64,
    pub job_id: String,
    pub first_poll_in: Duration,
}

/// `mark_generating` for many rows in one statement; returns the ids still held.
pub async fn mark_generating_batch(
    pool: &PgPool,
    items: &[Created],
) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE report_requests r
            SET state = 'generating', upstream_job_id = b.job, upstream_created_at = now(),
                attempts = r.attempts + 1, polls = 0,
                next_poll_at = now() + b.delay * interval '1 second',
                transient_errors = 0, transient_since = NULL,
                lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
           FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::float8[]) AS b (id, token, job, delay)
          WHERE r.id = b.id AND r.lease_token = b.token AND r.state || '' = 'queued'
         RETURNING r.id",
    )
    .bind(items.iter().map(|i| i.id).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.token).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.job_id.as_str()).collect::<Vec<_>>())
    .bind(items.iter().map(|i| secs(i.first_poll_in)).collect::<Vec<_>>())
    .fetch_all(pool)
    .await
}

/// One generating row that is not ready yet: a snooze until its next poll, not an attempt.
#[derive(Debug, Clone)]
pub struct Snoozed {
    pub id: i64,
    pub token: i64,
    pub next_poll_at: DateTime<Utc>,
}

/// `snooze_poll` for many rows in one statement; returns the ids still held.
pub async fn snooze_batch(pool: &PgPool, items: &[Snoozed]) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE report_requests r
            SET next_poll_at = b.next_poll_at, polls = r.polls + 1, transient_errors = 0, transient_since = NULL,
                lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
           FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[]) AS b (id, token, next_poll_at)
          WHERE r.id = b.id AND r.lease_token = b.token AND r.state || '' = 'generating'
         RETURNING r.id",
    )
    .bind(items.iter().map(|i| i.id).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.token).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.next_poll_at).collect::<Vec<_>>())
    .fetch_all(pool)
    .await
}

/// One row whose document was downloaded and verified.
#[derive(Debug, Clone)]
pub struct Completed {
    pub id: i64,
    pub token: i64,
    pub document: Document,
}

/// `complete` for many rows in one statement (so one transaction): a row whose claim
/// was lost is neither marked nor given a document. Returns the ids stored.
pub async fn complete_batch(pool: &PgPool, items: &[Completed]) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "WITH done AS (
             UPDATE report_requests r
                SET state = 'succeeded', finished_at = now(), updated_at = now(), next_poll_at = NULL,
                    polls = r.polls + 1, transient_errors = 0, transient_since = NULL,
                    lease_owner = NULL, lease_expires_at = NULL
               FROM unnest($1::bigint[], $2::bigint[]) AS b (id, token)
              WHERE r.id = b.id AND r.lease_token = b.token AND r.state || '' = 'generating'
             RETURNING r.id)
         INSERT INTO report_documents (request_id, content, content_type, file_name, byte_size, sha256)
         SELECT d.id, d.content, d.content_type, d.file_name, octet_length(d.content), d.sha256
           FROM unnest($1::bigint[], $3::bytea[], $4::text[], $5::text[], $6::text[])
                AS d (id, content, content_type, file_name, sha256)
           JOIN done ON done.id = d.id
         RETURNING request_id",
    )
    .bind(items.iter().map(|i| i.id).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.token).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.document.content.as_slice()).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.document.content_type).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.document.file_name.as_str()).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.document.sha256.as_str()).collect::<Vec<_>>())
    .fetch_all(pool)
    .await
}

/// Fails the row for good, with the reason.
pub async fn fail(
    pool: &PgPool,
    id: i64,
    token: i64,
    code: Option<i32>,
    message: &str,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE report_requests
            SET state = 'failed', finished_at = now(), updated_at = now(), next_poll_at = NULL,
                last_error_code = $3, last_error = $4, last_error_at = now(),
                lease_owner = NULL, lease_expires_at = NULL
          WHERE id = $1 AND lease_token = $2 AND state IN ('queued', 'generating')",
    )
    .bind(id)
    .bind(token)
    .bind(code)
    .bind(message)
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// The upstream task failed or ran out of time: back to the queue for a new task.
pub async fn requeue_for_new_task(
    pool: &PgPool,
    id: i64,
    token: i64,
    code: Option<i32>,
    message: &str,
    delay: Duration,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE report_requests
            SET state = 'queued', run_after = now() + $5 * interval '1 second',
                upstream_job_id = NULL, upstream_created_at = NULL, next_poll_at = NULL, polls = 0,
                transient_errors = 0, transient_since = NULL,
                last_error_code = $3, last_error = $4, last_error_at = now(),
                lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
          WHERE id = $1 AND lease_token = $2 AND state = 'generating'",
    )
    .bind(id)
    .bind(token)
    .bind(code)
    .bind(message)
    .bind(secs(delay))
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// How a row goes back after trouble that is not its fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Transient trouble: counts toward the row's retry budget and is recorded.
    Transient,
    /// An account stop: recorded on the row, but no budget is spent.
    Stopped,
    /// Rate limited: nothing recorded, nothing spent.
    Quiet,
}

/// Puts a row back for a later try of the same step (create or poll) after `delay`.
pub async fn retry_later(
    pool: &PgPool,
    id: i64,
    token: i64,
    kind: Retry,
    code: Option<i32>,
    message: &str,
    delay: Duration,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE report_requests
            SET run_after = CASE WHEN state = 'queued' THEN now() + $7 * interval '1 second' ELSE run_after END,
                next_poll_at = CASE WHEN state = 'generating' THEN now() + $7 * interval '1 second' ELSE next_poll_at END,
                transient_errors = transient_errors + CASE WHEN $3 THEN 1 ELSE 0 END,
                transient_since = CASE WHEN $3 THEN coalesce(transient_since, now()) ELSE transient_since END,
                last_error_code = CASE WHEN $4 THEN $5 ELSE last_error_code END,
                last_error = CASE WHEN $4 THEN $6 ELSE last_error END,
                last_error_at = CASE WHEN $4 THEN now() ELSE last_error_at END,
                lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
          WHERE id = $1 AND lease_token = $2 AND state IN ('queued', 'generating')",
    )
    .bind(id)
    .bind(token)
    .bind(kind == Retry::Transient)
    .bind(kind != Retry::Quiet)
    .bind(code)
    .bind(message)
    .bind(secs(delay))
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

// ---------------------------------------------------------------------------------
// Account-wide state shared by every process: the stop and the call pacing.
// ---------------------------------------------------------------------------------

pub async fn read_stop(
    pool: &PgPool,
    account: &str,
) -> Result<Option<(AccountStop, bool)>, sqlx::Error> {
    let row: Option<(AccountStop, bool)> = sqlx::query(
        "SELECT account, scope, reason, error_code, since, until, probe_at, probes, probe_at <= now() AS probe_due
           FROM report_account_stops WHERE account = $1",
    )
    .bind(account)
    .fetch_optional(pool)
    .await?
    .map(|row| -> Result<_, sqlx::Error> {
        use sqlx::FromRow;
        Ok((AccountStop::from_row(&row)?, row.try_get("probe_due")?))
    })
    .transpose()?;
    Ok(row)
}

/// Records (or updates) the account's stop. A stop whose end is known (67200007) is
/// next probed at that end; otherwise the first probe comes `first_probe_in` after it
/// began.
pub async fn record_stop(
    pool: &PgPool,
    account: &str,
    scope: &str,
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
