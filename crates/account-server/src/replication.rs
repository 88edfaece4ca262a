//! gRPC face of replication: log streaming, snapshots, epoch history and
//! role changes.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use duplex_proto::v1::account_replication_server::AccountReplication;
use duplex_proto::v1::{
    AccountServerStatus, DemoteRequest, EpochHistory, GetEpochHistoryRequest, GetStateSnapshotRequest,
    LogEntry, PromoteRequest, ReplicaHello, ReplicaMessage, ReplicationMessage, StateSnapshotPart,
    replica_message,
};
use duplex_types::{Epoch, Lsn};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

use crate::error::AccountError;
use crate::follower::BOOTSTRAP_METADATA_KEY;
use crate::node::Node;
use crate::store::{AccountStore, meta, snapshot};

/// Entries per streamed batch.
const BATCH: usize = 512;
/// An idle stream still carries the master's position this often.
const HEARTBEAT: Duration = Duration::from_millis(500);
const SNAPSHOT_PART: usize = 1024 * 1024;

pub struct ReplicationApi {
    pub node: Arc<Node>,
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

async fn blocking<T: Send + 'static>(
    store: &Arc<AccountStore>,
    f: impl FnOnce(&AccountStore) -> Result<T, AccountError> + Send + 'static,
) -> Result<T, Status> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(Status::from)
}

fn bootstrap(why: String) -> Status {
    let mut status = Status::failed_precondition(why);
    status
        .metadata_mut()
        .insert(BOOTSTRAP_METADATA_KEY, MetadataValue::from_static("1"));
    status
}

impl ReplicationApi {
    /// Refuses a slave position the log cannot continue from.
    async fn check_position(&self, hello: &ReplicaHello) -> Result<(), Status> {
        let from = Lsn(hello.from_lsn);
        let (last, start, epoch) = blocking(&self.node.store, move |s| {
            Ok((s.last_lsn()?, s.log_start()?, s.epoch_at(from)?))
        })
        .await?;
        if from.0 == 0 && last.0 > 0 {
            return Err(bootstrap("a new slave starts from a snapshot".into()));
        }
        if from > last {
            return Err(bootstrap(format!(
                "slave is at LSN {} beyond the master's {}",
                from.0, last.0
            )));
        }
        if from.0 + 1 < start.0 {
            return Err(bootstrap(format!(
                "LSN {} is no longer in the master's log",
                from.0
            )));
        }
        if epoch != Some(hello.from_epoch) {
            return Err(bootstrap(format!(
                "slave's entry {} is from another history",
                from.0
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl AccountReplication for ReplicationApi {
    type ReplicateStream = Stream_<ReplicationMessage>;

    async fn replicate(
        &self,
        request: Request<Streaming<ReplicaMessage>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        drop(self.node.write_guard().await?);
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(ReplicaMessage {
                message: Some(replica_message::Message::Hello(h)),
            }) => h,
            _ => return Err(Status::invalid_argument("the first message must be a hello")),
        };
        let slave = hello
            .slave
            .clone()
            .ok_or_else(|| Status::invalid_argument("hello names no slave"))?;
        self.check_position(&hello).await?;
        let hub = self.node.hub.clone();
        hub.slave_connected(slave.clone(), hello.from_lsn);
        tracing::info!(slave = %slave.name, from = hello.from_lsn, "slave connected");

        let acks_hub = hub.clone();
        let slave_id = slave.id.clone();
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                if let Some(replica_message::Message::AppliedLsn(lsn)) = msg.message {
                    acks_hub.slave_applied(&slave_id, lsn);
                }
            }
            acks_hub.slave_disconnected(&slave_id);
            tracing::info!(slave = %slave.name, "slave disconnected");
        });

        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(stream_log(self.node.clone(), Lsn(hello.from_lsn), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type GetStateSnapshotStream = Stream_<StateSnapshotPart>;

    async fn get_state_snapshot(
        &self,
        _request: Request<GetStateSnapshotRequest>,
    ) -> Result<Response<Self::GetStateSnapshotStream>, Status> {
        let bytes = blocking(&self.node.store, |s| snapshot::compress(&s.state_snapshot()?)).await?;
        let parts: Vec<Result<StateSnapshotPart, Status>> = bytes
            .chunks(SNAPSHOT_PART)
            .map(|c| Ok(StateSnapshotPart { data: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(parts))))
    }

    async fn get_epoch_history(
        &self,
        _request: Request<GetEpochHistoryRequest>,
    ) -> Result<Response<EpochHistory>, Status> {
        let (epochs, last) = blocking(&self.node.store, |s| Ok((s.epoch_history()?, s.last_lsn()?))).await?;
        Ok(Response::new(EpochHistory {
            epochs,
            last_lsn: last.0,
        }))
    }

    async fn promote(
        &self,
        request: Request<PromoteRequest>,
    ) -> Result<Response<AccountServerStatus>, Status> {
        let epoch = Epoch::granted(request.into_inner().epoch)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.node.promote(epoch).await?;
        Ok(Response::new(self.node.status().await?))
    }

    async fn demote(&self, request: Request<DemoteRequest>) -> Result<Response<AccountServerStatus>, Status> {
        let req = request.into_inner();
        if !(req.master.starts_with("http://") || req.master.starts_with("https://")) {
            return Err(Status::invalid_argument(format!(
                "master {:?} must be an http(s) URL",
                duplex_types::shown(&req.master)
            )));
        }
        if req.master == self.node.info.addr {
            return Err(Status::invalid_argument("a server cannot follow itself"));
        }
        let epoch = Epoch::granted(req.epoch).map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.node.demote(epoch, req.master).await?;
        Ok(Response::new(self.node.status().await?))
    }
}

/// Sends the log after `sent` as it grows, until the slave goes away or
/// this server stops being master.
async fn stream_log(node: Arc<Node>, mut sent: Lsn, tx: mpsc::Sender<Result<ReplicationMessage, Status>>) {
    let mut commits = node.hub.subscribe_commits();
    let stop = node.mastership();
    loop {
        let batch = blocking(&node.store, move |s| {
            Ok((
                s.entries_after(sent, BATCH)?,
                s.last_lsn()?,
                s.meta_u64(meta::LOG_BYTES)?,
            ))
        })
        .await;
        let (entries, last, log_bytes): (Vec<LogEntry>, Lsn, u64) = match batch {
            Ok(b) => b,
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                return;
            }
        };
        if entries.first().is_some_and(|e| e.lsn != sent.0 + 1) {
            let _ = tx
                .send(Err(bootstrap(format!(
                    "LSN {} was trimmed from the log",
                    sent.0 + 1
                ))))
                .await;
            return;
        }
        let caught_up = entries.is_empty();
        if let Some(e) = entries.last() {
            sent = Lsn(e.lsn);
        }
        let message = ReplicationMessage {
            master_time_unix_ms: entries
                .last()
                .map_or_else(|| node.hub.last_write_ms(), |e| e.time_unix_ms),
            entries,
            master_lsn: last.0,
            master_log_bytes: log_bytes,
        };
        if tx.send(Ok(message)).await.is_err() {
            return;
        }
        if caught_up {
            tokio::select! {
                () = stop.cancelled() => {
                    let _ = tx.send(Err(Status::failed_precondition("no longer master"))).await;
                    return;
                }
                _ = commits.changed() => {}
                () = tokio::time::sleep(HEARTBEAT) => {}
            }
        }
    }
}
