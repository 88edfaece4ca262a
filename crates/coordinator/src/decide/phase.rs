//! What the running operation does next, as a pure function of the state.
//!
//! A phase never assumes it is on its first try: it looks at the desired
//! state, at what servers report and at the calls already answered in
//! this phase, and says what is left: a change to persist, calls to make
//! while it waits, or that it is done. Every wait names what it waits for
//! and has a deadline; past it, or as soon as a server it needs is lost,
//! the phase takes its way out (`Fail`), and the engine undoes what must
//! not stay.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use duplex_proto::v1::MoveHomesRequest;
use duplex_types::{Mode, OperationKind, Phase, Role, ServerKind};

use super::View;
use crate::config::LEASE_MARGIN;
use crate::model::{Member, Op, Plan};
use crate::servers::{Call, Reply};

/// `fence_until_ms` while the fence is being decided: no lease is granted
/// to a fenced server from the moment this is published.
pub const FENCING: i64 = i64::MAX;

/// Reverse mirroring is "nearly caught up" below these: backups are
/// blocked only for the last stretch.
const SMALL_LAG_RECORDS: u64 = 1000;
const SMALL_LAG_BYTES: u64 = 64 * 1024 * 1024;

/// A change to the desired state, persisted before anyone is told.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    StartFence,
    FenceUntil(i64),
    /// New roles, under a new epoch of their own.
    AssignRoles(BTreeMap<String, Role>),
    Hold(BTreeSet<String>),
    Release {
        names: BTreeSet<String>,
        rate: Option<u64>,
    },
    DecideMovedHomes(BTreeMap<String, String>),
    ApplyMovedHomes(BTreeMap<String, String>),
    DecideGroups(Vec<String>),
    /// Hands the groups this operation disabled to the engine, which
    /// enables them as soon as a master answers.
    EnableGroups,
    AppendDetail(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    Change(Change),
    /// Waiting for `reason`; the calls are made meanwhile (each once per
    /// phase, a failed one again after a pause).
    Wait {
        reason: String,
        calls: Vec<Call>,
    },
    Done(Vec<Change>),
    Fail(String),
}

/// Calls answered in the current phase, by key.
pub type Answered = BTreeMap<String, Reply>;

fn wait(reason: impl Into<String>) -> Step {
    Step::Wait {
        reason: reason.into(),
        calls: Vec::new(),
    }
}

fn wait_for(reason: impl Into<String>, call: Call) -> Step {
    Step::Wait {
        reason: reason.into(),
        calls: vec![call],
    }
}

/// How long a phase may wait before its way out.
pub fn timeout(view: &View<'_>, phase: Phase) -> Duration {
    match phase {
        Phase::Rejoin | Phase::ReverseMirroring => view.config.rejoin_timeout,
        _ => view.config.phase_timeout,
    }
}

/// The next step of `op` in its current phase.
pub fn step(view: &View<'_>, op: &Op, answered: &Answered) -> Step {
    let Some(phase) = op.current() else {
        return Step::Done(Vec::new());
    };
    let step = match phase {
        Phase::Fence => fence(view, &op.plan),
        Phase::PromoteAccount => switch_roles(view, &op.plan, Some(ServerKind::Account)),
        Phase::PromoteStorage => switch_roles(view, &op.plan, Some(ServerKind::Storage)),
        Phase::SwitchRoles => switch_roles(view, &op.plan, None),
        Phase::StopLinks => hold_lost(view, &op.plan),
        Phase::RepointHomes => repoint_homes(view, op, answered),
        Phase::Resume => Step::Done(Vec::new()),
        Phase::RestoreMirroring => restore_mirroring(view, op),
        Phase::Drain => drain(view, &op.plan),
        Phase::Rejoin => rejoin(view, &op.plan),
        Phase::ReverseMirroring => reverse_mirroring(view, &op.plan),
        Phase::BlockBackups => block_backups(view, &op.plan, answered),
        Phase::UnblockBackups => unblock_backups(view, &op.plan),
        Phase::Verify => verify(view, &op.plan, answered),
        Phase::Release => release(view, &op.plan),
    };
    past_deadline(view, op, phase, step)
}

