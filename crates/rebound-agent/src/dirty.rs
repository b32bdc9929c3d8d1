//! Persistent dirty tracking of 4 KiB leaves.
//!
//! # What is kept
//! - a leaf bitmap (1 bit per 4 KiB: 32 MiB per TiB), the answer to "what
//!   must replication still send";
//! - a generation per 4 MiB chunk (8 bytes per 4 MiB: 2 MiB per TiB), the
//!   last marker period in which the chunk was written, so that "changed
//!   since marker M" and "clear once acknowledged at M" need no second bitmap;
//! - an intent bitmap (1 bit per 64 MiB region) of regions that may hold
//!   writes not yet in the persisted leaf bitmap.
//!
//! # Durability: marks are never fewer than the data
//! A write may reach the disk at any moment after `pwrite` (page-cache
//! writeback), long before any FLUSH. So before the first write into a
//! region, its intent bit is written and fdatasynced; only then is the data
//! written. Leaf bits and generations are set in memory after the data write
//! and persisted by [`DirtyTracker::persist`] (every FLUSH, every barrier,
//! every checkpoint, at close). At a periodic [`DirtyTracker::checkpoint`], a
//! region whose writes are all in the persisted bitmap and that stayed idle
//! for a whole checkpoint interval has its intent bit cleared. On open, every region whose intent bit is set
//! (the agent stopped without [`DirtyTracker::close`]) has all its leaves
//! marked and its chunks given a new generation: at worst more leaves are
//! marked than were written, never fewer. A state file with no valid header
//! (new, torn, other geometry) marks the whole disk: nothing is known about
//! what changed before it existed.
//!
//! Torn pages of the leaf bitmap are harmless: between persists bits are
//! only added (and clears are only lost, which marks more), and the pages
//! of an interrupted persist belong to regions whose intent bit is still set.

use crate::error::AgentError;
use rebound_types::{CHUNK_SIZE, LEAF_SIZE};
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::{Mutex, RwLock, RwLockReadGuard};
use tracing::{info, warn};

/// Granularity of the intent bitmap.
pub const REGION_SIZE: u64 = 64 << 20;
const PAGE: u64 = 4096;
const WORDS_PER_PAGE: usize = (PAGE / 8) as usize;
const MAGIC: &[u8; 8] = b"RBDIRTY1";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 76;
const LEAVES_PER_CHUNK: u64 = CHUNK_SIZE / LEAF_SIZE;

/// A point in the sequence of writes. Every write completed before
/// [`DirtyTracker::barrier`] returned `M` belongs to `M` or earlier; every
/// write begun after it to a later period. [`Marker::ORIGIN`] precedes all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Marker(pub u64);

impl Marker {
    pub const ORIGIN: Marker = Marker(0);
}

/// What [`DirtyTracker::open`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// No usable state existed: every leaf is marked.
    pub all_marked: bool,
    /// The previous run did not close cleanly.
    pub unclean: bool,
    /// Regions marked in full because the previous run may have written them.
    pub regions_recovered: u64,
    pub dirty_leaves: u64,
}

#[derive(Clone, Copy, Debug)]
struct Layout {
    leaves: u64,
    chunks: u64,
    regions: u64,
    intent_off: u64,
    gens_off: u64,
    bits_off: u64,
    total: u64,
}

fn round_page(n: u64) -> u64 {
    n.div_ceil(PAGE) * PAGE
}

