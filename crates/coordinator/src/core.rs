//! The coordinator's state and the rules every heartbeat runs through:
//! who may join, which role each server is assigned, who holds a write
//! lease, which mirroring links run, and the topology clients follow.
//!
//! Roles live in `ClusterState`, persisted before any server is told.
//! Observed state (the latest heartbeat of each server) lives in memory
//! and is rebuilt within one heartbeat interval after a restart.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use duplex_proto::v1::{
    Assignment, ClusterState, HeartbeatRequest, HeartbeatResponse, LinkSpec, Operation, ServerInfo, Topology,
    TopologyServer,
};
use duplex_types::{NameKind, validate_name};
use tokio::sync::{Mutex, MutexGuard, Notify, watch};
use tonic::Status;

use crate::store::{Enrollment, Store};

/// Settings of the failure detector and the leases.
#[derive(Clone, Debug)]
pub struct Config {
    pub mode: String,
    /// A server silent this long is down; a lost master / primary is
    /// failed over after it.
    pub failover_timeout: Duration,
    /// How long a write lease lasts. Never longer than the timeout, so a
    /// lost holder's lease has lapsed by the time it is declared lost.
    pub lease: Duration,
    pub heartbeat_interval: Duration,
    /// No automatic failover when the lost primary's mirror lag was larger.
    pub max_lag_on_failover: Duration,
    pub auto_failover: bool,
    pub webhook: Option<String>,
}

/// Extra time allowed for clock-rate differences between machines.
pub const LEASE_MARGIN: Duration = Duration::from_millis(100);

/// The latest heartbeat from one server.
#[derive(Clone)]
pub struct Observed {
    pub report: HeartbeatRequest,
    pub at: Instant,
    pub wall_ms: i64,
    /// When this server was last granted a write lease.
    pub granted_at: Option<Instant>,
    /// Whether the answer to this heartbeat granted a lease.
    pub leased: bool,
}

pub struct Inner {
    pub cluster: ClusterState,
    pub servers: BTreeMap<String, ServerInfo>,
    pub observed: HashMap<String, Observed>,
    /// The running operation, or the last one.
    pub operation: Option<Operation>,
    credentials: HashMap<String, String>,
}

pub struct Core {
    pub config: Config,
    pub info: ServerInfo,
    pub store: Arc<Store>,
    pub started: Instant,
    inner: Mutex<Inner>,
    topology: watch::Sender<Topology>,
    /// Wakes the operation runner.
    pub wake: Notify,
}

