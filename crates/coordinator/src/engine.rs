//! The engine: one owner task holds the desired state, applies every
//! change to it, persists the change (one redb transaction, fsynced) and
//! only then publishes it. Heartbeats, the gRPC handlers and the
//! simulation never touch the desired state: they read the last published
//! copy, and send the owner messages for anything that changes it.
//!
//! Each tick the owner asks the pure rules in `decide` what to do: start,
//! fold or refuse a failover, and the running operation's next step. Calls
//! to servers run as tasks that report back over the owner's channel, so
//! nothing the owner does waits on a server.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use duplex_proto::v1 as pb;
use duplex_types::{OperationKind, OperationState, Phase, Role, ServerKind};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::clock::Clock;
use crate::config::Config;
use crate::decide::detect::{self, Detection};
use crate::decide::phase::{self, Answered, Change, FENCING, Step};
use crate::decide::{View, plan, roles};
use crate::model::{Desired, Member, Op, PhaseRun, Plan};
use crate::observed::Observed;
use crate::servers::{Call, Reply, Servers};
use crate::store::{Commit, Store, StoreError};

/// Who history says started an automatic operation.
const AUTOMATIC: &str = "coordinator";
const TICK: Duration = Duration::from_millis(50);
/// How often each standby's lag is recorded in the store. What a later
/// coordinator reads from it is aged by the time since, so this bounds how
/// much older than needed its estimate can be.
const RECORD_LAG_EVERY: Duration = Duration::from_secs(5);
/// A failed call that a phase needs is made again after this pause.
const RETRY_AFTER: Duration = Duration::from_millis(200);
/// Steps one tick may take before it yields (each persists a change).
const STEPS_PER_TICK: usize = 16;

/// What an operator asks for.
#[derive(Clone, Debug)]
pub enum Command {
    Failover {
        site: String,
        kind: Option<ServerKind>,
        force: bool,
    },
    Switchover {
        site: String,
    },
    Failback {
        verify: bool,
    },
    Resync {
        rate: u64,
    },
    Cancel,
    RemoveServer {
        name: String,
    },
}

enum Msg {
    Join {
        report: Box<crate::model::Report>,
        reply: oneshot::Sender<Result<(), Status>>,
    },
    Command {
        command: Command,
        by: String,
        reply: oneshot::Sender<Result<pb::Operation, Status>>,
    },
    Event {
        kind: OperationKind,
        detail: String,
    },
    Audit {
        detail: String,
        caller: duplex_rpc::auth::Caller,
    },
    Reported {
        server: String,
        stream: u64,
        records: Vec<crate::audit::Reported>,
        reply: oneshot::Sender<Result<(), Status>>,
    },
    Answer {
        op: u64,
        phase: usize,
        call: Box<Call>,
        result: Result<Reply, String>,
    },
    GroupEnabled {
        group: String,
        result: Result<Reply, String>,
    },
    Wake,
}

/// What every part of the coordinator shares; the owner task is the only
/// writer of the desired state.
pub struct Shared {
    pub config: Config,
    pub clock: Clock,
    pub info: pb::ServerInfo,
    pub store: Arc<Store>,
    pub servers: Arc<dyn Servers>,
    pub started: Instant,
    desired: watch::Sender<Arc<Desired>>,
    /// Held only briefly and never across I/O. A heartbeat reads the
    /// published desired state and records its lease grant under this
    /// lock, so once the owner has published a fence and then taken this
    /// lock, every grant made under the old state is visible to it.
    pub(crate) observed: Mutex<Observed>,
    topology: watch::Sender<pb::Topology>,
    tx: mpsc::UnboundedSender<Msg>,
}

pub type Engine = Arc<Shared>;

/// Runs a store call, letting a multi-threaded runtime move other tasks
/// away meanwhile (store calls commit with fsync).
pub fn durably<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn internal(e: StoreError) -> Status {
    Status::internal(e.to_string())
}

/// Loads the state, checks the mode, and starts the owner task.
pub fn start(
    config: Config,
    info: pb::ServerInfo,
    store: Arc<Store>,
    servers: Arc<dyn Servers>,
    clock: Clock,
    stop: CancellationToken,
) -> Result<Engine, Status> {
    let loaded = durably(|| store.load()).map_err(internal)?;
    if !loaded.cluster.mode.is_empty() && loaded.cluster.mode != config.mode.as_str() {
        // The mode is part of the platform's durable state: a restart with
        // another --mode would reassign roles under running servers.
        return Err(Status::failed_precondition(format!(
            "this coordinator's data dir was set up for --mode {}, not {}; start it with --mode {} \
             (changing the mode of a running platform is not supported)",
            loaded.cluster.mode, config.mode, loaded.cluster.mode
        )));
    }
    let mut desired = Desired::from_stored(
        &loaded.cluster,
        &loaded.servers,
        loaded.operation.as_ref(),
        config.mode,
    )
    .map_err(|e| Status::internal(format!("the coordinator's stored state does not decode: {e}")))?;
    // Only a running operation is current; a finished one is history.
    if desired.running().is_none() {
        desired.operation = None;
    }
    let first_start = loaded.cluster.mode.is_empty();
    let (tx, rx) = mpsc::unbounded_channel();
    let (topology, _) = watch::channel(pb::Topology::default());
    let (desired_tx, _) = watch::channel(Arc::new(desired.clone()));
    let shared = Arc::new(Shared {
        config,
        clock,
        info,
        store,
        servers,
        started: clock.now(),
        desired: desired_tx,
        observed: Mutex::new(Observed {
            recorded_lag: loaded.lag,
            ..Observed::default()
        }),
        topology,
        tx,
    });
    let mut owner = Owner {
        shared: shared.clone(),
        desired,
        next_id: loaded.next_operation_id,
        rx,
        phase: PhaseState::default(),
        refusals: BTreeSet::new(),
        refused_any: false,
        standbys: BTreeMap::new(),
        links: BTreeMap::new(),
        enabling: None,
        reported: crate::audit::Seen::default(),
        lag_recorded_at: None,
    };
    if first_start {
        let next = owner.desired.clone();
        owner.commit(next, Vec::new()).map_err(internal)?;
    }
    tokio::spawn(async move { owner.run(stop).await });
    Ok(shared)
}

