//! Pre-signed download links, as Tencent COS serves them: signed, expiring, carrying
//! the file name in `response-content-disposition`.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures_util::StreamExt;
use rand::RngExt;
use sha2::{Digest, Sha256};

use crate::domain::ReportType;

use super::answers::*;
use super::config::*;
use super::state::*;

pub(super) fn link_signature(key: &str, job_id: u64, sign_time: &str) -> String {
    hex::encode(Sha256::digest(
        format!("{key}:{job_id}:{sign_time}").as_bytes(),
    ))[..40]
        .to_string()
}

pub(super) async fn download(
    State(s): State<AppState>,
    Path((job_id, file)): Path<(u64, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: axum::http::HeaderMap,
) -> Response {
    let sign_time = query.get("q-sign-time").cloned().unwrap_or_default();
    let signature_ok = query.get("q-signature").map(String::as_str)
        == Some(link_signature(&s.signing_key, job_id, &sign_time).as_str());
    let expired = sign_time
        .split(';')
        .nth(1)
        .and_then(|e| e.parse::<i64>().ok())
        .is_none_or(|end| end < Utc::now().timestamp());
    if !signature_ok || expired {
        s.count("download:403".into());
        return cos_error(
            StatusCode::FORBIDDEN,
            "AccessDenied",
            "Request has expired or signature does not match",
        );
    }
    let (injected, random_fault, content) = {
        let mut inner = s.lock();
        let injected = inner.take_injection(|i| i.endpoint == Endpoint::Download);
        let random_fault = s.config.fault_rate > 0.0
            && inner
                .rng
                .random_bool((s.config.fault_rate / 2.0).clamp(0.0, 1.0));
        let content = inner
            .jobs
            .get(&job_id)
            .filter(|j| !j.fails && j.created.elapsed() >= j.generation)
            .map(|j| {
                (
                    super::documents::ReportContent {
                        company: j.company.clone(),
                        job_id,
                        generated_at: j.created_on.clone(),
                        target_size: s.config.doc_size,
                    },
                    j.report_type,
                )
            });
        (injected, random_fault, content)
    };
    let Some((content, report_type)) = content else {
        s.count("download:404".into());
        return cos_error(
            StatusCode::NOT_FOUND,
            "NoSuchKey",
            "The specified key does not exist.",
        );
    };
    let mut drip = None;
    match injected {
        Some(Fault::Drip { bytes_per_sec }) => drip = Some(bytes_per_sec.max(1)),
        Some(Fault::RedirectToHost { host }) => {
            s.count("download:redirect".into());
            let port = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.rsplit_once(':'))
                .map(|(_, p)| format!(":{p}"))
                .unwrap_or_default();
            let query: String = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(query.iter())
                .finish();
            let to = format!("http://{host}{port}/cos/company-report/{job_id}/{file}?{query}");
            return (StatusCode::FOUND, [(header::LOCATION, to)]).into_response();
        }
        Some(Fault::BadDocx) => {
            s.count("download:bad_docx".into());
            return (
                [(header::CONTENT_TYPE, ReportType::Word.content_type())],
                b"PK\x03\x04 this is not a zip archive at all".to_vec(),
            )
                .into_response();
        }
        Some(Fault::Html) => {
            s.count("download:html".into());
            return (
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>Service temporarily unavailable</body></html>",
            )
                .into_response();
        }
        Some(Fault::Slow { millis }) => tokio::time::sleep(Duration::from_millis(millis)).await,
        Some(other) => {
            if let Some(r) = fault_response(&other) {
                s.count("download:injected".into());
                return r;
            }
        }
        None if random_fault => {
            s.count("download:reset".into());
            return reset_response();
        }
        None => {}
    }
    let generate = move || match report_type {
        ReportType::Pdf => super::documents::pdf_report(&content),
        ReportType::Word => super::documents::docx_report(&content),
    };
    // Generating a few hundred KB takes a moment: off the lock, off the async threads.
    // Small documents are cheaper to make than to hand to another thread.
    let bytes = if s.config.doc_size <= 64 * 1024 {
        generate()
    } else {
        tokio::task::spawn_blocking(generate)
            .await
            .unwrap_or_default()
    };
    {
        let mut inner = s.lock();
        inner.stats.documents.insert(
            job_id.to_string(),
            crate::upstream::document::sha256_hex(&bytes),
        );
        inner
            .stats
            .first_served_ms
            .entry(job_id.to_string())
            .or_insert_with(|| Utc::now().timestamp_millis());
        *inner.stats.calls.entry("download:ok".into()).or_default() += 1;
    }
    let mut response = match drip {
        None => Response::new(Body::from(bytes)),
        Some(rate) => {
            // A tenth of a second's worth at a time: a server that trickles bytes.
            let step = (rate / 10).max(1) as usize;
            let chunks: Vec<Bytes> = bytes.chunks(step).map(Bytes::copy_from_slice).collect();
            let stream = futures_util::stream::iter(chunks).then(|chunk| async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok::<Bytes, std::io::Error>(chunk)
            });
            Response::new(Body::from_stream(stream))
        }
    };
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(report_type.content_type()),
    );
    if let Some(v) = query
        .get("response-content-disposition")
        .and_then(|d| HeaderValue::from_str(d).ok())
    {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    response
}
