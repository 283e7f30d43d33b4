//! `bench` scenarios of the worker at work: burn-down, pickup latency, bulk CSV enqueue,
//! QPS use across processes, in-flight scale, an idle process, memory while storing a
//! large document.

use super::bench_kit::{
    BenchOptions, Engine, Via, fresh_db, metered, open_rows, pct, peak_rss_kb, transactions,
    wait_with_peak_rss, wal_lsn, wal_since, worker_process,
};
use crate::queue::sql;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use crate::queue::Db;
use serde::Serialize;

use crate::domain::{NewRequest, ReportType};
use crate::engine::WorkerConfig;
use crate::engine::policy::PollPolicy;
use crate::queue;
use crate::queue::fixtures;
use crate::simulator::{SimConfig, Simulator};

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
    /// WAL the server wrote during the drain (`pg_current_wal_lsn()` before and after;
    /// the whole server's, so run it alone), per report.
    pub wal_bytes_per_report: f64,
    /// The stored document's bytes as PostgreSQL keeps them, per report.
    pub document_bytes_per_report: f64,
    /// WAL per report beyond the document: what the bookkeeping costs.
    pub bookkeeping_wal_bytes_per_report: f64,
    /// Whether this process exported traces (`OTEL_EXPORTER_OTLP_ENDPOINT` was set).
    pub traced: bool,
}

/// Burn-down with traces off and on, each in a `bench --only burn-down` process of its
/// own (a process's trace exporter is installed once, at its start), alternating.
#[derive(Debug, Serialize)]
pub struct TracingCost {
    pub reports: usize,
    /// Per round: reports/s with traces off, then on.
    pub rounds: Vec<[f64; 2]>,
    /// Per round: transactions per report, off and on (the trace context's write rides
    /// on the claim).
    pub transactions_per_report: Vec<[f64; 2]>,
    /// Per round: bookkeeping WAL bytes per report, off and on.
    pub bookkeeping_wal_bytes_per_report: Vec<[f64; 2]>,
    /// OTLP bytes the collector received per traced report.
    pub exported_bytes_per_report: f64,
    /// Export requests the collector received per traced report.
    pub exports_per_report: f64,
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

/// Peak resident memory of a worker process storing one large document.
#[derive(Debug, Serialize)]
pub struct DocumentRss {
    pub document_mb: f64,
    pub idle_mb: f64,
    pub postgres_store_mb: f64,
    pub object_store_mb: Option<f64>,
}

pub(super) async fn burn_down(o: &BenchOptions, via: Via<'_>) -> anyhow::Result<BurnDown> {
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
    let wal_before = wal_lsn(&pool).await?;
    let start = Instant::now();
    let engine = Engine::start(worker_pool, &sim, config)?;
    while open_rows(&pool).await? {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    engine.stop().await?;
    let stats = sim.stats();
    sim.stop().await;
    let after = transactions(&pool).await?;
    let wal = wal_since(&pool, &wal_before).await?;
    let succeeded = fixtures::count_documents_stored(&pool).await?;
    anyhow::ensure!(
        succeeded as usize == o.reports,
        "only {succeeded} of {} reports stored",
        o.reports
    );
    // The documents as PostgreSQL stores them (compressed where it could): the part of
    // the WAL that is the product, not bookkeeping.
    let document_bytes: f64 = sql::query_scalar(
        "SELECT coalesce(sum(pg_column_size(content)), 0)::float8 FROM report_documents",
    )
    .fetch_one(&pool)
    .await?;
    let calls = stats.calls_to("create") + stats.calls_to("status") + stats.calls_to("download");
    let per = |x: f64| x / o.reports as f64;
    Ok(BurnDown {
        wal_bytes_per_report: per(wal),
        document_bytes_per_report: per(document_bytes),
        bookkeeping_wal_bytes_per_report: per(wal - document_bytes),
        reports: o.reports,
        concurrency: o.concurrency,
        seconds,
        reports_per_s: o.reports as f64 / seconds,
        // Minus the two statistics reads and the polling of this harness itself.
        transactions_per_report: (after - before) as f64 / o.reports as f64,
        upstream_calls_per_report: calls as f64 / o.reports as f64,
        traced: crate::telemetry::enabled(),
    })
}

/// `TracingCost`: three rounds of burn-down with traces off, then on, exported over
/// OTLP/HTTP to a collector in this process that counts what it is sent.
pub(super) async fn tracing_cost(o: &BenchOptions) -> anyhow::Result<TracingCost> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let (exports, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (e, b) = (exports.clone(), bytes.clone());
    let collector = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            e.fetch_add(1, Ordering::Relaxed);
            b.fetch_add(body.len() as u64, Ordering::Relaxed);
            // An empty ExportTraceServiceResponse is zero bytes of protobuf.
            async {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                    "",
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, collector).await;
    });
    let mut cost = TracingCost {
        reports: o.reports,
        rounds: Vec::new(),
        transactions_per_report: Vec::new(),
        bookkeeping_wal_bytes_per_report: Vec::new(),
        exported_bytes_per_report: 0.0,
        exports_per_report: 0.0,
    };
    for _ in 0..3 {
        let mut round = [[0.0; 2]; 3];
        for (i, traced) in [false, true].into_iter().enumerate() {
            let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
            cmd.args(["bench", "--only", "burn-down", "--json"])
                .args(["--reports", &o.reports.to_string()])
                .args(["--concurrency", &o.concurrency.to_string()])
                .env("DATABASE_URL", &o.database_url)
                .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .stderr(std::process::Stdio::inherit());
            if traced {
                cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);
            } else {
                cmd.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
            }
            let out = cmd.output().await?;
            anyhow::ensure!(out.status.success(), "the burn-down process failed");
            let results: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let b = &results["burn_down"];
            anyhow::ensure!(
                b["traced"] == traced,
                "the burn-down process traced: {}",
                b["traced"]
            );
            let field = |name: &str| b[name].as_f64().unwrap_or(f64::NAN);
            round[0][i] = field("reports_per_s");
            round[1][i] = field("transactions_per_report");
            round[2][i] = field("bookkeeping_wal_bytes_per_report");
        }
        cost.rounds.push(round[0]);
        cost.transactions_per_report.push(round[1]);
        cost.bookkeeping_wal_bytes_per_report.push(round[2]);
    }
    server.abort();
    let traced_reports = (3 * o.reports) as f64;
    cost.exported_bytes_per_report = bytes.load(Ordering::Relaxed) as f64 / traced_reports;
    cost.exports_per_report = exports.load(Ordering::Relaxed) as f64 / traced_reports;
    Ok(cost)
}

