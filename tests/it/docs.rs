//! The documentation, checked against the code: the README's tour runs as written, every
//! SQL block of the docs runs against the schema, every command line of the docs parses
//! with the binary's own arguments, the configuration page and `--help` name the same
//! variables, the layout table names every module, the changelog the binary's version.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every page under docs/.
fn pages() -> Vec<(String, String)> {
    let mut pages = vec![(
        "README.md".to_string(),
        std::fs::read_to_string(root().join("README.md")).unwrap(),
    )];
    let mut paths: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    paths.sort();
    for p in paths {
        let name = format!("docs/{}", p.file_name().unwrap().to_string_lossy());
        pages.push((name, std::fs::read_to_string(&p).unwrap()));
    }
    pages
}

/// The fenced blocks of `text` in `language`, with the line each starts on.
fn blocks(text: &str, language: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut open: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let fence = line.trim_start();
        match &mut open {
            None if fence.starts_with("```") => {
                if fence.trim_start_matches('`').trim() == language {
                    open = Some((i + 1, String::new()));
                } else {
                    open = Some((0, String::new()));
                }
            }
            Some(_) if fence.starts_with("```") => {
                let (at, body) = open.take().unwrap();
                if at > 0 {
                    out.push((at, body));
                }
            }
            Some((_, body)) => {
                body.push_str(line);
                body.push('\n');
            }
            None => {}
        }
    }
    out
}

fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_report-worker")
}

fn help(args: &[&str]) -> String {
    let out = Command::new(binary())
        .args(args)
        .arg("--help")
        .env_clear()
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The subcommands `--help` lists.
fn subcommands() -> BTreeSet<String> {
    let text = help(&[]);
    let mut in_list = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.starts_with("Commands:") {
            in_list = true;
            continue;
        }
        if in_list {
            if line.trim().is_empty() {
                break;
            }
            if let Some(word) = line.split_whitespace().next() {
                out.insert(word.to_string());
            }
        }
    }
    out
}

/// The README's tour, run as written by bash — only the database, the simulator's port
/// and the binary's folder are this test's — to a stored and exported document.
#[tokio::test]
async fn the_readme_tour_runs_as_written() {
    if !have_tool("psql", &["--version"]) {
        eprintln!("skipping: no psql");
        return;
    }
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let tour_at = readme
        .find("## A tour in 30 lines")
        .expect("the README has its tour");
    let (_, tour) = blocks(&readme[tour_at..], "sh").into_iter().next().unwrap();
    assert!(tour.lines().count() <= 32, "the tour is about 30 lines");
    let db = TestDb::empty().await;
    let port = free_port();
    let script = tour
        .replace("postgres://postgres@127.0.0.1:5432/postgres", &db.url)
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = Path::new(binary()).parent().unwrap();
    let out = Command::new("timeout")
        .arg("180")
        .arg("bash")
        .arg("-c")
        .arg(format!(
            "set -e\n{script}\nkill $(jobs -p) 2>/dev/null || true\nwait 2>/dev/null || true\n"
        ))
        .current_dir(dir.path())
        .env(
            "PATH",
            format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap()),
        )
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the tour failed:\n{stdout}\n{stderr}");
    let files: Vec<PathBuf> = std::fs::read_dir(dir.path().join("reports"))
        .unwrap_or_else(|e| panic!("no reports/: {e}\n{stdout}\n{stderr}"))
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}\n{stdout}");
    assert!(std::fs::read(&files[0]).unwrap().starts_with(b"%PDF-"));
    assert!(stdout.contains("succeeded"), "{stdout}");
    db.close().await;
}

/// Every ```sql block of the README and the docs runs against the migrated schema (in
/// a transaction rolled back), so no block names a column, view or function that is not
/// there.
#[tokio::test]
async fn every_sql_block_in_the_docs_runs() {
    let db = TestDb::new().await;
    // The roles some blocks name (`IN ROLE report_app`) exist once `grant` has run: on
    // a fresh server this test may be the first to need them.
    report_worker::queue::roles::grant(&db.pool).await.unwrap();
    let mut failures = Vec::new();
    let mut ran = 0;
    for (page, text) in pages() {
        for (line, sql) in blocks(&text, "sql") {
            ran += 1;
            let mut tx = db.pool.begin().await.unwrap();
            if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                .execute(&mut *tx)
                .await
            {
                failures.push(format!("{page}:{line}: {e}\n{sql}"));
            }
            let _ = tx.rollback().await;
        }
    }
    assert!(ran >= 10, "only {ran} SQL blocks found");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    db.close().await;
}

/// The words of a shell command line (quotes removed; enough for the docs' commands).
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
                any = false;
            }
            (None, c) => word.push(c),
        }
    }
    if any || !word.is_empty() {
        out.push(word);
    }
    out
}

