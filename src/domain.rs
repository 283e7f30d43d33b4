//! Validated values at the edges: a request the queue will accept, the report type,
//! the provider's job id, a row's state, the scope of an account stop, a verified
//! document. The database enforces the same rules with named constraints; these types
//! exist so that bad values cannot travel inward, and so that the command line and the
//! CSV loader can say what is wrong with a line before it reaches the database.
//!
//! This module depends on nothing else in the crate (only on the `url` crate, to read
//! a webhook address).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Why a value is not acceptable, naming the field it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidValue {
    #[error("{field} contains a NUL character")]
    Nul { field: &'static str },
    #[error("{field} contains a control character: {value:?}")]
    ControlCharacter { field: &'static str, value: String },
    #[error("{field} is {chars} characters long, at most {max} allowed")]
    TooLong {
        field: &'static str,
        chars: usize,
        max: usize,
    },
    #[error("credit_code must be 18 digits or capital letters, got {0:?}")]
    CreditCode(String),
    #[error("at least one of company_name, credit_code, org_number is required")]
    NoIdentifier,
    #[error("max_attempts must be between 1 and 100, got {0}")]
    MaxAttempts(i32),
    #[error("metadata must be a JSON object")]
    MetadataNotObject,
    #[error("report type must be word or pdf, not {0:?}")]
    ReportType(String),
    #[error(
        "request state must be one of queued, generating, succeeded, failed, cancelled, not {0:?}"
    )]
    State(String),
    #[error("account stop scope must be create or all, not {0:?}")]
    StopScope(String),
    #[error("{0}")]
    JobId(String),
    #[error("callback_url must be an http:// or https:// address, not {0:?}")]
    CallbackUrl(String),
}

/// The two document formats the provider produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportType {
    Word,
    Pdf,
}

impl ReportType {
    pub fn as_str(self) -> &'static str {
        match self {
            ReportType::Word => "word",
            ReportType::Pdf => "pdf",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            ReportType::Word => {
                "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
            }
            ReportType::Pdf => "application/pdf",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            ReportType::Word => "docx",
            ReportType::Pdf => "pdf",
        }
    }
}

impl fmt::Display for ReportType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ReportType {
    type Err = InvalidValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "word" | "docx" => Ok(ReportType::Word),
            "pdf" => Ok(ReportType::Pdf),
            _ => Err(InvalidValue::ReportType(clip(s))),
        }
    }
}

/// The database stores the lowercase name; anything else is a corrupt row.
impl TryFrom<String> for ReportType {
    type Error = InvalidValue;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        match s.as_str() {
            "word" => Ok(ReportType::Word),
            "pdf" => Ok(ReportType::Pdf),
            _ => Err(InvalidValue::ReportType(clip(&s))),
        }
    }
}

/// Where a row is in its life (`report_requests.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestState {
    /// Waits for (another) upstream task.
    Queued,
    /// Has a live upstream task that is polled.
    Generating,
    Succeeded,
    Failed,
    Cancelled,
}

impl RequestState {
    pub const ALL: [RequestState; 5] = [
        RequestState::Queued,
        RequestState::Generating,
        RequestState::Succeeded,
        RequestState::Failed,
        RequestState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RequestState::Queued => "queued",
            RequestState::Generating => "generating",
            RequestState::Succeeded => "succeeded",
            RequestState::Failed => "failed",
            RequestState::Cancelled => "cancelled",
        }
    }

    /// Succeeded, failed or cancelled: the worker will not touch the row again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RequestState::Succeeded | RequestState::Failed | RequestState::Cancelled
        )
    }
}

impl fmt::Display for RequestState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RequestState {
    type Err = InvalidValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RequestState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| InvalidValue::State(clip(s)))
    }
}

impl TryFrom<String> for RequestState {
    type Error = InvalidValue;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// What an account-wide stop stops (`report_account_stops.scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StopScope {
    /// New upstream tasks only (balance, quota): polls of paid tasks go on.
    Create,
    /// Every call (credentials, permission, configuration, or polls refused too).
    All,
}

