//! The durable registry: every server that ever reported, so a restarted
//! coordinator still lists (as down) servers it has not heard from yet.

use std::path::Path;

use duplex_proto::v1::ServerInfo;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const SERVERS: TableDefinition<&str, &[u8]> = TableDefinition::new("servers");

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry store: {0}")]
    Db(#[from] redb::Error),
    #[error("registry record for {0} does not decode")]
    Corrupt(String),
}

duplex_types::from_redb_errors!(RegistryError);

pub struct Registry {
    db: Database,
}

impl Registry {
    pub fn open(dir: &Path) -> Result<Self, RegistryError> {
        let db = Database::create(dir.join("coordinator.redb"))?;
        let txn = db.begin_write()?;
        txn.open_table(SERVERS)?;
        txn.commit()?;
        Ok(Self { db })
    }

    pub fn servers(&self) -> Result<Vec<ServerInfo>, RegistryError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SERVERS)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (k, v) = item?;
            out.push(
                ServerInfo::decode(v.value()).map_err(|_| RegistryError::Corrupt(k.value().to_owned()))?,
            );
        }
        Ok(out)
    }

    /// Records `server` (by name) durably; a no-op when nothing changed.
    pub fn put(&self, server: &ServerInfo) -> Result<(), RegistryError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(SERVERS)?;
            let existing = table.get(server.name.as_str())?.map(|v| v.value().to_vec());
            if existing.as_deref() == Some(server.encode_to_vec().as_slice()) {
                return Ok(());
            }
            table.insert(server.name.as_str(), server.encode_to_vec().as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }
}
