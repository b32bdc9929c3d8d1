//! The spooler: drains the [`Capture`] queue into the agent's outbox, the
//! bounded on-disk log of changesets waiting to be shipped.
//!
//! - Stream entries go into the open changeset file; a barrier closes it as
//!   a recovery point; a file reaching the size cap closes as a part (no
//!   point). Sequence numbers are contiguous.
//! - A resync entry closes the open file and reserves exactly as many
//!   sequence numbers as its marked leaves need (one per `file_cap` bytes,
//!   at least one); the leaves are read from the live disks into those
//!   files, a slice at a time, while later stream entries keep going into
//!   files after the reservation. Writes during the read are in the stream
//!   after it, so applying the files in order gives the disks as of any
//!   later barrier. The first file of a resync is a `restart`.
//! - When the outbox holds `outbox_limit` bytes the spooler stops draining;
//!   the queue fills and overflows into the dirty bitmap (the ladder's last
//!   rung). Nothing waits on it in the write path.
//! - Files are shipped (by the caller) strictly below [`Spool::floor`], the
//!   lowest sequence number not yet durable, so a reservation still being
//!   written holds back the files after it.

use crate::capture::{Capture, Entry, Mode, now_ns};
use crate::changeset::{self, Closes, Header, Writer};
use crate::dirty::Marker;
use rebound_disk::Disk;
use rebound_types::LEAF_SIZE;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tracing::{debug, info, warn};

/// Largest changeset the spooler writes (data bytes).
pub const FILE_CAP: u64 = 64 << 20;
/// Bytes of marked leaves read per resync step (between queue drains).
const RESYNC_SLICE: u64 = 8 << 20;
/// Points awaiting the master target's acknowledgement kept at most: an
/// older one is only needed if no later one is acknowledged first, and a
/// later acknowledgement clears at least as much.
const MAX_PENDING_POINTS: usize = 4096;
/// Sequence numbers reserved durably at a time.
const SEQ_BLOCK: u64 = 4096;

#[derive(Clone, Debug)]
pub struct SpoolConfig {
    pub outbox: PathBuf,
    /// The machine's disks (resyncs read them), in disk order.
    pub disks: Vec<PathBuf>,
    pub disk_sizes: Vec<u64>,
    pub file_cap: u64,
    pub outbox_limit: u64,
    /// Sequence numbers up to this one may have been used before
    /// ([`last_seq`] of the outbox).
    pub last_seq: u64,
}

/// Whose stream this is (written into every header).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamOwner {
    pub item: String,
    pub agent: String,
}

struct Shared {
    cfg: SpoolConfig,
    owner: Mutex<Option<StreamOwner>>,
    /// Last sequence number handed out.
    assigned: AtomicU64,
    /// Lowest sequence number not yet durable in the outbox.
    floor: AtomicU64,
    /// Last closed file.
    closed: AtomicU64,
    points: Mutex<VecDeque<(u64, Vec<Marker>)>>,
    resync_left: AtomicU64,
    stop: AtomicBool,
    failed: Mutex<Option<String>>,
}

pub struct Spool {
    shared: Arc<Shared>,
    capture: Arc<Capture>,
    thread: Option<JoinHandle<()>>,
}

