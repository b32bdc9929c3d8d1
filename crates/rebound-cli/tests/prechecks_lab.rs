//! Prechecks of DESIGN.md §6 against real conditions: each test starts a
//! two-site lab of real processes (configuration server, one node per site,
//! machines' agents), creates the condition for real (a machine on the
//! recovery host, a killed agent, a suspended machine, a removed datastore,
//! a statfs type injected into the node, ...), asks for protection and
//! checks that the server refuses it with the stable code in `failures`
//! (4021 prechecks-failed), with the item unchanged and no job running.
//!
//! A failing test keeps its lab directory (logs of every process) and names
//! it in the panic message.

use anyhow::{Context, anyhow, bail, ensure};
use rebound_api::{ActionRequest, Failure, Group, Item, Job, NewGroup, OsType};
use rebound_node::client::CallError;
use rebound_node::machine::Machine;
use rebound_node::node::NodeInfo;
use rebound_testkit::lab::{Lab, LabConfig, in_temp_dir, wait_for};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Run `f` in a fresh lab directory; on failure keep the directory and say
/// where it is.
fn in_lab(name: &str, f: impl FnOnce(&Path) -> anyhow::Result<()>) {
    in_temp_dir(&format!("prechecks-{name}"), f);
}

/// Start the lab with extra arguments for the recovery node, and both nodes.
fn start(dir: &Path, recovery_args: &[String]) -> anyhow::Result<(Lab, NodeInfo, NodeInfo)> {
    let mut lab = Lab::start(LabConfig {
        dir: dir.to_path_buf(),
        exe: env!("CARGO_BIN_EXE_rebound").into(),
        rpo_secs: 1,
        node_args: vec![("recovery".into(), recovery_args.to_vec())],
        env: vec![],
    })?;
    let a = lab.start_node("primary")?;
    let b = lab.start_node("recovery")?;
    Ok((lab, a, b))
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn path_arg(p: &Path, suffix: &str) -> String {
    format!("{}{suffix}", p.display())
}

/// A running machine with one 4 MiB disk at the primary site, registered
/// as an item whose agent has attached.
fn running_item(lab: &Lab, a: &NodeInfo, name: &str) -> anyhow::Result<(Machine, Item)> {
    let (m, man) = lab.create_machine(a, name, &[("disk0", 4 * MIB)], true)?;
    let item = lab.add_item(&man, true)?;
    Ok((m, item))
}

/// Submit an action that the prechecks must refuse; returns the failures.
fn refused(lab: &Lab, item: &str, req: &ActionRequest) -> anyhow::Result<Vec<Failure>> {
    match lab
        .admin
        .post::<_, Job>(&format!("/items/{item}/actions"), req)
    {
        Ok(job) => bail!(
            "{} {item} was accepted (job {}), the prechecks should have refused it",
            req.action,
            job.id
        ),
        Err(CallError::Api { status, error }) => {
            ensure!(
                error.code == 4021,
                "{} {item}: HTTP {status} E{} {} (expected E4021 prechecks-failed)",
                req.action,
                error.code,
                error.message
            );
            ensure!(
                !error.failures.is_empty(),
                "E4021 without failures: {}",
                error.message
            );
            for f in &error.failures {
                ensure!(
                    !f.message.is_empty() && !f.remedy.is_empty(),
                    "failure without message or remedy: {f:?}"
                );
            }
            Ok(error.failures)
        }
        Err(e) => bail!("{} {item}: {e}", req.action),
    }
}

fn codes(failures: &[Failure]) -> Vec<u32> {
    let mut c: Vec<u32> = failures.iter().map(|f| f.code).collect();
    c.sort_unstable();
    c.dedup();
    c
}

/// The refusal carries exactly these codes.
fn expect_codes(failures: &[Failure], want: &[u32]) -> anyhow::Result<()> {
    let mut want = want.to_vec();
    want.sort_unstable();
    ensure!(
        codes(failures) == want,
        "expected failure codes {want:?}, got {failures:#?}"
    );
    Ok(())
}

/// Nothing changed: the item is as it was and none of its jobs runs.
fn unchanged(lab: &Lab, before: &Item) -> anyhow::Result<()> {
    let now = lab.item(&before.name)?;
    ensure!(
        now.state == before.state,
        "item {} went from {} to {}",
        before.name,
        before.state,
        now.state
    );
    ensure!(
        now.job_id.is_none(),
        "item {} has job {:?}",
        before.name,
        now.job_id
    );
    ensure!(
        now.master_target_id == before.master_target_id
            && now.process_server_id == before.process_server_id
            && now.datastore == before.datastore
            && now.retention_volume == before.retention_volume
            && now.group_id == before.group_id,
        "item {} changed: {before:#?} → {now:#?}",
        before.name
    );
    let jobs: Vec<Job> = lab.admin.get("/jobs")?;
    if let Some(j) = jobs
        .iter()
        .find(|j| j.item_id.as_deref() == Some(before.id.as_str()) && !j.state.is_finished())
    {
        bail!(
            "job {} ({}) of {} is {}",
            j.id,
            j.action,
            before.name,
            j.state
        );
    }
    Ok(())
}

/// Refused with exactly `want`, and nothing changed.
fn expect_refused(
    lab: &Lab,
    item: &Item,
    req: &ActionRequest,
    want: &[u32],
) -> anyhow::Result<Vec<Failure>> {
    let f = refused(lab, &item.name, req)?;
    expect_codes(&f, want)?;
    unchanged(lab, item)?;
    Ok(f)
}

/// Wait until the master target has heartbeated at least twice more (its
/// facts then describe the current state of its host).
fn wait_heartbeats(lab: &Lab, node: &NodeInfo) -> anyhow::Result<()> {
    let id = node
        .master_target_id
        .clone()
        .context("the node has no master target")?;
    let mut seen = Vec::new();
    wait_for(
        Duration::from_secs(15),
        "two master target heartbeats",
        || {
            let c = lab.admin.component(&id)?;
            if let Some(t) = c.last_heartbeat
                && !seen.contains(&t)
            {
                seen.push(t);
            }
            Ok((seen.len() >= 3).then_some(()))
        },
    )
}

/// Protect `item` and require the job to succeed.
fn protect_ok(lab: &Lab, item: &str, req: &ActionRequest) -> anyhow::Result<()> {
    let job = lab.action(item, req)?;
    lab.wait_job(&job, false)?;
    let i = lab.item(item)?;
    ensure!(
        i.state.phase == rebound_api::Phase::Protected,
        "{item} is {} after enable protection",
        i.state
    );
    Ok(())
}

fn rebound(argv: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_rebound"))
        .args(argv)
        .output()
        .context("running rebound")?;
    ensure!(
        out.status.success(),
        "rebound {argv:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn site_path(dir: &Path, site: &str, rest: &str) -> PathBuf {
    dir.join(site).join(rest)
}

// ------------------------------------------------------------------ tests

/// 78052: a machine named like the item already exists on the recovery
/// node's host. Once it is gone, protection goes through.
#[test]
fn name_conflict_on_the_recovery_host_is_refused_with_78052() {
    in_lab("name-conflict", |dir| {
        let (lab, a, b) = start(dir, &[])?;
        let (_vm, item) = running_item(&lab, &a, "vm1")?;
        let (other, _) = lab.create_machine(&b, "vm1", &[("disk0", 4 * MIB)], false)?;
        wait_heartbeats(&lab, &b)?;
        let req = lab.protect_request(&a, &b);
        let f = expect_refused(&lab, &item, &req, &[78052])?;
        ensure!(f[0].message.contains("vm1"), "{f:?}");

        std::fs::remove_dir_all(&other.dir)?;
        wait_heartbeats(&lab, &b)?;
        protect_ok(&lab, "vm1", &req)
    });
}

/// 4013 (a): the retention volume is a directory inside the datastore.
#[test]
fn retention_volume_inside_the_datastore_is_refused_with_4013() {
    in_lab("rv-in-datastore", |dir| {
        let rv = site_path(dir, "recovery", "datastore/rv");
        let (lab, a, b) = start(dir, &args(&["--retention-volume", &path_arg(&rv, "")]))?;
        ensure!(
            b.retention_volumes == vec![rv.clone()],
            "{:?}",
            b.retention_volumes
        );
        let (_vm, item) = running_item(&lab, &a, "vm1")?;
        let req = lab.protect_request(&a, &b);
        ensure!(req.retention_volume.as_deref() == Some(&*rv.to_string_lossy()));
        let f = expect_refused(&lab, &item, &req, &[4013])?;
        ensure!(f[0].message.contains("datastore"), "{f:?}");
        Ok(())
    });
}

/// 4013 (b): statfs says the retention volume is FAT.
#[test]
fn retention_volume_on_fat_is_refused_with_4013() {
    in_lab("rv-vfat", |dir| {
        let rv = site_path(dir, "recovery", "retention");
        let (lab, a, b) = start(dir, &args(&["--fault-fs-type", &path_arg(&rv, "=vfat")]))?;
        let (_vm, item) = running_item(&lab, &a, "vm1")?;
        let f = expect_refused(&lab, &item, &lab.protect_request(&a, &b), &[4013])?;
        ensure!(f[0].message.contains("vfat"), "{f:?}");
        Ok(())
    });
}

/// 95226: the machine's agent died (SIGKILL, not restarted) and its last
/// heartbeat is older than the server's limit (10 s in the lab).
#[test]
fn stale_agent_heartbeat_is_refused_with_95226() {
    in_lab("stale-heartbeat", |dir| {
        let (lab, a, b) = start(dir, &[])?;
        let (vm, item) = running_item(&lab, &a, "vm1")?;
        let agent_id = item.agent_id.clone().context("no agent")?;
        std::fs::remove_file(vm.dir.join("want-running"))?;
        let pid = vm.agent_pid().context("the agent runs")?;
        let p = rustix::process::Pid::from_raw(pid).context("pid")?;
        rustix::process::kill_process(p, rustix::process::Signal::KILL)?;
        wait_for(Duration::from_secs(10), "the agent to die", || {
            Ok(vm.agent_pid().is_none().then_some(()))
        })?;
        let killed = Instant::now();
        wait_for(
            Duration::from_secs(30),
            "the agent's heartbeat to go stale",
            || {
                let c = lab.admin.component(&agent_id)?;
                Ok((!c.healthy).then_some(()))
            },
        )?;
        ensure!(
            killed.elapsed() >= Duration::from_secs(8),
            "the agent went stale {:?} after the kill: the limit is 10 s",
            killed.elapsed()
        );
        // `healthy` is the prechecks' own freshness test, with the same limit.
        ensure!(!vm.is_running(), "the node restarted the agent");
        expect_refused(&lab, &item, &lab.protect_request(&a, &b), &[95226])?;
        Ok(())
    });
}

/// 78093: the machine is suspended (`rebound machine suspend`): its writes
/// are held and its agent reports it; after `resume` the held write
/// completes and protection goes through.
#[test]
fn suspended_machine_is_refused_with_78093_and_protects_after_resume() {
    in_lab("suspended", |dir| {
        let (lab, a, b) = start(dir, &[])?;
        let (vm, item) = running_item(&lab, &a, "vm1")?;
        let agent_id = item.agent_id.clone().context("no agent")?;
        let host = a.host_dir.display().to_string();
        let agent_suspended = |want: bool| {
            wait_for(
                Duration::from_secs(10),
                &format!("the agent to report suspended={want}"),
                || {
                    let c = lab.admin.component(&agent_id)?;
                    Ok(c.agent
                        .is_some_and(|f| f.suspended == want && f.running)
                        .then_some(()))
                },
            )
        };

        rebound(&["machine", "suspend", "--host", &host, "--name", "vm1"])?;
        ensure!(vm.is_suspended());
        let listed: serde_json::Value = serde_json::from_str(&rebound(&[
            "machine", "list", "--host", &host, "--output", "json",
        ])?)?;
        ensure!(
            listed[0]["suspended"] == serde_json::json!(true),
            "{listed}"
        );
        agent_suspended(true)?;

        // A write to the suspended machine is held.
        let uri: rebound_nbd::NbdUri = vm.nbd_uri("disk0").parse()?;
        let mut nbd = rebound_nbd::NbdClient::connect(&uri)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = std::thread::spawn(move || {
            let r = nbd.write_at(0, &[0xAB; 4096], true);
            let _ = tx.send(r.is_ok());
            nbd
        });
        ensure!(
            rx.recv_timeout(Duration::from_millis(800)).is_err(),
            "a write completed on a suspended machine"
        );

        let req = lab.protect_request(&a, &b);
        let f = expect_refused(&lab, &item, &req, &[78093])?;
        ensure!(f[0].message.contains("suspended"), "{f:?}");

        rebound(&["machine", "resume", "--host", &host, "--name", "vm1"])?;
        ensure!(!vm.is_suspended());
        let ok = rx
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| anyhow!("the held write did not complete after resume"))?;
        ensure!(ok, "the held write failed after resume");
        let nbd = writer
            .join()
            .map_err(|_| anyhow!("the writer thread panicked"))?;
        let _ = nbd.disconnect();
        agent_suspended(false)?;
        protect_ok(&lab, "vm1", &req)
    });
}

/// 8061 (a): the datastore directory was removed after the node started.
#[test]
fn removed_datastore_is_refused_with_8061() {
    in_lab("datastore-removed", |dir| {
        let (lab, a, b) = start(dir, &[])?;
        let (_vm, item) = running_item(&lab, &a, "vm1")?;
        let ds = b
            .datastores
            .iter()
            .find(|(n, _)| n == "data")
            .map(|(_, p)| p.clone())
            .context("no datastore data")?;
        std::fs::remove_dir_all(&ds)?;
        wait_heartbeats(&lab, &b)?;
        let f = expect_refused(&lab, &item, &lab.protect_request(&a, &b), &[8061])?;
        ensure!(f[0].message.contains("data"), "{f:?}");
        Ok(())
    });
}

/// 8061 (b): statfs says the datastore is FAT (an unsupported type).
#[test]
fn datastore_on_an_unsupported_filesystem_is_refused_with_8061() {
    in_lab("datastore-vfat", |dir| {
        let ds = site_path(dir, "recovery", "datastore");
        let (lab, a, b) = start(dir, &args(&["--fault-fs-type", &path_arg(&ds, "=vfat")]))?;
        let (_vm, item) = running_item(&lab, &a, "vm1")?;
        let f = expect_refused(&lab, &item, &lab.protect_request(&a, &b), &[8061])?;
        ensure!(f.iter().any(|f| f.message.contains("vfat")), "{f:?}");
        Ok(())
    });
}

/// 4012: the recovery master target has one disk slot; the machine has two
/// disks.
#[test]
fn too_many_disks_for_the_master_target_is_refused_with_4012() {
    in_lab("disk-slots", |dir| {
        let (lab, a, b) = start(dir, &args(&["--disk-slots", "1"]))?;
        let (_vm, man) =
            lab.create_machine(&a, "vm1", &[("disk0", 4 * MIB), ("disk1", 4 * MIB)], true)?;
        let item = lab.add_item(&man, true)?;
        let f = expect_refused(&lab, &item, &lab.protect_request(&a, &b), &[4012])?;
        ensure!(f[0].message.contains("1 disk slots"), "{f:?}");
        Ok(())
    });
}

/// 4011: a Windows machine cannot replicate to the (Linux) master target.
#[test]
fn windows_machine_to_a_linux_master_target_is_refused_with_4011() {
    in_lab("os-mismatch", |dir| {
        let (lab, a, b) = start(dir, &[])?;
        let (_vm, man) =
            lab.create_machine_os(&a, "win1", OsType::Windows, &[("disk0", 4 * MIB)], true)?;
        let item = lab.add_item(&man, true)?;
        ensure!(item.os == OsType::Windows);
        let f = expect_refused(&lab, &item, &lab.protect_request(&a, &b), &[4011])?;
        ensure!(f[0].message.contains("windows"), "{f:?}");
        Ok(())
    });
}

/// 4016: a replication group of a Linux and a Windows machine is refused
/// when it is created (the group endpoint runs the group checks), and no
/// group exists afterwards.
#[test]
fn group_with_mixed_os_is_refused_with_4016() {
    in_lab("group-mixed-os", |dir| {
        let (lab, a, _b) = start(dir, &[])?;
        let (_l, lin) = lab.create_machine(&a, "lin1", &[("disk0", 4 * MIB)], false)?;
        let (_w, win) =
            lab.create_machine_os(&a, "win1", OsType::Windows, &[("disk0", 4 * MIB)], false)?;
        let lin = lab.add_item(&lin, false)?;
        let win = lab.add_item(&win, false)?;
        let req = NewGroup {
            name: "g1".into(),
            items: vec!["lin1".into(), "win1".into()],
        };
        match lab.admin.post::<_, Group>("/groups", &req) {
            Ok(g) => bail!("the mixed group was created: {g:?}"),
            Err(CallError::Api { error, .. }) => {
                ensure!(error.code == 4021, "{error:?}");
                expect_codes(&error.failures, &[4016])?;
            }
            Err(e) => bail!("{e}"),
        }
        let groups: Vec<Group> = lab.admin.get("/groups")?;
        ensure!(groups.is_empty(), "{groups:?}");
        unchanged(&lab, &lin)?;
        unchanged(&lab, &win)?;
        Ok(())
    });
}

/// Every failed check is reported, not the first: in one request, a
/// suspended machine (78093), a machine of the same name on the recovery
/// host (78052) that also takes the master target's only disk slot (4012),
/// a FAT datastore (8061) and a FAT retention volume (4013).
#[test]
fn all_failures_are_reported_at_once() {
    in_lab("all-at-once", |dir| {
        let ds = site_path(dir, "recovery", "datastore");
        let rv = site_path(dir, "recovery", "retention");
        let (lab, a, b) = start(
            dir,
            &args(&[
                "--disk-slots",
                "1",
                "--fault-fs-type",
                &path_arg(&ds, "=vfat"),
                "--fault-fs-type",
                &path_arg(&rv, "=vfat"),
            ]),
        )?;
        let (vm, item) = running_item(&lab, &a, "vm1")?;
        let agent_id = item.agent_id.clone().context("no agent")?;
        lab.create_machine(&b, "vm1", &[("disk0", 4 * MIB)], false)?;
        vm.set_suspended(true)?;
        wait_for(
            Duration::from_secs(10),
            "the agent to report suspended",
            || {
                let c = lab.admin.component(&agent_id)?;
                Ok(c.agent.is_some_and(|f| f.suspended).then_some(()))
            },
        )?;
        wait_heartbeats(&lab, &b)?;
        let f = expect_refused(
            &lab,
            &item,
            &lab.protect_request(&a, &b),
            &[78093, 78052, 4012, 8061, 4013],
        )?;
        // One failure per broken condition (the FAT datastore is reported once).
        ensure!(f.len() == 5, "{f:#?}");
        vm.set_suspended(false)?;
        Ok(())
    });
}
