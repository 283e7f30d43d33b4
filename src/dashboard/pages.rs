//! The dashboard's HTML. maud escapes every interpolated value: company names, errors
//! and metadata come from applications and the provider, and show as text.

use std::collections::HashMap;

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use super::Viewer;
use super::chart::{Series, stacked_bars};
use crate::domain::RequestState;
use crate::queue::{
    AccountEvent, AccountStop, BatchLine, BatchSummary, CallsInMinute, DeliveryCounts, EventLine,
    FinishedIn, LATENCY_ROWS, Latencies, Percentiles, QpsUse, RequestDetail, RequestPage, SpendDay,
    StateStats,
};

/// Everything the overview shows.
pub(super) struct Overview {
    pub stats: Vec<StateStats>,
    pub minutes: Vec<FinishedIn>,
    pub hours: Vec<FinishedIn>,
    pub calls: Vec<CallsInMinute>,
    pub qps: Vec<QpsUse>,
    pub latencies: Latencies,
    pub webhooks: DeliveryCounts,
    pub account_events: Vec<AccountEvent>,
    /// Accounts whose generating rows no running worker can poll: (account, rows, when
    /// the oldest poll was due).
    pub unpolled: Vec<(Option<String>, i64, chrono::DateTime<Utc>)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Nav {
    Overview,
    Requests,
    Batches,
    Spend,
    None,
}

/// A value for a URL's query string.
pub(super) fn query_value(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn time(t: DateTime<Utc>) -> Markup {
    html! { time datetime=(t.to_rfc3339()) { (t.format("%Y-%m-%d %H:%M:%S UTC")) } }
}

fn time_opt(t: Option<DateTime<Utc>>) -> Markup {
    match t {
        Some(t) => time(t),
        None => html! { "—" },
    }
}

/// A duration in seconds, as a person reads it.
fn secs(s: f64) -> String {
    if !s.is_finite() {
        "—".into()
    } else if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else if s < 120.0 {
        format!("{s:.1} s")
    } else if s < 7200.0 {
        format!("{:.1} min", s / 60.0)
    } else if s < 172_800.0 {
        format!("{:.1} h", s / 3600.0)
    } else {
        format!("{:.1} d", s / 86400.0)
    }
}

fn bytes(n: i64) -> String {
    let n = n as f64;
    if n < 1024.0 {
        format!("{n} B")
    } else if n < 1024.0 * 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else {
        format!("{:.1} MiB", n / 1024.0 / 1024.0)
    }
}

fn state_badge(state: &str) -> Markup {
    html! { span class=(format!("badge state-{state}")) { (state) } }
}

/// A hidden CSRF field for a form.
fn csrf(v: &Viewer) -> Markup {
    html! { @if let Some(t) = &v.csrf { input type="hidden" name="csrf" value=(t); } }
}

/// A one-button form for an action, shown only when the person may act.
fn action_button(
    v: &Viewer,
    action: &str,
    label: &str,
    hidden: &[(&str, &str)],
    class: &str,
) -> Markup {
    html! {
        @if v.can_act() {
            form.inline method="post" action=(action) {
                (csrf(v))
                @for (name, value) in hidden { input type="hidden" name=(name) value=(value); }
                button type="submit" class=(class) { (label) }
            }
        }
    }
}

fn stop_banner(v: &Viewer, stops: &[AccountStop]) -> Markup {
    html! {
        @for s in stops {
            section.banner role="alert" aria-labelledby=(format!("stop-{}", s.account)) {
                h2 id=(format!("stop-{}", s.account)) {
                    "Account " code { (s.account) } " is stopped"
                    @if s.scope == crate::domain::StopScope::Create { " for new tasks" } @else { " for every call" }
                }
                p { (s.reason) }
                dl.facts {
                    dt { "Error code" } dd { (s.error_code.map(|c| c.to_string()).unwrap_or_else(|| "—".into())) }
                    dt { "Since" } dd { (time(s.since)) }
                    @if let Some(until) = s.until { dt { "Until" } dd { (time(until)) } }
                    dt { "Next probe" } dd { (time(s.probe_at)) @if s.probe_due { " (due)" } }
                    dt { "Probes so far" } dd { (s.probes) }
                    @if let Some(id) = s.request_id { dt { "Met by" } dd { a href=(format!("/requests/{id}")) { "request " (id) } @if let Some(e) = &s.endpoint { " on " (e) } } }
                }
                (action_button(v, "/accounts/probe", "Probe now", &[("account", &s.account)], "primary"))
            }
        }
    }
}

fn layout(
    v: &Viewer,
    title: &str,
    nav: Nav,
    stops: &[AccountStop],
    notice: Option<String>,
    live: bool,
    body: Markup,
) -> Markup {
    let item = |target: Nav, href: &str, label: &str| {
        html! {
            li { a href=(href) aria-current=[(nav == target).then_some("page")] { (label) } }
        }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                title { (title) " · report-worker" }
                link rel="stylesheet" href="/assets/app.css";
                link rel="icon" href="/assets/icon.svg" type="image/svg+xml";
                script src="/assets/app.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    nav aria-label="Main" {
                        a.brand href="/" { "report-worker" }
                        ul {
                            (item(Nav::Overview, "/", "Overview"))
                            (item(Nav::Requests, "/requests", "Requests"))
                            (item(Nav::Batches, "/batches", "Batches"))
                            (item(Nav::Spend, "/spend", "Spend"))
                        }
                    }
                    div.who {
                        @if let Some(name) = &v.name {
                            span { "Signed in as " strong { (name) } }
                            form.inline method="post" action="/logout" { (csrf(v)) button type="submit" { "Sign out" } }
                        } @else if v.token_set {
                            a href="/login" { "Sign in to act" }
                        } @else {
                            span.muted title="Start the dashboard with DASHBOARD_TOKEN to allow actions" { "Read-only" }
                        }
                        span.live hidden { "live" }
                    }
                }
                main #main data-live=[live.then_some(v.refresh_secs)] {
                    (stop_banner(v, stops))
                    @if let Some(n) = notice { p.notice role="status" { (n) } }
                    h1 { (title) }
                    (body)
                }
                footer { "Times are UTC. Pages refresh every " (v.refresh_secs) " s with JavaScript on." }
            }
        }
    }
}