/// Every `report-worker …` line in the docs' shell blocks names a real subcommand and
/// only flags that subcommand has; every variable set before it is one `--help` names.
#[test]
fn every_command_in_the_docs_parses() {
    let commands = subcommands();
    assert!(
        commands.contains("run") && commands.contains("demo"),
        "{commands:?}"
    );
    let mut helps = std::collections::BTreeMap::new();
    let mut failures = Vec::new();
    let mut checked = 0;
    for (page, text) in pages() {
        for (start, block) in blocks(&text, "sh") {
            // Lines continued with a backslash are one command.
            let joined = block.replace("\\\n", " ");
            for (i, line) in joined.lines().enumerate() {
                let code = line.split(" #").next().unwrap_or("");
                let code = code
                    .split(['|', ';', '&', '>', '<', '$', '`'])
                    .next()
                    .unwrap_or("");
                let w = words(code);
                let Some(at) = w.iter().position(|x| {
                    x == "report-worker" || x.ends_with("/report-worker") || x == "--"
                }) else {
                    continue;
                };
                if w[..at].iter().any(|x| x == "cargo") && !w[..at].iter().any(|x| x == "run") {
                    continue;
                }
                let Some(sub) = w.get(at + 1) else { continue };
                let place = format!("{page}:{} `{}`", start + i, line.trim());
                if !commands.contains(sub.as_str()) {
                    failures.push(format!("{place}: no subcommand {sub}"));
                    continue;
                }
                checked += 1;
                let text = helps
                    .entry(sub.clone())
                    .or_insert_with(|| help(&[sub.as_str()]))
                    .clone();
                for flag in w[at + 2..].iter().filter(|x| x.starts_with("--")) {
                    let name = flag.split('=').next().unwrap();
                    if name == "--" || name == "--help" {
                        continue;
                    }
                    if !text.contains(&format!("{name} "))
                        && !text.contains(&format!("{name}\n"))
                        && !text.contains(&format!("{name} <"))
                    {
                        failures.push(format!("{place}: `{sub}` has no flag {name}"));
                    }
                }
                for var in w[..at]
                    .iter()
                    .filter_map(|x| x.split_once('=').map(|(k, _)| k))
                {
                    if var
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit())
                        && !text.contains(&format!("[env: {var}"))
                        && ![
                            "RUST_LOG",
                            "NO_COLOR",
                            "TORTURE_SEEDS",
                            "TORTURE_SEED",
                            "TORTURE_FROM",
                            "UPDATE_SCREENSHOTS",
                            "UPDATE_SCHEMA_SNAPSHOT",
                        ]
                        .contains(&var)
                        && !report_worker::telemetry::VARIABLES.contains(&var)
                    {
                        failures.push(format!("{place}: `{sub}` reads no variable {var}"));
                    }
                }
            }
        }
    }
    assert!(checked >= 20, "only {checked} command lines found");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The configuration page and `run --help` name the same environment variables.
#[test]
fn the_configuration_page_matches_run_help() {
    let page = std::fs::read_to_string(root().join("docs/configuration.md")).unwrap();
    let run_help = help(&["run"]);
    let in_help: BTreeSet<String> = run_help
        .match_indices("[env: ")
        .map(|(i, _)| {
            run_help[i + 6..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_' || c.is_ascii_digit())
                .collect()
        })
        .collect();
    assert!(in_help.len() > 30, "{in_help:?}");
    let missing: Vec<&String> = in_help
        .iter()
        .filter(|v| !page.contains(&format!("`{v}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md lacks {missing:?}"
    );
    let named: BTreeSet<String> = page
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| {
            w.len() > 3
                && w.chars()
                    .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit())
                && w.contains('_')
        })
        .map(String::from)
        .collect();
    let all_help: String = subcommands().iter().map(|s| help(&[s.as_str()])).collect();
    let unknown: Vec<&String> = named
        .iter()
        .filter(|v| {
            // Read by the S3 client's own credential chain, the log filter, the tests.
            let others = [
                "RUST_LOG",
                "NO_COLOR",
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "TEST_DATABASE_URL",
            ];
            // And the OpenTelemetry variables, read by the trace exporter.
            let traces = report_worker::telemetry::VARIABLES;
            !all_help.contains(&format!("[env: {v}"))
                && !others.contains(&v.as_str())
                && !traces.contains(&v.as_str())
        })
        .collect();
    assert!(
        unknown.is_empty(),
        "docs/configuration.md names variables no command reads: {unknown:?}"
    );
}

/// Every page under docs/ is reachable from the README, and the README stays short.
#[test]
fn the_readme_is_a_front_door_to_every_page() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(
        readme.lines().count() <= 150,
        "README has {} lines",
        readme.lines().count()
    );
    for (page, _) in pages().into_iter().skip(1) {
        assert!(
            readme.contains(&format!("]({page})")),
            "README links {page}"
        );
    }
}

/// The layout table in docs/development.md names every source file of every folder.
#[test]
fn the_layout_table_names_every_module() {
    let page = std::fs::read_to_string(root().join("docs/development.md")).unwrap();
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(root().join("src")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            let row = page
                .lines()
                .find(|l| l.starts_with(&format!("| `src/{name}/`")))
                .unwrap_or_else(|| panic!("no row for src/{name}/"));
            for file in std::fs::read_dir(&path).unwrap() {
                let file = file.unwrap().path();
                let Some(stem) = file
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .strip_suffix(".rs")
                    .map(String::from)
                else {
                    continue;
                };
                if stem != "mod" && !row.contains(&format!("`{stem}")) {
                    missing.push(format!("src/{name}/{stem}.rs"));
                }
            }
        } else if let Some(stem) = name.strip_suffix(".rs")
            && stem != "lib"
            && stem != "main"
            && !page.contains(&format!("`src/{stem}.rs`"))
        {
            missing.push(format!("src/{stem}.rs"));
        }
    }
    assert!(
        missing.is_empty(),
        "docs/development.md's layout misses {missing:?}"
    );
}

/// The changelog's newest section is the version the binary reports.
#[test]
fn the_changelog_names_the_binarys_version() {
    let changelog = std::fs::read_to_string(root().join("CHANGELOG.md")).unwrap();
    let newest = changelog
        .lines()
        .find(|l| l.starts_with("## "))
        .expect("a section");
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        newest.contains(version),
        "CHANGELOG's newest section {newest:?} is not {version}"
    );
    let out = Command::new(binary()).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(version));
}
