//! A faithful simulator of the provider (UPSTREAM_API.md), served over real HTTP by
//! `report-worker simulate` or in-process by [`Simulator::start`] for tests, the demo
//! and benchmarks.
//!
//! It owns the provider's behaviour — tokens, validation, task generation over time,
//! pre-signed downloads, metering (QPS, daily limit, balance) and faults — and a control
//! surface under `/_sim/` (counters, outage switch, one-off injected answers). It does
//! not know anything about the worker or the database.
//!
//! Undocumented behaviour, and the choice made here: a status query for an unknown job
//! id answers like a bad parameter (HTTP 200, `status:false`, 68300004), the most
//! plausible answer of this platform's validation layer.

pub mod documents;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use chrono::{FixedOffset, NaiveDate, Utc};
use clap::Args;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{parse_duration, parse_duration_range};
use crate::domain::{ReportType, is_credit_code};
use crate::upstream::client::{CREATE_PATH, STATUS_PATH, TOKEN_PATH};
use crate::upstream::provider_message;

/// How the simulator behaves; every field is also a `simulate` flag.
#[derive(Debug, Clone, Args)]
pub struct SimConfig {
    /// The account's client id (also the apikey).
    #[arg(long, env = "SIM_CLIENT_ID", default_value = "demo-client")]
    pub client_id: String,
    /// The account's client secret.
    #[arg(
        long,
        env = "SIM_CLIENT_SECRET",
        default_value = "demo-secret",
        hide_env_values = true
    )]
    pub client_secret: String,
    /// How long a token lives.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub token_ttl: Duration,
    /// Which of the three token answer shapes to send: documented, data, access_token.
    #[arg(long, default_value = "documented")]
    pub token_shape: String,
    /// How long a create call takes to answer, MIN..MAX (the provider: 5 s normal, 10 s max).
    #[arg(long, default_value = "1s..5s", value_parser = parse_duration_range)]
    pub create_latency: (Duration, Duration),
    /// How long a report takes to generate, MIN..MAX.
    #[arg(long, default_value = "1m..10m", value_parser = parse_duration_range)]
    pub generation_time: (Duration, Duration),
    /// Share of tasks that end in job_status 3.
    #[arg(long, default_value_t = 0.02)]
    pub failure_rate: f64,
    /// Calls allowed in any one-second window (create + status); over it: 67200002.
    #[arg(long)]
    pub qps: Option<u32>,
    /// Calls allowed per provider day (Asia/Shanghai); over it: 67200007.
    #[arg(long)]
    pub daily_limit: Option<u64>,
    /// Creates the account can pay for; then 67200005.
    #[arg(long)]
    pub balance: Option<u64>,
    /// Share of calls answered with a transient fault (codes, 5xx, slow, reset, bad JSON).
    #[arg(long, default_value_t = 0.0)]
    pub fault_rate: f64,
    /// Seed for every random choice (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Approximate document size in bytes.
    #[arg(long, default_value_t = 300_000)]
    pub doc_size: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            client_id: "demo-client".into(),
            client_secret: "demo-secret".into(),
            token_ttl: Duration::from_secs(1800),
            token_shape: "documented".into(),
            create_latency: (Duration::from_secs(1), Duration::from_secs(5)),
            generation_time: (Duration::from_secs(60), Duration::from_secs(600)),
            failure_rate: 0.02,
            qps: None,
            daily_limit: None,
            balance: None,
            fault_rate: 0.0,
            seed: None,
            doc_size: 300_000,
        }
    }
}

impl SimConfig {
    /// Fast settings for tests: instant answers, reports ready at once, small documents.
    pub fn instant() -> SimConfig {
        SimConfig {
            create_latency: (Duration::ZERO, Duration::ZERO),
            generation_time: (Duration::ZERO, Duration::ZERO),
            failure_rate: 0.0,
            seed: Some(7),
            doc_size: 4_000,
            ..SimConfig::default()
        }
    }
}

