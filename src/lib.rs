//! report-worker: a durable PostgreSQL-backed worker for slow, metered report APIs.
//!
//! Applications insert rows into `report_requests`; `report-worker run` claims them,
//! drives the provider's create → poll → download cycle and stores each document.

pub mod bench;
pub mod cli;
pub mod config;
pub mod csv_import;
pub mod db;
pub mod demo;
pub mod domain;
pub mod embedded_pg;
pub mod export;
pub mod metrics;
pub mod policy;
pub mod queue;
pub mod shutdown;
pub mod simulator;
pub mod upstream;
pub mod worker;
pub mod writer;
