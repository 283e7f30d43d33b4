//! Operations: the demo, bulk CSV enqueue, export, and the compose file.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

use crate::common::*;
use report_worker::domain::ReportType;
use report_worker::ops::csv_import::{CsvOptions, import, parse_encoding};
use report_worker::ops::export::{ExportFilter, export};
use report_worker::store::DocumentStore;

fn bin(args: &[&str], database_url: Option<&str>, dir: &Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_report-worker"));
    cmd.args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG");
    if let Some(url) = database_url {
        cmd.env("DATABASE_URL", url);
    }
    cmd.output().expect("the binary runs")
}

fn check_demo_output(out: &Output, dir: &Path) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files: Vec<_> = std::fs::read_dir(dir.join("report-worker-demo"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    // Nine bought; the two served again from stored documents are the same bytes, which
    // the export writes once.
    assert_eq!(files.len(), 9, "{files:?}");
    assert!(
        stdout.contains("3 of 3 served from the stored documents, 3 paid tasks saved"),
        "{stdout}"
    );
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        if name.ends_with(".pdf") {
            assert!(bytes.starts_with(b"%PDF-"), "{name}");
        } else {
            assert!(
                name.ends_with(".docx") && bytes.starts_with(b"PK\x03\x04"),
                "{name}"
            );
        }
    }
    let pdf = files
        .iter()
        .find(|f| f.to_string_lossy().contains("小米") && f.to_string_lossy().ends_with(".pdf"))
        .unwrap();
    if have_tool("pdftotext", &["-v"]) {
        let text = Command::new("pdftotext")
            .arg(pdf)
            .arg("-")
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&text.stdout).contains("小米科技有限责任公司"));
    }
    assert!(
        stdout.contains("68300004"),
        "the invalid request is refused: {stdout}"
    );
    // What it wrote, counted: 13 rows, 12 documents (one refused), 9 files (the three
    // served again are the same bytes as documents it bought).
    assert!(
        stdout.contains("12 documents stored, 9 files written to report-worker-demo (3 served again from a stored document"),
        "{stdout}"
    );
}

/// The database the demo made for itself, from what it printed.
fn demo_database(stdout: &str) -> String {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("Created the database rw_demo_"))
        .unwrap_or_else(|| panic!("{stdout}"));
    line.split_whitespace().nth(3).unwrap().to_string()
}

