//! Reuse: serving a row from a document already stored for the same identifier and
//! report type, with no provider call.

use super::sql;
use std::time::Duration;

use super::Db;

use super::secs;
use crate::domain::ReportType;

/// A stored document another row may reuse.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Reusable {
    /// The row it was stored for.
    pub request_id: i64,
    pub sha256: String,
    pub object_key: Option<String>,
}

/// A stored document's age for reuse: the time since its bytes came from the provider
/// (a copy carries its source's; documents from before `downloaded_at` existed go by
/// when they were stored).
const DOWNLOADED: &str = "coalesce(d.downloaded_at, d.created_at)";

/// The most recent document stored for exactly this request — the same identifiers, all
/// of them (a row that names a company several ways is never a source for one that
/// names it one way, nor the other way round: which identifier the provider goes by is
/// undocumented) — and `kind`, downloaded from the provider within the row's
/// `reuse_within` (else `default`). `None` when there is none, or reuse is off for the
/// row.
pub async fn find_reusable(
    pool: &Db,
    id: i64,
    kind: ReportType,
    default: Option<Duration>,
) -> Result<Option<Reusable>, sqlx::Error> {
    sql::query_as(sqlx::AssertSqlSafe(format!(
        "WITH me AS (
             SELECT id, coalesce(reuse_within, $3 * interval '1 second') AS within,
                    nullif(credit_code, '') AS code, nullif(org_number, '') AS org,
                    nullif(company_name, '') AS name
               FROM report_requests WHERE id = $1)
         SELECT d.request_id, d.sha256, d.object_key
           FROM me
           JOIN report_requests r ON r.id = ANY (ARRAY(
                    SELECT c.id FROM report_requests c
                     WHERE coalesce(me.code, me.org, me.name) IN (c.company_name, c.credit_code, c.org_number)))
           JOIN report_documents d ON d.request_id = r.id
          WHERE me.within > interval '0' AND r.id <> me.id
            AND r.state = 'succeeded' AND r.report_type = $2
            AND {DOWNLOADED} > now() - me.within
            AND {SAME_IDENTIFIERS}
          ORDER BY {DOWNLOADED} DESC LIMIT 1"
    )))
    .bind(id)
    .bind(kind.as_str())
    .bind(default.map(secs))
    .fetch_optional(pool)
    .await
}

/// Row `r` names the company exactly as `me` does (`me.code`, `me.org`, `me.name`).
const SAME_IDENTIFIERS: &str = "nullif(r.credit_code, '') IS NOT DISTINCT FROM me.code
            AND nullif(r.org_number, '') IS NOT DISTINCT FROM me.org
            AND nullif(r.company_name, '') IS NOT DISTINCT FROM me.name";

/// CTEs over row `$1`: `company` (its one identifier's kind and value, and the company
/// the provider's file names confirm it is, if any; no row when it names the company
/// several ways) and `same` (every identifier confirmed as that company).
const SAME_COMPANY: &str = "
    company AS (
        SELECT kind, value, report_identity_company(kind, value) AS name
          FROM (SELECT CASE WHEN nullif(company_name, '') IS NOT NULL THEN 'company_name'
                            WHEN nullif(credit_code, '') IS NOT NULL THEN 'credit_code'
                            ELSE 'org_number' END AS kind,
                       coalesce(nullif(company_name, ''), nullif(credit_code, ''), nullif(org_number, '')) AS value
                  FROM report_requests
                 WHERE id = $1
                   AND num_nonnulls(nullif(company_name, ''), nullif(credit_code, ''), nullif(org_number, '')) = 1) me),
    same AS (
        SELECT i.kind, i.value
          FROM company c JOIN report_identities i ON i.company_name = c.name
         WHERE c.name IS NOT NULL AND report_identity_company(i.kind, i.value) = c.name)";

/// Joins `r`: the rows that name the company one way, by an identifier `s` of `same`
/// (found through the three identifier indexes).
const ROWS_OF_SAME: &str = "
    JOIN report_requests r ON r.id = ANY (ARRAY(
             SELECT c.id FROM report_requests c
              WHERE s.value IN (c.company_name, c.credit_code, c.org_number)))
     AND num_nonnulls(nullif(r.company_name, ''), nullif(r.credit_code, ''), nullif(r.org_number, '')) = 1
     AND CASE s.kind WHEN 'company_name' THEN r.company_name = s.value
                     WHEN 'credit_code' THEN r.credit_code = s.value
                     ELSE r.org_number = s.value END";

