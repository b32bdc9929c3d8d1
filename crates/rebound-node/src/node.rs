//! `rebound node`: one daemon per site node with the process server and/or
//! master target roles (the reference's "unified setup"). It enrols each
//! role, serves the data port, heartbeats real facts, runs the roles' loops,
//! and supervises the machines on its host (restarting an agent that died
//! while its machine should run).

use crate::client::{Api, Identity, data_token};
use crate::facts::{self, FsProbe, MachineSummary, MasterTargetInputs, OverrideFs, RealFs};
use crate::machine::{self, Machine};
use crate::process::{self, Stats};
use crate::target::{TargetConfig, TargetRole};
use anyhow::Context;
use rebound_api::{ComponentRole, Heartbeat, SiteRole};
use rebound_disk::crashsafe;
use serde::{Deserialize, Serialize};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};
use tracing::{info, info_span, warn};

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub site: String,
    pub process_server: bool,
    pub master_target: bool,
    pub server: String,
    pub registration_key: String,
    pub data_dir: PathBuf,
    pub data_listen: String,
    /// NAME=PATH; default `data` = `DATA_DIR/datastore`.
    pub datastores: Vec<(String, PathBuf)>,
    /// Default `DATA_DIR/retention`.
    pub retention_volumes: Vec<PathBuf>,
    /// Default `DATA_DIR/host`.
    pub host_dir: Option<PathBuf>,
    pub cache_limit: u64,
    pub disk_slot_limit: u32,
    pub heartbeat: Duration,
    /// Test hook: report this filesystem type for a path (statfs injection).
    pub fs_type_overrides: Vec<(PathBuf, String)>,
}

/// What a started node writes to `DATA_DIR/node.json` for scripts and tests.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeInfo {
    pub site: String,
    pub process_server_id: Option<String>,
    pub master_target_id: Option<String>,
    pub data_addr: String,
    pub host_dir: PathBuf,
    pub datastores: Vec<(String, PathBuf)>,
    pub retention_volumes: Vec<PathBuf>,
    pub pid: u32,
}

