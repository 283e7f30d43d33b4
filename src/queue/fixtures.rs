//! Synthetic rows for the benchmarks: backlogs inserted in one statement, and the
//! checks a benchmark harness makes while the worker burns them down. Not used by the
//! engine.

use super::Db;
use super::sql;

use crate::domain::ReportType;

/// Inserts `n` queued rows named `<prefix><i>`, alternating PDF and Word when `mixed`.
pub async fn insert_backlog(
    pool: &Db,
    prefix: &str,
    n: usize,
    mixed: bool,
) -> Result<u64, sqlx::Error> {
    let r = sql::query(
        "INSERT INTO report_requests (company_name, report_type)
         SELECT $1 || i, CASE WHEN $3 AND i % 2 = 1 THEN 'word' ELSE 'pdf' END
           FROM generate_series(1, $2) i",
    )
    .bind(prefix)
    .bind(n as i64)
    .bind(mixed)
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

/// Inserts one `generating` row per job id (tasks seeded at the provider), each next
/// polled at a random moment within `spread_secs`.
pub async fn insert_generating(
    pool: &Db,
    jobs: &[String],
    report_type: ReportType,
    spread_secs: f64,
) -> Result<u64, sqlx::Error> {
    let r = sql::query(
        "INSERT INTO report_requests (company_name, report_type, state, attempts, upstream_job_id,
                                      upstream_created_at, next_poll_at)
         SELECT '在途' || j, $2, 'generating', 1, j, now(), now() + random() * $3 * interval '1 second'
           FROM unnest($1::text[]) AS j",
    )
    .bind(jobs)
    .bind(report_type.as_str())
    .bind(spread_secs)
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

/// Generating rows whose poll falls due within `secs`.
pub async fn polls_due_within(pool: &Db, secs: f64) -> Result<i64, sqlx::Error> {
    sql::query_scalar(
        "SELECT count(*) FROM report_requests
          WHERE state = 'generating' AND next_poll_at < now() + $1 * interval '1 second'",
    )
    .bind(secs)
    .fetch_one(pool)
    .await
}

/// Whether any row is still queued or generating.
pub async fn any_open(pool: &Db) -> Result<bool, sqlx::Error> {
    sql::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM report_requests WHERE state = 'queued')
             OR EXISTS (SELECT 1 FROM report_requests WHERE state = 'generating')",
    )
    .fetch_one(pool)
    .await
}

pub async fn count_requests(pool: &Db) -> Result<i64, sqlx::Error> {
    sql::query_scalar("SELECT count(*) FROM report_requests")
        .fetch_one(pool)
        .await
}

pub async fn count_documents_stored(pool: &Db) -> Result<i64, sqlx::Error> {
    sql::query_scalar("SELECT count(*) FROM report_documents")
        .fetch_one(pool)
        .await
}

