//! The real `report-worker run` process: SIGKILL mid-batch, SIGTERM, metrics, bad
//! configuration.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;
use report_worker::simulator::{SimConfig, Simulator};

fn worker_process(db_url: &str, sim: &Simulator, extra: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_report-worker"));
    cmd.arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", db_url)
        .env("UPSTREAM_BASE_URL", sim.base_url())
        .env("UPSTREAM_CLIENT_ID", &sim.config().client_id)
        .env("UPSTREAM_CLIENT_SECRET", &sim.config().client_secret)
        .env("UPSTREAM_QPS", "0")
        .env("REPORT_FIRST_POLL", "200ms")
        .env("REPORT_POLL_MIN", "200ms")
        .env("REPORT_POLL_MAX", "300ms")
        .env("WORKER_LEASE", "3s")
        .env("WORKER_IDLE_POLL", "200ms")
        .env("WORKER_CONCURRENCY", "8")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().expect("the worker starts")
}

async fn succeeded(db: &TestDb) -> i64 {
    count(
        &db.pool,
        "SELECT count(*) FROM report_requests WHERE state = 'succeeded'",
    )
    .await
}

#[tokio::test]
async fn workers_killed_with_sigkill_lose_nothing() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig {
        generation_time: (Duration::from_millis(300), Duration::from_millis(1500)),
        create_latency: (Duration::from_millis(50), Duration::from_millis(300)),
        fault_rate: 0.1,
        seed: Some(5),
        qps: Some(40),
        ..SimConfig::instant()
    })
    .await;
    let rows = 200;
    for i in 0..rows {
        enqueue(
            &db.pool,
            Some(&format!("公司{i}")),
            None,
            None,
            if i % 4 == 0 { "word" } else { "pdf" },
        )
        .await;
    }
    let paced = [("UPSTREAM_QPS", "40")];
    let mut survivor = worker_process(&db.url, &sim, &[("WORKER_ID", "survivor"), paced[0]]);
    let mut victim = worker_process(&db.url, &sim, &[("WORKER_ID", "victim-1"), paced[0]]);
    for (round, threshold) in [(1, 40), (2, 110)] {
        wait_for(
            "progress before the kill",
            Duration::from_secs(120),
            || async { (succeeded(&db).await >= threshold).then_some(()) },
        )
        .await;
        let held = count(&db.pool, "SELECT count(*) FROM report_requests WHERE lease_owner LIKE 'victim%' AND lease_expires_at > now()").await;
        victim.kill().expect("SIGKILL");
        victim.wait().unwrap();
        eprintln!("round {round}: killed a worker holding {held} rows");
        if round == 1 {
            victim = worker_process(&db.url, &sim, &[("WORKER_ID", "victim-2"), paced[0]]);
        }
    }
    wait_all_finished(&db.pool, Duration::from_secs(180)).await;
    assert_eq!(succeeded(&db).await, rows);
    assert_eq!(assert_documents_exact(&db.pool, &sim).await, rows as usize);
    let stats = sim.stats();
    // Duplicates come only from creates in flight at a kill (8 per worker at most) and
    // from creates answered by a fault after the task existed (none: faults precede work).
    assert!(
        stats.tasks_created <= rows as u64 + 16,
        "{} tasks for {rows} rows",
        stats.tasks_created
    );
    // The account's QPS, shared by the processes through the database, was respected.
    let metered = stats.calls_to("create") + stats.calls_to("status");
    let limited = stats.calls("create:67200002") + stats.calls("status:67200002");
    eprintln!(
        "{metered} metered calls, {limited} rate limited, {} tasks",
        stats.tasks_created
    );
    assert!(stats.max_calls_in_one_second <= 40);
    assert!(
        limited * 100 <= metered,
        "{limited} of {metered} calls were rate limited"
    );
    survivor.kill().unwrap();
    survivor.wait().unwrap();
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn sigterm_releases_claims_and_exits_zero() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig {
        create_latency: (Duration::from_secs(5), Duration::from_secs(5)),
        ..SimConfig::instant()
    })
    .await;
    for i in 0..3 {
        enqueue(&db.pool, Some(&format!("公司{i}")), None, None, "pdf").await;
    }
    let child = worker_process(
        &db.url,
        &sim,
        &[
            ("WORKER_SHUTDOWN_TIMEOUT", "300ms"),
            ("WORKER_LEASE", "60s"),
        ],
    );
    wait_for("claims", Duration::from_secs(10), || async {
        (count(
            &db.pool,
            "SELECT count(*) FROM report_requests WHERE lease_owner IS NOT NULL",
        )
        .await
            == 3)
            .then_some(())
    })
    .await;
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "exit status {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM report_requests WHERE lease_owner IS NULL AND state = 'queued'"
        )
        .await,
        3
    );
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn metrics_and_health_are_served() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    enqueue(&db.pool, Some("小米科技有限责任公司"), None, None, "pdf").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = worker_process(&db.url, &sim, &[("METRICS_ADDR", &addr)]);
    wait_all_finished(&db.pool, Duration::from_secs(20)).await;
    let http = http_client();
    let page = wait_for("metrics", Duration::from_secs(10), || async {
        let text = http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.contains("report_worker_reports_finished_total{state=\"succeeded\"} 1")
            .then_some(text)
    })
    .await;
    assert!(
        page.contains("report_worker_upstream_calls_total{endpoint=\"create\",outcome=\"ok\"} 1"),
        "{page}"
    );
    assert!(
        page.contains("report_worker_insert_to_document_seconds"),
        "{page}"
    );
    let health: serde_json::Value = http
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["database"], "ok");
    assert!(health["account_stop"].is_null());
    child.kill().unwrap();
    child.wait().unwrap();
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn bad_configuration_is_one_line() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    for (extra, needle) in [
        (vec![("REPORT_POLL_MIN", "2m")], "REPORT_POLL_MIN"),
        (vec![("UPSTREAM_QPS", "-1")], "UPSTREAM_QPS"),
        (vec![("WORKER_CONCURRENCY", "0")], "WORKER_CONCURRENCY"),
        (vec![("UPSTREAM_TIMEOUT", "soon")], "upstream-timeout"),
    ] {
        let child = worker_process(&db.url, &sim, &extra);
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{needle} in {err}");
        assert!(!err.contains("demo-secret"));
    }
    let empty = TestDb::empty().await;
    let out = worker_process(&empty.url, &sim, &[])
        .wait_with_output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("report-worker migrate"));
    empty.close().await;
    sim.stop().await;
    db.close().await;
}
