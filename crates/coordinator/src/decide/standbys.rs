//! Standbys and links lost and regained. A replica, slave or mirror that
//! stops heartbeating takes no writes, so nothing fails over; but what it
//! protects has no standby until it returns, and an operator must hear of
//! that as loudly as of a failover. So too a mirroring link that stops
//! copying while its mirror still heartbeats. Each change is reported once.

use std::collections::BTreeMap;
use std::time::Duration;

use duplex_types::{Role, ServerKind};

use tokio::time::Instant;

use super::View;

/// A standby that went down or came back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub name: String,
    pub up: bool,
    pub detail: String,
}

/// What was last told of each standby or link: up or not, and when it was
/// told (None: noted silently, on first sight).
pub type Known = BTreeMap<String, (bool, Option<Instant>)>;

/// How soon after one report about a standby or link the next may follow:
/// one that flaps is told about at this pace, and its state in the end is
/// always told.
pub fn quiet_period(view: &View<'_>) -> Duration {
    (view.config.failover_timeout * 6).max(Duration::from_secs(10))
}

/// Notes `up` for `key`; whether it is news: a loss, or a return after a
/// reported loss, no sooner than [`quiet_period`] after the last news
/// about it. A first sighting up is not news.
fn changed(view: &View<'_>, known: &mut Known, key: &str, up: bool) -> bool {
    match known.get(key) {
        Some((was, _)) if *was == up => false,
        Some((_, Some(told))) if view.now.saturating_duration_since(*told) < quiet_period(view) => false,
        None if up => {
            known.insert(key.to_owned(), (true, None));
            false
        }
        _ => {
            known.insert(key.to_owned(), (up, Some(view.now)));
            true
        }
    }
}

/// Whether `name` is a standby now: a replica, a slave, or a mirror.
fn is_standby(view: &View<'_>, name: &str) -> bool {
    match view.member(name).map(|m| m.kind) {
        Some(ServerKind::Mirror) => true,
        Some(ServerKind::Coordinator) | None => false,
        Some(_) => matches!(view.desired.role(name), Some(Role::Replica | Role::Slave)),
    }
}

/// Compares each standby's health with what was last reported (`known`,
/// updated in place) and returns the changes to record. A standby first
/// seen healthy is just noted; one never heard from is reported lost only
/// once the coordinator has waited long enough to know.
pub fn changes(view: &View<'_>, known: &mut Known) -> Vec<Change> {
    known.retain(|name, _| is_standby(view, name));
    let mut out = Vec::new();
    for (name, member) in &view.desired.servers {
        if !is_standby(view, name) {
            continue;
        }
        let up = if view.healthy(name) {
            true
        } else if view.lost(name) {
            false
        } else {
            // Silent, but not yet for the failover timeout: a blip.
            continue;
        };
        if !changed(view, known, name, up) {
            continue;
        }
        let what = match view.desired.role(name) {
            Some(role) => role.as_str().to_owned(),
            None => "mirror".to_owned(),
        };
        let detail = if up {
            format!("{what} {name} (site {}) is heartbeating again", member.site)
        } else {
            format!(
                "{what} {name} (site {}) stopped heartbeating: what it protects has no standby until it returns",
                member.site
            )
        };
        out.push(Change {
            name: name.clone(),
            up,
            detail,
        });
    }
    out
}

/// How long a link may fail before it is reported lost: a destination
/// restarting, a failover re-pointing links, pass within it.
pub fn link_grace(view: &View<'_>) -> Duration {
    (view.config.failover_timeout * 2).max(Duration::from_secs(3))
}

