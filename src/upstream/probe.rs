//! `report-worker check-provider`: one token call against the configured provider (and,
//! only when asked, one paid create and a status call of the task it made), told in
//! plain words — is it reachable, are the credentials accepted, what does the token look
//! like, does the provider announce a rate limit. Nothing secret is ever shown: not the
//! token, not the secret, not the answer's values (only its field names).

use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde_json::Value;

use super::client::{CreateTask, RawAnswer, TaskStatus};
use super::envelope::{DEFAULT_TOKEN_TTL, parse_token};
use super::{Client, CreateError, UpstreamError};

/// One thing found: whether it is fine (`None`: just information) and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub topic: &'static str,
    pub ok: Option<bool>,
    pub text: String,
}

/// Everything `check` found, in the order it found it.
#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    fn say(&mut self, topic: &'static str, ok: Option<bool>, text: impl Into<String>) {
        self.findings.push(Finding {
            topic,
            ok,
            text: text.into(),
        });
    }

    /// True when nothing failed.
    pub fn passed(&self) -> bool {
        self.findings.iter().all(|f| f.ok != Some(false))
    }

    /// The findings, one line each: `topic  yes/no/·  text`.
    pub fn render(&self) -> String {
        let width = self
            .findings
            .iter()
            .map(|f| f.topic.len())
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        for f in &self.findings {
            let mark = match f.ok {
                Some(true) => "ok  ",
                Some(false) => "FAIL",
                None => "    ",
            };
            out.push_str(&format!("  {mark} {:width$}  {}\n", f.topic, f.text));
        }
        out
    }

    pub fn get(&self, topic: &str) -> Option<&Finding> {
        self.findings.iter().find(|f| f.topic == topic)
    }
}

/// Checks `client`'s provider: the token call, then (with `create`) one paid create and
/// one status call of its task. `qps` is the pacing configured for the account, to say
/// how it compares with what the provider announces.
pub async fn check(client: &Client, qps: f64, create: Option<&CreateTask>) -> Report {
    let mut report = Report::default();
    let config = client.config();
    let url = crate::config::redact_url(&client.url(&config.paths.token));
    let answer = match client.token_exchange().await {
        Ok(answer) => answer,
        Err(e) => {
            report.say(
                "reachable",
                Some(false),
                format!(
                    "no: POST {url} got no answer ({}); check UPSTREAM_BASE_URL and that this host may reach it",
                    e
                ),
            );
            return report;
        }
    };
    report.say(
        "reachable",
        Some(true),
        format!(
            "yes: POST {url} answered HTTP {} in {} ms",
            answer.status,
            answer.elapsed.as_millis()
        ),
    );
    clock(&mut report, &answer);
    if !token(&mut report, &answer, config.clock.now()) {
        rate_headers(&mut report, &answer, qps);
        return report;
    }
    rate_headers(&mut report, &answer, qps);
    match create {
        None => report.say(
            "create",
            None,
            "not tried (--create makes one paid create and one status call)",
        ),
        Some(task) => create_and_status(&mut report, client, task).await,
    }
    report
}

