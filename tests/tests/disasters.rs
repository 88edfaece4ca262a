//! Compound faults with real processes: a whole site lost at once (in
//! both kill orders and both modes), a takeover refused for want of a
//! standby and then made by itself, a failover of one kind of role, a
//! failback cancelled where it waits, a lost site rebuilt under new names
//! and failed back to, a coordinator killed in every phase of a
//! site-loss failover, and account writes a failover lost reported in
//! history and re-applied. Every acknowledged backup must restore bit for
//! bit.
//!
//! The last test needs `duplex-coordinator-failpoints`
//! (`cargo build --release --bins --features duplex-coordinator/failpoints`).

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use duplex_tests::phases::FAILOVER;
use duplex_tests::tree::{assert_same_tree, random_bytes};
use duplex_tests::twosite::{Options, TwoSites, lag_in, role_in};
use duplex_tests::wait_for;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);

/// The roles a fresh active-passive platform has, and a failback restores.
const STEADY: [(&str, &str); 4] = [
    ("account-a", "master"),
    ("account-b", "slave"),
    ("storage-a", "primary"),
    ("storage-b", "replica"),
];

/// The roles after site a was failed over (its servers up again).
const FAILED_OVER: [(&str, &str); 4] = [
    ("account-a", "slave"),
    ("account-b", "master"),
    ("storage-a", "replica"),
    ("storage-b", "primary"),
];

/// The second holder of a site dies this long after the first: a site
/// going down rack by rack. This is the shape of the fault, not a wait
/// for a condition.
const BETWEEN_KILLS: Duration = Duration::from_millis(300);

/// An acknowledged backup: whose it is, its snapshot, the tree it holds.
#[derive(Clone, Debug)]
struct Acked {
    token: String,
    snapshot: String,
    tree: PathBuf,
}

/// Source trees are numbered across the whole test binary, so no two
/// backups in one test dir share one.
static NEXT_TREE: AtomicU64 = AtomicU64::new(0);

/// A fresh source tree: a file every tree shares (dedup across the
/// faults) and a file of its own.
fn source_tree(sites: &TwoSites) -> PathBuf {
    let i = NEXT_TREE.fetch_add(1, Ordering::SeqCst);
    let dir = sites.path(&format!("trees/src-{i}"));
    std::fs::create_dir_all(dir.join("sub")).expect("create a source tree");
    std::fs::write(dir.join("shared.bin"), random_bytes(7, 300_000)).expect("write shared.bin");
    std::fs::write(
        dir.join("sub/own.bin"),
        random_bytes(1000 + i, 50_000 + (i as usize % 64) * 1000),
    )
    .expect("write own.bin");
    dir
}

/// Backs up a fresh tree as `token`, asserting success.
fn backup(sites: &TwoSites, token: &str) -> Acked {
    let tree = source_tree(sites);
    Acked {
        token: token.to_owned(),
        snapshot: sites.backup(token, &tree),
        tree,
    }
}

/// Backs up fresh trees one after another until `stop`; every attempt
/// must succeed (the agent rides out failovers by itself).
fn backup_loop(sites: &TwoSites, token: &str, acked: &Mutex<Vec<Acked>>, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        let done = backup(sites, token);
        acked.lock().expect("acked list").push(done);
    }
}

fn count(acked: &Mutex<Vec<Acked>>) -> usize {
    acked.lock().expect("acked list").len()
}

/// Restores every snapshot into a fresh directory and compares it with
/// its source bit for bit: through discovery, or straight from `storage`.
fn assert_all_restore(sites: &TwoSites, acked: &[Acked], storage: Option<&str>, label: &str) {
    for (n, a) in acked.iter().enumerate() {
        let target = sites.path(&format!("restored-{label}-{n}"));
        let target_arg = target.to_str().expect("utf-8 test dir");
        let mut args: Vec<&str> = Vec::new();
        if let Some(addr) = storage {
            args.extend(["--storage", addr]);
        }
        args.extend(["restore", a.snapshot.as_str(), "--target", target_arg]);
        let out = sites.duplex(&a.token, &args);
        assert!(
            out.status.success(),
            "restore of {} ({label}) failed: {}",
            a.snapshot,
            String::from_utf8_lossy(&out.stderr)
        );
        let name = a.tree.file_name().expect("tree has a name");
        assert_same_tree(&a.tree, &target.join(name));
    }
}

