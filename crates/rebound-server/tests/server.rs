#![allow(clippy::unwrap_used)]
//! The configuration server over real HTTP on loopback and a real SQLite file.

mod common;

use common::*;
use rebound_api::*;
use std::time::Duration;

async fn fresh() -> (tempfile::TempDir, Server, World) {
    let dir = tempfile::tempdir().unwrap();
    let (admin, key) = init(dir.path()).await;
    let server = Server::start(dir.path(), fast_config()).await;
    let w = world(&server.base, &admin, &key).await;
    (dir, server, w)
}

#[tokio::test]
async fn auth_refuses_missing_wrong_and_out_of_scope_tokens() {
    let (_dir, server, w) = fresh().await;
    let anon = Client::new(&server.base, None);
    let health: Health = anon.get("/health").await.ok();
    assert_eq!(health.status, "ok");
    anon.get("/items").await.err(401, 4001);
    anon.with_token("rbt_not_a_token")
        .get("/items")
        .await
        .err(401, 4001);

    // A viewer reads but cannot act.
    let viewer: TokenInfo = w
        .admin
        .post(
            "/tokens",
            &NewToken {
                name: "ro".into(),
                scope: Scope::Viewer,
            },
        )
        .await
        .ok();
    let viewer = anon.with_token(viewer.token.as_ref().unwrap());
    let items: Vec<Item> = viewer.get("/items").await.ok();
    assert_eq!(items.len(), 1);
    viewer
        .post(
            &format!("/items/{}/actions", w.item.id),
            &w.enable_request(),
        )
        .await
        .err(403, 4002);
    viewer.get("/tokens").await.err(403, 4002);

    // An agent cannot fail over an item, nor heartbeat for someone else.
    w.agent
        .1
        .post(
            &format!("/items/{}/actions", w.item.id),
            &w.enable_request(),
        )
        .await
        .err(403, 4002);
    w.agent
        .1
        .post(
            &format!("/components/{}/heartbeat", w.ps.0.component_id),
            &Heartbeat::default(),
        )
        .await
        .err(403, 4002);
    // Nothing changed.
    assert_eq!(w.item().await.state.phase, Phase::Unprotected);
    let jobs: Vec<Job> = w.admin.get("/jobs").await.ok();
    assert!(jobs.is_empty());

    // Wrong registration key.
    anon.post(
        "/enrol",
        &Enrolment {
            registration_key: "rbk_wrong".into(),
            role: ComponentRole::Agent,
            name: "x".into(),
            site: "onprem".into(),
            version: String::new(),
        },
    )
    .await
    .err(401, 4003);

    // Errors produced by the framework have the same shape.
    w.admin.get("/no/such/endpoint").await.err(404, 4006);
    let a = w
        .admin
        .post("/items", &serde_json::json!({"name": 5}))
        .await;
    assert!(a.status == 400 || a.status == 422, "{}", a.body);
    assert_eq!(a.body["code"], 4004);
    server.stop().await;
}

#[tokio::test]
async fn creating_a_policy_creates_its_read_only_failback_policy() {
    let (_dir, server, w) = fresh().await;
    let all: Vec<Policy> = w.admin.get("/policies").await.ok();
    assert_eq!(all.len(), 2);
    let fb = all.iter().find(|p| p.read_only).unwrap();
    assert_eq!(fb.name, "gold-failback");
    assert_eq!(
        (
            fb.rpo_threshold_secs,
            fb.retention_secs,
            fb.app_consistent_frequency_secs
        ),
        (15 * 60, 24 * 3600, 60 * 60)
    );
    assert_eq!(fb.parent_policy_id.as_deref(), Some(w.policy.id.as_str()));
    assert_eq!(w.policy.failback_policy_id.as_deref(), Some(fb.id.as_str()));
    let edit = NewPolicy {
        name: fb.name.clone(),
        rpo_threshold_secs: 60,
        retention_secs: 60,
        app_consistent_frequency_secs: 60,
        crash_consistent_frequency_secs: DEFAULT_CRASH_CONSISTENT_SECS,
    };
    w.admin
        .put(&format!("/policies/{}", fb.id), &edit)
        .await
        .err(409, 4022);
    let edit = NewPolicy {
        name: "gold".into(),
        rpo_threshold_secs: 120,
        ..edit
    };
    let p: Policy = w
        .admin
        .put(&format!("/policies/{}", w.policy.id), &edit)
        .await
        .ok();
    assert_eq!(p.rpo_threshold_secs, 120);
    server.stop().await;
}

