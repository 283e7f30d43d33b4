//! The HTTP client for the provider: one shared bearer token per process, the three
//! business calls, and the streamed, verified download.
//!
//! It owns talking HTTP and classifying answers; it does not own retries across time,
//! pacing or account stops — the worker decides those from the `UpstreamError`s it gets.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::envelope::{error_code_of, interpret, parse_token};
use super::links::{LinkRules, MemoryBudget, redirect_policy};
use super::{CreateError, Secret, UpstreamError};
use crate::domain::{Clock, JobId, ReportType, clip};

pub const DEFAULT_BASE_URL: &str = "https://connect.patsnap.com";
/// The endpoints' paths as public clients of the platform call them (the endpoint text
/// this project starts from names none): the defaults of `Paths`.
pub const CREATE_PATH: &str = "/innovation/company-report/task/create";
pub const STATUS_PATH: &str = "/innovation/company-report/job_id/status";
pub const TOKEN_PATH: &str = "/oauth/token";

/// Where the three calls go, under the base URL (`UPSTREAM_TOKEN_PATH`,
/// `UPSTREAM_CREATE_PATH`, `UPSTREAM_STATUS_PATH`): a contract that documents other
/// paths, or a gateway in front of the provider, needs no change to the code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub token: String,
    pub create: String,
    pub status: String,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            token: TOKEN_PATH.into(),
            create: CREATE_PATH.into(),
            status: STATUS_PATH.into(),
        }
    }
}

impl Paths {
    /// The settings' names, for errors.
    pub const SETTINGS: [&str; 3] = [
        "UPSTREAM_TOKEN_PATH",
        "UPSTREAM_CREATE_PATH",
        "UPSTREAM_STATUS_PATH",
    ];

    /// Each path must start with `/` and hold no query or fragment (the calls add
    /// their own query); an error names the path by `names` (token, create, status).
    pub fn check(&self, names: [&str; 3]) -> Result<(), String> {
        for (name, path) in names
            .into_iter()
            .zip([&self.token, &self.create, &self.status])
        {
            if !path.starts_with('/') || path.contains(['?', '#', ' ']) {
                return Err(format!(
                    "{name} {path:?} must be a path that starts with / and holds no query, fragment or space"
                ));
            }
        }
        Ok(())
    }
}
/// API answers are small; anything larger is not an answer.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// The account: the id is also the `apikey` query parameter; the secret only ever
/// leaves the process in the token request's Basic auth header.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub client_id: String,
    pub client_secret: Secret,
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub base_url: String,
    pub credentials: Credentials,
    /// One API call, start to finish. Above the provider's 10 s maximum on purpose: a
    /// shorter timeout turns slow successes into duplicate paid tasks.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Downloads above this are refused without being held in memory.
    pub max_download_bytes: u64,
    /// One download, start to finish (a server that trickles bytes must not hold a slot
    /// and a lease forever).
    pub download_timeout: Duration,
    /// Hosts download links and their redirects may point at (`*.suffix` allowed);
    /// empty: the link's own host, redirects staying on it.
    pub download_hosts: Vec<String>,
    /// Bytes of documents all downloads of this process may hold in memory at once.
    pub download_memory: u64,
    /// The client's clock: "now" for answers that depend on the time (67200007).
    pub clock: Clock,
    /// The calls' paths under `base_url`.
    pub paths: Paths,
}

impl ClientConfig {
    pub fn new(base_url: impl Into<String>, credentials: Credentials) -> ClientConfig {
        ClientConfig {
            base_url: base_url.into(),
            credentials,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            max_download_bytes: 200 * 1024 * 1024,
            download_timeout: Duration::from_secs(300),
            download_hosts: Vec::new(),
            download_memory: 512 * 1024 * 1024,
            clock: Clock::default(),
            paths: Paths::default(),
        }
    }

