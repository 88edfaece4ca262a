use std::time::Duration;

use clap::{Parser, ValueEnum};
use duplex_account_server::hub::Mode;
use duplex_account_server::server::{Config, run};
use duplex_rpc::cli::{ServerArgs, ServerCommand, Start, start};

/// Duplex account server: accounts, groups, tokens and homes.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    server: ServerArgs,
    /// Start as a slave of this master URL (only on first start: the role
    /// is kept in the data dir and changed by promote / demote).
    #[arg(long, env = "DUPLEX_MASTER", global = true)]
    master: Option<String>,
    /// sync: a write is acknowledged once a slave has it durable; async: at once.
    #[arg(
        long,
        env = "DUPLEX_REPLICATION",
        value_enum,
        default_value = "async",
        global = true
    )]
    replication: Replication,
    /// How long a sync write waits for a slave before degrading to async.
    #[arg(long, env = "DUPLEX_SYNC_TIMEOUT", value_parser = humantime::parse_duration, default_value = "2s", global = true)]
    sync_timeout: Duration,
    /// How often the master writes a state snapshot and trims its log.
    #[arg(long, env = "DUPLEX_SNAPSHOT_INTERVAL", value_parser = humantime::parse_duration, default_value = "24h", global = true)]
    snapshot_interval: Duration,
    #[command(subcommand)]
    command: Option<ServerCommand>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Replication {
    Sync,
    Async,
}

const DEFAULT_LISTEN: &str = "0.0.0.0:7000";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli: Cli = duplex_rpc::config::parse()?;
    duplex_rpc::telemetry::init_as(cli.server.log_format);
    let listen = match start(&cli.server, cli.command.as_ref(), DEFAULT_LISTEN).await? {
        Start::Checked => return Ok(()),
        Start::Serve { listen } => listen,
    };
    let data_dir = cli.server.prepared_data_dir()?;
    let shutdown = duplex_rpc::shutdown_on_signals();
    let secured = cli
        .server
        .secure(duplex_types::ServerKind::Account, &listen, &data_dir, &shutdown)
        .await?;
    let bound = duplex_rpc::bind(&listen).await?;
    let config = Config {
        coordinator: cli.server.coordinator_link(&secured),
        secured,
        data_dir,
        name: cli.server.name()?,
        site: cli.server.site.clone(),
        advertise: cli.server.advertised(bound.addr),
        public_addr: cli.server.public_addr(),
        master: cli.master,
        mode: match cli.replication {
            Replication::Sync => Mode::Sync,
            Replication::Async => Mode::Async,
        },
        sync_timeout: cli.sync_timeout,
        snapshot_interval: cli.snapshot_interval,
    };
    run(config, bound, shutdown).await?;
    Ok(())
}
