//! Reading sealed chunks back: every chunk from a server is checked end
//! to end (payload hash, AEAD tag bound to its id, keyed id of the
//! plaintext) before a byte of it is used. Decryption runs on the
//! blocking pool so a restore uses every core.

use std::sync::Arc;

use duplex_proto::v1::{FileEntry, GetChunksRequest, Manifest};
use duplex_types::ChunkId;
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;

use crate::AgentError;
use crate::crypto::Keys;
use crate::session::{StorageClient, throttled};

/// Streams the chunks `ids` in order, each opened and checked.
pub async fn fetch_chunks(
    storage: StorageClient,
    keys: Arc<Keys>,
    ids: Vec<Vec<u8>>,
) -> Result<impl Stream<Item = Result<Vec<u8>, AgentError>>, AgentError> {
    let expected: Vec<ChunkId> = ids
        .iter()
        .map(|b| ChunkId::from_bytes(b).map_err(|e| AgentError::Invalid(e.to_string())))
        .collect::<Result<_, _>>()?;
    let stream = throttled(|| {
        let mut storage = storage.clone();
        let ids = ids.clone();
        async move { storage.get_chunks(GetChunksRequest { ids }).await }
    })
    .await
    .map_err(AgentError::rpc("fetching chunks"))?
    .into_inner();
    let mut expected = expected.into_iter();
    // Chunks are opened a few at a time, in order: the next ones decrypt
    // while the caller writes this one, so a restore keeps both cores busy.
    Ok(stream
        .map(move |item| {
            let want = expected.next();
            let keys = keys.clone();
            async move {
                let chunk = item.map_err(AgentError::rpc("fetching chunks"))?;
                let want =
                    want.ok_or_else(|| AgentError::Invalid("the server sent more chunks than asked".into()))?;
                // A small chunk opens in microseconds: handing it to the
                // blocking pool would cost more than the work.
                if chunk.data.len() <= OPEN_INLINE {
                    return keys.open_chunk(&chunk, want);
                }
                tokio::task::spawn_blocking(move || keys.open_chunk(&chunk, want))
                    .await
                    .map_err(|e| AgentError::Invalid(format!("decryption task failed: {e}")))?
            }
        })
        .buffered(OPEN_AHEAD))
}

/// Chunks of one stream opened at once.
const OPEN_AHEAD: usize = 3;
/// Sealed chunks up to this size are opened where they arrive.
const OPEN_INLINE: usize = 64 * 1024;

/// Fetches, opens and decodes a snapshot's manifest.
pub async fn fetch_manifest(
    storage: &StorageClient,
    keys: &Arc<Keys>,
    ids: &[Vec<u8>],
) -> Result<Manifest, AgentError> {
    let bytes = fetch_manifest_bytes(storage, keys, ids).await?;
    Manifest::decode(bytes.as_slice()).map_err(undecodable)
}

/// Fetches and opens a snapshot's manifest, left encoded: a tenth of the
/// memory its decoded entries would take, read with [`entries_of`].
pub async fn fetch_manifest_bytes(
    storage: &StorageClient,
    keys: &Arc<Keys>,
    ids: &[Vec<u8>],
) -> Result<Vec<u8>, AgentError> {
    let mut bytes = Vec::new();
    let mut stream = std::pin::pin!(fetch_chunks(storage.clone(), keys.clone(), ids.to_vec()).await?);
    while let Some(plain) = stream.try_next().await? {
        bytes.extend_from_slice(&plain);
    }
    Ok(bytes)
}

/// The entries of an encoded `Manifest`, decoded one at a time; fields
/// other than the entries are skipped, as `Manifest::decode` would.
pub fn entries_of(mut bytes: &[u8]) -> impl Iterator<Item = Result<FileEntry, AgentError>> + '_ {
    use prost::encoding::{DecodeContext, WireType, decode_key, skip_field};
    std::iter::from_fn(move || {
        loop {
            if bytes.is_empty() {
                return None;
            }
            let next = (|| {
                let (field, wire) = decode_key(&mut bytes)?;
                if field != 1 || wire != WireType::LengthDelimited {
                    skip_field(wire, field, &mut bytes, DecodeContext::default())?;
                    return Ok(None);
                }
                FileEntry::decode_length_delimited(&mut bytes).map(Some)
            })();
            match next {
                Ok(Some(entry)) => return Some(Ok(entry)),
                Ok(None) => continue,
                Err(e) => {
                    bytes = &[];
                    return Some(Err(undecodable(e)));
                }
            }
        }
    })
}

fn undecodable(e: prost::DecodeError) -> AgentError {
    AgentError::Integrity(format!("snapshot manifest does not decode: {e}"))
}

/// An entry's path as the bytes of the name on disk.
pub fn path_bytes(entry: &FileEntry) -> &[u8] {
    if entry.path_bytes.is_empty() {
        entry.path.as_bytes()
    } else {
        &entry.path_bytes
    }
}

/// A symlink's target as the bytes on disk.
pub fn link_target_bytes(entry: &FileEntry) -> &[u8] {
    if entry.symlink_target_bytes.is_empty() {
        entry.symlink_target.as_bytes()
    } else {
        &entry.symlink_target_bytes
    }
}

/// A name as the manifest holds it: the string when it is UTF-8, else a
/// display form beside the exact bytes.
pub fn name_fields(bytes: Vec<u8>) -> (String, Vec<u8>) {
    match String::from_utf8(bytes) {
        Ok(text) => (text, Vec::new()),
        Err(e) => (String::from_utf8_lossy(e.as_bytes()).into_owned(), e.into_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str) -> FileEntry {
        FileEntry {
            path: path.into(),
            size: path.len() as u64,
            chunks: vec![vec![7; 32]],
            ..Default::default()
        }
    }

    #[test]
    fn entries_decode_one_at_a_time_as_the_whole_message_does() {
        let manifest = Manifest {
            entries: (0..300).map(|i| entry(&format!("dir/file{i}"))).collect(),
        };
        let mut bytes = manifest.encode_to_vec();
        // A field this agent does not know is skipped, as prost does.
        prost::encoding::uint64::encode(9, &42, &mut bytes);
        bytes.extend_from_slice(
            &Manifest {
                entries: vec![entry("last")],
            }
            .encode_to_vec(),
        );
        let whole = Manifest::decode(bytes.as_slice()).unwrap().entries;
        let streamed: Vec<FileEntry> = entries_of(&bytes).collect::<Result<_, _>>().unwrap();
        assert_eq!(streamed, whole);
        assert_eq!(streamed.len(), 301);
    }

    #[test]
    fn a_cut_manifest_is_an_integrity_error_and_ends_the_entries() {
        let bytes = Manifest {
            entries: vec![entry("a"), entry("b")],
        }
        .encode_to_vec();
        let cut = &bytes[..bytes.len() - 3];
        let items: Vec<_> = entries_of(cut).collect();
        assert_eq!(items.len(), 2);
        assert!(items[0].is_ok());
        let err = items[1].as_ref().unwrap_err();
        assert!(matches!(err, AgentError::Integrity(_)), "{err}");
        assert!(Manifest::decode(cut).is_err());
    }
}
