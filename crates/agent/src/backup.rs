//! `duplex backup`: scan, chunk and hash on every core, upload only what
//! the server lacks, then commit a snapshot whose manifest names every
//! chunk, everything sealed with the account's keys (see `crypto`), and the
//! paths and counts in an encrypted summary. Nothing is visible until the commit, so a backup cut short
//! leaves no snapshot, and the next one reuses every chunk already stored.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use duplex_proto::v1::{Chunk, CommitSnapshotRequest, EntryKind, FileEntry, Manifest, SnapshotSummary};
use duplex_types::ChunkId;
use indicatif::ProgressBar;
use prost::Message;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::AgentError;
use crate::cache::FileCache;
use crate::chunking::{Batch, UploadLimit, Uploader, chunk_stream, cut_file, missing};
use crate::crypto::Keys;
use crate::scan::{Item, Selection, scan};
use crate::session::{Session, throttled};

/// Parallel upload streams (each its own pack on the server).
const UPLOAD_STREAMS: usize = 2;

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct BackupReport {
    pub snapshot: String,
    pub files: u64,
    pub bytes: u64,
    pub uploaded_bytes: u64,
    /// Items that could not be read, each named in a warning, by the
    /// attempt that made the snapshot.
    pub skipped: u64,
    /// File bytes read from disk: files the file cache knew unchanged are
    /// not opened, so an unchanged second backup reads (close to) none.
    pub read_bytes: u64,
}

/// How a backup chooses and reads what it backs up.
pub struct Options {
    pub selection: Selection,
    /// Read every file, trusting no file cache.
    pub force_read: bool,
    /// `--limit-upload`: chunk bytes sent per second, at most.
    pub limit_upload: Option<u64>,
}

/// Whole attempts when the commit finds chunks gone: garbage collection
/// swept a chunk the server had answered present (past its grace period),
/// and the next attempt uploads it again.
const ATTEMPTS: usize = 3;

pub async fn backup(
    session: &Session,
    keys: Arc<Keys>,
    roots: &[PathBuf],
    options: Arc<Options>,
    progress: ProgressBar,
    warn: Arc<dyn Fn(String) + Send + Sync>,
) -> Result<BackupReport, AgentError> {
    if roots.is_empty() {
        return Err(AgentError::Invalid(
            "nothing to back up: give at least one PATH".into(),
        ));
    }
    let mut attempt = 1;
    loop {
        // Counted per attempt: an item skipped by an attempt that was then
        // redone is not missing from the snapshot the last one made.
        let skipped = Arc::new(AtomicU64::new(0));
        let counted = {
            let (skipped, warn) = (skipped.clone(), warn.clone());
            Arc::new(move |msg: String| {
                skipped.fetch_add(1, Ordering::Relaxed);
                warn(msg)
            })
        };
        let once = backup_once(
            session,
            keys.clone(),
            roots,
            options.clone(),
            progress.clone(),
            counted,
        );
        match once.await {
            Err(Attempt::ChunksGone(status)) if attempt < ATTEMPTS => {
                warn(format!(
                    "the server no longer holds chunks it had (collected as garbage meanwhile): {}; backing up again",
                    status.message()
                ));
                progress.set_position(0);
                attempt += 1;
            }
            Err(Attempt::ChunksGone(status)) => {
                return Err(AgentError::rpc("committing the snapshot")(status));
            }
            Err(Attempt::Failed(e)) => return Err(e),
            Ok(report) => {
                return Ok(BackupReport {
                    skipped: skipped.load(Ordering::Relaxed),
                    ..report
                });
            }
        }
    }
}

/// How one attempt ended short of a snapshot.
enum Attempt {
    /// The commit named chunks the server no longer holds.
    ChunksGone(tonic::Status),
    Failed(AgentError),
}

impl From<AgentError> for Attempt {
    fn from(e: AgentError) -> Self {
        Attempt::Failed(e)
    }
}

