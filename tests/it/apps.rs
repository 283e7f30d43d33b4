//! What applications, batch users and operators see: completion events, webhooks,
//! batches, least-privilege roles, JSON logs and the example applications.

use std::collections::HashMap;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use sha2::{Digest, Sha256};
use sqlx::postgres::PgListener;

use crate::common::*;
use report_worker::engine::policy::WebhookPolicy;
use report_worker::engine::webhooks::Webhooks;
use report_worker::simulator::SimConfig;

const BAD_CREDIT_CODE: &str = "91110108551385083Q";

fn bin(args: &[&str], database_url: &str, dir: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_report-worker"))
        .args(args)
        .current_dir(dir)
        .env("DATABASE_URL", database_url)
        .env_remove("RUST_LOG")
        .env_remove("LOG_FORMAT")
        .output()
        .expect("the binary runs")
}

async fn insert(pool: &report_worker::queue::Db, sql: &'static str, company: &str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(company)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn every_final_state_is_announced_on_report_finished() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    let mut listener = PgListener::connect(&db.url).await.unwrap();
    listener.listen("report_finished").await.unwrap();
    let ok = insert(
        &db.pool,
        "INSERT INTO report_requests (company_name, report_type, batch) VALUES ($1, 'pdf', 'nightly') RETURNING id",
        "小米科技有限责任公司",
    )
    .await;
    let bad = insert(
        &db.pool,
        "INSERT INTO report_requests (credit_code, report_type) VALUES ($1, 'word') RETURNING id",
        BAD_CREDIT_CODE,
    )
    .await;
    let later = insert(
        &db.pool,
        "INSERT INTO report_requests (company_name, report_type, run_after) VALUES ($1, 'pdf', now() + interval '1 hour') RETURNING id",
        "华为技术有限公司",
    )
    .await;
    let worker = spawn_fast_worker(&db.url, &sim).await;
    // A person cancels a row by hand: the database announces it like the rest.
    let cancelled: bool = sqlx::query_scalar("SELECT report_cancel($1)")
        .bind(later)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(cancelled);
    let mut seen: HashMap<i64, serde_json::Value> = HashMap::new();
    while seen.len() < 3 {
        let note = tokio::time::timeout(Duration::from_secs(20), listener.recv())
            .await
            .expect("three notifications within 20 s")
            .unwrap();
        let payload: serde_json::Value = serde_json::from_str(note.payload()).unwrap();
        let id = payload["id"].as_i64().unwrap();
        assert!(seen.insert(id, payload).is_none(), "one event per row");
    }
    assert_eq!(
        seen[&ok],
        serde_json::json!({"id": ok, "state": "succeeded", "batch": "nightly"})
    );
    assert_eq!(
        seen[&bad],
        serde_json::json!({"id": bad, "state": "failed", "batch": null})
    );
    assert_eq!(
        seen[&later],
        serde_json::json!({"id": later, "state": "cancelled", "batch": null})
    );
    // Claims, polls and heartbeats do not notify: nothing else arrives.
    let more = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await;
    assert!(more.is_err(), "unexpected notification: {more:?}");
    worker.stop().await;
    sim.stop().await;
    db.close().await;
}

/// The receiver's view of one request.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    signature: String,
    delivery: String,
    body: Vec<u8>,
}

#[derive(Default)]
struct Receiver {
    seen: Mutex<Vec<Received>>,
    fail_first: Mutex<u32>,
}

async fn receive(
    State(r): State<Arc<Receiver>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let header = |name: &str| {
        headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    r.seen.lock().unwrap().push(Received {
        path: uri.path().to_string(),
        signature: header("x-report-signature"),
        delivery: header("x-report-delivery"),
        body: body.to_vec(),
    });
    match uri.path() {
        "/flaky" => {
            let mut left = r.fail_first.lock().unwrap();
            if *left > 0 {
                *left -= 1;
                return StatusCode::INTERNAL_SERVER_ERROR.into_response();
            }
            StatusCode::OK.into_response()
        }
        "/moved" => (
            StatusCode::FOUND,
            [(axum::http::header::LOCATION, "/landed")],
        )
            .into_response(),
        // Never answers: the attempt's timeout ends it.
        "/hang" => std::future::pending().await,
        _ => StatusCode::NO_CONTENT.into_response(),
    }
}

/// HMAC-SHA256 (RFC 2104) written out here, independent of the crate the worker uses.
fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::digest([pad(0x36), message.to_vec()].concat());
    Sha256::digest([pad(0x5c), inner.to_vec()].concat()).to_vec()
}

