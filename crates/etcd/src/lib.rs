//! A thin client for the part of etcd's v3 API the coordinator keeps its
//! state in (docs/COORDINATOR_HA.md): ranges, fenced transactions, leases
//! and watches. The API subset is compiled from `proto/etcd.proto` with
//! protox, so building needs no `protoc` (the `etcd-client` crate's build
//! script does).

use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

#[allow(clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::watch_client::WatchClient;
pub use pb::{Compare, KeyValue, RequestOp, TxnResponse};

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd endpoint {url:?} is not a valid http URL: {reason}")]
    Url { url: String, reason: String },
    #[error("no etcd endpoint given")]
    NoEndpoint,
    #[error("etcd: {0}")]
    Status(#[from] tonic::Status),
    #[error("etcd ended the {0} stream")]
    StreamEnded(&'static str),
    #[error("etcd refused the lease: {0}")]
    Lease(String),
}

/// A connection to an etcd cluster, spread over its endpoints.
#[derive(Clone)]
pub struct Etcd {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
    watch: WatchClient<Channel>,
}

impl Etcd {
    /// Connects lazily to `urls` (`http://HOST:PORT`), balancing calls over
    /// those that answer.
    pub fn connect(urls: &[String]) -> Result<Etcd, EtcdError> {
        if urls.is_empty() {
            return Err(EtcdError::NoEndpoint);
        }
        let endpoints = urls
            .iter()
            .map(|url| {
                Endpoint::from_shared(url.clone())
                    .map(|e| {
                        // A connection that stops answering (a silent
                        // partition) is dropped within seconds and dialled
                        // again, rather than hanging every later call.
                        e.connect_timeout(Duration::from_secs(2))
                            .tcp_nodelay(true)
                            .http2_keep_alive_interval(Duration::from_secs(1))
                            .keep_alive_timeout(Duration::from_secs(2))
                            .keep_alive_while_idle(true)
                    })
                    .map_err(|e| EtcdError::Url {
                        url: url.clone(),
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let channel = Channel::balance_list(endpoints.into_iter());
        Ok(Etcd {
            kv: KvClient::new(channel.clone()),
            lease: LeaseClient::new(channel.clone()),
            watch: WatchClient::new(channel),
        })
    }

    /// The value of `key` with its revisions, if it exists.
    pub async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, EtcdError> {
        let response = self
            .kv
            .clone()
            .range(pb::RangeRequest {
                key: key.to_vec(),
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok(response.kvs.into_iter().next())
    }

    /// Every key under `prefix`, and the store revision they were read at
    /// (the revision to watch from, so nothing is missed in between).
    pub async fn prefix(&self, prefix: &[u8]) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        let response = self
            .kv
            .clone()
            .range(pb::RangeRequest {
                key: prefix.to_vec(),
                range_end: prefix_end(prefix),
                ..Default::default()
            })
            .await?
            .into_inner();
        let revision = response.header.map_or(0, |h| h.revision);
        Ok((response.kvs, revision))
    }

    /// Runs `success` if every comparison holds, else `failure`, atomically.
    pub async fn txn(
        &self,
        compare: Vec<Compare>,
        success: Vec<RequestOp>,
        failure: Vec<RequestOp>,
    ) -> Result<TxnResponse, EtcdError> {
        Ok(self
            .kv
            .clone()
            .txn(pb::TxnRequest {
                compare,
                success,
                failure,
            })
            .await?
            .into_inner())
    }

    /// A lease of `ttl` (whole seconds, at least one); its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let response = self
            .lease
            .clone()
            .lease_grant(pb::LeaseGrantRequest {
                ttl: ttl.as_secs().max(1) as i64,
                id: 0,
            })
            .await?
            .into_inner();
        if !response.error.is_empty() {
            return Err(EtcdError::Lease(response.error));
        }
        Ok(response.id)
    }

    /// Ends a lease at once; its keys are deleted.
    pub async fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.lease
            .clone()
            .lease_revoke(pb::LeaseRevokeRequest { id })
            .await?;
        Ok(())
    }

    /// Opens a keep-alive stream for lease `id` (renewing it once: etcd
    /// answers the call only when the first request arrives).
    pub async fn keep_alive(&self, id: i64) -> Result<KeepAlive, EtcdError> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(pb::LeaseKeepAliveRequest { id })
            .await
            .map_err(|_| EtcdError::StreamEnded("keep-alive"))?;
        let responses = self
            .lease
            .clone()
            .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(KeepAlive {
            id,
            tx,
            responses,
            sent: true,
        })
    }

    /// Changes under `prefix` from `start_revision` on, as they happen.
    pub async fn watch(&self, prefix: &[u8], start_revision: i64) -> Result<Watch, EtcdError> {
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: prefix.to_vec(),
                    range_end: prefix_end(prefix),
                    start_revision,
                    ..Default::default()
                },
            )),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(create)
            .await
            .map_err(|_| EtcdError::StreamEnded("watch"))?;
        let responses = self
            .watch
            .clone()
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Watch { _tx: tx, responses })
    }
}

