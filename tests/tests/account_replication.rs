//! Account server replication: a slave applies the master's log as it
//! arrives, bootstraps from a snapshot, survives restarts, keeps every
//! acknowledged write in sync mode, and reports divergence on rejoin in a
//! report an operator can re-apply.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use duplex_proto::v1::account_replication_client::AccountReplicationClient;
use duplex_proto::v1::account_service_client::AccountServiceClient;
use duplex_proto::v1::{
    CreateAccountRequest, ListAccountsRequest, ListGroupsRequest, LoginRequest, PromoteRequest, Purpose,
    ReapplyEntry, ReapplyRequest, SetGroupEnabledRequest,
};
use duplex_tests::accounts::{self, account, admin, bulk_create, register_storage, status, wait_in_sync};
use duplex_tests::{bin, runtime, wait_for};

const SYNC: Duration = Duration::from_secs(60);

fn ctl(args: &[&str]) -> std::process::Output {
    Command::new(bin("duplexctl"))
        .args(args)
        .env("DUPLEX_INSECURE_PLAINTEXT", "1")
        .output()
        .unwrap()
}

async fn names_on(addr: &str) -> HashSet<String> {
    admin(addr)
        .list_accounts(ListAccountsRequest {})
        .await
        .unwrap()
        .into_inner()
        .accounts
        .into_iter()
        .map(|a| a.name)
        .collect()
}

#[test]
fn slave_applies_the_log_and_resumes_from_its_own_lsn_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let _enter = rt.enter();
    let master = accounts::start(dir.path(), "account-a", &["--replication", "sync"]);
    let mut slave = accounts::start(dir.path(), "account-b", &["--master", &master.addr]);
    rt.block_on(async {
        register_storage(&master.addr).await;
        let mut client = admin(&master.addr);
        for i in 0..200 {
            client.create_account(account(&format!("one{i}"))).await.unwrap();
        }
        bulk_create(&master.addr, "bulk", 800).await;
    });
    let synced = wait_in_sync(&rt, &master.addr, &slave.addr, SYNC);
    assert_eq!(synced.accounts, 1000);
    assert_eq!(synced.role, "slave");
    let master_status = rt.block_on(status(&master.addr));
    assert_eq!(
        master_status.replication, "sync",
        "a slave is connected, so sync must hold"
    );
    let bootstraps = synced.bootstraps;

    slave.kill();
    rt.block_on(bulk_create(&master.addr, "while-down", 10));
    slave.restart();
    let resumed = wait_in_sync(&rt, &master.addr, &slave.addr, SYNC);
    assert_eq!(resumed.accounts, 1010);
    assert_eq!(
        resumed.bootstraps, bootstraps,
        "a restarted slave must resume from its LSN, not re-bootstrap"
    );
    assert!(
        slave
            .log_text()
            .matches("installed the master's snapshot")
            .count()
            <= 1
    );
}

#[test]
fn fresh_slave_bootstraps_from_a_snapshot_of_100k_accounts_then_follows() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let _enter = rt.enter();
    let master = accounts::start(dir.path(), "account-a", &["--snapshot-interval", "1s"]);
    rt.block_on(async {
        register_storage(&master.addr).await;
        bulk_create(&master.addr, "acct", 100_000).await;
    });
    // The periodic snapshot covers everything and the log behind it is trimmed.
    let lsn = rt.block_on(status(&master.addr)).lsn;
    wait_for("a snapshot covering the accounts", SYNC, || {
        let s = rt.block_on(status(&master.addr));
        (s.snapshot_lsn >= lsn && s.log_start_lsn > lsn).then_some(())
    });
    let slave = accounts::start(dir.path(), "account-b", &["--master", &master.addr]);
    let synced = wait_in_sync(&rt, &master.addr, &slave.addr, SYNC);
    assert_eq!(synced.accounts, 100_000);
    assert_eq!(synced.bootstraps, 1);
    rt.block_on(bulk_create(&master.addr, "live", 25));
    let live = wait_in_sync(&rt, &master.addr, &slave.addr, SYNC);
    assert_eq!(live.accounts, 100_025);
    assert_eq!(
        live.bootstraps, 1,
        "live writes must be followed, not re-bootstrapped"
    );
}

