//! The engine behind `report-worker run`: claims due rows, drives each through
//! create → poll → download under a lease, and writes every outcome fenced by that
//! lease. It owns concurrency, the shared call pacing, account stops, heartbeats and
//! shutdown; the SQL is in `queue`, the schedules in `policy`, HTTP in `upstream`.
//!
//! Nothing holds a slot, a connection or a transaction while a task generates: a
//! generating row is only a timestamp (`next_poll_at`) until its poll falls due.

pub mod metrics;
pub mod policy;
pub mod writer;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::writer::Writer;
use crate::domain::{JobId, ReportType};
use crate::engine::metrics::Metrics;
use crate::engine::policy::{PollPolicy, Progress, RetryPolicy, stop_probe_delay};
use crate::queue::{self, ClaimKinds, Claimed, Completed, Created, Retry, Snoozed};
use crate::upstream::client::CreateTask;
use crate::upstream::{Client, TaskStatus, UpstreamError};

/// Calls are spaced slightly wider than 1/QPS so that network jitter between processes
/// does not push two calls into the same provider window.
const PACING_MARGIN: f64 = 1.02;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// This process's name in `lease_owner` (host:pid by default).
    pub owner: String,
    /// The account (client id) whose QPS, stop and pacing this worker shares.
    pub account: String,
    /// Upstream calls in flight in this process.
    pub concurrency: usize,
    /// Calls per second for the whole account; 0 turns pacing off.
    pub qps: f64,
    /// How long a claim lasts without a heartbeat; a killed worker's rows come back
    /// after at most this long.
    pub lease: Duration,
    /// Fallback poll of the table when no NOTIFY arrives.
    pub idle_poll: Duration,
    /// How long in-flight calls may finish after SIGINT/SIGTERM.
    pub shutdown_timeout: Duration,
    /// Pause before the first probe of a stopped account (then doubling, capped).
    pub stop_probe_base: Duration,
    pub poll: PollPolicy,
    pub retry: RetryPolicy,
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
            shutdown_timeout: Duration::from_secs(20),
            stop_probe_base: Duration::from_secs(30),
            poll: PollPolicy::default(),
            retry: RetryPolicy::default(),
        }
    }
}

/// Connections a worker process needs: its claim loop, LISTEN, heartbeat and the
/// batched writers, plus room for the per-call statements (pacing, rare writes). Writes
/// are batched, so a few dozen connections serve hundreds of calls in flight.
pub fn pool_size(concurrency: usize) -> u32 {
    (concurrency.min(37) + 3) as u32
}

/// Shared by the claim loop and every row task.
struct Ctx {
    pool: PgPool,
    client: Client,
    config: WorkerConfig,
    metrics: Arc<Metrics>,
    /// Rows this process holds, id → lease token: what the heartbeat extends and what
    /// shutdown releases. A std mutex: it is held for a map operation, never across an
    /// await.
    held: Mutex<HashMap<i64, i64>>,
    /// Wakes the claim loop: a NOTIFY arrived (or the listener reconnected).
    wake: Notify,
    /// The frequent outcome writes, batched across rows.
    writer: Writer,
    /// The account's stop as last read, and when: a busy claim loop reads it at most
    /// every `STOP_READ_EVERY` instead of once per claim. A std mutex, never held across
    /// an await; cleared whenever this process records or lifts a stop.
    stop_seen: Mutex<Option<(Instant, SeenStop)>>,
}

/// The account's stop, if any, and whether its probe is due.
type SeenStop = Option<(queue::AccountStop, bool)>;

/// How stale the claim loop's view of the account stop may be. Calls already in flight
/// when a stop begins meet it themselves, so this only delays the next claims a little.
const STOP_READ_EVERY: Duration = Duration::from_millis(250);

pub struct Worker {
    ctx: Arc<Ctx>,
}

fn unit() -> f64 {
    rand::random_range(0.0..1.0)
}

