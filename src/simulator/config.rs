//! How the simulator behaves (`simulate` flags) and what tests can ask of it: injected
//! faults and the counters it keeps.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::config::{parse_duration, parse_duration_range};

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
    /// How long a report takes to generate, MIN..MAX (spread evenly, unless
    /// `--generation-sigma` is given).
    #[arg(long, default_value = "1m..10m", value_parser = parse_duration_range)]
    pub generation_time: (Duration, Duration),
    /// Generation times log-normal instead, with this σ of their logarithm, the median at
    /// `--generation-median` (default: the geometric middle of `--generation-time`), cut
    /// to `--generation-time`'s range.
    #[arg(long)]
    pub generation_sigma: Option<f64>,
    /// The median generation time of the log-normal spread (with `--generation-sigma`).
    #[arg(long, value_parser = parse_duration)]
    pub generation_median: Option<Duration>,
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
    /// The provider's clock against the real one, in seconds (negative: it lags). Moves
    /// its day (Asia/Shanghai), which the daily limit counts.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub clock_offset_secs: i64,
    /// More accounts, each ID:SECRET[:QPS] (repeat the flag): every account has its own
    /// tokens, QPS window and tasks (a task is known only to the account that created
    /// it); the daily limit and balance are each account's own too.
    #[arg(long = "account", value_name = "ID:SECRET[:QPS]", value_parser = parse_sim_account)]
    pub accounts: Vec<SimAccount>,
    /// Where the token call is served.
    #[arg(long, default_value = crate::upstream::client::TOKEN_PATH)]
    pub token_path: String,
    /// Where the create call is served.
    #[arg(long, default_value = crate::upstream::client::CREATE_PATH)]
    pub create_path: String,
    /// Where the status call is served.
    #[arg(long, default_value = crate::upstream::client::STATUS_PATH)]
    pub status_path: String,
}

/// An account of the simulated provider besides the main one.
#[derive(Debug, Clone, PartialEq)]
pub struct SimAccount {
    pub client_id: String,
    pub client_secret: String,
    /// Its own QPS limit (none: unlimited).
    pub qps: Option<u32>,
}

fn parse_sim_account(s: &str) -> Result<SimAccount, String> {
    let mut parts = s.splitn(3, ':');
    let (Some(id), Some(secret)) = (parts.next(), parts.next()) else {
        return Err(format!("expected ID:SECRET[:QPS], got {s:?}"));
    };
    if id.is_empty() || secret.is_empty() {
        return Err(format!("expected ID:SECRET[:QPS], got {s:?}"));
    }
    let qps = parts
        .next()
        .map(|q| q.parse::<u32>().map_err(|e| format!("QPS {q:?}: {e}")))
        .transpose()?;
    Ok(SimAccount {
        client_id: id.into(),
        client_secret: secret.into(),
        qps,
    })
}

impl SimConfig {
    /// A task's generation time for a uniform draw `u` in [0, 1) and a standard normal
    /// draw `z`: spread evenly over `generation_time`, or log-normal (see
    /// `generation_sigma`), cut to that range.
    pub(super) fn generation_for(&self, u: f64, z: f64) -> Duration {
        let (lo, hi) = self.generation_time;
        if hi <= lo {
            return lo;
        }
        let secs = match self.generation_sigma {
            Some(sigma) => {
                let median = self
                    .generation_median
                    .map(|m| m.as_secs_f64())
                    .unwrap_or_else(|| (lo.as_secs_f64().max(1e-3) * hi.as_secs_f64()).sqrt());
                median * (sigma * z).exp()
            }
            None => lo.as_secs_f64() + u * (hi - lo).as_secs_f64(),
        };
        Duration::from_secs_f64(secs.clamp(lo.as_secs_f64(), hi.as_secs_f64()))
    }

    /// The QPS limit of `client` (the main account's, or one of `accounts`).
    pub(super) fn qps_of(&self, client: &str) -> Option<u32> {
        if client == self.client_id {
            return self.qps;
        }
        self.accounts
            .iter()
            .find(|a| a.client_id == client)
            .and_then(|a| a.qps)
    }

    /// Whether `id:secret` is one of the simulator's accounts.
    pub(super) fn knows(&self, id: &str, secret: &str) -> bool {
        (id == self.client_id && secret == self.client_secret)
            || self
                .accounts
                .iter()
                .any(|a| a.client_id == id && a.client_secret == secret)
    }
}

