//! The agent (mobility service) of one machine: `rebound agent run DIR`.
//!
//! It serves the machine's disks over NBD (so it is in the write path),
//! enrols and heartbeats, attaches itself to the machine's replicated item
//! when it runs at the item's active site, and replicates continuously:
//! every write is captured in the write path (`rebound_agent::Capture`),
//! spooled into bounded changeset files in the outbox
//! (`rebound_agent::Spool`), and shipped by a shipper thread through the
//! process server to the master target. Recovery points are barriers in that
//! stream at the policy's crash-consistent frequency (and app-consistent ones
//! through the machine's freeze/thaw hooks): no write waits for a copy. The
//! marks of the dirty bitmap are cleared only once the master target reports
//! the point applied. It also serves its disks read-only on a data port,
//! from which master targets pull whole-disk syncs, and runs the machine's
//! workload.

use crate::client::{Api, Identity, data_token};
use crate::machine::{Machine, Manifest};
use crate::ship::{ShipTarget, Shipper};
use anyhow::{Context, bail};
use rebound_agent::changeset::{self, Closes};
use rebound_agent::{
    Capture, DiskExport, ExportSpec, Inputs, Marker, Progress, Rung, Spool, SpoolConfig,
    StreamControl, StreamOwner,
};
use rebound_api::{
    AgentFacts, ComponentRole, Heartbeat, Item, Phase, ReplicationFacts, ReplicationState,
    SiteRole, StepReport, StepState,
};
use rebound_delta::RemoteAddr;
use rebound_nbd::{
    BlockDevice, Caps, DeviceError, Extent, ListenAddr, Listener, Server, ZeroFlags,
};
use std::net::TcpListener;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::{debug, info, info_span, warn};

/// How often the agent reads its item and its work from the configuration
/// server (its local checks run every 200 ms).
const POLL_EVERY: Duration = Duration::from_millis(500);

/// The manifest's copy on the agent's data port.
pub const MANIFEST_COPY: &str = "manifest.json";

/// How an agent runs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub dir: PathBuf,
    pub server: String,
    pub site: String,
    pub registration_key: String,
    /// Crash-consistent point interval when the item's policy cannot be
    /// read (the policy's setting wins).
    pub interval: Duration,
    pub heartbeat: Duration,
    /// Address the data port binds (port 0: any free port).
    pub data_listen: String,
}

/// Writes wait here while the machine is suspended; once it is stopped
/// every write is refused.
#[derive(Default)]
pub struct Hold {
    gate: RwLock<()>,
    stopped: AtomicBool,
    /// The machine is suspended: writes wait (outside the gate) until it
    /// resumes or stops. Set and cleared under the write side of the gate,
    /// so no write is in flight once the flag is set.
    suspended: AtomicBool,
}

/// A disk export whose writes pass through the machine's hold.
pub struct HeldDisk {
    inner: Arc<DiskExport>,
    hold: Arc<Hold>,
}

