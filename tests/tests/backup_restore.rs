//! The backup data path end to end: agent → account server → storage
//! server and back, bit for bit, with deduplication.

#![allow(clippy::unwrap_used)]

use duplex_tests::Cluster;
use duplex_tests::tree::{assert_same_tree, mixed_tree, random_bytes};

const MIB: usize = 1024 * 1024;

#[test]
fn mixed_tree_restores_bit_for_bit_with_modes_and_mtimes() {
    let cluster = Cluster::start();
    let token = cluster.create_account("alice", None);
    let src = cluster.path("data");
    mixed_tree(&src, 24 * MIB);

    let report = cluster.backup(&token, &src);
    assert_eq!(report["files"], 306, "{report}");
    let snapshot = report["snapshot"].as_str().unwrap().to_owned();

    let listed = cluster.duplex_json(&token, &["snapshots"]);
    let snaps = listed["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0]["id"], snapshot.as_str());
    assert_eq!(snaps[0]["files"], report["files"]);
    assert_eq!(snaps[0]["bytes"], report["bytes"]);

    let target = cluster.restore(&token, &snapshot, "restored");
    assert_same_tree(&src, &target.join("data"));

    let verify = cluster.duplex_json(&token, &["verify", &snapshot]);
    assert_eq!(verify["ok"], true, "{verify}");
}

#[test]
fn unchanged_backup_uploads_almost_nothing_and_a_small_change_few_chunks() {
    let cluster = Cluster::start();
    let token = cluster.create_account("bob", None);
    let src = cluster.path("data");
    std::fs::create_dir_all(&src).unwrap();
    let mut big = random_bytes(7, 24 * MIB);
    std::fs::write(src.join("big"), &big).unwrap();
    std::fs::write(src.join("other"), random_bytes(8, 4 * MIB)).unwrap();

    let first = cluster.backup(&token, &src);
    let bytes = first["bytes"].as_u64().unwrap();
    assert!(first["uploaded_bytes"].as_u64().unwrap() >= bytes, "{first}");

    let second = cluster.backup(&token, &src);
    let uploaded = second["uploaded_bytes"].as_u64().unwrap();
    assert!(
        uploaded * 100 < bytes,
        "unchanged backup uploaded {uploaded} of {bytes} bytes"
    );

    // Overwrite 1 MiB in the middle of the 24 MiB file.
    let mid = 12 * MIB;
    big[mid..mid + MIB].copy_from_slice(&random_bytes(9, MIB));
    std::fs::write(src.join("big"), &big).unwrap();
    let third = cluster.backup(&token, &src);
    let uploaded = third["uploaded_bytes"].as_u64().unwrap();
    assert!(uploaded >= MIB as u64, "the changed MiB must be sent: {third}");
    assert!(
        uploaded <= 6 * MIB as u64,
        "a 1 MiB change sent {uploaded} bytes: {third}"
    );

    let target = cluster.path("restored");
    let snapshot = third["snapshot"].as_str().unwrap();
    let out = cluster.duplex(
        &token,
        &["restore", snapshot, "--target", target.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(target.join("data/big")).unwrap(), big);
}
