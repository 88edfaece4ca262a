//! Local, unreplicated facts kept in the META table: the server's role and
//! epoch, and counters that describe its log.

use duplex_types::Epoch;
use redb::{ReadableDatabase, ReadableTable, Table, WriteTransaction};

use super::AccountStore;
use super::tables::META;
use crate::error::AccountError;

pub const BASE_LSN: &str = "base_lsn";
pub const LOG_BYTES: &str = "log_bytes";
pub const BOOTSTRAPS: &str = "bootstraps";
pub const DIVERGENT: &str = "divergent_entries";
pub const DIVERGENCE_REPORT: &str = "divergence_report";
pub const SNAPSHOT_LSN: &str = "snapshot_lsn";
const ROLE: &str = "role";
const EPOCH: &str = "epoch";
const MASTER: &str = "master";

/// The role this server last held, kept across restarts so a restarted
/// master does not forget it was demoted (and vice versa).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleState {
    pub is_master: bool,
    pub epoch: Epoch,
    /// The master a slave follows.
    pub master: String,
}

pub fn get_u64(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<u64, AccountError> {
    let value = table.get(key)?.map(|v| v.value().to_vec());
    match value {
        None => Ok(0),
        Some(bytes) => <[u8; 8]>::try_from(bytes.as_slice())
            .map(u64::from_le_bytes)
            .map_err(|_| AccountError::Corrupt(format!("meta {key} is not a u64"))),
    }
}

pub fn put_u64(
    table: &mut Table<&'static str, &'static [u8]>,
    key: &str,
    value: u64,
) -> Result<(), AccountError> {
    table.insert(key, value.to_le_bytes().as_slice())?;
    Ok(())
}

pub fn add_u64(txn: &WriteTransaction, key: &str, delta: u64) -> Result<(), AccountError> {
    let mut meta = txn.open_table(META)?;
    let current = get_u64(&meta, key)?;
    put_u64(&mut meta, key, current + delta)
}

fn get_str(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<String>, AccountError> {
    Ok(table
        .get(key)?
        .map(|v| String::from_utf8_lossy(v.value()).into_owned()))
}

impl AccountStore {
    /// The stored role, or `None` on a server that never held one.
    pub fn role(&self) -> Result<Option<RoleState>, AccountError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let Some(role) = get_str(&meta, ROLE)? else {
            return Ok(None);
        };
        Ok(Some(RoleState {
            is_master: role == "master",
            epoch: Epoch(get_u64(&meta, EPOCH)?),
            master: get_str(&meta, MASTER)?.unwrap_or_default(),
        }))
    }

    pub fn save_role(&self, state: &RoleState) -> Result<(), AccountError> {
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let role = if state.is_master { "master" } else { "slave" };
            meta.insert(ROLE, role.as_bytes())?;
            put_u64(&mut meta, EPOCH, state.epoch.0)?;
            meta.insert(MASTER, state.master.as_bytes())?;
        }
        txn.commit()?;
        Ok(())
    }

    pub fn meta_u64(&self, key: &str) -> Result<u64, AccountError> {
        let txn = self.db.begin_read()?;
        get_u64(&txn.open_table(META)?, key)
    }

    pub fn meta_str(&self, key: &str) -> Result<String, AccountError> {
        let txn = self.db.begin_read()?;
        Ok(get_str(&txn.open_table(META)?, key)?.unwrap_or_default())
    }

    /// Records divergent entries found at rejoin: their count and the report file.
    pub fn record_divergence(&self, count: u64, report: &str) -> Result<(), AccountError> {
        let txn = self.db.begin_write()?;
        add_u64(&txn, DIVERGENT, count)?;
        txn.open_table(META)?
            .insert(DIVERGENCE_REPORT, report.as_bytes())?;
        txn.commit()?;
        Ok(())
    }
}
