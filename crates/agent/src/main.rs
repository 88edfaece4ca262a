use duplex_rpc::{out, outln};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use duplex_agent::crypto::Keys;
use duplex_agent::forget;
use duplex_agent::keys::{KeyService, Unlocked, unlock};
use duplex_agent::manifest::entries_of;
use duplex_agent::scan::Selection;
use duplex_agent::secret::{self, Passphrase};
use duplex_agent::session::{Options, Session, login};
use duplex_agent::{AgentError, backup, browse, restore, verify};
use duplex_proto::v1::{ListSnapshotsRequest, Purpose};
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
    /// File holding the account's encryption passphrase (else the
    /// DUPLEX_PASSWORD environment variable, else a prompt on a terminal).
    #[arg(long, global = true)]
    password_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Back up files and directories into a new snapshot.
    Backup {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        select: SelectArgs,
        /// Read every file, even those the file cache knows unchanged
        /// since the last backup of the same paths.
        #[arg(long)]
        force_read: bool,
        /// Send at most this many chunk bytes per second (averaged over
        /// the backup), so a backup leaves room on a shared uplink.
        #[arg(long, value_name = "BYTES_PER_S", value_parser = clap::value_parser!(u64).range(1..))]
        limit_upload: Option<u64>,
    },
    /// List the account's snapshots.
    Snapshots,
    /// Restore a snapshot (id, unique prefix, or "latest") into a directory.
    Restore {
        snapshot: String,
        #[arg(long)]
        target: PathBuf,
        /// Restore only this path and what is below it (repeatable), as
        /// `ls` shows it, e.g. `home/docs`.
        #[arg(long, value_name = "PATH")]
        include: Vec<std::ffi::OsString>,
    },
    /// List a snapshot's entries, or those at and below PATH.
    Ls {
        snapshot: String,
        path: Option<std::ffi::OsString>,
    },
    /// Write one file of a snapshot to standard output.
    Dump {
        snapshot: String,
        path: std::ffi::OsString,
    },
    /// What changed from SNAPSHOT_A to SNAPSHOT_B: paths added, removed
    /// and modified.
    Diff {
        #[arg(value_name = "SNAPSHOT_A")]
        a: String,
        #[arg(value_name = "SNAPSHOT_B")]
        b: String,
    },
    /// Check that every chunk of a snapshot (or of the account) is present and intact.
    Verify {
        snapshot: Option<String>,
        /// Also download and decrypt every chunk (of the snapshot, or of
        /// every snapshot), checking each against its keyed id.
        #[arg(long)]
        read_data: bool,
    },
    /// Delete snapshots: the ones named (id, unique prefix or "latest"), or
    /// the ones the --keep-* rules do not keep (restic's rules, in UTC).
    /// The space they alone held is reclaimed by the servers, on every site.
    Forget {
        snapshots: Vec<String>,
        #[command(flatten)]
        keep: duplex_rpc::cli::KeepArgs,
        /// Say what would be removed, and remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Manage the passphrases that unlock the account's encryption key.
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
}

/// What `duplex backup` leaves out.
#[derive(clap::Args)]
struct SelectArgs {
    /// Leave out what matches GLOB (gitignore syntax, rooted at /: `*.tmp`
    /// anywhere, `/home/u/tmp` only there, `build/` directories only).
    #[arg(long, value_name = "GLOB")]
    exclude: Vec<String>,
    /// Leave out what the patterns in FILE match (one per line, as
    /// --exclude; `#` comments, `!` takes a match back).
    #[arg(long, value_name = "FILE")]
    exclude_file: Vec<PathBuf>,
    /// Do not cross into other file systems below each PATH.
    #[arg(long)]
    one_file_system: bool,
    /// Leave out the contents of directories tagged with a CACHEDIR.TAG.
    #[arg(long)]
    exclude_caches: bool,
}

impl SelectArgs {
    fn selection(&self) -> Result<Selection, AgentError> {
        let mut selection = Selection::excluding(&self.exclude, &self.exclude_file)?;
        selection.one_file_system = self.one_file_system;
        selection.exclude_caches = self.exclude_caches;
        Ok(selection)
    }
}

