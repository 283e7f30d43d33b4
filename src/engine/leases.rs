//! The rows this process holds right now: what the heartbeat extends and what shutdown
//! releases. A row enters when it is claimed and leaves when its task ends, whatever
//! way it ends: the entry is a guard dropped with the task. A task that ends without
//! finishing (it panicked, or shutdown interrupted it) leaves its row to be released at
//! once rather than extended by the heartbeat forever or left to its lease.
//!
//! Each row also carries a flag the heartbeat raises when it could not extend the
//! lease: the row task stops before its next paid call (the create intent's guarded
//! statement would refuse it anyway; the flag saves the slot and the call).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

struct Entry {
    token: i64,
    lost: Arc<AtomicBool>,
}

/// Held rows, id → the lease token they were claimed with.
#[derive(Default)]
pub(super) struct Leases {
    /// Std mutexes: each is held for a map or vector operation, never across an await.
    held: Mutex<HashMap<i64, Entry>>,
    /// Rows whose task ended without finishing, to hand back to other processes.
    stray: Mutex<Vec<(i64, i64)>>,
}

/// Whether a held row's lease may have been lost (the heartbeat could not extend it).
#[derive(Clone)]
pub(super) struct LeaseFlag(Arc<AtomicBool>);

impl LeaseFlag {
    pub(super) fn is_lost(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

impl Leases {
    /// Records a claimed row; the row stays held until the guard is dropped. `None` when
    /// this process already works the row under the same lease token: a claim whose
    /// commit the database lost (a failover to a standby that did not have it) handed the
    /// token out again, and a second task would share the first one's lease — its create
    /// intent included, so both would send a create for one attempt. The row is left to
    /// the task that holds it. (A row held under an older token was claimed again after
    /// its lease ran out: the new claim wins, the old task's fenced writes fail.)
    pub(super) fn hold(self: &Arc<Self>, id: i64, token: i64) -> Option<(Held, LeaseFlag)> {
        let lost = Arc::new(AtomicBool::new(false));
        {
            let mut held = self.lock();
            if held.get(&id).is_some_and(|e| e.token == token) {
                return None;
            }
            held.insert(
                id,
                Entry {
                    token,
                    lost: lost.clone(),
                },
            );
        }
        let held = Held {
            leases: self.clone(),
            id,
            token,
            finished: false,
        };
        Some((held, LeaseFlag(lost)))
    }

    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Every held row, as (id, token).
    pub(super) fn snapshot(&self) -> Vec<(i64, i64)> {
        self.lock().iter().map(|(id, e)| (*id, e.token)).collect()
    }

    /// After a heartbeat: rows of `asked` that are not in `extended` are lost.
    pub(super) fn mark_lost_unless(&self, asked: &[(i64, i64)], extended: &[i64]) -> usize {
        let held = self.lock();
        let mut lost = 0;
        for (id, token) in asked {
            if extended.contains(id) {
                continue;
            }
            if let Some(e) = held.get(id).filter(|e| e.token == *token) {
                e.lost.store(true, Ordering::Release);
                lost += 1;
            }
        }
        lost
    }

    /// The heartbeat failed for longer than a lease: every row held since `asked` may
    /// have been taken by another process.
    pub(super) fn mark_all_lost(&self, asked: &[(i64, i64)]) {
        self.mark_lost_unless(asked, &[]);
    }

    /// Rows whose task ended without finishing since the last call.
    pub(super) fn take_stray(&self) -> Vec<(i64, i64)> {
        std::mem::take(&mut *self.stray.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Every held or stray row, forgetting them all (shutdown hands them back).
    pub(super) fn drain(&self) -> Vec<(i64, i64)> {
        let mut rows: Vec<(i64, i64)> = self.lock().drain().map(|(id, e)| (id, e.token)).collect();
        rows.extend(self.take_stray());
        rows
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Entry>> {
        // A panic elsewhere cannot leave a HashMap half-updated in a way that matters.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A claimed row for as long as its task runs.
pub(super) struct Held {
    leases: Arc<Leases>,
    id: i64,
    token: i64,
    /// Set when the task wrote its outcome (or found the row no longer ours).
    finished: bool,
}

impl Held {
    /// The task is done with the row: nothing to hand back.
    pub(super) fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        {
            let mut held = self.leases.lock();
            // Only our own claim: the row may have been claimed again since (another token).
            if held.get(&self.id).map(|e| e.token) != Some(self.token) {
                return;
            }
            held.remove(&self.id);
        }
        if !self.finished {
            let mut stray = self.leases.stray.lock().unwrap_or_else(|p| p.into_inner());
            stray.push((self.id, self.token));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_rows_leave_unfinished_ones_are_handed_back() {
        let leases = Arc::new(Leases::default());
        let (a, _) = leases.hold(1, 10).unwrap();
        let (b, _) = leases.hold(2, 20).unwrap();
        a.finish();
        drop(b);
        assert!(leases.snapshot().is_empty());
        assert_eq!(leases.take_stray(), vec![(2, 20)]);
        assert!(leases.take_stray().is_empty());
    }

    #[test]
    fn a_panicking_task_hands_its_row_back() {
        let leases = Arc::new(Leases::default());
        let held = leases.hold(7, 70).unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _held = held;
            panic!("a bug in a row task");
        }));
        assert!(result.is_err());
        assert_eq!(leases.drain(), vec![(7, 70)]);
    }

    #[test]
    fn rows_the_heartbeat_could_not_extend_are_flagged() {
        let leases = Arc::new(Leases::default());
        let (_a, flag_a) = leases.hold(1, 10).unwrap();
        let (_b, flag_b) = leases.hold(2, 20).unwrap();
        let asked = leases.snapshot();
        assert_eq!(leases.mark_lost_unless(&asked, &[1]), 1);
        assert!(!flag_a.is_lost());
        assert!(flag_b.is_lost());
        leases.mark_all_lost(&asked);
        assert!(flag_a.is_lost());
    }

    #[test]
    fn a_lease_token_handed_out_twice_is_worked_once() {
        let leases = Arc::new(Leases::default());
        let (first, _) = leases.hold(3, 30).unwrap();
        assert!(
            leases.hold(3, 30).is_none(),
            "the same row under the same token: the first task keeps it"
        );
        assert_eq!(leases.snapshot(), vec![(3, 30)]);
        // Claimed again after its lease ran out: a new token, the new claim holds it.
        let (second, _) = leases.hold(3, 31).unwrap();
        drop(first);
        assert_eq!(
            leases.snapshot(),
            vec![(3, 31)],
            "the old guard leaves the new claim alone"
        );
        second.finish();
        assert!(leases.snapshot().is_empty());
        assert!(leases.take_stray().is_empty());
    }
}
