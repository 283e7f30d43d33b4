//! `UPSTREAM_ACCOUNTS`: a TOML file listing the accounts one deployment pools. Each
//! account's secret comes from an environment variable or a file, never from the list
//! itself, so the list can be committed or mounted as a plain config map.
//!
//! ```toml
//! [[account]]
//! id = "client-a"              # the client id (also the apikey)
//! secret_env = "CLIENT_A_SECRET"
//! qps = 5                      # default: UPSTREAM_QPS
//! daily_limit = 1000           # default: none of ours
//! daily_headroom = 50          # default: 5 % of daily_limit
//! weight = 2                   # share of new creates; default: qps
//! create_path = "/gw/create"   # default: UPSTREAM_CREATE_PATH (token_path, status_path too)
//!
//! [[account]]
//! id = "client-b"
//! secret_file = "/run/secrets/client-b"
//! qps = 2
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::engine::DailyLimit;
use crate::upstream::Secret;
use crate::upstream::client::Paths;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountsFile {
    account: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    id: String,
    secret_env: Option<String>,
    secret_file: Option<PathBuf>,
    qps: Option<f64>,
    daily_limit: Option<u32>,
    daily_headroom: Option<u32>,
    weight: Option<f64>,
    token_path: Option<String>,
    create_path: Option<String>,
    status_path: Option<String>,
}

/// An account's own endpoint paths, where they differ from UPSTREAM_*_PATH.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathOverrides {
    pub token: Option<String>,
    pub create: Option<String>,
    pub status: Option<String>,
}

impl PathOverrides {
    /// These paths over the deployment's `defaults`.
    pub fn over(&self, defaults: &Paths) -> Paths {
        let pick = |own: &Option<String>, default: &String| {
            own.as_deref().map(str::trim).unwrap_or(default).to_string()
        };
        Paths {
            token: pick(&self.token, &defaults.token),
            create: pick(&self.create, &defaults.create),
            status: pick(&self.status, &defaults.status),
        }
    }
}

/// One account, ready for the worker.
#[derive(Debug, Clone)]
pub struct AccountSpec {
    pub id: String,
    pub secret: Secret,
    pub qps: f64,
    pub daily_limit: Option<DailyLimit>,
    pub weight: f64,
    pub paths: PathOverrides,
}

/// The daily limit with its headroom (default 5 % of the limit), checked.
pub fn daily_limit(
    limit: Option<u32>,
    headroom: Option<u32>,
    what: &str,
) -> anyhow::Result<Option<DailyLimit>> {
    let Some(limit) = limit else {
        if headroom.is_some() {
            bail!("{what}: a daily headroom without a daily limit");
        }
        return Ok(None);
    };
    if limit == 0 {
        bail!("{what}: the daily limit must be at least 1");
    }
    let headroom = headroom.unwrap_or(limit / 20);
    if headroom >= limit {
        bail!(
            "{what}: the daily headroom ({headroom}) must be below the daily limit ({limit}), or no new row could ever be created"
        );
    }
    Ok(Some(DailyLimit {
        limit: i64::from(limit),
        headroom: i64::from(headroom),
    }))
}

/// Reads and checks the accounts file. `env` reads an environment variable (the
/// process's, in production); `default_qps` is UPSTREAM_QPS. Every error names the
/// file and, where it can, the account and the field.
pub fn load(
    path: &Path,
    default_qps: f64,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Vec<AccountSpec>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("UPSTREAM_ACCOUNTS: cannot read {}", path.display()))?;
    parse(&text, default_qps, env).with_context(|| format!("UPSTREAM_ACCOUNTS {}", path.display()))
}

