//! Child processes of the playground: started with the parent-death
//! signal set, so even a SIGKILLed playground leaves no orphans, and
//! stopped with SIGTERM, then SIGKILL after a grace period.

#![allow(unsafe_code)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
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
    // SAFETY: prctl is async-signal-safe and touches only the child's own
    // process attributes; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("starting {program}"))
}

/// SIGTERM, then SIGKILL if it has not exited within `grace`.
pub async fn stop(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        // SAFETY: plain kill(2) on a pid we spawned and have not reaped.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}
