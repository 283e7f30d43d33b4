//! The queue's engine statements on a real database: claims, fencing, leases, pacing
//! and the account stop.

use std::time::Duration;

use crate::common::*;
use report_worker::domain::{JobId, StopScope};
use report_worker::queue::{self, ClaimKinds, Fenced, Intent};

#[tokio::test]
async fn claims_are_exclusive_ordered_and_fenced() {
    let db = TestDb::new().await;
    let low = enqueue(&db.pool, Some("low"), None, None, "pdf").await;
    let high: i64 = sqlx::query_scalar("INSERT INTO report_requests (company_name, report_type, priority) VALUES ('high', 'pdf', -5) RETURNING id")
        .fetch_one(&db.pool).await.unwrap();
    sqlx::query("INSERT INTO report_requests (company_name, report_type, run_after) VALUES ('later', 'pdf', now() + interval '1 hour')")
        .execute(&db.pool).await.unwrap();
    let mut a = queue::claim(&db.pool, "a", Duration::from_secs(30), 1, ClaimKinds::ALL)
        .await
        .unwrap();
    assert_eq!(
        a.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![high],
        "lower priority value first"
    );
    a.extend(
        queue::claim(&db.pool, "a", Duration::from_secs(30), 10, ClaimKinds::ALL)
            .await
            .unwrap(),
    );
    assert_eq!(
        a.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![high, low],
        "future rows wait"
    );
    let b = queue::claim(&db.pool, "b", Duration::from_secs(30), 10, ClaimKinds::ALL)
        .await
        .unwrap();
    assert!(b.is_empty(), "leased rows are not claimed twice");
    // A cancel fences off the holder.
    let cancelled: bool = sqlx::query_scalar("SELECT report_cancel($1)")
        .bind(low)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(cancelled);
    let low_row = a.iter().find(|r| r.id == low).unwrap();
    let job = JobId::parse("1579434053399035904").unwrap();
    assert_eq!(
        queue::mark_generating(&db.pool, low, low_row.lease_token, &job, Duration::ZERO)
            .await
            .unwrap(),
        Fenced::Lost
    );
    // The holder of `high` commits its intent (the attempt), then its task.
    let high_row = a.iter().find(|r| r.id == high).unwrap();
    let intent = queue::begin_create(
        &db.pool,
        high,
        high_row.lease_token,
        "a",
        "acct",
        Duration::from_secs(30),
        Duration::from_secs(600),
        Duration::ZERO,
    )
    .await
    .unwrap();
    assert!(
        matches!(intent, queue::CreateIntent::Go { attempt: 1, .. }),
        "{intent:?}"
    );
    assert_eq!(
        queue::mark_generating(&db.pool, high, high_row.lease_token, &job, Duration::ZERO)
            .await
            .unwrap(),
        Fenced::Written
    );
    let (state, attempts, job): (String, i32, String) = sqlx::query_as(
        "SELECT state, attempts, upstream_job_id FROM report_requests WHERE id = $1",
    )
    .bind(high)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (state.as_str(), attempts, job.as_str()),
        ("generating", 1, "1579434053399035904")
    );
    db.close().await;
}

#[tokio::test]
async fn an_expired_lease_goes_to_the_next_worker_and_the_old_one_is_fenced() {
    let db = TestDb::new().await;
    let id = enqueue(&db.pool, Some("x"), None, None, "pdf").await;
    let a = queue::claim(
        &db.pool,
        "a",
        Duration::from_millis(100),
        1,
        ClaimKinds::ALL,
    )
    .await
    .unwrap();
    assert_eq!(a.len(), 1);
    let b = wait_for("the lease to expire", Duration::from_secs(5), || async {
        let b = queue::claim(&db.pool, "b", Duration::from_secs(30), 1, ClaimKinds::ALL)
            .await
            .unwrap();
        (!b.is_empty()).then_some(b)
    })
    .await;
    assert_eq!(b[0].id, id);
    assert!(b[0].lease_token > a[0].lease_token);
    assert_eq!(
        queue::fail(
            &db.pool,
            id,
            a[0].lease_token,
            Some(1),
            "stale",
            Intent::Keep
        )
        .await
        .unwrap(),
        Fenced::Lost,
        "old holder is fenced"
    );
    assert_eq!(
        queue::fail(
            &db.pool,
            id,
            b[0].lease_token,
            Some(2),
            "current",
            Intent::Keep
        )
        .await
        .unwrap(),
        Fenced::Written
    );
    // Heartbeats extend only live claims, release gives rows back at once.
    let id2 = enqueue(&db.pool, Some("y"), None, None, "pdf").await;
    let c = queue::claim(&db.pool, "c", Duration::from_secs(30), 1, ClaimKinds::ALL)
        .await
        .unwrap();
    assert_eq!(
        queue::heartbeat(
            &db.pool,
            "c",
            &[(id2, c[0].lease_token), (id, a[0].lease_token)],
            Duration::from_secs(60)
        )
        .await
        .unwrap(),
        vec![id2]
    );
    assert_eq!(
        queue::release(&db.pool, &[(id2, c[0].lease_token)])
            .await
            .unwrap(),
        1
    );
    let d = queue::claim(&db.pool, "d", Duration::from_secs(30), 1, ClaimKinds::ALL)
        .await
        .unwrap();
    assert_eq!(d[0].id, id2);
    db.close().await;
}

