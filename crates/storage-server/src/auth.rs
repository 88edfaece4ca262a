//! Checks the account ticket on every storage call. Ticket keys come from
//! the account servers and are cached; an unknown key id triggers one
//! refresh (at most once a second), so key rotation needs no restart.

use std::time::{Duration, Instant};

use duplex_proto::TICKET_METADATA_KEY;
use duplex_proto::v1::account_service_client::AccountServiceClient;
use duplex_proto::v1::{GetTicketKeysRequest, TicketClaims};
use duplex_rpc::ticket::{TicketError, TicketVerifier, now_unix};
use duplex_types::AccountId;
use tokio::sync::{Mutex, RwLock};
use tonic::Status;
use tonic::metadata::MetadataMap;

const REFRESH_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// The authenticated account a call acts for.
pub struct Caller {
    pub account: AccountId,
    pub name: String,
}

pub struct Auth {
    verifier: RwLock<TicketVerifier>,
    account_servers: Vec<String>,
    last_refresh: Mutex<Option<Instant>>,
}

impl Auth {
    pub fn new(account_servers: Vec<String>) -> Self {
        Self {
            verifier: RwLock::new(TicketVerifier::default()),
            account_servers,
            last_refresh: Mutex::new(None),
        }
    }

    pub fn account_servers(&self) -> &[String] {
        &self.account_servers
    }

    pub async fn check(&self, metadata: &MetadataMap, access: Access) -> Result<Caller, Status> {
        let ticket = metadata
            .get_bin(TICKET_METADATA_KEY)
            .ok_or_else(|| unauthenticated(TicketError::Missing))?
            .to_bytes()
            .map_err(|_| unauthenticated(TicketError::Malformed))?;
        let key_id = TicketVerifier::key_id_of(&ticket).map_err(unauthenticated)?;
        if !self.verifier.read().await.knows(&key_id) {
            self.refresh().await;
        }
        let claims = self
            .verifier
            .read()
            .await
            .verify(&ticket, now_unix())
            .map_err(unauthenticated)?;
        authorize(claims, access)
    }

    async fn refresh(&self) {
        let mut last = self.last_refresh.lock().await;
        if last.is_some_and(|t| t.elapsed() < REFRESH_INTERVAL) {
            return;
        }
        *last = Some(Instant::now());
        for url in &self.account_servers {
            match fetch_keys(url).await {
                Ok(keys) => {
                    let bad = self.verifier.write().await.add_keys(&keys);
                    if bad > 0 {
                        tracing::warn!(%url, bad, "account server sent invalid ticket keys");
                    }
                    return;
                }
                Err(e) => tracing::warn!(%url, error = %e, "cannot fetch ticket keys"),
            }
        }
    }
}

async fn fetch_keys(url: &str) -> Result<Vec<duplex_proto::v1::TicketKey>, Status> {
    let channel = duplex_rpc::channel(url).map_err(|e| Status::unavailable(e.to_string()))?;
    let response = AccountServiceClient::new(channel)
        .get_ticket_keys(GetTicketKeysRequest {})
        .await?;
    Ok(response.into_inner().keys)
}

fn authorize(claims: TicketClaims, access: Access) -> Result<Caller, Status> {
    if access == Access::Write && !claims.can_write {
        return Err(Status::failed_precondition(format!(
            "backups are disabled for group {:?} (account {:?})",
            claims.group, claims.account_name
        )));
    }
    Ok(Caller {
        account: AccountId(claims.account_id),
        name: claims.account_name,
    })
}

fn unauthenticated(e: TicketError) -> Status {
    Status::unauthenticated(e.to_string())
}
