//! The command line's arguments: every flag with its environment fallback (flags win),
//! and the checks that turn them into the engine's and the client's configuration.

use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};

use super::accounts::AccountSpec;
use crate::config::parse_duration;
use crate::domain::{ReportType, RequestState};
use crate::engine::WorkerConfig;
use crate::engine::policy::PollPolicy;
use crate::upstream::client::DEFAULT_BASE_URL;
use crate::upstream::{ClientConfig, Credentials, Secret};

#[derive(Debug, Parser)]
#[command(
    name = "report-worker",
    version,
    about = "A durable PostgreSQL worker for slow, metered report APIs"
)]
pub struct Cli {
    /// How log lines are written to stderr: `text` for people, `json` for log pipelines
    /// (one object per line, the row's id, job and batch in `span`).
    #[arg(long, env = "LOG_FORMAT", global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply the migrations in migrations/ (safe to run again).
    Migrate(DbArgs),
    /// Add one report request from flags and print its id.
    Enqueue(EnqueueArgs),
    /// Show the queue at a glance and any account-wide stop (or one batch).
    Status(StatusArgs),
    /// Work the queue until SIGINT/SIGTERM.
    Run(Box<RunArgs>),
    /// Serve a faithful simulator of the upstream API.
    Simulate(SimulateArgs),
    /// Write finished documents as files into a folder.
    Export(ExportArgs),
    /// The whole loop on one machine: a throwaway PostgreSQL (unless DATABASE_URL is set),
    /// the simulator, a sample batch, documents on disk.
    Demo(DemoArgs),
    /// Measure the worker (fresh databases named rw_bench_* on DATABASE_URL's server).
    Bench(BenchArgs),
    /// Remove finished history (requests with their documents and events, or only the
    /// documents) older than a cutoff, in small batches beside live work.
    Purge(PurgeArgs),
    /// Create the roles report_app (applications) and report_worker (run) if missing and
    /// grant them what they need in this database; run after every migrate.
    Grant(DbArgs),
    /// Move documents stored in PostgreSQL into object storage (DOCUMENT_STORE),
    /// one at a time, each checked before its bytes leave PostgreSQL; resumable.
    MoveDocuments(MoveDocumentsArgs),
    /// Serve the web dashboard over the database until SIGINT/SIGTERM (read-only unless
    /// DASHBOARD_TOKEN is set).
    Dashboard(DashboardArgs),
    /// Check the configured provider with one token call per account: reachable,
    /// credentials accepted, the token's shape, rate-limit headers. With --create, also
    /// one paid create and one status call of its task. Exits 1 when a check fails.
    CheckProvider(CheckProviderArgs),
}

#[derive(Debug, Args)]
pub struct CheckProviderArgs {
    #[command(flatten)]
    pub provider: ProviderArgs,
    /// Only this account of UPSTREAM_ACCOUNTS (default: each in turn).
    #[arg(long)]
    pub account: Option<String>,
    /// Also make one create (a paid report, kept nowhere) for the company named by
    /// --company-name/--credit-code/--org-number, then one status call of its task.
    #[arg(long)]
    pub create: bool,
    /// Enterprise name for --create.
    #[arg(long, requires = "create")]
    pub company_name: Option<String>,
    /// Unified social credit code for --create.
    #[arg(long, requires = "create")]
    pub credit_code: Option<String>,
    /// Organization code for --create.
    #[arg(long, requires = "create")]
    pub org_number: Option<String>,
    /// Report type for --create (default pdf).
    #[arg(long = "type", requires = "create")]
    pub report_type: Option<ReportType>,
}

#[derive(Debug, Args)]
pub struct DashboardArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Where document download links read from (the workers' DOCUMENT_STORE).
    #[command(flatten)]
    pub store: StoreArgs,
    /// Address to serve on. Beyond loopback, set DASHBOARD_TOKEN (and put TLS in front).
    #[arg(long, env = "DASHBOARD_ADDR", default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    #[command(flatten)]
    pub access: DashboardAccess,
}