async fn database_exists(pool: &sqlx::PgPool, name: &str) -> bool {
    sqlx::query_scalar("SELECT count(*) = 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Runs a line the demo printed, as a person pasting it into a shell would.
fn paste(line: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(line.trim())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn demo_runs_on_its_own_throwaway_postgres() {
    if report_worker::ops::embedded_pg::find_bindir().is_none() {
        eprintln!(
            "skipping: no PostgreSQL server binaries on this machine (the demo says how to install them)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let out = bin(&["demo"], None, dir.path());
    eprintln!("demo took {:?}", start.elapsed());
    check_demo_output(&out, dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("throwaway PostgreSQL"));
    assert!(
        !stdout.contains("psql"),
        "no hint at a database that is gone: {stdout}"
    );
    // Nothing left running or lying around.
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("report-worker-demo-pg-")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// With DATABASE_URL set the demo works in a database of its own on that server and
/// removes it: the user's database gets no table, no row, no simulator document.
#[tokio::test]
async fn demo_with_database_url_never_touches_that_database() {
    let db = TestDb::empty().await;
    let dir = tempfile::tempdir().unwrap();
    // The database named in the query, as sqlx allows (it wins over the path).
    let mut url = url::Url::parse(&db.url).unwrap();
    url.set_path("/postgres");
    url.query_pairs_mut().append_pair("dbname", &db.name);
    let out = bin(&["demo"], Some(url.as_str()), dir.path());
    check_demo_output(&out, dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let own = demo_database(&stdout);
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'report%'"
        )
        .await,
        0,
        "the user's database is untouched"
    );
    assert!(!database_exists(&db.pool, &own).await, "{own} is removed");
    assert!(!stdout.contains("psql"), "{stdout}");
    db.close().await;
}

/// `--keep` keeps the demo's database, and the psql and DROP lines it prints work when
/// pasted.
#[tokio::test]
async fn demo_keep_prints_hints_that_work() {
    if !have_tool("psql", &["--version"]) {
        eprintln!("skipping: no psql");
        return;
    }
    let db = TestDb::empty().await;
    let dir = tempfile::tempdir().unwrap();
    let out = bin(&["demo", "--keep"], Some(&db.url), dir.path());
    check_demo_output(&out, dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let own = demo_database(&stdout);
    assert!(database_exists(&db.pool, &own).await);
    let psql = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("psql "))
        .unwrap_or_else(|| panic!("{stdout}"));
    let looked = paste(&format!(
        "{} -At -c 'SELECT count(*) FROM report_requests'",
        psql.trim()
    ));
    assert_eq!(
        String::from_utf8_lossy(&looked.stdout).trim(),
        "13",
        "{psql}: {}",
        String::from_utf8_lossy(&looked.stderr)
    );
    let remove = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Remove it with: "))
        .unwrap_or_else(|| panic!("{stdout}"));
    let removed = paste(remove);
    assert!(
        removed.status.success(),
        "{remove}: {}",
        String::from_utf8_lossy(&removed.stderr)
    );
    assert!(!database_exists(&db.pool, &own).await);
    db.close().await;
}

/// A role that may not create databases: one line saying what to do, nothing written.
#[tokio::test]
async fn demo_without_createdb_says_so_in_one_line() {
    let db = TestDb::empty().await;
    let role = format!("nocreate_{}", std::process::id());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN NOCREATEDB"
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let mut url = url::Url::parse(&db.url).unwrap();
    url.set_username(&role).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = bin(&["demo"], Some(url.as_str()), dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("may not create databases"), "{err}");
    assert!(err.contains("CREATEDB"), "{err}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP ROLE {role}")))
        .execute(&db.pool)
        .await
        .unwrap();
    db.close().await;
}

/// The throwaway server kept with `--keep`: the start command it prints starts it again
/// and the psql line reaches the demo's rows.
#[tokio::test]
async fn demo_keep_on_a_throwaway_server_prints_a_start_command_that_works() {
    if report_worker::ops::embedded_pg::find_bindir().is_none()
        || !have_tool("psql", &["--version"])
    {
        eprintln!("skipping: no PostgreSQL server binaries or psql on this machine");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = bin(&["demo", "--keep"], None, dir.path());
    check_demo_output(&out, dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("Kept the throwaway database"))
        .unwrap_or_else(|| panic!("{stdout}"));
    let start = lines[at + 1].trim();
    let psql = lines[at + 2].trim();
    assert!(psql.starts_with("psql "), "{stdout}");
    let started = paste(start);
    assert!(started.status.success(), "{start}");
    let rows = wait_for(
        "the kept server answers",
        std::time::Duration::from_secs(30),
        || async {
            let o = paste(&format!(
                "{psql} -At -c 'SELECT count(*) FROM report_requests'"
            ));
            o.status
                .success()
                .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
        },
    )
    .await;
    assert_eq!(rows, "13");
    // Stop it (a fast shutdown) and remove the folder.
    let data = start
        .split_whitespace()
        .skip_while(|w| *w != "-D")
        .nth(1)
        .unwrap()
        .trim_matches('\'')
        .to_string();
    let pid = std::fs::read_to_string(Path::new(&data).join("postmaster.pid")).unwrap();
    let pid = pid.lines().next().unwrap().trim().to_string();
    let _ = Command::new("kill").args(["-INT", &pid]).status();
    wait_for(
        "the kept server stops",
        std::time::Duration::from_secs(30),
        || async { (!Path::new(&format!("/proc/{pid}")).exists()).then_some(()) },
    )
    .await;
    let _ = std::fs::remove_dir_all(Path::new(&data).parent().unwrap());
}

/// Empties the queue between the parts of one test.
async fn clear_requests(db: &TestDb) {
    sqlx::query("DELETE FROM report_requests")
        .execute(&db.pool)
        .await
        .unwrap();
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

async fn run_import(
    db: &TestDb,
    path: &Path,
    options: &CsvOptions,
) -> (
    report_worker::ops::csv_import::CsvSummary,
    Vec<(u64, String)>,
) {
    let mut rejected = Vec::new();
    let s = import(&db.pool, path, options, |line, why| {
        rejected.push((line, why.to_string()))
    })
    .await
    .unwrap();
    (s, rejected)
}

#[tokio::test]
async fn csv_with_bom_gbk_bad_lines_and_duplicates() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let mut utf8 = b"\xef\xbb\xbf".to_vec();
    utf8.extend_from_slice(
        "company_name,credit_code,org_number,report_type,priority,dedupe_key,run_after,metadata\n\
         小米科技有限责任公司,,,pdf,1,k1,,\n\
         ,91110108551385082Q,,word,,k2,2026-01-31T09:00:00+08:00,\"{\"\"customer\"\": 42}\"\n\
         ,,,pdf,,,,\n\
         \"bad\tname\",,,pdf,,,,\n\
         x,,,xls,,,,\n\
         x,,,pdf,high,,,\n\
         x,12345,,pdf,,,,\n\
         x,,,pdf,,,soon,\n\
         x,,,pdf,,,,[1]\n\
         小米科技有限责任公司,,,pdf,1,k1,,\n\
         \u{3000}华为技术有限公司 ,,,word,,,,\n\
         too,few\n"
            .as_bytes(),
    );
    let path = write(dir.path(), "requests.csv", &utf8);
    let (s, rejected) = run_import(&db, &path, &CsvOptions::default()).await;
    assert_eq!(
        (s.inserted, s.duplicates, s.rejected),
        (3, 1, 8),
        "{rejected:?}"
    );
    let lines: Vec<u64> = rejected.iter().map(|r| r.0).collect();
    assert_eq!(lines, vec![4, 5, 6, 7, 8, 9, 10, 13]);
    assert!(rejected[0].1.contains("at least one"));
    assert!(rejected[1].1.contains("control character"));
    assert!(rejected[2].1.contains("word or pdf"));
    assert!(rejected[3].1.contains("priority"));
    assert!(rejected[4].1.contains("credit_code"));
    assert!(rejected[5].1.contains("run_after"));
    assert!(rejected[6].1.contains("metadata"));
    assert!(rejected[7].1.contains("fields"));
    let trimmed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM report_requests WHERE company_name = '华为技术有限公司'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        trimmed, 1,
        "identifiers are trimmed, full-width spaces included"
    );
    let meta: serde_json::Value =
        sqlx::query_scalar("SELECT metadata FROM report_requests WHERE dedupe_key = 'k2'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(meta["customer"], 42);

    // GBK, as Excel on a Chinese Windows writes it; --type as the default report type.
    let (gbk, _, _) = encoding_rs::GBK
        .encode("company_name\n比亚迪股份有限公司\n宁德时代新能源科技股份有限公司\n");
    let path = write(dir.path(), "gbk.csv", &gbk);
    let options = CsvOptions {
        encoding: parse_encoding("gbk").unwrap(),
        default_type: Some(ReportType::Word),
        ..Default::default()
    };
    let (s, _) = run_import(&db, &path, &options).await;
    assert_eq!((s.inserted, s.rejected), (2, 0));
    let names: i64 = sqlx::query_scalar("SELECT count(*) FROM report_requests WHERE company_name IN ('比亚迪股份有限公司', '宁德时代新能源科技股份有限公司') AND report_type = 'word'")
        .fetch_one(&db.pool).await.unwrap();
    assert_eq!(names, 2);
    // The same GBK bytes read as UTF-8: the whole file refused in one line that says
    // what to pass, never stored garbled.
    let e = import(&db.pool, &path, &CsvOptions::default(), |_, _| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("reads as GBK") && e.contains("--encoding gbk"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
    db.close().await;
}

/// Line numbers for every line ending, report type defaulting to pdf, quoting mistakes
/// named with their line (never swallowing the lines after them), and files that are
/// not CSV refused whole in one line.
#[tokio::test]
async fn csv_lines_quotes_and_files_that_are_not_csv() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let names = |db: &TestDb| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT company_name FROM report_requests ORDER BY id")
                .fetch_all(&pool)
                .await
                .unwrap()
        }
    };
    // CRLF (Excel, Python's csv), CR (old Mac Excel) and LF: the same line numbers,
    // the header being line 1.
    for (ending, file) in [("\r\n", "crlf.csv"), ("\r", "cr.csv"), ("\n", "lf.csv")] {
        let text = [
            "company_name,report_type",
            "a,pdf",
            "b,xls",
            "",
            "c,word",
            "",
        ]
        .join(ending);
        let path = write(dir.path(), file, text.as_bytes());
        let (s, rejected) = run_import(&db, &path, &CsvOptions::default()).await;
        assert_eq!((s.inserted, s.rejected), (2, 1), "{file}: {rejected:?}");
        assert_eq!(rejected[0].0, 3, "{file}: {rejected:?}");
    }
    clear_requests(&db).await;

    // No report_type column and no --type: pdf, as --help says.
    let path = write(
        dir.path(),
        "names.csv",
        "company_name\r\n小米科技有限责任公司\r\n华为技术有限公司\r\n".as_bytes(),
    );
    let (s, rejected) = run_import(&db, &path, &CsvOptions::default()).await;
    assert_eq!((s.inserted, s.rejected), (2, 0), "{rejected:?}");
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM report_requests WHERE report_type = 'pdf'"
        )
        .await,
        2
    );
    clear_requests(&db).await;

    // Quoting: an unclosed quote costs its line only; a lone quote inside a quoted
    // value is refused (read leniently it would buy a report for 华为技术"); doubled
    // quotes are a quote.
    let path = write(
        dir.path(),
        "quotes.csv",
        "company_name,report_type\n\
         \"小米科技有限责任公司,pdf\n\
         华为技术有限公司,pdf\n\
         比亚迪股份有限公司,pdf\n\
         \"华为\"技术\",pdf\n\
         华为\"技术,pdf\n\
         \"深圳, 大疆\" , word\n\
         宁德时代新能源科技股份有限公司,pdf\n"
            .as_bytes(),
    );
    let (s, rejected) = run_import(&db, &path, &CsvOptions::default()).await;
    assert_eq!((s.inserted, s.rejected), (4, 3), "{rejected:?}");
    let lines: Vec<u64> = rejected.iter().map(|r| r.0).collect();
    assert_eq!(lines, vec![2, 5, 6], "{rejected:?}");
    assert!(
        rejected[0]
            .1
            .contains("company_name: a quote opens a value and is not closed"),
        "{rejected:?}"
    );
    assert!(rejected[1].1.contains("must be doubled"), "{rejected:?}");
    assert!(rejected[2].1.contains("not quoted"), "{rejected:?}");
    assert_eq!(
        names(&db).await,
        [
            "华为技术有限公司",
            "比亚迪股份有限公司",
            "深圳, 大疆",
            "宁德时代新能源科技股份有限公司"
        ]
    );
    clear_requests(&db).await;

    // Files that are not CSV text: one line each, nothing inserted.
    let mut binary = b"company_name\n".to_vec();
    binary.extend((0..4096u32).map(|i| (i * 7919 % 251) as u8));
    let not_csv = [
        (write(dir.path(), "bin.csv", &binary), "not a text file"),
        (
            write(dir.path(), "book.xlsx", b"PK\x03\x04\x14\x00\x06\x00rest"),
            "zip file",
        ),
        (dir.path().to_path_buf(), "is a directory"),
    ];
    for (path, needle) in &not_csv {
        let e = import(&db.pool, path, &CsvOptions::default(), |_, _| {})
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.len() < 200, "{e}");
        let out = bin(
            &["enqueue", "--csv", path.to_str().unwrap()],
            Some(&db.url),
            dir.path(),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err}");
    }
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM report_requests").await,
        0
    );

    // A pipe (it cannot seek back), and UTF-16 with its byte-order mark whatever
    // --encoding says.
    let piped = write(
        dir.path(),
        "piped.csv",
        "company_name\n小米科技有限责任公司\n".as_bytes(),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_report-worker"))
        .args(["enqueue", "--csv", "/dev/stdin"])
        .env("DATABASE_URL", &db.url)
        .stdin(std::process::Stdio::from(
            std::fs::File::open(&piped).unwrap(),
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut utf16 = vec![0xFF, 0xFE];
    for unit in "company_name\r\n华为技术有限公司\r\n".encode_utf16() {
        utf16.extend_from_slice(&unit.to_le_bytes());
    }
    let path = write(dir.path(), "utf16.csv", &utf16);
    let (s, rejected) = run_import(&db, &path, &CsvOptions::default()).await;
    assert_eq!((s.inserted, s.rejected), (1, 0), "{rejected:?}");
    assert_eq!(
        names(&db).await,
        ["小米科技有限责任公司", "华为技术有限公司"]
    );
    clear_requests(&db).await;

    // Bad bytes past the part looked at first: each such line refused, the hint once.
    let mut late = b"company_name\n".to_vec();
    for i in 0..8000 {
        late.extend_from_slice(format!("公司{i}\n").as_bytes());
    }
    for _ in 0..5 {
        late.extend_from_slice(&encoding_rs::GBK.encode("比亚迪股份有限公司\n").0);
    }
    let path = write(dir.path(), "late.csv", &late);
    let (s, rejected) = run_import(&db, &path, &CsvOptions::default()).await;
    assert_eq!((s.inserted, s.rejected), (8000, 5));
    assert_eq!(rejected[0].0, 8002);
    let hints = rejected
        .iter()
        .filter(|r| r.1.contains("--encoding gbk"))
        .count();
    assert_eq!(hints, 1, "{rejected:?}");
    db.close().await;
}

#[tokio::test]
async fn csv_all_or_nothing_and_the_cli() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "r.csv",
        "company_name,report_type\na,pdf\nb,xls\nc,word\n".as_bytes(),
    );
    let options = CsvOptions {
        all_or_nothing: true,
        ..Default::default()
    };
    let (s, rejected) = run_import(&db, &path, &options).await;
    assert!(s.rolled_back);
    assert_eq!(rejected.len(), 1);
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM report_requests").await,
        0
    );
    // The binary: summary on stdout, bad lines on stderr by number, exit 3.
    let out = bin(
        &["enqueue", "--csv", path.to_str().unwrap()],
        Some(&db.url),
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "inserted 2, duplicates 0, rejected 1"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 3: report type must be word or pdf")
    );
    let out = bin(
        &[
            "enqueue",
            "--csv",
            path.to_str().unwrap(),
            "--all-or-nothing",
        ],
        Some(&db.url),
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let out = bin(
        &["enqueue", "--csv", "/nonexistent.csv"],
        Some(&db.url),
        dir.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.trim().lines().count() == 1
            && err.contains("/nonexistent.csv"),
        "{err}"
    );
    let header = write(dir.path(), "h.csv", b"name,type\nx,pdf\n");
    let out = bin(
        &["enqueue", "--csv", header.to_str().unwrap()],
        Some(&db.url),
        dir.path(),
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown column"));
    db.close().await;
}

#[tokio::test]
async fn csv_of_100k_rows() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.csv");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    writeln!(f, "company_name,report_type,dedupe_key").unwrap();
    for i in 0..100_000 {
        writeln!(
            f,
            "公司{i},{},key-{}",
            if i % 2 == 0 { "pdf" } else { "word" },
            i % 99_000
        )
        .unwrap();
    }
    drop(f);
    let start = Instant::now();
    let (s, rejected) = run_import(&db, &path, &CsvOptions::default()).await;
    let took = start.elapsed();
    eprintln!(
        "100k rows in {took:?} ({:.0} rows/s)",
        100_000.0 / took.as_secs_f64()
    );
    assert!(rejected.is_empty());
    assert_eq!((s.inserted, s.duplicates), (99_000, 1_000));
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM report_requests").await,
        99_000
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM report_events").await,
        99_000
    );
    db.close().await;
}

