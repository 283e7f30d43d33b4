//! One claimed row's life: create → poll → download → store. Each step ends in a typed
//! `Outcome`, and `settle` writes it, fenced by the claim's lease token, so a row whose
//! lease expired or that a person cancelled is never overwritten.
//!
//! Read top to bottom: `run` → `live` → `create` / `poll` → `download` → `settle` →
//! `record_task` / `store` / `fail` / `lose_task` / `retry_later`. What `create` asks
//! before it pays — reuse, the account, its daily quota and balance — is in create.rs.
//!
//! Spending: a create is a paid report. Its token is fetched first; then `begin_create`
//! commits the attempt and the intent in one guarded statement (no row, no call), and
//! the create goes out only if it can still be answered within the intent's deadline.
//! The answer settles the intent: a job id is recorded (or kept as an orphan if the row
//! is no longer ours), an answer that proves no task was made gives the attempt back,
//! and anything else keeps it spent. Nothing interrupts a create on the wire, not even
//! shutdown. A task that was paid for is kept while the provider may still finish it:
//! polled past the window until `REPORT_GIVE_UP_AFTER`, and even then kept as an orphan.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use opentelemetry::KeyValue;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing::field::{Empty, display};

use super::account::{Account, outcome};
use super::leases::LeaseFlag;
use super::{Role, Shared};
use crate::domain::{JobId, RequestState};
use crate::queue::{
    self, Begin, Claimed, Completed, CreateIntent, Created, Fenced, Intent, LostTask, Orphan,
    OrphanFate, Retry, Snoozed, Stored, WriteError,
};
use crate::store::DocumentStore;
use crate::telemetry::{RowTrace, TARGET};
use crate::upstream::client::CreateTask;
use crate::upstream::{CreateError, Downloaded, TaskStatus, UpstreamError};

/// Time a create may take beyond the HTTP timeout before a claimer that meets its
/// intent (after a cancel and retry) stops waiting for its answer. A create whose intent
/// took longer than this to commit is not sent at all: it could outlive its deadline.
const CREATE_MARGIN: Duration = Duration::from_secs(5);

/// What one step of a row's life came to.
#[derive(Debug)]
pub(super) enum Outcome {
    /// The upstream task exists: record its job id and start polling. `started_at` is
    /// the intent it was created under.
    TaskCreated {
        job: JobId,
        started_at: DateTime<Utc>,
        /// The attempt it was created for.
        attempt: i32,
    },
    /// The create was sent and no usable answer came back: its attempt stays spent.
    Unanswered {
        error: UpstreamError,
        attempt: i32,
        unanswered: i32,
        started_at: DateTime<Utc>,
    },
    /// The task is not ready yet: poll again at this time (a snooze, not an attempt);
    /// `queued`: the provider said it is still queued, with this many jobs ahead.
    NotReady {
        next_poll_at: DateTime<Utc>,
        queued: Option<i64>,
    },
    /// The report is downloaded and verified: store it and finish the row. (Its
    /// memory stays reserved until it is stored.)
    Downloaded(Box<Downloaded>),
    /// The task's download was unusable (not the report, a link against the rules, a
    /// download that never finished): a few tries, then the task is given up.
    BadDownload { message: String },
    /// The current task is lost (job_status 3, the provider refuses to talk about it):
    /// a new task while attempts remain, else failed.
    TaskLost { code: Option<i32>, why: String },
    /// The provider still calls the task waiting or exporting after
    /// `REPORT_GIVE_UP_AFTER`: it is kept as an orphan (it may still finish), and a new
    /// task is bought while attempts remain, else the row fails keeping the task.
    GivenUp { why: String },
    /// Not now, and not the row's fault: back in the queue until `until`, with why.
    Later {
        until: DateTime<Utc>,
        message: String,
    },
    /// The request can never succeed: fail it.
    Refused {
        code: Option<i32>,
        message: String,
        intent: Intent,
    },
    /// Trouble that is not the row's fault (transient, rate limited, account stop):
    /// try the same step again later.
    Trouble {
        error: UpstreamError,
        intent: Intent,
    },
    /// A create sent before a cancel and retry is still on the wire: wait for it.
    WaitForCreate,
    /// Another row will have the same task soon (coalescing): look again at `until`.
    WaitForLeader {
        until: DateTime<Utc>,
        message: String,
    },
    /// Already written by the statement that decided it (an orphan was adopted).
    Written,
    /// The row is no longer ours: nothing to write.
    LeaseLost,
    /// Shutdown interrupted a step that had sent nothing paid: the row is handed back.
    Interrupted,
}

