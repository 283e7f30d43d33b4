//! When to poll, when to retry, when to probe a stopped account: pure functions of the
//! row (and a jitter value passed in), so the schedules are unit-tested without I/O and
//! persisted as timestamps that survive restarts.
//!
//! The poll policy, and why: the provider documents 1–10 minutes of generation, so the
//! first poll waits `first_poll` (60 s: nothing can be ready sooner). After that the
//! task is polled every `poll_min` (25 s) while it is exporting, and every `poll_max`
//! (60 s) while the provider still reports it queued (`job_status` 0): a queued task is
//! minutes from done. For generation times spread evenly over 1–10 minutes, even spacing
//! is what minimises the detection delay for a given number of calls; 25 s gives a
//! median delay of about 12.5 s for about 11 calls per report (BENCHMARKS.md). A poll is
//! placed exactly at the end of the window. A task the provider still calls waiting or
//! exporting there is not given up: it was paid for, and a new one would pay again and
//! queue behind it. It is polled every `poll_max` until `give_up_after` (30 min), and
//! only then given up (and kept as an orphan, in case the provider finishes it later).

use std::time::Duration;

use chrono::{DateTime, Utc};

/// The median detection delay learned polling aims for (`REPORT_DETECTION_TARGET`).
pub const DEFAULT_DETECTION_TARGET: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, PartialEq)]
pub struct PollPolicy {
    pub first_poll: Duration,
    pub poll_min: Duration,
    pub poll_max: Duration,
    /// How long one upstream task is expected to take at most: the schedule aims its
    /// polls within it (`REPORT_WINDOW`).
    pub window: Duration,
    /// How long a task the provider still calls waiting or exporting is polled (every
    /// `poll_max` past the window) before it is given up (`REPORT_GIVE_UP_AFTER`).
    pub give_up_after: Duration,
}

impl Default for PollPolicy {
    fn default() -> Self {
        PollPolicy {
            first_poll: Duration::from_secs(60),
            poll_min: Duration::from_secs(25),
            poll_max: Duration::from_secs(60),
            window: Duration::from_secs(600),
            give_up_after: Duration::from_secs(1800),
        }
    }
}

/// What the last status answer said about a task that is not ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// `job_status` 0: waiting in the provider's queue.
    Queued,
    /// `job_status` 1: being exported.
    Exporting,
}

fn chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// Scales `d` by a jitter factor in [1 - spread, 1 + spread]; `unit` is uniform in [0, 1).
fn jittered(d: Duration, spread: f64, unit: f64) -> Duration {
    d.mul_f64(1.0 - spread + 2.0 * spread * unit.clamp(0.0, 1.0))
}

impl PollPolicy {
    /// How long after its creation a task is first polled.
    pub fn first_poll_delay(&self) -> Duration {
        self.first_poll.min(self.window)
    }

    /// The first poll of a task created at `created`.
    pub fn first_poll_at(&self, created: DateTime<Utc>) -> DateTime<Utc> {
        created + chrono(self.first_poll_delay())
    }

    /// Settings that could only burn money, refused before anything runs: a window or
    /// a give-up shorter than the first poll gives every task up before it is asked
    /// about (and buys another), a give-up shorter than the window ends tasks the
    /// schedule still expects, and a zero poll interval polls without pause.
    pub fn check(&self) -> Result<(), String> {
        let d = |d: Duration| humantime::format_duration(d).to_string();
        if self.poll_min.is_zero() || self.poll_min > self.poll_max {
            return Err("REPORT_POLL_MIN must be above zero and at most REPORT_POLL_MAX".into());
        }
        if self.first_poll.is_zero() {
            return Err("REPORT_FIRST_POLL must be above zero".into());
        }
        if self.window < self.first_poll {
            return Err(format!(
                "REPORT_WINDOW ({}) is shorter than REPORT_FIRST_POLL ({}): every task would be given up before it is first asked about, and paid for again",
                d(self.window),
                d(self.first_poll)
            ));
        }
        if self.give_up_after < self.window {
            return Err(format!(
                "REPORT_GIVE_UP_AFTER ({}) is shorter than REPORT_WINDOW ({}): tasks would be given up, and paid for again, while the schedule still expects them",
                d(self.give_up_after),
                d(self.window)
            ));
        }
        Ok(())
    }

    /// Whether a task created at `created` is past `give_up_after` at `now`.
    pub fn given_up(&self, created: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        now >= created + chrono(self.give_up_after)
    }

