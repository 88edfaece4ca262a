//! Backs up two generated trees with `duplex` through the playground and
//! with `restic backup` into a local repository, in one run: each tree
//! first into an empty repository, then again unchanged. Writes the
//! times and their ratios to docs/BENCHMARKS.md.
//!
//!     cargo build --release --bins && cargo bench -p duplex-tests --bench backup_vs_restic
//!
//! `DUPLEX_BENCH_MIB` sets the mixed tree's size (default 512),
//! `DUPLEX_BENCH_SMALL_FILES` the small-file tree's file count (default
//! 50,000 files of about 140 bytes), `DUPLEX_BENCH_SYSTEM_TREE` the real
//! tree backed up as it is (default `/usr/share`; left out if missing).
//! Each tree is also restored whole by both. `DUPLEX_BENCH_RUNS` rounds
//! (default 3), each on a fresh playground and a fresh restic repository,
//! alternate between the two tools; the table gives each figure's median,
//! since single runs on a VM drift by a third. Where there are two CPUs or
//! more and `taskset`, the rounds are run again with the client held to
//! one CPU and duplex's servers to the others, as when the servers run on
//! other machines.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use duplex_tests::bench::{
    Pinning, Playground, RestoreTarget, Run, command_on, env_or, generate_tree, machine, measured, median,
    small_files, write_section,
};

/// Wall and CPU seconds of one operation.
#[derive(Clone, Copy)]
struct Took {
    secs: f64,
    /// On all cores, of every process that took part.
    cpu: f64,
    /// The client's alone (duplex's agent; all of restic).
    client_cpu: f64,
}

/// First and unchanged second backup, and a full restore.
struct Times {
    first: Took,
    again: Took,
    restore: Took,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mib = env_or("DUPLEX_BENCH_MIB", 512);
    let small = env_or("DUPLEX_BENCH_SMALL_FILES", 50_000);
    let work = tempfile::tempdir().unwrap();
    let mixed = work.path().join("mixed");
    eprintln!("generating a {mib} MiB tree and {small} small files");
    generate_tree(&mixed, mib);
    let tiny = work.path().join("small");
    small_files(&tiny, small, 500, 100);
    // Both tools read from a warm page cache.
    for tree in [&mixed, &tiny] {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "find {} -type f -exec cat {{}} + > /dev/null",
                tree.display()
            ))
            .status()
            .unwrap();
    }
    let mut trees = vec![mixed, tiny];
    let mut names = vec![format!("{mib} MiB mixed"), format!("{small} files of ~140 B")];
    // A real system tree of tens of thousands of small files, as it is.
    let system = std::env::var("DUPLEX_BENCH_SYSTEM_TREE").unwrap_or_else(|_| "/usr/share".into());
    let system = PathBuf::from(system);
    if system.is_dir() {
        let (count, mib) = size_of(&system);
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "find {} -type f -exec cat {{}} + > /dev/null 2>&1",
                system.display()
            ))
            .status()
            .unwrap();
        names.push(format!("{} ({count} files, {mib} MiB)", system.display()));
        trees.push(system);
    }
    let runs = env_or("DUPLEX_BENCH_RUNS", 3).max(1);
    // Nothing is deleted until the end: ext4 skips inodes freed in the
    // last seconds when it allocates new ones, and after tens of
    // thousands of deletions a restore spent most of its time in that
    // search (perf: `recently_deleted` under `ext4_create`), tripling
    // whichever restore came next.
    let rounds = |pinning: Option<&Pinning>| {
        let (mut duplex, mut restic) = (Vec::new(), Vec::new());
        for round in 0..runs {
            let pinned = if pinning.is_some() { "-pinned" } else { "" };
            let dir = work.path().join(format!("round{round}{pinned}"));
            std::fs::create_dir_all(&dir).unwrap();
            duplex.push(time_duplex(&dir, &trees, pinning));
            restic.push(time_restic(&dir, &trees, pinning));
        }
        table(&names, &medians(&duplex), &medians(&restic))
    };
    let rows = rounds(None);
    // The same with the client (duplex's agent, restic) held to one CPU and
    // duplex's servers to the others, as when they run on other machines:
    // what a backup takes on the machine being backed up.
    let pinning = Pinning::split();
    let pinned = pinning.as_ref().map(|p| (p, rounds(Some(p))));
    let body = format!(
        "## Backup: duplex vs restic\n\n\
         `cargo build --release --bins && cargo bench -p duplex-tests --bench backup_vs_restic`\n\n\
         Two generated trees: {mib} MiB (60 % random data in 32 MiB files, 30 % text, 10 % small \
         files) and {small} files of about 140 bytes, 500 to a directory, and a real system tree as \
         it is. Each is backed up into the repository, then again unchanged (duplex skips unchanged \
         files by its file cache, restic by its parent snapshot), then restored whole into a new ext4 \
         file system of its own (a loop device with direct I/O; an empty directory where the bench \
         cannot mount); warm page cache. Median of {runs} rounds, each on a fresh playground and a \
         fresh restic repository. Duplex goes through the playground \
         (agent → storage server over TLS on loopback, chunks encrypted by the agent, every chunk \
         fsynced, mirrored synchronously to site b); restic {} writes a local repository \
         (compression `auto`). CPU is user and system seconds on all cores: for duplex the \
         agent's and every playground server's (both sites), for restic its own; the agent's CPU alone is also shown, with its ratio \
         to restic's (what a backup costs the machine being backed up when the storage servers \
         run elsewhere, as they do outside the playground). Machine: {}.\n\n\
         {HEADER}{rows}{}",
        restic_version(),
        machine(),
        pinned.map_or(String::new(), |(p, rows)| format!(
            "\n**Client on one CPU, servers on the others.** The same rounds with the agent and \
             restic each held to CPU {} and every playground server to CPUs {} (`taskset`), as \
             when the storage servers run on other machines: the time a backup or restore takes \
             on the machine being backed up, with one core for the client.\n\n{HEADER}{rows}",
            p.client, p.servers
        )),
    );
    let path = write_section("backup-vs-restic", &body);
    println!("{body}");
    eprintln!("written to {}", path.display());
}

