//! `report-worker status`: the queue at a glance and any account-wide stop.

use std::time::Duration;

use anyhow::Context;

use crate::queue;

/// The text `status` prints: one line per state, then the account-wide stops.
pub async fn status_text(pool: &crate::queue::Db) -> anyhow::Result<String> {
    use std::fmt::Write;
    let stats = queue::queue_stats(pool)
        .await
        .context("reading report_queue_stats")?;
    let stops = queue::account_stops(pool)
        .await
        .context("reading report_account_stops")?;
    let mut out = String::new();
    writeln!(out, "{:<12} {:>10}  oldest", "state", "count")?;
    for s in &stats {
        let age = s
            .oldest_age_secs
            .map(|secs| {
                humantime::format_duration(Duration::from_secs(secs.max(0.0) as u64)).to_string()
            })
            .unwrap_or_else(|| "-".into());
        writeln!(out, "{:<12} {:>10}  {}", s.state, s.count, age)?;
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
    let today = queue::ledger_today(pool)
        .await
        .context("reading report_ledger")?;
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
    let balances = queue::known_balances(pool)
        .await
        .context("reading report_account_balance")?;
    for (account, remaining, headroom) in balances {
        writeln!(
            out,
            "known balance of {account}: {remaining} tasks ({headroom} kept for retries)"
        )?;
    }
    if stops.is_empty() {
        writeln!(out, "account stop: none")?;
    }
    for stop in &stops {
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
    match queue::unpolled_accounts(pool).await {
        Ok(unpolled) => {
            for (account, rows, oldest) in unpolled {
                let account = account.as_deref().unwrap_or("(none recorded)");
                writeln!(
                    out,
                    "no running worker polls account {account}: {rows} generating rows, the oldest poll due since {} (is it in a worker's UPSTREAM_ACCOUNTS? they are released, their tasks kept as orphans, after REPORT_GIVE_UP_AFTER)",
                    oldest.to_rfc3339()
                )?;
            }
        }
        // A role that may not read which workers run (report_app) sees the rest.
        Err(e) if queue::is_permission_denied(&e) => {}
        Err(e) => return Err(e).context("reading report_unpolled_accounts"),
    }
    let hooks = queue::delivery_counts(pool)
        .await
        .context("reading report_webhook_deliveries")?;
    if hooks.pending > 0 || hooks.failed > 0 {
        writeln!(
            out,
            "webhooks: {} waiting to be delivered, {} given up (see report_webhook_deliveries)",
            hooks.pending, hooks.failed
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
        "batch {batch:?}: {total} requests, {finished} finished ({:.1} %)",
        finished as f64 * 100.0 / total as f64
    )?;
    for (state, n) in &summary.states {
        writeln!(out, "  {:<12} {:>10}", state.as_str(), n)?;
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
