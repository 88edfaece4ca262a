//! A one-site cluster of real processes: an account server and a storage
//! server on loopback port 0, data in a temporary directory. Without a
//! coordinator there is no CA to enroll with, so it runs (and its clients
//! talk) with `--insecure-plaintext`; `TwoSites` is the secure platform.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::{Service, bin};

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub account: Service,
    pub storage: Service,
}

impl Cluster {
    pub fn start() -> Cluster {
        Self::start_with(&[])
    }

    /// Like `start`, with extra flags for storage-a.
    pub fn start_with(storage_flags: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let account = Service::start(
            "account-a",
            server_cmd("duplex-account-server", "account-a", dir.path()),
            &dir.path().join("account-a.log"),
        );
        let mut storage_cmd = server_cmd("duplex-storage-server", "storage-a", dir.path());
        storage_cmd.extend(["--account-servers".into(), account.addr.clone()]);
        storage_cmd.extend(storage_flags.iter().map(|s| s.to_string()));
        let storage = Service::start("storage-a", storage_cmd, &dir.path().join("storage-a.log"));
        let cluster = Cluster {
            dir,
            account,
            storage,
        };
        // Accounts can be homed only once the storage server has registered.
        crate::wait_for(
            "storage-a to register",
            std::time::Duration::from_secs(20),
            || {
                let out = cluster.ctl(&["accounts", "list", "--json"]);
                out.status.success().then_some(())?;
                let servers = crate::runtime().block_on(cluster.storage_servers());
                (!servers.is_empty()).then_some(())
            },
        );
        cluster
    }

    async fn storage_servers(&self) -> Vec<duplex_proto::v1::ServerInfo> {
        use duplex_proto::v1::account_admin_client::AccountAdminClient;
        let Ok(channel) = duplex_rpc::channel(&self.account.addr) else {
            return Vec::new();
        };
        AccountAdminClient::new(channel)
            .list_storage_servers(duplex_proto::v1::ListStorageServersRequest {})
            .await
            .map(|r| r.into_inner().servers)
            .unwrap_or_default()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `duplexctl ARGS` against this cluster.
    pub fn ctl(&self, args: &[&str]) -> Output {
        crate::output_within_limit(
            Command::new(bin("duplexctl"))
                .args(args)
                .env("DUPLEX_ENDPOINT", &self.account.addr)
                .env("DUPLEX_INSECURE_PLAINTEXT", "1"),
        )
    }

    /// Creates an account and returns its token.
    pub fn create_account(&self, name: &str, group: Option<&str>) -> String {
        let mut args = vec!["accounts", "create", name, "--json"];
        if let Some(g) = group {
            args.extend(["--group", g]);
        }
        let out = self.ctl(&args);
        assert!(
            out.status.success(),
            "create account: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["home"], "storage-a");
        v["token"].as_str().unwrap().to_owned()
    }

    /// `duplex ARGS` as the account with `token`.
    /// `duplex ARGS` as the account with `token`, its file cache in this
    /// cluster's directory.
    pub fn duplex(&self, token: &str, args: &[&str]) -> Output {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        self.duplex_os(token, &args)
    }

    /// `duplex ARGS`, where an argument may be a name that is not UTF-8.
    pub fn duplex_os(&self, token: &str, args: &[&std::ffi::OsStr]) -> Output {
        let mut cmd = duplex(&self.account.addr, token, args);
        cmd.env("DUPLEX_CACHE_DIR", self.path("agent-cache"));
        crate::output_within_limit(&mut cmd)
    }

    /// `duplex ARGS --json`, asserting success; the parsed output.
    pub fn duplex_json(&self, token: &str, args: &[&str]) -> serde_json::Value {
        let mut args = args.to_vec();
        args.push("--json");
        let out = self.duplex(token, &args);
        assert!(
            out.status.success(),
            "duplex {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "duplex {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    pub fn backup(&self, token: &str, path: &Path) -> serde_json::Value {
        self.duplex_json(token, &["backup", path.to_str().unwrap()])
    }

    /// Restores `snapshot` into a fresh directory `into`, asserting success.
    pub fn restore(&self, token: &str, snapshot: &str, into: &str) -> PathBuf {
        let target = self.path(into);
        let out = self.duplex(
            token,
            &["restore", snapshot, "--target", target.to_str().unwrap()],
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        target
    }
}

/// The encryption passphrase the harness gives every agent it runs.
pub const TEST_PASSPHRASE: &str = "duplex test passphrase";

fn duplex(endpoint: &str, token: &str, args: &[&std::ffi::OsStr]) -> Command {
    let mut cmd = Command::new(bin("duplex"));
    cmd.args(args)
        .env("DUPLEX_ENDPOINT", endpoint)
        .env("DUPLEX_TOKEN", token)
        .env("DUPLEX_INSECURE_PLAINTEXT", "1")
        .env("DUPLEX_PASSWORD", TEST_PASSPHRASE);
    cmd
}

fn server_cmd(binary: &str, name: &str, dir: &Path) -> Vec<String> {
    vec![
        bin(binary).display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        dir.join(name).display().to_string(),
        "--name".into(),
        name.into(),
        "--site".into(),
        "a".into(),
        "--insecure-plaintext".into(),
    ]
}
