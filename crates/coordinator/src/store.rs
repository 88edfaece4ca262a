//! The coordinator's durable state in one redb file: the registry of
//! servers, who holds which role (`ClusterState`), every operation with
//! its phases (history), enrollment tokens and server credentials.
//! Every change commits (fsync) before the coordinator acts on it.

use std::path::Path;

use duplex_proto::v1::{ClusterState, Operation, ServerInfo};
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const SERVERS: TableDefinition<&str, &[u8]> = TableDefinition::new("servers");
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
const OPERATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("operations");
/// BLAKE3(token) hex → expiry (unix ms).
const TOKENS: TableDefinition<&str, i64> = TableDefinition::new("enrollment_tokens");
/// server name → BLAKE3(credential) hex.
const CREDENTIALS: TableDefinition<&str, &str> = TableDefinition::new("credentials");
const CLUSTER_KEY: &str = "cluster";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("coordinator store: {0}")]
    Db(#[from] redb::Error),
    #[error("coordinator record {0} does not decode")]
    Corrupt(String),
}

duplex_types::from_redb_errors!(StoreError);

impl From<StoreError> for tonic::Status {
    fn from(e: StoreError) -> Self {
        tonic::Status::internal(e.to_string())
    }
}

/// How an enrollment attempt ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Enrollment {
    Enrolled,
    UnknownToken,
    Expired,
}

pub struct Store {
    db: Database,
}

fn decode<M: Message + Default>(what: &str, bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|_| StoreError::Corrupt(what.to_owned()))
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = Database::create(dir.join("coordinator.redb"))?;
        let txn = db.begin_write()?;
        txn.open_table(SERVERS)?;
        txn.open_table(STATE)?;
        txn.open_table(OPERATIONS)?;
        txn.open_table(TOKENS)?;
        txn.open_table(CREDENTIALS)?;
        txn.commit()?;
        Ok(Self { db })
    }

    pub fn servers(&self) -> Result<Vec<ServerInfo>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SERVERS)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (k, v) = item?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Records `server` (by name) durably.
    pub fn put_server(&self, server: &ServerInfo) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(SERVERS)?
            .insert(server.name.as_str(), server.encode_to_vec().as_slice())?;
        txn.commit()?;
        Ok(())
    }

    pub fn cluster(&self) -> Result<ClusterState, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(STATE)?;
        match table.get(CLUSTER_KEY)? {
            Some(v) => decode(CLUSTER_KEY, v.value()),
            None => Ok(ClusterState::default()),
        }
    }

    pub fn save_cluster(&self, state: &ClusterState) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(STATE)?
            .insert(CLUSTER_KEY, state.encode_to_vec().as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Every operation, oldest first.
    pub fn operations(&self) -> Result<Vec<Operation>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(OPERATIONS)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (k, v) = item?;
            out.push(decode(&format!("operation {}", k.value()), v.value())?);
        }
        Ok(out)
    }

    pub fn next_operation_id(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let last = txn.open_table(OPERATIONS)?.last()?.map_or(0, |(k, _)| k.value());
        Ok(last + 1)
    }

    pub fn save_operation(&self, op: &Operation) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(OPERATIONS)?
            .insert(op.id, op.encode_to_vec().as_slice())?;
        txn.commit()?;
        Ok(())
    }

    pub fn add_token(&self, token_hash: &str, expires_unix_ms: i64) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(TOKENS)?.insert(token_hash, expires_unix_ms)?;
        txn.commit()?;
        Ok(())
    }

    /// Spends a token and records the server's credential, in one transaction.
    pub fn enroll(
        &self,
        name: &str,
        token_hash: &str,
        credential_hash: &str,
        now_unix_ms: i64,
    ) -> Result<Enrollment, StoreError> {
        let txn = self.db.begin_write()?;
        let outcome = {
            let mut tokens = txn.open_table(TOKENS)?;
            let expiry = tokens.remove(token_hash)?.map(|v| v.value());
            match expiry {
                None => Enrollment::UnknownToken,
                Some(e) if e < now_unix_ms => Enrollment::Expired,
                Some(_) => {
                    txn.open_table(CREDENTIALS)?.insert(name, credential_hash)?;
                    Enrollment::Enrolled
                }
            }
        };
        txn.commit()?;
        Ok(outcome)
    }

    pub fn credential(&self, name: &str) -> Result<Option<String>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CREDENTIALS)?;
        Ok(table.get(name)?.map(|v| v.value().to_owned()))
    }
}
