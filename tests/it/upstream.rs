//! The client against the simulator over real HTTP on port 0: every behaviour of
//! docs/provider-api.md, produced by the simulator on demand and classified by the client.

use std::time::{Duration, Instant};

use crate::common::{
    client_config, client_for, create, have_tool, http_client, start_sim, wait_for,
};
use report_worker::domain::{JobId, ReportType};
use report_worker::simulator::{Endpoint, Fault, Injection, SimConfig};
use report_worker::upstream::client::CreateTask;
use report_worker::upstream::{Client, CreateError, Secret, TaskStatus, UpstreamError};

/// A download kept the way the PostgreSQL store keeps it: whole, in memory.
async fn inline(d: report_worker::upstream::Downloaded) -> report_worker::domain::Document {
    report_worker::store::DocumentStore::Postgres
        .keep(
            0,
            d.spool,
            d.content_type,
            d.file_name,
            d.provider_company,
            d.report_type.extension(),
        )
        .await
        .unwrap()
}

fn task(name: Option<&str>, code: Option<&str>, org: Option<&str>, t: ReportType) -> CreateTask {
    CreateTask {
        company_name: name.map(Into::into),
        credit_code: code.map(Into::into),
        org_number: org.map(Into::into),
        report_type: Some(t),
    }
}

async fn wait_ready(client: &Client, job: &JobId) -> (String, Vec<TaskStatus>) {
    let seen = std::sync::Mutex::new(Vec::new());
    let url = wait_for(
        "the task to become ready",
        Duration::from_secs(20),
        || async {
            match client.task_status(job).await.unwrap() {
                TaskStatus::Ready { download_url } => Some(download_url),
                other => {
                    let mut seen = seen.lock().unwrap();
                    if !seen.contains(&other) {
                        seen.push(other);
                    }
                    None
                }
            }
        },
    )
    .await;
    (url, seen.into_inner().unwrap())
}

fn inject(sim: &report_worker::simulator::Simulator, endpoint: Endpoint, fault: Fault, count: u32) {
    sim.inject(Injection {
        endpoint,
        fault,
        count,
        client: None,
    });
}

#[tokio::test]
async fn round_trip_pdf_and_docx_with_exact_job_ids_and_real_documents() {
    let sim = start_sim(SimConfig {
        generation_time: (Duration::from_millis(400), Duration::from_millis(400)),
        doc_size: 200_000,
        ..SimConfig::instant()
    })
    .await;
    let client = client_for(&sim);
    let dir = tempfile::tempdir().unwrap();
    for (t, request) in [
        (
            ReportType::Pdf,
            task(Some("小米科技有限责任公司"), None, None, ReportType::Pdf),
        ),
        (
            ReportType::Word,
            task(None, Some("91110108551385082Q"), None, ReportType::Word),
        ),
        (
            ReportType::Pdf,
            task(None, None, Some("5513850T82"), ReportType::Pdf),
        ),
    ] {
        let job = create(&client, &request).await.unwrap();
        let id: u64 = job.as_str().parse().unwrap();
        assert!(id > 1 << 53, "job ids are above 2^53: {job}");
        let (url, seen) = wait_ready(&client, &job).await;
        assert!(
            seen.iter()
                .any(|s| matches!(s, TaskStatus::Waiting { .. } | TaskStatus::Exporting)),
            "{seen:?}"
        );
        let doc = inline(client.download(&url, t, Some(&job)).await.unwrap()).await;
        assert_eq!(doc.content_type, t.content_type());
        assert_eq!(
            doc.file_name,
            format!("小米科技有限责任公司_企业创新能力报告.{}", t.extension())
        );
        assert!(doc.byte_size > 100_000, "realistic size: {}", doc.byte_size);
        // Byte-exact: what the simulator served is what we hold.
        assert_eq!(sim.stats().documents.get(job.as_str()), Some(&doc.sha256));
        let path = dir.path().join(&doc.file_name);
        std::fs::write(&path, doc.content().unwrap()).unwrap();
        match t {
            ReportType::Pdf if have_tool("pdftotext", &["-v"]) => {
                let out = std::process::Command::new("pdftotext")
                    .arg(&path)
                    .arg("-")
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "pdftotext failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(
                    text.contains("小米科技有限责任公司"),
                    "pdftotext did not find the company"
                );
                assert!(
                    text.contains(job.as_str()),
                    "pdftotext did not find the job id"
                );
                let info = std::process::Command::new("pdfinfo")
                    .arg(&path)
                    .output()
                    .unwrap();
                assert!(info.status.success());
                assert!(String::from_utf8_lossy(&info.stdout).contains("Pages:"));
            }
            ReportType::Word if have_tool("python3", &["-c", "import docx"]) => {
                let out = std::process::Command::new("python3")
                    .args(["-c", "import docx,sys; print('\\n'.join(p.text for p in docx.Document(sys.argv[1]).paragraphs))"])
                    .arg(&path)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "python-docx failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                assert!(String::from_utf8_lossy(&out.stdout).contains("小米科技有限责任公司"));
            }
            _ => {}
        }
    }
    assert_eq!(
        client.token_fetches(),
        1,
        "one token for the whole round trip"
    );
    sim.stop().await;
}

