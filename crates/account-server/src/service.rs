//! Thin gRPC handlers over the account store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use duplex_proto::v1::account_admin_server::AccountAdmin;
use duplex_proto::v1::account_service_server::AccountService;
use duplex_proto::v1::{
    AccountRecord, AccountServerStatus, AccountView, CreateAccountRequest, CreateAccountResponse,
    CreateAccountsRequest, CreateAccountsResponse, DeleteAccountRequest, DeleteAccountResponse,
    GetAccountStatusRequest, GetKeysRequest, GetKeysResponse, GetTicketKeysRequest, GetTicketKeysResponse,
    GroupView, KeepPolicy, KeyRecord, ListAccountsRequest, ListAccountsResponse, ListGroupsRequest,
    ListGroupsResponse, ListStorageServersRequest, ListStorageServersResponse, LoginRequest, LoginResponse,
    MoveHomesRequest, MoveHomesResponse, Purpose, PutKeyRequest, ReapplyRequest, ReapplyResponse,
    ReapplyResult, RegisterStorageServerRequest, RegisterStorageServerResponse, RemoveKeyRequest,
    RotateTokenRequest, ServerInfo, SetGroupEnabledRequest, SetGroupPolicyRequest, SetQuotaRequest,
    TicketClaims,
};
use duplex_rpc::audit::Outbox;
use duplex_rpc::auth::{Caller, Who, caller};
use duplex_rpc::ticket::{TicketSigner, now_unix};
use duplex_types::{Epoch, NameKind, ServerId, validate_name};
use tonic::{Request, Response, Status};

use crate::error::AccountError;
use crate::node::Node;
use crate::store::{AccountStore, NewAccount};

/// How long a ticket stays valid. Short, so a disabled group or a moved
/// home takes effect within minutes even for a client that never logs in again.
pub const TICKET_TTL: Duration = Duration::from_secs(15 * 60);
const DEFAULT_GROUP: &str = "default";
/// Most accounts one bulk import may create.
const MAX_BULK: usize = 20_000;

pub struct AccountApi {
    pub node: Arc<Node>,
    /// Loaded on first use: a slave learns the secret through replication.
    signer: std::sync::Mutex<Option<Arc<TicketSigner>>>,
    /// Operator actions on their way to the coordinator's history (none
    /// without a coordinator).
    outbox: Option<Arc<Outbox>>,
}

impl AccountApi {
    pub fn new(node: Arc<Node>, outbox: Option<Arc<Outbox>>) -> Self {
        Self {
            node,
            signer: std::sync::Mutex::new(None),
            outbox,
        }
    }

    /// Logs an operator's action here and queues it for the coordinator's
    /// history. Called only after the write succeeded: a refused or failed
    /// call changed nothing.
    fn audit(&self, caller: &Caller, detail: String) {
        // The coordinator's own calls (failback disabling groups) are in
        // history already, as the operation that made them.
        if !matches!(caller.who, Who::Operator { .. }) {
            return;
        }
        tracing::info!(by = %caller.describe(), %detail, "operator action");
        if let Some(outbox) = &self.outbox {
            outbox.record(caller, detail);
        }
    }

    fn store(&self) -> &Arc<AccountStore> {
        &self.node.store
    }

    async fn signer(&self) -> Result<Arc<TicketSigner>, Status> {
        if let Some(s) = self.signer.lock().ok().and_then(|s| s.clone()) {
            return Ok(s);
        }
        let secret = blocking(self.store(), AccountStore::ticket_secret)
            .await?
            .ok_or_else(|| {
                Status::unavailable("this account server has not received its state from the master yet")
            })?;
        let signer = Arc::new(TicketSigner::from_secret(&secret));
        if let Ok(mut s) = self.signer.lock() {
            *s = Some(signer.clone());
        }
        Ok(signer)
    }