/// A wait past the phase's deadline becomes its way out.
fn past_deadline(view: &View<'_>, op: &Op, phase: Phase, step: Step) -> Step {
    let Step::Wait { reason, calls } = step else {
        return step;
    };
    let started = op.phases.last().map_or(op.started_ms, |p| p.started_ms);
    let limit = timeout(view, phase);
    if view.now_ms > started + limit.as_millis() as i64 {
        return Step::Fail(format!(
            "phase {phase} gave up after {}: still waiting for {reason}",
            humantime::format_duration(limit)
        ));
    }
    Step::Wait { reason, calls }
}

/// Raise no epoch yet: stop granting the fenced servers leases, then wait
/// until every lease they may hold has surely lapsed (a server's lease
/// ends before the coordinator's view of it).
fn fence(view: &View<'_>, plan: &Plan) -> Step {
    if plan.fenced.is_empty() {
        return Step::Done(Vec::new());
    }
    if plan.fence_until_ms == 0 {
        return Step::Change(Change::StartFence);
    }
    if plan.fence_until_ms == FENCING {
        // Published already: every lease granted before it is recorded.
        let lease = view.config.lease;
        let mut left = lease.saturating_sub(view.now.saturating_duration_since(view.started));
        for name in &plan.fenced {
            if let Some(granted) = view.observed.get(name).and_then(|o| o.granted_at) {
                left = left.max(lease.saturating_sub(view.now.saturating_duration_since(granted)));
            }
        }
        let until = view.now_ms + (left + LEASE_MARGIN).as_millis() as i64;
        return Step::Change(Change::FenceUntil(until));
    }
    if view.now_ms < plan.fence_until_ms {
        return wait("the fenced servers' leases to lapse");
    }
    Step::Done(Vec::new())
}

fn in_scope(view: &View<'_>, name: &str, kind: Option<ServerKind>) -> Option<Member> {
    view.member(name)
        .filter(|m| kind.is_none_or(|k| k == m.kind))
        .cloned()
}

/// Assigns the plan's roles (of one kind, or all) under a new epoch, then
/// waits until every promoted server reports its role and holds a lease.
/// A promoted server that is lost is not waited for.
fn switch_roles(view: &View<'_>, plan: &Plan, kind: Option<ServerKind>) -> Step {
    let desired = view.desired;
    let changes: BTreeMap<String, Role> = plan
        .roles
        .iter()
        .filter(|(n, r)| in_scope(view, n, kind).is_some() && desired.role(n) != Some(**r))
        .map(|(n, r)| (n.clone(), *r))
        .collect();
    if !changes.is_empty() {
        return Step::Change(Change::AssignRoles(changes));
    }
    for (name, role) in plan.roles.iter().filter(|(_, r)| r.is_holder()) {
        if in_scope(view, name, kind).is_none() {
            continue;
        }
        if view.lost(name) {
            return Step::Fail(format!("{name}, chosen to take over as {role}, is lost"));
        }
        let converged = view.observed.get(name).is_some_and(|o| {
            o.report.role == *role && !o.report.fenced && o.report.epoch >= desired.epoch && o.leased
        });
        if !converged {
            return wait(format!("{name} to report itself {role} with a lease"));
        }
    }
    Step::Done(Vec::new())
}

/// Nothing is mirrored into lost storage servers until a resync or a
/// failback: the surviving site is busy taking their backups.
fn hold_lost(view: &View<'_>, plan: &Plan) -> Step {
    let hold: BTreeSet<String> = plan
        .homes
        .keys()
        .filter(|n| !view.desired.held.contains(*n) && view.desired.servers.contains_key(*n))
        .cloned()
        .collect();
    if hold.is_empty() {
        Step::Done(Vec::new())
    } else {
        Step::Change(Change::Hold(hold))
    }
}

