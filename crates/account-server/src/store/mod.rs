//! The account database. Every mutation is a numbered `LogEntry`; the entry
//! and its effect on the tables commit in one redb transaction, so the log
//! and the state can never disagree, and a slave that applies the same
//! entries reaches the same state.

use duplex_proto::v1::log_entry::Mutation;
use std::collections::HashMap;

use duplex_proto::v1::{
    AccountRecord, CreateAccount, LogEntry, MoveHomes, MoveHomesRequest, PutStorageServer, ServerInfo,
    SetGroup, SetTicketKey,
};
use duplex_types::{Epoch, Lsn, ServerId};
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, WriteTransaction};

use crate::error::AccountError;

mod apply;
pub mod keys;
mod lifecycle;
pub mod log;
pub mod meta;
pub mod reapply;
pub mod snapshot;
pub mod tables;
#[cfg(test)]
mod tests;

use apply::apply;
pub use meta::RoleState;
use tables::{
    ACCOUNT_KEYS, ACCOUNT_NAMES, ACCOUNTS, EPOCHS, GROUP_POLICIES, GROUPS, HOMES, KEYS, LOG, META, RETIRED,
    STORAGE, TOKENS,
};

/// A validated request to create an account.
pub struct NewAccount {
    pub name: String,
    pub group: String,
    pub token_hash: [u8; 32],
    pub home: Option<String>,
    pub quota_bytes: u64,
}

pub struct AccountStore {
    db: Database,
    server_id: ServerId,
}

impl AccountStore {
    pub fn open(path: &std::path::Path) -> Result<Self, AccountError> {
        let db = Database::create(path)?;
        // Token hashes and the ticket signing key: the owner's only.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| AccountError::Db(redb::Error::Io(e)))?;
        let txn = db.begin_write()?;
        let server_id = {
            let mut meta = txn.open_table(META)?;
            txn.open_table(LOG)?;
            txn.open_table(ACCOUNTS)?;
            txn.open_table(ACCOUNT_NAMES)?;
            txn.open_table(TOKENS)?;
            txn.open_table(GROUPS)?;
            txn.open_table(GROUP_POLICIES)?;
            txn.open_table(STORAGE)?;
            txn.open_table(KEYS)?;
            txn.open_table(EPOCHS)?;
            txn.open_table(HOMES)?;
            txn.open_table(RETIRED)?;
            txn.open_table(ACCOUNT_KEYS)?;
            let existing = meta.get("server_id")?.map(|v| v.value().to_vec());
            match existing {
                Some(bytes) => ServerId::parse(&String::from_utf8_lossy(&bytes))?,
                None => {
                    let id = ServerId::generate();
                    meta.insert("server_id", id.to_string().as_bytes())?;
                    id
                }
            }
        };
        txn.commit()?;
        Ok(Self { db, server_id })
    }

    pub fn server_id(&self) -> ServerId {
        self.server_id
    }

