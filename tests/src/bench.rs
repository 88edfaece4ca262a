//! Helpers for the bench binaries: generated trees, timing, and writing
//! a results section into docs/BENCHMARKS.md.

use std::path::{Path, PathBuf};

use crate::tree::{random_bytes, text};

/// A tree of `total_mib` MiB: 60 % incompressible data in large files,
/// 30 % compressible text, 10 % small files, like a real home directory.
pub fn generate_tree(root: &Path, total_mib: usize) {
    generate_tree_seeded(root, total_mib, 0);
}

/// Like `generate_tree`; trees of different `seed`s share no content.
pub fn generate_tree_seeded(root: &Path, total_mib: usize, seed: u64) {
    let seed = seed * 1_000_000;
    const MIB: usize = 1024 * 1024;
    std::fs::create_dir_all(root.join("media")).unwrap();
    std::fs::create_dir_all(root.join("docs")).unwrap();
    let random_mib = total_mib * 6 / 10;
    for i in 0..random_mib.div_ceil(32) {
        let len = 32.min(random_mib - i * 32) * MIB;
        std::fs::write(
            root.join(format!("media/blob{i:03}.bin")),
            random_bytes(seed + 1000 + i as u64, len),
        )
        .unwrap();
    }
    let text_mib = total_mib * 3 / 10;
    for i in 0..text_mib.div_ceil(8) {
        let len = 8.min(text_mib - i * 8) * MIB;
        std::fs::write(
            root.join(format!("docs/log{i:03}.txt")),
            text(seed + 2000 + i as u64, len),
        )
        .unwrap();
    }
    let small_bytes = total_mib * MIB / 10;
    let mut written = 0;
    let mut i = 0u64;
    while written < small_bytes {
        let dir = root.join(format!("src/m{}", i % 50));
        std::fs::create_dir_all(&dir).unwrap();
        let len = (i as usize * 7919) % 64_000 + 100;
        let data = if i.is_multiple_of(2) {
            text(seed + i, len)
        } else {
            random_bytes(seed + i, len)
        };
        std::fs::write(dir.join(format!("f{i}")), data).unwrap();
        written += len;
        i += 1;
    }
}

/// Replaces the section between `<!-- NAME:start -->` and `<!-- NAME:end -->`
/// in docs/BENCHMARKS.md (appending it if absent).
pub fn write_section(name: &str, body: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/BENCHMARKS.md");
    let start = format!("<!-- {name}:start -->");
    let end = format!("<!-- {name}:end -->");
    let existing = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".to_owned());
    let section = format!("{start}\n{body}\n{end}");
    let updated = match (existing.find(&start), existing.find(&end)) {
        (Some(s), Some(e)) if e > s => format!("{}{section}{}", &existing[..s], &existing[e + end.len()..]),
        _ => format!("{}\n{section}\n", existing.trim_end()),
    };
    std::fs::write(&path, updated).unwrap();
    path
}

/// `name` from the environment as a number, else `default`.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    format!("{cores} cores, {cpu}")
}

/// A `duplexctl playground` run for a bench; stopped with SIGTERM (every
/// child with it) when dropped.
pub struct Playground {
    child: std::process::Child,
    pub info: serde_json::Value,
    /// The `duplex` binary [`Playground::duplex`] runs.
    pub agent: PathBuf,
    /// The CPUs the agent is held to, if any.
    agent_cpus: Option<String>,
}

/// Which CPUs a bench holds the client and the servers to: the client on
/// one, the servers on the rest, as when they run on other machines.
#[derive(Clone, Debug)]
pub struct Pinning {
    pub client: String,
    pub servers: String,
}

impl Pinning {
    /// Client on CPU 0, servers on the others; none on one CPU or without
    /// `taskset`.
    pub fn split() -> Option<Pinning> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let taskset = std::process::Command::new("taskset")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        (cores >= 2 && taskset).then(|| Pinning {
            client: "0".into(),
            servers: if cores == 2 {
                "1".into()
            } else {
                format!("1-{}", cores - 1)
            },
        })
    }
}

/// `program`, held to `cpus` when given (children inherit it).
pub fn command_on(cpus: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    match cpus {
        Some(cpus) => {
            let mut cmd = std::process::Command::new("taskset");
            cmd.args(["--cpu-list", cpus]).arg(program);
            cmd
        }
        None => std::process::Command::new(program),
    }
}