pub(super) struct RowTask {
    pub(super) shared: Arc<Shared>,
    pub(super) row: Claimed,
    /// A create, a poll, or the probe of a stopped account.
    pub(super) role: Role,
    /// The account this claim calls with (index into `shared.accounts`): fixed by the
    /// claim for polls and probes, chosen by `choose_account` for creates.
    pub(super) account: OnceLock<usize>,
    /// When the row was claimed, to tell the database's time from `row.db_now`.
    claimed_at: Instant,
    /// Raised by the heartbeat when it could not extend this row's lease.
    lease: LeaseFlag,
    /// Cancelled at shutdown: steps that sent nothing paid stop at once.
    stopping: CancellationToken,
    /// Whether the provider's metered API answered normally (a success or a refusal
    /// about this request): what ends an account stop when this row is the probe.
    answered_normally: AtomicBool,
    /// The create intent this claim committed last (its `create_started_at`): a refund
    /// the claim's lease no longer covers (a cancel and retry while the create was on
    /// the wire) is made by this instead. A std mutex, never held across an await.
    intent: std::sync::Mutex<Option<DateTime<Utc>>>,
    /// The row's trace, when this process exports traces.
    trace: Option<RowTrace>,
    /// This claim's span in the row's trace (disabled when traces are off).
    span: tracing::Span,
    /// The span that gives this claim's log lines their row, job and batch.
    log_span: tracing::Span,
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

/// A uniform value in [0, 1) for the policies' jitter.
fn unit() -> f64 {
    rand::random_range(0.0..1.0)
}

impl RowTask {
    pub(super) fn new(
        shared: Arc<Shared>,
        row: Claimed,
        role: Role,
        lease: LeaseFlag,
        stopping: CancellationToken,
    ) -> RowTask {
        let account = OnceLock::new();
        if let Role::Poll(i) | Role::Probe(i) = role {
            let _ = account.set(i);
        }
        let log_span = tracing::info_span!(
            "row",
            id = row.id,
            job = row.upstream_job_id.as_ref().map(display),
            batch = row.batch.as_deref()
        );
        let trace = RowTrace::of(row.trace_context.as_deref(), row.traceparent.as_deref());
        let span = tracing::info_span!(
            target: TARGET,
            "claim",
            report.id = row.id,
            report.type = %row.report_type,
            report.batch = row.batch.as_deref(),
            report.state = %row.state,
            report.attempts = row.attempts,
            report.account = Empty,
            claim.role = match role {
                Role::Create => "create",
                Role::Poll(_) => "poll",
                Role::Probe(_) => "probe",
            },
            claim.lease_token = row.lease_token,
            upstream.job_id = row.upstream_job_id.as_ref().map(display),
        );
        if let Some(i) = account.get() {
            span.record("report.account", shared.accounts[*i].name());
        }
        if let Some(trace) = &trace {
            trace.adopt(&span);
        }
        RowTask {
            shared,
            row,
            role,
            account,
            claimed_at: Instant::now(),
            lease,
            stopping,
            answered_normally: AtomicBool::new(false),
            intent: std::sync::Mutex::new(None),
            trace,
            span,
            log_span,
        }
    }

    /// The row's new task, named in its log lines and its claim's span from now on.
    fn note_job(&self, job: &JobId) {
        self.log_span.record("job", display(job));
        self.span.record("upstream.job_id", display(job));
    }

    /// The whole of this claim: one step of the row's life, its outcome written, and
    /// the account's stop lifted when this row was the probe and the provider answered.
    /// Returns false when the row was not finished with (shutdown interrupted it) and
    /// must be handed back.
    pub(super) async fn run(self) -> bool {
        let (span, log_span) = (self.span.clone(), self.log_span.clone());
        async {
            let outcome = self.live().await;
            if matches!(outcome, Outcome::Interrupted) {
                return false;
            }
            self.settle(outcome).await;
            if matches!(self.role, Role::Probe(_)) && self.answered_normally.load(Ordering::Relaxed)
            {
                self.account().clear_stop().await;
            }
            true
        }
        .instrument(span)
        .instrument(log_span)
        .await
    }

    /// The row is finished (succeeded or failed) by this claim: the report's own span,
    /// from its insert to now, closes its trace.
    pub(super) fn report_finished(&self, outcome: &'static str, error: Option<&str>) {
        let Some(trace) = &self.trace else { return };
        let row = &self.row;
        let mut attributes = vec![
            KeyValue::new("report.id", row.id),
            KeyValue::new("report.type", row.report_type.as_str()),
            KeyValue::new("report.outcome", outcome),
        ];
        // Not for a row served from a stored document: no account worked it.
        if let Some(i) = self.account.get() {
            let name = self.shared.accounts[*i].name().to_string();
            attributes.push(KeyValue::new("report.account", name));
        }
        if let Some(batch) = &row.batch {
            attributes.push(KeyValue::new("report.batch", batch.clone()));
        }
        if let Some(error) = error {
            attributes.push(KeyValue::new("report.error", error.to_string()));
        }
        trace.finish(row.created_at, attributes);
    }

    /// The account this claim calls with (the first until a create has chosen one).
    fn account(&self) -> &Account {
        &self.shared.accounts[self.account.get().copied().unwrap_or(0)]
    }

    async fn live(&self) -> Outcome {
        match self.row.state {
            RequestState::Queued => self.create().await,
            RequestState::Generating => self.poll().await,
            other => {
                tracing::warn!(state = %other, "claimed a row in an unexpected state");
                Outcome::LeaseLost
            }
        }
    }

