#![allow(clippy::unwrap_used)]
//! Continuous replication as the configuration server sees it: the
//! crash-consistent frequency of policies, the agent's capture path on its
//! item, and the master target's apply progress (real HTTP, real SQLite).

mod common;

use common::*;
use rebound_api::*;
use serde_json::json;

async fn fresh() -> (tempfile::TempDir, Server, World) {
    let dir = tempfile::tempdir().unwrap();
    let (admin, key) = init(dir.path()).await;
    let server = Server::start(dir.path(), fast_config()).await;
    let w = world(&server.base, &admin, &key).await;
    (dir, server, w)
}

fn new_policy(name: &str, crash_consistent: u64) -> NewPolicy {
    NewPolicy {
        name: name.into(),
        rpo_threshold_secs: 300,
        retention_secs: 86400,
        app_consistent_frequency_secs: 3600,
        crash_consistent_frequency_secs: crash_consistent,
    }
}

#[tokio::test]
async fn policies_keep_their_crash_consistent_frequency() {
    let (_dir, server, w) = fresh().await;
    assert_eq!(
        w.policy.crash_consistent_frequency_secs,
        DEFAULT_CRASH_CONSISTENT_SECS
    );

    let created: Vec<Policy> = w
        .admin
        .post("/policies", &new_policy("silver", 30))
        .await
        .ok();
    assert_eq!(created.len(), 2);
    assert_eq!(created[0].crash_consistent_frequency_secs, 30);
    assert!(created[1].read_only);
    assert_eq!(
        created[1].crash_consistent_frequency_secs, DEFAULT_CRASH_CONSISTENT_SECS,
        "the failback policy gets the default"
    );
    let got: Policy = w
        .admin
        .get(&format!("/policies/{}", created[0].id))
        .await
        .ok();
    assert_eq!(got, created[0]);

    // Left out of the body: the default.
    let body = json!({
        "name": "bronze",
        "rpo_threshold_secs": 300,
        "retention_secs": 86400,
        "app_consistent_frequency_secs": 3600,
    });
    let created: Vec<Policy> = w.admin.post("/policies", &body).await.ok();
    assert_eq!(
        created[0].crash_consistent_frequency_secs,
        DEFAULT_CRASH_CONSISTENT_SECS
    );

    // Out of range on create and on edit; nothing is written.
    for bad in [0, 3601, u64::MAX] {
        let e = w
            .admin
            .post("/policies", &new_policy("tin", bad))
            .await
            .err(400, 4004);
        assert!(
            e.message.contains("crash_consistent_frequency_secs") && e.message.contains("3600"),
            "{}",
            e.message
        );
        assert!(e.remedy.contains("--crash-consistent-secs"), "{}", e.remedy);
        w.admin
            .put(
                &format!("/policies/{}", w.policy.id),
                &new_policy("gold", bad),
            )
            .await
            .err(400, 4004);
    }
    w.admin.get("/policies/tin").await.err(404, 4006);

    // Edit within range; the bounds are allowed.
    for ok in [1, 3600, 12] {
        let p: Policy = w
            .admin
            .put(
                &format!("/policies/{}", w.policy.id),
                &new_policy("gold", ok),
            )
            .await
            .ok();
        assert_eq!(p.crash_consistent_frequency_secs, ok);
    }
    let p: Policy = w
        .admin
        .get(&format!("/policies/{}", w.policy.id))
        .await
        .ok();
    assert_eq!(p.crash_consistent_frequency_secs, 12);
    server.stop().await;
}

fn facts(state: ReplicationState, backlog: u64, applied: u64) -> ReplicationFacts {
    ReplicationFacts {
        state,
        backlog_bytes: backlog,
        resync_bytes: 0,
        eta_secs: Some(3),
        captured_seq: applied + 10,
        shipped_seq: applied + 5,
        applied_seq: applied,
    }
}

async fn agent_heartbeat(w: &World, replication: Option<ReplicationFacts>) {
    let _: Component = w
        .agent
        .1
        .post(
            &format!("/components/{}/heartbeat", w.agent.0.component_id),
            &Heartbeat {
                version: "0.1.0".into(),
                agent: Some(running_agent(replication)),
                ..Default::default()
            },
        )
        .await
        .ok();
}

