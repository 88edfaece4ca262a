//! Content-defined chunking and the upload side of deduplication: chunks
//! are hashed where they are cut, the server is asked which it lacks, and
//! only those are compressed and sent.

use std::collections::HashSet;
use std::io::Read;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use duplex_proto::v1::{Chunk, Compression, MissingChunksRequest};
use duplex_types::ChunkId;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::AgentError;
use crate::session::StorageClient;

pub const MIN_CHUNK: u32 = 256 * 1024;
pub const AVG_CHUNK: u32 = 1024 * 1024;
pub const MAX_CHUNK: u32 = 4 * 1024 * 1024;
/// Chunks are checked against the server in batches of about this size.
const BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Fast zstd: the CPU, not the disk, is the ceiling on a backup.
const ZSTD_LEVEL: i32 = 1;

/// Shared by every chunking thread of one backup.
pub struct Uploader {
    pub storage: StorageClient,
    pub handle: Handle,
    /// One sender per upload stream; chunks are spread across them so the
    /// server writes one pack while it fsyncs another.
    txs: Vec<mpsc::Sender<Chunk>>,
    next_tx: std::sync::atomic::AtomicUsize,
    seen: Mutex<HashSet<ChunkId>>,
    pub uploaded_bytes: AtomicU64,
}

impl Uploader {
    pub fn new(storage: StorageClient, handle: Handle, txs: Vec<mpsc::Sender<Chunk>>) -> Self {
        Self {
            storage,
            handle,
            txs,
            next_tx: std::sync::atomic::AtomicUsize::new(0),
            seen: Mutex::new(HashSet::new()),
            uploaded_bytes: AtomicU64::new(0),
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
        let request = MissingChunksRequest {
            ids: fresh.iter().map(|(id, _)| id.to_vec()).collect(),
        };
        let mut storage = self.storage.clone();
        let missing = self
            .handle
            .block_on(storage.missing_chunks(request))
            .map_err(AgentError::rpc("asking which chunks the server lacks"))?
            .into_inner()
            .missing;
        let missing: HashSet<&[u8]> = missing.iter().map(Vec::as_slice).collect();
        for (id, data) in fresh {
            if !missing.contains(id.as_bytes().as_slice()) {
                continue;
            }
            let chunk = encode(id, &data);
            self.uploaded_bytes
                .fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
            let i = self.next_tx.fetch_add(1, Ordering::Relaxed) % self.txs.len().max(1);
            let Some(tx) = self.txs.get(i) else {
                return Err(AgentError::Invalid("no upload stream".into()));
            };
            if tx.blocking_send(chunk).is_err() {
                return Err(AgentError::Invalid("upload stream closed".into()));
            }
        }
        Ok(())
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
        self.bytes >= BATCH_BYTES
    }
}

/// Compresses with zstd unless that does not save at least 3 %.
pub fn encode(id: ChunkId, data: &[u8]) -> Chunk {
    let compressed = zstd::bulk::compress(data, ZSTD_LEVEL)
        .ok()
        .filter(|c| c.len() * 100 < data.len() * 97);
    let (compression, payload) = match compressed {
        Some(c) => (Compression::Zstd, c),
        None => (Compression::None, data.to_vec()),
    };
    Chunk {
        id: id.to_vec(),
        compression: compression as i32,
        raw_len: data.len() as u32,
        data: payload.into(),
    }
}

/// Decompresses a chunk from a server, bounded by the platform's chunk
/// limit so a hostile server cannot balloon memory.
pub fn decode(chunk: &Chunk) -> Result<Vec<u8>, AgentError> {
    let corrupt = || AgentError::Corrupt(hex(&chunk.id));
    if chunk.raw_len > MAX_CHUNK * 2 {
        return Err(corrupt());
    }
    let raw = match Compression::try_from(chunk.compression) {
        Ok(Compression::None) => chunk.data.to_vec(),
        Ok(Compression::Zstd) => {
            zstd::bulk::decompress(&chunk.data, chunk.raw_len as usize).map_err(|_| corrupt())?
        }
        Err(_) => return Err(corrupt()),
    };
    if raw.len() != chunk.raw_len as usize {
        return Err(corrupt());
    }
    Ok(raw)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Cuts `reader` (the contents of `path`) into content-defined chunks,
/// calling `each` with every chunk's id and bytes. Returns the length read.
pub fn chunk_stream<R: Read>(
    reader: R,
    path: &std::path::Path,
    mut each: impl FnMut(ChunkId, Vec<u8>) -> Result<(), AgentError>,
) -> Result<u64, AgentError> {
    let mut total = 0u64;
    for piece in fastcdc::v2020::StreamCDC::new(reader, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK) {
        let piece = piece.map_err(|e| match e {
            fastcdc::v2020::Error::IoError(io) => AgentError::io(path)(io),
            other => AgentError::io(path)(std::io::Error::other(other.to_string())),
        })?;
        total += piece.length as u64;
        each(ChunkId::of(&piece.data), piece.data)?;
    }
    Ok(total)
}