impl StopScope {
    pub fn as_str(self) -> &'static str {
        match self {
            StopScope::Create => "create",
            StopScope::All => "all",
        }
    }
}

impl fmt::Display for StopScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for StopScope {
    type Error = InvalidValue;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        match s.as_str() {
            "create" => Ok(StopScope::Create),
            "all" => Ok(StopScope::All),
            _ => Err(InvalidValue::StopScope(clip(&s))),
        }
    }
}

/// The provider's `job_id`: a 64-bit integer kept as its exact decimal digits, never
/// passed through a float (a float turns 1579434053399035904 into 1579434053399036000).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(String);

impl JobId {
    /// Accepts 1 to 20 ASCII digits that fit in a u64 (the provider's ids are positive).
    pub fn parse(digits: &str) -> Result<JobId, InvalidValue> {
        if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidValue::JobId(format!(
                "job id must be decimal digits, got {:?}",
                clip(digits)
            )));
        }
        let value: u64 = digits
            .parse()
            .map_err(|_| InvalidValue::JobId(format!("job id {digits} does not fit in 64 bits")))?;
        // Normalise leading zeros away so the same id always reads the same.
        Ok(JobId(value.to_string()))
    }

    /// From a JSON value: a number (exact digits through serde_json's integer path) or
    /// a string of digits. Floats, negatives and anything else are malformed answers.
    pub fn from_json(value: &serde_json::Value) -> Result<JobId, InvalidValue> {
        match value {
            serde_json::Value::Number(n) => match n.as_u64() {
                Some(v) => Ok(JobId(v.to_string())),
                None => Err(InvalidValue::JobId(format!(
                    "job id {n} is not a positive 64-bit integer"
                ))),
            },
            serde_json::Value::String(s) => JobId::parse(s.trim()),
            other => Err(InvalidValue::JobId(format!(
                "job id has the wrong type: {}",
                clip(&other.to_string())
            ))),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for JobId {
    type Error = InvalidValue;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        JobId::parse(&s)
    }
}

/// A verified report, exactly as the provider served it, as its row describes it.
#[derive(Clone, PartialEq, Eq)]
pub struct Document {
    pub content_type: &'static str,
    pub file_name: String,
    pub sha256: String,
    pub byte_size: u64,
    pub body: DocumentBody,
    /// The company the provider's file name names, read before the name was made safe
    /// to store; `None` when making it safe changed it (it teaches nothing then).
    pub provider_company: Option<String>,
}

/// Where a document's bytes are.
#[derive(Clone, PartialEq, Eq)]
pub enum DocumentBody {
    /// In the row itself (`report_documents.content`).
    Inline(Vec<u8>),
    /// In object storage under this key (already written and checked).
    Stored { key: String },
}

impl Document {
    /// The bytes, when they travel with the row.
    pub fn content(&self) -> Option<&[u8]> {
        match &self.body {
            DocumentBody::Inline(bytes) => Some(bytes),
            DocumentBody::Stored { .. } => None,
        }
    }

    /// The object key, when the bytes are in object storage.
    pub fn object_key(&self) -> Option<&str> {
        match &self.body {
            DocumentBody::Inline(_) => None,
            DocumentBody::Stored { key } => Some(key),
        }
    }
}

impl fmt::Debug for Document {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Document")
            .field("bytes", &self.byte_size)
            .field("content_type", &self.content_type)
            .field("file_name", &self.file_name)
            .field("sha256", &self.sha256)
            .field("object_key", &self.object_key())
            .finish()
    }
}

/// "Now", as one side of a conversation sees it: the real clock shifted by a fixed
/// offset. Zero in production; tests and the simulator shift it to stand just before
/// or after the provider's midnight, or to give the provider a clock that lags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Clock {
    pub offset: chrono::Duration,
}

