//! The workflows of DESIGN.md §2 that the demo does not run, each with real
//! processes (a configuration server, one node per site, machines of the
//! `local` driver, live workloads) and each ending with `rebound verify`:
//! test failover and its cleanup, a two-phase planned failover, an
//! unplanned failover to an older point followed by a change of recovery
//! point, a failback by full download, and the exact count of differing
//! bytes before a reprotect moves data.
//!
//! A failing test keeps its lab directory (logs of every process) and says
//! where it is.

use anyhow::{Context, anyhow, bail, ensure};
use rebound_api::{Action, ActionRequest, FailoverKind, JobState, Location, Phase, SyncMode};
use rebound_node::client::CallError;
use rebound_node::machine::{Machine, Manifest};
use rebound_node::node::NodeInfo;
use rebound_testkit::lab::{Lab, LabConfig, in_temp_dir, step_bytes, wait_for};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Two small disks.
const DISKS: [(&str, u64); 2] = [("disk0", 16 << 20), ("disk1", 8 << 20)];
/// Workload writes per second and per writer.
const RATE: u64 = 40;

/// Run `body` in a fresh lab; on failure keep the lab directory and panic
/// with the error and where the logs are.
fn in_lab(name: &str, body: impl FnOnce(&mut Lab) -> anyhow::Result<()>) {
    in_temp_dir(name, |dir| {
        let mut lab = Lab::start(LabConfig {
            dir: dir.to_path_buf(),
            exe: env!("CARGO_BIN_EXE_rebound").into(),
            rpo_secs: 1,
            node_args: vec![],
            env: vec![],
        })?;
        body(&mut lab)
    });
}

/// Both nodes, and a running machine `vm1` at the primary site registered
/// as an item (not yet protected).
fn lab_with_machine(lab: &mut Lab) -> anyhow::Result<(NodeInfo, NodeInfo, Machine, Manifest)> {
    let a = lab.start_node("primary")?;
    let b = lab.start_node("recovery")?;
    let (vm, man) = lab.create_machine(&a, "vm1", &DISKS, true)?;
    lab.add_item(&man, true)?;
    Ok((a, b, vm, man))
}

/// Protect `vm1` primary → recovery and wait for its first recovery point.
fn protect(lab: &Lab, a: &NodeInfo, b: &NodeInfo) -> anyhow::Result<rebound_api::RecoveryPoint> {
    let job = lab.action("vm1", &lab.protect_request(a, b))?;
    lab.wait_job(&job, false)?;
    lab.wait_point("vm1", 0)
}

/// The primary site dies: the machine's agent and the site's node are killed.
fn kill_primary(lab: &mut Lab, vm: &Machine) {
    if let Some(pid) = vm.agent_pid()
        && let Some(p) = rustix::process::Pid::from_raw(pid)
    {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
    }
    lab.kill_child("node-primary");
}

/// Submit an action; a refusal carries every failed precheck.
fn try_action(lab: &Lab, req: &ActionRequest) -> Result<rebound_api::Job, ApiRefusal> {
    lab.admin
        .post::<_, rebound_api::Job>("/items/vm1/actions", req)
        .map_err(|e| match e {
            CallError::Api { error, .. } => ApiRefusal(error),
            CallError::Transport(m) => ApiRefusal(rebound_api::ApiError {
                code: 0,
                message: m,
                remedy: String::new(),
                failures: vec![],
            }),
        })
}

#[derive(Debug)]
struct ApiRefusal(rebound_api::ApiError);

