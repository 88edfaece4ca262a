//! Operator actions served by other servers, reported with their
//! heartbeats. Operators call account servers directly (accounts, groups,
//! re-applied entries), so those servers queue what an operator did and
//! the coordinator records it in history beside its own audit events.
//!
//! The records come from a server, not from the operator: only account
//! servers may report them (their certificate kind, checked against the
//! heartbeat's sender by the service), and each record is validated and
//! cut to size here, once, before it reaches the engine.

use std::collections::HashMap;

use duplex_proto::v1 as pb;
use duplex_types::{OperatorRole, ServerKind, shown};

/// Most records one heartbeat may carry; servers send at most
/// `duplex_rpc::audit::PER_HEARTBEAT`, so more is not a server of ours.
pub const MAX_PER_HEARTBEAT: usize = 256;
/// Longest detail kept, in characters.
pub const DETAIL_CHARS: usize = 256;

/// One reported action, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reported {
    pub seq: u64,
    pub detail: String,
    pub by: String,
    pub role: OperatorRole,
    pub addr: String,
    pub at_ms: i64,
}

/// What one heartbeat's records came to.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Accepted {
    pub records: Vec<Reported>,
    /// Why the others were left out, for the log.
    pub refused: Vec<String>,
    /// The highest sequence number looked at (kept or refused): the server
    /// may drop everything up to it, since sending a refused record again
    /// would not make it acceptable.
    pub considered: u64,
}

/// Validates the records a server of `kind` reported.
pub fn accept(kind: ServerKind, records: Vec<pb::AuditRecord>) -> Accepted {
    let mut accepted = Accepted::default();
    if records.is_empty() {
        return accepted;
    }
    if kind != ServerKind::Account {
        accepted.refused.push(format!(
            "{} records from a {kind} server, which serves no operator actions",
            records.len()
        ));
        return accepted;
    }
    if records.len() > MAX_PER_HEARTBEAT {
        accepted.refused.push(format!(
            "{} records beyond the {MAX_PER_HEARTBEAT} one heartbeat may carry",
            records.len() - MAX_PER_HEARTBEAT
        ));
    }
    for record in records.into_iter().take(MAX_PER_HEARTBEAT) {
        accepted.considered = accepted.considered.max(record.seq);
        match reported(record) {
            Ok(r) => accepted.records.push(r),
            Err(why) => accepted.refused.push(why),
        }
    }
    accepted
}

fn reported(r: pb::AuditRecord) -> Result<Reported, String> {
    if r.by.is_empty() || r.detail.is_empty() {
        return Err(format!("record {} names no operator or no action", r.seq));
    }
    let role = r
        .by_role
        .parse::<OperatorRole>()
        .map_err(|e| format!("record {}: {e}", r.seq))?;
    Ok(Reported {
        seq: r.seq,
        detail: single_line(&cut(&r.detail, DETAIL_CHARS)),
        by: single_line(&shown(&r.by)),
        role,
        addr: single_line(&shown(&r.by_addr)),
        at_ms: r.at_unix_ms,
    })
}

/// At most `chars` characters, ending in "…" when cut.
fn cut(s: &str, chars: usize) -> String {
    match s.char_indices().nth(chars) {
        None => s.to_owned(),
        Some((end, _)) => format!("{}…", &s[..end]),
    }
}

/// History is read line by line: a reported newline must not forge a
/// second event in `duplexctl history`.
fn single_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// The last sequence number recorded from each server's current stream,
/// so a record sent again (its heartbeat's answer was lost) is recorded
/// once. In memory: after a coordinator restart a record whose answer was
/// lost at that moment may show twice, which is the lesser harm.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    last: HashMap<String, (u64, u64)>,
}

impl Seen {
    /// Whether `seq` from `server`'s `stream` is new, noting it if so.
    pub fn fresh(&mut self, server: &str, stream: u64, seq: u64) -> bool {
        match self.last.get_mut(server) {
            Some((s, last)) if *s == stream => {
                if seq <= *last {
                    return false;
                }
                *last = seq;
                true
            }
            _ => {
                // A new stream: the server restarted, its numbers with it.
                self.last.insert(server.to_owned(), (stream, seq));
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, detail: &str) -> pb::AuditRecord {
        pb::AuditRecord {
            seq,
            detail: detail.into(),
            by: "otto".into(),
            by_role: "operator".into(),
            by_addr: "127.0.0.1:4000".into(),
            at_unix_ms: 1,
        }
    }

    #[test]
    fn only_account_servers_report_operator_actions() {
        let a = accept(ServerKind::Storage, vec![record(1, "created account x")]);
        assert!(a.records.is_empty());
        assert_eq!(a.considered, 0);
        assert_eq!(a.refused.len(), 1);
        let a = accept(ServerKind::Account, vec![record(1, "created account x")]);
        assert_eq!(a.records.len(), 1);
        assert_eq!(a.records[0].role, OperatorRole::Operator);
        assert_eq!(a.considered, 1);
    }

    #[test]
    fn bad_records_are_refused_and_large_ones_cut() {
        let mut bad_role = record(2, "x");
        bad_role.by_role = "root".into();
        let mut nobody = record(3, "x");
        nobody.by.clear();
        let long = record(4, &format!("line\nforged {}", "y".repeat(10_000)));
        let a = accept(ServerKind::Account, vec![bad_role, nobody, long]);
        assert_eq!(a.refused.len(), 2, "{:?}", a.refused);
        assert_eq!(a.considered, 4);
        let kept = &a.records[0].detail;
        assert_eq!(kept.chars().count(), DETAIL_CHARS + 1);
        assert!(!kept.contains('\n'));
    }

    #[test]
    fn too_many_records_are_cut_without_a_panic() {
        let many: Vec<_> = (1..=MAX_PER_HEARTBEAT as u64 + 50)
            .map(|i| record(i, "enabled group g"))
            .collect();
        let a = accept(ServerKind::Account, many);
        assert_eq!(a.records.len(), MAX_PER_HEARTBEAT);
        assert_eq!(a.considered, MAX_PER_HEARTBEAT as u64);
        assert_eq!(a.refused.len(), 1);
    }

    #[test]
    fn a_record_sent_again_is_seen_once_and_a_restart_starts_over() {
        let mut seen = Seen::default();
        assert!(seen.fresh("account-a", 7, 1));
        assert!(seen.fresh("account-a", 7, 2));
        assert!(!seen.fresh("account-a", 7, 2));
        assert!(!seen.fresh("account-a", 7, 1));
        assert!(seen.fresh("account-b", 7, 1));
        assert!(seen.fresh("account-a", 9, 1));
    }
}
