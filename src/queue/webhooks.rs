//! Webhook deliveries (`report_webhook_deliveries`): rows the update trigger creates
//! when a request with a `callback_url` finishes, claimed under a short lease by one
//! sender at a time, and recorded attempt by attempt.

use super::sql;
use std::time::Duration;

use super::Db;
use chrono::{DateTime, Utc};

use super::secs;

/// The channel the update trigger notifies when it creates deliveries.
pub const WEBHOOK_CHANNEL: &str = "report_webhooks";

/// A delivery claimed for one attempt.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DueDelivery {
    pub id: i64,
    pub request_id: i64,
    pub url: String,
    /// This attempt's number (1 for the first): also the claim's fencing token.
    pub attempts: i32,
    /// The JSON body, built from the request and its document as they are now.
    pub body: String,
    /// The request's trace (`report_requests.trace_context` and `traceparent`).
    pub trace_context: Option<String>,
    pub traceparent: Option<String>,
}

/// Claims up to `limit` due deliveries for one attempt each. A claimed delivery is not
/// due again for `lease` (a sender that dies mid-attempt leaves it to be retried then,
/// the attempt counted).
pub async fn claim_deliveries(
    pool: &Db,
    owner: &str,
    lease: Duration,
    limit: i64,
) -> Result<Vec<DueDelivery>, sqlx::Error> {
    sql::query_as(
        "WITH due AS (
             SELECT id FROM report_webhook_deliveries
              WHERE state = 'pending' AND next_attempt_at <= now()
              ORDER BY next_attempt_at, id
              LIMIT $3
                FOR UPDATE SKIP LOCKED),
         claimed AS (
             UPDATE report_webhook_deliveries w
                SET attempts = w.attempts + 1,
                    lease_owner = $1,
                    lease_expires_at = now() + make_interval(secs => $2),
                    next_attempt_at = now() + make_interval(secs => $2)
               FROM due WHERE w.id = due.id
             RETURNING w.id, w.request_id, w.url, w.attempts, w.event_state)
         SELECT c.id, c.request_id, c.url, c.attempts,
                json_build_object(
                    'event', 'report.finished',
                    'delivery', c.id,
                    'id', r.id,
                    'state', c.event_state,
                    'batch', r.batch,
                    'company_name', r.company_name,
                    'credit_code', r.credit_code,
                    'org_number', r.org_number,
                    'report_type', r.report_type,
                    'dedupe_key', r.dedupe_key,
                    'metadata', r.metadata,
                    'attempts', r.attempts,
                    'upstream_job_id', r.upstream_job_id,
                    'error_code', CASE WHEN c.event_state = 'failed' THEN r.last_error_code END,
                    'error', CASE WHEN c.event_state <> 'succeeded' THEN r.last_error END,
                    'finished_at', r.finished_at,
                    'document', CASE WHEN c.event_state = 'succeeded' AND d.request_id IS NOT NULL THEN
                        json_build_object('content_type', d.content_type, 'file_name', d.file_name,
                                          'byte_size', d.byte_size, 'sha256', d.sha256) END
                )::text AS body,
                r.trace_context, r.traceparent
           FROM claimed c
           JOIN report_requests r ON r.id = c.request_id
           LEFT JOIN report_documents d ON d.request_id = c.request_id
          ORDER BY c.id",
    )
    .bind(owner)
    .bind(secs(lease))
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Records a delivered attempt (fenced by the attempt number: a slower sender whose
/// claim was taken over changes nothing).
pub async fn record_delivered(
    pool: &Db,
    delivery: &DueDelivery,
    status: u16,
) -> Result<bool, sqlx::Error> {
    let done = sql::query(
        "UPDATE report_webhook_deliveries
            SET state = 'delivered', delivered_at = now(), last_status = $3, last_error = NULL,
                lease_owner = NULL, lease_expires_at = NULL
          WHERE id = $1 AND attempts = $2 AND state = 'pending'",
    )
    .bind(delivery.id)
    .bind(delivery.attempts)
    .bind(i32::from(status))
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Records a failed attempt: tried again at `retry_at`, or failed for good when `None`.
pub async fn record_undelivered(
    pool: &Db,
    delivery: &DueDelivery,
    status: Option<u16>,
    error: &str,
    retry_at: Option<DateTime<Utc>>,
) -> Result<bool, sqlx::Error> {
    let done = sql::query(
        "UPDATE report_webhook_deliveries
            SET state = CASE WHEN $5::timestamptz IS NULL THEN 'failed' ELSE 'pending' END,
                next_attempt_at = coalesce($5, next_attempt_at),
                last_status = $3, last_error = left($4, 2000),
                lease_owner = NULL, lease_expires_at = NULL
          WHERE id = $1 AND attempts = $2 AND state = 'pending'",
    )
    .bind(delivery.id)
    .bind(delivery.attempts)
    .bind(status.map(i32::from))
    .bind(error)
    .bind(retry_at)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// How long until the next pending delivery falls due (zero if one is due now).
pub async fn next_delivery_due_in(pool: &Db) -> Result<Option<Duration>, sqlx::Error> {
    let secs: Option<f64> = sql::query_scalar(
        "SELECT greatest(extract(epoch FROM min(next_attempt_at) - now()), 0)::float8
           FROM report_webhook_deliveries WHERE state = 'pending'",
    )
    .fetch_one(pool)
    .await?;
    Ok(secs.map(Duration::from_secs_f64))
}

/// Deliveries still to make and given up on, for `status` (each from its own partial
/// index: cheap however many were delivered).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryCounts {
    pub pending: i64,
    pub failed: i64,
}

pub async fn delivery_counts(pool: &Db) -> Result<DeliveryCounts, sqlx::Error> {
    let (pending, failed): (i64, i64) = sql::query_as(
        "SELECT (SELECT count(*) FROM report_webhook_deliveries WHERE state = 'pending'),
                (SELECT count(*) FROM report_webhook_deliveries WHERE state = 'failed')",
    )
    .fetch_one(pool)
    .await?;
    Ok(DeliveryCounts { pending, failed })
}
