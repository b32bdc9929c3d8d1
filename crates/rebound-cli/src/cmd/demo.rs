//! `rebound demo`: the whole lifecycle on one machine, with real processes.
//!
//! A configuration server and two site nodes (primary, recovery) run on
//! loopback in a lab directory; a machine with two disks runs a live
//! workload at the primary site; it is protected, fails over (unplanned, to
//! a recovery point, checked by `rebound verify`), is committed, reprotected,
//! failed back with a two-phase delta sync while the workload keeps writing
//! at the recovery site, committed, and replicated forward again. Every
//! operation is a job of the configuration server; the demo prints a
//! timeline.

use crate::failure::Failure;
use anyhow::{Context, anyhow, bail};
use rebound_api::{
    Action, ActionRequest, Disk, FailoverKind, Item, Job, JobState, NewItem, NewPolicy, NewSite,
    Policy, RecoveryPoint, Site, SiteRole, StepState, SyncMode,
};
use rebound_node::client::Api;
use rebound_node::machine::{self, DiskEntry, Machine, Manifest};
use rebound_node::node::NodeInfo;
use rebound_types::ErrorCode;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Lab directory (default: a new temporary directory, removed at the
    /// end unless --keep).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Leave the lab running and print the commands to explore it.
    #[arg(long)]
    keep: bool,
    /// Size of the machine's first disk (the second is half of it).
    #[arg(long, default_value = "64M")]
    disk_size: String,
    /// Replication cycle (RPO) of the agents, in seconds.
    #[arg(long, default_value_t = 2)]
    rpo_secs: u64,
    /// Workload writes per second and per writer.
    #[arg(long, default_value_t = 40)]
    rate: u64,
}

struct Lab {
    dir: PathBuf,
    exe: PathBuf,
    server_url: String,
    admin: Api,
    key: String,
    admin_token: String,
    children: Vec<(String, Child)>,
    timeline: Vec<Row>,
    started: Instant,
    rpo_secs: u64,
    rate: u64,
}

struct Row {
    step: String,
    secs: f64,
    bytes: Option<u64>,
    note: String,
}

fn say(msg: impl AsRef<str>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", msg.as_ref());
    let _ = out.flush();
}

