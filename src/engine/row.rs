//! One claimed row's life: create → poll → download → store. Each step ends in a typed
//! `Outcome`, and `settle` writes it, fenced by the claim's lease token, so a row whose
//! lease expired or that a person cancelled is never overwritten.
//!
//! Read top to bottom: `run` → `live` → `create` / `poll` → `download` → `settle` →
//! `store` / `fail` / `new_task_later` / `retry_later`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use tokio::time::Instant;

use super::Shared;
use super::account::outcome;
use super::policy::Progress;
use crate::domain::{Document, JobId, RequestState};
use crate::queue::{self, Claimed, Completed, Created, Fenced, Retry, Snoozed, WriteError};
use crate::upstream::client::CreateTask;
use crate::upstream::{TaskStatus, UpstreamError};

/// What one step of a row's life came to.
#[derive(Debug)]
enum Outcome {
    /// The upstream task exists: record its job id and start polling.
    TaskCreated(JobId),
    /// The task is not ready yet: poll again at this time (a snooze, not an attempt).
    NotReady { next_poll_at: DateTime<Utc> },
    /// The report is downloaded and verified: store it and finish the row.
    Downloaded(Document),
    /// The current task is lost (job_status 3, the window ran out, the provider
    /// refuses to talk about it): a new task while attempts remain, else failed.
    TaskLost { code: Option<i32>, why: String },
    /// The request can never succeed: fail it.
    Refused { code: Option<i32>, message: String },
    /// Trouble that is not the row's fault (transient, rate limited, account stop):
    /// try the same step again later.
    Trouble(UpstreamError),
    /// Nothing to do (a row in a state the engine does not work on).
    Nothing,
}

pub(super) struct RowTask {
    shared: Arc<Shared>,
    row: Claimed,
    /// Whether this row is the probe of a stopped account.
    probe: bool,
    /// When the row was claimed, to tell the database's time from `row.db_now`.
    claimed_at: Instant,
    /// Whether the provider's metered API answered normally (a success or a refusal
    /// about this request): what ends an account stop when this row is the probe.
    answered_normally: AtomicBool,
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
    pub(super) fn new(shared: Arc<Shared>, row: Claimed, probe: bool) -> RowTask {
        RowTask {
            shared,
            row,
            probe,
            claimed_at: Instant::now(),
            answered_normally: AtomicBool::new(false),
        }
    }

    /// The whole of this claim: one step of the row's life, its outcome written, and
    /// the account's stop lifted when this row was the probe and the provider answered.
    pub(super) async fn run(self) {
        let outcome = self.live().await;
        self.settle(outcome).await;
        if self.probe && self.answered_normally.load(Ordering::Relaxed) {
            self.shared.account.clear_stop().await;
        }
    }

    async fn live(&self) -> Outcome {
        match self.row.state {
            RequestState::Queued => self.create().await,
            RequestState::Generating => self.poll().await,
            other => {
                tracing::warn!(state = %other, "claimed a row in an unexpected state");
                Outcome::Nothing
            }
        }
    }

    /// Creates the upstream task. Not retried in-process: a create that timed out may
    /// have created a paid task, so the next try waits for its persisted schedule.
    async fn create(&self) -> Outcome {
        let task = CreateTask {
            company_name: self.row.company_name.clone(),
            credit_code: self.row.credit_code.clone(),
            org_number: self.row.org_number.clone(),
            report_type: Some(self.row.report_type),
        };
        let client = &self.shared.client;
        match self.paced("create", || client.create_task(&task)).await {
            Ok(job) => Outcome::TaskCreated(job),
            Err(UpstreamError::Rejected { code, message }) => Outcome::Refused { code, message },
            Err(e) => Outcome::Trouble(e),
        }
    }

    /// Asks the provider how the task is doing; downloads it when it is ready.
    async fn poll(&self) -> Outcome {
        let Some(job) = self.row.upstream_job_id.clone() else {
            return Outcome::Refused {
                code: None,
                message: "generating without a valid upstream job id".into(),
            };
        };
        let client = &self.shared.client;
        let status = (|| self.paced("status", || client.task_status(&job)))
            .retry(immediate_retries())
            .when(|e| matches!(e, UpstreamError::Transient { .. }))
            .await;
        let progress = match status {
            Ok(TaskStatus::Ready { download_url }) => {
                return self.download(&job, &download_url).await;
            }
            Ok(TaskStatus::Waiting { .. }) => Progress::Queued,
            Ok(TaskStatus::Exporting) => Progress::Exporting,
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
            Err(e) => return Outcome::Trouble(e),
        };
        let policy = &self.shared.config.poll;
        let created = self.row.upstream_created_at.unwrap_or(self.row.db_now);
        match policy.next_poll_at(created, self.now(), progress, unit()) {
            Some(next_poll_at) => Outcome::NotReady { next_poll_at },
            None => Outcome::TaskLost {
                code: None,
                why: format!(
                    "no result within {} of creating upstream task {job}",
                    humantime::format_duration(policy.window)
                ),
            },
        }
    }

