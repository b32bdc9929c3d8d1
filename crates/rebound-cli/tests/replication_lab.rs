//! Replication with real processes: app-consistent points from a machine's
//! freeze/thaw hooks, and outages of the process server and of the master
//! target that stop nothing at the agent and lose no recovery point data.

use rebound_api::PointKind;
use rebound_node::machine::Machine;
use rebound_testkit::lab::{Lab, LabConfig, in_temp_dir, wait_for};
use std::time::Duration;

fn lab(dir: &std::path::Path, env: Vec<(String, String)>) -> Lab {
    Lab::start(LabConfig {
        dir: dir.to_path_buf(),
        exe: env!("CARGO_BIN_EXE_rebound").into(),
        rpo_secs: 1,
        node_args: Vec::new(),
        env,
    })
    .expect("lab")
}

/// Fail over (unplanned) to the latest point and check the disks at the
/// recovery site for crash consistency at that point.
fn failover_and_verify(lab: &mut Lab, recovery_host: &std::path::Path) -> String {
    let p = lab.wait_point("vm1", 0).expect("a point");
    lab.fail_over_unplanned("vm1", &p.id).expect("failover job");
    let vm = Machine::at(recovery_host.join("vm1"));
    lab.verify(&vm, p.barrier_ns).expect("verify at the point")
}

#[test]
fn freeze_and_thaw_hooks_make_app_consistent_points() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut lab = lab(dir.path(), Vec::new());
    let a = lab.start_node("primary").expect("primary");
    let b = lab.start_node("recovery").expect("recovery");
    let (vm, man) = lab
        .create_machine(&a, "vm1", &[("disk0", 8 << 20)], false)
        .expect("machine");
    let trace = dir.path().join("hooks.trace");
    let hook = |word: &str| {
        vec![
            "sh".to_string(),
            "-c".to_string(),
            format!("echo {word} >> {}", trace.display()),
        ]
    };
    let hooks =
        serde_json::json!({"freeze": hook("freeze"), "thaw": hook("thaw"), "every_secs": 2});
    std::fs::write(vm.dir.join("hooks.json"), hooks.to_string()).expect("hooks");
    std::fs::write(vm.dir.join("want-running"), "1\n").expect("run");
    wait_for(Duration::from_secs(30), "vm1 to run", || {
        Ok(vm.is_running().then_some(()))
    })
    .expect("running");
    lab.start_workload("workload", &vm, 20, &[])
        .expect("workload");
    lab.add_item(&man, true).expect("item");
    let job = lab
        .action("vm1", &lab.protect_request(&a, &b))
        .expect("protect");
    lab.wait_job(&job, false).expect("protect job");
    let app = wait_for(Duration::from_secs(60), "an app-consistent point", || {
        Ok(lab
            .admin
            .points("vm1")?
            .into_iter()
            .find(|p| p.kind == PointKind::AppConsistent))
    })
    .expect("app-consistent point");
    let text = std::fs::read_to_string(&trace).expect("trace");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.windows(2).any(|w| w == ["freeze", "thaw"]),
        "hooks ran: {lines:?}"
    );
    // Crash-consistent points keep coming between app-consistent ones.
    wait_for(Duration::from_secs(30), "a crash-consistent point", || {
        Ok(lab
            .admin
            .points("vm1")?
            .into_iter()
            .find(|p| p.kind == PointKind::CrashConsistent))
    })
    .expect("crash-consistent point");
    let _ = app;
    // The primary machine dies; fail over to "the latest app-consistent
    // point", chosen by the master target from its journal.
    std::fs::remove_file(vm.dir.join("want-running")).expect("want-running");
    if let Some(pid) = vm.agent_pid().and_then(rustix::process::Pid::from_raw) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
    lab.stop_child("workload");
    std::thread::sleep(Duration::from_secs(3));
    let latest_app = lab
        .admin
        .points("vm1")
        .expect("points")
        .into_iter()
        .filter(|p| p.kind == PointKind::AppConsistent)
        .max_by_key(|p| p.barrier_ns)
        .expect("an app-consistent point");
    lab.fail_over_unplanned("vm1", "latest-app-consistent")
        .expect("failover to the latest app-consistent point");
    let at_b = Machine::at(b.host_dir.join("vm1"));
    lab.verify(&at_b, latest_app.barrier_ns).expect("verify");
}