/// Puts every generating row under `owner`'s lease for `lease` (an empty owner releases
/// them): polls another process holds.
pub async fn hold_all(
    pool: &Db,
    owner: &str,
    lease: std::time::Duration,
) -> Result<u64, sqlx::Error> {
    let r = sql::query(
        "UPDATE report_requests
            SET lease_owner = nullif($1, ''), lease_expires_at = CASE WHEN $1 = '' THEN NULL ELSE now() + $2 * interval '1 second' END
          WHERE state = 'generating'",
    )
    .bind(owner)
    .bind(lease.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

/// Stops the account (scope `all`) with its next probe `probe_in` away.
pub async fn stop_account(
    pool: &Db,
    account: &str,
    probe_in: std::time::Duration,
) -> Result<(), sqlx::Error> {
    sql::query(
        "INSERT INTO report_account_stops (account, scope, reason, error_code, probe_at)
         VALUES ($1, 'all', 'benchmark', 67200004, now() + $2 * interval '1 second')",
    )
    .bind(account)
    .bind(probe_in.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(())
}

/// Inserts `n` rows of finished history (ids after `offset`), created 200 days ago and
/// onward a second apart, 2 % failed, 1 % cancelled, the rest succeeded.
pub async fn insert_history(pool: &Db, offset: i64, n: i64) -> Result<u64, sqlx::Error> {
    let r = sql::query(
        "INSERT INTO report_requests (company_name, report_type, state, attempts, created_at, finished_at)
         SELECT '历史' || i, 'pdf',
                CASE WHEN i % 50 = 0 THEN 'failed' WHEN i % 97 = 0 THEN 'cancelled' ELSE 'succeeded' END, 1,
                now() - interval '200 days' + i * interval '1 second',
                now() - interval '200 days' + i * interval '1 second' + interval '5 minutes'
           FROM generate_series($1 + 1, $1 + $2) i",
    )
    .bind(offset)
    .bind(n)
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

/// What report_queue_stats used to do: scan the table.
pub async fn scan_stats(pool: &Db) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sql::query_as("SELECT state, count(*) FROM report_requests GROUP BY state")
        .fetch_all(pool)
        .await
}

/// report_requests' updates so far, and how many were HOT.
pub async fn update_counts(pool: &Db) -> Result<(i64, i64), sqlx::Error> {
    sql::query_as(
        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'report_requests'",
    )
    .fetch_one(pool)
    .await
}

/// report_requests' size on disk: the table (with TOAST) and its indexes, in bytes.
pub async fn table_sizes(pool: &Db) -> Result<(i64, i64), sqlx::Error> {
    sql::query_as("SELECT pg_table_size('report_requests'), pg_indexes_size('report_requests')")
        .fetch_one(pool)
        .await
}

/// A long-lived table as the dashboard sees it: `n` finished rows (ids after `offset`)
/// like `insert_history`, in batches of `per_batch` rows, the failed ones with the
/// provider's error.
pub async fn insert_batched_history(
    pool: &Db,
    offset: i64,
    n: i64,
    per_batch: i64,
) -> Result<u64, sqlx::Error> {
    let r = sql::query(
        "INSERT INTO report_requests (company_name, report_type, state, attempts, created_at, finished_at,
                                      batch, last_error_code, last_error)
         SELECT '历史' || i, 'pdf', s, 1,
                now() - interval '200 days' + i * interval '1 second',
                now() - interval '200 days' + i * interval '1 second' + interval '5 minutes',
                'batch-' || (i / $3), CASE WHEN s = 'failed' THEN 68300004 END,
                CASE WHEN s = 'failed' THEN 'Invalid parameter!' END
           FROM generate_series($1 + 1, $1 + $2) i,
                LATERAL (SELECT CASE WHEN i % 50 = 0 THEN 'failed' WHEN i % 97 = 0 THEN 'cancelled'
                                     ELSE 'succeeded' END AS s) st",
    )
    .bind(offset)
    .bind(n)
    .bind(per_batch)
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

/// `n` rows inserted minutes ago that went through a task and finished now (their
/// events are the recent history latencies are read from).
pub async fn insert_recent_finishes(pool: &Db, n: i64) -> Result<(), sqlx::Error> {
    let ids: Vec<i64> = sql::query_scalar(
        "INSERT INTO report_requests (company_name, report_type, created_at)
         SELECT '最近' || i, 'pdf', now() - random() * interval '10 minutes' FROM generate_series(1, $1) i
         RETURNING id",
    )
    .bind(n)
    .fetch_all(pool)
    .await?;
    sql::query(
        "UPDATE report_requests SET state = 'generating', attempts = 1, upstream_job_id = id::text,
                upstream_created_at = now(), next_poll_at = now()
          WHERE id = ANY($1)",
    )
    .bind(&ids)
    .execute(pool)
    .await?;
    sql::query(
        "UPDATE report_requests SET state = 'succeeded', finished_at = now(), next_poll_at = NULL
          WHERE id = ANY($1)",
    )
    .bind(&ids)
    .execute(pool)
    .await?;
    Ok(())
}
