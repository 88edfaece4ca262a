//! The source side of mirroring: how far each destination has applied
//! (reported by its mirror), and the sync-mode wait that holds a snapshot
//! commit until the other site has it, degrading to async (loudly) when
//! no link answers in time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Sync,
    Async,
}

#[derive(Clone, Debug)]
pub struct Outbound {
    pub destination_id: String,
    pub destination: String,
    pub applied: u64,
}

pub struct Mirroring {
    pub mode: Mode,
    pub sync_wait: Duration,
    links: Mutex<HashMap<String, Outbound>>,
    applied: watch::Sender<u64>,
    degraded: AtomicBool,
    /// The coordinator says no link mirrors this server now.
    unmirrored: AtomicBool,
    pub degradations: AtomicU64,
}

impl Mirroring {
    pub fn new(mode: Mode, sync_wait: Duration) -> Self {
        Self {
            mode,
            sync_wait,
            links: Mutex::new(HashMap::new()),
            applied: watch::Sender::new(0),
            degraded: AtomicBool::new(false),
            unmirrored: AtomicBool::new(false),
            degradations: AtomicU64::new(0),
        }
    }

    /// Whether a link mirrors this server at all (from the coordinator).
    pub fn set_unmirrored(&self, unmirrored: bool) {
        let was = self.unmirrored.swap(unmirrored, Ordering::SeqCst);
        if unmirrored && !was && self.mode == Mode::Sync {
            tracing::warn!(
                "SYNC MIRRORING SUSPENDED: no mirror is assigned (the other site is lost or held until a resync); \
                 snapshots are acknowledged on this site only"
            );
        }
    }

    pub fn describe(&self) -> String {
        if self.mode == Mode::Sync && self.unmirrored.load(Ordering::SeqCst) {
            return "async (sync suspended: no mirror assigned)".into();
        }
        match (self.mode, self.degraded.load(Ordering::SeqCst)) {
            (Mode::Async, _) => "async".into(),
            (Mode::Sync, false) => "sync".into(),
            (Mode::Sync, true) => "async (degraded from sync: the mirror did not confirm in time)".into(),
        }
    }

    pub fn report(&self, out: Outbound, last_seq: u64) {
        let applied = out.applied;
        if let Ok(mut links) = self.links.lock() {
            links.insert(out.destination_id.clone(), out);
        }
        self.applied.send_if_modified(|v| {
            let changed = applied > *v;
            *v = (*v).max(applied);
            changed
        });
        if applied >= last_seq && self.degraded.swap(false, Ordering::SeqCst) {
            tracing::warn!("sync mirroring restored: the other site has caught up");
        }
    }

    pub fn links(&self) -> Vec<Outbound> {
        self.links
            .lock()
            .map(|l| l.values().cloned().collect())
            .unwrap_or_default()
    }

    /// In sync mode, waits until a destination has applied `seq`.
    pub async fn wait_mirrored(&self, seq: u64) {
        if self.mode == Mode::Async
            || self.degraded.load(Ordering::SeqCst)
            || self.unmirrored.load(Ordering::SeqCst)
        {
            return;
        }
        let mut applied = self.applied.subscribe();
        let reached = tokio::time::timeout(self.sync_wait, applied.wait_for(|a| *a >= seq)).await;
        if !matches!(reached, Ok(Ok(_))) && !self.degraded.swap(true, Ordering::SeqCst) {
            self.degradations.fetch_add(1, Ordering::SeqCst);
            tracing::warn!(
                seq,
                wait = ?self.sync_wait,
                "SYNC MIRRORING DEGRADED TO ASYNC: no mirror confirmed in time; snapshots are acknowledged \
                 before they reach the other site until it catches up"
            );
        }
    }
}
