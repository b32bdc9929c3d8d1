//! A two-site lab of real processes on loopback, for `rebound demo`,
//! integration tests and drills: a configuration server, one node per site
//! (process server + master target), machines of the `local` driver, and
//! workloads, all started from the `rebound` binary in a lab directory.
//!
//! Every process the lab starts is stopped when the lab is dropped (the
//! machines' agents too), unless [`Lab::detach`] was called.

use anyhow::{Context, anyhow, bail};
use rebound_api::{
    Action, ActionRequest, Disk, FailoverKind, Item, Job, JobState, NewItem, NewPolicy, NewSite,
    Policy, RecoveryPoint, SiteRole, StepState,
};
use rebound_node::client::Api;
use rebound_node::machine::{self, DiskEntry, Machine, Manifest};
use rebound_node::node::NodeInfo;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How to build a lab.
#[derive(Clone, Debug)]
pub struct LabConfig {
    pub dir: PathBuf,
    /// The `rebound` binary.
    pub exe: PathBuf,
    /// Replication cycle of the agents (seconds).
    pub rpo_secs: u64,
    /// Extra arguments for a site's node (e.g. `--disk-slots 1`).
    pub node_args: Vec<(String, Vec<String>)>,
    /// Extra environment for every process (e.g. fault injection knobs
    /// such as `REBOUND_FAULT_CHUNK_DELAY_MS`).
    pub env: Vec<(String, String)>,
}

pub struct Lab {
    pub dir: PathBuf,
    pub exe: PathBuf,
    pub server_url: String,
    pub admin: Api,
    pub admin_token: String,
    pub registration_key: String,
    pub policy: Policy,
    pub rpo_secs: u64,
    node_args: Vec<(String, Vec<String>)>,
    env: Vec<(String, String)>,
    children: Vec<(String, Child)>,
    detached: bool,
}

/// Poll `f` every 100 ms until it yields a value or `timeout` passes.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {} s waiting for {what}", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