    /// Creates the upstream task, under a committed intent. Never retried in-process
    /// after an unanswered create: that may have made a paid task, so the next try is a
    /// new attempt after its persisted backoff. Tries that certainly made no task (a
    /// refused token, "too fast") give their attempt back and go again at once.
    async fn create(&self) -> Outcome {
        let task = CreateTask {
            company_name: self.row.company_name.clone(),
            credit_code: self.row.credit_code.clone(),
            org_number: self.row.org_number.clone(),
            report_type: Some(self.row.report_type),
        };
        let shared = &self.shared;
        if let Some(outcome) = self.reuse().await {
            return outcome;
        }
        if let Some(outcome) = self.choose_account().await {
            return outcome;
        }
        let account = self.account();
        self.span.record("report.account", account.name());
        let (mut token_refused, mut rate_limited) = (false, 0);
        loop {
            // The token before the intent: a create's time budget is for the create alone.
            let span = tracing::info_span!(
                target: TARGET,
                "token",
                token.fetched = Empty,
                otel.status_code = Empty
            );
            let fetches = account.client.token_fetches();
            let token = account
                .client
                .token_for_create()
                .instrument(span.clone())
                .await;
            // The account's fetch count: this create waited for a fetch (its own or one
            // another create began), or had the cached token.
            span.record("token.fetched", account.client.token_fetches() > fetches);
            if token.is_err() {
                span.record("otel.status_code", "error");
            }
            let token = match token {
                Ok(token) => token,
                Err(error) => {
                    let intent = Intent::Keep;
                    return Outcome::Trouble { error, intent };
                }
            };
            if self.lease.is_lost() {
                return Outcome::LeaseLost;
            }
            if let Some(stop) = self.unless_stopping(account.wait_for_slot()).await {
                if let Err(error) = stop {
                    let intent = Intent::Keep;
                    return Outcome::Trouble { error, intent };
                }
            } else {
                return Outcome::Interrupted;
            }
            let asked = Instant::now();
            let (attempt, unanswered, started_at) = match self.begin_create().await {
                Ok(CreateIntent::Go {
                    attempt,
                    unanswered,
                    started_at,
                }) => {
                    *self.intent.lock().unwrap_or_else(|p| p.into_inner()) = Some(started_at);
                    (attempt, unanswered, started_at)
                }
                Ok(CreateIntent::Wait { until }) => {
                    tracing::info!(%until, "a create sent before a cancel and retry is still on the wire: waiting for it");
                    return Outcome::WaitForCreate;
                }
                Ok(CreateIntent::Adopted { job }) => {
                    self.note_job(&job);
                    tracing::info!("adopted the task bought for this row earlier: no new create");
                    return Outcome::Written;
                }
                Ok(CreateIntent::Exhausted {
                    attempts,
                    unanswered,
                }) => {
                    return Outcome::Refused {
                        code: None,
                        message: spent_message(
                            attempts,
                            unanswered,
                            "the last create got no answer",
                        ),
                        intent: Intent::Keep,
                    };
                }
                Ok(CreateIntent::Lost) => return Outcome::LeaseLost,
                Err(e) => {
                    let error = UpstreamError::transient(format!(
                        "cannot record the create intent (nothing was sent): {e}"
                    ));
                    let intent = Intent::Keep;
                    return Outcome::Trouble { error, intent };
                }
            };
            // The intent's deadline is its commit time + the HTTP timeout + CREATE_MARGIN:
            // sent within CREATE_MARGIN of the commit, the create is answered or given up
            // before it, so a claimer that meets the intent later never buys beside it.
            // (The commit is no later than the ask; an intent asked for again after a lost
            // answer is as old as its first commit, by the database's clock.)
            let since_commit = (self.now() - started_at).to_std().unwrap_or_default();
            let late = asked.elapsed().max(since_commit);
            if late > CREATE_MARGIN {
                let error = UpstreamError::transient(format!(
                    "the create intent is {} old, more than the {} a create may start after it: nothing was sent",
                    humantime::format_duration(late),
                    humantime::format_duration(CREATE_MARGIN)
                ));
                return Outcome::Trouble {
                    error,
                    intent: Intent::Refund,
                };
            }
            let timeout = account.client.config().timeout;
            let span = tracing::info_span!(
                target: TARGET,
                "create",
                otel.kind = "client",
                otel.status_code = Empty,
                create.attempt = attempt,
                create.outcome = Empty,
                upstream.job_id = Empty,
            );
            let result = (account.client.create_task(&task, &token, timeout))
                .instrument(span.clone())
                .await;
            (shared.metrics).call(account.name(), "create", create_outcome(&result));
            span.record("create.outcome", create_outcome(&result));
            match &result {
                Ok(job) => span.record("upstream.job_id", display(job)),
                Err(_) => span.record("otel.status_code", "error"),
            };
            if matches!(
                result,
                Ok(_) | Err(CreateError::NotCreated(UpstreamError::Rejected { .. }))
            ) {
                self.answered_normally.store(true, Ordering::Relaxed);
            }
            let refund = Intent::Refund;
            match result {
                Ok(job) => {
                    return Outcome::TaskCreated {
                        job,
                        started_at,
                        attempt,
                    };
                }
                Err(CreateError::Unknown(error)) => {
                    return Outcome::Unanswered {
                        error,
                        attempt,
                        unanswered: unanswered + 1,
                        started_at,
                    };
                }
                Err(CreateError::NotCreated(
                    UpstreamError::Unauthorized { .. } | UpstreamError::BadCredentials { .. },
                )) if !token_refused => token_refused = true,
                Err(CreateError::NotCreated(UpstreamError::BadCredentials { message })) => {
                    let error = UpstreamError::stop_all(67200003, message);
                    return Outcome::Trouble {
                        error,
                        intent: refund,
                    };
                }
                Err(CreateError::NotCreated(UpstreamError::RateLimited { .. }))
                    if rate_limited < 3 =>
                {
                    rate_limited += 1;
                    account.slow_down(None).await;
                }
                Err(CreateError::NotCreated(UpstreamError::Rejected { code, message })) => {
                    return Outcome::Refused {
                        code,
                        message,
                        intent: refund,
                    };
                }
                Err(CreateError::NotCreated(error)) => {
                    return Outcome::Trouble {
                        error,
                        intent: refund,
                    };
                }
            }
            // Certainly no task was made: give the attempt back and go again.
            let (pool, row) = (&shared.pool, &self.row);
            let refunded = self
                .write("refund the attempt", || {
                    queue::refund_create(pool, row.id, row.lease_token)
                })
                .await;
            if refunded != Some(Fenced::Written) {
                if refunded == Some(Fenced::Lost) {
                    self.refund_fenced_out().await;
                }
                return Outcome::LeaseLost;
            }
        }
    }

