//! The rows this process holds right now: what the heartbeat extends and what shutdown
//! releases. A row enters when it is claimed and leaves when its task ends, whatever
//! way it ends: the entry is a guard dropped with the task. A task that ends without
//! finishing (it panicked, or shutdown aborted it) leaves its row to be released at
//! once rather than extended by the heartbeat forever or left to its lease.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Held rows, id → the lease token they were claimed with.
#[derive(Default)]
pub(super) struct Leases {
    /// Std mutexes: each is held for a map or vector operation, never across an await.
    held: Mutex<HashMap<i64, i64>>,
    /// Rows whose task ended without finishing, to hand back to other processes.
    stray: Mutex<Vec<(i64, i64)>>,
}

impl Leases {
    /// Records a claimed row; the row stays held until the guard is dropped.
    pub(super) fn hold(self: &Arc<Self>, id: i64, token: i64) -> Held {
        self.lock().insert(id, token);
        Held {
            leases: self.clone(),
            id,
            token,
            finished: false,
        }
    }

    /// Rows whose task ended without finishing since the last call.
    pub(super) fn take_stray(&self) -> Vec<(i64, i64)> {
        std::mem::take(&mut *self.stray.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Every held row, as (id, token).
    pub(super) fn snapshot(&self) -> Vec<(i64, i64)> {
        self.lock()
            .iter()
            .map(|(id, token)| (*id, *token))
            .collect()
    }

    /// Every held or stray row, forgetting them all (shutdown hands them back).
    pub(super) fn drain(&self) -> Vec<(i64, i64)> {
        let mut rows: Vec<(i64, i64)> = self.lock().drain().collect();
        rows.extend(self.take_stray());
        rows
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, i64>> {
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
            if held.get(&self.id) != Some(&self.token) {
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
