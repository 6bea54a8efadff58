//! How a binary ends: an error reaches the user as one line per cause, never as a backtrace
//! (the environment may ask for backtraces, as `RUST_BACKTRACE=1` does; they are for panics).

use std::process::ExitCode;

/// The process's exit code for `result`, printing an error with its causes to stderr.
pub fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
