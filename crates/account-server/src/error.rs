use tonic::Status;

/// Everything the account server can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("metadata store: {0}")]
    Db(#[from] redb::Error),
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Precondition(String),
    #[error("unknown or revoked token")]
    BadToken,
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The master's lease lapsed before the write reached the disk.
    #[error("fenced")]
    Fenced(Status),
}

duplex_types::from_redb_errors!(AccountError);

impl From<duplex_types::InvalidInput> for AccountError {
    fn from(e: duplex_types::InvalidInput) -> Self {
        AccountError::Invalid(e.to_string())
    }
}

impl From<AccountError> for Status {
    fn from(e: AccountError) -> Status {
        match &e {
            AccountError::Invalid(_) => Status::invalid_argument(e.to_string()),
            AccountError::Exists(_) => Status::already_exists(e.to_string()),
            AccountError::NotFound(_) => Status::not_found(e.to_string()),
            AccountError::Precondition(_) => Status::failed_precondition(e.to_string()),
            AccountError::BadToken => Status::unauthenticated(e.to_string()),
            AccountError::Fenced(status) => status.clone(),
            AccountError::Db(_) | AccountError::Corrupt(_) => {
                tracing::error!(error = %e, "account store failure");
                Status::internal(e.to_string())
            }
        }
    }
}
