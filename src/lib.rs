//! report-worker: a durable PostgreSQL-backed worker for slow, metered report APIs.
//!
//! Applications insert rows into `report_requests`; `report-worker run` claims them,
//! drives the provider's create → poll → download cycle and stores each document.

pub mod cli;
pub mod config;
pub mod domain;
pub mod engine;
pub mod ops;
pub mod queue;
pub mod simulator;
pub mod upstream;
