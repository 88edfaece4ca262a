//! Looking into snapshots without restoring them whole: `ls`, `dump`,
//! `diff`, and the subtrees `restore --include` keeps. Paths are the
//! manifest's: relative, `/`-separated, starting with the name of the
//! directory that was backed up.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use duplex_proto::v1::{EntryKind, FileEntry, SnapshotInfo};
use futures::TryStreamExt;
use prost::Message;
use serde::Serialize;

use crate::AgentError;
use crate::crypto::Keys;
use crate::manifest::{entries_of, fetch_chunks, fetch_manifest_bytes, path_bytes};
use crate::session::Session;

/// A path as the user typed it (bytes, as Unix names are), in the
/// manifest's form.
fn normalized(path: &OsStr) -> &[u8] {
    let mut bytes = path.as_bytes();
    while let Some(rest) = bytes.strip_prefix(b"/") {
        bytes = rest;
    }
    while let Some(rest) = bytes.strip_suffix(b"/") {
        bytes = rest;
    }
    bytes
}

/// `path` as the manifest names it. Manifest paths start with the name of
/// each directory backed up (`docs/x` in a backup of `/home/ann/docs`), so
/// an absolute path inside one of `roots`, the directories the snapshot
/// backed up, is taken as the file the user knows by it. Any other path
/// is the manifest's own form, with leading and trailing slashes dropped.
pub fn as_named(path: &OsStr, roots: &[String]) -> OsString {
    let path = Path::new(path);
    if !path.has_root() {
        return path.as_os_str().to_owned();
    }
    // The longest root that holds it: roots may nest.
    let found = roots
        .iter()
        .map(Path::new)
        .filter_map(|root| Some((root, root.file_name()?, path.strip_prefix(root).ok()?)))
        .max_by_key(|(root, _, _)| root.as_os_str().len());
    match found {
        Some((_, name, rest)) if rest.as_os_str().is_empty() => name.to_owned(),
        Some((_, name, rest)) => Path::new(name).join(rest).into_os_string(),
        None => path.as_os_str().to_owned(),
    }
}

/// The directories `info` backed up, from its sealed summary (none for a
/// snapshot without one).
pub fn roots(keys: &Keys, info: &SnapshotInfo) -> Result<Vec<String>, AgentError> {
    if info.summary.is_empty() {
        return Ok(Vec::new());
    }
    Ok(keys.open_summary(&info.id, &info.summary)?.paths)
}

fn shown(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

/// `entry` is `path` or below it.
fn within(entry: &FileEntry, path: &[u8]) -> bool {
    let entry = path_bytes(entry);
    path.is_empty()
        || entry == path
        || entry
            .strip_prefix(path)
            .is_some_and(|rest| rest.starts_with(b"/"))
}

/// A snapshot's manifest, fetched and opened but left encoded: `ls` and
/// `dump` decode it one entry at a time and keep only what they show.
pub async fn manifest(
    session: &Session,
    keys: &Arc<Keys>,
    info: &SnapshotInfo,
) -> Result<Vec<u8>, AgentError> {
    fetch_manifest_bytes(&session.storage, keys, &info.manifest_chunks).await
}

/// The entries at or below `path` (all of them for none); an error naming
/// the path when nothing is there.
pub fn under(
    entries: impl Iterator<Item = Result<FileEntry, AgentError>>,
    path: Option<&OsStr>,
) -> Result<Vec<FileEntry>, AgentError> {
    let path = path.map(normalized);
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        if path.is_none_or(|p| within(&entry, p)) {
            found.push(entry);
        }
    }
    let Some(path) = path else {
        return Ok(found);
    };
    if found.is_empty() {
        return Err(AgentError::Invalid(format!(
            "no {:?} in the snapshot",
            shown(path)
        )));
    }
    Ok(found)
}

/// What `restore --include` writes: the subtrees named, and the
/// directories above them (so they are created with their modes and
/// times). A path that names nothing is an error, not an empty restore.
pub fn included(entries: Vec<FileEntry>, includes: &[OsString]) -> Result<Vec<FileEntry>, AgentError> {
    let mut filter = Includes::new(includes);
    let kept = entries.into_iter().filter(|e| filter.keeps(e)).collect();
    filter.check_all_named()?;
    Ok(kept)
}

/// The `--include` filter applied one entry at a time, so a restore can
/// read its manifest as a stream.
pub struct Includes {
    paths: Vec<Vec<u8>>,
    named: Vec<bool>,
}

impl Includes {
    /// No paths keep everything.
    pub fn new(includes: &[OsString]) -> Includes {
        let paths: Vec<Vec<u8>> = includes.iter().map(|p| normalized(p).to_vec()).collect();
        let named = vec![false; paths.len()];
        Includes { paths, named }
    }

