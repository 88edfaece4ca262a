//! Pack files: chunks appended one after another, fsynced before the index
//! that points into them commits. One writer per upload stream, so packs
//! never need locking.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use duplex_proto::v1::Chunk;
use duplex_rpc::direct_io::Appender;
use duplex_types::{AccountId, ChunkId};

use super::codec;
use super::tables::ChunkLoc;
use super::{StoreError, fsync_dir};

/// What one `PutChunks` stream did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PutStats {
    pub stored: u64,
    pub already_present: u64,
    pub stored_bytes: u64,
}

impl std::ops::AddAssign for PutStats {
    fn add_assign(&mut self, rhs: Self) {
        self.stored += rhs.stored;
        self.already_present += rhs.already_present;
        self.stored_bytes += rhs.stored_bytes;
    }
}

#[derive(Clone)]
pub struct PendingChunk {
    pub account: AccountId,
    /// Where the chunk was first written, when that is another server.
    pub origin: Option<String>,
    pub id: ChunkId,
    pub loc: ChunkLoc,
}

/// Packs a writer still appends to: garbage collection leaves them alone,
/// since their index entries are not all committed yet.
pub type ActivePacks = Arc<Mutex<HashSet<u64>>>;

/// Whether a pack's bytes stay in the page cache once they are on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caching {
    /// An agent's upload: the mirror's pull reads it back at once.
    Keep,
    /// A mirrored, repaired or compacted copy: nothing reads it soon, so
    /// it is written around the page cache (`O_DIRECT`), or, where the
    /// file system refuses that, each synced range is dropped from the
    /// cache. Caching it would only evict what is read (the index, fresh
    /// uploads), and on a VM whose free memory the host reclaims, every
    /// new cache page costs a fault on the host: writing 512 MiB took 1.2
    /// to 1.7 s of system time cached, 0.25 s dropped behind, and the
    /// copy into the cache was still 38 % of a mirror destination's CPU
    /// (docs/AGENT_SPEED.md).
    DropBehind,
}

pub struct PackWriter {
    pack: u64,
    active: ActivePacks,
    path: PathBuf,
    dir: PathBuf,
    /// Buffered: small chunks are written in large pieces, not one write
    /// each. Flushed before every fsync, which is before anything indexes
    /// what was appended, so no reader ever looks past what is on disk.
    /// Direct (around the page cache) for `DropBehind`.
    file: Appender,
    offset: u64,
    caching: Caching,
    /// Where the bytes still in the page cache begin (`DropBehind`).
    cached_from: u64,
    dir_synced: bool,
    pending: Vec<PendingChunk>,
    pending_bytes: u64,
}

/// Bytes gathered before a write to a pack: small chunks go to the kernel
/// in large pieces, not one write each.
const APPEND_BUFFER: usize = 1024 * 1024;

pub fn pack_path(dir: &Path, pack: u64) -> PathBuf {
    dir.join(format!("{pack:016x}.pack"))
}

