//! The Mirror gRPC service: links set at run time (by flags, the
//! coordinator or an operator), and their status with lag as each
//! source reports it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use duplex_proto::v1::mirror_server::Mirror;
use duplex_proto::v1::storage_admin_client::StorageAdminClient;
use duplex_proto::v1::{
    GetMirrorStatusRequest, GetStorageStatusRequest, LinkSpec, LinkStatus, MirrorStatus, ServerInfo,
    SetLinksRequest,
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::link;

struct Running {
    status: Arc<Mutex<LinkStatus>>,
    stop: CancellationToken,
}

pub struct MirrorApi {
    pub info: ServerInfo,
    links: Mutex<HashMap<(String, String), Running>>,
}

fn key(spec: &LinkSpec) -> (String, String) {
    (spec.source.clone(), spec.destination.clone())
}

impl MirrorApi {
    pub fn new(info: ServerInfo) -> Self {
        Self {
            info,
            links: Mutex::new(HashMap::new()),
        }
    }

    /// Starts links not yet running, stops links no longer wanted, and
    /// restarts links whose rate changed.
    pub fn set_links(&self, wanted: Vec<LinkSpec>) -> Result<(), Status> {
        for spec in &wanted {
            for url in [&spec.source, &spec.destination] {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(Status::invalid_argument(format!(
                        "link address {:?} must be an http(s) URL",
                        duplex_types::shown(url)
                    )));
                }
            }
            if spec.source == spec.destination {
                return Err(Status::invalid_argument(format!(
                    "link from {} to itself",
                    duplex_types::shown(&spec.source)
                )));
            }
        }
        let mut links = self
            .links
            .lock()
            .map_err(|_| Status::internal("link table poisoned"))?;
        links.retain(|k, running| {
            let keep = wanted
                .iter()
                .any(|w| key(w) == *k && running.status.lock().is_ok_and(|s| s.spec.as_ref() == Some(w)));
            if !keep {
                tracing::info!(source = %k.0, destination = %k.1, "link stopped: no longer assigned here");
                running.stop.cancel();
            }
            keep
        });
        for spec in wanted {
            if links.contains_key(&key(&spec)) {
                continue;
            }
            let status = Arc::new(Mutex::new(LinkStatus {
                spec: Some(spec.clone()),
                state: "starting".into(),
                ..Default::default()
            }));
            let stop = CancellationToken::new();
            tracing::info!(source = %spec.source, destination = %spec.destination, rate = spec.rate, "link configured");
            tokio::spawn(link::run(spec.clone(), status.clone(), stop.clone()));
            links.insert(key(&spec), Running { status, stop });
        }
        Ok(())
    }

    async fn status(&self) -> MirrorStatus {
        let snapshot: Vec<LinkStatus> = self
            .links
            .lock()
            .map(|l| {
                l.values()
                    .filter_map(|r| r.status.lock().ok().map(|s| s.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let mut links = Vec::new();
        for mut link in snapshot {
            if let Some(spec) = &link.spec
                && let Some((seq, lag)) = source_view(spec).await
            {
                link.source_seq = seq;
                link.lag = lag;
            }
            links.push(link);
        }
        MirrorStatus {
            server: Some(self.info.clone()),
            links,
        }
    }
}

/// The source's sequence and its view of this link's lag.
async fn source_view(spec: &LinkSpec) -> Option<(u64, Option<duplex_proto::v1::Lag>)> {
    let mut admin = StorageAdminClient::new(duplex_rpc::channel(&spec.source).ok()?);
    let status = admin
        .get_status(GetStorageStatusRequest {})
        .await
        .ok()?
        .into_inner();
    let lag = status
        .links_out
        .iter()
        .find(|l| l.destination == spec.destination)
        .and_then(|l| l.lag);
    Some((status.seq, lag))
}

impl MirrorApi {
    /// The links this mirror runs, in a stable order.
    pub fn specs(&self) -> Vec<LinkSpec> {
        let mut specs: Vec<LinkSpec> = self
            .links
            .lock()
            .map(|l| {
                l.values()
                    .filter_map(|r| r.status.lock().ok().and_then(|s| s.spec.clone()))
                    .collect()
            })
            .unwrap_or_default();
        specs.sort_by_key(key);
        specs
    }

    /// Runs exactly the links the coordinator assigned.
    pub fn apply_assignment(&self, assignment: duplex_proto::v1::Assignment) {
        let mut wanted = assignment.links;
        wanted.sort_by_key(key);
        if wanted == self.specs() {
            return;
        }
        if let Err(status) = self.set_links(wanted) {
            tracing::warn!(%status, "cannot run the links the coordinator assigned");
        }
    }

    /// A mirror's lag is the largest of its links'.
    pub async fn heartbeat(&self) -> duplex_proto::v1::HeartbeatRequest {
        let status = self.status().await;
        let lag = status
            .links
            .iter()
            .filter_map(|l| l.lag)
            .max_by_key(|l| l.records);
        let now = duplex_types::now_ms();
        let link_health = status
            .links
            .iter()
            .map(|l| duplex_proto::v1::LinkHealth {
                spec: l.spec.clone(),
                failing_for_ms: if l.failing_since_unix_ms == 0 {
                    0
                } else {
                    // At least 1: a link that failed this very millisecond is failing.
                    (now - l.failing_since_unix_ms).max(1) as u64
                },
                state: l.state.clone(),
            })
            .collect();
        duplex_proto::v1::HeartbeatRequest {
            server: Some(self.info.clone()),
            role: "running".into(),
            lag,
            links: self.specs(),
            link_health,
            ..Default::default()
        }
    }
}

#[tonic::async_trait]
impl Mirror for MirrorApi {
    async fn set_links(&self, request: Request<SetLinksRequest>) -> Result<Response<MirrorStatus>, Status> {
        self.set_links(request.into_inner().links)?;
        Ok(Response::new(self.status().await))
    }

    async fn get_status(
        &self,
        _request: Request<GetMirrorStatusRequest>,
    ) -> Result<Response<MirrorStatus>, Status> {
        Ok(Response::new(self.status().await))
    }
}

/// `/metrics`: per link, checkpoint, lag, bytes sent and retries.
pub fn metrics(api: Arc<MirrorApi>) -> duplex_rpc::metrics::MetricsFn {
    Arc::new(move || {
        let api = api.clone();
        Box::pin(async move {
            let mut e = duplex_rpc::metrics::Exposition::default();
            let name = api.info.name.clone();
            e.gauge(
                "duplex_up",
                "1 while the server answers.",
                &[("server", name.as_str())],
                1.0,
            );
            for link in api.status().await.links {
                let spec = link.spec.clone().unwrap_or_default();
                let l = [
                    ("server", name.as_str()),
                    ("source", spec.source.as_str()),
                    ("destination", spec.destination.as_str()),
                ];
                let lag = link.lag.unwrap_or_default();
                e.gauge(
                    "duplex_mirror_checkpoint",
                    "Source sequence the destination has applied.",
                    &l,
                    link.checkpoint as f64,
                );
                e.lag(&l, &lag);
                e.counter(
                    "duplex_mirror_bytes_sent_total",
                    "Chunk bytes sent.",
                    &l,
                    link.bytes_sent as f64,
                );
                e.counter(
                    "duplex_mirror_retries_total",
                    "Times the link restarted after an error.",
                    &l,
                    link.retries as f64,
                );
            }
            e
        })
    })
}