#[test]
fn master_target_and_process_server_outages_lose_nothing() {
    in_temp_dir("outages", outages);
}

fn outages(dir: &std::path::Path) -> anyhow::Result<()> {
    // A tiny outbox bound: while the process server is down the capture
    // queue overflows into the dirty bitmap, and a resync follows.
    let mut lab = lab(dir, vec![("REBOUND_OUTBOX_LIMIT_MIB".into(), "0".into())]);
    let (a, _b, vm, _) = protected_vm1(&mut lab)?;
    let first = lab.wait_point("vm1", 0).expect("first point");

    // Master target down: changesets wait in the process server's cache.
    lab.kill_child("node-recovery");
    std::thread::sleep(Duration::from_secs(4));
    let cache = a.host_dir.parent().expect("data dir").join("data/cache");
    let cached = std::fs::read_dir(&cache)
        .map(|rd| rd.flatten().count())
        .unwrap_or(0);
    assert!(cached > 0, "nothing cached at the process server");
    let b = lab.start_node("recovery").expect("recovery again");
    let after_mt = lab
        .wait_point("vm1", first.barrier_ns.unwrap_or(0))
        .expect("points resume after the master target outage");

    // Process server (the primary node) down: the agent keeps serving its
    // machine; points resume once it is back.
    lab.kill_child("node-primary");
    std::thread::sleep(Duration::from_secs(4));
    assert!(vm.is_running(), "the machine must keep running");
    lab.start_node("primary").expect("primary again");
    let after_ps = lab
        .wait_point("vm1", after_mt.barrier_ns.unwrap_or(0) + 3_000_000_000)
        .expect("points resume after the process server outage");
    assert!(after_ps.barrier_ns > after_mt.barrier_ns);

    lab.stop_child("workload");
    let checked = failover_and_verify(&mut lab, &b.host_dir);
    assert!(checked.contains("OK"), "{checked}");
    Ok(())
}

/// Both sites' nodes, and vm1 (two disks, a workload) protected from the
/// primary site to the recovery site.
fn protected_vm1(
    lab: &mut Lab,
) -> anyhow::Result<(
    rebound_node::node::NodeInfo,
    rebound_node::node::NodeInfo,
    Machine,
    rebound_api::Item,
)> {
    let a = lab.start_node("primary")?;
    let b = lab.start_node("recovery")?;
    let (vm, man) =
        lab.create_machine(&a, "vm1", &[("disk0", 8 << 20), ("disk1", 4 << 20)], true)?;
    lab.start_workload("workload", &vm, 30, &[])?;
    let item = lab.add_item(&man, true)?;
    let job = lab.action("vm1", &lab.protect_request(&a, &b))?;
    lab.wait_job(&job, false)?;
    Ok((a, b, vm, item))
}

