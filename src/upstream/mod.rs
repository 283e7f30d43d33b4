//! The provider's API (PatSnap Open Platform, R001): what its answers mean for a row.
//!
//! `classify` turns every answer — error code, HTTP status, transport failure — into
//! what the worker should do about it, per the table in `docs/provider-api.md`. The HTTP
//! client lives in `client`, document checks and file names in `document`.

pub mod client;
pub mod document;
pub mod download;
pub mod envelope;
pub mod links;
pub mod probe;

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Days, FixedOffset, NaiveTime, TimeZone, Utc};

use crate::domain::StopScope;

pub use client::{Client, ClientConfig, Credentials, Pacer, TaskStatus};
pub use download::Downloaded;
pub use links::{LinkRules, MemoryBudget, Reservation};

/// What the worker should do after an upstream call failed. The variants say what a
/// caller can do about it, not where the failure came from.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UpstreamError {
    /// This request is wrong (68300004, 68300007, 68300010, 67200012, or a document that
    /// can never be accepted): fail the row, do not retry.
    #[error("refused by the provider{}: {message}", code_suffix(*code))]
    Rejected { code: Option<i32>, message: String },
    /// Trouble on the way or on the provider's side: retry later, after `retry_after`
    /// when the answer names a delay. Does not spend an attempt.
    #[error("transient failure{}: {message}", code_suffix(*code))]
    Transient {
        code: Option<i32>,
        message: String,
        retry_after: Option<Duration>,
    },
    /// The task's download link (or what it served) is unusable: not the report (an
    /// HTML page, a ZIP that is not a DOCX), an insecure link or a redirect to a host
    /// that is not allowed, a download that did not finish in time. Worth a few tries;
    /// then the task is given up (a new task is an attempt).
    #[error("bad download: {message}")]
    BadDownload { message: String },
    /// 67200002: the account's QPS was exceeded. Slow down and retry; not the row's fault.
    #[error("rate limited (67200002): {message}")]
    RateLimited { message: String },
    /// HTTP 401 or 67200009: the token is no longer accepted; fetch a new one.
    #[error("token refused{}: {message}", code_suffix(*code))]
    Unauthorized { code: Option<i32>, message: String },
    /// 67200003: the key/secret was refused or the client disabled. Worth one fresh
    /// token; if it persists it is an account stop.
    #[error("credentials refused (67200003): {message}")]
    BadCredentials { message: String },
    /// The whole account must stop calling (balance, limits, permission, configuration);
    /// rows stay queued. `until` is set when the answer implies when to come back.
    /// `scope` is what the answer stops when it comes from a create: quota and balance
    /// stop new tasks only (polls of paid tasks go on); credentials, configuration and
    /// missing endpoints stop every call. Met on any other call, a stop stops them all.
    #[error("account-wide stop ({code}): {reason}")]
    AccountStop {
        code: i32,
        reason: String,
        until: Option<DateTime<Utc>>,
        scope: StopScope,
    },
}

/// Why a create did not return a job id, in the two classes that decide what it costs.
/// (A third class, *refused*, is `NotCreated(UpstreamError::Rejected { .. })`: the
/// request itself is wrong.)
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CreateError {
    /// The provider certainly made no task: the request never left (no connection, no
    /// token), or the answer is one that only comes before a task is made (see
    /// `CreateError::of_answer`). Retry freely: no attempt is spent.
    #[error("{0}")]
    NotCreated(UpstreamError),
    /// The request left and its answer does not prove that no task was made (a timeout
    /// or a reset after sending, a gateway's page, a 5xx, "busy, response timeout", a
    /// code not in the provider's table, a success whose job id cannot be read): a paid
    /// task may exist. This costs an attempt.
    #[error("no usable answer to the create, a paid task may exist: {0}")]
    Unknown(UpstreamError),
}

impl CreateError {
    pub fn error(&self) -> &UpstreamError {
        match self {
            CreateError::NotCreated(e) | CreateError::Unknown(e) => e,
        }
    }