#[tokio::test]
async fn one_token_for_many_concurrent_calls() {
    let sim = start_sim(SimConfig::instant()).await;
    let client = client_for(&sim);
    let job = create(&client, &task(Some("x"), None, None, ReportType::Pdf))
        .await
        .unwrap();
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let c = client.clone();
            let j = job.clone();
            tokio::spawn(async move { c.task_status(&j).await })
        })
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    assert_eq!(client.token_fetches(), 1);
    assert_eq!(sim.stats().token_fetches, 1);
    sim.stop().await;
}

#[tokio::test]
async fn short_lived_tokens_are_reused_not_fetched_per_call() {
    let sim = start_sim(SimConfig {
        token_ttl: Duration::from_secs(1),
        ..SimConfig::instant()
    })
    .await;
    let client = client_for(&sim);
    let job = create(&client, &task(Some("x"), None, None, ReportType::Pdf))
        .await
        .unwrap();
    let start = Instant::now();
    let mut calls = 0u64;
    while start.elapsed() < Duration::from_millis(2500) {
        client
            .task_status(&job)
            .await
            .expect("no call fails for an expired token");
        calls += 1;
    }
    let fetches = client.token_fetches();
    assert!(fetches >= 2, "the 1 s token was refreshed ({fetches})");
    assert!(fetches <= 6, "{fetches} token fetches for {calls} calls");
    assert!(calls > 10 * fetches, "{calls} calls, {fetches} fetches");
    assert_eq!(
        sim.stats().calls("status:401"),
        0,
        "refreshed ahead of expiry"
    );
    sim.stop().await;
}

#[tokio::test]
async fn refused_tokens_are_replaced_once() {
    let sim = start_sim(SimConfig::instant()).await;
    let client = client_for(&sim);
    let job = create(&client, &task(Some("x"), None, None, ReportType::Pdf))
        .await
        .unwrap();
    // Status calls: HTTP 401, 67200009 and 67200003 get a new token and one retry.
    for fault in [
        Fault::Http { status: 401 },
        Fault::Code { code: 67200009 },
        Fault::Code { code: 67200003 },
    ] {
        inject(&sim, Endpoint::Status, fault, 1);
        client.task_status(&job).await.unwrap();
    }
    assert_eq!(client.token_fetches(), 4);
    // 67200003 that persists: account-wide stop.
    inject(&sim, Endpoint::Status, Fault::Code { code: 67200003 }, 2);
    let e = client.task_status(&job).await.unwrap_err();
    assert!(
        matches!(e, UpstreamError::AccountStop { code: 67200003, .. }),
        "{e:?}"
    );
    // A 401 that persists: a transient token refusal, not a stop.
    inject(&sim, Endpoint::Status, Fault::Http { status: 401 }, 2);
    let e = client.task_status(&job).await.unwrap_err();
    assert!(matches!(e, UpstreamError::Unauthorized { .. }), "{e:?}");
    sim.stop().await;
}