/// What a receiver does: parse `t=…,v1=…`, recompute, compare, check the time.
fn verify(secret: &str, header: &str, body: &[u8]) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = value.parse::<i64>().ok(),
            Some(("v1", value)) => v1 = Some(value.to_string()),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let fresh = (chrono::Utc::now().timestamp() - t).abs() < 300;
    let message = [format!("{t}.").into_bytes(), body.to_vec()].concat();
    let expected: String = hmac_sha256(secret.as_bytes(), &message)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    fresh && expected == v1
}

/// id, request_id, event_state, state, attempts, last_status, last_error
type DeliveryRow = (i64, i64, String, String, i32, Option<i32>, Option<String>);

#[tokio::test]
async fn webhooks_are_signed_retried_recorded_and_never_redirected() {
    const SECRET: &str = "whsec-test-0123456789abcdef";
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    let receiver = Arc::new(Receiver {
        fail_first: Mutex::new(2),
        ..Default::default()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/{*path}", post(receive).get(receive))
        .with_state(receiver.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    // Bad callback URLs are refused at INSERT, by name.
    for (url, constraint) in [
        (
            "ftp://example.com/x",
            "report_requests_callback_url_not_http",
        ),
        (
            "javascript:alert(1)",
            "report_requests_callback_url_not_http",
        ),
        ("http://", "report_requests_callback_url_not_http"),
        ("http://a b/", "report_requests_callback_url_not_http"),
    ] {
        let e = sqlx::query("INSERT INTO report_requests (company_name, report_type, callback_url) VALUES ('x', 'pdf', $1)")
            .bind(url)
            .execute(&db.pool)
            .await
            .unwrap_err();
        assert!(e.to_string().contains(constraint), "{url}: {e}");
    }
    let long = format!("https://example.com/{}", "a".repeat(2100));
    let e = sqlx::query("INSERT INTO report_requests (company_name, report_type, callback_url) VALUES ('x', 'pdf', $1)")
        .bind(&long)
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("report_requests_callback_url_too_long"),
        "{e}"
    );

    let with_hook = |path: &str| format!("{base}{path}?token=app-secret-in-query");
    let enqueue_hooked = |company: Option<&str>, code: Option<&str>, path: &str| {
        let url = with_hook(path);
        let pool = db.pool.clone();
        let (company, code) = (company.map(String::from), code.map(String::from));
        async move {
            sqlx::query_scalar::<_, i64>("INSERT INTO report_requests (company_name, credit_code, report_type, callback_url) VALUES ($1, $2, 'pdf', $3) RETURNING id")
                .bind(company)
                .bind(code)
                .bind(url)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let ok = enqueue_hooked(Some("小米科技有限责任公司"), None, "/flaky").await;
    let bad = enqueue_hooked(None, Some(BAD_CREDIT_CODE), "/fine").await;
    let moved = enqueue_hooked(Some("华为技术有限公司"), None, "/moved").await;
    let hung = enqueue_hooked(Some("比亚迪股份有限公司"), None, "/hang").await;
    let plain = enqueue(&db.pool, Some("宁德时代"), None, None, "word").await;

    let mut config = fast_worker_config(&sim.config().client_id);
    let policy = WebhookPolicy {
        timeout: Duration::from_millis(500),
        base: Duration::from_millis(50),
        cap: Duration::from_millis(200),
        max_attempts: 4,
    };
    config.webhooks = Some(Webhooks {
        // The receiver is on this host: allowed explicitly.
        sender: report_worker::webhook::Sender::new(
            SECRET,
            policy.timeout,
            report_worker::webhook::Destinations {
                allow_private: true,
                ..Default::default()
            },
        )
        .unwrap(),
        policy,
    });
    let worker = spawn_worker(&db.url, client_config(&sim), config).await;
    wait_all_finished(&db.pool, Duration::from_secs(20)).await;
    wait_for(
        "every delivery to settle",
        Duration::from_secs(30),
        || async {
            let open = count(
                &db.pool,
                "SELECT count(*) FROM report_webhook_deliveries WHERE state = 'pending'",
            )
            .await;
            (open == 0).then_some(())
        },
    )
    .await;

    let deliveries: Vec<DeliveryRow> = sqlx::query_as(
        "SELECT id, request_id, event_state, state, attempts, last_status, last_error FROM report_webhook_deliveries ORDER BY request_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let by_request: HashMap<i64, _> = deliveries.iter().map(|d| (d.1, d.clone())).collect();
    assert_eq!(
        deliveries.len(),
        4,
        "one per hooked row, none for {plain}: {deliveries:?}"
    );
    // Failed twice, delivered on the third attempt.
    let d = &by_request[&ok];
    assert_eq!(
        (d.2.as_str(), d.3.as_str(), d.4, d.5),
        ("succeeded", "delivered", 3, Some(200))
    );
    let d = &by_request[&bad];
    assert_eq!(
        (d.2.as_str(), d.3.as_str(), d.4, d.5),
        ("failed", "delivered", 1, Some(204))
    );
    // A redirect is a failed attempt, never followed; after the last attempt: failed.
    let d = &by_request[&moved];
    assert_eq!((d.3.as_str(), d.4, d.5), ("failed", 4, Some(302)));
    let d = &by_request[&hung];
    assert_eq!((d.3.as_str(), d.4, d.5), ("failed", 4, None));
    let error = d.6.as_deref().unwrap();
    assert!(error.contains("timed out"), "{error}");
    assert!(!error.contains("app-secret-in-query"), "{error}");

    let seen = receiver.seen.lock().unwrap().clone();
    assert!(
        seen.iter().all(|r| r.path != "/landed"),
        "a redirect was followed"
    );
    assert_eq!(seen.iter().filter(|r| r.path == "/flaky").count(), 3);
    assert_eq!(seen.iter().filter(|r| r.path == "/moved").count(), 4);
    for r in &seen {
        assert!(
            verify(SECRET, &r.signature, &r.body),
            "bad signature on {}: {}",
            r.path,
            r.signature
        );
        assert!(!verify("another-secret-entirely", &r.signature, &r.body));
        let mut tampered = r.body.clone();
        tampered[0] ^= 1;
        assert!(!verify(SECRET, &r.signature, &tampered));
    }
    let flaky: Vec<&Received> = seen.iter().filter(|r| r.path == "/flaky").collect();
    assert!(
        flaky.iter().all(|r| r.delivery == flaky[0].delivery),
        "one delivery id across retries"
    );
    assert_eq!(flaky[0].delivery, by_request[&ok].0.to_string());

    // The body: what happened, the document's metadata, never its bytes.
    let body: serde_json::Value = serde_json::from_slice(&flaky[2].body).unwrap();
    let (sha, size, file): (String, i64, String) = sqlx::query_as(
        "SELECT sha256, byte_size, file_name FROM report_documents WHERE request_id = $1",
    )
    .bind(ok)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(body["event"], "report.finished");
    assert_eq!(body["id"], ok);
    assert_eq!(body["state"], "succeeded");
    assert_eq!(body["document"]["sha256"], sha);
    assert_eq!(body["document"]["byte_size"], size);
    assert_eq!(body["document"]["file_name"], file);
    assert!(body["error"].is_null());
    assert!(flaky[2].body.len() < 2048, "no document bytes in a webhook");
    let failed = seen.iter().find(|r| r.path == "/fine").unwrap();
    let body: serde_json::Value = serde_json::from_slice(&failed.body).unwrap();
    assert_eq!(body["state"], "failed");
    assert_eq!(body["error_code"], 68300004);
    assert!(body["document"].is_null());

    // Operators see the deliveries given up.
    let status = report_worker::ops::status::status_text(&db.pool)
        .await
        .unwrap();
    assert!(
        status.contains("webhooks: 0 waiting to be delivered, 2 given up"),
        "{status}"
    );
    worker.stop().await;
    server.abort();
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn a_batch_is_followed_exported_with_its_manifest_and_retried() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("companies.csv");
    std::fs::write(
        &csv,
        format!(
            "company_name,credit_code,report_type,dedupe_key\n\
             小米科技有限责任公司,,pdf,k1\n\
             华为技术有限公司,,word,k2\n\
             ,{BAD_CREDIT_CODE},pdf,k3\n\
             x,,xls,k4\n\
             小米科技有限责任公司,,pdf,k1\n"
        ),
    )
    .unwrap();
    let out = bin(
        &[
            "enqueue",
            "--csv",
            "companies.csv",
            "--batch",
            "acme 2026-11",
        ],
        &db.url,
        dir.path(),
    );
    let err = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "some lines were rejected: {err}"
    );
    assert!(err.contains("line 5:"), "{err}");
    assert!(
        err.contains("inserted 3, duplicates 1, rejected 1"),
        "{err}"
    );
    assert!(err.contains("status --batch 'acme 2026-11'"), "{err}");
    // Without --batch: the file name and a timestamp, printed.
    std::fs::write(
        dir.path().join("more.csv"),
        "company_name\n比亚迪股份有限公司\n",
    )
    .unwrap();
    let out = bin(
        &["enqueue", "--csv", "more.csv", "--type", "word"],
        &db.url,
        dir.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let default_batch: String = sqlx::query_scalar(
        "SELECT batch FROM report_requests WHERE company_name = '比亚迪股份有限公司'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(default_batch.starts_with("more.csv 20"), "{default_batch}");
    assert!(err.contains(&default_batch), "{err}");

    let worker = spawn_fast_worker(&db.url, &sim).await;
    wait_all_finished(&db.pool, Duration::from_secs(20)).await;
    let out = bin(&["status", "--batch", "acme 2026-11"], &db.url, dir.path());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("3 requests, 3 finished (100.0 %)"), "{text}");
    let line = |state: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(state))
            .unwrap_or_else(|| panic!("{state} in {text}"))
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    };
    assert_eq!(line("succeeded"), "2");
    assert_eq!(line("failed"), "1");
    assert!(text.contains("1 × (68300004)"), "{text}");
    let unknown = bin(&["status", "--batch", "no such batch"], &db.url, dir.path());
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no requests in batch"));

    let out = bin(
        &["export", "--batch", "acme 2026-11", "--out", "acme"],
        &db.url,
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let export_dir = dir.path().join("acme");
    let mut manifest = csv::Reader::from_path(export_dir.join("manifest.csv")).unwrap();
    assert_eq!(
        manifest.headers().unwrap().iter().collect::<Vec<_>>(),
        [
            "id",
            "identifier",
            "report_type",
            "state",
            "file",
            "sha256",
            "error"
        ]
    );
    let rows: Vec<csv::StringRecord> = manifest.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 3, "{rows:?}");
    let mut files = 0;
    for row in &rows {
        match &row[3] {
            "succeeded" => {
                let bytes = std::fs::read(export_dir.join(&row[4])).unwrap();
                assert_eq!(hex::encode(Sha256::digest(&bytes)), &row[5]);
                assert!(row[6].is_empty());
                files += 1;
            }
            "failed" => {
                assert_eq!(&row[1], BAD_CREDIT_CODE);
                assert!(row[4].is_empty() && row[5].is_empty());
                assert!(row[6].contains("68300004"), "{row:?}");
            }
            other => panic!("unexpected state {other}"),
        }
    }
    assert_eq!(files, 2);
    let exported = std::fs::read_dir(&export_dir).unwrap().count();
    assert_eq!(
        exported, 3,
        "two documents and the manifest, nothing from other batches"
    );

    let retried: i32 = sqlx::query_scalar("SELECT report_retry_batch('acme 2026-11')")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(retried, 1);
    wait_all_finished(&db.pool, Duration::from_secs(20)).await;
    let failed_again = count(
        &db.pool,
        "SELECT count(*) FROM report_requests WHERE batch = 'acme 2026-11' AND state = 'failed'",
    )
    .await;
    assert_eq!(
        failed_again, 1,
        "the bad code fails again, and only it was retried"
    );
    worker.stop().await;
    sim.stop().await;
    db.close().await;
}

/// A login that is a member of `group`, on the test database.
async fn login(db: &TestDb, group: &str) -> (String, String) {
    let name = format!("{}_{}", group, db.name);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE \"{name}\" LOGIN IN ROLE {group}"
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let mut url = url::Url::parse(&db.url).unwrap();
    url.set_username(&name).unwrap();
    (name, url.to_string())
}

fn denied(result: Result<impl std::fmt::Debug, sqlx::Error>, what: &str) {
    match result {
        Err(sqlx::Error::Database(e)) => {
            assert_eq!(e.code().as_deref(), Some("42501"), "{what}: {e}")
        }
        other => panic!("{what} should be refused, got {other:?}"),
    }
}

#[tokio::test]
async fn the_application_and_worker_roles_can_do_their_job_and_nothing_more() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let out = bin(&["grant"], &db.url, dir.path());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (app_name, app_url) = login(&db, "report_app").await;
    let (worker_name, worker_url) = login(&db, "report_worker").await;
    let app = report_worker::queue::connect(&app_url, 2).await.unwrap();

    // The application enqueues (its own columns), reads, cancels and retries.
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO report_requests (company_name, report_type, batch, callback_url, metadata, dedupe_key)
         VALUES ('小米科技有限责任公司', 'pdf', 'b', 'https://app.example/hook', '{\"order\": 7}', 'o7')
         ON CONFLICT DO NOTHING RETURNING id",
    )
    .fetch_one(&app)
    .await
    .unwrap();
    let doomed: i64 = sqlx::query_scalar(
        "INSERT INTO report_requests (company_name, report_type, run_after) VALUES ('x', 'pdf', now() + interval '1 hour') RETURNING id",
    )
    .fetch_one(&app)
    .await
    .unwrap();
    let cancelled: bool = sqlx::query_scalar("SELECT report_cancel($1)")
        .bind(doomed)
        .fetch_one(&app)
        .await
        .unwrap();
    assert!(cancelled);
    let retried: bool = report_retry(&app, doomed).await;
    assert!(retried);
    for sql in [
        "SELECT count(*) FROM report_requests",
        "SELECT count(*) FROM report_documents",
        "SELECT count(*) FROM report_events",
        "SELECT count(*) FROM report_queue_stats",
        "SELECT count(*) FROM report_throughput",
        "SELECT count(*) FROM report_webhook_deliveries",
    ] {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&app)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    // `status` as the application: what it may read, and one line naming the rest.
    let out = bin(&["status"], &app_url, dir.path());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("state "), "{text}");
    assert!(
        text.contains("finished in the last minute/hour/day"),
        "{text}"
    );
    let hidden = text
        .lines()
        .find(|l| l.starts_with("not shown, this role may not read:"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(hidden.contains("report_account_stops"), "{text}");
    assert!(!text.contains("permission denied"), "{text}");
    // The functions that run as the owner cannot be fooled by the login's own
    // temporary objects: a temporary `_sqlx_migrations` changes nothing.
    let mut conn = app.acquire().await.unwrap();
    sqlx::raw_sql(
        "CREATE TEMP VIEW _sqlx_migrations AS SELECT 1::bigint AS version, true AS success",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    let versions: Vec<i64> = sqlx::query_scalar("SELECT report_schema_versions()")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert!(
        versions.len() > 10 && !versions.contains(&1),
        "{versions:?}"
    );
    drop(conn);
    // …and nothing of the engine's.
    denied(
        sqlx::query("INSERT INTO report_requests (company_name, report_type, state) VALUES ('x', 'pdf', 'succeeded')")
            .execute(&app)
            .await,
        "inserting a state",
    );
    for sql in [
        "UPDATE report_requests SET state = 'succeeded'",
        "UPDATE report_requests SET lease_owner = 'me', lease_expires_at = now() + interval '1 day'",
        "UPDATE report_requests SET next_poll_at = now(), attempts = 0",
        "DELETE FROM report_requests",
        "DELETE FROM report_events",
        "UPDATE report_account_pacing SET next_slot_at = now()",
        "DELETE FROM report_account_stops",
        "SELECT count(*) FROM report_account_stops",
        "SELECT count(*) FROM report_account_pacing",
        "SELECT count(*) FROM report_orphan_tasks",
        "UPDATE report_state_counts SET n = 0",
        "SELECT id FROM report_webhook_deliveries FOR UPDATE",
        "SELECT * FROM report_begin_create(1, 1, 'me', 1, 1, 1)",
        "TRUNCATE report_requests",
        "CREATE TABLE report_mine (x int)",
    ] {
        denied(
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&app).await,
            sql,
        );
    }

    // The worker's login runs the engine to the end…
    let worker = spawn_worker(
        &worker_url,
        client_config(&sim),
        fast_worker_config(&sim.config().client_id),
    )
    .await;
    wait_all_finished(&db.pool, Duration::from_secs(20)).await;
    assert_eq!(assert_documents_exact(&db.pool, &sim).await, 2);
    assert_eq!(
        report_worker::queue::delivery_counts(&db.pool)
            .await
            .unwrap()
            .pending,
        1
    );
    worker.stop().await;
    // …and cannot change the schema or the migrations' record.
    let as_worker = report_worker::queue::connect(&worker_url, 2).await.unwrap();
    for sql in [
        "DROP TABLE report_events",
        "ALTER TABLE report_requests ADD COLUMN x int",
        "CREATE TABLE report_mine (x int)",
        "SELECT count(*) FROM _sqlx_migrations",
    ] {
        denied(
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&as_worker)
                .await,
            sql,
        );
    }
    let _ = id;
    app.close().await;
    as_worker.close().await;
    for name in [app_name, worker_name] {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE \"{name}\"")))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_the_row_fields_and_no_secrets() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    let id = enqueue(&db.pool, Some("小米科技有限责任公司"), None, None, "pdf").await;
    let bad = enqueue(&db.pool, None, Some(BAD_CREDIT_CODE), None, "pdf").await;
    let secret = &sim.config().client_secret;
    let run = |format: &str| {
        Command::new(env!("CARGO_BIN_EXE_report-worker"))
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &db.url)
            .env("UPSTREAM_BASE_URL", sim.base_url())
            .env("UPSTREAM_CLIENT_ID", &sim.config().client_id)
            .env("UPSTREAM_CLIENT_SECRET", secret)
            .env("WEBHOOK_SECRET", "webhook-secret-never-logged")
            .env("UPSTREAM_QPS", "0")
            .env("REPORT_FIRST_POLL", "100ms")
            .env("REPORT_POLL_MIN", "100ms")
            .env("REPORT_POLL_MAX", "200ms")
            .env("WORKER_IDLE_POLL", "100ms")
            .env(
                "RUST_LOG",
                "debug,sqlx=warn,hyper=warn,reqwest=warn,h2=warn,rustls=warn",
            )
            .env("LOG_FORMAT", format)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let child = run("json");
    wait_all_finished(&db.pool, Duration::from_secs(20)).await;
    let log = stop(child);
    let mut stored = None;
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        // One message per line (a field named `message` would make two), and no
        // Rust debug forms for values.
        assert_eq!(line.matches("\"message\":").count(), 1, "{line}");
        assert!(!line.contains("Some(") && !line.contains("None"), "{line}");
        if v["message"] == "report stored" {
            stored = Some(v);
        }
    }
    let stored = stored.unwrap_or_else(|| panic!("no 'report stored' line in {log}"));
    assert_eq!(stored["outcome"], "succeeded");
    assert_eq!(stored["span"]["id"], id);
    let job: String =
        sqlx::query_scalar("SELECT upstream_job_id FROM report_requests WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(stored["span"]["job"], job);
    let failed = log
        .lines()
        .find(|l| l.contains("\"outcome\":\"failed\"") && l.contains(&format!("\"id\":{bad}")))
        .unwrap_or_else(|| panic!("no failed line in {log}"));
    let failed: serde_json::Value = serde_json::from_str(failed).unwrap();
    assert!(failed["code"].is_number(), "{failed}");
    assert_eq!(failed["message"], "report failed");
    // Text, the default, for the same kind of run: neither leaks a secret.
    report_retry(&db.pool, bad).await;
    let child = run("text");
    wait_all_finished(&db.pool, Duration::from_secs(20)).await;
    let text = stop(child);
    assert!(text.contains("report failed"), "{text}");
    assert!(!text.contains('\u{1b}'), "colour codes into a pipe: {text}");
    for secret in [secret.as_str(), "webhook-secret-never-logged"] {
        assert!(!log.contains(secret), "secret in JSON logs");
        assert!(!text.contains(secret), "secret in text logs");
    }
    // A fatal error is a JSON line too.
    let out = Command::new(env!("CARGO_BIN_EXE_report-worker"))
        .args(["status"])
        .env(
            "DATABASE_URL",
            "postgres://someone:hunter2@127.0.0.1:1/nowhere",
        )
        .env("LOG_FORMAT", "json")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let v: serde_json::Value = serde_json::from_str(err.trim()).unwrap();
    assert_eq!(v["level"], "ERROR");
    assert!(!err.contains("hunter2"));
    sim.stop().await;
    db.close().await;
}

