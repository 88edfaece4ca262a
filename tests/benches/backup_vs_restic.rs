//! Backs up one generated tree with `duplex` through the playground and
//! with `restic backup` into a local repository, in one run, and writes
//! both times, MiB/s and their ratio to docs/BENCHMARKS.md.
//!
//!     cargo build --release --bins && cargo bench -p duplex-tests --bench backup_vs_restic
//!
//! `DUPLEX_BENCH_MIB` sets the tree size (default 512).

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Instant;

use duplex_tests::bench::{Playground, generate_tree, machine, write_section};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mib: usize = std::env::var("DUPLEX_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    eprintln!("generating a {mib} MiB tree");
    generate_tree(&tree, mib);
    // Both tools read from a warm page cache.
    Command::new("sh")
        .arg("-c")
        .arg(format!("cat $(find {} -type f) > /dev/null", tree.display()))
        .status()
        .unwrap();

    let duplex_secs = time_duplex(work.path(), &tree);
    let restic_secs = time_restic(work.path(), &tree);
    let rate = |s: f64| mib as f64 / s;
    let body = format!(
        "## Backup: duplex vs restic\n\n\
         `cargo build --release --bins && cargo bench -p duplex-tests --bench backup_vs_restic`\n\n\
         A generated {mib} MiB tree (60 % random data in 32 MiB files, 30 % text, 10 % small files), \
         first backup into an empty repository, warm page cache. Duplex goes through the playground \
         (agent → storage server over TLS on loopback, chunks encrypted by the agent, every chunk fsynced, mirrored synchronously to site b); restic writes a local \
         repository (compression `auto`). Machine: {}.\n\n\
         | tool | seconds | MiB/s |\n| --- | ---: | ---: |\n\
         | duplex | {duplex_secs:.2} | {:.1} |\n| restic {} | {restic_secs:.2} | {:.1} |\n\n\
         Duplex takes **{:.2}×** restic's time.\n",
        machine(),
        rate(duplex_secs),
        restic_version(),
        rate(restic_secs),
        duplex_secs / restic_secs,
    );
    let path = write_section("backup-vs-restic", &body);
    println!("{body}");
    eprintln!("written to {}", path.display());
}

fn time_duplex(work: &std::path::Path, tree: &std::path::Path) -> f64 {
    let playground = Playground::start(&work.join("playground"), &[]);
    let (secs, snapshot) = playground.timed_backup(tree);
    eprintln!("duplex: {secs:.2} s, snapshot {snapshot}");
    secs
}

fn time_restic(work: &std::path::Path, tree: &std::path::Path) -> f64 {
    let repo = work.join("restic-repo");
    let restic = |args: &[&str]| {
        Command::new("restic")
            .args(args)
            .env("RESTIC_REPOSITORY", &repo)
            .env("RESTIC_PASSWORD", "bench")
            .env("RESTIC_CACHE_DIR", work.join("restic-cache"))
            .output()
            .expect("restic is not installed (apt-get install restic)")
    };
    let init = restic(&["init", "--repository-version", "2"]);
    assert!(
        init.status.success(),
        "restic init: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let start = Instant::now();
    let out = restic(&["backup", "--compression", "auto", tree.to_str().unwrap()]);
    let secs = start.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "restic backup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("restic: {secs:.2} s");
    secs
}

fn restic_version() -> String {
    Command::new("restic")
        .arg("version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.split_whitespace().nth(1).map(str::to_owned))
        .unwrap_or_default()
}
