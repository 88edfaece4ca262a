//! Child processes of the playground: started with the parent-death
//! signal set, so even a SIGKILLed playground leaves no orphans, and
//! stopped with SIGTERM, then SIGKILL after a grace period.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// Starts `argv` with stdout and stderr appended to `log`.
pub fn spawn(argv: &[String], log: &Path) -> anyhow::Result<Child> {
    let (program, args) = argv.split_first().context("empty command")?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out
        .try_clone()
        .with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .kill_on_drop(true);
    // SAFETY: the closure only calls prctl(2), which is async-signal-safe
    // and touches only the child's own process attributes; nothing else
    // runs between fork and exec.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from));
    }
    cmd.spawn().with_context(|| format!("starting {program}"))
}

/// SIGTERM, then SIGKILL if it has not exited within `grace`.
pub async fn stop(child: &mut Child, grace: Duration) {
    // A pid we spawned and have not reaped, so it is still ours.
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}