pub fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn hash(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

pub fn random_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs a store call on the current thread, letting the runtime move other
/// tasks away meanwhile (store calls commit with fsync).
pub fn durably<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

impl Core {
    pub fn open(config: Config, info: ServerInfo, store: Arc<Store>) -> Result<Arc<Self>, Status> {
        let mut cluster = store.cluster()?;
        // The mode is part of the platform's durable state: a restart with
        // another --mode would reassign roles under running servers.
        if cluster.mode.is_empty() {
            cluster.mode.clone_from(&config.mode);
            store.save_cluster(&cluster)?;
        } else if cluster.mode != config.mode {
            return Err(Status::failed_precondition(format!(
                "this coordinator's data dir was set up for --mode {}, not {}; start it with --mode {} \
                 (changing the mode of a running platform is not supported)",
                cluster.mode, config.mode, cluster.mode
            )));
        }
        let servers = store
            .servers()?
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        // Resume the running operation, even when events were recorded after it.
        let mut operations = store.operations()?;
        let running = operations.iter().rposition(|op| op.state == "running");
        let operation = match running {
            Some(i) => Some(operations.swap_remove(i)),
            None => operations.pop(),
        };
        let (topology, _) = watch::channel(Topology::default());
        let core = Arc::new(Self {
            config,
            info,
            store,
            started: Instant::now(),
            inner: Mutex::new(Inner {
                cluster,
                servers,
                observed: HashMap::new(),
                operation,
                credentials: HashMap::new(),
            }),
            topology,
            wake: Notify::new(),
        });
        Ok(core)
    }

    pub async fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().await
    }

    pub fn healthy(&self, inner: &Inner, name: &str) -> bool {
        inner
            .observed
            .get(name)
            .is_some_and(|o| o.at.elapsed() < self.config.failover_timeout)
    }

    /// One heartbeat: authenticate, register, adopt a role for a newcomer,
    /// answer with the assignment and (for a converged holder) a lease.
    pub async fn heartbeat(&self, report: HeartbeatRequest) -> Result<HeartbeatResponse, Status> {
        let server = check(&report)?.clone();
        let mut inner = self.lock().await;
        let credential = self.authenticate(&mut inner, &report)?;
        if inner.servers.get(&server.name) != Some(&server) {
            durably(|| self.store.put_server(&server))?;
            tracing::info!(server = %server.name, kind = %server.kind, addr = %server.addr, "server registered");
            inner.servers.insert(server.name.clone(), server.clone());
        }
        self.adopt(&mut inner, &report)?;
        let was_down = !self.healthy(&inner, &server.name);
        if was_down {
            tracing::info!(server = %server.name, role = %report.role, "server is up");
        }
        let mut events = transitions(inner.observed.get(&server.name).map(|o| &o.report), &report);
        let mut assignment = assignment(&inner, &server);
        if let Some(a) = assignment.as_mut().filter(|a| a.role == "master") {
            // A master with no slave up must not wait for one on each write.
            a.unmirrored = !inner
                .servers
                .values()
                .any(|s| s.kind == "account" && s.name != server.name && self.healthy(&inner, &s.name));
        }
        let lease = self.lease_for(&inner, &server.name, &report);
        // A holder that restarts reports itself fenced until this answer
        // grants its lease: only a fence that lasts is news.
        events.retain(|(kind, _)| *kind != "fenced" || !lease);
        let observed = Observed {
            report,
            at: Instant::now(),
            wall_ms: wall_ms(),
            granted_at: if lease {
                Some(Instant::now())
            } else {
                inner.observed.get(&server.name).and_then(|o| o.granted_at)
            },
            leased: lease,
        };
        inner.observed.insert(server.name.clone(), observed);
        let epoch = inner.cluster.epoch;
        drop(inner);
        if was_down {
            self.wake.notify_one();
        }
        for (kind, detail) in events {
            crate::ops::record(self, kind, "reported", detail).await?;
        }
        Ok(HeartbeatResponse {
            epoch,
            interval_ms: self.config.heartbeat_interval.as_millis() as u64,
            lease_ms: if lease {
                self.config.lease.as_millis() as u64
            } else {
                0
            },
            assignment,
            credential: credential.unwrap_or_default(),
        })
    }

    /// Checks the server's credential, or spends its enrollment token and
    /// returns the credential it must present from now on.
    fn authenticate(&self, inner: &mut Inner, report: &HeartbeatRequest) -> Result<Option<String>, Status> {
        let name = report.server.as_ref().map(|s| s.name.clone()).unwrap_or_default();
        if !report.credential.is_empty() {
            if !inner.credentials.contains_key(&name)
                && let Some(stored) = durably(|| self.store.credential(&name))?
            {
                inner.credentials.insert(name.clone(), stored);
            }
            if inner.credentials.get(&name) == Some(&hash(&report.credential)) {
                return Ok(None);
            }
            return Err(Status::permission_denied(format!(
                "server {name:?} presented a credential this coordinator did not issue; \
                 remove its coordinator-credential file and enroll it again with a new token"
            )));
        }
        if report.enrollment_token.is_empty() {
            return Err(Status::permission_denied(format!(
                "server {name:?} is not enrolled: start it with --enrollment-token \
                 (issue one with `duplexctl servers token`)"
            )));
        }
        let credential = random_secret();
        let outcome = durably(|| {
            self.store.enroll(
                &name,
                &hash(&report.enrollment_token),
                &hash(&credential),
                wall_ms(),
            )
        })?;
        match outcome {
            Enrollment::Enrolled => {
                tracing::info!(server = %name, "server enrolled");
                inner.credentials.insert(name, hash(&credential));
                Ok(Some(credential))
            }
            Enrollment::Expired => Err(Status::permission_denied(format!(
                "the enrollment token of server {name:?} has expired; issue a new one with `duplexctl servers token`"
            ))),
            Enrollment::UnknownToken => Err(Status::permission_denied(format!(
                "the enrollment token of server {name:?} is unknown or already spent; \
                 issue a new one with `duplexctl servers token`"
            ))),
        }
    }

    /// A newcomer keeps the role it reports unless that would make a
    /// second master (or a second primary for the same accounts).
    fn adopt(&self, inner: &mut Inner, report: &HeartbeatRequest) -> Result<(), Status> {
        let Some(server) = report.server.as_ref() else {
            return Ok(());
        };
        let mut cluster = inner.cluster.clone();
        cluster.epoch = cluster.epoch.max(report.epoch);
        if server.kind != "mirror" && !cluster.roles.contains_key(&server.name) {
            let role = adopted_role(inner, &cluster, server, &report.role, &self.config.mode);
            tracing::info!(server = %server.name, %role, "role adopted");
            cluster.roles.insert(server.name.clone(), role.clone());
            cluster.preferred.insert(server.name.clone(), role);
        }
        if cluster != inner.cluster {
            durably(|| self.store.save_cluster(&cluster))?;
            inner.cluster = cluster;
        }
        Ok(())
    }

    /// A master / primary gets a lease only once it reports the role it was
    /// assigned, and never once a running operation has started fencing it.
    fn lease_for(&self, inner: &Inner, name: &str, report: &HeartbeatRequest) -> bool {
        let assigned = inner.cluster.roles.get(name).map(String::as_str);
        let holder = matches!(assigned, Some("master" | "primary"));
        let fenced = inner
            .operation
            .as_ref()
            .filter(|op| op.state == "running")
            .and_then(|op| op.plan.as_ref())
            .is_some_and(|plan| plan.fence_until_unix_ms != 0 && plan.fenced.iter().any(|f| f == name));
        holder && assigned == Some(report.role.as_str()) && !fenced
    }

    /// Saves a new cluster state, then makes it current.
    pub fn save_cluster(&self, inner: &mut Inner, cluster: ClusterState) -> Result<(), Status> {
        durably(|| self.store.save_cluster(&cluster))?;
        inner.cluster = cluster;
        Ok(())
    }

    /// Saves an operation, then makes it current.
    pub fn save_operation(&self, inner: &mut Inner, op: Operation) -> Result<(), Status> {
        durably(|| self.store.save_operation(&op))?;
        inner.operation = Some(op);
        Ok(())
    }

    /// The phase shown in `duplexctl status`.
    pub fn phase(inner: &Inner) -> String {
        match inner.operation.as_ref().filter(|op| op.state == "running") {
            Some(op) => {
                let phase = op
                    .phases
                    .last()
                    .map_or("starting", |p| p.name.as_str())
                    .to_owned();
                format!("{}:{phase}", op.kind)
            }
            None => "steady".into(),
        }
    }

    /// The role a server shows: as reported, "fenced", or "down".
    pub fn shown_role(&self, inner: &Inner, name: &str) -> String {
        match inner.observed.get(name) {
            Some(o) if self.healthy(inner, name) && o.report.fenced => "fenced".into(),
            Some(o) if self.healthy(inner, name) => o.report.role.clone(),
            _ => "down".into(),
        }
    }

    pub fn topology_of(&self, inner: &Inner) -> Topology {
        let mut servers = vec![TopologyServer {
            server: Some(self.info.clone()),
            role: "running".into(),
            healthy: true,
        }];
        servers.extend(inner.servers.values().map(|s| TopologyServer {
            server: Some(s.clone()),
            role: self.shown_role(inner, &s.name),
            healthy: self.healthy(inner, &s.name),
        }));
        Topology {
            version: 0,
            epoch: inner.cluster.epoch,
            mode: self.config.mode.clone(),
            phase: Self::phase(inner),
            servers,
            links: links(&inner.cluster, &inner.servers)
                .into_iter()
                .map(|(_, l)| l)
                .collect(),
            moved_homes: inner.cluster.moved_homes.clone(),
        }
    }

    /// Publishes the topology to watchers if anything in it changed.
    pub async fn publish(&self) {
        let inner = self.lock().await;
        let mut next = self.topology_of(&inner);
        drop(inner);
        self.topology.send_if_modified(|current| {
            next.version = current.version;
            if *current == next {
                return false;
            }
            next.version = current.version + 1;
            *current = next;
            true
        });
    }

    pub fn watch_topology(&self) -> watch::Receiver<Topology> {
        self.topology.subscribe()
    }
}

