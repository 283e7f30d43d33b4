//! Learned polling: a poll schedule computed from the account's observed generation
//! times, a pure function of (history, time since create, answers so far).
//!
//! What is observed is not a generation time but an interval: the task was not ready at
//! the last poll that said so (`lower`) and was ready at the poll that said so (`upper`),
//! both measured from the create. The distribution is estimated from those intervals:
//! each observation's mass is spread evenly over its interval (the first step of
//! Turnbull's self-consistency algorithm), on one-second bins over the window, lightly
//! smoothed so no plausible second has zero mass. The further Turnbull iterations (the
//! nonparametric maximum likelihood estimate) were tried and left out: they pile the mass
//! just before the poll times that produced the intervals, so the schedule believed its
//! delays shorter than they were (predicted median 14.5 s, real 15.8 s, on 200 uniform
//! tasks; BENCHMARKS.md).
//!
//! Given the distribution (density `f`, survival `S`), polls are placed with density
//! `λ(t) ∝ sqrt(f(t) / S(t))`: a poll at `t` costs a call for every task still running
//! (`S`), and saves delay in proportion to the tasks finishing there (`f`); minimising
//! mean delay plus `μ` × expected calls gives that shape (the calculus of variations on
//! `∫ f/(2λ) + μ ∫ λ S`). One scalar, `μ`, trades calls for delay: it is set by bisection
//! to the largest value (fewest calls) whose median detection delay, on the estimated
//! distribution, meets the target. Gaps stay between `MIN_GAP` and the fixed policy's
//! `poll_max`, and the last poll is at the window's end. The first poll is placed by
//! the same rule, integrated from the create: never before the smallest `upper` minus
//! a gap (nothing earlier is plausible), never after the time by which a fifth of the
//! tasks are estimated ready (so it cannot drift later on its own censored answers).
//! It used to sit on that earliest moment itself, which for times like the provider's
//! (hardly any under 100 s) was a call spent on nearly every task for nothing: 5.7
//! calls per report where the same median now takes 5.4 (BENCHMARKS.md).
//!
//! `queue_num`: a task the provider still calls queued (`job_status` 0) has not started
//! exporting, so it is further from ready than its age alone says, and more so with more
//! jobs ahead. Each observation keeps the last such answer (when, and `queue_num`); for
//! each `q`, the schedule learns a floor: the 5th percentile of the time from a "queued,
//! at least `q` ahead" answer to the last "not ready" answer of the same task (a lower
//! bound of the time still needed, so the floor errs early). After such an answer the
//! next poll is not before that floor. Floors need `MIN_QUEUE_HISTORY` observations with
//! at least `q` ahead; without them, or when the provider sends no `queue_num`, the
//! schedule goes by age alone.
//!
//! Until `MIN_HISTORY` observations exist the fixed policy is used: with fewer, the tails
//! (where the schedule decides whether to poll at all) rest on a handful of tasks. The
//! history is the most recent `HISTORY` observations, so a provider that slows down is
//! followed within that many reports.

use std::time::Duration;

/// Observations needed before the learned schedule replaces the fixed one. With 50,
/// the median and quartiles the schedule leans on are known to within a few bins of
/// the poll grid; fewer leave the tails to chance.
pub const MIN_HISTORY: usize = 50;
/// The most recent observations a schedule is computed from (so it follows a provider
/// whose times change within that many reports).
pub const HISTORY: usize = 200;
/// The share of the detection target a schedule is computed for.
const TARGET_MARGIN: f64 = 0.9;
/// The share of tasks estimated ready by the first poll, at the most (see
/// `first_poll_range`).
const FIRST_POLL_QUANTILE: f64 = 0.2;
/// The shortest gap between two polls.
pub const MIN_GAP: f64 = 5.0;
/// Observations whose task was still queued with at least `q` jobs ahead needed before
/// the floor for `q` is used (its 5th percentile then rests on one or two of them).
pub const MIN_QUEUE_HISTORY: usize = 30;
/// The share of tasks a queue floor may find ready before it (and so notice late).
const QUEUE_QUANTILE: f64 = 0.05;
/// Floors are learned for `queue_num` 0 to this; more ahead uses this one's.
const MAX_QUEUE: usize = 16;

