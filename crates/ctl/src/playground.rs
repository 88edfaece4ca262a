//! `duplexctl playground`: a whole cluster on this machine, as child
//! processes on loopback ports, until SIGINT / SIGTERM.

use duplex_rpc::outln;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use duplex_proto::v1::account_admin_client::AccountAdminClient;
use duplex_proto::v1::coordinator_client::CoordinatorClient;
use duplex_proto::v1::{CreateAccountRequest, ListStorageServersRequest};
use serde::{Deserialize, Serialize};
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

use crate::procs;

const READY_DEADLINE: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(10);
const DEMO_ACCOUNT: &str = "demo";

#[derive(Serialize, Deserialize, Clone)]
pub struct ServiceInfo {
    pub name: String,
    pub kind: String,
    pub site: String,
    pub pid: u32,
    pub addr: String,
    pub data_dir: PathBuf,
    pub cmd: Vec<String>,
}

#[derive(Serialize, Deserialize)]
pub struct AccountInfo {
    pub name: String,
    pub token: String,
}

#[derive(Serialize, Deserialize)]
pub struct PlaygroundFile {
    pub coordinator: Option<String>,
    pub endpoints: Vec<String>,
    pub account: AccountInfo,
    pub mode: String,
    pub services: Vec<ServiceInfo>,
    /// The cluster CA certificate clients trust (absent in plaintext).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// The first admin's token (absent in plaintext).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_token: Option<String>,
    /// The demo account's encryption passphrase.
    #[serde(default)]
    pub password: String,
}

/// How the playground's services are secured.
struct Security {
    /// None: --insecure-plaintext.
    ca_dir: Option<PathBuf>,
}

impl Security {
    fn scheme(&self) -> &'static str {
        if self.ca_dir.is_some() { "https" } else { "http" }
    }

    fn ca_pem(&self) -> Option<PathBuf> {
        self.ca_dir
            .as_ref()
            .map(|d| d.join(duplex_rpc::pki::CA_CERT_FILE))
    }
}

struct Running {
    info: ServiceInfo,
    child: Child,
}

/// What the playground runs.
pub struct Layout {
    pub mode: String,
    /// How many coordinators; more than one share their state in etcd.
    pub coordinators: u8,
    /// An etcd to use; empty: start one from PATH when etcd is needed.
    pub etcd: Vec<String>,
}

impl Layout {
    fn shared_state(&self) -> bool {
        self.coordinators > 1 || !self.etcd.is_empty()
    }

    /// `coordinator`, or `coordinator-1` ... when several share etcd.
    fn coordinator_names(&self) -> Vec<String> {
        if !self.shared_state() {
            return vec!["coordinator".into()];
        }
        (1..=self.coordinators)
            .map(|i| format!("coordinator-{i}"))
            .collect()
    }
}

/// One coordinator per site, then witnesses.
fn coordinator_site(index: usize) -> &'static str {
    ["a", "b"].get(index).copied().unwrap_or("witness")
}

pub async fn run(dir: &Path, layout: &Layout, insecure: bool) -> anyhow::Result<()> {
    duplex_rpc::secure_fs::create_private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = std::fs::canonicalize(dir)?;
    let bin_dir = bin_dir()?;
    let previous = read_previous(&dir);
    let security = if insecure {
        crate::conn::setup(None, true)?;
        Security { ca_dir: None }
    } else {
        // Secure by default: a CA of the playground's own, kept across runs.
        let ca_dir = dir.join("ca");
        duplex_rpc::pki::Ca::load_or_init(&ca_dir)?;
        crate::conn::setup(Some(&ca_dir.join(duplex_rpc::pki::CA_CERT_FILE)), false)?;
        Security { ca_dir: Some(ca_dir) }
    };
    let shutdown = duplex_rpc::shutdown_on_signals();
    let mut running: Vec<Running> = Vec::new();
    let result = start_all(
        &dir,
        &bin_dir,
        layout,
        &security,
        previous,
        &mut running,
        &shutdown,
    )
    .await;
    if let Err(e) = &result {
        eprintln!("playground failed to start: {e:#}");
    } else {
        shutdown.cancelled().await;
        eprintln!("stopping the playground");
    }
    futures::future::join_all(running.iter_mut().map(|r| procs::stop(&mut r.child, STOP_GRACE))).await;
    result
}

