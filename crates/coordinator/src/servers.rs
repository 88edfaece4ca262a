//! The calls the coordinator makes to servers, behind one trait: the
//! engine decides a `Call`, a `Servers` carries it out. `GrpcServers`
//! talks to the real services; the simulation has its own. Every call is
//! idempotent (epochs make a repeated grant a no-op) and bounded by a
//! timeout, so the engine may repeat it after a failure or a restart.

use std::time::Duration;

use duplex_proto::v1 as pb;
use duplex_proto::v1::account_admin_client::AccountAdminClient;
use duplex_proto::v1::account_replication_client::AccountReplicationClient;
use duplex_proto::v1::mirror_client::MirrorClient;
use duplex_proto::v1::storage_admin_client::StorageAdminClient;
use duplex_types::Role;
use futures::future::BoxFuture;
use tonic::transport::Channel;

use crate::model::Member;

/// One thing to tell or ask a server.
#[derive(Clone, Debug, PartialEq)]
pub enum Call {
    PromoteAccount {
        addr: String,
        epoch: u64,
    },
    DemoteAccount {
        addr: String,
        epoch: u64,
        master: String,
    },
    SetStorageRole {
        addr: String,
        role: Role,
        epoch: u64,
        primary: String,
    },
    SetLinks {
        addr: String,
        links: Vec<pb::LinkSpec>,
    },
    RegisterStorage {
        master: String,
        server: Member,
    },
    MoveHomes {
        master: String,
        request: pb::MoveHomesRequest,
    },
    /// The enabled groups of the accounts homed on these servers.
    EnabledGroupsOf {
        master: String,
        homes: Vec<String>,
    },
    SetGroup {
        master: String,
        group: String,
        enabled: bool,
    },
    /// Reads back every snapshot of every account homed on each server.
    VerifyHomes {
        master: String,
        homes: Vec<Member>,
    },
}

impl Call {
    /// Identifies the call within a phase: done calls are not repeated.
    pub fn key(&self) -> String {
        match self {
            Call::PromoteAccount { addr, epoch } => format!("promote {addr} @{epoch}"),
            Call::DemoteAccount { addr, epoch, .. } => format!("demote {addr} @{epoch}"),
            Call::SetStorageRole {
                addr, role, epoch, ..
            } => format!("role {role} {addr} @{epoch}"),
            Call::SetLinks { addr, links } => format!("links {addr} {}", links.len()),
            Call::RegisterStorage { server, .. } => format!("register {}", server.name),
            Call::MoveHomes { request, .. } => format!("move-homes {}->{}", request.from, request.to),
            Call::EnabledGroupsOf { .. } => "enabled-groups".into(),
            Call::SetGroup { group, enabled, .. } => format!("group {group} {enabled}"),
            Call::VerifyHomes { .. } => "verify".into(),
        }
    }

    /// A push only saves time: the heartbeat answer carries the same
    /// assignment, so a failed push is not retried.
    pub fn best_effort(&self) -> bool {
        matches!(
            self,
            Call::PromoteAccount { .. }
                | Call::DemoteAccount { .. }
                | Call::SetStorageRole { .. }
                | Call::SetLinks { .. }
        )
    }
}

/// What a call answered.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Done,
    Groups(Vec<String>),
    /// The integrity check: a summary when everything is intact.
    Verified(Result<String, String>),
}

pub trait Servers: Send + Sync + 'static {
    fn call(&self, call: Call) -> BoxFuture<'static, Result<Reply, String>>;
}

const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The real servers, over gRPC.
pub struct GrpcServers;

impl Servers for GrpcServers {
    fn call(&self, call: Call) -> BoxFuture<'static, Result<Reply, String>> {
        Box::pin(grpc(call))
    }
}

fn channel(addr: &str) -> Result<Channel, String> {
    duplex_rpc::channel(addr).map_err(|e| format!("address {addr:?}: {e}"))
}

async fn bounded<T>(
    what: &str,
    f: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(format!("{what}: {}", status.message())),
        Err(_) => Err(format!("{what}: timed out")),
    }
}

