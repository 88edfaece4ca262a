//! Client plumbing: channels with Duplex's message limits and window sizes,
//! and retries driven by an explicit table of gRPC codes.

use std::future::Future;
use std::time::Duration;

use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::tls::ClientMode;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid endpoint {url:?}: {source}")]
    Endpoint {
        url: String,
        source: tonic::transport::Error,
    },
    #[error(
        "{url} is a plaintext address, but this client speaks TLS only: use https:// \
         (plaintext is for local debugging, with --insecure-plaintext on both sides)"
    )]
    PlaintextRefused { url: String },
    #[error("{url} is a TLS address, but this client runs with --insecure-plaintext")]
    TlsUnconfigured { url: String },
}

/// A lazily connecting channel to `url`: the first call connects, and a
/// broken connection is re-established by the next call. It speaks TLS or
/// plaintext as this process was set up to ([`crate::tls::set_client_mode`]);
/// an address of the other kind is refused here, with a message saying so,
/// rather than failing obscurely in a handshake.
pub fn channel(url: &str) -> Result<Channel, ClientError> {
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|source| ClientError::Endpoint {
        url: url.to_owned(),
        source,
    })?;
    let https = endpoint.uri().scheme_str() == Some("https");
    let endpoint = endpoint
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .initial_stream_window_size(Some(4 * 1024 * 1024))
        .initial_connection_window_size(Some(16 * 1024 * 1024))
        .max_frame_size(crate::MAX_FRAME_SIZE);
    match (crate::tls::client_mode(), https) {
        (ClientMode::Plaintext | ClientMode::ByScheme(_), false) => Ok(endpoint.connect_lazy()),
        (ClientMode::Tls(config) | ClientMode::ByScheme(config), true) => Ok(tls_channel(endpoint, config)),
        (ClientMode::Tls(_), false) => Err(ClientError::PlaintextRefused { url: url.to_owned() }),
        (ClientMode::Plaintext, true) => Err(ClientError::TlsUnconfigured { url: url.to_owned() }),
    }
}

/// A channel to an `https://` URL with this TLS configuration rather than
/// the process's (a test presenting another identity's certificate).
pub fn channel_with(url: &str, config: std::sync::Arc<rustls::ClientConfig>) -> Result<Channel, ClientError> {
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|source| ClientError::Endpoint {
        url: url.to_owned(),
        source,
    })?;
    Ok(tls_channel(
        endpoint.connect_timeout(Duration::from_secs(3)),
        config,
    ))
}

fn tls_channel(endpoint: Endpoint, config: std::sync::Arc<rustls::ClientConfig>) -> Channel {
    endpoint.connect_with_connector_lazy(crate::tls::Dialer {
        connector: tokio_rustls::TlsConnector::from(config),
    })
}

/// Metadata on a RESOURCE_EXHAUSTED that is an account's quota, not a
/// passing limit: waiting does not help, so nothing retries it.
pub const QUOTA_METADATA_KEY: &str = "duplex-quota";

/// Whether a refusal is an account's used-up quota.
pub fn is_quota(status: &tonic::Status) -> bool {
    status.metadata().get(QUOTA_METADATA_KEY).is_some()
}

/// Metadata on the FAILED_PRECONDITION of a snapshot commit that names
/// chunks the server does not hold (never uploaded, or collected since a
/// `MissingChunks` answered them present): uploading them again helps.
pub const MISSING_METADATA_KEY: &str = "duplex-missing-chunks";

/// Whether a refused commit lacked chunks.
pub fn is_missing_chunks(status: &tonic::Status) -> bool {
    status.code() == Code::FailedPrecondition && status.metadata().get(MISSING_METADATA_KEY).is_some()
}

/// Codes worth retrying: the call did not happen or may succeed elsewhere
/// or later. Never `Internal`, `InvalidArgument`, `DataLoss` or auth
/// failures, which would fail the same way again.
pub fn is_retryable(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::ResourceExhausted | Code::Aborted)
}

/// Retries an idempotent call on retryable codes with exponential backoff
/// until `deadline` has passed.
pub async fn retry<T, F, Fut>(deadline: Duration, call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    use crate::backoff::Retryable;
    call.retry(crate::backoff::policy(
        Duration::from_millis(50),
        Duration::from_secs(1),
        Some(deadline),
    ))
    .when(|status| is_retryable(status.code()))
    .notify(|status, pause| tracing::debug!(code = ?status.code(), message = status.message(), ?pause, "retrying"))
    .await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_unavailable_but_not_internal() {
        let calls = AtomicU32::new(0);
        let ok = retry(Duration::from_secs(5), || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(tonic::Status::unavailable("down"))
            } else {
                Ok(7)
            }
        })
        .await;
        assert_eq!(ok.ok(), Some(7));
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        let calls = AtomicU32::new(0);
        let err = retry(Duration::from_secs(5), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(tonic::Status::internal("bug"))
        })
        .await;
        assert_eq!(err.map_err(|s| s.code()), Err(Code::Internal));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
