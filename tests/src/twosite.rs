//! The whole two-site platform as real processes, like the playground but
//! owned by the test: a coordinator, and per site an account server, a
//! storage server and a mirror, all enrolled with one-time tokens. Any
//! server can be killed, stopped, restarted as it was, or cut off from the
//! coordinator through a fault proxy.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::proxy::Proxy;
use crate::{Service, bin, wait_for};

pub struct Options<'a> {
    pub mode: &'a str,
    /// Extra coordinator flags.
    pub coordinator: &'a [&'a str],
    /// The coordinator binary (the failpoints build for resume tests).
    pub coordinator_bin: &'a str,
    /// storage-a reaches the coordinator through a fault proxy.
    pub proxy_storage_a: bool,
    /// `DUPLEX_FAILPOINT` for the coordinator.
    pub failpoint: Option<&'a str>,
    /// Extra flags for both storage servers.
    pub storage: &'a [&'a str],
}

impl Default for Options<'_> {
    fn default() -> Self {
        Self {
            mode: "active-passive",
            coordinator: &[],
            coordinator_bin: "duplex-coordinator",
            proxy_storage_a: false,
            failpoint: None,
            storage: &[],
        }
    }
}

/// One platform at a time per test binary: the failure detector's timeouts
/// are real time, and nine platforms on two cores would starve heartbeats.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub struct TwoSites {
    pub dir: tempfile::TempDir,
    pub coordinator: Service,
    pub account_a: Service,
    pub account_b: Service,
    pub storage_a: Service,
    pub storage_b: Service,
    pub mirror_a: Service,
    pub mirror_b: Service,
    /// Between storage-a and the coordinator, when asked for.
    pub proxy: Option<Proxy>,
    /// Token of the account `demo`.
    pub token: String,
    /// The cluster CA the coordinator created on its first start.
    pub ca: PathBuf,
    /// The first admin's token, which the coordinator wrote to its data dir.
    pub admin_token: String,
    _turn: std::sync::MutexGuard<'static, ()>,
}

fn cmd(binary: &str, name: &str, site: &str, dir: &Path, extra: &[String]) -> Vec<String> {
    let mut cmd = vec![
        bin(binary).display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        dir.join(name).display().to_string(),
        "--name".into(),
        name.into(),
        "--site".into(),
        site.into(),
    ];
    cmd.extend_from_slice(extra);
    cmd
}

fn strings(s: &[&str]) -> Vec<String> {
    s.iter().map(|x| (*x).to_owned()).collect()
}

impl Drop for TwoSites {
    fn drop(&mut self) {
        // Debugging a failure: keep the logs and data.
        if std::env::var_os("DUPLEX_KEEP_TEST_DIRS").is_some() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
            let _ = dir.keep();
        }
    }
}