#[tokio::test]
async fn claim_kinds_follow_the_account_stop() {
    let db = TestDb::new().await;
    let q = enqueue(&db.pool, Some("q"), None, None, "pdf").await;
    let g = enqueue(&db.pool, Some("g"), None, None, "pdf").await;
    sqlx::query("UPDATE report_requests SET state = 'generating', upstream_job_id = '1', upstream_created_at = now(), next_poll_at = now() WHERE id = $1")
        .bind(g).execute(&db.pool).await.unwrap();
    let polls = queue::claim(
        &db.pool,
        "a",
        Duration::from_secs(30),
        10,
        ClaimKinds::POLLS,
    )
    .await
    .unwrap();
    assert_eq!(polls.iter().map(|r| r.id).collect::<Vec<_>>(), vec![g]);
    let creates = queue::claim(
        &db.pool,
        "a",
        Duration::from_secs(30),
        10,
        ClaimKinds::CREATES,
    )
    .await
    .unwrap();
    assert_eq!(creates.iter().map(|r| r.id).collect::<Vec<_>>(), vec![q]);
    assert!(
        queue::claim(&db.pool, "a", Duration::from_secs(30), 10, ClaimKinds::NONE)
            .await
            .unwrap()
            .is_empty()
    );
    db.close().await;
}

#[tokio::test]
async fn account_stop_lifecycle() {
    let db = TestDb::new().await;
    let acct = "client-1";
    queue::record_stop(
        &db.pool,
        acct,
        StopScope::Create,
        67200005,
        "Insufficient balance",
        None,
        Duration::ZERO,
        Some(queue::StopCause {
            request_id: 7,
            endpoint: "create",
            answer: "account-wide stop (67200005): Insufficient balance",
        }),
    )
    .await
    .unwrap();
    let stop = queue::read_stop(&db.pool, acct).await.unwrap().unwrap();
    assert_eq!(
        (stop.scope.as_str(), stop.error_code, stop.probe_due),
        ("create", Some(67200005), true)
    );
    assert_eq!(
        (stop.request_id, stop.endpoint.as_deref()),
        (Some(7), Some("create")),
        "the stop says which row and which call caused it"
    );
    // Only one process wins a probe.
    assert!(
        queue::claim_probe(&db.pool, acct, stop.probes, Duration::from_secs(60))
            .await
            .unwrap()
    );
    assert!(
        !queue::claim_probe(&db.pool, acct, stop.probes, Duration::from_secs(60))
            .await
            .unwrap()
    );
    // A status-call stop widens the scope; a known end moves the probe to it.
    let midnight = report_worker::upstream::next_shanghai_midnight(chrono::Utc::now());
    queue::record_stop(
        &db.pool,
        acct,
        StopScope::All,
        67200007,
        "daily limit",
        Some(midnight),
        Duration::ZERO,
        None,
    )
    .await
    .unwrap();
    let stop = queue::read_stop(&db.pool, acct).await.unwrap().unwrap();
    assert_eq!(
        (stop.scope.as_str(), stop.until, stop.probe_due),
        ("all", Some(midnight), false)
    );
    assert!(stop.probe_at >= midnight);
    assert!(queue::clear_stop(&db.pool, acct).await.unwrap());
    assert!(queue::read_stop(&db.pool, acct).await.unwrap().is_none());
    db.close().await;
}

