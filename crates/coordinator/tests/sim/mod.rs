//! The simulated platform and the schedule runner (see `simulation.rs`).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use duplex_coordinator::clock::Clock;
use duplex_coordinator::config::Config;
use duplex_coordinator::decide::roles;
use duplex_coordinator::engine::{self, Command, Engine};
use duplex_coordinator::servers::{Call, Reply, Servers};
use duplex_coordinator::store::Store;
use duplex_proto::v1 as pb;
use duplex_types::{Mode, Role, ServerKind};
use futures::future::BoxFuture;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Seeds run from here up.
pub const BASE_SEED: u64 = 0x5EED_0000;
const WRITE_EVERY: Duration = Duration::from_millis(100);
const CHECK_EVERY: Duration = Duration::from_millis(50);
const FAULT_SPAN: Duration = Duration::from_secs(40);
const SETTLE: Duration = Duration::from_secs(60);
/// Reported lag is up to a heartbeat old and writes come every 100 ms.
const LAG_TOLERANCE: Duration = Duration::from_millis(1500);

#[derive(Clone, Debug)]
struct Node {
    name: String,
    site: String,
    kind: ServerKind,
    id: String,
    addr: String,
    alive: bool,
    stopped: bool,
    /// Cut off from the coordinator (both ways); replication still flows.
    cut: bool,
    role: Role,
    epoch: u64,
    lease_until: Option<Instant>,
    /// Account servers: entries of the account log held. Storage: entries
    /// of each origin's feed held.
    have: BTreeMap<String, usize>,
    /// Replication into this server stops until then (a lagging standby).
    paused_until: Option<Instant>,
    /// Removed by an operator: its certificate is revoked, so the
    /// coordinator's guard refuses its heartbeats from then on (the guard
    /// sits in front of the engine the simulation drives directly).
    revoked: bool,
}

impl Node {
    fn runs(&self) -> bool {
        self.alive && !self.stopped
    }

    fn writable(&self, now: Instant) -> bool {
        self.runs() && self.role.is_holder() && self.lease_until.is_some_and(|u| u > now)
    }
}

const ACCOUNT_LOG: &str = "accounts";

#[derive(Default)]
struct World {
    nodes: BTreeMap<String, Node>,
    /// Write times of each log: the account log, and each storage
    /// origin's feed.
    logs: BTreeMap<String, Vec<Instant>>,
    homes: BTreeMap<u64, String>,
    groups: BTreeMap<String, bool>,
    violations: Vec<String>,
    /// Forced operations have run: losses are accepted.
    forced: bool,
    max_lag: Duration,
    trace: Vec<String>,
    /// Pushed calls are lost this often: a demotion may never arrive, and
    /// only leases keep the old holder from writing.
    drop_calls: f64,
    rng: Option<StdRng>,
}

impl World {
    fn by_addr(&mut self, addr: &str) -> Option<&mut Node> {
        self.nodes.values_mut().find(|n| n.addr == addr)
    }

    fn violation(&mut self, now: Instant, what: String) {
        self.violations.push(format!("t={:?}: {what}", now));
    }
}

struct SimServers {
    world: Arc<Mutex<World>>,
}

fn lock(world: &Arc<Mutex<World>>) -> std::sync::MutexGuard<'_, World> {
    world.lock().unwrap_or_else(|e| e.into_inner())
}

impl Servers for SimServers {
    fn call(&self, call: Call) -> BoxFuture<'static, Result<Reply, String>> {
        let world = self.world.clone();
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let result = apply_call(&mut lock(&world), &call);
            if result.is_err() {
                // An unreachable server answers with a timeout.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            result
        })
    }
}

fn reachable<'a>(world: &'a mut World, addr: &str) -> Result<&'a mut Node, String> {
    match world.by_addr(addr) {
        Some(n) if n.runs() && !n.cut => Ok(n),
        _ => Err(format!("{addr} is unreachable")),
    }
}

fn converge(node: &mut Node, role: Role, epoch: u64) {
    if epoch >= node.epoch {
        if node.role != role {
            node.lease_until = None;
        }
        node.role = role;
        node.epoch = epoch;
    }
}

