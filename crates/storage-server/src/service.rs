//! Thin gRPC handlers over the storage engine: authenticate, validate,
//! run the engine call off the async threads, map errors.

use std::sync::Arc;

use duplex_proto::v1::storage_admin_server::StorageAdmin;
use duplex_proto::v1::storage_service_server::StorageService;
use duplex_proto::v1::{
    AccountUsage, AccountVerification, Chunk, CollectGarbageRequest, CollectGarbageResponse,
    CommitSnapshotRequest, DeleteSnapshotsRequest, DeleteSnapshotsResponse, DeleteStoredAccountRequest,
    DeleteStoredAccountResponse, GetChunksRequest, GetSnapshotRequest, GetStorageStatusRequest, Lag,
    LinkProgress, ListSnapshotsRequest, ListSnapshotsResponse, ListUsageRequest, ListUsageResponse,
    MissingChunksRequest, MissingChunksResponse, PutChunksResponse, RepairChunksRequest,
    RepairChunksResponse, ServerInfo, SetRoleRequest, SnapshotInfo, StorageServerStatus,
    VerifyAccountsRequest, VerifyAccountsResponse, VerifyRequest, VerifyResponse,
};
use duplex_types::{AccountId, ChunkId, Epoch, Seq, SnapshotId};
use tokio::sync::RwLock;
use tonic::metadata::MetadataValue;

use crate::mirroring::Mirroring;
use crate::store::mirror::{Role, RoleState};
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Access, Auth, Caller};
use crate::chunk_stream;
use crate::store::references::blob_ids;
use crate::store::snapshots::{NewSnapshot, check_record};
use crate::store::{MAX_CHUNK_BYTES, PackWriter, PutStats, Store, StoreError};

/// A pack is fsynced and indexed every this many bytes, so an upload cut
/// short keeps (and the retry reuses) what was already sent.
const COMMIT_EVERY_BYTES: u64 = 32 * 1024 * 1024;
/// Or this many chunks: many small ones are committed (and so enter the
/// change feed, for the mirror to copy) as the upload goes, not all at its
/// end, where the sync commit would wait for all of them.
const COMMIT_EVERY_CHUNKS: usize = 4096;
/// Chunks already received that one blocking call stores at most.
pub(crate) const CHUNKS_PER_CALL: usize = 256;
/// Most chunk ids one call may name.
pub const MAX_IDS_PER_CALL: usize = 100_000;

pub struct StorageApi {
    pub store: Arc<Store>,
    pub auth: Arc<Auth>,
    pub info: ServerInfo,
    pub role: RwLock<RoleState>,
    pub mirroring: Arc<Mirroring>,
    /// Cancelled when the server starts draining: long-lived streams end.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The primary's write lease from the coordinator.
    pub lease: Arc<duplex_rpc::heartbeat::Lease>,
    /// Announced to the account servers since it last became primary.
    pub registered: std::sync::atomic::AtomicBool,
    /// Channels to the sources this server pulls mirrored batches from.
    pub sources: crate::pull::Sources,
    pub collector: Arc<crate::collector::Collector>,
}

/// Metadata key naming the primary on a replica's refusal.
pub const PRIMARY_METADATA_KEY: &str = "duplex-primary";

impl StorageApi {
    /// The caller a ticket names, unless its account was deleted: a ticket
    /// issued before is refused at once, not when it expires.
    async fn authorize(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        access: Access,
    ) -> Result<Caller, Status> {
        let caller = self.auth.check(metadata, access).await?;
        let account = caller.account;
        if blocking(&self.store, move |s| s.is_deleted(account)).await? {
            return Err(Status::permission_denied(format!(
                "account {} was deleted",
                caller.name
            )));
        }
        Ok(caller)
    }

