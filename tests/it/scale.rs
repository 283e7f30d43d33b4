//! Operating at scale: statistics that stay exact without scanning history, and
//! retention that removes exactly what it should.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use report_worker::engine::retention::{purge, purge_dry_run};
use report_worker::queue::Db;
use report_worker::queue::{self, ClaimKinds, PurgeScope};
use report_worker::store::DocumentStore;
use tokio_util::sync::CancellationToken;

/// count(*) by state, by batch and state, and the batches: the slow truth.
async fn truth(pool: &Db) -> BTreeMap<String, i64> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state, count(*) FROM report_requests GROUP BY state
         UNION ALL SELECT batch || '/' || state, count(*) FROM report_requests WHERE batch IS NOT NULL GROUP BY batch, state
         UNION ALL SELECT DISTINCT 'batch:' || batch, 1 FROM report_requests WHERE batch IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().filter(|(_, n)| *n > 0).collect()
}

/// What report_queue_stats says, with the batch counts the triggers keep.
async fn stats(pool: &Db) -> BTreeMap<String, i64> {
    let mut counts: BTreeMap<String, i64> = queue::queue_stats(pool)
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.count != 0)
        .map(|s| (s.state.as_str().to_string(), s.count))
        .collect();
    let batches: Vec<(String, i64)> = sqlx::query_as(
        "SELECT batch || '/' || state, sum(n)::bigint FROM report_batch_counts GROUP BY batch, state HAVING sum(n) <> 0
         UNION ALL SELECT 'batch:' || batch, 1 FROM report_batches",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    counts.extend(batches);
    counts
}

