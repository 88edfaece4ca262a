//! Duplex coordinator: the control plane. This first part keeps the
//! registry of servers and their heartbeats, and answers for the cluster's
//! state; role changes, leases and the failover phases build on it.

pub mod registry;
pub mod service;
