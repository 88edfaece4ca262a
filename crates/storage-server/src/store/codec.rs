//! Chunk payload checks: a chunk is accepted only when its content, once
//! decompressed, hashes to its id.

use duplex_proto::v1::Compression;
use duplex_types::ChunkId;

use super::StoreError;

/// Largest uncompressed chunk the platform handles.
pub const MAX_CHUNK_BYTES: usize = 8 * 1024 * 1024;

/// Decompresses (bounded by `raw_len`, so a hostile payload cannot balloon).
pub fn decode(compression: Compression, raw_len: usize, data: &[u8]) -> Result<Vec<u8>, String> {
    if raw_len > MAX_CHUNK_BYTES {
        return Err(format!(
            "raw length {raw_len} exceeds the {MAX_CHUNK_BYTES}-byte chunk limit"
        ));
    }
    let raw = match compression {
        Compression::None => data.to_vec(),
        Compression::Zstd => zstd::bulk::decompress(data, raw_len).map_err(|e| format!("zstd: {e}"))?,
    };
    if raw.len() != raw_len {
        return Err(format!("content is {} bytes, header says {raw_len}", raw.len()));
    }
    Ok(raw)
}

/// Checks that `data` is the chunk `id`.
pub fn verify(id: ChunkId, compression: Compression, raw_len: usize, data: &[u8]) -> Result<(), StoreError> {
    let raw = decode(compression, raw_len, data).map_err(StoreError::Invalid)?;
    let actual = ChunkId::of(&raw);
    if actual != id {
        return Err(StoreError::HashMismatch { id, actual });
    }
    Ok(())
}

pub fn compression_from_u8(v: u8) -> Option<Compression> {
    Compression::try_from(i32::from(v)).ok()
}
