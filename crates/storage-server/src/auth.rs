//! Checks the account ticket on every storage call. Ticket keys come from
//! the account servers and are cached; an unknown key id triggers one
//! refresh (at most once a second), so key rotation needs no restart.

use std::sync::atomic::{AtomicU64, Ordering};
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
    /// The account's quota in stored bytes, as the ticket carries it.
    pub quota: Option<u64>,
    /// Its group's keep policy, applied after each snapshot (empty: keep all).
    pub keep: duplex_types::retention::KeepPolicy,
}

pub struct Auth {
    verifier: RwLock<TicketVerifier>,
    account_servers: Vec<String>,
    last_refresh: Mutex<Option<Instant>>,
    /// This server's name: write tickets must name it as the account's
    /// home. None without a coordinator: nothing then moves homes when an
    /// operator changes roles by hand, so the home is not checked.
    name: Option<String>,
    /// The newest account-master epoch seen in a write ticket. A deposed
    /// master (cut off, not yet told) may still sign tickets with stale
    /// homes; once a newer master's ticket has been seen, its are refused.
    newest_epoch: AtomicU64,
}

/// Metadata key naming the account's home on a refusal for the wrong home.
pub const HOME_METADATA_KEY: &str = "duplex-home";

impl Auth {
    pub fn new(name: Option<String>, account_servers: Vec<String>) -> Self {
        Self {
            verifier: RwLock::new(TicketVerifier::default()),
            account_servers,
            last_refresh: Mutex::new(None),
            name,
            newest_epoch: AtomicU64::new(0),
        }
    }

    pub fn account_servers(&self) -> &[String] {
        &self.account_servers
    }

    pub async fn check(&self, metadata: &MetadataMap, access: Access) -> Result<Caller, Status> {
        let claims = self.claims(metadata).await?;
        if access == Access::Write {
            self.check_home(&claims)?;
        }
        authorize(claims, access)
    }

    /// The account a call's ticket was signed for, if the ticket verifies;
    /// what the per-account limits key on, so a forged ticket naming
    /// another account cannot spend that account's budget.
    pub async fn account(&self, metadata: &MetadataMap) -> Option<AccountId> {
        let claims = self.claims(metadata).await.ok()?;
        Some(AccountId(claims.account_id))
    }

    async fn claims(&self, metadata: &MetadataMap) -> Result<TicketClaims, Status> {
        let ticket = metadata
            .get_bin(TICKET_METADATA_KEY)
            .ok_or_else(|| unauthenticated(TicketError::Missing))?
            .to_bytes()
            .map_err(|_| unauthenticated(TicketError::Malformed))?;
        let key_id = TicketVerifier::key_id_of(&ticket).map_err(unauthenticated)?;
        if !self.verifier.read().await.knows(&key_id) {
            self.refresh().await;
        }
        self.verifier
            .read()
            .await
            .verify(&ticket, now_unix())
            .map_err(unauthenticated)
    }

    /// A write ticket must be for this server, from a master no older than
    /// the newest one seen.
    fn check_home(&self, claims: &TicketClaims) -> Result<(), Status> {
        let Some(name) = &self.name else {
            return Ok(());
        };
        if &claims.home != name {
            let mut status = Status::failed_precondition(format!(
                "this ticket is for account {:?} at its home {:?}, not at {}; log in again to find its home",
                claims.account_name, claims.home, name
            ));
            if let Ok(home) = claims.home.parse() {
                status.metadata_mut().insert(HOME_METADATA_KEY, home);
            }
            return Err(status);
        }
        let newest = self.newest_epoch.fetch_max(claims.epoch, Ordering::SeqCst);
        if claims.epoch < newest {
            return Err(Status::aborted(format!(
                "this ticket was signed by an account master at epoch {}, older than epoch {newest}; log in again",
                claims.epoch
            )));
        }
        Ok(())
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
        quota: (claims.quota_bytes > 0).then_some(claims.quota_bytes),
        keep: claims.keep.map(Into::into).unwrap_or_default(),
    })
}

fn unauthenticated(e: TicketError) -> Status {
    Status::unauthenticated(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(home: &str, epoch: u64) -> TicketClaims {
        TicketClaims {
            account_id: 1,
            account_name: "demo".into(),
            home: home.into(),
            epoch,
            ..Default::default()
        }
    }

    #[test]
    fn write_tickets_are_for_this_home_from_the_newest_master() {
        let auth = Auth::new(Some("storage-a".into()), Vec::new());
        let wrong = auth
            .check_home(&claims("storage-b", 3))
            .expect_err("another home");
        assert_eq!(wrong.code(), tonic::Code::FailedPrecondition);
        assert!(wrong.message().contains("storage-b"), "{}", wrong.message());
        assert_eq!(
            wrong.metadata().get(HOME_METADATA_KEY).map(|v| v.to_str().ok()),
            Some(Some("storage-b"))
        );
        auth.check_home(&claims("storage-a", 3)).expect("this home");
        auth.check_home(&claims("storage-a", 5)).expect("a newer master");
        let stale = auth
            .check_home(&claims("storage-a", 4))
            .expect_err("a deposed master");
        assert_eq!(stale.code(), tonic::Code::Aborted);
    }
}
