//! The engine behind `report-worker run`: claims due rows, drives each through
//! create → poll → download → store under a lease, and writes every outcome fenced by
//! that lease.
//!
//! - this file: the worker's configuration and the claim loop (concurrency, idle naps,
//!   shutdown);
//! - `row`: one row's life, as one type whose methods read top to bottom;
//! - `account`: the account shared with every process (call pacing, stops, probes);
//! - `leases`: the rows this process holds; `background`: heartbeat and LISTEN;
//! - `writer`: the batched outcome writes; `policy`: the pure schedules;
//! - `retention`: removing old history (the `purge` command, and a schedule in `run`);
//! - `webhooks`: delivering the signed webhooks of finished rows, beside the claim loop;
//! - `metrics`: Prometheus counters and the `/metrics` + `/healthz` endpoints.
//!
//! SQL lives in `queue`, HTTP and the meaning of the provider's answers in `upstream`.
//! Nothing holds a slot, a connection or a transaction while a task generates: a
//! generating row is only a timestamp (`next_poll_at`) until its poll falls due.

mod account;
mod background;
mod create;
mod learning;
pub use learning::history as learning_history;
mod leases;
pub mod metrics;
pub mod policy;
mod recent;
pub mod retention;
mod row;
pub mod schedule;
pub mod webhooks;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use crate::queue::Db;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use self::account::Account;
use self::leases::Leases;
use self::metrics::Metrics;
use self::policy::{PollPolicy, RetryPolicy};
use self::row::RowTask;
use self::writer::Writer;
use crate::queue;
use crate::store::DocumentStore;
use crate::upstream::Client;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// This process's name in `lease_owner` (host:pid by default).
    pub owner: String,
    /// The account (client id) whose QPS, stop and pacing this worker shares, with
    /// `Worker::new` (`Worker::with_accounts` takes each account's own).
    pub account: String,
    /// Upstream calls in flight in this process.
    pub concurrency: usize,
    /// Calls per second for the whole account (with `Worker::new`); 0 turns pacing off.
    pub qps: f64,
    /// How long a claim lasts without a heartbeat; a killed worker's rows come back
    /// after at most this long.
    pub lease: Duration,
    /// Fallback poll of the table when no NOTIFY arrives.
    pub idle_poll: Duration,
    /// How long creates already on the wire may take to be answered and recorded after
    /// SIGINT/SIGTERM (everything else stops at once). At least the HTTP timeout, or a
    /// create could be abandoned mid-flight.
    pub shutdown_timeout: Duration,
    /// Pause before the first probe of a stopped account (then doubling, capped).
    pub stop_probe_base: Duration,
    /// Unusable downloads of one task before it is given up (a new task is an attempt).
    pub download_tries: u32,
    pub poll: PollPolicy,
    pub retry: RetryPolicy,
    /// Scheduled retention (off unless `RETENTION_FINISHED` or `RETENTION_EVENTS`).
    pub retention: retention::Retention,
    /// Where documents' bytes go (PostgreSQL unless `DOCUMENT_STORE` says otherwise).
    pub documents: DocumentStore,
    /// Webhook delivery (off unless `WEBHOOK_SECRET` is set: nothing is sent unsigned).
    pub webhooks: Option<webhooks::Webhooks>,
    /// `UPSTREAM_DAILY_LIMIT`: creates per day (Asia/Shanghai) for the account (with
    /// `Worker::new`), with the last `headroom` of them kept for rows already paid for
    /// (retries).
    pub daily_limit: Option<DailyLimit>,
    /// `REPORT_REUSE_WITHIN`: a row is served from a document stored for the same
    /// identifier and type within this long (a row's `reuse_within` overrides it).
    pub reuse_within: Option<Duration>,
    /// Learned polling's median detection delay (`REPORT_DETECTION_TARGET`); `None`
    /// keeps the fixed schedule of `poll`.
    pub detection_target: Option<Duration>,
    /// Where LISTEN happens (inserts wake idle workers at once; without it they find
    /// new rows by polling every `idle_poll`).
    pub listen: Listen,
    /// How often the job ids this process wrote lately are checked against the
    /// database (a failover may have lost them; see `recent`).
    pub recheck_every: Duration,
    /// Whether claims give rows their trace context (`trace_context`): on when this
    /// process exports traces (`crate::telemetry`).
    pub trace_rows: bool,
}

