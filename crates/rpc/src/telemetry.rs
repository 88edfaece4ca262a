//! Tracing setup: human-readable logs on stderr, filtered by `RUST_LOG`
//! (default `info`). Stdout is kept for machine-readable lines.

use std::io::IsTerminal;

pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second init (tests starting servers in process) is harmless.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in log files.
        .with_ansi(std::io::stderr().is_terminal())
        // A log line that cannot be written (stderr closed) is dropped: the
        // default reports it with eprintln!, which panics the writing task,
        // and that task may be the one waiting for SIGTERM.
        .log_internal_errors(false)
        .try_init();
}
