//! Webhooks: the signed POST that tells an application its request finished.
//!
//! The body is JSON (built by `queue::claim_deliveries`; never the document's bytes).
//! The signature is HMAC-SHA256, keyed with `WEBHOOK_SECRET`, over the timestamp, a dot
//! and the exact body bytes, sent as
//!
//! ```text
//! X-Report-Signature: t=1764380000,v1=5f1c…(64 hex digits)
//! ```
//!
//! A receiver recomputes `hex(hmac_sha256(secret, "{t}.{body}"))`, compares it in
//! constant time with `v1`, and refuses a `t` too far from its own clock (replays). The
//! README shows a receiver. Redirects are never followed (a 3xx is a failed attempt),
//! each attempt has its own timeout, and the answer's body is not read.

use std::time::Duration;

use hmac::{KeyInit, Mac};
use sha2::Sha256;

use crate::config::{error_chain, redact_url};

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "X-Report-Signature";
/// The header carrying the delivery's id (the same on every retry: receivers use it to
/// ignore a delivery they already handled).
pub const DELIVERY_HEADER: &str = "X-Report-Delivery";

/// The signature header's value for `body` sent at `timestamp` (Unix seconds).
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(secret)
        .expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// Why one attempt did not deliver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The receiver answered, but not with 2xx (a redirect included: never followed).
    #[error("the receiver answered HTTP {0}")]
    Status(u16),
    /// No answer: refused, reset, timed out. The message never holds the URL.
    #[error("{0}")]
    Transport(String),
}

impl DeliveryError {
    /// The HTTP status, when the receiver answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            DeliveryError::Status(s) => Some(*s),
            DeliveryError::Transport(_) => None,
        }
    }
}

/// Sends signed webhooks. The secret is held here and never printed.
#[derive(Clone)]
pub struct Sender {
    http: reqwest::Client,
    secret: std::sync::Arc<[u8]>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender").finish_non_exhaustive()
    }
}

impl Sender {
    pub fn new(secret: &str, timeout: Duration) -> Result<Sender, reqwest::Error> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("report-worker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Sender {
            http,
            secret: secret.as_bytes().into(),
        })
    }

    /// One attempt: POSTs `body` to `url`, signed now. Ok with the 2xx status.
    pub async fn deliver(
        &self,
        url: &str,
        delivery: i64,
        body: &str,
    ) -> Result<u16, DeliveryError> {
        let now = chrono::Utc::now().timestamp();
        let answer = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(
                SIGNATURE_HEADER,
                signature(&self.secret, now, body.as_bytes()),
            )
            .header(DELIVERY_HEADER, delivery.to_string())
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| {
                let kind = if e.is_timeout() {
                    "timed out"
                } else if e.is_connect() {
                    "could not connect"
                } else {
                    "failed"
                };
                DeliveryError::Transport(format!(
                    "POST {} {kind}: {}",
                    redact_url(url),
                    error_chain(&e.without_url())
                ))
            })?;
        let status = answer.status();
        if status.is_success() {
            Ok(status.as_u16())
        } else {
            Err(DeliveryError::Status(status.as_u16()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_an_independent_computation() {
        // printf '1700000000.{"id":1}' | openssl dgst -sha256 -hmac secret
        let header = signature(b"secret", 1_700_000_000, br#"{"id":1}"#);
        assert_eq!(
            header,
            "t=1700000000,v1=3dd1b9aef568d75f6790a84bd2e5dfa1f44409eef3cbdbd3f10b837376100c11"
        );
    }

    #[test]
    fn a_different_body_or_time_changes_the_signature() {
        let a = signature(b"k", 1, b"x");
        assert_ne!(a, signature(b"k", 2, b"x"));
        assert_ne!(a, signature(b"k", 1, b"y"));
        assert_ne!(a, signature(b"l", 1, b"x"));
    }
}
