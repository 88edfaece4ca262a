//! The coordinator's state in etcd, shared by every coordinator of the
//! platform (docs/COORDINATOR_HA.md). One key per record under
//! `/duplex/v1/`. Every change of the desired state is one transaction
//! fenced by leadership: it holds only while the leader key is still the
//! one this coordinator created, so a deposed leader's writes fail in etcd
//! whatever it still believes. Security records are changed with
//! compare-and-swap on the records they read (no lost updates).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use duplex_etcd::{Etcd, KeyValue, absent, created_at, delete, modified_at, put};
use duplex_proto::v1::{ClusterState, Operation, ServerInfo};
use prost::Message;

use crate::observed::{RecordedLag, decode_lag, encode_lag};

use super::{
    Commit, EnrollOutcome, EnrollmentGrant, Loaded, OperatorRecord, SecurityRecords, StoreError, decode,
    resumed, security::serials,
};

pub const PREFIX: &str = "/duplex/v1/";
/// Held, with its etcd lease, by the coordinator that leads.
pub const LEADER_KEY: &str = "/duplex/v1/leader";
/// Each coordinator that ever joined (status lists them).
pub const MEMBERS: &str = "/duplex/v1/coordinators/";
/// Each running coordinator, under its etcd lease.
pub const ALIVE: &str = "/duplex/v1/alive/";
const CLUSTER: &str = "cluster";
const LAG: &str = "lag";
const SERVERS: &str = "servers/";
const OPERATIONS: &str = "operations/";
const GRANTS: &str = "security/grants/";
const ENROLLED: &str = "security/enrolled/";
const REVOKED: &str = "security/revoked/";
const OPERATORS: &str = "security/operators/";
/// Rewritten with every change servers must hear about: its mod revision
/// is the security version (it only grows, even when records are deleted).
const VERSION: &str = "security/version";
/// Read-modify-write attempts before a change is given up as contended.
const ATTEMPTS: usize = 8;

pub struct EtcdStore {
    etcd: Etcd,
    handle: tokio::runtime::Handle,
    /// The leader key's create revision while this coordinator leads; 0
    /// when it does not (its state writes are then refused).
    fence: Arc<AtomicI64>,
}

fn key(suffix: &str) -> Vec<u8> {
    format!("{PREFIX}{suffix}").into_bytes()
}

/// Operation keys sort as their ids do.
fn operation_key(id: u64) -> Vec<u8> {
    key(&format!("{OPERATIONS}{id:020}"))
}

fn text(kv: &KeyValue, what: &str) -> Result<String, StoreError> {
    String::from_utf8(kv.value.clone()).map_err(|_| StoreError::Corrupt(what.to_owned()))
}

fn suffix<'a>(kv: &'a KeyValue, prefix: &str) -> &'a str {
    std::str::from_utf8(&kv.key)
        .unwrap_or_default()
        .strip_prefix(PREFIX)
        .and_then(|k| k.strip_prefix(prefix))
        .unwrap_or_default()
}

impl EtcdStore {
    /// Must be called inside the tokio runtime the calls will run on.
    pub fn new(etcd: Etcd, fence: Arc<AtomicI64>) -> Self {
        Self {
            etcd,
            handle: tokio::runtime::Handle::current(),
            fence,
        }
    }

    /// Runs an etcd call from the synchronous store API (the engine calls
    /// the store from a blocking section, as it does redb).
    fn block<T>(&self, f: impl Future<Output = T>) -> T {
        tokio::task::block_in_place(|| self.handle.block_on(f))
    }

    fn prefix(&self, suffix: &str) -> Result<Vec<KeyValue>, StoreError> {
        Ok(self.block(self.etcd.prefix(&key(suffix)))?.0)
    }

