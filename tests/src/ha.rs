//! Several coordinators sharing their state in a real etcd, run as
//! `duplexctl playground --coordinators 3`: start it, find the leader,
//! kill and restart coordinators, back up continuously and check that
//! every acknowledged backup restores. Shared by the HA tests and bench.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use crate::bench::Playground;
use crate::{bin, wait_for};

/// Whether etcd is installed; CI installs it and sets DUPLEX_REQUIRE_ETCD
/// so these tests cannot be skipped there.
pub fn etcd_installed() -> bool {
    let found = Command::new("etcd").arg("--version").output().is_ok();
    if !found {
        assert!(
            std::env::var_os("DUPLEX_REQUIRE_ETCD").is_none(),
            "etcd is not installed (apt-get install etcd-server)"
        );
        eprintln!("skipped: etcd is not installed (apt-get install etcd-server)");
    }
    found
}

/// One playground at a time: leases and heartbeats run on real time, and
/// four clusters at once would starve two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

pub struct Ha {
    pub pg: Playground,
    pub dir: PathBuf,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Ha {
    /// Three coordinators on etcd.
    pub fn start(dir: &Path) -> Ha {
        Self::start_with(dir, &["--coordinators", "3"])
    }

    /// A playground with `extra` flags (one coordinator without them).
    pub fn start_with(dir: &Path, extra: &[&str]) -> Ha {
        let turn = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let pg = Playground::start(dir, extra);
        Ha {
            pg,
            dir: dir.to_owned(),
            _turn: turn,
        }
    }

    pub fn info(&self, key: &str) -> String {
        self.pg.info[key].as_str().unwrap().to_owned()
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        crate::output_within_limit(
            Command::new(bin("duplexctl"))
                .args(args)
                .env("DUPLEX_COORDINATOR", self.info("coordinator"))
                .env("DUPLEX_CA", self.info("ca"))
                .env("DUPLEX_OPERATOR_TOKEN", self.info("operator_token"))
                .env_remove("DUPLEX_ENDPOINT"),
        )
    }

    pub fn status(&self) -> Option<Value> {
        let out = self.ctl(&["status", "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    /// `duplex ARGS` as the demo account, through every entry point.
    pub fn duplex(&self, args: &[&str]) -> Output {
        let endpoints: Vec<&str> = self.pg.info["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        crate::output_within_limit(
            Command::new(bin("duplex"))
                .args(args)
                .env("DUPLEX_ENDPOINT", endpoints.join(","))
                .env("DUPLEX_TOKEN", self.pg.info["account"]["token"].as_str().unwrap())
                .env("DUPLEX_PASSWORD", self.info("password"))
                .env("DUPLEX_CA", self.info("ca")),
        )
    }

    pub fn pid(&self, service: &str) -> i32 {
        self.pg.service(service)["pid"].as_i64().unwrap() as i32
    }

    pub fn sigkill(&self, service: &str) -> SystemTime {
        // SAFETY: SIGKILL to a child of the playground this test started.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.pid(service), libc::SIGKILL);
        }
        SystemTime::now()
    }

    /// Starts `service` again as the playground did, with `rewrite` applied
    /// to its argv, logging where it logged before.
    pub fn restart(&self, service: &str, rewrite: impl Fn(Vec<String>) -> Vec<String>) -> Child {
        self.restart_with(service, rewrite, &[])
    }

    /// As `restart`, with `env` added to the environment.
    pub fn restart_with(
        &self,
        service: &str,
        rewrite: impl Fn(Vec<String>) -> Vec<String>,
        env: &[(&str, &Path)],
    ) -> Child {
        let cmd: Vec<String> = self.pg.service(service)["cmd"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect();
        let cmd = rewrite(cmd);
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join(format!("{service}.log")))
            .unwrap();
        Command::new(&cmd[0])
            .args(&cmd[1..])
            .envs(env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map(|child| Child { child })
            .unwrap()
    }

    /// Makes `name` the leader, started again with `rewrite` applied: the
    /// two others are killed until it leads, then come back as followers.
    pub fn lead_with(&self, name: &str, rewrite: impl Fn(Vec<String>) -> Vec<String>) -> Restarted {
        let others: Vec<String> = (1..=3)
            .map(|i| format!("coordinator-{i}"))
            .filter(|n| n != name)
            .collect();
        let mut killed = vec![(name.to_owned(), self.sigkill(name))];
        let leader = self.restart(name, rewrite);
        for other in &others {
            killed.push((other.clone(), self.sigkill(other)));
        }
        wait_for(&format!("{name} to lead"), Duration::from_secs(30), || {
            (self.role_of(name).as_deref() == Some("leader")).then_some(())
        });
        let followers = others.iter().map(|o| self.restart(o, |c| c)).collect();
        wait_for("both others to follow", Duration::from_secs(30), || {
            let all = self.coordinators();
            (all.iter().filter(|(_, r)| r == "follower").count() == 2).then_some(())
        });
        Restarted {
            leader,
            followers,
            killed,
        }
    }

    /// Waits until every server named has the role given.
    pub fn wait_roles(&self, want: &[(&str, &str)]) {
        wait_for(&format!("roles {want:?}"), Duration::from_secs(60), || {
            let s = self.status()?;
            want.iter()
                .all(|(name, role)| {
                    s["servers"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|x| x["name"] == *name && x["role"] == *role)
                })
                .then_some(())
        });
    }

    /// The operations of `kind` in the leader's history, oldest first;
    /// None while no leader answers.
    fn operations(&self, kind: &str) -> Option<Vec<Value>> {
        let out = self.ctl(&["history", "--json"]);
        let history: Value = serde_json::from_slice(&out.stdout).ok()?;
        let events = history["events"].as_array()?;
        Some(events.iter().filter(|e| e["kind"] == kind).cloned().collect())
    }

    /// How many operations of `kind` the leader's history holds; None
    /// while no leader answers.
    pub fn operations_of(&self, kind: &str) -> Option<usize> {
        self.operations(kind).map(|ops| ops.len())
    }

    /// The last operation of `kind` in the history, once it has ended.
    pub fn ended(&self, kind: &str) -> Option<Value> {
        let op = self.operations(kind)?.pop()?;
        (op["state"] != "running").then_some(op)
    }

    pub fn sigkill_child(child: &mut Child) -> SystemTime {
        let _ = child.child.kill();
        let _ = child.child.wait();
        SystemTime::now()
    }

    pub fn role_of(&self, name: &str) -> Option<String> {
        self.coordinators()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| r)
    }

    /// Every coordinator with its role, once exactly one leads.
    pub fn coordinators(&self) -> Vec<(String, String)> {
        let status = wait_for("a coordinator that leads", Duration::from_secs(30), || {
            self.status()
        });
        status["servers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["kind"] == "coordinator")
            .map(|s| {
                (
                    s["name"].as_str().unwrap().to_owned(),
                    s["role"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    pub fn leader(&self) -> String {
        let all = self.coordinators();
        let leaders: Vec<_> = all.iter().filter(|(_, r)| r == "leader").collect();
        assert_eq!(leaders.len(), 1, "exactly one leader: {all:?}");
        leaders[0].0.clone()
    }

    /// Waits until a coordinator other than `old` leads and `old` shows down.
    pub fn new_leader_after(&self, old: &str) -> String {
        wait_for("another coordinator to lead", Duration::from_secs(30), || {
            let all = self.coordinators();
            let old_down = all.iter().any(|(n, r)| n == old && r == "down");
            let leader = all.iter().find(|(n, r)| n != old && r == "leader");
            (old_down && leader.is_some()).then(|| leader.unwrap().0.clone())
        })
    }

    /// When each coordinator led, from its own log: (name, fence, from,
    /// until); a coordinator in `killed` stopped leading when it died.
    pub fn terms(&self, killed: &[(String, SystemTime)]) -> Vec<(String, u64, SystemTime, SystemTime)> {
        let mut terms = Vec::new();
        for i in 1..=3 {
            let name = format!("coordinator-{i}");
            let log = std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap();
            // A term ends at the first kill of its coordinator after it began
            // (a restarted coordinator appends to the same log).
            let death = |from: SystemTime| {
                killed
                    .iter()
                    .filter(|(n, t)| *n == name && *t >= from)
                    .map(|(_, t)| *t)
                    .min()
            };
            let mut open: Option<(u64, SystemTime)> = None;
            for line in log.lines() {
                let Some(at) = line
                    .split_whitespace()
                    .next()
                    .and_then(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok())
                else {
                    continue;
                };
                if line.contains("this coordinator now leads") {
                    let fence = line
                        .rsplit("fence=")
                        .next()
                        .and_then(|f| f.trim().parse().ok())
                        .unwrap();
                    if let Some((fence, from)) = open.replace((fence, at)) {
                        terms.push((name.clone(), fence, from, death(from).unwrap_or(at)));
                    }
                } else if (line.contains("stepping down as coordinator leader")
                    || line.contains("fail point reached: aborting"))
                    && let Some((fence, from)) = open.take()
                {
                    terms.push((name.clone(), fence, from, at));
                }
            }
            if let Some((fence, from)) = open {
                terms.push((
                    name.clone(),
                    fence,
                    from,
                    death(from).unwrap_or_else(SystemTime::now),
                ));
            }
        }
        terms.sort_by_key(|t| t.2);
        terms
    }
}

/// Coordinators `lead_with` started again, and when it killed them.
pub struct Restarted {
    pub leader: Child,
    pub followers: Vec<Child>,
    pub killed: Vec<(String, SystemTime)>,
}

/// A process this test started; killed when dropped.
pub struct Child {
    pub child: std::process::Child,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `cmd` with the value of `--etcd` replaced.
pub fn with_etcd(cmd: Vec<String>, url: &str) -> Vec<String> {
    let at = cmd.iter().position(|a| a == "--etcd").unwrap() + 1;
    let mut cmd = cmd;
    cmd[at] = url.to_owned();
    cmd
}

/// One acknowledged backup: its snapshot and the files it holds.
pub struct Acked {
    pub snapshot: String,
    pub files: usize,
    pub done: Instant,
}

/// Sets its flag when dropped, so a backup loop stops even when the
/// test that runs it fails.
pub struct Halt<'a>(pub &'a AtomicBool);

impl Drop for Halt<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Backs up `tree` again and again, adding one file before each, until
/// `stop`; every acknowledged backup is recorded.
pub fn back_up_continuously(ha: &Ha, tree: &Path, stop: &AtomicBool, acked: &Mutex<Vec<Acked>>) {
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        let data: Vec<u8> = (0..64 * 1024).map(|_| rand::random::<u8>()).collect();
        std::fs::write(tree.join(format!("f{i:04}")), data).unwrap();
        i += 1;
        let out = ha.duplex(&["backup", tree.to_str().unwrap(), "--json"]);
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            acked.lock().unwrap().push(Acked {
                snapshot: v["snapshot"].as_str().unwrap().to_owned(),
                files: i,
                done: Instant::now(),
            });
        }
    }
}

/// Every acknowledged snapshot restores its files bit for bit.
pub fn assert_all_restore(ha: &Ha, tree: &Path, acked: &[Acked]) {
    for (n, a) in acked.iter().enumerate() {
        let into = ha.dir.join(format!("restore-{n}"));
        let out = ha.duplex(&["restore", &a.snapshot, "--target", into.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "restore {}: {}",
            a.snapshot,
            String::from_utf8_lossy(&out.stderr)
        );
        // A backed-up directory restores under its own name.
        let target = into.join(tree.file_name().unwrap());
        for i in 0..a.files {
            let name = format!("f{i:04}");
            assert_eq!(
                std::fs::read(target.join(&name)).unwrap(),
                std::fs::read(tree.join(&name)).unwrap(),
                "{name} of snapshot {}",
                a.snapshot
            );
        }
        assert_eq!(std::fs::read_dir(&target).unwrap().count(), a.files);
    }
}