    /// What a create's failed answer proves. Only answers that certainly mean no task
    /// was made give the attempt back: the request refused as invalid (68300004,
    /// 68300007, 68300010, 67200012), "too fast" (67200002), a refused token or apikey
    /// (HTTP 401, 67200003, 67200009), an account stop (67200000/1/4/5/6/7/8, HTTP 403)
    /// and an unknown API path (67200101, a bare HTTP 404) — the provider's gateway says
    /// these before the request reaches whatever makes tasks. Everything else counts
    /// the attempt: a gateway or server error may come after the provider made the task
    /// (67200100 "busy, response timeout", 6830000{5,6,8}, any 5xx page with or without
    /// a code, 408, 429, 499, any other status without a code, a code not listed, an
    /// unreadable body). When in doubt, the create made a task.
    ///
    /// This reads the error alone; `of_reply` first asks whether the reply itself can
    /// prove anything.
    pub fn of_answer(error: UpstreamError) -> CreateError {
        match error {
            UpstreamError::Rejected { .. }
            | UpstreamError::RateLimited { .. }
            | UpstreamError::Unauthorized { .. }
            | UpstreamError::BadCredentials { .. }
            | UpstreamError::AccountStop { .. } => CreateError::NotCreated(error),
            UpstreamError::Transient { .. } | UpstreamError::BadDownload { .. } => {
                CreateError::Unknown(error)
            }
        }
    }
}

impl CreateError {
    /// What a create's failed reply proves, from the reply as well as its error: only a
    /// reply the provider's own layers send can prove that no task was made — HTTP 2xx
    /// or 4xx with one of the provider's codes (`body_code`, at least 100000), or a bare
    /// 401, 403 or 404. A 5xx (or any status outside 2xx/4xx) with whatever body, and a
    /// body that carries an HTTP-like number as its code, prove nothing: the attempt
    /// counts (`Unknown`).
    pub fn of_reply(status: u16, body_code: Option<i64>, error: UpstreamError) -> CreateError {
        let provider_layer = matches!(status, 200..=299 | 400..=499)
            && match body_code {
                Some(code) => code >= 100_000,
                None => matches!(status, 401 | 403 | 404),
            };
        if provider_layer {
            CreateError::of_answer(error)
        } else {
            CreateError::Unknown(error)
        }
    }
}

fn code_suffix(code: Option<i32>) -> String {
    code.map(|c| format!(" ({c})")).unwrap_or_default()
}

impl UpstreamError {
    /// The provider's code (or the HTTP status) behind this error, for `last_error_code`.
    pub fn code(&self) -> Option<i32> {
        match self {
            UpstreamError::Rejected { code, .. }
            | UpstreamError::Transient { code, .. }
            | UpstreamError::Unauthorized { code, .. } => *code,
            UpstreamError::RateLimited { .. } => Some(67200002),
            UpstreamError::BadDownload { .. } => None,
            UpstreamError::BadCredentials { .. } => Some(67200003),
            UpstreamError::AccountStop { code, .. } => Some(*code),
        }
    }

    /// An account stop that stops every call.
    pub fn stop_all(code: i32, reason: impl Into<String>) -> UpstreamError {
        UpstreamError::AccountStop {
            code,
            reason: reason.into(),
            until: None,
            scope: StopScope::All,
        }
    }

    pub fn transient(message: impl Into<String>) -> UpstreamError {
        UpstreamError::Transient {
            code: None,
            message: message.into(),
            retry_after: None,
        }
    }
}

/// The provider's business day ends at midnight in Asia/Shanghai (UTC+8 all year:
/// China has no daylight saving time, so a fixed offset is exact).
pub fn next_shanghai_midnight(now: DateTime<Utc>) -> DateTime<Utc> {
    let shanghai = FixedOffset::east_opt(8 * 3600).expect("valid offset");
    let local_date = now.with_timezone(&shanghai).date_naive();
    let next = local_date
        .checked_add_days(Days::new(1))
        .expect("date in range")
        .and_time(NaiveTime::MIN);
    shanghai
        .from_local_datetime(&next)
        .single()
        .expect("fixed offsets are unambiguous")
        .with_timezone(&Utc)
}

/// How long after the provider's midnight a 67200007 is taken for a clock that lags
/// (the provider's day has not turned yet) rather than for today's limit.
pub const MIDNIGHT_SKEW: Duration = Duration::from_secs(10 * 60);

/// After the daily limit is met (67200007), when to try again: a few minutes after the
/// provider's next midnight (Asia/Shanghai), so that a provider whose clock lags a
/// little has turned its day too. Met within `MIDNIGHT_SKEW` after midnight, it is the
/// provider's clock lagging behind ours, not today's limit: no end is implied, and the
/// account stop's usual short probe schedule applies (`None`).
pub fn daily_limit_until(now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let next = next_shanghai_midnight(now);
    let last = next - chrono::Duration::days(1);
    let skew = chrono::Duration::from_std(MIDNIGHT_SKEW).expect("small");
    if now - last < skew {
        None
    } else {
        Some(next + chrono::Duration::minutes(3))
    }
}

