//! Reading stored documents back: the listing `export` walks and each file's bytes.

use chrono::{DateTime, Utc};
use futures_util::stream::BoxStream;
use sqlx::{PgConnection, PgPool};

use crate::domain::RequestState;

/// Which rows' documents to read.
#[derive(Debug, Clone, PartialEq)]
pub struct DocumentFilter {
    pub state: RequestState,
    /// Only rows finished at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only these request ids.
    pub ids: Option<Vec<i64>>,
}

/// A stored document without its bytes.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ListedDocument {
    pub request_id: i64,
    pub file_name: String,
    pub content_type: String,
    pub sha256: String,
}

const MATCHING: &str = "FROM report_documents d JOIN report_requests r ON r.id = d.request_id
      WHERE r.state = $1 AND ($2::timestamptz IS NULL OR r.finished_at >= $2)
        AND ($3::bigint[] IS NULL OR r.id = ANY($3))";

pub async fn count_documents(pool: &PgPool, filter: &DocumentFilter) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) {MATCHING}")))
        .bind(filter.state.as_str())
        .bind(filter.since)
        .bind(&filter.ids)
        .fetch_one(pool)
        .await
}

/// The matching documents in request id order, streamed (names and hashes only).
pub fn list_documents<'a>(
    pool: &'a PgPool,
    filter: &'a DocumentFilter,
) -> BoxStream<'a, Result<ListedDocument, sqlx::Error>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT d.request_id, d.file_name, d.content_type, d.sha256 {MATCHING} ORDER BY d.request_id"
    )))
    .bind(filter.state.as_str())
    .bind(filter.since)
    .bind(&filter.ids)
    .fetch(pool)
}

/// One document's bytes.
pub async fn document_content(
    conn: &mut PgConnection,
    request_id: i64,
) -> Result<Vec<u8>, sqlx::Error> {
    sqlx::query_scalar("SELECT content FROM report_documents WHERE request_id = $1")
        .bind(request_id)
        .fetch_one(conn)
        .await
}
