//! `report-worker bench`: the worker measured the way its users feel it, against real
//! PostgreSQL and the simulator over HTTP. Each scenario runs in a fresh database on
//! the server named by DATABASE_URL. Figures, never assertions: targets are judged in
//! BENCHMARKS.md. The scenarios live beside it: bench_worker.rs (the worker at work),
//! bench_database.rs (the database under load), bench_economy.rs (poll schedules on a
//! virtual clock), bench_kit.rs (what they share).

use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

pub use super::bench_batches::{FairShare, ForecastAccuracy};
use super::bench_batches::{fair_share, forecast_accuracy};
pub use super::bench_database::{DashboardLoad, HotUpdates, PurgeBeside, Stats};
use super::bench_database::{dashboard, hot, purge_beside, stats};
pub use super::bench_economy::Economy;
use super::bench_economy::economy;
pub use super::bench_kit::BenchOptions;
use super::bench_kit::{Via, machine};
pub use super::bench_live::LearnedLive;
use super::bench_live::learned_live;
pub use super::bench_worker::{
    BulkEnqueue, BurnDown, DocumentRss, Idle, InFlight, Pickup, QpsUse, ThroughPooler, TracingCost,
};
use super::bench_worker::{
    bulk_enqueue, burn_down, document_rss, idle, inflight, pickup, qps_use, tracing_cost,
};

#[derive(Debug, Default, Serialize)]
pub struct BenchResults {
    pub date: String,
    pub machine: String,
    pub burn_down: Option<BurnDown>,
    pub pickup: Option<Pickup>,
    pub bulk_enqueue: Option<BulkEnqueue>,
    pub economy: Option<Vec<Economy>>,
    pub learned_live: Option<Vec<LearnedLive>>,
    pub qps_use: Option<QpsUse>,
    pub inflight: Option<InFlight>,
    pub idle: Option<Idle>,
    pub stats: Option<Stats>,
    pub purge: Option<PurgeBeside>,
    pub rss: Option<DocumentRss>,
    pub hot: Option<Vec<HotUpdates>>,
    pub dashboard: Option<DashboardLoad>,
    pub pgbouncer: Option<ThroughPooler>,
    pub tracing: Option<TracingCost>,
    pub fair_share: Option<FairShare>,
    pub forecast: Option<Vec<ForecastAccuracy>>,
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
    }
    // Named only: six burn-downs.
    if o.only.iter().any(|n| n == "tracing") {
        r.tracing = Some(
            tracing_cost(o)
                .await
                .context("burn-down, traces off and on")?,
        );
    }
    if wants(o, "pickup") {
        r.pickup = Some(
            pickup(o, Via::Direct, Duration::from_secs(5))
                .await
                .context("pickup")?,
        );
    }
    if wants(o, "bulk-enqueue") {
        r.bulk_enqueue = Some(bulk_enqueue(o).await.context("bulk enqueue")?);
    }
    if wants(o, "economy") {
        r.economy = Some(economy(20_000));
    }
    // Named only: a quarter of an hour of real time.
    if o.only.iter().any(|n| n == "learned-live") {
        r.learned_live = Some(learned_live(o).await.context("learned polling, live")?);
    }
    // Named only: three drains of 10,000 rows at 200 calls a second, about 6 minutes.
    if o.only.iter().any(|n| n == "fair-share") {
        r.fair_share = Some(fair_share(o).await.context("fair share between batches")?);
    }
    if wants(o, "forecast") {
        r.forecast = Some(forecast_accuracy(o).await.context("batch forecast")?);
    }
    if wants(o, "qps") {
        r.qps_use = Some(qps_use(o).await.context("qps use")?);
    }
    if wants(o, "inflight") {
        r.inflight = Some(inflight(o).await.context("in-flight scale")?);
    }
    if wants(o, "idle") {
        r.idle = Some(idle(o).await.context("idle")?);
    }
    if wants(o, "stats") {
        r.stats = Some(stats(o).await.context("stats")?);
    }
    if wants(o, "purge") {
        r.purge = Some(purge_beside(o).await.context("purge beside live work")?);
    }
    if wants(o, "rss") {
        r.rss = Some(document_rss(o).await.context("document rss")?);
    }
    if wants(o, "dashboard") {
        r.dashboard = Some(dashboard(o).await.context("dashboard")?);
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
    }
    if wants(o, "hot") {
        let mut runs = Vec::new();
        for fillfactor in [100, 80] {
            runs.push(hot(o, fillfactor).await.context("hot updates")?);
        }
        r.hot = Some(runs);
    }
    Ok(r)
}