#[derive(Debug, Args)]
pub struct DashboardAccess {
    /// The token a person signs in with to act (cancel, retry, probe); without it the
    /// dashboard is read-only.
    #[arg(
        long = "dashboard-token",
        env = "DASHBOARD_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<Secret>,
    /// How often pages refresh themselves when JavaScript is on.
    #[arg(long = "dashboard-refresh", env = "DASHBOARD_REFRESH", default_value = "5s", value_parser = parse_duration)]
    pub refresh: Duration,
    /// Without DASHBOARD_TOKEN, serve beyond loopback all the same: every request and
    /// document readable by whoever reaches the port (refused otherwise).
    #[arg(long = "public-read", env = "DASHBOARD_PUBLIC_READ")]
    pub public_read: bool,
    /// Reverse proxies (IP addresses, comma-separated) whose X-Forwarded-For and
    /// X-Forwarded-Proto are believed: the client's address, and HTTPS for Secure cookies.
    #[arg(
        long = "dashboard-trusted-proxies",
        env = "DASHBOARD_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

impl DashboardAccess {
    pub fn config(
        &self,
        documents: crate::store::DocumentStore,
    ) -> crate::dashboard::DashboardConfig {
        let mut config = crate::dashboard::DashboardConfig::new(self.token.clone(), documents);
        config.refresh = self.refresh.max(Duration::from_secs(1));
        config.public_read = self.public_read;
        config.trusted_proxies = self.trusted_proxies.clone();
        config
    }
}

#[derive(Debug, Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Finished requests (succeeded, failed, cancelled) that finished longer ago than
    /// this, e.g. 90d, go (with their documents and events).
    #[arg(long, value_parser = parse_duration)]
    pub finished_before: Option<Duration>,
    /// Only the documents of those requests go; the requests and their events stay.
    #[arg(long, requires = "finished_before")]
    pub documents_only: bool,
    /// Events older than this, e.g. 30d, go too (whatever their request's state).
    #[arg(long, value_parser = parse_duration)]
    pub events_before: Option<Duration>,
    /// Count what would go, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Batch after batch, without the pauses that leave live work most of the database
    /// (for a maintenance window).
    #[arg(long)]
    pub full_speed: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Scenarios to run (default all): burn-down, pickup, bulk-enqueue, economy, qps,
    /// inflight, idle, stats, purge, rss, hot, dashboard, pgbouncer (with --pooler);
    /// learned-live (real time, ~15 min) only when named.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Reports in the burn-down.
    #[arg(long, default_value_t = 20_000)]
    pub reports: usize,
    /// Upstream calls in flight in the burn-down worker (reports wait on HTTP and on
    /// commits, not on CPU: hundreds in flight is the point of an I/O-bound worker).
    #[arg(long, default_value_t = 512)]
    pub concurrency: usize,
    /// Rows in the bulk-enqueue CSV.
    #[arg(long, default_value_t = 1_000_000)]
    pub csv_rows: usize,
    /// Generating rows in the in-flight scenario.
    #[arg(long, default_value_t = 100_000)]
    pub inflight_rows: usize,
    /// Account QPS for the QPS-use and in-flight scenarios.
    #[arg(long, default_value_t = 20)]
    pub qps: u32,
    /// Rows in the stats scenario.
    #[arg(long, default_value_t = 10_000_000)]
    pub stats_rows: usize,
    /// Megabytes of the one document of the RSS scenario.
    #[arg(long, default_value_t = 50)]
    pub document_mb: usize,
    /// Rows of history in the dashboard scenario.
    #[arg(long, default_value_t = 1_000_000)]
    pub dashboard_rows: usize,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// A PgBouncer in transaction mode in front of DATABASE_URL's server (its database
    /// name is replaced): the `pgbouncer` scenario runs the burn-down and the pickup
    /// through it.
    #[arg(long, env = "BENCH_POOLER_URL")]
    pub pooler: Option<String>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// One batch: its rows per state, progress and failures with their reasons.
    #[arg(long)]
    pub batch: Option<String>,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Folder to write into (created if missing); nothing is ever written outside it.
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Only rows finished at or after this time (RFC 3339) or within this long ago (e.g. 24h).
    #[arg(long, value_parser = parse_since)]
    pub since: Option<DateTime<Utc>>,
    /// Only these request ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub ids: Option<Vec<i64>>,
    /// Only this batch; also writes DIR/manifest.csv listing every request of it (id,
    /// identifier, report type, state, file, sha256, error).
    #[arg(long)]
    pub batch: Option<String>,
    /// Rows in this state: succeeded, queued, generating, failed or cancelled.
    #[arg(long, default_value = "succeeded", value_parser = parse_state)]
    pub state: RequestState,
}

fn parse_state(s: &str) -> Result<RequestState, String> {
    s.trim()
        .parse()
        .map_err(|e: crate::domain::InvalidValue| e.to_string())
}

fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s.trim()) {
        return Ok(t.with_timezone(&Utc));
    }
    let ago = parse_duration(s)
        .map_err(|_| format!("expected an RFC 3339 time or a duration like 24h, got {s:?}"))?;
    Ok(Utc::now() - chrono::Duration::from_std(ago).map_err(|e| e.to_string())?)
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where the documents go.
    #[arg(long, default_value = "report-worker-demo")]
    pub out: std::path::PathBuf,
    /// Keep the throwaway database's folder (the server is stopped either way).
    #[arg(long)]
    pub keep: bool,
    /// Use this database instead of a throwaway one.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// `transaction` when DATABASE_URL is a pooler in transaction mode.
    #[arg(long, env = "DATABASE_POOL_MODE", value_enum, default_value_t = crate::queue::PoolMode::Session)]
    pub database_pool_mode: crate::queue::PoolMode,
    /// Serve the dashboard while the batch runs and keep it (with the worker and the
    /// simulator) up afterwards, until Ctrl-C; prints its address and sign-in token.
    #[arg(long)]
    pub dashboard: bool,
    /// Where the demo's dashboard listens.
    #[arg(long, env = "DASHBOARD_ADDR", default_value = "127.0.0.1:8080")]
    pub dashboard_addr: std::net::SocketAddr,
}

