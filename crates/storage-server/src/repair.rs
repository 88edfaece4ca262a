//! `RepairChunks`: damaged chunks mended from other servers' copies.
//!
//! The copies are read with the replication API this server already uses
//! to pull mirrored batches (its own server certificate, `skip_missing` so
//! one absent copy does not stop the rest), and each is checked against its
//! payload hash as it is written. What counts in the answer is read back
//! from disk afterwards, not what was written.

use std::collections::BTreeMap;
use std::sync::Arc;

use duplex_proto::v1::{RepairChunksRequest, RepairChunksResponse, UnrepairableChunk};
use duplex_types::{AccountId, ChunkId};
use tonic::Status;

use crate::pull::{Sources, copy_chunks};
use crate::service::blocking;
use crate::store::{Damaged, Store};

/// Most chunks one call may name (verify lists at most this many of each
/// kind per account).
pub const MAX_REPAIR_IDS: usize = 10_000;
/// Most sources one call may name.
const MAX_SOURCES: usize = 16;

pub async fn repair(
    store: &Arc<Store>,
    sources: &Sources,
    req: RepairChunksRequest,
) -> Result<RepairChunksResponse, Status> {
    let (account, ids) = check(&req)?;
    let asked = ids.clone();
    let damaged = blocking(store, move |s| s.damaged(account, &ids)).await?;
    let mut wanted = damaged.clone();
    let mut source_errors = Vec::new();
    for source in &req.sources {
        if wanted.is_empty() {
            break;
        }
        match from_source(store, sources, source, account, &wanted).await {
            Ok(mended) => tracing::info!(account = account.0, source, mended, "chunks repaired"),
            Err(e) => source_errors.push(format!("{source}: {}", e.message())),
        }
        let still: Vec<ChunkId> = wanted.keys().copied().collect();
        wanted = blocking(store, move |s| s.damaged(account, &still)).await?;
    }
    let unrepairable: Vec<ChunkId> = wanted.keys().copied().collect();
    let repaired = damaged
        .keys()
        .filter(|id| !wanted.contains_key(id))
        .map(|id| id.to_vec())
        .collect();
    let naming = blocking(store, move |s| s.snapshots_naming(account, &unrepairable)).await?;
    if !naming.is_empty() {
        tracing::warn!(
            account = account.0,
            unrepairable = naming.len(),
            asked = asked.len(),
            "chunks no source could mend"
        );
    }
    Ok(RepairChunksResponse {
        repaired,
        unrepairable: naming
            .into_iter()
            .map(|(id, snapshots)| UnrepairableChunk {
                id: id.to_vec(),
                snapshots,
            })
            .collect(),
        source_errors,
    })
}

fn check(req: &RepairChunksRequest) -> Result<(AccountId, Vec<ChunkId>), Status> {
    if req.account_id == 0 {
        return Err(Status::invalid_argument("account_id 0 names no account"));
    }
    if req.ids.len() > MAX_REPAIR_IDS {
        return Err(Status::invalid_argument(format!(
            "{} chunks in one repair; at most {MAX_REPAIR_IDS}",
            req.ids.len()
        )));
    }
    if req.sources.is_empty() || req.sources.len() > MAX_SOURCES {
        return Err(Status::invalid_argument(format!(
            "a repair names {} sources; it needs 1 to {MAX_SOURCES}",
            req.sources.len()
        )));
    }
    let ids = req
        .ids
        .iter()
        .map(|b| ChunkId::from_bytes(b).map_err(|e| Status::invalid_argument(e.to_string())))
        .collect::<Result<_, _>>()?;
    Ok((AccountId(req.account_id), ids))
}

/// Reads the `wanted` chunks that `source` holds and indexes them here.
async fn from_source(
    store: &Arc<Store>,
    sources: &Sources,
    source: &str,
    account: AccountId,
    wanted: &Damaged,
) -> Result<u64, Status> {
    let mut client = sources.client(source)?;
    // No origin: a mended chunk the index lacked is recorded as this
    // server's write, which a link that already copied it skips.
    let origins: BTreeMap<ChunkId, String> = wanted.keys().map(|&id| (id, String::new())).collect();
    let ids: Vec<ChunkId> = wanted.keys().copied().collect();
    let writer = blocking(store, |s| s.begin_cold_pack()).await?;
    let mut writer = copy_chunks(&mut client, source, writer, account.0, &ids, &origins).await?;
    let wanted = wanted.clone();
    blocking(store, move |s| {
        let r = s.commit_repair(&mut writer, account, &wanted);
        writer.discard_if_empty();
        r
    })
    .await
}
