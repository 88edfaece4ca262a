//! Mirroring figures, written to docs/BENCHMARKS.md: time to mirror a
//! 1 GiB backlog against `rsync -a` of the source's data directory, lag
//! under a steady backup load, and bytes a delta resync sends against
//! bytes missing.
//!
//!     cargo build --release --bins && cargo bench -p duplex-tests --bench mirroring
//!
//! `DUPLEX_BENCH_MIB` sets the backlog size (default 1024).

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use duplex_tests::bench::{generate_tree, machine, median, write_section};
use duplex_tests::sites::{self, set_role};
use duplex_tests::tree::random_bytes;
use duplex_tests::{Cluster, Service, runtime, wait_for};

const MIB: usize = 1024 * 1024;
/// Backlog rounds, each on a fresh cluster.
const ROUNDS: usize = 3;

fn replica(cluster: &Cluster) -> Service {
    sites::storage(
        cluster.dir.path(),
        "storage-b",
        "b",
        &cluster.account.addr,
        &["--role", "replica", "--primary", &cluster.storage.addr],
    )
}

fn converged(rt: &tokio::runtime::Runtime, a: &str, b: &str) -> Option<()> {
    let (sa, sb) = rt.block_on(async { (sites::status(a).await, sites::status(b).await) });
    let (sa, sb) = (sa?, sb?);
    (sa.chunks == sb.chunks && sa.snapshots == sb.snapshots).then_some(())
}

