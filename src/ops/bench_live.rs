//! `bench --only learned-live`: learned polling run by the real engine against the
//! simulator in real time, generation times log-normal (median 3 min, σ 0.35, cut to
//! 1–10 min), default settings (learned polling at its 15 s target, QPS 5). A history
//! of finished reports first, then a measured batch of PDF reports asked for at once;
//! for each measured report: calls (create + polls) and detection delay (ready at the
//! provider → its document first served), against what the model (`on_schedule`, the
//! virtual clock of `bench --only economy`) predicts for the same tasks with the
//! schedule the engine learned. Two histories side by side, each with its own database
//! and simulator: 60 PDF reports, and 30 PDF + 30 Word (the measured type has too little
//! history of its own). Named only: it takes about a quarter of an hour.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use super::bench_economy::on_schedule;
use super::bench_kit::{BenchOptions, Engine, Via, fresh_db, open_rows, pct};
use crate::domain::{NewRequest, ReportType};
use crate::engine::WorkerConfig;
use crate::engine::policy::DEFAULT_DETECTION_TARGET;
use crate::engine::schedule::Schedule;
use crate::queue::{self, Db, sql};
use crate::simulator::{SimConfig, Simulator};

#[derive(Debug, Serialize)]
pub struct LearnedLive {
    /// What was finished before the measured batch.
    pub history: String,
    /// Observations the schedule was learned from when the batch began.
    pub learned_from: usize,
    pub reports: usize,
    pub seconds: f64,
    pub calls_per_report: f64,
    pub detection_p50_s: f64,
    pub detection_p95_s: f64,
    /// The model's figures for the same tasks, polled by the schedule learned from the
    /// same history.
    pub model_calls_per_report: f64,
    pub model_detection_p50_s: f64,
    pub model_detection_p95_s: f64,
}

/// The measured batch: PDF reports asked for at once.
const MEASURED: usize = 100;
/// Longest a phase may take (the window is 10 minutes, the give-up 30).
const PHASE_DEADLINE: Duration = Duration::from_secs(35 * 60);

pub(super) async fn learned_live(o: &BenchOptions) -> anyhow::Result<Vec<LearnedLive>> {
    let pdf = run(o, "rw_bench_learned_pdf", &[(ReportType::Pdf, 60)]);
    let mixed = run(
        o,
        "rw_bench_learned_mixed",
        &[(ReportType::Pdf, 30), (ReportType::Word, 30)],
    );
    let (pdf, mixed) = tokio::join!(pdf, mixed);
    Ok(vec![
        pdf.context("history of 60 PDF")?,
        mixed.context("history of 30 PDF + 30 Word")?,
    ])
}

async fn run(
    o: &BenchOptions,
    name: &str,
    history: &[(ReportType, usize)],
) -> anyhow::Result<LearnedLive> {
    let (url, pool) = fresh_db(&o.database_url, name).await?;
    let sim = Simulator::start(
        SimConfig {
            create_latency: (Duration::from_millis(200), Duration::from_millis(1_000)),
            generation_time: (Duration::from_secs(60), Duration::from_secs(600)),
            generation_sigma: Some(0.35),
            generation_median: Some(Duration::from_secs(180)),
            failure_rate: 0.0,
            doc_size: 20_000,
            seed: Some(23),
            ..SimConfig::default()
        },
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let mut config = WorkerConfig::new(sim.config().client_id.clone());
    config.detection_target = Some(DEFAULT_DETECTION_TARGET);
    let policy = config.poll.clone();
    let (worker_pool, listen) = Via::Direct
        .worker_pool(&url, crate::engine::pool_size(config.concurrency))
        .await?;
    config.listen = listen;
    let engine = Engine::start(worker_pool, &sim, config)?;
    let mut described = Vec::new();
    for &(kind, n) in history {
        for i in 0..n {
            let company = format!("历史{}{i}", kind.as_str());
            queue::enqueue(&pool, &NewRequest::new(Some(&company), None, None, kind)?).await?;
        }
        described.push(format!("{n} {}", kind.as_str()));
    }
    finished(&pool).await.context("the history")?;
    let observations = crate::engine::learning_history(&pool, ReportType::Pdf).await?;
    let schedule = Schedule::learn(
        &observations,
        policy.window,
        DEFAULT_DETECTION_TARGET,
        policy.poll_max,
    );
    let start = Instant::now();
    for i in 0..MEASURED {
        let company = format!("测量{i}");
        queue::enqueue(
            &pool,
            &NewRequest::new(Some(&company), None, None, ReportType::Pdf)?,
        )
        .await?;
    }
    finished(&pool).await.context("the measured batch")?;
    let seconds = start.elapsed().as_secs_f64();
    engine.stop().await?;
    let stats = sim.stats();
    sim.stop().await;

    let rows: Vec<(i32, String, f64)> = sql::query_as(
        "SELECT polls, upstream_job_id, extract(epoch FROM upstream_created_at)::float8 * 1000
           FROM report_requests WHERE company_name LIKE '测量%' AND state = 'succeeded'",
    )
    .fetch_all(&pool)
    .await?;
    anyhow::ensure!(
        rows.len() == MEASURED,
        "{} of {MEASURED} measured reports succeeded",
        rows.len()
    );
    let (mut calls, mut delays) = (0.0, Vec::new());
    let (mut model_calls, mut model_delays) = (0.0, Vec::new());
    for (polls, job, created_ms) in &rows {
        let task = stats.tasks.get(job).context("a task the simulator made")?;
        let served = *stats
            .first_served_ms
            .get(job)
            .context("a document the simulator served")?;
        calls += 1.0 + *polls as f64;
        delays.push((served - task.ready_ms) as f64 / 1000.0);
        // The task as the engine's clock sees it: from when its job id was recorded.
        let g = (task.ready_ms as f64 - created_ms) / 1000.0;
        if let Some(s) = &schedule {
            let (c, ready_at, _, _) = on_schedule(s, g, task.initial_queue, true);
            model_calls += c as f64;
            model_delays.push(ready_at - g);
        }
    }
    delays.sort_by(f64::total_cmp);
    model_delays.sort_by(f64::total_cmp);
    let n = rows.len() as f64;
    Ok(LearnedLive {
        history: described.join(" + "),
        learned_from: if schedule.is_some() {
            observations.len()
        } else {
            0
        },
        reports: rows.len(),
        seconds,
        calls_per_report: calls / n,
        detection_p50_s: pct(&delays, 0.5),
        detection_p95_s: pct(&delays, 0.95),
        model_calls_per_report: if schedule.is_some() {
            model_calls / n
        } else {
            f64::NAN
        },
        model_detection_p50_s: pct(&model_delays, 0.5),
        model_detection_p95_s: pct(&model_delays, 0.95),
    })
}

/// Waits until no row is queued or generating.
async fn finished(pool: &Db) -> anyhow::Result<()> {
    let deadline = Instant::now() + PHASE_DEADLINE;
    while open_rows(pool).await? {
        anyhow::ensure!(
            Instant::now() < deadline,
            "rows still open after {PHASE_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}
