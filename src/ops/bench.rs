//! `report-worker bench`: the worker measured the way its users feel it, against real
//! PostgreSQL and the simulator over HTTP. Each scenario runs in a fresh database on
//! the server named by DATABASE_URL. Figures, never assertions: targets are judged in
//! BENCHMARKS.md.

use crate::queue::sql;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::queue::Db;
use anyhow::Context;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::domain::{NewRequest, ReportType};
use crate::engine::metrics::Metrics;
use crate::engine::policy::DEFAULT_DETECTION_TARGET;
use crate::engine::policy::{PollPolicy, Progress};
use crate::engine::{Worker, WorkerConfig};
use crate::queue;
use crate::queue::fixtures;
use crate::simulator::{SimConfig, Simulator};
use crate::upstream::Client;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub database_url: String,
    pub only: Vec<String>,
    pub reports: usize,
    pub concurrency: usize,
    pub csv_rows: usize,
    pub inflight_rows: usize,
    pub qps: u32,
    /// Rows in the stats scenario.
    pub stats_rows: usize,
    /// Megabytes of the document in the RSS scenario.
    pub document_mb: usize,
    /// Rows of history in the dashboard scenario.
    pub dashboard_rows: usize,
    /// A transaction pooler (PgBouncer, `pool_mode = transaction`) in front of
    /// DATABASE_URL's server: the `pgbouncer` scenario runs the worker through it.
    pub pooler_url: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct BenchResults {
    pub date: String,
    pub machine: String,
    pub burn_down: Option<BurnDown>,
    pub pickup: Option<Pickup>,
    pub bulk_enqueue: Option<BulkEnqueue>,
    pub economy: Option<Vec<Economy>>,
    pub qps_use: Option<QpsUse>,
    pub inflight: Option<InFlight>,
    pub idle: Option<Idle>,
    pub stats: Option<Stats>,
    pub purge: Option<PurgeBeside>,
    pub rss: Option<DocumentRss>,
    pub hot: Option<Vec<HotUpdates>>,
    pub dashboard: Option<DashboardLoad>,
    pub pgbouncer: Option<ThroughPooler>,
}

/// The burn-down and pickup with the worker's connections through a transaction pooler
/// (`DATABASE_POOL_MODE=transaction`): LISTEN over a direct session
/// (`LISTEN_DATABASE_URL`), or none (idle workers poll every `WORKER_IDLE_POLL`).
#[derive(Debug, Serialize)]
pub struct ThroughPooler {
    pub burn_down: BurnDown,
    pub pickup_listen: Pickup,
    pub pickup_polling: Pickup,
    pub idle_poll_ms: f64,
}

/// How the bench's worker reaches the database.
#[derive(Debug, Clone, Copy)]
enum Via<'a> {
    Direct,
    /// Through the pooler at this URL (its database name replaced), in transaction
    /// mode, listening over a direct session when `listen`.
    Pooler {
        url: &'a str,
        listen: bool,
    },
}

impl Via<'_> {
    /// The worker's pool for the database at `url` (direct), and its way to listen.
    async fn worker_pool(
        self,
        url: &str,
        size: u32,
    ) -> anyhow::Result<(Db, crate::engine::Listen)> {
        Ok(match self {
            Via::Direct => (
                queue::connect_worker(url, size).await?,
                crate::engine::Listen::Pool,
            ),
            Via::Pooler {
                url: pooler,
                listen,
            } => {
                let mut pooled = url::Url::parse(pooler).context("--pooler")?;
                pooled.set_path(url::Url::parse(url)?.path());
                let pool =
                    queue::connect_worker_in(pooled.as_str(), size, queue::PoolMode::Transaction)
                        .await?;
                let listen = if listen {
                    crate::engine::Listen::Url(url.to_string())
                } else {
                    crate::engine::Listen::Off
                };
                (pool, listen)
            }
        })
    }
}

/// Dashboard pages over a large table: server time (the `Server-Timing` header) of
/// each page, loaded repeatedly.
#[derive(Debug, Serialize)]
pub struct DashboardLoad {
    pub rows: usize,
    /// (page, p50 ms, max ms) over `loads` loads after a first one.
    pub pages: Vec<(String, f64, f64)>,
    pub loads: usize,
}

/// `report_queue_stats` on a large table.
#[derive(Debug, Serialize)]
pub struct Stats {
    pub rows: usize,
    /// The first read after loading (cold caches, first plan).
    pub cold_ms: f64,
    /// The next 20 reads.
    pub p50_ms: f64,
    pub max_ms: f64,
    /// The same figures computed by scanning the table (what the view did before).
    pub scan_ms: f64,
}

/// Live work beside a purge of a million rows.
#[derive(Debug, Serialize)]
pub struct PurgeBeside {
    pub purged_rows: u64,
    pub purge_seconds: f64,
    pub pickup_p50_ms: [f64; 2],
    pub pickup_p99_ms: [f64; 2],
    pub burn_down_reports_per_s: [f64; 2],
}

/// Peak resident memory of a worker process storing one large document.
#[derive(Debug, Serialize)]
pub struct DocumentRss {
    pub document_mb: f64,
    pub idle_mb: f64,
    pub postgres_store_mb: f64,
    pub object_store_mb: Option<f64>,
}

/// Updates of report_requests over a long burn-down, and what they left behind.
#[derive(Debug, Serialize)]
pub struct HotUpdates {
    pub fillfactor: u32,
    pub reports: usize,
    pub updates: i64,
    pub hot_share: f64,
    pub table_mb: f64,
    pub indexes_mb: f64,
    pub reports_per_s: f64,
}