impl TwoSites {
    pub fn start(options: Options<'_>) -> TwoSites {
        // A test that panicked still released its turn.
        let turn = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = tempfile::tempdir().unwrap();
        if std::env::var_os("DUPLEX_KEEP_TEST_DIRS").is_some() {
            eprintln!("test dir: {}", dir.path().display());
        }
        let d = dir.path();
        let mut flags = strings(&["--mode", options.mode]);
        flags.extend(strings(options.coordinator));
        let coordinator = Service::start(
            "coordinator",
            with_failpoint(
                cmd(options.coordinator_bin, "coordinator", "a", d, &flags),
                options.failpoint,
            ),
            &d.join("coordinator.log"),
        );
        let c = coordinator.addr.clone();
        let ca = d.join("coordinator/ca/ca.pem");
        let admin_token = std::fs::read_to_string(d.join("coordinator/admin-token"))
            .unwrap()
            .trim()
            .to_owned();
        // The test's own calls (metrics, bulk account creation) trust the CA.
        // (Tests in the same binary may run plaintext clusters meanwhile.)
        let roots = duplex_rpc::tls::roots(Some(&ca)).unwrap();
        let config = duplex_rpc::tls::client_config(roots, None).unwrap();
        duplex_rpc::tls::set_client_mode(duplex_rpc::tls::ClientMode::ByScheme(config));
        crate::use_operator_token(&admin_token);
        let enroller = Enroller {
            coordinator: c.clone(),
            ca: ca.clone(),
            admin_token: admin_token.clone(),
        };
        let enrolled = |name: &str, site: &str, binary: &str, extra: Vec<String>, via: &str| {
            enroller.start(via, d, name, site, binary, extra)
        };
        let account_a = enrolled(
            "account-a",
            "a",
            "duplex-account-server",
            strings(&["--replication", "sync"]),
            &c,
        );
        let account_b = enrolled(
            "account-b",
            "b",
            "duplex-account-server",
            strings(&["--master", &account_a.addr, "--replication", "sync"]),
            &c,
        );
        let accounts = format!("{},{}", account_a.addr, account_b.addr);
        let storage = |role: &str| {
            let mut flags = strings(&[
                "--account-servers",
                &accounts,
                "--role",
                role,
                "--mirroring",
                "sync",
            ]);
            flags.extend(strings(options.storage));
            flags
        };
        let proxy = options.proxy_storage_a.then(|| Proxy::start(&c));
        let via_a = proxy.as_ref().map_or(c.clone(), |p| p.addr.clone());
        let storage_a = enrolled(
            "storage-a",
            "a",
            "duplex-storage-server",
            storage("primary"),
            &via_a,
        );
        let b_role = if options.mode == "active-active" {
            "primary"
        } else {
            "replica"
        };
        let storage_b = enrolled("storage-b", "b", "duplex-storage-server", storage(b_role), &c);
        let mirror_a = enrolled("mirror-a", "a", "duplex-mirror", Vec::new(), &c);
        let mirror_b = enrolled("mirror-b", "b", "duplex-mirror", Vec::new(), &c);
        let mut sites = TwoSites {
            dir,
            coordinator,
            account_a,
            account_b,
            storage_a,
            storage_b,
            mirror_a,
            mirror_b,
            proxy,
            token: String::new(),
            ca,
            admin_token,
            _turn: turn,
        };
        sites.wait_roles(&[
            ("account-a", "master"),
            ("account-b", "slave"),
            ("storage-a", "primary"),
            ("storage-b", b_role),
        ]);
        sites.token = sites.create_account("demo", None, None);
        sites
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `duplexctl ARGS` against this platform's coordinator, as its admin.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_as(&self.admin_token, args)
    }

    /// `duplexctl ARGS` as the operator with `token`.
    pub fn ctl_as(&self, token: &str, args: &[&str]) -> Output {
        crate::output_within_limit(
            Command::new(bin("duplexctl"))
                .args(args)
                .env("DUPLEX_COORDINATOR", &self.coordinator.addr)
                .env("DUPLEX_CA", &self.ca)
                .env("DUPLEX_OPERATOR_TOKEN", token)
                .env_remove("DUPLEX_ENDPOINT"),
        )
    }

    /// Creates an operator with `role`; its token.
    pub fn create_operator(&self, name: &str, role: &str) -> String {
        let v = self.ctl_json(&["operators", "create", name, "--role", role]);
        assert_eq!(v["role"], role);
        v["token"].as_str().unwrap().to_owned()
    }

