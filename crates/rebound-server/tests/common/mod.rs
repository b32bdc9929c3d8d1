//! A real server on 127.0.0.1:0 over a real SQLite file, and a small client
//! that plays the operator and the components (over HTTP, as they would).

#![allow(dead_code)]

use rebound_api::*;
use rebound_server::Config;
use rebound_store::Store;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct Server {
    pub base: String,
    pub dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

pub fn fast_config() -> Config {
    Config {
        heartbeat_limit: Duration::from_secs(60),
        step_timeout: Duration::from_secs(30),
        engine_tick: Duration::from_millis(50),
    }
}

impl Server {
    /// Start a server on an initialised data directory.
    pub async fn start(dir: &Path, config: Config) -> Server {
        Server::start_url(&Store::sqlite_url(dir), dir, config).await
    }

    /// Start a server on an initialised database at `url` (`dir` is kept
    /// for the caller's files).
    pub async fn start_url(url: &str, dir: &Path, config: Config) -> Server {
        let store = rebound_server::open_initialised(url).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(rebound_server::serve(store, listener, config, async {
            let _ = rx.await;
        }));
        Server {
            base: format!("http://{addr}/api/v1"),
            dir: dir.to_path_buf(),
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stop serving (the database stays).
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

/// Initialise a fresh data directory: (admin token, registration key).
pub async fn init(dir: &Path) -> (String, String) {
    let store = Store::open(&Store::sqlite_url(dir)).await.unwrap();
    let i = rebound_server::init(&store).await.unwrap();
    store.close().await;
    (i.admin_token, i.registration_key)
}

#[derive(Clone)]
pub struct Client {
    pub base: String,
    pub token: Option<String>,
    http: reqwest::Client,
}

pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    pub fn ok<T: DeserializeOwned>(self) -> T {
        assert!(
            (200..300).contains(&self.status),
            "expected success, got {}: {}",
            self.status,
            self.body
        );
        serde_json::from_value(self.body).unwrap()
    }

    /// Assert an error answer with the API's shape and this code.
    pub fn err(self, status: u16, code: u32) -> ApiError {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.body["code"], code, "{}", self.body);
        let e: ApiError = serde_json::from_value(self.body).unwrap();
        assert!(!e.message.is_empty() && !e.remedy.is_empty());
        e
    }
}

impl Client {
    pub fn new(base: &str, token: Option<&str>) -> Client {
        Client {
            base: base.to_string(),
            token: token.map(str::to_string),
            http: reqwest::Client::new(),
        }
    }

    pub fn with_token(&self, token: &str) -> Client {
        Client {
            token: Some(token.to_string()),
            ..self.clone()
        }
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Answer {
        let rb = match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        };
        let resp = rb.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"))
        };
        Answer { status, body }
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn post<B: Serialize>(&self, path: &str, body: &B) -> Answer {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    pub async fn put<B: Serialize>(&self, path: &str, body: &B) -> Answer {
        self.send(self.http.put(format!("{}{path}", self.base)).json(body))
            .await
    }
}

pub fn mt_facts(os: OsType, host: &str) -> MasterTargetFacts {
    MasterTargetFacts {
        os,
        host: host.into(),
        host_running: true,
        disk_slots_used: 0,
        disk_slot_limit: 60,
        retention_volumes: vec![RetentionVolume {
            path: "/mnt/retention".into(),
            filesystem: "ext4".into(),
            capacity_bytes: 100 << 30,
            free_bytes: 100 << 30,
            locked: false,
            in_use: false,
            system_volume: false,
        }],
        datastores: vec![Datastore {
            name: "ds1".into(),
            kind: "local-dir".into(),
            supported: true,
            capacity_bytes: 500 << 30,
            free_bytes: 500 << 30,
            accessible: true,
        }],
        disk_uuids: vec!["mt-disk-uuid".into()],
        snapshots_present: false,
        machines: vec![],
    }
}

/// A deployment: two sites, a master target on each, a process server, an
/// agent, a policy and one item `vm1`.
pub struct World {
    pub admin: Client,
    pub key: String,
    pub primary: Site,
    pub recovery: Site,
    pub mt_primary: (Credentials, Client),
    pub mt_recovery: (Credentials, Client),
    pub ps: (Credentials, Client),
    pub agent: (Credentials, Client),
    pub policy: Policy,
    pub item: Item,
}

pub async fn enrol(
    admin: &Client,
    key: &str,
    role: ComponentRole,
    name: &str,
    site: &str,
) -> (Credentials, Client) {
    let anon = Client::new(&admin.base, None);
    let creds: Credentials = anon
        .post(
            "/enrol",
            &Enrolment {
                registration_key: key.into(),
                role,
                name: name.into(),
                site: site.into(),
                version: "0.1.0".into(),
            },
        )
        .await
        .ok();
    let c = admin.with_token(&creds.token);
    (creds, c)
}

pub async fn heartbeat_all(w: &World) {
    let send = |c: &(Credentials, Client), hb: Heartbeat| {
        let c = c.clone();
        async move {
            let _: Component =
                c.1.post(&format!("/components/{}/heartbeat", c.0.component_id), &hb)
                    .await
                    .ok();
        }
    };
    send(
        &w.mt_primary,
        Heartbeat {
            version: "0.1.0".into(),
            master_target: Some(mt_facts(OsType::Linux, "host-a")),
            ..Default::default()
        },
    )
    .await;
    send(
        &w.mt_recovery,
        Heartbeat {
            version: "0.1.0".into(),
            master_target: Some(mt_facts(OsType::Linux, "host-b")),
            ..Default::default()
        },
    )
    .await;
    send(
        &w.ps,
        Heartbeat {
            version: "0.1.0".into(),
            process_server: Some(ProcessServerFacts::default()),
            ..Default::default()
        },
    )
    .await;
    send(
        &w.agent,
        Heartbeat {
            version: "0.1.0".into(),
            agent: Some(running_agent(None)),
            ..Default::default()
        },
    )
    .await;
}

pub async fn world(base: &str, admin_token: &str, key: &str) -> World {
    let admin = Client::new(base, Some(admin_token));
    let primary: Site = admin
        .post(
            "/sites",
            &NewSite {
                name: "onprem".into(),
                role: SiteRole::Primary,
            },
        )
        .await
        .ok();
    let recovery: Site = admin
        .post(
            "/sites",
            &NewSite {
                name: "cloud".into(),
                role: SiteRole::Recovery,
            },
        )
        .await
        .ok();
    let mt_primary = enrol(&admin, key, ComponentRole::MasterTarget, "mt-a", "onprem").await;
    let mt_recovery = enrol(&admin, key, ComponentRole::MasterTarget, "mt-b", "cloud").await;
    let ps = enrol(&admin, key, ComponentRole::ProcessServer, "ps-b", "cloud").await;
    let agent = enrol(&admin, key, ComponentRole::Agent, "vm1-agent", "onprem").await;
    let policies: Vec<Policy> = admin
        .post(
            "/policies",
            &NewPolicy {
                name: "gold".into(),
                rpo_threshold_secs: 300,
                retention_secs: 72 * 3600,
                app_consistent_frequency_secs: 4 * 3600,
                crash_consistent_frequency_secs: DEFAULT_CRASH_CONSISTENT_SECS,
            },
        )
        .await
        .ok();
    let item: Item = admin
        .post(
            "/items",
            &NewItem {
                name: "vm1".into(),
                os: OsType::Linux,
                disks: vec![Disk {
                    name: "root".into(),
                    size_bytes: 10 << 30,
                    uuid: "vm1-root".into(),
                }],
                primary_site: "onprem".into(),
                recovery_site: "cloud".into(),
                born_at: None,
                agent_id: Some(agent.0.component_id.clone()),
            },
        )
        .await
        .ok();
    let w = World {
        admin,
        key: key.into(),
        primary,
        recovery,
        mt_primary,
        mt_recovery,
        ps,
        agent,
        policy: policies[0].clone(),
        item,
    };
    heartbeat_all(&w).await;
    w
}

impl World {
    pub fn components(&self) -> Vec<&Client> {
        vec![
            &self.mt_primary.1,
            &self.mt_recovery.1,
            &self.ps.1,
            &self.agent.1,
        ]
    }

    /// Play every component: report each running step assigned to it as done,
    /// until the job ends or waits for an operator.
    pub async fn drive(&self, job_id: &str) -> Job {
        for _ in 0..200 {
            let job: Job = self.admin.get(&format!("/jobs/{job_id}")).await.ok();
            if job.state.is_finished() || job.state == JobState::Waiting {
                return job;
            }
            let mut reported = false;
            for c in self.components() {
                let work: Vec<WorkItem> = c.get("/work").await.ok();
                for w in work.into_iter().filter(|w| w.job_id == job_id) {
                    let rep = StepReport {
                        state: StepState::Running,
                        bytes_done: 512,
                        bytes_total: 1024,
                        error_code: None,
                        message: None,
                    };
                    let _: Job = c
                        .post(&format!("/jobs/{job_id}/steps/{}", w.step_index), &rep)
                        .await
                        .ok();
                    let rep = StepReport {
                        state: StepState::Done,
                        bytes_done: 1024,
                        bytes_total: 1024,
                        error_code: None,
                        message: None,
                    };
                    let _: Job = c
                        .post(&format!("/jobs/{job_id}/steps/{}", w.step_index), &rep)
                        .await
                        .ok();
                    reported = true;
                }
            }
            if !reported {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!("job {job_id} did not end");
    }

    pub async fn act(&self, req: &ActionRequest) -> Answer {
        self.admin
            .post(&format!("/items/{}/actions", self.item.id), req)
            .await
    }

    pub async fn item(&self) -> Item {
        self.admin
            .get(&format!("/items/{}", self.item.id))
            .await
            .ok()
    }

    pub fn enable_request(&self) -> ActionRequest {
        ActionRequest {
            policy_id: Some(self.policy.id.clone()),
            process_server_id: Some(self.ps.0.component_id.clone()),
            master_target_id: Some(self.mt_recovery.0.component_id.clone()),
            datastore: Some("ds1".into()),
            retention_volume: Some("/mnt/retention".into()),
            ..ActionRequest::new(Action::EnableProtection)
        }
    }

    /// Enable protection and drive the job to success.
    pub async fn protect(&self) {
        let job: Job = self.act(&self.enable_request()).await.ok();
        let job = self.drive(&job.id).await;
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    }
}

/// The facts of vm1's agent, running, with these replication facts.
pub fn running_agent(replication: Option<ReplicationFacts>) -> AgentFacts {
    AgentFacts {
        machine: "vm1".into(),
        running: true,
        suspended: false,
        sync_barrier: None,
        sync_barrier_ns: None,
        replication,
    }
}
