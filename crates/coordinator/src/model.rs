//! The coordinator's typed model and its one boundary with the wire.
//!
//! `Desired` is what the coordinator decided and persists: the registry,
//! roles, epoch, held servers and the running operation with its plan.
//! Everything is converted from and to the generated proto types here,
//! and nowhere else; unknown roles, kinds, phases and states from the wire
//! or the store become errors that name them.

use std::collections::{BTreeMap, BTreeSet};

use duplex_proto::v1 as pb;
use duplex_types::{
    InvalidInput, Mode, NameKind, OperationKind, OperationState, Phase, Role, ServerKind, validate_name,
};

/// A server of the platform, as it introduced itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    pub name: String,
    pub site: String,
    pub kind: ServerKind,
    pub addr: String,
    pub public_addr: String,
}

impl TryFrom<&pb::ServerInfo> for Member {
    type Error = InvalidInput;

    fn try_from(s: &pb::ServerInfo) -> Result<Self, InvalidInput> {
        validate_name(NameKind::Server, &s.name)?;
        validate_name(NameKind::Site, &s.site)?;
        let kind: ServerKind = s.kind.parse()?;
        if s.id.is_empty() {
            return Err(malformed("server id", &s.id, "must not be empty"));
        }
        if !(s.addr.starts_with("http://") || s.addr.starts_with("https://")) {
            return Err(malformed("server address", &s.addr, "must be an http(s) URL"));
        }
        Ok(Self {
            id: s.id.clone(),
            name: s.name.clone(),
            site: s.site.clone(),
            kind,
            addr: s.addr.clone(),
            public_addr: s.public_addr.clone(),
        })
    }
}

impl From<&Member> for pb::ServerInfo {
    fn from(m: &Member) -> Self {
        pb::ServerInfo {
            id: m.id.clone(),
            name: m.name.clone(),
            site: m.site.clone(),
            kind: m.kind.as_str().to_owned(),
            addr: m.addr.clone(),
            public_addr: m.public_addr.clone(),
        }
    }
}

fn malformed(what: &'static str, value: &str, reason: &'static str) -> InvalidInput {
    InvalidInput::Malformed {
        what,
        value: value.chars().take(64).collect(),
        reason,
    }
}

/// How far a server is behind its source.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Lag {
    pub records: u64,
    pub bytes: u64,
    pub seconds: f64,
}

impl From<pb::Lag> for Lag {
    fn from(l: pb::Lag) -> Self {
        Self {
            records: l.records,
            bytes: l.bytes,
            seconds: l.seconds,
        }
    }
}

impl From<Lag> for pb::Lag {
    fn from(l: Lag) -> Self {
        pb::Lag {
            records: l.records,
            bytes: l.bytes,
            seconds: l.seconds,
        }
    }
}

/// One heartbeat, validated.
#[derive(Clone, Debug)]
pub struct Report {
    pub member: Member,
    pub role: Role,
    pub epoch: u64,
    pub lag: Option<Lag>,
    /// Outbound mirroring lag by destination server id.
    pub outbound: BTreeMap<String, Option<Lag>>,
    pub fenced: bool,
    pub position: u64,
    pub links: Vec<pb::LinkSpec>,
    pub degraded: bool,
    pub divergent_entries: u64,
    pub divergence_report: String,
    /// Mirrors: how each link fares.
    pub link_health: Vec<LinkHealth>,
}

/// One link as its mirror reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkHealth {
    pub source: String,
    pub destination: String,
    /// Zero while it runs.
    pub failing_for: std::time::Duration,
    pub state: String,
}

impl TryFrom<&pb::HeartbeatRequest> for Report {
    type Error = InvalidInput;

    fn try_from(r: &pb::HeartbeatRequest) -> Result<Self, InvalidInput> {
        let info = r
            .server
            .as_ref()
            .ok_or_else(|| malformed("heartbeat", "", "names no server"))?;
        let member = Member::try_from(info)?;
        if member.kind == ServerKind::Coordinator {
            return Err(malformed("server kind", "coordinator", "does not heartbeat"));
        }
        let role: Role = r.role.parse()?;
        if !role.fits(member.kind) {
            return Err(malformed(
                "role",
                &r.role,
                "does not fit the server's kind (account: master|slave, storage: primary|replica, mirror: running)",
            ));
        }
        Ok(Self {
            member,
            role,
            epoch: r.epoch,
            lag: r.lag.map(Lag::from),
            outbound: r
                .outbound
                .iter()
                .map(|o| (o.destination_id.clone(), o.lag.map(Lag::from)))
                .collect(),
            fenced: r.fenced,
            position: r.position,
            links: r.links.clone(),
            degraded: r.degraded,
            divergent_entries: r.divergent_entries,
            divergence_report: r.divergence_report.clone(),
            link_health: r
                .link_health
                .iter()
                .filter_map(|h| {
                    let spec = h.spec.as_ref()?;
                    Some(LinkHealth {
                        source: spec.source.clone(),
                        destination: spec.destination.clone(),
                        failing_for: std::time::Duration::from_millis(h.failing_for_ms),
                        state: h.state.clone(),
                    })
                })
                .collect(),
        })
    }
}

