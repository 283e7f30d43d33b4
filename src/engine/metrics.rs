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

pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    finished: Family<StateLabels, Counter>,
    depth: Family<StateLabels, Gauge>,
    insert_to_document: Histogram,
    held: Gauge,
    leases_lost: Counter,
    webhooks: Family<OutcomeLabels, Counter>,
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
        Metrics {
            registry,
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

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
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

/// Serves `/metrics` and `/healthz` until `cancel`, refreshing the queue depth gauge.
pub async fn serve(
    addr: SocketAddr,
    pool: Db,
    metrics: Arc<Metrics>,
    accounts: Vec<String>,
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
            accounts,
        });
    let stop = cancel.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
    });
    tokio::spawn(async move {
        loop {
            if let Ok(stats) = queue::queue_stats(&pool).await {
                for s in stats {
                    metrics.set_depth(s.state.as_str(), s.count);
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            }
        }
    });
    Ok(bound)
}
