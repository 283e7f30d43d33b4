//! `report-worker status`: the queue at a glance and any account-wide stop.

use std::time::Duration;

use anyhow::Context;

use crate::queue;

/// A part of `status` the role may not read is left out and named once at the end;
/// any other error fails the command with the view it was reading.
fn readable<T>(
    result: Result<T, sqlx::Error>,
    view: &'static str,
    hidden: &mut Vec<&'static str>,
) -> anyhow::Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e) if queue::is_permission_denied(&e) => {
            hidden.push(view);
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("reading {view}")),
    }
}

/// The text `status` prints: one line per state, then the account-wide stops. Parts
/// the connecting role may not read (an application's `report_app`) are skipped and
/// named in one last line.
pub async fn status_text(pool: &crate::queue::Db) -> anyhow::Result<String> {
    use std::fmt::Write;
    let mut hidden = Vec::new();
    let stats = queue::queue_stats(pool)
        .await
        .context("reading report_queue_stats")?;
    let mut out = String::new();
    writeln!(out, "{:<12} {:>10}  oldest", "state", "count")?;
    for s in &stats {
        let age = s
            .oldest_age_secs
            .map(|secs| {
                humantime::format_duration(Duration::from_secs(secs.max(0.0) as u64)).to_string()
            })
            .unwrap_or_else(|| "-".into());
        writeln!(out, "{:<12} {:>10}  {}", s.state.as_str(), s.count, age)?;
    }
    let finished = queue::throughput(pool)
        .await
        .context("reading report_throughput")?;
    let line: Vec<String> = finished
        .iter()
        .map(|t| {
            format!(
                "{} {}/{}/{}",
                t.state, t.last_minute, t.last_hour, t.last_day
            )
        })
        .collect();
    writeln!(
        out,
        "finished in the last minute/hour/day: {}",
        line.join(", ")
    )?;
    if let Some(today) = readable(
        queue::ledger_today(pool).await,
        "report_ledger",
        &mut hidden,
    )? {
        writeln!(
            out,
            "today (Asia/Shanghai): {} paid tasks, {} creates without an answer, {} documents, {} served by reuse, {} unused tasks kept, {} too-fast answers, {} calls",
            today.paid_tasks,
            today.unknown_creates,
            today.documents,
            today.reuse_hits,
            today.orphans,
            today.rate_limited,
            today.calls
        )?;
    }
    let balances = readable(
        queue::known_balances(pool).await,
        "report_account_balance",
        &mut hidden,
    )?;
    for (account, remaining, headroom) in balances.unwrap_or_default() {
        writeln!(
            out,
            "known balance of {account}: {remaining} tasks ({headroom} kept for retries)"
        )?;
    }
    let stops = readable(
        queue::account_stops(pool).await,
        "report_account_stops",
        &mut hidden,
    )?;
    if stops.as_ref().is_some_and(|s| s.is_empty()) {
        writeln!(out, "account stop: none")?;
    }
    for stop in stops.iter().flatten() {
        let code = stop
            .error_code
            .map(|c| format!(" ({c})"))
            .unwrap_or_default();
        let until = stop
            .until
            .map(|u| format!(", until {}", u.to_rfc3339()))
            .unwrap_or_default();
        writeln!(
            out,
            "account stop for {}: {}{} since {}{}, next probe {}, probes so far {}, stopping {} calls",
            stop.account,
            stop.reason,
            code,
            stop.since.to_rfc3339(),
            until,
            stop.probe_at.to_rfc3339(),
            stop.probes,
            stop.scope
        )?;
        if let Some(id) = stop.request_id {
            writeln!(
                out,
                "  caused by row {id}'s {} call: {}",
                stop.endpoint.as_deref().unwrap_or("provider"),
                stop.answer.as_deref().unwrap_or("-")
            )?;
        }
    }
    let trouble = readable(
        queue::provider_trouble(pool).await,
        "report_provider_trouble",
        &mut hidden,
    )?;
    for t in trouble.iter().flatten() {
        let since = t
            .since
            .map(|s| s.to_rfc3339())
            .unwrap_or_else(|| "-".into());
        writeln!(
            out,
            "provider unreachable for account {} from worker {}: {} unanswered since {since}: {}",
            t.account,
            t.owner,
            crate::domain::counted(t.calls.unwrap_or(0), "call"),
            t.error.as_deref().unwrap_or("-")
        )?;
    }
    let unpolled = readable(
        queue::unpolled_accounts(pool).await,
        "report_unpolled_accounts",
        &mut hidden,
    )?;
    for (account, rows, oldest) in unpolled.unwrap_or_default() {
        let account = account.as_deref().unwrap_or("(none recorded)");
        writeln!(
            out,
            "no running worker polls account {account}: {rows} generating rows, the oldest poll due since {} (is it in a worker's UPSTREAM_ACCOUNTS? they are released, their tasks kept as orphans, after REPORT_GIVE_UP_AFTER)",
            oldest.to_rfc3339()
        )?;
    }
    let hooks = readable(
        queue::delivery_counts(pool).await,
        "report_webhook_deliveries",
        &mut hidden,
    )?;
    if let Some(hooks) = hooks.filter(|h| h.pending > 0 || h.failed > 0) {
        writeln!(
            out,
            "webhooks: {} waiting to be delivered, {} given up (see report_webhook_deliveries)",
            hooks.pending, hooks.failed
        )?;
    }
    if !hidden.is_empty() {
        writeln!(
            out,
            "not shown, this role may not read: {} (connect as the worker's login or the owner)",
            hidden.join(", ")
        )?;
    }
    Ok(out)
}

/// The text `status --batch NAME` prints: the batch's rows per state, how far along it is,
/// and why rows failed.
pub async fn batch_text(pool: &crate::queue::Db, batch: &str) -> anyhow::Result<String> {
    use std::fmt::Write;
    let summary = queue::batch_summary(pool, batch)
        .await
        .context("reading the batch")?;
    let total: i64 = summary.states.iter().map(|(_, n)| n).sum();
    if total == 0 {
        anyhow::bail!("no requests in batch {batch:?}");
    }
    let finished: i64 = summary
        .states
        .iter()
        .filter(|(s, _)| s.is_final())
        .map(|(_, n)| n)
        .sum();
    let mut out = String::new();
    writeln!(
        out,
        "batch {batch:?}: {}, {finished} finished ({:.1} %)",
        crate::domain::counted(total, "request"),
        finished as f64 * 100.0 / total as f64
    )?;
    for (state, n) in &summary.states {
        writeln!(out, "  {:<12} {:>10}", state.as_str(), n)?;
    }
    if let Some(f) = &summary.forecast {
        writeln!(out, "forecast: {}", f.describe(chrono::Utc::now()))?;
    }
    if !summary.failures.is_empty() {
        writeln!(out, "failures:")?;
        for (code, reason, n) in &summary.failures {
            let code = code.map(|c| format!("({c}) ")).unwrap_or_default();
            writeln!(out, "  {n:>6} × {code}{reason}")?;
        }
    }
    Ok(out)
}
