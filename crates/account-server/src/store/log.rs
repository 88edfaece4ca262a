//! The transaction log: appending (master writes and slave replays alike),
//! reading ranges for replication, the epoch history, and trimming.

use duplex_proto::v1::{EpochStart, LogEntry};
use duplex_types::Lsn;
use prost::Message;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, WriteTransaction};

use super::meta::{self, BASE_LSN, LOG_BYTES};
use super::tables::{EPOCHS, LOG, META};
use super::{AccountStore, apply};
use crate::error::AccountError;

/// The last LSN written: the log's last entry, or the snapshot it starts from.
pub fn last_lsn_in(txn: &WriteTransaction) -> Result<Lsn, AccountError> {
    let last = txn.open_table(LOG)?.last()?.map(|(k, _)| k.value());
    let base = meta::get_u64(&txn.open_table(META)?, BASE_LSN)?;
    Ok(Lsn(last.unwrap_or(0).max(base)))
}

/// Applies `entry` and appends it to the log. Refuses a gap or an epoch
/// that goes backwards: the log is a single, ordered history.
pub fn append_in(txn: &WriteTransaction, entry: &LogEntry) -> Result<(), AccountError> {
    let expected = last_lsn_in(txn)?.next();
    if entry.lsn != expected.0 {
        return Err(AccountError::Precondition(format!(
            "log entry {} does not follow {}",
            entry.lsn,
            expected.0 - 1
        )));
    }
    let mut epochs = txn.open_table(EPOCHS)?;
    let last_epoch = epochs.last()?.map(|(k, _)| k.value());
    match last_epoch {
        Some(e) if entry.epoch < e => {
            return Err(AccountError::Precondition(format!(
                "log entry {} has epoch {} below the log's epoch {e}",
                entry.lsn, entry.epoch
            )));
        }
        Some(e) if entry.epoch == e => {}
        _ => {
            epochs.insert(entry.epoch, entry.lsn)?;
        }
    }
    drop(epochs);
    apply(txn, entry)?;
    let bytes = entry.encode_to_vec();
    txn.open_table(LOG)?.insert(entry.lsn, bytes.as_slice())?;
    meta::add_u64(txn, LOG_BYTES, bytes.len() as u64)
}

impl AccountStore {
    pub fn last_lsn(&self) -> Result<Lsn, AccountError> {
        let txn = self.db.begin_read()?;
        let last = txn.open_table(LOG)?.last()?.map(|(k, _)| k.value());
        let base = meta::get_u64(&txn.open_table(META)?, BASE_LSN)?;
        Ok(Lsn(last.unwrap_or(0).max(base)))
    }

    /// The oldest LSN still in the log (entries before it live only in a snapshot).
    pub fn log_start(&self) -> Result<Lsn, AccountError> {
        let txn = self.db.begin_read()?;
        let first = txn.open_table(LOG)?.first()?.map(|(k, _)| k.value());
        let base = meta::get_u64(&txn.open_table(META)?, BASE_LSN)?;
        Ok(Lsn(first.unwrap_or(base + 1)))
    }

    /// A slave's replay of a batch from its master: applied and durable together.
    pub fn append_entries(&self, entries: &[LogEntry]) -> Result<(), AccountError> {
        let txn = self.db.begin_write()?;
        for entry in entries {
            append_in(&txn, entry)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Up to `max` entries after `after`, and their encoded size.
    pub fn entries_after(&self, after: Lsn, max: usize) -> Result<Vec<LogEntry>, AccountError> {
        let txn = self.db.begin_read()?;
        let log = txn.open_table(LOG)?;
        let mut out = Vec::new();
        for item in log.range(after.0 + 1..)?.take(max) {
            let (_, v) = item?;
            out.push(LogEntry::decode(v.value()).map_err(|e| AccountError::Corrupt(e.to_string()))?);
        }
        Ok(out)
    }

    /// Encoded bytes and the time of the oldest of the entries after
    /// `after` (at most `LAG_SCAN` of them), for a slave's lag as the
    /// master sees it.
    pub fn pending_after(&self, after: Lsn) -> Result<(u64, Option<i64>), AccountError> {
        const LAG_SCAN: usize = 100_000;
        let txn = self.db.begin_read()?;
        let log = txn.open_table(LOG)?;
        let mut bytes = 0u64;
        let mut oldest = None;
        for item in log.range(after.0 + 1..)?.take(LAG_SCAN) {
            let (_, v) = item?;
            bytes += v.value().len() as u64;
            if oldest.is_none() {
                let entry = LogEntry::decode(v.value()).map_err(|e| AccountError::Corrupt(e.to_string()))?;
                oldest = Some(entry.time_unix_ms);
            }
        }
        Ok((bytes, oldest))
    }

    /// The epoch of the entry at `lsn`, if the log still holds it; the
    /// snapshot's epoch for the snapshot's own LSN.
    pub fn epoch_at(&self, lsn: Lsn) -> Result<Option<u64>, AccountError> {
        if lsn.0 == 0 {
            return Ok(Some(0));
        }
        let txn = self.db.begin_read()?;
        let entry = txn.open_table(LOG)?.get(lsn.0)?.map(|v| v.value().to_vec());
        if let Some(bytes) = entry {
            let entry =
                LogEntry::decode(bytes.as_slice()).map_err(|e| AccountError::Corrupt(e.to_string()))?;
            return Ok(Some(entry.epoch));
        }
        let meta = txn.open_table(META)?;
        if meta::get_u64(&meta, BASE_LSN)? == lsn.0 {
            return Ok(epoch_in(&self.epoch_history()?, lsn));
        }
        Ok(None)
    }

    pub fn epoch_history(&self) -> Result<Vec<EpochStart>, AccountError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(EPOCHS)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (k, v) = item?;
            out.push(EpochStart {
                epoch: k.value(),
                first_lsn: v.value(),
            });
        }
        Ok(out)
    }

    /// Drops log entries before `lsn`; they stay covered by the snapshot.
    pub fn trim_log_before(&self, lsn: Lsn) -> Result<u64, AccountError> {
        let txn = self.db.begin_write()?;
        let removed = {
            let mut log = txn.open_table(LOG)?;
            let before = log.len()?;
            log.retain_in(..lsn.0, |_, _| false)?;
            before - log.len()?
        };
        if removed > 0 {
            let mut meta_table = txn.open_table(META)?;
            let base = meta::get_u64(&meta_table, BASE_LSN)?;
            meta::put_u64(&mut meta_table, BASE_LSN, base.max(lsn.0.saturating_sub(1)))?;
        }
        txn.commit()?;
        Ok(removed)
    }
}

/// Which epoch wrote `lsn`, according to an epoch history.
pub fn epoch_in(history: &[EpochStart], lsn: Lsn) -> Option<u64> {
    history
        .iter()
        .rev()
        .find(|e| e.first_lsn <= lsn.0)
        .map(|e| e.epoch)
}
