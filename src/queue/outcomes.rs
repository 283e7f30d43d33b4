//! A claimed row's outcomes. Every write after an upstream call is fenced by the
//! `lease_token` the row was claimed with: a worker whose lease expired (or whose row
//! was cancelled) changes nothing.

use super::NO_FLUSH_WAIT;
use super::sql;
use std::time::Duration;

use super::Db;
use chrono::{DateTime, Utc};

use super::learning::OBSERVATION_SQL;

use super::{Fenced, secs};
use crate::domain::{Document, JobId};

// A note on `r.state || '' = …` in the batch statements below: written plainly, the
// state test lets the planner answer the join on `id` from the small partial claim
// index (whose leading column is not `id`), scanning all of it once per row whenever
// its statistics are stale — as they always are in a busy queue. The expression keeps
// the lookup on the primary key.

/// The upstream task exists: commit its job id and creation time (its attempt was
/// counted by the create intent) before anything else happens.
pub async fn mark_generating(
    pool: &Db,
    id: i64,
    token: i64,
    job_id: &JobId,
    first_poll_in: Duration,
) -> Result<Fenced, sqlx::Error> {
    let item = Created {
        id,
        token,
        job_id: job_id.clone(),
        first_poll_in,
    };
    let written = mark_generating_batch(pool, std::slice::from_ref(&item)).await?;
    Ok(Fenced::from_rows(written.len() as u64))
}

/// What an outcome write does to the row's create intent (see `creates`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// This claim sent no create (a poll, or the row waits for another's): leave it.
    Keep,
    /// The create was certainly not made (not sent, or refused explicitly): its attempt
    /// is given back, the intent cleared.
    Refund,
    /// The create got no usable answer: its attempt stays spent and is counted as
    /// unanswered, the intent cleared.
    Unanswered,
}

/// The SET clauses for an `Intent` bound as `$refund, $unanswered, $keep`.
macro_rules! intent_sets {
    ($refund:literal, $unanswered:literal, $keep:literal) => {
        concat!(
            "attempts = attempts - CASE WHEN ",
            $refund,
            " AND create_started_at IS NOT NULL THEN 1 ELSE 0 END, ",
            "creates_sent = creates_sent - CASE WHEN ",
            $refund,
            " AND create_started_at IS NOT NULL AND creates_sent > 0 THEN 1 ELSE 0 END, ",
            "unanswered_creates = unanswered_creates + CASE WHEN ",
            $unanswered,
            " AND create_started_at IS NOT NULL THEN 1 ELSE 0 END, ",
            "create_started_at = CASE WHEN ",
            $keep,
            " THEN create_started_at END, ",
            "create_deadline = CASE WHEN ",
            $keep,
            " THEN create_deadline END"
        )
    };
}

/// What a statement that refunds creates returns for the ledger: the refunded intent's
/// time (`began`, read as the row was before the statement) and account, for the rows in
/// `done` whose create was given back (`refunded`).
const COUNT_REFUNDS: &str = "refunds AS (
    INSERT INTO report_create_counts AS c (day, account, slot, refunded)
    SELECT (began AT TIME ZONE 'Asia/Shanghai')::date, coalesce(account, ''),
           (pg_backend_pid() % 16)::smallint, count(*)
      FROM done WHERE refunded GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (day, account, slot) DO UPDATE SET refunded = c.refunded + excluded.refunded
    RETURNING 1)";

/// The create intent a row had before the statement that returns this (a subquery in
/// RETURNING sees the row as the statement found it).
const BEGAN: &str = "(SELECT o.create_started_at FROM report_requests o WHERE o.id = r.id)";

/// One row whose upstream task was just created.
#[derive(Debug, Clone)]
pub struct Created {
    pub id: i64,
    pub token: i64,
    pub job_id: JobId,
    pub first_poll_in: Duration,
}

