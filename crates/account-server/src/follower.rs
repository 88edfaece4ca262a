//! The slave's side of replication: find where its log agrees with the
//! master's, bootstrap from a snapshot if it must, then apply the master's
//! log as it arrives (hot standby) and acknowledge what is durable.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use duplex_proto::v1::account_replication_client::AccountReplicationClient;
use duplex_proto::v1::{
    EpochHistory, GetEpochHistoryRequest, GetStateSnapshotRequest, Lag, LogEntry, ReplicaHello,
    ReplicaMessage, replica_message,
};
use duplex_types::Lsn;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::divergence;
use crate::error::AccountError;
use crate::node::Node;
use crate::store::log::epoch_in;
use crate::store::snapshot::{MAX_SNAPSHOT_BYTES, decompress};

/// Metadata key on the master's refusal telling a slave to bootstrap.
pub const BOOTSTRAP_METADATA_KEY: &str = "duplex-bootstrap";

/// What the slave last heard from its master, for lag.
#[derive(Default, Clone)]
pub struct Progress {
    pub connected: bool,
    pub master_lsn: u64,
    pub master_time_ms: i64,
    pub master_log_bytes: u64,
    pub last_applied_time_ms: i64,
}

impl Progress {
    pub fn lag(&self, applied: u64, log_bytes: u64) -> Lag {
        let records = self.master_lsn.saturating_sub(applied);
        Lag {
            records,
            bytes: self.master_log_bytes.saturating_sub(log_bytes),
            seconds: if records == 0 {
                0.0
            } else {
                (self.master_time_ms - self.last_applied_time_ms).max(0) as f64 / 1000.0
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum FollowError {
    #[error("master: {0}")]
    Rpc(#[from] tonic::Status),
    #[error(transparent)]
    Store(#[from] AccountError),
    #[error("must bootstrap: {0}")]
    Bootstrap(String),
}

pub async fn run(node: Arc<Node>, master: String, stop: CancellationToken) {
    let mut backoff = duplex_rpc::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    tracing::info!(%master, "following master");
    loop {
        let result = tokio::select! {
            () = stop.cancelled() => break,
            r = follow_once(&node, &master) => r,
        };
        set(&node.progress, |p| p.connected = false);
        match result {
            Ok(()) => backoff.reset(),
            Err(FollowError::Bootstrap(why)) => {
                tracing::warn!(%why, "bootstrapping from the master's snapshot");
                let bootstrapped = tokio::select! {
                    () = stop.cancelled() => break,
                    r = bootstrap(&node, &master) => r,
                };
                if let Err(e) = bootstrapped {
                    tracing::error!(error = %e, "bootstrap failed");
                }
                continue;
            }
            Err(e) => tracing::warn!(error = %e, %master, "replication interrupted; retrying"),
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(backoff.next_pause()) => {}
        }
    }
    tracing::info!("stopped following");
}

fn set(progress: &Mutex<Progress>, f: impl FnOnce(&mut Progress)) {
    if let Ok(mut p) = progress.lock() {
        f(&mut p);
    }
}

fn client(master: &str) -> Result<AccountReplicationClient<Channel>, FollowError> {
    let channel = duplex_rpc::channel(master).map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    Ok(AccountReplicationClient::new(channel)
        .max_decoding_message_size(duplex_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(duplex_proto::MAX_MESSAGE_BYTES))
}

async fn blocking<T: Send + 'static>(
    node: &Arc<Node>,
    f: impl FnOnce(&crate::store::AccountStore) -> Result<T, AccountError> + Send + 'static,
) -> Result<T, FollowError> {
    let store = node.store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| FollowError::Store(AccountError::Corrupt(e.to_string())))?
        .map_err(FollowError::from)
}

async fn follow_once(node: &Arc<Node>, master: &str) -> Result<(), FollowError> {
    let mut client = client(master)?;
    let history = client
        .get_epoch_history(GetEpochHistoryRequest {})
        .await?
        .into_inner();
    let from = check_fork(node, &history).await?;
    let from_epoch = blocking(node, move |s| s.epoch_at(from)).await?.unwrap_or(0);

    let (ack_tx, ack_rx) = mpsc::channel(16);
    let hello = ReplicaMessage {
        message: Some(replica_message::Message::Hello(ReplicaHello {
            slave: Some(node.info.clone()),
            from_lsn: from.0,
            from_epoch,
        })),
    };
    ack_tx
        .send(hello)
        .await
        .map_err(|_| tonic::Status::cancelled("ack channel closed"))?;
    let mut stream = match client.replicate(ReceiverStream::new(ack_rx)).await {
        Ok(s) => s.into_inner(),
        Err(status) if status.metadata().get(BOOTSTRAP_METADATA_KEY).is_some() => {
            return Err(FollowError::Bootstrap(status.message().to_owned()));
        }
        Err(status) => return Err(status.into()),
    };
    set(&node.progress, |p| p.connected = true);
    while let Some(batch) = stream.message().await? {
        let last = batch.entries.last().map(|e| (e.lsn, e.time_unix_ms));
        if !batch.entries.is_empty() {
            let entries = batch.entries;
            blocking(node, move |s| s.append_entries(&entries)).await?;
        }
        set(&node.progress, |p| {
            p.master_lsn = batch.master_lsn;
            p.master_time_ms = batch.master_time_unix_ms;
            p.master_log_bytes = batch.master_log_bytes;
            if let Some((_, t)) = last {
                p.last_applied_time_ms = t;
            }
        });
        if let Some((lsn, _)) = last {
            let ack = ReplicaMessage {
                message: Some(replica_message::Message::AppliedLsn(lsn)),
            };
            if ack_tx.send(ack).await.is_err() {
                break;
            }
        }
    }
    Ok(())
}

/// Finds the last LSN where this log agrees with the master's. Entries past
/// it never reached the master: they are reported (never silently
/// dropped), and the slave rebuilds from the master's snapshot.
async fn check_fork(node: &Arc<Node>, history: &EpochHistory) -> Result<Lsn, FollowError> {
    let mine = blocking(node, |s| s.last_lsn()).await?;
    let mut at = Lsn(mine.0.min(history.last_lsn));
    loop {
        if at.0 == 0 {
            break;
        }
        match blocking(node, move |s| s.epoch_at(at)).await? {
            Some(e) if Some(e) == epoch_in(&history.epochs, at) => break,
            Some(_) => at = Lsn(at.0 - 1),
            None => {
                return Err(FollowError::Bootstrap(format!(
                    "local log no longer holds LSN {}",
                    at.0
                )));
            }
        }
    }
    if at < mine {
        let report = report_divergence(node, at, mine).await?;
        return Err(FollowError::Bootstrap(format!(
            "{} local entries after LSN {} never reached the master (see {report})",
            mine.0 - at.0,
            at.0
        )));
    }
    Ok(at)
}

/// Lists the entries after `fork` in a JSON-lines report in the data dir
/// (see `divergence`), records its count and path, and returns the path.
async fn report_divergence(node: &Arc<Node>, fork: Lsn, last: Lsn) -> Result<String, FollowError> {
    let (entries, names): (Vec<LogEntry>, _) = blocking(node, move |s| {
        Ok((
            s.entries_after(fork, (last.0 - fork.0) as usize)?,
            s.storage_server_names()?,
        ))
    })
    .await?;
    let text = divergence::report_text(&entries, &names)?;
    let dir = node.data_dir.clone();
    let path = tokio::task::spawn_blocking(move || divergence::write_report(&dir, &text))
        .await
        .map_err(|e| AccountError::Corrupt(e.to_string()))?
        .map_err(|e| {
            AccountError::Corrupt(format!(
                "writing a divergence report in {}: {e}",
                node.data_dir.display()
            ))
        })?;
    let shown = path.display().to_string();
    let count = entries.len() as u64;
    let report = shown.clone();
    blocking(node, move |s| s.record_divergence(count, &report)).await?;
    tracing::error!(count, fork = fork.0, report = %shown, "DIVERGENT ENTRIES: this server's writes after the fork never reached the master; review the report and re-apply with `duplexctl accounts reapply`");
    Ok(shown)
}

async fn bootstrap(node: &Arc<Node>, master: &str) -> Result<(), FollowError> {
    let mut client = client(master)?;
    let mut stream = client
        .get_state_snapshot(GetStateSnapshotRequest {})
        .await?
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(part) = stream.message().await? {
        if (bytes.len() + part.data.len()) as u64 > MAX_SNAPSHOT_BYTES {
            return Err(AccountError::Invalid(format!(
                "the master's snapshot is over {MAX_SNAPSHOT_BYTES} bytes compressed"
            ))
            .into());
        }
        bytes.extend_from_slice(&part.data);
    }
    let snapshot = decompress(&bytes)?;
    let lsn = snapshot.lsn;
    let accounts = snapshot.accounts.len();
    blocking(node, move |s| s.install_snapshot(&snapshot)).await?;
    tracing::info!(
        lsn,
        accounts,
        compressed = bytes.len(),
        "installed the master's snapshot"
    );
    Ok(())
}
