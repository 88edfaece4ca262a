//! The destination side of mirroring: a batch pulled from the source.
//!
//! The mirror tails the source's feed and hands the destination each batch
//! of records; the destination reads the chunks it lacks from the source
//! over its own mutual TLS connection and commits them with the snapshot
//! records and the link's checkpoint in one transaction. The chunk bytes
//! so cross one TLS connection instead of two (source to mirror, mirror to
//! destination), and the mirror never holds them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use duplex_proto::MAX_MESSAGE_BYTES;
use duplex_proto::v1::storage_replication_client::StorageReplicationClient;
use duplex_proto::v1::{
    ChangeRecord, Checkpoint, PullBatchRequest, PullBatchResponse, ReadChunksRequest, change_record,
};
use duplex_types::{AccountId, ChunkId};
use futures::StreamExt;
use tonic::Status;
use tonic::transport::Channel;

use crate::service::{CHUNKS_PER_CALL, MAX_IDS_PER_CALL, blocking, check_chunk_shape};
use crate::store::{PackWriter, Store};

/// Records in one pulled batch at most (what a mirror gathers).
pub const MAX_PULL_RECORDS: usize = 4096;

/// One channel per source address, so a link's batches reuse one TLS
/// connection rather than paying a handshake each.
#[derive(Default)]
pub struct Sources {
    channels: Mutex<HashMap<String, Channel>>,
}