    /// Agent writes go to the primary only, and only while its lease holds.
    /// The guard keeps the role from changing under the write.
    async fn check_primary(&self) -> Result<tokio::sync::RwLockReadGuard<'_, RoleState>, Status> {
        let role = self.role.read().await;
        if role.role == Role::Primary {
            self.lease.check(&self.info.name)?;
            return Ok(role);
        }
        let mut status = Status::failed_precondition(format!(
            "{} is a {} and takes no backups; use the primary{}",
            self.info.name,
            role.role.as_str(),
            if role.primary.is_empty() {
                String::new()
            } else {
                format!(" at {}", role.primary)
            }
        ));
        // Set even when the primary is unknown, so clients know to rediscover.
        if let Ok(v) = MetadataValue::try_from(role.primary.as_str()) {
            status.metadata_mut().insert(PRIMARY_METADATA_KEY, v);
        }
        Err(status)
    }
}

/// Runs a blocking engine call on the blocking pool.
pub async fn blocking<T, F>(store: &Arc<Store>, f: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
{
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| Status::internal(format!("storage task failed: {e}")))?
        .map_err(Status::from)
}

pub fn chunk_ids(raw: &[Vec<u8>]) -> Result<Vec<ChunkId>, Status> {
    if raw.len() > MAX_IDS_PER_CALL {
        return Err(Status::invalid_argument(format!(
            "{} chunk ids in one call; at most {MAX_IDS_PER_CALL}",
            raw.len()
        )));
    }
    raw.iter()
        .map(|b| ChunkId::from_bytes(b).map_err(|e| Status::invalid_argument(e.to_string())))
        .collect()
}

/// Snapshots one deletion may name at most.
const MAX_DELETIONS_PER_CALL: usize = 10_000;