/// The master, or why the phase cannot go on without one.
fn master<'a>(view: &View<'a>, what: &str) -> Result<&'a Member, Step> {
    let Some(master) = view.desired.master() else {
        return Err(Step::Fail(format!(
            "no account server is master, so {what} cannot be done"
        )));
    };
    if view.lost(&master.name) {
        return Err(Step::Fail(format!(
            "the account master {} is lost, so {what} cannot be done now",
            master.name
        )));
    }
    if !view.healthy(&master.name) {
        return Err(wait(format!("the account master {} to answer", master.name)));
    }
    Ok(master)
}

/// Moves the accounts of each storage server in the plan to its new home,
/// each pair in one account-server transaction.
fn repoint_homes(view: &View<'_>, op: &Op, answered: &Answered) -> Step {
    let plan = &op.plan;
    if plan.homes.is_empty() {
        return Step::Done(Vec::new());
    }
    let Some(after) = &plan.moved_homes_after else {
        let mut after = view.desired.moved_homes.clone();
        for (from, to) in &plan.homes {
            record_move(&mut after, from, to);
        }
        return Step::Change(Change::DecideMovedHomes(after));
    };
    let master = match master(view, "moving homes") {
        Ok(m) => m,
        Err(step) => return step,
    };
    let returning = op.kind == OperationKind::Failback && view.desired.mode == Mode::ActiveActive;
    for (from, to) in &plan.homes {
        let Some(target) = view.member(to) else {
            return Step::Fail(format!(
                "{to}, the new home of {from}'s accounts, is no longer registered"
            ));
        };
        let register = Call::RegisterStorage {
            master: master.addr.clone(),
            server: target.clone(),
        };
        if !answered.contains_key(&register.key()) {
            return wait_for(format!("{to} to be registered for placement"), register);
        }
        let request = MoveHomesRequest {
            from: from.clone(),
            to: to.clone(),
            returning,
            retire: plan.roles.get(from).is_some_and(|r| !r.is_holder()),
            previous: plan.previous_names.get(to).cloned().unwrap_or_default(),
        };
        let moving = Call::MoveHomes {
            master: master.addr.clone(),
            request,
        };
        if !answered.contains_key(&moving.key()) {
            return wait_for(format!("the homes on {from} to move to {to}"), moving);
        }
    }
    if view.desired.moved_homes != *after {
        return Step::Change(Change::ApplyMovedHomes(after.clone()));
    }
    Step::Done(Vec::new())
}

/// The map of moved homes after a move: a move back home ends an entry,
/// any other move starts (or extends) one.
pub fn record_move(moved: &mut BTreeMap<String, String>, from: &str, to: &str) {
    let origins: Vec<String> = moved
        .iter()
        .filter(|(_, now)| now.as_str() == from)
        .map(|(origin, _)| origin.clone())
        .collect();
    for origin in &origins {
        if origin == to {
            moved.remove(origin);
        } else {
            moved.insert(origin.clone(), to.to_owned());
        }
    }
    if origins.is_empty() {
        moved.insert(from.to_owned(), to.to_owned());
    }
}

/// Links follow the roles by themselves; a failback also ends every hold
/// on a healthy server, so no server is left unmirrored once the platform
/// is back in its original shape.
fn restore_mirroring(view: &View<'_>, op: &Op) -> Step {
    if op.kind != OperationKind::Failback {
        return Step::Done(Vec::new());
    }
    let names: BTreeSet<String> = view
        .desired
        .held
        .iter()
        .filter(|n| view.healthy(n))
        .cloned()
        .collect();
    if names.is_empty() {
        Step::Done(Vec::new())
    } else {
        Step::Change(Change::Release { names, rate: None })
    }
}

