//! The web dashboard (`report-worker dashboard`, or `DASHBOARD_ADDR` on `run`): server-
//! rendered pages over the same database — overview, requests, one request, batches,
//! spending — and operators' actions (cancel, retry, retry a batch's failures, probe a
//! stopped account now), recorded in `report_events` with who did them.
//!
//! - this file: the router, the per-request context (who is looking, their CSRF token),
//!   the security headers, the handlers;
//! - `pages`: the HTML (maud: every interpolated value is escaped);
//! - `chart`: inline SVG charts; `auth`: the token, sessions and CSRF tokens;
//! - `assets/`: the stylesheet, the small live-refresh script and the icon, embedded in
//!   the binary (no CDN, no build step).
//!
//! Every read is a bounded query from `queue::browse`, so a page costs the same at ten
//! million rows; each response says its server time in `Server-Timing`.

pub mod auth;
pub mod chart;
mod pages;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::queue::Db;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form};
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use self::auth::Auth;
use crate::domain::RequestState;
use crate::queue::{self, Action, Cursor, RequestFilter};
use crate::store::DocumentStore;
use crate::upstream::Secret;

/// How the dashboard is served.
#[derive(Debug, Clone)]
pub struct DashboardConfig {
    /// `DASHBOARD_TOKEN`: with it, every page, manifest and document needs signing in
    /// (and actions are possible); without it the dashboard is read-only, for loopback.
    pub token: Option<Secret>,
    /// Where documents' bytes are (for the download links).
    pub documents: DocumentStore,
    /// How often pages refresh themselves when JavaScript is on.
    pub refresh: Duration,
    /// `--public-read`: without a token, serve beyond loopback all the same (every
    /// request and document readable by whoever reaches the port).
    pub public_read: bool,
    /// Reverse proxies whose `X-Forwarded-For` / `X-Forwarded-Proto` are believed (the
    /// client's address for sign-in limits and the event log; HTTPS for `Secure`
    /// cookies).
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

impl DashboardConfig {
    pub fn new(token: Option<Secret>, documents: DocumentStore) -> DashboardConfig {
        DashboardConfig {
            token: token.filter(|t| !t.expose().trim().is_empty()),
            documents,
            refresh: Duration::from_secs(5),
            public_read: false,
            trusted_proxies: Vec::new(),
        }
    }
}

/// Failed sign-ins one client (an IPv4 address, an IPv6 /64) may make within
/// `SIGN_IN_WINDOW`.
const SIGN_IN_FAILURES: usize = 5;
const SIGN_IN_WINDOW: Duration = Duration::from_secs(300);
/// Failed sign-ins all clients together may make within `SIGN_IN_WINDOW`: many
/// addresses guessing at once pause every sign-in.
const SIGN_IN_FAILURES_ALL: usize = 100;
/// Clients remembered at most; when that many failed lately, a client not among them
/// waits too (a flood of new addresses buys no fresh guesses).
const SIGN_IN_CLIENTS: usize = 10_000;
/// The shortest `DASHBOARD_TOKEN` accepted.
pub const MIN_TOKEN_CHARS: usize = 16;

#[derive(Clone)]
struct App {
    pool: Db,
    auth: Option<Auth>,
    documents: DocumentStore,
    refresh: Duration,
    trusted_proxies: std::sync::Arc<Vec<std::net::IpAddr>>,
    /// Recent failed sign-ins per client address (a std mutex, never held across an
    /// await): what limits guessing the token.
    failures: std::sync::Arc<std::sync::Mutex<HashMap<std::net::IpAddr, Vec<Instant>>>>,
}

/// Who is looking, worked out once per request by `context`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Viewer {
    /// A token is configured (actions are possible after signing in).
    pub token_set: bool,
    /// The signed-in person's name.
    pub name: Option<String>,
    /// The CSRF token for this browser's forms (when a token is configured).
    pub csrf: Option<String>,
    /// The browser's CSRF cookie value.
    csrf_cookie: String,
    /// The client's address (the peer's, or the one a trusted proxy forwarded), for the
    /// event log and the sign-in limit.
    peer: Option<std::net::IpAddr>,
    /// The request came over HTTPS (through a trusted proxy): cookies are `Secure`.
    https: bool,
    /// Seconds between live refreshes.
    pub refresh_secs: u64,
}

