//! What mirroring needs from the engine: the role, reading the change feed,
//! and applying a batch from another server together with the link's
//! checkpoint, in one transaction, so a mirror can die anywhere without
//! losing or duplicating anything.

use std::collections::BTreeSet;

use duplex_proto::v1::{ChangeRecord, Checkpoint, change_record};
use duplex_types::{AccountId, Epoch, Seq, SnapshotId};
use prost::Message;
use redb::WriteTransaction;
use redb::{ReadableDatabase, ReadableTable};

use super::packs::PackWriter;
use super::snapshots::{delete_one, tombstoned};
use super::tables::{CHECKPOINTS, DELETED_ACCOUNTS, FEED, META, SNAPSHOTS};
use super::{PutStats, Store, StoreError, index_chunks, record};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "primary" => Some(Role::Primary),
            "replica" => Some(Role::Replica),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleState {
    pub role: Role,
    pub epoch: Epoch,
    /// For a replica: the primary agents should use.
    pub primary: String,
}

/// What one feed range holds that a link has not applied yet.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Pending {
    pub records: u64,
    pub bytes: u64,
    pub oldest_ms: Option<i64>,
    pub accounts: BTreeSet<u64>,
}

/// At most this many records are scanned to measure lag.
const LAG_SCAN: usize = 100_000;

impl Store {
    pub fn role(&self) -> Result<Option<RoleState>, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let get = |k: &str| -> Result<Option<String>, StoreError> {
            Ok(meta
                .get(k)?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned()))
        };
        let Some(role) = get("role")?.as_deref().and_then(Role::parse) else {
            return Ok(None);
        };
        let epoch = get("epoch")?.and_then(|e| e.parse().ok()).unwrap_or(0);
        Ok(Some(RoleState {
            role,
            epoch: Epoch(epoch),
            primary: get("primary")?.unwrap_or_default(),
        }))
    }

    pub fn save_role(&self, state: &RoleState) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            meta.insert("role", state.role.as_str().as_bytes())?;
            meta.insert("epoch", state.epoch.0.to_string().as_bytes())?;
            meta.insert("primary", state.primary.as_bytes())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Up to `max` feed records after `after`, skipping those from `exclude_origin`.
    /// Also returns the last sequence looked at, so a reader skipping many
    /// records still moves on.
    pub fn feed_after(
        &self,
        after: Seq,
        exclude_origin: &str,
        max: usize,
    ) -> Result<(Vec<ChangeRecord>, Seq), StoreError> {
        let txn = self.db.begin_read()?;
        let feed = txn.open_table(FEED)?;
        let mut out = Vec::new();
        let mut last = after;
        for item in feed.range(after.0 + 1..)?.take(max * 4) {
            let (k, v) = item?;
            last = Seq(k.value());
            let rec = decode_record(v.value())?;
            if rec.origin != exclude_origin {
                out.push(rec);
                if out.len() >= max {
                    break;
                }
            }
        }
        Ok((out, last))
    }

    /// What a link at `applied` still has to carry (records not from `exclude_origin`).
    pub fn pending_after(&self, applied: Seq, exclude_origin: &str) -> Result<Pending, StoreError> {
        let txn = self.db.begin_read()?;
        let feed = txn.open_table(FEED)?;
        let mut pending = Pending::default();
        for item in feed.range(applied.0 + 1..)?.take(LAG_SCAN) {
            let (_, v) = item?;
            let rec = decode_record(v.value())?;
            if rec.origin == exclude_origin {
                continue;
            }
            pending.records += 1;
            pending.oldest_ms.get_or_insert(rec.time_unix_ms);
            pending.accounts.insert(rec.account_id);
            if let Some(change_record::Change::Chunk(c)) = &rec.change {
                pending.bytes += u64::from(c.stored_len);
            }
        }
        Ok(pending)
    }

    pub fn checkpoint(&self, source: &str) -> Result<Seq, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(Seq(txn
            .open_table(CHECKPOINTS)?
            .get(source)?
            .map_or(0, |v| v.value())))
    }

    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CHECKPOINTS)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (k, v) = item?;
            out.push(Checkpoint {
                source_id: k.value().to_owned(),
                seq: v.value(),
            });
        }
        Ok(out)
    }

    /// Commits a mirrored batch: the chunks written to `writer`, the
    /// snapshot records (new snapshots and deletions, in feed order), and
    /// the link's checkpoint, atomically. A snapshot deleted here before
    /// (a tombstone) is not added again. Each change
    /// keeps its origin, so it is never mirrored back there. A checkpoint
    /// that does not move forward is refused (a stale or duplicate batch).
    pub fn commit_mirror(
        &self,
        writer: &mut PackWriter,
        snapshots: &[ChangeRecord],
        checkpoint: &Checkpoint,
    ) -> Result<(PutStats, u64), StoreError> {
        let pending = writer.sync()?;
        let mut stats = PutStats::default();
        let mut added_snapshots = 0;
        self.write(|txn, seq| {
            let mut checkpoints = txn.open_table(CHECKPOINTS)?;
            let current = checkpoints
                .get(checkpoint.source_id.as_str())?
                .map_or(0, |v| v.value());
            if checkpoint.seq <= current {
                return Err(StoreError::Invalid(format!(
                    "checkpoint {} for source {} is not past {current}",
                    checkpoint.seq, checkpoint.source_id
                )));
            }
            checkpoints.insert(checkpoint.source_id.as_str(), checkpoint.seq)?;
            drop(checkpoints);
            stats = index_chunks(txn, seq, &pending, &checkpoint.source_id)?;
            for rec in snapshots {
                added_snapshots += u64::from(apply_record(txn, seq, rec)?);
            }
            Ok(())
        })?;
        Ok((stats, added_snapshots))
    }
}

