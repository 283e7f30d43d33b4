//! The command line: `args` holds the flags; this file dispatches each command and is
//! the one place that turns errors into a single line on stderr and an exit status.

mod accounts;
mod args;
pub(crate) mod errors;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

pub use self::args::*;
use crate::domain::{NewRequest, ReportType};
use crate::engine::Worker;
use crate::ops::status::status_text;
use crate::queue;

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
            if let Some(line) = errors::usage_from_environment(&e) {
                eprintln!("error: {line}");
                return ExitCode::from(2);
            }
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
    if let Err(line) = init_tracing(&cli.command, cli.log_format) {
        eprintln!("error: {line}");
        return ExitCode::from(2);
    }
    // One TLS crypto provider for every HTTP client of the process.
    crate::config::install_crypto_provider();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let format = cli.log_format;
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            let message = errors::error_line(&e);
            match format {
                LogFormat::Text => eprintln!("error: {message}"),
                // A log pipeline gets the fatal error as one more JSON line.
                LogFormat::Json => eprintln!(
                    "{}",
                    serde_json::json!({
                        "timestamp": chrono::Utc::now().to_rfc3339(),
                        "level": "ERROR",
                        "message": message,
                    })
                ),
            }
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (a default per command); for `run`, also
/// OpenTelemetry traces when the standard `OTEL_*` variables ask for them. A tracing
/// setting it cannot honour is a one-line error.
fn init_tracing(command: &Command, format: LogFormat) -> Result<(), String> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let default = match command {
        Command::Migrate(_)
        | Command::Enqueue(_)
        | Command::Status(_)
        | Command::Purge(_)
        | Command::Grant(_)
        | Command::MoveDocuments(_)
        | Command::CheckProvider(_) => "warn",
        Command::Simulate(_) | Command::Run(_) | Command::Dashboard(_) => "info",
        Command::Export(_) => "warn",
        Command::Demo(_) | Command::Bench(_) => "error",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default))
        // The spans made for traces are not for the logs (and cost nothing when no
        // trace exporter wants them either).
        .add_directive(
            format!("{}=off", crate::telemetry::TARGET)
                .parse()
                .expect("a valid directive"),
        )
        // The trace exporter's own messages: its failures (a collector down, refused
        // headers, spans dropped), not its chatter.
        .add_directive("opentelemetry=warn".parse().expect("a valid directive"));
    let traces = match command {
        // `bench` too: its tracing scenario measures burn-down with traces on.
        Command::Run(_) | Command::Bench(_) => {
            crate::telemetry::settings(|k| std::env::var(k).ok())?
        }
        _ => None,
    };
    use std::io::IsTerminal;
    let logs = tracing_subscriber::fmt::layer()
        // Colours only for a person at a terminal, never into files and pipelines.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.with_filter(filter).boxed(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter)
            .boxed(),
    };
    let exporter = match &traces {
        Some(settings) => Some(crate::telemetry::init(settings).map_err(|e| e.to_string())?),
        None => None,
    };
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(exporter)
        .try_init();
    if let Some(settings) = traces {
        tracing::info!(endpoint = %settings.endpoint, sampler = ?settings.sampler, "exporting OpenTelemetry traces over OTLP/HTTP");
    }
    Ok(())
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Migrate(args) => {
            let pool = args.connect_unchecked(2).await?;
            let before = queue::schema(&pool).await?;
            if let queue::Schema::Ahead { .. } = before {
                anyhow::bail!("{}", before.problem().unwrap_or_default());
            }
            queue::migrate(&pool).await?;
            let latest = queue::MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
            match before {
                queue::Schema::Current => {
                    println!("up to date (schema {latest}): nothing to apply")
                }
                _ => println!("migrations applied: schema {latest}"),
            }
        }
        Command::Enqueue(args) => return enqueue_one(args).await,
        Command::Status(args) => {
            let pool = args.db.connect(2).await?;
            match &args.batch {
                Some(batch) => print!("{}", crate::ops::status::batch_text(&pool, batch).await?),
                None => print!("{}", status_text(&pool).await?),
            }
        }
        Command::Run(args) => run_worker(*args).await?,
        Command::Demo(args) => {
            let dashboard = args.dashboard.then_some(args.dashboard_addr);
            crate::ops::demo::run(
                args.database_url,
                args.database_pool_mode,
                &args.out,
                args.keep,
                dashboard,
            )
            .await?
        }
        Command::Dashboard(args) => {
            let pool = args.db.connect(6).await?;
            let config = args.access.config(args.store.open().await?);
            let cancel = tokio_util::sync::CancellationToken::new();
            tokio::spawn(crate::ops::signals::on_signal(cancel.clone()));
            let bound = crate::dashboard::serve(args.listen, pool.clone(), config, cancel.clone())
                .await
                .with_context(|| format!("cannot serve the dashboard on {}", args.listen))?;
            println!("dashboard on http://{bound}/ (Ctrl-C stops it)");
            cancel.cancelled().await;
            pool.close().await;
        }
        Command::Bench(args) => {
            let options = crate::ops::bench::BenchOptions {
                database_url: args.db.database_url,
                only: args.only,
                reports: args.reports,
                concurrency: args.concurrency,
                csv_rows: args.csv_rows,
                inflight_rows: args.inflight_rows,
                qps: args.qps,
                stats_rows: args.stats_rows,
                document_mb: args.document_mb,
                dashboard_rows: args.dashboard_rows,
                pooler_url: args.pooler,
            };
            let results = crate::ops::bench::run(&options).await?;
            // Spans still batched reach the collector (the tracing scenario counts them).
            crate::telemetry::shutdown().await;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&results)?);
            } else {
                print!("{}", crate::ops::bench::table(&results));
            }
        }
        Command::Export(args) => {
            use std::io::IsTerminal;
            let pool = args.db.connect(3).await?;
            let asked = args.ids.clone();
            let filter = crate::ops::export::ExportFilter {
                state: args.state,
                since: args.since,
                ids: args.ids,
                batch: args.batch,
            };
            let store = args.store.open().await?;
            let s = crate::ops::export::export(
                &pool,
                &store,
                &args.out,
                &filter,
                std::io::stderr().is_terminal(),
            )
            .await?;
            println!(
                "written {}, already there {}, {} bytes, in {}",
                s.written,
                s.skipped,
                s.bytes,
                args.out.display()
            );
            if let Some(asked) = asked {
                let missing = not_exported(&pool, &asked, &s, &filter).await?;
                if !missing.is_empty() {
                    eprintln!("not exported: {}", missing.join(", "));
                    return Ok(ExitCode::from(EXIT_SOME_REJECTED));
                }
            }
        }
        Command::Purge(args) => return purge(args).await,
        Command::CheckProvider(args) => return check_provider(args).await,
        Command::Grant(args) => {
            let pool = args.connect(2).await?;
            queue::roles::grant(&pool).await.context("granting")?;
            println!(
                "roles {} and {} are ready: give a login one of them, e.g. CREATE ROLE my_app LOGIN PASSWORD '…' IN ROLE {}",
                queue::roles::APP_ROLE,
                queue::roles::WORKER_ROLE,
                queue::roles::APP_ROLE
            );
        }
        Command::MoveDocuments(args) => {
            use std::io::IsTerminal;
            let pool = args.db.connect(2).await?;
            let store = args.store.open().await?;
            if matches!(store, crate::store::DocumentStore::Postgres) {
                anyhow::bail!("move-documents needs DOCUMENT_STORE=s3://bucket/prefix to move to");
            }
            let cancel = tokio_util::sync::CancellationToken::new();
            tokio::spawn(crate::ops::signals::on_signal(cancel.clone()));
            let moved = crate::ops::move_documents::move_documents(
                &pool,
                &store,
                &cancel,
                std::io::stderr().is_terminal(),
            )
            .await?;
            println!(
                "moved {} documents ({} bytes) to {}{}",
                moved.documents,
                moved.bytes,
                store.describe(),
                if cancel.is_cancelled() {
                    "; interrupted: run again to go on"
                } else {
                    ""
                }
            );
        }
        Command::Simulate(args) => {
            let sim = crate::simulator::Simulator::start(args.sim, args.listen)
                .await
                .with_context(|| format!("cannot listen on {}", args.listen))?;
            println!("simulator listening on {}", sim.base_url());
            let stop = tokio_util::sync::CancellationToken::new();
            tokio::spawn(crate::ops::signals::on_signal(stop.clone()));
            sim.wait(stop).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `check-provider`: the findings of each account, exit 1 when one failed.
/// The ids `export --ids` was given that it wrote no file for, each with why: no such
/// request, another state, no stored document, or left out by `--since`/`--batch`.
async fn not_exported(
    pool: &queue::Db,
    asked: &[i64],
    exported: &crate::ops::export::ExportSummary,
    filter: &crate::ops::export::ExportFilter,
) -> anyhow::Result<Vec<String>> {
    use std::collections::{BTreeSet, HashMap, HashSet};
    let written: HashSet<i64> = exported.files.iter().map(|(id, _)| *id).collect();
    let asked: BTreeSet<i64> = asked
        .iter()
        .copied()
        .filter(|id| !written.contains(id))
        .collect();
    let wanted: Vec<i64> = asked.iter().copied().collect();
    let found: HashMap<i64, queue::RequestSummary> = queue::request_summaries(pool, &wanted)
        .await?
        .into_iter()
        .map(|r| (r.id, r))
        .collect();
    let state = filter.state;
    Ok(asked
        .iter()
        .map(|id| {
            let why = match found.get(id) {
                None => "no such request".to_string(),
                Some(r) if r.state != state => {
                    format!("{}, not {}", r.state.as_str(), state.as_str())
                }
                Some(r) if r.byte_size.is_none() => "no stored document".to_string(),
                Some(_) => match (&filter.since, &filter.batch) {
                    (Some(_), Some(_)) => "left out by --since or --batch".to_string(),
                    (Some(_), None) => "finished before --since".to_string(),
                    (None, _) => "not in --batch".to_string(),
                },
            };
            format!("{id} ({why})")
        })
        .collect())
}

async fn check_provider(args: CheckProviderArgs) -> anyhow::Result<ExitCode> {
    let (client, accounts) = args.provider.client_config()?;
    let accounts: Vec<_> = match &args.account {
        Some(id) => {
            let Some(one) = accounts.iter().find(|a| &a.id == id) else {
                anyhow::bail!("--account {id:?} is not one of the configured accounts");
            };
            vec![one.clone()]
        }
        None => accounts,
    };
    let task = if args.create {
        let request = NewRequest::new(
            args.company_name.as_deref(),
            args.credit_code.as_deref(),
            args.org_number.as_deref(),
            args.report_type.unwrap_or(ReportType::Pdf),
        )
        .map_err(|e| anyhow::anyhow!("--create: {e}"))?;
        Some(crate::upstream::client::CreateTask {
            company_name: request.company_name,
            credit_code: request.credit_code,
            org_number: request.org_number,
            report_type: Some(request.report_type),
        })
    } else {
        None
    };
    let setups = RunArgs::account_setups(&client, &accounts)?;
    let mut passed = true;
    for (setup, spec) in setups.iter().zip(&accounts) {
        let report = crate::upstream::probe::check(&setup.client, spec.qps, task.as_ref()).await;
        println!(
            "account {} at {}: {}",
            spec.id,
            crate::config::redact_url(&setup.client.config().base_url),
            if report.passed() { "ok" } else { "FAILED" }
        );
        print!("{}", report.render());
        passed &= report.passed();
    }
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn enqueue_one(args: EnqueueArgs) -> anyhow::Result<ExitCode> {
    if let Some(path) = &args.csv {
        return enqueue_csv(&args, path).await;
    }
    let mut request = NewRequest::new(
        args.company_name.as_deref(),
        args.credit_code.as_deref(),
        args.org_number.as_deref(),
        args.report_type.unwrap_or(ReportType::Pdf),
    )
    .and_then(|r| r.with_dedupe_key(args.dedupe_key.as_deref()))
    .and_then(|r| r.with_max_attempts(args.max_attempts))
    .and_then(|r| r.with_metadata(args.metadata))
    .and_then(|r| r.with_batch(args.batch.as_deref()))
    .and_then(|r| r.with_callback_url(args.callback_url.as_deref()))
    .map_err(anyhow::Error::msg)?;
    request.priority = args.priority;
    request.run_after = args.run_after;
    let pool = args.db.connect(2).await?;
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
    Ok(ExitCode::SUCCESS)
}

/// Exit status when some CSV lines were rejected (the good ones went in).
pub const EXIT_SOME_REJECTED: u8 = 3;

async fn enqueue_csv(args: &EnqueueArgs, path: &std::path::Path) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    let pool = args.db.connect(2).await?;
    let batch = match args
        .batch
        .as_deref()
        .map(str::trim)
        .filter(|b| !b.is_empty())
    {
        Some(b) => b.to_string(),
        None => format!(
            "{} {}",
            path.file_name()
                .map(|f| f.to_string_lossy())
                .unwrap_or_default(),
            chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")
        ),
    };
    NewRequest::new(Some("x"), None, None, ReportType::Pdf)
        .and_then(|r| r.with_batch(Some(&batch)))
        .map_err(anyhow::Error::msg)?;
    let options = crate::ops::csv_import::CsvOptions {
        encoding: args.encoding,
        default_type: args.report_type,
        all_or_nothing: args.all_or_nothing,
        batch_size: args.batch_size as usize,
        progress: std::io::stderr().is_terminal(),
        batch: Some(batch.clone()),
    };
    let summary = crate::ops::csv_import::import(&pool, path, &options, |line, reason| {
        eprintln!("line {line}: {reason}");
    })
    .await?;
    if summary.rolled_back {
        anyhow::bail!(
            "{} bad lines: nothing inserted (--all-or-nothing)",
            summary.rejected
        );
    }
    println!(
        "inserted {}, duplicates {}, rejected {}",
        summary.inserted, summary.duplicates, summary.rejected
    );
    eprintln!(
        "batch {batch:?}: follow it with `report-worker status --batch {}`",
        crate::domain::shell_quote(&batch)
    );
    Ok(if summary.rejected > 0 {
        ExitCode::from(EXIT_SOME_REJECTED)
    } else {
        ExitCode::SUCCESS
    })
}

async fn purge(args: PurgeArgs) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    if args.finished_before.is_none() && args.events_before.is_none() {
        anyhow::bail!("nothing to purge: give --finished-before and/or --events-before");
    }
    let pool = args.db.connect(2).await?;
    let store = args.store.open().await?;
    let now = chrono::Utc::now();
    let ago = |d: std::time::Duration| -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
        Ok(now - chrono::Duration::from_std(d).context("duration too long")?)
    };
    let scope = match args.finished_before {
        Some(d) => Some(queue::PurgeScope {
            finished_before: ago(d)?,
            documents_only: args.documents_only,
        }),
        None => None,
    };
    let events_before = args.events_before.map(ago).transpose()?;
    if args.dry_run {
        let would = match &scope {
            Some(scope) => crate::engine::retention::purge_dry_run(&pool, scope).await?,
            None => Default::default(),
        };
        println!(
            "would remove {} requests and {} documents (dry run: nothing removed)",
            would.requests, would.documents
        );
        return Ok(ExitCode::SUCCESS);
    }
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(crate::ops::signals::on_signal(cancel.clone()));
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new_spinner()
    } else {
        indicatif::ProgressBar::hidden()
    };
    let started = std::time::Instant::now();
    let report = crate::engine::retention::purge(
        &pool,
        &store,
        scope.as_ref(),
        events_before,
        if args.full_speed {
            crate::engine::retention::Pace::Full
        } else {
            crate::engine::retention::Pace::Gentle
        },
        &cancel,
        |r| {
            bar.set_message(format!(
                "removed {} requests, {} documents, {} events",
                r.requests, r.documents, r.events
            ));
            bar.tick();
        },
    )
    .await
    .context("purging")?;
    bar.finish_and_clear();
    println!(
        "removed {} requests, {} documents, {} events in {:.1} s ({} batches){}",
        report.requests,
        report.documents,
        report.events,
        started.elapsed().as_secs_f64(),
        report.batches,
        if cancel.is_cancelled() {
            "; interrupted"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// The provider's documented longest answer to a create.
const PROVIDER_MAX_ANSWER: std::time::Duration = std::time::Duration::from_secs(10);

async fn run_worker(args: RunArgs) -> anyhow::Result<()> {
    if args.check_config {
        println!("{}", serde_json::to_string_pretty(&args.effective()?)?);
        return Ok(());
    }
    let (client_config, mut worker_config, account_specs) = args.configs()?;
    worker_config.documents = args.store.open().await?;
    if client_config.timeout < PROVIDER_MAX_ANSWER {
        tracing::warn!(
            "UPSTREAM_TIMEOUT ({}) is below the provider's {} maximum answer time: slow creates will go unanswered, each spending an attempt (and a paid task)",
            humantime::format_duration(client_config.timeout),
            humantime::format_duration(PROVIDER_MAX_ANSWER)
        );
    }
    let accounts = RunArgs::account_setups(&client_config, &account_specs)?;
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(crate::ops::signals::on_signal(cancel.clone()));
    // A database that is restarting is waited for, not a reason to exit.
    let connecting = queue::connect_worker_patiently(
        &args.db.database_url,
        crate::engine::pool_size(worker_config.concurrency),
        args.worker_startup_timeout,
        args.db.database_pool_mode,
    );
    let pool = tokio::select! {
        pool = connecting => pool?,
        _ = cancel.cancelled() => return Ok(()),
    };
    if let Some(problem) = queue::schema(&pool).await?.problem() {
        anyhow::bail!("{problem}");
    }
    let metrics = std::sync::Arc::new(crate::engine::metrics::Metrics::new());
    if let Some(addr) = args.metrics_addr {
        let bound = crate::engine::metrics::serve(
            addr,
            pool.clone(),
            metrics.clone(),
            account_specs
                .iter()
                .map(|a| crate::engine::metrics::AccountInfo {
                    name: a.id.clone(),
                    qps: a.qps,
                    daily_limit: a.daily_limit,
                })
                .collect(),
            cancel.clone(),
        )
        .await
        .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tracing::info!(%bound, "metrics on /metrics, health on /healthz");
    }
    if let Some(addr) = args.dashboard_addr {
        // Its own small pool: page loads never wait for (or hold up) the worker's.
        let dashboard_pool = args.db.connect(3).await?;
        let config = args.dashboard.config(worker_config.documents.clone());
        let bound = crate::dashboard::serve(addr, dashboard_pool, config, cancel.clone())
            .await
            .with_context(|| format!("cannot serve the dashboard on {addr}"))?;
        tracing::info!(%bound, "dashboard on http://{bound}/");
    }
    Worker::with_accounts(pool.clone(), accounts, worker_config, metrics)
        .run(cancel)
        .await;
    crate::telemetry::shutdown().await;
    pool.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsed_arguments_never_show_the_secret() {
        let cli = Cli::try_parse_from([
            "report-worker",
            "run",
            "--database-url",
            "postgres://localhost/x",
            "--upstream-client-id",
            "id",
            "--upstream-client-secret",
            "s3cr3t-value",
        ])
        .unwrap();
        assert!(!format!("{cli:?}").contains("s3cr3t-value"));
    }

    fn run_args(extra: &[&str]) -> anyhow::Result<RunArgs> {
        let mut argv = vec!["--database-url", "postgres://localhost/x"];
        argv.extend_from_slice(extra);
        RunArgs::parse_from(argv)
    }

    #[test]
    fn the_daily_limit_and_reuse_settings_reach_the_worker() {
        let args = run_args(&[
            "--upstream-client-id",
            "id",
            "--upstream-client-secret",
            "s",
            "--upstream-daily-limit",
            "200",
            "--report-reuse-within",
            "7d",
        ])
        .unwrap();
        let (_, worker, accounts) = args.configs().unwrap();
        let limit = crate::engine::DailyLimit {
            limit: 200,
            headroom: 10,
        };
        assert_eq!(worker.daily_limit, Some(limit));
        assert_eq!(accounts[0].daily_limit, Some(limit));
        assert_eq!(
            worker.reuse_within,
            Some(std::time::Duration::from_secs(7 * 86_400))
        );
        let off = run_args(&[
            "--upstream-client-id",
            "id",
            "--upstream-client-secret",
            "s",
            "--report-reuse-within",
            "0s",
        ])
        .unwrap();
        let (_, worker, _) = off.configs().unwrap();
        assert_eq!((worker.reuse_within, worker.daily_limit), (None, None));
    }

    #[test]
    fn accounts_come_from_one_place_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("accounts.toml");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s").unwrap();
        std::fs::write(
            &file,
            format!(
                "[[account]]\nid = \"a\"\nsecret_file = {:?}\nqps = 3\n[[account]]\nid = \"b\"\nsecret_file = {:?}\n",
                secret.display().to_string(),
                secret.display().to_string()
            ),
        )
        .unwrap();
        let path = file.display().to_string();
        let (client, worker, accounts) = run_args(&["--upstream-accounts", &path])
            .unwrap()
            .configs()
            .unwrap();
        let ids: Vec<&str> = accounts.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!((accounts[0].qps, accounts[1].qps), (3.0, 5.0));
        assert_eq!(client.credentials.client_id, "a");
        assert_eq!(worker.account, "a");
        let both = run_args(&["--upstream-accounts", &path, "--upstream-client-id", "x"])
            .unwrap()
            .configs()
            .unwrap_err();
        assert!(both.to_string().contains("both set"), "{both}");
        let none = run_args(&[]).unwrap().configs().unwrap_err();
        assert!(none.to_string().contains("UPSTREAM_CLIENT_ID"), "{none}");
        let per_account = run_args(&["--upstream-accounts", &path, "--upstream-daily-limit", "5"])
            .unwrap()
            .configs()
            .unwrap_err();
        assert!(
            per_account.to_string().contains("daily_limit"),
            "{per_account}"
        );
    }
}
