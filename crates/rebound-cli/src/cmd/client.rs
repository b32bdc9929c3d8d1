//! The client commands of the configuration server: `sites`, `servers`,
//! `items`, `points`, `policies`, `groups`, `plans`, `protect`, `failover`,
//! `commit`, `reprotect`, `failback`, `complete`, `reverse-replicate`,
//! `cancel`, `jobs`. Human tables by default, `--output json` everywhere.
//!
//! The server is `--server URL` (or REBOUND_SERVER); the token comes from
//! REBOUND_TOKEN or `--token-file`. Errors of the server keep their codes.

use crate::failure::Failure;
use rebound_api::*;
use rebound_types::ErrorCode;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(clap::Args, Clone)]
pub struct Conn {
    /// The configuration server.
    #[arg(long, env = "REBOUND_SERVER", default_value = "http://127.0.0.1:8470")]
    server: String,
    /// A file holding the API token (else REBOUND_TOKEN).
    #[arg(long, env = "REBOUND_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// `table` (default) or `json`.
    #[arg(long, default_value = "table", value_parser = ["table", "json"])]
    output: String,
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// API tokens: list, create (shown once), revoke. Admin only.
    Tokens(Tokens),
    /// List sites, or add one.
    Sites(Sites),
    /// Process servers, master targets and agents, with their health.
    Servers(Servers),
    /// Replicated items: list, show, add, detach.
    Items(Items),
    /// Recovery points of an item, newest first.
    Points(Points),
    /// Replication policies (and their read-only failback policies).
    Policies(Policies),
    /// Replication groups.
    Groups(Groups),
    /// Recovery plans.
    Plans(Plans),
    /// Enable protection of an item (initial sync).
    Protect(Protect),
    /// Fail an item over to the recovery site.
    Failover(Failover),
    /// Commit a failover (or failback).
    Commit(Simple),
    /// Replicate a failed-over item back to the primary site.
    Reprotect(Reprotect),
    /// Fail a reverse-protected item back to the primary site (planned failover).
    Failback(Failover),
    /// Complete a two-phase failover or failback (phase 2).
    Complete(Simple),
    /// After a failback and commit: replicate primary → recovery again.
    ReverseReplicate(Reprotect),
    /// Cancel a job (the item returns to its state before the job).
    Cancel(Cancel),
    /// Job history, one job, or watch a job with a progress bar.
    Jobs(Jobs),
}

#[derive(clap::Args)]
pub struct Tokens {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: Option<TokensCmd>,
}
#[derive(clap::Subcommand)]
enum TokensCmd {
    /// Create a token for a person or a script; it is printed once.
    Create {
        name: String,
        /// admin, operator or viewer.
        #[arg(long, default_value = "operator")]
        scope: Scope,
    },
    /// Revoke a token by id (its holder is refused from now on).
    Revoke { id: String },
}

#[derive(clap::Args)]
pub struct Sites {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    add: Option<SitesCmd>,
}
#[derive(clap::Subcommand)]
enum SitesCmd {
    /// Add a site.
    Add {
        name: String,
        #[arg(long)]
        role: SiteRole,
    },
}

#[derive(clap::Args)]
pub struct Servers {
    #[command(flatten)]
    conn: Conn,
    /// Only this role: agent, process_server, master_target.
    #[arg(long)]
    role: Option<ComponentRole>,
}

