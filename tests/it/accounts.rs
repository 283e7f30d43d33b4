//! Several accounts (`UPSTREAM_ACCOUNTS`): creates spread over the accounts by weight,
//! each task polled by the account that created it, pacing and stops per account.

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use report_worker::engine::metrics::Metrics;
use report_worker::engine::{AccountSetup, Worker};
use report_worker::simulator::{Endpoint, Fault, Injection, SimAccount, SimConfig, SimStats};
use report_worker::upstream::{Client, ClientConfig};

const SECOND: &str = "second-client";

fn setup(name: &str, client: ClientConfig, qps: f64) -> AccountSetup {
    AccountSetup {
        name: name.into(),
        client: Client::new(client).unwrap(),
        qps,
        daily_limit: None,
        weight: qps,
    }
}

async fn spawn_two(db: &TestDb, sim: &report_worker::simulator::Simulator) -> RunningWorker {
    let first = sim.config().client_id.clone();
    let accounts = vec![
        setup(&first, sim.client_config(), 2.0),
        setup(SECOND, sim.client_config_for(SECOND).unwrap(), 6.0),
    ];
    let config = fast_worker_config(&first);
    let pool = report_worker::queue::connect_worker(&db.url, 12)
        .await
        .unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let worker = Worker::with_accounts(pool, accounts, config, Arc::new(Metrics::new()));
    let handle = tokio::spawn(worker.run(cancel.clone()));
    RunningWorker { cancel, handle }
}

fn calls(stats: &SimStats, account: &str, key: &str) -> u64 {
    stats
        .accounts
        .get(account)
        .and_then(|a| a.calls.get(key).copied())
        .unwrap_or(0)
}

fn tasks(stats: &SimStats, account: &str) -> u64 {
    stats.accounts.get(account).map_or(0, |a| a.tasks_created)
}

#[tokio::test]
async fn two_accounts_share_the_work_each_within_its_own_qps_with_stops_apart() {
    let db = TestDb::new().await;
    // The provider allows 3 calls a second on the first account and 8 on the second;
    // the worker is configured below both (2 and 6).
    let sim = start_sim(SimConfig {
        qps: Some(3),
        accounts: vec![SimAccount {
            client_id: SECOND.into(),
            client_secret: "second-secret".into(),
            qps: Some(8),
        }],
        ..SimConfig::instant()
    })
    .await;
    let first = sim.config().client_id.clone();
    for i in 0..32 {
        enqueue(&db.pool, Some(&format!("双账户{i}")), None, None, "pdf").await;
    }
    let w = spawn_two(&db, &sim).await;
    wait_all_finished(&db.pool, Duration::from_secs(90)).await;
    let stats = sim.stats();
    // Every row succeeded with exactly one paid task, polled by the account that
    // created it (the provider knows a task only under its creator).
    let succeeded = count(
        &db.pool,
        "SELECT count(*) FROM report_requests WHERE state = 'succeeded'",
    )
    .await;
    assert_eq!(succeeded, 32);
    assert_eq!(stats.tasks_created, 32, "{stats:?}");
    assert_eq!(stats.calls("status:another_accounts_job"), 0, "{stats:?}");
    // Creates split by weight (2 : 6): both accounts used, the faster one more.
    let (a, b) = (tasks(&stats, &first), tasks(&stats, SECOND));
    eprintln!("per account: {:?}", stats.accounts);
    assert!(a >= 2 && b > a, "tasks per account: {a} and {b}");
    // Each row records the account that created its task, and the counts agree.
    let by_account: Vec<(String, i64)> = sqlx::query_as(
        "SELECT account, count(*) FROM report_requests GROUP BY account ORDER BY account",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut expected = vec![(first.clone(), a as i64), (SECOND.to_string(), b as i64)];
    expected.sort();
    assert_eq!(by_account, expected);
    // Each account's pacing is its own: a pacing shared at the larger QPS would run
    // the first account at 6 calls a second against the provider's 3.
    for account in [first.as_str(), SECOND] {
        let metered: u64 = stats.accounts[account]
            .calls
            .iter()
            .filter(|(k, _)| k.starts_with("create:ok") || k.starts_with("status:ok"))
            .map(|(_, n)| n)
            .sum();
        assert!(metered > calls(&stats, account, "create:ok"), "{stats:?}");
        let too_fast =
            calls(&stats, account, "create:67200002") + calls(&stats, account, "status:67200002");
        assert!(
            too_fast * 10 <= metered,
            "{account}: {too_fast} of {metered} calls too fast"
        );
    }

    // The second account runs out of balance: only it stops (for creates), the first
    // takes the new rows, and nothing fails.
    sim.inject(Injection {
        endpoint: Endpoint::Create,
        fault: Fault::Code { code: 67200005 },
        count: 10_000,
        client: Some(SECOND.into()),
    });
    for i in 0..10 {
        enqueue(&db.pool, Some(&format!("停一个{i}")), None, None, "word").await;
    }
    wait_all_finished(&db.pool, Duration::from_secs(90)).await;
    w.stop().await;
    let after = sim.stats();
    assert_eq!(tasks(&after, SECOND), b, "the stopped account made no task");
    assert_eq!(tasks(&after, &first), a + 10);
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM report_requests WHERE state = 'succeeded'"
        )
        .await,
        42
    );
    let stops: Vec<(String, Option<i32>, String)> =
        sqlx::query_as("SELECT account, error_code, scope FROM report_account_stops")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        stops,
        vec![(SECOND.to_string(), Some(67200005), "create".to_string())]
    );
}

#[tokio::test]
async fn a_task_created_by_one_account_is_polled_by_it_even_from_another_process() {
    // One process has only the second account, the other both. Whatever process
    // claims a poll, the call goes out under the account recorded on the row; a
    // process without that account leaves the row to one that has it.
    let db = TestDb::new().await;
    let sim = start_sim(SimConfig {
        generation_time: (Duration::from_millis(300), Duration::from_millis(600)),
        accounts: vec![SimAccount {
            client_id: SECOND.into(),
            client_secret: "second-secret".into(),
            qps: None,
        }],
        ..SimConfig::instant()
    })
    .await;
    let first = sim.config().client_id.clone();
    for i in 0..12 {
        enqueue(&db.pool, Some(&format!("跨进程{i}")), None, None, "pdf").await;
    }
    let both = spawn_two(&db, &sim).await;
    let only_second = {
        let pool = report_worker::queue::connect_worker(&db.url, 12)
            .await
            .unwrap();
        let cancel = tokio_util::sync::CancellationToken::new();
        let mut config = fast_worker_config(SECOND);
        config.owner = "only-second".into();
        let accounts = vec![setup(SECOND, sim.client_config_for(SECOND).unwrap(), 0.0)];
        let worker = Worker::with_accounts(pool, accounts, config, Arc::new(Metrics::new()));
        let handle = tokio::spawn(worker.run(cancel.clone()));
        RunningWorker { cancel, handle }
    };
    wait_all_finished(&db.pool, Duration::from_secs(90)).await;
    both.stop().await;
    only_second.stop().await;
    let stats = sim.stats();
    assert_eq!(stats.calls("status:another_accounts_job"), 0, "{stats:?}");
    assert_eq!(stats.tasks_created, 12, "{stats:?}");
    assert!(
        tasks(&stats, &first) > 0 && tasks(&stats, SECOND) > 0,
        "{stats:?}"
    );
    let failed = count(
        &db.pool,
        "SELECT count(*) FROM report_requests WHERE state <> 'succeeded'",
    )
    .await;
    assert_eq!(failed, 0);
}
