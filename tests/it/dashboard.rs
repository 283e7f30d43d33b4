//! The dashboard over real PostgreSQL and real HTTP: every route's status, escaping,
//! keyset pagination at its boundaries, and who may act (no token, bad CSRF, cross-site
//! POSTs, signed in).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use report_worker::dashboard::{DashboardConfig, serve};
use report_worker::store::DocumentStore;
use report_worker::upstream::Secret;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use tokio_util::sync::CancellationToken;

use crate::common::*;

pub const TOKEN: &str = "correct horse battery staple";

pub struct Dashboard {
    pub base: String,
    cancel: CancellationToken,
}

impl Dashboard {
    pub async fn start(db: &TestDb, token: Option<&str>) -> Dashboard {
        let config = DashboardConfig::new(token.map(Secret::new), DocumentStore::Postgres);
        Dashboard::start_with(db, config).await
    }

    pub async fn start_with(db: &TestDb, config: DashboardConfig) -> Dashboard {
        let cancel = CancellationToken::new();
        let addr: SocketAddr = serve(
            "127.0.0.1:0".parse().unwrap(),
            db.pool.clone(),
            config,
            cancel.clone(),
        )
        .await
        .unwrap();
        Dashboard {
            base: format!("http://{addr}"),
            cancel,
        }
    }

