//! What the dashboard reads: a filtered, keyset-paginated list of requests, one
//! request with its history and document, recent latencies, throughput per minute and
//! the batches. Every query is bounded (by an index, a LIMIT or a window of recent
//! events), so a page costs the same at ten million rows as at ten thousand.

use super::Db;
use super::sql;
use chrono::{DateTime, Utc};
use sqlx::{Postgres, QueryBuilder};

use crate::domain::{ReportType, RequestState};

/// What the request list shows; every field narrows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestFilter {
    pub state: Option<RequestState>,
    pub batch: Option<String>,
    /// A company name, credit code or organization code (exact), or a request id.
    pub identifier: Option<String>,
    pub created_from: Option<DateTime<Utc>>,
    pub created_to: Option<DateTime<Utc>>,
    pub error_code: Option<i32>,
}

/// Where a page starts: the newest rows, rows older than an id (next page), or rows
/// newer than an id (previous page).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Cursor {
    #[default]
    Newest,
    Before(i64),
    After(i64),
}

/// One line of the request list.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct RequestLine {
    pub id: i64,
    pub company_name: Option<String>,
    pub credit_code: Option<String>,
    pub org_number: Option<String>,
    pub report_type: ReportType,
    pub state: RequestState,
    pub attempts: i32,
    pub max_attempts: i32,
    pub batch: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_error_code: Option<i32>,
    pub last_error: Option<String>,
}

impl RequestLine {
    /// What the row asked for: the company name, else the credit code, else the org code.
    pub fn asked_for(&self) -> &str {
        [&self.company_name, &self.credit_code, &self.org_number]
            .into_iter()
            .flatten()
            .find(|s| !s.is_empty())
            .map(String::as_str)
            .unwrap_or("")
    }
}

/// A page of the list, newest first, and whether there are rows on either side.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestPage {
    pub rows: Vec<RequestLine>,
    pub has_newer: bool,
    pub has_older: bool,
}

const LINE_COLUMNS: &str = "id, company_name, credit_code, org_number, report_type, state, attempts, \
     max_attempts, batch, created_at, updated_at, last_error_code, left(last_error, 300) AS last_error";

/// A query over `report_requests` narrowed by `f`: `select` is what comes before the
/// WHERE clause. An identifier is looked up first, through its three indexes, into an array
/// of ids: left to itself, the planner would walk the primary key (newest first) and
/// filter, reading the whole table for a rare name.
fn filtered(select: &str, f: &RequestFilter) -> QueryBuilder<Postgres> {
    let mut q = QueryBuilder::new(select);
    q.push(" WHERE true");
    if let Some(ident) = &f.identifier {
        q.push(" AND id = ANY (ARRAY(SELECT id FROM report_requests WHERE ")
            .push_bind(ident.clone())
            .push("::text IN (company_name, credit_code, org_number)");
        if let Ok(id) = ident.parse::<i64>() {
            q.push(" OR id = ").push_bind(id);
        }
        q.push("))");
    }
    if let Some(state) = f.state {
        q.push(" AND state = ")
            .push_bind(state.as_str().to_string());
        if state != RequestState::Succeeded {
            // Lets the planner see that the partial (state, id) index applies.
            q.push(" AND state <> 'succeeded'");
        }
    }
    if let Some(batch) = &f.batch {
        q.push(" AND batch IS NOT NULL AND batch = ")
            .push_bind(batch.clone());
    }
    if let Some(from) = f.created_from {
        q.push(" AND created_at >= ").push_bind(from);
    }
    if let Some(to) = f.created_to {
        q.push(" AND created_at < ").push_bind(to);
    }
    if let Some(code) = f.error_code {
        q.push(" AND last_error_code = ").push_bind(code);
    }
    q
}

/// How many ids next to the cursor a time-filtered page looks at before it turns to the
/// BRIN index on `created_at`.
const TIME_WINDOW_IDS: i64 = 20_000;

