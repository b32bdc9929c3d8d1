//! The master target role.
//!
//! - **Replica** of an item at this site: base disks on a datastore
//!   (`<datastore>/<item>/<disk>.img`) plus the journal on a retention volume;
//!   `DATA/replicas/<item>.json` says where both are. Changesets arriving in
//!   `DATA/incoming/<item>/` are appended in sequence order, each closing a
//!   recovery point that is reported to the configuration server.
//! - **Steps** of jobs assigned to it (DESIGN.md §2): whole-disk syncs pull
//!   the source agent's disks into a **staged** copy
//!   (`DATA/staging/<item>/<job>/`), switched in only when the job gets
//!   there; a cancelled or failed job's staging is deleted, so the
//!   destination is exactly as before.
//! - Machines created by failover or failback live on its host (`local`
//!   driver).

use crate::agent::{MANIFEST_COPY, remote_addr};
use crate::client::Api;
use crate::machine::{self, Machine, Manifest};
use anyhow::{Context, anyhow};
use rebound_agent::changeset::{self, Closes};
use rebound_api::{
    Action, FailoverKind, Item, Job, Location, NewRecoveryPoint, Phase, PointKind, StepReport,
    StepState, WorkItem,
};
use rebound_delta::{Options, Progress, Report};
use rebound_disk::crashsafe;
use rebound_journal::{Changeset, DiskSpec, Journal, Target};
use rebound_types::ErrorCode;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::{debug, info, info_span, warn};

/// What the master target role needs to know about its node.
#[derive(Clone, Debug)]
pub struct TargetConfig {
    pub data_root: PathBuf,
    pub host_dir: PathBuf,
    pub datastores: Vec<(String, PathBuf)>,
    pub retention_volumes: Vec<PathBuf>,
    pub site: String,
    pub server: String,
    pub registration_key: String,
    pub rebound_exe: PathBuf,
}

/// Where an item's replica lives on this master target.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicaMeta {
    pub item_id: String,
    pub item_name: String,
    pub datastore: PathBuf,
    pub volume: PathBuf,
    pub disks: Vec<(String, u64)>,
    /// Distinguishes this replica's point ids from an earlier replica's.
    pub tag: String,
    /// Changesets whose barrier is older than this are already in the base.
    pub base_after_ns: u64,
    pub applied_seq: u64,
    /// The agent whose stream `applied_seq` counts (its component id).
    #[serde(default)]
    pub agent: String,
    pub manifest: Option<Manifest>,
}

pub struct TargetRole {
    cfg: TargetConfig,
    api: Api,
    token: rebound_wire::Token,
    journals: Mutex<HashMap<String, Journal>>,
    running: Mutex<HashSet<(String, u32)>>,
    facts_hook: std::sync::OnceLock<FactsHook>,
}

/// Sends the node's heartbeat with fresh facts.
pub type FactsHook = Arc<dyn Fn() + Send + Sync>;

/// How often the master target folds journals past their retention window.
const FOLD_EVERY: Duration = Duration::from_secs(30);

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn rfc3339(ns: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_nanos(ns);
    humantime_rfc3339(t)
}

fn humantime_rfc3339(t: SystemTime) -> String {
    // Milliseconds, like the API's other timestamps.
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let ms = d.subsec_millis();
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, dd) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A step's outcome: done with a message, or failed with a code.
struct StepError {
    code: ErrorCode,
    message: String,
}

impl<E: std::fmt::Display> From<E> for StepError {
    fn from(e: E) -> Self {
        StepError {
            code: ErrorCode::ComponentUnreachable,
            message: format!("{e:#}"),
        }
    }
}

fn fail(code: ErrorCode, message: impl Into<String>) -> StepError {
    StepError {
        code,
        message: message.into(),
    }
}

impl TargetRole {
    pub fn new(cfg: TargetConfig, api: Api, token: rebound_wire::Token) -> Arc<TargetRole> {
        Arc::new(TargetRole {
            cfg,
            api,
            token,
            journals: Mutex::new(HashMap::new()),
            running: Mutex::new(HashSet::new()),
            facts_hook: std::sync::OnceLock::new(),
        })
    }

    /// How to report fresh facts after a step changed them.
    pub fn set_facts_hook(&self, hook: FactsHook) {
        let _ = self.facts_hook.set(hook);
    }

    fn replicas_dir(&self) -> PathBuf {
        self.cfg.data_root.join("replicas")
    }

    fn meta_path(&self, item_id: &str) -> PathBuf {
        self.replicas_dir().join(format!("{item_id}.json"))
    }

    pub fn replica(&self, item_id: &str) -> Option<ReplicaMeta> {
        let b = std::fs::read(self.meta_path(item_id)).ok()?;
        serde_json::from_slice(&b).ok()
    }

    fn save_replica(&self, m: &ReplicaMeta) -> anyhow::Result<()> {
        crashsafe::create_dir_all_durable(&self.replicas_dir())?;
        crashsafe::write_file_durable(&self.meta_path(&m.item_id), &serde_json::to_vec_pretty(m)?)?;
        Ok(())
    }

    fn incoming(&self, item_id: &str) -> PathBuf {
        self.cfg.data_root.join("incoming").join(item_id)
    }

    fn staging(&self, item_id: &str, job: &str) -> PathBuf {
        self.cfg.data_root.join("staging").join(item_id).join(job)
    }

    /// Machines on this node's host (for facts and name checks).
    pub fn machines(&self) -> Vec<Machine> {
        machine::list(&self.cfg.host_dir)
    }

    fn datastore_for(&self, item: &Item, job: Option<&Job>) -> Result<PathBuf, StepError> {
        let name = job
            .and_then(|j| j.request.datastore.clone())
            .or_else(|| item.datastore.clone());
        match name {
            None => self
                .cfg
                .datastores
                .first()
                .map(|(_, p)| p.clone())
                .ok_or_else(|| {
                    fail(
                        ErrorCode::DatastoreInaccessible,
                        "this master target has no datastore",
                    )
                }),
            Some(n) => self
                .cfg
                .datastores
                .iter()
                .find(|(dn, p)| *dn == n || p.display().to_string() == n)
                .map(|(_, p)| p.clone())
                .ok_or_else(|| {
                    fail(
                        ErrorCode::DatastoreInaccessible,
                        format!("datastore {n:?} is not one of this master target's"),
                    )
                }),
        }
    }