/// What an idle worker process costs the database.
#[derive(Debug, Serialize)]
pub struct Idle {
    pub seconds: f64,
    /// Transactions per second while 1,000 polls are due but held by another process.
    pub polls_held_elsewhere_tx_per_s: f64,
    /// Transactions per second while the account is stopped and 1,000 polls are due.
    pub account_stopped_tx_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct BurnDown {
    pub reports: usize,
    pub concurrency: usize,
    pub seconds: f64,
    pub reports_per_s: f64,
    pub transactions_per_report: f64,
    pub upstream_calls_per_report: f64,
}

#[derive(Debug, Serialize)]
pub struct Pickup {
    pub rows: usize,
    /// The very first pickup of a fresh worker (token fetch, new connections).
    pub cold_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct BulkEnqueue {
    pub rows: usize,
    pub seconds: f64,
    pub rows_per_s: f64,
    pub peak_rss_mb: f64,
}

#[derive(Debug, Serialize)]
pub struct Economy {
    pub policy: String,
    pub calls_per_report: f64,
    pub detection_p50_s: f64,
    pub detection_p95_s: f64,
}

#[derive(Debug, Serialize)]
pub struct QpsUse {
    pub processes: usize,
    pub qps: u32,
    pub seconds: f64,
    pub accepted_per_s: f64,
    pub used_share: f64,
    pub rejected_share: f64,
}

#[derive(Debug, Serialize)]
pub struct InFlight {
    pub generating_rows: usize,
    pub seconds: f64,
    pub worker_peak_rss_mb: f64,
    pub transactions_per_s: f64,
    pub polls_per_s: f64,
    pub polls_due_per_s: f64,
}

fn wants(o: &BenchOptions, name: &str) -> bool {
    o.only.is_empty() || o.only.iter().any(|n| n == name)
}

pub async fn run(o: &BenchOptions) -> anyhow::Result<BenchResults> {
    if o.pooler_url.is_none() && o.only.iter().any(|n| n == "pgbouncer") {
        anyhow::bail!(
            "the pgbouncer scenario needs --pooler (BENCH_POOLER_URL): a PgBouncer in transaction mode"
        );
    }
    let mut r = BenchResults {
        date: chrono::Utc::now().to_rfc3339(),
        machine: machine(),
        ..Default::default()
    };
    if wants(o, "burn-down") {
        r.burn_down = Some(burn_down(o, Via::Direct).await.context("burn-down")?);
        eprintln!("{:?}", r.burn_down);
    }
    if wants(o, "pickup") {
        r.pickup = Some(
            pickup(o, Via::Direct, Duration::from_secs(5))
                .await
                .context("pickup")?,
        );
        eprintln!("{:?}", r.pickup);
    }
    if wants(o, "bulk-enqueue") {
        r.bulk_enqueue = Some(bulk_enqueue(o).await.context("bulk enqueue")?);
        eprintln!("{:?}", r.bulk_enqueue);
    }
    if wants(o, "economy") {
        r.economy = Some(economy(20_000));
        eprintln!("{:?}", r.economy);
    }
    if wants(o, "qps") {
        r.qps_use = Some(qps_use(o).await.context("qps use")?);
        eprintln!("{:?}", r.qps_use);
    }
    if wants(o, "inflight") {
        r.inflight = Some(inflight(o).await.context("in-flight scale")?);
        eprintln!("{:?}", r.inflight);
    }
    if wants(o, "idle") {
        r.idle = Some(idle(o).await.context("idle")?);
        eprintln!("{:?}", r.idle);
    }
    if wants(o, "stats") {
        r.stats = Some(stats(o).await.context("stats")?);
        eprintln!("{:?}", r.stats);
    }
    if wants(o, "purge") {
        r.purge = Some(purge_beside(o).await.context("purge beside live work")?);
        eprintln!("{:?}", r.purge);
    }
    if wants(o, "rss") {
        r.rss = Some(document_rss(o).await.context("document rss")?);
        eprintln!("{:?}", r.rss);
    }
    if wants(o, "dashboard") {
        r.dashboard = Some(dashboard(o).await.context("dashboard")?);
        eprintln!("{:?}", r.dashboard);
    }
    if let Some(pooler) = o.pooler_url.as_deref().filter(|_| wants(o, "pgbouncer")) {
        let listen = Via::Pooler {
            url: pooler,
            listen: true,
        };
        let polling = Via::Pooler {
            url: pooler,
            listen: false,
        };
        // The worker's default WORKER_IDLE_POLL: what idle workers cost without LISTEN.
        let idle_poll = Duration::from_secs(1);
        r.pgbouncer = Some(ThroughPooler {
            burn_down: burn_down(o, listen)
                .await
                .context("burn-down through the pooler")?,
            pickup_listen: pickup(o, listen, Duration::from_secs(5))
                .await
                .context("pickup through the pooler, listening")?,
            pickup_polling: pickup(o, polling, idle_poll)
                .await
                .context("pickup through the pooler, polling")?,
            idle_poll_ms: idle_poll.as_secs_f64() * 1000.0,
        });
        eprintln!("{:?}", r.pgbouncer);
    }
    if wants(o, "hot") {
        let mut runs = Vec::new();
        for fillfactor in [100, 80] {
            runs.push(hot(o, fillfactor).await.context("hot updates")?);
        }
        eprintln!("{runs:?}");
        r.hot = Some(runs);
    }
    Ok(r)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
                    / 1024
                    / 1024
            })
        })
        .unwrap_or(0);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores ({cpu}), {mem} GiB")
}

/// A fresh database named `name` on DATABASE_URL's server, migrated.
async fn fresh_db(admin_url: &str, name: &str) -> anyhow::Result<(String, Db)> {
    let admin = queue::connect(admin_url, 1).await?;
    sql::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&admin)
    .await?;
    sql::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&admin)
        .await?;
    admin.close().await;
    let mut url = url::Url::parse(admin_url).context("DATABASE_URL")?;
    url.set_path(&format!("/{name}"));
    let url = url.to_string();
    let pool = queue::connect(&url, 8).await?;
    queue::migrate(&pool).await?;
    Ok((url, pool))
}

async fn transactions(pool: &Db) -> anyhow::Result<i64> {
    // Statistics reach pg_stat_database with a short delay; give them a moment.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    Ok(sql::query_scalar(
        "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?)
}

fn client_for(sim: &Simulator) -> anyhow::Result<Client> {
    Client::new(sim.client_config()).map_err(|e| anyhow::anyhow!("{e}"))
}