    /// After a "not ready" answer at `now` past the window: every `poll_max` (±10 %)
    /// until the give-up, the last poll on it; `None` at or after it.
    pub fn next_poll_past_window(
        &self,
        created: DateTime<Utc>,
        now: DateTime<Utc>,
        unit: f64,
    ) -> Option<DateTime<Utc>> {
        if self.given_up(created, now) {
            return None;
        }
        let give_up = created + chrono(self.give_up_after);
        Some((now + chrono(jittered(self.poll_max, 0.1, unit))).min(give_up))
    }

    /// The next poll after a "not ready" answer at `now`, or `None` when the task has
    /// been polled for `give_up_after` and is given up. Within the window: every
    /// `poll_min` while exporting, `poll_max` while queued, the last one on the
    /// window's end; past it, every `poll_max`. Jitter (±10 %) spreads a batch created
    /// together over time, so their polls do not arrive in bursts.
    pub fn next_poll_at(
        &self,
        created: DateTime<Utc>,
        now: DateTime<Utc>,
        progress: Progress,
        unit: f64,
    ) -> Option<DateTime<Utc>> {
        let deadline = created + chrono(self.window);
        if now >= deadline {
            return self.next_poll_past_window(created, now, unit);
        }
        let base = match progress {
            Progress::Queued => self.poll_max,
            Progress::Exporting => self.poll_min,
        };
        let next = now
            + chrono(
                jittered(base, 0.1, unit).clamp(self.poll_min, self.poll_max.max(self.poll_min)),
            );
        Some(next.min(deadline))
    }
}

/// Exponential backoff with jitter for retries persisted on the row.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Delay after the first transient error.
    pub base: Duration,
    /// Longest delay between two tries.
    pub cap: Duration,
    /// How long a row keeps retrying transient trouble before it fails.
    pub budget: Duration,
    /// Delay before a new upstream task after a failed or expired one.
    pub new_task_base: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_secs(2),
            cap: Duration::from_secs(300),
            budget: Duration::from_secs(24 * 3600),
            new_task_base: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// Delay before try `n + 1` after `n` consecutive transient errors (n ≥ 1):
    /// base·2^(n-1), capped, with "equal jitter" (half fixed, half random) so that rows
    /// failing together do not retry together.
    pub fn transient_delay(&self, n: u32, unit: f64) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << n.saturating_sub(1).min(20));
        let d = exp.min(self.cap);
        d / 2 + d.mul_f64(0.5 * unit.clamp(0.0, 1.0))
    }

    /// Whether a streak of transient errors that began at `since` has used up the budget.
    pub fn exhausted(&self, since: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        now - since >= chrono(self.budget)
    }

    /// Delay before creating upstream task number `attempts + 1`.
    pub fn new_task_delay(&self, attempts: i32, unit: f64) -> Duration {
        let exp = self
            .new_task_base
            .saturating_mul(1u32 << (attempts.max(1) - 1).min(10) as u32);
        let d = exp.min(self.cap);
        d / 2 + d.mul_f64(0.5 * unit.clamp(0.0, 1.0))
    }
}

/// Webhook delivery: how long each attempt may take and when the next one is due.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookPolicy {
    /// Longest time one attempt may take (connect, send, the receiver's answer).
    pub timeout: Duration,
    /// Delay after the first failed attempt; it doubles after each, up to `cap`.
    pub base: Duration,
    pub cap: Duration,
    /// Attempts before a delivery is given up (`failed`).
    pub max_attempts: i32,
}

impl Default for WebhookPolicy {
    fn default() -> Self {
        // 10 s, 20 s, 40 s … capped at an hour: twelve attempts span about six hours.
        WebhookPolicy {
            timeout: Duration::from_secs(10),
            base: Duration::from_secs(10),
            cap: Duration::from_secs(3600),
            max_attempts: 12,
        }
    }
}

impl WebhookPolicy {
    /// When attempt `attempts + 1` is due after attempt `attempts` failed at `now`, or
    /// `None` when that was the last one. Equal jitter, as for the row's retries.
    pub fn retry_at(&self, attempts: i32, now: DateTime<Utc>, unit: f64) -> Option<DateTime<Utc>> {
        if attempts >= self.max_attempts {
            return None;
        }
        let exp = self
            .base
            .saturating_mul(1u32 << (attempts.max(1) - 1).min(20) as u32);
        let d = exp.min(self.cap);
        Some(now + chrono(d / 2 + d.mul_f64(0.5 * unit.clamp(0.0, 1.0))))
    }
}

