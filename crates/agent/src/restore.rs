//! `duplex restore`: recreate a snapshot's files, directories, modes and
//! mtimes under a target directory, and nowhere else.
//!
//! The manifest is authenticated (only the account's key could have sealed
//! it), but it is still checked whole before anything is written: every
//! path relative with no `..`, no two entries with one name, every entry's
//! parent a directory of the snapshot, chunk ids well formed. And no
//! write ever goes through a symlink: parents are checked to be real
//! directories, files are opened with O_NOFOLLOW, and symlinks from the
//! snapshot are created only after every file and directory is in place.

use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::collections::HashSet;
use std::sync::Arc;

use duplex_proto::v1::{EntryKind, FileEntry, GetSnapshotRequest, SnapshotInfo};
use duplex_types::{ChunkId, validate_relative_path};
use futures::{StreamExt, TryStreamExt};
use indicatif::ProgressBar;
use serde::Serialize;

use crate::AgentError;
use crate::crypto::Keys;
use crate::manifest::{fetch_chunks, fetch_manifest, link_target_bytes, path_bytes};
use crate::session::{Session, StorageClient};
use crate::unbuffered::{self, UnbufferedWriter};

/// Files (or groups of small files) restored at once.
const PARALLEL_FILES: usize = 4;
/// Small files are restored in groups of up to this many bytes and
/// files: one `GetChunks` call and one blocking write for the group,
/// where one each per file cost more than the files.
const GROUP_BYTES: u64 = 8 * 1024 * 1024;
const GROUP_FILES: usize = 512;

/// Consecutive files cut into groups; a file over `GROUP_BYTES` alone.
fn groups(files: &[(PathBuf, FileEntry)]) -> impl Iterator<Item = &[(PathBuf, FileEntry)]> {
    let mut rest = files;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut n = 0;
        while let Some((_, entry)) = rest.get(n)
            && n < GROUP_FILES
            && (n == 0 || bytes + entry.size <= GROUP_BYTES)
        {
            bytes += entry.size;
            n += 1;
            if bytes > GROUP_BYTES {
                break;
            }
        }
        let (group, after) = rest.split_at(n);
        rest = after;
        Some(group)
    })
}

#[derive(Debug, Serialize)]
pub struct RestoreReport {
    pub snapshot: String,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// FIFOs, sockets and devices made.
    pub special: u64,
    pub bytes: u64,
    /// Entries that could not be made (a device without the privilege to
    /// make one), each named in a warning.
    pub skipped: u64,
}

/// The snapshot `query` names (id, unique prefix or "latest").
pub async fn find(session: &Session, query: &str) -> Result<SnapshotInfo, AgentError> {
    Ok(session
        .storage
        .clone()
        .get_snapshot(GetSnapshotRequest { id: query.to_owned() })
        .await
        .map_err(AgentError::rpc(format!("finding snapshot {query}")))?
        .into_inner())
}

pub async fn restore(
    session: &Session,
    keys: Arc<Keys>,
    info: SnapshotInfo,
    target: &Path,
    includes: &[std::ffi::OsString],
    progress: ProgressBar,
) -> Result<RestoreReport, AgentError> {
    let storage = session.storage.clone();
    let mut entries = fetch_manifest(&storage, &keys, &info.manifest_chunks)
        .await?
        .entries;
    if !includes.is_empty() {
        entries = crate::browse::included(entries, includes)?;
    }
    let plan = Plan::new(entries, target)?;
    progress.set_length(plan.files.iter().map(|(_, e)| e.size).sum());

    std::fs::create_dir_all(target).map_err(AgentError::io(target))?;
    for (path, _) in &plan.dirs {
        make_dir(target, path)?;
    }
    let mut bytes = 0;
    let mut writes = futures::stream::iter(groups(&plan.files).map(|group| {
        let storage = storage.clone();
        let progress = progress.clone();
        let keys = keys.clone();
        async move {
            match group {
                [(path, entry)] if entry.size > GROUP_BYTES => {
                    restore_file(storage, keys, target, path, entry, &progress).await
                }
                small => restore_small(storage, keys, target, small, &progress).await,
            }
        }
    }))
    .buffer_unordered(PARALLEL_FILES);
    while let Some(written) = writes.next().await {
        bytes += written?;
    }
    drop(writes);
    let mut skipped = 0;
    for (path, entry) in &plan.specials {
        if let Err(e) = make_special(target, path, entry) {
            progress.suspend(|| eprintln!("warning: skipped {}: {e}", target.join(path).display()));
            skipped += 1;
        }
    }
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
        special: plan.specials.len() as u64 - skipped,
        bytes,
        skipped,
    })
}