/// Like [`changes`], for the links the coordinator assigned: one failing
/// for [`link_grace`] is lost, one running again is regained. A link whose
/// mirror is not heartbeating is left as it was: the mirror's own loss is
/// what is reported then.
pub fn link_changes(view: &View<'_>, known: &mut Known) -> Vec<Change> {
    let name_of = |addr: &str| {
        view.desired
            .servers
            .values()
            .find(|m| m.addr == addr)
            .map_or_else(|| addr.to_owned(), |m| m.name.clone())
    };
    let assigned: Vec<(String, String, String, String)> = super::roles::links(view.desired)
        .into_iter()
        .map(|(mirror, spec)| {
            let key = format!("{} -> {}", name_of(&spec.source), name_of(&spec.destination));
            (key, mirror, spec.source, spec.destination)
        })
        .collect();
    known.retain(|key, _| assigned.iter().any(|(k, ..)| k == key));
    let mut out = Vec::new();
    for (key, mirror, source, destination) in assigned {
        if !view.healthy(&mirror) {
            continue;
        }
        let Some(health) = view.observed.seen.get(&mirror).and_then(|s| {
            s.report
                .link_health
                .iter()
                .find(|h| h.source == source && h.destination == destination)
        }) else {
            continue;
        };
        let up = health.failing_for.is_zero();
        // A retry or two within the grace is not a loss yet.
        if !up && health.failing_for < link_grace(view) {
            continue;
        }
        if !changed(view, known, &key, up) {
            continue;
        }
        let detail = if up {
            format!("link {key} (run by {mirror}) is copying again")
        } else {
            format!(
                "link {key} (run by {mirror}) has not copied for {} s: {}; nothing reaches the destination until it recovers",
                health.failing_for.as_secs(),
                health.state
            )
        };
        out.push(Change {
            name: key,
            up,
            detail,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use duplex_types::Mode;
    use tokio::time::Instant;

    use super::*;
    use crate::config::Config;
    use crate::decide::tests::{observed, site_platform, view};

    #[tokio::test(start_paused = true)]
    async fn a_standby_lost_and_regained_is_reported_once_each_way() {
        let d = site_platform();
        let c = Config::new(Mode::ActivePassive);
        let start = Instant::now();
        tokio::time::advance(Duration::from_secs(10)).await;
        let mut known = Known::new();
        let now = Instant::now();
        let all_up = observed(&d, now, &[]);
        assert!(changes(&view(&d, &all_up, &c, start, now), &mut known).is_empty());
        // A blip shorter than the failover timeout is not a loss.
        let blip = observed(&d, now, &[("storage-b", now - Duration::from_millis(500))]);
        assert!(changes(&view(&d, &blip, &c, start, now), &mut known).is_empty());
        let lost = observed(
            &d,
            now,
            &[
                ("storage-b", now - Duration::from_secs(5)),
                ("mirror-a", now - Duration::from_secs(5)),
            ],
        );
        let found = changes(&view(&d, &lost, &c, start, now), &mut known);
        let names: Vec<(&str, bool)> = found.iter().map(|c| (c.name.as_str(), c.up)).collect();
        assert_eq!(names, [("mirror-a", false), ("storage-b", false)]);
        assert!(
            found[1]
                .detail
                .contains("replica storage-b (site b) stopped heartbeating"),
            "{found:?}"
        );
        assert!(changes(&view(&d, &lost, &c, start, now), &mut known).is_empty());
        // Back at once is a flap: told no sooner than the quiet period
        // after the loss, and then told.
        assert!(changes(&view(&d, &all_up, &c, start, now), &mut known).is_empty());
        tokio::time::advance(Duration::from_secs(10)).await;
        let later = Instant::now();
        let all_up = observed(&d, later, &[]);
        let back = changes(&view(&d, &all_up, &c, start, later), &mut known);
        let names: Vec<(&str, bool)> = back.iter().map(|c| (c.name.as_str(), c.up)).collect();
        assert_eq!(names, [("mirror-a", true), ("storage-b", true)]);
    }

    #[tokio::test(start_paused = true)]
    async fn holders_are_not_standbys_and_a_silent_start_waits_to_settle() {
        let d = site_platform();
        let c = Config::new(Mode::ActivePassive);
        let start = Instant::now();
        let mut known = Known::new();
        // A primary's loss is the failover's business, not this report's.
        let now = Instant::now();
        let primary_down = observed(&d, now, &[("storage-a", now - Duration::from_secs(60))]);
        assert!(changes(&view(&d, &primary_down, &c, start, now), &mut known).is_empty());
        // Never heard from, just after a coordinator start: not yet known.
        let mut silent = observed(&d, now, &[]);
        silent.seen.remove("account-b");
        assert!(changes(&view(&d, &silent, &c, start, now), &mut known).is_empty());
        tokio::time::advance(Duration::from_secs(10)).await;
        let later = Instant::now();
        let mut silent = observed(&d, later, &[]);
        silent.seen.remove("account-b");
        let found = changes(&view(&d, &silent, &c, start, later), &mut known);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].name.as_str(), found[0].up), ("account-b", false));
    }

    fn link_health(o: &mut crate::observed::Observed, d: &crate::model::Desired, failing_ms: u64) {
        let (mirror, spec) = crate::decide::roles::links(d).remove(0);
        let seen = o.seen.get_mut(&mirror).expect("mirror seen");
        seen.report.link_health = vec![crate::model::LinkHealth {
            source: spec.source,
            destination: spec.destination,
            failing_for: Duration::from_millis(failing_ms),
            state: if failing_ms == 0 {
                "running".into()
            } else {
                "error: destination down".into()
            },
        }];
    }

    #[tokio::test(start_paused = true)]
    async fn a_link_failing_past_its_grace_is_lost_and_then_regained() {
        let d = site_platform();
        let c = Config::new(Mode::ActivePassive);
        let start = Instant::now();
        tokio::time::advance(Duration::from_secs(10)).await;
        let now = Instant::now();
        let mut known = Known::new();
        let mut o = observed(&d, now, &[]);
        link_health(&mut o, &d, 0);
        assert!(link_changes(&view(&d, &o, &c, start, now), &mut known).is_empty());
        // A retry or two is not a loss.
        link_health(&mut o, &d, 1_000);
        assert!(link_changes(&view(&d, &o, &c, start, now), &mut known).is_empty());
        link_health(&mut o, &d, 10_000);
        let lost = link_changes(&view(&d, &o, &c, start, now), &mut known);
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert_eq!(lost[0].name, "storage-a -> storage-b");
        assert!(!lost[0].up);
        assert!(lost[0].detail.contains("error: destination down"), "{lost:?}");
        assert!(link_changes(&view(&d, &o, &c, start, now), &mut known).is_empty());
        link_health(&mut o, &d, 0);
        assert!(link_changes(&view(&d, &o, &c, start, now), &mut known).is_empty());
        tokio::time::advance(Duration::from_secs(10)).await;
        let later = Instant::now();
        let mut o = observed(&d, later, &[]);
        link_health(&mut o, &d, 0);
        let back = link_changes(&view(&d, &o, &c, start, later), &mut known);
        assert_eq!((back.len(), back[0].up), (1, true), "{back:?}");
    }
}
