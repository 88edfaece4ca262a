use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use duplex_coordinator::clock::Clock;
use duplex_coordinator::config::Config;
use duplex_coordinator::leadership::{self, Member, Term};
use duplex_coordinator::notify::{AlertSettings, Alerts};
use duplex_coordinator::security::{Security, issue_own};
use duplex_coordinator::servers::GrpcServers;
use duplex_coordinator::service::CoordinatorApi;
use duplex_coordinator::store::{EtcdStore, Store};
use duplex_etcd::Etcd;
use duplex_proto::v1::ServerInfo;
use duplex_proto::v1::coordinator_server::CoordinatorServer;
use duplex_rpc::cli::{ServerArgs, ServerCommand, Start, start};
use duplex_rpc::pki::Ca;
use duplex_rpc::security::Secured;
use duplex_types::{Mode, ServerKind};
use std::sync::atomic::AtomicI64;
use tonic::server::NamedService;
use tonic::service::Routes;

/// Duplex coordinator: roles, leases, failover, failback and switchover.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    server: ServerArgs,
    /// active-passive: every account homed on site a; active-active: split.
    #[arg(long, env = "DUPLEX_MODE", default_value = "active-passive", value_parser = parse_mode, global = true)]
    mode: Mode,
    /// A master or primary silent this long is failed over.
    #[arg(long, env = "DUPLEX_FAILOVER_TIMEOUT", value_parser = humantime::parse_duration, default_value = "1500ms", global = true)]
    failover_timeout: Duration,
    /// Write lease of masters and primaries (at most the failover timeout).
    #[arg(long, env = "DUPLEX_LEASE", value_parser = humantime::parse_duration, default_value = "1s", global = true)]
    lease: Duration,
    /// How often servers heartbeat.
    #[arg(long, env = "DUPLEX_HEARTBEAT_INTERVAL", value_parser = humantime::parse_duration, default_value = "250ms", global = true)]
    heartbeat_interval: Duration,
    /// No automatic failover when the lost primary's mirror lag was larger.
    #[arg(long, env = "DUPLEX_MAX_LAG_ON_FAILOVER", value_parser = humantime::parse_duration, default_value = "30s", global = true)]
    max_lag_on_failover: Duration,
    /// Only fail over when an operator says so.
    #[arg(long, env = "DUPLEX_NO_AUTO_FAILOVER", global = true)]
    no_auto_failover: bool,
    /// POST each event's JSON here (http or https): failovers, failbacks,
    /// switchovers, refusals, fencing, degraded sync, standbys lost and regained.
    #[arg(long, env = "DUPLEX_WEBHOOK", global = true)]
    webhook: Option<String>,
    /// Trust this CA (PEM) for an https webhook instead of the system's roots.
    #[arg(long, env = "DUPLEX_WEBHOOK_CA", global = true)]
    webhook_ca: Option<std::path::PathBuf>,
    /// Mail each event through this server: smtp://HOST[:PORT] (plain, for
    /// a local relay), smtp://HOST[:PORT]?tls=required (STARTTLS) or
    /// smtps://HOST[:PORT] (TLS); USER:PASSWORD@ only with TLS.
    #[arg(long, env = "DUPLEX_SMTP_URL", global = true)]
    smtp_url: Option<String>,
    /// Who gets the alert emails (repeat, or separate with commas).
    #[arg(long, env = "DUPLEX_ALERT_EMAIL", value_delimiter = ',', global = true)]
    alert_email: Vec<String>,
    /// The alert emails' sender.
    #[arg(long, env = "DUPLEX_ALERT_FROM", global = true)]
    alert_from: Option<String>,
    /// How long a failback waits for recovered servers before giving up.
    #[arg(long, env = "DUPLEX_REJOIN_TIMEOUT", value_parser = humantime::parse_duration, default_value = "1h", global = true)]
    rejoin_timeout: Duration,
    /// How long any other phase waits for servers before its way out.
    #[arg(long, env = "DUPLEX_PHASE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "60s", global = true)]
    phase_timeout: Duration,
    /// The cluster CA (`duplexctl ca init --dir DIR`); default DATA_DIR/ca,
    /// created on first start if absent.
    #[arg(long, env = "DUPLEX_CA_DIR", global = true)]
    ca_dir: Option<std::path::PathBuf>,
    /// How long the server certificates it issues are valid (renewed by
    /// the servers after two thirds of it).
    #[arg(long, env = "DUPLEX_CERT_LIFETIME", value_parser = humantime::parse_duration, default_value = "90d", global = true)]
    cert_lifetime: Duration,
    /// Where the state lives: embedded (one redb file, one coordinator) or
    /// etcd (shared by several coordinators, one leading).
    #[arg(long, env = "DUPLEX_STORE", default_value = "embedded", value_parser = ["embedded", "etcd"], global = true)]
    store: String,
    /// etcd endpoints (http://HOST:PORT, comma-separated) for --store etcd.
    #[arg(long, env = "DUPLEX_ETCD", value_delimiter = ',', global = true)]
    etcd: Vec<String>,
    /// How long a leader that stopped renewing keeps leading (its etcd
    /// lease, whole seconds). etcd raises a lease shorter than 1.5 times
    /// its election timeout, rounded up (2s with etcd's default 1s; run
    /// etcd with --election-timeout 500 for 1s); a raised lease only makes
    /// a takeover slower, never two leaders.
    #[arg(long, env = "DUPLEX_LEADER_LEASE", value_parser = humantime::parse_duration, default_value = "1s", global = true)]
    leader_lease: Duration,
    #[command(subcommand)]
    command: Option<ServerCommand>,
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    s.parse().map_err(|e: duplex_types::InvalidInput| e.to_string())
}