/// The manifest sorted into what to create, every path already checked.
pub struct Plan {
    dirs: Vec<(PathBuf, FileEntry)>,
    files: Vec<(PathBuf, FileEntry)>,
    symlinks: Vec<(PathBuf, FileEntry)>,
    /// FIFOs, sockets and devices.
    specials: Vec<(PathBuf, FileEntry)>,
}

impl Plan {
    /// Checks the whole manifest; refuses it (naming the first problem and
    /// saying nothing was written) before anything touches the target.
    pub fn new(entries: Vec<FileEntry>, target: &Path) -> Result<Plan, AgentError> {
        let refuse = |why: String| {
            AgentError::UnsafePath(format!("{why} (nothing was written to {})", target.display()))
        };
        let mut plan = Plan {
            dirs: Vec::new(),
            files: Vec::new(),
            symlinks: Vec::new(),
            specials: Vec::new(),
        };
        let mut names = HashSet::new();
        for entry in entries {
            let path = validate_relative_path(path_bytes(&entry)).map_err(|e| refuse(e.to_string()))?;
            if !names.insert(path.clone()) {
                return Err(refuse(format!("the snapshot names {} twice", path.display())));
            }
            check_entry(&entry).map_err(refuse)?;
            match entry.kind() {
                EntryKind::Dir => plan.dirs.push((path, entry)),
                EntryKind::File => plan.files.push((path, entry)),
                EntryKind::Symlink => plan.symlinks.push((path, entry)),
                EntryKind::Fifo | EntryKind::Socket | EntryKind::CharDevice | EntryKind::BlockDevice => {
                    plan.specials.push((path, entry))
                }
                EntryKind::Unspecified => return Err(refuse(format!("entry {:?} has no kind", entry.path))),
            }
        }
        plan.dirs.sort_by(|a, b| a.0.cmp(&b.0));
        plan.check_parents_are_dirs().map_err(refuse)?;
        Ok(plan)
    }

    /// Every entry's parent must be a directory of the snapshot itself, so
    /// no entry sits below a file or a symlink, and none can be reached
    /// through a symlink the snapshot creates.
    fn check_parents_are_dirs(&self) -> Result<(), String> {
        let dirs: HashSet<&Path> = self.dirs.iter().map(|(p, _)| p.as_path()).collect();
        let all = self
            .dirs
            .iter()
            .chain(&self.files)
            .chain(&self.symlinks)
            .chain(&self.specials);
        for (path, _) in all {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
                && !dirs.contains(parent)
            {
                return Err(format!(
                    "{} is inside {}, which is not a directory of the snapshot",
                    path.display(),
                    parent.display()
                ));
            }
        }
        Ok(())
    }
}

/// What one entry must hold for its kind.
fn check_entry(entry: &FileEntry) -> Result<(), String> {
    let kind = EntryKind::try_from(entry.kind).unwrap_or(EntryKind::Unspecified);
    if kind != EntryKind::File && !entry.chunks.is_empty() {
        return Err(format!("entry {:?} is not a file but names chunks", entry.path));
    }
    let target = link_target_bytes(entry);
    if kind == EntryKind::Symlink && (target.is_empty() || target.contains(&0)) {
        return Err(format!("symlink {:?} has an empty or invalid target", entry.path));
    }
    for c in &entry.chunks {
        ChunkId::from_bytes(c).map_err(|e| format!("entry {:?}: {e}", entry.path))?;
    }
    Ok(())
}

async fn restore_file(
    storage: StorageClient,
    keys: Arc<Keys>,
    target: &Path,
    path: &Path,
    entry: &FileEntry,
    progress: &ProgressBar,
) -> Result<u64, AgentError> {
    let full = target.join(path);
    check_parents(target, path)?;
    let out = unbuffered::create(&full, entry.size).map_err(AgentError::io(&full))?;
    let mut unfinished = Unfinished(Some(&full));
    let (out, written) = write_chunks(out, storage, keys, entry, &full, progress).await?;
    let file = out.finish().map_err(AgentError::io(&full))?;
    finish_file(&file, &full, entry, written)?;
    unfinished.0 = None;
    Ok(written)
}

