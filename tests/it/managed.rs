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