    /// Whether `entry` is written: within a path named, or a directory
    /// above one.
    pub fn keeps(&mut self, entry: &FileEntry) -> bool {
        if self.paths.is_empty() {
            return true;
        }
        let mut keep = false;
        for (p, named) in self.paths.iter().zip(&mut self.named) {
            if !p.is_empty() && within(entry, p) {
                *named = true;
                keep = true;
            }
        }
        keep || (entry.kind == EntryKind::Dir as i32
            && self.paths.iter().any(|p| {
                p.strip_prefix(path_bytes(entry))
                    .is_some_and(|rest| rest.starts_with(b"/"))
            }))
    }

    /// After every entry went through [`Includes::keeps`]: an error for a
    /// path that named nothing.
    pub fn check_all_named(&self) -> Result<(), AgentError> {
        match self.paths.iter().zip(&self.named).find(|(_, named)| !**named) {
            Some((missing, _)) => Err(AgentError::Invalid(format!(
                "--include {:?} names nothing in the snapshot",
                shown(missing)
            ))),
            None => Ok(()),
        }
    }
}

/// Writes the file at `path` to `out`, each chunk checked before a byte
/// of it is written.
pub async fn dump(
    session: &Session,
    keys: &Arc<Keys>,
    manifest: &[u8],
    path: &OsStr,
    out: &mut dyn Write,
) -> Result<u64, AgentError> {
    let wanted = normalized(path);
    let path = shown(wanted);
    let mut entries = entries_of(manifest);
    let entry = loop {
        match entries.next().transpose()? {
            Some(e) if path_bytes(&e) == wanted => break e,
            Some(_) => {}
            None => return Err(AgentError::Invalid(format!("no {path:?} in the snapshot"))),
        }
    };
    if entry.kind != EntryKind::File as i32 {
        return Err(AgentError::Invalid(format!("{path:?} is not a file")));
    }
    let chunks = fetch_chunks(session.storage.clone(), keys.clone(), entry.chunks.clone()).await?;
    let mut chunks = std::pin::pin!(chunks);
    let mut written = 0u64;
    while let Some(plain) = chunks.try_next().await? {
        out.write_all(&plain)
            .map_err(|e| AgentError::Invalid(format!("writing {path}: {e}")))?;
        written += plain.len() as u64;
    }
    out.flush()
        .map_err(|e| AgentError::Invalid(format!("writing {path}: {e}")))?;
    if written != entry.size {
        return Err(AgentError::Integrity(format!(
            "{path}: {written} bytes read back, the manifest says {}",
            entry.size
        )));
    }
    Ok(written)
}

/// Paths only in the second snapshot, only in the first, and in both but
/// changed (kind, content, size, mode, time or link target).
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub modified: Vec<String>,
}

/// The first 16 bytes of a BLAKE3 hash: of a path, or of a whole entry
/// encoded (prost encodes equal entries to equal bytes).
type Digest = [u8; 16];

fn digest(bytes: &[u8]) -> Digest {
    let mut out = [0u8; 16];
    out.copy_from_slice(&blake3::hash(bytes).as_bytes()[..16]);
    out
}

/// Entries are matched by their exact names; the lists show names in
/// their display form, sorted. Only one manifest is held at a time, kept
/// encoded, and of the first only two digests per entry (the path's and
/// the whole entry's): at a million files a diff holds one manifest and
/// tens of MiB, not both manifests decoded. The first is fetched again
/// only to name what was removed, if anything was.
pub async fn diff(
    session: &Session,
    keys: &Arc<Keys>,
    a: &SnapshotInfo,
    b: &SnapshotInfo,
) -> Result<Diff, AgentError> {
    let mut before = Digests::of(&manifest(session, keys, a).await?)?;
    let mut out = before.compare(&manifest(session, keys, b).await?)?;
    if !before.is_empty() {
        out.removed = before.named(&manifest(session, keys, a).await?)?;
    }
    Ok(out)
}

/// A snapshot's entries as (path digest, entry digest) pairs.
struct Digests(HashMap<Digest, Digest>);

impl Digests {
    fn of(manifest: &[u8]) -> Result<Digests, AgentError> {
        let mut map = HashMap::new();
        for entry in entries_of(manifest) {
            let entry = entry?;
            map.insert(digest(path_bytes(&entry)), digest(&entry.encode_to_vec()));
        }
        Ok(Digests(map))
    }