    /// The create intent, batched with other rows' (one statement, one commit).
    async fn begin_create(&self) -> Result<CreateIntent, WriteError> {
        let shared = &self.shared;
        let policy = &shared.config.poll;
        let first_poll = shared
            .learning
            .first_poll_delay(&shared.pool, self.row.report_type)
            .await;
        let account = self.account();
        let begin = Begin {
            id: self.row.id,
            token: self.row.lease_token,
            owner: shared.config.owner.clone(),
            account: account.name().to_string(),
            budget: account.client.config().timeout + CREATE_MARGIN,
            adopt_within: policy.window,
            first_poll,
        };
        shared.writer.begin(begin).await
    }

    /// Asks the provider how the task is doing; downloads it when it is ready.
    async fn poll(&self) -> Outcome {
        let Some(job) = self.row.upstream_job_id.clone() else {
            return Outcome::Refused {
                code: None,
                message: "generating without a valid upstream job id".into(),
                intent: Intent::Keep,
            };
        };
        if self.lease.is_lost() {
            return Outcome::LeaseLost;
        }
        let client = &self.account().client;
        let span = tracing::info_span!(
            target: TARGET,
            "poll",
            otel.kind = "client",
            otel.status_code = Empty,
            upstream.job_id = %job,
            poll.number = self.row.polls + 1,
            job_status = Empty,
            queue_num = Empty,
        );
        let status = (|| self.paced("status", || client.task_status(&job)))
            .retry(immediate_retries())
            .when(|e| matches!(e, UpstreamError::Transient { .. }))
            .instrument(span.clone());
        let Some(status) = self.unless_stopping(status).await else {
            return Outcome::Interrupted;
        };
        match &status {
            Ok(s) => {
                span.record("job_status", s.job_status());
                if let TaskStatus::Waiting { queue_num } = s {
                    span.record("queue_num", *queue_num);
                }
            }
            Err(_) => {
                span.record("otel.status_code", "error");
            }
        }
        drop(span);
        let queued = match status {
            Ok(TaskStatus::Ready { download_url }) => {
                return self.download(&job, &download_url).await;
            }
            // A queued answer without a queue_num still says the export has not begun.
            Ok(TaskStatus::Waiting { queue_num }) => Some(queue_num.unwrap_or(0).max(0)),
            Ok(TaskStatus::Exporting) => None,
            Ok(TaskStatus::Failed { cause }) => {
                return Outcome::TaskLost {
                    code: None,
                    why: format!("report generation failed (job {job}): {cause}"),
                };
            }
            // The provider refuses to talk about this task: it is gone for us.
            Err(UpstreamError::Rejected { code, message }) => {
                return Outcome::TaskLost {
                    code,
                    why: format!("status of job {job} refused: {message}"),
                };
            }
            Err(error) => {
                let intent = Intent::Keep;
                return Outcome::Trouble { error, intent };
            }
        };
        let policy = &self.shared.config.poll;
        let created = self.row.upstream_created_at.unwrap_or(self.row.db_now);
        let next = self
            .shared
            .learning
            .next_poll_at(
                &self.shared.pool,
                self.row.report_type,
                created,
                self.now(),
                queued,
                unit(),
            )
            .await;
        match next {
            Some(next_poll_at) => Outcome::NotReady {
                next_poll_at,
                queued,
            },
            None => Outcome::GivenUp {
                why: format!(
                    "upstream task {job} was still {} after {} (REPORT_GIVE_UP_AFTER): given up, kept in report_orphan_tasks in case the provider finishes it",
                    if queued.is_some() {
                        "waiting at the provider"
                    } else {
                        "exporting"
                    },
                    humantime::format_duration(policy.give_up_after)
                ),
            },
        }
    }

    /// Downloads the report from its pre-signed link and verifies it. Downloads go to
    /// object storage, not the metered API: no pacing; they are idempotent, so
    /// transient trouble is retried at once a couple of times.
    async fn download(&self, job: &JobId, url: &str) -> Outcome {
        let (shared, account) = (&self.shared, self.account());
        let result = (|| async {
            let r = account
                .client
                .download(url, self.row.report_type, Some(job))
                .await;
            (shared.metrics).call(account.name(), "download", outcome(&r));
            r
        })
        .retry(immediate_retries())
        .when(|e| matches!(e, UpstreamError::Transient { .. }));
        // The link itself is never recorded: it is signed.
        let span = tracing::info_span!(
            target: TARGET,
            "download",
            otel.kind = "client",
            otel.status_code = Empty,
            upstream.job_id = %job,
            document.bytes = Empty,
            document.sha256 = Empty,
            document.content_type = Empty,
        );
        let Some(result) = self.unless_stopping(result.instrument(span.clone())).await else {
            return Outcome::Interrupted;
        };
        match &result {
            Ok(d) if !span.is_disabled() => {
                span.record("document.bytes", d.spool.len());
                span.record("document.sha256", &d.spool.sha256()[..12]);
                span.record("document.content_type", d.content_type);
            }
            Ok(_) => {}
            Err(_) => {
                span.record("otel.status_code", "error");
            }
        }
        match result {
            Ok(downloaded) => Outcome::Downloaded(Box::new(downloaded)),
            Err(UpstreamError::BadDownload { message }) => Outcome::BadDownload { message },
            Err(UpstreamError::Rejected { code, message }) => Outcome::Refused {
                code,
                message,
                intent: Intent::Keep,
            },
            Err(error) => {
                let intent = Intent::Keep;
                Outcome::Trouble { error, intent }
            }
        }
    }

