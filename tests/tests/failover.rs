//! Failover, fencing and failback with real processes: SIGKILL, SIGSTOP
//! and a partition from the coordinator. Every acknowledged backup must
//! restore bit for bit, and no two servers may take writes at once.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use duplex_tests::alerts::webhook;
use duplex_tests::proxy::Fault;
use duplex_tests::tree::{assert_same_tree, random_bytes};
use duplex_tests::twosite::{Options, TwoSites, lag_in, role_in};
use duplex_tests::wait_for;

const LONG: Duration = Duration::from_secs(60);

/// A fresh source tree for backup number `i`: a file of its own and a
/// file every tree shares (so dedup is exercised across the failover).
fn source_tree(root: &Path, i: u64) -> PathBuf {
    let dir = root.join(format!("src-{i}"));
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("shared.bin"), random_bytes(7, 300_000)).unwrap();
    std::fs::write(
        dir.join("sub/own.bin"),
        random_bytes(1000 + i, 50_000 + (i as usize) * 1000),
    )
    .unwrap();
    dir
}

/// Acknowledged backups: (snapshot id, the tree it holds).
type Acked = Arc<Mutex<Vec<(String, PathBuf)>>>;

/// Backs up fresh trees one after another until `stop`; every attempt
/// must succeed (the agent rides out the failover by itself).
fn backup_loop(sites: &TwoSites, acked: &Acked, stop: &AtomicBool) {
    let root = sites.path("trees");
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        let tree = source_tree(&root, i);
        let out = sites.duplex(&sites.token, &["backup", tree.to_str().unwrap(), "--json"]);
        assert!(
            out.status.success(),
            "backup {i} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        acked
            .lock()
            .unwrap()
            .push((v["snapshot"].as_str().unwrap().to_owned(), tree));
        i += 1;
    }
}

fn assert_all_restore(sites: &TwoSites, acked: &[(String, PathBuf)]) {
    for (n, (snapshot, tree)) in acked.iter().enumerate() {
        let target = sites.restore(&sites.token, snapshot, &format!("restored-{n}"));
        let name = tree.file_name().unwrap();
        assert_same_tree(tree, &target.join(name));
    }
}

fn last_event<'a>(events: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    events
        .iter()
        .rev()
        .find(|e| e["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in history: {events:?}"))
}

fn phase_names(event: &serde_json::Value) -> Vec<String> {
    event["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn sigkill_of_the_storage_primary_moves_backups_to_the_replica() {
    let (hook, posted) = webhook();
    let sites = TwoSites::start(Options {
        coordinator: &["--webhook", &hook],
        ..Default::default()
    });
    let acked: Acked = Arc::default();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let looping = s.spawn(|| backup_loop(&sites, &acked, &stop));
        wait_for("two backups before the kill", LONG, || {
            (acked.lock().unwrap().len() >= 2).then_some(())
        });
        // SIGKILL storage-a while backups keep coming.
        let before = acked.lock().unwrap().len();
        sites.storage_a.signal(libc::SIGKILL);
        wait_for("three backups after the kill", LONG, || {
            (acked.lock().unwrap().len() >= before + 3).then_some(())
        });
        stop.store(true, Ordering::SeqCst);
        looping.join().unwrap();
    });
    let status = sites.wait_roles(&[("storage-a", "down"), ("storage-b", "primary")]);
    assert!(status["epoch"].as_u64().unwrap() >= 1, "{status}");
    let accounts = sites.ctl_json(&["accounts", "list"]);
    assert_eq!(accounts["accounts"][0]["home"], "storage-b", "{accounts}");
    let failover = last_event(&sites.history(), "failover").clone();
    assert_eq!(failover["state"], "done", "{failover}");
    assert_eq!(
        phase_names(&failover),
        [
            "fence",
            "promote-account",
            "stop-links",
            "promote-storage",
            "repoint-homes",
            "resume"
        ]
    );
    assert!(failover["detail"].as_str().unwrap().contains("storage-a"));
    assert_all_restore(&sites, &acked.lock().unwrap());
    let metrics = sites.scrape(&sites.coordinator.addr);
    assert!(
        metrics.contains("duplex_operations_finished_total{kind=\"failover\",state=\"done\"} 1"),
        "{metrics}"
    );
    // Started and finished only grow; what runs now is a gauge that fell back.
    assert!(
        metrics.contains("duplex_operations_started_total{kind=\"failover\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("duplex_operations_running{kind=\"failover\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("duplex_heartbeat_age_seconds{server=\"storage-b\"}"),
        "{metrics}"
    );
    wait_for("the webhook to hear of the failover", LONG, || {
        posted
            .lock()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "failover" && e["state"] == "done")
            .then_some(())
    });
}