/// Waits until nothing written on the fenced holders is missing on the
/// servers taking over (their writes have stopped: they are fenced), as
/// both report in heartbeats sent after the fence took hold.
fn drain(view: &View<'_>, plan: &Plan) -> Step {
    let fenced_at = plan.fence_until_ms;
    for old_name in &plan.fenced {
        let Some(old) = view.member(old_name) else {
            continue;
        };
        for (new_name, role) in &plan.roles {
            let Some(new) = view
                .member(new_name)
                .filter(|n| n.kind == old.kind && role.is_holder())
            else {
                continue;
            };
            for name in [old_name, new_name] {
                if view.lost(name) {
                    return Step::Fail(format!("{name} was lost while draining"));
                }
            }
            let fresh = |n: &str| view.observed.get(n).filter(|o| o.wall_ms > fenced_at);
            let caught_up = match old.kind {
                ServerKind::Account => match (fresh(old_name), fresh(new_name)) {
                    (Some(o), Some(n)) => n.report.position >= o.report.position,
                    _ => false,
                },
                _ => {
                    fresh(old_name).is_some()
                        && view
                            .observed
                            .outbound_lag(old_name, &new.id)
                            .is_some_and(|l| l.records == 0)
                }
            };
            if !caught_up {
                return wait(format!("{new_name} to catch up with {old_name}"));
            }
        }
    }
    Step::Done(Vec::new())
}

/// Waits until every server the failback moves is back and holds the role
/// it was given while it was away.
fn rejoin(view: &View<'_>, plan: &Plan) -> Step {
    let mut missing = Vec::new();
    for name in plan.roles.keys() {
        if !view.desired.servers.contains_key(name) {
            return Step::Fail(format!("{name} was removed while the failback waited for it"));
        }
        let assigned = view.desired.role(name);
        let back = view.healthy(name)
            && view
                .observed
                .get(name)
                .is_some_and(|o| Some(o.report.role) == assigned && o.report.epoch >= view.desired.epoch);
        if !back {
            missing.push(name.as_str());
        }
    }
    if missing.is_empty() {
        Step::Done(Vec::new())
    } else {
        wait(format!("{} to rejoin", missing.join(", ")))
    }
}

/// Mirrors back into the recovered storage servers (a delta: only what
/// they lack) and waits until they are nearly caught up.
fn reverse_mirroring(view: &View<'_>, plan: &Plan) -> Step {
    let release: BTreeSet<String> = plan
        .roles
        .keys()
        .filter(|n| view.desired.held.contains(*n))
        .cloned()
        .collect();
    if !release.is_empty() {
        return Step::Change(Change::Release {
            names: release,
            rate: None,
        });
    }
    for (from, to) in &plan.homes {
        for name in [from, to] {
            if view.lost(name) {
                return Step::Fail(format!("{name} was lost while mirroring back"));
            }
        }
        let Some(target) = view.member(to) else {
            return Step::Fail(format!("{to} is no longer registered"));
        };
        let near = view
            .observed
            .outbound_lag(from, &target.id)
            .is_some_and(|l| l.records < SMALL_LAG_RECORDS && l.bytes < SMALL_LAG_BYTES);
        if !near {
            return wait(format!("{to} to be nearly caught up with {from}"));
        }
    }
    Step::Done(Vec::new())
}

/// Disables the enabled groups of the accounts that move back, so their
/// agents get a clear refusal instead of writing during the switch.
fn block_backups(view: &View<'_>, plan: &Plan, answered: &Answered) -> Step {
    if plan.homes.is_empty() {
        return Step::Done(Vec::new());
    }
    let master = match master(view, "blocking backups") {
        Ok(m) => m,
        Err(step) => return step,
    };
    if !plan.groups_decided {
        let ask = Call::EnabledGroupsOf {
            master: master.addr.clone(),
            homes: plan.homes.keys().cloned().collect(),
        };
        return match answered.get(&ask.key()) {
            Some(Reply::Groups(groups)) => Step::Change(Change::DecideGroups(groups.clone())),
            _ => wait_for("the groups of the accounts moving back", ask),
        };
    }
    let calls: Vec<Call> = plan
        .disabled_groups
        .iter()
        .map(|g| Call::SetGroup {
            master: master.addr.clone(),
            group: g.clone(),
            enabled: false,
        })
        .filter(|c| !answered.contains_key(&c.key()))
        .collect();
    if calls.is_empty() {
        return Step::Done(Vec::new());
    }
    Step::Wait {
        reason: format!("groups {} to be disabled", plan.disabled_groups.join(", ")),
        calls,
    }
}

