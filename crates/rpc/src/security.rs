//! A server's security at start-up: its certificate (enrolled once with a
//! one-time token and a CSR, then kept in `DATA_DIR/tls`), the TLS both
//! ends of its connections use, the gate its guard checks, and renewal.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use duplex_proto::v1::coordinator_client::CoordinatorClient;
use duplex_proto::v1::{EnrollRequest, RenewCertificateRequest, SecurityState};
use duplex_types::{OperatorRole, ServerKind};
use rustls::RootCertStore;
use rustls::ServerConfig;
use tokio_util::sync::CancellationToken;

use crate::auth::{Gate, OperatorKey};
use crate::pki::{PkiError, TlsDir};
use crate::tls::{ClientMode, Credentials, ServerIdentity, TlsError};

/// Printed on every start in plaintext mode.
const PLAINTEXT_WARNING: &str = "INSECURE: --insecure-plaintext is set: no TLS, no certificates, no \
     authentication or authorisation of any call. Anyone who can reach this port can read and change \
     everything. For local debugging only.";

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(
        "{0} has no certificate yet. Enroll it: give --coordinator, --ca (the cluster CA) and a one-time \
         token from `duplexctl servers token NAME --site SITE --kind KIND` in --enrollment-token-file or \
         DUPLEX_ENROLLMENT_TOKEN. (--insecure-plaintext runs without TLS, for local debugging only.)"
    )]
    NotEnrolled(String),
    #[error("enrollment with the coordinator at {url} failed: {status}")]
    Enroll { url: String, status: tonic::Status },
    #[error(
        "the certificate in {dir} names {found}, but this server runs as {expected}; a data dir belongs to one \
         server"
    )]
    WrongIdentity {
        dir: String,
        found: String,
        expected: String,
    },
    #[error("the certificate in {0} carries no Duplex identity")]
    NoIdentity(String),
}

/// What a server needs to enroll.
pub struct Enrollment<'a> {
    pub coordinator: Option<&'a str>,
    pub token: Option<String>,
    pub ca_file: Option<&'a Path>,
}

/// A server's transport security, set up once at start.
pub struct Secured {
    /// None under `--insecure-plaintext`.
    pub tls: Option<Arc<ServerConfig>>,
    pub gate: Arc<Gate>,
    pub credentials: Option<Arc<Credentials>>,
    pub identity: Option<ServerIdentity>,
    tls_dir: Option<TlsDir>,
}

impl Secured {
    /// `--insecure-plaintext`: says so loudly, and checks nothing.
    pub fn plaintext() -> Secured {
        eprintln!("WARNING: {PLAINTEXT_WARNING}");
        tracing::warn!("{PLAINTEXT_WARNING}");
        crate::tls::set_client_mode(ClientMode::Plaintext);
        Secured {
            tls: None,
            gate: Gate::new(true),
            credentials: None,
            identity: None,
            tls_dir: None,
        }
    }

    /// TLS with this certificate and key, trusting `roots`; from now on
    /// this process dials other servers with the same certificate.
    pub fn with_certificate(
        roots: Arc<RootCertStore>,
        cert_pem: &str,
        key_pem: &str,
        tls_dir: Option<TlsDir>,
    ) -> Result<Secured, SecurityError> {
        let identity =
            identity_of(cert_pem).ok_or_else(|| SecurityError::NoIdentity("the certificate".into()))?;
        let credentials = Arc::new(Credentials::from_pem(cert_pem, key_pem)?);
        let tls = crate::tls::server_config(roots.clone(), credentials.clone())?;
        crate::tls::set_client_mode(ClientMode::Tls(crate::tls::client_config(
            roots,
            Some(credentials.clone()),
        )?));
        Ok(Secured {
            tls: Some(tls),
            gate: Gate::new(false),
            credentials: Some(credentials),
            identity: Some(identity),
            tls_dir,
        })
    }

    /// A server's start: its saved certificate, or enrollment now.
    pub async fn establish(
        expected: &ServerIdentity,
        data_dir: &Path,
        hosts: &[String],
        enrollment: Enrollment<'_>,
    ) -> Result<Secured, SecurityError> {
        let tls_dir = TlsDir::new(data_dir);
        if let Some((key_pem, cert_pem)) = tls_dir.load() {
            let found = identity_of(&cert_pem)
                .ok_or_else(|| SecurityError::NoIdentity(tls_dir.dir.display().to_string()))?;
            if &found != expected {
                return Err(SecurityError::WrongIdentity {
                    dir: tls_dir.dir.display().to_string(),
                    found: found.to_string(),
                    expected: expected.to_string(),
                });
            }
            let roots = crate::tls::roots(Some(&tls_dir.path(TlsDir::CA)))?;
            return Self::with_certificate(roots, &cert_pem, &key_pem, Some(tls_dir));
        }
        let (Some(url), Some(token), Some(ca_file)) =
            (enrollment.coordinator, enrollment.token, enrollment.ca_file)
        else {
            return Err(SecurityError::NotEnrolled(expected.to_string()));
        };
        let roots = crate::tls::roots(Some(ca_file))?;
        crate::tls::set_client_mode(ClientMode::Tls(crate::tls::client_config(roots, None)?));
        let (key, csr_pem) = crate::pki::key_and_csr(hosts)?;
        let issued = enroll(url, &token, &csr_pem, expected).await?;
        let key_pem = key.serialize_pem();
        tls_dir.save(&key_pem, &issued.cert_pem, &issued.ca_pem)?;
        tracing::info!(serial = %issued.serial, identity = %expected, "enrolled: certificate issued by the cluster CA");
        let roots = crate::tls::roots(Some(&tls_dir.path(TlsDir::CA)))?;
        Self::with_certificate(roots, &issued.cert_pem, &key_pem, Some(tls_dir))
    }