/// What a call's result says about the account stop, for probes.
fn provider_answered_normally<T>(r: &Result<T, UpstreamError>) -> bool {
    matches!(r, Ok(_) | Err(UpstreamError::Rejected { .. }))
}

fn outcome<T>(r: &Result<T, UpstreamError>) -> &'static str {
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

/// In-process retries of idempotent calls (status, download) before a transient error
/// is persisted as a later retry: two more tries within about a second.
fn immediate_retries() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(2)
        .with_jitter()
}

/// Database writes are retried for a while (a restart, a dropped connection); errors
/// the server raised about the statement itself are not.
pub(crate) fn db_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(10)
        .with_jitter()
}

pub(crate) fn retryable_db_error(e: &sqlx::Error) -> bool {
    !matches!(
        e,
        sqlx::Error::Database(_) | sqlx::Error::RowNotFound | sqlx::Error::ColumnNotFound(_)
    )
}

impl Worker {
    pub fn new(
        pool: PgPool,
        client: Client,
        config: WorkerConfig,
        metrics: Arc<Metrics>,
    ) -> Worker {
        let writer = Writer::start(pool.clone());
        Worker {
            ctx: Arc::new(Ctx {
                pool,
                client,
                config,
                metrics,
                held: Mutex::new(HashMap::new()),
                wake: Notify::new(),
                writer,
                stop_seen: Mutex::new(None),
            }),
        }
    }

