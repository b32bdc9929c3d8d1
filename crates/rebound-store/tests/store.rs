#![allow(clippy::unwrap_used)]
//! One suite, two databases: every test runs on a fresh SQLite file, and
//! again on PostgreSQL when DATABASE_URL is set (scripts/postgres-test-cluster
//! starts a throw-away cluster and prints one). Each PostgreSQL run gets its
//! own fresh database.

use rebound_api::*;
use rebound_store::{Cell, JobFilter, Store, StoreError, Table, new_id};
use std::collections::BTreeSet;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;

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
    let (url, _) = new_postgres_db(url).await;
    Store::open(&url).await.unwrap()
}

/// A new, uniquely named database on the cluster of `url`: (its URL, its name).
async fn new_postgres_db(url: &str) -> (String, String) {
    use sqlx::Connection;
    let name = format!("rebound_test_{}", rebound_store::random_hex(6));
    let mut admin = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    admin.close().await.unwrap();
    // Replace the database name in the URL (the part after the last '/', before '?').
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let cut = base.rfind('/').unwrap();
    (format!("{}/{name}{query}", &base[..cut]), name)
}

async fn drop_postgres_db(url: &str, name: &str) {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
    admin.close().await.unwrap();
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
        replication: None,
        replica_progress: None,
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
            crash_consistent_frequency_secs: DEFAULT_CRASH_CONSISTENT_SECS,
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

/// Secrets of the filled store, to check that their hashes survive.
struct Filled {
    live_secret: &'static str,
    revoked_secret: &'static str,
    items: Vec<Item>,
}

/// Something of every kind in the store: meta, tokens (one revoked, one of a
/// component), sites, a component, policies, a group, a plan, items (one in a
/// job, one in the group), points and jobs.
async fn fill(s: &Store) -> Filled {
    s.set_meta(
        "registration_key_hash",
        &rebound_store::hash_secret("rbk_key"),
    )
    .await
    .unwrap();
    s.set_meta("initialised_at", "2026-01-01T00:00:00.000Z")
        .await
        .unwrap();
    let a = site("onprem", SiteRole::Primary);
    let b = site("cloud", SiteRole::Recovery);
    s.insert_site(&a).await.unwrap();
    s.insert_site(&b).await.unwrap();
    let comp = Component {
        id: new_id("ps"),
        role: ComponentRole::ProcessServer,
        name: "ps1".into(),
        site_id: a.id.clone(),
        version: "0.1.0".into(),
        enrolled_at: rebound_control::time::now(),
        last_heartbeat: Some(rebound_control::time::now()),
        healthy: true,
        process_server: None,
        master_target: None,
        agent: None,
        data_addr: Some("10.0.0.1:9000".into()),
    };
    s.insert_component(&comp).await.unwrap();
    s.insert_token("admin", Scope::Admin, "rbt_live", None)
        .await
        .unwrap();
    s.insert_token("ps1", Scope::ProcessServer, "rbt_ps", Some(&comp.id))
        .await
        .unwrap();
    let gone = s
        .insert_token("old", Scope::Viewer, "rbt_revoked", None)
        .await
        .unwrap();
    s.revoke_token(&gone.id).await.unwrap();
    let gold = Policy {
        id: new_id("pol"),
        name: "gold".into(),
        rpo_threshold_secs: 300,
        retention_secs: 86400,
        app_consistent_frequency_secs: 3600,
        crash_consistent_frequency_secs: DEFAULT_CRASH_CONSISTENT_SECS,
        read_only: false,
        failback_policy_id: None,
        parent_policy_id: None,
        created_at: rebound_control::time::now(),
    };
    s.insert_policy(&gold).await.unwrap();
    let mut items = Vec::new();
    for n in 0..3 {
        let mut it = item(&format!("vm{n}"), &a, &b);
        it.policy_id = Some(gold.id.clone());
        it.state = ItemState {
            phase: Phase::Protected,
            direction: Direction::Forward,
        };
        s.insert_item(&it).await.unwrap();
        for p in 0..3u64 {
            s.insert_point(&RecoveryPoint {
                id: format!("p{p}"),
                item_id: it.id.clone(),
                time: format!("2026-01-01T00:00:0{p}.000Z"),
                kind: PointKind::CrashConsistent,
                group_marker: None,
                barrier_ns: Some(p * 1000),
            })
            .await
            .unwrap();
        }
        items.push(it);
    }
    let g = Group {
        id: new_id("grp"),
        name: "web".into(),
        item_ids: vec![items[1].id.clone()],
        created_at: rebound_control::time::now(),
    };
    s.insert_group(&g).await.unwrap();
    items[1].group_id = Some(g.id.clone());
    s.put_item(&items[1]).await.unwrap();
    let done = job(
        &items[2].id,
        "2026-02-01T00:00:00.000Z",
        JobState::Succeeded,
    );
    s.insert_job(&done).await.unwrap();
    let running = job(&items[0].id, "2026-02-02T00:00:00.000Z", JobState::Running);
    s.insert_job(&running).await.unwrap();
    items[0].job_id = Some(running.id.clone());
    s.put_item(&items[0]).await.unwrap();
    Filled {
        live_secret: "rbt_live",
        revoked_secret: "rbt_revoked",
        items,
    }
}

/// The dump with rows in a canonical order (key order differs with the
/// database's collation).
async fn canonical_dump(s: &Store) -> Vec<(String, Vec<String>)> {
    s.dump()
        .await
        .unwrap()
        .into_iter()
        .map(|(t, rows)| {
            let mut rows: Vec<String> = rows.iter().map(|r| format!("{r:?}")).collect();
            rows.sort();
            (t, rows)
        })
        .collect()
}

/// `r` holds exactly what `s` holds, object by object and row by row.
async fn assert_same(s: &Store, r: &Store, f: &Filled) {
    assert_eq!(canonical_dump(r).await, canonical_dump(s).await);
    assert_eq!(r.sites().await.unwrap(), s.sites().await.unwrap());
    assert_eq!(r.components().await.unwrap(), s.components().await.unwrap());
    assert_eq!(r.policies().await.unwrap(), s.policies().await.unwrap());
    assert_eq!(r.groups().await.unwrap(), s.groups().await.unwrap());
    assert_eq!(r.plans().await.unwrap(), s.plans().await.unwrap());
    assert_eq!(r.items().await.unwrap(), s.items().await.unwrap());
    assert_eq!(r.items().await.unwrap().len(), f.items.len());
    for it in &f.items {
        assert_eq!(
            r.points(&it.id).await.unwrap(),
            s.points(&it.id).await.unwrap()
        );
        assert_eq!(r.points(&it.id).await.unwrap().len(), 3);
    }
    let all = JobFilter::default();
    assert_eq!(r.jobs(&all).await.unwrap(), s.jobs(&all).await.unwrap());
    assert_eq!(r.open_jobs().await.unwrap(), s.open_jobs().await.unwrap());
    let tokens = |v: Vec<TokenInfo>| {
        v.into_iter()
            .map(|t| (t.id, t.name, t.scope, t.created_at))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        tokens(r.list_tokens().await.unwrap()),
        tokens(s.list_tokens().await.unwrap())
    );
    let (tok, _) = r.token_by_secret(f.live_secret).await.unwrap().unwrap();
    assert_eq!(tok.scope, Scope::Admin);
    let (_, comp) = r.token_by_secret("rbt_ps").await.unwrap().unwrap();
    assert!(comp.is_some(), "a component's token keeps its component");
    assert!(r.token_by_secret(f.revoked_secret).await.unwrap().is_none());
    assert_eq!(
        r.meta("registration_key_hash").await.unwrap(),
        Some(rebound_store::hash_secret("rbk_key"))
    );
    assert_eq!(
        r.meta("initialised_at").await.unwrap(),
        s.meta("initialised_at").await.unwrap()
    );
    assert_eq!(r.count(Table::Jobs).await.unwrap(), 2);
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect()
}

#[tokio::test]
async fn backup_restores_everything_on_both_databases() {
    on_each_backend(|s| async move {
        let f = fill(&s).await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("backup.db");
        s.backup_to(&file).await.unwrap();
        assert!(file.is_file());
        assert!(leftovers(dir.path()).is_empty(), "no partial file is left");

        // The file itself is a SQLite database of the same schema.
        let plain = tempfile::tempdir().unwrap();
        std::fs::copy(&file, plain.path().join(rebound_store::DB_FILE)).unwrap();
        let r = Store::open(&Store::sqlite_url(plain.path())).await.unwrap();
        assert_same(&s, &r, &f).await;
        r.close().await;

        // Loaded row by row into an empty SQLite database.
        let fresh = tempfile::tempdir().unwrap();
        let r = Store::open(&Store::sqlite_url(fresh.path())).await.unwrap();
        r.restore_from(&file).await.unwrap();
        assert_same(&s, &r, &f).await;
        // A second restore into it is refused: it holds a server now.
        let again = r.restore_from(&file).await.unwrap_err();
        assert!(matches!(again, StoreError::Backup(_)), "{again}");
        assert!(
            again.to_string().contains("configuration server"),
            "{again}"
        );
        r.close().await;

        // Into an empty PostgreSQL database.
        if let Ok(url) = std::env::var("DATABASE_URL") {
            let (db_url, name) = new_postgres_db(&url).await;
            let r = Store::open(&db_url).await.unwrap();
            r.restore_from(&file).await.unwrap();
            assert_same(&s, &r, &f).await;
            let again = r.restore_from(&file).await.unwrap_err();
            assert!(matches!(again, StoreError::Backup(_)), "{again}");
            r.close().await;
            drop_postgres_db(&url, &name).await;
        }

        // The destination is never overwritten half-written; a file that is
        // not a backup is refused.
        let junk = dir.path().join("junk.db");
        std::fs::write(&junk, b"not a database").unwrap();
        let empty = tempfile::tempdir().unwrap();
        let r = Store::open(&Store::sqlite_url(empty.path())).await.unwrap();
        assert!(r.restore_from(&junk).await.is_err());
        assert!(r.restore_from(&dir.path().join("absent.db")).await.is_err());
        assert_eq!(r.count(Table::Items).await.unwrap(), 0);
        r.close().await;
    })
    .await;
}

#[tokio::test]
async fn failed_backup_leaves_no_file() {
    on_each_backend(|s| async move {
        fill(&s).await;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("missing-dir").join("backup.db");
        assert!(s.backup_to(&dest).await.is_err());
        assert!(!dest.exists());
        assert!(leftovers(dir.path()).is_empty());
    })
    .await;
}

/// Writers go on while backups are taken from PostgreSQL: every backup is one
/// snapshot, so a job never references an item the backup lacks, an item
/// never references a job the backup lacks, and every point has its item.
#[tokio::test]
async fn postgres_backup_is_one_snapshot_under_concurrent_writes() {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        return;
    };
    let (db_url, name) = new_postgres_db(&url).await;
    let s = Arc::new(Store::open(&db_url).await.unwrap());
    let a = site("a", SiteRole::Primary);
    let b = site("b", SiteRole::Recovery);
    s.insert_site(&a).await.unwrap();
    s.insert_site(&b).await.unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (s, a, b, stop) = (s.clone(), a.clone(), b.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 2000 {
                let mut it = item(&format!("w{w}-{n}"), &a, &b);
                s.insert_item(&it).await.unwrap();
                let j = job(&it.id, &rebound_control::time::now(), JobState::Running);
                s.insert_job(&j).await.unwrap();
                it.job_id = Some(j.id.clone());
                s.put_item(&it).await.unwrap();
                s.insert_point(&RecoveryPoint {
                    id: "p".into(),
                    item_id: it.id.clone(),
                    time: rebound_control::time::now(),
                    kind: PointKind::CrashConsistent,
                    group_marker: None,
                    barrier_ns: None,
                })
                .await
                .unwrap();
                n += 1;
            }
            n
        }));
    }
    let dir = tempfile::tempdir().unwrap();
    let mut sizes = Vec::new();
    for k in 0..6 {
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        let file = dir.path().join(format!("b{k}.db"));
        s.backup_to(&file).await.unwrap();
        let copy = tempfile::tempdir().unwrap();
        std::fs::copy(&file, copy.path().join(rebound_store::DB_FILE)).unwrap();
        let r = Store::open(&Store::sqlite_url(copy.path())).await.unwrap();
        let items = r.items().await.unwrap();
        let ids: BTreeSet<String> = items.iter().map(|i| i.id.clone()).collect();
        let jobs = r
            .jobs(&JobFilter {
                limit: Some(10_000),
                ..Default::default()
            })
            .await
            .unwrap();
        let job_ids: BTreeSet<String> = jobs.iter().map(|j| j.id.clone()).collect();
        for j in &jobs {
            let item_id = j.item_id.as_deref().unwrap();
            assert!(
                ids.contains(item_id),
                "backup {k}: job {} without its item",
                j.id
            );
        }
        for it in &items {
            if let Some(j) = &it.job_id {
                assert!(
                    job_ids.contains(j),
                    "backup {k}: item {} without its job",
                    it.id
                );
            }
        }
        let dump = r.dump().await.unwrap();
        let (_, points) = dump.iter().find(|(t, _)| t == "points").unwrap();
        for p in points {
            let (_, item_id) = p.iter().find(|(c, _)| c == "item_id").unwrap();
            let Cell::Text(item_id) = item_id else {
                panic!("item_id is text")
            };
            assert!(ids.contains(item_id), "backup {k}: point without its item");
        }
        sizes.push(items.len());
        r.close().await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut written = 0;
    for w in writers {
        written += w.await.unwrap();
    }
    assert!(written > 0);
    assert!(
        sizes.windows(2).all(|w| w[0] <= w[1]),
        "later backups hold at least as much: {sizes:?}"
    );
    s.close().await;
    drop_postgres_db(&url, &name).await;
}

