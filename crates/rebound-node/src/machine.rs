//! The `local` driver (DESIGN.md §5): a host is a directory on a node; a
//! machine is a directory with a manifest and raw disks. "Running" means its
//! agent process serves its disks over NBD (and runs its workload, if any).
//!
//! ```text
//! HOST/<machine>/manifest.json   name, OS, disks (name, UUID, size), workload
//!               disks/<disk>.img  raw sparse images
//!               state/            dirty tracking, agent identity, outbox
//!               nbd.sock          the agent's NBD export while running
//!               agent.pid, agent.log
//! ```

use anyhow::{Context, bail};
use rebound_api::OsType;
use rebound_disk::crashsafe;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Marker the agent writes when it stopped the machine but still runs.
pub const STOPPED: &str = "stopped";

/// Marker of a suspended machine (`rebound machine suspend`): its agent
/// holds every write until the marker is removed (`rebound machine resume`)
/// and reports the machine as suspended.
pub const SUSPENDED: &str = "suspended";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskEntry {
    pub name: String,
    pub uuid: String,
    pub size_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub os: OsType,
    pub disks: Vec<DiskEntry>,
    /// Arguments of `rebound` run as the machine's workload while it runs;
    /// `{nbd:DISK}` is replaced by the NBD URI of that disk.
    #[serde(default)]
    pub workload: Option<Vec<String>>,
    /// Set by an unplanned failover: the workload's next start declares that
    /// the machine was rolled back to this point (`--after-point`).
    #[serde(default)]
    pub after_point_ns: Option<u64>,
}

/// One machine directory.
#[derive(Clone, Debug)]
pub struct Machine {
    pub dir: PathBuf,
}

impl Machine {
    pub fn at(dir: impl Into<PathBuf>) -> Machine {
        Machine { dir: dir.into() }
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.dir.join("manifest.json")
    }

    pub fn manifest(&self) -> anyhow::Result<Manifest> {
        let p = self.manifest_path();
        let text = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", p.display()))
    }

    pub fn save_manifest(&self, m: &Manifest) -> anyhow::Result<()> {
        let text = serde_json::to_vec_pretty(m)?;
        crashsafe::write_file_durable(&self.manifest_path(), &text)?;
        Ok(())
    }

    pub fn disk_path(&self, disk: &str) -> PathBuf {
        self.dir.join("disks").join(format!("{disk}.img"))
    }

    pub fn disk_paths(&self) -> anyhow::Result<Vec<PathBuf>> {
        Ok(self
            .manifest()?
            .disks
            .iter()
            .map(|d| self.disk_path(&d.name))
            .collect())
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }

    pub fn nbd_uri(&self, disk: &str) -> String {
        format!("nbd+unix:///{disk}?socket={}", self.socket().display())
    }

    pub fn pid_path(&self) -> PathBuf {
        self.dir.join("agent.pid")
    }