impl PackWriter {
    pub(super) fn create(
        dir: &Path,
        active: &ActivePacks,
        caching: Caching,
    ) -> Result<PackWriter, StoreError> {
        loop {
            let pack: u64 = rand::random();
            let path = pack_path(dir, pack);
            // Registered before the file exists, so a collector that lists
            // the directory next cannot see it unregistered.
            lock(active)?.insert(pack);
            match Appender::create_new(&path, caching == Caching::DropBehind, APPEND_BUFFER) {
                Ok(file) => {
                    return Ok(PackWriter {
                        pack,
                        active: active.clone(),
                        path,
                        dir: dir.to_path_buf(),
                        file,
                        offset: 0,
                        caching,
                        cached_from: 0,
                        dir_synced: false,
                        pending: Vec::new(),
                        pending_bytes: 0,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    lock(active)?.remove(&pack);
                    return Err(StoreError::io(format!("creating {}", path.display()))(e));
                }
            }
        }
    }

    pub fn pack(&self) -> u64 {
        self.pack
    }

    pub fn caching(&self) -> Caching {
        self.caching
    }

    /// Bytes appended so far.
    pub fn written(&self) -> u64 {
        self.offset
    }

    /// Bytes appended since the last commit.
    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes
    }

    /// Chunks appended since the last commit.
    pub fn pending_chunks(&self) -> usize {
        self.pending.len()
    }

    /// Checks `chunk`'s payload against its hash and appends it. A chunk
    /// that does not check is refused before a byte of it is written.
    pub fn add(&mut self, account: AccountId, chunk: &Chunk) -> Result<(), StoreError> {
        self.add_from(account, chunk, None)
    }

    /// Like `add`, for a chunk mirrored from `origin`.
    pub fn add_from(
        &mut self,
        account: AccountId,
        chunk: &Chunk,
        origin: Option<String>,
    ) -> Result<(), StoreError> {
        let id = ChunkId::from_bytes(&chunk.id).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let hash = codec::check(id, &chunk.data_hash, &chunk.data)?;
        self.append(account, id, hash, &chunk.data, origin)
    }

    /// Appends a payload the caller has just read back and checked against
    /// `hash` (a compaction's copy): hashing it again would only cost.
    pub(super) fn add_checked(
        &mut self,
        account: AccountId,
        id: ChunkId,
        hash: [u8; 32],
        data: &[u8],
    ) -> Result<(), StoreError> {
        self.append(account, id, hash, data, None)
    }

    fn append(
        &mut self,
        account: AccountId,
        id: ChunkId,
        hash: [u8; 32],
        data: &[u8],
        origin: Option<String>,
    ) -> Result<(), StoreError> {
        let len = u32::try_from(data.len())
            .map_err(|_| StoreError::Invalid("chunk payload larger than 4 GiB".into()))?;
        self.file
            .write_all(data)
            .map_err(StoreError::io(format!("writing {}", self.path.display())))?;
        self.pending.push(PendingChunk {
            account,
            origin,
            id,
            loc: ChunkLoc {
                pack: self.pack,
                offset: self.offset,
                len,
                hash,
            },
        });
        self.offset += u64::from(len);
        self.pending_bytes += u64::from(len);
        Ok(())
    }

    /// Fsyncs the pack (and, the first time, its directory entry) and hands
    /// back the chunks now safe to index.
    pub(super) fn sync(&mut self) -> Result<Vec<PendingChunk>, StoreError> {
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        self.sync_file()?;
        if !self.dir_synced {
            fsync_dir(&self.dir)?;
            self.dir_synced = true;
        }
        self.pending_bytes = 0;
        Ok(std::mem::take(&mut self.pending))
    }

    /// Writes what was appended so far to disk without handing anything
    /// back to index: a long background copy calls it as it goes, so its
    /// bytes reach the disk at its own pace instead of all at once at the
    /// end, where a backup's next fsync would wait behind them.
    pub(super) fn write_back(&mut self) -> Result<(), StoreError> {
        self.sync_file()
    }

    fn sync_file(&mut self) -> Result<(), StoreError> {
        self.file
            .flush()
            .map_err(StoreError::io(format!("writing {}", self.path.display())))?;
        self.file
            .file()
            .sync_data()
            .map_err(StoreError::io(format!("fsync of {}", self.path.display())))?;
        if self.caching == Caching::DropBehind && !self.file.is_direct() {
            self.drop_synced();
        }
        Ok(())
    }

    /// Drops the bytes synced since the last call from the page cache.
    /// Only advice: if the kernel declines, the pages stay cached, which
    /// costs memory and nothing else.
    fn drop_synced(&mut self) {
        let (Ok(from), Ok(len)) = (
            libc::off_t::try_from(self.cached_from),
            libc::off_t::try_from(self.offset - self.cached_from),
        ) else {
            return;
        };
        let _ = nix::fcntl::posix_fadvise(
            self.file.file(),
            from,
            len,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
        self.cached_from = self.offset;
    }

    /// Removes the pack if nothing in it was ever indexed.
    pub fn discard_if_empty(self) {
        if self.offset == 0 {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        if let Ok(mut active) = self.active.lock() {
            active.remove(&self.pack);
        }
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, StoreError> {
    m.lock()
        .map_err(|_| StoreError::Internal("a storage lock was poisoned by a panic".into()))
}

/// Reads chunks pack after pack into one buffer, keeping the last pack
/// open: a compaction reads many chunks of few packs.
#[derive(Default)]
pub(super) struct PackReader {
    open: Option<(u64, File)>,
    pub buf: Vec<u8>,
}

impl PackReader {
    /// Reads `loc`'s bytes into `self.buf`.
    pub fn read(&mut self, dir: &Path, loc: &ChunkLoc) -> std::io::Result<()> {
        if self.open.as_ref().is_none_or(|(pack, _)| *pack != loc.pack) {
            self.open = Some((loc.pack, File::open(pack_path(dir, loc.pack))?));
        }
        let Some((_, file)) = &self.open else {
            return Err(std::io::Error::other("no pack open"));
        };
        self.buf = read_at(file, loc)?;
        Ok(())
    }
}

pub fn read(dir: &Path, loc: &ChunkLoc) -> std::io::Result<Vec<u8>> {
    read_at(&File::open(pack_path(dir, loc.pack))?, loc)
}

/// `loc`'s bytes, read into a new buffer's spare capacity: zeroing the
/// buffer first cost half as much again as the read's own copy.
fn read_at(file: &File, loc: &ChunkLoc) -> std::io::Result<Vec<u8>> {
    let len = loc.len as usize;
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let at = loc.offset + buf.len() as u64;
        if rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    // The spare capacity may run past the chunk into the pack's next bytes.
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_is_read_exactly_and_one_cut_short_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pack: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        std::fs::write(pack_path(dir.path(), 7), &pack).expect("write pack");
        let loc = |offset: u64, len: u32| ChunkLoc {
            pack: 7,
            offset,
            len,
            hash: [0; 32],
        };
        assert_eq!(read(dir.path(), &loc(1000, 300)).expect("read"), pack[1000..1300]);
        assert_eq!(read(dir.path(), &loc(9000, 1000)).expect("read"), pack[9000..]);
        let mut reader = PackReader::default();
        reader.read(dir.path(), &loc(0, 5)).expect("read");
        assert_eq!(reader.buf, pack[..5]);
        let short = read(dir.path(), &loc(9990, 20)).expect_err("past the end");
        assert_eq!(short.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
