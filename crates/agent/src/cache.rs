//! The file cache: what the last backup of the same paths read, so a file
//! that has not changed since reuses its chunk list without being opened
//! (restic and borg do the same).
//!
//! A file counts as unchanged when its device, inode, size, mtime and
//! ctime all match, and both times are more than a second older than the
//! scan that wrote the cache: a file changed in the same second as that
//! scan may not show it in its times, so it is read again (git's "racy"
//! rule). The cache is only ever a shortcut: every reused chunk is still
//! asked for with `MissingChunks` (a file with one gone is read again,
//! `backup::reusable`),
//! and a cache that is missing, unreadable or from another key is
//! ignored.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use prost::Message;

use crate::AgentError;
use crate::crypto::Keys;

/// What the scan saw of a file, to compare with the next scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl Stat {
    pub fn of(meta: &std::fs::Metadata) -> Stat {
        use std::os::unix::fs::MetadataExt;
        Stat {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
        }
    }
}

const FORMAT: u32 = 1;
/// How long before the scan a change may not show in a file's times.
const RACY_NS: i64 = 1_000_000_000;

#[derive(Clone, PartialEq, Message)]
struct CacheFile {
    #[prost(uint32, tag = "1")]
    format: u32,
    /// When the scan that wrote it started (unix ns).
    #[prost(int64, tag = "2")]
    scan_start_ns: i64,
    #[prost(message, repeated, tag = "3")]
    files: Vec<CachedFile>,
}

#[derive(Clone, PartialEq, Message)]
struct CachedFile {
    #[prost(bytes = "vec", tag = "1")]
    path: Vec<u8>,
    #[prost(uint64, tag = "2")]
    dev: u64,
    #[prost(uint64, tag = "3")]
    ino: u64,
    #[prost(uint64, tag = "4")]
    size: u64,
    #[prost(int64, tag = "5")]
    mtime_ns: i64,
    #[prost(int64, tag = "6")]
    ctime_ns: i64,
    #[prost(bytes = "vec", repeated, tag = "7")]
    chunks: Vec<Vec<u8>>,
}

/// The cache of one account's key and one set of paths.
pub struct FileCache {
    path: PathBuf,
    scan_start_ns: i64,
    files: HashMap<Vec<u8>, CachedFile>,
}

/// Where caches live: `DUPLEX_CACHE_DIR`, else `$XDG_CACHE_HOME/duplex`,
/// else `~/.cache/duplex`.
fn cache_dir() -> Option<PathBuf> {
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("DUPLEX_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("duplex")))
        .or_else(|| var("HOME").map(|d| d.join(".cache/duplex")))
}

impl FileCache {
    /// The cache for `roots` under `keys`, empty when there is none or it
    /// cannot be read (the reason, for a warning, beside it). Named by a
    /// keyed hash, so another account's cache is never picked up and the
    /// name says nothing about the paths.
    pub fn open(keys: &Keys, roots: &[PathBuf]) -> (FileCache, Option<String>) {
        let mut named = b"duplex file cache v1".to_vec();
        for root in roots {
            let absolute = std::path::absolute(root).unwrap_or_else(|_| root.clone());
            named.extend_from_slice(absolute.as_os_str().as_bytes());
            named.push(0);
        }
        let name = format!("{}.cache", &keys.chunk_id(&named).to_string()[..32]);
        let path = cache_dir().map_or_else(|| PathBuf::from(&name), |d| d.join(&name));
        let mut cache = FileCache {
            path,
            scan_start_ns: 0,
            files: HashMap::new(),
        };
        let problem = match cache.read() {
            Ok(()) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => Some(format!(
                "file cache {} unusable ({e}): every file is read",
                cache.path.display()
            )),
        };
        (cache, problem)
    }

    fn read(&mut self) -> std::io::Result<()> {
        let compressed = std::fs::read(&self.path)?;
        let bytes = zstd::decode_all(compressed.as_slice())?;
        let file = CacheFile::decode(bytes.as_slice()).map_err(std::io::Error::other)?;
        if file.format != FORMAT {
            return Err(std::io::Error::other(format!("format {}", file.format)));
        }
        self.scan_start_ns = file.scan_start_ns;
        self.files = file.files.into_iter().map(|f| (f.path.clone(), f)).collect();
        Ok(())
    }

    /// The chunk list the last backup read for `source`, if the file has
    /// not changed since.
    pub fn unchanged(&self, source: &Path, stat: &Stat) -> Option<&[Vec<u8>]> {
        let cached = self.files.get(source.as_os_str().as_bytes())?;
        let settled = self.scan_start_ns - RACY_NS;
        let same = cached.dev == stat.dev
            && cached.ino == stat.ino
            && cached.size == stat.size
            && cached.mtime_ns == stat.mtime_ns
            && cached.ctime_ns == stat.ctime_ns
            && stat.mtime_ns < settled
            && stat.ctime_ns < settled;
        same.then_some(cached.chunks.as_slice())
    }

    /// Replaces the cache with what this backup read; written whole to a
    /// temporary file and renamed over the old one.
    pub fn save<'a>(
        &self,
        scan_start_ns: i64,
        files: impl Iterator<Item = (&'a Path, Stat, &'a [Vec<u8>])>,
    ) -> Result<(), AgentError> {
        let file = CacheFile {
            format: FORMAT,
            scan_start_ns,
            files: files
                .map(|(path, s, chunks)| CachedFile {
                    path: path.as_os_str().as_bytes().to_vec(),
                    dev: s.dev,
                    ino: s.ino,
                    size: s.size,
                    mtime_ns: s.mtime_ns,
                    ctime_ns: s.ctime_ns,
                    chunks: chunks.to_vec(),
                })
                .collect(),
        };
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(AgentError::io(dir))?;
        }
        let compressed =
            zstd::encode_all(file.encode_to_vec().as_slice(), 3).map_err(AgentError::io(&self.path))?;
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, compressed).map_err(AgentError::io(&tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(AgentError::io(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(mtime_ns: i64) -> Stat {
        Stat {
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns,
            ctime_ns: mtime_ns,
        }
    }

    #[test]
    fn a_file_matches_only_if_nothing_changed_and_it_settled_before_the_scan() {
        let dir = tempfile::tempdir().unwrap();
        let cache_path = dir.path().join("cache");
        let mut cache = FileCache {
            path: cache_path.clone(),
            scan_start_ns: 0,
            files: HashMap::new(),
        };
        let chunks = vec![vec![9u8; 32]];
        let (old, racy) = (Path::new("/x/old"), Path::new("/x/racy"));
        let start = 100 * RACY_NS;
        cache
            .save(
                start,
                [
                    (old, stat(start - 5 * RACY_NS), chunks.as_slice()),
                    (racy, stat(start - 1), chunks.as_slice()),
                ]
                .into_iter(),
            )
            .unwrap();
        cache.read().unwrap();
        assert_eq!(
            cache.unchanged(old, &stat(start - 5 * RACY_NS)),
            Some(chunks.as_slice())
        );
        // Written in the second before the scan: read again.
        assert_eq!(cache.unchanged(racy, &stat(start - 1)), None);
        // Any field changed (here the ctime alone: a write that kept the
        // size and put the mtime back).
        let mut touched = stat(start - 5 * RACY_NS);
        touched.ctime_ns += 1;
        assert_eq!(cache.unchanged(old, &touched), None);
        assert_eq!(cache.unchanged(Path::new("/x/new"), &touched), None);

        // A damaged cache is no cache.
        std::fs::write(&cache_path, b"not a cache").unwrap();
        assert!(cache.read().is_err());
    }
}