/// `mark_generating` for many rows in one statement; returns the ids still held. Each
/// job id written counts as a paid task in `report_create_counts`, on the day its create
/// was sent.
pub async fn mark_generating_batch(pool: &Db, items: &[Created]) -> Result<Vec<i64>, sqlx::Error> {
    sql::query_scalar(sqlx::AssertSqlSafe(format!(
        "WITH done AS (
             UPDATE report_requests r
                SET state = 'generating', upstream_job_id = b.job, upstream_created_at = now(),
                    create_started_at = NULL, create_deadline = NULL, polls = 0, bad_downloads = 0,
                    next_poll_at = now() + b.delay * interval '1 second', coalescing_since = NULL,
                    transient_errors = 0, transient_since = NULL,
                    lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
               FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::float8[]) AS b (id, token, job, delay)
              WHERE r.id = b.id AND r.lease_token = b.token AND r.state || '' = 'queued'
             RETURNING r.id, r.account, {BEGAN} AS began),
         counted AS (
             INSERT INTO report_create_counts AS c (day, account, slot, tasks)
             SELECT (coalesce(began, now()) AT TIME ZONE 'Asia/Shanghai')::date, coalesce(account, ''),
                    (pg_backend_pid() % 16)::smallint, count(*)
               FROM done GROUP BY 1, 2 ORDER BY 1, 2
             ON CONFLICT (day, account, slot) DO UPDATE SET tasks = c.tasks + excluded.tasks
             RETURNING 1)
         SELECT id FROM done"
    )))
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
    /// The answer said the task is still queued, with this many jobs ahead (0 when it
    /// did not say): kept for learned polling's queue floors.
    pub queued: Option<i32>,
}

/// `snooze_poll` for many rows in one statement; returns the ids still held. The next
/// poll time is a write whose loss in a crash costs one early poll: see `NO_FLUSH_WAIT`.
pub async fn snooze_batch(pool: &Db, items: &[Snoozed]) -> Result<Vec<i64>, sqlx::Error> {
    sql::query_scalar(sqlx::AssertSqlSafe(format!(
        "WITH {NO_FLUSH_WAIT}
         UPDATE report_requests r
            SET next_poll_at = b.next_poll_at, polls = r.polls + 1, transient_errors = 0, transient_since = NULL,
                lease_owner = NULL, lease_expires_at = NULL, updated_at = now(), last_polled_at = now(),
                last_waiting_at = CASE WHEN b.queued IS NULL THEN r.last_waiting_at ELSE now() END,
                last_queue_num = coalesce(b.queued, r.last_queue_num)
           FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[], $4::int[]) AS b (id, token, next_poll_at, queued),
                no_flush_wait
          WHERE r.id = b.id AND r.lease_token = b.token AND r.state || '' = 'generating'
         RETURNING r.id",
    )))
    .bind(items.iter().map(|i| i.id).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.token).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.next_poll_at).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.queued).collect::<Vec<_>>())
    .fetch_all(pool)
    .await
}

/// The CTEs a completion statement carries when it records the task's observed
/// generation time: the rows as they were (`which` selects them), placed before `done`,
/// and the observation, placed after it. Empty when not observing.
fn observation_ctes(observe: bool, which: &str) -> (String, String) {
    if !observe {
        return (String::new(), String::new());
    }
    (
        format!(
            "before AS (
                 SELECT id, report_type, upstream_created_at, last_polled_at, next_poll_at,
                        last_waiting_at, last_queue_num
                   FROM report_requests WHERE {which}),"
        ),
        format!(", observed AS ({OBSERVATION_SQL} RETURNING 1)"),
    )
}

/// What a completion sets on a generating row (the poll that found the report ready
/// counts), for both completion statements.
const SUCCEEDED: &str =
    "state = 'succeeded', finished_at = now(), updated_at = now(), next_poll_at = NULL,
                    polls = r.polls + 1, transient_errors = 0, transient_since = NULL,
                    lease_owner = NULL, lease_expires_at = NULL";

/// One row whose document was downloaded and verified: the document of task `job_id`.
#[derive(Debug, Clone)]
pub struct Completed {
    pub id: i64,
    pub token: i64,
    pub job_id: JobId,
    pub document: Document,
    /// Record the task's observed generation time (learned polling is on).
    pub observe: bool,
}