#[tokio::test]
async fn replication_facts_are_not_stored_but_replica_progress_is() {
    on_each_backend(|s| async move {
        let a = site("onprem", SiteRole::Primary);
        let b = site("cloud", SiteRole::Recovery);
        s.insert_site(&a).await.unwrap();
        s.insert_site(&b).await.unwrap();
        let mut it = item("vm1", &a, &b);
        let facts = ReplicationFacts {
            state: ReplicationState::Streaming,
            backlog_bytes: 0,
            resync_bytes: 0,
            eta_secs: None,
            captured_seq: 3,
            shipped_seq: 3,
            applied_seq: 2,
        };
        let progress = ReplicaProgress {
            agent_id: "agent-1".into(),
            applied_seq: 2,
            gap: Some(StreamGap {
                expected_seq: 3,
                found_seq: None,
                reason: "nothing complete arrived".into(),
            }),
            updated_at: Some(rebound_control::time::now()),
        };
        it.replication = Some(facts.clone());
        it.replica_progress = Some(progress.clone());
        s.insert_item(&it).await.unwrap();
        let back = s.item("vm1").await.unwrap().unwrap();
        assert_eq!(back.replication, None, "derived from the agent, not kept");
        assert_eq!(back.replica_progress.as_ref(), Some(&progress));
        s.put_item(&it).await.unwrap();
        let back = s.item("vm1").await.unwrap().unwrap();
        assert_eq!(back.replication, None);
        assert_eq!(back.replica_progress, Some(progress));
    })
    .await;
}

