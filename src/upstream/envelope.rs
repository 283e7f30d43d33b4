//! Parsing the provider's answers: the `{data, status, error_code, error_msg}` envelope
//! and the three shapes of a token answer. Pure functions over bytes, so they can be
//! fed hostile input in tests.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{Secret, UpstreamError, classify_code, classify_http_status};
use crate::domain::clip;

/// When `expires_in` is missing the provider's documented lifetime applies.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(1799);

/// Reads an integer that may arrive as a JSON number or a string of digits.
fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Interprets one API answer (not a download): `Ok(data)` on success, otherwise what
/// the worker should do. Provider codes in the body win over the HTTP status.
pub fn interpret(
    http_status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
    now: DateTime<Utc>,
) -> Result<Value, UpstreamError> {
    let parsed: Option<serde_json::Map<String, Value>> = serde_json::from_slice(body).ok();
    if let Some(obj) = &parsed {
        let code = obj.get("error_code").and_then(int_of).unwrap_or(0);
        let status = obj.get("status").and_then(Value::as_bool);
        let message = obj
            .get("error_msg")
            .and_then(Value::as_str)
            .map(|m| crate::domain::clip_to(m, 300))
            .unwrap_or_default();
        if code != 0 {
            return Err(match i32::try_from(code) {
                Ok(c) if c >= 100_000 => classify_code(c, &message, now),
                // Small codes in the body are HTTP-like statuses.
                Ok(c) if (100..600).contains(&c) => classify_http_status(c as u16, retry_after),
                _ => classify_code(i32::try_from(code).unwrap_or(i32::MAX), &message, now),
            });
        }
        if !(200..300).contains(&http_status) {
            return Err(classify_http_status(http_status, retry_after));
        }
        if status == Some(false) {
            return Err(UpstreamError::transient(format!(
                "answer says status false without an error code: {}",
                clip(&String::from_utf8_lossy(body))
            )));
        }
        return Ok(obj.get("data").cloned().unwrap_or(Value::Null));
    }
    if !(200..300).contains(&http_status) {
        return Err(classify_http_status(http_status, retry_after));
    }
    Err(UpstreamError::transient(format!(
        "malformed answer (not a JSON envelope): {:?}",
        clip(&String::from_utf8_lossy(body))
    )))
}

/// The error code an answer's body carries, if it is a JSON envelope with a non-zero one.
pub fn error_code_of(body: &[u8]) -> Option<i64> {
    serde_json::from_slice::<serde_json::Map<String, Value>>(body)
        .ok()?
        .get("error_code")
        .and_then(int_of)
        .filter(|c| *c != 0)
}

/// A bearer token and how long the provider says it lives.
#[derive(Debug, Clone)]
pub struct TokenAnswer {
    pub token: Secret,
    pub expires_in: Duration,
}

