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
use rebound_api::{Action, ActionRequest, FailoverKind, SyncMode};
use rebound_node::machine::Machine;
use rebound_testkit::lab::{Lab, LabConfig, step_bytes, step_secs};
use rebound_types::ErrorCode;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
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
    /// Interval of crash-consistent recovery points, in seconds (the lab
    /// policy's crash-consistent frequency).
    #[arg(long, default_value_t = 2)]
    rpo_secs: u64,
    /// Workload writes per second and per writer.
    #[arg(long, default_value_t = 40)]
    rate: u64,
}

struct Timeline {
    rows: Vec<Row>,
    started: Instant,
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

use crate::output::human_bytes as human;

impl Timeline {
    fn row(&mut self, step: &str, t0: Instant, bytes: Option<u64>, note: impl Into<String>) {
        let r = Row {
            step: step.into(),
            secs: t0.elapsed().as_secs_f64(),
            bytes,
            note: note.into(),
        };
        say(format!(
            "  ✓ {:<22} {:>6.1} s {:>11}  {}",
            r.step,
            r.secs,
            r.bytes.map(human).unwrap_or_default(),
            r.note
        ));
        self.rows.push(r);
    }
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
    let (dir, tmp) = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (d.canonicalize()?, None)
        }
        None => {
            let t = tempfile::Builder::new().prefix("rebound-demo-").tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    say(format!("rebound demo: lab in {}", dir.display()));
    let mut tl = Timeline {
        rows: Vec::new(),
        started: Instant::now(),
    };
    let t0 = Instant::now();
    let mut lab = Lab::start(LabConfig {
        dir: dir.clone(),
        exe: std::env::current_exe()?,
        rpo_secs: a.rpo_secs,
        node_args: Vec::new(),
        env: Vec::new(),
    })?;
    let result = run_lab(&mut lab, &mut tl, t0, disk_size, a.rate.max(1));
    match &result {
        Ok(()) if a.keep => {
            lab.detach();
            if let Some(t) = tmp {
                let _ = t.keep();
            }
            say(format!(
                "\nthe lab keeps running in {d}. Explore it with:\n  export REBOUND_SERVER={url} REBOUND_TOKEN={tok}\n  rebound items; rebound points vm1; rebound jobs; rebound servers\n  rebound machine list --host {d}/primary/host\n  rebound verify --disk 'nbd+unix:///disk0?socket={d}/primary/host/vm1/nbd.sock' --disk 'nbd+unix:///disk1?socket={d}/primary/host/vm1/nbd.sock' --write-log {d}/vm1.writes\nstop it with: pkill -f {d}",
                d = dir.display(),
                url = lab.server_url,
                tok = lab.admin_token,
            ));
        }
        Ok(()) => {}
        Err(_) => {
            say(format!("logs are in {}", dir.display()));
            if let Some(t) = tmp {
                let _ = t.keep();
            }
        }
    }
    drop(lab);
    result?;
    Ok(ExitCode::SUCCESS)
}

fn run_lab(
    lab: &mut Lab,
    tl: &mut Timeline,
    t0: Instant,
    disk_size: u64,
    rate: u64,
) -> anyhow::Result<()> {
    let a = lab.start_node("primary")?;
    let b = lab.start_node("recovery")?;
    tl.row(
        "lab up",
        t0,
        None,
        format!(
            "configuration server {}, nodes primary ({}) and recovery ({})",
            lab.server_url, a.data_addr, b.data_addr
        ),
    );

    // The machine, running with a workload at the primary site.
    let t = Instant::now();
    let disks = [
        ("disk0", disk_size),
        ("disk1", (disk_size / 2).max(1 << 20)),
    ];
    let (vm_a, man) = lab.create_machine(&a, "vm1", &disks, true)?;
    lab.start_workload("workload-primary", &vm_a, rate, &[])?;
    lab.add_item(&man, true)?;
    tl.row(
        "machine vm1 running",
        t,
        Some(disks.iter().map(|d| d.1).sum()),
        "2 disks served over NBD by its agent, workload writing",
    );

    // Protect.
    let t = Instant::now();
    let job = lab.action("vm1", &lab.protect_request(&a, &b))?;
    let job = lab.wait_job(&job, false)?;
    let point = lab.wait_point("vm1", 0)?;
    tl.row(
        "enable protection",
        t,
        step_bytes(&job, "initial_sync"),
        format!("initial sync; first recovery point {}", point.id),
    );

    // Disaster at the primary site: its node and the machine die.
    std::thread::sleep(Duration::from_secs(lab.rpo_secs * 2));
    let t = Instant::now();
    let point = lab.wait_point("vm1", point.barrier_ns.unwrap_or(0))?;
    if let Some(pid) = vm_a.agent_pid()
        && let Some(p) = rustix::process::Pid::from_raw(pid)
    {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
    }
    lab.kill_child("node-primary");
    lab.stop_child("workload-primary");
    lab.fail_over_unplanned("vm1", &point.id)?;
    let vm_b = Machine::at(b.host_dir.join("vm1"));
    let barrier = point.barrier_ns.unwrap_or(0);
    let checked = lab.verify(&vm_b, Some(barrier))?;
    tl.row(
        "unplanned failover",
        t,
        None,
        format!(
            "primary site killed; vm1 runs at recovery from point {}",
            point.id
        ),
    );
    say(format!("      {checked}"));

    let t = Instant::now();
    let job = lab.action("vm1", &ActionRequest::new(Action::Commit))?;
    lab.wait_job(&job, false)?;
    lab.start_workload(
        "workload-recovery",
        &vm_b,
        rate,
        &["--after-point".into(), barrier.to_string()],
    )?;
    tl.row("commit", t, None, "workload writing at the recovery site");

    // The primary site comes back: reprotect.
    let t = Instant::now();
    let a = lab.start_node("primary")?;
    let job = lab.action("vm1", &lab.reprotect_request(Action::Reprotect, &b, &a))?;
    let job = lab.wait_job(&job, false)?;
    tl.row(
        "reprotect",
        t,
        step_bytes(&job, "count_differences"),
        "bytes that differ, counted before sending; only those sent",
    );
    let p = lab.wait_point("vm1", barrier)?;

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
    tl.row(
        "failback phase 1",
        t,
        step_bytes(&job, "count_differences"),
        format!(
            "delta sync while vm1 keeps running at recovery (last point {})",
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
    tl.row(
        "failback complete",
        t,
        step_bytes(&job, "final_delta_sync"),
        format!(
            "downtime {} s (recovery vm stopped → primary vm running)",
            downtime.map(|d| format!("{d:.1}")).unwrap_or("?".into())
        ),
    );
    say(format!("      {checked}"));

    let t = Instant::now();
    let job = lab.action("vm1", &ActionRequest::new(Action::Commit))?;
    lab.wait_job(&job, false)?;
    lab.start_workload("workload-primary-2", &vm_a, rate, &[])?;
    tl.row(
        "commit failback",
        t,
        None,
        "vm1 runs at the primary site again",
    );

    let t = Instant::now();
    let job = lab.action(
        "vm1",
        &lab.reprotect_request(Action::ReverseReplicate, &a, &b),
    )?;
    let job = lab.wait_job(&job, false)?;
    let since = rebound_control::time::parse(&job.created_at)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let p = lab.wait_point("vm1", since)?;
    tl.row(
        "reverse replicate",
        t,
        step_bytes(&job, "count_differences"),
        format!("primary → recovery again; recovery point {}", p.id),
    );
    lab.stop_child("workload-primary-2");

    say(format!(
        "\ntimeline: {} steps in {:.1} s, each a job of the configuration server; both verifications passed",
        tl.rows.len(),
        tl.started.elapsed().as_secs_f64()
    ));
    Ok(())
}
