//! Helpers shared by the CLI's integration tests (each test binary uses
//! what it needs).
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// `rebound agent export` on a unix socket, stopped (SIGKILL) when dropped.
pub struct Agent {
    child: Option<Child>,
    sock: PathBuf,
}

impl Agent {
    /// Start it and wait for its `listening on` line.
    pub fn start(dir: &Path, disks: &[&Path], extra: &[&str]) -> Agent {
        let sock = dir.join(format!("agent-{}.sock", std::process::id()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rebound"));
        cmd.arg("agent").arg("export");
        for d in disks {
            cmd.arg(d);
        }
        cmd.arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .args(extra);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn rebound agent export");
        let mut first = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut first)
            .expect("read stdout");
        assert!(
            first.starts_with("listening on unix:"),
            "unexpected first line {first:?}"
        );
        Agent {
            child: Some(child),
            sock,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.sock
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    /// Send `sig` and wait for the exit (30 s at most).
    pub fn signal(&mut self, sig: rustix::process::Signal) -> ExitStatus {
        signal_and_wait(self.child.take().expect("running"), sig)
    }

    /// SIGTERM: a clean stop must exit 0.
    pub fn stop(mut self) {
        let st = self.signal(rustix::process::Signal::TERM);
        assert!(st.success(), "agent exited with {st}");
    }

    /// SIGKILL: the crash case.
    pub fn kill(mut self) {
        self.signal(rustix::process::Signal::KILL);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Send `sig` to a child and wait for it (30 s at most, then SIGKILL and
/// fail).
pub fn signal_and_wait(mut child: Child, sig: rustix::process::Signal) -> ExitStatus {
    let pid = rustix::process::Pid::from_child(&child);
    rustix::process::kill_process(pid, sig).expect("signal");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not stop after {sig:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run `cmd` with its stdout a pipe whose reader is gone before it starts
/// (`… | head -0`, without a race), asserting that it did not panic.
pub fn output_with_closed_stdout(cmd: &mut Command) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = cmd.stdout(writer).stderr(Stdio::piped()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    out
}
