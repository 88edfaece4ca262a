//! `duplexctl servers`: look at one account server and change its role by
//! hand (the coordinator does this on its own once it runs).

use anyhow::Context;
use duplex_proto::v1::account_admin_client::AccountAdminClient;
use duplex_proto::v1::account_replication_client::AccountReplicationClient;
use duplex_proto::v1::{AccountServerStatus, DemoteRequest, GetAccountStatusRequest, PromoteRequest};
use duplex_rpc::exit::call_failed;
use duplex_rpc::outln;
use serde_json::json;

async fn status_of(url: &str) -> anyhow::Result<AccountServerStatus> {
    let mut admin = AccountAdminClient::new(crate::conn::conn(url)?);
    Ok(admin
        .get_status(GetAccountStatusRequest {})
        .await
        .map_err(call_failed(url))?
        .into_inner())
}

pub fn status_json(s: &AccountServerStatus) -> serde_json::Value {
    let server = s.server.clone().unwrap_or_default();
    json!({
        "name": server.name,
        "addr": server.addr,
        "role": s.role,
        "epoch": s.epoch,
        "lsn": s.lsn,
        "state_hash": s.state_hash,
        "accounts": s.accounts,
        "replication": s.replication,
        "master": s.master,
        "lag": s.lag.as_ref().map(|l| json!({"records": l.records, "bytes": l.bytes, "seconds": l.seconds})),
        "slaves": s.slaves.iter().map(|sl| json!({
            "name": sl.server.as_ref().map(|x| x.name.clone()).unwrap_or_default(),
            "applied_lsn": sl.applied_lsn,
            "lag": sl.lag.as_ref().map(|l| json!({"records": l.records})),
        })).collect::<Vec<_>>(),
        "divergent_entries": s.divergent_entries,
        "divergence_report": s.divergence_report,
        "bootstraps": s.bootstraps,
        "snapshot_lsn": s.snapshot_lsn,
        "log_start_lsn": s.log_start_lsn,
    })
}

fn print(s: &AccountServerStatus, json: bool) {
    if json {
        outln!("{}", status_json(s));
        return;
    }
    let server = s.server.clone().unwrap_or_default();
    outln!(
        "{} ({}) {} epoch {} lsn {} accounts {}",
        server.name,
        server.addr,
        s.role,
        s.epoch,
        s.lsn,
        s.accounts
    );
    outln!("  replication: {}  state hash: {}", s.replication, s.state_hash);
    if !s.master.is_empty() {
        let lag = s.lag.unwrap_or_default();
        outln!(
            "  following {} (behind by {} records, {:.1} s)",
            s.master,
            lag.records,
            lag.seconds
        );
    }
    for sl in &s.slaves {
        let name = sl.server.as_ref().map(|x| x.name.clone()).unwrap_or_default();
        outln!("  slave {name}: applied {}", sl.applied_lsn);
    }
    if s.divergent_entries > 0 {
        outln!(
            "  DIVERGENT ENTRIES: {} (report: {})",
            s.divergent_entries,
            s.divergence_report
        );
    }
}

pub async fn status(url: &str, json: bool) -> anyhow::Result<()> {
    print(&status_of(url).await?, json);
    Ok(())
}

/// Promotes `url` to master at `epoch` (default: one above what it holds).
pub async fn promote(url: &str, epoch: Option<u64>, json: bool) -> anyhow::Result<()> {
    let epoch = match epoch {
        Some(e) => e,
        None => status_of(url).await?.epoch + 1,
    };
    let mut client = AccountReplicationClient::new(crate::conn::conn(url)?);
    let status = client
        .promote(PromoteRequest { epoch })
        .await
        .map_err(call_failed(format!("promoting {url}")))?
        .into_inner();
    print(&status, json);
    Ok(())
}

/// Demotes `url` to a slave of `master`, at the master's epoch by default.
pub async fn demote(url: &str, master: &str, epoch: Option<u64>, json: bool) -> anyhow::Result<()> {
    let epoch = match epoch {
        Some(e) => e,
        None => {
            status_of(master)
                .await
                .context("asking the new master for its epoch")?
                .epoch
        }
    };
    let mut client = AccountReplicationClient::new(crate::conn::conn(url)?);
    let status = client
        .demote(DemoteRequest {
            epoch,
            master: master.to_owned(),
        })
        .await
        .map_err(call_failed(format!("demoting {url}")))?
        .into_inner();
    print(&status, json);
    Ok(())
}
