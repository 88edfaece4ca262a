//! What an operator watches: every server's `/metrics` passes `promtool
//! check metrics`, exports the figures the shipped alert rules and
//! dashboard query, and the rules load and fire as their unit tests say.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use duplex_tests::alerts::{Posted, SmtpSink, https_webhook};
use duplex_tests::twosite::{Options, TwoSites};
use duplex_tests::wait_for;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs promtool, or says why not: CI installs it (Debian's `prometheus`)
/// and sets DUPLEX_REQUIRE_PROMTOOL so it cannot be skipped there.
fn promtool(args: &[&str], stdin: Option<&str>) -> Option<(bool, String)> {
    let child = Command::new("promtool")
        .args(args)
        .current_dir(repo())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(_) if std::env::var_os("DUPLEX_REQUIRE_PROMTOOL").is_some() => {
            panic!("promtool is not installed (apt-get install prometheus)")
        }
        Err(_) => {
            eprintln!("promtool not installed; skipping its checks");
            return None;
        }
    };
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), text))
}

/// The `duplex_*` metric names a rules or dashboard file queries.
fn queried_names(file: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo().join(file)).unwrap();
    let mut names = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("duplex_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        // Histograms are queried by their series.
        let family = name.strip_suffix("_bucket").unwrap_or(name);
        names.insert(family.to_owned());
        rest = &tail[end..];
    }
    names
}

