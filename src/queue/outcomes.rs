//! A claimed row's outcomes. Every write after an upstream call is fenced by the
//! `lease_token` the row was claimed with: a worker whose lease expired (or whose row
//! was cancelled) changes nothing.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

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
    pool: &PgPool,
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

/// One row whose upstream task was just created.
#[derive(Debug, Clone)]
pub struct Created {
    pub id: i64,
    pub token: i64,
    pub job_id: JobId,
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
                create_started_at = NULL, create_deadline = NULL, polls = 0, bad_downloads = 0,
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
    /// The answer said the task is still queued, with this many jobs ahead (0 when it
    /// did not say): kept for learned polling's queue floors.
    pub queued: Option<i32>,
}

/// `snooze_poll` for many rows in one statement; returns the ids still held.
pub async fn snooze_batch(pool: &PgPool, items: &[Snoozed]) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE report_requests r
            SET next_poll_at = b.next_poll_at, polls = r.polls + 1, transient_errors = 0, transient_since = NULL,
                lease_owner = NULL, lease_expires_at = NULL, updated_at = now(), last_polled_at = now(),
                last_waiting_at = CASE WHEN b.queued IS NULL THEN r.last_waiting_at ELSE now() END,
                last_queue_num = coalesce(b.queued, r.last_queue_num)
           FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[], $4::int[]) AS b (id, token, next_poll_at, queued)
          WHERE r.id = b.id AND r.lease_token = b.token AND r.state || '' = 'generating'
         RETURNING r.id",
    )
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

/// One row whose document was downloaded and verified.
#[derive(Debug, Clone)]
pub struct Completed {
    pub id: i64,
    pub token: i64,
    pub document: Document,
    /// Record the task's observed generation time (learned polling is on).
    pub observe: bool,
}

/// `complete` for many rows in one statement (so one transaction): a row whose claim
/// was lost is neither marked nor given a document. The document's bytes go in
/// `content`, or its object key in `object_key` (the object already written). Returns
/// the ids stored.
pub async fn complete_batch(pool: &PgPool, items: &[Completed]) -> Result<Vec<i64>, sqlx::Error> {
    // With learned polling on, each completion also records its observed generation
    // time (from the row as it was); otherwise the statement is the plain one.
    let (before, observed) = observation_ctes(items.iter().any(|i| i.observe), "id = ANY($1)");
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "WITH {before}
         done AS (
             UPDATE report_requests r
                SET {SUCCEEDED}
               FROM unnest($1::bigint[], $2::bigint[]) AS b (id, token)
              WHERE r.id = b.id AND r.lease_token = b.token AND r.state || '' = 'generating'
             RETURNING r.id){observed}
         INSERT INTO report_documents (request_id, content, object_key, content_type, file_name, byte_size, sha256)
         SELECT d.id, d.content, d.object_key, d.content_type, d.file_name, d.byte_size, d.sha256
           FROM unnest($1::bigint[], $3::bytea[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::text[])
                AS d (id, content, object_key, content_type, file_name, byte_size, sha256)
           JOIN done ON done.id = d.id
         RETURNING request_id"
    )))
    .bind(items.iter().map(|i| i.id).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.token).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.document.content()).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.document.object_key()).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.document.content_type).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.document.file_name.as_str()).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.document.byte_size as i64).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.document.sha256.as_str()).collect::<Vec<_>>())
    .fetch_all(pool)
    .await
}

/// What a document row says, besides its bytes.
#[derive(Debug, Clone)]
pub struct DocumentMeta {
    pub content_type: &'static str,
    pub file_name: String,
    pub sha256: String,
    pub byte_size: u64,
}

