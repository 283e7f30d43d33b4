//! Least-privilege roles (`report-worker grant`): `report_app` for applications and
//! `report_worker` for `run`, as group roles that logins join. Idempotent: run it after
//! every `migrate` (new tables get their grants).
//!
//! `report_app` may enqueue (the application's columns only), read requests, documents,
//! history and statistics, and cancel or retry through the functions; it cannot touch a
//! state, a lease, the pacing or the stops, and cannot read the account's stops, pacing
//! or orphaned tasks (the batch forecast it may read says what decides its batches' end:
//! the accounts' calls per second, whether they are stopped and when the daily limit
//! runs out, never a stop's reason or a call). It may set a batch's weight. `report_worker` may read and write the queue's tables and call its
//! functions; neither may change the schema.

use super::Db;
use super::sql;

pub const APP_ROLE: &str = "report_app";
pub const WORKER_ROLE: &str = "report_worker";

/// The columns an application sets when it enqueues.
const APP_INSERT_COLUMNS: &str = "company_name, credit_code, org_number, report_type, priority, run_after, \
     max_attempts, dedupe_key, metadata, batch, callback_url, reuse_within, traceparent";

/// Why `grant` could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// The roles do not exist yet and this login may not create roles (a managed
    /// database's owner usually may: it needs CREATEROLE, not superuser).
    #[error(
        "the roles {} do not exist and {user} may not create roles: grant needs CREATEROLE (ALTER ROLE \"{user}\" CREATEROLE; on a managed PostgreSQL the admin login has it), or create them once as a superuser ({})",
        missing.join(" and "),
        missing.iter().map(|r| format!("CREATE ROLE {r} NOLOGIN;")).collect::<Vec<_>>().join(" ")
    )]
    CannotCreateRoles { user: String, missing: Vec<String> },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Creates the two roles if missing (which needs CREATEROLE, never superuser) and grants
/// them what they need in this database (which needs only to own its tables: the login
/// that ran `migrate`).
pub async fn grant(pool: &Db) -> Result<(), GrantError> {
    let missing: Vec<String> = sql::query_scalar(
        "SELECT r FROM unnest($1::text[]) AS r WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r)",
    )
    .bind([APP_ROLE, WORKER_ROLE])
    .fetch_all(pool)
    .await?;
    if !missing.is_empty() {
        let (user, may): (String, bool) = sql::query_as(
            "SELECT current_user::text, rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user",
        )
        .fetch_one(pool)
        .await?;
        if !may {
            return Err(GrantError::CannotCreateRoles { user, missing });
        }
    }
    let mut tx = pool.begin().await?;
    // Roles are shared by every database of the server: another `grant` may be creating
    // them right now.
    for role in [APP_ROLE, WORKER_ROLE] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DO $$ BEGIN
                 IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN
                     CREATE ROLE {role} NOLOGIN;
                 END IF;
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
             END $$"
        )))
        .execute(&mut *tx)
        .await?;
    }
    let schema: String = sql::query_scalar("SELECT current_schema()")
        .fetch_one(&mut *tx)
        .await?;
    let statements = [
        format!("GRANT USAGE ON SCHEMA \"{schema}\" TO {APP_ROLE}, {WORKER_ROLE}"),
        // Applications.
        format!(
            "GRANT SELECT ON report_requests, report_documents, report_events, report_queue_stats, report_throughput, report_webhook_deliveries, report_batches, report_batch_counts, report_batch_forecast TO {APP_ROLE}"
        ),
        format!("GRANT INSERT ({APP_INSERT_COLUMNS}) ON report_requests TO {APP_ROLE}"),
        format!(
            "GRANT EXECUTE ON FUNCTION report_cancel(bigint), report_retry(bigint), report_retry_batch(text), report_set_batch_weight(text, real), report_batch_forecast_at(timestamptz) TO {APP_ROLE}"
        ),
        // The worker: the queue's tables and functions, no DDL.
        format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA \"{schema}\" TO {WORKER_ROLE}"
        ),
        format!("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA \"{schema}\" TO {WORKER_ROLE}"),
        format!("GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA \"{schema}\" TO {WORKER_ROLE}"),
        format!("REVOKE ALL ON _sqlx_migrations FROM {WORKER_ROLE}"),
    ];
    for statement in statements {
        sql::query(sqlx::AssertSqlSafe(statement))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}