/// Why a document of another identifier is the same company's: the provider's file
/// names say both identifiers are `company` (confirmed: see the migration
/// `…14_identities.sql`), the row's own identifier having been seen `observations` times.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct SameCompany {
    pub request_id: i64,
    pub sha256: String,
    pub object_key: Option<String>,
    /// The source row's identifier: its kind (company_name, credit_code, org_number)
    /// and value.
    pub source_kind: String,
    pub source_value: String,
    /// The row's own identifier, and how often the provider named its company.
    pub own_kind: String,
    pub own_value: String,
    pub company: String,
    pub observations: i32,
}

impl SameCompany {
    pub fn reusable(&self) -> Reusable {
        Reusable {
            request_id: self.request_id,
            sha256: self.sha256.clone(),
            object_key: self.object_key.clone(),
        }
    }
}

/// Like `find_reusable`, across identifiers: the most recent document, within the
/// window, of a row that named the company another way, when the provider's own file
/// names confirm both identifiers are the same company (`report_identity_company`).
/// Only for rows that name the company one way (with several identifiers, which one
/// the provider goes by is undocumented).
pub async fn find_reusable_same_company(
    pool: &Db,
    id: i64,
    kind: ReportType,
    default: Option<Duration>,
) -> Result<Option<SameCompany>, sqlx::Error> {
    sql::query_as(sqlx::AssertSqlSafe(format!(
        "WITH {SAME_COMPANY},
         company_seen AS (
             SELECT c.*, (SELECT observations FROM report_identities i
                           WHERE i.kind = c.kind AND i.value = c.value
                           ORDER BY observations DESC LIMIT 1) AS observations
               FROM company c)
         SELECT d.request_id, d.sha256, d.object_key, s.kind AS source_kind,
                s.value AS source_value, c.kind AS own_kind, c.value AS own_value,
                c.name AS company, c.observations
           FROM company_seen c
          CROSS JOIN same s
          CROSS JOIN (SELECT coalesce(reuse_within, $3 * interval '1 second') AS within
                        FROM report_requests WHERE id = $1) w
           {ROWS_OF_SAME}
           JOIN report_documents d ON d.request_id = r.id
          WHERE w.within > interval '0' AND r.id <> $1
            AND r.state = 'succeeded' AND r.report_type = $2
            AND {DOWNLOADED} > now() - w.within
          ORDER BY {DOWNLOADED} DESC LIMIT 1"
    )))
    .bind(id)
    .bind(kind.as_str())
    .bind(default.map(secs))
    .fetch_optional(pool)
    .await
}

/// What serving a row from another's document came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reused {
    /// The row is `succeeded` with its copy.
    Served,
    /// The source's document is no longer within the row's window (it aged while it was
    /// being copied): nothing changed.
    Stale,
    /// The row is no longer ours: nothing changed.
    Lost,
}

/// Finishes the claimed row `id` with a copy of `source`'s document (its bytes, or
/// `object_key` for a copy of its object), provided the source was downloaded within
/// `within` of now (checked in the same statement), recording in its event that it
/// reused `source`. The copy carries the source's download time, so copies of copies
/// age like the original. Fenced by the claim like every outcome.
pub async fn complete_from(
    pool: &Db,
    id: i64,
    token: i64,
    source: i64,
    object_key: Option<&str>,
    why: Option<&str>,
    within: Duration,
) -> Result<Reused, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let actor = match why {
        Some(why) => format!("worker: the document of request {source} ({why})"),
        None => format!("worker: the document of request {source}"),
    };
    sql::query(
        "SELECT set_config('report_worker.actor', $1, true), set_config('report_worker.action', 'reuse', true)",
    )
    .bind(actor)
    .execute(&mut *tx)
    .await?;
    let stored: Option<i64> = sql::query_scalar(sqlx::AssertSqlSafe(format!(
        "WITH source AS (
             SELECT d.* FROM report_documents d
              WHERE d.request_id = $3 AND {DOWNLOADED} > now() - $5 * interval '1 second'),
         done AS (
             UPDATE report_requests r
                SET state = 'succeeded', finished_at = now(), updated_at = now(),
                    lease_owner = NULL, lease_expires_at = NULL, transient_errors = 0, transient_since = NULL
              WHERE r.id = $1 AND r.lease_token = $2 AND r.state = 'queued'
                AND EXISTS (SELECT 1 FROM source)
             RETURNING r.id)
         INSERT INTO report_documents (request_id, content, object_key, content_type, file_name, byte_size, sha256,
                                       downloaded_at, provider_company)
         SELECT done.id, CASE WHEN $4::text IS NULL THEN s.content END, $4, s.content_type, s.file_name,
                s.byte_size, s.sha256, coalesce(s.downloaded_at, s.created_at), s.provider_company
           FROM done, source s
         RETURNING request_id"
    )))
    .bind(id)
    .bind(token)
    .bind(source)
    .bind(object_key)
    .bind(secs(within))
    .fetch_optional(&mut *tx)
    .await?;
    if stored.is_some() {
        tx.commit().await?;
        return Ok(Reused::Served);
    }
    let held: bool = sql::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM report_requests WHERE id = $1 AND lease_token = $2 AND state = 'queued')",
    )
    .bind(id)
    .bind(token)
    .fetch_one(&mut *tx)
    .await?;
    tx.rollback().await?;
    Ok(if held { Reused::Stale } else { Reused::Lost })
}