impl Shared {
    /// The last published desired state.
    pub fn desired(&self) -> Arc<Desired> {
        self.desired.borrow().clone()
    }

    pub fn observed(&self) -> Observed {
        self.observed.lock().map(|o| o.clone()).unwrap_or_default()
    }

    pub fn watch_topology(&self) -> watch::Receiver<pb::Topology> {
        self.topology.subscribe()
    }

    pub fn topology(&self) -> pb::Topology {
        self.topology.borrow().clone()
    }

    /// The state the pure rules read, at `now`.
    pub fn view<'a>(&'a self, desired: &'a Desired, observed: &'a Observed, now: Instant) -> View<'a> {
        View {
            desired,
            observed,
            config: &self.config,
            now,
            now_ms: self.clock.wall_ms_at(now),
            started: self.started,
        }
    }

    /// A view of the state now, for the pure rules.
    pub fn with_view<T>(&self, f: impl FnOnce(&View<'_>) -> T) -> T {
        let desired = self.desired();
        let observed = self.observed();
        let now = self.clock.now();
        let view = self.view(&desired, &observed, now);
        f(&view)
    }

    /// Runs an operator command on the owner.
    pub async fn command(&self, command: Command, by: &str) -> Result<pb::Operation, Status> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Msg::Command {
                command,
                by: by.to_owned(),
                reply,
            })
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))?
    }

    pub(crate) async fn join(&self, report: crate::model::Report) -> Result<(), Status> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Msg::Join {
                report: Box::new(report),
                reply,
            })
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))?
    }

    pub(crate) fn event(&self, kind: OperationKind, detail: String) {
        let _ = self.tx.send(Msg::Event { kind, detail });
    }

    /// Records an operator's action in history: what, who, role, from where.
    pub fn audit(&self, caller: &duplex_rpc::auth::Caller, detail: String) {
        tracing::info!(by = %caller.describe(), %detail, "operator action");
        let _ = self.tx.send(Msg::Audit {
            detail,
            caller: caller.clone(),
        });
    }

    /// Records operator actions another server served (already validated,
    /// see `crate::audit`); answers once they are in history, so the server
    /// drops its copies only then.
    pub async fn audit_reported(
        &self,
        server: &str,
        stream: u64,
        records: Vec<crate::audit::Reported>,
    ) -> Result<(), Status> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Msg::Reported {
                server: server.to_owned(),
                stream,
                records,
                reply,
            })
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))?
    }

    pub(crate) fn wake(&self) {
        let _ = self.tx.send(Msg::Wake);
    }
}

/// Progress of the running phase, in memory: a restarted coordinator
/// makes its calls again (they are idempotent).
#[derive(Default)]
struct PhaseState {
    op: u64,
    phase: usize,
    answered: Answered,
    inflight: BTreeSet<String>,
    retry_at: BTreeMap<String, Instant>,
}

struct Owner {
    shared: Arc<Shared>,
    desired: Desired,
    next_id: u64,
    rx: mpsc::UnboundedReceiver<Msg>,
    phase: PhaseState,
    /// Refusals already recorded, so history gets one per distinct reason.
    refusals: BTreeSet<String>,
    refused_any: bool,
    /// Each standby's health as last reported in history.
    standbys: crate::decide::standbys::Known,
    /// Each assigned link's health as last reported in history.
    links: crate::decide::standbys::Known,
    /// The group being enabled again, if a call is out.
    enabling: Option<String>,
    /// Operator actions other servers reported, so a resent one is recorded once.
    reported: crate::audit::Seen,
    /// When each standby's lag was last recorded in the store.
    lag_recorded_at: Option<Instant>,
}