#[derive(clap::Args)]
pub struct Items {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: Option<ItemsCmd>,
}
#[derive(clap::Subcommand)]
enum ItemsCmd {
    /// One item in detail.
    Show { item: String },
    /// Register a machine as an item.
    Add {
        name: String,
        #[arg(long, default_value = "linux")]
        os: OsType,
        /// NAME:SIZE_BYTES:UUID, once per disk.
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
        #[arg(long)]
        primary_site: String,
        #[arg(long)]
        recovery_site: String,
        /// Where the machine was created.
        #[arg(long)]
        born_at: Option<SiteRole>,
        /// The agent's component id.
        #[arg(long)]
        agent: Option<String>,
    },
    /// Record that an item was migrated, moved, deleted or unprotected.
    Detach {
        item: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(clap::Args)]
pub struct Points {
    #[command(flatten)]
    conn: Conn,
    item: String,
}

#[derive(clap::Args)]
pub struct Policies {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    add: Option<PoliciesCmd>,
}
#[derive(clap::Subcommand)]
enum PoliciesCmd {
    /// Add a replication policy (its failback policy is created with it).
    #[command(alias = "create")]
    Add {
        name: String,
        /// RPO threshold, seconds.
        #[arg(long)]
        rpo: u64,
        /// Recovery point retention, seconds.
        #[arg(long)]
        retention: u64,
        /// App-consistent snapshot frequency, seconds.
        #[arg(long)]
        app_consistent: u64,
        /// Crash-consistent recovery point frequency, seconds (1 to 3600).
        #[arg(long = "crash-consistent-secs", default_value_t = DEFAULT_CRASH_CONSISTENT_SECS)]
        crash_consistent: u64,
    },
}

#[derive(clap::Args)]
pub struct Groups {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    add: Option<GroupsCmd>,
}
#[derive(clap::Subcommand)]
enum GroupsCmd {
    /// Create a replication group of items.
    Add { name: String, items: Vec<String> },
}

#[derive(clap::Args)]
pub struct Plans {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    add: Option<PlansCmd>,
}
#[derive(clap::Subcommand)]
enum PlansCmd {
    /// Create a recovery plan; steps in order: `group:ITEM,ITEM`, `script:CMD` (run on the
    /// configuration server host; `script@SECS:CMD` sets its timeout, default 300 s), `manual:TEXT`.
    Add {
        name: String,
        #[arg(long = "step", required = true)]
        steps: Vec<String>,
    },
    /// Run an action for the whole plan (groups in order, operator steps wait).
    Run {
        plan: String,
        /// failover, failback, commit, reprotect, reverse_replicate, test_failover, …
        action: Action,
        #[arg(long)]
        kind: Option<FailoverKind>,
        #[arg(long)]
        sync: Option<SyncMode>,
        #[arg(long)]
        master_target: Option<String>,
        #[arg(long)]
        process_server: Option<String>,
        #[arg(long)]
        datastore: Option<String>,
        #[arg(long)]
        retention_volume: Option<String>,
        #[arg(long)]
        wait: bool,
    },
}

#[derive(clap::Args)]
pub struct Simple {
    #[command(flatten)]
    conn: Conn,
    item: String,
    /// Follow the job until it ends or waits for an operator.
    #[arg(long)]
    wait: bool,
}

#[derive(clap::Args)]
pub struct Protect {
    #[command(flatten)]
    conn: Conn,
    item: String,
    #[arg(long)]
    policy: String,
    #[arg(long)]
    process_server: String,
    #[arg(long)]
    master_target: String,
    #[arg(long)]
    datastore: String,
    /// The master target's retention volume (a directory it reports).
    #[arg(long)]
    retention_volume: String,
    #[arg(long)]
    wait: bool,
}

#[derive(clap::Args)]
pub struct Failover {
    #[command(flatten)]
    conn: Conn,
    item: String,
    /// Planned (source stopped, no data loss) or unplanned (from a recovery point).
    #[arg(long)]
    kind: Option<FailoverKind>,
    /// Planned only: `delta` (two phases) or `full` (download every disk).
    #[arg(long)]
    sync: Option<SyncMode>,
    #[arg(long)]
    location: Option<Location>,
    /// Recovery point: an id, latest (default), latest-processed,
    /// latest-app-consistent, latest-group (the latest point common to the
    /// item's replication group or the plan's items), group:MARKER, or
    /// at:RFC3339.
    #[arg(long)]
    point: Option<String>,
    #[arg(long)]
    datastore: Option<String>,
    #[arg(long)]
    wait: bool,
}

#[derive(clap::Args)]
pub struct Reprotect {
    #[command(flatten)]
    conn: Conn,
    item: String,
    #[arg(long)]
    master_target: String,
    #[arg(long)]
    process_server: Option<String>,
    #[arg(long)]
    datastore: String,
    /// The master target's retention volume (a directory it reports).
    #[arg(long)]
    retention_volume: String,
    /// Run as part of this recovery plan (required for replication groups).
    #[arg(long)]
    plan: Option<String>,
    #[arg(long)]
    wait: bool,
}

#[derive(clap::Args)]
pub struct Cancel {
    #[command(flatten)]
    conn: Conn,
    job: String,
}

#[derive(clap::Args)]
pub struct Jobs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: Option<JobsCmd>,
    #[arg(long)]
    item: Option<String>,
    #[arg(long)]
    plan: Option<String>,
    #[arg(long)]
    state: Option<JobState>,
    /// RFC 3339.
    #[arg(long)]
    since: Option<String>,
    #[arg(long)]
    until: Option<String>,
}
#[derive(clap::Subcommand)]
enum JobsCmd {
    /// One job with its steps.
    Show { job: String },
    /// Follow a job with a progress bar until it ends or waits for an operator.
    Watch { job: String },
    /// Go on past the operator step the job waits at.
    Continue { job: String },
}