fn phase_names(event: &Value) -> Vec<String> {
    event["phases"]
        .as_array()
        .expect("phases array")
        .iter()
        .map(|p| p["name"].as_str().expect("phase name").to_owned())
        .collect()
}

fn detail(event: &Value) -> &str {
    event["detail"].as_str().expect("detail string")
}

/// Waits until history holds `n` operations of `kind` and the last has
/// ended; that one.
fn wait_finished(sites: &TwoSites, kind: &str, n: usize) -> Value {
    wait_for(&format!("{kind} number {n} to end"), LONG, || {
        let events = sites.events(kind);
        let last = events.last()?;
        (events.len() >= n && last["state"] != "running").then(|| last.clone())
    })
}

/// Snapshot ids listed by one storage server itself.
fn listed_on(sites: &TwoSites, token: &str, addr: &str) -> String {
    let out = sites.duplex(token, &["--storage", addr, "snapshots", "--json"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every group, with whether it is enabled.
fn groups(sites: &TwoSites) -> Vec<(String, bool)> {
    sites.ctl_json(&["groups", "list"])["groups"]
        .as_array()
        .expect("groups array")
        .iter()
        .map(|g| {
            (
                g["name"].as_str().expect("group name").to_owned(),
                g["enabled"].as_bool().expect("enabled flag"),
            )
        })
        .collect()
}

fn names(status: &Value) -> Vec<String> {
    status["servers"]
        .as_array()
        .expect("servers array")
        .iter()
        .map(|s| s["name"].as_str().expect("server name").to_owned())
        .collect()
}

#[derive(Clone, Copy, Debug)]
enum First {
    Account,
    Storage,
}

/// SIGKILLs site a's account master and storage primary (and then its
/// mirror: the whole site) while `token` backs up without pause; returns
/// once the agent has had three more backups acknowledged.
fn lose_site_a_under_backups(sites: &TwoSites, token: &str, first: First) -> Vec<Acked> {
    let acked = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let looping = s.spawn(|| backup_loop(sites, token, &acked, &stop));
        wait_for("two backups before the site is lost", LONG, || {
            (count(&acked) >= 2).then_some(())
        });
        // The guard refuses a standby whose lag it does not know.
        sites.wait_lag_known("storage-b", u64::MAX);
        let before = count(&acked);
        let (one, two) = match first {
            First::Account => (&sites.account_a, &sites.storage_a),
            First::Storage => (&sites.storage_a, &sites.account_a),
        };
        one.signal(libc::SIGKILL);
        std::thread::sleep(BETWEEN_KILLS);
        two.signal(libc::SIGKILL);
        sites.mirror_a.signal(libc::SIGKILL);
        wait_for("three backups after the site is lost", LONG, || {
            (count(&acked) >= before + 3).then_some(())
        });
        stop.store(true, Ordering::SeqCst);
        looping.join().expect("the backup loop panicked");
    });
    acked.into_inner().expect("acked list")
}

/// The one automatic failover a whole-site loss must be: done, moving
/// the account master and the storage primary in one operation.
fn assert_one_failover_moved_both(sites: &TwoSites) {
    let failover = wait_finished(sites, "failover", 1);
    let failovers = sites.events("failover");
    assert_eq!(failovers.len(), 1, "a lost site is one failover: {failovers:#?}");
    assert_eq!(failover["state"], "done", "{failover}");
    assert_eq!(failover["automatic"], true, "{failover}");
    assert_eq!(phase_names(&failover), FAILOVER, "{failover}");
    let d = detail(&failover);
    assert!(
        d.contains("account-a") && d.contains("storage-a"),
        "the failover names both lost holders: {failover}"
    );
    let refused = sites.events("failover-refused");
    assert!(refused.is_empty(), "nothing was refused: {refused:#?}");
}

#[test]
fn losing_site_a_storage_first_is_one_failover_of_both_kinds_active_passive() {
    let sites = TwoSites::start(Options::default());
    let acked = lose_site_a_under_backups(&sites, &sites.token, First::Storage);
    let status = sites.wait_roles(&[
        ("account-a", "down"),
        ("storage-a", "down"),
        ("account-b", "master"),
        ("storage-b", "primary"),
    ]);
    assert_eq!(
        status["moved_homes"],
        json!({"storage-a": "storage-b"}),
        "{status}"
    );
    assert_eq!(sites.home_of("demo"), "storage-b");
    assert_one_failover_moved_both(&sites);
    assert_all_restore(&sites, &acked, None, "ap");
}

#[test]
fn losing_site_a_account_first_is_one_failover_of_both_kinds_active_active() {
    let sites = TwoSites::start(Options {
        mode: "active-active",
        ..Default::default()
    });
    let alice = sites.create_account("alice", None, Some("storage-a"));
    let bob = sites.create_account("bob", None, Some("storage-b"));
    let mut acked = vec![backup(&sites, &bob)];
    // In active-active both sites are primary: storage-b mirrors
    // storage-a and takes its accounts over.
    acked.extend(lose_site_a_under_backups(&sites, &alice, First::Account));
    let status = sites.wait_roles(&[
        ("account-a", "down"),
        ("storage-a", "down"),
        ("account-b", "master"),
        ("storage-b", "primary"),
    ]);
    assert_eq!(
        status["moved_homes"],
        json!({"storage-a": "storage-b"}),
        "{status}"
    );
    assert_eq!(sites.home_of("alice"), "storage-b");
    assert_eq!(sites.home_of("bob"), "storage-b");
    assert_one_failover_moved_both(&sites);
    acked.push(backup(&sites, &bob));
    assert_all_restore(&sites, &acked, None, "aa");
}

#[test]
fn a_takeover_refused_for_want_of_a_standby_happens_by_itself_once_there_is_one() {
    let sites = TwoSites::start(Options::default());
    let mut acked = vec![backup(&sites, &sites.token)];
    // The only standby is stopped, then the master dies; nothing is
    // written in between, so nothing can be lost.
    sites.account_b.signal(libc::SIGSTOP);
    sites.wait_roles(&[("account-b", "down")]);
    sites.account_a.signal(libc::SIGKILL);
    let refused = wait_for("the refusal in history", LONG, || {
        sites.events("failover-refused").into_iter().next()
    });
    assert!(detail(&refused).contains("account-a"), "{refused}");
    // While there is no standby, nothing moves and nothing is promoted.
    let since = Instant::now();
    while since.elapsed() < Duration::from_secs(1) {
        let status = sites.status();
        assert_eq!(status["phase"], "steady", "{status}");
        assert_eq!(role_in(&status, "account-b"), "down", "{status}");
    }
    assert!(
        sites.events("failover").is_empty(),
        "a failover started without a standby"
    );

    sites.account_b.signal(libc::SIGCONT);
    let status = sites.wait_roles(&[
        ("account-a", "down"),
        ("account-b", "master"),
        ("storage-a", "primary"),
    ]);
    let failover = wait_finished(&sites, "failover", 1);
    assert_eq!(failover["state"], "done", "{failover}");
    assert_eq!(failover["automatic"], true, "{failover}");
    assert!(
        detail(&failover).contains("retried by itself once it became safe"),
        "{failover}"
    );
    let refusals = sites.events("failover-refused");
    assert_eq!(refusals.len(), 1, "one refusal recorded once: {refusals:#?}");
    // Only the account master moved.
    assert_eq!(status["moved_homes"], json!({}), "{status}");
    // The token account-a issued logs in on account-b, and account-b takes
    // new accounts.
    acked.push(backup(&sites, &sites.token));
    let carol = sites.create_account("carol", None, None);
    acked.push(backup(&sites, &carol));
    assert_all_restore(&sites, &acked, None, "refused");
}

#[test]
fn a_failover_of_one_kind_moves_only_that_kind() {
    let sites = TwoSites::start(Options::default());
    let acked = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let looping = s.spawn(|| backup_loop(&sites, &sites.token, &acked, &stop));
        wait_for("two backups before the failover", LONG, || {
            (count(&acked) >= 2).then_some(())
        });
        sites.wait_lag_known("storage-b", u64::MAX);
        sites.ctl_ok(&["failover", "--kind", "storage", "--wait"]);
        let after = count(&acked);
        wait_for("two backups after the failover", LONG, || {
            (count(&acked) >= after + 2).then_some(())
        });
        stop.store(true, Ordering::SeqCst);
        looping.join().expect("the backup loop panicked");
    });
    let mut acked = acked.into_inner().expect("acked list");
    let status = sites.wait_roles(&[
        ("account-a", "master"),
        ("account-b", "slave"),
        ("storage-a", "replica"),
        ("storage-b", "primary"),
    ]);
    assert_eq!(
        status["moved_homes"],
        json!({"storage-a": "storage-b"}),
        "{status}"
    );
    assert_eq!(sites.home_of("demo"), "storage-b");
    let failover = wait_finished(&sites, "failover", 1);
    assert_eq!(failover["state"], "done", "{failover}");
    assert_eq!(failover["automatic"], false, "{failover}");
    assert!(detail(&failover).contains("storage only"), "{failover}");
    assert_eq!(phase_names(&failover), FAILOVER, "{failover}");
    // The backups after the failover were taken by storage-b itself.
    let last = acked.last().expect("backups were taken").snapshot.clone();
    let on_b = listed_on(&sites, &sites.token, &sites.storage_b.addr);
    assert!(on_b.contains(&last), "{last} is not on storage-b: {on_b}");
    assert_all_restore(&sites, &acked, None, "storage-only");

    // And the other kind: only the account master moves.
    sites.ctl_ok(&["failover", "--kind", "account", "--wait"]);
    let status = sites.wait_roles(&[
        ("account-a", "slave"),
        ("account-b", "master"),
        ("storage-a", "replica"),
        ("storage-b", "primary"),
    ]);
    assert_eq!(
        status["moved_homes"],
        json!({"storage-a": "storage-b"}),
        "{status}"
    );
    let failover = wait_finished(&sites, "failover", 2);
    assert_eq!(failover["state"], "done", "{failover}");
    assert!(detail(&failover).contains("account only"), "{failover}");
    acked.push(backup(&sites, &sites.token));
    assert_all_restore(&sites, &acked[acked.len() - 1..], None, "account-only");
}