fn apply_call(world: &mut World, call: &Call) -> Result<Reply, String> {
    let drop = world.drop_calls;
    if call.best_effort() && world.rng.as_mut().is_some_and(|r| r.gen_bool(drop)) {
        return Err("lost on the way".into());
    }
    match call {
        Call::PromoteAccount { addr, epoch } => converge(reachable(world, addr)?, Role::Master, *epoch),
        Call::DemoteAccount { addr, epoch, .. } => converge(reachable(world, addr)?, Role::Slave, *epoch),
        Call::SetStorageRole {
            addr, role, epoch, ..
        } => converge(reachable(world, addr)?, *role, *epoch),
        Call::SetLinks { addr, .. } => {
            reachable(world, addr)?;
        }
        Call::RegisterStorage { master, .. } => {
            master_of(world, master)?;
        }
        Call::MoveHomes { master, request } => {
            master_of(world, master)?;
            stranded(world, &request.from, &request.to);
            for home in world.homes.values_mut() {
                if *home == request.from {
                    home.clone_from(&request.to);
                }
            }
        }
        Call::EnabledGroupsOf { master, homes } => {
            master_of(world, master)?;
            let groups = world
                .groups
                .iter()
                .filter(|(_, on)| **on)
                .map(|(g, _)| g.clone())
                .filter(|_| world.homes.values().any(|h| homes.contains(h)))
                .collect();
            return Ok(Reply::Groups(groups));
        }
        Call::SetGroup {
            master,
            group,
            enabled,
        } => {
            master_of(world, master)?;
            world.groups.insert(group.clone(), *enabled);
        }
        Call::VerifyHomes { master, .. } => {
            master_of(world, master)?;
            return Ok(Reply::Verified(Ok("integrity check: simulated".into())));
        }
    }
    Ok(Reply::Done)
}

/// Accounts moving from `from` to `to` leave behind the writes `to` never
/// received from `from`: a loss, allowed only within max_lag_on_failover
/// unless forced.
fn stranded(world: &mut World, from: &str, to: &str) {
    let now = Instant::now();
    let have = world
        .nodes
        .get(to)
        .and_then(|n| n.have.get(from).copied())
        .unwrap_or(0);
    let Some(writes) = world.logs.get(from) else {
        return;
    };
    if have >= writes.len() {
        return;
    }
    let span = writes[writes.len() - 1].saturating_duration_since(writes[have]);
    let lost = writes.len() - have;
    world
        .trace
        .push(format!("homes {from} -> {to} leave {lost} writes over {span:?}"));
    if span > world.max_lag + LAG_TOLERANCE && !world.forced {
        world.violation(now, format!("homes moved from {from} to {to}, which lacks {lost} writes spanning {span:?}, without --force"));
    }
}

/// Account writes need a master that holds its lease.
fn master_of(world: &mut World, addr: &str) -> Result<(), String> {
    let now = Instant::now();
    let node = reachable(world, addr)?;
    if node.role == Role::Master && node.writable(now) {
        Ok(())
    } else {
        Err(format!("{addr} is not a master with a lease"))
    }
}

/// The heartbeat a node would send now.
fn report(world: &World, node: &Node, now: Instant) -> pb::HeartbeatRequest {
    let mut request = pb::HeartbeatRequest {
        server: Some(pb::ServerInfo {
            id: node.id.clone(),
            name: node.name.clone(),
            site: node.site.clone(),
            kind: node.kind.as_str().to_owned(),
            addr: node.addr.clone(),
            public_addr: String::new(),
        }),
        role: node.role.as_str().to_owned(),
        epoch: node.epoch,
        fenced: node.role.is_holder() && !node.writable(now),
        ..Default::default()
    };
    match node.kind {
        ServerKind::Account => {
            let have = node.have.get(ACCOUNT_LOG).copied().unwrap_or(0);
            request.position = have as u64;
            if node.role == Role::Slave {
                request.lag = Some(lag(world, ACCOUNT_LOG, have, now));
            }
        }
        ServerKind::Storage if node.role == Role::Primary => {
            for d in world
                .nodes
                .values()
                .filter(|d| d.kind == ServerKind::Storage && d.site != node.site)
            {
                let have = d.have.get(&node.name).copied().unwrap_or(0);
                request.outbound.push(pb::OutboundLag {
                    destination_id: d.id.clone(),
                    lag: Some(lag(world, &node.name, have, now)),
                });
            }
            request.position = world.logs.get(&node.name).map_or(0, Vec::len) as u64;
        }
        _ => {}
    }
    request
}

