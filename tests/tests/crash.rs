//! SIGKILL of the storage server in the middle of a backup: nothing
//! partial becomes visible, earlier snapshots survive, and the retried
//! backup succeeds, reusing what was already stored.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use duplex_proto::v1::GetStorageStatusRequest;
use duplex_proto::v1::storage_admin_client::StorageAdminClient;
use duplex_tests::tree::{assert_same_tree, random_bytes};
use duplex_tests::{Cluster, bin, runtime, wait_for};

const MIB: usize = 1024 * 1024;

fn stored_chunks(rt: &tokio::runtime::Runtime, addr: &str) -> Option<u64> {
    rt.block_on(async {
        let mut admin = StorageAdminClient::new(duplex_rpc::channel(addr).ok()?);
        admin
            .get_status(GetStorageStatusRequest {})
            .await
            .ok()
            .map(|s| s.into_inner().chunks)
    })
}

#[test]
fn sigkill_during_backup_leaves_no_partial_snapshot() {
    let mut cluster = Cluster::start();
    let token = cluster.create_account("gina", None);
    let rt = runtime();

    let first = cluster.path("first");
    std::fs::create_dir_all(&first).unwrap();
    std::fs::write(first.join("a"), random_bytes(1, 3 * MIB)).unwrap();
    let before = cluster.backup(&token, &first)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let chunks_before = stored_chunks(&rt, &cluster.storage.addr).unwrap();

    // Large enough that the backup is still running when the kill lands
    // (at 8 chunks of about 1 MiB), small enough for a crowded CI disk.
    let big = cluster.path("big");
    std::fs::create_dir_all(&big).unwrap();
    for i in 0..6 {
        std::fs::write(big.join(format!("part{i}")), random_bytes(10 + i, 32 * MIB)).unwrap();
    }
    let agent = Command::new(bin("duplex"))
        .args(["backup", big.to_str().unwrap(), "--json"])
        .env("DUPLEX_ENDPOINT", &cluster.account.addr)
        .env("DUPLEX_TOKEN", &token)
        .env("DUPLEX_INSECURE_PLAINTEXT", "1")
        .env("DUPLEX_PASSWORD", duplex_tests::cluster::TEST_PASSPHRASE)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill once some (durable) chunks of the new backup are on the server.
    wait_for("the backup to store chunks", Duration::from_secs(60), || {
        stored_chunks(&rt, &cluster.storage.addr).filter(|n| *n > chunks_before + 8)
    });
    cluster.storage.kill();
    let out = agent.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "backup reported success although its server died"
    );

    cluster.storage.restart();
    let listed = cluster.duplex_json(&token, &["snapshots"]);
    let ids: Vec<&str> = listed["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![before.as_str()], "a partial snapshot became visible");

    let target = cluster.path("restored-first");
    let out = cluster.duplex(
        &token,
        &["restore", &before, "--target", target.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_same_tree(&first, &target.join("first"));

    let retried = cluster.backup(&token, &big);
    let total = retried["bytes"].as_u64().unwrap();
    let uploaded = retried["uploaded_bytes"].as_u64().unwrap();
    assert!(
        uploaded < total,
        "the retry re-sent everything ({uploaded} of {total} bytes)"
    );
    let target = cluster.path("restored-big");
    let snapshot = retried["snapshot"].as_str().unwrap();
    let out = cluster.duplex(
        &token,
        &["restore", snapshot, "--target", target.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_same_tree(&big, &target.join("big"));
}