#[tokio::test]
async fn call_slots_are_spaced_across_callers() {
    let db = TestDb::new().await;
    let spacing = Duration::from_millis(100);
    let mut waits = Vec::new();
    for _ in 0..10 {
        waits.push(
            queue::reserve_call_slot(&db.pool, "acct", spacing)
                .await
                .unwrap(),
        );
    }
    // The tenth caller waits about 900 ms for its slot.
    assert!(waits[0] < Duration::from_millis(50));
    assert!(
        waits[9] > Duration::from_millis(700) && waits[9] < Duration::from_millis(1000),
        "{waits:?}"
    );
    queue::slow_down(&db.pool, "acct", Duration::from_secs(5))
        .await
        .unwrap();
    let after = queue::reserve_call_slot(&db.pool, "acct", spacing)
        .await
        .unwrap();
    assert!(after > Duration::from_secs(4), "{after:?}");
    db.close().await;
}

async fn claim_one(db: &TestDb, owner: &str) -> queue::Claimed {
    let mut rows = queue::claim(&db.pool, owner, Duration::from_secs(30), 1, ClaimKinds::ALL)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "one row to claim");
    rows.remove(0)
}

async fn begin(db: &TestDb, row: &queue::Claimed, owner: &str) -> queue::CreateIntent {
    queue::begin_create(
        &db.pool,
        row.id,
        row.lease_token,
        owner,
        "acct",
        Duration::from_secs(30),
        Duration::from_secs(600),
        Duration::from_secs(60),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn the_create_intent_counts_the_attempt_before_the_call() {
    use queue::CreateIntent::*;
    let db = TestDb::new().await;
    let id = enqueue_with_attempts(&db.pool, "x", 2).await;
    let row = claim_one(&db, "a").await;
    // Not ours: no call.
    assert_eq!(begin(&db, &row, "someone-else").await, Lost);
    let mut stale = row.clone();
    stale.lease_token -= 1;
    assert_eq!(begin(&db, &stale, "a").await, Lost);
    // Ours: the attempt is committed with the intent, the lease covers the call.
    let Go {
        attempt: 1,
        unanswered: 0,
        ..
    } = begin(&db, &row, "a").await
    else {
        panic!("expected go")
    };
    let (attempts, lease_left): (i32, f64) = sqlx::query_as(
        "SELECT attempts, extract(epoch FROM lease_expires_at - now())::float8 FROM report_requests WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(attempts, 1);
    assert!(lease_left > 29.0, "{lease_left}");
    // The process dies mid-create; after the deadline the next holder counts that
    // attempt as unanswered and may spend the last one.
    sqlx::query("UPDATE report_requests SET create_deadline = now() - interval '1 second', lease_expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
    let row = claim_one(&db, "b").await;
    let Go {
        attempt: 2,
        unanswered: 1,
        ..
    } = begin(&db, &row, "b").await
    else {
        panic!("expected go")
    };
    // And after that one dies too, attempts are spent: no third call.
    sqlx::query("UPDATE report_requests SET create_deadline = now() - interval '1 second', lease_expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
    let row = claim_one(&db, "c").await;
    assert_eq!(
        begin(&db, &row, "c").await,
        Exhausted {
            attempts: 2,
            unanswered: 2
        }
    );
    db.close().await;
}

#[tokio::test]
async fn a_retried_row_waits_for_its_create_on_the_wire_then_adopts_it() {
    use queue::CreateIntent::*;
    let db = TestDb::new().await;
    let id = enqueue_with_attempts(&db.pool, "x", 3).await;
    let row = claim_one(&db, "a").await;
    let Go { started_at, .. } = begin(&db, &row, "a").await else {
        panic!("expected go")
    };
    for f in ["report_cancel", "report_retry"] {
        let done: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT {f}($1)")))
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert!(done);
    }
    let (state, attempts, _) = row_state(&db.pool, id).await;
    assert_eq!(
        (state.as_str(), attempts),
        ("queued", 1),
        "the create on the wire is attempt 1"
    );
    // Another process claims the retried row: it must not create while that is on the wire.
    let b = claim_one(&db, "b").await;
    assert!(matches!(begin(&db, &b, "b").await, Wait { .. }));
    assert_eq!(
        queue::wait_for_create(&db.pool, b.id, b.lease_token)
            .await
            .unwrap(),
        Fenced::Written
    );
    // The answer arrives at the first holder, whose write is fenced: the row adopts it.
    let job = JobId::parse("1579434053399035904").unwrap();
    let lost = queue::mark_generating(&db.pool, id, row.lease_token, &job, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(lost, Fenced::Lost);
    let orphan = queue::Orphan {
        request_id: id,
        job_id: job.clone(),
        started_at: Some(started_at),
        account: "acct".into(),
        report_type: report_worker::domain::ReportType::Pdf,
        reason: "cancelled while on the wire".into(),
    };
    assert_eq!(
        queue::adopt_or_record_orphan(&db.pool, &orphan, Duration::ZERO)
            .await
            .unwrap(),
        queue::OrphanFate::Adopted
    );
    let (state, job_id, attempts): (String, String, i32) = sqlx::query_as(
        "SELECT state, upstream_job_id, attempts FROM report_requests WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (state.as_str(), job_id.as_str(), attempts),
        ("generating", job.as_str(), 1)
    );
    let orphans = queue::orphan_tasks(&db.pool).await.unwrap();
    assert_eq!(orphans.len(), 1);
    assert!(orphans[0].adopted_at.is_some());
    db.close().await;
}

#[tokio::test]
async fn an_orphan_recorded_after_a_cancel_is_adopted_by_the_next_create() {
    use queue::CreateIntent::*;
    let db = TestDb::new().await;
    let id = enqueue_with_attempts(&db.pool, "x", 1).await;
    let row = claim_one(&db, "a").await;
    let Go { started_at, .. } = begin(&db, &row, "a").await else {
        panic!("expected go")
    };
    let cancelled: bool = sqlx::query_scalar("SELECT report_cancel($1)")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(cancelled);
    let job = JobId::parse("42").unwrap();
    let orphan = queue::Orphan {
        request_id: id,
        job_id: job.clone(),
        started_at: Some(started_at),
        account: "acct".into(),
        report_type: report_worker::domain::ReportType::Pdf,
        reason: "cancelled".into(),
    };
    assert_eq!(
        queue::adopt_or_record_orphan(&db.pool, &orphan, Duration::ZERO)
            .await
            .unwrap(),
        queue::OrphanFate::Recorded
    );
    let retried: bool = report_retry(&db.pool, id).await;
    assert!(retried);
    assert_eq!(
        row_state(&db.pool, id).await.1,
        0,
        "fresh attempts: nothing is on the wire"
    );
    let row = claim_one(&db, "b").await;
    assert_eq!(begin(&db, &row, "b").await, Adopted { job });
    assert_eq!(
        row_state(&db.pool, id).await,
        ("generating".into(), 1, None)
    );
    db.close().await;
}

#[tokio::test]
async fn one_batch_of_intents_decides_each_row_on_its_own() {
    use queue::CreateIntent::*;
    let db = TestDb::new().await;
    let go = enqueue_with_attempts(&db.pool, "go", 3).await;
    let spent = enqueue_with_attempts(&db.pool, "spent", 1).await;
    let orphaned = enqueue_with_attempts(&db.pool, "orphaned", 3).await;
    let stale = enqueue_with_attempts(&db.pool, "stale", 3).await;
    sqlx::query("UPDATE report_requests SET attempts = 1 WHERE id = $1")
        .bind(spent)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO report_orphan_tasks (job_id, request_id, account, report_type, reason) VALUES ('77', $1, 'acct', 'pdf', 'test')")
        .bind(orphaned)
        .execute(&db.pool)
        .await
        .unwrap();
    let rows = queue::claim(&db.pool, "a", Duration::from_secs(30), 10, ClaimKinds::ALL)
        .await
        .unwrap();
    assert_eq!(rows.len(), 4);
    let items: Vec<queue::Begin> = rows
        .iter()
        .map(|r| queue::Begin {
            id: r.id,
            token: if r.id == stale {
                r.lease_token + 1
            } else {
                r.lease_token
            },
            owner: "a".into(),
            account: "acct".into(),
            budget: Duration::from_secs(30),
            adopt_within: Duration::from_secs(600),
            first_poll: Duration::ZERO,
        })
        .collect();
    let decided: std::collections::HashMap<i64, queue::CreateIntent> =
        queue::begin_create_batch(&db.pool, &items)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert!(matches!(decided[&go], Go { attempt: 1, .. }), "{decided:?}");
    assert_eq!(
        decided[&spent],
        Exhausted {
            attempts: 1,
            unanswered: 0
        }
    );
    assert_eq!(
        decided[&orphaned],
        Adopted {
            job: JobId::parse("77").unwrap()
        }
    );
    assert_eq!(decided[&stale], Lost);
    db.close().await;
}

#[tokio::test]
async fn an_idle_worker_waits_only_for_polls_it_could_claim() {
    let db = TestDb::new().await;
    assert_eq!(queue::next_poll_due_in(&db.pool, None).await.unwrap(), None);
    // Polls due now but held by another process: nothing for this one to wake for.
    sqlx::query(
        "INSERT INTO report_requests (company_name, report_type, state, attempts, upstream_job_id, upstream_created_at, next_poll_at, lease_owner, lease_expires_at)
         SELECT '在途' || i, 'pdf', 'generating', 1, i::text, now(), now() - interval '1 second', 'other', now() + interval '1 minute'
           FROM generate_series(1, 50) i",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(queue::next_poll_due_in(&db.pool, None).await.unwrap(), None);
    // One not held, due in 30 s: that is the next thing to wake for.
    sqlx::query(
        "INSERT INTO report_requests (company_name, report_type, state, attempts, upstream_job_id, upstream_created_at, next_poll_at)
         VALUES ('空闲', 'pdf', 'generating', 1, '99', now(), now() + interval '30 seconds')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let due = queue::next_poll_due_in(&db.pool, None)
        .await
        .unwrap()
        .unwrap();
    assert!(
        due > Duration::from_secs(28) && due <= Duration::from_secs(30),
        "{due:?}"
    );
    db.close().await;
}

#[tokio::test]
async fn time_in_an_account_stop_does_not_count_against_the_retry_budget() {
    let db = TestDb::new().await;
    let id = enqueue(&db.pool, Some("周末"), None, None, "pdf").await;
    // Transient trouble began 23 h ago; then a 20 h balance stop began 20 h ago.
    sqlx::query("UPDATE report_requests SET transient_since = now() - interval '23 hours', transient_errors = 3 WHERE id = $1")
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO report_account_stops (account, scope, reason, error_code, since, probe_at) VALUES ('acct', 'create', 'balance', 67200005, now() - interval '20 hours', now())")
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(queue::clear_stop(&db.pool, "acct").await.unwrap());
    let streak: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - transient_since)::float8 FROM report_requests WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        (3.0 * 3600.0 - 5.0..=3.0 * 3600.0 + 5.0).contains(&streak),
        "the streak is 3 h of trouble, not 23 h: {streak}"
    );
    assert!(!queue::clear_stop(&db.pool, "acct").await.unwrap());
    db.close().await;
}

#[tokio::test]
async fn an_intent_asked_for_again_by_the_same_claim_goes_again() {
    // The first ask committed, its answer was lost (a connection cut): the same claim
    // asks again and gets the same intent, not a wait for a create that never left.
    let db = TestDb::new().await;
    let id = crate::common::enqueue(&db.pool, Some("重问"), None, None, "pdf").await;
    let row = queue::claim(
        &db.pool,
        "me",
        Duration::from_secs(60),
        1,
        queue::ClaimKinds::ALL,
    )
    .await
    .unwrap()
    .pop()
    .unwrap();
    let ask = || {
        queue::begin_create(
            &db.pool,
            id,
            row.lease_token,
            "me",
            "acct",
            Duration::from_secs(30),
            Duration::from_secs(600),
            Duration::ZERO,
        )
    };
    let first = ask().await.unwrap();
    let second = ask().await.unwrap();
    let (
        queue::CreateIntent::Go {
            attempt: a1,
            started_at: s1,
            ..
        },
        queue::CreateIntent::Go {
            attempt: a2,
            started_at: s2,
            ..
        },
    ) = (&first, &second)
    else {
        panic!("{first:?} then {second:?}");
    };
    assert_eq!((a1, s1), (a2, s2), "the same attempt and intent");
    let (attempts, sent): (i32, i32) =
        sqlx::query_as("SELECT attempts, creates_sent FROM report_requests WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((attempts, sent), (1, 1));
    let counted: i64 = sqlx::query_scalar("SELECT sum(sent)::bigint FROM report_create_ledger")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(counted, 1, "counted once");
    db.close().await;
}

#[tokio::test]
async fn a_retry_takes_the_rows_unadopted_task_however_old() {
    let db = TestDb::new().await;
    let id = crate::common::enqueue(&db.pool, Some("旧孤儿"), None, None, "pdf").await;
    sqlx::query(
        "UPDATE report_requests SET state = 'cancelled', finished_at = now() WHERE id = $1",
    )
    .bind(id)
    .execute(&db.pool)
    .await
    .unwrap();
    // Its job id arrived after the cancel, an hour ago; a worker polls that account.
    sqlx::query(
        "INSERT INTO report_orphan_tasks (job_id, request_id, account, report_type, reason, created_at)
         VALUES ('4242', $1, 'acct', 'pdf', 'the row was cancelled while its create was on the wire', now() - interval '1 hour')",
    )
    .bind(id)
    .execute(&db.pool)
    .await
    .unwrap();
    queue::worker_seen(
        &db.pool,
        "w",
        &["acct".to_string()],
        true,
        &serde_json::json!({}),
        &serde_json::json!({}),
    )
    .await
    .unwrap();
    let retried: bool = report_retry(&db.pool, id).await;
    assert!(retried);
    let (state, job, account, attempts): (String, Option<String>, Option<String>, i32) =
        sqlx::query_as(
            "SELECT state, upstream_job_id, account, attempts FROM report_requests WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        (state.as_str(), job.as_deref(), account.as_deref(), attempts),
        ("generating", Some("4242"), Some("acct"), 1)
    );
    let adopted: bool = sqlx::query_scalar(
        "SELECT adopted_at IS NOT NULL FROM report_orphan_tasks WHERE job_id = '4242'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(adopted);
    db.close().await;
}

/// Lease extensions, releases and poll times commit without waiting for the WAL flush,
/// for their own transaction only: the setting is off inside such a statement and back
/// to the server's on the same connection right after (so nothing leaks to the next
/// statement, nor through PgBouncer to another client). A release really runs that way
/// and leaves the connection as it found it; a claim waits for its flush.
#[tokio::test]
async fn writes_that_may_be_lost_do_not_wait_for_the_flush_and_nothing_leaks() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let inside: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "WITH {} SELECT current_setting('synchronous_commit') FROM no_flush_wait",
        queue::NO_FLUSH_WAIT
    )))
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(inside, "off");
    let after: String = sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(after, "on", "the setting must not outlive its statement");
    drop(conn);

    let id = enqueue(&db.pool, Some("华为"), None, None, "pdf").await;
    // One connection, so the statements and the looks after them share a session.
    let one = queue::connect(&db.url, 1).await.unwrap();
    let claimed = queue::claim(&one, "a", Duration::from_secs(30), 1, ClaimKinds::ALL)
        .await
        .unwrap();
    assert_eq!(claimed.iter().map(|r| r.id).collect::<Vec<_>>(), vec![id]);
    let released = queue::release(&one, &[(id, claimed[0].lease_token)])
        .await
        .unwrap();
    assert_eq!(released, 1);
    let after: String = sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
        .fetch_one(&*one)
        .await
        .unwrap();
    assert_eq!(after, "on");
    let again = queue::claim(&one, "b", Duration::from_secs(30), 1, ClaimKinds::ALL)
        .await
        .unwrap();
    assert_eq!(again.len(), 1, "the released row is claimed again");
    one.close().await;
    db.close().await;
}

/// A completion stores a document only for the row's own task: a holder whose job id is
/// not the row's (however it came to hold the row) stores nothing and is told so.
#[tokio::test]
async fn a_document_is_stored_only_for_the_rows_own_task() {
    use report_worker::domain::{Document, DocumentBody, ReportType};
    let db = TestDb::new().await;
    queue::fixtures::insert_generating(&db.pool, &["111".to_string()], ReportType::Pdf, 0.0)
        .await
        .unwrap();
    let claimed = queue::claim(&db.pool, "a", Duration::from_secs(30), 1, ClaimKinds::ALL)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let completed = |job: &str| queue::Completed {
        id: claimed[0].id,
        token: claimed[0].lease_token,
        job_id: JobId::parse(job).unwrap(),
        document: Document {
            content_type: "application/pdf",
            file_name: "x.pdf".into(),
            sha256: "0".repeat(64),
            byte_size: 4,
            body: DocumentBody::Inline(b"%PDF".to_vec()),
            provider_company: None,
        },
        observe: false,
    };
    let other = queue::complete_batch(&db.pool, &[completed("222")])
        .await
        .unwrap();
    assert!(
        other.is_empty(),
        "another task's document was stored: {other:?}"
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM report_documents").await,
        0
    );
    // A job id written by hand with leading zeros is still the same task.
    sqlx::query("UPDATE report_requests SET upstream_job_id = '00111' WHERE id = $1")
        .bind(claimed[0].id)
        .execute(&db.pool)
        .await
        .unwrap();
    let own = queue::complete_batch(&db.pool, &[completed("111")])
        .await
        .unwrap();
    assert_eq!(own, vec![(claimed[0].id, queue::Stored::Finished)]);
    db.close().await;
}