/// The metric families a scrape declares.
fn families(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn alert_rules_load_and_fire_as_their_unit_tests_say() {
    let Some((ok, out)) = promtool(&["check", "rules", "deploy/monitoring/alerts.yml"], None) else {
        return;
    };
    assert!(ok, "promtool check rules: {out}");
    assert!(out.contains("SUCCESS"), "{out}");
    let (ok, out) = promtool(&["test", "rules", "deploy/monitoring/alerts.test.yml"], None).unwrap();
    assert!(ok, "promtool test rules: {out}");
    let dashboard = std::fs::read_to_string(repo().join("deploy/monitoring/dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    assert!(!dashboard["panels"].as_array().unwrap().is_empty());
}

#[test]
fn every_server_exports_metrics_promtool_accepts_and_the_rules_query() {
    let sites = TwoSites::start(Options::default());
    let tree = sites.path("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("file"), b"watched").unwrap();
    sites.backup(&sites.token, &tree);
    sites.wait_lag_known("storage-b", 0);
    let mut exported = BTreeSet::new();
    for service in [
        &sites.coordinator,
        &sites.account_a,
        &sites.account_b,
        &sites.storage_a,
        &sites.storage_b,
        &sites.mirror_a,
        &sites.mirror_b,
    ] {
        // The first scrape is itself a call the second one counts, on a
        // server (a slave) that may have served none yet.
        sites.scrape(&service.addr);
        let scrape = sites.scrape(&service.addr);
        if let Some((ok, out)) = promtool(&["check", "metrics"], Some(&scrape)) {
            assert!(
                ok && out.trim().is_empty(),
                "{}: promtool check metrics: {out}\n{scrape}",
                service.name
            );
        }
        let names = families(&scrape);
        for common in [
            "duplex_build_info",
            "duplex_rpc_duration_seconds",
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
        ] {
            assert!(names.contains(common), "{}: no {common}\n{scrape}", service.name);
        }
        exported.extend(names);
    }
    let coordinator = sites.scrape(&sites.coordinator.addr);
    // Every outcome is there from zero, so a rule sees the first refusal as an increase.
    assert!(
        coordinator.contains("duplex_operations_finished_total{kind=\"failover\",state=\"refused\"} 0"),
        "{coordinator}"
    );
    assert!(
        coordinator.contains("duplex_server_healthy{assigned_role=\"replica\",kind=\"storage\",server=\"storage-b\",site=\"b\"} 1"),
        "{coordinator}"
    );
    let storage = sites.scrape(&sites.storage_a.addr);
    let age = storage
        .lines()
        .find(|l| l.starts_with("duplex_storage_account_last_backup_age_seconds{account="))
        .unwrap_or_else(|| panic!("no per-account backup age\n{storage}"));
    let seconds: f64 = age.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((0.0..600.0).contains(&seconds), "{age}");
    // The shipped rules and dashboard query only what the servers export.
    for file in ["deploy/monitoring/alerts.yml", "deploy/monitoring/dashboard.json"] {
        let missing: Vec<String> = queried_names(file).difference(&exported).cloned().collect();
        assert!(
            missing.is_empty(),
            "{file} queries metrics no server exports: {missing:?}"
        );
    }
}

/// Waits until `check` finds what it looks for in the coordinator's
/// history, the HTTPS webhook and (when aiosmtpd runs) the mailbox.
fn wait_alerted(sites: &TwoSites, posted: &Posted, smtp: Option<&SmtpSink>, kind: &str, server: &str) {
    let deadline = Duration::from_secs(30);
    let names = |detail: &serde_json::Value| detail.as_str().is_some_and(|d| d.contains(server));
    wait_for(&format!("{kind} of {server} in history"), deadline, || {
        sites
            .events(kind)
            .iter()
            .any(|e| names(&e["detail"]))
            .then_some(())
    });
    wait_for(
        &format!("{kind} of {server} at the https webhook"),
        deadline,
        || {
            posted
                .lock()
                .unwrap()
                .iter()
                .any(|e| e["kind"] == kind && names(&e["detail"]))
                .then_some(())
        },
    );
    if let Some(smtp) = smtp {
        let subject = format!("Subject: [duplex] {kind} reported: ");
        wait_for(&format!("{kind} of {server} by email"), deadline, || {
            smtp.messages()
                .iter()
                .any(|m| m.contains(&subject) && m.contains(server) && m.contains("To: ops@example.com"))
                .then_some(())
        });
    }
}

#[test]
fn a_lost_standby_and_link_are_alerted_in_history_over_https_and_by_email_and_so_is_their_return() {
    let dir = tempfile::tempdir().unwrap();
    let (hook, ca, posted) = https_webhook(dir.path());
    let smtp = SmtpSink::start(dir.path());
    let ca = ca.display().to_string();
    let mut flags = vec!["--webhook", hook.as_str(), "--webhook-ca", ca.as_str()];
    if let Some(smtp) = &smtp {
        flags.extend([
            "--smtp-url",
            smtp.url.as_str(),
            "--alert-email",
            "ops@example.com",
        ]);
    }
    let mut sites = TwoSites::start(Options {
        coordinator: &flags,
        ..Options::default()
    });
    sites.wait_lag_known("storage-b", 0);
    // The replica dies: nothing fails over, but site a has no standby now.
    sites.storage_b.signal(libc::SIGKILL);
    wait_alerted(&sites, &posted, smtp.as_ref(), "standby-lost", "storage-b");
    // And the link into it, whose mirror still heartbeats, stops copying.
    wait_alerted(
        &sites,
        &posted,
        smtp.as_ref(),
        "link-lost",
        "storage-a -> storage-b",
    );
    let about_b = |sites: &TwoSites, kind: &str| {
        sites
            .events(kind)
            .into_iter()
            .filter(|e| {
                let about = if kind.starts_with("link") {
                    "storage-a -> storage-b"
                } else {
                    "storage-b (site b)"
                };
                e["detail"].as_str().unwrap().contains(about)
            })
            .collect::<Vec<_>>()
    };
    let lost = about_b(&sites, "standby-lost");
    assert!(
        lost[0]["detail"]
            .as_str()
            .unwrap()
            .contains("replica storage-b (site b) stopped heartbeating"),
        "{lost:?}"
    );
    assert!(sites.events("failover").is_empty(), "{:?}", sites.history());
    sites.storage_b.restart();
    wait_alerted(&sites, &posted, smtp.as_ref(), "standby-regained", "storage-b");
    wait_alerted(
        &sites,
        &posted,
        smtp.as_ref(),
        "link-regained",
        "storage-a -> storage-b",
    );
    // Each change is told once, not on every heartbeat.
    assert_eq!(about_b(&sites, "standby-lost").len(), 1, "{:?}", sites.history());
    assert_eq!(
        about_b(&sites, "standby-regained").len(),
        1,
        "{:?}",
        sites.history()
    );
    assert_eq!(about_b(&sites, "link-lost").len(), 1, "{:?}", sites.history());
    assert_eq!(about_b(&sites, "link-regained").len(), 1, "{:?}", sites.history());
}