/// Writes accounts one at a time until stopped; returns the acknowledged
/// names, counting them in `acked_count` as it goes.
fn write_load(
    addr: String,
    stop: Arc<AtomicBool>,
    acked_count: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let rt = runtime();
        let _enter = rt.enter();
        let mut acked = Vec::new();
        rt.block_on(async {
            let mut client = admin(&addr);
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let name = format!("load{i}");
                i += 1;
                match tokio::time::timeout(Duration::from_secs(5), client.create_account(account(&name)))
                    .await
                {
                    Ok(Ok(_)) => {
                        acked.push(name);
                        acked_count.store(acked.len(), Ordering::SeqCst);
                    }
                    _ => break,
                }
            }
        });
        acked
    })
}

fn kill_master_under_load(mode: &str) -> (Vec<String>, HashSet<String>, u64) {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let _enter = rt.enter();
    let mut master = accounts::start(dir.path(), "account-a", &["--replication", mode]);
    let slave = accounts::start(dir.path(), "account-b", &["--master", &master.addr]);
    rt.block_on(register_storage(&master.addr));
    wait_in_sync(&rt, &master.addr, &slave.addr, SYNC);

    let stop = Arc::new(AtomicBool::new(false));
    let acked_count = Arc::new(AtomicUsize::new(0));
    let writer = write_load(master.addr.clone(), stop.clone(), acked_count.clone());
    // The slave's lag as the master reports it, with how many writes had
    // been acknowledged when it was read.
    let last_sample = Arc::new(Mutex::new((0u64, 0usize)));
    let sampler = {
        let (addr, stop, last_sample, acked_count) = (
            master.addr.clone(),
            stop.clone(),
            last_sample.clone(),
            acked_count.clone(),
        );
        std::thread::spawn(move || {
            let rt = runtime();
            let _enter = rt.enter();
            while !stop.load(Ordering::SeqCst) {
                let before = acked_count.load(Ordering::SeqCst);
                let reading = rt.block_on(async {
                    let mut client = admin(&addr);
                    let call = client.get_status(duplex_proto::v1::GetAccountStatusRequest {});
                    tokio::time::timeout(Duration::from_secs(1), call).await
                });
                let Ok(Ok(s)) = reading else { break };
                let lag = s
                    .into_inner()
                    .slaves
                    .first()
                    .and_then(|sl| sl.lag)
                    .map_or(0, |l| l.records);
                *last_sample.lock().unwrap() = (lag, before);
            }
        })
    };
    wait_for("writes under load", SYNC, || {
        (rt.block_on(status(&master.addr)).accounts >= 300).then_some(())
    });
    master.kill();
    stop.store(true, Ordering::SeqCst);
    let acked = writer.join().unwrap();
    sampler.join().unwrap();

    let mut replication = AccountReplicationClient::new(duplex_rpc::channel(&slave.addr).unwrap());
    let promoted = rt
        .block_on(replication.promote(PromoteRequest { epoch: 1 }))
        .unwrap()
        .into_inner();
    assert_eq!(promoted.role, "master");
    let present = rt.block_on(names_on(&slave.addr));
    let (lag, acked_at_sample) = *last_sample.lock().unwrap();
    // The most an operator could have been told was at risk: the last lag
    // reading plus every write acknowledged after it.
    let at_risk = lag + (acked.len() - acked_at_sample) as u64;
    (acked, present, at_risk)
}

#[test]
fn sync_mode_keeps_every_acknowledged_write_when_the_master_dies() {
    let (acked, present, _) = kill_master_under_load("sync");
    assert!(
        acked.len() >= 250,
        "only {} writes were acknowledged",
        acked.len()
    );
    let lost: Vec<&String> = acked.iter().filter(|n| !present.contains(*n)).collect();
    assert!(
        lost.is_empty(),
        "sync mode lost {} acknowledged writes: {lost:?}",
        lost.len()
    );
}

