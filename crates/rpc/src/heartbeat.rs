//! Heartbeats to the coordinator: every server that is given
//! `--coordinator` reports its role, epoch and lag on a fixed interval.

use std::future::Future;
use std::time::Duration;

use duplex_proto::v1::HeartbeatRequest;
use duplex_proto::v1::coordinator_client::CoordinatorClient;
use tokio_util::sync::CancellationToken;

/// How often a server heartbeats unless the coordinator asks otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(500);

/// Sends `report()` to the coordinator every interval until `stop`.
pub async fn run<F, Fut>(coordinator: String, report: F, stop: CancellationToken)
where
    F: Fn() -> Fut + Send,
    Fut: Future<Output = HeartbeatRequest> + Send,
{
    let Ok(channel) = crate::channel(&coordinator) else {
        tracing::error!(%coordinator, "invalid coordinator address; not sending heartbeats");
        return;
    };
    let mut client = CoordinatorClient::new(channel);
    let mut interval = DEFAULT_INTERVAL;
    let mut failing = false;
    loop {
        let request = report().await;
        match tokio::time::timeout(interval * 2, client.heartbeat(request)).await {
            Ok(Ok(response)) => {
                if failing {
                    tracing::info!(%coordinator, "coordinator reachable again");
                    failing = false;
                }
                let ms = response.into_inner().interval_ms;
                if ms > 0 {
                    interval = Duration::from_millis(ms);
                }
            }
            Ok(Err(status)) if !failing => {
                tracing::warn!(%coordinator, %status, "heartbeat refused");
                failing = true;
            }
            Err(_) if !failing => {
                tracing::warn!(%coordinator, "heartbeat timed out");
                failing = true;
            }
            _ => {}
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}
