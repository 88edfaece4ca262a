//! Client-side encryption with real processes: passphrases (wrong, changed,
//! added, missing), no plaintext on any server's disk on either site,
//! tampered payloads detected, and keys served by a promoted slave.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use duplex_proto::v1::storage_admin_client::StorageAdminClient;
use duplex_proto::v1::{GetStorageStatusRequest, VerifyAccountsRequest};
use duplex_tests::cluster::TEST_PASSPHRASE;
use duplex_tests::tree::{assert_same_tree, mixed_tree, random_bytes};
use duplex_tests::twosite::{Options, TwoSites};
use duplex_tests::{Cluster, bin, wait_for};
use duplex_types::ChunkId;

const LONG: Duration = Duration::from_secs(60);
const MARKER: &[u8] = b"DUPLEX-PLAINTEXT-MARKER: the quarterly numbers nobody may read";

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `duplex ARGS` on `cluster` with the passphrase set (or, with None, no
/// passphrase at all: no file, no environment, no terminal).
fn duplex_with(cluster: &Cluster, token: &str, passphrase: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("duplex"));
    cmd.args(args)
        .env("DUPLEX_ENDPOINT", &cluster.account.addr)
        .env("DUPLEX_TOKEN", token)
        .env("DUPLEX_INSECURE_PLAINTEXT", "1")
        .env_remove("DUPLEX_PASSWORD")
        .stdin(std::process::Stdio::null());
    if let Some(p) = passphrase {
        cmd.env("DUPLEX_PASSWORD", p);
    }
    cmd.output().unwrap()
}

fn write_secret(cluster: &Cluster, name: &str, passphrase: &str) -> PathBuf {
    let path = cluster.path(name);
    // Written as `echo` would, trailing newline and all.
    std::fs::write(&path, format!("{passphrase}\n")).unwrap();
    path
}

fn tree(cluster: &Cluster) -> PathBuf {
    let src = cluster.path("src");
    mixed_tree(&src, 3 * 1024 * 1024);
    src
}

fn restore_ok(cluster: &Cluster, token: &str, passphrase: &str, snapshot: &str, into: &str) -> PathBuf {
    let target = cluster.path(into);
    let out = duplex_with(
        cluster,
        token,
        Some(passphrase),
        &["restore", snapshot, "--target", target.to_str().unwrap()],
    );
    assert!(out.status.success(), "restore failed: {}", stderr(&out));
    target
}

