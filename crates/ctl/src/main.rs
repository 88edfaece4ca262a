mod admin;
mod conn;
mod lifecycle;
mod mirror;
mod ops;
mod plan;
mod playground;
mod procs;
mod reapply;
mod servers;
mod status;
mod usage;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};

/// Duplex operator CLI.
#[derive(Parser)]
#[command(name = "duplexctl", version)]
struct Cli {
    /// The coordinator (status); account and group commands go to --endpoint.
    #[arg(long, env = "DUPLEX_COORDINATOR", global = true)]
    coordinator: Option<String>,
    /// Account server entry points (repeatable; comma-separated in the env).
    #[arg(long, env = "DUPLEX_ENDPOINT", value_delimiter = ',', global = true)]
    endpoint: Vec<String>,
    /// Print one JSON document on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// The cluster CA certificate (PEM) to trust; default: the system's roots.
    #[arg(long, env = "DUPLEX_CA", global = true)]
    ca: Option<PathBuf>,
    /// Operator token (admin, operator or viewer). Prefer the environment
    /// or --operator-token-file: argv is visible to other users in `ps`.
    #[arg(long, env = "DUPLEX_OPERATOR_TOKEN", hide_env_values = true, global = true)]
    operator_token: Option<String>,
    /// File holding the operator token.
    #[arg(
        long,
        env = "DUPLEX_OPERATOR_TOKEN_FILE",
        global = true,
        conflicts_with = "operator_token"
    )]
    operator_token_file: Option<PathBuf>,
    /// Talk plaintext to servers started with --insecure-plaintext (local debugging only).
    #[arg(long, env = "DUPLEX_INSECURE_PLAINTEXT", global = true, value_parser = clap::builder::BoolishValueParser::new())]
    insecure_plaintext: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every server's role, health and lag, from the coordinator.
    Status,
    /// Create and list accounts; re-apply a divergence report.
    Accounts {
        #[command(subcommand)]
        command: AccountsCommand,
    },
    /// List, disable and enable groups (a disabled group's backups are refused).
    Groups {
        #[command(subcommand)]
        command: GroupsCommand,
    },
    /// Inspect an account server, or change its role by hand.
    Servers {
        #[command(subcommand)]
        command: ServersCommand,
    },
    /// See a mirror's links, or set them by hand.
    Mirror {
        #[command(subcommand)]
        command: MirrorCommand,
    },
    /// Move the master and primary roles off a site now (it is lost).
    Failover {
        /// The site to fail over from (default: the site holding the roles).
        #[arg(long)]
        site: Option<String>,
        /// Move only this kind of role (default: every kind).
        #[arg(long, value_parser = ["account", "storage"])]
        kind: Option<String>,
        /// Accept losing writes not yet mirrored.
        #[arg(long)]
        force: bool,
        /// Return when the failover finished (exit 0) or failed (non-zero).
        #[arg(long)]
        wait: bool,
        /// Do not ask for confirmation on a terminal.
        #[arg(long)]
        yes: bool,
        /// Show which roles would move where, and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Stop the running operation where it waits, undoing what must not stay.
    Cancel {
        /// Return once it has stopped: exit 0 when it ended cancelled or
        /// finished, non-zero when it failed.
        #[arg(long)]
        wait: bool,
    },
    /// Planned, lossless move of the roles to the other site.
    Switchover {
        #[arg(long)]
        site: Option<String>,
        #[arg(long)]
        wait: bool,
        /// Do not ask for confirmation on a terminal.
        #[arg(long)]
        yes: bool,
        /// Show which roles would move where, and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Give every server back the role it joined with, once the lost site is back.
    Failback {
        #[arg(long)]
        wait: bool,
        /// Then check every snapshot of the accounts that moved back, chunk by chunk.
        #[arg(long)]
        verify: bool,
    },
    /// Start mirroring into servers recovered after a failover.
    Resync {
        /// Bytes per second per link (0: no limit).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        #[arg(long)]
        wait: bool,
    },
    /// Every failover, switchover, failback and refusal, with its phases.
    History,
    /// Live status, redrawn as it changes (with --json, one JSON line per change).
    Watch,
    /// Check every snapshot on every storage server, chunk by chunk.
    Verify {
        /// Mend each corrupt or missing chunk with an intact copy from
        /// another storage server (the other site's first); report what
        /// could not be mended and which snapshots name it.
        #[arg(long)]
        repair: bool,
    },
    /// Run garbage collection on every storage server now (it also runs by
    /// itself every --gc-interval): chunks no snapshot names are swept and
    /// packs with dead space compacted, on each site from its own copy.
    Prune {
        /// Return when every server has finished, with what each reclaimed.
        #[arg(long)]
        wait: bool,
    },
    /// Run a whole cluster on this machine until Ctrl-C.
    Playground {
        /// Where the services keep their data and logs, and playground.json.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "active-passive", value_parser = ["active-passive", "active-active"])]
        mode: String,
        /// Run this many coordinators (coordinator-1 ...), one leading,
        /// sharing their state in etcd.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=9))]
        coordinators: u8,
        /// The etcd the coordinators share (client URLs); without it the
        /// playground starts `etcd` from PATH as the service `etcd`.
        #[arg(long, value_delimiter = ',')]
        etcd: Vec<String>,
    },
    /// Create, list and revoke operator tokens (admin only).
    Operators {
        #[command(subcommand)]
        command: OperatorsCommand,
    },
    /// The cluster certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Print a shell completion script (e.g. `duplexctl completions bash > /etc/bash_completion.d/duplexctl`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages for duplexctl and each of its commands into DIR.
    Man {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum OperatorsCommand {
    /// A new operator; its token is shown once.
    Create {
        name: String,
        #[arg(long, value_parser = ["admin", "operator", "viewer"])]
        role: String,
    },
    List,
    /// The token stops working on every server at once.
    Revoke {
        name: String,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a cluster CA: DIR/ca.pem, and DIR/ca.key readable by its owner only.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Succeed without touching it when DIR already holds a CA.
        #[arg(long)]
        keep_existing: bool,
    },
}

#[derive(Subcommand)]
enum AccountsCommand {
    Create {
        name: String,
        #[arg(long)]
        group: Option<String>,
        /// Home storage server name (default: the least loaded).
        #[arg(long)]
        home: Option<String>,
        /// Most bytes of deduplicated stored data the account may hold (0: no quota).
        #[arg(long, value_name = "BYTES", default_value_t = 0)]
        quota: u64,
    },
    List,
    /// Set an account's quota in bytes of deduplicated stored data (0: none);
    /// storage servers enforce it from the account's next login.
    Quota {
        name: String,
        bytes: u64,
    },
    /// Give an account a new token; the old one stops working at once.
    RotateToken {
        name: String,
    },
    /// Delete an account: its snapshots on every site and its token, at
    /// once; its chunks go with the next garbage collection.
    Delete {
        name: String,
    },
    /// Snapshots, stored bytes and last backup of every account, from its
    /// home storage server; accounts with no backup in 2 days are marked.
    Usage,
    /// Re-apply the entries of a divergence report (divergence-*.jsonl) on
    /// the master, each only if it still makes sense.
    Reapply {
        file: PathBuf,
        /// Say what would be applied or skipped; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum MirrorCommand {
    /// Links of the mirror at URL with checkpoint, lag and traffic.
    Status { url: String },
    /// Replace the links of the mirror at URL.
    Links {
        url: String,
        /// SOURCE_URL=DESTINATION_URL (repeatable; none stops every link).
        #[arg(long = "link")]
        links: Vec<String>,
        /// Chunk bytes per second per link (0: no limit).
        #[arg(long, default_value_t = 0)]
        rate: u64,
    },
}

#[derive(Subcommand)]
enum ServersCommand {
    /// Issue a one-time enrollment token, bound to one server's name, site and kind.
    Token {
        /// The server's name (or use --for with --out-dir).
        #[arg(required_unless_present = "bindings")]
        name: Option<String>,
        #[arg(long, requires = "name")]
        site: Option<String>,
        #[arg(long, requires = "name", value_parser = ["account", "storage", "mirror"])]
        kind: Option<String>,
        /// How long it stays valid.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
        ttl: std::time::Duration,
        /// With --out-dir: NAME:SITE:KIND, one token each, written to OUT_DIR/NAME.
        #[arg(long = "for", requires = "out_dir")]
        bindings: Vec<ops::Binding>,
        /// Write tokens into files here (mode 0600), with the CA certificate
        /// (--ca) as OUT_DIR/ca.pem, instead of printing one.
        #[arg(long, requires = "bindings")]
        out_dir: Option<PathBuf>,
    },
    /// Role, epoch, LSN, state hash, lag and slaves of one account server.
    Status { url: String },
    /// Make an account server master (refused for an epoch below its own).
    Promote {
        url: String,
        /// Default: one above the epoch it holds.
        #[arg(long)]
        epoch: Option<u64>,
    },
    /// Make an account server a slave of MASTER.
    Demote {
        url: String,
        #[arg(long)]
        master: String,
        /// Default: the master's epoch.
        #[arg(long)]
        epoch: Option<u64>,
    },
    /// Forget a server that is down and holds no role (its site is rebuilt).
    Remove { name: String },
}

#[derive(Subcommand)]
enum GroupsCommand {
    List,
    Disable {
        name: String,
    },
    Enable {
        name: String,
    },
    /// Set which snapshots the group's accounts keep (restic's rules, in
    /// UTC); the storage servers delete the rest after each backup. No
    /// rule: keep every snapshot.
    Policy {
        name: String,
        #[command(flatten)]
        keep: duplex_rpc::cli::KeepArgs,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    duplex_rpc::telemetry::init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(duplex_rpc::exit::for_error(e.chain()))
        }
    }
}

async fn run(mut cli: Cli) -> anyhow::Result<()> {
    let json = cli.json;
    match &cli.command {
        Command::Ca {
            command: CaCommand::Init { dir, keep_existing },
        } => return ca_init(dir, *keep_existing),
        Command::Playground {
            dir,
            mode,
            coordinators,
            etcd,
        } => {
            let layout = playground::Layout {
                mode: mode.clone(),
                coordinators: *coordinators,
                etcd: etcd.clone(),
            };
            return playground::run(dir, &layout, cli.insecure_plaintext).await;
        }
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "duplexctl", &mut std::io::stdout());
            return Ok(());
        }
        Command::Man { dir } => return man_pages(dir),
        _ => {}
    }
    conn::setup(cli.ca.as_deref(), cli.insecure_plaintext)?;
    if let Some(token) = operator_token(&cli)? {
        conn::set_token(&token)?;
    }
    // Several coordinators: every call goes to the one that leads.
    if let Some(list) = cli.coordinator.as_deref().filter(|l| l.contains(',')) {
        let leader = duplex_rpc::leader::find(list)
            .await
            .map_err(|status| anyhow::anyhow!("no coordinator among {list} leads: {}", status.message()))?;
        cli.coordinator = Some(leader);
    }
    // Failures talking to the coordinator name it.
    let coordinator = cli.coordinator.clone();
    let at_coordinator = |e: anyhow::Error| match &coordinator {
        Some(url) => e.context(format!("coordinator at {url}")),
        None => e,
    };
    match cli.command {
        Command::Playground { .. }
        | Command::Ca { .. }
        | Command::Completions { .. }
        | Command::Man { .. } => Ok(()),
        Command::Operators { command } => {
            let client = ops::client(cli.coordinator.as_deref())?;
            match command {
                OperatorsCommand::Create { name, role } => {
                    ops::create_operator(client, &name, &role, json).await
                }
                OperatorsCommand::List => ops::list_operators(client, json).await,
                OperatorsCommand::Revoke { name } => ops::revoke_operator(client, &name, json).await,
            }
            .map_err(at_coordinator)
        }
        Command::Status => status::run(cli.coordinator.as_deref(), json).await,
        Command::Mirror { command } => match command {
            MirrorCommand::Status { url } => mirror::status(&url, json).await,
            MirrorCommand::Links { url, links, rate } => mirror::set_links(&url, &links, rate, json).await,
        },
        Command::Failover {
            site,
            kind,
            force,
            wait,
            yes,
            dry_run,
        } => {
            let client = ops::client(cli.coordinator.as_deref())?;
            let check = ops::Check { yes, dry_run, json };
            let request = ops::Request::Failover { site, force, kind };
            ops::start_checked(client, request, check, wait)
                .await
                .map_err(at_coordinator)
        }
        Command::Cancel { wait } => ops::cancel(ops::client(cli.coordinator.as_deref())?, wait, json)
            .await
            .map_err(at_coordinator),
        Command::Switchover {
            site,
            wait,
            yes,
            dry_run,
        } => {
            let client = ops::client(cli.coordinator.as_deref())?;
            let check = ops::Check { yes, dry_run, json };
            ops::start_checked(client, ops::Request::Switchover { site }, check, wait)
                .await
                .map_err(at_coordinator)
        }
        Command::Failback { wait, verify } => {
            let client = ops::client(cli.coordinator.as_deref())?;
            ops::start(client, ops::Request::Failback { verify }, wait, json)
                .await
                .map_err(at_coordinator)
        }
        Command::Resync { rate, wait } => {
            let client = ops::client(cli.coordinator.as_deref())?;
            ops::start(client, ops::Request::Resync { rate }, wait, json)
                .await
                .map_err(at_coordinator)
        }
        Command::History => ops::history(ops::client(cli.coordinator.as_deref())?, json)
            .await
            .map_err(at_coordinator),
        Command::Watch => ops::watch(cli.coordinator.as_deref(), json)
            .await
            .map_err(at_coordinator),
        Command::Verify { repair } => verify::verify(cli.coordinator.as_deref(), repair, json).await,
        Command::Prune { wait } => ops::prune(cli.coordinator.as_deref(), wait, json).await,
        Command::Servers { command } => match command {
            ServersCommand::Token {
                name,
                site,
                kind,
                ttl,
                bindings,
                out_dir,
            } => {
                let client = ops::client(cli.coordinator.as_deref())?;
                match (out_dir, name) {
                    (Some(dir), _) => ops::token_files(client, ttl, &bindings, &dir, cli.ca.as_deref()).await,
                    (None, Some(name)) => {
                        let binding = ops::Binding {
                            name,
                            site: site.context("--site is required")?,
                            kind: kind.context("--kind is required")?,
                        };
                        ops::token(client, &binding, ttl, json).await
                    }
                    (None, None) => Err(anyhow::anyhow!("name the server, or give --for and --out-dir")),
                }
                .map_err(at_coordinator)
            }
            ServersCommand::Status { url } => servers::status(&url, json).await,
            ServersCommand::Promote { url, epoch } => servers::promote(&url, epoch, json).await,
            ServersCommand::Demote { url, master, epoch } => {
                servers::demote(&url, &master, epoch, json).await
            }
            ServersCommand::Remove { name } => {
                ops::remove_server(ops::client(cli.coordinator.as_deref())?, &name, json)
                    .await
                    .map_err(at_coordinator)
            }
        },
        Command::Accounts { command } => {
            let endpoints = entry_points(&cli.endpoint, cli.coordinator.as_deref());
            match command {
                AccountsCommand::Create {
                    name,
                    group,
                    home,
                    quota,
                } => {
                    let mut client = admin::connect(&endpoints).await?;
                    let new = admin::NewAccount { group, home, quota };
                    admin::create_account(&mut client, &name, new, json).await
                }
                AccountsCommand::Quota { name, bytes } => {
                    admin::set_quota(&mut admin::connect(&endpoints).await?, &name, bytes, json).await
                }
                AccountsCommand::Delete { name } => {
                    crate::lifecycle::delete_account(&mut admin::connect(&endpoints).await?, &name, json)
                        .await
                }
                AccountsCommand::RotateToken { name } => {
                    admin::rotate_token(&mut admin::connect(&endpoints).await?, &name, json).await
                }
                AccountsCommand::Usage => usage::run(&mut admin::connect(&endpoints).await?, json).await,
                AccountsCommand::List => {
                    admin::list_accounts(&mut admin::connect(&endpoints).await?, json).await
                }
                // The report is read before any server is asked.
                AccountsCommand::Reapply { file, dry_run } => {
                    reapply::run(&endpoints, &file, dry_run, json).await
                }
            }
        }
        Command::Groups { command } => {
            let mut client = admin::connect(&entry_points(&cli.endpoint, cli.coordinator.as_deref())).await?;
            match command {
                GroupsCommand::List => admin::list_groups(&mut client, json).await,
                GroupsCommand::Disable { name } => admin::set_group(&mut client, &name, false, json).await,
                GroupsCommand::Enable { name } => admin::set_group(&mut client, &name, true, json).await,
                GroupsCommand::Policy { name, keep } => {
                    admin::set_group_policy(&mut client, &name, keep.policy(), json).await
                }
            }
        }
    }
}

/// The operator token from the flag, the environment or its file.
fn operator_token(cli: &Cli) -> anyhow::Result<Option<String>> {
    if let Some(t) = &cli.operator_token {
        return Ok(Some(t.clone()));
    }
    match &cli.operator_token_file {
        Some(path) => {
            let token =
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Ok(Some(token.trim().to_owned()))
        }
        None => Ok(None),
    }
}

fn ca_init(dir: &std::path::Path, keep_existing: bool) -> anyhow::Result<()> {
    if keep_existing && dir.join(duplex_rpc::pki::CA_KEY_FILE).exists() {
        eprintln!("{} already holds a CA; kept", dir.display());
        return Ok(());
    }
    duplex_rpc::pki::Ca::init(dir)?;
    eprintln!(
        "created the cluster CA: {} (give it to clients and servers with --ca) and {} (keep it secret: \
         the coordinator signs with it)",
        dir.join(duplex_rpc::pki::CA_CERT_FILE).display(),
        dir.join(duplex_rpc::pki::CA_KEY_FILE).display()
    );
    Ok(())
}

/// `duplexctl.1` and a page per command (`duplexctl-failover.1`, ...).
fn man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut command = Cli::command();
    command.build();
    clap_mangen::generate_to(command, dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))?;
    eprintln!("wrote man pages into {}", dir.display());
    Ok(())
}

