//! What TLS and client-side encryption cost, written to docs/BENCHMARKS.md:
//! backup, restore and mirroring through the playground as deployed (mTLS
//! between servers, TLS to clients, encryption) against the same build with
//! `--insecure-plaintext`, and with an agent built without the cipher,
//! alternating runs on one dataset; and the CPU time sealing (keyed id,
//! AEAD) adds over hashing and compressing alone.
//!
//!     cargo build --release --bins
//!     cargo build --release -p duplex-agent --features bench-unencrypted --target-dir target/unencrypted
//!     cargo bench -p duplex-tests --bench security
//!
//! Without the second build the "both off" column is left out.
//! `DUPLEX_BENCH_MIB` sets the tree size (default 512), `DUPLEX_BENCH_RUNS`
//! the runs per mode (default 7).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use duplex_agent::crypto::Keys;
use duplex_proto::v1::GetStorageStatusRequest;
use duplex_proto::v1::storage_admin_client::StorageAdminClient;
use duplex_tests::bench::{Playground, env_or, generate_tree, machine, median, write_section};
use duplex_tests::tree::random_bytes;
use duplex_tests::{runtime, wait_for};
use duplex_types::ChunkId;

#[derive(Default)]
struct Times {
    backup: Vec<f64>,
    restore: Vec<f64>,
    mirror: Vec<f64>,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mib = env_or("DUPLEX_BENCH_MIB", 512);
    let runs = env_or("DUPLEX_BENCH_RUNS", 7);
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    let backlog = work.path().join("backlog");
    eprintln!("generating {mib} MiB and {} MiB trees", mib / 2);
    generate_tree(&tree, mib);
    // Content of its own: a tree from the same generator would dedup
    // against the first one and leave the mirrors nothing to copy.
    std::fs::create_dir_all(&backlog).unwrap();
    for i in 0..(mib / 2).div_ceil(32) {
        let len = 32.min(mib / 2 - i * 32) * 1024 * 1024;
        std::fs::write(
            backlog.join(format!("new{i:03}.bin")),
            random_bytes(90_000 + i as u64, len),
        )
        .unwrap();
    }
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cat $(find {} -type f) > /dev/null",
            work.path().display()
        ))
        .status()
        .unwrap();

    let unencrypted = unencrypted_agent();
    let modes: &[Mode] = if unencrypted.is_some() {
        &[Mode::Deployed, Mode::TlsOff, Mode::BothOff]
    } else {
        eprintln!(
            "no {}: leaving out the both-off runs",
            unencrypted_path().display()
        );
        &[Mode::Deployed, Mode::TlsOff]
    };
    let mut times: [Times; 3] = Default::default();
    for run in 0..runs {
        for &mode in modes {
            let dir = work.path().join(format!("run{run}-{mode:?}"));
            let agent = match mode {
                Mode::BothOff => unencrypted.clone(),
                _ => None,
            };
            one_run(&dir, mode, agent, &tree, &backlog, &mut times[mode as usize]);
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
    let sealing = sealing_cost(&tree);
    let body = report(mib, runs, &times, &sealing);
    let path = write_section("security", &body);
    println!("{body}");
    eprintln!("written to {}", path.display());
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    /// The playground as deployed: mTLS, TLS to the agent, encryption.
    Deployed,
    /// `--insecure-plaintext`: no TLS, encryption still on.
    TlsOff,
    /// `--insecure-plaintext` and an agent built without the cipher.
    BothOff,
}

fn unencrypted_path() -> std::path::PathBuf {
    // target/release/duplex → target/unencrypted/release/duplex
    let release = duplex_tests::bin("duplex-coordinator");
    let target = release.parent().and_then(Path::parent).unwrap();
    target.join("unencrypted/release/duplex")
}

/// The agent built with `bench-unencrypted`, when it has been built.
fn unencrypted_agent() -> Option<std::path::PathBuf> {
    let path = unencrypted_path();
    path.exists().then_some(path)
}

fn one_run(
    dir: &Path,
    mode: Mode,
    agent: Option<std::path::PathBuf>,
    tree: &Path,
    backlog: &Path,
    times: &mut Times,
) {
    // Each run starts with no dirty pages left by the one before.
    Command::new("sync").status().unwrap();
    let flags: &[&str] = match mode {
        Mode::Deployed => &[],
        Mode::TlsOff | Mode::BothOff => &["--insecure-plaintext"],
    };
    let mut pg = Playground::start(dir, flags);
    if let Some(agent) = agent {
        pg.agent = agent;
    }
    let (backup, snapshot) = pg.timed_backup(tree);
    let restore = pg.timed_restore(&snapshot, &dir.join("restored"));
    std::fs::remove_dir_all(dir.join("restored")).unwrap();
    let mirror = mirror_backlog(&pg, backlog);
    eprintln!("{mode:?}: backup {backup:.2} s, restore {restore:.2} s, mirror {mirror:.2} s");
    times.backup.push(backup);
    times.restore.push(restore);
    times.mirror.push(mirror);
}

/// Seconds the mirrors take, from the first chunk they copy, to bring
/// storage-b level with storage-a after `tree` was backed up while they
/// were down.
fn mirror_backlog(pg: &Playground, tree: &Path) -> f64 {
    let mirrors = [pg.service("mirror-a"), pg.service("mirror-b")];
    for mirror in mirrors {
        // SAFETY: SIGKILL to a playground child, by the pid it recorded.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(mirror["pid"].as_i64().unwrap() as i32, libc::SIGKILL);
        }
    }
    pg.timed_backup(tree);
    let (a, b) = (
        pg.service("storage-a")["addr"].as_str().unwrap(),
        pg.service("storage-b")["addr"].as_str().unwrap(),
    );
    let rt = runtime();
    let behind = rt.block_on(async { (status(a).await, status(b).await) });
    assert_ne!(behind.0, behind.1, "storage-b caught up with no mirror running");
    let mut restarted: Vec<_> = mirrors.iter().map(|m| start_again(m)).collect();
    // The clock starts with the first chunk copied: a mirror's start (its
    // certificate, its first heartbeat, the links it is given) is not
    // the copy's throughput.
    wait_for("the mirrors to start copying", Duration::from_secs(120), || {
        let now = rt.block_on(status(b))?;
        (now != behind.1?).then_some(())
    });
    let start = Instant::now();
    wait_for("storage-b to catch up", Duration::from_secs(600), || {
        let (sa, sb) = rt.block_on(async { (status(a).await, status(b).await) });
        let (sa, sb) = (sa?, sb?);
        (sa == sb).then_some(())
    });
    let secs = start.elapsed().as_secs_f64();
    for child in &mut restarted {
        let _ = child.kill();
        let _ = child.wait();
    }
    secs
}

