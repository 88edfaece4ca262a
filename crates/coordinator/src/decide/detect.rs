//! The failure detector's decision: whether a master or primary is lost,
//! and what to do about it given what is already running. A blip shorter
//! than the failover timeout changes nothing; a lost holder is never left
//! waiting behind an operation that cannot finish without it.

use std::collections::BTreeSet;

use duplex_types::{OperationKind, Phase, Role};

use super::View;
use super::plan;
use crate::model::{Op, Plan};

#[derive(Debug, PartialEq)]
pub enum Detection {
    Nothing,
    /// Start a failover now.
    Start {
        plan: Plan,
        detail: String,
    },
    /// A failover that must not run now; `key` tells refusals apart, so
    /// history records each distinct refusal once.
    Refused {
        key: String,
        detail: String,
    },
    /// The running failover takes these moves too, and fences again.
    Fold {
        plan: Plan,
        detail: String,
    },
    /// The running operation cannot finish without a lost holder: stop it
    /// where it waits (undoing what must not stay), then detect again.
    Preempt {
        reason: String,
    },
}

/// Holders that are lost, except servers the running operation is making
/// holders (its phases watch those).
fn lost_holders(view: &View<'_>) -> Vec<(String, String)> {
    let desired = view.desired;
    let promoting: BTreeSet<&String> = desired
        .running()
        .map(|op| {
            op.plan
                .roles
                .iter()
                .filter(|(_, r)| r.is_holder())
                .map(|(n, _)| n)
                .collect()
        })
        .unwrap_or_default();
    desired
        .servers
        .values()
        .filter(|s| desired.role(&s.name).is_some_and(Role::is_holder))
        .filter(|s| !promoting.contains(&s.name) && view.lost(&s.name))
        .map(|s| (s.name.clone(), s.site.clone()))
        .collect()
}

pub fn detect(view: &View<'_>) -> Detection {
    if !view.config.auto_failover || !view.settled() {
        return Detection::Nothing;
    }
    let lost = lost_holders(view);
    let Some((name, site)) = lost.first().cloned() else {
        return Detection::Nothing;
    };
    match view.desired.running() {
        None => start(view, &name, &site),
        Some(op) => during(view, op, &lost),
    }
}

fn start(view: &View<'_>, name: &str, site: &str) -> Detection {
    let holders = plan::holders_to_move(view, site, true, None);
    let refused = |why: String| Detection::Refused {
        key: format!("{name}: {why}"),
        detail: format!(
            "{name} is down but is not failed over automatically: {why}; it will be as soon as that \
             changes, or `duplexctl failover --site {site} --force` accepts the loss now"
        ),
    };
    let plan = match plan::failover(view, site, &holders, &BTreeSet::new()) {
        Ok(plan) => plan,
        Err(why) => return refused(why),
    };
    if let Some(why) = plan::too_lossy(view, &plan) {
        return refused(why);
    }
    let names: Vec<&str> = holders.iter().map(|h| h.name.as_str()).collect();
    Detection::Start {
        detail: format!(
            "{} missed heartbeats for {:?}: automatic failover of site {site}",
            names.join(" and "),
            view.config.failover_timeout
        ),
        plan,
    }
}

