//! A downloaded report: its bytes checked against the expected type, its file name
//! taken from the content disposition and made safe, its sha256.

use std::io::{Cursor, Read, Seek};

use percent_encoding::percent_decode_str;
use sha2::{Digest, Sha256};

use crate::domain::{JobId, ReportType, clip};
use crate::spool::Spool;

/// Why a downloaded body is not the report that was asked for (an HTML error page, a
/// truncated PDF, a ZIP that is not a DOCX…).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotAReport(pub String);

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Why a body is not the report that was asked for.
pub fn check_report(bytes: &[u8], expected: ReportType) -> Result<(), NotAReport> {
    let tail = &bytes[bytes.len().saturating_sub(1024)..];
    check(bytes, tail, || Ok(Cursor::new(bytes)), expected).map_err(NotAReport)
}

/// `check_report` for a spooled download: the start and end are at hand, and a DOCX's
/// ZIP directory is read from the spool (memory or temporary file) without loading it.
pub fn check_spool(spool: &mut Spool, expected: ReportType) -> Result<(), NotAReport> {
    let (head, tail) = (spool.head().to_vec(), spool.tail().to_vec());
    check(&head, &tail, || spool.reader(), expected).map_err(NotAReport)
}

/// Why a body that starts with `head` and ends with `tail` is not the report asked for;
/// `body` opens the whole of it (only a DOCX needs it).
fn check<R: Read + Seek>(
    head: &[u8],
    tail: &[u8],
    body: impl FnOnce() -> std::io::Result<R>,
    expected: ReportType,
) -> Result<(), String> {
    match expected {
        ReportType::Pdf => {
            if !head.starts_with(b"%PDF-") {
                return Err(format!(
                    "not a PDF: the body starts with {}",
                    describe_start(head)
                ));
            }
            // A truncated PDF has no end-of-file marker near its end.
            if !tail.windows(5).any(|w| w == b"%%EOF") {
                return Err("truncated PDF: no %%EOF marker at the end".into());
            }
            Ok(())
        }
        ReportType::Word => {
            if !head.starts_with(b"PK\x03\x04") {
                return Err(format!(
                    "not a DOCX: the body starts with {}",
                    describe_start(head)
                ));
            }
            let reader = body().map_err(|e| format!("cannot read the download back: {e}"))?;
            let archive = zip::ZipArchive::new(reader)
                .map_err(|e| format!("not a DOCX: unreadable ZIP ({e})"))?;
            for part in ["[Content_Types].xml", "word/document.xml"] {
                if archive.index_for_name(part).is_none() {
                    return Err(format!("not a DOCX: the ZIP has no {part}"));
                }
            }
            Ok(())
        }
    }
}

fn describe_start(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(40)];
    let text = String::from_utf8_lossy(head);
    if bytes.is_empty() {
        "nothing (empty body)".into()
    } else {
        format!("{:?}", clip(text.trim()))
    }
}

/// The file name in a `Content-Disposition` value: RFC 5987/6266 `filename*=UTF-8''…`
/// wins over a plain `filename=`. Returns the raw (unsanitised) name.
pub fn filename_from_disposition(value: &str) -> Option<String> {
    let mut plain = None;
    let mut extended = None;
    for param in split_params(value) {
        let Some((key, val)) = param.split_once('=') else {
            continue;
        };
        let key = key.trim().to_ascii_lowercase();
        let val = val.trim();
        if key == "filename*" {
            // charset'language'percent-encoded
            let mut parts = val.splitn(3, '\'');
            let (charset, _lang, encoded) = (parts.next()?, parts.next(), parts.next());
            let Some(encoded) = encoded else { continue };
            let bytes: Vec<u8> = percent_decode_str(encoded.trim_matches('"')).collect();
            let decoded = if charset.eq_ignore_ascii_case("utf-8") {
                String::from_utf8(bytes).ok()
            } else if charset.eq_ignore_ascii_case("iso-8859-1") {
                Some(bytes.iter().map(|&b| b as char).collect())
            } else {
                None
            };
            if let Some(d) = decoded {
                extended = Some(d);
            }
        } else if key == "filename" {
            let unquoted = val
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .map(|v| v.replace("\\\"", "\"").replace("\\\\", "\\"))
                .unwrap_or_else(|| val.to_string());
            // Some servers percent-encode plain filenames too.
            let decoded = percent_decode_str(&unquoted)
                .decode_utf8()
                .map(|c| c.into_owned())
                .unwrap_or(unquoted);
            plain = Some(decoded);
        }
    }
    extended.or(plain).filter(|n| !n.trim().is_empty())
}

