//! Robustness at the edges: one bad task never stops the account, nothing loops
//! forever, hostile answers are contained.

use std::time::Duration;

use crate::common::*;
use report_worker::simulator::{Endpoint, Fault, SimConfig};

#[tokio::test]
async fn a_bare_404_about_one_task_costs_that_task_not_the_account() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    sim.inject(injection(Endpoint::Status, Fault::Http { status: 404 }, 1));
    let first = enqueue_with_attempts(&db.pool, "未知任务", 3).await;
    let w = spawn_fast_worker(&db.url, &sim).await;
    let (state, attempts, _) = wait_final(&db.pool, first, Duration::from_secs(30)).await;
    assert_eq!(
        (state.as_str(), attempts),
        ("succeeded", 2),
        "a new task, as an attempt"
    );
    assert_eq!(
        tasks_for(&sim, "未知任务"),
        2,
        "the provider made both tasks"
    );
    // Healthy rows inserted after it are not held up by any stop.
    for i in 0..4 {
        enqueue(&db.pool, Some(&format!("健康{i}")), None, None, "pdf").await;
    }
    wait_all_finished(&db.pool, Duration::from_secs(20)).await;
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM report_requests WHERE state = 'succeeded'"
        )
        .await,
        5
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM report_account_stops").await,
        0
    );
    let lost: String = sqlx::query_scalar(
        "SELECT error FROM report_events WHERE request_id = $1 AND error_code = 404",
    )
    .bind(first)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(lost.contains("does not know this task"), "{lost}");
    w.stop().await;
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn bare_404s_for_several_tasks_stop_the_account_and_say_which_row() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    sim.inject(injection(
        Endpoint::Status,
        Fault::Http { status: 404 },
        1000,
    ));
    for i in 0..4 {
        enqueue_with_attempts(&db.pool, &format!("路径错{i}"), 5).await;
    }
    let mut config = fast_worker_config(&sim.config().client_id);
    config.concurrency = 1;
    let w = spawn_worker(&db.url, client_config(&sim), config).await;
    let (scope, code, request_id, endpoint, answer): (
        String,
        Option<i32>,
        Option<i64>,
        Option<String>,
        Option<String>,
    ) = wait_for("the account stop", Duration::from_secs(20), || async {
        sqlx::query_as(
            "SELECT scope, error_code, request_id, endpoint, answer FROM report_account_stops",
        )
        .fetch_optional(&db.pool)
        .await
        .unwrap()
    })
    .await;
    assert_eq!(
        (scope.as_str(), code, endpoint.as_deref()),
        ("all", Some(404), Some("status"))
    );
    assert!(request_id.is_some());
    assert!(answer.unwrap_or_default().contains("404"));
    let status = report_worker::ops::status::status_text(&db.pool)
        .await
        .unwrap();
    assert!(status.contains("row") && status.contains("404"), "{status}");
    // The provider answers again: the stop lifts and every row finishes.
    sim.clear_injections();
    wait_all_finished(&db.pool, Duration::from_secs(30)).await;
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM report_requests WHERE state = 'succeeded'"
        )
        .await,
        4
    );
    w.stop().await;
    sim.stop().await;
    db.close().await;
}

/// A task whose document never verifies is given up after a few downloads; when
/// attempts are spent the row fails with the reason.
async fn a_document_that_never_verifies_is_not_downloaded_forever(
    fault: Fault,
    kind: &str,
    reason: &str,
) {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    sim.inject(injection(Endpoint::Download, fault.clone(), 1000));
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO report_requests (company_name, report_type, max_attempts) VALUES ('坏文档', $1, 2) RETURNING id",
    )
    .bind(kind)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let mut config = fast_worker_config(&sim.config().client_id);
    config.download_tries = 2;
    let w = spawn_worker(&db.url, client_config(&sim), config).await;
    let (state, attempts, error) = wait_final(&db.pool, id, Duration::from_secs(30)).await;
    let error = error.unwrap_or_default();
    assert_eq!((state.as_str(), attempts), ("failed", 2), "{error}");
    assert!(error.contains(reason), "{fault:?}: {error}");
    let stats = sim.stats();
    let served = stats.calls_to("download");
    assert_eq!(
        served, 4,
        "two downloads per task, two tasks: {:?}",
        stats.calls
    );
    assert_eq!(tasks_for(&sim, "坏文档"), 2);
    w.stop().await;
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn an_invalid_docx_is_given_up_not_downloaded_forever() {
    a_document_that_never_verifies_is_not_downloaded_forever(Fault::BadDocx, "word", "not a DOCX")
        .await;
}