async fn backup_once(
    session: &Session,
    keys: Arc<Keys>,
    roots: &[PathBuf],
    options: Arc<Options>,
    progress: ProgressBar,
    warn: Arc<dyn Fn(String) + Send + Sync>,
) -> Result<BackupReport, Attempt> {
    let scan_start_ns = now_ns();
    let scan_roots = roots.to_vec();
    let scan_warn = warn.clone();
    let scan_options = options.clone();
    let items = tokio::task::spawn_blocking(move || scan(&scan_roots, &scan_options.selection, &*scan_warn))
        .await
        .map_err(|e| AgentError::Invalid(format!("scan failed: {e}")))??;
    let total: u64 = items.iter().map(|i| i.entry.size).sum();
    progress.set_length(total);
    let (cache, problem) = FileCache::open(&keys, roots);
    if let Some(problem) = problem {
        progress.suspend(|| eprintln!("warning: {problem}"));
    }
    let reused = match options.force_read {
        true => HashMap::new(),
        false => reusable(session, &cache, &items).await?,
    };

    let mut txs = Vec::new();
    let mut uploads = Vec::new();
    for _ in 0..UPLOAD_STREAMS {
        let (tx, rx) = mpsc::channel::<Chunk>(4);
        let mut storage = session.storage.clone();
        uploads.push(tokio::spawn(async move {
            storage.put_chunks(ReceiverStream::new(rx)).await
        }));
        txs.push(tx);
    }
    let upload = async move {
        let mut result = Ok(());
        for u in uploads {
            let r = u
                .await
                .map_err(|e| tonic::Status::internal(format!("upload task failed: {e}")))?;
            if let Err(status) = r {
                result = Err(status);
            }
        }
        result
    };
    let uploader = Arc::new(Uploader::new(
        session.storage.clone(),
        keys.clone(),
        tokio::runtime::Handle::current(),
        txs,
        options.limit_upload.map(UploadLimit::new),
    ));

    let chunked = {
        let uploader = uploader.clone();
        let progress = progress.clone();
        tokio::task::spawn_blocking(move || {
            let read = chunk_all(&items, &reused, &uploader, &progress, &*warn);
            (items, read)
        })
        .await
        .map_err(|e| AgentError::Invalid(format!("chunking failed: {e}")))?
    };
    let (items, (results, read_bytes)) = match chunked {
        (items, Ok(read)) => (items, read),
        // A closed upload stream means the upload failed: report why.
        (_, Err(e)) => return Err(upload_error(upload, e).await.into()),
    };
    // Saved before the commit: a chunk it names that never gets committed
    // is found missing next time, and its file read again.
    let cached = items.iter().zip(&results).filter_map(|(item, entry)| {
        let entry = entry.as_ref().filter(|e| e.kind() == EntryKind::File)?;
        Some((item.source.as_path(), item.stat, entry.chunks.as_slice()))
    });
    if let Err(e) = cache.save(scan_start_ns, cached) {
        progress.suspend(|| eprintln!("warning: the file cache was not saved: {e}"));
    }
    drop(items);
    let entries: Vec<FileEntry> = results.into_iter().flatten().collect();
    let manifest_chunks = {
        let uploader = uploader.clone();
        tokio::task::spawn_blocking(move || upload_manifest(entries, &uploader))
            .await
            .map_err(|e| AgentError::Invalid(format!("manifest upload failed: {e}")))?
    };
    let Uploaded {
        manifest_chunks,
        reference_blobs,
        files,
        bytes,
    } = match manifest_chunks {
        Ok(v) => v,
        Err(e) => return Err(upload_error(upload, e).await.into()),
    };
    let uploaded_bytes = uploader.uploaded_bytes.load(Ordering::Relaxed);
    drop(uploader);
    upload.await.map_err(AgentError::rpc("uploading chunks"))?;

    let summary = keys.seal_summary(&SnapshotSummary {
        paths: roots.iter().map(|p| p.display().to_string()).collect(),
        hostname: hostname(),
        files,
        bytes,
    })?;
    let request = CommitSnapshotRequest {
        manifest_chunks: manifest_chunks.iter().map(|c| c.to_vec()).collect(),
        summary,
        reference_blobs: reference_blobs.iter().map(|c| c.to_vec()).collect(),
        references_listed: true,
    };
    let info = throttled(|| {
        let mut storage = session.storage.clone();
        let request = request.clone();
        async move { storage.commit_snapshot(request).await }
    })
    .await
    .map_err(|status| match duplex_rpc::client::is_missing_chunks(&status) {
        true => Attempt::ChunksGone(status),
        false => Attempt::Failed(AgentError::rpc("committing the snapshot")(status)),
    })?
    .into_inner();
    progress.finish_and_clear();
    Ok(BackupReport {
        snapshot: info.id,
        files,
        bytes,
        uploaded_bytes,
        skipped: 0,
        read_bytes,
    })
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// The files the cache knows unchanged whose chunks the server still
/// holds, by item index, with their chunk lists.
async fn reusable(
    session: &Session,
    cache: &FileCache,
    items: &[Item],
) -> Result<HashMap<usize, Vec<Vec<u8>>>, AgentError> {
    let hits: HashMap<usize, Vec<Vec<u8>>> = items
        .iter()
        .enumerate()
        .filter(|(_, item)| item.entry.kind() == EntryKind::File)
        .filter_map(|(i, item)| Some((i, cache.unchanged(&item.source, &item.stat)?.to_vec())))
        .collect();
    if hits.is_empty() {
        return Ok(hits);
    }
    let mut ids: Vec<Vec<u8>> = hits.values().flatten().cloned().collect();
    ids.sort_unstable();
    ids.dedup();
    let gone = missing(&session.storage, ids).await?;
    Ok(hits
        .into_iter()
        .filter(|(_, chunks)| chunks.iter().all(|c| !gone.contains(c)))
        .collect())
}

/// The upload's own error when it failed, else `fallback`.
async fn upload_error(
    upload: impl std::future::Future<Output = Result<(), tonic::Status>>,
    fallback: AgentError,
) -> AgentError {
    match upload.await {
        Err(status) => AgentError::rpc("uploading chunks")(status),
        Ok(()) => fallback,
    }
}

/// Chunks every file on all cores. Files that vanish or cannot be read
/// are skipped with a warning rather than failing the whole backup.
/// Returns each item's entry (none for one skipped) and the file bytes read.
fn chunk_all(
    items: &[Item],
    reused: &HashMap<usize, Vec<Vec<u8>>>,
    uploader: &Uploader,
    progress: &ProgressBar,
    warn: &(dyn Fn(String) + Send + Sync),
) -> Result<(Vec<Option<FileEntry>>, u64), AgentError> {
    let next = AtomicUsize::new(0);
    let read = AtomicU64::new(0);
    let results: Mutex<Vec<Option<FileEntry>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 8);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> Result<(), AgentError> {
                    let mut batch = Batch::default();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        let entry = match reused.get(&i) {
                            Some(chunks) => Ok(unchanged(item, chunks, progress)),
                            None => chunk_file(item, uploader, &mut batch, progress, &read),
                        };
                        match entry {
                            Ok(entry) => lock(&results)?[i] = Some(entry),
                            Err(AgentError::Io { path, source }) => {
                                warn(format!("skipped {}: {source}", path.display()));
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    uploader.flush(&mut batch)
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| AgentError::Invalid("a chunking thread panicked".into()))??;
        }
        Ok::<(), AgentError>(())
    })?;
    let results = results
        .into_inner()
        .map_err(|_| AgentError::Invalid("results poisoned".into()))?;
    Ok((results, read.into_inner()))
}

