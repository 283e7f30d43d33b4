//! Spend safety: a row never causes more paid creates than `max_attempts`, and never two
//! for one attempt — through lost answers, cancel and retry, shutdown and database
//! outages. Paid tasks are counted by the simulator itself, per company.

use std::time::Duration;

use crate::common::*;
use report_worker::simulator::{Endpoint, Fault, Injection, SimConfig};

fn create_fault(fault: &Fault, count: u32) -> Injection {
    injection(Endpoint::Create, fault.clone(), count)
}

/// Each fault that loses a create's answer after the task was made, on rows with
/// `max_attempts` 1, 2 and 3: every create meets it (each attempt pays, none answers),
/// then only the first create of a row meets it.
async fn lost_answers_never_cost_more_than_max_attempts(fault: Fault) {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig::instant()).await;
    let mut client = client_config(&sim);
    client.timeout = Duration::from_millis(400);
    let w = spawn_worker(&db.url, client, fast_worker_config(&sim.config().client_id)).await;

    sim.inject(create_fault(&fault, 1000));
    let mut always = Vec::new();
    for m in 1..=3 {
        always.push((
            m,
            enqueue_with_attempts(&db.pool, &format!("always-{m}"), m).await,
        ));
    }
    for (m, id) in always {
        let (state, attempts, error) = wait_final(&db.pool, id, Duration::from_secs(30)).await;
        let paid = tasks_for(&sim, &format!("always-{m}"));
        assert_eq!(paid, m as u64, "{fault:?}, max_attempts {m}: paid tasks");
        assert_eq!((state.as_str(), attempts), ("failed", m), "{fault:?}");
        let error = error.unwrap_or_default();
        assert!(
            error.contains(&format!("{m} of the creates got no usable answer"))
                && error.contains("may exist"),
            "{fault:?}: {error}"
        );
    }
    sim.clear_injections();

    for m in 1..=3 {
        sim.inject(create_fault(&fault, 1));
        let company = format!("once-{m}");
        let id = enqueue_with_attempts(&db.pool, &company, m).await;
        let (state, attempts, _) = wait_final(&db.pool, id, Duration::from_secs(30)).await;
        let paid = tasks_for(&sim, &company);
        assert!(
            paid <= m as u64,
            "{fault:?}, max_attempts {m}: {paid} paid tasks"
        );
        if m == 1 {
            assert_eq!(
                (state.as_str(), attempts, paid),
                ("failed", 1, 1),
                "{fault:?}"
            );
        } else {
            assert_eq!(
                (state.as_str(), attempts, paid),
                ("succeeded", 2, 2),
                "{fault:?}"
            );
        }
    }
    assert_documents_exact(&db.pool, &sim).await;
    w.stop().await;
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn a_create_answered_after_the_timeout_costs_one_attempt() {
    lost_answers_never_cost_more_than_max_attempts(Fault::Slow { millis: 1500 }).await;
}

#[tokio::test]
async fn a_connection_closed_after_the_task_was_made_costs_one_attempt() {
    lost_answers_never_cost_more_than_max_attempts(Fault::CreatedThenReset).await;
}

#[tokio::test]
async fn a_5xx_after_the_task_was_made_costs_one_attempt() {
    lost_answers_never_cost_more_than_max_attempts(Fault::CreatedThenHttp { status: 502 }).await;
}

#[tokio::test]
async fn a_success_without_a_readable_job_id_costs_one_attempt() {
    lost_answers_never_cost_more_than_max_attempts(Fault::CreatedThenUnreadable).await;
}

#[tokio::test]
async fn status_false_without_a_code_costs_one_attempt() {
    lost_answers_never_cost_more_than_max_attempts(Fault::CreatedThenStatusFalse).await;
}

