//! gRPC face of mirroring on a storage server: the change feed for a
//! mirror, chunk reads for a destination pulling a batch, the pull itself
//! (atomic, with the checkpoint), and progress reports for sync mode and lag.

use std::pin::Pin;
use std::sync::Arc;

use duplex_proto::v1::storage_replication_server::StorageReplication;
use duplex_proto::v1::{
    AccountChunk, ChangeFeedRequest, ChangeRecord, Checkpoint, GetCheckpointRequest, PullBatchRequest,
    PullBatchResponse, ReadChunksRequest, ReportProgressRequest, ReportProgressResponse,
};
use duplex_types::{AccountId, Seq};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::mirroring::Outbound;
use crate::service::{StorageApi, blocking, chunk_ids};
use crate::store::Store;

const FEED_BATCH: usize = 256;

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl StorageReplication for StorageApi {
    type ChangeFeedStream = Stream_<ChangeRecord>;

    async fn change_feed(
        &self,
        request: Request<ChangeFeedRequest>,
    ) -> Result<Response<Self::ChangeFeedStream>, Status> {
        let req = request.into_inner();
        let (tx, rx) = mpsc::channel(FEED_BATCH);
        tokio::spawn(follow_feed(
            self.store.clone(),
            Seq(req.from_seq),
            req.exclude_origin,
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ReadChunksStream = Stream_<AccountChunk>;

    async fn read_chunks(
        &self,
        request: Request<ReadChunksRequest>,
    ) -> Result<Response<Self::ReadChunksStream>, Status> {
        let req = request.into_inner();
        let account = AccountId(req.account_id);
        let ids = chunk_ids(&req.ids)?;
        let skip_missing = req.skip_missing;
        Ok(Response::new(crate::chunk_stream::read_chunks(
            self.store.clone(),
            account,
            ids,
            move |id, found| match found {
                Ok(Some(c)) => Some(Ok(AccountChunk {
                    account_id: account.0,
                    chunk: Some(c.into_proto()),
                    origin: String::new(),
                })),
                Ok(None) if skip_missing => None,
                Ok(None) => Some(Err(Status::not_found(format!(
                    "chunk {id} of account {} not found",
                    account.0
                )))),
                Err(e) => Some(Err(Status::from(e))),
            },
        )))
    }

    async fn pull_batch(
        &self,
        request: Request<PullBatchRequest>,
    ) -> Result<Response<PullBatchResponse>, Status> {
        crate::pull::pull(&self.store, &self.sources, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_checkpoint(
        &self,
        request: Request<GetCheckpointRequest>,
    ) -> Result<Response<Checkpoint>, Status> {
        let source = request.into_inner().source_id;
        let key = source.clone();
        let seq = blocking(&self.store, move |s| s.checkpoint(&key)).await?;
        Ok(Response::new(Checkpoint {
            source_id: source,
            seq: seq.0,
        }))
    }

    async fn report_progress(
        &self,
        request: Request<ReportProgressRequest>,
    ) -> Result<Response<ReportProgressResponse>, Status> {
        let req = request.into_inner();
        self.mirroring.report(
            Outbound {
                destination_id: req.destination_id,
                destination: req.destination,
                applied: req.applied_seq,
            },
            self.store.last_seq().0,
        );
        Ok(Response::new(ReportProgressResponse {}))
    }
}

/// Streams the feed after `sent` as it grows, until the reader goes away.
async fn follow_feed(
    store: Arc<Store>,
    mut sent: Seq,
    exclude: String,
    tx: mpsc::Sender<Result<ChangeRecord, Status>>,
) {
    let mut notify = store.subscribe_feed();
    loop {
        let (excl, from) = (exclude.clone(), sent);
        let batch = blocking(&store, move |s| s.feed_after(from, &excl, FEED_BATCH)).await;
        let (records, last) = match batch {
            Ok(b) => b,
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                return;
            }
        };
        for rec in records {
            if tx.send(Ok(rec)).await.is_err() {
                return;
            }
        }
        if last == sent {
            tokio::select! {
                () = tx.closed() => return,
                _ = notify.changed() => {}
            }
        }
        sent = last;
    }
}
