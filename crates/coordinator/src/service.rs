//! The Coordinator gRPC service: thin handlers over `Core` and `ops`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use duplex_proto::v1::coordinator_server::Coordinator;
use duplex_proto::v1::{
    CancelRequest, ClusterStatus, EnrollmentToken, FailbackRequest, FailoverRequest, GetClusterStatusRequest,
    GetOperationRequest, GetTopologyRequest, HeartbeatRequest, HeartbeatResponse, HistoryRequest,
    HistoryResponse, IssueEnrollmentTokenRequest, Lag, Operation, OperationPlan, RemoveServerRequest,
    RemoveServerResponse, ResyncRequest, ServerState, SwitchoverRequest, Topology,
};
use duplex_types::{NameKind, validate_name};
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::core::{Core, Inner, durably, random_secret, wall_ms};
use crate::ops;

const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(600);
const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

pub struct CoordinatorApi {
    pub core: Arc<Core>,
}

impl CoordinatorApi {
    async fn status(&self) -> ClusterStatus {
        let inner = self.core.lock().await;
        let now = Instant::now();
        let mut servers = vec![ServerState {
            server: Some(self.core.info.clone()),
            role: "running".into(),
            healthy: true,
            last_heartbeat_unix_ms: wall_ms(),
            ..Default::default()
        }];
        for server in inner.servers.values() {
            let seen = inner.observed.get(&server.name);
            let lag = seen
                .and_then(|o| o.report.lag)
                .or_else(|| inbound_lag(&inner, &server.id));
            servers.push(ServerState {
                role: self.core.shown_role(&inner, &server.name),
                healthy: seen.is_some_and(|o| now.duration_since(o.at) < self.core.config.failover_timeout),
                epoch: seen.map_or(0, |o| o.report.epoch),
                lag,
                last_heartbeat_unix_ms: seen.map_or(0, |o| o.wall_ms),
                assigned_role: inner.cluster.roles.get(&server.name).cloned().unwrap_or_default(),
                position: seen.map_or(0, |o| o.report.position),
                server: Some(server.clone()),
            });
        }
        ClusterStatus {
            mode: self.core.config.mode.clone(),
            epoch: inner.cluster.epoch,
            phase: Core::phase(&inner),
            servers,
            operation: inner.operation.clone(),
            moved_homes: inner.cluster.moved_homes.clone(),
            ..Default::default()
        }
    }

    async fn start(
        &self,
        kind: &str,
        plan: OperationPlan,
        detail: String,
        forced: bool,
    ) -> Result<Operation, Status> {
        ops::start(&self.core, kind, plan, detail, false, forced).await
    }
}

/// A replica's lag, as the primaries report their outbound links to it.
fn inbound_lag(inner: &Inner, id: &str) -> Option<Lag> {
    inner
        .observed
        .values()
        .flat_map(|o| o.report.outbound.iter())
        .filter(|out| out.destination_id == id)
        .filter_map(|out| out.lag)
        .max_by_key(|l| l.records)
}

/// The site an operator named, or by default the one holding the roles.
fn site_or_active(inner: &Inner, site: &str) -> Result<String, Status> {
    if site.is_empty() {
        return ops::plan::active_site(inner)
            .ok_or_else(|| Status::failed_precondition("no server holds a master or primary role"));
    }
    validate_name(NameKind::Site, site).map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(site.to_owned())
}