fn lag(world: &World, log: &str, have: usize, now: Instant) -> pb::Lag {
    let writes = world.logs.get(log).map_or(&[][..], Vec::as_slice);
    let records = writes.len().saturating_sub(have);
    let seconds = writes
        .get(have)
        .map_or(0.0, |t| now.saturating_duration_since(*t).as_secs_f64());
    pb::Lag {
        records: records as u64,
        bytes: records as u64 * 1000,
        seconds,
    }
}

type Current = Arc<Mutex<Option<Engine>>>;

async fn heartbeats(world: Arc<Mutex<World>>, current: Current, name: String, offset: Duration) {
    // Servers are not in step with each other: each has its own phase.
    tokio::time::sleep(offset).await;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = Instant::now();
        let request = {
            let w = lock(&world);
            let Some(node) = w.nodes.get(&name) else { return };
            if !node.runs() || node.cut || node.revoked {
                continue;
            }
            report(&w, node, now)
        };
        let Some(engine) = current.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            continue;
        };
        let Ok(response) = engine.heartbeat(request).await else {
            continue;
        };
        let mut w = lock(&world);
        let Some(node) = w.nodes.get_mut(&name) else {
            return;
        };
        if !node.runs() || node.cut {
            continue;
        }
        if let Some(a) = response.assignment
            && let Ok(role) = a.role.parse::<Role>()
        {
            converge(node, role, a.epoch);
        }
        node.lease_until = (response.lease_ms > 0 && node.role.is_holder())
            .then(|| now + Duration::from_millis(response.lease_ms));
    }
}

/// Writes on whoever may take them, replication into whoever can receive.
fn world_step(world: &mut World, now: Instant, links: &[(String, pb::LinkSpec)]) {
    let names: Vec<String> = world.nodes.keys().cloned().collect();
    for name in &names {
        let node = world.nodes[name].clone();
        if !node.writable(now) {
            continue;
        }
        let log = if node.kind == ServerKind::Account {
            ACCOUNT_LOG.to_owned()
        } else {
            name.clone()
        };
        let have = node.have.get(&log).copied().unwrap_or(0);
        let writes = world.logs.entry(log.clone()).or_default();
        if have < writes.len() {
            // Writes this new holder never received are gone for good.
            let lost = writes.len() - have;
            let span = writes[writes.len() - 1].saturating_duration_since(writes[have]);
            writes.truncate(have);
            let forced = world.forced;
            let max = world.max_lag;
            world
                .trace
                .push(format!("{name} lost {lost} writes over {span:?}"));
            if span > max + LAG_TOLERANCE && !forced {
                world.violation(
                    now,
                    format!("{name} took over missing {lost} writes spanning {span:?} without --force"),
                );
            }
        }
        let writes = world.logs.entry(log.clone()).or_default();
        writes.push(now);
        let len = writes.len();
        if let Some(n) = world.nodes.get_mut(name) {
            n.have.insert(log, len);
        }
    }
    replicate(world, now, links);
}

/// Slaves follow the master; storage servers receive what the mirror
/// links the coordinator assigned carry, while that link's mirror runs.
fn replicate(world: &mut World, now: Instant, links: &[(String, pb::LinkSpec)]) {
    let snapshot = world.nodes.clone();
    let runs = |name: &str| snapshot.get(name).is_some_and(Node::runs);
    let by_addr = |addr: &str| snapshot.values().find(|n| n.addr == addr).map(|n| n.name.clone());
    let account_len = world.logs.get(ACCOUNT_LOG).map_or(0, Vec::len);
    let master_up = snapshot
        .values()
        .any(|m| m.kind == ServerKind::Account && m.role == Role::Master && m.runs());
    let mut feeds: Vec<(String, String)> = Vec::new();
    for (mirror, link) in links {
        if let (Some(source), Some(destination)) = (by_addr(&link.source), by_addr(&link.destination))
            && runs(mirror)
            && runs(&source)
        {
            feeds.push((source, destination));
        }
    }
    for node in world.nodes.values_mut() {
        if !node.runs() || node.paused_until.is_some_and(|u| u > now) {
            continue;
        }
        if node.kind == ServerKind::Account && !node.role.is_holder() && master_up {
            node.have.insert(ACCOUNT_LOG.into(), account_len);
        }
        for (source, _) in feeds.iter().filter(|(_, d)| *d == node.name) {
            let len = world.logs.get(source).map_or(0, Vec::len);
            node.have.insert(source.clone(), len);
        }
    }
}

