//! Every decision of the coordinator, as pure functions of what it wants
//! (`Desired`), what it has seen (`Observed`) and the time. Nothing here
//! does I/O, takes a lock or reads a clock, so each rule is unit-tested
//! directly and the same rules drive the real engine and the simulation.

pub mod detect;
pub mod phase;
pub mod plan;
pub mod roles;
pub mod standbys;

use tokio::time::Instant;

use crate::config::Config;
use crate::model::{Desired, Member};
use crate::observed::Observed;

/// The state a decision reads.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub desired: &'a Desired,
    pub observed: &'a Observed,
    pub config: &'a Config,
    pub now: Instant,
    /// Wall-clock ms at `now`.
    pub now_ms: i64,
    /// When this coordinator started: what it granted before is unknown.
    pub started: Instant,
}

impl<'a> View<'a> {
    pub fn healthy(&self, name: &str) -> bool {
        self.observed
            .healthy(name, self.now, self.config.failover_timeout)
    }

    /// Silent for the failover timeout (or never heard from since the
    /// coordinator started, once it has waited long enough to know).
    pub fn lost(&self, name: &str) -> bool {
        match self.observed.silent_for(name, self.now) {
            Some(d) => d >= self.config.failover_timeout,
            None => self.settled(),
        }
    }

    /// Silent long enough to be taken along with a lost server of its site.
    pub fn suspect(&self, name: &str) -> bool {
        match self.observed.silent_for(name, self.now) {
            Some(d) => d >= self.config.suspect_after(),
            None => self.settled(),
        }
    }

    /// A restarted coordinator first waits for every server to report.
    pub fn settled(&self) -> bool {
        self.now.saturating_duration_since(self.started)
            >= self.config.failover_timeout + self.config.heartbeat_interval * 2
    }

    pub fn member(&self, name: &str) -> Option<&'a Member> {
        self.desired.servers.get(name)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use duplex_types::{Mode, Role, ServerKind};
    use tokio::time::Instant;

    use super::View;
    use crate::config::Config;
    use crate::model::{Desired, Lag, Member, Report};
    use crate::observed::{Observed, Seen};

    /// A server named KIND-SITE (`storage-a`, `account-b2`, `mirror-a`).
    pub fn member(name: &str) -> Member {
        let (kind, rest) = name.split_once('-').unwrap_or((name, "a"));
        Member {
            id: format!("id-{name}"),
            name: name.to_owned(),
            site: rest.chars().take(1).collect(),
            kind: kind.parse().unwrap_or(ServerKind::Mirror),
            addr: format!("http://{name}"),
            public_addr: String::new(),
        }
    }

    /// Both sites' mirrors, plus the named servers with their roles.
    pub fn desired(mode: Mode, roles: &[(&str, Role)]) -> Desired {
        let mut d = Desired::new(mode);
        for name in ["mirror-a", "mirror-b"] {
            d.servers.insert(name.to_owned(), member(name));
        }
        for (name, role) in roles {
            d.servers.insert((*name).to_owned(), member(name));
            d.roles.insert((*name).to_owned(), *role);
            d.preferred.insert((*name).to_owned(), *role);
        }
        d
    }

    pub fn seen(d: &Desired, name: &str, at: Instant, position: u64) -> Seen {
        let member = d.servers[name].clone();
        Seen {
            report: Report {
                role: d.role(name).unwrap_or(Role::Running),
                member,
                epoch: d.epoch,
                lag: None,
                outbound: Default::default(),
                fenced: false,
                position,
                links: Vec::new(),
                degraded: false,
                divergent_entries: 0,
                divergence_report: String::new(),
                link_health: Vec::new(),
            },
            at,
            wall_ms: 0,
            granted_at: None,
            leased: false,
        }
    }

    pub fn site_platform() -> Desired {
        desired(
            Mode::ActivePassive,
            &[
                ("account-a", Role::Master),
                ("account-b", Role::Slave),
                ("storage-a", Role::Primary),
                ("storage-b", Role::Replica),
            ],
        )
    }

    /// Every server heard at `t0` except those in `silent_since`.
    pub fn observed(d: &Desired, t0: Instant, silent_since: &[(&str, Instant)]) -> Observed {
        let mut o = Observed::default();
        for name in d.servers.keys() {
            let at = silent_since
                .iter()
                .find(|(n, _)| n == name)
                .map_or(t0, |(_, t)| *t);
            o.record(seen(d, name, at, 10));
        }
        let a_id = d.servers["storage-b"].id.clone();
        if let Some(s) = o.seen.get_mut("storage-a") {
            s.report.outbound.insert(a_id, Some(Lag::default()));
        }
        o
    }

    pub fn view<'a>(
        d: &'a Desired,
        o: &'a Observed,
        c: &'a Config,
        started: Instant,
        now: Instant,
    ) -> View<'a> {
        View {
            desired: d,
            observed: o,
            config: c,
            now,
            now_ms: 0,
            started,
        }
    }
}