/// Which endpoint an injected answer applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    Token,
    Create,
    Status,
    Download,
    /// Create or status (the metered calls).
    Any,
}

/// A one-off (or repeated) answer the next matching calls get instead of the normal one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// HTTP 200 with `status:false` and this provider code.
    Code { code: i32 },
    /// This HTTP status with a small body.
    Http { status: u16 },
    /// The connection breaks off in the middle of the answer.
    Reset,
    /// A cut-off JSON body with HTTP 200.
    Malformed,
    /// The normal answer, after this delay.
    Slow { millis: u64 },
    /// For downloads: an HTML error page served with HTTP 200.
    Html,
    /// For status calls: job_status 3 for this task from now on.
    JobFailed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Injection {
    pub endpoint: Endpoint,
    #[serde(flatten)]
    pub fault: Fault,
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

/// Counters for tests and benchmarks.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SimStats {
    /// Calls by `endpoint:outcome`, e.g. `create:ok`, `status:67200002`, `download:html`.
    pub calls: BTreeMap<String, u64>,
    pub tasks_created: u64,
    /// Upstream tasks created per identifier (company name, else credit code, else org number).
    pub tasks_per_company: BTreeMap<String, u64>,
    /// sha256 of every document served, by job id.
    pub documents: BTreeMap<String, String>,
    /// The most metered calls accepted within any one-second window.
    pub max_calls_in_one_second: usize,
    pub token_fetches: u64,
}

impl SimStats {
    pub fn calls(&self, key: &str) -> u64 {
        self.calls.get(key).copied().unwrap_or(0)
    }

    /// All calls to `endpoint` whatever their outcome.
    pub fn calls_to(&self, endpoint: &str) -> u64 {
        self.calls
            .iter()
            .filter(|(k, _)| k.split(':').next() == Some(endpoint))
            .map(|(_, v)| v)
            .sum()
    }
}

struct Job {
    created: Instant,
    generation: Duration,
    fails: bool,
    initial_queue: i64,
    company: String,
    report_type: ReportType,
    /// The date printed in the report (fixed at creation, so re-downloads match).
    created_on: String,
}

struct TokenInfo {
    client_id: String,
    expires: Instant,
}

/// Everything that changes while the simulator runs, behind one lock: handlers hold it
/// only for bookkeeping, never across a sleep or while a document is generated.
struct Inner {
    rng: StdRng,
    tokens: HashMap<String, TokenInfo>,
    jobs: HashMap<u64, Job>,
    next_job_id: u64,
    /// Accepted metered calls in the last second: the QPS window.
    window: VecDeque<Instant>,
    day: NaiveDate,
    day_calls: u64,
    balance_left: Option<u64>,
    outage: Option<i32>,
    injections: Vec<Injection>,
    stats: SimStats,
    /// When the first create call for each identifier arrived (for pickup latency).
    first_create: HashMap<String, std::time::SystemTime>,
}

impl Inner {
    /// The fault of the first pending injection that `applies`, counting it down.
    fn take_injection(&mut self, applies: impl Fn(&Injection) -> bool) -> Option<Fault> {
        let pos = self.injections.iter().position(applies)?;
        let injection = &mut self.injections[pos];
        injection.count = injection.count.saturating_sub(1);
        let fault = injection.fault.clone();
        if injection.count == 0 {
            self.injections.remove(pos);
        }
        Some(fault)
    }
}

impl Fault {
    /// How the counters name a call answered with this fault.
    fn outcome(&self) -> String {
        match self {
            Fault::Code { code } => code.to_string(),
            Fault::Http { status } => status.to_string(),
            Fault::Reset => "reset".into(),
            Fault::Malformed => "malformed".into(),
            Fault::Slow { .. } => "slow".into(),
            Fault::Html => "html".into(),
            Fault::JobFailed => "job_failed".into(),
        }
    }
}

struct Shared {
    config: SimConfig,
    /// Salt of the pre-signed links, so that a forged link is refused like COS would.
    signing_key: String,
    inner: Mutex<Inner>,
}

type AppState = Arc<Shared>;

