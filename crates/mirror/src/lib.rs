//! duplex-mirror: runs mirroring links between storage servers.

pub mod link;
pub mod policy;
pub mod service;
