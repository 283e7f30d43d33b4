//! Retention: removing finished history in small batches that never hold a lock the
//! claim path needs (only finished rows, their documents and events are touched; rows
//! someone holds are skipped), each batch its own short transaction.
//!
//! Ids grow with creation time (an identity column), so "created before the cutoff" is an
//! id range found by bisecting the primary key; every batch scans only its slice of that
//! range, never the whole table, however long the history.

use super::Db;
use super::sql;
use chrono::{DateTime, Utc};

/// A table whose rows can be bisected by time along their id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timeline {
    /// `report_requests` by `created_at`.
    Requests,
    /// `report_events` by `at`.
    Events,
}

impl Timeline {
    fn sql(self) -> (&'static str, &'static str) {
        match self {
            Timeline::Requests => ("report_requests", "created_at"),
            Timeline::Events => ("report_events", "at"),
        }
    }
}

/// The highest id whose time is before `cutoff` (`None`: no such row). About 25
/// primary-key lookups for 10 million rows.
async fn last_id_before(
    pool: &Db,
    timeline: Timeline,
    cutoff: DateTime<Utc>,
) -> Result<Option<i64>, sqlx::Error> {
    let (table, at) = timeline.sql();
    let bounds: (Option<i64>, Option<i64>) = sql::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT min(id), max(id) FROM {table}"
    )))
    .fetch_one(pool)
    .await?;
    let (Some(mut lo), Some(mut hi)) = bounds else {
        return Ok(None);
    };
    // The first row at or after `id`, and its time.
    let probe = |id: i64| {
        sql::query_as::<(i64, DateTime<Utc>)>(sqlx::AssertSqlSafe(format!(
            "SELECT id, {at} FROM {table} WHERE id >= $1 ORDER BY id LIMIT 1"
        )))
        .bind(id)
        .fetch_optional(pool)
    };
    match probe(lo).await? {
        Some((_, t)) if t < cutoff => {}
        _ => return Ok(None),
    }
    // Invariant: the row at `lo` is before the cutoff; nothing past `hi` is.
    while lo < hi {
        let mid = lo + (hi - lo + 1) / 2;
        match probe(mid).await? {
            Some((id, t)) if t < cutoff => lo = id.max(mid),
            _ => hi = mid - 1,
        }
    }
    Ok(Some(lo))
}

/// What one purge should remove: finished requests (their documents and events go with
/// them) or only their documents, finished before `finished_before`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeScope {
    pub finished_before: DateTime<Utc>,
    pub documents_only: bool,
}

/// A purge in progress: which id range is left to look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeCursor {
    after: i64,
    upto: i64,
}

/// Where a purge of `scope` starts: `None` when nothing can qualify.
pub async fn purge_start(
    pool: &Db,
    scope: &PurgeScope,
) -> Result<Option<PurgeCursor>, sqlx::Error> {
    // A row finished before the cutoff was created before it too.
    Ok(
        last_id_before(pool, Timeline::Requests, scope.finished_before)
            .await?
            .map(|upto| PurgeCursor { after: 0, upto }),
    )
}

/// One batch of a purge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Purged {
    pub requests: u64,
    pub documents: u64,
    /// Object-store keys of the documents removed (their objects are deleted after).
    pub object_keys: Vec<String>,
}

/// Deletes up to `limit` qualifying rows after the cursor and moves it on; `None` when
/// the purge is done. Rows another transaction holds are skipped, never waited for.
pub async fn purge_batch(
    pool: &Db,
    scope: &PurgeScope,
    cursor: &mut PurgeCursor,
    limit: i64,
) -> Result<Option<Purged>, sqlx::Error> {
    let row: (i64, i64, Option<i64>, Option<Vec<String>>) = if scope.documents_only {
        sql::query_as(
            "WITH doomed AS (
                 SELECT d.request_id AS id FROM report_documents d
                  WHERE d.request_id > $1 AND d.request_id <= $2
                    AND EXISTS (SELECT 1 FROM report_requests r
                                 WHERE r.id = d.request_id AND r.finished_at < $3
                                   AND r.state IN ('succeeded', 'failed', 'cancelled'))
                  ORDER BY d.request_id LIMIT $4
                  FOR UPDATE OF d SKIP LOCKED),
             docs AS (DELETE FROM report_documents d USING doomed WHERE d.request_id = doomed.id
                      RETURNING d.object_key)
             SELECT 0::bigint, (SELECT count(*) FROM docs), (SELECT max(id) FROM doomed),
                    (SELECT array_agg(object_key) FROM docs WHERE object_key IS NOT NULL)",
        )
    } else {
        sql::query_as(
            "WITH doomed AS (
                 SELECT id FROM report_requests
                  WHERE id > $1 AND id <= $2 AND finished_at < $3
                    AND state IN ('succeeded', 'failed', 'cancelled')
                  ORDER BY id LIMIT $4
                  FOR UPDATE SKIP LOCKED),
             docs AS (DELETE FROM report_documents d USING doomed WHERE d.request_id = doomed.id
                      RETURNING d.object_key),
             gone AS (DELETE FROM report_requests r USING doomed WHERE r.id = doomed.id RETURNING r.id)
             SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM docs), (SELECT max(id) FROM doomed),
                    (SELECT array_agg(object_key) FROM docs WHERE object_key IS NOT NULL)",
        )
    }
    .bind(cursor.after)
    .bind(cursor.upto)
    .bind(scope.finished_before)
    .bind(limit)
    .fetch_one(pool)
    .await?;
    let (requests, documents, last, keys) = row;
    let Some(last) = last else {
        return Ok(None);
    };
    cursor.after = last;
    Ok(Some(Purged {
        requests: requests as u64,
        documents: documents as u64,
        object_keys: keys.unwrap_or_default(),
    }))
}

