//! The queue's engine statements on a real database: claims, fencing, leases, pacing
//! and the account stop.

use std::time::Duration;

use crate::common::*;
use report_worker::domain::{JobId, StopScope};
use report_worker::queue::{self, ClaimKinds, Fenced};

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
    // The holder of `high` commits its task.
    let high_row = a.iter().find(|r| r.id == high).unwrap();
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
        queue::fail(&db.pool, id, a[0].lease_token, Some(1), "stale")
            .await
            .unwrap(),
        Fenced::Lost,
        "old holder is fenced"
    );
    assert_eq!(
        queue::fail(&db.pool, id, b[0].lease_token, Some(2), "current")
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
        1
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
    )
    .await
    .unwrap();
    let stop = queue::read_stop(&db.pool, acct).await.unwrap().unwrap();
    assert_eq!(
        (stop.scope.as_str(), stop.error_code, stop.probe_due),
        ("create", Some(67200005), true)
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