    fn get(&self, suffix: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.block(self.etcd.get(&key(suffix)))?)
    }

    pub fn load(&self) -> Result<Loaded, StoreError> {
        let cluster = match self.get(CLUSTER)? {
            Some(kv) => decode(CLUSTER, &kv.value)?,
            None => ClusterState::default(),
        };
        let servers = self
            .prefix(SERVERS)?
            .iter()
            .map(|kv| decode::<ServerInfo>(suffix(kv, SERVERS), &kv.value))
            .collect::<Result<Vec<_>, _>>()?;
        let operations = self.operations()?;
        let next_operation_id = operations.last().map_or(0, |op| op.id) + 1;
        let lag = match self.get(LAG)? {
            Some(kv) => decode_lag(&kv.value).ok_or_else(|| StoreError::Corrupt(LAG.into()))?,
            None => RecordedLag::new(),
        };
        Ok(Loaded {
            cluster,
            servers,
            operation: resumed(operations.into_iter().rev()),
            next_operation_id,
            lag,
        })
    }

    /// One fenced transaction: it holds only while this coordinator leads.
    pub fn commit(&self, commit: &Commit) -> Result<(), StoreError> {
        let fence = self.fence.load(Ordering::SeqCst);
        if fence == 0 {
            return Err(StoreError::NotLeader);
        }
        let mut ops = Vec::new();
        if let Some(cluster) = &commit.cluster {
            ops.push(put(&key(CLUSTER), cluster.encode_to_vec(), 0));
        }
        for s in &commit.put_servers {
            ops.push(put(&key(&format!("{SERVERS}{}", s.name)), s.encode_to_vec(), 0));
        }
        if let Some(lag) = &commit.lag {
            ops.push(put(&key(LAG), encode_lag(lag), 0));
        }
        let mut compare = vec![created_at(LEADER_KEY.as_bytes(), fence)];
        for name in &commit.remove_servers {
            ops.push(delete(&key(&format!("{SERVERS}{name}"))));
            // A removed server's certificates are revoked in the same
            // transaction: it can never come back half-removed.
            let enrolled = format!("{ENROLLED}{name}");
            if let Some(kv) = self.get(&enrolled)? {
                compare.push(modified_at(&key(&enrolled), kv.mod_revision));
                ops.push(delete(&key(&enrolled)));
                let now = duplex_types::now_ms();
                for serial in serials(&text(&kv, "enrolled serials")?) {
                    ops.push(put(
                        &key(&format!("{REVOKED}{serial}")),
                        now.to_string().into_bytes(),
                        0,
                    ));
                }
            }
        }
        if !commit.remove_servers.is_empty() {
            ops.push(put(&key(VERSION), Vec::new(), 0));
        }
        for op in &commit.operations {
            ops.push(put(&operation_key(op.id), op.encode_to_vec(), 0));
        }
        let response = self.block(self.etcd.txn(compare, ops, Vec::new()))?;
        if response.succeeded {
            Ok(())
        } else {
            Err(StoreError::NotLeader)
        }
    }

    pub fn operations(&self) -> Result<Vec<Operation>, StoreError> {
        self.prefix(OPERATIONS)?
            .iter()
            .map(|kv| decode(&format!("operation {}", suffix(kv, OPERATIONS)), &kv.value))
            .collect()
    }

    pub fn operation(&self, id: u64) -> Result<Option<Operation>, StoreError> {
        let kv = self.block(self.etcd.get(&operation_key(id)))?;
        kv.map(|kv| decode(&format!("operation {id}"), &kv.value))
            .transpose()
    }

    pub fn add_grant(&self, token_hash: &str, grant: &EnrollmentGrant) -> Result<(), StoreError> {
        let op = put(
            &key(&format!("{GRANTS}{token_hash}")),
            grant.to_json().into_bytes(),
            0,
        );
        self.block(self.etcd.txn(Vec::new(), vec![op], Vec::new()))?;
        Ok(())
    }

    pub fn is_enrolled(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.get(&format!("{ENROLLED}{name}"))?.is_some())
    }

    /// The token is spent by deleting it in the same transaction that
    /// records the serial, compared on the grant's revision: two
    /// enrollments racing with one token cannot both succeed.
    pub fn enroll<T>(
        &self,
        token_hash: &str,
        now_unix_ms: i64,
        issue: impl FnOnce(&EnrollmentGrant) -> Result<(T, String), String>,
    ) -> Result<EnrollOutcome<T>, StoreError> {
        let grant_key = key(&format!("{GRANTS}{token_hash}"));
        let Some(kv) = self.block(self.etcd.get(&grant_key))? else {
            return Ok(EnrollOutcome::UnknownToken);
        };
        let grant = EnrollmentGrant::from_json(&text(&kv, "enrollment grant")?)?;
        let spent = modified_at(&grant_key, kv.mod_revision);
        let spend_only = |outcome: EnrollOutcome<T>| -> Result<EnrollOutcome<T>, StoreError> {
            let r = self.block(
                self.etcd
                    .txn(vec![spent.clone()], vec![delete(&grant_key)], Vec::new()),
            )?;
            Ok(if r.succeeded {
                outcome
            } else {
                EnrollOutcome::UnknownToken
            })
        };
        let enrolled_key = key(&format!("{ENROLLED}{}", grant.name));
        if grant.expires_unix_ms < now_unix_ms {
            return spend_only(EnrollOutcome::Expired(grant));
        }
        if self.block(self.etcd.get(&enrolled_key))?.is_some() {
            return spend_only(EnrollOutcome::AlreadyEnrolled(grant));
        }
        match issue(&grant) {
            Err(reason) => spend_only(EnrollOutcome::Refused(reason)),
            Ok((issued, serial)) => {
                let list = serde_json::to_string(&[serial]).unwrap_or_default();
                let r = self.block(self.etcd.txn(
                    vec![spent.clone(), absent(&enrolled_key)],
                    vec![delete(&grant_key), put(&enrolled_key, list.into_bytes(), 0)],
                    Vec::new(),
                ))?;
                if r.succeeded {
                    Ok(EnrollOutcome::Issued(grant, issued))
                } else {
                    // Spent or enrolled by a racing call meanwhile.
                    spend_only(EnrollOutcome::AlreadyEnrolled(grant))
                }
            }
        }
    }

    pub fn add_serial(&self, name: &str, serial: &str) -> Result<bool, StoreError> {
        let enrolled_key = key(&format!("{ENROLLED}{name}"));
        for _ in 0..ATTEMPTS {
            let Some(kv) = self.block(self.etcd.get(&enrolled_key))? else {
                return Ok(false);
            };
            let mut list = serials(&text(&kv, "enrolled serials")?);
            list.push(serial.to_owned());
            let value = serde_json::to_string(&list).unwrap_or_default().into_bytes();
            let r = self.block(self.etcd.txn(
                vec![modified_at(&enrolled_key, kv.mod_revision)],
                vec![put(&enrolled_key, value, 0)],
                Vec::new(),
            ))?;
            if r.succeeded {
                return Ok(true);
            }
        }
        Err(StoreError::Contended(format!("the certificates of {name}")))
    }

    pub fn is_revoked(&self, serial: &str) -> Result<bool, StoreError> {
        Ok(self.get(&format!("{REVOKED}{serial}"))?.is_some())
    }

    pub fn add_operator(&self, record: &OperatorRecord) -> Result<bool, StoreError> {
        let operator = key(&format!("{OPERATORS}{}", record.name));
        let r = self.block(self.etcd.txn(
            vec![absent(&operator)],
            vec![
                put(&operator, record.to_json().into_bytes(), 0),
                put(&key(VERSION), Vec::new(), 0),
            ],
            Vec::new(),
        ))?;
        Ok(r.succeeded)
    }

    pub fn remove_operator(&self, name: &str) -> Result<bool, StoreError> {
        let operator = key(&format!("{OPERATORS}{name}"));
        let Some(kv) = self.block(self.etcd.get(&operator))? else {
            return Ok(false);
        };
        let r = self.block(self.etcd.txn(
            vec![modified_at(&operator, kv.mod_revision)],
            vec![delete(&operator), put(&key(VERSION), Vec::new(), 0)],
            Vec::new(),
        ))?;
        Ok(r.succeeded)
    }

    /// One range read, so the version and the records are of one moment.
    pub fn security_records(&self) -> Result<SecurityRecords, StoreError> {
        let mut records = SecurityRecords::default();
        for kv in self.prefix("security/")? {
            if kv.key == key(VERSION) {
                records.version = kv.mod_revision.max(0) as u64;
            } else if kv.key.starts_with(&key(OPERATORS)) {
                let name = suffix(&kv, OPERATORS);
                records.operators.push(OperatorRecord::from_json(
                    name,
                    &text(&kv, &format!("operator {name}"))?,
                )?);
            } else if kv.key.starts_with(&key(REVOKED)) {
                records.revoked.push(suffix(&kv, REVOKED).to_owned());
            }
        }
        Ok(records)
    }
}
