//! Reference blobs: the data-chunk ids a snapshot names, in a form the
//! storage server can read. Manifests are sealed, so without these a
//! server could not tell which chunks a snapshot keeps alive, and garbage
//! collection would have nothing to mark from.
//!
//! A blob is the format byte [`sealed::PAYLOAD_FORMAT_REFS`] followed by
//! strictly increasing 32-byte chunk ids, and its chunk id is the plain
//! BLAKE3 of those bytes, so a server checks a blob against its id without
//! any key. Chunk ids are keyed hashes of plaintext: a list of them shows
//! which snapshots share chunks, which the server sees from uploads anyway.
//!
//! The sorted list is cut where an id's leading bits are zero, not every N
//! ids, so one new chunk changes one blob and the others deduplicate
//! against the previous snapshot's.

use crate::ChunkId;
use crate::sealed::PAYLOAD_FORMAT_REFS;

/// Most ids one blob holds (2 MiB of ids).
pub const MAX_IDS_PER_BLOB: usize = 65_536;
/// An id whose first two bytes are below this ends a blob: 1 in 16,384,
/// so a blob holds 16,384 ids (512 KiB) on average.
const CUT_BELOW: u16 = 4;
/// Most reference blobs one snapshot may name (about a billion chunks at
/// the hard cap, eight times that on average).
pub const MAX_BLOBS_PER_SNAPSHOT: usize = 16_384;

/// Why a payload is not a reference blob.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RefsError {
    #[error("reference blob {0} does not hash to its id")]
    WrongId(ChunkId),
    #[error("reference blob {id} is {len} bytes: not a format byte and whole 32-byte ids")]
    Shape { id: ChunkId, len: usize },
    #[error("reference blob {id} holds {count} ids; at most {MAX_IDS_PER_BLOB}")]
    TooMany { id: ChunkId, count: usize },
    #[error("reference blob {0} does not start with the reference format byte")]
    Format(ChunkId),
    #[error("reference blob {0} is not strictly increasing")]
    Unsorted(ChunkId),
}

/// Cuts `ids` (any order, repeats allowed) into blobs; each comes with its id.
pub fn encode(ids: &[ChunkId]) -> Vec<(ChunkId, Vec<u8>)> {
    let mut sorted: Vec<[u8; 32]> = ids.iter().map(|id| *id.as_bytes()).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut blobs = Vec::new();
    let mut blob = vec![PAYLOAD_FORMAT_REFS];
    for id in sorted {
        blob.extend_from_slice(&id);
        let count = (blob.len() - 1) / 32;
        if u16::from_be_bytes([id[0], id[1]]) < CUT_BELOW || count == MAX_IDS_PER_BLOB {
            blobs.push(finish(std::mem::replace(&mut blob, vec![PAYLOAD_FORMAT_REFS])));
        }
    }
    if blob.len() > 1 {
        blobs.push(finish(blob));
    }
    blobs
}

fn finish(blob: Vec<u8>) -> (ChunkId, Vec<u8>) {
    (blob_id(&blob), blob)
}

/// A reference blob's id: the plain BLAKE3 of its bytes.
pub fn blob_id(payload: &[u8]) -> ChunkId {
    ChunkId::of(payload)
}

/// Checks a stored blob against its id and shape; returns its ids.
pub fn decode(id: ChunkId, payload: &[u8]) -> Result<Vec<ChunkId>, RefsError> {
    if blob_id(payload) != id {
        return Err(RefsError::WrongId(id));
    }
    let Some((&format, body)) = payload.split_first() else {
        return Err(RefsError::Shape { id, len: 0 });
    };
    if format != PAYLOAD_FORMAT_REFS {
        return Err(RefsError::Format(id));
    }
    if body.is_empty() || body.len() % 32 != 0 {
        return Err(RefsError::Shape {
            id,
            len: payload.len(),
        });
    }
    let count = body.len() / 32;
    if count > MAX_IDS_PER_BLOB {
        return Err(RefsError::TooMany { id, count });
    }
    let mut out = Vec::with_capacity(count);
    let mut prev: Option<[u8; 32]> = None;
    for piece in body.chunks_exact(32) {
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(piece);
        if prev.is_some_and(|p| p >= bytes) {
            return Err(RefsError::Unsorted(id));
        }
        prev = Some(bytes);
        out.push(ChunkId::from(bytes));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u32) -> Vec<ChunkId> {
        (0..n).map(|i| ChunkId::of(&i.to_le_bytes())).collect()
    }

    #[test]
    fn blobs_round_trip_sorted_and_distinct() {
        let mut all = ids(50_000);
        all.extend(ids(100));
        let blobs = encode(&all);
        assert!(blobs.len() > 1, "50,000 ids fit one blob");
        let mut back = Vec::new();
        for (id, payload) in &blobs {
            back.extend(decode(*id, payload).unwrap());
        }
        let mut want = ids(50_000);
        want.sort_unstable();
        assert_eq!(back, want);
    }

    #[test]
    fn one_new_id_changes_one_blob() {
        let before: Vec<ChunkId> = encode(&ids(60_000)).into_iter().map(|b| b.0).collect();
        let mut more = ids(60_000);
        more.push(ChunkId::from([0x77; 32]));
        let after: Vec<ChunkId> = encode(&more).into_iter().map(|b| b.0).collect();
        let changed = after.iter().filter(|id| !before.contains(id)).count();
        assert_eq!(changed, 1, "{} blobs, {changed} changed", after.len());
    }

    #[test]
    fn forged_or_malformed_blobs_are_refused() {
        let (id, payload) = encode(&ids(10)).remove(0);
        let mut other = payload.clone();
        other.truncate(other.len() - 1);
        assert_eq!(decode(id, &other), Err(RefsError::WrongId(id)));
        assert!(matches!(
            decode(blob_id(&other), &other),
            Err(RefsError::Shape { .. })
        ));
        let mut swapped = vec![PAYLOAD_FORMAT_REFS];
        swapped.extend_from_slice(&[2; 32]);
        swapped.extend_from_slice(&[1; 32]);
        assert_eq!(
            decode(blob_id(&swapped), &swapped),
            Err(RefsError::Unsorted(blob_id(&swapped)))
        );
        let sealed = vec![1u8; 65];
        assert_eq!(
            decode(blob_id(&sealed), &sealed),
            Err(RefsError::Format(blob_id(&sealed)))
        );
        assert!(encode(&[]).is_empty());
    }
}
