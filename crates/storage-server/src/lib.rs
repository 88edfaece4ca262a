//! Duplex storage server: the storage engine (`store`) and its gRPC face.

pub mod auth;
pub mod chunk_stream;
pub mod collector;
mod error;
pub mod limits;
pub mod mirroring;
pub mod policy;
pub mod pull;
pub mod repair;
pub mod replication;
pub mod server;
pub mod service;
pub mod store;
