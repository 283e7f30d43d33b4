//! Claiming due rows under a lease, keeping leases alive, giving rows back.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::secs;
use crate::domain::{JobId, ReportType, RequestState};

/// A claimed row: what the engine needs to act on it, plus the database's clock at the
/// claim so schedules are computed in one time base across hosts.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: i64,
    pub lease_token: i64,
    pub state: RequestState,
    pub company_name: Option<String>,
    pub credit_code: Option<String>,
    pub org_number: Option<String>,
    pub report_type: ReportType,
    pub attempts: i32,
    pub max_attempts: i32,
    pub upstream_job_id: Option<JobId>,
    pub upstream_created_at: Option<DateTime<Utc>>,
    pub polls: i32,
    pub transient_errors: i32,
    pub transient_since: Option<DateTime<Utc>>,
    /// Downloads of the current task that were not a valid report.
    pub bad_downloads: i32,
    /// The batch the row belongs to, if any (for logs).
    pub batch: Option<String>,
    pub created_at: DateTime<Utc>,
    /// The row's own reuse window in seconds (`reuse_within`), if it set one.
    pub reuse_within_secs: Option<f64>,
    /// The account the row's current task was created with (`None` before any create,
    /// or for tasks created before accounts were recorded).
    pub account: Option<String>,
    pub db_now: DateTime<Utc>,
}

/// Which kinds of work a claim may take (an account stop narrows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimKinds {
    pub polls: bool,
    pub creates: bool,
}

impl ClaimKinds {
    pub const ALL: ClaimKinds = ClaimKinds {
        polls: true,
        creates: true,
    };
    pub const POLLS: ClaimKinds = ClaimKinds {
        polls: true,
        creates: false,
    };
    pub const CREATES: ClaimKinds = ClaimKinds {
        polls: false,
        creates: true,
    };
    pub const NONE: ClaimKinds = ClaimKinds {
        polls: false,
        creates: false,
    };
}

/// Which polls a claim may take: those of tasks created with one of `accounts`, and
/// those of tasks with no account recorded (created before accounts were) when
/// `unrecorded`. A task can only be polled by the account that created it.
#[derive(Debug, Clone, Copy)]
pub struct PollAccounts<'a> {
    pub accounts: &'a [String],
    pub unrecorded: bool,
}

/// Claims up to `limit` rows that are due, whatever account created their task (see
/// `claim_for`).
pub async fn claim(
    pool: &PgPool,
    owner: &str,
    lease: Duration,
    limit: i64,
    kinds: ClaimKinds,
) -> Result<Vec<Claimed>, sqlx::Error> {
    claim_for(pool, owner, lease, limit, kinds, None).await
}

