//! Payload checks. The server cannot read a sealed chunk; what it can
//! check is the payload's shape (size, known format byte) and that its
//! bytes hash to the `data_hash` the writer sent, on every hop.

use duplex_types::ChunkId;
use duplex_types::sealed::{self, PayloadError};

use super::StoreError;

pub use sealed::MAX_PAYLOAD as MAX_CHUNK_BYTES;

/// Checks an incoming payload against its claimed hash; returns the hash.
pub fn check(id: ChunkId, data_hash: &[u8], data: &[u8]) -> Result<[u8; 32], StoreError> {
    let claimed: [u8; 32] = data_hash.try_into().map_err(|_| {
        StoreError::Invalid(format!(
            "chunk {id}: data_hash must be 32 bytes, got {}",
            data_hash.len()
        ))
    })?;
    sealed::check_payload(data).map_err(|e| refuse(id, e))?;
    if sealed::payload_hash(data) != claimed {
        return Err(StoreError::HashMismatch { id });
    }
    Ok(claimed)
}

/// Checks stored bytes against the hash the index recorded.
pub fn check_stored(id: ChunkId, expected: &[u8; 32], data: &[u8]) -> Result<(), StoreError> {
    if sealed::payload_hash(data) != *expected {
        return Err(StoreError::Corrupt {
            id,
            reason: "payload does not match its recorded hash".into(),
        });
    }
    Ok(())
}

fn refuse(id: ChunkId, e: PayloadError) -> StoreError {
    StoreError::Invalid(format!("chunk {id}: {e}"))
}