#[test]
fn a_failback_waiting_for_servers_can_be_cancelled_and_undoes_what_it_changed() {
    let mut sites = TwoSites::start(Options::default());
    let mut acked = vec![backup(&sites, &sites.token)];
    sites.wait_lag_known("storage-b", 0);
    sites.storage_a.signal(libc::SIGKILL);
    sites.account_a.signal(libc::SIGKILL);
    sites.wait_roles(&[("account-b", "master"), ("storage-b", "primary")]);
    assert_eq!(wait_finished(&sites, "failover", 1)["state"], "done");
    acked.push(backup(&sites, &sites.token));

    // 1. A failback that waits in rejoin for storage-a, which is down.
    sites.account_a.restart();
    sites.wait_roles(&[("account-a", "slave")]);
    sites.ctl_ok(&["failback"]);
    wait_for("the failback to wait in rejoin", LONG, || {
        (sites.status()["phase"] == "failback:rejoin").then_some(())
    });
    // While it waits, nothing else can start...
    let out = sites.ctl(&["failover", "--site", "b"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "a second operation started beside the failback"
    );
    assert!(err.contains("already running") && err.contains("cancel"), "{err}");
    // ...until it is cancelled.
    let cancelled: Value = serde_json::from_str(&sites.ctl_ok(&["cancel", "--wait", "--json"]))
        .expect("cancel --json prints the operation");
    assert_eq!(cancelled["kind"], "failback", "{cancelled}");
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    let failback = wait_finished(&sites, "failback", 1);
    assert_eq!(failback["state"], "cancelled", "{failback}");
    let status = sites.wait_roles(&[
        ("account-a", "slave"),
        ("account-b", "master"),
        ("storage-a", "down"),
        ("storage-b", "primary"),
    ]);
    assert_eq!(status["phase"], "steady", "{status}");
    // storage-a lacks what was written since it died: it stays held.
    assert_eq!(status["held"], json!(["storage-a"]), "{status}");
    assert!(groups(&sites).iter().all(|(_, on)| *on), "{:?}", groups(&sites));
    acked.push(backup(&sites, &sites.token));

    // 2. A failback cancelled in drain, after it disabled the groups of
    // the accounts moving back: storage-a is back and resynced, but its
    // mirror is stopped, so it can never catch up with the last backup.
    sites.storage_a.restart();
    let status = sites.wait_roles(&[("storage-a", "replica")]);
    assert_eq!(status["held"], json!(["storage-a"]), "comes back held: {status}");
    sites.ctl_ok(&["resync", "--wait"]);
    sites.wait_lag_known("storage-a", 0);
    sites.mirror_a.signal(libc::SIGSTOP);
    acked.push(backup(&sites, &sites.token));
    wait_for("storage-a to fall behind", LONG, || {
        let lag = lag_in(&sites.status(), "storage-a")?;
        (lag["records"].as_u64()? > 0).then_some(())
    });
    sites.ctl_ok(&["failback"]);
    wait_for("the failback to wait in drain", LONG, || {
        (sites.status()["phase"] == "failback:drain").then_some(())
    });
    let blocked = groups(&sites);
    assert!(
        blocked.iter().any(|(_, on)| !*on),
        "the failback disabled no group: {blocked:?}"
    );
    let cancelled: Value = serde_json::from_str(&sites.ctl_ok(&["cancel", "--wait", "--json"]))
        .expect("cancel --json prints the operation");
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    wait_for("every group enabled again", LONG, || {
        groups(&sites).iter().all(|(_, on)| *on).then_some(())
    });
    // The holders it fenced hold their leases again, and nothing stays
    // held or waiting.
    sites.wait_roles(&[("account-b", "master"), ("storage-b", "primary")]);
    let status = wait_for("no warning left", LONG, || {
        let status = sites.status();
        (status["warnings"] == json!([])).then_some(status)
    });
    assert_eq!(status["held"], json!([]), "{status}");
    assert_eq!(status["phase"], "steady", "{status}");
    acked.push(backup(&sites, &sites.token));

    // 3. With the mirror back, a new failback goes all the way.
    sites.mirror_a.signal(libc::SIGCONT);
    sites.ctl_ok(&["failback", "--wait"]);
    let status = sites.wait_roles(&STEADY);
    assert_eq!(status["held"], json!([]), "{status}");
    assert_eq!(status["warnings"], json!([]), "{status}");
    assert_eq!(status["moved_homes"], json!({}), "{status}");
    let states: Vec<Value> = sites
        .events("failback")
        .iter()
        .map(|e| e["state"].clone())
        .collect();
    assert_eq!(states, [json!("cancelled"), json!("cancelled"), json!("done")]);
    assert!(groups(&sites).iter().all(|(_, on)| *on), "{:?}", groups(&sites));
    acked.push(backup(&sites, &sites.token));
    assert_all_restore(&sites, &acked, None, "cancel");
}

#[test]
fn a_lost_site_rebuilt_under_new_names_takes_its_roles_and_accounts_back() {
    let sites = TwoSites::start(Options::default());
    let mut acked = vec![backup(&sites, &sites.token)];
    sites.wait_lag_known("storage-b", 0);
    sites.account_a.signal(libc::SIGKILL);
    sites.storage_a.signal(libc::SIGKILL);
    sites.wait_roles(&[
        ("account-a", "down"),
        ("storage-a", "down"),
        ("account-b", "master"),
        ("storage-b", "primary"),
    ]);
    assert_eq!(wait_finished(&sites, "failover", 1)["state"], "done");
    acked.push(backup(&sites, &sites.token));

    // A server that is up cannot be removed.
    let out = sites.ctl(&["servers", "remove", "account-b"]);
    assert!(!out.status.success(), "removed a running master");
    sites.ctl_ok(&["servers", "remove", "account-a"]);
    sites.ctl_ok(&["servers", "remove", "storage-a"]);
    let status = sites.status();
    let listed = names(&status);
    assert!(
        !listed.iter().any(|n| n == "account-a" || n == "storage-a"),
        "removed servers still listed: {status}"
    );
    let removed = sites.events("server-removed");
    assert_eq!(removed.len(), 2, "{removed:#?}");
    assert!(
        removed.iter().all(|e| detail(e).contains("inherits")),
        "{removed:#?}"
    );

    // Site a rebuilt: new names, new data dirs, new enrollment tokens.
    let account_a2 = sites.start_server(
        "account-a2",
        "a",
        "duplex-account-server",
        &["--master", &sites.account_b.addr, "--replication", "sync"],
    );
    let accounts = format!("{},{}", account_a2.addr, sites.account_b.addr);
    let storage_a2 = sites.start_server(
        "storage-a2",
        "a",
        "duplex-storage-server",
        &[
            "--account-servers",
            &accounts,
            "--role",
            "replica",
            "--mirroring",
            "sync",
        ],
    );
    let status = sites.wait_roles(&[("account-a2", "slave"), ("storage-a2", "replica")]);
    assert_eq!(status["held"], json!(["storage-a2"]), "joins held: {status}");

    sites.ctl_ok(&["failback", "--wait"]);
    let status = sites.wait_roles(&[
        ("account-a2", "master"),
        ("account-b", "slave"),
        ("storage-a2", "primary"),
        ("storage-b", "replica"),
    ]);
    assert_eq!(status["moved_homes"], json!({}), "{status}");
    assert_eq!(status["held"], json!([]), "{status}");
    assert_eq!(sites.home_of("demo"), "storage-a2");
    let failback = wait_finished(&sites, "failback", 1);
    assert_eq!(failback["state"], "done", "{failback}");
    acked.push(backup(&sites, &sites.token));
    // Everything, from before the loss to after the failback, is on the
    // new site itself, bit for bit.
    assert_all_restore(&sites, &acked, Some(&storage_a2.addr), "rebuilt");
    assert_all_restore(&sites, &acked, None, "discovered");
}

#[test]
fn a_coordinator_killed_in_any_phase_of_a_site_loss_failover_finishes_it_after_a_restart() {
    let mut sites = TwoSites::start(Options {
        coordinator_bin: "duplex-coordinator-failpoints",
        failpoint: Some("failover:fence"),
        ..Default::default()
    });
    let mut acked = Vec::new();
    for (i, phase) in FAILOVER.iter().enumerate() {
        if i > 0 {
            sites.restart_coordinator(Some(&format!("failover:{phase}")));
        }
        sites.wait_roles(&STEADY);
        acked.push(backup(&sites, &sites.token));
        sites.wait_lag_known("storage-b", 0);
        let (one, two) = if i % 2 == 0 {
            (&sites.storage_a, &sites.account_a)
        } else {
            (&sites.account_a, &sites.storage_a)
        };
        one.signal(libc::SIGKILL);
        std::thread::sleep(BETWEEN_KILLS);
        two.signal(libc::SIGKILL);
        wait_for(
            &format!("the coordinator to die at failover:{phase}"),
            LONG,
            || (!sites.coordinator.is_running()).then_some(()),
        );
        sites.restart_coordinator(None);
        let op = wait_finished(&sites, "failover", i + 1);
        assert_eq!(op["state"], "done", "interrupted at {phase}: {op}");
        assert_eq!(phase_names(&op), FAILOVER, "interrupted at {phase}: {op}");
        let phases = op["phases"].as_array().expect("phases array");
        assert!(phases.iter().all(|p| p["finished"].is_string()), "{op}");
        let d = detail(&op);
        assert!(d.contains("account-a") && d.contains("storage-a"), "{op}");
        let status = sites.wait_roles(&[("account-b", "master"), ("storage-b", "primary")]);
        assert_eq!(
            status["moved_homes"],
            json!({"storage-a": "storage-b"}),
            "{status}"
        );
        acked.push(backup(&sites, &sites.token));

        sites.account_a.restart();
        sites.storage_a.restart();
        sites.wait_roles(&FAILED_OVER);
        sites.ctl_ok(&["failback", "--wait"]);
    }
    sites.wait_roles(&STEADY);
    let failovers = sites.events("failover");
    assert_eq!(
        failovers.len(),
        FAILOVER.len(),
        "one failover per lost site: {failovers:#?}"
    );
    assert!(sites.events("failover-refused").is_empty());
    assert_all_restore(&sites, &acked, None, "resumed");
}

#[test]
fn after_a_manual_failover_and_failback_nothing_is_held_and_mirroring_runs_again() {
    let sites = TwoSites::start(Options::default());
    let mut acked = vec![backup(&sites, &sites.token)];
    sites.wait_lag_known("storage-b", 0);
    sites.ctl_ok(&["failover", "--site", "a", "--wait"]);
    sites.wait_roles(&FAILED_OVER);
    acked.push(backup(&sites, &sites.token));
    sites.ctl_ok(&["failback", "--wait"]);
    let status = sites.wait_roles(&STEADY);
    assert_eq!(status["phase"], "steady", "{status}");
    assert_eq!(status["held"], json!([]), "{status}");
    assert_eq!(status["warnings"], json!([]), "{status}");
    assert_eq!(status["moved_homes"], json!({}), "{status}");
    let events = sites.history();
    let states: Vec<(Value, Value)> = events
        .iter()
        .filter(|e| e["kind"] == "failover" || e["kind"] == "failback")
        .map(|e| (e["kind"].clone(), e["state"].clone()))
        .collect();
    assert_eq!(
        states,
        [
            (json!("failover"), json!("done")),
            (json!("failback"), json!("done"))
        ],
        "{events:#?}"
    );

    // A backup after the failback reaches storage-b again.
    acked.push(backup(&sites, &sites.token));
    let last = acked.last().expect("backups were taken").snapshot.clone();
    wait_for("the new backup to be mirrored to storage-b", LONG, || {
        listed_on(&sites, &sites.token, &sites.storage_b.addr)
            .contains(&last)
            .then_some(())
    });
    sites.wait_lag_known("storage-b", 0);
    assert_all_restore(&sites, &acked, Some(&sites.storage_b.addr), "on-b");
}

/// An account created while sync replication had degraded (the slave
/// down) is acknowledged by the master alone; the automatic failover
/// that follows the master's death loses it. That may be within
/// `max_lag_on_failover`, but it must not be silent: history (and so the
/// webhook) names the report, and the report can be re-applied, after
/// which the account works with its old token.
#[test]
fn account_writes_lost_by_a_failover_are_reported_and_can_be_reapplied() {
    let mut sites = TwoSites::start(Options::default());
    // A stopped slave would still read what was sent to it once resumed:
    // the slave must be gone, and come back after the master died.
    sites.account_b.signal(libc::SIGKILL);
    sites.wait_roles(&[("account-b", "down")]);
    let lost = sites.create_account("lost-while-degraded", None, None);
    sites.account_a.signal(libc::SIGKILL);
    sites.account_b.restart();
    sites.wait_roles(&[("account-b", "master")]);
    let login = sites.duplex(&lost, &["snapshots", "--json", "--retry-for", "1s"]);
    assert!(
        !login.status.success(),
        "the lost account still logs in: nothing was lost, so this test proves nothing"
    );

    sites.account_a.restart();
    sites.wait_roles(&[("account-a", "slave")]);
    let event = wait_for("the divergence event", LONG, || {
        sites.events("divergence").into_iter().next()
    });
    let text = detail(&event).to_owned();
    assert!(text.contains("account-a") && text.contains("reapply"), "{event}");
    let report = text
        .split("listed in ")
        .nth(1)
        .and_then(|rest| rest.split(" (JSON lines)").next())
        .expect("the event names the report")
        .to_owned();
    assert!(report.ends_with(".jsonl"), "{report}");

    let out = sites.ctl_ok(&["accounts", "reapply", &report, "--json"]);
    let applied: Value = serde_json::from_str(&out).expect("reapply --json");
    assert!(
        applied["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .any(|e| e["kind"] == "create-account" && e["applied"] == true),
        "{applied}"
    );
    let acked = vec![backup(&sites, &lost)];
    assert_all_restore(&sites, &acked, None, "reapplied");
}