/// What became of a downloaded document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Stored, and the row is `succeeded`.
    Finished,
    /// The row was cancelled while its task was being polled or downloaded: the document
    /// is stored for it all the same (it was paid for), the row stays cancelled, and a
    /// `report_retry` of it is served from this document.
    KeptForCancelled,
    /// The row is no longer ours (and not cancelled with this task): nothing stored.
    Lost,
}

/// Rows of `$1` (ids) cancelled while their task `$2` (job ids) was being polled: their
/// documents are kept.
/// Locked, so that a `report_retry` running meanwhile either sees the kept document (and
/// serves the row from it) or has already moved the row on (and nothing is kept).
const CANCELLED_WITH_TASK: &str = "kept AS (
    SELECT r.id FROM report_requests r
      JOIN unnest($1::bigint[], $9::text[]) AS k (id, job) ON r.id = k.id
     WHERE r.state || '' = 'cancelled' AND r.upstream_job_id = k.job
       FOR UPDATE OF r)";

/// `complete` for many rows in one statement (so one transaction): a row whose claim
/// was lost is neither marked nor given a document — unless it was cancelled while its
/// task was polled, then the document is kept for it (see `Stored`). The document's
/// bytes go in `content`, or its object key in `object_key` (the object already
/// written). Returns the ids stored, each with whether its row finished.
pub async fn complete_batch(
    pool: &Db,
    items: &[Completed],
) -> Result<Vec<(i64, Stored)>, sqlx::Error> {
    // With learned polling on, each completion also records its observed generation
    // time (from the row as it was); otherwise the statement is the plain one.
    let (before, observed) = observation_ctes(items.iter().any(|i| i.observe), "id = ANY($1)");
    let rows: Vec<(i64, bool)> = sql::query_as(sqlx::AssertSqlSafe(format!(
        "WITH {before}
         done AS (
             UPDATE report_requests r
                SET {SUCCEEDED}
               FROM unnest($1::bigint[], $2::bigint[], $9::text[]) AS b (id, token, job)
              WHERE r.id = b.id AND r.lease_token = b.token AND r.state || '' = 'generating'
                -- The row's own task: a document is never stored for another (compared
                -- as numbers: a job id written by hand may carry leading zeros).
                AND r.upstream_job_id::numeric = b.job::numeric
             RETURNING r.id){observed},
         {CANCELLED_WITH_TASK},
         stored AS (
             INSERT INTO report_documents (request_id, content, object_key, content_type, file_name, byte_size, sha256, provider_company)
             SELECT d.id, d.content, d.object_key, d.content_type, d.file_name, d.byte_size, d.sha256, d.company
               FROM unnest($1::bigint[], $3::bytea[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::text[], $10::text[])
                    AS d (id, content, object_key, content_type, file_name, byte_size, sha256, company)
              WHERE d.id IN (SELECT id FROM done UNION ALL SELECT id FROM kept)
             ON CONFLICT (request_id) DO NOTHING
             RETURNING request_id)
         SELECT s.request_id, s.request_id IN (SELECT id FROM done) FROM stored s"
    )))
    .bind(items.iter().map(|i| i.id).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.token).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.document.content()).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.document.object_key()).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.document.content_type).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.document.file_name.as_str()).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.document.byte_size as i64).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.document.sha256.as_str()).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.job_id.as_str()).collect::<Vec<_>>())
    .bind(
        items
            .iter()
            .map(|i| i.document.provider_company.as_deref())
            .collect::<Vec<_>>(),
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, finished)| {
            let stored = if finished {
                Stored::Finished
            } else {
                Stored::KeptForCancelled
            };
            (id, stored)
        })
        .collect())
}

/// What a document row says, besides its bytes.
#[derive(Debug, Clone)]
pub struct DocumentMeta {
    pub content_type: &'static str,
    pub file_name: String,
    pub sha256: String,
    pub byte_size: u64,
    /// The company the provider's own file name names (see `Document`).
    pub provider_company: Option<String>,
}

