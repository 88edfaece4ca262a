//! Domain types. Generated proto types become these at the edge, through
//! `TryFrom`/constructors that validate, so nothing inside handles raw proto.

mod cluster;
mod ids;
mod names;
mod paths;
pub mod refs;
pub mod retention;
pub mod sealed;

pub use cluster::{Mode, OperationKind, OperationState, OperatorRole, Phase, Role, ServerKind};
pub use ids::{AccountId, ChunkId, Epoch, Lsn, Seq, ServerId, SnapshotId};
pub use names::{NameKind, validate_name};
pub use paths::{PathError, validate_relative_path};

/// The wall clock in unix milliseconds (0 before 1970, a clock nobody runs).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Longest prefix of caller-supplied text an error message repeats.
pub const SHOWN_CHARS: usize = 64;

/// What an error may repeat of a caller-supplied string: at most
/// [`SHOWN_CHARS`] characters, ending in "…" when cut, so a hostile
/// request cannot make a server's answers and logs as large as itself.
pub fn shown(s: &str) -> String {
    match s.char_indices().nth(SHOWN_CHARS) {
        None => s.to_owned(),
        Some((end, _)) => format!("{}…", &s[..end]),
    }
}

/// A value from outside that does not make a valid domain value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidInput {
    #[error("{what} must be {expected} bytes, got {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    // The value came from a caller: only a prefix of it goes back out.
    #[error("{what} {:?} is not valid: {reason}", shown(.value))]
    Malformed {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// Implements `From` for every redb error type on an error enum with a
/// `Db(redb::Error)` variant. Paths resolve where it is used, so this crate
/// needs no redb dependency.
#[macro_export]
macro_rules! from_redb_errors {
    ($error:ty) => {
        $crate::from_redb_errors!(
            $error;
            redb::DatabaseError,
            redb::TransactionError,
            redb::TableError,
            redb::StorageError,
            redb::CommitError
        );
    };
    ($error:ty; $($t:ty),*) => {$(
        impl From<$t> for $error {
            fn from(e: $t) -> Self {
                Self::Db(e.into())
            }
        }
    )*};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_keeps_a_short_prefix() {
        assert_eq!(shown("abc"), "abc");
        let exact = "é".repeat(SHOWN_CHARS);
        assert_eq!(shown(&exact), exact);
        let long = "é".repeat(1 << 20);
        let cut = shown(&long);
        assert_eq!(cut.chars().count(), SHOWN_CHARS + 1);
        assert!(cut.ends_with('…'));
        let err = validate_name(NameKind::Account, &"n".repeat(1 << 20)).unwrap_err();
        assert!(err.to_string().len() < 200, "{err}");
    }
}