/// Where a worker LISTENs for new rows and webhook deliveries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// On a connection of the worker's own pool (a session: PostgreSQL itself).
    Pool,
    /// On a session of its own to this URL (`LISTEN_DATABASE_URL`): the database
    /// directly, when the pool goes through a transaction pooler.
    Url(String),
    /// Nowhere: behind a transaction pooler with no direct URL, idle workers poll.
    Off,
}

impl WorkerConfig {
    pub fn new(account: impl Into<String>) -> WorkerConfig {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        WorkerConfig {
            owner: format!("{host}:{}", std::process::id()),
            account: account.into(),
            concurrency: 16,
            qps: 5.0,
            lease: Duration::from_secs(45),
            idle_poll: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(45),
            stop_probe_base: Duration::from_secs(30),
            download_tries: 3,
            poll: PollPolicy::default(),
            retry: RetryPolicy::default(),
            retention: retention::Retention::default(),
            documents: DocumentStore::Postgres,
            webhooks: None,
            detection_target: None,
            daily_limit: None,
            reuse_within: None,
            listen: Listen::Pool,
            recheck_every: recent::RECHECK_EVERY,
            trace_rows: crate::telemetry::enabled(),
        }
    }
}

/// The account's daily create limit, and the share of it kept for retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DailyLimit {
    pub limit: i64,
    pub headroom: i64,
}

/// One account the worker creates and polls with: its client (credentials), the QPS
/// its processes share, its daily create limit and its weight among several accounts
/// (its share of new creates).
#[derive(Clone)]
pub struct AccountSetup {
    pub name: String,
    pub client: Client,
    pub qps: f64,
    pub daily_limit: Option<DailyLimit>,
    pub weight: f64,
}

/// What a claimed row is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// A create, made with an account chosen when it is made.
    Create,
    /// A poll (and download) of a task of this account.
    Poll(usize),
    /// The probe of this stopped account: whatever the row needs, with this account.
    Probe(usize),
}

/// The shortest idle nap: an idle process asks the database at most ten times a second
/// for the next due poll, whatever the queue looks like.
const IDLE_NAP_FLOOR: Duration = Duration::from_millis(100);

/// Connections a worker process needs: its claim loop, LISTEN, heartbeat and the
/// batched writers, plus room for the per-call statements (pacing, rare writes). Writes
/// are batched, so a few dozen connections serve hundreds of calls in flight.
pub fn pool_size(concurrency: usize) -> u32 {
    (concurrency.min(37) + 4) as u32
}

/// What the claim loop and every row task share.
pub(crate) struct Shared {
    pool: Db,
    config: WorkerConfig,
    metrics: Arc<Metrics>,
    /// The frequent outcome writes, batched across rows.
    writer: Writer,
    /// The accounts, the first being the one that polls tasks created before accounts
    /// were recorded on rows. Never empty.
    accounts: Vec<Account>,
    /// Smooth weighted round robin over the accounts for new creates (one running
    /// score per account; a std mutex, never held across an await).
    turns: std::sync::Mutex<Vec<f64>>,
    /// Rows this process holds: what the heartbeat extends and shutdown releases.
    leases: Arc<Leases>,
    /// Wakes the claim loop: a NOTIFY arrived (or the listener reconnected).
    wake: Notify,
    /// Wakes the webhook sender: deliveries were created.
    webhook_wake: Notify,
    /// The poll schedule learned from observed generation times.
    learning: learning::Learning,
    /// Job ids written lately, checked again in case a failover lost them.
    recent: recent::Recent,
}

pub struct Worker {
    shared: Arc<Shared>,
}

