//! Enqueueing: one request, or many in one statement for the CSV loader.

use super::Db;
use super::sql;
use sqlx::PgConnection;

use crate::domain::NewRequest;

/// The NOTIFY channel an insert (and `report_retry`) signals on.
pub const NOTIFY_CHANNEL: &str = "report_requests";
/// The payload on `NOTIFY_CHANNEL` when an operator asks for a stopped account's probe
/// now (`report_probe_now`).
pub const PROBE_NOW: &str = "probe";

/// What happened to one enqueued request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Inserted(i64),
    /// A row with the same `dedupe_key` already exists; this is its id.
    Duplicate(i64),
}

impl Enqueued {
    pub fn id(self) -> i64 {
        match self {
            Enqueued::Inserted(id) | Enqueued::Duplicate(id) => id,
        }
    }
}

/// Inserts one request; a `dedupe_key` that is already taken is not an error.
pub async fn enqueue(pool: &Db, r: &NewRequest) -> Result<Enqueued, sqlx::Error> {
    let inserted: Option<i64> = sql::query_scalar(
        "INSERT INTO report_requests
             (company_name, credit_code, org_number, report_type, priority, run_after,
              max_attempts, dedupe_key, metadata, batch, callback_url)
         VALUES ($1, $2, $3, $4, $5, coalesce($6, now()), coalesce($7, 3), $8,
                 coalesce($9, '{}'::jsonb), $10, $11)
         ON CONFLICT (dedupe_key) DO NOTHING
         RETURNING id",
    )
    .bind(&r.company_name)
    .bind(&r.credit_code)
    .bind(&r.org_number)
    .bind(r.report_type.as_str())
    .bind(r.priority)
    .bind(r.run_after)
    .bind(r.max_attempts)
    .bind(&r.dedupe_key)
    .bind(&r.metadata)
    .bind(&r.batch)
    .bind(&r.callback_url)
    .fetch_optional(pool)
    .await?;
    if let Some(id) = inserted {
        return Ok(Enqueued::Inserted(id));
    }
    let existing: i64 = sql::query_scalar("SELECT id FROM report_requests WHERE dedupe_key = $1")
        .bind(&r.dedupe_key)
        .fetch_one(pool)
        .await?;
    Ok(Enqueued::Duplicate(existing))
}

/// Inserts many requests in one statement; duplicates by `dedupe_key` are skipped.
/// Returns how many rows went in. One constraint violation refuses the whole
/// statement: the CSV loader then retries its lines one by one to name the bad ones.
pub async fn insert_many<'a>(
    conn: &mut PgConnection,
    requests: impl IntoIterator<Item = &'a NewRequest>,
) -> Result<u64, sqlx::Error> {
    let rows: Vec<&NewRequest> = requests.into_iter().collect();
    let text = |f: fn(&NewRequest) -> Option<&str>| rows.iter().map(|r| f(r)).collect::<Vec<_>>();
    let r = sql::query(
        "INSERT INTO report_requests
             (company_name, credit_code, org_number, report_type, priority, run_after, max_attempts, dedupe_key, metadata,
              batch, callback_url)
         SELECT c, cc, o, t, p, coalesce(ra, now()), coalesce(ma, 3), dk, coalesce(m, '{}'::jsonb), b, cb
           FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int2[], $6::timestamptz[],
                       $7::int4[], $8::text[], $9::jsonb[], $10::text[], $11::text[])
                AS u (c, cc, o, t, p, ra, ma, dk, m, b, cb)
         ON CONFLICT (dedupe_key) DO NOTHING",
    )
    .bind(text(|r| r.company_name.as_deref()))
    .bind(text(|r| r.credit_code.as_deref()))
    .bind(text(|r| r.org_number.as_deref()))
    .bind(text(|r| Some(r.report_type.as_str())))
    .bind(rows.iter().map(|r| r.priority).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.run_after).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.max_attempts).collect::<Vec<_>>())
    .bind(text(|r| r.dedupe_key.as_deref()))
    .bind(rows.iter().map(|r| r.metadata.as_ref()).collect::<Vec<_>>())
    .bind(text(|r| r.batch.as_deref()))
    .bind(text(|r| r.callback_url.as_deref()))
    .execute(conn)
    .await?;
    Ok(r.rows_affected())
}