/// Whether a page is narrowed by insert time only (no identifier, no batch, which are
/// selective on their own): see `TIME_WINDOW_IDS`.
fn by_time(filter: &RequestFilter) -> bool {
    (filter.created_from.is_some() || filter.created_to.is_some())
        && filter.identifier.is_none()
        && filter.batch.is_none()
}

/// Runs `q` with plain index scans off, so a time range is read through the BRIN index
/// (bitmap scans) instead of a walk down the primary key.
async fn through_brin<T>(
    pool: &Db,
    run: impl AsyncFnOnce(&mut sqlx::PgConnection) -> Result<T, sqlx::Error>,
) -> Result<T, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sql::query("SET LOCAL enable_indexscan = off")
        .execute(&mut *tx)
        .await?;
    let out = run(&mut tx).await?;
    tx.commit().await?;
    Ok(out)
}

/// One page of at most `limit` rows, newest (highest id) first. Keyset pagination: a
/// page is found through an index from its cursor, never by skipping rows.
pub async fn list_requests(
    pool: &Db,
    filter: &RequestFilter,
    cursor: Cursor,
    limit: i64,
) -> Result<RequestPage, sqlx::Error> {
    let ascending = matches!(cursor, Cursor::After(_));
    let page = |window: Option<(i64, i64)>| {
        let mut q = filtered(
            &format!("SELECT {LINE_COLUMNS} FROM report_requests"),
            filter,
        );
        match cursor {
            Cursor::Newest => {}
            Cursor::Before(id) => {
                q.push(" AND id < ").push_bind(id);
            }
            Cursor::After(id) => {
                q.push(" AND id > ").push_bind(id);
            }
        }
        if let Some((low, high)) = window {
            q.push(" AND id BETWEEN ")
                .push_bind(low)
                .push(" AND ")
                .push_bind(high);
        }
        q.push(if ascending {
            " ORDER BY id ASC LIMIT "
        } else {
            " ORDER BY id DESC LIMIT "
        })
        .push_bind(limit + 1);
        q
    };
    let mut rows: Vec<RequestLine> = if by_time(filter) {
        // The planner walks the primary key and filters on the time (it cannot know that
        // ids and insert times rise together): instant for recent times, a walk through
        // all newer history for old ones. So: the nearest ids first; if they do not fill
        // the page, the BRIN index on created_at (work in proportion to the range).
        let near = match cursor {
            Cursor::Newest => {
                let newest: Option<i64> = sql::query_scalar("SELECT max(id) FROM report_requests")
                    .fetch_one(pool)
                    .await?;
                let newest = newest.unwrap_or(0);
                (newest - TIME_WINDOW_IDS, newest)
            }
            Cursor::Before(id) => (id - TIME_WINDOW_IDS, id),
            Cursor::After(id) => (id, id.saturating_add(TIME_WINDOW_IDS)),
        };
        let rows: Vec<RequestLine> = page(Some(near)).build_query_as().fetch_all(pool).await?;
        if rows.len() as i64 > limit {
            rows
        } else {
            through_brin(pool, async |conn| {
                page(None).build_query_as().fetch_all(conn).await
            })
            .await?
        }
    } else {
        page(None).build_query_as().fetch_all(pool).await?
    };
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    if ascending {
        rows.reverse();
    }
    let (has_newer, has_older) = match cursor {
        Cursor::Newest => (false, more),
        Cursor::Before(_) => (
            match rows.first() {
                Some(first) => exists(pool, filter, Cursor::After(first.id)).await?,
                None => false,
            },
            more,
        ),
        Cursor::After(_) => (
            more,
            match rows.last() {
                Some(last) => exists(pool, filter, Cursor::Before(last.id)).await?,
                None => false,
            },
        ),
    };
    Ok(RequestPage {
        rows,
        has_newer,
        has_older,
    })
}

