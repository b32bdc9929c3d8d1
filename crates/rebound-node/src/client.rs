//! A small blocking client of the configuration server's API, for the node
//! and agent loops (they run on threads, not on an async runtime).

use rebound_api::{
    ApiError, Component, ComponentRole, Credentials, Enrolment, Heartbeat, Item, Job,
    NewRecoveryPoint, RecoveryPoint, StepReport, WorkItem,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::Path;
use std::time::Duration;

/// What went wrong talking to the configuration server.
#[derive(Debug)]
pub enum CallError {
    /// The server answered with its error shape.
    Api { status: u16, error: ApiError },
    /// No answer (connection refused, timeout) or an unreadable one.
    Transport(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Api { status, error } => {
                write!(
                    f,
                    "configuration server: HTTP {status} E{} {}",
                    error.code, error.message
                )?;
                for x in &error.failures {
                    write!(f, "; E{} {}", x.code, x.message)?;
                }
                Ok(())
            }
            CallError::Transport(m) => write!(f, "configuration server unreachable: {m}"),
        }
    }
}

impl std::error::Error for CallError {}

pub type CallResult<T> = Result<T, CallError>;

/// A client bound to one server and (once enrolled) one token.
#[derive(Clone)]
pub struct Api {
    base: String,
    token: Option<String>,
    http: reqwest::blocking::Client,
}

impl Api {
    pub fn new(server: &str, token: Option<String>) -> Api {
        Api {
            base: server.trim_end_matches('/').to_string(),
            token,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap_or_else(|_| reqwest::blocking::Client::new()),
        }
    }

    pub fn with_token(&self, token: String) -> Api {
        Api {
            token: Some(token),
            ..self.clone()
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    fn send<T: DeserializeOwned>(&self, rb: reqwest::blocking::RequestBuilder) -> CallResult<T> {
        let rb = match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        };
        let resp = rb.send().map_err(|e| CallError::Transport(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .map_err(|e| CallError::Transport(e.to_string()))?;
        if status.is_success() {
            serde_json::from_slice(&body)
                .map_err(|e| CallError::Transport(format!("unreadable answer: {e}")))
        } else {
            let error = serde_json::from_slice::<ApiError>(&body).unwrap_or_else(|_| ApiError {
                code: 0,
                message: String::from_utf8_lossy(&body).into_owned(),
                remedy: String::new(),
                failures: Vec::new(),
            });
            Err(CallError::Api {
                status: status.as_u16(),
                error,
            })
        }
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> CallResult<T> {
        self.send(self.http.get(self.url(path)))
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> CallResult<T> {
        self.send(self.http.post(self.url(path)).json(body))
    }

    pub fn enrol(
        &self,
        registration_key: &str,
        role: ComponentRole,
        name: &str,
        site: &str,
    ) -> CallResult<Credentials> {
        self.post(
            "/enrol",
            &Enrolment {
                registration_key: registration_key.to_string(),
                role,
                name: name.to_string(),
                site: site.to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            },
        )
    }

    pub fn heartbeat(&self, id: &str, hb: &Heartbeat) -> CallResult<Component> {
        self.post(&format!("/components/{id}/heartbeat"), hb)
    }

    pub fn item(&self, key: &str) -> CallResult<Item> {
        self.get(&format!("/items/{key}"))
    }

    pub fn attach_agent(&self, item: &str) -> CallResult<Item> {
        self.post(&format!("/items/{item}/agent"), &serde_json::json!({}))
    }

    pub fn component(&self, id: &str) -> CallResult<Component> {
        self.get(&format!("/components/{id}"))
    }

    pub fn job(&self, id: &str) -> CallResult<Job> {
        self.get(&format!("/jobs/{id}"))
    }

    pub fn work(&self) -> CallResult<Vec<WorkItem>> {
        self.get("/work")
    }

    pub fn report(&self, job: &str, step: u32, r: &StepReport) -> CallResult<Job> {
        self.post(&format!("/jobs/{job}/steps/{step}"), r)
    }

    pub fn report_point(&self, item: &str, p: &NewRecoveryPoint) -> CallResult<RecoveryPoint> {
        self.post(&format!("/items/{item}/points"), p)
    }

    pub fn points(&self, item: &str) -> CallResult<Vec<RecoveryPoint>> {
        self.get(&format!("/items/{item}/points"))
    }

    /// How far this master target has applied an agent's stream.
    pub fn report_progress(
        &self,
        item: &str,
        p: &rebound_api::ReplicaProgress,
    ) -> CallResult<Item> {
        self.send(
            self.http
                .put(self.url(&format!("/items/{item}/replica-progress")))
                .json(p),
        )
    }

    pub fn policy(&self, id: &str) -> CallResult<rebound_api::Policy> {
        self.get(&format!("/policies/{id}"))
    }
}

/// A component's credentials, kept in a 0600 file so a restarted component
/// keeps its identity instead of enrolling again.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Identity {
    pub component_id: String,
    pub token: String,
}

impl Identity {
    pub fn load(path: &Path) -> Option<Identity> {
        let text = std::fs::read(path).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        let tmp = rebound_disk::crashsafe::temp_path(path);
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
        }
        rebound_disk::crashsafe::durable_rename(&tmp, path)
    }

    /// Load the identity at `path`, or enrol and save one.
    pub fn load_or_enrol(
        path: &Path,
        api: &Api,
        registration_key: &str,
        role: ComponentRole,
        name: &str,
        site: &str,
    ) -> anyhow::Result<Identity> {
        if let Some(id) = Identity::load(path) {
            return Ok(id);
        }
        let c = api.enrol(registration_key, role, name, site)?;
        let id = Identity {
            component_id: c.component_id,
            token: c.token,
        };
        id.save(path)?;
        Ok(id)
    }
}

/// The data plane's shared token, derived from the registration key: every
/// enrolled component holds the key, nobody without it can open a data port.
pub fn data_token(registration_key: &str) -> anyhow::Result<rebound_wire::Token> {
    let key = blake3::derive_key(
        "rebound 2026-11 data plane token",
        registration_key.as_bytes(),
    );
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    rebound_wire::Token::new(&hex).map_err(anyhow::Error::msg)
}
