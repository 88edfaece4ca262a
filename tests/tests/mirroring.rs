//! Mirroring storage-a to storage-b through duplex-mirror: every snapshot
//! arrives and restores from the replica, kills and corruption are
//! survived without loss, active-active does not loop, and a reversed
//! link sends only what the other side lacks.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use duplex_tests::proxy::{Fault, Proxy};
use duplex_tests::sites::{self, pack_bytes, set_role};
use duplex_tests::tree::{assert_same_tree, random_bytes};
use duplex_tests::{Cluster, Service, runtime, wait_for};

const MIB: usize = 1024 * 1024;
const CONVERGE: Duration = Duration::from_secs(60);

fn replica(cluster: &Cluster) -> Service {
    let primary = cluster.storage.addr.clone();
    sites::storage(
        cluster.dir.path(),
        "storage-b",
        "b",
        &cluster.account.addr,
        &["--role", "replica", "--primary", &primary],
    )
}

fn link(from: &Service, to: &str) -> String {
    format!("{}={to}", from.addr)
}

fn wait_converged(rt: &tokio::runtime::Runtime, a: &str, b: &str) {
    wait_for("the replica to converge", CONVERGE, || {
        let (sa, sb) = rt.block_on(async { (sites::status(a).await, sites::status(b).await) });
        let (sa, sb) = (sa?, sb?);
        (sa.chunks == sb.chunks
            && sa.snapshots == sb.snapshots
            && sb.links_in.iter().any(|c| c.seq >= sa.seq))
        .then_some(())
    });
}

