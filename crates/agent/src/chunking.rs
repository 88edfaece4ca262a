//! Content-defined chunking and the upload side of deduplication: chunks
//! are hashed (keyed) where they are cut, the server is asked which it
//! lacks, and only those are compressed, encrypted and sent.

use std::collections::HashSet;
use std::io::Read;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use duplex_proto::v1::{Chunk, MissingChunksRequest};
use duplex_types::ChunkId;
use duplex_types::sealed::payload_hash;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::AgentError;
use crate::crypto::Keys;
use crate::session::{StorageClient, throttled};

pub const MIN_CHUNK: u32 = 256 * 1024;
pub const AVG_CHUNK: u32 = 1024 * 1024;
pub const MAX_CHUNK: u32 = 4 * 1024 * 1024;
/// Chunks are checked against the server in batches of about this size.
const BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Or this many chunks: small files fill a batch by count long before they
/// fill it by size, and a smaller batch lets the upload start while the
/// walk goes on.
const BATCH_CHUNKS: usize = 1024;
/// Sealed chunks go to an upload stream in groups of about this many
/// bytes: one hand-off (and one wake-up of the stream's task) per group
/// rather than per chunk, which for small files cost more than the chunk.
const SEND_BYTES: usize = 1024 * 1024;

/// Shared by every chunking thread of one backup.
pub struct Uploader {
    pub storage: StorageClient,
    pub keys: std::sync::Arc<Keys>,
    pub handle: Handle,
    /// One sender per upload stream; chunks are spread across them so the
    /// server writes one pack while it fsyncs another.
    txs: Vec<mpsc::Sender<Vec<Chunk>>>,
    next_tx: std::sync::atomic::AtomicUsize,
    seen: Mutex<HashSet<ChunkId>>,
    pub uploaded_bytes: AtomicU64,
    limit: Option<UploadLimit>,
}

/// `--limit-upload`: chunk payload bytes per second, averaged from the
/// start of the upload. A sender that gets ahead sleeps until its bytes
/// are due, which holds back the chunking threads behind it.
pub struct UploadLimit {
    bytes_per_s: u64,
    start: std::time::Instant,
}

impl UploadLimit {
    pub fn new(bytes_per_s: u64) -> Self {
        Self {
            bytes_per_s: bytes_per_s.max(1),
            start: std::time::Instant::now(),
        }
    }

    /// Waits until `sent_total` bytes are due.
    fn pace(&self, sent_total: u64) {
        let due =
            self.start + std::time::Duration::from_secs_f64(sent_total as f64 / self.bytes_per_s as f64);
        let now = std::time::Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    }
}

impl Uploader {
    pub fn new(
        storage: StorageClient,
        keys: std::sync::Arc<Keys>,
        handle: Handle,
        txs: Vec<mpsc::Sender<Vec<Chunk>>>,
        limit: Option<UploadLimit>,
    ) -> Self {
        Self {
            storage,
            keys,
            handle,
            txs,
            next_tx: std::sync::atomic::AtomicUsize::new(0),
            seen: Mutex::new(HashSet::new()),
            uploaded_bytes: AtomicU64::new(0),
            limit,
        }
    }

    /// Sends whichever of `batch` the server lacks. Runs on a plain thread.
    pub fn flush(&self, batch: &mut Batch) -> Result<(), AgentError> {
        let fresh: Vec<(ChunkId, Vec<u8>)> = {
            let mut seen = self
                .seen
                .lock()
                .map_err(|_| AgentError::Invalid("chunk set poisoned".into()))?;
            batch
                .chunks
                .drain(..)
                .filter(|(id, _)| seen.insert(*id))
                .collect()
        };
        batch.bytes = 0;
        if fresh.is_empty() {
            return Ok(());
        }
        let missing = self.missing(&fresh)?;
        let mut group = Group::default();
        for (id, data) in fresh {
            if missing.contains(id.as_bytes().as_slice()) && group.push(self.keys.seal_chunk(id, &data)?) {
                self.send(group.take())?;
            }
        }
        self.send(group.take())
    }