fn check(world: &mut World, engine: Option<&Engine>, mode: Mode, last_epoch: &mut u64, now: Instant) {
    let writable: Vec<(String, ServerKind, String)> = world
        .nodes
        .values()
        .filter(|n| n.writable(now))
        .map(|n| (n.name.clone(), n.kind, n.site.clone()))
        .collect();
    let masters: Vec<&String> = writable
        .iter()
        .filter(|w| w.1 == ServerKind::Account)
        .map(|w| &w.0)
        .collect();
    if masters.len() > 1 {
        world.violation(now, format!("two masters take writes: {masters:?}"));
    }
    let primaries: Vec<&(String, ServerKind, String)> =
        writable.iter().filter(|w| w.1 == ServerKind::Storage).collect();
    let clash = match mode {
        Mode::ActivePassive => primaries.len() > 1,
        Mode::ActiveActive => primaries
            .iter()
            .any(|a| primaries.iter().any(|b| a.0 != b.0 && a.2 == b.2)),
    };
    if clash {
        let names: Vec<&String> = primaries.iter().map(|p| &p.0).collect();
        world.violation(now, format!("primaries clash: {names:?}"));
    }
    let Some(engine) = engine else { return };
    let desired = engine.desired();
    if desired.epoch < *last_epoch {
        world.violation(
            now,
            format!("epoch went back from {last_epoch} to {}", desired.epoch),
        );
    }
    *last_epoch = desired.epoch;
    for held in &desired.held {
        if desired.role(held).is_some_and(Role::is_holder) {
            world.violation(
                now,
                format!("held server {held} is assigned {:?}", desired.role(held)),
            );
        }
    }
    if let Some(op) = desired.running() {
        let started = op.phases.last().map_or(op.started_ms, |p| p.started_ms);
        let stuck_for = engine.clock.wall_ms() - started;
        if stuck_for > 3_000 && op.waiting.is_empty() {
            world.violation(
                now,
                format!(
                    "{} in {:?} for {stuck_for} ms without saying what it waits for",
                    op.kind,
                    op.current()
                ),
            );
        }
        if op.forced {
            world.forced = true;
        }
    }
}

fn platform(mode: Mode) -> World {
    let mut world = World::default();
    for (name, kind, role) in [
        ("account-a", ServerKind::Account, Role::Master),
        ("account-b", ServerKind::Account, Role::Slave),
        ("storage-a", ServerKind::Storage, Role::Primary),
        (
            "storage-b",
            ServerKind::Storage,
            if mode == Mode::ActiveActive {
                Role::Primary
            } else {
                Role::Replica
            },
        ),
        ("mirror-a", ServerKind::Mirror, Role::Running),
        ("mirror-b", ServerKind::Mirror, Role::Running),
    ] {
        world.nodes.insert(
            name.into(),
            Node {
                name: name.into(),
                site: name[name.len() - 1..].into(),
                kind,
                id: format!("id-{name}"),
                addr: format!("http://{name}"),
                alive: true,
                stopped: false,
                cut: false,
                role,
                epoch: 0,
                lease_until: None,
                have: BTreeMap::new(),
                paused_until: None,
                revoked: false,
            },
        );
    }
    world.homes = (1..=4)
        .map(|i| {
            (
                i,
                if i % 2 == 0 && mode == Mode::ActiveActive {
                    "storage-b"
                } else {
                    "storage-a"
                }
                .to_owned(),
            )
        })
        .collect();
    world.groups.insert("default".into(), true);
    world
}