pub(super) fn error_page(status: StatusCode, message: &str) -> Markup {
    let v = Viewer::default();
    let title = status.canonical_reason().unwrap_or("Error");
    layout(
        &v,
        title,
        Nav::None,
        &[],
        None,
        false,
        html! {
            p.error { (message) }
            p { a href="/" { "Back to the overview" } }
        },
    )
}

fn percentiles_row(label: &str, p: &Percentiles) -> Markup {
    let f = |x: Option<f64>| x.map(secs).unwrap_or_else(|| "—".into());
    html! {
        tr { th scope="row" { (label) } td.num { (f(p.p50)) } td.num { (f(p.p90)) } td.num { (f(p.p99)) } td.num { (p.n) } }
    }
}

fn finished_chart(title: &str, series: &[FinishedIn], first: &str) -> Markup {
    let values: Vec<Vec<i64>> = series
        .iter()
        .map(|f| vec![f.succeeded, f.failed, f.cancelled])
        .collect();
    stacked_bars(
        title,
        &[
            Series {
                class: "s-succeeded",
                name: "succeeded",
            },
            Series {
                class: "s-failed",
                name: "failed",
            },
            Series {
                class: "s-cancelled",
                name: "cancelled",
            },
        ],
        &values,
        (first, "now"),
    )
}

/// Reads one final state's count from a `FinishedIn`.
type Pick = fn(&FinishedIn) -> i64;

/// The final states and how to read each from a `FinishedIn`.
const FINAL_STATES: [(&str, Pick); 3] = [
    ("succeeded", |f| f.succeeded),
    ("failed", |f| f.failed),
    ("cancelled", |f| f.cancelled),
];

