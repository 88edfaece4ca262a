//! The `healthcheck` subcommand every server binary has, for container
//! healthchecks: asks the standard gRPC health service and exits 0 only on
//! SERVING.

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::client::{ClientError, channel};

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error(transparent)]
    Connect(#[from] ClientError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("health check of {addr} failed: {status}")]
    Call { addr: String, status: tonic::Status },
    #[error("{addr} reports {status:?}")]
    NotServing { addr: String, status: ServingStatus },
}

/// Checks `service` ("" for the whole server) at `addr`.
pub async fn check(addr: &str, service: &str) -> Result<(), HealthError> {
    let mut client = HealthClient::new(channel(addr)?);
    let response = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|status| HealthError::Call {
            addr: addr.to_owned(),
            status,
        })?;
    match response.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        status => Err(HealthError::NotServing {
            addr: addr.to_owned(),
            status,
        }),
    }
}

/// Turns `127.0.0.1:7000`, `0.0.0.0:7000` or a URL into a URL to dial.
pub fn dial_url(listen_or_url: &str) -> String {
    if listen_or_url.contains("://") {
        return listen_or_url.to_owned();
    }
    let addr = listen_or_url
        .replace("0.0.0.0", "127.0.0.1")
        .replace("[::]", "[::1]");
    format!("{}://{addr}", crate::tls::scheme())
}