impl Viewer {
    pub fn can_act(&self) -> bool {
        self.name.is_some()
    }
}

/// Pages are read by people: 50 rows is a screenful and keeps every page cheap.
const PAGE_ROWS: i64 = 50;
/// Chunks a document stored in PostgreSQL is streamed in.
const DOCUMENT_CHUNK: i64 = 1 << 20;

/// The dashboard's routes over `pool`.
pub fn router(pool: Db, config: DashboardConfig) -> Router {
    let app = App {
        pool,
        auth: config.token.as_ref().map(Auth::new),
        documents: config.documents,
        refresh: config.refresh,
        trusted_proxies: std::sync::Arc::new(config.trusted_proxies),
        failures: Default::default(),
    };
    Router::new()
        .route("/", get(overview))
        .route("/requests", get(requests))
        .route("/requests/{id}", get(request))
        .route("/requests/{id}/document", get(document))
        .route("/requests/{id}/cancel", post(cancel))
        .route("/requests/{id}/retry", post(retry))
        .route("/batches", get(batches))
        .route("/batches/manifest.csv", get(manifest))
        .route("/batches/retry", post(retry_batch))
        .route("/spend", get(spend))
        .route("/accounts/probe", post(probe_now))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/assets/app.css", get(css))
        .route("/assets/app.js", get(js))
        .route("/assets/icon.svg", get(icon))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), context))
        .with_state(app)
}

/// Serves the dashboard on `addr` until `cancel`; returns the bound address. Without a
/// token it serves loopback only, unless `public_read` says otherwise explicitly (then
/// it warns); with one beyond loopback and no trusted proxy, it warns that the token and
/// the session cross the network in clear unless TLS ends in front of it.
pub async fn serve(
    addr: SocketAddr,
    pool: Db,
    config: DashboardConfig,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    if let Some(token) = &config.token
        && token.expose().trim().chars().count() < MIN_TOKEN_CHARS
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "DASHBOARD_TOKEN is shorter than {MIN_TOKEN_CHARS} characters: anyone could guess it; use a long random value (e.g. openssl rand -hex 16)"
            ),
        ));
    }
    if !addr.ip().is_loopback() {
        match (&config.token, config.public_read) {
            (None, false) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "{addr} is reachable from other hosts and no DASHBOARD_TOKEN is set: anyone who reaches it could read every request and download every document; set DASHBOARD_TOKEN, listen on 127.0.0.1, or pass --public-read (DASHBOARD_PUBLIC_READ=true) to serve it read-only to everyone"
                    ),
                ));
            }
            (None, true) => tracing::warn!(
                %addr,
                "the dashboard is served read-only to everyone who can reach it (--public-read): every request and document is readable"
            ),
            (Some(_), _) if config.trusted_proxies.is_empty() => tracing::warn!(
                %addr,
                "the dashboard listens beyond this host: put TLS in front of it (and name that proxy in DASHBOARD_TRUSTED_PROXIES for Secure cookies), or the token and sessions cross the network in clear"
            ),
            (Some(_), _) => {}
        }
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(pool, config);
    tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await;
    });
    Ok(bound)
}

/// The client's address and whether it came over HTTPS: the peer's own, unless the
/// peer is a trusted proxy, whose `X-Forwarded-For` and `X-Forwarded-Proto` are then
/// believed. `X-Forwarded-For` is read from the right, hop by hop, for as long as each
/// hop is a trusted proxy: the first address that is not is the client; an entry that
/// cannot be read ends the walk at the last trusted hop (a client cannot pick its own
/// address by sending garbage before it). Addresses are compared canonically (an IPv4
/// proxy seen as `::ffff:a.b.c.d` on a dual-stack socket is the same proxy).
fn client(
    trusted: &[std::net::IpAddr],
    peer: Option<std::net::IpAddr>,
    headers: &HeaderMap,
) -> (Option<std::net::IpAddr>, bool) {
    let peer = peer.map(|p| p.to_canonical());
    let is_trusted = |a: std::net::IpAddr| trusted.iter().any(|t| t.to_canonical() == a);
    let Some(peer) = peer.filter(|p| is_trusted(*p)) else {
        return (peer, false);
    };
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    let mut address = peer;
    for hop in hops.iter().rev() {
        let Some(ip) = forwarded_address(hop) else {
            break;
        };
        address = ip;
        if !is_trusted(ip) {
            break;
        }
    }
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"));
    (Some(address), https)
}

