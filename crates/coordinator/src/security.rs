//! The coordinator's side of security: it holds the cluster CA and signs
//! the certificate requests of servers that enroll with a one-time token
//! (bound to one name, site and kind) or renew, keeps operators (token
//! hashes with a role), and tells every server with its heartbeat answer
//! which operators exist and which certificates are revoked.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use duplex_proto::v1 as pb;
use duplex_rpc::auth::{Gate, OperatorKey};
use duplex_rpc::pki::Ca;
use duplex_rpc::tls::ServerIdentity;
use duplex_types::{NameKind, OperatorRole, ServerKind, shown, validate_name};
use tonic::Status;

use crate::clock::Clock;
use crate::engine::durably;
use crate::store::{EnrollOutcome, EnrollmentGrant, OperatorRecord, Store};

pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// The file the first admin token is written to, in the data dir.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// A random 256-bit secret, hex.
pub fn random_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn hash_hex(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

fn internal(e: crate::store::StoreError) -> Status {
    Status::internal(e.to_string())
}

pub struct Security {
    /// None under `--insecure-plaintext`: nothing to sign.
    ca: Option<Ca>,
    pub gate: Arc<Gate>,
    lifetime: Duration,
    state: RwLock<pb::SecurityState>,
    store: Arc<Store>,
    clock: Clock,
}

impl Security {
    pub fn new(
        store: Arc<Store>,
        ca: Option<Ca>,
        gate: Arc<Gate>,
        lifetime: Duration,
        clock: Clock,
    ) -> Result<Arc<Self>, Status> {
        let security = Arc::new(Self {
            ca,
            gate,
            lifetime,
            state: RwLock::default(),
            store,
            clock,
        });
        security.refresh()?;
        Ok(security)
    }

    /// Re-reads operators and revocations after a change.
    pub fn refresh(&self) -> Result<(), Status> {
        let records = durably(|| self.store.security_records()).map_err(internal)?;
        let keys = records
            .operators
            .iter()
            .map(|o| OperatorKey {
                name: o.name.clone(),
                role: o.role,
                hash: blake3::Hash::from(o.token_hash),
            })
            .collect();
        self.gate
            .update(records.version, keys, records.revoked.iter().cloned().collect());
        let state = pb::SecurityState {
            version: records.version,
            operators: records
                .operators
                .iter()
                .map(|o| pb::OperatorCredential {
                    name: o.name.clone(),
                    role: o.role.as_str().to_owned(),
                    token_hash: o.token_hash.to_vec(),
                })
                .collect(),
            revoked_serials: records.revoked,
        };
        if let Ok(mut s) = self.state.write() {
            *s = state;
        }
        Ok(())
    }

    /// The security state for a server that holds `version`, if it differs.
    pub fn state_for(&self, version: u64) -> Option<pb::SecurityState> {
        let state = self.state.read().ok()?;
        (state.version != version).then(|| state.clone())
    }

    fn ca(&self) -> Result<&Ca, Status> {
        self.ca.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this coordinator runs with --insecure-plaintext and issues no certificates",
            )
        })
    }

    pub fn ca_pem(&self) -> Option<&str> {
        self.ca.as_ref().map(Ca::cert_pem)
    }

    /// A one-time token that can enroll exactly this identity.
    pub fn issue_token(
        &self,
        request: &pb::IssueEnrollmentTokenRequest,
    ) -> Result<(String, EnrollmentGrant), Status> {
        validate_name(NameKind::Server, &request.name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        validate_name(NameKind::Site, &request.site).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let kind: ServerKind = request
            .kind
            .parse()
            .map_err(|e: duplex_types::InvalidInput| Status::invalid_argument(e.to_string()))?;
        if kind == ServerKind::Coordinator {
            return Err(Status::invalid_argument(
                "coordinators do not enroll: they hold the CA",
            ));
        }
        let ttl = match request.ttl_seconds {
            0 => DEFAULT_TOKEN_TTL,
            s => Duration::from_secs(s),
        };
        if ttl > MAX_TOKEN_TTL {
            return Err(Status::invalid_argument(
                "an enrollment token lives at most 7 days",
            ));
        }
        if durably(|| self.store.is_enrolled(&request.name)).map_err(internal)? {
            return Err(already_enrolled(&request.name));
        }
        let token = random_secret();
        let grant = EnrollmentGrant {
            name: request.name.clone(),
            site: request.site.clone(),
            kind,
            expires_unix_ms: self.clock.wall_ms() + ttl.as_millis() as i64,
        };
        durably(|| self.store.add_grant(&hash_hex(&token), &grant)).map_err(internal)?;
        Ok((token, grant))
    }

    /// Spends an enrollment token on a certificate for the identity it was
    /// issued for.
    pub fn enroll(
        &self,
        request: &pb::EnrollRequest,
    ) -> Result<(pb::IssuedCertificate, EnrollmentGrant), Status> {
        let ca = self.ca()?;
        let lifetime = self.lifetime;
        let outcome = durably(|| {
            self.store.enroll(&hash_hex(&request.token), self.clock.wall_ms(), |grant| {
                if (grant.name.as_str(), grant.site.as_str(), grant.kind.as_str())
                    != (request.name.as_str(), request.site.as_str(), request.kind.as_str())
                {
                    return Err(format!(
                        "this enrollment token was issued for {} {} on site {}, not for {} {} on site {}; it is spent now",
                        grant.kind,
                        grant.name,
                        grant.site,
                        shown(&request.kind),
                        shown(&request.name),
                        shown(&request.site)
                    ));
                }
                let identity = ServerIdentity {
                    site: grant.site.clone(),
                    kind: grant.kind,
                    name: grant.name.clone(),
                };
                let issued = ca
                    .sign(&request.csr_pem, &identity, lifetime)
                    .map_err(|e| e.to_string())?;
                let serial = issued.serial.clone();
                Ok((issued, serial))
            })
        })
        .map_err(internal)?;
        match outcome {
            EnrollOutcome::Issued(grant, issued) => Ok((self.answer(issued), grant)),
            EnrollOutcome::UnknownToken => Err(Status::permission_denied(
                "the enrollment token is unknown or already spent; issue a new one with `duplexctl servers token`",
            )),
            EnrollOutcome::Expired(g) => Err(Status::permission_denied(format!(
                "the enrollment token for {} has expired; issue a new one with `duplexctl servers token`",
                g.name
            ))),
            EnrollOutcome::AlreadyEnrolled(g) => Err(already_enrolled(&g.name)),
            EnrollOutcome::Refused(reason) => Err(Status::permission_denied(reason)),
        }
    }

    /// A fresh certificate for a server's own identity.
    pub fn renew(&self, identity: &ServerIdentity, csr_pem: &str) -> Result<pb::IssuedCertificate, Status> {
        let issued = self
            .ca()?
            .sign(csr_pem, identity, self.lifetime)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !durably(|| self.store.add_serial(&identity.name, &issued.serial)).map_err(internal)? {
            return Err(Status::permission_denied(format!(
                "{} is no longer enrolled (removed); enroll it again with a new token",
                identity.name
            )));
        }
        Ok(self.answer(issued))
    }

    fn answer(&self, issued: duplex_rpc::pki::Issued) -> pb::IssuedCertificate {
        let not_after = issued
            .not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        pb::IssuedCertificate {
            cert_pem: issued.cert_pem,
            ca_pem: self.ca_pem().unwrap_or_default().to_owned(),
            not_after_unix_ms: not_after,
            serial: issued.serial,
        }
    }

    pub fn create_operator(&self, name: &str, role: OperatorRole) -> Result<String, Status> {
        validate_name(NameKind::Account, name)
            .map_err(|e| Status::invalid_argument(format!("operator name: {e}")))?;
        let token = random_secret();
        let record = OperatorRecord {
            name: name.to_owned(),
            role,
            token_hash: *blake3::hash(token.as_bytes()).as_bytes(),
            created_unix_ms: self.clock.wall_ms(),
        };
        if !durably(|| self.store.add_operator(&record)).map_err(internal)? {
            return Err(Status::already_exists(format!(
                "an operator named {} exists",
                shown(name)
            )));
        }
        self.refresh()?;
        Ok(token)
    }

    pub fn operators(&self) -> Result<Vec<OperatorRecord>, Status> {
        Ok(durably(|| self.store.security_records())
            .map_err(internal)?
            .operators)
    }

    pub fn revoke_operator(&self, name: &str) -> Result<(), Status> {
        if !durably(|| self.store.remove_operator(name)).map_err(internal)? {
            return Err(Status::not_found(format!("no operator named {}", shown(name))));
        }
        self.refresh()
    }

    /// On the very first start, creates one admin and writes its token to
    /// a 0600 file in the data dir (logging where, never the token).
    pub fn bootstrap_admin(&self, data_dir: &Path) -> Result<Option<PathBuf>, Status> {
        if !self.operators()?.is_empty() {
            return Ok(None);
        }
        let token = self.create_operator("admin", OperatorRole::Admin)?;
        let path = data_dir.join(ADMIN_TOKEN_FILE);
        duplex_rpc::secure_fs::write_private(&path, format!("{token}\n").as_bytes())
            .map_err(|e| Status::internal(format!("cannot write {}: {e}", path.display())))?;
        Ok(Some(path))
    }
}

