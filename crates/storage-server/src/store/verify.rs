//! Reading chunks back and checking each payload against the hash
//! recorded when it was stored. The server cannot decrypt, so this is the
//! ciphertext's integrity; the agent's `verify --read-data` checks the
//! plaintext.

use std::collections::{BTreeMap, HashSet};

use duplex_types::{AccountId, ChunkId};
use redb::{ReadableDatabase, ReadableTable};

use super::tables::{CHUNKS, SNAPSHOTS};
use super::{Store, StoreError};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub missing: Vec<ChunkId>,
    pub corrupt: Vec<ChunkId>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.corrupt.is_empty()
    }
}

impl Store {
    /// Checks one snapshot's manifest chunks or, with `None`, every chunk
    /// the account holds.
    pub fn verify(&self, account: AccountId, snapshot: Option<&str>) -> Result<VerifyReport, StoreError> {
        let ids = match snapshot {
            Some(query) => self.referenced(account, &self.get_snapshot(account, query)?)?,
            None => self.account_chunks(account)?,
        };
        self.verify_ids(account, ids)
    }

    /// Checks exactly `ids` (each once).
    pub fn verify_ids(&self, account: AccountId, mut ids: Vec<ChunkId>) -> Result<VerifyReport, StoreError> {
        ids.sort_unstable();
        ids.dedup();
        let mut report = VerifyReport::default();
        for id in ids {
            self.verify_one(account, id, &mut report)?;
        }
        Ok(report)
    }

    fn verify_one(
        &self,
        account: AccountId,
        id: ChunkId,
        report: &mut VerifyReport,
    ) -> Result<(), StoreError> {
        report.chunks_checked += 1;
        match self.read_chunk(account, id) {
            Ok(Some(c)) => report.bytes_checked += c.data.len() as u64,
            Ok(None) => report.missing.push(id),
            Err(StoreError::Corrupt { .. }) => report.corrupt.push(id),
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Checks an account for an operator: every chunk it holds must match
    /// its hash, and every chunk a snapshot names (manifest, reference
    /// blobs and the ids in them) must be present.
    /// Returns the report and how many snapshots were seen.
    pub fn verify_snapshots(&self, account: AccountId) -> Result<(VerifyReport, u64), StoreError> {
        let snapshots = self.list_snapshots(account)?;
        let mut ids = self.account_chunks(account)?;
        for info in &snapshots {
            ids.extend(self.referenced(account, info)?);
        }
        Ok((self.verify_ids(account, ids)?, snapshots.len() as u64))
    }

    /// The snapshots of `account` that name each of `ids`, by snapshot id.
    pub fn snapshots_naming(
        &self,
        account: AccountId,
        ids: &[ChunkId],
    ) -> Result<BTreeMap<ChunkId, Vec<String>>, StoreError> {
        let mut out: BTreeMap<ChunkId, Vec<String>> = ids.iter().map(|&id| (id, Vec::new())).collect();
        for info in self.list_snapshots(account)? {
            let named: HashSet<ChunkId> = self.referenced(account, &info)?.into_iter().collect();
            for (id, names) in out.iter_mut() {
                if named.contains(id) {
                    names.push(info.id.clone());
                }
            }
        }
        Ok(out)
    }

    /// Accounts with at least one snapshot here.
    pub fn accounts_with_snapshots(&self) -> Result<Vec<AccountId>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        let mut out: Vec<AccountId> = Vec::new();
        for entry in table.iter()? {
            let (k, _) = entry?;
            let account = AccountId(k.value().0);
            if out.last() != Some(&account) {
                out.push(account);
            }
        }
        Ok(out)
    }

    fn account_chunks(&self, account: AccountId) -> Result<Vec<ChunkId>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CHUNKS)?;
        let mut ids = Vec::new();
        for entry in table.range((account.0, [0u8; 32])..=(account.0, [0xffu8; 32]))? {
            let (k, _) = entry?;
            ids.push(ChunkId::from(k.value().1));
        }
        Ok(ids)
    }
}

impl Store {
    /// Every chunk a snapshot names: its manifest chunks, its reference
    /// blobs and their ids (a snapshot from before reference blobs names
    /// only its manifest). A blob that is missing or damaged is itself
    /// reported by the check; the ids in it cannot be.
    fn referenced(
        &self,
        account: AccountId,
        info: &duplex_proto::v1::SnapshotInfo,
    ) -> Result<Vec<ChunkId>, StoreError> {
        let mut ids: Vec<ChunkId> = info
            .manifest_chunks
            .iter()
            .map(|c| ChunkId::from_bytes(c).map_err(|e| StoreError::Invalid(e.to_string())))
            .collect::<Result<_, _>>()?;
        let txn = self.db.begin_read()?;
        let chunks = txn.open_table(CHUNKS)?;
        for blob in super::references::blob_ids(&info.reference_blobs)? {
            ids.push(blob);
            match super::references::read_blob(&chunks, &self.packs_dir, account, blob) {
                Ok(Some(named)) => ids.extend(named),
                Ok(None) | Err(StoreError::Corrupt { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(ids)
    }
}
