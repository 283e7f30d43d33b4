//! `bench` scenarios of batches (issue 25): the fair share a small batch gets beside a
//! large one (the real engine against the simulator, QPS-limited, in real time), and
//! how close `report_batch_forecast` comes to the real finish (a virtual clock whose
//! state is written to the database at each moment the forecast is read).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::bench_economy::Xorshift;
use super::bench_kit::{BenchOptions, Engine, Via, fresh_db};
use crate::engine::WorkerConfig;
use crate::engine::policy::PollPolicy;
use crate::queue::{Db, sql};
use crate::simulator::{SimConfig, Simulator};

#[derive(Debug, Serialize)]
pub struct FairShare {
    pub large_rows: usize,
    pub small_rows: usize,
    pub qps: u32,
    /// Seconds after A's load that B is loaded.
    pub small_after_s: f64,
    pub small_alone_s: f64,
    pub small_beside_large_s: f64,
    /// B beside A over B alone (goal ≤ 2).
    pub small_ratio: f64,
    pub large_alone_s: f64,
    pub large_with_small_s: f64,
    /// What B adds to A's time, against B's own time alone.
    pub large_growth_s: f64,
    pub calls_per_report: f64,
}

const LARGE: usize = 10_000;
const SMALL: usize = 100;
const SMALL_AFTER: Duration = Duration::from_secs(60);
const FAIR_QPS: u32 = 200;

/// Batch A of 10,000 rows, then batch B of 100 rows a minute later, the same priority,
/// against a simulator whose tasks take 1–2 s, at 200 calls a second: B's time beside
/// A against B alone, and A's time with and without B.
pub(super) async fn fair_share(o: &BenchOptions) -> anyhow::Result<FairShare> {
    let (small_alone, _) = fair_run(o, "rw_bench_fair_b", &[("B", SMALL, Duration::ZERO)]).await?;
    let (large_alone, calls) =
        fair_run(o, "rw_bench_fair_a", &[("A", LARGE, Duration::ZERO)]).await?;
    let (both, _) = fair_run(
        o,
        "rw_bench_fair_ab",
        &[("A", LARGE, Duration::ZERO), ("B", SMALL, SMALL_AFTER)],
    )
    .await?;
    Ok(FairShare {
        large_rows: LARGE,
        small_rows: SMALL,
        qps: FAIR_QPS,
        small_after_s: SMALL_AFTER.as_secs_f64(),
        small_alone_s: small_alone[0],
        small_beside_large_s: both[1],
        small_ratio: both[1] / small_alone[0],
        large_alone_s: large_alone[0],
        large_with_small_s: both[0],
        large_growth_s: both[0] - large_alone[0],
        calls_per_report: calls,
    })
}

