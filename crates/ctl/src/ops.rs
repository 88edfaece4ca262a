//! `duplexctl failover | switchover | failback | resync | cancel | history |
//! watch` and `servers token | remove`: operations the coordinator
//! runs, and what it has recorded.

use duplex_rpc::exit::call_failed;
use duplex_rpc::{out, outln};
use std::time::Duration;

use anyhow::{Context, bail};
use duplex_coordinator::events::{operation_json, rfc3339};
use duplex_proto::v1::coordinator_client::CoordinatorClient;
use duplex_proto::v1::{
    CancelRequest, CreateOperatorRequest, FailbackRequest, FailoverRequest, GetOperationRequest,
    GetTopologyRequest, HistoryRequest, IssueEnrollmentTokenRequest, ListOperatorsRequest, Operation,
    RemoveServerRequest, ResyncRequest, RevokeOperatorRequest, SwitchoverRequest,
};

pub type Client = CoordinatorClient<crate::conn::Conn>;

pub fn client(coordinator: Option<&str>) -> anyhow::Result<Client> {
    let url = coordinator.context("no coordinator: pass --coordinator URL or set DUPLEX_COORDINATOR")?;
    Ok(CoordinatorClient::new(crate::conn::conn(url)?))
}

fn rpc_error(what: &str) -> impl FnOnce(tonic::Status) -> anyhow::Error + '_ {
    move |s| call_failed(what)(s).into()
}

/// What an operation request asks for.
pub enum Request {
    Failover {
        site: Option<String>,
        force: bool,
        /// "account" or "storage"; none moves every kind.
        kind: Option<String>,
    },
    Switchover {
        site: Option<String>,
    },
    Failback {
        verify: bool,
    },
    Resync {
        rate: u64,
    },
}

/// How a failover or switchover is guarded from the operator's hand.
pub struct Check {
    /// Skip the question on a terminal.
    pub yes: bool,
    /// Show the plan and stop.
    pub dry_run: bool,
    pub json: bool,
}

/// A failover or switchover: with `dry_run`, shows which roles would move
/// and stops; on a terminal, shows them and asks first unless `yes`.
pub async fn start_checked(
    mut client: Client,
    request: Request,
    check: Check,
    wait: bool,
) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let (what, site, kind) = match &request {
        Request::Failover { site, kind, .. } => ("failover", site.clone(), kind.clone()),
        Request::Switchover { site } => ("switchover", site.clone(), None),
        _ => return start(client, request, wait, check.json).await,
    };
    let ask = !check.yes && std::io::stdin().is_terminal();
    if check.dry_run || ask {
        let status = client
            .get_status(duplex_proto::v1::GetClusterStatusRequest {})
            .await
            .map_err(rpc_error("status"))?
            .into_inner();
        let moves = crate::plan::moves(&status, site.as_deref(), kind.as_deref());
        let lines = crate::plan::describe(what, &moves);
        if check.dry_run {
            if check.json {
                outln!("{}", serde_json::json!({ "dry_run": true, "plan": lines }));
            } else {
                for line in &lines {
                    outln!("{line}");
                }
                outln!("dry run: nothing was changed");
            }
            return Ok(());
        }
        for line in &lines {
            eprintln!("{line}");
        }
        crate::plan::confirm(
            &format!("Start the {what}?"),
            &mut std::io::stdin().lock(),
            &mut std::io::stderr(),
        )?;
    }
    start(client, request, wait, check.json).await
}

/// Starts an operation; with `wait`, follows it to the end and fails when it does.
pub async fn start(mut client: Client, request: Request, wait: bool, json: bool) -> anyhow::Result<()> {
    let op = match request {
        Request::Failover { site, force, kind } => client
            .failover(FailoverRequest {
                site: site.unwrap_or_default(),
                force,
                kind: kind.unwrap_or_default(),
            })
            .await
            .map_err(rpc_error("failover"))?,
        Request::Switchover { site } => client
            .switchover(SwitchoverRequest {
                site: site.unwrap_or_default(),
            })
            .await
            .map_err(rpc_error("switchover"))?,
        Request::Failback { verify } => client
            .failback(FailbackRequest { verify })
            .await
            .map_err(rpc_error("failback"))?,
        Request::Resync { rate } => client
            .resync(ResyncRequest { rate })
            .await
            .map_err(rpc_error("resync"))?,
    }
    .into_inner();
    if !json {
        outln!("{} {} started: {}", op.kind, op.id, op.detail);
    }
    let resync = op.kind == "resync";
    conclude(client.clone(), op, wait, json).await?;
    if resync && wait {
        // The operation ends once the links run; the operator waits for the copy.
        wait_caught_up(&mut client, json).await?;
    }
    Ok(())
}

