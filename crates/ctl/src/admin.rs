//! `duplexctl accounts` and `duplexctl groups`, against the account server.

use anyhow::Context;
use duplex_proto::v1::GetAccountStatusRequest;
use duplex_proto::v1::account_admin_client::AccountAdminClient;
use duplex_proto::v1::{
    CreateAccountRequest, KeepPolicy, ListAccountsRequest, ListGroupsRequest, RotateTokenRequest,
    SetGroupEnabledRequest, SetGroupPolicyRequest, SetQuotaRequest,
};
use duplex_rpc::exit::call_failed;
use duplex_rpc::{out, outln};
use serde_json::json;

/// An admin client for the master account server, found through any
/// endpoint (a slave names its master). Falls back to the first server
/// that answers, so reads still work while no master is reachable.
pub async fn connect(endpoints: &[String]) -> anyhow::Result<AccountAdminClient<crate::conn::Conn>> {
    let mut fallback = None;
    let mut last = None;
    for url in &duplex_rpc::discovery::account_servers(endpoints).await {
        let mut client = AccountAdminClient::new(crate::conn::conn(url)?);
        match client.get_status(GetAccountStatusRequest {}).await {
            Ok(status) => {
                let status = status.into_inner();
                if status.role == "master" {
                    return Ok(client);
                }
                if !status.master.is_empty() {
                    let mut master = AccountAdminClient::new(crate::conn::conn(&status.master)?);
                    if master
                        .get_status(GetAccountStatusRequest {})
                        .await
                        .is_ok_and(|s| s.get_ref().role == "master")
                    {
                        return Ok(master);
                    }
                }
                fallback.get_or_insert(client);
            }
            Err(status) => last = Some(call_failed(url.as_str())(status).into()),
        }
    }
    fallback.ok_or_else(|| {
        last.unwrap_or_else(|| {
            anyhow::anyhow!("no endpoint: pass --endpoint URL (or --coordinator URL), or set DUPLEX_ENDPOINT")
        })
    })
}

/// How long a write waits for a fenced master to get its lease back (it
/// just started, or a failover is moving its role).
const FENCED_PATIENCE: std::time::Duration = std::time::Duration::from_secs(15);