/// The provider and the accounts used with it: what `run` and `check-provider` share.
#[derive(Debug, Args)]
pub struct ProviderArgs {
    /// The provider's base URL.
    #[arg(long, env = "UPSTREAM_BASE_URL", default_value = DEFAULT_BASE_URL)]
    pub upstream_base_url: String,
    /// The token call's path under the base URL.
    #[arg(long, env = "UPSTREAM_TOKEN_PATH", default_value = crate::upstream::client::TOKEN_PATH)]
    pub upstream_token_path: String,
    /// The create call's path under the base URL.
    #[arg(long, env = "UPSTREAM_CREATE_PATH", default_value = crate::upstream::client::CREATE_PATH)]
    pub upstream_create_path: String,
    /// The status call's path under the base URL.
    #[arg(long, env = "UPSTREAM_STATUS_PATH", default_value = crate::upstream::client::STATUS_PATH)]
    pub upstream_status_path: String,
    /// The account's client id (also sent as the apikey); or UPSTREAM_ACCOUNTS.
    #[arg(long, env = "UPSTREAM_CLIENT_ID")]
    pub upstream_client_id: Option<String>,
    /// The account's client secret.
    #[arg(long, env = "UPSTREAM_CLIENT_SECRET", hide_env_values = true)]
    pub upstream_client_secret: Option<Secret>,
    /// Several accounts pooled by this deployment: a TOML file of [[account]] entries
    /// (id, secret_env or secret_file, qps, daily_limit, daily_headroom, weight), instead
    /// of UPSTREAM_CLIENT_ID/SECRET/QPS/DAILY_LIMIT.
    #[arg(long, env = "UPSTREAM_ACCOUNTS", value_name = "FILE")]
    pub upstream_accounts: Option<std::path::PathBuf>,
    /// Calls per second for the whole account, shared by every worker process (0: no pacing).
    #[arg(long, env = "UPSTREAM_QPS", default_value_t = 5.0)]
    pub upstream_qps: f64,
    /// Timeout of one HTTP call (above the provider's 10 s maximum).
    #[arg(long, env = "UPSTREAM_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub upstream_timeout: Duration,
    /// Creates per day (Asia/Shanghai) the account may make, shared by every process:
    /// creating stops before the provider's 67200007 (default: no limit of ours).
    #[arg(long, env = "UPSTREAM_DAILY_LIMIT")]
    pub upstream_daily_limit: Option<u32>,
    /// The last creates of UPSTREAM_DAILY_LIMIT kept for rows already paid for (retries);
    /// new rows wait for the next day instead (default: 5 % of the limit).
    #[arg(long, env = "UPSTREAM_DAILY_HEADROOM")]
    pub upstream_daily_headroom: Option<u32>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub provider: ProviderArgs,
    /// Largest document accepted, in bytes.
    #[arg(long, env = "UPSTREAM_MAX_DOWNLOAD_BYTES", default_value_t = 200 * 1024 * 1024)]
    pub upstream_max_download_bytes: u64,
    /// One download, start to finish (a link that trickles bytes is given up).
    #[arg(long, env = "UPSTREAM_DOWNLOAD_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub upstream_download_timeout: Duration,
    /// Hosts download links and their redirects may point at, comma-separated
    /// (`*.myqcloud.com` for a domain and its subdomains); default: the link's own host.
    #[arg(long, env = "UPSTREAM_DOWNLOAD_HOSTS", value_delimiter = ',')]
    pub upstream_download_hosts: Vec<String>,
    /// Bytes of documents all downloads of this process may hold in memory at once.
    #[arg(long, env = "UPSTREAM_DOWNLOAD_MEMORY", default_value_t = 512 * 1024 * 1024)]
    pub upstream_download_memory: u64,
    /// How long one upstream task is expected to take at most: the poll schedule aims
    /// within it (at least REPORT_FIRST_POLL).
    #[arg(long, env = "REPORT_WINDOW", default_value = "10m", value_parser = parse_duration)]
    pub report_window: Duration,
    /// How long a task the provider still calls waiting or exporting is polled (every
    /// REPORT_POLL_MAX past REPORT_WINDOW) before it is given up and kept as an orphan
    /// (at least REPORT_WINDOW).
    #[arg(long, env = "REPORT_GIVE_UP_AFTER", default_value = "30m", value_parser = parse_duration)]
    pub report_give_up_after: Duration,
    /// First poll of a new task (nothing is ready before the provider's 1 minute minimum).
    #[arg(long, env = "REPORT_FIRST_POLL", default_value = "60s", value_parser = parse_duration)]
    pub report_first_poll: Duration,
    /// Interval between polls while the task is exporting.
    #[arg(long, env = "REPORT_POLL_MIN", default_value = "25s", value_parser = parse_duration)]
    pub report_poll_min: Duration,
    /// Interval between polls while the task waits in the provider's queue.
    #[arg(long, env = "REPORT_POLL_MAX", default_value = "60s", value_parser = parse_duration)]
    pub report_poll_max: Duration,
    /// Reuse: a row is served from a document already stored for exactly its identifier
    /// and report type within this long (e.g. 7d), with no provider call; a row's
    /// `reuse_within` overrides it (default: off).
    #[arg(long, env = "REPORT_REUSE_WITHIN", value_parser = parse_duration)]
    pub report_reuse_within: Option<Duration>,
    /// Learned polling: the median detection delay (ready → noticed) the schedule aims
    /// for, learned from this account's generation times; 0 keeps the fixed schedule
    /// (REPORT_FIRST_POLL, REPORT_POLL_MIN/MAX), which is also used until 50 reports of
    /// a type have finished and for windows under 2 minutes.
    #[arg(long, env = "REPORT_DETECTION_TARGET", default_value = "15s", value_parser = parse_duration)]
    pub report_detection_target: Duration,
    /// Unusable downloads of one task (not the report, a link against the rules, never
    /// finished) before the task is given up; a new task is an attempt.
    #[arg(long, env = "REPORT_DOWNLOAD_TRIES", default_value_t = 3)]
    pub report_download_tries: u32,
    /// How long a row keeps retrying transient errors before it fails.
    #[arg(long, env = "REPORT_RETRY_BUDGET", default_value = "24h", value_parser = parse_duration)]
    pub report_retry_budget: Duration,
    /// Pause after a row's first transient error (doubling after each, with jitter).
    #[arg(long, env = "REPORT_RETRY_MIN", default_value = "2s", value_parser = parse_duration)]
    pub report_retry_min: Duration,
    /// Longest pause between two tries after transient errors.
    #[arg(long, env = "REPORT_RETRY_MAX", default_value = "5m", value_parser = parse_duration)]
    pub report_retry_max: Duration,
    /// Pause before a row's next upstream task after one was lost or got no answer
    /// (doubling with each task, up to REPORT_RETRY_MAX).
    #[arg(long, env = "REPORT_NEW_TASK_AFTER", default_value = "30s", value_parser = parse_duration)]
    pub report_new_task_after: Duration,
    /// Pause before the first probe of a stopped account (doubling after each, capped
    /// at 15 minutes).
    #[arg(long, env = "UPSTREAM_STOP_PROBE", default_value = "30s", value_parser = parse_duration)]
    pub upstream_stop_probe: Duration,
    /// Upstream calls in flight in this process.
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 16)]
    pub worker_concurrency: usize,
    /// How long a claim lasts without a heartbeat (a killed worker's rows return after this).
    #[arg(long, env = "WORKER_LEASE", default_value = "45s", value_parser = parse_duration)]
    pub worker_lease: Duration,
    /// Fallback poll of the table when no NOTIFY arrives.
    #[arg(long, env = "WORKER_IDLE_POLL", default_value = "1s", value_parser = parse_duration)]
    pub worker_idle_poll: Duration,
    /// Grace period after SIGINT/SIGTERM for creates already on the wire (everything
    /// else stops at once). At least UPSTREAM_TIMEOUT; default UPSTREAM_TIMEOUT + 15s.
    #[arg(long, env = "WORKER_SHUTDOWN_TIMEOUT", value_parser = parse_duration)]
    pub worker_shutdown_timeout: Option<Duration>,
    /// How long `run` waits for an unreachable database at start-up before giving up
    /// (default: keeps trying, logging each try).
    #[arg(long, env = "WORKER_STARTUP_TIMEOUT", value_parser = parse_duration)]
    pub worker_startup_timeout: Option<Duration>,
    /// This process's name in lease_owner (default host:pid).
    #[arg(long, env = "WORKER_ID")]
    pub worker_id: Option<String>,
    /// A direct connection (a session, not through a transaction pooler) for LISTEN, so
    /// that an insert wakes idle workers at once (default: a connection of the pool, or
    /// none with DATABASE_POOL_MODE=transaction).
    #[arg(long, env = "LISTEN_DATABASE_URL", hide_env_values = true)]
    pub listen_database_url: Option<String>,
    /// Serve /metrics and /healthz here, e.g. 0.0.0.0:9187.
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Purge finished requests older than this (e.g. 90d) on a schedule, one process at
    /// a time (default: never).
    #[arg(long, env = "RETENTION_FINISHED", value_parser = parse_duration)]
    pub retention_finished: Option<Duration>,
    /// Purge only the documents of those requests, keeping the requests and events.
    #[arg(long, env = "RETENTION_DOCUMENTS_ONLY")]
    pub retention_documents_only: bool,
    /// Purge events older than this (e.g. 30d) on the same schedule (default: never).
    #[arg(long, env = "RETENTION_EVENTS", value_parser = parse_duration)]
    pub retention_events: Option<Duration>,
    /// How often scheduled retention runs.
    #[arg(long, env = "RETENTION_EVERY", default_value = "1h", value_parser = parse_duration)]
    pub retention_every: Duration,
    /// Key of the HMAC-SHA256 signature on webhooks (`X-Report-Signature`); without it
    /// no webhook is sent.
    #[arg(long, env = "WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<Secret>,
    /// Longest time one webhook attempt may take.
    #[arg(long, env = "WEBHOOK_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub webhook_timeout: Duration,
    /// Pause after a webhook's first failed attempt (doubling after each, up to an hour).
    #[arg(long, env = "WEBHOOK_RETRY_MIN", default_value = "10s", value_parser = parse_duration)]
    pub webhook_retry_min: Duration,
    /// Attempts before a webhook delivery is given up.
    #[arg(long, env = "WEBHOOK_MAX_ATTEMPTS", default_value_t = 12)]
    pub webhook_max_attempts: i32,
    /// Let webhooks reach addresses inside the network (loopback, private, link-local):
    /// refused by default, since any role that may insert a row names the URL.
    #[arg(long, env = "WEBHOOK_ALLOW_PRIVATE")]
    pub webhook_allow_private: bool,
    /// Hosts (comma-separated, exact) webhooks may reach even at private addresses.
    #[arg(long, env = "WEBHOOK_ALLOW_HOSTS", value_delimiter = ',')]
    pub webhook_allow_hosts: Vec<String>,
    /// Also serve the web dashboard here, e.g. 127.0.0.1:8080 (its own small pool).
    #[arg(long, env = "DASHBOARD_ADDR")]
    pub dashboard_addr: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub dashboard: DashboardAccess,
    /// Check every setting, print the configuration `run` would work with (as JSON,
    /// without secrets) and exit.
    #[arg(long)]
    pub check_config: bool,
}