fn backlog(mib: usize) -> (f64, f64, u64) {
    let cluster = Cluster::start();
    let rt = runtime();
    let token = cluster.create_account("bench", None);
    let tree = cluster.path("tree");
    generate_tree(&tree, mib);
    cluster.backup(&token, &tree);
    std::fs::remove_dir_all(&tree).unwrap();
    let stored = rt
        .block_on(sites::status(&cluster.storage.addr))
        .unwrap()
        .stored_bytes;
    let b = replica(&cluster);
    let start = Instant::now();
    let _mirror = sites::mirror(
        cluster.dir.path(),
        "mirror-b",
        &[format!("{}={}", cluster.storage.addr, b.addr)],
        &[],
    );
    wait_for("the backlog to mirror", Duration::from_secs(600), || {
        converged(&rt, &cluster.storage.addr, &b.addr)
    });
    let mirror_secs = start.elapsed().as_secs_f64();

    let copy = cluster.path("rsync-copy");
    let start = Instant::now();
    let status = Command::new("rsync")
        .args([
            "-a",
            &format!("{}/", cluster.path("storage-a").display()),
            copy.to_str().unwrap(),
        ])
        .status()
        .expect("rsync is not installed (apt-get install rsync)");
    assert!(status.success());
    Command::new("sync").status().unwrap();
    (mirror_secs, start.elapsed().as_secs_f64(), stored)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Lag (seconds, records) sampled every 20 ms while backups run back to back.
fn lag_under_load() -> (f64, f64, f64, f64, usize) {
    let cluster = Cluster::start();
    let rt = runtime();
    let b = replica(&cluster);
    let _mirror = sites::mirror(
        cluster.dir.path(),
        "mirror-b",
        &[format!("{}={}", cluster.storage.addr, b.addr)],
        &[],
    );
    let token = cluster.create_account("bench", None);
    let src = cluster.path("data");
    std::fs::create_dir_all(&src).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (addr, stop) = (cluster.storage.addr.clone(), stop.clone());
        std::thread::spawn(move || {
            let rt = runtime();
            let mut samples = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Some(s) = rt.block_on(sites::status(&addr))
                    && let Some(lag) = s.links_out.first().and_then(|l| l.lag)
                {
                    samples.push((lag.seconds, lag.records as f64));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            samples
        })
    };
    let backups = 40;
    for i in 0..backups {
        std::fs::write(src.join("f"), random_bytes(i, 4 * MIB)).unwrap();
        cluster.backup(&token, &src);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let samples = sampler.join().unwrap();
    let mut secs: Vec<f64> = samples.iter().map(|s| s.0).collect();
    let mut recs: Vec<f64> = samples.iter().map(|s| s.1).collect();
    secs.sort_by(f64::total_cmp);
    recs.sort_by(f64::total_cmp);
    let _ = rt;
    (
        percentile(&secs, 0.5),
        percentile(&secs, 0.99),
        percentile(&recs, 0.5),
        percentile(&recs, 0.99),
        backups as usize,
    )
}

/// A reversed link after the new primary took writes: bytes sent vs missing.
fn delta_resync() -> (u64, u64) {
    let cluster = Cluster::start();
    let rt = runtime();
    let b = replica(&cluster);
    let token = cluster.create_account("bench", None);
    let src = cluster.path("data");
    generate_tree(&src, 256);
    cluster.backup(&token, &src);
    let mut forward = sites::mirror(
        cluster.dir.path(),
        "mirror-b",
        &[format!("{}={}", cluster.storage.addr, b.addr)],
        &[],
    );
    wait_for("forward mirroring", Duration::from_secs(300), || {
        converged(&rt, &cluster.storage.addr, &b.addr)
    });
    forward.kill();
    rt.block_on(async {
        set_role(&b.addr, "primary", 1, "").await;
        set_role(&cluster.storage.addr, "replica", 1, &b.addr).await;
    });
    for i in 0..8u64 {
        std::fs::write(src.join(format!("new{i}")), random_bytes(7000 + i, 8 * MIB)).unwrap();
    }
    let out = cluster.duplex(
        &token,
        &["--storage", &b.addr, "backup", src.to_str().unwrap(), "--json"],
    );
    assert!(out.status.success());
    let a = rt
        .block_on(sites::status(&cluster.storage.addr))
        .unwrap()
        .stored_bytes;
    let missing = rt.block_on(sites::status(&b.addr)).unwrap().stored_bytes - a;
    let reverse = sites::mirror(
        cluster.dir.path(),
        "mirror-a",
        &[format!("{}={}", b.addr, cluster.storage.addr)],
        &[],
    );
    wait_for("the resync", Duration::from_secs(300), || {
        converged(&rt, &b.addr, &cluster.storage.addr)
    });
    let out = Command::new(duplex_tests::bin("duplexctl"))
        .args(["mirror", "status", &reverse.addr, "--json"])
        .env("DUPLEX_INSECURE_PLAINTEXT", "1")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (v["links"][0]["bytes_sent"].as_u64().unwrap(), missing)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mib: usize = std::env::var("DUPLEX_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    // Three rounds, each on a fresh cluster: one disk's timing varies
    // from run to run (rsync's final `sync` most of all).
    let rounds: Vec<(f64, f64, u64)> = (0..ROUNDS).map(|_| backlog(mib)).collect();
    let mirror_runs: Vec<f64> = rounds.iter().map(|r| r.0).collect();
    let rsync_runs: Vec<f64> = rounds.iter().map(|r| r.1).collect();
    let (mirror_secs, rsync_secs) = (median(&mirror_runs), median(&rsync_runs));
    let stored = rounds[0].2;
    let shown = |runs: &[f64]| {
        runs.iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (p50s, p99s, p50r, p99r, backups) = lag_under_load();
    let (sent, missing) = delta_resync();
    let stored_mib = stored as f64 / MIB as f64;
    let body = format!(
        "## Mirroring\n\n\
         `cargo build --release --bins && cargo bench -p duplex-tests --bench mirroring`\n\n\
         Machine: {}.\n\n\
         **Backlog.** A {mib} MiB tree backed up to storage-a ({stored_mib:.0} MiB stored after compression), then \
         a mirror started towards an empty storage-b: every chunk re-hashed and fsynced on arrival, checkpointed \
         per batch. Against `rsync -a` of storage-a's data directory to an empty directory on the same disk \
         (plus a `sync`). Median of {ROUNDS} rounds, each on a fresh cluster.\n\n\
         | copy | seconds (median) | MiB/s | rounds |\n| --- | ---: | ---: | --- |\n\
         | duplex-mirror | {mirror_secs:.2} | {:.1} | {} |\n| rsync -a | {rsync_secs:.2} | {:.1} | {} |\n\n\
         duplex-mirror takes **{:.2}×** rsync's time.\n\n\
         **Lag under load.** {backups} backups of a changed 4 MiB file back to back, async mirroring, lag as \
         storage-a reports it every 20 ms: p50 {p50s:.3} s / {p50r:.0} records, p99 {p99s:.3} s / {p99r:.0} records.\n\n\
         **Delta resync.** storage-b promoted after mirroring a 256 MiB tree, 64 MiB of new backups written there, \
         the link reversed: {sent} bytes sent for {missing} bytes missing on storage-a ({:.3}×).\n",
        machine(),
        stored_mib / mirror_secs,
        shown(&mirror_runs),
        stored_mib / rsync_secs,
        shown(&rsync_runs),
        mirror_secs / rsync_secs,
        sent as f64 / missing as f64,
    );
    write_section("mirroring", &body);
    println!("{body}");
}
