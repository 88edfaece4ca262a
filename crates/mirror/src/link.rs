//! One mirroring link: tail the source's change feed from the checkpoint
//! the destination holds, send only the chunks the destination lacks, then
//! the snapshot records, and the new checkpoint in the same batch. The
//! mirror keeps nothing: killed anywhere, it resumes from the destination's
//! checkpoint and at most re-sends the batches that were not acknowledged.
//!
//! Reading and applying overlap: the next batch is read from the source
//! while the destination writes and fsyncs the one before, so a link runs
//! at the pace of the slower side rather than the sum of both. Batches
//! are still applied one at a time and in order, so the checkpoint only
//! moves forward; a chunk both batches carry is simply stored once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use duplex_proto::MAX_MESSAGE_BYTES;
use duplex_proto::v1::storage_admin_client::StorageAdminClient;
use duplex_proto::v1::storage_replication_client::StorageReplicationClient;
use duplex_proto::v1::{
    ChangeFeedRequest, ChangeRecord, Checkpoint, GetCheckpointRequest, GetStorageStatusRequest, LinkSpec,
    LinkStatus, MirrorItem, MissingChunksOfRequest, ReadChunksRequest, ReportProgressRequest, change_record,
    mirror_item,
};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Records gathered into one batch at most, and how long to wait for more.
const MAX_RECORDS: usize = 256;
const MAX_BATCH_BYTES: u64 = 32 * 1024 * 1024;
const GATHER: Duration = Duration::from_millis(5);
/// How long an idle link waits before checking that the destination answers.
const IDLE_PROBE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{what}: {status}")]
    Rpc {
        what: &'static str,
        status: tonic::Status,
    },
    #[error("invalid address: {0}")]
    Address(#[from] duplex_rpc::ClientError),
    #[error("the change feed ended")]
    FeedEnded,
    #[error("data loss: {0}")]
    Corrupt(String),
    #[error("the idle destination did not answer within {0:?}")]
    Stalled(Duration),
}

fn rpc(what: &'static str) -> impl FnOnce(tonic::Status) -> LinkError {
    move |status| LinkError::Rpc { what, status }
}

type Repl = StorageReplicationClient<Channel>;

