//! Several coordinators sharing their state in a real etcd (#11), run as
//! `duplexctl playground --coordinators 3`: the leader is killed with
//! SIGKILL under continuous backups, in the middle of a switchover, at
//! the start of every phase of a failover and a failback, and together
//! with its whole site; it is cut off from etcd, and etcd itself is lost.
//! Another takes over, the operation finishes, backups go on, every
//! acknowledged backup restores bit for bit, and the coordinators' own
//! logs show that two never led at once.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use duplex_tests::ha::{
    Acked, Child, Ha, Halt, Restarted, assert_all_restore, back_up_continuously, etcd_installed, with_etcd,
};
use duplex_tests::phases::{FAILBACK, FAILOVER};
use duplex_tests::proxy::{Fault, Proxy};
use duplex_tests::{bin, wait_for};
use serde_json::Value;

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
        let _halt = Halt(&stop);
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
    // coordinator-3 reaches etcd only through the proxy, and leads.
    let Restarted {
        leader: mut c3,
        followers: mut others,
        killed,
    } = ha.lead_with("coordinator-3", |cmd| with_etcd(cmd, &proxy.addr));

    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let stop = AtomicBool::new(false);
    let acked = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        let _halt = Halt(&stop);
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
        let _halt = Halt(&stop);
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

/// Coordinators running with fail points armed from one shared file.
struct Armed<'a> {
    ha: &'a Ha,
    file: PathBuf,
    running: Vec<(String, Child)>,
    /// Every coordinator death so far, for the terms.
    killed: Vec<(String, SystemTime)>,
}

impl<'a> Armed<'a> {
    /// Replaces each playground coordinator with the fail point build.
    fn start(ha: &'a Ha) -> Self {
        let mut armed = Armed {
            ha,
            file: ha.dir.join("failpoints"),
            running: Vec::new(),
            killed: Vec::new(),
        };
        for i in 1..=3 {
            let name = format!("coordinator-{i}");
            armed.killed.push((name.clone(), ha.sigkill(&name)));
            let child = armed.spawn(&name);
            armed.running.push((name, child));
        }
        ha.leader();
        armed
    }

    fn spawn(&self, name: &str) -> Child {
        let failpoints = bin("duplex-coordinator-failpoints");
        self.ha.restart_with(
            name,
            |mut cmd| {
                cmd[0] = failpoints.display().to_string();
                cmd
            },
            &[("DUPLEX_FAILPOINT_FILE", &self.file)],
        )
    }

    /// Runs `duplexctl ARGS` with the leader dying at the start of each of
    /// `phases` of `kind` in turn; each time another takes over and resumes
    /// it, and the dead one comes back as a follower. Returns the operation.
    fn run_through_deaths(&mut self, kind: &str, phases: &[&str], args: &[&str]) -> Value {
        let lines: Vec<String> = phases.iter().map(|p| format!("{kind}:{p}")).collect();
        std::fs::write(&self.file, lines.join("\n")).unwrap();
        let deaths_before = self.killed.len();
        // The leader may die before it answers: the operation is persisted
        // before it runs, which is what the next leader relies on. Or no
        // leader took it (one had just died): asked again only once a
        // leader's history shows it was not persisted.
        let before = wait_for("a leader's history", Duration::from_secs(60), || {
            self.restart_the_dead();
            self.ha.operations_of(kind)
        });
        if !self.ha.ctl(args).status.success() {
            self.wait_restarting(&format!("the {kind} to be taken"), 120, |ha| {
                if ha.operations_of(kind)? > before {
                    return Some(());
                }
                ha.ctl(args).status.success().then_some(())
            });
        }
        let op = self.wait_restarting(
            &format!("the {kind} to end through {} leader deaths", phases.len()),
            300,
            |ha| ha.ended(kind),
        );
        // The last leader to die may have done so while a history call
        // was out, and the operation ended before the loop looked again.
        self.restart_the_dead();
        assert_eq!(op["state"], "done", "{kind}: {op}");
        assert_eq!(
            std::fs::read_to_string(&self.file).unwrap().trim(),
            "",
            "every fail point was reached: {op}"
        );
        assert_eq!(
            self.killed.len() - deaths_before,
            phases.len(),
            "one death per phase"
        );
        let recorded = op["phases"].as_array().unwrap();
        for phase in phases {
            let runs = recorded.iter().filter(|p| p["name"] == *phase).count();
            assert_eq!(
                runs, 1,
                "phase {phase} recorded once, resumed after its leader died: {op}"
            );
        }
        assert!(recorded.iter().all(|p| p["finished"].is_string()), "{op}");
        op
    }