#[tokio::test]
async fn export_keeps_hostile_names_inside_and_skips_what_is_there() {
    let db = TestDb::new().await;
    // Names a hand-edited database could hold (the table's own check is dropped here).
    for constraint in [
        "report_documents_file_name_invalid",
        "report_documents_file_name_unsafe",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE report_documents DROP CONSTRAINT {constraint}"
        )))
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let hostile = [
        "../../escape.pdf",
        "/etc/passwd",
        "CON.pdf",
        "..",
        "a\u{1}b.pdf",
        "same.pdf",
        "same.pdf",
        ".hidden.pdf",
        &"长".repeat(300),
    ];
    let mut ids = Vec::new();
    for (i, name) in hostile.iter().enumerate() {
        let id = enqueue(&db.pool, Some(&format!("公司{i}")), None, None, "pdf").await;
        let content = format!("%PDF-1.4 document {i}\n%%EOF\n").into_bytes();
        sqlx::query(
            "UPDATE report_requests SET state = 'succeeded', finished_at = now() WHERE id = $1",
        )
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
        sqlx::query("INSERT INTO report_documents (request_id, content, content_type, file_name, byte_size, sha256) VALUES ($1, $2, 'application/pdf', $3, $4, $5)")
            .bind(id)
            .bind(&content)
            .bind(name)
            .bind(content.len() as i64)
            .bind(report_worker::upstream::document::sha256_hex(&content))
            .execute(&db.pool)
            .await
            .unwrap();
        ids.push(id);
    }
    let parent = tempfile::tempdir().unwrap();
    let out = parent.path().join("out");
    let s = export(
        &db.pool,
        &DocumentStore::Postgres,
        &out,
        &ExportFilter::default(),
        false,
    )
    .await
    .unwrap();
    assert_eq!((s.written, s.skipped), (hostile.len() as u64, 0));
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), hostile.len(), "{names:?}");
    assert_eq!(
        std::fs::read_dir(parent.path()).unwrap().count(),
        1,
        "nothing written outside DIR"
    );
    for n in &names {
        assert!(
            !n.starts_with('.')
                && !n.contains('/')
                && !n.chars().any(char::is_control)
                && n.len() <= 190,
            "{n:?}"
        );
    }
    assert!(names.contains(&"_CON.pdf".to_string()));
    assert!(
        names.contains(&"same.pdf".to_string()) && names.iter().any(|n| n.starts_with("same (")),
        "{names:?}"
    );
    // Something planted in DIR under a document's name (a symlink to a file outside)
    // is neither followed nor written through: the document goes beside it.
    let victim = parent.path().join("victim.txt");
    std::fs::write(&victim, "do not touch").unwrap();
    std::fs::remove_file(out.join("same.pdf")).unwrap();
    std::os::unix::fs::symlink(&victim, out.join("same.pdf")).unwrap();
    let planted = export(
        &db.pool,
        &DocumentStore::Postgres,
        &out,
        &ExportFilter::default(),
        false,
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "do not touch");
    assert!(
        std::fs::symlink_metadata(out.join("same.pdf"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        planted.written, 1,
        "the displaced document went beside the link"
    );
    // Again: everything is already there with the same sha256.
    let again = export(
        &db.pool,
        &DocumentStore::Postgres,
        &out,
        &ExportFilter::default(),
        false,
    )
    .await
    .unwrap();
    assert_eq!((again.written, again.skipped), (0, hostile.len() as u64));
    // Filters.
    let some = export(
        &db.pool,
        &DocumentStore::Postgres,
        &parent.path().join("some"),
        &ExportFilter {
            ids: Some(vec![ids[0], ids[2]]),
            ..Default::default()
        },
        false,
    )
    .await
    .unwrap();
    assert_eq!(some.written, 2);
    let future = export(
        &db.pool,
        &DocumentStore::Postgres,
        &parent.path().join("none"),
        &ExportFilter {
            since: Some(chrono::Utc::now() + chrono::Duration::hours(1)),
            ..Default::default()
        },
        false,
    )
    .await
    .unwrap();
    assert_eq!(future.written, 0);
    db.close().await;
}

#[test]
fn compose_file_is_complete_and_consistent() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
        .unwrap();
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("valid YAML");
    let services = doc["services"].as_mapping().expect("services");
    let names: Vec<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    for s in [
        "postgres",
        "migrate",
        "simulator",
        "minio",
        "minio-bucket",
        "worker",
        "dashboard",
    ] {
        assert!(names.contains(&s), "service {s} missing");
    }
    // The dashboard reads the same database and bucket, once migrated, granted and its
    // login created.
    let dashboard = &doc["services"]["dashboard"];
    assert_eq!(dashboard["command"][0].as_str(), Some("dashboard"));
    assert_eq!(
        dashboard["depends_on"]["logins"]["condition"].as_str(),
        Some("service_completed_successfully")
    );
    // It starts without a token: listening on 0.0.0.0 inside the container needs
    // --public-read then (else it refuses to start and restarts forever), and that is
    // safe only while the port is published on the host's loopback alone.
    assert_eq!(dashboard["command"][2].as_str(), Some("0.0.0.0:8080"));
    assert_eq!(
        dashboard["environment"]["DASHBOARD_PUBLIC_READ"].as_str(),
        Some("true")
    );
    assert_eq!(dashboard["ports"][0].as_str(), Some("127.0.0.1:8080:8080"));
    // The owner migrates and grants; the workers and the dashboard log in as a member
    // of report_worker, never as the owner.
    let owner = doc["x-database-url"].as_str().unwrap();
    let login = doc["x-worker-database-url"].as_str().unwrap();
    assert_ne!(owner, login);
    for s in ["migrate", "grant"] {
        assert_eq!(
            doc["services"][s]["environment"]["DATABASE_URL"].as_str(),
            Some(owner),
            "{s}"
        );
    }
    assert_eq!(
        doc["services"]["grant"]["command"][0].as_str(),
        Some("grant")
    );
    assert_eq!(
        doc["services"]["grant"]["depends_on"]["migrate"]["condition"].as_str(),
        Some("service_completed_successfully")
    );
    let logins = doc["services"]["logins"]["entrypoint"]
        .as_sequence()
        .unwrap();
    let create = logins.last().and_then(|c| c.as_str()).unwrap();
    assert!(
        create.contains("LOGIN") && create.contains("IN ROLE report_worker"),
        "{create}"
    );
    assert!(login.starts_with("postgres://worker:"), "{login}");
    for s in ["worker", "dashboard"] {
        assert_eq!(
            doc["services"][s]["environment"]["DATABASE_URL"].as_str(),
            Some(login),
            "{s}"
        );
    }
    assert_eq!(
        dashboard["environment"]["DOCUMENT_STORE"],
        doc["services"]["worker"]["environment"]["DOCUMENT_STORE"]
    );
    let svc = |n: &str| &doc["services"][n];
    // The documents go to MinIO's bucket, which exists before any worker starts.
    assert!(
        svc("worker")["environment"]["DOCUMENT_STORE"]
            .as_str()
            .is_some_and(|s| s.starts_with("s3://reports/")),
        "the worker stores documents in the bucket"
    );
    assert!(
        svc("minio-bucket")["entrypoint"][2]
            .as_str()
            .is_some_and(|c| c.contains("mc mb") && c.contains("local/reports"))
    );
    assert_eq!(
        svc("worker")["depends_on"]["minio-bucket"]["condition"].as_str(),
        Some("service_completed_successfully")
    );
    assert!(
        svc("postgres")["image"]
            .as_str()
            .unwrap()
            .starts_with("postgres:")
    );
    assert!(svc("postgres")["healthcheck"]["test"].is_sequence());
    for s in ["migrate", "simulator", "worker", "dashboard"] {
        assert_eq!(svc(s)["build"].as_str(), Some("."), "{s} builds the image");
        assert_eq!(
            svc(s)["image"].as_str(),
            Some("report-worker:latest"),
            "{s} names it"
        );
    }
    assert_eq!(svc("migrate")["command"][0].as_str(), Some("migrate"));
    assert_eq!(
        svc("migrate")["depends_on"]["postgres"]["condition"].as_str(),
        Some("service_healthy")
    );
    assert_eq!(svc("simulator")["command"][0].as_str(), Some("simulate"));
    assert!(svc("simulator")["healthcheck"]["test"].is_sequence());
    let worker = svc("worker");
    assert_eq!(worker["deploy"]["replicas"].as_u64(), Some(2));
    assert_eq!(
        worker["depends_on"]["logins"]["condition"].as_str(),
        Some("service_completed_successfully")
    );
    assert_eq!(
        worker["depends_on"]["simulator"]["condition"].as_str(),
        Some("service_healthy")
    );
    assert!(worker["healthcheck"]["test"].is_sequence());
    // Every image is built here or pulled by name; every dependency names a service.
    for (name, s) in services {
        let s = s.as_mapping().unwrap();
        assert!(
            s.contains_key("image") || s.contains_key("build"),
            "{name:?} has no image or build"
        );
        if let Some(deps) = s.get("depends_on").and_then(|d| d.as_mapping()) {
            for dep in deps.keys() {
                assert!(
                    names.contains(&dep.as_str().unwrap()),
                    "{name:?} depends on unknown {dep:?}"
                );
            }
        }
    }
    // The environment the worker needs, and values its own parser accepts.
    let env = worker["environment"].as_mapping().unwrap();
    for var in [
        "DATABASE_URL",
        "UPSTREAM_BASE_URL",
        "UPSTREAM_CLIENT_ID",
        "UPSTREAM_CLIENT_SECRET",
        "UPSTREAM_QPS",
        "METRICS_ADDR",
    ] {
        assert!(env.contains_key(var), "worker lacks {var}");
    }
    for var in [
        "UPSTREAM_TIMEOUT",
        "REPORT_WINDOW",
        "REPORT_POLL_MIN",
        "REPORT_POLL_MAX",
    ] {
        let v = env[var].as_str().unwrap();
        report_worker::config::parse_duration(v).unwrap_or_else(|e| panic!("{var}={v}: {e}"));
    }
    // The same database as migrate's, another login.
    let database = |u: &str| {
        let u = url::Url::parse(u).unwrap();
        (
            u.host_str().map(str::to_string),
            u.port(),
            u.path().to_string(),
        )
    };
    assert_eq!(
        database(env["DATABASE_URL"].as_str().unwrap()),
        database(
            svc("migrate")["environment"]["DATABASE_URL"]
                .as_str()
                .unwrap()
        )
    );
    assert!(
        env["UPSTREAM_BASE_URL"]
            .as_str()
            .unwrap()
            .contains("simulator:8080")
    );
    // The worker's metrics port is the one its healthcheck probes.
    assert!(
        worker["healthcheck"]["test"][1]
            .as_str()
            .unwrap()
            .contains("9187")
    );
    // The Dockerfile: multi-stage, copies what the build needs.
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    assert_eq!(
        dockerfile
            .lines()
            .filter(|l| l.starts_with("FROM "))
            .count(),
        2
    );
    for needed in [
        "COPY migrations",
        "COPY src",
        "Cargo.lock",
        "--from=build",
        "ENTRYPOINT [\"report-worker\"]",
    ] {
        assert!(dockerfile.contains(needed), "Dockerfile lacks {needed}");
    }
}

