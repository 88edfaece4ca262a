//! Re-applying entries from a divergence report: each becomes a new log
//! entry on the master if it still makes sense against the state the
//! master has now, else it is skipped with the reason.

use duplex_proto::v1::log_entry::Mutation;
use duplex_proto::v1::{CreateAccount, LogEntry, SetGroup};
use duplex_types::Epoch;
use redb::ReadableTable;

use super::tables::{ACCOUNT_NAMES, ACCOUNTS, GROUPS, HOMES, STORAGE, TOKENS};
use super::{AccountStore, Writer, account_in, next_account_id, pick_home, storage_servers};
use crate::divergence;
use crate::error::AccountError;

/// What became of one entry.
#[derive(Debug)]
pub struct Outcome {
    pub lsn: u64,
    pub kind: &'static str,
    pub applied: bool,
    pub reason: String,
    /// The new entry's LSN (0 when skipped or on a dry run).
    pub new_lsn: u64,
}

impl AccountStore {
    /// Re-applies `entries` in order, in one transaction, so a later entry
    /// sees what an earlier one did (an account re-created, then its group
    /// disabled). With `dry_run` the same decisions are made and rolled back.
    pub fn reapply(
        &self,
        epoch: Epoch,
        entries: &[LogEntry],
        dry_run: bool,
    ) -> Result<Vec<Outcome>, AccountError> {
        let mut outcomes = Vec::with_capacity(entries.len());
        self.transact(epoch, dry_run, |w| {
            for entry in entries {
                let (applied, reason, new_lsn) = match divergence::never_reapplied(entry) {
                    Some(why) => (false, why.to_owned(), 0),
                    None => decide(w, entry)?,
                };
                outcomes.push(Outcome {
                    lsn: entry.lsn,
                    kind: divergence::kind(entry),
                    applied,
                    reason,
                    new_lsn: if dry_run { 0 } else { new_lsn },
                });
            }
            Ok(())
        })?;
        Ok(outcomes)
    }
}

/// (applied, reason, new LSN) for one entry of a kind that may be re-applied.
fn decide(w: &mut Writer<'_>, entry: &LogEntry) -> Result<(bool, String, u64), AccountError> {
    match &entry.mutation {
        Some(Mutation::CreateAccount(c)) => create_account(w, c),
        Some(Mutation::SetGroup(g)) => set_group(w, g),
        _ => Err(AccountError::Invalid(format!(
            "entry at lsn {}: {} is never re-applied",
            entry.lsn,
            divergence::kind(entry)
        ))),
    }
}

fn skipped(reason: String) -> Result<(bool, String, u64), AccountError> {
    Ok((false, reason, 0))
}

/// Re-creates the account under a new id, keeping its token hash, group
/// and quota, if its name and token are both still free.
fn create_account(w: &mut Writer<'_>, c: &CreateAccount) -> Result<(bool, String, u64), AccountError> {
    if w.txn.open_table(ACCOUNT_NAMES)?.get(c.name.as_str())?.is_some() {
        return skipped(format!("an account named {:?} exists already", c.name));
    }
    let hash: [u8; 32] =
        c.token_hash.as_slice().try_into().map_err(|_| {
            AccountError::Invalid(format!("account {:?}: token hash is not 32 bytes", c.name))
        })?;
    let holder = w.txn.open_table(TOKENS)?.get(hash)?.map(|v| v.value());
    if let Some(id) = holder {
        let other =
            account_in(&w.txn.open_table(ACCOUNTS)?, id)?.map_or_else(|| format!("id {id}"), |a| a.name);
        return skipped(format!("its token already belongs to account {other:?}"));
    }
    let servers = storage_servers(&w.txn.open_table(STORAGE)?)?;
    let (home_id, home_note) = if servers.iter().any(|s| s.id == c.home_id) {
        (c.home_id.clone(), "its old home")
    } else {
        match pick_home(&servers, &w.txn.open_table(HOMES)?, None) {
            Ok(id) => (id, "its old home is no longer registered, so the least loaded"),
            Err(AccountError::Precondition(why)) => return skipped(why),
            Err(e) => return Err(e),
        }
    };
    let home = servers
        .iter()
        .find(|s| s.id == home_id)
        .map_or_else(|| home_id.clone(), |s| s.name.clone());
    let id = next_account_id(w.txn)?;
    let written = w.write(Mutation::CreateAccount(CreateAccount {
        id,
        home_id,
        ..c.clone()
    }))?;
    let reason = format!(
        "re-create account {:?} with its old token in group {:?}, home {home} ({home_note})",
        c.name, c.group
    );
    Ok((true, reason, written.lsn))
}

/// Sets the group as the entry did, unless it is gone or already so.
fn set_group(w: &mut Writer<'_>, g: &SetGroup) -> Result<(bool, String, u64), AccountError> {
    let state = if g.enabled { "enabled" } else { "disabled" };
    let current = w.txn.open_table(GROUPS)?.get(g.name.as_str())?.map(|v| v.value());
    match current {
        None => skipped(format!("group {:?} does not exist on this master", g.name)),
        Some(enabled) if enabled == g.enabled => skipped(format!("group {:?} is already {state}", g.name)),
        Some(_) => {
            let written = w.write(Mutation::SetGroup(g.clone()))?;
            let verb = if g.enabled { "enable" } else { "disable" };
            Ok((true, format!("{verb} group {:?}", g.name), written.lsn))
        }
    }
}
