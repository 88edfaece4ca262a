//! What `duplex` and `duplexctl` exit with, so a script can tell a server
//! it could not reach from data found damaged without parsing messages;
//! and their stdout, which outlives a reader that went away.
//!
//! | code | meaning |
//! | ---: | --- |
//! | 0 | done |
//! | 1 | failed (refused, invalid, not found, ...) |
//! | 2 | usage: a bad flag or argument (clap) |
//! | 3 | partial: done, but not all of it (a backup skipped unreadable files) |
//! | 4 | unreachable: no server answered, or none in time |
//! | 5 | integrity: data is missing or damaged, or fails its authentication |

use std::error::Error;
use std::io::Write;

pub const OK: u8 = 0;
pub const ERROR: u8 = 1;
pub const USAGE: u8 = 2;
pub const PARTIAL: u8 = 3;
pub const UNREACHABLE: u8 = 4;
pub const INTEGRITY: u8 = 5;

/// A call to a server that failed, named by what it was for. It keeps the
/// status, so the exit code can say why, but shows only its message.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {}", describe(status))]
pub struct CallFailed {
    pub what: String,
    pub status: tonic::Status,
}

/// A status's message and the causes beneath it ("tcp connect error:
/// Connection refused (os error 111)"), each said once.
pub fn describe(status: &tonic::Status) -> String {
    let mut text = status.message().to_owned();
    let mut cause = status.source();
    while let Some(e) = cause {
        let said = e.to_string();
        if !said.is_empty() && !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = e.source();
    }
    text
}

/// `map_err` for a call: `.map_err(call_failed("failover"))`.
pub fn call_failed(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> CallFailed {
    let what = what.into();
    move |status| CallFailed { what, status }
}

/// A failure that carries its own exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Coded {
    pub code: u8,
    pub message: String,
}

impl Coded {
    pub fn integrity(message: impl Into<String>) -> Coded {
        Coded {
            code: INTEGRITY,
            message: message.into(),
        }
    }

    pub fn partial(message: impl Into<String>) -> Coded {
        Coded {
            code: PARTIAL,
            message: message.into(),
        }
    }
}

/// The code for a gRPC status.
pub fn for_status(status: &tonic::Status) -> u8 {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => UNREACHABLE,
        tonic::Code::DataLoss => INTEGRITY,
        _ => ERROR,
    }
}

/// The code for a failure: the first error in its chain that says, else 1.
pub fn for_error<'a>(chain: impl IntoIterator<Item = &'a (dyn Error + 'static)>) -> u8 {
    for e in chain {
        if let Some(c) = e.downcast_ref::<Coded>() {
            return c.code;
        }
        if let Some(c) = e.downcast_ref::<CallFailed>() {
            return for_status(&c.status);
        }
        if let Some(s) = e.downcast_ref::<tonic::Status>() {
            return for_status(s);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && unreachable(io.kind())
        {
            return UNREACHABLE;
        }
    }
    ERROR
}

fn unreachable(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        kind,
        ConnectionRefused
            | ConnectionReset
            | ConnectionAborted
            | TimedOut
            | HostUnreachable
            | NetworkUnreachable
    )
}

/// Writes to stdout. A reader that went away (`duplexctl status | head`)
/// ends the process quietly with 0, as it would a shell tool, rather than
/// panicking as `println!` does.
pub fn write_stdout(args: std::fmt::Arguments<'_>, newline: bool) {
    let mut out = std::io::stdout().lock();
    let written = out
        .write_fmt(args)
        .and_then(|()| if newline { out.write_all(b"\n") } else { Ok(()) })
        .and_then(|()| out.flush());
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(OK.into());
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(ERROR.into());
    }
}

/// `println!` that survives a closed pipe (see [`write_stdout`]).
#[macro_export]
macro_rules! outln {
    () => { $crate::exit::write_stdout(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::exit::write_stdout(format_args!($($arg)*), true) };
}

/// `print!` that survives a closed pipe (see [`write_stdout`]).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::exit::write_stdout(format_args!($($arg)*), false) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(e: anyhow_like::Error) -> u8 {
        for_error(e.chain())
    }

    /// A two-level chain without anyhow (a library does not depend on it).
    mod anyhow_like {
        #[derive(Debug, thiserror::Error)]
        #[error("context")]
        pub struct Error(#[source] pub Box<dyn std::error::Error + Send + Sync + 'static>);

        impl Error {
            pub fn chain(&self) -> impl Iterator<Item = &(dyn std::error::Error + 'static)> {
                let first: &(dyn std::error::Error + 'static) = self;
                std::iter::successors(Some(first), |e| e.source())
            }
        }
    }

    fn wrapped(e: impl std::error::Error + Send + Sync + 'static) -> anyhow_like::Error {
        anyhow_like::Error(Box::new(e))
    }

    #[test]
    fn each_failure_gets_its_code() {
        let call = |code| call_failed("status")(tonic::Status::new(code, "m"));
        assert_eq!(code_of(wrapped(call(tonic::Code::Unavailable))), UNREACHABLE);
        assert_eq!(code_of(wrapped(call(tonic::Code::DeadlineExceeded))), UNREACHABLE);
        assert_eq!(code_of(wrapped(call(tonic::Code::DataLoss))), INTEGRITY);
        assert_eq!(code_of(wrapped(call(tonic::Code::PermissionDenied))), ERROR);
        assert_eq!(code_of(wrapped(tonic::Status::unavailable("down"))), UNREACHABLE);
        assert_eq!(code_of(wrapped(Coded::partial("3 files skipped"))), PARTIAL);
        assert_eq!(code_of(wrapped(Coded::integrity("chunk damaged"))), INTEGRITY);
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(code_of(wrapped(refused)), UNREACHABLE);
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert_eq!(code_of(wrapped(missing)), ERROR);
    }

    #[test]
    fn a_failed_call_shows_its_message_not_the_status_dump() {
        let e = call_failed("failover")(tonic::Status::failed_precondition("no standby is healthy"));
        assert_eq!(e.to_string(), "failover: no standby is healthy");
    }
}