/// SIGTERM, then everything the process wrote on stderr.
fn stop(child: std::process::Child) -> String {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Whether `module` imports in python3; under CI its absence is a failure.
fn python_has(module: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok && std::env::var("CI").is_ok() {
        panic!("python3 with {module} is required under CI (see .ci/run)");
    }
    ok
}

/// Runs an example application (`program script …`) against a worker and the
/// simulator: it enqueues, waits for `report_finished`, saves the document; and for a
/// report that fails, exits 1.
async fn example_application_works(program: &str, script: &str) {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    let worker = spawn_fast_worker(&db.url, &sim).await;
    let out_dir = tempfile::tempdir().unwrap();
    let script = format!("{}/examples/{script}", env!("CARGO_MANIFEST_DIR"));
    let run = |who: &[&str]| {
        let mut cmd = tokio::process::Command::new(program);
        cmd.arg(&script)
            .args(who)
            .args([
                "--type", "pdf", "--batch", "example", "--wait", "60", "--out",
            ])
            .arg(out_dir.path())
            .env("DATABASE_URL", &db.url);
        cmd.output()
    };
    let out = run(&["小米科技有限责任公司"]).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (id, sha): (i64, String) = sqlx::query_as(
        "SELECT d.request_id, d.sha256 FROM report_documents d JOIN report_requests r ON r.id = d.request_id WHERE r.batch = 'example'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let saved: Vec<_> = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert!(
        saved[0]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(&format!("{id}-"))
    );
    assert_eq!(
        hex::encode(Sha256::digest(std::fs::read(&saved[0]).unwrap())),
        sha
    );
    assert!(stdout.contains(&sha), "{stdout}");
    // A report that fails: exit status 1 with the provider's reason.
    let out = run(&["--credit-code", BAD_CREDIT_CODE]).await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("68300004"), "{err}");
    worker.stop().await;
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn the_python_example_enqueues_waits_and_saves_the_document() {
    if !python_has("psycopg") {
        eprintln!("skipping: psycopg is not installed (pip install \"psycopg[binary]\")");
        return;
    }
    example_application_works("python3", "python/wait_for_report.py").await;
}

/// The Node example, where Node and its `npm install` are there (`.ci/run` does both
/// when Node is installed; the Python example is the one CI requires).
#[tokio::test]
async fn the_node_example_enqueues_waits_and_saves_the_document() {
    let modules = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/node/node_modules/pg");
    if !std::path::Path::new(modules).exists() || !have_tool("node", &["--version"]) {
        eprintln!("skipping: run `npm install` in examples/node first");
        return;
    }
    example_application_works("node", "node/wait-for-report.mjs").await;
}

/// Deliveries the worker's webhook sender made for the rows of `db`, once settled.
async fn settled_deliveries(db: &TestDb) -> Vec<(String, String, i32, Option<String>)> {
    wait_for(
        "every delivery to settle",
        Duration::from_secs(30),
        || async {
            let open = count(
                &db.pool,
                "SELECT count(*) FROM report_webhook_deliveries WHERE state = 'pending'",
            )
            .await;
            (open == 0).then_some(())
        },
    )
    .await;
    sqlx::query_as(
        "SELECT url, state, attempts, last_error FROM report_webhook_deliveries ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn webhooks_never_reach_inside_the_network_unless_allowed() {
    const SECRET: &str = "whsec-test-0123456789abcdef";
    let receiver = Arc::new(Receiver::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = Router::new()
        .route("/{*path}", post(receive).get(receive))
        .with_state(receiver.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let sim = start_sim(SimConfig::instant()).await;
    let policy = WebhookPolicy {
        timeout: Duration::from_millis(500),
        base: Duration::from_millis(50),
        cap: Duration::from_millis(200),
        max_attempts: 4,
    };
    let run = |url: String, destinations: report_worker::webhook::Destinations| {
        let mut config = fast_worker_config(&sim.config().client_id);
        config.webhooks = Some(Webhooks {
            sender: report_worker::webhook::Sender::new(SECRET, policy.timeout, destinations)
                .unwrap(),
            policy: policy.clone(),
        });
        let client = client_config(&sim);
        async move { spawn_worker(&url, client, config).await }
    };
    let hook = |db: &TestDb, url: String| {
        let pool = db.pool.clone();
        async move {
            sqlx::query("INSERT INTO report_requests (company_name, report_type, callback_url) VALUES ('回调', 'pdf', $1)")
                .bind(url)
                .execute(&pool)
                .await
                .unwrap();
        }
    };

    // By default: loopback by address and by name, the metadata service, a private
    // range, IPv6 loopback — every one refused on its first attempt, none sent.
    let db = TestDb::new().await;
    let inside = [
        format!("http://127.0.0.1:{port}/t/PATH-SECRET?sig=QUERY-SECRET"),
        format!("http://localhost:{port}/t/PATH-SECRET?key=QUERY-SECRET"),
        "http://169.254.169.254/latest/meta-data/iam".to_string(),
        "http://10.0.0.1/hook".to_string(),
        format!("http://[::1]:{port}/hook"),
        format!("http://[::ffff:127.0.0.1]:{port}/hook"),
    ];
    for url in &inside {
        hook(&db, url.clone()).await;
    }
    let w = run(db.url.clone(), Default::default()).await;
    wait_all_finished(&db.pool, Duration::from_secs(20)).await;
    let deliveries = settled_deliveries(&db).await;
    w.stop().await;
    assert_eq!(deliveries.len(), inside.len());
    for (url, state, attempts, error) in &deliveries {
        let error = error.clone().unwrap_or_default();
        assert_eq!((state.as_str(), *attempts), ("failed", 1), "{url}: {error}");
        assert!(
            error.starts_with("refused:") && error.contains("WEBHOOK_ALLOW_PRIVATE"),
            "{url}: {error}"
        );
        assert!(
            !error.contains("SECRET"),
            "the path or query in a message: {error}"
        );
        // A name's resolved address stays in the worker's log: report_app reads this.
        if url.contains("localhost") {
            assert!(
                !error.contains("127.0.0.1") && !error.contains("::1"),
                "{error}"
            );
        }
    }
    assert!(
        receiver.seen.lock().unwrap().is_empty(),
        "nothing reached the receiver"
    );
    db.close().await;

    // Allowed by name: that host is delivered to, the others still are not.
    let db = TestDb::new().await;
    hook(&db, format!("http://localhost:{port}/allowed")).await;
    hook(&db, format!("http://127.0.0.1:{port}/not-allowed")).await;
    let allowed = report_worker::webhook::Destinations {
        allow_hosts: vec!["localhost".into()],
        ..Default::default()
    };
    let w = run(db.url.clone(), allowed).await;
    wait_all_finished(&db.pool, Duration::from_secs(20)).await;
    let deliveries = settled_deliveries(&db).await;
    w.stop().await;
    let state_of = |path: &str| {
        deliveries
            .iter()
            .find(|d| d.0.ends_with(path))
            .map(|d| d.1.clone())
    };
    assert_eq!(
        state_of("/allowed").as_deref(),
        Some("delivered"),
        "{deliveries:?}"
    );
    assert_eq!(
        state_of("/not-allowed").as_deref(),
        Some("failed"),
        "{deliveries:?}"
    );
    let seen: Vec<String> = receiver
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(seen, ["/allowed"]);
    server.abort();
    sim.stop().await;
    db.close().await;
}
