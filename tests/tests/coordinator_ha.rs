//! Several coordinators sharing their state in a real etcd (#11), run as
//! `duplexctl playground --coordinators 3`: the leader is killed with
//! SIGKILL under continuous backups and in the middle of a switchover;
//! another takes over, the operation finishes, backups go on, every
//! acknowledged backup restores bit for bit, and the coordinators' own
//! logs show that two never led at once.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use duplex_tests::bench::Playground;
use duplex_tests::proxy::{Fault, Proxy};
use duplex_tests::{bin, wait_for};
use serde_json::Value;

/// Whether etcd is installed; CI installs it and sets DUPLEX_REQUIRE_ETCD
/// so these tests cannot be skipped there.
fn etcd_installed() -> bool {
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

struct Ha {
    pg: Playground,
    dir: PathBuf,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Ha {
    fn start(dir: &Path) -> Ha {
        let turn = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let pg = Playground::start(dir, &["--coordinators", "3"]);
        Ha {
            pg,
            dir: dir.to_owned(),
            _turn: turn,
        }
    }

    fn info(&self, key: &str) -> String {
        self.pg.info[key].as_str().unwrap().to_owned()
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(bin("duplexctl"))
            .args(args)
            .env("DUPLEX_COORDINATOR", self.info("coordinator"))
            .env("DUPLEX_CA", self.info("ca"))
            .env("DUPLEX_OPERATOR_TOKEN", self.info("operator_token"))
            .env_remove("DUPLEX_ENDPOINT")
            .output()
            .unwrap()
    }

    fn status(&self) -> Option<Value> {
        let out = self.ctl(&["status", "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    /// `duplex ARGS` as the demo account, through every entry point.
    fn duplex(&self, args: &[&str]) -> Output {
        let endpoints: Vec<&str> = self.pg.info["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        Command::new(bin("duplex"))
            .args(args)
            .env("DUPLEX_ENDPOINT", endpoints.join(","))
            .env("DUPLEX_TOKEN", self.pg.info["account"]["token"].as_str().unwrap())
            .env("DUPLEX_PASSWORD", self.info("password"))
            .env("DUPLEX_CA", self.info("ca"))
            .output()
            .unwrap()
    }

    fn pid(&self, service: &str) -> i32 {
        self.pg.service(service)["pid"].as_i64().unwrap() as i32
    }

    fn sigkill(&self, service: &str) -> SystemTime {
        // SAFETY: SIGKILL to a child of the playground this test started.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.pid(service), libc::SIGKILL);
        }
        SystemTime::now()
    }

    /// Starts `service` again as the playground did, with `rewrite` applied
    /// to its argv, logging where it logged before.
    fn restart(&self, service: &str, rewrite: impl Fn(Vec<String>) -> Vec<String>) -> Child {
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
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map(|child| Child { child })
            .unwrap()
    }

    fn sigkill_child(child: &mut Child) -> SystemTime {
        let _ = child.child.kill();
        let _ = child.child.wait();
        SystemTime::now()
    }

    fn role_of(&self, name: &str) -> Option<String> {
        self.coordinators()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| r)
    }

    /// Every coordinator with its role, once exactly one leads.
    fn coordinators(&self) -> Vec<(String, String)> {
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

    fn leader(&self) -> String {
        let all = self.coordinators();
        let leaders: Vec<_> = all.iter().filter(|(_, r)| r == "leader").collect();
        assert_eq!(leaders.len(), 1, "exactly one leader: {all:?}");
        leaders[0].0.clone()
    }

    /// Waits until a coordinator other than `old` leads and `old` shows down.
    fn new_leader_after(&self, old: &str) -> String {
        wait_for("another coordinator to lead", Duration::from_secs(30), || {
            let all = self.coordinators();
            let old_down = all.iter().any(|(n, r)| n == old && r == "down");
            let leader = all.iter().find(|(n, r)| n != old && r == "leader");
            (old_down && leader.is_some()).then(|| leader.unwrap().0.clone())
        })
    }

    /// When each coordinator led, from its own log: (name, fence, from,
    /// until); a coordinator in `killed` stopped leading when it died.
    fn terms(&self, killed: &[(String, SystemTime)]) -> Vec<(String, u64, SystemTime, SystemTime)> {
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
                } else if line.contains("stepping down as coordinator leader")
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

/// A process this test started; killed when dropped.
struct Child {
    child: std::process::Child,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `cmd` with the value of `--etcd` replaced.
fn with_etcd(cmd: Vec<String>, url: &str) -> Vec<String> {
    let at = cmd.iter().position(|a| a == "--etcd").unwrap() + 1;
    let mut cmd = cmd;
    cmd[at] = url.to_owned();
    cmd
}

/// No two coordinators led at once, and each new leader fenced its writes
/// on a later etcd revision than the one before.
fn assert_one_leader_at_a_time(terms: &[(String, u64, SystemTime, SystemTime)]) {
    assert!(terms.len() >= 2, "a leader change happened: {terms:?}");
    for pair in terms.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        assert!(
            after.2 >= before.3,
            "{} led from {:?} while {} still led (until {:?})",
            after.0,
            after.2,
            before.0,
            before.3
        );
        assert!(after.1 > before.1, "fences grow: {terms:?}");
    }
}

/// One acknowledged backup: its snapshot and the files it holds.
struct Acked {
    snapshot: String,
    files: usize,
    done: Instant,
}

/// Backs up `tree` again and again, adding one file before each, until
/// `stop`; every acknowledged backup is recorded.
fn back_up_continuously(ha: &Ha, tree: &Path, stop: &AtomicBool, acked: &Mutex<Vec<Acked>>) {
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
fn assert_all_restore(ha: &Ha, tree: &Path, acked: &[Acked]) {
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

#[test]
fn sigkill_of_the_leader_under_backups_loses_nothing_and_two_never_lead() {
    if !etcd_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ha = Ha::start(dir.path());
    let all = ha.coordinators();
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(all.iter().filter(|(_, r)| r == "follower").count(), 2, "{all:?}");
    let old = ha.leader();

    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|s| {
        s.spawn(|| back_up_continuously(&ha, &tree, &stop, &acked));
        wait_for("backups before the kill", Duration::from_secs(60), || {
            (acked.lock().unwrap().len() >= 3).then_some(())
        });
        let killed_at = Instant::now();
        let killed = ha.sigkill(&old);
        let new = ha.new_leader_after(&old);
        assert_ne!(new, old);
        wait_for("backups after the kill", Duration::from_secs(60), || {
            let n = acked
                .lock()
                .unwrap()
                .iter()
                .filter(|a| a.done > killed_at)
                .count();
            (n >= 3).then_some(())
        });
        stop.store(true, Ordering::SeqCst);
        let acked = acked.lock().unwrap();
        let pause = acked
            .windows(2)
            .map(|w| w[1].done.duration_since(w[0].done))
            .max()
            .unwrap();
        eprintln!("longest gap between acknowledged backups across the leader change: {pause:?}");
        assert_one_leader_at_a_time(&ha.terms(&[(old.clone(), killed)]));
    });
    assert_all_restore(&ha, &tree, &acked.lock().unwrap());
}

#[test]
fn leader_killed_mid_switchover_the_next_leader_finishes_it() {
    if !etcd_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ha = Ha::start(dir.path());
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("f0000"), b"before the switchover").unwrap();
    let first = ha.duplex(&["backup", tree.to_str().unwrap(), "--json"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let old = ha.leader();

    let started = ha.ctl(&["switchover", "--yes", "--json"]);
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    let killed = ha.sigkill(&old);
    ha.new_leader_after(&old);

    // The next leader resumed the switchover from its persisted phase.
    wait_for("the switchover to finish", Duration::from_secs(60), || {
        let s = ha.status()?;
        let role = |name: &str| {
            s["servers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["name"] == name)
                .map(|x| x["role"].as_str().unwrap().to_owned())
        };
        (s["phase"] == "steady"
            && role("storage-b").as_deref() == Some("primary")
            && role("account-b").as_deref() == Some("master"))
        .then_some(())
    });
    let history: Value = serde_json::from_slice(&ha.ctl(&["history", "--json"]).stdout).unwrap();
    let switchover = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|e| e["kind"] == "switchover")
        .unwrap();
    let last_phase = switchover["phases"].as_array().unwrap().last().unwrap();
    let finished =
        humantime::parse_rfc3339_weak(last_phase["finished"].as_str().unwrap().trim_end_matches('Z'))
            .unwrap();
    assert!(
        finished > killed,
        "the switchover was still running when its leader died"
    );

    std::fs::write(tree.join("f0001"), b"after the switchover").unwrap();
    let acked = wait_for("a backup on the new primary", Duration::from_secs(60), || {
        let out = ha.duplex(&["backup", tree.to_str().unwrap(), "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice::<Value>(&out.stdout).unwrap())
    });
    let accounts: Value = serde_json::from_slice(&ha.ctl(&["accounts", "list", "--json"]).stdout).unwrap();
    let demo = accounts["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "demo")
        .unwrap();
    assert_eq!(demo["home"], "storage-b", "{accounts}");
    let snapshots = [&first.stdout, &serde_json::to_vec(&acked).unwrap()]
        .iter()
        .enumerate()
        .map(|(i, out)| Acked {
            snapshot: serde_json::from_slice::<Value>(out).unwrap()["snapshot"]
                .as_str()
                .unwrap()
                .to_owned(),
            files: i + 1,
            done: Instant::now(),
        })
        .collect::<Vec<_>>();
    assert_all_restore(&ha, &tree, &snapshots);
    assert_one_leader_at_a_time(&ha.terms(&[(old, killed)]));
}

#[test]
fn a_leader_cut_off_from_etcd_steps_down_before_another_leads() {
    if !etcd_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ha = Ha::start(dir.path());
    let etcd = ha.pg.service("etcd")["addr"].as_str().unwrap().to_owned();
    let proxy = Proxy::start(&etcd);
    let mut killed = Vec::new();
    // coordinator-3 reaches etcd only through the proxy, and is made the
    // leader: the two others are killed until it leads, then come back.
    killed.push(("coordinator-3".to_owned(), ha.sigkill("coordinator-3")));
    let mut c3 = ha.restart("coordinator-3", |cmd| with_etcd(cmd, &proxy.addr));
    killed.push(("coordinator-1".to_owned(), ha.sigkill("coordinator-1")));
    killed.push(("coordinator-2".to_owned(), ha.sigkill("coordinator-2")));
    wait_for("coordinator-3 to lead", Duration::from_secs(30), || {
        (ha.role_of("coordinator-3").as_deref() == Some("leader")).then_some(())
    });
    let mut others = vec![
        ha.restart("coordinator-1", |c| c),
        ha.restart("coordinator-2", |c| c),
    ];
    wait_for("both to follow", Duration::from_secs(30), || {
        let all = ha.coordinators();
        (all.iter().filter(|(_, r)| r == "follower").count() == 2).then_some(())
    });

    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let stop = AtomicBool::new(false);
    let acked = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        s.spawn(|| back_up_continuously(&ha, &tree, &stop, &acked));
        wait_for("backups before the cut", Duration::from_secs(60), || {
            (acked.lock().unwrap().len() >= 2).then_some(())
        });
        // Silently: etcd calls hang rather than fail, so only the leader's
        // own watchdog can make it stop in time.
        proxy.set(Fault::Blackhole);
        let cut = Instant::now();
        let new = wait_for("another coordinator to lead", Duration::from_secs(30), || {
            let all = ha.coordinators();
            all.into_iter()
                .find(|(n, r)| n != "coordinator-3" && r == "leader")
                .map(|(n, _)| n)
        });
        wait_for("backups after the cut", Duration::from_secs(60), || {
            let n = acked.lock().unwrap().iter().filter(|a| a.done > cut).count();
            (n >= 2).then_some(())
        });
        // Healed, the old leader follows the new one.
        proxy.set(Fault::Pass);
        wait_for("coordinator-3 to follow again", Duration::from_secs(30), || {
            (ha.role_of("coordinator-3").as_deref() == Some("follower")).then_some(())
        });
        assert_eq!(ha.role_of(&new).as_deref(), Some("leader"));
        stop.store(true, Ordering::SeqCst);
    });
    let log = std::fs::read_to_string(dir.path().join("coordinator-3.log")).unwrap();
    assert!(
        log.contains("stepping down as coordinator leader"),
        "coordinator-3 stepped down"
    );
    let terms = ha.terms(&killed);
    assert_one_leader_at_a_time(&terms);
    assert_all_restore(&ha, &tree, &acked.lock().unwrap());
    Ha::sigkill_child(&mut c3);
    for c in &mut others {
        Ha::sigkill_child(c);
    }
}

#[test]
fn etcd_lost_stops_the_leader_and_everything_resumes_when_it_returns() {
    if !etcd_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ha = Ha::start(dir.path());
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let stop = AtomicBool::new(false);
    let acked = Mutex::new(Vec::new());
    let leader = ha.leader();
    std::thread::scope(|s| {
        s.spawn(|| back_up_continuously(&ha, &tree, &stop, &acked));
        wait_for("backups before etcd is lost", Duration::from_secs(60), || {
            (acked.lock().unwrap().len() >= 2).then_some(())
        });
        ha.sigkill("etcd");
        let lost = Instant::now();
        // The leader cannot renew its etcd lease: it steps down, and with
        // nobody granting server leases, writes stop safely.
        let log = ha.dir.join(format!("{leader}.log"));
        wait_for("the leader to step down", Duration::from_secs(30), || {
            std::fs::read_to_string(&log)
                .unwrap()
                .contains("stepping down as coordinator leader")
                .then_some(())
        });
        let _etcd = ha.restart("etcd", |c| c);
        wait_for("a leader again", Duration::from_secs(60), || {
            let all = ha.coordinators();
            all.iter().any(|(_, r)| r == "leader").then_some(())
        });
        wait_for("backups after etcd returned", Duration::from_secs(60), || {
            let n = acked.lock().unwrap().iter().filter(|a| a.done > lost).count();
            (n >= 2).then_some(())
        });
        stop.store(true, Ordering::SeqCst);
    });
    let terms = ha.terms(&[]);
    assert_one_leader_at_a_time(&terms);
    assert_all_restore(&ha, &tree, &acked.lock().unwrap());
}