type TopologyStream = Pin<Box<dyn Stream<Item = Result<Topology, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorApi {
    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        Ok(Response::new(self.core.heartbeat(request.into_inner()).await?))
    }

    async fn get_status(
        &self,
        _request: Request<GetClusterStatusRequest>,
    ) -> Result<Response<ClusterStatus>, Status> {
        Ok(Response::new(self.status().await))
    }

    async fn get_topology(
        &self,
        _request: Request<GetTopologyRequest>,
    ) -> Result<Response<Topology>, Status> {
        self.core.publish().await;
        Ok(Response::new(self.core.watch_topology().borrow().clone()))
    }

    type WatchTopologyStream = TopologyStream;

    async fn watch_topology(
        &self,
        _request: Request<GetTopologyRequest>,
    ) -> Result<Response<TopologyStream>, Status> {
        self.core.publish().await;
        let stream = tokio_stream::wrappers::WatchStream::new(self.core.watch_topology());
        let stream = futures::StreamExt::map(stream, Ok);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn failover(&self, request: Request<FailoverRequest>) -> Result<Response<Operation>, Status> {
        let req = request.into_inner();
        let inner = self.core.lock().await;
        let site = site_or_active(&inner, &req.site)?;
        let plan = ops::plan::away_from_site(&self.core, &inner, &site, false)?;
        let max = self.core.config.max_lag_on_failover.as_secs_f64();
        if let Some(why) = ops::plan::too_lossy(&inner, &plan, max).filter(|_| !req.force) {
            return Err(Status::failed_precondition(format!(
                "failing over site {site} could lose acknowledged writes: {why}; --force accepts the loss"
            )));
        }
        drop(inner);
        let detail = format!(
            "manual failover of site {site}{}",
            if req.force { " (forced)" } else { "" }
        );
        Ok(Response::new(
            self.start("failover", plan, detail, req.force).await?,
        ))
    }

    async fn switchover(&self, request: Request<SwitchoverRequest>) -> Result<Response<Operation>, Status> {
        let req = request.into_inner();
        let inner = self.core.lock().await;
        let site = site_or_active(&inner, &req.site)?;
        let plan = ops::plan::away_from_site(&self.core, &inner, &site, false)?;
        let down: Vec<&String> = plan
            .roles
            .keys()
            .filter(|n| !self.core.healthy(&inner, n))
            .collect();
        if !down.is_empty() {
            return Err(Status::failed_precondition(format!(
                "switchover needs every server involved up, but {down:?} are down; use failover"
            )));
        }
        drop(inner);
        let detail = format!("planned switchover away from site {site}");
        Ok(Response::new(
            self.start("switchover", plan, detail, false).await?,
        ))
    }

    async fn failback(&self, request: Request<FailbackRequest>) -> Result<Response<Operation>, Status> {
        let verify = request.into_inner().verify;
        let inner = self.core.lock().await;
        let mut plan = ops::plan::failback(&inner)?;
        drop(inner);
        plan.verify = verify;
        let detail = format!(
            "failback of site {} to its original roles{}",
            plan.from_site,
            if verify { ", with an integrity check" } else { "" }
        );
        Ok(Response::new(self.start("failback", plan, detail, false).await?))
    }

    async fn resync(&self, request: Request<ResyncRequest>) -> Result<Response<Operation>, Status> {
        let rate = request.into_inner().rate;
        let held = self.core.lock().await.cluster.held.clone();
        let plan = OperationPlan {
            rate,
            ..Default::default()
        };
        let detail = format!(
            "resync into {} at {}",
            if held.is_empty() {
                "every mirror".to_owned()
            } else {
                held.join(", ")
            },
            if rate == 0 {
                "full speed".to_owned()
            } else {
                format!("{rate} bytes/s")
            }
        );
        Ok(Response::new(self.start("resync", plan, detail, false).await?))
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let id = request.into_inner().id;
        if id.is_empty() {
            return self
                .core
                .lock()
                .await
                .operation
                .clone()
                .map(Response::new)
                .ok_or_else(|| Status::not_found("no operation has run yet"));
        }
        let id: u64 = id
            .parse()
            .map_err(|_| Status::invalid_argument(format!("operation id {id:?} is not a number")))?;
        let ops = durably(|| self.core.store.operations())?;
        ops.into_iter()
            .find(|o| o.id == id)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no operation {id}")))
    }

    async fn history(&self, _request: Request<HistoryRequest>) -> Result<Response<HistoryResponse>, Status> {
        let events = durably(|| self.core.store.operations())?;
        Ok(Response::new(HistoryResponse { events }))
    }

    async fn issue_enrollment_token(
        &self,
        request: Request<IssueEnrollmentTokenRequest>,
    ) -> Result<Response<EnrollmentToken>, Status> {
        let ttl = match request.into_inner().ttl_seconds {
            0 => DEFAULT_TOKEN_TTL,
            s => Duration::from_secs(s),
        };
        if ttl > MAX_TOKEN_TTL {
            return Err(Status::invalid_argument(
                "an enrollment token lives at most 7 days",
            ));
        }
        let token = random_secret();
        let expires = wall_ms() + ttl.as_millis() as i64;
        let hash = blake3::hash(token.as_bytes()).to_hex().to_string();
        durably(|| self.core.store.add_token(&hash, expires))?;
        tracing::info!(ttl = ?ttl, "enrollment token issued");
        Ok(Response::new(EnrollmentToken {
            token,
            expires_unix_ms: expires,
        }))
    }

    // Placeholders so the service compiles against the extended proto; the
    // engine rewrite implements them.
    async fn cancel(&self, _request: Request<CancelRequest>) -> Result<Response<Operation>, Status> {
        Err(Status::unimplemented(
            "this coordinator cannot cancel operations yet",
        ))
    }

    async fn remove_server(
        &self,
        _request: Request<RemoveServerRequest>,
    ) -> Result<Response<RemoveServerResponse>, Status> {
        Err(Status::unimplemented(
            "this coordinator cannot remove servers yet",
        ))
    }
}