#[test]
fn two_hundred_snapshots_reach_the_replica_in_sync_and_restore_from_it() {
    let cluster = Cluster::start_with(&["--mirroring", "sync", "--sync-wait", "10s"]);
    let rt = runtime();
    let b = replica(&cluster);
    let _mirror = sites::mirror(
        cluster.dir.path(),
        "mirror-b",
        &[link(&cluster.storage, &b.addr)],
        &[],
    );
    let token = cluster.create_account("alice", None);
    let src = cluster.path("data");
    std::fs::create_dir_all(&src).unwrap();
    let mut expected = BTreeMap::new();
    for i in 0..200u64 {
        let content = random_bytes(i, 2000 + i as usize);
        std::fs::write(src.join("file"), &content).unwrap();
        let snapshot = cluster.backup(&token, &src)["snapshot"]
            .as_str()
            .unwrap()
            .to_owned();
        // Sync mirroring: acknowledged means already on the replica.
        let on_b = rt.block_on(sites::status(&b.addr)).unwrap().snapshots;
        assert_eq!(
            on_b,
            i + 1,
            "snapshot {i} was acknowledged before the replica had it"
        );
        expected.insert(snapshot, content);
    }
    let status = rt.block_on(sites::status(&cluster.storage.addr)).unwrap();
    assert_eq!(status.mirroring, "sync");

    let verify = cluster.duplex_json(&token, &["--storage", &b.addr, "verify"]);
    assert_eq!(verify["ok"], true, "{verify}");
    for (snapshot, content) in &expected {
        let target = cluster.path(&format!("r/{snapshot}"));
        let out = cluster.duplex(
            &token,
            &[
                "--storage",
                &b.addr,
                "restore",
                snapshot,
                "--target",
                target.to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(&std::fs::read(target.join("data/file")).unwrap(), content);
    }
    // The replica takes no backups, and says where the primary is.
    let out = cluster.duplex(&token, &["--storage", &b.addr, "backup", src.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&cluster.storage.addr));
}

#[test]
fn sync_mirroring_degrades_loudly_when_the_mirror_is_gone() {
    let cluster = Cluster::start_with(&["--mirroring", "sync", "--sync-wait", "300ms"]);
    let rt = runtime();
    let b = replica(&cluster);
    let mut mirror = sites::mirror(
        cluster.dir.path(),
        "mirror-b",
        &[link(&cluster.storage, &b.addr)],
        &[],
    );
    let token = cluster.create_account("bob", None);
    let src = cluster.path("data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"one").unwrap();
    cluster.backup(&token, &src);
    mirror.kill();
    std::fs::write(src.join("f"), b"two").unwrap();
    cluster.backup(&token, &src);
    let status = rt.block_on(sites::status(&cluster.storage.addr)).unwrap();
    assert!(
        status.mirroring.starts_with("async (degraded"),
        "{}",
        status.mirroring
    );
    assert!(
        cluster
            .storage
            .log_text()
            .contains("SYNC MIRRORING DEGRADED TO ASYNC")
    );
    assert!(
        !status.accounts_behind.is_empty(),
        "the account's latest snapshot is not mirrored yet"
    );
    mirror.restart();
    wait_for("sync to come back", CONVERGE, || {
        let s = rt.block_on(sites::status(&cluster.storage.addr))?;
        (s.mirroring == "sync" && s.accounts_behind.is_empty()).then_some(())
    });
    let metrics = duplex_tests::scrape(&cluster.storage.addr);
    assert!(
        metrics.contains("duplex_storage_sync_degraded{server=\"storage-a\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("duplex_lag_records{destination=") && l.contains("server=\"storage-a\"")),
        "{metrics}"
    );
}

/// Backs up a tree of `files` × 8 MiB random files; returns its path.
fn big_tree(cluster: &Cluster, name: &str, files: u64) -> std::path::PathBuf {
    let src = cluster.path(name);
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..files {
        std::fs::write(src.join(format!("f{i}")), random_bytes(500 + i, 8 * MIB)).unwrap();
    }
    src
}

#[test]
fn killed_mirror_resumes_from_the_checkpoint_without_resending() {
    let cluster = Cluster::start();
    let rt = runtime();
    let b = replica(&cluster);
    let token = cluster.create_account("carol", None);
    let src = big_tree(&cluster, "data", 16);
    let snapshot = cluster.backup(&token, &src)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let total_chunks = rt.block_on(sites::status(&cluster.storage.addr)).unwrap().chunks;

    // A slow link, so the kill lands mid-stream.
    let mut mirror = sites::mirror(
        cluster.dir.path(),
        "mirror-b",
        &[link(&cluster.storage, &b.addr)],
        &["--rate", &(40 * MIB).to_string()],
    );
    wait_for("part of the backlog on the replica", CONVERGE, || {
        let n = rt.block_on(sites::status(&b.addr))?.chunks;
        (n > 8 && n < total_chunks).then_some(())
    });
    mirror.kill();
    let mid = rt.block_on(sites::status(&b.addr)).unwrap().chunks;
    assert!(mid < total_chunks);
    mirror.restart();
    wait_converged(&rt, &cluster.storage.addr, &b.addr);

    let stored = rt.block_on(sites::status(&b.addr)).unwrap().stored_bytes;
    let received = pack_bytes(&cluster.path("storage-b"));
    // At most the one batch in flight at the kill came twice (32 MiB).
    assert!(
        received <= stored + 32 * MIB as u64,
        "received {received} bytes for {stored} stored"
    );
    let target = cluster.path("restored");
    let out = cluster.duplex(
        &token,
        &[
            "--storage",
            &b.addr,
            "restore",
            &snapshot,
            "--target",
            target.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_same_tree(&src, &target.join("data"));
}

#[test]
fn killed_destination_resumes_after_restart() {
    let cluster = Cluster::start();
    let rt = runtime();
    let mut b = replica(&cluster);
    let token = cluster.create_account("dave", None);
    let src = big_tree(&cluster, "data", 12);
    cluster.backup(&token, &src);
    let total = rt.block_on(sites::status(&cluster.storage.addr)).unwrap().chunks;
    let _mirror = sites::mirror(
        cluster.dir.path(),
        "mirror-b",
        &[link(&cluster.storage, &b.addr)],
        &["--rate", &(40 * MIB).to_string()],
    );
    wait_for("part of the backlog on the replica", CONVERGE, || {
        let n = rt.block_on(sites::status(&b.addr))?.chunks;
        (n > 4 && n < total).then_some(())
    });
    b.kill();
    b.restart();
    wait_converged(&rt, &cluster.storage.addr, &b.addr);
    let verify = cluster.duplex_json(&token, &["--storage", &b.addr, "verify"]);
    assert_eq!(verify["ok"], true, "{verify}");
}

/// 32 bytes from the middle of the largest pack file in `data_dir`.
fn ciphertext_sample(data_dir: &std::path::Path) -> Vec<u8> {
    let pack = std::fs::read_dir(data_dir.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let bytes = std::fs::read(pack).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle..middle + 32].to_vec()
}

#[test]
fn a_chunk_corrupted_on_the_wire_is_refused_and_the_link_retries() {
    let cluster = Cluster::start();
    let rt = runtime();
    let b = replica(&cluster);
    // The destination pulls chunks from the source: the wire to corrupt is
    // the one into the source, which the link names through the proxy.
    let proxy = Proxy::start(&cluster.storage.addr);
    let token = cluster.create_account("erin", None);
    let src = cluster.path("data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), random_bytes(77, 2 * MIB)).unwrap();
    let snapshot = cluster.backup(&token, &src)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    // Payloads are encrypted, so the bytes to corrupt on the wire are taken
    // from the ciphertext the primary stored.
    let marker = ciphertext_sample(&cluster.path("storage-a"));

    proxy.set(Fault::CorruptOnce(marker));
    let _mirror = sites::mirror(
        cluster.dir.path(),
        "mirror-b",
        &[format!("{}={}", proxy.addr, b.addr)],
        &[],
    );
    wait_converged(&rt, &cluster.storage.addr, &b.addr);
    assert_eq!(proxy.corrupted(), 1, "the fault was never injected");
    assert!(
        b.log_text().contains("does not match its data_hash"),
        "the replica did not report the bad chunk"
    );
    let verify = cluster.duplex_json(&token, &["--storage", &b.addr, "verify", &snapshot]);
    assert_eq!(verify["ok"], true, "{verify}");
}

#[test]
fn active_active_converges_and_stops_without_loops() {
    let cluster = Cluster::start();
    let rt = runtime();
    let b = sites::storage(cluster.dir.path(), "storage-b", "b", &cluster.account.addr, &[]);
    wait_for("storage-b to register", CONVERGE, || {
        let out = cluster.ctl(&["accounts", "create", "on-b", "--home", "storage-b", "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap())
    });
    let ma = sites::mirror(
        cluster.dir.path(),
        "mirror-a",
        &[link(&b, &cluster.storage.addr)],
        &[],
    );
    let mb = sites::mirror(
        cluster.dir.path(),
        "mirror-b",
        &[link(&cluster.storage, &b.addr)],
        &[],
    );
    let on_a = cluster.create_account("on-a", None);
    let out = cluster.ctl(&["accounts", "create", "on-b2", "--home", "storage-b", "--json"]);
    let on_b: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(on_b["home"], "storage-b");
    let on_b = on_b["token"].as_str().unwrap().to_owned();

    let src = cluster.path("data");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..5u64 {
        std::fs::write(src.join("f"), random_bytes(i, 300_000)).unwrap();
        cluster.backup(&on_a, &src);
        std::fs::write(src.join("f"), random_bytes(100 + i, 300_000)).unwrap();
        cluster.backup(&on_b, &src);
    }
    let converged = || {
        let (sa, sb) = rt.block_on(async {
            (
                sites::status(&cluster.storage.addr).await,
                sites::status(&b.addr).await,
            )
        });
        let (sa, sb) = (sa?, sb?);
        let caught_up = sa.links_in.iter().any(|c| c.seq >= sb.seq.saturating_sub(20))
            && sa.snapshots == 10
            && sb.snapshots == 10
            && sa.chunks == sb.chunks;
        caught_up.then_some((sa.seq, sb.seq))
    };
    let first = wait_for("both sites to hold every snapshot", CONVERGE, converged);
    // Quiet now: with a loop the feeds would keep growing. Watch them for a while.
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(50));
        let now = wait_for("status", CONVERGE, converged);
        assert_eq!(
            now, first,
            "the change feeds keep growing while nothing is written: a mirroring loop"
        );
    }
    // Each link carried only its own side's five snapshots: nothing that
    // came from the destination was ever sent back to it.
    for mirror in [&ma, &mb] {
        let out = std::process::Command::new(duplex_tests::bin("duplexctl"))
            .args(["mirror", "status", &mirror.addr, "--json"])
            .env("DUPLEX_INSECURE_PLAINTEXT", "1")
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["links"][0]["snapshots_sent"], 5, "{}: {v}", mirror.name);
    }
    for (token, name) in [(&on_a, "a"), (&on_b, "b")] {
        for storage in [&cluster.storage.addr, &b.addr] {
            let list = cluster.duplex_json(token, &["--storage", storage, "snapshots"]);
            assert_eq!(
                list["snapshots"].as_array().unwrap().len(),
                5,
                "account on {name} at {storage}"
            );
        }
    }
}

#[test]
fn a_reversed_link_sends_only_what_the_other_side_lacks() {
    let cluster = Cluster::start();
    let rt = runtime();
    let b = replica(&cluster);
    let token = cluster.create_account("frank", None);
    let src = big_tree(&cluster, "data", 6);
    cluster.backup(&token, &src);
    let mut forward = sites::mirror(
        cluster.dir.path(),
        "mirror-b",
        &[link(&cluster.storage, &b.addr)],
        &[],
    );
    wait_converged(&rt, &cluster.storage.addr, &b.addr);
    forward.kill();

    // Site b takes over and takes new backups that a never saw.
    rt.block_on(async {
        set_role(&b.addr, "primary", 1, "").await;
        set_role(&cluster.storage.addr, "replica", 1, &b.addr).await;
    });
    for i in 0..3u64 {
        std::fs::write(src.join(format!("new{i}")), random_bytes(900 + i, 4 * MIB)).unwrap();
    }
    let out = cluster.duplex(
        &token,
        &["--storage", &b.addr, "backup", src.to_str().unwrap(), "--json"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let a_before = rt
        .block_on(sites::status(&cluster.storage.addr))
        .unwrap()
        .stored_bytes;
    let b_bytes = rt.block_on(sites::status(&b.addr)).unwrap().stored_bytes;
    let lacking = b_bytes - a_before;

    // The reverse link is set at run time, as the coordinator (or an operator) would.
    let reverse = sites::mirror(cluster.dir.path(), "mirror-a", &[], &[]);
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(duplex_tests::bin("duplexctl"))
            .args(args)
            .env("DUPLEX_INSECURE_PLAINTEXT", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    ctl(&[
        "mirror",
        "links",
        &reverse.addr,
        "--link",
        &link(&b, &cluster.storage.addr),
        "--json",
    ]);
    wait_converged(&rt, &b.addr, &cluster.storage.addr);
    let status = ctl(&["mirror", "status", &reverse.addr, "--json"]);
    let bytes_sent = status["links"][0]["bytes_sent"].as_u64().unwrap();
    assert!(bytes_sent >= lacking, "sent {bytes_sent} but a lacked {lacking}");
    assert!(
        bytes_sent as f64 <= 1.05 * lacking as f64,
        "a delta resync sent {bytes_sent} bytes for {lacking} missing"
    );
}