fn repl(url: &str) -> Result<Repl, LinkError> {
    Ok(StorageReplicationClient::new(duplex_rpc::channel(url)?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

async fn server_id(url: &str) -> Result<String, LinkError> {
    let mut admin = StorageAdminClient::new(duplex_rpc::channel(url)?);
    let status = admin
        .get_status(GetStorageStatusRequest {})
        .await
        .map_err(rpc("asking for the server id"))?;
    Ok(status.into_inner().server.map(|s| s.id).unwrap_or_default())
}

pub async fn run(spec: LinkSpec, status: Arc<Mutex<LinkStatus>>, stop: CancellationToken) {
    let mut backoff = duplex_rpc::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    update(&status, |s| s.failing_since_unix_ms = duplex_types::now_ms());
    loop {
        update(&status, |s| s.state = "connecting".into());
        let result = tokio::select! {
            () = stop.cancelled() => return,
            r = run_once(&spec, &status) => r,
        };
        if let Err(e) = &result {
            tracing::warn!(source = %spec.source, destination = %spec.destination, error = %e, "link interrupted; retrying");
        }
        update(&status, |s| {
            if let Err(e) = &result {
                s.state = format!("error: {e}");
                s.retries += 1;
            }
            if s.failing_since_unix_ms == 0 {
                s.failing_since_unix_ms = duplex_types::now_ms();
            }
        });
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff.next_pause()) => {}
        }
    }
}

/// The link did its work: a batch landed, or the idle destination answered.
fn copied(s: &mut LinkStatus) {
    s.failing_since_unix_ms = 0;
}

fn update(status: &Mutex<LinkStatus>, f: impl FnOnce(&mut LinkStatus)) {
    if let Ok(mut s) = status.lock() {
        f(&mut s);
    }
}

async fn run_once(spec: &LinkSpec, status: &Mutex<LinkStatus>) -> Result<(), LinkError> {
    let source_id = server_id(&spec.source).await?;
    let destination_id = server_id(&spec.destination).await?;
    let mut src = repl(&spec.source)?;
    let mut dst = repl(&spec.destination)?;
    let checkpoint = dst
        .get_checkpoint(GetCheckpointRequest {
            source_id: source_id.clone(),
        })
        .await
        .map_err(rpc("reading the checkpoint"))?
        .into_inner()
        .seq;
    let mut feed = src
        .change_feed(ChangeFeedRequest {
            from_seq: checkpoint,
            exclude_origin: destination_id.clone(),
        })
        .await
        .map_err(rpc("opening the change feed"))?
        .into_inner();
    // Tell the source where the destination stands now, so its lag (and a
    // sync-mode wait) is right before the first batch.
    src.report_progress(ReportProgressRequest {
        destination_id: destination_id.clone(),
        destination: spec.destination.clone(),
        applied_seq: checkpoint,
    })
    .await
    .map_err(rpc("reporting progress"))?;
    // Connected is not yet copying: the link counts as failing until a
    // batch lands or the idle destination answers (see `copied`).
    update(status, |s| {
        s.state = "running".into();
        s.checkpoint = checkpoint;
    });
    tracing::info!(source = %spec.source, destination = %spec.destination, checkpoint, "link running");
    // One batch read ahead while one is applied: at most three in memory.
    let (ready, mut prepared) = tokio::sync::mpsc::channel::<Prepared>(1);
    let reading = {
        let (mut src, mut dst) = (src.clone(), dst.clone());
        let source_id = source_id.clone();
        async move {
            let mut limiter = RateLimiter::new(spec.rate);
            loop {
                let batch = gather(&mut feed).await?;
                let Some(last) = batch.last().map(|r| r.seq) else {
                    continue;
                };
                let batch = prepare(&mut src, &mut dst, &source_id, batch, last, &mut limiter).await?;
                if ready.send(batch).await.is_err() {
                    return Ok::<(), LinkError>(());
                }
            }
        }
    };
    let applying = async move {
        loop {
            // An idle link still checks that the destination answers, so a
            // destination that died is a failing link within seconds, not
            // at the next write.
            let batch = match tokio::time::timeout(IDLE_PROBE, prepared.recv()).await {
                Ok(Some(batch)) => batch,
                Ok(None) => return Ok(()),
                Err(_) => {
                    let probe = dst.get_checkpoint(GetCheckpointRequest {
                        source_id: source_id.clone(),
                    });
                    tokio::time::timeout(IDLE_PROBE * 5, probe)
                        .await
                        .map_err(|_| LinkError::Stalled(IDLE_PROBE * 5))?
                        .map_err(rpc("checking the idle destination"))?;
                    update(status, copied);
                    continue;
                }
            };
            dst.apply_batch(futures::stream::iter(batch.items))
                .await
                .map_err(rpc("applying the batch on the destination"))?;
            src.report_progress(ReportProgressRequest {
                destination_id: destination_id.clone(),
                destination: spec.destination.clone(),
                applied_seq: batch.last,
            })
            .await
            .map_err(rpc("reporting progress"))?;
            update(status, |s| {
                copied(s);
                s.checkpoint = batch.last;
                s.chunks_sent += batch.sent.chunks;
                s.bytes_sent += batch.sent.bytes;
                s.snapshots_sent += batch.sent.snapshots;
            });
        }
    };
    tokio::try_join!(reading, applying).map(|_| ())
}

/// Waits for one record, then takes whatever else arrives within a moment.
async fn gather(feed: &mut tonic::Streaming<ChangeRecord>) -> Result<Vec<ChangeRecord>, LinkError> {
    let first = feed
        .message()
        .await
        .map_err(rpc("reading the change feed"))?
        .ok_or(LinkError::FeedEnded)?;
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + GATHER;
    let mut bytes = 0u64;
    while batch.len() < MAX_RECORDS && bytes < MAX_BATCH_BYTES {
        match tokio::time::timeout_at(deadline, feed.next()).await {
            Ok(Some(Ok(rec))) => {
                if let Some(change_record::Change::Chunk(c)) = &rec.change {
                    bytes += u64::from(c.stored_len);
                }
                batch.push(rec);
            }
            Ok(Some(Err(status))) => return Err(rpc("reading the change feed")(status)),
            Ok(None) => return Err(LinkError::FeedEnded),
            Err(_) => break,
        }
    }
    Ok(batch)
}

#[derive(Default)]
struct Sent {
    chunks: u64,
    bytes: u64,
    snapshots: u64,
}

/// The mirror is a hop too: a payload damaged on the source's disk or on
/// the way is caught here, named, and never forwarded.
fn check_payload_hash(item: &duplex_proto::v1::AccountChunk) -> Result<(), LinkError> {
    let Some(chunk) = &item.chunk else {
        return Err(LinkError::Corrupt(
            "the source sent a chunk item without a chunk".into(),
        ));
    };
    if duplex_types::sealed::payload_hash(&chunk.data).as_slice() != chunk.data_hash.as_slice() {
        let id = hex::encode(&chunk.id);
        return Err(LinkError::Corrupt(format!(
            "chunk {id} of account {} from the source does not match its data_hash",
            item.account_id
        )));
    }
    Ok(())
}

/// One batch read from the source, ready for the destination.
struct Prepared {
    items: Vec<MirrorItem>,
    last: u64,
    sent: Sent,
}

/// Reads the chunks of `records` the destination lacks and puts them, the
/// snapshot records and the checkpoint `last` into one batch.
async fn prepare(
    src: &mut Repl,
    dst: &mut Repl,
    source_id: &str,
    records: Vec<ChangeRecord>,
    last: u64,
    limiter: &mut RateLimiter,
) -> Result<Prepared, LinkError> {
    // account → [(chunk id, origin)]
    let mut wanted: BTreeMap<u64, Vec<(Vec<u8>, String)>> = BTreeMap::new();
    let mut items = Vec::new();
    for rec in records {
        match &rec.change {
            Some(change_record::Change::Chunk(c)) => {
                wanted
                    .entry(rec.account_id)
                    .or_default()
                    .push((c.id.clone(), rec.origin.clone()));
            }
            Some(change_record::Change::Snapshot(_)) => items.push(MirrorItem {
                item: Some(mirror_item::Item::Snapshot(rec)),
            }),
            None => {}
        }
    }
    let mut sent = Sent {
        snapshots: items.len() as u64,
        ..Sent::default()
    };
    let mut chunk_items = Vec::new();
    for (account, ids) in wanted {
        let request = MissingChunksOfRequest {
            account_id: account,
            ids: ids.iter().map(|(id, _)| id.clone()).collect(),
        };
        let missing = dst
            .missing_chunks_of(request)
            .await
            .map_err(rpc("asking what the destination lacks"))?;
        let missing = missing.into_inner().missing;
        if missing.is_empty() {
            continue;
        }
        let origins: BTreeMap<Vec<u8>, String> = ids.into_iter().collect();
        let mut stream = src
            .read_chunks(ReadChunksRequest {
                account_id: account,
                ids: missing,
            })
            .await
            .map_err(rpc("reading chunks from the source"))?
            .into_inner();
        while let Some(mut item) = stream
            .message()
            .await
            .map_err(rpc("reading chunks from the source"))?
        {
            check_payload_hash(&item)?;
            let len = item.chunk.as_ref().map_or(0, |c| c.data.len() as u64);
            item.origin = item
                .chunk
                .as_ref()
                .and_then(|c| origins.get(&c.id).cloned())
                .unwrap_or_default();
            limiter.take(len).await;
            sent.chunks += 1;
            sent.bytes += len;
            chunk_items.push(MirrorItem {
                item: Some(mirror_item::Item::Chunk(item)),
            });
        }
    }
    // Chunks first, so every snapshot's chunks are in the same commit.
    chunk_items.extend(items);
    chunk_items.push(MirrorItem {
        item: Some(mirror_item::Item::Checkpoint(Checkpoint {
            source_id: source_id.to_owned(),
            seq: last,
        })),
    });
    Ok(Prepared {
        items: chunk_items,
        last,
        sent,
    })
}

/// Keeps a link's chunk traffic under `rate` bytes per second (0: no limit),
/// so a resync does not crush a busy site. A token bucket (governor's GCRA)
/// holding at most one second of traffic: a link idle for a minute may
/// then send one second's worth at once, not a minute's.
struct RateLimiter {
    bucket: Option<governor::DefaultDirectRateLimiter>,
    /// Bytes per second, and the most one wait may ask for.
    burst: std::num::NonZeroU32,
}

impl RateLimiter {
    fn new(rate: u64) -> Self {
        // governor counts in u32 cells; a rate past 4 GB/s is no limit here.
        let burst = std::num::NonZeroU32::new(u32::try_from(rate).unwrap_or(u32::MAX))
            .unwrap_or(std::num::NonZeroU32::MIN);
        let bucket = (rate > 0).then(|| governor::RateLimiter::direct(governor::Quota::per_second(burst)));
        Self { bucket, burst }
    }

    async fn take(&mut self, bytes: u64) {
        let Some(bucket) = &self.bucket else { return };
        let mut left = bytes;
        // A chunk larger than the bucket waits for it in bucket-sized pieces.
        while left > 0 {
            let piece = left.min(u64::from(self.burst.get()));
            left -= piece;
            let Some(n) = u32::try_from(piece).ok().and_then(std::num::NonZeroU32::new) else {
                return;
            };
            // Only `n` over the burst fails, and pieces are at most the burst.
            let _ = bucket.until_n_ready(n).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bug this replaced: credit built up while idle let a link set to
    /// 100 kB/s send 300 kB at once after two idle seconds.
    #[tokio::test]
    async fn idle_time_buys_at_most_one_second_of_burst() {
        let mut limiter = RateLimiter::new(100_000);
        // The idle spell is the scenario itself, not a stand-in for a condition.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let start = std::time::Instant::now();
        for _ in 0..30 {
            limiter.take(10_000).await;
        }
        // 100 kB may go at once; the other 200 kB take two seconds.
        assert!(
            start.elapsed() >= Duration::from_millis(1800),
            "300 kB went out in {:?} at 100 kB/s",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn a_chunk_larger_than_a_second_of_traffic_still_passes() {
        let mut limiter = RateLimiter::new(1_000_000);
        let start = std::time::Instant::now();
        limiter.take(1_500_000).await;
        assert!(
            start.elapsed() >= Duration::from_millis(400),
            "{:?}",
            start.elapsed()
        );
        RateLimiter::new(0).take(u64::MAX).await;
    }
}
