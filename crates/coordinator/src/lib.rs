//! Duplex coordinator: the control plane. It keeps the registry of
//! servers, assigns roles with epochs and leases through heartbeats,
//! publishes the topology clients follow, and runs failover, switchover,
//! failback and resync as durable, resumable operations.

pub mod core;
pub mod detector;
pub mod notify;
pub mod ops;
pub mod service;
pub mod store;

/// RFC 3339 time of a unix-milliseconds timestamp.
pub fn rfc3339(unix_ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}
