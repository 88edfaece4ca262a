//! Divergent log entries as an operator sees them: what each one did, in
//! words, in a JSON-lines report (`divergence-<unix>.jsonl`) that
//! `duplexctl accounts reapply` reads back, and which of them may be
//! re-applied on the new master.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use duplex_proto::v1::log_entry::Mutation;
use duplex_proto::v1::{LogEntry, ReapplyEntry};
use duplex_types::{NameKind, ServerId, validate_name};
use prost::Message;
use serde::Serialize;

use crate::error::AccountError;

/// Most entries one `Reapply` call may carry.
pub const MAX_REAPPLY: usize = 20_000;

/// Storage server id → name, for summaries.
pub type ServerNames = HashMap<String, String>;

/// The entry's kind, as the report and `duplexctl accounts reapply` name it.
pub fn kind(entry: &LogEntry) -> &'static str {
    match &entry.mutation {
        Some(Mutation::CreateAccount(_)) => "create-account",
        Some(Mutation::SetGroup(_)) => "set-group-enabled",
        Some(Mutation::PutStorageServer(_)) => "register-storage-server",
        Some(Mutation::SetTicketKey(_)) => "set-ticket-key",
        Some(Mutation::MoveHomes(_)) => "move-homes",
        Some(Mutation::PutAccountKey(_)) => "put-account-key",
        Some(Mutation::RemoveAccountKey(_)) => "remove-account-key",
        Some(Mutation::SetQuota(_)) => "set-quota",
        Some(Mutation::SetAccountToken(_)) => "rotate-token",
        Some(Mutation::SetGroupPolicy(_)) => "set-group-policy",
        Some(Mutation::DeleteAccount(_)) => "delete-account",
        None => "empty",
    }
}

/// Why an entry of this kind is never re-applied, whatever the state.
pub fn never_reapplied(entry: &LogEntry) -> Option<&'static str> {
    match &entry.mutation {
        Some(Mutation::CreateAccount(_) | Mutation::SetGroup(_)) => None,
        Some(Mutation::MoveHomes(_)) => {
            Some("homes are moved by the coordinator (failover and failback), never re-applied")
        }
        Some(Mutation::SetTicketKey(_)) => {
            Some("ticket keys are never re-applied: the master keeps the key storage servers trust")
        }
        Some(Mutation::PutStorageServer(_)) => {
            Some("storage servers register themselves when they are primary, never re-applied")
        }
        Some(Mutation::PutAccountKey(_) | Mutation::RemoveAccountKey(_)) => Some(
            "encryption keys are never re-applied blindly: the account may have a different key now; \
             the wrapped key is in `entry` for a manual recovery",
        ),
        Some(Mutation::SetQuota(_)) => {
            Some("quotas are never re-applied: the account may have another quota now; set it again")
        }
        Some(Mutation::SetGroupPolicy(_)) => Some(
            "keep policies are never re-applied: the group may have another policy now, and a policy deletes \
             snapshots; set it again",
        ),
        Some(Mutation::SetAccountToken(_)) => Some(
            "token rotations are never re-applied: the account's current token stays; rotate again \
             to give the account a new one",
        ),
        Some(Mutation::DeleteAccount(_)) => {
            Some("account deletions are never re-applied: a new account may have the name now; delete again")
        }
        None => Some("the entry holds no mutation"),
    }
}

/// Entries whose encoding holds a secret: listed, never written out.
fn carries_secret(entry: &LogEntry) -> bool {
    matches!(entry.mutation, Some(Mutation::SetTicketKey(_)))
}