/// The whole cycle of DESIGN.md §2: protect, fail over, commit, reprotect,
/// fail back in two phases, commit, reverse replicate.
#[tokio::test]
async fn full_lifecycle_failover_reprotect_failback_reverse_replicate() {
    let (_dir, server, w) = fresh().await;
    w.protect().await;
    let item = w.item().await;
    assert_eq!(
        item.state,
        ItemState {
            phase: Phase::Protected,
            direction: Direction::Forward
        }
    );
    assert_eq!(
        item.master_target_id.as_deref(),
        Some(w.mt_recovery.0.component_id.as_str())
    );

    // A master target reports a recovery point; unplanned failover uses it.
    let p: RecoveryPoint = w
        .mt_recovery
        .1
        .post(
            &format!("/items/{}/points", w.item.id),
            &NewRecoveryPoint {
                id: "rp-1".into(),
                time: None,
                kind: PointKind::AppConsistent,
                group_marker: None,
                barrier_ns: None,
            },
        )
        .await
        .ok();
    let pts: Vec<RecoveryPoint> = w
        .admin
        .get(&format!("/items/{}/points", w.item.id))
        .await
        .ok();
    assert_eq!(pts, vec![p.clone()]);

    // Not allowed: commit before a failover; failback of a forward item.
    w.act(&ActionRequest::new(Action::Commit))
        .await
        .err(409, 4008);
    let e = w
        .act(&ActionRequest::new(Action::Failback))
        .await
        .err(409, 4008);
    assert!(e.message.contains("use failover"), "{}", e.message);

    let fo = ActionRequest {
        point_id: Some("rp-1".into()),
        ..ActionRequest::new(Action::Failover)
    };
    let job: Job = w.act(&fo).await.ok();
    assert_eq!(w.item().await.state.phase, Phase::FailingOver);
    w.act(&ActionRequest::new(Action::Commit))
        .await
        .err(409, 4009);
    let job = w.drive(&job.id).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    let item = w.item().await;
    assert_eq!(item.state.phase, Phase::CommitPending);
    assert_eq!(item.active_site, SiteRole::Recovery);

    let job: Job = w.act(&ActionRequest::new(Action::Commit)).await.ok();
    assert_eq!(w.drive(&job.id).await.state, JobState::Succeeded);
    assert_eq!(w.item().await.state.phase, Phase::Committed);

    // Reprotect to the primary site: its master target, the failback policy.
    let reprotect = ActionRequest {
        master_target_id: Some(w.mt_primary.0.component_id.clone()),
        datastore: Some("ds1".into()),
        retention_volume: Some("/mnt/retention".into()),
        ..ActionRequest::new(Action::Reprotect)
    };
    let job: Job = w.act(&reprotect).await.ok();
    assert_eq!(
        w.item().await.state,
        ItemState {
            phase: Phase::Reprotecting,
            direction: Direction::Reverse
        }
    );
    assert_eq!(w.drive(&job.id).await.state, JobState::Succeeded);
    let item = w.item().await;
    assert_eq!(
        item.state,
        ItemState {
            phase: Phase::Protected,
            direction: Direction::Reverse
        }
    );
    assert_eq!(
        item.policy_id, w.policy.failback_policy_id,
        "reprotect selects the failback policy"
    );
    assert_eq!(
        item.master_target_id.as_deref(),
        Some(w.mt_primary.0.component_id.as_str())
    );

    // Failback: planned, delta, two phases.
    let job: Job = w.act(&ActionRequest::new(Action::Failback)).await.ok();
    let job = w.drive(&job.id).await;
    assert_eq!(job.state, JobState::Waiting);
    assert_eq!(w.item().await.state.phase, Phase::FailoverSynced);
    let waiting = job
        .steps
        .iter()
        .find(|s| s.state == StepState::Waiting)
        .unwrap();
    assert_eq!(waiting.name, "await_complete");
    assert_eq!(
        job.steps[1].bytes_total, 1024,
        "count_differences reported bytes"
    );
    let job2: Job = w.act(&ActionRequest::new(Action::Complete)).await.ok();
    assert_eq!(job2.id, job.id, "complete continues the same job");
    let job = w.drive(&job.id).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    assert!(
        job.steps
            .iter()
            .all(|s| s.state == StepState::Done && s.percent == 100.0)
    );
    let item = w.item().await;
    assert_eq!(
        item.state,
        ItemState {
            phase: Phase::CommitPending,
            direction: Direction::Reverse
        }
    );
    assert_eq!(item.active_site, SiteRole::Primary);

    let job: Job = w.act(&ActionRequest::new(Action::Commit)).await.ok();
    assert_eq!(w.drive(&job.id).await.state, JobState::Succeeded);
    let rr = ActionRequest {
        master_target_id: Some(w.mt_recovery.0.component_id.clone()),
        datastore: Some("ds1".into()),
        retention_volume: Some("/mnt/retention".into()),
        ..ActionRequest::new(Action::ReverseReplicate)
    };
    let job: Job = w.act(&rr).await.ok();
    assert_eq!(w.drive(&job.id).await.state, JobState::Succeeded);
    let item = w.item().await;
    assert_eq!(
        item.state,
        ItemState {
            phase: Phase::Protected,
            direction: Direction::Forward
        }
    );
    assert_eq!(
        item.policy_id.as_deref(),
        Some(w.policy.id.as_str()),
        "back on the forward policy"
    );

    // History, filterable.
    let all: Vec<Job> = w
        .admin
        .get(&format!("/jobs?item={}", w.item.name))
        .await
        .ok();
    assert_eq!(all.len(), 7);
    let ok: Vec<Job> = w.admin.get("/jobs?state=succeeded&limit=3").await.ok();
    assert_eq!(ok.len(), 3);
    w.admin.get("/jobs?since=yesterday").await.err(400, 4004);
    server.stop().await;
}

