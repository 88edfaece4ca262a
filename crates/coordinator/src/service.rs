//! The Coordinator gRPC service: thin handlers that turn requests into engine commands.

use std::pin::Pin;
use std::sync::Arc;

use duplex_proto::v1 as pb;
use duplex_proto::v1::coordinator_server::Coordinator;
use duplex_proto::v1::{
    CancelRequest, ClusterStatus, CreateOperatorRequest, CreatedOperator, EnrollRequest, EnrollmentToken,
    FailbackRequest, FailoverRequest, GetClusterStatusRequest, GetOperationRequest, GetTopologyRequest,
    HeartbeatRequest, HeartbeatResponse, HistoryRequest, HistoryResponse, IssueEnrollmentTokenRequest,
    IssuedCertificate, ListOperatorsRequest, ListOperatorsResponse, Operation, OperatorInfo,
    RemoveServerRequest, RemoveServerResponse, RenewCertificateRequest, ResyncRequest, RevokeOperatorRequest,
    RevokeOperatorResponse, ServerState, SwitchoverRequest, Topology,
};
use duplex_rpc::auth::{Caller, caller};
use duplex_types::{Role, ServerKind, shown};
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::decide::roles;
use crate::engine::{Command, Engine, durably, shown_role};
use crate::leadership::Term;
use crate::security::Security;

pub struct CoordinatorApi {
    /// This coordinator's engine while it leads, else where the leader is.
    pub term: tokio::sync::watch::Receiver<Term>,
    pub store: Arc<crate::store::Store>,
    pub security: Arc<Security>,
    /// Set when several coordinators share their state in etcd.
    pub etcd: Option<duplex_etcd::Etcd>,
}

impl CoordinatorApi {
    /// The engine, if this coordinator leads; else a status that names
    /// the leader (in the `duplex-leader` metadata too).
    fn engine(&self) -> Result<Engine, Status> {
        self.term.borrow().engine()
    }

    /// The cluster status with every coordinator in it, as leader,
    /// follower or down.
    async fn status_with_coordinators(&self, engine: &Engine) -> Result<ClusterStatus, Status> {
        let mut out = status(engine);
        let Some(etcd) = &self.etcd else {
            return Ok(out);
        };
        let members = crate::leadership::members(etcd)
            .await
            .map_err(|e| Status::unavailable(format!("cannot list the coordinators: {e}")))?;
        if let Some(me) = out.servers.first_mut() {
            me.role = crate::leadership::Seen::Leader.as_str().to_owned();
        }
        let others = members
            .into_iter()
            .filter(|(m, _)| m.name != engine.info.name)
            .map(|(m, seen)| ServerState {
                server: Some(pb::ServerInfo {
                    name: m.name,
                    site: m.site,
                    kind: ServerKind::Coordinator.as_str().to_owned(),
                    addr: m.addr,
                    ..Default::default()
                }),
                role: seen.as_str().to_owned(),
                healthy: seen != crate::leadership::Seen::Down,
                ..Default::default()
            });
        let at = 1.min(out.servers.len());
        out.servers.splice(at..at, others);
        Ok(out)
    }

    /// Runs an operator command, attributed to its caller, and records the
    /// action in history.
    async fn operate(&self, caller: &Caller, command: Command, what: String) -> Result<Operation, Status> {
        let engine = self.engine()?;
        let op = engine.command(command, &caller.name()).await?;
        engine.audit(caller, what);
        Ok(op)
    }

    /// Records the operator actions a heartbeat carried; the highest
    /// sequence number the server may now drop (0: none).
    async fn reported(&self, server: &str, kind: &str, stream: u64, records: Vec<pb::AuditRecord>) -> u64 {
        // The heartbeat was accepted, so its kind parsed and its sender is
        // the server it names.
        let Ok(kind) = kind.parse::<ServerKind>() else {
            return 0;
        };
        let accepted = crate::audit::accept(kind, records);
        for why in &accepted.refused {
            tracing::warn!(%server, %kind, reason = %why, "reported operator actions ignored");
        }
        if accepted.records.is_empty() {
            return accepted.considered;
        }
        let Ok(engine) = self.engine() else {
            return 0;
        };
        match engine.audit_reported(server, stream, accepted.records).await {
            Ok(()) => accepted.considered,
            // Not recorded: the server keeps them and sends them again.
            Err(_) => 0,
        }
    }

