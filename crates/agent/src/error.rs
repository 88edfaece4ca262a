use std::path::PathBuf;

/// What the agent can fail at, each naming the thing that went wrong.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{context}: {} ({:?})", duplex_rpc::exit::describe(status), status.code())]
    Rpc { context: String, status: tonic::Status },
    #[error(transparent)]
    Client(#[from] duplex_rpc::ClientError),
    #[error("{0}")]
    Invalid(String),
    #[error("refusing to restore: {0}")]
    UnsafePath(String),
    #[error("chunk {0} from the server does not match its id or its data_hash (data loss)")]
    Corrupt(String),
    /// Decryption or the keyed-id check failed: tampered or damaged data.
    #[error("integrity check failed: {0}")]
    Integrity(String),
    #[error("wrong passphrase for account {0}: it opens none of the account's keys")]
    WrongPassphrase(String),
}

impl AgentError {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> AgentError {
        let path = path.into();
        move |source| AgentError::Io { path, source }
    }

    pub fn rpc(context: impl Into<String>) -> impl FnOnce(tonic::Status) -> AgentError {
        let context = context.into();
        move |status| AgentError::Rpc { context, status }
    }

    /// The gRPC code, when the failure came from a server.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            AgentError::Rpc { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}