/// One `X-Forwarded-For` entry: an address, `a.b.c.d:port` or `[v6]:port`.
fn forwarded_address(hop: &str) -> Option<std::net::IpAddr> {
    let hop = hop.trim();
    hop.parse::<std::net::IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .map(|ip| ip.to_canonical())
}

/// Pages anyone may fetch, signed in or not: the sign-in page and the assets it needs.
fn public_path(path: &str) -> bool {
    path == "/login" || path.starts_with("/assets/")
}

/// Per request: who is looking (session, CSRF cookie — set when missing); with a token,
/// nothing but the sign-in page is served to someone not signed in; then the security
/// headers and the server time on the way out.
async fn context(State(app): State<App>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let headers = req.headers();
    let mut new_csrf_cookie = None;
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let (peer, https) = client(&app.trusted_proxies, peer, headers);
    let mut viewer = Viewer {
        token_set: app.auth.is_some(),
        peer,
        https,
        refresh_secs: app.refresh.as_secs().max(1),
        ..Viewer::default()
    };
    if let Some(auth) = &app.auth {
        let csrf_cookie = match auth::cookie(headers, auth::CSRF_COOKIE) {
            Some(c) if c.len() == 32 && c.bytes().all(|b| b.is_ascii_hexdigit()) => c.to_string(),
            _ => {
                let c = auth::random_cookie_value();
                new_csrf_cookie = Some(c.clone());
                c
            }
        };
        viewer.csrf = Some(auth.csrf_token(&csrf_cookie));
        viewer.name = auth::cookie(headers, auth::SESSION_COOKIE)
            .and_then(|v| auth.session_name(v, auth::now_secs()));
        viewer.csrf_cookie = csrf_cookie;
    }
    let path = req.uri().path().to_string();
    let must_sign_in = viewer.token_set && viewer.name.is_none() && !public_path(&path);
    let secure = viewer.https;
    let mut res = if must_sign_in && req.method() == axum::http::Method::GET {
        // Pages, manifests and documents alike: sign in first, then come back here.
        let back = req
            .uri()
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string());
        let to: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("next", &back)
            .finish();
        Redirect::to(&format!("/login?{to}")).into_response()
    } else if must_sign_in && path != "/logout" {
        PageError::Forbidden("sign in first: this dashboard is for those who have its token".into())
            .into_response()
    } else {
        req.extensions_mut().insert(viewer);
        next.run(req).await
    };
    let h = res.headers_mut();
    if let Some(c) = new_csrf_cookie
        && let Ok(v) = HeaderValue::from_str(&auth::set_cookie(auth::CSRF_COOKIE, &c, None, secure))
    {
        h.append(header::SET_COOKIE, v);
    }
    let fixed = [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "same-origin"),
    ];
    for (name, value) in fixed {
        h.insert(name, HeaderValue::from_static(value));
    }
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if let Ok(v) = HeaderValue::from_str(&format!(
        "app;dur={:.2}",
        started.elapsed().as_secs_f64() * 1000.0
    )) {
        h.insert("server-timing", v);
    }
    res
}

/// What went wrong, as a page with the right status.
#[derive(Debug)]
enum PageError {
    NotFound(String),
    BadRequest(String),
    Forbidden(String),
    Database(sqlx::Error),
    Unavailable(String),
}

impl From<sqlx::Error> for PageError {
    fn from(e: sqlx::Error) -> Self {
        PageError::Database(e)
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            PageError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            PageError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            PageError::Forbidden(m) => (StatusCode::FORBIDDEN, m),
            PageError::Database(e) => {
                tracing::warn!(error = %e, "dashboard: database error");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the database did not answer: {e}"),
                )
            }
            PageError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
        };
        (status, pages::error_page(status, &message)).into_response()
    }
}

type PageResult = Result<Response, PageError>;

