//! Walking the paths to back up into manifest entries (without chunks yet).

use std::collections::HashSet;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use duplex_proto::v1::{EntryKind, FileEntry};
use ignore::gitignore::{Gitignore, GitignoreBuilder};

use crate::AgentError;
use crate::cache::Stat;
use crate::manifest::name_fields;

/// What a backup leaves out.
pub struct Selection {
    /// `--exclude` and `--exclude-file` patterns, in gitignore syntax
    /// rooted at `/`: `*.tmp` matches at any depth, `/home/u/tmp` only
    /// there, `build/` only directories, `!keep.tmp` takes one back.
    excludes: Gitignore,
    /// Stay on the file system each path to back up is on.
    pub one_file_system: bool,
    /// Leave out the contents of directories holding a valid
    /// `CACHEDIR.TAG` (the tag itself is kept, as tar and restic do).
    pub exclude_caches: bool,
}

/// The first bytes of a valid `CACHEDIR.TAG` (bford.info/cachedir).
const CACHEDIR_SIGNATURE: &[u8] = b"Signature: 8a477f597d28d172789f06886806bc55";

impl Selection {
    /// Everything: no pattern, no file system boundary.
    pub fn all() -> Selection {
        Selection {
            excludes: Gitignore::empty(),
            one_file_system: false,
            exclude_caches: false,
        }
    }

    /// Patterns from `--exclude` and from each `--exclude-file` (one per
    /// line; blank lines and `#` comments ignored).
    pub fn excluding(patterns: &[String], files: &[PathBuf]) -> Result<Selection, AgentError> {
        let mut builder = GitignoreBuilder::new("/");
        for pattern in patterns {
            builder
                .add_line(None, pattern)
                .map_err(|e| AgentError::Invalid(format!("--exclude {pattern:?}: {e}")))?;
        }
        for file in files {
            // A file that cannot be read is an error, not an empty list:
            // backing up what the user meant to leave out is worse.
            std::fs::metadata(file).map_err(AgentError::io(file))?;
            if let Some(e) = builder.add(file) {
                return Err(AgentError::Invalid(format!(
                    "--exclude-file {}: {e}",
                    file.display()
                )));
            }
        }
        let excludes = builder
            .build()
            .map_err(|e| AgentError::Invalid(format!("exclude patterns: {e}")))?;
        Ok(Selection {
            excludes,
            ..Selection::all()
        })
    }

    fn excluded(&self, path: &Path, is_dir: bool) -> bool {
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        self.excludes.matched(&absolute, is_dir).is_ignore()
    }
}

/// Whether `dir` holds a `CACHEDIR.TAG` that starts with the signature.
fn is_cache_dir(dir: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; CACHEDIR_SIGNATURE.len()];
    std::fs::File::open(dir.join("CACHEDIR.TAG"))
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|()| head == CACHEDIR_SIGNATURE)
}

/// One thing to back up: where it is on disk and its manifest entry.
pub struct Item {
    /// Which of the paths given it is under, by their order.
    pub root: u32,
    pub source: PathBuf,
    pub entry: FileEntry,
    /// What the scan saw on disk, to know an unchanged file next time.
    pub stat: Stat,
}

/// Each root is stored under its own name: backing up `/home/u/docs`
/// yields `docs/...`, which `restore --target T` recreates as `T/docs/...`.
/// Items are handed to `each` as the walk finds them, in walk order (the
/// roots in turn, each depth first, siblings by name), never all held.
pub fn scan(
    roots: &[PathBuf],
    selection: &Selection,
    warn: &dyn Fn(String),
    each: &mut dyn FnMut(Item) -> Result<(), AgentError>,
) -> Result<(), AgentError> {
    let mut names = HashSet::new();
    let mut named = Vec::new();
    for root in roots {
        let name = top_name(root)?;
        if !names.insert(name.clone()) {
            return Err(AgentError::Invalid(format!(
                "two paths to back up share the name {:?}; back them up separately",
                String::from_utf8_lossy(&name)
            )));
        }
        named.push((root, name));
    }
    for (index, (root, name)) in named.into_iter().enumerate() {
        let index =
            u32::try_from(index).map_err(|_| AgentError::Invalid("too many paths to back up".into()))?;
        let mut caches: HashSet<PathBuf> = HashSet::new();
        let walk = walkdir::WalkDir::new(root)
            .follow_links(false)
            .same_file_system(selection.one_file_system)
            .sort_by_file_name()
            .into_iter()
            .filter_entry(|e| {
                // The paths given are backed up whatever the patterns say.
                let given = e.depth() == 0;
                let is_dir = e.file_type().is_dir();
                if !given && selection.excluded(e.path(), is_dir) {
                    return false;
                }
                if !selection.exclude_caches {
                    return true;
                }
                let in_cache = !given
                    && e.path().parent().is_some_and(|p| caches.contains(p))
                    && e.file_name() != "CACHEDIR.TAG";
                if is_dir && !in_cache && is_cache_dir(e.path()) {
                    caches.insert(e.path().to_path_buf());
                }
                !in_cache
            });
        for entry in walk {
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
            let mut path = name.clone();
            if !rel.as_os_str().is_empty() {
                path.push(b'/');
                path.extend_from_slice(rel.as_os_str().as_bytes());
            }
            match describe(entry.path(), path) {
                Ok((manifest_entry, stat)) => each(Item {
                    root: index,
                    source: entry.into_path(),
                    entry: manifest_entry,
                    stat,
                })?,
                Err(e) => warn(format!("skipped: {e}")),
            }
        }
    }
    Ok(())
}

fn top_name(root: &Path) -> Result<Vec<u8>, AgentError> {
    let absolute = std::fs::canonicalize(root).map_err(AgentError::io(root))?;
    let name = absolute
        .file_name()
        .map_or_else(|| b"root".to_vec(), |n| n.as_bytes().to_vec());
    Ok(name)
}

fn describe(source: &Path, path: Vec<u8>) -> Result<(FileEntry, Stat), AgentError> {
    let meta = std::fs::symlink_metadata(source).map_err(AgentError::io(source))?;
    let ft = meta.file_type();
    let kind = if ft.is_file() {
        EntryKind::File
    } else if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_fifo() {
        EntryKind::Fifo
    } else if ft.is_socket() {
        EntryKind::Socket
    } else if ft.is_char_device() {
        EntryKind::CharDevice
    } else if ft.is_block_device() {
        EntryKind::BlockDevice
    } else {
        return Err(AgentError::Invalid(format!(
            "{}: a kind of file this system does not name",
            source.display()
        )));
    };
    let (symlink_target, symlink_target_bytes) = if kind == EntryKind::Symlink {
        let target = std::fs::read_link(source).map_err(AgentError::io(source))?;
        name_fields(target.into_os_string().into_vec())
    } else {
        Default::default()
    };
    let (path, path_bytes) = name_fields(path);
    let stat = Stat::of(&meta);
    let device = matches!(kind, EntryKind::CharDevice | EntryKind::BlockDevice);
    let entry = FileEntry {
        path,
        path_bytes,
        kind: kind as i32,
        mode: meta.permissions().mode() & 0o7777,
        size: if kind == EntryKind::File { meta.len() } else { 0 },
        mtime_ns: stat.mtime_ns,
        chunks: Vec::new(),
        symlink_target,
        symlink_target_bytes,
        rdev: if device { meta.rdev() } else { 0 },
    };
    Ok((entry, stat))
}