    /// A heartbeat is accepted only from the server its certificate names.
    fn check_sender(&self, caller: &Caller, request: &HeartbeatRequest) -> Result<(), Status> {
        if self.security.gate.insecure() {
            return Ok(());
        }
        let sent = request.server.as_ref();
        let matches = caller.server().is_some_and(|id| {
            sent.is_some_and(|s| s.name == id.name && s.site == id.site && s.kind == id.kind.as_str())
        });
        if matches {
            return Ok(());
        }
        let claimed = sent.map_or_else(String::new, |s| {
            format!("{} {} (site {})", shown(&s.kind), shown(&s.name), shown(&s.site))
        });
        Err(Status::permission_denied(format!(
            "a heartbeat for {claimed} must come from that server's own certificate, not from {}",
            caller.describe()
        )))
    }
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
            duplex_types::shown(kind)
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
        let caller = caller(&request);
        let mut request = request.into_inner();
        self.check_sender(&caller, &request)?;
        let version = request.security_version;
        let audit = std::mem::take(&mut request.audit);
        let stream = request.audit_stream;
        let sender = request.server.as_ref().map(|s| (s.name.clone(), s.kind.clone()));
        let mut response = self.engine()?.heartbeat(request).await?;
        response.security = self.security.state_for(version);
        if let (Some((name, kind)), false) = (sender, audit.is_empty()) {
            response.audit_acknowledged = self.reported(&name, &kind, stream, audit).await;
        }
        Ok(Response::new(response))
    }

    async fn get_status(
        &self,
        _request: Request<GetClusterStatusRequest>,
    ) -> Result<Response<ClusterStatus>, Status> {
        Ok(Response::new(
            self.status_with_coordinators(&self.engine()?).await?,
        ))
    }

    async fn get_topology(
        &self,
        _request: Request<GetTopologyRequest>,
    ) -> Result<Response<Topology>, Status> {
        Ok(Response::new(self.engine()?.topology()))
    }

    type WatchTopologyStream = TopologyStream;

    async fn watch_topology(
        &self,
        _request: Request<GetTopologyRequest>,
    ) -> Result<Response<TopologyStream>, Status> {
        let stream = tokio_stream::wrappers::WatchStream::new(self.engine()?.watch_topology());
        let stream = futures::StreamExt::map(stream, Ok);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn failover(&self, request: Request<FailoverRequest>) -> Result<Response<Operation>, Status> {
        let caller = caller(&request);
        let req = request.into_inner();
        let what = format!(
            "asked for a{} failover{}{}",
            if req.force { " forced" } else { "" },
            if req.site.is_empty() {
                String::new()
            } else {
                format!(" of site {}", shown(&req.site))
            },
            if req.kind.is_empty() {
                String::new()
            } else {
                format!(" ({} roles only)", shown(&req.kind))
            },
        );
        let command = Command::Failover {
            site: req.site,
            kind: kind_of(&req.kind)?,
            force: req.force,
        };
        Ok(Response::new(self.operate(&caller, command, what).await?))
    }

    async fn switchover(&self, request: Request<SwitchoverRequest>) -> Result<Response<Operation>, Status> {
        let caller = caller(&request);
        let command = Command::Switchover {
            site: request.into_inner().site,
        };
        Ok(Response::new(
            self.operate(&caller, command, "asked for a switchover".into())
                .await?,
        ))
    }

    async fn failback(&self, request: Request<FailbackRequest>) -> Result<Response<Operation>, Status> {
        let caller = caller(&request);
        let command = Command::Failback {
            verify: request.into_inner().verify,
        };
        Ok(Response::new(
            self.operate(&caller, command, "asked for a failback".into())
                .await?,
        ))
    }

    async fn resync(&self, request: Request<ResyncRequest>) -> Result<Response<Operation>, Status> {
        let caller = caller(&request);
        let rate = request.into_inner().rate;
        let what = if rate == 0 {
            "asked for a resync".to_owned()
        } else {
            format!("asked for a resync at {rate} bytes/s")
        };
        Ok(Response::new(
            self.operate(&caller, Command::Resync { rate }, what).await?,
        ))
    }

    async fn cancel(&self, request: Request<CancelRequest>) -> Result<Response<Operation>, Status> {
        let caller = caller(&request);
        Ok(Response::new(
            self.operate(&caller, Command::Cancel, "cancelled the running operation".into())
                .await?,
        ))
    }

    async fn remove_server(
        &self,
        request: Request<RemoveServerRequest>,
    ) -> Result<Response<RemoveServerResponse>, Status> {
        let caller = caller(&request);
        let name = request.into_inner().name;
        duplex_types::validate_name(duplex_types::NameKind::Server, &name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let what = format!("removed server {name} and revoked its certificates");
        self.operate(&caller, Command::RemoveServer { name }, what)
            .await?;
        // The removal revoked the certificates in the same transaction;
        // servers hear of it with their next heartbeat answer.
        self.security.refresh()?;
        Ok(Response::new(RemoveServerResponse {}))
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let id = request.into_inner().id;
        if id.is_empty() {
            return status(&self.engine()?)
                .operation
                .map(Response::new)
                .ok_or_else(|| Status::not_found("no operation has run yet"));
        }
        let id: u64 = id.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "operation id {:?} is not a number",
                duplex_types::shown(&id)
            ))
        })?;
        durably(|| self.store.operation(id))?
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no operation {id}")))
    }

    async fn history(&self, _request: Request<HistoryRequest>) -> Result<Response<HistoryResponse>, Status> {
        let events = durably(|| self.store.operations())?;
        Ok(Response::new(HistoryResponse { events }))
    }

    async fn issue_enrollment_token(
        &self,
        request: Request<IssueEnrollmentTokenRequest>,
    ) -> Result<Response<EnrollmentToken>, Status> {
        let caller = caller(&request);
        let engine = self.engine()?;
        let (token, grant) = self.security.issue_token(request.get_ref())?;
        engine.audit(
            &caller,
            format!(
                "issued an enrollment token for {} {} on site {}",
                grant.kind, grant.name, grant.site
            ),
        );
        Ok(Response::new(EnrollmentToken {
            token,
            expires_unix_ms: grant.expires_unix_ms,
        }))
    }

    async fn enroll(&self, request: Request<EnrollRequest>) -> Result<Response<IssuedCertificate>, Status> {
        let from = caller(&request).addr;
        // Certificates are issued by the leader only, so its history and
        // the serials it records stay in one place.
        self.engine()?;
        let (issued, grant) = self.security.enroll(request.get_ref()).inspect_err(|status| {
            tracing::warn!(%from, reason = status.message(), "enrollment refused");
        })?;
        tracing::info!(server = %grant.name, kind = %grant.kind, site = %grant.site, serial = %issued.serial, %from, "server enrolled");
        Ok(Response::new(issued))
    }

    async fn renew_certificate(
        &self,
        request: Request<RenewCertificateRequest>,
    ) -> Result<Response<IssuedCertificate>, Status> {
        let caller = caller(&request);
        let identity = caller
            .server()
            .ok_or_else(|| Status::unauthenticated("renewal needs the server's current certificate"))?;
        self.engine()?;
        let issued = self.security.renew(identity, &request.get_ref().csr_pem)?;
        tracing::info!(server = %identity.name, serial = %issued.serial, "certificate renewed");
        Ok(Response::new(issued))
    }

    async fn create_operator(
        &self,
        request: Request<CreateOperatorRequest>,
    ) -> Result<Response<CreatedOperator>, Status> {
        let caller = caller(&request);
        let req = request.into_inner();
        let role: duplex_types::OperatorRole = req
            .role
            .parse()
            .map_err(|e: duplex_types::InvalidInput| Status::invalid_argument(e.to_string()))?;
        let engine = self.engine()?;
        let token = self.security.create_operator(&req.name, role)?;
        engine.audit(&caller, format!("created operator {} with role {role}", req.name));
        Ok(Response::new(CreatedOperator {
            name: req.name,
            role: role.as_str().to_owned(),
            token,
        }))
    }

    async fn list_operators(
        &self,
        _request: Request<ListOperatorsRequest>,
    ) -> Result<Response<ListOperatorsResponse>, Status> {
        let operators = self
            .security
            .operators()?
            .into_iter()
            .map(|o| OperatorInfo {
                name: o.name,
                role: o.role.as_str().to_owned(),
                created_unix_ms: o.created_unix_ms,
            })
            .collect();
        Ok(Response::new(ListOperatorsResponse { operators }))
    }

    async fn revoke_operator(
        &self,
        request: Request<RevokeOperatorRequest>,
    ) -> Result<Response<RevokeOperatorResponse>, Status> {
        let caller = caller(&request);
        let name = request.into_inner().name;
        let engine = self.engine()?;
        self.security.revoke_operator(&name)?;
        engine.audit(&caller, format!("revoked operator {name}"));
        Ok(Response::new(RevokeOperatorResponse {}))
    }
}

