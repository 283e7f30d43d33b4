//! What operators plug in (docs/observability.md): the alert rules checked and
//! unit-tested by Prometheus's own promtool, the Grafana dashboard's expressions valid and
//! naming only metrics `/metrics` exports, and Debian's Prometheus scraping a running
//! worker and receiving every documented metric with its labels.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use report_worker::simulator::SimConfig;

use crate::common::*;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs promtool with `args`; its whole output when it fails.
fn promtool(args: &[&str]) {
    let out = Command::new("promtool").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    if !have_tool("promtool", &["--version"]) {
        return;
    }
    let dir = repo("deploy/prometheus");
    let (rules, tests, config) = (
        dir.join("alerts.yml"),
        dir.join("alerts_test.yml"),
        dir.join("prometheus.yml"),
    );
    promtool(&["check", "rules", rules.to_str().unwrap()]);
    promtool(&["test", "rules", tests.to_str().unwrap()]);
    promtool(&["check", "config", config.to_str().unwrap()]);
    // Every alert has a test case that expects it to fire.
    let rules = std::fs::read_to_string(&rules).unwrap();
    let tests = std::fs::read_to_string(&tests).unwrap();
    for line in rules.lines() {
        if let Some(name) = line.trim().strip_prefix("- alert: ") {
            assert!(
                tests.contains(&format!(
                    "alertname: {name}\n        exp_alerts:\n          - "
                )),
                "no test case in alerts_test.yml expects {name} to fire"
            );
        }
    }
}

/// The metric families in a `/metrics` page, as the sample names they produce: a
/// counter's `_total`, a histogram's `_bucket`, `_sum` and `_count`.
fn exported_names(page: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in page.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_string());
            }
        }
    }
    names
}

/// The metrics docs/observability.md documents: name → (type, label names).
fn documented() -> BTreeMap<String, (String, BTreeSet<String>)> {
    let page = std::fs::read_to_string(repo("docs/observability.md")).unwrap();
    let mut metrics = BTreeMap::new();
    for line in page.lines().filter(|l| l.starts_with("| `report_worker_")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let name = cells[1].trim_matches('`').to_string();
        let labels = cells[3]
            .split(',')
            .map(|l| l.trim().trim_matches('`').to_string())
            .filter(|l| !l.is_empty())
            .collect();
        metrics.insert(name, (cells[2].to_string(), labels));
    }
    assert!(metrics.len() >= 15, "{metrics:?}");
    metrics
}

/// A `run` process serving `/metrics` that has worked one report (with a delivered
/// webhook), so every labelled family has samples; the webhook receiver runs as long
/// as the scene.
struct Scene {
    db: TestDb,
    sim: report_worker::simulator::Simulator,
    worker: Running,
    metrics: String,
    _hook: tokio::task::JoinHandle<()>,
}

async fn scene() -> Scene {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_addr = hook.local_addr().unwrap();
    let app = axum::Router::new().route("/hook", axum::routing::post(|| async { "ok" }));
    let hook = tokio::spawn(async move {
        let _ = axum::serve(hook, app).await;
    });
    sqlx::query(
        "INSERT INTO report_requests (company_name, report_type, callback_url) VALUES ($1, 'pdf', $2)",
    )
    .bind("小米科技有限责任公司")
    .bind(format!("http://{hook_addr}/hook"))
    .execute(&db.pool)
    .await
    .unwrap();
    let metrics = free_addr();
    let worker = Running(worker_process(
        &db.url,
        &sim,
        &[
            ("METRICS_ADDR", &metrics),
            ("UPSTREAM_DAILY_LIMIT", "1000"),
            ("WEBHOOK_SECRET", "a-secret-of-sixteen-or-more"),
            ("WEBHOOK_ALLOW_PRIVATE", "true"),
        ],
    ));
    wait_all_finished(&db.pool, Duration::from_secs(30)).await;
    Scene {
        db,
        sim,
        worker,
        metrics,
        _hook: hook,
    }
}

const DELIVERED: &str = "report_worker_webhook_attempts_total{outcome=\"delivered\"} 1";

