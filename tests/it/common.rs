//! Test support: a fresh PostgreSQL database per test, on the server named by
//! TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres), and
//! waiting on conditions with a deadline instead of sleeping.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use report_worker::queue::Db;
use sqlx::{Connection, PgConnection};

pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_string())
}

fn url_for(db: &str) -> String {
    let mut u = url::Url::parse(&admin_url()).expect("TEST_DATABASE_URL is a URL");
    u.set_path(&format!("/{db}"));
    u.to_string()
}

/// A throwaway database, dropped by `close` (or, if a test panicked, by the next run:
/// names carry the creating process id and stale ones are removed).
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: Db,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);
static CLEANUP: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

async fn admin() -> PgConnection {
    PgConnection::connect(&admin_url())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL must answer at {} for the tests: {e}",
                admin_url()
            )
        })
}

async fn drop_stale_databases() {
    let mut conn = admin().await;
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'rw\\_test\\_%'")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    for name in names {
        let pid = name.split('_').nth(2).and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
            )))
            .execute(&mut conn)
            .await;
        }
    }
}

impl TestDb {
    /// A new database with the migrations applied.
    pub async fn new() -> TestDb {
        let db = TestDb::empty().await;
        report_worker::queue::migrate(&db.pool)
            .await
            .expect("migrations apply");
        db
    }

    /// A new database with the migrations applied, copied from a migrated template
    /// (made once per test process): a fraction of the time of migrating.
    pub async fn from_template() -> TestDb {
        static TEMPLATE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
        let template = TEMPLATE
            .get_or_init(|| async {
                let db = TestDb::new().await;
                db.pool.close().await;
                db.name
            })
            .await;
        let name = format!(
            "rw_test_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let mut conn = admin().await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE \"{name}\" TEMPLATE \"{template}\""
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        let url = url_for(&name);
        let pool = report_worker::queue::connect(&url, 20).await.unwrap();
        TestDb { name, url, pool }
    }

    /// A new database with nothing in it.
    pub async fn empty() -> TestDb {
        CLEANUP.get_or_init(drop_stale_databases).await;
        let name = format!(
            "rw_test_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let mut conn = admin().await;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .unwrap();
        let url = url_for(&name);
        let pool = report_worker::queue::connect(&url, 20).await.unwrap();
        TestDb { name, url, pool }
    }

    pub async fn close(self) {
        self.pool.close().await;
        let mut conn = admin().await;
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        )))
        .execute(&mut conn)
        .await;
    }
}

/// How often `wait_for` looks again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `check` until it returns Some, failing the test after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The simulator on a free loopback port.
pub async fn start_sim(
    config: report_worker::simulator::SimConfig,
) -> report_worker::simulator::Simulator {
    report_worker::simulator::Simulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("simulator starts")
}

/// A client with the simulator's default credentials.
pub fn client_for(sim: &report_worker::simulator::Simulator) -> report_worker::upstream::Client {
    let config = client_config(sim);
    report_worker::upstream::Client::new(config).unwrap()
}

pub fn client_config(
    sim: &report_worker::simulator::Simulator,
) -> report_worker::upstream::ClientConfig {
    sim.client_config()
}

/// True when an external reader is installed; under CI its absence is a failure.
pub fn have_tool(cmd: &str, args: &[&str]) -> bool {
    let ok = std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok && std::env::var("CI").is_ok() {
        panic!("{cmd} is required under CI (see .ci/run)");
    }
    if !ok {
        eprintln!("skipping the {cmd} check: {cmd} is not installed");
    }
    ok
}

/// The flags that turn the binary's seconds into the tests' milliseconds; everything
/// else is `run`'s own default.
pub const FAST_FLAGS: &[&str] = &[
    "--worker-concurrency",
    "8",
    "--upstream-qps",
    "0",
    "--upstream-timeout",
    "4s",
    "--worker-lease",
    "3s",
    "--worker-idle-poll",
    "200ms",
    "--worker-shutdown-timeout",
    "5s",
    "--upstream-stop-probe",
    "300ms",
    "--report-first-poll",
    "50ms",
    "--report-poll-min",
    "100ms",
    "--report-poll-max",
    "150ms",
    "--report-window",
    "20s",
    "--report-give-up-after",
    "20s",
    "--report-retry-min",
    "50ms",
    "--report-retry-max",
    "500ms",
    "--report-retry-budget",
    "1h",
    "--report-new-task-after",
    "50ms",
];

