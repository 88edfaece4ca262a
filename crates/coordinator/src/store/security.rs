//! Security records: one-time enrollment tokens (hashes, each bound to one
//! identity), the certificates issued to each server name, revoked serials,
//! and operators (token hashes with a role). A version counter moves with
//! every change that servers must hear about (operators, revocations).

use duplex_types::{OperatorRole, ServerKind};
use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde_json::{Value, json};

use super::{Embedded, StoreError};

/// BLAKE3(token) hex → the grant (JSON).
const TOKENS: TableDefinition<&str, &str> = TableDefinition::new("enrollment_grants");
/// server name → JSON list of the serials issued to it.
const ENROLLED: TableDefinition<&str, &str> = TableDefinition::new("enrolled");
/// revoked serial → when (unix ms).
const REVOKED: TableDefinition<&str, i64> = TableDefinition::new("revoked");
/// operator name → JSON record.
const OPERATORS: TableDefinition<&str, &str> = TableDefinition::new("operators");
const META: TableDefinition<&str, u64> = TableDefinition::new("security_meta");
const VERSION: &str = "version";

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(TOKENS)?;
    txn.open_table(ENROLLED)?;
    txn.open_table(REVOKED)?;
    txn.open_table(OPERATORS)?;
    txn.open_table(META)?;
    Ok(())
}

/// The one identity an enrollment token may enroll, and until when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollmentGrant {
    pub name: String,
    pub site: String,
    pub kind: ServerKind,
    pub expires_unix_ms: i64,
}

impl EnrollmentGrant {
    pub(super) fn to_json(&self) -> String {
        json!({"name": self.name, "site": self.site, "kind": self.kind.as_str(), "expires": self.expires_unix_ms})
            .to_string()
    }

    pub(super) fn from_json(text: &str) -> Result<Self, StoreError> {
        let corrupt = || StoreError::Corrupt("enrollment grant".into());
        let v: Value = serde_json::from_str(text).map_err(|_| corrupt())?;
        Ok(Self {
            name: v["name"].as_str().ok_or_else(corrupt)?.to_owned(),
            site: v["site"].as_str().ok_or_else(corrupt)?.to_owned(),
            kind: v["kind"]
                .as_str()
                .and_then(|k| k.parse().ok())
                .ok_or_else(corrupt)?,
            expires_unix_ms: v["expires"].as_i64().ok_or_else(corrupt)?,
        })
    }
}

/// How spending an enrollment token ended.
#[derive(Debug)]
pub enum EnrollOutcome<T> {
    Issued(EnrollmentGrant, T),
    UnknownToken,
    Expired(EnrollmentGrant),
    /// The name already has a certificate: `duplexctl servers remove` first.
    AlreadyEnrolled(EnrollmentGrant),
    Refused(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorRecord {
    pub name: String,
    pub role: OperatorRole,
    pub token_hash: [u8; 32],
    pub created_unix_ms: i64,
}

impl OperatorRecord {
    pub(super) fn to_json(&self) -> String {
        json!({
            "role": self.role.as_str(),
            "hash": hex::encode(self.token_hash),
            "created": self.created_unix_ms,
        })
        .to_string()
    }

    pub(super) fn from_json(name: &str, text: &str) -> Result<Self, StoreError> {
        let corrupt = || StoreError::Corrupt(format!("operator {name}"));
        let v: Value = serde_json::from_str(text).map_err(|_| corrupt())?;
        let hex = v["hash"].as_str().ok_or_else(corrupt)?;
        let mut token_hash = [0u8; 32];
        if hex.len() != 64 {
            return Err(corrupt());
        }
        for (i, byte) in token_hash.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16).map_err(|_| corrupt())?;
        }
        Ok(Self {
            name: name.to_owned(),
            role: v["role"]
                .as_str()
                .and_then(|r| r.parse().ok())
                .ok_or_else(corrupt)?,
            token_hash,
            created_unix_ms: v["created"].as_i64().ok_or_else(corrupt)?,
        })
    }
}

