//! Servers join by enrolling: a one-time token bound to one name, site and
//! kind, exchanged with the coordinator for a certificate from the cluster
//! CA (the key never leaves the server). The certificate is kept for later
//! starts, renewed before it expires, and revoked when the server is
//! removed.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use duplex_tests::twosite::Enroller;
use duplex_tests::{Service, bin, wait_for};

fn coordinator(dir: &Path, extra: &[&str]) -> Service {
    let mut cmd = vec![
        bin("duplex-coordinator").display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        dir.join("coordinator").display().to_string(),
    ];
    cmd.extend(extra.iter().map(|s| s.to_string()));
    Service::start("coordinator", cmd, &dir.join("coordinator.log"))
}

fn enroller(dir: &Path, c: &Service) -> Enroller {
    Enroller {
        coordinator: c.addr.clone(),
        ca: dir.join("coordinator/ca/ca.pem"),
        admin_token: std::fs::read_to_string(dir.join("coordinator/admin-token"))
            .unwrap()
            .trim()
            .to_owned(),
    }
}

/// A mirror's argv, enrolling with the token in `token_file` if it has no certificate.
fn mirror_cmd(dir: &Path, e: &Enroller, name: &str, token_file: &Path) -> Vec<String> {
    [
        bin("duplex-mirror").display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        dir.join(name).display().to_string(),
        "--name".into(),
        name.into(),
        "--site".into(),
        "a".into(),
        "--coordinator".into(),
        e.coordinator.clone(),
        "--ca".into(),
        e.ca.display().to_string(),
        "--enrollment-token-file".into(),
        token_file.display().to_string(),
    ]
    .into()
}

/// Runs a server that must fail to enroll; its stderr.
fn refused(cmd: &[String]) -> String {
    let out = Command::new(&cmd[0]).args(&cmd[1..]).output().unwrap();
    assert!(!out.status.success(), "{cmd:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ctl(e: &Enroller, args: &[&str]) -> std::process::Output {
    Command::new(bin("duplexctl"))
        .args(args)
        .env("DUPLEX_COORDINATOR", &e.coordinator)
        .env("DUPLEX_CA", &e.ca)
        .env("DUPLEX_OPERATOR_TOKEN", &e.admin_token)
        .output()
        .unwrap()
}

fn listed(e: &Enroller, name: &str) -> bool {
    let out = ctl(e, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["servers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["name"] == name && s["healthy"] == true)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn servers_enroll_once_with_a_token_bound_to_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c = coordinator(d, &[]);
    let e = enroller(d, &c);
    assert_eq!(mode(&d.join("coordinator/admin-token")), 0o600);
    assert_eq!(mode(&d.join("coordinator/ca/ca.key")), 0o600);

    // A made-up token.
    let bogus = e.token_file(d, "bogus", "not-a-token");
    let err = refused(&mirror_cmd(d, &e, "mirror-x", &bogus));
    assert!(err.contains("unknown or already spent"), "{err}");

    // A token issued for another name is spent by the attempt.
    let for_a = e.token("mirror-a", "a", "mirror");
    let file = e.token_file(d, "mirror-a", &for_a);
    let err = refused(&mirror_cmd(d, &e, "mirror-b", &file));
    assert!(err.contains("issued for mirror mirror-a"), "{err}");
    let err = refused(&mirror_cmd(d, &e, "mirror-a", &file));
    assert!(err.contains("unknown or already spent"), "{err}");

    // An expired token.
    let out = ctl(
        &e,
        &[
            "servers", "token", "mirror-c", "--site", "a", "--kind", "mirror", "--ttl", "1s", "--json",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let short: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let issued = Instant::now();
    wait_for("the short token to expire", Duration::from_secs(10), || {
        (issued.elapsed() > Duration::from_millis(1500)).then_some(())
    });
    let late = e.token_file(d, "mirror-c", short["token"].as_str().unwrap());
    let err = refused(&mirror_cmd(d, &e, "mirror-c", &late));
    assert!(err.contains("has expired"), "{err}");

    // The right token: a certificate, a private key only the server reads.
    let good = e.token_file(d, "mirror-a", &e.token("mirror-a", "a", "mirror"));
    let mut first = Service::start(
        "mirror-a",
        mirror_cmd(d, &e, "mirror-a", &good),
        &d.join("mirror-a.log"),
    );
    assert!(first.addr.starts_with("https://"), "{}", first.addr);
    wait_for("mirror-a to join", Duration::from_secs(60), || {
        listed(&e, "mirror-a").then_some(())
    });
    assert_eq!(mode(&d.join("mirror-a")), 0o700);
    assert_eq!(mode(&d.join("mirror-a/tls/server.key")), 0o600);

    // A second token for an enrolled name is refused at issue.
    let out = ctl(
        &e,
        &["servers", "token", "mirror-a", "--site", "a", "--kind", "mirror"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already enrolled"));

    // A restart needs no token: the certificate is kept.
    first.kill();
    wait_for("mirror-a to be seen down", Duration::from_secs(60), || {
        (!listed(&e, "mirror-a")).then_some(())
    });
    first.restart();
    wait_for(
        "mirror-a to rejoin with its certificate",
        Duration::from_secs(60),
        || listed(&e, "mirror-a").then_some(()),
    );

    // Removal revokes its certificate: restarted as it was, it is refused.
    first.kill();
    wait_for("mirror-a to be seen down", Duration::from_secs(60), || {
        (!listed(&e, "mirror-a")).then_some(())
    });
    let out = ctl(&e, &["servers", "remove", "mirror-a"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    first.restart();
    wait_for(
        "the revoked mirror-a to be refused",
        Duration::from_secs(60),
        || first.log_text().contains("has been revoked").then_some(()),
    );
    assert!(!listed(&e, "mirror-a"), "a revoked server joined");
    for never in ["mirror-x", "mirror-b", "mirror-c"] {
        assert!(!listed(&e, never), "{never} joined without a valid token");
    }
    // The audit trail names who issued tokens and removed the server.
    let out = ctl(&e, &["history", "--json"]);
    let history: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let audits: Vec<_> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "audit")
        .collect();
    assert!(
        audits.iter().any(|a| a["by"] == "admin"
            && a["by_role"] == "admin"
            && a["detail"].as_str().unwrap().contains("removed server mirror-a")),
        "{audits:?}"
    );
    assert!(
        audits
            .iter()
            .all(|a| a["from"].as_str().is_some_and(|f| f.starts_with("127.0.0.1:")))
    );
}

#[test]
fn certificates_renew_themselves_before_they_expire() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Short-lived certificates: renewed after two thirds of 6 s.
    let c = coordinator(d, &["--cert-lifetime", "6s"]);
    let e = enroller(d, &c);
    let token = e.token_file(d, "mirror-a", &e.token("mirror-a", "a", "mirror"));
    let m = Service::start(
        "mirror-a",
        mirror_cmd(d, &e, "mirror-a", &token),
        &d.join("mirror-a.log"),
    );
    let cert = d.join("mirror-a/tls/server.pem");
    let first = std::fs::read_to_string(&cert).unwrap();
    wait_for(
        "the certificate to be renewed twice",
        Duration::from_secs(30),
        || (m.log_text().matches("certificate renewed").count() >= 2).then_some(()),
    );
    assert_ne!(std::fs::read_to_string(&cert).unwrap(), first);
    // Well past the first certificate's expiry, the mirror still heartbeats
    // with its renewed one.
    wait_for("mirror-a to be listed healthy", Duration::from_secs(60), || {
        listed(&e, "mirror-a").then_some(())
    });
}