/// The changesets cached at the process server for the item, oldest first.
fn cached(cache: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(cache)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "cs"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A changeset lost at the process server, then one rotted there: the
/// master target stops at the last good point and reports the gap, the agent
/// resynchronises what was not applied by itself, points resume, and a
/// failover to the newest point is crash-consistent.
#[test]
fn a_lost_or_corrupt_changeset_is_a_reported_gap_then_a_resync() {
    in_temp_dir("stream-gap", stream_gap);
}

fn stream_gap(dir: &std::path::Path) -> anyhow::Result<()> {
    let mut lab = lab(dir, Vec::new());
    let (a, b, _vm, item) = protected_vm1(&mut lab)?;
    let mut last = lab.wait_point("vm1", 0).expect("first point");
    let cache = a
        .host_dir
        .parent()
        .expect("data dir")
        .join("data/cache")
        .join(&item.id);
    for damage in ["lost", "corrupt"] {
        // The master target is away: changesets pile up at the process server.
        lab.kill_child("node-recovery");
        wait_for(Duration::from_secs(60), "changesets cached", || {
            Ok((cached(&cache).len() >= 4).then_some(()))
        })
        .expect("cached");
        let files = cached(&cache);
        match damage {
            "lost" => std::fs::remove_file(&files[1]).expect("remove"),
            _ => {
                let mut bytes = std::fs::read(&files[1]).expect("read");
                let at = bytes.len() / 2;
                bytes[at] ^= 0x40;
                std::fs::write(&files[1], &bytes).expect("write");
            }
        }
        let damaged_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        lab.start_node("recovery").expect("recovery again");
        // The gap is reported (not applied over), then the stream restarts.
        let progress = wait_for(Duration::from_secs(60), "the gap reported", || {
            Ok(lab
                .admin
                .item("vm1")?
                .replica_progress
                .filter(|p| p.gap.is_some()))
        })
        .expect("gap");
        let gap = progress.gap.expect("gap");
        // A rotted file is set aside by the process server (it fails its
        // checksum) or by the master target: either way a gap, never applied.
        assert!(
            gap.reason.contains("missing")
                || (damage == "corrupt" && gap.reason.contains("corrupt")),
            "{gap:?}"
        );
        last = lab
            .wait_point("vm1", damaged_at)
            .expect("points resume after the resync");
        // The progress report follows the batch of applies its points are in.
        wait_for(
            Duration::from_secs(30),
            "the gap closed by the restart",
            || {
                Ok(lab
                    .admin
                    .item("vm1")?
                    .replica_progress
                    .filter(|p| p.gap.is_none()))
            },
        )?;
    }
    let _ = last;
    lab.stop_child("workload");
    let checked = failover_and_verify(&mut lab, &b.host_dir);
    assert!(checked.contains("OK"), "{checked}");
    Ok(())
}

/// The agent is killed with SIGKILL twice while it streams (the second time
/// just after its restart, while its resync may still be running): its node
/// restarts it, the stream restarts from the dirty bitmap, points resume,
/// and a failover to the newest point is crash-consistent.
#[test]
fn an_agent_killed_while_streaming_resumes_from_its_bitmap() {
    in_temp_dir("stream-agent-kill", |dir| {
        let mut lab = lab(dir, Vec::new());
        let a = lab.start_node("primary")?;
        let b = lab.start_node("recovery")?;
        let (vm, man) =
            lab.create_machine(&a, "vm1", &[("disk0", 8 << 20), ("disk1", 4 << 20)], true)?;
        lab.start_workload("workload", &vm, 30, &[])?;
        lab.add_item(&man, true)?;
        let job = lab.action("vm1", &lab.protect_request(&a, &b))?;
        lab.wait_job(&job, false)?;
        let mut last = lab.wait_point("vm1", 0)?;
        for pause in [Duration::from_secs(3), Duration::from_millis(300)] {
            let before = vm.agent_pid();
            let pid = before
                .and_then(rustix::process::Pid::from_raw)
                .ok_or_else(|| anyhow::anyhow!("no agent pid"))?;
            rustix::process::kill_process(pid, rustix::process::Signal::KILL)?;
            wait_for(Duration::from_secs(30), "the agent restarted", || {
                Ok((vm.is_running() && vm.agent_pid() != before).then_some(()))
            })?;
            std::thread::sleep(pause);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos() as u64;
            last = lab.wait_point("vm1", now.max(last.barrier_ns.unwrap_or(0)))?;
        }
        lab.stop_child("workload");
        let checked = failover_and_verify(&mut lab, &b.host_dir);
        anyhow::ensure!(checked.contains("OK"), "{checked}");
        Ok(())
    });
}

/// Replication groups: two machines whose writes depend on each other (the
/// writer writes block i of B only after A acknowledged its write of block
/// i) close group points at the same markers, and at every common marker
/// the two replicas are causally consistent: B never holds a write whose
/// cause is missing from A.
#[test]
fn group_points_are_consistent_across_members() {
    in_temp_dir("group-points", |dir| {
        use rebound_nbd::{NbdClient, NbdUri};
        const K: u64 = 256;
        let mut lab = lab(dir, Vec::new());
        let a = lab.start_node("primary")?;
        let b = lab.start_node("recovery")?;
        let mut vms = Vec::new();
        for name in ["vma", "vmb"] {
            let (vm, man) = lab.create_machine(&a, name, &[("disk0", 4 << 20)], true)?;
            lab.add_item(&man, true)?;
            vms.push(vm);
        }
        let _: rebound_api::Group = lab.admin.post(
            "/groups",
            &rebound_api::NewGroup {
                name: "g1".into(),
                items: vec!["vma".into(), "vmb".into()],
            },
        )?;
        for name in ["vma", "vmb"] {
            let job = lab.action(name, &lab.protect_request(&a, &b))?;
            lab.wait_job(&job, false)?;
        }
        // The causal writer: A's write n, acknowledged, then B's write n.
        let mut ca = NbdClient::connect(&vms[0].nbd_uri("disk0").parse::<NbdUri>()?)?;
        let mut cb = NbdClient::connect(&vms[1].nbd_uri("disk0").parse::<NbdUri>()?)?;
        let block = |n: u64| {
            let mut v = vec![0u8; 4096];
            v[..8].copy_from_slice(&n.to_le_bytes());
            v
        };
        let until = std::time::Instant::now() + Duration::from_secs(8);
        let mut n = 0u64;
        while std::time::Instant::now() < until {
            n += 1;
            let off = (n % K) * 4096;
            ca.write_at(off, &block(n), false)?;
            cb.write_at(off, &block(n), false)?;
        }
        // Markers both members reached.
        let markers = |item: &str| -> anyhow::Result<std::collections::BTreeMap<String, String>> {
            Ok(lab
                .admin
                .points(item)?
                .into_iter()
                .filter_map(|p| p.group_marker.map(|m| (m, p.id)))
                .collect())
        };
        let common = wait_for(Duration::from_secs(60), "common group points", || {
            let (ma, mb) = (markers("vma")?, markers("vmb")?);
            let c: Vec<String> = ma.keys().filter(|m| mb.contains_key(*m)).cloned().collect();
            Ok((c.len() >= 3).then_some(c))
        })?;
        eprintln!(
            "{n} causal pairs written; {} common group points",
            common.len()
        );
        // A drill of one member at "the latest group point": the server
        // turns it into the latest marker every member has.
        let job = lab.action(
            "vma",
            &rebound_api::ActionRequest {
                point_id: Some("latest-group".into()),
                ..rebound_api::ActionRequest::new(rebound_api::Action::TestFailover)
            },
        )?;
        let chosen = job.request.point_id.clone().unwrap_or_default();
        let marker = chosen
            .strip_prefix("group:")
            .ok_or_else(|| anyhow::anyhow!("latest-group became {chosen:?}"))?
            .to_string();
        anyhow::ensure!(
            markers("vma")?.contains_key(&marker) && markers("vmb")?.contains_key(&marker),
            "{marker} is not common to both members"
        );
        lab.wait_job(&job, false)?;
        // Read both replicas at each common marker from the journals (the
        // master target's node is stopped so the journals can be opened).
        lab.kill_child("node-recovery");
        let volume = b
            .retention_volumes
            .first()
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no retention volume"))?;
        let items: Vec<String> = ["vma", "vmb"]
            .iter()
            .map(|n| lab.admin.item(n).map(|i| i.id))
            .collect::<Result<_, _>>()?;
        let mut checked = 0;
        for m in &common {
            let mut disks = Vec::new();
            for (k, id) in items.iter().enumerate() {
                let j = rebound_journal::Journal::open(&volume, id, Default::default())?;
                let p = j
                    .group_point(m)
                    .ok_or_else(|| anyhow::anyhow!("{id}: no point with marker {m}"))?
                    .id;
                let out = dir.join(format!("g-{m}-{k}.raw"));
                j.materialise(p, &rebound_journal::Target::NewFiles(vec![out.clone()]))?;
                disks.push(std::fs::read(&out)?);
            }
            for i in 0..K as usize {
                let v = |d: &Vec<u8>| {
                    u64::from_le_bytes(d[i * 4096..i * 4096 + 8].try_into().unwrap_or_default())
                };
                let (va, vb) = (v(&disks[0]), v(&disks[1]));
                anyhow::ensure!(
                    vb <= va,
                    "marker {m}: block {i} of B holds write {vb} but A only {va}: B's write is there without its cause"
                );
            }
            checked += 1;
        }
        anyhow::ensure!(checked >= 3, "checked {checked} markers");
        Ok(())
    });
}
