//! The control surface for tests and benchmarks, under `/_sim/`: counters, the outage
//! switch, one-off injected answers.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;

use super::config::*;
use super::state::*;

pub(super) async fn sim_stats(State(s): State<AppState>) -> Json<SimStats> {
    Json(s.lock().stats.clone())
}

#[derive(Deserialize)]
pub(super) struct OutageBody {
    pub(super) code: Option<i32>,
}

pub(super) async fn sim_outage(
    State(s): State<AppState>,
    Json(body): Json<OutageBody>,
) -> StatusCode {
    s.lock().outage = body.code;
    StatusCode::NO_CONTENT
}

pub(super) async fn sim_inject(
    State(s): State<AppState>,
    Json(body): Json<Injection>,
) -> StatusCode {
    s.lock().injections.push(body);
    StatusCode::NO_CONTENT
}
