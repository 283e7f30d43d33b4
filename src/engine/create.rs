//! The create step of a row's life, before anything is paid: whether a stored document
//! serves the row instead (reuse, or waiting for a row that will have the same task
//! soon), which account creates it, and whether that account's daily quota and known
//! balance allow one more paid task. Each answers `None` (go on) or the `Outcome` that
//! ends the step; `RowTask::create` (row.rs) asks them in that order.

use std::time::Duration;

use super::Role;
use super::account::Account;
use super::row::{Outcome, RowTask};
use crate::domain::StopScope;
use crate::queue::{self, Intent, Reused};
use crate::upstream::UpstreamError;

impl RowTask {
    /// With reuse on (for the deployment or the row): the row is served from the most
    /// recent document downloaded for exactly its identifiers and type within the window
    /// — a new document row (its own copy of the object in object storage), `succeeded`,
    /// no provider call, its event naming the row it reused. With none stored yet but
    /// another row asking for the same that will have a task soon, it waits for that
    /// row's task (coalescing), looking again every `REPORT_POLL_MIN`, for at most
    /// `REPORT_GIVE_UP_AFTER` in all. `None`: create as usual.
    pub(super) async fn reuse(&self) -> Option<Outcome> {
        let shared = &self.shared;
        let within = match self.row.reuse_within_secs {
            Some(secs) => Duration::from_secs_f64(secs.max(0.0)),
            None => shared.config.reuse_within?,
        };
        if within.is_zero() {
            return None;
        }
        let (pool, row) = (&shared.pool, &self.row);
        let trouble = |what: String| {
            Some(Outcome::Trouble {
                error: UpstreamError::transient(what),
                intent: Intent::Keep,
            })
        };
        let looked = match self.stored_document().await {
            Ok(None) => {
                // Nothing stored yet: if an earlier open row asks for the same, wait for
                // its task (coalescing) instead of paying for another.
                let give_up = shared.config.poll.give_up_after;
                match queue::coalescing_leader(pool, row.id, row.report_type, give_up).await {
                    Ok(Some(leader)) => {
                        return Some(Outcome::WaitForLeader {
                            until: self.now()
                                + chrono::Duration::from_std(shared.config.poll.poll_min)
                                    .unwrap_or_default(),
                            message: format!(
                                "waiting for request {leader}'s task: the same company and report type, about to be paid for or generating (its document will be reused; at most {} in all)",
                                humantime::format_duration(give_up)
                            ),
                        });
                    }
                    // No leader now: one that finished between the two looks has stored
                    // its document by now, so look once more before paying.
                    Ok(None) => self.stored_document().await,
                    Err(e) => {
                        return trouble(format!(
                            "cannot look for a request to share a task with (nothing was sent): {e}"
                        ));
                    }
                }
            }
            looked => looked,
        };
        let found = match looked {
            Ok(Some(found)) => found,
            Ok(None) => return None,
            Err(e) => {
                return trouble(format!(
                    "cannot look for a document to reuse (nothing was sent): {e}"
                ));
            }
        };
        let (found, why) = found;
        let store = &shared.config.documents;
        let key = match &found.object_key {
            None => None,
            Some(from) => {
                let Some(to) = store.key_for(row.id, &found.sha256, row.report_type.extension())
                else {
                    // In object storage, and this process stores in PostgreSQL.
                    return None;
                };
                if let Err(e) = store.copy_object(from, &to).await {
                    return trouble(format!("cannot copy the document to reuse: {e}"));
                }
                Some(to)
            }
        };
        match queue::complete_from(
            pool,
            row.id,
            row.lease_token,
            found.request_id,
            key.as_deref(),
            why.as_deref(),
            within,
        )
        .await
        {
            Ok(Reused::Served) => {
                let primary = shared.accounts[0].name();
                shared.metrics.call(primary, "reuse", "hit");
                shared.metrics.finished("succeeded");
                tracing::info!(
                    outcome = "succeeded",
                    reused = found.request_id,
                    same_company = why.as_deref(),
                    "served from the document of an earlier request: no provider call"
                );
                self.report_finished("succeeded", None);
                Some(Outcome::Written)
            }
            // It aged past the window while it was being copied: pay for a fresh one.
            Ok(Reused::Stale) => None,
            Ok(Reused::Lost) => Some(Outcome::LeaseLost),
            Err(e) => trouble(format!("cannot store the reused document: {e}")),
        }
    }

