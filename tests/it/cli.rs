//! The real binary: migrate, enqueue and status, with good and bad input.

use std::process::{Command, Output};

use crate::common::TestDb;

fn bin(args: &[&str], database_url: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_report-worker"));
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG");
    if let Some(url) = database_url {
        cmd.env("DATABASE_URL", url);
    }
    cmd.output().expect("the binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failure is exactly one line on stderr, non-zero, and never a panic.
fn assert_one_line_failure(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "expected one line, got: {err:?}"
    );
    assert!(err.contains(needle), "expected {needle:?} in {err:?}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
}

#[tokio::test]
async fn migrate_enqueue_and_status() {
    let db = TestDb::empty().await;
    for _ in 0..2 {
        let o = bin(&["migrate"], Some(&db.url));
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let empty = bin(&["status"], Some(&db.url));
    assert!(empty.status.success(), "{}", stderr(&empty));
    let text = stdout(&empty);
    for state in ["queued", "generating", "succeeded", "failed", "cancelled"] {
        let line = text.lines().find(|l| l.starts_with(state)).expect(state);
        assert!(line.split_whitespace().nth(1) == Some("0"), "{line}");
    }
    assert!(text.contains("account stop: none"), "{text}");
    // The counts line up under their heading, whatever the state's name.
    let columns: std::collections::BTreeSet<usize> = text
        .lines()
        .take(6)
        .map(|l| {
            let head = l.split_whitespace().nth(1).unwrap();
            l.find(head).unwrap() + head.len()
        })
        .collect();
    assert_eq!(columns.len(), 1, "misaligned:\n{text}");

    let o = bin(
        &[
            "enqueue",
            "--company-name",
            " 小米科技有限责任公司 ",
            "--type",
            "word",
            "--priority",
            "-5",
            "--metadata",
            r#"{"customer": 42}"#,
            "--dedupe-key",
            "order-7",
        ],
        Some(&db.url),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let id: i64 = stdout(&o).trim().parse().expect("enqueue prints the id");
    let (name, kind, priority, meta): (String, String, i16, serde_json::Value) = sqlx::query_as(
        "SELECT company_name, report_type, priority, metadata FROM report_requests WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (name.as_str(), kind.as_str(), priority),
        ("小米科技有限责任公司", "word", -5)
    );
    assert_eq!(meta["customer"], 42);

    // Same dedupe key: the same id, nothing new.
    let again = bin(
        &[
            "enqueue",
            "--credit-code",
            "91110108551385082Q",
            "--dedupe-key",
            "order-7",
        ],
        Some(&db.url),
    );
    assert!(again.status.success());
    assert_eq!(stdout(&again).trim(), id.to_string());

    let o = bin(
        &[
            "enqueue",
            "--credit-code",
            "91110108551385082Q",
            "--run-after",
            "10m",
        ],
        Some(&db.url),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    sqlx::query("INSERT INTO report_account_stops (account, reason, error_code, until, probe_at)
                 VALUES ('client-1', 'insufficient balance', 67200005, NULL, now() + interval '30 seconds')")
        .execute(&db.pool)
        .await
        .unwrap();
    // A row finished a moment ago counts in the last minute, hour and day.
    let cancelled: bool = sqlx::query_scalar("SELECT report_cancel($1)")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(cancelled);
    let filled = bin(&["status"], Some(&db.url));
    let text = stdout(&filled);
    assert!(text.contains("cancelled 1/1/1"), "{text}");
    let queued = text.lines().find(|l| l.starts_with("queued")).unwrap();
    assert_eq!(queued.split_whitespace().nth(1), Some("1"), "{text}");
    assert!(
        text.contains("account stop for client-1: insufficient balance (67200005)"),
        "{text}"
    );
    db.close().await;
}

#[tokio::test]
async fn enqueue_refuses_bad_input_in_one_line() {
    let db = TestDb::new().await;
    let url = Some(db.url.as_str());
    assert_one_line_failure(
        &bin(&["enqueue", "--type", "pdf"], url),
        "at least one of company_name",
    );
    assert_one_line_failure(
        &bin(&["enqueue", "--company-name", "   "], url),
        "at least one of company_name",
    );
    assert_one_line_failure(
        &bin(&["enqueue", "--company-name", "x", "--type", "xls"], url),
        "word or pdf",
    );
    assert_one_line_failure(
        &bin(&["enqueue", "--credit-code", "123"], url),
        "credit_code must be 18",
    );
    assert_one_line_failure(
        &bin(&["enqueue", "--company-name", "a\tb"], url),
        "control character",
    );
    assert_one_line_failure(
        &bin(
            &["enqueue", "--company-name", "x", "--priority", "high"],
            url,
        ),
        "--priority",
    );
    assert_one_line_failure(
        &bin(
            &["enqueue", "--company-name", "x", "--priority", "99999"],
            url,
        ),
        "--priority",
    );
    assert_one_line_failure(
        &bin(
            &["enqueue", "--company-name", "x", "--max-attempts", "0"],
            url,
        ),
        "max_attempts",
    );
    assert_one_line_failure(
        &bin(
            &["enqueue", "--company-name", "x", "--metadata", "[1]"],
            url,
        ),
        "JSON object",
    );
    assert_one_line_failure(
        &bin(
            &["enqueue", "--company-name", "x", "--run-after", "soon"],
            url,
        ),
        "--run-after",
    );
    assert_one_line_failure(&bin(&["enqueue", "--bogus"], url), "--bogus");
    assert_one_line_failure(&bin(&["frobnicate"], url), "frobnicate");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM report_requests")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, 0, "nothing bad got in");
    db.close().await;
}

#[test]
fn database_problems_are_one_line() {
    assert_one_line_failure(&bin(&["status"], None), "DATABASE_URL");
    let secret = "postgres://someone:hunter2@127.0.0.1:1/nowhere";
    let o = bin(&["status"], Some(secret));
    assert_one_line_failure(&o, "cannot connect to the database");
    assert!(
        !stderr(&o).contains("hunter2"),
        "password leaked: {}",
        stderr(&o)
    );
    assert_one_line_failure(
        &bin(&["migrate", "--database-url", "not a url"], None),
        "is not a PostgreSQL URL",
    );
}

/// One line, every cause said once, no driver noise, and what to do.
fn assert_said_once(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_one_line_failure(o, needles[0]);
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in {err:?}");
    }
    assert!(
        !err.contains(" at line "),
        "PostgreSQL's source line: {err}"
    );
    assert!(
        !err.contains("error returned from database"),
        "driver noise: {err}"
    );
    let parts: Vec<&str> = err.trim().split(": ").collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(
            !parts[i + 1..].iter().any(|q| q.contains(p) && p.len() > 12),
            "{p:?} said twice in {err:?}"
        );
    }
}

#[tokio::test]
async fn every_database_error_is_one_line_said_once_with_what_to_do() {
    let empty = TestDb::empty().await;
    // Not migrated: every command that needs the queue says to migrate, once.
    for args in [
        &["status"][..],
        &["enqueue", "--company-name", "甲"],
        &["export", "--out", "/tmp/rw-never"],
        &["grant"],
        &["purge", "--finished-before", "1d", "--dry-run"],
    ] {
        assert_said_once(
            &bin(args, Some(&empty.url)),
            &["run `report-worker migrate` first"],
        );
    }
    // Nothing listens: said at once, as a refusal, with what to check.
    let started = std::time::Instant::now();
    let closed = bin(
        &["status"],
        Some("postgres://postgres@127.0.0.1:1/postgres"),
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(8),
        "waited for a refusal"
    );
    assert_said_once(&closed, &["Connection refused", "nothing listens there"]);
    // Another database engine's URL, no such database.
    assert_said_once(
        &bin(&["status"], Some("mysql://root@127.0.0.1:3306/db")),
        &["is not a PostgreSQL URL"],
    );
    let mut unknown = url::Url::parse(&empty.url).unwrap();
    unknown.set_path("/rw_no_such_database");
    assert_said_once(
        &bin(&["status"], Some(unknown.as_str())),
        &["does not exist", "no such database"],
    );
    // A login without privileges: which roles to use.
    let db = TestDb::new().await;
    sqlx::raw_sql("DO $$ BEGIN CREATE ROLE rw_nobody LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut nobody = url::Url::parse(&db.url).unwrap();
    nobody.set_username("rw_nobody").unwrap();
    assert_said_once(
        &bin(&["enqueue", "--company-name", "甲"], Some(nobody.as_str())),
        &["permission denied", "report-worker grant"],
    );
    // Migrated already: the second migrate says so.
    assert!(stdout(&bin(&["migrate"], Some(&db.url))).contains("up to date"));
    // A database newer than this binary.
    sqlx::query("INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES (99991231000000, 'from the future', true, '\\x00', 0)")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_said_once(
        &bin(&["status"], Some(&db.url)),
        &["this binary is older than the database"],
    );
    assert_said_once(
        &bin(&["migrate"], Some(&db.url)),
        &["this binary is older than the database"],
    );
    db.close().await;
    empty.close().await;
}

#[test]
fn settings_from_the_environment_are_named_as_variables() {
    let run = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_report-worker"));
        cmd.arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let db = ("DATABASE_URL", "postgres://postgres@127.0.0.1:1/x");
    assert_one_line_failure(&run(&[]), "DATABASE_URL is not set");
    assert_one_line_failure(
        &run(&[db, ("REPORT_WINDOW", "-5s")]),
        "REPORT_WINDOW=-5s is not valid: \"-5s\" is negative",
    );
    assert_one_line_failure(
        &run(&[db, ("UPSTREAM_QPS", "abc")]),
        "UPSTREAM_QPS=abc is not valid",
    );
    assert_one_line_failure(
        &run(&[db, ("WORKER_LEASE", "soon")]),
        "WORKER_LEASE=soon is not valid: \"soon\" is not a duration",
    );
}

#[test]
fn help_everywhere() {
    for args in [
        &["--help"][..],
        &["migrate", "--help"],
        &["enqueue", "--help"],
        &["status", "--help"],
        &["check-provider", "--help"],
    ] {
        let o = bin(args, None);
        assert!(o.status.success(), "{args:?}");
        assert!(stdout(&o).contains("Usage"), "{args:?}");
    }
}

/// `run --check-config` with `env` (and nothing else of this process's environment):
/// the configuration `run` would work with, as JSON, or the failure.
fn check_config(env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_report-worker"));
    cmd.args(["run", "--check-config"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
        )
        .env("UPSTREAM_CLIENT_ID", "client-a")
        .env("UPSTREAM_CLIENT_SECRET", "s3cr3t-value");
    for (k, v) in env {
        // An empty value stands for "not set".
        if v.is_empty() {
            cmd.env_remove(k);
        } else {
            cmd.env(k, v);
        }
    }
    cmd.output().expect("the binary runs")
}

/// Every setting of `run`, set through its environment variable, reaches the
/// configuration the engine gets: one line of the table per variable (or group of
/// variables that only make sense together).
#[test]
fn every_setting_reaches_the_engine_from_the_environment() {
    use report_worker::upstream::client;
    use serde_json::{Value, json};
    let dir = tempfile::tempdir().unwrap();
    let accounts = dir.path().join("accounts.toml");
    std::fs::write(
        &accounts,
        "[[account]]\nid = \"a\"\nsecret_env = \"A_SECRET\"\nqps = 3\ndaily_limit = 100\n[[account]]\nid = \"b\"\nsecret_env = \"A_SECRET\"\nweight = 7\ncreate_path = \"/b/create\"\n",
    )
    .unwrap();
    let accounts = accounts.display().to_string();
    // (the variables set, what the configuration then says at these JSON pointers)
    type Line<'a> = (Vec<(&'a str, &'a str)>, Vec<(&'a str, Value)>);
    let table: Vec<Line<'_>> = vec![
        (
            vec![("UPSTREAM_BASE_URL", "http://provider.internal:8080")],
            vec![("/upstream/base_url", json!("http://provider.internal:8080"))],
        ),
        (
            vec![
                ("UPSTREAM_TOKEN_PATH", "/gw/oauth/token"),
                ("UPSTREAM_CREATE_PATH", "/gw/create"),
                ("UPSTREAM_STATUS_PATH", "/gw/status"),
            ],
            vec![
                ("/upstream/paths/token", json!("/gw/oauth/token")),
                ("/upstream/paths/create", json!("/gw/create")),
                ("/upstream/paths/status", json!("/gw/status")),
                ("/accounts/0/paths/create", json!("/gw/create")),
            ],
        ),
        (
            vec![("UPSTREAM_QPS", "2.5")],
            vec![("/accounts/0/qps", json!(2.5))],
        ),
        (
            vec![("UPSTREAM_TIMEOUT", "12s")],
            vec![("/upstream/timeout", json!("12s"))],
        ),
        (
            vec![("UPSTREAM_MAX_DOWNLOAD_BYTES", "1000")],
            vec![("/upstream/max_download_bytes", json!(1000))],
        ),
        (
            vec![("UPSTREAM_DOWNLOAD_TIMEOUT", "90s")],
            vec![("/upstream/download_timeout", json!("90s"))],
        ),
        (
            vec![("UPSTREAM_DOWNLOAD_HOSTS", "a.example, *.myqcloud.com")],
            vec![(
                "/upstream/download_hosts",
                json!(["a.example", "*.myqcloud.com"]),
            )],
        ),
        (
            vec![("UPSTREAM_DOWNLOAD_MEMORY", "300000000")],
            vec![("/upstream/download_memory", json!(300_000_000))],
        ),
        (
            vec![("UPSTREAM_STOP_PROBE", "45s")],
            vec![("/upstream/stop_probe", json!("45s"))],
        ),
        (
            vec![("UPSTREAM_DAILY_LIMIT", "200")],
            vec![
                ("/accounts/0/daily_limit", json!(200)),
                ("/accounts/0/daily_headroom", json!(10)),
            ],
        ),
        (
            vec![
                ("UPSTREAM_DAILY_LIMIT", "200"),
                ("UPSTREAM_DAILY_HEADROOM", "3"),
            ],
            vec![("/accounts/0/daily_headroom", json!(3))],
        ),
        (
            vec![
                ("UPSTREAM_ACCOUNTS", accounts.as_str()),
                ("UPSTREAM_CLIENT_ID", ""),
                ("UPSTREAM_CLIENT_SECRET", ""),
                ("A_SECRET", "x"),
            ],
            vec![
                ("/accounts/0/id", json!("a")),
                ("/accounts/0/qps", json!(3.0)),
                ("/accounts/0/daily_limit", json!(100)),
                ("/accounts/1/id", json!("b")),
                ("/accounts/1/weight", json!(7.0)),
                // An account's own path wins; the others are the deployment's.
                ("/accounts/1/paths/create", json!("/b/create")),
            ],
        ),
        (
            vec![("REPORT_WINDOW", "5m")],
            vec![("/poll/window", json!("5m"))],
        ),
        (
            vec![("REPORT_GIVE_UP_AFTER", "1h")],
            vec![("/poll/give_up_after", json!("1h"))],
        ),
        (
            vec![("REPORT_FIRST_POLL", "30s")],
            vec![("/poll/first_poll", json!("30s"))],
        ),
        (
            vec![("REPORT_POLL_MIN", "20s"), ("REPORT_POLL_MAX", "50s")],
            vec![
                ("/poll/poll_min", json!("20s")),
                ("/poll/poll_max", json!("50s")),
            ],
        ),
        (
            vec![("REPORT_DETECTION_TARGET", "20s")],
            vec![("/poll/detection_target", json!("20s"))],
        ),
        (
            vec![("REPORT_DETECTION_TARGET", "0s")],
            vec![("/poll/detection_target", Value::Null)],
        ),
        (
            vec![("REPORT_REUSE_WITHIN", "7d")],
            vec![("/reuse_within", json!("7d"))],
        ),
        (
            vec![("REPORT_DOWNLOAD_TRIES", "5")],
            vec![("/retry/download_tries", json!(5))],
        ),
        (
            vec![("REPORT_RETRY_BUDGET", "2h")],
            vec![("/retry/budget", json!("2h"))],
        ),
        (
            vec![("REPORT_RETRY_MIN", "1s"), ("REPORT_RETRY_MAX", "2m")],
            vec![("/retry/min", json!("1s")), ("/retry/max", json!("2m"))],
        ),
        (
            vec![("REPORT_NEW_TASK_AFTER", "10s")],
            vec![("/retry/new_task_after", json!("10s"))],
        ),
        (
            vec![("WORKER_CONCURRENCY", "32")],
            vec![("/worker/concurrency", json!(32))],
        ),
        (
            vec![("WORKER_LEASE", "60s")],
            vec![("/worker/lease", json!("1m"))],
        ),
        (
            vec![("WORKER_IDLE_POLL", "2s")],
            vec![("/worker/idle_poll", json!("2s"))],
        ),
        (
            vec![("WORKER_SHUTDOWN_TIMEOUT", "1m")],
            vec![("/worker/shutdown_timeout", json!("1m"))],
        ),
        (
            vec![("WORKER_STARTUP_TIMEOUT", "10s")],
            vec![("/worker/startup_timeout", json!("10s"))],
        ),
        (
            vec![("WORKER_ID", "worker-1")],
            vec![("/worker/owner", json!("worker-1"))],
        ),
        (
            vec![("METRICS_ADDR", "127.0.0.1:9187")],
            vec![("/worker/metrics_addr", json!("127.0.0.1:9187"))],
        ),
        (
            vec![
                ("RETENTION_FINISHED", "90d"),
                ("RETENTION_DOCUMENTS_ONLY", "true"),
            ],
            vec![
                ("/retention/finished", json!("90d")),
                ("/retention/documents_only", json!(true)),
            ],
        ),
        (
            vec![("RETENTION_EVENTS", "30d"), ("RETENTION_EVERY", "2h")],
            vec![
                ("/retention/events", json!("30d")),
                ("/retention/every", json!("2h")),
            ],
        ),
        (
            vec![("WEBHOOK_SECRET", "0123456789abcdef0")],
            vec![
                ("/webhooks/timeout", json!("10s")),
                ("/webhooks/max_attempts", json!(12)),
            ],
        ),
        (
            vec![
                ("WEBHOOK_SECRET", "0123456789abcdef0"),
                ("WEBHOOK_TIMEOUT", "3s"),
                ("WEBHOOK_RETRY_MIN", "5s"),
                ("WEBHOOK_MAX_ATTEMPTS", "4"),
            ],
            vec![
                ("/webhooks/timeout", json!("3s")),
                ("/webhooks/retry_min", json!("5s")),
                ("/webhooks/max_attempts", json!(4)),
            ],
        ),
        (
            vec![
                ("DASHBOARD_ADDR", "127.0.0.1:8081"),
                ("DASHBOARD_TOKEN", "t0ken"),
                ("DASHBOARD_REFRESH", "10s"),
            ],
            vec![
                ("/dashboard/addr", json!("127.0.0.1:8081")),
                ("/dashboard/token_set", json!(true)),
                ("/dashboard/refresh", json!("10s")),
            ],
        ),
        (
            vec![("DOCUMENT_STORE", "s3://bucket/prefix")],
            vec![("/document_store", json!("s3://bucket/prefix"))],
        ),
        (
            vec![("DASHBOARD_PUBLIC_READ", "true")],
            vec![("/dashboard/public_read", json!(true))],
        ),
        (
            vec![("DASHBOARD_TRUSTED_PROXIES", "10.0.0.1,10.0.0.2")],
            vec![(
                "/dashboard/trusted_proxies",
                json!(["10.0.0.1", "10.0.0.2"]),
            )],
        ),
        (
            vec![("DATABASE_POOL_MODE", "transaction")],
            vec![
                ("/database/pool_mode", json!("transaction")),
                ("/database/listen", json!("off (idle workers poll)")),
            ],
        ),
        (
            vec![("LISTEN_DATABASE_URL", "postgres://u:pw@db/x")],
            vec![("/database/listen", json!("postgres://u:***@db/x"))],
        ),
    ];
    // The defaults: what `run` does with nothing set.
    let defaults = check_config(&[]);
    assert!(defaults.status.success(), "{}", stderr(&defaults));
    let text = stdout(&defaults);
    assert!(
        !text.contains("s3cr3t-value"),
        "a secret in the configuration: {text}"
    );
    let d: Value = serde_json::from_str(&text).unwrap();
    for (pointer, value) in [
        ("/poll/window", json!("10m")),
        ("/poll/give_up_after", json!("30m")),
        ("/poll/detection_target", json!("15s")),
        ("/retry/new_task_after", json!("30s")),
        ("/upstream/timeout", json!("30s")),
        ("/upstream/paths/token", json!(client::TOKEN_PATH)),
        ("/upstream/paths/create", json!(client::CREATE_PATH)),
        ("/upstream/paths/status", json!(client::STATUS_PATH)),
        ("/worker/shutdown_timeout", json!("45s")),
        ("/reuse_within", Value::Null),
        ("/webhooks", Value::Null),
    ] {
        assert_eq!(d.pointer(pointer), Some(&value), "default {pointer}");
    }
    for (env, expected) in &table {
        let o = check_config(env);
        assert!(o.status.success(), "{env:?}: {}", stderr(&o));
        let parsed: Value = serde_json::from_str(&stdout(&o)).unwrap();
        for (pointer, value) in expected {
            assert_eq!(parsed.pointer(pointer), Some(value), "{env:?} → {pointer}");
            assert_ne!(
                d.pointer(pointer),
                Some(value),
                "{pointer}: the table's value is the default"
            );
        }
    }
}

/// Settings that could only burn money are refused before anything runs, in one line.
#[test]
fn settings_that_only_burn_money_are_refused_at_start() {
    for (env, needle) in [
        (
            vec![("REPORT_WINDOW", "0s")],
            "REPORT_WINDOW (0s) is shorter than REPORT_FIRST_POLL (1m)",
        ),
        (
            vec![("REPORT_WINDOW", "10m"), ("REPORT_GIVE_UP_AFTER", "5m")],
            "REPORT_GIVE_UP_AFTER (5m) is shorter than REPORT_WINDOW (10m)",
        ),
        (
            vec![("REPORT_POLL_MIN", "0s")],
            "REPORT_POLL_MIN must be above zero",
        ),
        (
            vec![("REPORT_RETRY_MIN", "0s")],
            "REPORT_RETRY_MIN must be above zero",
        ),
        (
            vec![("UPSTREAM_CREATE_PATH", "task/create")],
            "UPSTREAM_CREATE_PATH \"task/create\" must be a path that starts with /",
        ),
        (
            vec![("LISTEN_DATABASE_URL", "mysql://u:pw@db/x")],
            "LISTEN_DATABASE_URL mysql://u:***@db/x is not a PostgreSQL URL",
        ),
        (
            vec![("UPSTREAM_STATUS_PATH", "/status?job_id=1")],
            "UPSTREAM_STATUS_PATH \"/status?job_id=1\" must be a path",
        ),
        (
            vec![("WORKER_SHUTDOWN_TIMEOUT", "5s")],
            "WORKER_SHUTDOWN_TIMEOUT (5s) is shorter than UPSTREAM_TIMEOUT (30s)",
        ),
    ] {
        assert_one_line_failure(&check_config(&env), needle);
    }
}

/// `export --ids` names every id it wrote no file for, and why; exit 3 like a CSV with
/// rejected lines.
#[tokio::test]
async fn export_by_ids_names_what_it_could_not_export() {
    let db = TestDb::new().await;
    let out_dir = tempfile::tempdir().unwrap();
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO report_requests (company_name, report_type) VALUES ('小米科技有限责任公司', 'pdf') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let ids = format!("{id},999999");
    let o = bin(
        &[
            "export",
            "--ids",
            &ids,
            "--out",
            out_dir.path().to_str().unwrap(),
        ],
        Some(&db.url),
    );
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).trim(),
        format!("not exported: {id} (queued, not succeeded), 999999 (no such request)")
    );
    db.close().await;
}
