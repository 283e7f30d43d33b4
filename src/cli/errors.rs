//! The one line a failed command prints: the error and its causes, each said once
//! (a wrapper that quotes its cause, and the cause itself, are one part), without the
//! database driver's noise (PostgreSQL's own source line, "error returned from
//! database"), and a hint for the causes a newcomer meets: a wrong password, nothing
//! listening, an unknown database, a schema not migrated, a missing privilege.

use std::io::ErrorKind;

use clap::CommandFactory;
use clap::error::{ContextKind, ContextValue, ErrorKind as UsageKind};

/// A usage error about a setting that came from the environment, said with the
/// variable's name (clap names the flag, which the user never typed): a bad value
/// (`REPORT_WINDOW=-5s is not valid: …`) or a required setting missing
/// (`DATABASE_URL is not set (or pass --database-url)`). `None` for any other error.
pub fn usage_from_environment(e: &clap::Error) -> Option<String> {
    let flag = match e.get(ContextKind::InvalidArg)? {
        ContextValue::String(s) => s.clone(),
        ContextValue::Strings(v) => v.first()?.clone(),
        _ => return None,
    };
    let long = flag
        .split_whitespace()
        .next()?
        .trim_start_matches('-')
        .to_string();
    let (env, hidden) = env_of(&long)?;
    let typed =
        std::env::args().any(|a| a == format!("--{long}") || a.starts_with(&format!("--{long}=")));
    match e.kind() {
        UsageKind::MissingRequiredArgument => Some(format!("{env} is not set (or pass --{long})")),
        UsageKind::ValueValidation | UsageKind::InvalidValue if !typed => {
            // A setting whose value is secret (hide_env_values) is named, never shown.
            let value = if hidden {
                "…".to_string()
            } else {
                std::env::var(&env).unwrap_or_default()
            };
            let why = std::error::Error::source(e)
                .map(|s| s.to_string())
                .or_else(|| match e.get(ContextKind::ValidValue) {
                    Some(ContextValue::Strings(v)) => {
                        Some(format!("expected one of {}", v.join(", ")))
                    }
                    _ => None,
                })
                .unwrap_or_else(|| "not a valid value".into());
            Some(format!("{env}={value} is not valid: {}", one_line(&why)))
        }
        _ => None,
    }
}

/// The environment variable of the flag `--long`, in whichever subcommand has it, and
/// whether its value is secret.
fn env_of(long: &str) -> Option<(String, bool)> {
    let cli = super::Cli::command();
    std::iter::once(&cli)
        .chain(cli.get_subcommands())
        .flat_map(|c| c.get_arguments())
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| {
            let env = a.get_env()?.to_string_lossy().into_owned();
            Some((env, a.is_hide_env_values_set()))
        })
}

/// `e` as one line, every cause once, with a hint when one applies.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut noise: Vec<String> = vec!["error returned from database: ".into()];
    for cause in e.chain() {
        if let Some(line) = pg_line(cause) {
            noise.push(format!(" at line {line}"));
        }
    }
    let clean = |text: String| {
        let mut text = one_line(&text);
        for n in &noise {
            text = text.replace(n.as_str(), "");
        }
        text
    };
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = clean(cause.to_string());
        if text.is_empty() || parts.iter().any(|p| p.contains(&text)) {
            continue;
        }
        parts.push(text);
    }
    let mut line = parts.join(": ");
    if let Some(hint) = hint(e) {
        line.push_str(" — ");
        line.push_str(&hint);
    }
    line
}

/// Whitespace (newlines included) folded to single spaces.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The PostgreSQL source line a server error names (`at line 334`), if `cause` is one.
fn pg_line(cause: &(dyn std::error::Error + 'static)) -> Option<u32> {
    let pg = cause
        .downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .or_else(|| match cause.downcast_ref::<sqlx::Error>() {
            Some(sqlx::Error::Database(d)) => {
                d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            }
            _ => None,
        })?;
    pg.line().map(|l| l as u32)
}

/// What to do about the most common causes, found anywhere in the chain.
fn hint(e: &anyhow::Error) -> Option<String> {
    for cause in e.chain() {
        if let Some(sqlx::Error::Database(d)) = cause.downcast_ref::<sqlx::Error>() {
            let code = d.code().unwrap_or_default();
            let hint = match code.as_ref() {
                "28P01" => "check the user and password in DATABASE_URL",
                "28000" => {
                    "the server refused this login: check the user in DATABASE_URL, and whether the server's pg_hba.conf admits this host and this sslmode"
                }
                "3D000" => "no such database: create it (createdb) or fix the name in DATABASE_URL",
                "42P01" | "42883" => {
                    "the queue's tables are missing: run `report-worker migrate` first"
                }
                "42501" => {
                    "this login lacks a privilege: run `report-worker grant` as the database's owner, then log in as a member of report_app (applications) or report_worker (run)"
                }
                "53300" => {
                    "the server has no connection to spare: raise max_connections or use a pooler"
                }
                _ => continue,
            };
            return Some(hint.into());
        }
        if let Some(sqlx::Error::PoolTimedOut) = cause.downcast_ref::<sqlx::Error>() {
            return Some(
                "no answer within 10 s: is the host right, and does a firewall let this machine reach it?"
                    .into(),
            );
        }
        if let Some(io) = io_error(cause) {
            let hint = match io.kind() {
                ErrorKind::ConnectionRefused => {
                    "nothing listens there: is the server running, and are the host and port right?"
                }
                _ => continue,
            };
            return Some(hint.into());
        }
    }
    None
}

fn io_error<'a>(cause: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    cause
        .downcast_ref::<std::io::Error>()
        .or_else(|| match cause.downcast_ref::<sqlx::Error>() {
            Some(sqlx::Error::Io(io)) => Some(io),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_quoted_by_its_wrapper_is_said_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot connect to the database at x: {source}")]
        struct Wrapper {
            source: std::io::Error,
        }
        let io = std::io::Error::new(
            ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        );
        let e = anyhow::Error::new(Wrapper { source: io });
        let line = error_line(&e);
        assert_eq!(line.matches("Connection refused").count(), 1, "{line}");
        assert!(line.contains("nothing listens there"), "{line}");
    }

    #[test]
    fn a_missing_file_is_said_once() {
        let io = std::fs::read("/nonexistent/nosuch.csv").unwrap_err();
        let e = anyhow::Error::new(io).context("cannot read nosuch.csv");
        let line = error_line(&e);
        assert_eq!(line.matches("No such file").count(), 1, "{line}");
        assert!(line.starts_with("cannot read nosuch.csv: "), "{line}");
    }
}