/// `complete` for one large document of task `job` whose bytes are streamed from `body`
/// with binary COPY, a chunk at a time: never whole in memory. In one transaction: the
/// row's fenced change to `succeeded` (or, for a row cancelled while its task was
/// polled, nothing: see `Stored`), then the document row.
pub async fn complete_streamed(
    pool: &Db,
    id: i64,
    token: i64,
    job: &JobId,
    meta: &DocumentMeta,
    observe: bool,
    mut body: impl std::io::Read,
) -> Result<Stored, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let (before, observed) = observation_ctes(observe, "id = $1");
    let done: Vec<i64> = sql::query_scalar(sqlx::AssertSqlSafe(format!(
        "WITH {before}
         done AS (
             UPDATE report_requests r
                SET {SUCCEEDED}
              WHERE r.id = $1 AND r.lease_token = $2 AND r.state = 'generating'
                AND r.upstream_job_id::numeric = $3::numeric
             RETURNING r.id){observed}
         SELECT id FROM done"
    )))
    .bind(id)
    .bind(token)
    .bind(job)
    .fetch_all(&mut *tx)
    .await?;
    let stored = if done.len() == 1 {
        Stored::Finished
    } else {
        let cancelled: Option<i64> = sql::query_scalar(
            "SELECT r.id FROM report_requests r
              WHERE r.id = $1 AND r.state = 'cancelled' AND r.upstream_job_id = $2
                AND NOT EXISTS (SELECT 1 FROM report_documents d WHERE d.request_id = r.id)
                FOR UPDATE",
        )
        .bind(id)
        .bind(job)
        .fetch_optional(&mut *tx)
        .await?;
        if cancelled.is_none() {
            tx.rollback().await?;
            return Ok(Stored::Lost);
        }
        Stored::KeptForCancelled
    };
    let len = i32::try_from(meta.byte_size)
        .map_err(|_| sqlx::Error::Protocol("document larger than 2 GiB".into()))?;
    // PostgreSQL's binary COPY format: a header, one tuple of seven fields (each a length
    // and its bytes, network order), a trailer.
    let mut head = Vec::with_capacity(64);
    head.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    head.extend_from_slice(&0i32.to_be_bytes()); // flags
    head.extend_from_slice(&0i32.to_be_bytes()); // header extension
    head.extend_from_slice(&7i16.to_be_bytes()); // fields in the tuple
    head.extend_from_slice(&8i32.to_be_bytes());
    head.extend_from_slice(&id.to_be_bytes());
    head.extend_from_slice(&len.to_be_bytes());
    let mut copy = tx
        .copy_in_raw(
            "COPY report_documents (request_id, content, content_type, file_name, byte_size, sha256, provider_company)
               FROM STDIN WITH (FORMAT binary)",
        )
        .await?;
    copy.send(head).await?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut sent = 0u64;
    loop {
        let n = body.read(&mut chunk).map_err(sqlx::Error::Io)?;
        if n == 0 {
            break;
        }
        sent += n as u64;
        copy.send(&chunk[..n]).await?;
    }
    if sent != meta.byte_size {
        copy.abort("the document's length changed while it was sent")
            .await?;
        return Err(sqlx::Error::Protocol(format!(
            "sent {sent} bytes of a {}-byte document",
            meta.byte_size
        )));
    }
    let mut tail = Vec::with_capacity(256);
    for text in [meta.content_type, meta.file_name.as_str()] {
        tail.extend_from_slice(&(text.len() as i32).to_be_bytes());
        tail.extend_from_slice(text.as_bytes());
    }
    tail.extend_from_slice(&8i32.to_be_bytes());
    tail.extend_from_slice(&(meta.byte_size as i64).to_be_bytes());
    tail.extend_from_slice(&(meta.sha256.len() as i32).to_be_bytes());
    tail.extend_from_slice(meta.sha256.as_bytes());
    match &meta.provider_company {
        Some(company) => {
            tail.extend_from_slice(&(company.len() as i32).to_be_bytes());
            tail.extend_from_slice(company.as_bytes());
        }
        None => tail.extend_from_slice(&(-1i32).to_be_bytes()),
    }
    tail.extend_from_slice(&(-1i16).to_be_bytes()); // trailer
    copy.send(tail).await?;
    copy.finish().await?;
    tx.commit().await?;
    Ok(stored)
}

