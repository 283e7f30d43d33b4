//! `bench --only economy`: the poll schedules on a virtual clock (no database, no
//! simulator): calls per report against detection delay, fixed and learned.

use super::bench_kit::pct;
use std::time::Duration;

use serde::Serialize;

use crate::engine::policy::DEFAULT_DETECTION_TARGET;
use crate::engine::policy::{PollPolicy, Progress};

#[derive(Debug, Serialize)]
pub struct Economy {
    pub policy: String,
    pub calls_per_report: f64,
    pub detection_p50_s: f64,
    pub detection_p95_s: f64,
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
pub(super) struct Xorshift(pub(super) u64);

impl Xorshift {
    pub(super) fn unit(&mut self) -> f64 {
        let s = &mut self.0;
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        ((*s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Log-normal with this median and σ, clipped to the provider's 1–10 minutes.
    pub(super) fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        let z = (-2.0 * self.unit().ln()).sqrt() * (2.0 * std::f64::consts::PI * self.unit()).cos();
        (median * (sigma * z).exp()).clamp(60.0, 600.0)
    }
}

/// (calls, detection delay) of each report under the fixed policy (the provider says
/// "queued" for the first 30 % of a task).
pub(super) fn fixed_policy_run(
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

/// One task of generation time `g` (seconds) polled by schedule `s`, the provider
/// answering as the simulator does: queued for the first 30 % of the task, `ahead` jobs
/// ahead at first, counting down; with `queue`, the schedule uses those `queue_num`
/// answers. Returns the calls (create included), when the poll that found it ready was
/// made, the last "not ready" poll before it, and the last "queued" answer.
pub(super) fn on_schedule(
    s: &crate::engine::schedule::Schedule,
    g: f64,
    ahead: i64,
    queue: bool,
) -> (u32, f64, f64, Option<crate::engine::schedule::Waiting>) {
    use crate::engine::schedule::Waiting;
    let queued_at =
        |t: f64| (t < 0.3 * g).then(|| (ahead as f64 * (1.0 - t / (0.3 * g))).ceil() as i64);
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

/// (calls, detection delay) of each report under learned polling, learning as it goes.
/// The provider is modelled as the simulator is: queued for the first 30 % of a task,
/// with 0–5 jobs ahead at first, counting down; with `queue`, the schedule uses those
/// `queue_num` answers.
pub(super) fn learned_run(
    policy: &PollPolicy,
    target: Duration,
    gens: &[f64],
    queue: bool,
    unit: &mut impl FnMut() -> f64,
) -> Vec<(u32, f64)> {
    use crate::engine::schedule::{HISTORY, Observation, Schedule};
    let mut history: std::collections::VecDeque<Observation> = Default::default();
    let mut schedule: Option<Schedule> = None;
    let mut out = Vec::with_capacity(gens.len());
    let mut ahead = Xorshift(0xD1B5_4A32_D192_ED03);
    for (i, &g) in gens.iter().enumerate() {
        if i % 20 == 0 {
            let recent: Vec<Observation> = history.iter().copied().collect();
            schedule = Schedule::learn(&recent, policy.window, target, policy.poll_max);
        }
        let first_ahead = (ahead.unit() * 6.0).floor() as i64;
        let (calls, ready_at, last_not_ready, waiting) = match &schedule {
            Some(s) => on_schedule(s, g, first_ahead, queue),
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
