//! The master's side of replication: which slaves follow it and how far
//! they have applied, wake-ups for log streams, and the sync-mode wait
//! that degrades to async (loudly) when no slave answers in time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use duplex_proto::v1::ServerInfo;
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Sync,
    Async,
}

#[derive(Clone)]
pub struct SlaveEntry {
    pub server: ServerInfo,
    pub applied: u64,
    pub last_seen: SystemTime,
    pub connected: bool,
}

pub struct Hub {
    pub mode: Mode,
    pub sync_timeout: Duration,
    committed: watch::Sender<u64>,
    acked: watch::Sender<u64>,
    slaves: Mutex<HashMap<String, SlaveEntry>>,
    degraded: AtomicBool,
    /// The coordinator says no slave is up to replicate to.
    unmirrored: AtomicBool,
    last_write_ms: std::sync::atomic::AtomicI64,
    /// Times sync replication degraded to async (a metric).
    pub degradations: AtomicU64,
}

impl Hub {
    pub fn new(mode: Mode, sync_timeout: Duration, last_lsn: u64) -> Self {
        Self {
            mode,
            sync_timeout,
            committed: watch::Sender::new(last_lsn),
            acked: watch::Sender::new(0),
            slaves: Mutex::new(HashMap::new()),
            degraded: AtomicBool::new(false),
            unmirrored: AtomicBool::new(false),
            last_write_ms: std::sync::atomic::AtomicI64::new(0),
            degradations: AtomicU64::new(0),
        }
    }

    /// Time of the latest write, for slaves' lag in seconds.
    pub fn last_write_ms(&self) -> i64 {
        self.last_write_ms.load(Ordering::SeqCst)
    }

    pub fn committed(&self, lsn: u64) {
        let now = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        self.last_write_ms.store(now, Ordering::SeqCst);
        self.committed.send_if_modified(|v| {
            let changed = lsn > *v;
            *v = (*v).max(lsn);
            changed
        });
    }

    pub fn subscribe_commits(&self) -> watch::Receiver<u64> {
        self.committed.subscribe()
    }

    pub fn last_committed(&self) -> u64 {
        *self.committed.borrow()
    }

    /// Whether any slave is up at all (from the coordinator): a sync master
    /// with none does not wait out the timeout on every write.
    pub fn set_unmirrored(&self, unmirrored: bool) {
        let was = self.unmirrored.swap(unmirrored, Ordering::SeqCst);
        if unmirrored && !was && self.mode == Mode::Sync {
            tracing::warn!(
                "SYNC REPLICATION SUSPENDED: no slave is up; writes are acknowledged on this server only"
            );
        }
    }

    /// "sync", "async", or the degraded state, for status.
    pub fn describe(&self) -> String {
        if self.mode == Mode::Sync && self.unmirrored.load(Ordering::SeqCst) {
            return "async (sync suspended: no slave is up)".into();
        }
        match (self.mode, self.degraded.load(Ordering::SeqCst)) {
            (Mode::Async, _) => "async".into(),
            (Mode::Sync, false) => "sync".into(),
            (Mode::Sync, true) => "async (degraded from sync: no slave acknowledged in time)".into(),
        }
    }

    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::SeqCst)
    }

    /// In sync mode, waits until a slave has `lsn` durable. Gives up after
    /// `sync_timeout`, degrading to async until a slave catches up again.
    pub async fn wait_replicated(&self, lsn: u64) {
        if self.mode == Mode::Async
            || self.degraded.load(Ordering::SeqCst)
            || self.unmirrored.load(Ordering::SeqCst)
        {
            return;
        }
        let mut acked = self.acked.subscribe();
        let reached = tokio::time::timeout(self.sync_timeout, acked.wait_for(|a| *a >= lsn)).await;
        if !matches!(reached, Ok(Ok(_))) && !self.degraded.swap(true, Ordering::SeqCst) {
            self.degradations.fetch_add(1, Ordering::SeqCst);
            tracing::warn!(
                lsn,
                timeout = ?self.sync_timeout,
                "SYNC REPLICATION DEGRADED TO ASYNC: no slave acknowledged in time; writes are acknowledged \
                 before they are on a slave until one catches up"
            );
        }
    }

    pub fn slave_connected(&self, server: ServerInfo, applied: u64) {
        let id = server.id.clone();
        if let Ok(mut slaves) = self.slaves.lock() {
            slaves.insert(
                server.id.clone(),
                SlaveEntry {
                    server,
                    applied,
                    last_seen: SystemTime::now(),
                    connected: true,
                },
            );
        }
        // A slave that joins already caught up (say, from a snapshot) sends
        // no ack until the next write; count its position now.
        self.slave_applied(&id, applied);
    }

    pub fn slave_disconnected(&self, id: &str) {
        if let Ok(mut slaves) = self.slaves.lock()
            && let Some(s) = slaves.get_mut(id)
        {
            s.connected = false;
        }
    }

    pub fn slave_applied(&self, id: &str, applied: u64) {
        let max = {
            let Ok(mut slaves) = self.slaves.lock() else {
                return;
            };
            if let Some(s) = slaves.get_mut(id) {
                s.applied = s.applied.max(applied);
                s.last_seen = SystemTime::now();
            }
            slaves
                .values()
                .filter(|s| s.connected)
                .map(|s| s.applied)
                .max()
                .unwrap_or(0)
        };
        self.acked.send_if_modified(|v| {
            let changed = max > *v;
            *v = (*v).max(max);
            changed
        });
        if max >= self.last_committed() && self.degraded.swap(false, Ordering::SeqCst) {
            tracing::warn!("sync replication restored: a slave has caught up");
        }
    }

    pub fn slaves(&self) -> Vec<SlaveEntry> {
        self.slaves
            .lock()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The lowest position any slave seen within `retention` still needs.
    pub fn oldest_needed(&self, retention: Duration) -> Option<u64> {
        let now = SystemTime::now();
        self.slaves()
            .iter()
            .filter(|s| s.connected || now.duration_since(s.last_seen).is_ok_and(|d| d < retention))
            .map(|s| s.applied)
            .min()
    }
}
