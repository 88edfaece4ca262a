//! The file cache: what the last backup of the same paths read, so a file
//! that has not changed since reuses its chunk list without being opened
//! (restic and borg do the same).
//!
//! A file counts as unchanged when its device, inode, size, mtime and
//! ctime all match, and both times are more than a second older than the
//! scan that wrote the cache: a file changed in the same second as that
//! scan may not show it in its times, so it is read again (git's "racy"
//! rule). The cache is only ever a shortcut: every reused chunk is still
//! asked for with `MissingChunks` (a file with one gone is read again),
//! and a cache that is missing, unreadable or from another key is
//! ignored.
//!
//! It is a zstd stream of records in walk order, read alongside the walk
//! and written as the walk's results come in: its size in memory does not
//! grow with the number of files.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
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

const FORMAT: u32 = 2;
/// How long before the scan a change may not show in a file's times.
const RACY_NS: i64 = 1_000_000_000;

/// The first record of a cache file.
#[derive(Clone, PartialEq, Message)]
struct CacheHeader {
    #[prost(uint32, tag = "1")]
    format: u32,
    /// When the scan that wrote it started (unix ns).
    #[prost(int64, tag = "2")]
    scan_start_ns: i64,
}

/// One file, in walk order after the header.
#[derive(Clone, PartialEq, Message)]
struct CachedFile {
    /// Which of the paths backed up it is under (their order on the
    /// command line), and its path in the manifest.
    #[prost(uint32, tag = "8")]
    root: u32,
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

/// Where a file comes in the walk: the walk visits the paths given in
/// order, each depth first with a directory before what is in it and
/// siblings sorted by name, which is comparing paths name by name.
fn walk_order(a: (u32, &[u8]), b: (u32, &[u8])) -> std::cmp::Ordering {
    a.0.cmp(&b.0)
        .then_with(|| a.1.split(|c| *c == b'/').cmp(b.1.split(|c| *c == b'/')))
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

/// The cache file for `roots` under `keys`. Named by a keyed hash, so
/// another account's cache is never picked up and the name says nothing
/// about the paths.
pub fn location(keys: &Keys, roots: &[PathBuf]) -> PathBuf {
    let mut named = b"duplex file cache v2".to_vec();
    for root in roots {
        let absolute = std::path::absolute(root).unwrap_or_else(|_| root.clone());
        named.extend_from_slice(absolute.as_os_str().as_bytes());
        named.push(0);
    }
    let name = format!("{}.cache", &keys.chunk_id(&named).to_string()[..32]);
    cache_dir().map_or_else(|| PathBuf::from(&name), |d| d.join(&name))
}

type Records = BufReader<zstd::stream::read::Decoder<'static, BufReader<File>>>;

/// The last backup's cache, read as the walk goes: memory does not grow
/// with the number of files.
pub struct CacheReader {
    records: Option<Records>,
    scan_start_ns: i64,
    next: Option<CachedFile>,
}

impl CacheReader {
    /// The cache at `path`; empty when there is none or it cannot be
    /// read (the reason, for a warning, beside it).
    pub fn open(path: &Path) -> (CacheReader, Option<String>) {
        let empty = CacheReader {
            records: None,
            scan_start_ns: 0,
            next: None,
        };
        match Self::try_open(path) {
            Ok(reader) => (reader, None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (empty, None),
            Err(e) => (
                empty,
                Some(format!(
                    "file cache {} unusable ({e}): every file is read",
                    path.display()
                )),
            ),
        }
    }

    fn try_open(path: &Path) -> std::io::Result<CacheReader> {
        let mut records = BufReader::new(zstd::stream::read::Decoder::new(File::open(path)?)?);
        let header: CacheHeader =
            read_record(&mut records)?.ok_or_else(|| std::io::Error::other("no header"))?;
        if header.format != FORMAT {
            return Err(std::io::Error::other(format!("format {}", header.format)));
        }
        let mut reader = CacheReader {
            records: Some(records),
            scan_start_ns: header.scan_start_ns,
            next: None,
        };
        reader.advance()?;
        Ok(reader)
    }

    fn advance(&mut self) -> std::io::Result<()> {
        self.next = match &mut self.records {
            Some(records) => read_record(records)?,
            None => None,
        };
        Ok(())
    }

    /// The chunk list the last backup read for the file at `path` under
    /// root `root`, if it has not changed since. Asked in walk order. A
    /// cache that turns out damaged part way is dropped: the files after
    /// the damage are read.
    pub fn unchanged(&mut self, root: u32, path: &[u8], stat: &Stat) -> Option<Vec<Vec<u8>>> {
        loop {
            let next = self.next.as_ref()?;
            match walk_order((next.root, &next.path), (root, path)) {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => break,
                std::cmp::Ordering::Greater => return None,
            }
            if self.advance().is_err() {
                self.records = None;
                self.next = None;
            }
        }
        let cached = self.next.take()?;
        if self.advance().is_err() {
            self.records = None;
        }
        let settled = self.scan_start_ns - RACY_NS;
        let same = cached.dev == stat.dev
            && cached.ino == stat.ino
            && cached.size == stat.size
            && cached.mtime_ns == stat.mtime_ns
            && cached.ctime_ns == stat.ctime_ns
            && stat.mtime_ns < settled
            && stat.ctime_ns < settled;
        same.then_some(cached.chunks)
    }
}

/// Reads one length-delimited record; `None` at a clean end.
fn read_record<M: Message + Default>(from: &mut impl Read) -> std::io::Result<Option<M>> {
    let mut len: u64 = 0;
    for i in 0..10 {
        let mut byte = [0u8; 1];
        if from.read(&mut byte)? == 0 {
            return match i {
                0 => Ok(None),
                _ => Err(std::io::ErrorKind::UnexpectedEof.into()),
            };
        }
        len |= u64::from(byte[0] & 0x7f) << (7 * i);
        if byte[0] & 0x80 == 0 {
            let len = usize::try_from(len).map_err(std::io::Error::other)?;
            if len > MAX_RECORD {
                return Err(std::io::Error::other(format!("a record of {len} bytes")));
            }
            let mut buf = vec![0u8; len];
            from.read_exact(&mut buf)?;
            return M::decode(buf.as_slice()).map(Some).map_err(std::io::Error::other);
        }
    }
    Err(std::io::Error::other("a record length that does not end"))
}

/// A file's record is its path and chunk ids: far below this.
const MAX_RECORD: usize = 64 * 1024 * 1024;

/// This backup's cache, written as the walk's results come in order, to
/// a temporary file renamed over the old one once complete.
pub struct CacheWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: zstd::stream::write::Encoder<'static, BufWriter<File>>,
}

impl CacheWriter {
    pub fn create(path: &Path, scan_start_ns: i64) -> Result<CacheWriter, AgentError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(AgentError::io(dir))?;
        }
        let tmp = path.with_extension("tmp");
        let file = File::create(&tmp).map_err(AgentError::io(&tmp))?;
        let out = zstd::stream::write::Encoder::new(BufWriter::new(file), 3).map_err(AgentError::io(&tmp))?;
        let mut writer = CacheWriter {
            path: path.to_path_buf(),
            tmp,
            out,
        };
        writer.write(&CacheHeader {
            format: FORMAT,
            scan_start_ns,
        })?;
        Ok(writer)
    }