    /// Runs one write on the master: refused on a slave (naming the
    /// master), and in sync mode acknowledged only once a slave has it.
    async fn write<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&AccountStore, Epoch) -> Result<T, AccountError> + Send + 'static,
    {
        let role = self.node.write_guard().await?;
        let epoch = role.epoch;
        let (lease, name) = (self.node.lease.clone(), self.node.info.name.clone());
        let (value, lsn) = blocking(self.store(), move |s| {
            // Checked again at the last moment: the blocking pool may have
            // kept this write waiting while the lease ran out.
            lease.check(&name).map_err(AccountError::Fenced)?;
            let value = f(s, epoch)?;
            Ok((value, s.last_lsn()?))
        })
        .await?;
        // A write that outlived the lease is not acknowledged: a new master
        // may exist, and this entry will show in its divergence report.
        self.node.lease.check(&self.node.info.name)?;
        self.node.hub.committed(lsn.0);
        self.node.hub.wait_replicated(lsn.0).await;
        drop(role);
        Ok(value)
    }

    fn new_account(&self, req: CreateAccountRequest) -> Result<(NewAccount, String), Status> {
        validate_name(NameKind::Account, &req.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let group = if req.group.is_empty() {
            DEFAULT_GROUP.to_owned()
        } else {
            req.group
        };
        validate_name(NameKind::Group, &group).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let home = (!req.home.is_empty()).then_some(req.home);
        if let Some(h) = &home {
            validate_name(NameKind::Server, h).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let token = new_token();
        let new = NewAccount {
            name: req.name,
            group,
            token_hash: hash_token(&token),
            home,
            quota_bytes: req.quota_bytes,
        };
        Ok((new, token))
    }
}

async fn blocking<T, F>(store: &Arc<AccountStore>, f: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce(&AccountStore) -> Result<T, AccountError> + Send + 'static,
{
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| Status::internal(format!("account task failed: {e}")))?
        .map_err(Status::from)
}

/// Most names one audit detail lists; the rest are counted.
const NAMES_SHOWN: usize = 5;

/// How history describes a bulk import: how many, which groups, the first
/// few names.
fn imported(records: &[AccountRecord]) -> String {
    let mut groups: Vec<&str> = records.iter().map(|r| r.group.as_str()).collect();
    groups.sort_unstable();
    groups.dedup();
    format!(
        "created {} accounts ({}) in group{} {}",
        records.len(),
        listed(records.iter().map(|r| r.name.as_str()), records.len()),
        if groups.len() == 1 { "" } else { "s" },
        listed(groups.iter().copied(), groups.len()),
    )
}

fn listed<'a>(names: impl Iterator<Item = &'a str>, count: usize) -> String {
    let mut shown: Vec<&str> = names.take(NAMES_SHOWN).collect();
    let more = count.saturating_sub(shown.len());
    let more = (more > 0).then(|| format!("and {more} more"));
    shown.extend(more.as_deref());
    shown.join(", ")
}

pub fn hash_token(token: &str) -> [u8; 32] {
    *blake3::hash(token.as_bytes()).as_bytes()
}

fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("dpx_{}", hex::encode(bytes))
}

fn view(record: &AccountRecord, servers: &HashMap<String, ServerInfo>) -> AccountView {
    AccountView {
        id: record.id,
        name: record.name.clone(),
        group: record.group.clone(),
        home: servers
            .get(&record.home_id)
            .map(|s| s.name.clone())
            .unwrap_or_default(),
        home_id: record.home_id.clone(),
        quota_bytes: record.quota_bytes,
    }
}

fn servers_by_id(store: &AccountStore) -> Result<HashMap<String, ServerInfo>, AccountError> {
    Ok(store
        .storage_servers()?
        .into_iter()
        .map(|s| (s.id.clone(), s))
        .collect())
}

