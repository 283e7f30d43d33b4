//! Claiming due rows under a lease, keeping leases alive, giving rows back.

use super::NO_FLUSH_WAIT;
use super::sql;
use std::time::Duration;

use super::Db;
use chrono::{DateTime, Utc};

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
    /// The report's own span, as a W3C traceparent (the trace exporter's): written by
    /// the first claim that asked for it (`trace`), `None` until then.
    pub trace_context: Option<String>,
    /// The application's traceparent, when it wants the report in its own trace.
    pub traceparent: Option<String>,
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
    pool: &Db,
    owner: &str,
    lease: Duration,
    limit: i64,
    kinds: ClaimKinds,
) -> Result<Vec<Claimed>, sqlx::Error> {
    claim_for(pool, owner, lease, limit, kinds, None, false).await
}

/// Claims up to `limit` rows that are due: generating rows whose poll is due first
/// (they keep paid tasks inside their window), then queued rows by priority, and within
/// a priority round-robin across the groups that have queued rows (each batch, and the
/// rows without a batch as one more), as many per round as the batch's weight, a random
/// group first (so claims of one row share fairly too); within a group by run_after, id. `FOR UPDATE SKIP LOCKED` lets any number of workers claim side by side; the
/// claim commits at once, and the row is then worked under its lease. With `polls`,
/// only the polls those accounts may make. With `trace`, a row without a
/// `trace_context` gets one in the same update: the application's trace id (or a new
/// random one) and a new random span id for the report's own span.
pub async fn claim_for(
    pool: &Db,
    owner: &str,
    lease: Duration,
    limit: i64,
    kinds: ClaimKinds,
    polls: Option<PollAccounts<'_>>,
    trace: bool,
) -> Result<Vec<Claimed>, sqlx::Error> {
    if limit <= 0 || kinds == ClaimKinds::NONE {
        return Ok(Vec::new());
    }
    // The claim waits for the flush (unlike the lease writes below): a claim lost with
    // the database would hand out its lease token again, and a holder that outlived the
    // loss would share it with the next claimer.
    sql::query_as(
        "WITH polls AS (
             SELECT id FROM report_requests
              WHERE $4 AND state = 'generating' AND next_poll_at <= now()
                AND (lease_expires_at IS NULL OR lease_expires_at < now())
                AND ($6::text[] IS NULL OR account = ANY($6) OR (account IS NULL AND $7))
              ORDER BY next_poll_at, id
              LIMIT $3 FOR UPDATE SKIP LOCKED),
         want AS (SELECT greatest(0, $3 - (SELECT count(*) FROM polls)) AS n),
         groups AS MATERIALIZED (
             -- The groups with queued rows (each batch, and '' for the rows without
             -- one): one probe of the claim's index per group (a loose index scan).
             WITH RECURSIVE g(key) AS (
                 (SELECT coalesce(batch, '') FROM report_requests
                   WHERE $5 AND state = 'queued' ORDER BY coalesce(batch, '') LIMIT 1)
                 UNION ALL
                 SELECT (SELECT coalesce(r.batch, '') FROM report_requests r
                          WHERE r.state = 'queued' AND coalesce(r.batch, '') > g.key
                          ORDER BY coalesce(r.batch, '') LIMIT 1)
                   FROM g WHERE g.key IS NOT NULL)
             SELECT * FROM (
                 SELECT g.key, coalesce(b.weight, 1)::float8 AS weight,
                        -- The priority of the group's first row it could claim now (none:
                        -- all wait for run_after or are under a lease).
                        (SELECT d.priority FROM report_requests d
                          WHERE d.state = 'queued' AND coalesce(d.batch, '') = g.key
                            AND d.run_after <= now()
                            AND (d.lease_expires_at IS NULL OR d.lease_expires_at < now())
                          ORDER BY coalesce(d.batch, ''), d.priority, d.run_after, d.id
                          LIMIT 1) AS top
                   FROM g LEFT JOIN report_batches b ON b.batch = g.key
                  WHERE g.key IS NOT NULL) t
              WHERE t.top IS NOT NULL),
         one AS (SELECT key FROM groups WHERE (SELECT count(*) FROM groups) = 1),
         alone AS (
             -- One group (a queue without batches, or one batch): its rows in order.
             SELECT id FROM report_requests
              WHERE state = 'queued' AND coalesce(batch, '') = (SELECT key FROM one)
                AND run_after <= now() AND (lease_expires_at IS NULL OR lease_expires_at < now())
              ORDER BY coalesce(batch, ''), priority, run_after, id
              LIMIT (SELECT n FROM want) FOR UPDATE SKIP LOCKED),
         creates AS (
             SELECT id FROM alone
             UNION ALL
             SELECT id FROM (
                 SELECT r.id
                   FROM (SELECT array_agg(key ORDER BY key) AS keys, array_agg(weight ORDER BY key) AS weights,
                                array_agg(top ORDER BY key) AS tops
                           FROM groups) a
                  CROSS JOIN LATERAL report_fair_candidates((SELECT n FROM want), a.keys, a.weights, a.tops) c
                   JOIN report_requests r ON r.id = c.id
                  WHERE (SELECT count(*) FROM groups) > 1
                    AND r.state = 'queued' AND r.run_after <= now()
                    AND (r.lease_expires_at IS NULL OR r.lease_expires_at < now())
                  ORDER BY c.priority, c.turn, c.run_after, c.id
                  LIMIT (SELECT n FROM want) FOR UPDATE OF r SKIP LOCKED) fair),
         due AS (SELECT id FROM polls UNION ALL SELECT id FROM creates)
         UPDATE report_requests r
            SET lease_owner = $1,
                lease_expires_at = now() + $2 * interval '1 second',
                lease_token = r.lease_token + 1,
                trace_context = CASE WHEN $8 AND r.trace_context IS NULL
                    THEN '00-' || coalesce(substr(r.traceparent, 4, 32), report_random_hex(32))
                         || '-' || report_random_hex(16) || '-01'
                    ELSE r.trace_context END
           FROM due
          WHERE r.id = due.id
         RETURNING r.id, r.lease_token, r.state, r.company_name, r.credit_code, r.org_number,
                   r.report_type, r.attempts, r.max_attempts, r.upstream_job_id,
                   r.upstream_created_at, r.polls, r.transient_errors, r.transient_since,
                   r.bad_downloads, r.batch, r.created_at,
                   extract(epoch FROM r.reuse_within)::float8 AS reuse_within_secs, r.account,
                   r.trace_context, r.traceparent, now() AS db_now",
    )
    .bind(owner)
    .bind(secs(lease))
    .bind(limit)
    .bind(kinds.polls)
    .bind(kinds.creates)
    .bind(polls.map(|p| p.accounts))
    .bind(polls.is_none_or(|p| p.unrecorded))
    .bind(trace)
    .fetch_all(pool)
    .await
}