async fn ids(pool: &Db) -> Vec<i64> {
    sqlx::query_scalar("SELECT id FROM report_requests ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Two statements updating many rows each may deadlock (PostgreSQL then rolls one back,
/// counts included): that is an outcome, not a failure, for the counts to survive.
fn tolerate_deadlock(r: Result<sqlx::postgres::PgQueryResult, sqlx::Error>) {
    match r {
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("40P01") => {}
        other => {
            other.unwrap();
        }
    }
}

/// One random operation of the kinds that move rows between states or remove them.
async fn random_operation(pool: &Db, rng: &mut StdRng, owner: &str) {
    let all = ids(pool).await;
    let pick = |rng: &mut StdRng| (!all.is_empty()).then(|| all[rng.random_range(0..all.len())]);
    match rng.random_range(0..10) {
        0 | 1 => {
            let n = rng.random_range(1..20);
            sqlx::query(
                "INSERT INTO report_requests (company_name, report_type, batch)
                 SELECT 'p' || g, 'pdf', CASE g % 3 WHEN 0 THEN NULL ELSE 'b' || (g % 3) END FROM generate_series(1, $1) g",
            )
            .bind(n)
            .execute(pool)
            .await
            .unwrap();
        }
        2 => {
            let rows = queue::claim(
                pool,
                owner,
                Duration::from_secs(30),
                rng.random_range(1..5),
                ClaimKinds::ALL,
            )
            .await
            .unwrap();
            for row in rows {
                if let Ok(queue::CreateIntent::Go { .. }) = queue::begin_create(
                    pool,
                    row.id,
                    row.lease_token,
                    owner,
                    "acct",
                    Duration::from_secs(30),
                    Duration::from_secs(600),
                    Duration::ZERO,
                )
                .await
                {
                    let job = report_worker::domain::JobId::parse(&row.id.to_string()).unwrap();
                    queue::mark_generating(pool, row.id, row.lease_token, &job, Duration::ZERO)
                        .await
                        .unwrap();
                }
            }
        }
        3 => {
            if let Some(id) = pick(rng) {
                let state = ["succeeded", "failed"][rng.random_range(0..2)];
                sqlx::query("UPDATE report_requests SET state = $2, finished_at = now() WHERE id = $1 AND state = 'generating'")
                    .bind(id)
                    .bind(state)
                    .execute(pool)
                    .await
                    .unwrap();
            }
        }
        4 => {
            if let Some(id) = pick(rng) {
                sqlx::query("SELECT report_cancel($1)")
                    .bind(id)
                    .execute(pool)
                    .await
                    .unwrap();
            }
        }
        5 => {
            if let Some(id) = pick(rng) {
                report_retry(pool, id).await;
            }
        }
        6 => {
            if let Some(id) = pick(rng) {
                sqlx::query("DELETE FROM report_requests WHERE id = $1")
                    .bind(id)
                    .execute(pool)
                    .await
                    .unwrap();
            }
        }
        7 => {
            let scope = PurgeScope {
                finished_before: chrono::Utc::now() + chrono::Duration::seconds(1),
                documents_only: false,
            };
            purge(
                pool,
                &DocumentStore::Postgres,
                Some(&scope),
                None,
                report_worker::engine::retention::Pace::Full,
                &CancellationToken::new(),
                |_| {},
            )
            .await
            .unwrap();
        }
        8 => {
            // Rows moving between batches (by hand), some out of any batch.
            let moved = sqlx::query(
                "UPDATE report_requests SET batch = CASE WHEN id % 4 = 0 THEN NULL ELSE 'b' || (id % 4) END
                  WHERE id % 5 = $1",
            )
            .bind(rng.random_range(0..5i64))
            .execute(pool)
            .await;
            tolerate_deadlock(moved);
        }
        _ => {
            // A statement moving many rows at once, in both directions.
            let moved = sqlx::query("UPDATE report_requests SET state = CASE state WHEN 'failed' THEN 'cancelled' WHEN 'cancelled' THEN 'failed' ELSE state END, finished_at = coalesce(finished_at, now())")
                .execute(pool)
                .await;
            tolerate_deadlock(moved);
        }
    }
}

#[tokio::test]
async fn stats_equal_count_by_state_after_random_operations() {
    let db = TestDb::new().await;
    for seed in 0..6u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        for step in 0..40 {
            random_operation(&db.pool, &mut rng, "prop").await;
            assert_eq!(
                stats(&db.pool).await,
                truth(&db.pool).await,
                "seed {seed}, step {step}"
            );
        }
    }
    db.close().await;
}

#[tokio::test]
async fn stats_equal_count_by_state_after_concurrent_writers() {
    let db = TestDb::new().await;
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..8u64 {
        let pool = report_worker::queue::connect(&db.url, 2).await.unwrap();
        writers.spawn(async move {
            let mut rng = StdRng::seed_from_u64(100 + w);
            for _ in 0..40 {
                random_operation(&pool, &mut rng, &format!("w{w}")).await;
            }
            pool.close().await;
        });
    }
    writers.join_all().await;
    assert_eq!(stats(&db.pool).await, truth(&db.pool).await);
    // And the oldest ages come from the rows themselves.
    for s in queue::queue_stats(&db.pool).await.unwrap() {
        assert_eq!(s.count == 0, s.oldest_age_secs.is_none(), "{s:?}");
    }
    db.close().await;
}

/// Rows finished 100 days ago, a day ago, and one still queued from 100 days ago.
async fn history(db: &TestDb) -> (Vec<i64>, Vec<i64>, i64) {
    let mut old = Vec::new();
    for i in 0..30 {
        old.push(enqueue(&db.pool, Some(&format!("旧{i}")), None, None, "pdf").await);
    }
    let ancient = enqueue(&db.pool, Some("还在排队"), None, None, "pdf").await;
    let mut recent = Vec::new();
    for i in 0..5 {
        recent.push(enqueue(&db.pool, Some(&format!("新{i}")), None, None, "pdf").await);
    }
    sqlx::query(
        "UPDATE report_requests SET created_at = now() - interval '101 days' WHERE id <= $1",
    )
    .bind(ancient)
    .execute(&db.pool)
    .await
    .unwrap();
    for (ids, ago) in [(&old, "100 days"), (&recent, "1 day")] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE report_requests SET state = 'succeeded', finished_at = now() - interval '{ago}' WHERE id = ANY($1)"
        )))
        .bind(ids)
        .execute(&db.pool)
        .await
        .unwrap();
        for id in ids.iter() {
            sqlx::query("INSERT INTO report_documents (request_id, content, content_type, file_name, byte_size, sha256) VALUES ($1, '%PDF-1 %%EOF', 'application/pdf', 'r.pdf', 12, repeat('a', 64))")
                .bind(id)
                .execute(&db.pool)
                .await
                .unwrap();
        }
    }
    (old, recent, ancient)
}

