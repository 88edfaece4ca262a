//! The backup as a pipeline: the walk feeds chunking threads on every
//! core, and their results are put back in walk order as they come, to be
//! written straight into the manifest stream and the new file cache.
//! Nothing holds the whole tree: memory depends on how far the chunking
//! threads may run ahead of the oldest unfinished file (`WINDOW`), not on
//! the number of files.
//!
//! ```text
//! walk ──(files, cache hits checked in batches)──▶ chunkers ──▶ in order ──▶ manifest stream ──▶ chunks
//!                                                                        └─▶ file cache, references
//! ```
//!
//! The manifest's bytes are exactly those of one `Manifest` message (each
//! entry is field 1, length-delimited), so a reader decodes it as before.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};

use duplex_proto::v1::{EntryKind, FileEntry};
use duplex_types::ChunkId;
use indicatif::ProgressBar;
use prost::Message;

use crate::AgentError;
use crate::cache::{CacheReader, CacheWriter, Stat};
use crate::chunking::{Batch, Uploader, chunk_stream, cut_file};
use crate::manifest::path_bytes;
use crate::scan::{Item, Selection, scan};

/// Files the chunking threads may be ahead of the oldest unfinished one.
const WINDOW: usize = 8192;
/// Files the walk hands over at once, and cache hits' chunk ids it checks
/// with the server at once.
const WALK_BATCH: usize = 1024;
const IDS_PER_CHECK: usize = 4096;
/// Files handed to a chunking thread at once, and results handed back at
/// once: a hand-off per file (a lock, often a wake-up) cost small files
/// more than reading them. A job of big files is cut at `JOB_BYTES` so
/// they still spread over every thread.
const JOB_FILES: usize = 64;
const JOB_BYTES: u64 = 4 * 1024 * 1024;

/// What the pipeline is given.
pub struct Inputs<'a> {
    pub roots: &'a [PathBuf],
    pub selection: &'a Selection,
    pub force_read: bool,
    pub cache: PathBuf,
    pub scan_start_ns: i64,
    pub uploader: &'a Uploader,
    pub progress: &'a ProgressBar,
    pub warn: &'a (dyn Fn(String) + Send + Sync),
}

/// What a snapshot's commit names, and what the backup read.
pub struct Streamed {
    pub manifest_chunks: Vec<ChunkId>,
    pub data_chunks: Vec<ChunkId>,
    pub files: u64,
    pub bytes: u64,
    pub read_bytes: u64,
}

/// A file to chunk, and the chunk list the cache says it still has.
struct Job {
    index: usize,
    item: Item,
    reuse: Option<Vec<Vec<u8>>>,
}

/// A finished file: its entry (none when it could not be read).
struct Done {
    index: usize,
    root: u32,
    stat: Stat,
    entry: Option<FileEntry>,
}

/// How far the results have been put in order, for the chunking threads
/// to stay within `WINDOW` of it; or that the backup stopped.
#[derive(Default)]
struct Window {
    state: Mutex<(usize, bool)>,
    moved: Condvar,
}

impl Window {
    /// Whether `index` is within the window now (or the backup stopped).
    fn admits(&self, index: usize) -> bool {
        self.state.lock().map_or(true, |s| Window::open_to(&s, index))
    }

    fn open_to(&(emitted, stopped): &(usize, bool), index: usize) -> bool {
        stopped || index < emitted + WINDOW
    }

    /// Waits until `index` is within the window; false once stopped.
    fn wait_for(&self, index: usize) -> bool {
        let Ok(mut state) = self.state.lock() else {
            return false;
        };
        while !Window::open_to(&state, index) {
            state = match self.moved.wait(state) {
                Ok(s) => s,
                Err(_) => return false,
            };
        }
        !state.1
    }

    fn advance(&self, emitted: usize) {
        if let Ok(mut state) = self.state.lock() {
            state.0 = emitted;
        }
        self.moved.notify_all();
    }