/// Applies one mirrored snapshot record (a new snapshot or a deletion);
/// true when it added a snapshot. Each keeps its origin.
fn apply_record(txn: &WriteTransaction, seq: &mut Seq, rec: &ChangeRecord) -> Result<bool, StoreError> {
    let account = AccountId(rec.account_id);
    let info = match &rec.change {
        Some(change_record::Change::Snapshot(info)) => info,
        Some(change_record::Change::SnapshotDeleted(gone)) => {
            let id = SnapshotId::parse(&gone.id).map_err(|e| StoreError::Invalid(e.to_string()))?;
            delete_one(txn, seq, &rec.origin, account, id, true)?;
            return Ok(false);
        }
        Some(change_record::Change::AccountDeleted(_)) => {
            super::snapshots::delete_account_in(txn, seq, &rec.origin, account)?;
            return Ok(false);
        }
        _ => return Err(StoreError::Invalid("a snapshot item carries no snapshot".into())),
    };
    let id = SnapshotId::parse(&info.id).map_err(|e| StoreError::Invalid(e.to_string()))?;
    // The same checks an agent's commit passes.
    super::snapshots::check_record(&info.manifest_chunks, &info.summary)?;
    super::references::blob_ids(&info.reference_blobs)?;
    let key = (account.0, *id.as_bytes());
    let account_gone = txn.open_table(DELETED_ACCOUNTS)?.get(account.0)?.is_some();
    if account_gone || tombstoned(txn, account.0, id)? || txn.open_table(SNAPSHOTS)?.get(key)?.is_some() {
        return Ok(false);
    }
    txn.open_table(SNAPSHOTS)?
        .insert(key, info.encode_to_vec().as_slice())?;
    *seq = seq.next();
    let r = record(
        *seq,
        &rec.origin,
        account,
        change_record::Change::Snapshot(info.clone()),
    );
    txn.open_table(FEED)?
        .insert(seq.0, r.encode_to_vec().as_slice())?;
    super::usage::note_snapshot(txn, account, info.time_unix_ms)?;
    Ok(true)
}

pub(super) fn decode_record(bytes: &[u8]) -> Result<ChangeRecord, StoreError> {
    ChangeRecord::decode(bytes)
        .map_err(|e| StoreError::Invalid(format!("stored feed record does not decode: {e}")))
}
