//! `report-worker move-documents`: documents stored in PostgreSQL move to object
//! storage, one at a time: the object is written and read back, and only then do the
//! bytes leave the row (which keeps its metadata and gains the object key). Interrupted,
//! it goes on where it stopped when run again: what is left is what still has content.

use crate::queue::Db;
use tokio_util::sync::CancellationToken;

use crate::domain::ReportType;
use crate::queue;
use crate::store::{DocumentStore, StoreError};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Moved {
    pub documents: u64,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("document store: {0}")]
    Store(#[from] StoreError),
}

pub async fn move_documents(
    pool: &Db,
    store: &DocumentStore,
    cancel: &CancellationToken,
    progress: bool,
) -> Result<Moved, MoveError> {
    let bar = if progress {
        indicatif::ProgressBar::new_spinner()
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut moved = Moved::default();
    let mut after = 0;
    'pages: loop {
        let page = queue::inline_documents_page(pool, after, 100).await?;
        let Some(last) = page.last() else { break };
        after = last.0;
        for (id, sha256, content_type) in page {
            if cancel.is_cancelled() {
                break 'pages;
            }
            let Some(content) = queue::document_content(pool, id).await? else {
                continue;
            };
            let extension = if content_type == ReportType::Pdf.content_type() {
                ReportType::Pdf.extension()
            } else {
                ReportType::Word.extension()
            };
            let key = store
                .key_for(id, &sha256, extension)
                .ok_or_else(|| StoreError::NoObjectStore(id.to_string()))?;
            store.put_bytes(&key, &content, &sha256).await?;
            if queue::mark_document_moved(pool, id, &key, &sha256).await? {
                moved.documents += 1;
                moved.bytes += content.len() as u64;
            }
            bar.set_message(format!("moved {} documents", moved.documents));
            bar.tick();
        }
    }
    bar.finish_and_clear();
    Ok(moved)
}