/// When the next poll this worker could claim falls due, for an idle worker's nap:
/// generating rows whose poll is not held by another process (their lease has expired
/// or there is none). `None` when there is no such row. Reads the first entries of the
/// generating index in order, stopping at the first unleased one.
pub async fn next_poll_due_in(
    pool: &Db,
    polls: Option<PollAccounts<'_>>,
) -> Result<Option<Duration>, sqlx::Error> {
    let secs: Option<f64> = sql::query_scalar(
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
    sql::query_scalar(sqlx::AssertSqlSafe(format!(
        "WITH {NO_FLUSH_WAIT}
         UPDATE report_requests r
            SET lease_expires_at = greatest(r.lease_expires_at, now() + $4 * interval '1 second')
           FROM unnest($2::bigint[], $3::bigint[]) AS h (id, token), no_flush_wait
          WHERE r.id = h.id AND r.lease_token = h.token AND r.lease_owner = $1
         RETURNING r.id",
    )))
    .bind(owner)
    .bind(ids)
    .bind(tokens)
    .bind(secs(lease))
    .fetch_all(executor)
    .await
}

/// Gives rows back at once (shutdown): another worker may claim them immediately.
pub async fn release(pool: &Db, held: &[(i64, i64)]) -> Result<u64, sqlx::Error> {
    let (ids, tokens): (Vec<i64>, Vec<i64>) = held.iter().copied().unzip();
    let r = sql::query(sqlx::AssertSqlSafe(format!(
        "WITH {NO_FLUSH_WAIT}
         UPDATE report_requests r SET lease_owner = NULL, lease_expires_at = NULL
           FROM unnest($1::bigint[], $2::bigint[]) AS h (id, token), no_flush_wait
          WHERE r.id = h.id AND r.lease_token = h.token",
    )))
    .bind(ids)
    .bind(tokens)
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

/// Says this process is at work, polling with `accounts` (and, with `unrecorded`, the
/// tasks created before accounts were recorded), and what each account may spend
/// (`limits`, for the batch forecast): one upsert, every few seconds.
pub async fn worker_seen(
    pool: &Db,
    owner: &str,
    accounts: &[String],
    unrecorded: bool,
    trouble: &serde_json::Value,
    limits: &serde_json::Value,
) -> Result<(), sqlx::Error> {
    sql::query(
        "INSERT INTO report_workers AS w (owner, accounts, polls_unrecorded, provider_trouble, account_limits)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (owner) DO UPDATE
            SET accounts = excluded.accounts, polls_unrecorded = excluded.polls_unrecorded,
                provider_trouble = excluded.provider_trouble, account_limits = excluded.account_limits,
                seen_at = now()",
    )
    .bind(owner)
    .bind(accounts)
    .bind(unrecorded)
    .bind(trouble)
    .bind(limits)
    .execute(pool)
    .await?;
    Ok(())
}

/// A running worker that gets no answer from the provider for an account
/// (`report_provider_trouble`).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ProviderTrouble {
    pub owner: String,
    pub account: String,
    pub since: Option<DateTime<Utc>>,
    pub calls: Option<i32>,
    pub error: Option<String>,
}

/// Every running worker's trouble reaching the provider, longest first.
pub async fn provider_trouble(pool: &Db) -> Result<Vec<ProviderTrouble>, sqlx::Error> {
    sql::query_as(
        "SELECT owner, account, since, calls, error FROM report_provider_trouble ORDER BY since, owner, account",
    )
    .fetch_all(pool)
    .await
}

/// This process stopped: it polls nothing any more.
pub async fn worker_gone(pool: &Db, owner: &str) -> Result<(), sqlx::Error> {
    sql::query("DELETE FROM report_workers WHERE owner = $1")
        .bind(owner)
        .execute(pool)
        .await?;
    Ok(())
}

/// Generating rows that no running worker has been able to poll for `give_up` — their
/// account is in no live process's configuration (`report_workers`; an account that is
/// merely stopped is still listed by the workers that have it, and its stop is lifted
/// only by their probes) — are released: their task is kept in `report_orphan_tasks` (it may still
/// finish, and a retry of a failed row polls it again), and the row goes back to the
/// queue for a new task, or fails when its attempts are spent. At most 100 rows a call.
/// Returns how many.
pub async fn release_unpolled(pool: &Db, give_up: Duration) -> Result<u64, sqlx::Error> {
    let n: i64 = sql::query_scalar(
        "WITH stale AS (
             SELECT q.id FROM report_requests q
              WHERE q.state = 'generating' AND q.next_poll_at < now() - $1 * interval '1 second'
                AND (q.lease_expires_at IS NULL OR q.lease_expires_at < now())
                AND NOT EXISTS (SELECT 1 FROM report_workers w
                                 WHERE w.seen_at > now() - interval '1 minute'
                                   AND (q.account = ANY (w.accounts) OR (q.account IS NULL AND w.polls_unrecorded)))
              ORDER BY q.next_poll_at, q.id
              LIMIT 100 FOR UPDATE SKIP LOCKED),
         done AS (
             UPDATE report_requests r
                SET state = CASE WHEN r.attempts < r.max_attempts THEN 'queued' ELSE 'failed' END,
                    finished_at = CASE WHEN r.attempts < r.max_attempts THEN NULL ELSE now() END,
                    run_after = now(),
                    upstream_job_id = CASE WHEN r.attempts < r.max_attempts THEN NULL ELSE r.upstream_job_id END,
                    upstream_created_at = CASE WHEN r.attempts < r.max_attempts THEN NULL ELSE r.upstream_created_at END,
                    next_poll_at = NULL, polls = 0, bad_downloads = 0,
                    transient_errors = 0, transient_since = NULL,
                    last_error_code = NULL, last_error_at = now(),
                    last_error = format('no running worker polls account %s (is it still in a worker''s UPSTREAM_ACCOUNTS?): its task went unpolled for %s, and is kept in report_orphan_tasks; %s',
                                        coalesce(r.account, '(none recorded)'), $2,
                                        CASE WHEN r.attempts < r.max_attempts THEN 'a new task will be created'
                                             ELSE 'no attempts left' END),
                    lease_owner = NULL, lease_expires_at = NULL, lease_token = r.lease_token + 1,
                    updated_at = now()
               FROM stale WHERE r.id = stale.id
             RETURNING r.id, r.report_type, r.last_error,
                       (SELECT o.upstream_job_id FROM report_requests o WHERE o.id = r.id) AS job,
                       (SELECT o.upstream_created_at FROM report_requests o WHERE o.id = r.id) AS made,
                       (SELECT o.account FROM report_requests o WHERE o.id = r.id) AS account),
         kept AS (
             INSERT INTO report_orphan_tasks AS t (job_id, request_id, account, report_type, reason, created_at)
             SELECT job, id, coalesce(account, ''), report_type, last_error, coalesce(made, now())
               FROM done WHERE job IS NOT NULL
             ON CONFLICT (job_id) DO UPDATE SET adopted_at = NULL, reason = excluded.reason
             RETURNING 1)
         SELECT count(*) FROM done",
    )
    .bind(secs(give_up))
    .bind(humantime::format_duration(give_up).to_string())
    .fetch_one(pool)
    .await?;
    Ok(n as u64)
}

/// Generating rows that no running worker can poll, per account (see the view
/// `report_unpolled_accounts`): the account, how many rows, when the oldest poll was due.
pub async fn unpolled_accounts(
    pool: &Db,
) -> Result<Vec<(Option<String>, i64, DateTime<Utc>)>, sqlx::Error> {
    sql::query_as(
        "SELECT account, rows, oldest_due FROM report_unpolled_accounts ORDER BY oldest_due",
    )
    .fetch_all(pool)
    .await
}
