//! Who may act: the dashboard is read-only unless `DASHBOARD_TOKEN` is set; then a person
//! signs in with the token and their name (recorded with every action), and gets an
//! HttpOnly, SameSite=Strict session cookie. Every POST carries a CSRF token tied to a
//! second cookie. Nothing is kept on the server: cookies are signed with a key derived
//! from the token, so several dashboard processes behind one address agree, and
//! changing the token signs everyone out.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use crate::upstream::Secret;

type HmacSha256 = Hmac<Sha256>;

pub const SESSION_COOKIE: &str = "rw_session";
pub const CSRF_COOKIE: &str = "rw_csrf";
/// How long a sign-in lasts.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// The longest name a person may sign in with.
pub const MAX_NAME_CHARS: usize = 64;

/// The signing key and the token's own tag (compared in constant time).
#[derive(Clone)]
pub struct Auth {
    key: [u8; 32],
    token_tag: Vec<u8>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth(***)")
    }
}

impl Auth {
    pub fn new(token: &Secret) -> Auth {
        let key: [u8; 32] = Sha256::new()
            .chain_update(b"report-worker dashboard key\0")
            .chain_update(token.expose().as_bytes())
            .finalize()
            .into();
        let mut auth = Auth {
            key,
            token_tag: Vec::new(),
        };
        auth.token_tag = auth.tag(&[b"token", token.expose().as_bytes()]);
        auth
    }

    fn mac(&self, parts: &[&[u8]]) -> HmacSha256 {
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&self.key).expect("any key length");
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    fn tag(&self, parts: &[&[u8]]) -> Vec<u8> {
        self.mac(parts).finalize().into_bytes().to_vec()
    }

    fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.mac(parts).verify_slice(tag).is_ok()
    }

    /// Whether `given` is the token (constant time).
    pub fn token_matches(&self, given: &str) -> bool {
        self.verify(&[b"token", given.as_bytes()], &self.token_tag)
    }

    /// A session cookie value for `name`, valid until `expires` (unix seconds).
    pub fn session_value(&self, name: &str, expires: u64) -> String {
        let name_hex = hex::encode(name.as_bytes());
        let tag = self.tag(&[
            b"session",
            expires.to_string().as_bytes(),
            name_hex.as_bytes(),
        ]);
        format!("{expires}.{name_hex}.{}", hex::encode(tag))
    }

    /// The signed-in person's name, if the session cookie is genuine and unexpired.
    pub fn session_name(&self, value: &str, now: u64) -> Option<String> {
        let mut parts = value.splitn(3, '.');
        let (expires, name_hex, tag) = (parts.next()?, parts.next()?, parts.next()?);
        let tag = hex::decode(tag).ok()?;
        if !self.verify(&[b"session", expires.as_bytes(), name_hex.as_bytes()], &tag) {
            return None;
        }
        if expires.parse::<u64>().ok()? <= now {
            return None;
        }
        String::from_utf8(hex::decode(name_hex).ok()?).ok()
    }

    /// The CSRF token forms carry for the browser holding `csrf_cookie`.
    pub fn csrf_token(&self, csrf_cookie: &str) -> String {
        hex::encode(self.tag(&[b"csrf", csrf_cookie.as_bytes()]))
    }

    pub fn csrf_matches(&self, csrf_cookie: &str, given: &str) -> bool {
        match hex::decode(given) {
            Ok(tag) => {
                !csrf_cookie.is_empty() && self.verify(&[b"csrf", csrf_cookie.as_bytes()], &tag)
            }
            Err(_) => false,
        }
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A fresh random value for the CSRF cookie.
pub fn random_cookie_value() -> String {
    let bytes: [u8; 16] = rand::random();
    hex::encode(bytes)
}

/// A cookie from the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Strict, for the whole dashboard; `Secure`
/// when the request came over HTTPS.
pub fn set_cookie(name: &str, value: &str, max_age: Option<Duration>, secure: bool) -> String {
    let mut c = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict");
    if secure {
        c.push_str("; Secure");
    }
    if let Some(age) = max_age {
        c.push_str(&format!("; Max-Age={}", age.as_secs()));
    }
    c
}

/// A name a person may sign in with: trimmed, 1 to 64 characters, no control
/// characters. The error says what is wrong.
pub fn valid_name(raw: &str) -> Result<String, String> {
    let name = raw.trim();
    if name.is_empty() {
        return Err("your name is required (it is recorded with every action)".into());
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(format!(
            "your name is longer than {MAX_NAME_CHARS} characters"
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("your name contains a control character".into());
    }
    Ok(name.to_string())
}

/// Whether a POST comes from this dashboard's own pages: when the browser says where
/// it comes from (`Origin`), that must be the address it asked (`Host`).
pub fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(axum::http::header::ORIGIN) else {
        return true;
    };
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest.trim_end_matches('/'));
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(&Secret::new("s3cret-token"))
    }

    #[test]
    fn the_token_is_checked() {
        let a = auth();
        assert!(a.token_matches("s3cret-token"));
        assert!(!a.token_matches("s3cret-toke"));
        assert!(!a.token_matches(""));
    }

    #[test]
    fn sessions_are_signed_and_expire() {
        let a = auth();
        let v = a.session_value("李雷 <ops>", 1_000);
        assert_eq!(a.session_name(&v, 999).as_deref(), Some("李雷 <ops>"));
        assert_eq!(a.session_name(&v, 1_000), None, "expired");
        let forged = v.replacen("1000", "9999", 1);
        assert_eq!(a.session_name(&forged, 999), None, "expiry changed");
        let other = Auth::new(&Secret::new("another"));
        assert_eq!(other.session_name(&v, 999), None, "another token");
        assert_eq!(a.session_name("garbage", 0), None);
    }

    #[test]
    fn csrf_tokens_are_tied_to_the_cookie() {
        let a = auth();
        let t = a.csrf_token("abc");
        assert!(a.csrf_matches("abc", &t));
        assert!(!a.csrf_matches("abd", &t));
        assert!(!a.csrf_matches("", &a.csrf_token("")));
        assert!(!a.csrf_matches("abc", "zz"));
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(valid_name("  Ann ").unwrap(), "Ann");
        assert!(valid_name(" ").is_err());
        assert!(valid_name("a\u{7}b").is_err());
        assert!(valid_name(&"x".repeat(65)).is_err());
    }

    #[test]
    fn cross_origin_posts_are_refused() {
        let mut h = HeaderMap::new();
        h.insert("host", "127.0.0.1:8080".parse().unwrap());
        assert!(same_origin(&h));
        h.insert("origin", "http://127.0.0.1:8080".parse().unwrap());
        assert!(same_origin(&h));
        h.insert("origin", "http://evil.example".parse().unwrap());
        assert!(!same_origin(&h));
    }
}