const DEFAULT_LISTEN: &str = "0.0.0.0:7300";

#[tokio::main]
pub(crate) async fn main() -> anyhow::Result<()> {
    let cli: Cli = duplex_rpc::config::parse()?;
    duplex_rpc::telemetry::init_as(cli.server.log_format);
    let listen = match start(&cli.server, cli.command.as_ref(), DEFAULT_LISTEN).await? {
        Start::Checked => return Ok(()),
        Start::Serve { listen } => listen,
    };
    if cli.lease > cli.failover_timeout || cli.lease < cli.heartbeat_interval * 2 {
        anyhow::bail!(
            "--lease must be at least two heartbeat intervals and at most --failover-timeout \
             (so a lost holder's lease has lapsed when it is declared lost)"
        );
    }
    let data_dir = cli.server.prepared_data_dir()?;
    let shutdown = duplex_rpc::shutdown_on_signals();
    let name = cli.server.name.clone().unwrap_or_else(|| "coordinator".into());
    let shared = shared_state(&cli)?;
    let store = Arc::new(match &shared {
        Some((etcd, fence)) => Store::Etcd(Box::new(EtcdStore::new(etcd.clone(), fence.clone()))),
        None => Store::open(&data_dir)?,
    });
    let (secured, ca) = secure(&cli, &listen, &data_dir, &name)?;
    let security = Security::new(
        store.clone(),
        ca,
        secured.gate.clone(),
        cli.cert_lifetime,
        Clock::system(),
    )
    .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    if let Some(path) = security
        .bootstrap_admin(&data_dir)
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
    {
        tracing::warn!(path = %path.display(), "first start: created operator \"admin\"; its token is in this file (0600)");
    }
    if let Some(credentials) = secured.credentials.clone() {
        let identity = duplex_rpc::security::identity(ServerKind::Coordinator, &cli.server.site, &name);
        security.spawn_self_renewal(identity, cli.server.hosts(&listen), credentials, shutdown.clone());
    }
    let bound = duplex_rpc::bind(&listen).await?;
    let info = ServerInfo {
        id: uuid::Uuid::new_v4().to_string(),
        name,
        site: cli.server.site.clone(),
        kind: ServerKind::Coordinator.as_str().to_owned(),
        addr: cli.server.advertised(bound.addr),
        public_addr: cli.server.public_addr(),
    };
    let config = Config {
        mode: cli.mode,
        failover_timeout: cli.failover_timeout,
        lease: cli.lease,
        heartbeat_interval: cli.heartbeat_interval,
        max_lag_on_failover: cli.max_lag_on_failover,
        auto_failover: !cli.no_auto_failover,
        alerts: Alerts::new(&AlertSettings {
            webhook: cli.webhook.clone(),
            webhook_ca: cli.webhook_ca.clone(),
            smtp_url: cli.smtp_url.clone(),
            alert_email: cli.alert_email.clone(),
            alert_from: cli.alert_from.clone(),
        })?,
        rejoin_timeout: cli.rejoin_timeout,
        phase_timeout: cli.phase_timeout,
    };
    let start_engine = {
        let (info, store) = (info.clone(), store.clone());
        move |stop| {
            duplex_coordinator::engine::start(
                config.clone(),
                info.clone(),
                store.clone(),
                Arc::new(GrpcServers),
                Clock::system(),
                stop,
            )
        }
    };
    let term = match &shared {
        None => {
            let engine = start_engine(shutdown.clone()).map_err(|s| anyhow::anyhow!("{}", s.message()))?;
            tokio::sync::watch::channel(Term::Leading(engine)).1
        }
        Some((etcd, fence)) => {
            let me = Member {
                name: info.name.clone(),
                site: info.site.clone(),
                addr: info.addr.clone(),
            };
            let standing = leadership::spawn(
                etcd.clone(),
                me,
                leadership::Settings::new(cli.leader_lease),
                fence.clone(),
                shutdown.clone(),
            );
            spawn_security_refresh(security.clone(), shutdown.clone());
            leadership::terms(standing, start_engine, shutdown.clone())
        }
    };
    let metrics = duplex_coordinator::service::metrics(term.clone());
    let api = CoordinatorApi {
        term,
        store,
        security,
        etcd: shared.map(|(etcd, _)| etcd),
    };
    let names = [<CoordinatorServer<CoordinatorApi> as NamedService>::NAME];
    let routes = Routes::new(CoordinatorServer::new(api));
    let access = duplex_rpc::serve::Access {
        secured: &secured,
        policy: duplex_coordinator::policy::rule,
    };
    duplex_rpc::serve(bound, &names, routes, Some(metrics), access, shutdown).await?;
    Ok(())
}