#[tokio::test]
async fn prechecks_report_every_failure_at_once() {
    let (_dir, server, w) = fresh().await;
    // A master target that fails many checks at once.
    let mut facts = mt_facts(OsType::Windows, "host-b");
    facts.disk_slots_used = 60;
    facts.snapshots_present = true;
    facts.disk_uuids.push("VM1-ROOT".into());
    facts.machines.push("vm1".into());
    facts.retention_volumes[0].filesystem = "vfat".into();
    facts.datastores[0].accessible = false;
    let _: Component = w
        .mt_recovery
        .1
        .post(
            &format!("/components/{}/heartbeat", w.mt_recovery.0.component_id),
            &Heartbeat {
                version: "0.1.0".into(),
                master_target: Some(facts),
                ..Default::default()
            },
        )
        .await
        .ok();
    // The agent reports its machine suspended.
    let _: Component = w
        .agent
        .1
        .post(
            &format!("/components/{}/heartbeat", w.agent.0.component_id),
            &Heartbeat {
                version: "0.1.0".into(),
                agent: Some(AgentFacts {
                    machine: "vm1".into(),
                    running: true,
                    suspended: true,
                    sync_barrier: None,
                    sync_barrier_ns: None,
                    replication: None,
                }),
                ..Default::default()
            },
        )
        .await
        .ok();
    let e = w.act(&w.enable_request()).await.err(422, 4021);
    let mut codes: Vec<u32> = e.failures.iter().map(|f| f.code).collect();
    codes.sort();
    assert_eq!(
        codes,
        vec![4011, 4012, 4013, 4014, 4015, 8061, 78052, 78093],
        "{e:?}"
    );
    assert!(e.failures.iter().all(|f| !f.remedy.is_empty()));
    // The item did not move; the refused job is in the history as failed.
    assert_eq!(w.item().await.state.phase, Phase::Unprotected);
    let jobs: Vec<Job> = w.admin.get("/jobs?state=failed").await.ok();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].error.as_ref().unwrap().code, 4021);
    assert_eq!(jobs[0].steps[0].state, StepState::Failed);

    // Item unknown; an item detached (deleted) cannot be failed back.
    w.admin
        .post(
            "/items/ghost/actions",
            &ActionRequest::new(Action::Failback),
        )
        .await
        .err(404, 4005);
    server.stop().await;
}

#[tokio::test]
async fn stale_agent_is_95226_and_detached_item_cannot_fail_over() {
    let dir = tempfile::tempdir().unwrap();
    let (admin, key) = init(dir.path()).await;
    let mut cfg = fast_config();
    cfg.heartbeat_limit = Duration::from_millis(300);
    let server = Server::start(dir.path(), cfg).await;
    let w = world(&server.base, &admin, &key).await;
    w.protect().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Planned failover needs the source's agent: stale → 95226; master target stale → 4029.
    let planned = ActionRequest {
        kind: Some(FailoverKind::Planned),
        ..ActionRequest::new(Action::Failover)
    };
    let e = w.act(&planned).await.err(422, 4021);
    let codes: Vec<u32> = e.failures.iter().map(|f| f.code).collect();
    assert!(codes.contains(&95226), "{codes:?}");
    assert!(codes.contains(&4029), "{codes:?}");
    heartbeat_all(&w).await;
    let _: Item = w
        .admin
        .post(
            &format!("/items/{}/detach", w.item.id),
            &DetachRequest {
                reason: "deleted".into(),
            },
        )
        .await
        .ok();
    let e = w.act(&planned).await.err(422, 4021);
    assert_eq!(
        e.failures.iter().map(|f| f.code).collect::<Vec<_>>(),
        vec![4019]
    );
    server.stop().await;
}

#[tokio::test]
async fn cancel_returns_the_item_to_its_state_before_the_job() {
    let (_dir, server, w) = fresh().await;
    w.protect().await;
    let job: Job = w
        .act(&ActionRequest {
            kind: Some(FailoverKind::Planned),
            ..ActionRequest::new(Action::Failover)
        })
        .await
        .ok();
    // The master target starts counting differences, then the operator cancels.
    let work: Vec<WorkItem> = w.mt_recovery.1.get("/work").await.ok();
    assert_eq!(work.len(), 1);
    assert_eq!(work[0].step, "count_differences");
    let cancelled: Job = w.act(&ActionRequest::new(Action::Cancel)).await.ok();
    assert_eq!(cancelled.id, job.id);
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(cancelled.error.as_ref().unwrap().code, 4025);
    assert_eq!(
        w.item().await.state,
        ItemState {
            phase: Phase::Protected,
            direction: Direction::Forward
        }
    );
    // A late report from the component is refused; cancel again is refused.
    let rep = StepReport {
        state: StepState::Done,
        bytes_done: 0,
        bytes_total: 0,
        error_code: None,
        message: None,
    };
    w.mt_recovery
        .1
        .post(&format!("/jobs/{}/steps/1", job.id), &rep)
        .await
        .err(409, 4026);
    w.admin
        .post(&format!("/jobs/{}/cancel", job.id), &())
        .await
        .err(409, 4026);
    w.admin
        .post("/jobs/job-none/cancel", &())
        .await
        .err(404, 4007);
    // A component failing its step fails the job with the component's code.
    let job: Job = w.act(&ActionRequest::new(Action::TestFailover)).await.ok();
    let rep = StepReport {
        state: StepState::Failed,
        bytes_done: 0,
        bytes_total: 0,
        error_code: Some(8061),
        message: Some("datastore ds1 vanished".into()),
    };
    let failed: Job = w
        .mt_recovery
        .1
        .post(&format!("/jobs/{}/steps/1", job.id), &rep)
        .await
        .ok();
    assert_eq!(failed.state, JobState::Failed);
    assert_eq!(failed.error.as_ref().unwrap().code, 8061);
    assert_eq!(w.item().await.state.phase, Phase::Protected);
    server.stop().await;
}

