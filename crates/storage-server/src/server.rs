//! Wiring: open the store, announce this server to the account servers,
//! serve the gRPC services until shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use duplex_proto::MAX_MESSAGE_BYTES;
use duplex_proto::v1::account_admin_client::AccountAdminClient;
use duplex_proto::v1::storage_admin_server::StorageAdminServer;
use duplex_proto::v1::storage_service_server::StorageServiceServer;
use duplex_proto::v1::{HeartbeatRequest, OutboundLag, RegisterStorageServerRequest, ServerInfo};
use duplex_rpc::metrics::{Exposition, MetricsFn};
use duplex_rpc::{Bound, ServeError};
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::Routes;

use duplex_proto::v1::storage_replication_server::StorageReplicationServer;
use duplex_types::{AccountId, Epoch};

use crate::auth::Auth;
use crate::collector::Collector;
use crate::limits::{KeyFn, Limit, Limiter, Limits, PerKey};
use crate::mirroring::{Mirroring, Mode};
use crate::service::StorageApi;
use crate::store::gc::GcSettings;
use crate::store::mirror::{Role, RoleState};
use crate::store::{Store, StoreError};

pub struct Config {
    pub data_dir: PathBuf,
    /// Bytes of index pages kept in memory at most.
    pub index_cache: usize,
    pub name: String,
    pub site: String,
    /// Address clients use to reach this server.
    pub advertise: String,
    /// Address clients outside the servers' network use (empty: advertise).
    pub public_addr: String,
    /// Account servers to fetch ticket keys from and register with.
    pub account_servers: Vec<String>,
    /// Role on first start (afterwards the stored role wins).
    pub role: Role,
    pub primary: String,
    pub mirroring: Mode,
    pub sync_wait: Duration,
    pub coordinator: Option<duplex_rpc::heartbeat::Link>,
    pub secured: duplex_rpc::security::Secured,
    /// What one account may do at once on the data API.
    pub limits: Limits,
    /// Garbage collection: how, and how often (zero: on demand only).
    pub gc: GcSettings,
    pub gc_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot open the store in {dir}: {source}")]
    Store { dir: String, source: StoreError },
    #[error(transparent)]
    Serve(#[from] ServeError),
}

pub async fn run(config: Config, bound: Bound, shutdown: CancellationToken) -> Result<(), ServerError> {
    let dir = config.data_dir.clone();
    let index_cache = config.index_cache;
    let store = tokio::task::spawn_blocking(move || Store::open_with(&dir, index_cache))
        .await
        .map_err(|e| ServerError::Store {
            dir: config.data_dir.display().to_string(),
            source: StoreError::Invalid(e.to_string()),
        })?
        .map_err(|source| ServerError::Store {
            dir: config.data_dir.display().to_string(),
            source,
        })?;
    let info = ServerInfo {
        id: store.server_id().to_string(),
        name: config.name.clone(),
        site: config.site.clone(),
        kind: "storage".into(),
        addr: config.advertise.clone(),
        public_addr: config.public_addr.clone(),
    };
    tracing::info!(name = %info.name, id = %info.id, addr = %info.addr, "storage server starting");
    let role = match store.role() {
        Ok(Some(stored)) => stored,
        Ok(None) => {
            let initial = RoleState {
                role: config.role,
                epoch: Epoch(0),
                primary: config.primary.clone(),
            };
            store.save_role(&initial).map_err(|source| ServerError::Store {
                dir: config.data_dir.display().to_string(),
                source,
            })?;
            initial
        }
        Err(source) => {
            return Err(ServerError::Store {
                dir: config.data_dir.display().to_string(),
                source,
            });
        }
    };
    tracing::info!(role = role.role.as_str(), epoch = role.epoch.0, "role");
    let initial = role.role;
    let auth = Arc::new(Auth::new(
        config.coordinator.is_some().then(|| config.name.clone()),
        config.account_servers,
    ));
    let store = Arc::new(store);
    let collector = Arc::new(Collector::new(store.clone(), config.gc.clone()));
    tokio::spawn(collector.clone().background(config.gc_interval, shutdown.clone()));
    let api = Arc::new(StorageApi {
        collector,
        store,
        auth: auth.clone(),
        info,
        role: tokio::sync::RwLock::new(role),
        mirroring: Arc::new(Mirroring::new(config.mirroring, config.sync_wait)),
        shutdown: shutdown.clone(),
        lease: Arc::new(duplex_rpc::heartbeat::Lease::new(config.coordinator.is_some())),
        registered: std::sync::atomic::AtomicBool::new(false),
        sources: crate::pull::Sources::default(),
    });
    // Only a primary takes accounts. With a coordinator, it announces
    // itself once the coordinator confirms the role.
    if config.coordinator.is_none() {
        api.announce(initial);
    }
    if let Some(link) = config.coordinator.clone() {
        let assigned = api.clone();
        tokio::spawn(duplex_rpc::heartbeat::run(
            link,
            api.lease.clone(),
            heartbeat(api.clone()),
            move |a| {
                let api = assigned.clone();
                async move { api.apply_assignment(a).await }
            },
            shutdown.clone(),
        ));
    }
    let limiter = Limiter::new(config.limits, tokio::time::Instant::now());
    tracing::info!(
        streams = config.limits.streams.get(),
        requests_per_second = config.limits.rate.get(),
        "per-account limits on the data API"
    );
    let metrics = metrics(api.clone(), limiter.clone());
    // Only the data API is limited per account: the admin and replication
    // services are for servers and operators, checked by the guard.
    let data = tower::Layer::layer(
        &PerKey::new(limiter, ticket_account(auth)),
        StorageServiceServer::from_arc(api.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    let admin = StorageAdminServer::from_arc(api.clone());
    let replication = StorageReplicationServer::from_arc(api)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let names = [
        <StorageServiceServer<StorageApi> as NamedService>::NAME,
        <StorageAdminServer<StorageApi> as NamedService>::NAME,
        <StorageReplicationServer<StorageApi> as NamedService>::NAME,
    ];
    let routes = Routes::new(data).add_service(admin).add_service(replication);
    let access = duplex_rpc::serve::Access {
        secured: &config.secured,
        policy: crate::policy::rule,
    };
    duplex_rpc::serve(bound, &names, routes, Some(metrics), access, shutdown).await?;
    Ok(())
}

/// The account whose verified ticket a call carries: the per-account
/// limits' key. The handler verifies the ticket again for its own access
/// check; the signature check is cheap beside any call's work.
fn ticket_account(auth: Arc<Auth>) -> KeyFn<AccountId> {
    Arc::new(move |headers| {
        let auth = auth.clone();
        let metadata = tonic::metadata::MetadataMap::from_headers(headers.clone());
        Box::pin(async move { auth.account(&metadata).await })
    })
}

/// What this server tells the coordinator on each heartbeat.
fn heartbeat(
    api: Arc<StorageApi>,
) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = HeartbeatRequest> + Send>> {
    move || {
        let api = api.clone();
        Box::pin(async move {
            let role = api.role.read().await.clone();
            let status = api.status().await.ok();
            HeartbeatRequest {
                server: Some(api.info.clone()),
                role: role.role.as_str().into(),
                epoch: role.epoch.0,
                fenced: role.role == Role::Primary && !api.lease.valid(),
                degraded: api.mirroring.describe().starts_with("async (degraded"),
                position: status.as_ref().map_or(0, |s| s.seq),
                outbound: status
                    .map(|s| {
                        s.links_out
                            .into_iter()
                            .map(|l| OutboundLag {
                                destination_id: l.destination_id,
                                lag: l.lag,
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                ..Default::default()
            }
        })
    }
}

/// `/metrics`: role, epoch, feed sequence, stored data, mirroring state,
/// lag per link, calls refused by the per-account limits.
fn metrics(api: Arc<StorageApi>, limiter: Arc<Limiter<AccountId>>) -> MetricsFn {
    Arc::new(move || {
        let api = api.clone();
        let limiter = limiter.clone();
        Box::pin(async move {
            let mut e = Exposition::default();
            let name = api.info.name.clone();
            let l = [("server", name.as_str())];
            e.gauge("duplex_up", "1 while the server answers.", &l, 1.0);
            for limit in [Limit::Streams, Limit::Rate] {
                e.counter(
                    "duplex_account_limited_total",
                    "Data API calls refused because their account was over a per-account limit.",
                    &[("server", name.as_str()), ("limit", limit.as_str())],
                    limiter.refused(limit) as f64,
                );
            }
            let Ok(s) = api.status().await else {
                return e;
            };
            e.gauge(
                "duplex_storage_is_primary",
                "1 on a primary.",
                &l,
                f64::from(u8::from(s.role == "primary")),
            );
            e.gauge("duplex_epoch", "Epoch this server holds.", &l, s.epoch as f64);
            e.gauge(
                "duplex_storage_seq",
                "Last change-feed sequence.",
                &l,
                s.seq as f64,
            );
            e.gauge("duplex_storage_chunks", "Chunks stored.", &l, s.chunks as f64);
            e.gauge(
                "duplex_storage_snapshots",
                "Snapshots stored.",
                &l,
                s.snapshots as f64,
            );
            e.gauge(
                "duplex_storage_stored_bytes",
                "Chunk bytes stored.",
                &l,
                s.stored_bytes as f64,
            );
            e.gauge(
                "duplex_storage_sync_degraded",
                "1 while sync mirroring has degraded to async.",
                &l,
                f64::from(u8::from(s.mirroring.starts_with("async (degraded"))),
            );
            e.counter(
                "duplex_storage_sync_degradations_total",
                "Times sync mirroring degraded to async.",
                &l,
                api.mirroring
                    .degradations
                    .load(std::sync::atomic::Ordering::SeqCst) as f64,
            );
            e.gauge(
                "duplex_storage_accounts_behind",
                "Accounts with writes not yet mirrored.",
                &l,
                s.accounts_behind.len() as f64,
            );
            if let Ok(present) = api.store.answered_present() {
                e.counter(
                    "duplex_storage_dedup_hits_total",
                    "Chunks backups asked about that were already stored, so were not uploaded, since the server started.",
                    &l,
                    present as f64,
                );
            }
            if let Ok((swept, reclaimed)) = crate::service::blocking(&api.store, Store::gc_totals).await {
                e.counter(
                    "duplex_gc_swept_bytes_total",
                    "Chunk bytes garbage collection removed from the index.",
                    &l,
                    swept as f64,
                );
                e.counter(
                    "duplex_gc_reclaimed_bytes_total",
                    "Pack bytes garbage collection freed on disk.",
                    &l,
                    reclaimed as f64,
                );
            }
            if let Ok(usage) = crate::service::blocking(&api.store, Store::usage).await {
                account_metrics(&mut e, &name, usage);
            }
            for link in &s.links_out {
                let ll = [
                    ("server", name.as_str()),
                    ("destination", link.destination.as_str()),
                ];
                let lag = link.lag.unwrap_or_default();
                e.lag(&ll, &lag);
            }
            e
        })
    })
}

/// Accounts given series of their own on one server. Beyond it, the
/// accounts whose last backup is oldest are kept (those are what an
/// operator is paged about); the unlabelled oldest-backup gauge still
/// covers every account.
const MAX_ACCOUNT_SERIES: usize = 1000;

/// Per-account stored bytes and last-backup age, bounded by
/// [`MAX_ACCOUNT_SERIES`].
fn account_metrics(e: &mut Exposition, server: &str, mut usage: Vec<crate::store::AccountUsage>) {
    let now = crate::store::snapshots::now_ms();
    let age = |u: &crate::store::AccountUsage| (now - u.last_backup_unix_ms).max(0) as f64 / 1000.0;
    // Accounts with no snapshot yet have nothing to be late on.
    usage.retain(|u| u.last_backup_unix_ms > 0);
    usage.sort_by_key(|u| u.last_backup_unix_ms);
    if let Some(oldest) = usage.first() {
        e.gauge(
            "duplex_storage_oldest_backup_age_seconds",
            "Seconds since the newest snapshot of the account that has gone longest without one.",
            &[("server", server)],
            age(oldest),
        );
    }
    for u in usage.iter().take(MAX_ACCOUNT_SERIES) {
        let account = u.account.0.to_string();
        let l = [("server", server), ("account", account.as_str())];
        e.gauge(
            "duplex_storage_account_stored_bytes",
            "Chunk bytes the account holds on this server (deduplicated within the account).",
            &l,
            u.stored_bytes as f64,
        );
        e.gauge(
            "duplex_storage_account_last_backup_age_seconds",
            "Seconds since the account's newest snapshot on this server.",
            &l,
            age(u),
        );
    }
}

/// Announces this server to the account servers, retrying until one accepts.
pub async fn register(info: ServerInfo, account_servers: Vec<String>, shutdown: CancellationToken) {
    let mut backoff = duplex_rpc::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        for url in &account_servers {
            let Ok(channel) = duplex_rpc::channel(url) else {
                tracing::error!(%url, "invalid account server address");
                continue;
            };
            let request = RegisterStorageServerRequest {
                server: Some(info.clone()),
            };
            match AccountAdminClient::new(channel)
                .register_storage_server(request)
                .await
            {
                Ok(_) => {
                    tracing::info!(%url, "registered with account server");
                    return;
                }
                Err(status) => tracing::debug!(%url, %status, "registration failed; will retry"),
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff.next_pause()) => {}
        }
    }
}