async fn intent_is_set(pool: &report_worker::queue::Db, id: i64) -> bool {
    sqlx::query_scalar("SELECT create_started_at IS NOT NULL FROM report_requests WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn cancel_then_retry_during_a_slow_create_adopts_its_task() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig {
        create_latency: (Duration::from_millis(1500), Duration::from_millis(1500)),
        ..SimConfig::instant()
    })
    .await;
    let w = spawn_fast_worker(&db.url, &sim).await;
    let id = enqueue_with_attempts(&db.pool, "撤回公司", 3).await;
    wait_for(
        "the create on the wire",
        Duration::from_secs(10),
        || async { intent_is_set(&db.pool, id).await.then_some(()) },
    )
    .await;
    for f in ["report_cancel", "report_retry"] {
        let done: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT {f}($1)")))
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert!(done, "{f}");
    }
    // The retried row is queued, its first attempt is the create still on the wire.
    let (state, attempts, _) = row_state(&db.pool, id).await;
    assert_eq!((state.as_str(), attempts), ("queued", 1));
    let (state, attempts, _) = wait_final(&db.pool, id, Duration::from_secs(20)).await;
    assert_eq!((state.as_str(), attempts), ("succeeded", 1));
    assert_eq!(tasks_for(&sim, "撤回公司"), 1, "one paid task");
    let adopted: i64 = count(
        &db.pool,
        "SELECT count(*) FROM report_orphan_tasks WHERE adopted_at IS NOT NULL",
    )
    .await;
    assert_eq!(adopted, 1);
    assert_eq!(assert_documents_exact(&db.pool, &sim).await, 1);
    w.stop().await;
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn a_task_answered_after_a_cancel_is_kept_and_adopted_by_a_later_retry() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig {
        create_latency: (Duration::from_millis(800), Duration::from_millis(800)),
        ..SimConfig::instant()
    })
    .await;
    let w = spawn_fast_worker(&db.url, &sim).await;
    let id = enqueue_with_attempts(&db.pool, "迟到公司", 1).await;
    wait_for(
        "the create on the wire",
        Duration::from_secs(10),
        || async { intent_is_set(&db.pool, id).await.then_some(()) },
    )
    .await;
    let cancelled: bool = sqlx::query_scalar("SELECT report_cancel($1)")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(cancelled);
    let reason: String = wait_for("the orphan", Duration::from_secs(10), || async {
        sqlx::query_scalar(
            "SELECT reason FROM report_orphan_tasks WHERE request_id = $1 AND adopted_at IS NULL",
        )
        .bind(id)
        .fetch_optional(&db.pool)
        .await
        .unwrap()
    })
    .await;
    assert!(reason.contains("cancelled"), "{reason}");
    assert!(!intent_is_set(&db.pool, id).await, "the intent is over");
    let retried: bool = report_retry(&db.pool, id).await;
    assert!(retried);
    let (state, attempts, _) = wait_final(&db.pool, id, Duration::from_secs(20)).await;
    assert_eq!((state.as_str(), attempts), ("succeeded", 1));
    assert_eq!(
        tasks_for(&sim, "迟到公司"),
        1,
        "the orphan was adopted, not bought again"
    );
    w.stop().await;
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn shutdown_waits_for_creates_on_the_wire_and_hands_back_the_rest_at_once() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig {
        create_latency: (Duration::from_millis(1000), Duration::from_millis(1000)),
        ..SimConfig::instant()
    })
    .await;
    for i in 0..4 {
        enqueue_with_attempts(&db.pool, &format!("停机{i}"), 3).await;
    }
    let mut config = fast_worker_config(&sim.config().client_id);
    // One call per second: one create goes out, three rows wait for their call slot.
    config.qps = 1.0;
    config.shutdown_timeout = Duration::from_secs(10);
    config.lease = Duration::from_secs(60);
    config.poll.first_poll = Duration::from_secs(60);
    let w = spawn_worker(&db.url, client_config(&sim), config).await;
    wait_for(
        "one create on the wire",
        Duration::from_secs(10),
        || async {
            let on_wire = count(
                &db.pool,
                "SELECT count(*) FROM report_requests WHERE create_started_at IS NOT NULL",
            )
            .await;
            let held = count(
                &db.pool,
                "SELECT count(*) FROM report_requests WHERE lease_owner IS NOT NULL",
            )
            .await;
            (on_wire == 1 && held == 4).then_some(())
        },
    )
    .await;
    w.stop().await;
    let stats = sim.stats();
    assert_eq!(stats.tasks_created, 1, "{:?}", stats.tasks_per_company);
    let generating = count(&db.pool, "SELECT count(*) FROM report_requests WHERE state = 'generating' AND upstream_job_id IS NOT NULL AND attempts = 1").await;
    assert_eq!(
        generating, 1,
        "the create on the wire was answered and recorded"
    );
    let released = count(&db.pool, "SELECT count(*) FROM report_requests WHERE state = 'queued' AND attempts = 0 AND lease_owner IS NULL AND create_started_at IS NULL").await;
    assert_eq!(released, 3, "rows that had sent nothing were handed back");
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn a_job_id_is_written_once_the_database_is_back() {
    let db = TestDb::new().await;
    let proxy = DbProxy::start().await;
    let sim = start_sim(SimConfig {
        create_latency: (Duration::from_millis(1000), Duration::from_millis(1000)),
        ..SimConfig::instant()
    })
    .await;
    let mut config = fast_worker_config(&sim.config().client_id);
    config.lease = Duration::from_secs(30);
    let w = spawn_worker(&proxy.url_for(&db), client_config(&sim), config).await;
    let id = enqueue_with_attempts(&db.pool, "断线公司", 3).await;
    wait_for(
        "the create on the wire",
        Duration::from_secs(10),
        || async { intent_is_set(&db.pool, id).await.then_some(()) },
    )
    .await;
    proxy.down();
    // The provider answers while the database is away; the worker keeps trying.
    wait_for(
        "the answer and a reconnect attempt",
        Duration::from_secs(20),
        || async { (sim.stats().calls("create:ok") == 1 && proxy.refused() >= 2).then_some(()) },
    )
    .await;
    proxy.up();
    let (state, attempts, _) = wait_final(&db.pool, id, Duration::from_secs(60)).await;
    assert_eq!((state.as_str(), attempts), ("succeeded", 1));
    assert_eq!(tasks_for(&sim, "断线公司"), 1);
    w.stop().await;
    proxy.stop();
    sim.stop().await;
    db.close().await;
}