/// Events worth a history entry and a notification: a server that starts
/// reporting itself fenced, or its sync replication degraded to async.
fn transitions(before: Option<&HeartbeatRequest>, now: &HeartbeatRequest) -> Vec<(&'static str, String)> {
    let name = now.server.as_ref().map_or("", |s| s.name.as_str());
    let mut events = Vec::new();
    if now.fenced && !before.is_some_and(|b| b.fenced) {
        events.push((
            "fenced",
            format!(
                "{name} ({}) is fenced: its lease lapsed, so it refuses writes (it lost the coordinator, \
                 or its role moved)",
                now.role
            ),
        ));
    }
    if now.degraded && !before.is_some_and(|b| b.degraded) {
        events.push((
            "degraded",
            format!("{name}: sync replication degraded to async; writes are acknowledged before they are on the other site"),
        ));
    }
    events
}

fn adopted_role(
    inner: &Inner,
    cluster: &ClusterState,
    server: &ServerInfo,
    reported: &str,
    mode: &str,
) -> String {
    let holders = |kind: &str, role: &str| -> Vec<&ServerInfo> {
        cluster
            .roles
            .iter()
            .filter(|(_, r)| r.as_str() == role)
            .filter_map(|(n, _)| inner.servers.get(n))
            .filter(|s| s.kind == kind)
            .collect()
    };
    match (server.kind.as_str(), reported) {
        ("account", "master") if !holders("account", "master").is_empty() => "slave".into(),
        ("account", "master") => "master".into(),
        ("account", _) => "slave".into(),
        ("storage", "primary") => {
            let taken = holders("storage", "primary")
                .iter()
                .any(|p| mode == "active-passive" || p.site == server.site);
            if taken { "replica" } else { "primary" }.into()
        }
        _ => "replica".into(),
    }
}

