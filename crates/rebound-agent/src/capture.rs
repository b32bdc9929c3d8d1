//! The change stream's capture: every write acknowledged to the machine is
//! copied, in the write path, into one bounded in-memory queue shared by all
//! disks of the machine (write splitting). A barrier is an entry in that
//! queue: pushing it is an instant of every disk at once, so a recovery
//! point never holds writes for longer than a queue push.
//!
//! # Order
//! Writes to overlapping ranges are ordered: the export takes the range's
//! stripe locks ([`Capture::order`]) around its disk write and its push, so
//! the queue's order of two overlapping writes is the disk's. Writes that do
//! not overlap may be pushed in any order; a barrier splits them exactly as
//! the machine saw them (a write acknowledged before the barrier was pushed
//! before it; a write issued after it is pushed after it).
//!
//! # Never a stall, never a loss
//! Pushing never waits: when the queue is full (the spooler is behind
//! because the outbox is full: the process server or the master target is
//! slow or away), or while capture is off, the write is not queued and its
//! leaves are marked in the dirty bitmap at once, under the queue's lock.
//! From then on no barrier closes a point until a resync
//! ([`Capture::start`]) has shipped every marked leaf: the resync entry
//! carries a snapshot of the bitmaps taken under the same lock, so every
//! write the queue dropped is in it.
//!
//! # Marks
//! Each barrier carries a [`Marker`] per disk; once the master target has
//! applied the barrier's changeset, [`crate::DirtyTracker::acknowledge`]
//! with that marker clears the leaves no later write touched.

use crate::changeset::Closes;
use crate::dirty::{DirtyTracker, Marker};
use rebound_types::LEAF_SIZE;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Stripe locks ordering overlapping writes; a stripe covers 1 MiB.
const STRIPES: usize = 256;
const STRIPE_SHIFT: u32 = 20;

/// One captured event, in stream order.
#[derive(Debug)]
pub enum Entry {
    Write {
        disk: u16,
        offset: u64,
        data: Vec<u8>,
    },
    /// Leaves that now read as zeros.
    Zero { disk: u16, offset: u64, len: u64 },
    /// Closes a recovery point: every entry before it, on every disk.
    Barrier {
        closes: Closes,
        at_ns: u64,
        markers: Vec<Marker>,
    },
    /// Ship every leaf marked in `bits` (one bitmap per disk) before the
    /// entries that follow; the stream restarts its continuity here.
    /// `generation` tells [`Capture::resync_done`] which resync finished.
    Resync {
        bits: Vec<Vec<u64>>,
        at_ns: u64,
        generation: u64,
    },
}

impl Entry {
    fn bytes(&self) -> u64 {
        match self {
            Entry::Write { data, .. } => data.len() as u64 + 64,
            Entry::Resync { bits, .. } => bits.iter().map(|b| b.len() as u64 * 8).sum(),
            _ => 64,
        }
    }
}

/// Whether writes enter the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Not replicating: writes are only marked.
    Off,
    /// Writes are queued.
    On,
    /// The queue was full and dropped writes (they are marked): a resync
    /// must run before the next point.
    Overflowed,
}

struct Queue {
    entries: VecDeque<Entry>,
    bytes: u64,
    mode: Mode,
    /// A resync was queued and has not finished shipping its leaves: no
    /// point may close until it has.
    resync_pending: bool,
    /// Generation of the latest resync queued: only its end clears
    /// `resync_pending` (an older one finishing says nothing of the leaves
    /// the newer one must still ship).
    resync_generation: u64,
}

/// Counters for the agent's heartbeat and the benchmark.
#[derive(Default, Debug)]
pub struct CaptureStats {
    pub captured_bytes: AtomicU64,
    pub dropped_writes: AtomicU64,
    pub barriers: AtomicU64,
}

