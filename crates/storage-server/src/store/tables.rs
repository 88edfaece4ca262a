//! redb table layout.

use duplex_types::{Seq, ServerId};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::StoreError;

/// "server_id" → uuid string; later: role, epoch.
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// (account, chunk id) → where the chunk's bytes are.
pub const CHUNKS: TableDefinition<ChunkKey, ChunkLocTuple> = TableDefinition::new("chunks");
/// (account, chunk id).
pub type ChunkKey = (u64, [u8; 32]);
/// `ChunkLoc` as redb stores it: (pack, offset, len, BLAKE3 of the payload).
pub type ChunkLocTuple = (u64, u64, u32, [u8; 32]);
/// (account, snapshot id) → encoded `SnapshotInfo`.
pub const SNAPSHOTS: TableDefinition<(u64, [u8; 16]), &[u8]> = TableDefinition::new("snapshots");
/// (account, snapshot id) → when the snapshot was deleted (unix ms). A
/// mirrored record of a tombstoned snapshot is dropped, so a backlog
/// replayed after failback cannot bring a deleted snapshot back.
pub const TOMBSTONES: TableDefinition<(u64, [u8; 16]), i64> = TableDefinition::new("tombstones");
/// account → when it was deleted (unix ms): its tickets are refused.
pub const DELETED_ACCOUNTS: TableDefinition<u64, i64> = TableDefinition::new("deleted_accounts");
/// source server id → last feed sequence of that source applied here.
pub const CHECKPOINTS: TableDefinition<&str, u64> = TableDefinition::new("checkpoints");
/// seq → encoded `ChangeRecord`.
pub const FEED: TableDefinition<u64, &[u8]> = TableDefinition::new("feed");

/// Where one chunk's sealed payload lives, and the hash it must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLoc {
    pub pack: u64,
    pub offset: u64,
    pub len: u32,
    pub hash: [u8; 32],
}

impl ChunkLoc {
    pub fn to_tuple(self) -> ChunkLocTuple {
        (self.pack, self.offset, self.len, self.hash)
    }

    pub fn from_tuple((pack, offset, len, hash): ChunkLocTuple) -> Self {
        Self {
            pack,
            offset,
            len,
            hash,
        }
    }
}

/// META key of the data dir's format version.
pub const FORMAT_KEY: &str = "data_format";
/// Format 2: sealed (encrypted) payloads indexed by their hash. Format 1
/// (before client-side encryption) stored compressed plaintext and is not
/// read by this build.
pub const DATA_FORMAT: u64 = 2;

/// Refuses a data dir written in a format this build does not read. A dir
/// with a server id but no format is format 1.
fn check_format(meta: &redb::Table<'_, &'static str, &'static [u8]>, fresh: bool) -> Result<(), StoreError> {
    let found = match meta.get(FORMAT_KEY)? {
        Some(v) => <[u8; 8]>::try_from(v.value())
            .map(u64::from_le_bytes)
            .map_err(|_| StoreError::Invalid("meta data_format is not a u64".into()))?,
        None if fresh => return Ok(()),
        None => 1,
    };
    if found == DATA_FORMAT {
        return Ok(());
    }
    Err(StoreError::Invalid(format!(
        "this data dir holds data format {found}, and this build reads only format {DATA_FORMAT} \
         (encrypted chunks); start it on an empty data dir and back up again, or run the build that wrote it"
    )))
}

/// Creates the tables and the server id on first open; returns the id.
pub fn init(db: &Database) -> Result<ServerId, StoreError> {
    let txn = db.begin_write()?;
    let id = {
        let mut meta = txn.open_table(META)?;
        let fresh = meta.get("server_id")?.is_none();
        check_format(&meta, fresh)?;
        meta.insert(FORMAT_KEY, DATA_FORMAT.to_le_bytes().as_slice())?;
        txn.open_table(CHUNKS)?;
        txn.open_table(SNAPSHOTS)?;
        txn.open_table(FEED)?;
        txn.open_table(CHECKPOINTS)?;
        txn.open_table(TOMBSTONES)?;
        txn.open_table(DELETED_ACCOUNTS)?;
        txn.open_table(super::gc::RETIRED)?;
        txn.open_table(super::gc::RECLAIMED)?;
        super::usage::backfill(&txn)?;
        let existing = meta.get("server_id")?.map(|v| v.value().to_vec());
        match existing {
            Some(bytes) => {
                let text = String::from_utf8(bytes)
                    .map_err(|_| StoreError::Invalid("stored server id is not UTF-8".into()))?;
                ServerId::parse(&text).map_err(|e| StoreError::Invalid(e.to_string()))?
            }
            None => {
                let id = ServerId::generate();
                meta.insert("server_id", id.to_string().as_bytes())?;
                id
            }
        }
    };
    txn.commit()?;
    Ok(id)
}

pub fn last_seq(db: &Database) -> Result<Seq, StoreError> {
    let txn = db.begin_read()?;
    last_seq_in(&txn.open_table(FEED)?)
}

pub fn last_seq_in(feed: &impl ReadableTable<u64, &'static [u8]>) -> Result<Seq, StoreError> {
    Ok(feed.last()?.map(|(k, _)| Seq(k.value())).unwrap_or_default())
}

/// META key of the running total of chunk bytes indexed.
pub const STORED_BYTES: &str = "stored_bytes";

/// A u64 counter kept in META (0 when absent).
pub fn counter(meta: &impl ReadableTable<&'static str, &'static [u8]>, key: &str) -> Result<u64, StoreError> {
    match meta.get(key)? {
        None => Ok(0),
        Some(v) => <[u8; 8]>::try_from(v.value())
            .map(u64::from_le_bytes)
            .map_err(|_| StoreError::Invalid(format!("meta {key} is not a u64"))),
    }
}
