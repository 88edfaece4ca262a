//! This account server's role (master or slave, with its epoch), the
//! transitions between them, and the guard every write passes.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use duplex_proto::v1::{AccountServerStatus, Lag, ServerInfo, SlaveStatus};
use duplex_types::{Epoch, Lsn};
use tokio::sync::{RwLock, RwLockReadGuard};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::metadata::MetadataValue;

use crate::error::AccountError;
use crate::follower::{self, Progress};
use crate::hub::Hub;
use crate::store::{AccountStore, RoleState, meta};

/// Metadata key naming the master on a FAILED_PRECONDITION from a slave,
/// so clients can retry there without parsing the message.
pub const MASTER_METADATA_KEY: &str = "duplex-master";

pub struct Node {
    pub store: Arc<AccountStore>,
    pub info: ServerInfo,
    pub hub: Arc<Hub>,
    pub data_dir: PathBuf,
    role: RwLock<RoleState>,
    follower: Mutex<Option<CancellationToken>>,
    pub progress: Arc<Mutex<Progress>>,
    /// Cancelled when this server stops being master, ending log streams.
    mastership: Mutex<CancellationToken>,
    /// Cancelled when the server starts draining.
    pub shutdown: CancellationToken,
    /// The master's write lease from the coordinator.
    pub lease: Arc<duplex_rpc::heartbeat::Lease>,
}

impl Node {
    pub fn new(
        store: Arc<AccountStore>,
        info: ServerInfo,
        hub: Arc<Hub>,
        data_dir: PathBuf,
        role: RoleState,
        lease: Arc<duplex_rpc::heartbeat::Lease>,
        shutdown: CancellationToken,
    ) -> Arc<Node> {
        let node = Arc::new(Node {
            store,
            info,
            hub,
            data_dir,
            role: RwLock::new(role.clone()),
            follower: Mutex::new(None),
            progress: Arc::new(Mutex::new(Progress::default())),
            mastership: Mutex::new(shutdown.child_token()),
            shutdown,
            lease,
        });
        if !role.is_master {
            node.start_follower(role.master.clone());
        }
        node
    }

    pub async fn role(&self) -> RoleState {
        self.role.read().await.clone()
    }