/// What servers must be told: operators and revoked serials, at a version.
#[derive(Clone, Debug, Default)]
pub struct SecurityRecords {
    pub version: u64,
    pub operators: Vec<OperatorRecord>,
    pub revoked: Vec<String>,
}

fn bump(txn: &WriteTransaction) -> Result<(), StoreError> {
    let mut meta = txn.open_table(META)?;
    let version = meta.get(VERSION)?.map_or(0, |v| v.value());
    meta.insert(VERSION, version + 1)?;
    Ok(())
}

pub(super) fn serials(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

/// Revokes every certificate issued to these names (their removal).
pub(super) fn revoke_servers(txn: &WriteTransaction, names: &[String]) -> Result<(), StoreError> {
    if names.is_empty() {
        return Ok(());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut enrolled = txn.open_table(ENROLLED)?;
    let mut revoked = txn.open_table(REVOKED)?;
    for name in names {
        let issued = enrolled.remove(name.as_str())?.map(|v| serials(v.value()));
        for serial in issued.unwrap_or_default() {
            revoked.insert(serial.as_str(), now)?;
        }
    }
    drop((enrolled, revoked));
    bump(txn)
}

impl Embedded {
    pub fn add_grant(&self, token_hash: &str, grant: &EnrollmentGrant) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(TOKENS)?
            .insert(token_hash, grant.to_json().as_str())?;
        txn.commit()?;
        Ok(())
    }

    pub fn is_enrolled(&self, name: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(ENROLLED)?.get(name)?.is_some())
    }

    /// Spends a token and, if it is good, issues with `issue` and records
    /// the new serial, all in one transaction: a token is used once, and a
    /// name gets a certificate only while it has none.
    pub fn enroll<T>(
        &self,
        token_hash: &str,
        now_unix_ms: i64,
        issue: impl FnOnce(&EnrollmentGrant) -> Result<(T, String), String>,
    ) -> Result<EnrollOutcome<T>, StoreError> {
        let txn = self.db.begin_write()?;
        let outcome = {
            let mut tokens = txn.open_table(TOKENS)?;
            let grant = tokens
                .remove(token_hash)?
                .map(|v| EnrollmentGrant::from_json(v.value()))
                .transpose()?;
            drop(tokens);
            match grant {
                None => EnrollOutcome::UnknownToken,
                Some(g) if g.expires_unix_ms < now_unix_ms => EnrollOutcome::Expired(g),
                Some(g) if txn.open_table(ENROLLED)?.get(g.name.as_str())?.is_some() => {
                    EnrollOutcome::AlreadyEnrolled(g)
                }
                Some(g) => match issue(&g) {
                    Ok((issued, serial)) => {
                        let list = serde_json::to_string(&[serial]).unwrap_or_default();
                        txn.open_table(ENROLLED)?.insert(g.name.as_str(), list.as_str())?;
                        EnrollOutcome::Issued(g, issued)
                    }
                    Err(reason) => EnrollOutcome::Refused(reason),
                },
            }
        };
        // A refused or spent token stays spent.
        txn.commit()?;
        Ok(outcome)
    }

    /// Records a renewed certificate's serial for `name`; false if the name
    /// is no longer enrolled (removed meanwhile).
    pub fn add_serial(&self, name: &str, serial: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let added = {
            let mut enrolled = txn.open_table(ENROLLED)?;
            let current = enrolled.get(name)?.map(|v| serials(v.value()));
            match current {
                None => false,
                Some(mut list) => {
                    list.push(serial.to_owned());
                    let text = serde_json::to_string(&list).unwrap_or_default();
                    enrolled.insert(name, text.as_str())?;
                    true
                }
            }
        };
        txn.commit()?;
        Ok(added)
    }

    pub fn is_revoked(&self, serial: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(REVOKED)?.get(serial)?.is_some())
    }

    /// Adds an operator; false if the name is taken.
    pub fn add_operator(&self, record: &OperatorRecord) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let added = {
            let mut operators = txn.open_table(OPERATORS)?;
            if operators.get(record.name.as_str())?.is_some() {
                false
            } else {
                operators.insert(record.name.as_str(), record.to_json().as_str())?;
                true
            }
        };
        if added {
            bump(&txn)?;
        }
        txn.commit()?;
        Ok(added)
    }

    /// Removes an operator; false if there was none of that name.
    pub fn remove_operator(&self, name: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let removed = txn.open_table(OPERATORS)?.remove(name)?.is_some();
        if removed {
            bump(&txn)?;
        }
        txn.commit()?;
        Ok(removed)
    }

    pub fn security_records(&self) -> Result<SecurityRecords, StoreError> {
        let txn = self.db.begin_read()?;
        let version = txn.open_table(META)?.get(VERSION)?.map_or(0, |v| v.value());
        let mut operators = Vec::new();
        for item in txn.open_table(OPERATORS)?.iter()? {
            let (k, v) = item?;
            operators.push(OperatorRecord::from_json(k.value(), v.value())?);
        }
        let mut revoked = Vec::new();
        for item in txn.open_table(REVOKED)?.iter()? {
            revoked.push(item?.0.value().to_owned());
        }
        Ok(SecurityRecords {
            version,
            operators,
            revoked,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(name: &str, expires: i64) -> EnrollmentGrant {
        EnrollmentGrant {
            name: name.into(),
            site: "a".into(),
            kind: ServerKind::Storage,
            expires_unix_ms: expires,
        }
    }

    #[test]
    fn tokens_are_single_use_bound_and_names_enroll_once() {
        let store = crate::store::Store::in_memory().expect("store");
        store.add_grant("t1", &grant("storage-a", 1_000)).expect("grant");
        store.add_grant("t2", &grant("storage-a", 1_000)).expect("grant");
        store.add_grant("old", &grant("storage-b", 10)).expect("grant");
        let issue = |g: &EnrollmentGrant| Ok((g.name.clone(), format!("serial-{}", g.name)));
        assert!(
            matches!(store.enroll("t1", 500, issue).expect("enroll"), EnrollOutcome::Issued(_, n) if n == "storage-a")
        );
        assert!(matches!(
            store.enroll("t1", 500, issue).expect("enroll"),
            EnrollOutcome::UnknownToken
        ));
        assert!(matches!(
            store.enroll("t2", 500, issue).expect("enroll"),
            EnrollOutcome::AlreadyEnrolled(_)
        ));
        assert!(matches!(
            store.enroll("old", 500, issue).expect("enroll"),
            EnrollOutcome::Expired(_)
        ));
        assert!(store.is_enrolled("storage-a").expect("read"));

        // Removal revokes every serial the name had, and frees the name.
        let before = store.security_records().expect("records").version;
        assert!(store.add_serial("storage-a", "serial-2").expect("renew"));
        let removal = crate::store::Commit {
            remove_servers: vec!["storage-a".to_owned()],
            ..Default::default()
        };
        store.commit(&removal).expect("remove");
        let records = store.security_records().expect("records");
        assert!(records.version > before);
        assert!(store.is_revoked("serial-storage-a").expect("read"));
        assert!(store.is_revoked("serial-2").expect("read"));
        assert!(!store.is_enrolled("storage-a").expect("read"));
        assert!(!store.add_serial("storage-a", "serial-3").expect("renew"));
    }

    #[test]
    fn operators_round_trip() {
        let store = crate::store::Store::in_memory().expect("store");
        let alice = OperatorRecord {
            name: "alice".into(),
            role: OperatorRole::Operator,
            token_hash: [7; 32],
            created_unix_ms: 42,
        };
        assert!(store.add_operator(&alice).expect("add"));
        assert!(!store.add_operator(&alice).expect("add again"));
        assert_eq!(store.security_records().expect("records").operators, vec![alice]);
        assert!(store.remove_operator("alice").expect("remove"));
        assert!(!store.remove_operator("alice").expect("remove again"));
        assert!(store.security_records().expect("records").operators.is_empty());
    }
}
