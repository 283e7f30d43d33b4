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
    assert!(
        stdout.contains("SELECT * FROM report_queue_stats"),
        "{stdout}"
    );
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
    assert!(String::from_utf8_lossy(&out.stdout).contains("throwaway PostgreSQL"));
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

#[tokio::test]
async fn demo_uses_database_url_when_set() {
    let db = TestDb::empty().await;
    let dir = tempfile::tempdir().unwrap();
    let out = bin(&["demo"], Some(&db.url), dir.path());
    check_demo_output(&out, dir.path());
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM report_documents").await,
        12,
        "nine bought, three served again from them"
    );
    db.close().await;
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
    // The same GBK bytes read as UTF-8: refused by line, never stored garbled.
    let (s, rejected) = run_import(
        &db,
        &path,
        &CsvOptions {
            default_type: Some(ReportType::Pdf),
            ..Default::default()
        },
    )
    .await;
    assert_eq!((s.inserted, s.rejected), (0, 2));
    assert!(rejected[0].1.contains("--encoding gbk"));
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
    use std::io::BufRead;
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
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the demo prints its progress");
        if line.starts_with("Enqueued") {
            break;
        }
        assert!(Instant::now() < deadline);
    }
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