#[tokio::test]
async fn jobs_survive_a_restart_resuming_or_failing_with_a_code() {
    let dir = tempfile::tempdir().unwrap();
    let (admin, key) = init(dir.path()).await;
    let server = Server::start(dir.path(), fast_config()).await;
    let w = world(&server.base, &admin, &key).await;
    w.protect().await;
    // Two jobs in flight: a failover on vm1 and a protect of vm2.
    let job: Job = w.act(&ActionRequest::new(Action::Failover)).await.ok();
    let _: Item = w
        .admin
        .post(
            "/items",
            &NewItem {
                name: "vm2".into(),
                os: OsType::Linux,
                disks: vec![Disk {
                    name: "d".into(),
                    size_bytes: 1 << 20,
                    uuid: "vm2-d".into(),
                }],
                primary_site: "onprem".into(),
                recovery_site: "cloud".into(),
                born_at: None,
                agent_id: Some(w.agent.0.component_id.clone()),
            },
        )
        .await
        .ok();
    let job2: Job = w
        .admin
        .post("/items/vm2/actions", &w.enable_request())
        .await
        .ok();
    server.stop().await;

    // Restart with a short step timeout. vm1's master target comes back and
    // reports: the job resumes from its last finished step. Nobody reports
    // on vm2's job: it fails with 4023 instead of staying in progress.
    let mut cfg = fast_config();
    cfg.step_timeout = Duration::from_millis(1500);
    let server = Server::start(dir.path(), cfg).await;
    let mut w = w;
    w.admin.base = server.base.clone();
    for c in [
        &mut w.mt_primary,
        &mut w.mt_recovery,
        &mut w.ps,
        &mut w.agent,
    ] {
        c.1.base = server.base.clone();
    }
    let before: Job = w.admin.get(&format!("/jobs/{}", job.id)).await.ok();
    assert_eq!(before.state, JobState::Running);
    let done = w.drive(&job.id).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!(w.item().await.state.phase, Phase::CommitPending);

    let mut last = None;
    for _ in 0..100 {
        let j: Job = w.admin.get(&format!("/jobs/{}", job2.id)).await.ok();
        if j.state.is_finished() {
            last = Some(j);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let j = last.expect("the unreported job ended");
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(j.error.as_ref().unwrap().code, 4023);
    let vm2: Item = w.admin.get("/items/vm2").await.ok();
    assert_eq!(vm2.state.phase, Phase::Unprotected);
    assert_eq!(vm2.job_id, None);
    server.stop().await;
}

#[tokio::test]
async fn backup_while_running_and_restore_keeps_items_failback_able() {
    let (dir, server, w) = fresh().await;
    w.protect().await;
    let job: Job = w.act(&ActionRequest::new(Action::Failover)).await.ok();
    w.drive(&job.id).await;
    let job: Job = w.act(&ActionRequest::new(Action::Commit)).await.ok();
    w.drive(&job.id).await;
    let reprotect = ActionRequest {
        master_target_id: Some(w.mt_primary.0.component_id.clone()),
        datastore: Some("ds1".into()),
        retention_volume: Some("/mnt/retention".into()),
        ..ActionRequest::new(Action::Reprotect)
    };
    let job: Job = w.act(&reprotect).await.ok();
    w.drive(&job.id).await;

    // Backup of the running server.
    let store = rebound_store::Store::open(&rebound_store::Store::sqlite_url(dir.path()))
        .await
        .unwrap();
    let file = dir.path().join("backup.db");
    rebound_server::backup(&store, &file).await.unwrap();
    store.close().await;
    server.stop().await;

    // Lose the server; restore elsewhere; the item is known and fails back.
    let dir2 = tempfile::tempdir().unwrap();
    rebound_server::restore(&file, dir2.path())
        .await
        .unwrap()
        .close()
        .await;
    assert!(
        rebound_server::restore(&file, dir2.path()).await.is_err(),
        "never over a database"
    );
    let server = Server::start(dir2.path(), fast_config()).await;
    let mut w = w;
    fails_back_on(&server, &mut w).await;
    server.stop().await;

    // The same backup into an empty PostgreSQL database, when one is at hand.
    if let Ok(url) = std::env::var("DATABASE_URL") {
        use sqlx::Connection;
        let name = format!("rebound_srv_{}", rebound_store::random_hex(6));
        let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (url.as_str(), String::new()),
        };
        let cut = base.rfind('/').unwrap();
        let db_url = format!("{}/{name}{query}", &base[..cut]);
        rebound_server::restore_into_database(&file, &db_url)
            .await
            .unwrap()
            .close()
            .await;
        let again = rebound_server::restore_into_database(&file, &db_url)
            .await
            .err()
            .unwrap();
        assert_eq!(again.0.code, 4031, "never over a configuration server");
        let server = Server::start_url(&db_url, dir2.path(), fast_config()).await;
        fails_back_on(&server, &mut w).await;
        server.stop().await;
        sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await
            .unwrap();
    }
}

/// The restored server knows the reverse-protected item and fails it back.
async fn fails_back_on(server: &Server, w: &mut World) {
    w.admin.base = server.base.clone();
    for c in [
        &mut w.mt_primary,
        &mut w.mt_recovery,
        &mut w.ps,
        &mut w.agent,
    ] {
        c.1.base = server.base.clone();
    }
    let item = w.item().await;
    assert_eq!(
        item.state,
        ItemState {
            phase: Phase::Protected,
            direction: Direction::Reverse
        }
    );
    heartbeat_all(w).await;
    let job: Job = w.act(&ActionRequest::new(Action::Failback)).await.ok();
    assert_eq!(w.drive(&job.id).await.state, JobState::Waiting);
}

#[tokio::test]
async fn init_refuses_twice_and_run_refuses_uninitialised() {
    let dir = tempfile::tempdir().unwrap();
    let url = rebound_store::Store::sqlite_url(dir.path());
    assert_eq!(
        rebound_server::open_initialised(&url)
            .await
            .err()
            .unwrap()
            .0
            .code,
        4028
    );
    let store = rebound_store::Store::open(&url).await.unwrap();
    let first = rebound_server::init(&store).await.unwrap();
    assert!(first.admin_token.starts_with("rbt_") && first.registration_key.starts_with("rbk_"));
    assert_eq!(
        rebound_server::init(&store).await.err().unwrap().0.code,
        4028
    );
    // Secrets are stored hashed only.
    store.close().await;
    let raw = std::fs::read(dir.path().join(rebound_store::DB_FILE)).unwrap();
    let hay = String::from_utf8_lossy(&raw);
    assert!(!hay.contains(&first.admin_token) && !hay.contains(&first.registration_key));
}

#[tokio::test]
async fn groups_need_one_os_and_reprotect_through_a_plan() {
    let (_dir, server, w) = fresh().await;
    let _: Item = w
        .admin
        .post(
            "/items",
            &NewItem {
                name: "win1".into(),
                os: OsType::Windows,
                disks: vec![Disk {
                    name: "c".into(),
                    size_bytes: 1 << 30,
                    uuid: "win1-c".into(),
                }],
                primary_site: "onprem".into(),
                recovery_site: "cloud".into(),
                born_at: None,
                agent_id: None,
            },
        )
        .await
        .ok();
    let e = w
        .admin
        .post(
            "/groups",
            &NewGroup {
                name: "g".into(),
                items: vec!["vm1".into(), "win1".into()],
            },
        )
        .await
        .err(422, 4021);
    assert_eq!(e.failures[0].code, 4016);
    let g: Group = w
        .admin
        .post(
            "/groups",
            &NewGroup {
                name: "g".into(),
                items: vec!["vm1".into()],
            },
        )
        .await
        .ok();
    assert_eq!(w.item().await.group_id.as_deref(), Some(g.id.as_str()));
    let plan: Plan = w
        .admin
        .post(
            "/plans",
            &NewPlan {
                name: "p".into(),
                steps: vec![
                    PlanStep {
                        kind: PlanStepKind::Group,
                        items: vec!["vm1".into()],
                        text: None,
                        timeout_secs: None,
                    },
                    PlanStep {
                        kind: PlanStepKind::Manual,
                        items: vec![],
                        text: Some("check DNS".into()),
                        timeout_secs: None,
                    },
                ],
            },
        )
        .await
        .ok();
    w.protect().await;
    let job: Job = w.act(&ActionRequest::new(Action::Failover)).await.ok();
    w.drive(&job.id).await;
    let job: Job = w.act(&ActionRequest::new(Action::Commit)).await.ok();
    w.drive(&job.id).await;
    let mut reprotect = ActionRequest {
        master_target_id: Some(w.mt_primary.0.component_id.clone()),
        datastore: Some("ds1".into()),
        retention_volume: Some("/mnt/retention".into()),
        ..ActionRequest::new(Action::Reprotect)
    };
    let e = w.act(&reprotect).await.err(422, 4021);
    assert_eq!(
        e.failures.iter().map(|f| f.code).collect::<Vec<_>>(),
        vec![4018]
    );
    reprotect.plan_id = Some(plan.id.clone());
    let job: Job = w.act(&reprotect).await.ok();
    assert_eq!(w.drive(&job.id).await.state, JobState::Succeeded);
    let by_plan: Vec<Job> = w.admin.get(&format!("/jobs?plan={}", plan.id)).await.ok();
    assert_eq!(by_plan.len(), 1);
    server.stop().await;
}

/// A crash between writing a finished job and writing its item back: the
/// restart gives the item the state of the job's outcome.
#[tokio::test]
async fn restart_repairs_an_item_whose_job_already_ended() {
    let dir = tempfile::tempdir().unwrap();
    let (admin, key) = init(dir.path()).await;
    let server = Server::start(dir.path(), fast_config()).await;
    let w = world(&server.base, &admin, &key).await;
    w.protect().await;
    let job: Job = w.act(&ActionRequest::new(Action::TestFailover)).await.ok();
    server.stop().await;

    // Simulate the crash: the job is recorded failed, the item still points at it.
    let store = rebound_store::Store::open(&rebound_store::Store::sqlite_url(dir.path()))
        .await
        .unwrap();
    let mut j = store.job(&job.id).await.unwrap().unwrap();
    j.state = JobState::Failed;
    store.put_job(&j).await.unwrap();
    let item = store.item("vm1").await.unwrap().unwrap();
    assert_eq!(item.state.phase, Phase::TestFailoverStarting);
    store.close().await;

    let server = Server::start(dir.path(), fast_config()).await;
    let admin = Client::new(&server.base, Some(&admin));
    let item: Item = admin.get("/items/vm1").await.ok();
    assert_eq!(
        item.state,
        ItemState {
            phase: Phase::Protected,
            direction: Direction::Forward
        }
    );
    assert_eq!(item.job_id, None);
    server.stop().await;
}

/// A recovery plan's job: the group's item jobs, then a manual step that
/// waits for the operator; a failback at plan level waits for `complete`.
#[tokio::test]
async fn plan_jobs_run_groups_in_order_and_wait_for_the_operator() {
    let (_dir, server, w) = fresh().await;
    w.protect().await;
    let plan: Plan = w
        .admin
        .post(
            "/plans",
            &NewPlan {
                name: "dr".into(),
                steps: vec![
                    PlanStep {
                        kind: PlanStepKind::Group,
                        items: vec!["vm1".into()],
                        text: None,
                        timeout_secs: None,
                    },
                    PlanStep {
                        kind: PlanStepKind::Manual,
                        items: vec![],
                        text: Some("check DNS".into()),
                        timeout_secs: None,
                    },
                ],
            },
        )
        .await
        .ok();
    let pj: Job = w
        .admin
        .post(
            &format!("/plans/{}/actions", plan.id),
            &ActionRequest::new(Action::Failover),
        )
        .await
        .ok();
    assert_eq!(pj.plan_id.as_deref(), Some(plan.id.as_str()));
    assert_eq!(pj.steps.len(), 2);
    let child = pj.steps[0].job_ids[0].clone();
    w.admin
        .post(
            &format!("/plans/{}/actions", plan.id),
            &ActionRequest::new(Action::Failover),
        )
        .await
        .err(409, 4009);
    assert_eq!(w.drive(&child).await.state, JobState::Succeeded);
    let mut pj2 = None;
    for _ in 0..100 {
        let j: Job = w.admin.get(&format!("/jobs/{}", pj.id)).await.ok();
        if j.state == JobState::Waiting {
            pj2 = Some(j);
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let pj2 = pj2.expect("the plan job reaches its manual step");
    assert_eq!(pj2.steps[0].state, StepState::Done);
    assert_eq!(pj2.steps[1].state, StepState::Waiting);
    assert_eq!(pj2.steps[1].name, "manual: check DNS");
    let done: Job = w
        .admin
        .post(&format!("/jobs/{}/continue", pj.id), &())
        .await
        .ok();
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(w.item().await.state.phase, Phase::CommitPending);

    // Commit and reprotect at plan level, then a two-phase failback.
    let pj: Job = w
        .admin
        .post(
            &format!("/plans/{}/actions", plan.id),
            &ActionRequest::new(Action::Commit),
        )
        .await
        .ok();
    w.drive(&pj.steps[0].job_ids[0]).await;
    until(&w, &pj.id, JobState::Waiting).await;
    let reprotect = ActionRequest {
        master_target_id: Some(w.mt_primary.0.component_id.clone()),
        datastore: Some("ds1".into()),
        retention_volume: Some("/mnt/retention".into()),
        ..ActionRequest::new(Action::Reprotect)
    };
    let _: Job = w
        .admin
        .post(&format!("/jobs/{}/continue", pj.id), &())
        .await
        .ok();
    let pj: Job = w
        .admin
        .post(&format!("/plans/{}/actions", plan.id), &reprotect)
        .await
        .ok();
    assert_eq!(
        w.drive(&pj.steps[0].job_ids[0]).await.state,
        JobState::Succeeded
    );
    until(&w, &pj.id, JobState::Waiting).await;
    let _: Job = w
        .admin
        .post(&format!("/jobs/{}/continue", pj.id), &())
        .await
        .ok();
    let pj: Job = w
        .admin
        .post(
            &format!("/plans/{}/actions", plan.id),
            &ActionRequest::new(Action::Failback),
        )
        .await
        .ok();
    let child = pj.steps[0].job_ids[0].clone();
    assert_eq!(w.drive(&child).await.state, JobState::Waiting);
    let mut waiting = false;
    for _ in 0..100 {
        let j: Job = w.admin.get(&format!("/jobs/{}", pj.id)).await.ok();
        if j.state == JobState::Waiting {
            waiting = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(waiting, "the plan waits while its items wait for complete");
    // Continuing the plan completes its items' failbacks.
    let _: Job = w
        .admin
        .post(&format!("/jobs/{}/continue", pj.id), &())
        .await
        .ok();
    assert_eq!(w.drive(&child).await.state, JobState::Succeeded);
    assert_eq!(
        w.item().await.state,
        ItemState {
            phase: Phase::CommitPending,
            direction: Direction::Reverse
        }
    );
    // Cancel the plan job at its manual step.
    until(&w, &pj.id, JobState::Waiting).await;
    let cancelled: Job = w
        .admin
        .post(&format!("/jobs/{}/cancel", pj.id), &())
        .await
        .ok();
    assert_eq!(cancelled.state, JobState::Cancelled);
    server.stop().await;
}

async fn until(w: &World, id: &str, state: JobState) -> Job {
    for _ in 0..200 {
        let j: Job = w.admin.get(&format!("/jobs/{id}")).await.ok();
        if j.state == state {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("job {id} never became {state}");
}

/// A second protectable item with its own agent, sharing the world's
/// components.
async fn second_item(w: &World, name: &str) -> World {
    let agent = enrol(
        &w.admin,
        &w.key,
        ComponentRole::Agent,
        &format!("{name}-agent"),
        "onprem",
    )
    .await;
    let _: Component = agent
        .1
        .post(
            &format!("/components/{}/heartbeat", agent.0.component_id),
            &Heartbeat {
                version: "0.1.0".into(),
                agent: Some(AgentFacts {
                    machine: name.into(),
                    running: true,
                    suspended: false,
                    sync_barrier: None,
                    sync_barrier_ns: None,
                    replication: None,
                }),
                ..Default::default()
            },
        )
        .await
        .ok();
    let item: Item = w
        .admin
        .post(
            "/items",
            &NewItem {
                name: name.into(),
                os: OsType::Linux,
                disks: vec![Disk {
                    name: "root".into(),
                    size_bytes: 10 << 30,
                    uuid: format!("{name}-root"),
                }],
                primary_site: "onprem".into(),
                recovery_site: "cloud".into(),
                born_at: None,
                agent_id: Some(agent.0.component_id.clone()),
            },
        )
        .await
        .ok();
    World {
        admin: w.admin.clone(),
        key: w.key.clone(),
        primary: w.primary.clone(),
        recovery: w.recovery.clone(),
        mt_primary: w.mt_primary.clone(),
        mt_recovery: w.mt_recovery.clone(),
        ps: w.ps.clone(),
        agent,
        policy: w.policy.clone(),
        item,
    }
}

fn script(text: &str, timeout_secs: Option<u64>) -> PlanStep {
    PlanStep {
        kind: PlanStepKind::Script,
        items: vec![],
        text: Some(text.into()),
        timeout_secs,
    }
}

fn group(item: &str) -> PlanStep {
    PlanStep {
        kind: PlanStepKind::Group,
        items: vec![item.into()],
        text: None,
        timeout_secs: None,
    }
}

async fn plan_of(w: &World, name: &str, steps: Vec<PlanStep>) -> Plan {
    w.admin
        .post(
            "/plans",
            &NewPlan {
                name: name.into(),
                steps,
            },
        )
        .await
        .ok()
}

async fn start_plan(w: &World, plan: &Plan, action: Action) -> Job {
    w.admin
        .post(
            &format!("/plans/{}/actions", plan.id),
            &ActionRequest::new(action),
        )
        .await
        .ok()
}

/// Wait until a condition on a job holds (5 s at most).
async fn until_job(w: &World, id: &str, what: &str, f: impl Fn(&Job) -> bool) -> Job {
    for _ in 0..200 {
        let j: Job = w.admin.get(&format!("/jobs/{id}")).await.ok();
        if f(&j) {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let j: Job = w.admin.get(&format!("/jobs/{id}")).await.ok();
    panic!("job {id}: {what} never happened: {j:?}");
}

/// A process is gone (or a zombie nobody reaped yet).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

async fn wait_gone(pid: u32) {
    for _ in 0..200 {
        if process_gone(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("process {pid} still runs");
}

async fn read_pids(path: &std::path::Path) -> Vec<u32> {
    for _ in 0..200 {
        if let Ok(s) = std::fs::read_to_string(path)
            && s.ends_with('\n')
        {
            return s.split_whitespace().map(|p| p.parse().unwrap()).collect();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the script never wrote {}", path.display());
}

/// group → script → group: the script runs on the server with the plan in
/// its environment, its output lands in the step's message, and the plan
/// goes on to the next group.
#[tokio::test]
async fn plan_script_steps_run_between_groups() {
    let (dir, server, w) = fresh().await;
    w.protect().await;
    let w2 = second_item(&w, "vm2").await;
    w2.protect().await;
    let env_file = dir.path().join("script-env.txt");
    let plan = plan_of(
        &w,
        "dr",
        vec![
            group("vm1"),
            script(
                &format!(
                    "env | grep '^REBOUND_' | sort > '{}'; echo script-says-hello; echo on-stderr >&2",
                    env_file.display()
                ),
                Some(10),
            ),
            group("vm2"),
        ],
    )
    .await;
    assert_eq!(plan.steps[1].timeout_secs, Some(10));
    let pj = start_plan(&w, &plan, Action::Failover).await;
    assert_eq!(pj.steps[1].executor, Executor::Server);
    assert_eq!(pj.steps[1].state, StepState::Pending);
    assert_eq!(
        w.drive(&pj.steps[0].job_ids[0]).await.state,
        JobState::Succeeded
    );
    let j = until_job(&w, &pj.id, "the second group starts", |j| {
        !j.steps[2].job_ids.is_empty()
    })
    .await;
    assert_eq!(j.steps[1].state, StepState::Done);
    let msg = j.steps[1].message.clone().unwrap_or_default();
    assert!(msg.contains("script-says-hello"), "{msg:?}");
    assert!(msg.contains("on-stderr"), "{msg:?}");
    let env = std::fs::read_to_string(&env_file).unwrap();
    for want in [
        "REBOUND_ACTION=failover".to_string(),
        format!("REBOUND_JOB_ID={}", pj.id),
        format!("REBOUND_PLAN_ID={}", plan.id),
        "REBOUND_PLAN_NAME=dr".to_string(),
    ] {
        assert!(env.lines().any(|l| l == want), "{want} not in {env:?}");
    }
    assert_eq!(
        w2.drive(&j.steps[2].job_ids[0]).await.state,
        JobState::Succeeded
    );
    let done = until(&w, &pj.id, JobState::Succeeded).await;
    assert!(done.steps.iter().all(|s| s.state == StepState::Done));
    assert_eq!(w2.item().await.state.phase, Phase::CommitPending);

    // A script step's timeout is bounded; only script steps have one.
    w.admin
        .post(
            "/plans",
            &NewPlan {
                name: "bad".into(),
                steps: vec![script("true", Some(0))],
            },
        )
        .await
        .err(400, 4004);
    server.stop().await;
}

/// A failing script fails the plan job with plan-script-failed and its
/// output; a script past its timeout is killed.
#[tokio::test]
async fn plan_script_failures_and_timeouts_fail_the_plan() {
    let (dir, server, w) = fresh().await;
    let plan = plan_of(
        &w,
        "fails",
        vec![
            script("echo first-line; echo bad-thing >&2; exit 3", None),
            PlanStep {
                kind: PlanStepKind::Manual,
                items: vec![],
                text: Some("never reached".into()),
                timeout_secs: None,
            },
        ],
    )
    .await;
    let pj = start_plan(&w, &plan, Action::Failover).await;
    let j = until(&w, &pj.id, JobState::Failed).await;
    let e = j.error.clone().unwrap();
    assert_eq!(e.code, 4032);
    assert!(e.message.contains("status 3"), "{}", e.message);
    assert!(!e.remedy.is_empty());
    assert_eq!(j.steps[0].state, StepState::Failed);
    assert_eq!(j.steps[0].error.as_ref().unwrap().code, 4032);
    let msg = j.steps[0].message.clone().unwrap_or_default();
    assert!(
        msg.contains("first-line") && msg.contains("bad-thing"),
        "{msg:?}"
    );
    assert_eq!(j.steps[1].state, StepState::Cancelled);

    // A sleeping script is killed at its timeout, with its children.
    let pids = dir.path().join("timeout-pids");
    let plan = plan_of(
        &w,
        "slow",
        vec![script(
            &format!(
                "sleep 60 & echo $$ $! > '{}'; echo started; wait",
                pids.display()
            ),
            Some(1),
        )],
    )
    .await;
    let pj = start_plan(&w, &plan, Action::Failover).await;
    let running = read_pids(&pids).await;
    let j = until(&w, &pj.id, JobState::Failed).await;
    assert_eq!(j.error.as_ref().unwrap().code, 4032);
    let why = &j.steps[0].error.as_ref().unwrap().message;
    assert!(why.contains("timeout of 1 s"), "{why}");
    assert_eq!(j.steps[0].message.as_deref(), Some("started"));
    for pid in running {
        wait_gone(pid).await;
    }
    server.stop().await;
}

/// Cancelling the plan job kills its running script (and what it started).
#[tokio::test]
async fn cancelling_a_plan_kills_its_running_script() {
    let (dir, server, w) = fresh().await;
    let pids = dir.path().join("cancel-pids");
    let plan = plan_of(
        &w,
        "cancel",
        vec![script(
            &format!("sleep 60 & echo $$ $! > '{}'; wait", pids.display()),
            None,
        )],
    )
    .await;
    let pj = start_plan(&w, &plan, Action::Failover).await;
    let running = read_pids(&pids).await;
    assert_eq!(running.len(), 2);
    let j: Job = w.admin.get(&format!("/jobs/{}", pj.id)).await.ok();
    assert_eq!(j.state, JobState::Running);
    assert_eq!(j.steps[0].state, StepState::Running);
    let cancelled: Job = w
        .admin
        .post(&format!("/jobs/{}/cancel", pj.id), &())
        .await
        .ok();
    assert_eq!(cancelled.state, JobState::Cancelled);
    for pid in running {
        wait_gone(pid).await;
    }
    // The killed script does not rewrite the cancelled job.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let j: Job = w.admin.get(&format!("/jobs/{}", pj.id)).await.ok();
    assert_eq!(j.state, JobState::Cancelled);
    assert_eq!(j.error.unwrap().code, 4025);
    server.stop().await;
}

/// A restart while a script runs kills it and fails its step with
/// job-interrupted: a script is never run again by itself.
#[tokio::test]
async fn a_restart_fails_a_running_script_step_without_rerunning_it() {
    let (dir, server, w) = fresh().await;
    let pids = dir.path().join("restart-pids");
    let runs = dir.path().join("runs");
    let plan = plan_of(
        &w,
        "restart",
        vec![script(
            &format!(
                "echo run >> '{}'; echo $$ > '{}'; sleep 60",
                runs.display(),
                pids.display()
            ),
            None,
        )],
    )
    .await;
    let pj = start_plan(&w, &plan, Action::Failover).await;
    let running = read_pids(&pids).await;
    server.stop().await;
    for pid in running {
        wait_gone(pid).await;
    }
    let server = Server::start(dir.path(), fast_config()).await;
    let admin = Client::new(&server.base, w.admin.token.as_deref());
    let mut j = None;
    for _ in 0..200 {
        let job: Job = admin.get(&format!("/jobs/{}", pj.id)).await.ok();
        if job.state == JobState::Failed {
            j = Some(job);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let j = j.expect("the plan job fails after the restart");
    assert_eq!(j.error.as_ref().unwrap().code, 4024);
    assert_eq!(j.steps[0].error.as_ref().unwrap().code, 4024);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "run\n");
    server.stop().await;
}