/// Fails the row for good, with the reason. Its task, if it has one, stays on the row
/// (a `report_retry` polls it again before buying another).
pub async fn fail(
    pool: &Db,
    id: i64,
    token: i64,
    code: Option<i32>,
    message: &str,
    intent: Intent,
) -> Result<Fenced, sqlx::Error> {
    let n: i64 = sql::query_scalar(sqlx::AssertSqlSafe(format!(
        "WITH done AS (
             UPDATE report_requests r
                SET state = 'failed', finished_at = now(), updated_at = now(), next_poll_at = NULL,
                    last_error_code = $3, last_error = $4, last_error_at = now(),
                    lease_owner = NULL, lease_expires_at = NULL, {}
              WHERE id = $1 AND lease_token = $2 AND state IN ('queued', 'generating')
             RETURNING r.account, {BEGAN} AS began, $5 AND {BEGAN} IS NOT NULL AS refunded),
         {COUNT_REFUNDS}
         SELECT count(*) FROM done",
        intent_sets!("$5", "$6", "$7")
    )))
    .bind(id)
    .bind(token)
    .bind(code)
    .bind(message)
    .bind(intent == Intent::Refund)
    .bind(intent == Intent::Unanswered)
    .bind(intent == Intent::Keep)
    .fetch_one(pool)
    .await?;
    Ok(Fenced::from_rows(n as u64))
}

/// A generating row's task is over for it, and why (`lose_task`).
#[derive(Debug, Clone)]
pub struct LostTask<'a> {
    pub id: i64,
    pub token: i64,
    pub code: Option<i32>,
    pub message: &'a str,
    /// The provider may still finish it (it said "waiting" or "exporting" to the last,
    /// or nobody could ask it): kept in `report_orphan_tasks`, and, on a row that fails
    /// now, on the row too, for a `report_retry` to poll again. Otherwise (job_status 3,
    /// a task the provider does not know, downloads that are never the report) it is
    /// dropped.
    pub alive: bool,
    /// Attempts remain: back to the queue for a new task after `delay`; otherwise the
    /// row fails.
    pub new_task_after: Option<Duration>,
}

/// The row's current task is over for it: a new task later, or failed (see `LostTask`).
/// One statement, fenced by the claim.
pub async fn lose_task(pool: &Db, lost: &LostTask<'_>) -> Result<Fenced, sqlx::Error> {
    let n: i64 = sql::query_scalar(
        "WITH done AS (
             UPDATE report_requests r
                SET state = CASE WHEN $6 THEN 'queued' ELSE 'failed' END,
                    finished_at = CASE WHEN $6 THEN NULL ELSE now() END,
                    run_after = CASE WHEN $6 THEN now() + $7 * interval '1 second' ELSE run_after END,
                    upstream_job_id = CASE WHEN $6 OR NOT $5 THEN NULL ELSE upstream_job_id END,
                    upstream_created_at = CASE WHEN $6 OR NOT $5 THEN NULL ELSE upstream_created_at END,
                    next_poll_at = NULL, polls = 0, coalescing_since = NULL,
                    transient_errors = 0, transient_since = NULL, bad_downloads = 0,
                    last_error_code = $3, last_error = $4, last_error_at = now(),
                    lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
              WHERE id = $1 AND lease_token = $2 AND state = 'generating'
             RETURNING r.id, r.report_type,
                       (SELECT o.upstream_job_id FROM report_requests o WHERE o.id = r.id) AS job,
                       (SELECT o.upstream_created_at FROM report_requests o WHERE o.id = r.id) AS made,
                       (SELECT o.account FROM report_requests o WHERE o.id = r.id) AS account),
         kept AS (
             INSERT INTO report_orphan_tasks AS t (job_id, request_id, account, report_type, reason, created_at)
             SELECT job, id, coalesce(account, ''), report_type, $4, coalesce(made, now())
               FROM done WHERE $5 AND job IS NOT NULL
             ON CONFLICT (job_id) DO UPDATE SET adopted_at = NULL, reason = excluded.reason
             RETURNING 1)
         SELECT count(*) FROM done",
    )
    .bind(lost.id)
    .bind(lost.token)
    .bind(lost.code)
    .bind(lost.message)
    .bind(lost.alive)
    .bind(lost.new_task_after.is_some())
    .bind(secs(lost.new_task_after.unwrap_or_default()))
    .fetch_one(pool)
    .await?;
    Ok(Fenced::from_rows(n as u64))
}