pub(super) fn overview(
    v: &Viewer,
    stops: &[AccountStop],
    notice: Option<String>,
    d: &Overview,
) -> Markup {
    // Calls per minute by endpoint, for the chart; by endpoint and outcome for the table.
    let endpoints = ["token", "create", "status", "download"];
    let now = Utc::now();
    let mut per_minute = vec![vec![0i64; 4]; 60];
    let mut by_pair: Vec<((String, String), i64)> = Vec::new();
    for c in &d.calls {
        // Minutes ago, on a grid of the last 60 (the current minute last).
        let ago = (now - c.minute).num_minutes();
        if (0..60).contains(&ago) {
            let slot = endpoints.iter().position(|e| *e == c.endpoint).unwrap_or(3);
            per_minute[59 - ago as usize][slot] += c.n;
        }
        match by_pair
            .iter_mut()
            .find(|(k, _)| k.0 == c.endpoint && k.1 == c.outcome)
        {
            Some((_, n)) => *n += c.n,
            None => by_pair.push(((c.endpoint.clone(), c.outcome.clone()), c.n)),
        }
    }
    by_pair.sort_by(|a, b| a.0.cmp(&b.0));
    let body = html! {
        @for (account, rows, oldest) in &d.unpolled {
            section.banner role="alert" {
                h2 { "No running worker polls account " code { (account.as_deref().unwrap_or("(none recorded)")) } }
                p {
                    (rows) " generating rows wait for it, the oldest poll due since " (time(*oldest))
                    ". Is the account still in a worker's UPSTREAM_ACCOUNTS? After REPORT_GIVE_UP_AFTER they are released: their tasks are kept in report_orphan_tasks and new ones are bought."
                }
            }
        }
        section aria-labelledby="states" {
            h2 #states { "Requests by state" }
            ul.cards {
                @for s in &d.stats {
                    li.card {
                        a href=(format!("/requests?state={}", s.state.as_str())) {
                            span.label { (state_badge(s.state.as_str())) }
                            span.big { (s.count) }
                            @if let (Some(age), false) = (s.oldest_age_secs, s.state.is_final()) {
                                span.muted { "oldest " (secs(age)) }
                            }
                        }
                    }
                }
            }
        }
        section aria-labelledby="throughput" {
            h2 #throughput { "Throughput" }
            table {
                thead { tr { th scope="col" { "Finished" } th.num scope="col" { "this minute" } th.num scope="col" { "last 60 min" } th.num scope="col" { "last 24 h" } } }
                tbody {
                    @for (name, pick) in FINAL_STATES {
                        tr {
                            th scope="row" { (state_badge(name)) }
                            td.num { (d.minutes.last().map(pick).unwrap_or(0)) }
                            td.num { (d.minutes.iter().map(pick).sum::<i64>()) }
                            td.num { (d.hours.iter().map(pick).sum::<i64>()) }
                        }
                    }
                }
            }
            div.charts {
                (finished_chart("Finished per minute, last hour", &d.minutes, "−60 min"))
                (finished_chart("Finished per hour, last day", &d.hours, "−24 h"))
            }
        }
        section aria-labelledby="calls" {
            h2 #calls { "Provider calls" }
            (stacked_bars(
                "Calls per minute by endpoint, last hour",
                &[
                    Series { class: "e-token", name: "token" },
                    Series { class: "e-create", name: "create" },
                    Series { class: "e-status", name: "status" },
                    Series { class: "e-download", name: "download" },
                ],
                &per_minute,
                ("−60 min", "now"),
            ))
            @if by_pair.is_empty() {
                p.muted { "No provider calls in the last hour." }
            } @else {
                table {
                    caption { "Last hour, by endpoint and outcome" }
                    thead { tr { th scope="col" { "Endpoint" } th scope="col" { "Outcome" } th.num scope="col" { "Calls" } } }
                    tbody {
                        @for ((e, o), n) in &by_pair {
                            tr { td { (e) } td { span class=(if o == "ok" { "badge ok" } else { "badge warn" }) { (o) } } td.num { (n) } }
                        }
                    }
                }
            }
            @if !d.qps.is_empty() {
                table {
                    caption { "QPS in use (last complete minute) against the configured QPS" }
                    thead { tr { th scope="col" { "Account" } th.num scope="col" { "In use" } th.num scope="col" { "Allowed" } th scope="col" { "" } } }
                    tbody {
                        @for q in &d.qps {
                            tr {
                                td { code { (q.account) } }
                                td.num { (format!("{:.2}", q.in_use)) }
                                td.num { (q.allowed.map(|a| format!("{a:.2}")).unwrap_or_else(|| "—".into())) }
                                td { @if let Some(a) = q.allowed { meter min="0" max=(a) value=(q.in_use.min(a)) title=(format!("{:.0} % of the allowed QPS", 100.0 * q.in_use / a.max(f64::MIN_POSITIVE))) {} } }
                            }
                        }
                    }
                }
            }
        }
        section aria-labelledby="latency" {
            h2 #latency { "Latency" }
            table {
                caption { "Over the last " (LATENCY_ROWS) " requests to reach each point" }
                thead { tr { th scope="col" { "From insert to" } th.num scope="col" { "p50" } th.num scope="col" { "p90" } th.num scope="col" { "p99" } th.num scope="col" { "rows" } } }
                tbody {
                    (percentiles_row("first task created", &d.latencies.to_task))
                    (percentiles_row("document stored", &d.latencies.to_document))
                }
            }
        }
        section aria-labelledby="webhooks" {
            h2 #webhooks { "Webhooks" }
            p { (d.webhooks.pending) " pending, " (d.webhooks.failed) " failed (given up)." }
        }
        @if !d.account_events.is_empty() {
            section aria-labelledby="actions" {
                h2 #actions { "Recent account actions" }
                ul {
                    @for e in &d.account_events {
                        li { (time(e.at)) " — " (e.action.as_deref().unwrap_or("?")) " on " code { (e.account) } " by " (e.actor.as_deref().unwrap_or("SQL")) }
                    }
                }
            }
        }
    };
    layout(v, "Overview", Nav::Overview, stops, notice, true, body)
}

