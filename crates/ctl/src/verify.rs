//! `duplexctl verify [--repair]`: every storage server checks every chunk
//! it holds and every chunk its snapshots name; with `--repair`, each
//! server with damage mends it from the other servers' copies (the other
//! site's first, where its mirror keeps one).

use duplex_proto::v1::storage_admin_client::StorageAdminClient;
use duplex_proto::v1::{
    AccountVerification, GetClusterStatusRequest, RepairChunksRequest, ServerInfo, VerifyAccountsRequest,
};
use duplex_rpc::exit::{Coded, call_failed};
use duplex_rpc::outln;
use duplex_types::ChunkId;
use serde_json::{Value, json};

type Admin = StorageAdminClient<crate::conn::Conn>;

/// One healthy storage server and the role the coordinator sees it in.
pub struct Server {
    pub info: ServerInfo,
    role: String,
}

pub async fn verify(coordinator: Option<&str>, repair: bool, json: bool) -> anyhow::Result<()> {
    let servers = storage_servers(coordinator).await?;
    let mut reports = Vec::new();
    let mut ok = true;
    for server in &servers {
        let mut admin = admin(&server.info)?;
        let accounts = admin
            .verify_accounts(VerifyAccountsRequest {
                account_ids: Vec::new(),
            })
            .await
            .map_err(call_failed(format!("verifying {}", server.info.name)))?
            .into_inner()
            .accounts;
        let mut report = summary(server, &accounts);
        let damaged = damage(&accounts) > 0;
        if repair && damaged {
            let mended = mend(&mut admin, server, &servers, &accounts).await?;
            ok &= mended.whole;
            report["repair"] = mended.report;
        } else {
            ok &= !damaged;
        }
        reports.push(report);
    }
    if json {
        outln!("{}", json!({"ok": ok, "servers": reports}));
    } else {
        reports.iter().for_each(print);
    }
    if !ok {
        let what = if repair {
            "some damage could not be repaired (see above)"
        } else {
            "verification found missing or corrupt data (see above); `duplexctl verify --repair` mends it from the other site"
        };
        return Err(Coded::integrity(what).into());
    }
    Ok(())
}

/// The storage servers the coordinator sees healthy.
pub async fn storage_servers(coordinator: Option<&str>) -> anyhow::Result<Vec<Server>> {
    let status = crate::ops::client(coordinator)?
        .get_status(GetClusterStatusRequest {})
        .await
        .map_err(call_failed("status"))?
        .into_inner();
    Ok(status
        .servers
        .into_iter()
        .filter(|s| s.healthy)
        .filter_map(|s| {
            let info = s.server.filter(|i| i.kind == "storage")?;
            Some(Server { info, role: s.role })
        })
        .collect())
}

fn admin(server: &ServerInfo) -> anyhow::Result<Admin> {
    Ok(StorageAdminClient::new(crate::conn::conn(
        &duplex_rpc::discovery::client_addr(server),
    )?))
}

fn damage(accounts: &[AccountVerification]) -> u64 {
    accounts.iter().map(|a| a.missing + a.corrupt).sum()
}

fn summary(server: &Server, accounts: &[AccountVerification]) -> Value {
    let sum = |f: fn(&AccountVerification) -> u64| accounts.iter().map(f).sum::<u64>();
    let problems: Vec<Value> = accounts
        .iter()
        .filter(|a| a.missing + a.corrupt > 0)
        .map(|a| {
            json!({
                "account_id": a.account_id,
                "missing": hex_ids(&a.missing_ids),
                "corrupt": hex_ids(&a.corrupt_ids),
            })
        })
        .collect();
    json!({
        "name": server.info.name,
        "role": server.role,
        "accounts": accounts.len(),
        "snapshots": sum(|a| a.snapshots),
        "chunks_checked": sum(|a| a.chunks_checked),
        "bytes_checked": sum(|a| a.bytes_checked),
        "missing": sum(|a| a.missing),
        "corrupt": sum(|a| a.corrupt),
        "accounts_with_problems": problems.iter().map(|p| p["account_id"].clone()).collect::<Vec<_>>(),
        "problems": problems,
    })
}

fn hex_ids(ids: &[Vec<u8>]) -> Vec<String> {
    ids.iter()
        .map(|b| ChunkId::from_bytes(b).map_or_else(|_| "(malformed id)".to_owned(), |id| id.to_string()))
        .collect()
}

