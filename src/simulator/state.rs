//! The simulated provider's state behind one lock, and the gate every metered call
//! passes: authentication, outage, injections, metering (QPS, daily limit, balance) and
//! random faults.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{FixedOffset, NaiveDate, Utc};
use rand::RngExt;
use rand::rngs::StdRng;
use serde_json::json;
use tokio::time::Instant;

use crate::domain::ReportType;

use super::answers::*;
use super::config::*;

pub(super) struct Job {
    pub(super) created: Instant,
    pub(super) generation: Duration,
    pub(super) fails: bool,
    pub(super) initial_queue: i64,
    pub(super) company: String,
    pub(super) report_type: ReportType,
    /// The date printed in the report (fixed at creation, so re-downloads match).
    pub(super) created_on: String,
    /// The account that created it: no other account can see it.
    pub(super) owner: String,
}

pub(super) struct TokenInfo {
    pub(super) client_id: String,
    pub(super) expires: Instant,
}

/// Everything that changes while the simulator runs, behind one lock: handlers hold it
/// only for bookkeeping, never across a sleep or while a document is generated.
pub(super) struct Inner {
    pub(super) rng: StdRng,
    pub(super) tokens: HashMap<String, TokenInfo>,
    pub(super) jobs: HashMap<u64, Job>,
    pub(super) next_job_id: u64,
    /// Accepted metered calls in the last second, per account: the QPS windows.
    pub(super) windows: HashMap<String, VecDeque<Instant>>,
    pub(super) day: NaiveDate,
    /// Metered calls today, per account (the daily limit is each account's).
    pub(super) day_calls: HashMap<String, u64>,
    /// Creates each account can still pay for (each starts with `balance`).
    pub(super) balance_left: HashMap<String, u64>,
    pub(super) outage: Option<i32>,
    pub(super) injections: Vec<Injection>,
    pub(super) stats: SimStats,
    /// When the first create call for each identifier arrived (for pickup latency).
    pub(super) first_create: HashMap<String, std::time::SystemTime>,
}

impl Inner {
    /// The fault of the first pending injection that `applies`, counting it down.
    pub(super) fn take_injection(&mut self, applies: impl Fn(&Injection) -> bool) -> Option<Fault> {
        let pos = self.injections.iter().position(applies)?;
        let injection = &mut self.injections[pos];
        injection.count = injection.count.saturating_sub(1);
        let fault = injection.fault.clone();
        if injection.count == 0 {
            self.injections.remove(pos);
        }
        Some(fault)
    }
}

pub(super) struct Shared {
    pub(super) config: SimConfig,
    /// Salt of the pre-signed links, so that a forged link is refused like COS would.
    pub(super) signing_key: String,
    pub(super) inner: Mutex<Inner>,
}

pub(super) type AppState = Arc<Shared>;

/// The provider's calendar day (Asia/Shanghai) by its own clock.
pub(super) fn shanghai_today(clock_offset_secs: i64) -> NaiveDate {
    (Utc::now() + chrono::Duration::seconds(clock_offset_secs))
        .with_timezone(&FixedOffset::east_opt(8 * 3600).expect("offset"))
        .date_naive()
}

impl Shared {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the counters inconsistent in a way
        // that matters to a simulator; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn count(&self, key: String) {
        *self.lock().stats.calls.entry(key).or_default() += 1;
    }
}

impl Inner {
    /// Counts a call of `client` under `key` (`endpoint:outcome`), in the totals and in
    /// the account's own counters.
    pub(super) fn count_for(&mut self, client: &str, key: String) {
        *self
            .stats
            .accounts
            .entry(client.to_string())
            .or_default()
            .calls
            .entry(key.clone())
            .or_default() += 1;
        *self.stats.calls.entry(key).or_default() += 1;
    }
}

pub(super) enum Gate {
    Pass {
        /// The account the call was made with.
        client: String,
        slow: Option<Duration>,
        job_failed: bool,
        /// A fault that strikes after the work is done (a create's lost answer).
        then: Option<Fault>,
    },
    Answer(Response),
}

