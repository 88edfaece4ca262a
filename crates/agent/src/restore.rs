//! `duplex restore`: recreate a snapshot's files, directories, modes and
//! mtimes under a target directory, and nowhere else.
//!
//! The manifest comes from a server, so it is treated as hostile: every
//! path is checked before anything is written (relative, no `..`), and no
//! write ever goes through a symlink: parents are checked to be real
//! directories, files are opened with O_NOFOLLOW, and symlinks from the
//! snapshot are created only after every file and directory is in place.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use duplex_proto::v1::{EntryKind, FileEntry, GetChunksRequest, GetSnapshotRequest, Manifest};
use duplex_types::{ChunkId, validate_relative_path};
use futures::{StreamExt, TryStreamExt};
use indicatif::ProgressBar;
use prost::Message;
use serde::Serialize;

use crate::AgentError;
use crate::session::{Session, StorageClient};

/// Files restored at once.
const PARALLEL_FILES: usize = 4;

#[derive(Debug, Serialize)]
pub struct RestoreReport {
    pub snapshot: String,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
}

pub async fn restore(
    session: &Session,
    snapshot: &str,
    target: &Path,
    progress: ProgressBar,
) -> Result<RestoreReport, AgentError> {
    let mut storage = session.storage.clone();
    let info = storage
        .get_snapshot(GetSnapshotRequest {
            id: snapshot.to_owned(),
        })
        .await
        .map_err(AgentError::rpc(format!("finding snapshot {snapshot}")))?
        .into_inner();
    let manifest = fetch_manifest(&storage, &info.manifest_chunks).await?;
    let plan = Plan::new(manifest.entries, target)?;
    progress.set_length(plan.files.iter().map(|(_, e)| e.size).sum());

    std::fs::create_dir_all(target).map_err(AgentError::io(target))?;
    for (path, _) in &plan.dirs {
        make_dir(target, path)?;
    }
    let mut bytes = 0;
    let mut writes = futures::stream::iter(plan.files.iter().map(|(path, entry)| {
        let storage = storage.clone();
        let progress = progress.clone();
        async move { restore_file(storage, target, path, entry, &progress).await }
    }))
    .buffer_unordered(PARALLEL_FILES);
    while let Some(written) = writes.next().await {
        bytes += written?;
    }
    drop(writes);
    for (path, entry) in &plan.symlinks {
        make_symlink(target, path, entry)?;
    }
    // Deepest first, so setting a parent's mtime is the last touch it gets.
    for (path, entry) in plan.dirs.iter().rev() {
        let full = target.join(path);
        set_times(&full, entry.mtime_ns)?;
        std::fs::set_permissions(&full, std::fs::Permissions::from_mode(entry.mode))
            .map_err(AgentError::io(&full))?;
    }
    progress.finish_and_clear();
    Ok(RestoreReport {
        snapshot: info.id,
        files: plan.files.len() as u64,
        dirs: plan.dirs.len() as u64,
        symlinks: plan.symlinks.len() as u64,
        bytes,
    })
}

/// The manifest sorted into what to create, every path already checked.
struct Plan {
    dirs: Vec<(PathBuf, FileEntry)>,
    files: Vec<(PathBuf, FileEntry)>,
    symlinks: Vec<(PathBuf, FileEntry)>,
}

impl Plan {
    fn new(entries: Vec<FileEntry>, target: &Path) -> Result<Plan, AgentError> {
        let mut plan = Plan {
            dirs: Vec::new(),
            files: Vec::new(),
            symlinks: Vec::new(),
        };
        for entry in entries {
            let path = validate_relative_path(&entry.path).map_err(|e| {
                AgentError::UnsafePath(format!("{e} (nothing was written to {})", target.display()))
            })?;
            match entry.kind() {
                EntryKind::Dir => plan.dirs.push((path, entry)),
                EntryKind::File => plan.files.push((path, entry)),
                EntryKind::Symlink => plan.symlinks.push((path, entry)),
                EntryKind::Unspecified => {
                    return Err(AgentError::Invalid(format!(
                        "manifest entry {:?} has no kind",
                        entry.path
                    )));
                }
            }
        }
        plan.dirs.sort_by(|a, b| a.0.cmp(&b.0));
        plan.check_parents_are_dirs()?;
        Ok(plan)
    }

    /// Every entry's parent must be a directory of the snapshot itself, so
    /// no entry can be reached through a symlink the snapshot creates.
    fn check_parents_are_dirs(&self) -> Result<(), AgentError> {
        let dirs: std::collections::HashSet<&Path> = self.dirs.iter().map(|(p, _)| p.as_path()).collect();
        let all = self.dirs.iter().chain(&self.files).chain(&self.symlinks);
        for (path, _) in all {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
                && !dirs.contains(parent)
            {
                return Err(AgentError::UnsafePath(format!(
                    "{} is inside {}, which is not a directory of the snapshot",
                    path.display(),
                    parent.display()
                )));
            }
        }
        Ok(())
    }
}

