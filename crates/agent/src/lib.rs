//! The Duplex backup agent, as a library so tests can drive it in process.

pub mod aead;
pub mod backup;
pub mod browse;
pub mod cache;
pub mod chunking;
pub mod crypto;
mod error;
pub mod forget;
pub mod keys;
pub mod manifest;
pub mod pipeline;
pub mod restore;
pub mod scan;
pub mod secret;
pub mod session;
pub mod verify;

pub use error::AgentError;
