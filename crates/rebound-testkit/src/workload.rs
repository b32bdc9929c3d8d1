//! `rebound workload`: several writers, each with its own NBD connection per
//! disk, writing pattern blocks and logging every write.
//!
//! Per-block order is well defined because no two workers ever write the
//! same block: the disks are cut in 1 MiB stripes and worker k owns the
//! stripes whose index modulo the number of workers is k; a write never
//! crosses a stripe. One write is in flight per worker, so several writes
//! are in flight across workers.

use crate::error::TestkitError;
use crate::log::{LogWriter, Record, now_ns};
use crate::pattern::{BLOCK, SplitMix64, write_buffer};
use rebound_nbd::{NbdClient, NbdUri};
use serde::Serialize;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Size of the stripes that assign blocks to workers.
pub const STRIPE: u64 = 1 << 20;
const STRIPE_BLOCKS: u64 = STRIPE / BLOCK as u64;

/// What to run.
#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    /// The disks of one machine; the order defines the disk index.
    pub disks: Vec<NbdUri>,
    pub log: std::path::PathBuf,
    /// Worker threads (writes in flight).
    pub inflight: usize,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Stop after this many writes (all workers together).
    pub writes: Option<u64>,
    /// Writes per second per worker (None: as fast as possible).
    pub rate: Option<f64>,
    /// Largest write, in 4 KiB blocks (1..=256).
    pub max_blocks: u32,
    /// Start a new epoch cut at this time (ns since the UNIX epoch).
    pub after_point: Option<u64>,
    /// Each worker flushes its connections after this many writes (0: never).
    pub flush_every: u64,
    /// A request taking longer counts as the server going away (None: wait
    /// forever).
    pub io_timeout: Option<Duration>,
}

impl WorkloadConfig {
    pub fn new(disks: Vec<NbdUri>, log: std::path::PathBuf) -> WorkloadConfig {
        WorkloadConfig {
            disks,
            log,
            inflight: 4,
            duration: None,
            writes: None,
            rate: None,
            max_blocks: 8,
            after_point: None,
            flush_every: 64,
            io_timeout: Some(Duration::from_secs(120)),
        }
    }
}

/// Why the workload stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Signal,
    Duration,
    Writes,
    Disconnected,
    /// No worker owned any block (disks smaller than the workers' stripes).
    NothingToDo,
}

/// Told once every connection is up and the log is open, before writing.
#[derive(Clone, Debug)]
pub struct Started {
    /// Disk sizes in bytes, in `--disk` order.
    pub sizes: Vec<u64>,
    pub epoch: u32,
    pub first_id: u64,
}

/// What a run did.
#[derive(Clone, Debug, Serialize)]
pub struct WorkloadSummary {
    pub issued: u64,
    pub acked: u64,
    pub epoch: u32,
    pub first_id: u64,
    pub last_id: u64,
    pub reason: StopReason,
    /// The first connection error, when the server went away.
    pub disconnect: Option<String>,
}

struct Shared<'a> {
    log: &'a LogWriter,
    stop: &'a AtomicBool,
    halt: AtomicBool,
    next_id: AtomicU64,
    budget: Option<AtomicU64>,
    deadline: Option<Instant>,
    issued: AtomicU64,
    acked: AtomicU64,
    disconnect: Mutex<Option<String>>,
    log_error: Mutex<Option<TestkitError>>,
    budget_spent: AtomicBool,
    epoch: u32,
}

impl Shared<'_> {
    fn should_stop(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
            || self.halt.load(Ordering::Relaxed)
            || self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    fn claim(&self) -> bool {
        match &self.budget {
            None => true,
            Some(b) => {
                let ok = b
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok();
                if !ok {
                    self.budget_spent.store(true, Ordering::Relaxed);
                }
                ok
            }
        }
    }

    fn disconnected(&self, msg: String) {
        if let Ok(mut d) = self.disconnect.lock()
            && d.is_none()
        {
            *d = Some(msg);
        }
        self.halt.store(true, Ordering::Relaxed);
    }

    fn log_failed(&self, e: TestkitError) {
        if let Ok(mut d) = self.log_error.lock()
            && d.is_none()
        {
            *d = Some(e);
        }
        self.halt.store(true, Ordering::Relaxed);
    }
}