    /// The paths of `manifest` added and modified; those it shares are
    /// taken out, leaving what it lacks.
    fn compare(&mut self, manifest: &[u8]) -> Result<Diff, AgentError> {
        let mut out = Diff::default();
        for entry in entries_of(manifest) {
            let entry = entry?;
            match self.0.remove(&digest(path_bytes(&entry))) {
                None => out.added.push(entry.path),
                Some(old) if old != digest(&entry.encode_to_vec()) => out.modified.push(entry.path),
                Some(_) => {}
            }
        }
        out.added.sort();
        out.modified.sort();
        Ok(out)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The names, sorted, of the entries left, read from the manifest
    /// they came from.
    fn named(mut self, manifest: &[u8]) -> Result<Vec<String>, AgentError> {
        let mut names = Vec::new();
        for entry in entries_of(manifest) {
            let entry = entry?;
            if self.0.remove(&digest(path_bytes(&entry))).is_some() {
                names.push(entry.path);
            }
        }
        names.sort();
        Ok(names)
    }
}

pub fn kind_name(kind: i32) -> &'static str {
    match EntryKind::try_from(kind) {
        Ok(EntryKind::File) => "file",
        Ok(EntryKind::Dir) => "dir",
        Ok(EntryKind::Symlink) => "symlink",
        Ok(EntryKind::Fifo) => "fifo",
        Ok(EntryKind::Socket) => "socket",
        Ok(EntryKind::CharDevice) => "chardev",
        Ok(EntryKind::BlockDevice) => "blockdev",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use duplex_proto::v1::Manifest;

    #[test]
    fn an_absolute_path_inside_a_backed_up_directory_is_taken_as_its_file() {
        let roots = [
            "/home/ann/docs".to_owned(),
            "/home/ann".to_owned(),
            "/".to_owned(),
        ];
        let named = |p: &str| as_named(OsStr::new(p), &roots);
        assert_eq!(named("/home/ann/docs/x/y"), "docs/x/y");
        assert_eq!(named("/home/ann/docs"), "docs");
        assert_eq!(named("/home/ann/mail/z"), "ann/mail/z");
        // Component by component: a sibling that shares a prefix is not inside.
        assert_eq!(named("/home/ann/docs2/z"), "ann/docs2/z");
        // The manifest's own form, relative or with a leading slash, stays.
        assert_eq!(named("docs/x"), "docs/x");
        assert_eq!(named("/docs/x"), "/docs/x");
        assert_eq!(as_named(OsStr::new("/docs/x"), &[]), "/docs/x");
    }

    fn entry(path: &str, kind: EntryKind, size: u64) -> FileEntry {
        FileEntry {
            path: path.into(),
            kind: kind as i32,
            size,
            ..Default::default()
        }
    }

    fn paths(entries: &[FileEntry]) -> Vec<&str> {
        entries.iter().map(|e| e.path.as_str()).collect()
    }

    fn tree() -> Vec<FileEntry> {
        vec![
            entry("home", EntryKind::Dir, 0),
            entry("home/docs", EntryKind::Dir, 0),
            entry("home/docs/a", EntryKind::File, 1),
            entry("home/docs2", EntryKind::Dir, 0),
            entry("home/docs2/b", EntryKind::File, 2),
            entry("home/top", EntryKind::File, 3),
        ]
    }

    #[test]
    fn a_subtree_is_the_path_and_what_is_below_it_not_its_namesakes() {
        let found = under(tree().into_iter().map(Ok), Some(OsStr::new("/home/docs/"))).unwrap();
        assert_eq!(paths(&found), ["home/docs", "home/docs/a"]);
        assert!(under(tree().into_iter().map(Ok), Some(OsStr::new("home/doc"))).is_err());
    }

    #[test]
    fn an_include_keeps_its_subtree_and_the_directories_above_it() {
        let kept = included(tree(), &["home/docs2/b".into(), "home/top".into()]).unwrap();
        assert_eq!(paths(&kept), ["home", "home/docs2", "home/docs2/b", "home/top"]);
        let err = included(tree(), &["home/nope".into()]).unwrap_err();
        assert!(err.to_string().contains("home/nope"), "{err}");
    }

    #[test]
    fn diff_names_added_removed_and_modified_paths() {
        let mut b = tree();
        b.retain(|e| e.path != "home/top");
        b[2].size = 9;
        b.push(entry("home/new", EntryKind::File, 1));
        let encoded = |entries| Manifest { entries }.encode_to_vec();
        let diff = |a: Vec<FileEntry>, b| {
            let a = encoded(a);
            let mut before = Digests::of(&a).unwrap();
            let mut out = before.compare(&encoded(b)).unwrap();
            out.removed = before.named(&a).unwrap();
            out
        };
        let d = diff(tree(), b);
        assert_eq!(d.added, ["home/new"]);
        assert_eq!(d.removed, ["home/top"]);
        assert_eq!(d.modified, ["home/docs/a"]);
        let same = diff(tree(), tree());
        assert_eq!(same, Diff::default(), "equal snapshots differ in nothing");
    }
}