/// `/metrics`: heartbeat age, role, epoch and lag per server; the running
/// phase; operations by kind and outcome.
pub fn metrics(term: tokio::sync::watch::Receiver<Term>) -> duplex_rpc::metrics::MetricsFn {
    Arc::new(move || {
        let leading = match &*term.borrow() {
            Term::Leading(engine) => Some(engine.clone()),
            Term::Following(_) => None,
        };
        Box::pin(async move {
            let mut e = duplex_rpc::metrics::Exposition::default();
            e.gauge(
                "duplex_coordinator_leader",
                "1 while this coordinator leads (the only one that runs operations).",
                &[],
                f64::from(u8::from(leading.is_some())),
            );
            // A follower's view of the cluster would be stale: the leader
            // exports it.
            let Some(engine) = leading else {
                return e;
            };
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
                let info = s.server.clone().unwrap_or_default();
                let name = info.name.as_str();
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
                    "1 while heartbeats arrive; assigned_role tells a holder (primary, master) from a standby.",
                    &[
                        ("server", name),
                        ("kind", info.kind.as_str()),
                        ("site", info.site.as_str()),
                        ("assigned_role", s.assigned_role.as_str()),
                    ],
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
            // Unreadable history leaves the counters out of this scrape:
            // exported as 0 they would read as a reset.
            if let Ok(ops) = durably(|| engine.store.operations()) {
                operation_metrics(&mut e, &ops);
            }
            e
        })
    })
}