fn key_ids(cluster: &Cluster, token: &str) -> Vec<String> {
    let out = duplex_with(cluster, token, None, &["key", "list", "--json"]);
    assert!(out.status.success(), "key list: {}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            assert!(k["created"].as_str().unwrap().ends_with('Z'), "{k}");
            k["id"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[test]
fn a_wrong_or_missing_passphrase_is_a_clear_error_never_garbage() {
    let cluster = Cluster::start();
    let token = cluster.create_account("alice", None);
    let src = tree(&cluster);
    let snapshot = cluster.backup(&token, &src)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();

    let target = cluster.path("wrong");
    for args in [
        vec!["restore", &snapshot, "--target", target.to_str().unwrap()],
        vec!["snapshots", "--json"],
        vec!["verify", &snapshot, "--read-data"],
        vec!["backup", src.to_str().unwrap()],
    ] {
        let out = duplex_with(&cluster, &token, Some("not the passphrase"), &args);
        assert!(
            !out.status.success(),
            "{args:?} succeeded with a wrong passphrase"
        );
        assert!(
            stderr(&out).contains("wrong passphrase for account alice"),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(
            out.stdout.is_empty(),
            "{args:?} printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert!(
        !target.exists(),
        "a restore with a wrong passphrase wrote something"
    );

    let out = duplex_with(&cluster, &token, None, &["snapshots"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--password-file") && err.contains("DUPLEX_PASSWORD"),
        "{err}"
    );

    // The right one still works, and the JSON of `snapshots` is as before.
    let listed = cluster.duplex_json(&token, &["snapshots"]);
    let s = &listed["snapshots"][0];
    assert_eq!(s["id"], snapshot.as_str());
    assert_eq!(s["paths"][0], src.to_str().unwrap(), "{listed}");
    assert!(s["files"].as_u64().unwrap() > 100, "{listed}");
    assert!(s["bytes"].as_u64().unwrap() > 3 * 1024 * 1024, "{listed}");
    assert!(s["time"].as_str().unwrap().ends_with('Z'), "{listed}");
}

#[test]
fn key_passwd_retires_the_old_passphrase_and_key_add_gives_a_second() {
    let cluster = Cluster::start();
    let token = cluster.create_account("bob", None);
    let src = tree(&cluster);
    let snapshot = cluster.backup(&token, &src)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = key_ids(&cluster, &token);
    assert_eq!(before.len(), 1);

    let new_file = write_secret(&cluster, "new-pass", "a new and longer passphrase");
    let out = duplex_with(
        &cluster,
        &token,
        Some(TEST_PASSPHRASE),
        &["key", "passwd", "--new-password-file", new_file.to_str().unwrap()],
    );
    assert!(out.status.success(), "key passwd: {}", stderr(&out));
    let after = key_ids(&cluster, &token);
    assert_eq!(after.len(), 1);
    assert_ne!(after, before, "passwd must replace the key record");

    let target = cluster.path("old");
    let out = duplex_with(
        &cluster,
        &token,
        Some(TEST_PASSPHRASE),
        &["restore", &snapshot, "--target", target.to_str().unwrap()],
    );
    assert!(!out.status.success(), "the old passphrase still works");
    assert!(stderr(&out).contains("wrong passphrase"), "{}", stderr(&out));
    assert!(!target.exists());

    // The new one, from a file, restores bit for bit: the data was not touched.
    let target = cluster.path("new");
    let out = duplex_with(
        &cluster,
        &token,
        None,
        &[
            "--password-file",
            new_file.to_str().unwrap(),
            "restore",
            &snapshot,
            "--target",
            target.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "restore with the new passphrase: {}",
        stderr(&out)
    );
    assert_same_tree(&src, &target.join("src"));

    // key add: both passphrases work.
    let second = write_secret(&cluster, "second-pass", "the second passphrase");
    let out = duplex_with(
        &cluster,
        &token,
        Some("a new and longer passphrase"),
        &["key", "add", "--new-password-file", second.to_str().unwrap()],
    );
    assert!(out.status.success(), "key add: {}", stderr(&out));
    assert_eq!(key_ids(&cluster, &token).len(), 2);
    for (n, pass) in ["a new and longer passphrase", "the second passphrase"]
        .iter()
        .enumerate()
    {
        let target = restore_ok(&cluster, &token, pass, &snapshot, &format!("both-{n}"));
        assert_same_tree(&src, &target.join("src"));
    }
    // And a backup under the second passphrase dedups against the first.
    let out = duplex_with(
        &cluster,
        &token,
        Some("the second passphrase"),
        &["backup", src.to_str().unwrap(), "--json"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["uploaded_bytes"].as_u64().unwrap() < 64 * 1024, "{report}");
}

/// Every regular file under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                stack.push(p);
            } else if meta.is_file() {
                out.push(p);
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn no_plaintext_reaches_any_storage_server_on_either_site() {
    let sites = TwoSites::start(Options::default());
    let src = sites.path("secret");
    std::fs::create_dir_all(&src).unwrap();
    let random = random_bytes(77, 1024 * 1024);
    let mut document = MARKER.repeat(200);
    document.extend_from_slice(&random);
    std::fs::write(src.join("quarterly-report.bin"), &document).unwrap();
    std::fs::write(src.join("note.txt"), MARKER).unwrap();
    let snapshot = sites.backup(&sites.token, &src);
    // Sync mirroring acknowledges after both sites have it; poll anyway
    // for the replica to list the snapshot before searching its disk.
    let rt = duplex_tests::runtime();
    wait_for("storage-b to hold the snapshot", LONG, || {
        let status = rt.block_on(async {
            // As the admin: a storage server's status is for viewers and up.
            StorageAdminClient::new(duplex_tests::connect(&sites.storage_b.addr))
                .get_status(GetStorageStatusRequest {})
                .await
                .ok()
        })?;
        (status.into_inner().snapshots >= 1).then_some(())
    });

    // Distinctive pieces of the plaintext: the marker, windows of the
    // random data, the file name, and the plain (unkeyed) BLAKE3 of the
    // file and of its first chunk-sized piece, which a server could use to
    // confirm a known file.
    let mut needles: Vec<(String, Vec<u8>)> = vec![
        ("marker".into(), MARKER[..32].to_vec()),
        ("file name".into(), b"quarterly-report".to_vec()),
        ("blake3 of the file".into(), ChunkId::of(&document).to_vec()),
        ("blake3 of the note".into(), ChunkId::of(MARKER).to_vec()),
    ];
    for offset in [0, 4096, 300_000, 700_000, 1_000_000] {
        needles.push((
            format!("random bytes at {offset}"),
            random[offset..offset + 48].to_vec(),
        ));
    }
    let mut searched = 0;
    for server in ["storage-a", "storage-b"] {
        for file in files_under(&sites.path(server)) {
            let bytes = std::fs::read(&file).unwrap();
            searched += bytes.len();
            for (what, needle) in &needles {
                assert!(
                    !contains(&bytes, needle),
                    "{what} found in plaintext in {}",
                    file.display()
                );
            }
        }
    }
    assert!(searched > 1024 * 1024, "the data dirs hold only {searched} bytes");

    // And the data is all there: restored from the primary bit for bit.
    let target = sites.restore(&sites.token, &snapshot, "restored");
    assert_same_tree(&src, &target.join("secret"));
}

/// The largest pack file of a storage data dir.
fn largest_pack(data_dir: &Path) -> PathBuf {
    files_under(&data_dir.join("packs"))
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap()
}

#[test]
fn a_tampered_payload_byte_is_detected_by_verify_and_refused_by_restore() {
    let cluster = Cluster::start();
    let token = cluster.create_account("carol", None);
    let src = cluster.path("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("only.bin"), random_bytes(5, 2 * 1024 * 1024)).unwrap();
    let snapshot = cluster.backup(&token, &src)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let verified = cluster.duplex_json(&token, &["verify", &snapshot, "--read-data"]);
    assert_eq!(verified["ok"], true, "{verified}");
    assert!(verified["chunks_read"].as_u64().unwrap() >= 2, "{verified}");

    let pack = largest_pack(&cluster.path("storage-a"));
    let mut bytes = std::fs::read(&pack).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&pack, &bytes).unwrap();

    // The server's own check (no key needed) names the damaged chunk.
    let out = cluster.duplex(&token, &["verify", "--json"]);
    assert!(!out.status.success(), "verify passed over a tampered pack");
    assert_eq!(out.status.code(), Some(5), "damaged data exits 5");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["corrupt"].as_array().unwrap().len(), 1, "{report}");
    let out = cluster.duplex(&token, &["verify", &snapshot, "--read-data", "--json"]);
    assert!(
        !out.status.success(),
        "verify --read-data passed over a tampered pack"
    );
    // And the operator's integrity check, which sees every account.
    let accounts = duplex_tests::runtime().block_on(async {
        let channel = duplex_rpc::channel(&cluster.storage.addr).unwrap();
        StorageAdminClient::new(channel)
            .verify_accounts(VerifyAccountsRequest { account_ids: vec![] })
            .await
            .unwrap()
            .into_inner()
            .accounts
    });
    assert_eq!(accounts.iter().map(|a| a.corrupt).sum::<u64>(), 1, "{accounts:?}");

    // Restore refuses it and leaves no garbage behind.
    let target = cluster.path("restored");
    let out = cluster.duplex(
        &token,
        &["restore", &snapshot, "--target", target.to_str().unwrap()],
    );
    assert!(!out.status.success(), "restore of a tampered chunk succeeded");
    assert_eq!(out.status.code(), Some(5), "damaged data exits 5");
    let err = stderr(&out);
    assert!(err.contains("DataLoss") || err.contains("integrity"), "{err}");
    assert!(
        !target.join("src/only.bin").exists(),
        "a damaged file was left in the target"
    );
}

#[test]
fn a_promoted_account_slave_serves_the_key_and_the_agent_restores() {
    let sites = TwoSites::start(Options::default());
    let src = sites.path("src");
    mixed_tree(&src, 1024 * 1024);
    // The first backup creates the key on account-a (the master).
    let snapshot = sites.backup(&sites.token, &src);
    sites.account_a.signal(libc::SIGKILL);
    sites.wait_roles(&[("account-a", "down"), ("account-b", "master")]);
    let target = sites.restore(&sites.token, &snapshot, "restored");
    assert_same_tree(&src, &target.join("src"));
    // The promoted master takes key changes too.
    let new_file = sites.path("new-pass");
    std::fs::write(&new_file, "after the failover").unwrap();
    let out = sites.duplex(
        &sites.token,
        &["key", "passwd", "--new-password-file", new_file.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "key passwd on the promoted master: {}",
        stderr(&out)
    );
    let out = sites.duplex(&sites.token, &["snapshots"]);
    assert!(!out.status.success(), "the old passphrase still works");
    assert!(stderr(&out).contains("wrong passphrase"), "{}", stderr(&out));
}