    fn volume_for(&self, item: &Item, job: Option<&Job>) -> Result<PathBuf, StepError> {
        let v = job
            .and_then(|j| j.request.retention_volume.clone())
            .or_else(|| item.retention_volume.clone());
        match v {
            None => self.cfg.retention_volumes.first().cloned().ok_or_else(|| {
                fail(
                    ErrorCode::RetentionVolumeIneligible,
                    "this master target has no retention volume",
                )
            }),
            Some(v) => Ok(PathBuf::from(v)),
        }
    }

    // ------------------------------------------------------------ applier

    /// Append arriving changesets to their journals, in order; fold what
    /// left the retention window into the base now and then.
    pub fn apply_loop(self: &Arc<Self>, stop: Arc<AtomicBool>) {
        let mut last_fold = Instant::now();
        let mut verified = changeset::VerifyCache::default();
        while !stop.load(SeqCst) {
            if last_fold.elapsed() >= FOLD_EVERY {
                last_fold = Instant::now();
                self.fold_all();
                verified.retain_existing();
            }
            let items: Vec<String> = std::fs::read_dir(self.cfg.data_root.join("incoming"))
                .map(|rd| {
                    rd.flatten()
                        .filter_map(|e| e.file_name().to_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            for item in items {
                if let Err(e) = self.apply_item(&item, &mut verified) {
                    warn!(item = %item, error = %e, "applying changesets failed");
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Retention: fold changesets older than the item's policy window into
    /// the base, only while the item is plainly protected (a failover keeps
    /// its window until commit; the journal never folds past a pin).
    fn fold_all(&self) {
        let Ok(rd) = std::fs::read_dir(self.replicas_dir()) else {
            return;
        };
        for e in rd.flatten() {
            let Some(id) = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .map(String::from)
            else {
                continue;
            };
            let Some(meta) = self.replica(&id) else {
                continue;
            };
            let window = match self.api.item(&id) {
                Ok(item) if item.state.phase == Phase::Protected => item
                    .policy_id
                    .and_then(|p| {
                        self.api
                            .get::<rebound_api::Policy>(&format!("/policies/{p}"))
                            .ok()
                    })
                    .map(|p| p.retention_secs),
                _ => None,
            };
            let Some(secs) = window else { continue };
            match self.with_journal(&meta, |j| {
                Ok(j.fold(now_ns(), secs.saturating_mul(1_000_000_000))?)
            }) {
                Ok(r) => tracing::debug!(item = %id, report = ?r, "retention fold"),
                Err(e) => warn!(item = %id, error = %e, "retention fold failed"),
            }
        }
    }

    fn with_journal<T>(
        &self,
        meta: &ReplicaMeta,
        f: impl FnOnce(&mut Journal) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let mut g = self.journals.lock().unwrap_or_else(|p| p.into_inner());
        if !g.contains_key(&meta.item_id) {
            let j = Journal::open(&meta.volume, &meta.item_id, Default::default())?;
            g.insert(meta.item_id.clone(), j);
        }
        let j = g
            .get_mut(&meta.item_id)
            .ok_or_else(|| anyhow!("journal of {} not open", meta.item_id))?;
        f(j)
    }

    fn forget_journal(&self, item_id: &str) {
        self.journals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(item_id);
    }

    /// Apply arriving changesets in stream order. Continuity is checked:
    /// the next file of the replica's agent must be `applied + 1`, or a
    /// `restart` (a resync covering everything not applied); anything else
    /// — a missing, corrupt or foreign file — stops the apply at the last
    /// good point and is reported as a gap, so the agent resynchronises.
    fn apply_item(
        &self,
        item_id: &str,
        verified: &mut changeset::VerifyCache,
    ) -> anyhow::Result<()> {
        let dir = self.incoming(item_id);
        let queued = changeset::queued(&dir)?;
        if queued.is_empty() {
            return Ok(());
        }
        let Some(mut meta) = self.replica(item_id) else {
            // No replica yet (its sync is running): the changesets wait.
            return Ok(());
        };
        let headers: Vec<Option<changeset::Header>> = queued
            .iter()
            .map(|(_, p)| verified.verify(p).ok())
            .collect();
        // A restart supersedes everything queued before it.
        let start = headers
            .iter()
            .rposition(|h| {
                h.as_ref().is_some_and(|h| {
                    h.restart
                        && h.barrier_ns > meta.base_after_ns
                        && (h.agent != meta.agent || h.seq > meta.applied_seq)
                })
            })
            .unwrap_or(0);
        for (_, p) in &queued[..start] {
            crashsafe::remove_file_durable(p)?;
        }
        let before = (meta.agent.clone(), meta.applied_seq);
        let mut gap = None;
        // Whose stream has the gap (the replica may have applied none yet).
        let mut gap_agent: Option<String> = None;
        for (i, (seq, path)) in queued.iter().enumerate().skip(start) {
            let seq = *seq;
            let Some(header) = headers[i].clone() else {
                // The process server forwards in order: a later complete
                // file means this one will never be whole (judged on a fresh
                // hash, not on a remembered verdict).
                if headers[i + 1..].iter().any(Option::is_some) && changeset::verify(path).is_err()
                {
                    if let Ok(h) = changeset::header_of(path)
                        && !h.agent.is_empty()
                    {
                        gap_agent = Some(h.agent);
                    }
                    let aside = dir.join("rejected");
                    crashsafe::create_dir_all_durable(&aside)?;
                    crashsafe::durable_rename(path, &aside.join(changeset::file_name(seq)))?;
                    warn!(
                        item = item_id,
                        seq, "corrupt changeset set aside: the apply stops here"
                    );
                    gap = Some((seq, format!("changeset {seq} is corrupt")));
                } else {
                    debug!(seq, "changeset not complete yet");
                }
                break;
            };
            if header.item != item_id || header.disk_sizes.len() != meta.disks.len() {
                // Never applied, never blocking: kept as evidence, and the
                // gap makes the agent resynchronise.
                let aside = dir.join("rejected");
                crashsafe::create_dir_all_durable(&aside)?;
                crashsafe::durable_rename(path, &aside.join(changeset::file_name(seq)))?;
                warn!(
                    item = item_id,
                    seq,
                    code = ErrorCode::InvalidRequest.number(),
                    "changeset does not match the replica (item {}, {} disks): set aside",
                    header.item,
                    header.disk_sizes.len()
                );
                gap_agent = Some(header.agent.clone());
                gap = Some((seq, format!("changeset {seq} does not match the replica")));
                break;
            }
            let same = header.agent == meta.agent;
            let stale = header.barrier_ns <= meta.base_after_ns
                || (same && seq <= meta.applied_seq)
                || (meta.agent.is_empty() && !header.restart);
            if stale {
                // Already applied, older than the replica's base, or from
                // before the replica's stream started.
                crashsafe::remove_file_durable(path)?;
                continue;
            }
            if !(header.restart || (same && seq == meta.applied_seq + 1)) {
                gap_agent = Some(header.agent.clone());
                gap = Some((
                    seq,
                    if same {
                        format!("changeset {} is missing", meta.applied_seq + 1)
                    } else {
                        format!("changeset {seq} of another agent without a restart")
                    },
                ));
                warn!(
                    item = item_id,
                    seq,
                    applied = meta.applied_seq,
                    "gap in the stream: the apply stops here"
                );
                break;
            }
            self.apply_file(&meta, item_id, path, &header)?;
            meta.agent = header.agent.clone();
            meta.applied_seq = seq;
            self.save_replica(&meta)?;
            crashsafe::remove_file_durable(path)?;
        }
        if gap.is_some() || (meta.agent.clone(), meta.applied_seq) != before {
            let agent_id = gap_agent
                .filter(|a| !a.is_empty() && gap.is_some())
                .unwrap_or_else(|| meta.agent.clone());
            if agent_id.is_empty() {
                warn!(
                    item = item_id,
                    "a gap in a stream whose agent is unknown: not reported"
                );
                return Ok(());
            }
            // Another agent's stream has applied nothing on this replica.
            let applied_seq = if agent_id == meta.agent {
                meta.applied_seq
            } else {
                0
            };
            let progress = rebound_api::ReplicaProgress {
                agent_id,
                applied_seq,
                gap: gap.map(|(found, reason)| rebound_api::StreamGap {
                    expected_seq: applied_seq + 1,
                    found_seq: Some(found),
                    reason,
                }),
                updated_at: None,
            };
            if let Err(e) = self.api.report_progress(item_id, &progress) {
                warn!(error = %e, "reporting the stream's progress failed");
            }
        }
        Ok(())
    }

    /// Append one verified changeset to the journal (in bounded parts; only
    /// the last closes its point) and report the point.
    fn apply_file(
        &self,
        meta: &ReplicaMeta,
        item_id: &str,
        path: &Path,
        header: &changeset::Header,
    ) -> anyhow::Result<()> {
        // Bounds the master target's memory per changeset being applied.
        const PART: usize = 16 << 20;
        let kind = match header.closes {
            Closes::Nothing => None,
            Closes::CrashConsistent => Some(rebound_journal::PointKind::CrashConsistent),
            Closes::AppConsistent => Some(rebound_journal::PointKind::AppConsistent),
            Closes::Group => Some(rebound_journal::PointKind::Group),
        };
        let at = header.barrier_ns;
        // A group point's marker is its barrier time, agreed by every member.
        let marker = (header.closes == Closes::Group).then(|| at.to_string());
        let point = self.with_journal(meta, |j| {
            let mut cs = Changeset::new().at(at);
            let mut bytes = 0usize;
            let mut flush =
                |cs: &mut Changeset, bytes: &mut usize| -> Result<(), changeset::ChangesetError> {
                    if *bytes >= PART {
                        let part = std::mem::replace(cs, Changeset::new().at(at));
                        j.append(&part)
                            .map_err(|e| changeset::ChangesetError::Invalid(e.to_string()))?;
                        *bytes = 0;
                    }
                    Ok(())
                };
            changeset::read_records(path, |r| {
                match r {
                    changeset::Record::Data { disk, offset, data } => {
                        bytes += data.len();
                        cs.writes
                            .push(rebound_journal::Write { disk, offset, data });
                        flush(&mut cs, &mut bytes)?;
                    }
                    changeset::Record::Zero { disk, offset, len } => {
                        // The journal keeps data: zeros are written out, in
                        // bounded pieces.
                        let mut off = offset;
                        while off < offset + len {
                            let n = (offset + len - off).min(8 << 20);
                            bytes += n as usize;
                            cs.writes.push(rebound_journal::Write {
                                disk,
                                offset: off,
                                data: vec![0u8; n as usize],
                            });
                            flush(&mut cs, &mut bytes)?;
                            off += n;
                        }
                    }
                }
                Ok(())
            })
            .map_err(|e| anyhow!("{e}"))?;
            let cs = match (kind, &marker) {
                (Some(_), Some(m)) => cs.group_point(m.clone()),
                (Some(k), None) => cs.point(k),
                (None, _) => cs,
            };
            Ok(j.append(&cs)?.point)
        })?;
        if let (Some(p), Some(kind)) = (point, kind) {
            let r = self.api.report_point(
                item_id,
                &NewRecoveryPoint {
                    id: format!("{}.{p}", meta.tag),
                    time: Some(rfc3339(at)),
                    kind: match kind {
                        rebound_journal::PointKind::AppConsistent => PointKind::AppConsistent,
                        _ => PointKind::CrashConsistent,
                    },
                    group_marker: marker.clone(),
                    barrier_ns: Some(at),
                },
            );
            if let Err(e) = r {
                warn!(error = %e, "reporting the recovery point failed");
            }
            info!(
                item = item_id,
                seq = header.seq,
                point = p,
                "recovery point"
            );
        }
        Ok(())
    }

    // ------------------------------------------------------------ steps

    /// Poll the configuration server for steps and run each on a thread.
    pub fn work_loop(self: &Arc<Self>, stop: Arc<AtomicBool>) {
        let mut last_gc = Instant::now();
        while !stop.load(SeqCst) {
            match self.api.work() {
                Ok(work) => {
                    for w in work {
                        let key = (w.job_id.clone(), w.step_index);
                        let fresh = self
                            .running
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(key.clone());
                        if fresh {
                            let me = self.clone();
                            std::thread::spawn(move || {
                                me.run_step(&w);
                                me.running
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .remove(&key);
                            });
                        }
                    }
                }
                Err(e) => warn!(error = %e, "polling work failed"),
            }
            if last_gc.elapsed() > Duration::from_secs(2) {
                last_gc = Instant::now();
                self.collect_staging();
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Remove the staging of jobs that ended (cancelled, failed or done).
    fn collect_staging(&self) {
        let root = self.cfg.data_root.join("staging");
        let Ok(items) = std::fs::read_dir(&root) else {
            return;
        };
        for item in items.flatten() {
            let Ok(jobs) = std::fs::read_dir(item.path()) else {
                continue;
            };
            for job in jobs.flatten() {
                let Some(id) = job.file_name().to_str().map(String::from) else {
                    continue;
                };
                let ended = match self.api.job(&id) {
                    Ok(j) => j.state.is_finished(),
                    Err(crate::client::CallError::Api { status: 404, .. }) => true,
                    Err(_) => false,
                };
                if ended {
                    info!(job = %id, "removing the staging of an ended job");
                    let _ = crashsafe::remove_dir_all_durable(&job.path());
                }
            }
        }
    }

    fn report(
        &self,
        w: &WorkItem,
        state: StepState,
        done: u64,
        total: u64,
        msg: Option<String>,
        code: Option<ErrorCode>,
    ) {
        let r = StepReport {
            state,
            bytes_done: done,
            bytes_total: total,
            error_code: code.map(|c| c.number()),
            message: msg,
        };
        if let Err(e) = self.api.report(&w.job_id, w.step_index, &r) {
            warn!(job = %w.job_id, error = %e, "reporting the step failed");
        }
    }

    fn run_step(self: &Arc<Self>, w: &WorkItem) {
        let span = info_span!("step", job = %w.job_id, step = %w.step, item = ?w.item_id);
        let _g = span.enter();
        info!("step started");
        let res = self.step(w);
        if let Some(hook) = self.facts_hook.get() {
            hook();
        }
        match res {
            Ok((msg, total)) => {
                info!(%msg, "step done");
                self.report(w, StepState::Done, total, total, Some(msg), None);
            }
            Err(e) => {
                warn!(code = %e.code.number(), error = %e.message, "step failed");
                self.report(w, StepState::Failed, 0, 0, Some(e.message), Some(e.code));
            }
        }
    }

    fn step(self: &Arc<Self>, w: &WorkItem) -> Result<(String, u64), StepError> {
        let item_id = w.item_id.clone().ok_or_else(|| {
            fail(
                ErrorCode::InvalidRequest,
                "a master target step needs an item",
            )
        })?;
        let item = self.api.item(&item_id)?;
        let job = self.api.job(&w.job_id)?;
        let planned = job.request.kind == Some(FailoverKind::Planned)
            || (job.request.kind.is_none() && job.action == Action::Failback);
        match w.step.as_str() {
            "initial_sync" => self.sync_replica(w, &item, &job, false),
            "count_differences" => self.count_differences(w, &item, &job),
            "delta_sync" if item.state.phase == Phase::Reprotecting => {
                self.sync_replica(w, &item, &job, true)
            }
            "delta_sync" | "final_delta_sync" => self.sync_staging(w, &item, &job, false),
            "full_download" => self.sync_staging(w, &item, &job, true),
            "verify" => self.verify(&item, &job),
            "materialise_point" => self.materialise_point(&item, &job),
            "start_destination" => self.start_destination(&item, &job, planned),
            "commit" => self.commit(&item),
            "stop_replication" => {
                self.drop_replica(&item.id)?;
                Ok(("replication stopped; replica removed".into(), 0))
            }
            "create_test_machine" => self.create_test_machine(&item, &job),
            "remove_test_machine" => {
                let m = Machine::at(self.cfg.host_dir.join(format!("{}-test", item.name)));
                m.stop(Duration::from_secs(30))?;
                let _ = crashsafe::remove_dir_all_durable(&m.dir);
                Ok(("test machine removed".into(), 0))
            }
            other => Err(fail(
                ErrorCode::InvalidRequest,
                format!("a master target does not run step {other}"),
            )),
        }
    }

    /// The source agent's data port, once it has taken the barrier for this
    /// job (for syncs that start replication), or at once.
    fn source_agent(
        &self,
        item: &Item,
        job: &Job,
        need_barrier: bool,
    ) -> Result<String, StepError> {
        self.source_agent_barrier(item, job, need_barrier)
            .map(|(addr, _)| addr)
    }

    /// [`Self::source_agent`] and, with a barrier, when the agent took it
    /// (its own clock).
    fn source_agent_barrier(
        &self,
        item: &Item,
        job: &Job,
        need_barrier: bool,
    ) -> Result<(String, Option<u64>), StepError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let fresh = self.api.item(&item.id)?;
            if let Some(agent_id) = &fresh.agent_id {
                let agent = self.api.component(agent_id)?;
                let barrier_ok = !need_barrier
                    || agent.agent.as_ref().and_then(|a| a.sync_barrier.as_deref())
                        == Some(job.id.as_str());
                if let (Some(addr), true) = (agent.data_addr.clone(), barrier_ok) {
                    let at = agent.agent.as_ref().and_then(|a| a.sync_barrier_ns);
                    return Ok((addr, at));
                }
            }
            if Instant::now() > deadline {
                return Err(fail(
                    ErrorCode::AgentUnreachable,
                    format!(
                        "the agent of {} did not get ready for the sync within 60 s",
                        item.name
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn disk_names(item: &Item) -> Vec<(String, u64)> {
        item.disks
            .iter()
            .map(|d| (d.name.clone(), d.size_bytes))
            .collect()
    }

    /// Fail if the job ended or a cancel was asked: a step that outlived
    /// its job must not change anything.
    fn ensure_job_open(&self, job: &Job) -> Result<(), StepError> {
        let j = self.api.job(&job.id)?;
        if j.state.is_finished() || j.cancel_requested {
            return Err(fail(
                ErrorCode::JobCancelled,
                format!("job {} is {}: the step stops", j.id, j.state),
            ));
        }
        Ok(())
    }

    /// Pull every disk of the item from `addr` into `dir`, reporting progress.
    /// If the source goes away (its agent restarted, with a new data port),
    /// resume from the persistent cursor for up to 30 s, re-reading the
    /// agent's address from the configuration server.
    #[allow(clippy::too_many_arguments)]
    fn pull_all(
        &self,
        w: &WorkItem,
        item: &Item,
        job: &Job,
        need_barrier: bool,
        addr: &str,
        dir: &Path,
        opts: &Options,
    ) -> Result<Vec<Report>, StepError> {
        let mut addr = addr.to_string();
        crashsafe::create_dir_all_durable(dir)?;
        let disks = Self::disk_names(item);
        let total: u64 = disks.iter().map(|d| d.1).sum();
        let mut done_before = 0u64;
        let mut reports = Vec::new();
        for (name, size) in &disks {
            let progress = Arc::new(Progress::default());
            let stop = Arc::new(AtomicBool::new(false));
            let reporter = {
                let (p, stop, me_api, w) =
                    (progress.clone(), stop.clone(), self.api.clone(), w.clone());
                let base = done_before;
                std::thread::spawn(move || {
                    while !stop.load(SeqCst) {
                        std::thread::sleep(Duration::from_millis(500));
                        let done = base + p.done.load(SeqCst);
                        let _ = me_api.report(
                            &w.job_id,
                            w.step_index,
                            &StepReport {
                                state: StepState::Running,
                                bytes_done: done.min(total),
                                bytes_total: total,
                                error_code: None,
                                message: None,
                            },
                        );
                    }
                })
            };
            let mut o = opts.clone();
            o.state_dir = Some(dir.join(".resume"));
            let deadline = Instant::now() + Duration::from_secs(30);
            let r = loop {
                let remote = match remote_addr(&addr, &format!("{name}.img")) {
                    Ok(r) => r,
                    Err(e) => break Err(e.into()),
                };
                match rebound_delta::pull(
                    &remote,
                    &dir.join(format!("{name}.img")),
                    &self.token,
                    &o,
                    Some(progress.clone()),
                ) {
                    Err(
                        e @ (rebound_delta::SyncError::Wire(_)
                        | rebound_delta::SyncError::Remote {
                            code: ErrorCode::ConnectFailed,
                            ..
                        }),
                    ) if Instant::now() < deadline => {
                        warn!(disk = %name, error = %e, "the source went away; resuming the sync");
                        std::thread::sleep(Duration::from_secs(1));
                        if let Err(e) = self.ensure_job_open(job) {
                            break Err(e);
                        }
                        match self.source_agent(item, job, need_barrier) {
                            Ok(a) => addr = a,
                            Err(e) => break Err(e),
                        }
                    }
                    other => {
                        break other.map_err(|e| {
                            fail(rebound_types::Coded::code(&e), format!("disk {name}: {e}"))
                        });
                    }
                }
            };
            stop.store(true, SeqCst);
            let _ = reporter.join();
            let r = r?;
            done_before += size;
            reports.push(r);
        }
        Ok(reports)
    }

    /// Compare each staged disk with the source's, writing nothing. A dry
    /// push from the staging: the comparing side counts the differing leaves
    /// (the same set either way) and both BLAKE3 roots are compared.
    fn compare_all(
        &self,
        item: &Item,
        addr: &str,
        dir: &Path,
    ) -> Result<Vec<(String, Report)>, StepError> {
        let mut out = Vec::new();
        for (name, _) in Self::disk_names(item) {
            let remote = remote_addr(addr, &format!("{name}.img"))?;
            let r = rebound_delta::push(
                &dir.join(format!("{name}.img")),
                &remote,
                &self.token,
                &Options {
                    dry_run: true,
                    ..Default::default()
                },
                None,
            )
            .map_err(|e| fail(rebound_types::Coded::code(&e), format!("disk {name}: {e}")))?;
            out.push((name, r));
        }
        Ok(out)
    }

    fn pull_manifest(&self, addr: &str, dir: &Path) -> Option<Manifest> {
        let remote = remote_addr(addr, MANIFEST_COPY).ok()?;
        let p = dir.join("manifest.json");
        let _ = std::fs::remove_file(&p);
        rebound_delta::pull(&remote, &p, &self.token, &Options::default(), None).ok()?;
        let m: Manifest = serde_json::from_slice(&std::fs::read(&p).ok()?).ok()?;
        Some(m)
    }

    /// The local machine that is the item's "original location" here.
    fn local_machine(&self, item: &Item) -> Option<Machine> {
        let m = Machine::at(self.cfg.host_dir.join(&item.name));
        m.manifest_path().is_file().then_some(m)
    }

    /// Seed a staging directory so the delta sync moves only differences:
    /// from this site's copy of the machine (original location) or from the
    /// replica's latest point. Local copies skip holes.
    fn seed(&self, item: &Item, job: &Job, dir: &Path) -> Result<&'static str, StepError> {
        crashsafe::create_dir_all_durable(dir)?;
        if dir.join(".seeded").exists() {
            return Ok("staging already seeded");
        }
        let alternate = job.request.location == Some(Location::Alternate);
        let disks = Self::disk_names(item);
        let what = if let (Some(meta), false) = (
            self.replica(&item.id),
            item.state.phase == Phase::Reprotecting,
        ) {
            let latest = self.with_journal(&meta, |j| Ok(j.latest().map(|p| p.id)))?;
            let targets: Vec<PathBuf> = disks
                .iter()
                .map(|(n, _)| dir.join(format!("{n}.img")))
                .collect();
            for t in &targets {
                let _ = std::fs::remove_file(t);
            }
            match latest {
                Some(p) => {
                    self.with_journal(
                        &meta,
                        |j| Ok(j.materialise(p, &Target::NewFiles(targets))?),
                    )?;
                    "the replica's latest point"
                }
                None => {
                    for ((n, _), t) in disks.iter().zip(&targets) {
                        sparse_copy(&meta.datastore.join(&item.id).join(format!("{n}.img")), t)?;
                    }
                    "the replica's base"
                }
            }
        } else if let (Some(m), false) = (self.local_machine(item), alternate) {
            if m.is_running() {
                return Err(fail(
                    ErrorCode::ActionNotAllowed,
                    format!("machine {} runs on this host; stop it first", item.name),
                ));
            }
            for (n, _) in &disks {
                sparse_copy(&m.disk_path(n), &dir.join(format!("{n}.img")))?;
            }
            "the machine's disks at this site"
        } else {
            // Empty (sparse) disks: the count and the sync compare against
            // zeros, so every non-zero leaf of the source is sent.
            for (n, size) in &disks {
                let d = rebound_disk::Disk::open_write(&dir.join(format!("{n}.img")), true)?;
                d.set_len(*size)?;
                d.sync_data()?;
            }
            "nothing (full copy)"
        };
        crashsafe::write_file_durable(&dir.join(".seeded"), what.as_bytes())?;
        Ok(what)
    }

    fn count_differences(
        &self,
        w: &WorkItem,
        item: &Item,
        job: &Job,
    ) -> Result<(String, u64), StepError> {
        let need_barrier = item.state.phase == Phase::Reprotecting;
        let addr = self.source_agent(item, job, need_barrier)?;
        let dir = self.staging(&item.id, &job.id);
        let seeded = self.seed(item, job, &dir)?;
        let started = Instant::now();
        let _ = w;
        let reports = self.compare_all(item, &addr, &dir)?;
        let differing: u64 = reports.iter().map(|(_, r)| r.bytes_differing).sum();
        let size: u64 = reports.iter().map(|(_, r)| r.size).sum();
        // The comparison read both sides; sending is bounded by the same
        // reads plus the differing bytes: estimate from this run's speed.
        let secs = started.elapsed().as_secs_f64();
        let eta = secs + differing as f64 / (200.0 * 1024.0 * 1024.0);
        Ok((
            format!(
                "{differing} bytes differ in {} disk(s) of {size} bytes (staging seeded from {seeded}); ETA {eta:.1} s",
                reports.len()
            ),
            differing,
        ))
    }

    /// Sync into the staging and keep it there (planned failover/failback).
    fn sync_staging(
        &self,
        w: &WorkItem,
        item: &Item,
        job: &Job,
        full: bool,
    ) -> Result<(String, u64), StepError> {
        let addr = self.source_agent(item, job, false)?;
        let dir = self.staging(&item.id, &job.id);
        if full {
            let _ = crashsafe::remove_dir_all_durable(&dir);
            crashsafe::create_dir_all_durable(&dir)?;
            crashsafe::write_file_durable(&dir.join(".seeded"), b"nothing (full download)")?;
        } else {
            self.seed(item, job, &dir)?;
        }
        if let Some(m) = self.pull_manifest(&addr, &dir) {
            crashsafe::write_file_durable(
                &dir.join("manifest.json"),
                &serde_json::to_vec_pretty(&m)?,
            )?;
        }
        let reports = self.pull_all(
            w,
            item,
            job,
            false,
            &addr,
            &dir,
            &Options {
                full,
                ..Default::default()
            },
        )?;
        let sent: u64 = reports.iter().map(|r| r.bytes_differing).sum();
        let wire: u64 = reports.iter().map(|r| r.wire_bytes_received).sum();
        Ok((
            format!(
                "{sent} differing bytes synced into the staging ({wire} bytes on the wire){}; roots verified",
                resumed_note(&reports)
            ),
            sent,
        ))
    }

    /// Sync into a staging then promote it to the item's replica and start a
    /// new journal: enable protection and reprotect.
    fn sync_replica(
        &self,
        w: &WorkItem,
        item: &Item,
        job: &Job,
        seeded: bool,
    ) -> Result<(String, u64), StepError> {
        let (addr, barrier_ns) = self.source_agent_barrier(item, job, true)?;
        // Changesets closed before the agent's barrier are in the synced
        // base already; compare on the agent's clock, not ours.
        let after = barrier_ns.unwrap_or_else(now_ns);
        let dir = self.staging(&item.id, &job.id);
        let from = if seeded {
            self.seed(item, job, &dir)?
        } else {
            crashsafe::create_dir_all_durable(&dir)?;
            "nothing (initial sync)"
        };
        let manifest = self.pull_manifest(&addr, &dir);
        let reports = self.pull_all(w, item, job, true, &addr, &dir, &Options::default())?;
        let sent: u64 = reports.iter().map(|r| r.bytes_differing).sum();
        // A cancelled job leaves the destination as it was: no replica.
        self.ensure_job_open(job)?;
        let datastore = self.datastore_for(item, Some(job))?;
        let volume = self.volume_for(item, Some(job))?;
        self.drop_replica(&item.id)?;
        let base_dir = datastore.join(&item.id);
        crashsafe::create_dir_all_durable(&base_dir)?;
        let disks = Self::disk_names(item);
        let mut specs = Vec::new();
        for (n, size) in &disks {
            let base = base_dir.join(format!("{n}.img"));
            crashsafe::durable_rename(&dir.join(format!("{n}.img")), &base)?;
            specs.push(DiskSpec {
                name: n.clone(),
                size: *size,
                base: Some(base),
            });
        }
        crashsafe::create_dir_all_durable(&volume)?;
        let journal = Journal::create(&volume, &item.id, &specs, Default::default())
            .map_err(|e| fail(rebound_types::Coded::code(&e), e.to_string()))?;
        drop(journal);
        let meta = ReplicaMeta {
            item_id: item.id.clone(),
            item_name: item.name.clone(),
            datastore,
            volume,
            disks,
            tag: format!("{:x}", after / 1_000_000),
            base_after_ns: after,
            applied_seq: 0,
            agent: String::new(),
            manifest,
        };
        self.save_replica(&meta)?;
        let _ = crashsafe::remove_dir_all_durable(&dir);
        Ok((
            format!(
                "replica ready: {sent} differing bytes synced (seeded from {from}){}; journal on {}",
                resumed_note(&reports),
                meta.volume.display()
            ),
            sent,
        ))
    }

    fn verify(&self, item: &Item, job: &Job) -> Result<(String, u64), StepError> {
        let addr = self.source_agent(item, job, false)?;
        let dir = self.staging(&item.id, &job.id);
        let mut roots = Vec::new();
        for (name, r) in self.compare_all(item, &addr, &dir)? {
            if !r.identical || r.leaves_differing != 0 {
                return Err(fail(
                    ErrorCode::VerifyMismatch,
                    format!(
                        "disk {name}: {} leaves still differ from the stopped source",
                        r.leaves_differing
                    ),
                ));
            }
            roots.push(format!(
                "{name}={}",
                &r.source_root[..16.min(r.source_root.len())]
            ));
        }
        Ok((
            format!(
                "staged disks equal the source: BLAKE3 roots {}",
                roots.join(" ")
            ),
            0,
        ))
    }

    /// The journal point an action asks for (`PointChoice`): its id and
    /// barrier time.
    fn choose_point(
        &self,
        meta: &ReplicaMeta,
        wanted: Option<&str>,
    ) -> Result<(u64, u64), StepError> {
        let wanted = wanted.map(str::to_string);
        self.with_journal(meta, |j| {
            let none = || anyhow!("the journal has no such recovery point");
            let p = match wanted.as_deref().map(rebound_api::PointChoice::parse) {
                None | Some(rebound_api::PointChoice::Latest) => {
                    j.latest().cloned().ok_or_else(none)?
                }
                Some(rebound_api::PointChoice::LatestProcessed) => {
                    j.latest_processed().cloned().ok_or_else(none)?
                }
                Some(rebound_api::PointChoice::LatestAppConsistent) => {
                    j.latest_app_consistent().cloned().ok_or_else(none)?
                }
                Some(rebound_api::PointChoice::Group(m)) => j
                    .group_point(&m)
                    .cloned()
                    .ok_or_else(|| anyhow!("the journal has no group point {m}"))?,
                Some(rebound_api::PointChoice::LatestGroup) => j
                    .points()
                    .iter()
                    .rev()
                    .find(|p| p.usable && p.group.is_some())
                    .cloned()
                    .ok_or_else(none)?,
                Some(rebound_api::PointChoice::AtOrBefore(ns)) => {
                    j.latest_at_or_before(ns).cloned().ok_or_else(none)?
                }
                Some(rebound_api::PointChoice::Id(id)) => {
                    let n = id
                        .rsplit_once('.')
                        .filter(|(tag, _)| *tag == meta.tag)
                        .and_then(|(_, n)| n.parse::<u64>().ok())
                        .ok_or_else(|| anyhow!("point {id} is not in this replica's journal"))?;
                    j.point(n)?.clone()
                }
            };
            Ok((p.id, p.time_ns))
        })
        .map_err(|e| fail(ErrorCode::PointNotFound, format!("{e:#}")))
    }

    fn materialise_point(&self, item: &Item, job: &Job) -> Result<(String, u64), StepError> {
        let meta = self.replica(&item.id).ok_or_else(|| {
            fail(
                ErrorCode::PointNotFound,
                format!("no replica of {} on this master target", item.name),
            )
        })?;
        let (point, barrier) = self.choose_point(&meta, job.request.point_id.as_deref())?;
        let dir = self.staging(&item.id, &job.id);
        let _ = crashsafe::remove_dir_all_durable(&dir);
        crashsafe::create_dir_all_durable(&dir)?;
        let targets: Vec<PathBuf> = meta
            .disks
            .iter()
            .map(|(n, _)| dir.join(format!("{n}.img")))
            .collect();
        let stats = self.with_journal(&meta, |j| {
            Ok(j.materialise(point, &Target::NewFiles(targets))?)
        })?;
        if let Some(m) = &meta.manifest {
            let mut m = m.clone();
            m.after_point_ns = Some(barrier);
            crashsafe::write_file_durable(
                &dir.join("manifest.json"),
                &serde_json::to_vec_pretty(&m)?,
            )?;
        }
        crashsafe::write_file_durable(
            &dir.join(".point"),
            format!("{}.{point} {barrier}", meta.tag).as_bytes(),
        )?;
        Ok((
            format!(
                "point {}.{point} (barrier {barrier} ns) materialised: {} bytes",
                meta.tag, stats.bytes_written
            ),
            stats.bytes_written,
        ))
    }

    /// Switch the staged disks in as the machine's disks on this host and
    /// start it.
    fn start_destination(
        &self,
        item: &Item,
        job: &Job,
        planned: bool,
    ) -> Result<(String, u64), StepError> {
        let dir = self.staging(&item.id, &job.id);
        if !dir.is_dir() {
            return Err(fail(
                ErrorCode::JobInterrupted,
                format!("no staged disks for job {}: run the job again", job.id),
            ));
        }
        let staged_manifest: Option<Manifest> = std::fs::read(dir.join("manifest.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let m = Machine::at(self.cfg.host_dir.join(&item.name));
        // Off while its disks are switched: the node's supervisor must not
        // restart it on the old disks meanwhile.
        let want = m.dir.join("want-running");
        if want.exists() {
            crashsafe::remove_file_durable(&want)?;
        }
        m.stop(Duration::from_secs(30))?;
        let mut manifest = match (m.manifest().ok(), staged_manifest.clone()) {
            (Some(existing), _) => existing,
            (None, Some(mf)) => mf,
            (None, None) => Manifest {
                name: item.name.clone(),
                os: item.os,
                disks: item
                    .disks
                    .iter()
                    .map(|d| machine::DiskEntry {
                        name: d.name.clone(),
                        uuid: d.uuid.clone(),
                        size_bytes: d.size_bytes,
                    })
                    .collect(),
                workload: None,
                after_point_ns: None,
            },
        };
        if !m.manifest_path().exists() {
            crashsafe::create_dir_all_durable(&m.dir.join("disks"))?;
            crashsafe::create_dir_all_durable(&m.state_dir())?;
        }
        if let Some(sm) = &staged_manifest {
            manifest.workload = sm.workload.clone().or(manifest.workload);
        }
        manifest.after_point_ns = if planned {
            None
        } else {
            staged_manifest.and_then(|s| s.after_point_ns)
        };
        for d in &item.disks {
            let staged = dir.join(format!("{}.img", d.name));
            crashsafe::durable_rename(&staged, &m.disk_path(&d.name))?;
            // The disks changed outside the agent: start its tracking afresh
            // (a new state file marks every leaf until a sync acknowledges).
            let _ = std::fs::remove_file(m.state_dir().join(format!("{}.dirty", d.name)));
        }
        m.save_manifest(&manifest)?;
        // A supervisor that raced the removal above may have started an
        // agent on the old disks: end it before starting on the new ones.
        m.stop(Duration::from_secs(30))?;
        crashsafe::write_file_durable(&want, b"1\n")?;
        let pid = m.start(
            &self.cfg.rebound_exe,
            &self.cfg.server,
            &self.cfg.site,
            &self.cfg.registration_key,
        )?;
        let _ = crashsafe::remove_dir_all_durable(&dir);
        Ok((
            format!(
                "machine {} started on {} (agent pid {pid})",
                item.name,
                self.cfg.host_dir.display()
            ),
            0,
        ))
    }

    fn commit(&self, item: &Item) -> Result<(String, u64), StepError> {
        // The machine runs here now: the window of points is no longer needed.
        let had = self.replica(&item.id).is_some();
        self.drop_replica(&item.id)?;
        Ok((
            if had {
                "committed: the recovery point window was removed".into()
            } else {
                "committed".into()
            },
            0,
        ))
    }

    fn drop_replica(&self, item_id: &str) -> Result<(), StepError> {
        self.forget_journal(item_id);
        if let Some(meta) = self.replica(item_id) {
            let _ = crashsafe::remove_dir_all_durable(&rebound_journal::item_dir(
                &meta.volume,
                item_id,
            ));
            let _ = crashsafe::remove_dir_all_durable(&meta.datastore.join(item_id));
            crashsafe::remove_file_durable(&self.meta_path(item_id))?;
        }
        let _ = crashsafe::remove_dir_all_durable(&self.incoming(item_id));
        Ok(())
    }

    fn create_test_machine(&self, item: &Item, job: &Job) -> Result<(String, u64), StepError> {
        let meta = self.replica(&item.id).ok_or_else(|| {
            fail(
                ErrorCode::PointNotFound,
                format!("no replica of {} on this master target", item.name),
            )
        })?;
        let name = format!("{}-test", item.name);
        let m = Machine::at(self.cfg.host_dir.join(&name));
        if m.manifest_path().exists() {
            return Err(fail(
                ErrorCode::NameConflict,
                format!("machine {name} already exists"),
            ));
        }
        crashsafe::create_dir_all_durable(&m.dir.join("disks"))?;
        crashsafe::create_dir_all_durable(&m.state_dir())?;
        let targets: Vec<PathBuf> = meta.disks.iter().map(|(n, _)| m.disk_path(n)).collect();
        let (point, _) = self.choose_point(&meta, job.request.point_id.as_deref())?;
        self.with_journal(&meta, |j| {
            Ok(j.materialise(point, &Target::NewFiles(targets))?)
        })?;
        let mut manifest = meta
            .manifest
            .clone()
            .context("the replica has no manifest")?;
        manifest.name = name.clone();
        manifest.workload = None;
        manifest.after_point_ns = None;
        m.save_manifest(&manifest)?;
        m.start(
            &self.cfg.rebound_exe,
            &self.cfg.server,
            &self.cfg.site,
            &self.cfg.registration_key,
        )?;
        Ok((
            format!("test machine {name} runs from point {}.{point}", meta.tag),
            0,
        ))
    }
}

/// ", N of M chunks resumed from an interrupted sync" when a sync resumed.
fn resumed_note(reports: &[Report]) -> String {
    let resumed: u64 = reports.iter().map(|r| r.chunks_resumed).sum();
    let chunks: u64 = reports.iter().map(|r| r.chunks).sum();
    if resumed == 0 {
        String::new()
    } else {
        format!(", {resumed} of {chunks} chunks resumed from an interrupted sync")
    }
}

/// Copy a raw image, data extents only (holes stay holes).
pub fn sparse_copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    let src = rebound_disk::Disk::open_read(from)?;
    let size = src.size()?;
    let _ = std::fs::remove_file(to);
    let dst = rebound_disk::Disk::open_write(to, true)?;
    dst.set_len(size)?;
    let mut buf = vec![0u8; 4 << 20];
    for ext in src.data_extents(0..size)? {
        let mut off = ext.start;
        while off < ext.end {
            let n = ((ext.end - off) as usize).min(buf.len());
            src.read_at(&mut buf[..n], off)?;
            if !rebound_disk::is_zero(&buf[..n]) {
                dst.write_at(&buf[..n], off)?;
            }
            off += n as u64;
        }
    }
    dst.sync_data()?;
    Ok(())
}
