//! A managed PostgreSQL, as the cloud services give one: the application's admin login
//! owns its database but is no superuser. On a server of its own (a throwaway cluster
//! from the machine's binaries, so that the roles do not exist yet): `migrate` and
//! `grant` as that owner (`grant` asking for CREATEROLE, in one line, until it has it),
//! then `run` as a login in report_worker and `enqueue` as one in report_app.

use std::process::{Command, Output};
use std::time::Duration;

use crate::common::*;
use report_worker::ops::embedded_pg::{ThrowawayPostgres, find_bindir};
use report_worker::simulator::SimConfig;

fn bin(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_report-worker"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", url)
        .output()
        .expect("the binary runs")
}

/// `url` with another login and database.
fn as_login(url: &str, user: &str, db: &str) -> String {
    let mut u = url::Url::parse(url).unwrap();
    u.set_username(user).unwrap();
    u.set_path(&format!("/{db}"));
    u.to_string()
}

#[tokio::test]
async fn a_non_superuser_owner_migrates_and_grants_and_least_privilege_logins_work() {
    if find_bindir().is_none() {
        if std::env::var("CI").is_ok() {
            panic!("PostgreSQL's server binaries are required under CI");
        }
        eprintln!("skipping: no PostgreSQL server binaries (initdb, postgres)");
        return;
    }
    let pg = ThrowawayPostgres::start()
        .await
        .expect("a throwaway server");
    let superuser = report_worker::queue::connect(&pg.url(), 1).await.unwrap();
    for statement in [
        "CREATE ROLE owner LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE",
        "CREATE DATABASE reports OWNER owner",
    ] {
        sqlx::raw_sql(statement).execute(&superuser).await.unwrap();
    }
    let owner = as_login(&pg.url(), "owner", "reports");
    let migrated = bin(&owner, &["migrate"]);
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    // The roles do not exist, and the owner may not create them: one clear line.
    let refused = bin(&owner, &["grant"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("report_app and report_worker do not exist")
            && err.contains("grant needs CREATEROLE")
            && err.contains("ALTER ROLE \"owner\" CREATEROLE"),
        "{err}"
    );
    sqlx::raw_sql("ALTER ROLE owner CREATEROLE")
        .execute(&superuser)
        .await
        .unwrap();
    let granted = bin(&owner, &["grant"]);
    assert!(
        granted.status.success(),
        "{}",
        String::from_utf8_lossy(&granted.stderr)
    );
    // The owner makes the logins, as a managed database's admin does.
    let owner_db = report_worker::queue::connect(&owner, 1).await.unwrap();
    for statement in [
        "CREATE ROLE worker_1 LOGIN IN ROLE report_worker",
        "CREATE ROLE app_1 LOGIN IN ROLE report_app",
    ] {
        sqlx::raw_sql(statement).execute(&owner_db).await.unwrap();
    }
    let app = as_login(&pg.url(), "app_1", "reports");
    let worker = as_login(&pg.url(), "worker_1", "reports");
    let enqueued = bin(&app, &["enqueue", "--company-name", "托管公司"]);
    assert!(
        enqueued.status.success(),
        "{}",
        String::from_utf8_lossy(&enqueued.stderr)
    );
    let id: i64 = String::from_utf8_lossy(&enqueued.stdout)
        .trim()
        .parse()
        .unwrap();
    let sim = start_sim(SimConfig::instant()).await;
    let mut run = worker_process(&worker, &sim, &[]);
    wait_for("the report", Duration::from_secs(30), || async {
        let state: String = sqlx::query_scalar("SELECT state FROM report_requests WHERE id = $1")
            .bind(id)
            .fetch_one(&owner_db)
            .await
            .unwrap();
        (state == "succeeded").then_some(())
    })
    .await;
    let status = bin(&worker, &["status"]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    run.kill().unwrap();
    run.wait().unwrap();
    owner_db.close().await;
    superuser.close().await;
    sim.stop().await;
    drop(pg);
}

/// A failover to an asynchronous standby: a new server, without the last commits the
/// old one acknowledged. Here the row's create intent and its job id are both undone
/// (the row queued again, its attempt and create count as before them) and the server
/// is restarted, a new server process as a failover makes one. The worker that wrote the
/// job id sees the server change and hands the task back: the row adopts it, one paid
/// task. (The row is kept from being due while the test undoes its commits; the
/// periodic check is an hour away, so only the change itself can bring the job id back.)
#[tokio::test]
async fn after_the_server_changes_a_lost_job_id_is_handed_back_not_bought_again() {
    if find_bindir().is_none() {
        if std::env::var("CI").is_ok() {
            panic!("PostgreSQL's server binaries are required under CI");
        }
        eprintln!("skipping: no PostgreSQL server binaries (initdb, postgres)");
        return;
    }
    let mut pg = ThrowawayPostgres::start()
        .await
        .expect("a throwaway server");
    let url = pg.url();
    let pool = report_worker::queue::connect(&url, 2).await.unwrap();
    report_worker::queue::migrate(&pool).await.unwrap();
    let sim = start_sim(SimConfig {
        create_latency: (Duration::from_millis(200), Duration::from_millis(200)),
        ..SimConfig::instant()
    })
    .await;
    let mut config = fast_worker_config_with(
        &sim.config().client_id,
        &["--report-first-poll", "3s", "--report-window", "10s"],
    );
    config.recheck_every = Duration::from_secs(3600);
    let w = spawn_worker(&url, client_config(&sim), config).await;
    let company = "换了主库";
    let id = enqueue_with_attempts(&pool, company, 3).await;
    let job: String = wait_for("the job id", Duration::from_secs(20), || async {
        sqlx::query_scalar("SELECT upstream_job_id FROM report_requests WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
    })
    .await;
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(
        "UPDATE report_requests
            SET state = 'queued', upstream_job_id = NULL, upstream_created_at = NULL,
                next_poll_at = NULL, create_started_at = NULL, create_deadline = NULL,
                attempts = attempts - 1, creates_sent = creates_sent - 1,
                lease_owner = NULL, lease_expires_at = NULL,
                run_after = now() + interval '1 hour'
          WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query("DELETE FROM report_events WHERE request_id = $1 AND upstream_job_id = $2")
        .bind(id)
        .bind(&job)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    pool.close().await;
    pg.restart().await.expect("the server restarts");
    let pool = report_worker::queue::connect(&url, 2).await.unwrap();
    wait_for(
        "the lost job id handed back",
        Duration::from_secs(30),
        || async {
            let kept: Option<String> =
                sqlx::query_scalar("SELECT reason FROM report_orphan_tasks WHERE job_id = $1")
                    .bind(&job)
                    .fetch_optional(&pool)
                    .await
                    .unwrap();
            kept.filter(|r| r.contains("lost with the database"))
        },
    )
    .await;
    sqlx::query("UPDATE report_requests SET run_after = now() WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    let (state, _, _) = wait_final(&pool, id, Duration::from_secs(30)).await;
    assert_eq!(state, "succeeded");
    assert_eq!(tasks_for(&sim, company), 1, "one paid task");
    let now: Option<String> =
        sqlx::query_scalar("SELECT upstream_job_id FROM report_requests WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(now.as_deref(), Some(job.as_str()));
    w.stop().await;
    sim.stop().await;
}