/// What an operation decided before it started (and, for a failover that
/// absorbed a second fault, what it decided since). Persisted, so a
/// resumed operation never chooses differently.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub from_site: String,
    /// Only this kind of role moves (`failover --kind`).
    pub kind: Option<ServerKind>,
    /// Servers denied a lease while the operation runs.
    pub fenced: BTreeSet<String>,
    /// Wall-clock ms after which every fenced lease has surely lapsed;
    /// 0 until the fence phase decides it.
    pub fence_until_ms: i64,
    pub roles: BTreeMap<String, Role>,
    /// Storage homes to move: old server -> new server.
    pub homes: BTreeMap<String, String>,
    /// For a returning server: the name its accounts have as previous home.
    pub previous_names: BTreeMap<String, String>,
    pub disabled_groups: Vec<String>,
    pub groups_decided: bool,
    pub rate: u64,
    pub verify: bool,
    /// The moved-homes map once the moves are done, decided before the
    /// first move.
    pub moved_homes_after: Option<BTreeMap<String, String>>,
}

/// One phase as it ran.
#[derive(Clone, Debug, PartialEq)]
pub struct PhaseRun {
    pub phase: Phase,
    pub started_ms: i64,
    pub finished_ms: i64,
}

/// A failover, switchover, failback or resync.
#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    pub id: u64,
    pub kind: OperationKind,
    pub state: OperationState,
    pub detail: String,
    pub phases: Vec<PhaseRun>,
    pub error: String,
    pub started_ms: i64,
    pub finished_ms: i64,
    pub automatic: bool,
    pub forced: bool,
    pub by: String,
    pub plan: Plan,
    pub waiting: String,
    pub wait_deadline_ms: i64,
}

impl Op {
    /// The phase it is in: the last one started and not finished.
    pub fn current(&self) -> Option<Phase> {
        self.phases.last().filter(|p| p.finished_ms == 0).map(|p| p.phase)
    }

    /// The next phase to start, if any is left.
    pub fn next_phase(&self) -> Option<Phase> {
        let done = self.phases.iter().filter(|p| p.finished_ms > 0).count();
        let order = self.kind.phases();
        // Phases run in order; a re-plan rewinds by recording phases again,
        // so what is next follows from the last finished one.
        match self.phases.iter().rev().find(|p| p.finished_ms > 0) {
            None if done == 0 => order.first().copied(),
            None => None,
            Some(last) => {
                let i = order.iter().position(|p| *p == last.phase)?;
                order.get(i + 1).copied()
            }
        }
    }

    /// Whether any role switch has happened yet in this operation.
    pub fn roles_moved(&self) -> bool {
        self.phases.iter().any(|p| {
            matches!(
                p.phase,
                Phase::PromoteAccount | Phase::PromoteStorage | Phase::SwitchRoles
            ) && p.started_ms > 0
        })
    }
}

/// The coordinator's persisted desired state.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub mode: Mode,
    pub epoch: u64,
    pub servers: BTreeMap<String, Member>,
    pub roles: BTreeMap<String, Role>,
    /// The role each server joined with: failback restores these.
    pub preferred: BTreeMap<String, Role>,
    pub held: BTreeSet<String>,
    pub rate: u64,
    /// Original home -> current home, for homes a failover moved.
    pub moved_homes: BTreeMap<String, String>,
    /// Roles of removed servers by (site, kind), inherited by the next
    /// server of that kind to join there.
    pub vacancies: BTreeMap<(String, ServerKind), Role>,
    /// A server that inherited a vacancy -> the removed server it replaces.
    pub replaces: BTreeMap<String, String>,
    /// Groups an operation disabled that must be enabled again.
    pub groups_to_enable: BTreeSet<String>,
    /// The running operation.
    pub operation: Option<Op>,
}

