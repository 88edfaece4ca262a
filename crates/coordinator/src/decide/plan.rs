//! Deciding what an operation will do before it starts: which holders
//! move, which standby takes each role, whose leases are fenced, which
//! homes move. The plan is persisted with the operation.

use std::collections::BTreeSet;

use duplex_types::{Role, ServerKind};

use super::View;
use crate::model::{Member, Plan};

/// Holders of `site` whose roles a failover moves. With `lost_only`, only
/// holders that are lost, and those silent long enough to be suspect once
/// one of them is lost (a site usually dies as a whole); otherwise every
/// holder of the site (a manual failover or a switchover).
pub fn holders_to_move<'a>(
    view: &View<'a>,
    site: &str,
    lost_only: bool,
    kind: Option<ServerKind>,
) -> Vec<&'a Member> {
    let desired = view.desired;
    let on_site: Vec<&Member> = desired
        .servers
        .values()
        .filter(|s| s.site == site && kind.is_none_or(|k| k == s.kind))
        .filter(|s| desired.role(&s.name).is_some_and(Role::is_holder))
        .collect();
    if !lost_only {
        return on_site;
    }
    if !on_site.iter().any(|s| view.lost(&s.name)) {
        return Vec::new();
    }
    on_site.into_iter().filter(|s| view.suspect(&s.name)).collect()
}

/// Roles move away from `site`: each holder in `holders` to the best
/// standby on another site. Servers in `taken` are not chosen.
pub fn failover(
    view: &View<'_>,
    site: &str,
    holders: &[&Member],
    taken: &BTreeSet<String>,
) -> Result<Plan, String> {
    if holders.is_empty() {
        return Err(format!("site {site:?} holds no master or primary to move"));
    }
    let mut plan = Plan {
        from_site: site.to_owned(),
        ..Plan::default()
    };
    let mut chosen = taken.clone();
    for holder in holders {
        let standby = match holder.kind {
            ServerKind::Account => best_slave(view, site, &chosen),
            _ => storage_standby(view, holder, &chosen),
        }
        .ok_or_else(|| {
            format!(
                "no healthy {} server outside site {site:?} can take over from {}",
                holder.kind, holder.name
            )
        })?;
        let (Some(up), Some(down)) = (Role::holder_of(holder.kind), Role::standby_of(holder.kind)) else {
            continue;
        };
        chosen.insert(standby.name.clone());
        plan.roles.insert(holder.name.clone(), down);
        plan.roles.insert(standby.name.clone(), up);
        plan.fenced.insert(holder.name.clone());
        if holder.kind == ServerKind::Storage {
            plan.homes.insert(holder.name.clone(), standby.name.clone());
        }
    }
    Ok(plan)
}

/// The healthy slave outside the site with the highest applied position.
fn best_slave<'a>(view: &View<'a>, site: &str, taken: &BTreeSet<String>) -> Option<&'a Member> {
    view.desired
        .with_role(ServerKind::Account, Role::Slave)
        .filter(|s| s.site != site && !taken.contains(&s.name) && view.healthy(&s.name))
        .max_by_key(|s| {
            (
                view.observed.get(&s.name).map_or(0, |o| o.report.position),
                std::cmp::Reverse(s.name.clone()),
            )
        })
}

/// The storage server on another site that mirrors `holder` and lags it
/// least: a replica (active-passive) or the other site's primary
/// (active-active). A held server has not been resynced since it came
/// back, so it lacks what was written meanwhile: never chosen.
fn storage_standby<'a>(view: &View<'a>, holder: &Member, taken: &BTreeSet<String>) -> Option<&'a Member> {
    let desired = view.desired;
    desired
        .servers
        .values()
        .filter(|s| s.kind == ServerKind::Storage && s.site != holder.site)
        .filter(|s| !desired.held.contains(&s.name) && view.healthy(&s.name))
        .filter(|s| !taken.contains(&s.name) || desired.role(&s.name) == Some(Role::Primary))
        .min_by(|a, b| {
            let rank = |s: &Member| {
                let replica = desired.role(&s.name) == Some(Role::Replica);
                let lag = view
                    .observed
                    .outbound_lag(&holder.name, &s.id)
                    .map_or(u64::MAX, |l| l.records);
                (!replica, lag, s.name.clone())
            };
            rank(a).cmp(&rank(b))
        })
}