impl RunArgs {
    /// The client's and the worker's configuration, checked for consistency, with the
    /// accounts (the client is the first account's; the others' differ only in their
    /// credentials).
    pub fn configs(&self) -> anyhow::Result<(ClientConfig, WorkerConfig, Vec<AccountSpec>)> {
        let (mut client, accounts) = self.provider.client_config()?;
        let first = &accounts[0];
        let upstream_timeout = self.provider.upstream_timeout;
        if self.worker_concurrency == 0 || self.worker_concurrency > 1024 {
            anyhow::bail!("WORKER_CONCURRENCY must be between 1 and 1024");
        }
        if self.worker_lease < Duration::from_secs(1) {
            anyhow::bail!("WORKER_LEASE must be at least 1s");
        }
        let shutdown_timeout = self
            .worker_shutdown_timeout
            .unwrap_or(upstream_timeout + Duration::from_secs(15));
        if shutdown_timeout < upstream_timeout {
            anyhow::bail!(
                "WORKER_SHUTDOWN_TIMEOUT ({}) is shorter than UPSTREAM_TIMEOUT ({}): a create still on the wire at shutdown would be abandoned and possibly paid for twice; set it to at least {}",
                humantime::format_duration(shutdown_timeout),
                humantime::format_duration(upstream_timeout),
                humantime::format_duration(upstream_timeout)
            );
        }
        if self.upstream_download_memory < self.upstream_max_download_bytes {
            anyhow::bail!(
                "UPSTREAM_DOWNLOAD_MEMORY ({}) is below UPSTREAM_MAX_DOWNLOAD_BYTES ({}): the largest document could never be held",
                self.upstream_download_memory,
                self.upstream_max_download_bytes
            );
        }
        if self.report_download_tries == 0 {
            anyhow::bail!("REPORT_DOWNLOAD_TRIES must be at least 1");
        }
        client.max_download_bytes = self.upstream_max_download_bytes;
        client.download_timeout = self.upstream_download_timeout;
        client.download_hosts = self
            .upstream_download_hosts
            .iter()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .collect();
        client.download_memory = self.upstream_download_memory;
        let mut worker = WorkerConfig::new(first.id.clone());
        if let Some(id) = &self.worker_id {
            worker.owner = id.clone();
        }
        worker.concurrency = self.worker_concurrency;
        worker.qps = first.qps;
        worker.daily_limit = first.daily_limit;
        worker.reuse_within = self.report_reuse_within.filter(|d| !d.is_zero());
        worker.lease = self.worker_lease;
        worker.idle_poll = self.worker_idle_poll;
        worker.shutdown_timeout = shutdown_timeout;
        worker.download_tries = self.report_download_tries;
        if self.retention_every.is_zero() {
            anyhow::bail!("RETENTION_EVERY must be above zero");
        }
        worker.retention = crate::engine::retention::Retention {
            finished: self.retention_finished,
            documents_only: self.retention_documents_only,
            events: self.retention_events,
            every: self.retention_every,
        };
        worker.poll = PollPolicy {
            first_poll: self.report_first_poll,
            poll_min: self.report_poll_min,
            poll_max: self.report_poll_max,
            window: self.report_window,
            give_up_after: self.report_give_up_after,
        };
        worker.poll.check().map_err(anyhow::Error::msg)?;
        if self.report_retry_min.is_zero() || self.report_retry_min > self.report_retry_max {
            anyhow::bail!("REPORT_RETRY_MIN must be above zero and at most REPORT_RETRY_MAX");
        }
        if self.report_new_task_after.is_zero() || self.upstream_stop_probe.is_zero() {
            anyhow::bail!("REPORT_NEW_TASK_AFTER and UPSTREAM_STOP_PROBE must be above zero");
        }
        worker.retry = crate::engine::policy::RetryPolicy {
            base: self.report_retry_min,
            cap: self.report_retry_max,
            budget: self.report_retry_budget,
            new_task_base: self.report_new_task_after,
        };
        worker.stop_probe_base = self.upstream_stop_probe;
        worker.webhooks = self.webhooks()?;
        worker.detection_target = Some(self.report_detection_target).filter(|t| !t.is_zero());
        worker.listen = match (&self.listen_database_url, self.db.database_pool_mode) {
            (Some(url), _) if !url.trim().is_empty() => {
                let url = url.trim();
                let scheme_ok = ["postgres://", "postgresql://"]
                    .iter()
                    .any(|s| url.to_ascii_lowercase().starts_with(s));
                let parsed = url.parse::<sqlx::postgres::PgConnectOptions>();
                if !scheme_ok || parsed.is_err() {
                    anyhow::bail!(
                        "LISTEN_DATABASE_URL {} is not a PostgreSQL URL (postgres://user@host/db){}",
                        crate::config::redact_url(url),
                        parsed.err().map(|e| format!(": {e}")).unwrap_or_default()
                    );
                }
                crate::engine::Listen::Url(url.to_string())
            }
            (_, crate::queue::PoolMode::Session) => crate::engine::Listen::Pool,
            (_, crate::queue::PoolMode::Transaction) => crate::engine::Listen::Off,
        };
        Ok((client, worker, accounts))
    }
}