#[tokio::test]
async fn purge_removes_exactly_the_finished_history_before_the_cutoff() {
    let db = TestDb::new().await;
    let (old, recent, ancient) = history(&db).await;
    let scope = PurgeScope {
        finished_before: chrono::Utc::now() - chrono::Duration::days(90),
        documents_only: false,
    };
    let dry = purge_dry_run(&db.pool, &scope).await.unwrap();
    assert_eq!((dry.requests, dry.documents), (30, 30));
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM report_requests").await,
        36,
        "a dry run removes nothing"
    );
    // A row another transaction holds is skipped, not waited for.
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM report_requests WHERE id = $1 FOR UPDATE")
        .bind(old[0])
        .execute(&mut *holder)
        .await
        .unwrap();
    let mut seen = Vec::new();
    let report = purge(
        &db.pool,
        &DocumentStore::Postgres,
        Some(&scope),
        None,
        report_worker::engine::retention::Pace::Full,
        &CancellationToken::new(),
        |r| seen.push(r.requests),
    )
    .await
    .unwrap();
    holder.rollback().await.unwrap();
    assert_eq!((report.requests, report.documents), (29, 29));
    assert!(!seen.is_empty(), "progress was reported");
    let left: Vec<i64> = ids(&db.pool).await;
    let mut want = vec![old[0], ancient];
    want.extend(&recent);
    want.sort();
    assert_eq!(left, want);
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM report_events WHERE request_id <> ALL(SELECT id FROM report_requests)").await,
        0,
        "their history went with them"
    );
    assert_eq!(stats(&db.pool).await, truth(&db.pool).await);
    // The held row goes on the next run.
    let again = purge(
        &db.pool,
        &DocumentStore::Postgres,
        Some(&scope),
        None,
        report_worker::engine::retention::Pace::Full,
        &CancellationToken::new(),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(again.requests, 1);
    db.close().await;
}

#[tokio::test]
async fn purge_of_documents_only_and_of_events() {
    let db = TestDb::new().await;
    let (old, _, _) = history(&db).await;
    let scope = PurgeScope {
        finished_before: chrono::Utc::now() - chrono::Duration::days(90),
        documents_only: true,
    };
    let report = purge(
        &db.pool,
        &DocumentStore::Postgres,
        Some(&scope),
        None,
        report_worker::engine::retention::Pace::Full,
        &CancellationToken::new(),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!((report.requests, report.documents), (0, 30));
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM report_requests").await,
        36
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM report_documents").await,
        5
    );
    // The oldest events (the old rows' inserts, the first ids: an event's time grows
    // with its id), moved back in time.
    sqlx::query("UPDATE report_events SET at = now() - interval '40 days' WHERE id <= (SELECT min(id) + 29 FROM report_events) AND request_id = ANY($1)")
        .bind(&old)
        .execute(&db.pool)
        .await
        .unwrap();
    let before = count(&db.pool, "SELECT count(*) FROM report_events").await;
    let report = purge(
        &db.pool,
        &DocumentStore::Postgres,
        None,
        Some(chrono::Utc::now() - chrono::Duration::days(30)),
        report_worker::engine::retention::Pace::Full,
        &CancellationToken::new(),
        |_| {},
    )
    .await
    .unwrap();
    let after = count(&db.pool, "SELECT count(*) FROM report_events").await;
    assert_eq!(report.events as i64, before - after);
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM report_events WHERE at < now() - interval '30 days'"
        )
        .await,
        0
    );
    assert!(after > 0, "recent events stay");
    db.close().await;
}

#[tokio::test]
async fn purge_from_the_command_line() {
    let db = TestDb::new().await;
    history(&db).await;
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_report-worker"))
            .arg("purge")
            .args(args)
            .env("DATABASE_URL", &db.url)
            .output()
            .unwrap()
    };
    let dry = run(&["--finished-before", "90d", "--dry-run"]);
    assert!(dry.status.success());
    assert!(
        String::from_utf8_lossy(&dry.stdout).contains("would remove 30 requests and 30 documents")
    );
    let done = run(&["--finished-before", "90d"]);
    let out = String::from_utf8_lossy(&done.stdout);
    assert!(done.status.success(), "{out}");
    assert!(out.contains("removed 30 requests, 30 documents"), "{out}");
    let nothing = run(&[]);
    assert!(!nothing.status.success());
    assert_eq!(
        String::from_utf8_lossy(&nothing.stderr)
            .trim_end()
            .lines()
            .count(),
        1
    );
    db.close().await;
}

#[tokio::test]
async fn run_purges_on_its_schedule() {
    let db = TestDb::new().await;
    history(&db).await;
    let sim = start_sim(report_worker::simulator::SimConfig::instant()).await;
    // The real `run`, its retention set the way operators set it: the environment.
    let mut worker = worker_process(
        &db.url,
        &sim,
        &[("RETENTION_FINISHED", "90d"), ("RETENTION_EVERY", "200ms")],
    );
    let before = count(
        &db.pool,
        "SELECT count(*) FROM report_requests WHERE finished_at < now() - interval '90 days'",
    )
    .await;
    assert!(before > 0, "history to purge");
    wait_for("the scheduled purge", Duration::from_secs(30), || async {
        (count(
            &db.pool,
            "SELECT count(*) FROM report_requests WHERE finished_at < now() - interval '90 days'",
        )
        .await
            == 0)
            .then_some(())
    })
    .await;
    // Younger history stays.
    assert!(count(&db.pool, "SELECT count(*) FROM report_requests").await > 0);
    worker.kill().unwrap();
    worker.wait().unwrap();
    sim.stop().await;
    db.close().await;
}
