//! Garbage collection, written to docs/BENCHMARKS.md: how fast a round
//! marks live data and reclaims dead data, what is left on disk for the
//! live data afterwards, and how much a round at the default rate slows a
//! backup running at the same time.
//!
//!     cargo build --release --bins
//!     cargo bench -p duplex-tests --bench gc
//!
//! Each collected data set is one backup of two generated trees of
//! `DUPLEX_BENCH_MIB` MiB each (default 512), one of which is then
//! deleted and the snapshot forgotten: its packs are half dead, so a round
//! sweeps half and rewrites the other half. The concurrent backup is of a
//! fresh tree of the same size, long enough to time well and shorter
//! than the round; `DUPLEX_BENCH_RUNS` (default 7) pairs of a
//! backup alone and one during a round, alternating.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Instant;

use duplex_proto::v1::storage_admin_client::StorageAdminClient;
use duplex_proto::v1::{GcReport, ListUsageRequest};
use duplex_tests::bench::{env_or, generate_tree_seeded, machine, median, write_section};
use duplex_tests::{Cluster, GC_EAGER, runtime};

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * MIB;

fn pack_bytes(cluster: &Cluster) -> u64 {
    std::fs::read_dir(cluster.path("storage-a").join("packs"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

fn live_bytes(cluster: &Cluster) -> u64 {
    runtime().block_on(async {
        StorageAdminClient::new(duplex_rpc::channel(&cluster.storage.addr).unwrap())
            .list_usage(ListUsageRequest {})
            .await
            .unwrap()
            .into_inner()
            .accounts
            .iter()
            .map(|a| a.stored_bytes)
            .sum()
    })
}

fn collect(addr: &str) -> GcReport {
    runtime().block_on(duplex_tests::collect_garbage(addr))
}

/// Backs up `keep` and `drop` trees (seeds `seed` and `seed + 1`) in one
/// snapshot, deletes `drop`, backs up again and forgets the first.
fn half_dead(cluster: &Cluster, token: &str, work: &Path, mib: usize, seed: u64) {
    let tree = work.join(format!("set-{seed}"));
    generate_tree_seeded(&tree.join("keep"), mib, seed);
    generate_tree_seeded(&tree.join("drop"), mib, seed + 1);
    let first = cluster.backup(token, &tree)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::remove_dir_all(tree.join("drop")).unwrap();
    cluster.backup(token, &tree);
    let out = cluster.duplex(token, &["forget", &first]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Writes every dirty page to disk, so a timed backup does not pay for
/// the writeback of what the setup before it wrote.
fn settle() {
    let status = std::process::Command::new("sync").status().unwrap();
    assert!(status.success());
}

/// Seconds to back up a fresh tree of `mib` MiB (seed `seed`).
fn timed_backup(cluster: &Cluster, token: &str, work: &Path, mib: usize, seed: u64) -> f64 {
    let tree = work.join(format!("fresh-{seed}"));
    generate_tree_seeded(&tree, mib, seed);
    settle();
    let started = Instant::now();
    cluster.backup(token, &tree);
    let secs = started.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&tree).unwrap();
    secs
}

struct Throughput {
    live: f64,
    swept: f64,
    reclaimed: f64,
    report: GcReport,
    before: f64,
    after: f64,
}

fn throughput(work: &Path, mib: usize) -> Throughput {
    let mut flags = GC_EAGER.to_vec();
    flags.extend(["--gc-rate", "0"]);
    let cluster = Cluster::start_with(&flags);
    let token = cluster.create_account("bench", None);
    eprintln!("throughput: writing a {} MiB half-dead set", 2 * mib);
    half_dead(&cluster, &token, work, mib, 10);
    let before = pack_bytes(&cluster) as f64;
    let report = collect(&cluster.storage.addr);
    let live = live_bytes(&cluster) as f64;
    Throughput {
        live,
        swept: report.swept_bytes as f64,
        reclaimed: report.reclaimed_bytes as f64,
        before: before / live,
        after: pack_bytes(&cluster) as f64 / live,
        report,
    }
}

struct Concurrent {
    alone: Vec<f64>,
    during: Vec<f64>,
    /// Runs where the round was still running when the backup finished.
    overlapped: usize,
}

fn concurrent(work: &Path, mib: usize, runs: usize, rate: Option<&str>) -> Concurrent {
    let mut flags = GC_EAGER.to_vec();
    flags.extend(rate.iter().flat_map(|r| ["--gc-rate", r]));
    let cluster = Cluster::start_with(&flags);
    let token = cluster.create_account("bench", None);
    let mut out = Concurrent {
        alone: Vec::new(),
        during: Vec::new(),
        overlapped: 0,
    };
    for run in 0..runs as u64 {
        // Each timed backup comes right after a half-dead set is written
        // and forgotten: the first backup after such a setup runs slower
        // than a later one, so both sides of a pair must be in the same
        // place. Which side goes first alternates.
        let seed = 100 + 20 * run;
        let setup = |seed| {
            eprintln!("concurrent run {run}: writing a {} MiB half-dead set", 2 * mib);
            half_dead(&cluster, &token, work, mib, seed);
        };
        let time_alone = || {
            setup(seed);
            timed_backup(&cluster, &token, work, mib, seed + 10)
        };
        let time_during = || {
            setup(seed + 2);
            during_round(&cluster, &token, work, mib, seed + 11)
        };
        let (alone, (during, report, outlasted)) = if run % 2 == 0 {
            let alone = time_alone();
            (alone, time_during())
        } else {
            let during = time_during();
            (time_alone(), during)
        };
        out.overlapped += usize::from(outlasted);
        eprintln!(
            "  alone {alone:.2} s, during a round {during:.2} s (round {} ms, {} MiB rewritten)",
            report.duration_ms,
            report.reclaimed_bytes as f64 / MIB
        );
        out.alone.push(alone);
        out.during.push(during);
    }
    out
}

/// Seconds to back up a fresh tree of `mib` MiB while a round runs, the
/// round's report, and whether the round was still running at the end.
fn during_round(cluster: &Cluster, token: &str, work: &Path, mib: usize, seed: u64) -> (f64, GcReport, bool) {
    let fresh = work.join(format!("fresh-{seed}"));
    generate_tree_seeded(&fresh, mib, seed);
    settle();
    let addr = cluster.storage.addr.clone();
    let round = std::thread::spawn(move || {
        let report = collect(&addr);
        (report, Instant::now())
    });
    let started = Instant::now();
    cluster.backup(token, &fresh);
    let during = started.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&fresh).unwrap();
    let (report, ended) = round.join().unwrap();
    (
        during,
        report,
        ended.duration_since(started).as_secs_f64() >= during,
    )
}

/// `bytes` over `ms` in GiB/s, with the time; a round too short for the
/// millisecond clock gets a bound, not a figure.
fn rate(bytes: f64, ms: u64) -> String {
    if ms == 0 {
        return format!("over {:.1} GiB/s (under 1 ms)", bytes / GIB * 1000.0);
    }
    format!("{:.2} GiB/s ({ms} ms)", bytes / GIB / (ms as f64 / 1000.0))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mib = env_or("DUPLEX_BENCH_MIB", 512);
    let runs = env_or("DUPLEX_BENCH_RUNS", 7);
    let work = tempfile::tempdir().unwrap();
    let t = throughput(work.path(), mib);
    // The server's default --gc-rate unless set.
    let gc_rate = std::env::var("DUPLEX_BENCH_GC_RATE").ok();
    let c = concurrent(work.path(), mib, runs, gc_rate.as_deref());
    let gc_rate = gc_rate.map_or_else(|| "the default 64 MiB/s".to_owned(), |r| format!("--gc-rate {r}"));
    let (alone, during) = (median(&c.alone), median(&c.during));
    // Per run, then the median: the store grows from run to run, so a
    // pair's two sides are closer to each other than to other runs'.
    let ratios: Vec<f64> = c.alone.iter().zip(&c.during).map(|(a, d)| d / a).collect();
    let slowdown = (median(&ratios) - 1.0) * 100.0;
    let body = format!(
        "## Garbage collection\n\n\
         `cargo bench -p duplex-tests --bench gc` ({}), one storage server, data set of \
         {} MiB live and {} MiB dead in half-dead packs (each backup is one pack, so \
         every pack is rewritten):\n\n\
         | | figure | target |\n| --- | ---: | --- |\n\
         | mark and sweep | {} ({} live chunks) | |\n\
         | compaction, unthrottled (reclaimed) | {} | |\n\
         | whole round (reclaimed) | {} | |\n\
         | on disk / live, before | {:.2} | |\n\
         | on disk / live, after | {:.3} | ≤ 1.1 |\n\
         | backup of {} MiB, alone (median of {runs}) | {alone:.2} s | |\n\
         | the same during a round at {gc_rate} | {during:.2} s | |\n\
         | slowdown (median of the runs' ratios) | {slowdown:+.1} % | ≤ 20 % |\n\n\
         The round outlasted the backup in {} of {runs} runs. Each timed backup follows \
         its own freshly written and forgotten half-dead set (the first backup after one \
         runs slower than a later one), the alone side first in even runs. Each run's \
         backup alone and during a round, in seconds: {}.\n",
        machine(),
        (t.live / MIB).round(),
        (t.swept / MIB).round(),
        rate(t.live, t.report.sweep_ms),
        t.report.live_chunks,
        rate(t.reclaimed, t.report.compact_ms),
        rate(t.reclaimed, t.report.duration_ms),
        t.before,
        t.after,
        mib,
        c.overlapped,
        c.alone
            .iter()
            .zip(&c.during)
            .map(|(a, d)| format!("{a:.2}/{d:.2}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    print!("{body}");
    let path = write_section("gc", &body);
    eprintln!("written to {}", path.display());
}
