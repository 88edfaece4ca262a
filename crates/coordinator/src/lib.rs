//! Duplex coordinator: the control plane. It keeps the registry of
//! servers, assigns roles with epochs and leases through heartbeats,
//! publishes the topology clients follow, and runs failover, switchover,
//! failback and resync as durable, resumable operations.

pub mod core;
pub mod detector;
pub mod events;
pub mod notify;
pub mod ops;
pub mod service;
pub mod store;