    /// The document this row may be served from: one stored for exactly its identifier
    /// and type, else one of the same company under another identifier the provider's
    /// file names confirm; with why, for the event, in the second case.
    pub(super) async fn stored_document(
        &self,
    ) -> Result<Option<(queue::Reusable, Option<String>)>, sqlx::Error> {
        let (shared, row) = (&self.shared, &self.row);
        let within = shared.config.reuse_within;
        match queue::find_reusable(&shared.pool, row.id, row.report_type, within).await? {
            Some(found) => Ok(Some((found, None))),
            None => self.same_company().await,
        }
    }

    /// A document of the same company asked for by another identifier, when the
    /// provider's file names confirm the two are one company; with why, for the event.
    pub(super) async fn same_company(
        &self,
    ) -> Result<Option<(queue::Reusable, Option<String>)>, sqlx::Error> {
        let (shared, row) = (&self.shared, &self.row);
        let same = queue::find_reusable_same_company(
            &shared.pool,
            row.id,
            row.report_type,
            shared.config.reuse_within,
        )
        .await?;
        Ok(same.map(|s| {
            let why = format!(
                "the same company by the provider's file names: {} {} is {} (confirmed, seen {}), as is {} {}",
                s.own_kind.replace('_', " "),
                s.own_value,
                s.company,
                crate::domain::counted(s.observations, "time"),
                s.source_kind.replace('_', " "),
                s.source_value,
            );
            (s.reusable(), Some(why))
        }))
    }

    /// Chooses the account this create goes to (a probe's is its stopped account): the
    /// first in `create_order` that has today's quota. `Some`: no account can create
    /// now, and why.
    pub(super) async fn choose_account(&self) -> Option<Outcome> {
        let order = match self.role {
            Role::Probe(i) | Role::Poll(i) => vec![i],
            Role::Create => self.shared.create_order().await,
        };
        let mut why = None;
        for &i in &order {
            let account = &self.shared.accounts[i];
            let refused = match self.reserve_daily_create(account).await {
                None => self.take_from_balance(account).await,
                refused => refused,
            };
            match refused {
                None => {
                    let _ = self.account.set(i);
                    return None;
                }
                Some(outcome) => why = Some((i, outcome)),
            }
        }
        let Some((i, why)) = why else {
            return Some(Outcome::Later {
                until: self.now() + chrono::Duration::seconds(1),
                message: "every account is stopped for creates".into(),
            });
        };
        // The last account's reason stands for all. With several accounts, quota stops
        // were recorded as they were met: the row just goes back to the queue.
        let _ = self.account.set(i);
        match why {
            Outcome::Trouble {
                error: error @ UpstreamError::AccountStop { .. },
                ..
            } if self.shared.accounts.len() > 1 => Some(Outcome::Later {
                until: self.now() + chrono::Duration::seconds(1),
                message: error.to_string(),
            }),
            why => Some(why),
        }
    }