/// With --store etcd: the etcd connection and the fence its state writes
/// carry while this coordinator leads.
fn shared_state(cli: &Cli) -> anyhow::Result<Option<(Etcd, Arc<AtomicI64>)>> {
    if cli.store != "etcd" {
        if !cli.etcd.is_empty() {
            anyhow::bail!("--etcd is only used with --store etcd");
        }
        return Ok(None);
    }
    if cli.etcd.is_empty() {
        anyhow::bail!("--store etcd needs --etcd URL[,URL...] (the etcd cluster's client URLs)");
    }
    if cli.leader_lease < Duration::from_secs(1) || cli.leader_lease.subsec_nanos() != 0 {
        anyhow::bail!("--leader-lease must be whole seconds, at least 1s (etcd counts leases in seconds)");
    }
    if !cli.server.insecure_plaintext && cli.ca_dir.is_none() {
        // Each coordinator would create its own CA, and none would trust
        // the certificates another issued.
        anyhow::bail!(
            "--store etcd needs --ca-dir: every coordinator must sign with the same cluster CA \
             (create it once with `duplexctl ca init --dir DIR` and give each coordinator a copy)"
        );
    }
    Ok(Some((Etcd::connect(&cli.etcd)?, Arc::new(AtomicI64::new(0)))))
}

/// Followers learn of operators created and revoked on the leader from
/// etcd, so a token works (and stops working) on every coordinator.
fn spawn_security_refresh(security: Arc<Security>, stop: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(status) = security.refresh() {
                tracing::debug!(%status, "security records not refreshed");
            }
        }
    });
}

/// The coordinator's TLS: it holds the CA, so it issues its own certificate
/// at every start instead of enrolling.
fn secure(
    cli: &Cli,
    listen: &str,
    data_dir: &std::path::Path,
    name: &str,
) -> anyhow::Result<(Secured, Option<Ca>)> {
    if cli.server.insecure_plaintext {
        return Ok((Secured::plaintext(), None));
    }
    let ca_dir = cli.ca_dir.clone().unwrap_or_else(|| data_dir.join("ca"));
    let ca = Ca::load_or_init(&ca_dir)?;
    let identity = duplex_rpc::security::identity(ServerKind::Coordinator, &cli.server.site, name);
    let (cert_pem, key_pem) = issue_own(&ca, &identity, &cli.server.hosts(listen), cli.cert_lifetime)?;
    let mut roots = rustls::RootCertStore::empty();
    duplex_rpc::tls::roots_from_pem(&mut roots, "the cluster CA", ca.cert_pem().as_bytes())?;
    let secured = Secured::with_certificate(Arc::new(roots), &cert_pem, &key_pem, None)?;
    tracing::info!(ca = %ca_dir.join(duplex_rpc::pki::CA_CERT_FILE).display(), "TLS on; the cluster CA is here");
    Ok((secured, Some(ca)))
}