/// A holder lost while an operation runs.
fn during(view: &View<'_>, op: &Op, lost: &[(String, String)]) -> Detection {
    if op.kind == OperationKind::Failover {
        let new: Vec<&(String, String)> = lost
            .iter()
            .filter(|(n, s)| *s == op.plan.from_site && !op.plan.fenced.contains(n))
            .collect();
        if let Some((name, site)) = new.first() {
            let holders: Vec<_> = plan::holders_to_move(view, site, true, None)
                .into_iter()
                .filter(|h| !op.plan.fenced.contains(&h.name))
                .collect();
            let taken: BTreeSet<String> = op.plan.roles.keys().cloned().collect();
            // What is folded in passes the same guard as a failover of its
            // own: the operator who forced the running one did not force this.
            let plan = plan::failover(view, site, &holders, &taken).and_then(|plan| {
                match plan::too_lossy(view, &plan) {
                    Some(why) if !op.forced => Err(why),
                    _ => Ok(plan),
                }
            });
            return match plan {
                Ok(plan) => Detection::Fold {
                    detail: format!("{name} was lost during the failover: it moves in the same operation"),
                    plan,
                },
                Err(why) => Detection::Refused {
                    key: format!("{name}: {why}"),
                    detail: format!(
                        "{name} was lost during a failover but is not moved automatically: {why}; it will be \
                         as soon as that changes, or `duplexctl failover --site {site} --force` accepts the loss"
                    ),
                },
            };
        }
        // A loss elsewhere waits for this failover: it is short and bounded.
        return Detection::Nothing;
    }
    let waiting = op.current().is_none_or(Phase::cancellable);
    if !waiting {
        return Detection::Nothing;
    }
    let names: Vec<&str> = lost.iter().map(|(n, _)| n.as_str()).collect();
    Detection::Preempt {
        reason: format!(
            "{} lost while the {} waited; failing over first",
            names.join(" and "),
            op.kind
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use duplex_types::{Mode, Role};
    use tokio::time::Instant;

    use super::*;
    use crate::config::Config;
    use crate::decide::tests::{observed, seen, site_platform, view};
    use crate::model::Lag;
    use crate::observed::Observed;

    #[tokio::test(start_paused = true)]
    async fn a_whole_site_is_one_failover_moving_both_kinds() {
        let d = site_platform();
        let c = Config::new(Mode::ActivePassive);
        let start = Instant::now();
        tokio::time::advance(Duration::from_secs(10)).await;
        let now = Instant::now();
        // storage-a silent for 1.6 s, account-a for 1.0 s (it died a beat later).
        let o = observed(
            &d,
            now,
            &[
                ("storage-a", now - Duration::from_millis(1600)),
                ("account-a", now - Duration::from_millis(1000)),
            ],
        );
        let Detection::Start { plan, .. } = detect(&view(&d, &o, &c, start, now)) else {
            panic!("expected a failover");
        };
        assert_eq!(plan.roles.get("account-b"), Some(&Role::Master));
        assert_eq!(plan.roles.get("storage-b"), Some(&Role::Primary));
        assert_eq!(plan.fenced.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_blip_changes_nothing_and_a_lagging_standby_is_refused() {
        let d = site_platform();
        let c = Config::new(Mode::ActivePassive);
        let start = Instant::now();
        tokio::time::advance(Duration::from_secs(10)).await;
        let now = Instant::now();
        let o = observed(&d, now, &[("storage-a", now - Duration::from_millis(1200))]);
        assert_eq!(detect(&view(&d, &o, &c, start, now)), Detection::Nothing);
        let mut o = observed(&d, now, &[("storage-a", now - Duration::from_millis(2000))]);
        let id = d.servers["storage-b"].id.clone();
        if let Some(s) = o.seen.get_mut("storage-a") {
            s.report.outbound.insert(
                id,
                Some(Lag {
                    seconds: 100.0,
                    ..Lag::default()
                }),
            );
        }
        assert!(matches!(
            detect(&view(&d, &o, &c, start, now)),
            Detection::Refused { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slave_missing_writes_of_a_lost_master_is_refused_until_it_has_them() {
        let d = site_platform();
        let c = Config::new(Mode::ActivePassive);
        let start = Instant::now();
        let mut o = Observed::default();
        // The master moves from 10 to 500 over 60 s; the slave stays at 10.
        for (i, pos) in [10u64, 100, 500].iter().enumerate() {
            tokio::time::advance(Duration::from_secs(30 * i as u64)).await;
            o.record(seen(&d, "account-a", Instant::now(), *pos));
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        let now = Instant::now();
        for name in ["account-b", "storage-a", "storage-b", "mirror-a", "mirror-b"] {
            o.record(seen(&d, name, now, 10));
        }
        assert!(matches!(
            detect(&view(&d, &o, &c, start, now)),
            Detection::Refused { .. }
        ));
        // The slave catches up (it was only cut off): now it is safe.
        o.record(seen(&d, "account-b", now, 500));
        assert!(matches!(
            detect(&view(&d, &o, &c, start, now)),
            Detection::Start { .. }
        ));
    }
}
