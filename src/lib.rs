//! report-worker: a durable PostgreSQL-backed worker for slow, metered report APIs.
//!
//! Applications insert rows into `report_requests`; `report-worker run` claims them,
//! drives the provider's create → poll → download cycle and stores each document.
//!
//! # Map
//!
//! | folder | owns |
//! |---|---|
//! | `domain` | validated values: `ReportType`, `JobId`, `RequestState`, `StopScope`, `NewRequest`, `Document` |
//! | `config` | durations written like `30s`, connection strings without their password |
//! | `spool` | a document's bytes on their way: in memory while small, in a temporary file when not |
//! | `telemetry` | OpenTelemetry traces: the exporter from the `OTEL_*` variables, and each row's trace |
//! | `store/` | where documents' bytes live: PostgreSQL, or S3-compatible object storage |
//! | `webhook` | the signed webhook POST (HMAC-SHA256, no redirects, a timeout per attempt) |
//! | `queue/` | every SQL statement on the `report_*` tables: connect, enqueue, claim, outcomes, accounts, stats, browse, calls, operator actions, documents, webhooks, roles, fixtures |
//! | `upstream/` | the provider's HTTP API and what each answer means (`docs/provider-api.md`) |
//! | `engine/` | what `run` does: the claim loop, one row's life, the account's pacing and stops, leases, heartbeat and LISTEN, the batched writer, the pure policies, metrics |
//! | `simulator/` | a faithful provider for tests, the demo and benchmarks |
//! | `dashboard/` | the web dashboard: server-rendered pages, operators' actions, embedded assets |
//! | `ops/` | status, CSV import, export, the demo, benchmarks, a throwaway PostgreSQL, signals |
//! | `cli/` | the command line: arguments apart from dispatch |
//!
//! # The dependency rule
//!
//! `cli` → `ops` → `engine` / `simulator` / `dashboard` → `queue` / `upstream` / `store` / `webhook` / `telemetry` →
//! `domain` / `config` / `spool`.
//! A module uses only modules of a lower layer (never its own layer or above), and the
//! files of one folder do not import each other in a cycle. `tests/it/layout.rs`
//! checks both on every test run.

pub mod cli;
pub mod config;
pub mod dashboard;
pub mod domain;
pub mod engine;
pub mod ops;
pub mod queue;
pub mod simulator;
pub mod spool;
pub mod store;
pub mod telemetry;
pub mod upstream;
pub mod webhook;
