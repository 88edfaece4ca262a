//! The effect of one log entry on the state tables: the same function for
//! the master when it writes and for a slave when it replays, so both
//! reach the same state.

use duplex_proto::v1::log_entry::Mutation;
use duplex_proto::v1::{AccountRecord, KeepPolicy, LogEntry, MoveHomes, ServerInfo, StateSnapshot};
use duplex_types::{NameKind, ServerId, validate_name};
use prost::Message;
use redb::{ReadableTable, WriteTransaction};

use super::tables::{ACCOUNT_NAMES, ACCOUNTS, GROUP_POLICIES, GROUPS, HOMES, KEYS, RETIRED, STORAGE, TOKENS};
use crate::error::AccountError;

/// Applies one log entry's effect. Used by the master when it writes and
/// (later) by slaves when they replay, so both reach the same state.
pub fn apply(txn: &WriteTransaction, entry: &LogEntry) -> Result<(), AccountError> {
    // A slave takes the master's word for what to write, not for its
    // shape: the same checks the master's handlers make run here, so an
    // entry no handler could have written stops replication (the batch's
    // transaction is dropped) instead of entering the state.
    check(entry).map_err(|why| AccountError::Invalid(format!("log entry {}: {why}", entry.lsn)))?;
    match &entry.mutation {
        Some(Mutation::CreateAccount(c)) => {
            let record = AccountRecord {
                id: c.id,
                name: c.name.clone(),
                group: c.group.clone(),
                token_hash: c.token_hash.clone(),
                home_id: c.home_id.clone(),
                quota_bytes: c.quota_bytes,
                previous_home_id: String::new(),
                deleted: false,
            };
            let hash: [u8; 32] = c
                .token_hash
                .as_slice()
                .try_into()
                .map_err(|_| AccountError::Corrupt("token hash is not 32 bytes".into()))?;
            txn.open_table(ACCOUNTS)?
                .insert(c.id, record.encode_to_vec().as_slice())?;
            txn.open_table(ACCOUNT_NAMES)?.insert(c.name.as_str(), c.id)?;
            txn.open_table(TOKENS)?.insert(hash, c.id)?;
            let mut homes = txn.open_table(HOMES)?;
            let homed = homes.get(c.home_id.as_str())?.map_or(0, |v| v.value());
            homes.insert(c.home_id.as_str(), homed + 1)?;
            let mut groups = txn.open_table(GROUPS)?;
            if groups.get(c.group.as_str())?.is_none() {
                groups.insert(c.group.as_str(), true)?;
            }
        }
        Some(Mutation::SetGroup(g)) => {
            txn.open_table(GROUPS)?.insert(g.name.as_str(), g.enabled)?;
        }
        Some(Mutation::SetGroupPolicy(p)) => {
            let mut policies = txn.open_table(GROUP_POLICIES)?;
            match p.keep.filter(|k| *k != KeepPolicy::default()) {
                Some(keep) => {
                    policies.insert(p.group.as_str(), keep.encode_to_vec().as_slice())?;
                }
                None => {
                    policies.remove(p.group.as_str())?;
                }
            }
        }
        Some(Mutation::PutStorageServer(p)) => {
            let server = p
                .server
                .as_ref()
                .ok_or_else(|| AccountError::Corrupt("log entry without server".into()))?;
            txn.open_table(STORAGE)?
                .insert(server.id.as_str(), server.encode_to_vec().as_slice())?;
            txn.open_table(RETIRED)?.remove(server.id.as_str())?;
        }
        Some(Mutation::MoveHomes(m)) => move_homes(txn, m)?,
        Some(Mutation::SetQuota(q)) => {
            let mut record = account(txn, q.id)?;
            record.quota_bytes = q.quota_bytes;
            txn.open_table(ACCOUNTS)?
                .insert(q.id, record.encode_to_vec().as_slice())?;
        }
        Some(Mutation::SetAccountToken(t)) => {
            let mut record = account(txn, t.id)?;
            let new: [u8; 32] = t
                .token_hash
                .as_slice()
                .try_into()
                .map_err(|_| AccountError::Corrupt("token hash is not 32 bytes".into()))?;
            let mut tokens = txn.open_table(TOKENS)?;
            if let Ok(old) = <[u8; 32]>::try_from(record.token_hash.as_slice()) {
                tokens.remove(old)?;
            }
            tokens.insert(new, t.id)?;
            record.token_hash = t.token_hash.clone();
            txn.open_table(ACCOUNTS)?
                .insert(t.id, record.encode_to_vec().as_slice())?;
        }
        Some(Mutation::DeleteAccount(d)) => delete_account(txn, d.id)?,
        Some(Mutation::PutAccountKey(p)) => super::keys::apply_put(txn, p)?,
        Some(Mutation::RemoveAccountKey(r)) => super::keys::apply_remove(txn, r)?,
        Some(Mutation::SetTicketKey(k)) => {
            txn.open_table(KEYS)?
                .insert("ticket_secret", k.secret.as_slice())?;
        }
        None => {
            return Err(AccountError::Corrupt(format!(
                "log entry {} has no mutation",
                entry.lsn
            )));
        }
    }
    Ok(())
}

