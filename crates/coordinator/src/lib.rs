//! Duplex coordinator: the control plane. It keeps the registry of
//! servers, assigns roles with epochs and leases through heartbeats,
//! publishes the topology clients follow, and runs failover, switchover,
//! failback and resync as durable, resumable operations.
//!
//! `decide` holds every rule as a pure function; `engine` owns the desired
//! state and applies what the rules decide; `servers` is the one door to
//! the outside, so the same engine runs against real servers and in the
//! simulation (`tests/simulation.rs`).

pub mod audit;
pub mod clock;
pub mod config;
pub mod decide;
pub mod engine;
pub mod events;
pub mod heartbeat;
pub mod leadership;
pub mod model;
pub mod notify;
pub mod observed;
pub mod policy;
pub mod security;
pub mod servers;
pub mod service;
pub mod store;
