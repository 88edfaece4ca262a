//! The coordinator's durable state in one redb file: the registry of
//! servers, who holds which role (`ClusterState`), every operation with
//! its phases (history), and the security records: enrollment tokens,
//! issued and revoked certificates, operators.
//!
//! Only the engine's owner task writes the desired state, and it writes
//! each change in one transaction (redb fsyncs on commit) before anyone
//! is told. Simulations use the same code over an in-memory backend.

use std::path::Path;

use crate::observed::{RecordedLag, decode_lag, encode_lag};
use duplex_proto::v1::{ClusterState, Operation, ServerInfo};
use duplex_types::OperationState;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

pub mod etcd;
mod security;

pub use etcd::EtcdStore;
pub use security::{EnrollOutcome, EnrollmentGrant, OperatorRecord, SecurityRecords};

const SERVERS: TableDefinition<&str, &[u8]> = TableDefinition::new("servers");
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
const OPERATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("operations");
const CLUSTER_KEY: &str = "cluster";
const LAG_KEY: &str = "lag";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("coordinator store: {0}")]
    Db(#[from] redb::Error),
    #[error("coordinator record {0} does not decode")]
    Corrupt(String),
    #[error("coordinator state in etcd: {0}")]
    Etcd(#[from] duplex_etcd::EtcdError),
    /// A write fenced by leadership found another coordinator leading.
    #[error("this coordinator no longer leads: its write was refused by etcd")]
    NotLeader,
    #[error("coordinator state in etcd: {0} kept changing under this coordinator; try again")]
    Contended(String),
}

duplex_types::from_redb_errors!(StoreError);

impl From<StoreError> for tonic::Status {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotLeader | StoreError::Etcd(_) | StoreError::Contended(_) => {
                tonic::Status::unavailable(e.to_string())
            }
            _ => tonic::Status::internal(e.to_string()),
        }
    }
}

/// One change of the durable state, written in one transaction.
#[derive(Default)]
pub struct Commit {
    pub cluster: Option<ClusterState>,
    pub put_servers: Vec<ServerInfo>,
    pub remove_servers: Vec<String>,
    /// Operations and events, by id (a later write of an id replaces it).
    pub operations: Vec<Operation>,
    /// Each standby's last known lag, replacing what was recorded.
    pub lag: Option<RecordedLag>,
}

/// What a coordinator finds when it starts.
pub struct Loaded {
    pub cluster: ClusterState,
    pub servers: Vec<ServerInfo>,
    /// The running operation, else the last one.
    pub operation: Option<Operation>,
    pub next_operation_id: u64,
    /// Each standby's last known lag (empty if none was recorded).
    pub lag: RecordedLag,
}

/// Where the coordinator keeps its state: one redb file (one coordinator),
/// or etcd (several, one leading; docs/COORDINATOR_HA.md).
pub enum Store {
    Embedded(Embedded),
    Etcd(Box<EtcdStore>),
}

pub struct Embedded {
    pub(crate) db: Database,
}