#[tokio::test]
async fn a_refused_token_on_create_is_forgotten_not_resent() {
    // A create is never sent twice by the client: the engine decides (after giving the
    // attempt back). The refused token is dropped so the next call fetches a new one.
    let sim = start_sim(SimConfig::instant()).await;
    let client = client_for(&sim);
    let t = task(Some("x"), None, None, ReportType::Pdf);
    create(&client, &t).await.unwrap();
    for fault in [Fault::Http { status: 401 }, Fault::Code { code: 67200009 }] {
        inject(&sim, Endpoint::Create, fault, 1);
        let e = create(&client, &t).await.unwrap_err();
        assert!(
            matches!(
                e,
                CreateError::NotCreated(UpstreamError::Unauthorized { .. })
            ),
            "{e:?}"
        );
        create(&client, &t).await.unwrap();
    }
    assert_eq!(client.token_fetches(), 3);
    assert_eq!(sim.stats().tasks_per_company["x"], 3);
    sim.stop().await;
}

#[tokio::test]
async fn bad_credentials_stop_the_account_and_never_leak() {
    let sim = start_sim(SimConfig::instant()).await;
    let mut config = client_config(&sim);
    config.credentials.client_secret = Secret::new("s3cr3t-value-that-must-not-leak");
    let client = Client::new(config).unwrap();
    let e = create(&client, &task(Some("x"), None, None, ReportType::Pdf))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            CreateError::NotCreated(UpstreamError::AccountStop { code: 67200003, .. })
        ),
        "{e:?}"
    );
    for text in [format!("{e}"), format!("{e:?}"), format!("{client:?}")] {
        assert!(!text.contains("s3cr3t-value"), "secret leaked: {text}");
    }
    sim.stop().await;
}

#[tokio::test]
async fn every_error_code_is_produced_and_classified() {
    let sim = start_sim(SimConfig::instant()).await;
    let client = client_for(&sim);
    let t = task(Some("x"), None, None, ReportType::Pdf);
    create(&client, &t).await.unwrap();
    let rejected = [68300004, 68300007, 68300010, 67200012];
    let transient = [68300005, 68300006, 68300008, 67200100];
    let stops = [
        67200000, 67200001, 67200004, 67200005, 67200006, 67200007, 67200008, 67200101,
    ];
    for code in rejected
        .into_iter()
        .chain(transient)
        .chain(stops)
        .chain([67200002])
    {
        inject(&sim, Endpoint::Create, Fault::Code { code }, 1);
        // Only the codes the gateway answers before a task exists prove that none was
        // made; a transient code may come after the provider made it.
        let e = match create(&client, &t).await.unwrap_err() {
            CreateError::NotCreated(e) if !transient.contains(&code) => e,
            CreateError::Unknown(e) if transient.contains(&code) => e,
            other => panic!("{code}: {other:?}"),
        };
        assert_eq!(e.code(), Some(code), "{e:?}");
        let ok = match code {
            _ if rejected.contains(&code) => matches!(e, UpstreamError::Rejected { .. }),
            _ if transient.contains(&code) => matches!(e, UpstreamError::Transient { .. }),
            67200002 => matches!(e, UpstreamError::RateLimited { .. }),
            67200007 => matches!(e, UpstreamError::AccountStop { until: Some(_), .. }),
            _ => matches!(e, UpstreamError::AccountStop { until: None, .. }),
        };
        assert!(ok, "{code} classified as {e:?}");
        assert_eq!(sim.stats().calls(&format!("create:{code}")), 1);
    }
    for (fault, what) in [
        (Fault::Http { status: 500 }, "500"),
        (Fault::Http { status: 503 }, "503"),
        (Fault::Http { status: 429 }, "429"),
        (Fault::Reset, "reset"),
        (Fault::Malformed, "malformed"),
    ] {
        inject(&sim, Endpoint::Status, fault, 1);
        let e = client
            .task_status(&JobId::parse("1").unwrap())
            .await
            .unwrap_err();
        assert!(
            matches!(e, UpstreamError::Transient { .. }),
            "{what}: {e:?}"
        );
    }
    for status in [403u16, 404] {
        inject(&sim, Endpoint::Create, Fault::Http { status }, 1);
        let e = create(&client, &t).await.unwrap_err();
        assert!(
            matches!(
                e,
                CreateError::NotCreated(UpstreamError::AccountStop { .. })
            ),
            "{status}: {e:?}"
        );
    }
    sim.stop().await;
}

