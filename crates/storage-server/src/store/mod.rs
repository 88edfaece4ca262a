//! The storage engine: chunks appended to pack files, an index and snapshot
//! records in redb, and a change feed numbering every write.
//!
//! Write order is what makes "durable before acknowledged" hold: chunk bytes
//! are fsynced in their pack (and the pack's directory entry) before the
//! redb transaction that indexes them commits, and that commit is fsynced
//! before any RPC returns OK. A crash in between leaves only unindexed bytes
//! in a pack, which nothing can see.

mod codec;
mod error;
pub mod gc;
pub mod mirror;
mod packs;
pub mod references;
mod repair;
pub mod snapshots;
mod tables;
mod usage;
mod verify;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use duplex_proto::v1::{ChangeRecord, ChunkAdded, StorageServerStatus, change_record};
use duplex_types::{AccountId, ChunkId, Seq, ServerId};
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, WriteTransaction};

pub use codec::MAX_CHUNK_BYTES;

/// Chunk ids looked up in one read transaction by `Store::read_chunks`.
const READ_RUN: usize = 256;
/// Largest pack an upload or a compaction writes before going on in a new
/// one. A compaction rewrites a pack whole to reclaim its dead bytes, and
/// one upload stream used to be one pack however long it ran: a terabyte
/// backup made a pack a compaction would have to copy a terabyte of.
pub const MAX_PACK_BYTES: u64 = 512 << 20;
pub use error::StoreError;
pub use packs::{Caching, PackWriter, PutStats};
pub use repair::Damaged;
pub use usage::AccountUsage;
pub use verify::VerifyReport;

use tables::{CHUNKS, ChunkLoc, FEED, META, SNAPSHOTS};

/// A chunk as stored: the sealed payload and its hash, already checked
/// against each other.
pub struct StoredChunk {
    pub id: ChunkId,
    pub data_hash: [u8; 32],
    pub data: Vec<u8>,
}

impl StoredChunk {
    pub fn into_proto(self) -> duplex_proto::v1::Chunk {
        duplex_proto::v1::Chunk {
            id: self.id.to_vec(),
            data: self.data.into(),
            data_hash: self.data_hash.to_vec(),
        }
    }
}

pub struct Store {
    db: Database,
    packs_dir: PathBuf,
    server_id: ServerId,
    /// Last change-feed sequence number committed.
    seq: AtomicU64,
    /// Wakes change-feed streams when `seq` moves.
    feed_notify: tokio::sync::watch::Sender<u64>,
    /// Packs being written, which garbage collection leaves alone.
    active: packs::ActivePacks,
    /// Chunks `MissingChunks` answered present, for the grace rule.
    touched: std::sync::Mutex<gc::Touched>,
    /// When this process opened the store (unix ms): the touched set
    /// covers nothing before it.
    opened_ms: i64,
    /// Held by the garbage collection round running.
    gc_round: std::sync::Mutex<()>,
}

/// redb's own default: the whole index of about ten million chunks.
pub const DEFAULT_INDEX_CACHE: usize = 1 << 30;

