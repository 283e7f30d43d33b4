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
    let filled = bin(&["status"], Some(&db.url));
    let text = stdout(&filled);
    let queued = text.lines().find(|l| l.starts_with("queued")).unwrap();
    assert_eq!(queued.split_whitespace().nth(1), Some("2"), "{text}");
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
        "invalid database URL",
    );
}

#[test]
fn help_everywhere() {
    for args in [
        &["--help"][..],
        &["migrate", "--help"],
        &["enqueue", "--help"],
        &["status", "--help"],
    ] {
        let o = bin(args, None);
        assert!(o.status.success(), "{args:?}");
        assert!(stdout(&o).contains("Usage"), "{args:?}");
    }
}