    /// Which download links are acceptable: https only when the provider is reached
    /// over https (plain http is for a local simulator), on the allowed hosts.
    pub fn link_rules(&self) -> LinkRules {
        LinkRules {
            https_only: !self
                .base_url
                .trim()
                .to_ascii_lowercase()
                .starts_with("http://"),
            hosts: self.download_hosts.clone(),
        }
    }
}

/// Spaces the client's own extra calls — token fetches, the retry after a refused
/// token — on the account's shared call schedule, like every other call. The engine
/// sets it; without one, those calls are not paced.
pub trait Pacer: Send + Sync + 'static {
    fn wait(&self) -> BoxFuture<'_, ()>;
}

/// What one report request asks the provider for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateTask {
    pub company_name: Option<String>,
    pub credit_code: Option<String>,
    pub org_number: Option<String>,
    pub report_type: Option<ReportType>,
}

/// The state of an upstream task, from the status call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskStatus {
    /// `job_status` 0: queued at the provider, `queue_num` jobs ahead.
    Waiting { queue_num: Option<i64> },
    /// `job_status` 1.
    Exporting,
    /// `job_status` 2: the pre-signed link to download.
    Ready { download_url: String },
    /// `job_status` 3: generation failed, with the provider's `abnormal_cause`.
    Failed { cause: String },
}

impl TaskStatus {
    /// The provider's `job_status` for this state.
    pub fn job_status(&self) -> i64 {
        match self {
            TaskStatus::Waiting { .. } => 0,
            TaskStatus::Exporting => 1,
            TaskStatus::Ready { .. } => 2,
            TaskStatus::Failed { .. } => 3,
        }
    }
}

/// An answer as it came back (`Client::token_exchange`). Not `Debug`: the body holds
/// the token.
pub struct RawAnswer {
    pub status: u16,
    /// Every header, names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub elapsed: Duration,
}

impl RawAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A token and when to fetch the next one.
struct CachedToken {
    token: Secret,
    refresh_at: Instant,
}

#[derive(Clone)]
pub struct Client {
    /// API calls: no redirects (an API answer that redirects is not an answer).
    http: reqwest::Client,
    /// Downloads: redirects only where the link rules allow.
    downloads: reqwest::Client,
    config: Arc<ClientConfig>,
    /// Shared by every download of the process (all clones of this client).
    memory: MemoryBudget,
    /// Set once by the engine; shared by all clones.
    pacer: Arc<std::sync::OnceLock<Arc<dyn Pacer>>>,
    /// The process's one bearer token. A tokio mutex on purpose: the task that finds it
    /// stale fetches the new one while holding the lock, so every other task waits for
    /// that single fetch instead of starting its own (no stampede). Reading a fresh
    /// token holds the lock only for a clone.
    token: Arc<Mutex<Option<CachedToken>>>,
    /// Token fetches so far, for tests and metrics.
    token_fetches: Arc<AtomicU64>,
    /// The current streak of API calls that got no answer at all.
    reach: Arc<std::sync::Mutex<Reach>>,
}

/// Calls in a row that got no answer (nothing listens, DNS, TLS, a timeout), since when,
/// and the last one's error.
#[derive(Debug, Clone, Default)]
struct Reach {
    since: Option<chrono::DateTime<chrono::Utc>>,
    calls: u32,
    error: String,
}

/// The provider has not answered lately (`Client::unanswered`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unanswered {
    pub since: chrono::DateTime<chrono::Utc>,
    /// Calls in a row without an answer.
    pub calls: u32,
    pub error: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

pub use crate::config::install_crypto_provider;

