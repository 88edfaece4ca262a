//! Logging in: find an account server among the endpoints, exchange the
//! token for a ticket, and open the home storage server with that ticket
//! attached to every call.

use duplex_proto::v1::account_service_client::AccountServiceClient;
use duplex_proto::v1::storage_service_client::StorageServiceClient;
use duplex_proto::v1::{AccountView, LoginRequest, Purpose, ServerInfo};
use duplex_proto::{MAX_MESSAGE_BYTES, TICKET_METADATA_KEY};
use tonic::metadata::{BinaryMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::AgentError;

/// Where to reach the platform and as whom.
#[derive(Clone, Debug)]
pub struct Options {
    pub endpoints: Vec<String>,
    pub token: String,
    /// Talk to this storage server directly instead of the account's home.
    pub storage: Option<String>,
}

#[derive(Clone)]
pub struct TicketAuth(BinaryMetadataValue);

impl Interceptor for TicketAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert_bin(TICKET_METADATA_KEY, self.0.clone());
        Ok(request)
    }
}

pub type StorageClient = StorageServiceClient<InterceptedService<Channel, TicketAuth>>;

pub struct Session {
    pub storage: StorageClient,
    pub account: AccountView,
    pub home: ServerInfo,
    /// URL actually used for storage calls.
    pub storage_url: String,
}

/// Logs in through the first endpoint that answers.
pub async fn login(options: &Options, purpose: Purpose) -> Result<Session, AgentError> {
    if options.endpoints.is_empty() {
        return Err(AgentError::Invalid(
            "no endpoint: pass --endpoint URL or set DUPLEX_ENDPOINT".into(),
        ));
    }
    if options.token.is_empty() {
        return Err(AgentError::Invalid(
            "no token: pass --token or set DUPLEX_TOKEN".into(),
        ));
    }
    let mut last = None;
    for url in &duplex_rpc::discovery::account_servers(&options.endpoints).await {
        let mut client = AccountServiceClient::new(duplex_rpc::channel(url)?);
        let request = LoginRequest {
            token: options.token.clone(),
            purpose: purpose as i32,
        };
        match client.login(request).await {
            Ok(response) => return open(options, response.into_inner()),
            Err(status)
                if duplex_rpc::client::is_retryable(status.code()) || status.code() == Code::Unknown =>
            {
                tracing::debug!(%url, %status, "endpoint unavailable; trying the next");
                last = Some(AgentError::rpc(format!("login at {url}"))(status));
            }
            Err(status) => return Err(AgentError::rpc(format!("login at {url}"))(status)),
        }
    }
    Err(last.unwrap_or_else(|| AgentError::Invalid("no endpoint answered".into())))
}

fn open(options: &Options, login: duplex_proto::v1::LoginResponse) -> Result<Session, AgentError> {
    let home = login
        .home
        .ok_or_else(|| AgentError::Invalid("account server sent no home server".into()))?;
    let account = login
        .account
        .ok_or_else(|| AgentError::Invalid("account server sent no account".into()))?;
    let storage_url = options
        .storage
        .clone()
        .unwrap_or_else(|| duplex_rpc::discovery::client_addr(&home));
    let mut ticket = MetadataValue::from_bytes(&login.ticket);
    // A bearer credential: kept out of tonic's and hyper's debug output.
    ticket.set_sensitive(true);
    let storage =
        StorageServiceClient::with_interceptor(duplex_rpc::channel(&storage_url)?, TicketAuth(ticket))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
    Ok(Session {
        storage,
        account,
        home,
        storage_url,
    })
}