/// Restores a group of small files: their chunks fetched in one call (each
/// checked as it arrives), then the files written in one blocking task.
async fn restore_small(
    storage: StorageClient,
    keys: Arc<Keys>,
    target: &Path,
    group: &[(PathBuf, FileEntry)],
    progress: &ProgressBar,
) -> Result<u64, AgentError> {
    let ids: Vec<Vec<u8>> = group.iter().flat_map(|(_, e)| e.chunks.iter().cloned()).collect();
    let mut chunks = Vec::with_capacity(ids.len());
    if !ids.is_empty() {
        let mut stream = std::pin::pin!(fetch_chunks(storage, keys, ids).await?);
        while let Some(plain) = stream.try_next().await? {
            chunks.push(plain);
        }
    }
    let (target, group, progress) = (target.to_path_buf(), group.to_vec(), progress.clone());
    tokio::task::spawn_blocking(move || {
        let mut chunks = chunks.into_iter();
        let mut written = 0;
        for (path, entry) in &group {
            let data = chunks.by_ref().take(entry.chunks.len());
            written += write_small(&target, path, entry, data)?;
        }
        progress.inc(written);
        Ok(written)
    })
    .await
    .map_err(|e| AgentError::Invalid(format!("write task failed: {e}")))?
}

fn write_small(
    target: &Path,
    path: &Path,
    entry: &FileEntry,
    chunks: impl Iterator<Item = Vec<u8>>,
) -> Result<u64, AgentError> {
    let full = target.join(path);
    check_parents(target, path)?;
    let mut out = unbuffered::create(&full, entry.size).map_err(AgentError::io(&full))?;
    let mut unfinished = Unfinished(Some(&full));
    let mut written = 0u64;
    for data in chunks {
        out.write(&data).map_err(AgentError::io(&full))?;
        written += data.len() as u64;
    }
    let file = out.finish().map_err(AgentError::io(&full))?;
    finish_file(&file, &full, entry, written)?;
    unfinished.0 = None;
    Ok(written)
}

/// Checks what was written against the manifest, then sets the mode and
/// mtime.
fn finish_file(file: &File, full: &Path, entry: &FileEntry, written: u64) -> Result<(), AgentError> {
    if written != entry.size {
        return Err(AgentError::Invalid(format!(
            "{}: restored {written} bytes but the manifest says {}",
            full.display(),
            entry.size
        )));
    }
    file.set_permissions(std::fs::Permissions::from_mode(entry.mode))
        .map_err(AgentError::io(full))?;
    file.set_modified(system_time(entry.mtime_ns))
        .map_err(AgentError::io(full))
}

/// Removes a file being restored unless it was finished: one that failed a
/// check, or whose restore was cut short when another file failed, is not
/// left half written in the target.
struct Unfinished<'a>(Option<&'a Path>);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if let Some(path) = self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Writes a file's chunks in order; every chunk is checked before its
/// bytes are written.
async fn write_chunks(
    mut out: UnbufferedWriter,
    storage: StorageClient,
    keys: Arc<Keys>,
    entry: &FileEntry,
    full: &Path,
    progress: &ProgressBar,
) -> Result<(UnbufferedWriter, u64), AgentError> {
    let mut written = 0u64;
    if entry.chunks.is_empty() {
        return Ok((out, 0));
    }
    let mut chunks = std::pin::pin!(fetch_chunks(storage, keys, entry.chunks.clone()).await?);
    while let Some(raw) = chunks.try_next().await? {
        let len = raw.len() as u64;
        out = write_blocking(out, raw, full).await?;
        written += len;
        progress.inc(len);
    }
    Ok((out, written))
}

async fn write_blocking(
    mut out: UnbufferedWriter,
    data: Vec<u8>,
    path: &Path,
) -> Result<UnbufferedWriter, AgentError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        out.write(&data).map_err(AgentError::io(&path))?;
        Ok(out)
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
    let link_target = std::ffi::OsStr::from_bytes(link_target_bytes(entry));
    std::os::unix::fs::symlink(link_target, &full).map_err(AgentError::io(&full))
}