/// What the entry did, in words, naming accounts, groups and servers; never
/// a token, a token hash or a key.
pub fn summary(entry: &LogEntry, names: &ServerNames) -> String {
    let server = |id: &str| names.get(id).cloned().unwrap_or_else(|| format!("server {id}"));
    match &entry.mutation {
        Some(Mutation::CreateAccount(c)) => format!(
            "create account {:?} in group {:?}, home {}, quota {} bytes",
            c.name,
            c.group,
            server(&c.home_id),
            c.quota_bytes
        ),
        Some(Mutation::SetGroup(g)) => format!(
            "{} group {:?}",
            if g.enabled { "enable" } else { "disable" },
            g.name
        ),
        Some(Mutation::PutStorageServer(p)) => {
            let s = p.server.clone().unwrap_or_default();
            format!(
                "register storage server {:?} (site {}) at {}",
                s.name, s.site, s.addr
            )
        }
        Some(Mutation::SetTicketKey(_)) => "new ticket signing key (the secret is not listed)".into(),
        Some(Mutation::PutAccountKey(k)) => format!(
            "{} encryption key {} of account {} (wrapped; no passphrase or key in clear)",
            if k.first { "first" } else { "another" },
            k.key.as_ref().map_or("", |r| r.id.as_str()),
            k.account_id
        ),
        Some(Mutation::RemoveAccountKey(k)) => {
            format!("remove encryption key {} of account {}", k.key_id, k.account_id)
        }
        Some(Mutation::SetQuota(q)) => {
            format!("set the quota of account {} to {} bytes", q.id, q.quota_bytes)
        }
        Some(Mutation::SetAccountToken(t)) => {
            format!("new token for account {} (no token or hash listed)", t.id)
        }
        Some(Mutation::SetGroupPolicy(p)) => {
            format!("set the keep policy of group {:?} to {:?}", p.group, p.keep)
        }
        Some(Mutation::DeleteAccount(d)) => format!("delete account {}", d.id),
        Some(Mutation::MoveHomes(m)) => format!(
            "move the accounts homed on {} to {}{}{}",
            server(&m.from_id),
            server(&m.to_id),
            if m.returning {
                " (those returning home only)"
            } else {
                ""
            },
            if m.retire {
                format!("; {} takes no new accounts", server(&m.from_id))
            } else {
                String::new()
            }
        ),
        None => "no mutation".into(),
    }
}

/// One line of the report.
#[derive(Serialize)]
struct Line {
    lsn: u64,
    epoch: u64,
    time: String,
    kind: &'static str,
    summary: String,
    /// The encoded `LogEntry`, base64; absent when it holds a secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    entry: Option<String>,
    /// Whether `duplexctl accounts reapply` may re-apply it.
    reapply: bool,
}

fn line(entry: &LogEntry, names: &ServerNames) -> Line {
    let secret = carries_secret(entry);
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(entry.time_unix_ms.max(0) as u64);
    Line {
        lsn: entry.lsn,
        epoch: entry.epoch,
        time: humantime::format_rfc3339_millis(time).to_string(),
        kind: kind(entry),
        summary: summary(entry, names),
        entry: (!secret).then(|| BASE64.encode(entry.encode_to_vec())),
        reapply: !secret && never_reapplied(entry).is_none(),
    }
}

/// The report's text: one JSON object per entry, one per line.
pub fn report_text(entries: &[LogEntry], names: &ServerNames) -> Result<String, AccountError> {
    let mut text = String::new();
    for entry in entries {
        let json = serde_json::to_string(&line(entry, names))
            .map_err(|e| AccountError::Corrupt(format!("report line for lsn {}: {e}", entry.lsn)))?;
        text.push_str(&json);
        text.push('\n');
    }
    Ok(text)
}

/// Writes the report into `dir` durably (file and directory entry), readable
/// by this server's user only: it holds token hashes. Never replaces an
/// earlier report.
pub fn write_report(dir: &Path, text: &str) -> std::io::Result<PathBuf> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut n = 0;
    let (path, mut file) = loop {
        let suffix = if n == 0 { String::new() } else { format!("-{n}") };
        let path = dir.join(format!("divergence-{now}{suffix}.jsonl"));
        let opened = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path);
        match opened {
            Ok(file) => break (path, file),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 100 => n += 1,
            Err(e) => return Err(e),
        }
    };
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(path)
}

/// Decodes and validates entries sent back for re-applying; the first bad
/// one is refused, naming its report line's LSN.
pub fn decode_entries(entries: &[ReapplyEntry]) -> Result<Vec<LogEntry>, AccountError> {
    if entries.len() > MAX_REAPPLY {
        return Err(AccountError::Invalid(format!(
            "{} entries in one call; at most {MAX_REAPPLY}",
            entries.len()
        )));
    }
    entries.iter().map(decode_entry).collect()
}

