//! `duplex backup`: scan, chunk and hash on every core (`pipeline`), upload
//! only what the server lacks, then commit a snapshot whose manifest names
//! every chunk, everything sealed with the account's keys (see `crypto`),
//! and the paths and counts in an encrypted summary. Nothing is visible until the commit, so a backup cut short
//! leaves no snapshot, and the next one reuses every chunk already stored.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use duplex_proto::v1::{Chunk, CommitSnapshotRequest, SnapshotSummary};
use duplex_types::ChunkId;
use futures::StreamExt;
use indicatif::ProgressBar;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::AgentError;
use crate::chunking::{UploadLimit, Uploader};
use crate::crypto::Keys;
use crate::pipeline::{self, Streamed};
use crate::scan::Selection;
use crate::session::{Session, is_throttled, throttled, throttled_pauses};

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
    let mut pauses = throttled_pauses();
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
            Err(Attempt::Refused(status)) => match pauses.next() {
                // Refused before the server read a byte of it, so what the
                // other stream sent is kept and the next attempt sends
                // only the rest.
                Some(pause) => {
                    tracing::debug!(
                        message = status.message(),
                        "an upload stream was refused; trying again"
                    );
                    progress.set_position(0);
                    tokio::time::sleep(pause).await;
                }
                None => return Err(AgentError::rpc("uploading chunks")(status)),
            },
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
    /// An upload stream was refused for the account's per-account limits.
    Refused(tonic::Status),
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
    progress.set_length(0);
    let mut txs = Vec::new();
    let mut uploads = Vec::new();
    for _ in 0..UPLOAD_STREAMS {
        // Groups of about 1 MiB (`chunking::SEND_BYTES`), so a stream holds
        // a few MiB at most, as it did chunk by chunk.
        let (tx, rx) = mpsc::channel::<Vec<Chunk>>(4);
        let mut storage = session.storage.clone();
        let chunks = ReceiverStream::new(rx).flat_map(futures::stream::iter);
        uploads.push(tokio::spawn(async move { storage.put_chunks(chunks).await }));
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

    let streamed = {
        let (uploader, progress, roots) = (uploader.clone(), progress.clone(), roots.to_vec());
        let cache = crate::cache::location(&keys, &roots);
        tokio::task::spawn_blocking(move || {
            let streamed = pipeline::run(&pipeline::Inputs {
                roots: &roots,
                selection: &options.selection,
                force_read: options.force_read,
                cache,
                scan_start_ns,
                uploader: &uploader,
                progress: &progress,
                warn: &*warn,
            })?;
            // The reference blobs list every data chunk, for the servers'
            // garbage collection to keep.
            let blobs = duplex_types::refs::encode(&streamed.data_chunks);
            let reference_blobs: Vec<ChunkId> = blobs.iter().map(|b| b.0).collect();
            uploader.send_references(blobs)?;
            Ok::<_, AgentError>((streamed, reference_blobs))
        })
        .await
        .map_err(|e| AgentError::Invalid(format!("backup task failed: {e}")))?
    };
    let (streamed, reference_blobs) = match streamed {
        Ok(v) => v,
        Err(e) => {
            // The upload streams end only once every sender is gone.
            drop(uploader);
            return Err(upload_error(upload, e).await);
        }
    };
    let Streamed {
        manifest_chunks,
        files,
        bytes,
        read_bytes,
        ..
    } = streamed;
    let uploaded_bytes = uploader.uploaded_bytes.load(Ordering::Relaxed);
    drop(uploader);
    upload.await.map_err(upload_failed)?;

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

/// The upload's own error when it failed, else `fallback`: a stream that
/// was refused or broke leaves the chunking threads without a place to
/// send, and that is the cause to report.
async fn upload_error(
    upload: impl std::future::Future<Output = Result<(), tonic::Status>>,
    fallback: AgentError,
) -> Attempt {
    match upload.await {
        Err(status) => upload_failed(status),
        Ok(()) => Attempt::Failed(fallback),
    }
}

fn upload_failed(status: tonic::Status) -> Attempt {
    match is_throttled(&status) {
        true => Attempt::Refused(status),
        false => Attempt::Failed(AgentError::rpc("uploading chunks")(status)),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