/// Documents written before a field existed read with its default.
#[tokio::test]
async fn documents_without_the_new_fields_read_with_defaults() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&Store::sqlite_url(dir.path())).await.unwrap();
    let a = site("onprem", SiteRole::Primary);
    let b = site("cloud", SiteRole::Recovery);
    s.insert_site(&a).await.unwrap();
    s.insert_site(&b).await.unwrap();
    let p = Policy {
        id: new_id("pol"),
        name: "gold".into(),
        rpo_threshold_secs: 300,
        retention_secs: 86400,
        app_consistent_frequency_secs: 3600,
        crash_consistent_frequency_secs: 30,
        read_only: false,
        failback_policy_id: None,
        parent_policy_id: None,
        created_at: rebound_control::time::now(),
    };
    s.insert_policy(&p).await.unwrap();
    let it = item("vm1", &a, &b);
    s.insert_item(&it).await.unwrap();

    // Rewrite both documents as an older release wrote them.
    let strip = |v: &mut serde_json::Value, fields: &[&str]| {
        let o = v.as_object_mut().unwrap();
        for f in fields {
            assert!(o.remove(*f).is_some(), "{f} was stored");
        }
    };
    let mut old_policy = serde_json::to_value(&p).unwrap();
    strip(&mut old_policy, &["crash_consistent_frequency_secs"]);
    let mut old_item = serde_json::to_value(s.item("vm1").await.unwrap().unwrap()).unwrap();
    strip(&mut old_item, &["replication", "replica_progress"]);
    let mut conn = sqlx::SqliteConnection::connect(&Store::sqlite_url(dir.path()))
        .await
        .unwrap();
    for (table, id, doc) in [("policies", &p.id, old_policy), ("items", &it.id, old_item)] {
        sqlx::query(&format!("UPDATE {table} SET doc = $1 WHERE id = $2"))
            .bind(doc.to_string())
            .bind(id)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    conn.close().await.unwrap();

    let back = s.policy("gold").await.unwrap().unwrap();
    assert_eq!(
        back.crash_consistent_frequency_secs,
        DEFAULT_CRASH_CONSISTENT_SECS
    );
    let back = s.item("vm1").await.unwrap().unwrap();
    assert_eq!((back.replication, back.replica_progress), (None, None));
    s.close().await;
}
