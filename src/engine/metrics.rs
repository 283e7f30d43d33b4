//! Prometheus metrics (through prometheus-client) and the `/metrics` + `/healthz`
//! endpoints served on `METRICS_ADDR`.

use crate::queue::sql;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::queue::Db;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::queue;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    endpoint: String,
    outcome: String,
    account: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountLabels {
    account: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StopLabels {
    account: String,
    scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LedgerLabels {
    account: String,
    outcome: String,
}

type GaugeF = Gauge<f64, std::sync::atomic::AtomicU64>;

/// One account this process works with, as `/metrics` describes it: its name and the
/// limits it is configured with (the database says how much of them is used).
#[derive(Debug, Clone)]
pub struct AccountInfo {
    pub name: String,
    pub qps: f64,
    pub daily_limit: Option<super::DailyLimit>,
}

/// The gauges read from the shared state every `REFRESH_EVERY` (the same in every
/// process: alerts take their `max`).
struct Shared {
    oldest: Family<StateLabels, GaugeF>,
    stopped: Family<StopLabels, Gauge>,
    creates_today: Family<LedgerLabels, Gauge>,
    daily_limit: Family<AccountLabels, Gauge>,
    daily_used: Family<AccountLabels, Gauge>,
    oldest_task: GaugeF,
    daily_headroom: Family<AccountLabels, Gauge>,
    qps: Family<AccountLabels, GaugeF>,
    orphans: Gauge,
    workers: Gauge,
    webhooks_pending: Gauge,
    webhooks_failed: Gauge,
    database_up: Gauge,
    /// Every account a stop, or a day's creates, was ever exported for: a lifted stop
    /// and a new provider day go back to 0, also for accounts of other processes.
    stop_accounts: std::sync::Mutex<std::collections::BTreeSet<String>>,
    ledger_accounts: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// How often `/metrics`' view of the shared state is read again.
const REFRESH_EVERY: Duration = Duration::from_secs(10);

pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    finished: Family<StateLabels, Counter>,
    depth: Family<StateLabels, Gauge>,
    insert_to_document: Histogram,
    held: Gauge,
    leases_lost: Counter,
    webhooks: Family<OutcomeLabels, Counter>,
    shared: Shared,
    /// Calls not yet added to `report_provider_calls` (see `take_calls`), by account,
    /// endpoint and outcome.
    unflushed: std::sync::Mutex<Unflushed>,
}

type Unflushed = std::collections::HashMap<(String, String, String), i64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("report_worker");
        let calls = Family::<CallLabels, Counter>::default();
        let finished = Family::<StateLabels, Counter>::default();
        let depth = Family::<StateLabels, Gauge>::default();
        // 5 s … ~5.7 h
        let insert_to_document = Histogram::new(exponential_buckets(5.0, 2.0, 13));
        registry.register(
            "upstream_calls",
            "Upstream calls by account, endpoint and outcome",
            calls.clone(),
        );
        registry.register(
            "reports_finished",
            "Reports finished, by final state",
            finished.clone(),
        );
        registry.register("queue_depth", "Rows per state", depth.clone());
        registry.register(
            "insert_to_document_seconds",
            "Time from a row's insert to its stored document",
            insert_to_document.clone(),
        );
        let held = Gauge::default();
        let leases_lost = Counter::default();
        registry.register(
            "rows_held",
            "Rows this process holds under a lease right now",
            held.clone(),
        );
        registry.register(
            "leases_lost",
            "Held rows whose lease the heartbeat could not extend (taken over or cancelled)",
            leases_lost.clone(),
        );
        let webhooks = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "webhook_attempts",
            "Webhook delivery attempts, by outcome (delivered, retry, failed)",
            webhooks.clone(),
        );
        let shared = Shared::register(&mut registry);
        Metrics {
            registry,
            shared,
            webhooks,
            calls,
            finished,
            depth,
            insert_to_document,
            held,
            leases_lost,
            unflushed: Default::default(),
        }
    }

    pub fn call(&self, account: &str, endpoint: &str, outcome: &str) {
        self.calls
            .get_or_create(&CallLabels {
                endpoint: endpoint.into(),
                outcome: outcome.into(),
                account: account.into(),
            })
            .inc();
        *self
            .unflushed()
            .entry((account.into(), endpoint.into(), outcome.into()))
            .or_default() += 1;
    }

    fn unflushed(&self) -> std::sync::MutexGuard<'_, Unflushed> {
        self.unflushed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The calls counted since the last take, by account, for `report_provider_calls`.
    pub fn take_calls(&self) -> BTreeMap<String, Vec<queue::CallTally>> {
        let mut by_account: BTreeMap<String, Vec<queue::CallTally>> = BTreeMap::new();
        for ((account, e, o), n) in self.unflushed().drain() {
            by_account.entry(account).or_default().push((e, o, n));
        }
        for tallies in by_account.values_mut() {
            tallies.sort();
        }
        by_account
    }

    /// Puts back calls whose write failed (they go with the next one).
    pub fn untake_calls(&self, account: &str, tallies: Vec<queue::CallTally>) {
        let mut unflushed = self.unflushed();
        for (e, o, n) in tallies {
            *unflushed.entry((account.to_string(), e, o)).or_default() += n;
        }
    }

    pub fn webhook_attempt(&self, outcome: &str) {
        self.webhooks
            .get_or_create(&OutcomeLabels {
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn finished(&self, state: &str) {
        self.finished
            .get_or_create(&StateLabels {
                state: state.into(),
            })
            .inc();
    }

    pub fn insert_to_document(&self, d: Duration) {
        self.insert_to_document.observe(d.as_secs_f64());
    }

    pub fn set_held(&self, n: usize) {
        self.held.set(n as i64);
    }

    pub fn leases_lost(&self, n: usize) {
        self.leases_lost.inc_by(n as u64);
    }

    pub fn set_depth(&self, state: &str, n: i64) {
        self.depth
            .get_or_create(&StateLabels {
                state: state.into(),
            })
            .set(n);
    }

    /// Sets the gauges of the shared state from what the database said, for the
    /// accounts this process is configured with (and any other with a stop).
    pub fn set_shared(&self, t: &queue::Telemetry, accounts: &[AccountInfo]) {
        let g = &self.shared;
        let mut known = g.stop_accounts.lock().unwrap_or_else(|p| p.into_inner());
        known.extend(accounts.iter().map(|a| a.name.clone()));
        known.extend(t.stopped_accounts.iter().cloned());
        for account in known.iter() {
            let scope = of(&t.stopped_accounts, &t.stop_scopes, account);
            for s in ["create", "all"] {
                let labels = StopLabels {
                    account: account.clone(),
                    scope: s.into(),
                };
                g.stopped
                    .get_or_create(&labels)
                    .set(i64::from(scope.is_some_and(|x| x == s)));
            }
        }
        drop(known);
        let mut ledger = g.ledger_accounts.lock().unwrap_or_else(|p| p.into_inner());
        ledger.extend(accounts.iter().map(|a| a.name.clone()));
        ledger.extend(t.ledger_accounts.iter().cloned());
        ledger.extend(t.daily_accounts.iter().cloned());
        for account in ledger.iter() {
            let used = of(&t.daily_accounts, &t.daily_used, account);
            g.daily_used
                .get_or_create(&AccountLabels {
                    account: account.clone(),
                })
                .set(used.copied().unwrap_or(0));
            let at = |v: &[i64]| of(&t.ledger_accounts, v, account).copied().unwrap_or(0);
            for (outcome, n) in [
                ("sent", at(&t.sent)),
                ("task", at(&t.tasks)),
                ("refunded", at(&t.refunded)),
                ("unknown", at(&t.unknown)),
            ] {
                g.creates_today
                    .get_or_create(&LedgerLabels {
                        account: account.clone(),
                        outcome: outcome.into(),
                    })
                    .set(n);
            }
        }
        for a in accounts {
            let labels = AccountLabels {
                account: a.name.clone(),
            };
            g.qps.get_or_create(&labels).set(a.qps);
            if let Some(limit) = a.daily_limit {
                g.daily_limit.get_or_create(&labels).set(limit.limit);
                g.daily_headroom.get_or_create(&labels).set(limit.headroom);
            }
        }
        drop(ledger);
        g.oldest_task.set(t.oldest_task_secs.unwrap_or(0.0));
        g.orphans.set(t.orphans_waiting);
        g.workers.set(t.workers_alive);
        g.webhooks_pending.set(t.webhooks_pending);
        g.webhooks_failed.set(t.webhooks_failed);
    }

    fn set_oldest(&self, state: &str, secs: f64) {
        self.shared
            .oldest
            .get_or_create(&StateLabels {
                state: state.into(),
            })
            .set(secs);
    }

    fn set_database_up(&self, up: bool) {
        self.shared.database_up.set(i64::from(up));
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The value for `account` in `values`, the column beside `names` (the telemetry's
/// arrays, aggregated in the same order).
fn of<'a, T>(names: &[String], values: &'a [T], account: &str) -> Option<&'a T> {
    values.get(names.iter().position(|a| a == account)?)
}

impl Shared {
    fn register(registry: &mut Registry) -> Shared {
        let g = Shared {
            oldest: Default::default(),
            stopped: Default::default(),
            creates_today: Default::default(),
            daily_limit: Default::default(),
            daily_used: Default::default(),
            oldest_task: Default::default(),
            daily_headroom: Default::default(),
            qps: Default::default(),
            orphans: Default::default(),
            workers: Default::default(),
            webhooks_pending: Default::default(),
            webhooks_failed: Default::default(),
            database_up: Default::default(),
            stop_accounts: Default::default(),
            ledger_accounts: Default::default(),
        };
        registry.register(
            "oldest_unfinished_seconds",
            "Seconds since the insert of the oldest queued or generating row; 0 when none",
            g.oldest.clone(),
        );
        registry.register(
            "account_stopped",
            "1 while the account is stopped with this scope (create: no new creates; all: no calls)",
            g.stopped.clone(),
        );
        registry.register(
            "creates_today",
            "Creates of the provider's day so far (Asia/Shanghai) by outcome: sent, task, refunded, unknown (never answered, assumed paid)",
            g.creates_today.clone(),
        );
        registry.register(
            "daily_limit",
            "The account's configured daily create limit (UPSTREAM_DAILY_LIMIT)",
            g.daily_limit.clone(),
        );
        registry.register(
            "daily_used",
            "Creates taken from today's daily limit (reserved before each create is sent; what the limit is enforced on)",
            g.daily_used.clone(),
        );
        registry.register(
            "oldest_task_seconds",
            "Seconds since the create of the oldest task still generating (REPORT_GIVE_UP_AFTER counts from there); 0 when none",
            g.oldest_task.clone(),
        );
        registry.register(
            "daily_headroom",
            "Creates of the daily limit kept for retries (UPSTREAM_DAILY_HEADROOM)",
            g.daily_headroom.clone(),
        );
        registry.register(
            "qps_configured",
            "The account's configured calls per second, shared by every process (UPSTREAM_QPS)",
            g.qps.clone(),
        );
        registry.register(
            "orphan_tasks_waiting",
            "Paid tasks kept in report_orphan_tasks, not adopted by a row yet",
            g.orphans.clone(),
        );
        registry.register(
            "workers_alive",
            "Worker processes that said they were alive in the last 30 s (report_workers)",
            g.workers.clone(),
        );
        registry.register(
            "webhooks_pending",
            "Webhook deliveries still to make",
            g.webhooks_pending.clone(),
        );
        registry.register(
            "webhooks_failed",
            "Webhook deliveries that gave up",
            g.webhooks_failed.clone(),
        );
        registry.register(
            "database_up",
            "1 when this process's last read of the shared state succeeded (/healthz only checks that the database answers)",
            g.database_up.clone(),
        );
        g
    }
}

#[derive(Clone)]
struct Http {
    pool: Db,
    metrics: Arc<Metrics>,
    /// The accounts this process works with (the first is `account_stop`'s).
    accounts: Vec<String>,
}

async fn metrics_page(State(s): State<Http>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

async fn healthz(State(s): State<Http>) -> Response {
    let db = sql::query_scalar::<i32>("SELECT 1")
        .fetch_one(&s.pool)
        .await;
    let mut stops = serde_json::Map::new();
    for account in &s.accounts {
        let stop = queue::read_stop(&s.pool, account).await.ok().flatten();
        let stop = stop.map(|s| {
            serde_json::json!({
                "scope": s.scope, "reason": s.reason, "error_code": s.error_code,
                "since": s.since, "until": s.until, "next_probe": s.probe_at,
            })
        });
        stops.insert(account.clone(), stop.unwrap_or(serde_json::Value::Null));
    }
    let first = s.accounts.first().and_then(|a| stops.get(a)).cloned();
    // Generating rows no running worker can poll (their account is in no worker's
    // configuration): each account with how many rows wait for it.
    let unpolled: serde_json::Map<String, serde_json::Value> = queue::unpolled_accounts(&s.pool)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|(account, rows, _)| {
            let name = account.unwrap_or_else(|| "(none recorded)".into());
            (name, serde_json::Value::from(rows))
        })
        .collect();
    // This process's accounts that a running worker calls without an answer (nothing
    // listens, DNS, TLS, timeouts): since when, how many calls, the last error.
    // A login that may not read the view (grant not run since migrate) says so rather
    // than reporting nothing wrong.
    let trouble = queue::provider_trouble(&s.pool).await;
    let unreadable = trouble.as_ref().err().map(|e| {
        serde_json::Value::String(format!(
            "unknown: cannot read report_provider_trouble ({})",
            crate::config::error_chain(e)
        ))
    });
    let unreachable: serde_json::Map<String, serde_json::Value> = trouble
        .unwrap_or_default()
        .into_iter()
        .filter(|t| s.accounts.contains(&t.account))
        .map(|t| {
            let detail = serde_json::json!({
                "since": t.since, "calls": t.calls, "error": t.error,
            });
            (t.account, detail)
        })
        .collect();
    let body = serde_json::json!({
        "database": if db.is_ok() { "ok" } else { "unreachable" },
        "provider_unreachable": unreadable.unwrap_or(serde_json::Value::Object(unreachable)),
        "account_stop": first.unwrap_or(serde_json::Value::Null),
        "account_stops": stops,
        "unpolled_accounts": unpolled,
    });
    let status = if db.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

/// Serves `/metrics` and `/healthz` until `cancel`, refreshing the gauges of the shared
/// state (queue depth, oldest rows, stops, today's creates…) every `REFRESH_EVERY`.
pub async fn serve(
    addr: SocketAddr,
    pool: Db,
    metrics: Arc<Metrics>,
    accounts: Vec<AccountInfo>,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz))
        .with_state(Http {
            pool: pool.clone(),
            metrics: metrics.clone(),
            accounts: accounts.iter().map(|a| a.name.clone()).collect(),
        });
    let stop = cancel.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
    });
    tokio::spawn(async move {
        loop {
            refresh(&pool, &metrics, &accounts).await;
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(REFRESH_EVERY) => {}
            }
        }
    });
    Ok(bound)
}