/// One finished task: not ready `lower` seconds after its create, ready `upper` seconds
/// after it (`lower` 0 when the first poll found it ready), and its last "queued"
/// answer, if any.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    pub lower: f64,
    pub upper: f64,
    pub waiting: Option<Waiting>,
}

/// A "queued at the provider" answer (`job_status` 0): `at` seconds after the create,
/// with `queue_num` jobs ahead (0 when the answer did not say).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Waiting {
    pub at: f64,
    pub queue_num: i64,
}

/// A poll schedule: times after the create, in seconds, increasing, the last one at the
/// window's end.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    polls: Vec<f64>,
    /// What the schedule expects on the distribution it was computed from.
    pub expected_calls: f64,
    pub expected_median_delay: f64,
    /// For `queue_num` 0..=`MAX_QUEUE`: how long a task answering "queued" with at least
    /// that many ahead still needs, at the least (see the module's text).
    queue_floors: Vec<Option<f64>>,
}

impl Schedule {
    /// Computes the schedule for `history` (any order) over `window`, meeting a median
    /// detection delay of `target`, with gaps of at most `max_gap`. `None` below
    /// `MIN_HISTORY` observations.
    pub fn learn(
        history: &[Observation],
        window: Duration,
        target: Duration,
        max_gap: Duration,
    ) -> Option<Schedule> {
        if history.len() < MIN_HISTORY {
            return None;
        }
        let window = window.as_secs_f64().max(MIN_GAP * 2.0);
        let bins = window.ceil() as usize;
        let history = sorted(history);
        let history = history.as_slice();
        let f = estimate(history, bins);
        let first = first_poll_range(&f, earliest_plausible(history, window));
        let max_gap = max_gap.as_secs_f64().max(MIN_GAP);
        // Aimed below the target: on the smoothed estimate, real median delays came out up
        // to 0.8 s above the predicted ones (BENCHMARKS.md).
        let target = target.as_secs_f64() * TARGET_MARGIN;
        // Bisection on log μ: a larger μ means fewer polls and longer delays.
        let (mut lo, mut hi) = (-12.0f64, 12.0f64);
        let mut best = place(&f, first, window, max_gap, lo.exp());
        for _ in 0..40 {
            let mid = (lo + hi) / 2.0;
            let candidate = place(&f, first, window, max_gap, mid.exp());
            if candidate.expected_median_delay <= target {
                best = candidate;
                lo = mid;
            } else {
                hi = mid;
            }
        }
        best.queue_floors = queue_floors(history);
        Some(best)
    }

    /// How long a task that answered "queued" with `queue_num` ahead still needs at the
    /// least, when enough history says so. A task with `q` ahead also has every smaller
    /// number ahead, so the floors learned for those apply to it too: the largest of
    /// them (more ahead never lowers the floor; larger numbers without enough history of
    /// their own borrow the ones below).
    pub fn queue_floor(&self, queue_num: i64) -> Option<f64> {
        let q = (queue_num.max(0) as usize).min(MAX_QUEUE);
        self.queue_floors
            .get(..=q)?
            .iter()
            .flatten()
            .copied()
            .reduce(f64::max)
    }

    /// The next poll after a "not ready" answer `elapsed` seconds after the create that
    /// said the task was still queued with `queue_num` ahead (`None`: exporting): the
    /// schedule's next poll, but not before the task's queue floor.
    pub fn next_after_answer(&self, elapsed: f64, queue_num: Option<i64>) -> Option<f64> {
        let next = self.next_after(elapsed)?;
        let end = *self.polls.last()?;
        let floor = queue_num.and_then(|q| self.queue_floor(q)).unwrap_or(0.0);
        Some(next.max(elapsed + floor).min(end))
    }

