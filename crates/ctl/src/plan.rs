//! What a failover or switchover would do, read from the coordinator's
//! status: shown by `--dry-run`, and in the question asked on a terminal
//! before one starts. The coordinator still decides when it runs (it
//! checks health, lag and leases again), so this is a preview, not a promise.

use std::io::{BufRead, Write};

use anyhow::bail;
use duplex_proto::v1::{ClusterStatus, ServerState};

/// One role that would move.
#[derive(Debug, PartialEq, Eq)]
pub struct Move {
    pub kind: String,
    pub from: String,
    pub from_site: String,
    /// The standby that would take over, if a healthy one exists.
    pub to: Option<String>,
    /// Bytes the standby is behind, as last reported.
    pub lag_bytes: Option<u64>,
}

/// The roles a failover or switchover away from `site` (default: the site
/// holding them) would move, of `kind` only when given.
pub fn moves(status: &ClusterStatus, site: Option<&str>, kind: Option<&str>) -> Vec<Move> {
    let holders = status.servers.iter().filter(|s| {
        let info = s.server.as_ref();
        matches!(assigned(s), "master" | "primary")
            && site.is_none_or(|site| info.is_some_and(|i| i.site == site))
            && kind.is_none_or(|kind| info.is_some_and(|i| i.kind == kind))
    });
    holders
        .filter_map(|holder| {
            let info = holder.server.as_ref()?;
            let standby = standby_for(status, holder);
            Some(Move {
                kind: info.kind.clone(),
                from: info.name.clone(),
                from_site: info.site.clone(),
                to: standby.and_then(|s| s.server.as_ref()).map(|i| i.name.clone()),
                lag_bytes: standby.and_then(|s| s.lag).map(|l| l.bytes),
            })
        })
        .collect()
}

fn standby_for<'a>(status: &'a ClusterStatus, holder: &ServerState) -> Option<&'a ServerState> {
    let info = holder.server.as_ref()?;
    status.servers.iter().find(|s| {
        s.healthy
            && matches!(assigned(s), "slave" | "replica")
            && s.server
                .as_ref()
                .is_some_and(|i| i.kind == info.kind && i.site != info.site)
    })
}

/// The role the coordinator assigned (a lost primary still holds its
/// assignment though it reports "down"), else the one reported.
fn assigned(s: &ServerState) -> &str {
    if s.assigned_role.is_empty() {
        &s.role
    } else {
        &s.assigned_role
    }
}

/// The plan as lines of text.
pub fn describe(what: &str, moves: &[Move]) -> Vec<String> {
    if moves.is_empty() {
        return vec![format!("{what}: no role to move (nothing holds one there)")];
    }
    moves
        .iter()
        .map(|m| match (&m.to, m.lag_bytes) {
            (Some(to), lag) => format!(
                "{what}: {} role of {} (site {}) -> {to}{}",
                m.kind,
                m.from,
                m.from_site,
                lag.map_or(String::new(), |b| format!(", {b} bytes behind"))
            ),
            (None, _) => format!(
                "{what}: {} role of {} (site {}) -> no healthy standby: it would be refused",
                m.kind, m.from, m.from_site
            ),
        })
        .collect()
}

/// Asks `question` on `prompt` and reads the answer from `input`: only
/// "y" or "yes" goes ahead.
pub fn confirm(question: &str, input: &mut impl BufRead, prompt: &mut impl Write) -> anyhow::Result<()> {
    write!(prompt, "{question} [y/N] ")?;
    prompt.flush()?;
    let mut answer = String::new();
    input.read_line(&mut answer)?;
    match answer.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => bail!("not confirmed: nothing was changed"),
    }
}

#[cfg(test)]
mod tests {
    use duplex_proto::v1::{Lag, ServerInfo};

    use super::*;

    fn server(name: &str, kind: &str, site: &str, role: &str, healthy: bool) -> ServerState {
        ServerState {
            server: Some(ServerInfo {
                name: name.into(),
                kind: kind.into(),
                site: site.into(),
                ..Default::default()
            }),
            role: role.into(),
            healthy,
            lag: (role == "replica").then_some(Lag {
                records: 1,
                bytes: 4096,
                seconds: 0.5,
            }),
            ..Default::default()
        }
    }

    fn two_sites(replica_healthy: bool) -> ClusterStatus {
        ClusterStatus {
            servers: vec![
                server("account-a", "account", "a", "master", true),
                server("account-b", "account", "b", "slave", true),
                server("storage-a", "storage", "a", "primary", true),
                server("storage-b", "storage", "b", "replica", replica_healthy),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn the_plan_names_each_role_its_standby_and_the_lag() {
        let plan = moves(&two_sites(true), None, None);
        assert_eq!(plan.len(), 2);
        assert_eq!(plan[1].to.as_deref(), Some("storage-b"));
        assert_eq!(plan[1].lag_bytes, Some(4096));
        let lines = describe("failover", &plan);
        assert_eq!(
            lines[0],
            "failover: account role of account-a (site a) -> account-b"
        );
        assert_eq!(
            lines[1],
            "failover: storage role of storage-a (site a) -> storage-b, 4096 bytes behind"
        );
    }

    #[test]
    fn kind_and_site_narrow_the_plan_and_a_missing_standby_is_said() {
        let status = two_sites(false);
        let plan = moves(&status, None, Some("storage"));
        assert_eq!(plan.len(), 1);
        assert!(describe("failover", &plan)[0].contains("no healthy standby"));
        assert!(moves(&status, Some("b"), None).is_empty());
        assert!(describe("failover", &[])[0].contains("no role to move"));
    }

    #[test]
    fn only_yes_confirms() {
        for (answer, ok) in [
            ("y\n", true),
            ("YES\n", true),
            ("\n", false),
            ("no\n", false),
            ("", false),
        ] {
            let mut prompt = Vec::new();
            let result = confirm("Fail over?", &mut answer.as_bytes(), &mut prompt);
            assert_eq!(result.is_ok(), ok, "{answer:?}");
            assert_eq!(prompt, b"Fail over? [y/N] ");
        }
    }
}