/// How many of `ids` were served by reusing a stored document.
pub async fn reused_among(pool: &Db, ids: &[i64]) -> Result<i64, sqlx::Error> {
    sql::query_scalar(
        "SELECT count(DISTINCT request_id) FROM report_events WHERE request_id = ANY($1) AND action = 'reuse'",
    )
    .bind(ids)
    .fetch_one(pool)
    .await
}

/// The row whose task row `id` waits for instead of paying for its own (coalescing): a
/// row asking for the same report type and the same company as `id` — exactly the same
/// identifiers, or another identifier the provider's file names confirm as the same
/// company (`report_identity_company`) — that will have a task soon:
/// - generating, with a task younger than `give_up` (older ones are about to be given
///   up);
/// - or queued with its create on the wire;
/// - or queued, due, in the same group of the fair claim (the same batch, or neither in
///   one) and ahead of `id` in that group's order (priority, run_after, id), so it is
///   claimed first — never one that waits for a later time or retries behind `id`, nor
///   one in another batch, whose turn may come much later;
/// - or queued, claimed already (under a lease) and ahead of `id` in (priority,
///   run_after, id): two twins claimed together from two batches, the later one waits.
///
/// No row waits longer than `give_up` in all (`coalescing_since`): then it pays for its
/// own task. The order is strict, so two queued rows never wait for each other, and
/// generating rows wait for nobody.
pub async fn coalescing_leader(
    pool: &Db,
    id: i64,
    kind: ReportType,
    give_up: Duration,
) -> Result<Option<i64>, sqlx::Error> {
    sql::query_scalar(sqlx::AssertSqlSafe(format!(
        "WITH me AS (
             SELECT nullif(credit_code, '') AS code, nullif(org_number, '') AS org,
                    nullif(company_name, '') AS name, priority, run_after, coalesce(batch, '') AS grp
               FROM report_requests
              WHERE id = $1 AND (coalescing_since IS NULL OR coalescing_since > now() - $3 * interval '1 second')),
         candidates AS (
             SELECT r.*
               FROM me
               JOIN report_requests r ON r.id = ANY (ARRAY(
                        SELECT c.id FROM report_requests c
                         WHERE coalesce(me.code, me.org, me.name) IN (c.company_name, c.credit_code, c.org_number)))
              WHERE {SAME_IDENTIFIERS}
             UNION ALL
             SELECT r.*
               FROM (WITH {SAME_COMPANY} SELECT * FROM same) s
               {ROWS_OF_SAME})
         SELECT c.id
           FROM candidates c, me
          WHERE c.id <> $1 AND c.report_type = $2
            AND (   (c.state = 'generating' AND c.upstream_created_at > now() - $3 * interval '1 second')
                 OR (c.state = 'queued' AND c.create_deadline > now())
                 OR (c.state = 'queued' AND c.run_after <= now() AND coalesce(c.batch, '') = me.grp
                     AND (c.priority, c.run_after, c.id) < (me.priority, me.run_after, $1))
                 OR (c.state = 'queued' AND c.lease_expires_at > now()
                     AND (c.priority, c.run_after, c.id) < (me.priority, me.run_after, $1)))
          ORDER BY c.state = 'generating' DESC, c.id
          LIMIT 1"
    )))
    .bind(id)
    .bind(kind.as_str())
    .bind(secs(give_up))
    .fetch_optional(pool)
    .await
}