    /// Sends whichever reference blobs the server lacks, as they are: the
    /// server reads them (see `duplex_types::refs`).
    pub fn send_references(&self, blobs: Vec<(ChunkId, Vec<u8>)>) -> Result<(), AgentError> {
        let missing = self.missing(&blobs)?;
        let mut group = Group::default();
        for (id, data) in blobs {
            if !missing.contains(id.as_bytes().as_slice()) {
                continue;
            }
            let chunk = Chunk {
                id: id.to_vec(),
                data_hash: payload_hash(&data).to_vec(),
                data: data.into(),
            };
            if group.push(chunk) {
                self.send(group.take())?;
            }
        }
        self.send(group.take())
    }

    /// Which of `chunks` the server lacks.
    fn missing(&self, chunks: &[(ChunkId, Vec<u8>)]) -> Result<HashSet<Vec<u8>>, AgentError> {
        self.lacking(chunks.iter().map(|(id, _)| id.to_vec()).collect())
    }

    /// Which of `ids` the server lacks. Runs on a plain thread.
    pub fn lacking(&self, ids: Vec<Vec<u8>>) -> Result<HashSet<Vec<u8>>, AgentError> {
        self.handle.block_on(missing(&self.storage, ids))
    }

    fn send(&self, chunks: Vec<Chunk>) -> Result<(), AgentError> {
        if chunks.is_empty() {
            return Ok(());
        }
        let len: u64 = chunks.iter().map(|c| c.data.len() as u64).sum();
        let sent = self.uploaded_bytes.fetch_add(len, Ordering::Relaxed);
        if let Some(limit) = &self.limit {
            // Paced by what was sent before this group: the first goes at
            // once, and the average never runs above the limit.
            limit.pace(sent);
        }
        let i = self.next_tx.fetch_add(1, Ordering::Relaxed) % self.txs.len().max(1);
        let Some(tx) = self.txs.get(i) else {
            return Err(AgentError::Invalid("no upload stream".into()));
        };
        if tx.blocking_send(chunks).is_err() {
            return Err(AgentError::Invalid("upload stream closed".into()));
        }
        Ok(())
    }
}

/// Sealed chunks waiting to go to an upload stream together.
#[derive(Default)]
struct Group {
    chunks: Vec<Chunk>,
    bytes: usize,
}

impl Group {
    /// Adds a chunk; true when the group is big enough to send.
    fn push(&mut self, chunk: Chunk) -> bool {
        self.bytes += chunk.data.len();
        self.chunks.push(chunk);
        self.bytes >= SEND_BYTES
    }

    fn take(&mut self) -> Vec<Chunk> {
        self.bytes = 0;
        std::mem::take(&mut self.chunks)
    }
}

/// Chunks cut but not yet checked against the server.
#[derive(Default)]
pub struct Batch {
    chunks: Vec<(ChunkId, Vec<u8>)>,
    bytes: usize,
}

impl Batch {
    /// Adds a chunk; true when the batch is big enough to flush.
    pub fn push(&mut self, id: ChunkId, data: Vec<u8>) -> bool {
        self.bytes += data.len();
        self.chunks.push((id, data));
        self.bytes >= BATCH_BYTES || self.chunks.len() >= BATCH_CHUNKS
    }
}

/// Ids per `MissingChunks` call.
const IDS_PER_CALL: usize = 10_000;

/// The ids among `ids` that the server lacks (asked in batches).
pub async fn missing(storage: &StorageClient, ids: Vec<Vec<u8>>) -> Result<HashSet<Vec<u8>>, AgentError> {
    let mut lacking = HashSet::new();
    for batch in ids.chunks(IDS_PER_CALL) {
        let request = MissingChunksRequest { ids: batch.to_vec() };
        let answer = throttled(|| {
            let mut storage = storage.clone();
            let request = request.clone();
            async move { storage.missing_chunks(request).await }
        })
        .await
        .map_err(AgentError::rpc("asking which chunks the server lacks"))?;
        lacking.extend(answer.into_inner().missing);
    }
    Ok(lacking)
}