impl Playground {
    /// Starts a playground in `dir` with `extra` flags and waits for its
    /// playground.json. The bench's own gRPC calls then trust its CA and
    /// present its operator token.
    pub fn start(dir: &Path, extra: &[&str]) -> Playground {
        Playground::start_pinned(dir, extra, None)
    }

    /// Like [`Playground::start`], with the servers and the agent held to
    /// the CPUs `pinning` gives them.
    pub fn start_pinned(dir: &Path, extra: &[&str], pinning: Option<&Pinning>) -> Playground {
        use std::process::Stdio;
        let child = command_on(pinning.map(|p| p.servers.as_str()), crate::bin("duplexctl"))
            .args(["playground", "--dir", dir.to_str().unwrap()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let info: serde_json::Value =
            crate::wait_for("the playground", std::time::Duration::from_secs(90), || {
                serde_json::from_slice(&std::fs::read(dir.join("playground.json")).ok()?).ok()
            });
        if let Some(ca) = info["ca"].as_str() {
            let roots = duplex_rpc::tls::roots(Some(Path::new(ca))).unwrap();
            let config = duplex_rpc::tls::client_config(roots, None).unwrap();
            duplex_rpc::tls::set_client_mode(duplex_rpc::tls::ClientMode::ByScheme(config));
        }
        if let Some(token) = info["operator_token"].as_str() {
            crate::use_operator_token(token);
        }
        Playground {
            child,
            info,
            agent: crate::bin("duplex"),
            agent_cpus: pinning.map(|p| p.client.clone()),
        }
    }

    pub fn secure(&self) -> bool {
        self.info["ca"].is_string()
    }

    /// `duplex ARGS` as the demo account, to run.
    pub fn agent_command(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = command_on(self.agent_cpus.as_deref(), &self.agent);
        cmd.args(args)
            .env("DUPLEX_ENDPOINT", self.info["endpoints"][0].as_str().unwrap())
            .env("DUPLEX_TOKEN", self.info["account"]["token"].as_str().unwrap())
            .env("DUPLEX_PASSWORD", self.info["password"].as_str().unwrap());
        match self.info["ca"].as_str() {
            Some(ca) => cmd.env("DUPLEX_CA", ca),
            None => cmd.env("DUPLEX_INSECURE_PLAINTEXT", "1"),
        };
        cmd
    }

    /// `duplex ARGS` as the demo account.
    pub fn duplex(&self, args: &[&str]) -> std::process::Output {
        let out = self.agent_command(args).output().unwrap();
        assert!(
            out.status.success(),
            "duplex {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Seconds a `duplex backup` of `tree` takes, and its snapshot id.
    pub fn timed_backup(&self, tree: &Path) -> (f64, String) {
        let start = std::time::Instant::now();
        let out = self.duplex(&["backup", tree.to_str().unwrap(), "--json"]);
        let secs = start.elapsed().as_secs_f64();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (secs, v["snapshot"].as_str().unwrap().to_owned())
    }

    /// Seconds a `duplex restore` of `snapshot` into `target` takes.
    pub fn timed_restore(&self, snapshot: &str, target: &Path) -> f64 {
        let start = std::time::Instant::now();
        self.duplex(&["restore", snapshot, "--target", target.to_str().unwrap()]);
        start.elapsed().as_secs_f64()
    }

    /// CPU seconds every server of the playground has used so far.
    pub fn servers_cpu_secs(&self) -> f64 {
        self.info["services"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["pid"].as_u64())
            .map(process_cpu_secs)
            .sum()
    }

    /// Runs `duplex ARGS` as the demo account to success: its wall time,
    /// and the CPU time of the agent and of every server meanwhile.
    pub fn measured_run(&self, args: &[&str]) -> Run {
        let before = self.servers_cpu_secs();
        let agent = measured(self.agent_command(args));
        Run {
            secs: agent.secs,
            cpu_secs: agent.cpu_secs + self.servers_cpu_secs() - before,
            agent_cpu_secs: agent.cpu_secs,
            stdout: agent.stdout,
        }
    }

    /// The playground.json entry of service `name`.
    pub fn service(&self, name: &str) -> &serde_json::Value {
        self.info["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()
    }
}

/// `files` small text files, `per_dir` to a directory, file `i` holding
/// `min_len + i % 80` bytes.
pub fn small_files(root: &Path, files: usize, per_dir: usize, min_len: usize) {
    for i in 0..files {
        let dir = root.join(format!("d{}", i / per_dir));
        if i % per_dir == 0 {
            std::fs::create_dir_all(&dir).unwrap();
        }
        let data = crate::tree::text(i as u64, min_len + i % 80);
        std::fs::write(dir.join(format!("f{i}")), data).unwrap();
    }
}

/// Wall and CPU seconds of one agent run against a playground.
pub struct Run {
    pub secs: f64,
    /// The agent's and every server's, on all cores.
    pub cpu_secs: f64,
    /// The agent's alone.
    pub agent_cpu_secs: f64,
    pub stdout: Vec<u8>,
}

/// What one measured run of a command did.
pub struct Measured {
    pub stdout: Vec<u8>,
    pub secs: f64,
    /// The command's peak resident set (its own, from wait4), in bytes.
    pub peak_rss: u64,
    /// User and system CPU seconds of the command and the children it
    /// waited for.
    pub cpu_secs: f64,
}

/// Runs `cmd` to success and measures its wall time and peak RSS.
// The child is reaped by wait4, which also gives its rusage.
#[allow(clippy::zombie_processes)]
pub fn measured(mut cmd: std::process::Command) -> Measured {
    use std::io::Read;
    let start = std::time::Instant::now();
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut stdout = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut stdout).unwrap();
    let mut status = 0;
    // SAFETY: wait4 on the child this function spawned and has not
    // waited for, with valid out-pointers; rusage is plain data.
    #[allow(unsafe_code)]
    let (reaped, usage) = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        let reaped = libc::wait4(child.id() as i32, &mut status, 0, &mut usage);
        (reaped, usage)
    };
    assert_eq!(reaped, child.id() as i32, "wait4 failed");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed ({status})"
    );
    Measured {
        stdout,
        secs: start.elapsed().as_secs_f64(),
        peak_rss: u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024,
        cpu_secs: seconds(usage.ru_utime) + seconds(usage.ru_stime),
    }
}

fn seconds(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

/// User and system CPU seconds a live process has used so far.
pub fn process_cpu_secs(pid: u64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields 14 and 15 (utime, stime, in clock ticks), counted after the
    // command name, which is in parentheses and may hold spaces.
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads its integer argument.
    #[allow(unsafe_code)]
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / per_second.max(1) as f64
}

/// A live process's peak resident set so far (VmHWM), in bytes.
pub fn process_peak_rss(pid: u64) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

impl Drop for Playground {
    fn drop(&mut self) {
        // SAFETY: SIGTERM to the playground this process spawned.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

/// Where a bench restores to. Where it may (root, with `mkfs.ext4` and
/// `losetup`), a new ext4 file system of its own on a loop device that
/// writes around the host's page cache, unmounted when dropped; else a new
/// directory beside the others.
///
/// Restores back to back into one file system each ran slower than the
/// last (the kernel keeps the inodes and dentries of everything restored,
/// and ext4 searches past recently freed inodes), so whichever tool went
/// later paid for the earlier ones; a file system of its own gives every
/// restore, of either tool, the same start.
pub struct RestoreTarget {
    dir: PathBuf,
    mount: Option<(PathBuf, String)>,
}

impl RestoreTarget {
    pub fn new(dir: &Path) -> RestoreTarget {
        std::fs::create_dir_all(dir).unwrap();
        let image = dir.with_extension("img");
        let run = |cmd: &str, args: &[&str]| {
            std::process::Command::new(cmd)
                .args(args)
                .stderr(std::process::Stdio::null())
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        };
        let img = image.to_str().unwrap();
        let mounted = std::fs::File::create(&image)
            .and_then(|f| f.set_len(8 << 30))
            .ok()
            .and_then(|()| run("mkfs.ext4", &["-q", "-F", img]))
            .and_then(|_| run("losetup", &["--direct-io=on", "--find", "--show", img]))
            .and_then(|device| {
                let ok = run("mount", &[&device, dir.to_str().unwrap()]);
                if ok.is_none() {
                    run("losetup", &["-d", &device]);
                }
                ok.map(|_| device)
            });
        if mounted.is_none() {
            let _ = std::fs::remove_file(&image);
        }
        RestoreTarget {
            dir: dir.to_owned(),
            mount: mounted.map(|device| (image, device)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Whether the restore goes to a file system of its own.
    pub fn is_mounted(&self) -> bool {
        self.mount.is_some()
    }
}

impl Drop for RestoreTarget {
    fn drop(&mut self) {
        if let Some((image, device)) = &self.mount {
            let _ = std::process::Command::new("umount").arg(&self.dir).status();
            let _ = std::process::Command::new("losetup")
                .args(["-d", device])
                .status();
            let _ = std::fs::remove_file(image);
        }
    }
}
