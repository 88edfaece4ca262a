//! Domain types. Generated proto types become these at the edge, through
//! `TryFrom`/constructors that validate, so nothing inside handles raw proto.

mod cluster;
mod ids;
mod names;
mod paths;
pub mod sealed;

pub use cluster::{Mode, OperationKind, OperationState, OperatorRole, Phase, Role, ServerKind};
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