/// Parameters of a GET, as sent (`Query` of a map, so a bad value gets our message).
type Params = Query<HashMap<String, String>>;

fn param<'a>(params: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    params.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
}

/// A confirmation shown after an action (from a fixed list: nothing a link can forge).
fn notice(params: &HashMap<String, String>) -> Option<String> {
    let n: i64 = param(params, "n").and_then(|n| n.parse().ok()).unwrap_or(0);
    let text = match (param(params, "done")?, n) {
        ("cancel", 0) => "Nothing to cancel: the request had already finished.".to_string(),
        ("cancel", _) => "Cancelled.".to_string(),
        ("retry", 0) => {
            "Nothing to retry: only failed or cancelled requests can be retried.".to_string()
        }
        ("retry", _) => "Queued again (a fresh set of attempts).".to_string(),
        ("retry_batch", n) => format!("{n} failed requests of the batch queued again."),
        ("probe_now", 0) => "The account is not stopped (any more).".to_string(),
        ("probe_now", _) => "The next worker to look will probe the account now.".to_string(),
        ("login", _) => "Signed in: actions are recorded with your name.".to_string(),
        ("logout", _) => "Signed out.".to_string(),
        _ => return None,
    };
    Some(text)
}

async fn overview(
    State(app): State<App>,
    Extension(v): Extension<Viewer>,
    Query(params): Params,
) -> PageResult {
    let pool = &app.pool;
    let data = pages::Overview {
        stats: queue::queue_stats(pool).await?,
        minutes: queue::finished_series(pool, "minute", 60).await?,
        hours: queue::finished_series(pool, "hour", 24).await?,
        calls: queue::calls_per_minute(pool, Duration::from_secs(3600)).await?,
        qps: queue::qps_use(pool).await?,
        latencies: queue::latencies(pool).await?,
        webhooks: queue::delivery_counts(pool).await?,
        account_events: queue::account_events(pool, 5).await?,
        unpolled: queue::unpolled_accounts(pool).await?,
    };
    let stops = queue::account_stops(pool).await?;
    Ok(pages::overview(&v, &stops, notice(&params), &data).into_response())
}

fn parse_filter(params: &HashMap<String, String>) -> Result<RequestFilter, String> {
    let state = param(params, "state")
        .map(|s| s.parse::<RequestState>().map_err(|e| e.to_string()))
        .transpose()?;
    let time = |name: &str| {
        param(params, name)
            .map(|s| {
                parse_time(s).ok_or_else(|| {
                    format!("{name} must be a date and time like 2026-11-29T08:30 (UTC), not {s:?}")
                })
            })
            .transpose()
    };
    let error_code = param(params, "code")
        .map(|s| {
            s.parse::<i32>()
                .map_err(|_| format!("code must be an error code (a number), not {s:?}"))
        })
        .transpose()?;
    Ok(RequestFilter {
        state,
        batch: param(params, "batch").map(str::to_string),
        identifier: param(params, "q").map(str::to_string),
        created_from: time("from")?,
        created_to: time("to")?,
        error_code,
    })
}

/// A moment as typed in a form: RFC 3339, `YYYY-MM-DDTHH:MM[:SS]` (UTC) or a date.
fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, format) {
            return Some(t.and_utc());
        }
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

fn parse_cursor(params: &HashMap<String, String>) -> Result<Cursor, String> {
    let id = |name: &str| {
        param(params, name)
            .map(|s| {
                s.parse::<i64>()
                    .map_err(|_| format!("{name} must be a request id, not {s:?}"))
            })
            .transpose()
    };
    Ok(match (id("before")?, id("after")?) {
        (Some(b), _) => Cursor::Before(b),
        (None, Some(a)) => Cursor::After(a),
        (None, None) => Cursor::Newest,
    })
}

async fn requests(
    State(app): State<App>,
    Extension(v): Extension<Viewer>,
    Query(params): Params,
) -> PageResult {
    let stops = queue::account_stops(&app.pool).await?;
    let parsed = parse_filter(&params).and_then(|f| Ok((f, parse_cursor(&params)?)));
    match parsed {
        Ok((filter, cursor)) => {
            let page = queue::list_requests(&app.pool, &filter, cursor, PAGE_ROWS).await?;
            Ok(pages::requests(&v, &stops, &params, &page, None).into_response())
        }
        Err(message) => Ok((
            StatusCode::BAD_REQUEST,
            pages::requests(&v, &stops, &params, &Default::default(), Some(&message)),
        )
            .into_response()),
    }
}