/// The request list's URL with `params` changed.
fn list_url(params: &HashMap<String, String>, set: &[(&str, String)]) -> String {
    let mut keys: Vec<&str> = ["state", "batch", "q", "from", "to", "code"]
        .into_iter()
        .filter(|k| params.get(*k).is_some_and(|v| !v.trim().is_empty()))
        .collect();
    keys.retain(|k| !set.iter().any(|(s, _)| s == k));
    let mut parts: Vec<String> = keys
        .iter()
        .map(|k| format!("{k}={}", query_value(params[*k].trim())))
        .collect();
    parts.extend(set.iter().map(|(k, v)| format!("{k}={}", query_value(v))));
    if parts.is_empty() {
        "/requests".into()
    } else {
        format!("/requests?{}", parts.join("&"))
    }
}

pub(super) fn requests(
    v: &Viewer,
    stops: &[AccountStop],
    params: &HashMap<String, String>,
    page: &RequestPage,
    error: Option<&str>,
) -> Markup {
    let value = |k: &str| {
        params
            .get(k)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let states = [
        RequestState::Queued,
        RequestState::Generating,
        RequestState::Succeeded,
        RequestState::Failed,
        RequestState::Cancelled,
    ];
    let body = html! {
        form.filters method="get" action="/requests" role="search" {
            label { "State "
                select name="state" {
                    option value="" { "any" }
                    @for s in states {
                        option value=(s.as_str()) selected[value("state") == s.as_str()] { (s.as_str()) }
                    }
                }
            }
            label { "Batch " input type="text" name="batch" value=(value("batch")); }
            label { "Identifier or id " input type="search" name="q" value=(value("q")) placeholder="name, credit code, org code"; }
            label { "Created from " input type="datetime-local" name="from" value=(value("from")); }
            label { "to " input type="datetime-local" name="to" value=(value("to")); }
            label { "Error code " input type="text" inputmode="numeric" name="code" value=(value("code")) size="9"; }
            button type="submit" { "Filter" }
            a href="/requests" { "Clear" }
        }
        @if let Some(e) = error { p.error role="alert" { (e) } }
        @if page.rows.is_empty() && error.is_none() {
            p.muted { "No requests match." }
        } @else if !page.rows.is_empty() {
            div.scroll {
                table.list {
                    thead { tr {
                        th.num scope="col" { "Id" } th scope="col" { "Asked for" } th scope="col" { "Type" } th scope="col" { "State" }
                        th.num scope="col" { "Attempts" } th scope="col" { "Batch" } th scope="col" { "Created" } th scope="col" { "Last error" }
                    } }
                    tbody {
                        @for r in &page.rows {
                            tr {
                                td.num { a href=(format!("/requests/{}", r.id)) { (r.id) } }
                                td { a href=(format!("/requests/{}", r.id)) { (r.asked_for()) } }
                                td { (r.report_type.as_str()) }
                                td { (state_badge(r.state.as_str())) }
                                td.num { (r.attempts) "/" (r.max_attempts) }
                                td { @if let Some(b) = &r.batch { a href=(list_url(&HashMap::new(), &[("batch", b.clone())])) { (b) } } }
                                td { (time(r.created_at)) }
                                td.err { @if let Some(c) = r.last_error_code { code { (c) } " " } (r.last_error.as_deref().unwrap_or("")) }
                            }
                        }
                    }
                }
            }
        }
        nav.pager aria-label="Pages" {
            @if page.has_newer { @if let Some(first) = page.rows.first() { a rel="prev" href=(list_url(params, &[("after", first.id.to_string())])) { "← Newer" } } }
            @if page.has_older { @if let Some(last) = page.rows.last() { a rel="next" href=(list_url(params, &[("before", last.id.to_string())])) { "Older →" } } }
        }
    };
    // The newest page follows new rows; a page further back stays still.
    let live = !params.contains_key("before") && !params.contains_key("after");
    layout(v, "Requests", Nav::Requests, stops, None, live, body)
}

fn fact(label: &str, value: Markup) -> Markup {
    html! { dt { (label) } dd { (value) } }
}

fn text_opt(s: &Option<String>) -> Markup {
    html! { @match s { Some(s) if !s.is_empty() => (s), _ => "—" } }
}

pub(super) fn request(
    v: &Viewer,
    stops: &[AccountStop],
    notice: Option<String>,
    r: &RequestDetail,
    events: &[EventLine],
) -> Markup {
    let open = !r.state.is_final();
    let retryable = matches!(r.state, RequestState::Failed | RequestState::Cancelled);
    let metadata = serde_json::to_string_pretty(&r.metadata).unwrap_or_default();
    let body = html! {
        p.lead {
            (state_badge(r.state.as_str())) " "
            (r.report_type.as_str()) " report for "
            strong { @if let Some(n) = r.company_name.as_ref().filter(|n| !n.is_empty()) { (n) } @else { (r.credit_code.as_deref().or(r.org_number.as_deref()).unwrap_or("")) } }
        }
        div.actions {
            @if open { (action_button(v, &format!("/requests/{}/cancel", r.id), "Cancel", &[], "danger")) }
            @if retryable { (action_button(v, &format!("/requests/{}/retry", r.id), "Retry", &[], "primary")) }
            @if !v.can_act() && (open || retryable) {
                p.muted { @if v.token_set { a href=(format!("/login?next=/requests/{}", r.id)) { "Sign in" } " to cancel or retry." } @else { "Read-only (no DASHBOARD_TOKEN)." } }
            }
        }
        @if let Some(e) = &r.last_error {
            section.error-box aria-labelledby="last-error" {
                h2 #last-error { "Last error" }
                p { @if let Some(c) = r.last_error_code { code { (c) } " " } (e) }
                p.muted { (time_opt(r.last_error_at)) }
            }
        }
        div.columns {
            section aria-labelledby="fields" {
                h2 #fields { "Request" }
                dl.facts {
                    (fact("Id", html! { (r.id) }))
                    (fact("Company name", text_opt(&r.company_name)))
                    (fact("Credit code", text_opt(&r.credit_code)))
                    (fact("Organization code", text_opt(&r.org_number)))
                    (fact("Report type", html! { (r.report_type.as_str()) }))
                    (fact("Priority", html! { (r.priority) }))
                    (fact("Batch", html! { @if let Some(b) = &r.batch { a href=(format!("/batches?batch={}", query_value(b))) { (b) } } @else { "—" } }))
                    (fact("Dedupe key", text_opt(&r.dedupe_key)))
                    (fact("Callback URL", text_opt(&r.callback_url)))
                    (fact("Created", time(r.created_at)))
                    (fact("Run after", time(r.run_after)))
                    (fact("Updated", time(r.updated_at)))
                    (fact("Finished", time_opt(r.finished_at)))
                }
            }
            section aria-labelledby="upstream" {
                h2 #upstream { "Upstream" }
                dl.facts {
                    (fact("Job id", html! { @if let Some(j) = &r.upstream_job_id { code { (j) } } @else { "—" } }))
                    (fact("Task created", time_opt(r.upstream_created_at)))
                    (fact("Attempts", html! { (r.attempts) " of " (r.max_attempts) }))
                    (fact("Creates without an answer", html! { (r.unanswered_creates) }))
                    (fact("Polls", html! { (r.polls) }))
                    (fact("Next poll", time_opt(r.next_poll_at)))
                    (fact("Unused tasks kept", html! { (r.orphans) }))
                    (fact("Trace id", html! { @if let Some(t) = &r.trace_id { code { (t) } } @else { "—" } }))
                    (fact("Held by", html! { (r.lease_owner.as_deref().unwrap_or("—")) @if let Some(t) = r.lease_expires_at { " until " (time(t)) } }))
                }
            }
            section aria-labelledby="document" {
                h2 #document { "Document" }
                @if let (Some(name), Some(size), Some(sha)) = (&r.file_name, r.byte_size, &r.sha256) {
                    dl.facts {
                        (fact("File", html! { a href=(format!("/requests/{}/document", r.id)) download { (name) } }))
                        (fact("Size", html! { (bytes(size)) " (" (size) " bytes)" }))
                        (fact("SHA-256", html! { code.hash { (sha) } }))
                        (fact("Type", text_opt(&r.content_type)))
                        (fact("Stored", html! { (time_opt(r.stored_at)) " in " @if let Some(k) = &r.object_key { "object storage: " code { (k) } } @else { "PostgreSQL" } }))
                    }
                } @else {
                    p.muted { "No document stored." }
                }
            }
        }
        section aria-labelledby="history" {
            h2 #history { "History" }
            @if events.is_empty() { p.muted { "No events (purged, or recorded before the event log)." } }
            ol.timeline {
                @for e in events {
                    li {
                        (time(e.at))
                        " "
                        @if let Some(p) = &e.previous_state { (state_badge(p)) " → " }
                        (state_badge(&e.state))
                        span.muted { " attempt " (e.attempts) }
                        @if let Some(j) = &e.upstream_job_id { span.muted { " job " code { (j) } } }
                        @if let Some(a) = &e.action { " " strong { (a) } " by " (e.actor.as_deref().unwrap_or("SQL")) }
                        @if e.error.is_some() || e.error_code.is_some() {
                            div.err { @if let Some(c) = e.error_code { code { (c) } " " } (e.error.as_deref().unwrap_or("")) }
                        }
                    }
                }
            }
        }
        @if metadata != "{}" {
            section aria-labelledby="metadata" {
                h2 #metadata { "Metadata" }
                pre { (metadata) }
            }
        }
    };
    layout(
        v,
        &format!("Request {}", r.id),
        Nav::Requests,
        stops,
        notice,
        open,
        body,
    )
}

fn progress(total: i64, done: i64) -> Markup {
    let pct = if total > 0 {
        100.0 * done as f64 / total as f64
    } else {
        0.0
    };
    html! {
        progress max=(total.max(1)) value=(done) aria-label=(format!("{pct:.0} % finished")) { (format!("{pct:.0} %")) }
        " " span.muted { (format!("{pct:.0} %")) }
    }
}

pub(super) fn batches(v: &Viewer, stops: &[AccountStop], list: &[BatchLine]) -> Markup {
    let body = html! {
        @if list.is_empty() {
            p.muted { "No batches yet: rows get one from " code { "enqueue --csv FILE --batch NAME" } " or the " code { "batch" } " column." }
        } @else {
            div.scroll {
                table.list {
                    thead { tr {
                        th scope="col" { "Batch" } th scope="col" { "Progress" } th.num scope="col" { "Rows" }
                        th.num scope="col" { "Queued" } th.num scope="col" { "Generating" } th.num scope="col" { "Succeeded" }
                        th.num scope="col" { "Failed" } th.num scope="col" { "Cancelled" }
                    } }
                    tbody {
                        @for b in list {
                            tr {
                                td { a href=(format!("/batches?batch={}", query_value(&b.batch))) { (b.batch) } }
                                td { (progress(b.total, b.succeeded + b.failed + b.cancelled)) }
                                td.num { (b.total) } td.num { (b.queued) } td.num { (b.generating) } td.num { (b.succeeded) }
                                td.num { @if b.failed > 0 { a href=(format!("/requests?batch={}&state=failed", query_value(&b.batch))) { (b.failed) } } @else { "0" } }
                                td.num { (b.cancelled) }
                            }
                        }
                    }
                }
            }
            @if list.len() == 20 {
                @if let Some(last) = list.last() {
                    nav.pager aria-label="Pages" { a rel="next" href=(format!("/batches?before={}", last.last_id)) { "Older batches →" } }
                }
            }
        }
    };
    layout(v, "Batches", Nav::Batches, stops, None, true, body)
}

pub(super) fn batch(
    v: &Viewer,
    stops: &[AccountStop],
    notice: Option<String>,
    name: &str,
    s: &BatchSummary,
) -> Markup {
    let count = |state: RequestState| {
        s.states
            .iter()
            .find(|(st, _)| *st == state)
            .map(|(_, n)| *n)
            .unwrap_or(0)
    };
    let total: i64 = s.states.iter().map(|(_, n)| n).sum();
    let finished = count(RequestState::Succeeded)
        + count(RequestState::Failed)
        + count(RequestState::Cancelled);
    let failed = count(RequestState::Failed);
    let q = query_value(name);
    let body = html! {
        p { (progress(total, finished)) " — " (finished) " of " (total) " finished" }
        @if let Some(f) = &s.forecast {
            section aria-labelledby="forecast" {
                h2 #forecast { "Forecast" }
                p #forecast-line { (f.describe(chrono::Utc::now())) }
                dl.facts {
                    (fact("Expected finish", html! { @if let Some(t) = f.finish_at { time datetime=(t.to_rfc3339()) { (t.format("%Y-%m-%d %H:%M:%S UTC")) } } @else { "—" } }))
                    (fact("Decided by", html! { code { (f.limited_by) } }))
                    (fact("Runs into the daily limit", html! { @if let Some(t) = f.runs_into_daily_limit_at { time datetime=(t.to_rfc3339()) { (t.format("%Y-%m-%d %H:%M UTC")) } } @else { "no" } }))
                    (fact("Paid tasks to go", html! { (f.creates_left) }))
                    (fact("Provider calls to go", html! { (f.calls_left) }))
                    (fact("Share of the account", html! { (format!("{:.0} % (weight {})", f.share * 100.0, f.weight)) }))
                }
            }
        }
        ul.cards {
            @for (state, n) in &s.states {
                li.card { a href=(format!("/requests?batch={q}&state={}", state.as_str())) { span.label { (state_badge(state.as_str())) } span.big { (n) } } }
            }
        }
        div.actions {
            a.button href=(format!("/batches/manifest.csv?batch={q}")) download { "Export manifest (CSV)" }
            a.button href=(format!("/requests?batch={q}")) { "All its requests" }
            @if failed > 0 { (action_button(v, "/batches/retry", &format!("Retry the {failed} failed"), &[("batch", name)], "primary")) }
        }
        p.muted { "Every document at once: " code { "report-worker export --batch " (crate::domain::shell_quote(name)) " --out DIR" } " (with manifest.csv)." }
        section aria-labelledby="failures" {
            h2 #failures { "Failures by reason" }
            @if s.failures.is_empty() { p.muted { "None." } } @else {
                table {
                    thead { tr { th scope="col" { "Code" } th scope="col" { "Reason" } th.num scope="col" { "Rows" } } }
                    tbody {
                        @for (code, reason, n) in &s.failures {
                            tr {
                                td { @if let Some(c) = code { a href=(format!("/requests?batch={q}&state=failed&code={c}")) { code { (c) } } } @else { "—" } }
                                td.err { (reason) }
                                td.num { (n) }
                            }
                        }
                    }
                }
            }
        }
    };
    layout(
        v,
        &format!("Batch {name}"),
        Nav::Batches,
        stops,
        notice,
        true,
        body,
    )
}

pub(super) fn spend(v: &Viewer, stops: &[AccountStop], days: &[SpendDay]) -> Markup {
    let chart_values: Vec<Vec<i64>> = days.iter().rev().map(|d| vec![d.paid, d.unknown]).collect();
    let body = html! {
        p.muted { "Days as the provider counts them (Asia/Shanghai). Paid tasks are creates answered with a job id; creates without a usable answer may each be a paid task too." }
        (stacked_bars(
            "Paid tasks per day, last 14 days",
            &[Series { class: "e-create", name: "paid" }, Series { class: "s-failed", name: "unknown outcome" }],
            &chart_values,
            ("−13 d", "today"),
        ))
        div.scroll {
            table.list {
                thead { tr {
                    th scope="col" { "Day" } th.num scope="col" { "Paid tasks" } th.num scope="col" { "Unknown-outcome creates" }
                    th.num scope="col" { "Unused tasks kept" } th.num scope="col" { "Reports stored" } th.num scope="col" { "Served by reuse" } th.num scope="col" { "Calls" }
                    th.num scope="col" { "Calls per report" } th.num scope="col" { "Too fast (67200002)" }
                } }
                tbody {
                    @for d in days {
                        tr {
                            th scope="row" { (d.day.format("%Y-%m-%d")) }
                            td.num { (d.paid) } td.num { (d.unknown) } td.num { (d.orphans) } td.num { (d.stored) } td.num { (d.reused) } td.num { (d.calls) }
                            td.num { @if d.stored > 0 { (format!("{:.1}", d.calls as f64 / d.stored as f64)) } @else { "—" } }
                            td.num { (d.rate_limited) }
                        }
                    }
                }
            }
        }
    };
    layout(v, "Spend", Nav::Spend, stops, None, true, body)
}

pub(super) fn login(v: &Viewer, error: Option<&str>, next: &str) -> Markup {
    let body = html! {
        @if !v.token_set {
            p { "This dashboard is read-only: it was started without " code { "DASHBOARD_TOKEN" } "." }
        } @else {
            @if let Some(e) = error { p.error role="alert" { (e) } }
            form.login method="post" action="/login" {
                (csrf(v))
                input type="hidden" name="next" value=(next);
                label { "Your name (recorded with every action) " input type="text" name="name" required maxlength="64" autocomplete="name"; }
                label { "Dashboard token " input type="password" name="token" required autocomplete="current-password"; }
                button.primary type="submit" { "Sign in" }
            }
        }
    };
    layout(v, "Sign in", Nav::None, &[], None, false, body)
}