impl std::fmt::Display for ApiRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "E{} {}", self.0.code, self.0.message)?;
        for x in &self.0.failures {
            write!(f, "; E{} {}", x.code, x.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiRefusal {}

fn phase(lab: &Lab) -> anyhow::Result<Phase> {
    Ok(lab.item("vm1")?.state.phase)
}

/// Bytes that differ between two equally sized sets of disks, 4 KiB by 4 KiB.
fn differing_bytes(a: &[std::path::PathBuf], b: &[std::path::PathBuf]) -> anyhow::Result<u64> {
    const BLOCK: usize = 4096;
    let mut total = 0u64;
    for (pa, pb) in a.iter().zip(b) {
        let da = std::fs::read(pa).with_context(|| pa.display().to_string())?;
        let db = std::fs::read(pb).with_context(|| pb.display().to_string())?;
        ensure!(
            da.len() == db.len(),
            "{} and {} differ in size",
            pa.display(),
            pb.display()
        );
        total += da
            .chunks(BLOCK)
            .zip(db.chunks(BLOCK))
            .filter(|(x, y)| x != y)
            .map(|(x, _)| x.len() as u64)
            .sum::<u64>();
    }
    Ok(total)
}

/// The message a job's step left.
fn step_message(job: &rebound_api::Job, step: &str) -> String {
    job.steps
        .iter()
        .find(|s| s.name == step)
        .and_then(|s| s.message.clone())
        .unwrap_or_default()
}

fn wait_gone(path: &Path) -> anyhow::Result<()> {
    wait_for(Duration::from_secs(30), &path.display().to_string(), || {
        Ok((!path.exists()).then_some(()))
    })
}

#[test]
fn test_failover_runs_a_copy_while_replication_continues_then_cleanup_removes_it() {
    in_lab("test-failover", |lab| {
        let (a, b, vm_a, _) = lab_with_machine(lab)?;
        // A stopped vm1 on the recovery host, as an earlier failback leaves
        // it: the test machine is vm1-test, so it is no name conflict.
        lab.create_machine(&b, "vm1", &DISKS, false)?;
        lab.start_workload("workload-primary", &vm_a, RATE, &[])?;
        let first = protect(lab, &a, &b)?;
        let point = lab.wait_point("vm1", first.barrier_ns.unwrap_or(0))?;
        let barrier = point.barrier_ns.context("the point has no barrier")?;
        let mt = b.master_target_id.clone().context("no master target")?;
        wait_for(Duration::from_secs(15), "the recovery host's facts", || {
            let c = lab.admin.component(&mt)?;
            Ok(c.master_target
                .is_some_and(|f| f.machines.iter().any(|m| m == "vm1"))
                .then_some(()))
        })?;

        let job = lab.action(
            "vm1",
            &ActionRequest {
                point_id: Some(point.id.clone()),
                ..ActionRequest::new(Action::TestFailover)
            },
        )?;
        lab.wait_job(&job, false)?;
        ensure!(
            phase(lab)? == Phase::TestFailoverActive,
            "{:?}",
            phase(lab)?
        );
        let test_vm = Machine::at(b.host_dir.join("vm1-test"));
        ensure!(test_vm.is_running(), "vm1-test does not run");
        // The copy is the point: crash consistent at its barrier, while the
        // workload keeps writing at the primary site.
        let checked = lab.verify_against(&test_vm, "vm1", Some(barrier))?;
        eprintln!("vm1-test at point {}: {checked}", point.id);
        // Replication goes on during the test.
        let newer = lab.wait_point("vm1", barrier)?;
        ensure!(newer.barrier_ns > point.barrier_ns);
        ensure!(vm_a.is_running(), "the primary machine stopped");

        let job = lab.action("vm1", &ActionRequest::new(Action::CleanupTestFailover))?;
        lab.wait_job(&job, false)?;
        wait_gone(&test_vm.dir)?;
        ensure!(phase(lab)? == Phase::Protected, "{:?}", phase(lab)?);
        // Still protected: points keep coming after the cleanup.
        let after = lab.wait_point("vm1", newer.barrier_ns.unwrap_or(0))?;

        // A second drill (a new vm1-test on the same host) from the latest
        // point, cleaned up again.
        let job = lab.action("vm1", &ActionRequest::new(Action::TestFailover))?;
        lab.wait_job(&job, false)?;
        ensure!(test_vm.is_running(), "the second vm1-test does not run");
        let job = lab.action("vm1", &ActionRequest::new(Action::CleanupTestFailover))?;
        lab.wait_job(&job, false)?;
        wait_gone(&test_vm.dir)?;
        ensure!(phase(lab)? == Phase::Protected, "{:?}", phase(lab)?);
        lab.stop_child("workload-primary");
        let checked = lab.verify(&vm_a, None)?;
        eprintln!(
            "vm1 at primary after cleanup (point {}): {checked}",
            after.id
        );
        Ok(())
    });
}

#[test]
fn planned_failover_in_two_phases_loses_no_write() {
    in_lab("planned-failover", |lab| {
        let (a, b, vm_a, _) = lab_with_machine(lab)?;
        lab.start_workload("workload-primary", &vm_a, RATE, &[])?;
        let first = protect(lab, &a, &b)?;
        lab.wait_point("vm1", first.barrier_ns.unwrap_or(0))?;

        let job = lab.action(
            "vm1",
            &ActionRequest {
                kind: Some(FailoverKind::Planned),
                sync: Some(SyncMode::Delta),
                ..ActionRequest::new(Action::Failover)
            },
        )?;
        let job = lab.wait_job(&job, true)?;
        ensure!(job.state == JobState::Waiting, "job {}", job.state);
        ensure!(
            phase(lab)? == Phase::FailoverSynced,
            "phase {:?}",
            phase(lab)?
        );
        // Phase 1 leaves the source running (and writing).
        ensure!(vm_a.is_running(), "the source stopped during phase 1");
        std::thread::sleep(Duration::from_secs(1));

        let job = lab.action("vm1", &ActionRequest::new(Action::Complete))?;
        let job = lab.wait_job(&job, false)?;
        ensure!(job.state == JobState::Succeeded, "job {}", job.state);
        // stop_source disconnected the workload: it ends by itself.
        lab.stop_child("workload-primary");
        ensure!(phase(lab)? == Phase::CommitPending, "{:?}", phase(lab)?);
        let vm_b = Machine::at(b.host_dir.join("vm1"));
        ensure!(vm_b.is_running(), "vm1 does not run at the recovery site");
        ensure!(!vm_a.is_running(), "vm1 still runs at the primary site");
        let checked = lab.verify(&vm_b, None)?;
        eprintln!(
            "vm1 at recovery (final delta {:?} bytes): {checked}",
            step_bytes(&job, "final_delta_sync")
        );
        Ok(())
    });
}

#[test]
fn unplanned_failover_to_an_older_point_then_change_recovery_point() {
    in_lab("change-point", |lab| {
        let (a, b, vm_a, _) = lab_with_machine(lab)?;
        lab.start_workload("workload-primary", &vm_a, RATE, &[])?;
        let first = protect(lab, &a, &b)?;
        // A few points with writes between them.
        let mut last = first.barrier_ns.unwrap_or(0);
        for _ in 0..3 {
            last = lab
                .wait_point("vm1", last)?
                .barrier_ns
                .context("no barrier")?;
        }
        kill_primary(lab, &vm_a);
        lab.stop_child("workload-primary");
        // Let the points already on their way settle.
        std::thread::sleep(Duration::from_secs(2));
        let mut points = lab.admin.points("vm1")?;
        points.retain(|p| p.barrier_ns.is_some());
        points.sort_by_key(|p| p.barrier_ns);
        ensure!(points.len() >= 3, "only {} points", points.len());
        let older = points[points.len() / 2].clone();
        let latest = points[points.len() - 1].clone();
        ensure!(older.barrier_ns < latest.barrier_ns);

        lab.fail_over_unplanned("vm1", &older.id)?;
        let vm_b = Machine::at(b.host_dir.join("vm1"));
        let checked = lab.verify(&vm_b, older.barrier_ns)?;
        eprintln!("vm1 at older point {}: {checked}", older.id);

        let job = lab.action(
            "vm1",
            &ActionRequest {
                point_id: Some(latest.id.clone()),
                ..ActionRequest::new(Action::ChangeRecoveryPoint)
            },
        )?;
        lab.wait_job(&job, false)?;
        ensure!(phase(lab)? == Phase::CommitPending, "{:?}", phase(lab)?);
        wait_for(Duration::from_secs(30), "vm1 to run again", || {
            Ok(vm_b.is_running().then_some(()))
        })?;
        let checked = lab.verify(&vm_b, latest.barrier_ns)?;
        eprintln!("vm1 at latest point {}: {checked}", latest.id);

        let job = lab.action("vm1", &ActionRequest::new(Action::Commit))?;
        lab.wait_job(&job, false)?;
        ensure!(phase(lab)? == Phase::Committed, "{:?}", phase(lab)?);
        let checked = lab.verify(&vm_b, latest.barrier_ns)?;
        eprintln!("vm1 committed at {}: {checked}", latest.id);
        Ok(())
    });
}

/// Protect, fail over (unplanned, primary site killed) to a point taken
/// after the workload stopped, commit. Returns the recovery machine and the
/// point's barrier.
fn failed_over_and_committed(
    lab: &mut Lab,
    a: &NodeInfo,
    b: &NodeInfo,
    vm_a: &Machine,
) -> anyhow::Result<(Machine, u64)> {
    lab.start_workload("workload-primary", vm_a, RATE, &[])?;
    let first = protect(lab, a, b)?;
    lab.wait_point("vm1", first.barrier_ns.unwrap_or(0))?;
    lab.stop_child("workload-primary");
    let stopped = rebound_testkit::log::now_ns();
    let point = lab.wait_point("vm1", stopped)?;
    kill_primary(lab, vm_a);
    lab.fail_over_unplanned("vm1", &point.id)?;
    let vm_b = Machine::at(b.host_dir.join("vm1"));
    let barrier = point.barrier_ns.context("no barrier")?;
    let checked = lab.verify(&vm_b, Some(barrier))?;
    eprintln!("vm1 failed over to {}: {checked}", point.id);
    let job = lab.action("vm1", &ActionRequest::new(Action::Commit))?;
    lab.wait_job(&job, false)?;
    Ok((vm_b, barrier))
}

#[test]
fn failback_by_full_download_loses_no_write() {
    in_lab("full-failback", |lab| {
        let (a, b, vm_a, _) = lab_with_machine(lab)?;
        let (vm_b, barrier) = failed_over_and_committed(lab, &a, &b, &vm_a)?;
        lab.start_workload(
            "workload-recovery",
            &vm_b,
            RATE,
            &["--after-point".into(), barrier.to_string()],
        )?;
        let a = lab.start_node("primary")?;
        let job = lab.action("vm1", &lab.reprotect_request(Action::Reprotect, &b, &a))?;
        lab.wait_job(&job, false)?;
        lab.wait_point("vm1", rebound_testkit::log::now_ns())?;

        let job = lab.action(
            "vm1",
            &ActionRequest {
                kind: Some(FailoverKind::Planned),
                sync: Some(SyncMode::Full),
                ..ActionRequest::new(Action::Failback)
            },
        )?;
        // One go: no waiting for an operator.
        let job = lab.wait_job(&job, false)?;
        ensure!(job.state == JobState::Succeeded, "job {}", job.state);
        let names: Vec<&str> = job.steps.iter().map(|s| s.name.as_str()).collect();
        for s in [
            "stop_source",
            "full_download",
            "verify",
            "start_destination",
        ] {
            ensure!(names.contains(&s), "no step {s} in {names:?}");
        }
        lab.stop_child("workload-recovery");
        ensure!(vm_a.is_running(), "vm1 does not run at the primary site");
        ensure!(!vm_b.is_running(), "vm1 still runs at the recovery site");
        let checked = lab.verify(&vm_a, None)?;
        eprintln!(
            "vm1 back at primary ({:?} bytes downloaded): {checked}",
            step_bytes(&job, "full_download")
        );
        Ok(())
    });
}

#[test]
fn reprotect_counts_exactly_the_bytes_that_differ_before_moving_data() {
    in_lab("exact-bytes", |lab| {
        let (a, b, vm_a, man) = lab_with_machine(lab)?;
        let (vm_b, barrier) = failed_over_and_committed(lab, &a, &b, &vm_a)?;
        // A known change at the recovery site: 24 single-block writes, one
        // at a time, logged like any workload's.
        let writes = 24u64;
        let mut cmd = Command::new(&lab.exe);
        cmd.arg("workload");
        for d in &man.disks {
            cmd.arg("--disk").arg(vm_b.nbd_uri(&d.name));
        }
        let out = cmd
            .arg("--write-log")
            .arg(lab.write_log("vm1"))
            .args(["--writes", &writes.to_string()])
            .args(["--max-blocks", "1", "--inflight", "1"])
            .args(["--after-point", &barrier.to_string()])
            .output()
            .context("running rebound workload")?;
        ensure!(
            out.status.success(),
            "workload: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // What really differs: the primary machine is stopped (its site was
        // killed); the recovery machine no longer writes.
        let paths = |m: &Machine| -> Vec<std::path::PathBuf> {
            man.disks.iter().map(|d| m.disk_path(&d.name)).collect()
        };
        let expected = differing_bytes(&paths(&vm_a), &paths(&vm_b))?;
        ensure!(
            expected > 0 && expected <= writes * 4096,
            "{expected} bytes differ after {writes} single-block writes"
        );

        let a = lab.start_node("primary")?;
        ensure!(!vm_a.is_running(), "the primary machine was restarted");
        let job = lab.action("vm1", &lab.reprotect_request(Action::Reprotect, &b, &a))?;
        let job = lab.wait_job(&job, false)?;
        let counted = step_bytes(&job, "count_differences")
            .ok_or_else(|| anyhow!("no count_differences step"))?;
        let sent = step_bytes(&job, "delta_sync");
        eprintln!(
            "differ: {expected} bytes; counted: {counted} ({}); delta sync: {sent:?}",
            step_message(&job, "count_differences")
        );
        ensure!(
            counted == expected,
            "count_differences reported {counted} bytes, {expected} differ"
        );
        ensure!(
            sent == Some(expected),
            "delta_sync reported {sent:?} bytes, {expected} differ"
        );
        let checked = lab.verify(&vm_b, None)?;
        eprintln!("vm1 at recovery: {checked}");
        Ok(())
    });
}

#[test]
fn reprotect_and_failback_to_an_alternate_location_create_a_new_machine() {
    in_lab("alternate-location", |lab| {
        let (a, b, vm_a, _) = lab_with_machine(lab)?;
        let (vm_b, barrier) = failed_over_and_committed(lab, &a, &b, &vm_a)?;
        lab.start_workload(
            "workload-recovery",
            &vm_b,
            RATE,
            &["--after-point".into(), barrier.to_string()],
        )?;
        let a = lab.start_node("primary")?;
        let alternate = |action| ActionRequest {
            location: Some(Location::Alternate),
            ..lab.reprotect_request(action, &b, &a)
        };
        // The original machine still exists on the primary host: a new one
        // of the same name cannot be created there (78052), up front.
        let refused = match try_action(lab, &alternate(Action::Reprotect)) {
            Err(r) => r,
            Ok(job) => bail!("reprotect to an alternate location started job {}", job.id),
        };
        ensure!(
            refused.0.failures.iter().any(|f| f.code == 78052),
            "not refused with 78052: {refused}"
        );
        ensure!(phase(lab)? == Phase::Committed, "{:?}", phase(lab)?);

        // The original machine is deleted: reprotect to an alternate
        // location (the disks come from the datastore), then fail back
        // there in two phases.
        ensure!(!vm_a.is_running(), "the primary machine runs");
        std::fs::remove_dir_all(&vm_a.dir)?;
        // The node reports its host's machines with its heartbeat.
        let job = wait_for(
            Duration::from_secs(15),
            "the deletion to be seen",
            || match try_action(lab, &alternate(Action::Reprotect)) {
                Ok(job) => Ok(Some(job)),
                Err(r) if r.0.failures.iter().all(|f| f.code == 78052) => Ok(None),
                Err(r) => Err(r.into()),
            },
        )?;
        lab.wait_job(&job, false)?;
        lab.wait_point("vm1", rebound_testkit::log::now_ns())?;
        let job = lab.action(
            "vm1",
            &ActionRequest {
                kind: Some(FailoverKind::Planned),
                sync: Some(SyncMode::Delta),
                location: Some(Location::Alternate),
                ..ActionRequest::new(Action::Failback)
            },
        )?;
        lab.wait_job(&job, true)?;
        let job = lab.action("vm1", &ActionRequest::new(Action::Complete))?;
        lab.wait_job(&job, false)?;
        lab.stop_child("workload-recovery");
        let vm_new = Machine::at(a.host_dir.join("vm1"));
        ensure!(vm_new.is_running(), "no new vm1 runs at the primary site");
        ensure!(!vm_b.is_running(), "vm1 still runs at the recovery site");
        let checked = lab.verify(&vm_new, None)?;
        eprintln!("new vm1 at primary: {checked}");

        let job = lab.action("vm1", &ActionRequest::new(Action::Commit))?;
        lab.wait_job(&job, false)?;
        ensure!(phase(lab)? == Phase::Committed, "{:?}", phase(lab)?);
        let checked = lab.verify(&vm_new, None)?;
        eprintln!("committed: {checked}");
        // Commit at an alternate location removes the machine left at the
        // recovery site (its node does, once its agent has exited).
        wait_for(
            Duration::from_secs(30),
            "the recovery-site vm1 to be removed",
            || Ok((!vm_b.dir.exists()).then_some(())),
        )?;
        Ok(())
    });
}