/// The token answer: credentials, shape, lifetime. False when no token came back.
fn token(report: &mut Report, answer: &RawAnswer, now: DateTime<Utc>) -> bool {
    let paths = "UPSTREAM_BASE_URL and UPSTREAM_TOKEN_PATH";
    if (300..400).contains(&answer.status) {
        let to = answer.header("location").unwrap_or("nowhere");
        report.say(
            "token",
            Some(false),
            format!(
                "the token path redirects (HTTP {}) to {to}: calls never follow redirects; point {paths} at where it leads",
                answer.status
            ),
        );
        return false;
    }
    let json: Option<serde_json::Map<String, Value>> = serde_json::from_slice(&answer.body).ok();
    if json.is_none() {
        let content_type = answer.header("content-type").unwrap_or("none");
        report.say(
            "token",
            Some(false),
            format!(
                "the answer is not JSON (HTTP {}, content type {content_type}, {} bytes): {}",
                answer.status,
                answer.body.len(),
                if matches!(answer.status, 404 | 405) {
                    format!("nothing answers the token call there; check {paths}")
                } else {
                    format!("is this the provider's API? check {paths}")
                }
            ),
        );
        return false;
    }
    let parsed = parse_token(answer.status, &answer.body, now);
    let token = match parsed {
        Ok(token) => token,
        Err(e) => {
            let code = match &e {
                UpstreamError::AccountStop { code, .. } => Some(*code),
                _ => None,
            };
            let (topic, text) = match code {
                // "The API requested does not exist": the path, not the credentials.
                Some(67200101) | Some(404) | Some(405) => (
                    "token",
                    format!("nothing answers the token call there ({e}); check {paths}"),
                ),
                Some(_) => (
                    "credentials",
                    format!(
                        "refused: {e}; check the client id and secret (UPSTREAM_CLIENT_ID/SECRET or UPSTREAM_ACCOUNTS)"
                    ),
                ),
                None => ("token", format!("no token: {e}")),
            };
            report.say(topic, Some(false), text);
            return false;
        }
    };
    report.say("credentials", Some(true), "accepted: a token came back");
    let obj = json.unwrap_or_default();
    let (shape, fields) = match obj.get("data").and_then(Value::as_object) {
        Some(data) if data.contains_key("token") || data.contains_key("access_token") => {
            ("in a `data` wrapper (accepted)", data)
        }
        _ if obj.contains_key("token") => ("top-level `token` (the documented shape)", &obj),
        _ => ("top-level `access_token` (accepted)", &obj),
    };
    let names: Vec<&str> = fields.keys().map(String::as_str).collect();
    report.say(
        "answer",
        None,
        format!("{shape}; fields: {}", names.join(", ")),
    );
    let secret = token.token.expose();
    let kind = match jwt_claims(secret) {
        Some((alg, exp)) => {
            let exp = exp
                .and_then(|e| DateTime::<Utc>::from_timestamp(e, 0))
                .map(|e| format!(", its own expiry {}", e.format("%Y-%m-%d %H:%M:%S UTC")))
                .unwrap_or_default();
            format!("a JWT signed with {alg}{exp}")
        }
        None => "opaque (not a JWT)".to_string(),
    };
    let token_type = fields
        .get("token_type")
        .and_then(Value::as_str)
        .map(|t| format!("; token_type {t} (sent as `Authorization: Bearer`)"))
        .unwrap_or_default();
    report.say(
        "token",
        Some(true),
        format!("{} characters, {kind}{token_type}", secret.chars().count()),
    );
    let stated = fields.get("expires_in").is_some_and(|v| !v.is_null());
    let lifetime = crate::config::format_duration(token.expires_in);
    let short = token.expires_in < Duration::from_secs(120);
    report.say(
        "expires in",
        if short { Some(false) } else { Some(true) },
        match (stated, short) {
            (true, false) => format!("{lifetime}, as the answer says (renewed 60 s early)"),
            (true, true) => format!(
                "{lifetime}, as the answer says: shorter than 2 minutes, so a token is fetched for almost every call"
            ),
            (false, _) => format!(
                "not in the answer: the documented {} is assumed",
                crate::config::format_duration(DEFAULT_TOKEN_TTL)
            ),
        },
    );
    true
}

/// Headers that announce a rate limit or a quota, against the configured pacing.
fn rate_headers(report: &mut Report, answer: &RawAnswer, qps: f64) {
    let announced: Vec<String> = answer
        .headers
        .iter()
        .filter(|(name, _)| {
            [
                "ratelimit",
                "rate-limit",
                "qps",
                "quota",
                "throttl",
                "retry-after",
            ]
            .iter()
            .any(|k| name.to_ascii_lowercase().contains(k))
        })
        .map(|(name, value)| format!("{name}: {value}"))
        .collect();
    let pacing = if qps > 0.0 {
        format!("pacing stays at the configured {qps} calls/s (UPSTREAM_QPS or the account's qps)")
    } else {
        "pacing is off (qps 0)".to_string()
    };
    report.say(
        "QPS headers",
        None,
        if announced.is_empty() {
            format!("none: the provider does not announce its limit; {pacing}")
        } else {
            format!("{}; {pacing}", announced.join(", "))
        },
    );
}

/// The provider's clock against this machine's, from the `Date` header: the daily
/// limit turns over at midnight in Asia/Shanghai, and 67200007 is read by the clock.
fn clock(report: &mut Report, answer: &RawAnswer) {
    let Some(date) = answer
        .header("date")
        .and_then(|d| DateTime::parse_from_rfc2822(d).ok())
    else {
        return;
    };
    let skew = (Utc::now() - date.with_timezone(&Utc)).num_seconds();
    let far = skew.abs() > 30;
    report.say(
        "clock",
        if far { Some(false) } else { None },
        match skew {
            0 => "the provider's Date agrees with this machine's clock".to_string(),
            s if far => format!(
                "this machine's clock is {} s {} the provider's: fix NTP (daily limits turn over by the clock)",
                s.abs(),
                if s > 0 { "ahead of" } else { "behind" }
            ),
            s => format!(
                "within {} s of the provider's Date (the header has 1 s resolution)",
                s.abs()
            ),
        },
    );
}