#[test]
fn async_mode_loses_at_most_what_the_lag_said() {
    let (acked, present, max_lag) = kill_master_under_load("async");
    let lost = acked.iter().filter(|n| !present.contains(*n)).count() as u64;
    // One write may be in flight between the last lag sample and the kill.
    assert!(
        lost <= max_lag + 1,
        "lost {lost} acknowledged writes but the lag never exceeded {max_lag}"
    );
}

/// Accounts only the master will have: created in group `lost`, then
/// that group disabled. Returns each account's token.
async fn lost_writes(master: &str) -> Vec<String> {
    let mut client = admin(master);
    let mut tokens = Vec::new();
    for i in 0..20 {
        let request = CreateAccountRequest {
            group: "lost".into(),
            ..account(&format!("lost{i}"))
        };
        tokens.push(client.create_account(request).await.unwrap().into_inner().token);
    }
    let disable = SetGroupEnabledRequest {
        name: "lost".into(),
        enabled: false,
    };
    client.set_group_enabled(disable).await.unwrap();
    tokens
}

/// The divergence report: JSON lines, private, naming what was lost and
/// never a token.
fn check_report(path: &str, tokens: &[String]) -> Vec<serde_json::Value> {
    use std::os::unix::fs::PermissionsExt;
    assert!(path.ends_with(".jsonl"), "{path}");
    let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the report holds token hashes");
    let text = std::fs::read_to_string(path).unwrap();
    assert!(tokens.iter().all(|t| !text.contains(t.as_str())), "{text}");
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 21, "{text}");
    for (i, line) in lines.iter().enumerate() {
        humantime::parse_rfc3339(line["time"].as_str().unwrap()).unwrap();
        assert!(line["entry"].is_string() && line["reapply"] == true, "{line}");
        assert!(line["epoch"].is_u64(), "{line}");
        if i > 0 {
            assert_eq!(line["lsn"].as_u64(), lines[i - 1]["lsn"].as_u64().map(|l| l + 1));
        }
    }
    let summaries = |kind: &str| -> Vec<String> {
        lines
            .iter()
            .filter(|l| l["kind"] == kind)
            .map(|l| l["summary"].as_str().unwrap().to_owned())
            .collect()
    };
    let created = summaries("create-account");
    assert_eq!(created.len(), 20);
    assert!(
        created[0].contains("\"lost0\"")
            && created[0].contains("\"lost\"")
            && created[0].contains("storage-a"),
        "{created:?}"
    );
    assert_eq!(summaries("set-group-enabled"), ["disable group \"lost\""]);
    lines
}