async fn open_rows(pool: &Db) -> anyhow::Result<bool> {
    Ok(fixtures::any_open(pool).await?)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn burn_down(o: &BenchOptions, via: Via<'_>) -> anyhow::Result<BurnDown> {
    let (url, pool) = fresh_db(&o.database_url, "rw_bench_burn_down").await?;
    fixtures::insert_backlog(&pool, "企业", o.reports, true).await?;
    let sim = Simulator::start(
        SimConfig {
            doc_size: 2_000,
            ..SimConfig::instant()
        },
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let mut config = WorkerConfig::new(sim.config().client_id.clone());
    config.concurrency = o.concurrency;
    config.qps = 0.0;
    config.lease = Duration::from_secs(60);
    config.poll = PollPolicy {
        first_poll: Duration::ZERO,
        ..PollPolicy::default()
    };
    let (worker_pool, listen) = via
        .worker_pool(&url, crate::engine::pool_size(o.concurrency))
        .await?;
    config.listen = listen;
    let before = transactions(&pool).await?;
    let stop = CancellationToken::new();
    let start = Instant::now();
    let handle = tokio::spawn(
        Worker::new(
            worker_pool,
            client_for(&sim)?,
            config,
            Arc::new(Metrics::new()),
        )
        .run(stop.clone()),
    );
    while open_rows(&pool).await? {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    stop.cancel();
    handle.await?;
    let stats = sim.stats();
    sim.stop().await;
    let after = transactions(&pool).await?;
    let succeeded = fixtures::count_documents_stored(&pool).await?;
    anyhow::ensure!(
        succeeded as usize == o.reports,
        "only {succeeded} of {} reports stored",
        o.reports
    );
    let calls = stats.calls_to("create") + stats.calls_to("status") + stats.calls_to("download");
    Ok(BurnDown {
        reports: o.reports,
        concurrency: o.concurrency,
        seconds,
        reports_per_s: o.reports as f64 / seconds,
        // Minus the two statistics reads and the polling of this harness itself.
        transactions_per_report: (after - before) as f64 / o.reports as f64,
        upstream_calls_per_report: calls as f64 / o.reports as f64,
    })
}

/// Pickup latency; `idle_poll` is the worker's fallback poll (long, so that only
/// NOTIFY counts, when it listens).
async fn pickup(o: &BenchOptions, via: Via<'_>, idle_poll: Duration) -> anyhow::Result<Pickup> {
    let (url, pool) = fresh_db(&o.database_url, "rw_bench_pickup").await?;
    let sim = Simulator::start(SimConfig::instant(), "127.0.0.1:0".parse()?).await?;
    let mut config = WorkerConfig::new(sim.config().client_id.clone());
    config.qps = 0.0;
    config.idle_poll = idle_poll;
    let (worker_pool, listen) = via
        .worker_pool(&url, crate::engine::pool_size(config.concurrency))
        .await?;
    config.listen = listen;
    let stop = CancellationToken::new();
    let handle = tokio::spawn(
        Worker::new(
            worker_pool,
            client_for(&sim)?,
            config,
            Arc::new(Metrics::new()),
        )
        .run(stop.clone()),
    );
    // Let the worker reach its idle wait, listening.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Every insert counts, from the very first on a fresh worker (which also fetches
    // the token and opens its HTTP connections; it is reported as the cold pickup).
    let rows = 200;
    let mut commits = Vec::with_capacity(rows);
    for i in 0..rows {
        let name = format!("即时{i}");
        let request = NewRequest::new(Some(&name), None, None, ReportType::Pdf)?;
        queue::enqueue(&pool, &request).await?;
        commits.push((name, SystemTime::now()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut latencies = Vec::with_capacity(rows);
    for (name, committed) in &commits {
        let created = loop {
            if let Some(t) = sim.first_create(name) {
                break t;
            }
            anyhow::ensure!(Instant::now() < deadline, "row {name} was never picked up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let ms = created
            .duration_since(*committed)
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0);
        latencies.push(ms);
    }
    stop.cancel();
    handle.await?;
    sim.stop().await;
    if std::env::var_os("BENCH_DEBUG").is_some() {
        eprintln!("pickup latencies in insert order (ms): {latencies:.1?}");
    }
    let cold_ms = latencies[0];
    latencies.sort_by(f64::total_cmp);
    Ok(Pickup {
        rows,
        cold_ms,
        p50_ms: pct(&latencies, 0.5),
        p99_ms: pct(&latencies, 0.99),
        max_ms: latencies.last().copied().unwrap_or(f64::NAN),
    })
}

/// A process's peak resident memory so far (VmHWM), in KiB.
fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Samples a child's peak resident memory (VmHWM) until it exits.
async fn wait_with_peak_rss(mut child: Child) -> anyhow::Result<(std::process::ExitStatus, f64)> {
    let pid = child.id();
    let mut peak_kb = 0u64;
    loop {
        if let Some(kb) = peak_rss_kb(pid) {
            peak_kb = peak_kb.max(kb);
        }
        if let Some(status) = child.try_wait()? {
            return Ok((status, peak_kb as f64 / 1024.0));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn bulk_enqueue(o: &BenchOptions) -> anyhow::Result<BulkEnqueue> {
    let (url, pool) = fresh_db(&o.database_url, "rw_bench_bulk").await?;
    let dir = std::env::temp_dir().join(format!("rw-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("requests.csv");
    write_csv(&path, o.csv_rows)?;
    let start = Instant::now();
    let child = Command::new(std::env::current_exe()?)
        .args(["enqueue", "--csv"])
        .arg(&path)
        .env("DATABASE_URL", &url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let (status, peak) = wait_with_peak_rss(child).await?;
    let seconds = start.elapsed().as_secs_f64();
    anyhow::ensure!(status.success(), "enqueue --csv failed: {status}");
    let n = fixtures::count_requests(&pool).await?;
    anyhow::ensure!(
        n as usize == o.csv_rows,
        "{n} rows inserted of {}",
        o.csv_rows
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(BulkEnqueue {
        rows: o.csv_rows,
        seconds,
        rows_per_s: o.csv_rows as f64 / seconds,
        peak_rss_mb: peak,
    })
}

fn write_csv(path: &Path, rows: usize) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(
        f,
        "company_name,credit_code,report_type,priority,dedupe_key,metadata"
    )?;
    for i in 0..rows {
        writeln!(
            f,
            "测试企业{i}有限公司,,{},{},order-{i},\"{{\"\"batch\"\": {}}}\"",
            if i % 3 == 0 { "word" } else { "pdf" },
            i % 5,
            i / 1000
        )?;
    }
    f.flush()?;
    Ok(())
}

/// Calls per report and detection delay of a poll schedule, on a virtual clock, for
/// generation times spread evenly over 1–10 minutes. The provider is modelled as the
/// simulator is: queued (`job_status` 0) for the first 30 % of the generation time.
pub fn economy(n: usize) -> Vec<Economy> {
    let gens: Vec<f64> = (0..n)
        .map(|i| 60.0 + 540.0 * (i as f64 + 0.5) / n as f64)
        .collect();
    let policy = PollPolicy::default();
    let mut out = Vec::new();
    let mut summarise = |name: &str, results: Vec<(u32, f64)>| {
        let calls = results.iter().map(|(c, _)| *c as f64).sum::<f64>() / results.len() as f64;
        let mut delays: Vec<f64> = results.iter().map(|(_, d)| *d).collect();
        delays.sort_by(f64::total_cmp);
        out.push(Economy {
            policy: name.into(),
            calls_per_report: calls,
            detection_p50_s: pct(&delays, 0.5),
            detection_p95_s: pct(&delays, 0.95),
        });
    };
    let mut jitter = Xorshift(0x2545_F491_4F6C_DD1D);
    let mut unit = move || jitter.unit();
    let ours = fixed_policy_run(&policy, &gens, &mut unit);
    summarise(
        "report-worker default (60 s, then 25 s / 60 s queued)",
        ours,
    );
    // Learned polling on the virtual clock: each report is polled with the schedule
    // learned from the reports before it (refreshed every 20), the fixed policy until
    // enough history exists. Generation times drawn at random (seeded), in order.
    let mut draws = Xorshift(0x9E37_79B9_7F4A_7C15);
    let uniform: Vec<f64> = (0..n).map(|_| 60.0 + 540.0 * draws.unit()).collect();
    let slow: Vec<f64> = (0..n).map(|_| draws.lognormal(180.0, 0.35)).collect();
    let shifted: Vec<f64> = (0..n)
        .map(|i| draws.lognormal(if i < n / 2 { 180.0 } else { 300.0 }, 0.35))
        .collect();
    for (name, gens) in [
        ("log-normal, median 3 min, σ 0.35", &slow),
        ("uniform 1–10 min", &uniform),
    ] {
        summarise(
            &format!("report-worker default, {name}"),
            fixed_policy_run(&policy, gens, &mut unit),
        );
        summarise(
            &format!("learned, {name}"),
            learned_run(&policy, DEFAULT_DETECTION_TARGET, gens, false, &mut unit),
        );
        summarise(
            &format!("learned with queue_num, {name}"),
            learned_run(&policy, DEFAULT_DETECTION_TARGET, gens, true, &mut unit),
        );
    }
    summarise(
        "learned with a 12.5 s target, uniform 1–10 min",
        learned_run(
            &policy,
            Duration::from_millis(12_500),
            &uniform,
            false,
            &mut unit,
        ),
    );
    summarise(
        "learned with queue_num, 12.5 s target, uniform 1–10 min",
        learned_run(
            &policy,
            Duration::from_millis(12_500),
            &uniform,
            true,
            &mut unit,
        ),
    );
    let learned = learned_run(
        &policy,
        DEFAULT_DETECTION_TARGET,
        &shifted,
        false,
        &mut unit,
    );
    let half = n / 2;
    summarise(
        "learned, median 3 → 5 min: the 200 reports after the shift",
        learned[half..half + 200].to_vec(),
    );
    summarise(
        "learned, median 3 → 5 min: from the 200th report after it",
        learned[half + 200..].to_vec(),
    );
    summarise(
        "report-worker default, median 3 → 5 min: after the shift",
        fixed_policy_run(&policy, &shifted, &mut unit)[half..].to_vec(),
    );
    for interval in [15.0, 60.0] {
        let fixed: Vec<(u32, f64)> = gens
            .iter()
            .map(|&g| {
                let polls = (g / interval).ceil();
                (1 + polls as u32, polls * interval - g)
            })
            .collect();
        summarise(&format!("fixed {interval:.0} s"), fixed);
    }
    out
}

/// Seeded draws for the virtual-clock scenarios.
struct Xorshift(u64);

impl Xorshift {
    fn unit(&mut self) -> f64 {
        let s = &mut self.0;
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        ((*s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Log-normal with this median and σ, clipped to the provider's 1–10 minutes.
    fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        let z = (-2.0 * self.unit().ln()).sqrt() * (2.0 * std::f64::consts::PI * self.unit()).cos();
        (median * (sigma * z).exp()).clamp(60.0, 600.0)
    }
}

/// (calls, detection delay) of each report under the fixed policy (the provider says
/// "queued" for the first 30 % of a task).
fn fixed_policy_run(
    policy: &PollPolicy,
    gens: &[f64],
    unit: &mut impl FnMut() -> f64,
) -> Vec<(u32, f64)> {
    let t0 = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH;
    let secs = |d: chrono::DateTime<chrono::Utc>| (d - t0).num_milliseconds() as f64 / 1000.0;
    gens.iter()
        .map(|&g| {
            let mut t = policy.first_poll_at(t0);
            let mut calls = 2;
            while secs(t) < g {
                let progress = if secs(t) < 0.3 * g {
                    Progress::Queued
                } else {
                    Progress::Exporting
                };
                match policy.next_poll_at(t0, t, progress, unit()) {
                    Some(next) => t = next,
                    None => break,
                }
                calls += 1;
            }
            (calls, secs(t) - g)
        })
        .collect()
}

/// (calls, detection delay) of each report under learned polling, learning as it goes.
/// The provider is modelled as the simulator is: queued for the first 30 % of a task,
/// with 0–5 jobs ahead at first, counting down; with `queue`, the schedule uses those
/// `queue_num` answers.
fn learned_run(
    policy: &PollPolicy,
    target: Duration,
    gens: &[f64],
    queue: bool,
    unit: &mut impl FnMut() -> f64,
) -> Vec<(u32, f64)> {
    use crate::engine::schedule::{HISTORY, Observation, Schedule, Waiting};
    let mut history: std::collections::VecDeque<Observation> = Default::default();
    let mut schedule: Option<Schedule> = None;
    let mut out = Vec::with_capacity(gens.len());
    let mut ahead = Xorshift(0xD1B5_4A32_D192_ED03);
    for (i, &g) in gens.iter().enumerate() {
        if i % 20 == 0 {
            let recent: Vec<Observation> = history.iter().copied().collect();
            schedule = Schedule::learn(&recent, policy.window, target, policy.poll_max);
        }
        let first_ahead = (ahead.unit() * 6.0).floor();
        let queued_at =
            |t: f64| (t < 0.3 * g).then(|| (first_ahead * (1.0 - t / (0.3 * g))).ceil() as i64);
        let (calls, ready_at, last_not_ready, waiting) = match &schedule {
            Some(s) => {
                let (mut t, mut last, mut calls, mut waiting) = (s.first(), 0.0, 2, None);
                while t < g {
                    let queued = queued_at(t);
                    if let Some(q) = queued {
                        waiting = Some(Waiting {
                            at: t,
                            queue_num: q,
                        });
                    }
                    let next = if queue {
                        s.next_after_answer(t, queued)
                    } else {
                        s.next_after(t)
                    };
                    match next {
                        Some(next) => {
                            last = t;
                            t = next;
                            calls += 1;
                        }
                        None => break,
                    }
                }
                (calls, t, last, waiting)
            }
            None => {
                let (calls, delay) = fixed_policy_run(policy, &[g], unit)[0];
                // The fixed grid's previous poll is unknown here: at least 25 s back.
                (
                    calls,
                    g + delay,
                    (g + delay - policy.poll_min.as_secs_f64()).max(0.0),
                    None,
                )
            }
        };
        out.push((calls, ready_at - g));
        history.push_back(Observation {
            lower: last_not_ready,
            upper: ready_at,
            waiting,
        });
        if history.len() > HISTORY {
            history.pop_front();
        }
    }
    out
}

fn worker_process(url: &str, sim: &Simulator, extra: &[(&str, &str)]) -> anyhow::Result<Child> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("run")
        .env("DATABASE_URL", url)
        .env("UPSTREAM_BASE_URL", sim.base_url())
        .env("UPSTREAM_CLIENT_ID", &sim.config().client_id)
        .env("UPSTREAM_CLIENT_SECRET", &sim.config().client_secret)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    Ok(cmd.spawn()?)
}

fn metered(sim: &Simulator) -> (u64, u64) {
    let s = sim.stats();
    let all = s.calls_to("create") + s.calls_to("status");
    let limited = s.calls("create:67200002") + s.calls("status:67200002");
    (all - limited, limited)
}

async fn qps_use(o: &BenchOptions) -> anyhow::Result<QpsUse> {
    let (url, pool) = fresh_db(&o.database_url, "rw_bench_qps").await?;
    fixtures::insert_backlog(&pool, "积压", 20_000, false).await?;
    let sim = Simulator::start(
        SimConfig {
            qps: Some(o.qps),
            create_latency: (Duration::from_millis(20), Duration::from_millis(200)),
            generation_time: (Duration::from_secs(3600), Duration::from_secs(3600)),
            ..SimConfig::instant()
        },
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let qps = o.qps.to_string();
    let mut children = Vec::new();
    for _ in 0..3 {
        children.push(worker_process(
            &url,
            &sim,
            &[
                ("UPSTREAM_QPS", &qps),
                ("REPORT_FIRST_POLL", "5s"),
                ("REPORT_POLL_MIN", "5s"),
                ("REPORT_POLL_MAX", "5s"),
            ],
        )?);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (a0, l0) = metered(&sim);
    let window = Duration::from_secs(20);
    tokio::time::sleep(window).await;
    let (a1, l1) = metered(&sim);
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    sim.stop().await;
    let accepted = (a1 - a0) as f64 / window.as_secs_f64();
    let limited = (l1 - l0) as f64;
    Ok(QpsUse {
        processes: 3,
        qps: o.qps,
        seconds: window.as_secs_f64(),
        accepted_per_s: accepted,
        used_share: accepted / o.qps as f64,
        rejected_share: limited / ((a1 - a0) as f64 + limited).max(1.0),
    })
}

async fn inflight(o: &BenchOptions) -> anyhow::Result<InFlight> {
    let (url, pool) = fresh_db(&o.database_url, "rw_bench_inflight").await?;
    let sim = Simulator::start(
        SimConfig {
            generation_time: (Duration::from_secs(3600), Duration::from_secs(3600)),
            ..SimConfig::instant()
        },
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let jobs: Vec<String> = sim
        .seed_jobs(o.inflight_rows, Duration::from_secs(3600), ReportType::Pdf)
        .iter()
        .map(u64::to_string)
        .collect();
    // Tasks just created, each next polled some time in the next minute.
    fixtures::insert_generating(&pool, &jobs, ReportType::Pdf, 60.0).await?;
    let window = Duration::from_secs(30);
    let due = fixtures::polls_due_within(&pool, window.as_secs_f64()).await?;
    let qps = o.qps.to_string();
    let child = worker_process(
        &url,
        &sim,
        &[("UPSTREAM_QPS", &qps), ("REPORT_WINDOW", "2h")],
    )?;
    let pid = child.id();
    let before = transactions(&pool).await?;
    let polls0 = sim.stats().calls_to("status");
    let start = Instant::now();
    let mut peak_kb = 0u64;
    while start.elapsed() < window {
        if let Some(kb) = peak_rss_kb(pid) {
            peak_kb = peak_kb.max(kb);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let polls = sim.stats().calls_to("status") - polls0;
    let mut child = child;
    let _ = child.kill();
    let _ = child.wait();
    let after = transactions(&pool).await?;
    sim.stop().await;
    Ok(InFlight {
        generating_rows: o.inflight_rows,
        seconds,
        worker_peak_rss_mb: peak_kb as f64 / 1024.0,
        // The harness's own two statistics reads are included: negligible.
        transactions_per_s: (after - before) as f64 / (seconds + 1.2),
        polls_per_s: polls as f64 / seconds,
        polls_due_per_s: due as f64 / window.as_secs_f64(),
    })
}

/// An idle `run` process, measured by the transactions its database sees: first while
/// every due poll is held by another process, then while the account is stopped.
async fn idle(o: &BenchOptions) -> anyhow::Result<Idle> {
    let (url, pool) = fresh_db(&o.database_url, "rw_bench_idle").await?;
    let sim = Simulator::start(SimConfig::instant(), "127.0.0.1:0".parse()?).await?;
    let jobs: Vec<String> = (1..=1000).map(|i| i.to_string()).collect();
    fixtures::insert_generating(&pool, &jobs, ReportType::Pdf, 0.0).await?;
    fixtures::hold_all(&pool, "another-process", Duration::from_secs(3600)).await?;
    let mut child = worker_process(&url, &sim, &[])?;
    let window = Duration::from_secs(10);
    // Let it start (connections, LISTEN), then measure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let measure = |pool: Db| async move {
        let before = transactions(&pool).await?;
        let start = Instant::now();
        tokio::time::sleep(window).await;
        let seconds = start.elapsed().as_secs_f64() + 1.2;
        let after = transactions(&pool).await?;
        anyhow::Ok((after - before) as f64 / seconds)
    };
    let held = measure(pool.clone()).await?;
    fixtures::hold_all(&pool, "", Duration::ZERO).await?;
    fixtures::stop_account(&pool, &sim.config().client_id, Duration::from_secs(3600)).await?;
    let stopped = measure(pool.clone()).await?;
    let _ = child.kill();
    let _ = child.wait();
    sim.stop().await;
    Ok(Idle {
        seconds: window.as_secs_f64(),
        polls_held_elsewhere_tx_per_s: held,
        account_stopped_tx_per_s: stopped,
    })
}

/// `report_queue_stats` at `o.stats_rows` rows (mostly finished history, some open).
async fn stats(o: &BenchOptions) -> anyhow::Result<Stats> {
    let (_, pool) = fresh_db(&o.database_url, "rw_bench_stats").await?;
    let rows = o.stats_rows;
    let mut done = 0;
    while done < rows {
        let n = (rows - done).min(1_000_000);
        fixtures::insert_history(&pool, done as i64, n as i64).await?;
        done += n;
    }
    fixtures::insert_backlog(&pool, "排队", 1_000, false).await?;
    sql::query("VACUUM ANALYZE report_requests")
        .execute(&pool)
        .await?;
    let mut times = Vec::new();
    for _ in 0..21 {
        let start = Instant::now();
        queue::queue_stats(&pool).await?;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    let cold_ms = times.remove(0);
    times.sort_by(f64::total_cmp);
    let start = Instant::now();
    fixtures::scan_stats(&pool).await?;
    let scan_ms = start.elapsed().as_secs_f64() * 1000.0;
    Ok(Stats {
        rows: rows + 1_000,
        cold_ms,
        p50_ms: pct(&times, 0.5),
        max_ms: *times.last().unwrap_or(&f64::NAN),
        scan_ms,
    })
}

/// Every dashboard page over `dashboard_rows` rows of history in batches of 10,000,
/// 1,000 recent finishes and a backlog of 10,000: server time per page.
async fn dashboard(o: &BenchOptions) -> anyhow::Result<DashboardLoad> {
    let (_, pool) = fresh_db(&o.database_url, "rw_bench_dashboard").await?;
    let rows = o.dashboard_rows;
    let mut done = 0;
    while done < rows {
        let n = (rows - done).min(1_000_000);
        fixtures::insert_batched_history(&pool, done as i64, n as i64, 10_000).await?;
        done += n;
    }
    fixtures::insert_recent_finishes(&pool, 1_000).await?;
    fixtures::insert_backlog(&pool, "排队", 10_000, true).await?;
    sql::query("VACUUM ANALYZE").execute(&pool).await?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let config =
        crate::dashboard::DashboardConfig::new(None, crate::store::DocumentStore::Postgres);
    let addr = crate::dashboard::serve(
        "127.0.0.1:0".parse().expect("static address"),
        pool.clone(),
        config,
        cancel.clone(),
    )
    .await?;
    let mid = (rows / 2) as i64;
    // One day in the middle of the history (rows are a second apart from 200 days ago).
    let middle = chrono::Utc::now() - chrono::Duration::days(200) + chrono::Duration::seconds(mid);
    let from = middle.format("%Y-%m-%dT%H:%M");
    let to = (middle + chrono::Duration::days(1)).format("%Y-%m-%dT%H:%M");
    let recent = (chrono::Utc::now() - chrono::Duration::hours(1)).format("%Y-%m-%dT%H:%M");
    let batch = format!("batch-{}", rows / 20_000);
    let pages = [
        "/".to_string(),
        "/requests".into(),
        "/requests?state=queued".into(),
        "/requests?state=failed".into(),
        format!("/requests?state=failed&before={mid}"),
        format!("/requests?state=succeeded&before={}", 1_000),
        format!("/requests?batch={batch}"),
        format!("/requests?batch={batch}&state=failed"),
        format!("/requests?q=历史{mid}"),
        "/requests?code=68300004".into(),
        format!("/requests?from={from}&to={to}"),
        format!("/requests?from={from}&to={to}&before={}", mid - 40_000),
        format!("/requests?from={recent}"),
        format!("/requests/{mid}"),
        "/batches".into(),
        format!("/batches?batch={batch}"),
        "/spend".into(),
    ];
    let http = reqwest::Client::new();
    let loads = 20;
    let mut out = Vec::new();
    for page in pages {
        let mut times = Vec::new();
        for i in 0..=loads {
            let r = http.get(format!("http://{addr}{page}")).send().await?;
            anyhow::ensure!(r.status().is_success(), "{page} answered {}", r.status());
            let ms = r
                .headers()
                .get("server-timing")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("app;dur="))
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| anyhow::anyhow!("{page} has no Server-Timing"))?;
            r.bytes().await?;
            if i > 0 {
                times.push(ms);
            }
        }
        times.sort_by(f64::total_cmp);
        out.push((page, pct(&times, 0.5), *times.last().unwrap_or(&f64::NAN)));
    }
    cancel.cancel();
    Ok(DashboardLoad {
        rows: rows + 11_000,
        pages: out,
        loads,
    })
}

/// Pickup latency and burn-down of a running worker, first alone, then while a purge
/// of a million old rows runs beside it.
async fn purge_beside(o: &BenchOptions) -> anyhow::Result<PurgeBeside> {
    let (url, pool) = fresh_db(&o.database_url, "rw_bench_purge").await?;
    fixtures::insert_history(&pool, 0, 1_000_000).await?;
    sql::query("VACUUM ANALYZE report_requests")
        .execute(&pool)
        .await?;
    let sim = Simulator::start(SimConfig::instant(), "127.0.0.1:0".parse()?).await?;
    let mut config = WorkerConfig::new(sim.config().client_id.clone());
    config.qps = 0.0;
    config.concurrency = 64;
    config.poll.first_poll = Duration::ZERO;
    let worker_pool = queue::connect_worker(&url, crate::engine::pool_size(64)).await?;
    let stop = CancellationToken::new();
    let handle = tokio::spawn(
        Worker::new(
            worker_pool,
            client_for(&sim)?,
            config,
            Arc::new(Metrics::new()),
        )
        .run(stop.clone()),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let live = |round: usize| {
        let (pool, sim) = (pool.clone(), &sim);
        async move {
            let latencies = pickup_latencies(&pool, sim, &format!("r{round}-"), 100).await?;
            fixtures::insert_backlog(&pool, &format!("烧{round}-"), 5_000, true).await?;
            let start = Instant::now();
            while fixtures::any_open(&pool).await? {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok((latencies, 5_000.0 / start.elapsed().as_secs_f64()))
        }
    };
    let (alone, alone_rate) = live(0).await?;
    let purging = {
        let pool = queue::connect(&url, 2).await?;
        tokio::spawn(async move {
            let scope = queue::PurgeScope {
                finished_before: chrono::Utc::now() - chrono::Duration::days(90),
                documents_only: false,
            };
            let start = Instant::now();
            let report = crate::engine::retention::purge(
                &pool,
                &crate::store::DocumentStore::Postgres,
                Some(&scope),
                None,
                crate::engine::retention::Pace::Gentle,
                &CancellationToken::new(),
                |_| {},
            )
            .await?;
            anyhow::Ok((report.requests, start.elapsed().as_secs_f64()))
        })
    };
    let (beside, beside_rate) = live(1).await?;
    let (purged_rows, purge_seconds) = purging.await??;
    stop.cancel();
    handle.await?;
    sim.stop().await;
    let p = |mut v: Vec<f64>, q: f64| {
        v.sort_by(f64::total_cmp);
        pct(&v, q)
    };
    Ok(PurgeBeside {
        purged_rows,
        purge_seconds,
        pickup_p50_ms: [p(alone.clone(), 0.5), p(beside.clone(), 0.5)],
        pickup_p99_ms: [p(alone, 0.99), p(beside, 0.99)],
        burn_down_reports_per_s: [alone_rate, beside_rate],
    })
}

/// Inserts `rows` single rows 20 ms apart and returns each one's pickup latency (insert
/// commit to the simulator's arrival of its create), in ms.
async fn pickup_latencies(
    pool: &Db,
    sim: &Simulator,
    prefix: &str,
    rows: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut commits = Vec::with_capacity(rows);
    for i in 0..rows {
        let name = format!("{prefix}{i}");
        let request = NewRequest::new(Some(&name), None, None, ReportType::Pdf)?;
        queue::enqueue(pool, &request).await?;
        commits.push((name, SystemTime::now()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut latencies = Vec::with_capacity(rows);
    for (name, committed) in &commits {
        let created = loop {
            if let Some(t) = sim.first_create(name) {
                break t;
            }
            anyhow::ensure!(Instant::now() < deadline, "row {name} was never picked up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        latencies.push(
            created
                .duration_since(*committed)
                .map(|d| d.as_secs_f64() * 1000.0)
                .unwrap_or(0.0),
        );
    }
    Ok(latencies)
}

/// A `run` process storing one document of `o.document_mb`: its peak RSS, for the
/// PostgreSQL store and (with BENCH_S3_ENDPOINT or TEST_S3_ENDPOINT) an object store.
async fn document_rss(o: &BenchOptions) -> anyhow::Result<DocumentRss> {
    let size = o.document_mb * 1024 * 1024;
    let sim = Simulator::start(
        SimConfig {
            doc_size: size,
            ..SimConfig::instant()
        },
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let endpoint = std::env::var("BENCH_S3_ENDPOINT")
        .or_else(|_| std::env::var("TEST_S3_ENDPOINT"))
        .ok();
    let mut stores = vec![("postgres".to_string(), vec![])];
    if let Some(endpoint) = &endpoint {
        let bucket = format!("rw-bench-{}", std::process::id());
        let created = reqwest::Client::new()
            .put(format!("{endpoint}/{bucket}"))
            .send()
            .await?;
        anyhow::ensure!(
            created.status().is_success(),
            "cannot create bucket {bucket}"
        );
        stores.push((
            format!("s3://{bucket}/bench"),
            vec![
                ("AWS_ENDPOINT_URL", endpoint.clone()),
                ("AWS_REGION", "us-east-1".into()),
                ("AWS_ACCESS_KEY_ID", "bench".into()),
                ("AWS_SECRET_ACCESS_KEY", "bench-secret".into()),
            ],
        ));
    }
    let mut idle_mb = 0.0;
    let mut peaks = Vec::new();
    for (i, (store, env)) in stores.iter().enumerate() {
        let (url, pool) = fresh_db(&o.database_url, &format!("rw_bench_rss_{i}")).await?;
        let mut extra: Vec<(&str, &str)> = vec![
            ("DOCUMENT_STORE", store.as_str()),
            ("REPORT_FIRST_POLL", "1s"),
            ("WORKER_CONCURRENCY", "4"),
        ];
        extra.extend(env.iter().map(|(k, v)| (*k, v.as_str())));
        let child = worker_process(&url, &sim, &extra)?;
        let pid = child.id();
        tokio::time::sleep(Duration::from_secs(2)).await;
        idle_mb = peak_rss_kb(pid).unwrap_or(0) as f64 / 1024.0;
        fixtures::insert_backlog(&pool, "大报告", 1, false).await?;
        let mut peak_kb = 0u64;
        let deadline = Instant::now() + Duration::from_secs(300);
        while fixtures::any_open(&pool).await? {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the document was not stored in 5 minutes"
            );
            if let Some(kb) = peak_rss_kb(pid) {
                peak_kb = peak_kb.max(kb);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(kb) = peak_rss_kb(pid) {
            peak_kb = peak_kb.max(kb);
        }
        anyhow::ensure!(
            fixtures::count_documents_stored(&pool).await? == 1,
            "the document was not stored"
        );
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        peaks.push(peak_kb as f64 / 1024.0);
    }
    sim.stop().await;
    Ok(DocumentRss {
        document_mb: o.document_mb as f64,
        idle_mb,
        postgres_store_mb: peaks[0],
        object_store_mb: peaks.get(1).copied(),
    })
}

/// A long burn-down whose tasks are polled a few times (snoozes) at a given
/// `fillfactor`: how many of report_requests' updates were HOT, and the size left.
async fn hot(o: &BenchOptions, fillfactor: u32) -> anyhow::Result<HotUpdates> {
    let (url, pool) = fresh_db(&o.database_url, &format!("rw_bench_hot_{fillfactor}")).await?;
    sql::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE report_requests SET (fillfactor = {fillfactor})"
    )))
    .execute(&pool)
    .await?;
    let reports = o.reports;
    fixtures::insert_backlog(&pool, "热", reports, true).await?;
    let sim = Simulator::start(
        SimConfig {
            generation_time: (Duration::from_millis(300), Duration::from_millis(900)),
            doc_size: 2_000,
            ..SimConfig::instant()
        },
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let mut config = WorkerConfig::new(sim.config().client_id.clone());
    config.concurrency = o.concurrency;
    config.qps = 0.0;
    config.poll = PollPolicy {
        first_poll: Duration::from_millis(200),
        poll_min: Duration::from_millis(200),
        poll_max: Duration::from_millis(300),
        window: Duration::from_secs(600),
        ..PollPolicy::default()
    };
    let before: (i64, i64) = fixtures::update_counts(&pool).await?;
    let worker_pool = queue::connect_worker(&url, crate::engine::pool_size(o.concurrency)).await?;
    let stop = CancellationToken::new();
    let start = Instant::now();
    let handle = tokio::spawn(
        Worker::new(
            worker_pool,
            client_for(&sim)?,
            config,
            Arc::new(Metrics::new()),
        )
        .run(stop.clone()),
    );
    while fixtures::any_open(&pool).await? {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    stop.cancel();
    handle.await?;
    sim.stop().await;
    // Statistics reach pg_stat_user_tables with a short delay.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let after = fixtures::update_counts(&pool).await?;
    let (table, indexes) = fixtures::table_sizes(&pool).await?;
    let updates = after.0 - before.0;
    Ok(HotUpdates {
        fillfactor,
        reports,
        updates,
        hot_share: (after.1 - before.1) as f64 / updates.max(1) as f64,
        table_mb: table as f64 / 1048576.0,
        indexes_mb: indexes as f64 / 1048576.0,
        reports_per_s: reports as f64 / seconds,
    })
}

/// The human-readable table.
pub fn table(r: &BenchResults) -> String {
    let mut s = format!("report-worker bench — {} — {}\n\n", r.date, r.machine);
    if let Some(b) = &r.burn_down {
        s += &format!(
            "1. burn-down: {} reports, concurrency {}: {:.2} s, {:.0} reports/s, {:.1} transactions/report, {:.1} upstream calls/report\n",
            b.reports,
            b.concurrency,
            b.seconds,
            b.reports_per_s,
            b.transactions_per_report,
            b.upstream_calls_per_report
        );
    }
    if let Some(t) = &r.pgbouncer {
        let b = &t.burn_down;
        s += &format!(
            "1b. through PgBouncer (transaction mode): burn-down {:.0} reports/s, {:.1} transactions/report; pickup p50 {:.1} ms, p99 {:.1} ms listening over LISTEN_DATABASE_URL, p50 {:.1} ms, p99 {:.1} ms polling every {:.0} ms\n",
            b.reports_per_s,
            b.transactions_per_report,
            t.pickup_listen.p50_ms,
            t.pickup_listen.p99_ms,
            t.pickup_polling.p50_ms,
            t.pickup_polling.p99_ms,
            t.idle_poll_ms
        );
    }
    if let Some(p) = &r.pickup {
        s += &format!(
            "2. pickup latency ({} single inserts into a fresh idle worker): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (cold first pickup {:.1} ms)\n",
            p.rows, p.p50_ms, p.p99_ms, p.max_ms, p.cold_ms
        );
    }
    if let Some(b) = &r.bulk_enqueue {
        s += &format!(
            "3. bulk enqueue: {} CSV rows in {:.2} s = {:.0} rows/s, peak RSS {:.1} MB\n",
            b.rows, b.seconds, b.rows_per_s, b.peak_rss_mb
        );
    }
    if let Some(e) = &r.economy {
        s +=
            "4. upstream economy (virtual clock; generation uniform over 1–10 min unless named):\n";
        for p in e {
            s += &format!(
                "   {:<55} {:>5.1} calls/report, detection p50 {:>5.1} s, p95 {:>5.1} s\n",
                p.policy, p.calls_per_report, p.detection_p50_s, p.detection_p95_s
            );
        }
    }
    if let Some(q) = &r.qps_use {
        s += &format!(
            "5. QPS use: {} processes at QPS {} over {:.0} s: {:.2} accepted calls/s = {:.1} % used, {:.2} % rejected (67200002)\n",
            q.processes,
            q.qps,
            q.seconds,
            q.accepted_per_s,
            q.used_share * 100.0,
            q.rejected_share * 100.0
        );
    }
    if let Some(i) = &r.inflight {
        s += &format!(
            "6. in-flight: {} generating rows: worker peak RSS {:.1} MB, {:.1} transactions/s, {:.1} polls/s made, {:.1} polls/s due\n",
            i.generating_rows,
            i.worker_peak_rss_mb,
            i.transactions_per_s,
            i.polls_per_s,
            i.polls_due_per_s
        );
    }
    if let Some(st) = &r.stats {
        s += &format!(
            "8. report_queue_stats at {} rows: first read {:.1} ms, then p50 {:.2} ms, max {:.2} ms (scanning the table: {:.0} ms)\n",
            st.rows, st.cold_ms, st.p50_ms, st.max_ms, st.scan_ms
        );
    }
    if let Some(p) = &r.purge {
        s += &format!(
            "9. purge of {} rows in {:.1} s beside live work: pickup p50 {:.1} → {:.1} ms, p99 {:.1} → {:.1} ms; burn-down {:.0} → {:.0} reports/s (alone → beside the purge)\n",
            p.purged_rows,
            p.purge_seconds,
            p.pickup_p50_ms[0],
            p.pickup_p50_ms[1],
            p.pickup_p99_ms[0],
            p.pickup_p99_ms[1],
            p.burn_down_reports_per_s[0],
            p.burn_down_reports_per_s[1]
        );
    }
    if let Some(d) = &r.rss {
        s += &format!(
            "10. one {:.0} MB document: worker peak RSS {:.1} MB with the PostgreSQL store, {} with the object store (idle {:.1} MB)\n",
            d.document_mb,
            d.postgres_store_mb,
            d.object_store_mb
                .map_or("not measured (no S3 endpoint)".into(), |m| format!(
                    "{m:.1} MB"
                )),
            d.idle_mb
        );
    }
    if let Some(runs) = &r.hot {
        for h in runs {
            s += &format!(
                "11. fillfactor {}: {} reports, {} updates of report_requests, {:.1} % HOT; table {:.1} MB, indexes {:.1} MB; {:.0} reports/s\n",
                h.fillfactor,
                h.reports,
                h.updates,
                h.hot_share * 100.0,
                h.table_mb,
                h.indexes_mb,
                h.reports_per_s
            );
        }
    }
    if let Some(d) = &r.dashboard {
        s += &format!(
            "12. dashboard at {} rows, server time over {} loads (p50 / max):\n",
            d.rows, d.loads
        );
        for (page, p50, max) in &d.pages {
            s += &format!("   {page:<55} {p50:>7.2} ms {max:>8.2} ms\n");
        }
    }
    if let Some(i) = &r.idle {
        s += &format!(
            "7. idle process: {:.1} transactions/s while 1,000 due polls are held by another process, {:.1}/s while the account is stopped (over {:.0} s each)\n",
            i.polls_held_elsewhere_tx_per_s, i.account_stopped_tx_per_s, i.seconds
        );
    }
    s
}
