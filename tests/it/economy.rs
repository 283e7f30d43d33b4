//! Spending less: learned polling end to end (observations written with each
//! completion, schedules read back by the worker).

use std::time::Duration;

use crate::common::*;
use report_worker::simulator::{Endpoint, Fault, Injection, SimConfig};

#[tokio::test]
async fn every_completion_leaves_an_observed_generation_time_when_learning() {
    let db = TestDb::new().await;
    // Long enough that the first polls find tasks still queued (the first 30 %: 0.45 to
    // 0.6 s), even on a loaded machine.
    let sim = start_sim(SimConfig {
        generation_time: (Duration::from_millis(1500), Duration::from_millis(2000)),
        ..SimConfig::instant()
    })
    .await;
    for i in 0..6 {
        enqueue(
            &db.pool,
            Some(&format!("观测{i}")),
            None,
            None,
            if i % 2 == 0 { "pdf" } else { "word" },
        )
        .await;
    }
    // Learned polling on (a real window); with fewer than 50 observations the fast
    // fixed schedule still decides when to poll.
    let mut config = fast_worker_config(&sim.config().client_id);
    config.poll.window = Duration::from_secs(600);
    config.detection_target = Some(Duration::from_secs(15));
    let w = spawn_worker(&db.url, client_config(&sim), config).await;
    wait_all_finished(&db.pool, Duration::from_secs(60)).await;
    w.stop().await;
    let rows: Vec<(String, f32, f32)> = sqlx::query_as(
        "SELECT report_type, lower_secs, upper_secs FROM report_generation_times ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 6, "{rows:?}");
    assert_eq!(rows.iter().filter(|r| r.0 == "pdf").count(), 3);
    for (_, lower, upper) in &rows {
        // Ready after at least the simulator's 1.5 s, noticed within the fast polls. The
        // worker's clock for a task starts when its job id is recorded, a moment after
        // the simulator made it (the create's answer, the batched write): up to 0.3 s
        // later on a loaded machine, so "ready" can read a little under 1.5 s.
        assert!(*upper >= 1.2 && *upper < 15.0, "{rows:?}");
        assert!(lower <= upper, "{rows:?}");
    }
    // Tasks polled more than once know when they were last not ready.
    assert!(rows.iter().any(|r| r.1 > 0.0), "{rows:?}");
    // The simulator keeps a task queued for its first 30 % (0.45–0.6 s here): tasks
    // polled while queued keep their last "queued" answer and its queue_num, before
    // their last "not ready".
    let queued: Vec<(f32, Option<f32>, Option<i32>)> = sqlx::query_as(
        "SELECT lower_secs, waiting_secs, queue_num FROM report_generation_times ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(queued.iter().any(|q| q.1.is_some()), "{queued:?}");
    for (lower, waiting, queue_num) in &queued {
        assert_eq!(waiting.is_some(), queue_num.is_some(), "{queued:?}");
        if let (Some(at), Some(q)) = (waiting, queue_num) {
            assert!(*at <= *lower + 1e-3 && *at < 5.0 && *q >= 0, "{queued:?}");
        }
    }
    sim.stop().await;
    db.close().await;
}

/// The first poll of a task, once generating, in seconds after its create.
async fn first_poll_of(pool: &report_worker::queue::Db, id: i64) -> Option<f64> {
    sqlx::query_scalar::<_, Option<f64>>(
        "SELECT extract(epoch FROM next_poll_at - upstream_created_at)::float8
           FROM report_requests WHERE id = $1 AND state = 'generating'",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
    .unwrap()
    .flatten()
}

/// First polls of one PDF and one Word task after `history` (SQL inserting observed
/// generation times), with learned polling at 15 s.
async fn first_polls_after(history: &str) -> (f64, f64) {
    let db = TestDb::new().await;
    sqlx::query(sqlx::AssertSqlSafe(history.to_string()))
        .execute(&db.pool)
        .await
        .unwrap();
    let sim = start_sim(SimConfig {
        generation_time: (Duration::from_secs(300), Duration::from_secs(300)),
        ..SimConfig::instant()
    })
    .await;
    let pdf = enqueue(&db.pool, Some("学到的"), None, None, "pdf").await;
    let word = enqueue(&db.pool, Some("另一种"), None, None, "word").await;
    let mut config = fast_worker_config(&sim.config().client_id);
    config.poll.window = Duration::from_secs(600);
    config.poll.first_poll = Duration::from_secs(60);
    config.detection_target = Some(Duration::from_secs(15));
    let w = spawn_worker(&db.url, client_config(&sim), config).await;
    let pdf = wait_for("the PDF task", Duration::from_secs(20), || {
        first_poll_of(&db.pool, pdf)
    })
    .await;
    let word = wait_for("the Word task", Duration::from_secs(20), || {
        first_poll_of(&db.pool, word)
    })
    .await;
    w.stop().await;
    sim.stop().await;
    db.close().await;
    (pdf, word)
}

#[tokio::test]
async fn with_enough_history_the_first_poll_follows_the_learned_schedule() {
    // Sixty PDF tasks that took about three minutes; no Word history at all.
    let (pdf, word) = first_polls_after(
        "INSERT INTO report_generation_times (report_type, lower_secs, upper_secs)
         SELECT 'pdf', 170 + (i % 7), 180 + (i % 7) FROM generate_series(1, 60) i",
    )
    .await;
    // Nothing was seen ready before 180 s: the first poll comes just before, not at 60 s.
    assert!(
        (150.0..=180.0).contains(&pdf),
        "learned first poll at {pdf} s"
    );
    // A type with too little history of its own starts from every type's together.
    assert!(
        (150.0..=180.0).contains(&word),
        "Word, learned from the PDF history: first poll at {word} s"
    );
    // Too little history of any type: the fixed schedule.
    let (pdf, word) = first_polls_after(
        "INSERT INTO report_generation_times (report_type, lower_secs, upper_secs)
         SELECT CASE WHEN i % 2 = 0 THEN 'pdf' ELSE 'word' END, 170, 180 FROM generate_series(1, 40) i",
    )
    .await;
    assert!((pdf - 60.0).abs() < 1.0, "fixed first poll at {pdf} s");
    assert!((word - 60.0).abs() < 1.0, "fixed first poll at {word} s");
}

#[tokio::test]
async fn a_type_with_enough_history_of_its_own_goes_by_it() {
    // Sixty PDF tasks of about three minutes, sixty Word tasks of about five.
    let (pdf, word) = first_polls_after(
        "INSERT INTO report_generation_times (report_type, lower_secs, upper_secs)
         SELECT CASE WHEN i <= 60 THEN 'pdf' ELSE 'word' END,
                CASE WHEN i <= 60 THEN 170 ELSE 290 END + (i % 7),
                CASE WHEN i <= 60 THEN 180 ELSE 300 END + (i % 7)
           FROM generate_series(1, 120) i",
    )
    .await;
    assert!((150.0..=180.0).contains(&pdf), "PDF first poll at {pdf} s");
    assert!(
        (270.0..=300.0).contains(&word),
        "Word first poll at {word} s"
    );
}

#[tokio::test]
async fn the_ledger_matches_the_simulators_own_counts_after_a_run_with_faults() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig {
        fault_rate: 0.15,
        qps: Some(20),
        seed: Some(11),
        generation_time: (Duration::from_millis(100), Duration::from_millis(300)),
        ..SimConfig::instant()
    })
    .await;
    for i in 0..24 {
        enqueue(&db.pool, Some(&format!("账本{i}")), None, None, "pdf").await;
    }
    enqueue(&db.pool, None, Some("91110108551385083Q"), None, "pdf").await;
    let mut config = fast_worker_config(&sim.config().client_id);
    config.qps = 30.0; // above the simulator's 20: some calls are answered "too fast"
    let w = spawn_worker(&db.url, client_config(&sim), config).await;
    wait_all_finished(&db.pool, Duration::from_secs(90)).await;
    w.stop().await; // its last counts are written as it stops
    let (paid, unknown, documents, rate_limited, calls, by): (
        i64,
        i64,
        i64,
        i64,
        i64,
        serde_json::Value,
    ) = sqlx::query_as(
        "SELECT paid_tasks, unknown_creates, documents, rate_limited, calls, calls_by_outcome
               FROM report_ledger WHERE day = (now() AT TIME ZONE 'Asia/Shanghai')::date",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let stats = sim.stats();
    let succeeded = count(
        &db.pool,
        "SELECT count(*) FROM report_requests WHERE state = 'succeeded'",
    )
    .await;
    assert_eq!(documents, succeeded, "{by}");
    // Every task the simulator made was either answered (paid) or not (unknown).
    assert!(paid as u64 <= stats.tasks_created, "{by} vs {stats:?}");
    assert!(
        stats.tasks_created <= (paid + unknown) as u64,
        "{by} vs {stats:?}"
    );
    let status: i64 = by
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("status:"))
        .map(|(_, v)| v.as_i64().unwrap())
        .sum();
    assert_eq!(status as u64, stats.calls_to("status"), "{by} vs {stats:?}");
    assert_eq!(
        rate_limited as u64,
        stats.calls("create:67200002") + stats.calls("status:67200002"),
        "{by} vs {stats:?}"
    );
    assert_eq!(
        calls,
        by.as_object()
            .unwrap()
            .values()
            .map(|v| v.as_i64().unwrap())
            .sum::<i64>()
    );
    // status prints today's line.
    let text = report_worker::ops::status::status_text(&db.pool)
        .await
        .unwrap();
    assert!(
        text.contains(&format!("today (Asia/Shanghai): {paid} paid tasks")),
        "{text}"
    );
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn the_daily_limit_keeps_headroom_for_retries_then_stops_creating() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    // Six new rows; a limit of 5 with 2 kept for retries: 3 new rows get a task.
    for i in 0..6 {
        enqueue(&db.pool, Some(&format!("新{i}")), None, None, "pdf").await;
    }
    let mut config = fast_worker_config(&sim.config().client_id);
    config.daily_limit = Some(report_worker::engine::DailyLimit {
        limit: 5,
        headroom: 2,
    });
    let w = spawn_worker(&db.url, client_config(&sim), config.clone()).await;
    wait_for("three created and three waiting", Duration::from_secs(30), || async {
        let done = count(&db.pool, "SELECT count(*) FROM report_requests WHERE state = 'succeeded'").await;
        let waiting = count(
            &db.pool,
            "SELECT count(*) FROM report_requests WHERE state = 'queued' AND run_after > now() + interval '1 minute'
                AND last_error LIKE 'waiting for tomorrow''s quota%'",
        )
        .await;
        (done == 3 && waiting == 3).then_some(())
    })
    .await;
    assert_eq!(sim.stats().tasks_created, 3);
    // Rows already paid for (a retry) may use the headroom, and then the quota is spent.
    let mut retries = Vec::new();
    for i in 0..3 {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO report_requests (company_name, report_type, attempts) VALUES ($1, 'pdf', 1) RETURNING id",
        )
        .bind(format!("重试{i}"))
        .fetch_one(&db.pool)
        .await
        .unwrap();
        retries.push(id);
    }
    let reason: String = wait_for("the account stop", Duration::from_secs(30), || async {
        sqlx::query_scalar("SELECT reason FROM report_account_stops WHERE scope = 'create'")
            .fetch_optional(&db.pool)
            .await
            .unwrap()
    })
    .await;
    w.stop().await;
    assert!(
        reason.contains("UPSTREAM_DAILY_LIMIT reached: 5 of 5"),
        "{reason}"
    );
    assert_eq!(sim.stats().tasks_created, 5, "never past the limit");
    let until_midnight: bool = sqlx::query_scalar(
        "SELECT until > now() AND (until AT TIME ZONE 'Asia/Shanghai')::time BETWEEN '00:00' AND '00:10'
           FROM report_account_stops",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        until_midnight,
        "the stop ends just after the provider's midnight"
    );
    let used: i64 = sqlx::query_scalar("SELECT used FROM report_daily_creates")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(used, 5);
    sim.stop().await;
    db.close().await;
}