fn shanghai_today() -> NaiveDate {
    Utc::now()
        .with_timezone(&FixedOffset::east_opt(8 * 3600).expect("offset"))
        .date_naive()
}

/// Organisation directory for identifiers that are not names (so a report by credit
/// code still names its company).
fn company_for(body: &CreateBody) -> String {
    let known = [("91110108551385082Q", "5513850T82", "小米科技有限责任公司")];
    if let Some(name) = body
        .company_name
        .as_deref()
        .filter(|s| !s.trim().is_empty())
    {
        return name.trim().to_string();
    }
    for (code, org, name) in known {
        if body.credit_code.as_deref() == Some(code) || body.org_number.as_deref() == Some(org) {
            return name.to_string();
        }
    }
    match (&body.credit_code, &body.org_number) {
        (Some(c), _) if !c.is_empty() => format!("企业 {c}"),
        (_, Some(o)) => format!("企业 {o}"),
        _ => "未知企业".into(),
    }
}

/// GB 32100-2015 check character of a unified social credit code.
pub fn credit_code_checksum_ok(code: &str) -> bool {
    const CHARS: &[u8] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";
    const WEIGHTS: [u32; 17] = [
        1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28,
    ];
    if !is_credit_code(code) {
        return false;
    }
    let bytes = code.as_bytes();
    let mut sum = 0;
    for (i, w) in WEIGHTS.iter().enumerate() {
        match CHARS.iter().position(|&c| c == bytes[i]) {
            Some(v) => sum += v as u32 * w,
            None => return false,
        }
    }
    let check = (31 - sum % 31) % 31;
    CHARS[check as usize] == bytes[17]
}

#[derive(Debug, Deserialize)]
struct CreateBody {
    company_name: Option<String>,
    credit_code: Option<String>,
    org_number: Option<String>,
    report_type: Option<String>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the counters inconsistent in a way
        // that matters to a simulator; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, key: String) {
        *self.lock().stats.calls.entry(key).or_default() += 1;
    }
}

fn envelope_error(code: i32) -> Response {
    Json(json!({"data": null, "status": false, "error_code": code, "error_msg": provider_message(code)}))
        .into_response()
}

fn ok(data: Value) -> Response {
    Json(json!({"data": data, "status": true, "error_code": 0})).into_response()
}

/// A response whose body breaks off: headers promise more than is ever sent.
fn reset_response() -> Response {
    let stream = futures_util::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "simulated reset",
        ))
    });
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("128"));
    r
}

fn fault_response(fault: &Fault) -> Option<Response> {
    Some(match fault {
        Fault::Code { code } => envelope_error(*code),
        Fault::Http { status } => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let body = format!("<html><body><h1>{status}</h1></body></html>");
            (status, [(header::CONTENT_TYPE, "text/html")], body).into_response()
        }
        Fault::Reset => reset_response(),
        Fault::Malformed => (
            [(header::CONTENT_TYPE, "application/json")],
            "{\"data\":{\"job_id\":",
        )
            .into_response(),
        Fault::Slow { .. } | Fault::Html | Fault::JobFailed => return None,
    })
}

enum Gate {
    Pass {
        slow: Option<Duration>,
        job_failed: bool,
    },
    Answer(Response),
}