    /// Downloads the report from its pre-signed link and verifies it. Downloads go to
    /// object storage, not the metered API: no pacing; they are idempotent, so
    /// transient trouble is retried at once a couple of times.
    async fn download(&self, job: &JobId, url: &str) -> Outcome {
        let shared = &self.shared;
        let result = (|| async {
            let r = shared
                .client
                .download(url, self.row.report_type, Some(job))
                .await;
            shared.metrics.call("download", outcome(&r));
            r
        })
        .retry(immediate_retries())
        .when(|e| matches!(e, UpstreamError::Transient { .. }))
        .await;
        match result {
            Ok(document) => Outcome::Downloaded(document),
            Err(UpstreamError::Rejected { code, message }) => Outcome::Refused { code, message },
            Err(e) => Outcome::Trouble(e),
        }
    }

    /// Writes the outcome of this claim, fenced by its lease token.
    async fn settle(&self, outcome: Outcome) {
        match outcome {
            Outcome::TaskCreated(job) => {
                tracing::Span::current().record("job", tracing::field::display(&job));
                tracing::debug!("upstream task created");
                let created = Created {
                    id: self.row.id,
                    token: self.row.lease_token,
                    job_id: job,
                    first_poll_in: self.shared.config.poll.first_poll_delay(),
                };
                let reply = self.shared.writer.created(created).await;
                if self.fenced("mark generating", reply) != Some(Fenced::Written) {
                    tracing::warn!(
                        "an upstream task was created for a row this worker no longer holds"
                    );
                }
            }
            Outcome::NotReady { next_poll_at } => {
                let snoozed = Snoozed {
                    id: self.row.id,
                    token: self.row.lease_token,
                    next_poll_at,
                };
                let reply = self.shared.writer.snoozed(snoozed).await;
                self.fenced("snooze", reply);
            }
            Outcome::Downloaded(document) => self.store(document).await,
            Outcome::TaskLost { code, why } => self.new_task_later(code, &why).await,
            Outcome::Refused { code, message } => self.fail(code, &message).await,
            Outcome::Trouble(e) => self.retry_later(e).await,
            Outcome::Nothing => {}
        }
    }

    /// The document and `succeeded`, in one transaction.
    async fn store(&self, document: Document) {
        let (bytes, file) = (document.content.len(), document.file_name.clone());
        let completed = Completed {
            id: self.row.id,
            token: self.row.lease_token,
            document,
        };
        let reply = self.shared.writer.completed(completed).await;
        if self.fenced("complete", reply) == Some(Fenced::Written) {
            self.shared.metrics.finished("succeeded");
            if let Ok(d) = (Utc::now() - self.row.created_at).to_std() {
                self.shared.metrics.insert_to_document(d);
            }
            tracing::info!(bytes, %file, "report stored");
        }
    }

    async fn fail(&self, code: Option<i32>, message: &str) {
        let (pool, row) = (&self.shared.pool, &self.row);
        let written = self
            .write("fail", || {
                queue::fail(pool, row.id, row.lease_token, code, message)
            })
            .await;
        if written == Some(Fenced::Written) {
            self.shared.metrics.finished("failed");
            tracing::info!(?code, message, "report failed");
        }
    }

    /// The current upstream task is lost: a new task after a backoff while attempts
    /// remain, else failed.
    async fn new_task_later(&self, code: Option<i32>, why: &str) {
        let row = &self.row;
        if row.attempts < row.max_attempts {
            let delay = self
                .shared
                .config
                .retry
                .new_task_delay(row.attempts, unit());
            tracing::info!(
                attempts = row.attempts,
                ?delay,
                why,
                "a new upstream task will be created"
            );
            let pool = &self.shared.pool;
            self.write("requeue", || {
                queue::requeue_for_new_task(pool, row.id, row.lease_token, code, why, delay)
            })
            .await;
        } else {
            let message = format!("{why} (after {} upstream tasks)", row.attempts);
            self.fail(code, &message).await;
        }
    }

    /// Trouble that is not the row's fault: transient errors back off (and fail the row
    /// only once the retry budget is spent), rate limits retry soon, account stops are
    /// recorded for every process and leave the row as it was.
    async fn retry_later(&self, e: UpstreamError) {
        let code = e.code();
        let message = e.to_string();
        let (kind, delay) = match &e {
            UpstreamError::AccountStop { .. } => {
                let on_create = self.row.state == RequestState::Queued;
                self.shared.account.record_stop(&e, on_create).await;
                (Retry::Stopped, Duration::ZERO)
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
                    self.fail(code, &why).await;
                    return;
                }
                let n = (self.row.transient_errors + 1).max(1) as u32;
                let delay = retry.transient_delay(n, unit());
                tracing::debug!(?delay, error = %message, "transient error; retrying later");
                (Retry::Transient, delay)
            }
        };
        let (pool, row) = (&self.shared.pool, &self.row);
        self.write("retry later", || {
            queue::retry_later(pool, row.id, row.lease_token, kind, code, &message, delay)
        })
        .await;
    }

    /// Waits for the account's next call slot, then calls the metered API; notes
    /// whether the provider answered normally (for the probe of a stopped account).
    async fn paced<T, F, Fut>(&self, endpoint: &'static str, call: F) -> Result<T, UpstreamError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        let shared = &self.shared;
        let r = shared.account.paced(&shared.metrics, endpoint, call).await;
        if matches!(r, Ok(_) | Err(UpstreamError::Rejected { .. })) {
            self.answered_normally.store(true, Ordering::Relaxed);
        }
        r
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
    fn now(&self) -> DateTime<Utc> {
        self.row.db_now + chrono::Duration::from_std(self.claimed_at.elapsed()).unwrap_or_default()
    }
}