    /// A dashboard someone else serves (the real binary) at `base`.
    pub fn at(base: String) -> Dashboard {
        Dashboard {
            base,
            cancel: CancellationToken::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn client() -> reqwest::Client {
    http_client();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn get(d: &Dashboard, path: &str) -> (StatusCode, String) {
    let r = client().get(d.url(path)).send().await.unwrap();
    let status = r.status();
    (status, r.text().await.unwrap())
}

/// A browser's cookies, kept by hand (name → value).
#[derive(Default)]
pub struct Browser {
    cookies: HashMap<String, String>,
}

impl Browser {
    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn keep(&mut self, r: &reqwest::Response) {
        for c in r.headers().get_all(SET_COOKIE) {
            let c = c.to_str().unwrap();
            assert!(c.contains("HttpOnly"), "{c}");
            assert!(c.contains("SameSite=Strict"), "{c}");
            let (pair, _) = c.split_once(';').unwrap();
            let (k, v) = pair.split_once('=').unwrap();
            if v.is_empty() {
                self.cookies.remove(k);
            } else {
                self.cookies.insert(k.into(), v.into());
            }
        }
    }

    pub async fn get(&mut self, d: &Dashboard, path: &str) -> (StatusCode, String) {
        let r = client()
            .get(d.url(path))
            .header(COOKIE, self.cookie_header())
            .send()
            .await
            .unwrap();
        self.keep(&r);
        let status = r.status();
        (status, r.text().await.unwrap())
    }

    pub async fn post(
        &mut self,
        d: &Dashboard,
        path: &str,
        form: &[(&str, &str)],
        origin: Option<&str>,
    ) -> reqwest::Response {
        let mut req = client()
            .post(d.url(path))
            .header(COOKIE, self.cookie_header())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(
                url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(form)
                    .finish(),
            );
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        let r = req.send().await.unwrap();
        self.keep(&r);
        r
    }

    /// The CSRF token on a page's forms.
    pub async fn csrf(&mut self, d: &Dashboard, path: &str) -> String {
        let (_, html) = self.get(d, path).await;
        let at = html
            .find("name=\"csrf\" value=\"")
            .unwrap_or_else(|| panic!("no CSRF field on {path}: {html}"));
        let rest = &html[at + 19..];
        rest[..rest.find('"').unwrap()].to_string()
    }

    pub async fn sign_in(&mut self, d: &Dashboard, name: &str) {
        let csrf = self.csrf(d, "/login").await;
        let r = self
            .post(
                d,
                "/login",
                &[
                    ("csrf", &csrf),
                    ("name", name),
                    ("token", TOKEN),
                    ("next", "/"),
                ],
                None,
            )
            .await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert!(self.cookies.contains_key("rw_session"));
    }
}

async fn failed_row(db: &TestDb, company: &str) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO report_requests (company_name, report_type, state, last_error, last_error_code, finished_at)
         VALUES ($1, 'pdf', 'failed', 'Invalid parameter!', 68300004, now()) RETURNING id",
    )
    .bind(company)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn every_page_answers_and_bad_input_gets_a_clear_error() {
    let db = TestDb::new().await;
    let d = Dashboard::start(&db, None).await;
    let done = failed_row(&db, "小米科技有限责任公司").await;
    sqlx::query("UPDATE report_requests SET batch = 'orders-1' WHERE id = $1")
        .bind(done)
        .execute(&db.pool)
        .await
        .unwrap();
    let content: Vec<u8> = (0..2_500_000u32).map(|i| (i % 251) as u8).collect();
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&content))
    };
    let stored: i64 = sqlx::query_scalar(
        "WITH r AS (INSERT INTO report_requests (company_name, report_type, state, finished_at)
                    VALUES ('华为技术有限公司', 'pdf', 'succeeded', now()) RETURNING id)
         INSERT INTO report_documents (request_id, content_type, file_name, sha256, byte_size, content)
         SELECT id, 'application/pdf', '华为技术有限公司_企业创新能力报告.pdf', $1, $2, $3 FROM r
         RETURNING request_id",
    )
    .bind(&sha)
    .bind(content.len() as i64)
    .bind(&content)
    .fetch_one(&db.pool)
    .await
    .unwrap();

    for (path, status, needle) in [
        ("/", 200, "Requests by state"),
        ("/requests", 200, "小米科技有限责任公司"),
        (&format!("/requests/{done}"), 200, "68300004"),
        (&format!("/requests/{stored}"), 200, &sha),
        ("/requests/999999", 404, "there is no request 999999"),
        ("/requests/abc", 404, "ids are numbers"),
        (
            &format!("/requests/{done}/document"),
            404,
            "has no stored document",
        ),
        ("/batches", 200, "orders-1"),
        ("/batches?batch=orders-1", 200, "Invalid parameter!"),
        ("/batches?batch=nope", 404, "there is no batch"),
        ("/batches?before=x", 400, "before must be a request id"),
        ("/batches/manifest.csv?batch=orders-1", 200, "68300004"),
        ("/batches/manifest.csv?batch=nope", 404, "there is no batch"),
        ("/spend", 200, "Paid tasks"),
        ("/login", 200, "read-only"),
        ("/requests?state=bogus", 400, "request state must be one of"),
        (
            "/requests?from=yesterday",
            400,
            "from must be a date and time",
        ),
        ("/requests?code=x1", 400, "code must be an error code"),
        ("/requests?before=x", 400, "before must be a request id"),
        ("/nowhere", 404, "no such page"),
    ] {
        let (got, body) = get(&d, path).await;
        assert_eq!(got.as_u16(), status, "{path}: {body}");
        assert!(
            body.contains(needle),
            "{path} should mention {needle:?}: {body}"
        );
    }

    // A batch named as `enqueue --csv` names it (file and time, with a space): the
    // export command the page prints works when pasted.
    sqlx::query("INSERT INTO report_requests (company_name, report_type, batch) VALUES ('x', 'pdf', 'companies.csv 2026-12-01T07:41:38Z')")
        .execute(&db.pool)
        .await
        .unwrap();
    let (_, body) = get(
        &d,
        "/batches?batch=companies.csv%202026-12-01T07%3A41%3A38Z",
    )
    .await;
    let body = body.replace("&#39;", "'").replace("&#x27;", "'");
    assert!(
        body.contains(
            "report-worker export --batch 'companies.csv 2026-12-01T07:41:38Z' --out DIR"
        ),
        "{body}"
    );

    // Assets are embedded and typed; pages carry a strict CSP and their server time.
    for (path, kind) in [
        ("/assets/app.css", "text/css"),
        ("/assets/app.js", "text/javascript"),
        ("/assets/icon.svg", "image/svg+xml"),
    ] {
        let r = client().get(d.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(
            r.headers()[CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with(kind)
        );
    }
    let r = client().get(d.url("/")).send().await.unwrap();
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(
        r.headers()["server-timing"]
            .to_str()
            .unwrap()
            .starts_with("app;dur=")
    );
    assert!(
        r.headers()[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .contains("utf-8")
    );

    // The document streams back byte for byte, named in UTF-8, with its digest.
    let r = client()
        .get(d.url(&format!("/requests/{stored}/document")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()[CONTENT_TYPE], "application/pdf");
    let disposition = r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(disposition.starts_with("attachment;"), "{disposition}");
    assert!(
        disposition.contains("filename*=UTF-8''%E5%8D%8E"),
        "{disposition}"
    );
    assert!(
        r.headers()["repr-digest"]
            .to_str()
            .unwrap()
            .starts_with("sha-256=:")
    );
    let body = r.bytes().await.unwrap();
    assert_eq!(body.len(), content.len());
    assert!(body.as_ref() == content.as_slice(), "served bytes differ");

    // Filters that narrow to nothing say so.
    let (_, body) = get(&d, "/requests?q=nobody-at-all").await;
    assert!(body.contains("No requests match."));
    let (_, body) = get(&d, "/requests?q=华为技术有限公司&state=succeeded").await;
    assert!(
        body.contains(&format!("/requests/{stored}"))
            && !body.contains(&format!("/requests/{done}\""))
    );
    let (_, body) = get(&d, &format!("/requests?q={done}")).await;
    assert!(
        body.contains(&format!("/requests/{done}\"")),
        "an id finds its row"
    );
    let (_, body) = get(&d, "/requests?code=68300004").await;
    assert!(
        body.contains(&format!("/requests/{done}\""))
            && !body.contains(&format!("/requests/{stored}\""))
    );
    let (_, body) = get(&d, "/requests?from=2000-01-01T00:00&to=2000-01-02").await;
    assert!(body.contains("No requests match."));
    db.close().await;
}

#[tokio::test]
async fn names_from_applications_are_shown_as_text() {
    let db = TestDb::new().await;
    let d = Dashboard::start(&db, Some(TOKEN)).await;
    let evil = "<script>alert(1)</script>";
    let id = failed_row(&db, evil).await;
    let batch = "\"><img src=x onerror=alert(2)>";
    sqlx::query(
        "UPDATE report_requests SET batch = $2, last_error = '<b>bold</b>', metadata = '{\"k\":\"</pre><script>x()</script>\"}' WHERE id = $1",
    )
    .bind(id)
    .bind(batch)
    .execute(&db.pool)
    .await
    .unwrap();
    for path in [
        "/requests".to_string(),
        format!("/requests/{id}"),
        "/batches".to_string(),
        "/batches?batch=%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert(2)%3E".to_string(),
    ] {
        let mut b = Browser::default();
        b.sign_in(&d, "Ann").await;
        let (status, body) = b.get(&d, &path).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert!(
            !body.contains("<script>alert"),
            "{path} let a script through"
        );
        assert!(!body.contains("<script>x()"), "{path} let a script through");
        assert!(
            !body.contains("<img src=x"),
            "{path} let an element through"
        );
        assert!(!body.contains("<b>bold"), "{path} let markup through");
        assert!(
            body.contains("&lt;script&gt;alert(1)&lt;/script&gt;")
                || body.contains("&lt;img src=x"),
            "{path} should show the name as text: {body}"
        );
    }
    // A notice comes from a fixed list: a link cannot put words on the page.
    let (_, body) = get(&d, &format!("/requests/{id}?done=%3Ch1%3Epwned&n=1")).await;
    assert!(!body.contains("pwned"));
    db.close().await;
}

#[tokio::test]
async fn the_request_list_pages_by_keyset_at_its_boundaries() {
    let db = TestDb::new().await;
    let d = Dashboard::start(&db, None).await;
    sqlx::query(
        "INSERT INTO report_requests (company_name, report_type, batch)
         SELECT 'co' || i, 'pdf', CASE WHEN i <= 50 THEN 'fifty' END FROM generate_series(1, 120) i",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let ids = |body: &str| -> Vec<i64> {
        body.split("<td class=\"num\"><a href=\"/requests/")
            .skip(1)
            .map(|s| s[..s.find('"').unwrap()].parse().unwrap())
            .collect()
    };
    let link = |body: &str, rel: &str| -> Option<String> {
        let at = body.find(&format!("rel=\"{rel}\" href=\""))?;
        let rest = &body[at + rel.len() + 13..];
        Some(rest[..rest.find('"').unwrap()].replace("&amp;", "&"))
    };
    let (_, p1) = get(&d, "/requests").await;
    let first = ids(&p1);
    assert_eq!(first.len(), 50);
    assert!(first.windows(2).all(|w| w[0] > w[1]), "newest first");
    assert_eq!(first[0], 120);
    assert!(link(&p1, "prev").is_none(), "nothing newer than the newest");
    let (_, p2) = get(&d, &link(&p1, "next").unwrap()).await;
    assert_eq!(ids(&p2), (21..=70).rev().collect::<Vec<i64>>());
    let (_, p3) = get(&d, &link(&p2, "next").unwrap()).await;
    assert_eq!(ids(&p3), (1..=20).rev().collect::<Vec<i64>>());
    assert!(link(&p3, "next").is_none(), "nothing older than the oldest");
    let (_, back) = get(&d, &link(&p3, "prev").unwrap()).await;
    assert_eq!(
        ids(&back),
        ids(&p2),
        "back from the last page is the middle page"
    );
    let (_, back) = get(&d, &link(&p2, "prev").unwrap()).await;
    assert_eq!(ids(&back), first);
    assert!(link(&back, "prev").is_none());

    // Exactly one page's worth: no link either way; the filter survives paging.
    let (_, b) = get(&d, "/requests?batch=fifty").await;
    assert_eq!(ids(&b).len(), 50);
    assert!(link(&b, "next").is_none() && link(&b, "prev").is_none());
    let (_, b) = get(&d, "/requests?batch=fifty&before=26").await;
    assert_eq!(ids(&b), (1..=25).rev().collect::<Vec<i64>>());
    assert!(link(&b, "prev").unwrap().contains("batch=fifty"));
    db.close().await;
}

async fn state_of(db: &TestDb, id: i64) -> String {
    sqlx::query_scalar("SELECT state FROM report_requests WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn without_a_token_the_dashboard_is_read_only() {
    let db = TestDb::new().await;
    let d = Dashboard::start(&db, None).await;
    let id = failed_row(&db, "某公司").await;
    let mut b = Browser::default();
    let (_, page) = b.get(&d, &format!("/requests/{id}")).await;
    assert!(!page.contains("name=\"csrf\""), "no forms without a token");
    for path in [
        format!("/requests/{id}/retry"),
        format!("/requests/{id}/cancel"),
    ] {
        let r = b.post(&d, &path, &[("csrf", "anything")], None).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
        assert!(r.text().await.unwrap().contains("read-only"));
    }
    let r = b.post(&d, "/batches/retry", &[("batch", "x")], None).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = b
        .post(&d, "/login", &[("name", "a"), ("token", "")], None)
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(state_of(&db, id).await, "failed");
    db.close().await;
}

#[tokio::test]
async fn actions_need_a_session_and_a_csrf_token_and_are_recorded() {
    let db = TestDb::new().await;
    let d = Dashboard::start(&db, Some(TOKEN)).await;
    let id = failed_row(&db, "某公司").await;
    let retry = format!("/requests/{id}/retry");
    let mut b = Browser::default();

    // Not signed in: refused even with a good CSRF token.
    let csrf = b.csrf(&d, "/login").await;
    let r = b.post(&d, &retry, &[("csrf", &csrf)], None).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.text().await.unwrap().contains("sign in first"));

    // A wrong token, a missing name: the sign-in form says which.
    let r = b
        .post(
            &d,
            "/login",
            &[("csrf", &csrf), ("name", "Ann"), ("token", "guess")],
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("not the dashboard&#39;s token")
            || !b.cookies.contains_key("rw_session")
    );
    assert!(!b.cookies.contains_key("rw_session"));
    let r = b
        .post(
            &d,
            "/login",
            &[("csrf", &csrf), ("name", " "), ("token", TOKEN)],
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.text().await.unwrap().contains("your name is required"));
    // A sign-in without the CSRF token is refused too.
    let r = b
        .post(&d, "/login", &[("name", "Ann"), ("token", TOKEN)], None)
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    b.sign_in(&d, "Ann 李").await;
    let page = format!("/requests/{id}");
    let csrf = b.csrf(&d, &page).await;
    // Signed in, but a bad or missing CSRF token, or another site's form: refused.
    for form in [vec![], vec![("csrf", "00ff")], vec![("csrf", "zz")]] {
        let r = b.post(&d, &retry, &form, None).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{form:?}");
    }
    let r = b
        .post(&d, &retry, &[("csrf", &csrf)], Some("http://evil.example"))
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // A CSRF token from another browser (another cookie) does not work here.
    let mut other = Browser::default();
    let stolen = other.csrf(&d, "/login").await;
    let r = b.post(&d, &retry, &[("csrf", &stolen)], None).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(state_of(&db, id).await, "failed", "nothing changed so far");

    // The real thing: the row is queued again, and the event log says who did it.
    let origin = d.base.clone();
    let r = b.post(&d, &retry, &[("csrf", &csrf)], Some(&origin)).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        r.headers()[LOCATION].to_str().unwrap(),
        format!("/requests/{id}?done=retry&n=1")
    );
    assert_eq!(state_of(&db, id).await, "queued");
    let (actor, action): (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT actor, action FROM report_events WHERE request_id = $1 AND state = 'queued' ORDER BY id DESC LIMIT 1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(actor.as_deref(), Some("dashboard:Ann 李 (127.0.0.1)"));
    assert_eq!(action.as_deref(), Some("retry"));
    let (_, after) = b.get(&d, &format!("/requests/{id}?done=retry&n=1")).await;
    assert!(after.contains("Queued again"));
    assert!(
        after.contains("dashboard:Ann 李 (127.0.0.1)"),
        "the timeline names who did it"
    );

    // Cancel it; cancelling again is a no-op that says so.
    let cancel = format!("/requests/{id}/cancel");
    let r = b.post(&d, &cancel, &[("csrf", &csrf)], None).await;
    assert_eq!(
        r.headers()[LOCATION].to_str().unwrap(),
        format!("/requests/{id}?done=cancel&n=1")
    );
    assert_eq!(state_of(&db, id).await, "cancelled");
    let r = b.post(&d, &cancel, &[("csrf", &csrf)], None).await;
    assert_eq!(
        r.headers()[LOCATION].to_str().unwrap(),
        format!("/requests/{id}?done=cancel&n=0")
    );

    // A batch's failures, all at once.
    sqlx::query("UPDATE report_requests SET batch = 'b1' WHERE id = $1")
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
    let second = failed_row(&db, "另一公司").await;
    sqlx::query("UPDATE report_requests SET batch = 'b1' WHERE id = $1")
        .bind(second)
        .execute(&db.pool)
        .await
        .unwrap();
    // Its failures only: the cancelled row stays cancelled.
    let r = b
        .post(
            &d,
            "/batches/retry",
            &[("csrf", &csrf), ("batch", "b1")],
            None,
        )
        .await;
    assert_eq!(
        r.headers()[LOCATION].to_str().unwrap(),
        "/batches?batch=b1&done=retry_batch&n=1"
    );
    assert_eq!(state_of(&db, second).await, "queued");
    assert_eq!(state_of(&db, id).await, "cancelled");

    // Probe a stopped account now: the probe time comes forward, the action is logged.
    sqlx::query(
        "INSERT INTO report_account_stops (account, scope, reason, error_code, probe_at)
         VALUES ('acct', 'create', 'balance exhausted', 67200005, now() + interval '1 hour')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let (_, home) = b.get(&d, "/").await;
    assert!(home.contains("balance exhausted") && home.contains("Probe now"));
    let r = b
        .post(
            &d,
            "/accounts/probe",
            &[("csrf", &csrf), ("account", "acct")],
            None,
        )
        .await;
    assert_eq!(
        r.headers()[LOCATION].to_str().unwrap(),
        "/?done=probe_now&n=1"
    );
    let due: bool = sqlx::query_scalar(
        "SELECT probe_at <= now() FROM report_account_stops WHERE account = 'acct'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(due);
    let (account, actor): (Option<String>, Option<String>) =
        sqlx::query_as("SELECT account, actor FROM report_events WHERE action = 'probe_now'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(account.as_deref(), Some("acct"));
    assert_eq!(actor.as_deref(), Some("dashboard:Ann 李 (127.0.0.1)"));

    // Signing out ends the session.
    let r = b.post(&d, "/logout", &[("csrf", &csrf)], None).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let r = b.post(&d, &retry, &[("csrf", &csrf)], None).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    db.close().await;
}

#[tokio::test]
async fn provider_calls_are_counted_in_the_database_for_every_process() {
    let db = TestDb::new().await;
    let sim = start_sim(report_worker::simulator::SimConfig::instant()).await;
    for i in 0..6 {
        enqueue(&db.pool, Some(&format!("公司{i}")), None, None, "pdf").await;
    }
    // A credit code whose check character is wrong: refused at create.
    enqueue(&db.pool, None, Some("91110108551385083Q"), None, "pdf").await;
    let w = spawn_fast_worker(&db.url, &sim).await;
    wait_all_finished(&db.pool, Duration::from_secs(60)).await;
    w.stop().await;
    let recorded: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT endpoint, outcome, sum(n)::bigint FROM report_provider_calls GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let n = |e: &str, o: &str| {
        recorded
            .iter()
            .find(|r| r.0 == e && r.1 == o)
            .map(|r| r.2)
            .unwrap_or(0)
    };
    let stats = sim.stats();
    assert_eq!(
        n("create", "ok") as u64,
        stats.tasks_created,
        "{recorded:?}"
    );
    assert_eq!(n("create", "rejected"), 1, "{recorded:?}");
    assert_eq!(n("download", "ok"), 6, "{recorded:?}");
    assert_eq!(
        recorded
            .iter()
            .filter(|r| r.0 == "status")
            .map(|r| r.2)
            .sum::<i64>() as u64,
        stats.calls_to("status"),
        "{recorded:?}"
    );
    // The overview and the spend page show them.
    let d = Dashboard::start(&db, None).await;
    let (_, home) = get(&d, "/").await;
    assert!(
        home.contains("Last hour, by endpoint and outcome"),
        "{home}"
    );
    let (_, spend) = get(&d, "/spend").await;
    let today = chrono::Utc::now()
        .with_timezone(&chrono::FixedOffset::east_opt(8 * 3600).unwrap())
        .format("%Y-%m-%d")
        .to_string();
    let line = spend
        .split("<tr>")
        .find(|l| l.contains(&today))
        .unwrap_or_else(|| panic!("no line for {today}: {spend}"));
    assert!(
        line.contains(&format!("<td class=\"num\">{}</td>", stats.tasks_created)),
        "{line}"
    );
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn a_time_range_deep_in_history_pages_like_any_other_filter() {
    let db = TestDb::new().await;
    let d = Dashboard::start(&db, None).await;
    // 30,000 rows a minute apart: a range among the oldest lies beyond the ids the list
    // looks at first, so it is read through the BRIN index.
    sqlx::query(
        "INSERT INTO report_requests (company_name, report_type, created_at)
         SELECT 'h' || i, 'pdf', timestamptz '2026-01-01 00:00:00+00' + i * interval '1 minute'
           FROM generate_series(1, 30000) i",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let ids = |body: &str| -> Vec<i64> {
        body.split("<td class=\"num\"><a href=\"/requests/")
            .skip(1)
            .map(|s| s[..s.find('"').unwrap()].parse().unwrap())
            .collect()
    };
    // Minutes 100 to 179 (to is exclusive): rows 100..=179, 80 of them.
    let range = "from=2026-01-01T01:40&to=2026-01-01T03:00";
    let (status, p1) = get(&d, &format!("/requests?{range}")).await;
    assert_eq!(status, 200, "{p1}");
    assert_eq!(ids(&p1), (130..=179).rev().collect::<Vec<i64>>());
    assert!(!p1.contains("rel=\"prev\""));
    let (_, p2) = get(&d, &format!("/requests?{range}&before=130")).await;
    assert_eq!(ids(&p2), (100..=129).rev().collect::<Vec<i64>>());
    assert!(p2.contains("rel=\"prev\"") && !p2.contains("rel=\"next\""));
    let (_, back) = get(&d, &format!("/requests?{range}&after=129")).await;
    assert_eq!(ids(&back), ids(&p1));
    assert!(!back.contains("rel=\"prev\"") && back.contains("rel=\"next\""));
    // The newest hour: found next to the newest ids.
    let (_, recent) = get(&d, "/requests?from=2026-0121T19:00").await;
    assert!(recent.contains("from must be a date"), "a typo is named");
    let (_, recent) = get(&d, "/requests?from=2026-01-21T20:00").await;
    assert_eq!(ids(&recent).first(), Some(&30000));
    db.close().await;
}

#[tokio::test]
async fn with_a_token_nothing_is_readable_before_signing_in() {
    let db = TestDb::new().await;
    let id = failed_row(&db, "保密公司").await;
    sqlx::query("UPDATE report_requests SET state = 'succeeded', batch = 'b' WHERE id = $1")
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO report_documents (request_id, content, content_type, file_name, byte_size, sha256) VALUES ($1, '%PDF-1 %%EOF', 'application/pdf', 'r.pdf', 12, repeat('a', 64))")
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
    let d = Dashboard::start(&db, Some(TOKEN)).await;
    let http = client();
    let paths = [
        "/".to_string(),
        "/requests".into(),
        format!("/requests/{id}"),
        format!("/requests/{id}/document"),
        "/batches".into(),
        "/batches/manifest.csv?batch=b".into(),
        "/spend".into(),
    ];
    for path in &paths {
        let r = http.get(d.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::SEE_OTHER, "{path}");
        let to = r.headers()[LOCATION].to_str().unwrap();
        assert!(to.starts_with("/login?next="), "{path} → {to}");
        let body = r.text().await.unwrap();
        assert!(
            !body.contains("保密公司") && !body.contains("%PDF"),
            "{path}: {body}"
        );
    }
    // The sign-in page and its assets are open; posting anything else is refused.
    assert_eq!(get(&d, "/login").await.0, StatusCode::OK);
    assert_eq!(get(&d, "/assets/app.css").await.0, StatusCode::OK);
    let mut b = Browser::default();
    let r = b
        .post(&d, &format!("/requests/{id}/cancel"), &[], None)
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Signed in, every one of them answers (and the sign-in returns to where it began).
    b.sign_in(&d, "Ann").await;
    for path in &paths {
        let (status, _) = b.get(&d, path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn sign_in_is_limited_per_client_and_cookies_are_secure_over_https() {
    let db = TestDb::new().await;
    let mut config = DashboardConfig::new(Some(Secret::new(TOKEN)), DocumentStore::Postgres);
    config.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    let d = Dashboard::start_with(&db, config).await;
    let mut b = Browser::default();
    let csrf = b.csrf(&d, "/login").await;
    let attempt = |token: &'static str, forwarded: &'static str| {
        let (d, csrf, cookie) = (&d, csrf.clone(), b.cookie_header());
        async move {
            client()
                .post(d.url("/login"))
                .header(COOKIE, cookie)
                .header("x-forwarded-for", forwarded)
                .header("x-forwarded-proto", "https")
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(
                    url::form_urlencoded::Serializer::new(String::new())
                        .extend_pairs([("csrf", csrf.as_str()), ("name", "Eve"), ("token", token)])
                        .finish(),
                )
                .send()
                .await
                .unwrap()
        }
    };
    for _ in 0..5 {
        assert_eq!(
            attempt("guess", "203.0.113.7").await.status(),
            StatusCode::FORBIDDEN
        );
    }
    // The sixth wrong token from that address waits; even the right one does, for now.
    let r = attempt("guess", "203.0.113.7").await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(
        attempt(TOKEN, "203.0.113.7").await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // A client cannot pick its own address: whatever it puts before the proxy's entry
    // (here written as address:port), the proxy's entry is who it is.
    let spoofed = [
        "10.9.8.1, 203.0.113.8:4000",
        "10.9.8.2, 203.0.113.8:4000",
        "x, 203.0.113.8:4001",
        "10.9.8.4,203.0.113.8",
        "[2001:db8::1]:80, 203.0.113.8:4002",
    ];
    for forwarded in spoofed {
        assert_eq!(
            attempt("guess", forwarded).await.status(),
            StatusCode::FORBIDDEN,
            "{forwarded}"
        );
    }
    assert_eq!(
        attempt("guess", "10.9.8.9, 203.0.113.8:4003")
            .await
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // One IPv6 host holds a whole /64: its addresses count together.
    for forwarded in [
        "2001:db8:1:2::1",
        "2001:db8:1:2::2",
        "2001:db8:1:2::3",
        "2001:db8:1:2:ffff::4",
        "2001:db8:1:2::5",
    ] {
        assert_eq!(
            attempt("guess", forwarded).await.status(),
            StatusCode::FORBIDDEN
        );
    }
    assert_eq!(
        attempt("guess", "2001:db8:1:2::6").await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // Another client is not held up; over HTTPS (said by the trusted proxy) its session
    // cookie is Secure.
    let r = attempt(TOKEN, "198.51.100.9").await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let session = r
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|c| c.to_str().unwrap().to_string())
        .find(|c| c.starts_with("rw_session="))
        .expect("a session cookie");
    assert!(session.contains("; Secure"), "{session}");
    // Straight from a client (no trusted proxy): no Secure flag, its own address.
    let plain = Dashboard::start(&db, Some(TOKEN)).await;
    let mut b = Browser::default();
    b.sign_in(&plain, "Ann").await;
}

#[tokio::test]
async fn a_batch_page_shows_its_forecast_while_it_runs() {
    let db = TestDb::from_template().await;
    let d = Dashboard::start(&db, None).await;
    sqlx::query(
        "INSERT INTO report_requests (company_name, report_type, batch)
         SELECT '企业' || i, 'pdf', 'big load' FROM generate_series(1, 30) i",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // No worker yet: the page says there is no forecast, and why.
    let (status, body) = get(&d, "/batches?batch=big%20load").await;
    assert_eq!(status.as_u16(), 200, "{body}");
    assert!(body.contains("no worker is running"), "{body}");
    // A worker at 1 call a second: 30 reports of 6 calls, 180 s, then 300 s.
    sqlx::query(
        "INSERT INTO report_workers (owner, accounts, account_limits) VALUES ('w', '{acct}', '{\"acct\": {\"qps\": 1}}')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let (_, body) = get(&d, "/batches?batch=big%20load").await;
    for needle in [
        "Forecast",
        "expected to finish",
        "30 paid tasks and 180 provider calls",
        "<code>qps</code>",
    ] {
        assert!(
            body.contains(needle),
            "the batch page should show {needle:?}: {body}"
        );
    }
    db.close().await;
}
