//! The tasks this process created lately, checked again against the database. A
//! failover to an asynchronous standby can lose the last commits the old primary
//! acknowledged: a job id written to its row (and the create intent before it) may be
//! gone on the new primary, and the row would buy its report again. The provider
//! offers no way to list an account's tasks, so the only other copy of a fresh job id
//! is this process's memory: each one is kept here until the database has shown it for
//! long enough that any standby has it too, and one that went missing is handed back to
//! its row (adopted at once when the row still waits for that very create, else kept
//! in `report_orphan_tasks` for the row's next create to adopt).
//!
//! The check runs every `RECHECK_EVERY`, and first thing after the database failed the
//! claim loop (a failover is an outage), before any row is claimed again. It covers a
//! process that lives through the failover; one that dies with its database takes its
//! memory with it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::queue::{self, Orphan, OrphanFate, sql};

/// How often the check runs when nothing else asks for it.
pub const RECHECK_EVERY: Duration = Duration::from_secs(15);

/// A job id the database has shown for this long is on every standby of any sane
/// replication lag: it is no longer watched.
const DURABLE_AFTER: Duration = Duration::from_secs(120);

/// At most this many job ids are watched (the oldest go first): a bound on memory if
/// the database accepted writes but could never be read back.
const MAX_WATCHED: usize = 100_000;

struct Watched {
    orphan: Orphan,
    written_at: Instant,
}

/// Job ids written lately, oldest first.
#[derive(Default)]
pub(crate) struct Recent {
    watched: std::sync::Mutex<VecDeque<Watched>>,
}

impl Recent {
    /// `orphan` (the task, its row, the intent it was sent under) was just written to
    /// its row.
    pub(crate) fn written(&self, orphan: Orphan) {
        let mut watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        if watched.len() >= MAX_WATCHED {
            watched.pop_front();
        }
        watched.push_back(Watched {
            orphan,
            written_at: Instant::now(),
        });
    }

    /// Checks every watched job id against the database in one statement: found on its
    /// row, in its row's events or among the orphans is fine (and no longer watched once
    /// old enough); missing is handed back to its row. Returns how many were missing.
    pub(crate) async fn recheck(&self, shared: &Shared) -> Result<usize, sqlx::Error> {
        let snapshot: Vec<(i64, String, Instant)> = {
            let watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
            watched
                .iter()
                .map(|w| {
                    (
                        w.orphan.request_id,
                        w.orphan.job_id.as_str().to_string(),
                        w.written_at,
                    )
                })
                .collect()
        };
        if snapshot.is_empty() {
            return Ok(0);
        }
        let checked_at = Instant::now();
        let (ids, jobs): (Vec<i64>, Vec<String>) =
            snapshot.iter().map(|(i, j, _)| (*i, j.clone())).unzip();
        let missing: Vec<String> = sql::query_scalar(
            "SELECT x.job FROM unnest($1::bigint[], $2::text[]) AS x (id, job)
              WHERE NOT EXISTS (SELECT 1 FROM report_requests q
                                 WHERE q.id = x.id AND q.upstream_job_id = x.job)
                AND NOT EXISTS (SELECT 1 FROM report_events e
                                 WHERE e.request_id = x.id AND e.upstream_job_id = x.job)
                AND NOT EXISTS (SELECT 1 FROM report_orphan_tasks o WHERE o.job_id = x.job)",
        )
        .bind(&ids)
        .bind(&jobs)
        .fetch_all(&shared.pool)
        .await?;
        let lost: Vec<Orphan> = {
            let mut watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
            let mut lost = Vec::new();
            watched.retain(|w| {
                if missing.iter().any(|j| j == w.orphan.job_id.as_str()) {
                    lost.push(w.orphan.clone());
                    false
                } else {
                    // Written after the snapshot: not checked yet.
                    w.written_at > checked_at
                        || checked_at.duration_since(w.written_at) < DURABLE_AFTER
                }
            });
            lost
        };
        for mut orphan in lost.iter().cloned() {
            orphan.reason = "its job id was written to its row, then lost with the database's last commits (a failover to a standby without them?)".into();
            let first_poll = shared
                .learning
                .first_poll_delay(&shared.pool, orphan.report_type)
                .await;
            let fate = match queue::adopt_or_record_orphan(&shared.pool, &orphan, first_poll).await
            {
                Ok(fate) => fate,
                Err(e) => {
                    // Watched again: the next check hands it back.
                    self.written(orphan);
                    return Err(e);
                }
            };
            let what = match fate {
                OrphanFate::Adopted => "handed back to its row, which still waited for it",
                OrphanFate::Recorded => {
                    "kept in report_orphan_tasks: its row adopts it instead of buying again"
                }
                OrphanFate::AlreadyWritten => "found on its row after all",
            };
            tracing::warn!(
                id = orphan.request_id,
                job = %orphan.job_id,
                "the database lost a paid task's job id (a failover?): {what}"
            );
        }
        Ok(lost.len())
    }
}

/// The periodic check, for the worker's whole life.
pub(super) async fn periodically(shared: Arc<Shared>, cancel: CancellationToken) {
    let every = shared.config.recheck_every;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(e) = shared.recent.recheck(&shared).await {
            tracing::debug!(error = %e, "could not check the recent job ids; next time");
        }
    }
}
