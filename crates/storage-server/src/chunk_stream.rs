//! Streams chunks read in the blocking pool to a gRPC response.
//!
//! Chunks cross from the reading thread to the response in batches, not one
//! by one: with one hand-over per chunk, each chunk parked the reader and
//! woke the runtime, and perf put a fifth of a server's CPU, serving a
//! restore of many small files, in those wake-ups.

use std::pin::Pin;
use std::sync::Arc;

use duplex_types::{AccountId, ChunkId};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::store::{Store, StoreError, StoredChunk};

/// A batch is handed over once it holds this many bytes of chunks...
const BATCH_BYTES: usize = 1024 * 1024;
/// ...or this many items, whichever comes first.
const BATCH_ITEMS: usize = 256;
/// Batches read ahead of the response: with the batch bound, what a slow
/// client can make the server hold.
const BATCHES_AHEAD: usize = 2;

pub type ItemStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Reads `ids` of `account` in order on the blocking pool. `item` turns
/// each read into what the stream yields (`None` leaves it out); the
/// stream ends after the first error.
pub fn read_chunks<T, F>(
    store: Arc<Store>,
    account: AccountId,
    ids: Vec<ChunkId>,
    mut item: F,
) -> ItemStream<T>
where
    T: Send + 'static,
    F: FnMut(ChunkId, Result<Option<StoredChunk>, StoreError>) -> Option<Result<T, Status>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Vec<Result<T, Status>>>(BATCHES_AHEAD);
    tokio::task::spawn_blocking(move || {
        let mut batch = Batch::default();
        let read = store.read_chunks(account, &ids, |id, found| {
            let bytes = match &found {
                Ok(Some(chunk)) => chunk.data.len(),
                _ => 0,
            };
            let Some(next) = item(id, found) else {
                return true;
            };
            let stop = next.is_err();
            batch.push(next, bytes);
            if (stop || batch.is_full()) && tx.blocking_send(batch.take()).is_err() {
                return false;
            }
            !stop
        });
        if let Err(e) = read {
            batch.push(Err(Status::from(e)), 0);
        }
        if !batch.items.is_empty() {
            let _ = tx.blocking_send(batch.take());
        }
    });
    Box::pin(ReceiverStream::new(rx).flat_map(futures::stream::iter))
}

struct Batch<T> {
    items: Vec<Result<T, Status>>,
    bytes: usize,
}

impl<T> Default for Batch<T> {
    fn default() -> Self {
        Batch {
            items: Vec::new(),
            bytes: 0,
        }
    }
}

impl<T> Batch<T> {
    fn push(&mut self, item: Result<T, Status>, bytes: usize) {
        self.items.push(item);
        self.bytes += bytes;
    }

    fn is_full(&self) -> bool {
        self.bytes >= BATCH_BYTES || self.items.len() >= BATCH_ITEMS
    }

    fn take(&mut self) -> Vec<Result<T, Status>> {
        self.bytes = 0;
        std::mem::take(&mut self.items)
    }
}
