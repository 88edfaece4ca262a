//! Finding the servers to talk to from any entry point. A coordinator
//! answers with its topology (current roles, addresses, health); any other
//! endpoint is taken to be an account server. Clients call this again after
//! a failure, so a failover takes effect in them without DNS changes or a
//! virtual IP.

use std::time::Duration;

use duplex_proto::v1::coordinator_client::CoordinatorClient;
use duplex_proto::v1::{GetTopologyRequest, ServerInfo, Topology};
use tonic::Code;

const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// The address a client should dial: the public one when the server has one.
pub fn client_addr(server: &ServerInfo) -> String {
    if server.public_addr.is_empty() {
        server.addr.clone()
    } else {
        server.public_addr.clone()
    }
}

/// The topology from `url` if it is a reachable coordinator (from the
/// leader it names, if it follows).
pub async fn topology(url: &str) -> Result<Topology, tonic::Status> {
    match ask_topology(url).await {
        Err(status) => match crate::leader::hint(&status) {
            // The named leader may be the one that just died: then this
            // is still a coordinator that follows, not an account server.
            Some(leader) => ask_topology(&leader).await.map_err(|_| status),
            None => Err(status),
        },
        answer => answer,
    }
}

async fn ask_topology(url: &str) -> Result<Topology, tonic::Status> {
    let channel = crate::channel(url).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
    let mut client = CoordinatorClient::new(channel);
    match tokio::time::timeout(ASK_TIMEOUT, client.get_topology(GetTopologyRequest {})).await {
        Ok(result) => result.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::unavailable(format!(
            "{url} did not answer in time"
        ))),
    }
}

/// Account servers reachable through `endpoints`, the master first, then
/// healthy slaves, then everything else; without duplicates.
pub async fn account_servers(endpoints: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for url in endpoints {
        match topology(url).await {
            Ok(t) => {
                let mut servers: Vec<_> = t
                    .servers
                    .iter()
                    .filter(|s| s.server.as_ref().is_some_and(|i| i.kind == "account"))
                    .collect();
                servers.sort_by_key(|s| (s.role != "master", !s.healthy));
                out.extend(
                    servers
                        .into_iter()
                        .filter_map(|s| s.server.as_ref().map(client_addr)),
                );
            }
            // A coordinator that follows, with no leader to point to:
            // an election is under way, and it is no account server.
            Err(status) if crate::leader::from_follower(&status) => {}
            // Not a coordinator (or not reachable now): use it as it is.
            Err(status) if status.code() == Code::Unimplemented => out.push(url.clone()),
            Err(_) => out.push(url.clone()),
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|u| seen.insert(u.clone()));
    out
}

/// Waits until the topology published by a coordinator among `endpoints`
/// changes (a server went down, a phase of a failover, a new primary), or
/// `at_most` passes; returns at once after `at_most` when no coordinator
/// is reachable. Clients call this between retries instead of sleeping
/// blindly, so they retry the moment a failover makes progress.
pub async fn wait_for_change(endpoints: &[String], at_most: Duration) {
    let deadline = tokio::time::Instant::now() + at_most;
    let watch = async {
        for url in endpoints {
            let Ok(channel) = crate::channel(url) else {
                continue;
            };
            let mut client = CoordinatorClient::new(channel);
            let Ok(Ok(response)) =
                tokio::time::timeout(ASK_TIMEOUT, client.watch_topology(GetTopologyRequest {})).await
            else {
                continue;
            };
            let mut stream = response.into_inner();
            // The first message is the topology as it is now.
            if let Ok(Some(_)) = stream.message().await {
                let _ = stream.message().await;
                return;
            }
        }
        std::future::pending::<()>().await;
    };
    let _ = tokio::time::timeout_at(deadline, watch).await;
}
