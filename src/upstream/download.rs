//! Downloading a report from its pre-signed link, defensively: the link and every
//! redirect keep to the link rules (`links`), the whole download has a deadline, and
//! the bytes held in memory by all downloads of the process stay within a budget. What
//! comes back is verified as the report that was asked for.

use futures_util::StreamExt;
use reqwest::header::CONTENT_DISPOSITION;

use super::client::{Client, transport_error};
use super::links::{FIRST_RESERVATION, Reservation};
use super::{UpstreamError, document};
use crate::domain::{JobId, ReportType};
use crate::spool::{SPILL_AT, Spool};

/// A verified report, not yet stored: its bytes in a spool, and the memory the spool
/// holds (until it is stored).
#[derive(Debug)]
pub struct Downloaded {
    pub spool: Spool,
    pub content_type: &'static str,
    pub file_name: String,
    /// The company the provider's file name names (`document::company_in_file_name`),
    /// read from the name as served; `None` when the name had to be changed to be
    /// stored safely (a '/' in the company's name cuts it, say), so it teaches nothing.
    pub provider_company: Option<String>,
    pub report_type: ReportType,
    pub reservation: Reservation,
}

impl Client {
    /// Downloads a report link (no auth header: the link is pre-signed) under the
    /// link rules, the size cap, the deadline and the memory budget, and verifies it is
    /// the report that was asked for. A link that breaks the rules, a body that is not
    /// the report, or a download that does not finish in time is `BadDownload`.
    pub async fn download(
        &self,
        link: &str,
        expected: ReportType,
        job: Option<&JobId>,
    ) -> Result<Downloaded, UpstreamError> {
        let deadline = self.config().download_timeout;
        match tokio::time::timeout(deadline, self.fetch(link, expected, job)).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::BadDownload {
                message: format!(
                    "the download did not finish within {}",
                    humantime::format_duration(deadline)
                ),
            }),
        }
    }

    async fn fetch(
        &self,
        link: &str,
        expected: ReportType,
        job: Option<&JobId>,
    ) -> Result<Downloaded, UpstreamError> {
        let config = self.config();
        let bad = |message: String| UpstreamError::BadDownload { message };
        let url =
            url::Url::parse(link).map_err(|e| bad(format!("an unusable download link: {e}")))?;
        config.link_rules().check(&url, None).map_err(bad)?;
        let cap = config.max_download_bytes;
        let too_large = || UpstreamError::Rejected {
            code: None,
            message: format!("the report is larger than the download cap of {cap} bytes"),
        };
        let response = self.downloads().get(url).send().await.map_err(|e| {
            if e.is_redirect() {
                bad(format!(
                    "a download redirect that is not allowed: {}",
                    e.without_url()
                ))
            } else {
                transport_error(e)
            }
        })?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(UpstreamError::Transient {
                code: Some(i32::from(status)),
                message: format!("download answered HTTP {status}"),
                retry_after: None,
            });
        }
        if response.content_length().is_some_and(|n| n > cap) {
            return Err(too_large());
        }
        let disposition = response.headers().get(CONTENT_DISPOSITION).and_then(|v| {
            v.to_str()
                .ok()
                .map(str::to_owned)
                .or_else(|| Some(String::from_utf8_lossy(v.as_bytes()).into_owned()))
        });
        // Memory is held only for what stays in memory: a document past SPILL_AT goes to
        // a temporary file as it arrives.
        let in_memory = |len: u64| len.min(SPILL_AT as u64);
        let budget = self.memory();
        let mut reservation = budget
            .reserve(in_memory(
                response.content_length().unwrap_or(FIRST_RESERVATION),
            ))
            .await;
        let mut spool = Spool::default();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(transport_error)?;
            let needed = spool.len() + chunk.len() as u64;
            if needed > cap {
                return Err(too_large());
            }
            // Grow in doubling steps up to what stays in memory (never waiting: that
            // could deadlock with other downloads).
            let target = in_memory((reservation.bytes * 2).max(needed)).min(budget.total);
            if in_memory(needed) > reservation.bytes && !budget.grow(&mut reservation, target) {
                return Err(UpstreamError::transient(
                    "the process's memory budget for documents (UPSTREAM_DOWNLOAD_MEMORY) is full; retrying later",
                ));
            }
            spool
                .write(&chunk)
                .map_err(|e| UpstreamError::transient(format!("cannot spool the download: {e}")))?;
        }
        document::check_spool(&mut spool, expected)
            .map_err(|why| bad(format!("download is not a report: {why}")))?;
        let raw_name = disposition
            .as_deref()
            .and_then(document::filename_from_disposition)
            .or_else(|| document::filename_from_url(link))
            .unwrap_or_default();
        let file_name = document::sanitize_file_name(&raw_name, expected, job);
        let provider_company = if file_name == raw_name {
            document::company_in_file_name(&raw_name)
        } else {
            None
        };
        Ok(Downloaded {
            spool,
            content_type: expected.content_type(),
            file_name,
            provider_company,
            report_type: expected,
            reservation,
        })
    }
}
