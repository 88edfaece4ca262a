//! Test harness: starts the real Duplex binaries as processes, kills and
//! restarts them, and builds and compares file trees.
//!
//! The binaries come from the target directory this test binary was built
//! into; build them first (`cargo build --release --bins`).

#![allow(clippy::unwrap_used)]

pub mod accounts;
pub mod bench;
pub mod cluster;
pub mod proxy;
pub mod service;
pub mod sites;
pub mod tree;
pub mod twosite;

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use cluster::Cluster;
pub use service::Service;

/// Path of a workspace binary, built alongside this test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(|p| p.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --release --bins` before the tests",
        path.display()
    );
    path
}

/// Polls `check` until it returns Some, or panics after `deadline`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A multi-threaded runtime for the tests' own gRPC calls.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// GET `/metrics` from a server (HTTP/1.1 on its gRPC port); the body.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let host = addr.trim_start_matches("http://");
    let mut conn = std::net::TcpStream::connect(host).expect("connect for /metrics");
    write!(
        conn,
        "GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut response = String::new();
    conn.read_to_string(&mut response).expect("read /metrics");
    assert!(response.starts_with("HTTP/1.1 200"), "GET /metrics: {response}");
    response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}