impl Sources {
    pub(crate) fn client(&self, url: &str) -> Result<StorageReplicationClient<Channel>, Status> {
        let mut channels = self
            .channels
            .lock()
            .map_err(|_| Status::internal("the source channel table is poisoned"))?;
        let channel = match channels.get(url) {
            Some(c) => c.clone(),
            None => {
                let c = duplex_rpc::channel(url).map_err(|e| Status::invalid_argument(e.to_string()))?;
                channels.insert(url.to_owned(), c.clone());
                c
            }
        };
        Ok(StorageReplicationClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }
}

/// A batch's chunk records by account, each chunk with its origin, and its
/// snapshot records (new and deleted) in feed order.
struct Wanted {
    chunks: BTreeMap<u64, BTreeMap<ChunkId, String>>,
    snapshots: Vec<ChangeRecord>,
}

fn sort_records(req: &mut PullBatchRequest) -> Result<Wanted, Status> {
    if req.source.is_empty() || req.source_id.is_empty() {
        return Err(Status::invalid_argument(
            "a pulled batch names no source address or source id",
        ));
    }
    if req.records.len() > MAX_PULL_RECORDS {
        return Err(Status::invalid_argument(format!(
            "{} records in one pulled batch; at most {MAX_PULL_RECORDS}",
            req.records.len()
        )));
    }
    let mut wanted = Wanted {
        chunks: BTreeMap::new(),
        snapshots: Vec::new(),
    };
    for rec in std::mem::take(&mut req.records) {
        if rec.seq == 0 || rec.seq > req.seq {
            return Err(Status::invalid_argument(format!(
                "record {} lies outside the batch, which ends at {}",
                rec.seq, req.seq
            )));
        }
        match &rec.change {
            Some(change_record::Change::Chunk(c)) => {
                let id = ChunkId::from_bytes(&c.id).map_err(|e| Status::invalid_argument(e.to_string()))?;
                wanted
                    .chunks
                    .entry(rec.account_id)
                    .or_default()
                    .insert(id, rec.origin.clone());
            }
            Some(
                change_record::Change::Snapshot(_)
                | change_record::Change::SnapshotDeleted(_)
                | change_record::Change::AccountDeleted(_),
            ) => {
                wanted.snapshots.push(rec);
            }
            None => {
                return Err(Status::invalid_argument(format!(
                    "record {} carries no change",
                    rec.seq
                )));
            }
        }
    }
    Ok(wanted)
}

pub async fn pull(
    store: &Arc<Store>,
    sources: &Sources,
    mut req: PullBatchRequest,
) -> Result<PullBatchResponse, Status> {
    let wanted = sort_records(&mut req)?;
    let mut src = sources.client(&req.source)?;
    let mut writer = blocking(store, |s| s.begin_cold_pack()).await?;
    for (account, chunks) in wanted.chunks {
        let ids: Vec<ChunkId> = chunks.keys().copied().collect();
        let missing = blocking(store, move |s| s.missing(AccountId(account), &ids)).await?;
        for ids in missing.chunks(MAX_IDS_PER_CALL) {
            writer = copy_chunks(&mut src, &req.source, writer, account, ids, &chunks).await?;
        }
    }
    let checkpoint = Checkpoint {
        source_id: req.source_id,
        seq: req.seq,
    };
    let snapshots = wanted.snapshots;
    let (stats, added) = blocking(store, move |s| {
        let r = s.commit_mirror(&mut writer, &snapshots, &checkpoint);
        writer.discard_if_empty();
        r
    })
    .await?;
    Ok(PullBatchResponse {
        chunks: stats.stored,
        snapshots: added,
        bytes: stats.stored_bytes,
    })
}

/// Streams `ids` of `account` from the source into `writer`. Every chunk is
/// checked against its id and payload hash as it is written (`add_from`),
/// so a payload damaged on the source's disk or on the way is refused,
/// named, and never committed.
pub(crate) async fn copy_chunks(
    src: &mut StorageReplicationClient<Channel>,
    source: &str,
    mut writer: PackWriter,
    account: u64,
    ids: &[ChunkId],
    origins: &BTreeMap<ChunkId, String>,
) -> Result<PackWriter, Status> {
    let from_source = |status: Status| {
        Status::new(
            status.code(),
            format!("reading chunks from the source {source}: {}", status.message()),
        )
    };
    let request = ReadChunksRequest {
        account_id: account,
        ids: ids.iter().map(|id| id.to_vec()).collect(),
        // A chunk the source has collected since its record was written is
        // dead there; the destination's copy would be too.
        skip_missing: true,
    };
    let mut stream = src
        .read_chunks(request)
        .await
        .map_err(from_source)?
        .into_inner()
        .ready_chunks(CHUNKS_PER_CALL);
    while let Some(arrived) = stream.next().await {
        let mut checked = Vec::with_capacity(arrived.len());
        for item in arrived {
            let item = item.map_err(from_source)?;
            let chunk = item.chunk.ok_or_else(|| {
                Status::data_loss(format!("the source {source} sent a chunk item without a chunk"))
            })?;
            check_chunk_shape(&chunk)?;
            let id = ChunkId::from_bytes(&chunk.id).map_err(|e| {
                Status::data_loss(format!("the source {source} sent a chunk with a bad id: {e}"))
            })?;
            let asked = origins.get(&id).filter(|_| item.account_id == account);
            let Some(origin) = asked else {
                return Err(Status::data_loss(format!(
                    "the source {source} sent chunk {id} of account {}, which was not asked for",
                    item.account_id
                )));
            };
            // No origin: the source's own write, which the checkpoint names.
            let origin = (!origin.is_empty()).then(|| origin.clone());
            checked.push((chunk, origin));
        }
        writer = add(writer, AccountId(account), checked).await?;
    }
    Ok(writer)
}

/// Appends chunks that have arrived, in one blocking call.
async fn add(
    mut writer: PackWriter,
    account: AccountId,
    chunks: Vec<(duplex_proto::v1::Chunk, Option<String>)>,
) -> Result<PackWriter, Status> {
    let (writer, result) = tokio::task::spawn_blocking(move || {
        let r = chunks
            .into_iter()
            .try_for_each(|(chunk, origin)| writer.add_from(account, &chunk, origin));
        (writer, r)
    })
    .await
    .map_err(|e| Status::internal(format!("storage task failed: {e}")))?;
    result?;
    Ok(writer)
}