/// One read of the shared state into the gauges; a failed read sets `database_up` to 0
/// and keeps the last values.
async fn refresh(pool: &Db, metrics: &Metrics, accounts: &[AccountInfo]) {
    let stats = queue::queue_stats(pool).await;
    let shared = queue::telemetry(pool).await;
    metrics.set_database_up(stats.is_ok() && shared.is_ok());
    if let Ok(stats) = stats {
        for s in stats {
            metrics.set_depth(s.state.as_str(), s.count);
            if matches!(
                s.state,
                crate::domain::RequestState::Queued | crate::domain::RequestState::Generating
            ) {
                metrics.set_oldest(s.state.as_str(), s.oldest_age_secs.unwrap_or(0.0));
            }
        }
    }
    if let Ok(t) = shared {
        metrics.set_shared(&t, accounts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(page: &'a str, start: &str) -> &'a str {
        page.lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no {start} in\n{page}"))
    }

    #[test]
    fn the_shared_state_is_exported_and_a_lifted_stop_goes_back_to_zero() {
        let m = Metrics::new();
        let accounts = [AccountInfo {
            name: "main".into(),
            qps: 5.0,
            daily_limit: Some(super::super::DailyLimit {
                limit: 1000,
                headroom: 50,
            }),
        }];
        let stopped = queue::Telemetry {
            stopped_accounts: vec!["main".into(), "elsewhere".into()],
            stop_scopes: vec!["create".into(), "all".into()],
            ledger_accounts: vec!["elsewhere".into(), "main".into()],
            sent: vec![7, 12],
            tasks: vec![7, 10],
            refunded: vec![0, 1],
            unknown: vec![0, 1],
            daily_accounts: vec!["main".into()],
            daily_used: vec![13],
            oldest_task_secs: Some(61.5),
            orphans_waiting: 2,
            workers_alive: 3,
            webhooks_pending: 4,
            webhooks_failed: 5,
        };
        m.set_shared(&stopped, &accounts);
        let page = m.encode();
        let stop = |a: &str, s: &str| {
            format!("report_worker_account_stopped{{account=\"{a}\",scope=\"{s}\"}}")
        };
        assert!(
            line(&page, &stop("main", "create")).ends_with(" 1"),
            "{page}"
        );
        assert!(line(&page, &stop("main", "all")).ends_with(" 0"), "{page}");
        assert!(
            line(&page, &stop("elsewhere", "all")).ends_with(" 1"),
            "{page}"
        );
        let today =
            |o: &str| format!("report_worker_creates_today{{account=\"main\",outcome=\"{o}\"}}");
        assert!(line(&page, &today("sent")).ends_with(" 12"), "{page}");
        let elsewhere = "report_worker_creates_today{account=\"elsewhere\",outcome=\"sent\"}";
        assert!(line(&page, elsewhere).ends_with(" 7"), "{page}");
        assert!(line(&page, "report_worker_daily_used{account=\"main\"}").ends_with(" 13"));
        assert!(line(&page, "report_worker_oldest_task_seconds ").ends_with(" 61.5"));
        assert!(line(&page, &today("unknown")).ends_with(" 1"), "{page}");
        assert!(line(&page, "report_worker_daily_limit{account=\"main\"}").ends_with(" 1000"));
        assert!(line(&page, "report_worker_daily_headroom{account=\"main\"}").ends_with(" 50"));
        assert!(line(&page, "report_worker_qps_configured{account=\"main\"}").ends_with(" 5.0"));
        assert!(line(&page, "report_worker_orphan_tasks_waiting ").ends_with(" 2"));
        assert!(line(&page, "report_worker_webhooks_failed ").ends_with(" 5"));
        // The stops are lifted and a new provider day begins: back to 0, not left at 1.
        m.set_shared(&queue::Telemetry::default(), &accounts);
        let page = m.encode();
        assert!(
            line(&page, &stop("main", "create")).ends_with(" 0"),
            "{page}"
        );
        assert!(
            line(&page, &stop("elsewhere", "all")).ends_with(" 0"),
            "{page}"
        );
        assert!(line(&page, &today("sent")).ends_with(" 0"), "{page}");
        // Also for an account only another process works with.
        assert!(line(&page, elsewhere).ends_with(" 0"), "{page}");
        assert!(line(&page, "report_worker_daily_used{account=\"main\"}").ends_with(" 0"));
        assert!(line(&page, "report_worker_oldest_task_seconds ").ends_with(" 0.0"));
    }
}
