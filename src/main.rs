//! The `report-worker` binary: parse the command line, hand over to the library.

use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: under hundreds of concurrent calls the worker
/// spent a tenth of its time contending on glibc's arena locks (perf, BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    report_worker::cli::main()
}
