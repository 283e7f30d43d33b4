//! Operators' actions from the dashboard, each in one transaction that names who did it
//! (`report_worker.actor`, `report_worker.action`): the event the action causes in
//! `report_events` carries both.

use super::Db;
use super::sql;
use sqlx::{Postgres, Transaction};

/// An operator's action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Cancel(i64),
    Retry(i64),
    RetryBatch(String),
    /// Probe a stopped account now instead of at its next probe time.
    ProbeNow(String),
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Cancel(_) => "cancel",
            Action::Retry(_) => "retry",
            Action::RetryBatch(_) => "retry_batch",
            Action::ProbeNow(_) => "probe_now",
        }
    }
}

/// Runs `action` as `actor` and returns how many rows (or stops) it changed: 0 when
/// there was nothing to do (the row had finished, the stop had ended).
pub async fn act(pool: &Db, actor: &str, action: &Action) -> Result<i64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    as_actor(&mut tx, actor, action.name()).await?;
    let changed: i64 = match action {
        Action::Cancel(id) => {
            sql::query_scalar("SELECT report_cancel($1)::int::bigint")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?
        }
        Action::Retry(id) => {
            sql::query_scalar("SELECT report_retry($1)::int::bigint")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?
        }
        Action::RetryBatch(batch) => {
            sql::query_scalar("SELECT report_retry_batch($1)::bigint")
                .bind(batch)
                .fetch_one(&mut *tx)
                .await?
        }
        Action::ProbeNow(account) => {
            sql::query_scalar("SELECT report_probe_now($1)::int::bigint")
                .bind(account)
                .fetch_one(&mut *tx)
                .await?
        }
    };
    tx.commit().await?;
    Ok(changed)
}

async fn as_actor(
    tx: &mut Transaction<'_, Postgres>,
    actor: &str,
    action: &str,
) -> Result<(), sqlx::Error> {
    sql::query(
        "SELECT set_config('report_worker.actor', $1, true), set_config('report_worker.action', $2, true)",
    )
    .bind(actor)
    .bind(action)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
