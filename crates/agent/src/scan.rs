//! Walking the paths to back up into manifest entries (without chunks yet).

use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use duplex_proto::v1::{EntryKind, FileEntry};

use crate::AgentError;

/// One thing to back up: where it is on disk and its manifest entry.
pub struct Item {
    pub source: PathBuf,
    pub entry: FileEntry,
}

/// Each root is stored under its own name: backing up `/home/u/docs`
/// yields `docs/...`, which `restore --target T` recreates as `T/docs/...`.
pub fn scan(roots: &[PathBuf], warn: &dyn Fn(String)) -> Result<Vec<Item>, AgentError> {
    let mut names = HashSet::new();
    let mut items = Vec::new();
    for root in roots {
        let name = top_name(root)?;
        if !names.insert(name.clone()) {
            return Err(AgentError::Invalid(format!(
                "two paths to back up share the name {name:?}; back them up separately"
            )));
        }
        for entry in walkdir::WalkDir::new(root)
            .follow_links(false)
            .sort_by_file_name()
        {
            let entry = match entry {
                Ok(e) => e,
                Err(e) if e.depth() == 0 => {
                    return Err(AgentError::Invalid(format!(
                        "cannot read {}: {e}",
                        root.display()
                    )));
                }
                Err(e) => {
                    warn(format!("skipped: {e}"));
                    continue;
                }
            };
            let rel = entry.path().strip_prefix(root).unwrap_or(Path::new(""));
            let Some(rel) = rel.to_str() else {
                warn(format!("skipped {}: name is not UTF-8", entry.path().display()));
                continue;
            };
            let path = if rel.is_empty() {
                name.clone()
            } else {
                format!("{name}/{rel}")
            };
            match describe(entry.path(), path) {
                Ok(Some(entry)) => items.push(Item {
                    source: entry_source(root, rel),
                    entry,
                }),
                Ok(None) => warn(format!(
                    "skipped {}: not a file, directory or symlink",
                    entry.path().display()
                )),
                Err(e) => warn(format!("skipped: {e}")),
            }
        }
    }
    Ok(items)
}

fn entry_source(root: &Path, rel: &str) -> PathBuf {
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    }
}

fn top_name(root: &Path) -> Result<String, AgentError> {
    let absolute = std::fs::canonicalize(root).map_err(AgentError::io(root))?;
    let name = absolute
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "root".to_owned());
    Ok(name)
}

fn describe(source: &Path, path: String) -> Result<Option<FileEntry>, AgentError> {
    let meta = std::fs::symlink_metadata(source).map_err(AgentError::io(source))?;
    let ft = meta.file_type();
    let (kind, symlink_target) = if ft.is_file() {
        (EntryKind::File, String::new())
    } else if ft.is_dir() {
        (EntryKind::Dir, String::new())
    } else if ft.is_symlink() {
        let target = std::fs::read_link(source).map_err(AgentError::io(source))?;
        let Some(target) = target.to_str() else {
            return Err(AgentError::Invalid(format!(
                "{}: link target is not UTF-8",
                source.display()
            )));
        };
        (EntryKind::Symlink, target.to_owned())
    } else {
        return Ok(None);
    };
    Ok(Some(FileEntry {
        path,
        kind: kind as i32,
        mode: meta.permissions().mode() & 0o7777,
        size: if kind == EntryKind::File { meta.len() } else { 0 },
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        chunks: Vec::new(),
        symlink_target,
    }))
}