/// Polls the coordinator until every storage replica that is mirrored into
/// reports no lag, saying on stderr how far behind each is meanwhile.
async fn wait_caught_up(client: &mut Client, json: bool) -> anyhow::Result<()> {
    let mut said = std::time::Instant::now();
    loop {
        let status = client
            .get_status(duplex_proto::v1::GetClusterStatusRequest {})
            .await
            .map_err(rpc_error("status"))?
            .into_inner();
        let behind = behind(&status)?;
        if behind.is_empty() {
            if !json {
                outln!("caught up: no storage replica is behind");
            }
            return Ok(());
        }
        if said.elapsed() >= Duration::from_secs(2) {
            eprintln!("waiting: {}", behind.join(", "));
            said = std::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The storage replicas not yet level with their source, each with how far
/// behind it is; an error for one that is down and so cannot catch up.
fn behind(status: &duplex_proto::v1::ClusterStatus) -> anyhow::Result<Vec<String>> {
    let mut behind = Vec::new();
    for s in &status.servers {
        let Some(info) = s.server.as_ref() else { continue };
        if info.kind != "storage" || s.assigned_role != "replica" || status.held.contains(&info.name) {
            continue;
        }
        if !s.healthy {
            bail!("{} is down: it cannot catch up", info.name);
        }
        match s.lag {
            Some(l) if l.records == 0 && l.bytes == 0 => {}
            Some(l) => behind.push(format!("{} {} bytes behind", info.name, l.bytes)),
            None => behind.push(format!("{} (lag not reported yet)", info.name)),
        }
    }
    Ok(behind)
}

/// Cancels the running operation; with `wait`, follows it until it has
/// stopped, and fails only if it ended failed.
pub async fn cancel(mut client: Client, wait: bool, json: bool) -> anyhow::Result<()> {
    let op = client
        .cancel(CancelRequest {})
        .await
        .map_err(rpc_error("cancel"))?
        .into_inner();
    if !json {
        outln!("{} {} {}: cancel requested", op.kind, op.id, op.state);
    }
    conclude(client, op, wait, json).await
}

/// Prints the operation (followed to its end with `wait`) and fails when it failed.
async fn conclude(mut client: Client, op: Operation, wait: bool, json: bool) -> anyhow::Result<()> {
    let op = if wait {
        follow(&mut client, op, json).await?
    } else {
        op
    };
    if json {
        outln!("{}", operation_json(&op));
    }
    if op.state == "failed" {
        bail!("{} {} failed: {}", op.kind, op.id, op.error);
    }
    Ok(())
}

/// Polls the operation until it ends, printing each phase as it starts.
async fn follow(client: &mut Client, mut op: Operation, json: bool) -> anyhow::Result<Operation> {
    let mut shown = 0;
    loop {
        if !json {
            for p in op.phases.iter().skip(shown) {
                outln!("  {} {}", rfc3339(p.started_unix_ms), p.name);
            }
            shown = op.phases.len();
        }
        if op.state != "running" {
            if !json {
                outln!("{} {} {}", op.kind, op.id, op.state);
            }
            return Ok(op);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        op = client
            .get_operation(GetOperationRequest {
                id: op.id.to_string(),
            })
            .await
            .map_err(rpc_error("following the operation"))?
            .into_inner();
    }
}

/// Forgets a server that is down and holds no role.
pub async fn remove_server(mut client: Client, name: &str, json: bool) -> anyhow::Result<()> {
    client
        .remove_server(RemoveServerRequest {
            name: name.to_owned(),
        })
        .await
        .map_err(call_failed(format!("removing server {name:?}")))?;
    if json {
        outln!("{}", serde_json::json!({ "removed": name }));
    } else {
        outln!("server {name} removed");
    }
    Ok(())
}

pub async fn create_operator(mut client: Client, name: &str, role: &str, json: bool) -> anyhow::Result<()> {
    let created = client
        .create_operator(CreateOperatorRequest {
            name: name.to_owned(),
            role: role.to_owned(),
        })
        .await
        .map_err(rpc_error("creating an operator"))?
        .into_inner();
    if json {
        outln!(
            "{}",
            serde_json::json!({"name": created.name, "role": created.role, "token": created.token})
        );
    } else {
        outln!("{}", created.token);
        eprintln!(
            "operator {} ({}) created; this token is shown once: keep it (DUPLEX_OPERATOR_TOKEN)",
            created.name, created.role
        );
    }
    Ok(())
}

pub async fn list_operators(mut client: Client, json: bool) -> anyhow::Result<()> {
    let operators = client
        .list_operators(ListOperatorsRequest {})
        .await
        .map_err(rpc_error("listing operators"))?
        .into_inner()
        .operators;
    if json {
        let list: Vec<_> = operators
            .iter()
            .map(|o| serde_json::json!({"name": o.name, "role": o.role, "created": rfc3339(o.created_unix_ms)}))
            .collect();
        outln!("{}", serde_json::json!({ "operators": list }));
        return Ok(());
    }
    let rows = operators
        .iter()
        .map(|o| vec![o.name.clone(), o.role.clone(), rfc3339(o.created_unix_ms)]);
    out!(
        "{}",
        duplex_rpc::table::render(&["NAME", "ROLE", "CREATED"], rows)
    );
    Ok(())
}

pub async fn revoke_operator(mut client: Client, name: &str, json: bool) -> anyhow::Result<()> {
    client
        .revoke_operator(RevokeOperatorRequest {
            name: name.to_owned(),
        })
        .await
        .map_err(rpc_error("revoking an operator"))?;
    if json {
        outln!("{}", serde_json::json!({ "revoked": name }));
    } else {
        outln!("operator {name} revoked");
    }
    Ok(())
}

pub async fn history(mut client: Client, json: bool) -> anyhow::Result<()> {
    let events = client
        .history(HistoryRequest {})
        .await
        .map_err(rpc_error("history"))?
        .into_inner()
        .events;
    if json {
        let events: Vec<_> = events.iter().map(operation_json).collect();
        outln!("{}", serde_json::json!({ "events": events }));
        return Ok(());
    }
    for op in &events {
        let by = match (op.by.as_str(), op.by_addr.as_str()) {
            ("" | "coordinator", _) => String::new(),
            (name, "") => format!(" [by {name}]"),
            (name, addr) => format!(" [by {name} from {addr}]"),
        };
        outln!(
            "{}  {:<17} {:<8} {}{}{by}",
            rfc3339(op.started_unix_ms),
            op.kind,
            op.state,
            op.detail,
            if op.error.is_empty() {
                String::new()
            } else {
                format!(" ({})", op.error)
            }
        );
        for p in &op.phases {
            let took = if p.finished_unix_ms > 0 {
                format!("{} ms", p.finished_unix_ms - p.started_unix_ms)
            } else {
                "unfinished".into()
            };
            outln!("    {:<20} {took}", p.name);
        }
    }
    Ok(())
}

/// The identity an enrollment token is bound to: `NAME:SITE:KIND`.
#[derive(Clone, Debug)]
pub struct Binding {
    pub name: String,
    pub site: String,
    pub kind: String,
}

impl std::str::FromStr for Binding {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(':');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(name), Some(site), Some(kind), None) if !name.is_empty() && !site.is_empty() => {
                Ok(Binding {
                    name: name.into(),
                    site: site.into(),
                    kind: kind.into(),
                })
            }
            _ => Err(format!("{s:?} is not NAME:SITE:KIND (e.g. storage-a:a:storage)")),
        }
    }
}

pub async fn issue(
    client: &mut Client,
    binding: &Binding,
    ttl: Duration,
) -> Result<duplex_proto::v1::EnrollmentToken, tonic::Status> {
    Ok(client
        .issue_enrollment_token(IssueEnrollmentTokenRequest {
            ttl_seconds: ttl.as_secs(),
            name: binding.name.clone(),
            site: binding.site.clone(),
            kind: binding.kind.clone(),
        })
        .await?
        .into_inner())
}

/// One token per server, each in `dir/NAME` readable by its owner only,
/// for servers started with `--enrollment-token-file`, and the CA
/// certificate beside them (`dir/ca.pem`) when one was given: everything a
/// new server needs to enroll. A server already enrolled is skipped.
pub async fn token_files(
    mut client: Client,
    ttl: Duration,
    bindings: &[Binding],
    dir: &std::path::Path,
    ca: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    duplex_rpc::secure_fs::create_private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        let path = dir.join("ca.pem");
        duplex_rpc::secure_fs::write_public(&path, &pem)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let mut written = 0;
    for binding in bindings {
        if binding.name.is_empty() || binding.name.contains('/') || binding.name.starts_with('.') {
            bail!("server name {:?} cannot be a file name", binding.name);
        }
        let token = match issue(&mut client, binding, ttl).await {
            Ok(t) => t,
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                eprintln!("{}: {}", binding.name, s.message());
                continue;
            }
            Err(s) => bail!(
                "issuing an enrollment token for {}: {}",
                binding.name,
                s.message()
            ),
        };
        let path = dir.join(&binding.name);
        duplex_rpc::secure_fs::write_private(&path, token.token.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        written += 1;
    }
    eprintln!("wrote {written} enrollment tokens to {}", dir.display());
    Ok(())
}

pub async fn token(mut client: Client, binding: &Binding, ttl: Duration, json: bool) -> anyhow::Result<()> {
    let token = issue(&mut client, binding, ttl)
        .await
        .map_err(rpc_error("issuing an enrollment token"))?;
    if json {
        outln!(
            "{}",
            serde_json::json!({
                "name": binding.name,
                "site": binding.site,
                "kind": binding.kind,
                "token": token.token,
                "expires": rfc3339(token.expires_unix_ms),
            })
        );
    } else {
        outln!("{}", token.token);
        eprintln!(
            "one-time enrollment token for {} {} on site {}, valid until {}: put it in a file and start the \
             server with --enrollment-token-file FILE --ca CA.pem (or DUPLEX_ENROLLMENT_TOKEN)",
            binding.kind,
            binding.name,
            binding.site,
            rfc3339(token.expires_unix_ms),
        );
    }
    Ok(())
}

/// Redraws `status` whenever the topology changes (and every second, for
/// lag); with `json`, prints each status as one JSON line instead.
pub async fn watch(coordinator: Option<&str>, json: bool) -> anyhow::Result<()> {
    let mut client = client(coordinator)?;
    let mut stream = client
        .watch_topology(GetTopologyRequest {})
        .await
        .map_err(rpc_error("watching the topology"))?
        .into_inner();
    loop {
        if !json {
            out!("\x1b[2J\x1b[H");
        }
        crate::status::run(coordinator, json).await?;
        tokio::select! {
            msg = stream.message() => {
                if msg.map_err(rpc_error("watching the topology"))?.is_none() {
                    bail!("the coordinator ended the watch");
                }
            }
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Checks every snapshot on every reachable storage server: manifests and
/// chunks present and hashing to their ids. Fails when anything is wrong.
/// `duplexctl prune`: every healthy storage server collects garbage, at
/// once (each from its own copy: a replica collects what the deletions
/// mirrored to it let go). A server that is down collects on its own
/// schedule once back.
pub async fn prune(coordinator: Option<&str>, wait: bool, json: bool) -> anyhow::Result<()> {
    use duplex_proto::v1::CollectGarbageRequest;
    use duplex_proto::v1::storage_admin_client::StorageAdminClient;
    let servers = healthy_storage(coordinator).await?;
    let rounds = servers.iter().map(|server| async move {
        let mut admin =
            StorageAdminClient::new(crate::conn::conn(&duplex_rpc::discovery::client_addr(server))?);
        let r = admin
            .collect_garbage(CollectGarbageRequest { wait })
            .await
            .map_err(call_failed(format!("collecting garbage on {}", server.name)))?
            .into_inner();
        anyhow::Ok((server.name.clone(), r))
    });
    let mut reports = Vec::new();
    for result in futures::future::join_all(rounds).await {
        let (name, r) = result?;
        let g = r.report.unwrap_or_default();
        reports.push(serde_json::json!({
            "name": name,
            "started": r.started,
            "finished": wait,
            "live_chunks": g.live_chunks,
            "swept_chunks": g.swept_chunks,
            "swept_bytes": g.swept_bytes,
            "packs_rewritten": g.packs_rewritten,
            "packs_deleted": g.packs_deleted,
            "reclaimed_bytes": g.reclaimed_bytes,
            "sweep_deferred": g.sweep_deferred,
            "duration_ms": g.duration_ms,
            "sweep_ms": g.sweep_ms,
            "compact_ms": g.compact_ms,
        }));
    }
    if json {
        outln!("{}", serde_json::json!({ "servers": reports }));
        return Ok(());
    }
    for r in &reports {
        let name = r["name"].as_str().unwrap_or("");
        if !wait {
            let what = if r["started"] == true {
                "started"
            } else {
                "already running"
            };
            outln!("{name:<12} garbage collection {what}");
        } else if r["sweep_deferred"] == true {
            outln!(
                "{name:<12} swept nothing (started less than a grace period ago); reclaimed {} bytes by compaction",
                r["reclaimed_bytes"]
            );
        } else {
            outln!(
                "{name:<12} swept {} chunks ({} bytes), rewrote {} packs, reclaimed {} bytes on disk",
                r["swept_chunks"],
                r["swept_bytes"],
                r["packs_rewritten"],
                r["reclaimed_bytes"]
            );
        }
    }
    Ok(())
}

/// The storage servers the coordinator sees healthy.
async fn healthy_storage(coordinator: Option<&str>) -> anyhow::Result<Vec<duplex_proto::v1::ServerInfo>> {
    let servers = crate::verify::storage_servers(coordinator).await?;
    Ok(servers.into_iter().map(|s| s.info).collect())
}