/// Claims up to `limit` rows that are due: generating rows whose poll is due first
/// (they keep paid tasks inside their window), then queued rows by priority, run_after,
/// id. `FOR UPDATE SKIP LOCKED` lets any number of workers claim side by side; the
/// claim commits at once, and the row is then worked under its lease. With `polls`,
/// only the polls those accounts may make.
pub async fn claim_for(
    pool: &PgPool,
    owner: &str,
    lease: Duration,
    limit: i64,
    kinds: ClaimKinds,
    polls: Option<PollAccounts<'_>>,
) -> Result<Vec<Claimed>, sqlx::Error> {
    if limit <= 0 || kinds == ClaimKinds::NONE {
        return Ok(Vec::new());
    }
    sqlx::query_as(
        "WITH polls AS (
             SELECT id FROM report_requests
              WHERE $4 AND state = 'generating' AND next_poll_at <= now()
                AND (lease_expires_at IS NULL OR lease_expires_at < now())
                AND ($6::text[] IS NULL OR account = ANY($6) OR (account IS NULL AND $7))
              ORDER BY next_poll_at, id
              LIMIT $3 FOR UPDATE SKIP LOCKED),
         creates AS (
             SELECT id FROM report_requests
              WHERE $5 AND state = 'queued' AND run_after <= now()
                AND (lease_expires_at IS NULL OR lease_expires_at < now())
              ORDER BY priority, run_after, id
              LIMIT greatest(0, $3 - (SELECT count(*) FROM polls)) FOR UPDATE SKIP LOCKED),
         due AS (SELECT id FROM polls UNION ALL SELECT id FROM creates)
         UPDATE report_requests r
            SET lease_owner = $1,
                lease_expires_at = now() + $2 * interval '1 second',
                lease_token = r.lease_token + 1
           FROM due
          WHERE r.id = due.id
         RETURNING r.id, r.lease_token, r.state, r.company_name, r.credit_code, r.org_number,
                   r.report_type, r.attempts, r.max_attempts, r.upstream_job_id,
                   r.upstream_created_at, r.polls, r.transient_errors, r.transient_since,
                   r.bad_downloads, r.batch, r.created_at,
                   extract(epoch FROM r.reuse_within)::float8 AS reuse_within_secs, r.account,
                   now() AS db_now",
    )
    .bind(owner)
    .bind(secs(lease))
    .bind(limit)
    .bind(kinds.polls)
    .bind(kinds.creates)
    .bind(polls.map(|p| p.accounts))
    .bind(polls.is_none_or(|p| p.unrecorded))
    .fetch_all(pool)
    .await
}

/// When the next poll this worker could claim falls due, for an idle worker's nap:
/// generating rows whose poll is not held by another process (their lease has expired
/// or there is none). `None` when there is no such row. Reads the first entries of the
/// generating index in order, stopping at the first unleased one.
pub async fn next_poll_due_in(
    pool: &PgPool,
    polls: Option<PollAccounts<'_>>,
) -> Result<Option<Duration>, sqlx::Error> {
    let secs: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM (next_poll_at - now()))::float8
           FROM report_requests
          WHERE state = 'generating' AND (lease_expires_at IS NULL OR lease_expires_at < now())
            AND ($1::text[] IS NULL OR account = ANY($1) OR (account IS NULL AND $2))
          ORDER BY next_poll_at LIMIT 1",
    )
    .bind(polls.map(|p| p.accounts))
    .bind(polls.is_none_or(|p| p.unrecorded))
    .fetch_optional(pool)
    .await?;
    Ok(secs.map(|s| Duration::from_secs_f64(s.max(0.0))))
}

/// Extends the leases this worker still holds (never shortening one a create intent
/// extended further); returns the ids whose lease was extended. A held row missing from
/// the answer is no longer ours.
pub async fn heartbeat<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    owner: &str,
    held: &[(i64, i64)],
    lease: Duration,
) -> Result<Vec<i64>, sqlx::Error> {
    let (ids, tokens): (Vec<i64>, Vec<i64>) = held.iter().copied().unzip();
    sqlx::query_scalar(
        "UPDATE report_requests r
            SET lease_expires_at = greatest(r.lease_expires_at, now() + $4 * interval '1 second')
           FROM unnest($2::bigint[], $3::bigint[]) AS h (id, token)
          WHERE r.id = h.id AND r.lease_token = h.token AND r.lease_owner = $1
         RETURNING r.id",
    )
    .bind(owner)
    .bind(ids)
    .bind(tokens)
    .bind(secs(lease))
    .fetch_all(executor)
    .await
}

/// Gives rows back at once (shutdown): another worker may claim them immediately.
pub async fn release(pool: &PgPool, held: &[(i64, i64)]) -> Result<u64, sqlx::Error> {
    let (ids, tokens): (Vec<i64>, Vec<i64>) = held.iter().copied().unzip();
    let r = sqlx::query(
        "UPDATE report_requests r SET lease_owner = NULL, lease_expires_at = NULL
           FROM unnest($1::bigint[], $2::bigint[]) AS h (id, token)
          WHERE r.id = h.id AND r.lease_token = h.token",
    )
    .bind(ids)
    .bind(tokens)
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}