fn parse_id(raw: &str) -> Result<i64, PageError> {
    raw.parse()
        .map_err(|_| PageError::NotFound(format!("no request {raw:?}: ids are numbers")))
}

async fn request(
    State(app): State<App>,
    Extension(v): Extension<Viewer>,
    Path(id): Path<String>,
    Query(params): Params,
) -> PageResult {
    let id = parse_id(&id)?;
    let detail = queue::request_detail(&app.pool, id)
        .await?
        .ok_or_else(|| PageError::NotFound(format!("there is no request {id}")))?;
    let events = queue::request_events(&app.pool, id, 500).await?;
    let stops = queue::account_stops(&app.pool).await?;
    Ok(pages::request(&v, &stops, notice(&params), &detail, &events).into_response())
}

/// Streams a stored document, from PostgreSQL in chunks or from object storage.
async fn document(State(app): State<App>, Path(id): Path<String>) -> PageResult {
    let id = parse_id(&id)?;
    let doc = queue::document_meta(&app.pool, id)
        .await?
        .ok_or_else(|| PageError::NotFound(format!("request {id} has no stored document")))?;
    let body = match &doc.object_key {
        Some(key) => {
            if matches!(app.documents, DocumentStore::Postgres) {
                return Err(PageError::Unavailable(format!(
                    "request {id}'s document is in object storage ({key}): start the dashboard with DOCUMENT_STORE set to its bucket"
                )));
            }
            let stream = app.documents.stream(key).await.map_err(|e| {
                PageError::Unavailable(format!("object storage did not serve {key}: {e}"))
            })?;
            Body::from_stream(stream)
        }
        None => {
            let pool = app.pool.clone();
            let size = doc.byte_size;
            let sha256 = doc.sha256.clone();
            let chunks = futures_util::stream::unfold(0i64, move |offset| {
                let (pool, sha256) = (pool.clone(), sha256.clone());
                async move {
                    if offset >= size {
                        return None;
                    }
                    let len = DOCUMENT_CHUNK.min(size - offset);
                    match queue::document_slice(&pool, id, &sha256, offset, len).await {
                        Ok(Some(bytes)) if !bytes.is_empty() => {
                            let next = offset + bytes.len() as i64;
                            Some((Ok(bytes::Bytes::from(bytes)), next))
                        }
                        Ok(_) => Some((
                            Err(std::io::Error::other(
                                "the document is gone or was replaced",
                            )),
                            size,
                        )),
                        Err(e) => Some((Err(std::io::Error::other(e)), size)),
                    }
                }
            });
            Body::from_stream(chunks.boxed())
        }
    };
    let digest = hex::decode(&doc.sha256)
        .map(|d| {
            use base64::Engine;
            format!(
                "sha-256=:{}:",
                base64::engine::general_purpose::STANDARD.encode(d)
            )
        })
        .unwrap_or_default();
    let headers = [
        (header::CONTENT_TYPE, doc.content_type.clone()),
        (header::CONTENT_LENGTH, doc.byte_size.to_string()),
        (
            header::CONTENT_DISPOSITION,
            content_disposition(&doc.file_name),
        ),
        (header::HeaderName::from_static("repr-digest"), digest),
        (header::CACHE_CONTROL, "private, no-store".into()),
    ];
    let mut res = body.into_response();
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            res.headers_mut().insert(name, v);
        }
    }
    Ok(res)
}

/// `attachment` with an ASCII fallback name and the real (UTF-8) name (RFC 6266).
fn content_disposition(file_name: &str) -> String {
    let fallback: String = file_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._- ".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let encoded =
        percent_encoding::utf8_percent_encode(file_name, percent_encoding::NON_ALPHANUMERIC);
    format!("attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}")
}