/// `run`'s arguments for `account` with `FAST_FLAGS` and `extra` (flag-value pairs; those
/// in `extra` win), parsed by the binary's own parser.
pub fn run_args(account: &str, extra: &[&str]) -> report_worker::cli::RunArgs {
    let mut argv = vec![
        "--database-url",
        "postgres://unused",
        "--upstream-client-id",
        account,
        "--upstream-client-secret",
        "unused",
    ];
    // Flag-value pairs; a flag in `extra` replaces the same one of FAST_FLAGS.
    for pair in FAST_FLAGS.chunks(2) {
        if !extra.chunks(2).any(|e| e[0] == pair[0]) {
            argv.extend_from_slice(pair);
        }
    }
    argv.extend_from_slice(extra);
    report_worker::cli::RunArgs::parse_from(argv).expect("the test flags parse")
}

/// Worker settings for tests: `run`'s configuration, parsed from `FAST_FLAGS` by the
/// binary's own parser, so every default is the binary's.
pub fn fast_worker_config(account: &str) -> report_worker::engine::WorkerConfig {
    fast_worker_config_with(account, &[])
}

/// `fast_worker_config` with more flags (`--report-window`, `--report-reuse-within`…).
pub fn fast_worker_config_with(
    account: &str,
    extra: &[&str],
) -> report_worker::engine::WorkerConfig {
    let (_, worker, _) = run_args(account, extra)
        .configs()
        .expect("the test settings are valid");
    worker
}

/// A worker engine running in this process, with a pool of its own.
pub struct RunningWorker {
    pub cancel: tokio_util::sync::CancellationToken,
    pub handle: tokio::task::JoinHandle<()>,
}

impl RunningWorker {
    pub async fn stop(self) {
        self.cancel.cancel();
        self.handle.await.unwrap();
    }
}

pub async fn spawn_worker(
    db_url: &str,
    client: report_worker::upstream::ClientConfig,
    config: report_worker::engine::WorkerConfig,
) -> RunningWorker {
    let pool = report_worker::queue::connect_worker(
        db_url,
        report_worker::engine::pool_size(config.concurrency),
    )
    .await
    .unwrap();
    let client = report_worker::upstream::Client::new(client).unwrap();
    let metrics = std::sync::Arc::new(report_worker::engine::metrics::Metrics::new());
    let cancel = tokio_util::sync::CancellationToken::new();
    let worker = report_worker::engine::Worker::new(pool, client, config, metrics);
    let handle = tokio::spawn(worker.run(cancel.clone()));
    RunningWorker { cancel, handle }
}

/// A worker with the test settings on the simulator's account.
pub async fn spawn_fast_worker(
    db_url: &str,
    sim: &report_worker::simulator::Simulator,
) -> RunningWorker {
    spawn_worker(
        db_url,
        client_config(sim),
        fast_worker_config(&sim.config().client_id),
    )
    .await
}

