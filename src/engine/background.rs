//! The two helpers that run beside the claim loop for the worker's whole life: LISTEN
//! (an insert wakes the claim loop at once) and the heartbeat (held rows keep their
//! leases while their calls take time).

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::queue;

/// Wakes the claim loop on every NOTIFY; reconnects with backoff when the connection
/// is lost, and wakes the loop after reconnecting (an insert may have been missed).
pub(super) async fn listen(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut failures = 0u32;
    while !cancel.is_cancelled() {
        let attempt = async {
            let mut listener = PgListener::connect_with(&shared.pool).await?;
            listener.listen(queue::NOTIFY_CHANNEL).await?;
            // Anything inserted while we were not listening is found by this claim.
            shared.wake.notify_one();
            loop {
                listener.recv().await?;
                shared.wake.notify_one();
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = attempt => if let Err(e) = r {
                failures += 1;
                tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
            },
        }
        let pause = Duration::from_millis(250)
            .saturating_mul(1 << failures.min(7))
            .min(Duration::from_secs(30));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Extends the lease of every held row, three times per lease period.
pub(super) async fn heartbeat(shared: Arc<Shared>, cancel: CancellationToken) {
    let every = shared.config.lease / 3;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let held = shared.leases.snapshot();
        if held.is_empty() {
            continue;
        }
        if let Err(e) = queue::heartbeat(
            &shared.pool,
            &shared.config.owner,
            &held,
            shared.config.lease,
        )
        .await
        {
            tracing::warn!(error = %e, rows = held.len(), "heartbeat failed");
        }
    }
}
