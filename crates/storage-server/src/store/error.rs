use duplex_types::ChunkId;

/// Everything the storage engine can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("metadata store: {0}")]
    Db(#[from] redb::Error),
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("chunk {id}: payload does not match its data_hash (damaged on the way)")]
    HashMismatch { id: ChunkId },
    #[error("snapshot names {count} chunks this server does not hold, e.g. {first}")]
    MissingChunks { count: usize, first: ChunkId },
    #[error("{0} not found")]
    NotFound(String),
    #[error("stored chunk {id} is corrupt: {reason}")]
    Corrupt { id: ChunkId, reason: String },
    #[error(
        "the account's quota of {} is used up: {} stored, and this upload adds {} more \
         (nothing of it was committed; an operator can raise the quota with `duplexctl accounts quota`)",
        bytes(*quota), bytes(*stored), bytes(*adding)
    )]
    QuotaExceeded { quota: u64, stored: u64, adding: u64 },
    /// A bug, not the input's fault.
    #[error("internal error: {0}")]
    Internal(String),
    /// The server lost its right to write before the write reached the disk.
    #[error("{0}")]
    Fenced(String),
}

impl StoreError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
        let context = context.into();
        move |source| StoreError::Io { context, source }
    }
}

/// Bytes as an operator reads them: exact, and in binary units beside.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = None;
    for u in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = Some(u);
    }
    match unit {
        Some(u) => format!("{n} bytes ({value:.1} {u})"),
        None => format!("{n} bytes"),
    }
}

duplex_types::from_redb_errors!(StoreError);
