//! The agent's shipper: a thread that hands the outbox's durable changesets,
//! oldest first, to the item's process server (its cache, on its data port),
//! and deletes each once the delta-sync engine has verified the copy. It
//! never touches the write path: when it is slow or the process server is
//! away, the outbox grows to its bound and the capture queue overflows into
//! the dirty bitmap.

use crate::client::Api;
use rebound_agent::changeset;
use rebound_agent::spool::FloorWatch;
use rebound_types::{Coded, ErrorCode};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Where the stream goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShipTarget {
    pub item_id: String,
    pub process_server_id: String,
}

#[derive(Default)]
struct Shared {
    target: Mutex<Option<ShipTarget>>,
    stop: AtomicBool,
    shipped_seq: AtomicU64,
    failing: AtomicBool,
    /// Files at or below this sequence number are stale: delete, never ship.
    clear_upto: AtomicU64,
    bytes: AtomicU64,
    rate: Mutex<(Option<Instant>, u64, u64)>,
}

pub struct Shipper {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Shipper {
    pub fn start(
        api: Api,
        token: rebound_wire::Token,
        outbox: PathBuf,
        floor: FloorWatch,
    ) -> Shipper {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("shipper".into())
            .spawn(move || run(s, api, token, outbox, floor))
            .ok();
        Shipper { shared, thread }
    }

    pub fn set_target(&self, t: Option<ShipTarget>) {
        let mut g = self.shared.target.lock().unwrap_or_else(|p| p.into_inner());
        if *g != t {
            info!(target = ?t, "stream target");
            *g = t;
        }
    }

    /// Drop the outbox's files up to `seq` (a new replica holds them).
    pub fn clear_outbox(&self, seq: u64) {
        self.shared.clear_upto.fetch_max(seq, SeqCst);
    }

    pub fn shipped_seq(&self) -> u64 {
        self.shared.shipped_seq.load(SeqCst)
    }

    /// The last push failed (not back-pressure: an error).
    pub fn failing(&self) -> bool {
        self.shared.failing.load(SeqCst)
    }

    /// Bytes per second shipped, over the last few seconds.
    pub fn rate(&self) -> u64 {
        let now = Instant::now();
        let total = self.shared.bytes.load(SeqCst);
        let mut g = self.shared.rate.lock().unwrap_or_else(|p| p.into_inner());
        let (last, last_total, last_rate) = *g;
        match last {
            Some(t) if now.duration_since(t) < Duration::from_secs(3) => last_rate,
            Some(t) => {
                let r = ((total - last_total) as f64 / now.duration_since(t).as_secs_f64()) as u64;
                *g = (Some(now), total, r);
                r
            }
            None => {
                *g = (Some(now), total, 0);
                0
            }
        }
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(s: Arc<Shared>, api: Api, token: rebound_wire::Token, outbox: PathBuf, floor: FloorWatch) {
    let mut addr: Option<(String, String, Instant)> = None;
    let mut last_warn = None::<Instant>;
    while !s.stop.load(SeqCst) {
        let target = s.target.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let queued = changeset::queued(&outbox).unwrap_or_default();
        let clear = s.clear_upto.load(SeqCst);
        let mut ready = Vec::new();
        for (seq, p) in queued {
            if seq <= clear {
                let _ = rebound_disk::crashsafe::remove_file_durable(&p);
            } else if seq < floor.get() {
                ready.push((seq, p));
            }
        }
        let Some(target) = target.filter(|_| !ready.is_empty()) else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        match ship(&s, &api, &token, &target, &ready, &mut addr) {
            Ok(()) => s.failing.store(false, SeqCst),
            Err(Backoff::Full) => std::thread::sleep(Duration::from_millis(200)),
            Err(Backoff::Failed(e)) => {
                s.failing.store(true, SeqCst);
                addr = None;
                if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    warn!(error = %e, "shipping changesets failed; they wait in the outbox");
                    last_warn = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

enum Backoff {
    /// The process server's cache is full: back-pressure, not a failure.
    Full,
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for Backoff {
    fn from(e: anyhow::Error) -> Self {
        Backoff::Failed(e)
    }
}

fn ship(
    s: &Shared,
    api: &Api,
    token: &rebound_wire::Token,
    target: &ShipTarget,
    ready: &[(u64, PathBuf)],
    addr: &mut Option<(String, String, Instant)>,
) -> Result<(), Backoff> {
    let data_addr = match addr {
        Some((ps, a, at))
            if *ps == target.process_server_id && at.elapsed() < Duration::from_secs(5) =>
        {
            a.clone()
        }
        _ => {
            let c = api
                .component(&target.process_server_id)
                .map_err(|e| anyhow::anyhow!("process server {}: {e}", target.process_server_id))?;
            let Some(a) = c.data_addr else {
                return Err(anyhow::anyhow!(
                    "process server {} has not reported its data port yet",
                    target.process_server_id
                )
                .into());
            };
            if let Some(f) = &c.process_server
                && f.cache_limit_bytes > 0
                && f.cache_used_bytes >= f.cache_limit_bytes
            {
                debug!(
                    used = f.cache_used_bytes,
                    "process server cache full; not pushing"
                );
                return Err(Backoff::Full);
            }
            *addr = Some((target.process_server_id.clone(), a.clone(), Instant::now()));
            a
        }
    };
    for (seq, path) in ready {
        if *seq <= s.clear_upto.load(SeqCst) {
            continue;
        }
        let h = changeset::header_of(path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let item = if h.item.is_empty() {
            &target.item_id
        } else {
            &h.item
        };
        let name = format!(
            "{}/{}/{}",
            crate::process::CACHE_DIR,
            item,
            changeset::file_name(*seq)
        );
        let remote = crate::agent::remote_addr(&data_addr, &name)?;
        let opts = crate::changeset_push_options();
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        match rebound_delta::push(path, &remote, token, &opts, None) {
            // The process server's own bound (its heartbeat may be older
            // than its cache).
            Err(e) if e.code() == ErrorCode::CacheFull => return Err(Backoff::Full),
            r => {
                r.map_err(anyhow::Error::from)?;
            }
        }
        rebound_disk::crashsafe::remove_file_durable(path).map_err(anyhow::Error::from)?;
        s.shipped_seq.fetch_max(*seq, SeqCst);
        s.bytes.fetch_add(size, SeqCst);
        debug!(seq, size, "changeset shipped");
    }
    Ok(())
}