/// A lease kept alive by [`KeepAlive::renew`] calls.
pub struct KeepAlive {
    id: i64,
    tx: tokio::sync::mpsc::Sender<pb::LeaseKeepAliveRequest>,
    responses: tonic::Streaming<pb::LeaseKeepAliveResponse>,
    /// A request is out whose answer is not read yet.
    sent: bool,
}

impl KeepAlive {
    /// Renews the lease; the TTL etcd granted again (zero: it had expired).
    pub async fn renew(&mut self) -> Result<Duration, EtcdError> {
        if !std::mem::take(&mut self.sent) {
            self.tx
                .send(pb::LeaseKeepAliveRequest { id: self.id })
                .await
                .map_err(|_| EtcdError::StreamEnded("keep-alive"))?;
        }
        let response = self
            .responses
            .next()
            .await
            .ok_or(EtcdError::StreamEnded("keep-alive"))??;
        Ok(Duration::from_secs(response.ttl.max(0) as u64))
    }
}

/// The events of one watch.
pub struct Watch {
    _tx: tokio::sync::mpsc::Sender<pb::WatchRequest>,
    responses: tonic::Streaming<pb::WatchResponse>,
}

impl Watch {
    /// The next batch of events (skipping etcd's empty "created" answer).
    pub async fn next(&mut self) -> Result<Vec<pb::Event>, EtcdError> {
        loop {
            let response = self
                .responses
                .next()
                .await
                .ok_or(EtcdError::StreamEnded("watch"))??;
            if response.canceled {
                return Err(EtcdError::StreamEnded("watch"));
            }
            if !response.events.is_empty() {
                return Ok(response.events);
            }
        }
    }
}

/// The end of the key range that holds every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: the range runs to the end of the keyspace.
    vec![0]
}

/// Put `value` at `key`, attached to `lease` (0: none).
pub fn put(key: &[u8], value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
            key: key.to_vec(),
            value,
            lease,
            prev_kv: false,
        })),
    }
}

/// Delete `key`.
pub fn delete(key: &[u8]) -> RequestOp {
    RequestOp {
        request: Some(pb::request_op::Request::RequestDeleteRange(
            pb::DeleteRangeRequest {
                key: key.to_vec(),
                ..Default::default()
            },
        )),
    }
}

/// Holds when `key` does not exist.
pub fn absent(key: &[u8]) -> Compare {
    revision_is(key, CompareTarget::Create, 0)
}

/// Holds when `key` was created at `revision` (a fence: the key a leader
/// won with is still the one it won).
pub fn created_at(key: &[u8], revision: i64) -> Compare {
    revision_is(key, CompareTarget::Create, revision)
}

/// Holds when `key` was last changed at `revision` (no lost update).
pub fn modified_at(key: &[u8], revision: i64) -> Compare {
    revision_is(key, CompareTarget::Mod, revision)
}

fn revision_is(key: &[u8], target: CompareTarget, revision: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: target as i32,
        key: key.to_vec(),
        target_union: Some(match target {
            CompareTarget::Mod => TargetUnion::ModRevision(revision),
            _ => TargetUnion::CreateRevision(revision),
        }),
        range_end: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefix_end_is_the_next_prefix() {
        assert_eq!(super::prefix_end(b"/duplex/"), b"/duplex0".to_vec());
        assert_eq!(super::prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(super::prefix_end(b"\xff"), vec![0]);
    }
}