/// What a purge of `scope` would remove (for `--dry-run`), counted batch by batch.
pub async fn purge_count(pool: &Db, scope: &PurgeScope) -> Result<(u64, u64), sqlx::Error> {
    let Some(cursor) = purge_start(pool, scope).await? else {
        return Ok((0, 0));
    };
    let (requests, documents): (i64, i64) = sql::query_as(
        "SELECT count(*) FILTER (WHERE NOT $4),
                count(d.request_id)
           FROM report_requests r LEFT JOIN report_documents d ON d.request_id = r.id
          WHERE r.id > $1 AND r.id <= $2 AND r.finished_at < $3
            AND r.state IN ('succeeded', 'failed', 'cancelled')",
    )
    .bind(cursor.after)
    .bind(cursor.upto)
    .bind(scope.finished_before)
    .bind(scope.documents_only)
    .fetch_one(pool)
    .await?;
    Ok((requests as u64, documents as u64))
}

/// Deletes up to `limit` events older than `before`, oldest first, from the range left;
/// returns how many, `None` when done.
pub async fn purge_events_batch(
    pool: &Db,
    cursor: &mut PurgeCursor,
    before: DateTime<Utc>,
    limit: i64,
) -> Result<Option<u64>, sqlx::Error> {
    let (deleted, last): (i64, Option<i64>) = sql::query_as(
        "WITH doomed AS (
             SELECT id FROM report_events WHERE id > $1 AND id <= $2 AND at < $3
              ORDER BY id LIMIT $4),
         gone AS (DELETE FROM report_events e USING doomed WHERE e.id = doomed.id RETURNING e.id)
         SELECT (SELECT count(*) FROM gone), (SELECT max(id) FROM doomed)",
    )
    .bind(cursor.after)
    .bind(cursor.upto)
    .bind(before)
    .bind(limit)
    .fetch_one(pool)
    .await?;
    let Some(last) = last else {
        return Ok(None);
    };
    cursor.after = last;
    Ok(Some(deleted as u64))
}

/// Where a purge of events older than `before` starts.
pub async fn events_purge_start(
    pool: &Db,
    before: DateTime<Utc>,
) -> Result<Option<PurgeCursor>, sqlx::Error> {
    Ok(last_id_before(pool, Timeline::Events, before)
        .await?
        .map(|upto| PurgeCursor { after: 0, upto }))
}

/// Throughput buckets older than two days are of no use to `report_throughput`.
pub async fn prune_throughput(pool: &Db) -> Result<u64, sqlx::Error> {
    let r =
        sql::query("DELETE FROM report_finished_minutes WHERE minute < now() - interval '2 days'")
            .execute(pool)
            .await?;
    Ok(r.rows_affected())
}

/// The scheduled job that purges finished history (`report_schedules`).
pub const RETENTION_JOB: &str = "retention";

/// Takes `job` for `owner` until `hold` from now, unless another owner holds it (one
/// statement; `false`: someone else runs it now).
pub async fn take_schedule(
    pool: &Db,
    job: &str,
    owner: &str,
    hold: std::time::Duration,
) -> Result<bool, sqlx::Error> {
    let won: Option<i32> = sql::query_scalar(
        "INSERT INTO report_schedules AS s (job, owner, held_until, last_run)
         VALUES ($1, $2, now() + $3 * interval '1 second', now())
         ON CONFLICT (job) DO UPDATE
            SET owner = excluded.owner, held_until = excluded.held_until, last_run = now()
          WHERE s.held_until < now() OR s.owner = excluded.owner
         RETURNING 1",
    )
    .bind(job)
    .bind(owner)
    .bind(hold.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    Ok(won.is_some())
}

/// Gives `job` back (when `owner` still holds it).
pub async fn release_schedule(pool: &Db, job: &str, owner: &str) -> Result<(), sqlx::Error> {
    sql::query("UPDATE report_schedules SET held_until = now() WHERE job = $1 AND owner = $2")
        .bind(job)
        .bind(owner)
        .execute(pool)
        .await?;
    Ok(())
}
