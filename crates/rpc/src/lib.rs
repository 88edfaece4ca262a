//! RPC plumbing shared by every Duplex server and client.

pub mod audit;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod discovery;
pub mod health;
pub mod heartbeat;
pub mod metrics;
pub mod pki;
pub mod secure_fs;
pub mod security;
pub mod serve;
pub mod telemetry;
pub mod ticket;
pub mod tls;

pub use client::{ClientError, channel};
pub use serve::{Bound, ServeError, bind, serve, shutdown_on_signals};