/// What a provider error code means, per `docs/provider-api.md`. `now` fixes "the provider's
/// next day" for 67200007. Codes the table does not list are transient (and logged).
pub fn classify_code(code: i32, message: &str, now: DateTime<Utc>) -> UpstreamError {
    let message = if message.is_empty() {
        known_message(code).unwrap_or("no message").to_string()
    } else {
        message.to_string()
    };
    let stop = |until, scope| UpstreamError::AccountStop {
        code,
        reason: message.clone(),
        until,
        scope,
    };
    match code {
        68300004 | 68300007 | 68300010 | 67200012 => UpstreamError::Rejected {
            code: Some(code),
            message,
        },
        68300005 | 68300006 | 68300008 | 67200100 => UpstreamError::Transient {
            code: Some(code),
            message,
            retry_after: None,
        },
        67200002 => UpstreamError::RateLimited { message },
        67200003 => UpstreamError::BadCredentials { message },
        67200009 => UpstreamError::Unauthorized {
            code: Some(code),
            message,
        },
        67200007 => stop(daily_limit_until(now), StopScope::Create),
        // Quota, balance, validity, permission for the create API: new tasks only.
        67200000 | 67200001 | 67200004 | 67200005 | 67200006 => stop(None, StopScope::Create),
        // Configuration: no call can succeed.
        67200008 | 67200101 => stop(None, StopScope::All),
        _ => {
            tracing::warn!(code, %message, "unknown provider error code, treated as transient");
            UpstreamError::Transient {
                code: Some(code),
                message: format!("unknown error code: {message}"),
                retry_after: None,
            }
        }
    }
}

/// What an HTTP status means when the body carries no provider error code.
pub fn classify_http_status(status: u16, retry_after: Option<Duration>) -> UpstreamError {
    let code = Some(i32::from(status));
    match status {
        401 => UpstreamError::Unauthorized {
            code,
            message: "HTTP 401 Unauthorized".into(),
        },
        403 => UpstreamError::stop_all(403, "HTTP 403 Forbidden: no permission for this API"),
        404 => UpstreamError::stop_all(404, "HTTP 404 Not Found: check UPSTREAM_BASE_URL"),
        _ => UpstreamError::Transient {
            code,
            message: format!("HTTP {status}"),
            retry_after,
        },
    }
}

fn known_message(code: i32) -> Option<&'static str> {
    Some(match code {
        68300004 => "Invalid parameter!",
        68300005 => "Search api failure!",
        68300006 => "Analytic basic access error!",
        68300007 => "Bad request!",
        68300008 => "Service error, please try again later!",
        68300010 => "The file does not comply with upload specifications!",
        67200000 | 67200001 => "API call exceeds the total limit set by the platform!",
        67200002 => {
            "The current call rate is too fast, exceeding the current configuration limit QPS!"
        }
        67200003 => {
            "The key and secret parameters for applying for the token are incorrect or the client has been disabled!"
        }
        67200004 => {
            "The requested api does not have permission. Please contact our support personnel!"
        }
        67200005 => "Insufficient account balance/number of calls!",
        67200006 => "The client has exceeded the activation validity period!",
        67200007 => "The current call exceeds the configured usage limit of the day!",
        67200008 => {
            "Please check if the required apikey in the query parameter has been transmitted!"
        }
        67200009 => {
            "The apikey does not match the passed bearerToken. Please check if a valid token is being used!"
        }
        67200012 => "The request is illegal!",
        67200100 => "The current server status is busy, request response timeout!",
        67200101 => "The API requested currently does not exist. Please check the request path!",
        _ => return None,
    })
}

/// The provider's own text for a code, for the simulator and for messages.
pub fn provider_message(code: i32) -> &'static str {
    known_message(code).unwrap_or("Unknown error")
}