fn config(mode: Mode) -> Config {
    let mut c = Config::new(mode);
    c.max_lag_on_failover = Duration::from_secs(5);
    c.rejoin_timeout = Duration::from_secs(120);
    c.phase_timeout = Duration::from_secs(20);
    c
}

fn start_engine(
    store: &Arc<Store>,
    servers: &Arc<SimServers>,
    mode: Mode,
    clock: Clock,
) -> (Engine, CancellationToken) {
    let stop = CancellationToken::new();
    let info = pb::ServerInfo {
        id: "coordinator".into(),
        name: "coordinator".into(),
        site: "w".into(),
        kind: "coordinator".into(),
        addr: "http://coordinator".into(),
        public_addr: String::new(),
    };
    let engine = engine::start(
        config(mode),
        info,
        store.clone(),
        servers.clone(),
        clock,
        stop.clone(),
    )
    .unwrap_or_else(|e| panic!("engine starts: {e}"));
    (engine, stop)
}

#[derive(Debug)]
enum Fault {
    Kill(String),
    KillSite(String),
    Stop(String),
    Cut(String),
    Lag(String, Duration),
    /// A standby falls behind, then its holder's site is lost.
    LaggingThenLost(ServerKind, Duration),
    RestartCoordinator(Duration),
    Operator(&'static str, String),
    Heal,
}

fn random_fault(rng: &mut StdRng, names: &[String]) -> Fault {
    let name = names[rng.gen_range(0..names.len())].clone();
    let site = if rng.gen_bool(0.5) { "a" } else { "b" }.to_owned();
    match rng.gen_range(0..100) {
        0..=17 => Fault::Kill(name),
        18..=29 => Fault::KillSite(site),
        30..=39 => Fault::Stop(name),
        40..=51 => Fault::Cut(name),
        52..=56 => Fault::Lag(name, Duration::from_secs(rng.gen_range(2..30))),
        57..=61 => Fault::LaggingThenLost(
            if rng.gen_bool(0.5) {
                ServerKind::Account
            } else {
                ServerKind::Storage
            },
            Duration::from_secs(rng.gen_range(3..12)),
        ),
        62..=71 => Fault::RestartCoordinator(Duration::from_millis(rng.gen_range(0..3000))),
        72..=91 => {
            let ops = [
                "failover",
                "failover-account",
                "failover-storage",
                "failover-force",
                "failback",
                "cancel",
                "resync",
                "switchover",
                "remove",
            ];
            Fault::Operator(ops[rng.gen_range(0..ops.len())], site)
        }
        _ => Fault::Heal,
    }
}

fn heal(world: &mut World) {
    for n in world.nodes.values_mut() {
        n.alive = true;
        n.stopped = false;
        n.cut = false;
        n.paused_until = None;
    }
}

async fn operator(
    engine: &Engine,
    what: &str,
    site: String,
    world: &Arc<Mutex<World>>,
) -> Result<(), String> {
    let command = match what {
        "failover" => Command::Failover {
            site,
            kind: None,
            force: false,
        },
        "failover-account" => Command::Failover {
            site,
            kind: Some(ServerKind::Account),
            force: false,
        },
        "failover-storage" => Command::Failover {
            site,
            kind: Some(ServerKind::Storage),
            force: false,
        },
        "failover-force" => Command::Failover {
            site,
            kind: None,
            force: true,
        },
        "failback" => Command::Failback { verify: true },
        "cancel" => Command::Cancel,
        "resync" => Command::Resync { rate: 0 },
        "switchover" => Command::Switchover { site },
        _ => {
            // Remove a server that is down and holds no role, if any.
            let desired = engine.desired();
            let observed = engine.observed();
            let now = Instant::now();
            let Some(name) = desired
                .servers
                .keys()
                .find(|n| {
                    !observed.healthy(n, now, Duration::from_millis(1500))
                        && !desired.role(n).is_some_and(Role::is_holder)
                })
                .cloned()
            else {
                return Ok(());
            };
            Command::RemoveServer { name: name.clone() }
        }
    };
    let removing = match &command {
        Command::RemoveServer { name } => Some(name.clone()),
        _ => None,
    };
    if matches!(command, Command::Failover { force: true, .. }) {
        lock(world).forced = true;
    }
    match engine.command(command, "sim").await {
        Ok(_) => {
            if let Some(name) = removing
                && let Some(node) = lock(world).nodes.get_mut(&name)
            {
                node.revoked = true;
            }
            Ok(())
        }
        Err(s) if s.code() == tonic::Code::Internal => {
            Err(format!("operator {what}: internal error: {}", s.message()))
        }
        Err(_) => Ok(()),
    }
}

pub async fn run_schedule(seed: u64) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mode = if rng.gen_bool(0.5) {
        Mode::ActivePassive
    } else {
        Mode::ActiveActive
    };
    let world = Arc::new(Mutex::new(platform(mode)));
    {
        let mut w = lock(&world);
        w.max_lag = config(mode).max_lag_on_failover;
        w.drop_calls = rng.gen_range(0.0..0.9);
        w.rng = Some(StdRng::seed_from_u64(rng.r#gen()));
    }
    let store = Arc::new(Store::in_memory().map_err(|e| e.to_string())?);
    let servers = Arc::new(SimServers { world: world.clone() });
    let clock = Clock::starting_at(1_700_000_000_000);
    let (engine, mut stop) = start_engine(&store, &servers, mode, clock);
    let current: Current = Arc::new(Mutex::new(Some(engine)));
    let names: Vec<String> = lock(&world).nodes.keys().cloned().collect();
    let mut drivers = Vec::new();
    for name in &names {
        let offset = Duration::from_millis(rng.gen_range(0..250));
        drivers.push(tokio::spawn(heartbeats(
            world.clone(),
            current.clone(),
            name.clone(),
            offset,
        )));
    }
    // Faults at random moments within the span, then everything heals.
    let mut faults: Vec<(Duration, Fault)> = (0..rng.gen_range(2..8))
        .map(|_| {
            (
                Duration::from_millis(rng.gen_range(3_000..FAULT_SPAN.as_millis() as u64)),
                random_fault(&mut rng, &names),
            )
        })
        .collect();
    faults.sort_by_key(|(t, _)| *t);
    let begin = Instant::now();
    let mut end = begin + FAULT_SPAN + SETTLE;
    let mut last_epoch = 0;
    let mut next_write = begin;
    let mut restart_at: Option<Instant> = None;
    let mut healed = false;
    // The links the mirrors run: the coordinator's, as last heard.
    let mut links = Vec::new();
    while Instant::now() < end {
        tokio::time::sleep(CHECK_EVERY).await;
        let now = Instant::now();
        if let Some(at) = restart_at.filter(|at| *at <= now) {
            let (engine, s) = start_engine(&store, &servers, mode, clock);
            stop = s;
            *current.lock().unwrap_or_else(|e| e.into_inner()) = Some(engine);
            restart_at = None;
            lock(&world).trace.push(format!("{at:?} coordinator back"));
        }
        while faults.first().is_some_and(|(t, _)| begin + *t <= now) {
            let (_, fault) = faults.remove(0);
            lock(&world).trace.push(format!("{:?} {fault:?}", now - begin));
            let engine = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let mut w = lock(&world);
            match fault {
                Fault::Kill(n) => {
                    if let Some(n) = w.nodes.get_mut(&n) {
                        n.alive = false;
                        n.lease_until = None;
                    }
                }
                Fault::KillSite(site) => {
                    for n in w.nodes.values_mut().filter(|n| n.site == site) {
                        n.alive = false;
                        n.lease_until = None;
                    }
                }
                Fault::Stop(n) => {
                    if let Some(n) = w.nodes.get_mut(&n) {
                        n.stopped = true;
                    }
                }
                Fault::Cut(n) => {
                    if let Some(n) = w.nodes.get_mut(&n) {
                        n.cut = true;
                    }
                }
                Fault::Lag(n, d) => {
                    if let Some(n) = w.nodes.get_mut(&n) {
                        n.paused_until = Some(now + d);
                    }
                }
                Fault::LaggingThenLost(kind, behind) => {
                    let holder = w
                        .nodes
                        .values()
                        .find(|n| n.kind == kind && n.role.is_holder() && n.site == "a")
                        .map(|n| n.name.clone());
                    for n in w.nodes.values_mut().filter(|n| n.kind == kind && n.site != "a") {
                        n.paused_until = Some(now + behind + Duration::from_secs(20));
                    }
                    if let Some(h) = holder {
                        faults.push((now - begin + behind, Fault::Kill(h)));
                        faults.sort_by_key(|(t, _)| *t);
                    }
                }
                Fault::RestartCoordinator(down) => {
                    stop.cancel();
                    *current.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    restart_at = Some(now + down);
                }
                Fault::Operator(what, site) => {
                    drop(w);
                    if let Some(engine) = engine {
                        operator(&engine, what, site, &world).await?;
                    }
                    continue;
                }
                Fault::Heal => heal(&mut w),
            }
        }
        // Everything heals once the last fault (follow-ups included) is in.
        if !healed && now >= begin + FAULT_SPAN && faults.is_empty() && restart_at.is_none() {
            heal(&mut lock(&world));
            lock(&world).trace.push(format!("{:?} healed", now - begin));
            healed = true;
            end = now + SETTLE;
        }
        let engine = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(engine) = &engine {
            links = roles::links(&engine.desired());
        }
        if now >= next_write {
            world_step(&mut lock(&world), now, &links);
            next_write = now + WRITE_EVERY;
        }
        let mut w = lock(&world);
        check(&mut w, engine.as_ref(), mode, &mut last_epoch, now);
        if !w.violations.is_empty() {
            break;
        }
    }
    let engine = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut w = lock(&world);
    if w.violations.is_empty()
        && let Some(engine) = engine
    {
        let now = Instant::now();
        if let Some(op) = engine.desired().running()
            && op.waiting.is_empty()
        {
            w.violation(
                now,
                format!(
                    "after every fault healed, the {} is still running in {:?} with no reason",
                    op.kind,
                    op.current()
                ),
            );
        }
        if engine.desired().running().is_none() {
            let masters = w
                .nodes
                .values()
                .filter(|n| n.kind == ServerKind::Account && n.writable(now))
                .count();
            let primaries = w
                .nodes
                .values()
                .filter(|n| n.kind == ServerKind::Storage && n.writable(now))
                .count();
            if masters != 1 || primaries == 0 {
                let roles: Vec<String> = w
                    .nodes
                    .values()
                    .map(|n| format!("{}={}@{}", n.name, n.role, n.epoch))
                    .collect();
                w.violation(
                    now,
                    format!("after every fault healed: {masters} writable masters, {primaries} writable primaries ({roles:?}; desired {:?}; refused: {:?})", engine.desired().roles, history_tail(&engine, 6)),
                );
            }
        }
    }
    if std::env::var("DUPLEX_SIM_VERBOSE").is_ok() {
        println!("{mode}\n  {}", w.trace.join("\n  "));
        if let Some(engine) = current.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            for line in history_tail(&engine, 40) {
                println!("  history: {line}");
            }
        }
    }
    stop.cancel();
    for d in drivers {
        d.abort();
    }
    if w.violations.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{mode} {}\n  schedule:\n    {}",
            w.violations.join("\n  "),
            w.trace.join("\n    ")
        ))
    }
}

fn history_tail(engine: &Engine, n: usize) -> Vec<String> {
    engine
        .store
        .operations()
        .unwrap_or_default()
        .iter()
        .rev()
        .take(n)
        .map(|o| format!("{} {} {} {}", o.kind, o.state, o.detail, o.error))
        .collect()
}

pub fn run_seed(seed: u64) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(run_schedule(seed))
}

/// Runs `schedules` seeds from `base` on up to four threads; returns the
/// failures (at most three per thread) and how long it took.
pub fn run_many(base: u64, schedules: u64) -> (Vec<String>, std::time::Duration) {
    let started = std::time::Instant::now();
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).min(4) as u64;
    let failures = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                scope.spawn(move || {
                    (0..schedules)
                        .filter(|i| i % workers == w)
                        .filter_map(|i| {
                            run_seed(base + i)
                                .err()
                                .map(|e| format!("seed {}: {e}", base + i))
                        })
                        .take(3)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    (failures, started.elapsed())
}