// ---------------------------------------------------------------- HTTP

struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
    json: bool,
}

fn read_token(conn: &Conn) -> anyhow::Result<String> {
    let token = match &conn.token_file {
        Some(path) => std::fs::read_to_string(path).map_err(|e| {
            Failure::new(
                ErrorCode::TokenUnreadable,
                format!("{}: {e}", path.display()),
            )
        })?,
        None => std::env::var("REBOUND_TOKEN").map_err(|_| {
            Failure::new(
                ErrorCode::TokenUnreadable,
                "set REBOUND_TOKEN or pass --token-file with an API token",
            )
        })?,
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        return Err(Failure::new(ErrorCode::TokenUnreadable, "the API token is empty").into());
    }
    Ok(token)
}

impl Api {
    fn new(conn: &Conn) -> anyhow::Result<Api> {
        let base = format!("{}/api/v1", conn.server.trim_end_matches('/'));
        Ok(Api {
            base,
            token: read_token(conn)?,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()?,
            json: conn.output == "json",
        })
    }

    async fn call<T: DeserializeOwned>(&self, rb: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let bytes = self.send(rb).await?;
        serde_json::from_slice(&bytes).map_err(|e| {
            Failure::new(ErrorCode::BadResponse, format!("decoding the answer: {e}")).into()
        })
    }

    /// Send a request; the body of a successful answer, or its coded error.
    async fn send(&self, rb: reqwest::RequestBuilder) -> anyhow::Result<Vec<u8>> {
        let resp = rb.bearer_auth(&self.token).send().await.map_err(|e| {
            Failure::new(
                ErrorCode::ConnectFailed,
                format!(
                    "cannot reach the configuration server at {}: {e}",
                    self.base
                ),
            )
        })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| Failure::new(ErrorCode::PeerClosed, format!("reading the answer: {e}")))?;
        if !status.is_success() {
            return match serde_json::from_slice::<ApiError>(&bytes) {
                Ok(e) => Err(e.into()),
                Err(_) => Err(Failure::new(
                    ErrorCode::BadResponse,
                    format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)),
                )
                .into()),
            };
        }
        Ok(bytes.to_vec())
    }

    async fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.send(self.http.delete(format!("{}{path}", self.base)))
            .await
            .map(|_| ())
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.call(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }
}

/// Percent-encode a path segment or query value.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

// ---------------------------------------------------------------- output

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_uppercase()).collect());
    for r in rows {
        line(r);
    }
}

fn opt(s: &Option<String>) -> String {
    s.clone().unwrap_or_else(|| "-".into())
}

use crate::output::human_bytes;

fn human_secs(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

fn replication_state(s: ReplicationState) -> &'static str {
    match s {
        ReplicationState::Streaming => "streaming",
        ReplicationState::Backlogged => "backlogged",
        ReplicationState::Resyncing => "resyncing",
    }
}

/// `items show`: the rung of the replication ladder the item's agent is on,
/// and how far the master target has applied its stream.
fn replication_lines(i: &Item) -> Vec<String> {
    let mut out = Vec::new();
    match &i.replication {
        Some(r) => {
            out.push(format!(
                "replication: {}  backlog {}  resync {}  eta {}",
                replication_state(r.state),
                human_bytes(r.backlog_bytes),
                human_bytes(r.resync_bytes),
                r.eta_secs.map(human_secs).unwrap_or_else(|| "-".into())
            ));
            out.push(format!(
                "  seq: captured {}  shipped {}  applied {}",
                r.captured_seq, r.shipped_seq, r.applied_seq
            ));
        }
        None => out.push("replication: -".into()),
    }
    if let Some(p) = &i.replica_progress {
        out.push(format!(
            "replica: applied {} of agent {} (reported {})",
            p.applied_seq,
            p.agent_id,
            p.updated_at.as_deref().unwrap_or("-")
        ));
        if let Some(g) = &p.gap {
            out.push(format!(
                "gap: expected seq {}, found {}: {}",
                g.expected_seq,
                g.found_seq
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "nothing".into()),
                g.reason
            ));
        }
    }
    out
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn job_rows(jobs: &[Job]) -> Vec<Vec<String>> {
    jobs.iter()
        .map(|j| {
            let done = j
                .steps
                .iter()
                .filter(|s| s.state == StepState::Done)
                .count();
            vec![
                j.id.clone(),
                j.action.to_string(),
                opt(&j.item_id),
                j.state.to_string(),
                format!("{done}/{}", j.steps.len()),
                j.created_at.clone(),
                j.error
                    .as_ref()
                    .map(|e| format!("E{} {}", e.code, e.message))
                    .unwrap_or_default(),
            ]
        })
        .collect()
}

