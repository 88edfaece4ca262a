//! A long-running pair of storage servers: several backups of fresh data
//! into one playground, one after another, with each server's CPU per
//! backup. A one-off bench starts every server with an empty page cache;
//! this one shows what a server pays once its cache has grown. Writes
//! docs/BENCHMARKS.md.
//!
//!     cargo build --release --bins && cargo bench -p duplex-tests --bench steady_state
//!
//! `DUPLEX_BENCH_MIB` sets each tree's size (default 512) and
//! `DUPLEX_BENCH_ROUNDS` the number of backups (default 5).

#![allow(clippy::unwrap_used)]

use duplex_tests::bench::{
    Playground, env_or, generate_tree_seeded, machine, process_cpu_secs, write_section,
};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mib = env_or("DUPLEX_BENCH_MIB", 512);
    let rounds = env_or("DUPLEX_BENCH_ROUNDS", 5);
    let work = tempfile::tempdir().unwrap();
    let pg = Playground::start(&work.path().join("pg"), &[]);
    let cpu = |name: &str| process_cpu_secs(pg.service(name)["pid"].as_u64().unwrap());
    let mut rows = String::new();
    for round in 1..=rounds {
        // Fresh data each round: chunk ids are keyed, so the same tree
        // again would be deduplicated, not stored.
        let tree = work.path().join(format!("tree{round}"));
        generate_tree_seeded(&tree, mib, round as u64);
        let (a, b) = (cpu("storage-a"), cpu("storage-b"));
        let run = pg.measured_run(&["backup", tree.to_str().unwrap(), "--json"]);
        let (a, b) = (cpu("storage-a") - a, cpu("storage-b") - b);
        eprintln!(
            "backup {round}: {:.2} s, storage-a {a:.2} s, storage-b {b:.2} s of CPU",
            run.secs
        );
        rows.push_str(&format!(
            "| {round} | {:.2} | {a:.2} | {b:.2} | {:.2} |\n",
            run.secs, run.cpu_secs
        ));
        std::fs::remove_dir_all(&tree).unwrap();
    }
    let body = format!(
        "## Steady state: backups into one playground\n\n\
         `cargo build --release --bins && cargo bench -p duplex-tests --bench steady_state`\n\n\
         {rounds} backups of a fresh {mib} MiB mixed tree each (as in the restic comparison), one \
         after another into one playground (TLS, encryption, sync mirroring to site b), so the \
         servers' page cache grows as a long-running server's does. CPU is user and system \
         seconds on all cores during each backup. Machine: {}.\n\n\
         | backup | seconds | storage-a CPU s | storage-b CPU s | all CPU s |\n\
         | ---: | ---: | ---: | ---: | ---: |\n{rows}",
        machine(),
    );
    let path = write_section("steady-state", &body);
    println!("{body}");
    eprintln!("written to {}", path.display());
}