impl Owner {
    async fn run(&mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                msg = self.rx.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => return,
                },
                _ = tick.tick() => {}
            }
            self.tick();
        }
    }

    fn view_parts(&self) -> (Observed, Instant) {
        (self.shared.observed(), self.shared.clock.now())
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Join { report, reply } => {
                let _ = reply.send(self.join(&report));
            }
            Msg::Command { command, by, reply } => {
                let _ = reply.send(self.command(command, &by));
            }
            Msg::Event { kind, detail } => self.record(kind, OperationState::Reported, detail, true),
            Msg::Audit { detail, caller } => self.record_audit(detail, &caller),
            Msg::Reported {
                server,
                stream,
                records,
                reply,
            } => {
                let _ = reply.send(self.record_reported(&server, stream, records));
            }
            Msg::Answer {
                op,
                phase,
                call,
                result,
            } => self.answered(op, phase, &call, result),
            Msg::GroupEnabled { group, result } => self.group_enabled(group, result),
            Msg::Wake => {}
        }
    }

    fn tick(&mut self) {
        self.detect();
        self.watch_standbys();
        self.record_lag();
        self.advance();
        self.enable_groups();
        self.publish_topology();
    }

    /// Persists `next` (and any events), then makes it current and tells
    /// whoever must know: pushed roles and links only save time, since
    /// heartbeat answers carry the same.
    fn commit(&mut self, next: Desired, events: Vec<pb::Operation>) -> Result<(), StoreError> {
        let mut commit = Commit {
            operations: events,
            ..Commit::default()
        };
        if next.cluster_state() != self.desired.cluster_state() || next.mode != self.desired.mode {
            commit.cluster = Some(next.cluster_state());
        }
        for (name, m) in &next.servers {
            if self.desired.servers.get(name) != Some(m) {
                commit.put_servers.push(pb::ServerInfo::from(m));
            }
        }
        for name in self.desired.servers.keys() {
            if !next.servers.contains_key(name) {
                commit.remove_servers.push(name.clone());
            }
        }
        if let Some(op) = &next.operation
            && self.desired.operation.as_ref() != Some(op)
        {
            commit.operations.push(pb::Operation::from(op));
        }
        let cluster_unchanged = commit.cluster.is_none();
        if !(cluster_unchanged
            && commit.put_servers.is_empty()
            && commit.remove_servers.is_empty()
            && commit.operations.is_empty())
        {
            durably(|| self.shared.store.commit(&commit))?;
        }
        let links_before = roles::links(&self.desired);
        let pushes = role_pushes(&self.desired, &next);
        self.desired = next;
        self.shared.desired.send_replace(Arc::new(self.desired.clone()));
        for call in pushes {
            self.fire(call);
        }
        if roles::links(&self.desired) != links_before {
            self.push_links();
        }
        for op in &commit.operations {
            if op.state != OperationState::Running.as_str() || op.phases.is_empty() {
                self.shared.config.alerts.send(op);
            }
        }
        Ok(())
    }

    /// Applies `f` to a copy of the desired state and commits it.
    fn update(&mut self, f: impl FnOnce(&mut Desired)) -> Result<(), StoreError> {
        let mut next = self.desired.clone();
        f(&mut next);
        self.commit(next, Vec::new())
    }

    /// A best-effort call whose answer nobody waits for.
    fn fire(&self, call: Call) {
        let servers = self.shared.servers.clone();
        tokio::spawn(async move {
            if let Err(e) = servers.call(call).await {
                tracing::info!(error = %e, "not pushed now; the heartbeat answer carries it");
            }
        });
    }

    fn push_links(&self) {
        let (observed, now) = self.view_parts();
        let links = roles::links(&self.desired);
        for mirror in self
            .desired
            .servers
            .values()
            .filter(|s| s.kind == ServerKind::Mirror)
        {
            if !observed.healthy(&mirror.name, now, self.shared.config.failover_timeout) {
                continue;
            }
            let own = links
                .iter()
                .filter(|(m, _)| *m == mirror.name)
                .map(|(_, l)| l.clone())
                .collect();
            self.fire(Call::SetLinks {
                addr: mirror.addr.clone(),
                links: own,
            });
        }
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Records a one-off event in history (and alerts it).
    fn record(&mut self, kind: OperationKind, state: OperationState, detail: String, automatic: bool) {
        let now = self.shared.clock.wall_ms();
        let event = pb::Operation {
            id: self.next_id(),
            kind: kind.as_str().to_owned(),
            state: state.as_str().to_owned(),
            detail,
            started_unix_ms: now,
            finished_unix_ms: now,
            automatic,
            by: if automatic {
                AUTOMATIC.into()
            } else {
                String::new()
            },
            ..Default::default()
        };
        tracing::warn!(kind = %kind, detail = %event.detail, "event");
        let next = self.desired.clone();
        if let Err(e) = self.commit(next, vec![event]) {
            tracing::error!(error = %e, "cannot record an event");
        }
    }

    fn record_audit(&mut self, detail: String, caller: &duplex_rpc::auth::Caller) {
        let now = self.shared.clock.wall_ms();
        let role = match &caller.who {
            duplex_rpc::auth::Who::Operator { role, .. } => role.as_str().to_owned(),
            duplex_rpc::auth::Who::Server(id) => id.kind.as_str().to_owned(),
            duplex_rpc::auth::Who::Anonymous => String::new(),
        };
        let event = pb::Operation {
            id: self.next_id(),
            kind: OperationKind::Audit.as_str().to_owned(),
            state: OperationState::Done.as_str().to_owned(),
            detail,
            started_unix_ms: now,
            finished_unix_ms: now,
            by: caller.name(),
            by_role: role,
            by_addr: caller.addr.clone(),
            ..Default::default()
        };
        let next = self.desired.clone();
        if let Err(e) = self.commit(next, vec![event]) {
            tracing::error!(error = %e, "cannot record an operator action");
        }
    }

    /// One history event per reported action not recorded before, all in
    /// one commit.
    fn record_reported(
        &mut self,
        server: &str,
        stream: u64,
        records: Vec<crate::audit::Reported>,
    ) -> Result<(), Status> {
        let before = self.reported.clone();
        let fresh: Vec<_> = records
            .into_iter()
            .filter(|r| self.reported.fresh(server, stream, r.seq))
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        let now = self.shared.clock.wall_ms();
        let mut events = Vec::with_capacity(fresh.len());
        for r in fresh {
            tracing::info!(by = %r.by, role = %r.role, from = %r.addr, %server, detail = %r.detail,
                "operator action reported");
            events.push(pb::Operation {
                id: self.next_id(),
                kind: OperationKind::Audit.as_str().to_owned(),
                state: OperationState::Done.as_str().to_owned(),
                detail: format!("on {server}: {}", r.detail),
                // The server's clock says when it happened, but never a
                // time after this event is recorded.
                started_unix_ms: if r.at_ms > 0 { r.at_ms.min(now) } else { now },
                finished_unix_ms: now,
                by: r.by,
                by_role: r.role.as_str().to_owned(),
                by_addr: r.addr,
                ..Default::default()
            });
        }
        let next = self.desired.clone();
        if let Err(e) = self.commit(next, events) {
            // Not seen after all: the server sends them again.
            self.reported = before;
            tracing::error!(error = %e, %server, "cannot record reported operator actions");
            return Err(internal(e));
        }
        Ok(())
    }

    // ---- servers joining ------------------------------------------------

    fn join(&mut self, report: &crate::model::Report) -> Result<(), Status> {
        let member = &report.member;
        let (observed, now) = self.view_parts();
        if let Some(known) = self.desired.servers.get(&member.name)
            && known.id != member.id
            && observed.healthy(&member.name, now, self.shared.config.failover_timeout)
        {
            return Err(Status::failed_precondition(format!(
                "the name {:?} belongs to another running server (id {}); a second server cannot take it \
                 while the first one heartbeats",
                duplex_types::shown(&member.name),
                known.id
            )));
        }
        duplex_types::Epoch::granted(report.epoch).map_err(|e| {
            Status::invalid_argument(format!(
                "{} reports an impossible epoch: {e}",
                duplex_types::shown(&member.name)
            ))
        })?;
        let mut next = self.desired.clone();
        next.epoch = next.epoch.max(report.epoch);
        next.servers.insert(member.name.clone(), member.clone());
        if member.kind.holds_data()
            && !next.roles.contains_key(&member.name)
            && let Some(role) = roles::adopted(&next, member, report.role)
        {
            let vacancy = next.vacancies.remove(&(member.site.clone(), member.kind));
            let preferred = vacancy.unwrap_or(role);
            if vacancy.is_some() {
                // It takes the place of a removed server: failback brings
                // the roles back to it, and like any server returning to a
                // failed-over site, nothing is copied into it until asked.
                if let Some(old) = replaced(&self.desired, member) {
                    next.replaces.insert(member.name.clone(), old);
                }
                if member.kind == ServerKind::Storage {
                    next.held.insert(member.name.clone());
                }
            }
            tracing::info!(server = %member.name, %role, %preferred, "role adopted");
            next.roles.insert(member.name.clone(), role);
            next.preferred.insert(member.name.clone(), preferred);
        }
        if next != self.desired {
            tracing::info!(server = %member.name, kind = %member.kind, addr = %member.addr, "server registered");
            self.commit(next, Vec::new()).map_err(internal)?;
        }
        Ok(())
    }

    // ---- operator commands ---------------------------------------------

    fn command(&mut self, command: Command, by: &str) -> Result<pb::Operation, Status> {
        match command {
            Command::Cancel => return self.cancel(by),
            Command::RemoveServer { name } => return self.remove(&name, by),
            _ => {}
        }
        if let Some(running) = self.desired.running() {
            return Err(Status::failed_precondition(format!(
                "a {} is already running (phase {}); wait for it to finish or `duplexctl cancel` it",
                running.kind,
                self.desired.phase_label()
            )));
        }
        let (kind, plan, detail, forced) = self.plan_command(command)?;
        self.begin(kind, plan, detail, false, forced, by)
    }

    fn plan_command(&self, command: Command) -> Result<(OperationKind, Plan, String, bool), Status> {
        let precondition = Status::failed_precondition;
        self.shared.with_view(|view| match command {
            Command::Failover { site, kind, force } => {
                let site = site_or_active(view, &site)?;
                let holders = plan::holders_to_move(view, &site, false, kind);
                let mut plan = plan::failover(view, &site, &holders, &BTreeSet::new()).map_err(precondition)?;
                plan.kind = kind;
                if let Some(why) = plan::too_lossy(view, &plan).filter(|_| !force) {
                    return Err(precondition(format!(
                        "failing over site {site} could lose acknowledged writes: {why}; --force accepts the loss"
                    )));
                }
                let what = kind.map_or("", ServerKind::as_str);
                let detail = format!(
                    "manual failover of site {site}{}{}",
                    if what.is_empty() { String::new() } else { format!(" ({what} only)") },
                    if force { " (forced)" } else { "" }
                );
                Ok((OperationKind::Failover, plan, detail, force))
            }
            Command::Switchover { site } => {
                let site = site_or_active(view, &site)?;
                let holders = plan::holders_to_move(view, &site, false, None);
                let plan = plan::failover(view, &site, &holders, &BTreeSet::new()).map_err(precondition)?;
                let down: Vec<&String> = plan.roles.keys().filter(|n| !view.healthy(n)).collect();
                if !down.is_empty() {
                    return Err(precondition(format!(
                        "switchover needs every server involved up, but {down:?} are down; use failover"
                    )));
                }
                Ok((
                    OperationKind::Switchover,
                    plan,
                    format!("planned switchover away from site {site}"),
                    false,
                ))
            }
            Command::Failback { verify } => {
                let mut plan = plan::failback(view).map_err(precondition)?;
                plan.verify = verify;
                let detail = format!(
                    "failback of site {} to its original roles{}",
                    plan.from_site,
                    if verify { ", with an integrity check" } else { "" }
                );
                Ok((OperationKind::Failback, plan, detail, false))
            }
            Command::Resync { rate } => {
                let held: Vec<&str> = view.desired.held.iter().map(String::as_str).collect();
                let detail = format!(
                    "resync into {} at {}",
                    if held.is_empty() { "every mirror".to_owned() } else { held.join(", ") },
                    if rate == 0 { "full speed".to_owned() } else { format!("{rate} bytes/s") }
                );
                let plan = Plan {
                    rate,
                    ..Plan::default()
                };
                Ok((OperationKind::Resync, plan, detail, false))
            }
            Command::Cancel | Command::RemoveServer { .. } => {
                Err(Status::internal("not an operation"))
            }
        })
    }

    fn begin(
        &mut self,
        kind: OperationKind,
        plan: Plan,
        detail: String,
        automatic: bool,
        forced: bool,
        by: &str,
    ) -> Result<pb::Operation, Status> {
        let op = Op {
            id: self.next_id(),
            kind,
            state: OperationState::Running,
            detail,
            phases: Vec::new(),
            error: String::new(),
            started_ms: self.shared.clock.wall_ms(),
            finished_ms: 0,
            automatic,
            forced,
            by: by.to_owned(),
            plan,
            waiting: String::new(),
            wait_deadline_ms: 0,
        };
        tracing::warn!(id = op.id, kind = %kind, detail = %op.detail, "operation started");
        let record = pb::Operation::from(&op);
        self.update(|d| d.operation = Some(op)).map_err(internal)?;
        self.shared.wake();
        Ok(record)
    }

    fn cancel(&mut self, by: &str) -> Result<pb::Operation, Status> {
        let Some(op) = self.desired.running().cloned() else {
            return Err(Status::failed_precondition("no operation is running"));
        };
        if let Some(phase) = op.current().filter(|p| !p.cancellable()) {
            return Err(Status::failed_precondition(format!(
                "the {} is in phase {phase}, after roles began to move; it cannot be cancelled, only finished",
                op.kind
            )));
        }
        let reason = format!("cancelled by {}", if by.is_empty() { "an operator" } else { by });
        self.end(OperationState::Cancelled, reason)
            .map_err(internal)?
            .ok_or_else(|| Status::internal("the cancelled operation vanished"))
    }

    fn remove(&mut self, name: &str, by: &str) -> Result<pb::Operation, Status> {
        let Some(member) = self.desired.servers.get(name).cloned() else {
            return Err(Status::not_found(format!(
                "no server is named {:?}",
                duplex_types::shown(name)
            )));
        };
        let (observed, now) = self.view_parts();
        if observed.healthy(name, now, self.shared.config.failover_timeout) {
            return Err(Status::failed_precondition(format!(
                "{name} is up; only a server that is down can be removed (stop it first)"
            )));
        }
        if let Some(role) = self.desired.role(name).filter(|r| r.is_holder()) {
            return Err(Status::failed_precondition(format!(
                "{name} is {role}; fail over first (`duplexctl failover`), then remove it"
            )));
        }
        if self
            .desired
            .running()
            .is_some_and(|op| op.plan.roles.contains_key(name))
        {
            return Err(Status::failed_precondition(format!(
                "the running operation involves {name}; cancel it or wait for it to finish"
            )));
        }
        let preferred = self.desired.preferred.get(name).copied();
        self.update(|d| {
            d.servers.remove(name);
            d.roles.remove(name);
            d.preferred.remove(name);
            d.held.remove(name);
            d.replaces.remove(name);
            if let Some(role) = preferred.filter(|r| r.is_holder()) {
                d.vacancies.insert((member.site.clone(), member.kind), role);
            }
        })
        .map_err(internal)?;
        if let Ok(mut o) = self.shared.observed.lock() {
            o.seen.remove(name);
            o.positions.remove(name);
        }
        let detail = format!(
            "{name} ({} on site {}) was removed{}",
            member.kind,
            member.site,
            preferred
                .filter(|r| r.is_holder())
                .map(|r| format!(
                    "; the next {} server to join site {} inherits its {r} role",
                    member.kind, member.site
                ))
                .unwrap_or_default()
        );
        self.record(
            OperationKind::ServerRemoved,
            OperationState::Done,
            detail.clone(),
            false,
        );
        Ok(pb::Operation {
            kind: OperationKind::ServerRemoved.as_str().to_owned(),
            state: OperationState::Done.as_str().to_owned(),
            detail,
            by: by.to_owned(),
            ..Default::default()
        })
    }

    // ---- detection ------------------------------------------------------

    fn detect(&mut self) {
        let (observed, now) = self.view_parts();
        let view = self.shared.view(&self.desired, &observed, now);
        let detection = detect::detect(&view);
        match detection {
            Detection::Nothing => {
                if self.desired.running().is_none() {
                    self.refusals.clear();
                    self.refused_any = false;
                }
            }
            Detection::Start { plan, mut detail } => {
                if self.refused_any {
                    detail.push_str("; retried by itself once it became safe");
                }
                self.refusals.clear();
                self.refused_any = false;
                if let Err(e) = self.begin(OperationKind::Failover, plan, detail, true, false, AUTOMATIC) {
                    tracing::error!(error = %e, "cannot start a failover");
                }
            }
            Detection::Refused { key, detail } => {
                self.refused_any = true;
                if self.refusals.insert(key) {
                    self.record(
                        OperationKind::FailoverRefused,
                        OperationState::Refused,
                        detail,
                        true,
                    );
                }
            }
            Detection::Fold { plan, detail } => {
                if let Err(e) = self.fold(plan, &detail) {
                    tracing::error!(error = %e, "cannot fold a lost server into the failover");
                }
            }
            Detection::Preempt { reason } => {
                if let Err(e) = self.end(OperationState::Cancelled, reason) {
                    tracing::error!(error = %e, "cannot stop the running operation");
                }
            }
        }
    }

    /// Records each standby and link lost or regained since the last tick.
    /// Stores what is known of each standby's lag every few seconds, and
    /// at once when a standby or its source is new; keeps what was recorded
    /// of a standby whose source is no longer heard.
    fn record_lag(&mut self) {
        let (observed, now) = self.view_parts();
        let view = self.shared.view(&self.desired, &observed, now);
        let mut lag = observed.recorded_lag.clone();
        lag.extend(crate::decide::plan::lag_samples(&view));
        lag.retain(|standby, _| self.desired.servers.contains_key(standby));
        let sources = |l: &crate::observed::RecordedLag| {
            l.iter()
                .map(|(k, s)| (k.clone(), s.source.clone()))
                .collect::<Vec<_>>()
        };
        let due = self
            .lag_recorded_at
            .is_none_or(|at| now.saturating_duration_since(at) >= RECORD_LAG_EVERY);
        if lag == observed.recorded_lag || !(due || sources(&lag) != sources(&observed.recorded_lag)) {
            return;
        }
        self.lag_recorded_at = Some(now);
        let commit = Commit {
            lag: Some(lag.clone()),
            ..Commit::default()
        };
        match durably(|| self.shared.store.commit(&commit)) {
            Ok(()) => {
                if let Ok(mut o) = self.shared.observed.lock() {
                    o.recorded_lag = lag;
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot record the standbys' lag"),
        }
    }

    fn watch_standbys(&mut self) {
        let (observed, now) = self.view_parts();
        let view = self.shared.view(&self.desired, &observed, now);
        let standbys = crate::decide::standbys::changes(&view, &mut self.standbys);
        let links = crate::decide::standbys::link_changes(&view, &mut self.links);
        let kinds = |up| {
            if up {
                (OperationKind::StandbyRegained, OperationKind::LinkRegained)
            } else {
                (OperationKind::StandbyLost, OperationKind::LinkLost)
            }
        };
        for change in standbys {
            self.record(kinds(change.up).0, OperationState::Reported, change.detail, true);
        }
        for change in links {
            self.record(kinds(change.up).1, OperationState::Reported, change.detail, true);
        }
    }

    /// The running failover takes more moves, and runs again from the fence
    /// (every phase is idempotent, so what was done stays done).
    fn fold(&mut self, more: Plan, detail: &str) -> Result<(), StoreError> {
        let now = self.shared.clock.wall_ms();
        tracing::warn!(%detail, "re-planning the running failover");
        self.update(|d| {
            let Some(op) = d.operation.as_mut() else {
                return;
            };
            op.plan.roles.extend(more.roles);
            op.plan.fenced.extend(more.fenced);
            op.plan.homes.extend(more.homes);
            op.plan.kind = None;
            op.plan.fence_until_ms = 0;
            op.plan.moved_homes_after = None;
            op.detail = format!("{}; {detail}", op.detail);
            if let Some(current) = op.phases.last_mut().filter(|p| p.finished_ms == 0) {
                current.finished_ms = now;
            }
            op.phases.push(PhaseRun {
                phase: Phase::Fence,
                started_ms: now,
                finished_ms: 0,
            });
        })
    }

    // ---- the running operation --------------------------------------------

    fn advance(&mut self) {
        for _ in 0..STEPS_PER_TICK {
            let Some(op) = self.desired.running().cloned() else {
                return;
            };
            // Every log line of a step names the operation and its phase.
            let phase = op.current().map_or_else(|| "next".to_owned(), |p| p.to_string());
            let span = tracing::info_span!("operation", id = op.id, kind = %op.kind, %phase);
            let _in_operation = span.enter();
            let outcome = match op.current() {
                None => self.start_next_phase(&op),
                Some(_) => self.step(&op),
            };
            match outcome {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    tracing::error!(error = %e, "cannot persist the operation's progress");
                    return;
                }
            }
        }
    }

    /// Starts the next phase, or finishes the operation. True: go on.
    fn start_next_phase(&mut self, op: &Op) -> Result<bool, StoreError> {
        let Some(next) = op.next_phase() else {
            self.end(OperationState::Done, String::new())?;
            return Ok(false);
        };
        let now = self.shared.clock.wall_ms();
        self.update(|d| {
            if let Some(op) = d.operation.as_mut() {
                op.phases.push(PhaseRun {
                    phase: next,
                    started_ms: now,
                    finished_ms: 0,
                });
                op.waiting.clear();
                op.wait_deadline_ms = 0;
            }
        })?;
        failpoint(op.kind, next);
        tracing::info!(op = op.id, kind = %op.kind, phase = %next, "phase");
        Ok(true)
    }

    fn step(&mut self, op: &Op) -> Result<bool, StoreError> {
        if self.phase.op != op.id || self.phase.phase != op.phases.len() {
            self.phase = PhaseState {
                op: op.id,
                phase: op.phases.len(),
                ..PhaseState::default()
            };
        }
        let (observed, now) = self.view_parts();
        let view = self.shared.view(&self.desired, &observed, now);
        let step = phase::step(&view, op, &self.phase.answered);
        let deadline = op.phases.last().map_or(0, |p| p.started_ms)
            + op.current()
                .map_or(0, |p| phase::timeout(&view, p).as_millis() as i64);
        match step {
            Step::Change(change) => {
                self.apply(change)?;
                Ok(true)
            }
            Step::Wait { reason, calls } => {
                for call in calls {
                    self.make(op, call);
                }
                if op.waiting != reason {
                    self.update(|d| {
                        if let Some(op) = d.operation.as_mut() {
                            op.waiting = reason;
                            op.wait_deadline_ms = deadline;
                        }
                    })?;
                }
                Ok(false)
            }
            Step::Done(changes) => {
                for change in changes {
                    self.apply(change)?;
                }
                let now = self.shared.clock.wall_ms();
                self.update(|d| {
                    if let Some(op) = d.operation.as_mut() {
                        if let Some(p) = op.phases.last_mut() {
                            p.finished_ms = now.max(p.started_ms);
                        }
                        op.waiting.clear();
                        op.wait_deadline_ms = 0;
                    }
                })?;
                Ok(true)
            }
            Step::Fail(reason) => {
                self.end(OperationState::Failed, reason)?;
                Ok(false)
            }
        }
    }

    /// Makes a call for the running phase unless it is out or answered.
    fn make(&mut self, op: &Op, call: Call) {
        let key = call.key();
        let now = self.shared.clock.now();
        if self.phase.answered.contains_key(&key)
            || self.phase.inflight.contains(&key)
            || self.phase.retry_at.get(&key).is_some_and(|at| *at > now)
        {
            return;
        }
        self.phase.inflight.insert(key);
        let servers = self.shared.servers.clone();
        let tx = self.shared.tx.clone();
        let (id, phase) = (op.id, op.phases.len());
        tokio::spawn(async move {
            let result = servers.call(call.clone()).await;
            let _ = tx.send(Msg::Answer {
                op: id,
                phase,
                call: Box::new(call),
                result,
            });
        });
    }

    fn answered(&mut self, op: u64, phase: usize, call: &Call, result: Result<Reply, String>) {
        if self.phase.op != op || self.phase.phase != phase {
            return;
        }
        let key = call.key();
        self.phase.inflight.remove(&key);
        match result {
            Ok(reply) => {
                self.phase.answered.insert(key, reply);
            }
            Err(e) => {
                tracing::info!(call = %key, error = %e, "call failed; will retry");
                self.phase
                    .retry_at
                    .insert(key, self.shared.clock.now() + RETRY_AFTER);
            }
        }
    }

    fn apply(&mut self, change: Change) -> Result<(), StoreError> {
        let now_ms = self.shared.clock.wall_ms();
        match &change {
            Change::AssignRoles(roles) => {
                tracing::warn!(?roles, epoch = self.desired.epoch + 1, "roles assigned")
            }
            Change::FenceUntil(until) => tracing::warn!(wait_ms = until - now_ms, "fencing"),
            _ => {}
        }
        self.update(|d| apply_change(d, change))
    }

    /// Ends the running operation; a failed or cancelled one first undoes
    /// what must not stay.
    fn end(&mut self, state: OperationState, reason: String) -> Result<Option<pb::Operation>, StoreError> {
        let Some(op) = self.desired.running().cloned() else {
            return Ok(None);
        };
        if state != OperationState::Done {
            let (observed, now) = self.view_parts();
            let view = self.shared.view(&self.desired, &observed, now);
            for change in phase::undo(&view, &op) {
                self.apply(change)?;
            }
        }
        let now = self.shared.clock.wall_ms();
        match state {
            OperationState::Done => tracing::warn!(id = op.id, kind = %op.kind, "operation finished"),
            _ => tracing::error!(id = op.id, kind = %op.kind, %state, %reason, "operation ended"),
        }
        self.update(|d| {
            if let Some(op) = d.operation.as_mut() {
                op.state = state;
                op.error = reason;
                op.finished_ms = now;
                op.waiting.clear();
                op.wait_deadline_ms = 0;
                if let Some(p) = op.phases.last_mut().filter(|p| p.finished_ms == 0)
                    && state == OperationState::Done
                {
                    p.finished_ms = now;
                }
            }
        })?;
        // History keeps it; the desired state no longer has a running one.
        let ended = self.desired.operation.take().map(|o| pb::Operation::from(&o));
        self.shared.desired.send_replace(Arc::new(self.desired.clone()));
        self.phase = PhaseState::default();
        Ok(ended)
    }

    // ---- reconciling groups ---------------------------------------------

    /// Enables again, one by one, the groups an operation disabled, as soon
    /// as a master answers, whatever became of the operation.
    fn enable_groups(&mut self) {
        if self.enabling.is_some() {
            return;
        }
        let Some(group) = self.desired.groups_to_enable.iter().next().cloned() else {
            return;
        };
        let (observed, now) = self.view_parts();
        let Some(master) = self
            .desired
            .master()
            .filter(|m| observed.healthy(&m.name, now, self.shared.config.failover_timeout))
        else {
            return;
        };
        self.enabling = Some(group.clone());
        let call = Call::SetGroup {
            master: master.addr.clone(),
            group: group.clone(),
            enabled: true,
        };
        let servers = self.shared.servers.clone();
        let tx = self.shared.tx.clone();
        tokio::spawn(async move {
            let result = servers.call(call).await;
            if result.is_err() {
                tokio::time::sleep(RETRY_AFTER).await;
            }
            let _ = tx.send(Msg::GroupEnabled { group, result });
        });
    }

    fn group_enabled(&mut self, group: String, result: Result<Reply, String>) {
        self.enabling = None;
        match result {
            Ok(_) => {
                if let Err(e) = self.update(|d| {
                    d.groups_to_enable.remove(&group);
                }) {
                    tracing::error!(error = %e, "cannot record an enabled group");
                }
                tracing::info!(%group, "group enabled again");
            }
            Err(e) => tracing::info!(%group, error = %e, "group not enabled yet; will retry"),
        }
    }

    // ---- topology ---------------------------------------------------------

    fn publish_topology(&self) {
        let mut next = self.shared.with_view(|view| topology_of(view, &self.shared.info));
        self.shared.topology.send_if_modified(|current| {
            next.version = current.version;
            if *current == next {
                return false;
            }
            next.version = current.version + 1;
            *current = next;
            true
        });
    }
}

/// The server an inheriting newcomer replaces: the last removed server of
/// its kind and site that moved homes (so failback can find its accounts).
fn replaced(desired: &Desired, member: &Member) -> Option<String> {
    desired
        .moved_homes
        .keys()
        .find(|origin| !desired.servers.contains_key(*origin) && member.kind == ServerKind::Storage)
        .cloned()
}

/// Promotions and demotions to push now that roles changed.
fn role_pushes(before: &Desired, after: &Desired) -> Vec<Call> {
    let mut calls = Vec::new();
    if after.epoch == before.epoch {
        return calls;
    }
    let master = after.master().map(|m| m.addr.clone()).unwrap_or_default();
    for (name, role) in &after.roles {
        if before.role(name) == Some(*role) {
            continue;
        }
        let Some(m) = after.servers.get(name) else {
            continue;
        };
        let epoch = after.epoch;
        let call = match (m.kind, role) {
            (ServerKind::Account, Role::Master) => Call::PromoteAccount {
                addr: m.addr.clone(),
                epoch,
            },
            (ServerKind::Account, _) => Call::DemoteAccount {
                addr: m.addr.clone(),
                epoch,
                master: master.clone(),
            },
            (ServerKind::Storage, role) => Call::SetStorageRole {
                addr: m.addr.clone(),
                role: *role,
                epoch,
                primary: after
                    .with_role(ServerKind::Storage, Role::Primary)
                    .find(|p| p.site != m.site)
                    .filter(|_| !role.is_holder())
                    .map(|p| p.addr.clone())
                    .unwrap_or_default(),
            },
            _ => continue,
        };
        calls.push(call);
    }
    calls
}

/// Applies one change to the desired state (pure).
pub fn apply_change(d: &mut Desired, change: Change) {
    match change {
        Change::AssignRoles(roles) => {
            // Every switch gets an epoch of its own, so an assignment sent
            // before it can never undo it.
            d.epoch = d.epoch.saturating_add(1);
            for (name, role) in roles {
                if d.servers.contains_key(&name) {
                    d.roles.insert(name, role);
                }
            }
        }
        Change::Hold(names) => d.held.extend(names),
        Change::Release { names, rate } => {
            d.held.retain(|h| !names.contains(h));
            if let Some(rate) = rate {
                d.rate = rate;
            }
        }
        Change::ApplyMovedHomes(after) => d.moved_homes = after,
        change => {
            let Some(op) = d.operation.as_mut() else {
                return;
            };
            match change {
                Change::StartFence => op.plan.fence_until_ms = FENCING,
                Change::FenceUntil(until) => op.plan.fence_until_ms = until,
                Change::DecideMovedHomes(mut after) => {
                    // A server that replaces a removed one ends that one's entry.
                    after.retain(|origin, now| d.replaces.get(now) != Some(origin));
                    op.plan.moved_homes_after = Some(after);
                }
                Change::DecideGroups(groups) => {
                    op.plan.disabled_groups = groups;
                    op.plan.groups_decided = true;
                }
                Change::EnableGroups => {
                    let groups = std::mem::take(&mut op.plan.disabled_groups);
                    if !groups.is_empty() {
                        op.detail = format!(
                            "{}; groups {} were blocked during the switch",
                            op.detail,
                            groups.join(", ")
                        );
                    }
                    d.groups_to_enable.extend(groups);
                }
                Change::AppendDetail(text) => op.detail = format!("{}; {text}", op.detail),
                _ => {}
            }
        }
    }
}

fn site_or_active(view: &View<'_>, site: &str) -> Result<String, Status> {
    if site.is_empty() {
        return plan::active_site(view)
            .ok_or_else(|| Status::failed_precondition("no server holds a master or primary role"));
    }
    duplex_types::validate_name(duplex_types::NameKind::Site, site)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    if !view.desired.servers.values().any(|s| s.site == site) {
        return Err(Status::not_found(format!(
            "no server is on site {:?}",
            duplex_types::shown(site)
        )));
    }
    Ok(site.to_owned())
}

/// The role a server shows: as reported, "fenced", or "down".
pub fn shown_role(view: &View<'_>, name: &str) -> String {
    match view.observed.get(name) {
        Some(o) if view.healthy(name) && o.report.fenced => "fenced".into(),
        Some(o) if view.healthy(name) => o.report.role.as_str().to_owned(),
        _ => "down".into(),
    }
}

pub fn topology_of(view: &View<'_>, info: &pb::ServerInfo) -> pb::Topology {
    let mut servers = vec![pb::TopologyServer {
        server: Some(info.clone()),
        role: Role::Running.as_str().to_owned(),
        healthy: true,
    }];
    servers.extend(view.desired.servers.values().map(|s| pb::TopologyServer {
        server: Some(pb::ServerInfo::from(s)),
        role: shown_role(view, &s.name),
        healthy: view.healthy(&s.name),
    }));
    pb::Topology {
        version: 0,
        epoch: view.desired.epoch,
        mode: view.desired.mode.as_str().to_owned(),
        phase: view.desired.phase_label(),
        servers,
        links: roles::links(view.desired).into_iter().map(|(_, l)| l).collect(),
        moved_homes: view.desired.moved_homes.clone().into_iter().collect(),
    }
}

static FAILPOINTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Arms fail points; only `duplex-coordinator-failpoints` (the
/// `failpoints` feature) calls this.
pub fn arm_failpoints() {
    FAILPOINTS.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// When armed, aborts the process at the start of the phase named by
/// `DUPLEX_FAILPOINT` (`KIND:PHASE`), after the phase was recorded as
/// started: the restarted coordinator must resume it. With several
/// coordinators, `DUPLEX_FAILPOINT_FILE` names a file of such lines that
/// they share: the leader that reaches one removes it and aborts, so the
/// next leader resumes the phase and dies at the next line, not this one.
fn failpoint(kind: OperationKind, phase: Phase) {
    if !FAILPOINTS.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let here = format!("{kind}:{phase}");
    let armed = std::env::var("DUPLEX_FAILPOINT").is_ok_and(|f| f == here)
        || std::env::var_os("DUPLEX_FAILPOINT_FILE").is_some_and(|f| take_failpoint(&f, &here));
    if armed {
        tracing::error!(%kind, %phase, "fail point reached: aborting");
        std::process::abort();
    }
}

/// Removes `here` from the fail point file; true if it was there.
fn take_failpoint(file: &std::ffi::OsStr, here: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(file) else {
        return false;
    };
    let (taken, rest): (Vec<&str>, Vec<&str>) = text.lines().partition(|l| l.trim() == here);
    if taken.is_empty() {
        return false;
    }
    // Written in place of the old file, so a reader never sees it half
    // written; the abort follows at once, so nothing is left to fsync for.
    let tmp = std::path::PathBuf::from(file).with_extension("taking");
    std::fs::write(&tmp, rest.join("\n")).is_ok() && std::fs::rename(&tmp, file).is_ok()
}