/// Full snapshot ids, each once, in the order given.
fn snapshot_ids(raw: &[String]) -> Result<Vec<SnapshotId>, Status> {
    if raw.is_empty() || raw.len() > MAX_DELETIONS_PER_CALL {
        return Err(Status::invalid_argument(format!(
            "{} snapshot ids in one deletion; between 1 and {MAX_DELETIONS_PER_CALL}",
            raw.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    let mut ids = Vec::new();
    for text in raw {
        let id = SnapshotId::parse(text).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if seen.insert(id) {
            ids.push(id);
        }
    }
    Ok(ids)
}

pub fn check_chunk_shape(chunk: &Chunk) -> Result<(), Status> {
    if chunk.data.len() > MAX_CHUNK_BYTES {
        return Err(Status::invalid_argument(format!(
            "chunk payload of {} bytes is over the {MAX_CHUNK_BYTES}-byte limit",
            chunk.data.len()
        )));
    }
    Ok(())
}

type ChunkStream = chunk_stream::ItemStream<Chunk>;

#[tonic::async_trait]
impl StorageService for StorageApi {
    async fn missing_chunks(
        &self,
        request: Request<MissingChunksRequest>,
    ) -> Result<Response<MissingChunksResponse>, Status> {
        let caller = self.authorize(request.metadata(), Access::Read).await?;
        let ids = chunk_ids(&request.get_ref().ids)?;
        let missing = blocking(&self.store, move |s| {
            let missing = s.missing(caller.account, &ids)?;
            // The caller will rely on the others: garbage collection
            // spares them for its grace period.
            let absent: std::collections::HashSet<&ChunkId> = missing.iter().collect();
            let present: Vec<ChunkId> = ids.iter().filter(|id| !absent.contains(id)).copied().collect();
            s.touch(caller.account, &present)?;
            Ok(missing)
        })
        .await?;
        Ok(Response::new(MissingChunksResponse {
            missing: missing.into_iter().map(ChunkId::to_vec).collect(),
        }))
    }

    async fn put_chunks(
        &self,
        request: Request<Streaming<Chunk>>,
    ) -> Result<Response<PutChunksResponse>, Status> {
        // The role first: a replica or fenced primary names where to go,
        // which an agent follows; then whether the ticket is for this home.
        drop(self.check_primary().await?);
        let caller = self.authorize(request.metadata(), Access::Write).await?;
        // Whatever has already arrived is stored in one blocking call:
        // one hop to the blocking pool per chunk cost more than storing a
        // small chunk. HTTP/2 flow control bounds what can be waiting.
        let mut stream = request.into_inner().ready_chunks(CHUNKS_PER_CALL);
        let account = caller.account;
        let mut writer = blocking(&self.store, |s| s.begin_pack()).await?;
        let mut stats = PutStats::default();
        while let Some(arrived) = stream.next().await {
            let chunks = arrived.into_iter().collect::<Result<Vec<Chunk>, Status>>()?;
            for chunk in &chunks {
                check_chunk_shape(chunk)?;
            }
            let (w, added) = blocking_add(&self.store, writer, account, caller.quota, chunks).await?;
            writer = w;
            stats += added;
        }
        let (writer, committed) = blocking_commit(&self.store, writer, account, caller.quota).await?;
        stats += committed;
        writer.discard_if_empty();
        Ok(Response::new(PutChunksResponse {
            stored: stats.stored,
            already_present: stats.already_present,
            stored_bytes: stats.stored_bytes,
        }))
    }

    type GetChunksStream = ChunkStream;

    async fn get_chunks(&self, request: Request<GetChunksRequest>) -> Result<Response<ChunkStream>, Status> {
        let caller = self.authorize(request.metadata(), Access::Read).await?;
        let ids = chunk_ids(&request.get_ref().ids)?;
        Ok(Response::new(chunk_stream::read_chunks(
            self.store.clone(),
            caller.account,
            ids,
            |id, found| {
                Some(match found {
                    Ok(Some(c)) => Ok(c.into_proto()),
                    Ok(None) => Err(Status::not_found(format!("chunk {id} not found"))),
                    Err(e) => Err(Status::from(e)),
                })
            },
        )))
    }

    async fn commit_snapshot(
        &self,
        request: Request<CommitSnapshotRequest>,
    ) -> Result<Response<SnapshotInfo>, Status> {
        let role = self.check_primary().await?;
        let caller = self.authorize(request.metadata(), Access::Write).await?;
        let req = request.into_inner();
        let manifest_chunks = check_record(&req.manifest_chunks, &req.summary).map_err(Status::from)?;
        if !req.references_listed {
            return Err(Status::failed_precondition(
                "this agent does not list the chunks its snapshots reference, so garbage \
                 collection could not keep them: upgrade the agent",
            ));
        }
        let new = NewSnapshot {
            manifest_chunks,
            summary: req.summary,
            reference_blobs: blob_ids(&req.reference_blobs).map_err(Status::from)?,
        };
        let (lease, name) = (self.lease.clone(), self.info.name.clone());
        let (account, keep) = (caller.account, caller.keep);
        let (info, expired) = blocking(&self.store, move |s| {
            // Checked again at the last moment: the blocking pool may have
            // kept this commit waiting while the lease ran out.
            lease
                .check(&name)
                .map_err(|status| StoreError::Fenced(status.message().to_owned()))?;
            let info = s.commit_snapshot(account, new)?;
            Ok((info, s.apply_keep_policy(account, &keep)?))
        })
        .await?;
        if !expired.is_empty() {
            tracing::info!(account = %caller.name, deleted = expired.len(), "group keep policy applied");
        }
        // A commit that outlived the lease is not acknowledged: the role may
        // already be moving, and the client retries at the new primary.
        self.lease.check(&self.info.name)?;
        drop(role);
        // Sync mirroring: the other site has the snapshot before the ack.
        self.mirroring.wait_mirrored(self.store.last_seq().0).await;
        tracing::info!(account = %caller.name, snapshot = %info.id, manifest_chunks = info.manifest_chunks.len(), "snapshot committed");
        Ok(Response::new(info))
    }

    async fn delete_snapshots(
        &self,
        request: Request<DeleteSnapshotsRequest>,
    ) -> Result<Response<DeleteSnapshotsResponse>, Status> {
        let role = self.check_primary().await?;
        let caller = self.authorize(request.metadata(), Access::Write).await?;
        let ids = snapshot_ids(&request.into_inner().ids)?;
        let (lease, name) = (self.lease.clone(), self.info.name.clone());
        let deleted = blocking(&self.store, move |s| {
            lease
                .check(&name)
                .map_err(|status| StoreError::Fenced(status.message().to_owned()))?;
            s.delete_snapshots(caller.account, &ids)
        })
        .await?;
        self.lease.check(&self.info.name)?;
        drop(role);
        // Sync mirroring: the other site has the deletion before the ack.
        self.mirroring.wait_mirrored(self.store.last_seq().0).await;
        tracing::info!(account = %caller.name, deleted = deleted.len(), "snapshots deleted");
        Ok(Response::new(DeleteSnapshotsResponse {
            deleted: deleted.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let caller = self.authorize(request.metadata(), Access::Read).await?;
        let snapshots = blocking(&self.store, move |s| s.list_snapshots(caller.account)).await?;
        Ok(Response::new(ListSnapshotsResponse { snapshots }))
    }

    async fn get_snapshot(
        &self,
        request: Request<GetSnapshotRequest>,
    ) -> Result<Response<SnapshotInfo>, Status> {
        let caller = self.authorize(request.metadata(), Access::Read).await?;
        let query = request.into_inner().id;
        let info = blocking(&self.store, move |s| s.get_snapshot(caller.account, &query)).await?;
        Ok(Response::new(info))
    }

    async fn verify(&self, request: Request<VerifyRequest>) -> Result<Response<VerifyResponse>, Status> {
        let caller = self.authorize(request.metadata(), Access::Read).await?;
        let req = request.into_inner();
        let ids = chunk_ids(&req.chunk_ids)?;
        let snapshot = req.snapshot_id;
        let report = blocking(&self.store, move |s| {
            if !ids.is_empty() {
                return s.verify_ids(caller.account, ids);
            }
            s.verify(
                caller.account,
                (!snapshot.is_empty()).then_some(snapshot.as_str()),
            )
        })
        .await?;
        Ok(Response::new(VerifyResponse {
            chunks_checked: report.chunks_checked,
            bytes_checked: report.bytes_checked,
            missing: report.missing.into_iter().map(ChunkId::to_vec).collect(),
            corrupt: report.corrupt.into_iter().map(ChunkId::to_vec).collect(),
        }))
    }
}

/// Appends one chunk off the async threads, committing the pack when
/// enough bytes are pending.
pub async fn blocking_add(
    store: &Arc<Store>,
    mut writer: PackWriter,
    account: AccountId,
    quota: Option<u64>,
    chunks: Vec<Chunk>,
) -> Result<(PackWriter, PutStats), Status> {
    let store = store.clone();
    let (writer, result) = tokio::task::spawn_blocking(move || {
        let mut stats = PutStats::default();
        let result = chunks
            .iter()
            .try_for_each(|chunk| {
                writer.add(account, chunk)?;
                if writer.pending_bytes() >= COMMIT_EVERY_BYTES
                    || writer.pending_chunks() >= COMMIT_EVERY_CHUNKS
                {
                    stats += store.commit_pack(&mut writer, account, quota)?;
                    store.roll_if_full(&mut writer)?;
                }
                Ok::<(), StoreError>(())
            })
            .map(|()| stats);
        (writer, result)
    })
    .await
    .map_err(|e| Status::internal(format!("storage task failed: {e}")))?;
    Ok((writer, result?))
}

async fn blocking_commit(
    store: &Arc<Store>,
    mut writer: PackWriter,
    account: AccountId,
    quota: Option<u64>,
) -> Result<(PackWriter, PutStats), Status> {
    let store = store.clone();
    let (writer, result) = tokio::task::spawn_blocking(move || {
        let result = store.commit_pack(&mut writer, account, quota);
        (writer, result)
    })
    .await
    .map_err(|e| Status::internal(format!("storage task failed: {e}")))?;
    Ok((writer, result?))
}

#[tonic::async_trait]
impl StorageAdmin for StorageApi {
    async fn get_status(
        &self,
        _request: Request<GetStorageStatusRequest>,
    ) -> Result<Response<StorageServerStatus>, Status> {
        Ok(Response::new(self.status().await?))
    }

    async fn set_role(
        &self,
        request: Request<SetRoleRequest>,
    ) -> Result<Response<StorageServerStatus>, Status> {
        let req = request.into_inner();
        let role = Role::parse(&req.role).ok_or_else(|| {
            Status::invalid_argument(format!(
                "role must be primary or replica, not {:?}",
                duplex_types::shown(&req.role)
            ))
        })?;
        let epoch = Epoch::granted(req.epoch).map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.apply_role(role, epoch, req.primary).await?;
        Ok(Response::new(self.status().await?))
    }

    async fn list_usage(
        &self,
        _request: Request<ListUsageRequest>,
    ) -> Result<Response<ListUsageResponse>, Status> {
        let (usage, counts, reclaimed) = blocking(&self.store, |s| {
            Ok((s.usage()?, s.snapshot_counts()?, s.reclaimed_by_account()?))
        })
        .await?;
        let accounts = usage
            .into_iter()
            .map(|u| AccountUsage {
                account_id: u.account.0,
                snapshots: counts.get(&u.account.0).copied().unwrap_or(0),
                stored_bytes: u.stored_bytes,
                last_backup_unix_ms: u.last_backup_unix_ms,
                reclaimed_bytes: reclaimed.get(&u.account.0).copied().unwrap_or(0),
            })
            .collect();
        Ok(Response::new(ListUsageResponse { accounts }))
    }

    async fn delete_account(
        &self,
        request: Request<DeleteStoredAccountRequest>,
    ) -> Result<Response<DeleteStoredAccountResponse>, Status> {
        let account = AccountId(request.into_inner().account_id);
        if account.0 == 0 {
            return Err(Status::invalid_argument("account_id 0 names no account"));
        }
        let snapshots_deleted = blocking(&self.store, move |s| s.delete_account(account)).await?;
        tracing::info!(account = account.0, snapshots_deleted, "account deleted");
        Ok(Response::new(DeleteStoredAccountResponse { snapshots_deleted }))
    }

    async fn repair_chunks(
        &self,
        request: Request<RepairChunksRequest>,
    ) -> Result<Response<RepairChunksResponse>, Status> {
        let response = crate::repair::repair(&self.store, &self.sources, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn collect_garbage(
        &self,
        request: Request<CollectGarbageRequest>,
    ) -> Result<Response<CollectGarbageResponse>, Status> {
        if request.into_inner().wait {
            let report = self.collector.run().await?;
            return Ok(Response::new(CollectGarbageResponse {
                started: true,
                report: Some(crate::collector::to_proto(&report)),
            }));
        }
        Ok(Response::new(CollectGarbageResponse {
            started: self.collector.start(),
            report: None,
        }))
    }

    async fn verify_accounts(
        &self,
        request: Request<VerifyAccountsRequest>,
    ) -> Result<Response<VerifyAccountsResponse>, Status> {
        let ids = request.into_inner().account_ids;
        if ids.len() > MAX_IDS_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_IDS_PER_CALL} accounts per call"
            )));
        }
        Ok(Response::new(
            blocking(&self.store, move |s| verify_accounts(s, ids)).await?,
        ))
    }
}

fn verify_accounts(store: &Store, ids: Vec<u64>) -> Result<VerifyAccountsResponse, StoreError> {
    let ids = if ids.is_empty() {
        store.accounts_with_snapshots()?
    } else {
        ids.into_iter().map(AccountId).collect()
    };
    let mut accounts = Vec::new();
    for account in ids {
        let (report, snapshots) = store.verify_snapshots(account)?;
        accounts.push(AccountVerification {
            account_id: account.0,
            snapshots,
            chunks_checked: report.chunks_checked,
            bytes_checked: report.bytes_checked,
            missing: report.missing.len() as u64,
            corrupt: report.corrupt.len() as u64,
            missing_ids: listed(&report.missing),
            corrupt_ids: listed(&report.corrupt),
        });
    }
    Ok(VerifyAccountsResponse { accounts })
}

fn listed(ids: &[ChunkId]) -> Vec<Vec<u8>> {
    ids.iter()
        .take(crate::repair::MAX_REPAIR_IDS)
        .map(|id| id.to_vec())
        .collect()
}

impl StorageApi {
    /// Takes a role (an epoch at least the one held); waits for writes in
    /// flight, so none lands after a demotion returns.
    pub async fn apply_role(&self, role: Role, epoch: Epoch, primary: String) -> Result<(), Status> {
        let mut current = self.role.write().await;
        if epoch < current.epoch {
            return Err(Status::failed_precondition(format!(
                "stale epoch {} refused: this server holds epoch {}",
                epoch.0, current.epoch.0
            )));
        }
        let state = RoleState { role, epoch, primary };
        if *current != state {
            let saved = state.clone();
            blocking(&self.store, move |s| s.save_role(&saved)).await?;
            tracing::warn!(role = role.as_str(), epoch = epoch.0, "role changed");
            *current = state;
        }
        drop(current);
        self.announce(role);
        Ok(())
    }

    /// A primary announces itself to the account servers once per
    /// promotion, so accounts can be homed on it.
    pub fn announce(&self, role: Role) {
        use std::sync::atomic::Ordering;
        if role != Role::Primary {
            self.registered.store(false, Ordering::SeqCst);
            return;
        }
        if !self.registered.swap(true, Ordering::SeqCst) {
            tokio::spawn(crate::server::register(
                self.info.clone(),
                self.auth.account_servers().to_vec(),
                self.shutdown.clone(),
            ));
        }
    }

    /// Converges to the coordinator's assignment (a no-op when it matches).
    pub async fn apply_assignment(&self, assignment: duplex_proto::v1::Assignment) {
        let Some(role) = Role::parse(&assignment.role) else {
            return;
        };
        self.mirroring.set_unmirrored(assignment.unmirrored);
        if let Err(status) = self
            .apply_role(role, Epoch(assignment.epoch), assignment.leader)
            .await
        {
            tracing::warn!(%status, "cannot take the role the coordinator assigned");
        }
    }

    pub async fn status(&self) -> Result<StorageServerStatus, Status> {
        let mut status = blocking(&self.store, Store::status).await?;
        let role = self.role.read().await.clone();
        status.server = Some(self.info.clone());
        status.role = if role.role == Role::Primary && !self.lease.valid() {
            "fenced".into()
        } else {
            role.role.as_str().into()
        };
        status.epoch = role.epoch.0;
        status.primary = role.primary;
        status.mirroring = self.mirroring.describe();
        let links = self.mirroring.links();
        let (links_out, links_in, behind) = blocking(&self.store, move |s| {
            let mut behind = std::collections::BTreeSet::new();
            let mut out = Vec::new();
            for link in links {
                let pending = s.pending_after(Seq(link.applied), &link.destination_id)?;
                behind.extend(pending.accounts.iter().copied());
                let seconds = pending.oldest_ms.map_or(0.0, |t| {
                    (crate::store::snapshots::now_ms() - t).max(0) as f64 / 1000.0
                });
                out.push(LinkProgress {
                    destination_id: link.destination_id,
                    destination: link.destination,
                    applied_seq: link.applied,
                    lag: Some(Lag {
                        records: pending.records,
                        bytes: pending.bytes,
                        seconds,
                    }),
                });
            }
            Ok((out, s.checkpoints()?, behind))
        })
        .await?;
        status.links_out = links_out;
        status.links_in = links_in;
        status.accounts_behind = behind.into_iter().collect();
        Ok(status)
    }
}