#[tokio::test]
async fn an_html_page_every_time_is_given_up_not_downloaded_forever() {
    a_document_that_never_verifies_is_not_downloaded_forever(Fault::Html, "pdf", "not a PDF").await;
}

#[tokio::test]
async fn a_trickling_download_meets_its_deadline() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig {
        doc_size: 40_000,
        ..SimConfig::instant()
    })
    .await;
    sim.inject(injection(
        Endpoint::Download,
        Fault::Drip {
            bytes_per_sec: 2_000,
        },
        1000,
    ));
    let id = enqueue_with_attempts(&db.pool, "慢吞吞", 1).await;
    let mut client = client_config(&sim);
    client.download_timeout = Duration::from_millis(700);
    let mut config = fast_worker_config(&sim.config().client_id);
    config.download_tries = 2;
    let w = spawn_worker(&db.url, client, config).await;
    let (state, _, error) = wait_final(&db.pool, id, Duration::from_secs(30)).await;
    let error = error.unwrap_or_default();
    assert_eq!(state, "failed");
    assert!(error.contains("did not finish within 700ms"), "{error}");
    w.stop().await;
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn redirects_to_another_host_are_refused_unless_allowed() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    sim.inject(injection(
        Endpoint::Download,
        Fault::RedirectToHost {
            host: "localhost".into(),
        },
        2,
    ));
    let refused = enqueue_with_attempts(&db.pool, "跳转", 1).await;
    let mut config = fast_worker_config(&sim.config().client_id);
    config.download_tries = 2;
    let w = spawn_worker(&db.url, client_config(&sim), config.clone()).await;
    let (state, _, error) = wait_final(&db.pool, refused, Duration::from_secs(30)).await;
    let error = error.unwrap_or_default();
    assert_eq!(state, "failed");
    assert!(error.contains("not allowed"), "{error}");
    assert_eq!(
        sim.stats().calls("download:ok"),
        0,
        "the redirect was never followed"
    );
    w.stop().await;
    // Allowed by UPSTREAM_DOWNLOAD_HOSTS: followed.
    sim.inject(injection(
        Endpoint::Download,
        Fault::RedirectToHost {
            host: "localhost".into(),
        },
        1,
    ));
    let allowed = enqueue_with_attempts(&db.pool, "允许跳转", 1).await;
    let mut client = client_config(&sim);
    client.download_hosts = vec!["127.0.0.1".into(), "localhost".into()];
    let w = spawn_worker(&db.url, client, config).await;
    assert_eq!(
        wait_final(&db.pool, allowed, Duration::from_secs(30))
            .await
            .0,
        "succeeded"
    );
    assert_eq!(sim.stats().calls("download:redirect"), 3);
    w.stop().await;
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn documents_wait_for_the_memory_budget_and_all_arrive() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig {
        doc_size: 60_000,
        ..SimConfig::instant()
    })
    .await;
    for i in 0..12 {
        enqueue(&db.pool, Some(&format!("内存{i}")), None, None, "pdf").await;
    }
    let mut client = client_config(&sim);
    // Room for about two documents at a time among eight calls in flight.
    client.download_memory = 150_000;
    client.max_download_bytes = 150_000;
    let w = spawn_worker(&db.url, client, fast_worker_config(&sim.config().client_id)).await;
    wait_all_finished(&db.pool, Duration::from_secs(30)).await;
    assert_eq!(assert_documents_exact(&db.pool, &sim).await, 12);
    w.stop().await;
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn file_names_with_format_and_separator_characters_are_stored_safely() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    // Company names may hold these (the DB's C.UTF-8 `[[:cntrl:]]` does not match
    // them); the simulator puts the company into the document's file name.
    let names = [
        "行\u{2028}分隔",
        "段\u{2029}分隔",
        "反\u{202e}向",
        "零\u{200d}宽",
        "字\u{feff}节",
    ];
    for n in names {
        enqueue(&db.pool, Some(n), None, None, "pdf").await;
    }
    let w = spawn_fast_worker(&db.url, &sim).await;
    wait_all_finished(&db.pool, Duration::from_secs(20)).await;
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM report_requests WHERE state = 'succeeded'"
        )
        .await,
        names.len() as i64
    );
    let stored: Vec<String> = sqlx::query_scalar("SELECT file_name FROM report_documents")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(stored.len(), names.len());
    for f in stored {
        assert!(
            !f.chars()
                .any(report_worker::upstream::document::is_unsafe_in_file_name),
            "{f:?}"
        );
    }
    w.stop().await;
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn a_document_the_database_refuses_fails_the_row_instead_of_being_redone() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig {
        doc_size: 20_000,
        ..SimConfig::instant()
    })
    .await;
    // A rule of this deployment the worker knows nothing about.
    sqlx::query("ALTER TABLE report_documents ADD CONSTRAINT local_documents_small CHECK (byte_size < 1000)")
        .execute(&db.pool)
        .await
        .unwrap();
    let id = enqueue_with_attempts(&db.pool, "太大", 3).await;
    let w = spawn_fast_worker(&db.url, &sim).await;
    let (state, _, error) = wait_final(&db.pool, id, Duration::from_secs(30)).await;
    let error = error.unwrap_or_default();
    assert_eq!(state, "failed");
    assert!(error.contains("local_documents_small"), "{error}");
    assert_eq!(sim.stats().calls_to("download"), 1, "not redone");
    w.stop().await;
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn a_daily_limit_met_just_after_midnight_is_a_lagging_clock_not_a_whole_day() {
    let db = TestDb::new().await;
    let now = chrono::Utc::now();
    let midnight = report_worker::upstream::next_shanghai_midnight(now);
    // The provider stands 8 s before its midnight; the worker's clock is 10 s ahead of
    // it (2 s after midnight): the provider's clock lags.
    let provider = (midnight - chrono::Duration::seconds(8)) - now;
    let sim = start_sim(SimConfig {
        daily_limit: Some(3),
        clock_offset_secs: provider.num_seconds(),
        ..SimConfig::instant()
    })
    .await;
    let mut client = client_config(&sim);
    client.clock = report_worker::domain::Clock::shifted(provider + chrono::Duration::seconds(10));
    let w = spawn_worker(&db.url, client, fast_worker_config(&sim.config().client_id)).await;
    wait_for("the worker to listen", Duration::from_secs(10), || async {
        let n = count(&db.pool, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' AND datname = current_database()").await;
        (n > 0).then_some(())
    })
    .await;
    // Today's three calls are spent.
    let spender = report_worker::upstream::Client::new(client_config(&sim)).unwrap();
    let t = report_worker::upstream::client::CreateTask {
        company_name: Some("昨天".into()),
        report_type: Some(report_worker::domain::ReportType::Pdf),
        ..Default::default()
    };
    for _ in 0..3 {
        create(&spender, &t).await.unwrap();
    }
    let id = enqueue_with_attempts(&db.pool, "午夜", 3).await;
    let until: Option<chrono::DateTime<chrono::Utc>> =
        wait_for("the daily-limit stop", Duration::from_secs(10), || async {
            sqlx::query_scalar::<_, Option<chrono::DateTime<chrono::Utc>>>(
                "SELECT until FROM report_account_stops WHERE error_code = 67200007",
            )
            .fetch_optional(&db.pool)
            .await
            .unwrap()
        })
        .await;
    assert_eq!(until, None, "no whole day implied");
    // The provider's day turns a few seconds later; the short probe finds it.
    let (state, _, _) = wait_final(&db.pool, id, Duration::from_secs(30)).await;
    assert_eq!(state, "succeeded");
    // Refused only by the short probes until the provider's day turned (about 8 s).
    let refused = sim.stats().calls("create:67200007");
    assert!((1..=8).contains(&refused), "{refused} refused creates");
    w.stop().await;
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn an_http_429_moves_the_shared_call_schedule_back() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig {
        generation_time: (Duration::from_secs(60), Duration::from_secs(60)),
        ..SimConfig::instant()
    })
    .await;
    let mut config = fast_worker_config(&sim.config().client_id);
    config.qps = 50.0;
    let w = spawn_worker(&db.url, client_config(&sim), config).await;
    enqueue(&db.pool, Some("限流"), None, None, "pdf").await;
    wait_for("generating", Duration::from_secs(10), || async {
        (count(
            &db.pool,
            "SELECT count(*) FROM report_requests WHERE state = 'generating'",
        )
        .await
            == 1)
            .then_some(())
    })
    .await;
    sim.inject(injection(Endpoint::Status, Fault::Http { status: 429 }, 10));
    wait_for(
        "the schedule pushed back",
        Duration::from_secs(10),
        || async {
            let ahead: f64 = sqlx::query_scalar(
            "SELECT extract(epoch FROM next_slot_at - now())::float8 FROM report_account_pacing",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
            (ahead > 0.5).then_some(())
        },
    )
    .await;
    w.stop().await;
    sim.stop().await;
    db.close().await;
}
