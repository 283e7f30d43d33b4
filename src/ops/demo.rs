//! `report-worker demo`: the whole loop on one machine with nothing configured — a
//! throwaway PostgreSQL (unless DATABASE_URL is set), the simulator in-process with
//! generation times of seconds, a sample batch, the worker with a live progress bar,
//! the documents on disk and a summary.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::dashboard::DashboardConfig;
use crate::domain::{NewRequest, ReportType, RequestState};
use crate::engine::metrics::Metrics;
use crate::engine::policy::{PollPolicy, RetryPolicy};
use crate::engine::{Worker, WorkerConfig};
use crate::ops::embedded_pg::ThrowawayPostgres;
use crate::ops::export;
use crate::queue;
use crate::simulator::{SimConfig, Simulator};
use crate::store::DocumentStore;
use crate::upstream::{Client, Secret};

/// The sample batch: the seed's company by each identifier, both report types, a few
/// more companies, and one credit code whose check character is wrong (the provider
/// refuses it with 68300004).
/// (company name, credit code, org number, report type)
type Sample = (
    Option<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
    ReportType,
);

fn sample() -> Vec<Sample> {
    use ReportType::{Pdf, Word};
    vec![
        (Some("小米科技有限责任公司"), None, None, Pdf),
        (Some("小米科技有限责任公司"), None, None, Word),
        (None, Some("91110108551385082Q"), None, Word),
        (None, Some("91110108551385082Q"), None, Pdf),
        (None, None, Some("5513850T82"), Pdf),
        (Some("华为技术有限公司"), None, None, Pdf),
        (Some("比亚迪股份有限公司"), None, None, Word),
        (Some("宁德时代新能源科技股份有限公司"), None, None, Pdf),
        (Some("深圳市大疆创新科技有限公司"), None, None, Word),
        (None, Some("91110108551385083Q"), None, Pdf),
    ]
}

/// The demo's worker, simulator and dashboard, kept up after the batch when the
/// dashboard was asked for.
struct KeptUp {
    stop: CancellationToken,
    worker: tokio::task::JoinHandle<()>,
    sim: Simulator,
    pool: crate::queue::Db,
}

impl KeptUp {
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.worker.await;
        self.sim.stop().await;
        self.pool.close().await;
    }
}

pub async fn run(
    database_url: Option<String>,
    pool_mode: queue::PoolMode,
    out: &Path,
    keep: bool,
    dashboard: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let cancel = CancellationToken::new();
    tokio::spawn(crate::ops::signals::on_signal(cancel.clone()));
    let mut throwaway = None;
    let mut own = None;
    let url = match database_url {
        Some(url) => {
            // Not interruptible: a CREATE DATABASE that went through must be known, to
            // be dropped (it takes a moment; Ctrl-C then ends the demo right after).
            let db = OwnDatabase::create(&url, pool_mode).await?;
            println!(
                "Created the database {} on DATABASE_URL's server for the demo (yours is not touched).",
                db.name
            );
            let url = db.url.clone();
            own = Some(db);
            url
        }
        None => {
            println!("Starting a throwaway PostgreSQL (no DATABASE_URL set)…");
            let pg = tokio::select! {
                pg = ThrowawayPostgres::start() => pg?,
                _ = cancel.cancelled() => anyhow::bail!("interrupted"),
            };
            let url = pg.url();
            throwaway = Some(pg);
            url
        }
    };
    let result = tokio::select! {
        r = body(&url, pool_mode, out, dashboard, cancel.clone()) => r,
        _ = cancel.cancelled() => Err(anyhow::anyhow!("interrupted")),
    };
    let result = match result {
        Ok(Some(kept)) => {
            cancel.cancelled().await;
            println!("Stopping the worker, the simulator and the dashboard…");
            kept.stop().await;
            Ok(None)
        }
        other => other,
    };
    let look = "  SELECT * FROM report_queue_stats;\n  SELECT request_id, at, state, error_code, error FROM report_events ORDER BY id;\n  SELECT request_id, file_name, byte_size, sha256 FROM report_documents;";
    if let Some(db) = own {
        if keep {
            println!(
                "\nKept the database {}. Look further with SQL:\n  psql \"{}\"{}\n{look}\nRemove it with: psql \"{}\" -c 'DROP DATABASE {} WITH (FORCE)'",
                db.name,
                db.shown_url(),
                db.password_note(),
                db.shown_admin_url(),
                db.name
            );
        } else if db.drop_it().await {
            println!(
                "\nRemoved the demo's database {} (`demo --keep` keeps it to look at with SQL).",
                db.name
            );
        }
    }
    if let Some(mut pg) = throwaway {
        if keep {
            pg.keep();
            drop(pg);
            let kept = ThrowawayPostgres::kept_commands(&pg_dir_of(&url));
            println!(
                "\nKept the throwaway database (stopped). Start it again and look with SQL:\n  {}\n  psql \"{url}\"\n{look}",
                kept
            );
        } else {
            drop(pg);
            println!(
                "\nThe throwaway PostgreSQL is stopped and removed (`demo --keep` keeps it to look at with SQL)."
            );
        }
    }
    result?;
    println!("Done in {:.1} s.", started.elapsed().as_secs_f64());
    Ok(())
}

