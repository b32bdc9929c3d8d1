//! The journal of one replicated item: its base disks, its segments of
//! changesets, its catalogue of recovery points, retention and pins.

use crate::error::{JournalError, Result};
use crate::format::{
    self, BLOCK, IdxEntry, KIND_COMMIT, KIND_WRITE, PointRec, RecHeader, SegSummary,
};
use crate::fs::{Fs, FsFile, RealFs};
use crate::segment;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Kind of a recovery point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PointKind {
    CrashConsistent,
    AppConsistent,
    /// A replication group's point; carries the group marker.
    Group,
}

impl PointKind {
    pub fn name(self) -> &'static str {
        match self {
            PointKind::CrashConsistent => "crash-consistent",
            PointKind::AppConsistent => "app-consistent",
            PointKind::Group => "group",
        }
    }
}

/// A recovery point in the catalogue. Its id is the sequence number of the
/// changeset commit that closed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PointInfo {
    pub id: u64,
    pub time_ns: u64,
    pub kind: PointKind,
    pub group: Option<String>,
    /// Data bytes of the changesets since the previous point.
    pub bytes: u64,
    /// False when the point follows a corrupt record: it is never materialised.
    pub usable: bool,
    /// True once its segment is sealed and indexed on disk.
    pub processed: bool,
}

/// A disk of the item and where its base image lives.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskMeta {
    pub name: String,
    pub size: u64,
    pub base: PathBuf,
}

/// A disk to create the journal with; `base` defaults to `<item dir>/base/<name>.raw`.
#[derive(Clone, Debug)]
pub struct DiskSpec {
    pub name: String,
    pub size: u64,
    pub base: Option<PathBuf>,
}

/// One write of a changeset: 4 KiB-aligned offset and length.
#[derive(Clone, Debug)]
pub struct Write {
    pub disk: u16,
    pub offset: u64,
    pub data: Vec<u8>,
}

/// A set of writes to the disks of one item, applied atomically: after a
/// crash a changeset is either wholly in the journal or not at all.
#[derive(Clone, Debug, Default)]
pub struct Changeset {
    pub writes: Vec<Write>,
    /// Time of the changeset (ns since the epoch); now when None. Kept
    /// monotonic: an earlier time than the previous changeset's is raised.
    pub time_ns: Option<u64>,
    /// Close a recovery point with this changeset.
    pub close: Option<(PointKind, Option<String>)>,
    /// Make it durable even without closing a point.
    pub sync: bool,
}

impl Changeset {
    pub fn new() -> Changeset {
        Changeset::default()
    }
    pub fn write(mut self, disk: u16, offset: u64, data: Vec<u8>) -> Changeset {
        self.writes.push(Write { disk, offset, data });
        self
    }
    pub fn at(mut self, time_ns: u64) -> Changeset {
        self.time_ns = Some(time_ns);
        self
    }
    pub fn point(mut self, kind: PointKind) -> Changeset {
        self.close = Some((kind, None));
        self
    }
    pub fn group_point(mut self, marker: impl Into<String>) -> Changeset {
        self.close = Some((PointKind::Group, Some(marker.into())));
        self
    }
}

/// What an append did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// Sequence number of the changeset's commit.
    pub seq: u64,
    /// The point it closed (durable when returned).
    pub point: Option<u64>,
}

/// Opening options.
#[derive(Clone, Debug)]
pub struct Options {
    /// A segment is sealed (indexed) once it reaches this size.
    pub segment_bytes: u64,
    pub fs: Arc<dyn Fs>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            segment_bytes: 64 << 20,
            fs: Arc::new(RealFs),
        }
    }
}

/// A durable pin: retention keeps this point (and what it needs) until unpinned.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pin {
    pub point: u64,
    pub label: String,
}

/// Space used by one item on the retention volume.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub segments: usize,
    pub journal_bytes: u64,
    pub index_bytes: u64,
    /// Allocated bytes of the base disks (they may live on the datastore).
    pub base_allocated_bytes: u64,
    pub points: usize,
}

/// Result of a retention pass.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct FoldReport {
    pub segments: usize,
    pub blocks: u64,
    pub bytes: u64,
    pub points_removed: usize,
    /// Folding stopped early because of this pinned point.
    pub held_by_pin: Option<u64>,
}