#[test]
fn ctrl_c_during_the_demo_leaves_nothing_running() {
    if report_worker::ops::embedded_pg::find_bindir().is_none() {
        eprintln!("skipping: no PostgreSQL server binaries on this machine");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_report-worker"))
        .arg("demo")
        .current_dir(dir.path())
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Wait until the throwaway server is up and work is under way.
    first_line(
        child.stdout.take().unwrap(),
        std::time::Duration::from_secs(60),
        |l| l.starts_with("Enqueued"),
    );
    assert!(
        Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "an interrupted demo does not claim success"
    );
    let folder = std::env::temp_dir().join(format!("report-worker-demo-pg-{pid}"));
    assert!(!folder.exists(), "the throwaway database folder is removed");
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    let running = String::from_utf8_lossy(&ps.stdout);
    assert!(
        !running.contains(&folder.to_string_lossy().to_string()),
        "a server is still running:\n{running}"
    );
}

#[tokio::test]
async fn manifests_are_safe_to_open_in_a_spreadsheet() {
    let db = TestDb::new().await;
    for name in [
        "=HYPERLINK(\"http://evil.example\",\"x\")",
        "@SUM(A1)",
        "小米科技有限责任公司",
    ] {
        sqlx::query(
            "INSERT INTO report_requests (company_name, report_type, batch, state, finished_at, last_error)
             VALUES ($1, 'pdf', 'sheet', 'failed', now(), '-1 is not a company')",
        )
        .bind(name)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let filter = report_worker::ops::export::ExportFilter {
        batch: Some("sheet".into()),
        state: report_worker::domain::RequestState::Failed,
        ..Default::default()
    };
    report_worker::ops::export::export(
        &db.pool,
        &report_worker::store::DocumentStore::Postgres,
        out.path(),
        &filter,
        false,
    )
    .await
    .unwrap();
    let bytes = std::fs::read(out.path().join("manifest.csv")).unwrap();
    assert!(
        bytes.starts_with(report_worker::domain::UTF8_BOM),
        "a UTF-8 byte-order mark"
    );
    let text = String::from_utf8(bytes[3..].to_vec()).unwrap();
    assert!(
        text.contains("\"'=HYPERLINK(\"\"http://evil.example\"\",\"\"x\"\")\""),
        "{text}"
    );
    assert!(text.contains("'@SUM(A1)"), "{text}");
    assert!(text.contains("'-1 is not a company"), "{text}");
    assert!(text.contains(",小米科技有限责任公司,"), "{text}");
    db.close().await;
}