impl Client {
    pub fn new(config: ClientConfig) -> Result<Client, UpstreamError> {
        install_crypto_provider();
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(config.connect_timeout)
                // A stalled read fails after the call timeout; downloads also have an
                // overall deadline (download_timeout).
                .read_timeout(config.timeout)
                .pool_idle_timeout(Duration::from_secs(60))
                .user_agent(concat!("report-worker/", env!("CARGO_PKG_VERSION")))
        };
        let built = |r: reqwest::Result<reqwest::Client>| {
            r.map_err(|e| UpstreamError::transient(format!("cannot build the HTTP client: {e}")))
        };
        let http = built(
            builder()
                .redirect(reqwest::redirect::Policy::none())
                .build(),
        )?;
        let downloads = built(
            builder()
                .redirect(redirect_policy(config.link_rules()))
                .build(),
        )?;
        Ok(Client {
            http,
            downloads,
            memory: MemoryBudget::new(config.download_memory),
            pacer: Arc::new(std::sync::OnceLock::new()),
            config: Arc::new(config),
            token: Arc::new(Mutex::new(None)),
            token_fetches: Arc::new(AtomicU64::new(0)),
            reach: Default::default(),
        })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Paces the client's own extra calls from now on (see `Pacer`); once.
    pub fn set_pacer(&self, pacer: Arc<dyn Pacer>) {
        let _ = self.pacer.set(pacer);
    }

    async fn pace(&self) {
        if let Some(pacer) = self.pacer.get() {
            pacer.wait().await;
        }
    }

    pub(super) fn downloads(&self) -> &reqwest::Client {
        &self.downloads
    }

    /// The process's memory budget for documents.
    pub fn memory(&self) -> &MemoryBudget {
        &self.memory
    }

    pub fn token_fetches(&self) -> u64 {
        self.token_fetches.load(Ordering::Relaxed)
    }

    /// Whether the provider has stopped answering: `None` while its calls get answers.
    pub fn unanswered(&self) -> Option<Unanswered> {
        let reach = self.reach.lock().unwrap_or_else(|p| p.into_inner());
        reach.since.map(|since| Unanswered {
            since,
            calls: reach.calls,
            error: reach.error.clone(),
        })
    }

    /// A call got no answer: the first of a streak is a warning (the rows only retry).
    fn unanswered_call(&self, error: &UpstreamError) {
        let mut reach = self.reach.lock().unwrap_or_else(|p| p.into_inner());
        reach.calls += 1;
        reach.error = error.to_string();
        if reach.since.is_none() {
            reach.since = Some(chrono::Utc::now());
            tracing::warn!(
                provider = %crate::config::redact_url(&self.config.base_url),
                account = %self.config.credentials.client_id,
                %error,
                "the provider does not answer: rows wait and retry (see `report-worker status`)"
            );
        }
    }

    /// A call got an answer (any status): the provider is reachable.
    fn answered(&self) {
        let mut reach = self.reach.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(since) = reach.since.take() {
            tracing::info!(
                provider = %crate::config::redact_url(&self.config.base_url),
                calls = reach.calls,
                since = %since.to_rfc3339(),
                "the provider answers again"
            );
            reach.calls = 0;
        }
    }