async fn exists(pool: &Db, filter: &RequestFilter, cursor: Cursor) -> Result<bool, sqlx::Error> {
    let query = |window: Option<(i64, i64)>| {
        let mut q = filtered("SELECT EXISTS (SELECT 1 FROM report_requests", filter);
        match cursor {
            Cursor::Before(id) => q.push(" AND id < ").push_bind(id),
            Cursor::After(id) => q.push(" AND id > ").push_bind(id),
            Cursor::Newest => &mut q,
        };
        if let Some((low, high)) = window {
            q.push(" AND id BETWEEN ")
                .push_bind(low)
                .push(" AND ")
                .push_bind(high);
        }
        q.push(")");
        q
    };
    if !by_time(filter) {
        return query(None).build_query_scalar().fetch_one(pool).await;
    }
    // As in `list_requests`: next to the cursor first, then through the BRIN index.
    let near = match cursor {
        Cursor::Before(id) => (id - TIME_WINDOW_IDS, id),
        Cursor::After(id) => (id, id.saturating_add(TIME_WINDOW_IDS)),
        Cursor::Newest => (i64::MIN, i64::MAX),
    };
    if query(Some(near))
        .build_query_scalar()
        .fetch_one(pool)
        .await?
    {
        return Ok(true);
    }
    through_brin(pool, async |conn| {
        query(None).build_query_scalar().fetch_one(conn).await
    })
    .await
}

/// One request with everything a person wants to see on its page.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct RequestDetail {
    pub id: i64,
    pub company_name: Option<String>,
    pub credit_code: Option<String>,
    pub org_number: Option<String>,
    pub report_type: ReportType,
    pub state: RequestState,
    pub priority: i16,
    pub attempts: i32,
    pub max_attempts: i32,
    pub polls: i32,
    pub unanswered_creates: i32,
    pub batch: Option<String>,
    pub dedupe_key: Option<String>,
    pub callback_url: Option<String>,
    pub metadata: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub run_after: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub upstream_job_id: Option<String>,
    pub upstream_created_at: Option<DateTime<Utc>>,
    pub next_poll_at: Option<DateTime<Utc>>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub last_error_code: Option<i32>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    /// The trace id of the row's OpenTelemetry trace, once a tracing worker claimed it.
    pub trace_id: Option<String>,
    // The document, when stored.
    pub file_name: Option<String>,
    pub content_type: Option<String>,
    pub byte_size: Option<i64>,
    pub sha256: Option<String>,
    pub object_key: Option<String>,
    pub stored_at: Option<DateTime<Utc>>,
    /// Tasks created for this row that it did not use (kept to be adopted).
    pub orphans: i64,
}

pub async fn request_detail(pool: &Db, id: i64) -> Result<Option<RequestDetail>, sqlx::Error> {
    sql::query_as(
        "SELECT r.id, r.company_name, r.credit_code, r.org_number, r.report_type, r.state, r.priority,
                r.attempts, r.max_attempts, r.polls, r.unanswered_creates, r.batch, r.dedupe_key,
                r.callback_url, r.metadata, r.created_at, r.updated_at, r.run_after, r.finished_at,
                r.upstream_job_id, r.upstream_created_at, r.next_poll_at, r.lease_owner,
                r.lease_expires_at, r.last_error_code, r.last_error, r.last_error_at,
                split_part(r.trace_context, '-', 2) AS trace_id,
                d.file_name, d.content_type, d.byte_size, d.sha256, d.object_key,
                d.created_at AS stored_at,
                (SELECT count(*) FROM report_orphan_tasks o WHERE o.request_id = r.id) AS orphans
           FROM report_requests r LEFT JOIN report_documents d ON d.request_id = r.id
          WHERE r.id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// One line of a row's history (`report_events`).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct EventLine {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub state: String,
    pub previous_state: Option<String>,
    pub attempts: i32,
    pub upstream_job_id: Option<String>,
    pub error_code: Option<i32>,
    pub error: Option<String>,
    pub actor: Option<String>,
    pub action: Option<String>,
}

/// A row's history, oldest first (the most recent `limit` events).
pub async fn request_events(pool: &Db, id: i64, limit: i64) -> Result<Vec<EventLine>, sqlx::Error> {
    sql::query_as(
        "SELECT * FROM (
             SELECT id, at, state, previous_state, attempts, upstream_job_id, error_code, error, actor, action
               FROM report_events WHERE request_id = $1 ORDER BY id DESC LIMIT $2) e
          ORDER BY id",
    )
    .bind(id)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Operators' account-wide actions (newest first).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AccountEvent {
    pub at: DateTime<Utc>,
    pub account: String,
    pub action: Option<String>,
    pub actor: Option<String>,
    pub error: Option<String>,
}

