//! Every command of the real binary through PgBouncer in transaction mode
//! (`DATABASE_POOL_MODE=transaction`): migrate twice, enqueue one row and a CSV, status,
//! two workers (one killed mid-run and replaced), the dashboard's actions, export and
//! purge. `.ci/run` starts PgBouncer (Debian's package, `pool_mode = transaction`) at
//! `TEST_PGBOUNCER_URL`; without it these tests are skipped with a message outside CI.

use std::process::{Command, Output};
use std::time::Duration;

use crate::common::*;
use crate::dashboard::{Browser, Dashboard, TOKEN};
use report_worker::simulator::SimConfig;
use reqwest::StatusCode;

/// PgBouncer in transaction mode (TEST_PGBOUNCER_URL); `None` skips outside CI.
fn pgbouncer() -> Option<String> {
    match std::env::var("TEST_PGBOUNCER_URL") {
        Ok(u) if !u.trim().is_empty() => Some(u),
        _ if std::env::var("CI").is_ok() => {
            panic!("TEST_PGBOUNCER_URL is required under CI (see .ci/run)")
        }
        _ => {
            eprintln!("skipping: TEST_PGBOUNCER_URL is not set (bash .ci/run starts PgBouncer)");
            None
        }
    }
}

/// `db` through PgBouncer at `pgbouncer` (its `*` entry maps every database name).
fn through(pgbouncer: &str, db: &TestDb) -> String {
    let mut u = url::Url::parse(pgbouncer).expect("TEST_PGBOUNCER_URL is a URL");
    u.set_path(&format!("/{}", db.name));
    u.to_string()
}