/// The same call on whichever backend holds the state.
macro_rules! on_backend {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match $self {
            Store::Embedded(s) => s.$method($($arg),*),
            Store::Etcd(s) => s.$method($($arg),*),
        }
    };
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Embedded::open(dir).map(Store::Embedded)
    }

    pub fn in_memory() -> Result<Self, StoreError> {
        Embedded::in_memory().map(Store::Embedded)
    }

    pub fn load(&self) -> Result<Loaded, StoreError> {
        on_backend!(self.load())
    }

    pub fn commit(&self, commit: &Commit) -> Result<(), StoreError> {
        on_backend!(self.commit(commit))
    }

    pub fn operations(&self) -> Result<Vec<Operation>, StoreError> {
        on_backend!(self.operations())
    }

    pub fn operation(&self, id: u64) -> Result<Option<Operation>, StoreError> {
        on_backend!(self.operation(id))
    }

    pub fn add_grant(&self, token_hash: &str, grant: &EnrollmentGrant) -> Result<(), StoreError> {
        on_backend!(self.add_grant(token_hash, grant))
    }

    pub fn is_enrolled(&self, name: &str) -> Result<bool, StoreError> {
        on_backend!(self.is_enrolled(name))
    }

    /// Spends a token and, if it is good, issues with `issue` and records
    /// the new serial: a token is used once, and a name gets a certificate
    /// only while it has none.
    pub fn enroll<T>(
        &self,
        token_hash: &str,
        now_unix_ms: i64,
        issue: impl FnOnce(&EnrollmentGrant) -> Result<(T, String), String>,
    ) -> Result<EnrollOutcome<T>, StoreError> {
        on_backend!(self.enroll(token_hash, now_unix_ms, issue))
    }

    pub fn add_serial(&self, name: &str, serial: &str) -> Result<bool, StoreError> {
        on_backend!(self.add_serial(name, serial))
    }

    pub fn is_revoked(&self, serial: &str) -> Result<bool, StoreError> {
        on_backend!(self.is_revoked(serial))
    }

    pub fn add_operator(&self, record: &OperatorRecord) -> Result<bool, StoreError> {
        on_backend!(self.add_operator(record))
    }

    pub fn remove_operator(&self, name: &str) -> Result<bool, StoreError> {
        on_backend!(self.remove_operator(name))
    }

    pub fn security_records(&self) -> Result<SecurityRecords, StoreError> {
        on_backend!(self.security_records())
    }
}

/// Which of the stored operations a starting coordinator resumes: the
/// running one even when events came after it, else the last with phases.
fn resumed(newest_first: impl Iterator<Item = Operation>) -> Option<Operation> {
    let mut last: Option<Operation> = None;
    for op in newest_first {
        if op.state == OperationState::Running.as_str() {
            return Some(op);
        }
        if last.is_none() && !op.phases.is_empty() {
            last = Some(op);
        }
    }
    last
}

fn decode<M: Message + Default>(what: &str, bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|_| StoreError::Corrupt(what.to_owned()))
}

impl Embedded {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("coordinator.redb");
        let db = Database::create(&path)?;
        // Operator token hashes and enrollment grants: the owner's only.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| StoreError::Db(redb::Error::Io(e)))?;
        Self::init(db)
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
        security::create_tables(&txn)?;
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
        let mut newest_first = Vec::new();
        for item in operations.iter()?.rev() {
            let (k, v) = item?;
            newest_first.push(decode(&format!("operation {}", k.value()), v.value())?);
        }
        let operation = resumed(newest_first.into_iter());
        let lag = match txn.open_table(STATE)?.get(LAG_KEY)? {
            Some(v) => decode_lag(v.value()).ok_or_else(|| StoreError::Corrupt(LAG_KEY.into()))?,
            None => RecordedLag::new(),
        };
        Ok(Loaded {
            cluster,
            servers,
            operation,
            next_operation_id,
            lag,
        })
    }

    pub fn commit(&self, commit: &Commit) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            if let Some(cluster) = &commit.cluster {
                txn.open_table(STATE)?
                    .insert(CLUSTER_KEY, cluster.encode_to_vec().as_slice())?;
            }
            if let Some(lag) = &commit.lag {
                txn.open_table(STATE)?
                    .insert(LAG_KEY, encode_lag(lag).as_slice())?;
            }
            let mut servers = txn.open_table(SERVERS)?;
            for s in &commit.put_servers {
                servers.insert(s.name.as_str(), s.encode_to_vec().as_slice())?;
            }
            for name in &commit.remove_servers {
                servers.remove(name.as_str())?;
            }
            // A removed server's certificates are revoked with its removal,
            // in the same transaction: it can never come back half-removed.
            security::revoke_servers(&txn, &commit.remove_servers)?;
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
}