pub async fn account_events(pool: &Db, limit: i64) -> Result<Vec<AccountEvent>, sqlx::Error> {
    sql::query_as(
        "SELECT at, account, action, actor, error FROM report_events
          WHERE account IS NOT NULL ORDER BY id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Where a stored document's bytes are.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StoredDocument {
    pub file_name: String,
    pub content_type: String,
    pub byte_size: i64,
    pub sha256: String,
    /// `None`: the bytes are in `report_documents.content`.
    pub object_key: Option<String>,
}

pub async fn document_meta(pool: &Db, id: i64) -> Result<Option<StoredDocument>, sqlx::Error> {
    sql::query_as(
        "SELECT file_name, content_type, byte_size, sha256, object_key
           FROM report_documents WHERE request_id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// `len` bytes of a document stored in PostgreSQL, from `offset` (the column is stored
/// uncompressed, so PostgreSQL reads only the chunks asked for) — of the document whose
/// digest is `sha256` only: `None` once another document replaced it, so that a stream
/// read in several statements never mixes two documents.
pub async fn document_slice(
    pool: &Db,
    id: i64,
    sha256: &str,
    offset: i64,
    len: i64,
) -> Result<Option<Vec<u8>>, sqlx::Error> {
    sql::query_scalar(
        "SELECT substring(content FROM $2::int + 1 FOR $3::int) FROM report_documents
          WHERE request_id = $1 AND sha256 = $4",
    )
    .bind(id)
    .bind(offset)
    .bind(len)
    .bind(sha256)
    .fetch_optional(pool)
    .await
    .map(Option::flatten)
}

/// Latency percentiles (seconds) over recent rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, sqlx::FromRow)]
pub struct Percentiles {
    /// How many rows they were computed over.
    pub n: i64,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
}

/// Recent latencies: insert → first task created (the pickup, including the create
/// call), and insert → document stored.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Latencies {
    pub to_task: Percentiles,
    pub to_document: Percentiles,
}

/// How many recent rows latencies are computed over, and how far back in the event
/// log they are looked for (bounds the work whatever the table holds).
pub const LATENCY_ROWS: i64 = 1000;
const LATENCY_EVENT_WINDOW: i64 = 50_000;

pub async fn latencies(pool: &Db) -> Result<Latencies, sqlx::Error> {
    let query = |first_task: bool| {
        sql::query_as::<Percentiles>(
            "WITH recent AS (
                 SELECT extract(epoch FROM e.at - r.created_at)::float8 AS secs
                   FROM report_events e JOIN report_requests r ON r.id = e.request_id
                  WHERE e.id > (SELECT coalesce(max(id), 0) FROM report_events) - $2
                    AND e.previous_state IS NOT NULL
                    AND CASE WHEN $3 THEN e.state = 'generating' AND e.previous_state = 'queued' AND e.attempts = 1
                             ELSE e.state = 'succeeded' END
                  ORDER BY e.id DESC LIMIT $1)
             SELECT count(*) AS n,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY secs) AS p50,
                    percentile_cont(0.9) WITHIN GROUP (ORDER BY secs) AS p90,
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY secs) AS p99
               FROM recent",
        )
        .bind(LATENCY_ROWS)
        .bind(LATENCY_EVENT_WINDOW)
        .bind(first_task)
    };
    Ok(Latencies {
        to_task: query(true).fetch_one(pool).await?,
        to_document: query(false).fetch_one(pool).await?,
    })
}

