//! OpenTelemetry traces from the real `run` process, received over OTLP/HTTP from its
//! real exporter: one trace per row across a SIGKILL and a restart, in the
//! application's trace when the row names one, and nothing secret in any span.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use prost::Message;

use crate::common::*;
use report_worker::simulator::SimConfig;

/// One span as the collector got it: ids in hex, attributes and events as text, and
/// the worker that sent it (its `OTEL_RESOURCE_ATTRIBUTES`).
#[derive(Debug, Clone)]
struct Got {
    worker: String,
    trace: String,
    span: String,
    parent: String,
    name: String,
    start_unix_nanos: u64,
    attrs: BTreeMap<String, String>,
    events: Vec<String>,
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// An OTLP/HTTP trace receiver (what a collector listens with on port 4318): decodes
/// every export the exporter sends, and the webhook receiver's `traceparent` headers.
struct Collector {
    addr: std::net::SocketAddr,
    spans: Arc<Mutex<Vec<Got>>>,
    webhook_traceparents: Arc<Mutex<Vec<String>>>,
    _server: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start() -> Collector {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let hooks = Arc::new(Mutex::new(Vec::new()));
        let (into, hooked) = (spans.clone(), hooks.clone());
        let app = axum::Router::new()
            .route(
                "/v1/traces",
                axum::routing::post(move |body: axum::body::Bytes| {
                    let into = into.clone();
                    async move {
                        let request =
                            ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                        let mut got = into.lock().unwrap();
                        for rs in request.resource_spans {
                            let worker = rs
                                .resource
                                .iter()
                                .flat_map(|r| &r.attributes)
                                .find(|kv| kv.key == "worker.name")
                                .map(|kv| text(&kv.value))
                                .unwrap_or_default();
                            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                                got.push(Got {
                                    worker: worker.clone(),
                                    trace: hex::encode(&span.trace_id),
                                    span: hex::encode(&span.span_id),
                                    parent: hex::encode(&span.parent_span_id),
                                    name: span.name.clone(),
                                    start_unix_nanos: span.start_time_unix_nano,
                                    attrs: span
                                        .attributes
                                        .iter()
                                        .map(|kv| (kv.key.clone(), text(&kv.value)))
                                        .collect(),
                                    events: span
                                        .events
                                        .iter()
                                        .map(|e| {
                                            let attrs: Vec<String> = e
                                                .attributes
                                                .iter()
                                                .map(|kv| format!("{}={}", kv.key, text(&kv.value)))
                                                .collect();
                                            format!("{} {}", e.name, attrs.join(" "))
                                        })
                                        .collect(),
                                });
                            }
                        }
                        ExportTraceServiceResponse::default().encode_to_vec()
                    }
                }),
            )
            .route(
                "/hook",
                axum::routing::post(move |headers: axum::http::HeaderMap| {
                    let hooked = hooked.clone();
                    async move {
                        if let Some(tp) = headers.get("traceparent") {
                            hooked
                                .lock()
                                .unwrap()
                                .push(tp.to_str().unwrap().to_string());
                        }
                        "ok"
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Collector {
            addr,
            spans,
            webhook_traceparents: hooks,
            _server: server,
        }
    }

    fn spans(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }

    fn in_trace(&self, trace: &str) -> Vec<Got> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace == trace)
            .collect()
    }

    /// Waits until a span of `trace` satisfies `wanted`.
    /// Fails naming every span received so far.
    async fn wait_span(&self, trace: &str, what: &str, wanted: impl Fn(&Got) -> bool) -> Got {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.in_trace(trace).into_iter().find(|s| wanted(s)) {
                return s;
            }
            if std::time::Instant::now() > deadline {
                let got: Vec<String> = self
                    .spans()
                    .iter()
                    .map(|s| format!("{} {} {} {:?}", s.worker, s.trace, s.name, s.attrs))
                    .collect();
                panic!("timed out waiting for {what}; received: {got:#?}");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

const APP_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const APP_SPAN: &str = "00f067aa0ba902b7";

fn worker_with_traces(
    db: &TestDb,
    sim: &report_worker::simulator::Simulator,
    collector: &Collector,
    name: &str,
) -> Running {
    let endpoint = format!("http://{}", collector.addr);
    let resource = format!("worker.name={name}");
    Running(worker_process(
        &db.url,
        sim,
        &[
            ("WORKER_ID", name),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_SERVICE_NAME", "report-worker-test"),
            ("OTEL_RESOURCE_ATTRIBUTES", &resource),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("WEBHOOK_SECRET", "a-secret-of-sixteen-or-more"),
            ("WEBHOOK_ALLOW_PRIVATE", "true"),
        ],
    ))
}

/// A poll span's `job_status` (none when its status call failed after its retries).
fn status(p: &Got) -> Option<&str> {
    p.attrs.get("job_status").map(String::as_str)
}

/// Stops a `run` the way an orchestrator does, and waits for it to exit.
fn terminate(mut worker: Running) {
    let pid = worker.0.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = worker.0.wait().unwrap();
    assert!(status.success(), "run exits cleanly on SIGTERM: {status}");
}

/// The row's trace context as the worker wrote it: (trace id, report span id).
async fn trace_context(db: &TestDb, id: i64) -> Option<(String, String)> {
    let tc: Option<String> =
        sqlx::query_scalar("SELECT trace_context FROM report_requests WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let tc = tc?;
    let parts: Vec<&str> = tc.split('-').collect();
    assert_eq!(parts.len(), 4, "{tc}");
    Some((parts[1].to_string(), parts[2].to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_report_is_one_trace_across_a_kill_and_a_restart_in_the_applications_trace() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig {
        // Long enough that the first worker is killed mid-generation even on a busy
        // machine (it is killed once one of its polls has arrived, within a second or two).
        generation_time: (Duration::from_secs(8), Duration::from_secs(9)),
        ..SimConfig::instant()
    })
    .await;
    let collector = Collector::start().await;
    let hook = format!("http://{}/hook", collector.addr);
    let traceparent = format!("00-{APP_TRACE}-{APP_SPAN}-01");
    let joined: i64 = sqlx::query_scalar(
        "INSERT INTO report_requests (company_name, report_type, callback_url, traceparent, batch)
         VALUES ('小米科技有限责任公司', 'pdf', $1, $2, 'traced') RETURNING id",
    )
    .bind(&hook)
    .bind(&traceparent)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let own = enqueue(&db.pool, Some("华为技术有限公司"), None, None, "word").await;

    // The first worker creates both tasks and polls them; it is killed mid-generation.
    let first = worker_with_traces(&db, &sim, &collector, "first");
    // A whole poll claim received: spans are exported in the order they end, so
    // everything before it (the create's claim) has arrived too.
    let polled = |s: &Got| {
        s.worker == "first"
            && s.name == "claim"
            && s.attrs.get("claim.role").map(String::as_str) == Some("poll")
    };
    collector
        .wait_span(APP_TRACE, "the first worker's create and a poll", polled)
        .await;
    let (own_trace, _) = wait_for(
        "the second row's trace context",
        Duration::from_secs(30),
        || trace_context(&db, own),
    )
    .await;
    collector
        .wait_span(
            &own_trace,
            "the first worker's poll of the other row",
            polled,
        )
        .await;
    drop(first); // SIGKILL: no shutdown, no flush
    let states: Vec<String> = sqlx::query_scalar("SELECT state FROM report_requests ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        states,
        ["generating", "generating"],
        "killed mid-generation"
    );

    // The second takes over once the leases expire, and finishes both.
    let second = worker_with_traces(&db, &sim, &collector, "second");
    wait_all_finished(&db.pool, Duration::from_secs(60)).await;
    assert_eq!(assert_documents_exact(&db.pool, &sim).await, 2);
    for trace in [APP_TRACE, own_trace.as_str()] {
        collector
            .wait_span(trace, "the report's own span", |s| s.name == "report")
            .await;
    }
    collector
        .wait_span(APP_TRACE, "the webhook's span", |s| s.name == "webhook")
        .await;
    // SIGTERM: run sends what it has batched before it exits (the last claims' spans
    // end after the report span).
    terminate(second);

    // The row that named the application's trace.
    let (trace, report_span) = trace_context(&db, joined).await.unwrap();
    assert_eq!(trace, APP_TRACE, "the application's trace id is the row's");
    let spans = collector.in_trace(APP_TRACE);
    check_one_report(&db, joined, &spans, &report_span, APP_SPAN).await;
    let webhook = spans.iter().find(|s| s.name == "webhook").unwrap();
    assert_eq!(webhook.parent, report_span);
    assert_eq!(webhook.attrs["http.response.status_code"], "200");
    let sent = collector.webhook_traceparents.lock().unwrap().clone();
    assert_eq!(
        sent,
        [format!("00-{APP_TRACE}-{}-01", webhook.span)],
        "the receiver got the webhook span's traceparent"
    );

    // The row with no trace of its own starts one: the report span is its root.
    let (trace, report_span) = trace_context(&db, own).await.unwrap();
    assert_eq!(trace, own_trace);
    assert_ne!(trace, APP_TRACE);
    let spans = collector.in_trace(&trace);
    check_one_report(&db, own, &spans, &report_span, "").await;

    // Nothing secret anywhere: not the client secret, not a token, not a signed link.
    let secret = sim.config().client_secret.clone();
    for span in collector.spans() {
        let all = format!("{} {:?} {:?}", span.name, span.attrs, span.events);
        for forbidden in [
            secret.as_str(),
            "Bearer",
            "q-signature",
            "q-sign-time",
            "access_token",
        ] {
            assert!(
                !all.contains(forbidden),
                "span {} carries {forbidden:?}: {all}",
                span.name
            );
        }
    }
    sim.stop().await;
    db.close().await;
}

/// The spans of row `id`'s life in one trace: the report span (with the id the row
/// names, a child of `app_parent`, from the insert), every claim a child of it from both
/// workers, the create in the first, polls in both, the download and the store in the
/// second, with the attributes they promise.
async fn check_one_report(
    db: &TestDb,
    id: i64,
    spans: &[Got],
    report_span: &str,
    app_parent: &str,
) {
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    let report: Vec<&Got> = spans.iter().filter(|s| s.name == "report").collect();
    assert_eq!(report.len(), 1, "one report span: {names:?}");
    let report = report[0];
    assert_eq!(report.span, report_span, "the report span has the row's id");
    assert_eq!(report.parent, app_parent);
    assert_eq!(report.attrs["report.id"], id.to_string());
    assert_eq!(report.attrs["report.outcome"], "succeeded");
    let created_micros: i64 = sqlx::query_scalar(
        "SELECT (extract(epoch FROM created_at) * 1000000)::bigint FROM report_requests WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (report.start_unix_nanos / 1000) as i64,
        created_micros,
        "the report span starts at the insert"
    );

    let claims: Vec<&Got> = spans.iter().filter(|s| s.name == "claim").collect();
    for claim in &claims {
        assert_eq!(
            claim.parent, report_span,
            "every claim is the report's child"
        );
        assert_eq!(claim.attrs["report.id"], id.to_string());
    }
    for worker in ["first", "second"] {
        assert!(
            claims.iter().any(|c| c.worker == worker),
            "{worker} made no claim span: {names:?}"
        );
    }
    let child_of_claim = |s: &Got| {
        claims
            .iter()
            .any(|c| c.span == s.parent && c.worker == s.worker)
    };
    let (job, byte_size, sha256): (String, i64, String) = sqlx::query_as(
        "SELECT r.upstream_job_id, d.byte_size, d.sha256
           FROM report_requests r JOIN report_documents d ON d.request_id = r.id WHERE r.id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();

    let creates: Vec<&Got> = spans.iter().filter(|s| s.name == "create").collect();
    assert_eq!(creates.len(), 1, "{names:?}");
    let create = creates[0];
    assert_eq!(create.worker, "first");
    assert!(child_of_claim(create));
    assert_eq!(create.attrs["create.attempt"], "1");
    assert_eq!(create.attrs["create.outcome"], "ok");
    assert_eq!(create.attrs["upstream.job_id"], job);
    let token = spans
        .iter()
        .find(|s| s.name == "token")
        .expect("a token span");
    assert!(child_of_claim(token));

    let polls: Vec<&Got> = spans.iter().filter(|s| s.name == "poll").collect();
    // The killed worker's last claims may be lost (their spans end after their polls',
    // and SIGKILL left no time to send them): only polls begun after every claim of it
    // that arrived may lack theirs.
    let last_claim = claims
        .iter()
        .filter(|c| c.worker == "first")
        .map(|c| c.start_unix_nanos)
        .max()
        .unwrap();
    for p in &polls {
        assert_eq!(p.attrs["upstream.job_id"], job);
        assert!(
            child_of_claim(p) || (p.worker == "first" && p.start_unix_nanos > last_claim),
            "a poll outside any claim: {p:?}"
        );
    }
    // (A status call that failed after its retries has no job_status.)
    assert!(
        polls.iter().any(|p| p.worker == "first"
            && child_of_claim(p)
            && matches!(status(p), Some("0" | "1")))
    );
    let ready = polls
        .iter()
        .find(|p| status(p) == Some("2"))
        .expect("the poll that found it ready");
    assert_eq!(ready.worker, "second");
    for p in &polls {
        if status(p) == Some("0") {
            assert!(p.attrs.contains_key("queue_num"), "{p:?}");
        }
    }

    let download = spans
        .iter()
        .find(|s| s.name == "download")
        .expect("download");
    assert_eq!(download.worker, "second");
    assert!(child_of_claim(download));
    assert_eq!(download.attrs["document.bytes"], byte_size.to_string());
    assert_eq!(download.attrs["document.sha256"], sha256[..12]);
    let store = spans.iter().find(|s| s.name == "store").expect("store");
    assert!(child_of_claim(store));
    assert_eq!(store.attrs["store.outcome"], "stored");
    assert_eq!(store.attrs["store.kind"], "postgres");
}

#[tokio::test]
async fn a_traceparent_that_is_not_w3c_is_refused_by_name() {
    let db = TestDb::new().await;
    for bad in [
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "4bf92f3577b34da6a3ce929d0e0e4736",
    ] {
        let e = sqlx::query(
            "INSERT INTO report_requests (company_name, report_type, traceparent) VALUES ('x', 'pdf', $1)",
        )
        .bind(bad)
        .execute(&db.pool)
        .await
        .unwrap_err();
        assert!(
            e.to_string().contains("report_requests_traceparent_format"),
            "{bad}: {e}"
        );
    }
    db.close().await;
}

#[tokio::test]
async fn a_worker_without_an_endpoint_writes_no_trace_context() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    let id = enqueue(&db.pool, Some("小米科技有限责任公司"), None, None, "pdf").await;
    let worker = Running(worker_process(&db.url, &sim, &[]));
    wait_all_finished(&db.pool, Duration::from_secs(30)).await;
    drop(worker);
    assert_eq!(trace_context(&db, id).await, None);
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn a_tracing_setting_it_cannot_honour_stops_run_with_one_line() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    let mut child = worker_process(
        &db.url,
        &sim,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ],
    );
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc"),
        "{stderr}"
    );
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn a_retried_row_stays_in_its_trace_with_a_new_report_span() {
    let db = TestDb::new().await;
    let id = enqueue(&db.pool, Some("小米科技有限责任公司"), None, None, "pdf").await;
    let first = format!("00-{APP_TRACE}-{APP_SPAN}-01");
    sqlx::query(
        "UPDATE report_requests SET state = 'failed', finished_at = now(), last_error = 'gave up',
                trace_context = $2 WHERE id = $1",
    )
    .bind(id)
    .bind(&first)
    .execute(&db.pool)
    .await
    .unwrap();
    let retried: bool = report_retry(&db.pool, id).await;
    assert!(retried);
    let (trace, span) = trace_context(&db, id).await.unwrap();
    assert_eq!(trace, APP_TRACE, "the same trace");
    assert_ne!(span, APP_SPAN, "a new report span for the new life");
    assert_eq!(span.len(), 16);
    assert!(
        span.chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
    // A row no tracing worker claimed has no trace to stay in.
    let untraced = enqueue(&db.pool, Some("华为技术有限公司"), None, None, "pdf").await;
    sqlx::query(
        "UPDATE report_requests SET state = 'failed', finished_at = now(), last_error = 'x' WHERE id = $1",
    )
    .bind(untraced)
    .execute(&db.pool)
    .await
    .unwrap();
    let retried: bool = report_retry(&db.pool, untraced).await;
    assert!(retried);
    assert_eq!(trace_context(&db, untraced).await, None);
    db.close().await;
}