/// How a row goes back for a later try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Transient trouble: counts toward the row's retry budget and is recorded.
    Transient,
    /// Recorded on the row, but no budget is spent: an account stop, or a create that
    /// got no answer (it spent an attempt instead).
    Noted,
    /// Rate limited: nothing recorded, nothing spent.
    Quiet,
    /// The task's download was unusable: recorded, counts toward the retry budget and
    /// toward the task's bad downloads.
    BadDownload,
    /// Waiting for another row's task (coalescing): recorded, and the wait's start kept
    /// (`coalescing_since`), which bounds it.
    Coalescing,
}

/// Puts a row back for a later try of the same step (create or poll) after `delay`.
#[allow(clippy::too_many_arguments)]
pub async fn retry_later(
    pool: &Db,
    id: i64,
    token: i64,
    kind: Retry,
    code: Option<i32>,
    message: &str,
    delay: Duration,
    intent: Intent,
) -> Result<Fenced, sqlx::Error> {
    let n: i64 = sql::query_scalar(sqlx::AssertSqlSafe(format!(
        "WITH done AS (
             UPDATE report_requests r
                SET run_after = CASE WHEN state = 'queued' THEN now() + $7 * interval '1 second' ELSE run_after END,
                    next_poll_at = CASE WHEN state = 'generating' THEN now() + $7 * interval '1 second' ELSE next_poll_at END,
                    transient_errors = transient_errors + CASE WHEN $3 THEN 1 ELSE 0 END,
                    bad_downloads = bad_downloads + CASE WHEN $11 THEN 1 ELSE 0 END,
                    transient_since = CASE WHEN $3 THEN coalesce(transient_since, now()) ELSE transient_since END,
                    coalescing_since = CASE WHEN $12 THEN coalesce(coalescing_since, now()) ELSE coalescing_since END,
                    last_error_code = CASE WHEN $4 THEN $5 ELSE last_error_code END,
                    last_error = CASE WHEN $4 THEN $6 ELSE last_error END,
                    last_error_at = CASE WHEN $4 THEN now() ELSE last_error_at END,
                    lease_owner = NULL, lease_expires_at = NULL, updated_at = now(), {}
              WHERE id = $1 AND lease_token = $2 AND state IN ('queued', 'generating')
             RETURNING r.account, {BEGAN} AS began, $8 AND {BEGAN} IS NOT NULL AS refunded),
         {COUNT_REFUNDS}
         SELECT count(*) FROM done",
        intent_sets!("$8", "$9", "$10")
    )))
    .bind(id)
    .bind(token)
    .bind(matches!(kind, Retry::Transient | Retry::BadDownload))
    .bind(kind != Retry::Quiet)
    .bind(code)
    .bind(message)
    .bind(secs(delay))
    .bind(intent == Intent::Refund)
    .bind(intent == Intent::Unanswered)
    .bind(intent == Intent::Keep)
    .bind(kind == Retry::BadDownload)
    .bind(kind == Retry::Coalescing)
    .fetch_one(pool)
    .await?;
    Ok(Fenced::from_rows(n as u64))
}
