//! An account, as every process shares it through the database: its call pacing (the
//! QPS, spaced evenly across processes) and its stop (balance, quota, credentials…),
//! with the probe that ends a stop; and, for this process, its client (credentials and
//! token), daily create limit and weight among several accounts.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::queue::Db;
use backon::Retryable;
use tokio::time::Instant;

use super::metrics::Metrics;
use super::policy::stop_probe_delay;
use super::{AccountSetup, DailyLimit};
use crate::domain::StopScope;
use crate::queue::{self, AccountStop, ClaimKinds};
use crate::upstream::{Client, Pacer, UpstreamError};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;

/// Calls are spaced slightly wider than 1/QPS so that network jitter between processes
/// does not push two calls into the same provider window.
const PACING_MARGIN: f64 = 1.02;

/// How stale the claim loop's view of the account stop may be. Calls already in flight
/// when a stop begins meet it themselves, so this only delays the next claims a little.
const STOP_READ_EVERY: Duration = Duration::from_millis(250);

/// How stale a process's knowledge of whether the account has a known balance may be:
/// a `report_set_balance` on an account that had none takes effect within this long.
const BALANCE_READ_EVERY: Duration = Duration::from_secs(5);

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
    pool: Db,
    /// The client id: the key of the account's pacing and stop rows.
    name: String,
    /// The provider's API, signed in as this account.
    pub(super) client: Client,
    /// `UPSTREAM_DAILY_LIMIT` (or the account's `daily_limit`), if any.
    pub(super) daily_limit: Option<DailyLimit>,
    /// Its share of new creates among several accounts.
    pub(super) weight: f64,
    /// The account's shared call schedule.
    pacing: Pacing,
    /// Pause before the first probe of a stopped account (then doubling, capped).
    probe_base: Duration,
    /// The stop as last read, and when: a busy claim loop reads it at most every
    /// `STOP_READ_EVERY` instead of once per claim. A std mutex, never held across an
    /// await; cleared whenever this process records or lifts a stop.
    stop_seen: Mutex<Option<(Instant, Option<AccountStop>)>>,
    /// Whether a balance is known for the account (`report_set_balance`), as last read:
    /// without one, creates skip the balance statement altogether.
    balance_seen: Mutex<Option<(Instant, bool)>>,
}

impl Account {
    pub(super) fn new(pool: Db, setup: AccountSetup, probe_base: Duration) -> Account {
        let pacing = Pacing {
            pool: pool.clone(),
            name: setup.name.clone(),
            qps: setup.qps,
        };
        // The client's own calls (token fetches, retries) take their slot too.
        setup.client.set_pacer(Arc::new(pacing.clone()));
        Account {
            pacing,
            pool,
            name: setup.name,
            client: setup.client,
            daily_limit: setup.daily_limit,
            weight: if setup.weight > 0.0 && setup.weight.is_finite() {
                setup.weight
            } else {
                1.0
            },
            probe_base,
            stop_seen: Mutex::new(None),
            balance_seen: Mutex::new(None),
        }
    }

    /// What this account may spend, as the worker publishes it in `report_workers`
    /// (`account_limits`) for the batch forecast: its QPS (0 = none), daily limit and
    /// headroom.
    pub(super) fn limits(&self) -> serde_json::Value {
        serde_json::json!({
            "qps": if self.pacing.qps.is_finite() { self.pacing.qps.max(0.0) } else { 0.0 },
            "daily_limit": self.daily_limit.map(|d| d.limit),
            "headroom": self.daily_limit.map(|d| d.headroom),
        })
    }

