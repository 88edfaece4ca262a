//! The cluster CA (`duplexctl ca init`, held by the coordinator) and the
//! certificate requests servers make: a server generates its own key, which
//! never leaves its data dir, and sends only a CSR.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use crate::tls::ServerIdentity;

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
/// How long a server certificate is valid unless the coordinator is told otherwise.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// Clock skew between machines that a new certificate tolerates.
pub(crate) const BACKDATE: Duration = Duration::from_secs(300);
/// A CSR may ask for at most this many DNS / IP names.
const MAX_HOST_NAMES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("the certificate request is not valid: {0}")]
    BadRequest(String),
    #[error("{0} already exists; refusing to overwrite a CA")]
    Exists(String),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A certificate the CA issued.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub serial: String,
    pub not_after: SystemTime,
}

/// The cluster certificate authority.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// Creates a new CA in `dir` (`ca.pem`, and `ca.key` readable by its
    /// owner only). Refuses to overwrite an existing one.
    pub fn init(dir: &Path) -> Result<Ca, PkiError> {
        let key_path = dir.join(CA_KEY_FILE);
        if key_path.exists() {
            return Err(PkiError::Exists(key_path.display().to_string()));
        }
        crate::secure_fs::create_private_dir(dir).map_err(io_error(dir))?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Duplex cluster CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = (SystemTime::now() - BACKDATE).into();
        params.not_after = (SystemTime::now() + Duration::from_secs(10 * 365 * 24 * 3600)).into();
        let cert = params.self_signed(&key)?;
        crate::secure_fs::write_private(&key_path, key.serialize_pem().as_bytes())
            .map_err(io_error(&key_path))?;
        let cert_path = dir.join(CA_CERT_FILE);
        crate::secure_fs::write_public(&cert_path, cert.pem().as_bytes()).map_err(io_error(&cert_path))?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_error(&cert_path))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(io_error(&key_path))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(Ca { cert_pem, issuer })
    }

    /// Loads the CA in `dir`, creating it first if there is none.
    pub fn load_or_init(dir: &Path) -> Result<Ca, PkiError> {
        if dir.join(CA_KEY_FILE).exists() {
            Self::load(dir)
        } else {
            Self::init(dir)
        }
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Signs a CSR for `identity`. The identity comes from the caller (an
    /// enrollment token's binding, or the certificate being renewed), never
    /// from the CSR; only the CSR's key and its DNS / IP names are used.
    pub fn sign(
        &self,
        csr_pem: &str,
        identity: &ServerIdentity,
        lifetime: Duration,
    ) -> Result<Issued, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::BadRequest(e.to_string()))?;
        let mut names = Vec::new();
        for san in &csr.params.subject_alt_names {
            match san {
                SanType::DnsName(_) | SanType::IpAddress(_) => names.push(san.clone()),
                _ => {}
            }
        }
        if names.len() > MAX_HOST_NAMES {
            return Err(PkiError::BadRequest(format!(
                "{} host names requested; at most {MAX_HOST_NAMES}",
                names.len()
            )));
        }
        self.issue(&csr.public_key, identity, names, lifetime)
    }

    /// Issues a certificate for a key this process holds (the coordinator's own).
    pub fn issue_for_key(
        &self,
        key: &KeyPair,
        identity: &ServerIdentity,
        hosts: &[String],
        lifetime: Duration,
    ) -> Result<Issued, PkiError> {
        self.issue(key, identity, host_sans(hosts)?, lifetime)
    }

    fn issue(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        identity: &ServerIdentity,
        mut names: Vec<SanType>,
        lifetime: Duration,
    ) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.name.as_str());
        params.distinguished_name = dn;
        names.insert(
            0,
            SanType::URI(identity.uri().try_into().map_err(|_| {
                PkiError::BadRequest(format!("identity {} is not a valid URI", identity.uri()))
            })?),
        );
        params.subject_alt_names = names;
        let serial: [u8; 16] = rand::random();
        // A positive serial: the top bit clear.
        let mut serial = serial;
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let now = SystemTime::now();
        let not_after = now + lifetime;
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            serial: hex::encode(serial),
            not_after,
        })
    }
}