/// Back to the roles every server joined with (or inherited from the
/// server it replaces).
pub fn failback(view: &View<'_>) -> Result<Plan, String> {
    let desired = view.desired;
    let mut plan = Plan::default();
    for (name, preferred) in &desired.preferred {
        if desired.servers.contains_key(name) && desired.role(name) != Some(*preferred) {
            plan.roles.insert(name.clone(), *preferred);
            if desired.role(name).is_some_and(Role::is_holder) && !preferred.is_holder() {
                plan.fenced.insert(name.clone());
            }
        }
    }
    if plan.roles.is_empty() {
        return Err("nothing to fail back: every server holds the role it joined with".into());
    }
    // Each returning primary takes its accounts back from the primary on
    // another site that holds them now.
    for (name, role) in &plan.roles {
        let Some(returning) = desired
            .servers
            .get(name)
            .filter(|s| s.kind == ServerKind::Storage)
        else {
            continue;
        };
        if *role != Role::Primary {
            continue;
        }
        if let Some(holder) = desired
            .with_role(ServerKind::Storage, Role::Primary)
            .find(|s| s.site != returning.site)
        {
            plan.homes.insert(holder.name.clone(), returning.name.clone());
        }
        if let Some(old) = desired.replaces.get(name) {
            plan.previous_names.insert(name.clone(), old.clone());
        }
        plan.from_site.clone_from(&returning.site);
    }
    if plan.from_site.is_empty()
        && let Some(first) = plan.roles.keys().next().and_then(|n| desired.servers.get(n))
    {
        plan.from_site.clone_from(&first.site);
    }
    Ok(plan)
}

/// The site whose servers hold the roles now: the account master's.
pub fn active_site(view: &View<'_>) -> Option<String> {
    let desired = view.desired;
    desired
        .master()
        .or_else(|| desired.with_role(ServerKind::Storage, Role::Primary).next())
        .map(|s| s.site.clone())
}

/// Why failing over with this plan could lose more than
/// `max_lag_on_failover` of acknowledged writes, if it could: a promoted
/// replica whose mirror lag was too large or never reported, or a promoted
/// slave too far behind the lost master. Unknown lag counts as too large.
pub fn too_lossy(view: &View<'_>, plan: &Plan) -> Option<String> {
    let max = view.config.max_lag_on_failover;
    for (name, role) in &plan.roles {
        let Some(server) = view.member(name) else {
            return Some(format!("{name} is not a known server"));
        };
        let behind = match role {
            Role::Primary => {
                let holder = plan
                    .homes
                    .iter()
                    .find(|(_, to)| *to == name)
                    .map(|(from, _)| from)?;
                view.observed
                    .outbound_lag(holder, &server.id)
                    .map(|l| std::time::Duration::from_secs_f64(l.seconds.max(0.0)))
            }
            Role::Master => {
                let old = plan
                    .fenced
                    .iter()
                    .find(|f| view.member(f).is_some_and(|m| m.kind == ServerKind::Account))?;
                let position = view.observed.get(name).map(|o| o.report.position);
                let by_history = position.and_then(|p| view.observed.behind_for(old, p));
                let reported = view
                    .observed
                    .get(name)
                    .and_then(|o| o.report.lag)
                    .map(|l| std::time::Duration::from_secs_f64(l.seconds.max(0.0)));
                by_history.or(reported)
            }
            _ => continue,
        };
        match behind {
            None => return Some(format!("how far {name} is behind is unknown")),
            Some(d) if d > max => {
                return Some(format!(
                    "{name} is {:.1} s behind, more than max_lag_on_failover ({:.1} s)",
                    d.as_secs_f64(),
                    max.as_secs_f64()
                ));
            }
            Some(_) => {}
        }
    }
    None
}