/// Account-server entry points: the endpoints, then the coordinator.
fn entry_points(endpoints: &[String], coordinator: Option<&str>) -> Vec<String> {
    let mut all = endpoints.to_vec();
    all.extend(coordinator.map(str::to_owned));
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("duplexctl").chain(args.iter().copied()))
    }

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn failover_takes_only_known_kinds() {
        assert!(parse(&["failover", "--kind", "mirror"]).is_err());
        let cli = parse(&["failover", "--kind", "storage", "--force", "--wait"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Failover { kind: Some(k), force: true, wait: true, site: None, .. } if k == "storage"
        ));
    }

    #[test]
    fn cancel_remove_and_reapply_parse() {
        assert!(matches!(
            parse(&["cancel", "--wait"]).unwrap().command,
            Command::Cancel { wait: true }
        ));
        let remove = parse(&["servers", "remove", "storage-a"]).unwrap().command;
        assert!(
            matches!(remove, Command::Servers { command: ServersCommand::Remove { name } } if name == "storage-a")
        );
        let reapply = parse(&["accounts", "reapply", "d.jsonl", "--dry-run", "--json"]).unwrap();
        assert!(reapply.json);
        assert!(matches!(
            reapply.command,
            Command::Accounts {
                command: AccountsCommand::Reapply { dry_run: true, .. }
            }
        ));
    }
}