    fn stop(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.1 = true;
        }
        self.moved.notify_all();
    }
}

pub fn run(inputs: &Inputs) -> Result<Streamed, AgentError> {
    let (cache, problem) = CacheReader::open(&inputs.cache);
    if let Some(problem) = problem {
        // Only speed is lost: not a skipped item (`warn` counts those).
        inputs.progress.suspend(|| eprintln!("warning: {problem}"));
    }
    let cache_out = match CacheWriter::create(&inputs.cache, inputs.scan_start_ns) {
        Ok(w) => Some(w),
        Err(e) => {
            inputs
                .progress
                .suspend(|| eprintln!("warning: the file cache will not be saved: {e}"));
            None
        }
    };
    let window = Window::default();
    let read = AtomicU64::new(0);
    let (jobs_tx, jobs_rx) = sync_channel::<Vec<Job>>(WALK_BATCH / JOB_FILES);
    let (done_tx, done_rx) = sync_channel::<Vec<Done>>(WALK_BATCH / JOB_FILES);
    let (manifest_in, manifest_out) =
        std::io::pipe().map_err(|e| AgentError::Invalid(format!("pipe: {e}")))?;
    std::thread::scope(|scope| {
        let walker = scope.spawn(|| walk(inputs, cache, jobs_tx));
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let chunkers: Vec<_> = (0..workers())
            .map(|_| {
                let (jobs, done, window, read) = (jobs_rx.clone(), done_tx.clone(), &window, &read);
                scope.spawn(move || chunker(inputs, &jobs, &done, window, read))
            })
            .collect();
        drop((jobs_rx, done_tx));
        let manifest = scope.spawn(|| upload_manifest(manifest_in, inputs.uploader));
        let ordered = in_order(done_rx, &window, manifest_out, cache_out, inputs.progress);
        // Whatever ended it, the chunkers must not wait on the window.
        window.stop();
        let walked = join(walker, "walk");
        let chunked: Vec<Result<(), AgentError>> =
            chunkers.into_iter().map(|c| join(c, "chunking")).collect();
        let manifest_chunks = join(manifest, "manifest");
        // The cause is reported, not what followed from it: a chunker or
        // the walk failing leaves files out of order, and the manifest
        // upload failing closes the stream the results are written to.
        chunked.into_iter().try_for_each(|c| c)?;
        walked?;
        let manifest_chunks = manifest_chunks?;
        let ordered = ordered?;
        // Put in place only after a whole walk, and before the commit: a
        // chunk it names that never gets committed is found missing next
        // time, and its file read again.
        if let Some(writer) = ordered.cache
            && let Err(e) = writer.finish()
        {
            inputs
                .progress
                .suspend(|| eprintln!("warning: the file cache was not saved: {e}"));
        }
        Ok(Streamed {
            manifest_chunks,
            data_chunks: ordered.data_chunks,
            files: ordered.files,
            bytes: ordered.bytes,
            read_bytes: read.load(Ordering::Relaxed),
        })
    })
}

fn workers() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 8)
}

fn join<T>(
    handle: std::thread::ScopedJoinHandle<'_, Result<T, AgentError>>,
    what: &str,
) -> Result<T, AgentError> {
    handle
        .join()
        .map_err(|_| AgentError::Invalid(format!("the {what} thread panicked")))?
}