/// Cuts an open file into chunks as `chunk_stream` does. A file no longer
/// than one chunk's maximum is read whole and cut in memory: the
/// streaming cutter zeroes a buffer of that maximum (4 MiB) for every
/// file, which on a tree of small files cost more than everything else
/// the agent did (a profile of 50,000 files of 140 bytes: nine tenths of
/// its time in memset, memmove and page faults). Both cutters make the
/// same cuts, so a file growing past the limit deduplicates as before.
pub fn cut_file(
    mut file: std::fs::File,
    path: &std::path::Path,
    keys: &Keys,
    mut each: impl FnMut(ChunkId, Vec<u8>) -> Result<(), AgentError>,
) -> Result<u64, AgentError> {
    let limit = u64::from(MAX_CHUNK);
    let mut head = Vec::new();
    (&mut file)
        .take(limit + 1)
        .read_to_end(&mut head)
        .map_err(AgentError::io(path))?;
    if head.len() as u64 > limit {
        // Grown past the limit since the scan: stream what is read and the rest.
        return chunk_stream(std::io::Cursor::new(head).chain(file), path, keys, each);
    }
    let total = head.len() as u64;
    if head.len() <= MIN_CHUNK as usize {
        // One chunk: no cut can fall inside it.
        if !head.is_empty() {
            each(keys.chunk_id(&head), head)?;
        }
        return Ok(total);
    }
    for cut in fastcdc::v2020::FastCDC::new(&head, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK) {
        let piece = head[cut.offset..cut.offset + cut.length].to_vec();
        each(keys.chunk_id(&piece), piece)?;
    }
    Ok(total)
}

/// Cuts `reader` (the contents of `path`) into content-defined chunks,
/// calling `each` with every chunk's keyed id and bytes. Returns the length read.
pub fn chunk_stream<R: Read>(
    reader: R,
    path: &std::path::Path,
    keys: &Keys,
    mut each: impl FnMut(ChunkId, Vec<u8>) -> Result<(), AgentError>,
) -> Result<u64, AgentError> {
    let mut total = 0u64;
    for piece in fastcdc::v2020::StreamCDC::new(reader, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK) {
        let piece = piece.map_err(|e| match e {
            fastcdc::v2020::Error::IoError(io) => AgentError::io(path)(io),
            other => AgentError::io(path)(std::io::Error::other(other.to_string())),
        })?;
        total += piece.length as u64;
        each(keys.chunk_id(&piece.data), piece.data)?;
    }
    Ok(total)
}

#[cfg(test)]
mod cut_tests {
    use super::*;

    fn cuts(data: &[u8], whole: bool) -> Vec<(ChunkId, usize)> {
        let keys = Keys::from_master(&[3; 32]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, data).unwrap();
        let mut out = Vec::new();
        let record = |id, piece: Vec<u8>| {
            out.push((id, piece.len()));
            Ok(())
        };
        let file = std::fs::File::open(&path).unwrap();
        let total = if whole {
            cut_file(file, &path, &keys, record).unwrap()
        } else {
            chunk_stream(file, &path, &keys, record).unwrap()
        };
        assert_eq!(total, data.len() as u64);
        out
    }

    #[test]
    fn a_file_read_whole_is_cut_where_the_stream_would_cut_it() {
        let mut state = 7u64;
        let data: Vec<u8> = (0..5 * 1024 * 1024)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 56) as u8
            })
            .collect();
        let max = MAX_CHUNK as usize;
        for len in [
            0,
            10,
            MIN_CHUNK as usize,
            MIN_CHUNK as usize + 1,
            3 << 20,
            max,
            max + 1,
            data.len(),
        ] {
            assert_eq!(cuts(&data[..len], true), cuts(&data[..len], false), "{len} bytes");
        }
    }
}
