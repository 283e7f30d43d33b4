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
//! The check runs every `recheck_every`; sooner — before the claim loop claims again —
//! when the database failed this process (an error on any of its connections) or is
//! another server than before (`pg_postmaster_start_time()` changed: a failover or a
//! restart, seen even through a pooler that hides the switch). When the server changed,
//! this process also makes no new creates for `recheck_every` and a margin, so that the
//! other processes' checks hand their lost job ids back before a row could be bought
//! again. It covers processes that live through the failover; one that dies with its
//! database takes its memory with it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::queue::{self, Orphan, OrphanFate, sql};

/// How often the check runs when nothing else asks for it.
pub const RECHECK_EVERY: Duration = Duration::from_secs(15);

/// How often the server's identity (its start time) is looked at.
const SERVER_CHECK_EVERY: Duration = Duration::from_secs(5);

/// A job id the database has shown for this long is on every standby of any sane
/// replication lag: it is no longer watched.
const DURABLE_AFTER: Duration = Duration::from_secs(120);

/// At most this many job ids are watched (the oldest go first): a bound on memory if
/// the database accepted writes but could never be read back.
const MAX_WATCHED: usize = 100_000;

struct Watched {
    orphan: Orphan,
    /// The attempt the task was created for: a row past it has moved on (a later task).
    attempt: i32,
    written_at: Instant,
}

/// Job ids written lately, oldest first, and what the database did lately.
#[derive(Default)]
pub(crate) struct Recent {
    watched: std::sync::Mutex<VecDeque<Watched>>,
    /// The database failed or changed: check before claiming again.
    suspect: AtomicBool,
    /// The server's start time when last looked at.
    server_started: std::sync::Mutex<Option<DateTime<Utc>>>,
    /// No new creates before this (the server changed).
    creates_held_until: std::sync::Mutex<Option<Instant>>,
}

impl Recent {
    /// `orphan` (the task, its row, the intent it was sent under), created for
    /// `attempt`, was just written: to its row, or as an orphan.
    pub(crate) fn written(&self, orphan: Orphan, attempt: i32) {
        self.watch(Watched {
            orphan,
            attempt,
            written_at: Instant::now(),
        });
    }

    fn watch(&self, watched: Watched) {
        let mut all = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        if all.len() >= MAX_WATCHED {
            all.pop_front();
        }
        all.push_back(watched);
    }

    /// The database failed this process somewhere: the claim loop checks before it
    /// claims again.
    pub(crate) fn suspect(&self) {
        self.suspect.store(true, Ordering::Relaxed);
    }

    /// Whether a check is due before the next claim.
    pub(crate) fn suspected(&self) -> bool {
        self.suspect.load(Ordering::Relaxed)
    }

