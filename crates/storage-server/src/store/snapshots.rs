//! Snapshot commit and lookup. A snapshot's manifest is stored as chunks
//! the agent encrypted, so the server cannot read it: a commit checks that
//! every manifest chunk it names is held (from the index alone, never
//! loading chunk data), so its memory is bounded by the request's size
//! whatever the request names. Paths are checked by the agent's restore.
//!
//! A deleted snapshot leaves a tombstone and a feed record, so the deletion
//! is mirrored like a backup and a replayed backlog cannot undo it.

use duplex_proto::v1::{AccountDeleted, SnapshotDeleted, SnapshotInfo, change_record};
use duplex_types::retention::{self, KeepPolicy};
use duplex_types::sealed::{MAX_MANIFEST_CHUNKS, MAX_SUMMARY_BYTES};
use duplex_types::{AccountId, ChunkId, Seq, SnapshotId};
use prost::Message;
use redb::{ReadableDatabase, ReadableTable, WriteTransaction};

use super::references;
use super::tables::{CHUNKS, DELETED_ACCOUNTS, FEED, SNAPSHOTS, TOMBSTONES};
use super::{Store, StoreError};

/// What a client asks to commit.
pub struct NewSnapshot {
    /// In manifest order (repeats allowed: the same piece can recur).
    pub manifest_chunks: Vec<ChunkId>,
    /// The encrypted summary, stored opaque.
    pub summary: Vec<u8>,
    /// The blobs listing the data chunks the manifest names.
    pub reference_blobs: Vec<ChunkId>,
}

/// The checks every snapshot record passes before it is stored, whether an
/// agent commits it or a mirror brings it: the cap on manifest chunks,
/// 32-byte ids, a bounded summary.
pub fn check_record(manifest_chunks: &[Vec<u8>], summary: &[u8]) -> Result<Vec<ChunkId>, StoreError> {
    if manifest_chunks.is_empty() {
        return Err(StoreError::Invalid("snapshot has no manifest".into()));
    }
    if manifest_chunks.len() > MAX_MANIFEST_CHUNKS {
        return Err(StoreError::Invalid(format!(
            "snapshot names {} manifest chunks; at most {MAX_MANIFEST_CHUNKS}",
            manifest_chunks.len()
        )));
    }
    if summary.len() > MAX_SUMMARY_BYTES {
        return Err(StoreError::Invalid(format!(
            "snapshot summary is {} bytes; at most {MAX_SUMMARY_BYTES}",
            summary.len()
        )));
    }
    manifest_chunks
        .iter()
        .map(|c| ChunkId::from_bytes(c).map_err(|e| StoreError::Invalid(format!("manifest chunk: {e}"))))
        .collect()
}

impl Store {
    pub fn commit_snapshot(&self, account: AccountId, new: NewSnapshot) -> Result<SnapshotInfo, StoreError> {
        let raw: Vec<Vec<u8>> = new.manifest_chunks.iter().map(|c| c.to_vec()).collect();
        check_record(&raw, &new.summary)?;
        let blobs: Vec<Vec<u8>> = new.reference_blobs.iter().map(|c| c.to_vec()).collect();
        references::blob_ids(&blobs)?;
        // Each distinct id is looked up once, however often it is named.
        let mut distinct = new.manifest_chunks.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let id = SnapshotId::generate();
        let info = SnapshotInfo {
            id: id.to_string(),
            time_unix_ms: now_ms(),
            manifest_chunks: raw,
            origin: self.server_id().to_string(),
            summary: new.summary,
            reference_blobs: blobs,
            references_listed: true,
        };
        self.write(|txn, seq| {
            // In the committing transaction: a sweep cannot run between the
            // check and the insert.
            references::check_held(
                &txn.open_table(CHUNKS)?,
                &self.packs_dir,
                account,
                &distinct,
                &new.reference_blobs,
            )?;
            let mut snapshots = txn.open_table(SNAPSHOTS)?;
            snapshots.insert((account.0, *id.as_bytes()), info.encode_to_vec().as_slice())?;
            *seq = seq.next();
            let record = self.change(*seq, account, change_record::Change::Snapshot(info.clone()));
            txn.open_table(FEED)?
                .insert(seq.0, record.encode_to_vec().as_slice())?;
            super::usage::note_snapshot(txn, account, info.time_unix_ms)?;
            Ok(())
        })?;
        Ok(info)
    }