async fn batches(
    State(app): State<App>,
    Extension(v): Extension<Viewer>,
    Query(params): Params,
) -> PageResult {
    let stops = queue::account_stops(&app.pool).await?;
    if let Some(batch) = param(&params, "batch") {
        let summary = queue::batch_summary(&app.pool, batch).await?;
        if summary.states.is_empty() {
            return Err(PageError::NotFound(format!("there is no batch {batch:?}")));
        }
        return Ok(pages::batch(&v, &stops, notice(&params), batch, &summary).into_response());
    }
    let before = param(&params, "before")
        .map(|s| {
            s.parse::<i64>().map_err(|_| {
                PageError::BadRequest(format!("before must be a request id, not {s:?}"))
            })
        })
        .transpose()?;
    let list = queue::batches(&app.pool, before, 20).await?;
    Ok(pages::batches(&v, &stops, &list).into_response())
}

/// A batch's manifest: every request of it with its state, document and error.
async fn manifest(State(app): State<App>, Query(params): Params) -> PageResult {
    let batch = param(&params, "batch")
        .ok_or_else(|| PageError::BadRequest("batch is required".into()))?
        .to_string();
    let mut out = csv::Writer::from_writer(crate::domain::UTF8_BOM.to_vec());
    let csv_error = |e: csv::Error| PageError::Unavailable(format!("writing the manifest: {e}"));
    out.write_record([
        "id",
        "identifier",
        "report_type",
        "state",
        "sha256",
        "error",
        "document",
    ])
    .map_err(csv_error)?;
    let mut after = 0;
    loop {
        let page = queue::batch_manifest_page(&app.pool, &batch, after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        for r in page {
            let link = if r.sha256.is_some() {
                format!("/requests/{}/document", r.id)
            } else {
                String::new()
            };
            let cell = crate::domain::spreadsheet_cell;
            out.write_record([
                r.id.to_string(),
                cell(&r.identifier).into_owned(),
                r.report_type.as_str().to_string(),
                r.state.as_str().to_string(),
                r.sha256.unwrap_or_default(),
                cell(r.error.as_deref().unwrap_or("")).into_owned(),
                link,
            ])
            .map_err(csv_error)?;
        }
    }
    let bytes = out
        .into_inner()
        .map_err(|e| PageError::Unavailable(format!("writing the manifest: {e}")))?;
    if after == 0 {
        return Err(PageError::NotFound(format!("there is no batch {batch:?}")));
    }
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                content_disposition(&format!("{batch}-manifest.csv")),
            ),
        ],
        bytes,
    )
        .into_response())
}

async fn spend(State(app): State<App>, Extension(v): Extension<Viewer>) -> PageResult {
    let stops = queue::account_stops(&app.pool).await?;
    let days = queue::spend_by_day(&app.pool, 14).await?;
    Ok(pages::spend(&v, &stops, &days).into_response())
}

