//! Accounts' wrapped encryption keys. The agent creates the master key and
//! wraps it; the server stores, replicates and hands back records it
//! cannot open. Each change is a log entry like any other, so a promoted
//! slave serves the same keys.

use duplex_proto::v1::log_entry::Mutation;
use duplex_proto::v1::{KeyRecord, PutAccountKey, RemoveAccountKey};
use duplex_types::Epoch;
use duplex_types::sealed::{KeyShape, MAX_KEYS_PER_ACCOUNT, check_key_record};
use redb::{ReadableTable, WriteTransaction};

use super::tables::{ACCOUNT_KEYS, ACCOUNTS};
use super::{AccountStore, decode};
use crate::error::AccountError;

/// The one validation of a key record, for the master's write and a
/// slave's apply alike.
pub fn check(key: &KeyRecord) -> Result<(), AccountError> {
    check_key_record(&KeyShape {
        id: &key.id,
        salt: &key.salt,
        nonce: &key.nonce,
        wrapped: &key.wrapped,
        m_cost_kib: key.m_cost_kib,
        t_cost: key.t_cost,
        p_cost: key.p_cost,
        format_version: key.format_version,
    })
    .map_err(AccountError::from)
}

/// An account's key records, in id order.
pub fn keys_in(
    table: &impl ReadableTable<(u64, &'static str), &'static [u8]>,
    account: u64,
) -> Result<Vec<KeyRecord>, AccountError> {
    let mut out = Vec::new();
    for item in table.range((account, "")..(account + 1, ""))? {
        out.push(decode::<KeyRecord>(item?.1.value())?);
    }
    Ok(out)
}

/// The effect of a key entry on the tables.
pub fn apply_put(txn: &WriteTransaction, p: &PutAccountKey) -> Result<(), AccountError> {
    let key = p
        .key
        .as_ref()
        .ok_or_else(|| AccountError::Invalid("key entry without a key".into()))?;
    check(key)?;
    if txn.open_table(ACCOUNTS)?.get(p.account_id)?.is_none() {
        return Err(AccountError::NotFound(format!("account {}", p.account_id)));
    }
    let mut table = txn.open_table(ACCOUNT_KEYS)?;
    table.insert(
        (p.account_id, key.id.as_str()),
        prost::Message::encode_to_vec(key).as_slice(),
    )?;
    Ok(())
}

pub fn apply_remove(txn: &WriteTransaction, r: &RemoveAccountKey) -> Result<(), AccountError> {
    txn.open_table(ACCOUNT_KEYS)?
        .remove((r.account_id, r.key_id.as_str()))?;
    Ok(())
}

/// Removes every key of a deleted account.
pub fn remove_all(txn: &WriteTransaction, account: u64) -> Result<(), AccountError> {
    let mut table = txn.open_table(ACCOUNT_KEYS)?;
    let ids: Vec<String> = keys_in(&table, account)?.into_iter().map(|k| k.id).collect();
    for id in ids {
        table.remove((account, id.as_str()))?;
    }
    Ok(())
}

impl AccountStore {
    pub fn keys_of(&self, account: u64) -> Result<Vec<KeyRecord>, AccountError> {
        let txn = self.read()?;
        keys_in(&txn.open_table(ACCOUNT_KEYS)?, account)
    }

    /// Stores a key: with `first`, only if the account has none (so two
    /// agents racing on first use converge on one master key); otherwise
    /// only if it has one already (another passphrase for the same key).
    pub fn put_key(
        &self,
        epoch: Epoch,
        account: u64,
        key: KeyRecord,
        first: bool,
    ) -> Result<KeyRecord, AccountError> {
        check(&key)?;
        self.commit(epoch, |w| {
            let existing = keys_in(&w.txn.open_table(ACCOUNT_KEYS)?, account)?;
            if first && !existing.is_empty() {
                return Err(AccountError::Exists(format!(
                    "an encryption key of account {account} (fetch it and unlock it with the passphrase)"
                )));
            }
            if !first && existing.is_empty() {
                return Err(AccountError::Precondition(format!(
                    "account {account} has no encryption key yet; the first is created with InitKey"
                )));
            }
            if existing.len() >= MAX_KEYS_PER_ACCOUNT {
                return Err(AccountError::Precondition(format!(
                    "account {account} already has {MAX_KEYS_PER_ACCOUNT} keys, the most it may hold"
                )));
            }
            if existing.iter().any(|k| k.id == key.id) {
                return Err(AccountError::Exists(format!("key {}", key.id)));
            }
            w.write(Mutation::PutAccountKey(PutAccountKey {
                account_id: account,
                key: Some(key.clone()),
                first,
            }))
            .map(|_| ())
        })?;
        Ok(key)
    }

    /// Removes one key, never the last (that would lose the data).
    pub fn remove_key(&self, epoch: Epoch, account: u64, id: &str) -> Result<Vec<KeyRecord>, AccountError> {
        self.commit(epoch, |w| {
            let existing = keys_in(&w.txn.open_table(ACCOUNT_KEYS)?, account)?;
            if !existing.iter().any(|k| k.id == id) {
                let shown: String = id.chars().take(40).collect();
                return Err(AccountError::NotFound(format!("key {shown:?}")));
            }
            if existing.len() == 1 {
                return Err(AccountError::Precondition(format!(
                    "key {id} is the account's last key; removing it would make every backup unreadable"
                )));
            }
            w.write(Mutation::RemoveAccountKey(RemoveAccountKey {
                account_id: account,
                key_id: id.to_owned(),
            }))
            .map(|_| ())
        })?;
        self.keys_of(account)
    }
}
