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
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use duplex_proto::v1::{EntryKind, FileEntry, GetSnapshotRequest, SnapshotInfo};
use duplex_rpc::direct_io::Appender;
use duplex_types::{ChunkId, validate_relative_path};
use futures::{StreamExt, TryStreamExt};
use indicatif::ProgressBar;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use serde::Serialize;

use crate::AgentError;
use crate::browse::Includes;
use crate::crypto::Keys;
use crate::manifest::{entries_of, fetch_chunks, fetch_manifest_bytes, link_target_bytes, path_bytes};
use crate::session::{Session, StorageClient};

/// Files (or groups of small files) restored at once.
const PARALLEL_FILES: usize = 4;
/// Small files are restored in groups of up to this many bytes and
/// files: one `GetChunks` call and one blocking write for the group,
/// where one each per file cost more than the files.
const GROUP_BYTES: u64 = 8 * 1024 * 1024;
const GROUP_FILES: usize = 512;

/// Files at least this large are written around the page cache
/// (`duplex_rpc::direct_io`): a restore writes gigabytes nobody reads
/// soon (a 512 MiB restore's agent system time fell from 2.2-3.9 s to
/// 0.65-0.9 s). Below it the padding, the extra truncate and a wait on
/// the device per file cost more than the cache copy saves; on 20,000
/// files of /usr/share direct writes gained nothing down to 16 KiB.
const DIRECT_MIN: u64 = 1024 * 1024;
/// Bytes gathered before each write of a large file.
const DIRECT_BLOCK: u64 = 4 * 1024 * 1024;

