//! `duplexctl status`: every server with its role, health and lag, as the
//! coordinator sees them.

use anyhow::Context;
use duplex_proto::v1::coordinator_client::CoordinatorClient;
use duplex_proto::v1::{ClusterStatus, GetClusterStatusRequest};
use duplex_rpc::exit::call_failed;
use duplex_rpc::{out, outln};
use serde_json::json;

pub fn to_json(status: &ClusterStatus) -> serde_json::Value {
    let servers: Vec<_> = status
        .servers
        .iter()
        .map(|s| {
            let server = s.server.clone().unwrap_or_default();
            json!({
                "name": server.name,
                "kind": server.kind,
                "site": server.site,
                "role": s.role,
                "addr": duplex_rpc::discovery::client_addr(&server),
                "healthy": s.healthy,
                "lag": s.lag.map(|l| json!({"records": l.records, "bytes": l.bytes, "seconds": l.seconds})),
            })
        })
        .collect();
    json!({
        "mode": status.mode,
        "epoch": status.epoch,
        "phase": status.phase,
        "servers": servers,
        "moved_homes": status.moved_homes,
        "held": status.held,
        "warnings": status.warnings,
    })
}

pub async fn run(coordinator: Option<&str>, json: bool) -> anyhow::Result<()> {
    let url = coordinator.context("no coordinator: pass --coordinator URL or set DUPLEX_COORDINATOR")?;
    let mut client = CoordinatorClient::new(crate::conn::conn(url)?);
    let status = client
        .get_status(GetClusterStatusRequest {})
        .await
        .map_err(call_failed(url))?
        .into_inner();
    if json {
        outln!("{}", to_json(&status));
        return Ok(());
    }
    outln!(
        "mode {}  epoch {}  phase {}",
        status.mode,
        status.epoch,
        status.phase
    );
    for warning in &status.warnings {
        outln!("warning: {warning}");
    }
    for (origin, now) in &status.moved_homes {
        outln!("accounts of {origin} are homed on {now} until a failback");
    }
    if !status.held.is_empty() {
        outln!(
            "held (nothing is mirrored into them until resync or failback): {}",
            status.held.join(", ")
        );
    }
    let rows = status.servers.iter().map(|s| {
        let server = s.server.clone().unwrap_or_default();
        let lag = s
            .lag
            .map(|l| format!("{} records, {} bytes, {:.1} s", l.records, l.bytes, l.seconds))
            .unwrap_or_else(|| "-".into());
        vec![
            server.name.clone(),
            server.kind.clone(),
            server.site.clone(),
            s.role.clone(),
            s.healthy.to_string(),
            duplex_rpc::discovery::client_addr(&server),
            lag,
        ]
    });
    out!(
        "{}",
        duplex_rpc::table::render(&["name", "kind", "site", "role", "healthy", "addr", "lag"], rows)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lists_held_servers_and_warnings() {
        let status = ClusterStatus {
            held: vec!["storage-a".into()],
            warnings: vec!["storage-a is held".into()],
            ..Default::default()
        };
        let json = to_json(&status);
        assert_eq!(json["held"], serde_json::json!(["storage-a"]));
        assert_eq!(json["warnings"], serde_json::json!(["storage-a is held"]));
    }
}