impl HeldDisk {
    fn writing<T>(&self, f: impl FnOnce() -> Result<T, DeviceError>) -> Result<T, DeviceError> {
        loop {
            let g = self.hold.gate.read().unwrap_or_else(|p| p.into_inner());
            if self.hold.stopped.load(SeqCst) {
                return Err(DeviceError::Shutdown);
            }
            if !self.hold.suspended.load(SeqCst) {
                return f();
            }
            // Suspended: the write waits, without blocking the gate.
            drop(g);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl BlockDevice for HeldDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn caps(&self) -> Caps {
        self.inner.caps()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError> {
        self.writing(|| self.inner.write(offset, data, fua))
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.inner.flush()
    }
    fn trim(&self, range: Range<u64>, fua: bool) -> Result<(), DeviceError> {
        self.writing(|| self.inner.trim(range, fua))
    }
    fn write_zeroes(&self, range: Range<u64>, flags: ZeroFlags) -> Result<(), DeviceError> {
        self.writing(|| self.inner.write_zeroes(range, flags))
    }
    fn block_status(&self, range: Range<u64>, max: usize) -> Result<Vec<Extent>, DeviceError> {
        self.inner.block_status(range, max)
    }
}

/// The barrier an agent took for a master target's whole-disk sync: once
/// the job succeeds, everything up to it is on the target.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct SyncBarrier {
    job: String,
    markers: Vec<u64>,
    #[serde(default)]
    at_ns: u64,
}

struct Agent {
    cfg: AgentConfig,
    machine: Machine,
    manifest: Manifest,
    exports: Vec<Arc<DiskExport>>,
    hold: Arc<Hold>,
    api: Api,
    id: Identity,
    site_id: String,
    data_addr: String,
    /// Our site's role for the current item (primary or recovery).
    item: Option<Item>,
    sync_barrier: Option<SyncBarrier>,
    stream: StreamControl,
    shipper: Shipper,
    /// Dirty-state checkpoints (intent regions leave after idleness).
    _persister: rebound_agent::Persister,
    /// The group point interval, when the item is in a group: the loop
    /// wakes at its multiples.
    next_group: Option<Duration>,
    /// The item's policy: (policy id, crash-consistent, app-consistent
    /// interval), read again now and then.
    policy: Option<(String, Duration, Duration, Instant)>,
    workload: Option<Child>,
    nbd_stop: Option<tokio::sync::oneshot::Sender<()>>,
    stopped: bool,
    /// The machine's freeze/thaw hooks, if it has any (`hooks.json`).
    hooks: Option<AppHooks>,
}

/// Application-consistency hooks of a machine (`MACHINE/hooks.json`): the
/// agent runs `freeze`, closes an app-consistent point with a barrier, then
/// runs `thaw`, at the policy's app-consistent frequency (`every_secs` when
/// the policy cannot be read).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct AppHooks {
    pub freeze: Vec<String>,
    pub thaw: Vec<String>,
    #[serde(default = "default_app_every")]
    pub every_secs: u64,
}

fn default_app_every() -> u64 {
    3600
}

/// Bound of the agent's outbox of changesets not yet shipped
/// (`REBOUND_OUTBOX_LIMIT_MIB`, default 1 GiB). Past it the capture queue
/// fills and overflows into the dirty bitmap; once the outbox has drained
/// to half, a resync ships everything still marked — a delta, never a full
/// copy.
fn outbox_limit() -> u64 {
    env_mib("REBOUND_OUTBOX_LIMIT_MIB", 1024)
}

/// Bound of the in-memory capture queue (`REBOUND_CAPTURE_QUEUE_MIB`,
/// default 64 MiB).
fn capture_limit() -> u64 {
    env_mib("REBOUND_CAPTURE_QUEUE_MIB", 64)
}

fn env_mib(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(default)
        << 20
}

/// How often the agent reads its item's policy again.
const POLICY_EVERY: Duration = Duration::from_secs(30);

fn run_hook(argv: &[String], what: &str) -> anyhow::Result<()> {
    let Some((cmd, args)) = argv.split_first() else {
        return Ok(());
    };
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("{what} hook {cmd}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            if status.success() {
                return Ok(());
            }
            bail!("{what} hook {cmd} exited with {status}");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} hook {cmd} did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Run the agent until SIGTERM (or until its stopped machine is no longer
/// needed by any job).
pub fn run(cfg: AgentConfig, shutdown: Arc<AtomicBool>) -> anyhow::Result<()> {
    let machine = Machine::at(&cfg.dir);
    let manifest = machine.manifest()?;
    let span = info_span!("agent", machine = %manifest.name, site = %cfg.site);
    let _g = span.enter();
    rebound_disk::crashsafe::create_dir_all_durable(&machine.state_dir())?;
    rebound_disk::crashsafe::create_dir_all_durable(&outbox(&machine))?;
    let _ = std::fs::remove_file(machine.dir.join(crate::machine::STOPPED));

    // Disks and NBD first: the machine runs even when the configuration
    // server is unreachable.
    let hold = Arc::new(Hold::default());
    let mut exports = Vec::new();
    let mut server = Server::new(rebound_nbd::ServerConfig::default());
    for d in &manifest.disks {
        let spec = ExportSpec {
            name: d.name.clone(),
            path: machine.disk_path(&d.name),
            read_only: false,
            state_dir: Some(machine.state_dir()),
        };
        let (export, report) = DiskExport::open(&spec)?;
        if let Some(r) = report
            && r.unclean
        {
            warn!(disk = %d.name, regions = r.regions_recovered, "previous agent stopped uncleanly; regions marked for replication");
        }
        let export = Arc::new(export);
        server.add_export(
            &d.name,
            &spec.path.display().to_string(),
            Arc::new(HeldDisk {
                inner: export.clone(),
                hold: hold.clone(),
            }),
        )?;
        exports.push(export);
    }
    let socket = machine.socket();
    let _ = std::fs::remove_file(&socket);
    let (nbd_stop, nbd_stopped) = tokio::sync::oneshot::channel::<()>();
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let addr = ListenAddr::Unix(socket.clone());
    let nbd_thread = std::thread::spawn(move || -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let r = rt.block_on(async move {
            let listener = match Listener::bind(&addr).await {
                Ok(l) => {
                    let _ = bound_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = bound_tx.send(Err(e.to_string()));
                    return Ok(());
                }
            };
            Arc::new(server)
                .serve(listener, async {
                    let _ = nbd_stopped.await;
                })
                .await
        });
        rt.shutdown_timeout(Duration::from_secs(30));
        r.map_err(anyhow::Error::from)
    });
    match bound_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => bail!("NBD socket {}: {e}", socket.display()),
        Err(_) => bail!("the NBD server did not start"),
    }