#[tokio::test]
async fn apikey_problems_come_from_the_simulator() {
    let sim = start_sim(SimConfig::instant()).await;
    let http = http_client();
    let token: serde_json::Value = http
        .post(format!("{}/oauth/token", sim.base_url()))
        .basic_auth("demo-client", Some("demo-secret"))
        .body("grant_type=client_credentials")
        .header("content-type", "application/x-www-form-urlencoded")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["token"].as_str().unwrap();
    let url = format!(
        "{}/innovation/company-report/job_id/status?job_id=1",
        sim.base_url()
    );
    let missing: serde_json::Value = http
        .get(&url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(missing["error_code"], 67200008);
    let other: serde_json::Value = http
        .get(format!("{url}&apikey=someone-else"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(other["error_code"], 67200009);
    let expired = http
        .get(format!("{url}&apikey=demo-client"))
        .bearer_auth("eyJnot-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(expired.status().as_u16(), 401);
    sim.stop().await;
}

#[tokio::test]
async fn a_create_timeout_is_an_unknown_outcome_and_the_task_exists() {
    let sim = start_sim(SimConfig::instant()).await;
    let mut config = client_config(&sim);
    config.timeout = Duration::from_millis(300);
    let client = Client::new(config).unwrap();
    let t = task(Some("x"), None, None, ReportType::Pdf);
    create(&client, &t).await.unwrap();
    inject(&sim, Endpoint::Create, Fault::Slow { millis: 1500 }, 1);
    let e = create(&client, &t).await.unwrap_err();
    assert!(
        matches!(&e, CreateError::Unknown(UpstreamError::Transient { message, .. }) if message.contains("timed out")),
        "{e:?}"
    );
    assert_eq!(
        sim.stats().tasks_per_company["x"],
        2,
        "the provider made the task although the answer never came"
    );
    // A status call that times out is plainly transient.
    inject(&sim, Endpoint::Status, Fault::Slow { millis: 1500 }, 1);
    let e = client
        .task_status(&JobId::parse("1").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(e, UpstreamError::Transient { .. }), "{e:?}");
    sim.stop().await;
}

#[tokio::test]
async fn create_answers_fall_into_three_classes() {
    let sim = start_sim(SimConfig::instant()).await;
    let client = client_for(&sim);
    let t = task(Some("x"), None, None, ReportType::Pdf);
    create(&client, &t).await.unwrap();
    // The task is made, then the answer is lost: unknown, and the provider counted it.
    for fault in [
        Fault::CreatedThenReset,
        Fault::CreatedThenHttp { status: 502 },
        Fault::CreatedThenUnreadable,
        Fault::CreatedThenStatusFalse,
    ] {
        let before = sim.stats().tasks_per_company["x"];
        inject(&sim, Endpoint::Create, fault.clone(), 1);
        let e = create(&client, &t).await.unwrap_err();
        assert!(matches!(e, CreateError::Unknown(_)), "{fault:?}: {e:?}");
        assert_eq!(sim.stats().tasks_per_company["x"], before + 1, "{fault:?}");
    }
    // Answers that say nothing about the task are unknown too, even when (as here) the
    // simulator made none: the worker cannot tell.
    for fault in [Fault::Http { status: 500 }, Fault::Reset, Fault::Malformed] {
        inject(&sim, Endpoint::Create, fault.clone(), 1);
        let e = create(&client, &t).await.unwrap_err();
        assert!(matches!(e, CreateError::Unknown(_)), "{fault:?}: {e:?}");
    }
    // A code or a gateway page that may come after the task was made: unknown, and
    // every one of them did make a task here.
    for fault in [
        Fault::CreatedThenHttp { status: 429 },
        Fault::CreatedThenHttp { status: 408 },
        Fault::CreatedThenHttp { status: 499 },
        Fault::CreatedThenHttp { status: 503 },
        Fault::CreatedThenCode { code: 67200100 },
        Fault::CreatedThenCode { code: 68300008 },
        Fault::CreatedThenCode { code: 12345678 },
    ] {
        let before = sim.stats().tasks_per_company["x"];
        inject(&sim, Endpoint::Create, fault.clone(), 1);
        let e = create(&client, &t).await.unwrap_err();
        assert!(matches!(e, CreateError::Unknown(_)), "{fault:?}: {e:?}");
        assert_eq!(sim.stats().tasks_per_company["x"], before + 1, "{fault:?}");
    }
    for fault in [
        Fault::Code { code: 68300008 },
        Fault::Code { code: 67200100 },
        Fault::Http { status: 429 },
        Fault::Http { status: 400 },
    ] {
        inject(&sim, Endpoint::Create, fault.clone(), 1);
        let e = create(&client, &t).await.unwrap_err();
        assert!(matches!(e, CreateError::Unknown(_)), "{fault:?}: {e:?}");
    }
    // Answers that only come before a task exists: certainly no task.
    for fault in [
        Fault::Code { code: 68300004 },
        Fault::Code { code: 67200002 },
        Fault::Code { code: 67200101 },
        Fault::Http { status: 401 },
        Fault::Http { status: 403 },
        Fault::Http { status: 404 },
    ] {
        inject(&sim, Endpoint::Create, fault.clone(), 1);
        let e = create(&client, &t).await.unwrap_err();
        assert!(matches!(e, CreateError::NotCreated(_)), "{fault:?}: {e:?}");
    }
    // Nothing listening: the request never left.
    let mut config = client_config(&sim);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    config.base_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let e = create(&Client::new(config).unwrap(), &t).await.unwrap_err();
    assert!(matches!(e, CreateError::NotCreated(_)), "{e:?}");
    sim.stop().await;
}

#[tokio::test]
async fn metering_qps_daily_limit_and_balance() {
    let sim = start_sim(SimConfig {
        qps: Some(5),
        ..SimConfig::instant()
    })
    .await;
    let client = client_for(&sim);
    let job = create(&client, &task(Some("x"), None, None, ReportType::Pdf))
        .await
        .unwrap();
    let burst: Vec<_> = (0..20)
        .map(|_| {
            let (c, j) = (client.clone(), job.clone());
            tokio::spawn(async move { c.task_status(&j).await })
        })
        .collect();
    let mut limited = 0;
    for b in burst {
        if matches!(b.await.unwrap(), Err(UpstreamError::RateLimited { .. })) {
            limited += 1;
        }
    }
    assert!(
        limited >= 14,
        "a burst of 20 at QPS 5 gets 67200002 ({limited})"
    );
    assert!(sim.stats().max_calls_in_one_second <= 5);
    sim.stop().await;

    let sim = start_sim(SimConfig {
        daily_limit: Some(2),
        balance: Some(1),
        ..SimConfig::instant()
    })
    .await;
    let client = client_for(&sim);
    let t = task(Some("x"), None, None, ReportType::Pdf);
    create(&client, &t).await.unwrap();
    let e = create(&client, &t).await.unwrap_err();
    assert!(
        matches!(
            e,
            CreateError::NotCreated(UpstreamError::AccountStop { code: 67200005, .. })
        ),
        "balance: {e:?}"
    );
    let e = client
        .task_status(&JobId::parse("1").unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            UpstreamError::Rejected {
                code: Some(68300004),
                ..
            }
        ),
        "unknown job id: {e:?}"
    );
    let e = client
        .task_status(&JobId::parse("1").unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            UpstreamError::AccountStop {
                code: 67200007,
                until: Some(_),
                ..
            }
        ),
        "daily limit: {e:?}"
    );
    sim.stop().await;
}

#[tokio::test]
async fn create_validation_and_job_failures() {
    let sim = start_sim(SimConfig {
        failure_rate: 1.0,
        ..SimConfig::instant()
    })
    .await;
    let client = client_for(&sim);
    for bad in [
        CreateTask {
            report_type: Some(ReportType::Pdf),
            ..Default::default()
        },
        CreateTask {
            company_name: Some("x".into()),
            report_type: None,
            ..Default::default()
        },
        task(None, Some("91110108551385083Q"), None, ReportType::Pdf),
    ] {
        let e = create(&client, &bad).await.unwrap_err();
        assert!(
            matches!(
                e,
                CreateError::NotCreated(UpstreamError::Rejected {
                    code: Some(68300004),
                    ..
                })
            ),
            "{bad:?}: {e:?}"
        );
    }
    let job = create(&client, &task(Some("x"), None, None, ReportType::Word))
        .await
        .unwrap();
    match client.task_status(&job).await.unwrap() {
        TaskStatus::Failed { cause } => assert!(cause.contains("服务器异常"), "{cause}"),
        other => panic!("expected job_status 3, got {other:?}"),
    }
    sim.stop().await;
}

#[tokio::test]
async fn downloads_are_verified_and_capped() {
    let sim = start_sim(SimConfig {
        doc_size: 50_000,
        ..SimConfig::instant()
    })
    .await;
    let client = client_for(&sim);
    let job = create(&client, &task(Some("x"), None, None, ReportType::Word))
        .await
        .unwrap();
    let (url, _) = wait_ready(&client, &job).await;
    inject(&sim, Endpoint::Download, Fault::Html, 1);
    let e = client
        .download(&url, ReportType::Word, Some(&job))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, UpstreamError::BadDownload { message } if message.contains("not a report")),
        "{e:?}"
    );
    let e = client
        .download(&url, ReportType::Pdf, Some(&job))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, UpstreamError::BadDownload { message } if message.contains("not a PDF")),
        "{e:?}"
    );
    inject(&sim, Endpoint::Download, Fault::Reset, 1);
    assert!(matches!(
        client.download(&url, ReportType::Word, Some(&job)).await,
        Err(UpstreamError::Transient { .. })
    ));
    let forged = url.replace("q-signature=", "q-signature=0");
    let e = client
        .download(&forged, ReportType::Word, Some(&job))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            UpstreamError::Transient {
                code: Some(403),
                ..
            }
        ),
        "{e:?}"
    );
    let mut small = client_config(&sim);
    small.max_download_bytes = 10_000;
    let e = Client::new(small)
        .unwrap()
        .download(&url, ReportType::Word, Some(&job))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, UpstreamError::Rejected { message, .. } if message.contains("larger than")),
        "{e:?}"
    );
    // And the good one, byte-exact.
    let doc = inline(
        client
            .download(&url, ReportType::Word, Some(&job))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(sim.stats().documents.get(job.as_str()), Some(&doc.sha256));
    sim.stop().await;
}