/// A fresh key and certificate for the coordinator itself, from its own CA.
pub fn issue_own(
    ca: &Ca,
    identity: &ServerIdentity,
    hosts: &[String],
    lifetime: Duration,
) -> Result<(String, String), duplex_rpc::pki::PkiError> {
    let key = rcgen::KeyPair::generate()?;
    let issued = ca.issue_for_key(&key, identity, hosts, lifetime)?;
    Ok((issued.cert_pem, key.serialize_pem()))
}

impl Security {
    /// Re-issues the coordinator's own certificate after two thirds of its
    /// life, for coordinators that run longer than that.
    pub fn spawn_self_renewal(
        self: &Arc<Self>,
        identity: ServerIdentity,
        hosts: Vec<String>,
        credentials: Arc<duplex_rpc::tls::Credentials>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let security = self.clone();
        tokio::spawn(async move {
            let every = security.lifetime * 2 / 3;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                let Some(ca) = security.ca.as_ref() else { return };
                let renewed = issue_own(ca, &identity, &hosts, security.lifetime)
                    .map_err(|e| e.to_string())
                    .and_then(|(cert, key)| credentials.replace(&cert, &key).map_err(|e| e.to_string()));
                match renewed {
                    Ok(()) => tracing::info!("the coordinator's certificate was renewed"),
                    Err(e) => tracing::error!(error = %e, "cannot renew the coordinator's certificate"),
                }
            }
        });
    }
}

fn already_enrolled(name: &str) -> Status {
    Status::failed_precondition(format!(
        "{} is already enrolled; remove it first with `duplexctl servers remove {}` (that revokes its certificate)",
        shown(name),
        shown(name)
    ))
}
