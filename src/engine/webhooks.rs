//! Delivering webhooks beside the report work: claims due deliveries (a few at a time,
//! under a short lease), POSTs each signed (`crate::webhook`), and records the attempt
//! with the next one scheduled from `WebhookPolicy` — a timestamp in the database, like
//! every other retry. It shares nothing with the claim loop but the pool: a slow or
//! dead receiver never holds a report slot.

use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::policy::WebhookPolicy;
use crate::queue::{self, DueDelivery};
use crate::telemetry::{RowTrace, TARGET};
use crate::webhook::Sender;
use tracing::Instrument;
use tracing::field::Empty;

/// Attempts in flight per process.
const IN_FLIGHT: usize = 8;
/// The longest idle nap: a delivery created while the LISTEN connection was down is
/// found within this.
const IDLE_NAP: Duration = Duration::from_secs(30);

/// Webhook delivery settings: the signing sender and the schedule.
#[derive(Debug, Clone)]
pub struct Webhooks {
    pub sender: Sender,
    pub policy: WebhookPolicy,
}

/// The sender's life: until `cancel`, then the attempts in flight finish (each is
/// bounded by its timeout).
pub(super) async fn deliver(shared: Arc<Shared>, cancel: CancellationToken) {
    let Some(hooks) = shared.config.webhooks.clone() else {
        warn_if_waiting(&shared).await;
        return;
    };
    // A claimed delivery comes back after its attempt's timeout plus a margin.
    let lease = hooks.policy.timeout + Duration::from_secs(30);
    let mut attempts = JoinSet::new();
    let mut failures = 0u32;
    while !cancel.is_cancelled() {
        while attempts.try_join_next().is_some() {}
        let free = IN_FLIGHT - attempts.len();
        let mut nap = IDLE_NAP;
        if free > 0 {
            match queue::claim_deliveries(&shared.pool, &shared.config.owner, lease, free as i64)
                .await
            {
                Ok(due) => {
                    failures = 0;
                    let got = due.len();
                    for delivery in due {
                        attempts.spawn(attempt(shared.clone(), hooks.clone(), delivery));
                    }
                    if got == free {
                        // Maybe more due: claim again as soon as a slot frees up.
                        nap = Duration::MAX;
                    } else if let Ok(Some(due_in)) = queue::next_delivery_due_in(&shared.pool).await
                    {
                        // Due now yet not claimed means another process holds it.
                        nap = due_in.clamp(Duration::from_secs(1), IDLE_NAP);
                    }
                }
                Err(e) => {
                    failures += 1;
                    nap = Duration::from_millis(500)
                        .saturating_mul(1 << failures.min(6))
                        .min(IDLE_NAP);
                    tracing::warn!(error = %e, nap = %humantime::format_duration(nap), "could not claim webhook deliveries");
                }
            }
        } else {
            nap = Duration::MAX;
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = shared.webhook_wake.notified() => {}
            Some(_) = attempts.join_next(), if !attempts.is_empty() => {}
            _ = tokio::time::sleep(nap.min(IDLE_NAP)) => {}
        }
    }
    while attempts.join_next().await.is_some() {}
}

/// One attempt at one delivery, recorded (retried through a database hiccup; if the
/// record is lost, the claim expires and the delivery is sent again: receivers
/// recognise a repeat by `X-Report-Delivery`).
async fn attempt(shared: Arc<Shared>, hooks: Webhooks, delivery: DueDelivery) {
    let url = crate::webhook::host_of(&delivery.url);
    // A span in the request's trace; its traceparent goes to the receiver.
    let span = tracing::info_span!(
        target: TARGET,
        "webhook",
        otel.kind = "client",
        otel.status_code = Empty,
        report.id = delivery.request_id,
        webhook.delivery = delivery.id,
        webhook.attempt = delivery.attempts,
        webhook.host = %url,
        http.response.status_code = Empty,
        webhook.outcome = Empty,
    );
    let trace = RowTrace::of(
        delivery.trace_context.as_deref(),
        delivery.traceparent.as_deref(),
    );
    if let Some(trace) = &trace {
        trace.adopt(&span);
    }
    let traceparent = trace.and_then(|_| RowTrace::traceparent_of(&span));
    let recorded_in = span.clone();
    send(shared, hooks, delivery, url, traceparent, recorded_in)
        .instrument(span)
        .await
}

/// The attempt itself, inside its span.
async fn send(
    shared: Arc<Shared>,
    hooks: Webhooks,
    delivery: DueDelivery,
    url: String,
    traceparent: Option<String>,
    span: tracing::Span,
) {
    let result = hooks
        .sender
        .deliver(
            &delivery.url,
            delivery.id,
            &delivery.body,
            traceparent.as_deref(),
        )
        .await;
    match &result {
        Ok(status) => span.record("http.response.status_code", status),
        Err(e) => span
            .record("http.response.status_code", e.status())
            .record("otel.status_code", "error"),
    };
    let (outcome, recorded) = match &result {
        Ok(status) => {
            tracing::info!(id = delivery.request_id, delivery = delivery.id, attempt = delivery.attempts, host = %url, status, "webhook delivered");
            let recorded = (|| queue::record_delivered(&shared.pool, &delivery, *status))
                .retry(queue::backoff())
                .when(queue::is_retryable)
                .await;
            ("delivered", recorded)
        }
        Err(e) => {
            // A destination inside the network is refused for good: no retries.
            let retry_at = match e {
                crate::webhook::DeliveryError::Refused(_) => None,
                _ => hooks.policy.retry_at(
                    delivery.attempts,
                    chrono::Utc::now(),
                    rand::random_range(0.0..1.0),
                ),
            };
            if retry_at.is_some() {
                tracing::warn!(id = delivery.request_id, delivery = delivery.id, attempt = delivery.attempts, host = %url, error = %e, "webhook not delivered; will retry");
            } else {
                tracing::error!(id = delivery.request_id, delivery = delivery.id, attempt = delivery.attempts, host = %url, error = %e, "webhook not delivered; giving up");
            }
            let error = e.to_string();
            let recorded = (|| {
                queue::record_undelivered(&shared.pool, &delivery, e.status(), &error, retry_at)
            })
            .retry(queue::backoff())
            .when(queue::is_retryable)
            .await;
            (
                if retry_at.is_some() {
                    "retry"
                } else {
                    "failed"
                },
                recorded,
            )
        }
    };
    shared.metrics.webhook_attempt(outcome);
    span.record("webhook.outcome", outcome);
    match recorded {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(
                delivery = delivery.id,
                "webhook delivery was taken over before its attempt was recorded"
            )
        }
        Err(e) => {
            tracing::warn!(delivery = delivery.id, error = %e, "could not record the webhook attempt; it will be sent again")
        }
    }
}

/// Without `WEBHOOK_SECRET` nothing is sent (unsigned webhooks cannot be trusted): say
/// so once when deliveries are waiting.
async fn warn_if_waiting(shared: &Shared) {
    if let Ok(counts) = queue::delivery_counts(&shared.pool).await
        && counts.pending > 0
    {
        tracing::warn!(
            pending = counts.pending,
            "webhook deliveries are waiting but WEBHOOK_SECRET is not set: this process will not send them"
        );
    }
}