fn unblock_backups(view: &View<'_>, plan: &Plan) -> Step {
    if !plan.disabled_groups.is_empty() {
        return Step::Change(Change::EnableGroups);
    }
    let pending = &view.desired.groups_to_enable;
    if pending.is_empty() {
        return Step::Done(Vec::new());
    }
    let names: Vec<&str> = pending.iter().map(String::as_str).collect();
    wait(format!("groups {} to be enabled again", names.join(", ")))
}

/// The optional integrity check after a failback: every snapshot of every
/// account now homed on a returning server is read back and hashed there.
fn verify(view: &View<'_>, plan: &Plan, answered: &Answered) -> Step {
    if !plan.verify || plan.homes.is_empty() {
        return Step::Done(Vec::new());
    }
    let master = match master(view, "the integrity check") {
        Ok(m) => m,
        Err(step) => return step,
    };
    let homes: Vec<Member> = plan
        .homes
        .values()
        .filter_map(|n| view.member(n).cloned())
        .collect();
    let check = Call::VerifyHomes {
        master: master.addr.clone(),
        homes,
    };
    match answered.get(&check.key()) {
        Some(Reply::Verified(Ok(summary))) => Step::Done(vec![Change::AppendDetail(summary.clone())]),
        Some(Reply::Verified(Err(bad))) => Step::Fail(bad.clone()),
        _ => wait_for("the integrity check of the accounts that moved home", check),
    }
}

/// Resync: mirror into every held server again, at the requested rate.
fn release(view: &View<'_>, plan: &Plan) -> Step {
    if view.desired.held.is_empty() && view.desired.rate == plan.rate {
        return Step::Done(Vec::new());
    }
    Step::Change(Change::Release {
        names: view.desired.held.clone(),
        rate: Some(plan.rate),
    })
}