impl ProviderArgs {
    /// The accounts: those of UPSTREAM_ACCOUNTS, or the one of UPSTREAM_CLIENT_ID.
    pub fn accounts(&self) -> anyhow::Result<Vec<AccountSpec>> {
        if !(self.upstream_qps >= 0.0 && self.upstream_qps.is_finite()) {
            anyhow::bail!("UPSTREAM_QPS must be 0 (no pacing) or a positive number");
        }
        if let Some(path) = &self.upstream_accounts {
            if self.upstream_client_id.is_some() || self.upstream_client_secret.is_some() {
                anyhow::bail!(
                    "UPSTREAM_ACCOUNTS and UPSTREAM_CLIENT_ID/UPSTREAM_CLIENT_SECRET are both set: list every account in the file and unset the others"
                );
            }
            if self.upstream_daily_limit.is_some() || self.upstream_daily_headroom.is_some() {
                anyhow::bail!(
                    "UPSTREAM_DAILY_LIMIT/UPSTREAM_DAILY_HEADROOM are per account with UPSTREAM_ACCOUNTS: set daily_limit and daily_headroom in the file"
                );
            }
            return super::accounts::load(path, self.upstream_qps, |var| std::env::var(var).ok());
        }
        let id = self.upstream_client_id.as_deref().unwrap_or("").trim();
        if id.is_empty() {
            anyhow::bail!(
                "UPSTREAM_CLIENT_ID is not set or empty (or list accounts in UPSTREAM_ACCOUNTS)"
            );
        }
        let secret = match &self.upstream_client_secret {
            Some(s) if !s.expose().is_empty() => s.clone(),
            _ => anyhow::bail!("UPSTREAM_CLIENT_SECRET is not set or empty"),
        };
        Ok(vec![AccountSpec {
            id: id.to_string(),
            secret,
            qps: self.upstream_qps,
            daily_limit: super::accounts::daily_limit(
                self.upstream_daily_limit,
                self.upstream_daily_headroom,
                "UPSTREAM_DAILY_LIMIT",
            )?,
            weight: 1.0,
            paths: Default::default(),
        }])
    }