async fn grpc(call: Call) -> Result<Reply, String> {
    match call {
        Call::PromoteAccount { addr, epoch } => {
            let mut c = AccountReplicationClient::new(channel(&addr)?);
            bounded(
                &format!("promote {addr}"),
                c.promote(pb::PromoteRequest { epoch }),
            )
            .await?;
        }
        Call::DemoteAccount { addr, epoch, master } => {
            let mut c = AccountReplicationClient::new(channel(&addr)?);
            bounded(
                &format!("demote {addr}"),
                c.demote(pb::DemoteRequest { epoch, master }),
            )
            .await?;
        }
        Call::SetStorageRole {
            addr,
            role,
            epoch,
            primary,
        } => {
            let mut c = StorageAdminClient::new(channel(&addr)?);
            let request = pb::SetRoleRequest {
                role: role.as_str().to_owned(),
                epoch,
                primary,
            };
            bounded(&format!("make {addr} {role}"), c.set_role(request)).await?;
        }
        Call::SetLinks { addr, links } => {
            let mut c = MirrorClient::new(channel(&addr)?);
            bounded(
                &format!("set links on {addr}"),
                c.set_links(pb::SetLinksRequest { links }),
            )
            .await?;
        }
        Call::RegisterStorage { master, server } => {
            let mut c = AccountAdminClient::new(channel(&master)?);
            let request = pb::RegisterStorageServerRequest {
                server: Some(pb::ServerInfo::from(&server)),
            };
            bounded("register storage server", c.register_storage_server(request)).await?;
        }
        Call::MoveHomes { master, request } => {
            let mut c = AccountAdminClient::new(channel(&master)?);
            let (from, to) = (request.from.clone(), request.to.clone());
            let moved = bounded("move homes", c.move_homes(request)).await?;
            tracing::warn!(%from, %to, moved = moved.moved, "homes moved");
        }
        Call::EnabledGroupsOf { master, homes } => {
            return enabled_groups_of(&master, &homes).await.map(Reply::Groups);
        }
        Call::SetGroup {
            master,
            group,
            enabled,
        } => {
            let mut c = AccountAdminClient::new(channel(&master)?);
            let request = pb::SetGroupEnabledRequest { name: group, enabled };
            bounded("set group", c.set_group_enabled(request)).await?;
        }
        Call::VerifyHomes { master, homes } => {
            return verify_homes(&master, &homes).await.map(Reply::Verified);
        }
    }
    Ok(Reply::Done)
}

async fn enabled_groups_of(master: &str, homes: &[String]) -> Result<Vec<String>, String> {
    let mut c = AccountAdminClient::new(channel(master)?);
    let accounts = bounded("list accounts", c.list_accounts(pb::ListAccountsRequest {}))
        .await?
        .accounts;
    let enabled: Vec<String> = bounded("list groups", c.list_groups(pb::ListGroupsRequest {}))
        .await?
        .groups
        .into_iter()
        .filter(|g| g.enabled)
        .map(|g| g.name)
        .collect();
    let mut groups: Vec<String> = accounts
        .into_iter()
        .filter(|a| homes.contains(&a.home))
        .map(|a| a.group)
        .filter(|g| enabled.contains(g))
        .collect();
    groups.sort();
    groups.dedup();
    Ok(groups)
}

/// Every snapshot of every account homed on each server, read back and
/// hashed there. `Ok(Err(..))` names the accounts that failed.
async fn verify_homes(master: &str, homes: &[Member]) -> Result<Result<String, String>, String> {
    let mut c = AccountAdminClient::new(channel(master)?);
    let accounts = bounded("list accounts", c.list_accounts(pb::ListAccountsRequest {}))
        .await?
        .accounts;
    let (mut checked, mut snapshots, mut bad) = (0, 0, Vec::new());
    for home in homes {
        let ids: Vec<u64> = accounts
            .iter()
            .filter(|a| a.home == home.name)
            .map(|a| a.id)
            .collect();
        if ids.is_empty() {
            continue;
        }
        let mut s = StorageAdminClient::new(channel(&home.addr)?);
        // A full check reads every chunk: no short timeout.
        let verified = s
            .verify_accounts(pb::VerifyAccountsRequest { account_ids: ids })
            .await
            .map_err(|e| format!("verify on {}: {}", home.name, e.message()))?
            .into_inner()
            .accounts;
        for v in verified {
            checked += 1;
            snapshots += v.snapshots;
            if v.missing + v.corrupt > 0 {
                let name = accounts
                    .iter()
                    .find(|a| a.id == v.account_id)
                    .map_or("?", |a| a.name.as_str());
                bad.push(format!(
                    "{name} ({} missing, {} corrupt chunks)",
                    v.missing, v.corrupt
                ));
            }
        }
    }
    if bad.is_empty() {
        Ok(Ok(format!(
            "integrity check: {checked} accounts, {snapshots} snapshots intact"
        )))
    } else {
        Ok(Err(format!("integrity check failed for {}", bad.join(", "))))
    }
}