    // The read-only data port for master targets' pulls.
    let token = data_token(&cfg.registration_key)?;
    let listener = TcpListener::bind(&cfg.data_listen)
        .with_context(|| format!("data port {}", cfg.data_listen))?;
    let data_addr = listener.local_addr()?.to_string();
    // Master targets read the manifest from here too (a failover creates the
    // machine from it); the rest of the machine directory (credentials,
    // state) is not served.
    rebound_disk::crashsafe::write_file_durable(
        &machine.dir.join("disks").join(MANIFEST_COPY),
        &serde_json::to_vec_pretty(&manifest)?,
    )?;
    {
        let (root, token) = (machine.dir.join("disks"), token.clone());
        std::thread::spawn(move || {
            rebound_delta::serve_with(
                listener,
                root,
                token,
                rebound_delta::ServeOptions {
                    read_only: true,
                    create_dirs: false,
                    live_sources: true,
                    quota: None,
                },
            )
        });
    }

    let api = Api::new(&cfg.server, None);
    let name = format!("{}-{}", manifest.name, cfg.site);
    let id = enrol_until(
        &machine.state_dir().join("agent.json"),
        &api,
        &cfg.registration_key,
        &name,
        &cfg.site,
        &shutdown,
    )?;
    let api = api.with_token(id.token.clone());
    let me = api.component(&id.component_id)?;

    // The change stream: capture in the write path, spooled into the outbox.
    let trackers: Vec<_> = exports
        .iter()
        .filter_map(|e| e.tracker().cloned())
        .collect();
    let capture = Capture::new(trackers, capture_limit());
    for (i, e) in exports.iter().enumerate() {
        e.attach_capture(capture.clone(), i as u16);
    }
    let spool = Spool::start(
        SpoolConfig {
            outbox: outbox(&machine),
            disks: manifest
                .disks
                .iter()
                .map(|d| machine.disk_path(&d.name))
                .collect(),
            disk_sizes: exports.iter().map(|e| e.size()).collect(),
            file_cap: rebound_agent::spool::FILE_CAP,
            outbox_limit: outbox_limit(),
            last_seq: load_seq(&machine)?,
        },
        capture.clone(),
    )?;
    let shipper = Shipper::start(
        api.clone(),
        token.clone(),
        outbox(&machine),
        spool.floor_watch(),
    );
    let persister = rebound_agent::spawn_persister(exports.clone(), Duration::from_secs(5));