impl Lab {
    /// Initialise and start the configuration server, create the two sites
    /// (`primary`, `recovery`) and a policy, start one node per site.
    pub fn start(cfg: LabConfig) -> anyhow::Result<Lab> {
        std::fs::create_dir_all(&cfg.dir)?;
        let sdir = cfg.dir.join("server");
        let init = Command::new(&cfg.exe)
            .args(["server", "init", "--data-dir"])
            .arg(&sdir)
            .output()
            .context("rebound server init")?;
        if !init.status.success() {
            bail!("server init: {}", String::from_utf8_lossy(&init.stderr));
        }
        let text = String::from_utf8_lossy(&init.stdout).into_owned();
        let field = |label: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(label).map(|v| v.trim().to_string()))
                .ok_or_else(|| anyhow!("server init printed no {label}"))
        };
        let admin_token = field("admin token:")?;
        let registration_key = field("registration key:")?;
        let mut lab = Lab {
            dir: cfg.dir.clone(),
            exe: cfg.exe.clone(),
            server_url: String::new(),
            admin: Api::new("http://127.0.0.1:1", None),
            admin_token,
            registration_key,
            policy: placeholder_policy(),
            rpo_secs: cfg.rpo_secs.max(1),
            node_args: cfg.node_args.clone(),
            env: cfg.env.clone(),
            children: Vec::new(),
            detached: false,
        };
        let slog = lab.dir.join("server.log");
        let sdir_s = sdir.display().to_string();
        lab.spawn(
            "server",
            &[
                "server",
                "run",
                "--data-dir",
                &sdir_s,
                "--listen",
                "127.0.0.1:0",
                "--heartbeat-limit",
                "10",
            ],
            &slog,
        )?;
        let url = wait_for(Duration::from_secs(30), "the configuration server", || {
            let Ok(f) = std::fs::File::open(&slog) else {
                return Ok(None);
            };
            Ok(std::io::BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .find_map(|l| {
                    l.split("listening on ")
                        .nth(1)
                        .map(|u| u.trim().trim_end_matches("/api/v1").to_string())
                }))
        })?;
        lab.server_url = url.clone();
        lab.admin = Api::new(&url, Some(lab.admin_token.clone()));
        for (name, role) in [
            ("primary", SiteRole::Primary),
            ("recovery", SiteRole::Recovery),
        ] {
            let _: rebound_api::Site = lab.admin.post(
                "/sites",
                &NewSite {
                    name: name.into(),
                    role,
                },
            )?;
        }
        let policies: Vec<Policy> = lab.admin.post(
            "/policies",
            &NewPolicy {
                name: "lab".into(),
                rpo_threshold_secs: 60,
                retention_secs: 3600,
                app_consistent_frequency_secs: 3600,
                crash_consistent_frequency_secs: lab.rpo_secs,
            },
        )?;
        lab.policy = policies
            .into_iter()
            .find(|p| !p.read_only)
            .context("the server created no policy")?;
        Ok(lab)
    }

    /// Start a child `rebound` process with the lab's environment.
    pub fn spawn(&mut self, name: &str, args: &[&str], log: &Path) -> anyhow::Result<u32> {
        let out = std::fs::File::create(log)?;
        let child = Command::new(&self.exe)
            .args(args)
            .env("REBOUND_REGISTRATION_KEY", &self.registration_key)
            .env("REBOUND_RPO_SECS", self.rpo_secs.to_string())
            .env("REBOUND_HEARTBEAT_SECS", "1")
            .env("REBOUND_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let pid = child.id();
        self.children.push((name.to_string(), child));
        Ok(pid)
    }

    pub fn site_dir(&self, site: &str) -> PathBuf {
        self.dir.join(site)
    }

    /// Start (or restart) the node of `site`; returns once it has enrolled.
    pub fn start_node(&mut self, site: &str) -> anyhow::Result<NodeInfo> {
        let dir = self.site_dir(site);
        std::fs::create_dir_all(&dir)?;
        let info_path = dir.join("node.json");
        let _ = std::fs::remove_file(&info_path);
        let url = self.server_url.clone();
        let dir_s = dir.display().to_string();
        let mut args: Vec<String> = [
            "node",
            "--site",
            site,
            "--server",
            &url,
            "--data-dir",
            &dir_s,
            "--heartbeat-secs",
            "1",
        ]
        .map(String::from)
        .to_vec();
        if let Some((_, extra)) = self.node_args.iter().find(|(s, _)| s == site) {
            args.extend(extra.iter().cloned());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = self.dir.join(format!("node-{site}.log"));
        // Keep earlier logs of the site: append a generation.
        let log = if log.exists() {
            self.dir.join(format!(
                "node-{site}.{}.log",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or(0)
            ))
        } else {
            log
        };
        self.spawn(&format!("node-{site}"), &refs, &log)?;
        wait_for(Duration::from_secs(30), &format!("node {site}"), || {
            Ok(std::fs::read(&info_path)
                .ok()
                .and_then(|b| serde_json::from_slice::<NodeInfo>(&b).ok()))
        })
    }

    /// Change the environment of processes started from now on.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.to_string(), v.to_string()));
        }
    }

    /// SIGKILL a child (a crash).
    pub fn kill_child(&mut self, name: &str) {
        if let Some(i) = self.children.iter().position(|(n, _)| n == name) {
            let (_, mut c) = self.children.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM a child and wait for it (a workload flushes its log).
    pub fn stop_child(&mut self, name: &str) {
        if let Some(i) = self.children.iter().position(|(n, _)| n == name) {
            let (_, mut c) = self.children.remove(i);
            signal(c.id(), rustix::process::Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Create a machine on a site's host; `run`: its node starts its agent.
    pub fn create_machine(
        &self,
        node: &NodeInfo,
        name: &str,
        disks: &[(&str, u64)],
        run: bool,
    ) -> anyhow::Result<(Machine, Manifest)> {
        self.create_machine_os(node, name, rebound_api::OsType::Linux, disks, run)
    }

    /// [`Lab::create_machine`] with another OS type.
    pub fn create_machine_os(
        &self,
        node: &NodeInfo,
        name: &str,
        os: rebound_api::OsType,
        disks: &[(&str, u64)],
        run: bool,
    ) -> anyhow::Result<(Machine, Manifest)> {
        let man = Manifest {
            name: name.into(),
            os,
            disks: disks
                .iter()
                .map(|(n, s)| DiskEntry {
                    name: n.to_string(),
                    uuid: machine::new_uuid(),
                    size_bytes: *s,
                })
                .collect(),
            workload: None,
            after_point_ns: None,
        };
        let m = machine::create(&node.host_dir, &man)?;
        if run {
            rebound_disk::crashsafe::write_file_durable(&m.dir.join("want-running"), b"1\n")?;
            wait_for(Duration::from_secs(30), &format!("{name} to run"), || {
                Ok(m.is_running().then_some(()))
            })?;
        }
        Ok((m, man))
    }

    /// Register a machine as an item (primary → recovery) and wait for its
    /// agent to attach.
    pub fn add_item(&self, man: &Manifest, wait_agent: bool) -> anyhow::Result<Item> {
        let _: Item = self.admin.post(
            "/items",
            &NewItem {
                name: man.name.clone(),
                os: man.os,
                disks: man
                    .disks
                    .iter()
                    .map(|d| Disk {
                        name: d.name.clone(),
                        size_bytes: d.size_bytes,
                        uuid: d.uuid.clone(),
                    })
                    .collect(),
                primary_site: "primary".into(),
                recovery_site: "recovery".into(),
                born_at: None,
                agent_id: None,
            },
        )?;
        if !wait_agent {
            return Ok(self.admin.item(&man.name)?);
        }
        wait_for(Duration::from_secs(30), "the agent to attach", || {
            let i = self.admin.item(&man.name)?;
            Ok(i.agent_id.is_some().then_some(i))
        })
    }

    /// Enable protection primary → recovery through the given nodes.
    pub fn protect_request(&self, ps: &NodeInfo, mt: &NodeInfo) -> ActionRequest {
        ActionRequest {
            policy_id: Some(self.policy.id.clone()),
            process_server_id: ps.process_server_id.clone(),
            master_target_id: mt.master_target_id.clone(),
            datastore: Some("data".into()),
            retention_volume: mt
                .retention_volumes
                .first()
                .map(|p| p.display().to_string()),
            ..ActionRequest::new(Action::EnableProtection)
        }
    }

    /// Reprotect (or reverse replicate) request through the given nodes.
    pub fn reprotect_request(&self, action: Action, ps: &NodeInfo, mt: &NodeInfo) -> ActionRequest {
        ActionRequest {
            process_server_id: ps.process_server_id.clone(),
            master_target_id: mt.master_target_id.clone(),
            datastore: Some("data".into()),
            retention_volume: mt
                .retention_volumes
                .first()
                .map(|p| p.display().to_string()),
            ..ActionRequest::new(action)
        }
    }

    /// Submit an action; a refusal is an error carrying the API's message.
    pub fn action(&self, item: &str, req: &ActionRequest) -> anyhow::Result<Job> {
        self.admin
            .post::<_, Job>(&format!("/items/{item}/actions"), req)
            .map_err(|e| anyhow!("{} {item}: {e}", req.action))
    }

    /// Fail `item` over, unplanned, to `point` (an id, or a selector such as
    /// `latest-app-consistent`), and wait for the job to succeed.
    pub fn fail_over_unplanned(&self, item: &str, point: &str) -> anyhow::Result<Job> {
        let req = ActionRequest {
            kind: Some(FailoverKind::Unplanned),
            point_id: Some(point.to_string()),
            ..ActionRequest::new(Action::Failover)
        };
        let job = self.action(item, &req)?;
        self.wait_job(&job, false)
    }

    /// Wait for a job to end (or to wait for an operator) and return it
    /// whatever its outcome.
    pub fn wait_job_end(&self, job: &Job, until_waiting: bool) -> anyhow::Result<Job> {
        let id = job.id.clone();
        wait_for(Duration::from_secs(600), &format!("job {id}"), || {
            let j = self.admin.job(&id)?;
            let stop = j.state.is_finished() || (until_waiting && j.state == JobState::Waiting);
            Ok(stop.then_some(j))
        })
    }

    /// Wait for a job and require it to succeed (or to wait, if asked).
    pub fn wait_job(&self, job: &Job, until_waiting: bool) -> anyhow::Result<Job> {
        let j = self.wait_job_end(job, until_waiting)?;
        match j.state {
            JobState::Succeeded | JobState::Waiting => Ok(j),
            _ => {
                let why = j
                    .error
                    .as_ref()
                    .map(|e| format!("E{} {}", e.code, e.message))
                    .unwrap_or_else(|| format!("{}", j.state));
                let step = j
                    .steps
                    .iter()
                    .find(|s| s.state == StepState::Failed)
                    .map(|s| s.name.clone())
                    .unwrap_or_default();
                bail!(
                    "job {} ({}) {}: step {step}: {why}",
                    j.id,
                    j.action,
                    j.state
                )
            }
        }
    }

    pub fn item(&self, name: &str) -> anyhow::Result<Item> {
        Ok(self.admin.item(name)?)
    }

    /// A recovery point of `item` whose barrier is later than `after_ns`.
    pub fn wait_point(&self, item: &str, after_ns: u64) -> anyhow::Result<RecoveryPoint> {
        wait_for(Duration::from_secs(120), "a recovery point", || {
            let pts = self.admin.points(item)?;
            Ok(pts
                .into_iter()
                .filter(|p| p.barrier_ns.unwrap_or(0) > after_ns)
                .max_by_key(|p| p.barrier_ns))
        })
        .map_err(|e| {
            // Say where the stream stands: which hop to look at.
            let state = self
                .admin
                .item(item)
                .map(|i| {
                    format!(
                        "replication {:?}, progress {:?}",
                        i.replication, i.replica_progress
                    )
                })
                .unwrap_or_else(|e| format!("item unreadable: {e}"));
            e.context(format!("{item}: {state}; logs in {}", self.dir.display()))
        })
    }

    /// The write log shared by every workload of the lab's machine history.
    pub fn write_log(&self, machine: &str) -> PathBuf {
        self.dir.join(format!("{machine}.writes"))
    }

    /// Start `rebound workload` against a running machine's disks.
    pub fn start_workload(
        &mut self,
        name: &str,
        m: &Machine,
        rate: u64,
        extra: &[String],
    ) -> anyhow::Result<()> {
        let man = m.manifest()?;
        let log = self.write_log(&man.name).display().to_string();
        let mut args: Vec<String> = vec!["workload".into()];
        for d in &man.disks {
            args.push("--disk".into());
            args.push(m.nbd_uri(&d.name));
        }
        args.extend(
            [
                "--write-log",
                &log,
                "--inflight",
                "4",
                "--rate",
                &rate.to_string(),
                "--tolerate-disconnect",
            ]
            .map(String::from),
        );
        args.extend(extra.iter().cloned());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let log_path = self.dir.join(format!("{name}.log"));
        self.spawn(name, &refs, &log_path)?;
        Ok(())
    }

    /// `rebound verify` of a running machine's disks against its write log;
    /// returns the verifier's last line, or an error with its report.
    pub fn verify(&self, m: &Machine, point_ns: Option<u64>) -> anyhow::Result<String> {
        let man = m.manifest()?;
        self.verify_against(m, &man.name, point_ns)
    }

    /// [`Lab::verify`] against the write log of machine `log_of` (a test
    /// machine carries another name than the machine it copies).
    pub fn verify_against(
        &self,
        m: &Machine,
        log_of: &str,
        point_ns: Option<u64>,
    ) -> anyhow::Result<String> {
        let man = m.manifest()?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("verify");
        for d in &man.disks {
            cmd.arg("--disk").arg(m.nbd_uri(&d.name));
        }
        cmd.arg("--write-log").arg(self.write_log(log_of));
        if let Some(t) = point_ns {
            cmd.arg("--point-time").arg(t.to_string());
        }
        let out = cmd.output().context("running rebound verify")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "rebound verify failed:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(text.lines().last().unwrap_or("").to_string())
    }

    /// Keep every process running after the lab is dropped.
    pub fn detach(&mut self) {
        self.detached = true;
    }

    /// Stop the machines' agents, then every child, newest first.
    pub fn shutdown(&mut self) {
        for site in ["primary", "recovery"] {
            for m in machine::list(&self.site_dir(site).join("host")) {
                let _ = std::fs::remove_file(m.dir.join("want-running"));
            }
        }
        for (_, c) in self.children.iter().rev() {
            signal(c.id(), rustix::process::Signal::TERM);
        }
        for site in ["primary", "recovery"] {
            for m in machine::list(&self.site_dir(site).join("host")) {
                let _ = m.stop(Duration::from_secs(20));
            }
        }
        for (_, c) in self.children.iter_mut() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.detached {
            for (_, c) in self.children.drain(..) {
                std::mem::forget(c);
            }
        } else {
            self.shutdown();
        }
    }
}

fn placeholder_policy() -> Policy {
    Policy {
        id: String::new(),
        name: String::new(),
        rpo_threshold_secs: 0,
        retention_secs: 0,
        app_consistent_frequency_secs: 0,
        crash_consistent_frequency_secs: 0,
        read_only: false,
        failback_policy_id: None,
        parent_policy_id: None,
        created_at: String::new(),
    }
}

/// Bytes a job's step reported (its total).
/// Run a lab test's body in a fresh directory `rebound-NAME-*` (canonical:
/// nodes report their paths resolved). On failure keep the directory and
/// panic with the error, the time taken and where the logs are.
pub fn in_temp_dir(name: &str, body: impl FnOnce(&Path) -> anyhow::Result<()>) {
    let tmp = tempfile::Builder::new()
        .prefix(&format!("rebound-{name}-"))
        .tempdir()
        .expect("tempdir");
    let dir = tmp.path().canonicalize().expect("canonical lab dir");
    let t0 = Instant::now();
    let secs = || t0.elapsed().as_secs_f64();
    // A panicking body (an `expect`) keeps its lab too.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&dir)));
    match r {
        Ok(Ok(())) => eprintln!("{name}: passed in {:.1} s", secs()),
        Ok(Err(e)) => {
            let kept = tmp.keep();
            panic!(
                "{name} failed after {:.1} s (lab kept in {}): {e:#}",
                secs(),
                kept.display()
            );
        }
        Err(p) => {
            let kept = tmp.keep();
            eprintln!(
                "{name} panicked after {:.1} s (lab kept in {})",
                secs(),
                kept.display()
            );
            std::panic::resume_unwind(p);
        }
    }
}

pub fn step_bytes(job: &Job, name: &str) -> Option<u64> {
    job.steps
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.bytes_total)
}

/// Seconds from the start of step `first` to the end of step `last`.
pub fn step_secs(job: &Job, first: &str, last: &str) -> Option<f64> {
    let t = |n: &str, end: bool| {
        job.steps.iter().find(|s| s.name == n).and_then(|s| {
            let at = if end { &s.ended_at } else { &s.started_at };
            at.as_deref().and_then(rebound_control::time::parse)
        })
    };
    let (a, b) = (t(first, false)?, t(last, true)?);
    b.duration_since(a).ok().map(|d| d.as_secs_f64())
}