/// Leaves a deleted record, so the id is never reused, and unlinks the
/// name, the token, the keys and the home's count.
fn delete_account(txn: &WriteTransaction, id: u64) -> Result<(), AccountError> {
    let mut record = account(txn, id)?;
    if record.deleted {
        return Ok(());
    }
    if let Ok(hash) = <[u8; 32]>::try_from(record.token_hash.as_slice()) {
        txn.open_table(TOKENS)?.remove(hash)?;
    }
    txn.open_table(ACCOUNT_NAMES)?.remove(record.name.as_str())?;
    super::keys::remove_all(txn, id)?;
    let mut homes = txn.open_table(HOMES)?;
    let homed = homes.get(record.home_id.as_str())?.map_or(0, |v| v.value());
    homes.insert(record.home_id.as_str(), homed.saturating_sub(1))?;
    record.deleted = true;
    record.token_hash = vec![0; 32];
    txn.open_table(ACCOUNTS)?
        .insert(id, record.encode_to_vec().as_slice())?;
    Ok(())
}

/// The account `id`, which an entry changing it must name.
fn account(txn: &WriteTransaction, id: u64) -> Result<AccountRecord, AccountError> {
    let bytes = txn
        .open_table(ACCOUNTS)?
        .get(id)?
        .map(|v| v.value().to_vec())
        .ok_or_else(|| {
            AccountError::Corrupt(format!("log entry names account {id}, which does not exist"))
        })?;
    AccountRecord::decode(bytes.as_slice())
        .map_err(|e| AccountError::Corrupt(format!("account {id} does not decode: {e}")))
}

/// The domain checks of one entry, as the master's handlers apply them to
/// the request the entry came from. Key records are checked where they
/// are applied (`keys::apply_put`).
fn check(entry: &LogEntry) -> Result<(), String> {
    match &entry.mutation {
        Some(Mutation::CreateAccount(c)) => check_account(&c.name, &c.group, &c.home_id, &c.token_hash)?,
        Some(Mutation::SetGroup(g)) => validate_name(NameKind::Group, &g.name).map_err(|e| e.to_string())?,
        Some(Mutation::SetGroupPolicy(p)) => {
            validate_name(NameKind::Group, &p.group).map_err(|e| e.to_string())?
        }
        Some(Mutation::PutStorageServer(p)) => {
            let server = p.server.as_ref().ok_or("no server record")?;
            check_server(server)?;
        }
        Some(Mutation::MoveHomes(m)) => {
            ServerId::parse(&m.from_id).map_err(|e| e.to_string())?;
            ServerId::parse(&m.to_id).map_err(|e| e.to_string())?;
            for id in &m.previous_ids {
                ServerId::parse(id).map_err(|e| e.to_string())?;
            }
        }
        Some(Mutation::SetTicketKey(k)) => check_ticket_secret(&k.secret)?,
        Some(Mutation::SetAccountToken(t)) if t.token_hash.len() != 32 => {
            return Err(format!("token hash is {} bytes, not 32", t.token_hash.len()));
        }
        Some(Mutation::SetQuota(_) | Mutation::SetAccountToken(_) | Mutation::DeleteAccount(_)) => {}
        Some(Mutation::PutAccountKey(_)) | Some(Mutation::RemoveAccountKey(_)) | None => {}
    }
    Ok(())
}

