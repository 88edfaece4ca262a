//! A server's side of the coordinator: heartbeats that report its state,
//! enrollment, the write lease that comes back with every answer, and the
//! role assignment the server converges to.
//!
//! The lease is counted from when a heartbeat was *sent*, while the
//! coordinator counts it from when it answered, so the server's lease always
//! ends first: once the coordinator's view of a lease has lapsed, the server
//! has surely stopped writing.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use duplex_proto::v1::coordinator_client::CoordinatorClient;
use duplex_proto::v1::{Assignment, HeartbeatRequest};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::metadata::MetadataValue;

/// How often a server heartbeats unless the coordinator asks otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(250);
/// Metadata key set on a refusal by a fenced server.
pub const FENCED_METADATA_KEY: &str = "duplex-fenced";
/// How a server reaches the coordinator. The server proves who it is with
/// its certificate (mutual TLS); the answers carry who may call it.
#[derive(Clone, Debug)]
pub struct Link {
    pub url: String,
    /// Updated from the security state each answer may carry.
    pub gate: std::sync::Arc<crate::auth::Gate>,
    /// Operator actions the heartbeats carry to the coordinator's history.
    pub audit: std::sync::Arc<crate::audit::Outbox>,
}

/// The write lease of a master or primary. Not enforced for a server that
/// runs without a coordinator.
pub struct Lease {
    enforced: bool,
    until: Mutex<Option<Instant>>,
}

impl Lease {
    pub fn new(enforced: bool) -> Self {
        Self {
            enforced,
            until: Mutex::new(None),
        }
    }

    pub fn valid(&self) -> bool {
        !self.enforced || self.remaining() > Duration::ZERO
    }

    /// Time left on the lease (zero when lapsed or never granted).
    pub fn remaining(&self) -> Duration {
        self.until
            .lock()
            .ok()
            .and_then(|u| *u)
            .map_or(Duration::ZERO, |u| u.saturating_duration_since(Instant::now()))
    }

    fn set(&self, until: Option<Instant>) {
        if let Ok(mut u) = self.until.lock() {
            *u = until;
        }
    }

    /// Refuses a write once the lease has lapsed, telling the client why.
    pub fn check(&self, server: &str) -> Result<(), Status> {
        if self.valid() {
            return Ok(());
        }
        let mut status = Status::unavailable(format!(
            "{server} is fenced: its lease from the coordinator has lapsed, so it accepts no writes \
             until the coordinator renews it (a failover may be moving its role); ask the coordinator \
             for the current primary"
        ));
        status
            .metadata_mut()
            .insert(FENCED_METADATA_KEY, MetadataValue::from_static("1"));
        Err(status)
    }
}

/// Heartbeats every interval until `stop`: `report()` says what to send,
/// `apply(assignment)` makes the server converge to what the coordinator
/// assigned, and the lease is renewed or revoked with each answer.
pub async fn run<R, RF, A, AF>(
    link: Link,
    lease: std::sync::Arc<Lease>,
    report: R,
    apply: A,
    stop: CancellationToken,
) where
    R: Fn() -> RF + Send,
    RF: Future<Output = HeartbeatRequest> + Send,
    A: Fn(Assignment) -> AF + Send,
    AF: Future<Output = ()> + Send,
{
    // Several coordinators: heartbeat to the one that leads, following a
    // follower's pointer or trying the next after a failure.
    let urls = crate::leader::urls(&link.url);
    let mut url = urls.first().cloned().unwrap_or_default();
    let Ok(channel) = crate::channel(&url) else {
        tracing::error!(coordinator = %link.url, "invalid coordinator address; not sending heartbeats");
        return;
    };
    let mut client = CoordinatorClient::new(channel);
    let mut interval = DEFAULT_INTERVAL;
    // The last failure logged: each new kind of failure is logged once
    // (a refusal after a timeout must not be hidden behind it).
    let mut failing: Option<String> = None;
    // Followed a pointer without pausing: the next one waits (two
    // coordinators pointing at each other mid-election cannot spin).
    let mut followed = false;
    loop {
        let mut request = report().await;
        request.security_version = link.gate.version();
        request.audit = link.audit.pending();
        request.audit_stream = link.audit.stream();
        let sent = Instant::now();
        let answer = tokio::time::timeout(interval * 2, client.heartbeat(request)).await;
        let hinted = matches!(&answer, Ok(Err(status)) if crate::leader::hint(status).is_some());
        if !hinted {
            followed = false;
        }
        let moved = match &answer {
            Ok(Ok(_)) => None,
            Ok(Err(status)) if urls.len() > 1 || crate::leader::hint(status).is_some() => {
                Some(crate::leader::next(&urls, &url, Some(status)))
            }
            Err(_) if urls.len() > 1 => Some(crate::leader::next(&urls, &url, None)),
            _ => None,
        };
        match answer {
            Ok(Ok(response)) => {
                if failing.take().is_some() {
                    tracing::info!(coordinator = %url, "coordinator reachable again");
                }
                let response = response.into_inner();
                // Only what the coordinator says it holds leaves the queue;
                // the rest goes again with the next heartbeat.
                link.audit.acknowledge(response.audit_acknowledged);
                lease.set((response.lease_ms > 0).then(|| sent + Duration::from_millis(response.lease_ms)));
                if let Some(security) = &response.security {
                    crate::security::apply_state(&link.gate, security);
                }
                if response.interval_ms > 0 {
                    interval = Duration::from_millis(response.interval_ms);
                }
                if let Some(assignment) = response.assignment {
                    apply(assignment).await;
                }
            }
            // A follower pointing elsewhere is no failure worth a warning.
            Ok(Err(status)) if crate::leader::from_follower(&status) => {
                tracing::debug!(coordinator = %url, %status, "a following coordinator answered");
            }
            Ok(Err(status)) => {
                let failure = format!("{:?}: {}", status.code(), status.message());
                if failing.as_ref() != Some(&failure) {
                    tracing::warn!(coordinator = %url, %status, "heartbeat refused");
                    failing = Some(failure);
                }
            }
            Err(_) => {
                if failing.as_deref() != Some("timeout") {
                    tracing::warn!(coordinator = %url, "heartbeat timed out");
                    failing = Some("timeout".into());
                }
            }
        }
        if let Some(next) = moved.filter(|n| *n != url) {
            match crate::channel(&next) {
                Ok(channel) => {
                    tracing::debug!(coordinator = %next, "heartbeats go to another coordinator");
                    client = CoordinatorClient::new(channel);
                    url = next;
                    // The leader a follower named is asked at once; a
                    // coordinator that failed is replaced after the pause.
                    if hinted && !std::mem::replace(&mut followed, true) {
                        continue;
                    }
                }
                Err(e) => tracing::warn!(coordinator = %next, error = %e, "cannot reach the named leader"),
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval.saturating_sub(sent.elapsed())) => {}
        }
    }
}