/// The walk: hands every item over in order, with the chunk list of a
/// file the cache knows unchanged once the server has said it still holds
/// every chunk of it (a file with one collected is read again).
fn walk(inputs: &Inputs, mut cache: CacheReader, jobs: SyncSender<Vec<Job>>) -> Result<(), AgentError> {
    let mut pending: Vec<Job> = Vec::new();
    let mut pending_ids = 0;
    let mut index = 0;
    // Set when the chunkers have stopped: the walk ends, and what stopped
    // them is the error to report, not this.
    let mut stopped = false;
    let walked = scan(inputs.roots, inputs.selection, inputs.warn, &mut |item| {
        inputs.progress.inc_length(item.entry.size);
        let reuse = match inputs.force_read || item.entry.kind() != EntryKind::File {
            true => None,
            false => cache.unchanged(item.root, path_bytes(&item.entry), &item.stat),
        };
        pending_ids += reuse.as_ref().map_or(0, Vec::len);
        pending.push(Job { index, item, reuse });
        index += 1;
        if pending.len() >= WALK_BATCH || pending_ids >= IDS_PER_CHECK {
            pending_ids = 0;
            if !release(&mut pending, inputs.uploader, &jobs)? {
                stopped = true;
                return Err(AgentError::Invalid("the chunkers stopped".into()));
            }
        }
        Ok(())
    });
    match walked {
        Err(_) if stopped => Ok(()),
        Err(e) => Err(e),
        Ok(()) => release(&mut pending, inputs.uploader, &jobs).map(drop),
    }
}

/// Hands the walked files over; false when the chunkers have stopped.
fn release(
    pending: &mut Vec<Job>,
    uploader: &Uploader,
    jobs: &SyncSender<Vec<Job>>,
) -> Result<bool, AgentError> {
    let ids: Vec<Vec<u8>> = pending
        .iter()
        .filter_map(|j| j.reuse.as_ref())
        .flatten()
        .cloned()
        .collect();
    let gone: HashSet<Vec<u8>> = match ids.is_empty() {
        true => HashSet::new(),
        false => uploader.lacking(ids)?,
    };
    let (mut group, mut bytes) = (Vec::new(), 0);
    for mut job in pending.drain(..) {
        if job
            .reuse
            .as_ref()
            .is_some_and(|chunks| chunks.iter().any(|c| gone.contains(c)))
        {
            job.reuse = None;
        }
        if job.reuse.is_none() {
            bytes += job.item.stat.size;
        }
        group.push(job);
        if group.len() >= JOB_FILES || bytes >= JOB_BYTES {
            bytes = 0;
            if jobs.send(std::mem::take(&mut group)).is_err() {
                return Ok(false);
            }
        }
    }
    Ok(group.is_empty() || jobs.send(group).is_ok())
}

/// A chunking thread: files are cut, hashed and sealed here, and their
/// new chunks uploaded. A file that vanished or cannot be read is skipped
/// with a warning rather than failing the whole backup.
fn chunker(
    inputs: &Inputs,
    jobs: &Mutex<Receiver<Vec<Job>>>,
    done: &SyncSender<Vec<Done>>,
    window: &Window,
    read: &AtomicU64,
) -> Result<(), AgentError> {
    let mut batch = Batch::default();
    let mut results = Vec::new();
    'jobs: loop {
        let next = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return Err(AgentError::Invalid("a chunking thread panicked".into())),
        };
        let Ok(group) = next else { break };
        for job in group {
            // The results held here may be what the window waits for.
            if !results.is_empty()
                && !window.admits(job.index)
                && done.send(std::mem::take(&mut results)).is_err()
            {
                break 'jobs;
            }
            if !window.wait_for(job.index) {
                break 'jobs;
            }
            match chunk_job(inputs, job, &mut batch, read) {
                Ok(result) => results.push(result),
                Err(e) => {
                    // The results wait for this file forever otherwise.
                    window.stop();
                    return Err(e);
                }
            }
        }
        if done.send(std::mem::take(&mut results)).is_err() {
            break;
        }
    }
    inputs.uploader.flush(&mut batch).inspect_err(|_| window.stop())
}

/// One file's result; an error only for what must end the backup.
fn chunk_job(inputs: &Inputs, job: Job, batch: &mut Batch, read: &AtomicU64) -> Result<Done, AgentError> {
    let entry = match job.reuse {
        Some(chunks) => Some(unchanged(&job.item, chunks, inputs.progress)),
        None => match chunk_file(&job.item, inputs.uploader, batch, inputs.progress, read) {
            Ok(entry) => Some(entry),
            Err(AgentError::Io { path, source }) => {
                (inputs.warn)(format!("skipped {}: {source}", path.display()));
                None
            }
            Err(e) => return Err(e),
        },
    };
    Ok(Done {
        index: job.index,
        root: job.item.root,
        stat: job.item.stat,
        entry,
    })
}

