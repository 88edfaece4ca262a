//! Duplex account server: accounts, groups, tokens, each account's home
//! storage server, and the transaction log every change is written to,
//! shipped to slaves that apply it as it arrives.

pub mod divergence;
mod error;
pub mod follower;
pub mod hub;
pub mod node;
pub mod policy;
pub mod replication;
pub mod server;
pub mod service;
pub mod store;

pub use error::AccountError;