impl Layout {
    fn new(disk_size: u64) -> Layout {
        let leaves = disk_size.div_ceil(LEAF_SIZE);
        let chunks = disk_size.div_ceil(CHUNK_SIZE);
        let regions = disk_size.div_ceil(REGION_SIZE);
        let intent_off = 2 * PAGE;
        let gens_off = intent_off + round_page(regions.div_ceil(64) * 8);
        let bits_off = gens_off + round_page(chunks * 8);
        let total = bits_off + round_page(leaves.div_ceil(64) * 8);
        Layout {
            leaves,
            chunks,
            regions,
            intent_off,
            gens_off,
            bits_off,
            total,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    disk_size: u64,
    seq: u64,
    generation: u64,
    barriers: u64,
    clean: bool,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(LEAF_SIZE as u32).to_le_bytes());
        b[16..24].copy_from_slice(&REGION_SIZE.to_le_bytes());
        b[24..32].copy_from_slice(&CHUNK_SIZE.to_le_bytes());
        b[32..40].copy_from_slice(&self.disk_size.to_le_bytes());
        b[40..48].copy_from_slice(&self.seq.to_le_bytes());
        b[48..56].copy_from_slice(&self.generation.to_le_bytes());
        b[56..64].copy_from_slice(&self.barriers.to_le_bytes());
        b[64..72].copy_from_slice(&(self.clean as u64).to_le_bytes());
        let crc = crc32c::crc32c(&b[..72]);
        b[72..76].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// A header slot, if intact and of our geometry.
    fn decode(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_LEN || &b[0..8] != MAGIC {
            return None;
        }
        let u32at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        if u32at(72) != crc32c::crc32c(&b[..72]) || u32at(8) != VERSION {
            return None;
        }
        if u32at(12) as u64 != LEAF_SIZE || u64at(16) != REGION_SIZE || u64at(24) != CHUNK_SIZE {
            return None;
        }
        Some(Header {
            disk_size: u64at(32),
            seq: u64at(40),
            generation: u64at(48),
            barriers: u64at(56),
            clean: u64at(64) == 1,
        })
    }
}

fn atomics(n: u64, v: u64) -> Vec<AtomicU64> {
    (0..n).map(|_| AtomicU64::new(v)).collect()
}

fn words_from(bytes: &[u8], n: u64) -> Vec<AtomicU64> {
    (0..n as usize)
        .map(|i| {
            let mut a = [0u8; 8];
            if let Some(s) = bytes.get(i * 8..i * 8 + 8) {
                a.copy_from_slice(s);
            }
            AtomicU64::new(u64::from_le_bytes(a))
        })
        .collect()
}

fn set_bit(words: &[AtomicU64], i: u64) {
    words[(i / 64) as usize].fetch_or(1 << (i % 64), SeqCst);
}

fn get_bit(words: &[AtomicU64], i: u64) -> bool {
    words[(i / 64) as usize].load(SeqCst) & (1 << (i % 64)) != 0
}

/// Apply `f(word_index, mask)` to every word covering bits `range`.
fn for_each_mask(range: Range<u64>, mut f: impl FnMut(usize, u64)) {
    let mut i = range.start;
    while i < range.end {
        let w = i / 64;
        let lo = i % 64;
        let hi = (range.end - w * 64).min(64);
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        f(w as usize, mask);
        i = w * 64 + hi;
    }
}

/// Dirty tracking of one disk, persisted in one state file (locked while open).
pub struct DirtyTracker {
    file: File,
    path: PathBuf,
    disk_size: u64,
    layout: Layout,
    bits: Vec<AtomicU64>,
    bits_pages: Vec<AtomicU64>,
    gens: Vec<AtomicU64>,
    gens_pages: Vec<AtomicU64>,
    intent: Vec<AtomicU64>,
    inflight: Vec<AtomicU32>,
    touched: Vec<AtomicU64>,
    current_gen: AtomicU64,
    persist_epoch: AtomicU64,
    barriers: AtomicU64,
    intent_lock: Mutex<()>,
    persist_lock: Mutex<()>,
    header_seq: AtomicU64,
    gate: RwLock<bool>,
    failed: AtomicBool,
}

/// Held while a write, trim or zeroing is in progress; marks its leaves when
/// dropped (also when the operation failed: a failed write may have changed
/// part of the range).
pub struct WriteGuard<'a> {
    tracker: &'a DirtyTracker,
    range: Range<u64>,
    mark: bool,
    _gate: RwLockReadGuard<'a, bool>,
}

