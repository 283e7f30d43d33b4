//! `enqueue --csv`: many requests from a CSV file, streamed in constant memory and
//! inserted in batches. Bad lines are reported by line number and skipped (or, with
//! all-or-nothing, refuse the whole file); duplicates by `dedupe_key` are counted.
//!
//! One request per line: values follow RFC 4180's quoting (`"a, b"`, `""` for a quote
//! inside a quoted value) but never span lines, so a stray quote costs its own line and
//! never swallows the lines after it. Lines end in LF, CRLF or CR; line numbers count
//! from the header, line 1. A file that is not text in its encoding (a GBK file read as
//! UTF-8, a spreadsheet, a directory) is refused whole, in one line, before any insert.

use std::io::{BufRead, Read};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::queue::Db;
use chrono::{DateTime, Utc};
use encoding_rs::Encoding;
use sqlx::Postgres;
use sqlx::pool::PoolConnection;

use crate::domain::{InvalidValue, NewRequest, ReportType};
use crate::queue;

#[derive(Debug, thiserror::Error)]
pub enum CsvError {
    #[error("cannot read {path}: {cause}")]
    Io { path: String, cause: std::io::Error },
    /// The file as a whole cannot be read as CSV text: nothing is inserted.
    #[error("{path} {why}")]
    NotCsv { path: String, why: String },
    #[error("bad header (line 1): {0}")]
    Header(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

#[derive(Debug, Clone)]
pub struct CsvOptions {
    pub encoding: &'static Encoding,
    /// For rows without a `report_type` column or value (`None`: pdf).
    pub default_type: Option<ReportType>,
    pub all_or_nothing: bool,
    pub batch_size: usize,
    pub progress: bool,
    /// The batch every line joins.
    pub batch: Option<String>,
}

impl Default for CsvOptions {
    fn default() -> Self {
        CsvOptions {
            encoding: encoding_rs::UTF_8,
            default_type: None,
            all_or_nothing: false,
            batch_size: 10_000,
            progress: false,
            batch: None,
        }
    }
}

/// `utf-8` (default) or `gbk` (also `gb18030`, `gb2312`: the spreadsheets Chinese users export).
pub fn parse_encoding(label: &str) -> Result<&'static Encoding, String> {
    match label.trim().to_ascii_lowercase().as_str() {
        "gbk" | "gb2312" | "gb18030" | "cp936" => Ok(encoding_rs::GB18030),
        other => Encoding::for_label(other.as_bytes())
            .ok_or_else(|| format!("unknown encoding {label:?} (use utf-8 or gbk)")),
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CsvSummary {
    pub inserted: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// In all-or-nothing mode: nothing was inserted because some line was bad.
    pub rolled_back: bool,
}

const COLUMNS: [&str; 10] = [
    "company_name",
    "credit_code",
    "org_number",
    "report_type",
    "priority",
    "dedupe_key",
    "run_after",
    "metadata",
    "max_attempts",
    "callback_url",
];

struct Columns {
    index: [Option<usize>; 10],
    width: usize,
}

impl Columns {
    fn from_header(header: &Fields) -> Result<Columns, String> {
        let mut index = [None; 10];
        for (i, raw) in header.iter().enumerate() {
            let name = raw
                .trim()
                .trim_start_matches('\u{feff}')
                .to_ascii_lowercase();
            if name.is_empty() {
                continue;
            }
            let Some(slot) = COLUMNS.iter().position(|c| *c == name) else {
                return Err(format!(
                    "unknown column {raw:?} (known: {})",
                    COLUMNS.join(", ")
                ));
            };
            if index[slot].is_some() {
                return Err(format!("column {name} appears twice"));
            }
            index[slot] = Some(i);
        }
        if index[..3].iter().all(Option::is_none) {
            return Err(
                "no identifier column: need company_name, credit_code or org_number".into(),
            );
        }
        Ok(Columns {
            index,
            width: header.len(),
        })
    }

    fn get<'r>(&self, record: &'r Fields, column: usize) -> Option<&'r str> {
        self.index[column]
            .and_then(|i| record.get(i))
            .filter(|v| !v.trim().is_empty())
    }
}

/// Why a line is skipped: a value the queue would refuse, or a line that cannot be read
/// as one request. Printed as `line N: <reason>`.
#[derive(Debug, thiserror::Error)]
enum BadLine {
    #[error(transparent)]
    Invalid(#[from] InvalidValue),
    #[error("{0}")]
    Unreadable(String),
}

impl From<String> for BadLine {
    fn from(s: String) -> BadLine {
        BadLine::Unreadable(s)
    }
}

impl From<&str> for BadLine {
    fn from(s: &str) -> BadLine {
        BadLine::Unreadable(s.to_string())
    }
}

fn parse_line(
    cols: &Columns,
    record: &Fields,
    default_type: Option<ReportType>,
    batch: Option<&str>,
) -> Result<NewRequest, BadLine> {
    if record.len() != cols.width {
        return Err(format!("{} fields, the header has {}", record.len(), cols.width).into());
    }
    let report_type = match cols.get(record, 3) {
        Some(t) => t.parse::<ReportType>()?,
        None => default_type.unwrap_or(ReportType::Pdf),
    };
    let mut r = NewRequest::new(
        cols.get(record, 0),
        cols.get(record, 1),
        cols.get(record, 2),
        report_type,
    )?
    .with_dedupe_key(cols.get(record, 5))?
    .with_batch(batch)?
    .with_callback_url(cols.get(record, 9))?;
    if let Some(p) = cols.get(record, 4) {
        r.priority = p.trim().parse().map_err(|_| {
            format!("priority must be a whole number from -32768 to 32767, not {p:?}")
        })?;
    }
    if let Some(t) = cols.get(record, 6) {
        let t = DateTime::parse_from_rfc3339(t.trim()).map_err(|_| {
            format!("run_after must be an RFC 3339 time like 2026-01-31T09:00:00+08:00, not {t:?}")
        })?;
        r.run_after = Some(t.with_timezone(&Utc));
    }
    if let Some(m) = cols.get(record, 7) {
        let v: serde_json::Value =
            serde_json::from_str(m).map_err(|e| format!("metadata is not JSON: {e}"))?;
        r = r.with_metadata(Some(v))?;
    }
    if let Some(m) = cols.get(record, 8) {
        let n: i32 = m
            .trim()
            .parse()
            .map_err(|_| format!("max_attempts must be a number, not {m:?}"))?;
        r = r.with_max_attempts(Some(n))?;
    }
    Ok(r)
}

/// The longest line read: a file without line breaks (a binary file, a minified
/// export) is refused line by line, never held in memory whole.
const MAX_LINE: usize = 1 << 20;

/// How much of the file is looked at before any insert.
const SNIFF: usize = 64 << 10;

/// Why the start of a file, `head`, cannot be CSV text in `encoding`, if it cannot
/// (then nothing is inserted).
fn sniff(head: &[u8], encoding: &'static Encoding) -> Option<String> {
    let bom = Encoding::for_bom(head).map(|(e, _)| e);
    if head.starts_with(b"PK\x03\x04") {
        return Some(
            "is a zip file (an .xlsx or .ods spreadsheet?), not CSV: save it as \"CSV UTF-8\""
                .into(),
        );
    }
    let utf16 = bom.is_some_and(|e| e == encoding_rs::UTF_16LE || e == encoding_rs::UTF_16BE);
    if !utf16 && head.contains(&0) {
        return Some(
            "is not a text file (it holds NUL bytes): is it a spreadsheet? Save it as \"CSV UTF-8\"".into(),
        );
    }
    if bom.is_some() || encoding != encoding_rs::UTF_8 {
        return None;
    }
    let valid = match std::str::from_utf8(head) {
        Ok(_) => None,
        // A character cut by the end of the sample is fine.
        Err(e) if e.error_len().is_none() => None,
        Err(e) => Some(e.valid_up_to()),
    };
    let at = valid?;
    // Lines end in LF, CRLF or a lone CR.
    let ends = head[..at]
        .iter()
        .enumerate()
        .filter(|&(k, &b)| b == b'\n' || (b == b'\r' && head.get(k + 1) != Some(&b'\n')))
        .count();
    let line = 1 + ends;
    let (_, _, gbk_errors) = encoding_rs::GB18030.decode(head);
    Some(if gbk_errors {
        format!("is not UTF-8 text (line {line}): pass --encoding with its encoding (utf-8 or gbk)")
    } else {
        format!(
            "is not UTF-8 text (line {line}) but reads as GBK, as Excel in Chinese saves CSV: pass --encoding gbk"
        )
    })
}

/// One physical line of the (decoded) file.
enum Line<'a> {
    Text(&'a str),
    Blank,
    TooLong,
}

/// The file's lines, numbered from 1, ending in LF, CRLF or CR.
struct Lines<R> {
    inner: R,
    buf: Vec<u8>,
    /// The number of the line read next.
    number: u64,
}

impl<R: BufRead> Lines<R> {
    fn new(inner: R) -> Lines<R> {
        Lines {
            inner,
            buf: Vec::new(),
            number: 1,
        }
    }