impl Clock {
    pub fn shifted(offset: chrono::Duration) -> Clock {
        Clock { offset }
    }

    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.offset
    }
}

/// Shortens a hostile value before it is quoted in an error message.
pub fn clip(s: &str) -> String {
    clip_to(s, 60)
}

/// `s` as one word for a POSIX shell: as it is when nothing in it is special, else in
/// single quotes — so a command printed for pasting works whatever a name holds.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_alphanumeric() || "/._-=:,@+%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// `n` and the noun, singular for one: "1 time", "2 times", "1 batch", "3 batches".
pub fn counted(n: impl Into<i64>, noun: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("1 {noun}")
    } else if noun.ends_with("ch") || noun.ends_with('s') || noun.ends_with('x') {
        format!("{n} {noun}es")
    } else {
        format!("{n} {noun}s")
    }
}

/// `clip` at `max` characters: the provider's own messages (the longest it documents
/// is about 105 characters) are kept whole up to 300.
pub fn clip_to(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let head: String = s.chars().take(max).collect();
        format!("{head}…")
    }
}

/// A request as an application (or the CSV loader) hands it to the queue, already
/// trimmed and checked against the same rules as the table's constraints.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRequest {
    pub company_name: Option<String>,
    pub credit_code: Option<String>,
    pub org_number: Option<String>,
    pub report_type: ReportType,
    pub priority: i16,
    pub run_after: Option<DateTime<Utc>>,
    pub max_attempts: Option<i32>,
    pub dedupe_key: Option<String>,
    pub metadata: Option<serde_json::Value>,
    /// The batch it belongs to (a CSV file, an order).
    pub batch: Option<String>,
    /// Where to POST its outcome when it finishes.
    pub callback_url: Option<String>,
}

/// Limits shared with the migration's CHECK constraints.
pub const COMPANY_NAME_MAX_CHARS: usize = 200;
pub const ORG_NUMBER_MAX_CHARS: usize = 32;
pub const DEDUPE_KEY_MAX_CHARS: usize = 255;

impl NewRequest {
    /// Builds a request from raw text fields: trims each identifier (blank means "not
    /// given") and refuses what the table would refuse, naming the field.
    pub fn new(
        company_name: Option<&str>,
        credit_code: Option<&str>,
        org_number: Option<&str>,
        report_type: ReportType,
    ) -> Result<NewRequest, InvalidValue> {
        let company_name = identifier("company_name", company_name, COMPANY_NAME_MAX_CHARS)?;
        let credit_code = identifier("credit_code", credit_code, 64)?;
        let org_number = identifier("org_number", org_number, ORG_NUMBER_MAX_CHARS)?;
        if let Some(code) = credit_code.as_deref().filter(|c| !is_credit_code(c)) {
            return Err(InvalidValue::CreditCode(clip(code)));
        }
        if company_name.is_none() && credit_code.is_none() && org_number.is_none() {
            return Err(InvalidValue::NoIdentifier);
        }
        Ok(NewRequest {
            company_name,
            credit_code,
            org_number,
            report_type,
            priority: 0,
            run_after: None,
            max_attempts: None,
            dedupe_key: None,
            metadata: None,
            batch: None,
            callback_url: None,
        })
    }

    pub fn with_dedupe_key(mut self, key: Option<&str>) -> Result<NewRequest, InvalidValue> {
        self.dedupe_key = match key.map(str::trim).filter(|k| !k.is_empty()) {
            None => None,
            Some(k) => {
                check_text("dedupe_key", k, DEDUPE_KEY_MAX_CHARS)?;
                Some(k.to_string())
            }
        };
        Ok(self)
    }

    pub fn with_max_attempts(mut self, max: Option<i32>) -> Result<NewRequest, InvalidValue> {
        if let Some(m) = max.filter(|m| !(1..=100).contains(m)) {
            return Err(InvalidValue::MaxAttempts(m));
        }
        self.max_attempts = max;
        Ok(self)
    }

