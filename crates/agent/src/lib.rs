//! The Duplex backup agent, as a library so tests can drive it in process.

pub mod backup;
pub mod chunking;
mod error;
pub mod restore;
pub mod scan;
pub mod session;

pub use error::AgentError;