    /// `duplexctl ARGS --json`, asserting success.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut args = args.to_vec();
        args.push("--json");
        let out = self.ctl(&args);
        assert!(
            out.status.success(),
            "duplexctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn create_account(&self, name: &str, group: Option<&str>, home: Option<&str>) -> String {
        let mut args = vec!["accounts", "create", name];
        args.extend(group.map(|g| ["--group", g]).into_iter().flatten());
        args.extend(home.map(|h| ["--home", h]).into_iter().flatten());
        // The master accepts writes once the coordinator has granted its lease.
        let v = wait_for("account creation", Duration::from_secs(30), || {
            let mut a = args.clone();
            a.push("--json");
            let out = self.ctl(&a);
            out.status
                .success()
                .then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap())
        });
        v["token"].as_str().unwrap().to_owned()
    }

    /// The home storage server the account server names for `account`.
    pub fn home_of(&self, account: &str) -> String {
        let list = self.ctl_json(&["accounts", "list"]);
        list["accounts"]
            .as_array()
            .expect("accounts array")
            .iter()
            .find(|a| a["name"] == account)
            .and_then(|a| a["home"].as_str())
            .unwrap_or_else(|| panic!("no account {account} in {list}"))
            .to_owned()
    }

    /// `duplex ARGS` through the coordinator, as the account with `token`.
    pub fn duplex(&self, token: &str, args: &[&str]) -> Output {
        crate::output_within_limit(self.duplex_command(token).args(args))
    }

    /// The agent with this cluster's endpoint and credentials, to add
    /// arguments to.
    pub fn duplex_command(&self, token: &str) -> Command {
        let mut cmd = Command::new(bin("duplex"));
        cmd.env("DUPLEX_ENDPOINT", &self.coordinator.addr)
            .env("DUPLEX_TOKEN", token)
            .env("DUPLEX_CA", &self.ca)
            .env("DUPLEX_PASSWORD", crate::cluster::TEST_PASSPHRASE);
        cmd
    }

    /// `duplex backup PATH --json`, asserting success; the snapshot id.
    pub fn backup(&self, token: &str, path: &Path) -> String {
        let out = self.duplex(token, &["backup", path.to_str().unwrap(), "--json"]);
        assert!(
            out.status.success(),
            "backup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["snapshot"].as_str().unwrap().to_owned()
    }

    /// Restores `snapshot` into a fresh directory and returns it.
    pub fn restore(&self, token: &str, snapshot: &str, into: &str) -> PathBuf {
        let target = self.path(into);
        let out = self.duplex(
            token,
            &["restore", snapshot, "--target", target.to_str().unwrap()],
        );
        assert!(
            out.status.success(),
            "restore {snapshot} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        target
    }

    pub fn status(&self) -> serde_json::Value {
        self.ctl_json(&["status"])
    }

    /// The role `duplexctl status` shows for `name`.
    pub fn role(&self, name: &str) -> String {
        role_in(&self.status(), name)
    }

    /// Waits until every (server, role) pair shows in `duplexctl status`.
    pub fn wait_roles(&self, want: &[(&str, &str)]) -> serde_json::Value {
        wait_for(&format!("roles {want:?}"), Duration::from_secs(30), || {
            let out = self.ctl(&["status", "--json"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            want.iter().all(|(n, r)| role_in(&v, n) == *r).then_some(v)
        })
    }

    /// Starts the coordinator again (same port and data), with a fail point
    /// or none; it must have exited or is killed first.
    pub fn restart_coordinator(&mut self, failpoint: Option<&str>) {
        self.coordinator.kill();
        let cmd = with_failpoint(self.coordinator.cmd.clone(), failpoint);
        let addr = self.coordinator.addr.clone();
        self.coordinator = Service::start("coordinator", cmd, &self.path("coordinator.log"));
        assert_eq!(self.coordinator.addr, addr);
    }

    pub fn history(&self) -> Vec<serde_json::Value> {
        self.ctl_json(&["history"])["events"].as_array().unwrap().clone()
    }

    /// The history events of one kind (`failover`, `failover-refused`, ...), oldest first.
    pub fn events(&self, kind: &str) -> Vec<serde_json::Value> {
        self.history().into_iter().filter(|e| e["kind"] == kind).collect()
    }

    /// `duplexctl ARGS`, asserting success; its stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "duplexctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts one more server on this platform, the way an operator adds
    /// or rebuilds one: a fresh data dir under the test dir, a new one-time
    /// enrollment token from `duplexctl servers token`, and this
    /// coordinator. `binary` is `duplex-account-server`,
    /// `duplex-storage-server` or `duplex-mirror`; `extra` are its own flags
    /// (`--master URL`, `--account-servers URLS`, `--role R`, ...).
    pub fn start_server(&self, name: &str, site: &str, binary: &str, extra: &[&str]) -> Service {
        self.enroller().start(
            &self.coordinator.addr,
            self.dir.path(),
            name,
            site,
            binary,
            strings(extra),
        )
    }

    pub fn enroller(&self) -> Enroller {
        Enroller {
            coordinator: self.coordinator.addr.clone(),
            ca: self.ca.clone(),
            admin_token: self.admin_token.clone(),
        }
    }

    /// GET `/metrics` from one of this platform's servers, as the admin.
    pub fn scrape(&self, addr: &str) -> String {
        crate::scrape_tls(addr, &self.ca, &self.admin_token)
    }

    /// Waits until the coordinator knows how far `name` lags behind what it
    /// mirrors or replicates (its `lag` in `status` is not null) and the
    /// lag is at most `max_records`; the status then. An automatic
    /// failover refuses a standby whose lag it does not know.
    pub fn wait_lag_known(&self, name: &str, max_records: u64) -> serde_json::Value {
        wait_for(
            &format!("the lag of {name} to be known and at most {max_records} records"),
            Duration::from_secs(30),
            || {
                let out = self.ctl(&["status", "--json"]);
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
                let records = lag_in(&v, name)?["records"].as_u64()?;
                (records <= max_records).then_some(v)
            },
        )
    }
}

/// The `lag` `duplexctl status` shows for `name`, unless it is null.
pub fn lag_in(status: &serde_json::Value, name: &str) -> Option<serde_json::Value> {
    status["servers"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
        .map(|s| s["lag"].clone())
        .filter(|l| !l.is_null())
}

/// What it takes to enroll a new server: the coordinator, the CA the
/// server must trust, and an admin token to issue enrollment tokens.
pub struct Enroller {
    pub coordinator: String,
    pub ca: PathBuf,
    pub admin_token: String,
}

impl Enroller {
    /// `duplexctl servers token NAME --site SITE --kind KIND`: a one-time
    /// token bound to that identity.
    pub fn token(&self, name: &str, site: &str, kind: &str) -> String {
        let out = Command::new(bin("duplexctl"))
            .args(["servers", "token", name, "--site", site, "--kind", kind])
            .env("DUPLEX_COORDINATOR", &self.coordinator)
            .env("DUPLEX_CA", &self.ca)
            .env("DUPLEX_OPERATOR_TOKEN", &self.admin_token)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "servers token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// Writes a token to a 0600 file under `dir/tokens` (servers read
    /// tokens from files, never from argv).
    pub fn token_file(&self, dir: &Path, name: &str, token: &str) -> PathBuf {
        let tokens = dir.join("tokens");
        duplex_rpc::secure_fs::create_private_dir(&tokens).unwrap();
        let path = tokens.join(name);
        duplex_rpc::secure_fs::write_private(&path, token.as_bytes()).unwrap();
        path
    }

    /// Starts a server enrolled with a fresh token bound to it,
    /// heartbeating to `via` (the coordinator or a proxy to it).
    pub fn start(
        &self,
        via: &str,
        dir: &Path,
        name: &str,
        site: &str,
        binary: &str,
        mut extra: Vec<String>,
    ) -> Service {
        let token = self.token(name, site, kind_of(binary));
        let file = self.token_file(dir, name, &token);
        extra.extend([
            "--coordinator".to_owned(),
            via.to_owned(),
            "--ca".into(),
            self.ca.display().to_string(),
            "--enrollment-token-file".into(),
            file.display().to_string(),
        ]);
        Service::start(
            name,
            cmd(binary, name, site, dir, &extra),
            &dir.join(format!("{name}.log")),
        )
    }
}

/// The kind of server a binary runs.
pub fn kind_of(binary: &str) -> &'static str {
    match binary {
        "duplex-account-server" => "account",
        "duplex-storage-server" => "storage",
        _ => "mirror",
    }
}

pub fn role_in(status: &serde_json::Value, name: &str) -> String {
    status["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .map(|s| s["role"].as_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// Runs `cmd` under `env DUPLEX_FAILPOINT=...` (or plainly for `None`).
fn with_failpoint(cmd: Vec<String>, failpoint: Option<&str>) -> Vec<String> {
    let plain: Vec<String> = match cmd.iter().position(|a| !a.contains('=') && a != "/usr/bin/env") {
        Some(i) => cmd[i..].to_vec(),
        None => cmd,
    };
    match failpoint {
        Some(f) => ["/usr/bin/env".to_owned(), format!("DUPLEX_FAILPOINT={f}")]
            .into_iter()
            .chain(plain)
            .collect(),
        None => plain,
    }
}