    pub fn with_metadata(
        mut self,
        metadata: Option<serde_json::Value>,
    ) -> Result<NewRequest, InvalidValue> {
        if metadata.as_ref().is_some_and(|m| !m.is_object()) {
            return Err(InvalidValue::MetadataNotObject);
        }
        self.metadata = metadata;
        Ok(self)
    }

    pub fn with_batch(mut self, batch: Option<&str>) -> Result<NewRequest, InvalidValue> {
        self.batch = match batch.map(str::trim).filter(|b| !b.is_empty()) {
            None => None,
            Some(b) => {
                check_text("batch", b, BATCH_MAX_CHARS)?;
                Some(b.to_string())
            }
        };
        Ok(self)
    }

    pub fn with_callback_url(mut self, url: Option<&str>) -> Result<NewRequest, InvalidValue> {
        self.callback_url = match url.map(str::trim).filter(|u| !u.is_empty()) {
            None => None,
            Some(u) => Some(callback_url(u)?),
        };
        Ok(self)
    }
}

pub const BATCH_MAX_CHARS: usize = 200;
pub const CALLBACK_URL_MAX_CHARS: usize = 2048;

/// A webhook address: http or https, a host, no whitespace or control characters, at
/// most 2048 characters (what `report_requests_callback_url_*` accept).
pub fn callback_url(raw: &str) -> Result<String, InvalidValue> {
    check_text("callback_url", raw, CALLBACK_URL_MAX_CHARS)?;
    let bad = || InvalidValue::CallbackUrl(clip(raw));
    let url = url::Url::parse(raw).map_err(|_| bad())?;
    if !matches!(url.scheme(), "http" | "https")
        || url.host_str().is_none_or(str::is_empty)
        || raw.chars().any(char::is_whitespace)
        || !raw
            .to_ascii_lowercase()
            .starts_with(&format!("{}://", url.scheme()))
    {
        return Err(bad());
    }
    Ok(raw.to_string())
}

/// A unified social credit code: exactly 18 ASCII digits or capital letters.
pub fn is_credit_code(code: &str) -> bool {
    code.len() == 18
        && code
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
}

/// Whitespace the table refuses around identifiers: ASCII space and controls, the
/// no-break space and the ideographic (full-width) space common in Chinese data.
fn is_padding(c: char) -> bool {
    c.is_whitespace() || c == '\u{a0}' || c == '\u{3000}'
}

fn identifier(
    field: &'static str,
    raw: Option<&str>,
    max_chars: usize,
) -> Result<Option<String>, InvalidValue> {
    let Some(value) = raw
        .map(|v| v.trim_matches(is_padding))
        .filter(|v| !v.is_empty())
    else {
        return Ok(None);
    };
    check_text(field, value, max_chars)?;
    Ok(Some(value.to_string()))
}