    /// Holds the role steady for one write; refuses on a slave and on a
    /// master whose lease has lapsed.
    pub async fn write_guard(&self) -> Result<RwLockReadGuard<'_, RoleState>, Status> {
        let role = self.role.read().await;
        if !role.is_master {
            return Err(not_master(&self.info.name, &role.master));
        }
        self.lease.check(&self.info.name)?;
        Ok(role)
    }

    /// Converges to the coordinator's assignment (a no-op when it matches).
    pub async fn apply_assignment(self: &Arc<Self>, assignment: duplex_proto::v1::Assignment) {
        self.hub.set_unmirrored(assignment.unmirrored);
        let current = self.role().await;
        let epoch = Epoch(assignment.epoch);
        let result = match assignment.role.as_str() {
            "master" if !current.is_master || current.epoch != epoch => self.promote(epoch).await,
            "slave"
                if (current.is_master || current.epoch != epoch || current.master != assignment.leader)
                    && !assignment.leader.is_empty() =>
            {
                self.demote(epoch, assignment.leader).await
            }
            _ => Ok(()),
        };
        if let Err(status) = result {
            tracing::warn!(%status, "cannot take the role the coordinator assigned");
        }
    }

    /// A token cancelled when mastership ends (for log streams).
    pub fn mastership(&self) -> CancellationToken {
        self.mastership.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// The epoch this server holds its role under.
    pub async fn epoch(&self) -> Epoch {
        self.role.read().await.epoch
    }

    pub async fn promote(self: &Arc<Self>, epoch: Epoch) -> Result<(), Status> {
        let mut role = self.role.write().await;
        check_epoch(&role, epoch)?;
        if role.is_master && role.epoch == epoch {
            return Ok(());
        }
        if role.is_master {
            // Still master, under a newer epoch: nothing to stop or restart.
            let state = RoleState {
                epoch,
                ..role.clone()
            };
            self.persist(&state).await?;
            *role = state;
            return Ok(());
        }
        // Hot standby: every batch received was applied before it was
        // acknowledged, so stopping the follower leaves nothing to replay.
        self.stop_follower();
        let state = RoleState {
            is_master: true,
            epoch,
            master: String::new(),
        };
        self.persist(&state).await?;
        *role = state;
        if let Ok(mut m) = self.mastership.lock() {
            *m = self.shutdown.child_token();
        }
        let last = self.store.last_lsn().map_err(Status::from)?;
        self.hub.committed(last.0);
        tracing::warn!(epoch = epoch.0, lsn = last.0, "promoted to master");
        self.snapshot_in_background("role change");
        Ok(())
    }

    pub async fn demote(self: &Arc<Self>, epoch: Epoch, master: String) -> Result<(), Status> {
        let mut role = self.role.write().await;
        check_epoch(&role, epoch)?;
        if !role.is_master && role.epoch == epoch && role.master == master {
            return Ok(());
        }
        if !role.is_master && role.master == master {
            // Same master, newer epoch: keep following without a reconnect.
            let state = RoleState {
                epoch,
                ..role.clone()
            };
            self.persist(&state).await?;
            *role = state;
            return Ok(());
        }
        let state = RoleState {
            is_master: false,
            epoch,
            master: master.clone(),
        };
        self.persist(&state).await?;
        *role = state;
        if let Ok(m) = self.mastership.lock() {
            m.cancel();
        }
        self.stop_follower();
        self.start_follower(master.clone());
        tracing::warn!(epoch = epoch.0, %master, "demoted to slave");
        Ok(())
    }

    async fn persist(&self, state: &RoleState) -> Result<(), Status> {
        let store = self.store.clone();
        let state = state.clone();
        tokio::task::spawn_blocking(move || store.save_role(&state))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(Status::from)
    }

    fn start_follower(self: &Arc<Self>, master: String) {
        let token = self.shutdown.child_token();
        if let Ok(mut f) = self.follower.lock() {
            *f = Some(token.clone());
        }
        tokio::spawn(follower::run(self.clone(), master, token));
    }

    fn stop_follower(&self) {
        if let Ok(mut f) = self.follower.lock()
            && let Some(token) = f.take()
        {
            token.cancel();
        }
    }

    /// Writes a state snapshot and trims the log behind it (keeping what
    /// any recently seen slave still needs).
    pub fn snapshot_in_background(self: &Arc<Self>, why: &'static str) {
        let node = self.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = node.snapshot_and_trim() {
                tracing::error!(error = %e, why, "state snapshot failed");
            }
        });
    }

    pub fn snapshot_and_trim(&self) -> Result<(), AccountError> {
        let (lsn, path) = self.store.write_snapshot_file(&self.data_dir.join("snapshots"))?;
        let keep_from = match self.hub.oldest_needed(Duration::from_secs(24 * 3600)) {
            Some(needed) => needed.min(lsn.0),
            None => lsn.0,
        };
        let removed = self.store.trim_log_before(duplex_types::Lsn(keep_from + 1))?;
        tracing::info!(lsn = lsn.0, path = %path.display(), trimmed = removed, "state snapshot written");
        Ok(())
    }

    pub async fn status(&self) -> Result<AccountServerStatus, AccountError> {
        let role = self.role().await;
        let store = self.store.clone();
        let (lsn, hash, accounts, divergent, report, bootstraps, snapshot_lsn, log_start) =
            tokio::task::spawn_blocking(move || {
                Ok::<_, AccountError>((
                    store.last_lsn()?,
                    store.state_hash()?,
                    store.account_count()?,
                    store.meta_u64(meta::DIVERGENT)?,
                    store.meta_str(meta::DIVERGENCE_REPORT)?,
                    store.meta_u64(meta::BOOTSTRAPS)?,
                    store.meta_u64(meta::SNAPSHOT_LSN)?,
                    store.log_start()?,
                ))
            })
            .await
            .map_err(|e| AccountError::Corrupt(e.to_string()))??;
        let mut status = AccountServerStatus {
            server: Some(self.info.clone()),
            role: match (role.is_master, self.lease.valid()) {
                (true, true) => "master",
                (true, false) => "fenced",
                (false, _) => "slave",
            }
            .into(),
            epoch: role.epoch.0,
            lsn: lsn.0,
            state_hash: hash,
            accounts,
            replication: self.hub.describe(),
            divergent_entries: divergent,
            divergence_report: report,
            bootstraps,
            snapshot_lsn,
            log_start_lsn: log_start.0,
            ..Default::default()
        };
        if role.is_master {
            let slaves: Vec<_> = self.hub.slaves().into_iter().filter(|s| s.connected).collect();
            let store = self.store.clone();
            let positions: Vec<u64> = slaves.iter().map(|s| s.applied).collect();
            let pending = tokio::task::spawn_blocking(move || {
                positions
                    .into_iter()
                    .map(|p| store.pending_after(Lsn(p)))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await
            .map_err(|e| AccountError::Corrupt(e.to_string()))??;
            let now = millis(std::time::SystemTime::now());
            status.slaves = slaves
                .into_iter()
                .zip(pending)
                .map(|(s, (bytes, oldest))| SlaveStatus {
                    lag: Some(Lag {
                        records: lsn.0.saturating_sub(s.applied),
                        bytes,
                        seconds: oldest.map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0),
                    }),
                    applied_lsn: s.applied,
                    last_seen_unix_ms: millis(s.last_seen),
                    server: Some(s.server),
                })
                .collect();
        } else {
            status.master = role.master.clone();
            let log_bytes = self.store.meta_u64(meta::LOG_BYTES)?;
            status.lag = Some(
                self.progress
                    .lock()
                    .map(|p| p.lag(lsn.0, log_bytes))
                    .unwrap_or_default(),
            );
        }
        Ok(status)
    }
}

fn millis(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn check_epoch(role: &RoleState, epoch: Epoch) -> Result<(), Status> {
    if epoch < role.epoch {
        return Err(Status::failed_precondition(format!(
            "stale epoch {} refused: this server holds epoch {}",
            epoch.0, role.epoch.0
        )));
    }
    Ok(())
}

pub fn not_master(name: &str, master: &str) -> Status {
    let mut status = Status::failed_precondition(format!(
        "{name} is a read-only slave; send writes to the master at {master}"
    ));
    if let Ok(v) = MetadataValue::try_from(master) {
        status.metadata_mut().insert(MASTER_METADATA_KEY, v);
    }
    status
}
