//! Faults and cancels in the middle of the lifecycle, with real processes
//! (configuration server, two site nodes, agents, workloads) in a lab:
//! - a node or an agent SIGKILLed and restarted during enable protection,
//!   reprotect and failback: the job resumes (or fails with a clear code and
//!   can be run again) and no acknowledged write is lost;
//! - a cancel leaves the destination exactly as it was;
//! - a failed-over machine's agent is registered within 10 s.
//!
//! `REBOUND_FAULT_CHUNK_DELAY_MS` slows every delta-sync source down so that
//! a sync can be interrupted. A failing test keeps its lab directory (logs
//! of every process) and names it.

use anyhow::{Context, bail, ensure};
use rebound_api::{
    Action, ActionRequest, Direction, FailoverKind, Item, Job, JobState, Phase, StepState, SyncMode,
};
use rebound_node::machine::{Machine, Manifest};
use rebound_node::node::NodeInfo;
use rebound_testkit::lab::{Lab, LabConfig, in_temp_dir, wait_for};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const MIB: u64 = 1 << 20;

/// Run `f` in a fresh lab; on failure keep the lab directory and name it.
fn with_lab(name: &str, delay_ms: u64, f: impl FnOnce(&mut Lab) -> anyhow::Result<()>) {
    let mut env = vec![("REBOUND_SYNC_DURABLE_CHUNKS".to_string(), "1".to_string())];
    if delay_ms > 0 {
        env.push((
            "REBOUND_FAULT_CHUNK_DELAY_MS".to_string(),
            delay_ms.to_string(),
        ));
    }
    in_temp_dir(&format!("faults-{name}"), |dir| {
        let mut lab = Lab::start(LabConfig {
            dir: dir.to_path_buf(),
            exe: env!("CARGO_BIN_EXE_rebound").into(),
            rpo_secs: 1,
            node_args: vec![],
            env,
        })?;
        let r = f(&mut lab);
        timeline(&lab);
        r
    });
}