impl Desired {
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            epoch: 0,
            servers: BTreeMap::new(),
            roles: BTreeMap::new(),
            preferred: BTreeMap::new(),
            held: BTreeSet::new(),
            rate: 0,
            moved_homes: BTreeMap::new(),
            vacancies: BTreeMap::new(),
            replaces: BTreeMap::new(),
            groups_to_enable: BTreeSet::new(),
            operation: None,
        }
    }

    pub fn role(&self, name: &str) -> Option<Role> {
        self.roles.get(name).copied()
    }

    /// Servers of `kind` assigned `role`.
    pub fn with_role(&self, kind: ServerKind, role: Role) -> impl Iterator<Item = &Member> {
        self.servers
            .values()
            .filter(move |m| m.kind == kind && self.role(&m.name) == Some(role))
    }

    pub fn master(&self) -> Option<&Member> {
        self.with_role(ServerKind::Account, Role::Master).next()
    }

    pub fn running(&self) -> Option<&Op> {
        self.operation
            .as_ref()
            .filter(|op| op.state == OperationState::Running)
    }

    /// The phase shown in `duplexctl status`: `steady` or `KIND:PHASE`.
    pub fn phase_label(&self) -> String {
        match self.running() {
            Some(op) => format!("{}:{}", op.kind, op.current().map_or("starting", Phase::as_str)),
            None => "steady".into(),
        }
    }
}

fn vacancy_key(site: &str, kind: ServerKind) -> String {
    format!("{site}/{kind}")
}

fn parse_vacancy(key: &str) -> Result<(String, ServerKind), InvalidInput> {
    let (site, kind) = key
        .split_once('/')
        .ok_or_else(|| malformed("vacancy", key, "must be SITE/KIND"))?;
    Ok((site.to_owned(), kind.parse()?))
}

fn roles_from(
    map: &std::collections::HashMap<String, String>,
) -> Result<BTreeMap<String, Role>, InvalidInput> {
    map.iter().map(|(n, r)| Ok((n.clone(), r.parse()?))).collect()
}

fn roles_to(map: &BTreeMap<String, Role>) -> std::collections::HashMap<String, String> {
    map.iter()
        .map(|(n, r)| (n.clone(), r.as_str().to_owned()))
        .collect()
}

impl Desired {
    /// Rebuilds the desired state from what the store holds.
    pub fn from_stored(
        cluster: &pb::ClusterState,
        servers: &[pb::ServerInfo],
        operation: Option<&pb::Operation>,
        fallback_mode: Mode,
    ) -> Result<Self, InvalidInput> {
        let mode = if cluster.mode.is_empty() {
            fallback_mode
        } else {
            cluster.mode.parse()?
        };
        Ok(Self {
            mode,
            epoch: cluster.epoch,
            servers: servers
                .iter()
                .map(|s| Member::try_from(s).map(|m| (m.name.clone(), m)))
                .collect::<Result<_, _>>()?,
            roles: roles_from(&cluster.roles)?,
            preferred: roles_from(&cluster.preferred)?,
            held: cluster.held.iter().cloned().collect(),
            rate: cluster.rate,
            moved_homes: cluster
                .moved_homes
                .iter()
                .map(|(a, b)| (a.clone(), b.clone()))
                .collect(),
            vacancies: cluster
                .vacancies
                .iter()
                .map(|(k, r)| Ok((parse_vacancy(k)?, r.parse()?)))
                .collect::<Result<_, InvalidInput>>()?,
            replaces: cluster
                .replaces
                .iter()
                .map(|(a, b)| (a.clone(), b.clone()))
                .collect(),
            groups_to_enable: cluster.groups_to_enable.iter().cloned().collect(),
            operation: operation.map(Op::try_from).transpose()?,
        })
    }

    /// The persisted form of everything but the registry and the operation.
    pub fn cluster_state(&self) -> pb::ClusterState {
        pb::ClusterState {
            epoch: self.epoch,
            roles: roles_to(&self.roles),
            preferred: roles_to(&self.preferred),
            rate: self.rate,
            held: self.held.iter().cloned().collect(),
            mode: self.mode.as_str().to_owned(),
            moved_homes: self.moved_homes.clone().into_iter().collect(),
            vacancies: self
                .vacancies
                .iter()
                .map(|((site, kind), role)| (vacancy_key(site, *kind), role.as_str().to_owned()))
                .collect(),
            replaces: self.replaces.clone().into_iter().collect(),
            groups_to_enable: self.groups_to_enable.iter().cloned().collect(),
        }
    }
}

impl TryFrom<&pb::OperationPlan> for Plan {
    type Error = InvalidInput;

    fn try_from(p: &pb::OperationPlan) -> Result<Self, InvalidInput> {
        Ok(Self {
            from_site: p.from_site.clone(),
            kind: (!p.kind.is_empty()).then(|| p.kind.parse()).transpose()?,
            fenced: p.fenced.iter().cloned().collect(),
            fence_until_ms: p.fence_until_unix_ms,
            roles: roles_from(&p.roles)?,
            homes: p.homes.clone().into_iter().collect(),
            previous_names: p.previous_names.clone().into_iter().collect(),
            disabled_groups: p.disabled_groups.clone(),
            groups_decided: !p.disabled_groups.is_empty(),
            rate: p.rate,
            verify: p.verify,
            moved_homes_after: p
                .moved_homes_decided
                .then(|| p.moved_homes_after.clone().into_iter().collect()),
        })
    }
}

