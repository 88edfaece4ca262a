//! What the coordinator has seen: the latest heartbeat of each server and
//! the leases it granted. Kept in memory only; a restarted coordinator
//! rebuilds it within a heartbeat interval, and waits out a full lease
//! before fencing anyone, since it no longer knows what it granted. The
//! one exception is each standby's last known lag (`RecordedLag`), which
//! is also stored: a coordinator that takes over after a source died with
//! the coordinator that heard it can still bound what a failover loses.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::model::{Lag, Report};

#[derive(Clone, Debug)]
pub struct Seen {
    pub report: Report,
    pub at: Instant,
    pub wall_ms: i64,
    /// When this server was last granted a write lease.
    pub granted_at: Option<Instant>,
    /// Whether the answer to this heartbeat granted a lease.
    pub leased: bool,
}

/// How far a standby was behind its source, as the source (or, for an
/// account slave, its master's position history) last told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LagSample {
    pub source: String,
    /// Wall-clock ms when it was that far behind.
    pub wall_ms: i64,
    pub lag_ms: u64,
}

/// The last known lag of each standby, by standby name.
pub type RecordedLag = BTreeMap<String, LagSample>;

/// Stored as JSON: `{"storage-b": ["storage-a", wall_ms, lag_ms]}`.
pub fn encode_lag(lag: &RecordedLag) -> Vec<u8> {
    let map: serde_json::Map<String, serde_json::Value> = lag
        .iter()
        .map(|(k, s)| (k.clone(), serde_json::json!([s.source, s.wall_ms, s.lag_ms])))
        .collect();
    serde_json::Value::Object(map).to_string().into_bytes()
}

/// None when the bytes are not a recorded lag.
pub fn decode_lag(bytes: &[u8]) -> Option<RecordedLag> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    v.as_object()?
        .iter()
        .map(|(k, s)| {
            Some((
                k.clone(),
                LagSample {
                    source: s[0].as_str()?.to_owned(),
                    wall_ms: s[1].as_i64()?,
                    lag_ms: s[2].as_u64()?,
                },
            ))
        })
        .collect()
}

#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub seen: BTreeMap<String, Seen>,
    /// Each account server's position over time (changes only, bounded),
    /// so the coordinator can tell how much a lagging slave lacks of a
    /// master that is gone.
    pub positions: BTreeMap<String, VecDeque<(u64, Instant)>>,
    /// Each standby's last known lag, as last stored (loaded at start).
    pub recorded_lag: RecordedLag,
}

/// Position changes kept per account server.
const POSITIONS_KEPT: usize = 4096;

impl Observed {
    /// Records a heartbeat.
    pub fn record(&mut self, seen: Seen) {
        let name = seen.report.member.name.clone();
        if seen.report.member.kind == duplex_types::ServerKind::Account {
            let history = self.positions.entry(name.clone()).or_default();
            if history.back().is_none_or(|(p, _)| *p != seen.report.position) {
                history.push_back((seen.report.position, seen.at));
                if history.len() > POSITIONS_KEPT {
                    history.pop_front();
                }
            }
        }
        self.seen.insert(name, seen);
    }

    /// How long before its last heartbeat `master` went past `position`:
    /// the span of writes a server at `position` lacks. Zero when it has
    /// all `master` reported; `None` when the history does not reach back.
    pub fn behind_for(&self, master: &str, position: u64) -> Option<Duration> {
        let last = self.seen.get(master)?;
        if position >= last.report.position {
            return Some(Duration::ZERO);
        }
        let history = self.positions.get(master)?;
        let (_, since) = history.iter().rev().find(|(p, _)| *p <= position)?;
        Some(last.at.saturating_duration_since(*since))
    }

    pub fn get(&self, name: &str) -> Option<&Seen> {
        self.seen.get(name)
    }

    /// Heard from within `timeout`.
    pub fn healthy(&self, name: &str, now: Instant, timeout: Duration) -> bool {
        self.silent_for(name, now).is_some_and(|d| d < timeout)
    }

    /// How long since the last heartbeat; `None` if never heard from.
    pub fn silent_for(&self, name: &str, now: Instant) -> Option<Duration> {
        self.seen.get(name).map(|s| now.saturating_duration_since(s.at))
    }

    /// The lag a storage primary last reported for its link into `destination_id`.
    pub fn outbound_lag(&self, source: &str, destination_id: &str) -> Option<Lag> {
        self.seen
            .get(source)
            .and_then(|s| s.report.outbound.get(destination_id).copied().flatten())
    }

    /// The largest lag any primary reports for its link into `destination_id`.
    pub fn inbound_lag(&self, destination_id: &str) -> Option<Lag> {
        self.seen
            .values()
            .filter_map(|s| s.report.outbound.get(destination_id).copied().flatten())
            .max_by_key(|l| l.records)
    }
}
