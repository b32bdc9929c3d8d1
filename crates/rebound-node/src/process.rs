//! The process server role: agents push changeset files into its cache
//! (`DATA/cache/<item>/`, on the node's data port); a forwarder sends them,
//! oldest first and each exactly once in order, to the item's master target
//! (`incoming/<item>/` on that node's data port) and deletes them only once
//! the delta-sync engine has verified the copy. The cache is durable, so a
//! master target outage does not stop the agents: changesets wait here.

use crate::agent::remote_addr;
use crate::client::Api;
use rebound_agent::changeset;
use rebound_api::ProcessServerFacts;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Counters the heartbeat reports.
#[derive(Default)]
pub struct Stats {
    pub forwarded_bytes: AtomicU64,
    rate: Mutex<(Option<Instant>, u64, u64)>,
}

impl Stats {
    /// Bytes per second forwarded since the previous call.
    pub fn throughput(&self) -> u64 {
        let now = Instant::now();
        let total = self.forwarded_bytes.load(SeqCst);
        let mut g = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        let (last, last_total, last_rate) = *g;
        let rate = match last {
            Some(t) if now.duration_since(t) >= Duration::from_secs(1) => {
                let secs = now.duration_since(t).as_secs_f64();
                ((total - last_total) as f64 / secs) as u64
            }
            Some(_) => return last_rate,
            None => 0,
        };
        *g = (Some(now), total, rate);
        rate
    }
}

/// An incomplete cached changeset untouched this long, with complete ones
/// after it, was abandoned by its sender.
const ABANDONED_AFTER: Duration = Duration::from_secs(10);

/// The cache's directory under the data port's root (the quota's too).
pub const CACHE_DIR: &str = "cache";

pub fn cache_dir(data_root: &Path) -> PathBuf {
    data_root.join(CACHE_DIR)
}

pub fn facts(data_root: &Path, limit: u64, stats: &Stats) -> ProcessServerFacts {
    ProcessServerFacts {
        cache_used_bytes: rebound_disk::tree_bytes(&cache_dir(data_root)),
        cache_limit_bytes: limit,
        throughput_bytes_per_sec: stats.throughput(),
    }
}

/// Forward cached changesets until `stop`.
pub fn forward_loop(
    api: Api,
    data_root: PathBuf,
    token: rebound_wire::Token,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
) {
    let mut addrs: HashMap<String, (String, Instant)> = HashMap::new();
    let mut verified = changeset::VerifyCache::default();
    let mut last_prune = Instant::now();
    while !stop.load(SeqCst) {
        if last_prune.elapsed() > Duration::from_secs(10) {
            verified.retain_existing();
            last_prune = Instant::now();
        }
        let items: Vec<PathBuf> = std::fs::read_dir(cache_dir(&data_root))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        for dir in items {
            let Some(item) = dir.file_name().and_then(|n| n.to_str()).map(String::from) else {
                continue;
            };
            if let Err(e) =
                forward_item(&api, &dir, &item, &token, &stats, &mut addrs, &mut verified)
            {
                warn!(item = %item, error = %e, "forwarding failed; the changesets stay cached");
                addrs.remove(&item);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn forward_item(
    api: &Api,
    dir: &Path,
    item: &str,
    token: &rebound_wire::Token,
    stats: &Stats,
    addrs: &mut HashMap<String, (String, Instant)>,
    verified: &mut changeset::VerifyCache,
) -> anyhow::Result<()> {
    let queued = changeset::queued(dir)?;
    if queued.is_empty() {
        return Ok(());
    }
    let addr = match addrs.get(item) {
        Some((a, t)) if t.elapsed() < Duration::from_secs(5) => a.clone(),
        _ => {
            let it = api.item(item)?;
            let Some(mt) = it.master_target_id else {
                anyhow::bail!("item {item} has no master target");
            };
            let Some(a) = api.component(&mt)?.data_addr else {
                anyhow::bail!("master target {mt} has not reported its data port");
            };
            addrs.insert(item.to_string(), (a.clone(), Instant::now()));
            a
        }
    };
    let complete: Vec<bool> = queued
        .iter()
        .map(|(_, p)| verified.verify(p).is_ok())
        .collect();
    for (i, (seq, path)) in queued.iter().enumerate() {
        let seq = *seq;
        if !complete[i] {
            // An agent pushes in order and stops at its first failure, so an
            // incomplete file followed by complete ones was abandoned by a
            // sender that died or moved to another process server: set it
            // aside (never forwarded). Otherwise it is still arriving: wait;
            // later ones must not overtake it.
            let idle = std::fs::metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > ABANDONED_AFTER);
            if idle && complete[i + 1..].iter().any(|&c| c) {
                let aside = dir.join("abandoned");
                rebound_disk::crashsafe::create_dir_all_durable(&aside)?;
                rebound_disk::crashsafe::durable_rename(
                    path,
                    &aside.join(changeset::file_name(seq)),
                )?;
                warn!(
                    item,
                    seq, "incomplete changeset abandoned by its sender set aside"
                );
                continue;
            }
            debug!(seq, "changeset not complete yet");
            return Ok(());
        }
        let path = path.clone();
        let size = std::fs::metadata(&path)?.len();
        let remote = remote_addr(
            &addr,
            &format!("incoming/{item}/{}", changeset::file_name(seq)),
        )?;
        let opts = crate::changeset_push_options();
        rebound_delta::push(&path, &remote, token, &opts, None)?;
        rebound_disk::crashsafe::remove_file_durable(&path)?;
        stats.forwarded_bytes.fetch_add(size, SeqCst);
        info!(item, seq, size, "changeset forwarded");
    }
    Ok(())
}