    /// With a daily limit on `account`: one create of today's quota, or why not. A row
    /// that never had a task waits for tomorrow once only the headroom is left (kept for
    /// retries of rows already paid for); when the quota is spent, creating stops for
    /// every process until the provider's midnight. Counted before the create is sent:
    /// a create that then makes no task still used its place (the safe side). With
    /// several accounts, an account whose quota is spent is stopped here and the next
    /// one is tried.
    pub(super) async fn reserve_daily_create(&self, account: &Account) -> Option<Outcome> {
        let shared = &self.shared;
        let quota = account.daily_limit?;
        let headroom = if self.row.attempts == 0 {
            quota.headroom
        } else {
            0
        };
        let until = crate::upstream::next_shanghai_midnight(self.now());
        let name = account.name();
        let limit_name = if shared.accounts.len() == 1 {
            "UPSTREAM_DAILY_LIMIT".to_string()
        } else {
            format!("the daily_limit of account {name}")
        };
        match queue::reserve_daily_create(&shared.pool, name, quota.limit, headroom).await {
            Ok(queue::Quota::Reserved { .. }) => None,
            Ok(queue::Quota::Held { used }) => {
                let message = format!(
                    "waiting for tomorrow's quota: {used} of {limit_name} {} creates used today (Asia/Shanghai); the last {} are kept for retries of rows already paid for",
                    quota.limit, quota.headroom
                );
                tracing::info!("{message}");
                Some(Outcome::Later { until, message })
            }
            Ok(queue::Quota::Spent { used }) => {
                let error = UpstreamError::AccountStop {
                    code: 67200007,
                    reason: format!(
                        "{limit_name} reached: {used} of {} creates used today (Asia/Shanghai); creating resumes after the provider's midnight",
                        quota.limit
                    ),
                    until: Some(until + chrono::Duration::minutes(3)),
                    scope: StopScope::Create,
                };
                Some(self.stop_creating(account, error).await)
            }
            Err(e) => Some(Outcome::Trouble {
                error: UpstreamError::transient(format!(
                    "cannot reserve today's create (nothing was sent): {e}"
                )),
                intent: Intent::Keep,
            }),
        }
    }

    /// With a known balance for `account` (`report_set_balance`): one task of it, or
    /// why not. Like the daily limit: a row that never had a task waits once only the
    /// headroom is left (for a top-up, which brings it forward), and at 0 creating stops
    /// for the account, with no call, until the next `report_set_balance`.
    pub(super) async fn take_from_balance(&self, account: &Account) -> Option<Outcome> {
        if !account.balance_known().await {
            return None;
        }
        let name = account.name();
        let retry = self.row.attempts > 0;
        match queue::take_from_balance(&self.shared.pool, name, retry).await {
            Ok(queue::Balance::Untracked | queue::Balance::Taken { .. }) => None,
            Ok(queue::Balance::Held { remaining }) => {
                let message = format!(
                    "waiting for a top-up of account {name}: {remaining} tasks of its known balance left, kept for retries of rows already paid for (report_set_balance)"
                );
                tracing::info!("{message}");
                Some(Outcome::Later {
                    until: self.now() + chrono::Duration::minutes(10),
                    message,
                })
            }
            Ok(queue::Balance::Spent) => {
                let error = UpstreamError::AccountStop {
                    code: 67200005,
                    reason: format!(
                        "known balance of account {name} used up: creating resumes after report_set_balance('{name}', tasks)"
                    ),
                    until: None,
                    scope: StopScope::Create,
                };
                Some(self.stop_creating(account, error).await)
            }
            Err(e) => Some(Outcome::Trouble {
                error: UpstreamError::transient(format!(
                    "cannot take a task from the known balance (nothing was sent): {e}"
                )),
                intent: Intent::Keep,
            }),
        }
    }

    /// `account` may not create (a quota of ours is spent): with several accounts its
    /// stop is recorded now, so `choose_account` can go on to the next one; with one,
    /// `settle` records it.
    pub(super) async fn stop_creating(&self, account: &Account, error: UpstreamError) -> Outcome {
        if self.shared.accounts.len() > 1 {
            let message = error.to_string();
            let cause = queue::StopCause {
                request_id: self.row.id,
                endpoint: "create",
                answer: &message,
            };
            account.record_stop(&error, true, cause).await;
        }
        Outcome::Trouble {
            error,
            intent: Intent::Keep,
        }
    }
}
