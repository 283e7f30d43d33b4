//! Spending less: learned polling end to end (observations written with each
//! completion, schedules read back by the worker).

use std::time::Duration;

use crate::common::*;
use report_worker::simulator::SimConfig;

#[tokio::test]
async fn every_completion_leaves_an_observed_generation_time() {
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig {
        generation_time: (Duration::from_millis(300), Duration::from_millis(600)),
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
    let w = spawn_fast_worker(&db.url, &sim).await;
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
        // Ready after at least the simulator's 0.3 s, noticed within the fast polls.
        assert!(*upper >= 0.3 && *upper < 10.0, "{rows:?}");
        assert!(lower <= upper, "{rows:?}");
    }
    // Tasks polled more than once know when they were last not ready.
    assert!(rows.iter().any(|r| r.1 > 0.0), "{rows:?}");
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn with_enough_history_the_first_poll_follows_the_learned_schedule() {
    let db = TestDb::new().await;
    // Sixty PDF tasks that took about three minutes; no Word history.
    sqlx::query(
        "INSERT INTO report_generation_times (report_type, lower_secs, upper_secs)
         SELECT 'pdf', 170 + (i % 7), 180 + (i % 7) FROM generate_series(1, 60) i",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let sim = start_sim(SimConfig {
        generation_time: (Duration::from_secs(300), Duration::from_secs(300)),
        ..SimConfig::instant()
    })
    .await;
    let pdf = enqueue(&db.pool, Some("学到的"), None, None, "pdf").await;
    let word = enqueue(&db.pool, Some("没学到的"), None, None, "word").await;
    let mut config = fast_worker_config(&sim.config().client_id);
    config.poll.window = Duration::from_secs(600);
    config.poll.first_poll = Duration::from_secs(60);
    config.detection_target = Some(Duration::from_secs(15));
    let w = spawn_worker(&db.url, client_config(&sim), config).await;
    let first_poll = |id: i64| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, Option<f64>>(
                "SELECT extract(epoch FROM next_poll_at - upstream_created_at)::float8
                   FROM report_requests WHERE id = $1 AND state = 'generating'",
            )
            .bind(id)
            .fetch_optional(&pool)
            .await
            .unwrap()
            .flatten()
        }
    };
    let learned = wait_for("the PDF task", Duration::from_secs(20), || first_poll(pdf)).await;
    let fixed = wait_for("the Word task", Duration::from_secs(20), || {
        first_poll(word)
    })
    .await;
    w.stop().await;
    // Nothing was seen ready before 180 s: the first poll comes just before, not at 60 s.
    assert!(
        (150.0..=180.0).contains(&learned),
        "learned first poll at {learned} s"
    );
    assert!((fixed - 60.0).abs() < 1.0, "fixed first poll at {fixed} s");
    sim.stop().await;
    db.close().await;
}
