use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use duplex_coordinator::registry::Registry;
use duplex_coordinator::service::CoordinatorApi;
use duplex_proto::v1::ServerInfo;
use duplex_proto::v1::coordinator_server::CoordinatorServer;
use duplex_rpc::cli::{ServerArgs, ServerCommand, Start, start};
use tonic::server::NamedService;
use tonic::service::Routes;

/// Duplex coordinator: watches every server of the platform.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    server: ServerArgs,
    /// active-passive: every account homed on site a; active-active: split.
    #[arg(long, env = "DUPLEX_MODE", default_value = "active-passive", value_parser = ["active-passive", "active-active"], global = true)]
    mode: String,
    /// A server that misses heartbeats this long is down.
    #[arg(long, env = "DUPLEX_FAILOVER_TIMEOUT", value_parser = humantime::parse_duration, default_value = "1500ms", global = true)]
    failover_timeout: Duration,
    #[command(subcommand)]
    command: Option<ServerCommand>,
}

const DEFAULT_LISTEN: &str = "0.0.0.0:7300";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    duplex_rpc::config::load_config_file_into_env()?;
    let cli = Cli::parse();
    duplex_rpc::telemetry::init();
    let listen = match start(&cli.server, cli.command.as_ref(), DEFAULT_LISTEN).await? {
        Start::Checked => return Ok(()),
        Start::Serve { listen } => listen,
    };
    let data_dir = cli.server.prepared_data_dir()?;
    let registry = Arc::new(Registry::open(&data_dir)?);
    let shutdown = duplex_rpc::shutdown_on_signals();
    let bound = duplex_rpc::bind(&listen).await?;
    let info = ServerInfo {
        id: uuid::Uuid::new_v4().to_string(),
        name: cli.server.name.clone().unwrap_or_else(|| "coordinator".into()),
        site: cli.server.site.clone(),
        kind: "coordinator".into(),
        addr: cli.server.advertised(bound.addr),
    };
    let api = CoordinatorApi::new(info, cli.mode, cli.failover_timeout, registry);
    let names = [<CoordinatorServer<CoordinatorApi> as NamedService>::NAME];
    let routes = Routes::new(CoordinatorServer::new(api));
    duplex_rpc::serve(bound, &names, routes, None, shutdown).await?;
    Ok(())
}
