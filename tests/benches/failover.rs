//! Failover figures, written to docs/BENCHMARKS.md: RTO (SIGKILL of the
//! storage primary → next acknowledged backup) over repeated runs with the
//! default and with tuned timeouts, at 100 and 10,000 accounts; planned
//! switchover time; failback duration for a backlog written while site a
//! was down.
//!
//!     cargo build --release --bins && cargo bench -p duplex-tests --bench failover

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use duplex_tests::bench::{generate_tree, machine, write_section};
use duplex_tests::twosite::{Options, TwoSites};
use duplex_tests::{accounts, runtime};

const RUNS: usize = 5;
const TUNED: &[&str] = &[
    "--failover-timeout",
    "600ms",
    "--lease",
    "500ms",
    "--heartbeat-interval",
    "100ms",
];

fn median_max(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let median = samples[samples.len() / 2].as_secs_f64();
    let max = samples.last().unwrap().as_secs_f64();
    (median, max)
}

fn backup(sites: &TwoSites, tree: &Path) {
    let out = sites.duplex(&sites.token, &["backup", tree.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn ctl_ok(sites: &TwoSites, args: &[&str]) {
    let out = sites.ctl(args);
    assert!(
        out.status.success(),
        "duplexctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What a run kills.
#[derive(Clone, Copy, PartialEq)]
enum Loss {
    /// The storage primary alone.
    Storage,
    /// The whole of site a: account master and storage primary together.
    Site,
}

/// SIGKILL storage-a (or all of site a), time the next acknowledged
/// backup; then bring it back and fail back, ready for the next run.
fn rto(flags: &[&str], accounts: usize, loss: Loss) -> Vec<Duration> {
    let mut sites = TwoSites::start(Options {
        coordinator: flags,
        ..Default::default()
    });
    if accounts > 1 {
        let master = sites.account_a.addr.clone();
        runtime().block_on(accounts::bulk_create(&master, "bench", accounts - 1));
    }
    let tree = sites.path("tree");
    std::fs::create_dir_all(&tree).unwrap();
    let mut samples = Vec::new();
    for run in 0..RUNS {
        std::fs::write(
            tree.join("f"),
            duplex_tests::tree::random_bytes(run as u64, 100_000),
        )
        .unwrap();
        backup(&sites, &tree);
        std::fs::write(
            tree.join("g"),
            duplex_tests::tree::random_bytes(1000 + run as u64, 100_000),
        )
        .unwrap();
        let killed = Instant::now();
        sites.storage_a.signal(libc::SIGKILL);
        if loss == Loss::Site {
            sites.account_a.signal(libc::SIGKILL);
        }
        backup(&sites, &tree);
        samples.push(killed.elapsed());
        sites.storage_a.restart();
        if loss == Loss::Site {
            sites.account_a.restart();
            sites.wait_roles(&[("storage-a", "replica"), ("account-a", "slave")]);
        } else {
            sites.wait_roles(&[("storage-a", "replica")]);
        }
        ctl_ok(&sites, &["failback", "--wait"]);
        sites.wait_roles(&[
            ("storage-a", "primary"),
            ("storage-b", "replica"),
            ("account-a", "master"),
        ]);
    }
    samples
}

fn switchover() -> Vec<Duration> {
    let sites = TwoSites::start(Options::default());
    let mut samples = Vec::new();
    for run in 0..RUNS {
        let site = if run % 2 == 0 { "a" } else { "b" };
        let start = Instant::now();
        ctl_ok(&sites, &["switchover", "--site", site, "--wait"]);
        samples.push(start.elapsed());
    }
    samples
}

/// Site a down while `mib` MiB are backed up on site b; the time
/// `failback --wait` takes once site a is back.
fn failback(mib: usize) -> Duration {
    let mut sites = TwoSites::start(Options::default());
    sites.storage_a.signal(libc::SIGKILL);
    sites.account_a.signal(libc::SIGKILL);
    sites.wait_roles(&[("storage-b", "primary"), ("account-b", "master")]);
    let tree = sites.path("backlog");
    generate_tree(&tree, mib);
    backup(&sites, &tree);
    sites.account_a.restart();
    sites.storage_a.restart();
    sites.wait_roles(&[("storage-a", "replica"), ("account-a", "slave")]);
    let start = Instant::now();
    ctl_ok(&sites, &["failback", "--wait"]);
    start.elapsed()
}

fn main() {
    let mut rows = String::new();
    for (label, flags) in [
        ("defaults (timeout 1.5 s, lease 1 s, heartbeat 250 ms)", &[][..]),
        ("tuned (timeout 600 ms, lease 500 ms, heartbeat 100 ms)", TUNED),
    ] {
        for accounts in [100, 10_000] {
            let (median, max) = median_max(rto(flags, accounts, Loss::Storage));
            eprintln!("RTO {label}, {accounts} accounts: median {median:.2} s, max {max:.2} s");
            rows.push_str(&format!(
                "| storage primary | {label} | {accounts} | {median:.2} s | {max:.2} s |\n"
            ));
        }
    }
    for accounts in [100, 10_000] {
        let label = "defaults (timeout 1.5 s, lease 1 s, heartbeat 250 ms)";
        let (median, max) = median_max(rto(&[], accounts, Loss::Site));
        eprintln!("site-loss RTO, {accounts} accounts: median {median:.2} s, max {max:.2} s");
        rows.push_str(&format!(
            "| whole site a (account master + storage primary) | {label} | {accounts} | {median:.2} s | {max:.2} s |\n"
        ));
    }
    let (sw_median, sw_max) = median_max(switchover());
    eprintln!("switchover: median {sw_median:.2} s, max {sw_max:.2} s");
    let backlog = 256;
    let fb = failback(backlog).as_secs_f64();
    eprintln!("failback with a {backlog} MiB backlog: {fb:.2} s");
    let body = format!(
        "## Failover, switchover, failback\n\n\
         `cargo build --release --bins && cargo bench -p duplex-tests --bench failover` on {machine}.\n\
         The whole platform runs as processes on this one machine (coordinator, two account\n\
         servers, two storage servers in sync mirroring, two mirrors).\n\n\
         **RTO**: SIGKILL of the storage primary (or of site a's account master and storage\n\
         primary together) while an agent waits to back up → that backup acknowledged by the\n\
         promoted replica (the agent rediscovers through the coordinator's topology), {RUNS} runs\n\
         each; after each run the killed servers are restarted and failed back. A whole-site loss\n\
         is one failover that moves both kinds.\n\n\
         | killed | timeouts | accounts | median | max |\n| --- | --- | --- | --- | --- |\n{rows}\n\
         Anchors: NetFlow Analyzer takes over after 60 s; Patroni ~27–41 s with its defaults;\n\
         pg_auto_failover 20–30 s; NNMi application failover 5–32 min.\n\n\
         **Switchover** (planned, lossless: fence, wait for zero lag, swap, repoint homes),\n\
         `duplexctl switchover --wait`, {RUNS} runs alternating sites: median {sw_median:.2} s, max {sw_max:.2} s.\n\n\
         **Failback** after site a was lost while {backlog} MiB were backed up on site b:\n\
         `duplexctl failback --wait` (rejoin, reverse mirroring of the backlog, block backups,\n\
         fence, drain, switch roles, repoint homes, restore mirroring, unblock) took {fb:.2} s.\n",
        machine = machine(),
    );
    let path = write_section("failover", &body);
    eprintln!("wrote {}", path.display());
}