    /// The poll times, seconds after the create.
    pub fn polls(&self) -> &[f64] {
        &self.polls
    }

    /// The first poll, seconds after the create.
    pub fn first(&self) -> f64 {
        self.polls[0]
    }

    /// The next poll after a "not ready" answer `elapsed` seconds after the create, or
    /// `None` when the window is over. Never sooner than `MIN_GAP` after `elapsed`
    /// (a late poll does not bunch up with the next one) unless that is past the end.
    pub fn next_after(&self, elapsed: f64) -> Option<f64> {
        let end = *self.polls.last()?;
        if elapsed >= end {
            return None;
        }
        let next = self
            .polls
            .iter()
            .copied()
            .find(|t| *t >= elapsed + MIN_GAP)
            .unwrap_or(end);
        Some(next.min(end))
    }
}

/// `history` sorted, so the floating-point sums (and the schedule) do not depend on its
/// order.
fn sorted(history: &[Observation]) -> Vec<Observation> {
    let mut history = history.to_vec();
    history.sort_by(|a, b| {
        a.lower
            .total_cmp(&b.lower)
            .then(a.upper.total_cmp(&b.upper))
    });
    history
}

/// The queue floors of `history`: for each `q`, the `QUEUE_QUANTILE` of the time from a
/// "queued, at least `q` ahead" answer to the task's last "not ready" answer, when at
/// least `MIN_QUEUE_HISTORY` tasks answered so.
fn queue_floors(history: &[Observation]) -> Vec<Option<f64>> {
    (0..=MAX_QUEUE)
        .map(|q| {
            let mut still: Vec<f64> = history
                .iter()
                .filter_map(|o| {
                    let w = o.waiting?;
                    (w.queue_num >= q as i64).then_some((o.lower - w.at).max(0.0))
                })
                .collect();
            if still.len() < MIN_QUEUE_HISTORY {
                return None;
            }
            still.sort_by(f64::total_cmp);
            let i = ((still.len() - 1) as f64 * QUEUE_QUANTILE).floor() as usize;
            Some(still[i])
        })
        .collect()
}

/// The density of generation times on one-second bins `[i, i+1)`, from interval-censored
/// observations: each observation's mass spread evenly over its interval, then lightly
/// smoothed.
fn estimate(history: &[Observation], bins: usize) -> Vec<f64> {
    let bin_range = |o: &Observation| {
        let lo = (o.lower.max(0.0).floor() as usize).min(bins - 1);
        let hi = (o.upper.max(o.lower).ceil() as usize).clamp(lo + 1, bins);
        (lo, hi)
    };
    let ranges: Vec<(usize, usize)> = history.iter().map(bin_range).collect();
    let mut p = vec![0.0; bins];
    for &(lo, hi) in &ranges {
        let w = 1.0 / (hi - lo) as f64 / ranges.len() as f64;
        for x in &mut p[lo..hi] {
            *x += w;
        }
    }
    // A triangular kernel of ±4 s: no plausible second is left with no mass at all.
    let kernel = [1.0, 2.0, 3.0, 4.0, 5.0, 4.0, 3.0, 2.0, 1.0];
    let total_k: f64 = kernel.iter().sum();
    let mut smooth = vec![0.0; bins];
    for (i, s) in smooth.iter_mut().enumerate() {
        for (k, w) in kernel.iter().enumerate() {
            let j = i as isize + k as isize - 4;
            if j >= 0 && (j as usize) < bins {
                *s += p[j as usize] * w / total_k;
            }
        }
    }
    let total: f64 = smooth.iter().sum();
    smooth
        .iter()
        .map(|x| x / total.max(f64::MIN_POSITIVE))
        .collect()
}