#[tonic::async_trait]
impl AccountService for AccountApi {
    async fn login(&self, request: Request<LoginRequest>) -> Result<Response<LoginResponse>, Status> {
        let req = request.into_inner();
        if req.token.is_empty() || req.token.len() > 256 {
            return Err(Status::unauthenticated("unknown or revoked token"));
        }
        let purpose = Purpose::try_from(req.purpose)
            .map_err(|_| Status::invalid_argument(format!("unknown purpose {}", req.purpose)))?;
        let hash = hash_token(&req.token);
        let login = blocking(self.store(), move |s| s.login_view(&hash)).await?;
        let (record, enabled, keep) = (login.account, login.enabled, login.keep);
        if purpose == Purpose::Backup && !enabled {
            return Err(Status::failed_precondition(format!(
                "backups are disabled for group {:?} (account {:?})",
                record.group, record.name
            )));
        }
        let home = login.home.ok_or_else(|| {
            Status::failed_precondition(format!(
                "account {:?} has home {} which is not a known storage server",
                record.name, record.home_id
            ))
        })?;
        let servers = HashMap::from([(home.id.clone(), home.clone())]);
        let now = now_unix();
        let expires = now + TICKET_TTL.as_secs() as i64;
        let ticket = self.signer().await?.sign(&TicketClaims {
            account_id: record.id,
            account_name: record.name.clone(),
            group: record.group.clone(),
            can_write: purpose == Purpose::Backup && enabled,
            issued_at_unix: now,
            expires_at_unix: expires,
            home: home.name.clone(),
            epoch: self.node.epoch().await.0,
            quota_bytes: record.quota_bytes,
            keep,
        });
        Ok(Response::new(LoginResponse {
            ticket,
            account: Some(view(&record, &servers)),
            home: Some(home),
            expires_at_unix: expires,
        }))
    }

    async fn get_ticket_keys(
        &self,
        _request: Request<GetTicketKeysRequest>,
    ) -> Result<Response<GetTicketKeysResponse>, Status> {
        Ok(Response::new(GetTicketKeysResponse {
            keys: vec![self.signer().await?.public_key()],
        }))
    }

    async fn get_keys(&self, request: Request<GetKeysRequest>) -> Result<Response<GetKeysResponse>, Status> {
        let account = self.account_of(&request.into_inner().token).await?;
        let keys = blocking(self.store(), move |s| s.keys_of(account)).await?;
        Ok(Response::new(GetKeysResponse { keys }))
    }

    async fn init_key(&self, request: Request<PutKeyRequest>) -> Result<Response<KeyRecord>, Status> {
        self.put_key(request.into_inner(), true).await.map(Response::new)
    }

    async fn add_key(&self, request: Request<PutKeyRequest>) -> Result<Response<KeyRecord>, Status> {
        self.put_key(request.into_inner(), false).await.map(Response::new)
    }

    async fn remove_key(
        &self,
        request: Request<RemoveKeyRequest>,
    ) -> Result<Response<GetKeysResponse>, Status> {
        let req = request.into_inner();
        let account = self.account_of(&req.token).await?;
        let keys = self
            .write(move |s, epoch| s.remove_key(epoch, account, &req.id))
            .await?;
        tracing::info!(account, "encryption key removed");
        Ok(Response::new(GetKeysResponse { keys }))
    }
}

impl AccountApi {
    /// The account a token belongs to, checked as Login checks it.
    async fn account_of(&self, token: &str) -> Result<u64, Status> {
        if token.is_empty() || token.len() > 256 {
            return Err(Status::unauthenticated("unknown or revoked token"));
        }
        let hash = hash_token(token);
        Ok(blocking(self.store(), move |s| s.account_by_token(&hash))
            .await?
            .id)
    }

    async fn put_key(&self, req: PutKeyRequest, first: bool) -> Result<KeyRecord, Status> {
        let account = self.account_of(&req.token).await?;
        let key = req
            .key
            .ok_or_else(|| Status::invalid_argument("no key record in the request"))?;
        crate::store::keys::check(&key).map_err(Status::from)?;
        let key = self
            .write(move |s, epoch| s.put_key(epoch, account, key, first))
            .await?;
        tracing::info!(account, key = %key.id, first, "encryption key stored");
        Ok(key)
    }
}