/// Consecutive files cut into groups; a file over `GROUP_BYTES` alone.
/// Lazy, so only the groups being restored are in memory.
fn groups<I>(files: I) -> impl Iterator<Item = Result<Vec<(PathBuf, FileEntry)>, AgentError>>
where
    I: Iterator<Item = Result<(PathBuf, FileEntry), AgentError>>,
{
    let mut files = files.peekable();
    std::iter::from_fn(move || {
        let first = match files.next()? {
            Ok(file) => file,
            Err(e) => return Some(Err(e)),
        };
        let mut bytes = first.1.size;
        let mut group = vec![first];
        while group.len() < GROUP_FILES && bytes <= GROUP_BYTES {
            match files.peek() {
                Some(Ok((_, next))) if bytes + next.size <= GROUP_BYTES => {}
                _ => break,
            }
            if let Some(Ok(file)) = files.next() {
                bytes += file.1.size;
                group.push(file);
            }
        }
        Some(Ok(group))
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
    // Kept encoded and read twice, checked whole and then restored, since
    // decoded entries take about 850 bytes a file (175 MiB at 200,000).
    let manifest = fetch_manifest_bytes(&storage, &keys, &info.manifest_chunks).await?;
    let mut filter = Includes::new(includes);
    let plan = Plan::new(
        entries_of(&manifest).filter(|e| e.as_ref().map_or(true, |e| filter.keeps(e))),
        target,
    )?;
    filter.check_all_named()?;
    progress.set_length(plan.file_bytes);

    std::fs::create_dir_all(target).map_err(AgentError::io(target))?;
    for (path, _) in &plan.dirs {
        make_dir(target, path)?;
    }
    let mut filter = Includes::new(includes);
    let files = entries_of(&manifest).filter_map(|e| match e {
        Ok(e) if e.kind == EntryKind::File as i32 && filter.keeps(&e) => Some(
            validate_relative_path(path_bytes(&e))
                .map(|path| (path, e))
                .map_err(|e| AgentError::UnsafePath(e.to_string())),
        ),
        Ok(_) => None,
        Err(e) => Some(Err(e)),
    });
    let mut bytes = 0;
    let mut writes = futures::stream::iter(groups(files).map(|group| {
        let storage = storage.clone();
        let progress = progress.clone();
        let keys = keys.clone();
        async move {
            let group = group?;
            match group.as_slice() {
                [(path, entry)] if entry.size > GROUP_BYTES => {
                    restore_file(storage, keys, target, path, entry, &progress).await
                }
                _ => restore_small(storage, keys, target, group, &progress).await,
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
        files: plan.files,
        dirs: plan.dirs.len() as u64,
        symlinks: plan.symlinks.len() as u64,
        special: plan.specials.len() as u64 - skipped,
        bytes,
        skipped,
    })
}

/// What a restore creates besides regular files, every path already
/// checked, and the files counted; the files themselves are read from the
/// manifest again as they are restored.
pub struct Plan {
    dirs: Vec<(PathBuf, FileEntry)>,
    files: u64,
    file_bytes: u64,
    symlinks: Vec<(PathBuf, FileEntry)>,
    /// FIFOs, sockets and devices.
    specials: Vec<(PathBuf, FileEntry)>,
}

impl Plan {
    /// Checks the whole manifest; refuses it (naming the first problem and
    /// saying nothing was written) before anything touches the target.
    pub fn new(
        entries: impl Iterator<Item = Result<FileEntry, AgentError>>,
        target: &Path,
    ) -> Result<Plan, AgentError> {
        let refuse = |why: String| {
            AgentError::UnsafePath(format!("{why} (nothing was written to {})", target.display()))
        };
        let mut plan = Plan {
            dirs: Vec::new(),
            files: 0,
            file_bytes: 0,
            symlinks: Vec::new(),
            specials: Vec::new(),
        };
        // A 128-bit hash of each name rather than the name: a million paths
        // in 16 bytes each.
        let mut names = HashSet::new();
        // The directory each entry sits in, with one entry that does.
        let mut parents: HashMap<PathBuf, PathBuf> = HashMap::new();
        for entry in entries {
            let entry = entry?;
            let path = validate_relative_path(path_bytes(&entry)).map_err(|e| refuse(e.to_string()))?;
            let name: [u8; 16] = blake3::hash(path.as_os_str().as_bytes()).as_bytes()[..16]
                .try_into()
                .map_err(|_| refuse("a path hash is not 16 bytes".into()))?;
            if !names.insert(name) {
                return Err(refuse(format!("the snapshot names {} twice", path.display())));
            }
            check_entry(&entry).map_err(refuse)?;
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
                && !parents.contains_key(parent)
            {
                parents.insert(parent.to_path_buf(), path.clone());
            }
            match entry.kind() {
                EntryKind::Dir => plan.dirs.push((path, entry)),
                EntryKind::File => {
                    plan.files += 1;
                    plan.file_bytes += entry.size;
                }
                EntryKind::Symlink => plan.symlinks.push((path, entry)),
                EntryKind::Fifo | EntryKind::Socket | EntryKind::CharDevice | EntryKind::BlockDevice => {
                    plan.specials.push((path, entry))
                }
                EntryKind::Unspecified => return Err(refuse(format!("entry {:?} has no kind", entry.path))),
            }
        }
        plan.dirs.sort_by(|a, b| a.0.cmp(&b.0));
        plan.check_parents_are_dirs(&parents).map_err(refuse)?;
        Ok(plan)
    }

    /// Every entry's parent must be a directory of the snapshot itself, so
    /// no entry sits below a file or a symlink, and none can be reached
    /// through a symlink the snapshot creates.
    fn check_parents_are_dirs(&self, parents: &HashMap<PathBuf, PathBuf>) -> Result<(), String> {
        let dirs: HashSet<&Path> = self.dirs.iter().map(|(p, _)| p.as_path()).collect();
        let mut outside: Vec<(&PathBuf, &PathBuf)> = parents
            .iter()
            .filter(|(parent, _)| !dirs.contains(parent.as_path()))
            .collect();
        outside.sort();
        match outside.first() {
            Some((parent, path)) => Err(format!(
                "{} is inside {}, which is not a directory of the snapshot",
                path.display(),
                parent.display()
            )),
            None => Ok(()),
        }
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
    let dir = ParentDir::open(target, path)?;
    let out = dir.create(&full, entry.size)?;
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
    group: Vec<(PathBuf, FileEntry)>,
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
    let (target, progress) = (target.to_path_buf(), progress.clone());
    tokio::task::spawn_blocking(move || {
        let mut chunks = chunks.into_iter();
        let mut written = 0;
        // Consecutive files mostly share a directory: opened once for them.
        let mut dir: Option<ParentDir> = None;
        for (path, entry) in &group {
            let parent = path.parent().unwrap_or(Path::new(""));
            let dir = match dir.take() {
                Some(d) if d.parent == parent => dir.insert(d),
                _ => dir.insert(ParentDir::open(&target, path)?),
            };
            let data = chunks.by_ref().take(entry.chunks.len());
            written += write_small(&target, dir, path, entry, data)?;
        }
        progress.inc(written);
        Ok(written)
    })
    .await
    .map_err(|e| AgentError::Invalid(format!("write task failed: {e}")))?
}

fn write_small(
    target: &Path,
    dir: &ParentDir,
    path: &Path,
    entry: &FileEntry,
    chunks: impl Iterator<Item = Vec<u8>>,
) -> Result<u64, AgentError> {
    let full = target.join(path);
    let mut out = dir.create(&full, entry.size)?;
    let mut unfinished = Unfinished(Some(&full));
    let mut written = 0u64;
    for data in chunks {
        out.write_all(&data).map_err(AgentError::io(&full))?;
        written += data.len() as u64;
    }
    let file = out.finish().map_err(AgentError::io(&full))?;
    finish_file(&file, &full, entry, written)?;
    unfinished.0 = None;
    Ok(written)
}

/// The directory a file is restored into, opened component by component
/// from the target without following a symlink, so the file is created in
/// it even if a directory above is swapped for a symlink meanwhile.
struct ParentDir {
    /// Relative to the target.
    parent: PathBuf,
    fd: OwnedFd,
}

impl ParentDir {
    /// The directory `path` sits in.
    fn open(target: &Path, path: &Path) -> Result<ParentDir, AgentError> {
        let parent = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let mut fd =
            rustix::fs::open(target, flags, Mode::empty()).map_err(|e| AgentError::io(target)(e.into()))?;
        let mut at = target.to_path_buf();
        for part in parent.components() {
            at.push(part);
            fd = rustix::fs::openat(&fd, part.as_os_str(), flags | OFlags::NOFOLLOW, Mode::empty()).map_err(
                |e| match e {
                    Errno::LOOP | Errno::NOTDIR => AgentError::UnsafePath(format!(
                        "{} is not a directory (a symlink or file stands where a directory should be)",
                        at.display()
                    )),
                    e => AgentError::io(&at)(e.into()),
                },
            )?;
        }
        Ok(ParentDir { parent, fd })
    }

    /// Creates (or truncates) the file `full` names in this directory.
    fn create(&self, full: &Path, size: u64) -> Result<Appender, AgentError> {
        let name = full
            .file_name()
            .ok_or_else(|| AgentError::UnsafePath(format!("{} names no file", full.display())))?;
        let direct = size >= DIRECT_MIN;
        // A small file is written as its chunks arrive, unbuffered.
        let capacity = if direct {
            size.min(DIRECT_BLOCK) as usize
        } else {
            0
        };
        Appender::create_at(&self.fd, Path::new(name), direct, capacity).map_err(AgentError::io(full))
    }
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
    mut out: Appender,
    storage: StorageClient,
    keys: Arc<Keys>,
    entry: &FileEntry,
    full: &Path,
    progress: &ProgressBar,
) -> Result<(Appender, u64), AgentError> {
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

async fn write_blocking(mut out: Appender, data: Vec<u8>, path: &Path) -> Result<Appender, AgentError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        out.write_all(&data).map_err(AgentError::io(&path))?;
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
        let err = Plan::new(entries.into_iter().map(Ok), &into)
            .err()
            .expect("refused")
            .to_string();
        assert!(
            !into.exists(),
            "nothing may be written before the manifest is checked"
        );
        assert!(err.contains("nothing was written"), "{err}");
        err
    }

    #[test]
    fn a_file_is_created_in_its_directory_and_never_through_a_symlink() {
        let root = tempfile::tempdir().expect("tempdir");
        let (target, outside) = (root.path().join("target"), root.path().join("outside"));
        std::fs::create_dir_all(target.join("a/b")).expect("mkdir");
        std::fs::create_dir(&outside).expect("mkdir");
        let path = Path::new("a/b/f");
        let dir = ParentDir::open(&target, path).expect("a real directory opens");
        // Swapped for a symlink once opened: the file still lands in the
        // directory that was opened, not where the symlink points.
        std::fs::rename(target.join("a/b"), root.path().join("moved")).expect("rename");
        std::os::unix::fs::symlink(&outside, target.join("a/b")).expect("symlink");
        for size in [3, DIRECT_MIN] {
            let mut out = dir.create(&target.join(path), size).expect("create");
            out.write_all(b"abc").expect("write");
            out.finish().expect("finish");
            assert_eq!(std::fs::read(root.path().join("moved/f")).expect("read"), b"abc");
            assert!(!outside.join("f").exists());
        }
        // Opened afresh, the symlink is refused, as a file standing there is.
        let err = ParentDir::open(&target, path).err().expect("refused").to_string();
        assert!(err.contains("is not a directory"), "{err}");
        std::fs::remove_file(target.join("a/b")).expect("rm");
        std::fs::write(target.join("a/b"), b"").expect("file");
        let err = ParentDir::open(&target, path).err().expect("refused").to_string();
        assert!(err.contains("is not a directory"), "{err}");
        // A file at the top of the target has the target as its directory.
        let top = ParentDir::open(&target, Path::new("g")).expect("target");
        top.create(&target.join("g"), 0)
            .expect("create")
            .finish()
            .expect("finish");
        assert!(target.join("g").is_file());
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
        let n = files.len();
        let sizes: Vec<usize> = groups(files.into_iter().map(Ok))
            .map(|g| g.unwrap().len())
            .collect();
        // [10], [large], [10 + 511 small], [2 small], [near the limit], [2].
        assert_eq!(sizes, [1, 1, GROUP_FILES, 2, 1, 1]);
        assert_eq!(sizes.iter().sum::<usize>(), n);
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
                vec![entry("a", Dir), entry("a/f", File), entry("a/l", Symlink)]
                    .into_iter()
                    .map(Ok),
                target.path()
            )
            .is_ok()
        );
    }
}