    /// Writes the outcome of this claim, fenced by its lease token.
    async fn settle(&self, outcome: Outcome) {
        match outcome {
            Outcome::TaskCreated {
                job,
                started_at,
                attempt,
            } => self.record_task(job, started_at, attempt).await,
            Outcome::Unanswered {
                error,
                attempt,
                unanswered,
                started_at,
            } => {
                let written = if attempt < self.row.max_attempts {
                    let delay = self.shared.config.retry.new_task_delay(attempt, unit());
                    tracing::warn!(outcome = "retry", %error, attempt, delay = %humantime::format_duration(delay), "the create got no usable answer: the attempt counts, a new task later");
                    let message = CreateError::Unknown(error.clone()).to_string();
                    self.retry_write(
                        Retry::Noted,
                        error.code(),
                        &message,
                        delay,
                        Intent::Unanswered,
                    )
                    .await
                } else {
                    let message = spent_message(attempt, unanswered, &error.to_string());
                    self.fail(error.code(), &message, Intent::Unanswered).await
                };
                if written == Some(Fenced::Lost) {
                    self.forget_create(started_at).await;
                }
            }
            Outcome::NotReady {
                next_poll_at,
                queued,
            } => {
                let snoozed = Snoozed {
                    id: self.row.id,
                    token: self.row.lease_token,
                    next_poll_at,
                    queued: queued.map(|q| q.min(i32::MAX as i64) as i32),
                };
                let reply = self.shared.writer.snoozed(snoozed).await;
                self.fenced("snooze", reply);
            }
            Outcome::Downloaded(downloaded) => {
                let span = tracing::info_span!(
                    target: TARGET,
                    "store",
                    store.kind = match self.shared.config.documents {
                        DocumentStore::Postgres => "postgres",
                        DocumentStore::Objects { .. } => "s3",
                    },
                    document.bytes = downloaded.spool.len(),
                    store.outcome = Empty,
                    otel.status_code = Empty,
                );
                self.store(*downloaded).instrument(span).await
            }
            Outcome::BadDownload { message } => {
                let tries = self.row.bad_downloads + 1;
                if tries >= self.shared.config.download_tries.max(1) as i32 {
                    let why = format!("{message} ({tries} downloads of this task, none usable)");
                    self.lose_task(None, &why, false).await;
                } else {
                    let error = UpstreamError::BadDownload { message };
                    let delay = self
                        .shared
                        .config
                        .retry
                        .transient_delay(tries as u32, unit());
                    tracing::info!(outcome = "retry", %error, tries, delay = %humantime::format_duration(delay), "unusable download; trying again later");
                    self.retry_write(
                        Retry::BadDownload,
                        None,
                        &error.to_string(),
                        delay,
                        Intent::Keep,
                    )
                    .await;
                }
            }
            Outcome::TaskLost {
                code: Some(404),
                why,
            } => {
                // One task the provider does not know costs that task; several within
                // minutes mean the account is misconfigured: stop it instead.
                match self.account().others_lost_to(404).await {
                    Some(others) if others >= 2 => {
                        let error = UpstreamError::stop_all(
                            404,
                            format!(
                                "status calls answer HTTP 404 for several tasks ({others} others in the last 10 minutes): check UPSTREAM_BASE_URL"
                            ),
                        );
                        self.stop_account(&error, "status", &why).await;
                        self.retry_write(
                            Retry::Noted,
                            Some(404),
                            &why,
                            Duration::ZERO,
                            Intent::Keep,
                        )
                        .await;
                    }
                    _ => self.lose_task(Some(404), &why, false).await,
                }
            }
            Outcome::TaskLost { code, why } => self.lose_task(code, &why, false).await,
            Outcome::GivenUp { why } => self.lose_task(None, &why, true).await,
            Outcome::Refused {
                code,
                message,
                intent,
            } => {
                self.fail(code, &message, intent).await;
            }
            Outcome::Trouble { error, intent } => self.retry_later(error, intent).await,
            Outcome::Later { until, message } => {
                let delay = (until - self.now()).to_std().unwrap_or_default();
                self.retry_write(Retry::Noted, None, &message, delay, Intent::Keep)
                    .await;
            }
            Outcome::WaitForLeader { until, message } => {
                let delay = (until - self.now()).to_std().unwrap_or_default();
                self.retry_write(Retry::Coalescing, None, &message, delay, Intent::Keep)
                    .await;
            }
            Outcome::WaitForCreate => {
                let (pool, row) = (&self.shared.pool, &self.row);
                self.write("wait for the create on the wire", || {
                    queue::wait_for_create(pool, row.id, row.lease_token)
                })
                .await;
            }
            Outcome::Written | Outcome::LeaseLost | Outcome::Interrupted => {}
        }
    }