struct Mended {
    /// Nothing is left damaged on the server.
    whole: bool,
    report: Value,
}

/// Repairs every damaged chunk `accounts` lists on `server` from the other
/// servers: those on another site first, since a mirror keeps the copy
/// there, then the rest.
async fn mend(
    admin: &mut Admin,
    server: &Server,
    all: &[Server],
    accounts: &[AccountVerification],
) -> anyhow::Result<Mended> {
    let mut others: Vec<&Server> = all.iter().filter(|s| s.info.id != server.info.id).collect();
    others.sort_by_key(|s| s.info.site == server.info.site);
    let sources: Vec<String> = others.iter().map(|s| s.info.addr.clone()).collect();
    let mut repaired = 0u64;
    let mut unrepairable = Vec::new();
    let mut source_errors = Vec::new();
    let mut unlisted = 0u64;
    for a in accounts.iter().filter(|a| a.missing + a.corrupt > 0) {
        let ids: Vec<Vec<u8>> = a.missing_ids.iter().chain(&a.corrupt_ids).cloned().collect();
        unlisted += (a.missing + a.corrupt).saturating_sub(ids.len() as u64);
        if sources.is_empty() {
            unrepairable.extend(ids.iter().map(|id| unrepairable_json(a.account_id, id, &[])));
            continue;
        }
        let r = admin
            .repair_chunks(RepairChunksRequest {
                account_id: a.account_id,
                ids,
                sources: sources.clone(),
            })
            .await
            .map_err(call_failed(format!(
                "repairing account {} on {}",
                a.account_id, server.info.name
            )))?
            .into_inner();
        repaired += r.repaired.len() as u64;
        unrepairable.extend(
            r.unrepairable
                .iter()
                .map(|u| unrepairable_json(a.account_id, &u.id, &u.snapshots)),
        );
        source_errors.extend(r.source_errors);
    }
    source_errors.sort();
    source_errors.dedup();
    Ok(Mended {
        whole: unrepairable.is_empty() && unlisted == 0,
        report: json!({
            "sources": others.iter().map(|s| s.info.name.clone()).collect::<Vec<_>>(),
            "repaired": repaired,
            "unrepairable": unrepairable,
            "not_yet_listed": unlisted,
            "source_errors": source_errors,
        }),
    })
}

fn unrepairable_json(account: u64, id: &[u8], snapshots: &[String]) -> Value {
    json!({
        "account_id": account,
        "chunk": hex_ids(&[id.to_vec()])[0],
        "snapshots": snapshots,
    })
}

fn print(r: &Value) {
    let text = |v: &Value| v.as_str().unwrap_or("").to_owned();
    outln!(
        "{:<12} {:<8} {} accounts, {} snapshots, {} chunks checked: {} missing, {} corrupt",
        text(&r["name"]),
        text(&r["role"]),
        r["accounts"],
        r["snapshots"],
        r["chunks_checked"],
        r["missing"],
        r["corrupt"]
    );
    let Some(repair) = r.get("repair") else {
        return;
    };
    let none = Vec::new();
    let unrepairable = repair["unrepairable"].as_array().unwrap_or(&none);
    outln!(
        "  repaired {} chunks from {}; {} unrepairable",
        repair["repaired"],
        repair["sources"]
            .as_array()
            .map(|s| s.iter().map(text).collect::<Vec<_>>().join(", "))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "no other server".into()),
        unrepairable.len()
    );
    for u in unrepairable {
        let snapshots: Vec<String> = u["snapshots"]
            .as_array()
            .unwrap_or(&none)
            .iter()
            .map(text)
            .collect();
        outln!(
            "  unrepairable: account {} chunk {} (named by snapshots: {})",
            u["account_id"],
            text(&u["chunk"]),
            if snapshots.is_empty() {
                "none".into()
            } else {
                snapshots.join(", ")
            }
        );
    }
    if repair["not_yet_listed"].as_u64().unwrap_or(0) > 0 {
        outln!(
            "  {} more damaged chunks than one pass lists: run `duplexctl verify --repair` again",
            repair["not_yet_listed"]
        );
    }
    for e in repair["source_errors"].as_array().unwrap_or(&none) {
        outln!("  could not read from {}", text(e));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_malformed_id_is_shown_as_such() {
        let shown = super::hex_ids(&[vec![1, 2, 3], vec![7; 32]]);
        assert_eq!(shown[0], "(malformed id)");
        assert_eq!(shown[1], "07".repeat(32));
    }
}
