//! The rules a download keeps to, and the memory it may use: which links and redirects
//! are acceptable (scheme, hosts), and the process-wide budget for documents held in
//! memory. Used by the HTTP client (its redirect policy) and by the download itself.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Redirects a download may follow (each to an allowed host).
const MAX_REDIRECTS: usize = 5;

/// What a download's memory is reserved in before its size is known (no
/// Content-Length): grown as bytes arrive.
pub(super) const FIRST_RESERVATION: u64 = 1024 * 1024;

/// Which links a download may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkRules {
    /// Only https links and redirects (the provider's base URL is https); plain http is
    /// accepted only when the base URL is plain http (a local simulator).
    pub https_only: bool,
    /// Hosts the link and its redirects may point at: exact names, or `*.suffix` for a
    /// domain and its subdomains. Empty: the link's own host, and redirects stay on it.
    pub hosts: Vec<String>,
}

impl LinkRules {
    /// Whether `url` may be fetched, as the first link (`origin` None) or as a redirect
    /// from `origin`. The reason when not.
    pub fn check(&self, url: &url::Url, origin: Option<&url::Url>) -> Result<(), String> {
        match url.scheme() {
            "https" => {}
            "http" if !self.https_only => {}
            other => {
                return Err(format!(
                    "a {other}:// download link, where https is required"
                ));
            }
        }
        let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
        let allowed = if self.hosts.is_empty() {
            origin.is_none_or(|o| o.host_str().is_some_and(|h| h.eq_ignore_ascii_case(&host)))
        } else {
            self.hosts
                .iter()
                .any(|pattern| host_matches(pattern, &host))
        };
        if allowed {
            Ok(())
        } else {
            Err(format!(
                "a download link to host {host:?}, which is not allowed (UPSTREAM_DOWNLOAD_HOSTS)"
            ))
        }
    }
}

fn host_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.trim().to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(domain) => host == domain || host.ends_with(&format!(".{domain}")),
        None => host == pattern,
    }
}

/// A redirect policy that applies `LinkRules` to every hop.
pub(super) fn redirect_policy(rules: LinkRules) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
        }
        let origin = attempt.previous().first().cloned();
        match rules.check(attempt.url(), origin.as_ref()) {
            Ok(()) => attempt.follow(),
            Err(why) => attempt.error(why),
        }
    })
}

/// The bytes every download of the process may hold in memory at once.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    bytes: Arc<Semaphore>,
    pub(super) total: u64,
}

/// Memory held for one document until it is stored (dropping it gives it back).
#[derive(Debug)]
pub struct Reservation {
    permit: Option<OwnedSemaphorePermit>,
    pub(super) bytes: u64,
}

impl MemoryBudget {
    pub fn new(total: u64) -> MemoryBudget {
        let total = total.clamp(1, Semaphore::MAX_PERMITS as u64);
        MemoryBudget {
            bytes: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// Waits until `bytes` are free (never more than the whole budget).
    pub async fn reserve(&self, bytes: u64) -> Reservation {
        let bytes = bytes.clamp(1, self.total);
        let permit = self
            .bytes
            .clone()
            .acquire_many_owned(bytes as u32)
            .await
            .ok();
        Reservation { permit, bytes }
    }

    /// Grows a reservation to `bytes` if that much is free now; never waits (two
    /// downloads waiting for each other's memory would wait forever).
    pub(super) fn grow(&self, reservation: &mut Reservation, bytes: u64) -> bool {
        if bytes <= reservation.bytes {
            return true;
        }
        if bytes > self.total {
            return false;
        }
        match self
            .bytes
            .clone()
            .try_acquire_many_owned((bytes - reservation.bytes) as u32)
        {
            Ok(more) => {
                match reservation.permit.as_mut() {
                    Some(permit) => permit.merge(more),
                    None => reservation.permit = Some(more),
                }
                reservation.bytes = bytes;
                true
            }
            Err(_) => false,
        }
    }

    /// Bytes free right now.
    pub fn available(&self) -> u64 {
        self.bytes.available_permits() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> url::Url {
        url::Url::parse(s).unwrap()
    }

    #[test]
    fn links_keep_to_scheme_and_hosts() {
        let strict = LinkRules {
            https_only: true,
            hosts: vec![],
        };
        let cos = url("https://bucket.cos.ap-beijing.myqcloud.com/r.pdf");
        assert!(strict.check(&cos, None).is_ok());
        assert!(
            strict
                .check(
                    &url("http://bucket.cos.ap-beijing.myqcloud.com/r.pdf"),
                    None
                )
                .is_err()
        );
        assert!(strict.check(&url("ftp://x/r.pdf"), None).is_err());
        // Redirects stay on the link's host unless hosts are listed.
        assert!(
            strict
                .check(
                    &url("https://bucket.cos.ap-beijing.myqcloud.com/other"),
                    Some(&cos)
                )
                .is_ok()
        );
        assert!(
            strict
                .check(&url("https://evil.example/r.pdf"), Some(&cos))
                .is_err()
        );
        let listed = LinkRules {
            https_only: true,
            hosts: vec!["*.myqcloud.com".into(), "cdn.example.com".into()],
        };
        assert!(
            listed
                .check(&url("https://a.b.myqcloud.com/x"), Some(&cos))
                .is_ok()
        );
        assert!(listed.check(&url("https://myqcloud.com/x"), None).is_ok());
        assert!(
            listed
                .check(&url("https://cdn.example.com/x"), Some(&cos))
                .is_ok()
        );
        assert!(
            listed
                .check(&url("https://notmyqcloud.com/x"), None)
                .is_err()
        );
        assert!(listed.check(&url("https://evil.example/x"), None).is_err());
        let local = LinkRules {
            https_only: false,
            hosts: vec![],
        };
        assert!(local.check(&url("http://127.0.0.1:9/r.pdf"), None).is_ok());
    }

    #[tokio::test]
    async fn the_memory_budget_is_shared_and_given_back() {
        let budget = MemoryBudget::new(1000);
        let a = budget.reserve(600).await;
        assert_eq!(budget.available(), 400);
        let mut b = budget.reserve(300).await;
        assert!(
            !budget.grow(&mut b, 800),
            "growing never waits for memory held elsewhere"
        );
        assert!(budget.grow(&mut b, 400));
        assert_eq!(budget.available(), 0);
        drop(a);
        assert!(budget.grow(&mut b, 1000));
        drop(b);
        assert_eq!(budget.available(), 1000);
        // A document larger than the whole budget reserves all of it, not more.
        let all = budget.reserve(5000).await;
        assert_eq!(all.bytes, 1000);
    }
}