#[tonic::async_trait]
impl AccountAdmin for AccountApi {
    async fn create_account(
        &self,
        request: Request<CreateAccountRequest>,
    ) -> Result<Response<CreateAccountResponse>, Status> {
        let caller = caller(&request);
        let (new, token) = self.new_account(request.into_inner())?;
        let (record, servers) = self
            .write(move |s, epoch| Ok((s.create_account(epoch, new)?, servers_by_id(s)?)))
            .await?;
        tracing::info!(account = %record.name, group = %record.group, "account created");
        self.audit(
            &caller,
            format!("created account {} in group {}", record.name, record.group),
        );
        Ok(Response::new(CreateAccountResponse {
            account: Some(view(&record, &servers)),
            token,
        }))
    }

    async fn create_accounts(
        &self,
        request: Request<CreateAccountsRequest>,
    ) -> Result<Response<CreateAccountsResponse>, Status> {
        let caller = caller(&request);
        let requests = request.into_inner().accounts;
        if requests.len() > MAX_BULK {
            return Err(Status::invalid_argument(format!(
                "{} accounts in one call; at most {MAX_BULK}",
                requests.len()
            )));
        }
        let (new, tokens): (Vec<NewAccount>, Vec<String>) = requests
            .into_iter()
            .map(|r| self.new_account(r))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .unzip();
        let (records, servers) = self
            .write(move |s, epoch| Ok((s.create_accounts(epoch, new)?, servers_by_id(s)?)))
            .await?;
        tracing::info!(count = records.len(), "accounts imported");
        self.audit(&caller, imported(&records));
        let accounts = records
            .iter()
            .zip(tokens)
            .map(|(r, token)| CreateAccountResponse {
                account: Some(view(r, &servers)),
                token,
            })
            .collect();
        Ok(Response::new(CreateAccountsResponse { accounts }))
    }

    async fn list_accounts(
        &self,
        _request: Request<ListAccountsRequest>,
    ) -> Result<Response<ListAccountsResponse>, Status> {
        let (records, servers) = blocking(self.store(), |s| Ok((s.accounts()?, servers_by_id(s)?))).await?;
        Ok(Response::new(ListAccountsResponse {
            accounts: records.iter().map(|r| view(r, &servers)).collect(),
        }))
    }

    async fn list_groups(
        &self,
        _request: Request<ListGroupsRequest>,
    ) -> Result<Response<ListGroupsResponse>, Status> {
        let (groups, records, mut policies) = blocking(self.store(), |s| {
            Ok((s.groups()?, s.accounts()?, s.group_policies()?))
        })
        .await?;
        let groups = groups
            .into_iter()
            .map(|(name, enabled)| GroupView {
                accounts: records.iter().filter(|r| r.group == name).count() as u64,
                keep: policies.remove(&name),
                name,
                enabled,
            })
            .collect();
        Ok(Response::new(ListGroupsResponse { groups }))
    }