    let sync_barrier = std::fs::read(machine.state_dir().join("sync-barrier.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let mut agent = Agent {
        machine: machine.clone(),
        manifest,
        exports,
        hold,
        api,
        id,
        site_id: me.site_id,
        data_addr,
        item: None,
        sync_barrier,
        stream: StreamControl::new(capture, spool),
        shipper,
        _persister: persister,
        next_group: None,
        policy: None,
        workload: None,
        nbd_stop: Some(nbd_stop),
        stopped: false,
        hooks: load_hooks(&machine),
        cfg,
    };
    agent.start_workload()?;
    std::fs::write(machine.pid_path(), std::process::id().to_string())?;
    rebound_disk::crashsafe::write_file_durable(&machine.dir.join("agent.ready"), b"ready\n")?;
    info!(data = %agent.data_addr, "agent running");

    let result = agent.main_loop(&shutdown);
    agent.stop_machine();
    let _ = nbd_thread.join();
    for e in &agent.exports {
        if let Err(err) = e.close() {
            warn!(disk = e.name(), error = %err, "closing dirty tracking failed");
        }
    }
    let _ = std::fs::remove_file(machine.pid_path());
    let _ = std::fs::remove_file(machine.dir.join("agent.ready"));
    info!("agent stopped");
    result
}

fn enrol_until(
    path: &Path,
    api: &Api,
    key: &str,
    name: &str,
    site: &str,
    shutdown: &AtomicBool,
) -> anyhow::Result<Identity> {
    let mut name = name.to_string();
    loop {
        match Identity::load_or_enrol(path, api, key, ComponentRole::Agent, &name, site) {
            Ok(id) => return Ok(id),
            Err(e)
                if matches!(
                    e.downcast_ref::<crate::client::CallError>(),
                    Some(crate::client::CallError::Api { status: 409, .. })
                ) =>
            {
                // An earlier machine of this name on this site (deleted,
                // then created again: alternate location, a new test
                // failover) holds the name: enrol this one under its own.
                let suffix = crate::machine::new_uuid();
                name = format!("{}-{}", name, &suffix[..8.min(suffix.len())]);
                warn!(error = %e, %name, "agent name taken; enrolling under a new one");
            }
            Err(e) if !shutdown.load(SeqCst) => {
                warn!(error = %e, "enrolment failed; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => return Err(e),
        }
    }
}

fn outbox(m: &Machine) -> PathBuf {
    m.state_dir().join("outbox")
}

/// The highest sequence number this machine's agent may have used (the
/// spool's ceiling; `state/seq` of agents before the change stream).
fn load_seq(m: &Machine) -> anyhow::Result<u64> {
    let old = std::fs::read_to_string(m.state_dir().join("seq"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    Ok(old.max(rebound_agent::spool::last_seq(&outbox(m))?))
}

/// The machine's freeze/thaw hooks; a malformed file is reported, not
/// silently ignored (its points would be crash-consistent only).
fn load_hooks(m: &Machine) -> Option<AppHooks> {
    let p = m.dir.join("hooks.json");
    let bytes = std::fs::read(&p).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(h) => Some(h),
        Err(e) => {
            warn!(path = %p.display(), error = %e, "hooks.json is malformed: no app-consistent points until it is fixed");
            None
        }
    }
}

impl Agent {
    fn our_role(&self, item: &Item) -> Option<SiteRole> {
        if item.primary_site_id == self.site_id {
            Some(SiteRole::Primary)
        } else if item.recovery_site_id == self.site_id {
            Some(SiteRole::Recovery)
        } else {
            None
        }
    }

    fn start_workload(&mut self) -> anyhow::Result<()> {
        let Some(args) = self.manifest.workload.clone() else {
            return Ok(());
        };
        let mut argv: Vec<String> = args
            .iter()
            .map(|a| {
                let mut a = a.clone();
                for d in &self.manifest.disks {
                    a = a.replace(
                        &format!("{{nbd:{}}}", d.name),
                        &self.machine.nbd_uri(&d.name),
                    );
                }
                a
            })
            .collect();
        if let Some(t) = self.manifest.after_point_ns {
            argv.push("--after-point".into());
            argv.push(t.to_string());
        }
        let exe = std::env::current_exe()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.machine.dir.join("workload.out"))?;
        let child = Command::new(exe)
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the workload")?;
        info!(pid = child.id(), "workload started");
        if self.manifest.after_point_ns.is_some() {
            // Declared once: the workload's log now carries the new epoch.
            self.manifest.after_point_ns = None;
            self.machine.save_manifest(&self.manifest)?;
        }
        self.workload = Some(child);
        Ok(())
    }

    fn stop_workload(&mut self) {
        if let Some(mut child) = self.workload.take() {
            if let Some(p) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            info!("workload stopped");
        }
    }

    /// Stop the machine: its workload, then every write, then the NBD export.
    fn stop_machine(&mut self) {
        if self.stopped {
            return;
        }
        self.stop_workload();
        {
            let _g = self.hold.gate.write().unwrap_or_else(|p| p.into_inner());
            self.hold.stopped.store(true, SeqCst);
        }
        for e in &self.exports {
            let _ = e.flush();
        }
        if let Some(tx) = self.nbd_stop.take() {
            let _ = tx.send(());
        }
        let _ = std::fs::write(self.machine.dir.join(crate::machine::STOPPED), b"1\n");
        self.stopped = true;
        info!("machine stopped");
    }

    fn heartbeat(&self) {
        let hb = Heartbeat {
            version: env!("CARGO_PKG_VERSION").to_string(),
            agent: Some(AgentFacts {
                machine: self.manifest.name.clone(),
                running: !self.stopped,
                suspended: self.hold.suspended.load(SeqCst),
                sync_barrier: self.sync_barrier.as_ref().map(|b| b.job.clone()),
                sync_barrier_ns: self.sync_barrier.as_ref().map(|b| b.at_ns),
                replication: self.replication_facts(),
            }),
            data_addr: Some(self.data_addr.clone()),
            ..Default::default()
        };
        if let Err(e) = self.api.heartbeat(&self.id.component_id, &hb) {
            warn!(error = %e, "heartbeat failed");
        }
    }

    fn main_loop(&mut self, shutdown: &AtomicBool) -> anyhow::Result<()> {
        let mut last_hb = Instant::now() - self.cfg.heartbeat;
        let mut last_poll = Instant::now() - POLL_EVERY;
        while !shutdown.load(SeqCst) {
            if let Some(c) = &mut self.workload
                && let Ok(Some(status)) = c.try_wait()
            {
                info!(%status, "workload exited");
                self.workload = None;
            }
            // The configuration server is asked at its own pace: thousands
            // of agents poll it.
            let polled = last_poll.elapsed() >= POLL_EVERY;
            if polled {
                last_poll = Instant::now();
                self.refresh_item();
            }
            let barrier_changed = self.track_sync_barrier();
            let suspension_changed = self.track_suspended();
            if barrier_changed || suspension_changed || last_hb.elapsed() >= self.cfg.heartbeat {
                self.heartbeat();
                last_hb = Instant::now();
            }
            if polled {
                self.do_work();
            }
            if self.stopped && self.no_longer_needed() {
                info!("machine stopped and no job needs its disks: agent exits");
                return Ok(());
            }
            // Group points close at agreed times: wake for the next one, and
            // tick before anything that may wait on the network.
            let nap = Duration::from_millis(50);
            std::thread::sleep(self.next_group.map_or(nap, |every| {
                let every = every.as_nanos().max(1) as u64;
                Duration::from_nanos(every - now_ns() % every).min(nap)
            }));
            let before = self.stream.rung();
            self.replicate();
            if self.stream.rung() != before {
                self.heartbeat();
                last_hb = Instant::now();
            }
        }
        Ok(())
    }

    /// Follow the machine's `suspended` marker: hold writes while it exists.
    /// Returns whether the state changed.
    fn track_suspended(&mut self) -> bool {
        let want = self.machine.is_suspended();
        if want == self.hold.suspended.load(SeqCst) {
            return false;
        }
        {
            let _g = self.hold.gate.write().unwrap_or_else(|p| p.into_inner());
            self.hold.suspended.store(want, SeqCst);
        }
        if want {
            info!("machine suspended: writes held");
        } else {
            info!("machine resumed: writes released");
        }
        true
    }

    fn refresh_item(&mut self) {
        match self.api.item(&self.manifest.name) {
            Ok(item) => {
                let role = self.our_role(&item);
                let ours = role == Some(item.active_site)
                    || (item.state.phase == Phase::FailingOver
                        && role == Some(item.state.direction.target()));
                if ours && !self.stopped && item.agent_id.as_deref() != Some(&self.id.component_id)
                {
                    match self.api.attach_agent(&item.id) {
                        Ok(i) => {
                            info!(item = %i.id, "attached to the item");
                            self.item = Some(i);
                            return;
                        }
                        Err(e) => warn!(error = %e, "attaching to the item failed"),
                    }
                }
                self.item = Some(item);
            }
            Err(crate::client::CallError::Api { status: 404, .. }) => self.item = None,
            Err(e) => warn!(error = %e, "reading the item failed"),
        }
    }

    fn is_our_agent(&self) -> bool {
        self.item
            .as_ref()
            .is_some_and(|i| i.agent_id.as_deref() == Some(self.id.component_id.as_str()))
    }

    /// Take a barrier when a master target is about to pull a whole-disk
    /// sync (enable protection, reprotect); acknowledge it once the job
    /// succeeded, drop it if the job failed. Returns whether it changed.
    fn track_sync_barrier(&mut self) -> bool {
        let Some(item) = self.item.clone() else {
            return false;
        };
        if !self.is_our_agent() {
            return false;
        }
        let syncing = matches!(
            item.state.phase,
            Phase::EnablingProtection | Phase::Reprotecting
        ) && self.our_role(&item) == Some(item.state.direction.source());
        match (&self.sync_barrier, syncing, &item.job_id) {
            (None, true, Some(job)) => {
                let mut markers = Vec::new();
                for e in &self.exports {
                    let Some(t) = e.tracker() else { continue };
                    match t.barrier() {
                        Ok(m) => markers.push(m.0),
                        Err(err) => {
                            warn!(error = %err, "barrier failed");
                            return false;
                        }
                    }
                }
                let b = SyncBarrier {
                    job: job.clone(),
                    markers,
                    at_ns: now_ns(),
                };
                if self.save_barrier(Some(&b)).is_err() {
                    return false;
                }
                info!(job = %b.job, "barrier taken for the master target's sync");
                self.sync_barrier = Some(b);
                true
            }
            (Some(b), false, _) => {
                let b = b.clone();
                let succeeded = item.state.phase == Phase::Protected
                    && self.our_role(&item) == Some(item.state.direction.source());
                if succeeded {
                    // Everything queued before the sync is in the new replica:
                    // older changesets must not follow it anywhere (the
                    // stream is off during the sync; it restarts with a
                    // resync of the leaves marked since the barrier).
                    self.stream.capture().stop();
                    self.shipper.set_target(None);
                    self.shipper.clear_outbox(self.spool().assigned());
                    self.spool().forget_points();
                    for (e, m) in self.exports.iter().zip(&b.markers) {
                        if let Some(t) = e.tracker() {
                            let leaves = t.leaf_count();
                            let all = 0..leaves;
                            let cleared = t.acknowledge(Marker(*m), std::slice::from_ref(&all));
                            let _ = t.persist();
                            info!(disk = e.name(), cleared, "sync acknowledged");
                        }
                    }
                } else {
                    info!(job = %b.job, "sync did not complete; leaves stay marked");
                }
                let _ = self.save_barrier(None);
                self.sync_barrier = None;
                true
            }
            (Some(b), true, Some(job)) if &b.job != job => {
                // A new job while an old barrier was pending: start over.
                let _ = self.save_barrier(None);
                self.sync_barrier = None;
                true
            }
            _ => false,
        }
    }

    fn save_barrier(&self, b: Option<&SyncBarrier>) -> anyhow::Result<()> {
        let p = self.machine.state_dir().join("sync-barrier.json");
        match b {
            Some(b) => rebound_disk::crashsafe::write_file_durable(&p, &serde_json::to_vec(b)?)?,
            None => {
                if p.exists() {
                    rebound_disk::crashsafe::remove_file_durable(&p)?;
                }
            }
        }
        Ok(())
    }

    fn should_replicate(&self) -> bool {
        let Some(item) = &self.item else {
            return false;
        };
        !self.stopped
            && self.is_our_agent()
            && self.sync_barrier.is_none()
            && replicating(item.state.phase)
            && self.our_role(item) == Some(item.state.direction.source())
            && item.process_server_id.is_some()
    }

    /// The item's crash-consistent and app-consistent intervals (its
    /// policy's, read again every 30 s; the agent's configured interval and
    /// the hooks' own period when there is none).
    fn intervals(&mut self) -> (Duration, Duration) {
        let fallback = (
            self.cfg.interval,
            Duration::from_secs(self.hooks.as_ref().map_or(3600, |h| h.every_secs)),
        );
        let Some(pid) = self.item.as_ref().and_then(|i| i.policy_id.clone()) else {
            return fallback;
        };
        let fresh = self
            .policy
            .as_ref()
            .is_some_and(|(id, _, _, at)| *id == pid && at.elapsed() < POLICY_EVERY);
        if !fresh {
            match self.api.policy(&pid) {
                Ok(p) => {
                    let crash = Duration::from_secs(p.crash_consistent_frequency_secs.max(1));
                    let app = Duration::from_secs(p.app_consistent_frequency_secs.max(1));
                    if self
                        .policy
                        .as_ref()
                        .is_none_or(|(_, c, a, _)| (*c, *a) != (crash, app))
                    {
                        info!(policy = %pid, crash_secs = crash.as_secs(), app_secs = app.as_secs(), "recovery point intervals");
                    }
                    self.policy = Some((pid, crash, app, Instant::now()));
                }
                Err(e) => {
                    debug!(error = %e, "reading the policy failed");
                    if self.policy.is_none() {
                        return fallback;
                    }
                }
            }
        }
        self.policy
            .as_ref()
            .map_or(fallback, |(_, c, a, _)| (*c, *a))
    }

    /// Keep the change stream in step with the item (`StreamControl`: start
    /// it with a resync when the agent should replicate, stop it when not,
    /// climb the overload ladder, close points, clear applied marks); run
    /// the freeze/thaw hooks when an app-consistent point is due.
    fn replicate(&mut self) {
        let want = self.should_replicate();
        if want && let Some(item) = &self.item {
            self.spool().set_owner(Some(StreamOwner {
                item: item.id.clone(),
                agent: self.id.component_id.clone(),
            }));
            self.shipper
                .set_target(item.process_server_id.clone().map(|ps| ShipTarget {
                    item_id: item.id.clone(),
                    process_server_id: ps,
                }));
        }
        let progress = self
            .item
            .as_ref()
            .and_then(|i| i.replica_progress.as_ref())
            .filter(|p| p.agent_id == self.id.component_id)
            .map(|p| Progress {
                applied_seq: p.applied_seq,
                gap_expected: p.gap.as_ref().map(|g| g.expected_seq),
                gap_found: p.gap.as_ref().and_then(|g| g.found_seq),
            });
        let (crash, app) = if want {
            self.intervals()
        } else {
            (self.cfg.interval, Duration::MAX)
        };
        let inputs = Inputs {
            want,
            progress,
            outbox_bytes: changeset::queued_bytes(&outbox(&self.machine)),
            outbox_limit: outbox_limit(),
            shipping_failed: self.shipper.failing(),
            crash_every: crash,
            app_every: self.hooks.as_ref().map(|_| app),
            group: self.item.as_ref().is_some_and(|i| i.group_id.is_some()),
            wall_ns: now_ns(),
        };
        let now = Instant::now();
        let tick = self.stream.tick(now, &inputs);
        if tick.app_due {
            self.app_point(now);
        }
        self.next_group = (inputs.group && want).then_some(inputs.crash_every);
    }

    /// Freeze the application, close an app-consistent point, thaw.
    fn app_point(&mut self, now: Instant) {
        let Some(h) = self.hooks.clone() else { return };
        let closes = match run_hook(&h.freeze, "freeze") {
            Ok(()) => Closes::AppConsistent,
            Err(e) => {
                warn!(error = %e, "freeze failed: this point is crash-consistent only");
                Closes::CrashConsistent
            }
        };
        let closed = self.stream.app_point(now, closes);
        if closes == Closes::AppConsistent
            && let Err(e) = run_hook(&h.thaw, "thaw")
        {
            warn!(error = %e, "thaw failed");
        }
        if closed {
            info!(?closes, "application-consistent point closed");
        }
    }

    fn spool(&self) -> &Spool {
        self.stream.spool()
    }

    fn replication_facts(&self) -> Option<ReplicationFacts> {
        if !self.should_replicate() {
            return None;
        }
        let backlog = self
            .stream
            .backlog(changeset::queued_bytes(&outbox(&self.machine)));
        let resync = self.spool().resync_left();
        let rate = self.shipper.rate();
        Some(ReplicationFacts {
            state: match self.stream.rung() {
                Rung::Streaming => ReplicationState::Streaming,
                Rung::Backlogged => ReplicationState::Backlogged,
                Rung::Resyncing => ReplicationState::Resyncing,
            },
            backlog_bytes: backlog,
            resync_bytes: resync,
            eta_secs: (rate > 0).then(|| (backlog + resync).div_ceil(rate)),
            captured_seq: self.spool().last_closed(),
            shipped_seq: self.shipper.shipped_seq(),
            applied_seq: self.stream.applied_seq(),
        })
    }

    /// Steps assigned to this agent (stop the source for phase 2).
    fn do_work(&mut self) {
        let work = match self.api.work() {
            Ok(w) => w,
            Err(e) => {
                warn!(error = %e, "polling work failed");
                return;
            }
        };
        for w in work {
            let span = info_span!("step", job = %w.job_id, step = %w.step);
            let _g = span.enter();
            let res = match w.step.as_str() {
                "stop_source" => {
                    self.stop_machine();
                    // Stopped on purpose: the node must not restart it.
                    let _ = std::fs::remove_file(self.machine.dir.join("want-running"));
                    // Writes are over: a last point brings the journal to the
                    // machine's final state. Best effort: the final delta
                    // sync compares the disks themselves.
                    self.final_point();
                    Ok(())
                }
                other => Err(anyhow::anyhow!("an agent does not run step {other}")),
            };
            let report = match res {
                Ok(()) => StepReport {
                    state: StepState::Done,
                    bytes_done: 0,
                    bytes_total: 0,
                    error_code: None,
                    message: Some(format!("machine {} stopped", self.manifest.name)),
                },
                Err(e) => StepReport {
                    state: StepState::Failed,
                    bytes_done: 0,
                    bytes_total: 0,
                    error_code: Some(rebound_types::ErrorCode::InvalidRequest.number()),
                    message: Some(e.to_string()),
                },
            };
            if let Err(e) = self.api.report(&w.job_id, w.step_index, &report) {
                warn!(error = %e, "reporting the step failed");
            }
            self.heartbeat();
        }
    }

    /// After the machine stopped: close a last point and give the shipper a
    /// moment to hand it to the process server.
    fn final_point(&mut self) {
        if self
            .stream
            .capture()
            .barrier(Closes::CrashConsistent)
            .is_none()
        {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut closed = false;
        while Instant::now() < deadline {
            if !closed && self.spool().floor() > self.spool().assigned() {
                closed = true;
            }
            if closed && changeset::queued(&outbox(&self.machine)).is_ok_and(|q| q.is_empty()) {
                info!("last point handed to the process server");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        warn!(
            "the last point is still in the outbox; it ships when the process server can take it"
        );
    }

    fn no_longer_needed(&self) -> bool {
        match &self.item {
            None => true,
            Some(i) => i.job_id.is_none() && !is_job_phase(i.state.phase),
        }
    }
}

fn is_job_phase(p: Phase) -> bool {
    !matches!(
        p,
        Phase::Unprotected
            | Phase::Protected
            | Phase::TestFailoverActive
            | Phase::CommitPending
            | Phase::Committed
    )
}

fn replicating(p: Phase) -> bool {
    matches!(
        p,
        Phase::Protected
            | Phase::TestFailoverStarting
            | Phase::TestFailoverActive
            | Phase::TestFailoverCleaning
            | Phase::FailoverSyncing
            | Phase::FailoverSynced
    )
}

pub fn remote_addr(host_port: &str, name: &str) -> anyhow::Result<RemoteAddr> {
    match RemoteAddr::parse(&format!("rebound://{host_port}/{name}")) {
        Some(Ok(a)) => Ok(a),
        Some(Err(e)) => Err(e.into()),
        None => bail!("{host_port}: not a data port address"),
    }
}
