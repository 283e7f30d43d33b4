//! `bench` scenarios of the database under load: `report_queue_stats` and the dashboard
//! at many rows, a purge beside live work, HOT updates at two fill factors.

use super::bench_kit::{BenchOptions, Engine, fresh_db, pct};
use super::bench_worker::pickup_latencies;
use crate::queue::sql;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::engine::WorkerConfig;
use crate::engine::policy::PollPolicy;
use crate::queue;
use crate::queue::fixtures;
use crate::simulator::{SimConfig, Simulator};

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

/// `report_queue_stats` at `o.stats_rows` rows (mostly finished history, some open).
pub(super) async fn stats(o: &BenchOptions) -> anyhow::Result<Stats> {
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
pub(super) async fn dashboard(o: &BenchOptions) -> anyhow::Result<DashboardLoad> {
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
pub(super) async fn purge_beside(o: &BenchOptions) -> anyhow::Result<PurgeBeside> {
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
    let engine = Engine::start(worker_pool, &sim, config)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let live = |round: usize| {
        let (pool, sim) = (pool.clone(), &sim);
        async move {
            let latencies = pickup_latencies(
                &pool,
                sim,
                &format!("r{round}-"),
                100,
                Duration::from_secs(60),
            )
            .await?;
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
    engine.stop().await?;
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

/// A long burn-down whose tasks are polled a few times (snoozes) at a given
/// `fillfactor`: how many of report_requests' updates were HOT, and the size left.
pub(super) async fn hot(o: &BenchOptions, fillfactor: u32) -> anyhow::Result<HotUpdates> {
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
    let start = Instant::now();
    let engine = Engine::start(worker_pool, &sim, config)?;
    while fixtures::any_open(&pool).await? {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    engine.stop().await?;
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