    /// The address of `path` under the base URL.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.config.base_url.trim_end_matches('/'), path)
    }

    /// A fresh token for a create, fetched now if the one at hand is missing or due: a
    /// create gets its token before its intent is committed, so that the create's time
    /// budget is for the create alone (see `create_task`).
    pub async fn token_for_create(&self) -> Result<Secret, UpstreamError> {
        self.token().await
    }

    /// The current token, fetching a new one first when it is missing or due.
    async fn token(&self) -> Result<Secret, UpstreamError> {
        let mut slot = self.token.lock().await;
        if let Some(cached) = slot.as_ref().filter(|c| Instant::now() < c.refresh_at) {
            return Ok(cached.token.clone());
        }
        self.pace().await;
        let answer = self.fetch_token().await?;
        // Refresh ahead of expiry: 60 s early for the documented 30-minute tokens, a
        // quarter of the lifetime for short-lived ones, so a 5 s token is still reused
        // for ~4 s rather than fetched per call.
        let margin = Duration::from_secs(60).min(answer.expires_in / 4);
        *slot = Some(CachedToken {
            token: answer.token.clone(),
            refresh_at: Instant::now() + answer.expires_in - margin,
        });
        Ok(answer.token)
    }

    /// Forgets `token` if it is still the current one (another task may already have
    /// replaced it, in which case the newer token is kept).
    async fn invalidate(&self, token: &Secret) {
        let mut slot = self.token.lock().await;
        if slot.as_ref().is_some_and(|c| &c.token == token) {
            *slot = None;
        }
    }

    async fn fetch_token(&self) -> Result<super::envelope::TokenAnswer, UpstreamError> {
        self.token_fetches.fetch_add(1, Ordering::Relaxed);
        let (status, _, body) = self.send(self.token_request()).await?;
        parse_token(status, &body, self.config.clock.now())
    }

    fn token_request(&self) -> reqwest::RequestBuilder {
        let creds = &self.config.credentials;
        self.http
            .post(self.url(&self.config.paths.token))
            .basic_auth(&creds.client_id, Some(creds.client_secret.expose()))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials")
            .timeout(self.config.timeout)
    }

    /// One token call exactly as it came back, headers and all, for `check-provider`:
    /// nothing is cached or interpreted. Only a failure to get any answer is an error.
    pub async fn token_exchange(&self) -> Result<RawAnswer, UpstreamError> {
        self.token_fetches.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let response = self.token_request().send().await.map_err(transport_error)?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.as_str().to_string(), value)
            })
            .collect();
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(transport_error)?;
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(UpstreamError::transient("answer larger than 1 MiB"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(RawAnswer {
            status,
            headers,
            body,
            elapsed: started.elapsed(),
        })
    }

    /// Sends one request and reads its (small) answer. Transport failures are transient.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(u16, Option<Duration>, Vec<u8>), UpstreamError> {
        self.exchange(request).await.map_err(|f| f.error)
    }

    /// `send`, telling a failure before the request left (no connection could be made)
    /// from one after (a timeout, a reset, a body that broke off).
    async fn exchange(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(u16, Option<Duration>, Vec<u8>), SendFailure> {
        let after_sending = |error| SendFailure { error, sent: true };
        let response = match request.send().await {
            Ok(response) => {
                self.answered();
                response
            }
            Err(e) => {
                let failure = SendFailure {
                    sent: !e.is_connect(),
                    error: transport_error(e),
                };
                self.unanswered_call(&failure.error);
                return Err(failure);
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| after_sending(transport_error(e)))?;
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(after_sending(UpstreamError::transient(
                    "answer larger than 1 MiB",
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, retry_after, body))
    }

    /// A business call with the bearer token and `apikey`. A refused token (401,
    /// 67200009, 67200003) is replaced once and the call retried once.
    async fn call(
        &self,
        build: impl Fn(&Secret) -> reqwest::RequestBuilder,
    ) -> Result<Value, UpstreamError> {
        let mut retried = false;
        loop {
            let token = self.token().await?;
            let request = build(&token).timeout(self.config.timeout);
            let (status, retry_after, body) = self.send(request).await?;
            match interpret(status, retry_after, &body, self.config.clock.now()) {
                Err(UpstreamError::Unauthorized { .. } | UpstreamError::BadCredentials { .. })
                    if !retried =>
                {
                    self.invalidate(&token).await;
                    retried = true;
                    // The retry is a call like any other: it waits for its slot.
                    self.pace().await;
                }

                Err(UpstreamError::BadCredentials { message }) => {
                    return Err(UpstreamError::stop_all(67200003, message));
                }
                other => return other,
            }
        }
    }

    fn api_request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &Secret,
    ) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(token.expose())
            .query(&[("apikey", self.config.credentials.client_id.as_str())])
    }

    /// R001: creates the upstream task and returns its job id (exact digits). One
    /// request with `token` (fetched before the create's intent: nothing here waits for
    /// a token), answered or given up within `timeout`, never repeated here: every create
    /// is a paid report, so whether to try again is the caller's decision, told by the
    /// error's class (`CreateError::of_answer`). A refused token is forgotten (the next
    /// call fetches a new one).
    pub async fn create_task(
        &self,
        task: &CreateTask,
        token: &Secret,
        timeout: Duration,
    ) -> Result<JobId, CreateError> {
        let mut body = serde_json::Map::new();
        for (key, value) in [
            ("company_name", &task.company_name),
            ("credit_code", &task.credit_code),
            ("org_number", &task.org_number),
        ] {
            if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
                body.insert(key.into(), Value::String(v.into()));
            }
        }
        if let Some(t) = task.report_type {
            body.insert("report_type".into(), Value::String(t.as_str().into()));
        }
        let body = Value::Object(body);
        let request = self
            .api_request(reqwest::Method::POST, &self.config.paths.create, token)
            .json(&body)
            .timeout(timeout.min(self.config.timeout));
        let (status, retry_after, answer) = match self.exchange(request).await {
            Ok(answer) => answer,
            Err(f) if f.sent => return Err(CreateError::Unknown(f.error)),
            Err(f) => return Err(CreateError::NotCreated(f.error)),
        };
        match interpret(status, retry_after, &answer, self.config.clock.now()) {
            Ok(data) => JobId::from_json(data.get("job_id").unwrap_or(&Value::Null)).map_err(|e| {
                CreateError::Unknown(UpstreamError::transient(format!(
                    "a success without a readable job id: {e}"
                )))
            }),
            Err(e) => {
                if matches!(
                    e,
                    UpstreamError::Unauthorized { .. } | UpstreamError::BadCredentials { .. }
                ) {
                    self.invalidate(token).await;
                }
                Err(CreateError::of_reply(status, error_code_of(&answer), e))
            }
        }
    }

    /// The status of a task. `data: null` (no such task) comes back as a refusal, and
    /// so does an HTTP 404 without a provider code: an undocumented answer about this
    /// one task (expired, unknown, a gateway's page) costs the task, not the account.
    /// (Whether several tasks answering so means the account is misconfigured is the
    /// engine's call: it sees every row.)
    pub async fn task_status(&self, job: &JobId) -> Result<TaskStatus, UpstreamError> {
        let data = self
            .call(|token| {
                self.api_request(reqwest::Method::GET, &self.config.paths.status, token)
                    .query(&[("job_id", job.as_str())])
            })
            .await
            .map_err(|e| match e {
                UpstreamError::AccountStop { code: 404, .. } => UpstreamError::Rejected {
                    code: Some(404),
                    message: format!(
                        "the status of job {job} answered HTTP 404 without a provider code: the provider does not know this task"
                    ),
                },
                other => other,
            })?;
        parse_status(&data)
    }
}