/// Rows finished in one minute (or hour), by final state.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct FinishedIn {
    pub at: DateTime<Utc>,
    pub succeeded: i64,
    pub failed: i64,
    pub cancelled: i64,
}

/// Finished rows per `bucket` ('minute' or 'hour') over the last `within`, oldest
/// first, one entry per bucket (empty buckets included).
pub async fn finished_series(
    pool: &Db,
    bucket: &str,
    buckets: i32,
) -> Result<Vec<FinishedIn>, sqlx::Error> {
    let step = if bucket == "hour" {
        "1 hour"
    } else {
        "1 minute"
    };
    sql::query_as(sqlx::AssertSqlSafe(format!(
        "WITH grid AS (
             SELECT date_trunc('{bucket}', now()) - g * interval '{step}' AS at
               FROM generate_series(0, $1 - 1) g),
         f AS (
             SELECT date_trunc('{bucket}', minute) AS at,
                    sum(n) FILTER (WHERE state = 'succeeded') AS succeeded,
                    sum(n) FILTER (WHERE state = 'failed') AS failed,
                    sum(n) FILTER (WHERE state = 'cancelled') AS cancelled
               FROM report_finished_minutes
              WHERE minute >= date_trunc('{bucket}', now()) - ($1 - 1) * interval '{step}'
              GROUP BY 1)
         SELECT grid.at, coalesce(f.succeeded, 0)::bigint AS succeeded,
                coalesce(f.failed, 0)::bigint AS failed, coalesce(f.cancelled, 0)::bigint AS cancelled
           FROM grid LEFT JOIN f ON f.at = grid.at ORDER BY grid.at"
    )))
    .bind(buckets)
    .fetch_all(pool)
    .await
}

/// A batch at a glance for the batch list.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct BatchLine {
    pub batch: String,
    /// The batch's newest row (the list is newest batch first).
    pub last_id: i64,
    pub total: i64,
    pub queued: i64,
    pub generating: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub cancelled: i64,
}

/// Batches, newest first (by their newest request), with their rows per state: read
/// from `report_batches` and `report_batch_counts`, which the triggers keep, so a page
/// costs the same whatever the batches hold.
pub async fn batches(
    pool: &Db,
    before_last_id: Option<i64>,
    limit: i64,
) -> Result<Vec<BatchLine>, sqlx::Error> {
    sql::query_as(
        "WITH page AS (
             SELECT batch, last_id FROM report_batches
              WHERE last_id < coalesce($1, 9223372036854775807)
              ORDER BY last_id DESC LIMIT $2)
         SELECT p.batch, p.last_id, coalesce(sum(c.n), 0)::bigint AS total,
                coalesce(sum(c.n) FILTER (WHERE c.state = 'queued'), 0)::bigint AS queued,
                coalesce(sum(c.n) FILTER (WHERE c.state = 'generating'), 0)::bigint AS generating,
                coalesce(sum(c.n) FILTER (WHERE c.state = 'succeeded'), 0)::bigint AS succeeded,
                coalesce(sum(c.n) FILTER (WHERE c.state = 'failed'), 0)::bigint AS failed,
                coalesce(sum(c.n) FILTER (WHERE c.state = 'cancelled'), 0)::bigint AS cancelled
           FROM page p LEFT JOIN report_batch_counts c ON c.batch = p.batch
          GROUP BY p.batch, p.last_id ORDER BY p.last_id DESC",
    )
    .bind(before_last_id)
    .bind(limit)
    .fetch_all(pool)
    .await
}