    /// Works the queue until `cancel`, then stops claiming, lets in-flight rows finish
    /// for up to `shutdown_timeout`, and releases every row it still holds.
    pub async fn run(self, cancel: CancellationToken) {
        let ctx = self.ctx;
        let background = CancellationToken::new();
        let helpers = [
            tokio::spawn(listen(ctx.clone(), background.clone())),
            tokio::spawn(heartbeat(ctx.clone(), background.clone())),
        ];
        let slots = Arc::new(Semaphore::new(ctx.config.concurrency.max(1)));
        let mut tasks = JoinSet::new();
        let mut db_failures = 0u32;
        tracing::info!(owner = %ctx.config.owner, concurrency = ctx.config.concurrency, qps = ctx.config.qps, "worker started");

        while !cancel.is_cancelled() {
            while tasks.try_join_next().is_some() {}
            let free = slots.available_permits();
            if free == 0 {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tasks.join_next() => continue,
                }
            }
            let claimed = ctx.claim_round(free).await;
            let rows = match claimed {
                Ok(rows) => {
                    db_failures = 0;
                    rows
                }
                Err(e) => {
                    db_failures += 1;
                    let pause = Duration::from_millis(200)
                        .saturating_mul(1 << db_failures.min(7))
                        .min(Duration::from_secs(15));
                    tracing::warn!(error = %e, ?pause, "claiming failed; the database may be restarting");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(pause) => continue,
                    }
                }
            };
            let got = rows.len();
            for (row, probe) in rows {
                let permit = slots
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore is never closed");
                ctx.held
                    .lock()
                    .expect("held lock")
                    .insert(row.id, row.lease_token);
                let ctx = ctx.clone();
                tasks.spawn(async move {
                    ctx.work(row, probe).await;
                    drop(permit);
                });
            }
            if got < free {
                let nap = ctx.idle_nap().await;
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = ctx.wake.notified() => {}
                    _ = tokio::time::sleep(nap) => {}
                    Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                }
            }
        }

        // Shutdown: no new claims; in-flight rows get the grace period to finish.
        tracing::info!(in_flight = tasks.len(), "stopping: no new claims");
        let drained = tokio::time::timeout(ctx.config.shutdown_timeout, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                left = tasks.len(),
                "grace period over: abandoning in-flight calls"
            );
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        let held: Vec<(i64, i64)> = ctx.held.lock().expect("held lock").drain().collect();
        if !held.is_empty() {
            match queue::release(&ctx.pool, &held).await {
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

async fn listen(ctx: Arc<Ctx>, cancel: CancellationToken) {
    let mut failures = 0u32;
    while !cancel.is_cancelled() {
        let attempt = async {
            let mut listener = PgListener::connect_with(&ctx.pool).await?;
            listener.listen(queue::NOTIFY_CHANNEL).await?;
            // Anything inserted while we were not listening is found by this claim.
            ctx.wake.notify_one();
            loop {
                listener.recv().await?;
                ctx.wake.notify_one();
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = attempt => if let Err(e) = r {
                failures += 1;
                tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
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

async fn heartbeat(ctx: Arc<Ctx>, cancel: CancellationToken) {
    let every = ctx.config.lease / 3;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let held: Vec<(i64, i64)> = ctx
            .held
            .lock()
            .expect("held lock")
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        if held.is_empty() {
            continue;
        }
        if let Err(e) =
            queue::heartbeat(&ctx.pool, &ctx.config.owner, &held, ctx.config.lease).await
        {
            tracing::warn!(error = %e, rows = held.len(), "heartbeat failed");
        }
    }
}

impl Ctx {
    /// One claim: what the account's stop allows, plus one probe row when a probe of a
    /// stopped account is due and this process wins it.
    async fn claim_round(&self, free: usize) -> Result<Vec<(Claimed, bool)>, sqlx::Error> {
        let account = &self.config.account;
        let (kinds, probe_kinds) = match self.account_stop().await? {
            None => (ClaimKinds::ALL, None),
            Some((stop, due)) => {
                let (kinds, probe_kinds) = if stop.scope == "create" {
                    (ClaimKinds::POLLS, ClaimKinds::CREATES)
                } else {
                    (ClaimKinds::NONE, ClaimKinds::ALL)
                };
                let won = due
                    && queue::claim_probe(
                        &self.pool,
                        account,
                        stop.probes,
                        stop_probe_delay(self.config.stop_probe_base, stop.probes + 1),
                    )
                    .await?;
                (kinds, won.then_some(probe_kinds))
            }
        };
        let mut rows = Vec::new();
        let mut free = free as i64;
        if let Some(kinds) = probe_kinds {
            let probe =
                queue::claim(&self.pool, &self.config.owner, self.config.lease, 1, kinds).await?;
            free -= probe.len() as i64;
            if !probe.is_empty() {
                tracing::info!(account, "probing the stopped account");
            }
            rows.extend(probe.into_iter().map(|r| (r, true)));
        }
        let claimed = queue::claim(
            &self.pool,
            &self.config.owner,
            self.config.lease,
            free,
            kinds,
        )
        .await?;
        rows.extend(claimed.into_iter().map(|r| (r, false)));
        Ok(rows)
    }

    /// The account's stop, read from the database at most every `STOP_READ_EVERY`.
    async fn account_stop(&self) -> Result<SeenStop, sqlx::Error> {
        if let Some((_, seen)) = self
            .stop_seen
            .lock()
            .expect("stop lock")
            .as_ref()
            .filter(|(at, _)| at.elapsed() < STOP_READ_EVERY)
        {
            return Ok(seen.clone());
        }
        let stop = queue::read_stop(&self.pool, &self.config.account).await?;
        *self.stop_seen.lock().expect("stop lock") = Some((Instant::now(), stop.clone()));
        Ok(stop)
    }

    fn forget_stop(&self) {
        *self.stop_seen.lock().expect("stop lock") = None;
    }

    /// How long an idle claim loop may sleep: until the next poll falls due, at most
    /// the fallback interval (a NOTIFY cuts it short).
    async fn idle_nap(&self) -> Duration {
        let fallback = self.config.idle_poll;
        match queue::next_poll_due_in(&self.pool).await {
            Ok(Some(d)) => d.min(fallback).max(Duration::from_millis(5)),
            _ => fallback,
        }
    }

    /// Retries a database write through a restart or a dropped connection.
    async fn write<F, Fut>(&self, what: &str, row: &Claimed, f: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<bool, sqlx::Error>>,
    {
        let result = f.retry(db_backoff()).when(retryable_db_error).await;
        self.batched(row, what, result.map_err(|e| e.to_string()))
    }

    /// The outcome of a write: whether the row was still ours. A database failure that
    /// outlasted the retries leaves the row to be redone after its lease expires.
    fn batched(&self, row: &Claimed, what: &str, reply: Result<bool, String>) -> bool {
        match reply {
            Ok(true) => true,
            Ok(false) => {
                tracing::info!(
                    id = row.id,
                    what,
                    "row no longer ours (lease lost or cancelled); outcome dropped"
                );
                false
            }
            Err(error) => {
                tracing::error!(
                    id = row.id,
                    what,
                    error,
                    "could not record the outcome; the row will be redone after its lease expires"
                );
                false
            }
        }
    }

    /// Waits for the account's next call slot (shared by every process through the
    /// database), then calls. "Too fast" answers slow everyone down and are retried
    /// here a few times: a rate limit is never the row's fault.
    async fn paced<T, F, Fut>(&self, endpoint: &'static str, call: F) -> Result<T, UpstreamError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        let mut limited = 0;
        loop {
            if self.config.qps > 0.0 {
                let spacing = Duration::from_secs_f64(PACING_MARGIN / self.config.qps);
                let wait = (|| queue::reserve_call_slot(&self.pool, &self.config.account, spacing))
                    .retry(db_backoff())
                    .when(retryable_db_error)
                    .await
                    .map_err(|e| {
                        UpstreamError::transient(format!("cannot reserve a call slot: {e}"))
                    })?;
                tokio::time::sleep(wait).await;
            }
            let r = call().await;
            self.metrics.call(endpoint, outcome(&r));
            match r {
                Err(UpstreamError::RateLimited { .. }) if limited < 3 => {
                    limited += 1;
                    let _ =
                        queue::slow_down(&self.pool, &self.config.account, Duration::from_secs(1))
                            .await;
                }
                other => return other,
            }
        }
    }

    /// The database's clock now, from the claim's reading plus local elapsed time.
    fn now(&self, row: &Claimed, claimed_at: Instant) -> DateTime<Utc> {
        row.db_now + chrono::Duration::from_std(claimed_at.elapsed()).unwrap_or_default()
    }

    async fn work(&self, row: Claimed, probe: bool) {
        let claimed_at = Instant::now();
        let answered_normally = match row.state.as_str() {
            "queued" => self.create(&row).await,
            "generating" => self.poll(&row, claimed_at).await,
            other => {
                tracing::warn!(
                    id = row.id,
                    state = other,
                    "claimed a row in an unexpected state"
                );
                false
            }
        };
        if probe && answered_normally {
            self.forget_stop();
            match queue::clear_stop(&self.pool, &self.config.account).await {
                Ok(true) => {
                    tracing::info!(account = %self.config.account, "the provider answers normally again: account stop cleared")
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "could not clear the account stop"),
            }
        }
        self.held.lock().expect("held lock").remove(&row.id);
    }

    /// Creates the upstream task. Returns whether the provider answered normally.
    async fn create(&self, row: &Claimed) -> bool {
        let report_type: Option<ReportType> = row.report_type.parse().ok();
        let task = CreateTask {
            company_name: row.company_name.clone(),
            credit_code: row.credit_code.clone(),
            org_number: row.org_number.clone(),
            report_type,
        };
        // Not retried in-process: a create that timed out may have created a paid task,
        // so the next try waits for its persisted schedule.
        let result = self
            .paced("create", || self.client.create_task(&task))
            .await;
        let normal = provider_answered_normally(&result);
        match result {
            Ok(job) => {
                tracing::debug!(id = row.id, job = %job, "upstream task created");
                let created = Created {
                    id: row.id,
                    token: row.lease_token,
                    job_id: job.to_string(),
                    first_poll_in: self.config.poll.first_poll_delay(),
                };
                let reply = self.writer.created(created).await;
                if !self.batched(row, "mark generating", reply) {
                    tracing::warn!(id = row.id, job = %job, "an upstream task was created for a row this worker no longer holds");
                }
            }
            Err(UpstreamError::Rejected { code, message }) => {
                self.finish_failed(row, code, &message).await;
            }
            Err(e) => self.retry_later(row, e, "create").await,
        }
        normal
    }

    async fn poll(&self, row: &Claimed, claimed_at: Instant) -> bool {
        let Some(job) = row
            .upstream_job_id
            .as_deref()
            .and_then(|j| JobId::parse(j).ok())
        else {
            self.finish_failed(row, None, "generating without a valid upstream job id")
                .await;
            return false;
        };
        let result = (|| self.paced("status", || self.client.task_status(&job)))
            .retry(immediate_retries())
            .when(|e| matches!(e, UpstreamError::Transient { .. }))
            .await;
        let normal = provider_answered_normally(&result);
        let created = row.upstream_created_at.unwrap_or(row.db_now);
        match result {
            Ok(TaskStatus::Ready { download_url }) => self.download(row, &job, &download_url).await,
            Ok(TaskStatus::Waiting { .. }) | Ok(TaskStatus::Exporting) => {
                let progress = match result {
                    Ok(TaskStatus::Waiting { .. }) => Progress::Queued,
                    _ => Progress::Exporting,
                };
                let now = self.now(row, claimed_at);
                match self
                    .config
                    .poll
                    .next_poll_at(created, now, progress, unit())
                {
                    Some(next_poll_at) => {
                        let snoozed = Snoozed {
                            id: row.id,
                            token: row.lease_token,
                            next_poll_at,
                        };
                        let reply = self.writer.snoozed(snoozed).await;
                        self.batched(row, "snooze", reply);
                    }
                    None => {
                        let why = format!(
                            "no result within {} of creating upstream task {job}",
                            humantime::format_duration(self.config.poll.window)
                        );
                        self.task_gave_up(row, None, &why).await;
                    }
                }
            }
            Ok(TaskStatus::Failed { cause }) => {
                self.task_gave_up(
                    row,
                    None,
                    &format!("report generation failed (job {job}): {cause}"),
                )
                .await;
            }
            Err(UpstreamError::Rejected { code, message }) => {
                // The provider refuses to talk about this task: it is gone for us.
                self.task_gave_up(
                    row,
                    code,
                    &format!("status of job {job} refused: {message}"),
                )
                .await;
            }
            Err(e) => self.retry_later(row, e, "status").await,
        }
        normal
    }

    async fn download(&self, row: &Claimed, job: &JobId, url: &str) {
        let Ok(report_type) = row.report_type.parse::<ReportType>() else {
            self.finish_failed(row, None, "unknown report type").await;
            return;
        };
        // Downloads go to object storage, not the metered API: no pacing; idempotent,
        // so transient trouble is retried at once a couple of times.
        let result = (|| async {
            let r = self.client.download(url, report_type, Some(job)).await;
            self.metrics.call("download", outcome(&r));
            r
        })
        .retry(immediate_retries())
        .when(|e| matches!(e, UpstreamError::Transient { .. }))
        .await;
        match result {
            Ok(document) => {
                let (bytes, file) = (document.content.len(), document.file_name.clone());
                let completed = Completed {
                    id: row.id,
                    token: row.lease_token,
                    document,
                };
                let reply = self.writer.completed(completed).await;
                if self.batched(row, "complete", reply) {
                    self.metrics.finished("succeeded");
                    if let Ok(d) = (Utc::now() - row.created_at).to_std() {
                        self.metrics.insert_to_document(d);
                    }
                    tracing::info!(id = row.id, job = %job, bytes, %file, "report stored");
                }
            }
            Err(UpstreamError::Rejected { code, message }) => {
                self.finish_failed(row, code, &message).await
            }
            Err(e) => self.retry_later(row, e, "download").await,
        }
    }

    async fn finish_failed(&self, row: &Claimed, code: Option<i32>, message: &str) {
        if self
            .write("fail", row, || {
                queue::fail(&self.pool, row.id, row.lease_token, code, message)
            })
            .await
        {
            self.metrics.finished("failed");
            tracing::info!(id = row.id, ?code, message, "report failed");
        }
    }

    /// The current upstream task is lost (job_status 3, window expired, or unknown to
    /// the provider): a new task after a backoff while attempts remain, else failed.
    async fn task_gave_up(&self, row: &Claimed, code: Option<i32>, why: &str) {
        if row.attempts < row.max_attempts {
            let delay = self.config.retry.new_task_delay(row.attempts, unit());
            tracing::info!(
                id = row.id,
                attempts = row.attempts,
                ?delay,
                why,
                "a new upstream task will be created"
            );
            self.write("requeue", row, || {
                queue::requeue_for_new_task(&self.pool, row.id, row.lease_token, code, why, delay)
            })
            .await;
        } else {
            let message = format!("{why} (after {} upstream tasks)", row.attempts);
            self.finish_failed(row, code, &message).await;
        }
    }

    /// Trouble that is not the row's fault: transient errors back off (and fail the row
    /// only once the retry budget is spent), rate limits retry soon, account stops are
    /// recorded for every process and leave the row as it was.
    async fn retry_later(&self, row: &Claimed, e: UpstreamError, endpoint: &str) {
        let code = e.code();
        let message = e.to_string();
        match e {
            UpstreamError::AccountStop {
                code,
                reason,
                until,
            } => {
                let scope = if endpoint == "create"
                    && !matches!(code, 67200003 | 67200008 | 67200101 | 401 | 403 | 404)
                {
                    "create"
                } else {
                    "all"
                };
                tracing::warn!(account = %self.config.account, code, %reason, ?until, scope, "account-wide stop");
                let _ = (|| {
                    queue::record_stop(
                        &self.pool,
                        &self.config.account,
                        scope,
                        code,
                        &reason,
                        until,
                        self.config.stop_probe_base,
                    )
                })
                .retry(db_backoff())
                .when(retryable_db_error)
                .await;
                self.forget_stop();
                self.write("release (account stop)", row, || {
                    queue::retry_later(
                        &self.pool,
                        row.id,
                        row.lease_token,
                        Retry::Stopped,
                        Some(code),
                        &message,
                        Duration::ZERO,
                    )
                })
                .await;
            }
            UpstreamError::RateLimited { .. } => {
                let delay = Duration::from_secs(1) + Duration::from_secs(2).mul_f64(unit());
                self.write("retry (rate limited)", row, || {
                    queue::retry_later(
                        &self.pool,
                        row.id,
                        row.lease_token,
                        Retry::Quiet,
                        code,
                        &message,
                        delay,
                    )
                })
                .await;
            }
            _ => {
                // transient_since was written by the database's clock: judge it by the
                // same clock (read at the claim) rather than this host's.
                let now = row.db_now;
                let since = row.transient_since.unwrap_or(now);
                if self.config.retry.exhausted(since, now) {
                    let why = format!(
                        "gave up after {} of transient errors; last: {message}",
                        humantime::format_duration(self.config.retry.budget)
                    );
                    self.finish_failed(row, code, &why).await;
                    return;
                }
                let n = (row.transient_errors + 1).max(1) as u32;
                let delay = self.config.retry.transient_delay(n, unit());
                tracing::debug!(id = row.id, endpoint, ?delay, error = %message, "transient error; retrying later");
                self.write("retry (transient)", row, || {
                    queue::retry_later(
                        &self.pool,
                        row.id,
                        row.lease_token,
                        Retry::Transient,
                        code,
                        &message,
                        delay,
                    )
                })
                .await;
            }
        }
    }
}