impl SimConfig {
    /// The paths the calls are served on.
    pub fn paths(&self) -> crate::upstream::client::Paths {
        crate::upstream::client::Paths {
            token: self.token_path.clone(),
            create: self.create_path.clone(),
            status: self.status_path.clone(),
        }
    }
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
            generation_sigma: None,
            generation_median: None,
            failure_rate: 0.02,
            qps: None,
            daily_limit: None,
            balance: None,
            fault_rate: 0.0,
            seed: None,
            doc_size: 300_000,
            clock_offset_secs: 0,
            accounts: Vec::new(),
            token_path: crate::upstream::client::TOKEN_PATH.into(),
            create_path: crate::upstream::client::CREATE_PATH.into(),
            status_path: crate::upstream::client::STATUS_PATH.into(),
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
    /// For downloads: the document, served at this many bytes per second.
    Drip { bytes_per_sec: u64 },
    /// For downloads: a redirect to the same link on another host name (same port).
    RedirectToHost { host: String },
    /// For Word downloads: a body that starts like a ZIP and is not one.
    BadDocx,
    /// For creates: the task is made (and paid for), then the connection breaks off
    /// before the answer is complete.
    CreatedThenReset,
    /// For creates: the task is made, then this HTTP status comes back (a gateway's
    /// 5xx page, no provider code).
    CreatedThenHttp { status: u16 },
    /// For creates: the task is made, then a success comes back whose job id cannot be
    /// read.
    CreatedThenUnreadable,
    /// For creates: the task is made, then `status:false` comes back without a code.
    CreatedThenStatusFalse,
    /// For creates: the task is made, then this provider code comes back (a gateway
    /// timeout such as 67200100, a service error, a code nobody documented).
    CreatedThenCode { code: i32 },
    /// This HTTP status with the provider's envelope carrying `code` (a gateway's 5xx
    /// that quotes a provider code, or the provider's own 4xx).
    HttpCode { status: u16, code: i32 },
    /// The provider's answer with this code, after this delay (no task made): a
    /// refusal that takes its time.
    SlowCode { millis: u64, code: i32 },
}

impl Fault {
    /// Faults that strike a create after its task was made: the answer is lost.
    pub(super) fn after_create(&self) -> bool {
        matches!(
            self,
            Fault::CreatedThenReset
                | Fault::CreatedThenHttp { .. }
                | Fault::CreatedThenUnreadable
                | Fault::CreatedThenStatusFalse
                | Fault::CreatedThenCode { .. }
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Injection {
    pub endpoint: Endpoint,
    #[serde(flatten)]
    pub fault: Fault,
    #[serde(default = "one")]
    pub count: u32,
    /// Only calls of this account (client id); any account's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
}

pub(super) fn one() -> u32 {
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
    /// Every task made, by job id: what it was asked for, for whom and when (the
    /// ground truth a test judges spend and documents by).
    pub tasks: BTreeMap<String, SimTask>,
    /// When each job's document was first served (milliseconds since the Unix epoch).
    pub first_served_ms: BTreeMap<String, i64>,
    /// The most metered calls accepted within any one-second window of one account.
    pub max_calls_in_one_second: usize,
    pub token_fetches: u64,
    /// The same counters for each account (client id).
    pub accounts: BTreeMap<String, AccountStats>,
}

/// One task the simulator made: the create's body, the account that paid for it, the
/// company it resolved the request to (the one its report is about) and when.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimTask {
    pub account: String,
    pub company_name: Option<String>,
    pub credit_code: Option<String>,
    pub org_number: Option<String>,
    pub report_type: String,
    pub company: String,
    /// Milliseconds since the Unix epoch.
    pub created_ms: i64,
    /// When its report is (or was) ready, unless it fails: milliseconds since the Unix
    /// epoch (the ground truth of detection delays).
    pub ready_ms: i64,
    /// The jobs ahead of it when it was made (counting down while it is queued: the
    /// first 30 % of its generation time).
    pub initial_queue: i64,
}

/// One account's counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AccountStats {
    /// Its calls by `endpoint:outcome`.
    pub calls: BTreeMap<String, u64>,
    pub tasks_created: u64,
    /// The most of its metered calls accepted within any one-second window.
    pub max_calls_in_one_second: usize,
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

impl Fault {
    /// How the counters name a call answered with this fault.
    pub(super) fn outcome(&self) -> String {
        match self {
            Fault::Code { code } => code.to_string(),
            Fault::Http { status } => status.to_string(),
            Fault::Reset => "reset".into(),
            Fault::Malformed => "malformed".into(),
            Fault::Slow { .. } => "slow".into(),
            Fault::Html => "html".into(),
            Fault::JobFailed => "job_failed".into(),
            Fault::Drip { .. } => "drip".into(),
            Fault::RedirectToHost { .. } => "redirect".into(),
            Fault::BadDocx => "bad_docx".into(),
            Fault::CreatedThenReset => "created_then_reset".into(),
            Fault::CreatedThenHttp { status } => format!("created_then_{status}"),
            Fault::CreatedThenUnreadable => "created_then_unreadable".into(),
            Fault::CreatedThenStatusFalse => "created_then_status_false".into(),
            Fault::CreatedThenCode { code } => format!("created_then_{code}"),
            Fault::HttpCode { status, code } => format!("{status}_{code}"),
            Fault::SlowCode { code, .. } => code.to_string(),
        }
    }
}

impl Injection {
    pub(super) fn endpoint_name(&self) -> &'static str {
        match self.endpoint {
            Endpoint::Token => "token",
            Endpoint::Create => "create",
            Endpoint::Status => "status",
            Endpoint::Download => "download",
            Endpoint::Any => "any",
        }
    }
}
