//! Deciding what an operation will do, before it starts: the plan is
//! persisted with the operation, so a resumed operation never chooses
//! differently.

use std::collections::BTreeMap;

use duplex_proto::v1::{OperationPlan, ServerInfo};
use tonic::Status;

use crate::core::{Core, Inner};

/// Roles move away from `from_site`. With `lost_only`, only holders that
/// stopped heartbeating move (automatic failover); otherwise every master
/// and primary on the site does (a manual failover or a switchover).
pub fn away_from_site(
    core: &Core,
    inner: &Inner,
    from_site: &str,
    lost_only: bool,
) -> Result<OperationPlan, Status> {
    let mut plan = OperationPlan {
        from_site: from_site.to_owned(),
        epoch: inner.cluster.epoch + 1,
        ..Default::default()
    };
    let holders: Vec<&ServerInfo> = inner
        .servers
        .values()
        .filter(|s| s.site == from_site)
        .filter(|s| matches!(role_of(inner, &s.name), "master" | "primary"))
        .filter(|s| !lost_only || !core.healthy(inner, &s.name))
        .collect();
    if holders.is_empty() {
        return Err(Status::failed_precondition(format!(
            "site {from_site:?} holds no master or primary{}",
            if lost_only { " that is down" } else { "" }
        )));
    }
    for holder in holders {
        let standby = match holder.kind.as_str() {
            "account" => best_slave(core, inner, from_site),
            _ => storage_standby(core, inner, holder),
        }
        .ok_or_else(|| {
            Status::failed_precondition(format!(
                "no healthy {} server outside site {from_site:?} can take over from {}",
                holder.kind, holder.name
            ))
        })?;
        let (up, down) = if holder.kind == "account" {
            ("master", "slave")
        } else {
            ("primary", "replica")
        };
        plan.roles.insert(holder.name.clone(), down.into());
        plan.roles.insert(standby.name.clone(), up.into());
        plan.fenced.push(holder.name.clone());
        if holder.kind == "storage" {
            plan.homes.insert(holder.name.clone(), standby.name.clone());
        }
    }
    Ok(plan)
}

/// Back to the roles every server had when it joined.
pub fn failback(inner: &Inner) -> Result<OperationPlan, Status> {
    let mut plan = OperationPlan {
        epoch: inner.cluster.epoch + 1,
        ..Default::default()
    };
    let moves: BTreeMap<&String, &String> = inner
        .cluster
        .preferred
        .iter()
        .filter(|(name, role)| inner.cluster.roles.get(*name) != Some(*role))
        .collect();
    if moves.is_empty() {
        return Err(Status::failed_precondition(
            "nothing to fail back: every server holds the role it joined with",
        ));
    }
    for (name, role) in &moves {
        plan.roles.insert((*name).clone(), (*role).clone());
        let current = role_of(inner, name);
        if matches!(current, "master" | "primary") && !matches!(role.as_str(), "master" | "primary") {
            plan.fenced.push((*name).clone());
        }
    }
    // Each returning primary takes its accounts back from the primary on
    // another site that holds them now.
    for (name, role) in &moves {
        let Some(returning) = inner.servers.get(*name).filter(|s| s.kind == "storage") else {
            continue;
        };
        if role.as_str() != "primary" {
            continue;
        }
        let holder = inner
            .servers
            .values()
            .filter(|s| s.kind == "storage" && s.site != returning.site)
            .find(|s| role_of(inner, &s.name) == "primary");
        if let Some(holder) = holder {
            plan.homes.insert(holder.name.clone(), returning.name.clone());
        }
        plan.from_site.clone_from(&returning.site);
    }
    Ok(plan)
}

fn role_of<'a>(inner: &'a Inner, name: &str) -> &'a str {
    inner.cluster.roles.get(name).map_or("", String::as_str)
}

/// The healthy slave outside the site with the highest applied LSN.
fn best_slave<'a>(core: &Core, inner: &'a Inner, from_site: &str) -> Option<&'a ServerInfo> {
    inner
        .servers
        .values()
        .filter(|s| s.kind == "account" && s.site != from_site && role_of(inner, &s.name) == "slave")
        .filter(|s| core.healthy(inner, &s.name))
        .max_by_key(|s| inner.observed.get(&s.name).map_or(0, |o| o.report.position))
}

/// The storage server on another site that mirrors `holder`: a replica
/// (active-passive) or the other site's primary (active-active).
fn storage_standby<'a>(core: &Core, inner: &'a Inner, holder: &ServerInfo) -> Option<&'a ServerInfo> {
    inner
        .servers
        .values()
        .filter(|s| s.kind == "storage" && s.site != holder.site)
        // A held server has not been resynced since it came back: it lacks
        // what was written while it was away.
        .filter(|s| !inner.cluster.held.contains(&s.name))
        .filter(|s| core.healthy(inner, &s.name))
        .max_by_key(|s| (role_of(inner, &s.name) == "replica", s.name.clone()))
}

/// The site whose servers hold the roles now: the account master's.
pub fn active_site(inner: &Inner) -> Option<String> {
    inner
        .servers
        .values()
        .find(|s| s.kind == "account" && role_of(inner, &s.name) == "master")
        .or_else(|| {
            inner
                .servers
                .values()
                .find(|s| s.kind == "storage" && role_of(inner, &s.name) == "primary")
        })
        .map(|s| s.site.clone())
}

/// Why an automatic failover with this plan could lose more than `max`
/// seconds of acknowledged writes, if it could: a promoted replica whose
/// mirror lag was too large or never reported, or a promoted slave too far
/// behind. Unknown lag counts as too large.
pub fn too_lossy(inner: &Inner, plan: &OperationPlan, max: f64) -> Option<String> {
    for (name, role) in &plan.roles {
        let server = inner.servers.get(name)?;
        let lag = match role.as_str() {
            "primary" => {
                let holder = plan
                    .homes
                    .iter()
                    .find(|(_, to)| *to == name)
                    .map(|(from, _)| from)?;
                inner
                    .observed
                    .get(holder)
                    .and_then(|o| o.report.outbound.iter().find(|l| l.destination_id == server.id))
                    .and_then(|l| l.lag)
                    .map(|l| l.seconds)
            }
            "master" => inner
                .observed
                .get(name)
                .and_then(|o| o.report.lag)
                .map(|l| l.seconds),
            _ => continue,
        };
        match lag {
            None => {
                return Some(format!(
                    "how far {name} is behind is unknown (no mirroring progress reported)"
                ));
            }
            Some(seconds) if seconds > max => {
                return Some(format!(
                    "{name} was {seconds:.1} s behind, more than max_lag_on_failover ({max:.1} s)"
                ));
            }
            Some(_) => {}
        }
    }
    None
}