fn show_job(job: &Job) {
    println!(
        "job {}  {}  item {}  {}",
        job.id,
        job.action,
        opt(&job.item_id),
        job.state
    );
    table(
        &["#", "step", "by", "state", "progress", "bytes", "result"],
        job.steps
            .iter()
            .map(|s| {
                vec![
                    s.index.to_string(),
                    s.name.clone(),
                    s.executor.to_string(),
                    s.state.to_string(),
                    format!("{:.0}%", s.percent),
                    format!("{}/{}", s.bytes_done, s.bytes_total),
                    s.error
                        .as_ref()
                        .map(|e| format!("E{} {}", e.code, e.message))
                        .or_else(|| s.message.clone())
                        .unwrap_or_default(),
                ]
            })
            .collect(),
    );
    if let Some(e) = &job.error {
        println!("error E{}: {}", e.code, e);
        println!("remedy: {}", e.remedy);
    }
}

/// The exit status of a job's outcome, or its error.
fn job_outcome(job: &Job) -> anyhow::Result<ExitCode> {
    match job.state {
        JobState::Failed | JobState::Cancelled => {
            let e = job.error.clone().unwrap_or_else(|| {
                ApiError::new(
                    ErrorCode::JobInterrupted,
                    format!("job {} {}", job.id, job.state),
                )
            });
            Err(e.into())
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

async fn watch(api: &Api, id: &str) -> anyhow::Result<Job> {
    let bar = if api.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(100)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos:>3}% {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        let job: Job = api.get(&format!("/jobs/{}", enc(id))).await?;
        let n = job.steps.len().max(1) as f64;
        let pct: f64 = job.steps.iter().map(|s| s.percent).sum::<f64>() / n;
        bar.set_position(pct.round() as u64);
        let current = job
            .steps
            .iter()
            .find(|s| s.state != StepState::Done)
            .map(|s| format!("{} ({})", s.name, s.state))
            .unwrap_or_default();
        bar.set_message(format!("{} {current}", job.state));
        if job.state.is_finished() || job.state == JobState::Waiting {
            bar.finish();
            return Ok(job);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn started(api: &Api, job: Job, wait: bool) -> anyhow::Result<ExitCode> {
    let job = if wait {
        watch(api, &job.id).await?
    } else {
        job
    };
    if api.json {
        print_json(&job)?;
    } else {
        show_job(&job);
        if job.state == JobState::Waiting {
            match &job.item_id {
                Some(item) => {
                    println!("waiting for an operator: `rebound complete {item}` when ready")
                }
                None => println!(
                    "waiting for an operator: `rebound jobs continue {}` when done",
                    job.id
                ),
            }
        }
    }
    job_outcome(&job)
}

async fn action(api: &Api, item: &str, req: ActionRequest, wait: bool) -> anyhow::Result<ExitCode> {
    let job: Job = api
        .post(&format!("/items/{}/actions", enc(item)), &req)
        .await?;
    started(api, job, wait).await
}

fn parse_disk(s: &str) -> anyhow::Result<Disk> {
    let parts: Vec<&str> = s.split(':').collect();
    let [name, size, uuid] = parts.as_slice() else {
        return Err(Failure::new(
            ErrorCode::InvalidArgument,
            format!("--disk {s:?} is not NAME:SIZE_BYTES:UUID"),
        )
        .into());
    };
    let size_bytes = size.parse().map_err(|_| {
        Failure::new(
            ErrorCode::InvalidArgument,
            format!("disk size {size:?} is not a number of bytes"),
        )
    })?;
    Ok(Disk {
        name: name.to_string(),
        size_bytes,
        uuid: uuid.to_string(),
    })
}

fn parse_step(s: &str) -> anyhow::Result<PlanStep> {
    let bad = || {
        Failure::new(
            ErrorCode::InvalidArgument,
            format!(
                "--step {s:?}: use group:ITEM,ITEM, script:CMD, script@SECS:CMD or manual:TEXT"
            ),
        )
    };
    let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
    let (kind, timeout_secs) = match kind.split_once('@') {
        Some(("script", secs)) => ("script", Some(secs.parse::<u64>().map_err(|_| bad())?)),
        Some(_) => return Err(bad().into()),
        None => (kind, None),
    };
    Ok(match kind {
        "group" => PlanStep {
            kind: PlanStepKind::Group,
            items: rest
                .split(',')
                .filter(|x| !x.is_empty())
                .map(str::to_string)
                .collect(),
            text: None,
            timeout_secs: None,
        },
        "script" => PlanStep {
            kind: PlanStepKind::Script,
            items: vec![],
            text: Some(rest.into()),
            timeout_secs,
        },
        "manual" => PlanStep {
            kind: PlanStepKind::Manual,
            items: vec![],
            text: Some(rest.into()),
            timeout_secs: None,
        },
        _ => return Err(bad().into()),
    })
}

// ---------------------------------------------------------------- commands

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(cmd))
}

async fn run_async(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Tokens(a) => {
            let api = Api::new(&a.conn)?;
            match a.cmd {
                Some(TokensCmd::Create { name, scope }) => {
                    let t: TokenInfo = api.post("/tokens", &NewToken { name, scope }).await?;
                    if api.json {
                        print_json(&t)?;
                    } else {
                        println!("token {} ({}, {}) created:", t.name, t.scope, t.id);
                        println!("{}", t.token.as_deref().unwrap_or(""));
                        println!("keep it now: it is stored hashed and cannot be shown again");
                    }
                }
                Some(TokensCmd::Revoke { id }) => {
                    api.delete(&format!("/tokens/{}", enc(&id))).await?;
                    if !api.json {
                        println!("token {id} revoked");
                    }
                }
                None => {
                    let ts: Vec<TokenInfo> = api.get("/tokens").await?;
                    if api.json {
                        print_json(&ts)?;
                    } else {
                        table(
                            &["id", "name", "scope", "created"],
                            ts.iter()
                                .map(|t| {
                                    vec![
                                        t.id.clone(),
                                        t.name.clone(),
                                        t.scope.to_string(),
                                        t.created_at.clone(),
                                    ]
                                })
                                .collect(),
                        );
                    }
                }
            }
        }
        Command::Sites(a) => {
            let api = Api::new(&a.conn)?;
            if let Some(SitesCmd::Add { name, role }) = a.add {
                let s: Site = api.post("/sites", &NewSite { name, role }).await?;
                return if api.json {
                    print_json(&s).map(|_| ExitCode::SUCCESS)
                } else {
                    println!("site {} ({}) added: {}", s.name, s.role, s.id);
                    Ok(ExitCode::SUCCESS)
                };
            }
            let sites: Vec<Site> = api.get("/sites").await?;
            if api.json {
                print_json(&sites)?;
            } else {
                table(
                    &["id", "name", "role", "created"],
                    sites
                        .iter()
                        .map(|s| {
                            vec![
                                s.id.clone(),
                                s.name.clone(),
                                s.role.to_string(),
                                s.created_at.clone(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        Command::Servers(a) => {
            let api = Api::new(&a.conn)?;
            let q = a.role.map(|r| format!("?role={r}")).unwrap_or_default();
            let comps: Vec<Component> = api.get(&format!("/components{q}")).await?;
            if api.json {
                print_json(&comps)?;
            } else {
                table(
                    &[
                        "id",
                        "role",
                        "name",
                        "site",
                        "healthy",
                        "last heartbeat",
                        "details",
                    ],
                    comps
                        .iter()
                        .map(|c| {
                            let details = match (&c.process_server, &c.master_target, &c.agent) {
                                (Some(p), _, _) => format!(
                                    "cache {}/{} B, {} B/s",
                                    p.cache_used_bytes,
                                    p.cache_limit_bytes,
                                    p.throughput_bytes_per_sec
                                ),
                                (_, Some(m), _) => format!(
                                    "{} on {}, slots {}/{}",
                                    m.os, m.host, m.disk_slots_used, m.disk_slot_limit
                                ),
                                (_, _, Some(g)) => format!(
                                    "{} {}",
                                    g.machine,
                                    if g.running { "running" } else { "stopped" }
                                ),
                                _ => String::new(),
                            };
                            vec![
                                c.id.clone(),
                                c.role.to_string(),
                                c.name.clone(),
                                c.site_id.clone(),
                                if c.healthy { "yes" } else { "NO" }.into(),
                                opt(&c.last_heartbeat),
                                details,
                            ]
                        })
                        .collect(),
                );
            }
        }
        Command::Items(a) => {
            let api = Api::new(&a.conn)?;
            match a.cmd {
                None => {
                    let items: Vec<Item> = api.get("/items").await?;
                    if api.json {
                        print_json(&items)?;
                    } else {
                        table(
                            &[
                                "id",
                                "name",
                                "state",
                                "direction",
                                "active",
                                "rpo",
                                "replication",
                                "job",
                            ],
                            items
                                .iter()
                                .map(|i| {
                                    vec![
                                        i.id.clone(),
                                        i.name.clone(),
                                        i.state.phase.to_string(),
                                        i.state.direction.to_string(),
                                        i.active_site.to_string(),
                                        i.rpo_seconds
                                            .map(|s| format!("{s}s"))
                                            .unwrap_or_else(|| "-".into()),
                                        i.replication
                                            .as_ref()
                                            .map(|r| replication_state(r.state).to_string())
                                            .unwrap_or_else(|| "-".into()),
                                        opt(&i.job_id),
                                    ]
                                })
                                .collect(),
                        );
                    }
                }
                Some(ItemsCmd::Show { item }) => {
                    let i: Item = api.get(&format!("/items/{}", enc(&item))).await?;
                    if api.json {
                        print_json(&i)?;
                    } else {
                        println!("item {} ({}), {}", i.name, i.id, i.os);
                        println!("state: {}; running at the {} site", i.state, i.active_site);
                        println!(
                            "allowed: {}",
                            rebound_control::machine::allowed_actions(i.state)
                                .iter()
                                .map(|a| a.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                        println!(
                            "policy {}  group {}  master target {}  process server {}",
                            opt(&i.policy_id),
                            opt(&i.group_id),
                            opt(&i.master_target_id),
                            opt(&i.process_server_id)
                        );
                        println!(
                            "last point: {}",
                            i.last_point
                                .as_ref()
                                .map(|p| format!("{} at {}", p.id, p.time))
                                .unwrap_or_else(|| "-".into())
                        );
                        if let Some(d) = &i.detached {
                            println!("detached: {} at {}", d.reason, d.at);
                        }
                        for line in replication_lines(&i) {
                            println!("{line}");
                        }
                        table(
                            &["disk", "size", "uuid"],
                            i.disks
                                .iter()
                                .map(|d| {
                                    vec![d.name.clone(), d.size_bytes.to_string(), d.uuid.clone()]
                                })
                                .collect(),
                        );
                    }
                }
                Some(ItemsCmd::Add {
                    name,
                    os,
                    disks,
                    primary_site,
                    recovery_site,
                    born_at,
                    agent,
                }) => {
                    let disks = disks
                        .iter()
                        .map(|d| parse_disk(d))
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    let i: Item = api
                        .post(
                            "/items",
                            &NewItem {
                                name,
                                os,
                                disks,
                                primary_site,
                                recovery_site,
                                born_at,
                                agent_id: agent,
                            },
                        )
                        .await?;
                    if api.json {
                        print_json(&i)?;
                    } else {
                        println!("item {} added: {}", i.name, i.id);
                    }
                }
                Some(ItemsCmd::Detach { item, reason }) => {
                    let i: Item = api
                        .post(
                            &format!("/items/{}/detach", enc(&item)),
                            &DetachRequest { reason },
                        )
                        .await?;
                    if api.json {
                        print_json(&i)?;
                    } else {
                        println!("item {} detached", i.name);
                    }
                }
            }
        }
        Command::Points(a) => {
            let api = Api::new(&a.conn)?;
            let pts: Vec<RecoveryPoint> =
                api.get(&format!("/items/{}/points", enc(&a.item))).await?;
            if api.json {
                print_json(&pts)?;
            } else {
                table(
                    &["id", "time", "kind", "group marker"],
                    pts.iter()
                        .map(|p| {
                            vec![
                                p.id.clone(),
                                p.time.clone(),
                                p.kind.to_string(),
                                opt(&p.group_marker),
                            ]
                        })
                        .collect(),
                );
            }
        }
        Command::Policies(a) => {
            let api = Api::new(&a.conn)?;
            let list: Vec<Policy> = match a.add {
                Some(PoliciesCmd::Add {
                    name,
                    rpo,
                    retention,
                    app_consistent,
                    crash_consistent,
                }) => {
                    api.post(
                        "/policies",
                        &NewPolicy {
                            name,
                            rpo_threshold_secs: rpo,
                            retention_secs: retention,
                            app_consistent_frequency_secs: app_consistent,
                            crash_consistent_frequency_secs: crash_consistent,
                        },
                    )
                    .await?
                }
                None => api.get("/policies").await?,
            };
            if api.json {
                print_json(&list)?;
            } else {
                table(
                    &[
                        "id",
                        "name",
                        "rpo",
                        "retention",
                        "app-consistent",
                        "crash-consistent",
                        "read-only",
                        "failback policy",
                    ],
                    list.iter()
                        .map(|p| {
                            vec![
                                p.id.clone(),
                                p.name.clone(),
                                format!("{}s", p.rpo_threshold_secs),
                                format!("{}s", p.retention_secs),
                                format!("{}s", p.app_consistent_frequency_secs),
                                format!("{}s", p.crash_consistent_frequency_secs),
                                if p.read_only { "yes" } else { "no" }.into(),
                                opt(&p.failback_policy_id),
                            ]
                        })
                        .collect(),
                );
            }
        }
        Command::Groups(a) => {
            let api = Api::new(&a.conn)?;
            let list: Vec<Group> = match a.add {
                Some(GroupsCmd::Add { name, items }) => {
                    vec![api.post("/groups", &NewGroup { name, items }).await?]
                }
                None => api.get("/groups").await?,
            };
            if api.json {
                print_json(&list)?;
            } else {
                table(
                    &["id", "name", "items"],
                    list.iter()
                        .map(|g| vec![g.id.clone(), g.name.clone(), g.item_ids.join(",")])
                        .collect(),
                );
            }
        }
        Command::Plans(a) => {
            let api = Api::new(&a.conn)?;
            let list: Vec<Plan> = match a.add {
                Some(PlansCmd::Run {
                    plan,
                    action,
                    kind,
                    sync,
                    master_target,
                    process_server,
                    datastore,
                    retention_volume,
                    wait,
                }) => {
                    let req = ActionRequest {
                        kind,
                        sync,
                        master_target_id: master_target,
                        process_server_id: process_server,
                        datastore,
                        retention_volume,
                        ..ActionRequest::new(action)
                    };
                    let job: Job = api
                        .post(&format!("/plans/{}/actions", enc(&plan)), &req)
                        .await?;
                    return started(&api, job, wait).await;
                }
                Some(PlansCmd::Add { name, steps }) => {
                    let steps = steps
                        .iter()
                        .map(|s| parse_step(s))
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    vec![api.post("/plans", &NewPlan { name, steps }).await?]
                }
                None => api.get("/plans").await?,
            };
            if api.json {
                print_json(&list)?;
            } else {
                table(
                    &["id", "name", "steps"],
                    list.iter()
                        .map(|p| {
                            let steps: Vec<String> = p
                                .steps
                                .iter()
                                .map(|s| match s.kind {
                                    PlanStepKind::Group => format!("group[{}]", s.items.join(",")),
                                    k => format!("{k}[{}]", s.text.clone().unwrap_or_default()),
                                })
                                .collect();
                            vec![p.id.clone(), p.name.clone(), steps.join(" → ")]
                        })
                        .collect(),
                );
            }
        }
        Command::Protect(a) => {
            let api = Api::new(&a.conn)?;
            let req = ActionRequest {
                policy_id: Some(a.policy),
                process_server_id: Some(a.process_server),
                master_target_id: Some(a.master_target),
                datastore: Some(a.datastore),
                retention_volume: Some(a.retention_volume),
                ..ActionRequest::new(Action::EnableProtection)
            };
            return action(&api, &a.item, req, a.wait).await;
        }
        Command::Failover(a) => return failover(a, Action::Failover).await,
        Command::Failback(a) => return failover(a, Action::Failback).await,
        Command::Commit(a) => {
            let api = Api::new(&a.conn)?;
            return action(&api, &a.item, ActionRequest::new(Action::Commit), a.wait).await;
        }
        Command::Complete(a) => {
            let api = Api::new(&a.conn)?;
            return action(&api, &a.item, ActionRequest::new(Action::Complete), a.wait).await;
        }
        Command::Reprotect(a) => return reprotect(a, Action::Reprotect).await,
        Command::ReverseReplicate(a) => return reprotect(a, Action::ReverseReplicate).await,
        Command::Cancel(a) => {
            let api = Api::new(&a.conn)?;
            let job: Job = api
                .post(&format!("/jobs/{}/cancel", enc(&a.job)), &())
                .await?;
            if api.json {
                print_json(&job)?;
            } else {
                show_job(&job);
            }
        }
        Command::Jobs(a) => {
            let api = Api::new(&a.conn)?;
            match a.cmd {
                Some(JobsCmd::Show { job }) => {
                    let job: Job = api.get(&format!("/jobs/{}", enc(&job))).await?;
                    if api.json {
                        print_json(&job)?;
                    } else {
                        show_job(&job);
                    }
                }
                Some(JobsCmd::Continue { job }) => {
                    let job: Job = api
                        .post(&format!("/jobs/{}/continue", enc(&job)), &())
                        .await?;
                    if api.json {
                        print_json(&job)?;
                    } else {
                        show_job(&job);
                    }
                }
                Some(JobsCmd::Watch { job }) => {
                    let job = watch(&api, &job).await?;
                    if api.json {
                        print_json(&job)?;
                    } else {
                        show_job(&job);
                    }
                    return job_outcome(&job);
                }
                None => {
                    let mut q = Vec::new();
                    for (k, v) in [
                        ("item", a.item),
                        ("plan", a.plan),
                        ("state", a.state.map(|s| s.to_string())),
                        ("since", a.since),
                        ("until", a.until),
                    ] {
                        if let Some(v) = v {
                            q.push(format!("{k}={}", enc(&v)));
                        }
                    }
                    let q = if q.is_empty() {
                        String::new()
                    } else {
                        format!("?{}", q.join("&"))
                    };
                    let jobs: Vec<Job> = api.get(&format!("/jobs{q}")).await?;
                    if api.json {
                        print_json(&jobs)?;
                    } else {
                        table(
                            &["id", "action", "item", "state", "steps", "created", "error"],
                            job_rows(&jobs),
                        );
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn failover(a: Failover, act: Action) -> anyhow::Result<ExitCode> {
    let api = Api::new(&a.conn)?;
    let req = ActionRequest {
        kind: a.kind,
        sync: a.sync,
        location: a.location,
        point_id: a.point,
        datastore: a.datastore,
        ..ActionRequest::new(act)
    };
    action(&api, &a.item, req, a.wait).await
}

async fn reprotect(a: Reprotect, act: Action) -> anyhow::Result<ExitCode> {
    let api = Api::new(&a.conn)?;
    let req = ActionRequest {
        master_target_id: Some(a.master_target),
        process_server_id: a.process_server,
        datastore: Some(a.datastore),
        retention_volume: Some(a.retention_volume),
        plan_id: a.plan,
        ..ActionRequest::new(act)
    };
    action(&api, &a.item, req, a.wait).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_steps_parse_with_an_optional_script_timeout() {
        let s = parse_step("script:echo a@b:c").expect("a script step");
        assert_eq!(s.kind, PlanStepKind::Script);
        assert_eq!(s.text.as_deref(), Some("echo a@b:c"));
        assert_eq!(s.timeout_secs, None);
        let s = parse_step("script@30:./failover-dns.sh").expect("a timed script step");
        assert_eq!(s.timeout_secs, Some(30));
        assert_eq!(s.text.as_deref(), Some("./failover-dns.sh"));
        assert!(parse_step("script@soon:x").is_err());
        assert!(parse_step("manual@3:x").is_err());
        assert_eq!(
            parse_step("group:vm1,vm2").expect("a group").items,
            vec!["vm1", "vm2"]
        );
    }

    #[test]
    fn item_replication_lines_name_the_rung_the_backlog_and_a_gap() {
        let mut i: Item = serde_json::from_value(serde_json::json!({
            "id": "item-1", "name": "vm1", "os": "linux", "disks": [],
            "primary_site_id": "site-a", "recovery_site_id": "site-b",
            "born_at": "primary",
            "state": {"phase": "protected", "direction": "forward"},
            "active_site": "primary", "agent_id": "agent-1", "policy_id": null,
            "group_id": null, "process_server_id": null, "master_target_id": null,
            "datastore": null, "retention_volume": null, "last_point": null,
            "rpo_seconds": null, "detached": null, "job_id": null,
            "created_at": "2024-01-01T00:00:00Z", "updated_at": "2024-01-01T00:00:00Z"
        }))
        .expect("an item without the replication fields");
        assert_eq!(replication_lines(&i), vec!["replication: -"]);
        i.replication = Some(ReplicationFacts {
            state: ReplicationState::Backlogged,
            backlog_bytes: 3 << 20,
            resync_bytes: 0,
            eta_secs: Some(125),
            captured_seq: 90,
            shipped_seq: 80,
            applied_seq: 70,
        });
        i.replica_progress = Some(ReplicaProgress {
            agent_id: "agent-1".into(),
            applied_seq: 70,
            gap: Some(StreamGap {
                expected_seq: 71,
                found_seq: Some(73),
                reason: "out of order".into(),
            }),
            updated_at: Some("2024-01-01T00:00:01Z".into()),
        });
        let text = replication_lines(&i).join("\n");
        for want in [
            "replication: backlogged",
            "backlog 3.0 MiB",
            "resync 0 B",
            "eta 2m05s",
            "captured 90  shipped 80  applied 70",
            "gap: expected seq 71, found 73: out of order",
        ] {
            assert!(text.contains(want), "{want:?} in\n{text}");
        }
        assert_eq!(human_secs(42), "42s");
        assert_eq!(human_secs(7300), "2h01m");
    }
}
