//! Operator actions served by account servers reach the coordinator's
//! history through heartbeats, naming the operator, the role and the
//! address the call came from; a refused call leaves no trace there.

#![allow(clippy::unwrap_used)]

use std::process::Output;
use std::time::{Duration, Instant};

use duplex_tests::twosite::{Options, TwoSites};
use duplex_tests::wait_for;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `args` as the operator with `token` until it succeeds: a new
/// operator reaches the account servers with their next heartbeat answer.
fn succeeds(sites: &TwoSites, token: &str, args: &[&str]) -> Output {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = sites.ctl_as(token, args);
        if out.status.success() {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "duplexctl {args:?} kept failing: {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn audits(sites: &TwoSites) -> Vec<serde_json::Value> {
    sites.events("audit")
}

fn detail(event: &serde_json::Value) -> &str {
    event["detail"].as_str().unwrap_or_default()
}

#[test]
fn account_server_actions_are_in_history_with_who_and_from_where() {
    let sites = TwoSites::start(Options::default());
    let otto = sites.create_operator("otto", "operator");
    let vera = sites.create_operator("vera", "viewer");

    succeeds(
        &sites,
        &otto,
        &["accounts", "create", "alice", "--group", "audited", "--json"],
    );
    // The viewer is refused for her role, not as a stranger: wait until the
    // account servers know her, so the refusal is the one under test.
    let refusal = wait_for(
        "the viewer to be refused for her role",
        Duration::from_secs(30),
        || {
            let out = sites.ctl_as(&vera, &["accounts", "create", "mallory", "--json"]);
            assert!(!out.status.success(), "a viewer created an account");
            let err = stderr(&out);
            err.contains("role viewer").then_some(err)
        },
    );
    assert!(refusal.contains("vera"), "{refusal}");
    succeeds(&sites, &otto, &["groups", "disable", "audited"]);

    let (created, disabled) = wait_for(
        "otto's actions on account-a in history",
        Duration::from_secs(30),
        || {
            let events = audits(&sites);
            let find = |what: &str| {
                events
                    .iter()
                    .find(|e| e["by"] == "otto" && detail(e).contains(what))
                    .cloned()
            };
            Some((
                find("created account alice in group audited")?,
                find("disabled group audited")?,
            ))
        },
    );
    for event in [&created, &disabled] {
        assert_eq!(event["by_role"], "operator", "{event}");
        assert!(
            event["from"]
                .as_str()
                .is_some_and(|f| f.starts_with("127.0.0.1:")),
            "{event}"
        );
        assert!(detail(event).starts_with("on account-a: "), "{event}");
        assert_eq!(event["state"], "done", "{event}");
    }

    let events = audits(&sites);
    // Each action once, however many heartbeats carried it.
    let alice = events
        .iter()
        .filter(|e| detail(e).contains("created account alice"))
        .count();
    assert_eq!(alice, 1, "{events:?}");
    // The refused call changed nothing and left no trace; the harness's
    // own account, created by the first admin, is there too.
    assert!(
        events
            .iter()
            .all(|e| !detail(e).contains("mallory") && e["by"] != "vera"),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e["by"] == "admin"
            && e["by_role"] == "admin"
            && detail(e).contains("created account demo")),
        "{events:?}"
    );
    // Nothing was lost on the way, and the queue drains.
    let metrics = wait_for(
        "account-a's audit queue to drain",
        Duration::from_secs(30),
        || {
            let m = sites.scrape(&sites.account_a.addr);
            m.lines()
                .any(|l| l.starts_with("duplex_audit_pending{") && l.ends_with(" 0"))
                .then_some(m)
        },
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("duplex_audit_dropped_total{") && l.ends_with(" 0")),
        "{metrics}"
    );
}
