use clap::Parser;
use duplex_rpc::cli::{ServerArgs, ServerCommand, Start, start};
use std::num::NonZeroU32;

use duplex_storage_server::limits::{self, Limits};
use duplex_storage_server::mirroring::Mode;
use duplex_storage_server::server::{Config, run};
use duplex_storage_server::store::gc::GcSettings;
use duplex_storage_server::store::mirror::Role;

/// Duplex storage server: backup data as deduplicated, compressed chunks.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    server: ServerArgs,
    /// Account servers (comma-separated URLs) that sign tickets and home accounts here.
    #[arg(long, env = "DUPLEX_ACCOUNT_SERVERS", value_delimiter = ',', global = true)]
    account_servers: Vec<String>,
    /// Role on first start; afterwards the role kept in the data dir wins.
    #[arg(
        long,
        env = "DUPLEX_ROLE",
        value_enum,
        default_value = "primary",
        global = true
    )]
    role: RoleArg,
    /// For a replica: the primary to name when refusing backups.
    #[arg(long, env = "DUPLEX_PRIMARY", default_value = "", global = true)]
    primary: String,
    /// sync: a snapshot is acknowledged once the other site has it; async: at once.
    #[arg(
        long,
        env = "DUPLEX_MIRRORING",
        value_enum,
        default_value = "async",
        global = true
    )]
    mirroring: MirroringArg,
    /// How long a sync commit waits for the mirror before degrading to async.
    #[arg(long, env = "DUPLEX_SYNC_WAIT", value_parser = humantime::parse_duration, default_value = "5s", global = true)]
    sync_wait: std::time::Duration,
    /// Calls one account may have in flight on the data API (a download
    /// counts until it has streamed whole); more are refused with
    /// RESOURCE_EXHAUSTED, which agents retry. At least 1; an agent's
    /// backup needs 3 (two uploads and a query).
    #[arg(long, env = "DUPLEX_MAX_STREAMS_PER_ACCOUNT", value_name = "N", value_parser = at_least_one, default_value_t = DEFAULT_STREAMS, global = true)]
    max_streams_per_account: NonZeroU32,
    /// Requests per second one account may make on the data API, with a
    /// burst of as many after a quiet second; more are refused with
    /// RESOURCE_EXHAUSTED, which agents retry. At least 1.
    #[arg(long, env = "DUPLEX_MAX_REQUESTS_PER_ACCOUNT", value_name = "PER_SECOND", value_parser = at_least_one, default_value_t = DEFAULT_RATE, global = true)]
    max_requests_per_account: NonZeroU32,
    /// MiB of the chunk index's pages kept in memory at most (redb's page
    /// cache). The index takes about 300 bytes a chunk (all its tables); below its size,
    /// lookups read pages from the file (the kernel's cache) instead.
    #[arg(long, env = "DUPLEX_INDEX_CACHE_MIB", value_name = "MIB", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    index_cache_mib: u32,
    #[command(flatten)]
    gc: GcArgs,
    #[command(subcommand)]
    command: Option<ServerCommand>,
}

/// Garbage collection (see docs/LIFECYCLE.md).
#[derive(clap::Args)]
struct GcArgs {
    /// How often garbage collection runs by itself; 0s: only on demand
    /// (`duplexctl prune`).
    #[arg(long, env = "DUPLEX_GC_INTERVAL", value_parser = humantime::parse_duration, default_value = "1h", global = true)]
    gc_interval: std::time::Duration,
    /// Chunks written, or answered present to a backup, more recently than
    /// this are never collected: longer than any backup takes.
    #[arg(long, env = "DUPLEX_GC_GRACE", value_parser = humantime::parse_duration, default_value = "6h", global = true)]
    gc_grace: std::time::Duration,
    /// A pack whose dead fraction is above this (0 to 1) is rewritten.
    #[arg(long, env = "DUPLEX_GC_MAX_UNUSED", value_parser = fraction, default_value = "0.1", global = true)]
    gc_max_unused: f64,
    /// How long a pack replaced by a compaction stays on disk for reads in flight.
    #[arg(long, env = "DUPLEX_GC_RETIRE_DELAY", value_parser = humantime::parse_duration, default_value = "5m", global = true)]
    gc_retire_delay: std::time::Duration,
    /// Pack bytes a compaction copies per second at most (0: unlimited).
    #[arg(long, env = "DUPLEX_GC_RATE", value_name = "BYTES_PER_S", default_value_t = 64 << 20, global = true)]
    gc_rate: u64,
}

fn fraction(s: &str) -> Result<f64, String> {
    let f: f64 = s.parse().map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if (0.0..=1.0).contains(&f) {
        Ok(f)
    } else {
        Err(format!("{f} is not between 0 and 1"))
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    Primary,
    Replica,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MirroringArg {
    Sync,
    Async,
}

const DEFAULT_LISTEN: &str = "0.0.0.0:7100";

const DEFAULT_STREAMS: NonZeroU32 = nonzero(limits::DEFAULT_STREAMS);
const DEFAULT_RATE: NonZeroU32 = nonzero(limits::DEFAULT_RATE);

const fn nonzero(n: u32) -> NonZeroU32 {
    match NonZeroU32::new(n) {
        Some(n) => n,
        None => panic!("a default limit is zero"),
    }
}

/// A limit of 0 would refuse every call, so it is refused at startup
/// rather than taken to mean "unlimited".
fn at_least_one(s: &str) -> Result<NonZeroU32, String> {
    let n: u32 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a whole number: {e}"))?;
    NonZeroU32::new(n).ok_or_else(|| "0 would refuse every call; give at least 1".to_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli: Cli = duplex_rpc::config::parse()?;
    duplex_rpc::telemetry::init_as(cli.server.log_format);
    let listen = match start(&cli.server, cli.command.as_ref(), DEFAULT_LISTEN).await? {
        Start::Checked => return Ok(()),
        Start::Serve { listen } => listen,
    };
    if cli.account_servers.is_empty() {
        anyhow::bail!("--account-servers is required (or set DUPLEX_ACCOUNT_SERVERS)");
    }
    let data_dir = cli.server.prepared_data_dir()?;
    let shutdown = duplex_rpc::shutdown_on_signals();
    let secured = cli
        .server
        .secure(duplex_types::ServerKind::Storage, &listen, &data_dir, &shutdown)
        .await?;
    let bound = duplex_rpc::bind(&listen).await?;
    let config = Config {
        coordinator: cli.server.coordinator_link(&secured),
        secured,
        data_dir,
        index_cache: cli.index_cache_mib as usize * (1 << 20),
        name: cli.server.name()?,
        site: cli.server.site.clone(),
        advertise: cli.server.advertised(bound.addr),
        public_addr: cli.server.public_addr(),
        account_servers: cli.account_servers,
        role: match cli.role {
            RoleArg::Primary => Role::Primary,
            RoleArg::Replica => Role::Replica,
        },
        primary: cli.primary,
        mirroring: match cli.mirroring {
            MirroringArg::Sync => Mode::Sync,
            MirroringArg::Async => Mode::Async,
        },
        sync_wait: cli.sync_wait,
        limits: Limits {
            streams: cli.max_streams_per_account,
            rate: cli.max_requests_per_account,
        },
        gc: GcSettings {
            grace: cli.gc.gc_grace,
            max_unused: cli.gc.gc_max_unused,
            retire_delay: cli.gc.gc_retire_delay,
            rate_bytes_per_s: cli.gc.gc_rate,
        },
        gc_interval: cli.gc.gc_interval,
    };
    run(config, bound, shutdown).await?;
    Ok(())
}