/// The entry of a file the cache knows unchanged: its chunks, unread.
fn unchanged(item: &Item, chunks: Vec<Vec<u8>>, progress: &ProgressBar) -> FileEntry {
    progress.inc(item.stat.size);
    FileEntry {
        chunks,
        size: item.stat.size,
        ..item.entry.clone()
    }
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

/// What putting the results in order gathered.
struct Ordered {
    data_chunks: Vec<ChunkId>,
    files: u64,
    bytes: u64,
    /// The new file cache, complete but not yet in place.
    cache: Option<CacheWriter>,
}

/// Puts the chunkers' results back in walk order and writes each entry
/// to the manifest stream and, for a file, to the new cache.
fn in_order(
    done: Receiver<Vec<Done>>,
    window: &Window,
    manifest: std::io::PipeWriter,
    mut cache: Option<CacheWriter>,
    progress: &ProgressBar,
) -> Result<Ordered, AgentError> {
    let mut manifest = std::io::BufWriter::with_capacity(256 * 1024, manifest);
    let mut out = Ordered {
        data_chunks: Vec::new(),
        files: 0,
        bytes: 0,
        cache: None,
    };
    let mut waiting: BTreeMap<usize, Done> = BTreeMap::new();
    let mut next = 0;
    let mut encoded = Vec::new();
    for results in done {
        waiting.extend(results.into_iter().map(|r| (r.index, r)));
        while let Some(result) = waiting.remove(&next) {
            next += 1;
            let Some(entry) = result.entry else { continue };
            if entry.kind() == EntryKind::File {
                out.files += 1;
                out.bytes += entry.size;
                for c in &entry.chunks {
                    out.data_chunks.push(
                        ChunkId::from_bytes(c).map_err(|e| AgentError::Invalid(format!("chunk id: {e}")))?,
                    );
                }
                if let Some(writer) = &mut cache {
                    let added = writer.add(result.root, path_bytes(&entry), &result.stat, &entry.chunks);
                    if let Err(e) = added {
                        progress.suspend(|| eprintln!("warning: the file cache will not be saved: {e}"));
                        cache = None;
                    }
                }
            }
            // Field 1 of `Manifest`, length-delimited: the stream is one
            // `Manifest` message however it is cut.
            encoded.clear();
            encoded.push(0x0a);
            entry
                .encode_length_delimited(&mut encoded)
                .map_err(|e| AgentError::Invalid(format!("encoding the manifest: {e}")))?;
            manifest.write_all(&encoded).map_err(manifest_closed)?;
        }
        window.advance(next);
    }
    if !waiting.is_empty() {
        // A chunker stopped early; its error is the one to report.
        return Err(AgentError::Invalid(
            "the backup stopped before every file was chunked".into(),
        ));
    }
    manifest.flush().map_err(manifest_closed)?;
    out.cache = cache;
    Ok(out)
}

fn manifest_closed(e: std::io::Error) -> AgentError {
    AgentError::Invalid(format!("the manifest upload stopped: {e}"))
}

/// Cuts the manifest stream into chunks as it comes and uploads them.
fn upload_manifest(stream: std::io::PipeReader, uploader: &Uploader) -> Result<Vec<ChunkId>, AgentError> {
    let mut ids = Vec::new();
    let mut batch = Batch::default();
    chunk_stream(stream, Path::new("<manifest>"), &uploader.keys, |id, data| {
        ids.push(id);
        if batch.push(id, data) {
            uploader.flush(&mut batch)?;
        }
        Ok(())
    })?;
    uploader.flush(&mut batch)?;
    Ok(ids)
}