/// What a server must be: its role at the cluster epoch, whom it follows,
/// and for a mirror the links it runs.
fn assignment(inner: &Inner, server: &ServerInfo) -> Option<Assignment> {
    let epoch = inner.cluster.epoch;
    if server.kind == "mirror" {
        let links = links(&inner.cluster, &inner.servers)
            .into_iter()
            .filter(|(m, _)| *m == server.name)
            .map(|(_, l)| l)
            .collect();
        return Some(Assignment {
            role: "running".into(),
            epoch,
            leader: String::new(),
            links,
            unmirrored: false,
        });
    }
    let role = inner.cluster.roles.get(&server.name)?.clone();
    let leader_role = match role.as_str() {
        "slave" => "master",
        "replica" => "primary",
        _ => "",
    };
    let leader = inner
        .cluster
        .roles
        .iter()
        .filter(|(_, r)| !leader_role.is_empty() && r.as_str() == leader_role)
        .filter_map(|(n, _)| inner.servers.get(n))
        .find(|s| s.kind == server.kind && (s.kind == "account" || s.site != server.site))
        .map(|s| s.addr.clone())
        .unwrap_or_default();
    let unmirrored = role == "primary"
        && !links(&inner.cluster, &inner.servers)
            .iter()
            .any(|(_, l)| l.source == server.addr);
    Some(Assignment {
        role,
        epoch,
        leader,
        links: Vec::new(),
        unmirrored,
    })
}

/// The mirroring links the roles call for, each with the mirror that runs
/// it (the one on the destination's site): every primary to every storage
/// server on another site, except servers held until a resync.
pub fn links(cluster: &ClusterState, servers: &BTreeMap<String, ServerInfo>) -> Vec<(String, LinkSpec)> {
    let storage: Vec<&ServerInfo> = servers.values().filter(|s| s.kind == "storage").collect();
    let mirrors: Vec<&ServerInfo> = servers.values().filter(|s| s.kind == "mirror").collect();
    let mut out = Vec::new();
    for p in storage
        .iter()
        .filter(|s| cluster.roles.get(&s.name).map(String::as_str) == Some("primary"))
    {
        for d in storage.iter().filter(|d| d.site != p.site) {
            if cluster.held.contains(&d.name) {
                continue;
            }
            let Some(mirror) = mirrors
                .iter()
                .find(|m| m.site == d.site)
                .or_else(|| mirrors.first())
            else {
                continue;
            };
            out.push((
                mirror.name.clone(),
                LinkSpec {
                    source: p.addr.clone(),
                    destination: d.addr.clone(),
                    rate: cluster.rate,
                },
            ));
        }
    }
    out
}