#[tokio::test]
async fn items_show_their_agents_replication_from_its_heartbeat() {
    let (_dir, server, w) = fresh().await;
    assert_eq!(w.item().await.replication, None, "no facts yet");

    let f = facts(ReplicationState::Backlogged, 5 << 20, 40);
    agent_heartbeat(&w, Some(f.clone())).await;
    assert_eq!(w.item().await.replication.as_ref(), Some(&f));
    let items: Vec<Item> = w.admin.get("/items").await.ok();
    assert_eq!(items[0].replication.as_ref(), Some(&f));
    // Components read their item too (agent and master target tokens).
    let seen: Item = w.agent.1.get(&format!("/items/{}", w.item.id)).await.ok();
    assert_eq!(seen.replication.as_ref(), Some(&f));

    let f = facts(ReplicationState::Streaming, 0, 60);
    agent_heartbeat(&w, Some(f.clone())).await;
    assert_eq!(w.item().await.replication.as_ref(), Some(&f));

    // Writes of the item (a detach here) do not freeze a copy of the facts.
    let _: Item = w
        .admin
        .post(
            &format!("/items/{}/detach", w.item.id),
            &DetachRequest {
                reason: "moved".into(),
            },
        )
        .await
        .ok();
    agent_heartbeat(&w, None).await;
    assert_eq!(
        w.item().await.replication,
        None,
        "the agent stopped reporting"
    );

    // An item without an agent has none, whatever other agents report.
    agent_heartbeat(&w, Some(f.clone())).await;
    let other: Item = w
        .admin
        .post(
            "/items",
            &NewItem {
                name: "vm2".into(),
                os: OsType::Linux,
                disks: vec![Disk {
                    name: "root".into(),
                    size_bytes: 1 << 30,
                    uuid: "vm2-root".into(),
                }],
                primary_site: "onprem".into(),
                recovery_site: "cloud".into(),
                born_at: None,
                agent_id: None,
            },
        )
        .await
        .ok();
    assert_eq!(other.replication, None);
    let items: Vec<Item> = w.admin.get("/items").await.ok();
    let by_name = |n: &str| items.iter().find(|i| i.name == n).unwrap().clone();
    assert_eq!(by_name("vm1").replication.as_ref(), Some(&f));
    assert_eq!(by_name("vm2").replication, None);
    server.stop().await;
}

fn progress(agent: &str, applied: u64, gap: Option<StreamGap>) -> ReplicaProgress {
    ReplicaProgress {
        agent_id: agent.into(),
        applied_seq: applied,
        gap,
        updated_at: None,
    }
}

fn gap(expected: u64, found: Option<u64>) -> StreamGap {
    StreamGap {
        expected_seq: expected,
        found_seq: found,
        reason: "changeset missing".into(),
    }
}

