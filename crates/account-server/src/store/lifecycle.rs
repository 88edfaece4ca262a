//! Changes to an account after it is created (its quota and its token)
//! and to its group's keep policy.
//! Each is a log entry like any write, so a slave and a promoted master
//! hold the same quota and accept the same token.

use duplex_proto::v1::log_entry::Mutation;
use std::collections::HashMap;

use duplex_proto::v1::{AccountRecord, DeleteAccount, KeepPolicy, SetAccountToken, SetGroupPolicy, SetQuota};
use duplex_types::Epoch;
use prost::Message;
use redb::{ReadableTable, WriteTransaction};

use super::AccountStore;
use super::tables::{ACCOUNT_NAMES, ACCOUNTS, GROUP_POLICIES, GROUPS};
use crate::error::AccountError;

impl AccountStore {
    pub fn set_quota(
        &self,
        epoch: Epoch,
        name: &str,
        quota_bytes: u64,
    ) -> Result<AccountRecord, AccountError> {
        self.change_account(epoch, name, |id| Mutation::SetQuota(SetQuota { id, quota_bytes }))
    }

    /// Replaces the account's token hash: Login refuses the old token from
    /// this commit on.
    pub fn rotate_token(
        &self,
        epoch: Epoch,
        name: &str,
        token_hash: [u8; 32],
    ) -> Result<AccountRecord, AccountError> {
        self.change_account(epoch, name, |id| {
            Mutation::SetAccountToken(SetAccountToken {
                id,
                token_hash: token_hash.to_vec(),
            })
        })
    }

    /// Deletes an account: Login refuses its token from this commit on,
    /// and its name may be given to a new account (under a new id).
    pub fn delete_account(&self, epoch: Epoch, name: &str) -> Result<AccountRecord, AccountError> {
        self.change_account(epoch, name, |id| Mutation::DeleteAccount(DeleteAccount { id }))
    }

    /// Sets (or with an all-zero policy, clears) the keep policy of a
    /// group that exists.
    pub fn set_group_policy(&self, epoch: Epoch, group: &str, keep: KeepPolicy) -> Result<(), AccountError> {
        self.commit(epoch, |w| {
            if w.txn.open_table(GROUPS)?.get(group)?.is_none() {
                return Err(AccountError::NotFound(format!(
                    "group {}",
                    duplex_types::shown(group)
                )));
            }
            w.write(Mutation::SetGroupPolicy(SetGroupPolicy {
                group: group.to_owned(),
                keep: Some(keep),
            }))
            .map(|_| ())
        })?;
        Ok(())
    }

    /// The keep policy of every group that has one.
    pub fn group_policies(&self) -> Result<HashMap<String, KeepPolicy>, AccountError> {
        let txn = self.read()?;
        let mut out = HashMap::new();
        for entry in txn.open_table(GROUP_POLICIES)?.iter()? {
            let (k, v) = entry?;
            let keep = KeepPolicy::decode(v.value()).map_err(|e| {
                AccountError::Corrupt(format!("policy of group {} does not decode: {e}", k.value()))
            })?;
            out.insert(k.value().to_owned(), keep);
        }
        Ok(out)
    }

    fn change_account(
        &self,
        epoch: Epoch,
        name: &str,
        mutation: impl FnOnce(u64) -> Mutation,
    ) -> Result<AccountRecord, AccountError> {
        let mut record = None;
        self.commit(epoch, |w| {
            let id = id_of(w.txn, name)?;
            w.write(mutation(id))?;
            record = Some(record_of(w.txn, id)?);
            Ok(())
        })?;
        record.ok_or_else(|| AccountError::Corrupt("no account written".into()))
    }
}

fn id_of(txn: &WriteTransaction, name: &str) -> Result<u64, AccountError> {
    txn.open_table(ACCOUNT_NAMES)?
        .get(name)?
        .map(|v| v.value())
        .ok_or_else(|| AccountError::NotFound(format!("account {}", duplex_types::shown(name))))
}

fn record_of(txn: &WriteTransaction, id: u64) -> Result<AccountRecord, AccountError> {
    let bytes = txn
        .open_table(ACCOUNTS)?
        .get(id)?
        .map(|v| v.value().to_vec())
        .ok_or_else(|| AccountError::Corrupt(format!("account {id} vanished")))?;
    AccountRecord::decode(bytes.as_slice())
        .map_err(|e| AccountError::Corrupt(format!("account {id} does not decode: {e}")))
}