/// The checks every action passes: a token is configured, the POST comes from our own
/// page with this browser's CSRF token, and someone is signed in. Returns the actor
/// recorded with the action.
fn authorize(
    app: &App,
    v: &Viewer,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Result<String, PageError> {
    let Some(auth) = &app.auth else {
        return Err(PageError::Forbidden(
            "this dashboard is read-only: start it with DASHBOARD_TOKEN set to allow actions"
                .into(),
        ));
    };
    check_csrf(auth, v, headers, form)?;
    let Some(name) = &v.name else {
        return Err(PageError::Forbidden(
            "sign in first (Sign in, at the top of the page)".into(),
        ));
    };
    Ok(match v.peer {
        Some(peer) => format!("dashboard:{name} ({peer})"),
        None => format!("dashboard:{name}"),
    })
}

fn check_csrf(
    auth: &Auth,
    v: &Viewer,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Result<(), PageError> {
    if !auth::same_origin(headers) {
        return Err(PageError::Forbidden(
            "this form was sent from another site".into(),
        ));
    }
    let given = form.get("csrf").map(String::as_str).unwrap_or("");
    if !auth.csrf_matches(&v.csrf_cookie, given) {
        return Err(PageError::Forbidden(
            "the form's CSRF token is missing or wrong: reload the page and try again".into(),
        ));
    }
    Ok(())
}

async fn act(app: &App, actor: &str, action: &Action) -> Result<i64, PageError> {
    tracing::info!(%actor, action = action.name(), ?action, "dashboard action");
    Ok(queue::act(&app.pool, actor, action).await?)
}

fn done(path: &str, action: &Action, n: i64) -> Response {
    let sep = if path.contains('?') { '&' } else { '?' };
    Redirect::to(&format!("{path}{sep}done={}&n={n}", action.name())).into_response()
}

async fn cancel(
    State(app): State<App>,
    Extension(v): Extension<Viewer>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> PageResult {
    let actor = authorize(&app, &v, &headers, &form)?;
    let id = parse_id(&id)?;
    let action = Action::Cancel(id);
    let n = act(&app, &actor, &action).await?;
    Ok(done(&format!("/requests/{id}"), &action, n))
}

async fn retry(
    State(app): State<App>,
    Extension(v): Extension<Viewer>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> PageResult {
    let actor = authorize(&app, &v, &headers, &form)?;
    let id = parse_id(&id)?;
    let action = Action::Retry(id);
    let n = act(&app, &actor, &action).await?;
    Ok(done(&format!("/requests/{id}"), &action, n))
}

async fn retry_batch(
    State(app): State<App>,
    Extension(v): Extension<Viewer>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> PageResult {
    let actor = authorize(&app, &v, &headers, &form)?;
    let batch = param(&form, "batch")
        .ok_or_else(|| PageError::BadRequest("batch is required".into()))?
        .to_string();
    let action = Action::RetryBatch(batch.clone());
    let n = act(&app, &actor, &action).await?;
    let path = format!("/batches?batch={}", pages::query_value(&batch));
    Ok(done(&path, &action, n))
}

async fn probe_now(
    State(app): State<App>,
    Extension(v): Extension<Viewer>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> PageResult {
    let actor = authorize(&app, &v, &headers, &form)?;
    let account = param(&form, "account")
        .ok_or_else(|| PageError::BadRequest("account is required".into()))?
        .to_string();
    let action = Action::ProbeNow(account);
    let n = act(&app, &actor, &action).await?;
    Ok(done("/", &action, n))
}

async fn login_page(Extension(v): Extension<Viewer>, Query(params): Params) -> Response {
    let next = safe_next(param(&params, "next"));
    pages::login(&v, None, &next).into_response()
}

impl App {
    /// How long this client must wait before its next sign-in, if it (or everyone
    /// together) made too many wrong ones lately.
    fn sign_in_pause(&self, client: Option<std::net::IpAddr>) -> Option<Duration> {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let wait = |recent: &[Instant], limit: usize| {
            let recent: Vec<&Instant> = recent
                .iter()
                .filter(|at| at.elapsed() < SIGN_IN_WINDOW)
                .collect();
            (recent.len() >= limit)
                .then(|| {
                    recent
                        .iter()
                        .min()
                        .map(|o| SIGN_IN_WINDOW.saturating_sub(o.elapsed()))
                })
                .flatten()
        };
        let all: Vec<Instant> = failures.values().flatten().copied().collect();
        if let Some(pause) = wait(&all, SIGN_IN_FAILURES_ALL) {
            return Some(pause);
        }
        let key = client.map(sign_in_key)?;
        match failures.get(&key) {
            Some(own) => wait(own, SIGN_IN_FAILURES),
            None if failures.len() >= SIGN_IN_CLIENTS => Some(SIGN_IN_WINDOW),
            None => None,
        }
    }

    fn sign_in_failed(&self, client: Option<std::net::IpAddr>) {
        let Some(key) = client.map(sign_in_key) else {
            return;
        };
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() >= SIGN_IN_CLIENTS && !failures.contains_key(&key) {
            failures.retain(|_, at| at.iter().any(|a| a.elapsed() < SIGN_IN_WINDOW));
            if failures.len() >= SIGN_IN_CLIENTS {
                return;
            }
        }
        let at = failures.entry(key).or_default();
        at.retain(|a| a.elapsed() < SIGN_IN_WINDOW);
        at.push(Instant::now());
    }
}

/// Whose sign-ins count together: an IPv4 address, or an IPv6 address's /64 (one
/// host can hold a whole /64).
fn sign_in_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip.to_canonical() {
        std::net::IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            std::net::IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// Only a path on this dashboard (never `//host` or `https://…`).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.contains('\\')
                // Browsers drop tabs and newlines from URLs: `/\t/evil` is `//evil`.
                && !n.chars().any(|c| c.is_control() || c.is_whitespace()) =>
        {
            n.into()
        }
        _ => "/".into(),
    }
}

async fn login(
    State(app): State<App>,
    Extension(v): Extension<Viewer>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> PageResult {
    let Some(auth) = &app.auth else {
        return Err(PageError::Forbidden(
            "this dashboard is read-only: start it with DASHBOARD_TOKEN set to allow actions"
                .into(),
        ));
    };
    check_csrf(auth, &v, &headers, &form)?;
    let next = safe_next(form.get("next").map(String::as_str));
    let refuse = |message: &str| {
        Ok((
            StatusCode::FORBIDDEN,
            pages::login(&v, Some(message), &next),
        )
            .into_response())
    };
    // Guessing the token: a few wrong ones per client address, then a pause.
    if let Some(wait) = app.sign_in_pause(v.peer) {
        let message = format!(
            "too many wrong tokens from this address: try again in {} s",
            wait.as_secs().max(1)
        );
        let mut res = (
            StatusCode::TOO_MANY_REQUESTS,
            pages::login(&v, Some(&message), &next),
        )
            .into_response();
        if let Ok(after) = HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
            res.headers_mut().insert(header::RETRY_AFTER, after);
        }
        return Ok(res);
    }
    let name = match auth::valid_name(form.get("name").map(String::as_str).unwrap_or("")) {
        Ok(name) => name,
        Err(message) => return refuse(&message),
    };
    if !auth.token_matches(form.get("token").map(String::as_str).unwrap_or("")) {
        tracing::warn!(
            peer = v.peer.map(tracing::field::display),
            "dashboard: sign-in with a wrong token"
        );
        app.sign_in_failed(v.peer);
        return refuse("that is not the dashboard's token");
    }
    let expires = auth::now_secs() + auth::SESSION_LIFETIME.as_secs();
    let cookie = auth::set_cookie(
        auth::SESSION_COOKIE,
        &auth.session_value(&name, expires),
        Some(auth::SESSION_LIFETIME),
        v.https,
    );
    let sep = if next.contains('?') { '&' } else { '?' };
    let mut res = Redirect::to(&format!("{next}{sep}done=login")).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(res)
}

async fn logout(
    State(app): State<App>,
    Extension(v): Extension<Viewer>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> PageResult {
    if let Some(auth) = &app.auth {
        check_csrf(auth, &v, &headers, &form)?;
    }
    let mut res = Redirect::to("/?done=logout").into_response();
    let cookie = auth::set_cookie(auth::SESSION_COOKIE, "", Some(Duration::ZERO), v.https);
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(res)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", include_str!("assets/app.css"))
}

async fn js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("assets/app.js"),
    )
}

async fn icon() -> Response {
    asset("image/svg+xml", include_str!("assets/icon.svg"))
}

async fn not_found() -> PageError {
    PageError::NotFound("there is no such page".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_page_after_sign_in_stays_on_this_dashboard() {
        for bad in [
            "//evil.example",
            "/\\evil",
            "/\t/evil.example",
            "/\n/x",
            "https://e",
            "x",
        ] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad:?}");
        }
        assert_eq!(
            safe_next(Some("/requests?state=failed")),
            "/requests?state=failed"
        );
    }

    #[test]
    fn a_trusted_proxy_is_recognised_in_either_address_family() {
        let trusted = vec!["10.0.0.1".parse().unwrap()];
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "198.51.100.3".parse().unwrap());
        // On a dual-stack socket the IPv4 proxy arrives as ::ffff:10.0.0.1.
        let peer = Some("::ffff:10.0.0.1".parse().unwrap());
        assert_eq!(
            client(&trusted, peer, &headers).0,
            Some("198.51.100.3".parse().unwrap())
        );
        // An untrusted peer is itself, whatever it says.
        let peer = Some("192.0.2.5".parse().unwrap());
        assert_eq!(client(&trusted, peer, &headers).0, peer);
    }
}