/// Starts a killed playground service again with the argv it recorded.
fn start_again(service: &serde_json::Value) -> std::process::Child {
    let cmd: Vec<&str> = service["cmd"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    Command::new(cmd[0])
        .args(&cmd[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Chunks and snapshots a storage server holds.
async fn status(addr: &str) -> Option<(u64, u64)> {
    let s = StorageAdminClient::new(duplex_tests::connect(addr))
        .get_status(GetStorageStatusRequest {})
        .await
        .ok()?
        .into_inner();
    Some((s.chunks, s.snapshots))
}

/// One core's CPU seconds over the tree's chunks.
struct Sealing {
    mib: f64,
    hash_compress: f64,
    seal: f64,
    decompress_hash: f64,
    open: f64,
}

fn sealing_cost(tree: &Path) -> Sealing {
    let keys = Keys::generate();
    let mut chunks = Vec::new();
    for file in files(tree) {
        let reader = std::fs::File::open(&file).unwrap();
        duplex_agent::chunking::chunk_stream(reader, &file, &keys, |_, data| {
            chunks.push(data);
            Ok(())
        })
        .unwrap();
    }
    let mib = chunks.iter().map(Vec::len).sum::<usize>() as f64 / (1024.0 * 1024.0);
    let timed = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        f();
        start.elapsed().as_secs_f64()
    };
    let mut compressed = Vec::new();
    let hash_compress = timed(&mut || {
        compressed = chunks
            .iter()
            .map(|c| {
                std::hint::black_box(ChunkId::of(c));
                zstd::bulk::compress(c, 1).unwrap()
            })
            .collect();
    });
    let mut sealed = Vec::new();
    let seal = timed(&mut || {
        sealed = chunks
            .iter()
            .map(|c| {
                let id = keys.chunk_id(c);
                keys.seal_chunk(id, c).unwrap()
            })
            .collect();
    });
    let decompress_hash = timed(&mut || {
        for c in &compressed {
            let plain = zstd::bulk::decompress(c, 8 * 1024 * 1024).unwrap();
            std::hint::black_box(ChunkId::of(&plain));
        }
    });
    let open = timed(&mut || {
        for c in &sealed {
            let id = ChunkId::from_bytes(&c.id).unwrap();
            std::hint::black_box(keys.open_chunk(c, id).unwrap());
        }
    });
    Sealing {
        mib,
        hash_compress,
        seal,
        decompress_hash,
        open,
    }
}

fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn report(mib: usize, runs: usize, times: &[Times; 3], s: &Sealing) -> String {
    let [deployed, tls_off, both_off] = times;
    let have_both_off = !both_off.backup.is_empty();
    let pct = |on: f64, off: f64| format!("{:+.1} %", (on / off - 1.0) * 100.0);
    let row = |what: &str, pick: fn(&Times) -> &Vec<f64>, size: usize| {
        let cell = |t: &Times| {
            let m = median(pick(t));
            format!("{m:.2} s ({:.0} MiB/s)", size as f64 / m)
        };
        let (on, tls) = (median(pick(deployed)), median(pick(tls_off)));
        if have_both_off {
            let off = median(pick(both_off));
            format!(
                "| {what} | {} | {} | {} | {} | **{}** |\n",
                cell(deployed),
                cell(tls_off),
                cell(both_off),
                pct(on, tls),
                pct(on, off)
            )
        } else {
            format!(
                "| {what} | {} | {} | {} |\n",
                cell(deployed),
                cell(tls_off),
                pct(on, tls)
            )
        }
    };
    let header = if have_both_off {
        "| | as deployed | TLS off | TLS and encryption off | TLS costs | TLS and encryption cost |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |\n"
    } else {
        "| | as deployed | TLS off | TLS costs |\n| --- | ---: | ---: | ---: |\n"
    };
    let seal_extra = s.seal - s.hash_compress;
    let open_extra = s.open - s.decompress_hash;
    format!(
        "## Security: what TLS and encryption cost\n\n\
         ```\ncargo build --release --bins\n\
         cargo build --release -p duplex-agent --features bench-unencrypted --target-dir target/unencrypted\n\
         cargo bench -p duplex-tests --bench security\n```\n\n\
         The playground as deployed (mTLS between servers, TLS to the agent, sync mirroring, \
         client-side encryption) against the same build started with `--insecure-plaintext` \
         (no TLS, no operator tokens), and that again with an agent built with `bench-unencrypted` \
         (everything but the cipher: chunks compressed, framed, hashed and verified at every hop, \
         not encrypted; a build that runs only in plaintext mode, for this comparison), \
         alternating, {runs} runs each, medians. A generated {mib} MiB \
         tree backed up and restored; then both mirrors stopped, {} MiB of new random data backed up, the mirrors \
         started again and timed from the first chunk they copy until storage-b holds what storage-a holds \
         (the agent plays no part in that copy, so only TLS can differ). Machine: {}.\n\n\
         {header}{}{}{}\n\
         In-process, one core, on the same tree's {:.0} MiB of chunks: \
         keyed id + zstd + XChaCha20-Poly1305 + payload hash took {:.2} s against {:.2} s for an \
         unkeyed id + zstd alone, {:.2} s more ({:.1} % of the backup above, if none of it \
         overlapped); opening (AEAD check, zstd, keyed id) {:.2} s against {:.2} s, \
         {:.2} s more ({:.1} % of the restore).\n",
        mib / 2,
        machine(),
        row("backup", |t| &t.backup, mib),
        row("restore", |t| &t.restore, mib),
        row("mirror backlog", |t| &t.mirror, mib / 2),
        s.mib,
        s.seal,
        s.hash_compress,
        seal_extra,
        seal_extra / median(&deployed.backup) * 100.0,
        s.open,
        s.decompress_hash,
        open_extra,
        open_extra / median(&deployed.restore) * 100.0,
    )
}
