//! Wiring: open the account store, settle the role (the stored one wins
//! over flags, so a demoted master never comes back as master by itself),
//! start replication, serve.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use duplex_proto::MAX_MESSAGE_BYTES;
use duplex_proto::v1::account_admin_server::AccountAdminServer;
use duplex_proto::v1::account_replication_server::AccountReplicationServer;
use duplex_proto::v1::account_service_server::AccountServiceServer;
use duplex_proto::v1::{HeartbeatRequest, ServerInfo};
use duplex_rpc::audit::Outbox;
use duplex_rpc::heartbeat::Lease;
use duplex_rpc::metrics::{Exposition, MetricsFn};
use duplex_rpc::ticket::TicketSigner;
use duplex_rpc::{Bound, ServeError};
use duplex_types::Epoch;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::Routes;

use crate::error::AccountError;
use crate::hub::{Hub, Mode};
use crate::node::Node;
use crate::replication::ReplicationApi;
use crate::service::AccountApi;
use crate::store::{AccountStore, RoleState, meta};

pub struct Config {
    pub data_dir: PathBuf,
    pub name: String,
    pub site: String,
    pub advertise: String,
    /// Address clients outside the servers' network use (empty: advertise).
    pub public_addr: String,
    /// Start as a slave of this master (ignored once a role is stored).
    pub master: Option<String>,
    pub mode: Mode,
    pub sync_timeout: Duration,
    pub snapshot_interval: Duration,
    pub coordinator: Option<duplex_rpc::heartbeat::Link>,
    pub secured: duplex_rpc::security::Secured,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot open the account store in {dir}: {source}")]
    Store { dir: String, source: AccountError },
    #[error(transparent)]
    Serve(#[from] ServeError),
}

pub async fn run(config: Config, bound: Bound, shutdown: CancellationToken) -> Result<(), ServerError> {
    let dir = config.data_dir.display().to_string();
    let path = config.data_dir.join("accounts.redb");
    let master = config.master.clone();
    let opened = tokio::task::spawn_blocking(move || open(&path, master))
        .await
        .map_err(|e| ServerError::Store {
            dir: dir.clone(),
            source: AccountError::Corrupt(e.to_string()),
        })?;
    let (store, role) = opened.map_err(|source| ServerError::Store { dir, source })?;
    let info = ServerInfo {
        id: store.server_id().to_string(),
        name: config.name,
        site: config.site,
        kind: "account".into(),
        addr: config.advertise,
        public_addr: config.public_addr,
    };
    tracing::info!(name = %info.name, id = %info.id, addr = %info.addr, master = role.is_master,
        epoch = role.epoch.0, "account server starting");
    let last = store.last_lsn().map_err(|source| ServerError::Store {
        dir: config.data_dir.display().to_string(),
        source,
    })?;
    let hub = Arc::new(Hub::new(config.mode, config.sync_timeout, last.0));
    let node = Node::new(
        Arc::new(store),
        info,
        hub,
        config.data_dir,
        role,
        Arc::new(Lease::new(config.coordinator.is_some())),
        shutdown.clone(),
    );
    tokio::spawn(snapshot_timer(
        node.clone(),
        config.snapshot_interval,
        shutdown.clone(),
    ));

    if let Some(link) = config.coordinator.clone() {
        let assigned = node.clone();
        tokio::spawn(duplex_rpc::heartbeat::run(
            link,
            node.lease.clone(),
            heartbeat(node.clone()),
            move |a| {
                let node = assigned.clone();
                async move { node.apply_assignment(a).await }
            },
            shutdown.clone(),
        ));
    }
    // Without a coordinator there is no history to feed: nothing is queued.
    let audit = config.coordinator.as_ref().map(|link| link.audit.clone());
    let metrics = metrics(node.clone(), audit.clone());
    let api = Arc::new(AccountApi::new(node.clone(), audit));
    let replication = AccountReplicationServer::new(ReplicationApi { node })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let names = [
        <AccountServiceServer<AccountApi> as NamedService>::NAME,
        <AccountAdminServer<AccountApi> as NamedService>::NAME,
        <AccountReplicationServer<ReplicationApi> as NamedService>::NAME,
    ];
    let routes = Routes::new(AccountServiceServer::from_arc(api.clone()))
        .add_service(AccountAdminServer::from_arc(api))
        .add_service(replication);
    let access = duplex_rpc::serve::Access {
        secured: &config.secured,
        policy: crate::policy::rule,
    };
    duplex_rpc::serve(bound, &names, routes, Some(metrics), access, shutdown).await?;
    Ok(())
}

/// What this server tells the coordinator on each heartbeat (cheap: it
/// runs several times a second).
fn heartbeat(
    node: Arc<Node>,
) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = HeartbeatRequest> + Send>> {
    move || {
        let node = node.clone();
        Box::pin(async move {
            let role = node.role().await;
            let store = node.store.clone();
            let (lsn, log_bytes, divergent_entries, divergence_report) =
                tokio::task::spawn_blocking(move || {
                    Ok::<_, AccountError>((
                        store.last_lsn()?.0,
                        store.meta_u64(meta::LOG_BYTES)?,
                        store.meta_u64(meta::DIVERGENT)?,
                        store.meta_str(meta::DIVERGENCE_REPORT)?,
                    ))
                })
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            let lag = (!role.is_master).then(|| {
                node.progress
                    .lock()
                    .map(|p| p.lag(lsn, log_bytes))
                    .unwrap_or_default()
            });
            HeartbeatRequest {
                server: Some(node.info.clone()),
                role: if role.is_master { "master" } else { "slave" }.into(),
                epoch: role.epoch.0,
                lag,
                fenced: role.is_master && !node.lease.valid(),
                degraded: node.hub.is_degraded(),
                position: lsn,
                divergent_entries,
                divergence_report,
                ..Default::default()
            }
        })
    }
}

/// `/metrics`: role, epoch, LSN, replication state and lag.
fn metrics(node: Arc<Node>, audit: Option<Arc<Outbox>>) -> MetricsFn {
    Arc::new(move || {
        let node = node.clone();
        let audit = audit.clone();
        Box::pin(async move {
            let mut e = Exposition::default();
            let name = node.info.name.clone();
            let l = [("server", name.as_str())];
            e.gauge("duplex_up", "1 while the server answers.", &l, 1.0);
            let Ok(s) = node.status().await else {
                return e;
            };
            e.gauge(
                "duplex_account_is_master",
                "1 on the master, 0 on a slave.",
                &l,
                f64::from(u8::from(s.role == "master")),
            );
            e.gauge("duplex_epoch", "Epoch this server holds.", &l, s.epoch as f64);
            e.gauge(
                "duplex_account_lsn",
                "Last LSN written or applied.",
                &l,
                s.lsn as f64,
            );
            e.gauge("duplex_account_accounts", "Accounts held.", &l, s.accounts as f64);
            e.gauge(
                "duplex_account_sync_degraded",
                "1 while sync replication has degraded to async.",
                &l,
                f64::from(u8::from(node.hub.is_degraded())),
            );
            e.counter(
                "duplex_account_sync_degradations_total",
                "Times sync replication degraded to async.",
                &l,
                node.hub.degradations.load(std::sync::atomic::Ordering::SeqCst) as f64,
            );
            e.gauge(
                "duplex_account_divergent_entries",
                "Entries found divergent at rejoin.",
                &l,
                s.divergent_entries as f64,
            );
            if let Some(lag) = s.lag {
                e.lag(&l, &lag);
            }
            if let Some(audit) = &audit {
                e.gauge(
                    "duplex_audit_pending",
                    "Operator actions not yet in the coordinator's history.",
                    &l,
                    audit.len() as f64,
                );
                e.counter(
                    "duplex_audit_dropped_total",
                    "Operator actions dropped before the coordinator took them (queue full).",
                    &l,
                    audit.dropped() as f64,
                );
            }
            for slave in &s.slaves {
                let slave_name = slave.server.as_ref().map(|x| x.name.clone()).unwrap_or_default();
                let records = slave.lag.map_or(0, |x| x.records);
                e.gauge(
                    "duplex_account_slave_lag_records",
                    "Records a slave is behind this master.",
                    &[("server", name.as_str()), ("slave", slave_name.as_str())],
                    records as f64,
                );
            }
            e
        })
    })
}

/// Opens the store and settles the role. A master with no ticket key yet
/// creates one (a logged write, so slaves share it).
fn open(path: &std::path::Path, master: Option<String>) -> Result<(AccountStore, RoleState), AccountError> {
    let store = AccountStore::open(path)?;
    let role = match store.role()? {
        Some(stored) => stored,
        None => {
            let initial = RoleState {
                is_master: master.is_none(),
                epoch: Epoch(0),
                master: master.unwrap_or_default(),
            };
            store.save_role(&initial)?;
            initial
        }
    };
    if role.is_master {
        store.ensure_ticket_secret(role.epoch, TicketSigner::generate_secret())?;
    }
    Ok((store, role))
}

async fn snapshot_timer(node: Arc<Node>, every: Duration, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if node.role().await.is_master {
            node.snapshot_in_background("periodic");
        }
    }
}
