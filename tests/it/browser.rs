//! The dashboard in a real browser: headless Chromium (Debian's package) driven over
//! WebDriver by chromedriver. Loads the overview with data the simulator produced,
//! is sent to sign in first, follows a failed row to its page, presses Retry and sees the state change,
//! checks that no console message is an error (a CSP violation would be), that names
//! render as text, in Chinese, and that the page fits a phone's width.
//!
//! `UPDATE_SCREENSHOTS=1` writes the overview and request screenshots under `docs/`.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::wd::{Capabilities, WebDriverCompatibleCommand};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::common::*;
use crate::dashboard::Dashboard;

const TOKEN: &str = "browser-test-token";

/// chromedriver on a free port, killed when dropped.
struct Driver {
    child: Child,
    url: String,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    /// Kills chromedriver and the Chromium it started (found by its own profile folder),
    /// also when the test failed before closing the session.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &self._profile.path().display().to_string()])
            .status();
    }
}

async fn start_driver() -> Driver {
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let url = format!("http://127.0.0.1:{port}");
    let status = format!("{url}/status");
    let http = http_client();
    wait_for("chromedriver to answer", Duration::from_secs(30), || {
        let http = http.clone();
        let status = status.clone();
        async move {
            let r = http.get(&status).send().await.ok()?;
            let v: Value = r.json().await.ok()?;
            (v["value"]["ready"] == json!(true)).then_some(())
        }
    })
    .await;
    Driver {
        child,
        url,
        _profile: tempfile::tempdir().unwrap(),
    }
}

async fn browser(driver: &Driver) -> Client {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("chromium");
    let mut caps = Capabilities::new();
    caps.insert("browserName".into(), json!("chrome"));
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                format!("--user-data-dir={}", driver._profile.path().display()),
            ],
        }),
    );
    caps.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a Chromium session")
}

/// chromedriver's console log (`goog:loggingPrefs`): what the page printed or failed at
/// since the last read.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (axum::http::Method, Option<String>) {
        (
            axum::http::Method::POST,
            Some(json!({"type": "browser"}).to_string()),
        )
    }
}

async fn console_errors(c: &Client) -> Vec<String> {
    let log = c.issue_cmd(BrowserLog).await.expect("the browser log");
    log.as_array()
        .unwrap_or_else(|| panic!("the browser log is a list: {log}"))
        .iter()
        .filter(|e| e["level"] == json!("SEVERE") || e["level"] == json!("WARNING"))
        .map(|e| e["message"].to_string())
        .collect()
}

async fn text_of(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .text()
        .await
        .unwrap()
}

fn save_screenshot(name: &str, png: &[u8]) {
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let _ = std::fs::create_dir_all(&target);
    std::fs::write(target.join(name), png).unwrap();
    if std::env::var("UPDATE_SCREENSHOTS").is_ok_and(|v| v == "1") {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
        std::fs::write(docs.join(name), png).unwrap();
    }
}