    fn write(&mut self, record: &impl Message) -> Result<(), AgentError> {
        let bytes = record.encode_length_delimited_to_vec();
        self.out.write_all(&bytes).map_err(AgentError::io(&self.tmp))
    }

    /// Adds a file, in walk order.
    pub fn add(&mut self, root: u32, path: &[u8], stat: &Stat, chunks: &[Vec<u8>]) -> Result<(), AgentError> {
        self.write(&CachedFile {
            root,
            path: path.to_vec(),
            dev: stat.dev,
            ino: stat.ino,
            size: stat.size,
            mtime_ns: stat.mtime_ns,
            ctime_ns: stat.ctime_ns,
            chunks: chunks.to_vec(),
        })
    }

    /// Completes the file and puts it in place of the old one.
    pub fn finish(self) -> Result<(), AgentError> {
        let tmp = self.tmp;
        let buffered = self.out.finish().map_err(AgentError::io(&tmp))?;
        buffered
            .into_inner()
            .map_err(|e| AgentError::io(&tmp)(e.into_error()))?;
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

    fn write(path: &Path, start: i64, files: &[(u32, &[u8], Stat)]) {
        let mut writer = CacheWriter::create(path, start).unwrap();
        for (root, name, stat) in files {
            writer.add(*root, name, stat, &[vec![9u8; 32]]).unwrap();
        }
        writer.finish().unwrap();
    }

    #[test]
    fn a_file_matches_only_if_nothing_changed_and_it_settled_before_the_scan() {
        let dir = tempfile::tempdir().unwrap();
        let cache_path = dir.path().join("cache");
        let start = 100 * RACY_NS;
        let (old, racy) = (stat(start - 5 * RACY_NS), stat(start - 1));
        write(
            &cache_path,
            start,
            &[(0, b"x/old", old), (0, b"x/racy", racy), (0, b"x/z", old)],
        );
        let (mut cache, problem) = CacheReader::open(&cache_path);
        assert_eq!(problem, None);
        assert_eq!(cache.unchanged(0, b"x/old", &old), Some(vec![vec![9u8; 32]]));
        // Written in the second before the scan: read again.
        assert_eq!(cache.unchanged(0, b"x/racy", &racy), None);
        // Any field changed (here the ctime alone: a write that kept the
        // size and put the mtime back).
        let mut touched = old;
        touched.ctime_ns += 1;
        assert_eq!(cache.unchanged(0, b"x/z", &touched), None);

        // A damaged cache is no cache.
        std::fs::write(&cache_path, b"not a cache").unwrap();
        let (mut cache, problem) = CacheReader::open(&cache_path);
        assert!(problem.is_some());
        assert_eq!(cache.unchanged(0, b"x/old", &old), None);
    }

    #[test]
    fn the_cache_is_read_in_walk_order_skipping_what_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let cache_path = dir.path().join("cache");
        let start = 100 * RACY_NS;
        let old = stat(start - 5 * RACY_NS);
        // Walk order: a directory before what is in it, then its siblings
        // by name ("a/x" before "a-b", though '-' sorts before '/').
        let walked: [(u32, &[u8]); 6] = [
            (0, b"a"),
            (0, b"a/gone"),
            (0, b"a/x"),
            (0, b"a-b"),
            (1, b"b"),
            (1, b"b/y"),
        ];
        let written: Vec<(u32, &[u8], Stat)> = walked.iter().map(|(r, p)| (*r, *p, old)).collect();
        write(&cache_path, start, &written);
        let (mut cache, _) = CacheReader::open(&cache_path);
        // "a/gone" was deleted since; "a/new" is new: neither stops the rest.
        assert!(cache.unchanged(0, b"a", &old).is_some());
        assert!(cache.unchanged(0, b"a/new", &old).is_none());
        assert!(cache.unchanged(0, b"a/x", &old).is_some());
        assert!(cache.unchanged(0, b"a-b", &old).is_some());
        assert!(cache.unchanged(1, b"b/y", &old).is_some());
        assert!(cache.unchanged(1, b"c", &old).is_none());
    }
}