    /// Writes mutations as new log entries under `epoch`, applying each as
    /// it is written, in one durable transaction. `build` sees the state as
    /// its own earlier writes left it, so it can validate and derive ids.
    fn commit<F>(&self, epoch: Epoch, build: F) -> Result<Vec<LogEntry>, AccountError>
    where
        F: FnOnce(&mut Writer<'_>) -> Result<(), AccountError>,
    {
        self.transact(epoch, false, build)
    }

    /// `commit`, or with `discard` the same work rolled back at the end: a
    /// dry run that sees its own earlier writes, exactly as a real one would.
    fn transact<F>(&self, epoch: Epoch, discard: bool, build: F) -> Result<Vec<LogEntry>, AccountError>
    where
        F: FnOnce(&mut Writer<'_>) -> Result<(), AccountError>,
    {
        let txn = self.db.begin_write()?;
        let next = log::last_lsn_in(&txn)?.next();
        let mut writer = Writer {
            txn: &txn,
            epoch,
            next,
            entries: Vec::new(),
        };
        build(&mut writer)?;
        let entries = writer.entries;
        if discard {
            txn.abort()?;
        } else {
            txn.commit()?;
        }
        Ok(entries)
    }

    /// Creates an account: validates the name is free and the home exists
    /// (or picks the storage server with the fewest accounts).
    pub fn create_account(&self, epoch: Epoch, new: NewAccount) -> Result<AccountRecord, AccountError> {
        let mut created = self.create_accounts(epoch, vec![new])?;
        created
            .pop()
            .ok_or_else(|| AccountError::Corrupt("no account written".into()))
    }

    /// Creates several accounts in one transaction: all or none.
    pub fn create_accounts(
        &self,
        epoch: Epoch,
        new: Vec<NewAccount>,
    ) -> Result<Vec<AccountRecord>, AccountError> {
        let entries = self.commit(epoch, |w| {
            let servers = storage_servers(&w.txn.open_table(STORAGE)?)?;
            for n in new {
                if w.txn.open_table(ACCOUNT_NAMES)?.get(n.name.as_str())?.is_some() {
                    return Err(AccountError::Exists(format!("account {:?}", n.name)));
                }
                let home_id = pick_home(&servers, &w.txn.open_table(HOMES)?, n.home.as_deref())?;
                let id = next_account_id(w.txn)?;
                w.write(Mutation::CreateAccount(CreateAccount {
                    id,
                    name: n.name,
                    group: n.group,
                    token_hash: n.token_hash.to_vec(),
                    home_id,
                    quota_bytes: n.quota_bytes,
                }))?;
            }
            Ok(())
        })?;
        entries
            .into_iter()
            .map(|e| match e.mutation {
                Some(Mutation::CreateAccount(c)) => Ok(AccountRecord {
                    id: c.id,
                    name: c.name,
                    group: c.group,
                    token_hash: c.token_hash,
                    home_id: c.home_id,
                    quota_bytes: c.quota_bytes,
                    previous_home_id: String::new(),
                    deleted: false,
                }),
                _ => Err(AccountError::Corrupt(
                    "create_accounts wrote another mutation".into(),
                )),
            })
            .collect()
    }

    pub fn set_group(&self, epoch: Epoch, name: &str, enabled: bool) -> Result<(), AccountError> {
        self.commit(epoch, |w| {
            let known = w.txn.open_table(GROUPS)?.get(name)?.is_some();
            if !known {
                return Err(AccountError::NotFound(format!("group {name:?}")));
            }
            w.write(Mutation::SetGroup(SetGroup {
                name: name.to_owned(),
                enabled,
            }))
            .map(|_| ())
        })?;
        Ok(())
    }

    /// Records a storage server (insert or address change). A name stays
    /// bound to the server id that first took it.
    pub fn put_storage_server(&self, epoch: Epoch, server: ServerInfo) -> Result<(), AccountError> {
        let servers = self.storage_servers()?;
        if servers.iter().any(|s| s == &server) {
            return Ok(());
        }
        if let Some(other) = servers
            .iter()
            .find(|s| s.name == server.name && s.id != server.id)
        {
            return Err(AccountError::Precondition(format!(
                "storage server name {:?} is already taken by server {}",
                server.name, other.id
            )));
        }
        self.commit(epoch, |w| {
            w.write(Mutation::PutStorageServer(PutStorageServer {
                server: Some(server),
            }))
            .map(|_| ())
        })?;
        Ok(())
    }

    /// The ticket signing secret, created (and logged, so slaves share it)
    /// on first use.
    pub fn ensure_ticket_secret(&self, epoch: Epoch, fresh: [u8; 32]) -> Result<[u8; 32], AccountError> {
        if let Some(secret) = self.ticket_secret()? {
            return Ok(secret);
        }
        self.commit(epoch, |w| {
            w.write(Mutation::SetTicketKey(SetTicketKey {
                secret: fresh.to_vec(),
            }))
            .map(|_| ())
        })?;
        Ok(fresh)
    }

    /// Moves every account homed on storage server `from` to `to` (names),
    /// in one logged transaction. Returns how many moved and their groups;
    /// nothing is logged when none is left on `from`. With `returning`, only
    /// the accounts whose previous home bore the name `previous` (default:
    /// `to`), retired servers included.
    pub fn move_homes(
        &self,
        epoch: Epoch,
        req: &MoveHomesRequest,
    ) -> Result<(u64, Vec<String>), AccountError> {
        let servers = self.storage_servers()?;
        let to_id = ids_named(&servers, &req.to)?.swap_remove(0);
        let previous_ids = if req.returning {
            let previous = if req.previous.is_empty() {
                &req.to
            } else {
                &req.previous
            };
            let known: Vec<ServerInfo> = servers
                .iter()
                .cloned()
                .chain(self.retired_storage_servers()?)
                .collect();
            ids_named(&known, previous)?
        } else {
            Vec::new()
        };
        // Retired already (a repeated call): nothing left to move.
        let Ok(mut from) = ids_named(&servers, &req.from) else {
            return Ok((0, Vec::new()));
        };
        let mutation = MoveHomes {
            from_id: from.swap_remove(0),
            to_id,
            returning: req.returning,
            retire: req.retire,
            previous_ids,
        };
        let moving: Vec<AccountRecord> = self
            .accounts()?
            .into_iter()
            .filter(|a| apply::moves(&mutation, a))
            .collect();
        if (moving.is_empty() && !req.retire) || mutation.from_id == mutation.to_id {
            return Ok((0, Vec::new()));
        }
        self.commit(epoch, |w| w.write(Mutation::MoveHomes(mutation)).map(|_| ()))?;
        let moved = moving.len() as u64;
        let mut groups: Vec<String> = moving.into_iter().map(|a| a.group).collect();
        groups.sort();
        groups.dedup();
        Ok((moved, groups))
    }

    pub fn read(&self) -> Result<redb::ReadTransaction, AccountError> {
        Ok(self.db.begin_read()?)
    }

    pub fn account_by_token(&self, token_hash: &[u8; 32]) -> Result<AccountRecord, AccountError> {
        account_of_token(&self.read()?, token_hash)
    }

    /// What a login needs, read in one transaction so it is one state: a
    /// failover's move of homes committing between two reads once showed
    /// an account homed on a server the second read had retired.
    pub fn login_view(&self, token_hash: &[u8; 32]) -> Result<LoginView, AccountError> {
        let txn = self.read()?;
        let account = account_of_token(&txn, token_hash)?;
        let enabled = txn
            .open_table(GROUPS)?
            .get(account.group.as_str())?
            .is_none_or(|v| v.value());
        let home = storage_servers(&txn.open_table(STORAGE)?)?
            .into_iter()
            .find(|s| s.id == account.home_id);
        let keep = txn
            .open_table(GROUP_POLICIES)?
            .get(account.group.as_str())?
            .map(|v| decode::<duplex_proto::v1::KeepPolicy>(v.value()))
            .transpose()?;
        Ok(LoginView {
            account,
            enabled,
            home,
            keep,
        })
    }

    pub fn accounts(&self) -> Result<Vec<AccountRecord>, AccountError> {
        let txn = self.read()?;
        let table = txn.open_table(ACCOUNTS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (_, v) = entry?;
            let record = decode::<AccountRecord>(v.value())?;
            if !record.deleted {
                out.push(record);
            }
        }
        Ok(out)
    }

    pub fn account_count(&self) -> Result<u64, AccountError> {
        Ok(self.accounts()?.len() as u64)
    }

    pub fn groups(&self) -> Result<Vec<(String, bool)>, AccountError> {
        let txn = self.read()?;
        let table = txn.open_table(GROUPS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            out.push((k.value().to_owned(), v.value()));
        }
        Ok(out)
    }

    pub fn group_enabled(&self, name: &str) -> Result<bool, AccountError> {
        let txn = self.read()?;
        let enabled = txn.open_table(GROUPS)?.get(name)?.map(|v| v.value());
        Ok(enabled.unwrap_or(true))
    }

    pub fn storage_servers(&self) -> Result<Vec<ServerInfo>, AccountError> {
        let txn = self.read()?;
        storage_servers(&txn.open_table(STORAGE)?)
    }

    /// Storage servers a failover retired from placement.
    pub fn retired_storage_servers(&self) -> Result<Vec<ServerInfo>, AccountError> {
        let txn = self.read()?;
        storage_servers(&txn.open_table(RETIRED)?)
    }

    /// Names of every storage server ever registered (retired ones too), by id.
    pub fn storage_server_names(&self) -> Result<HashMap<String, String>, AccountError> {
        let mut servers = self.retired_storage_servers()?;
        servers.extend(self.storage_servers()?);
        Ok(servers.into_iter().map(|s| (s.id, s.name)).collect())
    }

    pub fn ticket_secret(&self) -> Result<Option<[u8; 32]>, AccountError> {
        let txn = self.read()?;
        let secret = txn
            .open_table(KEYS)?
            .get("ticket_secret")?
            .map(|v| v.value().to_vec());
        secret
            .map(|s| {
                <[u8; 32]>::try_from(s.as_slice())
                    .map_err(|_| AccountError::Corrupt("ticket secret is not 32 bytes".into()))
            })
            .transpose()
    }

    /// BLAKE3 over every replicated table, in key order: equal on two
    /// servers exactly when their states are equal.
    pub fn state_hash(&self) -> Result<String, AccountError> {
        let txn = self.read()?;
        let mut h = blake3::Hasher::new();
        for (k, v) in txn.open_table(ACCOUNTS)?.iter()?.flatten() {
            h.update(b"A").update(&k.value().to_le_bytes()).update(v.value());
        }
        for (k, v) in txn.open_table(GROUPS)?.iter()?.flatten() {
            h.update(b"G")
                .update(k.value().as_bytes())
                .update(&[u8::from(v.value())]);
        }
        for (k, v) in txn.open_table(GROUP_POLICIES)?.iter()?.flatten() {
            h.update(b"P").update(k.value().as_bytes()).update(v.value());
        }
        for (k, v) in txn.open_table(STORAGE)?.iter()?.flatten() {
            h.update(b"S").update(k.value().as_bytes()).update(v.value());
        }
        for (k, v) in txn.open_table(RETIRED)?.iter()?.flatten() {
            h.update(b"R").update(k.value().as_bytes()).update(v.value());
        }
        for (k, v) in txn.open_table(KEYS)?.iter()?.flatten() {
            h.update(b"K").update(k.value().as_bytes()).update(v.value());
        }
        for (k, v) in txn.open_table(ACCOUNT_KEYS)?.iter()?.flatten() {
            let (account, id) = k.value();
            h.update(b"E")
                .update(&account.to_le_bytes())
                .update(id.as_bytes())
                .update(v.value());
        }
        Ok(h.finalize().to_hex().to_string())
    }
}

fn account_of_token(
    txn: &redb::ReadTransaction,
    token_hash: &[u8; 32],
) -> Result<AccountRecord, AccountError> {
    let id = txn
        .open_table(TOKENS)?
        .get(token_hash)?
        .map(|v| v.value())
        .ok_or(AccountError::BadToken)?;
    account_in(&txn.open_table(ACCOUNTS)?, id)?
        .ok_or_else(|| AccountError::Corrupt(format!("token points at missing account {id}")))
}

/// An account as a login sees it, from one consistent state.
pub struct LoginView {
    pub account: AccountRecord,
    /// Whether its group takes backups.
    pub enabled: bool,
    /// Its home storage server, if that is a registered one.
    pub home: Option<ServerInfo>,
    /// Its group's keep policy, if it has one.
    pub keep: Option<duplex_proto::v1::KeepPolicy>,
}

/// Appends entries inside one write transaction.
pub struct Writer<'t> {
    txn: &'t WriteTransaction,
    epoch: Epoch,
    next: Lsn,
    entries: Vec<LogEntry>,
}

impl Writer<'_> {
    fn write(&mut self, mutation: Mutation) -> Result<&LogEntry, AccountError> {
        let entry = LogEntry {
            lsn: self.next.0,
            epoch: self.epoch.0,
            time_unix_ms: now_ms(),
            mutation: Some(mutation),
        };
        log::append_in(self.txn, &entry)?;
        self.next = self.next.next();
        self.entries.push(entry);
        self.entries
            .last()
            .ok_or_else(|| AccountError::Corrupt("entry vanished".into()))
    }
}