fn check_text(field: &'static str, value: &str, max_chars: usize) -> Result<(), InvalidValue> {
    if value.contains('\0') {
        return Err(InvalidValue::Nul { field });
    }
    if value.chars().any(char::is_control) {
        return Err(InvalidValue::ControlCharacter {
            field,
            value: clip(value),
        });
    }
    let chars = value.chars().count();
    if chars > max_chars {
        return Err(InvalidValue::TooLong {
            field,
            chars,
            max: max_chars,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_survive_a_shell() {
        assert_eq!(shell_quote("companies.csv"), "companies.csv");
        assert_eq!(shell_quote("小米"), "小米");
        assert_eq!(
            shell_quote("companies.csv 2026-12-01T07:41:38Z"),
            "'companies.csv 2026-12-01T07:41:38Z'"
        );
        assert_eq!(shell_quote("it's $HOME"), "'it'\\''s $HOME'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn counts_read_as_english() {
        assert_eq!(counted(1, "time"), "1 time");
        assert_eq!(counted(2, "time"), "2 times");
        assert_eq!(counted(0, "request"), "0 requests");
        assert_eq!(counted(3, "batch"), "3 batches");
    }

    #[test]
    fn job_id_keeps_exact_digits() {
        let v: serde_json::Value = serde_json::from_str("1579434053399035904").unwrap();
        assert_eq!(
            JobId::from_json(&v).unwrap().as_str(),
            "1579434053399035904"
        );
        let s = serde_json::Value::String("1579434053399035904".into());
        assert_eq!(
            JobId::from_json(&s).unwrap().as_str(),
            "1579434053399035904"
        );
        assert_eq!(
            JobId::parse("18446744073709551615").unwrap().as_str(),
            "18446744073709551615"
        );
    }

    #[test]
    fn job_id_refuses_non_integers() {
        for bad in [
            "1.5e18",
            "-1",
            "1.0",
            "null",
            "true",
            "[1]",
            "{}",
            "\"\"",
            "\"12a\"",
            "18446744073709551616",
        ] {
            let v: serde_json::Value = serde_json::from_str(bad).unwrap();
            assert!(JobId::from_json(&v).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn new_request_trims_and_validates() {
        let r = NewRequest::new(
            Some(" 小米科技有限责任公司\u{3000}"),
            Some(""),
            None,
            ReportType::Pdf,
        )
        .unwrap();
        assert_eq!(r.company_name.as_deref(), Some("小米科技有限责任公司"));
        assert_eq!(r.credit_code, None);
        assert!(
            NewRequest::new(None, Some("  "), None, ReportType::Pdf)
                .unwrap_err()
                .to_string()
                .contains("at least one")
        );
        assert!(
            NewRequest::new(None, Some("91110108551385082q"), None, ReportType::Pdf)
                .unwrap_err()
                .to_string()
                .contains("credit_code")
        );
        assert!(
            NewRequest::new(Some("a\u{7}b"), None, None, ReportType::Pdf)
                .unwrap_err()
                .to_string()
                .contains("control")
        );
        assert!(
            NewRequest::new(Some("a\0b"), None, None, ReportType::Pdf)
                .unwrap_err()
                .to_string()
                .contains("NUL")
        );
        let long = "x".repeat(201);
        assert!(
            NewRequest::new(Some(&long), None, None, ReportType::Pdf)
                .unwrap_err()
                .to_string()
                .contains("at most 200")
        );
    }

    #[test]
    fn report_type_parses() {
        assert_eq!("PDF".parse::<ReportType>().unwrap(), ReportType::Pdf);
        assert_eq!(" word ".parse::<ReportType>().unwrap(), ReportType::Word);
        assert!("xls".parse::<ReportType>().is_err());
    }
}

/// The byte-order mark that tells a spreadsheet a CSV file is UTF-8 (Excel on Windows
/// otherwise reads it in the local code page, and Chinese comes out garbled).
pub const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// A CSV cell a spreadsheet reads as the text it is: one that starts with `=`, `+`, `-`,
/// `@`, a tab or a carriage return would be taken for a formula (and run), so it is
/// prefixed with `'`, which Excel and LibreOffice show as nothing but text.
pub fn spreadsheet_cell(cell: &str) -> std::borrow::Cow<'_, str> {
    match cell.chars().next() {
        // The full-width forms too: some spreadsheets read them as the ASCII ones.
        Some('=' | '+' | '-' | '@' | '\t' | '\r' | '＝' | '＋' | '－' | '＠') => {
            format!("'{cell}").into()
        }
        _ => cell.into(),
    }
}

#[cfg(test)]
mod spreadsheet_tests {
    use super::spreadsheet_cell;

    #[test]
    fn formulas_are_shown_as_text() {
        for (cell, shown) in [
            ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"),
            ("+1", "'+1"),
            ("-2", "'-2"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\tx", "'\tx"),
            ("＝1+1", "'＝1+1"),
            ("小米科技有限责任公司", "小米科技有限责任公司"),
            ("91110108551385082Q", "91110108551385082Q"),
            ("", ""),
        ] {
            assert_eq!(spreadsheet_cell(cell), shown);
        }
    }
}
