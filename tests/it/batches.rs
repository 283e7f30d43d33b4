//! Fair share between batches (round-robin claims, weights, priorities) and the batch
//! forecast, computed by hand for small cases.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::*;
use report_worker::queue::{self, ClaimKinds, Db};

async fn load(pool: &Db, batch: Option<&str>, rows: i64, priority: i16) {
    sqlx::query(
        "INSERT INTO report_requests (company_name, report_type, batch, priority)
         SELECT coalesce($1, 'none') || '-' || i, 'pdf', $1, $3 FROM generate_series(1, $2) i",
    )
    .bind(batch)
    .bind(rows)
    .bind(priority)
    .execute(pool)
    .await
    .unwrap();
}

/// Claims `n` queued rows; returns the batch ('-' for none) of each, in claim order.
async fn claim_batches(pool: &Db, n: i64) -> Vec<(String, i64)> {
    queue::claim(pool, "w", Duration::from_secs(300), n, ClaimKinds::CREATES)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.batch.unwrap_or_else(|| "-".into()), r.id))
        .collect()
}

/// Rows of `batch` no claim has taken yet.
async fn unclaimed(pool: &Db, batch: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM report_requests WHERE batch = $1 AND lease_owner IS NULL",
    )
    .bind(batch)
    .fetch_one(pool)
    .await
    .unwrap()
}

fn tally(claimed: &[(String, i64)]) -> HashMap<String, usize> {
    let mut t = HashMap::new();
    for (b, _) in claimed {
        *t.entry(b.clone()).or_default() += 1;
    }
    t
}

#[tokio::test]
async fn claims_go_round_robin_across_batches_and_rows_without_one() {
    let db = TestDb::from_template().await;
    // A large batch loaded first, then a small one and a few rows without a batch.
    load(&db.pool, Some("A"), 300, 0).await;
    load(&db.pool, Some("B"), 12, 0).await;
    load(&db.pool, None, 12, 0).await;

    // One claim of 12: a round is one row of each group, so exactly 4 of each.
    let first = claim_batches(&db.pool, 12).await;
    let t = tally(&first);
    assert_eq!(
        (t["A"], t["B"], t["-"]),
        (4, 4, 4),
        "one claim shares across the three groups: {first:?}"
    );
    // Within a group, the order is still id order.
    for group in ["A", "B", "-"] {
        let ids: Vec<i64> = first
            .iter()
            .filter(|(b, _)| b == group)
            .map(|(_, id)| *id)
            .collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "group {group} in its own order");
    }
    // Claims of one row (a busy worker whose slots free one at a time) share too: a
    // random group leads each claim's round, never always the oldest batch.
    let mut singles = Vec::new();
    for _ in 0..15 {
        singles.extend(claim_batches(&db.pool, 1).await);
    }
    let t = tally(&singles);
    assert!(
        t.get("B").copied().unwrap_or(0) >= 1 && t.get("-").copied().unwrap_or(0) >= 1,
        "claims of one row reach every group: {t:?}"
    );
    // The small batch is done long before the large one: B's 12 rows are all claimed
    // within the claims that take 3 × 12 rows, while A still has most of its 300.
    let mut rest = Vec::new();
    while unclaimed(&db.pool, "B").await > 0 {
        rest.extend(claim_batches(&db.pool, 6).await);
        assert!(
            rest.len() < 60,
            "B's rows are claimed within a few rounds: {rest:?}"
        );
    }
    let a_left = unclaimed(&db.pool, "A").await;
    assert!(
        a_left > 250,
        "A waits its turn, it is not drained first ({a_left} left)"
    );
    db.close().await;
}

