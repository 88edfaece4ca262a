//! `duplexctl verify --repair` with the real binaries: a chunk corrupted
//! on one site's disk is found, mended from the other site's copy and
//! restores bit for bit; a chunk corrupted on both sites is reported
//! unrepairable, with the snapshot that names it.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use duplex_tests::tree::{assert_same_tree, random_bytes};
use duplex_tests::twosite::{Options, TwoSites};
use duplex_tests::wait_for;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(60);

/// The largest pack under a storage server's data dir: the backup's data.
fn largest_pack(data_dir: &Path) -> PathBuf {
    std::fs::read_dir(data_dir.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| p.metadata().unwrap().len())
        .unwrap()
}

/// Flips the byte at `at` in `pack`; returns the 64 bytes that started
/// there before, to find the same chunk's copy on the other site.
fn flip(pack: &Path, at: u64) -> Vec<u8> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(pack)
        .unwrap();
    let mut window = vec![0u8; 64];
    file.read_exact_at(&mut window, at).unwrap();
    file.write_all_at(&[window[0] ^ 0xff], at).unwrap();
    file.sync_all().unwrap();
    window
}

/// Where `window` lies in one of the packs under `data_dir`: mirroring
/// copies a chunk's sealed bytes as they are, so 64 of them name it.
fn find(data_dir: &Path, window: &[u8]) -> (PathBuf, u64) {
    for entry in std::fs::read_dir(data_dir.join("packs")).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        if let Some(at) = bytes.windows(window.len()).position(|w| w == window) {
            return (path, at as u64);
        }
    }
    panic!("no pack under {} holds the chunk", data_dir.display());
}

fn server<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {report}"))
}

/// `duplexctl ARGS --json`, expecting exit code `code`.
fn ctl_exit(sites: &TwoSites, args: &[&str], code: i32) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let out = sites.ctl(&args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "duplexctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn verify_repair_mends_a_chunk_corrupted_on_one_site_and_names_one_lost_on_both() {
    let sites = TwoSites::start(Options::default());
    let tree = sites.path("tree");
    std::fs::create_dir_all(&tree).unwrap();
    for (i, len) in [1_500_000usize, 1_200_000, 900_000].into_iter().enumerate() {
        std::fs::write(tree.join(format!("file-{i}")), random_bytes(i as u64 + 1, len)).unwrap();
    }
    let snapshot = sites.backup(&sites.token, &tree);
    let storage_b = sites.storage_b.addr.clone();
    wait_for("storage-b to hold the snapshot", LONG, || {
        let out = sites.duplex(&sites.token, &["--storage", &storage_b, "snapshots", "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["snapshots"].as_array()?.len() == 1).then_some(())
    });
    assert_eq!(sites.ctl_json(&["verify"])["ok"], true);

    // One chunk damaged on storage-a: found, then mended from storage-b.
    let (dir_a, dir_b) = (sites.path("storage-a"), sites.path("storage-b"));
    let pack_a = largest_pack(&dir_a);
    flip(&pack_a, 100);
    let found = ctl_exit(&sites, &["verify"], 5);
    assert_eq!(found["ok"], false);
    assert_eq!(server(&found, "storage-a")["corrupt"], 1, "{found}");
    assert_eq!(server(&found, "storage-b")["corrupt"], 0, "{found}");
    let problems = &server(&found, "storage-a")["problems"][0]["corrupt"];
    assert_eq!(problems.as_array().unwrap().len(), 1, "{found}");

    let repaired = ctl_exit(&sites, &["verify", "--repair"], 0);
    let repair = &server(&repaired, "storage-a")["repair"];
    assert_eq!(repair["repaired"], 1, "{repaired}");
    assert_eq!(repair["unrepairable"].as_array().unwrap().len(), 0, "{repaired}");
    assert_eq!(repair["sources"][0], "storage-b", "{repaired}");
    assert_eq!(sites.ctl_json(&["verify"])["ok"], true);
    let target = sites.restore(&sites.token, &snapshot, "restored");
    assert_same_tree(&tree, &target.join("tree"));

    // Another chunk damaged on both sites: no copy is left to mend it.
    let len = pack_a.metadata().unwrap().len();
    let last_chunk = flip(&pack_a, len - 100);
    let (pack_b, at_b) = find(&dir_b, &last_chunk);
    flip(&pack_b, at_b);
    let lost = ctl_exit(&sites, &["verify", "--repair"], 5);
    for name in ["storage-a", "storage-b"] {
        let repair = &server(&lost, name)["repair"];
        assert_eq!(repair["repaired"], 0, "{lost}");
        let unrepairable = repair["unrepairable"].as_array().unwrap();
        assert_eq!(unrepairable.len(), 1, "{lost}");
        assert_eq!(unrepairable[0]["snapshots"][0], snapshot.as_str(), "{lost}");
    }
    let out = sites.ctl(&["verify", "--repair"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("unrepairable: account"), "{text}");
    assert!(text.contains(&snapshot), "{text}");
}