/// `complete` for one large document whose bytes are streamed from `body` with binary
/// COPY, a chunk at a time: never whole in memory. In one transaction: the row's fenced
/// change to `succeeded`, then the document row (no row if the claim was lost).
pub async fn complete_streamed(
    pool: &PgPool,
    id: i64,
    token: i64,
    meta: &DocumentMeta,
    observe: bool,
    mut body: impl std::io::Read,
) -> Result<Fenced, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let (before, observed) = observation_ctes(observe, "id = $1");
    let done: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "WITH {before}
         done AS (
             UPDATE report_requests r
                SET {SUCCEEDED}
              WHERE r.id = $1 AND r.lease_token = $2 AND r.state = 'generating'
             RETURNING r.id){observed}
         SELECT id FROM done"
    )))
    .bind(id)
    .bind(token)
    .fetch_all(&mut *tx)
    .await?;
    if done.len() != 1 {
        tx.rollback().await?;
        return Ok(Fenced::Lost);
    }
    let len = i32::try_from(meta.byte_size)
        .map_err(|_| sqlx::Error::Protocol("document larger than 2 GiB".into()))?;
    // PostgreSQL's binary COPY format: a header, one tuple of six fields (each a length
    // and its bytes, network order), a trailer.
    let mut head = Vec::with_capacity(64);
    head.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    head.extend_from_slice(&0i32.to_be_bytes()); // flags
    head.extend_from_slice(&0i32.to_be_bytes()); // header extension
    head.extend_from_slice(&6i16.to_be_bytes()); // fields in the tuple
    head.extend_from_slice(&8i32.to_be_bytes());
    head.extend_from_slice(&id.to_be_bytes());
    head.extend_from_slice(&len.to_be_bytes());
    let mut copy = tx
        .copy_in_raw(
            "COPY report_documents (request_id, content, content_type, file_name, byte_size, sha256)
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
    tail.extend_from_slice(&(-1i16).to_be_bytes()); // trailer
    copy.send(tail).await?;
    copy.finish().await?;
    tx.commit().await?;
    Ok(Fenced::Written)
}

/// Fails the row for good, with the reason.
pub async fn fail(
    pool: &PgPool,
    id: i64,
    token: i64,
    code: Option<i32>,
    message: &str,
    intent: Intent,
) -> Result<Fenced, sqlx::Error> {
    let r = sqlx::query(concat!(
        "UPDATE report_requests
            SET state = 'failed', finished_at = now(), updated_at = now(), next_poll_at = NULL,
                last_error_code = $3, last_error = $4, last_error_at = now(),
                lease_owner = NULL, lease_expires_at = NULL, ",
        intent_sets!("$5", "$6", "$7"),
        " WHERE id = $1 AND lease_token = $2 AND state IN ('queued', 'generating')"
    ))
    .bind(id)
    .bind(token)
    .bind(code)
    .bind(message)
    .bind(intent == Intent::Refund)
    .bind(intent == Intent::Unanswered)
    .bind(intent == Intent::Keep)
    .execute(pool)
    .await?;
    Ok(Fenced::from_rows(r.rows_affected()))
}

/// The upstream task failed or ran out of time: back to the queue for a new task.
pub async fn requeue_for_new_task(
    pool: &PgPool,
    id: i64,
    token: i64,
    code: Option<i32>,
    message: &str,
    delay: Duration,
) -> Result<Fenced, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE report_requests
            SET state = 'queued', run_after = now() + $5 * interval '1 second',
                upstream_job_id = NULL, upstream_created_at = NULL, next_poll_at = NULL, polls = 0,
                transient_errors = 0, transient_since = NULL, bad_downloads = 0,
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
    Ok(Fenced::from_rows(r.rows_affected()))
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
}

/// Puts a row back for a later try of the same step (create or poll) after `delay`.
#[allow(clippy::too_many_arguments)]
pub async fn retry_later(
    pool: &PgPool,
    id: i64,
    token: i64,
    kind: Retry,
    code: Option<i32>,
    message: &str,
    delay: Duration,
    intent: Intent,
) -> Result<Fenced, sqlx::Error> {
    let r = sqlx::query(concat!(
        "UPDATE report_requests
            SET run_after = CASE WHEN state = 'queued' THEN now() + $7 * interval '1 second' ELSE run_after END,
                next_poll_at = CASE WHEN state = 'generating' THEN now() + $7 * interval '1 second' ELSE next_poll_at END,
                transient_errors = transient_errors + CASE WHEN $3 THEN 1 ELSE 0 END,
                bad_downloads = bad_downloads + CASE WHEN $11 THEN 1 ELSE 0 END,
                transient_since = CASE WHEN $3 THEN coalesce(transient_since, now()) ELSE transient_since END,
                last_error_code = CASE WHEN $4 THEN $5 ELSE last_error_code END,
                last_error = CASE WHEN $4 THEN $6 ELSE last_error END,
                last_error_at = CASE WHEN $4 THEN now() ELSE last_error_at END,
                lease_owner = NULL, lease_expires_at = NULL, updated_at = now(), ",
        intent_sets!("$8", "$9", "$10"),
        " WHERE id = $1 AND lease_token = $2 AND state IN ('queued', 'generating')"
    ))
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
    .execute(pool)
    .await?;
    Ok(Fenced::from_rows(r.rows_affected()))
}