async fn insert_row(
    db: &TestDb,
    company: Option<&str>,
    code: Option<&str>,
    reuse: Option<&str>,
) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO report_requests (company_name, credit_code, report_type, reuse_within)
         VALUES ($1, $2, 'pdf', $3::interval) RETURNING id",
    )
    .bind(company)
    .bind(code)
    .bind(reuse)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

async fn state(db: &TestDb, id: i64) -> String {
    row_state(&db.pool, id).await.0
}

#[tokio::test]
async fn a_stored_document_serves_the_same_company_and_type_again_without_a_call() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    let mut config = fast_worker_config(&sim.config().client_id);
    config.reuse_within = Some(Duration::from_secs(7 * 24 * 3600));
    let w = spawn_worker(&db.url, client_config(&sim), config).await;
    let first = insert_row(&db, Some("小米科技有限责任公司"), None, None).await;
    wait_all_finished(&db.pool, Duration::from_secs(30)).await;
    assert_eq!(sim.stats().tasks_created, 1);

    // The same company and type twice more: served from the first document.
    let again = insert_row(&db, Some("小米科技有限责任公司"), None, None).await;
    let third = insert_row(&db, Some("小米科技有限责任公司"), None, None).await;
    // Another identifier for the same company is never merged on a guess; a row that
    // opts out creates too.
    let by_code = insert_row(&db, None, Some("91110108551385082Q"), None).await;
    let opted_out = insert_row(&db, Some("小米科技有限责任公司"), None, Some("0")).await;
    wait_all_finished(&db.pool, Duration::from_secs(30)).await;
    w.stop().await;
    for id in [again, third, by_code, opted_out] {
        assert_eq!(state(&db, id).await, "succeeded");
    }
    assert_eq!(
        sim.stats().tasks_created,
        3,
        "one paid task for the first three rows"
    );
    let shas: Vec<(i64, String, bool)> = sqlx::query_as(
        "SELECT request_id, sha256, encode(sha256(content), 'hex') = sha256 FROM report_documents
          WHERE request_id = ANY($1) ORDER BY request_id",
    )
    .bind(vec![first, again, third])
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(shas.len(), 3, "three documents");
    assert!(
        shas.iter().all(|(_, sha, ok)| *ok && *sha == shas[0].1),
        "{shas:?}"
    );
    let (action, actor): (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT action, actor FROM report_events WHERE request_id = $1 AND state = 'succeeded'",
    )
    .bind(again)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(action.as_deref(), Some("reuse"));
    assert_eq!(
        actor,
        Some(format!("worker: the document of request {first}"))
    );
    let (hits, calls): (i64, i64) = sqlx::query_as(
        "SELECT reuse_hits, calls FROM report_ledger WHERE day = (now() AT TIME ZONE 'Asia/Shanghai')::date",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(hits, 2);
    let stats = sim.stats();
    assert_eq!(
        calls as u64,
        stats.calls_to("create") + stats.calls_to("status") + stats.calls_to("download"),
        "reuse is not a provider call"
    );
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn a_document_older_than_the_window_is_not_reused() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    // Reuse off for the deployment; the rows opt in for a day each.
    let w = spawn_fast_worker(&db.url, &sim).await;
    let old = insert_row(&db, Some("华为技术有限公司"), None, Some("1 day")).await;
    wait_all_finished(&db.pool, Duration::from_secs(30)).await;
    sqlx::query(
        "UPDATE report_documents SET downloaded_at = now() - interval '2 days' WHERE request_id = $1",
    )
        .bind(old)
        .execute(&db.pool)
        .await
        .unwrap();
    let late = insert_row(&db, Some("华为技术有限公司"), None, Some("1 day")).await;
    wait_all_finished(&db.pool, Duration::from_secs(30)).await;
    assert_eq!(sim.stats().tasks_created, 2, "past the window: a new task");
    let reused = insert_row(&db, Some("华为技术有限公司"), None, Some("1 day")).await;
    wait_all_finished(&db.pool, Duration::from_secs(30)).await;
    w.stop().await;
    assert_eq!(
        sim.stats().tasks_created,
        2,
        "within a row's own window: reused"
    );
    let source: Option<String> = sqlx::query_scalar(
        "SELECT actor FROM report_events WHERE request_id = $1 AND action = 'reuse'",
    )
    .bind(reused)
    .fetch_optional(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        source,
        Some(format!("worker: the document of request {late}"))
    );
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn with_learned_polling_off_nothing_is_observed() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    enqueue(&db.pool, Some("不学"), None, None, "pdf").await;
    let w = spawn_fast_worker(&db.url, &sim).await;
    wait_all_finished(&db.pool, Duration::from_secs(30)).await;
    w.stop().await;
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM report_generation_times").await,
        0
    );
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn rows_asked_for_together_share_one_paid_task() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig {
        generation_time: (Duration::from_millis(500), Duration::from_millis(800)),
        ..SimConfig::instant()
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(insert_row(&db, Some("比亚迪股份有限公司"), None, None).await);
    }
    // A different type is a different report: its own task.
    let word: i64 = sqlx::query_scalar(
        "INSERT INTO report_requests (company_name, report_type) VALUES ('比亚迪股份有限公司', 'word') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let mut config = fast_worker_config(&sim.config().client_id);
    config.reuse_within = Some(Duration::from_secs(7 * 24 * 3600));
    let w = spawn_worker(&db.url, client_config(&sim), config).await;
    wait_all_finished(&db.pool, Duration::from_secs(30)).await;
    w.stop().await;
    for id in ids.iter().chain([&word]) {
        assert_eq!(state(&db, *id).await, "succeeded");
    }
    assert_eq!(
        sim.stats().tasks_created,
        2,
        "one paid task per company and type"
    );
    let docs = count(&db.pool, "SELECT count(*) FROM report_documents").await;
    assert_eq!(docs, 4);
    let reused: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM report_events WHERE request_id = ANY($1) AND action = 'reuse'",
    )
    .bind(&ids[1..])
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(reused, 2, "the later two reused the first one's document");
    sim.stop().await;
    db.close().await;
}

