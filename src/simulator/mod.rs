//! A faithful simulator of the provider (`docs/provider-api.md`), served over real HTTP by
//! `report-worker simulate` or in-process by [`Simulator::start`] for tests, the demo
//! and benchmarks.
//!
//! It owns the provider's behaviour — tokens, validation, task generation over time,
//! pre-signed downloads, metering (QPS, daily limit, balance) and faults — and a control
//! surface under `/_sim/` (counters, outage switch, one-off injected answers). It does
//! not know anything about the worker or the database.
//!
//! Undocumented behaviour, and the choice made here: a status query for an unknown job
//! id answers like a bad parameter (HTTP 200, `status:false`, 68300004), the most
//! plausible answer of this platform's validation layer.

mod answers;
mod api;
mod config;
mod control;
mod cos;
pub mod documents;
mod state;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use chrono::Utc;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use self::api::credit_code_checksum_ok;
pub use self::config::{
    AccountStats, Endpoint, Fault, Injection, SimAccount, SimConfig, SimStats, SimTask,
};
use self::state::{AppState, Inner, Job, Shared, shanghai_today};
use crate::domain::ReportType;

fn router(state: AppState) -> Router {
    let config = &state.config;
    Router::new()
        .route(&config.token_path, post(api::token))
        .route(&config.create_path, post(api::create))
        .route(&config.status_path, get(api::status))
        .route("/cos/company-report/{job_id}/{file}", get(cos::download))
        .route("/_sim/stats", get(control::sim_stats))
        .route("/_sim/outage", post(control::sim_outage))
        .route("/_sim/inject", post(control::sim_inject))
        .fallback(api::not_found)
        .with_state(state)
}

/// A running simulator.
pub struct Simulator {
    pub addr: SocketAddr,
    shared: AppState,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Simulator {
    /// Binds `listen` (port 0 for any) and serves until `stop` or the token is cancelled.
    pub async fn start(config: SimConfig, listen: SocketAddr) -> std::io::Result<Simulator> {
        config
            .paths()
            .check(["--token-path", "--create-path", "--status-path"])
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let seed = config
            .seed
            .unwrap_or_else(|| Utc::now().timestamp_nanos_opt().unwrap_or(0) as u64);
        let mut rng = StdRng::seed_from_u64(seed);
        let signing_key: String = (0..16)
            .map(|_| format!("{:x}", rng.random_range(0..16u8)))
            .collect();
        let today = shanghai_today(config.clock_offset_secs);
        let shared = Arc::new(Shared {
            config,
            signing_key,
            inner: Mutex::new(Inner {
                rng,
                tokens: HashMap::new(),
                jobs: HashMap::new(),
                // Like the provider's: 64-bit ids far above 2^53.
                next_job_id: 1_579_434_053_399_035_904,
                windows: HashMap::new(),
                day: today,
                day_calls: HashMap::new(),
                balance_left: HashMap::new(),
                outage: None,
                injections: Vec::new(),
                stats: SimStats::default(),
                first_create: HashMap::new(),
            }),
        });
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        // Like any production API server: no Nagle delay on small answers.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let shutdown = CancellationToken::new();
        let app = router(shared.clone());
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
        Ok(Simulator {
            addr,
            shared,
            shutdown,
            task,
        })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn config(&self) -> &SimConfig {
        &self.shared.config
    }

    /// How a client reaches this simulator with one of its extra accounts (`accounts`).
    pub fn client_config_for(&self, client_id: &str) -> Option<crate::upstream::ClientConfig> {
        let account = self
            .shared
            .config
            .accounts
            .iter()
            .find(|a| a.client_id == client_id)?;
        let credentials = crate::upstream::Credentials {
            client_id: account.client_id.clone(),
            client_secret: crate::upstream::Secret::new(account.client_secret.clone()),
        };
        let mut config = crate::upstream::ClientConfig::new(self.base_url(), credentials);
        config.paths = self.paths();
        Some(config)
    }

    /// How a client reaches this simulator with its account.
    pub fn client_config(&self) -> crate::upstream::ClientConfig {
        let credentials = crate::upstream::Credentials {
            client_id: self.shared.config.client_id.clone(),
            client_secret: crate::upstream::Secret::new(self.shared.config.client_secret.clone()),
        };
        let mut config = crate::upstream::ClientConfig::new(self.base_url(), credentials);
        config.paths = self.paths();
        config
    }

    /// The paths this simulator serves the calls on.
    pub fn paths(&self) -> crate::upstream::client::Paths {
        self.shared.config.paths()
    }

    pub fn stats(&self) -> SimStats {
        self.shared.lock().stats.clone()
    }

    /// Every metered call answers `code` until switched off with `None`.
    pub fn set_outage(&self, code: Option<i32>) {
        self.shared.lock().outage = code;
    }

    pub fn inject(&self, injection: Injection) {
        self.shared.lock().injections.push(injection);
    }

    /// Forgets every injection still pending.
    pub fn clear_injections(&self) {
        self.shared.lock().injections.clear();
    }

    /// The company the simulated provider resolves a request with these identifiers to
    /// (the one its report is about): the ground truth a test judges documents by.
    pub fn company_of(
        company_name: Option<&str>,
        credit_code: Option<&str>,
        org_number: Option<&str>,
    ) -> String {
        api::company_for(&api::CreateBody {
            company_name: company_name.map(Into::into),
            credit_code: credit_code.map(Into::into),
            org_number: org_number.map(Into::into),
            report_type: None,
        })
    }

    /// When the first create call for `identifier` arrived, if any.
    pub fn first_create(&self, identifier: &str) -> Option<std::time::SystemTime> {
        self.shared.lock().first_create.get(identifier).copied()
    }

    /// Creates `n` tasks directly (no calls counted), each taking `generation`, and
    /// returns their job ids: a backlog of generating tasks for benchmarks.
    pub fn seed_jobs(&self, n: usize, generation: Duration, report_type: ReportType) -> Vec<u64> {
        let mut inner = self.shared.lock();
        let created_on = Utc::now().format("%Y-%m-%d %H:%M UTC").to_string();
        (0..n)
            .map(|i| {
                inner.next_job_id += 1;
                let id = inner.next_job_id;
                let job = Job {
                    created: Instant::now(),
                    generation,
                    fails: false,
                    initial_queue: 0,
                    company: format!("预置企业{i}"),
                    report_type,
                    created_on: created_on.clone(),
                    owner: self.shared.config.client_id.clone(),
                };
                inner.jobs.insert(id, job);
                id
            })
            .collect()
    }

    /// Serves until the process is asked to stop (Ctrl-C) or `cancel` fires.
    pub async fn wait(self, cancel: CancellationToken) {
        cancel.cancelled().await;
        self.stop().await;
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        // Open keep-alive connections would hold graceful shutdown: give them a moment.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}