/// What a failed or cancelled operation must not leave behind: groups it
/// disabled, and (for a failback) healthy servers still held.
pub fn undo(view: &View<'_>, op: &Op) -> Vec<Change> {
    let mut out = Vec::new();
    if !op.plan.disabled_groups.is_empty() {
        out.push(Change::EnableGroups);
    }
    if op.kind == OperationKind::Failback {
        let names: BTreeSet<String> = op
            .plan
            .roles
            .keys()
            .filter(|n| view.desired.held.contains(*n) && view.healthy(n))
            .cloned()
            .collect();
        if !names.is_empty() {
            out.push(Change::Release { names, rate: None });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use duplex_types::{Mode, OperationState};
    use tokio::time::Instant;

    use super::*;
    use crate::config::Config;
    use crate::decide::tests::site_platform;
    use crate::model::{Desired, PhaseRun};
    use crate::observed::Observed;

    fn op(kind: OperationKind, phase: Phase, plan: Plan) -> Op {
        Op {
            id: 1,
            kind,
            state: OperationState::Running,
            detail: String::new(),
            phases: vec![PhaseRun {
                phase,
                started_ms: 1_000,
                finished_ms: 0,
            }],
            error: String::new(),
            started_ms: 1_000,
            finished_ms: 0,
            automatic: false,
            forced: false,
            by: String::new(),
            plan,
            waiting: String::new(),
            wait_deadline_ms: 0,
        }
    }

    fn heard(d: &Desired, o: &mut Observed, name: &str, at: Instant, role: Role, granted: Option<Instant>) {
        let mut seen = crate::decide::tests::seen(d, name, at, 0);
        seen.report.role = role;
        seen.granted_at = granted;
        seen.leased = granted.is_some();
        o.record(seen);
    }

    fn view<'a>(d: &'a Desired, o: &'a Observed, c: &'a Config, started: Instant, now_ms: i64) -> View<'a> {
        View {
            desired: d,
            observed: o,
            config: c,
            now: Instant::now(),
            now_ms,
            started,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_fence_stops_grants_first_then_waits_out_the_last_one() {
        let d = site_platform();
        let c = Config::new(Mode::ActivePassive);
        let started = Instant::now();
        tokio::time::advance(Duration::from_secs(5)).await;
        let mut o = Observed::default();
        let granted = Instant::now() - Duration::from_millis(300);
        heard(&d, &mut o, "storage-a", granted, Role::Primary, Some(granted));
        let mut plan = Plan {
            fenced: ["storage-a".to_owned()].into(),
            ..Plan::default()
        };
        let v = view(&d, &o, &c, started, 10_000);
        assert_eq!(fence(&v, &plan), Step::Change(Change::StartFence));
        plan.fence_until_ms = FENCING;
        // 700 ms of its lease are left, plus the margin.
        assert_eq!(fence(&v, &plan), Step::Change(Change::FenceUntil(10_800)));
        plan.fence_until_ms = 10_800;
        assert!(matches!(fence(&v, &plan), Step::Wait { .. }));
        let later = view(&d, &o, &c, started, 10_801);
        assert_eq!(fence(&later, &plan), Step::Done(Vec::new()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_promotion_is_not_waited_for_once_the_chosen_server_is_lost() {
        let mut d = site_platform();
        d.roles.insert("storage-b".into(), Role::Primary);
        d.roles.insert("storage-a".into(), Role::Replica);
        let c = Config::new(Mode::ActivePassive);
        let started = Instant::now();
        let mut o = Observed::default();
        heard(&d, &mut o, "storage-b", Instant::now(), Role::Replica, None);
        let plan = Plan {
            roles: [
                ("storage-b".to_owned(), Role::Primary),
                ("storage-a".to_owned(), Role::Replica),
            ]
            .into(),
            ..Plan::default()
        };
        let failover = op(OperationKind::Failover, Phase::PromoteStorage, plan);
        let v = view(&d, &o, &c, started, 2_000);
        assert!(matches!(step(&v, &failover, &Answered::new()), Step::Wait { .. }));
        tokio::time::advance(Duration::from_secs(2)).await;
        let v = view(&d, &o, &c, started, 4_000);
        assert!(matches!(step(&v, &failover, &Answered::new()), Step::Fail(r) if r.contains("storage-b")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_past_its_deadline_takes_its_way_out() {
        let d = site_platform();
        let c = Config::new(Mode::ActivePassive);
        let started = Instant::now();
        let o = Observed::default();
        let plan = Plan {
            roles: [("storage-a".to_owned(), Role::Primary)].into(),
            ..Plan::default()
        };
        let failback = op(OperationKind::Failback, Phase::Rejoin, plan);
        let v = view(&d, &o, &c, started, 2_000);
        assert!(
            matches!(step(&v, &failback, &Answered::new()), Step::Wait { reason, .. } if reason.contains("storage-a"))
        );
        let late = view(
            &d,
            &o,
            &c,
            started,
            1_000 + c.rejoin_timeout.as_millis() as i64 + 1,
        );
        assert!(matches!(step(&v, &failback, &Answered::new()), Step::Wait { .. }));
        assert!(matches!(step(&late, &failback, &Answered::new()), Step::Fail(r) if r.contains("gave up")));
    }

    #[tokio::test(start_paused = true)]
    async fn undo_enables_disabled_groups_and_a_failback_releases_healthy_held_servers() {
        let mut d = site_platform();
        d.held.insert("storage-a".into());
        let c = Config::new(Mode::ActivePassive);
        let started = Instant::now();
        let mut o = Observed::default();
        heard(&d, &mut o, "storage-a", Instant::now(), Role::Replica, None);
        let plan = Plan {
            roles: [("storage-a".to_owned(), Role::Primary)].into(),
            disabled_groups: vec!["g".into()],
            ..Plan::default()
        };
        let failback = op(OperationKind::Failback, Phase::BlockBackups, plan);
        let v = view(&d, &o, &c, started, 2_000);
        assert_eq!(
            undo(&v, &failback),
            vec![
                Change::EnableGroups,
                Change::Release {
                    names: ["storage-a".to_owned()].into(),
                    rate: None
                }
            ]
        );
    }
}