/// The human-readable table.
pub fn table(r: &BenchResults) -> String {
    let mut s = format!("report-worker bench — {} — {}\n\n", r.date, r.machine);
    if let Some(b) = &r.burn_down {
        s += &format!(
            "1. burn-down: {} reports, concurrency {}: {:.2} s, {:.0} reports/s, {:.2} transactions/report, {:.1} upstream calls/report\n   WAL {:.0} bytes/report: {:.0} the document as stored, {:.0} bookkeeping\n",
            b.reports,
            b.concurrency,
            b.seconds,
            b.reports_per_s,
            b.transactions_per_report,
            b.upstream_calls_per_report,
            b.wal_bytes_per_report,
            b.document_bytes_per_report,
            b.bookkeeping_wal_bytes_per_report
        );
    }
    if let Some(t) = &r.tracing {
        s += &format!(
            "1c. burn-down with traces off and on ({} reports; off · on, alternating processes):
",
            t.reports
        );
        for (i, ((rps, tx), wal)) in t
            .rounds
            .iter()
            .zip(&t.transactions_per_report)
            .zip(&t.bookkeeping_wal_bytes_per_report)
            .enumerate()
        {
            s += &format!(
                "   round {}: {:.0} · {:.0} reports/s ({:.2}×), {:.2} · {:.2} transactions/report, {:.0} · {:.0} bookkeeping WAL bytes/report\n",
                i + 1,
                rps[0],
                rps[1],
                rps[1] / rps[0],
                tx[0],
                tx[1],
                wal[0],
                wal[1]
            );
        }
        s += &format!(
            "   exported: {:.0} OTLP bytes and {:.3} export requests per report\n",
            t.exported_bytes_per_report, t.exports_per_report
        );
    }
    if let Some(f) = &r.fair_share {
        s += &format!(
            "6a. fair share: batch B ({} rows) loaded {:.0} s after batch A ({} rows), {} calls/s, {:.1} calls/report: B took {:.1} s beside A, {:.1} s alone ({:.2}×); A took {:.1} s with B, {:.1} s alone (+{:.1} s)\n",
            f.small_rows,
            f.small_after_s,
            f.large_rows,
            f.qps,
            f.calls_per_report,
            f.small_beside_large_s,
            f.small_alone_s,
            f.small_ratio,
            f.large_with_small_s,
            f.large_alone_s,
            f.large_growth_s
        );
    }
    if let Some(cases) = &r.forecast {
        for c in cases {
            s += &format!(
                "6b. forecast, {} ({} rows, {} calls/s{}): finished after {:.0} s{}",
                c.case,
                c.rows,
                c.qps,
                c.daily_limit
                    .map(|l| format!(", daily limit {l}"))
                    .unwrap_or_default(),
                c.actual_s,
                c.provider_days
                    .map(|d| format!(" over {d} provider days"))
                    .unwrap_or_default()
            );
            for (done, predicted, error) in &c.predictions {
                s += &format!(
                    "; at {:.0} % done predicted {:.0} s (error {:.1} % of the time left)",
                    done * 100.0,
                    predicted,
                    error * 100.0
                );
            }
            s += "\n";
        }
    }
    if let Some(t) = &r.pgbouncer {
        let b = &t.burn_down;
        s += &format!(
            "1b. through PgBouncer (transaction mode): burn-down {:.0} reports/s, {:.2} transactions/report, WAL {:.0} bytes/report ({:.0} bookkeeping); pickup p50 {:.1} ms, p99 {:.1} ms listening over LISTEN_DATABASE_URL, p50 {:.1} ms, p99 {:.1} ms polling every {:.0} ms\n",
            b.reports_per_s,
            b.transactions_per_report,
            b.wal_bytes_per_report,
            b.bookkeeping_wal_bytes_per_report,
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
    if let Some(runs) = &r.learned_live {
        s += "4b. learned polling, live (real engine and time, log-normal median 3 min, σ 0.35; 100 PDF reports at once):\n";
        for l in runs {
            s += &format!(
                "   after {} ({} observations learned from): {:.2} calls/report, detection p50 {:.1} s, p95 {:.1} s, {:.0} s in all; model on the same tasks: {:.2} calls/report, p50 {:.1} s, p95 {:.1} s\n",
                l.history,
                l.learned_from,
                l.calls_per_report,
                l.detection_p50_s,
                l.detection_p95_s,
                l.seconds,
                l.model_calls_per_report,
                l.model_detection_p50_s,
                l.model_detection_p95_s
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
