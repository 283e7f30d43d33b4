//! The command line: flags with environment fallbacks (flags win), and the one place
//! that turns errors into a single line on stderr and an exit status.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};

use crate::config::parse_duration;
use crate::domain::{NewRequest, ReportType};
use crate::{db, queue};

#[derive(Debug, Parser)]
#[command(
    name = "report-worker",
    version,
    about = "A durable PostgreSQL worker for slow, metered report APIs"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply the migrations in migrations/ (safe to run again).
    Migrate(DbArgs),
    /// Add one report request from flags and print its id.
    Enqueue(EnqueueArgs),
    /// Show the queue at a glance and any account-wide stop.
    Status(DbArgs),
    /// Serve a faithful simulator of the upstream API.
    Simulate(SimulateArgs),
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Address to listen on, e.g. 127.0.0.1:8080 (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    #[command(flatten)]
    pub sim: crate::simulator::SimConfig,
}

#[derive(Debug, Args)]
pub struct DbArgs {
    /// PostgreSQL connection string.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
}

#[derive(Debug, Args)]
pub struct EnqueueArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Enterprise name, e.g. 小米科技有限责任公司.
    #[arg(long)]
    pub company_name: Option<String>,
    /// Unified social credit code (18 digits or capital letters).
    #[arg(long)]
    pub credit_code: Option<String>,
    /// Organization code.
    #[arg(long)]
    pub org_number: Option<String>,
    /// Report type: word or pdf.
    #[arg(long = "type", default_value = "pdf")]
    pub report_type: ReportType,
    /// Lower runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i16,
    /// Not before this: an RFC 3339 time or a delay from now such as 10m.
    #[arg(long, value_parser = parse_run_after)]
    pub run_after: Option<DateTime<Utc>>,
    /// Upstream tasks that may be created for this row (1..=100, default 3).
    #[arg(long)]
    pub max_attempts: Option<i32>,
    /// Idempotency key: enqueueing the same key again returns the existing row.
    #[arg(long)]
    pub dedupe_key: Option<String>,
    /// Opaque JSON object stored with the row.
    #[arg(long, value_parser = parse_json_object)]
    pub metadata: Option<serde_json::Value>,
}

fn parse_run_after(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s.trim()) {
        return Ok(t.with_timezone(&Utc));
    }
    let delay = parse_duration(s).map_err(|_| {
        format!(
            "expected an RFC 3339 time (2026-01-31T09:00:00+08:00) or a delay like 10m, got {s:?}"
        )
    })?;
    Ok(Utc::now() + chrono::Duration::from_std(delay).map_err(|e| e.to_string())?)
}

fn parse_json_object(s: &str) -> Result<serde_json::Value, String> {
    let v: serde_json::Value = serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))?;
    if !v.is_object() {
        return Err("metadata must be a JSON object".into());
    }
    Ok(v)
}

/// Entry point of the binary. Usage errors and failures print one line on stderr.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version go to stdout and are not failures.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's message runs until its first blank line (then usage and tips follow):
            // fold that part into one line.
            let rendered = e.render().to_string();
            let message: Vec<&str> = rendered
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!("{}", message.join(" "));
            return ExitCode::from(2);
        }
    };
    init_tracing(&cli.command);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn init_tracing(command: &Command) {
    let default = match command {
        Command::Migrate(_) | Command::Enqueue(_) | Command::Status(_) => "warn",
        Command::Simulate(_) => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Migrate(args) => {
            let pool = db::connect(&args.database_url, 2).await?;
            db::migrate(&pool).await?;
            println!("migrations applied");
        }
        Command::Enqueue(args) => enqueue_one(args).await?,
        Command::Status(args) => {
            let pool = db::connect(&args.database_url, 2).await?;
            print!("{}", status_text(&pool).await?);
        }
        Command::Simulate(args) => {
            let sim = crate::simulator::Simulator::start(args.sim, args.listen)
                .await
                .with_context(|| format!("cannot listen on {}", args.listen))?;
            println!("simulator listening on {}", sim.base_url());
            let stop = tokio_util::sync::CancellationToken::new();
            tokio::spawn(crate::shutdown::on_signal(stop.clone()));
            sim.wait(stop).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn enqueue_one(args: EnqueueArgs) -> anyhow::Result<()> {
    let mut request = NewRequest::new(
        args.company_name.as_deref(),
        args.credit_code.as_deref(),
        args.org_number.as_deref(),
        args.report_type,
    )
    .and_then(|r| r.with_dedupe_key(args.dedupe_key.as_deref()))
    .and_then(|r| r.with_max_attempts(args.max_attempts))
    .and_then(|r| r.with_metadata(args.metadata))
    .map_err(anyhow::Error::msg)?;
    request.priority = args.priority;
    request.run_after = args.run_after;
    let pool = db::connect(&args.db.database_url, 2).await?;
    match queue::enqueue(&pool, &request)
        .await
        .context("enqueue refused")?
    {
        queue::Enqueued::Inserted(id) => println!("{id}"),
        queue::Enqueued::Duplicate(id) => {
            println!("{id}");
            eprintln!("dedupe key already used by request {id}: nothing inserted");
        }
    }
    Ok(())
}

/// The text `status` prints: one line per state, then the account-wide stops.
pub async fn status_text(pool: &sqlx::PgPool) -> anyhow::Result<String> {
    use std::fmt::Write;
    let stats = queue::queue_stats(pool)
        .await
        .context("reading report_queue_stats")?;
    let stops = queue::account_stops(pool)
        .await
        .context("reading report_account_stops")?;
    let mut out = String::new();
    writeln!(out, "{:<12} {:>10}  oldest", "state", "count")?;
    for s in &stats {
        let age = s
            .oldest_age_secs
            .map(|secs| {
                humantime::format_duration(Duration::from_secs(secs.max(0.0) as u64)).to_string()
            })
            .unwrap_or_else(|| "-".into());
        writeln!(out, "{:<12} {:>10}  {}", s.state, s.count, age)?;
    }
    if stops.is_empty() {
        writeln!(out, "account stop: none")?;
    }
    for stop in &stops {
        let code = stop
            .error_code
            .map(|c| format!(" ({c})"))
            .unwrap_or_default();
        let until = stop
            .until
            .map(|u| format!(", until {}", u.to_rfc3339()))
            .unwrap_or_default();
        writeln!(
            out,
            "account stop for {}: {}{} since {}{}, next probe {}, probes so far {}",
            stop.account,
            stop.reason,
            code,
            stop.since.to_rfc3339(),
            until,
            stop.probe_at.to_rfc3339(),
            stop.probes
        )?;
    }
    Ok(out)
}