impl Shared {
    /// Authentication, outage, injections, metering and random faults, in that order,
    /// for a metered call. `Pass` means: answer normally (after `slow`, if set).
    fn gate(&self, endpoint: &str, headers: &HeaderMap, query: &HashMap<String, String>) -> Gate {
        let now = Instant::now();
        let mut inner = self.lock();
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let client = match token.and_then(|t| inner.tokens.get(t)) {
            Some(info) if info.expires > now => info.client_id.clone(),
            _ => {
                drop(inner);
                self.count(format!("{endpoint}:401"));
                return Gate::Answer(
                    (
                        StatusCode::UNAUTHORIZED,
                        Json(json!({"error": "invalid_token", "error_description": "Access token is missing, invalid or expired"})),
                    )
                        .into_response(),
                );
            }
        };
        let answer = |inner: &mut Inner, outcome: String, response: Response| {
            *inner
                .stats
                .calls
                .entry(format!("{endpoint}:{outcome}"))
                .or_default() += 1;
            Gate::Answer(response)
        };
        match query.get("apikey").map(String::as_str) {
            None | Some("") => {
                return answer(&mut inner, "67200008".into(), envelope_error(67200008));
            }
            Some(key) if key != client => {
                return answer(&mut inner, "67200009".into(), envelope_error(67200009));
            }
            _ => {}
        }
        if let Some(code) = inner.outage {
            return answer(&mut inner, code.to_string(), envelope_error(code));
        }
        let mut slow = None;
        let mut job_failed = false;
        let injected = inner.take_injection(|i| {
            i.endpoint == Endpoint::Any && endpoint != "download" || i.endpoint_name() == endpoint
        });
        match injected {
            Some(Fault::Slow { millis }) => slow = Some(Duration::from_millis(millis)),
            Some(Fault::JobFailed) => job_failed = true,
            Some(fault) => {
                if let Some(response) = fault_response(&fault) {
                    return answer(&mut inner, fault.outcome(), response);
                }
            }
            None => {}
        }
        // QPS: a sliding one-second window over accepted calls.
        while inner
            .window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            inner.window.pop_front();
        }
        if self
            .config
            .qps
            .is_some_and(|qps| inner.window.len() >= qps as usize)
        {
            return answer(&mut inner, "67200002".into(), envelope_error(67200002));
        }
        let today = shanghai_today();
        if inner.day != today {
            inner.day = today;
            inner.day_calls = 0;
        }
        if self
            .config
            .daily_limit
            .is_some_and(|limit| inner.day_calls >= limit)
        {
            return answer(&mut inner, "67200007".into(), envelope_error(67200007));
        }
        if endpoint == "create" && inner.balance_left == Some(0) {
            return answer(&mut inner, "67200005".into(), envelope_error(67200005));
        }
        if self.config.fault_rate > 0.0
            && inner
                .rng
                .random_bool(self.config.fault_rate.clamp(0.0, 1.0))
        {
            let fault = match inner.rng.random_range(0..8) {
                0 => Fault::Code { code: 68300005 },
                1 => Fault::Code { code: 68300008 },
                2 => Fault::Code { code: 67200100 },
                3 => Fault::Http { status: 500 },
                4 => Fault::Http { status: 503 },
                5 => Fault::Reset,
                6 => Fault::Malformed,
                _ => Fault::Slow {
                    millis: inner.rng.random_range(200..2000),
                },
            };
            match fault_response(&fault) {
                Some(response) => return answer(&mut inner, fault.outcome(), response),
                None => {
                    if let Fault::Slow { millis } = fault {
                        slow = Some(Duration::from_millis(millis));
                    }
                }
            }
        }
        inner.window.push_back(now);
        let in_window = inner.window.len();
        inner.stats.max_calls_in_one_second = inner.stats.max_calls_in_one_second.max(in_window);
        inner.day_calls += 1;
        Gate::Pass { slow, job_failed }
    }
}

impl Injection {
    fn endpoint_name(&self) -> &'static str {
        match self.endpoint {
            Endpoint::Token => "token",
            Endpoint::Create => "create",
            Endpoint::Status => "status",
            Endpoint::Download => "download",
            Endpoint::Any => "any",
        }
    }
}

