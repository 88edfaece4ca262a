//! How duplexctl connects: TLS trusting `--ca` (or the system's roots), or
//! plaintext only when asked for on both sides; and the operator token,
//! marked sensitive, on every call.

use std::path::Path;
use std::sync::RwLock;

use duplex_rpc::ClientError;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

type Authorize = fn(Request<()>) -> Result<Request<()>, Status>;

/// A channel that carries the operator token.
pub type Conn = InterceptedService<Channel, Authorize>;

static TOKEN: RwLock<Option<MetadataValue<Ascii>>> = RwLock::new(None);

/// Sets up this process's connections.
pub fn setup(ca: Option<&Path>, insecure: bool) -> anyhow::Result<()> {
    Ok(duplex_rpc::tls::setup_client(ca, insecure)?)
}

/// The operator token every later call presents.
pub fn set_token(token: &str) -> anyhow::Result<()> {
    let mut value: MetadataValue<Ascii> = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| anyhow::anyhow!("the operator token contains characters a token never has"))?;
    // Never logged or shown by tonic's debug output.
    value.set_sensitive(true);
    if let Ok(mut t) = TOKEN.write() {
        *t = Some(value);
    }
    Ok(())
}

fn authorize(mut request: Request<()>) -> Result<Request<()>, Status> {
    if let Some(token) = TOKEN.read().ok().and_then(|t| t.clone()) {
        request
            .metadata_mut()
            .insert(duplex_rpc::auth::AUTHORIZATION, token);
    }
    Ok(request)
}

/// A lazily connecting channel to `url` that carries the operator token.
pub fn conn(url: &str) -> Result<Conn, ClientError> {
    Ok(InterceptedService::new(
        duplex_rpc::channel(url)?,
        authorize as Authorize,
    ))
}