    /// Deletes snapshots of `account` by full id in one transaction, each
    /// with a tombstone and a feed record from this server. Returns the ids
    /// this call deleted; an id deleted before is skipped, one never seen
    /// here fails the whole call.
    pub fn delete_snapshots(
        &self,
        account: AccountId,
        ids: &[SnapshotId],
    ) -> Result<Vec<SnapshotId>, StoreError> {
        let origin = self.server_id().to_string();
        let mut deleted = Vec::new();
        self.write(|txn, seq| {
            for id in ids {
                match delete_one(txn, seq, &origin, account, *id, false)? {
                    Deletion::Deleted => deleted.push(*id),
                    Deletion::AlreadyGone => {}
                    Deletion::Unknown => return Err(StoreError::NotFound(format!("snapshot {id}"))),
                }
            }
            Ok(())
        })?;
        Ok(deleted)
    }

    /// Deletes the account's snapshots that `keep` does not keep (its
    /// group's policy, applied after each commit); an empty policy keeps
    /// everything. Returns what it deleted.
    pub fn apply_keep_policy(
        &self,
        account: AccountId,
        keep: &KeepPolicy,
    ) -> Result<Vec<SnapshotId>, StoreError> {
        if keep.is_empty() {
            return Ok(Vec::new());
        }
        let all: Vec<(String, i64)> = self
            .list_snapshots(account)?
            .into_iter()
            .map(|s| (s.id, s.time_unix_ms))
            .collect();
        let (_, expired) = retention::apply(keep, &all);
        let ids = expired
            .iter()
            .map(|id| SnapshotId::parse(id).map_err(|e| StoreError::Invalid(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        if ids.is_empty() {
            return Ok(ids);
        }
        self.delete_snapshots(account, &ids)
    }

    pub fn list_snapshots(&self, account: AccountId) -> Result<Vec<SnapshotInfo>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for entry in table.range((account.0, [0u8; 16])..=(account.0, [0xffu8; 16]))? {
            let (_, v) = entry?;
            out.push(decode_info(v.value())?);
        }
        Ok(out)
    }

    /// Finds a snapshot by full id, unique prefix (6+ hex digits) or "latest".
    pub fn get_snapshot(&self, account: AccountId, query: &str) -> Result<SnapshotInfo, StoreError> {
        let all = self.list_snapshots(account)?;
        if query == "latest" {
            return all
                .into_iter()
                .last()
                .ok_or_else(|| StoreError::NotFound("no snapshot yet: latest".into()));
        }
        if query.len() < 6 || !query.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(StoreError::Invalid(format!(
                "snapshot id {query:?} must be \"latest\" or at least 6 hex digits"
            )));
        }
        let query = query.to_ascii_lowercase();
        let mut matches: Vec<SnapshotInfo> = all.into_iter().filter(|s| s.id.starts_with(&query)).collect();
        match matches.len() {
            0 => Err(StoreError::NotFound(format!("snapshot {query}"))),
            1 => Ok(matches.remove(0)),
            n => Err(StoreError::Invalid(format!(
                "snapshot id prefix {query} matches {n} snapshots"
            ))),
        }
    }
}

impl Store {
    /// Deletes every snapshot of `account` and marks it deleted, with an
    /// `AccountDeleted` feed record after the snapshots' own; returns how
    /// many snapshots it deleted. Deleting it again deletes nothing.
    pub fn delete_account(&self, account: AccountId) -> Result<u64, StoreError> {
        let origin = self.server_id().to_string();
        let mut deleted = 0;
        self.write(|txn, seq| {
            deleted = delete_account_in(txn, seq, &origin, account)?;
            Ok(())
        })?;
        Ok(deleted)
    }

