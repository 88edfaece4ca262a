//! Test harness: starts the real Duplex binaries as processes, kills and
//! restarts them, and builds and compares file trees.
//!
//! The binaries come from the target directory this test binary was built
//! into; build them first (`cargo build --release --bins`).

#![allow(clippy::unwrap_used)]

pub mod accounts;
pub mod alerts;
pub mod bench;
pub mod cluster;
pub mod etcd;
pub mod ha;
pub mod phases;
pub mod proxy;
pub mod service;
pub mod sites;
pub mod tree;
pub mod twosite;

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use cluster::Cluster;

/// One garbage collection round on the storage server at `addr`, waited for.
pub async fn collect_garbage(addr: &str) -> duplex_proto::v1::GcReport {
    use duplex_proto::v1::storage_admin_client::StorageAdminClient;
    StorageAdminClient::new(duplex_rpc::channel(addr).unwrap())
        .collect_garbage(duplex_proto::v1::CollectGarbageRequest { wait: true })
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap()
}

/// Storage flags that collect whatever is dead at once, and only when asked.
pub const GC_EAGER: &[&str] = &[
    "--gc-grace",
    "0s",
    "--gc-retire-delay",
    "0s",
    "--gc-interval",
    "0s",
];
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

static OPERATOR_TOKEN: std::sync::RwLock<Option<String>> = std::sync::RwLock::new(None);

/// The operator token the test's own gRPC calls present (`TwoSites` sets
/// its admin's).
pub fn use_operator_token(token: &str) {
    *OPERATOR_TOKEN.write().unwrap() = Some(token.to_owned());
}

type Authorize = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;

/// A channel for the test's own calls, carrying the operator token if one is set.
pub type Conn = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Authorize>;

fn authorize(mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    if let Some(token) = OPERATOR_TOKEN.read().unwrap().clone() {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    Ok(request)
}

/// Connects the test itself to a server.
pub fn connect(addr: &str) -> Conn {
    tonic::service::interceptor::InterceptedService::new(
        duplex_rpc::channel(addr).unwrap(),
        authorize as Authorize,
    )
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

/// How long the harness lets one agent or CLI command run: far past any
/// command the tests make, so only a hang meets it.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(300);

/// Runs `cmd` to its end like `Command::output`, but a command still
/// running after `COMMAND_LIMIT` is a hang: its threads' stacks are
/// printed (when gdb is here), it is killed, and the test fails naming
/// it, rather than the whole run waiting for CI's own timeout.
pub fn output_within_limit(cmd: &mut std::process::Command) -> std::process::Output {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > COMMAND_LIMIT {
            let stacks = stacks_of(child.id());
            let _ = child.kill();
            let _ = child.wait();
            let stderr = stderr.join().unwrap_or_default();
            panic!(
                "{cmd:?} still ran after {COMMAND_LIMIT:?}; its threads were:\n{stacks}\nits stderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// Reads a child's pipe to its end on a thread of its own, so neither
/// pipe fills while the other is read.
fn drain<R: std::io::Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

/// Every thread's stack of process `pid`, from gdb if it is installed.
fn stacks_of(pid: u32) -> String {
    std::process::Command::new("gdb")
        .args(["-batch", "-p", &pid.to_string(), "-ex", "thread apply all bt"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("(no stacks: gdb: {e})"))
}

/// A multi-threaded runtime for the tests' own gRPC calls.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// GET `/metrics` over TLS trusting `ca`, with an operator token; the body.
pub fn scrape_tls(addr: &str, ca: &std::path::Path, token: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = addr.trim_start_matches("https://").to_owned();
    let roots = duplex_rpc::tls::roots(Some(ca)).unwrap();
    let config = duplex_rpc::tls::client_config(roots, None).unwrap();
    // Scrapers speak HTTP/1.1; the server offers it beside h2.
    let mut config = (*config).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let response = runtime().block_on(async move {
        let tcp = tokio::net::TcpStream::connect(&host).await.expect("connect for /metrics");
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = connector.connect(name, tcp).await.expect("TLS for /metrics");
        let request = format!(
            "GET /metrics HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        );
        tls.write_all(request.as_bytes()).await.expect("send");
        let mut response = Vec::new();
        // A peer that closes without close_notify is fine here.
        let _ = tls.read_to_end(&mut response).await;
        String::from_utf8_lossy(&response).into_owned()
    });
    assert!(response.starts_with("HTTP/1.1 200"), "GET /metrics: {response}");
    response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
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

/// Adds an account ticket to every call, as the agent does.
#[derive(Clone)]
pub struct WithTicket(tonic::metadata::BinaryMetadataValue);

impl WithTicket {
    pub fn new(ticket: &[u8]) -> Self {
        Self(tonic::metadata::BinaryMetadataValue::from_bytes(ticket))
    }
}

impl tonic::service::Interceptor for WithTicket {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut()
            .insert_bin(duplex_proto::TICKET_METADATA_KEY, self.0.clone());
        Ok(req)
    }
}

/// Logs in at the account server `account` as the account with `token`.
pub async fn login(
    account: &str,
    token: &str,
    purpose: duplex_proto::v1::Purpose,
) -> duplex_proto::v1::LoginResponse {
    use duplex_proto::v1::account_service_client::AccountServiceClient;
    AccountServiceClient::new(duplex_rpc::channel(account).unwrap())
        .login(duplex_proto::v1::LoginRequest {
            token: token.to_owned(),
            purpose: purpose as i32,
        })
        .await
        .unwrap()
        .into_inner()
}

/// A chunk with the sealed shape but made-up content, as a test uploads
/// it over the wire (the server cannot tell, and need not: only the agent
/// can open a payload).
pub fn opaque_chunk(name: &[u8]) -> duplex_proto::v1::Chunk {
    let mut data = vec![duplex_types::sealed::PAYLOAD_FORMAT_V1];
    data.extend_from_slice(&[0; 40]);
    data.extend_from_slice(name);
    duplex_proto::v1::Chunk {
        id: duplex_types::ChunkId::of(name).to_vec(),
        data_hash: duplex_types::sealed::payload_hash(&data).to_vec(),
        data: data.into(),
    }
}

/// `cmd` run so that file permissions bind it: as root (CI), through
/// `setpriv` without the capabilities that override them, so a file of
/// mode 000 cannot be read; as anyone else, as it is.
pub fn bound_by_permissions(cmd: &std::process::Command) -> std::process::Command {
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let mut out = if root {
        let mut wrapped = std::process::Command::new("setpriv");
        wrapped
            .args(["--bounding-set", "-dac_override,-dac_read_search"])
            .arg(cmd.get_program());
        wrapped
    } else {
        std::process::Command::new(cmd.get_program())
    };
    out.args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => out.env(key, value),
            None => out.env_remove(key),
        };
    }
    out
}
