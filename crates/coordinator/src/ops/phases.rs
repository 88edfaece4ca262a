//! What each phase does. Every phase may run again after a restart, so
//! each one checks the world rather than assuming it is the first try.

use std::sync::Arc;
use std::time::{Duration, Instant};

use duplex_proto::v1::{MoveHomesRequest, Operation, OperationPlan, ServerInfo};

use super::actions::{self, retry};
use super::{OpError, save};
use crate::core::{Core, LEASE_MARGIN, wall_ms};

/// How long a phase waits for servers before the operation fails.
const PHASE_DEADLINE: Duration = Duration::from_secs(120);
/// Failback waits this long for the recovered servers to come back.
const REJOIN_DEADLINE: Duration = Duration::from_secs(3600);
/// Reverse mirroring is "small" below this many records and bytes behind:
/// backups are blocked only for the last stretch.
const SMALL_LAG_RECORDS: u64 = 1000;
const SMALL_LAG_BYTES: u64 = 64 * 1024 * 1024;
const POLL: Duration = Duration::from_millis(100);

pub async fn run(core: &Arc<Core>, op: Operation, phase: &str) -> Result<Operation, OpError> {
    match phase {
        "fence" => fence(core, op).await,
        "promote-account" => switch_roles(core, op, Some("account")).await,
        "promote-storage" => switch_roles(core, op, Some("storage")).await,
        "switch-roles" => switch_roles(core, op, None).await,
        "stop-links" => hold_lost(core, op).await,
        "repoint-homes" => repoint_homes(core, op).await,
        "resume" | "restore-mirroring" => restore_mirroring(core, op).await,
        "drain" => drain(core, op).await,
        "rejoin" => rejoin(core, op).await,
        "reverse-mirroring" => reverse_mirroring(core, op).await,
        "block-backups" => block_backups(core, op).await,
        "unblock-backups" => unblock_backups(core, op).await,
        "release" => release(core, op).await,
        "verify" => verify(core, op).await,
        other => Err(OpError::Invalid(format!("unknown phase {other:?}"))),
    }
}

fn plan(op: &Operation) -> Result<&OperationPlan, OpError> {
    op.plan
        .as_ref()
        .ok_or_else(|| OpError::Invalid(format!("operation {} has no plan", op.id)))
}

fn plan_mut(op: &mut Operation) -> Result<&mut OperationPlan, OpError> {
    op.plan
        .as_mut()
        .ok_or_else(|| OpError::Invalid(format!("operation {} has no plan", op.id)))
}

async fn server(core: &Core, name: &str) -> Result<ServerInfo, OpError> {
    core.lock()
        .await
        .servers
        .get(name)
        .cloned()
        .ok_or_else(|| OpError::Invalid(format!("unknown server {name:?}")))
}

/// The address of the server assigned `role` among servers of `kind`.
async fn holder(core: &Core, kind: &str, role: &str) -> Result<ServerInfo, OpError> {
    let inner = core.lock().await;
    inner
        .servers
        .values()
        .find(|s| s.kind == kind && inner.cluster.roles.get(&s.name).map(String::as_str) == Some(role))
        .cloned()
        .ok_or_else(|| OpError::Invalid(format!("no {kind} server is assigned {role}")))
}