/// The first moment worth a poll: no task has been seen ready before the smallest
/// `upper`; a poll a little before it (one `MIN_GAP`) catches the fastest like it.
fn earliest_plausible(history: &[Observation], window: f64) -> f64 {
    let fastest = history
        .iter()
        .map(|o| o.upper)
        .fold(f64::INFINITY, f64::min);
    (fastest - MIN_GAP).clamp(MIN_GAP, window)
}

/// Where the first poll may go: not before `from` (nothing earlier is plausible), not
/// after `by` (see `first_poll_range`).
#[derive(Debug, Clone, Copy)]
struct FirstPoll {
    from: f64,
    by: f64,
}

/// The first poll's range: from the earliest plausible moment to the time by which
/// `FIRST_POLL_QUANTILE` of the tasks are estimated ready. The upper bound is a guard
/// against the schedule feeding on its own censoring: a task found ready at the first
/// poll only says it was ready somewhere before it, so its mass is spread back over
/// that stretch, where the density then looks thin. Placing the first poll by ∫λ from
/// the earliest moment instead of from the create let it drift later with every relearn
/// (in the economy bench: p95 detection 30 → 235 s on uniform times); integrated from
/// the create it holds, and at a quantile it could only correct itself, since the share
/// of tasks ready by the first poll is observed exactly, whatever the spreading.
fn first_poll_range(f: &[f64], earliest: f64) -> FirstPoll {
    let mut acc = 0.0;
    let by = f
        .iter()
        .position(|m| {
            acc += m;
            acc >= FIRST_POLL_QUANTILE
        })
        .map_or(f.len() as f64, |i| (i + 1) as f64);
    FirstPoll {
        from: earliest,
        by: by.max(earliest),
    }
}

/// Places polls for one value of `mu` and evaluates them on `f`.
fn place(f: &[f64], first: FirstPoll, window: f64, max_gap: f64, mu: f64) -> Schedule {
    let bins = f.len();
    let mut survival = vec![0.0; bins + 1];
    for i in (0..bins).rev() {
        survival[i] = survival[i + 1] + f[i];
    }
    let mut polls: Vec<f64> = Vec::new();
    let mut t = 0.0;
    while t < window {
        // Walk forward until ∫λ (from the create for the first poll) reaches one poll,
        // within the poll's range: the first one's, then between `MIN_GAP` and the
        // longest gap after the one before.
        let (lowest, latest) = match polls.last() {
            None => (first.from, first.by),
            Some(&last) => (last + MIN_GAP, last + max_gap),
        };
        let latest = latest.min(window);
        let mut acc = 0.0;
        let mut next = t;
        loop {
            next += 1.0;
            if next >= latest {
                next = latest;
                break;
            }
            let i = (next as usize).min(bins - 1);
            let s = survival[i].max(1e-9);
            acc += (f[i] / (2.0 * mu * s)).sqrt();
            if acc >= 1.0 && next >= lowest {
                break;
            }
        }
        t = next;
        polls.push(t);
    }
    polls.dedup();
    let (calls, median) = evaluate(f, &polls);
    Schedule {
        polls,
        expected_calls: calls,
        expected_median_delay: median,
        queue_floors: Vec::new(),
    }
}

