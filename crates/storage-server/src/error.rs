//! The one mapping from engine errors to gRPC statuses.

use tonic::Status;

use crate::store::StoreError;

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        match &e {
            StoreError::Invalid(_) => Status::invalid_argument(e.to_string()),
            StoreError::HashMismatch { .. } => {
                tracing::warn!(error = %e, "refused a chunk whose payload does not match its hash");
                Status::data_loss(e.to_string())
            }
            StoreError::MissingChunks { .. } => flagged(
                Status::failed_precondition(e.to_string()),
                duplex_rpc::client::MISSING_METADATA_KEY,
            ),
            StoreError::NotFound(_) => Status::not_found(e.to_string()),
            StoreError::Corrupt { .. } => Status::data_loss(e.to_string()),
            StoreError::QuotaExceeded { .. } => flagged(
                Status::resource_exhausted(e.to_string()),
                duplex_rpc::client::QUOTA_METADATA_KEY,
            ),
            StoreError::Fenced(_) => flagged(
                Status::unavailable(e.to_string()),
                duplex_rpc::heartbeat::FENCED_METADATA_KEY,
            ),
            StoreError::Io { .. } | StoreError::Db(_) | StoreError::Internal(_) => {
                tracing::error!(error = %e, "storage failure");
                Status::internal(e.to_string())
            }
        }
    }
}

/// A status with a metadata flag clients act on (retry elsewhere, never
/// retry, upload again).
fn flagged(mut status: Status, key: &'static str) -> Status {
    status
        .metadata_mut()
        .insert(key, tonic::metadata::MetadataValue::from_static("1"));
    status
}
