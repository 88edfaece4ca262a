//! Standbys lost and regained. A replica, slave or mirror that stops
//! heartbeating takes no writes, so nothing fails over; but what it
//! protects has no standby until it returns, and an operator must hear of
//! that as loudly as of a failover. Each change is reported once.

use std::collections::BTreeMap;

use duplex_types::{Role, ServerKind};

use super::View;

/// A standby that went down or came back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub name: String,
    pub up: bool,
    pub detail: String,
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
pub fn changes(view: &View<'_>, known: &mut BTreeMap<String, bool>) -> Vec<Change> {
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
        let before = known.insert(name.clone(), up);
        if before == Some(up) || (before.is_none() && up) {
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
        let mut known = BTreeMap::new();
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
        let back = changes(&view(&d, &all_up, &c, start, now), &mut known);
        let names: Vec<(&str, bool)> = back.iter().map(|c| (c.name.as_str(), c.up)).collect();
        assert_eq!(names, [("mirror-a", true), ("storage-b", true)]);
    }

    #[tokio::test(start_paused = true)]
    async fn holders_are_not_standbys_and_a_silent_start_waits_to_settle() {
        let d = site_platform();
        let c = Config::new(Mode::ActivePassive);
        let start = Instant::now();
        let mut known = BTreeMap::new();
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
}
