//! A one-member etcd from PATH (Debian's `etcd-server`) on loopback ports,
//! for the tests and benches of what keeps its state there.

use std::process::{Child, Command, Stdio};

/// A running etcd; killed and its data removed when dropped.
pub struct EtcdServer {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Starts etcd, or returns None (with a note) where none is installed; CI
/// installs it and sets DUPLEX_REQUIRE_ETCD so it cannot be skipped there.
pub fn start() -> Option<EtcdServer> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .args(["--name", "t", "--data-dir"])
        .arg(dir.path())
        .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("t={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match child {
        Ok(child) => Some(EtcdServer {
            child,
            url,
            _dir: dir,
        }),
        Err(_) if std::env::var_os("DUPLEX_REQUIRE_ETCD").is_some() => {
            panic!("etcd is not installed (apt-get install etcd-server)")
        }
        Err(_) => {
            eprintln!("etcd not installed; skipping");
            None
        }
    }
}
