//! Notifications: an HTTP POST of a JSON document to the webhook for every
//! failover, failback, switchover, refused failover and fencing. Delivery
//! is best effort with a few retries; history is the durable record.

use std::time::Duration;

use bytes::Bytes;
use duplex_proto::v1::Operation;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const ATTEMPTS: u32 = 3;

/// Posts the event in the background.
pub fn send(webhook: Option<&str>, op: &Operation) {
    let Some(url) = webhook else {
        return;
    };
    let url = url.to_owned();
    let body = crate::events::operation_json(op).to_string();
    tokio::spawn(async move {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        for attempt in 1..=ATTEMPTS {
            let request = hyper::Request::post(url.as_str())
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.clone())));
            let request = match request {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(%url, error = %e, "invalid webhook URL");
                    return;
                }
            };
            match tokio::time::timeout(Duration::from_secs(5), client.request(request)).await {
                Ok(Ok(response)) if response.status().is_success() => return,
                Ok(Ok(response)) => {
                    tracing::warn!(%url, status = %response.status(), attempt, "webhook refused")
                }
                Ok(Err(e)) => tracing::warn!(%url, error = %e, attempt, "webhook unreachable"),
                Err(_) => tracing::warn!(%url, attempt, "webhook timed out"),
            }
            tokio::time::sleep(Duration::from_millis(500) * attempt).await;
        }
    });
}
