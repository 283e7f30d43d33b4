//! The HTTP client for the provider: one shared bearer token per process, the three
//! business calls, and the streamed, verified download.
//!
//! It owns talking HTTP and classifying answers; it does not own retries across time,
//! pacing or account stops — the worker decides those from the `UpstreamError`s it gets.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;
use futures_util::StreamExt;
use reqwest::header::{CONTENT_DISPOSITION, CONTENT_TYPE, RETRY_AFTER};
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::document;
use super::envelope::{interpret, is_explicit_refusal, parse_token};
use super::{CreateError, Secret, UpstreamError};
use crate::domain::{Document, JobId, ReportType, clip};

pub const DEFAULT_BASE_URL: &str = "https://connect.patsnap.com";
pub const CREATE_PATH: &str = "/innovation/company-report/task/create";
pub const STATUS_PATH: &str = "/innovation/company-report/job_id/status";
pub const TOKEN_PATH: &str = "/oauth/token";
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
}

impl ClientConfig {
    pub fn new(base_url: impl Into<String>, credentials: Credentials) -> ClientConfig {
        ClientConfig {
            base_url: base_url.into(),
            credentials,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            max_download_bytes: 200 * 1024 * 1024,
        }
    }
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

/// A token and when to fetch the next one.
struct CachedToken {
    token: Secret,
    refresh_at: Instant,
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    config: Arc<ClientConfig>,
    /// The process's one bearer token. A tokio mutex on purpose: the task that finds it
    /// stale fetches the new one while holding the lock, so every other task waits for
    /// that single fetch instead of starting its own (no stampede). Reading a fresh
    /// token holds the lock only for a clone.
    token: Arc<Mutex<Option<CachedToken>>>,
    /// Token fetches so far, for tests and metrics.
    token_fetches: Arc<AtomicU64>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// rustls needs one process-wide crypto provider; sqlx already brings ring.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Client {
    pub fn new(config: ClientConfig) -> Result<Client, UpstreamError> {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            // Downloads have no total timeout (hundreds of MB may take a while), but a
            // stalled read fails after the call timeout.
            .read_timeout(config.timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("report-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| UpstreamError::transient(format!("cannot build the HTTP client: {e}")))?;
        Ok(Client {
            http,
            config: Arc::new(config),
            token: Arc::new(Mutex::new(None)),
            token_fetches: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    pub fn token_fetches(&self) -> u64 {
        self.token_fetches.load(Ordering::Relaxed)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.config.base_url.trim_end_matches('/'), path)
    }

    /// Makes sure a fresh token is at hand, so that the next call does not begin with a
    /// token fetch (a create's time budget is for the create alone).
    pub async fn ensure_token(&self) -> Result<(), UpstreamError> {
        self.token().await.map(|_| ())
    }

    /// The current token, fetching a new one first when it is missing or due.
    async fn token(&self) -> Result<Secret, UpstreamError> {
        let mut slot = self.token.lock().await;
        if let Some(cached) = slot.as_ref().filter(|c| Instant::now() < c.refresh_at) {
            return Ok(cached.token.clone());
        }
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
        let creds = &self.config.credentials;
        let request = self
            .http
            .post(self.url(TOKEN_PATH))
            .basic_auth(&creds.client_id, Some(creds.client_secret.expose()))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials")
            .timeout(self.config.timeout);
        let (status, _, body) = self.send(request).await?;
        parse_token(status, &body, Utc::now())
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
        let response = request.send().await.map_err(|e| SendFailure {
            sent: !e.is_connect(),
            error: transport_error(e),
        })?;
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
            match interpret(status, retry_after, &body, Utc::now()) {
                Err(UpstreamError::Unauthorized { .. } | UpstreamError::BadCredentials { .. })
                    if !retried =>
                {
                    self.invalidate(&token).await;
                    retried = true;
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
    /// request, never repeated here: every create is a paid report, so whether to try
    /// again is the caller's decision, told by the error's class. A refused token is
    /// forgotten (the next call fetches a new one).
    pub async fn create_task(&self, task: &CreateTask) -> Result<JobId, CreateError> {
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
        let token = self.token().await.map_err(CreateError::NotCreated)?;
        let request = self
            .api_request(reqwest::Method::POST, CREATE_PATH, &token)
            .json(&body)
            .timeout(self.config.timeout);
        let (status, retry_after, answer) = match self.exchange(request).await {
            Ok(answer) => answer,
            Err(f) if f.sent => return Err(CreateError::Unknown(f.error)),
            Err(f) => return Err(CreateError::NotCreated(f.error)),
        };
        match interpret(status, retry_after, &answer, Utc::now()) {
            Ok(data) => JobId::from_json(data.get("job_id").unwrap_or(&Value::Null)).map_err(|e| {
                CreateError::Unknown(UpstreamError::transient(format!(
                    "a success without a readable job id: {e}"
                )))
            }),
            Err(e) if is_explicit_refusal(status, &answer) => {
                if matches!(
                    e,
                    UpstreamError::Unauthorized { .. } | UpstreamError::BadCredentials { .. }
                ) {
                    self.invalidate(&token).await;
                }
                Err(CreateError::NotCreated(e))
            }
            Err(e) => Err(CreateError::Unknown(e)),
        }
    }

    /// The status of a task. `data: null` (no such task) comes back as a refusal.
    pub async fn task_status(&self, job: &JobId) -> Result<TaskStatus, UpstreamError> {
        let data = self
            .call(|token| {
                self.api_request(reqwest::Method::GET, STATUS_PATH, token)
                    .query(&[("job_id", job.as_str())])
            })
            .await?;
        parse_status(&data)
    }

    /// Downloads a report link (no auth header: the link is pre-signed), streaming it
    /// under the size cap, and verifies it is the report that was asked for.
    pub async fn download(
        &self,
        link: &str,
        expected: ReportType,
        job: Option<&JobId>,
    ) -> Result<Document, UpstreamError> {
        let cap = self.config.max_download_bytes;
        let too_large = || UpstreamError::Rejected {
            code: None,
            message: format!("the report is larger than the download cap of {cap} bytes"),
        };
        let response = self.http.get(link).send().await.map_err(transport_error)?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(UpstreamError::Transient {
                code: Some(i32::from(status)),
                message: format!("download answered HTTP {status}"),
                retry_after: None,
            });
        }
        if response.content_length().is_some_and(|n| n > cap) {
            return Err(too_large());
        }
        let disposition = response.headers().get(CONTENT_DISPOSITION).and_then(|v| {
            v.to_str()
                .ok()
                .map(str::to_owned)
                .or_else(|| Some(String::from_utf8_lossy(v.as_bytes()).into_owned()))
        });
        let mut content =
            Vec::with_capacity(response.content_length().unwrap_or(0).min(cap) as usize);
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(transport_error)?;
            if content.len() as u64 + chunk.len() as u64 > cap {
                return Err(too_large());
            }
            content.extend_from_slice(&chunk);
        }
        document::check_report(&content, expected)
            .map_err(|why| UpstreamError::transient(format!("download is not a report: {why}")))?;
        let raw_name = disposition
            .as_deref()
            .and_then(document::filename_from_disposition)
            .or_else(|| document::filename_from_url(link))
            .unwrap_or_default();
        Ok(Document {
            sha256: document::sha256_hex(&content),
            file_name: document::sanitize_file_name(&raw_name, expected, job),
            content_type: expected.content_type(),
            content,
        })
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
fn transport_error(e: reqwest::Error) -> UpstreamError {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "the answer broke off"
    } else {
        "request failed"
    };
    let e = e.without_url();
    let mut message = format!("{kind}: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(&format!(": {s}"));
        source = s.source();
    }
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