#[tokio::test]
async fn a_batch_weight_is_its_share_of_each_round_and_a_bad_weight_is_refused_by_name() {
    let db = TestDb::from_template().await;
    load(&db.pool, Some("A"), 100, 0).await;
    load(&db.pool, Some("B"), 100, 0).await;
    let w: f32 = sqlx::query_scalar("SELECT report_set_batch_weight('A', 3)")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(w, 3.0);
    let claimed = claim_batches(&db.pool, 8).await;
    let t = tally(&claimed);
    assert_eq!(
        (t["A"], t["B"]),
        (6, 2),
        "weight 3 takes three rows a round: {claimed:?}"
    );

    // Claims of one row: each from a group chosen in proportion to its weight.
    let mut singles = Vec::new();
    for _ in 0..80 {
        singles.extend(claim_batches(&db.pool, 1).await);
    }
    let a = tally(&singles).get("A").copied().unwrap_or(0) as f64 / singles.len() as f64;
    assert!(
        (0.55..=0.92).contains(&a),
        "weight 3 of 4 takes about 75 % of single claims, took {a}"
    );

    for (sql, expect) in [
        (
            "SELECT report_set_batch_weight('A', 0)",
            "report_batches_weight_out_of_range",
        ),
        (
            "SELECT report_set_batch_weight('A', 5000)",
            "report_batches_weight_out_of_range",
        ),
        (
            "SELECT report_set_batch_weight('nope', 2)",
            "no batch named nope",
        ),
    ] {
        let e = sqlx::query(sql).execute(&db.pool).await.unwrap_err();
        let text = match &e {
            sqlx::Error::Database(d) => format!("{} {}", d.message(), d.constraint().unwrap_or("")),
            other => other.to_string(),
        };
        assert!(text.contains(expect), "{sql}: {text}");
    }
    // A direct update is held to the same bound.
    let e = sqlx::query("UPDATE report_batches SET weight = -1 WHERE batch = 'B'")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("report_batches_weight_out_of_range"),
        "{e}"
    );
    db.close().await;
}

#[tokio::test]
async fn priorities_still_win_across_batches() {
    let db = TestDb::from_template().await;
    load(&db.pool, Some("A"), 40, 0).await;
    load(&db.pool, Some("B"), 40, 5).await;
    load(&db.pool, Some("urgent"), 3, -1).await;
    // 20 rows: the 3 urgent ones, then only priority 0 (A), never B's priority 5 while
    // A has rows of a higher priority left.
    let claimed = claim_batches(&db.pool, 20).await;
    let t = tally(&claimed);
    assert_eq!(
        t.get("urgent"),
        Some(&3),
        "the higher priority first: {claimed:?}"
    );
    assert_eq!(
        t.get("B"),
        None,
        "no lower priority before A's: {claimed:?}"
    );
    assert!(t["A"] >= 1);
    // Once A is all claimed, B's rows come.
    while unclaimed(&db.pool, "A").await > 0 {
        let got = claim_batches(&db.pool, 20).await;
        assert!(!got.is_empty());
        assert!(
            got.iter().all(|(b, _)| b == "A") || unclaimed(&db.pool, "A").await == 0,
            "B only after A: {got:?}"
        );
    }
    claim_batches(&db.pool, 100).await;
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM report_requests WHERE batch = 'B' AND lease_owner IS NOT NULL"
        )
        .await,
        40
    );
    db.close().await;
}

#[derive(Debug, sqlx::FromRow)]
struct Forecast {
    batch: String,
    share: f64,
    calls_per_report: f64,
    served_share: f64,
    seconds_per_report: f64,
    creates_left: i64,
    calls_left: i64,
    runs_into_daily_limit_at: Option<chrono::DateTime<chrono::Utc>>,
    provider_days: Option<i32>,
    /// Seconds from the forecast's moment.
    finish_in: Option<f64>,
    limited_by: String,
}

const AT: &str = "2026-12-01 04:00:00+00"; // noon in Asia/Shanghai

fn at() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_str(AT, "%Y-%m-%d %H:%M:%S%#z")
        .unwrap()
        .to_utc()
}

async fn forecast(pool: &Db) -> HashMap<String, Forecast> {
    sqlx::query_as::<_, Forecast>(
        "SELECT batch, share, calls_per_report, served_share, seconds_per_report, creates_left, calls_left,
                runs_into_daily_limit_at, provider_days,
                extract(epoch FROM finish_at - $1::timestamptz)::float8 AS finish_in, limited_by
           FROM report_batch_forecast_at($1::timestamptz)",
    )
    .bind(AT)
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|f| (f.batch.clone(), f))
    .collect()
}

async fn worker_with(pool: &Db, limits: serde_json::Value) {
    sqlx::query(
        "INSERT INTO report_workers (owner, accounts, account_limits, seen_at) VALUES ('w', '{acct}', $1, $2::timestamptz)
         ON CONFLICT (owner) DO UPDATE SET account_limits = excluded.account_limits, seen_at = excluded.seen_at",
    )
    .bind(limits)
    .bind(AT)
    .execute(pool)
    .await
    .unwrap();
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 0.01
}

