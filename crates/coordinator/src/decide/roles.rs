//! The rules every heartbeat runs through: which role a newcomer gets,
//! what each server is told to be, who holds a write lease, and which
//! mirroring links run.

use duplex_proto::v1::{Assignment, LinkSpec};
use duplex_types::{Mode, Role, ServerKind};

use super::View;
use crate::model::{Desired, Member};

/// The role a newcomer gets: the one it reports, unless that would make a
/// second master (or a second primary for the same accounts).
pub fn adopted(desired: &Desired, member: &Member, reported: Role) -> Option<Role> {
    let taken = |role: Role, same_site_only: bool| {
        desired
            .with_role(member.kind, role)
            .any(|m| !same_site_only || m.site == member.site)
    };
    match (member.kind, reported) {
        (ServerKind::Account, Role::Master) if !taken(Role::Master, false) => Some(Role::Master),
        (ServerKind::Account, _) => Some(Role::Slave),
        (ServerKind::Storage, Role::Primary) if !taken(Role::Primary, desired.mode == Mode::ActiveActive) => {
            Some(Role::Primary)
        }
        (ServerKind::Storage, _) => Some(Role::Replica),
        _ => None,
    }
}

/// A master / primary gets a lease only once it reports the role it was
/// assigned, and never once a running operation has started fencing it.
pub fn lease_for(desired: &Desired, name: &str, reported: Role) -> bool {
    let Some(assigned) = desired.role(name) else {
        return false;
    };
    let fencing = desired
        .running()
        .is_some_and(|op| op.plan.fence_until_ms != 0 && op.plan.fenced.contains(name));
    assigned.is_holder() && assigned == reported && !fencing && !desired.held.contains(name)
}

/// What a server must be: its role at the cluster epoch, whom it follows,
/// and for a mirror the links it runs.
pub fn assignment(view: &View<'_>, member: &Member) -> Option<Assignment> {
    let desired = view.desired;
    let epoch = desired.epoch;
    if member.kind == ServerKind::Mirror {
        let links = links(desired)
            .into_iter()
            .filter(|(m, _)| *m == member.name)
            .map(|(_, l)| l)
            .collect();
        return Some(Assignment {
            role: Role::Running.as_str().to_owned(),
            epoch,
            leader: String::new(),
            links,
            unmirrored: false,
        });
    }
    let role = desired.role(&member.name)?;
    let leader = match role {
        Role::Slave => desired.master().map(|m| m.addr.clone()),
        Role::Replica => desired
            .with_role(ServerKind::Storage, Role::Primary)
            .find(|p| p.site != member.site)
            .map(|p| p.addr.clone()),
        _ => None,
    }
    .unwrap_or_default();
    let unmirrored = match role {
        // A master with no slave up must not wait for one on each write.
        Role::Master => !desired
            .servers
            .values()
            .any(|s| s.kind == ServerKind::Account && s.name != member.name && view.healthy(&s.name)),
        Role::Primary => !links(desired).iter().any(|(_, l)| l.source == member.addr),
        _ => false,
    };
    Some(Assignment {
        role: role.as_str().to_owned(),
        epoch,
        leader,
        links: Vec::new(),
        unmirrored,
    })
}

/// The mirroring links the roles call for, each with the mirror that runs
/// it (the one on the destination's site): every primary to every storage
/// server on another site, except servers held until a resync.
pub fn links(desired: &Desired) -> Vec<(String, LinkSpec)> {
    let storage: Vec<&Member> = desired
        .servers
        .values()
        .filter(|s| s.kind == ServerKind::Storage)
        .collect();
    let mirrors: Vec<&Member> = desired
        .servers
        .values()
        .filter(|s| s.kind == ServerKind::Mirror)
        .collect();
    let mut out = Vec::new();
    for p in desired.with_role(ServerKind::Storage, Role::Primary) {
        for d in storage.iter().filter(|d| d.site != p.site) {
            if desired.held.contains(&d.name) {
                continue;
            }
            let Some(mirror) = mirrors
                .iter()
                .find(|m| m.site == d.site)
                .or_else(|| mirrors.first())
            else {
                continue;
            };
            out.push((
                mirror.name.clone(),
                LinkSpec {
                    source: p.addr.clone(),
                    destination: d.addr.clone(),
                    rate: desired.rate,
                },
            ));
        }
    }
    out
}