async fn start_all(
    dir: &Path,
    bin_dir: &Path,
    layout: &Layout,
    security: &Security,
    previous: Option<PlaygroundFile>,
    running: &mut Vec<Running>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mode = layout.mode.as_str();
    let scheme = security.scheme();
    let mut ports = Ports::new(previous.as_ref());
    let mut specs = Vec::new();
    let mut etcd = layout.etcd.join(",");
    if layout.shared_state() && etcd.is_empty() {
        let (service, url) = etcd_spec(dir, &mut ports, previous.as_ref())?;
        etcd = url;
        specs.push(service);
    }
    let mut coordinator_urls = Vec::new();
    for (i, name) in layout.coordinator_names().iter().enumerate() {
        let port = ports.take(name)?;
        coordinator_urls.push(format!("{scheme}://127.0.0.1:{port}"));
        let mut flags = vec!["--mode".to_owned(), mode.to_owned()];
        if layout.shared_state() {
            flags.extend(["--store".into(), "etcd".into(), "--etcd".into(), etcd.clone()]);
        }
        specs.push(spec(
            bin_dir,
            dir,
            name,
            "coordinator",
            coordinator_site(i),
            port,
            &flags,
        ));
    }
    // Every client follows whichever of them leads.
    let coordinator_url = coordinator_urls.join(",");
    let account_port = ports.take("account-a")?;
    let account_url = format!("{scheme}://127.0.0.1:{account_port}");
    let slave_port = ports.take("account-b")?;
    let slave_url = format!("{scheme}://127.0.0.1:{slave_port}");
    let account_servers = format!("{account_url},{slave_url}");
    let storage_a = ports.take("storage-a")?;
    let storage_b = ports.take("storage-b")?;
    let url_a = format!("{scheme}://127.0.0.1:{storage_a}");
    let active_active = mode == "active-active";
    let storage_flags = |role: &str, primary: &str| {
        let mut flags = vec![
            "--account-servers".to_owned(),
            account_servers.clone(),
            "--role".into(),
            role.into(),
            "--mirroring".into(),
            "sync".into(),
            // A demo: `duplexctl prune` reclaims what `forget` let go a
            // minute after the last backup, not six hours (the default,
            // longer than any real backup takes).
            "--gc-grace".into(),
            "1m".into(),
        ];
        if !primary.is_empty() {
            flags.extend(["--primary".to_owned(), primary.to_owned()]);
        }
        flags
    };
    let b_role = if active_active { "primary" } else { "replica" };
    let b_primary = if active_active { "" } else { url_a.as_str() };
    // Mirrors get their links from the coordinator, which derives them
    // from the roles it assigns.
    let (mirror_a_links, mirror_b_links): (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
    specs.extend([
        spec(
            bin_dir,
            dir,
            "account-a",
            "account",
            "a",
            account_port,
            &["--replication".into(), "sync".into()],
        ),
        spec(
            bin_dir,
            dir,
            "account-b",
            "account",
            "b",
            slave_port,
            &[
                "--master".into(),
                account_url.clone(),
                "--replication".into(),
                "sync".into(),
            ],
        ),
        spec(
            bin_dir,
            dir,
            "storage-a",
            "storage",
            "a",
            storage_a,
            &storage_flags("primary", ""),
        ),
        spec(
            bin_dir,
            dir,
            "storage-b",
            "storage",
            "b",
            storage_b,
            &storage_flags(b_role, b_primary),
        ),
        spec(
            bin_dir,
            dir,
            "mirror-a",
            "mirror",
            "a",
            ports.take("mirror-a")?,
            &mirror_a_links,
        ),
        spec(
            bin_dir,
            dir,
            "mirror-b",
            "mirror",
            "b",
            ports.take("mirror-b")?,
            &mirror_b_links,
        ),
    ]);
    drop(ports);
    let mut operator_token = None;
    for mut info in specs {
        info.addr = info.addr.replacen("http://", &format!("{scheme}://"), 1);
        match (&security.ca_dir, info.kind.as_str()) {
            (_, "etcd") => {}
            (None, _) => info.cmd.push("--insecure-plaintext".into()),
            (Some(ca_dir), "coordinator") => {
                info.cmd
                    .extend(["--ca-dir".to_owned(), ca_dir.display().to_string()]);
            }
            // Every other service reports to the coordinator, enrolling
            // with a one-time token bound to its name on its first start.
            (Some(_), _) => {
                let ca = security.ca_pem().unwrap_or_default();
                info.cmd.extend([
                    "--coordinator".to_owned(),
                    coordinator_url.clone(),
                    "--ca".into(),
                    ca.display().to_string(),
                ]);
                if duplex_rpc::pki::TlsDir::new(&info.data_dir).load().is_none() {
                    let file = enrollment_token_file(dir, &coordinator_url, &info).await?;
                    info.cmd
                        .extend(["--enrollment-token-file".to_owned(), file.display().to_string()]);
                }
            }
        }
        if security.ca_dir.is_none() && !matches!(info.kind.as_str(), "coordinator" | "etcd") {
            info.cmd
                .extend(["--coordinator".to_owned(), coordinator_url.clone()]);
        }
        let log = dir.join(format!("{}.log", info.name));
        let mut child = procs::spawn(&info.cmd, &log).with_context(|| {
            if info.kind == "etcd" {
                "the coordinators keep their shared state in etcd: install it (apt-get install etcd-server) \
                 or pass --etcd URL"
            } else {
                "a service of the playground"
            }
        })?;
        info.pid = child.id().unwrap_or(0);
        wait_healthy(&info, &mut child, &log).await?;
        eprintln!("{} ({}) is up at {}", info.name, info.kind, info.addr);
        // The first coordinator created the first admin (in etcd, for all).
        if info.kind == "coordinator" && security.ca_dir.is_some() && operator_token.is_none() {
            let path = info.data_dir.join("admin-token");
            let token =
                std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            crate::conn::set_token(&token)?;
            operator_token = Some(token.trim().to_owned());
        }
        running.push(Running { info, child });
        if shutdown.is_cancelled() {
            bail!("interrupted while starting");
        }
    }
    let token = demo_account(&account_url, previous.as_ref()).await?;
    // The demo account's passphrase: kept across runs, like its token.
    let password = previous
        .as_ref()
        .map(|p| p.password.clone())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(random_password);
    let file = PlaygroundFile {
        coordinator: Some(coordinator_url.clone()),
        endpoints: coordinator_urls
            .iter()
            .chain([&account_url, &slave_url])
            .cloned()
            .collect(),
        account: AccountInfo {
            name: DEMO_ACCOUNT.into(),
            token: token.clone(),
        },
        mode: mode.to_owned(),
        services: running.iter().map(|r| r.info.clone()).collect(),
        ca: security.ca_pem(),
        operator_token: operator_token.clone(),
        password: password.clone(),
    };
    // It holds secrets: readable by its owner only.
    duplex_rpc::secure_fs::write_private(&dir.join("playground.json"), &serde_json::to_vec_pretty(&file)?)?;
    print_banner(dir, &file);
    Ok(())
}

/// A one-member etcd from PATH (Debian's `etcd-server`) for the
/// coordinators' shared state; its peer port is kept across runs with its
/// data, which records it.
fn etcd_spec(
    dir: &Path,
    ports: &mut Ports<'_>,
    previous: Option<&PlaygroundFile>,
) -> anyhow::Result<(ServiceInfo, String)> {
    let client = ports.take("etcd")?;
    let old_peer = previous
        .and_then(|p| p.services.iter().find(|s| s.name == "etcd"))
        .and_then(|s| {
            let at = s.cmd.iter().position(|a| a == "--listen-peer-urls")?;
            s.cmd.get(at + 1)?.rsplit(':').next()?.parse::<u16>().ok()
        });
    let peer = match old_peer {
        Some(port) => port,
        None => ports.free()?,
    };
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let data_dir = dir.join("etcd");
    let cmd = [
        "etcd",
        "--name",
        "etcd",
        "--data-dir",
        &data_dir.display().to_string(),
        "--listen-client-urls",
        &url,
        "--advertise-client-urls",
        &url,
        "--listen-peer-urls",
        &peer_url,
        "--initial-advertise-peer-urls",
        &peer_url,
        "--initial-cluster",
        &format!("etcd={peer_url}"),
        // A 1 s leader lease needs an election timeout of at most 666 ms
        // (etcd's shortest lease is 1.5 times it, rounded up to seconds).
        "--heartbeat-interval",
        "50",
        "--election-timeout",
        "500",
        // The coordinators rewrite a few keys for good (each standby's
        // last known lag every 5 s): keep an hour of history, not all.
        "--auto-compaction-mode",
        "periodic",
        "--auto-compaction-retention",
        "1h",
    ]
    .map(str::to_owned)
    .to_vec();
    let info = ServiceInfo {
        name: "etcd".into(),
        kind: "etcd".into(),
        site: "a".into(),
        pid: 0,
        addr: url.clone(),
        data_dir,
        cmd,
    };
    Ok((info, url))
}

fn random_password() -> String {
    duplex_coordinator::security::random_secret()
}

fn spec(
    bin_dir: &Path,
    dir: &Path,
    name: &str,
    kind: &str,
    site: &str,
    port: u16,
    extra: &[String],
) -> ServiceInfo {
    let binary = match kind {
        "mirror" => bin_dir.join("duplex-mirror"),
        "coordinator" => bin_dir.join("duplex-coordinator"),
        _ => bin_dir.join(format!("duplex-{kind}-server")),
    };
    let data_dir = dir.join(name);
    let mut cmd = vec![
        binary.display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--name".into(),
        name.into(),
        "--site".into(),
        site.into(),
    ];
    cmd.extend_from_slice(extra);
    ServiceInfo {
        name: name.into(),
        kind: kind.into(),
        site: site.into(),
        pid: 0,
        addr: format!("http://127.0.0.1:{port}"),
        data_dir,
        cmd,
    }
}

/// Picks ports: the one a service had in this directory before (so its
/// data and address stay together across runs), else a free one. Probe
/// listeners stay open until every port is chosen, so no two collide.
struct Ports<'a> {
    previous: Option<&'a PlaygroundFile>,
    held: Vec<std::net::TcpListener>,
}