#[tokio::test]
async fn every_dashboard_expression_is_promql_over_exported_metrics() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("deploy/grafana/report-worker.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() >= 10, "{exprs:?}");
    let s = scene().await;
    let page = metrics_page(&s.metrics, DELIVERED, Duration::from_secs(30)).await;
    let exported = exported_names(&page);
    let named = metric_names(&exprs);
    for name in &named {
        assert!(
            exported.contains(name),
            "the dashboard uses {name}, which /metrics does not export: {exported:?}"
        );
    }
    // Every exported family is on the dashboard somewhere (histograms by their buckets).
    for family in &exported {
        let shown =
            named.contains(family) || family.ends_with("_sum") || family.ends_with("_count");
        assert!(shown, "{family} is exported but on no dashboard panel");
    }
    // And every expression parses: promtool checks them as recording rules.
    if have_tool("promtool", &["--version"]) {
        let dir = tempfile::tempdir().unwrap();
        let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
        for (i, e) in exprs.iter().enumerate() {
            rules.push_str(&format!(
                "      - record: dashboard_expr_{i}\n        expr: {}\n",
                serde_json::to_string(e).unwrap()
            ));
        }
        let file = dir.path().join("dashboard.yml");
        std::fs::write(&file, rules).unwrap();
        promtool(&["check", "rules", file.to_str().unwrap()]);
    }
    drop(s.worker);
    s.sim.stop().await;
    s.db.close().await;
}

/// The `report_worker_…` names in PromQL expressions.
fn metric_names(exprs: &[String]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for e in exprs {
        let mut rest = e.as_str();
        while let Some(at) = rest.find("report_worker_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    names
}

/// Debian's Prometheus on a free port, scraping `target` every second; killed when
/// dropped.
struct Prometheus {
    _child: Running,
    api: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// `GET /api/v1/{path}` with `params`: the answer's `data`, `None` while it does not
    /// answer.
    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Option<serde_json::Value> {
        let answer: serde_json::Value = http_client()
            .get(format!("{}/{path}", self.api))
            .query(params)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        Some(answer["data"].clone())
    }

    /// The value of the instant query `q`'s first series.
    async fn value(&self, q: &str) -> serde_json::Value {
        let data = self
            .api("query", &[("query", q)])
            .await
            .expect("Prometheus answers");
        data["result"][0]["value"][1].clone()
    }

    /// What it logged (where a start or scrape failure shows).
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

fn start_prometheus(target: &str) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: report-worker\n    static_configs:\n      - targets: [\"{target}\"]\n"
        ),
    )
    .unwrap();
    let listen = free_addr();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={listen}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
        .spawn()
        .expect("prometheus starts");
    Prometheus {
        _child: Running(child),
        api: format!("http://{listen}/api/v1"),
        dir,
    }
}

/// Prints Prometheus's log when the test panics while it is alive.
struct LogOnPanic<'a>(&'a Prometheus);

impl Drop for LogOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("prometheus.log:\n{}", self.0.log());
        }
    }
}

#[tokio::test]
async fn prometheus_scrapes_a_worker_and_receives_every_documented_metric_with_its_labels() {
    if !have_tool("prometheus", &["--version"]) {
        return;
    }
    let documented = documented();
    let s = scene().await;
    // Wait until the webhook's counter is on the page, so Prometheus can see it.
    metrics_page(&s.metrics, DELIVERED, Duration::from_secs(30)).await;
    let prometheus = start_prometheus(&s.metrics);
    // Label names seen per metric, once every documented one has arrived (a failure
    // from here on prints Prometheus's log).
    let log_on_timeout = LogOnPanic(&prometheus);
    let seen: BTreeMap<String, BTreeSet<String>> = wait_for(
        "Prometheus to have scraped every documented metric",
        Duration::from_secs(60),
        || async {
            let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            let series = prometheus
                .api("series", &[("match[]", "{__name__=~\"report_worker_.*\"}")])
                .await?;
            for s in series.as_array()? {
                let labels = s.as_object()?;
                let name = labels["__name__"].as_str()?.to_string();
                let keys = labels
                    .keys()
                    .filter(|k| !["__name__", "instance", "job", "le"].contains(&k.as_str()))
                    .cloned();
                seen.entry(name).or_default().extend(keys);
            }
            let all = documented.iter().all(|(name, (kind, _))| {
                let sample = if kind == "histogram" {
                    format!("{name}_count")
                } else {
                    name.clone()
                };
                seen.contains_key(&sample)
            });
            all.then_some(seen)
        },
    )
    .await;
    for (name, (kind, labels)) in &documented {
        let sample = if kind == "histogram" {
            format!("{name}_count")
        } else {
            name.clone()
        };
        assert_eq!(&seen[&sample], labels, "the labels of {name}");
    }
    // The scrape itself is healthy, and a query over the worker's numbers answers.
    assert_eq!(prometheus.value("up{job=\"report-worker\"}").await, "1");
    let creates = format!(
        "report_worker_upstream_calls_total{{endpoint=\"create\",outcome=\"ok\",account=\"{}\"}}",
        s.sim.config().client_id
    );
    assert_eq!(prometheus.value(&creates).await, "1");
    drop(log_on_timeout);
    drop(prometheus);
    drop(s.worker);
    s.sim.stop().await;
    s.db.close().await;
}