    /// Polls `check` every half second for up to `secs`, starting again
    /// any coordinator that dies at a fail point meanwhile.
    fn wait_restarting<T>(&mut self, what: &str, secs: u64, check: impl Fn(&Ha) -> Option<T>) -> T {
        let mut polled = Instant::now();
        wait_for(what, Duration::from_secs(secs), || {
            self.restart_the_dead();
            if polled.elapsed() < Duration::from_millis(500) {
                return None;
            }
            polled = Instant::now();
            check(self.ha)
        })
    }

    /// Starts again any coordinator that died at a fail point.
    fn restart_the_dead(&mut self) {
        for i in 0..self.running.len() {
            if let Ok(Some(_)) = self.running[i].1.child.try_wait() {
                let name = self.running[i].0.clone();
                self.killed.push((name.clone(), SystemTime::now()));
                self.running[i].1 = self.spawn(&name);
            }
        }
    }
}

#[test]
fn the_leader_dies_in_every_phase_of_a_failover_and_a_failback_and_each_finishes() {
    if !etcd_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ha = Ha::start(dir.path());
    let mut armed = Armed::start(&ha);
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let mut acked = Vec::new();
    let mut back_up = |files: usize| {
        std::fs::write(
            tree.join(format!("f{:04}", files - 1)),
            rand::random::<[u8; 32]>(),
        )
        .unwrap();
        let out = wait_for("a backup", Duration::from_secs(60), || {
            let out = ha.duplex(&["backup", tree.to_str().unwrap(), "--json"]);
            out.status.success().then_some(out)
        });
        acked.push(Acked {
            snapshot: serde_json::from_slice::<Value>(&out.stdout).unwrap()["snapshot"]
                .as_str()
                .unwrap()
                .to_owned(),
            files,
            done: Instant::now(),
        });
    };
    back_up(1);

    armed.run_through_deaths("failover", &FAILOVER, &["failover", "--site", "a", "--yes"]);
    ha.wait_roles(&[
        ("account-b", "master"),
        ("storage-b", "primary"),
        ("account-a", "slave"),
        ("storage-a", "replica"),
    ]);
    back_up(2);

    armed.run_through_deaths("failback", &FAILBACK, &["failback", "--verify"]);
    ha.wait_roles(&[
        ("account-a", "master"),
        ("storage-a", "primary"),
        ("account-b", "slave"),
        ("storage-b", "replica"),
    ]);
    back_up(3);

    assert_all_restore(&ha, &tree, &acked);
    let terms = ha.terms(&armed.killed);
    assert!(terms.len() > FAILOVER.len() + FAILBACK.len(), "{terms:?}");
    assert_one_leader_at_a_time(&terms);
}

#[test]
fn the_leader_lost_with_its_whole_site_another_fails_over_and_nothing_is_lost() {
    if !etcd_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ha = Ha::start(dir.path());
    // coordinator-1 runs on site a: make it the leader, so that losing the
    // site loses the leader too.
    let Restarted {
        leader: mut c1,
        followers: _followers,
        mut killed,
    } = ha.lead_with("coordinator-1", |c| c);

    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let stop = AtomicBool::new(false);
    let acked = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        let _halt = Halt(&stop);
        s.spawn(|| back_up_continuously(&ha, &tree, &stop, &acked));
        wait_for("backups before the site is lost", Duration::from_secs(60), || {
            (acked.lock().unwrap().len() >= 3).then_some(())
        });
        let lost = Instant::now();
        killed.push(("coordinator-1".to_owned(), Ha::sigkill_child(&mut c1)));
        for service in ["account-a", "storage-a", "mirror-a"] {
            ha.sigkill(service);
        }
        ha.new_leader_after("coordinator-1");
        ha.wait_roles(&[("account-b", "master"), ("storage-b", "primary")]);
        wait_for("backups on site b", Duration::from_secs(60), || {
            let n = acked.lock().unwrap().iter().filter(|a| a.done > lost).count();
            (n >= 3).then_some(())
        });
        stop.store(true, Ordering::SeqCst);
    });
    let failover = wait_for("the failover in the history", Duration::from_secs(30), || {
        ha.ended("failover")
    });
    assert_eq!(failover["state"], "done", "{failover}");
    assert_all_restore(&ha, &tree, &acked.lock().unwrap());
    assert_one_leader_at_a_time(&ha.terms(&killed));
}