/// Pause before probing a stopped account again: `base` (30 s by default) before the
/// first probe, doubling after each, capped at 15 minutes.
pub fn stop_probe_delay(base: Duration, probes: i32) -> Duration {
    let d = base.saturating_mul(1u32 << probes.clamp(0, 10) as u32);
    d.min(Duration::from_secs(15 * 60).max(base))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    #[test]
    fn no_poll_before_the_provider_can_be_ready() {
        let p = PollPolicy::default();
        assert_eq!(p.first_poll_at(t(0)), t(60));
    }

    #[test]
    fn polls_stay_within_bounds_and_end_at_the_window() {
        let p = PollPolicy::default();
        for unit in [0.0, 0.5, 0.999] {
            let next = p
                .next_poll_at(t(0), t(100), Progress::Exporting, unit)
                .unwrap();
            let gap = (next - t(100)).num_milliseconds();
            assert!((25_000..=27_500).contains(&gap), "{gap}");
            let next = p
                .next_poll_at(t(0), t(100), Progress::Queued, unit)
                .unwrap();
            let gap = (next - t(100)).num_milliseconds();
            assert!((54_000..=60_000).contains(&gap), "{gap}");
        }
        // Close to the deadline: the last poll lands exactly on it.
        assert_eq!(
            p.next_poll_at(t(0), t(590), Progress::Exporting, 0.5),
            Some(t(600))
        );
        // At or after the window's end, a task that is still waiting or exporting is
        // polled every poll_max until the give-up, the last poll on it.
        assert_eq!(
            p.next_poll_at(t(0), t(600), Progress::Exporting, 0.5),
            Some(t(660))
        );
        assert_eq!(
            p.next_poll_at(t(0), t(1790), Progress::Queued, 0.5),
            Some(t(1800))
        );
        // At or after the give-up: given up.
        assert_eq!(
            p.next_poll_at(t(0), t(1800), Progress::Exporting, 0.5),
            None
        );
    }

    #[test]
    fn settings_that_only_burn_money_are_refused() {
        assert_eq!(PollPolicy::default().check(), Ok(()));
        let zero_window = PollPolicy {
            window: Duration::ZERO,
            ..PollPolicy::default()
        };
        let e = zero_window.check().unwrap_err();
        assert!(
            e.starts_with("REPORT_WINDOW (0s) is shorter than REPORT_FIRST_POLL (1m)"),
            "{e}"
        );
        let early_give_up = PollPolicy {
            give_up_after: Duration::from_secs(300),
            ..PollPolicy::default()
        };
        assert!(
            early_give_up
                .check()
                .unwrap_err()
                .contains("REPORT_GIVE_UP_AFTER (5m)")
        );
        let no_pause = PollPolicy {
            poll_min: Duration::ZERO,
            ..PollPolicy::default()
        };
        assert!(no_pause.check().is_err());
    }

    #[test]
    fn transient_backoff_grows_is_capped_and_jittered() {
        let r = RetryPolicy::default();
        assert_eq!(r.transient_delay(1, 0.0), Duration::from_secs(1));
        assert_eq!(r.transient_delay(1, 1.0), Duration::from_secs(2));
        assert_eq!(r.transient_delay(3, 0.0), Duration::from_secs(4));
        assert_eq!(r.transient_delay(40, 1.0), Duration::from_secs(300));
        assert!(r.transient_delay(40, 0.0) >= Duration::from_secs(150));
        assert!(!r.exhausted(t(0), t(3600)));
        assert!(r.exhausted(t(0), t(24 * 3600)));
    }

    #[test]
    fn new_task_backoff() {
        let r = RetryPolicy::default();
        assert_eq!(r.new_task_delay(1, 1.0), Duration::from_secs(30));
        assert_eq!(r.new_task_delay(2, 1.0), Duration::from_secs(60));
        assert_eq!(r.new_task_delay(30, 1.0), Duration::from_secs(300));
    }

    #[test]
    fn webhooks_back_off_then_give_up() {
        let w = WebhookPolicy::default();
        assert_eq!(w.retry_at(1, t(0), 1.0), Some(t(10)));
        assert_eq!(w.retry_at(2, t(0), 1.0), Some(t(20)));
        assert_eq!(w.retry_at(2, t(0), 0.0), Some(t(10)));
        assert_eq!(w.retry_at(11, t(0), 1.0), Some(t(3600)));
        assert_eq!(w.retry_at(12, t(0), 1.0), None);
    }

    #[test]
    fn probes_back_off_to_a_cap() {
        let base = Duration::from_secs(30);
        assert_eq!(stop_probe_delay(base, 0), Duration::from_secs(30));
        assert_eq!(stop_probe_delay(base, 1), Duration::from_secs(60));
        assert_eq!(stop_probe_delay(base, 50), Duration::from_secs(900));
    }
}
