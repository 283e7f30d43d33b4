//! The real `report-worker run` process: SIGKILL mid-batch, SIGTERM, metrics, bad
//! configuration.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;
use report_worker::simulator::SimConfig;

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
        // Ambiguous answers to creates (5xx, resets, bad bodies) spend attempts: at this
        // fault rate, give each row enough that none runs out by chance.
        let id = enqueue(
            &db.pool,
            Some(&format!("公司{i}")),
            None,
            None,
            if i % 4 == 0 { "word" } else { "pdf" },
        )
        .await;
        sqlx::query("UPDATE report_requests SET max_attempts = 10 WHERE id = $1")
            .bind(id)
            .execute(&db.pool)
            .await
            .unwrap();
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
        let held = wait_for("the victim to hold rows", Duration::from_secs(30), || async {
            let held = count(&db.pool, "SELECT count(*) FROM report_requests WHERE lease_owner LIKE 'victim%' AND lease_expires_at > now()").await;
            (held > 0).then_some(held)
        })
        .await;
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
    // Per row, by the provider's own count: no more tasks than creates the row sent,
    // and no more of those than its attempts.
    let spent: Vec<(String, i32, i32)> = sqlx::query_as(
        "SELECT company_name, creates_sent, max_attempts FROM report_requests ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for (company, sent, max) in &spent {
        let paid = tasks_for(&sim, company);
        assert!(
            paid <= *sent as u64 && sent <= max,
            "{company}: {paid} paid tasks, {sent} creates sent, max_attempts {max}"
        );
    }
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

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig}");
}

async fn intents(db: &TestDb) -> i64 {
    count(
        &db.pool,
        "SELECT count(*) FROM report_requests WHERE create_started_at IS NOT NULL",
    )
    .await
}

#[tokio::test]
async fn sigterm_during_a_slow_create_records_its_task_and_the_next_process_stores_it() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig {
        create_latency: (Duration::from_secs(2), Duration::from_secs(2)),
        ..SimConfig::instant()
    })
    .await;
    let id = enqueue_with_attempts(&db.pool, "停机公司", 3).await;
    let child = worker_process(
        &db.url,
        &sim,
        &[
            ("UPSTREAM_TIMEOUT", "5s"),
            ("WORKER_SHUTDOWN_TIMEOUT", "6s"),
            ("WORKER_LEASE", "60s"),
            ("REPORT_FIRST_POLL", "1s"),
        ],
    );
    wait_for(
        "the create on the wire",
        Duration::from_secs(10),
        || async { (intents(&db).await == 1).then_some(()) },
    )
    .await;
    signal(&child, "-TERM");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit status {:?}: {log}", out.status);
    assert!(
        log.contains("below the provider's 10s maximum"),
        "a short UPSTREAM_TIMEOUT is named at start-up: {log}"
    );
    // The create was answered during the grace period and its job id recorded.
    let (state, attempts, _) = row_state(&db.pool, id).await;
    assert_eq!((state.as_str(), attempts), ("generating", 1));
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM report_requests WHERE lease_owner IS NULL"
        )
        .await,
        1
    );
    let mut next = worker_process(&db.url, &sim, &[]);
    wait_all_finished(&db.pool, Duration::from_secs(20)).await;
    assert_eq!(row_state(&db.pool, id).await.0, "succeeded");
    assert_eq!(tasks_for(&sim, "停机公司"), 1, "one paid task");
    assert_eq!(assert_documents_exact(&db.pool, &sim).await, 1);
    next.kill().unwrap();
    next.wait().unwrap();
    sim.stop().await;
    db.close().await;
}

