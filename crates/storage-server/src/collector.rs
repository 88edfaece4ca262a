//! Runs garbage collection: in the background every interval, and on
//! demand (`StorageAdmin/CollectGarbage`, `duplexctl prune`). Rounds never
//! overlap; a request while one runs joins it.

use std::sync::Arc;
use std::time::Duration;

use duplex_proto::v1::GcReport as ProtoReport;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::store::Store;
use crate::store::gc::{GcReport, GcSettings};

pub struct Collector {
    store: Arc<Store>,
    settings: GcSettings,
    /// Held while a round runs; its value is the last round's report.
    running: Arc<Mutex<Option<GcReport>>>,
}

impl Collector {
    pub fn new(store: Arc<Store>, settings: GcSettings) -> Self {
        Self {
            store,
            settings,
            running: Default::default(),
        }
    }

    /// Runs a round now and returns its report; waits for one in progress first.
    pub async fn run(&self) -> Result<GcReport, Status> {
        let mut last = self.running.lock().await;
        let report = self.round().await?;
        *last = Some(report.clone());
        Ok(report)
    }

    /// Starts a round unless one is running; true when it started one.
    pub fn start(self: &Arc<Self>) -> bool {
        let Ok(guard) = self.running.clone().try_lock_owned() else {
            return false;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let mut last = guard;
            match this.round().await {
                Ok(report) => *last = Some(report),
                Err(e) => tracing::error!(error = %e.message(), "garbage collection failed"),
            }
        });
        true
    }

    /// The last finished round's report, unless one is running.
    pub fn last(&self) -> Option<GcReport> {
        self.running.try_lock().ok().and_then(|r| r.clone())
    }

    async fn round(&self) -> Result<GcReport, Status> {
        let store = self.store.clone();
        let settings = self.settings.clone();
        let (done, report) = tokio::sync::oneshot::channel();
        // A thread of its own, so the lower priority stays with the round
        // and never reaches a pooled thread that serves a backup next.
        std::thread::Builder::new()
            .name("gc".into())
            .spawn(move || {
                yield_to_foreground();
                let _ = done.send(store.collect_garbage(&settings));
            })
            .map_err(|e| Status::internal(format!("starting garbage collection: {e}")))?;
        let report = report
            .await
            .map_err(|_| Status::internal("garbage collection stopped without a report"))??;
        tracing::info!(
            swept_chunks = report.swept_chunks,
            swept_bytes = report.swept_bytes,
            packs_rewritten = report.packs_rewritten,
            packs_deleted = report.packs_deleted,
            reclaimed_bytes = report.reclaimed_bytes,
            deferred = report.sweep_deferred,
            ms = report.duration_ms,
            "garbage collection round"
        );
        Ok(report)
    }

    /// Runs a round every `interval` until shutdown (never when zero).
    pub async fn background(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        if interval.is_zero() {
            return;
        }
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    if let Err(e) = self.run().await {
                        tracing::error!(error = %e.message(), "garbage collection failed");
                    }
                }
            }
        }
    }
}

/// Lowers the calling thread's CPU priority to the least (nice 19): on two
/// busy cores a round otherwise takes its full share from the backups
/// running beside it. Linux keeps the nice value per thread.
fn yield_to_foreground() {
    // SAFETY: setpriority(2) only reads its integer arguments; `who` 0 is
    // the calling thread.
    #[allow(unsafe_code)]
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    if r != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "garbage collection runs at normal priority");
    }
}

pub fn to_proto(r: &GcReport) -> ProtoReport {
    ProtoReport {
        live_chunks: r.live_chunks,
        swept_chunks: r.swept_chunks,
        swept_bytes: r.swept_bytes,
        packs_rewritten: r.packs_rewritten,
        packs_deleted: r.packs_deleted,
        reclaimed_bytes: r.reclaimed_bytes,
        accounts_skipped: r.accounts_skipped,
        duration_ms: r.duration_ms,
        sweep_ms: r.sweep_ms,
        compact_ms: r.compact_ms,
        sweep_deferred: r.sweep_deferred,
    }
}
