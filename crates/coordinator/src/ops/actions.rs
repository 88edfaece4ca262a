//! The calls an operation makes to servers. Each is idempotent (epochs
//! make a repeated grant a no-op), bounded by a timeout, and retried by
//! `retry` until a deadline, so a phase survives a slow or restarting server.

use std::future::Future;
use std::time::{Duration, Instant};

use duplex_proto::v1::account_admin_client::AccountAdminClient;
use duplex_proto::v1::account_replication_client::AccountReplicationClient;
use duplex_proto::v1::mirror_client::MirrorClient;
use duplex_proto::v1::storage_admin_client::StorageAdminClient;
use duplex_proto::v1::{
    AccountServerStatus, AccountVerification, AccountView, DemoteRequest, GetAccountStatusRequest,
    GetStorageStatusRequest, LinkSpec, ListAccountsRequest, ListGroupsRequest, MoveHomesRequest,
    MoveHomesResponse, PromoteRequest, RegisterStorageServerRequest, ServerInfo, SetGroupEnabledRequest,
    SetLinksRequest, SetRoleRequest, StorageServerStatus, VerifyAccountsRequest,
};
use tonic::transport::Channel;

use super::OpError;

const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_EVERY: Duration = Duration::from_millis(200);

fn channel(addr: &str) -> Result<Channel, OpError> {
    duplex_rpc::channel(addr).map_err(|e| OpError::Invalid(format!("address {addr:?}: {e}")))
}

async fn call<T, F>(what: &str, f: F) -> Result<T, OpError>
where
    F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(OpError::Rpc {
            what: what.to_owned(),
            message: status.message().to_owned(),
        }),
        Err(_) => Err(OpError::Rpc {
            what: what.to_owned(),
            message: "timed out".into(),
        }),
    }
}

/// Repeats `f` until it succeeds or `deadline` passes.
pub async fn retry<T, F, Fut>(deadline: Instant, mut f: F) -> Result<T, OpError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, OpError>>,
{
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(e) => tracing::debug!(error = %e, "will retry"),
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

pub async fn promote_account(addr: &str, epoch: u64) -> Result<(), OpError> {
    let mut c = AccountReplicationClient::new(channel(addr)?);
    call(&format!("promote {addr}"), c.promote(PromoteRequest { epoch }))
        .await
        .map(|_| ())
}

pub async fn demote_account(addr: &str, epoch: u64, master: &str) -> Result<(), OpError> {
    let mut c = AccountReplicationClient::new(channel(addr)?);
    let request = DemoteRequest {
        epoch,
        master: master.to_owned(),
    };
    call(&format!("demote {addr}"), c.demote(request))
        .await
        .map(|_| ())
}

pub async fn account_status(addr: &str) -> Result<AccountServerStatus, OpError> {
    let mut c = AccountAdminClient::new(channel(addr)?);
    call(
        &format!("status of {addr}"),
        c.get_status(GetAccountStatusRequest {}),
    )
    .await
}

pub async fn set_storage_role(addr: &str, role: &str, epoch: u64, primary: &str) -> Result<(), OpError> {
    let mut c = StorageAdminClient::new(channel(addr)?);
    let request = SetRoleRequest {
        role: role.to_owned(),
        epoch,
        primary: primary.to_owned(),
    };
    call(&format!("make {addr} {role}"), c.set_role(request))
        .await
        .map(|_| ())
}

pub async fn storage_status(addr: &str) -> Result<StorageServerStatus, OpError> {
    let mut c = StorageAdminClient::new(channel(addr)?);
    call(
        &format!("status of {addr}"),
        c.get_status(GetStorageStatusRequest {}),
    )
    .await
}

pub async fn register_storage(master: &str, server: &ServerInfo) -> Result<(), OpError> {
    let mut c = AccountAdminClient::new(channel(master)?);
    let request = RegisterStorageServerRequest {
        server: Some(server.clone()),
    };
    call("register storage server", c.register_storage_server(request))
        .await
        .map(|_| ())
}

pub async fn move_homes(master: &str, request: MoveHomesRequest) -> Result<MoveHomesResponse, OpError> {
    let mut c = AccountAdminClient::new(channel(master)?);
    call("move homes", c.move_homes(request)).await
}

pub async fn accounts(master: &str) -> Result<Vec<AccountView>, OpError> {
    let mut c = AccountAdminClient::new(channel(master)?);
    Ok(call("list accounts", c.list_accounts(ListAccountsRequest {}))
        .await?
        .accounts)
}

/// Enabled groups, by name.
pub async fn enabled_groups(master: &str) -> Result<Vec<String>, OpError> {
    let mut c = AccountAdminClient::new(channel(master)?);
    Ok(call("list groups", c.list_groups(ListGroupsRequest {}))
        .await?
        .groups
        .into_iter()
        .filter(|g| g.enabled)
        .map(|g| g.name)
        .collect())
}

pub async fn set_group(master: &str, name: &str, enabled: bool) -> Result<(), OpError> {
    let mut c = AccountAdminClient::new(channel(master)?);
    let request = SetGroupEnabledRequest {
        name: name.to_owned(),
        enabled,
    };
    call(&format!("set group {name}"), c.set_group_enabled(request))
        .await
        .map(|_| ())
}

pub async fn verify_accounts(addr: &str, account_ids: Vec<u64>) -> Result<Vec<AccountVerification>, OpError> {
    let mut c = StorageAdminClient::new(channel(addr)?);
    let request = VerifyAccountsRequest { account_ids };
    // A full check reads every chunk: no short timeout.
    c.verify_accounts(request)
        .await
        .map(|r| r.into_inner().accounts)
        .map_err(|status| OpError::Rpc {
            what: format!("verify on {addr}"),
            message: status.message().to_owned(),
        })
}

pub async fn set_links(mirror: &str, links: Vec<LinkSpec>) -> Result<(), OpError> {
    let mut c = MirrorClient::new(channel(mirror)?);
    call(
        &format!("set links on {mirror}"),
        c.set_links(SetLinksRequest { links }),
    )
    .await
    .map(|_| ())
}
