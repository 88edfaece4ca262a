//! The Coordinator gRPC service: thin handlers that turn requests into engine commands.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use duplex_proto::v1::coordinator_server::Coordinator;
use duplex_proto::v1::{
    CancelRequest, ClusterStatus, EnrollmentToken, FailbackRequest, FailoverRequest, GetClusterStatusRequest,
    GetOperationRequest, GetTopologyRequest, HeartbeatRequest, HeartbeatResponse, HistoryRequest,
    HistoryResponse, IssueEnrollmentTokenRequest, Operation, RemoveServerRequest, RemoveServerResponse,
    ResyncRequest, ServerState, SwitchoverRequest, Topology,
};
use duplex_types::{Role, ServerKind};
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::decide::roles;
use crate::engine::{Command, Engine, durably, shown_role};
use crate::heartbeat::random_secret;

const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(600);
const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Operator actions are attributed to this until operators have names.
const OPERATOR: &str = "operator";

pub struct CoordinatorApi {
    pub engine: Engine,
}

/// The cluster as `duplexctl status` shows it.
pub fn status(engine: &Engine) -> ClusterStatus {
    engine.with_view(|view| {
        let desired = view.desired;
        let mut servers = vec![ServerState {
            server: Some(engine.info.clone()),
            role: Role::Running.as_str().to_owned(),
            healthy: true,
            last_heartbeat_unix_ms: view.now_ms,
            ..Default::default()
        }];
        for member in desired.servers.values() {
            let seen = view.observed.get(&member.name);
            let lag = seen
                .and_then(|o| o.report.lag)
                .or_else(|| view.observed.inbound_lag(&member.id));
            servers.push(ServerState {
                role: shown_role(view, &member.name),
                healthy: view.healthy(&member.name),
                epoch: seen.map_or(0, |o| o.report.epoch),
                lag: lag.map(Into::into),
                last_heartbeat_unix_ms: seen.map_or(0, |o| o.wall_ms),
                assigned_role: desired.role(&member.name).map(String::from).unwrap_or_default(),
                position: seen.map_or(0, |o| o.report.position),
                server: Some(member.into()),
            });
        }
        let operation = desired
            .operation
            .as_ref()
            .map(Operation::from)
            .or_else(|| last_operation(engine));
        ClusterStatus {
            mode: desired.mode.as_str().to_owned(),
            epoch: desired.epoch,
            phase: desired.phase_label(),
            servers,
            operation,
            moved_homes: desired.moved_homes.clone().into_iter().collect(),
            held: desired.held.iter().cloned().collect(),
            warnings: roles::warnings(view),
        }
    })
}

/// The last operation with phases (not a one-off event).
fn last_operation(engine: &Engine) -> Option<Operation> {
    durably(|| engine.store.operations())
        .ok()?
        .into_iter()
        .rev()
        .find(|o| !o.phases.is_empty())
}

fn kind_of(kind: &str) -> Result<Option<ServerKind>, Status> {
    if kind.is_empty() {
        return Ok(None);
    }
    match kind.parse::<ServerKind>() {
        Ok(k) if k.holds_data() => Ok(Some(k)),
        _ => Err(Status::invalid_argument(format!(
            "--kind must be account or storage, not {:?}",
            kind.chars().take(32).collect::<String>()
        ))),
    }
}

type TopologyStream = Pin<Box<dyn Stream<Item = Result<Topology, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorApi {
    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        Ok(Response::new(self.engine.heartbeat(request.into_inner()).await?))
    }

    async fn get_status(
        &self,
        _request: Request<GetClusterStatusRequest>,
    ) -> Result<Response<ClusterStatus>, Status> {
        Ok(Response::new(status(&self.engine)))
    }

    async fn get_topology(
        &self,
        _request: Request<GetTopologyRequest>,
    ) -> Result<Response<Topology>, Status> {
        Ok(Response::new(self.engine.topology()))
    }

    type WatchTopologyStream = TopologyStream;

    async fn watch_topology(
        &self,
        _request: Request<GetTopologyRequest>,
    ) -> Result<Response<TopologyStream>, Status> {
        let stream = tokio_stream::wrappers::WatchStream::new(self.engine.watch_topology());
        let stream = futures::StreamExt::map(stream, Ok);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn failover(&self, request: Request<FailoverRequest>) -> Result<Response<Operation>, Status> {
        let req = request.into_inner();
        let command = Command::Failover {
            site: req.site,
            kind: kind_of(&req.kind)?,
            force: req.force,
        };
        Ok(Response::new(self.engine.command(command, OPERATOR).await?))
    }

    async fn switchover(&self, request: Request<SwitchoverRequest>) -> Result<Response<Operation>, Status> {
        let command = Command::Switchover {
            site: request.into_inner().site,
        };
        Ok(Response::new(self.engine.command(command, OPERATOR).await?))
    }

    async fn failback(&self, request: Request<FailbackRequest>) -> Result<Response<Operation>, Status> {
        let command = Command::Failback {
            verify: request.into_inner().verify,
        };
        Ok(Response::new(self.engine.command(command, OPERATOR).await?))
    }

    async fn resync(&self, request: Request<ResyncRequest>) -> Result<Response<Operation>, Status> {
        let command = Command::Resync {
            rate: request.into_inner().rate,
        };
        Ok(Response::new(self.engine.command(command, OPERATOR).await?))
    }

    async fn cancel(&self, _request: Request<CancelRequest>) -> Result<Response<Operation>, Status> {
        Ok(Response::new(
            self.engine.command(Command::Cancel, OPERATOR).await?,
        ))
    }

    async fn remove_server(
        &self,
        request: Request<RemoveServerRequest>,
    ) -> Result<Response<RemoveServerResponse>, Status> {
        let name = request.into_inner().name;
        duplex_types::validate_name(duplex_types::NameKind::Server, &name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.engine
            .command(Command::RemoveServer { name }, OPERATOR)
            .await?;
        Ok(Response::new(RemoveServerResponse {}))
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let id = request.into_inner().id;
        if id.is_empty() {
            return status(&self.engine)
                .operation
                .map(Response::new)
                .ok_or_else(|| Status::not_found("no operation has run yet"));
        }
        let id: u64 = id.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "operation id {:?} is not a number",
                id.chars().take(32).collect::<String>()
            ))
        })?;
        durably(|| self.engine.store.operation(id))?
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no operation {id}")))
    }

    async fn history(&self, _request: Request<HistoryRequest>) -> Result<Response<HistoryResponse>, Status> {
        let events = durably(|| self.engine.store.operations())?;
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
        let expires = self.engine.clock.wall_ms() + ttl.as_millis() as i64;
        let hash = blake3::hash(token.as_bytes()).to_hex().to_string();
        durably(|| self.engine.store.add_token(&hash, expires))?;
        tracing::info!(ttl = ?ttl, "enrollment token issued");
        Ok(Response::new(EnrollmentToken {
            token,
            expires_unix_ms: expires,
        }))
    }
}

/// `/metrics`: heartbeat age, role, epoch and lag per server; the running
/// phase; operations by kind and outcome.
pub fn metrics(engine: Engine) -> duplex_rpc::metrics::MetricsFn {
    Arc::new(move || {
        let engine = engine.clone();
        Box::pin(async move {
            let mut e = duplex_rpc::metrics::Exposition::default();
            let status = status(&engine);
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
            let now = engine.clock.wall_ms();
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
            let ops = durably(|| engine.store.operations()).unwrap_or_default();
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
