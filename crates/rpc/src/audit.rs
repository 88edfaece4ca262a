//! Operator actions a server served, on their way to the coordinator's
//! history. Operators call account servers directly, so the coordinator
//! never sees those calls; each server queues a record of what an operator
//! did and its heartbeats carry the queue. A record leaves the queue only
//! once a heartbeat that carried it was answered: a lost answer sends it
//! again, and the coordinator keeps one copy by `(stream, seq)`.
//!
//! The queue lives in memory and is bounded: a crash before the next
//! answered heartbeat loses what it held (the server's own log still names
//! the operator), and a coordinator unreachable for long loses the oldest
//! records, counted and logged, rather than growing without limit.

use std::collections::VecDeque;
use std::sync::Mutex;

use duplex_proto::v1::AuditRecord;

use crate::auth::{Caller, Who};

/// Most records held while the coordinator does not answer.
pub const OUTBOX_CAPACITY: usize = 1024;
/// Most records one heartbeat carries: a backlog drains over several
/// heartbeats instead of making one of them large.
pub const PER_HEARTBEAT: usize = 64;

#[derive(Debug)]
pub struct Outbox {
    stream: u64,
    capacity: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    next_seq: u64,
    pending: VecDeque<AuditRecord>,
    dropped: u64,
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Outbox {
    pub fn new() -> Self {
        Self::with_capacity(OUTBOX_CAPACITY)
    }

    pub fn with_capacity(capacity: usize) -> Self {
        // Nonzero, so a coordinator can tell "no stream" from a stream.
        let stream = rand::random::<u64>().max(1);
        Self {
            stream,
            capacity: capacity.max(1),
            state: Mutex::new(State {
                next_seq: 1,
                ..State::default()
            }),
        }
    }

    /// Identifies this run of the server: sequence numbers restart with it.
    pub fn stream(&self) -> u64 {
        self.stream
    }

    /// Queues what an operator did. Calls by servers (the coordinator
    /// disabling a group during failback) are already in history as the
    /// operation that made them, and anonymous calls change nothing an
    /// operator must answer for, so only operators are recorded.
    pub fn record(&self, caller: &Caller, detail: String) {
        let Who::Operator { name, role } = &caller.who else {
            return;
        };
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let seq = state.next_seq;
        state.next_seq += 1;
        if state.pending.len() >= self.capacity {
            state.pending.pop_front();
            state.dropped += 1;
            tracing::warn!(
                dropped = state.dropped,
                capacity = self.capacity,
                "the coordinator has not taken operator actions for a while; the oldest is dropped from its history"
            );
        }
        state.pending.push_back(AuditRecord {
            seq,
            detail,
            by: name.clone(),
            by_role: role.as_str().to_owned(),
            by_addr: caller.addr.clone(),
            at_unix_ms: now_unix_ms(),
        });
    }

    /// The oldest records not yet acknowledged, at most [`PER_HEARTBEAT`].
    pub fn pending(&self) -> Vec<AuditRecord> {
        self.state
            .lock()
            .map(|s| s.pending.iter().take(PER_HEARTBEAT).cloned().collect())
            .unwrap_or_default()
    }

    /// The coordinator answered a heartbeat that carried records up to `seq`.
    pub fn acknowledge(&self, seq: u64) {
        if let Ok(mut state) = self.state.lock() {
            while state.pending.front().is_some_and(|r| r.seq <= seq) {
                state.pending.pop_front();
            }
        }
    }

    /// Records lost because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.state.lock().map_or(0, |s| s.dropped)
    }

    pub fn len(&self) -> usize {
        self.state.lock().map_or(0, |s| s.pending.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use duplex_types::{OperatorRole, ServerKind};

    use super::*;
    use crate::tls::ServerIdentity;

    fn operator(name: &str) -> Caller {
        Caller {
            who: Who::Operator {
                name: name.into(),
                role: OperatorRole::Operator,
            },
            addr: "127.0.0.1:5000".into(),
        }
    }

    #[test]
    fn records_operators_only_until_acknowledged() {
        let outbox = Outbox::new();
        outbox.record(&operator("otto"), "created account alice in group g".into());
        let server = Caller {
            who: Who::Server(ServerIdentity {
                site: "a".into(),
                kind: ServerKind::Coordinator,
                name: "coordinator".into(),
            }),
            addr: "127.0.0.1:1".into(),
        };
        outbox.record(&server, "disabled group g".into());
        outbox.record(&operator("olga"), "disabled group g".into());
        let sent = outbox.pending();
        assert_eq!(sent.len(), 2);
        assert_eq!(
            (
                sent[0].by.as_str(),
                sent[0].by_role.as_str(),
                sent[0].by_addr.as_str()
            ),
            ("otto", "operator", "127.0.0.1:5000")
        );
        assert!(sent[0].seq < sent[1].seq);
        // An unanswered heartbeat leaves them queued; an answered one drops
        // what it carried and nothing recorded since.
        assert_eq!(outbox.pending(), sent);
        outbox.record(&operator("otto"), "enabled group g".into());
        outbox.acknowledge(sent[1].seq);
        let left = outbox.pending();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].detail, "enabled group g");
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts() {
        let outbox = Outbox::with_capacity(3);
        for i in 0..5 {
            outbox.record(&operator("otto"), format!("action {i}"));
        }
        assert_eq!(outbox.len(), 3);
        assert_eq!(outbox.dropped(), 2);
        assert_eq!(outbox.pending()[0].detail, "action 2");
    }

    #[test]
    fn one_heartbeat_carries_a_bounded_batch() {
        let outbox = Outbox::new();
        for i in 0..PER_HEARTBEAT + 10 {
            outbox.record(&operator("otto"), format!("action {i}"));
        }
        let first = outbox.pending();
        assert_eq!(first.len(), PER_HEARTBEAT);
        outbox.acknowledge(first[PER_HEARTBEAT - 1].seq);
        assert_eq!(outbox.pending().len(), 10);
    }
}