/// The entry of a file the cache knows unchanged: its chunks, unread.
fn unchanged(item: &Item, chunks: &[Vec<u8>], progress: &ProgressBar) -> FileEntry {
    progress.inc(item.stat.size);
    FileEntry {
        chunks: chunks.to_vec(),
        size: item.stat.size,
        ..item.entry.clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, AgentError> {
    m.lock()
        .map_err(|_| AgentError::Invalid("a chunking thread panicked".into()))
}

fn chunk_file(
    item: &Item,
    uploader: &Uploader,
    batch: &mut Batch,
    progress: &ProgressBar,
    read: &AtomicU64,
) -> Result<FileEntry, AgentError> {
    let mut entry = item.entry.clone();
    if entry.kind() != EntryKind::File {
        return Ok(entry);
    }
    let file = std::fs::File::open(&item.source).map_err(AgentError::io(&item.source))?;
    let size = cut_file(file, &item.source, &uploader.keys, |id, data| {
        entry.chunks.push(id.to_vec());
        progress.inc(data.len() as u64);
        if batch.push(id, data) {
            uploader.flush(batch)?;
        }
        Ok(())
    })?;
    // The file may have changed since the scan; record what was read.
    entry.size = size;
    read.fetch_add(size, Ordering::Relaxed);
    Ok(entry)
}

/// What a snapshot's commit names.
struct Uploaded {
    manifest_chunks: Vec<ChunkId>,
    reference_blobs: Vec<ChunkId>,
    files: u64,
    bytes: u64,
}

/// Stores the reference blobs listing every data chunk, then the encoded
/// manifest as chunks like any file.
fn upload_manifest(entries: Vec<FileEntry>, uploader: &Uploader) -> Result<Uploaded, AgentError> {
    let data_chunks = entries
        .iter()
        .flat_map(|e| e.chunks.iter())
        .map(|c| ChunkId::from_bytes(c).map_err(|e| AgentError::Invalid(format!("chunk id: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let blobs = duplex_types::refs::encode(&data_chunks);
    drop(data_chunks);
    let reference_blobs = blobs.iter().map(|b| b.0).collect();
    uploader.send_references(blobs)?;
    let files = entries.iter().filter(|e| e.kind() == EntryKind::File).count() as u64;
    let bytes = entries
        .iter()
        .filter(|e| e.kind() == EntryKind::File)
        .map(|e| e.size)
        .sum();
    let encoded = Manifest { entries }.encode_to_vec();
    let mut ids = Vec::new();
    let mut batch = Batch::default();
    chunk_stream(
        encoded.as_slice(),
        std::path::Path::new("<manifest>"),
        &uploader.keys,
        |id, data| {
            ids.push(id);
            if batch.push(id, data) {
                uploader.flush(&mut batch)?;
            }
            Ok(())
        },
    )?;
    uploader.flush(&mut batch)?;
    Ok(Uploaded {
        manifest_chunks: ids,
        reference_blobs,
        files,
        bytes,
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