pub struct Capture {
    q: Mutex<Queue>,
    /// `q.mode == On`, readable without the lock: the write path skips the
    /// copy of a write that would only be marked (checked again under it).
    on: std::sync::atomic::AtomicBool,
    ready: Condvar,
    trackers: Vec<Arc<DirtyTracker>>,
    limit: u64,
    stripes: Vec<Mutex<()>>,
    /// After a group barrier, writes captured after it are acknowledged no
    /// earlier than this (ns since the epoch): see [`Capture::group_barrier`].
    ack_not_before: AtomicU64,
    pub stats: CaptureStats,
}

/// Holds the stripes of a range: see [`Capture::order`].
pub struct Ordered<'a> {
    _guards: Vec<MutexGuard<'a, ()>>,
}

/// Now on the wall clock, ns since the UNIX epoch (barrier times).
pub(crate) fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Capture {
    /// A capture over the machine's disks (their trackers, in disk order),
    /// holding at most `limit` bytes in memory. It starts `Off`.
    pub fn new(trackers: Vec<Arc<DirtyTracker>>, limit: u64) -> Arc<Capture> {
        Arc::new(Capture {
            q: Mutex::new(Queue {
                entries: VecDeque::new(),
                bytes: 0,
                mode: Mode::Off,
                resync_pending: false,
                resync_generation: 0,
            }),
            on: std::sync::atomic::AtomicBool::new(false),
            ready: Condvar::new(),
            trackers,
            limit,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            ack_not_before: AtomicU64::new(0),
            stats: CaptureStats::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.q.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn disks(&self) -> usize {
        self.trackers.len()
    }

    /// The disks' trackers, in disk order.
    pub fn trackers(&self) -> &[Arc<DirtyTracker>] {
        &self.trackers
    }

    /// Lock the stripes of `range` on `disk`: hold it across the disk write
    /// and the push so overlapping writes are queued in disk order.
    pub fn order(&self, disk: u16, range: Range<u64>) -> Ordered<'_> {
        if range.is_empty() {
            return Ordered { _guards: vec![] };
        }
        let first = range.start >> STRIPE_SHIFT;
        let last = (range.end - 1) >> STRIPE_SHIFT;
        let mut idx: Vec<usize> = (first..=last.min(first + STRIPES as u64))
            .map(|u| ((u ^ ((disk as u64) << 40)) % STRIPES as u64) as usize)
            .collect();
        if last - first >= STRIPES as u64 {
            idx = (0..STRIPES).collect();
        }
        idx.sort_unstable();
        idx.dedup();
        Ordered {
            _guards: idx
                .into_iter()
                .map(|i| self.stripes[i].lock().unwrap_or_else(|p| p.into_inner()))
                .collect(),
        }
    }

    /// Queue `entry`, or mark `range` of `disk` when it cannot be queued.
    fn push_or_mark(&self, disk: u16, range: Range<u64>, entry: Option<Entry>) {
        let mut q = self.lock();
        let fits = q.bytes + entry.as_ref().map_or(0, Entry::bytes) <= self.limit;
        match (q.mode, entry) {
            (Mode::On, Some(e)) if fits => {
                q.bytes += e.bytes();
                q.entries.push_back(e);
                drop(q);
                self.stats
                    .captured_bytes
                    .fetch_add(range.end - range.start, SeqCst);
                self.ready.notify_one();
            }
            (mode, _) => {
                if mode == Mode::On {
                    q.mode = Mode::Overflowed;
                    self.on.store(false, SeqCst);
                    tracing::warn!(
                        queued = q.bytes,
                        limit = self.limit,
                        "change stream queue full: writes are marked in the dirty bitmap until a resync"
                    );
                }
                if let Some(t) = self.trackers.get(disk as usize) {
                    t.mark(range);
                }
                self.stats.dropped_writes.fetch_add(1, SeqCst);
            }
        }
    }

    /// A write of whole leaves that reached the disk (call with the range's
    /// [`Self::order`] held, before acknowledging it).
    pub fn write(&self, disk: u16, offset: u64, data: &[u8]) {
        let range = offset..offset + data.len() as u64;
        // Copy outside the lock; skip the copy when it would be dropped.
        let entry = self.on.load(SeqCst).then(|| Entry::Write {
            disk,
            offset,
            data: data.to_vec(),
        });
        self.push_or_mark(disk, range, entry);
    }

    /// Whole leaves that now read as zeros.
    pub fn zero(&self, disk: u16, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let entry = Entry::Zero {
            disk,
            offset: range.start,
            len: range.end - range.start,
        };
        self.push_or_mark(disk, range, Some(entry));
    }

    /// Close a recovery point at this instant. `None` when no consistent
    /// point can close now (capture off, overflowed, or a resync still
    /// shipping).
    pub fn barrier(&self, closes: Closes) -> Option<u64> {
        let q = self.lock();
        if q.mode != Mode::On || q.resync_pending {
            return None;
        }
        self.push_barrier(q, closes, now_ns())
    }

    /// Queue a barrier (under the queue's lock, so it is one instant of every
    /// disk) with a marker per disk.
    fn push_barrier(
        &self,
        mut q: MutexGuard<'_, Queue>,
        closes: Closes,
        at_ns: u64,
    ) -> Option<u64> {
        let markers = self.trackers.iter().map(|t| t.period()).collect();
        let e = Entry::Barrier {
            closes,
            at_ns,
            markers,
        };
        q.bytes += e.bytes();
        q.entries.push_back(e);
        drop(q);
        self.stats.barriers.fetch_add(1, SeqCst);
        self.ready.notify_one();
        Some(at_ns)
    }

    /// Close a replication group's point at the agreed time `at_ns` (a
    /// multiple of the group's interval on every member's clock). Members'
    /// clocks differ by at most `skew` and each closes its barrier within
    /// `late` of `at_ns` (a member later than that closes none, and the
    /// marker is not common): a write captured after this barrier is then
    /// acknowledged only after `at_ns + late + 2 × skew`, by which time
    /// every member's barrier is behind, so a write another member issues
    /// after seeing that acknowledgement falls after its barrier too. The
    /// group's points are closed under causality; writes wait at most
    /// `late + 2 × skew`, once per interval.
    pub fn group_barrier(&self, at_ns: u64, late: Duration, skew: Duration) -> Option<u64> {
        let q = self.lock();
        let now = now_ns();
        if q.mode != Mode::On || q.resync_pending || now > at_ns + late.as_nanos() as u64 {
            return None;
        }
        self.ack_not_before.store(
            at_ns + late.as_nanos() as u64 + 2 * skew.as_nanos() as u64,
            SeqCst,
        );
        self.push_barrier(q, Closes::Group, at_ns)
    }

    /// Wait, before acknowledging a captured write, until a group barrier's
    /// hold is over (usually returns at once).
    pub fn ack_wait(&self) {
        let until = self.ack_not_before.load(SeqCst);
        // Items outside a group never set it: no clock read per write.
        if until == 0 {
            return;
        }
        let now = now_ns();
        if until > now {
            std::thread::sleep(Duration::from_nanos(until - now));
        }
    }

    /// Start streaming (or restart after an overflow or a gap): queue a
    /// resync of every leaf marked now, then capture every write.
    pub fn start(&self) {
        let mut q = self.lock();
        let bits = self.trackers.iter().map(|t| t.snapshot()).collect();
        q.resync_generation += 1;
        let e = Entry::Resync {
            bits,
            at_ns: now_ns(),
            generation: q.resync_generation,
        };
        // The resync entry is admitted whatever the bound: it replaces the
        // writes the queue could not take.
        q.bytes += e.bytes();
        q.entries.push_back(e);
        q.mode = Mode::On;
        self.on.store(true, SeqCst);
        q.resync_pending = true;
        drop(q);
        self.ready.notify_one();
    }

    /// Stop streaming: writes are only marked from now on.
    pub fn stop(&self) {
        let mut q = self.lock();
        q.mode = Mode::Off;
        self.on.store(false, SeqCst);
    }

    /// The spooler shipped the leaves of resync `generation`: points may
    /// close again if it is the latest one.
    pub fn resync_done(&self, generation: u64) {
        let mut q = self.lock();
        if q.resync_generation == generation {
            q.resync_pending = false;
        }
    }

    pub fn mode(&self) -> Mode {
        self.lock().mode
    }

    pub fn resync_pending(&self) -> bool {
        self.lock().resync_pending
    }

    /// Bytes waiting in memory.
    pub fn queued_bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// The next entry, waiting at most `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<Entry> {
        let deadline = Instant::now() + timeout;
        let mut q = self.lock();
        loop {
            if let Some(e) = q.entries.pop_front() {
                q.bytes -= e.bytes();
                return Some(e);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            q = self
                .ready
                .wait_timeout(q, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Everything queued, waiting at most `timeout` for a first entry: one
    /// lock for a whole batch, so the spooler does not contend with the
    /// write path entry by entry.
    pub fn drain(&self, timeout: Duration) -> VecDeque<Entry> {
        let deadline = Instant::now() + timeout;
        let mut q = self.lock();
        loop {
            if !q.entries.is_empty() {
                q.bytes = 0;
                return std::mem::take(&mut q.entries);
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return VecDeque::new();
            };
            q = self
                .ready
                .wait_timeout(q, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// The change is captured as whole leaves: the leaf-aligned interior of
    /// `range` and the partial leaves at its edges.
    pub fn leaf_span(range: &Range<u64>) -> Range<u64> {
        (range.start / LEAF_SIZE) * LEAF_SIZE..range.end.div_ceil(LEAF_SIZE) * LEAF_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trackers(dir: &std::path::Path, n: usize) -> Vec<Arc<DirtyTracker>> {
        (0..n)
            .map(|i| {
                let (t, _) =
                    DirtyTracker::open(&dir.join(format!("d{i}.dirty")), 1 << 24).expect("tracker");
                Arc::new(t)
            })
            .collect()
    }

    fn drain(c: &Capture) -> Vec<Entry> {
        let mut v = Vec::new();
        while let Some(e) = c.next(Duration::ZERO) {
            v.push(e);
        }
        v
    }

    #[test]
    fn off_marks_and_on_queues_in_order() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let ts = trackers(dir.path(), 2);
        for t in &ts {
            t.acknowledge(Marker(u64::MAX), std::slice::from_ref(&(0..t.leaf_count())));
        }
        let c = Capture::new(ts.clone(), 1 << 20);
        c.write(0, 0, &[1; 4096]);
        assert!(ts[0].is_dirty(0), "a write while off is marked");
        assert!(c.barrier(Closes::CrashConsistent).is_none());
        c.start();
        c.write(1, 8192, &[2; 4096]);
        c.zero(0, 4096..12288);
        assert!(
            c.barrier(Closes::CrashConsistent).is_none(),
            "no point before the resync shipped"
        );
        c.resync_done(1);
        assert!(c.barrier(Closes::CrashConsistent).is_some());
        let e = drain(&c);
        assert!(matches!(&e[0], Entry::Resync { bits, .. } if bits[0][0] & 1 == 1));
        assert!(matches!(
            &e[1],
            Entry::Write {
                disk: 1,
                offset: 8192,
                ..
            }
        ));
        assert!(matches!(
            &e[2],
            Entry::Zero {
                disk: 0,
                offset: 4096,
                len: 8192
            }
        ));
        assert!(matches!(&e[3], Entry::Barrier { markers, .. } if markers.len() == 2));
        assert_eq!(c.queued_bytes(), 0);
        Ok(())
    }

    #[test]
    fn a_group_point_closes_only_on_time_and_holds_later_acks()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let c = Capture::new(trackers(dir.path(), 1), 1 << 20);
        c.start();
        c.resync_done(1);
        let late = Duration::from_millis(40);
        // Too late for the agreed time: no group point.
        assert!(
            c.group_barrier(now_ns() - 1_000_000_000, late, Duration::ZERO)
                .is_none()
        );
        let at = now_ns();
        assert_eq!(
            c.group_barrier(at, late, Duration::from_millis(5)),
            Some(at)
        );
        // A write captured now is acknowledged only once every member's
        // barrier is behind: at + late + 2 × skew.
        c.write(0, 0, &[1; 4096]);
        c.ack_wait();
        assert!(now_ns() >= at + 50_000_000);
        let e = drain(&c);
        assert!(matches!(
            &e[1],
            Entry::Barrier {
                closes: Closes::Group,
                at_ns,
                ..
            } if *at_ns == at
        ));
        Ok(())
    }

    #[test]
    fn overflow_marks_and_refuses_points_until_resync() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let ts = trackers(dir.path(), 1);
        ts[0].acknowledge(
            Marker(u64::MAX),
            std::slice::from_ref(&(0..ts[0].leaf_count())),
        );
        let c = Capture::new(ts.clone(), 3 * 4096);
        c.start();
        c.resync_done(1);
        drain(&c);
        c.write(0, 0, &[1; 4096]);
        c.write(0, 4096, &[1; 4096]);
        assert_eq!(c.mode(), Mode::On);
        c.write(0, 8192, &[1; 4096]);
        assert_eq!(c.mode(), Mode::Overflowed);
        assert!(ts[0].is_dirty(2), "the dropped write is marked");
        assert!(c.barrier(Closes::CrashConsistent).is_none());
        // Later writes are marked too, even once the queue drained.
        drain(&c);
        c.write(0, 40960, &[1; 4096]);
        assert!(ts[0].is_dirty(10));
        c.start();
        let e = drain(&c);
        match &e[..] {
            [Entry::Resync { bits, .. }] => {
                assert!(bits[0][0] & (1 << 2) != 0 && bits[0][0] & (1 << 10) != 0)
            }
            other => panic!("{other:?}"),
        }
        Ok(())
    }

    /// Writers racing barriers: every write lands between the barriers that
    /// bracket its push, and a write acknowledged before a barrier is
    /// always before it in the stream.
    #[test]
    fn barriers_split_concurrent_writers() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let ts = trackers(dir.path(), 2);
        let c = Capture::new(ts, 1 << 30);
        c.start();
        c.start();
        c.resync_done(1);
        assert!(c.resync_pending(), "an older resync's end does not count");
        c.resync_done(2);
        let acked = Arc::new(AtomicU64::new(0));
        std::thread::scope(|s| {
            for w in 0..4u16 {
                let (c, acked) = (&c, acked.clone());
                s.spawn(move || {
                    for i in 0..500u64 {
                        let off = ((w as u64 * 500 + i) % 4096) * 4096;
                        let mut data = vec![0u8; 4096];
                        data[..8].copy_from_slice(&(w as u64 * 1000 + i).to_le_bytes());
                        c.write(w % 2, off, &data);
                        acked.fetch_max(w as u64 * 1000 + i + 1, SeqCst);
                    }
                });
            }
            let c = &c;
            s.spawn(move || {
                for _ in 0..50 {
                    c.barrier(Closes::CrashConsistent);
                    std::thread::yield_now();
                }
            });
        });
        let entries = drain(&c);
        let writes = entries
            .iter()
            .filter(|e| matches!(e, Entry::Write { .. }))
            .count();
        assert_eq!(writes, 2000);
        // Each writer's own writes stay in issue order across barriers.
        let mut last = [None::<u64>; 4];
        for e in &entries {
            if let Entry::Write { data, .. } = e {
                let id = u64::from_le_bytes(data[..8].try_into()?);
                let w = (id / 1000) as usize;
                assert!(last[w].is_none_or(|l| l < id));
                last[w] = Some(id);
            }
        }
        Ok(())
    }
}