fn account_in(
    table: &impl ReadableTable<u64, &'static [u8]>,
    id: u64,
) -> Result<Option<AccountRecord>, AccountError> {
    let v = table.get(id)?.map(|v| v.value().to_vec());
    v.map(|bytes| decode(&bytes)).transpose()
}

fn storage_servers(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<ServerInfo>, AccountError> {
    let mut out = Vec::new();
    for entry in table.iter()? {
        let (_, v) = entry?;
        out.push(decode::<ServerInfo>(v.value())?);
    }
    Ok(out)
}

/// The ids of the servers named `name` (several only among retired ones,
/// when a name was registered again by a new server).
fn ids_named(servers: &[ServerInfo], name: &str) -> Result<Vec<String>, AccountError> {
    let ids: Vec<String> = servers
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.id.clone())
        .collect();
    if ids.is_empty() {
        return Err(AccountError::NotFound(format!("storage server {name:?}")));
    }
    Ok(ids)
}

fn next_account_id(txn: &WriteTransaction) -> Result<u64, AccountError> {
    let last = txn.open_table(ACCOUNTS)?.last()?.map(|(k, _)| k.value());
    Ok(last.unwrap_or(0) + 1)
}

/// The requested home, or the storage server homing the fewest accounts.
fn pick_home(
    servers: &[ServerInfo],
    homes: &impl ReadableTable<&'static str, u64>,
    requested: Option<&str>,
) -> Result<String, AccountError> {
    if let Some(name) = requested {
        return servers
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.id.clone())
            .ok_or_else(|| AccountError::NotFound(format!("storage server {name:?}")));
    }
    let mut best: Option<(u64, &ServerInfo)> = None;
    for server in servers {
        let load = homes.get(server.id.as_str())?.map_or(0, |v| v.value());
        let better = match best {
            None => true,
            Some((l, b)) => load < l || (load == l && server.name < b.name),
        };
        if better {
            best = Some((load, server));
        }
    }
    best.map(|(_, s)| s.id.clone())
        .ok_or_else(|| AccountError::Precondition("no storage server has registered yet".into()))
}

pub(crate) fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, AccountError> {
    M::decode(bytes).map_err(|e| AccountError::Corrupt(e.to_string()))
}

use duplex_types::now_ms;
