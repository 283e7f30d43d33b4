//! The provider's API: token, create (R001) and status, as documented in
//! `docs/provider-api.md`.

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use chrono::Utc;
use rand::RngExt;
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;

use crate::domain::{ReportType, is_credit_code};

use super::answers::*;
use super::config::*;
use super::cos::*;
use super::state::*;

/// Organisation directory for identifiers that are not names (so a report by credit
/// code still names its company).
pub(super) fn company_for(body: &CreateBody) -> String {
    let known = [("91110108551385082Q", "5513850T82", "小米科技有限责任公司")];
    if let Some(name) = body
        .company_name
        .as_deref()
        .filter(|s| !s.trim().is_empty())
    {
        return name.trim().to_string();
    }
    for (code, org, name) in known {
        if body.credit_code.as_deref() == Some(code) || body.org_number.as_deref() == Some(org) {
            return name.to_string();
        }
    }
    match (&body.credit_code, &body.org_number) {
        (Some(c), _) if !c.is_empty() => format!("企业 {c}"),
        (_, Some(o)) => format!("企业 {o}"),
        _ => "未知企业".into(),
    }
}

/// GB 32100-2015 check character of a unified social credit code.
pub fn credit_code_checksum_ok(code: &str) -> bool {
    const CHARS: &[u8] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";
    const WEIGHTS: [u32; 17] = [
        1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28,
    ];
    if !is_credit_code(code) {
        return false;
    }
    let bytes = code.as_bytes();
    let mut sum = 0;
    for (i, w) in WEIGHTS.iter().enumerate() {
        match CHARS.iter().position(|&c| c == bytes[i]) {
            Some(v) => sum += v as u32 * w,
            None => return false,
        }
    }
    let check = (31 - sum % 31) % 31;
    CHARS[check as usize] == bytes[17]
}

#[derive(Debug, Deserialize)]
pub(super) struct CreateBody {
    pub(super) company_name: Option<String>,
    pub(super) credit_code: Option<String>,
    pub(super) org_number: Option<String>,
    pub(super) report_type: Option<String>,
}

pub(super) async fn token(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let injected = s.lock().take_injection(|i| i.endpoint == Endpoint::Token);
    if let Some(Fault::Slow { millis }) = injected {
        tokio::time::sleep(Duration::from_millis(millis)).await;
    }
    if let Some(resp) = injected.as_ref().and_then(fault_response) {
        s.count("token:injected".into());
        return resp;
    }
    let creds = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok());
    let grant_ok = String::from_utf8_lossy(&body).contains("grant_type=client_credentials");
    let client = creds
        .as_deref()
        .and_then(|c| c.split_once(':'))
        .filter(|(id, secret)| s.config.knows(id, secret))
        .map(|(id, _)| id.to_string());
    let (Some(client), true) = (client, grant_ok) else {
        s.count("token:67200003".into());
        return envelope_error(67200003);
    };
    let (token, ttl) = {
        let mut inner = s.lock();
        let token: String = (0..32)
            .map(|_| format!("{:x}", inner.rng.random_range(0..16u8)))
            .collect();
        let token = format!("eyJ{token}");
        let ttl = s.config.token_ttl;
        inner.tokens.insert(
            token.clone(),
            TokenInfo {
                client_id: client,
                expires: Instant::now() + ttl,
            },
        );
        // Forget long-expired tokens so a long run does not grow without bound.
        let now = Instant::now();
        inner
            .tokens
            .retain(|_, t| t.expires + Duration::from_secs(3600) > now);
        inner.stats.token_fetches += 1;
        *inner.stats.calls.entry("token:ok".into()).or_default() += 1;
        (token, ttl)
    };
    let secs = ttl.as_secs().max(1);
    let issued = Utc::now().timestamp_millis().to_string();
    let body = match s.config.token_shape.as_str() {
        "data" => {
            json!({"data": {"token": token, "expires_in": secs}, "status": true, "error_code": 0})
        }
        "access_token" => {
            json!({"access_token": token, "token_type": "bearer", "expires_in": secs})
        }
        _ => {
            json!({"token": token, "token_type": "BearerToken", "expires_in": secs, "status": "approved", "issued_at": issued})
        }
    };
    Json(body).into_response()
}

