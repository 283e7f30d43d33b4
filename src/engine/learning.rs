//! Learned polling in the engine: each process keeps, per report type, the schedule
//! computed from the most recent observed generation times (`schedule`), refreshed from
//! the database once a minute, so every process follows the same history. A type with
//! too little history of its own learns from every type's (see `history`). Without
//! enough history at all, or for windows under two minutes (tests, the demo), the fixed
//! `PollPolicy` decides.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::queue::Db;
use chrono::{DateTime, Utc};
use tokio::time::Instant;

use super::policy::{PollPolicy, Progress};
use super::schedule::{HISTORY, MIN_HISTORY, Observation, Schedule, Waiting};
use crate::domain::ReportType;
use crate::queue;

/// How often a process reads the history again.
const REFRESH_EVERY: Duration = Duration::from_secs(60);
/// Windows shorter than this keep the fixed schedule (its seconds-long gaps would not
/// fit).
const SHORTEST_WINDOW: Duration = Duration::from_secs(120);

type Cached = (Instant, Option<Arc<Schedule>>);

pub(super) struct Learning {
    /// The median detection delay aimed for; `None`: learned polling is off.
    target: Option<Duration>,
    policy: PollPolicy,
    cache: Mutex<HashMap<ReportType, Cached>>,
}

impl Learning {
    pub(super) fn new(target: Option<Duration>, policy: PollPolicy) -> Learning {
        let target = target.filter(|_| policy.window >= SHORTEST_WINDOW);
        Learning {
            target,
            policy,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Whether learned polling is on (completions then record what they observed).
    pub(super) fn is_on(&self) -> bool {
        self.target.is_some()
    }

    fn cached(&self, kind: ReportType) -> Option<Cached> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&kind)
            .cloned()
    }

    /// The schedule for `kind`, read again when a minute old. A database error keeps
    /// the schedule already known (or the fixed one).
    async fn schedule(&self, pool: &Db, kind: ReportType) -> Option<Arc<Schedule>> {
        let target = self.target?;
        if let Some((at, schedule)) = self.cached(kind)
            && at.elapsed() < REFRESH_EVERY
        {
            return schedule;
        }
        let schedule = match history(pool, kind).await {
            Ok(history) => {
                Schedule::learn(&history, self.policy.window, target, self.policy.poll_max)
                    .map(Arc::new)
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read generation times; keeping the schedule");
                self.cached(kind).and_then(|(_, s)| s)
            }
        };
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(kind, (Instant::now(), schedule.clone()));
        schedule
    }

    /// How long after its create a task of `kind` is first polled.
    pub(super) async fn first_poll_delay(&self, pool: &Db, kind: ReportType) -> Duration {
        match self.schedule(pool, kind).await {
            Some(s) => Duration::from_secs_f64(s.first()),
            None => self.policy.first_poll_delay(),
        }
    }

    /// The next poll of a task of `kind` created at `created`, after a "not ready"
    /// answer at `now`: `queued` with the jobs ahead when it said the task is still
    /// queued, `None` when exporting. Past the window (where a learned schedule ends),
    /// every `poll_max` until the give-up; `None` then.
    pub(super) async fn next_poll_at(
        &self,
        pool: &Db,
        kind: ReportType,
        created: DateTime<Utc>,
        now: DateTime<Utc>,
        queued: Option<i64>,
        unit: f64,
    ) -> Option<DateTime<Utc>> {
        let Some(s) = self.schedule(pool, kind).await else {
            let progress = match queued {
                Some(_) => Progress::Queued,
                None => Progress::Exporting,
            };
            return self.policy.next_poll_at(created, now, progress, unit);
        };
        let elapsed = (now - created).num_milliseconds() as f64 / 1000.0;
        match s.next_after_answer(elapsed, queued) {
            Some(next) => Some(created + chrono::Duration::milliseconds((next * 1000.0) as i64)),
            None => self.policy.next_poll_past_window(created, now, unit),
        }
    }
}

/// The observations the schedule of `kind` is computed from: its own most recent ones
/// or, while it has fewer than `MIN_HISTORY`, the most recent of every type together. A
/// report type new to the account starts from the account's other reports (the same
/// provider, queue and machines make them) instead of the fixed schedule, and goes by
/// its own as soon as it has enough.
pub async fn history(pool: &Db, kind: ReportType) -> Result<Vec<Observation>, sqlx::Error> {
    let mut rows = queue::recent_generation_times(pool, kind, HISTORY as i64).await?;
    if rows.len() < MIN_HISTORY {
        rows = queue::recent_generation_times_of_every_type(pool, HISTORY as i64).await?;
    }
    Ok(rows
        .into_iter()
        .map(|(lower, upper, waiting_secs, queue_num)| Observation {
            lower: lower as f64,
            upper: upper as f64,
            waiting: waiting_secs.map(|at| Waiting {
                at: at as f64,
                queue_num: queue_num.unwrap_or(0).into(),
            }),
        })
        .collect())
}