/// Print every job of the lab with the time of each step.
fn timeline(lab: &Lab) {
    let Ok(mut jobs) = lab.admin.get::<Vec<Job>>("/jobs") else {
        return;
    };
    jobs.sort_by(|a, b| a.created_at.cmp(&b.created_at));
    let secs = |a: &Option<String>, b: &Option<String>| {
        let t = |x: &Option<String>| x.as_deref().and_then(rebound_control::time::parse);
        t(b).zip(t(a))
            .and_then(|(b, a)| b.duration_since(a).ok())
            .map(|d| format!("{:.1}", d.as_secs_f64()))
            .unwrap_or_else(|| "-".into())
    };
    for j in &jobs {
        let steps: Vec<String> = j
            .steps
            .iter()
            .filter(|s| s.started_at.is_some())
            .map(|s| format!("{} {}", s.name, secs(&s.started_at, &s.ended_at)))
            .collect();
        eprintln!(
            "  {} {} {} s: {}",
            j.action,
            j.state,
            secs(&Some(j.created_at.clone()), &j.ended_at),
            steps.join(", ")
        );
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Write `writes` logged pattern writes of up to 1 MiB through the
/// machine's agent, so that its disks hold data to sync (and the write log
/// knows every block).
fn prefill(lab: &Lab, m: &Machine, writes: u64, extra: &[String]) -> anyhow::Result<()> {
    let man = m.manifest()?;
    let mut cmd = Command::new(&lab.exe);
    cmd.arg("workload");
    for d in &man.disks {
        cmd.arg("--disk").arg(m.nbd_uri(&d.name));
    }
    cmd.arg("--write-log")
        .arg(lab.write_log(&man.name))
        .args(["--writes", &writes.to_string()])
        .args(["--max-blocks", "256", "--inflight", "4"])
        .args(extra);
    let out = cmd.output().context("running rebound workload")?;
    ensure!(
        out.status.success(),
        "prefill workload failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Wait until step `step` of the job runs and has moved `min_done` bytes.
/// A seeded delta sync reports 0 bytes done until its end: with
/// `min_done` 0, two progress reports are enough (the reporter runs only
/// while the disks are pulled).
fn wait_step_progress(lab: &Lab, job: &Job, step: &str, min_done: u64) -> anyhow::Result<Job> {
    let mut reports = std::collections::HashSet::new();
    wait_for(
        Duration::from_secs(90),
        &format!("step {step} of job {} to move bytes", job.id),
        || {
            let j = lab.admin.job(&job.id)?;
            if j.state.is_finished() || j.state == JobState::Waiting {
                bail!(
                    "job {} ({}) is {} before {step} could be interrupted: {:?}",
                    j.id,
                    j.action,
                    j.state,
                    j.steps
                        .iter()
                        .map(|s| (&s.name, s.state, s.bytes_done))
                        .collect::<Vec<_>>()
                );
            }
            let Some(s) = j
                .steps
                .iter()
                .find(|s| s.name == step && s.state == StepState::Running)
            else {
                return Ok(None);
            };
            if let Some(u) = &s.updated_at {
                reports.insert(u.clone());
            }
            Ok(
                (s.bytes_done >= min_done.max(1) || (min_done == 0 && reports.len() >= 3))
                    .then_some(j),
            )
        },
    )
}

fn kill_pid(pid: i32) {
    if let Some(p) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
    }
}

fn disk_bytes(m: &Machine) -> anyhow::Result<Vec<Vec<u8>>> {
    m.disk_paths()?
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .collect()
}

fn wait_phase(lab: &Lab, name: &str, phase: Phase, dir: Direction) -> anyhow::Result<Item> {
    wait_for(
        Duration::from_secs(20),
        &format!("{name} to be {phase} ({dir})"),
        || {
            let i = lab.item(name)?;
            Ok(
                (i.state.phase == phase && i.state.direction == dir && i.job_id.is_none())
                    .then_some(i),
            )
        },
    )
}

/// The machine `vm1` running at the primary site with data on its disks,
/// registered as an item.
fn machine_at_primary(
    lab: &mut Lab,
    disk: u64,
    writes: u64,
) -> anyhow::Result<(NodeInfo, NodeInfo, Machine, Manifest)> {
    let a = lab.start_node("primary")?;
    let b = lab.start_node("recovery")?;
    let (vm_a, man) = lab.create_machine(&a, "vm1", &[("disk0", disk)], true)?;
    if writes > 0 {
        prefill(lab, &vm_a, writes, &[])?;
    }
    lab.add_item(&man, true)?;
    Ok((a, b, vm_a, man))
}

/// Crash of the primary site and unplanned failover to the latest point.
fn disaster_failover(lab: &mut Lab, vm_a: &Machine, after_ns: u64) -> anyhow::Result<(Job, u64)> {
    let point = lab.wait_point("vm1", after_ns)?;
    if let Some(pid) = vm_a.agent_pid() {
        kill_pid(pid);
    }
    lab.kill_child("node-primary");
    lab.stop_child("workload-primary");
    let job = lab.fail_over_unplanned("vm1", &point.id)?;
    Ok((job, point.barrier_ns.unwrap_or(0)))
}

/// Protected, failed over (unplanned), committed at the recovery site with
/// a workload writing there, and the primary node back: ready to reprotect.
struct Committed {
    a: NodeInfo,
    b: NodeInfo,
    vm_a: Machine,
    vm_b: Machine,
}

fn committed_at_recovery(lab: &mut Lab, disk: u64, writes: u64) -> anyhow::Result<Committed> {
    let (a0, b, vm_a, _) = machine_at_primary(lab, disk, writes)?;
    let job = lab.action("vm1", &lab.protect_request(&a0, &b))?;
    lab.wait_job(&job, false)?;
    let p = lab.wait_point("vm1", 0)?;
    let (_, barrier) = disaster_failover(lab, &vm_a, p.barrier_ns.unwrap_or(0))?;
    let vm_b = Machine::at(b.host_dir.join("vm1"));
    let job = lab.action("vm1", &ActionRequest::new(Action::Commit))?;
    lab.wait_job(&job, false)?;
    // Change most of the disk at the recovery site (a new epoch of the
    // write log after the point), then keep writing.
    prefill(
        lab,
        &vm_b,
        writes,
        &["--after-point".into(), barrier.to_string()],
    )?;
    lab.start_workload("workload-recovery", &vm_b, 20, &[])?;
    let a = lab.start_node("primary")?;
    // The primary machine must stay off: it runs at the recovery site now.
    wait_for(
        Duration::from_secs(20),
        "the primary machine to stay off",
        || Ok((!vm_a.is_running() && !vm_a.dir.join("want-running").exists()).then_some(())),
    )?;
    Ok(Committed { a, b, vm_a, vm_b })
}

fn failback_request() -> ActionRequest {
    ActionRequest {
        kind: Some(FailoverKind::Planned),
        sync: Some(SyncMode::Delta),
        ..ActionRequest::new(Action::Failback)
    }
}

fn describe(j: &Job) -> String {
    let why = j
        .error
        .as_ref()
        .map(|e| format!("E{} {}", e.code, e.message))
        .unwrap_or_default();
    format!("job {} ({}) {} {why}", j.id, j.action, j.state)
}

/// 1. The master target dies during enable protection's initial sync.
#[test]
fn recovery_node_killed_during_initial_sync_resumes() {
    with_lab("initial-sync", 250, |lab| {
        let (a, b, vm_a, _) = machine_at_primary(lab, 64 * MIB, 300)?;
        lab.start_workload("workload-primary", &vm_a, 20, &[])?;
        let job = lab.action("vm1", &lab.protect_request(&a, &b))?;
        let running = wait_step_progress(lab, &job, "initial_sync", 12 * MIB)?;
        eprintln!(
            "killing the recovery node at {:?}",
            running
                .steps
                .iter()
                .map(|s| (&s.name, s.bytes_done))
                .collect::<Vec<_>>()
        );
        lab.kill_child("node-recovery");
        std::thread::sleep(Duration::from_millis(500));
        let b2 = lab.start_node("recovery")?;
        ensure!(
            b2.master_target_id == b.master_target_id,
            "the restarted node has another identity: {:?} vs {:?}",
            b2.master_target_id,
            b.master_target_id
        );
        let done = lab.wait_job(&job, false)?;
        ensure!(done.state == JobState::Succeeded, "{}", describe(&done));
        let msg = done
            .steps
            .iter()
            .find(|s| s.name == "initial_sync")
            .and_then(|s| s.message.clone())
            .unwrap_or_default();
        // The restarted master target resumed the pull from its persistent
        // cursor (the agent serves live disks whose writes it tracks since
        // its barrier, so a changed source does not restart the sync).
        eprintln!("initial_sync: {msg}");
        ensure!(
            msg.contains("resumed from an interrupted sync"),
            "the initial sync started over: {msg}"
        );
        std::thread::sleep(Duration::from_secs(2));
        let (_, barrier) = disaster_failover(lab, &vm_a, now_ns() - 1_000_000_000)?;
        let vm_b = Machine::at(b2.host_dir.join("vm1"));
        let checked = lab.verify(&vm_b, Some(barrier))?;
        eprintln!("{checked}");
        Ok(())
    });
}

/// 2. The source agent dies during reprotect's delta sync.
#[test]
fn source_agent_killed_during_reprotect_delta_sync() {
    with_lab("reprotect-agent", 400, |lab| {
        let c = committed_at_recovery(lab, 32 * MIB, 150)?;
        let req = lab.reprotect_request(Action::Reprotect, &c.b, &c.a);
        let job = lab.action("vm1", &req)?;
        wait_step_progress(lab, &job, "delta_sync", 0)?;
        let pid = c.vm_b.agent_pid().context("no agent pid at recovery")?;
        kill_pid(pid);
        eprintln!("killed the recovery agent {pid}");
        let end = lab.wait_job_end(&job, false)?;
        eprintln!("reprotect after the agent's death: {}", describe(&end));
        if end.state != JobState::Succeeded {
            let e = end
                .error
                .as_ref()
                .context("a failed job without an error")?;
            ensure!(e.code != 0 && !e.message.is_empty(), "unclear error {e:?}");
            wait_phase(lab, "vm1", Phase::Committed, Direction::Forward)
                .or_else(|_| wait_phase(lab, "vm1", Phase::Committed, Direction::Reverse))?;
            let job = lab.action("vm1", &req)?;
            lab.wait_job(&job, false)?;
        }
        // The supervisor restarted the agent: write again, then fail back.
        wait_for(Duration::from_secs(20), "the agent to run again", || {
            Ok(c.vm_b.agent_pid().filter(|p| *p != pid).map(|_| ()))
        })?;
        lab.stop_child("workload-recovery");
        lab.start_workload("workload-recovery-2", &c.vm_b, 20, &[])?;
        lab.wait_point("vm1", now_ns())?;
        let job = lab.action("vm1", &failback_request())?;
        lab.wait_job(&job, true)?;
        let job = lab.action("vm1", &ActionRequest::new(Action::Complete))?;
        lab.wait_job(&job, false)?;
        lab.stop_child("workload-recovery-2");
        let checked = lab.verify(&c.vm_a, None)?;
        eprintln!("{checked}");
        Ok(())
    });
}

/// 3. The primary node (master target of the failback) dies during phase 1.
#[test]
fn primary_node_killed_during_failback_phase_1_resumes() {
    with_lab("failback-node", 400, |lab| {
        let c = committed_at_recovery(lab, 32 * MIB, 150)?;
        let job = lab.action("vm1", &lab.reprotect_request(Action::Reprotect, &c.b, &c.a))?;
        lab.wait_job(&job, false)?;
        lab.wait_point("vm1", now_ns())?;
        let job = lab.action("vm1", &failback_request())?;
        wait_step_progress(lab, &job, "delta_sync", 0)?;
        lab.kill_child("node-primary");
        std::thread::sleep(Duration::from_millis(500));
        let a2 = lab.start_node("primary")?;
        ensure!(a2.master_target_id == c.a.master_target_id, "new identity");
        let waiting = lab.wait_job(&job, true)?;
        ensure!(waiting.state == JobState::Waiting, "{}", describe(&waiting));
        if let Some(m) = waiting
            .steps
            .iter()
            .find(|s| s.name == "delta_sync")
            .and_then(|s| s.message.as_deref())
        {
            eprintln!("delta_sync: {m}");
        }
        let done = lab.action("vm1", &ActionRequest::new(Action::Complete))?;
        lab.wait_job(&done, false)?;
        lab.stop_child("workload-recovery");
        let checked = lab.verify(&c.vm_a, None)?;
        eprintln!("{checked}");
        Ok(())
    });
}

fn cancel(lab: &Lab, job: &Job) -> anyhow::Result<Job> {
    let _: Job = lab
        .admin
        .post(&format!("/jobs/{}/cancel", job.id), &serde_json::json!({}))?;
    let j = lab.wait_job_end(job, false)?;
    ensure!(j.state == JobState::Cancelled, "{}", describe(&j));
    Ok(j)
}

fn staging_dir(node: &NodeInfo, lab: &Lab, item: &Item, job: &Job) -> PathBuf {
    lab.site_dir(&node.site)
        .join("data")
        .join("staging")
        .join(&item.id)
        .join(&job.id)
}

/// 4. Cancel a reprotect during its delta sync, then a failback waiting to
///    be completed: the primary machine's disks are untouched each time.
#[test]
fn cancel_leaves_the_destination_as_it_was() {
    with_lab("cancel", 400, |lab| {
        let c = committed_at_recovery(lab, 32 * MIB, 150)?;
        let before = disk_bytes(&c.vm_a)?;
        let item = lab.item("vm1")?;
        let replica_meta = lab
            .site_dir("primary")
            .join("data")
            .join("replicas")
            .join(format!("{}.json", item.id));

        // (b) reprotect cancelled during delta_sync.
        let req = lab.reprotect_request(Action::Reprotect, &c.b, &c.a);
        let job = lab.action("vm1", &req)?;
        wait_step_progress(lab, &job, "delta_sync", 0)?;
        let from = lab.admin.job(&job.id)?.from_state;
        cancel(lab, &job)?;
        let it = lab.item("vm1")?;
        ensure!(
            Some(it.state) == from,
            "after cancel the item is {} (was {from:?})",
            it.state
        );
        // Let a step that was still running notice, then check.
        let stage = staging_dir(&c.a, lab, &item, &job);
        wait_for(Duration::from_secs(10), "the staging to go", || {
            Ok((!stage.exists()).then_some(()))
        })?;
        std::thread::sleep(Duration::from_secs(2));
        ensure!(
            !replica_meta.exists(),
            "{} left after a cancelled reprotect",
            replica_meta.display()
        );
        ensure!(disk_bytes(&c.vm_a)? == before, "the primary disks changed");
        ensure!(!c.vm_a.is_running(), "the primary machine runs");

        // (a) failback cancelled while it waits to be completed.
        let job = lab.action("vm1", &req)?;
        lab.wait_job(&job, false)?;
        lab.wait_point("vm1", now_ns())?;
        let before = disk_bytes(&c.vm_a)?;
        let job = lab.action("vm1", &failback_request())?;
        let waiting = lab.wait_job(&job, true)?;
        ensure!(waiting.state == JobState::Waiting, "{}", describe(&waiting));
        let stage = staging_dir(&c.a, lab, &item, &job);
        ensure!(stage.exists(), "no staging {} in phase 1", stage.display());
        cancel(lab, &job)?;
        let t = Instant::now();
        wait_for(Duration::from_secs(10), "the staging to go", || {
            Ok((!stage.exists()).then_some(()))
        })?;
        eprintln!(
            "staging removed {:.1} s after the cancel",
            t.elapsed().as_secs_f64()
        );
        ensure!(disk_bytes(&c.vm_a)? == before, "the primary disks changed");
        ensure!(!c.vm_a.is_running(), "the primary machine runs");
        let it = wait_phase(lab, "vm1", Phase::Protected, Direction::Reverse)?;
        ensure!(
            it.active_site == rebound_api::SiteRole::Recovery,
            "active {:?}",
            it.active_site
        );
        ensure!(c.vm_b.is_running(), "the recovery machine stopped");
        lab.wait_point("vm1", now_ns())?;
        lab.stop_child("workload-recovery");
        Ok(())
    });
}

/// 5. After an unplanned failover, the agent at the recovery site is the
///    item's agent and heartbeats within 10 s.
#[test]
fn failed_over_agent_registers_within_10_s() {
    with_lab("agent-registers", 0, |lab| {
        let (a, b, vm_a, _) = machine_at_primary(lab, 4 * MIB, 20)?;
        let job = lab.action("vm1", &lab.protect_request(&a, &b))?;
        lab.wait_job(&job, false)?;
        let p = lab.wait_point("vm1", 0)?;
        let old_agent = lab.item("vm1")?.agent_id;
        let (job, _) = disaster_failover(lab, &vm_a, p.barrier_ns.unwrap_or(0))?;
        let t = Instant::now();
        let ended = job
            .ended_at
            .as_deref()
            .and_then(rebound_control::time::parse)
            .context("the job has no end time")?;
        let agent = wait_for(Duration::from_secs(30), "the recovery agent", || {
            let i = lab.item("vm1")?;
            let Some(id) = i
                .agent_id
                .clone()
                .filter(|id| Some(id) != old_agent.as_ref())
            else {
                return Ok(None);
            };
            let comp = lab.admin.component(&id)?;
            let fresh = comp
                .last_heartbeat
                .as_deref()
                .and_then(rebound_control::time::parse)
                .is_some_and(|hb| hb >= ended);
            Ok((comp.site_id == i.recovery_site_id && fresh).then_some(comp))
        })?;
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "agent {} registered and heartbeating {secs:.2} s after the failover ended",
            agent.id
        );
        ensure!(secs < 10.0, "the agent took {secs:.1} s");
        ensure!(
            Machine::at(b.host_dir.join("vm1")).is_running(),
            "not running"
        );
        Ok(())
    });
}
