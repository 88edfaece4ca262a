//! Tracing setup: logs on stderr, filtered by `RUST_LOG` (default
//! `info`), as text for people or JSON lines for a collector. Stdout is
//! kept for machine-readable lines.

use std::io::IsTerminal;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line: time, level, target, fields, spans.
    Json,
}

/// Text logs (the CLIs).
pub fn init() {
    init_as(LogFormat::Text);
}

pub fn init_as(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in log files.
        .with_ansi(std::io::stderr().is_terminal())
        // A log line that cannot be written (stderr closed) is dropped: the
        // default reports it with eprintln!, which panics the writing task,
        // and that task may be the one waiting for SIGTERM.
        .log_internal_errors(false);
    // A second init (tests starting servers in process) is harmless.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}