impl Store {
    /// Opens (or creates) the store in `dir` with redb's default index
    /// cache (1 GiB at most).
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(dir, DEFAULT_INDEX_CACHE)
    }

    /// Opens (or creates) the store in `dir`, generating the server id on
    /// first start; the index's page cache holds at most `index_cache`
    /// bytes.
    pub fn open_with(dir: &Path, index_cache: usize) -> Result<Store, StoreError> {
        let packs_dir = dir.join("packs");
        std::fs::create_dir_all(&packs_dir)
            .map_err(StoreError::io(format!("creating {}", packs_dir.display())))?;
        fsync_dir(dir)?;
        let meta_path = dir.join("meta.redb");
        let db = Database::builder()
            .set_cache_size(index_cache)
            .create(&meta_path)?;
        // The index names every account's chunks: the owner's only.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&meta_path, std::fs::Permissions::from_mode(0o600))
                .map_err(StoreError::io(format!("restricting {}", meta_path.display())))?;
        }
        let server_id = tables::init(&db)?;
        let seq = tables::last_seq(&db)?;
        let store = Store {
            db,
            packs_dir,
            server_id,
            seq: AtomicU64::new(seq.0),
            feed_notify: tokio::sync::watch::Sender::new(seq.0),
            active: Default::default(),
            touched: Default::default(),
            opened_ms: snapshots::now_ms(),
            gc_round: Default::default(),
        };
        let removed = store.recover_packs()?;
        if removed > 0 {
            tracing::info!(
                packs = removed,
                "deleted packs left by an interrupted upload or compaction"
            );
        }
        Ok(store)
    }

    pub fn server_id(&self) -> ServerId {
        self.server_id
    }

    pub fn subscribe_feed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.feed_notify.subscribe()
    }

    pub fn last_seq(&self) -> Seq {
        Seq(self.seq.load(Ordering::SeqCst))
    }

    /// The ids among `ids` that `account` does not hold.
    pub fn missing(&self, account: AccountId, ids: &[ChunkId]) -> Result<Vec<ChunkId>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CHUNKS)?;
        let mut missing = Vec::new();
        for id in ids {
            if table.get((account.0, *id.as_bytes()))?.is_none() {
                missing.push(*id);
            }
        }
        Ok(missing)
    }

    /// A pack for an agent's upload, kept in the page cache for the
    /// mirror's pull that reads it next.
    pub fn begin_pack(&self) -> Result<PackWriter, StoreError> {
        PackWriter::create(&self.packs_dir, &self.active, Caching::Keep)
    }

    /// A pack for a copy nothing reads soon (a mirrored batch, a repair,
    /// a compaction): dropped from the page cache once on disk.
    pub fn begin_cold_pack(&self) -> Result<PackWriter, StoreError> {
        PackWriter::create(&self.packs_dir, &self.active, Caching::DropBehind)
    }

    /// Goes on in a new pack once `writer`'s has reached [`MAX_PACK_BYTES`]
    /// and everything in it is committed.
    pub fn roll_if_full(&self, writer: &mut PackWriter) -> Result<(), StoreError> {
        self.roll_at(writer, MAX_PACK_BYTES)
    }

    fn roll_at(&self, writer: &mut PackWriter, limit: u64) -> Result<(), StoreError> {
        if writer.written() < limit || writer.pending_chunks() > 0 {
            return Ok(());
        }
        let next = PackWriter::create(&self.packs_dir, &self.active, writer.caching())?;
        // Dropping the full one leaves its pack to compaction like any other.
        drop(std::mem::replace(writer, next));
        Ok(())
    }

    /// Makes the chunks `account` wrote to `writer` durable and visible.
    /// Chunks the account already holds are skipped (their bytes stay
    /// unreferenced). With a quota, a commit that would take the account's
    /// stored bytes past it is refused and indexes nothing.
    pub fn commit_pack(
        &self,
        writer: &mut PackWriter,
        account: AccountId,
        quota: Option<u64>,
    ) -> Result<PutStats, StoreError> {
        let pending = writer.sync()?;
        if pending.is_empty() {
            return Ok(PutStats::default());
        }
        if let Some(other) = pending.iter().find(|p| p.account != account) {
            return Err(StoreError::Invalid(format!(
                "a pack of account {} holds a chunk of account {}",
                account.0, other.account.0
            )));
        }
        let origin = self.server_id.to_string();
        let mut stats = PutStats::default();
        self.write(|txn, seq| {
            stats = index_chunks(txn, seq, &pending, &origin)?;
            match quota {
                Some(quota) => usage::check_quota(txn, account, stats.stored_bytes, quota),
                None => Ok(()),
            }
        })?;
        Ok(stats)
    }

    /// Reads one chunk and checks its bytes against the hash recorded when
    /// it was stored, so nothing corrupt leaves this server unnoticed.
    pub fn read_chunk(&self, account: AccountId, id: ChunkId) -> Result<Option<StoredChunk>, StoreError> {
        let Some(loc) = self.chunk_loc(account, id)? else {
            return Ok(None);
        };
        self.read_with(&mut packs::PackReader::default(), id, &loc)
            .map(Some)
    }

    /// Reads `ids` of `account` in order, checking each like `read_chunk`,
    /// and hands each to `each` (none for one not here) until it returns
    /// false. A run of ids shares one index lookup transaction, and the
    /// pack of the last chunk stays open: per-chunk costs that dominated
    /// reading many small chunks.
    pub fn read_chunks(
        &self,
        account: AccountId,
        ids: &[ChunkId],
        mut each: impl FnMut(ChunkId, Result<Option<StoredChunk>, StoreError>) -> bool,
    ) -> Result<(), StoreError> {
        let mut reader = packs::PackReader::default();
        for run in ids.chunks(READ_RUN) {
            // Looked up first, then read: the transaction is not held
            // while `each` waits for a slow reader.
            let locs: Vec<Option<ChunkLoc>> = {
                let txn = self.db.begin_read()?;
                let table = txn.open_table(CHUNKS)?;
                run.iter()
                    .map(|id| {
                        Ok(table
                            .get((account.0, *id.as_bytes()))?
                            .map(|v| ChunkLoc::from_tuple(v.value())))
                    })
                    .collect::<Result<_, StoreError>>()?
            };
            for (&id, loc) in run.iter().zip(locs) {
                let item = match loc {
                    None => Ok(None),
                    Some(loc) => self.read_with(&mut reader, id, &loc).map(Some),
                };
                if !each(id, item) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn read_with(
        &self,
        reader: &mut packs::PackReader,
        id: ChunkId,
        loc: &ChunkLoc,
    ) -> Result<StoredChunk, StoreError> {
        reader
            .read(&self.packs_dir, loc)
            .map_err(|e| StoreError::Corrupt {
                id,
                reason: e.to_string(),
            })?;
        codec::check_stored(id, &loc.hash, &reader.buf)?;
        Ok(StoredChunk {
            id,
            data_hash: loc.hash,
            data: std::mem::take(&mut reader.buf),
        })
    }

    fn chunk_loc(&self, account: AccountId, id: ChunkId) -> Result<Option<ChunkLoc>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CHUNKS)?;
        Ok(table
            .get((account.0, *id.as_bytes()))?
            .map(|v| ChunkLoc::from_tuple(v.value())))
    }

    pub fn status(&self) -> Result<StorageServerStatus, StoreError> {
        let txn = self.db.begin_read()?;
        let chunks = txn.open_table(CHUNKS)?;
        let snapshots = txn.open_table(SNAPSHOTS)?;
        let stored_bytes = tables::counter(&txn.open_table(META)?, tables::STORED_BYTES)?;
        Ok(StorageServerStatus {
            server: None,
            role: "primary".into(),
            epoch: 0,
            seq: self.last_seq().0,
            chunks: chunks.len()?,
            snapshots: snapshots.len()?,
            stored_bytes,
            ..Default::default()
        })
    }

    fn change(&self, seq: Seq, account: AccountId, change: change_record::Change) -> ChangeRecord {
        record(seq, &self.server_id.to_string(), account, change)
    }

    /// Runs `f` in one durable write transaction, handing it the feed
    /// sequence to advance; the new sequence is published only on commit.
    fn write<F>(&self, f: F) -> Result<(), StoreError>
    where
        F: FnOnce(&WriteTransaction, &mut Seq) -> Result<(), StoreError>,
    {
        let txn = self.db.begin_write()?;
        // redb serialises writers, so the sequence read inside the
        // transaction cannot move under us.
        let mut seq = tables::last_seq_in(&txn.open_table(FEED)?)?;
        f(&txn, &mut seq)?;
        txn.commit()?;
        let last = self.seq.fetch_max(seq.0, Ordering::SeqCst).max(seq.0);
        self.feed_notify.send_if_modified(|v| {
            let changed = last > *v;
            *v = last;
            changed
        });
        Ok(())
    }
}

