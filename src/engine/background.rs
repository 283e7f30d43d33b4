//! The helpers that run beside the claim loop for the worker's whole life: LISTEN (an
//! insert wakes the claim loop at once, new webhook deliveries wake their sender), the
//! heartbeat (held rows keep their leases while their calls take time) and the flush of
//! provider call counts into the database.

use crate::queue::sql;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Listen, Shared};
use crate::domain::ReportType;
use crate::queue;

/// Wakes the claim loop on every NOTIFY; reconnects with backoff when the connection
/// is lost, and wakes the loop after reconnecting (an insert may have been missed).
pub(super) async fn listen(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut failures = 0u32;
    while !cancel.is_cancelled() {
        let attempt = async {
            let mut listener = match &shared.config.listen {
                Listen::Pool => PgListener::connect_with(&shared.pool).await?,
                Listen::Url(url) => PgListener::connect(url).await?,
                Listen::Off => return Ok(()),
            };
            listener.listen(queue::NOTIFY_CHANNEL).await?;
            if shared.config.webhooks.is_some() {
                listener.listen(queue::WEBHOOK_CHANNEL).await?;
            }
            // Anything inserted while we were not listening is found by this claim.
            shared.wake.notify_one();
            shared.webhook_wake.notify_one();
            loop {
                let note = listener.recv().await?;
                if note.channel() == queue::WEBHOOK_CHANNEL {
                    shared.webhook_wake.notify_one();
                } else {
                    if note.payload() == queue::PROBE_NOW {
                        // An operator asked for a stopped account to be probed now.
                        for account in &shared.accounts {
                            account.forget_stop();
                        }
                    }
                    shared.wake.notify_one();
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = attempt => match r {
                Ok(()) => return,
                Err(e) => {
                    failures += 1;
                    shared.recent.suspect();
                    tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                }
            },
        }
        let pause = Duration::from_millis(250)
            .saturating_mul(1 << failures.min(7))
            .min(Duration::from_secs(30));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Extends the lease of every held row, three times per lease period, on a connection
/// of its own (so a busy pool cannot starve it) with short `statement_timeout` and
/// `lock_timeout` (so a blocked database cannot hold it past the lease). Rows it could
/// not extend are flagged lost: their tasks stop before their next paid call.
pub(super) async fn heartbeat(shared: Arc<Shared>, cancel: CancellationToken) {
    let every = shared.config.lease / 3;
    let mut conn: Option<PgConnection> = None;
    let mut last_success = Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let held = shared.leases.snapshot();
        if held.is_empty() {
            last_success = Instant::now();
            continue;
        }
        let result = async {
            if conn.is_none() {
                conn = Some(heartbeat_connection(&shared, every).await?);
            }
            let c = conn.as_mut().expect("connected above");
            beat(c, &shared, &held, every).await
        }
        .await;
        match result {
            Ok(extended) => {
                last_success = Instant::now();
                let lost = shared.leases.mark_lost_unless(&held, &extended);
                shared.metrics.leases_lost(lost);
                if lost > 0 {
                    tracing::warn!(
                        lost,
                        "leases lost (taken over or cancelled): those rows stop before their next call"
                    );
                }
            }
            Err(e) => {
                conn = None;
                shared.recent.suspect();
                tracing::warn!(error = %e, rows = held.len(), "heartbeat failed");
                if last_success.elapsed() >= shared.config.lease {
                    tracing::warn!(
                        rows = held.len(),
                        "no heartbeat for a whole lease: every held row may be another process's now"
                    );
                    shared.leases.mark_all_lost(&held);
                    shared.metrics.leases_lost(held.len());
                }
            }
        }
    }
}

async fn heartbeat_connection(
    shared: &Shared,
    every: Duration,
) -> Result<PgConnection, sqlx::Error> {
    let options = (*shared.pool.connect_options())
        .clone()
        .application_name("report-worker heartbeat");
    tokio::time::timeout(
        every.max(Duration::from_secs(1)),
        PgConnection::connect_with(&options),
    )
    .await
    .map_err(|_| sqlx::Error::PoolTimedOut)?
}

/// One heartbeat in a transaction of its own, with short `statement_timeout` and
/// `lock_timeout` set for that transaction only (`SET LOCAL`: a transaction pooler
/// keeps nothing between transactions, and refuses them as startup options).
async fn beat(
    conn: &mut PgConnection,
    shared: &Shared,
    held: &[(i64, i64)],
    every: Duration,
) -> Result<Vec<i64>, sqlx::Error> {
    let statement_timeout = every.as_millis().max(100);
    let lock_timeout = (every / 2).as_millis().max(50);
    let mut tx = conn.begin().await?;
    sql::query(
        "SELECT set_config('statement_timeout', $1, true), set_config('lock_timeout', $2, true)",
    )
    .bind(format!("{statement_timeout}ms"))
    .bind(format!("{lock_timeout}ms"))
    .execute(&mut *tx)
    .await?;
    let extended =
        queue::heartbeat(&mut *tx, &shared.config.owner, held, shared.config.lease).await?;
    tx.commit().await?;
    Ok(extended)
}

/// How often a process adds its provider calls to `report_provider_calls`, and how long
/// minutes are kept there.
const CALLS_FLUSH_EVERY: Duration = Duration::from_secs(5);
const CALLS_KEPT: Duration = Duration::from_secs(8 * 24 * 3600);
/// Observed generation times kept per report type.
const GENERATION_TIMES_KEPT: i64 = 1_000;

/// How often a process releases the rows no running worker can poll.
const RELEASE_UNPOLLED_EVERY: Duration = Duration::from_secs(60);

/// Adds this process's provider calls to the shared per-minute counts every few seconds
/// (and once more at shutdown), and says which accounts it polls with
/// (`report_workers`); once a minute releases generating rows no running worker has
/// polled for `REPORT_GIVE_UP_AFTER`; once an hour removes minutes older than a week and
/// all but the newest observed generation times. A failed write keeps the counts for
/// the next one.
pub(super) async fn flush_calls(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut last_prune: Option<Instant> = None;
    let mut last_release = Instant::now();
    let names: Vec<String> = shared
        .accounts
        .iter()
        .map(|a| a.name().to_string())
        .collect();
    let owner = &shared.config.owner;
    let limits = serde_json::Value::Object(
        shared
            .accounts
            .iter()
            .map(|a| (a.name().to_string(), a.limits()))
            .collect(),
    );
    loop {
        let trouble: serde_json::Map<String, serde_json::Value> = shared
            .accounts
            .iter()
            .filter_map(|a| {
                let u = a.client.unanswered()?;
                let value = serde_json::json!({
                    "since": u.since.to_rfc3339(), "calls": u.calls, "error": u.error,
                });
                Some((a.name().to_string(), value))
            })
            .collect();
        let trouble = serde_json::Value::Object(trouble);
        if let Err(e) =
            queue::worker_seen(&shared.pool, owner, &names, true, &trouble, &limits).await
        {
            tracing::warn!(error = %e, "could not record this worker in report_workers");
        }
        let release_every = RELEASE_UNPOLLED_EVERY.min(shared.config.poll.give_up_after / 2);
        if last_release.elapsed() >= release_every {
            last_release = Instant::now();
            let give_up = shared.config.poll.give_up_after;
            match queue::release_unpolled(&shared.pool, give_up).await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    rows = n,
                    "released generating rows no running worker polls (their account is in no worker's configuration): their tasks are kept in report_orphan_tasks"
                ),
                Err(e) => tracing::warn!(error = %e, "could not release unpolled rows"),
            }
        }
        let stopping = tokio::select! {
            _ = cancel.cancelled() => true,
            _ = tokio::time::sleep(CALLS_FLUSH_EVERY) => false,
        };
        for (account, tallies) in shared.metrics.take_calls() {
            if let Err(e) = queue::record_calls(&shared.pool, &account, &tallies).await {
                tracing::warn!(error = %e, "could not record provider calls; kept for the next write");
                shared.metrics.untake_calls(&account, tallies);
            }
        }
        if last_prune.is_none_or(|at| at.elapsed() > Duration::from_secs(3600)) {
            last_prune = Some(Instant::now());
            if let Err(e) = queue::forget_calls_before(&shared.pool, CALLS_KEPT).await {
                tracing::warn!(error = %e, "could not remove old provider call counts");
            }
            // Observed generation times: learned polling reads the newest few hundred.
            for kind in [ReportType::Pdf, ReportType::Word] {
                if let Err(e) =
                    queue::forget_old_generation_times(&shared.pool, kind, GENERATION_TIMES_KEPT)
                        .await
                {
                    tracing::warn!(error = %e, "could not remove old generation times");
                }
            }
        }
        if stopping {
            if let Err(e) = queue::worker_gone(&shared.pool, owner).await {
                tracing::warn!(error = %e, "could not remove this worker from report_workers");
            }
            return;
        }
    }
}