/// The folder of a throwaway server from its URL (its socket lives in `<dir>/sock`).
fn pg_dir_of(url: &str) -> std::path::PathBuf {
    url::Url::parse(url)
        .ok()
        .and_then(|u| {
            u.query_pairs()
                .find(|(k, _)| k == "host")
                .map(|(_, v)| std::path::PathBuf::from(v.into_owned()))
        })
        .and_then(|sock| sock.parent().map(Path::to_path_buf))
        .unwrap_or_default()
}

/// The demo's own database on DATABASE_URL's server, `rw_demo_<random>`: the demo never
/// writes to the user's database (its rows, simulator documents and identity links
/// would be served to real requests with reuse on). Created fresh — a name that exists
/// is never reused or dropped — and dropped at the end unless kept.
struct OwnDatabase {
    name: String,
    /// DATABASE_URL, which the demo only uses to create and drop its database.
    admin_url: String,
    /// DATABASE_URL with the demo's database in its path.
    url: String,
    pool_mode: queue::PoolMode,
}

impl OwnDatabase {
    async fn create(admin_url: &str, pool_mode: queue::PoolMode) -> anyhow::Result<OwnDatabase> {
        let name = format!("rw_demo_{:08x}", rand::random::<u32>());
        let mut url = url::Url::parse(admin_url)
            .map_err(|e| anyhow::anyhow!("DATABASE_URL is not a URL: {e}"))?;
        url.set_path(&format!("/{name}"));
        // A database named in the query (`?dbname=`) would win over the path: the demo's
        // pool must reach its own database, never the one DATABASE_URL names.
        drop_query_key(&mut url, "dbname");
        let admin = queue::connect_in(admin_url, 1, pool_mode).await?;
        // Straight on the pool: through a transaction pooler `Db` wraps statements in a
        // transaction, which CREATE DATABASE may not run in.
        let created = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(admin.pool())
            .await
            .map(|_| ());
        let user: String = queue::sql::query_scalar("SELECT current_user::text")
            .fetch_one(&admin)
            .await
            .unwrap_or_default();
        admin.close().await;
        match created {
            Ok(_) => Ok(OwnDatabase {
                name,
                admin_url: admin_url.to_string(),
                url: url.to_string(),
                pool_mode,
            }),
            Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("42501") => {
                anyhow::bail!(
                    "the demo runs in a database of its own ({name}) and {user} may not create databases: ALTER ROLE \"{user}\" CREATEDB, or unset DATABASE_URL to run it on a throwaway PostgreSQL"
                )
            }
            Err(e) => {
                Err(anyhow::Error::new(e).context(format!("creating the demo's database {name}")))
            }
        }
    }

    /// Drops the database; false (and a line on stderr saying how) when it could not.
    async fn drop_it(&self) -> bool {
        let dropped = async {
            let admin = queue::connect_in(&self.admin_url, 1, self.pool_mode).await?;
            let r = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(admin.pool())
            .await;
            admin.close().await;
            r.map_err(anyhow::Error::new)
        };
        let Err(e) = dropped.await else {
            return true;
        };
        eprintln!(
            "could not remove the demo's database {}: {} (DROP DATABASE {} WITH (FORCE) removes it)",
            self.name,
            crate::config::error_chain(e.as_ref()),
            self.name
        );
        false
    }

    /// The demo database's URL without its password (which a hint must not print).
    fn shown_url(&self) -> String {
        without_password(&self.url)
    }

    fn shown_admin_url(&self) -> String {
        without_password(&self.admin_url)
    }

    fn password_note(&self) -> &'static str {
        match url::Url::parse(&self.url) {
            Ok(u) if u.password().is_some() || u.query_pairs().any(|(k, _)| k == "password") => {
                " (with DATABASE_URL's password in PGPASSWORD or ~/.pgpass)"
            }
            _ => "",
        }
    }
}

fn without_password(raw: &str) -> String {
    let Ok(mut u) = url::Url::parse(raw) else {
        return raw.to_string();
    };
    let _ = u.set_password(None);
    // sqlx also takes the password from the query.
    drop_query_key(&mut u, "password");
    u.to_string()
}