/// Reads the status call's `data`.
pub fn parse_status(data: &Value) -> Result<TaskStatus, UpstreamError> {
    if data.is_null() {
        return Err(UpstreamError::Rejected {
            code: None,
            message: "the provider knows no such task (empty status answer)".into(),
        });
    }
    let malformed = |why: &str| {
        UpstreamError::transient(format!(
            "malformed status answer: {why}: {}",
            clip(&data.to_string())
        ))
    };
    let status = data
        .get("job_status")
        .and_then(|v| {
            v.as_i64()
                .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
        })
        .ok_or_else(|| malformed("no job_status"))?;
    match status {
        0 => Ok(TaskStatus::Waiting {
            queue_num: data.get("queue_num").and_then(Value::as_i64),
        }),
        1 => Ok(TaskStatus::Exporting),
        2 => match data
            .get("download_url")
            .and_then(Value::as_str)
            .map(str::trim)
        {
            Some(url) if url.starts_with("http://") || url.starts_with("https://") => {
                Ok(TaskStatus::Ready {
                    download_url: url.to_string(),
                })
            }
            _ => Err(malformed("job_status 2 without a download_url")),
        },
        3 => Ok(TaskStatus::Failed {
            cause: data
                .get("abnormal_cause")
                .and_then(Value::as_str)
                .filter(|c| !c.trim().is_empty())
                .map(clip)
                .unwrap_or_else(|| "report generation failed (no cause given)".into()),
        }),
        other => Err(malformed(&format!("unknown job_status {other}"))),
    }
}

