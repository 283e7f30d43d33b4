//! What every `bench` scenario shares: the options, a fresh database per scenario, the
//! worker's way to the database, worker processes and their memory, percentiles.

use crate::queue::sql;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::queue::Db;
use anyhow::Context;

use crate::engine::metrics::Metrics;
use crate::engine::{Worker, WorkerConfig};
use crate::queue;
use crate::queue::fixtures;
use crate::simulator::Simulator;
use crate::upstream::Client;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub database_url: String,
    pub only: Vec<String>,
    pub reports: usize,
    pub concurrency: usize,
    pub csv_rows: usize,
    pub inflight_rows: usize,
    pub qps: u32,
    /// Rows in the stats scenario.
    pub stats_rows: usize,
    /// Megabytes of the document in the RSS scenario.
    pub document_mb: usize,
    /// Rows of history in the dashboard scenario.
    pub dashboard_rows: usize,
    /// A transaction pooler (PgBouncer, `pool_mode = transaction`) in front of
    /// DATABASE_URL's server: the `pgbouncer` scenario runs the worker through it.
    pub pooler_url: Option<String>,
}

/// How the bench's worker reaches the database.
#[derive(Debug, Clone, Copy)]
pub(super) enum Via<'a> {
    Direct,
    /// Through the pooler at this URL (its database name replaced), in transaction
    /// mode, listening over a direct session when `listen`.
    Pooler {
        url: &'a str,
        listen: bool,
    },
}

impl Via<'_> {
    /// The worker's pool for the database at `url` (direct), and its way to listen.
    pub(super) async fn worker_pool(
        self,
        url: &str,
        size: u32,
    ) -> anyhow::Result<(Db, crate::engine::Listen)> {
        Ok(match self {
            Via::Direct => (
                queue::connect_worker(url, size).await?,
                crate::engine::Listen::Pool,
            ),
            Via::Pooler {
                url: pooler,
                listen,
            } => {
                let mut pooled = url::Url::parse(pooler).context("--pooler")?;
                pooled.set_path(url::Url::parse(url)?.path());
                let pool =
                    queue::connect_worker_in(pooled.as_str(), size, queue::PoolMode::Transaction)
                        .await?;
                let listen = if listen {
                    crate::engine::Listen::Url(url.to_string())
                } else {
                    crate::engine::Listen::Off
                };
                (pool, listen)
            }
        })
    }
}

pub(super) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
                    / 1024
                    / 1024
            })
        })
        .unwrap_or(0);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores ({cpu}), {mem} GiB")
}

/// A fresh database named `name` on DATABASE_URL's server, migrated.
pub(super) async fn fresh_db(admin_url: &str, name: &str) -> anyhow::Result<(String, Db)> {
    let admin = queue::connect(admin_url, 1).await?;
    sql::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&admin)
    .await?;
    sql::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&admin)
        .await?;
    admin.close().await;
    let mut url = url::Url::parse(admin_url).context("DATABASE_URL")?;
    url.set_path(&format!("/{name}"));
    let url = url.to_string();
    let pool = queue::connect(&url, 8).await?;
    queue::migrate(&pool).await?;
    Ok((url, pool))
}

pub(super) async fn transactions(pool: &Db) -> anyhow::Result<i64> {
    // Statistics reach pg_stat_database with a short delay; give them a moment.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    Ok(sql::query_scalar(
        "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?)
}

pub(super) fn client_for(sim: &Simulator) -> anyhow::Result<Client> {
    Client::new(sim.client_config()).map_err(|e| anyhow::anyhow!("{e}"))
}

/// The engine at work in this process, on `pool` against `sim`, until `stop`.
pub(super) struct Engine {
    stop: tokio_util::sync::CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl Engine {
    pub(super) fn start(pool: Db, sim: &Simulator, config: WorkerConfig) -> anyhow::Result<Engine> {
        let stop = tokio_util::sync::CancellationToken::new();
        let worker = Worker::new(
            pool,
            client_for(sim)?,
            config,
            std::sync::Arc::new(Metrics::new()),
        );
        let handle = tokio::spawn(worker.run(stop.clone()));
        Ok(Engine { stop, handle })
    }

    /// Stops it the way SIGTERM stops `run`, and waits until it has.
    pub(super) async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.handle.await?;
        Ok(())
    }
}

pub(super) async fn open_rows(pool: &Db) -> anyhow::Result<bool> {
    Ok(fixtures::any_open(pool).await?)
}

pub(super) fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(super) fn worker_process(
    url: &str,
    sim: &Simulator,
    extra: &[(&str, &str)],
) -> anyhow::Result<Child> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("run")
        .env("DATABASE_URL", url)
        .env("UPSTREAM_BASE_URL", sim.base_url())
        .env("UPSTREAM_CLIENT_ID", &sim.config().client_id)
        .env("UPSTREAM_CLIENT_SECRET", &sim.config().client_secret)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    Ok(cmd.spawn()?)
}

pub(super) fn metered(sim: &Simulator) -> (u64, u64) {
    let s = sim.stats();
    let all = s.calls_to("create") + s.calls_to("status");
    let limited = s.calls("create:67200002") + s.calls("status:67200002");
    (all - limited, limited)
}

/// A process's peak resident memory so far (VmHWM), in KiB.
pub(super) fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Samples a child's peak resident memory (VmHWM) until it exits.
pub(super) async fn wait_with_peak_rss(
    mut child: Child,
) -> anyhow::Result<(std::process::ExitStatus, f64)> {
    let pid = child.id();
    let mut peak_kb = 0u64;
    loop {
        if let Some(kb) = peak_rss_kb(pid) {
            peak_kb = peak_kb.max(kb);
        }
        if let Some(status) = child.try_wait()? {
            return Ok((status, peak_kb as f64 / 1024.0));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The server's current WAL position.
pub(super) async fn wal_lsn(pool: &Db) -> anyhow::Result<String> {
    Ok(sql::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(pool)
        .await?)
}

/// WAL bytes the server wrote since `lsn`.
pub(super) async fn wal_since(pool: &Db, lsn: &str) -> anyhow::Result<f64> {
    Ok(
        sql::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::float8")
            .bind(lsn)
            .fetch_one(pool)
            .await?,
    )
}
