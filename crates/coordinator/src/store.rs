//! The coordinator's durable state in one redb file: the registry of
//! servers, who holds which role (`ClusterState`), every operation with
//! its phases (history), enrollment tokens and server credentials.
//!
//! Only the engine's owner task writes the desired state, and it writes
//! each change in one transaction (redb fsyncs on commit) before anyone
//! is told. Simulations use the same code over an in-memory backend.

use std::path::Path;

use duplex_proto::v1::{ClusterState, Operation, ServerInfo};
use duplex_types::OperationState;
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

/// One change of the durable state, written in one transaction.
#[derive(Default)]
pub struct Commit {
    pub cluster: Option<ClusterState>,
    pub put_servers: Vec<ServerInfo>,
    pub remove_servers: Vec<String>,
    /// Operations and events, by id (a later write of an id replaces it).
    pub operations: Vec<Operation>,
}

/// What a coordinator finds when it starts.
pub struct Loaded {
    pub cluster: ClusterState,
    pub servers: Vec<ServerInfo>,
    /// The running operation, else the last one.
    pub operation: Option<Operation>,
    pub next_operation_id: u64,
}

pub struct Store {
    db: Database,
}

fn decode<M: Message + Default>(what: &str, bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|_| StoreError::Corrupt(what.to_owned()))
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::init(Database::create(dir.join("coordinator.redb"))?)
    }

    /// A store that lives in memory (simulations and unit tests).
    pub fn in_memory() -> Result<Self, StoreError> {
        let db = Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())?;
        Self::init(db)
    }

    fn init(db: Database) -> Result<Self, StoreError> {
        let txn = db.begin_write()?;
        txn.open_table(SERVERS)?;
        txn.open_table(STATE)?;
        txn.open_table(OPERATIONS)?;
        txn.open_table(TOKENS)?;
        txn.open_table(CREDENTIALS)?;
        txn.commit()?;
        Ok(Self { db })
    }

    pub fn load(&self) -> Result<Loaded, StoreError> {
        let txn = self.db.begin_read()?;
        let cluster = match txn.open_table(STATE)?.get(CLUSTER_KEY)? {
            Some(v) => decode(CLUSTER_KEY, v.value())?,
            None => ClusterState::default(),
        };
        let mut servers = Vec::new();
        for item in txn.open_table(SERVERS)?.iter()? {
            let (k, v) = item?;
            servers.push(decode(k.value(), v.value())?);
        }
        let operations = txn.open_table(OPERATIONS)?;
        let next_operation_id = operations.last()?.map_or(0, |(k, _)| k.value()) + 1;
        // The running operation is resumed even when events came after it.
        let mut operation: Option<Operation> = None;
        for item in operations.iter()?.rev() {
            let (k, v) = item?;
            let op: Operation = decode(&format!("operation {}", k.value()), v.value())?;
            if op.state == OperationState::Running.as_str() {
                operation = Some(op);
                break;
            }
            if operation.is_none() && !op.phases.is_empty() {
                operation = Some(op);
            }
        }
        Ok(Loaded {
            cluster,
            servers,
            operation,
            next_operation_id,
        })
    }

    pub fn commit(&self, commit: &Commit) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            if let Some(cluster) = &commit.cluster {
                txn.open_table(STATE)?
                    .insert(CLUSTER_KEY, cluster.encode_to_vec().as_slice())?;
            }
            let mut servers = txn.open_table(SERVERS)?;
            for s in &commit.put_servers {
                servers.insert(s.name.as_str(), s.encode_to_vec().as_slice())?;
            }
            let mut credentials = txn.open_table(CREDENTIALS)?;
            for name in &commit.remove_servers {
                servers.remove(name.as_str())?;
                credentials.remove(name.as_str())?;
            }
            let mut ops = txn.open_table(OPERATIONS)?;
            for op in &commit.operations {
                ops.insert(op.id, op.encode_to_vec().as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Every operation and event, oldest first.
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

    pub fn operation(&self, id: u64) -> Result<Option<Operation>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(OPERATIONS)?;
        table
            .get(id)?
            .map(|v| decode(&format!("operation {id}"), v.value()))
            .transpose()
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