pub async fn fetch_manifest(storage: &StorageClient, ids: &[Vec<u8>]) -> Result<Manifest, AgentError> {
    let mut bytes = Vec::new();
    let mut stream = fetch_chunks(storage.clone(), ids.to_vec()).await?;
    while let Some(raw) = stream.try_next().await? {
        bytes.extend_from_slice(&raw);
    }
    Manifest::decode(bytes.as_slice())
        .map_err(|e| AgentError::Invalid(format!("snapshot manifest does not decode: {e}")))
}

/// Streams the chunks `ids` in order, each decompressed and checked
/// against its id.
async fn fetch_chunks(
    mut storage: StorageClient,
    ids: Vec<Vec<u8>>,
) -> Result<impl futures::Stream<Item = Result<Vec<u8>, AgentError>>, AgentError> {
    let expected: Vec<ChunkId> = ids
        .iter()
        .map(|b| ChunkId::from_bytes(b).map_err(|e| AgentError::Invalid(e.to_string())))
        .collect::<Result<_, _>>()?;
    let stream = storage
        .get_chunks(GetChunksRequest { ids })
        .await
        .map_err(AgentError::rpc("fetching chunks"))?
        .into_inner();
    let mut position = 0usize;
    Ok(stream.map(move |item| {
        let chunk = item.map_err(AgentError::rpc("fetching chunks"))?;
        let want = expected.get(position).copied();
        position += 1;
        let raw = crate::chunking::decode(&chunk)?;
        let id = ChunkId::of(&raw);
        if Some(id) != want || chunk.id != id.as_bytes() {
            return Err(AgentError::Corrupt(id.to_string()));
        }
        Ok(raw)
    }))
}

async fn restore_file(
    storage: StorageClient,
    target: &Path,
    path: &Path,
    entry: &FileEntry,
    progress: &ProgressBar,
) -> Result<u64, AgentError> {
    let full = target.join(path);
    check_parents(target, path)?;
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&full)
        .map_err(AgentError::io(&full))?;
    let mut written = 0u64;
    if !entry.chunks.is_empty() {
        let mut chunks = fetch_chunks(storage, entry.chunks.clone()).await?;
        while let Some(raw) = chunks.try_next().await? {
            let len = raw.len() as u64;
            file = write_blocking(file, raw, &full).await?;
            written += len;
            progress.inc(len);
        }
    }
    if written != entry.size {
        return Err(AgentError::Invalid(format!(
            "{}: restored {written} bytes but the manifest says {}",
            full.display(),
            entry.size
        )));
    }
    file.set_permissions(std::fs::Permissions::from_mode(entry.mode))
        .map_err(AgentError::io(&full))?;
    file.set_modified(system_time(entry.mtime_ns))
        .map_err(AgentError::io(&full))?;
    Ok(written)
}

async fn write_blocking(mut file: File, data: Vec<u8>, path: &Path) -> Result<File, AgentError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        file.write_all(&data).map_err(AgentError::io(&path))?;
        Ok(file)
    })
    .await
    .map_err(|e| AgentError::Invalid(format!("write task failed: {e}")))?
}

/// Every existing ancestor of `path` under `target` must be a real
/// directory, never a symlink that could lead the write elsewhere.
fn check_parents(target: &Path, path: &Path) -> Result<(), AgentError> {
    let mut at = target.to_path_buf();
    if let Some(parent) = path.parent() {
        for part in parent.components() {
            at.push(part);
            match std::fs::symlink_metadata(&at) {
                Ok(m) if m.file_type().is_dir() => {}
                Ok(_) => {
                    return Err(AgentError::UnsafePath(format!(
                        "{} is not a directory (a symlink or file stands where a directory should be)",
                        at.display()
                    )));
                }
                Err(e) => return Err(AgentError::io(&at)(e)),
            }
        }
    }
    Ok(())
}

fn make_dir(target: &Path, path: &Path) -> Result<(), AgentError> {
    check_parents(target, path)?;
    let full = target.join(path);
    match std::fs::symlink_metadata(&full) {
        Ok(m) if m.file_type().is_dir() => Ok(()),
        Ok(_) => Err(AgentError::UnsafePath(format!(
            "{} exists and is not a directory",
            full.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(&full).map_err(AgentError::io(&full))?;
            // Until the end of the restore, the directory must stay writable.
            std::fs::set_permissions(&full, std::fs::Permissions::from_mode(0o700))
                .map_err(AgentError::io(&full))
        }
        Err(e) => Err(AgentError::io(&full)(e)),
    }
}

fn make_symlink(target: &Path, path: &Path, entry: &FileEntry) -> Result<(), AgentError> {
    check_parents(target, path)?;
    let full = target.join(path);
    if std::fs::symlink_metadata(&full).is_ok() {
        std::fs::remove_file(&full).map_err(AgentError::io(&full))?;
    }
    std::os::unix::fs::symlink(&entry.symlink_target, &full).map_err(AgentError::io(&full))
}

fn set_times(path: &Path, mtime_ns: i64) -> Result<(), AgentError> {
    let dir = File::open(path).map_err(AgentError::io(path))?;
    dir.set_modified(system_time(mtime_ns))
        .map_err(AgentError::io(path))
}

fn system_time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}
