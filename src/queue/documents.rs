//! Reading stored documents back: the listing `export` walks and each file's bytes.

use super::Db;
use super::sql;
use chrono::{DateTime, Utc};

use crate::domain::RequestState;

/// Which rows' documents to read.
#[derive(Debug, Clone, PartialEq)]
pub struct DocumentFilter {
    pub state: RequestState,
    /// Only rows finished at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only these request ids.
    pub ids: Option<Vec<i64>>,
    /// Only this batch.
    pub batch: Option<String>,
}

/// A stored document without its bytes.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ListedDocument {
    pub request_id: i64,
    pub file_name: String,
    pub content_type: String,
    pub sha256: String,
    /// Where the bytes are when they are in the object store (else in `content`).
    pub object_key: Option<String>,
}

const MATCHING: &str = "FROM report_documents d JOIN report_requests r ON r.id = d.request_id
      WHERE r.state = $1 AND ($2::timestamptz IS NULL OR r.finished_at >= $2)
        AND ($3::bigint[] IS NULL OR r.id = ANY($3))
        AND ($6::text IS NULL OR r.batch = $6)";

pub async fn count_documents(pool: &Db, filter: &DocumentFilter) -> Result<i64, sqlx::Error> {
    sql::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) {MATCHING} AND $4::bigint IS NULL AND $5::bigint IS NULL"
    )))
    .bind(filter.state.as_str())
    .bind(filter.since)
    .bind(&filter.ids)
    .bind(None::<i64>)
    .bind(None::<i64>)
    .bind(&filter.batch)
    .fetch_one(pool)
    .await
}

/// The next page of matching documents after request id `after`, in id order (names and
/// hashes only). Each page is its own short statement: a long export holds no snapshot
/// open (which would keep vacuum from the hot rows for its whole run).
pub async fn list_documents_page(
    pool: &Db,
    filter: &DocumentFilter,
    after: i64,
    limit: i64,
) -> Result<Vec<ListedDocument>, sqlx::Error> {
    sql::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT d.request_id, d.file_name, d.content_type, d.sha256, d.object_key {MATCHING}
            AND d.request_id > $4 ORDER BY d.request_id LIMIT $5"
    )))
    .bind(filter.state.as_str())
    .bind(filter.since)
    .bind(&filter.ids)
    .bind(after)
    .bind(limit)
    .bind(&filter.batch)
    .fetch_all(pool)
    .await
}

/// One line of a batch's manifest: what was asked, what came of it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ManifestRow {
    pub id: i64,
    pub identifier: String,
    pub report_type: crate::domain::ReportType,
    pub state: RequestState,
    pub sha256: Option<String>,
    pub error: Option<String>,
}

/// A page of a batch's requests, in id order, after request id `after`.
pub async fn batch_manifest_page(
    pool: &Db,
    batch: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<ManifestRow>, sqlx::Error> {
    sql::query_as(
        "SELECT r.id, coalesce(nullif(r.company_name, ''), nullif(r.credit_code, ''), r.org_number, '') AS identifier,
                r.report_type, r.state, d.sha256,
                CASE WHEN r.last_error IS NULL THEN NULL
                     ELSE coalesce('(' || r.last_error_code || ') ', '') || r.last_error END AS error
           FROM report_requests r LEFT JOIN report_documents d ON d.request_id = r.id
          WHERE r.batch = $1 AND r.id > $2 ORDER BY r.id LIMIT $3",
    )
    .bind(batch)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// One document's bytes, when they are in PostgreSQL (`None`: in object storage).
pub async fn document_content(db: &Db, request_id: i64) -> Result<Option<Vec<u8>>, sqlx::Error> {
    sql::query_scalar("SELECT content FROM report_documents WHERE request_id = $1")
        .bind(request_id)
        .fetch_one(db)
        .await
}

/// Documents whose bytes are still in PostgreSQL, after request id `after`, in id order:
/// (request id, sha256, content type).
pub async fn inline_documents_page(
    pool: &Db,
    after: i64,
    limit: i64,
) -> Result<Vec<(i64, String, String)>, sqlx::Error> {
    sql::query_as(
        "SELECT request_id, sha256, content_type FROM report_documents
          WHERE request_id > $1 AND content IS NOT NULL ORDER BY request_id LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// The document's bytes now live under `key` in object storage: drop them here. Only
/// if they are still here and still those bytes (`sha256`); false otherwise.
pub async fn mark_document_moved(
    pool: &Db,
    request_id: i64,
    key: &str,
    sha256: &str,
) -> Result<bool, sqlx::Error> {
    let r = sql::query(
        "UPDATE report_documents SET content = NULL, object_key = $2
          WHERE request_id = $1 AND content IS NOT NULL AND sha256 = $3",
    )
    .bind(request_id)
    .bind(key)
    .bind(sha256)
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}
