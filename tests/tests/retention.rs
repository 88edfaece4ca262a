//! `duplex forget` against the real two-site platform: keep rules and
//! named snapshots, a deletion mirrored to the other site, and deletions
//! that stay deleted through a failover and a failback while the kept
//! snapshots restore bit for bit.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use duplex_tests::tree::{assert_same_tree, random_bytes};
use duplex_tests::twosite::{Options, TwoSites};
use duplex_tests::wait_for;

const LONG: Duration = Duration::from_secs(60);

fn source_tree(root: &Path, i: u64) -> PathBuf {
    let dir = root.join(format!("src-{i}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("own"), random_bytes(i, 300_000)).unwrap();
    std::fs::write(dir.join("shared"), random_bytes(1000, 200_000)).unwrap();
    dir
}

fn forget(sites: &TwoSites, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["forget", "--json"];
    all.extend_from_slice(args);
    let out = sites.duplex(&sites.token, &all);
    assert!(
        out.status.success(),
        "forget {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// The snapshots one storage server lists for the demo account.
fn listed(sites: &TwoSites, storage: &str) -> Option<BTreeSet<String>> {
    let out = sites.duplex(&sites.token, &["--storage", storage, "snapshots", "--json"]);
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        v["snapshots"]
            .as_array()?
            .iter()
            .map(|s| s["id"].as_str().unwrap_or_default().to_owned())
            .collect(),
    )
}

fn wait_listed(sites: &TwoSites, storage: &str, want: &[&String]) {
    let want: BTreeSet<String> = want.iter().map(|s| (*s).clone()).collect();
    wait_for(&format!("{storage} to list {want:?}"), LONG, || {
        (listed(sites, storage)? == want).then_some(())
    });
}

fn refused(sites: &TwoSites, args: &[&str], why: &str) {
    let out = sites.duplex(&sites.token, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} was not refused");
    assert!(stderr.contains(why), "{args:?}: {stderr}");
}

#[test]
fn forgotten_snapshots_stay_gone_through_failover_and_failback_and_the_kept_ones_restore() {
    let mut sites = TwoSites::start(Options::default());
    let trees = sites.path("trees");
    let s: Vec<String> = (0..4)
        .map(|i| sites.backup(&sites.token, &source_tree(&trees, i)))
        .collect();

    refused(&sites, &["forget"], "nothing to forget");
    refused(&sites, &["forget", &s[0], "--keep-last", "1"], "not both");
    refused(&sites, &["forget", "ffffffffffff"], "not found");

    let dry = forget(&sites, &["--keep-last", "2", "--dry-run"]);
    assert_eq!(ids(&dry["removed"]), [s[1].clone(), s[0].clone()]);
    assert_eq!(ids(&dry["kept"]), [s[3].clone(), s[2].clone()]);
    assert_eq!(
        listed(&sites, &sites.storage_a.addr).unwrap().len(),
        4,
        "a dry run removed something"
    );

    let done = forget(&sites, &["--keep-last", "2"]);
    assert_eq!(ids(&done["removed"]), [s[1].clone(), s[0].clone()]);
    assert_eq!(done["dry_run"], false);
    wait_listed(&sites, &sites.storage_a.addr, &[&s[2], &s[3]]);
    // The deletion is mirrored like a backup.
    wait_listed(&sites, &sites.storage_b.addr, &[&s[2], &s[3]]);

    sites.storage_a.signal(libc::SIGKILL);
    sites.account_a.signal(libc::SIGKILL);
    sites.wait_roles(&[("account-b", "master"), ("storage-b", "primary")]);
    // Forgotten on site b while site a is down, by id prefix. Ids are uuid
    // v7, so the first 12 digits are the millisecond: a prefix has to reach
    // into the random part to name one of two backups taken together.
    let gone = forget(&sites, &[&s[2][..20]]);
    assert_eq!(ids(&gone["removed"]), [s[2].clone()]);
    let during = sites.backup(&sites.token, &source_tree(&trees, 4));

    sites.account_a.restart();
    sites.storage_a.restart();
    sites.wait_roles(&[("account-a", "slave"), ("storage-a", "replica")]);
    let out = sites.ctl(&["failback", "--wait"]);
    assert!(
        out.status.success(),
        "failback: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    sites.wait_roles(&[("storage-a", "primary"), ("storage-b", "replica")]);
    // Neither the deletions before the failover nor the one made on site b
    // came back on either site.
    wait_listed(&sites, &sites.storage_a.addr, &[&s[3], &during]);
    wait_listed(&sites, &sites.storage_b.addr, &[&s[3], &during]);
    for (snapshot, n) in [(&s[3], 3), (&during, 4)] {
        let target = sites.restore(&sites.token, snapshot, &format!("restored-{n}"));
        assert_same_tree(&trees.join(format!("src-{n}")), &target.join(format!("src-{n}")));
    }
    refused(
        &sites,
        &["restore", &s[0], "--target", "/nonexistent"],
        "not found",
    );
}
