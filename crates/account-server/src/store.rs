//! The account database. Every mutation is a numbered `LogEntry`; the entry
//! and its effect on the tables commit in one redb transaction, so the log
//! and the state can never disagree, and a slave that applies the same
//! entries reaches the same state.

use duplex_proto::v1::log_entry::Mutation;
use duplex_proto::v1::{
    AccountRecord, CreateAccount, LogEntry, PutStorageServer, ServerInfo, SetGroup, SetTicketKey,
};
use duplex_types::{Epoch, Lsn, ServerId};
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use crate::error::AccountError;

/// Local, unreplicated facts: "server_id".
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// lsn → encoded `LogEntry`.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// account id → encoded `AccountRecord`.
const ACCOUNTS: TableDefinition<u64, &[u8]> = TableDefinition::new("accounts");
const ACCOUNT_NAMES: TableDefinition<&str, u64> = TableDefinition::new("account_names");
/// BLAKE3(token) → account id.
const TOKENS: TableDefinition<[u8; 32], u64> = TableDefinition::new("tokens");
/// group name → enabled.
const GROUPS: TableDefinition<&str, bool> = TableDefinition::new("groups");
/// storage server id → encoded `ServerInfo`.
const STORAGE: TableDefinition<&str, &[u8]> = TableDefinition::new("storage_servers");
/// "ticket_secret" → bytes. Replicated like the rest of the state.
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");

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
        let txn = db.begin_write()?;
        let server_id = {
            let mut meta = txn.open_table(META)?;
            txn.open_table(LOG)?;
            txn.open_table(ACCOUNTS)?;
            txn.open_table(ACCOUNT_NAMES)?;
            txn.open_table(TOKENS)?;
            txn.open_table(GROUPS)?;
            txn.open_table(STORAGE)?;
            txn.open_table(KEYS)?;
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

    pub fn last_lsn(&self) -> Result<Lsn, AccountError> {
        let txn = self.db.begin_read()?;
        let log = txn.open_table(LOG)?;
        Ok(log.last()?.map(|(k, _)| Lsn(k.value())).unwrap_or_default())
    }

    /// Appends one mutation to the log and applies it, atomically and
    /// durably. `prepare` sees the open transaction, so it can validate
    /// against current state and fill in derived fields (like the next id).
    fn commit<F>(&self, epoch: Epoch, prepare: F) -> Result<LogEntry, AccountError>
    where
        F: FnOnce(&WriteTransaction) -> Result<Mutation, AccountError>,
    {
        let txn = self.db.begin_write()?;
        let mutation = prepare(&txn)?;
        let lsn = {
            let log = txn.open_table(LOG)?;
            log.last()?
                .map(|(k, _)| Lsn(k.value()))
                .unwrap_or_default()
                .next()
        };
        let entry = LogEntry {
            lsn: lsn.0,
            epoch: epoch.0,
            time_unix_ms: now_ms(),
            mutation: Some(mutation),
        };
        apply(&txn, &entry)?;
        txn.open_table(LOG)?
            .insert(lsn.0, entry.encode_to_vec().as_slice())?;
        txn.commit()?;
        Ok(entry)
    }

    /// Creates an account: validates the name is free and the home exists
    /// (or picks the storage server with the fewest accounts).
    pub fn create_account(&self, epoch: Epoch, new: NewAccount) -> Result<AccountRecord, AccountError> {
        let entry = self.commit(epoch, |txn| {
            if txn.open_table(ACCOUNT_NAMES)?.get(new.name.as_str())?.is_some() {
                return Err(AccountError::Exists(format!("account {:?}", new.name)));
            }
            let servers = storage_servers(&txn.open_table(STORAGE)?)?;
            let accounts = txn.open_table(ACCOUNTS)?;
            let home_id = pick_home(&servers, &accounts, new.home.as_deref())?;
            let id = accounts.last()?.map(|(k, _)| k.value()).unwrap_or(0) + 1;
            Ok(Mutation::CreateAccount(CreateAccount {
                id,
                name: new.name.clone(),
                group: new.group.clone(),
                token_hash: new.token_hash.to_vec(),
                home_id,
                quota_bytes: new.quota_bytes,
            }))
        })?;
        let Some(Mutation::CreateAccount(c)) = entry.mutation else {
            return Err(AccountError::Corrupt(
                "create_account wrote another mutation".into(),
            ));
        };
        Ok(AccountRecord {
            id: c.id,
            name: c.name,
            group: c.group,
            token_hash: c.token_hash,
            home_id: c.home_id,
            quota_bytes: c.quota_bytes,
        })
    }

    pub fn set_group(&self, epoch: Epoch, name: &str, enabled: bool) -> Result<(), AccountError> {
        self.commit(epoch, |txn| {
            let known = txn.open_table(GROUPS)?.get(name)?.is_some();
            if !known {
                return Err(AccountError::NotFound(format!("group {name:?}")));
            }
            Ok(Mutation::SetGroup(SetGroup {
                name: name.to_owned(),
                enabled,
            }))
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
        self.commit(epoch, |_| {
            Ok(Mutation::PutStorageServer(PutStorageServer {
                server: Some(server),
            }))
        })?;
        Ok(())
    }

    /// The ticket signing secret, created (and logged, so slaves share it)
    /// on first use.
    pub fn ensure_ticket_secret(&self, epoch: Epoch, fresh: [u8; 32]) -> Result<[u8; 32], AccountError> {
        if let Some(secret) = self.ticket_secret()? {
            return Ok(secret);
        }
        self.commit(epoch, |_| {
            Ok(Mutation::SetTicketKey(SetTicketKey {
                secret: fresh.to_vec(),
            }))
        })?;
        Ok(fresh)
    }

    pub fn read(&self) -> Result<redb::ReadTransaction, AccountError> {
        Ok(self.db.begin_read()?)
    }

    pub fn account_by_token(&self, token_hash: &[u8; 32]) -> Result<AccountRecord, AccountError> {
        let txn = self.read()?;
        let id = txn
            .open_table(TOKENS)?
            .get(token_hash)?
            .map(|v| v.value())
            .ok_or(AccountError::BadToken)?;
        account_in(&txn.open_table(ACCOUNTS)?, id)?
            .ok_or_else(|| AccountError::Corrupt(format!("token points at missing account {id}")))
    }

    pub fn accounts(&self) -> Result<Vec<AccountRecord>, AccountError> {
        let txn = self.read()?;
        let table = txn.open_table(ACCOUNTS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (_, v) = entry?;
            out.push(decode::<AccountRecord>(v.value())?);
        }
        Ok(out)
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
        for (k, v) in txn.open_table(STORAGE)?.iter()?.flatten() {
            h.update(b"S").update(k.value().as_bytes()).update(v.value());
        }
        for (k, v) in txn.open_table(KEYS)?.iter()?.flatten() {
            h.update(b"K").update(k.value().as_bytes()).update(v.value());
        }
        Ok(h.finalize().to_hex().to_string())
    }
}

/// Applies one log entry's effect. Used by the master when it writes and
/// (later) by slaves when they replay, so both reach the same state.
fn apply(txn: &WriteTransaction, entry: &LogEntry) -> Result<(), AccountError> {
    match &entry.mutation {
        Some(Mutation::CreateAccount(c)) => {
            let record = AccountRecord {
                id: c.id,
                name: c.name.clone(),
                group: c.group.clone(),
                token_hash: c.token_hash.clone(),
                home_id: c.home_id.clone(),
                quota_bytes: c.quota_bytes,
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
            let mut groups = txn.open_table(GROUPS)?;
            if groups.get(c.group.as_str())?.is_none() {
                groups.insert(c.group.as_str(), true)?;
            }
        }
        Some(Mutation::SetGroup(g)) => {
            txn.open_table(GROUPS)?.insert(g.name.as_str(), g.enabled)?;
        }
        Some(Mutation::PutStorageServer(p)) => {
            let server = p
                .server
                .as_ref()
                .ok_or_else(|| AccountError::Corrupt("log entry without server".into()))?;
            txn.open_table(STORAGE)?
                .insert(server.id.as_str(), server.encode_to_vec().as_slice())?;
        }
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

/// The requested home, or the storage server homing the fewest accounts.
fn pick_home(
    servers: &[ServerInfo],
    accounts: &impl ReadableTable<u64, &'static [u8]>,
    requested: Option<&str>,
) -> Result<String, AccountError> {
    if let Some(name) = requested {
        return servers
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.id.clone())
            .ok_or_else(|| AccountError::NotFound(format!("storage server {name:?}")));
    }
    let mut load: std::collections::BTreeMap<&str, usize> =
        servers.iter().map(|s| (s.id.as_str(), 0)).collect();
    for entry in accounts.iter()? {
        let (_, v) = entry?;
        let record: AccountRecord = decode(v.value())?;
        if let Some(n) = load.get_mut(record.home_id.as_str()) {
            *n += 1;
        }
    }
    let mut by_load: Vec<(&ServerInfo, usize)> = servers
        .iter()
        .map(|s| (s, load.get(s.id.as_str()).copied().unwrap_or(0)))
        .collect();
    by_load.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.name.cmp(&b.0.name)));
    by_load
        .first()
        .map(|(s, _)| s.id.clone())
        .ok_or_else(|| AccountError::Precondition("no storage server has registered yet".into()))
}

fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, AccountError> {
    M::decode(bytes).map_err(|e| AccountError::Corrupt(e.to_string()))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