impl<'a> Ports<'a> {
    fn new(previous: Option<&'a PlaygroundFile>) -> Self {
        Self {
            previous,
            held: Vec::new(),
        }
    }

    fn take(&mut self, name: &str) -> anyhow::Result<u16> {
        let old = self
            .previous
            .and_then(|p| p.services.iter().find(|s| s.name == name))
            .and_then(|s| s.addr.rsplit(':').next())
            .and_then(|p| p.parse::<u16>().ok());
        let listener = match old.and_then(|port| std::net::TcpListener::bind(("127.0.0.1", port)).ok()) {
            Some(l) => l,
            None => std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?,
        };
        let port = listener.local_addr()?.port();
        self.held.push(listener);
        Ok(port)
    }

    /// A free port no service had before.
    fn free(&mut self) -> anyhow::Result<u16> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
        let port = listener.local_addr()?.port();
        self.held.push(listener);
        Ok(port)
    }
}

async fn wait_healthy(info: &ServiceInfo, child: &mut Child, log: &Path) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "{} exited ({status}) while starting; see {}",
                info.name,
                log.display()
            );
        }
        if answers(info).await {
            return Ok(());
        }
        if start.elapsed() > READY_DEADLINE {
            bail!(
                "{} did not become healthy within {READY_DEADLINE:?}; see {}",
                info.name,
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A service answers its health check (etcd: a read).
async fn answers(info: &ServiceInfo) -> bool {
    if info.kind == "etcd" {
        let Ok(etcd) = duplex_etcd::Etcd::connect(std::slice::from_ref(&info.addr)) else {
            return false;
        };
        return tokio::time::timeout(Duration::from_secs(1), etcd.get(b"/duplex/v1/leader"))
            .await
            .is_ok_and(|r| r.is_ok());
    }
    duplex_rpc::health::check(&info.addr, "").await.is_ok()
}

/// A one-time token bound to this service, in a 0600 file (never in argv,
/// where `ps` would show it).
async fn enrollment_token_file(dir: &Path, coordinator: &str, info: &ServiceInfo) -> anyhow::Result<PathBuf> {
    let leader = duplex_rpc::leader::find(coordinator)
        .await
        .map_err(|s| anyhow::anyhow!("no coordinator leads: {}", s.message()))?;
    let mut client = CoordinatorClient::new(crate::conn::conn(&leader)?);
    let binding = crate::ops::Binding {
        name: info.name.clone(),
        site: info.site.clone(),
        kind: info.kind.clone(),
    };
    let token = crate::ops::issue(&mut client, &binding, Duration::ZERO)
        .await
        .map_err(|s| anyhow::anyhow!("issuing an enrollment token for {}: {}", info.name, s.message()))?;
    let tokens = dir.join("tokens");
    duplex_rpc::secure_fs::create_private_dir(&tokens)?;
    let path = tokens.join(&info.name);
    duplex_rpc::secure_fs::write_private(&path, token.token.as_bytes())?;
    Ok(path)
}

/// Creates the demo account once the storage server has registered, or
/// reuses the one a previous run in this directory created.
async fn demo_account(account_url: &str, previous: Option<&PlaygroundFile>) -> anyhow::Result<String> {
    let mut client = AccountAdminClient::new(crate::conn::conn(account_url)?);
    let start = Instant::now();
    loop {
        let servers = client
            .list_storage_servers(ListStorageServersRequest {})
            .await?
            .into_inner()
            .servers;
        if !servers.is_empty() {
            break;
        }
        if start.elapsed() > READY_DEADLINE {
            bail!("no storage server registered with the account server within {READY_DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let request = CreateAccountRequest {
        name: DEMO_ACCOUNT.into(),
        group: String::new(),
        home: String::new(),
        quota_bytes: 0,
    };
    // The master takes writes once the coordinator has granted its lease.
    let created = duplex_rpc::client::retry(READY_DEADLINE, || {
        let mut client = client.clone();
        let request = request.clone();
        async move { client.create_account(request).await }
    })
    .await;
    match created {
        Ok(r) => Ok(r.into_inner().token),
        Err(s) if s.code() == tonic::Code::AlreadyExists => previous
            .map(|p| p.account.token.clone())
            .context("account demo exists but its token was not kept in playground.json; use a fresh --dir"),
        Err(s) => bail!("creating account demo: {}", s.message()),
    }
}

fn read_previous(dir: &Path) -> Option<PlaygroundFile> {
    let bytes = std::fs::read(dir.join("playground.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Where the server binaries are: `DUPLEX_BIN_DIR`, else beside duplexctl.
fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("DUPLEX_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("locating duplexctl")?;
    let dir = exe
        .parent()
        .context("duplexctl has no parent directory")?
        .to_path_buf();
    for name in [
        "duplex-coordinator",
        "duplex-account-server",
        "duplex-storage-server",
        "duplex-mirror",
    ] {
        if !dir.join(name).exists() {
            bail!(
                "{name} is not beside duplexctl in {}; build the workspace (cargo build --release) or set DUPLEX_BIN_DIR",
                dir.display()
            );
        }
    }
    Ok(dir)
}

fn print_banner(dir: &Path, file: &PlaygroundFile) {
    outln!(
        "Duplex playground is running (data in {}). Press Ctrl-C to stop it.",
        dir.display()
    );
    outln!();
    outln!("  export DUPLEX_ENDPOINT={}", file.endpoints.join(","));
    outln!(
        "  export DUPLEX_COORDINATOR={}",
        file.coordinator.as_deref().unwrap_or_default()
    );
    outln!("  export DUPLEX_TOKEN={}", file.account.token);
    outln!("  export DUPLEX_PASSWORD={}", file.password);
    if let (Some(ca), Some(token)) = (&file.ca, &file.operator_token) {
        outln!("  export DUPLEX_CA={}", ca.display());
        outln!("  export DUPLEX_OPERATOR_TOKEN={token}");
    }
    outln!("  duplex backup ~/some/dir");
    outln!("  duplex snapshots");
    outln!("  duplex restore latest --target /tmp/restored");
    outln!("  duplexctl status");
    outln!();
    outln!("Details for scripts: {}", dir.join("playground.json").display());
}