/// The stripes worker `k` of `n` owns on a disk of `blocks` blocks.
fn owned_stripes(blocks: u64, k: u64, n: u64) -> u64 {
    let stripes = blocks.div_ceil(STRIPE_BLOCKS);
    if stripes > k {
        (stripes - k - 1) / n + 1
    } else {
        0
    }
}

/// Choose (disk, offset, blocks) for worker `k` of `n`.
fn choose(
    rng: &mut SplitMix64,
    disk_blocks: &[u64],
    owned: &[u64],
    total: u64,
    k: u64,
    n: u64,
    max_blocks: u32,
) -> Option<(usize, u64, u32)> {
    if total == 0 {
        return None;
    }
    let mut r = rng.below(total);
    let mut disk = 0;
    for (d, &c) in owned.iter().enumerate() {
        if r < c {
            disk = d;
            break;
        }
        r -= c;
    }
    let stripe = k + r * n;
    let first = stripe * STRIPE_BLOCKS;
    let in_stripe = (disk_blocks[disk] - first).min(STRIPE_BLOCKS);
    let len = (1 + rng.below(u64::from(max_blocks))).min(in_stripe);
    let start = first + rng.below(in_stripe - len + 1);
    Some((disk, start * BLOCK as u64, len as u32))
}

fn worker(
    k: usize,
    shared: &Shared,
    conns: &mut [NbdClient],
    cfg: &WorkloadConfig,
    disk_blocks: &[u64],
) {
    let n = cfg.inflight as u64;
    let owned: Vec<u64> = disk_blocks
        .iter()
        .map(|&b| owned_stripes(b, k as u64, n))
        .collect();
    let total: u64 = owned.iter().sum();
    let mut rng = SplitMix64(now_ns() ^ ((k as u64) << 48) ^ u64::from(std::process::id()));
    let started = Instant::now();
    let mut done = 0u64;
    let mut dirty = vec![false; conns.len()];
    loop {
        if shared.should_stop() {
            break;
        }
        if let Some(rate) = cfg.rate {
            let due = started + Duration::from_secs_f64(done as f64 / rate);
            loop {
                let now = Instant::now();
                if now >= due || shared.should_stop() {
                    break;
                }
                std::thread::sleep((due - now).min(Duration::from_millis(50)));
            }
            if shared.should_stop() {
                break;
            }
        }
        let Some((disk, offset, blocks)) = choose(
            &mut rng,
            disk_blocks,
            &owned,
            total,
            k as u64,
            n,
            cfg.max_blocks,
        ) else {
            break;
        };
        if !shared.claim() {
            break;
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let data = write_buffer(id, disk as u16, offset, blocks, shared.epoch);
        let t_issued = now_ns();
        if let Err(e) = shared.log.append(&Record::Issued {
            id,
            disk: disk as u16,
            offset,
            blocks,
            epoch: shared.epoch,
            t_issued,
        }) {
            shared.log_failed(e);
            break;
        }
        shared.issued.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = conns[disk].write_at(offset, &data, false) {
            shared.disconnected(format!(
                "disk {disk} ({}): write {id}: {e}",
                cfg.disks[disk]
            ));
            break;
        }
        let t_acked = now_ns();
        if let Err(e) = shared.log.append(&Record::Acked { id, t_acked }) {
            shared.log_failed(e);
            break;
        }
        shared.acked.fetch_add(1, Ordering::Relaxed);
        dirty[disk] = true;
        done += 1;
        if cfg.flush_every > 0 && done.is_multiple_of(cfg.flush_every) {
            for (d, c) in conns.iter_mut().enumerate() {
                if std::mem::take(&mut dirty[d])
                    && let Err(e) = c.flush()
                {
                    shared.disconnected(format!("disk {d} ({}): flush: {e}", cfg.disks[d]));
                    return;
                }
            }
        }
    }
    if shared.halt.load(Ordering::Relaxed)
        && shared
            .disconnect
            .lock()
            .map(|d| d.is_some())
            .unwrap_or(true)
    {
        return;
    }
    for (d, c) in conns.iter_mut().enumerate() {
        if dirty[d]
            && let Err(e) = c.flush()
        {
            shared.disconnected(format!("disk {d} ({}): flush: {e}", cfg.disks[d]));
            return;
        }
    }
}

/// Run the workload until `stop` is set, the time or write budget is spent,
/// or a connection fails (then the summary carries the error and the log is
/// still synced). Errors: bad configuration, the log, the first connects.
pub fn run_workload(
    cfg: &WorkloadConfig,
    stop: &AtomicBool,
    on_start: impl FnOnce(&Started),
) -> Result<WorkloadSummary, TestkitError> {
    if cfg.disks.is_empty() {
        return Err(TestkitError::Invalid("no disks given".into()));
    }
    if cfg.disks.len() > usize::from(u16::MAX) {
        return Err(TestkitError::Invalid("too many disks".into()));
    }
    if cfg.inflight == 0 || cfg.inflight > 1024 {
        return Err(TestkitError::Invalid(
            "--inflight must be between 1 and 1024".into(),
        ));
    }
    if cfg.max_blocks == 0 || u64::from(cfg.max_blocks) > STRIPE_BLOCKS {
        return Err(TestkitError::Invalid(format!(
            "--max-blocks must be between 1 and {STRIPE_BLOCKS}"
        )));
    }
    if let Some(r) = cfg.rate
        && !(r.is_finite() && r > 0.0)
    {
        return Err(TestkitError::Invalid("--rate must be positive".into()));
    }

    // Connect every worker to every disk first: a wrong address fails here.
    let mut conns: Vec<Vec<NbdClient>> = Vec::with_capacity(cfg.inflight);
    let mut sizes = Vec::new();
    for _ in 0..cfg.inflight {
        let mut mine = Vec::with_capacity(cfg.disks.len());
        for (d, uri) in cfg.disks.iter().enumerate() {
            let c = NbdClient::connect(uri).map_err(|source| TestkitError::Nbd {
                what: format!("disk {d} ({uri})"),
                source,
            })?;
            c.set_timeout(cfg.io_timeout)
                .map_err(|source| TestkitError::Nbd {
                    what: format!("disk {d} ({uri})"),
                    source,
                })?;
            if c.read_only() {
                return Err(TestkitError::Invalid(format!(
                    "disk {d} ({uri}) is exported read-only"
                )));
            }
            mine.push(c);
        }
        if sizes.is_empty() {
            sizes = mine.iter().map(NbdClient::size).collect();
        }
        conns.push(mine);
    }
    let disk_blocks: Vec<u64> = sizes.iter().map(|s| s / BLOCK as u64).collect();

    let (log, existing) = LogWriter::open(&cfg.log)?;
    let mut epoch = existing.epoch;
    if !existing.disks.is_empty() && existing.disks.len() != sizes.len() {
        return Err(TestkitError::Invalid(format!(
            "the log was written for {} disk(s), {} given",
            existing.disks.len(),
            sizes.len()
        )));
    }
    if let Some(cut_ns) = cfg.after_point {
        epoch = epoch
            .checked_add(1)
            .ok_or_else(|| TestkitError::Invalid("epoch overflow".into()))?;
        log.append(&Record::Epoch { epoch, cut_ns })?;
    }
    log.append(&Record::Run {
        t: now_ns(),
        disks: sizes.clone(),
        inflight: cfg.inflight as u32,
    })?;
    log.sync()?;

    let first_id = existing.max_id() + 1;
    on_start(&Started {
        sizes: sizes.clone(),
        epoch,
        first_id,
    });
    let shared = Shared {
        log: &log,
        stop,
        halt: AtomicBool::new(false),
        next_id: AtomicU64::new(first_id),
        budget: cfg.writes.map(AtomicU64::new),
        deadline: cfg.duration.map(|d| Instant::now() + d),
        issued: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        disconnect: Mutex::new(None),
        log_error: Mutex::new(None),
        budget_spent: AtomicBool::new(false),
        epoch,
    };
    let workers_done = AtomicBool::new(false);
    let sync_result = std::thread::scope(|s| {
        let syncer = s.spawn(|| {
            // Group commit: the log is durable at most ~100 ms behind.
            while !workers_done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if let Err(e) = shared.log.sync() {
                    shared.log_failed(e);
                    return;
                }
            }
        });
        let handles: Vec<_> = conns
            .iter_mut()
            .enumerate()
            .map(|(k, mine)| {
                let shared = &shared;
                let disk_blocks = &disk_blocks;
                s.spawn(move || worker(k, shared, mine, cfg, disk_blocks))
            })
            .collect();
        let mut panicked = false;
        for h in handles {
            panicked |= h.join().is_err();
        }
        workers_done.store(true, Ordering::Relaxed);
        let _ = syncer.join();
        if panicked {
            Err(TestkitError::Invalid("a workload thread panicked".into()))
        } else {
            Ok(())
        }
    });
    // Close connections cleanly where they still work.
    for mine in conns {
        for c in mine {
            let _ = c.disconnect();
        }
    }
    log.sync()?;
    sync_result?;
    if let Some(e) = shared.log_error.lock().ok().and_then(|mut e| e.take()) {
        return Err(e);
    }
    let disconnect = shared.disconnect.lock().ok().and_then(|mut d| d.take());
    let issued = shared.issued.load(Ordering::Relaxed);
    let reason = if disconnect.is_some() {
        StopReason::Disconnected
    } else if stop.load(Ordering::Relaxed) {
        StopReason::Signal
    } else if shared.budget_spent.load(Ordering::Relaxed) {
        StopReason::Writes
    } else if shared.deadline.is_some_and(|d| Instant::now() >= d) {
        StopReason::Duration
    } else {
        StopReason::NothingToDo
    };
    let last_id = shared.next_id.load(Ordering::Relaxed).saturating_sub(1);
    Ok(WorkloadSummary {
        issued,
        acked: shared.acked.load(Ordering::Relaxed),
        epoch,
        first_id,
        last_id,
        reason,
        disconnect,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripes_partition_the_disk() {
        // 2.5 MiB disk: 3 stripes (the last half full), 2 workers.
        let blocks = (5 << 20) / 2 / BLOCK as u64;
        assert_eq!(owned_stripes(blocks, 0, 2), 2);
        assert_eq!(owned_stripes(blocks, 1, 2), 1);
        assert_eq!(owned_stripes(blocks, 3, 4), 0);
        let mut rng = SplitMix64(7);
        for k in 0..2u64 {
            let owned = [owned_stripes(blocks, k, 2)];
            for _ in 0..2000 {
                let (d, off, len) =
                    choose(&mut rng, &[blocks], &owned, owned[0], k, 2, 8).unwrap_or_default();
                assert_eq!(d, 0);
                let first = off / STRIPE;
                let last = (off + u64::from(len) * BLOCK as u64 - 1) / STRIPE;
                assert_eq!(first, last, "write crosses a stripe");
                assert_eq!(first % 2, k, "write outside the worker's stripes");
                assert!(off + u64::from(len) * BLOCK as u64 <= blocks * BLOCK as u64);
                assert!((1..=8).contains(&len));
            }
        }
    }
}