    async fn set_group_enabled(
        &self,
        request: Request<SetGroupEnabledRequest>,
    ) -> Result<Response<GroupView>, Status> {
        let caller = caller(&request);
        let req = request.into_inner();
        validate_name(NameKind::Group, &req.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let name = req.name.clone();
        let accounts = self
            .write(move |s, epoch| {
                s.set_group(epoch, &name, req.enabled)?;
                Ok(s.accounts()?.iter().filter(|r| r.group == name).count() as u64)
            })
            .await?;
        tracing::info!(group = %req.name, enabled = req.enabled, "group updated");
        self.audit(
            &caller,
            format!(
                "{} group {} ({accounts} accounts)",
                if req.enabled { "enabled" } else { "disabled" },
                req.name
            ),
        );
        Ok(Response::new(GroupView {
            name: req.name,
            enabled: req.enabled,
            accounts,
            keep: None,
        }))
    }

    async fn set_group_policy(
        &self,
        request: Request<SetGroupPolicyRequest>,
    ) -> Result<Response<GroupView>, Status> {
        let caller = caller(&request);
        let req = request.into_inner();
        validate_name(NameKind::Group, &req.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let keep = req.keep.unwrap_or_default();
        let name = req.name.clone();
        let (enabled, accounts) = self
            .write(move |s, epoch| {
                s.set_group_policy(epoch, &name, keep)?;
                let enabled = s.group_enabled(&name)?;
                Ok((
                    enabled,
                    s.accounts()?.iter().filter(|r| r.group == name).count() as u64,
                ))
            })
            .await?;
        let said = if keep == KeepPolicy::default() {
            "keeps every snapshot".to_owned()
        } else {
            format!(
                "keeps {}",
                duplex_types::retention::KeepPolicy::from(keep).describe()
            )
        };
        tracing::info!(group = %req.name, policy = %said, "group policy set");
        self.audit(&caller, format!("group {} now {said}", req.name));
        Ok(Response::new(GroupView {
            name: req.name,
            enabled,
            accounts,
            keep: (keep != KeepPolicy::default()).then_some(keep),
        }))
    }

    async fn set_quota(&self, request: Request<SetQuotaRequest>) -> Result<Response<AccountView>, Status> {
        let caller = caller(&request);
        let req = request.into_inner();
        validate_name(NameKind::Account, &req.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (record, servers) = self
            .write(move |s, epoch| Ok((s.set_quota(epoch, &req.name, req.quota_bytes)?, servers_by_id(s)?)))
            .await?;
        let quota = match record.quota_bytes {
            0 => "no quota".to_owned(),
            n => format!("a quota of {n} bytes"),
        };
        tracing::info!(account = %record.name, quota_bytes = record.quota_bytes, "quota set");
        self.audit(&caller, format!("gave account {} {quota}", record.name));
        Ok(Response::new(view(&record, &servers)))
    }

    async fn delete_account(
        &self,
        request: Request<DeleteAccountRequest>,
    ) -> Result<Response<DeleteAccountResponse>, Status> {
        let caller = caller(&request);
        let name = request.into_inner().name;
        validate_name(NameKind::Account, &name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let record = self.write(move |s, epoch| s.delete_account(epoch, &name)).await?;
        tracing::info!(account = %record.name, id = record.id, "account deleted");
        self.audit(
            &caller,
            format!("deleted account {} (id {})", record.name, record.id),
        );
        Ok(Response::new(DeleteAccountResponse { id: record.id }))
    }

    async fn rotate_token(
        &self,
        request: Request<RotateTokenRequest>,
    ) -> Result<Response<CreateAccountResponse>, Status> {
        let caller = caller(&request);
        let name = request.into_inner().name;
        validate_name(NameKind::Account, &name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let token = new_token();
        let hash = hash_token(&token);
        let (record, servers) = self
            .write(move |s, epoch| Ok((s.rotate_token(epoch, &name, hash)?, servers_by_id(s)?)))
            .await?;
        tracing::info!(account = %record.name, "token rotated");
        self.audit(&caller, format!("gave account {} a new token", record.name));
        Ok(Response::new(CreateAccountResponse {
            account: Some(view(&record, &servers)),
            token,
        }))
    }

    async fn register_storage_server(
        &self,
        request: Request<RegisterStorageServerRequest>,
    ) -> Result<Response<RegisterStorageServerResponse>, Status> {
        let caller = duplex_rpc::auth::caller(&request);
        let server = request
            .into_inner()
            .server
            .ok_or_else(|| Status::invalid_argument("server is required"))?;
        // A storage server registers itself, never another name; only the
        // coordinator registers on another's behalf.
        if let Some(id) = caller
            .server()
            .filter(|id| id.kind == duplex_types::ServerKind::Storage)
            && (id.name != server.name || id.site != server.site)
        {
            return Err(Status::permission_denied(format!(
                "{id} may register only itself, not {:?}",
                duplex_types::shown(&server.name)
            )));
        }
        ServerId::parse(&server.id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        validate_name(NameKind::Server, &server.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        validate_name(NameKind::Site, &server.site).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if server.kind != "storage" {
            return Err(Status::invalid_argument(format!(
                "kind must be \"storage\", got {:?}",
                duplex_types::shown(&server.kind)
            )));
        }
        if !(server.addr.starts_with("http://") || server.addr.starts_with("https://")) {
            return Err(Status::invalid_argument(format!(
                "addr {:?} must be an http(s) URL",
                duplex_types::shown(&server.addr)
            )));
        }
        let name = server.name.clone();
        self.write(move |s, epoch| s.put_storage_server(epoch, server))
            .await?;
        tracing::info!(server = %name, "storage server registered");
        Ok(Response::new(RegisterStorageServerResponse {}))
    }

    async fn move_homes(
        &self,
        request: Request<MoveHomesRequest>,
    ) -> Result<Response<MoveHomesResponse>, Status> {
        let req = request.into_inner();
        for name in [&req.from, &req.to] {
            validate_name(NameKind::Server, name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        if !req.previous.is_empty() {
            validate_name(NameKind::Server, &req.previous)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let moving = req.clone();
        let (moved, groups) = self.write(move |s, epoch| s.move_homes(epoch, &moving)).await?;
        if moved > 0 {
            tracing::warn!(from = %req.from, to = %req.to, moved, "accounts moved to a new home");
        }
        Ok(Response::new(MoveHomesResponse { moved, groups }))
    }

    async fn reapply(&self, request: Request<ReapplyRequest>) -> Result<Response<ReapplyResponse>, Status> {
        let caller = caller(&request);
        let req = request.into_inner();
        let entries = crate::divergence::decode_entries(&req.entries)?;
        let dry_run = req.dry_run;
        let outcomes = self
            .write(move |s, epoch| s.reapply(epoch, &entries, dry_run))
            .await?;
        for o in outcomes.iter().filter(|o| o.applied && !dry_run) {
            tracing::warn!(lsn = o.lsn, new_lsn = o.new_lsn, kind = o.kind, reason = %o.reason, "divergent entry re-applied");
        }
        // A dry run only reports what would fit.
        if !dry_run {
            let applied = outcomes.iter().filter(|o| o.applied).count();
            self.audit(
                &caller,
                format!(
                    "re-applied {applied} of {} divergent entries as new writes",
                    outcomes.len()
                ),
            );
        }
        let results = outcomes
            .into_iter()
            .map(|o| ReapplyResult {
                lsn: o.lsn,
                kind: o.kind.to_owned(),
                applied: o.applied,
                reason: o.reason,
                new_lsn: o.new_lsn,
            })
            .collect();
        Ok(Response::new(ReapplyResponse { results }))
    }

    async fn list_storage_servers(
        &self,
        _request: Request<ListStorageServersRequest>,
    ) -> Result<Response<ListStorageServersResponse>, Status> {
        let servers = blocking(self.store(), AccountStore::storage_servers).await?;
        Ok(Response::new(ListStorageServersResponse { servers }))
    }

    async fn get_status(
        &self,
        _request: Request<GetAccountStatusRequest>,
    ) -> Result<Response<AccountServerStatus>, Status> {
        Ok(Response::new(self.node.status().await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, group: &str) -> AccountRecord {
        AccountRecord {
            name: name.into(),
            group: group.into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_import_is_described_without_listing_every_account() {
        let one = imported(&[record("alice", "g")]);
        assert_eq!(one, "created 1 accounts (alice) in group g");
        let many: Vec<_> = (0..8)
            .map(|i| record(&format!("u{i}"), if i % 2 == 0 { "even" } else { "odd" }))
            .collect();
        assert_eq!(
            imported(&many),
            "created 8 accounts (u0, u1, u2, u3, u4, and 3 more) in groups even, odd"
        );
    }
}
