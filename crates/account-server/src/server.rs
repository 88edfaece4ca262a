//! Wiring: open the account store, make sure a ticket key exists, serve.

use std::path::PathBuf;
use std::sync::Arc;

use duplex_proto::v1::ServerInfo;
use duplex_proto::v1::account_admin_server::AccountAdminServer;
use duplex_proto::v1::account_service_server::AccountServiceServer;
use duplex_rpc::ticket::TicketSigner;
use duplex_rpc::{Bound, ServeError};
use duplex_types::Epoch;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::Routes;

use crate::error::AccountError;
use crate::service::AccountApi;
use crate::store::AccountStore;

pub struct Config {
    pub data_dir: PathBuf,
    pub name: String,
    pub site: String,
    pub advertise: String,
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
    let epoch = Epoch(0);
    let opened = tokio::task::spawn_blocking(move || {
        let store = AccountStore::open(&path)?;
        let secret = store.ensure_ticket_secret(epoch, TicketSigner::generate_secret())?;
        Ok::<_, AccountError>((store, secret))
    })
    .await
    .map_err(|e| ServerError::Store {
        dir: dir.clone(),
        source: AccountError::Corrupt(e.to_string()),
    })?;
    let (store, secret) = opened.map_err(|source| ServerError::Store { dir, source })?;
    let info = ServerInfo {
        id: store.server_id().to_string(),
        name: config.name,
        site: config.site,
        kind: "account".into(),
        addr: config.advertise,
    };
    tracing::info!(name = %info.name, id = %info.id, addr = %info.addr, "account server starting");
    let api = Arc::new(AccountApi {
        store: Arc::new(store),
        signer: Arc::new(TicketSigner::from_secret(&secret)),
        info,
        epoch,
    });
    let names = [
        <AccountServiceServer<AccountApi> as NamedService>::NAME,
        <AccountAdminServer<AccountApi> as NamedService>::NAME,
    ];
    let routes = Routes::new(AccountServiceServer::from_arc(api.clone()))
        .add_service(AccountAdminServer::from_arc(api));
    duplex_rpc::serve(bound, &names, routes, shutdown).await?;
    Ok(())
}
