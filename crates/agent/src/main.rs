use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use duplex_agent::chunking::hex;
use duplex_agent::session::{Options, Session, login};
use duplex_agent::{backup, restore};
use duplex_proto::v1::{ListSnapshotsRequest, Purpose, VerifyRequest};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

/// Duplex backup agent.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Entry point: an account server (repeatable; comma-separated in the env).
    #[arg(long, env = "DUPLEX_ENDPOINT", value_delimiter = ',', global = true)]
    endpoint: Vec<String>,
    /// The account's token.
    #[arg(long, env = "DUPLEX_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Talk to this storage server directly, skipping discovery (debugging).
    #[arg(long, global = true)]
    storage: Option<String>,
    /// Keep retrying this long when the server fails or its role moves
    /// (rediscovering the account's home each time); 0 disables.
    #[arg(long, env = "DUPLEX_RETRY_FOR", value_parser = humantime::parse_duration, default_value = "60s", global = true)]
    retry_for: Duration,
    /// Print one JSON document on stdout and no progress bars.
    #[arg(long, global = true)]
    json: bool,
    /// The cluster CA certificate (PEM) to trust; default: the system's roots.
    #[arg(long, env = "DUPLEX_CA", global = true)]
    ca: Option<PathBuf>,
    /// Talk plaintext to servers started with --insecure-plaintext (local debugging only).
    #[arg(long, env = "DUPLEX_INSECURE_PLAINTEXT", global = true, value_parser = clap::builder::BoolishValueParser::new())]
    insecure_plaintext: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Back up files and directories into a new snapshot.
    Backup {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// List the account's snapshots.
    Snapshots,
    /// Restore a snapshot (id, unique prefix, or "latest") into a directory.
    Restore {
        snapshot: String,
        #[arg(long)]
        target: PathBuf,
    },
    /// Check that every chunk of a snapshot (or of the account) is present and intact.
    Verify { snapshot: Option<String> },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    duplex_rpc::telemetry::init();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    duplex_rpc::tls::setup_client(cli.ca.as_deref(), cli.insecure_plaintext)?;
    let options = Options {
        endpoints: cli.endpoint.clone(),
        token: cli.token.clone().unwrap_or_default(),
        storage: cli.storage.clone(),
    };
    let purpose = match cli.command {
        Command::Backup { .. } => Purpose::Backup,
        _ => Purpose::Read,
    };
    // Talking to one storage server directly is for debugging: no retries.
    let retry_for = if options.storage.is_some() {
        Duration::ZERO
    } else {
        cli.retry_for
    };
    let deadline = Instant::now() + retry_for;
    let mut delay = Duration::from_millis(100);
    let mut last_warning: Option<String> = None;
    loop {
        let session = login(&options, purpose).await;
        let outcome = match session {
            Ok(session) => run_command(&cli, &session).await,
            Err(e) => Err(e.into()),
        };
        match outcome {
            Err(e) if worth_rediscovering(&e) && Instant::now() + delay < deadline => {
                // Once per distinct failure, not once per attempt.
                let message = format!("{e:#}");
                if last_warning.as_deref() != Some(message.as_str()) {
                    eprintln!("warning: {message}; finding the current servers and retrying");
                    last_warning = Some(message);
                }
                // Retry as soon as the coordinator publishes a change (a
                // failover making progress), or after a growing delay.
                duplex_rpc::discovery::wait_for_change(&options.endpoints, delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

async fn run_command(cli: &Cli, session: &Session) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Backup { paths } => run_backup(session, paths, cli.json).await,
        Command::Snapshots => run_snapshots(session, cli.json).await,
        Command::Restore { snapshot, target } => run_restore(session, snapshot, target, cli.json).await,
        Command::Verify { snapshot } => run_verify(session, snapshot.clone(), cli.json).await,
    }
}

/// A failure that another server (or this one, a moment later) may not
/// have: a server down, a broken connection, a role that moved, a fenced
/// primary. Refusals about the request itself are final.
fn worth_rediscovering(e: &anyhow::Error) -> bool {
    use duplex_agent::AgentError;
    use tonic::Code;
    let status = e.chain().find_map(|c| {
        c.downcast_ref::<AgentError>()
            .and_then(|a| match a {
                AgentError::Rpc { status, .. } => Some(status),
                _ => None,
            })
            .or_else(|| c.downcast_ref::<tonic::Status>())
    });
    let Some(status) = status else {
        return false;
    };
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded | Code::Aborted => true,
        Code::FailedPrecondition => [
            "duplex-primary",
            "duplex-master",
            duplex_rpc::heartbeat::FENCED_METADATA_KEY,
        ]
        .iter()
        .any(|k| status.metadata().get(*k).is_some()),
        _ => false,
    }
}

fn progress_bar(json: bool, verb: &str) -> ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    let template = format!("{verb} {{bar:40}} {{bytes}}/{{total_bytes}} {{bytes_per_sec}} eta {{eta}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

async fn run_backup(session: &Session, paths: &[PathBuf], json: bool) -> anyhow::Result<ExitCode> {
    let bar = progress_bar(json, "backing up");
    let warn_bar = bar.clone();
    let warn = Arc::new(move |msg: String| warn_bar.suspend(|| eprintln!("warning: {msg}")));
    let report = backup::backup(session, paths, bar, warn).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "snapshot {} saved to {}: {} files, {} (uploaded {})",
            report.snapshot,
            session.home.name,
            report.files,
            human_bytes(report.bytes),
            human_bytes(report.uploaded_bytes)
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_snapshots(session: &Session, json: bool) -> anyhow::Result<ExitCode> {
    let mut storage = session.storage.clone();
    let snapshots = storage
        .list_snapshots(ListSnapshotsRequest {})
        .await?
        .into_inner()
        .snapshots;
    if json {
        let list: Vec<_> = snapshots
            .iter()
            .map(|s| {
                json!({
                    "id": s.id,
                    "time": rfc3339(s.time_unix_ms),
                    "files": s.files,
                    "bytes": s.bytes,
                    "paths": s.paths,
                })
            })
            .collect();
        println!("{}", json!({ "snapshots": list }));
    } else {
        println!(
            "{:<32}  {:<20}  {:>8}  {:>10}  paths",
            "id", "time", "files", "size"
        );
        for s in &snapshots {
            println!(
                "{:<32}  {:<20}  {:>8}  {:>10}  {}",
                s.id,
                rfc3339(s.time_unix_ms),
                s.files,
                human_bytes(s.bytes),
                s.paths.join(" ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_restore(
    session: &Session,
    snapshot: &str,
    target: &std::path::Path,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let bar = progress_bar(json, "restoring");
    let report = restore::restore(session, snapshot, target, bar).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "restored snapshot {} into {}: {} files, {} directories, {} symlinks, {}",
            report.snapshot,
            target.display(),
            report.files,
            report.dirs,
            report.symlinks,
            human_bytes(report.bytes)
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_verify(session: &Session, snapshot: Option<String>, json: bool) -> anyhow::Result<ExitCode> {
    let mut storage = session.storage.clone();
    let report = storage
        .verify(VerifyRequest {
            snapshot_id: snapshot.clone().unwrap_or_default(),
        })
        .await?
        .into_inner();
    let ok = report.missing.is_empty() && report.corrupt.is_empty();
    let missing: Vec<String> = report.missing.iter().map(|c| hex(c)).collect();
    let corrupt: Vec<String> = report.corrupt.iter().map(|c| hex(c)).collect();
    if json {
        println!(
            "{}",
            json!({
                "ok": ok,
                "chunks_checked": report.chunks_checked,
                "bytes_checked": report.bytes_checked,
                "missing": missing,
                "corrupt": corrupt,
            })
        );
    } else {
        let what = snapshot.map_or_else(|| "account".to_owned(), |s| format!("snapshot {s}"));
        println!(
            "{what}: {} chunks ({}) checked, {} missing, {} corrupt",
            report.chunks_checked,
            human_bytes(report.bytes_checked),
            missing.len(),
            corrupt.len()
        );
        for id in &missing {
            println!("missing {id}");
        }
        for id in &corrupt {
            println!("corrupt {id}");
        }
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn human_bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}