async fn token(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let injected = s.lock().take_injection(|i| i.endpoint == Endpoint::Token);
    if let Some(resp) = injected.as_ref().and_then(fault_response) {
        s.count("token:injected".into());
        return resp;
    }
    let creds = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok());
    let grant_ok = String::from_utf8_lossy(&body).contains("grant_type=client_credentials");
    let valid = creds
        .as_deref()
        .and_then(|c| c.split_once(':'))
        .is_some_and(|(id, secret)| id == s.config.client_id && secret == s.config.client_secret);
    if !valid || !grant_ok {
        s.count("token:67200003".into());
        return envelope_error(67200003);
    }
    let (token, ttl) = {
        let mut inner = s.lock();
        let token: String = (0..32)
            .map(|_| format!("{:x}", inner.rng.random_range(0..16u8)))
            .collect();
        let token = format!("eyJ{token}");
        let ttl = s.config.token_ttl;
        inner.tokens.insert(
            token.clone(),
            TokenInfo {
                client_id: s.config.client_id.clone(),
                expires: Instant::now() + ttl,
            },
        );
        // Forget long-expired tokens so a long run does not grow without bound.
        let now = Instant::now();
        inner
            .tokens
            .retain(|_, t| t.expires + Duration::from_secs(3600) > now);
        inner.stats.token_fetches += 1;
        *inner.stats.calls.entry("token:ok".into()).or_default() += 1;
        (token, ttl)
    };
    let secs = ttl.as_secs().max(1);
    let issued = Utc::now().timestamp_millis().to_string();
    let body = match s.config.token_shape.as_str() {
        "data" => {
            json!({"data": {"token": token, "expires_in": secs}, "status": true, "error_code": 0})
        }
        "access_token" => {
            json!({"access_token": token, "token_type": "bearer", "expires_in": secs})
        }
        _ => {
            json!({"token": token, "token_type": "BearerToken", "expires_in": secs, "status": "approved", "issued_at": issued})
        }
    };
    Json(body).into_response()
}

async fn create(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let arrived = std::time::SystemTime::now();
    let (slow, _) = match s.gate("create", &headers, &query) {
        Gate::Answer(r) => return r,
        Gate::Pass { slow, job_failed } => (slow, job_failed),
    };
    let latency = {
        let (lo, hi) = s.config.create_latency;
        let mut inner = s.lock();
        if hi > lo {
            inner.rng.random_range(lo..=hi)
        } else {
            lo
        }
    };
    tokio::time::sleep(latency + slow.unwrap_or_default()).await;
    let Ok(request) = serde_json::from_slice::<CreateBody>(&body) else {
        s.count("create:68300007".into());
        return envelope_error(68300007);
    };
    let report_type = request.report_type.as_deref().and_then(|t| match t {
        "word" => Some(ReportType::Word),
        "pdf" => Some(ReportType::Pdf),
        _ => None,
    });
    let blank = |v: &Option<String>| v.as_deref().is_none_or(|s| s.trim().is_empty());
    let no_identifier =
        blank(&request.company_name) && blank(&request.credit_code) && blank(&request.org_number);
    let bad_code = !blank(&request.credit_code)
        && !credit_code_checksum_ok(request.credit_code.as_deref().unwrap_or(""));
    let (Some(report_type), false, false) = (report_type, no_identifier, bad_code) else {
        s.count("create:68300004".into());
        return envelope_error(68300004);
    };
    let company = company_for(&request);
    let key = [
        &request.company_name,
        &request.credit_code,
        &request.org_number,
    ]
    .into_iter()
    .find(|v| !blank(v))
    .and_then(|v| v.clone())
    .unwrap_or_default();
    let job_id = {
        let mut inner = s.lock();
        if let Some(b) = inner.balance_left.as_mut() {
            *b = b.saturating_sub(1);
        }
        let step = inner.rng.random_range(1..4096u64);
        inner.next_job_id += step;
        let id = inner.next_job_id;
        let (lo, hi) = s.config.generation_time;
        let generation = if hi > lo {
            inner.rng.random_range(lo..=hi)
        } else {
            lo
        };
        let fails = s.config.failure_rate > 0.0
            && inner.rng.random_bool(s.config.failure_rate.clamp(0.0, 1.0));
        let initial_queue = inner.rng.random_range(0..6);
        let created_on = Utc::now().format("%Y-%m-%d %H:%M UTC").to_string();
        inner.jobs.insert(
            id,
            Job {
                created: Instant::now(),
                generation,
                fails,
                initial_queue,
                company,
                report_type,
                created_on,
            },
        );
        inner.stats.tasks_created += 1;
        inner.first_create.entry(key.clone()).or_insert(arrived);
        *inner.stats.tasks_per_company.entry(key).or_default() += 1;
        *inner.stats.calls.entry("create:ok".into()).or_default() += 1;
        id
    };
    // serde_json writes u64 exactly: a JSON number above 2^53, like the provider's.
    ok(json!({ "job_id": job_id }))
}

