//! The integration tests: one binary (so the suite links once), one module per concern.
//! Everything runs against real PostgreSQL (TEST_DATABASE_URL) and the simulator over
//! real HTTP on port 0.

mod accounts;
mod apps;
mod batches;
mod browser;
mod cli;
mod common;
mod dashboard;
mod docs;
mod economy;
mod edges;
mod guarantees;
mod layout;
mod managed;
mod objects;
mod observability;
mod ops;
mod pgbouncer;
mod process;
mod queue;
mod scale;
mod schema;
mod spend;
mod torture;
mod traces;
mod upstream;
mod worker;
