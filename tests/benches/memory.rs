//! Memory at a large file count: the agent's and the storage servers'
//! peak resident set while backing up a tree of many small files through
//! the playground, first and unchanged again, diffing the two and
//! restoring it whole. Writes docs/BENCHMARKS.md.
//!
//!     cargo build --release --bins && cargo bench -p duplex-tests --bench memory
//!
//! `DUPLEX_BENCH_FILES` sets the file count (default 1,000,000, a
//! thousand to a directory, 60 to 140 bytes of text each).

#![allow(clippy::unwrap_used)]

use std::path::Path;

use duplex_tests::bench::{
    Measured, Playground, env_or, machine, measured, process_peak_rss, small_files, write_section,
};

const MIB: f64 = 1024.0 * 1024.0;

/// A backup of `tree` with the file cache in `cache`, measured.
fn backup(pg: &Playground, tree: &Path, cache: &Path) -> (Measured, serde_json::Value) {
    let mut cmd = pg.agent_command(&["backup", tree.to_str().unwrap(), "--json"]);
    cmd.env("DUPLEX_CACHE_DIR", cache);
    let run = measured(cmd);
    let report = serde_json::from_slice(&run.stdout).unwrap();
    (run, report)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let files = env_or("DUPLEX_BENCH_FILES", 1_000_000);
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    eprintln!("generating {files} files");
    small_files(&tree, files, 1000, 60);
    let generated = std::time::Instant::now();
    let pg = Playground::start(&work.path().join("pg"), &[]);
    // A file changed in the second before a scan is read again next time
    // (the file cache's racy rule): let the tree settle.
    std::thread::sleep(std::time::Duration::from_millis(1100).saturating_sub(generated.elapsed()));
    // The agent's file cache goes with the bench, not the user's home.
    let cache = work.path().join("agent-cache");
    eprintln!("first backup");
    let (first, report) = backup(&pg, &tree, &cache);
    assert_eq!(report["files"], files, "{report}");
    eprintln!("unchanged second backup");
    let first_snapshot = report["snapshot"].as_str().unwrap().to_owned();
    let (again, report) = backup(&pg, &tree, &cache);
    assert_eq!(report["read_bytes"], 0, "{report}");
    eprintln!("diff of the two");
    let second_snapshot = report["snapshot"].as_str().unwrap().to_owned();
    let diff = measured(pg.agent_command(&["diff", &first_snapshot, &second_snapshot, "--json"]));
    let changes: serde_json::Value = serde_json::from_slice(&diff.stdout).unwrap();
    for list in ["added", "removed", "modified"] {
        assert_eq!(changes[list], serde_json::json!([]), "{changes}");
    }
    eprintln!("restore");
    let restored = work.path().join("restored");
    let restore = measured(pg.agent_command(&[
        "restore",
        &second_snapshot,
        "--target",
        restored.to_str().unwrap(),
        "--json",
    ]));
    let report: serde_json::Value = serde_json::from_slice(&restore.stdout).unwrap();
    assert_eq!(report["files"], files, "{report}");
    let server = |name: &str| process_peak_rss(pg.service(name)["pid"].as_u64().unwrap()) as f64 / MIB;
    let (storage_a, storage_b) = (server("storage-a"), server("storage-b"));
    let body = format!(
        "## Memory at {files} files\n\n\
         `cargo build --release --bins && cargo bench -p duplex-tests --bench memory`\n\n\
         {files} files of 60 to 140 bytes of text, a thousand to a directory, backed up through the playground \
         (TLS, encryption, sync mirroring to site b), then again unchanged, then restored whole into an empty \
         directory; the two backups are also diffed. Peak resident set: the agent's from wait4, the servers' VmHWM over all three. Machine: {}.\n\n\
         | | seconds | peak RSS (MiB) |\n| --- | ---: | ---: |\n\
         | agent, first backup | {:.1} | {:.0} |\n\
         | agent, unchanged second backup | {:.1} | {:.0} |\n\
         | agent, diff of the two backups | {:.1} | {:.0} |\n\
         | agent, full restore | {:.1} | {:.0} |\n\
         | storage-a (primary) | | {storage_a:.0} |\n\
         | storage-b (mirror destination) | | {storage_b:.0} |\n",
        machine(),
        first.secs,
        first.peak_rss as f64 / MIB,
        again.secs,
        again.peak_rss as f64 / MIB,
        diff.secs,
        diff.peak_rss as f64 / MIB,
        restore.secs,
        restore.peak_rss as f64 / MIB,
    );
    let written = write_section("Memory", &body);
    print!("{body}");
    eprintln!("written to {}", written.display());
}
