//! The fault-schedule simulation: the real engine, configured by `run`'s own parser,
//! against the simulator, under a random schedule of every fault the simulator can
//! make — errors and gateway pages before and after a task is made, slow and lost
//! answers, outages, account stops — with the database's connections cut through a
//! proxy, worker processes killed (their runtime dropped mid-flight, as `kill -9` drops a
//! process) and restarted, rows in three groups (two batches and none) claimed
//! round-robin while the batches' weights change, cancelled and retried (one by one and
//! by batch), reuse on and off, two accounts. After each schedule, the promises are checked against the
//! simulator's own ground truth (the tasks it made, the documents it served):
//!
//! - no identifier pays for more tasks than its rows sent creates, and no row sent more
//!   creates than `max_attempts` per life (never two tasks for one attempt);
//! - every stored document is byte for byte one the simulator served, for a task of the
//!   row's company (the simulator's own resolution) and report type — by exactly the
//!   row's identifiers, unless the row names the company one way and was served across
//!   identifiers the provider's file names confirm — and a reuse copy was downloaded
//!   within the row's window;
//! - every row ends;
//! - no task is polled under an account that did not create it;
//! - the ledger accounts for every task the simulator made, and counts none it did not;
//! - a row's trace context, once a claim gave it one, never changes except for a new
//!   report span when a finished row comes back to life, and is in the application's
//!   trace when the row named one (claims that write trace contexts beside claims that do
//!   not; the exporter itself is tested in `traces`).
//!
//! A schedule is a pure function of its seed; a failing one prints its seed. CI runs the
//! seeds of `ci_seeds`; `many_seeds` runs as many as `TORTURE_SEEDS` says (docs/development.md).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::common::*;
use report_worker::engine::Worker;
use report_worker::engine::metrics::Metrics;
use report_worker::simulator::{Endpoint, Fault, Injection, SimAccount, SimConfig, Simulator};

const SECOND: &str = "second-client";
const SECOND_SECRET: &str = "second-secret";
/// The deployment's reuse window when a schedule turns reuse on.
const REUSE_WITHIN_SECS: f64 = 3600.0;

/// What `run` is given in every schedule: the binary's settings with seconds made into
/// milliseconds (the same engine, faster).
const FLAGS: &[&str] = &[
    "--worker-concurrency",
    "8",
    "--upstream-timeout",
    "1s",
    "--worker-lease",
    "1500ms",
    "--worker-idle-poll",
    "100ms",
    "--worker-shutdown-timeout",
    "2s",
    "--upstream-stop-probe",
    "200ms",
    "--report-first-poll",
    "100ms",
    "--report-poll-min",
    "150ms",
    "--report-poll-max",
    "300ms",
    "--report-window",
    "1500ms",
    "--report-give-up-after",
    "3s",
    "--report-retry-min",
    "50ms",
    "--report-retry-max",
    "400ms",
    "--report-new-task-after",
    "100ms",
    "--report-download-tries",
    "2",
    "--upstream-download-timeout",
    "3s",
];

/// One worker process: its own runtime, so that a kill drops everything it runs at once
/// (row tasks, heartbeat, LISTEN, writers, connections), wherever each one is.
struct Process {
    runtime: Option<tokio::runtime::Runtime>,
    cancel: CancellationToken,
    done: Option<tokio::sync::oneshot::Receiver<()>>,
    both_accounts: bool,
}

