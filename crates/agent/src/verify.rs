//! `duplex verify`: the server checks each payload against its hash (it
//! can do no more: it cannot read the manifest or the data); the agent
//! reads the manifests to name every chunk a snapshot needs, and with
//! `--read-data` downloads and opens every one of them (AEAD tag and keyed
//! id), which is the only check that proves a restore would succeed.

use std::collections::BTreeSet;
use std::sync::Arc;

use duplex_proto::v1::{GetSnapshotRequest, ListSnapshotsRequest, SnapshotInfo, VerifyRequest};
use duplex_types::ChunkId;
use futures::TryStreamExt;

use crate::AgentError;
use crate::crypto::Keys;
use crate::manifest::{fetch_chunks, fetch_manifest};
use crate::session::Session;

/// Ids per server call, under the server's per-call limit.
const IDS_PER_CALL: usize = 50_000;
/// Chunks downloaded per stream when reading data back.
const READ_BATCH: usize = 64;

#[derive(Debug, Default)]
pub struct Report {
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub missing: BTreeSet<Vec<u8>>,
    pub corrupt: BTreeSet<Vec<u8>>,
    /// Chunks downloaded and opened (with `--read-data`).
    pub chunks_read: u64,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.missing.is_empty() && self.corrupt.is_empty()
    }
}

/// Server-side check of every chunk the account holds (no key needed).
pub async fn account(session: &Session) -> Result<Report, AgentError> {
    server_check(session, VerifyRequest::default()).await
}

/// Checks `snapshot` (or, with None, every snapshot): its manifest opened
/// here, every chunk it names checked by the server, and with `read_data`
/// every chunk downloaded and opened.
pub async fn snapshots(
    session: &Session,
    keys: &Arc<Keys>,
    snapshot: Option<&str>,
    read_data: bool,
) -> Result<Report, AgentError> {
    let mut storage = session.storage.clone();
    let infos: Vec<SnapshotInfo> = match snapshot {
        Some(id) => vec![
            storage
                .get_snapshot(GetSnapshotRequest { id: id.to_owned() })
                .await
                .map_err(AgentError::rpc(format!("finding snapshot {id}")))?
                .into_inner(),
        ],
        None => {
            storage
                .list_snapshots(ListSnapshotsRequest {})
                .await
                .map_err(AgentError::rpc("listing snapshots"))?
                .into_inner()
                .snapshots
        }
    };
    let mut ids = BTreeSet::new();
    for info in &infos {
        let manifest = fetch_manifest(&storage, keys, &info.manifest_chunks).await?;
        ids.extend(info.manifest_chunks.iter().cloned());
        ids.extend(manifest.entries.into_iter().flat_map(|e| e.chunks));
    }
    let ids: Vec<Vec<u8>> = ids.into_iter().collect();
    let mut report = Report::default();
    for batch in ids.chunks(IDS_PER_CALL) {
        let part = server_check(
            session,
            VerifyRequest {
                snapshot_id: String::new(),
                chunk_ids: batch.to_vec(),
            },
        )
        .await?;
        merge(&mut report, part);
    }
    if read_data {
        let readable: Vec<Vec<u8>> = ids
            .into_iter()
            .filter(|id| !report.missing.contains(id) && !report.corrupt.contains(id))
            .collect();
        read_back(session, keys, &readable, &mut report).await?;
    }
    Ok(report)
}

async fn server_check(session: &Session, request: VerifyRequest) -> Result<Report, AgentError> {
    let response = session
        .storage
        .clone()
        .verify(request)
        .await
        .map_err(AgentError::rpc("verifying on the server"))?
        .into_inner();
    Ok(Report {
        chunks_checked: response.chunks_checked,
        bytes_checked: response.bytes_checked,
        missing: response.missing.into_iter().collect(),
        corrupt: response.corrupt.into_iter().collect(),
        chunks_read: 0,
    })
}

fn merge(into: &mut Report, part: Report) {
    into.chunks_checked += part.chunks_checked;
    into.bytes_checked += part.bytes_checked;
    into.missing.extend(part.missing);
    into.corrupt.extend(part.corrupt);
}

/// Downloads and opens each chunk; one that fails is recorded as corrupt
/// (a failed batch is retried chunk by chunk to name the culprits).
async fn read_back(
    session: &Session,
    keys: &Arc<Keys>,
    ids: &[Vec<u8>],
    report: &mut Report,
) -> Result<(), AgentError> {
    for batch in ids.chunks(READ_BATCH) {
        if read_all(session, keys, batch.to_vec()).await.is_ok() {
            report.chunks_read += batch.len() as u64;
            continue;
        }
        for id in batch {
            match read_all(session, keys, vec![id.clone()]).await {
                Ok(()) => report.chunks_read += 1,
                Err(AgentError::Rpc { status, .. }) if status.code() == tonic::Code::NotFound => {
                    report.missing.insert(id.clone());
                }
                Err(AgentError::Rpc { status, .. }) if status.code() != tonic::Code::DataLoss => {
                    return Err(AgentError::rpc("reading chunks back")(status));
                }
                Err(e) => {
                    let shown = ChunkId::from_bytes(id).map_or_else(|_| "?".into(), |c| c.to_string());
                    tracing::warn!(chunk = %shown, error = %e, "chunk failed its check");
                    report.corrupt.insert(id.clone());
                }
            }
        }
    }
    Ok(())
}

async fn read_all(session: &Session, keys: &Arc<Keys>, ids: Vec<Vec<u8>>) -> Result<(), AgentError> {
    let stream = fetch_chunks(session.storage.clone(), keys.clone(), ids).await?;
    let mut stream = std::pin::pin!(stream);
    while stream.try_next().await?.is_some() {}
    Ok(())
}