fn enrol(
    cfg: &NodeConfig,
    api: &Api,
    role: ComponentRole,
    file: &str,
    shutdown: &AtomicBool,
) -> anyhow::Result<Identity> {
    let name = format!(
        "{}-{}",
        cfg.site,
        match role {
            ComponentRole::ProcessServer => "ps",
            ComponentRole::MasterTarget => "mt",
            ComponentRole::Agent => "agent",
        }
    );
    loop {
        match Identity::load_or_enrol(
            &cfg.data_dir.join(file),
            api,
            &cfg.registration_key,
            role,
            &name,
            &cfg.site,
        ) {
            Ok(id) => return Ok(id),
            Err(e) if !shutdown.load(SeqCst) => {
                warn!(error = %e, "enrolment failed; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Run the node until `shutdown`.
pub fn run(mut cfg: NodeConfig, shutdown: Arc<AtomicBool>) -> anyhow::Result<()> {
    let span = info_span!("node", site = %cfg.site);
    let _g = span.enter();
    let data_root = cfg.data_dir.join("data");
    crashsafe::create_dir_all_durable(&data_root)?;
    let host_dir = cfg
        .host_dir
        .clone()
        .unwrap_or_else(|| cfg.data_dir.join("host"));
    crashsafe::create_dir_all_durable(&host_dir)?;
    if cfg.datastores.is_empty() {
        cfg.datastores = vec![("data".into(), cfg.data_dir.join("datastore"))];
    }
    if cfg.retention_volumes.is_empty() {
        cfg.retention_volumes = vec![cfg.data_dir.join("retention")];
    }
    for (_, p) in &cfg.datastores {
        crashsafe::create_dir_all_durable(p)
            .with_context(|| format!("datastore {}", p.display()))?;
    }
    for p in &cfg.retention_volumes {
        crashsafe::create_dir_all_durable(p)
            .with_context(|| format!("retention volume {}", p.display()))?;
    }

    let token = data_token(&cfg.registration_key)?;
    let listener = TcpListener::bind(&cfg.data_listen)
        .with_context(|| format!("data port {}", cfg.data_listen))?;
    let data_addr = listener.local_addr()?.to_string();
    {
        let (root, token) = (data_root.clone(), token.clone());
        let cache_quota = cfg.process_server.then_some(rebound_delta::Quota {
            dir: crate::process::CACHE_DIR,
            bytes: cfg.cache_limit,
        });
        std::thread::spawn(move || {
            rebound_delta::serve_with(
                listener,
                root,
                token,
                rebound_delta::ServeOptions {
                    read_only: false,
                    create_dirs: true,
                    live_sources: false,
                    // The process server enforces its own bound: agents
                    // also hold back when its heartbeat says it is full,
                    // but that reading can be up to a heartbeat old.
                    quota: cache_quota,
                },
            )
        });
    }

    let api = Api::new(&cfg.server, None);
    let ps = if cfg.process_server {
        Some(enrol(
            &cfg,
            &api,
            ComponentRole::ProcessServer,
            "process-server.json",
            &shutdown,
        )?)
    } else {
        None
    };
    let mt = if cfg.master_target {
        Some(enrol(
            &cfg,
            &api,
            ComponentRole::MasterTarget,
            "master-target.json",
            &shutdown,
        )?)
    } else {
        None
    };
    let any = ps
        .as_ref()
        .or(mt.as_ref())
        .context("a node needs at least one role")?;
    let reader = api.with_token(any.token.clone());
    let site_id = reader.component(&any.component_id)?.site_id;

    let stats = Arc::new(Stats::default());
    let mut threads = Vec::new();
    if let Some(id) = &ps {
        let (api, root, token, stats, stop) = (
            api.with_token(id.token.clone()),
            data_root.clone(),
            token.clone(),
            stats.clone(),
            shutdown.clone(),
        );
        threads.push(std::thread::spawn(move || {
            process::forward_loop(api, root, token, stats, stop)
        }));
    }
    let target = mt.as_ref().map(|id| {
        TargetRole::new(
            TargetConfig {
                data_root: data_root.clone(),
                host_dir: host_dir.clone(),
                datastores: cfg.datastores.clone(),
                retention_volumes: cfg.retention_volumes.clone(),
                site: cfg.site.clone(),
                server: cfg.server.clone(),
                registration_key: cfg.registration_key.clone(),
                rebound_exe: std::env::current_exe().unwrap_or_else(|_| "rebound".into()),
            },
            api.with_token(id.token.clone()),
            token.clone(),
        )
    });
    if let Some(t) = &target {
        let (t1, s1) = (t.clone(), shutdown.clone());
        threads.push(std::thread::spawn(move || t1.apply_loop(s1)));
        let (t2, s2) = (t.clone(), shutdown.clone());
        threads.push(std::thread::spawn(move || t2.work_loop(s2)));
    }

    let probe: Box<dyn FsProbe + Send + Sync> = if cfg.fs_type_overrides.is_empty() {
        Box::new(RealFs)
    } else {
        let mut o = OverrideFs::new(RealFs);
        for (p, t) in &cfg.fs_type_overrides {
            o = o.with_fs_type(p, t);
        }
        Box::new(o)
    };
    let info = NodeInfo {
        site: cfg.site.clone(),
        process_server_id: ps.as_ref().map(|i| i.component_id.clone()),
        master_target_id: mt.as_ref().map(|i| i.component_id.clone()),
        data_addr: data_addr.clone(),
        host_dir: host_dir.clone(),
        datastores: cfg.datastores.clone(),
        retention_volumes: cfg.retention_volumes.clone(),
        pid: std::process::id(),
    };
    let reporter = Arc::new(Reporter {
        api: api.clone(),
        ps: ps.clone(),
        mt: mt.clone(),
        host_dir: host_dir.clone(),
        data_root: data_root.clone(),
        data_addr: data_addr.clone(),
        cfg: cfg.clone(),
        stats: stats.clone(),
        probe,
    });
    if let Some(t) = &target {
        // Facts change with the steps (machines created or removed): report
        // them before the step's result, so the next precheck sees them.
        let r = reporter.clone();
        t.set_facts_hook(Arc::new(move || r.send()));
    }
    let heartbeat = |last: &mut Instant| {
        *last = Instant::now();
        reporter.send();
    };
    let mut last = Instant::now();
    heartbeat(&mut last);
    crashsafe::write_file_durable(
        &cfg.data_dir.join("node.json"),
        &serde_json::to_vec_pretty(&info)?,
    )?;
    info!(data = %data_addr, ps = ?info.process_server_id, mt = ?info.master_target_id, "node running");

    while !shutdown.load(SeqCst) {
        if last.elapsed() >= cfg.heartbeat {
            heartbeat(&mut last);
        }
        supervise(&cfg, &reader, &site_id, &host_dir);
        std::thread::sleep(Duration::from_millis(250));
    }
    for t in threads {
        let _ = t.join();
    }
    let _ = std::fs::remove_file(cfg.data_dir.join("node.json"));
    info!("node stopped");
    Ok(())
}

/// Sends the heartbeats of the node's roles with their current facts.
struct Reporter {
    api: Api,
    ps: Option<Identity>,
    mt: Option<Identity>,
    host_dir: PathBuf,
    data_root: PathBuf,
    data_addr: String,
    cfg: NodeConfig,
    stats: Arc<Stats>,
    probe: Box<dyn FsProbe + Send + Sync>,
}

impl Reporter {
    fn send(&self) {
        let machines = machine::list(&self.host_dir);
        if let Some(id) = &self.ps {
            let hb = Heartbeat {
                version: env!("CARGO_PKG_VERSION").into(),
                process_server: Some(process::facts(
                    &self.data_root,
                    self.cfg.cache_limit,
                    &self.stats,
                )),
                data_addr: Some(self.data_addr.clone()),
                ..Default::default()
            };
            if let Err(e) = self
                .api
                .with_token(id.token.clone())
                .heartbeat(&id.component_id, &hb)
            {
                warn!(error = %e, "process server heartbeat failed");
            }
        }
        if let Some(id) = &self.mt {
            let summaries: Vec<MachineSummary> = machines
                .iter()
                .filter_map(|m| {
                    let man = m.manifest().ok()?;
                    Some(MachineSummary {
                        name: man.name,
                        disks: man.disks.len() as u32,
                        disk_uuids: man.disks.iter().map(|d| d.uuid.clone()).collect(),
                        running: m.is_running(),
                        snapshots: false,
                    })
                })
                .collect();
            let inputs = MasterTargetInputs {
                os: facts::os_type(),
                host: self.host_dir.display().to_string(),
                host_dir: self.host_dir.clone(),
                datastores: self.cfg.datastores.clone(),
                retention_volumes: self.cfg.retention_volumes.clone(),
                system_dirs: vec![self.data_root.clone(), self.cfg.data_dir.join("cache")],
                disk_slot_limit: self.cfg.disk_slot_limit,
            };
            let hb = Heartbeat {
                version: env!("CARGO_PKG_VERSION").into(),
                master_target: Some(facts::master_target_facts(
                    &*self.probe,
                    &inputs,
                    &summaries,
                )),
                data_addr: Some(self.data_addr.clone()),
                ..Default::default()
            };
            if let Err(e) = self
                .api
                .with_token(id.token.clone())
                .heartbeat(&id.component_id, &hb)
            {
                warn!(error = %e, "master target heartbeat failed");
            }
        }
    }
}

/// Start the agents of machines that should run here and do not; a machine
/// whose item now runs at the other site stays off.
fn supervise(cfg: &NodeConfig, api: &Api, site_id: &str, host_dir: &std::path::Path) {
    for m in machine::list(host_dir) {
        if let Err(e) = remove_if_replaced(api, site_id, &m) {
            warn!(machine = %m.dir.display(), error = %e, "checking for a replaced machine failed");
        }
        let want = m.dir.join("want-running");
        if !want.exists() || m.is_running() {
            continue;
        }
        let Ok(man) = m.manifest() else { continue };
        if let Ok(item) = api.item(&man.name) {
            let active = match item.active_site {
                SiteRole::Primary => &item.primary_site_id,
                SiteRole::Recovery => &item.recovery_site_id,
            };
            if active != site_id && item.job_id.is_some() {
                // A job (a failover) may be moving the machine here: it
                // starts it itself; the item's site changes at its end.
                continue;
            }
            if active != site_id {
                info!(machine = %man.name, "the item runs at the other site: the machine stays off");
                let _ = crashsafe::remove_file_durable(&want);
                continue;
            }
        }
        info!(machine = %man.name, "starting the machine's agent");
        if let Err(e) = start_machine(cfg, &m) {
            warn!(machine = %man.name, error = %e, "starting the machine failed");
        }
    }
}

/// Commit of a failover or failback to an **alternate location** removes
/// the machine it left behind at the other site (the reference's "commit
/// deletes the recovery-site machine and disks"): a stopped machine here,
/// whose item runs at the other site and whose last failover/failback went
/// to an alternate location and was committed, is deleted.
fn remove_if_replaced(api: &Api, site_id: &str, m: &Machine) -> anyhow::Result<()> {
    if m.agent_pid().is_some() {
        return Ok(());
    }
    let man = m.manifest()?;
    let Ok(item) = api.item(&man.name) else {
        return Ok(());
    };
    let active = match item.active_site {
        SiteRole::Primary => &item.primary_site_id,
        SiteRole::Recovery => &item.recovery_site_id,
    };
    if active == site_id
        || item.state.phase != rebound_api::Phase::Committed
        || item.job_id.is_some()
    {
        return Ok(());
    }
    // Newest first: the commit, then the failover/failback it committed.
    let jobs: Vec<rebound_api::Job> = api.get(&format!("/jobs?item={}&limit=20", item.id))?;
    let mut it = jobs
        .iter()
        .filter(|j| j.state == rebound_api::JobState::Succeeded);
    let commit = it.next();
    let moved = it.next();
    let replaced = matches!(commit, Some(c) if c.action == rebound_api::Action::Commit)
        && matches!(moved, Some(j)
            if matches!(j.action, rebound_api::Action::Failover | rebound_api::Action::Failback)
                && j.request.location == Some(rebound_api::Location::Alternate));
    if replaced {
        info!(machine = %man.name, "committed at an alternate location: removing the machine left here");
        crashsafe::remove_dir_all_durable(&m.dir)?;
    }
    Ok(())
}

fn start_machine(cfg: &NodeConfig, m: &Machine) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    m.start(&exe, &cfg.server, &cfg.site, &cfg.registration_key)?;
    Ok(())
}
