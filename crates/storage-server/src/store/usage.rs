//! Per-account usage: the chunk bytes an account holds here and the time
//! of its newest snapshot. Kept in its own table and updated in the same
//! transaction as the chunks and snapshots it counts, so `/metrics` reads
//! one row per account instead of scanning the chunk index.

use std::collections::BTreeMap;

use duplex_types::AccountId;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};

use super::tables::{CHUNKS, SNAPSHOTS};
use super::{Store, StoreError};

/// account → (chunk bytes stored, newest snapshot time in unix ms, 0: none).
pub const ACCOUNTS: TableDefinition<u64, (u64, i64)> = TableDefinition::new("account_usage");

/// What one account uses on this server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccountUsage {
    pub account: AccountId,
    pub stored_bytes: u64,
    /// 0 while the account has no snapshot here.
    pub last_backup_unix_ms: i64,
}

/// Adds newly indexed chunk bytes, by account.
pub(super) fn add_bytes(txn: &WriteTransaction, added: &BTreeMap<u64, u64>) -> Result<(), StoreError> {
    let mut table = txn.open_table(ACCOUNTS)?;
    for (&account, &bytes) in added {
        let (stored, last) = table.get(account)?.map_or((0, 0), |v| v.value());
        table.insert(account, (stored + bytes, last))?;
    }
    Ok(())
}

/// Takes swept chunk bytes off an account's usage.
pub(super) fn sub_bytes(txn: &WriteTransaction, account: AccountId, freed: u64) -> Result<(), StoreError> {
    if freed == 0 {
        return Ok(());
    }
    let mut table = txn.open_table(ACCOUNTS)?;
    let (stored, last) = table.get(account.0)?.map_or((0, 0), |v| v.value());
    table.insert(account.0, (stored.saturating_sub(freed), last))?;
    Ok(())
}

/// Refuses a commit that took `account` past `quota` (its usage row
/// already counts the `adding` bytes of this commit).
pub(super) fn check_quota(
    txn: &WriteTransaction,
    account: AccountId,
    adding: u64,
    quota: u64,
) -> Result<(), StoreError> {
    let (stored, _) = txn
        .open_table(ACCOUNTS)?
        .get(account.0)?
        .map_or((0, 0), |v| v.value());
    if stored <= quota {
        return Ok(());
    }
    Err(StoreError::QuotaExceeded {
        quota,
        stored: stored - adding,
        adding,
    })
}

/// Records a snapshot's time if it is the account's newest.
pub(super) fn note_snapshot(
    txn: &WriteTransaction,
    account: AccountId,
    time_unix_ms: i64,
) -> Result<(), StoreError> {
    let mut table = txn.open_table(ACCOUNTS)?;
    let (stored, last) = table.get(account.0)?.map_or((0, 0), |v| v.value());
    table.insert(account.0, (stored, last.max(time_unix_ms)))?;
    Ok(())
}

/// Fills the table from the chunk index and the snapshots on a data dir
/// written before it existed; a no-op once it holds anything.
pub(super) fn backfill(txn: &WriteTransaction) -> Result<(), StoreError> {
    let mut table = txn.open_table(ACCOUNTS)?;
    if !table.is_empty()? {
        return Ok(());
    }
    let mut usage: BTreeMap<u64, (u64, i64)> = BTreeMap::new();
    for entry in txn.open_table(CHUNKS)?.iter()? {
        let (k, v) = entry?;
        usage.entry(k.value().0).or_default().0 += u64::from(v.value().2);
    }
    for entry in txn.open_table(SNAPSHOTS)?.iter()? {
        let (k, v) = entry?;
        let info = super::snapshots::decode_info(v.value())?;
        let last = &mut usage.entry(k.value().0).or_default().1;
        *last = (*last).max(info.time_unix_ms);
    }
    for (account, value) in usage {
        table.insert(account, value)?;
    }
    Ok(())
}

impl Store {
    /// Every account's usage here, in account order.
    pub fn usage(&self) -> Result<Vec<AccountUsage>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ACCOUNTS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            let (stored_bytes, last_backup_unix_ms) = v.value();
            out.push(AccountUsage {
                account: AccountId(k.value()),
                stored_bytes,
                last_backup_unix_ms,
            });
        }
        Ok(out)
    }

    /// How many snapshots each account has here.
    pub fn snapshot_counts(&self) -> Result<BTreeMap<u64, u64>, StoreError> {
        let txn = self.db.begin_read()?;
        let mut counts = BTreeMap::new();
        for entry in txn.open_table(SNAPSHOTS)?.iter()? {
            let (k, _) = entry?;
            *counts.entry(k.value().0).or_default() += 1;
        }
        Ok(counts)
    }
}