fn decode_entry(sent: &ReapplyEntry) -> Result<LogEntry, AccountError> {
    let bad = |why: String| AccountError::Invalid(format!("entry at lsn {}: {why}", sent.lsn));
    let entry = LogEntry::decode(sent.entry.as_slice())
        .map_err(|e| bad(format!("not an encoded log entry ({e})")))?;
    if entry.lsn != sent.lsn {
        return Err(bad(format!("the encoded entry is lsn {}", entry.lsn)));
    }
    validate_mutation(&entry).map_err(bad)?;
    Ok(entry)
}

/// Checks what a re-applied entry would write; kinds never re-applied are
/// not read beyond their kind.
fn validate_mutation(entry: &LogEntry) -> Result<(), String> {
    match &entry.mutation {
        None => Err("the entry holds no mutation".into()),
        Some(Mutation::CreateAccount(c)) => {
            validate_name(NameKind::Account, &c.name).map_err(|e| e.to_string())?;
            validate_name(NameKind::Group, &c.group).map_err(|e| e.to_string())?;
            if c.token_hash.len() != 32 {
                return Err(format!("token hash is {} bytes, not 32", c.token_hash.len()));
            }
            if !c.home_id.is_empty() {
                ServerId::parse(&c.home_id).map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        Some(Mutation::SetGroup(g)) => validate_name(NameKind::Group, &g.name).map_err(|e| e.to_string()),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use duplex_proto::v1::{CreateAccount, SetTicketKey};

    use super::*;

    fn entry(lsn: u64, mutation: Mutation) -> LogEntry {
        LogEntry {
            lsn,
            epoch: 1,
            time_unix_ms: 1_700_000_000_000,
            mutation: Some(mutation),
        }
    }

    fn account(name: &str) -> Mutation {
        Mutation::CreateAccount(CreateAccount {
            id: 7,
            name: name.into(),
            group: "default".into(),
            token_hash: vec![9; 32],
            home_id: "00000000-0000-4000-8000-000000000001".into(),
            quota_bytes: 0,
        })
    }

    fn parse(text: &str) -> serde_json::Value {
        serde_json::from_str(text.trim()).unwrap()
    }

    #[test]
    fn secrets_are_listed_without_their_entry() {
        let key = Mutation::SetTicketKey(SetTicketKey {
            secret: vec![0xAB; 32],
        });
        let line = parse(&report_text(&[entry(3, key)], &ServerNames::new()).unwrap());
        assert_eq!(line["kind"], "set-ticket-key");
        assert_eq!(line["reapply"], false);
        assert!(line.get("entry").is_none(), "{line}");
    }

    #[test]
    fn a_report_line_decodes_back_to_its_entry() {
        let original = entry(5, account("alice"));
        let names = ServerNames::from([(
            "00000000-0000-4000-8000-000000000001".to_owned(),
            "storage-a".to_owned(),
        )]);
        let line = parse(&report_text(std::slice::from_ref(&original), &names).unwrap());
        assert_eq!(line["time"], "2023-11-14T22:13:20.000Z");
        assert_eq!(line["reapply"], true);
        let summary = line["summary"].as_str().unwrap();
        assert!(
            summary.contains("\"alice\"") && summary.contains("storage-a"),
            "{summary}"
        );
        let bytes = BASE64.decode(line["entry"].as_str().unwrap()).unwrap();
        let decoded = decode_entries(&[ReapplyEntry { lsn: 5, entry: bytes }]).unwrap();
        assert_eq!(decoded, vec![original]);
    }

    #[test]
    fn garbage_and_mismatched_entries_name_their_lsn() {
        let garbage = ReapplyEntry {
            lsn: 42,
            entry: vec![0xFF; 7],
        };
        let err = decode_entries(&[garbage]).unwrap_err();
        assert!(err.to_string().contains("lsn 42"), "{err}");
        let moved = ReapplyEntry {
            lsn: 43,
            entry: entry(44, account("bob")).encode_to_vec(),
        };
        let err = decode_entries(&[moved]).unwrap_err();
        assert!(err.to_string().contains("lsn 43"), "{err}");
        let bad_name = ReapplyEntry {
            lsn: 45,
            entry: entry(45, account("../x")).encode_to_vec(),
        };
        assert!(decode_entries(&[bad_name]).is_err());
    }
}