const HEADER: &str = "| tree, operation | duplex s | restic s | duplex / restic | duplex CPU s (all) | agent CPU s | restic CPU s | agent / restic CPU |\n\
     | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";

/// A row per tree and operation, from the medians of both tools.
fn table(names: &[String], duplex: &[Times], restic: &[Times]) -> String {
    let mut rows = String::new();
    for ((name, d), r) in names.iter().zip(duplex).zip(restic) {
        for (what, d, r) in [
            ("first backup", d.first, r.first),
            ("unchanged again", d.again, r.again),
            ("full restore", d.restore, r.restore),
        ] {
            rows.push_str(&format!(
                "| {name}, {what} | {:.2} | {:.2} | **{:.2}×** | {:.2} | {:.2} | {:.2} | {:.2}× |\n",
                d.secs,
                r.secs,
                d.secs / r.secs,
                d.cpu,
                d.client_cpu,
                r.cpu,
                d.client_cpu / r.cpu,
            ));
        }
    }
    rows
}

/// Files and MiB under `tree`.
fn size_of(tree: &Path) -> (usize, u64) {
    let (mut files, mut bytes) = (0, 0);
    for entry in walkdir::WalkDir::new(tree).into_iter().flatten() {
        if entry.file_type().is_file() {
            files += 1;
            bytes += entry.metadata().map_or(0, |m| m.len());
        }
    }
    (files, bytes >> 20)
}

/// Per tree, the median of each figure over the rounds.
fn medians(rounds: &[Vec<Times>]) -> Vec<Times> {
    let of = |tree: usize, pick: fn(&Times) -> Took| {
        let took: Vec<Took> = rounds.iter().map(|r| pick(&r[tree])).collect();
        Took {
            secs: median(&took.iter().map(|t| t.secs).collect::<Vec<_>>()),
            cpu: median(&took.iter().map(|t| t.cpu).collect::<Vec<_>>()),
            client_cpu: median(&took.iter().map(|t| t.client_cpu).collect::<Vec<_>>()),
        }
    };
    (0..rounds[0].len())
        .map(|tree| Times {
            first: of(tree, |t| t.first),
            again: of(tree, |t| t.again),
            restore: of(tree, |t| t.restore),
        })
        .collect()
}

fn took(run: &Run) -> Took {
    Took {
        secs: run.secs,
        cpu: run.cpu_secs,
        client_cpu: run.agent_cpu_secs,
    }
}

fn time_duplex(work: &Path, trees: &[PathBuf], pinning: Option<&Pinning>) -> Vec<Times> {
    let playground = Playground::start_pinned(&work.join("playground"), &[], pinning);
    trees
        .iter()
        .enumerate()
        .map(|(i, tree)| {
            let backup = || {
                let run = playground.measured_run(&["backup", tree.to_str().unwrap(), "--json"]);
                let done: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
                let snapshot = done["snapshot"].as_str().unwrap().to_owned();
                (took(&run), snapshot)
            };
            let (first, snapshot) = backup();
            let (again, _) = backup();
            let target = RestoreTarget::new(&work.join(format!("duplex-restore-{i}")));
            let restore = took(&playground.measured_run(&[
                "restore",
                &snapshot,
                "--target",
                target.path().to_str().unwrap(),
            ]));
            drop(target);
            eprintln!(
                "duplex {}: {:.2} s, then {:.2} s, restore {:.2} s",
                tree.display(),
                first.secs,
                again.secs,
                restore.secs
            );
            Times {
                first,
                again,
                restore,
            }
        })
        .collect()
}

fn time_restic(work: &Path, trees: &[PathBuf], pinning: Option<&Pinning>) -> Vec<Times> {
    let repo = work.join("restic-repo");
    assert!(
        Command::new("restic").arg("version").output().is_ok(),
        "restic is not installed (apt-get install restic)"
    );
    let restic = |args: &[&str]| {
        let mut cmd = command_on(pinning.map(|p| p.client.as_str()), "restic");
        cmd.args(args)
            .env("RESTIC_REPOSITORY", &repo)
            .env("RESTIC_PASSWORD", "bench")
            .env("RESTIC_CACHE_DIR", work.join("restic-cache"));
        let run = measured(cmd);
        Took {
            secs: run.secs,
            cpu: run.cpu_secs,
            client_cpu: run.cpu_secs,
        }
    };
    restic(&["init", "--repository-version", "2"]);
    let timed = |tree: &Path| restic(&["backup", "--compression", "auto", tree.to_str().unwrap()]);
    trees
        .iter()
        .enumerate()
        .map(|(i, tree)| {
            let first = timed(tree);
            let again = timed(tree);
            let target = RestoreTarget::new(&work.join(format!("restic-restore-{i}")));
            let restore = restic(&[
                "restore",
                "latest",
                "--path",
                tree.to_str().unwrap(),
                "--target",
                target.path().to_str().unwrap(),
            ]);
            drop(target);
            eprintln!(
                "restic {}: {:.2} s, then {:.2} s, restore {:.2} s",
                tree.display(),
                first.secs,
                again.secs,
                restore.secs
            );
            Times {
                first,
                again,
                restore,
            }
        })
        .collect()
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