#[tokio::test]
async fn an_operator_finds_a_failed_row_and_retries_it_in_chromium() {
    if !have_tool("chromedriver", &["--version"])
        || !(have_tool("chromium", &["--version"]) || have_tool("chromium-browser", &["--version"]))
    {
        return;
    }
    let db = TestDb::new().await;
    let sim = start_sim(report_worker::simulator::SimConfig::instant()).await;
    let companies = [
        "小米科技有限责任公司",
        "华为技术有限公司",
        "比亚迪股份有限公司",
        "<img src=x onerror=\"window.__pwned=1\">",
    ];
    for (i, name) in companies.iter().enumerate() {
        let kind = if i % 2 == 0 { "pdf" } else { "word" };
        enqueue(&db.pool, Some(name), None, None, kind).await;
    }
    // Refused by the provider (wrong check character): the row the operator retries.
    let failed = enqueue(&db.pool, None, Some("91110108551385083Q"), None, "pdf").await;
    sqlx::query("UPDATE report_requests SET batch = 'orders-2026-11' WHERE true")
        .execute(&db.pool)
        .await
        .unwrap();
    let w = spawn_fast_worker(&db.url, &sim).await;
    wait_all_finished(&db.pool, Duration::from_secs(60)).await;
    // Stopped, so the retried row stays queued for the browser to see.
    w.stop().await;

    let dash = Dashboard::start(&db, Some(TOKEN)).await;
    let driver = start_driver().await;
    let c = browser(&driver).await;

    // With a token, nothing is shown before signing in: the overview sends the browser
    // to the sign-in page, which sends it back once signed in.
    c.goto(&dash.url("/")).await.unwrap();
    assert_eq!(c.title().await.unwrap(), "Sign in · report-worker");
    c.wait()
        .for_element(Locator::Css("input[name=name]"))
        .await
        .unwrap()
        .send_keys("Operator 王")
        .await
        .unwrap();
    c.find(Locator::Css("input[name=token]"))
        .await
        .unwrap()
        .send_keys(TOKEN)
        .await
        .unwrap();
    c.find(Locator::Css("form.login button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for("the overview", Duration::from_secs(10), || async {
        c.title()
            .await
            .ok()
            .filter(|t| t == "Overview · report-worker")
    })
    .await;

    // The overview, with the simulator's data.
    let cards = text_of(&c, "ul.cards").await;
    assert!(
        cards.contains("succeeded\n4") || cards.contains("succeeded 4"),
        "{cards}"
    );
    let charset: Value = c
        .execute("return document.characterSet", vec![])
        .await
        .unwrap();
    assert_eq!(charset, json!("UTF-8"));
    let svgs = c.find_all(Locator::Css("figure.chart svg")).await.unwrap();
    assert!(svgs.len() >= 3, "the overview draws its charts");
    save_screenshot("dashboard-overview.png", &c.screenshot().await.unwrap());

    // The failed row, from the list filtered by state.
    c.find(Locator::Css("a[href='/requests?state=failed']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let link = format!("a[href='/requests/{failed}']");
    c.wait()
        .for_element(Locator::Css(&link))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for("the request page", Duration::from_secs(10), || async {
        c.title()
            .await
            .ok()
            .filter(|t| t.starts_with(&format!("Request {failed}")))
    })
    .await;
    assert!(text_of(&c, ".error-box").await.contains("68300004"));
    let retry = c
        .wait()
        .for_element(Locator::Css("form[action$='/retry'] button"))
        .await
        .unwrap();
    assert!(text_of(&c, ".who").await.contains("Operator 王"));
    save_screenshot("dashboard-request.png", &c.screenshot().await.unwrap());

    // Retry: the page says so, the state changes, the timeline names who did it.
    retry.click().await.unwrap();
    wait_for(
        "the retried row's page",
        Duration::from_secs(10),
        || async {
            let notice = c
                .find(Locator::Css(".notice"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            notice.contains("Queued again").then_some(())
        },
    )
    .await;
    assert_eq!(row_state(&db.pool, failed).await.0, "queued");
    assert!(text_of(&c, "p.lead").await.contains("queued"));
    assert!(
        text_of(&c, ".timeline")
            .await
            .contains("retry by dashboard:Operator 王")
    );

    // A name with markup shows as text and runs nothing.
    c.goto(&dash.url("/requests")).await.unwrap();
    let list = text_of(&c, "table.list").await;
    assert!(
        list.contains("<img src=x onerror=\"window.__pwned=1\">"),
        "{list}"
    );
    assert!(list.contains("小米科技有限责任公司"));
    let pwned: Value = c
        .execute("return window.__pwned === undefined", vec![])
        .await
        .unwrap();
    assert_eq!(pwned, json!(true), "markup from a company name ran");

    // Live refresh swaps the page in place: a row inserted now appears without a reload.
    let marker: Value = c
        .execute("window.__same_page = 1; return 1", vec![])
        .await
        .unwrap();
    assert_eq!(marker, json!(1));
    enqueue(&db.pool, Some("刚刚插入的公司"), None, None, "pdf").await;
    wait_for(
        "the live refresh to show the new row",
        Duration::from_secs(20),
        || async {
            let text = c
                .find(Locator::Css("table.list"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            text.contains("刚刚插入的公司").then_some(())
        },
    )
    .await;
    let same: Value = c
        .execute("return window.__same_page === 1", vec![])
        .await
        .unwrap();
    assert_eq!(same, json!(true), "refreshed in place, not reloaded");

    // A laptop's width: every table fits, none needs scrolling sideways.
    c.set_window_size(1280, 1000).await.unwrap();
    for path in ["/", "/spend", "/requests", "/batches"] {
        c.goto(&dash.url(path)).await.unwrap();
        let cut: Value = c
            .execute(
                "return Array.from(document.querySelectorAll('.scroll, table'))
                   .filter(function (e) { return e.scrollWidth > e.clientWidth + 1; })
                   .map(function (e) { return e.tagName + '.' + e.className + ' ' + e.scrollWidth + '>' + e.clientWidth; });",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(cut, json!([]), "{path} cuts a table at 1280 px");
    }

    // Phone width: nothing wider than the screen.
    c.set_window_size(390, 844).await.unwrap();
    for path in ["/".to_string(), format!("/requests/{failed}")] {
        c.goto(&dash.url(&path)).await.unwrap();
        let overflow: Value = c
            .execute(
                "return document.documentElement.scrollWidth - document.documentElement.clientWidth",
                vec![],
            )
            .await
            .unwrap();
        if overflow.as_i64().unwrap_or(99) > 1 {
            let culprits: Value = c
                .execute(
                    "var w = document.documentElement.clientWidth; return Array.from(document.querySelectorAll('body *'))
                       .filter(function (e) { return e.getBoundingClientRect().right > w + 1; })
                       .slice(0, 8).map(function (e) { return e.tagName + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right); });",
                    vec![],
                )
                .await
                .unwrap();
            panic!("{path} is {overflow} px wider than a phone: {culprits}");
        }
    }

    let errors = console_errors(&c).await;
    assert!(errors.is_empty(), "the console has errors: {errors:#?}");
    c.close().await.unwrap();
    sim.stop().await;
    db.close().await;
}
