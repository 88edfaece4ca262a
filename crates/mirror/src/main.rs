use anyhow::Context;
use std::sync::Arc;

use clap::Parser;
use duplex_mirror::service::MirrorApi;
use duplex_proto::v1::mirror_server::MirrorServer;
use duplex_proto::v1::{LinkSpec, ServerInfo};
use duplex_rpc::cli::{ServerArgs, ServerCommand, Start, start};
use tonic::server::NamedService;
use tonic::service::Routes;

/// Duplex mirror: copies storage servers' changes to their mirrors.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    server: ServerArgs,
    /// A link SOURCE_URL=DESTINATION_URL (repeatable; comma-separated in the env).
    #[arg(long = "link", env = "DUPLEX_LINKS", value_delimiter = ',', global = true)]
    links: Vec<String>,
    /// Chunk bytes per second per link, 0 for no limit.
    #[arg(long, env = "DUPLEX_RATE", default_value_t = 0, global = true)]
    rate: u64,
    #[command(subcommand)]
    command: Option<ServerCommand>,
}

const DEFAULT_LISTEN: &str = "0.0.0.0:7200";

fn parse_link(s: &str, rate: u64) -> anyhow::Result<LinkSpec> {
    let (source, destination) = s
        .split_once('=')
        .with_context(|| format!("link {s:?} must be SOURCE_URL=DESTINATION_URL"))?;
    Ok(LinkSpec {
        source: source.to_owned(),
        destination: destination.to_owned(),
        rate,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli: Cli = duplex_rpc::config::parse()?;
    duplex_rpc::telemetry::init_as(cli.server.log_format);
    let listen = match start(&cli.server, cli.command.as_ref(), DEFAULT_LISTEN).await? {
        Start::Checked => return Ok(()),
        Start::Serve { listen } => listen,
    };
    let links = cli
        .links
        .iter()
        .map(|l| parse_link(l, cli.rate))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let shutdown = duplex_rpc::shutdown_on_signals();
    // The mirror keeps no data; its data dir holds only its certificate.
    let secured = if cli.server.insecure_plaintext {
        duplex_rpc::security::Secured::plaintext()
    } else {
        let data_dir = cli.server.prepared_data_dir()?;
        cli.server
            .secure(duplex_types::ServerKind::Mirror, &listen, &data_dir, &shutdown)
            .await?
    };
    let bound = duplex_rpc::bind(&listen).await?;
    let info = ServerInfo {
        // The mirror keeps no state, so its id lives only as long as the process.
        id: uuid::Uuid::new_v4().to_string(),
        name: cli.server.name()?,
        site: cli.server.site.clone(),
        kind: "mirror".into(),
        addr: cli.server.advertised(bound.addr),
        public_addr: cli.server.public_addr(),
    };
    let api = Arc::new(MirrorApi::new(info));
    api.set_links(links)
        .map_err(|s| anyhow::anyhow!(s.message().to_owned()))?;
    if let Some(link) = cli.server.coordinator_link(&secured) {
        let beat = api.clone();
        let report = move || {
            let api = beat.clone();
            async move { api.heartbeat().await }
        };
        let assigned = api.clone();
        let apply = move |a| {
            assigned.apply_assignment(a);
            std::future::ready(())
        };
        // Mirrors write nothing of their own, so their lease is never checked.
        let lease = Arc::new(duplex_rpc::heartbeat::Lease::new(false));
        tokio::spawn(duplex_rpc::heartbeat::run(
            link,
            lease,
            report,
            apply,
            shutdown.clone(),
        ));
    }
    let names = [<MirrorServer<MirrorApi> as NamedService>::NAME];
    let metrics = duplex_mirror::service::metrics(api.clone());
    let routes = Routes::new(MirrorServer::from_arc(api));
    let access = duplex_rpc::serve::Access {
        secured: &secured,
        policy: duplex_mirror::policy::rule,
    };
    duplex_rpc::serve(bound, &names, routes, Some(metrics), access, shutdown).await?;
    Ok(())
}