fn host_sans(hosts: &[String]) -> Result<Vec<SanType>, PkiError> {
    let mut sans = Vec::new();
    for host in hosts {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let san = match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                host.try_into()
                    .map_err(|_| PkiError::BadRequest(format!("{host:?} is not a valid host name")))?,
            ),
        };
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    Ok(sans)
}

/// A new key pair and a CSR for it naming `hosts` (the names clients dial).
pub fn key_and_csr(hosts: &[String]) -> Result<(KeyPair, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = host_sans(hosts)?;
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.pem()?))
}

/// The host names a server's certificate should carry: the hosts of the
/// addresses it listens on and is reached at, and loopback.
pub fn hosts_for(addresses: &[&str]) -> Vec<String> {
    let mut hosts = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    for address in addresses {
        let Ok(uri) = crate::health::dial_url(address).parse::<http::Uri>() else {
            continue;
        };
        let Some(host) = uri.host() else { continue };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let unspecified = host.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified());
        if !unspecified && !host.is_empty() && !hosts.iter().any(|h| h == host) {
            hosts.push(host.to_owned());
        }
    }
    hosts
}

/// Where a server keeps its TLS material.
pub struct TlsDir {
    pub dir: PathBuf,
}

impl TlsDir {
    pub const KEY: &'static str = "server.key";
    pub const CERT: &'static str = "server.pem";
    pub const CA: &'static str = "ca.pem";

    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("tls"),
        }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The saved key and certificate, if this server has enrolled.
    pub fn load(&self) -> Option<(String, String)> {
        let key = std::fs::read_to_string(self.path(Self::KEY)).ok()?;
        let cert = std::fs::read_to_string(self.path(Self::CERT)).ok()?;
        Some((key, cert))
    }

    /// Durably saves a key (0600), its certificate and the CA.
    pub fn save(&self, key_pem: &str, cert_pem: &str, ca_pem: &str) -> Result<(), PkiError> {
        crate::secure_fs::create_private_dir(&self.dir).map_err(io_error(&self.dir))?;
        for (file, bytes, private) in [
            (Self::KEY, key_pem, true),
            (Self::CERT, cert_pem, false),
            (Self::CA, ca_pem, false),
        ] {
            let path = self.path(file);
            let written = if private {
                crate::secure_fs::write_private(&path, bytes.as_bytes())
            } else {
                crate::secure_fs::write_public(&path, bytes.as_bytes())
            };
            written.map_err(io_error(&path))?;
        }
        Ok(())
    }
}

/// When a certificate expires, read from its PEM.
pub fn not_after(cert_pem: &str) -> Option<SystemTime> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let secs = cert.validity().not_after.timestamp();
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use duplex_types::ServerKind;

    #[test]
    fn signs_the_bound_identity_not_what_the_csr_asks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::init(&dir.path().join("ca")).expect("ca");
        let (_key, csr) = key_and_csr(&["storage-a".into(), "10.0.0.7".into()]).expect("csr");
        let identity = ServerIdentity {
            site: "a".into(),
            kind: ServerKind::Storage,
            name: "storage-a".into(),
        };
        let issued = ca.sign(&csr, &identity, DEFAULT_LIFETIME).expect("signed");
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).expect("pem");
        let peer = crate::tls::parse_peer_cert(&der).expect("identity");
        assert_eq!(peer.identity, identity);
        assert_eq!(peer.serial, issued.serial);
        assert!(not_after(&issued.cert_pem).is_some());
        // The CA refuses to be overwritten.
        assert!(matches!(
            Ca::init(&dir.path().join("ca")),
            Err(PkiError::Exists(_))
        ));
        // A reloaded CA signs too.
        let again = Ca::load(&dir.path().join("ca")).expect("load");
        assert!(again.sign(&csr, &identity, DEFAULT_LIFETIME).is_ok());
    }

    #[test]
    fn refuses_garbage_requests() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::init(dir.path()).expect("ca");
        let identity = ServerIdentity {
            site: "a".into(),
            kind: ServerKind::Mirror,
            name: "m".into(),
        };
        assert!(matches!(
            ca.sign("not a csr", &identity, DEFAULT_LIFETIME),
            Err(PkiError::BadRequest(_))
        ));
    }
}
