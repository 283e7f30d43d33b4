//! `export --out DIR`: finished documents as files, from whichever store holds each
//! (PostgreSQL or object storage). Rows are read in short pages (names and hashes first,
//! content only for files that need writing);
//! names are sanitised and always land inside DIR; a file already there with the same
//! sha256 is skipped, a different file of the same name gets the request id appended.

use std::path::{Path, PathBuf};

use crate::queue::Db;

use crate::domain::{ReportType, RequestState};
use crate::queue::{self, DocumentFilter};
use crate::store::{DocumentStore, StoreError};
use crate::upstream::document::{sanitize_file_name, sha256_hex};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot write to {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("document store: {0}")]
    Store(#[from] StoreError),
}

/// Which documents to export: rows in `state` (default succeeded), finished since a
/// time, or chosen by id.
pub type ExportFilter = DocumentFilter;

impl Default for DocumentFilter {
    fn default() -> Self {
        DocumentFilter {
            state: RequestState::Succeeded,
            since: None,
            ids: None,
            batch: None,
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    pub written: u64,
    pub skipped: u64,
    pub bytes: u64,
    /// (request id, path written or found), listed only when exporting chosen `ids`
    /// (a full export stays in constant memory).
    pub files: Vec<(i64, PathBuf)>,
}

/// What is at a path: nothing, a regular file with these contents' sha256, or something
/// else (a symlink, a directory, a device — never followed or read).
enum AtPath {
    Free,
    File(String),
    Other,
}

fn at_path(path: &Path) -> AtPath {
    match std::fs::symlink_metadata(path) {
        Err(_) => AtPath::Free,
        Ok(m) if m.file_type().is_file() => match std::fs::read(path) {
            Ok(bytes) => AtPath::File(sha256_hex(&bytes)),
            Err(_) => AtPath::Other,
        },
        Ok(_) => AtPath::Other,
    }
}

/// Where request `id`'s document goes: `name`, or `stem (id).ext` when `name` holds a
/// different file (or anything that is not a regular file). Returns the path and
/// whether an identical file is already there.
fn target(dir: &Path, name: &str, id: i64, sha: &str) -> (PathBuf, bool) {
    let first = dir.join(name);
    match at_path(&first) {
        AtPath::Free => return (first, false),
        AtPath::File(s) if s == sha => return (first, true),
        _ => {}
    }
    let (stem, ext) = name.rsplit_once('.').unwrap_or((name, ""));
    let second = dir.join(format!("{stem} ({id}).{ext}"));
    let same = matches!(at_path(&second), AtPath::File(s) if s == sha);
    (second, same)
}

/// A new temporary file in DIR, created with O_EXCL under a random name (so nothing
/// planted in DIR — a symlink, a file — is followed or overwritten); renamed over its
/// target once written (a rename replaces a symlink itself, never its target).
struct Part {
    path: PathBuf,
    file: std::fs::File,
    /// Set once renamed onto its target: nothing left to clean up.
    committed: bool,
}

impl Part {
    fn create(dir: &Path, id: i64) -> std::io::Result<Part> {
        for _ in 0..16 {
            let path = dir.join(format!(".{id}.{:016x}.part", rand::random::<u64>()));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(file) => {
                    return Ok(Part {
                        path,
                        file,
                        committed: false,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "no free temporary file name",
        ))
    }

    fn commit(mut self, target: &Path) -> std::io::Result<()> {
        self.file.sync_all()?;
        std::fs::rename(&self.path, target)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

pub async fn export(
    pool: &Db,
    store: &DocumentStore,
    dir: &Path,
    filter: &ExportFilter,
    progress: bool,
) -> Result<ExportSummary, ExportError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| ExportError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let dir = dir.canonicalize().map_err(io(dir))?;
    let total = queue::count_documents(pool, filter).await?;
    let bar = if progress {
        indicatif::ProgressBar::new(total as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut summary = ExportSummary::default();
    let mut suffixed: std::collections::HashMap<(String, String), PathBuf> = Default::default();
    let mut after = 0;
    // A second connection fetches contents while the listing streams on the first.
    loop {
        let page = queue::list_documents_page(pool, filter, after, 500).await?;
        let Some(last) = page.last() else { break };
        after = last.request_id;
        for row in page {
            let kind = if row.content_type == ReportType::Pdf.content_type() {
                ReportType::Pdf
            } else {
                ReportType::Word
            };
            let name = sanitize_file_name(&row.file_name, kind, None);
            // The same name and bytes as a file this export already placed under a
            // suffix (a reused document whose source shares its name with another
            // file): skipped. Only suffixed files are remembered, so the memory is
            // bounded by the name collisions, not by the documents.
            let key = (name.clone(), row.sha256.clone());
            let (path, present) = match suffixed.get(&key) {
                Some(path) => (path.clone(), true),
                None => target(&dir, &name, row.request_id, &row.sha256),
            };
            if path.file_name() != Some(std::ffi::OsStr::new(&name)) {
                suffixed.insert(key, path.clone());
            }
            // Belt and braces: whatever the name, the file's folder is DIR itself.
            if path.parent() != Some(dir.as_path()) {
                continue;
            }
            if present {
                summary.skipped += 1;
            } else {
                let mut part = Part::create(&dir, row.request_id).map_err(io(&dir))?;
                let bytes = match &row.object_key {
                    Some(key) => store.copy_to(key, &mut part.file).await?,
                    None => {
                        use std::io::Write;
                        let content = queue::document_content(pool, row.request_id)
                            .await?
                            .unwrap_or_default();
                        part.file.write_all(&content).map_err(io(&path))?;
                        content.len() as u64
                    }
                };
                part.commit(&path).map_err(io(&path))?;
                summary.written += 1;
                summary.bytes += bytes;
            }
            if filter.ids.is_some() || filter.batch.is_some() {
                summary.files.push((row.request_id, path));
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    if let Some(batch) = &filter.batch {
        write_manifest(pool, &dir, batch, &summary.files).await?;
    }
    Ok(summary)
}

/// `manifest.csv` for a batch: every request of it — id, identifier, report type, state,
/// the exported file (if any), sha256, error — so a person sees at a glance what came
/// back and what did not. Written like the documents (temporary file, then renamed).
async fn write_manifest(
    pool: &Db,
    dir: &Path,
    batch: &str,
    files: &[(i64, PathBuf)],
) -> Result<(), ExportError> {
    let path = dir.join("manifest.csv");
    let io = |source| ExportError::Io {
        path: path.display().to_string(),
        source,
    };
    let file_of: std::collections::HashMap<i64, String> = files
        .iter()
        .filter_map(|(id, p)| Some((*id, p.file_name()?.to_string_lossy().into_owned())))
        .collect();
    let part = Part::create(dir, 0).map_err(io)?;
    std::io::Write::write_all(&mut &part.file, crate::domain::UTF8_BOM).map_err(io)?;
    let mut out = csv::Writer::from_writer(&part.file);
    let row_err = |e: csv::Error| io(std::io::Error::other(e));
    out.write_record([
        "id",
        "identifier",
        "report_type",
        "state",
        "file",
        "sha256",
        "error",
    ])
    .map_err(row_err)?;
    let mut after = 0;
    loop {
        let page = queue::batch_manifest_page(pool, batch, after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        for r in page {
            let cell = crate::domain::spreadsheet_cell;
            out.write_record([
                r.id.to_string(),
                cell(&r.identifier).into_owned(),
                r.report_type.as_str().to_string(),
                r.state.as_str().to_string(),
                cell(file_of.get(&r.id).map_or("", String::as_str)).into_owned(),
                r.sha256.unwrap_or_default(),
                cell(r.error.as_deref().unwrap_or("")).into_owned(),
            ])
            .map_err(row_err)?;
        }
    }
    out.flush().map_err(io)?;
    drop(out);
    part.commit(&path).map_err(io)
}