    /// Takes the coordinator's latest operators and revocations.
    pub fn apply(&self, state: &SecurityState) {
        apply_state(&self.gate, state);
    }

    /// Renews this server's certificate through the coordinator when two
    /// thirds of its life have passed, until `stop`.
    pub fn spawn_renewal(&self, coordinator: String, hosts: Vec<String>, stop: CancellationToken) {
        let (Some(credentials), Some(tls_dir)) = (self.credentials.clone(), self.tls_dir.as_ref()) else {
            return;
        };
        let dir = tls_dir.dir.clone();
        tokio::spawn(async move {
            let tls_dir = TlsDir { dir };
            loop {
                let wait = tls_dir
                    .load()
                    .and_then(|(_, cert)| renew_in(&cert))
                    .unwrap_or(Duration::from_secs(60));
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                if let Err(e) = renew(&coordinator, &hosts, &tls_dir, &credentials).await {
                    tracing::warn!(error = %e, "certificate renewal failed; retrying in 30 s");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(30)) => {}
                    }
                }
            }
        });
    }
}

/// Replaces a gate's operators and revoked serials with a pushed state.
pub fn apply_state(gate: &Gate, state: &SecurityState) {
    let operators = state
        .operators
        .iter()
        .filter_map(|o| {
            let role: OperatorRole = o.role.parse().ok()?;
            let hash: [u8; 32] = o.token_hash.as_slice().try_into().ok()?;
            Some(OperatorKey {
                name: o.name.clone(),
                role,
                hash: blake3::Hash::from(hash),
            })
        })
        .collect();
    gate.update(
        state.version,
        operators,
        state.revoked_serials.iter().cloned().collect(),
    );
}

fn identity_of(cert_pem: &str) -> Option<ServerIdentity> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
    crate::tls::parse_peer_cert(&der).map(|p| p.identity)
}

/// How long until a certificate should be renewed (re-read at least hourly:
/// the file may have been renewed meanwhile).
fn renew_in(cert_pem: &str) -> Option<Duration> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let at = renew_at(
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    );
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()?
        .as_secs();
    let secs = u64::try_from(at).ok()?.saturating_sub(now);
    Some(Duration::from_secs(secs.clamp(1, 3600)))
}

/// When two thirds of a certificate's life have passed (unix seconds). Its
/// `not_before` is backdated for clock skew, which is not life it was given.
fn renew_at(not_before: i64, not_after: i64) -> i64 {
    let issued = not_before + crate::pki::BACKDATE.as_secs() as i64;
    issued + (not_after - issued) * 2 / 3
}

async fn enroll(
    url: &str,
    token: &str,
    csr_pem: &str,
    identity: &ServerIdentity,
) -> Result<duplex_proto::v1::IssuedCertificate, SecurityError> {
    let failed = |status| SecurityError::Enroll {
        url: url.to_owned(),
        status,
    };
    let leader = leader_or_first(url).await;
    let channel =
        crate::channel(&leader).map_err(|e| failed(tonic::Status::invalid_argument(e.to_string())))?;
    let client = CoordinatorClient::new(channel);
    // The coordinator may be starting at the same moment.
    crate::client::retry(Duration::from_secs(60), || {
        let mut client = client.clone();
        let request = EnrollRequest {
            token: token.to_owned(),
            csr_pem: csr_pem.to_owned(),
            name: identity.name.clone(),
            site: identity.site.clone(),
            kind: identity.kind.as_str().to_owned(),
        };
        async move { client.enroll(request).await.map(tonic::Response::into_inner) }
    })
    .await
    .map_err(failed)
}

async fn renew(
    url: &str,
    hosts: &[String],
    tls_dir: &TlsDir,
    credentials: &Credentials,
) -> Result<(), SecurityError> {
    let (key, csr_pem) = crate::pki::key_and_csr(hosts)?;
    let leader = leader_or_first(url).await;
    let channel = crate::channel(&leader).map_err(|e| SecurityError::Enroll {
        url: url.to_owned(),
        status: tonic::Status::invalid_argument(e.to_string()),
    })?;
    let issued = CoordinatorClient::new(channel)
        .renew_certificate(RenewCertificateRequest { csr_pem })
        .await
        .map_err(|status| SecurityError::Enroll {
            url: url.to_owned(),
            status,
        })?
        .into_inner();
    let key_pem = key.serialize_pem();
    tls_dir.save(&key_pem, &issued.cert_pem, &issued.ca_pem)?;
    credentials.replace(&issued.cert_pem, &key_pem)?;
    tracing::info!(serial = %issued.serial, "certificate renewed");
    Ok(())
}

/// The leading coordinator of a comma-separated list; else its first URL,
/// whose call then reports what is wrong.
async fn leader_or_first(list: &str) -> String {
    match crate::leader::find(list).await {
        Ok(url) => url,
        Err(_) => crate::leader::urls(list).into_iter().next().unwrap_or_default(),
    }
}

/// The identity a server of `kind` named `name` on `site` must hold.
pub fn identity(kind: ServerKind, site: &str, name: &str) -> ServerIdentity {
    ServerIdentity {
        site: site.to_owned(),
        kind,
        name: name.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn renews_after_two_thirds_of_the_life_it_was_given() {
        let backdate = crate::pki::BACKDATE.as_secs() as i64;
        let issued = 1_000_000;
        let not_before = issued - backdate;
        assert_eq!(super::renew_at(not_before, issued + 90), issued + 60);
        assert_eq!(super::renew_at(not_before, issued + 6), issued + 4);
    }
}
