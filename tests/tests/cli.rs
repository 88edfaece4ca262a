//! The CLIs' manners, against a real platform: output to a reader that
//! went away, `watch --json`, `--dry-run`, exit codes by cause, shell
//! completions and man pages.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use duplex_tests::twosite::{Options, TwoSites};
use duplex_tests::{bin, wait_for};

/// `duplexctl ARGS` as the platform's admin, with stdout a pipe whose
/// reader is already gone: the first line it writes fails with EPIPE.
fn ctl_into_closed_pipe(p: &TwoSites, args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(bin("duplexctl"))
        .args(args)
        .env("DUPLEX_COORDINATOR", &p.coordinator.addr)
        .env("DUPLEX_CA", &p.ca)
        .env("DUPLEX_OPERATOR_TOKEN", &p.admin_token)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

fn no_panic(out: &std::process::Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn output_survives_a_reader_that_went_away() {
    let p = TwoSites::start(Options::default());
    for args in [&["status"][..], &["status", "--json"], &["history"]] {
        let out = ctl_into_closed_pipe(&p, args);
        no_panic(&out);
        assert_eq!(out.status.code(), Some(0), "duplexctl {args:?}");
    }

    // `watch --json | head -1`: one JSON status per line, and the watch
    // ends when the reader does rather than running on.
    let mut watch = Command::new(bin("duplexctl"))
        .args(["watch", "--json"])
        .env("DUPLEX_COORDINATOR", &p.coordinator.addr)
        .env("DUPLEX_CA", &p.ca)
        .env("DUPLEX_OPERATOR_TOKEN", &p.admin_token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    for _ in 0..2 {
        let line = lines.next().unwrap().unwrap();
        let status: serde_json::Value = serde_json::from_str(&line).expect("each line is one JSON status");
        assert!(
            status["servers"].as_array().is_some_and(|s| s.len() >= 6),
            "{line}"
        );
    }
    drop(lines);
    let code = wait_for("watch to end with its reader", Duration::from_secs(15), || {
        watch.try_wait().unwrap().map(|s| s.code())
    });
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut watch.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(code, Some(0));
}

#[test]
fn dry_run_shows_the_plan_and_changes_nothing() {
    let p = TwoSites::start(Options::default());
    let before = p.status();
    let plan = p.ctl_json(&["failover", "--dry-run"]);
    assert_eq!(plan["dry_run"], true);
    let lines: Vec<&str> = plan["plan"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("storage-a (site a) -> storage-b")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("account-a (site a) -> account-b")),
        "{lines:?}"
    );
    let storage_only = p.ctl_json(&["failover", "--kind", "storage", "--dry-run"]);
    assert_eq!(
        storage_only["plan"].as_array().unwrap().len(),
        1,
        "{storage_only}"
    );
    let text = p.ctl_ok(&["switchover", "--dry-run"]);
    assert!(text.contains("switchover: storage role of storage-a"), "{text}");
    assert!(text.contains("nothing was changed"), "{text}");

    let after = p.status();
    assert_eq!(after["epoch"], before["epoch"], "a dry run moved the epoch");
    for name in ["account-a", "storage-a", "account-b", "storage-b"] {
        assert_eq!(
            p.role(name),
            duplex_tests::twosite::role_in(&before, name),
            "{name}"
        );
    }
    assert!(p.events("failover").is_empty() && p.events("switchover").is_empty());
}

#[test]
fn exit_codes_say_why() {
    let p = TwoSites::start(Options::default());
    // 2: usage, before anything is asked.
    assert_eq!(p.ctl(&["failover", "--kind", "mirror"]).status.code(), Some(2));
    // 1: refused (a token nobody issued).
    let refused = p.ctl_as("dpx_op_not-a-real-token", &["status"]);
    assert_eq!(
        refused.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // 4: nothing answers there.
    let unreachable = Command::new(bin("duplexctl"))
        .args(["status", "--coordinator", "https://127.0.0.1:1"])
        .env("DUPLEX_CA", &p.ca)
        .env("DUPLEX_OPERATOR_TOKEN", &p.admin_token)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&unreachable.stderr);
    assert_eq!(unreachable.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("Connection refused"),
        "the cause is kept: {stderr}"
    );
    let agent = Command::new(bin("duplex"))
        .args([
            "snapshots",
            "--endpoint",
            "https://127.0.0.1:1",
            "--retry-for",
            "0s",
        ])
        .env("DUPLEX_CA", &p.ca)
        .env("DUPLEX_TOKEN", &p.token)
        .env("DUPLEX_PASSWORD", duplex_tests::cluster::TEST_PASSPHRASE)
        .output()
        .unwrap();
    assert_eq!(
        agent.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&agent.stderr)
    );

    // 3: a backup that had to leave something out (a file it may not
    // read) is saved, and says so; a name that is not UTF-8 is kept.
    let tree = p.path("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("kept.txt"), b"kept").unwrap();
    let odd = std::ffi::OsStr::from_bytes(b"not-utf8-\xff.txt");
    std::fs::write(tree.join(odd), b"odd").unwrap();
    let secret = tree.join("secret.txt");
    std::fs::write(&secret, b"unreadable").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o000)).unwrap();
    let mut backup = p.duplex_command(&p.token);
    backup.args(["backup", tree.to_str().unwrap(), "--json"]);
    let out = duplex_tests::bound_by_permissions(&backup).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("secret.txt"),
        "the warning names the file: {stderr}"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["files"], 2, "{report}");
    assert_eq!(report["skipped"], 1, "{report}");
    let restored = p.restore(&p.token, report["snapshot"].as_str().unwrap(), "restored");
    assert_eq!(std::fs::read(restored.join("tree/kept.txt")).unwrap(), b"kept");
    assert_eq!(std::fs::read(restored.join("tree").join(odd)).unwrap(), b"odd");
    assert!(!restored.join("tree/secret.txt").exists());
}

#[test]
fn completions_and_man_pages() {
    let out = Command::new(bin("duplexctl"))
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(
        script.contains("_duplexctl") && script.contains("failover"),
        "{script}"
    );

    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("duplexctl"))
        .args(["man", "--dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for page in [
        "duplexctl.1",
        "duplexctl-failover.1",
        "duplexctl-operators-create.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page} is not a man page");
    }
    let failover = std::fs::read_to_string(dir.path().join("duplexctl-failover.1")).unwrap();
    assert!(failover.contains("dry\\-run"), "the page documents --dry-run");
}

#[test]
fn servers_log_json_lines_naming_the_call_and_the_phase() {
    let p = TwoSites::start(Options {
        coordinator: &["--log-format", "json"],
        ..Options::default()
    });
    p.create_operator("olga", "viewer");
    p.ctl_ok(&["switchover", "--wait"]);
    let log = p.coordinator.log_text();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["timestamp"].is_string())
    );
    assert!(!log.contains('\u{1b}'), "colour codes in a log file");
    let action = lines
        .iter()
        .find(|l| {
            l["fields"]["message"] == "operator action"
                && l["fields"]["detail"].as_str().unwrap_or("").contains("olga")
        })
        .unwrap_or_else(|| panic!("no operator action for olga in {log}"));
    assert_eq!(action["span"]["name"], "rpc", "{action}");
    assert!(
        action["span"]["method"]
            .as_str()
            .unwrap()
            .ends_with("/CreateOperator"),
        "{action}"
    );
    let phase = lines
        .iter()
        .find(|l| l["span"]["name"] == "operation" && l["span"]["kind"] == "switchover")
        .unwrap_or_else(|| panic!("no line inside a switchover's span in {log}"));
    assert!(phase["span"]["phase"].is_string(), "{phase}");
}