/// One paid create, then one status call of its task.
async fn create_and_status(report: &mut Report, client: &Client, task: &CreateTask) {
    let config = client.config();
    let url = crate::config::redact_url(&client.url(&config.paths.create));
    let token = match client.token_for_create().await {
        Ok(token) => token,
        Err(e) => {
            report.say("create", Some(false), format!("no token: {}", e));
            return;
        }
    };
    let job = match client.create_task(task, &token, config.timeout).await {
        Ok(job) => job,
        Err(e) => {
            let paid = match &e {
                CreateError::NotCreated(_) => "no task was made",
                CreateError::Unknown(_) => {
                    "a paid task may exist all the same (the answer does not prove otherwise)"
                }
            };
            report.say(
                "create",
                Some(false),
                format!("POST {url}: {}; {paid}", e.error()),
            );
            return;
        }
    };
    report.say(
        "create",
        Some(true),
        format!(
            "POST {url} made task {job}: one paid report, outside the queue (this command keeps nothing)"
        ),
    );
    let url = crate::config::redact_url(&client.url(&config.paths.status));
    match client.task_status(&job).await {
        Ok(status) => report.say(
            "status",
            Some(true),
            format!(
                "GET {url} says the task is {}",
                match status {
                    TaskStatus::Waiting { queue_num: Some(n) } =>
                        format!("waiting, {n} ahead in the provider's queue"),
                    TaskStatus::Waiting { queue_num: None } => "waiting".to_string(),
                    TaskStatus::Exporting => "exporting".to_string(),
                    TaskStatus::Ready { .. } => "ready, with a download link".to_string(),
                    TaskStatus::Failed { cause } => format!("failed: {cause}"),
                }
            ),
        ),
        Err(e) => report.say(
            "status",
            Some(false),
            format!("GET {url}: {}; check UPSTREAM_STATUS_PATH", e),
        ),
    }
}

/// The JWT header's `alg` and the payload's `exp`, when `token` is a JWT.
fn jwt_claims(token: &str) -> Option<(String, Option<i64>)> {
    let mut parts = token.split('.');
    let (header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let decode = |part: &str| -> Option<Value> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part.trim_end_matches('='))
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    };
    let alg = decode(header)?.get("alg")?.as_str()?.to_string();
    let exp = decode(payload).and_then(|p| p.get("exp").and_then(Value::as_i64));
    Some((alg, exp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jwt_is_told_from_an_opaque_token() {
        let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let jwt = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"RS256","typ":"JWT"}"#),
            b64(r#"{"exp":1700000000}"#)
        );
        assert_eq!(
            jwt_claims(&jwt),
            Some(("RS256".to_string(), Some(1_700_000_000)))
        );
        assert_eq!(jwt_claims("abc.def"), None);
        assert_eq!(jwt_claims("opaque-token-1234"), None);
        assert_eq!(jwt_claims("a.b.c.d"), None);
    }

    fn raw(status: u16, headers: &[(&str, &str)], body: &str) -> RawAnswer {
        RawAnswer {
            status,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: body.as_bytes().to_vec(),
            elapsed: Duration::from_millis(5),
        }
    }

    #[test]
    fn every_answer_gets_one_plain_finding() {
        let now = Utc::now();
        let mut r = Report::default();
        assert!(!token(
            &mut r,
            &raw(301, &[("location", "https://x/")], ""),
            now
        ));
        assert!(
            r.get("token")
                .unwrap()
                .text
                .contains("redirects (HTTP 301) to https://x/")
        );

        let mut r = Report::default();
        assert!(!token(
            &mut r,
            &raw(404, &[("content-type", "text/html")], "<html>"),
            now
        ));
        assert!(
            r.get("token")
                .unwrap()
                .text
                .contains("nothing answers the token call")
        );

        let mut r = Report::default();
        let missing = r#"{"status":false,"error_code":67200101,"error_msg":"The API requested currently does not exist"}"#;
        assert!(!token(&mut r, &raw(404, &[], missing), now));
        assert!(r.get("credentials").is_none());
        assert!(r.get("token").unwrap().text.contains("UPSTREAM_TOKEN_PATH"));

        let mut r = Report::default();
        let refused = r#"{"status":false,"error_code":67200003,"error_msg":"invalid client"}"#;
        assert!(!token(&mut r, &raw(200, &[], refused), now));
        let f = r.get("credentials").unwrap();
        assert_eq!(f.ok, Some(false));
        assert!(f.text.starts_with("refused"), "{}", f.text);

        let mut r = Report::default();
        let wrapped =
            r#"{"data":{"token":"t0k3n","expires_in":1799},"status":true,"error_code":0}"#;
        assert!(token(&mut r, &raw(200, &[], wrapped), now));
        assert!(r.passed());
        assert!(r.get("answer").unwrap().text.contains("data"));
        assert!(
            r.get("token")
                .unwrap()
                .text
                .contains("5 characters, opaque")
        );
        // The token itself never shows.
        assert!(!r.render().contains("t0k3n"));

        let mut r = Report::default();
        assert!(token(
            &mut r,
            &raw(200, &[], r#"{"access_token":"abc"}"#),
            now
        ));
        assert!(
            r.get("expires in")
                .unwrap()
                .text
                .contains("not in the answer")
        );

        let mut r = Report::default();
        rate_headers(
            &mut r,
            &raw(200, &[("x-ratelimit-limit", "10"), ("server", "nginx")], ""),
            5.0,
        );
        let text = &r.get("QPS headers").unwrap().text;
        assert!(
            text.contains("x-ratelimit-limit: 10") && !text.contains("nginx"),
            "{text}"
        );
    }
}