#[derive(Subcommand)]
enum KeyAction {
    /// Re-wrap the key under a new passphrase; the old one stops working.
    Passwd {
        /// File holding the new passphrase (else asked twice on a terminal).
        #[arg(long)]
        new_password_file: Option<PathBuf>,
    },
    /// Add another passphrase that unlocks the same key.
    Add {
        /// File holding the new passphrase (else asked twice on a terminal).
        #[arg(long)]
        new_password_file: Option<PathBuf>,
    },
    /// List the account's keys (one per passphrase).
    List,
}

/// The passphrase and the unlocked keys, kept across retries so a retry
/// after a failover does not ask again or re-run Argon2.
#[derive(Default)]
struct Secrets {
    passphrase: std::sync::OnceLock<Passphrase>,
    unlocked: tokio::sync::OnceCell<Option<Arc<Unlocked>>>,
}

impl Secrets {
    fn passphrase(&self, cli: &Cli) -> Result<&Passphrase, AgentError> {
        if let Some(p) = self.passphrase.get() {
            return Ok(p);
        }
        let p = secret::passphrase(cli.password_file.as_deref())?;
        Ok(self.passphrase.get_or_init(|| p))
    }

    /// The unlocked account, or None when it has no key and `create` is off.
    async fn unlocked(
        &self,
        cli: &Cli,
        options: &Options,
        session: &Session,
        create: bool,
    ) -> Result<Option<Arc<Unlocked>>, AgentError> {
        if let Some(Some(u)) = self.unlocked.get() {
            return Ok(Some(u.clone()));
        }
        let passphrase = self.passphrase(cli)?;
        let service = KeyService::discover(options).await;
        let found = unlock(&service, &session.account.name, passphrase, create)
            .await?
            .map(Arc::new);
        if found.is_some() {
            let _ = self.unlocked.set(found.clone());
        }
        Ok(found)
    }

