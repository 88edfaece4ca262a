//! Transport security: every connection between Duplex processes is TLS
//! (rustls, ring), and between servers it is mutual TLS, each side showing
//! a certificate from the cluster CA that names its site, kind and server
//! name (`duplex://SITE/KIND/NAME`).
//!
//! tonic's own TLS builds a fixed rustls configuration when a listener or a
//! channel is created. Certificates renew themselves while a server runs,
//! so both ends resolve the certificate per handshake instead
//! ([`Credentials`]), and the peer's identity is parsed once per
//! connection, when it is accepted ([`Peer`]), not once per call.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use duplex_types::ServerKind;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// How long a new connection may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The URI scheme of a server identity in a certificate.
const IDENTITY_SCHEME: &str = "duplex://";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{what} is not valid PEM: {reason}")]
    Pem { what: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("no trusted root certificates found in {0}")]
    NoRoots(String),
}

/// The ring provider, the one crypto backend Duplex builds with.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // AES-128-GCM first: as safe for a session key that lives one
    // connection, and a quarter less work per byte than AES-256 on the
    // bulk paths (mirroring moves every chunk over two TLS legs).
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// Who a server certificate names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServerIdentity {
    pub site: String,
    pub kind: ServerKind,
    pub name: String,
}

impl ServerIdentity {
    /// The URI SAN that carries this identity.
    pub fn uri(&self) -> String {
        format!("{IDENTITY_SCHEME}{}/{}/{}", self.site, self.kind, self.name)
    }

    pub fn parse_uri(uri: &str) -> Option<Self> {
        let mut parts = uri.strip_prefix(IDENTITY_SCHEME)?.split('/');
        let (site, kind, name) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || site.is_empty() || name.is_empty() {
            return None;
        }
        Some(Self {
            site: site.to_owned(),
            kind: kind.parse().ok()?,
            name: name.to_owned(),
        })
    }
}

impl std::fmt::Display for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} (site {})", self.kind, self.name, self.site)
    }
}

/// What a verified peer certificate says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCert {
    pub identity: ServerIdentity,
    /// Hex serial number, as revocation names it.
    pub serial: String,
}

/// The other end of one accepted connection.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    /// Over mutual TLS: the server certificate it presented (already
    /// verified against the cluster CA by the handshake).
    pub cert: Option<PeerCert>,
    /// It presented a certificate chained to the CA that names no Duplex
    /// identity (refused wherever a server certificate is needed).
    pub unnamed_cert: bool,
}

/// Reads the identity and serial of a DER certificate.
pub fn parse_peer_cert(der: &[u8]) -> Option<PeerCert> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let identity = san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => ServerIdentity::parse_uri(uri),
        _ => None,
    })?;
    Some(PeerCert {
        identity,
        serial: hex::encode(cert.tbs_certificate.raw_serial()),
    })
}

/// This process's certificate chain and key, replaced in place when the
/// certificate is renewed; every later handshake (as server and as client)
/// presents the new one.
#[derive(Debug)]
pub struct Credentials {
    current: RwLock<Arc<CertifiedKey>>,
}

impl Credentials {
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        Ok(Self {
            current: RwLock::new(certified_key(cert_pem, key_pem)?),
        })
    }

    pub fn replace(&self, cert_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let key = certified_key(cert_pem, key_pem)?;
        if let Ok(mut current) = self.current.write() {
            *current = key;
        }
        Ok(())
    }

    fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|k| Arc::clone(&k))
    }
}

fn certified_key(cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = certs_from_pem("certificate", cert_pem.as_bytes())?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| TlsError::Pem {
        what: "private key".into(),
        reason: e.to_string(),
    })?;
    Ok(Arc::new(CertifiedKey::from_der(chain, key, &provider())?))
}

fn certs_from_pem(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what: what.into(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what: what.into(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

impl rustls::server::ResolvesServerCert for Credentials {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

impl rustls::client::ResolvesClientCert for Credentials {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The roots a process trusts: the cluster CA from `--ca`, or else the
/// system's roots (a deployment behind a public certificate).
pub fn roots(ca_file: Option<&Path>) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.display().to_string(),
                source,
            })?;
            roots_from_pem(&mut roots, &path.display().to_string(), &pem)?;
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(TlsError::NoRoots(
                    "the system's certificate store (give the cluster CA with --ca or DUPLEX_CA)".into(),
                ));
            }
        }
    }
    Ok(Arc::new(roots))
}

/// Roots from PEM text (the CA file's contents).
pub fn roots_from_pem(roots: &mut RootCertStore, what: &str, pem: &[u8]) -> Result<(), TlsError> {
    for cert in certs_from_pem(what, pem)? {
        roots.add(cert)?;
    }
    Ok(())
}