/// What an operator should know now, in words.
pub fn warnings(view: &View<'_>) -> Vec<String> {
    let desired = view.desired;
    let mut out = Vec::new();
    for name in &desired.held {
        let up = if view.healthy(name) { "up" } else { "down" };
        out.push(format!(
            "{name} is held ({up}): nothing is mirrored into it until `duplexctl resync` or `duplexctl failback`"
        ));
    }
    let links = links(desired);
    for p in desired.with_role(ServerKind::Storage, Role::Primary) {
        if !links.iter().any(|(_, l)| l.source == p.addr) {
            out.push(format!(
                "{} is primary but no storage server mirrors it: its backups exist on one site only",
                p.name
            ));
        }
    }
    if let super::detect::Detection::Refused { detail, .. } = super::detect::detect(view) {
        out.push(detail);
    }
    for group in &desired.groups_to_enable {
        out.push(format!(
            "group {group} was disabled by an operation and is waiting to be enabled again"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::tests::{desired, member};

    fn named(links: Vec<(String, LinkSpec)>) -> Vec<(String, String, String)> {
        links
            .into_iter()
            .map(|(m, l)| (m, l.source, l.destination))
            .collect()
    }

    #[test]
    fn a_primary_is_mirrored_by_the_destination_sites_mirror() {
        let d = desired(
            Mode::ActivePassive,
            &[("storage-a", Role::Primary), ("storage-b", Role::Replica)],
        );
        assert_eq!(
            named(links(&d)),
            [(
                "mirror-b".into(),
                "http://storage-a".into(),
                "http://storage-b".into()
            )]
        );
    }

    #[test]
    fn active_active_mirrors_both_ways_and_a_held_server_gets_nothing() {
        let d = desired(
            Mode::ActiveActive,
            &[("storage-a", Role::Primary), ("storage-b", Role::Primary)],
        );
        assert_eq!(links(&d).len(), 2);
        let mut d = desired(
            Mode::ActivePassive,
            &[("storage-a", Role::Replica), ("storage-b", Role::Primary)],
        );
        d.held.insert("storage-a".into());
        assert!(links(&d).is_empty());
    }

    #[test]
    fn a_newcomer_never_becomes_a_second_master_or_primary() {
        let d = desired(
            Mode::ActivePassive,
            &[("account-a", Role::Master), ("storage-a", Role::Primary)],
        );
        assert_eq!(adopted(&d, &member("account-b"), Role::Master), Some(Role::Slave));
        assert_eq!(
            adopted(&d, &member("storage-b"), Role::Primary),
            Some(Role::Replica)
        );
        let mut aa = d.clone();
        aa.mode = Mode::ActiveActive;
        assert_eq!(
            adopted(&aa, &member("storage-b"), Role::Primary),
            Some(Role::Primary)
        );
        assert_eq!(
            adopted(&aa, &member("storage-a2"), Role::Primary),
            Some(Role::Replica)
        );
        assert_eq!(adopted(&d, &member("mirror-a"), Role::Running), None);
    }

    #[test]
    fn no_lease_for_a_held_a_fenced_or_an_unconverged_holder() {
        let mut d = desired(
            Mode::ActivePassive,
            &[("storage-a", Role::Primary), ("account-a", Role::Master)],
        );
        assert!(lease_for(&d, "storage-a", Role::Primary));
        assert!(!lease_for(&d, "storage-a", Role::Replica), "reports another role");
        assert!(!lease_for(&d, "storage-b", Role::Primary), "not assigned");
        d.held.insert("storage-a".into());
        assert!(!lease_for(&d, "storage-a", Role::Primary));
    }
}