impl Spool {
    pub fn start(cfg: SpoolConfig, capture: Arc<Capture>) -> std::io::Result<Spool> {
        rebound_disk::crashsafe::create_dir_all_durable(&cfg.outbox)?;
        // Files a crash left half-written: their writes are marked, and the
        // restart that starts every stream ships the marks.
        for e in std::fs::read_dir(&cfg.outbox)?.flatten() {
            if e.file_name()
                .to_str()
                .is_some_and(|n| n.ends_with(".cs.tmp"))
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let last = cfg.last_seq;
        let shared = Arc::new(Shared {
            cfg,
            owner: Mutex::new(None),
            assigned: AtomicU64::new(last),
            floor: AtomicU64::new(last + 1),
            closed: AtomicU64::new(last),
            points: Mutex::new(VecDeque::new()),
            resync_left: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            failed: Mutex::new(None),
        });
        let (s, c) = (shared.clone(), capture.clone());
        let thread = std::thread::Builder::new()
            .name("spooler".into())
            .spawn(move || Spooler::new(s, c).run())?;
        Ok(Spool {
            shared,
            capture,
            thread: Some(thread),
        })
    }

    /// Set whose stream the next files belong to.
    pub fn set_owner(&self, owner: Option<StreamOwner>) {
        *self.shared.owner.lock().unwrap_or_else(|p| p.into_inner()) = owner;
    }

    /// Files with a lower sequence number are durable and may be shipped.
    pub fn floor(&self) -> u64 {
        self.shared.floor.load(SeqCst)
    }

    /// Last sequence number handed out.
    pub fn assigned(&self) -> u64 {
        self.shared.assigned.load(SeqCst)
    }

    /// A handle on [`Self::floor`] for the shipper's thread.
    pub fn floor_watch(&self) -> FloorWatch {
        FloorWatch(self.shared.clone())
    }

    pub fn last_closed(&self) -> u64 {
        self.shared.closed.load(SeqCst)
    }

    /// Bytes of marked leaves the running resync has still to read.
    pub fn resync_left(&self) -> u64 {
        self.shared.resync_left.load(SeqCst)
    }

    /// The spooler's last failure (it keeps retrying), if any.
    pub fn failure(&self) -> Option<String> {
        self.shared
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The master target applied every changeset up to `seq`: clear the
    /// marks of the latest point at or below it. Returns the point acked.
    pub fn applied(&self, seq: u64) -> Option<u64> {
        let mut pts = self.shared.points.lock().unwrap_or_else(|p| p.into_inner());
        let mut best = None;
        while pts.front().is_some_and(|(s, _)| *s <= seq) {
            best = pts.pop_front();
        }
        drop(pts);
        let (s, markers) = best?;
        for (t, m) in self.capture_trackers().iter().zip(markers) {
            let all = 0..t.leaf_count();
            t.acknowledge(m, std::slice::from_ref(&all));
        }
        Some(s)
    }

    fn capture_trackers(&self) -> &[Arc<crate::DirtyTracker>] {
        self.capture.trackers()
    }

    /// Forget the points awaiting acknowledgement (a new replica starts).
    pub fn forget_points(&self) {
        self.shared
            .points
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Drain what is queued, close the open file, stop.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Reads the spool's floor from another thread.
#[derive(Clone)]
pub struct FloorWatch(Arc<Shared>);

impl FloorWatch {
    pub fn get(&self) -> u64 {
        self.0.floor.load(SeqCst)
    }
}

/// A resync being written into its reserved sequence numbers.
struct Resync {
    bits: Vec<Vec<u64>>,
    at_ns: u64,
    generation: u64,
    /// Next leaf to look at: (disk, leaf).
    disk: usize,
    leaf: u64,
    /// Reserved sequence numbers: `next..=last`.
    next: u64,
    last: u64,
    writer: Option<(Writer, u64)>,
    first: bool,
}

struct Spooler {
    s: Arc<Shared>,
    capture: Arc<Capture>,
    stream: Option<(Writer, u64)>,
    resync: Option<Resync>,
    /// Lowest sequence number of the resync's reservation not yet durable
    /// (kept apart from `resync`, which is taken out while it runs).
    resync_floor: Option<u64>,
    disks: Vec<Option<Disk>>,
    /// Durable bound of the sequence numbers handed out.
    ceiling: u64,
}

impl Spooler {
    fn new(s: Arc<Shared>, capture: Arc<Capture>) -> Spooler {
        let n = s.cfg.disks.len();
        let ceiling = s.cfg.last_seq;
        Spooler {
            s,
            capture,
            stream: None,
            resync: None,
            resync_floor: None,
            ceiling,
            disks: (0..n).map(|_| None).collect(),
        }
    }

    fn run(mut self) {
        loop {
            let stopping = self.s.stop.load(SeqCst);
            match self.step(stopping) {
                Ok(true) => {}
                Ok(false) if stopping => break,
                Ok(false) => {}
                Err(e) => {
                    warn!(error = %e, "spooling changesets failed; retrying");
                    *self.s.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    // The file in progress is lost: the marks are not, and
                    // the gap makes the stream resynchronise.
                    if let Some((w, _)) = self.stream.take() {
                        w.abandon();
                    }
                    self.abort_resync();
                    self.capture.stop();
                    self.advance_floor();
                    std::thread::sleep(Duration::from_millis(500));
                    if stopping {
                        break;
                    }
                }
            }
        }
        if let Some((w, seq)) = self.stream.take() {
            let _ = self.finish(w, seq, Closes::Nothing, now_ns());
        }
        self.abort_resync();
    }

    /// One round: drain some entries, write a resync slice. Returns whether
    /// it did anything.
    fn step(&mut self, stopping: bool) -> std::io::Result<bool> {
        if self.capture.mode() == Mode::Off && self.resync.is_some() {
            info!("replication stopped: the resync in progress is abandoned");
            self.abort_resync();
        }
        // An empty outbox always takes a file, so a bound below one file
        // still moves.
        let queued = changeset::queued_bytes(&self.s.cfg.outbox);
        let full = queued > 0 && queued >= self.s.cfg.outbox_limit;
        if full && !stopping {
            // Back-pressure: the queue fills, then overflows into the bitmap.
            std::thread::sleep(Duration::from_millis(50));
            return Ok(false);
        }
        let wait = if self.resync.is_some() || stopping {
            Duration::ZERO
        } else {
            Duration::from_millis(100)
        };
        // One batch (at most the queue's bound), then a resync slice.
        // A batch lost to a failure is not lost to the replica: its writes
        // were marked when they completed, no point after them was
        // acknowledged, and the restart that follows ships every mark.
        let batch = self.capture.drain(wait);
        let mut did = !batch.is_empty();
        for e in batch {
            self.entry(e)?;
        }
        if self.resync.is_some() {
            self.resync_slice()?;
            did = true;
        }
        Ok(did)
    }

    fn header(&self, seq: u64, restart: bool) -> Header {
        let owner = self
            .s
            .owner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or(StreamOwner {
                item: String::new(),
                agent: String::new(),
            });
        Header {
            item: owner.item,
            agent: owner.agent,
            seq,
            barrier_ns: 0,
            closes: Closes::Nothing,
            restart,
            disk_sizes: self.s.cfg.disk_sizes.clone(),
        }
    }

    fn assign(&mut self) -> std::io::Result<u64> {
        self.reserve(1)
    }

    /// Hand out `n` sequence numbers, first returned. Sequence numbers must
    /// never repeat, even after a power loss: a durable ceiling is written
    /// ahead, a block at a time, and a restarted agent starts above it.
    fn reserve(&mut self, n: u64) -> std::io::Result<u64> {
        let first = self.s.assigned.load(SeqCst) + 1;
        let last = first + n - 1;
        if last > self.ceiling {
            let ceiling = last + SEQ_BLOCK;
            rebound_disk::crashsafe::write_file_durable(
                &seq_file(&self.s.cfg.outbox),
                ceiling.to_string().as_bytes(),
            )?;
            self.ceiling = ceiling;
        }
        self.s.assigned.store(last, SeqCst);
        Ok(first)
    }

    fn open(&self, seq: u64, restart: bool) -> std::io::Result<Writer> {
        let path = self.s.cfg.outbox.join(changeset::file_name(seq));
        // What the file closes is written at its end, when known.
        Writer::create(&path, &self.header(seq, restart))
    }

    fn stream_writer(&mut self) -> std::io::Result<&mut Writer> {
        if self.stream.is_none() {
            let seq = self.assign()?;
            let w = self.open(seq, false)?;
            self.stream = Some((w, seq));
        }
        match &mut self.stream {
            Some((w, _)) => Ok(w),
            None => Err(std::io::Error::other("no open changeset")),
        }
    }

    fn entry(&mut self, e: Entry) -> std::io::Result<()> {
        match e {
            Entry::Write { disk, offset, data } => {
                // No file past the cap (a write is at most 32 MiB, a cap
                // smaller than one write gets one write per file).
                let cap = self.s.cfg.file_cap;
                if self.stream.as_ref().is_some_and(|(w, _)| {
                    w.data_bytes > 0 && w.data_bytes + data.len() as u64 > cap
                }) {
                    self.close_stream(Closes::Nothing, now_ns(), None)?;
                }
                let w = self.stream_writer()?;
                w.data(disk, offset, &data)?;
                if w.data_bytes >= cap {
                    self.close_stream(Closes::Nothing, now_ns(), None)?;
                }
            }
            Entry::Zero { disk, offset, len } => {
                self.stream_writer()?.zero(disk, offset, len)?;
            }
            Entry::Barrier {
                closes,
                at_ns,
                markers,
            } => {
                self.stream_writer()?;
                self.close_stream(closes, at_ns, Some(markers))?;
            }
            Entry::Resync {
                bits,
                at_ns,
                generation,
            } => {
                if self.stream.is_some() {
                    self.close_stream(Closes::Nothing, now_ns(), None)?;
                }
                // A resync still running is superseded (the new snapshot
                // holds every leaf not yet applied): end its reservation
                // with empty files, so the stream has no gap.
                if let Some(mut old) = self.resync.take() {
                    self.fill_reservation(&mut old)?;
                }
                let bytes: u64 = bits
                    .iter()
                    .map(|b| b.iter().map(|w| w.count_ones() as u64).sum::<u64>())
                    .sum::<u64>()
                    * LEAF_SIZE;
                let files = bytes.div_ceil(self.s.cfg.file_cap).max(1);
                let first = self.reserve(files)?;
                let last = first + files - 1;
                info!(
                    bytes,
                    first_seq = first,
                    last_seq = last,
                    "resync of the marked leaves starts"
                );
                self.s.resync_left.store(bytes, SeqCst);
                self.resync_floor = Some(first);
                self.resync = Some(Resync {
                    bits,
                    at_ns,
                    generation,
                    disk: 0,
                    leaf: 0,
                    next: first,
                    last,
                    writer: None,
                    first: true,
                });
            }
        }
        Ok(())
    }

    fn close_stream(
        &mut self,
        closes: Closes,
        at_ns: u64,
        markers: Option<Vec<Marker>>,
    ) -> std::io::Result<()> {
        let Some((w, seq)) = self.stream.take() else {
            return Ok(());
        };
        self.finish(w, seq, closes, at_ns)?;
        if let Some(m) = markers {
            let mut pts = self.s.points.lock().unwrap_or_else(|p| p.into_inner());
            pts.push_back((seq, m));
            if pts.len() > MAX_PENDING_POINTS {
                pts.pop_front();
            }
        }
        Ok(())
    }

    /// Make the file durable under its name, then persist the sequence.
    fn finish(&self, w: Writer, seq: u64, closes: Closes, at_ns: u64) -> std::io::Result<()> {
        let path = w.finish(closes, at_ns)?;
        self.s.closed.fetch_max(seq, SeqCst);
        self.advance_floor();
        debug!(seq, ?closes, path = %path.display(), "changeset closed");
        Ok(())
    }

    /// The floor is the lowest open sequence number (stream or resync), or
    /// the next to assign.
    fn advance_floor(&self) {
        let mut floor = self.s.assigned.load(SeqCst) + 1;
        if let Some((_, s)) = &self.stream {
            floor = floor.min(*s);
        }
        if let Some(r) = self.resync_floor {
            floor = floor.min(r);
        }
        self.s.floor.store(floor, SeqCst);
    }

    fn abort_resync(&mut self) {
        if let Some(mut r) = self.resync.take() {
            if let Some((w, _)) = r.writer.take() {
                w.abandon();
            }
            // Its remaining sequence numbers stay unused: the receiver sees a
            // gap until the next resync restarts the stream.
            self.s.resync_left.store(0, SeqCst);
            self.resync_floor = None;
            self.advance_floor();
        }
    }

    fn disk(&mut self, i: usize) -> std::io::Result<&Disk> {
        if self.disks[i].is_none() {
            let d = Disk::open_read(&self.s.cfg.disks[i]).map_err(std::io::Error::other)?;
            self.disks[i] = Some(d);
        }
        self.disks[i]
            .as_ref()
            .ok_or_else(|| std::io::Error::other("disk not open"))
    }

    /// Read up to a slice of marked leaves into the resync's files.
    fn resync_slice(&mut self) -> std::io::Result<()> {
        let Some(mut r) = self.resync.take() else {
            return Ok(());
        };
        let res = self.resync_slice_of(&mut r);
        let done = matches!(res, Ok(true));
        if done {
            info!("resync of the marked leaves shipped to the outbox");
            self.s.resync_left.store(0, SeqCst);
            self.advance_floor();
            self.capture.resync_done(r.generation);
        } else {
            self.resync = Some(r);
            self.advance_floor();
        }
        res.map(|_| ())
    }

    fn resync_slice_of(&mut self, r: &mut Resync) -> std::io::Result<bool> {
        let cap = self.s.cfg.file_cap;
        let mut budget = RESYNC_SLICE;
        let mut buf = Vec::new();
        while budget > 0 && r.disk < r.bits.len() {
            let leaves = self.s.cfg.disk_sizes[r.disk].div_ceil(LEAF_SIZE);
            // Next run of marked leaves on this disk.
            let bits = &r.bits[r.disk];
            let mut l = r.leaf;
            while l < leaves && bits[(l / 64) as usize] & (1 << (l % 64)) == 0 {
                if bits[(l / 64) as usize] == 0 {
                    l = (l / 64 + 1) * 64;
                } else {
                    l += 1;
                }
            }
            if l >= leaves {
                r.disk += 1;
                r.leaf = 0;
                continue;
            }
            let mut end = l;
            let room = match &r.writer {
                Some((w, _)) => cap.saturating_sub(w.data_bytes),
                None => cap,
            };
            let max = (budget.min(room) / LEAF_SIZE).max(1);
            while end < leaves
                && end - l < max
                && bits[(end / 64) as usize] & (1 << (end % 64)) != 0
            {
                end += 1;
            }
            let (off, len) = (l * LEAF_SIZE, (end - l) * LEAF_SIZE);
            buf.resize(len as usize, 0);
            let size = self.s.cfg.disk_sizes[r.disk];
            let avail = size.saturating_sub(off).min(len) as usize;
            let disk_i = r.disk;
            self.disk(disk_i)?
                .read_at(&mut buf[..avail], off)
                .map_err(std::io::Error::other)?;
            buf[avail..].fill(0);
            if r.writer.is_none() {
                let seq = r.next;
                let w = self.open(seq, r.first)?;
                r.first = false;
                r.writer = Some((w, seq));
            }
            if let Some((w, _)) = &mut r.writer {
                write_leaves(w, disk_i as u16, off, &buf)?;
                if w.data_bytes >= cap {
                    self.close_resync_file(r)?;
                }
            }
            self.s
                .resync_left
                .fetch_sub(len.min(self.s.resync_left.load(SeqCst)), SeqCst);
            budget = budget.saturating_sub(len);
            r.leaf = end;
        }
        if r.disk < r.bits.len() {
            return Ok(false);
        }
        // Done reading: close the last file and fill the reservation.
        self.fill_reservation(r)?;
        Ok(true)
    }

    fn fill_reservation(&mut self, r: &mut Resync) -> std::io::Result<()> {
        if r.writer.is_some() {
            self.close_resync_file(r)?;
        }
        while r.next <= r.last {
            let seq = r.next;
            let w = self.open(seq, r.first)?;
            r.first = false;
            r.writer = Some((w, seq));
            self.close_resync_file(r)?;
        }
        Ok(())
    }

    fn close_resync_file(&mut self, r: &mut Resync) -> std::io::Result<()> {
        if let Some((w, seq)) = r.writer.take() {
            self.finish(w, seq, Closes::Nothing, r.at_ns)?;
            r.next = seq + 1;
            self.resync_floor = (r.next <= r.last).then_some(r.next);
            self.advance_floor();
        }
        Ok(())
    }
}

/// Leaves that read as zeros travel as zero records.
fn write_leaves(w: &mut Writer, disk: u16, off: u64, buf: &[u8]) -> std::io::Result<()> {
    let leaf = LEAF_SIZE as usize;
    let mut i = 0;
    while i < buf.len() {
        let zero = buf[i..i + leaf].iter().all(|&b| b == 0);
        let mut j = i + leaf;
        while j < buf.len() && buf[j..j + leaf].iter().all(|&b| b == 0) == zero {
            j += leaf;
        }
        if zero {
            w.zero(disk, off + i as u64, (j - i) as u64)?;
        } else {
            w.data(disk, off + i as u64, &buf[i..j])?;
        }
        i = j;
    }
    Ok(())
}

/// Where the spooler persists its sequence ceiling.
pub fn seq_file(outbox: &Path) -> PathBuf {
    outbox.join("seq")
}

/// The highest sequence number an outbox may have used (its durable
/// ceiling, or the highest queued file).
pub fn last_seq(outbox: &Path) -> std::io::Result<u64> {
    let persisted = std::fs::read_to_string(seq_file(outbox))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let queued = changeset::queued(outbox)?
        .last()
        .map(|(s, _)| *s)
        .unwrap_or(0);
    Ok(persisted.max(queued))
}