#[test]
fn sigkill_of_the_account_master_promotes_the_slave_and_the_old_master_rejoins_as_slave() {
    let mut sites = TwoSites::start(Options::default());
    let tree = source_tree(&sites.path("trees"), 0);
    let first = sites.backup(&sites.token, &tree);
    sites.account_a.signal(libc::SIGKILL);
    sites.wait_roles(&[("account-a", "down"), ("account-b", "master")]);
    // The token issued by account-a still works, and writes go to account-b.
    let second = sites.backup(&sites.token, &source_tree(&sites.path("trees"), 1));
    let carol = sites.create_account("carol", None, None);
    let accounts = sites.ctl_json(&["accounts", "list"]);
    let mut names: Vec<&str> = accounts["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["carol", "demo"], "{accounts}");
    sites.backup(&carol, &tree);

    sites.account_a.restart();
    sites.wait_roles(&[("account-a", "slave"), ("account-b", "master")]);
    // It caught up with everything written while it was gone.
    wait_for("account-a to hold the same state as account-b", LONG, || {
        let a = sites.ctl_json(&["servers", "status", &sites.account_a.addr]);
        let b = sites.ctl_json(&["servers", "status", &sites.account_b.addr]);
        (a["state_hash"] == b["state_hash"] && a["accounts"] == 2).then_some(())
    });
    for (snapshot, n) in [(&first, 0), (&second, 1)] {
        let target = sites.restore(&sites.token, snapshot, &format!("restored-{n}"));
        assert_same_tree(
            &sites.path(&format!("trees/src-{n}")),
            &target.join(format!("src-{n}")),
        );
    }
}

#[test]
fn a_stopped_primary_is_fenced_when_it_wakes_and_rejoins_as_replica() {
    let sites = TwoSites::start(Options::default());
    let tree = source_tree(&sites.path("trees"), 0);
    sites.backup(&sites.token, &tree);
    let primaries_seen = Arc::new(Mutex::new(0usize));
    let watching = Arc::new(AtomicBool::new(true));
    std::thread::scope(|s| {
        // Watch the whole time: never two healthy primaries.
        s.spawn(|| {
            while watching.load(Ordering::SeqCst) {
                let out = sites.ctl(&["status", "--json"]);
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                    let n = v["servers"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|s| s["role"] == "primary" && s["healthy"] == true)
                        .count();
                    let mut max = primaries_seen.lock().unwrap();
                    *max = (*max).max(n);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        sites.storage_a.signal(libc::SIGSTOP);
        sites.wait_roles(&[("storage-a", "down"), ("storage-b", "primary")]);
        sites.backup(&sites.token, &source_tree(&sites.path("trees"), 1));
        sites.storage_a.signal(libc::SIGCONT);
        // Straight to the old primary: refused, whether it is still
        // fenced or already demoted.
        let out = sites.duplex(
            &sites.token,
            &[
                "--storage",
                &sites.storage_a.addr,
                "backup",
                tree.to_str().unwrap(),
            ],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "the old primary took a backup");
        assert!(err.contains("fenced") || err.contains("replica"), "{err}");
        sites.wait_roles(&[("storage-a", "replica"), ("storage-b", "primary")]);
        watching.store(false, Ordering::SeqCst);
    });
    assert_eq!(
        *primaries_seen.lock().unwrap(),
        1,
        "two primaries were seen at once"
    );
}

fn unix_ms(rfc3339: &str) -> u128 {
    humantime::parse_rfc3339(rfc3339)
        .unwrap()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

#[test]
fn a_primary_cut_off_from_the_coordinator_stops_writing_before_the_replica_is_promoted() {
    let sites = TwoSites::start(Options {
        proxy_storage_a: true,
        ..Default::default()
    });
    let tree = source_tree(&sites.path("trees"), 0);
    sites.backup(&sites.token, &tree);
    let direct = |t: &Path| {
        sites.duplex(
            &sites.token,
            &["--storage", &sites.storage_a.addr, "backup", t.to_str().unwrap()],
        )
    };
    assert!(direct(&tree).status.success());
    // Agents still reach storage-a; only the coordinator cannot.
    sites.proxy.as_ref().unwrap().set(Fault::Partition);
    let mut last_ok = now_ms();
    let mut i = 1;
    let refusal = wait_for("storage-a to refuse writes", LONG, || {
        let out = direct(&source_tree(&sites.path("trees"), i));
        i += 1;
        if out.status.success() {
            last_ok = now_ms();
            return None;
        }
        Some(String::from_utf8_lossy(&out.stderr).to_string())
    });
    assert!(refusal.contains("fenced"), "{refusal}");
    sites.wait_roles(&[("storage-b", "primary")]);
    let failover = last_event(&sites.history(), "failover").clone();
    let promoted = failover["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "promote-storage")
        .unwrap()["started"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        last_ok < unix_ms(&promoted),
        "storage-a acknowledged a write at {last_ok} ms, after storage-b's promotion began ({promoted})"
    );
    // Backups through the coordinator go on, on storage-b.
    sites.backup(&sites.token, &source_tree(&sites.path("trees"), 100));
    sites.proxy.as_ref().unwrap().set(Fault::Pass);
    sites.wait_roles(&[("storage-a", "replica"), ("storage-b", "primary")]);
}

#[test]
fn site_a_lost_and_failed_back_keeps_every_snapshot() {
    let mut sites = TwoSites::start(Options::default());
    let trees = sites.path("trees");
    let before = sites.backup(&sites.token, &source_tree(&trees, 0));
    sites.storage_a.signal(libc::SIGKILL);
    sites.account_a.signal(libc::SIGKILL);
    sites.wait_roles(&[("account-b", "master"), ("storage-b", "primary")]);
    let during = sites.backup(&sites.token, &source_tree(&trees, 1));
    assert_eq!(
        sites.status()["moved_homes"],
        serde_json::json!({"storage-a": "storage-b"})
    );
    sites.account_a.restart();
    sites.storage_a.restart();
    sites.wait_roles(&[("account-a", "slave"), ("storage-a", "replica")]);
    let out = sites.ctl(&["failback", "--verify", "--wait"]);
    assert!(
        out.status.success(),
        "failback: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = sites.wait_roles(&[
        ("account-a", "master"),
        ("account-b", "slave"),
        ("storage-a", "primary"),
        ("storage-b", "replica"),
    ]);
    assert_eq!(status["phase"], "steady");
    assert_eq!(status["moved_homes"], serde_json::json!({}));
    let after = sites.backup(&sites.token, &source_tree(&trees, 2));
    for (n, snapshot) in [&before, &during, &after].into_iter().enumerate() {
        let target = sites.restore(&sites.token, snapshot, &format!("restored-{n}"));
        assert_same_tree(&trees.join(format!("src-{n}")), &target.join(format!("src-{n}")));
    }
    // The snapshot taken on site b while a was away is on storage-a itself.
    let out = sites.duplex(
        &sites.token,
        &["--storage", &sites.storage_a.addr, "snapshots", "--json"],
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(listed.to_string().contains(during.as_str()), "{listed}");
    let events = sites.history();
    let failover = last_event(&events, "failover");
    let failback = last_event(&events, "failback");
    assert_eq!(
        (failover["state"].as_str(), failback["state"].as_str()),
        (Some("done"), Some("done"))
    );
    assert_eq!(phase_names(failback), duplex_tests::phases::FAILBACK);
    assert!(
        failback["detail"]
            .as_str()
            .unwrap()
            .contains("integrity check: 1 accounts, 2 snapshots intact"),
        "{failback}"
    );
    for event in [failover, failback] {
        for phase in event["phases"].as_array().unwrap() {
            assert!(phase["finished"].is_string(), "unfinished phase in {event}");
        }
    }
    let groups = sites.ctl_json(&["groups", "list"]);
    assert!(
        groups.to_string().contains("true"),
        "groups left disabled: {groups}"
    );
    assert!(sites.ctl_json(&["verify"])["ok"].as_bool().unwrap());
}

#[test]
fn active_active_loss_of_a_site_moves_its_accounts_with_their_data() {
    let sites = TwoSites::start(Options {
        mode: "active-active",
        ..Default::default()
    });
    let alice = sites.create_account("alice", None, Some("storage-a"));
    let bob = sites.create_account("bob", None, Some("storage-b"));
    let trees = sites.path("trees");
    let alice_before = sites.backup(&alice, &source_tree(&trees, 0));
    let bob_before = sites.backup(&bob, &source_tree(&trees, 1));
    sites.storage_a.signal(libc::SIGKILL);
    sites.wait_roles(&[("storage-a", "down"), ("storage-b", "primary")]);
    wait_for("alice to move to storage-b", LONG, || {
        (sites.home_of("alice") == "storage-b").then_some(())
    });
    let bob_home = sites.home_of("bob");
    assert_eq!(bob_home, "storage-b");
    let alice_after = sites.backup(&alice, &source_tree(&trees, 2));
    sites.backup(&bob, &source_tree(&trees, 3));
    for (token, snapshot, n) in [
        (&alice, &alice_before, 0),
        (&bob, &bob_before, 1),
        (&alice, &alice_after, 2),
    ] {
        let target = sites.restore(token, snapshot, &format!("restored-{n}"));
        assert_same_tree(&trees.join(format!("src-{n}")), &target.join(format!("src-{n}")));
    }
}

#[test]
fn a_blip_shorter_than_the_timeout_changes_nothing() {
    let sites = TwoSites::start(Options::default());
    let epoch = sites.status()["epoch"].as_u64().unwrap();
    let stopped = Instant::now();
    sites.storage_a.signal(libc::SIGSTOP);
    wait_for("a third of the failover timeout", LONG, || {
        (stopped.elapsed() >= Duration::from_millis(500)).then_some(())
    });
    sites.storage_a.signal(libc::SIGCONT);
    // Watch past twice the timeout: storage-a stays primary throughout.
    while stopped.elapsed() < Duration::from_secs(3) {
        let status = sites.status();
        assert_eq!(role_in(&status, "storage-b"), "replica", "{status}");
        assert_eq!(status["epoch"].as_u64().unwrap(), epoch, "{status}");
    }
    sites.backup(&sites.token, &source_tree(&sites.path("trees"), 0));
    assert!(
        sites.history().iter().all(|e| e["kind"] != "failover"),
        "a blip caused a failover"
    );
}

#[test]
fn a_recovered_storage_server_is_resynced_only_when_asked() {
    let mut sites = TwoSites::start(Options::default());
    let trees = sites.path("trees");
    sites.backup(&sites.token, &source_tree(&trees, 0));
    sites.storage_a.signal(libc::SIGKILL);
    sites.wait_roles(&[("storage-b", "primary")]);
    let during = sites.backup(&sites.token, &source_tree(&trees, 1));
    sites.storage_a.restart();
    sites.wait_roles(&[("storage-a", "replica")]);
    let on_a = || {
        let out = sites.duplex(
            &sites.token,
            &["--storage", &sites.storage_a.addr, "snapshots", "--json"],
        );
        String::from_utf8_lossy(&out.stdout).contains(during.as_str())
    };
    // Held: no link runs into storage-a, so the new snapshot is not there.
    let links = sites.ctl_json(&["mirror", "status", &sites.mirror_a.addr]);
    assert_eq!(links["links"].as_array().map_or(0, Vec::len), 0, "{links}");
    assert!(!on_a(), "mirrored into storage-a before any resync");
    let out = sites.ctl(&["resync", "--rate", "50000000", "--wait"]);
    assert!(
        out.status.success(),
        "resync: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // --wait returned once storage-a caught up, not when the links were set.
    assert!(on_a(), "resync --wait returned before storage-a caught up");
    let status = sites.status();
    assert_eq!(lag_in(&status, "storage-a").unwrap()["bytes"], 0, "{status}");
    let links = sites.ctl_json(&["mirror", "status", &sites.mirror_a.addr]);
    assert_eq!(links["links"][0]["rate"], 50_000_000, "{links}");
    assert_eq!(last_event(&sites.history(), "resync")["state"], "done");
}

#[test]
fn a_failover_that_would_lose_too_much_is_refused_unless_forced() {
    let mut sites = TwoSites::start(Options {
        coordinator: &["--max-lag-on-failover", "1s"],
        ..Default::default()
    });
    let trees = sites.path("trees");
    sites.backup(&sites.token, &source_tree(&trees, 0));
    // No mirror: storage-a's writes pile up unmirrored.
    sites.mirror_b.kill();
    sites.backup(&sites.token, &source_tree(&trees, 1));
    wait_for("storage-a's mirror lag to pass 1 s", LONG, || {
        let v = sites.status();
        let lag = v["servers"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == "storage-b")?["lag"]["seconds"]
            .as_f64()?;
        (lag > 1.5).then_some(())
    });
    sites.storage_a.signal(libc::SIGKILL);
    let refused = wait_for("the refusal in history", LONG, || {
        sites
            .history()
            .into_iter()
            .find(|e| e["kind"] == "failover-refused")
    });
    assert!(
        refused["detail"]
            .as_str()
            .unwrap()
            .contains("max_lag_on_failover"),
        "{refused}"
    );
    assert_eq!(sites.role("storage-b"), "replica");
    let out = sites.ctl(&["failover", "--site", "a", "--force", "--wait"]);
    assert!(
        out.status.success(),
        "forced failover: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    sites.wait_roles(&[("storage-b", "primary")]);
    let forced = last_event(&sites.history(), "failover").clone();
    assert_eq!(
        (forced["forced"].as_bool(), forced["automatic"].as_bool()),
        (Some(true), Some(false))
    );
}