/// The binary with `args`, its database PgBouncer in transaction mode.
fn bin(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_report-worker"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", url)
        .env("DATABASE_POOL_MODE", "transaction")
        .output()
        .expect("the binary runs")
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "failed: {err}");
    assert!(!err.contains("prepared statement"), "{err}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

async fn state(db: &TestDb, id: i64) -> String {
    sqlx::query_scalar("SELECT state FROM report_requests WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn every_command_works_through_pgbouncer_in_transaction_mode() {
    let Some(pgbouncer) = pgbouncer() else {
        return;
    };
    let db = TestDb::empty().await;
    let url = through(&pgbouncer, &db);
    assert!(ok(&bin(&url, &["migrate"])).contains("migrations applied"));
    assert!(ok(&bin(&url, &["migrate"])).contains("up to date"));
    ok(&bin(&url, &["grant"]));
    let has_roles: bool = sqlx::query_scalar(
        "SELECT count(*) = 2 FROM pg_roles WHERE rolname IN ('report_app', 'report_worker')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(has_roles);
    let one: i64 = ok(&bin(&url, &["enqueue", "--company-name", "经由连接池"]))
        .trim()
        .parse()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("companies.csv");
    let lines: String = (0..30).map(|i| format!("池中公司{i}\n")).collect();
    std::fs::write(&csv, format!("company_name\n{lines}")).unwrap();
    let loaded = ok(&bin(
        &url,
        &[
            "enqueue",
            "--csv",
            csv.to_str().unwrap(),
            "--type",
            "pdf",
            "--batch",
            "pgb",
        ],
    ));
    assert!(
        loaded.contains("inserted 30, duplicates 0, rejected 0"),
        "{loaded}"
    );
    assert!(ok(&bin(&url, &["status"])).contains("queued"));

    // Two workers through PgBouncer; one is killed while it holds rows and replaced.
    let sim = start_sim(SimConfig {
        generation_time: (Duration::from_millis(300), Duration::from_millis(1200)),
        create_latency: (Duration::from_millis(20), Duration::from_millis(200)),
        ..SimConfig::instant()
    })
    .await;
    let mode = ("DATABASE_POOL_MODE", "transaction");
    let mut survivor = worker_process(&url, &sim, &[mode, ("WORKER_ID", "pgb-survivor")]);
    let mut victim = worker_process(&url, &sim, &[mode, ("WORKER_ID", "pgb-victim")]);
    wait_for("the victim to hold rows", Duration::from_secs(30), || async {
        let held = count(
            &db.pool,
            "SELECT count(*) FROM report_requests WHERE lease_owner = 'pgb-victim' AND lease_expires_at > now()",
        )
        .await;
        (held > 0).then_some(())
    })
    .await;
    victim.kill().unwrap();
    victim.wait().unwrap();
    let mut replacement = worker_process(&url, &sim, &[mode, ("WORKER_ID", "pgb-replacement")]);
    wait_all_finished(&db.pool, Duration::from_secs(90)).await;
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM report_requests WHERE state = 'succeeded'"
        )
        .await,
        31
    );
    assert_eq!(assert_documents_exact(&db.pool, &sim).await, 31);
    for p in [&mut survivor, &mut replacement] {
        p.kill().unwrap();
        p.wait().unwrap();
    }

    // The dashboard's actions through PgBouncer: cancel a row, retry it.
    let later: i64 = sqlx::query_scalar(
        "INSERT INTO report_requests (company_name, report_type, run_after) VALUES ('稍后', 'pdf', now() + interval '1 hour') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let port = free_port();
    let mut dashboard = Command::new(env!("CARGO_BIN_EXE_report-worker"))
        .args(["dashboard", "--listen", &format!("127.0.0.1:{port}")])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &url)
        .env("DATABASE_POOL_MODE", "transaction")
        .env("DASHBOARD_TOKEN", TOKEN)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let d = Dashboard::at(format!("http://127.0.0.1:{port}"));
    wait_for("the dashboard", Duration::from_secs(20), || async {
        let r = http_client().get(d.url("/")).send().await.ok()?;
        (r.status() == StatusCode::OK).then_some(())
    })
    .await;
    let mut b = Browser::default();
    b.sign_in(&d, "Pat").await;
    let page = format!("/requests/{later}");
    let csrf = b.csrf(&d, &page).await;
    let r = b
        .post(
            &d,
            &format!("/requests/{later}/cancel"),
            &[("csrf", &csrf)],
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(state(&db, later).await, "cancelled");
    let r = b
        .post(
            &d,
            &format!("/requests/{later}/retry"),
            &[("csrf", &csrf)],
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(state(&db, later).await, "queued");
    let (status, html) = b.get(&d, &format!("/requests/{one}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("经由连接池"));
    dashboard.kill().unwrap();
    dashboard.wait().unwrap();

    // Export and purge through PgBouncer.
    let out = dir.path().join("out");
    let exported = ok(&bin(
        &url,
        &["export", "--out", out.to_str().unwrap(), "--batch", "pgb"],
    ));
    assert!(exported.starts_with("written 30,"), "{exported}");
    let purged = ok(&bin(
        &url,
        &["purge", "--finished-before", "0s", "--dry-run"],
    ));
    assert!(purged.contains("would remove 31 requests"), "{purged}");
    sim.stop().await;
    db.close().await;
}

/// The demo with DATABASE_URL pointing at PgBouncer in transaction mode: the whole loop,
/// documents on disk.
#[tokio::test]
async fn the_demo_runs_through_pgbouncer() {
    let Some(pgbouncer) = pgbouncer() else {
        return;
    };
    let db = TestDb::empty().await;
    let url = through(&pgbouncer, &db);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("docs");
    let printed = ok(&bin(&url, &["demo", "--out", out.to_str().unwrap()]));
    let files = std::fs::read_dir(&out).unwrap().count();
    assert!(files > 0, "{printed}");
    // In a database of its own, dropped at the end: the one in the URL is untouched.
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'report%'"
        )
        .await,
        0,
        "{printed}"
    );
    db.close().await;
}

#[tokio::test]
async fn with_a_direct_listen_url_an_insert_through_pgbouncer_wakes_the_worker() {
    let Some(pgbouncer) = pgbouncer() else {
        return;
    };
    let db = TestDb::new().await;
    let url = through(&pgbouncer, &db);
    let sim = start_sim(SimConfig::instant()).await;
    // Idle polls a minute apart: only a NOTIFY can make the pickup quick.
    let mut worker = worker_process(
        &url,
        &sim,
        &[
            ("DATABASE_POOL_MODE", "transaction"),
            ("LISTEN_DATABASE_URL", &db.url),
            ("WORKER_IDLE_POLL", "60s"),
        ],
    );
    wait_for("the worker at work", Duration::from_secs(20), || async {
        (count(&db.pool, "SELECT count(*) FROM report_workers").await == 1).then_some(())
    })
    .await;
    // Its first claim found nothing; it now naps until a NOTIFY wakes it.
    let out = bin(&url, &["enqueue", "--company-name", "唤醒"]);
    let id: i64 = ok(&out).trim().parse().unwrap();
    let (state, _, _) = wait_final(&db.pool, id, Duration::from_secs(20)).await;
    assert_eq!(state, "succeeded");
    worker.kill().unwrap();
    worker.wait().unwrap();
    sim.stop().await;
    db.close().await;
}
