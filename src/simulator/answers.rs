//! The shapes of the provider's answers: the envelope, error pages, broken bodies.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::upstream::provider_message;

use super::config::*;

pub(super) fn envelope_error(code: i32) -> Response {
    Json(json!({"data": null, "status": false, "error_code": code, "error_msg": provider_message(code)}))
        .into_response()
}

/// `envelope_error(code)`, its body sent only after `millis` (the status line at once,
/// as a server that takes its time to answer does).
pub(super) fn late_envelope_error(code: i32, millis: u64) -> Response {
    let body = serde_json::to_vec(&json!({"data": null, "status": false, "error_code": code, "error_msg": provider_message(code)}))
        .unwrap_or_default();
    let stream = futures_util::stream::once(async move {
        tokio::time::sleep(std::time::Duration::from_millis(millis)).await;
        Ok::<Bytes, std::io::Error>(Bytes::from(body))
    });
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub(super) fn ok(data: Value) -> Response {
    Json(json!({"data": data, "status": true, "error_code": 0})).into_response()
}

/// A response whose body breaks off: headers promise more than is ever sent.
pub(super) fn reset_response() -> Response {
    let stream = futures_util::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "simulated reset",
        ))
    });
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("128"));
    r
}

pub(super) fn fault_response(fault: &Fault) -> Option<Response> {
    Some(match fault {
        Fault::Code { code } => envelope_error(*code),
        Fault::Http { status } => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let body = format!("<html><body><h1>{status}</h1></body></html>");
            (status, [(header::CONTENT_TYPE, "text/html")], body).into_response()
        }
        Fault::Reset => reset_response(),
        Fault::Malformed => (
            [(header::CONTENT_TYPE, "application/json")],
            "{\"data\":{\"job_id\":",
        )
            .into_response(),
        Fault::CreatedThenReset => reset_response(),
        Fault::CreatedThenHttp { status } => {
            return fault_response(&Fault::Http { status: *status });
        }
        Fault::CreatedThenUnreadable => ok(json!({ "job_id": "pending" })),
        Fault::CreatedThenStatusFalse => {
            Json(json!({"data": null, "status": false})).into_response()
        }
        Fault::CreatedThenCode { code } => envelope_error(*code),
        Fault::HttpCode { status, code } => {
            let mut r = envelope_error(*code);
            *r.status_mut() =
                StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            r
        }
        Fault::SlowCode { .. } => return None,
        Fault::Slow { .. }
        | Fault::Html
        | Fault::JobFailed
        | Fault::Drip { .. }
        | Fault::RedirectToHost { .. }
        | Fault::BadDocx => return None,
    })
}

pub(super) fn cos_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!(
        "<?xml version='1.0' encoding='utf-8' ?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    (status, [(header::CONTENT_TYPE, "application/xml")], body).into_response()
}