impl Shared {
    /// Authentication, outage, injections, metering and random faults, in that order,
    /// for a metered call. `Pass` means: answer normally (after `slow`, if set).
    pub(super) fn gate(
        &self,
        endpoint: &str,
        headers: &HeaderMap,
        query: &HashMap<String, String>,
    ) -> Gate {
        let now = Instant::now();
        let mut inner = self.lock();
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let client = match token.and_then(|t| inner.tokens.get(t)) {
            Some(info) if info.expires > now => info.client_id.clone(),
            _ => {
                drop(inner);
                self.count(format!("{endpoint}:401"));
                return Gate::Answer(
                    (
                        StatusCode::UNAUTHORIZED,
                        Json(json!({"error": "invalid_token", "error_description": "Access token is missing, invalid or expired"})),
                    )
                        .into_response(),
                );
            }
        };
        let answer = |inner: &mut Inner, outcome: String, response: Response| {
            inner.count_for(&client, format!("{endpoint}:{outcome}"));
            Gate::Answer(response)
        };
        match query.get("apikey").map(String::as_str) {
            None | Some("") => {
                return answer(&mut inner, "67200008".into(), envelope_error(67200008));
            }
            Some(key) if key != client => {
                return answer(&mut inner, "67200009".into(), envelope_error(67200009));
            }
            _ => {}
        }
        if let Some(code) = inner.outage {
            return answer(&mut inner, code.to_string(), envelope_error(code));
        }
        let mut slow = None;
        let mut job_failed = false;
        let mut then = None;
        let injected = inner.take_injection(|i| {
            (i.endpoint == Endpoint::Any && endpoint != "download" || i.endpoint_name() == endpoint)
                && i.client.as_ref().is_none_or(|c| *c == client)
        });
        match injected {
            Some(Fault::Slow { millis }) => slow = Some(Duration::from_millis(millis)),
            Some(Fault::SlowCode { millis, code }) => {
                let fault = Fault::SlowCode { millis, code };
                return answer(
                    &mut inner,
                    fault.outcome(),
                    late_envelope_error(code, millis),
                );
            }
            Some(Fault::JobFailed) => job_failed = true,
            Some(fault) if fault.after_create() => then = Some(fault),
            Some(fault) => {
                if let Some(response) = fault_response(&fault) {
                    return answer(&mut inner, fault.outcome(), response);
                }
            }
            None => {}
        }
        // QPS: a sliding one-second window over the account's accepted calls.
        let in_window = {
            let window = inner.windows.entry(client.clone()).or_default();
            while window
                .front()
                .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
            {
                window.pop_front();
            }
            window.len()
        };
        if self
            .config
            .qps_of(&client)
            .is_some_and(|qps| in_window >= qps as usize)
        {
            return answer(&mut inner, "67200002".into(), envelope_error(67200002));
        }
        let today = shanghai_today(self.config.clock_offset_secs);
        if inner.day != today {
            inner.day = today;
            inner.day_calls.clear();
        }
        let day_calls = inner.day_calls.get(&client).copied().unwrap_or(0);
        if self
            .config
            .daily_limit
            .is_some_and(|limit| day_calls >= limit)
        {
            return answer(&mut inner, "67200007".into(), envelope_error(67200007));
        }
        let balance = self.config.balance;
        let balance_left = *inner
            .balance_left
            .entry(client.clone())
            .or_insert(balance.unwrap_or(0));
        if endpoint == "create" && balance.is_some() && balance_left == 0 {
            return answer(&mut inner, "67200005".into(), envelope_error(67200005));
        }
        if self.config.fault_rate > 0.0
            && inner
                .rng
                .random_bool(self.config.fault_rate.clamp(0.0, 1.0))
        {
            let fault = match inner.rng.random_range(0..8) {
                0 => Fault::Code { code: 68300005 },
                1 => Fault::Code { code: 68300008 },
                2 => Fault::Code { code: 67200100 },
                3 => Fault::Http { status: 500 },
                4 => Fault::Http { status: 503 },
                5 => Fault::Reset,
                6 => Fault::Malformed,
                _ => Fault::Slow {
                    millis: inner.rng.random_range(200..2000),
                },
            };
            match fault_response(&fault) {
                Some(response) => return answer(&mut inner, fault.outcome(), response),
                None => {
                    if let Fault::Slow { millis } = fault {
                        slow = Some(Duration::from_millis(millis));
                    }
                }
            }
        }
        let window = inner.windows.entry(client.clone()).or_default();
        window.push_back(now);
        let in_window = window.len();
        inner.stats.max_calls_in_one_second = inner.stats.max_calls_in_one_second.max(in_window);
        let own = inner.stats.accounts.entry(client.clone()).or_default();
        own.max_calls_in_one_second = own.max_calls_in_one_second.max(in_window);
        *inner.day_calls.entry(client.clone()).or_default() += 1;
        Gate::Pass {
            client,
            slow,
            job_failed,
            then,
        }
    }
}
