//! What operators and newcomers run besides the engine: status, CSV import, export,
//! the demo, benchmarks, a throwaway PostgreSQL, and signal handling.

pub mod bench;
mod bench_batches;
mod bench_database;
mod bench_economy;
mod bench_kit;
mod bench_live;
mod bench_worker;
pub mod csv_import;
pub mod demo;
pub mod embedded_pg;
pub mod export;
pub mod move_documents;
pub mod signals;
pub mod status;