    /// The first account's client configuration (the others' differ only in their
    /// credentials and their own paths) with every account, checked: the URL, the
    /// timeout, each account's paths.
    pub fn client_config(&self) -> anyhow::Result<(ClientConfig, Vec<AccountSpec>)> {
        let accounts = self.accounts()?;
        let first = &accounts[0];
        url::Url::parse(&self.upstream_base_url).map_err(|e| {
            anyhow::anyhow!(
                "UPSTREAM_BASE_URL {:?} is not a URL: {e}",
                self.upstream_base_url
            )
        })?;
        if self.upstream_timeout.is_zero() {
            anyhow::bail!("UPSTREAM_TIMEOUT must be above zero");
        }
        let credentials = Credentials {
            client_id: first.id.clone(),
            client_secret: first.secret.clone(),
        };
        let mut client = ClientConfig::new(self.upstream_base_url.clone(), credentials);
        client.timeout = self.upstream_timeout;
        client.paths = crate::upstream::client::Paths {
            token: self.upstream_token_path.trim().to_string(),
            create: self.upstream_create_path.trim().to_string(),
            status: self.upstream_status_path.trim().to_string(),
        };
        client
            .paths
            .check(crate::upstream::client::Paths::SETTINGS)
            .map_err(anyhow::Error::msg)?;
        for account in &accounts {
            account
                .paths
                .over(&client.paths)
                .check(["token_path", "create_path", "status_path"])
                .map_err(|e| anyhow::anyhow!("UPSTREAM_ACCOUNTS account {:?}: {e}", account.id))?;
        }
        Ok((client, accounts))
    }
}

fn paths_json(paths: &crate::upstream::client::Paths) -> serde_json::Value {
    serde_json::json!({"token": paths.token, "create": paths.create, "status": paths.status})
}

