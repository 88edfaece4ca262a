//! One server process: started from its exact argv, its address read from
//! the `listening on` line it prints, killable and restartable as it was.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub struct Service {
    pub name: String,
    /// The argv that started it, with the real port once known.
    pub cmd: Vec<String>,
    pub addr: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Service {
    /// Starts `cmd` (which should listen on port 0 or a fixed port) and
    /// waits for it to report its address.
    pub fn start(name: &str, cmd: Vec<String>, log: &Path) -> Service {
        let (child, addr) = spawn(&cmd, log);
        let port = addr.rsplit(':').next().unwrap().to_owned();
        let cmd = with_listen_port(cmd, &port);
        Service {
            name: name.to_owned(),
            cmd,
            addr,
            log: log.to_path_buf(),
            child: Some(child),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .map(|c| c.id() as i32)
            .expect("service is running")
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on a child we own and have not reaped.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed", self.name);
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and wait for a clean exit; returns its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().expect("running");
        crate::wait_for(&format!("{} to exit", self.name), Duration::from_secs(20), || {
            child.try_wait().unwrap()
        })
    }

    /// Starts it again with the same argv (same port, same data).
    pub fn restart(&mut self) {
        self.kill();
        let (child, addr) = spawn(&self.cmd, &self.log);
        assert_eq!(addr, self.addr, "{} came back on another address", self.name);
        self.child = Some(child);
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(cmd: &[String], log: &Path) -> (Child, String) {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", cmd[0]));
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(addr) = line.strip_prefix("listening on ")
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(addr.to_owned());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(addr) => (child, addr),
        Err(_) => {
            let _ = child.kill();
            panic!(
                "{} did not report its address; log:\n{}",
                cmd[0],
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

fn with_listen_port(mut cmd: Vec<String>, port: &str) -> Vec<String> {
    if let Some(i) = cmd.iter().position(|a| a == "--listen")
        && let Some(v) = cmd.get_mut(i + 1)
        && let Some((host, _)) = v.rsplit_once(':')
    {
        *v = format!("{host}:{port}");
    }
    cmd
}