impl Worker {
    pub fn new(pool: Db, client: Client, config: WorkerConfig, metrics: Arc<Metrics>) -> Worker {
        let account = AccountSetup {
            name: config.account.clone(),
            client,
            qps: config.qps,
            daily_limit: config.daily_limit,
            weight: 1.0,
        };
        Worker::with_accounts(pool, vec![account], config, metrics)
    }

    /// A worker that pools several accounts (`UPSTREAM_ACCOUNTS`): each create goes to
    /// an account that may create (by weight), each poll and download to the account
    /// that created the task; pacing, stops and daily limits stay per account.
    ///
    /// # Panics
    /// With no account.
    pub fn with_accounts(
        pool: Db,
        accounts: Vec<AccountSetup>,
        config: WorkerConfig,
        metrics: Arc<Metrics>,
    ) -> Worker {
        assert!(!accounts.is_empty(), "a worker needs an account");
        let accounts: Vec<Account> = accounts
            .into_iter()
            .map(|setup| Account::new(pool.clone(), setup, config.stop_probe_base))
            .collect();
        let mut config = config;
        if config.listen == Listen::Pool && pool.mode() == queue::PoolMode::Transaction {
            // LISTEN on a pooled connection hears nothing once the pooler hands the
            // session to another client: poll instead (see `Listen::Off`).
            config.listen = Listen::Off;
        }
        let learning = learning::Learning::new(config.detection_target, config.poll.clone());
        Worker {
            shared: Arc::new(Shared {
                writer: Writer::start(pool.clone()),
                pool,
                config,
                metrics,
                turns: std::sync::Mutex::new(vec![0.0; accounts.len()]),
                accounts,
                leases: Arc::new(Leases::default()),
                wake: Notify::new(),
                webhook_wake: Notify::new(),
                learning,
                recent: recent::Recent::default(),
            }),
        }
    }

