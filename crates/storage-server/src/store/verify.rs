//! Reading chunks back and checking them against their ids.

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
    /// Checks one snapshot (its manifest and every chunk it names) or, with
    /// `None`, every chunk the account holds.
    pub fn verify(&self, account: AccountId, snapshot: Option<&str>) -> Result<VerifyReport, StoreError> {
        let ids = match snapshot {
            Some(query) => {
                let info = self.get_snapshot(account, query)?;
                let manifest_ids = info
                    .manifest_chunks
                    .iter()
                    .map(|c| ChunkId::from_bytes(c).map_err(|e| StoreError::Invalid(e.to_string())))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut ids = manifest_ids.clone();
                match self.load_manifest(account, &manifest_ids) {
                    Ok(manifest) => ids.extend(super::snapshots::check_manifest(&manifest)?.2),
                    Err(StoreError::MissingChunks { .. } | StoreError::Corrupt { .. }) => {}
                    Err(e) => return Err(e),
                }
                ids.sort_unstable();
                ids.dedup();
                ids
            }
            None => self.account_chunks(account)?,
        };
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
        let chunk = match self.read_chunk(account, id) {
            Ok(Some(c)) => c,
            Ok(None) => {
                report.missing.push(id);
                return Ok(());
            }
            Err(StoreError::Corrupt { .. }) => {
                report.corrupt.push(id);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        report.bytes_checked += u64::from(chunk.raw_len);
        match super::decode_chunk(chunk.compression, chunk.raw_len as usize, &chunk.data) {
            Ok(raw) if ChunkId::of(&raw) == id => {}
            _ => report.corrupt.push(id),
        }
        Ok(())
    }

    /// Checks every snapshot of the account: each manifest and every chunk
    /// it names must be present and hash to its id. Returns the report and
    /// how many snapshots were checked.
    pub fn verify_snapshots(&self, account: AccountId) -> Result<(VerifyReport, u64), StoreError> {
        let snapshots = self.list_snapshots(account)?;
        let mut ids = Vec::new();
        for info in &snapshots {
            let manifest_ids = info
                .manifest_chunks
                .iter()
                .map(|c| ChunkId::from_bytes(c).map_err(|e| StoreError::Invalid(e.to_string())))
                .collect::<Result<Vec<_>, _>>()?;
            ids.extend(manifest_ids.iter().copied());
            match self.load_manifest(account, &manifest_ids) {
                Ok(manifest) => ids.extend(super::snapshots::check_manifest(&manifest)?.2),
                Err(StoreError::MissingChunks { .. } | StoreError::Corrupt { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        ids.sort_unstable();
        ids.dedup();
        let mut report = VerifyReport::default();
        for id in ids {
            self.verify_one(account, id, &mut report)?;
        }
        Ok((report, snapshots.len() as u64))
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