#[tokio::test]
async fn the_forecast_shares_the_accounts_calls_by_weight_and_spills_over_the_daily_limit() {
    let db = TestDb::from_template().await;
    load(&db.pool, Some("A"), 100, 0).await;
    load(&db.pool, Some("B"), 50, 0).await;
    // No worker: no forecast, and it says why.
    let f = forecast(&db.pool).await;
    assert_eq!(f["A"].limited_by, "no_worker");
    assert_eq!(f["A"].finish_in, None);

    // 2 calls a second, no daily limit; nothing finished yet, so the defaults: 6 calls
    // a report, 300 s from a create to the end.
    worker_with(
        &db.pool,
        serde_json::json!({"acct": {"qps": 2, "daily_limit": null}}),
    )
    .await;
    let f = forecast(&db.pool).await;
    let (a, b) = (&f["A"], &f["B"]);
    assert_eq!(
        (a.creates_left, a.calls_left, b.creates_left, b.calls_left),
        (100, 600, 50, 300)
    );
    assert!(close(a.share, 0.5) && close(b.share, 0.5));
    assert!(close(a.calls_per_report, 6.0) && close(a.seconds_per_report, 300.0));
    // B, half the calls until its 300 are made: 600 calls at 2/s = 300 s, + 300 s.
    // A: its own 600 and B's 300: 450 s, + 300 s.
    assert!(close(b.finish_in.unwrap(), 600.0), "{b:?}");
    assert!(close(a.finish_in.unwrap(), 750.0), "{a:?}");
    assert_eq!((a.limited_by.as_str(), a.provider_days), ("qps", Some(1)));

    // Weight 3 for A: A 0.75 of the calls; A's 600 and a third of that for B (200): 400
    // s; B: all 900 calls, 450 s.
    sqlx::query("SELECT report_set_batch_weight('A', 3)")
        .execute(&db.pool)
        .await
        .unwrap();
    let f = forecast(&db.pool).await;
    let (a, b) = (&f["A"], &f["B"]);
    assert!(close(a.share, 0.75) && close(b.share, 0.25));
    assert!(close(a.finish_in.unwrap(), 700.0), "{a:?}");
    assert!(close(b.finish_in.unwrap(), 750.0), "{b:?}");
    sqlx::query("SELECT report_set_batch_weight('A', 1)")
        .execute(&db.pool)
        .await
        .unwrap();

    // A daily limit of 120 creates with 30 used today (the provider's day of AT): 90
    // left. B's last create comes after 100 creates (50 of A, 50 of its own), so it
    // spills into tomorrow: today's 90 run out at 300 s × 90/100 = 270 s, the last 10
    // creates take 30 s after Shanghai's midnight, then 300 s.
    worker_with(
        &db.pool,
        serde_json::json!({"acct": {"qps": 2, "daily_limit": 120, "headroom": 0}}),
    )
    .await;
    sqlx::query(
        "INSERT INTO report_daily_creates (account, day, used) VALUES ('acct', '2026-12-01', 30)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let f = forecast(&db.pool).await;
    let b = &f["B"];
    assert_eq!(
        (b.limited_by.as_str(), b.provider_days),
        ("daily_limit", Some(2)),
        "{b:?}"
    );
    let at = at();
    let out_at = b.runs_into_daily_limit_at.unwrap();
    assert_eq!((out_at - at).num_seconds(), 270, "{b:?}");
    // Midnight in Shanghai is 16:00 UTC: 12 h after AT.
    assert!(
        close(b.finish_in.unwrap(), 12.0 * 3600.0 + 30.0 + 300.0),
        "{b:?}"
    );
    // A needs 150 creates: 90 today, 60 tomorrow (of 120), 450 s × 60/150 = 180 s.
    let a = &f["A"];
    assert!(
        close(a.finish_in.unwrap(), 12.0 * 3600.0 + 180.0 + 300.0),
        "{a:?}"
    );
    // Headroom kept for retries is not for new rows: 30 used + 90 headroom leaves none
    // today, 30 a day after; B's 100 creates end on its fourth provider day.
    worker_with(
        &db.pool,
        serde_json::json!({"acct": {"qps": 2, "daily_limit": 120, "headroom": 90}}),
    )
    .await;
    let b = &forecast(&db.pool).await["B"];
    assert_eq!(b.provider_days, Some(5), "{b:?}");
    db.close().await;
}

#[tokio::test]
async fn the_forecast_learns_calls_reuse_and_duration_from_the_batchs_finished_rows() {
    let db = TestDb::from_template().await;
    // Ten finished rows: eight made a task (1 create + 3 polls, 200 s from create to
    // end), two were served from a stored document; 50 queued.
    sqlx::query(
        "INSERT INTO report_requests (company_name, report_type, batch, state, attempts, creates_sent, polls,
                                      upstream_job_id, upstream_created_at, finished_at)
         SELECT 'done-' || i, 'pdf', 'C', 'succeeded', CASE WHEN i <= 8 THEN 1 ELSE 0 END,
                CASE WHEN i <= 8 THEN 1 ELSE 0 END, CASE WHEN i <= 8 THEN 3 ELSE 0 END,
                CASE WHEN i <= 8 THEN (1000 + i)::text END,
                CASE WHEN i <= 8 THEN $1::timestamptz - interval '1 hour' END,
                CASE WHEN i <= 8 THEN $1::timestamptz - interval '1 hour' + interval '200 seconds'
                     ELSE $1::timestamptz - interval '1 hour' END
           FROM generate_series(1, 10) i",
    )
    .bind(AT)
    .execute(&db.pool)
    .await
    .unwrap();
    load(&db.pool, Some("C"), 50, 0).await;
    worker_with(&db.pool, serde_json::json!({"acct": {"qps": 1}})).await;
    let f = forecast(&db.pool).await;
    let c = &f["C"];
    assert!(
        close(c.calls_per_report, 4.0)
            && close(c.served_share, 0.2)
            && close(c.seconds_per_report, 200.0),
        "{c:?}"
    );
    // 50 queued, a fifth served: 40 creates, 160 calls at 1/s, then 200 s.
    assert_eq!((c.creates_left, c.calls_left), (40, 160));
    assert!(close(c.finish_in.unwrap(), 360.0), "{c:?}");
    // The view is the function at now(), and status and the dashboard read it.
    let line = report_worker::ops::status::batch_text(&db.pool, "C").await;
    let line = line.unwrap();
    assert!(
        line.contains("forecast:") && line.contains("40 paid tasks"),
        "{line}"
    );
    db.close().await;
}