/// Expected calls (the create and every poll made) and the median detection delay of
/// `polls` on the density `f` (each bin's mass at its middle). Tasks still running at
/// the window's end count the polls and no delay.
fn evaluate(f: &[f64], polls: &[f64]) -> (f64, f64) {
    let mut calls = 0.0;
    let mut delays: Vec<(f64, f64)> = Vec::with_capacity(f.len());
    let mut k = 0;
    for (i, mass) in f.iter().enumerate() {
        if *mass <= 0.0 {
            continue;
        }
        let t = i as f64 + 0.5;
        while k < polls.len() && polls[k] < t {
            k += 1;
        }
        let (made, delay) = match polls.get(k) {
            Some(p) => ((k + 1) as f64, p - t),
            None => (polls.len() as f64, 0.0),
        };
        calls += mass * (1.0 + made);
        delays.push((delay, *mass));
    }
    delays.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: f64 = delays.iter().map(|d| d.1).sum();
    let mut acc = 0.0;
    let mut median = 0.0;
    for (d, m) in delays {
        acc += m;
        if acc >= total / 2.0 {
            median = d;
            break;
        }
    }
    (calls / total.max(f64::MIN_POSITIVE), median)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const WINDOW: Duration = Duration::from_secs(600);
    const TARGET: Duration = Duration::from_secs(15);
    const MAX_GAP: Duration = Duration::from_secs(60);

    /// Observations of tasks taking `times` seconds, polled every `grid` seconds from 60.
    fn observed(times: &[f64], grid: f64) -> Vec<Observation> {
        times
            .iter()
            .map(|&t| {
                let mut last = 0.0;
                let mut p = 60.0;
                while p < t {
                    last = p;
                    p += grid;
                }
                Observation {
                    lower: last,
                    upper: p.min(600.0),
                    waiting: None,
                }
            })
            .collect()
    }

    fn lognormal(n: usize, median: f64, sigma: f64, seed: u64) -> Vec<f64> {
        let mut s = seed.max(1);
        let mut unit = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let z = (-2.0 * unit().ln()).sqrt() * (2.0 * std::f64::consts::PI * unit()).cos();
                (median * (sigma * z).exp()).clamp(60.0, 600.0)
            })
            .collect()
    }

    #[test]
    fn no_schedule_without_enough_history() {
        let few = observed(&[120.0; MIN_HISTORY - 1], 25.0);
        assert!(Schedule::learn(&few, WINDOW, TARGET, MAX_GAP).is_none());
        let enough = observed(&[120.0; MIN_HISTORY], 25.0);
        assert!(Schedule::learn(&enough, WINDOW, TARGET, MAX_GAP).is_some());
    }

    #[test]
    fn polls_are_dense_where_tasks_finish_and_sparse_before() {
        let s = Schedule::learn(
            &observed(&lognormal(200, 180.0, 0.35, 7), 25.0),
            WINDOW,
            TARGET,
            MAX_GAP,
        )
        .unwrap();
        let gaps = |from: f64, to: f64| {
            let p: Vec<f64> = s
                .polls()
                .iter()
                .copied()
                .filter(|t| (from..to).contains(t))
                .collect();
            (p.last().unwrap_or(&from) - p.first().unwrap_or(&from)) / (p.len().max(2) - 1) as f64
        };
        assert!(gaps(140.0, 240.0) < 35.0, "{:?}", s.polls());
        assert!(
            s.polls().iter().filter(|t| **t < 120.0).count() <= 2,
            "{:?}",
            s.polls()
        );
        assert!(s.expected_median_delay <= 15.0, "{s:?}");
        assert!(s.expected_calls < 6.0, "{s:?}");
    }

    /// What polling `times` with schedule `s` observes.
    fn observed_by(s: &Schedule, times: &[f64]) -> Vec<Observation> {
        times
            .iter()
            .map(|&t| {
                let mut lower = 0.0;
                let mut at = s.first();
                while at < t {
                    lower = at;
                    match s.next_after(at) {
                        Some(n) => at = n,
                        None => break,
                    }
                }
                Observation {
                    lower,
                    upper: at.max(t.min(600.0)),
                    waiting: None,
                }
            })
            .collect()
    }

    #[test]
    fn the_first_poll_is_not_spent_where_hardly_any_task_is_ready() {
        // Log-normal, median 3 min: the fastest of 200 is ready after about 70 s, but only
        // one in twenty before 100 s. A first poll at 70 s is a call nearly every task
        // pays for nothing.
        let times = lognormal(200, 180.0, 0.35, 7);
        let s = Schedule::learn(&observed(&times, 10.0), WINDOW, TARGET, MAX_GAP).unwrap();
        let ready = times.iter().filter(|t| **t <= s.first()).count();
        assert!(s.first() >= 100.0, "{:?}", s.polls());
        assert!(ready * 5 <= times.len(), "{ready} of {} ready", times.len());
        assert!(s.expected_calls < 5.5, "{s:?}");
    }

    #[test]
    fn relearning_from_its_own_answers_does_not_push_the_first_poll_later() {
        // Uniform 1–10 min, learned again and again from what the schedule itself
        // observed (a task ready at the first poll only says "before it"): the first poll
        // stays where about a fifth of the tasks are ready, it does not creep on.
        for seed in [3, 5, 9] {
            let mut s = Schedule::learn(
                &observed(&uniform(200, seed), 25.0),
                WINDOW,
                TARGET,
                MAX_GAP,
            )
            .unwrap();
            for round in 0..30 {
                let times = uniform(200, seed * 100 + round);
                s = Schedule::learn(&observed_by(&s, &times), WINDOW, TARGET, MAX_GAP).unwrap();
            }
            // A fifth of 60–600 s is ready by 168 s; the smoothing leaves some room.
            assert!(s.first() <= 190.0, "seed {seed}: {:?}", s.polls());
            assert!(s.expected_median_delay <= 15.0, "{s:?}");
        }
    }

    fn uniform(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed.max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                60.0 + 540.0 * ((s >> 11) as f64 / (1u64 << 53) as f64)
            })
            .collect()
    }

    #[test]
    fn the_first_poll_is_not_before_the_fastest_task_seen() {
        let mut times = lognormal(200, 180.0, 0.35, 3);
        times.iter_mut().for_each(|t| *t = t.max(140.0));
        let s = Schedule::learn(&observed(&times, 10.0), WINDOW, TARGET, MAX_GAP).unwrap();
        assert!(s.first() >= 140.0 - MIN_GAP - 10.0, "{}", s.first());
    }

    /// Tasks queued for their first 30 % with up to 5 ahead (as the simulator), polled
    /// every `grid` seconds from 60: the observations with their last "queued" answer.
    fn observed_with_queue(times: &[f64], grid: f64) -> Vec<Observation> {
        times
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                let ahead = (i % 6) as f64;
                let (mut last, mut p, mut waiting) = (0.0, 60.0, None);
                while p < t {
                    if p < 0.3 * t {
                        let q = (ahead * (1.0 - p / (0.3 * t))).ceil() as i64;
                        waiting = Some(Waiting {
                            at: p,
                            queue_num: q,
                        });
                    }
                    last = p;
                    p += grid;
                }
                Observation {
                    lower: last,
                    upper: p.min(600.0),
                    waiting,
                }
            })
            .collect()
    }

    #[test]
    fn a_queued_answer_holds_the_next_poll_back_by_what_the_queue_still_takes() {
        let history = observed_with_queue(&lognormal(200, 180.0, 0.35, 11), 10.0);
        let s = Schedule::learn(&history, WINDOW, TARGET, MAX_GAP).unwrap();
        // Queued tasks have at least the 70 % exporting share ahead of them: the floor
        // is well above the schedule's gaps; more ahead never lowers it (the last
        // "queued" answer mostly has 0 or 1 ahead: larger numbers borrow the floor below).
        let f0 = s.queue_floor(0).unwrap();
        assert!(f0 >= 40.0, "{f0}");
        let f3 = s.queue_floor(3).unwrap();
        assert!(f3 >= f0, "{f0} {f3}");
        assert_eq!(s.queue_floor(99), s.queue_floor(16));
        // Never sooner than the floor, never after the window, never before the
        // schedule's own next poll.
        let t = 100.0;
        let next = s.next_after_answer(t, Some(0)).unwrap();
        assert!(next >= t + f0 && next >= s.next_after(t).unwrap(), "{next}");
        assert_eq!(s.next_after_answer(590.0, Some(5)), Some(600.0));
        // Exporting: the schedule as it is.
        assert_eq!(s.next_after_answer(t, None), s.next_after(t));
        // And no floor without enough queued observations.
        let few: Vec<Observation> = history
            .iter()
            .enumerate()
            .map(|(i, o)| Observation {
                waiting: if i < MIN_QUEUE_HISTORY - 1 {
                    o.waiting
                } else {
                    None
                },
                ..*o
            })
            .collect();
        let s = Schedule::learn(&few, WINDOW, TARGET, MAX_GAP).unwrap();
        assert_eq!(s.queue_floor(0), None);
    }

    proptest! {
        #[test]
        fn queue_floors_are_lower_bounds_of_what_the_history_saw(
            times in proptest::collection::vec(60.0f64..600.0, MIN_HISTORY..300),
            grid in 5.0f64..60.0,
            q in 0i64..20,
        ) {
            let history = observed_with_queue(&times, grid);
            let s = Schedule::learn(&history, WINDOW, TARGET, MAX_GAP).unwrap();
            if let Some(floor) = s.queue_floor(q) {
                // At most 5 % of the tasks that were queued with at least q ahead were
                // found ready sooner after that answer than the floor.
                let seen: Vec<f64> = history.iter().filter_map(|o| {
                    let w = o.waiting?;
                    (w.queue_num >= q.min(16)).then_some(o.upper - w.at)
                }).collect();
                let sooner = seen.iter().filter(|d| **d < floor).count();
                prop_assert!(sooner as f64 <= 0.05 * seen.len() as f64 + 1.0, "{} of {}", sooner, seen.len());
                prop_assert!(floor >= 0.0);
                // The next poll is never before it, never past the window.
                for t in [60.0, 200.0, 590.0] {
                    if let Some(n) = s.next_after_answer(t, Some(q)) {
                        prop_assert!(n <= 600.0);
                        prop_assert!(n >= (t + floor).min(600.0) - 1e-9);
                    }
                }
            }
        }

        #[test]
        fn schedules_are_well_formed(
            times in proptest::collection::vec(60.0f64..600.0, MIN_HISTORY..300),
            grid in 5.0f64..60.0,
            target in 3u64..60,
        ) {
            let history = observed(&times, grid);
            let s = Schedule::learn(&history, WINDOW, Duration::from_secs(target), MAX_GAP).unwrap();
            let polls = s.polls();
            // Never before the earliest plausible time, never after the window's end,
            // strictly increasing, the last poll at the end, gaps within bounds.
            let fastest = history.iter().map(|o| o.upper).fold(f64::INFINITY, f64::min);
            prop_assert!(polls[0] >= (fastest - MIN_GAP).max(MIN_GAP) - 1e-9);
            // Nor after the time a fifth of the tasks are estimated ready (or that
            // earliest moment, when it is later).
            let sorted = sorted(&history);
            let first = first_poll_range(&estimate(&sorted, 600), earliest_plausible(&sorted, 600.0));
            prop_assert!(polls[0] <= first.by + 1e-9, "{} > {}", polls[0], first.by);
            prop_assert!(polls.iter().all(|t| *t <= 600.0));
            prop_assert_eq!(*polls.last().unwrap(), 600.0);
            prop_assert!(polls.windows(2).all(|w| w[1] > w[0]));
            prop_assert!(polls.windows(2).all(|w| w[1] - w[0] <= 60.0 + 1e-9), "{:?}", polls);
            // Deterministic: the same history gives the same schedule, in any order.
            let mut reversed = history.clone();
            reversed.reverse();
            let again = Schedule::learn(&reversed, WINDOW, Duration::from_secs(target), MAX_GAP).unwrap();
            prop_assert_eq!(polls, again.polls());
            // next_after moves forward and ends at the window.
            let mut t = 0.0;
            let mut steps = 0;
            while let Some(n) = s.next_after(t) {
                prop_assert!(n > t);
                t = n;
                steps += 1;
                prop_assert!(steps < 1000);
            }
            prop_assert_eq!(t, 600.0);
        }
    }
}