#[tokio::test]
async fn token_shapes_from_the_simulator() {
    for shape in ["documented", "data", "access_token"] {
        let sim = start_sim(SimConfig {
            token_shape: shape.into(),
            ..SimConfig::instant()
        })
        .await;
        let client = client_for(&sim);
        create(&client, &task(Some("x"), None, None, ReportType::Pdf))
            .await
            .unwrap_or_else(|e| panic!("{shape}: {e}"));
        sim.stop().await;
    }
}

#[tokio::test]
async fn fault_rate_mixes_every_transient_fault_deterministically() {
    let run = || async {
        let sim = start_sim(SimConfig {
            fault_rate: 0.6,
            seed: Some(42),
            ..SimConfig::instant()
        })
        .await;
        let client = client_for(&sim);
        let mut outcomes = Vec::new();
        for _ in 0..100 {
            match client.task_status(&JobId::parse("1").unwrap()).await {
                Err(UpstreamError::Rejected {
                    code: Some(68300004),
                    ..
                }) => outcomes.push("normal".to_string()),
                Err(UpstreamError::Transient { code, .. }) => {
                    outcomes.push(format!("transient:{code:?}"))
                }
                other => panic!("a fault must be transient, got {other:?}"),
            }
        }
        let stats = sim.stats();
        sim.stop().await;
        (outcomes, stats)
    };
    let (first, stats) = run().await;
    for kind in [
        "status:68300005",
        "status:68300008",
        "status:67200100",
        "status:500",
        "status:503",
        "status:reset",
        "status:malformed",
    ] {
        assert!(
            stats.calls(kind) > 0,
            "{kind} never produced: {:?}",
            stats.calls
        );
    }
    assert!(first.iter().any(|o| o == "normal"));
    let (second, _) = run().await;
    assert_eq!(first, second, "the same seed gives the same faults");
}

