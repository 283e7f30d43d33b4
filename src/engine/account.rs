//! The account, as every process shares it through the database: its call pacing (the
//! QPS, spaced evenly across processes) and its stop (balance, quota, credentials…),
//! with the probe that ends a stop.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use backon::Retryable;
use sqlx::PgPool;
use tokio::time::Instant;

use super::metrics::Metrics;
use super::policy::stop_probe_delay;
use crate::domain::StopScope;
use crate::queue::{self, AccountStop, ClaimKinds};
use crate::upstream::UpstreamError;

/// Calls are spaced slightly wider than 1/QPS so that network jitter between processes
/// does not push two calls into the same provider window.
const PACING_MARGIN: f64 = 1.02;

/// How stale the claim loop's view of the account stop may be. Calls already in flight
/// when a stop begins meet it themselves, so this only delays the next claims a little.
const STOP_READ_EVERY: Duration = Duration::from_millis(250);

/// What the claim loop may take now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ClaimPlan {
    /// The kinds of work the account's stop (if any) allows.
    pub kinds: ClaimKinds,
    /// Set when this process won the right to probe a stopped account: one row of
    /// these kinds is claimed as the probe.
    pub probe: Option<ClaimKinds>,
}

pub(super) struct Account {
    pool: PgPool,
    /// The client id: the key of the account's pacing and stop rows.
    name: String,
    /// Calls per second for the whole account; 0 turns pacing off.
    qps: f64,
    /// Pause before the first probe of a stopped account (then doubling, capped).
    probe_base: Duration,
    /// The stop as last read, and when: a busy claim loop reads it at most every
    /// `STOP_READ_EVERY` instead of once per claim. A std mutex, never held across an
    /// await; cleared whenever this process records or lifts a stop.
    stop_seen: Mutex<Option<(Instant, Option<AccountStop>)>>,
}

impl Account {
    pub(super) fn new(pool: PgPool, name: String, qps: f64, probe_base: Duration) -> Account {
        Account {
            pool,
            name,
            qps,
            probe_base,
            stop_seen: Mutex::new(None),
        }
    }

    pub(super) fn name(&self) -> &str {
        &self.name
    }

    /// What a claim may take: everything, or what the stop allows plus a probe when
    /// one is due and this process wins it.
    pub(super) async fn plan_claim(&self) -> Result<ClaimPlan, sqlx::Error> {
        let Some(stop) = self.stop().await? else {
            return Ok(ClaimPlan {
                kinds: ClaimKinds::ALL,
                probe: None,
            });
        };
        let (kinds, probe_kinds) = match stop.scope {
            StopScope::Create => (ClaimKinds::POLLS, ClaimKinds::CREATES),
            StopScope::All => (ClaimKinds::NONE, ClaimKinds::ALL),
        };
        let won = stop.probe_due
            && queue::claim_probe(
                &self.pool,
                &self.name,
                stop.probes,
                stop_probe_delay(self.probe_base, stop.probes + 1),
            )
            .await?;
        Ok(ClaimPlan {
            kinds,
            probe: won.then_some(probe_kinds),
        })
    }

    /// The account's stop, read at most every `STOP_READ_EVERY`.
    async fn stop(&self) -> Result<Option<AccountStop>, sqlx::Error> {
        if let Some((at, stop)) = self.seen().as_ref()
            && at.elapsed() < STOP_READ_EVERY
        {
            return Ok(stop.clone());
        }
        let stop = queue::read_stop(&self.pool, &self.name).await?;
        *self.seen() = Some((Instant::now(), stop.clone()));
        Ok(stop)
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Option<(Instant, Option<AccountStop>)>> {
        self.stop_seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn forget_stop(&self) {
        *self.seen() = None;
    }

    /// Records a stop for every process. `on_create` says whether a create met it: a
    /// stop met on any other call stops every call.
    pub(super) async fn record_stop(&self, stop: &UpstreamError, on_create: bool) {
        let UpstreamError::AccountStop {
            code,
            reason,
            until,
            scope,
        } = stop
        else {
            return;
        };
        let scope = if on_create { *scope } else { StopScope::All };
        tracing::warn!(account = %self.name, code, %reason, ?until, %scope, "account-wide stop");
        let recorded = (|| {
            queue::record_stop(
                &self.pool,
                &self.name,
                scope,
                *code,
                reason,
                *until,
                self.probe_base,
            )
        })
        .retry(queue::backoff())
        .when(queue::is_retryable)
        .await;
        if let Err(e) = recorded {
            tracing::error!(error = %e, "could not record the account stop");
        }
        self.forget_stop();
    }

    /// A probe was answered normally: the stop is over, for every process.
    pub(super) async fn clear_stop(&self) {
        self.forget_stop();
        match queue::clear_stop(&self.pool, &self.name).await {
            Ok(true) => {
                tracing::info!(account = %self.name, "the provider answers normally again: account stop cleared")
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "could not clear the account stop"),
        }
    }

    /// Waits for the account's next call slot (shared by every process through the
    /// database), then calls. "Too fast" answers slow everyone down and are retried
    /// here a few times: a rate limit is never the row's fault.
    pub(super) async fn paced<T, F, Fut>(
        &self,
        metrics: &Metrics,
        endpoint: &'static str,
        call: F,
    ) -> Result<T, UpstreamError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        let mut limited = 0;
        loop {
            self.wait_for_slot().await?;
            let r = call().await;
            metrics.call(endpoint, outcome(&r));
            match r {
                Err(UpstreamError::RateLimited { .. }) if limited < 3 => {
                    limited += 1;
                    self.slow_down().await;
                }
                other => return other,
            }
        }
    }

    /// The provider said "too fast" (67200002): every process's next slot moves back.
    pub(super) async fn slow_down(&self) {
        let _ = queue::slow_down(&self.pool, &self.name, Duration::from_secs(1)).await;
    }

    /// Waits for the account's next call slot (shared by every process).
    pub(super) async fn wait_for_slot(&self) -> Result<(), UpstreamError> {
        if self.qps <= 0.0 {
            return Ok(());
        }
        let spacing = Duration::from_secs_f64(PACING_MARGIN / self.qps);
        let wait = (|| queue::reserve_call_slot(&self.pool, &self.name, spacing))
            .retry(queue::backoff())
            .when(queue::is_retryable)
            .await
            .map_err(|e| UpstreamError::transient(format!("cannot reserve a call slot: {e}")))?;
        tokio::time::sleep(wait).await;
        Ok(())
    }
}

/// How metrics name a call's result.
pub(super) fn outcome<T>(r: &Result<T, UpstreamError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(UpstreamError::Rejected { .. }) => "rejected",
        Err(UpstreamError::Transient { .. }) => "transient",
        Err(UpstreamError::RateLimited { .. }) => "rate_limited",
        Err(UpstreamError::Unauthorized { .. }) => "unauthorized",
        Err(UpstreamError::BadCredentials { .. }) => "bad_credentials",
        Err(UpstreamError::AccountStop { .. }) => "account_stop",
    }
}
