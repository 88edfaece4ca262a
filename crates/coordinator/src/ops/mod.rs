//! Failover, switchover, failback and resync as durable state machines.
//!
//! An operation and its plan (every choice it made: new epoch, which
//! servers are fenced, which server takes which role, which homes move)
//! are persisted before its first phase acts; each phase is recorded as
//! started before it acts and as finished after. Every action is
//! idempotent, so a coordinator killed anywhere resumes the operation at
//! its unfinished phase and finishes it.

pub mod actions;
mod phases;
pub mod plan;

use std::sync::Arc;
use std::time::Duration;

use duplex_proto::v1::{Operation, OperationPlan, PhaseRecord};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::core::{Core, wall_ms};

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{what}: {message}")]
    Rpc { what: String, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Status(#[from] Status),
}

pub const FAILOVER: &[&str] = &[
    "fence",
    "promote-account",
    "stop-links",
    "promote-storage",
    "repoint-homes",
    "resume",
];
pub const SWITCHOVER: &[&str] = &[
    "fence",
    "drain",
    "switch-roles",
    "repoint-homes",
    "restore-mirroring",
];
pub const FAILBACK: &[&str] = &[
    "rejoin",
    "reverse-mirroring",
    "block-backups",
    "fence",
    "drain",
    "switch-roles",
    "repoint-homes",
    "restore-mirroring",
    "unblock-backups",
    "verify",
];
pub const RESYNC: &[&str] = &["release"];

fn phases_of(kind: &str) -> &'static [&'static str] {
    match kind {
        "failover" => FAILOVER,
        "switchover" => SWITCHOVER,
        "failback" => FAILBACK,
        "resync" => RESYNC,
        _ => &[],
    }
}

/// Persists a new operation and wakes the runner; refused while another runs.
pub async fn start(
    core: &Arc<Core>,
    kind: &str,
    plan: OperationPlan,
    detail: String,
    automatic: bool,
    forced: bool,
) -> Result<Operation, Status> {
    let mut inner = core.lock().await;
    if let Some(running) = inner.operation.as_ref().filter(|op| op.state == "running") {
        return Err(Status::failed_precondition(format!(
            "a {} is already running (phase {}); wait for it to finish (`duplexctl status`)",
            running.kind,
            Core::phase(&inner)
        )));
    }
    let op = Operation {
        id: crate::core::durably(|| core.store.next_operation_id())?,
        kind: kind.to_owned(),
        state: "running".into(),
        detail,
        started_unix_ms: wall_ms(),
        automatic,
        forced,
        plan: Some(plan),
        ..Default::default()
    };
    tracing::warn!(id = op.id, kind, detail = %op.detail, "operation started");
    core.save_operation(&mut inner, op.clone())?;
    drop(inner);
    crate::notify::send(core.config.webhook.as_deref(), &op);
    core.wake.notify_one();
    Ok(op)
}

/// Records a one-off event (a refused failover, a fencing) in history.
pub async fn record(core: &Core, kind: &str, state: &str, detail: String) -> Result<(), Status> {
    let mut inner = core.lock().await;
    let now = wall_ms();
    let op = Operation {
        id: crate::core::durably(|| core.store.next_operation_id())?,
        kind: kind.to_owned(),
        state: state.to_owned(),
        detail,
        started_unix_ms: now,
        finished_unix_ms: now,
        automatic: true,
        ..Default::default()
    };
    tracing::warn!(kind, detail = %op.detail, "event");
    crate::core::durably(|| core.store.save_operation(&op))?;
    // A one-off event does not replace a running operation as the current one.
    if inner.operation.as_ref().is_none_or(|o| o.state != "running") {
        inner.operation = Some(op.clone());
    }
    drop(inner);
    crate::notify::send(core.config.webhook.as_deref(), &op);
    Ok(())
}

/// Runs (or resumes) the current operation whenever there is one.
pub async fn runner(core: Arc<Core>, stop: CancellationToken) {
    loop {
        let running = core
            .lock()
            .await
            .operation
            .clone()
            .filter(|op| op.state == "running");
        if let Some(op) = running {
            let id = op.id;
            let outcome = execute(&core, op).await;
            if let Err(e) = finish(&core, id, outcome).await {
                tracing::error!(error = %e, "cannot record the end of an operation");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = core.wake.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

async fn execute(core: &Arc<Core>, mut op: Operation) -> Result<(), OpError> {
    for &name in phases_of(&op.kind) {
        if op.phases.iter().any(|p| p.name == name && p.finished_unix_ms > 0) {
            continue;
        }
        if !op.phases.iter().any(|p| p.name == name) {
            op.phases.push(PhaseRecord {
                name: name.to_owned(),
                started_unix_ms: wall_ms(),
                finished_unix_ms: 0,
            });
            op = save(core, op).await?;
            core.publish().await;
        }
        failpoint(&op.kind, name);
        tracing::info!(op = op.id, kind = %op.kind, phase = name, "phase");
        op = phases::run(core, op, name).await?;
        if let Some(p) = op.phases.iter_mut().find(|p| p.name == name) {
            p.finished_unix_ms = wall_ms();
        }
        op = save(core, op).await?;
    }
    Ok(())
}

/// Persists the operation's progress (keeping a later plan if the phase
/// changed it through `save`).
pub async fn save(core: &Arc<Core>, op: Operation) -> Result<Operation, OpError> {
    let mut inner = core.lock().await;
    core.save_operation(&mut inner, op.clone())?;
    Ok(op)
}

async fn finish(core: &Arc<Core>, id: u64, outcome: Result<(), OpError>) -> Result<(), OpError> {
    let mut inner = core.lock().await;
    let Some(mut op) = inner.operation.clone().filter(|o| o.id == id) else {
        return Ok(());
    };
    op.finished_unix_ms = wall_ms();
    match outcome {
        Ok(()) => {
            op.state = "done".into();
            tracing::warn!(id, kind = %op.kind, "operation finished");
        }
        Err(e) => {
            op.state = "failed".into();
            op.error = e.to_string();
            tracing::error!(id, kind = %op.kind, error = %e, "operation failed");
        }
    }
    core.save_operation(&mut inner, op.clone())?;
    drop(inner);
    crate::notify::send(core.config.webhook.as_deref(), &op);
    core.publish().await;
    Ok(())
}

static FAILPOINTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Arms fail points; only `duplex-coordinator-failpoints` (the
/// `failpoints` feature) calls this.
pub fn arm_failpoints() {
    FAILPOINTS.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// When armed, aborts the process at the start of the phase named by
/// `DUPLEX_FAILPOINT` (`KIND:PHASE`), after the phase was recorded as
/// started: the restarted coordinator must resume it.
fn failpoint(kind: &str, phase: &str) {
    if FAILPOINTS.load(std::sync::atomic::Ordering::SeqCst)
        && std::env::var("DUPLEX_FAILPOINT").is_ok_and(|f| f == format!("{kind}:{phase}"))
    {
        tracing::error!(kind, phase, "fail point reached: aborting");
        std::process::abort();
    }
}
