//! Duplex account server: accounts, groups, tokens, each account's home
//! storage server, and the transaction log every change is written to.

mod error;
pub mod server;
pub mod service;
pub mod store;

pub use error::AccountError;
