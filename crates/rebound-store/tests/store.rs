#![allow(clippy::unwrap_used)]
//! One suite, two databases: every test runs on a fresh SQLite file, and
//! again on PostgreSQL when DATABASE_URL is set (scripts/postgres-test-cluster
//! starts a throw-away cluster and prints one). Each PostgreSQL run gets its
//! own fresh database.

use rebound_api::*;
use rebound_store::{JobFilter, Store, StoreError, Table, new_id};
use std::future::Future;

/// Run `f` against SQLite, then PostgreSQL if DATABASE_URL is set.
async fn on_each_backend<F, Fut>(f: F)
where
    F: Fn(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&Store::sqlite_url(dir.path())).await.unwrap();
    f(store).await;
    if let Ok(url) = std::env::var("DATABASE_URL") {
        let store = fresh_postgres(&url).await;
        f(store).await;
    }
}

async fn fresh_postgres(url: &str) -> Store {
    use sqlx::Connection;
    let name = format!("rebound_test_{}", rebound_store::random_hex(6));
    let mut admin = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    // Replace the database name in the URL (the part after the last '/', before '?').
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let cut = base.rfind('/').unwrap();
    let url = format!("{}/{name}{query}", &base[..cut]);
    Store::open(&url).await.unwrap()
}

fn site(name: &str, role: SiteRole) -> Site {
    Site {
        id: new_id("site"),
        name: name.into(),
        role,
        created_at: rebound_control::time::now(),
    }
}

fn item(name: &str, primary: &Site, recovery: &Site) -> Item {
    let now = rebound_control::time::now();
    Item {
        id: new_id("item"),
        name: name.into(),
        os: OsType::Linux,
        disks: vec![Disk {
            name: "root".into(),
            size_bytes: 1 << 30,
            uuid: "uuid-1".into(),
        }],
        primary_site_id: primary.id.clone(),
        recovery_site_id: recovery.id.clone(),
        born_at: SiteRole::Primary,
        state: ItemState {
            phase: Phase::Unprotected,
            direction: Direction::Forward,
        },
        active_site: SiteRole::Primary,
        agent_id: None,
        policy_id: None,
        group_id: None,
        process_server_id: None,
        master_target_id: None,
        datastore: None,
        retention_volume: None,
        last_point: None,
        rpo_seconds: None,
        detached: None,
        job_id: None,
        created_at: now.clone(),
        updated_at: now,
    }
}

fn job(item_id: &str, created_at: &str, state: JobState) -> Job {
    Job {
        id: new_id("job"),
        action: Action::Failover,
        item_id: Some(item_id.into()),
        plan_id: None,
        state,
        steps: vec![],
        request: ActionRequest::new(Action::Failover),
        from_state: None,
        cancel_requested: false,
        created_at: created_at.into(),
        started_at: None,
        ended_at: None,
        error: None,
    }
}

#[tokio::test]
async fn meta_and_tokens_are_stored_hashed() {
    on_each_backend(|s| async move {
        assert_eq!(s.meta("k").await.unwrap(), None);
        s.set_meta("k", "v1").await.unwrap();
        s.set_meta("k", "v2").await.unwrap();
        assert_eq!(s.meta("k").await.unwrap().as_deref(), Some("v2"));

        let info = s
            .insert_token("ops", Scope::Operator, "rbt_secret_value_123", None)
            .await
            .unwrap();
        let (found, comp) = s
            .token_by_secret("rbt_secret_value_123")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.id, info.id);
        assert_eq!(found.scope, Scope::Operator);
        assert_eq!(comp, None);
        assert!(s.token_by_secret("rbt_other").await.unwrap().is_none());
        s.revoke_token(&info.id).await.unwrap();
        assert!(
            s.token_by_secret("rbt_secret_value_123")
                .await
                .unwrap()
                .is_none()
        );
        assert!(matches!(
            s.revoke_token("tok-none").await,
            Err(StoreError::NotFound(_))
        ));
    })
    .await;
}