/// One problem found by [`Journal::verify`].
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Problem {
    pub segment: String,
    pub offset: u64,
    pub what: String,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct VerifyReport {
    pub segments: usize,
    pub records: u64,
    pub bytes: u64,
    pub problems: Vec<Problem>,
    /// Points with an id above this are unusable.
    pub usable_through: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ItemMeta {
    pub format: u32,
    pub item: String,
    pub created_ns: u64,
    pub disks: Vec<DiskMeta>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct ItemState {
    format: u32,
    /// Every changeset with a sequence number up to this is in the base.
    base_seq: u64,
    /// A fold through this sequence number started and must be finished.
    folding_through: Option<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct PinFile {
    pins: Vec<Pin>,
}

#[derive(Debug)]
pub(crate) enum Idx {
    /// Sealed: sorted entries in the index file at this offset.
    File {
        path: PathBuf,
        entries_off: u64,
        count: u64,
        crc: u32,
        bytes: u64,
    },
    /// Active or unindexed: entries in append order.
    Memory(Vec<IdxEntry>),
}

#[derive(Debug)]
pub(crate) struct Segment {
    pub path: PathBuf,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Valid length (end of the last complete changeset).
    pub len: u64,
    pub first_time: u64,
    pub last_time: u64,
    pub data_bytes: u64,
    pub tail_bytes: u64,
    pub idx: Idx,
    pub damaged: bool,
}

impl Segment {
    fn sealed(&self) -> bool {
        matches!(self.idx, Idx::File { .. })
    }
    fn has_records(&self) -> bool {
        self.last_seq >= self.first_seq
    }
}

/// The head of a sealed segment's index file.
struct IndexHead {
    sum: SegSummary,
    points: Vec<PointRec>,
    count: u64,
    entries_off: u64,
    crc: u32,
    bytes: u64,
}

#[derive(Debug)]
struct Active {
    file: Box<dyn FsFile>,
    synced: u64,
}

/// Points in use by open views: retention does not fold past them.
pub(crate) type ViewPins = Arc<Mutex<BTreeMap<u64, usize>>>;

/// The journal of one item. One writer per item (a lock file enforces it);
/// read-only opens never modify anything.
#[derive(Debug)]
pub struct Journal {
    pub(crate) fs: Arc<dyn Fs>,
    opts: Options,
    pub(crate) volume: PathBuf,
    pub(crate) dir: PathBuf,
    pub(crate) meta: ItemMeta,
    state: ItemState,
    pub(crate) segments: Vec<Segment>,
    active: Option<Active>,
    points: Vec<PointInfo>,
    next_seq: u64,
    last_time: u64,
    /// Points above this id are unusable (a corrupt record precedes them).
    damage_through: Option<u64>,
    problems: Vec<Problem>,
    pins: Vec<Pin>,
    pub(crate) view_pins: ViewPins,
    poisoned: Option<String>,
    /// Data bytes appended since the last point (a point's size).
    carry: u64,
    read_only: bool,
    _lock: Option<std::fs::File>,
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Directory of an item's journal on a retention volume.
pub fn item_dir(volume: &Path, item: &str) -> PathBuf {
    volume.join("items").join(item)
}

fn seg_name(first_seq: u64) -> String {
    format!("seg-{first_seq:020}.rjs")
}

fn idx_path_of(seg: &Path) -> PathBuf {
    seg.with_extension("idx")
}

fn format_err(path: &Path, what: impl Into<String>) -> JournalError {
    JournalError::Format {
        path: path.into(),
        what: what.into(),
    }
}

fn take_lock(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join("lock");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| JournalError::io(&path, "open", e))?;
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(f),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(JournalError::Locked { path }),
        Err(e) => Err(JournalError::io(&path, "flock", e.into())),
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(fs: &dyn Fs, path: &Path) -> Result<T> {
    let bytes = fs
        .read_all(path)
        .map_err(|e| JournalError::io(path, "read", e))?;
    serde_json::from_slice(&bytes).map_err(|e| format_err(path, format!("cannot parse: {e}")))
}

fn write_json<T: Serialize>(fs: &dyn Fs, path: &Path, v: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(v).map_err(|e| format_err(path, e.to_string()))?;
    fs.write_durable(path, &bytes)
        .map_err(|e| JournalError::io(path, "write", e))
}

impl Journal {
    /// Create the journal of `item` on `volume` with empty (sparse) base disks.
    pub fn create(volume: &Path, item: &str, disks: &[DiskSpec], opts: Options) -> Result<Journal> {
        if !valid_name(item) {
            return Err(JournalError::InvalidChangeset(format!(
                "invalid item name {item:?}"
            )));
        }
        if disks.is_empty() || disks.len() > u16::MAX as usize {
            return Err(JournalError::InvalidChangeset(
                "an item needs 1 to 65535 disks".into(),
            ));
        }
        let fs = opts.fs.clone();
        let dir = item_dir(volume, item);
        if fs.exists(&dir.join("item.json")) {
            return Err(JournalError::Target {
                path: dir,
                what: "a journal for this item exists".into(),
            });
        }
        fs.create_dir_all(&dir)
            .map_err(|e| JournalError::io(&dir, "mkdir", e))?;
        fs.create_dir_all(&volume.join("tmp"))
            .map_err(|e| JournalError::io(volume, "mkdir", e))?;
        let mut metas = Vec::new();
        for d in disks {
            if !valid_name(&d.name) || d.size % BLOCK != 0 || d.size == 0 {
                return Err(JournalError::InvalidChangeset(format!(
                    "disk {:?}: names are [A-Za-z0-9._-], sizes non-zero multiples of 4 KiB",
                    d.name
                )));
            }
            let base = match &d.base {
                Some(b) => b.clone(),
                None => dir.join("base").join(format!("{}.raw", d.name)),
            };
            if let Some(parent) = base.parent() {
                fs.create_dir_all(parent)
                    .map_err(|e| JournalError::io(parent, "mkdir", e))?;
            }
            let f = fs
                .open(&base, true, true)
                .map_err(|e| JournalError::io(&base, "create", e))?;
            f.set_len(d.size)
                .map_err(|e| JournalError::io(&base, "truncate", e))?;
            f.sync().map_err(|e| JournalError::io(&base, "fsync", e))?;
            if let Some(parent) = base.parent() {
                fs.fsync_dir(parent)
                    .map_err(|e| JournalError::io(parent, "fsync", e))?;
            }
            metas.push(DiskMeta {
                name: d.name.clone(),
                size: d.size,
                base,
            });
        }
        write_json(
            &*fs,
            &dir.join("state.json"),
            &ItemState {
                format: format::VERSION,
                ..Default::default()
            },
        )?;
        let meta = ItemMeta {
            format: format::VERSION,
            item: item.into(),
            created_ns: now_ns(),
            disks: metas,
        };
        // item.json last: its presence means the journal is complete.
        write_json(&*fs, &dir.join("item.json"), &meta)?;
        tracing::info!(item, disks = disks.len(), "journal created");
        Journal::open(volume, item, opts)
    }

    /// Open for writing: takes the item's lock, truncates a torn tail and
    /// finishes an interrupted fold.
    pub fn open(volume: &Path, item: &str, opts: Options) -> Result<Journal> {
        Journal::load(volume, item, opts, false)
    }

    /// Open without modifying anything (inspect, verify, materialise while the
    /// writer runs). A torn tail is ignored rather than truncated.
    pub fn open_read_only(volume: &Path, item: &str, opts: Options) -> Result<Journal> {
        Journal::load(volume, item, opts, true)
    }

    fn load(volume: &Path, item: &str, opts: Options, read_only: bool) -> Result<Journal> {
        let _span = tracing::info_span!("journal.open", item, read_only).entered();
        let fs = opts.fs.clone();
        let dir = item_dir(volume, item);
        if !valid_name(item) || !fs.exists(&dir.join("item.json")) {
            return Err(JournalError::Missing {
                volume: volume.into(),
                item: item.into(),
            });
        }
        let lock = if read_only {
            None
        } else {
            Some(take_lock(&dir)?)
        };
        let meta: ItemMeta = read_json(&*fs, &dir.join("item.json"))?;
        if meta.format != format::VERSION {
            return Err(format_err(
                &dir.join("item.json"),
                format!("format {}", meta.format),
            ));
        }
        let state: ItemState = read_json(&*fs, &dir.join("state.json"))?;
        let pins: PinFile = if fs.exists(&dir.join("pins.json")) {
            read_json(&*fs, &dir.join("pins.json"))?
        } else {
            PinFile::default()
        };
        let mut j = Journal {
            fs: fs.clone(),
            opts,
            volume: volume.into(),
            dir: dir.clone(),
            meta,
            next_seq: state.base_seq + 1,
            state,
            segments: Vec::new(),
            active: None,
            points: Vec::new(),
            last_time: 0,
            damage_through: None,
            problems: Vec::new(),
            pins: pins.pins,
            view_pins: ViewPins::default(),
            poisoned: None,
            carry: 0,
            read_only,
            _lock: lock,
        };
        let names = fs
            .list(&dir)
            .map_err(|e| JournalError::io(&dir, "list", e))?;
        if !read_only {
            let orphan = |n: &String| {
                n.strip_suffix(".idx")
                    .is_some_and(|stem| !names.contains(&format!("{stem}.rjs")))
            };
            for n in names.iter().filter(|n| n.ends_with(".tmp") || orphan(n)) {
                let p = dir.join(n);
                fs.remove(&p)
                    .map_err(|e| JournalError::io(&p, "remove", e))?;
            }
        }
        let mut segs: Vec<(u64, String)> = names
            .iter()
            .filter_map(|n| {
                let num = n.strip_prefix("seg-")?.strip_suffix(".rjs")?;
                Some((num.parse().ok()?, n.clone()))
            })
            .collect();
        segs.sort();
        let count = segs.len();
        for (i, (_, name)) in segs.into_iter().enumerate() {
            j.load_segment(&dir.join(name), i + 1 == count)?;
        }
        if j.state.folding_through.is_some() && !read_only {
            j.finish_fold()?;
        }
        j.rebuild_catalogue();
        tracing::info!(
            segments = j.segments.len(),
            points = j.points.len(),
            next_seq = j.next_seq,
            "journal open"
        );
        Ok(j)
    }

    fn load_segment(&mut self, path: &Path, last: bool) -> Result<()> {
        let fs = self.fs.clone();
        let idx_path = idx_path_of(path);
        let expect = self
            .segments
            .last()
            .map(|s| s.last_seq + 1)
            .unwrap_or(self.state.base_seq + 1);
        let folded_floor = self.state.folding_through.unwrap_or(self.state.base_seq);
        if fs.exists(&idx_path) {
            match self.read_index_head(&idx_path) {
                Ok(IndexHead {
                    sum,
                    points,
                    count,
                    entries_off,
                    crc,
                    bytes,
                }) => {
                    if sum.last_seq <= self.state.base_seq && sum.first_seq <= sum.last_seq {
                        // Left over by a fold that finished: already in the base.
                        return self.remove_leftover(path);
                    }
                    self.check_continuity(path, sum.first_seq, expect);
                    self.segments.push(Segment {
                        path: path.into(),
                        first_seq: sum.first_seq,
                        last_seq: sum.last_seq,
                        len: sum.seg_len,
                        first_time: sum.first_time,
                        last_time: sum.last_time,
                        data_bytes: sum.data_bytes,
                        tail_bytes: sum.tail_bytes,
                        idx: Idx::File {
                            path: idx_path,
                            entries_off,
                            count,
                            crc,
                            bytes,
                        },
                        damaged: false,
                    });
                    self.carry = if points.is_empty() {
                        self.carry + sum.tail_bytes
                    } else {
                        sum.tail_bytes
                    };
                    self.note_points(points, true);
                    self.next_seq = sum.last_seq + 1;
                    self.last_time = self.last_time.max(sum.last_time);
                    return Ok(());
                }
                Err(why) => {
                    tracing::warn!(path = %idx_path.display(), why, "segment index unreadable; rebuilding from the segment");
                }
            }
        }
        let file = fs
            .open(path, false, false)
            .map_err(|e| JournalError::io(path, "open", e))?;
        let scan = match segment::scan(&*file, 0).map_err(|e| JournalError::io(path, "read", e))? {
            Ok(s) => s,
            Err(why) => {
                if last {
                    // A segment whose header never became durable holds no
                    // acknowledged changeset.
                    tracing::warn!(path = %path.display(), why, "removing a segment torn at creation");
                    if !self.read_only {
                        fs.remove(path)
                            .map_err(|e| JournalError::io(path, "remove", e))?;
                    }
                    return Ok(());
                }
                self.mark_damage(path, 0, why, expect.saturating_sub(1));
                return Ok(());
            }
        };
        drop(file);
        if scan.last_seq <= self.state.base_seq
            && scan.first_seq <= scan.last_seq
            && scan.last_seq <= folded_floor
        {
            return self.remove_leftover(path);
        }
        self.check_continuity(path, scan.first_seq, expect);
        let damaged = scan.damage.is_some();
        if let Some((off, why)) = &scan.damage {
            self.mark_damage(path, *off, why.clone(), scan.last_seq);
            for p in &scan.damaged_points {
                self.points.push(PointInfo {
                    id: p.seq,
                    time_ns: p.time_ns,
                    kind: p.kind,
                    group: p.marker.clone(),
                    bytes: 0,
                    usable: false,
                    processed: false,
                });
            }
        }
        let mut seg = Segment {
            path: path.into(),
            first_seq: scan.first_seq,
            last_seq: scan.last_seq,
            len: scan.end,
            first_time: scan.first_time,
            last_time: scan.last_time,
            data_bytes: scan.data_bytes,
            tail_bytes: scan.tail_bytes,
            idx: Idx::Memory(scan.entries),
            damaged,
        };
        let mut points = scan.points;
        // Sizes in a sealed index already include what earlier segments
        // carried over; a scanned segment's first point gets it here.
        if let Some(p) = points.first_mut() {
            p.bytes += self.carry;
        }
        self.carry = if points.is_empty() {
            self.carry + scan.tail_bytes
        } else {
            scan.tail_bytes
        };
        self.note_points(points, false);
        if seg.has_records() {
            self.next_seq = seg.last_seq + 1;
        } else {
            self.next_seq = self.next_seq.max(seg.first_seq);
        }
        self.last_time = self.last_time.max(seg.last_time);
        if !self.read_only && !damaged {
            if last {
                let f = fs
                    .open(path, true, false)
                    .map_err(|e| JournalError::io(path, "open", e))?;
                if scan.file_len > scan.end {
                    tracing::warn!(path = %path.display(), from = scan.file_len, to = scan.end, "truncating torn tail");
                    f.set_len(scan.end)
                        .map_err(|e| JournalError::io(path, "truncate", e))?;
                }
                f.sync().map_err(|e| JournalError::io(path, "fsync", e))?;
                self.active = Some(Active {
                    file: f,
                    synced: scan.end,
                });
            } else {
                // An older segment without its index: rebuild it.
                self.write_index(&mut seg)?;
            }
        }
        self.segments.push(seg);
        Ok(())
    }

    fn remove_leftover(&mut self, path: &Path) -> Result<()> {
        if !self.read_only {
            let idx = idx_path_of(path);
            self.fs
                .remove(path)
                .map_err(|e| JournalError::io(path, "remove", e))?;
            self.fs
                .remove(&idx)
                .map_err(|e| JournalError::io(&idx, "remove", e))?;
        }
        Ok(())
    }

    fn check_continuity(&mut self, path: &Path, first: u64, expect: u64) {
        if first != expect {
            let why = format!("sequence gap: segment starts at {first}, {expect} expected");
            self.mark_damage(path, 0, why, expect.saturating_sub(1));
        }
    }

    fn mark_damage(&mut self, path: &Path, offset: u64, what: String, good_through: u64) {
        tracing::error!(path = %path.display(), offset, what, "journal damage: later points are unusable");
        let segment = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.problems.push(Problem {
            segment,
            offset,
            what,
        });
        self.damage_through = Some(
            self.damage_through
                .map_or(good_through, |d| d.min(good_through)),
        );
    }

    fn note_points(&mut self, recs: Vec<PointRec>, processed: bool) {
        for p in recs {
            self.points.push(PointInfo {
                id: p.seq,
                time_ns: p.time_ns,
                kind: p.kind,
                group: p.marker,
                bytes: p.bytes,
                usable: true,
                processed,
            });
        }
    }

    /// Recompute usability, drop folded points, carry sizes across segments.
    fn rebuild_catalogue(&mut self) {
        let floor = self
            .state
            .folding_through
            .unwrap_or(self.state.base_seq)
            .max(self.state.base_seq);
        self.points.retain(|p| p.id > floor);
        self.points.sort_by_key(|p| p.id);
        self.points.dedup_by_key(|p| p.id);
        let dmg = self.damage_through;
        for p in &mut self.points {
            if dmg.is_some_and(|d| p.id > d) {
                p.usable = false;
            }
        }
    }

    fn read_index_head(&self, path: &Path) -> std::result::Result<IndexHead, String> {
        let f = self
            .fs
            .open(path, false, false)
            .map_err(|e| e.to_string())?;
        let mut h = [0u8; format::IDX_HEADER_LEN];
        f.read_full(&mut h, 0).map_err(|e| e.to_string())?;
        let (sum, count, pcount, plen, pcrc, ecrc) = format::parse_index_header(&h)?;
        let flen = f.len().map_err(|e| e.to_string())?;
        let entries_off = (format::IDX_HEADER_LEN as u64).saturating_add(plen);
        let end = entries_off.saturating_add(count.saturating_mul(format::ENTRY_LEN as u64));
        if end != flen || plen > 64 << 20 {
            return Err("index length does not match its header".into());
        }
        let mut pb = vec![0u8; plen as usize];
        f.read_full(&mut pb, format::IDX_HEADER_LEN as u64)
            .map_err(|e| e.to_string())?;
        if crc32c::crc32c(&pb) != pcrc {
            return Err("index points checksum mismatch".into());
        }
        let points = format::parse_points(&pb, pcount)?;
        Ok(IndexHead {
            sum,
            points,
            count,
            entries_off,
            crc: ecrc,
            bytes: flen,
        })
    }

    // ---- appending ----

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(JournalError::NotWritable("opened read-only".into()));
        }
        if let Some(why) = &self.poisoned {
            return Err(JournalError::NotWritable(why.clone()));
        }
        Ok(())
    }

    fn poison(&mut self, why: String) {
        tracing::error!(why, "journal needs reopening");
        self.poisoned = Some(why);
    }

    fn validate(&self, cs: &Changeset) -> Result<()> {
        for w in &cs.writes {
            let disk = self.meta.disks.get(w.disk as usize).ok_or_else(|| {
                JournalError::InvalidChangeset(format!(
                    "disk {} does not exist (item has {})",
                    w.disk,
                    self.meta.disks.len()
                ))
            })?;
            let len = w.data.len() as u64;
            if w.offset % BLOCK != 0 || !len.is_multiple_of(BLOCK) || len == 0 {
                return Err(JournalError::InvalidChangeset(format!(
                    "write at {} of {len} bytes is not 4 KiB-aligned",
                    w.offset
                )));
            }
            if w.offset.checked_add(len).is_none_or(|end| end > disk.size) {
                return Err(JournalError::InvalidChangeset(format!(
                    "write at {} of {len} bytes runs past disk {:?} ({} bytes)",
                    w.offset, disk.name, disk.size
                )));
            }
        }
        if let Some((_, Some(m))) = &cs.close
            && m.len() > format::MAX_MARKER
        {
            return Err(JournalError::InvalidChangeset(
                "group marker longer than 4 KiB".into(),
            ));
        }
        Ok(())
    }

    fn new_segment(&mut self) -> Result<()> {
        let path = self.dir.join(seg_name(self.next_seq));
        let fs = self.fs.clone();
        let res = (|| -> std::io::Result<Box<dyn FsFile>> {
            let f = fs.open(&path, true, true)?;
            f.set_len(0)?;
            // No fsync of the header here: the first point's fdatasync
            // covers it, and a segment whose header is torn holds no point
            // (open removes it). The directory entry must be durable first.
            f.write_at(&format::seg_header(self.next_seq, now_ns()), 0)?;
            fs.fsync_dir(&self.dir)?;
            Ok(f)
        })();
        let f = match res {
            Ok(f) => f,
            Err(e) => {
                // Nothing acknowledged lives in it; a leftover is removed at open.
                let _ = fs.remove(&path);
                return Err(JournalError::io(&path, "create segment", e));
            }
        };
        self.segments.push(Segment {
            path,
            first_seq: self.next_seq,
            last_seq: self.next_seq - 1,
            len: format::SEG_HEADER_LEN,
            first_time: 0,
            last_time: 0,
            data_bytes: 0,
            tail_bytes: 0,
            idx: Idx::Memory(Vec::new()),
            damaged: false,
        });
        self.active = Some(Active { file: f, synced: 0 });
        Ok(())
    }

    /// Append a changeset. When it closes a point (or `sync` is set) it is
    /// durable on return; otherwise it becomes durable with the next point.
    pub fn append(&mut self, cs: &Changeset) -> Result<Appended> {
        self.writable()?;
        self.validate(cs)?;
        let _span =
            tracing::debug_span!("journal.append", item = %self.meta.item, seq = self.next_seq)
                .entered();
        let needs_seal = self.active.is_some()
            && self
                .segments
                .last()
                .is_some_and(|s| s.len >= self.opts.segment_bytes && s.has_records());
        if needs_seal {
            self.seal()?;
        }
        if self.active.is_none() {
            self.new_segment()?;
        }
        let time = cs.time_ns.unwrap_or_else(now_ns).max(self.last_time);
        let Some(active) = self.active.as_ref() else {
            return Err(JournalError::NotWritable("no active segment".into()));
        };
        let Some(seg) = self.segments.last() else {
            return Err(JournalError::NotWritable("no active segment".into()));
        };
        let start = seg.len;
        let first = self.next_seq;
        let mut seq = first;
        let mut buf =
            Vec::with_capacity(cs.writes.iter().map(|w| w.data.len() + 256).sum::<usize>() + 128);
        let mut entries = Vec::new();
        let mut bytes = 0u64;
        for w in &cs.writes {
            for (ci, chunk) in w.data.chunks(format::MAX_RECORD_DATA).enumerate() {
                let offset = w.offset + (ci * format::MAX_RECORD_DATA) as u64;
                let mut meta = Vec::with_capacity(chunk.len() / BLOCK as usize * 4);
                let data_at = start + buf.len() as u64 + format::REC_HEADER_LEN as u64;
                let nblocks = chunk.len() as u64 / BLOCK;
                let data_at = data_at + nblocks * 4;
                for (i, b) in chunk.chunks(BLOCK as usize).enumerate() {
                    let crc = crc32c::crc32c(b);
                    meta.extend_from_slice(&crc.to_le_bytes());
                    entries.push(IdxEntry {
                        disk: w.disk as u32,
                        block: offset / BLOCK + i as u64,
                        seq,
                        data_off: data_at + i as u64 * BLOCK,
                        crc,
                    });
                }
                let h = RecHeader {
                    kind: KIND_WRITE,
                    point: 0,
                    disk: w.disk,
                    seq,
                    time_ns: time,
                    offset,
                    len: chunk.len() as u32,
                    count: 0,
                    synced_len: active.synced,
                    extra: 0,
                    meta_len: meta.len() as u32,
                };
                h.encode_into(&meta, &mut buf);
                buf.extend_from_slice(chunk);
                bytes += chunk.len() as u64;
                seq += 1;
            }
        }
        let (kind, marker) = match &cs.close {
            Some((k, m)) => (Some(*k), m.clone()),
            None => (None, None),
        };
        let mbytes = marker.as_deref().unwrap_or("").as_bytes().to_vec();
        let commit = RecHeader {
            kind: KIND_COMMIT,
            point: format::point_kind_code(kind),
            disk: 0,
            seq,
            time_ns: time,
            offset: first,
            len: 0,
            count: (seq - first) as u32,
            synced_len: active.synced,
            extra: bytes,
            meta_len: mbytes.len() as u32,
        };
        commit.encode_into(&mbytes, &mut buf);
        let path = seg.path.clone();
        if let Err(e) = active.file.write_at(&buf, start) {
            // Cut the partial record off so the segment stays well formed.
            if let Err(e2) = active.file.set_len(start) {
                self.poison(format!(
                    "{}: cannot cut a failed append: {e2}",
                    path.display()
                ));
            }
            return Err(JournalError::io(&path, "append", e));
        }
        let end = start + buf.len() as u64;
        let durable = kind.is_some() || cs.sync;
        if durable && let Err(e) = active.file.sync() {
            // After a failed fsync the page cache cannot be trusted.
            self.poison(format!("{}: fsync failed: {e}", path.display()));
            return Err(JournalError::io(&path, "fsync", e));
        }
        if let Some(a) = self.active.as_mut()
            && durable
        {
            a.synced = end;
        }
        let Some(seg) = self.segments.last_mut() else {
            return Err(JournalError::NotWritable("no active segment".into()));
        };
        seg.len = end;
        seg.last_seq = seq;
        if seg.first_time == 0 {
            seg.first_time = time;
        }
        seg.last_time = time;
        seg.data_bytes += bytes;
        seg.tail_bytes += bytes;
        if let Idx::Memory(v) = &mut seg.idx {
            v.extend(entries);
        }
        self.next_seq = seq + 1;
        self.last_time = time;
        self.carry += bytes;
        let point = kind.map(|k| {
            let carry = std::mem::take(&mut self.carry);
            seg.tail_bytes = 0;
            self.points.push(PointInfo {
                id: seq,
                time_ns: time,
                kind: k,
                group: marker,
                bytes: carry,
                usable: self.damage_through.is_none(),
                processed: false,
            });
            seq
        });
        Ok(Appended { seq, point })
    }

    /// Make everything appended so far durable.
    pub fn sync(&mut self) -> Result<()> {
        self.writable()?;
        if let (Some(a), Some(seg)) = (self.active.as_mut(), self.segments.last()) {
            if let Err(e) = a.file.sync() {
                let path = seg.path.clone();
                self.poison(format!("{}: fsync failed: {e}", path.display()));
                return Err(JournalError::io(&path, "fsync", e));
            }
            a.synced = seg.len;
        }
        Ok(())
    }

    fn write_index(&self, seg: &mut Segment) -> Result<()> {
        let Idx::Memory(entries) = &seg.idx else {
            return Ok(());
        };
        let mut sorted = entries.clone();
        sorted.sort_unstable_by_key(|e| e.key());
        let recs: Vec<PointRec> = self
            .points
            .iter()
            .filter(|p| p.id >= seg.first_seq && p.id <= seg.last_seq)
            .map(|p| PointRec {
                seq: p.id,
                time_ns: p.time_ns,
                kind: p.kind,
                marker: p.group.clone(),
                bytes: p.bytes,
            })
            .collect();
        let sum = SegSummary {
            first_seq: seg.first_seq,
            last_seq: seg.last_seq,
            seg_len: seg.len,
            first_time: seg.first_time,
            last_time: seg.last_time,
            data_bytes: seg.data_bytes,
            tail_bytes: seg.tail_bytes,
        };
        let bytes = format::encode_index(&sum, &recs, &sorted);
        let path = idx_path_of(&seg.path);
        self.fs
            .write_durable(&path, &bytes)
            .map_err(|e| JournalError::io(&path, "write index", e))?;
        let plen = bytes.len() as u64
            - format::IDX_HEADER_LEN as u64
            - (sorted.len() * format::ENTRY_LEN) as u64;
        seg.idx = Idx::File {
            entries_off: format::IDX_HEADER_LEN as u64 + plen,
            count: sorted.len() as u64,
            crc: format::get_u32(&bytes, 100),
            bytes: bytes.len() as u64,
            path,
        };
        Ok(())
    }

    /// Seal the active segment: fsync it and write its index, so that its
    /// points become "processed" and the next append starts a new segment.
    pub fn seal(&mut self) -> Result<()> {
        self.writable()?;
        // An empty segment stays active: sealing it would let the next
        // segment take the same name (it starts at the same seq).
        if self.segments.last().is_none_or(|s| !s.has_records()) {
            return Ok(());
        }
        let Some(active) = self.active.take() else {
            return Ok(());
        };
        let Some(mut seg) = self.segments.pop() else {
            return Ok(());
        };
        let synced = active.synced == seg.len;
        if let Err(e) = if synced { Ok(()) } else { active.file.sync() } {
            let path = seg.path.clone();
            self.segments.push(seg);
            self.poison(format!("{}: fsync failed: {e}", path.display()));
            return Err(JournalError::io(&path, "fsync", e));
        }
        let res = self.write_index(&mut seg);
        let (first, last) = (seg.first_seq, seg.last_seq);
        self.segments.push(seg);
        if let Err(e) = res {
            self.active = Some(Active {
                synced: self.segments.last().map_or(0, |s| s.len),
                ..active
            });
            return Err(e);
        }
        for p in self
            .points
            .iter_mut()
            .filter(|p| p.id >= first && p.id <= last)
        {
            p.processed = true;
        }
        tracing::debug!(first, last, "segment sealed");
        Ok(())
    }

    // ---- catalogue ----

    pub fn item(&self) -> &str {
        &self.meta.item
    }
    pub fn disks(&self) -> &[DiskMeta] {
        &self.meta.disks
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// Every point in the window, oldest first, usable or not.
    pub fn points(&self) -> &[PointInfo] {
        &self.points
    }
    /// Sequence number of the last complete changeset.
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }
    /// Every changeset up to this sequence number is in the base disks.
    pub fn base_seq(&self) -> u64 {
        self.state.base_seq
    }
    /// Damage found at open or by [`Journal::verify`].
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }
    pub fn point(&self, id: u64) -> Result<&PointInfo> {
        let p = self
            .points
            .binary_search_by_key(&id, |p| p.id)
            .map(|i| &self.points[i])
            .map_err(|_| JournalError::PointNotFound(id))?;
        if !p.usable {
            return Err(JournalError::PointUnusable {
                id,
                why: "it follows a corrupt journal record".into(),
            });
        }
        Ok(p)
    }
    fn usable(&self) -> impl DoubleEndedIterator<Item = &PointInfo> {
        self.points.iter().filter(|p| p.usable)
    }
    /// The most recent point (lowest RPO).
    pub fn latest(&self) -> Option<&PointInfo> {
        self.usable().next_back()
    }
    /// The most recent point whose segment is indexed (quickest to open).
    pub fn latest_processed(&self) -> Option<&PointInfo> {
        self.usable().rfind(|p| p.processed)
    }
    pub fn latest_app_consistent(&self) -> Option<&PointInfo> {
        self.usable().rfind(|p| p.kind == PointKind::AppConsistent)
    }
    pub fn latest_at_or_before(&self, time_ns: u64) -> Option<&PointInfo> {
        self.usable().rfind(|p| p.time_ns <= time_ns)
    }
    /// The latest point carrying this group marker.
    pub fn group_point(&self, marker: &str) -> Option<&PointInfo> {
        self.usable().rfind(|p| p.group.as_deref() == Some(marker))
    }

    // ---- pins ----

    pub fn pins(&self) -> &[Pin] {
        &self.pins
    }

    /// Pin a point durably (a running failover, a test failover...).
    pub fn pin(&mut self, point: u64, label: &str) -> Result<()> {
        self.writable()?;
        self.point(point)?;
        let pin = Pin {
            point,
            label: label.into(),
        };
        if self.pins.contains(&pin) {
            return Ok(());
        }
        let mut pins = self.pins.clone();
        pins.push(pin);
        write_json(
            &*self.fs,
            &self.dir.join("pins.json"),
            &PinFile { pins: pins.clone() },
        )?;
        self.pins = pins;
        Ok(())
    }

    pub fn unpin(&mut self, point: u64, label: &str) -> Result<bool> {
        self.writable()?;
        let pins: Vec<Pin> = self
            .pins
            .iter()
            .filter(|p| !(p.point == point && p.label == label))
            .cloned()
            .collect();
        if pins.len() == self.pins.len() {
            return Ok(false);
        }
        write_json(
            &*self.fs,
            &self.dir.join("pins.json"),
            &PinFile { pins: pins.clone() },
        )?;
        self.pins = pins;
        Ok(true)
    }

    fn min_pinned(&self) -> Option<u64> {
        let views = self
            .view_pins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .next()
            .copied();
        self.pins.iter().map(|p| p.point).chain(views).min()
    }

    // ---- retention ----

    /// Fold every changeset older than `now - window` into the base disks and
    /// remove its segments. Works segment by segment; never folds a pinned
    /// point, a point an open view uses, or anything at or after damage.
    /// Cost: the changed blocks of the folded segments.
    pub fn fold(&mut self, now_ns: u64, window_ns: u64) -> Result<FoldReport> {
        self.writable()?;
        let _span = tracing::info_span!("journal.fold", item = %self.meta.item).entered();
        let cutoff = now_ns.saturating_sub(window_ns);
        if self.active.is_some()
            && self
                .segments
                .last()
                .is_some_and(|s| s.has_records() && s.last_time < cutoff)
        {
            self.seal()?;
        }
        let pin = self.min_pinned();
        let mut report = FoldReport::default();
        let mut n = 0;
        for s in &self.segments {
            let ok = s.sealed() && !s.damaged && s.has_records() && s.last_time < cutoff;
            if !ok || self.damage_through.is_some_and(|d| s.last_seq > d) {
                break;
            }
            if pin.is_some_and(|p| s.last_seq >= p) {
                report.held_by_pin = pin;
                break;
            }
            n += 1;
        }
        if n == 0 {
            return Ok(report);
        }
        let through = self.segments[n - 1].last_seq;
        self.state.folding_through = Some(through);
        if let Err(e) = write_json(&*self.fs, &self.dir.join("state.json"), &self.state) {
            self.state.folding_through = None;
            // The temporary file may or may not have replaced state.json.
            self.poison(format!("state update failed: {e}"));
            return Err(e);
        }
        let before = self.points.len();
        self.points.retain(|p| p.id > through);
        report.points_removed = before - self.points.len();
        match self.finish_fold() {
            Ok((blocks, bytes, segs)) => {
                report.blocks = blocks;
                report.bytes = bytes;
                report.segments = segs;
                tracing::info!(
                    segments = segs,
                    blocks,
                    through,
                    "retention folded changesets into the base"
                );
                Ok(report)
            }
            Err(e) => {
                self.poison(format!("fold interrupted: {e}"));
                Err(e)
            }
        }
    }

    /// Apply the segments up to `folding_through` to the base disks, then
    /// record the new base and remove them. Idempotent: redone after a crash.
    fn finish_fold(&mut self) -> Result<(u64, u64, usize)> {
        let Some(through) = self.state.folding_through else {
            return Ok((0, 0, 0));
        };
        let n = self
            .segments
            .iter()
            .take_while(|s| s.first_seq <= through)
            .count();
        let fs = self.fs.clone();
        let mut bases = Vec::new();
        for d in &self.meta.disks {
            bases.push(
                fs.open(&d.base, true, false)
                    .map_err(|e| JournalError::io(&d.base, "open base", e))?,
            );
        }
        let (mut blocks, mut bytes) = (0, 0);
        for s in &self.segments[..n] {
            let (b, y) = crate::view::apply_segment(&*fs, s, &bases, &self.meta.disks)?;
            blocks += b;
            bytes += y;
        }
        for (f, d) in bases.iter().zip(&self.meta.disks) {
            f.sync()
                .map_err(|e| JournalError::io(&d.base, "fsync", e))?;
        }
        self.state.base_seq = self.state.base_seq.max(through);
        self.state.folding_through = None;
        write_json(&*fs, &self.dir.join("state.json"), &self.state)?;
        for s in self.segments.drain(..n) {
            // Index first: a segment left without it is rescanned at open
            // and recognised as already folded.
            let idx = idx_path_of(&s.path);
            fs.remove(&idx)
                .map_err(|e| JournalError::io(&idx, "remove", e))?;
            fs.remove(&s.path)
                .map_err(|e| JournalError::io(&s.path, "remove", e))?;
        }
        self.next_seq = self.next_seq.max(through + 1);
        self.points.retain(|p| p.id > through);
        Ok((blocks, bytes, n))
    }

    // ---- space and verification ----

    pub fn usage(&self) -> Usage {
        let mut u = Usage {
            segments: self.segments.len(),
            points: self.points.len(),
            ..Usage::default()
        };
        for s in &self.segments {
            u.journal_bytes += std::fs::metadata(&s.path).map(|m| m.len()).unwrap_or(s.len);
            if let Idx::File { bytes, .. } = s.idx {
                u.index_bytes += bytes;
            }
        }
        for d in &self.meta.disks {
            u.base_allocated_bytes += allocated(&d.base);
        }
        u
    }

    /// Read every record of every segment and check every checksum (headers,
    /// data blocks, index files). Damage makes later points unusable.
    pub fn verify(&mut self) -> Result<VerifyReport> {
        let _span = tracing::info_span!("journal.verify", item = %self.meta.item).entered();
        let mut rep = VerifyReport {
            segments: self.segments.len(),
            ..VerifyReport::default()
        };
        let mut found = Vec::new();
        for s in &self.segments {
            let name = s
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let f = self
                .fs
                .open(&s.path, false, false)
                .map_err(|e| JournalError::io(&s.path, "open", e))?;
            let durable = if s.sealed() { s.len } else { 0 };
            let scan =
                segment::scan(&*f, durable).map_err(|e| JournalError::io(&s.path, "read", e))?;
            match scan {
                Err(why) => found.push((
                    Problem {
                        segment: name,
                        offset: 0,
                        what: why,
                    },
                    s.first_seq.saturating_sub(1),
                )),
                Ok(sc) => {
                    rep.records += sc.records;
                    rep.bytes += sc.end;
                    if let Some((off, why)) = sc.damage {
                        found.push((
                            Problem {
                                segment: name.clone(),
                                offset: off,
                                what: why,
                            },
                            sc.last_seq,
                        ));
                    } else if s.sealed() && sc.end < s.len {
                        let what = "segment shorter than its index says".to_string();
                        found.push((
                            Problem {
                                segment: name.clone(),
                                offset: sc.end,
                                what,
                            },
                            sc.last_seq,
                        ));
                    }
                    if let Idx::File {
                        path,
                        entries_off,
                        count,
                        crc,
                        ..
                    } = &s.idx
                    {
                        let mut b = vec![0u8; (*count as usize) * format::ENTRY_LEN];
                        let fi = self
                            .fs
                            .open(path, false, false)
                            .map_err(|e| JournalError::io(path, "open", e))?;
                        fi.read_full(&mut b, *entries_off)
                            .map_err(|e| JournalError::io(path, "read", e))?;
                        if crc32c::crc32c(&b) != *crc {
                            let what = "index entries checksum mismatch".to_string();
                            found.push((
                                Problem {
                                    segment: name,
                                    offset: 0,
                                    what,
                                },
                                s.first_seq.saturating_sub(1),
                            ));
                        }
                    }
                }
            }
        }
        for (p, good) in found {
            let path = self.dir.join(&p.segment);
            if !self.problems.contains(&p) {
                self.mark_damage(&path, p.offset, p.what.clone(), good);
            }
        }
        self.rebuild_catalogue();
        rep.problems = self.problems.clone();
        rep.usable_through = self.damage_through;
        Ok(rep)
    }

    pub(crate) fn segment_files(&self, through: u64) -> Vec<&Segment> {
        self.segments
            .iter()
            .filter(|s| s.first_seq <= through)
            .collect()
    }
}

/// Allocated bytes of a file (its blocks), 0 when it cannot be read.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}
