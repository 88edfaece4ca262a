//! Logging in: find an account server among the endpoints, exchange the
//! token for a ticket, and open the home storage server with that ticket
//! attached to every call.

use std::future::Future;
use std::time::Duration;

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

/// How long one storage call keeps retrying while the server says the
/// account is over its per-account limits; after that the error goes to
/// the command's own retry.
const THROTTLED_FOR: Duration = Duration::from_secs(30);
const THROTTLED_MIN: Duration = Duration::from_millis(50);
const THROTTLED_MAX: Duration = Duration::from_secs(2);

/// Whether the server refused a call for the account's per-account limits
/// (not its quota, which waiting does not cure).
pub fn is_throttled(status: &Status) -> bool {
    status.code() == Code::ResourceExhausted && !duplex_rpc::client::is_quota(status)
}

/// The pauses [`throttled`] waits, for a caller that must redo more than
/// one call when it is refused (a backup whose upload stream was).
pub fn throttled_pauses() -> impl Iterator<Item = Duration> {
    duplex_rpc::backoff::pauses(THROTTLED_MIN, THROTTLED_MAX, THROTTLED_FOR)
}

/// Runs a storage call again, after a growing pause, while the server
/// refuses it with RESOURCE_EXHAUSTED: the account has too many calls in
/// flight or too many in the last second (`--max-streams-per-account`,
/// `--max-requests-per-account`). The server refuses such a call before
/// its handler runs, so sending it again is safe even for a commit; a
/// moment's wait is all it needs, not a new login. The pause is jittered
/// so an agent's threads do not come back in step.
pub async fn throttled<T, F, Fut>(call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    use duplex_rpc::backoff::Retryable;
    call.retry(duplex_rpc::backoff::policy(
        THROTTLED_MIN,
        THROTTLED_MAX,
        Some(THROTTLED_FOR),
    ))
    .when(is_throttled)
    .notify(|status, _| tracing::debug!(message = status.message(), "over the account's limit; waiting"))
    .await
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn throttled_calls_wait_and_retry_other_errors_return_at_once() {
        let calls = AtomicU32::new(0);
        let ok = throttled(|| async {
            if calls.fetch_add(1, Ordering::SeqCst) < 3 {
                Err(Status::resource_exhausted("account 1 has 32 calls in flight"))
            } else {
                Ok(7)
            }
        })
        .await;
        assert_eq!(ok.ok(), Some(7));
        assert_eq!(calls.load(Ordering::SeqCst), 4);

        calls.store(0, Ordering::SeqCst);
        let refused = throttled(|| async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(Status::unavailable("down"))
        })
        .await;
        assert_eq!(refused.map_err(|s| s.code()), Err(Code::Unavailable));
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        // An account that stays over its limit fails in the end, never
        // later than THROTTLED_FOR whatever the jitter drew (many draws).
        // (Tokio's timer rounds each pause up to the next millisecond, so
        // every attempt may add up to one.)
        for _ in 0..50 {
            calls.store(0, Ordering::SeqCst);
            let start = tokio::time::Instant::now();
            let exhausted = throttled(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(Status::resource_exhausted("busy"))
            })
            .await;
            assert_eq!(exhausted.map_err(|s| s.code()), Err(Code::ResourceExhausted));
            let rounding = Duration::from_millis(u64::from(calls.load(Ordering::SeqCst)));
            assert!(
                start.elapsed() <= THROTTLED_FOR + rounding,
                "{:?}",
                start.elapsed()
            );
            assert!(start.elapsed() >= THROTTLED_FOR / 2, "{:?}", start.elapsed());
        }
    }
}
