//! `duplexctl accounts usage`: what each account holds on its home storage
//! server, and which accounts have not backed up lately.

use std::collections::{BTreeMap, HashMap};

use duplex_coordinator::events::rfc3339;
use duplex_proto::v1::account_admin_client::AccountAdminClient;
use duplex_proto::v1::storage_admin_client::StorageAdminClient;
use duplex_proto::v1::{AccountUsage, ListUsageRequest};
use duplex_rpc::{out, outln};
use serde_json::json;

/// An account with no backup for this long is shown as overdue.
const OVERDUE_AFTER_MS: i64 = 2 * 24 * 3600 * 1000;

pub async fn run(client: &mut AccountAdminClient<crate::conn::Conn>, json: bool) -> anyhow::Result<()> {
    let (accounts, servers) = crate::admin::accounts_and_servers(client).await?;
    let mut usage: HashMap<String, BTreeMap<u64, AccountUsage>> = HashMap::new();
    for server in servers
        .iter()
        .filter(|s| accounts.iter().any(|a| a.home_id == s.id))
    {
        match home_usage(&server.addr).await {
            Ok(rows) => {
                usage.insert(server.id.clone(), rows);
            }
            Err(e) => eprintln!(
                "warning: {} did not say what its accounts use: {e:#}",
                server.name
            ),
        }
    }
    let now = duplex_types::now_ms();
    let rows: Vec<_> = accounts
        .iter()
        .map(|a| {
            let known = usage.get(&a.home_id);
            let u = known.and_then(|rows| rows.get(&a.id));
            let last = u.map_or(0, |u| u.last_backup_unix_ms);
            let overdue = known.is_some() && now - last > OVERDUE_AFTER_MS;
            (a, known.is_some(), u.cloned().unwrap_or_default(), overdue)
        })
        .collect();
    if json {
        let list: Vec<_> = rows
            .iter()
            .map(|(a, known, u, overdue)| {
                json!({
                    "name": a.name,
                    "home": a.home,
                    "snapshots": known.then_some(u.snapshots),
                    "stored_bytes": known.then_some(u.stored_bytes),
                    "reclaimed_bytes": known.then_some(u.reclaimed_bytes),
                    "last_backup": (u.last_backup_unix_ms > 0).then(|| rfc3339(u.last_backup_unix_ms)),
                    "quota_bytes": (a.quota_bytes > 0).then_some(a.quota_bytes),
                    "overdue": overdue,
                })
            })
            .collect();
        outln!("{}", json!({ "accounts": list }));
        return Ok(());
    }
    let unknown = || "?".to_owned();
    let table = rows.iter().map(|(a, known, u, overdue)| {
        vec![
            a.name.clone(),
            a.home.clone(),
            if *known {
                u.snapshots.to_string()
            } else {
                unknown()
            },
            if *known {
                u.stored_bytes.to_string()
            } else {
                unknown()
            },
            match a.quota_bytes {
                0 => "-".to_owned(),
                q => q.to_string(),
            },
            if u.last_backup_unix_ms > 0 {
                rfc3339(u.last_backup_unix_ms)
            } else {
                "never".to_owned()
            },
            if *overdue {
                "OVERDUE".to_owned()
            } else {
                String::new()
            },
        ]
    });
    out!(
        "{}",
        duplex_rpc::table::render(
            &[
                "account",
                "home",
                "snapshots",
                "stored bytes",
                "quota",
                "last backup",
                "no backup in 2 days"
            ],
            table
        )
    );
    Ok(())
}

async fn home_usage(addr: &str) -> anyhow::Result<BTreeMap<u64, AccountUsage>> {
    let mut storage = StorageAdminClient::new(crate::conn::conn(addr)?);
    let rows = storage
        .list_usage(ListUsageRequest {})
        .await?
        .into_inner()
        .accounts;
    Ok(rows.into_iter().map(|u| (u.account_id, u)).collect())
}