impl From<&Plan> for pb::OperationPlan {
    fn from(p: &Plan) -> Self {
        pb::OperationPlan {
            from_site: p.from_site.clone(),
            epoch: 0,
            fenced: p.fenced.iter().cloned().collect(),
            fence_until_unix_ms: p.fence_until_ms,
            roles: roles_to(&p.roles),
            homes: p.homes.clone().into_iter().collect(),
            disabled_groups: p.disabled_groups.clone(),
            rate: p.rate,
            verify: p.verify,
            moved_homes_after: p
                .moved_homes_after
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect(),
            moved_homes_decided: p.moved_homes_after.is_some(),
            kind: p.kind.map(String::from).unwrap_or_default(),
            previous_names: p.previous_names.clone().into_iter().collect(),
        }
    }
}

impl TryFrom<&pb::Operation> for Op {
    type Error = InvalidInput;

    fn try_from(o: &pb::Operation) -> Result<Self, InvalidInput> {
        Ok(Self {
            id: o.id,
            kind: o.kind.parse()?,
            state: o.state.parse()?,
            detail: o.detail.clone(),
            phases: o
                .phases
                .iter()
                .map(|p| {
                    Ok(PhaseRun {
                        phase: p.name.parse()?,
                        started_ms: p.started_unix_ms,
                        finished_ms: p.finished_unix_ms,
                    })
                })
                .collect::<Result<_, InvalidInput>>()?,
            error: o.error.clone(),
            started_ms: o.started_unix_ms,
            finished_ms: o.finished_unix_ms,
            automatic: o.automatic,
            forced: o.forced,
            by: o.by.clone(),
            plan: o
                .plan
                .as_ref()
                .map(Plan::try_from)
                .transpose()?
                .unwrap_or_default(),
            waiting: o.waiting.clone(),
            wait_deadline_ms: o.wait_deadline_unix_ms,
        })
    }
}

impl From<&Op> for pb::Operation {
    fn from(o: &Op) -> Self {
        pb::Operation {
            id: o.id,
            kind: o.kind.as_str().to_owned(),
            state: o.state.as_str().to_owned(),
            detail: o.detail.clone(),
            phases: o
                .phases
                .iter()
                .map(|p| pb::PhaseRecord {
                    name: p.phase.as_str().to_owned(),
                    started_unix_ms: p.started_ms,
                    finished_unix_ms: p.finished_ms,
                })
                .collect(),
            error: o.error.clone(),
            started_unix_ms: o.started_ms,
            finished_unix_ms: o.finished_ms,
            automatic: o.automatic,
            forced: o.forced,
            plan: Some(pb::OperationPlan::from(&o.plan)),
            waiting: o.waiting.clone(),
            wait_deadline_unix_ms: o.wait_deadline_ms,
            by: o.by.clone(),
            // Who and from where is recorded by the audit event that
            // accompanies an operator's command.
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(kind: &str) -> pb::ServerInfo {
        pb::ServerInfo {
            id: "id".into(),
            name: "storage-a".into(),
            site: "a".into(),
            kind: kind.into(),
            addr: "http://x".into(),
            public_addr: String::new(),
        }
    }

    #[test]
    fn unknown_kinds_and_roles_from_the_wire_are_named() {
        let e = Member::try_from(&info("tape")).expect_err("unknown kind");
        assert!(e.to_string().contains("\"tape\""), "{e}");
        let hb = pb::HeartbeatRequest {
            server: Some(info("storage")),
            role: "master".into(),
            ..Default::default()
        };
        let e = Report::try_from(&hb).expect_err("a storage server cannot be master");
        assert!(e.to_string().contains("master"), "{e}");
    }

    #[test]
    fn an_operation_survives_the_round_trip_through_its_stored_form() {
        let op = Op {
            id: 7,
            kind: OperationKind::Failback,
            state: OperationState::Running,
            detail: "d".into(),
            phases: vec![PhaseRun {
                phase: Phase::Rejoin,
                started_ms: 5,
                finished_ms: 0,
            }],
            error: String::new(),
            started_ms: 5,
            finished_ms: 0,
            automatic: false,
            forced: false,
            by: "op".into(),
            plan: Plan {
                from_site: "a".into(),
                kind: Some(ServerKind::Storage),
                roles: [("storage-a".to_owned(), Role::Primary)].into(),
                moved_homes_after: Some(BTreeMap::new()),
                ..Plan::default()
            },
            waiting: "w".into(),
            wait_deadline_ms: 9,
        };
        let back = Op::try_from(&pb::Operation::from(&op)).expect("decodes");
        assert_eq!(back, op);
    }
}