impl Lab {
    fn spawn(&mut self, name: &str, args: &[&str], log: &Path) -> anyhow::Result<u32> {
        let out = std::fs::File::create(log)?;
        let child = Command::new(&self.exe)
            .args(args)
            .env("REBOUND_REGISTRATION_KEY", &self.key)
            .env("REBOUND_RPO_SECS", self.rpo_secs.to_string())
            .env("REBOUND_HEARTBEAT_SECS", "1")
            .env("REBOUND_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let pid = child.id();
        self.children.push((name.to_string(), child));
        Ok(pid)
    }

    fn start_node(&mut self, site: &str) -> anyhow::Result<NodeInfo> {
        let dir = self.dir.join(site);
        std::fs::create_dir_all(&dir)?;
        let info_path = dir.join("node.json");
        let _ = std::fs::remove_file(&info_path);
        let url = self.server_url.clone();
        let dir_s = dir.display().to_string();
        self.spawn(
            &format!("node-{site}"),
            &[
                "node",
                "--site",
                site,
                "--server",
                &url,
                "--data-dir",
                &dir_s,
                "--heartbeat-secs",
                "1",
            ],
            &self.dir.join(format!("node-{site}.log")),
        )?;
        wait_for(Duration::from_secs(30), &format!("node {site}"), || {
            Ok(std::fs::read(&info_path)
                .ok()
                .and_then(|b| serde_json::from_slice::<NodeInfo>(&b).ok()))
        })
    }

    /// SIGKILL a child (a site disaster).
    fn kill_child(&mut self, name: &str) {
        if let Some(i) = self.children.iter().position(|(n, _)| n == name) {
            let (_, mut c) = self.children.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM a child and wait for it (a workload flushes its log).
    fn stop_child(&mut self, name: &str) {
        if let Some(i) = self.children.iter().position(|(n, _)| n == name) {
            let (_, mut c) = self.children.remove(i);
            if let Some(p) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn row(&mut self, step: &str, t0: Instant, bytes: Option<u64>, note: impl Into<String>) {
        let r = Row {
            step: step.into(),
            secs: t0.elapsed().as_secs_f64(),
            bytes,
            note: note.into(),
        };
        say(format!(
            "  ✓ {:<28} {:>6.1} s {:>12}  {}",
            r.step,
            r.secs,
            r.bytes.map(human).unwrap_or_default(),
            r.note
        ));
        self.timeline.push(r);
    }

    fn action(&self, item: &str, req: &ActionRequest) -> anyhow::Result<Job> {
        self.admin
            .post::<_, Job>(&format!("/items/{item}/actions"), req)
            .map_err(|e| anyhow!("{} {item}: {e}", req.action))
    }

    /// Wait until the job ends (or waits for an operator).
    fn wait_job(&self, job: &Job, until_waiting: bool) -> anyhow::Result<Job> {
        let id = job.id.clone();
        let j = wait_for(Duration::from_secs(600), &format!("job {id}"), || {
            let j = self.admin.job(&id)?;
            let stop = j.state.is_finished() || (until_waiting && j.state == JobState::Waiting);
            Ok(stop.then_some(j))
        })?;
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

    fn item(&self) -> anyhow::Result<Item> {
        Ok(self.admin.item("vm1")?)
    }

    /// A recovery point newer than `after` (barrier ns).
    fn wait_point(&self, after: u64) -> anyhow::Result<RecoveryPoint> {
        wait_for(Duration::from_secs(120), "a recovery point", || {
            let pts = self.admin.points("vm1")?;
            Ok(pts
                .into_iter()
                .filter(|p| p.barrier_ns.unwrap_or(0) > after)
                .max_by_key(|p| p.barrier_ns))
        })
    }

    fn workload(&mut self, name: &str, m: &Machine, extra: &[String]) -> anyhow::Result<()> {
        let log = self.dir.join("workload.log").display().to_string();
        let mut args: Vec<String> = vec!["workload".into()];
        for d in ["disk0", "disk1"] {
            args.push("--disk".into());
            args.push(m.nbd_uri(d));
        }
        args.extend(
            [
                "--write-log",
                &log,
                "--inflight",
                "4",
                "--rate",
                &self.rate_s(),
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

    fn rate_s(&self) -> String {
        self.rate.to_string()
    }

    fn verify(&self, m: &Machine, point: Option<u64>) -> anyhow::Result<String> {
        let log = self.dir.join("workload.log");
        let mut cmd = Command::new(&self.exe);
        cmd.arg("verify");
        for d in ["disk0", "disk1"] {
            cmd.arg("--disk").arg(m.nbd_uri(d));
        }
        cmd.arg("--write-log").arg(&log);
        if let Some(t) = point {
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

    fn shutdown(&mut self) {
        // Machines first (their agents are the nodes' children, not ours).
        for site in ["primary", "recovery"] {
            for m in machine::list(&self.dir.join(site).join("host")) {
                let _ = std::fs::remove_file(m.dir.join("want-running"));
                let _ = m.stop(Duration::from_secs(20));
            }
        }
        for (_, c) in self.children.iter_mut().rev() {
            if let Some(p) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
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

fn human(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn wait_for<T>(
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

fn step_bytes(job: &Job, name: &str) -> Option<u64> {
    job.steps
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.bytes_total)
}

fn step_secs(job: &Job, first: &str, last: &str) -> Option<f64> {
    let t = |n: &str, end: bool| {
        job.steps.iter().find(|s| s.name == n).and_then(|s| {
            let at = if end { &s.ended_at } else { &s.started_at };
            at.as_deref().and_then(rebound_control::time::parse)
        })
    };
    let (a, b) = (t(first, false)?, t(last, true)?);
    b.duration_since(a).ok().map(|d| d.as_secs_f64())
}

pub fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let disk_size = crate::cmd::node::parse_size(&a.disk_size)
        .filter(|s| *s >= 1 << 20)
        .ok_or_else(|| {
            Failure::new(
                ErrorCode::InvalidArgument,
                format!("--disk-size {:?}: at least 1M", a.disk_size),
            )
        })?;
    let (dir, _tmp) = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (d.canonicalize()?, None)
        }
        None => {
            let t = tempfile::Builder::new().prefix("rebound-demo-").tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    say(format!("rebound demo: lab in {}", dir.display()));

    // Configuration server.
    let sdir = dir.join("server");
    let init = Command::new(&exe)
        .args(["server", "init", "--data-dir"])
        .arg(&sdir)
        .output()?;
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
    let key = field("registration key:")?;
    let mut lab = Lab {
        dir: dir.clone(),
        exe: exe.clone(),
        server_url: String::new(),
        admin: Api::new("http://127.0.0.1:1", None),
        key,
        admin_token: admin_token.clone(),
        children: Vec::new(),
        timeline: Vec::new(),
        started,
        rpo_secs: a.rpo_secs.max(1),
        rate: a.rate.max(1),
    };
    let result = run_lab(&mut lab, &sdir, disk_size);
    match (&result, a.keep) {
        (Ok(()), true) => {
            // Leave the processes running: forget them.
            for (_, c) in lab.children.drain(..) {
                std::mem::forget(c);
            }
            if let Some(t) = _tmp {
                let _ = t.keep();
            }
            say(format!(
                "\nthe lab keeps running in {}. Explore it with:\n  export REBOUND_SERVER={} REBOUND_TOKEN={}\n  rebound items\n  rebound points vm1\n  rebound jobs\n  rebound servers\n  rebound machine list --host {}/recovery/host\n  rebound failover vm1 …, rebound verify --disk 'nbd+unix:///disk0?socket={}/primary/host/vm1/nbd.sock' --write-log {}/workload.log\nstop it with: pkill -f 'rebound (node|server run|agent run|workload)'",
                dir.display(),
                lab.server_url,
                lab.admin_token,
                dir.display(),
                dir.display(),
                dir.display()
            ));
        }
        _ => {
            if result.is_err() {
                say(format!("logs are in {}", dir.display()));
                if let Some(t) = _tmp {
                    let _ = t.keep();
                }
            }
            lab.shutdown();
        }
    }
    result?;
    Ok(ExitCode::SUCCESS)
}

fn run_lab(lab: &mut Lab, sdir: &Path, disk_size: u64) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let sdir_s = sdir.display().to_string();
    let slog = lab.dir.join("server.log");
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
            "30",
        ],
        &slog,
    )?;
    let url = wait_for(Duration::from_secs(30), "the configuration server", || {
        let f = match std::fs::File::open(&slog) {
            Ok(f) => f,
            Err(_) => return Ok(None),
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
    let admin = lab.admin.clone();
    for (name, role) in [
        ("primary", SiteRole::Primary),
        ("recovery", SiteRole::Recovery),
    ] {
        let _: Site = admin.post(
            "/sites",
            &NewSite {
                name: name.into(),
                role,
            },
        )?;
    }
    let policies: Vec<Policy> = admin.post(
        "/policies",
        &NewPolicy {
            name: "demo".into(),
            rpo_threshold_secs: 60,
            retention_secs: 3600,
            app_consistent_frequency_secs: 3600,
        },
    )?;
    let policy = policies
        .into_iter()
        .find(|p| !p.read_only)
        .context("the server created no policy")?;
    let a = lab.start_node("primary")?;
    let b = lab.start_node("recovery")?;
    lab.row(
        "lab up",
        t0,
        None,
        format!(
            "configuration server {url}, nodes primary ({}) and recovery ({})",
            a.data_addr, b.data_addr
        ),
    );

    // The machine, running with a workload at the primary site.
    let t = Instant::now();
    let disks = [
        ("disk0", disk_size),
        ("disk1", (disk_size / 2).max(1 << 20)),
    ];
    let man = Manifest {
        name: "vm1".into(),
        os: rebound_api::OsType::Linux,
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
    let vm_a = machine::create(&a.host_dir, &man)?;
    rebound_disk::crashsafe::write_file_durable(&vm_a.dir.join("want-running"), b"1\n")?;
    wait_for(
        Duration::from_secs(30),
        "vm1 to run at the primary site",
        || Ok(vm_a.is_running().then_some(())),
    )?;
    lab.workload("workload-primary", &vm_a, &[])?;
    let _: Item = admin.post(
        "/items",
        &NewItem {
            name: "vm1".into(),
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
    wait_for(Duration::from_secs(30), "vm1's agent to register", || {
        let i = lab.item()?;
        Ok(i.agent_id.map(|_| ()))
    })?;
    lab.row(
        "machine vm1 running",
        t,
        Some(disks.iter().map(|d| d.1).sum()),
        "2 disks served over NBD, workload writing",
    );

    // Protect.
    let t = Instant::now();
    let job = lab.action(
        "vm1",
        &ActionRequest {
            policy_id: Some(policy.id.clone()),
            process_server_id: a.process_server_id.clone(),
            master_target_id: b.master_target_id.clone(),
            datastore: Some("data".into()),
            retention_volume: b.retention_volumes.first().map(|p| p.display().to_string()),
            ..ActionRequest::new(Action::EnableProtection)
        },
    )?;
    let job = lab.wait_job(&job, false)?;
    let point = lab.wait_point(0)?;
    lab.row(
        "enable protection",
        t,
        step_bytes(&job, "initial_sync"),
        format!("initial sync, first recovery point {}", point.id),
    );

    // Disaster at the primary site.
    std::thread::sleep(Duration::from_secs(lab.rpo_secs * 2));
    let t = Instant::now();
    let point = lab.wait_point(point.barrier_ns.unwrap_or(0))?;
    if let Some(pid) = vm_a.agent_pid()
        && let Some(p) = rustix::process::Pid::from_raw(pid)
    {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
    }
    lab.kill_child("node-primary");
    lab.stop_child("workload-primary");
    let job = lab.action(
        "vm1",
        &ActionRequest {
            kind: Some(FailoverKind::Unplanned),
            point_id: Some(point.id.clone()),
            ..ActionRequest::new(Action::Failover)
        },
    )?;
    lab.wait_job(&job, false)?;
    let vm_b = Machine::at(b.host_dir.join("vm1"));
    let barrier = point.barrier_ns.unwrap_or(0);
    let checked = lab.verify(&vm_b, Some(barrier))?;
    lab.row(
        "unplanned failover",
        t,
        None,
        format!(
            "primary killed; vm1 runs at recovery from point {}; verify: {checked}",
            point.id
        ),
    );

    let t = Instant::now();
    let job = lab.action("vm1", &ActionRequest::new(Action::Commit))?;
    lab.wait_job(&job, false)?;
    lab.workload(
        "workload-recovery",
        &vm_b,
        &["--after-point".into(), barrier.to_string()],
    )?;
    lab.row("commit", t, None, "workload writing at the recovery site");

    // The primary site comes back: reprotect.
    let t = Instant::now();
    let a = lab.start_node("primary")?;
    let job = lab.action(
        "vm1",
        &ActionRequest {
            process_server_id: b.process_server_id.clone(),
            master_target_id: a.master_target_id.clone(),
            datastore: Some("data".into()),
            retention_volume: a.retention_volumes.first().map(|p| p.display().to_string()),
            ..ActionRequest::new(Action::Reprotect)
        },
    )?;
    let job = lab.wait_job(&job, false)?;
    let differ = step_bytes(&job, "count_differences");
    lab.row(
        "reprotect",
        t,
        differ,
        "exact differing bytes counted, then only those sent (recovery → primary)",
    );
    let p = lab.wait_point(barrier)?;

    // Failback: phase 1 while the workload writes, then complete.
    std::thread::sleep(Duration::from_secs(lab.rpo_secs));
    let t = Instant::now();
    let job = lab.action(
        "vm1",
        &ActionRequest {
            kind: Some(FailoverKind::Planned),
            sync: Some(SyncMode::Delta),
            ..ActionRequest::new(Action::Failback)
        },
    )?;
    let job = lab.wait_job(&job, true)?;
    lab.row(
        "failback phase 1",
        t,
        step_bytes(&job, "count_differences"),
        format!(
            "delta sync while vm1 runs at recovery (latest point {})",
            p.id
        ),
    );
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    let job = lab.action("vm1", &ActionRequest::new(Action::Complete))?;
    let job = lab.wait_job(&job, false)?;
    lab.stop_child("workload-recovery");
    let downtime = step_secs(&job, "stop_source", "start_destination");
    let checked = lab.verify(&vm_a, None)?;
    lab.row(
        "failback complete",
        t,
        step_bytes(&job, "final_delta_sync"),
        format!(
            "downtime {} s (recovery vm stopped → primary vm running); verify: {checked}",
            downtime.map(|d| format!("{d:.1}")).unwrap_or("?".into())
        ),
    );

    let t = Instant::now();
    let job = lab.action("vm1", &ActionRequest::new(Action::Commit))?;
    lab.wait_job(&job, false)?;
    lab.workload("workload-primary-2", &vm_a, &[])?;
    lab.row(
        "commit failback",
        t,
        None,
        "vm1 runs at the primary site again",
    );

    let t = Instant::now();
    let job = lab.action(
        "vm1",
        &ActionRequest {
            process_server_id: a.process_server_id.clone(),
            master_target_id: b.master_target_id.clone(),
            datastore: Some("data".into()),
            retention_volume: b.retention_volumes.first().map(|p| p.display().to_string()),
            ..ActionRequest::new(Action::ReverseReplicate)
        },
    )?;
    let job = lab.wait_job(&job, false)?;
    let since = rebound_control::time::parse(&job.created_at)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let p = lab.wait_point(since)?;
    lab.row(
        "reverse replicate",
        t,
        step_bytes(&job, "count_differences"),
        format!("primary → recovery again; recovery point {}", p.id),
    );
    lab.stop_child("workload-primary-2");

    say(format!(
        "\ntimeline: {} steps in {:.1} s; every step above is a job of the configuration server",
        lab.timeline.len(),
        lab.started.elapsed().as_secs_f64()
    ));
    Ok(())
}
