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
            StoreError::MissingChunks { .. } => Status::failed_precondition(e.to_string()),
            StoreError::NotFound(_) => Status::not_found(e.to_string()),
            StoreError::Corrupt { .. } => Status::data_loss(e.to_string()),
            StoreError::QuotaExceeded { .. } => {
                let mut status = Status::resource_exhausted(e.to_string());
                status.metadata_mut().insert(
                    duplex_rpc::client::QUOTA_METADATA_KEY,
                    tonic::metadata::MetadataValue::from_static("1"),
                );
                status
            }
            StoreError::Fenced(_) => {
                let mut status = Status::unavailable(e.to_string());
                status.metadata_mut().insert(
                    duplex_rpc::heartbeat::FENCED_METADATA_KEY,
                    tonic::metadata::MetadataValue::from_static("1"),
                );
                status
            }
            StoreError::Io { .. } | StoreError::Db(_) => {
                tracing::error!(error = %e, "storage failure");
                Status::internal(e.to_string())
            }
        }
    }
}