#[tokio::test]
async fn sites_items_and_uniqueness() {
    on_each_backend(|s| async move {
        let a = site("onprem", SiteRole::Primary);
        let b = site("cloud", SiteRole::Recovery);
        s.insert_site(&a).await.unwrap();
        s.insert_site(&b).await.unwrap();
        let dup = site("onprem", SiteRole::Recovery);
        assert!(matches!(
            s.insert_site(&dup).await,
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(s.sites().await.unwrap().len(), 2);
        assert_eq!(s.site("cloud").await.unwrap().unwrap().id, b.id);
        assert_eq!(s.site(&a.id).await.unwrap().unwrap().name, "onprem");

        let mut it = item("vm1", &a, &b);
        s.insert_item(&it).await.unwrap();
        assert!(matches!(
            s.insert_item(&item("vm1", &a, &b)).await,
            Err(StoreError::Conflict(_))
        ));
        it.state = ItemState {
            phase: Phase::CommitPending,
            direction: Direction::Forward,
        };
        it.group_id = Some("grp-1".into());
        s.put_item(&it).await.unwrap();
        let back = s.item("vm1").await.unwrap().unwrap();
        assert_eq!(back.state, it.state);
        assert_eq!(
            back.active_site,
            SiteRole::Recovery,
            "active site follows the state"
        );
        assert_eq!(s.items_in_group("grp-1").await.unwrap().len(), 1);
        assert_eq!(s.count(Table::Items).await.unwrap(), 1);
    })
    .await;
}

#[tokio::test]
async fn points_are_listed_newest_first() {
    on_each_backend(|s| async move {
        let a = site("a", SiteRole::Primary);
        let b = site("b", SiteRole::Recovery);
        s.insert_site(&a).await.unwrap();
        s.insert_site(&b).await.unwrap();
        let it = item("vm", &a, &b);
        s.insert_item(&it).await.unwrap();
        for (id, t) in [
            ("p1", "2026-01-01T00:00:01.000Z"),
            ("p3", "2026-01-01T00:00:03.000Z"),
            ("p2", "2026-01-01T00:00:02.000Z"),
        ] {
            s.insert_point(&RecoveryPoint {
                id: id.into(),
                item_id: it.id.clone(),
                time: t.into(),
                kind: PointKind::CrashConsistent,
                group_marker: None,
                barrier_ns: None,
            })
            .await
            .unwrap();
        }
        let ids: Vec<_> = s
            .points(&it.id)
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(ids, ["p3", "p2", "p1"]);
        assert!(s.point(&it.id, "p2").await.unwrap().is_some());
        assert!(s.point(&it.id, "p9").await.unwrap().is_none());
    })
    .await;
}

#[tokio::test]
async fn job_history_filters() {
    on_each_backend(|s| async move {
        let t = |n: u32| format!("2026-03-0{n}T10:00:00.000Z");
        let mut j1 = job("item-a", &t(1), JobState::Succeeded);
        j1.plan_id = Some("plan-1".into());
        let j2 = job("item-a", &t(2), JobState::Running);
        let j3 = job("item-b", &t(3), JobState::Waiting);
        for j in [&j1, &j2, &j3] {
            s.insert_job(j).await.unwrap();
        }
        let ids = |v: Vec<Job>| v.into_iter().map(|j| j.id).collect::<Vec<_>>();
        assert_eq!(
            ids(s.jobs(&JobFilter::default()).await.unwrap()),
            [j3.id.clone(), j2.id.clone(), j1.id.clone()]
        );
        let f = JobFilter {
            item_id: Some("item-a".into()),
            ..Default::default()
        };
        assert_eq!(
            ids(s.jobs(&f).await.unwrap()),
            [j2.id.clone(), j1.id.clone()]
        );
        let f = JobFilter {
            state: Some(JobState::Waiting),
            ..Default::default()
        };
        assert_eq!(ids(s.jobs(&f).await.unwrap()), vec![j3.id.clone()]);
        let f = JobFilter {
            plan_id: Some("plan-1".into()),
            ..Default::default()
        };
        assert_eq!(ids(s.jobs(&f).await.unwrap()), vec![j1.id.clone()]);
        let f = JobFilter {
            since: Some(t(2)),
            until: Some(t(2)),
            ..Default::default()
        };
        assert_eq!(ids(s.jobs(&f).await.unwrap()), vec![j2.id.clone()]);
        let f = JobFilter {
            limit: Some(1),
            ..Default::default()
        };
        assert_eq!(ids(s.jobs(&f).await.unwrap()), vec![j3.id.clone()]);
        // Open jobs, oldest first; a finished job is not open.
        assert_eq!(
            ids(s.open_jobs().await.unwrap()),
            [j2.id.clone(), j3.id.clone()]
        );
        let mut j2b = j2.clone();
        j2b.state = JobState::Failed;
        s.put_job(&j2b).await.unwrap();
        assert_eq!(ids(s.open_jobs().await.unwrap()), vec![j3.id.clone()]);
        assert_eq!(
            s.job(&j2.id).await.unwrap().unwrap().state,
            JobState::Failed
        );
    })
    .await;
}

#[tokio::test]
async fn components_and_policies_round_trip() {
    on_each_backend(|s| async move {
        let a = site("a", SiteRole::Primary);
        s.insert_site(&a).await.unwrap();
        let mut c = Component {
            id: new_id("mt"),
            role: ComponentRole::MasterTarget,
            name: "mt1".into(),
            site_id: a.id.clone(),
            version: "0.1.0".into(),
            enrolled_at: rebound_control::time::now(),
            last_heartbeat: None,
            healthy: false,
            process_server: None,
            master_target: None,
            agent: None,
            data_addr: None,
        };
        s.insert_component(&c).await.unwrap();
        c.last_heartbeat = Some(rebound_control::time::now());
        s.put_component(&c).await.unwrap();
        assert_eq!(s.component(&c.id).await.unwrap().unwrap(), c);
        assert_eq!(s.components().await.unwrap().len(), 1);

        let p = Policy {
            id: new_id("pol"),
            name: "gold".into(),
            rpo_threshold_secs: 300,
            retention_secs: 86400,
            app_consistent_frequency_secs: 3600,
            read_only: false,
            failback_policy_id: None,
            parent_policy_id: None,
            created_at: rebound_control::time::now(),
        };
        s.insert_policy(&p).await.unwrap();
        assert_eq!(s.policy("gold").await.unwrap().unwrap(), p);
        assert_eq!(s.policies().await.unwrap(), vec![p]);
    })
    .await;
}

#[tokio::test]
async fn data_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let url = Store::sqlite_url(dir.path());
    let s = Store::open(&url).await.unwrap();
    s.insert_site(&site("keep", SiteRole::Primary))
        .await
        .unwrap();
    s.close().await;
    let s = Store::open(&url).await.unwrap();
    assert_eq!(
        s.sites().await.unwrap().len(),
        1,
        "migrations run once, data kept"
    );
}

#[tokio::test]
async fn sqlite_backup_is_a_consistent_copy() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&Store::sqlite_url(dir.path())).await.unwrap();
    s.insert_site(&site("a", SiteRole::Primary)).await.unwrap();
    let copy = dir.path().join("backup.db");
    s.backup_to(&copy).await.unwrap();
    s.insert_site(&site("after", SiteRole::Recovery))
        .await
        .unwrap();
    let restored_dir = tempfile::tempdir().unwrap();
    std::fs::copy(&copy, restored_dir.path().join(rebound_store::DB_FILE)).unwrap();
    let r = Store::open(&Store::sqlite_url(restored_dir.path()))
        .await
        .unwrap();
    let names: Vec<_> = r
        .sites()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(
        names,
        ["a"],
        "the backup holds what was there when it was taken"
    );
}