impl RunArgs {
    /// The configuration `run` works with, as `run --check-config` prints it: every
    /// setting after parsing and checking, durations as written (`30s`), never a secret
    /// (only whether one is set).
    pub fn effective(&self) -> anyhow::Result<serde_json::Value> {
        let (client, worker, accounts) = self.configs()?;
        let d = crate::config::format_duration;
        let od = |o: Option<Duration>| o.map(d);
        let accounts: Vec<serde_json::Value> = accounts
            .iter()
            .map(|a| {
                serde_json::json!({
                    "id": a.id,
                    "qps": a.qps,
                    "daily_limit": a.daily_limit.map(|l| l.limit),
                    "daily_headroom": a.daily_limit.map(|l| l.headroom),
                    "weight": a.weight,
                    "paths": paths_json(&a.paths.over(&client.paths)),
                })
            })
            .collect();
        let retention = &worker.retention;
        let webhooks = worker.webhooks.as_ref().map(|w| {
            serde_json::json!({
                "timeout": d(w.policy.timeout),
                "retry_min": d(w.policy.base),
                "max_attempts": w.policy.max_attempts,
                "allow_private": self.webhook_allow_private,
                "allow_hosts": self.webhook_allow_hosts,
            })
        });
        Ok(serde_json::json!({
            "accounts": accounts,
            "upstream": {
                "base_url": crate::config::redact_url(&client.base_url),
                "paths": paths_json(&client.paths),
                "timeout": d(client.timeout),
                "max_download_bytes": client.max_download_bytes,
                "download_timeout": d(client.download_timeout),
                "download_hosts": client.download_hosts,
                "download_memory": client.download_memory,
                "stop_probe": d(worker.stop_probe_base),
            },
            "poll": {
                "first_poll": d(worker.poll.first_poll),
                "poll_min": d(worker.poll.poll_min),
                "poll_max": d(worker.poll.poll_max),
                "window": d(worker.poll.window),
                "give_up_after": d(worker.poll.give_up_after),
                "detection_target": od(worker.detection_target),
            },
            "retry": {
                "min": d(worker.retry.base),
                "max": d(worker.retry.cap),
                "budget": d(worker.retry.budget),
                "new_task_after": d(worker.retry.new_task_base),
                "download_tries": worker.download_tries,
            },
            "reuse_within": od(worker.reuse_within),
            "worker": {
                "owner": worker.owner,
                "concurrency": worker.concurrency,
                "lease": d(worker.lease),
                "idle_poll": d(worker.idle_poll),
                "shutdown_timeout": d(worker.shutdown_timeout),
                "startup_timeout": od(self.worker_startup_timeout),
                "metrics_addr": self.metrics_addr.map(|a| a.to_string()),
            },
            "retention": {
                "finished": od(retention.finished),
                "documents_only": retention.documents_only,
                "events": od(retention.events),
                "every": d(retention.every),
            },
            "webhooks": webhooks,
            "dashboard": {
                "addr": self.dashboard_addr.map(|a| a.to_string()),
                "token_set": self.dashboard.token.is_some(),
                "refresh": d(self.dashboard.refresh),
                "public_read": self.dashboard.public_read,
                "trusted_proxies": self.dashboard.trusted_proxies.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            },
            "document_store": self.store.document_store,
            "database": {
                "url": crate::config::redact_url(&self.db.database_url),
                "pool_mode": format!("{:?}", self.db.database_pool_mode).to_lowercase(),
                "listen": match &worker.listen {
                    crate::engine::Listen::Pool => "pool".to_string(),
                    crate::engine::Listen::Url(url) => crate::config::redact_url(url),
                    crate::engine::Listen::Off => "off (idle workers poll)".to_string(),
                },
            },
        }))
    }

    /// One client per account, each with the shared settings of `client` and its own
    /// credentials (so its own token): the accounts as the engine takes them.
    pub fn account_setups(
        client: &ClientConfig,
        specs: &[AccountSpec],
    ) -> anyhow::Result<Vec<crate::engine::AccountSetup>> {
        specs
            .iter()
            .map(|spec| {
                let mut config = client.clone();
                config.paths = spec.paths.over(&client.paths);
                config.credentials = Credentials {
                    client_id: spec.id.clone(),
                    client_secret: spec.secret.clone(),
                };
                Ok(crate::engine::AccountSetup {
                    name: spec.id.clone(),
                    client: crate::upstream::Client::new(config)
                        .map_err(|e| anyhow::anyhow!("{e}"))?,
                    qps: spec.qps,
                    daily_limit: spec.daily_limit,
                    weight: spec.weight,
                })
            })
            .collect()
    }

    /// `run`'s arguments from `args` (what follows `report-worker run`), through the
    /// same parser as the command line (with the environment as fallback, as there).
    pub fn parse_from<I, T>(args: I) -> anyhow::Result<RunArgs>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let argv = ["report-worker".into(), "run".into()]
            .into_iter()
            .chain(args.into_iter().map(Into::into));
        match Cli::try_parse_from(argv)?.command {
            Command::Run(args) => Ok(*args),
            _ => unreachable!("parsed as run"),
        }
    }

    fn webhooks(&self) -> anyhow::Result<Option<crate::engine::webhooks::Webhooks>> {
        let Some(secret) = &self.webhook_secret else {
            return Ok(None);
        };
        if secret.expose().len() < 16 {
            anyhow::bail!("WEBHOOK_SECRET is shorter than 16 characters: use a long random value");
        }
        if self.webhook_timeout.is_zero() || self.webhook_retry_min.is_zero() {
            anyhow::bail!("WEBHOOK_TIMEOUT and WEBHOOK_RETRY_MIN must be above zero");
        }
        if self.webhook_max_attempts < 1 {
            anyhow::bail!("WEBHOOK_MAX_ATTEMPTS must be at least 1");
        }
        let policy = crate::engine::policy::WebhookPolicy {
            timeout: self.webhook_timeout,
            base: self.webhook_retry_min,
            cap: Duration::from_secs(3600).max(self.webhook_retry_min),
            max_attempts: self.webhook_max_attempts,
        };
        let destinations = crate::webhook::Destinations {
            allow_private: self.webhook_allow_private,
            allow_hosts: self
                .webhook_allow_hosts
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
        };
        let sender =
            crate::webhook::Sender::new(secret.expose(), self.webhook_timeout, destinations)
                .map_err(|e| anyhow::anyhow!("could not build the webhook client: {e}"))?;
        Ok(Some(crate::engine::webhooks::Webhooks { sender, policy }))
    }
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Address to listen on, e.g. 127.0.0.1:8080 (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    #[command(flatten)]
    pub sim: crate::simulator::SimConfig,
}