/// A secret that never shows itself in `Debug` or `Display` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The only way to read the value: at the point where it goes on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret::new(s))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-11-28T17:30:00Z".parse().unwrap()
    }

    #[test]
    fn every_code_in_the_table() {
        let rejected = [68300004, 68300007, 68300010, 67200012];
        let transient = [68300005, 68300006, 68300008, 67200100];
        let stops = [
            67200000, 67200001, 67200004, 67200005, 67200006, 67200008, 67200101,
        ];
        for c in rejected {
            assert!(
                matches!(classify_code(c, "", now()), UpstreamError::Rejected { code: Some(x), .. } if x == c),
                "{c}"
            );
        }
        for c in transient {
            assert!(
                matches!(classify_code(c, "", now()), UpstreamError::Transient { code: Some(x), .. } if x == c),
                "{c}"
            );
        }
        for c in stops {
            assert!(
                matches!(classify_code(c, "", now()), UpstreamError::AccountStop { code, until: None, .. } if code == c),
                "{c}"
            );
        }
        assert!(matches!(
            classify_code(67200002, "", now()),
            UpstreamError::RateLimited { .. }
        ));
        assert!(matches!(
            classify_code(67200003, "", now()),
            UpstreamError::BadCredentials { .. }
        ));
        assert!(matches!(
            classify_code(67200009, "", now()),
            UpstreamError::Unauthorized {
                code: Some(67200009),
                ..
            }
        ));
        // Unknown codes are transient.
        assert!(matches!(
            classify_code(12345, "", now()),
            UpstreamError::Transient {
                code: Some(12345),
                ..
            }
        ));
        // Messages default to the provider's text.
        assert!(
            classify_code(67200005, "", now())
                .to_string()
                .contains("Insufficient account balance")
        );
    }

    #[test]
    fn only_the_providers_own_refusals_prove_no_task_was_made() {
        let answer = |status: u16, body: &str| {
            let e = envelope::interpret(status, None, body.as_bytes(), now()).unwrap_err();
            CreateError::of_reply(status, envelope::error_code_of(body.as_bytes()), e)
        };
        let coded = |code: i64| format!(r#"{{"data":null,"status":false,"error_code":{code}}}"#);
        let not_created = |c: &CreateError| matches!(c, CreateError::NotCreated(_));
        for (status, body) in [
            (200, coded(67200002)),
            (429, coded(67200002)),
            (200, coded(68300004)),
            (403, coded(67200005)),
            (200, coded(67200009)),
            (401, String::new()),
            (404, "<html>not found</html>".into()),
            (403, String::new()),
        ] {
            assert!(not_created(&answer(status, &body)), "{status} {body}");
        }
        for (status, body) in [
            // A gateway's error page after the request got in, whatever it quotes.
            (500, coded(67200002)),
            (502, coded(68300004)),
            (503, coded(67200005)),
            (200, coded(67200100)),
            (200, coded(68300008)),
            (200, coded(12345678)),
            // An HTTP-like number in the body is not the provider's code.
            (200, coded(404)),
            (200, coded(401)),
            (429, String::new()),
            (408, String::new()),
            (499, "<html></html>".into()),
            (400, String::new()),
            (302, String::new()),
        ] {
            assert!(!not_created(&answer(status, &body)), "{status} {body}");
        }
    }

    #[test]
    fn daily_limit_waits_for_shanghai_midnight() {
        // 17:30 UTC is 01:30 next day in Shanghai: the stop lasts until a few minutes
        // after 16:00 UTC that day (the provider's next midnight).
        match classify_code(67200007, "", now()) {
            UpstreamError::AccountStop { until: Some(u), .. } => {
                assert_eq!(u, "2026-11-29T16:03:00Z".parse::<DateTime<Utc>>().unwrap())
            }
            other => panic!("{other:?}"),
        }
        // Just after midnight in Shanghai, a 67200007 is a provider clock that lags:
        // a short backoff, not a whole day.
        for after in ["2026-11-28T16:00:05Z", "2026-11-28T16:09:00Z"] {
            let t: DateTime<Utc> = after.parse().unwrap();
            assert_eq!(daily_limit_until(t), None, "{after}");
        }
        let later: DateTime<Utc> = "2026-11-28T16:11:00Z".parse().unwrap();
        assert_eq!(
            daily_limit_until(later),
            Some("2026-11-29T16:03:00Z".parse().unwrap())
        );
        let before: DateTime<Utc> = "2026-11-28T15:59:59Z".parse().unwrap();
        assert_eq!(
            next_shanghai_midnight(before),
            "2026-11-28T16:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
    }

    #[test]
    fn every_http_status() {
        assert!(matches!(
            classify_http_status(401, None),
            UpstreamError::Unauthorized {
                code: Some(401),
                ..
            }
        ));
        assert!(matches!(
            classify_http_status(403, None),
            UpstreamError::AccountStop { code: 403, .. }
        ));
        assert!(matches!(
            classify_http_status(404, None),
            UpstreamError::AccountStop { code: 404, .. }
        ));
        for s in [429, 500, 502, 503, 504, 400, 418] {
            assert!(
                matches!(
                    classify_http_status(s, None),
                    UpstreamError::Transient { .. }
                ),
                "{s}"
            );
        }
        let r = classify_http_status(429, Some(Duration::from_secs(3)));
        assert!(
            matches!(r, UpstreamError::Transient { retry_after: Some(d), .. } if d == Duration::from_secs(3))
        );
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?} {s}").contains("hunter2"));
    }
}
