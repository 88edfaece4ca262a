//! Servers join the coordinator only with a fresh one-time token, and
//! keep the credential they get for later restarts.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use duplex_tests::twosite::enrollment_token;
use duplex_tests::{Service, bin, wait_for};

fn coordinator(dir: &Path) -> Service {
    let cmd = vec![
        bin("duplex-coordinator").display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        dir.join("coordinator").display().to_string(),
    ];
    Service::start("coordinator", cmd, &dir.join("coordinator.log"))
}

fn mirror(dir: &Path, name: &str, coordinator: &str, token: &str) -> Service {
    let cmd = vec![
        bin("duplex-mirror").display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        dir.join(name).display().to_string(),
        "--name".into(),
        name.into(),
        "--coordinator".into(),
        coordinator.into(),
        "--enrollment-token".into(),
        token.into(),
    ];
    Service::start(name, cmd, &dir.join(format!("{name}.log")))
}

fn listed(coordinator: &str, name: &str) -> bool {
    let out = Command::new(bin("duplexctl"))
        .args(["--coordinator", coordinator, "status", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["servers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["name"] == name && s["healthy"] == true)
}

fn wait_log(service: &Service, text: &str) {
    wait_for(
        &format!("{} to log {text:?}", service.name),
        Duration::from_secs(20),
        || service.log_text().contains(text).then_some(()),
    );
}

#[test]
fn servers_join_only_with_a_fresh_one_time_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c = coordinator(d);

    let stranger = mirror(d, "mirror-x", &c.addr, "not-a-token");
    wait_log(&stranger, "unknown or already spent");

    let token = enrollment_token(&c.addr);
    let mut first = mirror(d, "mirror-a", &c.addr, &token);
    wait_for("mirror-a to join", Duration::from_secs(20), || {
        listed(&c.addr, "mirror-a").then_some(())
    });
    let second = mirror(d, "mirror-b", &c.addr, &token);
    wait_log(&second, "unknown or already spent");

    let out = Command::new(bin("duplexctl"))
        .args([
            "--coordinator",
            &c.addr,
            "servers",
            "token",
            "--ttl",
            "1s",
            "--json",
        ])
        .output()
        .unwrap();
    let short: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let issued = Instant::now();
    wait_for("the short token to expire", Duration::from_secs(10), || {
        (issued.elapsed() > Duration::from_millis(1500)).then_some(())
    });
    let late = mirror(d, "mirror-c", &c.addr, short["token"].as_str().unwrap());
    wait_log(&late, "has expired");

    // A restart needs no token: the credential from enrollment is kept.
    first.kill();
    wait_for("mirror-a to be seen down", Duration::from_secs(20), || {
        (!listed(&c.addr, "mirror-a")).then_some(())
    });
    first.restart();
    wait_for(
        "mirror-a to rejoin with its credential",
        Duration::from_secs(20),
        || listed(&c.addr, "mirror-a").then_some(()),
    );
    for refused in ["mirror-x", "mirror-b", "mirror-c"] {
        assert!(
            !listed(&c.addr, refused),
            "{refused} joined without a valid token"
        );
    }
}