/// Splits `a; b="x;y"; c` on semicolons outside quotes.
fn split_params(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in value.chars() {
        match c {
            _ if escaped => {
                current.push(c);
                escaped = false;
            }
            '\\' if quoted => {
                current.push(c);
                escaped = true;
            }
            '"' => {
                quoted = !quoted;
                current.push(c);
            }
            ';' if !quoted => out.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    out.push(current);
    out
}

/// The file name carried by a pre-signed link's `response-content-disposition`.
pub fn filename_from_url(link: &str) -> Option<String> {
    let url = url::Url::parse(link).ok()?;
    url.query_pairs()
        .find(|(k, _)| k.eq_ignore_ascii_case("response-content-disposition"))
        .and_then(|(_, v)| filename_from_disposition(&v))
}

/// The company a provider's file name names: the name without its extension, up to its
/// one '_' (`小米科技有限责任公司_企业创新能力报告.pdf` → `小米科技有限责任公司`). With more
/// than one '_' it is not known which one ends the company: `None`, as for a name with
/// nothing before its '_'. Read it from the name as the provider served it, never from
/// a sanitised one.
pub fn company_in_file_name(name: &str) -> Option<String> {
    let stem = match name.rsplit_once('.') {
        Some((stem, ext))
            if (1..=5).contains(&ext.len()) && ext.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            stem
        }
        _ => name,
    };
    let mut parts = stem.split('_');
    let company = parts.next()?.trim();
    if parts.count() > 1 || company.is_empty() {
        return None;
    }
    Some(company.to_string())
}

/// Code points never kept in a file name: Unicode's control (Cc), format (Cf, e.g. bidi
/// marks, zero-width joiners, the soft hyphen), line and paragraph separator (Zl, Zp)
/// characters, as of Unicode 15 — everything PostgreSQL's `[[:cntrl:]]` matches under
/// any locale (C.UTF-8: Cc only; ICU and glibc locales: more). The constraint
/// `report_documents_file_name_unsafe` refuses exactly this table; a test checks that
/// the two agree on every code point.
pub const UNSAFE_IN_FILE_NAMES: &[(u32, u32)] = &[
    (0x0000, 0x001f),
    (0x007f, 0x009f),
    (0x00ad, 0x00ad),
    (0x0600, 0x0605),
    (0x061c, 0x061c),
    (0x06dd, 0x06dd),
    (0x070f, 0x070f),
    (0x0890, 0x0891),
    (0x08e2, 0x08e2),
    (0x180e, 0x180e),
    (0x200b, 0x200f),
    (0x2028, 0x202e),
    (0x2060, 0x2064),
    (0x2066, 0x206f),
    (0xfeff, 0xfeff),
    (0xfff9, 0xfffb),
    (0x110bd, 0x110bd),
    (0x110cd, 0x110cd),
    (0x13430, 0x1343f),
    (0x1bca0, 0x1bca3),
    (0x1d173, 0x1d17a),
    (0xe0001, 0xe0001),
    (0xe0020, 0xe007f),
];

/// Whether `c` may not appear in a stored file name (see `UNSAFE_IN_FILE_NAMES`).
pub fn is_unsafe_in_file_name(c: char) -> bool {
    let c = c as u32;
    UNSAFE_IN_FILE_NAMES
        .iter()
        .any(|&(lo, hi)| (lo..=hi).contains(&c))
}

/// A file name that is safe on any file system and never leaves its directory: no path
/// components, no control, format or reserved characters, no Windows device names, at
/// most 180 bytes, with the report's extension.
pub fn sanitize_file_name(raw: &str, report_type: ReportType, job: Option<&JobId>) -> String {
    // Keep only the last path component, whichever separator was used.
    let base = raw.rsplit(['/', '\\']).next().unwrap_or("");
    let mut name: String = base
        .chars()
        .map(|c| match c {
            c if is_unsafe_in_file_name(c) => '_',
            '<' | '>' | ':' | '"' | '|' | '?' | '*' => '_',
            c => c,
        })
        .collect();
    name = name
        .trim_matches(|c: char| c == '.' || c.is_whitespace())
        .to_string();
    let ext = report_type.extension();
    let stem_of = |n: &str| -> String {
        match n.rsplit_once('.') {
            Some((stem, e)) if e.eq_ignore_ascii_case(ext) => stem.to_string(),
            _ => n.to_string(),
        }
    };
    let mut stem = stem_of(&name);
    stem = stem
        .trim_matches(|c: char| c == '.' || c.is_whitespace())
        .to_string();
    if stem.is_empty() {
        stem = match job {
            Some(j) => format!("report-{j}"),
            None => "report".to_string(),
        };
    }
    const RESERVED: [&str; 22] = [
        "CON", "PRN", "AUX", "NUL", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7", "COM8",
        "COM9", "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9",
    ];
    let device = stem.split('.').next().unwrap_or("");
    if RESERVED.iter().any(|r| r.eq_ignore_ascii_case(device)) {
        stem = format!("_{stem}");
    }
    // Leave room for the extension and a collision suffix within 255-byte limits.
    while stem.len() > 180 {
        stem.pop();
    }
    format!("{stem}.{ext}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_company_in_a_file_name() {
        for (name, company) in [
            (
                "小米科技有限责任公司_企业创新能力报告.pdf",
                Some("小米科技有限责任公司"),
            ),
            (
                "小米科技有限责任公司_企业创新能力报告.docx",
                Some("小米科技有限责任公司"),
            ),
            ("小米科技有限责任公司.pdf", Some("小米科技有限责任公司")),
            ("a_b_c.pdf", None),
            ("_报告.pdf", None),
            ("Maersk A/S_企业创新能力报告.pdf", Some("Maersk A/S")),
        ] {
            assert_eq!(company_in_file_name(name).as_deref(), company, "{name}");
        }
        // Read from the stored name, a company with a '/' would be cut short: the
        // sanitiser keeps the last path component. The download only learns from names
        // the sanitiser left as they were.
        let raw = "甲/乙公司_企业创新能力报告.pdf";
        let stored = sanitize_file_name(raw, ReportType::Pdf, None);
        assert_eq!(stored, "乙公司_企业创新能力报告.pdf");
        assert_ne!(stored, raw);
    }

    #[test]
    fn dispositions() {
        assert_eq!(
            filename_from_disposition("attachment;filename*=UTF-8''%E5%B0%8F%E7%B1%B3.docx")
                .as_deref(),
            Some("小米.docx")
        );
        assert_eq!(
            filename_from_disposition(
                r#"attachment; filename="a;b.pdf"; filename*=utf-8''real.pdf"#
            )
            .as_deref(),
            Some("real.pdf")
        );
        assert_eq!(
            filename_from_disposition(r#"attachment; filename="plain \"q\".pdf""#).as_deref(),
            Some("plain \"q\".pdf")
        );
        assert_eq!(
            filename_from_disposition("attachment; filename=x.pdf").as_deref(),
            Some("x.pdf")
        );
        assert_eq!(filename_from_disposition("attachment"), None);
        assert_eq!(
            filename_from_disposition("attachment; filename*=UTF-8''%FF%FE"),
            None
        );
        let link = "http://cos.example/r/1.docx?q-sign-algorithm=sha1&response-content-disposition=attachment%3Bfilename%2A%3DUTF-8%27%27%25E5%25B0%258F.docx";
        assert_eq!(filename_from_url(link).as_deref(), Some("小.docx"));
    }

    #[test]
    fn hostile_names() {
        let j = JobId::parse("42").unwrap();
        let cases = [
            ("../../etc/passwd", "passwd.pdf"),
            ("/abs/path/r.pdf", "r.pdf"),
            ("..\\..\\win.pdf", "win.pdf"),
            ("CON.pdf", "_CON.pdf"),
            ("nul", "_nul.pdf"),
            ("a\u{0}b\nc.pdf", "a_b_c.pdf"),
            ("a\u{2028}b\u{202e}c\u{200d}d.pdf", "a_b_c_d.pdf"),
            ("..", "report-42.pdf"),
            ("", "report-42.pdf"),
            ("what?.PDF", "what_.pdf"),
            ("report.docx", "report.docx.pdf"),
        ];
        for (raw, want) in cases {
            assert_eq!(
                sanitize_file_name(raw, ReportType::Pdf, Some(&j)),
                want,
                "{raw:?}"
            );
        }
        let long = "长".repeat(200);
        assert!(sanitize_file_name(&long, ReportType::Word, None).len() <= 190);
    }

    #[test]
    fn report_checks() {
        assert!(check_report(b"%PDF-1.4\n...\n%%EOF\n", ReportType::Pdf).is_ok());
        assert!(
            check_report(b"%PDF-1.4\n...", ReportType::Pdf)
                .unwrap_err()
                .0
                .contains("truncated")
        );
        assert!(
            check_report(b"<html><body>Error</body></html>", ReportType::Pdf)
                .unwrap_err()
                .0
                .contains("not a PDF")
        );
        assert!(
            check_report(br#"{"error":"x"}"#, ReportType::Word)
                .unwrap_err()
                .0
                .contains("not a DOCX")
        );
        assert!(
            check_report(b"PK\x03\x04garbage", ReportType::Word)
                .unwrap_err()
                .0
                .contains("ZIP")
        );
        assert!(
            check_report(b"", ReportType::Pdf)
                .unwrap_err()
                .0
                .contains("empty")
        );
    }

    proptest! {
        #[test]
        fn sanitized_names_stay_inside(raw in "\\PC{0,300}") {
            let n = sanitize_file_name(&raw, ReportType::Pdf, None);
            prop_assert!(!n.contains('/') && !n.contains('\\') && !n.chars().any(is_unsafe_in_file_name));
            prop_assert!(n != "." && n != ".." && !n.starts_with('.') && n.ends_with(".pdf"));
            prop_assert!(n.len() <= 190);
        }

        #[test]
        fn disposition_never_panics(raw in "\\PC{0,200}") {
            let _ = filename_from_disposition(&raw);
        }

        /// Arbitrary bytes served as a report: verified or refused with a reason.
        #[test]
        fn any_body_is_verified_or_refused(
            body in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..400),
                proptest::collection::vec(any::<u8>(), 0..400).prop_map(|mut b| { let mut z = b"PK\x03\x04".to_vec(); z.append(&mut b); z }),
                proptest::collection::vec(any::<u8>(), 0..400).prop_map(|mut b| { let mut z = b"%PDF-1.4\n".to_vec(); z.append(&mut b); z }),
            ]
        ) {
            for kind in [ReportType::Pdf, ReportType::Word] {
                if let Err(why) = check_report(&body, kind) {
                    prop_assert!(!why.0.is_empty());
                }
            }
        }
    }
}