/// Makes a FIFO, socket or device node with the entry's mode and mtime.
/// Anything already at its path is replaced only if it is not a directory.
fn make_special(target: &Path, path: &Path, entry: &FileEntry) -> Result<(), AgentError> {
    check_parents(target, path)?;
    let full = target.join(path);
    if let Ok(meta) = std::fs::symlink_metadata(&full) {
        if meta.is_dir() {
            return Err(AgentError::UnsafePath(format!(
                "{} exists and is a directory",
                full.display()
            )));
        }
        std::fs::remove_file(&full).map_err(AgentError::io(&full))?;
    }
    use nix::sys::stat::{Mode, SFlag};
    let kind = match entry.kind() {
        EntryKind::Fifo => SFlag::S_IFIFO,
        EntryKind::Socket => SFlag::S_IFSOCK,
        EntryKind::CharDevice => SFlag::S_IFCHR,
        _ => SFlag::S_IFBLK,
    };
    // mknod(2) makes all four kinds; a device needs CAP_MKNOD.
    let mode = Mode::from_bits_truncate(entry.mode & 0o7777);
    nix::sys::stat::mknod(&full, kind, mode, entry.rdev).map_err(|e| AgentError::io(&full)(e.into()))?;
    // The umask applied to mknod's mode: set the bits exactly.
    std::fs::set_permissions(&full, std::fs::Permissions::from_mode(entry.mode))
        .map_err(AgentError::io(&full))?;
    // By path, not by a handle: a FIFO would block an open and a socket
    // cannot be opened at all.
    let mtime = nix::sys::time::TimeSpec::new(
        entry.mtime_ns.div_euclid(1_000_000_000),
        entry.mtime_ns.rem_euclid(1_000_000_000),
    );
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        &full,
        &nix::sys::time::TimeSpec::UTIME_OMIT,
        &mtime,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| AgentError::io(&full)(e.into()))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: EntryKind) -> FileEntry {
        FileEntry {
            path: path.into(),
            kind: kind as i32,
            mode: 0o755,
            symlink_target: if kind == EntryKind::Symlink {
                "/etc".into()
            } else {
                String::new()
            },
            ..Default::default()
        }
    }

    fn refused(entries: Vec<FileEntry>) -> String {
        let target = tempfile::tempdir().expect("tempdir");
        let into = target.path().join("restore");
        let err = Plan::new(entries, &into).err().expect("refused").to_string();
        assert!(
            !into.exists(),
            "nothing may be written before the manifest is checked"
        );
        assert!(err.contains("nothing was written"), "{err}");
        err
    }

    #[test]
    fn small_files_go_in_groups_and_a_large_one_alone() {
        let file = |size| {
            (
                PathBuf::from("f"),
                FileEntry {
                    size,
                    ..Default::default()
                },
            )
        };
        let mut files = vec![file(10), file(GROUP_BYTES + 1), file(10)];
        files.extend((0..GROUP_FILES + 1).map(|_| file(1)));
        files.push(file(GROUP_BYTES - 1));
        files.push(file(2));
        let sizes: Vec<usize> = groups(&files).map(<[_]>::len).collect();
        // [10], [large], [10 + 511 small], [2 small], [near the limit], [2].
        assert_eq!(sizes, [1, 1, GROUP_FILES, 2, 1, 1]);
        assert_eq!(sizes.iter().sum::<usize>(), files.len());
    }

    #[test]
    fn a_whole_manifest_is_checked_before_anything_is_written() {
        use EntryKind::{Dir, File, Symlink};
        // A file below a symlink of the snapshot.
        let err = refused(vec![
            entry("a", Dir),
            entry("a/link", Symlink),
            entry("a/link/passwd", File),
        ]);
        assert!(err.contains("not a directory of the snapshot"), "{err}");
        // A file below a file.
        refused(vec![entry("f", File), entry("f/x", File)]);
        // A directory and a symlink of the same name.
        let err = refused(vec![entry("d", Dir), entry("d", Symlink), entry("d/x", File)]);
        assert!(err.contains("twice"), "{err}");
        // Escapes.
        refused(vec![entry("../x", File)]);
        refused(vec![entry("/etc/passwd", File)]);
        refused(vec![entry("a/../../x", File)]);
        // The exact bytes are what is checked, not the display form.
        let mut hidden = entry("fine", File);
        hidden.path_bytes = b"../\xffescape".to_vec();
        refused(vec![hidden]);
        // A directory naming chunks.
        let mut dir = entry("d", Dir);
        dir.chunks.push(vec![0; 32]);
        refused(vec![dir]);
        // A well-formed one passes.
        let target = tempfile::tempdir().expect("tempdir");
        assert!(
            Plan::new(
                vec![entry("a", Dir), entry("a/f", File), entry("a/l", Symlink)],
                target.path()
            )
            .is_ok()
        );
    }
}