pub async fn count(pool: &Db, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Waits until no row is queued or generating.
pub async fn wait_all_finished(pool: &Db, deadline: Duration) {
    wait_for("every row to finish", deadline, || async {
        let open = count(
            pool,
            "SELECT count(*) FROM report_requests WHERE state IN ('queued', 'generating')",
        )
        .await;
        (open == 0).then_some(())
    })
    .await
}

pub async fn enqueue(
    pool: &Db,
    company: Option<&str>,
    code: Option<&str>,
    org: Option<&str>,
    kind: &str,
) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO report_requests (company_name, credit_code, org_number, report_type) VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(company)
    .bind(code)
    .bind(org)
    .bind(kind)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Every stored document is byte-exact: its sha256 matches its bytes and the one the
/// simulator recorded when it served that job's document.
pub async fn assert_documents_exact(pool: &Db, sim: &report_worker::simulator::Simulator) -> usize {
    let rows: Vec<(i64, String, String, bool, String)> = sqlx::query_as(
        "SELECT d.request_id, r.upstream_job_id, d.sha256, encode(sha256(d.content), 'hex') = d.sha256, r.report_type
           FROM report_documents d JOIN report_requests r ON r.id = d.request_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let served = sim.stats().documents;
    for (id, job, sha, matches, _) in &rows {
        assert!(matches, "row {id}: stored sha256 does not match its bytes");
        assert_eq!(
            served.get(job),
            Some(sha),
            "row {id} (job {job}) is not what the simulator served"
        );
    }
    rows.len()
}

/// A plain HTTP client for tests (rustls needs its crypto provider first).
pub fn http_client() -> reqwest::Client {
    report_worker::upstream::client::install_crypto_provider();
    reqwest::Client::new()
}

/// A TCP proxy in front of PostgreSQL that a test can take down and bring back, as a
/// database restart or failover looks to the processes behind it: while down, every
/// open connection is cut and new ones are closed at once.
pub struct DbProxy {
    pub port: u16,
    up: tokio::sync::watch::Sender<bool>,
    /// Connections closed on arrival while down (processes trying to reconnect).
    pub refused: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl DbProxy {
    pub async fn start() -> DbProxy {
        use std::sync::atomic::AtomicU64;
        let admin = url::Url::parse(&admin_url()).unwrap();
        let target = format!(
            "{}:{}",
            admin.host_str().unwrap_or("127.0.0.1"),
            admin.port().unwrap_or(5432)
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (up, mut state) = tokio::sync::watch::channel(true);
        let refused = std::sync::Arc::new(AtomicU64::new(0));
        let counter = refused.clone();
        let task = tokio::spawn(async move {
            let mut links = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        if !*state.borrow() {
                            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            drop(client);
                            continue;
                        }
                        let target = target.clone();
                        links.spawn(async move {
                            if let Ok(server) = tokio::net::TcpStream::connect(&target).await {
                                let (mut c, mut s) = (client, server);
                                let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                            }
                        });
                    }
                    changed = state.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        if !*state.borrow() {
                            links.abort_all();
                        }
                    }
                    Some(_) = links.join_next(), if !links.is_empty() => {}
                }
            }
        });
        DbProxy {
            port,
            up,
            refused,
            task,
        }
    }

    /// A connection string for `db` through the proxy.
    pub fn url_for(&self, db: &TestDb) -> String {
        let mut u = url::Url::parse(&db.url).unwrap();
        u.set_host(Some("127.0.0.1")).unwrap();
        u.set_port(Some(self.port)).unwrap();
        u.to_string()
    }

    /// Cuts every connection and closes new ones on arrival.
    pub fn down(&self) {
        let _ = self.up.send(false);
    }

    pub fn up(&self) {
        let _ = self.up.send(true);
    }

    pub fn refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

/// Paid tasks the simulator made for `company`.
pub fn tasks_for(sim: &report_worker::simulator::Simulator, company: &str) -> u64 {
    sim.stats()
        .tasks_per_company
        .get(company)
        .copied()
        .unwrap_or(0)
}

/// The state, attempts and last error of a row.
pub async fn row_state(pool: &Db, id: i64) -> (String, i32, Option<String>) {
    sqlx::query_as("SELECT state, attempts, last_error FROM report_requests WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Inserts a row for `company` with `max_attempts`.
pub async fn enqueue_with_attempts(pool: &Db, company: &str, max_attempts: i32) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO report_requests (company_name, report_type, max_attempts) VALUES ($1, 'pdf', $2) RETURNING id",
    )
    .bind(company)
    .bind(max_attempts)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The S3-compatible server the tests use (TEST_S3_ENDPOINT; `.ci/run` starts moto).
/// Absent outside CI, the caller skips; under CI its absence is a failure.
pub fn s3_endpoint() -> Option<String> {
    match std::env::var("TEST_S3_ENDPOINT") {
        Ok(e) if !e.trim().is_empty() => Some(e),
        _ if std::env::var("CI").is_ok() => {
            panic!("TEST_S3_ENDPOINT is required under CI (see .ci/run)")
        }
        _ => {
            eprintln!("skipping: TEST_S3_ENDPOINT is not set (bash .ci/run starts an S3 server)");
            None
        }
    }
}

/// A new, empty bucket on the test S3 server, opened as the document store with
/// `prefix`.
pub async fn s3_store(
    endpoint: &str,
    prefix: &str,
) -> (report_worker::store::DocumentStore, String) {
    static BUCKETS: AtomicU32 = AtomicU32::new(0);
    let bucket = format!(
        "rw-test-{}-{}",
        std::process::id(),
        BUCKETS.fetch_add(1, Ordering::SeqCst)
    );
    let created = http_client()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .expect("the S3 server answers");
    assert!(
        created.status().is_success(),
        "create bucket: {}",
        created.status()
    );
    let settings = s3_settings(endpoint);
    let store =
        report_worker::store::DocumentStore::open(&format!("s3://{bucket}/{prefix}"), &settings)
            .await
            .expect("the bucket opens");
    (store, bucket)
}

pub fn s3_settings(endpoint: &str) -> report_worker::store::S3Settings {
    report_worker::store::S3Settings {
        endpoint: Some(endpoint.to_string()),
        region: Some("us-east-1".into()),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test-secret".into()),
    }
}

/// Reads an object back over plain HTTP (path-style) and returns its sha256.
pub async fn object_sha256(endpoint: &str, bucket: &str, key: &str) -> Option<String> {
    let r = http_client()
        .get(format!("{endpoint}/{bucket}/{key}"))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    let bytes = r.bytes().await.ok()?;
    Some(report_worker::upstream::document::sha256_hex(&bytes))
}

/// One create as the engine sends it: the token fetched first, then the create within
/// the client's timeout.
pub async fn create(
    client: &report_worker::upstream::Client,
    task: &report_worker::upstream::client::CreateTask,
) -> Result<report_worker::domain::JobId, report_worker::upstream::CreateError> {
    let token = client
        .token_for_create()
        .await
        .map_err(report_worker::upstream::CreateError::NotCreated)?;
    client
        .create_task(task, &token, client.config().timeout)
        .await
}

/// The real `report-worker run` process on `db_url` and `sim`, its environment only
/// what is set here and in `extra`.
pub fn worker_process(
    db_url: &str,
    sim: &report_worker::simulator::Simulator,
    extra: &[(&str, &str)],
) -> std::process::Child {
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_report-worker"));
    cmd.arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", db_url)
        .env("UPSTREAM_BASE_URL", sim.base_url())
        .env("UPSTREAM_CLIENT_ID", &sim.config().client_id)
        .env("UPSTREAM_CLIENT_SECRET", &sim.config().client_secret)
        .env("UPSTREAM_QPS", "0")
        .env("REPORT_FIRST_POLL", "200ms")
        .env("REPORT_POLL_MIN", "200ms")
        .env("REPORT_POLL_MAX", "300ms")
        .env("WORKER_LEASE", "3s")
        .env("WORKER_IDLE_POLL", "200ms")
        .env("WORKER_CONCURRENCY", "8")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().expect("the worker starts")
}

/// A simulator injection of `fault` for the next `count` calls to `endpoint`, any account.
pub fn injection(
    endpoint: report_worker::simulator::Endpoint,
    fault: report_worker::simulator::Fault,
    count: u32,
) -> report_worker::simulator::Injection {
    report_worker::simulator::Injection {
        endpoint,
        fault,
        count,
        client: None,
    }
}

/// `report_retry(id)` as an application calls it, through `executor`: whether the row
/// was retried.
pub async fn report_retry<'e>(executor: impl sqlx::PgExecutor<'e>, id: i64) -> bool {
    sqlx::query_scalar("SELECT report_retry($1)")
        .bind(id)
        .fetch_one(executor)
        .await
        .unwrap()
}

/// Waits until row `id` is final; its state, attempts and last error.
pub async fn wait_final(pool: &Db, id: i64, deadline: Duration) -> (String, i32, Option<String>) {
    wait_for("the row to finish", deadline, || async {
        let row = row_state(pool, id).await;
        matches!(row.0.as_str(), "succeeded" | "failed" | "cancelled").then_some(row)
    })
    .await
}

/// The first line of `stream` (a child's piped stdout or stderr) that `wanted` accepts,
/// waiting at most `within`; the rest of the stream is drained in the background so the
/// child never blocks on a full pipe. Blocking: a test whose runtime must keep serving
/// (a simulator) runs multi-threaded.
pub fn first_line(
    stream: impl std::io::Read + Send + 'static,
    within: Duration,
    wanted: impl Fn(&str) -> bool,
) -> String {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stream)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no such line within {within:?}"));
        if wanted(&line) {
            return line;
        }
    }
}

/// A loopback port free a moment ago, for a server a test starts (another process may
/// take it in between: the race every such test accepts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `127.0.0.1:<free_port()>`.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// A child process (a `run`, a Prometheus) killed when dropped: a test that fails while
/// waiting on it leaves no process behind holding its database connections (which
/// would starve the tests after it).
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `/metrics` page a worker serves on `addr`, once it contains `must_contain`.
pub async fn metrics_page(addr: &str, must_contain: &str, deadline: Duration) -> String {
    page_containing(&format!("http://{addr}/metrics"), must_contain, deadline).await
}

/// The page at `url`, once it answers and contains `must_contain`.
pub async fn page_containing(url: &str, must_contain: &str, deadline: Duration) -> String {
    let http = http_client();
    wait_for(&format!("{must_contain} at {url}"), deadline, || async {
        let page = http.get(url).send().await.ok()?.text().await.ok()?;
        page.contains(must_contain).then_some(page)
    })
    .await
}
