//! The `report-worker` binary: parse the command line, hand over to the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    report_worker::cli::main()
}
