//! Wiring: open the store, announce this server to the account servers,
//! serve the gRPC services until shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use duplex_proto::MAX_MESSAGE_BYTES;
use duplex_proto::v1::account_admin_client::AccountAdminClient;
use duplex_proto::v1::storage_admin_server::StorageAdminServer;
use duplex_proto::v1::storage_service_server::StorageServiceServer;
use duplex_proto::v1::{RegisterStorageServerRequest, ServerInfo};
use duplex_rpc::{Bound, ServeError};
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::Routes;

use crate::auth::Auth;
use crate::service::StorageApi;
use crate::store::{Store, StoreError};

pub struct Config {
    pub data_dir: PathBuf,
    pub name: String,
    pub site: String,
    /// Address clients use to reach this server.
    pub advertise: String,
    /// Account servers to fetch ticket keys from and register with.
    pub account_servers: Vec<String>,
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
    let store = tokio::task::spawn_blocking(move || Store::open(&dir))
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
    };
    tracing::info!(name = %info.name, id = %info.id, addr = %info.addr, "storage server starting");
    tokio::spawn(register(
        info.clone(),
        config.account_servers.clone(),
        shutdown.clone(),
    ));
    let api = Arc::new(StorageApi {
        store: Arc::new(store),
        auth: Arc::new(Auth::new(config.account_servers)),
        info,
    });
    let data = StorageServiceServer::from_arc(api.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let admin = StorageAdminServer::from_arc(api);
    let names = [
        <StorageServiceServer<StorageApi> as NamedService>::NAME,
        <StorageAdminServer<StorageApi> as NamedService>::NAME,
    ];
    let routes = Routes::new(data).add_service(admin);
    duplex_rpc::serve(bound, &names, routes, shutdown).await?;
    Ok(())
}

/// Announces this server to the account servers, retrying until one accepts.
async fn register(info: ServerInfo, account_servers: Vec<String>, shutdown: CancellationToken) {
    let mut delay = Duration::from_millis(100);
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
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