    /// The keys, which must exist (they do once anything was backed up).
    async fn keys(&self, cli: &Cli, options: &Options, session: &Session) -> Result<Arc<Keys>, AgentError> {
        match self.unlocked(cli, options, session, false).await? {
            Some(u) => Ok(u.keys.clone()),
            None => Err(AgentError::Invalid(format!(
                "account {} has no encryption key yet: nothing was backed up (the first backup creates it)",
                session.account.name
            ))),
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    duplex_rpc::telemetry::init();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The exit code for a failure (see `duplex_rpc::exit`): damaged data is
/// 5, a server nobody could reach 4.
fn exit_code(e: &anyhow::Error) -> u8 {
    use duplex_rpc::exit;
    for cause in e.chain() {
        match cause.downcast_ref::<AgentError>() {
            Some(AgentError::Integrity(_) | AgentError::Corrupt(_)) => return exit::INTEGRITY,
            Some(AgentError::Rpc { status, .. }) => return exit::for_status(status),
            _ => {}
        }
    }
    exit::for_error(e.chain())
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if cfg!(feature = "bench-unencrypted") {
        if !cli.insecure_plaintext {
            anyhow::bail!(
                "this duplex was built with bench-unencrypted, a benchmark's baseline that does not encrypt: \
                 it runs only with --insecure-plaintext"
            );
        }
        eprintln!("WARNING: built with bench-unencrypted: chunks are NOT encrypted (benchmarks only)");
    }
    duplex_rpc::tls::setup_client(cli.ca.as_deref(), cli.insecure_plaintext)?;
    let options = Options {
        endpoints: cli.endpoint.clone(),
        token: cli.token.clone().unwrap_or_default(),
        storage: cli.storage.clone(),
    };
    let purpose = match cli.command {
        // Forgetting writes too: it needs a write ticket, and a disabled
        // group (a failback in progress) refuses it like a backup.
        Command::Backup { .. } | Command::Forget { .. } => Purpose::Backup,
        _ => Purpose::Read,
    };
    // Talking to one storage server directly is for debugging: no retries.
    let retry_for = if options.storage.is_some() {
        Duration::ZERO
    } else {
        cli.retry_for
    };
    let deadline = Instant::now() + retry_for;
    let mut backoff = duplex_rpc::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut delay = backoff.next_pause();
    let mut last_warning: Option<String> = None;
    let secrets = Secrets::default();
    loop {
        let session = login(&options, purpose).await;
        let outcome = match session {
            Ok(session) => run_command(&cli, &options, &secrets, &session).await,
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
                delay = backoff.next_pause();
            }
            other => return other,
        }
    }
}

async fn run_command(
    cli: &Cli,
    options: &Options,
    secrets: &Secrets,
    session: &Session,
) -> anyhow::Result<ExitCode> {
    let keys = || secrets.keys(cli, options, session);
    match &cli.command {
        Command::Backup {
            paths,
            select,
            force_read,
            limit_upload,
        } => {
            let how = Arc::new(backup::Options {
                selection: select.selection()?,
                force_read: *force_read,
                limit_upload: *limit_upload,
            });
            let unlocked = secrets.unlocked(cli, options, session, true).await?;
            let keys = unlocked
                .map(|u| u.keys.clone())
                .ok_or_else(|| AgentError::Invalid("no key was created".into()))?;
            run_backup(session, keys, paths, how, cli.json).await
        }
        Command::Snapshots => run_snapshots(session, keys, cli.json).await,
        Command::Restore {
            snapshot,
            target,
            include,
        } => {
            // Found first: a snapshot that is not there is the error to give.
            let info = restore::find(session, snapshot).await?;
            let keys = keys().await?;
            let roots = browse::roots(&keys, &info)?;
            let include: Vec<_> = include.iter().map(|p| browse::as_named(p, &roots)).collect();
            run_restore(session, keys, info, target, &include, cli.json).await
        }
        Command::Ls { snapshot, path } => {
            let info = restore::find(session, snapshot).await?;
            let keys = keys().await?;
            let roots = browse::roots(&keys, &info)?;
            let path = path.as_deref().map(|p| browse::as_named(p, &roots));
            let manifest = browse::manifest(session, &keys, &info).await?;
            let entries = entries_of(&manifest);
            print_ls(&browse::under(entries, path.as_deref())?, cli.json)
        }
        Command::Dump { snapshot, path } => {
            let info = restore::find(session, snapshot).await?;
            let keys = keys().await?;
            let path = browse::as_named(path, &browse::roots(&keys, &info)?);
            let manifest = browse::manifest(session, &keys, &info).await?;
            browse::dump(session, &keys, &manifest, &path, &mut std::io::stdout().lock()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Diff { a, b } => {
            let (a, b) = (restore::find(session, a).await?, restore::find(session, b).await?);
            let keys = keys().await?;
            print_diff(&browse::diff(session, &keys, &a, &b).await?, cli.json)
        }
        Command::Verify { snapshot, read_data } => {
            let report = if snapshot.is_none() && !read_data {
                verify::account(session).await?
            } else {
                verify::snapshots(session, &keys().await?, snapshot.as_deref(), *read_data).await?
            };
            print_verify(snapshot.clone(), &report, cli.json)
        }
        Command::Forget {
            snapshots,
            keep,
            dry_run,
        } => {
            let selection = forget::Selection::new(snapshots.clone(), keep.policy())?;
            let report = forget::forget(session, selection, *dry_run).await?;
            print_forget(&report, cli.json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Key { action } => run_key(cli, options, secrets, session, action).await,
    }
}

fn print_forget(report: &forget::ForgetReport, json: bool) {
    if json {
        outln!(
            "{}",
            json!({"removed": report.removed, "kept": report.kept, "dry_run": report.dry_run})
        );
        return;
    }
    let verb = if report.dry_run { "would remove" } else { "removed" };
    for id in &report.removed {
        outln!("{verb} {id}");
    }
    outln!(
        "{verb} {} snapshot(s), kept {}",
        report.removed.len(),
        report.kept.len()
    );
}

async fn run_key(
    cli: &Cli,
    options: &Options,
    secrets: &Secrets,
    session: &Session,
    action: &KeyAction,
) -> anyhow::Result<ExitCode> {
    let service = KeyService::discover(options).await;
    let name = &session.account.name;
    let (new_file, replace) = match action {
        KeyAction::List => return list_keys(&service, cli.json).await,
        KeyAction::Passwd { new_password_file } => (new_password_file, true),
        KeyAction::Add { new_password_file } => (new_password_file, false),
    };
    let unlocked = secrets
        .unlocked(cli, options, session, false)
        .await?
        .ok_or_else(|| {
            AgentError::Invalid(format!(
                "account {name} has no encryption key yet; back something up first"
            ))
        })?;
    let new = secret::new_passphrase(new_file.as_deref())?;
    let added = service.add(&unlocked, &new).await?;
    if replace {
        // Added before the old one goes, so a failure in between leaves
        // two working passphrases, never none.
        service.remove(&unlocked.record_id).await?;
    }
    if cli.json {
        outln!(
            "{}",
            json!({ "id": added.id, "created": rfc3339(added.created_unix_ms) })
        );
    } else if replace {
        outln!(
            "passphrase of account {name} changed (key {} replaces {})",
            added.id,
            unlocked.record_id
        );
    } else {
        outln!("passphrase added to account {name} as key {}", added.id);
    }
    Ok(ExitCode::SUCCESS)
}

async fn list_keys(service: &KeyService, json: bool) -> anyhow::Result<ExitCode> {
    let keys = service.list().await?;
    if json {
        let list: Vec<_> = keys
            .iter()
            .map(|k| json!({ "id": k.id, "created": rfc3339(k.created_unix_ms) }))
            .collect();
        outln!("{}", json!({ "keys": list }));
    } else {
        let rows = keys
            .iter()
            .map(|k| vec![k.id.clone(), rfc3339(k.created_unix_ms)]);
        out!("{}", duplex_rpc::table::render(&["id", "created"], rows));
    }
    Ok(ExitCode::SUCCESS)
}

/// A failure that another server (or this one, a moment later) may not
/// have: a server down, a broken connection, a role that moved, a fenced
/// primary. Refusals about the request itself are final.
fn worth_rediscovering(e: &anyhow::Error) -> bool {
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
        // ResourceExhausted: the account is over a server's per-account
        // limits even after the call's own retries (an upload stream, or
        // other agents of the account busy for long); the delay lets
        // them finish. A used-up quota is not passing: no retry.
        Code::ResourceExhausted => !duplex_rpc::client::is_quota(status),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded | Code::Aborted => true,
        Code::FailedPrecondition => [
            "duplex-primary",
            "duplex-master",
            "duplex-home",
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

async fn run_backup(
    session: &Session,
    keys: Arc<Keys>,
    paths: &[PathBuf],
    options: Arc<backup::Options>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let bar = progress_bar(json, "backing up");
    let warn_bar = bar.clone();
    let warn = Arc::new(move |msg: String| warn_bar.suspend(|| eprintln!("warning: {msg}")));
    let report = backup::backup(session, keys, paths, options, bar, warn).await?;
    if json {
        outln!("{}", serde_json::to_string(&report)?);
    } else {
        outln!(
            "snapshot {} saved to {}: {} files, {} (uploaded {})",
            report.snapshot,
            session.home.name,
            report.files,
            human_bytes(report.bytes),
            human_bytes(report.uploaded_bytes)
        );
    }
    let skipped = report.skipped;
    if skipped > 0 {
        // As restic does: the snapshot is saved, but it lacks something.
        eprintln!("warning: the snapshot lacks {skipped} item(s) that could not be read (see above)");
        return Ok(ExitCode::from(duplex_rpc::exit::PARTIAL));
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_snapshots<F>(session: &Session, keys: impl FnOnce() -> F, json: bool) -> anyhow::Result<ExitCode>
where
    F: std::future::Future<Output = Result<Arc<Keys>, AgentError>>,
{
    let mut storage = session.storage.clone();
    let snapshots = storage
        .list_snapshots(ListSnapshotsRequest {})
        .await?
        .into_inner()
        .snapshots;
    // An account with no snapshot needs no passphrase to say so.
    let keys = if snapshots.is_empty() {
        None
    } else {
        Some(keys().await?)
    };
    let mut rows = Vec::new();
    for s in &snapshots {
        let summary = match &keys {
            Some(k) => k.open_summary(&s.id, &s.summary)?,
            None => Default::default(),
        };
        rows.push((s, summary));
    }
    if json {
        let list: Vec<_> = rows
            .iter()
            .map(|(s, summary)| {
                json!({
                    "id": s.id,
                    "time": rfc3339(s.time_unix_ms),
                    "files": summary.files,
                    "bytes": summary.bytes,
                    "paths": summary.paths,
                })
            })
            .collect();
        outln!("{}", json!({ "snapshots": list }));
    } else {
        let rows = rows.iter().map(|(s, summary)| {
            vec![
                s.id.clone(),
                rfc3339(s.time_unix_ms),
                summary.files.to_string(),
                human_bytes(summary.bytes),
                summary.paths.join(" "),
            ]
        });
        out!(
            "{}",
            duplex_rpc::table::render(&["id", "time", "files", "size", "paths"], rows)
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_restore(
    session: &Session,
    keys: Arc<Keys>,
    info: duplex_proto::v1::SnapshotInfo,
    target: &std::path::Path,
    includes: &[std::ffi::OsString],
    json: bool,
) -> anyhow::Result<ExitCode> {
    let bar = progress_bar(json, "restoring");
    let report = restore::restore(session, keys, info, target, includes, bar).await?;
    if json {
        outln!("{}", serde_json::to_string(&report)?);
    } else {
        outln!(
            "restored snapshot {} into {}: {} files, {} directories, {} symlinks, {} special files, {}",
            report.snapshot,
            target.display(),
            report.files,
            report.dirs,
            report.symlinks,
            report.special,
            human_bytes(report.bytes)
        );
    }
    if report.skipped > 0 {
        eprintln!(
            "warning: {} item(s) of the snapshot could not be made (see above)",
            report.skipped
        );
        return Ok(ExitCode::from(duplex_rpc::exit::PARTIAL));
    }
    Ok(ExitCode::SUCCESS)
}

fn print_ls(entries: &[duplex_proto::v1::FileEntry], json: bool) -> anyhow::Result<ExitCode> {
    let mtime = |e: &duplex_proto::v1::FileEntry| rfc3339(e.mtime_ns.div_euclid(1_000_000));
    if json {
        let entries: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| {
                json!({
                    "path": e.path,
                    "kind": browse::kind_name(e.kind),
                    "size": e.size,
                    "mtime": mtime(e),
                })
            })
            .collect();
        outln!("{}", json!({ "entries": entries }));
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                browse::kind_name(e.kind).to_owned(),
                human_bytes(e.size),
                mtime(e),
                e.path.clone(),
            ]
        })
        .collect();
    out!(
        "{}",
        duplex_rpc::table::render(&["kind", "size", "mtime", "path"], rows)
    );
    Ok(ExitCode::SUCCESS)
}

fn print_diff(diff: &browse::Diff, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        outln!("{}", serde_json::to_string(diff)?);
        return Ok(ExitCode::SUCCESS);
    }
    for (mark, paths) in [("+", &diff.added), ("-", &diff.removed), ("M", &diff.modified)] {
        for path in paths {
            outln!("{mark} {path}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_verify(snapshot: Option<String>, report: &verify::Report, json: bool) -> anyhow::Result<ExitCode> {
    let ok = report.ok();
    let missing: Vec<String> = report.missing.iter().map(hex::encode).collect();
    let corrupt: Vec<String> = report.corrupt.iter().map(hex::encode).collect();
    if json {
        outln!(
            "{}",
            json!({
                "ok": ok,
                "chunks_checked": report.chunks_checked,
                "bytes_checked": report.bytes_checked,
                "chunks_read": report.chunks_read,
                "missing": missing,
                "corrupt": corrupt,
            })
        );
    } else {
        let what = snapshot.map_or_else(|| "account".to_owned(), |s| format!("snapshot {s}"));
        outln!(
            "{what}: {} chunks ({}) checked, {} read back and decrypted, {} missing, {} corrupt",
            report.chunks_checked,
            human_bytes(report.bytes_checked),
            report.chunks_read,
            missing.len(),
            corrupt.len()
        );
        for id in &missing {
            outln!("missing {id}");
        }
        for id in &corrupt {
            outln!("corrupt {id}");
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(duplex_rpc::exit::INTEGRITY)
    })
}

fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn human_bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}