#[tokio::test]
async fn a_daily_limit_the_calls_cannot_reach_does_not_decide_the_forecast() {
    let db = TestDb::from_template().await;
    // 100 rows of 6 calls at 0.01 calls a second: 60,000 s, past Shanghai's midnight
    // (12 h after AT). The calls allow 144 creates a day, under the limit of 1,000: the
    // QPS decides, not the limit, though the creates span two provider days.
    load(&db.pool, Some("D"), 100, 0).await;
    worker_with(
        &db.pool,
        serde_json::json!({"acct": {"qps": 0.01, "daily_limit": 1000}}),
    )
    .await;
    let d = &forecast(&db.pool).await["D"];
    assert_eq!(
        (d.limited_by.as_str(), d.provider_days),
        ("qps", Some(2)),
        "{d:?}"
    );
    assert_eq!(d.runs_into_daily_limit_at, None);
    assert!(close(d.finish_in.unwrap(), 60_000.0 + 300.0), "{d:?}");
    // A limit below what the calls allow in a day decides: 50 creates a day, the 100
    // take today's 50 (of 72 the calls allow before midnight) and tomorrow's 50.
    worker_with(
        &db.pool,
        serde_json::json!({"acct": {"qps": 0.01, "daily_limit": 50}}),
    )
    .await;
    let d = &forecast(&db.pool).await["D"];
    assert_eq!(
        (d.limited_by.as_str(), d.provider_days),
        ("daily_limit", Some(2)),
        "{d:?}"
    );
    // Today's 50 at a create every 600 s: 30,000 s; tomorrow's last 50 after midnight.
    let at = at();
    assert_eq!(
        (d.runs_into_daily_limit_at.unwrap() - at).num_seconds(),
        30_000,
        "{d:?}"
    );
    assert!(
        close(d.finish_in.unwrap(), 12.0 * 3600.0 + 30_000.0 + 300.0),
        "{d:?}"
    );
    // Bad limits a worker could publish never make the forecast fail.
    worker_with(
        &db.pool,
        serde_json::json!({"acct": {"qps": "fast", "daily_limit": 1000.5, "headroom": -3}}),
    )
    .await;
    let d = &forecast(&db.pool).await["D"];
    assert_eq!(d.limited_by, "no_calls_yet", "{d:?}");
    worker_with(&db.pool, serde_json::json!([1, 2])).await;
    let d = &forecast(&db.pool).await["D"];
    assert_eq!(d.limited_by, "no_worker", "{d:?}");
    db.close().await;
}

