//! Every server is self-describing (reflection v1 and v1alpha), answers
//! the standard health check and its `healthcheck` subcommand, drains on
//! SIGTERM; the playground starts a working cluster and leaves no orphans.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use duplex_tests::{Cluster, bin, runtime, wait_for};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

async fn reflected_services(addr: &str) -> Vec<String> {
    let mut client = ServerReflectionClient::new(duplex_rpc::channel(addr).unwrap());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(futures::stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

fn grpcurl_list(addr: &str) -> Option<String> {
    let host = addr.trim_start_matches("http://");
    let out = Command::new("grpcurl")
        .args(["-plaintext", host, "list"])
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "grpcurl list {host}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn every_server_answers_reflection_and_health() {
    let cluster = Cluster::start();
    let rt = runtime();
    for (service, expected) in [
        (
            &cluster.account,
            ["duplex.v1.AccountService", "duplex.v1.AccountAdmin"],
        ),
        (
            &cluster.storage,
            ["duplex.v1.StorageService", "duplex.v1.StorageAdmin"],
        ),
    ] {
        let listed = rt.block_on(reflected_services(&service.addr));
        for name in expected
            .iter()
            .chain(&["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"])
        {
            assert!(
                listed.iter().any(|s| s == name),
                "{}: {name} not in {listed:?}",
                service.name
            );
        }
        // Only what the server serves is advertised.
        let foreign = if service.name.starts_with("account") {
            "duplex.v1.StorageService"
        } else {
            "duplex.v1.AccountService"
        };
        assert!(
            !listed.iter().any(|s| s == foreign),
            "{}: advertises {foreign}",
            service.name
        );
        rt.block_on(duplex_rpc::health::check(&service.addr, "")).unwrap();
        rt.block_on(duplex_rpc::health::check(&service.addr, expected[0]))
            .unwrap();
        let binary = service.cmd[0].clone();
        let status = Command::new(&binary)
            .args(["healthcheck", "--insecure-plaintext", "--addr", &service.addr])
            .status()
            .unwrap();
        assert!(status.success(), "{} healthcheck failed", service.name);
        // Real grpcurl, where installed (CI installs it).
        match grpcurl_list(&service.addr) {
            Some(text) => assert!(text.contains(expected[0]), "grpcurl list: {text}"),
            None if std::env::var_os("DUPLEX_REQUIRE_GRPCURL").is_some() => {
                panic!("grpcurl is not installed")
            }
            None => eprintln!("grpcurl not installed; reflection checked with the Rust client only"),
        }
    }
}

#[test]
fn healthcheck_fails_when_nothing_listens_and_sigterm_exits_cleanly() {
    let mut cluster = Cluster::start();
    let addr = cluster.storage.addr.clone();
    let status = cluster.storage.terminate();
    assert!(status.success(), "storage server exited with {status} on SIGTERM");
    assert!(cluster.storage.log_text().contains("SIGTERM received"));
    let status = Command::new(bin("duplex-storage-server"))
        .args(["healthcheck", "--addr", &addr])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "healthcheck passed with the server gone");
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

#[test]
fn playground_runs_a_cluster_and_stops_every_child() {
    let dir = tempfile::tempdir().unwrap();
    let mut playground = Command::new(bin("duplexctl"))
        .args(["playground", "--dir", dir.path().to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let file = dir.path().join("playground.json");
    let info: serde_json::Value = wait_for("playground.json", Duration::from_secs(60), || {
        serde_json::from_slice(&std::fs::read(&file).ok()?).ok()
    });
    let endpoint = info["endpoints"][0].as_str().unwrap().to_owned();
    let token = info["account"]["token"].as_str().unwrap().to_owned();
    assert_eq!(info["account"]["name"], "demo");
    // Secure by default: a CA, an operator token, the demo passphrase, TLS
    // everywhere, and a file only its owner can read.
    let ca = std::path::PathBuf::from(info["ca"].as_str().unwrap());
    let operator_token = info["operator_token"].as_str().unwrap().to_owned();
    let password = info["password"].as_str().unwrap().to_owned();
    assert!(ca.exists() && !operator_token.is_empty() && !password.is_empty());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "playground.json holds secrets");
    }
    let roots = duplex_rpc::tls::roots(Some(&ca)).unwrap();
    duplex_rpc::tls::set_client_mode(duplex_rpc::tls::ClientMode::ByScheme(
        duplex_rpc::tls::client_config(roots, None).unwrap(),
    ));
    let agent = |args: &[&str]| {
        Command::new(bin("duplex"))
            .args(args)
            .env("DUPLEX_ENDPOINT", &endpoint)
            .env("DUPLEX_TOKEN", &token)
            .env("DUPLEX_CA", &ca)
            .env("DUPLEX_PASSWORD", &password)
            .output()
            .unwrap()
    };
    let services = info["services"].as_array().unwrap().clone();
    let names: Vec<&str> = services.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "coordinator",
            "account-a",
            "account-b",
            "storage-a",
            "storage-b",
            "mirror-a",
            "mirror-b"
        ]
    );
    let rt = runtime();
    for s in &services {
        let addr = s["addr"].as_str().unwrap();
        assert!(addr.starts_with("https://"), "{addr}");
        rt.block_on(duplex_rpc::health::check(addr, "")).unwrap();
        assert!(!rt.block_on(reflected_services(addr)).is_empty());
        let binary = match s["kind"].as_str().unwrap() {
            "mirror" => "duplex-mirror".to_owned(),
            "coordinator" => "duplex-coordinator".to_owned(),
            kind => format!("duplex-{kind}-server"),
        };
        assert!(s["cmd"][0].as_str().unwrap().ends_with(&binary));
    }

    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello"), b"hello duplex").unwrap();
    let out = agent(&["backup", src.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let target = dir.path().join("restored");
    let out = agent(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(target.join("src/hello")).unwrap(), b"hello duplex");
    // Sync mirroring: the acknowledged snapshot is already on storage-b.
    let b = services.iter().find(|s| s["name"] == "storage-b").unwrap()["addr"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = agent(&["--storage", &b, "snapshots", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["snapshots"].as_array().unwrap().len(), 1, "{listed}");

    // The coordinator sees every service with its role, and a dead one as down.
    let coordinator = info["coordinator"].as_str().unwrap().to_owned();
    let status = |c: &str| -> serde_json::Value {
        let out = Command::new(bin("duplexctl"))
            .args(["--coordinator", c, "status", "--json"])
            .env("DUPLEX_CA", &ca)
            .env("DUPLEX_OPERATOR_TOKEN", &operator_token)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let roles = |v: &serde_json::Value| -> Vec<(String, String, bool)> {
        v["servers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().unwrap().to_owned(),
                    s["role"].as_str().unwrap().to_owned(),
                    s["healthy"].as_bool().unwrap(),
                )
            })
            .collect()
    };
    let want = |name: &str, role: &str, healthy: bool| (name.to_owned(), role.to_owned(), healthy);
    wait_for("every service to report", Duration::from_secs(20), || {
        let r = roles(&status(&coordinator));
        let expected = [
            want("coordinator", "running", true),
            want("account-a", "master", true),
            want("account-b", "slave", true),
            want("storage-a", "primary", true),
            want("storage-b", "replica", true),
            want("mirror-a", "running", true),
            want("mirror-b", "running", true),
        ];
        expected.iter().all(|e| r.contains(e)).then_some(())
    });
    let storage_b = services.iter().find(|s| s["name"] == "storage-b").unwrap();
    // SAFETY: SIGKILL to a service the playground started for this test.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(storage_b["pid"].as_i64().unwrap() as i32, libc::SIGKILL);
    }
    let v = wait_for("storage-b to show as down", Duration::from_secs(20), || {
        let v = status(&coordinator);
        roles(&v).contains(&want("storage-b", "down", false)).then_some(v)
    });
    let replica = v["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "storage-b")
        .unwrap()
        .clone();
    assert_eq!(
        (replica["kind"].as_str(), replica["site"].as_str()),
        (Some("storage"), Some("b"))
    );

    let pids: Vec<i32> = services
        .iter()
        .filter(|s| s["name"] != "storage-b")
        .map(|s| s["pid"].as_i64().unwrap() as i32)
        .collect();
    // SAFETY: SIGTERM to the playground child we spawned.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(playground.id() as i32, libc::SIGTERM);
    }
    let status = wait_for("the playground to exit", Duration::from_secs(30), || {
        playground.try_wait().unwrap()
    });
    assert!(status.success(), "playground exited with {status}");
    wait_for("every child to exit", Duration::from_secs(10), || {
        pids.iter().all(|p| !pid_alive(*p)).then_some(())
    });
}

#[test]
fn servers_read_a_toml_config_file_below_env_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("account.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nname = \"from-file\"\nsite = \"file-site\"\ndata-dir = \"{}\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let rt = runtime();
    for (extra, env, name, site) in [
        (vec![], None, "from-file", "file-site"),
        (vec![], Some(("DUPLEX_NAME", "from-env")), "from-env", "file-site"),
        (
            vec!["--name", "from-flag"],
            Some(("DUPLEX_NAME", "from-env")),
            "from-flag",
            "file-site",
        ),
    ] {
        let mut cmd = Command::new(bin("duplex-account-server"));
        cmd.args(["--config", config.to_str().unwrap(), "--insecure-plaintext"])
            .args(&extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let addr = line.trim().strip_prefix("listening on ").unwrap().to_owned();
        let status = rt.block_on(duplex_tests::accounts::status(&addr));
        let server = status.server.unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!((server.name.as_str(), server.site.as_str()), (name, site));
    }
    // A typo or a bad value is refused at start, naming the file and the key.
    for (text, expected) in [
        (
            "lisen = \"127.0.0.1:0\"\n",
            "unknown key \"lisen\"; did you mean \"listen\"?",
        ),
        (
            "sync-timeout = \"soon\"\n",
            "key \"sync-timeout\": invalid value 'soon'",
        ),
    ] {
        std::fs::write(&config, text).unwrap();
        let out = Command::new(bin("duplex-account-server"))
            .args(["--config", config.to_str().unwrap(), "--insecure-plaintext"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!("config file {}", config.display())),
            "{stderr}"
        );
        assert!(stderr.contains(expected), "{stderr}");
    }
}

/// A server whose stderr pipe is gone (its supervisor died, a log shipper
/// was restarted) still stops on SIGTERM: a log line it cannot write must
/// not take down the task that waits for the signal.
#[test]
fn sigterm_stops_a_server_whose_log_pipe_is_closed() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin("duplex-account-server"))
        .args([
            "--insecure-plaintext",
            "--listen",
            "127.0.0.1:0",
            "--name",
            "account-t",
            "--data-dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line).unwrap();
    assert!(line.contains("listening on"), "{line}");
    // Close the read end: every later log line fails with EPIPE.
    drop(child.stderr.take());
    // SAFETY: kill(2) on a child we own and have not reaped.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = wait_for("the server to exit on SIGTERM", Duration::from_secs(20), || {
        child.try_wait().unwrap()
    });
    assert!(status.success(), "exited with {status}");
}
