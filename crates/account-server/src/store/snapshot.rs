//! State snapshots: the whole replicated state at one LSN, zstd-compressed.
//! A new slave (or one whose position the master trimmed) installs one and
//! then follows the log from its LSN; the master writes one to disk on
//! every role change and periodically, and trims the log behind it.

use std::path::{Path, PathBuf};

use duplex_proto::v1::{
    AccountKeys, AccountRecord, EpochStart, KeepPolicy, KeyRecord, LogEntry, ServerInfo, SetGroup,
    SetGroupPolicy, StateSnapshot,
};
use duplex_types::Lsn;
use prost::Message;
use redb::{ReadableDatabase, ReadableTable};

use super::meta::{self, BASE_LSN, BOOTSTRAPS, LOG_BYTES, SNAPSHOT_LSN};
use super::tables::{
    ACCOUNT_KEYS, ACCOUNT_NAMES, ACCOUNTS, EPOCHS, GROUP_POLICIES, GROUPS, HOMES, KEYS, LOG, META, RETIRED,
    STORAGE, TOKENS,
};
use super::{AccountStore, decode};
use crate::error::AccountError;

const ZSTD_LEVEL: i32 = 3;

impl AccountStore {
    /// The replicated state as of one consistent read.
    pub fn state_snapshot(&self) -> Result<StateSnapshot, AccountError> {
        let txn = self.db.begin_read()?;
        let log = txn.open_table(LOG)?;
        let meta_table = txn.open_table(META)?;
        let base = meta::get_u64(&meta_table, BASE_LSN)?;
        let last = log.last()?;
        let (lsn, epoch) = match last {
            Some((k, v)) => {
                let entry = LogEntry::decode(v.value()).map_err(|e| AccountError::Corrupt(e.to_string()))?;
                (k.value(), entry.epoch)
            }
            None => (base, 0),
        };
        let mut snapshot = StateSnapshot {
            lsn,
            epoch,
            log_bytes: meta::get_u64(&meta_table, LOG_BYTES)?,
            ..Default::default()
        };
        for item in txn.open_table(ACCOUNTS)?.iter()? {
            snapshot.accounts.push(decode::<AccountRecord>(item?.1.value())?);
        }
        for item in txn.open_table(GROUPS)?.iter()? {
            let (k, v) = item?;
            snapshot.groups.push(SetGroup {
                name: k.value().to_owned(),
                enabled: v.value(),
            });
        }
        for item in txn.open_table(GROUP_POLICIES)?.iter()? {
            let (k, v) = item?;
            snapshot.group_policies.push(SetGroupPolicy {
                group: k.value().to_owned(),
                keep: Some(decode::<KeepPolicy>(v.value())?),
            });
        }
        for item in txn.open_table(STORAGE)?.iter()? {
            snapshot
                .storage_servers
                .push(decode::<ServerInfo>(item?.1.value())?);
        }
        for item in txn.open_table(RETIRED)?.iter()? {
            snapshot
                .retired_storage_servers
                .push(decode::<ServerInfo>(item?.1.value())?);
        }
        for item in txn.open_table(ACCOUNT_KEYS)?.iter()? {
            let (k, v) = item?;
            let account = k.value().0;
            let key = decode::<KeyRecord>(v.value())?;
            match snapshot.account_keys.last_mut() {
                Some(last) if last.account_id == account => last.keys.push(key),
                _ => snapshot.account_keys.push(AccountKeys {
                    account_id: account,
                    keys: vec![key],
                }),
            }
        }
        if let Some(v) = txn.open_table(KEYS)?.get("ticket_secret")? {
            snapshot.ticket_secret = v.value().to_vec();
        }
        for item in txn.open_table(EPOCHS)?.iter()? {
            let (k, v) = item?;
            snapshot.epochs.push(EpochStart {
                epoch: k.value(),
                first_lsn: v.value(),
            });
        }
        if snapshot.epoch == 0 {
            snapshot.epoch = snapshot.epochs.last().map_or(0, |e| e.epoch);
        }
        Ok(snapshot)
    }

