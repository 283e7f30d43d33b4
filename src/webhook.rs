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
//! docs/applications.md shows a receiver. Redirects are never followed (a 3xx is a failed attempt),
//! each attempt has its own timeout, and the answer's body is not read.
//!
//! Where a webhook may go: a `callback_url` is written by whoever may insert a row, so
//! by default no delivery reaches inside the worker's network — loopback, private,
//! link-local (the cloud metadata service), CGNAT, multicast, unspecified and reserved
//! addresses are refused, checked on the very addresses the connection is made to (the
//! resolver below hands the client only allowed ones, so a name that resolves elsewhere
//! the second time cannot slip through). `WEBHOOK_ALLOW_PRIVATE` or an allow-list of
//! hosts opts in. Messages and logs name the host only, never the path or the query (a
//! callback URL often carries a secret there).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hmac::{KeyInit, Mac};
use sha2::Sha256;

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
    /// No answer: refused, reset, timed out. The message names the host only.
    #[error("{0}")]
    Transport(String),
    /// The destination is not one webhooks may go to (an address inside the network):
    /// not sent, and not worth trying again.
    #[error("{0}")]
    Refused(String),
}

impl DeliveryError {
    /// The HTTP status, when the receiver answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            DeliveryError::Status(s) => Some(*s),
            DeliveryError::Transport(_) | DeliveryError::Refused(_) => None,
        }
    }
}

/// Where webhooks may go beyond the public internet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Destinations {
    /// `WEBHOOK_ALLOW_PRIVATE`: any address at all.
    pub allow_private: bool,
    /// `WEBHOOK_ALLOW_HOSTS`: these hosts (exactly, case-insensitive) may resolve to
    /// private addresses.
    pub allow_hosts: Vec<String>,
}

impl Destinations {
    fn allows(&self, host: &str, ip: IpAddr) -> bool {
        self.allow_private
            || is_public(ip)
            || self
                .allow_hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(host))
    }
}

/// Whether `ip` is an address on the public internet: not loopback, private (RFC 1918,
/// unique local), link-local (169.254.0.0/16 holds the cloud metadata service, fe80::/10),
/// CGNAT (100.64.0.0/10), multicast, broadcast, unspecified, documentation, benchmarking
/// or reserved; an IPv4 address inside IPv6 (mapped, NAT64) is judged as IPv4.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_unspecified()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 192 && b == 88 && c == 99)
                || (a == 198 && (18..20).contains(&b))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            if seg[0] == 0x64 && seg[1] == 0xff9b {
                let [.., a, b] = seg;
                let v4 = std::net::Ipv4Addr::new((a >> 8) as u8, a as u8, (b >> 8) as u8, b as u8);
                return is_public(IpAddr::V4(v4));
            }
            // 6to4 (2002::/16) carries an IPv4 address in its next 32 bits;
            // IPv4-translated (::ffff:0:a.b.c.d) in its last.
            let embedded = |hi: u16, lo: u16| {
                std::net::Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)
            };
            if seg[0] == 0x2002 {
                return is_public(IpAddr::V4(embedded(seg[1], seg[2])));
            }
            if seg[..6] == [0, 0, 0, 0, 0xffff, 0] {
                return is_public(IpAddr::V4(embedded(seg[6], seg[7])));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00
                || (seg[0] & 0xffc0) == 0xfe80
                // Site-local (deprecated, still routed inside some networks).
                || (seg[0] & 0xffc0) == 0xfec0
                || (seg[0] == 0x2001 && seg[1] == 0x0db8)
                || seg[..6] == [0, 0, 0, 0, 0, 0])
        }
    }
}

/// The resolver the webhook client connects through: each name resolved, and only the
/// addresses `Destinations` allows handed on; none left is a refusal.
struct GuardedResolver {
    destinations: Arc<Destinations>,
}

/// A destination refused by the resolver (found again in the client's error chain).
#[derive(Debug)]
struct RefusedDestination(String);

impl std::fmt::Display for RefusedDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RefusedDestination {}