impl WriteGuard<'_> {
    /// The operation changed nothing (e.g. a refused fast zero): mark nothing.
    pub fn nothing_written(mut self) {
        self.mark = false;
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.tracker.end_write(self.range.clone(), self.mark);
    }
}

impl DirtyTracker {
    /// Open (or create) the state at `path` for a disk of `disk_size` bytes,
    /// recovering after an unclean stop as described in the module docs.
    pub fn open(path: &Path, disk_size: u64) -> Result<(DirtyTracker, OpenReport), AgentError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| AgentError::state(path, "open", e))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(AgentError::StateLocked { path: path.into() });
            }
            Err(e) => return Err(AgentError::state(path, "lock", e.into())),
        }
        let layout = Layout::new(disk_size);
        let mut contents = Vec::new();
        {
            use std::io::Read;
            (&file)
                .read_to_end(&mut contents)
                .map_err(|e| AgentError::state(path, "read", e))?;
        }
        let header = [0, PAGE as usize]
            .iter()
            .filter_map(|&o| contents.get(o..o + HEADER_LEN).and_then(Header::decode))
            .filter(|h| h.disk_size == disk_size)
            .max_by_key(|h| h.seq);
        let valid = header.is_some() && contents.len() as u64 >= layout.total;
        let mut report = OpenReport::default();
        let section = |off: u64| &contents[(off as usize).min(contents.len())..];
        let (bits, gens, intent_on_disk, hdr) = if let (true, Some(h)) = (valid, header) {
            (
                words_from(section(layout.bits_off), layout.leaves.div_ceil(64)),
                words_from(section(layout.gens_off), layout.chunks),
                words_from(section(layout.intent_off), layout.regions.div_ceil(64)),
                h,
            )
        } else {
            if !contents.is_empty() {
                warn!(path = %path.display(), "dirty-tracking state unusable (torn, foreign or other disk size); marking the whole disk");
            }
            report.all_marked = true;
            // Markers of a lost state are unknown; start generations at the
            // clock in microseconds. A barrier costs an fdatasync (far more
            // than 1 us), so this exceeds every marker handed out before and
            // `changed_since(old marker)` reports the whole disk.
            let base = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(1)
                .max(1);
            (
                atomics(layout.leaves.div_ceil(64), u64::MAX),
                atomics(layout.chunks, base),
                atomics(layout.regions.div_ceil(64), 0),
                Header {
                    disk_size,
                    seq: 0,
                    generation: base,
                    barriers: 0,
                    clean: true,
                },
            )
        };
        // Bits past the last leaf stay clear so counts are exact.
        if !layout.leaves.is_multiple_of(64)
            && let Some(last) = bits.last()
        {
            last.fetch_and((1u64 << (layout.leaves % 64)) - 1, SeqCst);
        }
        let max_gen = gens.iter().map(|g| g.load(SeqCst)).max().unwrap_or(0);
        let current = hdr.generation.max(max_gen) + 1;
        let t = DirtyTracker {
            file,
            path: path.into(),
            disk_size,
            layout,
            bits_pages: atomics(
                layout
                    .leaves
                    .div_ceil(64)
                    .div_ceil(WORDS_PER_PAGE as u64)
                    .div_ceil(64),
                0,
            ),
            gens_pages: atomics(
                layout.chunks.div_ceil(WORDS_PER_PAGE as u64).div_ceil(64),
                0,
            ),
            intent: atomics(layout.regions.div_ceil(64), 0),
            inflight: (0..layout.regions).map(|_| AtomicU32::new(0)).collect(),
            touched: atomics(layout.regions, 0),
            bits,
            gens,
            current_gen: AtomicU64::new(current),
            persist_epoch: AtomicU64::new(1),
            barriers: AtomicU64::new(hdr.barriers),
            intent_lock: Mutex::new(()),
            persist_lock: Mutex::new(()),
            header_seq: AtomicU64::new(hdr.seq),
            gate: RwLock::new(false),
            failed: AtomicBool::new(false),
        };
        report.unclean = valid && !hdr.clean;
        for r in 0..layout.regions {
            if get_bit(&intent_on_disk, r) {
                // The previous run may have written here after its last persist.
                let start = r * REGION_SIZE;
                t.mark_bytes(start..(start + REGION_SIZE).min(disk_size), current);
                report.regions_recovered += 1;
            }
        }
        // Make what we know durable before serving: the file is resized to
        // this geometry, every page written once, intent cleared on disk.
        t.file
            .set_len(layout.total)
            .map_err(|e| AgentError::state(path, "resize", e))?;
        t.write_all_pages()?;
        t.sync()?;
        t.write_intent()?;
        t.write_header(false)?;
        t.sync()?;
        rebound_disk::crashsafe::fsync_dir(path.parent().unwrap_or(Path::new("."))).ok();
        report.dirty_leaves = t.dirty_count();
        info!(path = %path.display(), ?report, "dirty tracking opened");
        Ok((t, report))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Number of leaves (4 KiB) of the disk.
    pub fn leaf_count(&self) -> u64 {
        self.layout.leaves
    }

    /// Flush barriers recorded since the state was created.
    pub fn barrier_count(&self) -> u64 {
        self.barriers.load(SeqCst)
    }

    fn regions_of(&self, range: &Range<u64>) -> Range<u64> {
        if range.is_empty() {
            return 0..0;
        }
        range.start / REGION_SIZE..(range.end - 1) / REGION_SIZE + 1
    }

    /// Announce a write to the byte `range`: returns once every region it
    /// touches is durably marked as possibly dirty. Drop the guard after the
    /// data write.
    pub fn begin_write(&self, range: Range<u64>) -> Result<WriteGuard<'_>, AgentError> {
        let gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        if *gate {
            return Err(AgentError::Closed);
        }
        if self.failed.load(SeqCst) {
            return Err(AgentError::StateFailed {
                path: self.path.clone(),
            });
        }
        let regions = self.regions_of(&range);
        for r in regions.clone() {
            // Announce before checking intent (pairs with the clearing in persist).
            self.inflight[r as usize].fetch_add(1, SeqCst);
        }
        if regions.clone().any(|r| !get_bit(&self.intent, r))
            && let Err(e) = self.set_intent(regions.clone())
        {
            for r in regions {
                self.inflight[r as usize].fetch_sub(1, SeqCst);
            }
            return Err(e);
        }
        Ok(WriteGuard {
            tracker: self,
            range,
            mark: true,
            _gate: gate,
        })
    }

    fn set_intent(&self, regions: Range<u64>) -> Result<(), AgentError> {
        let _g = self.intent_lock.lock().unwrap_or_else(|p| p.into_inner());
        let missing: Vec<u64> = regions.filter(|&r| !get_bit(&self.intent, r)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        for &r in &missing {
            set_bit(&self.intent, r);
        }
        let res = self.write_intent().and_then(|_| self.sync());
        if res.is_err() {
            self.failed.store(true, SeqCst);
        }
        res
    }

    fn end_write(&self, range: Range<u64>, mark: bool) {
        if mark {
            self.mark_bytes(range.clone(), self.current_gen.load(SeqCst));
        }
        let epoch = self.persist_epoch.load(SeqCst);
        for r in self.regions_of(&range) {
            self.touched[r as usize].fetch_max(epoch, SeqCst);
            self.inflight[r as usize].fetch_sub(1, SeqCst);
        }
    }

    /// Stamp the chunks with `generation`, then set the leaf bits (in that
    /// order: see `acknowledge`).
    fn mark_bytes(&self, range: Range<u64>, generation: u64) {
        if range.is_empty() {
            return;
        }
        let range = range.start..range.end.min(self.disk_size);
        let first_chunk = range.start / CHUNK_SIZE;
        let last_chunk = (range.end - 1) / CHUNK_SIZE;
        for c in first_chunk..=last_chunk {
            self.gens[c as usize].fetch_max(generation, SeqCst);
            set_bit(&self.gens_pages, c / WORDS_PER_PAGE as u64);
        }
        let leaves = range.start / LEAF_SIZE..range.end.div_ceil(LEAF_SIZE);
        for_each_mask(leaves, |w, mask| {
            self.bits[w].fetch_or(mask, SeqCst);
            set_bit(&self.bits_pages, (w / WORDS_PER_PAGE) as u64);
        });
    }

    /// Mark the leaves of a byte range now (a write the change stream could
    /// not take: the bitmap must hold it before the stream's next resync
    /// takes its snapshot).
    pub fn mark(&self, range: Range<u64>) {
        self.mark_bytes(range, self.current_gen.load(SeqCst));
    }

    /// Close the current period without persisting: the marker orders the
    /// writes in memory only (the change stream's barriers, taken under its
    /// lock, must not wait for an fdatasync). Markers handed out by it are
    /// not to be kept across a restart.
    pub fn period(&self) -> Marker {
        Marker(self.current_gen.fetch_add(1, SeqCst))
    }

    /// A copy of the leaf bitmap (1 bit per 4 KiB, 64 leaves per word).
    pub fn snapshot(&self) -> Vec<u64> {
        self.bits.iter().map(|w| w.load(SeqCst)).collect()
    }

    /// Mark every leaf (e.g. after the disk was written outside the agent).
    pub fn mark_all(&self) {
        self.mark_bytes(0..self.disk_size, self.current_gen.load(SeqCst));
    }

    /// Is the leaf marked?
    pub fn is_dirty(&self, leaf: u64) -> bool {
        leaf < self.layout.leaves && get_bit(&self.bits, leaf)
    }

    /// Number of marked leaves.
    pub fn dirty_count(&self) -> u64 {
        self.bits
            .iter()
            .map(|w| w.load(SeqCst).count_ones() as u64)
            .sum()
    }

    /// Close the current period: returns a marker that every write completed
    /// so far precedes, and persists the state so that markers handed out
    /// stay ordered across restarts.
    pub fn barrier(&self) -> Result<Marker, AgentError> {
        let m = self.current_gen.fetch_add(1, SeqCst);
        self.barriers.fetch_add(1, SeqCst);
        self.persist()?;
        Ok(Marker(m))
    }

    /// Marked leaves (as runs of leaf indices) that may have changed after
    /// `since`. Precision is the 4 MiB chunk: a marked leaf is reported if
    /// any write to its chunk came after `since`.
    pub fn changed_since(&self, since: Marker) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        for c in 0..self.layout.chunks {
            if self.gens[c as usize].load(SeqCst) <= since.0 {
                continue;
            }
            let leaves = c * LEAVES_PER_CHUNK..((c + 1) * LEAVES_PER_CHUNK).min(self.layout.leaves);
            for_each_mask(leaves, |w, mask| {
                let mut bits = self.bits[w].load(SeqCst) & mask;
                while bits != 0 {
                    let lo = bits.trailing_zeros() as u64;
                    let run = (bits >> lo).trailing_ones() as u64;
                    let start = w as u64 * 64 + lo;
                    match runs.last_mut() {
                        Some(last) if last.end == start => last.end = start + run,
                        _ => runs.push(start..start + run),
                    }
                    bits = if lo + run >= 64 {
                        0
                    } else {
                        bits & !(((1u64 << run) - 1) << lo)
                    };
                }
            });
        }
        runs
    }

    /// The target has everything of `leaves` as of marker `at`: clear them,
    /// except in chunks written after `at` (those stay marked). Returns how
    /// many leaves were cleared. Persisted with the next persist.
    pub fn acknowledge(&self, at: Marker, leaves: &[Range<u64>]) -> u64 {
        let mut cleared = 0;
        for run in leaves {
            let run = run.start.min(self.layout.leaves)..run.end.min(self.layout.leaves);
            let mut l = run.start;
            while l < run.end {
                let c = l / LEAVES_PER_CHUNK;
                let end = ((c + 1) * LEAVES_PER_CHUNK).min(run.end);
                if self.gens[c as usize].load(SeqCst) <= at.0 {
                    for_each_mask(l..end, |w, mask| {
                        let before = self.bits[w].fetch_and(!mask, SeqCst);
                        // A write that completed meanwhile stamped the chunk
                        // before setting its bits: seeing a newer stamp now,
                        // restore the marks (never lose one).
                        if self.gens[c as usize].load(SeqCst) > at.0 {
                            self.bits[w].fetch_or(before & mask, SeqCst);
                        } else {
                            cleared += (before & mask).count_ones() as u64;
                        }
                        set_bit(&self.bits_pages, (w / WORDS_PER_PAGE) as u64);
                    });
                }
                l = end;
            }
        }
        cleared
    }

    /// Write the changed parts of the state and fdatasync it (every FLUSH and
    /// barrier). The intent bitmap is left alone: see [`Self::checkpoint`].
    pub fn persist(&self) -> Result<(), AgentError> {
        self.persist_with(None)
    }

    /// Persist, then forget the intent of regions with no write in progress
    /// and none completed since the previous checkpoint. Called periodically
    /// (every few seconds), not per FLUSH: a region leaves the intent bitmap
    /// only after a whole checkpoint interval of idleness, so a busy region
    /// does not pay an extra state fdatasync after every flush.
    pub fn checkpoint(&self) -> Result<(), AgentError> {
        // Writes that complete from now on stamp a later epoch.
        let epoch = self.persist_epoch.fetch_add(1, SeqCst);
        self.persist_with(Some(epoch))
    }

    fn persist_with(&self, release_before: Option<u64>) -> Result<(), AgentError> {
        let _p = self.persist_lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.failed.load(SeqCst) {
            return Err(AgentError::StateFailed {
                path: self.path.clone(),
            });
        }
        let res = self.persist_locked(release_before);
        if res.is_err() {
            self.failed.store(true, SeqCst);
        }
        res
    }

    fn persist_locked(&self, release_before: Option<u64>) -> Result<(), AgentError> {
        self.write_dirty_pages()?;
        self.write_header(false)?;
        self.sync()?;
        let Some(epoch) = release_before else {
            return Ok(());
        };
        // Every write stamped before `epoch` completed before the pages above
        // were read, so its marks are durable now.
        let _g = self.intent_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = false;
        for r in 0..self.layout.regions {
            let i = r as usize;
            if !get_bit(&self.intent, r)
                || self.touched[i].load(SeqCst) >= epoch
                || self.inflight[i].load(SeqCst) != 0
            {
                continue;
            }
            let mask = 1u64 << (r % 64);
            self.intent[i / 64].fetch_and(!mask, SeqCst);
            // A writer announces itself (inflight) before reading the intent
            // bit; re-checking after the clear catches one that raced us.
            if self.inflight[i].load(SeqCst) != 0 || self.touched[i].load(SeqCst) >= epoch {
                self.intent[i / 64].fetch_or(mask, SeqCst);
            } else {
                changed = true;
            }
        }
        if changed {
            self.write_intent()?;
            self.sync()?;
        }
        Ok(())
    }

    /// Regions currently marked as possibly holding unpersisted writes.
    pub fn intent_regions(&self) -> u64 {
        self.intent
            .iter()
            .map(|w| w.load(SeqCst).count_ones() as u64)
            .sum()
    }

    /// Clean stop: wait for writes in progress, persist everything, clear the
    /// intent and record a clean close. Later writes fail.
    pub fn close(&self) -> Result<(), AgentError> {
        let mut gate = self.gate.write().unwrap_or_else(|p| p.into_inner());
        if *gate {
            return Ok(());
        }
        *gate = true;
        let _p = self.persist_lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.failed.load(SeqCst) {
            return Err(AgentError::StateFailed {
                path: self.path.clone(),
            });
        }
        self.write_dirty_pages()?;
        self.write_header(false)?;
        self.sync()?;
        {
            let _g = self.intent_lock.lock().unwrap_or_else(|p| p.into_inner());
            for w in &self.intent {
                w.store(0, SeqCst);
            }
            self.write_intent()?;
        }
        self.write_header(true)?;
        self.sync()?;
        info!(path = %self.path.display(), dirty_leaves = self.dirty_count(), "dirty tracking closed cleanly");
        Ok(())
    }

    fn sync(&self) -> Result<(), AgentError> {
        self.file
            .sync_data()
            .map_err(|e| AgentError::state(&self.path, "fdatasync", e))
    }

    fn pwrite(&self, buf: &[u8], off: u64) -> Result<(), AgentError> {
        self.file
            .write_all_at(buf, off)
            .map_err(|e| AgentError::state(&self.path, "write", e))
    }

    fn write_header(&self, clean: bool) -> Result<(), AgentError> {
        let seq = self.header_seq.fetch_add(1, SeqCst) + 1;
        let h = Header {
            disk_size: self.disk_size,
            seq,
            generation: self.current_gen.load(SeqCst),
            barriers: self.barriers.load(SeqCst),
            clean,
        };
        // Alternate slots: a torn header write leaves the other one intact.
        self.pwrite(&h.encode(), (seq % 2) * PAGE)
    }

    fn words_page(words: &[AtomicU64], page: usize) -> Vec<u8> {
        let start = page * WORDS_PER_PAGE;
        let end = (start + WORDS_PER_PAGE).min(words.len());
        let mut buf = Vec::with_capacity(PAGE as usize);
        for w in &words[start..end] {
            buf.extend_from_slice(&w.load(SeqCst).to_le_bytes());
        }
        buf
    }

    fn write_dirty_pages(&self) -> Result<(), AgentError> {
        for (pages, words, base) in [
            (&self.gens_pages, &self.gens, self.layout.gens_off),
            (&self.bits_pages, &self.bits, self.layout.bits_off),
        ] {
            for (pw, flags) in pages.iter().enumerate() {
                // Take the page flags first, then read the words: a mark
                // landing after this either is in the page we write or flags
                // the page again for the next persist.
                let mut set = flags.swap(0, SeqCst);
                while set != 0 {
                    let bit = set.trailing_zeros() as usize;
                    set &= set - 1;
                    let page = pw * 64 + bit;
                    let buf = Self::words_page(words, page);
                    if let Err(e) = self.pwrite(&buf, base + page as u64 * PAGE) {
                        flags.fetch_or(1 << bit, SeqCst);
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    fn write_all_pages(&self) -> Result<(), AgentError> {
        for (words, base) in [
            (&self.gens, self.layout.gens_off),
            (&self.bits, self.layout.bits_off),
        ] {
            for page in 0..words.len().div_ceil(WORDS_PER_PAGE) {
                self.pwrite(&Self::words_page(words, page), base + page as u64 * PAGE)?;
            }
        }
        for p in self.gens_pages.iter().chain(self.bits_pages.iter()) {
            p.store(0, SeqCst);
        }
        Ok(())
    }

    fn write_intent(&self) -> Result<(), AgentError> {
        let mut buf = Vec::with_capacity(self.intent.len() * 8);
        for w in &self.intent {
            buf.extend_from_slice(&w.load(SeqCst).to_le_bytes());
        }
        self.pwrite(&buf, self.layout.intent_off)
    }
}