    /// Whether `account` was deleted here (or on a server mirroring here).
    pub fn is_deleted(&self, account: AccountId) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(DELETED_ACCOUNTS)?.get(account.0)?.is_some())
    }
}

/// Deletes an account's snapshots and marks it, numbering the deletion in
/// the feed as a change from `origin`; nothing when it is marked already.
pub(super) fn delete_account_in(
    txn: &WriteTransaction,
    seq: &mut Seq,
    origin: &str,
    account: AccountId,
) -> Result<u64, StoreError> {
    if txn.open_table(DELETED_ACCOUNTS)?.get(account.0)?.is_some() {
        return Ok(0);
    }
    let ids: Vec<SnapshotId> = {
        let snapshots = txn.open_table(SNAPSHOTS)?;
        let mut ids = Vec::new();
        for entry in snapshots.range((account.0, [0u8; 16])..=(account.0, [0xffu8; 16]))? {
            ids.push(SnapshotId::from_bytes(entry?.0.value().1));
        }
        ids
    };
    let mut deleted = 0;
    for id in ids {
        if delete_one(txn, seq, origin, account, id, false)? == Deletion::Deleted {
            deleted += 1;
        }
    }
    txn.open_table(DELETED_ACCOUNTS)?.insert(account.0, now_ms())?;
    *seq = seq.next();
    let change = change_record::Change::AccountDeleted(AccountDeleted {});
    let r = super::record(*seq, origin, account, change);
    txn.open_table(FEED)?
        .insert(seq.0, r.encode_to_vec().as_slice())?;
    Ok(deleted)
}

/// What deleting one snapshot found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Deletion {
    Deleted,
    AlreadyGone,
    /// Neither the snapshot nor its tombstone is here.
    Unknown,
}

/// Removes one snapshot, leaves its tombstone and numbers the deletion in
/// the feed as a change from `origin`. A mirrored deletion (`mirrored`) of
/// a snapshot this server never had still leaves the tombstone and the
/// record: the snapshot itself may be on its way by another link.
pub(super) fn delete_one(
    txn: &WriteTransaction,
    seq: &mut Seq,
    origin: &str,
    account: AccountId,
    id: SnapshotId,
    mirrored: bool,
) -> Result<Deletion, StoreError> {
    let key = (account.0, *id.as_bytes());
    let mut tombstones = txn.open_table(TOMBSTONES)?;
    if tombstones.get(key)?.is_some() {
        return Ok(Deletion::AlreadyGone);
    }
    let existed = txn.open_table(SNAPSHOTS)?.remove(key)?.is_some();
    if !existed && !mirrored {
        return Ok(Deletion::Unknown);
    }
    tombstones.insert(key, now_ms())?;
    *seq = seq.next();
    let change = change_record::Change::SnapshotDeleted(SnapshotDeleted { id: id.to_string() });
    let r = super::record(*seq, origin, account, change);
    txn.open_table(FEED)?
        .insert(seq.0, r.encode_to_vec().as_slice())?;
    Ok(if existed {
        Deletion::Deleted
    } else {
        Deletion::Unknown
    })
}

/// Whether a snapshot was deleted here: its mirrored record is dropped.
pub(super) fn tombstoned(txn: &WriteTransaction, account: u64, id: SnapshotId) -> Result<bool, StoreError> {
    Ok(txn
        .open_table(TOMBSTONES)?
        .get((account, *id.as_bytes()))?
        .is_some())
}

pub(super) fn decode_info(bytes: &[u8]) -> Result<SnapshotInfo, StoreError> {
    SnapshotInfo::decode(bytes)
        .map_err(|e| StoreError::Invalid(format!("stored snapshot record does not decode: {e}")))
}

pub use duplex_types::now_ms;