    fn next_line(&mut self) -> std::io::Result<Option<(u64, Line<'_>)>> {
        self.buf.clear();
        let mut too_long = false;
        let mut any = false;
        loop {
            let chunk = self.inner.fill_buf()?;
            if chunk.is_empty() {
                break;
            }
            any = true;
            let end = chunk.iter().position(|&b| b == b'\n' || b == b'\r');
            let take = end.unwrap_or(chunk.len());
            // Past the cap the line is only skipped to its end, never held.
            if !too_long && self.buf.len() + take <= MAX_LINE {
                self.buf.extend_from_slice(&chunk[..take]);
            } else {
                too_long = true;
                self.buf.clear();
            }
            let Some(i) = end else {
                self.inner.consume(take);
                continue;
            };
            let cr = chunk[i] == b'\r';
            self.inner.consume(i + 1);
            // CRLF is one line end.
            if cr && self.inner.fill_buf()?.first() == Some(&b'\n') {
                self.inner.consume(1);
            }
            break;
        }
        if !any {
            return Ok(None);
        }
        let number = self.number;
        self.number += 1;
        if too_long {
            return Ok(Some((number, Line::TooLong)));
        }
        // The decoder's output is UTF-8 (what it could not decode is U+FFFD).
        let text = std::str::from_utf8(&self.buf).unwrap_or("\u{fffd}");
        Ok(Some((
            number,
            if text.trim().is_empty() {
                Line::Blank
            } else {
                Line::Text(text)
            },
        )))
    }
}

/// One line's values, kept in one buffer.
#[derive(Default)]
struct Fields {
    text: String,
    ends: Vec<usize>,
}

impl Fields {
    fn len(&self) -> usize {
        self.ends.len()
    }

    fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(&self.text[start..end])
    }

    fn iter(&self) -> impl Iterator<Item = &str> {
        (0..self.len()).filter_map(|i| self.get(i))
    }
}

/// Splits a line into its values by RFC 4180's quoting, a value never spanning lines.
/// A quote must open a value (spaces before it are allowed) and be doubled inside
/// it; anything else is refused with the value's index (from 0), because a lenient
/// reading of `"华为"技术"` would buy a report for a name nobody wrote.
fn split_line(line: &str, out: &mut Fields) -> Result<(), (usize, String)> {
    out.text.clear();
    out.ends.clear();
    let mut rest = line;
    loop {
        let index = out.ends.len();
        let value = rest.trim_start_matches([' ', '\t']);
        if let Some(quoted) = value.strip_prefix('"') {
            let mut s = quoted;
            loop {
                let Some(at) = s.find('"') else {
                    return Err((
                        index,
                        "a quote opens a value and is not closed on this line (a value cannot span lines)".into(),
                    ));
                };
                out.text.push_str(&s[..at]);
                s = &s[at + 1..];
                match s.strip_prefix('"') {
                    Some(after) => {
                        out.text.push('"');
                        s = after;
                    }
                    None => break,
                }
            }
            out.ends.push(out.text.len());
            let after = s.trim_start_matches([' ', '\t']);
            if after.is_empty() {
                return Ok(());
            }
            match after.strip_prefix(',') {
                Some(next) => rest = next,
                None => {
                    return Err((
                        index,
                        "a quote inside a quoted value must be doubled: \"华为\"\"技术\"\" for 华为\"技术\"".into(),
                    ));
                }
            }
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            let v = &rest[..end];
            if v.contains('"') {
                return Err((
                    index,
                    format!(
                        "{:?} has a quote but is not quoted: write it as \"{}\"",
                        v.trim(),
                        v.trim().replace('"', "\"\"")
                    ),
                ));
            }
            out.text.push_str(v);
            out.ends.push(out.text.len());
            if end == rest.len() {
                return Ok(());
            }
            rest = &rest[end + 1..];
        }
    }
}

/// Counts bytes read, for the progress bar.
struct Counting<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn db_reason(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => match d.constraint() {
            Some(c) => format!("refused by constraint {c}"),
            None => d.message().to_string(),
        },
        other => other.to_string(),
    }
}