/// A request that failed, and whether it may have reached the server.
struct SendFailure {
    error: UpstreamError,
    sent: bool,
}

/// Transport trouble is transient; the message never carries the URL (it may hold a
/// pre-signed signature) nor any header.
pub(super) fn transport_error(e: reqwest::Error) -> UpstreamError {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "the answer broke off"
    } else {
        "request failed"
    };
    let message = format!("{kind}: {}", crate::config::error_chain(&e.without_url()));
    UpstreamError::transient(clip_long(&message))
}

fn clip_long(s: &str) -> String {
    if s.len() > 300 {
        let mut end = 300;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A JSON value of any shape, a few levels deep.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            "\\PC{0,20}".prop_map(Value::String),
            prop_oneof![
                Just("0"),
                Just("1"),
                Just("2"),
                Just("3"),
                Just("http://x/y"),
                Just("")
            ]
            .prop_map(|s| Value::String(s.into())),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("job_status".to_string()),
                        Just("download_url".to_string()),
                        Just("queue_num".to_string()),
                        Just("abnormal_cause".to_string()),
                        Just("job_id".to_string()),
                        "[a-z_]{1,8}",
                    ],
                    inner,
                    0..5
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Whatever a status answer's `data` holds: a status or a classified error.
        #[test]
        fn status_answers_of_any_shape_are_classified(data in any_json()) {
            match parse_status(&data) {
                Ok(TaskStatus::Ready { download_url }) => {
                    prop_assert!(download_url.starts_with("http://") || download_url.starts_with("https://"));
                }
                Ok(_) => {}
                Err(UpstreamError::Rejected { .. } | UpstreamError::Transient { .. }) => {}
                Err(other) => prop_assert!(false, "unexpected class {other:?}"),
            }
        }

        /// Whatever a create's answer is, it is a job id or an error of one of the two
        /// classes, never a panic; and only a reply of the provider's own layers — 2xx
        /// or 4xx with one of its codes, or a bare 401/403/404 — is ever taken for
        /// "certainly not created".
        #[test]
        fn create_answers_of_any_shape_are_classified(
            status in 100u16..600,
            body in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..200),
                any_json().prop_map(|v| serde_json::to_vec(&serde_json::json!({"data": v, "status": true, "error_code": 0})).unwrap()),
                any_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
                (prop_oneof![Just(67200002i64), Just(67200009), Just(68300004), Just(67200005), Just(67200100), Just(404), Just(401), Just(12345678)], any::<bool>())
                    .prop_map(|(code, text)| {
                        let code = if text { Value::String(code.to_string()) } else { Value::from(code) };
                        serde_json::to_vec(&serde_json::json!({"data": null, "status": false, "error_code": code})).unwrap()
                    }),
            ]
        ) {
            match interpret(status, None, &body, chrono::Utc::now()) {
                Ok(data) => {
                    let _ = JobId::from_json(data.get("job_id").unwrap_or(&Value::Null));
                }
                Err(e) => {
                    let code = error_code_of(&body);
                    if let CreateError::NotCreated(_) = CreateError::of_reply(status, code, e.clone()) {
                        let layer = matches!(status, 200..=299 | 400..=499);
                        prop_assert!(layer, "{status}: {e:?}");
                        match code {
                            Some(c) => prop_assert!(c >= 100_000, "{status} {c}: {e:?}"),
                            None => prop_assert!(matches!(status, 401 | 403 | 404), "{status}: {e:?}"),
                        }
                    }
                }
            }
        }
    }
}
