use anyhow::Context;
use clap::Parser;
use duplex_account_server::server::{Config, run};
use duplex_rpc::cli::{ServerArgs, ServerCommand};

/// Duplex account server: accounts, groups, tokens and homes.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    server: ServerArgs,
    #[command(subcommand)]
    command: Option<ServerCommand>,
}

const DEFAULT_LISTEN: &str = "0.0.0.0:7000";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    duplex_rpc::config::load_config_file_into_env()?;
    let cli = Cli::parse();
    duplex_rpc::telemetry::init();
    let listen = cli.server.listen_or(DEFAULT_LISTEN);
    if let Some(ServerCommand::Healthcheck { addr }) = &cli.command {
        let addr = addr
            .clone()
            .unwrap_or_else(|| duplex_rpc::health::dial_url(&listen));
        duplex_rpc::health::check(&addr, "").await?;
        return Ok(());
    }
    let data_dir = cli.server.data_dir()?;
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let shutdown = duplex_rpc::shutdown_on_signals();
    let bound = duplex_rpc::bind(&listen).await?;
    let config = Config {
        data_dir,
        name: cli.server.name()?,
        site: cli.server.site.clone(),
        advertise: cli.server.advertised(bound.addr),
    };
    run(config, bound, shutdown).await?;
    Ok(())
}