/// Reads the token from any of the three shapes: top-level `token`, a `data` wrapper,
/// or `access_token`. Errors at the token endpoint that concern the credentials are
/// account stops: no amount of retrying fixes a wrong secret.
pub fn parse_token(
    http_status: u16,
    body: &[u8],
    now: DateTime<Utc>,
) -> Result<TokenAnswer, UpstreamError> {
    let value = interpret(http_status, None, body, now).map_err(|e| match e {
        UpstreamError::BadCredentials { message } => UpstreamError::stop_all(67200003, message),
        UpstreamError::Unauthorized { code, message } => UpstreamError::stop_all(
            code.unwrap_or(401),
            format!("token endpoint refused the credentials: {message}"),
        ),
        other => other,
    });
    // The documented shape has no `data`: `interpret` then yields Null; read the top level.
    let top: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let value = value?;
    for candidate in [&value, &top] {
        let Some(obj) = candidate.as_object() else {
            continue;
        };
        let token = obj
            .get("token")
            .or_else(|| obj.get("access_token"))
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|t| !t.is_empty());
        if let Some(token) = token {
            if token.chars().any(|c| c.is_control() || c == ' ') {
                return Err(UpstreamError::transient(
                    "token answer holds an unusable token",
                ));
            }
            let expires_in = obj
                .get("expires_in")
                .and_then(int_of)
                .filter(|s| *s > 0)
                .map(|s| Duration::from_secs(s as u64))
                .unwrap_or(DEFAULT_TOKEN_TTL);
            return Ok(TokenAnswer {
                token: Secret::new(token),
                expires_in,
            });
        }
    }
    // Never echo the body: it may hold a token in a shape we did not expect.
    Err(UpstreamError::transient("token answer holds no token"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn now() -> DateTime<Utc> {
        Utc::now()
    }

    #[test]
    fn three_token_shapes() {
        let documented = br#"{"token":"eyJ.a","token_type":"BearerToken","expires_in":1799,"status":"approved","issued_at":"1692347672874"}"#;
        let wrapped =
            br#"{"data":{"token":"eyJ.b","expires_in":"60"},"status":true,"error_code":0}"#;
        let oauth = br#"{"access_token":"eyJ.c","token_type":"bearer"}"#;
        let a = parse_token(200, documented, now()).unwrap();
        assert_eq!((a.token.expose(), a.expires_in.as_secs()), ("eyJ.a", 1799));
        let b = parse_token(200, wrapped, now()).unwrap();
        assert_eq!((b.token.expose(), b.expires_in.as_secs()), ("eyJ.b", 60));
        let c = parse_token(200, oauth, now()).unwrap();
        assert_eq!(
            (c.token.expose(), c.expires_in),
            ("eyJ.c", DEFAULT_TOKEN_TTL)
        );
    }

    #[test]
    fn token_errors() {
        let bad = br#"{"status":false,"error_code":67200003,"error_msg":"bad key"}"#;
        assert!(matches!(
            parse_token(200, bad, now()),
            Err(UpstreamError::AccountStop { code: 67200003, .. })
        ));
        assert!(matches!(
            parse_token(401, b"", now()),
            Err(UpstreamError::AccountStop { code: 401, .. })
        ));
        assert!(matches!(
            parse_token(200, b"{}", now()),
            Err(UpstreamError::Transient { .. })
        ));
        assert!(matches!(
            parse_token(503, b"<html>", now()),
            Err(UpstreamError::Transient {
                code: Some(503),
                ..
            })
        ));
        let e = parse_token(200, br#"{"tok":"secret-value"}"#, now()).unwrap_err();
        assert!(!e.to_string().contains("secret-value"));
    }

    #[test]
    fn envelopes() {
        let ok = br#"{"data":{"job_id":1579434053399035904},"status":true,"error_code":0}"#;
        let data = interpret(200, None, ok, now()).unwrap();
        assert_eq!(
            crate::domain::JobId::from_json(&data["job_id"])
                .unwrap()
                .as_str(),
            "1579434053399035904"
        );
        // 201 Created is a success too (the reference lists it).
        assert!(interpret(201, None, ok, now()).is_ok());
        let err200 = br#"{"data":null,"status":false,"error_code":68300004,"error_msg":"Invalid parameter!"}"#;
        assert!(matches!(
            interpret(200, None, err200, now()),
            Err(UpstreamError::Rejected {
                code: Some(68300004),
                ..
            })
        ));
        // The same error with a 4xx status: the code still wins.
        assert!(matches!(
            interpret(403, None, err200, now()),
            Err(UpstreamError::Rejected { .. })
        ));
        let string_code = br#"{"status":false,"error_code":"67200002"}"#;
        assert!(matches!(
            interpret(200, None, string_code, now()),
            Err(UpstreamError::RateLimited { .. })
        ));
        assert!(matches!(
            interpret(200, None, b"{\"data\":{\"job_id\":", now()),
            Err(UpstreamError::Transient { .. })
        ));
        assert!(matches!(
            interpret(200, None, b"<html>busy</html>", now()),
            Err(UpstreamError::Transient { .. })
        ));
        assert!(matches!(
            interpret(502, None, b"<html>", now()),
            Err(UpstreamError::Transient {
                code: Some(502),
                ..
            })
        ));
        assert!(matches!(
            interpret(401, None, b"", now()),
            Err(UpstreamError::Unauthorized { .. })
        ));
        assert!(matches!(
            interpret(200, None, br#"{"status":false}"#, now()),
            Err(UpstreamError::Transient { .. })
        ));
    }

    proptest! {
        #[test]
        fn interpret_never_panics(status in 100u16..600, body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = interpret(status, None, &body, Utc::now());
            let _ = parse_token(status, &body, Utc::now());
        }

        #[test]
        fn interpret_never_panics_on_json_like(s in r#"\{("(data|status|error_code|error_msg|token|expires_in)":(-?[0-9]{1,25}|"[^"]{0,5}"|true|false|null|\{\}|\[\]),?){0,5}\}"#) {
            let _ = interpret(200, None, s.as_bytes(), Utc::now());
            let _ = parse_token(200, s.as_bytes(), Utc::now());
        }

        #[test]
        fn job_ids_roundtrip(id in any::<u64>()) {
            let body = format!(r#"{{"data":{{"job_id":{id}}},"status":true,"error_code":0}}"#);
            let data = interpret(200, None, body.as_bytes(), Utc::now()).unwrap();
            let job = crate::domain::JobId::from_json(&data["job_id"]).unwrap();
            prop_assert_eq!(job.as_str(), id.to_string());
        }
    }
}
