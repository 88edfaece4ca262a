//! A coordinator killed at the start of any failover or failback phase
//! resumes the operation when it restarts, and finishes it; the data
//! written around it all restores. Needs `duplex-coordinator-failpoints`
//! (`cargo build --release --bins --features duplex-coordinator/failpoints`).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use duplex_tests::phases::{FAILBACK, FAILOVER};
use duplex_tests::tree::{assert_same_tree, random_bytes};
use duplex_tests::twosite::{Options, TwoSites};
use duplex_tests::wait_for;

const LONG: Duration = Duration::from_secs(60);

/// Waits for the coordinator to abort at its fail point, then starts it
/// again armed with `next`; returns once the interrupted operation is done.
fn crash_and_resume(sites: &mut TwoSites, kind: &str, phase: &str, next: Option<&str>) {
    wait_for(&format!("the coordinator to die at {kind}:{phase}"), LONG, || {
        (!sites.coordinator.is_running()).then_some(())
    });
    sites.restart_coordinator(next);
    let op = wait_for(&format!("the {kind} to finish after the restart"), LONG, || {
        let events = sites.history();
        let op = events.iter().rev().find(|e| e["kind"] == kind)?.clone();
        (op["state"] != "running").then_some(op)
    });
    assert_eq!(op["state"], "done", "{kind} interrupted at {phase}: {op}");
    let phases = op["phases"].as_array().unwrap();
    let crashed: Vec<_> = phases.iter().filter(|p| p["name"] == phase).collect();
    assert_eq!(crashed.len(), 1, "phase {phase} recorded once: {op}");
    assert!(phases.iter().all(|p| p["finished"].is_string()), "{op}");
}

#[test]
fn a_coordinator_killed_in_any_phase_resumes_and_finishes() {
    let mut sites = TwoSites::start(Options {
        coordinator_bin: "duplex-coordinator-failpoints",
        failpoint: Some("failover:fence"),
        ..Default::default()
    });
    let trees = sites.path("trees");
    let mut acked = Vec::new();
    for i in 0..FAILBACK.len() {
        let tree = trees.join(format!("src-{i}"));
        std::fs::create_dir_all(&tree).unwrap();
        std::fs::write(tree.join("f.bin"), random_bytes(i as u64, 200_000)).unwrap();
        acked.push((sites.backup(&sites.token, &tree), tree));

        let failover_phase = FAILOVER[i % FAILOVER.len()];
        let failback_phase = FAILBACK[i];
        // The coordinator may die before it answers: the operation is
        // persisted before it runs, which is what the restart relies on.
        sites.ctl(&["failover", "--site", "a"]);
        crash_and_resume(
            &mut sites,
            "failover",
            failover_phase,
            Some(&format!("failback:{failback_phase}")),
        );
        sites.wait_roles(&[
            ("account-b", "master"),
            ("storage-b", "primary"),
            ("account-a", "slave"),
            ("storage-a", "replica"),
        ]);
        assert_eq!(
            sites.status()["moved_homes"],
            serde_json::json!({"storage-a": "storage-b"})
        );
        let during = trees.join(format!("during-{i}"));
        std::fs::create_dir_all(&during).unwrap();
        std::fs::write(during.join("f.bin"), random_bytes(100 + i as u64, 150_000)).unwrap();
        acked.push((sites.backup(&sites.token, &during), during));

        sites.ctl(&["failback", "--verify"]);
        let next = FAILOVER[(i + 1) % FAILOVER.len()];
        crash_and_resume(
            &mut sites,
            "failback",
            failback_phase,
            Some(&format!("failover:{next}")),
        );
        sites.wait_roles(&[
            ("account-a", "master"),
            ("storage-a", "primary"),
            ("account-b", "slave"),
            ("storage-b", "replica"),
        ]);
        assert_eq!(sites.status()["moved_homes"], serde_json::json!({}));
    }
    for (n, (snapshot, tree)) in acked.iter().enumerate() {
        let target = sites.restore(&sites.token, snapshot, &format!("restored-{n}"));
        assert_same_tree(tree, &target.join(tree.file_name().unwrap()));
    }
}