    /// Whether creates must take from a known balance, read at most every
    /// `BALANCE_READ_EVERY`; when it cannot be read, yes (the statement that takes
    /// tells the truth).
    pub(super) async fn balance_known(&self) -> bool {
        let seen = *self.balance_seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, known)) = seen
            && at.elapsed() < BALANCE_READ_EVERY
        {
            return known;
        }
        let known = queue::balance_known(&self.pool, &self.name)
            .await
            .unwrap_or(true);
        *self.balance_seen.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), known));
        known
    }

    /// Whether the account may create now, as far as its stop says (read at most every
    /// `STOP_READ_EVERY`); an unreadable stop counts as none (the create's own answer
    /// will tell).
    pub(super) async fn may_create(&self) -> bool {
        !matches!(self.stop().await, Ok(Some(_)))
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

    pub(super) fn forget_stop(&self) {
        *self.seen() = None;
    }

    /// Records a stop for every process, with the row and answer that caused it.
    /// `on_create` says whether a create met it: a stop met on any other call stops every
    /// call.
    pub(super) async fn record_stop(
        &self,
        stop: &UpstreamError,
        on_create: bool,
        cause: queue::StopCause<'_>,
    ) {
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
        tracing::warn!(account = %self.name, code, %reason, until = until.map(tracing::field::display), %scope, "account-wide stop");
        let recorded = (|| {
            queue::record_stop(
                &self.pool,
                &self.name,
                scope,
                *code,
                reason,
                *until,
                self.probe_base,
                Some(cause.clone()),
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

    /// How many other rows lost their task to an answer with `code` in the last ten
    /// minutes (`None` when the database cannot tell now).
    pub(super) async fn others_lost_to(&self, code: i32) -> Option<i64> {
        queue::rows_lost_to(&self.pool, code, Duration::from_secs(600))
            .await
            .ok()
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
    /// here a few times: a rate limit is never the row's fault. An HTTP 429 or a
    /// `Retry-After` moves every process's schedule back by what it asks.
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
            metrics.call(&self.name, endpoint, outcome(&r));
            match r {
                Err(UpstreamError::RateLimited { .. }) if limited < 3 => {
                    limited += 1;
                    self.slow_down(None).await;
                }
                Err(ref e) => {
                    if let Some(pause) = asks_to_slow_down(e) {
                        self.slow_down(Some(pause)).await;
                    }
                    return r;
                }
                ok => return ok,
            }
        }
    }

    /// The provider said "too fast" (67200002, HTTP 429, `Retry-After`): every
    /// process's next slot moves back (1 s unless the answer named a pause).
    pub(super) async fn slow_down(&self, pause: Option<Duration>) {
        let pause = pause.unwrap_or(Duration::from_secs(1));
        let _ = queue::slow_down(&self.pool, &self.name, pause).await;
    }

    /// Waits for the account's next call slot (shared by every process).
    pub(super) async fn wait_for_slot(&self) -> Result<(), UpstreamError> {
        self.pacing.wait_for_slot().await
    }
}

/// The pause an answer asks for: its `Retry-After`, or 1 s for an HTTP 429 without one.
/// Capped at a minute: one odd header must not stall the account for long.
pub(super) fn asks_to_slow_down(e: &UpstreamError) -> Option<Duration> {
    match e {
        UpstreamError::Transient {
            retry_after: Some(d),
            ..
        } => Some((*d).min(Duration::from_secs(60))),
        UpstreamError::Transient {
            code: Some(429), ..
        } => Some(Duration::from_secs(1)),
        _ => None,
    }
}

/// The account's shared call schedule: each call reserves the next slot in
/// `report_account_pacing`, spaced 1/QPS (+2 %) apart across every process.
#[derive(Clone)]
pub(super) struct Pacing {
    pool: Db,
    name: String,
    /// Calls per second for the whole account; 0 turns pacing off.
    qps: f64,
}

impl Pacing {
    async fn wait_for_slot(&self) -> Result<(), UpstreamError> {
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

/// The client's own calls (token fetches, retries after a refused token) take their
/// slot like every other call; if the schedule cannot be read, they go unpaced rather
/// than not at all.
impl Pacer for Pacing {
    fn wait(&self) -> BoxFuture<'_, ()> {
        async move {
            let _ = self.wait_for_slot().await;
        }
        .boxed()
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
        Err(UpstreamError::BadDownload { .. }) => "bad_download",
    }
}
