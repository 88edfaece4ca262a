//! What a snapshot keeps alive, read from its reference blobs (see
//! `duplex_types::refs`): its manifest chunks, its reference blobs and
//! every chunk id in them. Commits check all of it is held; garbage
//! collection marks from it.

use std::path::Path;

use duplex_proto::v1::SnapshotInfo;
use duplex_types::refs::{self, MAX_BLOBS_PER_SNAPSHOT};
use duplex_types::{AccountId, ChunkId};
use redb::ReadableTable;

use super::tables::{ChunkKey, ChunkLoc, ChunkLocTuple};
use super::{StoreError, codec, packs};

/// Parses the reference blob ids of a commit or a snapshot record.
pub fn blob_ids(raw: &[Vec<u8>]) -> Result<Vec<ChunkId>, StoreError> {
    if raw.len() > MAX_BLOBS_PER_SNAPSHOT {
        return Err(StoreError::Invalid(format!(
            "snapshot names {} reference blobs; at most {MAX_BLOBS_PER_SNAPSHOT}",
            raw.len()
        )));
    }
    raw.iter()
        .map(|c| ChunkId::from_bytes(c).map_err(|e| StoreError::Invalid(format!("reference blob: {e}"))))
        .collect()
}

/// Reads one held reference blob of `account` and returns its ids; a blob
/// that is not held is `Ok(None)`.
pub fn read_blob(
    chunks: &impl ReadableTable<ChunkKey, ChunkLocTuple>,
    packs_dir: &Path,
    account: AccountId,
    id: ChunkId,
) -> Result<Option<Vec<ChunkId>>, StoreError> {
    let Some(loc) = chunks.get((account.0, *id.as_bytes()))? else {
        return Ok(None);
    };
    let loc = ChunkLoc::from_tuple(loc.value());
    let data = packs::read(packs_dir, &loc).map_err(|e| StoreError::Corrupt {
        id,
        reason: e.to_string(),
    })?;
    codec::check_stored(id, &loc.hash, &data)?;
    refs::decode(id, &data)
        .map(Some)
        .map_err(|e| StoreError::Invalid(e.to_string()))
}

/// Checks that `account` holds every manifest chunk, every reference blob
/// and every id those blobs name. Run in the transaction that commits the
/// snapshot, which garbage collection's sweeps serialise with, so a
/// committed snapshot never names a collected chunk.
pub fn check_held(
    chunks: &impl ReadableTable<ChunkKey, ChunkLocTuple>,
    packs_dir: &Path,
    account: AccountId,
    manifest: &[ChunkId],
    blobs: &[ChunkId],
) -> Result<(), StoreError> {
    let mut missing = Vec::new();
    let mut check = |id: &ChunkId| -> Result<(), StoreError> {
        if chunks.get((account.0, *id.as_bytes()))?.is_none() {
            missing.push(*id);
        }
        Ok(())
    };
    for id in manifest {
        check(id)?;
    }
    for blob in blobs {
        match read_blob(chunks, packs_dir, account, *blob)? {
            Some(ids) => ids.iter().try_for_each(&mut check)?,
            None => check(blob)?,
        }
    }
    match missing.first() {
        None => Ok(()),
        Some(first) => Err(StoreError::MissingChunks {
            count: missing.len(),
            first: *first,
        }),
    }
}

/// Every chunk `info` keeps alive, handed to `live` one at a time; false
/// when the snapshot predates reference blobs (it names manifest chunks
/// but no blobs), so what it keeps is unknown.
pub fn each_live(
    chunks: &impl ReadableTable<ChunkKey, ChunkLocTuple>,
    packs_dir: &Path,
    account: AccountId,
    info: &SnapshotInfo,
    mut live: impl FnMut(ChunkId),
) -> Result<bool, StoreError> {
    let manifest = super::snapshots::check_record(&info.manifest_chunks, &info.summary)?;
    let blobs = blob_ids(&info.reference_blobs)?;
    if !info.references_listed {
        return Ok(false);
    }
    manifest.into_iter().for_each(&mut live);
    for blob in blobs {
        live(blob);
        // A blob not held here (a replica still pulling) names nothing yet.
        if let Some(ids) = read_blob(chunks, packs_dir, account, blob)? {
            ids.into_iter().for_each(&mut live);
        }
    }
    Ok(true)
}