    /// Works the queue until `cancel`, then stops claiming, lets in-flight rows finish
    /// for up to `shutdown_timeout`, and releases every row it still holds.
    pub async fn run(self, cancel: CancellationToken) {
        let shared = self.shared;
        let background = CancellationToken::new();
        let helpers = [
            tokio::spawn(background::listen(shared.clone(), background.clone())),
            tokio::spawn(background::heartbeat(shared.clone(), background.clone())),
            tokio::spawn(retention::scheduled(shared.clone(), background.clone())),
            tokio::spawn(webhooks::deliver(shared.clone(), background.clone())),
            tokio::spawn(background::flush_calls(shared.clone(), background.clone())),
            tokio::spawn(recent::periodically(shared.clone(), background.clone())),
        ];
        let slots = Arc::new(Semaphore::new(shared.config.concurrency.max(1)));
        let mut tasks = JoinSet::new();
        let mut db_failures = 0u32;
        let accounts: Vec<&str> = shared.accounts.iter().map(|a| a.name()).collect();
        tracing::info!(owner = %shared.config.owner, concurrency = shared.config.concurrency, ?accounts, "worker started");
        if shared.config.listen == Listen::Off {
            tracing::warn!(
                idle_poll = %humantime::format_duration(shared.config.idle_poll),
                "no LISTEN (DATABASE_POOL_MODE=transaction and no LISTEN_DATABASE_URL): idle workers find new rows by polling every WORKER_IDLE_POLL, so a new row may wait that long to be picked up; set LISTEN_DATABASE_URL to a direct connection for pickup at once"
            );
        }

        while !cancel.is_cancelled() {
            while tasks.try_join_next().is_some() {}
            shared.release_stray().await;
            shared.metrics.set_held(shared.leases.len());
            let free = slots.available_permits();
            if free == 0 {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tasks.join_next() => continue,
                }
            }
            // Whether this claim could take polls (an account stop of scope `all` forbids
            // them): an idle nap does not wake for polls it may not make.
            // After the database failed, first make sure it still knows the tasks this
            // process created lately (a failover may have lost their commits), before
            // a row is claimed and perhaps bought again.
            let round = async {
                if db_failures > 0 || shared.recent.suspected() {
                    match shared.recent.recheck(&shared).await {
                        Ok(_) => {}
                        Err(e) if queue::is_retryable(&e) => return Err(e),
                        // Not "not now": claiming goes on; the next check tries again.
                        Err(e) => {
                            tracing::error!(error = %e, "could not hand back a lost job id")
                        }
                    }
                }
                shared.claim_round(free).await
            };
            let (rows, polls_allowed) = match round.await {
                Ok(claimed) => {
                    db_failures = 0;
                    claimed
                }
                Err(e) => {
                    db_failures += 1;
                    let pause = Duration::from_millis(200)
                        .saturating_mul(1 << db_failures.min(7))
                        .min(Duration::from_secs(15));
                    tracing::warn!(error = %e, pause = %humantime::format_duration(pause), "claiming failed; the database may be restarting");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(pause) => continue,
                    }
                }
            };
            let got = rows.len();
            for (row, role) in rows {
                let permit = slots
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore is never closed");
                let Some((held, lease)) = shared.leases.hold(row.id, row.lease_token) else {
                    tracing::warn!(
                        id = row.id,
                        token = row.lease_token,
                        "claimed a row this process already works under the same lease token (the database lost a claim's commit): left to the task that holds it"
                    );
                    continue;
                };
                let task = RowTask::new(shared.clone(), row, role, lease, cancel.clone());
                tasks.spawn(async move {
                    if task.run().await {
                        held.finish();
                    }
                    drop(permit);
                });
            }
            if got < free {
                let nap = shared.idle_nap(polls_allowed).await;
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = shared.wake.notified() => {}
                    _ = tokio::time::sleep(nap) => {}
                    Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                }
            }
        }

        // Shutdown: no new claims. Steps that sent nothing paid stop at once and their
        // rows are handed back as they come in; creates on the wire get the grace
        // period to be answered and recorded (it is at least the HTTP timeout).
        tracing::info!(in_flight = tasks.len(), "stopping: no new claims");
        let deadline = tokio::time::Instant::now() + shared.config.shutdown_timeout;
        while !tasks.is_empty() {
            tokio::select! {
                _ = tasks.join_next() => {}
                _ = tokio::time::sleep_until(deadline) => break,
            }
            shared.release_stray().await;
        }
        if !tasks.is_empty() {
            tracing::warn!(
                left = tasks.len(),
                "grace period over: abandoning in-flight calls (a create among them stays counted as an attempt)"
            );
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        let held = shared.leases.drain();
        if !held.is_empty() {
            match queue::release(&shared.pool, &held).await {
                Ok(n) => tracing::info!(released = n, "released unfinished rows for other workers"),
                Err(e) => {
                    tracing::warn!(error = %e, "could not release rows; their leases will expire")
                }
            }
        }
        background.cancel();
        for h in helpers {
            let _ = h.await;
        }
        tracing::info!("worker stopped");
    }
}

impl Shared {
    /// One claim: what the accounts' stops allow, plus one probe row for each stopped
    /// account whose probe is due and won by this process. Each row comes with its role
    /// (a create's account is chosen when it is made); also says whether polls may be
    /// claimed at all.
    async fn claim_round(
        &self,
        free: usize,
    ) -> Result<(Vec<(queue::Claimed, Role)>, bool), sqlx::Error> {
        let (owner, lease) = (&self.config.owner, self.config.lease);
        let mut rows = Vec::new();
        let mut free = free as i64;
        let mut polls_for = Vec::new();
        let mut creates = false;
        for (i, account) in self.accounts.iter().enumerate() {
            let plan = account.plan_claim().await?;
            if plan.kinds.polls {
                polls_for.push(account.name().to_string());
            }
            // After the server changed, no new creates until every process had time
            // to hand back the job ids the change lost (see `recent`).
            creates |= plan.kinds.creates && !self.recent.creates_held();
            let Some(kinds) = plan.probe else { continue };
            let own = [account.name().to_string()];
            let probe = queue::claim_for(
                &self.pool,
                owner,
                lease,
                free.min(1),
                kinds,
                Some(self.polls(&own)),
                self.config.trace_rows,
            )
            .await?;
            free -= probe.len() as i64;
            if !probe.is_empty() {
                tracing::info!(account = account.name(), "probing the stopped account");
            }
            rows.extend(probe.into_iter().map(|r| (r, Role::Probe(i))));
        }
        let kinds = queue::ClaimKinds {
            polls: !polls_for.is_empty(),
            creates,
        };
        let claimed = queue::claim_for(
            &self.pool,
            owner,
            lease,
            free,
            kinds,
            Some(self.polls(&polls_for)),
            self.config.trace_rows,
        )
        .await?;
        rows.extend(claimed.into_iter().map(|r| {
            let role = match r.state {
                crate::domain::RequestState::Queued => Role::Create,
                _ => Role::Poll(self.account_of(&r)),
            };
            (r, role)
        }));
        Ok((rows, kinds.polls))
    }