#[tokio::test]
async fn control_surface_over_http() {
    let sim = start_sim(SimConfig::instant()).await;
    let client = client_for(&sim);
    let http = http_client();
    let t = task(Some("小米科技有限责任公司"), None, None, ReportType::Pdf);
    create(&client, &t).await.unwrap();
    let r = http
        .post(format!("{}/_sim/outage", sim.base_url()))
        .json(&serde_json::json!({"code": 67200005}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert!(matches!(
        create(&client, &t).await,
        Err(CreateError::NotCreated(UpstreamError::AccountStop {
            code: 67200005,
            ..
        }))
    ));
    http.post(format!("{}/_sim/outage", sim.base_url()))
        .json(&serde_json::json!({"code": null}))
        .send()
        .await
        .unwrap();
    http.post(format!("{}/_sim/inject", sim.base_url()))
        .json(&serde_json::json!({"endpoint": "create", "kind": "code", "code": 68300008, "count": 1}))
        .send()
        .await
        .unwrap();
    assert!(matches!(
        create(&client, &t).await,
        Err(CreateError::Unknown(UpstreamError::Transient {
            code: Some(68300008),
            ..
        }))
    ));
    create(&client, &t).await.unwrap();
    let stats: serde_json::Value = http
        .get(format!("{}/_sim/stats", sim.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["calls"]["create:ok"], 2);
    assert_eq!(stats["calls"]["create:67200005"], 1);
    assert_eq!(stats["tasks_per_company"]["小米科技有限责任公司"], 2);
    sim.stop().await;
}

/// Counts the slots the client takes for its own calls.
struct CountingPacer(std::sync::atomic::AtomicU32);

impl report_worker::upstream::Pacer for CountingPacer {
    fn wait(&self) -> futures_util::future::BoxFuture<'_, ()> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async {})
    }
}

#[tokio::test]
async fn token_fetches_and_retries_after_a_refused_token_take_call_slots() {
    let sim = start_sim(SimConfig::instant()).await;
    let client = client_for(&sim);
    let pacer = std::sync::Arc::new(CountingPacer(Default::default()));
    client.set_pacer(pacer.clone());
    let slots = || pacer.0.load(std::sync::atomic::Ordering::SeqCst);
    client.token_for_create().await.unwrap();
    assert_eq!(slots(), 1, "the token fetch");
    let job = create(&client, &task(Some("x"), None, None, ReportType::Pdf))
        .await
        .unwrap();
    assert_eq!(
        slots(),
        1,
        "the create itself is paced by the engine, not here"
    );
    inject(&sim, Endpoint::Status, Fault::Http { status: 401 }, 1);
    client.task_status(&job).await.unwrap();
    assert_eq!(slots(), 3, "a new token and the retried call");
    sim.stop().await;
}