async fn insert_by(db: &TestDb, column: &str, value: &str, kind: &str) -> i64 {
    let sql =
        format!("INSERT INTO report_requests ({column}, report_type) VALUES ($1, $2) RETURNING id");
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(value)
        .bind(kind)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn confidence(db: &TestDb, kind: &str, value: &str) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT company_name, confidence FROM report_identity_links
          WHERE kind = $1 AND value = $2 ORDER BY company_name",
    )
    .bind(kind)
    .bind(value)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn identifiers_the_providers_file_names_confirm_as_one_company_share_documents() {
    const NAME: &str = "小米科技有限责任公司";
    const CODE: &str = "91110108551385082Q";
    const ORG: &str = "5513850T82";
    let db = TestDb::new().await;
    // Reports take over a second: rows inserted together are open together.
    let sim = start_sim(SimConfig {
        generation_time: (Duration::from_millis(1000), Duration::from_millis(1200)),
        ..SimConfig::instant()
    })
    .await;
    let mut config = fast_worker_config(&sim.config().client_id);
    config.reuse_within = Some(Duration::from_secs(7 * 24 * 3600));
    let w = spawn_worker(&db.url, client_config(&sim), config).await;
    let finished = |n: u64| {
        let sim = &sim;
        let pool = &db.pool;
        async move {
            wait_all_finished(pool, Duration::from_secs(30)).await;
            // Each row's history, to say why when the count is off.
            let history: Vec<(i64, String, Option<String>)> =
                sqlx::query_as("SELECT request_id, state, error FROM report_events ORDER BY id")
                    .fetch_all(pool)
                    .await
                    .unwrap();
            assert_eq!(sim.stats().tasks_created, n, "{history:#?}");
        }
    };

    // By credit code first: the provider names the report after 小米, but its name has
    // not come back under itself yet — a link, not a certainty.
    insert_by(&db, "credit_code", CODE, "pdf").await;
    finished(1).await;
    assert_eq!(
        confidence(&db, "credit_code", CODE).await,
        [(NAME.to_string(), "unconfirmed".to_string())]
    );
    // So the name's PDF is bought, not guessed from the credit code's.
    insert_by(&db, "company_name", NAME, "pdf").await;
    finished(2).await;
    assert_eq!(
        confidence(&db, "credit_code", CODE).await,
        [(NAME.to_string(), "confirmed".to_string())]
    );
    // An organization code nothing is known of yet: bought too.
    insert_by(&db, "org_number", ORG, "pdf").await;
    finished(3).await;

    // The Word report by name and by credit code, asked for together: one paid task
    // (the credit-code row waits for the name row's, then is served from its document,
    // its event saying why).
    let word = insert_by(&db, "company_name", NAME, "word").await;
    let by_code = insert_by(&db, "credit_code", CODE, "word").await;
    finished(4).await;
    // The organization code has once come back as another company too: conflicting,
    // never merged, its Word report is bought.
    sqlx::query(
        "INSERT INTO report_identities (kind, value, company_name, last_request)
         VALUES ('org_number', $1, '另一家公司', 0)",
    )
    .bind(ORG)
    .execute(&db.pool)
    .await
    .unwrap();
    let by_org = insert_by(&db, "org_number", ORG, "word").await;
    finished(5).await;
    w.stop().await;
    assert_eq!(
        confidence(&db, "org_number", ORG).await,
        [
            ("另一家公司".to_string(), "conflicting".to_string()),
            (NAME.to_string(), "conflicting".to_string())
        ]
    );
    let events: Vec<(i64, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT request_id, action, actor FROM report_events
          WHERE request_id = ANY($1) AND state = 'succeeded' ORDER BY request_id",
    )
    .bind(vec![by_code, by_org])
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(events[1].1, None, "the conflicting org code bought its own");
    assert_eq!(events[0].1.as_deref(), Some("reuse"));
    let actor = events[0].2.clone().unwrap();
    assert!(
        actor.starts_with(&format!("worker: the document of request {word} ("))
            && actor.contains(&format!(
                "credit code {CODE} is {NAME} (confirmed, seen 1 time)"
            )),
        "{actor}"
    );
    let same: (String, String) = sqlx::query_as(
        "SELECT a.sha256, b.sha256 FROM report_documents a, report_documents b
          WHERE a.request_id = $1 AND b.request_id = $2",
    )
    .bind(word)
    .bind(by_code)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(same.0, same.1, "the same bytes");
    // A reuse copy teaches nothing (it would only repeat what made it).
    let seen: i32 = sqlx::query_scalar(
        "SELECT observations FROM report_identities WHERE kind = 'credit_code' AND value = $1",
    )
    .bind(CODE)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(seen, 1);
    // The company is read up to the file name's one '_'; with several it is not known
    // which ends the company (a sanitised character, another naming): nothing is read.
    let read: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT report_company_in_file_name(f) FROM unnest($1::text[]) WITH ORDINALITY AS t (f, n) ORDER BY n",
    )
    .bind(vec![
        "小米科技有限责任公司_企业创新能力报告.pdf",
        "A_B公司_企业创新能力报告.docx",
        "只有名字.pdf",
    ])
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        read,
        [Some(NAME.to_string()), None, Some("只有名字".to_string())]
    );
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn a_known_balance_keeps_headroom_for_retries_then_stops_until_topped_up() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    let account = sim.config().client_id.clone();
    let set_balance = |tasks: i64, headroom: i64| {
        let (pool, account) = (&db.pool, account.clone());
        async move {
            sqlx::query("SELECT report_set_balance($1, $2, $3)")
                .bind(account)
                .bind(tasks)
                .bind(headroom)
                .execute(pool)
                .await
                .unwrap();
        }
    };
    let remaining =
        || async { count(&db.pool, "SELECT remaining FROM report_account_balance").await };
    set_balance(5, 2).await;
    // One task fails at the provider: its row needs a second task (a retry).
    sim.inject(Injection {
        endpoint: Endpoint::Status,
        fault: Fault::JobFailed,
        count: 1,
        client: None,
    });
    for i in 0..6 {
        enqueue(&db.pool, Some(&format!("余额{i}")), None, None, "pdf").await;
    }
    let w = spawn_fast_worker(&db.url, &sim).await;
    // 5 known, 2 kept for retries: three new rows get a task, the retry takes one of
    // the two kept, three rows wait for a top-up.
    wait_for(
        "three done and three waiting",
        Duration::from_secs(30),
        || async {
            let done = count(
                &db.pool,
                "SELECT count(*) FROM report_requests WHERE state = 'succeeded'",
            )
            .await;
            let waiting = count(
                &db.pool,
                "SELECT count(*) FROM report_requests WHERE state = 'queued'
                AND last_error LIKE 'waiting for a top-up of account %'",
            )
            .await;
            (done == 3 && waiting == 3).then_some(())
        },
    )
    .await;
    assert_eq!(sim.stats().tasks_created, 4);
    assert_eq!(remaining().await, 1);

    // Topped up to one task with nothing kept: the waiting rows come forward, one gets
    // it, then creating stops for the account with no call made.
    set_balance(1, 0).await;
    wait_for(
        "the known balance stops creating",
        Duration::from_secs(30),
        || async {
            let stopped = count(
                &db.pool,
                "SELECT count(*) FROM report_account_stops WHERE error_code = 67200005
                AND scope = 'create' AND reason LIKE 'known balance of account % used up%'",
            )
            .await;
            let done = count(
                &db.pool,
                "SELECT count(*) FROM report_requests WHERE state = 'succeeded'",
            )
            .await;
            (stopped == 1 && done == 4).then_some(())
        },
    )
    .await;
    assert_eq!(sim.stats().tasks_created, 5);
    assert_eq!(
        sim.stats().calls("create:67200005"),
        0,
        "our count stopped first"
    );
    let status = report_worker::ops::status::status_text(&db.pool)
        .await
        .unwrap();
    assert!(
        status.contains(&format!(
            "known balance of {account}: 0 tasks (0 kept for retries)"
        )),
        "{status}"
    );

    // A real top-up lifts the stop; every row finishes.
    set_balance(10, 0).await;
    wait_all_finished(&db.pool, Duration::from_secs(30)).await;
    w.stop().await;
    assert_eq!(sim.stats().tasks_created, 7);
    assert_eq!(remaining().await, 8);
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM report_account_stops").await,
        0
    );
    let done = count(
        &db.pool,
        "SELECT count(*) FROM report_requests WHERE state = 'succeeded'",
    )
    .await;
    assert_eq!(done, 6);
    let events = count(
        &db.pool,
        "SELECT count(*) FROM report_events WHERE action = 'set_balance' AND account IS NOT NULL",
    )
    .await;
    assert_eq!(events, 3);
    sim.stop().await;
    db.close().await;
}
