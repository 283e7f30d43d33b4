//! `enqueue --csv`: many requests from a CSV file, streamed in constant memory and
//! inserted in batches. Bad lines are reported by line number and skipped (or, with
//! all-or-nothing, refuse the whole file); duplicates by `dedupe_key` are counted.

use std::io::Read;
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
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("bad header: {0}")]
    Header(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

#[derive(Debug, Clone)]
pub struct CsvOptions {
    pub encoding: &'static Encoding,
    /// For rows without a `report_type` column or value.
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
    fn from_header(header: &csv::StringRecord) -> Result<Columns, String> {
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

    fn get<'r>(&self, record: &'r csv::StringRecord, column: usize) -> Option<&'r str> {
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
    record: &csv::StringRecord,
    default_type: Option<ReportType>,
    batch: Option<&str>,
) -> Result<NewRequest, BadLine> {
    if record.len() != cols.width {
        return Err(format!("{} fields, the header has {}", record.len(), cols.width).into());
    }
    if record.iter().any(|f| f.contains('\u{fffd}')) {
        return Err("not valid text in this encoding (for GBK files use --encoding gbk)".into());
    }
    let report_type = match cols.get(record, 3) {
        Some(t) => t.parse::<ReportType>()?,
        None => default_type.ok_or("no report_type (add the column or pass --type)")?,
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
    let io_err = |source| CsvError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_err)?;
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let read = Arc::new(AtomicU64::new(0));
    let decoded = encoding_rs_io::DecodeReaderBytesBuilder::new()
        .encoding(Some(options.encoding))
        .bom_sniffing(true)
        .build(Counting {
            inner: std::io::BufReader::with_capacity(1 << 16, file),
            read: read.clone(),
        });
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .has_headers(true)
        .from_reader(decoded);
    let header = reader
        .headers()
        .map_err(|e| CsvError::Header(e.to_string()))?
        .clone();
    let columns = Columns::from_header(&header).map_err(CsvError::Header)?;

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
    let mut record = csv::StringRecord::new();
    loop {
        let line = reader.position().line();
        let more = match reader.read_record(&mut record) {
            Ok(false) => false,
            Ok(true) => {
                let line = record.position().map(|p| p.line()).unwrap_or(line);
                match parse_line(
                    &columns,
                    &record,
                    options.default_type,
                    options.batch.as_deref(),
                ) {
                    Ok(r) => {
                        if !(options.all_or_nothing && summary.rejected > 0) {
                            batch.push((line, r));
                        }
                    }
                    Err(reason) => {
                        summary.rejected += 1;
                        bar.suspend(|| on_reject(line, &reason.to_string()));
                        if options.all_or_nothing {
                            // Nothing will be committed: stop sending rows.
                            batch.clear();
                        }
                    }
                }
                true
            }
            Err(e) => {
                // Broken quoting or bytes the decoder could not read: this line only.
                summary.rejected += 1;
                let line = e.position().map(|p| p.line()).unwrap_or(line + 1);
                bar.suspend(|| on_reject(line, &format!("unreadable CSV: {e}")));
                !matches!(e.kind(), csv::ErrorKind::Io(_))
            }
        };
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