/// Where documents' bytes live. S3 credentials come from the usual variables
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`), never from the command line.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Where documents go: postgres (the default), or s3://bucket/prefix for
    /// S3-compatible object storage (the metadata stays in PostgreSQL).
    #[arg(long, env = "DOCUMENT_STORE", default_value = "postgres")]
    pub document_store: String,
    /// The S3-compatible endpoint, e.g. http://127.0.0.1:9000 (default: AWS).
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub s3_endpoint: Option<String>,
    /// The bucket's region (default: us-east-1).
    #[arg(long, env = "AWS_REGION")]
    pub s3_region: Option<String>,
}

impl StoreArgs {
    pub async fn open(&self) -> anyhow::Result<crate::store::DocumentStore> {
        let settings = crate::store::S3Settings {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            ..Default::default()
        };
        crate::store::DocumentStore::open(&self.document_store, &settings)
            .await
            .map_err(|e| anyhow::anyhow!("DOCUMENT_STORE {}: {e}", self.document_store))
    }
}

#[derive(Debug, Args)]
pub struct MoveDocumentsArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Where to move them: DOCUMENT_STORE (s3://bucket/prefix).
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Args)]
pub struct DbArgs {
    /// PostgreSQL connection string.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// `transaction` when DATABASE_URL is a pooler in transaction mode (PgBouncer's
    /// pool_mode = transaction): no named prepared statements, no session state.
    #[arg(long, env = "DATABASE_POOL_MODE", value_enum, default_value_t = crate::queue::PoolMode::Session)]
    pub database_pool_mode: crate::queue::PoolMode,
}

impl DbArgs {
    /// A pool of at most `max_connections` on DATABASE_URL, in its pool mode.
    /// A pool for a command that works on the queue: its schema checked first, so that
    /// an unmigrated database (or one newer than this binary) is one clear line.
    pub async fn connect(&self, max_connections: u32) -> anyhow::Result<crate::queue::Db> {
        let pool = self.connect_unchecked(max_connections).await?;
        if let Some(problem) = crate::queue::schema(&pool).await?.problem() {
            pool.close().await;
            anyhow::bail!("{problem}");
        }
        Ok(pool)
    }

    /// A pool whatever the schema (for `migrate`).
    pub async fn connect_unchecked(
        &self,
        max_connections: u32,
    ) -> Result<crate::queue::Db, crate::queue::DbError> {
        crate::queue::connect_in(&self.database_url, max_connections, self.database_pool_mode).await
    }
}

#[derive(Debug, Args)]
pub struct EnqueueArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Enqueue every line of this CSV file (columns by header: company_name, credit_code,
    /// org_number, report_type, priority, dedupe_key, run_after, metadata, max_attempts).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["company_name", "credit_code", "org_number", "dedupe_key", "metadata", "run_after", "max_attempts", "callback_url"])]
    pub csv: Option<std::path::PathBuf>,
    /// Encoding of the CSV file: utf-8 (with or without BOM) or gbk.
    #[arg(long, default_value = "utf-8", requires = "csv", value_parser = crate::ops::csv_import::parse_encoding)]
    pub encoding: &'static encoding_rs::Encoding,
    /// Refuse the whole file if any line is bad (default: skip bad lines).
    #[arg(long, requires = "csv")]
    pub all_or_nothing: bool,
    /// Rows per INSERT.
    #[arg(long, default_value_t = 10_000, requires = "csv", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,
    /// The batch the rows join, to follow and export them as one (with --csv, default:
    /// the file's name and the time, printed).
    #[arg(long)]
    pub batch: Option<String>,
    /// Where to POST the outcome when the report finishes (http:// or https://).
    #[arg(long)]
    pub callback_url: Option<String>,
    /// Enterprise name, e.g. 小米科技有限责任公司.
    #[arg(long)]
    pub company_name: Option<String>,
    /// Unified social credit code (18 digits or capital letters).
    #[arg(long)]
    pub credit_code: Option<String>,
    /// Organization code.
    #[arg(long)]
    pub org_number: Option<String>,
    /// Report type: word or pdf (default pdf; with --csv, for lines without one).
    #[arg(long = "type")]
    pub report_type: Option<ReportType>,
    /// Lower runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i16,
    /// Not before this: an RFC 3339 time or a delay from now such as 10m.
    #[arg(long, value_parser = parse_run_after)]
    pub run_after: Option<DateTime<Utc>>,
    /// Upstream tasks that may be created for this row (1..=100, default 3).
    #[arg(long)]
    pub max_attempts: Option<i32>,
    /// Idempotency key: enqueueing the same key again returns the existing row.
    #[arg(long)]
    pub dedupe_key: Option<String>,
    /// Opaque JSON object stored with the row.
    #[arg(long, value_parser = parse_json_object)]
    pub metadata: Option<serde_json::Value>,
}

pub(super) fn parse_run_after(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s.trim()) {
        return Ok(t.with_timezone(&Utc));
    }
    let delay = parse_duration(s).map_err(|_| {
        format!(
            "expected an RFC 3339 time (2026-01-31T09:00:00+08:00) or a delay like 10m, got {s:?}"
        )
    })?;
    Ok(Utc::now() + chrono::Duration::from_std(delay).map_err(|e| e.to_string())?)
}

fn parse_json_object(s: &str) -> Result<serde_json::Value, String> {
    let v: serde_json::Value = serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))?;
    if !v.is_object() {
        return Err("metadata must be a JSON object".into());
    }
    Ok(v)
}