/// Pickup latency; `idle_poll` is the worker's fallback poll (long, so that only
/// NOTIFY counts, when it listens).
pub(super) async fn pickup(
    o: &BenchOptions,
    via: Via<'_>,
    idle_poll: Duration,
) -> anyhow::Result<Pickup> {
    let (url, pool) = fresh_db(&o.database_url, "rw_bench_pickup").await?;
    let sim = Simulator::start(SimConfig::instant(), "127.0.0.1:0".parse()?).await?;
    let mut config = WorkerConfig::new(sim.config().client_id.clone());
    config.qps = 0.0;
    config.idle_poll = idle_poll;
    let (worker_pool, listen) = via
        .worker_pool(&url, crate::engine::pool_size(config.concurrency))
        .await?;
    config.listen = listen;
    let engine = Engine::start(worker_pool, &sim, config)?;
    // Let the worker reach its idle wait, listening.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Every insert counts, from the very first on a fresh worker (which also fetches
    // the token and opens its HTTP connections; it is reported as the cold pickup).
    let rows = 200;
    let mut latencies =
        pickup_latencies(&pool, &sim, "即时", rows, Duration::from_secs(30)).await?;
    engine.stop().await?;
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

/// Inserts `rows` single rows 20 ms apart and returns each one's pickup latency (insert
/// commit to the simulator's arrival of its create), in ms, in insert order; an error
/// when a row is not picked up within `wait` of the last insert.
pub(super) async fn pickup_latencies(
    pool: &Db,
    sim: &Simulator,
    prefix: &str,
    rows: usize,
    wait: Duration,
) -> anyhow::Result<Vec<f64>> {
    let mut commits = Vec::with_capacity(rows);
    for i in 0..rows {
        let name = format!("{prefix}{i}");
        let request = NewRequest::new(Some(&name), None, None, ReportType::Pdf)?;
        queue::enqueue(pool, &request).await?;
        commits.push((name, SystemTime::now()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + wait;
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

pub(super) async fn bulk_enqueue(o: &BenchOptions) -> anyhow::Result<BulkEnqueue> {
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

pub(super) fn write_csv(path: &Path, rows: usize) -> anyhow::Result<()> {
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

pub(super) async fn qps_use(o: &BenchOptions) -> anyhow::Result<QpsUse> {
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

pub(super) async fn inflight(o: &BenchOptions) -> anyhow::Result<InFlight> {
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
pub(super) async fn idle(o: &BenchOptions) -> anyhow::Result<Idle> {
    let (url, pool) = fresh_db(&o.database_url, "rw_bench_idle").await?;
    let sim = Simulator::start(SimConfig::instant(), "127.0.0.1:0".parse()?).await?;
    let jobs: Vec<String> = (1..=1000).map(|i| i.to_string()).collect();
    fixtures::insert_generating(&pool, &jobs, ReportType::Pdf, 0.0).await?;
    fixtures::hold_all(&pool, "another-process", Duration::from_secs(3600)).await?;
    quiet_autovacuum(&pool).await?;
    let mut child = worker_process(&url, &sim, &[])?;
    let window = Duration::from_secs(10);
    // Let it settle, then measure the steady state. Two start-up costs are left out:
    // a connection that goes idle reports its counts to `pg_stat_database` up to 10 s
    // later (PostgreSQL's PGSTAT_IDLE_INTERVAL), so measured 2 s after the start the
    // migrations' and fixtures' transactions landed in the window (5.6 one run, 10.8
    // the next); and the pool hands its connections out in turn, each preparing the
    // idle loop's statements once (a Parse and Sync is a transaction of its own): with
    // 20 connections that lasts ~40 s (6.4 measured from 12 s, 4.6 from 30 s; the
    // statements themselves were 3.7 a second, counted with `log_statement = all`).
    tokio::time::sleep(Duration::from_secs(60)).await;
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

/// Vacuums and analyzes the fresh database, then turns autovacuum off for its tables:
/// `pg_stat_database` counts autovacuum's transactions too (one per table it visits),
/// which are the database's, not the idle process's.
async fn quiet_autovacuum(pool: &Db) -> anyhow::Result<()> {
    sqlx::raw_sql("VACUUM (ANALYZE)").execute(pool).await?;
    sqlx::raw_sql(
        "DO $$
         DECLARE t regclass;
         BEGIN
           FOR t IN SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
           LOOP
             EXECUTE format('ALTER TABLE %s SET (autovacuum_enabled = false, toast.autovacuum_enabled = false)', t);
           END LOOP;
         END $$",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// A `run` process storing one document of `o.document_mb`: its peak RSS, for the
/// PostgreSQL store and (with BENCH_S3_ENDPOINT or TEST_S3_ENDPOINT) an object store.
pub(super) async fn document_rss(o: &BenchOptions) -> anyhow::Result<DocumentRss> {
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