/// Batches being inserted at once, each on its own connection: the database backend
/// is the bottleneck of a bulk load, and two of them use both cores of a small machine.
const PARALLEL_BATCHES: usize = 2;

/// What one inserted batch came to.
struct Flushed {
    conn: PoolConnection<Postgres>,
    inserted: u64,
    duplicates: u64,
    rejected: Vec<(u64, String)>,
}

type InFlight = tokio::task::JoinHandle<Result<Flushed, sqlx::Error>>;

/// Imports `path`; `on_reject(line, reason)` is called for every bad line.
pub async fn import(
    pool: &Db,
    path: &Path,
    options: &CsvOptions,
    mut on_reject: impl FnMut(u64, &str),
) -> Result<CsvSummary, CsvError> {
    let io_err = |cause| CsvError::Io {
        path: path.display().to_string(),
        cause,
    };
    let not_csv = |why: String| CsvError::NotCsv {
        path: path.display().to_string(),
        why,
    };
    if path.is_dir() {
        return Err(not_csv("is a directory, not a CSV file".into()));
    }
    let mut file = std::fs::File::open(path).map_err(io_err)?;
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    // The start is read once and read again from memory: a pipe (`--csv /dev/stdin`,
    // `<(iconv …)`) cannot seek back.
    let mut head = Vec::with_capacity(SNIFF);
    (&mut file)
        .take(SNIFF as u64)
        .read_to_end(&mut head)
        .map_err(io_err)?;
    if let Some(why) = sniff(&head, options.encoding) {
        return Err(not_csv(why));
    }
    let read = Arc::new(AtomicU64::new(0));
    // A byte-order mark wins over --encoding: a UTF-16 or UTF-8 file says what it is.
    let decoded = encoding_rs_io::DecodeReaderBytesBuilder::new()
        .encoding(Some(options.encoding))
        .bom_override(true)
        .bom_sniffing(true)
        .build(Counting {
            inner: std::io::BufReader::with_capacity(
                1 << 16,
                std::io::Cursor::new(head).chain(file),
            ),
            read: read.clone(),
        });
    let mut lines = Lines::new(std::io::BufReader::with_capacity(1 << 16, decoded));
    let mut record = Fields::default();
    let header_problem = |line: u64, why: String| {
        CsvError::Header(if line == 1 {
            why
        } else {
            format!("line {line}: {why}")
        })
    };
    let columns = loop {
        match lines.next_line().map_err(io_err)? {
            None => return Err(CsvError::Header("the file is empty".into())),
            Some((_, Line::Blank)) => continue,
            Some((n, Line::TooLong)) => {
                return Err(header_problem(n, format!("longer than {} bytes", MAX_LINE)));
            }
            Some((n, Line::Text(text))) => {
                let text = text.trim_start_matches('\u{feff}');
                split_line(text, &mut record).map_err(|(_, why)| header_problem(n, why))?;
                break Columns::from_header(&record).map_err(|why| header_problem(n, why))?;
            }
        }
    };
    let names: Vec<String> = record.iter().map(|n| n.trim().to_string()).collect();
    let mut encoding_hint = options.encoding == encoding_rs::UTF_8;

    let bar = if options.progress {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {elapsed} {msg}",
            )
            .expect("static template"),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut summary = CsvSummary::default();
    // All-or-nothing is one transaction, so one connection; otherwise each batch
    // commits on its own and batches overlap.
    let parallel = if options.all_or_nothing {
        1
    } else {
        PARALLEL_BATCHES
    };
    let mut idle: Vec<PoolConnection<Postgres>> = Vec::new();
    for _ in 0..parallel {
        idle.push(pool.acquire().await?);
    }
    if options.all_or_nothing {
        sqlx::raw_sql("BEGIN").execute(&mut *idle[0]).await?;
    }
    let mut in_flight: std::collections::VecDeque<InFlight> = std::collections::VecDeque::new();
    let mut batch: Vec<(u64, NewRequest)> = Vec::with_capacity(options.batch_size);
    loop {
        let next = lines.next_line().map_err(io_err)?;
        let more = next.is_some();
        let problem = match next {
            None | Some((_, Line::Blank)) => None,
            Some((line, Line::TooLong)) => {
                Some((line, format!("longer than {MAX_LINE} bytes: not read")))
            }
            Some((line, Line::Text(text))) => {
                let parsed = if text.contains('\u{fffd}') {
                    let mut why = format!("not valid {} text", options.encoding.name());
                    if std::mem::take(&mut encoding_hint) {
                        why.push_str(
                            " (a GBK file, as Excel in Chinese saves one, needs --encoding gbk)",
                        );
                    }
                    Err(BadLine::Unreadable(why))
                } else {
                    split_line(text, &mut record)
                        .map_err(|(column, why)| {
                            let name = names
                                .get(column)
                                .filter(|n| !n.is_empty())
                                .map(|n| format!("{n}: "))
                                .unwrap_or_default();
                            BadLine::Unreadable(format!("{name}{why}"))
                        })
                        .and_then(|()| {
                            parse_line(
                                &columns,
                                &record,
                                options.default_type,
                                options.batch.as_deref(),
                            )
                        })
                };
                match parsed {
                    Ok(r) => {
                        if !(options.all_or_nothing && summary.rejected > 0) {
                            batch.push((line, r));
                        }
                        None
                    }
                    Err(reason) => Some((line, reason.to_string())),
                }
            }
        };
        if let Some((line, reason)) = problem {
            summary.rejected += 1;
            bar.suspend(|| on_reject(line, &reason));
            if options.all_or_nothing {
                // Nothing will be committed: stop sending rows.
                batch.clear();
            }
        }
        if batch.len() >= options.batch_size || (!more && !batch.is_empty()) {
            if idle.is_empty() {
                let oldest = in_flight
                    .pop_front()
                    .expect("a batch holds each busy connection");
                idle.push(settle(oldest, &mut summary, &bar, &mut on_reject).await?);
            }
            let conn = idle.pop().expect("a free connection");
            let rows = std::mem::replace(&mut batch, Vec::with_capacity(options.batch_size));
            let own_tx = !options.all_or_nothing;
            in_flight.push_back(tokio::spawn(flush(conn, rows, own_tx)));
            bar.set_position(read.load(Ordering::Relaxed));
            bar.set_message(format!(
                "inserted {} duplicates {} rejected {}",
                summary.inserted, summary.duplicates, summary.rejected
            ));
        }
        if !more {
            break;
        }
    }
    while let Some(next) = in_flight.pop_front() {
        idle.push(settle(next, &mut summary, &bar, &mut on_reject).await?);
    }
    if options.all_or_nothing {
        let conn = &mut *idle[0];
        if summary.rejected > 0 {
            sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await?;
            summary.rolled_back = true;
            summary.inserted = 0;
            summary.duplicates = 0;
        } else {
            sqlx::raw_sql("COMMIT").execute(&mut *conn).await?;
        }
    }
    bar.finish_and_clear();
    Ok(summary)
}