/// Operations as counters that only grow: started and finished by kind
/// (every outcome exported from zero, so the first refusal is an increase
/// a rule can see), the running ones as a gauge, and one-off events.
fn operation_metrics(e: &mut duplex_rpc::metrics::Exposition, ops: &[pb::Operation]) {
    use duplex_types::{OperationKind as K, OperationState as S};
    const OPERATIONS: [K; 4] = [K::Failover, K::Switchover, K::Failback, K::Resync];
    const OUTCOMES: [S; 4] = [S::Done, S::Failed, S::Cancelled, S::Refused];
    // One pass over the history, however long it grows.
    let mut tally: std::collections::BTreeMap<(&str, &str), u64> = Default::default();
    for op in ops {
        *tally.entry((op.kind.as_str(), op.state.as_str())).or_default() += 1;
    }
    let count = |kind: &str, state: Option<&str>| -> f64 {
        tally
            .iter()
            .filter(|((k, s), _)| *k == kind && state.is_none_or(|want| want == *s))
            .map(|(_, n)| n)
            .sum::<u64>() as f64
    };
    for kind in OPERATIONS {
        let k = kind.as_str();
        e.counter(
            "duplex_operations_started_total",
            "Failovers, switchovers, failbacks and resyncs started.",
            &[("kind", k)],
            count(k, None),
        );
        e.gauge(
            "duplex_operations_running",
            "Operations running now.",
            &[("kind", k)],
            count(k, Some(S::Running.as_str())),
        );
        for state in OUTCOMES {
            // A refused failover is recorded as an event of its own kind.
            let n = match (kind, state) {
                (K::Failover, S::Refused) => count(K::FailoverRefused.as_str(), None),
                _ => count(k, Some(state.as_str())),
            };
            e.counter(
                "duplex_operations_finished_total",
                "Operations finished, by kind and outcome (done, failed, cancelled, refused).",
                &[("kind", k), ("state", state.as_str())],
                n,
            );
        }
    }
    for kind in K::ALL
        .iter()
        .filter(|k| !OPERATIONS.contains(k) && **k != K::FailoverRefused)
    {
        e.counter(
            "duplex_events_total",
            "One-off events recorded in the history, by kind.",
            &[("kind", kind.as_str())],
            count(kind.as_str(), None),
        );
    }
}