pub(super) async fn create(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let arrived = std::time::SystemTime::now();
    let (client, slow, then) = match s.gate("create", &headers, &query) {
        Gate::Answer(r) => return r,
        Gate::Pass {
            client, slow, then, ..
        } => (client, slow, then),
    };
    // Like the real provider, the task exists as soon as the request is accepted; the
    // answer takes its time (and a client that gives up waiting has still paid).
    let latency = {
        let (lo, hi) = s.config.create_latency;
        let mut inner = s.lock();
        if hi > lo {
            inner.rng.random_range(lo..=hi)
        } else {
            lo
        }
    } + slow.unwrap_or_default();
    let Ok(request) = serde_json::from_slice::<CreateBody>(&body) else {
        s.count("create:68300007".into());
        tokio::time::sleep(latency).await;
        return envelope_error(68300007);
    };
    let report_type = request.report_type.as_deref().and_then(|t| match t {
        "word" => Some(ReportType::Word),
        "pdf" => Some(ReportType::Pdf),
        _ => None,
    });
    let blank = |v: &Option<String>| v.as_deref().is_none_or(|s| s.trim().is_empty());
    let no_identifier =
        blank(&request.company_name) && blank(&request.credit_code) && blank(&request.org_number);
    let bad_code = !blank(&request.credit_code)
        && !credit_code_checksum_ok(request.credit_code.as_deref().unwrap_or(""));
    let (Some(report_type), false, false) = (report_type, no_identifier, bad_code) else {
        s.count("create:68300004".into());
        tokio::time::sleep(latency).await;
        return envelope_error(68300004);
    };
    let company = company_for(&request);
    let key = [
        &request.company_name,
        &request.credit_code,
        &request.org_number,
    ]
    .into_iter()
    .find(|v| !blank(v))
    .and_then(|v| v.clone())
    .unwrap_or_default();
    let job_id = {
        let mut inner = s.lock();
        if let Some(b) = inner.balance_left.get_mut(&client) {
            *b = b.saturating_sub(1);
        }
        let step = inner.rng.random_range(1..4096u64);
        inner.next_job_id += step;
        let id = inner.next_job_id;
        let u: f64 = inner.rng.random();
        // Box–Muller: a standard normal draw from two uniform ones.
        let (u1, u2): (f64, f64) = (inner.rng.random(), inner.rng.random());
        let z = (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        let generation = s.config.generation_for(u, z);
        let fails = s.config.failure_rate > 0.0
            && inner.rng.random_bool(s.config.failure_rate.clamp(0.0, 1.0));
        let initial_queue = inner.rng.random_range(0..6);
        let created_on = Utc::now().format("%Y-%m-%d %H:%M UTC").to_string();
        let given = |v: &Option<String>| v.clone().filter(|v| !v.trim().is_empty());
        inner.stats.tasks.insert(
            id.to_string(),
            SimTask {
                account: client.clone(),
                company_name: given(&request.company_name),
                credit_code: given(&request.credit_code),
                org_number: given(&request.org_number),
                report_type: report_type.as_str().to_string(),
                company: company.clone(),
                created_ms: Utc::now().timestamp_millis(),
                ready_ms: Utc::now().timestamp_millis() + generation.as_millis() as i64,
                initial_queue,
            },
        );
        inner.jobs.insert(
            id,
            Job {
                created: Instant::now(),
                generation,
                fails,
                initial_queue,
                company,
                report_type,
                created_on,
                owner: client.clone(),
            },
        );
        inner.stats.tasks_created += 1;
        inner
            .stats
            .accounts
            .entry(client.clone())
            .or_default()
            .tasks_created += 1;
        inner.first_create.entry(key.clone()).or_insert(arrived);
        *inner.stats.tasks_per_company.entry(key).or_default() += 1;
        let outcome = then.as_ref().map_or("ok".to_string(), Fault::outcome);
        inner.count_for(&client, format!("create:{outcome}"));
        id
    };
    tokio::time::sleep(latency).await;
    if let Some(response) = then.as_ref().and_then(fault_response) {
        return response;
    }
    // serde_json writes u64 exactly: a JSON number above 2^53, like the provider's.
    ok(json!({ "job_id": job_id }))
}

pub(super) async fn status(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let (client, slow, job_failed) = match s.gate("status", &headers, &query) {
        Gate::Answer(r) => return r,
        Gate::Pass {
            client,
            slow,
            job_failed,
            ..
        } => (client, slow, job_failed),
    };
    if let Some(d) = slow {
        tokio::time::sleep(d).await;
    }
    let Some(job_id) = query
        .get("job_id")
        .and_then(|j| j.trim().parse::<u64>().ok())
    else {
        s.count("status:68300004".into());
        return envelope_error(68300004);
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_string();
    let mut inner = s.lock();
    // Another account's task is as unknown as one that never existed.
    let Some(job) = inner.jobs.get_mut(&job_id).filter(|j| j.owner == client) else {
        let foreign = inner.jobs.contains_key(&job_id);
        inner.count_for(&client, "status:68300004".into());
        if foreign {
            inner.count_for(&client, "status:another_accounts_job".into());
        }
        return envelope_error(68300004);
    };
    if job_failed {
        job.fails = true;
        job.generation = Duration::ZERO;
    }
    let elapsed = job.created.elapsed();
    let queued_for = job.generation.mul_f64(0.3);
    let (job_status, queue_num, url, cause) = if elapsed < queued_for {
        let left = 1.0 - elapsed.as_secs_f64() / queued_for.as_secs_f64().max(1e-9);
        (
            0,
            Some((job.initial_queue as f64 * left).ceil() as i64),
            None,
            None,
        )
    } else if elapsed < job.generation {
        (1, Some(0), None, None)
    } else if job.fails {
        (3, None, None, Some("由于服务器异常，正在修复中"))
    } else {
        let ext = job.report_type.as_str().replace("word", "docx");
        let sign_start = Utc::now().timestamp();
        let sign_time = format!("{sign_start};{}", sign_start + 7 * 24 * 3600);
        let name = format!("{}_企业创新能力报告.{ext}", job.company);
        let disposition = format!(
            "attachment;filename*=UTF-8''{}",
            percent_encoding::utf8_percent_encode(&name, percent_encoding::NON_ALPHANUMERIC)
        );
        let mut link = url::Url::parse(&format!(
            "http://{host}/cos/company-report/{job_id}/report.{ext}"
        ))
        .unwrap_or_else(|_| url::Url::parse("http://127.0.0.1/").expect("static url"));
        link.query_pairs_mut()
            .append_pair("q-sign-algorithm", "sha1")
            .append_pair("q-ak", "AKIDsimulator")
            .append_pair("q-sign-time", &sign_time)
            .append_pair("q-key-time", &sign_time)
            .append_pair("q-header-list", "")
            .append_pair("q-url-param-list", "response-content-disposition")
            .append_pair(
                "q-signature",
                &link_signature(&s.signing_key, job_id, &sign_time),
            )
            .append_pair("response-content-disposition", &disposition);
        (2, Some(0), Some(link.to_string()), None)
    };
    inner.count_for(&client, format!("status:ok:{job_status}"));
    ok(json!({
        "job_id": job_id,
        "queue_num": queue_num,
        "job_status": job_status,
        "download_url": url,
        "abnormal_cause": cause,
    }))
}

pub(super) async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, envelope_error(67200101)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_code_checksums() {
        assert!(credit_code_checksum_ok("91110108551385082Q"));
        assert!(!credit_code_checksum_ok("91110108551385083Q"));
        assert!(!credit_code_checksum_ok("9111010855138508"));
    }
}