fn parse(
    text: &str,
    default_qps: f64,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Vec<AccountSpec>> {
    let file: AccountsFile = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
    if file.account.is_empty() {
        bail!("no [[account]] listed");
    }
    let mut seen = HashSet::new();
    let mut accounts = Vec::new();
    for (n, entry) in file.account.into_iter().enumerate() {
        let id = entry.id.trim().to_string();
        let what = format!("account {} ({id:?})", n + 1);
        if id.is_empty() {
            bail!("account {}: id is empty", n + 1);
        }
        if !seen.insert(id.clone()) {
            bail!("{what}: listed twice");
        }
        let secret = match (&entry.secret_env, &entry.secret_file) {
            (Some(var), None) => env(var)
                .filter(|v| !v.is_empty())
                .with_context(|| format!("{what}: secret_env {var} is not set or empty"))?,
            (None, Some(file)) => std::fs::read_to_string(file)
                .with_context(|| format!("{what}: cannot read secret_file {}", file.display()))?
                .trim()
                .to_string(),
            _ => bail!("{what}: give exactly one of secret_env and secret_file"),
        };
        if secret.is_empty() {
            bail!("{what}: the secret is empty");
        }
        let qps = entry.qps.unwrap_or(default_qps);
        if !(qps >= 0.0 && qps.is_finite()) {
            bail!("{what}: qps must be 0 (no pacing) or a positive number");
        }
        let weight = entry.weight.unwrap_or(if qps > 0.0 { qps } else { 1.0 });
        if !(weight > 0.0 && weight.is_finite()) {
            bail!("{what}: weight must be a positive number");
        }
        accounts.push(AccountSpec {
            daily_limit: daily_limit(entry.daily_limit, entry.daily_headroom, &what)?,
            id,
            secret: Secret::new(secret),
            qps,
            weight,
            paths: PathOverrides {
                token: entry.token_path,
                create: entry.create_path,
                status: entry.status_path,
            },
        });
    }
    Ok(accounts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(var: &str) -> Option<String> {
        match var {
            "A_SECRET" => Some("sa".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn err(text: &str) -> String {
        format!("{:#}", parse(text, 5.0, env).unwrap_err())
    }

    #[test]
    fn reads_accounts_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("b");
        std::fs::write(&secret, "sb\n").unwrap();
        let text = format!(
            "[[account]]\nid = \"a\"\nsecret_env = \"A_SECRET\"\nqps = 2\ndaily_limit = 100\n\n\
             [[account]]\nid = \"b\"\nsecret_file = {:?}\nweight = 3\ndaily_limit = 10\ndaily_headroom = 0\n",
            secret.display().to_string()
        );
        let accounts = parse(&text, 5.0, env).unwrap();
        assert_eq!(accounts.len(), 2);
        let (a, b) = (&accounts[0], &accounts[1]);
        assert_eq!(
            (a.id.as_str(), a.secret.expose(), a.qps, a.weight),
            ("a", "sa", 2.0, 2.0)
        );
        assert_eq!(
            a.daily_limit,
            Some(DailyLimit {
                limit: 100,
                headroom: 5
            })
        );
        assert_eq!(
            (b.id.as_str(), b.secret.expose(), b.qps, b.weight),
            ("b", "sb", 5.0, 3.0)
        );
        assert_eq!(
            b.daily_limit,
            Some(DailyLimit {
                limit: 10,
                headroom: 0
            })
        );
        // The secret never shows in debug output.
        assert!(!format!("{accounts:?}").contains("sa"));
    }

    #[test]
    fn an_accounts_own_paths_win_over_the_deployments() {
        let text =
            "[[account]]\nid = \"a\"\nsecret_env = \"A_SECRET\"\ncreate_path = \" /gw/create \"\n";
        let accounts = parse(text, 5.0, env).unwrap();
        let paths = accounts[0].paths.over(&Paths::default());
        assert_eq!(paths.create, "/gw/create");
        assert_eq!(paths.token, Paths::default().token);
        assert_eq!(paths.status, Paths::default().status);
        assert!(
            err("[[account]]\nid = \"a\"\nsecret_env = \"A_SECRET\"\ncreate = \"/x\"\n")
                .contains("create")
        );
    }

    #[test]
    fn bad_files_name_what_is_wrong() {
        assert!(err("").contains("account"), "{}", err(""));
        assert!(
            err("[[account]]\nid = \"a\"\nsecret_env = \"A_SECRET\"\nqsp = 1\n").contains("qsp")
        );
        assert!(
            err("[[account]]\nid = \"a\"\nsecret_env = \"NOPE\"\n").contains("NOPE is not set")
        );
        assert!(
            err("[[account]]\nid = \"a\"\nsecret_env = \"EMPTY\"\n")
                .contains("EMPTY is not set or empty")
        );
        assert!(
            err("[[account]]\nid = \"a\"\n").contains("exactly one of secret_env and secret_file")
        );
        let twice = "[[account]]\nid = \"a\"\nsecret_env = \"A_SECRET\"\n[[account]]\nid = \"a\"\nsecret_env = \"A_SECRET\"\n";
        assert!(
            err(twice).contains("account 2 (\"a\"): listed twice"),
            "{}",
            err(twice)
        );
        assert!(
            err("[[account]]\nid = \"a\"\nsecret_env = \"A_SECRET\"\nqps = -1\n").contains("qps")
        );
        assert!(
            err("[[account]]\nid = \"a\"\nsecret_env = \"A_SECRET\"\nweight = 0\n")
                .contains("weight")
        );
        let headroom = "[[account]]\nid = \"a\"\nsecret_env = \"A_SECRET\"\ndaily_limit = 5\ndaily_headroom = 5\n";
        assert!(err(headroom).contains("headroom (5) must be below the daily limit (5)"));
        assert!(
            err("[[account]]\nid = \"a\"\nsecret_env = \"A_SECRET\"\nqps = \"x\"\n")
                .contains("line 4"),
            "{}",
            err("[[account]]\nid = \"a\"\nsecret_env = \"A_SECRET\"\nqps = \"x\"\n")
        );
    }
}