/// The checks `check` makes, over every record of a state snapshot, so a
/// slave bootstrapping from one holds no state the log could not give it.
pub fn check_snapshot(snapshot: &StateSnapshot) -> Result<(), String> {
    for a in &snapshot.accounts {
        check_account(&a.name, &a.group, &a.home_id, &a.token_hash)
            .map_err(|why| format!("account {}: {why}", a.id))?;
        if !a.previous_home_id.is_empty() {
            ServerId::parse(&a.previous_home_id).map_err(|e| format!("account {}: {e}", a.id))?;
        }
    }
    for g in &snapshot.groups {
        validate_name(NameKind::Group, &g.name).map_err(|e| e.to_string())?;
    }
    for s in snapshot
        .storage_servers
        .iter()
        .chain(&snapshot.retired_storage_servers)
    {
        check_server(s)?;
    }
    if !snapshot.ticket_secret.is_empty() {
        check_ticket_secret(&snapshot.ticket_secret)?;
    }
    Ok(())
}

fn check_account(name: &str, group: &str, home_id: &str, token_hash: &[u8]) -> Result<(), String> {
    validate_name(NameKind::Account, name).map_err(|e| e.to_string())?;
    validate_name(NameKind::Group, group).map_err(|e| e.to_string())?;
    ServerId::parse(home_id).map_err(|e| e.to_string())?;
    if token_hash.len() != 32 {
        return Err("token hash is not 32 bytes".into());
    }
    Ok(())
}

fn check_ticket_secret(secret: &[u8]) -> Result<(), String> {
    if secret.len() != 32 {
        return Err("ticket secret is not 32 bytes".into());
    }
    Ok(())
}

/// A storage server record as `RegisterStorageServer` accepts it.
fn check_server(server: &ServerInfo) -> Result<(), String> {
    ServerId::parse(&server.id).map_err(|e| e.to_string())?;
    validate_name(NameKind::Server, &server.name).map_err(|e| e.to_string())?;
    validate_name(NameKind::Site, &server.site).map_err(|e| e.to_string())?;
    if server.kind != "storage" {
        return Err(format!(
            "server kind must be \"storage\", got {:?}",
            duplex_types::shown(&server.kind)
        ));
    }
    if !(server.addr.starts_with("http://") || server.addr.starts_with("https://")) {
        return Err(format!(
            "server address {:?} must be an http(s) URL",
            duplex_types::shown(&server.addr)
        ));
    }
    Ok(())
}

/// Whether a move takes this account: homed on `from`, and when returning,
/// previously homed on `to` (or on one of the ids the request named).
pub fn moves(m: &MoveHomes, record: &AccountRecord) -> bool {
    if record.home_id != m.from_id || record.deleted {
        return false;
    }
    if !m.returning {
        return true;
    }
    if m.previous_ids.is_empty() {
        record.previous_home_id == m.to_id
    } else {
        m.previous_ids.contains(&record.previous_home_id)
    }
}

fn move_homes(txn: &WriteTransaction, m: &MoveHomes) -> Result<(), AccountError> {
    let (from_id, to_id) = (m.from_id.as_str(), m.to_id.as_str());
    let mut accounts = txn.open_table(ACCOUNTS)?;
    let mut moving = Vec::new();
    for item in accounts.iter()? {
        let (k, v) = item?;
        let record = AccountRecord::decode(v.value())
            .map_err(|_| AccountError::Corrupt(format!("account {} does not decode", k.value())))?;
        if moves(m, &record) {
            moving.push((k.value(), record));
        }
    }
    for (id, mut record) in moving.iter().cloned() {
        record.previous_home_id = std::mem::replace(&mut record.home_id, to_id.to_owned());
        accounts.insert(id, record.encode_to_vec().as_slice())?;
    }
    let mut homes = txn.open_table(HOMES)?;
    let moved = moving.len() as u64;
    let had = homes.get(to_id)?.map_or(0, |v| v.value());
    homes.insert(to_id, had + moved)?;
    let left = homes.get(from_id)?.map_or(0, |v| v.value()).saturating_sub(moved);
    homes.insert(from_id, left)?;
    if m.retire {
        homes.remove(from_id)?;
        let record = txn
            .open_table(STORAGE)?
            .remove(from_id)?
            .map(|v| v.value().to_vec());
        if let Some(record) = record {
            txn.open_table(RETIRED)?.insert(from_id, record.as_slice())?;
        }
    }
    Ok(())
}
