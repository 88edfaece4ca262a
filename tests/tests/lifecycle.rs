//! An account's life after it is created, against the real platform:
//! a quota the storage server enforces (a refused backup commits nothing
//! and is not retried), a quota raised, a token rotated (the old one stops
//! working at once, the new one sees the same data), usage, and a group's
//! keep policy that the servers apply by themselves on both sites.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use duplex_tests::tree::random_bytes;
use duplex_tests::twosite::{Options, TwoSites};

const LONG: Duration = Duration::from_secs(60);

fn snapshot_count(sites: &TwoSites, token: &str) -> usize {
    let out = sites.duplex(token, &["snapshots", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["snapshots"].as_array().unwrap().len()
}

#[test]
fn a_quota_refuses_the_backup_that_would_pass_it_and_a_rotated_token_replaces_the_old() {
    let sites = TwoSites::start(Options::default());
    let created = sites.ctl_json(&["accounts", "create", "carol", "--quota", "1500000"]);
    let token = created["token"].as_str().unwrap().to_owned();
    let src = sites.path("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("first"), random_bytes(1, 1_000_000)).unwrap();
    sites.backup(&token, &src);

    std::fs::write(src.join("second"), random_bytes(2, 1_000_000)).unwrap();
    let out = sites.duplex(&token, &["backup", src.to_str().unwrap(), "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a backup past the quota was accepted");
    assert!(stderr.contains("quota of 1500000 bytes"), "{stderr}");
    assert!(
        stderr.contains("stored"),
        "the refusal does not say what is used: {stderr}"
    );
    assert!(
        !stderr.contains("retrying"),
        "a used-up quota was retried: {stderr}"
    );
    assert_eq!(
        snapshot_count(&sites, &token),
        1,
        "the refused backup committed a snapshot"
    );

    let raised = sites.ctl_json(&["accounts", "quota", "carol", "10000000"]);
    assert_eq!(raised["quota_bytes"], 10_000_000);
    sites.backup(&token, &src);
    assert_eq!(snapshot_count(&sites, &token), 2);

    let rotated = sites.ctl_json(&["accounts", "rotate-token", "carol"]);
    assert_eq!(rotated["name"], "carol");
    let new_token = rotated["token"].as_str().unwrap().to_owned();
    assert_ne!(new_token, token);
    let old = sites.duplex(&token, &["snapshots", "--json"]);
    assert!(!old.status.success(), "the old token still works");
    assert!(
        String::from_utf8_lossy(&old.stderr).contains("token"),
        "{}",
        String::from_utf8_lossy(&old.stderr)
    );
    assert_eq!(snapshot_count(&sites, &new_token), 2);

    let usage = sites.ctl_json(&["accounts", "usage"]);
    let carol = usage["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "carol")
        .unwrap()
        .clone();
    assert_eq!(carol["snapshots"], 2, "{carol}");
    assert_eq!(carol["quota_bytes"], 10_000_000, "{carol}");
    assert_eq!(carol["overdue"], false, "{carol}");
    assert!(carol["last_backup"].is_string(), "{carol}");
    // Both files, each stored once however many snapshots name it.
    let stored = carol["stored_bytes"].as_u64().unwrap();
    assert!((2_000_000..2_200_000).contains(&stored), "{carol}");
    // The demo account was created and never backed up: overdue at once.
    let demo = usage["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] != "carol")
        .unwrap()
        .clone();
    assert_eq!(demo["last_backup"], serde_json::Value::Null, "{demo}");
    assert_eq!(demo["overdue"], true, "{demo}");

    let unknown = sites.ctl(&["accounts", "rotate-token", "nobody"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("not found"));
}

/// The snapshots a storage server lists for the account with `token`.
fn listed(sites: &TwoSites, token: &str, storage: &str) -> Option<Vec<String>> {
    let out = sites.duplex(token, &["--storage", storage, "snapshots", "--json"]);
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let mut ids: Vec<String> = v["snapshots"]
        .as_array()?
        .iter()
        .map(|s| s["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    ids.sort();
    Some(ids)
}

#[test]
fn a_group_keep_policy_is_applied_by_the_servers_after_each_backup_on_both_sites() {
    let sites = TwoSites::start(Options::default());
    let created = sites.ctl_json(&["accounts", "create", "dave", "--group", "nightly"]);
    let token = created["token"].as_str().unwrap().to_owned();
    let set = sites.ctl_json(&["groups", "policy", "nightly", "--keep-last", "2"]);
    assert_eq!(set["keep"], serde_json::json!({"last": 2}), "{set}");
    let groups = sites.ctl_json(&["groups", "list"]);
    assert!(
        groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["name"] == "nightly" && g["keep"]["last"] == 2),
        "{groups}"
    );

    let src = sites.path("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        std::fs::write(src.join(format!("f{i}")), random_bytes(10 + i, 50_000)).unwrap();
        ids.push(sites.backup(&token, &src));
    }
    let mut newest = ids[1..].to_vec();
    newest.sort();
    for storage in [&sites.storage_a.addr, &sites.storage_b.addr] {
        duplex_tests::wait_for(&format!("{storage} to keep the two newest"), LONG, || {
            (listed(&sites, &token, storage)? == newest).then_some(())
        });
    }

    // No rule: the group keeps everything again.
    let cleared = sites.ctl_json(&["groups", "policy", "nightly"]);
    assert_eq!(cleared["keep"], serde_json::Value::Null, "{cleared}");
    std::fs::write(src.join("f3"), random_bytes(13, 50_000)).unwrap();
    ids.push(sites.backup(&token, &src));
    assert_eq!(snapshot_count(&sites, &token), 3);
}