fn link_signature(key: &str, job_id: u64, sign_time: &str) -> String {
    hex::encode(Sha256::digest(
        format!("{key}:{job_id}:{sign_time}").as_bytes(),
    ))[..40]
        .to_string()
}

async fn status(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let (slow, job_failed) = match s.gate("status", &headers, &query) {
        Gate::Answer(r) => return r,
        Gate::Pass { slow, job_failed } => (slow, job_failed),
    };
    if let Some(d) = slow {
        tokio::time::sleep(d).await;
    }
    let Some(job_id) = query
        .get("job_id")
        .and_then(|j| j.trim().parse::<u64>().ok())
    else {
        s.count("status:68300004".into());
        return envelope_error(68300004);
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_string();
    let mut inner = s.lock();
    let Some(job) = inner.jobs.get_mut(&job_id) else {
        *inner
            .stats
            .calls
            .entry("status:68300004".into())
            .or_default() += 1;
        return envelope_error(68300004);
    };
    if job_failed {
        job.fails = true;
        job.generation = Duration::ZERO;
    }
    let elapsed = job.created.elapsed();
    let queued_for = job.generation.mul_f64(0.3);
    let (job_status, queue_num, url, cause) = if elapsed < queued_for {
        let left = 1.0 - elapsed.as_secs_f64() / queued_for.as_secs_f64().max(1e-9);
        (
            0,
            Some((job.initial_queue as f64 * left).ceil() as i64),
            None,
            None,
        )
    } else if elapsed < job.generation {
        (1, Some(0), None, None)
    } else if job.fails {
        (3, None, None, Some("由于服务器异常，正在修复中"))
    } else {
        let ext = job.report_type.as_str().replace("word", "docx");
        let sign_start = Utc::now().timestamp();
        let sign_time = format!("{sign_start};{}", sign_start + 7 * 24 * 3600);
        let name = format!("{}_企业创新能力报告.{ext}", job.company);
        let disposition = format!(
            "attachment;filename*=UTF-8''{}",
            percent_encoding::utf8_percent_encode(&name, percent_encoding::NON_ALPHANUMERIC)
        );
        let mut link = url::Url::parse(&format!(
            "http://{host}/cos/company-report/{job_id}/report.{ext}"
        ))
        .unwrap_or_else(|_| url::Url::parse("http://127.0.0.1/").expect("static url"));
        link.query_pairs_mut()
            .append_pair("q-sign-algorithm", "sha1")
            .append_pair("q-ak", "AKIDsimulator")
            .append_pair("q-sign-time", &sign_time)
            .append_pair("q-key-time", &sign_time)
            .append_pair("q-header-list", "")
            .append_pair("q-url-param-list", "response-content-disposition")
            .append_pair(
                "q-signature",
                &link_signature(&s.signing_key, job_id, &sign_time),
            )
            .append_pair("response-content-disposition", &disposition);
        (2, Some(0), Some(link.to_string()), None)
    };
    *inner
        .stats
        .calls
        .entry(format!("status:ok:{job_status}"))
        .or_default() += 1;
    ok(json!({
        "job_id": job_id,
        "queue_num": queue_num,
        "job_status": job_status,
        "download_url": url,
        "abnormal_cause": cause,
    }))
}

fn cos_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!(
        "<?xml version='1.0' encoding='utf-8' ?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    (status, [(header::CONTENT_TYPE, "application/xml")], body).into_response()
}

async fn download(
    State(s): State<AppState>,
    Path((job_id, _file)): Path<(u64, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let sign_time = query.get("q-sign-time").cloned().unwrap_or_default();
    let signature_ok = query.get("q-signature").map(String::as_str)
        == Some(link_signature(&s.signing_key, job_id, &sign_time).as_str());
    let expired = sign_time
        .split(';')
        .nth(1)
        .and_then(|e| e.parse::<i64>().ok())
        .is_none_or(|end| end < Utc::now().timestamp());
    if !signature_ok || expired {
        s.count("download:403".into());
        return cos_error(
            StatusCode::FORBIDDEN,
            "AccessDenied",
            "Request has expired or signature does not match",
        );
    }
    let (injected, random_fault, content) = {
        let mut inner = s.lock();
        let injected = inner.take_injection(|i| i.endpoint == Endpoint::Download);
        let random_fault = s.config.fault_rate > 0.0
            && inner
                .rng
                .random_bool((s.config.fault_rate / 2.0).clamp(0.0, 1.0));
        let content = inner
            .jobs
            .get(&job_id)
            .filter(|j| !j.fails && j.created.elapsed() >= j.generation)
            .map(|j| {
                (
                    documents::ReportContent {
                        company: j.company.clone(),
                        job_id,
                        generated_at: j.created_on.clone(),
                        target_size: s.config.doc_size,
                    },
                    j.report_type,
                )
            });
        (injected, random_fault, content)
    };
    let Some((content, report_type)) = content else {
        s.count("download:404".into());
        return cos_error(
            StatusCode::NOT_FOUND,
            "NoSuchKey",
            "The specified key does not exist.",
        );
    };
    match injected {
        Some(Fault::Html) => {
            s.count("download:html".into());
            return (
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>Service temporarily unavailable</body></html>",
            )
                .into_response();
        }
        Some(Fault::Slow { millis }) => tokio::time::sleep(Duration::from_millis(millis)).await,
        Some(other) => {
            if let Some(r) = fault_response(&other) {
                s.count("download:injected".into());
                return r;
            }
        }
        None if random_fault => {
            s.count("download:reset".into());
            return reset_response();
        }
        None => {}
    }
    let generate = move || match report_type {
        ReportType::Pdf => documents::pdf_report(&content),
        ReportType::Word => documents::docx_report(&content),
    };
    // Generating a few hundred KB takes a moment: off the lock, off the async threads.
    // Small documents are cheaper to make than to hand to another thread.
    let bytes = if s.config.doc_size <= 64 * 1024 {
        generate()
    } else {
        tokio::task::spawn_blocking(generate)
            .await
            .unwrap_or_default()
    };
    {
        let mut inner = s.lock();
        inner.stats.documents.insert(
            job_id.to_string(),
            crate::upstream::document::sha256_hex(&bytes),
        );
        *inner.stats.calls.entry("download:ok".into()).or_default() += 1;
    }
    let mut response = Response::new(Body::from(bytes));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(report_type.content_type()),
    );
    if let Some(v) = query
        .get("response-content-disposition")
        .and_then(|d| HeaderValue::from_str(d).ok())
    {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    response
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, envelope_error(67200101)).into_response()
}

async fn sim_stats(State(s): State<AppState>) -> Json<SimStats> {
    Json(s.lock().stats.clone())
}

#[derive(Deserialize)]
struct OutageBody {
    code: Option<i32>,
}

async fn sim_outage(State(s): State<AppState>, Json(body): Json<OutageBody>) -> StatusCode {
    s.lock().outage = body.code;
    StatusCode::NO_CONTENT
}

async fn sim_inject(State(s): State<AppState>, Json(body): Json<Injection>) -> StatusCode {
    s.lock().injections.push(body);
    StatusCode::NO_CONTENT
}

fn router(state: AppState) -> Router {
    Router::new()
        .route(TOKEN_PATH, post(token))
        .route(CREATE_PATH, post(create))
        .route(STATUS_PATH, get(status))
        .route("/cos/company-report/{job_id}/{file}", get(download))
        .route("/_sim/stats", get(sim_stats))
        .route("/_sim/outage", post(sim_outage))
        .route("/_sim/inject", post(sim_inject))
        .fallback(not_found)
        .with_state(state)
}

/// A running simulator.
pub struct Simulator {
    pub addr: SocketAddr,
    shared: AppState,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Simulator {
    /// Binds `listen` (port 0 for any) and serves until `stop` or the token is cancelled.
    pub async fn start(config: SimConfig, listen: SocketAddr) -> std::io::Result<Simulator> {
        let seed = config
            .seed
            .unwrap_or_else(|| Utc::now().timestamp_nanos_opt().unwrap_or(0) as u64);
        let mut rng = StdRng::seed_from_u64(seed);
        let signing_key: String = (0..16)
            .map(|_| format!("{:x}", rng.random_range(0..16u8)))
            .collect();
        let balance_left = config.balance;
        let shared = Arc::new(Shared {
            config,
            signing_key,
            inner: Mutex::new(Inner {
                rng,
                tokens: HashMap::new(),
                jobs: HashMap::new(),
                // Like the provider's: 64-bit ids far above 2^53.
                next_job_id: 1_579_434_053_399_035_904,
                window: VecDeque::new(),
                day: shanghai_today(),
                day_calls: 0,
                balance_left,
                outage: None,
                injections: Vec::new(),
                stats: SimStats::default(),
                first_create: HashMap::new(),
            }),
        });
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        // Like any production API server: no Nagle delay on small answers.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let shutdown = CancellationToken::new();
        let app = router(shared.clone());
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
        Ok(Simulator {
            addr,
            shared,
            shutdown,
            task,
        })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn config(&self) -> &SimConfig {
        &self.shared.config
    }

    /// How a client reaches this simulator with its account.
    pub fn client_config(&self) -> crate::upstream::ClientConfig {
        let credentials = crate::upstream::Credentials {
            client_id: self.shared.config.client_id.clone(),
            client_secret: crate::upstream::Secret::new(self.shared.config.client_secret.clone()),
        };
        crate::upstream::ClientConfig::new(self.base_url(), credentials)
    }

    pub fn stats(&self) -> SimStats {
        self.shared.lock().stats.clone()
    }

    /// Every metered call answers `code` until switched off with `None`.
    pub fn set_outage(&self, code: Option<i32>) {
        self.shared.lock().outage = code;
    }

    pub fn inject(&self, injection: Injection) {
        self.shared.lock().injections.push(injection);
    }

    /// When the first create call for `identifier` arrived, if any.
    pub fn first_create(&self, identifier: &str) -> Option<std::time::SystemTime> {
        self.shared.lock().first_create.get(identifier).copied()
    }

    /// Creates `n` tasks directly (no calls counted), each taking `generation`, and
    /// returns their job ids: a backlog of generating tasks for benchmarks.
    pub fn seed_jobs(&self, n: usize, generation: Duration, report_type: ReportType) -> Vec<u64> {
        let mut inner = self.shared.lock();
        let created_on = Utc::now().format("%Y-%m-%d %H:%M UTC").to_string();
        (0..n)
            .map(|i| {
                inner.next_job_id += 1;
                let id = inner.next_job_id;
                let job = Job {
                    created: Instant::now(),
                    generation,
                    fails: false,
                    initial_queue: 0,
                    company: format!("预置企业{i}"),
                    report_type,
                    created_on: created_on.clone(),
                };
                inner.jobs.insert(id, job);
                id
            })
            .collect()
    }

    /// Serves until the process is asked to stop (Ctrl-C) or `cancel` fires.
    pub async fn wait(self, cancel: CancellationToken) {
        cancel.cancelled().await;
        self.stop().await;
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        // Open keep-alive connections would hold graceful shutdown: give them a moment.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_code_checksums() {
        assert!(credit_code_checksum_ok("91110108551385082Q"));
        assert!(!credit_code_checksum_ok("91110108551385083Q"));
        assert!(!credit_code_checksum_ok("9111010855138508"));
    }
}