fn check(report: &HeartbeatRequest) -> Result<&ServerInfo, Status> {
    let server = report
        .server
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("heartbeat names no server"))?;
    validate_name(NameKind::Server, &server.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
    validate_name(NameKind::Site, &server.site).map_err(|e| Status::invalid_argument(e.to_string()))?;
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
    let roles: &[&str] = match server.kind.as_str() {
        "account" => &["master", "slave"],
        "storage" => &["primary", "replica"],
        _ => &["running"],
    };
    if !roles.contains(&report.role.as_str()) {
        return Err(Status::invalid_argument(format!(
            "a {} server reports role {:?}; expected one of {roles:?}",
            server.kind, report.role
        )));
    }
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(name: &str, kind: &str, site: &str) -> ServerInfo {
        ServerInfo {
            id: format!("id-{name}"),
            name: name.into(),
            site: site.into(),
            kind: kind.into(),
            addr: format!("http://{name}"),
            public_addr: String::new(),
        }
    }

    fn platform() -> BTreeMap<String, ServerInfo> {
        [
            server("storage-a", "storage", "a"),
            server("storage-b", "storage", "b"),
            server("mirror-a", "mirror", "a"),
            server("mirror-b", "mirror", "b"),
        ]
        .into_iter()
        .map(|s| (s.name.clone(), s))
        .collect()
    }

    fn cluster(roles: &[(&str, &str)], held: &[&str]) -> ClusterState {
        ClusterState {
            roles: roles.iter().map(|(n, r)| ((*n).into(), (*r).into())).collect(),
            held: held.iter().map(|h| (*h).into()).collect(),
            ..Default::default()
        }
    }

    fn named(links: Vec<(String, LinkSpec)>) -> Vec<(String, String, String)> {
        links
            .into_iter()
            .map(|(m, l)| (m, l.source, l.destination))
            .collect()
    }

    #[test]
    fn a_primary_is_mirrored_by_the_destination_sites_mirror() {
        let c = cluster(&[("storage-a", "primary"), ("storage-b", "replica")], &[]);
        assert_eq!(
            named(links(&c, &platform())),
            [(
                "mirror-b".into(),
                "http://storage-a".into(),
                "http://storage-b".into()
            )]
        );
    }

    #[test]
    fn active_active_mirrors_both_ways_and_a_held_server_gets_nothing() {
        let c = cluster(&[("storage-a", "primary"), ("storage-b", "primary")], &[]);
        assert_eq!(links(&c, &platform()).len(), 2);
        let c = cluster(
            &[("storage-a", "replica"), ("storage-b", "primary")],
            &["storage-a"],
        );
        assert!(links(&c, &platform()).is_empty());
    }

    #[test]
    fn a_newcomer_never_becomes_a_second_master_or_primary() {
        let mut servers = platform();
        servers.insert("account-a".into(), server("account-a", "account", "a"));
        let inner = Inner {
            cluster: cluster(&[("account-a", "master"), ("storage-a", "primary")], &[]),
            servers,
            observed: HashMap::new(),
            operation: None,
            credentials: HashMap::new(),
        };
        let c = inner.cluster.clone();
        let b = server("account-b", "account", "b");
        assert_eq!(adopted_role(&inner, &c, &b, "master", "active-passive"), "slave");
        let sb = server("storage-b", "storage", "b");
        assert_eq!(
            adopted_role(&inner, &c, &sb, "primary", "active-passive"),
            "replica"
        );
        assert_eq!(
            adopted_role(&inner, &c, &sb, "primary", "active-active"),
            "primary"
        );
        let sa2 = server("storage-a2", "storage", "a");
        assert_eq!(
            adopted_role(&inner, &c, &sa2, "primary", "active-active"),
            "replica"
        );
    }
}
