//! Heartbeats in, cluster status out. Observed state (who reported what,
//! when) lives in memory; the registry of servers is durable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use duplex_proto::v1::coordinator_server::Coordinator;
use duplex_proto::v1::{
    ClusterStatus, GetClusterStatusRequest, HeartbeatRequest, HeartbeatResponse, Lag, ServerInfo, ServerState,
};
use duplex_types::{NameKind, validate_name};
use tonic::{Request, Response, Status};

use crate::registry::Registry;

/// The latest heartbeat from one server.
#[derive(Clone)]
struct Observed {
    report: HeartbeatRequest,
    at: Instant,
    wall_ms: i64,
}

pub struct CoordinatorApi {
    pub info: ServerInfo,
    pub mode: String,
    /// A server silent for this long is down.
    pub failover_timeout: Duration,
    pub heartbeat_interval: Duration,
    registry: Arc<Registry>,
    observed: Mutex<HashMap<String, Observed>>,
}

impl CoordinatorApi {
    pub fn new(info: ServerInfo, mode: String, failover_timeout: Duration, registry: Arc<Registry>) -> Self {
        Self {
            info,
            mode,
            failover_timeout,
            heartbeat_interval: duplex_rpc::heartbeat::DEFAULT_INTERVAL,
            registry,
            observed: Mutex::new(HashMap::new()),
        }
    }

    fn status(&self) -> Result<ClusterStatus, Status> {
        let registered = self
            .registry
            .servers()
            .map_err(|e| Status::internal(e.to_string()))?;
        let observed = self
            .observed
            .lock()
            .map_err(|_| Status::internal("state poisoned"))?
            .clone();
        let now = Instant::now();
        let mut servers = vec![ServerState {
            server: Some(self.info.clone()),
            role: "running".into(),
            healthy: true,
            epoch: 0,
            lag: None,
            last_heartbeat_unix_ms: wall_ms(),
        }];
        for server in registered {
            let seen = observed.get(&server.name);
            let healthy = seen.is_some_and(|o| now.duration_since(o.at) < self.failover_timeout);
            let lag = seen
                .and_then(|o| o.report.lag)
                .or_else(|| inbound_lag(&observed, &server.id));
            servers.push(ServerState {
                role: match (healthy, seen) {
                    (true, Some(o)) => o.report.role.clone(),
                    _ => "down".into(),
                },
                healthy,
                epoch: seen.map_or(0, |o| o.report.epoch),
                lag,
                last_heartbeat_unix_ms: seen.map_or(0, |o| o.wall_ms),
                server: Some(server),
            });
        }
        let epoch = servers.iter().map(|s| s.epoch).max().unwrap_or(0);
        Ok(ClusterStatus {
            mode: self.mode.clone(),
            epoch,
            phase: "steady".into(),
            servers,
        })
    }
}

/// A replica's lag, as its primary reports its outbound link to it.
fn inbound_lag(observed: &HashMap<String, Observed>, id: &str) -> Option<Lag> {
    observed
        .values()
        .flat_map(|o| o.report.outbound.iter())
        .filter(|out| out.destination_id == id)
        .filter_map(|out| out.lag)
        .max_by_key(|l| l.records)
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn check(report: &HeartbeatRequest) -> Result<&ServerInfo, Status> {
    let server = report
        .server
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("heartbeat names no server"))?;
    validate_name(NameKind::Server, &server.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if !matches!(server.kind.as_str(), "account" | "storage" | "mirror") {
        return Err(Status::invalid_argument(format!(
            "kind must be account, storage or mirror, not {:?}",
            server.kind
        )));
    }
    if server.id.is_empty() || !server.addr.starts_with("http") {
        return Err(Status::invalid_argument(
            "a heartbeat needs the server's id and http(s) address",
        ));
    }
    Ok(server)
}

#[tonic::async_trait]
impl Coordinator for CoordinatorApi {
    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let report = request.into_inner();
        let server = check(&report)?.clone();
        let registry = self.registry.clone();
        tokio::task::spawn_blocking(move || registry.put(&server))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))?;
        let name = report.server.as_ref().map(|s| s.name.clone()).unwrap_or_default();
        if let Ok(mut observed) = self.observed.lock() {
            let was_down = observed
                .get(&name)
                .is_none_or(|o| o.at.elapsed() >= self.failover_timeout);
            if was_down {
                tracing::info!(server = %name, role = %report.role, "server is up");
            }
            observed.insert(
                name,
                Observed {
                    report,
                    at: Instant::now(),
                    wall_ms: wall_ms(),
                },
            );
        }
        Ok(Response::new(HeartbeatResponse {
            epoch: 0,
            interval_ms: self.heartbeat_interval.as_millis() as u64,
        }))
    }

    async fn get_status(
        &self,
        _request: Request<GetClusterStatusRequest>,
    ) -> Result<Response<ClusterStatus>, Status> {
        Ok(Response::new(self.status()?))
    }
}