    /// The agent's pid while it runs.
    pub fn agent_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.pid_path()).ok()?;
        let pid: i32 = text.trim().parse().ok()?;
        let p = rustix::process::Pid::from_raw(pid)?;
        // Signal 0: does the process exist (and is it not a zombie)?
        let alive = rustix::process::test_kill_process(p).is_ok() && !is_zombie(pid);
        alive.then_some(pid)
    }

    /// The machine runs: its agent is alive and has not stopped it (a
    /// stopped machine's agent may stay a while to serve its disks to a
    /// final sync, with every write refused).
    pub fn is_running(&self) -> bool {
        self.agent_pid().is_some() && !self.dir.join(STOPPED).exists()
    }

    /// Whether the machine is suspended (its writes are held).
    pub fn is_suspended(&self) -> bool {
        self.dir.join(SUSPENDED).exists()
    }

    /// Suspend (`true`) or resume (`false`) the machine: the agent notices
    /// within a fraction of a second.
    pub fn set_suspended(&self, suspended: bool) -> anyhow::Result<()> {
        let marker = self.dir.join(SUSPENDED);
        if suspended {
            crashsafe::write_file_durable(&marker, b"1\n")?;
        } else if marker.exists() {
            crashsafe::remove_file_durable(&marker)?;
        }
        Ok(())
    }

    /// Start the agent (`rebound agent run DIR`) and wait until it serves the
    /// disks. The registration key goes through the environment, never argv.
    pub fn start(
        &self,
        rebound: &Path,
        server: &str,
        site: &str,
        key: &str,
    ) -> anyhow::Result<u32> {
        if self.is_running() {
            return Ok(self.agent_pid().unwrap_or_default() as u32);
        }
        // A stopped machine's agent still holds the disks: end it first.
        self.stop(Duration::from_secs(30))?;
        let ready = self.dir.join("agent.ready");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))?;
        let child = Command::new(rebound)
            .arg("agent")
            .arg("run")
            .arg(&self.dir)
            .arg("--server")
            .arg(server)
            .arg("--site")
            .arg(site)
            .env("REBOUND_REGISTRATION_KEY", key)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting the agent of {}", self.dir.display()))?;
        let pid = child.id();
        // The agent is a daemon of the node: reap it in the background.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.exists() {
            if Instant::now() > deadline {
                bail!(
                    "the agent of {} did not become ready within 20 s (see its agent.log)",
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(pid)
    }

    /// Stop the machine: SIGTERM its agent (which stops the workload and
    /// closes the disks cleanly) and wait for it to exit.
    pub fn stop(&self, timeout: Duration) -> anyhow::Result<()> {
        let Some(pid) = self.agent_pid() else {
            return Ok(());
        };
        signal(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + timeout;
        while self.agent_pid().is_some() {
            if Instant::now() > deadline {
                signal(pid, rustix::process::Signal::KILL);
                bail!("the agent of {} did not stop; killed", self.dir.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(self.pid_path());
        Ok(())
    }
}

fn signal(pid: i32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Create a machine directory with sparse disks.
pub fn create(host: &Path, manifest: &Manifest) -> anyhow::Result<Machine> {
    let m = Machine::at(host.join(&manifest.name));
    if m.manifest_path().exists() {
        bail!(
            "a machine named {} already exists on {}",
            manifest.name,
            host.display()
        );
    }
    crashsafe::create_dir_all_durable(&m.dir.join("disks"))?;
    crashsafe::create_dir_all_durable(&m.state_dir())?;
    for d in &manifest.disks {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(m.disk_path(&d.name))?;
        f.set_len(d.size_bytes)?;
        f.sync_all()?;
    }
    crashsafe::fsync_dir(&m.dir.join("disks"))?;
    m.save_manifest(manifest)?;
    Ok(m)
}

/// The machines of a host directory.
pub fn list(host: &Path) -> Vec<Machine> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(host) {
        for e in rd.flatten() {
            let m = Machine::at(e.path());
            if m.manifest_path().is_file() {
                out.push(m);
            }
        }
    }
    out.sort_by(|a, b| a.dir.cmp(&b.dir));
    out
}

/// A random disk UUID (version 4 layout).
pub fn new_uuid() -> String {
    let mut b = [0u8; 16];
    if getrandom_fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        b = t.to_le_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

fn getrandom_fill(b: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_list_and_refuse_a_second_machine_of_the_same_name()
    -> Result<(), Box<dyn std::error::Error>> {
        let host = tempfile::tempdir()?;
        let man = Manifest {
            name: "vm1".into(),
            os: OsType::Linux,
            disks: vec![DiskEntry {
                name: "disk0".into(),
                uuid: new_uuid(),
                size_bytes: 1 << 20,
            }],
            workload: None,
            after_point_ns: None,
        };
        let m = create(host.path(), &man)?;
        assert_eq!(m.manifest()?, man);
        assert_eq!(std::fs::metadata(m.disk_path("disk0"))?.len(), 1 << 20);
        assert_eq!(list(host.path()).len(), 1);
        assert!(!m.is_running());
        assert!(create(host.path(), &man).is_err());
        Ok(())
    }

    #[test]
    fn suspend_and_resume_toggle_the_marker() -> Result<(), Box<dyn std::error::Error>> {
        let host = tempfile::tempdir()?;
        let m = Machine::at(host.path().join("vm1"));
        std::fs::create_dir_all(&m.dir)?;
        assert!(!m.is_suspended());
        m.set_suspended(true)?;
        assert!(m.is_suspended());
        m.set_suspended(true)?;
        m.set_suspended(false)?;
        assert!(!m.is_suspended());
        m.set_suspended(false)?;
        Ok(())
    }
}