/// `duplexctl accounts reapply FILE --json` against `endpoint`: the entries.
fn reapply(endpoint: &str, file: &str, dry_run: bool) -> Vec<serde_json::Value> {
    let mut args = vec!["accounts", "reapply", file, "--json", "--endpoint", endpoint];
    if dry_run {
        args.push("--dry-run");
    }
    let out = ctl(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    report["entries"].as_array().unwrap().clone()
}

fn applied(entries: &[serde_json::Value]) -> Vec<u64> {
    entries
        .iter()
        .filter(|e| e["applied"] == true)
        .map(|e| e["lsn"].as_u64().unwrap())
        .collect()
}

async fn login(addr: &str, token: &str) -> Result<String, tonic::Status> {
    let mut client = AccountServiceClient::new(duplex_rpc::channel(addr).unwrap());
    let request = LoginRequest {
        token: token.to_owned(),
        purpose: Purpose::Read as i32,
    };
    let response = client.login(request).await?.into_inner();
    Ok(response.account.unwrap().name)
}

#[test]
fn diverged_master_rejoins_as_slave_and_reports_what_it_alone_had() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let _enter = rt.enter();
    let mut a = accounts::start(dir.path(), "account-a", &["--replication", "async"]);
    let mut b = accounts::start(dir.path(), "account-b", &["--master", &a.addr]);
    rt.block_on(async {
        register_storage(&a.addr).await;
        bulk_create(&a.addr, "shared", 50).await;
    });
    wait_in_sync(&rt, &a.addr, &b.addr, SYNC);

    // Cut the slave off (a stopped process would still find the master's
    // sends in its socket buffer), let the master take writes the slave
    // never sees, then lose the master.
    b.kill();
    let tokens = rt.block_on(lost_writes(&a.addr));
    a.kill();
    b.restart();

    let out = ctl(&["servers", "promote", &b.addr, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    rt.block_on(bulk_create(&b.addr, "after", 10));
    // Taken on the new master meanwhile: re-applying must not replace it.
    rt.block_on(admin(&b.addr).create_account(account("lost5")))
        .unwrap();

    a.restart();
    let out = ctl(&["servers", "demote", &a.addr, "--master", &b.addr, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rejoined = wait_in_sync(&rt, &b.addr, &a.addr, SYNC);
    assert_eq!(rejoined.role, "slave");
    assert_eq!(rejoined.divergent_entries, 21, "{rejoined:?}");
    let report = rejoined.divergence_report.clone();
    let lines = check_report(&report, &tokens);
    let names = rt.block_on(names_on(&a.addr));
    assert!(names.contains("after9") && !names.contains("lost0"));

    // Reviewed, then re-applied on the new master: all but the name taken.
    let lsn = |name: &str| {
        let line = lines
            .iter()
            .find(|l| l["summary"].as_str().unwrap().contains(name));
        line.unwrap()["lsn"].as_u64().unwrap()
    };
    let mut expected: Vec<u64> = lines.iter().map(|l| l["lsn"].as_u64().unwrap()).collect();
    expected.retain(|&l| l != lsn("\"lost5\""));
    let dry = reapply(&b.addr, &report, true);
    assert_eq!(applied(&dry), expected, "{dry:?}");
    assert!(
        !rt.block_on(names_on(&b.addr)).contains("lost0"),
        "a dry run wrote"
    );
    let done = reapply(&b.addr, &report, false);
    assert_eq!(applied(&done), expected, "{done:?}");
    let skipped = done.iter().find(|e| e["applied"] == false).unwrap();
    assert_eq!(skipped["kind"], "create-account");
    assert!(
        skipped["reason"].as_str().unwrap().contains("exists already"),
        "{skipped}"
    );

    rt.block_on(async {
        assert_eq!(login(&b.addr, &tokens[0]).await.unwrap(), "lost0");
        assert_eq!(login(&b.addr, &tokens[19]).await.unwrap(), "lost19");
        assert!(
            login(&b.addr, &tokens[5]).await.is_err(),
            "lost5 keeps its new token"
        );
        let groups = admin(&b.addr)
            .list_groups(ListGroupsRequest {})
            .await
            .unwrap()
            .into_inner();
        let lost = groups.groups.iter().find(|g| g.name == "lost").unwrap();
        assert!(!lost.enabled && lost.accounts == 19, "{lost:?}");
    });
    // Re-applied entries are ordinary writes: the rejoined slave gets them.
    wait_in_sync(&rt, &b.addr, &a.addr, SYNC);
    rt.block_on(async { assert_eq!(login(&a.addr, &tokens[0]).await.unwrap(), "lost0") });

    // Once more changes nothing.
    assert!(applied(&reapply(&b.addr, &report, false)).is_empty());
    refusals(&rt, &a.addr, &b.addr, &lines[0]);
}

/// Re-applying is a write (a slave refuses, naming the master), refuses
/// an entry that does not decode (naming its LSN), and an unreadable
/// report fails the command.
fn refusals(rt: &tokio::runtime::Runtime, slave: &str, master: &str, line: &serde_json::Value) {
    use base64::Engine;
    let encoded = line["entry"].as_str().unwrap();
    let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap();
    let lsn = line["lsn"].as_u64().unwrap();
    let request = |lsn: u64, entry: Vec<u8>| ReapplyRequest {
        entries: vec![ReapplyEntry { lsn, entry }],
        dry_run: false,
    };
    let err = rt
        .block_on(admin(slave).reapply(request(lsn, bytes)))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains(master), "{}", err.message());
    let err = rt
        .block_on(admin(master).reapply(request(777, b"\xff\xffgarbage".to_vec())))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("lsn 777"), "{}", err.message());
    let out = ctl(&[
        "accounts",
        "reapply",
        "/nonexistent/divergence.jsonl",
        "--endpoint",
        master,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/divergence.jsonl"));
}

#[test]
fn stale_epochs_and_writes_to_a_slave_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let _enter = rt.enter();
    let master = accounts::start(dir.path(), "account-a", &[]);
    let slave = accounts::start(dir.path(), "account-b", &["--master", &master.addr]);
    rt.block_on(register_storage(&master.addr));
    wait_in_sync(&rt, &master.addr, &slave.addr, SYNC);

    let err = rt
        .block_on(admin(&slave.addr).create_account(account("nope")))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains(&master.addr), "{}", err.message());
    assert_eq!(
        err.metadata().get("duplex-master").unwrap().to_str().unwrap(),
        master.addr
    );
    // duplexctl follows the hint: given only the slave, it writes to the master.
    let out = Command::new(bin("duplexctl"))
        .args([
            "accounts",
            "create",
            "via-slave",
            "--json",
            "--endpoint",
            &slave.addr,
        ])
        .env("DUPLEX_INSECURE_PLAINTEXT", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_in_sync(&rt, &master.addr, &slave.addr, SYNC);
    assert!(rt.block_on(names_on(&slave.addr)).contains("via-slave"));

    let mut replication = AccountReplicationClient::new(duplex_rpc::channel(&master.addr).unwrap());
    rt.block_on(replication.promote(PromoteRequest { epoch: 5 }))
        .unwrap();
    let err = rt
        .block_on(replication.promote(PromoteRequest { epoch: 4 }))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("stale epoch 4"), "{}", err.message());
    let out = ctl(&[
        "servers",
        "demote",
        &master.addr,
        "--master",
        &slave.addr,
        "--epoch",
        "3",
    ]);
    assert!(!out.status.success(), "a demote at a stale epoch was accepted");
    assert_eq!(rt.block_on(status(&master.addr)).role, "master");
}

#[test]
fn sync_replication_degrades_loudly_without_a_slave_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let _enter = rt.enter();
    let master = accounts::start(
        dir.path(),
        "account-a",
        &["--replication", "sync", "--sync-timeout", "200ms"],
    );
    rt.block_on(async {
        register_storage(&master.addr).await;
        admin(&master.addr)
            .create_account(account("alone"))
            .await
            .unwrap();
    });
    let s = rt.block_on(status(&master.addr));
    assert!(s.replication.starts_with("async (degraded"), "{}", s.replication);
    assert!(master.log_text().contains("SYNC REPLICATION DEGRADED TO ASYNC"));
    let metrics = duplex_tests::scrape(&master.addr);
    assert!(
        metrics.contains("duplex_account_sync_degraded{server=\"account-a\"} 1"),
        "{metrics}"
    );

    let slave = accounts::start(dir.path(), "account-b", &["--master", &master.addr]);
    rt.block_on(admin(&master.addr).create_account(account("with-slave")))
        .unwrap();
    wait_in_sync(&rt, &master.addr, &slave.addr, SYNC);
    wait_for("sync replication to be restored", SYNC, || {
        (rt.block_on(status(&master.addr)).replication == "sync").then_some(())
    });
    let metrics = duplex_tests::scrape(&slave.addr);
    assert!(
        metrics.contains("duplex_lag_records{server=\"account-b\"} 0"),
        "{metrics}"
    );
}
