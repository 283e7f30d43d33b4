//! The observed generation times learned polling is computed from
//! (`report_generation_times`): written with each completion, read back by every
//! process's schedule.

use super::Db;
use super::sql;

use crate::domain::ReportType;

/// One observation: not ready at, ready at, last "queued" answer at (seconds after the
/// create) and its `queue_num`.
pub type GenerationTime = (f32, f32, Option<f32>, Option<i32>);

/// The most recent `limit` observations of `kind`.
pub async fn recent_generation_times(
    pool: &Db,
    kind: ReportType,
    limit: i64,
) -> Result<Vec<GenerationTime>, sqlx::Error> {
    sql::query_as(
        "SELECT lower_secs, upper_secs, waiting_secs, queue_num FROM report_generation_times
          WHERE report_type = $1 ORDER BY id DESC LIMIT $2",
    )
    .bind(kind.as_str())
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// The most recent `limit` observations of every report type together.
pub async fn recent_generation_times_of_every_type(
    pool: &Db,
    limit: i64,
) -> Result<Vec<GenerationTime>, sqlx::Error> {
    sql::query_as(
        "SELECT lower_secs, upper_secs, waiting_secs, queue_num FROM report_generation_times
          ORDER BY id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Keeps the `keep` most recent observations of `kind`, removing older ones.
pub async fn forget_old_generation_times(
    pool: &Db,
    kind: ReportType,
    keep: i64,
) -> Result<u64, sqlx::Error> {
    let r = sql::query(
        "DELETE FROM report_generation_times
          WHERE report_type = $1
            AND id < (SELECT min(id) FROM (SELECT id FROM report_generation_times
                                            WHERE report_type = $1 ORDER BY id DESC LIMIT $2) k)",
    )
    .bind(kind.as_str())
    .bind(keep)
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

/// The observation a completing row leaves, as SQL over the row as it was before the
/// completion (`b`): not ready at its last "not ready" answer of this task (0 when the
/// first poll found it ready), ready at the poll that found it so (`next_poll_at`, the
/// moment the schedule asked for), and its last "queued" answer of this task, if any.
pub(super) const OBSERVATION_SQL: &str = "
    INSERT INTO report_generation_times (report_type, lower_secs, upper_secs, waiting_secs, queue_num)
    SELECT b.report_type,
           CASE WHEN b.last_polled_at > b.upstream_created_at
                THEN extract(epoch FROM b.last_polled_at - b.upstream_created_at) ELSE 0 END,
           greatest(extract(epoch FROM b.next_poll_at - b.upstream_created_at),
                    CASE WHEN b.last_polled_at > b.upstream_created_at
                         THEN extract(epoch FROM b.last_polled_at - b.upstream_created_at) ELSE 0 END),
           CASE WHEN b.last_waiting_at > b.upstream_created_at
                THEN extract(epoch FROM b.last_waiting_at - b.upstream_created_at) END,
           CASE WHEN b.last_waiting_at > b.upstream_created_at THEN b.last_queue_num END
      FROM before b JOIN done ON done.id = b.id
     WHERE b.upstream_created_at IS NOT NULL AND b.next_poll_at IS NOT NULL";