/// Waits for an inserted batch and adds it to the summary.
async fn settle(
    batch: InFlight,
    summary: &mut CsvSummary,
    bar: &indicatif::ProgressBar,
    on_reject: &mut impl FnMut(u64, &str),
) -> Result<PoolConnection<Postgres>, CsvError> {
    let done = batch.await.map_err(|e| {
        CsvError::Database(sqlx::Error::Protocol(format!("insert task failed: {e}")))
    })??;
    summary.inserted += done.inserted;
    summary.duplicates += done.duplicates;
    summary.rejected += done.rejected.len() as u64;
    for (line, reason) in &done.rejected {
        bar.suspend(|| on_reject(*line, reason));
    }
    Ok(done.conn)
}

/// Inserts the batch (in its own transaction, or in a savepoint of the file's). If the
/// database refuses it, the rows go in one by one, each in a savepoint, so that only
/// the refused lines are reported and skipped.
async fn flush(
    mut conn: PoolConnection<Postgres>,
    batch: Vec<(u64, NewRequest)>,
    own_tx: bool,
) -> Result<Flushed, sqlx::Error> {
    let (mut inserted, mut duplicates, mut rejected) = (0u64, 0u64, Vec::new());
    let c = &mut *conn;
    sqlx::raw_sql(if own_tx { "BEGIN" } else { "SAVEPOINT batch" })
        .execute(&mut *c)
        .await?;
    match queue::insert_many(c, batch.iter().map(|(_, r)| r)).await {
        Ok(n) => {
            sqlx::raw_sql(if own_tx {
                "COMMIT"
            } else {
                "RELEASE SAVEPOINT batch"
            })
            .execute(&mut *c)
            .await?;
            inserted += n;
            duplicates += batch.len() as u64 - n;
        }
        Err(sqlx::Error::Database(_)) => {
            sqlx::raw_sql(if own_tx {
                "ROLLBACK"
            } else {
                "ROLLBACK TO SAVEPOINT batch"
            })
            .execute(&mut *c)
            .await?;
            if own_tx {
                sqlx::raw_sql("BEGIN").execute(&mut *c).await?;
            }
            for row in batch.iter() {
                sqlx::raw_sql("SAVEPOINT one").execute(&mut *c).await?;
                match queue::insert_many(c, [&row.1]).await {
                    Ok(n) => {
                        sqlx::raw_sql("RELEASE SAVEPOINT one")
                            .execute(&mut *c)
                            .await?;
                        inserted += n;
                        duplicates += 1 - n;
                    }
                    Err(e @ sqlx::Error::Database(_)) => {
                        sqlx::raw_sql("ROLLBACK TO SAVEPOINT one")
                            .execute(&mut *c)
                            .await?;
                        rejected.push((row.0, db_reason(&e)));
                    }
                    Err(e) => return Err(e),
                }
            }
            if own_tx {
                sqlx::raw_sql("COMMIT").execute(&mut *c).await?;
            }
        }
        Err(e) => return Err(e),
    }
    Ok(Flushed {
        conn,
        inserted,
        duplicates,
        rejected,
    })
}