    /// The task exists and is paid for: its job id must not be lost. Written to the row
    /// (retried for as long as the database is unreachable: the heartbeat keeps the
    /// lease meanwhile); if the row is no longer ours, kept as an orphan — adopted at
    /// once when the row waits for exactly this create (a cancel and retry while it was
    /// on the wire), otherwise recorded for a later retry and for operators.
    async fn record_task(&self, job: JobId, started_at: DateTime<Utc>, attempt: i32) {
        self.note_job(&job);
        tracing::debug!("upstream task created");
        let shared = &self.shared;
        let first_poll = shared
            .learning
            .first_poll_delay(&shared.pool, self.row.report_type)
            .await;
        let created = Created {
            id: self.row.id,
            token: self.row.lease_token,
            job_id: job.clone(),
            first_poll_in: first_poll,
        };
        let mut pause = Duration::from_millis(200);
        let reason = loop {
            match shared.writer.created(created.clone()).await {
                Ok(Fenced::Written) => {
                    let written = Orphan {
                        request_id: self.row.id,
                        job_id: job,
                        started_at: Some(started_at),
                        account: self.account().name().to_string(),
                        report_type: self.row.report_type,
                        reason: String::new(),
                    };
                    shared.recent.written(written, attempt);
                    return;
                }
                Err(WriteError::Unavailable(e)) => {
                    shared.recent.suspect();
                    tracing::error!(job = %job, error = %e, "cannot record the new task's job id yet; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Ok(Fenced::Lost) => {
                    break "the row was cancelled or taken over while its create was on the wire"
                        .to_string();
                }
                Err(WriteError::Refused { message, .. }) => {
                    break format!("the job id could not be written to its row: {message}");
                }
            }
        };
        let orphan = Orphan {
            request_id: self.row.id,
            job_id: job.clone(),
            started_at: Some(started_at),
            account: self.account().name().to_string(),
            report_type: self.row.report_type,
            reason,
        };
        let fate = (|| queue::adopt_or_record_orphan(&shared.pool, &orphan, first_poll))
            .retry(queue::backoff().with_max_times(usize::MAX))
            .when(queue::is_retryable)
            .notify(|e, _| tracing::error!(job = %job, error = %e, "cannot record the orphaned task yet; retrying"))
            .await;
        if fate.is_ok() {
            // The orphan's write is as easily lost as the row's would have been.
            shared.recent.written(orphan.clone(), attempt);
        }
        match fate {
            Ok(OrphanFate::Adopted) => {
                tracing::info!(
                    "the row was retried while its create was on the wire: it adopted this task"
                )
            }
            Ok(OrphanFate::Recorded) => {
                tracing::warn!(reason = %orphan.reason, "a paid task has no row to go to: kept in report_orphan_tasks")
            }
            Ok(OrphanFate::AlreadyWritten) => {
                tracing::info!(
                    "the job id was written to its row already (its answer was lost on the way back)"
                )
            }
            Err(e) => {
                tracing::error!(job = %job, error = %e, "could not record an orphaned paid task")
            }
        }
    }

    /// The document into its store, then the document's row and `succeeded` in one
    /// transaction (for object storage: the object written and read back first). A
    /// store that cannot take it now is tried again later. A row cancelled while its
    /// task was polled keeps the document all the same (it was paid for): a retry of the
    /// row is served from it.
    async fn store(&self, downloaded: Downloaded) {
        let Downloaded {
            spool,
            content_type,
            file_name,
            provider_company,
            report_type,
            reservation,
        } = downloaded;
        let Some(job) = self.row.upstream_job_id.clone() else {
            self.fail(None, "downloaded without an upstream job id", Intent::Keep)
                .await;
            return;
        };
        let store = &self.shared.config.documents;
        // A large document for the PostgreSQL store is streamed from its spool with COPY
        // (never whole in memory); everything else goes through the batched writer.
        if matches!(store, DocumentStore::Postgres) && spool.on_disk() {
            let meta = queue::DocumentMeta {
                content_type,
                sha256: spool.sha256(),
                byte_size: spool.len(),
                file_name,
                provider_company,
            };
            let mut spool = spool;
            let (pool, row) = (&self.shared.pool, &self.row);
            let (mut tries, mut pause) = (0, Duration::from_millis(100));
            let reply = loop {
                let sent = match spool.reader() {
                    Ok(body) => {
                        let observe = self.shared.learning.is_on();
                        queue::complete_streamed(
                            pool,
                            row.id,
                            row.lease_token,
                            &job,
                            &meta,
                            observe,
                            body,
                        )
                        .await
                    }
                    Err(e) => Err(sqlx::Error::Io(e)),
                };
                match sent {
                    Err(e) if queue::is_retryable(&e) && tries < 10 => {
                        tries += 1;
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                    other => break other.map_err(WriteError::from),
                }
            };
            drop(reservation);
            self.stored(reply, meta.byte_size, &meta.file_name).await;
            return;
        }
        let document = match store
            .keep(
                self.row.id,
                spool,
                content_type,
                file_name,
                provider_company,
                report_type.extension(),
            )
            .await
        {
            Ok(document) => document,
            Err(e) => {
                tracing::Span::current()
                    .record("store.outcome", "store_unavailable")
                    .record("otel.status_code", "error");
                let error = UpstreamError::transient(format!("could not store the document: {e}"));
                self.retry_later(error, Intent::Keep).await;
                return;
            }
        };
        let (bytes, file) = (document.byte_size, document.file_name.clone());
        let completed = Completed {
            id: self.row.id,
            token: self.row.lease_token,
            job_id: job,
            document,
            observe: self.shared.learning.is_on(),
        };
        let reply = self.shared.writer.completed(completed).await;
        drop(reservation);
        self.stored(reply, bytes, &file).await;
    }

    /// What the document's write came to: stored, kept for a cancelled row, no longer
    /// ours, or refused by the database (the row fails with the reason instead of being
    /// redone).
    async fn stored(&self, reply: Result<Stored, WriteError>, bytes: u64, file: &str) {
        let span = tracing::Span::current();
        span.record(
            "store.outcome",
            match &reply {
                Ok(Stored::Finished) => "stored",
                Ok(Stored::KeptForCancelled) => "kept_for_cancelled",
                Ok(Stored::Lost) => "lease_lost",
                Err(WriteError::Refused { .. }) => "refused",
                Err(_) => "unavailable",
            },
        );
        if reply.is_err() {
            span.record("otel.status_code", "error");
        }
        match reply {
            Ok(Stored::Finished) => {
                self.report_finished("succeeded", None);
                self.shared.metrics.finished("succeeded");
                if let Ok(d) = (Utc::now() - self.row.created_at).to_std() {
                    self.shared.metrics.insert_to_document(d);
                }
                tracing::info!(outcome = "succeeded", bytes, file, "report stored");
            }
            Ok(Stored::KeptForCancelled) => {
                tracing::info!(
                    bytes,
                    file,
                    "the row was cancelled while its task was polled: its document is kept, and serves a retry"
                );
            }
            Ok(Stored::Lost) => {
                self.fenced("complete", Ok(Fenced::Lost));
            }
            Err(refused @ WriteError::Refused { .. }) => {
                let message = format!("the document could not be stored: {refused}");
                self.fail(None, &message, Intent::Keep).await;
            }
            Err(unavailable) => {
                self.fenced("complete", Err(unavailable));
            }
        }
    }

    async fn fail(&self, code: Option<i32>, message: &str, intent: Intent) -> Option<Fenced> {
        let (pool, row) = (&self.shared.pool, &self.row);
        let written = self
            .write("fail", || {
                queue::fail(pool, row.id, row.lease_token, code, message, intent)
            })
            .await;
        if written == Some(Fenced::Lost) && intent == Intent::Refund {
            self.refund_fenced_out().await;
        }
        if written == Some(Fenced::Written) {
            self.shared.metrics.finished("failed");
            tracing::info!(outcome = "failed", code, error = %message, "report failed");
            self.report_finished("failed", Some(message));
        }
        written
    }

    /// The current upstream task is over for this row: a new task after a backoff while
    /// attempts remain, else failed. A task the provider may still finish (`alive`) is
    /// kept in `report_orphan_tasks`, and on a row that fails, on the row too, so that a
    /// `report_retry` polls it before buying another.
    async fn lose_task(&self, code: Option<i32>, why: &str, alive: bool) {
        let row = &self.row;
        let new_task_after = (row.attempts < row.max_attempts).then(|| {
            self.shared
                .config
                .retry
                .new_task_delay(row.attempts, unit())
        });
        let message = match new_task_after {
            Some(delay) => {
                tracing::info!(
                    outcome = "new_task",
                    attempts = row.attempts,
                    ?delay,
                    why,
                    "a new upstream task will be created"
                );
                why.to_string()
            }
            None => format!("{why} (after {} upstream tasks)", row.attempts),
        };
        let lost = LostTask {
            id: row.id,
            token: row.lease_token,
            code,
            message: &message,
            alive,
            new_task_after,
        };
        let pool = &self.shared.pool;
        let written = self
            .write("give the task up", || queue::lose_task(pool, &lost))
            .await;
        if written == Some(Fenced::Written) && new_task_after.is_none() {
            self.shared.metrics.finished("failed");
            tracing::info!(outcome = "failed", code, error = %message, "report failed");
            self.report_finished("failed", Some(&message));
        }
    }

    /// Trouble that is not the row's fault: transient errors back off (and fail the row
    /// only once the retry budget is spent), rate limits retry soon, account stops are
    /// recorded for every process and leave the row as it was.
    async fn retry_later(&self, e: UpstreamError, intent: Intent) {
        let code = e.code();
        let message = e.to_string();
        let (kind, delay) = match &e {
            UpstreamError::AccountStop { .. } => {
                let endpoint = match self.row.state {
                    RequestState::Queued => "create",
                    _ => "status",
                };
                self.stop_account(&e, endpoint, &message).await;
                (Retry::Noted, Duration::ZERO)
            }
            UpstreamError::RateLimited { .. } => (
                Retry::Quiet,
                Duration::from_secs(1) + Duration::from_secs(2).mul_f64(unit()),
            ),
            _ => {
                // transient_since was written by the database's clock: judge it by the
                // same clock (read at the claim) rather than this host's.
                let retry = &self.shared.config.retry;
                let now = self.row.db_now;
                let since = self.row.transient_since.unwrap_or(now);
                if retry.exhausted(since, now) {
                    let why = format!(
                        "gave up after {} of transient errors; last: {message}",
                        humantime::format_duration(retry.budget)
                    );
                    self.fail(code, &why, intent).await;
                    return;
                }
                let n = (self.row.transient_errors + 1).max(1) as u32;
                let delay = retry.transient_delay(n, unit());
                tracing::debug!(delay = %humantime::format_duration(delay), error = %message, "transient error; retrying later");
                (Retry::Transient, delay)
            }
        };
        self.retry_write(kind, code, &message, delay, intent).await;
    }

    async fn retry_write(
        &self,
        kind: Retry,
        code: Option<i32>,
        message: &str,
        delay: Duration,
        intent: Intent,
    ) -> Option<Fenced> {
        let (pool, row) = (&self.shared.pool, &self.row);
        let written = self
            .write("retry later", || {
                queue::retry_later(
                    pool,
                    row.id,
                    row.lease_token,
                    kind,
                    code,
                    message,
                    delay,
                    intent,
                )
            })
            .await;
        if written == Some(Fenced::Lost) && intent == Intent::Refund {
            self.refund_fenced_out().await;
        }
        written
    }

    /// This claim's create certainly made no task, but the row is no longer this claim's
    /// (cancelled and retried while the create was on the wire): the retried row still
    /// carries the intent as its first attempt. Given back by the intent itself.
    async fn refund_fenced_out(&self) {
        let Some(started_at) = *self.intent.lock().unwrap_or_else(|p| p.into_inner()) else {
            return;
        };
        let (pool, id) = (&self.shared.pool, self.row.id);
        match (|| queue::refund_intent(pool, id, started_at))
            .retry(queue::backoff())
            .when(queue::is_retryable)
            .await
        {
            Ok(true) => tracing::info!(
                "the row was retried while its create was on the wire, and the create made no task: the retried row's attempt is given back"
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "could not give back the create's attempt"),
        }
    }

    /// Records an account stop caused by this row's call to `endpoint`.
    async fn stop_account(&self, stop: &UpstreamError, endpoint: &str, answer: &str) {
        let cause = queue::StopCause {
            request_id: self.row.id,
            endpoint,
            answer,
        };
        let on_create = endpoint == "create";
        self.account().record_stop(stop, on_create, cause).await;
    }

    /// The create's answer could not be written to the row (cancelled or taken over):
    /// clear its intent so that a retry of the row does not wait for it.
    async fn forget_create(&self, started_at: DateTime<Utc>) {
        let pool = &self.shared.pool;
        let id = self.row.id;
        let _ = (|| queue::forget_create(pool, id, started_at))
            .retry(queue::backoff())
            .when(queue::is_retryable)
            .await;
    }

    /// Waits for the account's next call slot, then calls the metered API; notes
    /// whether the provider answered normally (for the probe of a stopped account).
    async fn paced<T, F, Fut>(&self, endpoint: &'static str, call: F) -> Result<T, UpstreamError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        let r = self
            .account()
            .paced(&self.shared.metrics, endpoint, call)
            .await;
        if matches!(r, Ok(_) | Err(UpstreamError::Rejected { .. })) {
            self.answered_normally.store(true, Ordering::Relaxed);
        }
        r
    }

    /// Runs `step` unless shutdown begins first (then `None`: the step is dropped).
    /// Only for steps that cost nothing when dropped: never a create on the wire.
    async fn unless_stopping<T>(&self, step: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            _ = self.stopping.cancelled() => None,
            r = step => Some(r),
        }
    }

    /// A write fenced by this claim, retried through a restart or a dropped connection.
    async fn write<F, Fut>(&self, what: &str, f: F) -> Option<Fenced>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Fenced, sqlx::Error>>,
    {
        let result = f
            .retry(queue::backoff())
            .when(queue::is_retryable)
            .await
            .map_err(WriteError::from);
        self.fenced(what, result)
    }

    /// Logs what a fenced write found. `None`: the write failed; the row will be redone
    /// after its lease expires.
    fn fenced(&self, what: &str, reply: Result<Fenced, WriteError>) -> Option<Fenced> {
        match reply {
            Ok(Fenced::Written) => Some(Fenced::Written),
            Ok(Fenced::Lost) => {
                tracing::info!(
                    what,
                    "row no longer ours (lease lost or cancelled); outcome dropped"
                );
                Some(Fenced::Lost)
            }
            Err(error) => {
                tracing::error!(
                    what,
                    %error,
                    "could not record the outcome; the row will be redone after its lease expires"
                );
                None
            }
        }
    }

    /// The database's clock now, from the claim's reading plus local elapsed time.
    pub(super) fn now(&self) -> DateTime<Utc> {
        self.row.db_now + chrono::Duration::from_std(self.claimed_at.elapsed()).unwrap_or_default()
    }
}

/// How metrics name a create's result.
fn create_outcome<T>(r: &Result<T, CreateError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(CreateError::Unknown(_)) => "unanswered",
        Err(CreateError::NotCreated(e)) => outcome::<()>(&Err(e.clone())),
    }
}

/// Why a row whose attempts are spent failed: how many tasks it paid for and how many
/// creates got no answer (each may be a paid task at the provider without a job id
/// here).
fn spent_message(attempts: i32, unanswered: i32, last: &str) -> String {
    if unanswered > 0 {
        format!(
            "gave up after {attempts} upstream tasks: {unanswered} of the creates got no usable answer, so up to {unanswered} paid tasks may exist at the provider without a job id here; last: {last}"
        )
    } else {
        format!("gave up after {attempts} upstream tasks; last: {last}")
    }
}