#[tokio::test]
async fn a_claim_fills_up_when_groups_cannot_give_their_share() {
    let db = TestDb::from_template().await;
    // A with 100 due rows beside 20 batches whose rows all wait for a later time.
    load(&db.pool, Some("A"), 100, 0).await;
    for i in 0..20 {
        sqlx::query(
            "INSERT INTO report_requests (company_name, report_type, batch, run_after)
             SELECT 'later-' || $1 || '-' || i, 'pdf', 'later-' || $1, now() + interval '1 hour'
               FROM generate_series(1, 5) i",
        )
        .bind(i)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    assert_eq!(
        claim_batches(&db.pool, 50).await.len(),
        50,
        "future rows take no share"
    );
    // Rows without a batch beside batches whose every row is leased.
    load(&db.pool, None, 100, 0).await;
    for i in 0..9 {
        let b = format!("leased-{i}");
        load(&db.pool, Some(&b), 3, 0).await;
        sqlx::query("UPDATE report_requests SET lease_owner = 'x', lease_expires_at = now() + interval '1 hour' WHERE batch = $1")
            .bind(&b)
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let got = claim_batches(&db.pool, 20).await;
    assert_eq!(got.len(), 20, "leased rows take no share: {got:?}");
    // Another claimer holds the first rows of both groups with rows: they are passed over.
    let mut other = db.pool.begin().await.unwrap();
    sqlx::query(
        "SELECT id FROM report_requests WHERE state = 'queued' AND lease_owner IS NULL AND run_after <= now()
          ORDER BY id LIMIT 60 FOR UPDATE",
    )
    .execute(&mut *other)
    .await
    .unwrap();
    let got = claim_batches(&db.pool, 20).await;
    assert_eq!(
        got.len(),
        20,
        "rows another claimer holds are skipped, not counted: {got:?}"
    );
    other.rollback().await.unwrap();
    db.close().await;
}

#[tokio::test]
async fn a_claim_fills_up_across_priorities_spread_over_groups() {
    let db = TestDb::from_template().await;
    // A: one row of priority 0, then 50 of priority 5; B: 50 of priority 1.
    load(&db.pool, Some("A"), 1, 0).await;
    load(&db.pool, Some("A"), 50, 5).await;
    load(&db.pool, Some("B"), 50, 1).await;
    let got = claim_batches(&db.pool, 10).await;
    let t = tally(&got);
    assert_eq!(
        (t.get("A"), t.get("B")),
        (Some(&1), Some(&9)),
        "A's urgent row, then B's: {got:?}"
    );
    // Another claimer holds A's rows of priority 5: B's next rows come, none is lost.
    let mut other = db.pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM report_requests WHERE batch = 'A' AND priority = 5 FOR UPDATE")
        .execute(&mut *other)
        .await
        .unwrap();
    let got = claim_batches(&db.pool, 10).await;
    assert_eq!(tally(&got).get("B"), Some(&10), "{got:?}");
    other.rollback().await.unwrap();
    // Four groups with one row each at priorities 0 to 3 and one with 100 at 4: a claim of
    // 10 takes the four, then six of the fifth.
    let db2 = TestDb::from_template().await;
    for (i, b) in ["P0", "P1", "P2", "P3"].iter().enumerate() {
        load(&db2.pool, Some(b), 1, i as i16).await;
    }
    load(&db2.pool, Some("P4"), 100, 4).await;
    let got = claim_batches(&db2.pool, 10).await;
    assert_eq!(got.len(), 10, "{got:?}");
    assert_eq!(tally(&got).get("P4"), Some(&6), "{got:?}");
    // A weight at its documented minimum is accepted.
    let w: f32 = sqlx::query_scalar("SELECT report_set_batch_weight('P4', 0.01)")
        .fetch_one(&db2.pool)
        .await
        .unwrap();
    assert!((w - 0.01).abs() < 1e-6);
    db.close().await;
    db2.close().await;
}