/// A gauge or counter from a process's /metrics page.
async fn metric(addr: &str, name: &str) -> Option<f64> {
    let page = http_client()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    page.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn a_frozen_worker_makes_no_call_for_rows_another_now_holds() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    for i in 0..6 {
        enqueue_with_attempts(&db.pool, &format!("冻结{i}"), 3).await;
    }
    // The account's next call slot is 3 s away: the first process's rows all wait for
    // their slot, holding their leases, when it is frozen.
    sqlx::query("INSERT INTO report_account_pacing (account, next_slot_at) VALUES ($1, now() + interval '3 seconds')")
        .bind(&sim.config().client_id)
        .execute(&db.pool)
        .await
        .unwrap();
    let addr = free_addr();
    let frozen = worker_process(
        &db.url,
        &sim,
        &[
            ("WORKER_ID", "frozen"),
            ("UPSTREAM_QPS", "1"),
            ("WORKER_LEASE", "2s"),
            ("METRICS_ADDR", &addr),
        ],
    );
    wait_for("claims", Duration::from_secs(10), || async {
        let held = count(
            &db.pool,
            "SELECT count(*) FROM report_requests WHERE lease_owner = 'frozen'",
        )
        .await;
        (held == 6).then_some(())
    })
    .await;
    signal(&frozen, "-STOP");
    // Its leases run out; another process takes the rows and finishes them.
    let other = worker_process(&db.url, &sim, &[("WORKER_ID", "other")]);
    wait_all_finished(&db.pool, Duration::from_secs(30)).await;
    signal(&frozen, "-CONT");
    wait_for(
        "the thawed process to let go",
        Duration::from_secs(30),
        || async {
            let held = metric(&addr, "report_worker_rows_held").await?;
            let lost = metric(&addr, "report_worker_leases_lost_total")
                .await
                .unwrap_or(0.0);
            (held == 0.0 && lost >= 1.0).then_some(())
        },
    )
    .await;
    let stats = sim.stats();
    for i in 0..6 {
        assert_eq!(
            tasks_for(&sim, &format!("冻结{i}")),
            1,
            "{:?}",
            stats.tasks_per_company
        );
    }
    assert_eq!(stats.calls_to("create"), 6, "{:?}", stats.calls);
    for mut c in [frozen, other] {
        assert!(c.try_wait().unwrap().is_none(), "the processes live on");
        c.kill().unwrap();
        c.wait().unwrap();
    }
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn a_process_started_while_the_database_is_down_waits_for_it() {
    let db = TestDb::new().await;
    let proxy = DbProxy::start().await;
    let sim = start_sim(SimConfig::instant()).await;
    enqueue(&db.pool, Some("小米科技有限责任公司"), None, None, "pdf").await;
    proxy.down();
    let url = proxy.url_for(&db);
    let mut child = worker_process(&url, &sim, &[("RUST_LOG", "warn")]);
    wait_for("tries to connect", Duration::from_secs(20), || async {
        (proxy.refused() >= 3).then_some(())
    })
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "still waiting, not exited"
    );
    proxy.up();
    wait_all_finished(&db.pool, Duration::from_secs(30)).await;
    assert_eq!(assert_documents_exact(&db.pool, &sim).await, 1);
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("the database is not ready"), "{log}");
    assert!(!log.contains("demo-secret"));
    // With a start-up timeout, it gives up with one line.
    proxy.down();
    let out = worker_process(
        &url,
        &sim,
        &[("WORKER_STARTUP_TIMEOUT", "1s"), ("RUST_LOG", "off")],
    )
    .wait_with_output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("cannot connect to the database"), "{err}");
    proxy.stop();
    sim.stop().await;
    db.close().await;
}