/// `/metrics`: heartbeat age, role, epoch and lag per server; the running
/// phase; operations by kind and outcome.
pub fn metrics(core: Arc<Core>) -> duplex_rpc::metrics::MetricsFn {
    Arc::new(move || {
        let core = core.clone();
        Box::pin(async move {
            let mut e = duplex_rpc::metrics::Exposition::default();
            let api = CoordinatorApi { core: core.clone() };
            let status = api.status().await;
            e.gauge(
                "duplex_up",
                "1 while the server answers.",
                &[("server", "coordinator")],
                1.0,
            );
            e.gauge(
                "duplex_epoch",
                "The cluster epoch.",
                &[("server", "coordinator")],
                status.epoch as f64,
            );
            e.gauge(
                "duplex_coordinator_phase",
                "1 for the running phase (steady when none).",
                &[("phase", status.phase.as_str())],
                1.0,
            );
            let now = wall_ms();
            for s in status.servers.iter().skip(1) {
                let name = s.server.as_ref().map_or("", |i| i.name.as_str());
                let l = [("server", name)];
                e.gauge(
                    "duplex_heartbeat_age_seconds",
                    "Seconds since the server's last heartbeat.",
                    &l,
                    if s.last_heartbeat_unix_ms == 0 {
                        f64::INFINITY
                    } else {
                        (now - s.last_heartbeat_unix_ms).max(0) as f64 / 1000.0
                    },
                );
                e.gauge(
                    "duplex_server_healthy",
                    "1 while heartbeats arrive.",
                    &l,
                    f64::from(u8::from(s.healthy)),
                );
                e.gauge(
                    "duplex_server_epoch",
                    "Epoch the server reports.",
                    &l,
                    s.epoch as f64,
                );
                if let Some(lag) = &s.lag {
                    e.lag(&l, lag);
                }
            }
            let ops = durably(|| core.store.operations()).unwrap_or_default();
            let mut counts: std::collections::BTreeMap<(String, String), u64> = Default::default();
            for op in &ops {
                *counts.entry((op.kind.clone(), op.state.clone())).or_default() += 1;
            }
            for ((kind, state), n) in counts {
                e.counter(
                    "duplex_operations_total",
                    "Failovers, switchovers, failbacks, resyncs and refusals, by outcome.",
                    &[("kind", kind.as_str()), ("state", state.as_str())],
                    n as f64,
                );
            }
            e.finish()
        })
    })
}