/// A server's TLS: its certificate, and client certificates verified
/// against the cluster CA but optional, because agents and operators
/// authenticate with tickets and tokens instead.
pub fn server_config(
    roots: Arc<RootCertStore>,
    credentials: Arc<Credentials>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .allow_unauthenticated()
        .build()?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(credentials);
    // gRPC needs h2 (grpc-go refuses a TLS server without it); http/1.1
    // serves /metrics to scrapers that do not speak h2.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client's TLS: the trusted roots and, for a server calling another
/// server, its own certificate.
pub fn client_config(
    roots: Arc<RootCertStore>,
    credentials: Option<Arc<Credentials>>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match credentials {
        Some(c) => builder.with_client_cert_resolver(c),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// How this process dials other Duplex processes.
#[derive(Clone)]
pub enum ClientMode {
    /// `--insecure-plaintext`: local debugging only.
    Plaintext,
    Tls(Arc<ClientConfig>),
    /// TLS for `https://`, plaintext for `http://`: for a test process
    /// that talks to secure and to `--insecure-plaintext` servers at once.
    /// No Duplex binary uses it.
    ByScheme(Arc<ClientConfig>),
}

static CLIENT_MODE: OnceLock<RwLock<ClientMode>> = OnceLock::new();

/// Sets how every channel this process opens from now on connects. A
/// process has one identity, so this is process-wide rather than threaded
/// through every caller of [`crate::channel`].
pub fn set_client_mode(mode: ClientMode) {
    let lock = CLIENT_MODE.get_or_init(|| RwLock::new(ClientMode::Plaintext));
    if let Ok(mut current) = lock.write() {
        *current = mode;
    }
}

/// The mode set by [`set_client_mode`]; plaintext until one is set.
pub fn client_mode() -> ClientMode {
    CLIENT_MODE
        .get()
        .and_then(|l| l.read().ok().map(|m| m.clone()))
        .unwrap_or(ClientMode::Plaintext)
}

/// Sets up a client process (the agent, duplexctl): TLS trusting `ca` (or
/// the system's roots), or plaintext when asked, with a warning.
pub fn setup_client(ca: Option<&Path>, insecure_plaintext: bool) -> Result<(), TlsError> {
    if insecure_plaintext {
        eprintln!("WARNING: --insecure-plaintext: no TLS and no authentication; for local debugging only");
        set_client_mode(ClientMode::Plaintext);
        return Ok(());
    }
    set_client_mode(ClientMode::Tls(client_config(roots(ca)?, None)?));
    Ok(())
}

/// The URL scheme this process's addresses use.
pub fn scheme() -> &'static str {
    match client_mode() {
        ClientMode::Plaintext => "http",
        ClientMode::Tls(_) | ClientMode::ByScheme(_) => "https",
    }
}

/// What TLS runs over: TCP read through a buffer. rustls asks for at most
/// 4 KiB per read, so a 16 KiB record took four `recv` calls; the buffer
/// takes whatever the socket holds in one and hands it out from memory.
type Wire = tokio::io::BufReader<TcpStream>;

/// Room for several full TLS records (16 KiB each) per `recv`.
const WIRE_READ_BUFFER: usize = 256 * 1024;

fn wire(tcp: TcpStream) -> Wire {
    tokio::io::BufReader::with_capacity(WIRE_READ_BUFFER, tcp)
}

/// Dials TCP then TLS for a tonic channel, naming the host the URI names.
#[derive(Clone)]
pub(crate) struct Dialer {
    pub(crate) connector: TlsConnector,
}

impl tower::Service<http::Uri> for Dialer {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<Wire>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connector = self.connector.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri} names no host")))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(host.clone())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("host {host:?}: {e}")))?;
            let tls = connector.connect(name, wire(tcp)).await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// One accepted connection, plaintext or TLS, with what is known of its peer.
pub struct Conn {
    io: Io,
    peer: Peer,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<Wire>>),
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

macro_rules! delegate {
    ($self:ident, $io:ident => $e:expr) => {
        match &mut $self.get_mut().io {
            Io::Plain($io) => {
                let $io = Pin::new($io);
                $e
            }
            Io::Tls($io) => {
                let $io = Pin::new($io.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(io) => io.is_write_vectored(),
            Io::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_shutdown(cx))
    }
}

/// Accepts connections on `listener`: plaintext as they come, or TLS with
/// each handshake run on its own task so a slow or hostile client cannot
/// hold up the accept loop. A failed handshake (a plaintext client, a
/// certificate from another CA) closes that connection and is counted.
pub fn accept(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
) -> impl tokio_stream::Stream<Item = io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Conn>>(64);
    let acceptor = tls.map(TlsAcceptor::from);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, addr) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    continue;
                }
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot disable Nagle on a connection");
            }
            let Some(acceptor) = acceptor.clone() else {
                let peer = Peer {
                    addr: Some(addr),
                    ..Peer::default()
                };
                if tx
                    .send(Ok(Conn {
                        io: Io::Plain(tcp),
                        peer,
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(wire(tcp))).await {
                    Ok(Ok(stream)) => {
                        let peer = peer_of(addr, &stream);
                        let _ = tx
                            .send(Ok(Conn {
                                io: Io::Tls(Box::new(stream)),
                                peer,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => {
                        crate::metrics::refused_handshake();
                        tracing::debug!(%addr, error = %e, "TLS handshake refused");
                    }
                    Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn peer_of(addr: SocketAddr, stream: &tokio_rustls::server::TlsStream<Wire>) -> Peer {
    let presented = stream.get_ref().1.peer_certificates().and_then(|c| c.first());
    let cert = presented.and_then(|der| parse_peer_cert(der));
    Peer {
        addr: Some(addr),
        unnamed_cert: presented.is_some() && cert.is_none(),
        cert,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_uri_round_trips_and_rejects_junk() {
        let id = ServerIdentity {
            site: "b".into(),
            kind: ServerKind::Storage,
            name: "storage-b".into(),
        };
        assert_eq!(id.uri(), "duplex://b/storage/storage-b");
        assert_eq!(ServerIdentity::parse_uri(&id.uri()), Some(id));
        for bad in [
            "duplex://b/storage",
            "duplex://b/king/x",
            "https://b/storage/x",
            "duplex://b/storage/x/y",
            "duplex:///storage/x",
        ] {
            assert_eq!(ServerIdentity::parse_uri(bad), None, "{bad}");
        }
    }
}