    /// Which polls the accounts named in `names` may claim: their own tasks, and the
    /// first account also those created before accounts were recorded. A task the
    /// provider made for another account is never polled with these credentials (it
    /// would be unknown to them, and lost).
    fn polls<'a>(&self, names: &'a [String]) -> queue::PollAccounts<'a> {
        queue::PollAccounts {
            accounts: names,
            unrecorded: names.iter().any(|n| n == self.accounts[0].name()),
        }
    }

    /// The account a claimed row's task belongs to: the one recorded on the row, the
    /// first for rows from before accounts were recorded (see `polls`).
    fn account_of(&self, row: &queue::Claimed) -> usize {
        row.account
            .as_deref()
            .and_then(|name| self.accounts.iter().position(|a| a.name() == name))
            .unwrap_or(0)
    }

    /// The accounts that may take a new create now, in the order to try them: the
    /// smooth-weighted-round-robin winner first (so creates split by weight), then the
    /// others by weight. Empty when every account is stopped for creates.
    async fn create_order(&self) -> Vec<usize> {
        let mut open = Vec::new();
        for (i, account) in self.accounts.iter().enumerate() {
            if account.may_create().await {
                open.push(i);
            }
        }
        if open.len() > 1 {
            let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
            let total: f64 = open.iter().map(|&i| self.accounts[i].weight).sum();
            for &i in &open {
                turns[i] += self.accounts[i].weight;
            }
            let winner = *open
                .iter()
                .max_by(|&&a, &&b| turns[a].total_cmp(&turns[b]))
                .expect("not empty");
            turns[winner] -= total;
            open.sort_by(|&a, &b| {
                (b == winner)
                    .cmp(&(a == winner))
                    .then(self.accounts[b].weight.total_cmp(&self.accounts[a].weight))
            });
        }
        open
    }

    /// Hands back at once the rows of tasks that ended without finishing (a panic):
    /// otherwise they would wait for their lease to expire.
    async fn release_stray(&self) {
        let stray = self.leases.take_stray();
        if stray.is_empty() {
            return;
        }
        match queue::release(&self.pool, &stray).await {
            Ok(n) => tracing::warn!(released = n, "released rows whose task ended early"),
            Err(e) => {
                tracing::warn!(error = %e, "could not release rows; their leases will expire")
            }
        }
    }

    /// How long an idle claim loop may sleep: until the next poll this process could
    /// claim falls due (not one another process holds, not one a stop forbids), at most
    /// the fallback interval (a NOTIFY cuts it short), at least `IDLE_NAP_FLOOR`.
    async fn idle_nap(&self, polls_allowed: bool) -> Duration {
        let fallback = self.config.idle_poll;
        if !polls_allowed {
            return fallback;
        }
        let names: Vec<String> = self.accounts.iter().map(|a| a.name().to_string()).collect();
        match queue::next_poll_due_in(&self.pool, Some(self.polls(&names))).await {
            Ok(Some(d)) => d.min(fallback).max(IDLE_NAP_FLOOR),
            _ => fallback,
        }
    }
}