    /// Replaces all replicated state (and the log) with `snapshot`.
    pub fn install_snapshot(&self, snapshot: &StateSnapshot) -> Result<(), AccountError> {
        super::apply::check_snapshot(snapshot)
            .map_err(|why| AccountError::Invalid(format!("snapshot at LSN {}: {why}", snapshot.lsn)))?;
        let txn = self.db.begin_write()?;
        txn.delete_table(ACCOUNTS)?;
        txn.delete_table(STORAGE)?;
        txn.delete_table(RETIRED)?;
        txn.delete_table(KEYS)?;
        txn.delete_table(ACCOUNT_KEYS)?;
        txn.delete_table(ACCOUNT_NAMES)?;
        txn.delete_table(TOKENS)?;
        txn.delete_table(GROUPS)?;
        txn.delete_table(GROUP_POLICIES)?;
        txn.delete_table(EPOCHS)?;
        txn.delete_table(HOMES)?;
        txn.delete_table(LOG)?;
        {
            let mut accounts = txn.open_table(ACCOUNTS)?;
            let mut names = txn.open_table(ACCOUNT_NAMES)?;
            let mut tokens = txn.open_table(TOKENS)?;
            let mut homes: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
            for a in &snapshot.accounts {
                if a.deleted {
                    // Kept for its id only, as `apply` leaves it.
                    accounts.insert(a.id, a.encode_to_vec().as_slice())?;
                    continue;
                }
                *homes.entry(a.home_id.as_str()).or_default() += 1;
                let hash: [u8; 32] = a
                    .token_hash
                    .as_slice()
                    .try_into()
                    .map_err(|_| AccountError::Corrupt("snapshot token hash is not 32 bytes".into()))?;
                accounts.insert(a.id, a.encode_to_vec().as_slice())?;
                names.insert(a.name.as_str(), a.id)?;
                tokens.insert(hash, a.id)?;
            }
            let mut home_table = txn.open_table(HOMES)?;
            for (home, count) in homes {
                home_table.insert(home, count)?;
            }
            let mut groups = txn.open_table(GROUPS)?;
            for g in &snapshot.groups {
                groups.insert(g.name.as_str(), g.enabled)?;
            }
            let mut policies = txn.open_table(GROUP_POLICIES)?;
            for p in &snapshot.group_policies {
                let keep = p.keep.unwrap_or_default();
                policies.insert(p.group.as_str(), keep.encode_to_vec().as_slice())?;
            }
            let mut storage = txn.open_table(STORAGE)?;
            for s in &snapshot.storage_servers {
                storage.insert(s.id.as_str(), s.encode_to_vec().as_slice())?;
            }
            let mut retired = txn.open_table(RETIRED)?;
            for s in &snapshot.retired_storage_servers {
                retired.insert(s.id.as_str(), s.encode_to_vec().as_slice())?;
            }
            // Opened even when empty: readers expect every table to exist.
            let mut keys = txn.open_table(KEYS)?;
            if !snapshot.ticket_secret.is_empty() {
                keys.insert("ticket_secret", snapshot.ticket_secret.as_slice())?;
            }
            let mut account_keys = txn.open_table(ACCOUNT_KEYS)?;
            for a in &snapshot.account_keys {
                for key in &a.keys {
                    super::keys::check(key)?;
                    account_keys.insert((a.account_id, key.id.as_str()), key.encode_to_vec().as_slice())?;
                }
            }
            let mut epochs = txn.open_table(EPOCHS)?;
            for e in &snapshot.epochs {
                epochs.insert(e.epoch, e.first_lsn)?;
            }
            txn.open_table(LOG)?;
            let mut meta_table = txn.open_table(META)?;
            meta::put_u64(&mut meta_table, BASE_LSN, snapshot.lsn)?;
            meta::put_u64(&mut meta_table, LOG_BYTES, snapshot.log_bytes)?;
        }
        meta::add_u64(&txn, BOOTSTRAPS, 1)?;
        txn.commit()?;
        Ok(())
    }

    /// Writes a compressed snapshot to `dir` (durably), records its LSN, and
    /// removes older snapshot files. Returns its LSN and path.
    pub fn write_snapshot_file(&self, dir: &Path) -> Result<(Lsn, PathBuf), AccountError> {
        let snapshot = self.state_snapshot()?;
        let bytes = compress(&snapshot)?;
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(format!("state-{:020}.pb.zst", snapshot.lsn));
        let tmp = path.with_extension("tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&bytes).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
        let txn = self.db.begin_write()?;
        meta::put_u64(&mut txn.open_table(META)?, SNAPSHOT_LSN, snapshot.lsn)?;
        txn.commit()?;
        remove_older(dir, &path);
        Ok((Lsn(snapshot.lsn), path))
    }
}

pub fn compress(snapshot: &StateSnapshot) -> Result<Vec<u8>, AccountError> {
    zstd::bulk::compress(&snapshot.encode_to_vec(), ZSTD_LEVEL)
        .map_err(|e| AccountError::Corrupt(format!("compressing snapshot: {e}")))
}

/// Largest snapshot a slave takes, compressed or not: far above a million
/// accounts with their keys, and a bound on what a bad master can make a
/// slave allocate.
pub const MAX_SNAPSHOT_BYTES: u64 = 4 << 30;

pub fn decompress(bytes: &[u8]) -> Result<StateSnapshot, AccountError> {
    use std::io::Read;
    let decoder = zstd::stream::read::Decoder::new(bytes)
        .map_err(|e| AccountError::Invalid(format!("snapshot does not decompress: {e}")))?;
    let mut raw = Vec::new();
    decoder
        .take(MAX_SNAPSHOT_BYTES + 1)
        .read_to_end(&mut raw)
        .map_err(|e| AccountError::Invalid(format!("snapshot does not decompress: {e}")))?;
    if raw.len() as u64 > MAX_SNAPSHOT_BYTES {
        return Err(AccountError::Invalid(format!(
            "snapshot decompresses to more than {MAX_SNAPSHOT_BYTES} bytes"
        )));
    }
    StateSnapshot::decode(raw.as_slice())
        .map_err(|e| AccountError::Invalid(format!("snapshot does not decode: {e}")))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AccountError + '_ {
    move |e| AccountError::Corrupt(format!("{}: {e}", path.display()))
}

/// Keeps the two newest snapshot files.
fn remove_older(dir: &Path, newest: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "zst") && p.as_path() != newest)
        .collect();
    files.sort();
    for old in files.iter().rev().skip(1) {
        let _ = std::fs::remove_file(old);
    }
}