fn record(seq: Seq, origin: &str, account: AccountId, change: change_record::Change) -> ChangeRecord {
    ChangeRecord {
        seq: seq.0,
        origin: origin.to_owned(),
        account_id: account.0,
        change: Some(change),
        time_unix_ms: snapshots::now_ms(),
    }
}

/// Indexes fsynced chunks and numbers each new one in the feed, as
/// changes from their own origin or else `origin`. Chunks already held are
/// skipped.
fn index_chunks(
    txn: &WriteTransaction,
    seq: &mut Seq,
    pending: &[packs::PendingChunk],
    origin: &str,
) -> Result<PutStats, StoreError> {
    let mut stats = PutStats::default();
    let mut by_account: std::collections::BTreeMap<u64, u64> = Default::default();
    let mut chunks = txn.open_table(CHUNKS)?;
    let mut feed = txn.open_table(FEED)?;
    for p in pending {
        let key = (p.account.0, *p.id.as_bytes());
        if chunks.get(key)?.is_some() {
            stats.already_present += 1;
            continue;
        }
        chunks.insert(key, p.loc.to_tuple())?;
        *seq = seq.next();
        let added = change_record::Change::Chunk(ChunkAdded {
            id: p.id.to_vec(),
            stored_len: p.loc.len,
        });
        let from = p.origin.as_deref().unwrap_or(origin);
        feed.insert(
            seq.0,
            record(*seq, from, p.account, added).encode_to_vec().as_slice(),
        )?;
        stats.stored += 1;
        stats.stored_bytes += u64::from(p.loc.len);
        *by_account.entry(p.account.0).or_default() += u64::from(p.loc.len);
    }
    drop((chunks, feed));
    usage::add_bytes(txn, &by_account)?;
    // Kept as a counter so status and /metrics stay O(1) in the chunk count.
    let mut meta = txn.open_table(META)?;
    let total = tables::counter(&meta, tables::STORED_BYTES)? + stats.stored_bytes;
    meta.insert(tables::STORED_BYTES, total.to_le_bytes().as_slice())?;
    Ok(stats)
}

/// Makes a directory's entries (new files in it) durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io(format!("fsync of directory {}", dir.display())))
}

#[cfg(test)]
mod gc_tests;
#[cfg(test)]
mod tests;