/// Three processes, one killed with SIGKILL every few rows, one database outage (every
/// connection cut, new ones refused) during which a process is started, creates that
/// take their time, transient faults: every row ends, every document is byte-exact,
/// no row pays for more tasks than `max_attempts`, and no process exits by itself.
#[tokio::test]
async fn chaos_kills_and_a_database_outage_lose_nothing_and_overspend_nothing() {
    let db = TestDb::new().await;
    let proxy = DbProxy::start().await;
    let sim = start_sim(SimConfig {
        create_latency: (Duration::from_millis(100), Duration::from_millis(1200)),
        generation_time: (Duration::from_millis(300), Duration::from_millis(1500)),
        fault_rate: 0.05,
        seed: Some(9),
        ..SimConfig::instant()
    })
    .await;
    let rows = 60;
    let max_attempts = 5;
    for i in 0..rows {
        enqueue_with_attempts(&db.pool, &format!("混沌{i}"), max_attempts).await;
    }
    let url = proxy.url_for(&db);
    let settings = [
        ("UPSTREAM_TIMEOUT", "4s"),
        ("WORKER_SHUTDOWN_TIMEOUT", "5s"),
    ];
    let start = |name: String| {
        let mut env = settings.to_vec();
        env.push(("WORKER_ID", Box::leak(name.into_boxed_str())));
        worker_process(&url, &sim, &env)
    };
    let mut processes: Vec<Child> = (0..3).map(|i| start(format!("chaos-{i}"))).collect();
    let mut started = 3;
    for (round, threshold) in [10i64, 20, 30, 40].into_iter().enumerate() {
        wait_for("progress", Duration::from_secs(120), || async {
            (succeeded(&db).await >= threshold).then_some(())
        })
        .await;
        let victim = round % processes.len();
        processes[victim].kill().unwrap();
        processes[victim].wait().unwrap();
        if round == 1 {
            // The database goes away; a process starts while it is gone.
            proxy.down();
            let before = proxy.refused();
            processes[victim] = start(format!("chaos-{started}"));
            started += 1;
            wait_for(
                "processes trying to reconnect",
                Duration::from_secs(30),
                || async { (proxy.refused() >= before + 6).then_some(()) },
            )
            .await;
            proxy.up();
        } else {
            processes[victim] = start(format!("chaos-{started}"));
            started += 1;
        }
    }
    wait_all_finished(&db.pool, Duration::from_secs(180)).await;
    for p in processes.iter_mut() {
        assert!(
            p.try_wait().unwrap().is_none(),
            "a process exited by itself"
        );
    }
    assert_eq!(succeeded(&db).await, rows);
    assert_eq!(assert_documents_exact(&db.pool, &sim).await, rows as usize);
    let stats = sim.stats();
    for i in 0..rows {
        let paid = tasks_for(&sim, &format!("混沌{i}"));
        assert!(
            (1..=max_attempts as u64).contains(&paid),
            "row 混沌{i} paid for {paid} tasks"
        );
    }
    let attempts_ok = count(
        &db.pool,
        "SELECT count(*) FROM report_requests WHERE attempts BETWEEN 1 AND max_attempts",
    )
    .await;
    assert_eq!(attempts_ok, rows);
    eprintln!(
        "chaos: {} tasks for {rows} rows, {} orphans",
        stats.tasks_created,
        count(&db.pool, "SELECT count(*) FROM report_orphan_tasks").await
    );
    for mut p in processes {
        p.kill().unwrap();
        p.wait().unwrap();
    }
    proxy.stop();
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn metrics_and_health_are_served() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    enqueue(&db.pool, Some("小米科技有限责任公司"), None, None, "pdf").await;
    let addr = free_addr();
    let mut child = worker_process(&db.url, &sim, &[("METRICS_ADDR", &addr)]);
    wait_all_finished(&db.pool, Duration::from_secs(20)).await;
    let http = http_client();
    let page = metrics_page(
        &addr,
        "report_worker_reports_finished_total{state=\"succeeded\"} 1",
        Duration::from_secs(10),
    )
    .await;
    assert!(
        page.contains(&format!(
            "report_worker_upstream_calls_total{{endpoint=\"create\",outcome=\"ok\",account=\"{}\"}} 1",
            sim.config().client_id
        )),
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
    let stops = health["account_stops"].as_object().unwrap();
    assert_eq!(stops.len(), 1, "{health}");
    assert!(stops[&sim.config().client_id].is_null(), "{health}");
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
        (
            vec![
                ("WORKER_SHUTDOWN_TIMEOUT", "5s"),
                ("UPSTREAM_TIMEOUT", "30s"),
            ],
            "WORKER_SHUTDOWN_TIMEOUT",
        ),
        (vec![("REPORT_POLL_MIN", "2m")], "REPORT_POLL_MIN"),
        (vec![("UPSTREAM_QPS", "-1")], "UPSTREAM_QPS"),
        (vec![("WORKER_CONCURRENCY", "0")], "WORKER_CONCURRENCY"),
        (vec![("UPSTREAM_TIMEOUT", "soon")], "UPSTREAM_TIMEOUT=soon"),
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

#[tokio::test]
async fn run_serves_the_dashboard_and_an_open_dashboard_needs_asking_for() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    enqueue(&db.pool, Some("小米科技有限责任公司"), None, None, "pdf").await;
    let addr = free_addr();
    let mut child = worker_process(&db.url, &sim, &[("DASHBOARD_ADDR", &addr)]);
    wait_all_finished(&db.pool, Duration::from_secs(20)).await;
    let http = http_client();
    let page = page_containing(
        &format!("http://{addr}/requests"),
        "小米科技有限责任公司",
        Duration::from_secs(10),
    )
    .await;
    assert!(page.contains("state-succeeded"), "{page}");
    child.kill().unwrap();
    child.wait().unwrap();

    // Beyond loopback without a token: refused at start, in one line, saying how.
    let port = free_port().to_string();
    let dashboard = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_report-worker"))
            .args(["dashboard", "--listen", &format!("0.0.0.0:{port}")])
            .args(extra)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &db.url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let refused = dashboard(&[]).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("no DASHBOARD_TOKEN is set") && err.contains("--public-read"),
        "{err}"
    );
    // A token anyone could guess is refused too.
    let short = dashboard(&["--dashboard-token", "hunter2"])
        .wait_with_output()
        .unwrap();
    let err = String::from_utf8_lossy(&short.stderr);
    assert!(!short.status.success());
    assert!(err.contains("DASHBOARD_TOKEN is shorter than 16"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    // Asked for explicitly: it serves everyone, and says so.
    let open = dashboard(&["--public-read"]);
    let local = format!("127.0.0.1:{port}");
    wait_for("the open dashboard", Duration::from_secs(10), || async {
        let r = http.get(format!("http://{local}/")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    signal(&open, "-TERM");
    let out = open.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains(&format!("dashboard on http://0.0.0.0:{port}/")),
        "{stdout}"
    );
    assert!(stderr.contains("read-only to everyone"), "{stderr}");
    assert!(out.status.success(), "SIGTERM stops it cleanly: {stderr}");
    sim.stop().await;
    db.close().await;
}

/// `run` with the accounts of `accounts` (the first one's secret in FIRST_SECRET) and
/// `env`, polling quickly.
fn run_with_accounts(
    db: &TestDb,
    sim: &report_worker::simulator::Simulator,
    accounts: &std::path::Path,
    env: &[(&str, &str)],
) -> Running {
    let child = Command::new(env!("CARGO_BIN_EXE_report-worker"))
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env("UPSTREAM_BASE_URL", sim.base_url())
        .env("UPSTREAM_ACCOUNTS", accounts)
        .env("FIRST_SECRET", &sim.config().client_secret)
        .env("UPSTREAM_QPS", "0")
        .env("REPORT_FIRST_POLL", "200ms")
        .env("REPORT_POLL_MIN", "200ms")
        .env("REPORT_POLL_MAX", "300ms")
        .env("WORKER_IDLE_POLL", "200ms")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the worker starts");
    Running(child)
}

#[tokio::test]
async fn run_pools_the_accounts_listed_in_upstream_accounts() {
    use report_worker::simulator::SimAccount;
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig {
        accounts: vec![SimAccount {
            client_id: "second-client".into(),
            client_secret: "second-secret".into(),
            qps: None,
        }],
        ..SimConfig::instant()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("second");
    std::fs::write(&secret_file, "second-secret\n").unwrap();
    let accounts = dir.path().join("accounts.toml");
    std::fs::write(
        &accounts,
        format!(
            "[[account]]\nid = {:?}\nsecret_env = \"FIRST_SECRET\"\nweight = 1\n\n\
             [[account]]\nid = \"second-client\"\nsecret_file = {:?}\nweight = 10\ndaily_limit = 2\n",
            sim.config().client_id,
            secret_file.display().to_string()
        ),
    )
    .unwrap();
    for i in 0..8 {
        enqueue(&db.pool, Some(&format!("多账户{i}")), None, None, "pdf").await;
    }
    let child = run_with_accounts(&db, &sim, &accounts, &[]);
    wait_all_finished(&db.pool, Duration::from_secs(30)).await;
    drop(child);
    assert_eq!(succeeded(&db).await, 8);
    // The second account is tried first (weight 10 to 1) until its daily limit of 2 is
    // used; then it stops for creates and the first takes the rest.
    let stats = sim.stats();
    let tasks = |a: &str| stats.accounts.get(a).map_or(0, |s| s.tasks_created);
    assert_eq!(tasks("second-client"), 2, "{stats:?}");
    assert_eq!(tasks(&sim.config().client_id), 6, "{stats:?}");
    assert_eq!(stats.calls("status:another_accounts_job"), 0);
    let stop: (String, Option<i32>, String) =
        sqlx::query_as("SELECT account, error_code, scope FROM report_account_stops")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        stop,
        (
            "second-client".to_string(),
            Some(67200007),
            "create".to_string()
        )
    );
    sim.stop().await;
    db.close().await;
}

/// A provider whose calls live on other paths (a gateway, another contract) is worked
/// through the settings alone: an account with its own paths in UPSTREAM_ACCOUNTS
/// makes every report; an account left on the compiled-in defaults meets "the API
/// requested does not exist" (67200101) and stops, with the code on its stop.
#[tokio::test]
async fn run_calls_the_paths_it_is_configured_with() {
    use report_worker::simulator::SimAccount;
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig {
        token_path: "/gw/oauth/token".into(),
        create_path: "/gw/report/create".into(),
        status_path: "/gw/report/status".into(),
        accounts: vec![SimAccount {
            client_id: "default-paths".into(),
            client_secret: "second-secret".into(),
            qps: None,
        }],
        ..SimConfig::instant()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let accounts = dir.path().join("accounts.toml");
    std::fs::write(
        &accounts,
        format!(
            "[[account]]\nid = {:?}\nsecret_env = \"FIRST_SECRET\"\nweight = 1\n\
             token_path = \"/gw/oauth/token\"\ncreate_path = \"/gw/report/create\"\nstatus_path = \"/gw/report/status\"\n\n\
             [[account]]\nid = \"default-paths\"\nsecret_env = \"SECOND_SECRET\"\nweight = 10\n",
            sim.config().client_id,
        ),
    )
    .unwrap();
    for i in 0..4 {
        enqueue(&db.pool, Some(&format!("网关{i}")), None, None, "pdf").await;
    }
    let child = run_with_accounts(&db, &sim, &accounts, &[("SECOND_SECRET", "second-secret")]);
    wait_all_finished(&db.pool, Duration::from_secs(30)).await;
    drop(child);
    assert_eq!(succeeded(&db).await, 4);
    let stats = sim.stats();
    let tasks = |a: &str| stats.accounts.get(a).map_or(0, |s| s.tasks_created);
    assert_eq!(tasks(&sim.config().client_id), 4, "{stats:?}");
    assert_eq!(tasks("default-paths"), 0, "{stats:?}");
    let stop: (String, Option<i32>) =
        sqlx::query_as("SELECT account, error_code FROM report_account_stops")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(stop, ("default-paths".to_string(), Some(67200101)));
    sim.stop().await;
    db.close().await;
}

/// `check-provider`: one token call, told in plain words, exit 1 when something is
/// wrong; `--create` makes exactly one paid create and one status call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_provider_says_what_it_found() {
    let sim = start_sim(SimConfig {
        token_path: "/gw/token".into(),
        create_path: "/gw/create".into(),
        status_path: "/gw/status".into(),
        ..SimConfig::instant()
    })
    .await;
    let check = |extra: &[(&str, &str)], args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_report-worker"));
        cmd.arg("check-provider")
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("UPSTREAM_BASE_URL", sim.base_url())
            .env("UPSTREAM_CLIENT_ID", &sim.config().client_id)
            .env("UPSTREAM_CLIENT_SECRET", &sim.config().client_secret)
            .env("UPSTREAM_TOKEN_PATH", "/gw/token")
            .env("UPSTREAM_CREATE_PATH", "/gw/create")
            .env("UPSTREAM_STATUS_PATH", "/gw/status");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("the binary runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            !text.contains(&sim.config().client_secret) || sim.config().client_secret.is_empty(),
            "{text}"
        );
        (out.status.code(), text)
    };
    let line = |text: &str, topic: &str| -> String {
        text.lines()
            .find(|l| {
                let l = l.trim_start();
                let after_ok = l.strip_prefix("ok").map_or(l, str::trim_start);
                l.starts_with(topic) || after_ok.starts_with(topic)
            })
            .unwrap_or_else(|| panic!("no {topic} line in {text}"))
            .to_string()
    };

    let (code, text) = check(&[], &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(line(&text, "credentials").contains("accepted"), "{text}");
    assert!(line(&text, "token").contains("characters"), "{text}");
    assert!(line(&text, "expires in").contains("30m"), "{text}");
    assert!(line(&text, "create").contains("not tried"), "{text}");
    assert_eq!(sim.stats().tasks_created, 0);

    let (code, text) = check(&[], &["--create", "--company-name", "小米科技有限责任公司"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(line(&text, "create").contains("made task"), "{text}");
    assert!(line(&text, "status").contains("says the task is"), "{text}");
    assert_eq!(sim.stats().tasks_created, 1);

    let (code, text) = check(&[("UPSTREAM_CLIENT_SECRET", "wrong")], &[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        line(&text, "FAIL credentials").contains("refused"),
        "{text}"
    );

    let (code, text) = check(&[("UPSTREAM_TOKEN_PATH", "/oauth/token")], &[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        line(&text, "FAIL token").contains("UPSTREAM_TOKEN_PATH"),
        "{text}"
    );

    let (code, text) = check(&[("UPSTREAM_BASE_URL", "http://127.0.0.1:1")], &[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(line(&text, "FAIL reachable").contains("no:"), "{text}");

    // --create names a company, or nothing is sent.
    let (code, text) = check(&[], &["--create"]);
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(text.trim().lines().count(), 1, "{text}");
    assert_eq!(sim.stats().tasks_created, 1);
    sim.stop().await;
}

/// Nothing listens where the provider should be: within seconds a WARN line says so,
/// `status` names the account and the error, `/healthz` carries it — not only the rows'
/// `last_error`.
// Multi-threaded: the test blocks on stderr lines while the simulator answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_provider_is_a_warning_in_status_and_healthz() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    enqueue(&db.pool, Some("小米科技有限责任公司"), None, None, "pdf").await;
    let addr = free_addr();
    // A port nothing listens on: bound, then dropped.
    let dead = free_addr();
    let mut child = worker_process(
        &db.url,
        &sim,
        &[
            ("METRICS_ADDR", &addr),
            ("UPSTREAM_BASE_URL", &format!("http://{dead}")),
        ],
    );
    let warning = first_line(child.stderr.take().unwrap(), Duration::from_secs(15), |l| {
        l.contains("the provider does not answer")
    });
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains(&format!("http://{dead}")), "{warning}");
    let status = wait_for(
        "status names the provider",
        Duration::from_secs(15),
        || async {
            let text = report_worker::ops::status::status_text(&db.pool)
                .await
                .ok()?;
            text.contains("provider unreachable for account")
                .then_some(text)
        },
    )
    .await;
    let line = status
        .lines()
        .find(|l| l.starts_with("provider unreachable"))
        .unwrap();
    assert!(line.contains(&sim.config().client_id), "{status}");
    assert!(line.contains("connect"), "the error is named: {status}");
    assert!(!status.contains(&sim.config().client_secret), "{status}");
    let http = http_client();
    let health: serde_json::Value = wait_for("healthz", Duration::from_secs(10), || async {
        http.get(format!("http://{addr}/healthz"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()
    })
    .await;
    let unreachable = health["provider_unreachable"].as_object().unwrap();
    let detail = &unreachable[&sim.config().client_id];
    assert!(detail["calls"].as_i64().unwrap() >= 1, "{health}");
    assert!(detail["since"].is_string(), "{health}");
    child.kill().unwrap();
    child.wait().unwrap();
    sim.stop().await;
    db.close().await;
}

/// A wrong secret: a WARN line within seconds, and `status` gives the provider's whole
/// reason, never the secret.
// Multi-threaded: the test blocks on stderr lines while the simulator answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_a_warning_with_the_whole_reason() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    enqueue(&db.pool, Some("小米科技有限责任公司"), None, None, "pdf").await;
    let secret = "not-the-secret-at-all";
    let mut child = worker_process(&db.url, &sim, &[("UPSTREAM_CLIENT_SECRET", secret)]);
    let warning = first_line(child.stderr.take().unwrap(), Duration::from_secs(15), |l| {
        l.contains("account-wide stop")
    });
    assert!(warning.contains("WARN"), "{warning}");
    assert!(!warning.contains(secret), "{warning}");
    let status = report_worker::ops::status::status_text(&db.pool)
        .await
        .unwrap();
    let stop = status
        .lines()
        .find(|l| l.starts_with("account stop for"))
        .unwrap_or_else(|| panic!("{status}"));
    assert!(
        stop.contains("incorrect or the client has been disabled!"),
        "the reason is whole: {stop}"
    );
    assert!(!status.contains(secret), "{status}");
    child.kill().unwrap();
    child.wait().unwrap();
    sim.stop().await;
    db.close().await;
}
