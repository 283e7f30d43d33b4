//! Configuration values shared by the commands: durations written like `30s`, and
//! connection strings shown without their password.

use std::time::Duration;

/// Parses `250ms`, `30s`, `10m`, `1h 30m` (humantime); a bare number is refused so that
/// nobody has to guess its unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.starts_with('-') {
        return Err(format!(
            "{s:?} is negative: a duration is 0 or more (write durations like 250ms, 30s, 10m)"
        ));
    }
    if s.is_empty() {
        return Err("empty: write durations like 250ms, 30s, 10m".into());
    }
    humantime::parse_duration(s).map_err(|e| {
        let why = match e {
            humantime::DurationError::NumberExpected(_) => "a number is missing".to_string(),
            humantime::DurationError::UnknownUnit { unit, .. } => format!("unknown unit {unit:?}"),
            humantime::DurationError::InvalidCharacter(_) => {
                "it holds a character no duration has".into()
            }
            humantime::DurationError::NumberOverflow => "it is too long".into(),
            humantime::DurationError::Empty => "it is empty".into(),
        };
        format!("{s:?} is not a duration: {why} (write durations like 250ms, 30s, 10m)")
    })
}

/// A duration as an operator writes it, in its largest whole unit (`90d`, `2h`, `90s`,
/// `250ms`): what `parse_duration` reads back to the same value.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    match s {
        0 => "0s".into(),
        _ if s.is_multiple_of(86_400) => format!("{}d", s / 86_400),
        _ if s.is_multiple_of(3_600) => format!("{}h", s / 3_600),
        _ if s.is_multiple_of(60) => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

/// A `MIN..MAX` pair of durations, e.g. `1m..10m`.
pub fn parse_duration_range(s: &str) -> Result<(Duration, Duration), String> {
    let (lo, hi) = s
        .split_once("..")
        .ok_or_else(|| format!("expected MIN..MAX, e.g. 1m..10m, got {s:?}"))?;
    let (lo, hi) = (parse_duration(lo)?, parse_duration(hi)?);
    if lo > hi {
        return Err(format!("range {s:?} has its minimum above its maximum"));
    }
    Ok((lo, hi))
}

/// rustls needs one process-wide crypto provider (ring, which sqlx brings too); every
/// HTTP client of the process — the provider's, object storage's — needs it installed.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A connection string fit for messages: the password, if any, replaced by `***` —
/// in the userinfo and in query parameters (`?password=`, `sslpassword`, anything
/// named like a secret or token).
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            let secret = |k: &str| {
                let k = k.to_ascii_lowercase();
                ["password", "passwd", "secret", "token", "key", "sig"]
                    .iter()
                    .any(|s| k.contains(s))
            };
            let secret_query = u.query_pairs().any(|(k, _)| secret(&k));
            if u.password().is_none() && !secret_query {
                // Nothing to hide: shown as written.
                return raw.to_string();
            }
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            if secret_query {
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if secret(&k) {
                            "***".into()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => "<unparseable connection string>".to_string(),
    }
}

/// An error and its causes on one line, `error: cause: cause` (HTTP clients' own
/// messages are often just "error sending request"; the cause says why).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(&format!(": {s}"));
        source = s.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_as_they_are_read() {
        for (d, text) in [
            (Duration::from_secs(90 * 86_400), "90d"),
            (Duration::from_secs(7_200), "2h"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(600), "10m"),
            (Duration::from_millis(1_500), "1500ms"),
            (Duration::ZERO, "0s"),
        ] {
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text), Ok(d), "{text}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert!(parse_duration("30").is_err());
        assert_eq!(
            parse_duration_range("1m..10m").unwrap(),
            (Duration::from_secs(60), Duration::from_secs(600))
        );
        assert!(parse_duration_range("10m..1m").is_err());
    }

    #[test]
    fn redacts_password() {
        let r = redact_url("postgres://u:hunter2@db:5432/x");
        assert!(!r.contains("hunter2"));
        assert!(r.contains("***"));
        for url in [
            "postgres://u@db/x?password=hunter2",
            "postgres://u@db/x?sslmode=require&sslpassword=hunter2",
            "postgres://u@db/x?options=-c&PASSWORD=hunter2",
            "https://gw.example/?apikey=hunter2",
            "https://gw.example/?sig=hunter2",
        ] {
            let r = redact_url(url);
            assert!(!r.contains("hunter2"), "{r}");
            assert!(r.contains("***"), "{r}");
        }
        assert!(redact_url("postgres://u@db/x?sslmode=require").contains("sslmode=require"));
    }
}