/// Polls `ready` until it holds or the deadline passes.
async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut ready: F) -> Result<(), OpError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    while !ready().await {
        if Instant::now() >= until {
            return Err(OpError::Timeout(what.to_owned()));
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// Raise the epoch, then wait until every fenced server's lease has surely
/// lapsed: no lease was granted to them since the operation started, and
/// a server's lease ends before the coordinator's view of it.
async fn fence(core: &Arc<Core>, mut op: Operation) -> Result<Operation, OpError> {
    if plan(&op)?.fence_until_unix_ms == 0 {
        // Under the lock heartbeats take: from the moment the fence time is
        // saved, no fenced server is granted a lease, so the latest grant
        // read here is the last one.
        let mut inner = core.lock().await;
        let p = plan(&op)?.clone();
        let mut wait = core.config.lease.saturating_sub(core.started.elapsed());
        for name in &p.fenced {
            if let Some(granted) = inner.observed.get(name).and_then(|o| o.granted_at) {
                wait = wait.max(core.config.lease.saturating_sub(granted.elapsed()));
            }
        }
        plan_mut(&mut op)?.fence_until_unix_ms = wall_ms() + (wait + LEASE_MARGIN).as_millis() as i64;
        core.save_operation(&mut inner, op.clone())?;
        tracing::warn!(fenced = ?p.fenced, wait_ms = (wait + LEASE_MARGIN).as_millis() as u64, "fencing");
    }
    let left = plan(&op)?.fence_until_unix_ms - wall_ms();
    if left > 0 {
        tokio::time::sleep(Duration::from_millis(left as u64)).await;
    }
    Ok(op)
}

/// Assigns the plan's roles (of one kind, or all), tells the servers, and
/// waits until every promoted server holds its role (and with it a lease).
async fn switch_roles(core: &Arc<Core>, op: Operation, kind: Option<&str>) -> Result<Operation, OpError> {
    let p = plan(&op)?.clone();
    let mut changes = Vec::new();
    // Every switch gets an epoch of its own, so an assignment sent before
    // it (same roles as before, lower epoch) can never undo it.
    let epoch = {
        let mut inner = core.lock().await;
        let mut cluster = inner.cluster.clone();
        for (name, role) in &p.roles {
            let Some(info) = inner.servers.get(name).cloned() else {
                continue;
            };
            if kind.is_some_and(|k| k != info.kind) {
                continue;
            }
            cluster.roles.insert(name.clone(), role.clone());
            changes.push((info, role.clone()));
        }
        if changes.is_empty() {
            return Ok(op);
        }
        cluster.epoch += 1;
        let epoch = cluster.epoch;
        core.save_cluster(&mut inner, cluster)?;
        epoch
    };
    let leader = |kind: &str| {
        let up = if kind == "account" { "master" } else { "primary" };
        changes
            .iter()
            .find(|(s, r)| s.kind == kind && r == up)
            .map(|(s, _)| s.addr.clone())
            .unwrap_or_default()
    };
    // Demotions are told in the background: the servers losing a role are
    // fenced already (no lease, so no writes), and one that is down or cut
    // off learns its role from its next heartbeat; waiting on it here would
    // only hold up the promotion.
    for (info, role) in changes.iter().filter(|(_, r)| r == "slave" || r == "replica") {
        if !core.healthy(&*core.lock().await, &info.name) {
            continue;
        }
        let (info, role) = (info.clone(), role.clone());
        let follow = leader(&info.kind);
        tokio::spawn(async move {
            let told = match info.kind.as_str() {
                "account" => actions::demote_account(&info.addr, epoch, &follow).await,
                _ => actions::set_storage_role(&info.addr, &role, epoch, &follow).await,
            };
            if let Err(e) = told {
                tracing::info!(server = %info.name, error = %e, "not told of its demotion now; its heartbeat will");
            }
        });
    }
    // Promotions are pushed for speed, but what counts is the server
    // reporting its new role and taking its lease: its heartbeat answer
    // carries the same assignment, so a server the coordinator cannot dial
    // (a NAT, a name it cannot resolve) is promoted all the same.
    for (info, role) in changes.iter().filter(|(_, r)| r == "master" || r == "primary") {
        let pushed = match info.kind.as_str() {
            "account" => actions::promote_account(&info.addr, epoch).await,
            _ => actions::set_storage_role(&info.addr, role, epoch, "").await,
        };
        if let Err(e) = pushed {
            tracing::info!(server = %info.name, error = %e, "promotion not pushed; its heartbeat carries it");
        }
        let name = info.name.clone();
        let what = format!("{name} to report itself {role} with a lease");
        wait_until(&what, PHASE_DEADLINE, || async {
            let inner = core.lock().await;
            inner.observed.get(&name).is_some_and(|o| {
                o.report.role == *role && !o.report.fenced && o.report.epoch >= epoch && o.leased
            })
        })
        .await?;
    }
    core.publish().await;
    Ok(op)
}

/// Nothing is mirrored into the lost storage servers until a resync or
/// failback: the surviving site is busy taking their backups.
async fn hold_lost(core: &Arc<Core>, op: Operation) -> Result<Operation, OpError> {
    let p = plan(&op)?.clone();
    let mut inner = core.lock().await;
    let mut cluster = inner.cluster.clone();
    for name in p.homes.keys() {
        if !cluster.held.contains(name) {
            cluster.held.push(name.clone());
        }
    }
    core.save_cluster(&mut inner, cluster)?;
    drop(inner);
    push_links(core).await;
    Ok(op)
}

/// Moves the accounts of each storage server in the plan to its new home,
/// each pair in one account-server transaction.
async fn repoint_homes(core: &Arc<Core>, mut op: Operation) -> Result<Operation, OpError> {
    if plan(&op)?.homes.is_empty() {
        return Ok(op);
    }
    if !plan(&op)?.moved_homes_decided {
        let mut after = core.lock().await.cluster.moved_homes.clone();
        for (from, to) in &plan(&op)?.homes {
            record_move(&mut after, from, to);
        }
        let p = plan_mut(&mut op)?;
        p.moved_homes_after = after;
        p.moved_homes_decided = true;
        op = save(core, op).await?;
    }
    let p = plan(&op)?.clone();
    let deadline = Instant::now() + PHASE_DEADLINE;
    let master = holder(core, "account", "master").await?;
    let returning = op.kind == "failback" && core.config.mode == "active-active";
    for (from, to) in &p.homes {
        let target = server(core, to).await?;
        let retire = p.roles.get(from).is_some_and(|r| r == "replica");
        retry(deadline, || actions::register_storage(&master.addr, &target)).await?;
        let request = MoveHomesRequest {
            from: from.clone(),
            to: to.clone(),
            returning,
            retire,
            ..Default::default()
        };
        let moved = retry(deadline, || actions::move_homes(&master.addr, request.clone())).await?;
        tracing::warn!(%from, %to, moved = moved.moved, "homes moved");
    }
    let mut inner = core.lock().await;
    let mut cluster = inner.cluster.clone();
    cluster.moved_homes = p.moved_homes_after.clone();
    core.save_cluster(&mut inner, cluster)?;
    drop(inner);
    Ok(op)
}

/// The map of moved homes after a move: a move back home ends an entry,
/// any other move starts (or extends) one.
fn record_move(moved: &mut std::collections::HashMap<String, String>, from: &str, to: &str) {
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

/// Sends every mirror its links now (heartbeats would within an interval).
async fn push_links(core: &Arc<Core>) {
    let inner = core.lock().await;
    let links = crate::core::links(&inner.cluster, &inner.servers);
    let mirrors: Vec<ServerInfo> = inner
        .servers
        .values()
        .filter(|s| s.kind == "mirror" && core.healthy(&inner, &s.name))
        .cloned()
        .collect();
    drop(inner);
    for mirror in mirrors {
        let own = links
            .iter()
            .filter(|(m, _)| *m == mirror.name)
            .map(|(_, l)| l.clone())
            .collect();
        if let Err(e) = actions::set_links(&mirror.addr, own).await {
            tracing::info!(mirror = %mirror.name, error = %e, "links not pushed; its heartbeat will carry them");
        }
    }
}

async fn restore_mirroring(core: &Arc<Core>, op: Operation) -> Result<Operation, OpError> {
    push_links(core).await;
    core.publish().await;
    Ok(op)
}

/// Waits until nothing written on the fenced holders is missing on the
/// servers taking over (their writes have stopped: they are fenced).
async fn drain(core: &Arc<Core>, op: Operation) -> Result<Operation, OpError> {
    let p = plan(&op)?.clone();
    for name in &p.fenced {
        let old = server(core, name).await?;
        for (new_name, role) in &p.roles {
            let new = server(core, new_name).await?;
            if new.kind != old.kind || !matches!(role.as_str(), "master" | "primary") {
                continue;
            }
            let what = format!("{} to catch up with {}", new.name, old.name);
            wait_until(&what, PHASE_DEADLINE, || caught_up(&old, &new)).await?;
        }
    }
    Ok(op)
}

/// True when `new` holds everything `old` wrote.
async fn caught_up(old: &ServerInfo, new: &ServerInfo) -> bool {
    if old.kind == "account" {
        let (Ok(o), Ok(n)) = (
            actions::account_status(&old.addr).await,
            actions::account_status(&new.addr).await,
        ) else {
            return false;
        };
        return n.lsn >= o.lsn;
    }
    let Ok(o) = actions::storage_status(&old.addr).await else {
        return false;
    };
    lag_to(&o, new).is_some_and(|lag| lag.records == 0)
}

/// How far `destination` is behind, as its source's status reports the link.
fn lag_to(
    source: &duplex_proto::v1::StorageServerStatus,
    destination: &ServerInfo,
) -> Option<duplex_proto::v1::Lag> {
    source
        .links_out
        .iter()
        .find(|l| l.destination_id == destination.id)
        .and_then(|l| l.lag)
}

/// Waits until every server the failback moves is back and holds the role
/// it was given while it was away.
async fn rejoin(core: &Arc<Core>, op: Operation) -> Result<Operation, OpError> {
    let names: Vec<String> = plan(&op)?.roles.keys().cloned().collect();
    wait_until("the recovered servers to rejoin", REJOIN_DEADLINE, || async {
        let inner = core.lock().await;
        names.iter().all(|n| {
            let assigned = inner.cluster.roles.get(n).cloned().unwrap_or_default();
            core.healthy(&inner, n)
                && inner
                    .observed
                    .get(n)
                    .is_some_and(|o| o.report.role == assigned && o.report.epoch >= inner.cluster.epoch)
        })
    })
    .await?;
    Ok(op)
}

/// Mirrors back into the recovered storage servers (a delta: only what
/// they lack) and waits until they are nearly caught up.
async fn reverse_mirroring(core: &Arc<Core>, op: Operation) -> Result<Operation, OpError> {
    let p = plan(&op)?.clone();
    {
        let mut inner = core.lock().await;
        let mut cluster = inner.cluster.clone();
        cluster.held.retain(|h| !p.roles.contains_key(h));
        core.save_cluster(&mut inner, cluster)?;
    }
    push_links(core).await;
    for (from, to) in &p.homes {
        let (old, new) = (server(core, from).await?, server(core, to).await?);
        let what = format!("{} to be nearly caught up with {}", new.name, old.name);
        wait_until(&what, REJOIN_DEADLINE, || async {
            let Ok(status) = actions::storage_status(&old.addr).await else {
                return false;
            };
            lag_to(&status, &new)
                .is_some_and(|lag| lag.records < SMALL_LAG_RECORDS && lag.bytes < SMALL_LAG_BYTES)
        })
        .await?;
    }
    Ok(op)
}

/// Disables the (enabled) groups of the accounts that move back, so their
/// agents get a clear refusal instead of writing during the switch.
async fn block_backups(core: &Arc<Core>, mut op: Operation) -> Result<Operation, OpError> {
    let deadline = Instant::now() + PHASE_DEADLINE;
    let master = holder(core, "account", "master").await?;
    if plan(&op)?.disabled_groups.is_empty() {
        let homes: Vec<String> = plan(&op)?.homes.keys().cloned().collect();
        let accounts = retry(deadline, || actions::accounts(&master.addr)).await?;
        let enabled = retry(deadline, || actions::enabled_groups(&master.addr)).await?;
        let mut groups: Vec<String> = accounts
            .into_iter()
            .filter(|a| homes.contains(&a.home))
            .map(|a| a.group)
            .filter(|g| enabled.contains(g))
            .collect();
        groups.sort();
        groups.dedup();
        plan_mut(&mut op)?.disabled_groups = groups;
        op = save(core, op).await?;
    }
    for group in plan(&op)?.disabled_groups.clone() {
        retry(deadline, || actions::set_group(&master.addr, &group, false)).await?;
    }
    Ok(op)
}

async fn unblock_backups(core: &Arc<Core>, op: Operation) -> Result<Operation, OpError> {
    let deadline = Instant::now() + PHASE_DEADLINE;
    let master = holder(core, "account", "master").await?;
    for group in plan(&op)?.disabled_groups.clone() {
        retry(deadline, || actions::set_group(&master.addr, &group, true)).await?;
    }
    Ok(op)
}

/// Resync: mirror into every held server again, at the requested rate.
async fn release(core: &Arc<Core>, op: Operation) -> Result<Operation, OpError> {
    let rate = plan(&op)?.rate;
    {
        let mut inner = core.lock().await;
        let mut cluster = inner.cluster.clone();
        cluster.held.clear();
        cluster.rate = rate;
        core.save_cluster(&mut inner, cluster)?;
    }
    push_links(core).await;
    Ok(op)
}

/// The optional integrity check after a failback: every snapshot of every
/// account now homed on a returning server is read back and hashed there.
async fn verify(core: &Arc<Core>, mut op: Operation) -> Result<Operation, OpError> {
    let p = plan(&op)?.clone();
    if !p.verify {
        return Ok(op);
    }
    let deadline = Instant::now() + PHASE_DEADLINE;
    let master = holder(core, "account", "master").await?;
    let accounts = retry(deadline, || actions::accounts(&master.addr)).await?;
    let (mut checked, mut snapshots, mut bad) = (0, 0, Vec::new());
    for home in p.homes.values() {
        let server = server(core, home).await?;
        let ids: Vec<u64> = accounts
            .iter()
            .filter(|a| a.home == *home)
            .map(|a| a.id)
            .collect();
        if ids.is_empty() {
            continue;
        }
        for v in actions::verify_accounts(&server.addr, ids).await? {
            checked += 1;
            snapshots += v.snapshots;
            if v.missing + v.corrupt > 0 {
                let name = accounts
                    .iter()
                    .find(|a| a.id == v.account_id)
                    .map_or("?", |a| a.name.as_str());
                bad.push(format!(
                    "{name} ({} missing, {} corrupt chunks)",
                    v.missing, v.corrupt
                ));
            }
        }
    }
    if !bad.is_empty() {
        return Err(OpError::Invalid(format!(
            "integrity check failed for {}",
            bad.join(", ")
        )));
    }
    op.detail = format!(
        "{}; integrity check: {checked} accounts, {snapshots} snapshots intact",
        op.detail
    );
    Ok(op)
}
