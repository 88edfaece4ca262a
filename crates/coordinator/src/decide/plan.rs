//! Deciding what an operation will do before it starts: which holders
//! move, which standby takes each role, whose leases are fenced, which
//! homes move. The plan is persisted with the operation.

use std::collections::BTreeSet;
use std::time::Duration;

use duplex_types::{Role, ServerKind};

use super::View;
use crate::model::{Member, Plan};
use crate::observed::{LagSample, RecordedLag};

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
    // A holder is demoted only for a server of its kind that takes the
    // role back: one whose returning peer was removed keeps writing.
    let kept: Vec<String> = plan
        .fenced
        .iter()
        .filter(|name| {
            let kind = desired.servers.get(*name).map(|s| s.kind);
            !plan
                .roles
                .iter()
                .any(|(n, r)| r.is_holder() && desired.servers.get(n).map(|s| s.kind) == kind)
        })
        .cloned()
        .collect();
    for name in &kept {
        plan.fenced.remove(name);
        plan.roles.remove(name);
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
/// What this coordinator has not heard itself (it took over after the
/// source died) comes from the recorded lag, aged by the time since.
pub fn too_lossy(view: &View<'_>, plan: &Plan) -> Option<String> {
    let max = view.config.max_lag_on_failover;
    for (name, role) in &plan.roles {
        let Some(server) = view.member(name) else {
            return Some(format!("{name} is not a known server"));
        };
        let source = match role {
            Role::Primary => plan
                .homes
                .iter()
                .find(|(_, to)| *to == name)
                .map(|(from, _)| from)?,
            Role::Master => plan
                .fenced
                .iter()
                .find(|f| view.member(f).is_some_and(|m| m.kind == ServerKind::Account))?,
            _ => continue,
        };
        let behind = heard_behind(view, server, source)
            .map(|(d, _)| d)
            .or_else(|| recorded_behind(view, name, source));
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

/// How far `standby` is behind `source` by what this coordinator heard,
/// and the wall-clock ms it held at: a replica's lag as its source
/// primary reports it, or how long ago a master passed a slave's position.
pub fn heard_behind(view: &View<'_>, standby: &Member, source: &str) -> Option<(Duration, i64)> {
    let seen = |name: &str| view.observed.get(name);
    let duration = |seconds: f64| Duration::from_secs_f64(seconds.max(0.0));
    match standby.kind {
        ServerKind::Storage => {
            let lag = view.observed.outbound_lag(source, &standby.id)?;
            Some((duration(lag.seconds), seen(source)?.wall_ms))
        }
        ServerKind::Account => {
            let own = seen(&standby.name)?;
            let by_history = view
                .observed
                .behind_for(source, own.report.position)
                .zip(seen(source))
                .map(|(d, master)| (d, master.wall_ms.min(own.wall_ms)));
            by_history.or_else(|| own.report.lag.map(|l| (duration(l.seconds), own.wall_ms)))
        }
        _ => None,
    }
}

/// The recorded lag of `standby` behind `source`, plus the time since it
/// was recorded: the source may have taken writes until it stopped.
fn recorded_behind(view: &View<'_>, standby: &str, source: &str) -> Option<Duration> {
    let sample = view.observed.recorded_lag.get(standby)?;
    (sample.source == source).then(|| {
        let since = u64::try_from(view.now_ms - sample.wall_ms).unwrap_or(0);
        Duration::from_millis(sample.lag_ms.saturating_add(since))
    })
}

/// What to record of each standby's lag now: for every storage server a
/// primary mirrors into (a replica, or the other primary in active-active)
/// and every slave behind a master, what was last heard of it.
pub fn lag_samples(view: &View<'_>) -> RecordedLag {
    let desired = view.desired;
    let mut samples = RecordedLag::new();
    for (kind, holder) in [
        (ServerKind::Storage, Role::Primary),
        (ServerKind::Account, Role::Master),
    ] {
        for source in desired.with_role(kind, holder) {
            let standbys = desired
                .servers
                .values()
                .filter(|s| s.kind == kind && s.name != source.name);
            for s in standbys {
                if let Some((lag, wall_ms)) = heard_behind(view, s, &source.name) {
                    samples.insert(
                        s.name.clone(),
                        LagSample {
                            source: source.name.clone(),
                            wall_ms,
                            lag_ms: u64::try_from(lag.as_millis()).unwrap_or(u64::MAX),
                        },
                    );
                }
            }
        }
    }
    samples
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use duplex_types::Mode;
    use tokio::time::Instant;

    use super::*;
    use crate::config::Config;
    use crate::decide::tests::{observed, site_platform, view};
    use crate::observed::Observed;

    fn recorded(source: &str, wall_ms: i64, lag_ms: u64) -> LagSample {
        LagSample {
            source: source.to_owned(),
            wall_ms,
            lag_ms,
        }
    }

    #[test]
    fn lag_recorded_by_an_earlier_coordinator_bounds_a_failover_this_one_never_heard() {
        let d = site_platform();
        let c = Config::new(Mode::ActivePassive);
        let t0 = Instant::now();
        let mut o = observed(&d, t0, &[]);
        // Site a died with the coordinator that heard it: this one took over
        // and has only ever heard site b.
        o.seen.remove("account-a");
        o.seen.remove("storage-a");
        let guard = |o: &Observed| {
            let v = view(&d, o, &c, t0, t0);
            let holders = holders_to_move(&v, "a", false, None);
            let plan = failover(&v, "a", &holders, &BTreeSet::new()).unwrap();
            too_lossy(&v, &plan)
        };
        assert!(guard(&o).unwrap().contains("is unknown"), "{:?}", guard(&o));

        // Recorded 2 s before now (the view's wall clock is 0), 0.1 s behind.
        o.recorded_lag
            .insert("account-b".into(), recorded("account-a", -2_000, 0));
        o.recorded_lag
            .insert("storage-b".into(), recorded("storage-a", -2_000, 100));
        assert_eq!(guard(&o), None);

        // Aged past max_lag_on_failover (30 s): the writes since count too.
        o.recorded_lag
            .insert("storage-b".into(), recorded("storage-a", -40_000, 100));
        assert!(
            guard(&o).unwrap().contains("storage-b is 40.1 s behind"),
            "{:?}",
            guard(&o)
        );

        // A record of lag behind another source says nothing about this one.
        o.recorded_lag
            .insert("storage-b".into(), recorded("storage-c", -1_000, 0));
        assert!(
            guard(&o).unwrap().contains("storage-b is behind is unknown"),
            "{:?}",
            guard(&o)
        );
    }

    #[test]
    fn samples_cover_every_standby_heard_behind_its_source() {
        let d = site_platform();
        let c = Config::new(Mode::ActivePassive);
        let t0 = Instant::now();
        let o = observed(&d, t0, &[]);
        let samples = lag_samples(&view(&d, &o, &c, t0, t0));
        assert_eq!(samples["storage-b"].source, "storage-a");
        assert_eq!(samples["account-b"].source, "account-a");
        assert_eq!(samples.len(), 2, "{samples:?}");
        let encoded = crate::observed::encode_lag(&samples);
        assert_eq!(crate::observed::decode_lag(&encoded), Some(samples));
        assert_eq!(crate::observed::decode_lag(b"[1]"), None);
    }

    #[test]
    fn failback_never_demotes_a_holder_that_nothing_replaces() {
        // After a failover, account-a was removed: account-b must stay the
        // master, while storage-a takes its primary role back.
        let mut d = crate::decide::tests::desired(
            Mode::ActivePassive,
            &[
                ("account-b", Role::Slave),
                ("storage-a", Role::Primary),
                ("storage-b", Role::Replica),
            ],
        );
        d.roles.insert("account-b".into(), Role::Master);
        d.roles.insert("storage-a".into(), Role::Replica);
        d.roles.insert("storage-b".into(), Role::Primary);
        let c = Config::new(Mode::ActivePassive);
        let t0 = Instant::now();
        let o = observed(&d, t0, &[]);
        let plan = failback(&view(&d, &o, &c, t0, t0)).unwrap();
        assert_eq!(plan.roles.get("account-b"), None, "{plan:?}");
        assert!(!plan.fenced.contains("account-b"), "{plan:?}");
        assert_eq!(plan.roles.get("storage-a"), Some(&Role::Primary));
        assert_eq!(plan.roles.get("storage-b"), Some(&Role::Replica));
    }
}
