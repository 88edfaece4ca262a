//! The account's wrapped keys on the account servers: fetching them,
//! unlocking one with the passphrase, creating the first on first use, and
//! adding or removing wrappings for `duplex key`.

use std::sync::Arc;

use duplex_proto::v1::account_service_client::AccountServiceClient;
use duplex_proto::v1::{GetKeysRequest, KeyRecord, PutKeyRequest, RemoveKeyRequest};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::AgentError;
use crate::crypto::{self, Keys};
use crate::secret::Passphrase;
use crate::session::Options;

/// An unlocked account: its keys and the record the passphrase opened.
pub struct Unlocked {
    pub keys: Arc<Keys>,
    pub record_id: String,
}

/// The account servers to ask, master first, with the account's token.
pub struct KeyService {
    urls: Vec<String>,
    token: String,
}

impl KeyService {
    pub async fn discover(options: &Options) -> KeyService {
        KeyService {
            urls: duplex_rpc::discovery::account_servers(&options.endpoints).await,
            token: options.token.clone(),
        }
    }

    /// Runs `call` on each account server in turn until one answers; a
    /// server that is down or is a slave refusing a write passes it on.
    async fn each<T, F, Fut>(&self, what: &str, call: F) -> Result<T, AgentError>
    where
        F: Fn(AccountServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut last = None;
        for url in &self.urls {
            let client = AccountServiceClient::new(duplex_rpc::channel(url)?);
            match call(client).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if try_next(&status) => {
                    last = Some(AgentError::rpc(format!("{what} at {url}"))(status));
                }
                Err(status) => return Err(AgentError::rpc(format!("{what} at {url}"))(status)),
            }
        }
        Err(last.unwrap_or_else(|| AgentError::Invalid("no account server answered".into())))
    }

    pub async fn list(&self) -> Result<Vec<KeyRecord>, AgentError> {
        let token = self.token.clone();
        let response = self
            .each("fetching the account's keys", |mut c| {
                let token = token.clone();
                async move { c.get_keys(GetKeysRequest { token }).await }
            })
            .await?;
        Ok(response.keys)
    }

    async fn put(&self, key: KeyRecord, first: bool) -> Result<KeyRecord, AgentError> {
        let request = PutKeyRequest {
            token: self.token.clone(),
            key: Some(key),
        };
        self.each("storing a key", |mut c| {
            let request = request.clone();
            async move {
                if first {
                    c.init_key(request).await
                } else {
                    c.add_key(request).await
                }
            }
        })
        .await
    }

    pub async fn remove(&self, id: &str) -> Result<Vec<KeyRecord>, AgentError> {
        let request = RemoveKeyRequest {
            token: self.token.clone(),
            id: id.to_owned(),
        };
        let response = self
            .each("removing a key", |mut c| {
                let request = request.clone();
                async move { c.remove_key(request).await }
            })
            .await?;
        Ok(response.keys)
    }

    /// Wraps the unlocked master key under `passphrase` as another record.
    pub async fn add(&self, unlocked: &Unlocked, passphrase: &Passphrase) -> Result<KeyRecord, AgentError> {
        let record = wrap_blocking(*unlocked.keys.master(), passphrase.clone()).await?;
        self.put(record, false).await
    }
}

/// Opens the account's keys with `passphrase`. With no key yet: with
/// `create`, makes the master key and stores its first wrapping (if
/// another agent won that race, its key is fetched and opened instead);
/// without, None.
pub async fn unlock(
    service: &KeyService,
    account: &str,
    passphrase: &Passphrase,
    create: bool,
) -> Result<Option<Unlocked>, AgentError> {
    let mut records = service.list().await?;
    if records.is_empty() {
        if !create {
            return Ok(None);
        }
        let keys = Keys::generate();
        let record = wrap_blocking(*keys.master(), passphrase.clone()).await?;
        match service.put(record.clone(), true).await {
            Ok(stored) => {
                return Ok(Some(Unlocked {
                    keys: Arc::new(keys),
                    record_id: stored.id,
                }));
            }
            Err(AgentError::Rpc { status, .. }) if status.code() == Code::AlreadyExists => {
                records = service.list().await?;
            }
            Err(e) => return Err(e),
        }
    }
    for record in records {
        let id = record.id.clone();
        let pass = passphrase.clone();
        let opened = tokio::task::spawn_blocking(move || crypto::unwrap(&record, &pass))
            .await
            .map_err(|e| AgentError::Invalid(format!("key derivation task failed: {e}")))??;
        if let Some(keys) = opened {
            return Ok(Some(Unlocked {
                keys: Arc::new(keys),
                record_id: id,
            }));
        }
    }
    Err(AgentError::WrongPassphrase(account.to_owned()))
}

/// Argon2 takes a few hundred milliseconds of CPU: off the async threads.
async fn wrap_blocking(master: [u8; 32], passphrase: Passphrase) -> Result<KeyRecord, AgentError> {
    let master = zeroize::Zeroizing::new(master);
    tokio::task::spawn_blocking(move || crypto::wrap(&master, &passphrase))
        .await
        .map_err(|e| AgentError::Invalid(format!("key derivation task failed: {e}")))?
}

/// A server that is down, or a slave refusing a write: ask the next.
fn try_next(status: &Status) -> bool {
    duplex_rpc::client::is_retryable(status.code())
        || status.code() == Code::Unknown
        || (status.code() == Code::FailedPrecondition && status.metadata().get("duplex-master").is_some())
}