/// Runs a write, retrying while the master refuses it as fenced: such a
/// refusal happens before anything is written, so retrying is safe.
pub async fn while_fenced<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let start = std::time::Instant::now();
    loop {
        match call().await {
            Err(s)
                if s.metadata()
                    .get(duplex_rpc::heartbeat::FENCED_METADATA_KEY)
                    .is_some()
                    && start.elapsed() < FENCED_PATIENCE =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

/// What `accounts create` sets besides the name.
pub struct NewAccount {
    pub group: Option<String>,
    pub home: Option<String>,
    pub quota: u64,
}

pub async fn create_account(
    client: &mut AccountAdminClient<crate::conn::Conn>,
    name: &str,
    new: NewAccount,
    json: bool,
) -> anyhow::Result<()> {
    let request = CreateAccountRequest {
        name: name.to_owned(),
        group: new.group.unwrap_or_default(),
        home: new.home.unwrap_or_default(),
        quota_bytes: new.quota,
    };
    let response = while_fenced(|| {
        let mut client = client.clone();
        let request = request.clone();
        async move { client.create_account(request).await }
    })
    .await
    .map_err(call_failed(format!("creating account {name:?}")))?
    .into_inner();
    let account = response.account.context("server returned no account")?;
    if json {
        outln!(
            "{}",
            json!({"name": account.name, "token": response.token, "home": account.home})
        );
    } else {
        outln!(
            "account {} created in group {} with home {}",
            account.name,
            account.group,
            account.home
        );
        outln!("token (shown only once): {}", response.token);
    }
    Ok(())
}

pub async fn set_quota(
    client: &mut AccountAdminClient<crate::conn::Conn>,
    name: &str,
    bytes: u64,
    json: bool,
) -> anyhow::Result<()> {
    let request = SetQuotaRequest {
        name: name.to_owned(),
        quota_bytes: bytes,
    };
    let account = while_fenced(|| {
        let mut client = client.clone();
        let request = request.clone();
        async move { client.set_quota(request).await }
    })
    .await
    .map_err(call_failed(format!("setting the quota of account {name:?}")))?
    .into_inner();
    if json {
        outln!(
            "{}",
            json!({"name": account.name, "quota_bytes": account.quota_bytes})
        );
    } else if account.quota_bytes == 0 {
        outln!("account {} has no quota", account.name);
    } else {
        outln!(
            "account {} has a quota of {} bytes",
            account.name,
            account.quota_bytes
        );
    }
    Ok(())
}

pub async fn rotate_token(
    client: &mut AccountAdminClient<crate::conn::Conn>,
    name: &str,
    json: bool,
) -> anyhow::Result<()> {
    let request = RotateTokenRequest {
        name: name.to_owned(),
    };
    let response = while_fenced(|| {
        let mut client = client.clone();
        let request = request.clone();
        async move { client.rotate_token(request).await }
    })
    .await
    .map_err(call_failed(format!("rotating the token of account {name:?}")))?
    .into_inner();
    let account = response.account.context("server returned no account")?;
    if json {
        outln!("{}", json!({"name": account.name, "token": response.token}));
    } else {
        outln!(
            "account {} has a new token; the old one no longer works",
            account.name
        );
        outln!("token (shown only once): {}", response.token);
    }
    Ok(())
}

/// Every account and every storage server, as the master lists them:
/// what joins an account to its home.
pub async fn accounts_and_servers(
    client: &mut AccountAdminClient<crate::conn::Conn>,
) -> anyhow::Result<(
    Vec<duplex_proto::v1::AccountView>,
    Vec<duplex_proto::v1::ServerInfo>,
)> {
    let accounts = client
        .list_accounts(ListAccountsRequest {})
        .await
        .map_err(call_failed("listing accounts"))?
        .into_inner()
        .accounts;
    let servers = client
        .list_storage_servers(duplex_proto::v1::ListStorageServersRequest {})
        .await
        .map_err(call_failed("listing storage servers"))?
        .into_inner()
        .servers;
    Ok((accounts, servers))
}

pub async fn list_accounts(
    client: &mut AccountAdminClient<crate::conn::Conn>,
    json: bool,
) -> anyhow::Result<()> {
    let accounts = client
        .list_accounts(ListAccountsRequest {})
        .await
        .map_err(call_failed("listing accounts"))?
        .into_inner()
        .accounts;
    if json {
        let list: Vec<_> = accounts
            .iter()
            .map(|a| json!({"name": a.name, "group": a.group, "home": a.home}))
            .collect();
        outln!("{}", json!({ "accounts": list }));
    } else {
        let rows = accounts.iter().map(|a| vec![&a.name, &a.group, &a.home]);
        out!("{}", duplex_rpc::table::render(&["name", "group", "home"], rows));
    }
    Ok(())
}

pub async fn list_groups(
    client: &mut AccountAdminClient<crate::conn::Conn>,
    json: bool,
) -> anyhow::Result<()> {
    let groups = client
        .list_groups(ListGroupsRequest {})
        .await
        .map_err(call_failed("listing groups"))?
        .into_inner()
        .groups;
    if json {
        let list: Vec<_> = groups
            .iter()
            .map(|g| json!({"name": g.name, "enabled": g.enabled, "accounts": g.accounts, "keep": keep_json(g.keep)}))
            .collect();
        outln!("{}", json!({ "groups": list }));
    } else {
        let rows = groups.iter().map(|g| {
            vec![
                g.name.clone(),
                g.enabled.to_string(),
                g.accounts.to_string(),
                keep_words(g.keep),
            ]
        });
        out!(
            "{}",
            duplex_rpc::table::render(&["name", "enabled", "accounts", "keeps"], rows)
        );
    }
    Ok(())
}

/// A group's policy as JSON: null (keep everything) or its non-zero rules.
fn keep_json(keep: Option<KeepPolicy>) -> serde_json::Value {
    match keep {
        None => serde_json::Value::Null,
        Some(k) => duplex_types::retention::KeepPolicy::from(k)
            .rules()
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(rule, n)| ((*rule).to_owned(), json!(n)))
            .collect::<serde_json::Map<_, _>>()
            .into(),
    }
}

fn keep_words(keep: Option<KeepPolicy>) -> String {
    match keep.map(|k| duplex_types::retention::KeepPolicy::from(k).describe()) {
        Some(words) if !words.is_empty() => words,
        _ => "everything".to_owned(),
    }
}

pub async fn set_group_policy(
    client: &mut AccountAdminClient<crate::conn::Conn>,
    name: &str,
    keep: duplex_types::retention::KeepPolicy,
    json: bool,
) -> anyhow::Result<()> {
    let request = SetGroupPolicyRequest {
        name: name.to_owned(),
        keep: Some(keep.into()),
    };
    let group = while_fenced(|| {
        let mut client = client.clone();
        let request = request.clone();
        async move { client.set_group_policy(request).await }
    })
    .await
    .map_err(call_failed(format!("setting the keep policy of group {name:?}")))?
    .into_inner();
    if json {
        outln!("{}", json!({"name": group.name, "keep": keep_json(group.keep)}));
    } else {
        outln!("group {} keeps {}", group.name, keep_words(group.keep));
    }
    Ok(())
}

pub async fn set_group(
    client: &mut AccountAdminClient<crate::conn::Conn>,
    name: &str,
    enabled: bool,
    json: bool,
) -> anyhow::Result<()> {
    let request = SetGroupEnabledRequest {
        name: name.to_owned(),
        enabled,
    };
    let group = while_fenced(|| {
        let mut client = client.clone();
        let request = request.clone();
        async move { client.set_group_enabled(request).await }
    })
    .await
    .map_err(call_failed(format!("updating group {name:?}")))?
    .into_inner();
    if json {
        outln!(
            "{}",
            json!({"name": group.name, "enabled": group.enabled, "accounts": group.accounts})
        );
    } else {
        let state = if group.enabled {
            "enabled"
        } else {
            "disabled: its backups are refused"
        };
        outln!("group {} {state} ({} accounts)", group.name, group.accounts);
    }
    Ok(())
}