/// Loads each batch at its offset and returns the seconds from its load to its last
/// row's end, and the provider calls per report.
async fn fair_run(
    o: &BenchOptions,
    name: &str,
    batches: &[(&str, usize, Duration)],
) -> anyhow::Result<(Vec<f64>, f64)> {
    let (url, pool) = fresh_db(&o.database_url, name).await?;
    let sim = Simulator::start(
        SimConfig {
            qps: Some(FAIR_QPS),
            create_latency: (Duration::from_millis(5), Duration::from_millis(20)),
            generation_time: (Duration::from_secs(1), Duration::from_secs(2)),
            doc_size: 2_000,
            ..SimConfig::instant()
        },
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let mut config = WorkerConfig::new(sim.config().client_id.clone());
    config.concurrency = 256;
    config.qps = FAIR_QPS as f64;
    config.lease = Duration::from_secs(60);
    config.poll = PollPolicy {
        first_poll: Duration::from_secs(1),
        poll_min: Duration::from_millis(500),
        poll_max: Duration::from_secs(1),
        ..PollPolicy::default()
    };
    let (worker_pool, listen) = Via::Direct
        .worker_pool(&url, crate::engine::pool_size(config.concurrency))
        .await?;
    config.listen = listen;
    let engine = Engine::start(worker_pool, &sim, config)?;
    let start = Instant::now();
    let mut loaded: Vec<Option<Instant>> = vec![None; batches.len()];
    let mut done: Vec<Option<f64>> = vec![None; batches.len()];
    let deadline = start + Duration::from_secs(1800);
    while done.iter().any(Option::is_none) {
        anyhow::ensure!(Instant::now() < deadline, "batches not done in 30 minutes");
        for (i, &(batch, rows, after)) in batches.iter().enumerate() {
            if loaded[i].is_none() && start.elapsed() >= after {
                sql::query(
                    "INSERT INTO report_requests (company_name, report_type, batch)
                     SELECT $1 || '企业' || i, 'pdf', $1 FROM generate_series(1, $2) i",
                )
                .bind(batch)
                .bind(rows as i64)
                .execute(&pool)
                .await?;
                loaded[i] = Some(Instant::now());
            }
            if let (Some(at), None) = (loaded[i], done[i]) {
                let open: i64 = sql::query_scalar(
                    "SELECT coalesce(sum(n), 0)::bigint FROM report_batch_counts
                      WHERE batch = $1 AND state IN ('queued', 'generating')",
                )
                .bind(batch)
                .fetch_one(&pool)
                .await?;
                if open == 0 {
                    done[i] = Some(at.elapsed().as_secs_f64());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    engine.stop().await?;
    let stats = sim.stats();
    sim.stop().await;
    let reports: usize = batches.iter().map(|b| b.1).sum();
    let calls = (stats.calls_to("create") + stats.calls_to("status")) as f64 / reports as f64;
    Ok((done.into_iter().map(|d| d.unwrap_or(0.0)).collect(), calls))
}

#[derive(Debug, Serialize)]
pub struct ForecastAccuracy {
    pub case: String,
    pub rows: usize,
    pub qps: f64,
    pub daily_limit: Option<i64>,
    /// From the load to the last row's end, on the virtual clock.
    pub actual_s: f64,
    /// (share done, predicted seconds from the load, error as a share of the time
    /// that was left).
    pub predictions: Vec<(f64, f64, f64)>,
    pub provider_days: Option<i32>,
}

/// The forecast against the finish, for a 2,000-row batch at 2 calls a second: with no
/// daily limit, and with a limit of 1,200 creates that splits it across two provider
/// days. The virtual provider: log-normal generation (median 3 min, σ 0.35, 1–10 min),
/// polled 2 min after the create, then every 30 s.
pub(super) async fn forecast_accuracy(o: &BenchOptions) -> anyhow::Result<Vec<ForecastAccuracy>> {
    let mut out = Vec::new();
    for (case, limit) in [("qps only", None), ("qps and a daily limit", Some(1_200))] {
        out.push(
            forecast_case(o, case, limit)
                .await
                .with_context(|| format!("forecast, {case}"))?,
        );
    }
    Ok(out)
}

#[derive(Clone, Copy, PartialEq)]
enum Phase {
    Queued,
    Generating { created: f64, ready: f64, next: f64 },
    Done { created: f64, at: f64 },
}

const FORECAST_ROWS: usize = 2_000;
const FORECAST_QPS: f64 = 2.0;

async fn forecast_case(
    o: &BenchOptions,
    case: &str,
    limit: Option<i64>,
) -> anyhow::Result<ForecastAccuracy> {
    let (_url, pool) = fresh_db(&o.database_url, "rw_bench_forecast").await?;
    let ids: Vec<i64> = sql::query_scalar(
        "INSERT INTO report_requests (company_name, report_type, batch)
         SELECT '预测企业' || i, 'pdf', 'F' FROM generate_series(1, $1) i RETURNING id",
    )
    .bind(FORECAST_ROWS as i64)
    .fetch_all(&pool)
    .await?;
    // 08:00 in Asia/Shanghai: the provider's day ends 16 hours later.
    let t0: DateTime<Utc> = "2026-12-01T00:00:00Z".parse()?;
    let at = |s: f64| virtual_at(t0, s);
    let day_of = |s: f64| (at(s) + chrono::Duration::hours(8)).date_naive();
    let mut draws = Xorshift(0x9e37_79b9_7f4a_7c15);
    let mut rows = vec![Phase::Queued; ids.len()];
    let mut queued: VecDeque<usize> = (0..ids.len()).collect();
    let mut used: std::collections::HashMap<chrono::NaiveDate, i64> = Default::default();
    let mut polls = vec![0i32; ids.len()];
    let slot = 1.0 / FORECAST_QPS;
    let (mut t, mut finished) = (0.0f64, 0usize);
    let mut marks = vec![0.1, 0.5];
    let mut predicted: Vec<(f64, f64, f64)> = Vec::new();
    let mut at_mark: Vec<(f64, f64)> = Vec::new();
    while finished < rows.len() {
        if let Some(&mark) = marks.first()
            && finished as f64 >= mark * rows.len() as f64
        {
            marks.remove(0);
            write_state(&pool, &ids, &rows, &polls, t0, limit, &used, t, day_of(t)).await?;
            let finish: Option<DateTime<Utc>> = sql::query_scalar(
                "SELECT finish_at FROM report_batch_forecast_at($1) WHERE batch = 'F'",
            )
            .bind(at(t))
            .fetch_one(&pool)
            .await?;
            let finish = finish.context("the forecast gave no finish")?;
            at_mark.push((mark, t));
            predicted.push((mark, (finish - t0).num_milliseconds() as f64 / 1000.0, 0.0));
        }
        // One call slot: a due poll first, else a create the day's limit allows.
        let due = rows.iter().enumerate().filter_map(|(i, r)| match r {
            Phase::Generating { next, .. } if *next <= t => Some((i, *next)),
            _ => None,
        });
        if let Some((i, _)) = due.min_by(|a, b| a.1.total_cmp(&b.1)) {
            polls[i] += 1;
            if let Phase::Generating {
                created,
                ready,
                next,
            } = rows[i]
            {
                rows[i] = if ready <= t {
                    finished += 1;
                    Phase::Done { created, at: t }
                } else {
                    Phase::Generating {
                        created,
                        ready,
                        next: next + 30.0,
                    }
                };
            }
            t += slot;
            continue;
        }
        let today = used.entry(day_of(t)).or_default();
        if !queued.is_empty() && limit.is_none_or(|l| *today < l) {
            let i = queued.pop_front().expect("not empty");
            *today += 1;
            let gen_s = draws.lognormal(180.0, 0.35);
            rows[i] = Phase::Generating {
                created: t,
                ready: t + gen_s,
                next: t + 120.0,
            };
            t += slot;
            continue;
        }
        // Nothing to call: the next due poll, or the next provider day.
        let next_poll = rows
            .iter()
            .filter_map(|r| match r {
                Phase::Generating { next, .. } => Some(*next),
                _ => None,
            })
            .fold(f64::INFINITY, f64::min);
        let midnight = {
            let d = day_of(t).succ_opt().context("date")?;
            let m =
                d.and_hms_opt(0, 0, 0).context("midnight")?.and_utc() - chrono::Duration::hours(8);
            (m - t0).num_milliseconds() as f64 / 1000.0
        };
        let wake = if queued.is_empty() {
            next_poll
        } else {
            next_poll.min(midnight)
        };
        anyhow::ensure!(wake.is_finite(), "the virtual provider stalled");
        t = wake.max(t + slot);
    }
    let actual = t;
    for (p, &(_, when)) in predicted.iter_mut().zip(&at_mark) {
        p.2 = (p.1 - actual).abs() / (actual - when);
    }
    let days = used.len() as i32;
    Ok(ForecastAccuracy {
        case: case.to_string(),
        rows: FORECAST_ROWS,
        qps: FORECAST_QPS,
        daily_limit: limit,
        actual_s: actual,
        predictions: predicted,
        provider_days: limit.map(|_| days),
    })
}

/// `s` seconds after the virtual clock's start `t0`.
fn virtual_at(t0: DateTime<Utc>, s: f64) -> DateTime<Utc> {
    t0 + chrono::Duration::milliseconds((s * 1000.0) as i64)
}

/// Writes the virtual provider's state at `t` where the forecast reads it: each row's
/// state, its calls and times; today's creates; a worker seen now with the account's
/// limits.
#[allow(clippy::too_many_arguments)]
async fn write_state(
    pool: &Db,
    ids: &[i64],
    rows: &[Phase],
    polls: &[i32],
    t0: DateTime<Utc>,
    limit: Option<i64>,
    used: &std::collections::HashMap<chrono::NaiveDate, i64>,
    t: f64,
    today: chrono::NaiveDate,
) -> anyhow::Result<()> {
    let at = |s: f64| virtual_at(t0, s);
    let (mut row_ids, mut states, mut created_at, mut finished_at) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut next_polls: Vec<Option<DateTime<Utc>>> = Vec::new();
    let mut row_polls = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let (state, created, finished, next) = match *r {
            Phase::Queued => continue,
            Phase::Generating { created, next, .. } => {
                ("generating", Some(at(created)), None, Some(at(next)))
            }
            Phase::Done { created, at: end } => {
                ("succeeded", Some(at(created)), Some(at(end)), None)
            }
        };
        row_ids.push(ids[i]);
        states.push(state);
        created_at.push(created);
        finished_at.push(finished);
        next_polls.push(next);
        row_polls.push(polls[i]);
    }
    sql::query(
        "UPDATE report_requests r
            SET state = u.state, attempts = 1, creates_sent = 1, polls = u.polls,
                upstream_job_id = r.id::text, upstream_created_at = u.created,
                next_poll_at = u.next_poll, finished_at = u.finished
           FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::timestamptz[], $6::int4[])
                AS u (id, state, created, finished, next_poll, polls)
          WHERE r.id = u.id",
    )
    .bind(&row_ids)
    .bind(&states)
    .bind(&created_at)
    .bind(&finished_at)
    .bind(&next_polls)
    .bind(&row_polls)
    .execute(pool)
    .await?;
    sql::query(
        "INSERT INTO report_daily_creates (account, day, used) VALUES ('bench', $1, $2)
         ON CONFLICT (account, day) DO UPDATE SET used = excluded.used",
    )
    .bind(today)
    .bind(used.get(&today).copied().unwrap_or(0))
    .execute(pool)
    .await?;
    let limits =
        serde_json::json!({"bench": {"qps": FORECAST_QPS, "daily_limit": limit, "headroom": 0}});
    sql::query(
        "INSERT INTO report_workers (owner, accounts, account_limits, seen_at) VALUES ('bench', '{bench}', $1, $2)
         ON CONFLICT (owner) DO UPDATE SET account_limits = excluded.account_limits, seen_at = excluded.seen_at",
    )
    .bind(limits)
    .bind(at(t))
    .execute(pool)
    .await?;
    Ok(())
}