impl Process {
    async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(done) = self.done.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), done).await;
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }

    fn kill(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Everything one schedule needs.
struct Schedule {
    seed: u64,
    rng: StdRng,
    db: TestDb,
    proxy: DbProxy,
    sim: Simulator,
    dir: tempfile::TempDir,
    reuse: bool,
    procs: Vec<Process>,
    spawned: usize,
    rows: Vec<i64>,
    log: Vec<String>,
    /// Each row's `trace_context` as first seen: it must never change.
    traces: HashMap<i64, String>,
    trace_changes: Vec<String>,
}

/// A valid unified social credit code (its check character computed) from 17 characters.
fn credit_code(body: &str) -> String {
    const CHARS: &[u8] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";
    const WEIGHTS: [usize; 17] = [
        1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28,
    ];
    let sum: usize = body
        .bytes()
        .zip(WEIGHTS)
        .map(|(c, w)| CHARS.iter().position(|&x| x == c).unwrap() * w)
        .sum();
    format!("{body}{}", CHARS[(31 - sum % 31) % 31] as char)
}

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

impl Schedule {
    async fn new(seed: u64) -> Schedule {
        let mut rng = StdRng::seed_from_u64(seed);
        let generation_max = *pick(&mut rng, &[1_000u64, 2_000, 4_000]);
        let sim = start_sim(SimConfig {
            create_latency: (Duration::ZERO, Duration::from_millis(150)),
            generation_time: (
                Duration::from_millis(150),
                Duration::from_millis(generation_max),
            ),
            failure_rate: 0.05,
            fault_rate: *pick(&mut rng, &[0.0, 0.03, 0.1]),
            seed: Some(seed),
            doc_size: 3_000,
            accounts: vec![SimAccount {
                client_id: SECOND.into(),
                client_secret: SECOND_SECRET.into(),
                qps: None,
            }],
            ..SimConfig::instant()
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("first"), &sim.config().client_secret).unwrap();
        std::fs::write(dir.path().join("second"), SECOND_SECRET).unwrap();
        std::fs::write(
            dir.path().join("accounts.toml"),
            format!(
                "[[account]]\nid = {:?}\nsecret_file = {:?}\n[[account]]\nid = {SECOND:?}\nsecret_file = {:?}\n",
                sim.config().client_id,
                dir.path().join("first").display().to_string(),
                dir.path().join("second").display().to_string(),
            ),
        )
        .unwrap();
        let reuse = rng.random_bool(0.5);
        Schedule {
            seed,
            rng,
            db: TestDb::from_template().await,
            proxy: DbProxy::start().await,
            sim,
            dir,
            reuse,
            procs: Vec::new(),
            spawned: 0,
            rows: Vec::new(),
            log: Vec::new(),
            traces: HashMap::new(),
            trace_changes: Vec::new(),
        }
    }

    /// Starts a worker process, with both accounts (from an UPSTREAM_ACCOUNTS file) or
    /// only the first (from UPSTREAM_CLIENT_ID/SECRET), configured by `run`'s parser.
    fn spawn(&mut self, both: bool) {
        self.spawned += 1;
        let owner = format!("torture-{}-{}", self.seed, self.spawned);
        let url = self.proxy.url_for(&self.db);
        let accounts_file = self.dir.path().join("accounts.toml").display().to_string();
        let secret = self.sim.config().client_secret.clone();
        let mut argv: Vec<String> = vec![
            "--database-url".into(),
            url.clone(),
            "--upstream-base-url".into(),
            self.sim.base_url(),
            "--worker-id".into(),
            owner,
        ];
        if both {
            argv.extend(["--upstream-accounts".into(), accounts_file]);
        } else {
            argv.extend([
                "--upstream-client-id".into(),
                self.sim.config().client_id.clone(),
                "--upstream-client-secret".into(),
                secret,
            ]);
        }
        if self.reuse {
            argv.extend(["--report-reuse-within".into(), "1h".into()]);
        }
        let qps = *pick(&mut self.rng, &["0", "0", "40"]);
        argv.extend(["--upstream-qps".into(), qps.into()]);
        argv.extend(FLAGS.iter().map(|s| s.to_string()));
        let args = report_worker::cli::RunArgs::parse_from(argv).expect("torture flags parse");
        let (client, mut config, specs) = args.configs().expect("torture settings are valid");
        // Processes that export traces beside processes that do not.
        config.trace_rows = self.rng.random_bool(0.5);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let cancel = CancellationToken::new();
        let (tx, done) = tokio::sync::oneshot::channel();
        let stop = cancel.clone();
        runtime.spawn(async move {
            let accounts = report_worker::cli::RunArgs::account_setups(&client, &specs).unwrap();
            let size = report_worker::engine::pool_size(config.concurrency);
            let pool = loop {
                match report_worker::queue::connect_worker(&url, size).await {
                    Ok(pool) => break pool,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            Worker::with_accounts(pool, accounts, config, Arc::new(Metrics::new()))
                .run(stop)
                .await;
            let _ = tx.send(());
        });
        self.procs.push(Process {
            runtime: Some(runtime),
            cancel,
            done: Some(done),
            both_accounts: both,
        });
    }

    async fn insert_row(&mut self) {
        let i = self.rows.len();
        let seed = self.seed;
        let rng = &mut self.rng;
        let shared = *pick(rng, &["共享甲", "共享乙"]);
        let unique = format!("压测{seed}-{i}");
        let code = credit_code(&format!(
            "91110108{:09}",
            rng.random_range(0..1_000_000_000u64)
        ));
        let (name, code, org): (Option<String>, Option<String>, Option<String>) =
            match rng.random_range(0..100) {
                0..55 => (Some(unique), None, None),
                55..70 => (Some(shared.into()), None, None),
                70..76 => (None, Some(code), None),
                76..80 => (None, Some("91110108551385082Q".into()), None),
                80..84 => (None, None, Some("5513850T82".into())),
                84..95 => (Some(shared.into()), Some(code), None),
                // The provider refuses a credit code whose check character is wrong.
                _ => (
                    None,
                    Some(format!("{}0", &code[..17])).filter(|c| *c != code),
                    None,
                ),
            };
        let (name, code) = match (name, code, &org) {
            (None, None, None) => (Some(format!("压测{seed}-{i}")), None),
            (n, c, _) => (n, c),
        };
        let kind = *pick(rng, &["pdf", "word"]);
        let max_attempts = rng.random_range(1..=4);
        let reuse_within = *pick(rng, &[None, None, None, Some("1 hour"), Some("0")]);
        let batch = *pick(rng, &[None, Some("b1"), Some("b2")]);
        // Some applications put the report in their own trace.
        let traceparent = rng.random_bool(0.3).then(|| {
            format!(
                "00-{:032x}-{:016x}-01",
                rng.random_range(1..u128::MAX),
                rng.random_range(1..u64::MAX)
            )
        });
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO report_requests (company_name, credit_code, org_number, report_type, max_attempts,
                                          reuse_within, batch, traceparent)
             VALUES ($1, $2, $3, $4, $5, $6::interval, $7, $8) RETURNING id",
        )
        .bind(name)
        .bind(code)
        .bind(org)
        .bind(kind)
        .bind(max_attempts)
        .bind(reuse_within)
        .bind(batch)
        .bind(traceparent)
        .fetch_one(&self.db.pool)
        .await
        .unwrap();
        self.rows.push(id);
    }

    /// Notes every row's trace context; one that changed is a violation (a row's spans
    /// would be split over two traces).
    async fn watch_traces(&mut self) {
        let now: Vec<(i64, String)> = sqlx::query_as(
            "SELECT id, trace_context FROM report_requests WHERE trace_context IS NOT NULL",
        )
        .fetch_all(&self.db.pool)
        .await
        .unwrap();
        for (id, tc) in now {
            let first = self.traces.entry(id).or_insert_with(|| tc.clone());
            // A retried row's new life has a new report span in the same trace.
            if first.get(..35) != tc.get(..35) {
                self.trace_changes
                    .push(format!("row {id}: trace context {first} became {tc}"));
            }
            *first = tc;
        }
    }

    fn fault(&mut self) -> Injection {
        let rng = &mut self.rng;
        let (endpoint, fault) = match rng.random_range(0..100) {
            0..45 => (
                Endpoint::Create,
                match rng.random_range(0..13) {
                    11 => Fault::HttpCode {
                        status: *pick(rng, &[403, 429, 500, 502, 503]),
                        code: *pick(rng, &[67200002, 67200009, 68300004, 67200005]),
                    },
                    12 => Fault::SlowCode {
                        millis: *pick(rng, &[300, 1_200]),
                        code: *pick(rng, &[67200002, 68300004, 67200005]),
                    },
                    0 => Fault::Code {
                        code: *pick(
                            rng,
                            &[
                                68300005, 68300006, 68300008, 67200100, 67200002, 67200009,
                                67200005, 12345678,
                            ],
                        ),
                    },
                    1 => Fault::Http {
                        status: *pick(rng, &[401, 403, 408, 429, 499, 500, 502, 503, 504]),
                    },
                    2 => Fault::Reset,
                    3 => Fault::Malformed,
                    4 => Fault::Slow {
                        millis: *pick(rng, &[300, 1_500]),
                    },
                    5 => Fault::CreatedThenReset,
                    6 => Fault::CreatedThenHttp {
                        status: *pick(rng, &[408, 429, 499, 500, 502, 503, 504]),
                    },
                    7 => Fault::CreatedThenUnreadable,
                    8 => Fault::CreatedThenStatusFalse,
                    _ => Fault::CreatedThenCode {
                        code: *pick(rng, &[67200100, 68300008, 12345678]),
                    },
                },
            ),
            45..80 => (
                Endpoint::Status,
                match rng.random_range(0..8) {
                    0 => Fault::Code {
                        code: *pick(rng, &[68300005, 68300008, 67200100, 67200002, 67200009]),
                    },
                    1 => Fault::Http {
                        status: *pick(rng, &[401, 404, 429, 500, 503]),
                    },
                    2 => Fault::Reset,
                    3 => Fault::Malformed,
                    4 => Fault::Slow { millis: 1_500 },
                    5 => Fault::JobFailed,
                    6 => Fault::Code { code: 67200004 },
                    _ => Fault::Http { status: 403 },
                },
            ),
            80..93 => (
                Endpoint::Download,
                match rng.random_range(0..4) {
                    0 => Fault::Html,
                    1 => Fault::BadDocx,
                    2 => Fault::Drip {
                        bytes_per_sec: 4_000,
                    },
                    _ => Fault::RedirectToHost {
                        host: "localhost".into(),
                    },
                },
            ),
            _ => (
                Endpoint::Token,
                match rng.random_range(0..3) {
                    0 => Fault::Http { status: 500 },
                    1 => Fault::Slow { millis: 1_500 },
                    _ => Fault::Reset,
                },
            ),
        };
        let client = match rng.random_range(0..3) {
            0 => Some(self.sim.config().client_id.clone()),
            1 => Some(SECOND.to_string()),
            _ => None,
        };
        Injection {
            endpoint,
            fault,
            count: rng.random_range(1..=3),
            client,
        }
    }

    async fn open_rows(&self, open: bool) -> Vec<i64> {
        let states: &[&str] = if open {
            &["queued", "generating"]
        } else {
            &["failed", "cancelled"]
        };
        sqlx::query_scalar("SELECT id FROM report_requests WHERE state = ANY($1) ORDER BY id")
            .bind(states)
            .fetch_all(&self.db.pool)
            .await
            .unwrap()
    }

    /// One random event of the chaos phase.
    async fn event(&mut self) {
        let roll = self.rng.random_range(0..100);
        match roll {
            0..20 => self.insert_row().await,
            20..50 => {
                let injection = self.fault();
                self.log.push(format!("inject {injection:?}"));
                self.sim.inject(injection);
            }
            50..55 => {
                let code = *pick(&mut self.rng, &[67200005, 67200100, 68300008]);
                let ms = self.rng.random_range(200..800);
                self.log.push(format!("outage {code} for {ms} ms"));
                self.sim.set_outage(Some(code));
                tokio::time::sleep(Duration::from_millis(ms)).await;
                self.sim.set_outage(None);
            }
            55..65 => {
                let ms = self.rng.random_range(100..800);
                self.log.push(format!("database cut for {ms} ms"));
                self.proxy.down();
                tokio::time::sleep(Duration::from_millis(ms)).await;
                self.proxy.up();
            }
            65..73 if !self.procs.is_empty() => {
                let k = self.rng.random_range(0..self.procs.len());
                let both = self.rng.random_bool(0.6);
                self.log.push(format!(
                    "kill worker {k}, start one (both accounts: {both})"
                ));
                self.procs.swap_remove(k).kill();
                self.spawn(both);
            }
            73..77 if !self.procs.is_empty() => {
                let k = self.rng.random_range(0..self.procs.len());
                self.log.push(format!("restart worker {k}"));
                let p = self.procs.swap_remove(k);
                let both = p.both_accounts;
                p.stop().await;
                self.spawn(both);
            }
            77..88 => {
                let open = self.open_rows(true).await;
                if !open.is_empty() {
                    let id = *pick(&mut self.rng, &open);
                    self.log.push(format!("cancel {id}"));
                    let _: bool = sqlx::query_scalar("SELECT report_cancel($1)")
                        .bind(id)
                        .fetch_one(&self.db.pool)
                        .await
                        .unwrap();
                }
            }
            88..97 => {
                let finished = self.open_rows(false).await;
                if !finished.is_empty() {
                    let id = *pick(&mut self.rng, &finished);
                    self.log.push(format!("retry {id}"));
                    let _: bool = report_retry(&self.db.pool, id).await;
                }
            }
            97 => {
                // A batch's share of the claims changes while it runs (fair share between
                // batches): every row must still end, none claimed twice.
                let batch = *pick(&mut self.rng, &["b1", "b2"]);
                let weight: f32 = *pick(&mut self.rng, &[0.25, 1.0, 4.0]);
                self.log.push(format!("weight {batch} {weight}"));
                sqlx::query(
                    "SELECT report_set_batch_weight(batch, $2) FROM report_batches WHERE batch = $1",
                )
                .bind(batch)
                .bind(weight)
                .execute(&self.db.pool)
                .await
                .unwrap();
            }
            _ => {
                let batch = *pick(&mut self.rng, &["b1", "b2"]);
                self.log.push(format!("retry batch {batch}"));
                let _: i32 = sqlx::query_scalar("SELECT report_retry_batch($1)")
                    .bind(batch)
                    .fetch_one(&self.db.pool)
                    .await
                    .unwrap();
            }
        }
    }

    /// The schedule: rows, workers, a chaos phase of random events, then calm until
    /// every row has ended; then the checks. Returns what went wrong (empty: nothing).
    async fn run(mut self) -> (Vec<String>, String) {
        let started = Instant::now();
        let workers = self.rng.random_range(2..=3);
        for k in 0..workers {
            let both = k == 0 || self.rng.random_bool(0.5);
            self.spawn(both);
        }
        let first_rows = self.rng.random_range(6..14);
        for _ in 0..first_rows {
            self.insert_row().await;
        }
        let events = self.rng.random_range(15..40);
        let chaos = Duration::from_millis(self.rng.random_range(2_000..4_000));
        let gap = chaos / events;
        for _ in 0..events {
            self.event().await;
            self.watch_traces().await;
            let jitter = self.rng.random_range(0..=gap.as_millis() as u64 * 2);
            tokio::time::sleep(Duration::from_millis(jitter)).await;
        }
        // Calm: no more faults; at least two workers, one with both accounts.
        self.sim.clear_injections();
        self.sim.set_outage(None);
        self.proxy.up();
        if !self.procs.iter().any(|p| p.both_accounts) {
            self.spawn(true);
        }
        if self.procs.len() < 2 {
            self.spawn(false);
        }
        let calm = Instant::now();
        let mut open = Vec::new();
        while calm.elapsed() < Duration::from_secs(90) {
            open = self.open_rows(true).await;
            if open.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let calm_secs = calm.elapsed().as_secs_f64();
        for p in std::mem::take(&mut self.procs) {
            p.stop().await;
        }
        let mut violations = Vec::new();
        for id in open {
            let (state, last_error): (String, Option<String>) =
                sqlx::query_as("SELECT state, last_error FROM report_requests WHERE id = $1")
                    .bind(id)
                    .fetch_one(&self.db.pool)
                    .await
                    .unwrap();
            violations.push(format!(
                "row {id} never ended: {state}, last error {last_error:?}"
            ));
        }
        self.watch_traces().await;
        violations.append(&mut self.trace_changes);
        violations.extend(check(&self.db.pool, &self.sim, self.reuse).await);
        let stats = self.sim.stats();
        let summary = format!(
            "seed {}: {} rows, {} tasks, {} events, reuse {}, {:.1} s ({:.1} s to end every row)",
            self.seed,
            self.rows.len(),
            stats.tasks_created,
            self.log.len(),
            self.reuse,
            started.elapsed().as_secs_f64(),
            calm_secs,
        );
        if !violations.is_empty() {
            violations.push(format!("the schedule's events: {:#?}", self.log));
        }
        self.proxy.stop();
        self.sim.stop().await;
        self.db.close().await;
        (violations, summary)
    }
}

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    company_name: Option<String>,
    credit_code: Option<String>,
    org_number: Option<String>,
    report_type: String,
    state: String,
    max_attempts: i32,
    creates_sent: i32,
    reuse_within_secs: Option<f64>,
    finished_at: Option<chrono::DateTime<chrono::Utc>>,
    last_error: Option<String>,
    lives: i64,
}

/// The identifiers a row or a task names, `None` for blank.
type Key = (Option<String>, Option<String>, Option<String>, String);

fn key(name: &Option<String>, code: &Option<String>, org: &Option<String>, kind: &str) -> Key {
    let given = |v: &Option<String>| v.clone().filter(|v| !v.trim().is_empty());
    (given(name), given(code), given(org), kind.to_string())
}

/// The promises, checked against the simulator's ground truth.
async fn check(pool: &report_worker::queue::Db, sim: &Simulator, reuse_on: bool) -> Vec<String> {
    let mut v = Vec::new();
    // Traces: a row's trace is its application's when it named one.
    let traced: Vec<(i64, String, Option<String>)> = sqlx::query_as(
        "SELECT id, trace_context, traceparent FROM report_requests WHERE trace_context IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for (id, own, app) in &traced {
        if let Some(app) = app
            && own.get(3..35) != app.get(3..35)
        {
            v.push(format!(
                "row {id}: trace context {own} is not in the application's trace {app}"
            ));
        }
    }
    let stats = sim.stats();
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT r.id, r.company_name, r.credit_code, r.org_number, r.report_type, r.state, r.max_attempts,
                r.creates_sent, extract(epoch FROM r.reuse_within)::float8 AS reuse_within_secs,
                r.finished_at, r.last_error,
                1 + (SELECT count(*) FROM report_events e WHERE e.request_id = r.id
                      AND e.previous_state IN ('failed', 'cancelled')
                      AND e.state NOT IN ('failed', 'cancelled')) AS lives
           FROM report_requests r ORDER BY r.id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let by_id: HashMap<i64, &Row> = rows.iter().map(|r| (r.id, r)).collect();

    // Spend: per row, creates within the budget of its lives; per identifier, no more
    // tasks than creates sent (one task per create at most).
    let mut sent: BTreeMap<Key, i64> = BTreeMap::new();
    for r in &rows {
        let budget = i64::from(r.max_attempts) * r.lives;
        if i64::from(r.creates_sent) > budget {
            v.push(format!(
                "row {}: {} creates sent, more than max_attempts {} × {} lives",
                r.id, r.creates_sent, r.max_attempts, r.lives
            ));
        }
        *sent
            .entry(key(
                &r.company_name,
                &r.credit_code,
                &r.org_number,
                &r.report_type,
            ))
            .or_default() += i64::from(r.creates_sent);
    }
    let mut made: BTreeMap<Key, i64> = BTreeMap::new();
    for t in stats.tasks.values() {
        *made
            .entry(key(
                &t.company_name,
                &t.credit_code,
                &t.org_number,
                &t.report_type,
            ))
            .or_default() += 1;
    }
    for (k, tasks) in &made {
        let creates = sent.get(k).copied().unwrap_or(0);
        if *tasks > creates {
            v.push(format!(
                "{k:?}: {tasks} paid tasks for {creates} creates sent"
            ));
        }
    }

    // Documents: byte-exact, a task of the row's company and type, fresh enough.
    let served: HashMap<&str, &str> = stats
        .documents
        .iter()
        .map(|(job, sha)| (sha.as_str(), job.as_str()))
        .collect();
    type Doc = (
        i64,
        String,
        Option<String>,
        chrono::DateTime<chrono::Utc>,
        Option<String>,
    );
    let docs: Vec<Doc> = sqlx::query_as(
        "SELECT d.request_id, d.sha256, encode(sha256(d.content), 'hex'), d.downloaded_at,
                (SELECT e.action FROM report_events e WHERE e.request_id = d.request_id AND e.state = 'succeeded'
                  ORDER BY e.id DESC LIMIT 1)
           FROM report_documents d ORDER BY d.request_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for (id, sha, actual, downloaded_at, action) in &docs {
        let r = by_id[id];
        if actual.as_deref() != Some(sha.as_str()) {
            v.push(format!(
                "row {id}: its stored bytes do not hash to its sha256"
            ));
            continue;
        }
        let Some(job) = served.get(sha.as_str()) else {
            v.push(format!("row {id}: a document the simulator never served"));
            continue;
        };
        let task = &stats.tasks[*job];
        let truth = Simulator::company_of(
            r.company_name.as_deref().filter(|s| !s.is_empty()),
            r.credit_code.as_deref().filter(|s| !s.is_empty()),
            r.org_number.as_deref().filter(|s| !s.is_empty()),
        );
        if task.company != truth || task.report_type != r.report_type {
            v.push(format!(
                "row {id} ({truth}, {}) got the document of job {job} ({}, {})",
                r.report_type, task.company, task.report_type
            ));
        }
        let own = key(
            &r.company_name,
            &r.credit_code,
            &r.org_number,
            &r.report_type,
        );
        let source = key(
            &task.company_name,
            &task.credit_code,
            &task.org_number,
            &task.report_type,
        );
        let single = |k: &Key| [&k.0, &k.1, &k.2].iter().filter(|x| x.is_some()).count() == 1;
        if own != source && !(single(&own) && single(&source)) {
            v.push(format!(
                "row {id} {own:?} was served a document asked for as {source:?}"
            ));
        }
        let first_served = stats.first_served_ms.get(*job).copied().unwrap_or(i64::MAX);
        if downloaded_at.timestamp_millis() + 1_000 < first_served {
            v.push(format!(
                "row {id}: downloaded_at before the simulator served job {job}"
            ));
        }
        if action.as_deref() == Some("reuse") {
            let within = r
                .reuse_within_secs
                .or(reuse_on.then_some(REUSE_WITHIN_SECS))
                .unwrap_or(0.0);
            let age = r
                .finished_at
                .map(|f| (f - *downloaded_at).num_milliseconds() as f64 / 1000.0);
            if !age.is_some_and(|a| a < within) {
                v.push(format!(
                    "row {id}: a reuse copy {age:?} s old, its window {within} s"
                ));
            }
        }
    }
    for r in &rows {
        if r.state == "succeeded" && !docs.iter().any(|d| d.0 == r.id) {
            v.push(format!("row {}: succeeded without a document", r.id));
        }
        if r.state == "failed" && r.last_error.is_none() {
            v.push(format!("row {}: failed without a reason", r.id));
        }
    }

    // Accounts: no task polled by another account; every job id known here is a task
    // the simulator made under the account it is recorded with.
    let foreign: u64 = stats
        .accounts
        .values()
        .map(|a| {
            a.calls
                .get("status:another_accounts_job")
                .copied()
                .unwrap_or(0)
        })
        .sum();
    if foreign > 0 {
        v.push(format!(
            "{foreign} status calls under an account that did not create the task"
        ));
    }
    let jobs: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT upstream_job_id, account FROM report_requests WHERE upstream_job_id IS NOT NULL
         UNION ALL SELECT job_id, account FROM report_orphan_tasks",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for (job, account) in &jobs {
        match stats.tasks.get(job) {
            None => v.push(format!(
                "job {job} is known here but the simulator never made it"
            )),
            Some(t) if account.as_deref() != Some(t.account.as_str()) => v.push(format!(
                "job {job} recorded under {account:?}, made by {}",
                t.account
            )),
            Some(_) => {}
        }
    }

    // The ledger: every task the simulator made is a paid task or an unknown-outcome
    // create here; none counted that it did not make; no create without an intent.
    let ledger: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT account, sum(sent)::bigint, sum(tasks)::bigint, sum(unknown)::bigint
           FROM report_create_ledger GROUP BY account",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let accounts: BTreeSet<&str> = stats
        .accounts
        .keys()
        .map(String::as_str)
        .chain(ledger.iter().map(|l| l.0.as_str()))
        .collect();
    for account in accounts {
        let (sent, tasks, unknown) = ledger
            .iter()
            .find(|l| l.0 == account)
            .map_or((0, 0, 0), |l| (l.1, l.2, l.3));
        let sim_tasks = stats
            .tasks
            .values()
            .filter(|t| t.account == account)
            .count() as i64;
        let sim_creates = stats.accounts.get(account).map_or(0, |a| {
            a.calls
                .iter()
                .filter(|(k, _)| k.starts_with("create:"))
                .map(|(_, n)| *n)
                .sum::<u64>()
        }) as i64;
        if tasks > sim_tasks {
            v.push(format!(
                "{account}: the ledger counts {tasks} paid tasks, the simulator made {sim_tasks}"
            ));
        }
        if sim_tasks > tasks + unknown {
            v.push(format!(
                "{account}: the simulator made {sim_tasks} tasks, the ledger accounts for {tasks} + {unknown} unknown"
            ));
        }
        if sim_creates > sent {
            v.push(format!(
                "{account}: {sim_creates} creates arrived, {sent} intents committed"
            ));
        }
    }
    v
}

async fn run_seeds(seeds: impl IntoIterator<Item = u64>) {
    let mut failed = Vec::new();
    for seed in seeds {
        let (violations, summary) = Schedule::new(seed).await.run().await;
        if violations.is_empty() {
            eprintln!("{summary}: ok");
        } else {
            eprintln!(
                "{summary}: FAILED — replay with TORTURE_SEED={seed}\n  {}",
                violations.join("\n  ")
            );
            failed.push(seed);
        }
    }
    assert!(failed.is_empty(), "failing seeds: {failed:?}");
}

/// The fixed seeds CI runs on every push (a minute or two).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ci_seeds() {
    match std::env::var("TORTURE_SEED") {
        Ok(seed) => run_seeds([seed.parse().expect("TORTURE_SEED is a number")]).await,
        Err(_) => run_seeds(1..=6).await,
    }
}

/// `TORTURE_SEEDS=1000 [TORTURE_FROM=1] cargo test --release --test it torture::many_seeds -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "thousands of schedules: run by hand (docs/development.md)"]
async fn many_seeds() {
    let n: u64 = std::env::var("TORTURE_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let from: u64 = std::env::var("TORTURE_FROM")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    run_seeds(from..from + n).await;
}
