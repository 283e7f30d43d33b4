//! Retention: finished requests (with their documents and events), or only their
//! documents, removed once older than a cutoff; old events likewise. Run by
//! `report-worker purge`, or on a schedule inside `run` by one process at a time (the
//! holder of its row in `report_schedules`). Small batches, each its own short transaction, never waiting on a
//! row another transaction holds, with pauses between them (BENCHMARKS.md measures
//! what live work notices).

use std::time::Duration;

use crate::queue::Db;
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::queue::{self, PurgeScope};
use crate::store::DocumentStore;

/// Rows per batch: small enough that a batch is a few milliseconds.
pub const PURGE_BATCH: i64 = 500;

/// How hard a purge works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// After each batch, pause twice as long as the batch took: the purge uses at most a
    /// third of one database backend, and live work keeps the rest (the default).
    Gentle,
    /// Batch after batch (a maintenance window).
    Full,
}

/// What a purge removed (or, dry, would remove).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurgeReport {
    pub requests: u64,
    pub documents: u64,
    pub events: u64,
    pub batches: u64,
}

/// Removes what `scope` (and `events_before`, when set) covers, reporting progress
/// after each batch; stops early, with what was done, when `cancel` fires.
#[allow(clippy::too_many_arguments)]
pub async fn purge(
    pool: &Db,
    store: &DocumentStore,
    scope: Option<&PurgeScope>,
    events_before: Option<DateTime<Utc>>,
    pace: Pace,
    cancel: &CancellationToken,
    mut progress: impl FnMut(&PurgeReport),
) -> Result<PurgeReport, sqlx::Error> {
    let mut report = PurgeReport::default();
    let breathe = |took: std::time::Duration| async move {
        if pace == Pace::Gentle {
            tokio::time::sleep(took * 2).await;
        }
    };
    if let Some(scope) = scope
        && let Some(mut cursor) = queue::purge_start(pool, scope).await?
    {
        while !cancel.is_cancelled() {
            let started = tokio::time::Instant::now();
            let Some(batch) = queue::purge_batch(pool, scope, &mut cursor, PURGE_BATCH).await?
            else {
                break;
            };
            report.requests += batch.requests;
            report.documents += batch.documents;
            // The rows are gone; their objects go after (at worst an object stays behind,
            // never a row without its object).
            if let Err(e) = store.delete(&batch.object_keys).await {
                tracing::warn!(error = %e, objects = batch.object_keys.len(), "could not delete purged documents' objects");
            }
            report.batches += 1;
            progress(&report);
            breathe(started.elapsed()).await;
        }
    }
    if let Some(before) = events_before
        && let Some(mut cursor) = queue::events_purge_start(pool, before).await?
    {
        while !cancel.is_cancelled() {
            let started = tokio::time::Instant::now();
            let Some(n) = queue::purge_events_batch(pool, &mut cursor, before, PURGE_BATCH).await?
            else {
                break;
            };
            report.events += n;
            report.batches += 1;
            progress(&report);
            breathe(started.elapsed()).await;
        }
    }
    Ok(report)
}

/// What a purge would remove, without removing it.
pub async fn purge_dry_run(pool: &Db, scope: &PurgeScope) -> Result<PurgeReport, sqlx::Error> {
    let (requests, documents) = queue::purge_count(pool, scope).await?;
    Ok(PurgeReport {
        requests,
        documents,
        ..Default::default()
    })
}

/// Retention inside `run`: every `RETENTION_EVERY`, the process that takes the schedule
/// (`report_schedules`) purges what `RETENTION_FINISHED` / `RETENTION_EVENTS` say, and prunes old
/// throughput buckets (which every process may do).
pub(super) async fn scheduled(shared: std::sync::Arc<Shared>, cancel: CancellationToken) {
    let every = shared.config.retention.every;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(e) = queue::prune_throughput(&shared.pool).await {
            tracing::warn!(error = %e, "could not prune throughput buckets");
        }
        let retention = &shared.config.retention;
        if retention.finished.is_none() && retention.events.is_none() {
            continue;
        }
        match run_once(&shared, &cancel).await {
            Ok(Some(report)) => tracing::info!(
                requests = report.requests,
                documents = report.documents,
                events = report.events,
                "retention: purged"
            ),
            Ok(None) => tracing::debug!("retention: another process holds the lock"),
            Err(e) => tracing::warn!(error = %e, "retention failed; trying again next time"),
        }
    }
}

/// One scheduled purge, holding the schedule (`None`: another process has it).
async fn run_once(
    shared: &Shared,
    cancel: &CancellationToken,
) -> Result<Option<PurgeReport>, sqlx::Error> {
    // Held for the schedule's period at least: a purge that takes longer may meet a
    // second one, which is safe (batches skip rows another transaction holds).
    let hold = shared.config.retention.every.max(Duration::from_secs(600));
    let owner = &shared.config.owner;
    if !queue::take_schedule(&shared.pool, queue::RETENTION_JOB, owner, hold).await? {
        return Ok(None);
    }
    let retention = &shared.config.retention;
    let now = Utc::now();
    let ago = |d: Duration| now - chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
    let scope = retention.finished.map(|d| PurgeScope {
        finished_before: ago(d),
        documents_only: retention.documents_only,
    });
    let result = purge(
        &shared.pool,
        &shared.config.documents,
        scope.as_ref(),
        retention.events.map(ago),
        Pace::Gentle,
        cancel,
        |_| {},
    )
    .await;
    if let Err(e) = queue::release_schedule(&shared.pool, queue::RETENTION_JOB, owner).await {
        tracing::warn!(error = %e, "could not give back the retention schedule; it lapses by itself");
    }
    result.map(Some)
}

/// Retention settings of `run`.
#[derive(Debug, Clone, PartialEq)]
pub struct Retention {
    /// Finished requests older than this are removed (none when unset).
    pub finished: Option<Duration>,
    /// Only their documents are removed, the requests and events kept.
    pub documents_only: bool,
    /// Events older than this are removed (none when unset).
    pub events: Option<Duration>,
    /// How often the schedule runs.
    pub every: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            finished: None,
            documents_only: false,
            events: None,
            every: Duration::from_secs(3600),
        }
    }
}
