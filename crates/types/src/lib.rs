//! Domain types. Generated proto types become these at the edge, through
//! `TryFrom`/constructors that validate, so nothing inside handles raw proto.

mod ids;
mod names;
mod paths;

pub use ids::{AccountId, ChunkId, Epoch, Lsn, Seq, ServerId, SnapshotId};
pub use names::{NameKind, validate_name};
pub use paths::{PathError, validate_relative_path};

/// A value from outside that does not make a valid domain value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidInput {
    #[error("{what} must be {expected} bytes, got {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{what} {value:?} is not valid: {reason}")]
    Malformed {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
}