/// `url` without the query parameter `key` (the others kept, in order).
fn drop_query_key(url: &mut url::Url, key: &str) {
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != key)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    url.set_query(None);
    if !kept.is_empty() {
        url.query_pairs_mut().extend_pairs(kept);
    }
}

async fn body(
    url: &str,
    pool_mode: queue::PoolMode,
    out: &Path,
    dashboard: Option<SocketAddr>,
    cancel: CancellationToken,
) -> anyhow::Result<Option<KeptUp>> {
    let pool = queue::connect_in(url, 12, pool_mode).await?;
    queue::migrate(&pool).await?;
    let dashboard_url = match dashboard {
        Some(addr) => Some(start_dashboard(addr, &pool, cancel).await?),
        None => None,
    };
    let sim = Simulator::start(
        SimConfig {
            create_latency: (Duration::from_millis(200), Duration::from_millis(800)),
            generation_time: (Duration::from_secs(3), Duration::from_secs(8)),
            failure_rate: 0.0,
            fault_rate: 0.03,
            seed: Some(2026),
            qps: Some(10),
            ..SimConfig::default()
        },
        "127.0.0.1:0".parse().expect("static address"),
    )
    .await
    .context("starting the simulator")?;
    println!(
        "Simulator of the provider's API on {} (reports take 3–8 s here, 1–10 min for real).",
        sim.base_url()
    );

    let mut ids = Vec::new();
    for (i, (name, code, org, kind)) in sample().into_iter().enumerate() {
        let r = NewRequest::new(name, code, org, kind)
            .and_then(|r| r.with_dedupe_key(Some(&format!("demo:{i}"))))
            .map_err(anyhow::Error::msg)?;
        ids.push(queue::enqueue(&pool, &r).await?.id());
    }
    println!(
        "Enqueued {} requests (INSERT INTO report_requests …).",
        ids.len()
    );

    let client = Client::new(sim.client_config()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut config = WorkerConfig::new(sim.config().client_id.clone());
    config.owner = "demo".into();
    config.concurrency = 8;
    config.qps = 10.0;
    config.lease = Duration::from_secs(15);
    config.idle_poll = Duration::from_millis(200);
    config.shutdown_timeout = Duration::from_secs(2);
    config.poll = PollPolicy {
        first_poll: Duration::from_secs(2),
        poll_min: Duration::from_secs(1),
        poll_max: Duration::from_secs(2),
        window: Duration::from_secs(60),
        ..PollPolicy::default()
    };
    // The same company and type asked again within a week is served from the stored
    // document (the demo asks twice more once the batch is done).
    config.reuse_within = Some(Duration::from_secs(7 * 24 * 3600));
    if pool_mode == queue::PoolMode::Transaction {
        // No LISTEN through a transaction pooler: idle polls find the rows.
        config.listen = crate::engine::Listen::Off;
    }
    config.retry = RetryPolicy {
        base: Duration::from_millis(200),
        cap: Duration::from_secs(2),
        budget: Duration::from_secs(60),
        new_task_base: Duration::from_secs(1),
    };
    let stop = CancellationToken::new();
    let worker = tokio::spawn(
        Worker::new(pool.clone(), client, config, Arc::new(Metrics::new())).run(stop.clone()),
    );

    let bar = indicatif::ProgressBar::new(ids.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed}] {bar:30} {pos}/{len} finished  {msg}",
        )
        .expect("static template"),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let counts = queue::state_counts(&pool, &ids).await?;
        let finished: i64 = counts
            .iter()
            .filter(|(s, _)| s.is_final())
            .map(|(_, n)| n)
            .sum();
        bar.set_position(finished as u64);
        bar.set_message(
            counts
                .iter()
                .map(|(s, n)| format!("{s} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        if finished as usize == ids.len() || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bar.finish();
    let repeats = ask_again(&pool).await?;
    ids.extend(&repeats);
    let kept = KeptUp {
        stop,
        worker,
        sim,
        pool: pool.clone(),
    };
    let kept = match dashboard_url {
        Some(_) => Some(kept),
        None => {
            kept.stop.cancel();
            let _ = kept.worker.await;
            kept.sim.stop().await;
            None
        }
    };

    let filter = export::ExportFilter {
        ids: Some(ids.clone()),
        ..Default::default()
    };
    let store = DocumentStore::Postgres;
    let exported = export::export(&pool, &store, out, &filter, false).await?;
    print_summary(&pool, &ids, &exported).await?;
    let files: std::collections::BTreeSet<&std::path::PathBuf> =
        exported.files.iter().map(|(_, path)| path).collect();
    let shared = exported.files.len() - files.len();
    println!(
        "\n{} stored, {} written to {}{}.",
        crate::domain::counted(exported.files.len() as i64, "document"),
        crate::domain::counted(files.len() as i64, "file"),
        out.display(),
        match shared {
            0 => String::new(),
            n => format!(" ({n} served again from a stored document: the same bytes, one file)"),
        }
    );
    if let (Some(url), Some(kept)) = (dashboard_url, kept) {
        println!(
            "\nThe dashboard stays up at {url} with the worker and the simulator: open a failed row and retry it. Ctrl-C ends the demo."
        );
        return Ok(Some(kept));
    }
    pool.close().await;
    Ok(None)
}

/// Asks again for two reports the batch bought (the same company and report type) and
/// for one it bought under another identifier (小米's Word report, now by its
/// organization code, which the batch only bought as a PDF: the provider's file names
/// say both identifiers are 小米), and waits for them: with reuse on they are served
/// from the stored documents, with no provider call. Returns their ids.
async fn ask_again(pool: &crate::queue::Db) -> anyhow::Result<Vec<i64>> {
    let again: [Sample; 3] = [
        (Some("小米科技有限责任公司"), None, None, ReportType::Pdf),
        (Some("华为技术有限公司"), None, None, ReportType::Pdf),
        (None, None, Some("5513850T82"), ReportType::Word),
    ];
    let mut ids = Vec::new();
    for (i, (name, code, org, kind)) in again.into_iter().enumerate() {
        let r = NewRequest::new(name, code, org, kind)
            .and_then(|r| r.with_dedupe_key(Some(&format!("demo:again:{i}"))))
            .map_err(anyhow::Error::msg)?;
        ids.push(queue::enqueue(pool, &r).await?.id());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let counts = queue::state_counts(pool, &ids).await?;
        let finished: i64 = counts
            .iter()
            .filter(|(s, _)| s.is_final())
            .map(|(_, n)| n)
            .sum();
        if finished as usize == ids.len() || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let saved = queue::reused_among(pool, &ids).await?;
    println!(
        "Asked again for 小米科技有限责任公司 and 华为技术有限公司 (PDF), and for 小米's Word report by its organization code 5513850T82 (bought by name and credit code only: the provider's file names confirm all three are 小米), REPORT_REUSE_WITHIN=7d: {saved} of 3 served from the stored documents, {saved} paid tasks saved."
    );
    Ok(ids)
}

/// Serves the dashboard for the demo, signed in with DASHBOARD_TOKEN or a fresh random
/// token (printed: it is this demo's own).
async fn start_dashboard(
    addr: SocketAddr,
    pool: &crate::queue::Db,
    cancel: CancellationToken,
) -> anyhow::Result<String> {
    let token = std::env::var("DASHBOARD_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
        .unwrap_or_else(|| hex::encode(rand::random::<[u8; 12]>()));
    let config = DashboardConfig::new(Some(Secret::new(token.clone())), DocumentStore::Postgres);
    let bound = crate::dashboard::serve(addr, pool.clone(), config, cancel)
        .await
        .with_context(|| format!("cannot serve the dashboard on {addr} (use --dashboard-addr)"))?;
    let url = format!("http://{bound}/");
    println!("Dashboard: {url}  (sign in with any name and the token {token})");
    Ok(url)
}

async fn print_summary(
    pool: &crate::queue::Db,
    ids: &[i64],
    exported: &export::ExportSummary,
) -> anyhow::Result<()> {
    let rows = queue::request_summaries(pool, ids).await?;
    println!(
        "\n{:>4}  {}  {:<5} {:<10} {:>3}  result",
        "id",
        pad("asked for", 32),
        "type",
        "state",
        "try"
    );
    for row in rows {
        let id = row.id;
        let asked = (row.company_name)
            .or(row.credit_code)
            .or(row.org_number)
            .unwrap_or_default();
        let result = match (row.state, row.byte_size) {
            (RequestState::Succeeded, Some(bytes)) => {
                let file = exported
                    .files
                    .iter()
                    .find(|(i, _)| *i == id)
                    .and_then(|(_, p)| p.file_name())
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default();
                format!("{file} ({} KB)", bytes / 1024)
            }
            _ => format!(
                "{} {}",
                row.last_error_code
                    .map(|c| c.to_string())
                    .unwrap_or_default(),
                row.last_error.unwrap_or_default()
            ),
        };
        println!(
            "{id:>4}  {}  {:<5} {:<10} {:>3}  {}",
            pad(&asked, 32),
            row.report_type.as_str(),
            row.state.as_str(),
            row.attempts,
            result.trim()
        );
    }
    Ok(())
}

/// Pads to a display width (CJK characters take two columns in a terminal).
fn pad(s: &str, width: usize) -> String {
    use unicode_width::UnicodeWidthStr;
    let w = s.width();
    if w >= width {
        s.to_string()
    } else {
        format!("{s}{}", " ".repeat(width - w))
    }
}