#[tokio::test]
async fn replica_progress_comes_from_the_items_master_target_only() {
    let (_dir, server, w) = fresh().await;
    let path = format!("/items/{}/replica-progress", w.item.id);
    let agent_id = w.agent.0.component_id.clone();

    // Before protection no master target holds the item.
    w.mt_recovery
        .1
        .put(&path, &progress(&agent_id, 1, None))
        .await
        .err(403, 4002);

    // While the initial sync runs, the job's master target may report.
    let job: Job = w.act(&w.enable_request()).await.ok();
    let item: Item = w
        .mt_recovery
        .1
        .put(&path, &progress(&agent_id, 1, None))
        .await
        .ok();
    assert_eq!(item.replica_progress.as_ref().unwrap().applied_seq, 1);
    assert_eq!(w.drive(&job.id).await.state, JobState::Succeeded);

    let item: Item = w
        .mt_recovery
        .1
        .put(&path, &progress(&agent_id, 10, None))
        .await
        .ok();
    let p = item.replica_progress.clone().unwrap();
    assert_eq!(
        (p.agent_id.as_str(), p.applied_seq),
        (agent_id.as_str(), 10)
    );
    let stamped = p.updated_at.clone().unwrap();
    assert!(
        rebound_control::time::parse(&stamped).is_some(),
        "{stamped}"
    );
    assert_eq!(w.item().await.replica_progress, Some(p.clone()));

    // Every other component is refused and changes nothing.
    for c in [&w.mt_primary.1, &w.agent.1, &w.ps.1] {
        let e = c
            .put(&path, &progress(&agent_id, 99, None))
            .await
            .err(403, 4002);
        assert!(!e.message.is_empty());
    }
    let viewer: TokenInfo = w
        .admin
        .post(
            "/tokens",
            &NewToken {
                name: "auditor".into(),
                scope: Scope::Viewer,
            },
        )
        .await
        .ok();
    w.admin
        .with_token(viewer.token.as_deref().unwrap())
        .put(&path, &progress(&agent_id, 99, None))
        .await
        .err(403, 4002);
    assert_eq!(w.item().await.replica_progress.unwrap().applied_seq, 10);

    // Unknown item; malformed reports.
    w.mt_recovery
        .1
        .put(
            "/items/ghost/replica-progress",
            &progress(&agent_id, 1, None),
        )
        .await
        .err(404, 4005);
    w.mt_recovery
        .1
        .put(&path, &progress("", 1, None))
        .await
        .err(400, 4004);
    let e = w
        .mt_recovery
        .1
        .put(&path, &json!({"agent_id": agent_id}))
        .await;
    assert!(e.status >= 400 && e.status < 500, "{}", e.body);
    assert_eq!(e.body["code"], 4004, "{}", e.body);

    // Monotonic for one agent: an older report only updates the gap.
    let item: Item = w
        .mt_recovery
        .1
        .put(&path, &progress(&agent_id, 7, Some(gap(11, Some(13)))))
        .await
        .ok();
    let p = item.replica_progress.unwrap();
    assert_eq!(p.applied_seq, 10);
    assert_eq!(p.gap, Some(gap(11, Some(13))));
    let p = w.item().await.replica_progress.unwrap();
    assert_eq!((p.applied_seq, p.gap), (10, Some(gap(11, Some(13)))));
    // The resync filled the hole: further on, gap cleared.
    let item: Item = w
        .mt_recovery
        .1
        .put(&path, &progress(&agent_id, 25, None))
        .await
        .ok();
    let p = item.replica_progress.unwrap();
    assert_eq!((p.applied_seq, p.gap), (25, None));

    // Another agent's stream (the machine started elsewhere) replaces it,
    // even with a lower sequence number.
    let item: Item = w
        .mt_recovery
        .1
        .put(&path, &progress("agent-new", 3, None))
        .await
        .ok();
    let p = item.replica_progress.unwrap();
    assert_eq!((p.agent_id.as_str(), p.applied_seq), ("agent-new", 3));
    server.stop().await;
}

#[tokio::test]
async fn a_job_that_builds_a_new_replica_clears_the_old_progress() {
    let (_dir, server, w) = fresh().await;
    w.protect().await;
    let path = format!("/items/{}/replica-progress", w.item.id);
    let _: Item = w
        .mt_recovery
        .1
        .put(&path, &progress(&w.agent.0.component_id, 42, None))
        .await
        .ok();

    // Failover and commit keep it (no new replica).
    let _: RecoveryPoint = w
        .mt_recovery
        .1
        .post(
            &format!("/items/{}/points", w.item.id),
            &NewRecoveryPoint {
                id: "rp-1".into(),
                time: None,
                kind: PointKind::CrashConsistent,
                group_marker: None,
                barrier_ns: None,
            },
        )
        .await
        .ok();
    let fo = ActionRequest {
        point_id: Some("rp-1".into()),
        ..ActionRequest::new(Action::Failover)
    };
    let job: Job = w.act(&fo).await.ok();
    assert_eq!(w.drive(&job.id).await.state, JobState::Succeeded);
    let job: Job = w.act(&ActionRequest::new(Action::Commit)).await.ok();
    assert_eq!(w.drive(&job.id).await.state, JobState::Succeeded);
    assert_eq!(w.item().await.replica_progress.unwrap().applied_seq, 42);

    // Reprotect builds the replica at the primary site: cleared at its start.
    let reprotect = ActionRequest {
        master_target_id: Some(w.mt_primary.0.component_id.clone()),
        datastore: Some("ds1".into()),
        retention_volume: Some("/mnt/retention".into()),
        ..ActionRequest::new(Action::Reprotect)
    };
    let job: Job = w.act(&reprotect).await.ok();
    assert_eq!(w.item().await.replica_progress, None);
    // The reprotect's master target reports on the new replica.
    let item: Item = w
        .mt_primary
        .1
        .put(&path, &progress("agent-b", 2, None))
        .await
        .ok();
    assert_eq!(item.replica_progress.unwrap().applied_seq, 2);
    assert_eq!(w.drive(&job.id).await.state, JobState::Succeeded);
    assert_eq!(w.item().await.replica_progress.unwrap().agent_id, "agent-b");
    server.stop().await;
}
