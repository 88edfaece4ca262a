//! One mirroring link: tail the source's change feed from the checkpoint
//! the destination holds, and hand the destination each batch of records
//! to pull: it reads the chunks it lacks straight from the source and
//! commits them with the snapshot records and the new checkpoint, all or
//! nothing. The mirror keeps nothing and never carries a chunk: killed
//! anywhere, it resumes from the destination's checkpoint and at most has
//! a batch pulled again.
//!
//! Gathering and pulling overlap: the next batch is gathered from the feed
//! while the destination pulls the one before. Batches are still pulled
//! one at a time and in order, so the checkpoint only moves forward.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use duplex_proto::MAX_MESSAGE_BYTES;
use duplex_proto::v1::storage_admin_client::StorageAdminClient;
use duplex_proto::v1::storage_replication_client::StorageReplicationClient;
use duplex_proto::v1::{
    ChangeFeedRequest, ChangeRecord, GetCheckpointRequest, GetStorageStatusRequest, LinkSpec, LinkStatus,
    PullBatchRequest, ReportProgressRequest, change_record,
};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Records gathered into one batch at most, and how long to wait for more.
// As many as a destination takes in one pull (`MAX_PULL_RECORDS`): a
// batch of small chunks costs one fsync and one index transaction there.
const MAX_RECORDS: usize = 4096;
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
    // One batch gathered ahead while the destination pulls the one before.
    let (ready, mut gathered) = tokio::sync::mpsc::channel::<Vec<ChangeRecord>>(1);
    let gathering = async move {
        // A rate-limited link pulls at most a second of its traffic at once.
        let max_bytes = if spec.rate > 0 {
            spec.rate.min(MAX_BATCH_BYTES)
        } else {
            MAX_BATCH_BYTES
        };
        loop {
            let batch = gather(&mut feed, max_bytes).await?;
            if ready.send(batch).await.is_err() {
                return Ok::<(), LinkError>(());
            }
        }
    };
    let mut limiter = RateLimiter::new(spec.rate);
    let applying = async move {
        loop {
            // An idle link still checks that the destination answers, so a
            // destination that died is a failing link within seconds, not
            // at the next write.
            let records = match tokio::time::timeout(IDLE_PROBE, gathered.recv()).await {
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
            let Some(last) = records.last().map(|r| r.seq) else {
                continue;
            };
            let pulled = dst
                .pull_batch(PullBatchRequest {
                    source: spec.source.clone(),
                    source_id: source_id.clone(),
                    records,
                    seq: last,
                })
                .await
                .map_err(rpc("having the destination pull the batch"))?
                .into_inner();
            limiter.take(pulled.bytes).await;
            src.report_progress(ReportProgressRequest {
                destination_id: destination_id.clone(),
                destination: spec.destination.clone(),
                applied_seq: last,
            })
            .await
            .map_err(rpc("reporting progress"))?;
            update(status, |s| {
                copied(s);
                s.checkpoint = last;
                s.chunks_sent += pulled.chunks;
                s.bytes_sent += pulled.bytes;
                s.snapshots_sent += pulled.snapshots;
            });
        }
    };
    tokio::try_join!(gathering, applying).map(|_| ())
}

/// Waits for one record, then takes whatever else arrives within a moment.
async fn gather(
    feed: &mut tonic::Streaming<ChangeRecord>,
    max_bytes: u64,
) -> Result<Vec<ChangeRecord>, LinkError> {
    let first = feed
        .message()
        .await
        .map_err(rpc("reading the change feed"))?
        .ok_or(LinkError::FeedEnded)?;
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + GATHER;
    let mut bytes = 0u64;
    while batch.len() < MAX_RECORDS && bytes < max_bytes {
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
