//! Every decision of the coordinator, as pure functions of what it wants
//! (`Desired`), what it has seen (`Observed`) and the time. Nothing here
//! does I/O, takes a lock or reads a clock, so each rule is unit-tested
//! directly and the same rules drive the real engine and the simulation.

pub mod detect;
pub mod phase;
pub mod plan;
pub mod roles;

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

    use crate::model::{Desired, Member};

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
}