/// The refusal as stored with the delivery (where `report_app` can read it): the host,
/// never the address it resolved to, so that callback URLs cannot map the inside of the
/// network. The address goes to the worker's log only.
fn refusal(host: &str, ip: IpAddr) -> String {
    tracing::warn!(%host, %ip, "webhook refused: the host resolves inside the network");
    format!(
        "refused: {host} is an address inside the network (loopback, private, link-local or reserved); webhooks go there only with WEBHOOK_ALLOW_PRIVATE=true or the host in WEBHOOK_ALLOW_HOSTS"
    )
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let destinations = self.destinations.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| destinations.allows(&host, a.ip()))
                .collect();
            match (allowed.is_empty(), found.first()) {
                (true, Some(first)) => {
                    Err(Box::new(RefusedDestination(refusal(&host, first.ip())))
                        as Box<dyn std::error::Error + Send + Sync>)
                }
                _ => Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

/// A URL's host, for messages and logs (never its path, query or credentials).
pub fn host_of(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| {
            u.host_str().map(|h| match u.port() {
                Some(p) => format!("{h}:{p}"),
                None => h.to_string(),
            })
        })
        .unwrap_or_else(|| "(not a URL)".into())
}

/// Sends signed webhooks. The secret is held here and never printed.
#[derive(Clone)]
pub struct Sender {
    http: reqwest::Client,
    secret: std::sync::Arc<[u8]>,
    destinations: Arc<Destinations>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender").finish_non_exhaustive()
    }
}

impl Sender {
    /// A sender that delivers only to the public internet, or also to `destinations`.
    pub fn new(
        secret: &str,
        timeout: Duration,
        destinations: Destinations,
    ) -> Result<Sender, reqwest::Error> {
        crate::config::install_crypto_provider();
        let destinations = Arc::new(destinations);
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            // Straight to the receiver: a proxy would connect where this cannot check.
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver {
                destinations: destinations.clone(),
            }))
            .user_agent(concat!("report-worker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Sender {
            http,
            secret: secret.as_bytes().into(),
            destinations,
        })
    }

    /// One attempt: POSTs `body` to `url`, signed now. Ok with the 2xx status. With
    /// `traceparent`, the receiver can continue the report's trace (W3C Trace Context).
    pub async fn deliver(
        &self,
        url: &str,
        delivery: i64,
        body: &str,
        traceparent: Option<&str>,
    ) -> Result<u16, DeliveryError> {
        let host = host_of(url);
        // An address written in the URL is not resolved: judged here.
        let parsed = url::Url::parse(url).ok();
        let literal = parsed.as_ref().and_then(|u| match u.host() {
            Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
            Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
            _ => None,
        });
        if let Some(ip) = literal {
            let bare = parsed.as_ref().and_then(|u| u.host_str()).unwrap_or("");
            let bare = bare.trim_start_matches('[').trim_end_matches(']');
            if !self.destinations.allows(bare, ip) {
                return Err(DeliveryError::Refused(refusal(bare, ip)));
            }
        }
        let now = chrono::Utc::now().timestamp();
        let mut request = self.http.post(url);
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        let answer = request
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
                let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
                while let Some(s) = source {
                    if let Some(refused) = s.downcast_ref::<RefusedDestination>() {
                        return DeliveryError::Refused(refused.0.clone());
                    }
                    source = s.source();
                }
                // Only the kind of failure: which of "refused", "reset" or "no route" it
                // was would map a network for whoever may write callback URLs.
                let kind = if e.is_timeout() {
                    "timed out"
                } else if e.is_connect() {
                    "could not connect"
                } else {
                    "failed"
                };
                DeliveryError::Transport(format!("POST to {host} {kind}"))
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
    fn addresses_inside_the_network_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "::ffff:0:a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "2002:7f00:1::",
            "fec0::1",
            "192.88.99.1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "2002:808:808::1",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn hosts_name_no_path_or_query() {
        assert_eq!(
            host_of("https://user:pw@hooks.example.com:8443/t/SECRET?sig=abc"),
            "hooks.example.com:8443"
        );
        assert_eq!(
            host_of("http://hooks.example.com/x?key=1"),
            "hooks.example.com"
        );
    }

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
