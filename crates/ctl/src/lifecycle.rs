//! `duplexctl accounts delete`: the account's data first, then the account.
//!
//! The storage step runs first so that a failure leaves an account that
//! still works rather than one whose snapshots outlive it unreachable;
//! both steps are idempotent, so running the command again finishes the
//! job.

use anyhow::Context;
use duplex_proto::v1::account_admin_client::AccountAdminClient;
use duplex_proto::v1::storage_admin_client::StorageAdminClient;
use duplex_proto::v1::{DeleteAccountRequest, DeleteStoredAccountRequest};
use duplex_rpc::exit::call_failed;
use duplex_rpc::outln;
use serde_json::json;

use crate::admin::while_fenced;

pub async fn delete_account(
    client: &mut AccountAdminClient<crate::conn::Conn>,
    name: &str,
    json: bool,
) -> anyhow::Result<()> {
    let (accounts, servers) = crate::admin::accounts_and_servers(client).await?;
    let account = accounts
        .iter()
        .find(|a| a.name == name)
        .with_context(|| format!("account {name:?} not found"))?;
    let home = servers
        .iter()
        .find(|s| s.id == account.home_id)
        .with_context(|| format!("the home of account {name:?} is not a known storage server"))?;
    let mut storage = StorageAdminClient::new(crate::conn::conn(&duplex_rpc::discovery::client_addr(home))?);
    let snapshots = storage
        .delete_account(DeleteStoredAccountRequest {
            account_id: account.id,
        })
        .await
        .map_err(call_failed(format!(
            "deleting the snapshots of {name:?} on its home {} (the account is unchanged; run this again)",
            home.name
        )))?
        .into_inner()
        .snapshots_deleted;
    let request = DeleteAccountRequest {
        name: name.to_owned(),
    };
    while_fenced(|| {
        let mut client = client.clone();
        let request = request.clone();
        async move { client.delete_account(request).await }
    })
    .await
    .map_err(call_failed(format!("deleting account {name:?}")))?;
    if json {
        outln!(
            "{}",
            json!({"name": name, "id": account.id, "home": home.name, "snapshots_deleted": snapshots})
        );
    } else {
        outln!(
            "account {name} deleted with its {snapshots} snapshots; its token no longer works, and the next \
             garbage collection frees its data on every site"
        );
    }
    Ok(())
}