    /// Whether new creates wait (the server changed moments ago).
    pub(crate) fn creates_held(&self) -> bool {
        let mut until = self
            .creates_held_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match *until {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                *until = None;
                false
            }
            None => false,
        }
    }

    /// Looks at the server's start time; a new one (a failover, a restart) makes the
    /// next check due at once and holds new creates for `hold`.
    async fn check_server(&self, shared: &Shared, hold: Duration) -> Result<(), sqlx::Error> {
        let started: DateTime<Utc> = sql::query_scalar("SELECT pg_postmaster_start_time()")
            .fetch_one(&shared.pool)
            .await?;
        let previous = self
            .server_started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(started);
        if previous.is_some_and(|p| p != started) {
            tracing::warn!(
                hold = %humantime::format_duration(hold),
                "the database server changed (a failover or a restart): checking the job ids written lately, no new creates meanwhile"
            );
            *self
                .creates_held_until
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + hold);
            self.suspect();
        }
        Ok(())
    }

    /// Checks every watched job id against the database in one statement. Present —
    /// on its row, in its row's events, among the orphans, or its row gone or past that
    /// attempt — is fine (and no longer watched once old enough); missing is handed back
    /// to its row. Returns how many were missing.
    pub(crate) async fn recheck(&self, shared: &Shared) -> Result<usize, sqlx::Error> {
        let snapshot: Vec<(i64, String, i32)> = {
            let watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
            watched
                .iter()
                .map(|w| {
                    let job = w.orphan.job_id.as_str().to_string();
                    (w.orphan.request_id, job, w.attempt)
                })
                .collect()
        };
        if snapshot.is_empty() {
            self.suspect.store(false, Ordering::Relaxed);
            return Ok(0);
        }
        let checked_at = Instant::now();
        let mut ids = Vec::with_capacity(snapshot.len());
        let mut jobs = Vec::with_capacity(snapshot.len());
        let mut attempts = Vec::with_capacity(snapshot.len());
        for (id, job, attempt) in snapshot {
            ids.push(id);
            jobs.push(job);
            attempts.push(attempt);
        }
        let missing: Vec<String> = sql::query_scalar(
            "SELECT x.job FROM unnest($1::bigint[], $2::text[], $3::int[]) AS x (id, job, attempt)
               JOIN report_requests q ON q.id = x.id
              WHERE q.attempts <= x.attempt
                AND q.upstream_job_id IS DISTINCT FROM x.job
                AND NOT EXISTS (SELECT 1 FROM report_events e
                                 WHERE e.request_id = x.id AND e.upstream_job_id = x.job)
                AND NOT EXISTS (SELECT 1 FROM report_orphan_tasks o WHERE o.job_id = x.job)",
        )
        .bind(&ids)
        .bind(&jobs)
        .bind(&attempts)
        .fetch_all(&shared.pool)
        .await?;
        let lost: Vec<Watched> = {
            let mut watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
            let (lost, kept): (VecDeque<Watched>, VecDeque<Watched>) = watched
                .drain(..)
                .partition(|w| missing.iter().any(|j| j == w.orphan.job_id.as_str()));
            // Written after the snapshot, or not yet old enough to be on every standby:
            // still watched.
            *watched = kept
                .into_iter()
                .filter(|w| {
                    w.written_at > checked_at
                        || checked_at.duration_since(w.written_at) < DURABLE_AFTER
                })
                .collect();
            lost.into()
        };
        let found = lost.len();
        let mut first_error = None;
        for w in lost {
            if let Err(e) = hand_back(shared, &w).await {
                // Watched again: the next check hands it back.
                self.watch(w);
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => {
                self.suspect.store(false, Ordering::Relaxed);
                Ok(found)
            }
        }
    }
}

/// A job id the database lost, back to its row.
async fn hand_back(shared: &Shared, w: &Watched) -> Result<(), sqlx::Error> {
    let mut orphan = w.orphan.clone();
    orphan.reason = "its job id was written, then lost with the database's last commits (a failover to a standby without them?)".into();
    let first_poll = shared
        .learning
        .first_poll_delay(&shared.pool, orphan.report_type)
        .await;
    let fate = queue::adopt_or_record_orphan(&shared.pool, &orphan, first_poll).await?;
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
    Ok(())
}

/// The periodic checks, for the worker's whole life: the server's identity every few
/// seconds, the job ids every `recheck_every` (at once when the server changed).
pub(super) async fn periodically(shared: Arc<Shared>, cancel: CancellationToken) {
    let every = shared.config.recheck_every;
    let hold = every + Duration::from_secs(5);
    let tick = every.min(SERVER_CHECK_EVERY);
    let mut last_recheck = Instant::now();
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let recent = &shared.recent;
        let work = async {
            recent.check_server(&shared, hold).await?;
            if recent.suspected() || last_recheck.elapsed() >= every {
                recent.recheck(&shared).await?;
                last_recheck = Instant::now();
            }
            Ok::<(), sqlx::Error>(())
        };
        // A statement stuck on a dead connection must not hold up shutdown.
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = work => r,
        };
        match result {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                recent.suspect();
                if failures.is_multiple_of(4) || !queue::is_retryable(&e) {
                    tracing::warn!(error = %e, failures, "cannot check the job ids written lately yet");
                }
            }
        }
    }
}
