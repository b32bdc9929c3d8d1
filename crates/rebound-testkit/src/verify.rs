//! `rebound verify`: read every block of a machine's disks and check them
//! against the workload log.
//!
//! Each logged write gets a cut time: the earliest `cut_ns` of the epochs
//! after its own, and the point time in point mode. Against its cut a write
//! is *voided* (issued after it: it never happened, it must not be visible),
//! *required* (acknowledged before it: it must be visible unless a later
//! write to the same block is), or *uncertain* (straddles it: may or may
//! not be visible). Then every block must be all-zero or a valid pattern
//! block of a logged, non-voided write that covers it, and not older than
//! the last required write to that block. Writes to one block are ordered
//! by id because one worker owns each block and has one write in flight.

use crate::error::TestkitError;
use crate::log::{Log, WriteEntry};
use crate::pattern::{BLOCK, Content, classify};
use rebound_disk::Disk;
use rebound_nbd::{NbdClient, NbdUri};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;

/// What the disks are supposed to show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// After a planned operation: every acknowledged write is visible unless
    /// replaced by a later one.
    Planned,
    /// The disks are an unplanned failover's point at this time (ns since
    /// the UNIX epoch): nothing issued after it is visible, everything
    /// acknowledged before it is (or was replaced).
    Point(u64),
}

/// Where blocks are read from: a raw image or block device, or an NBD export.
pub enum DiskSource {
    File { name: String, disk: Disk },
    Nbd { name: String, client: NbdClient },
}

impl DiskSource {
    /// Open `spec`: an NBD URI (`nbd://…`, `nbd+unix://…`) or a file path.
    pub fn open(spec: &str) -> Result<DiskSource, TestkitError> {
        if NbdUri::is_uri(spec) {
            let nbd = |source| TestkitError::Nbd {
                what: spec.to_string(),
                source,
            };
            let uri: NbdUri = spec.parse().map_err(nbd)?;
            let client = NbdClient::connect(&uri).map_err(nbd)?;
            Ok(DiskSource::Nbd {
                name: spec.to_string(),
                client,
            })
        } else {
            let disk = Disk::open_read(Path::new(spec)).map_err(|source| TestkitError::Disk {
                what: format!("opening {spec}"),
                source,
            })?;
            Ok(DiskSource::File {
                name: spec.to_string(),
                disk,
            })
        }
    }

    pub fn name(&self) -> &str {
        match self {
            DiskSource::File { name, .. } | DiskSource::Nbd { name, .. } => name,
        }
    }

    pub fn size(&self) -> Result<u64, TestkitError> {
        match self {
            DiskSource::File { name, disk } => disk.size().map_err(|source| TestkitError::Disk {
                what: format!("size of {name}"),
                source,
            }),
            DiskSource::Nbd { client, .. } => Ok(client.size()),
        }
    }

    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), TestkitError> {
        match self {
            DiskSource::File { name, disk } => {
                disk.read_at(buf, offset)
                    .map_err(|source| TestkitError::Disk {
                        what: format!("reading {name}"),
                        source,
                    })
            }
            DiskSource::Nbd { name, client } => {
                client
                    .read_at(offset, buf)
                    .map_err(|source| TestkitError::Nbd {
                        what: format!("reading {name}"),
                        source,
                    })
            }
        }
    }
}

/// What kind of rule a block broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationKind {
    /// Pattern magic but a bad checksum or payload: a torn or damaged block.
    Torn,
    /// Neither zero nor a pattern block.
    Foreign,
    /// A valid pattern block whose header names another disk or offset, or a
    /// write that does not cover this block or has another epoch.
    Misplaced,
    /// A valid pattern block of a write id the log does not have.
    UnknownWrite,
    /// A write voided by an epoch cut is visible.
    Voided,
    /// A write issued after the point is visible.
    IssuedAfterPoint,
    /// A required write (acknowledged) is missing: the block is zero.
    Missing,
    /// The block shows a write older than the last required one.
    Stale,
    /// The log has a write beyond the end of the disk.
    OutsideDisk,
}

impl ViolationKind {
    /// In words, for operators.
    pub fn label(self) -> &'static str {
        match self {
            ViolationKind::Torn => "torn block",
            ViolationKind::Foreign => "foreign data",
            ViolationKind::Misplaced => "misplaced block",
            ViolationKind::UnknownWrite => "write not in the log",
            ViolationKind::Voided => "voided write visible",
            ViolationKind::IssuedAfterPoint => "write issued after the point visible",
            ViolationKind::Missing => "acknowledged write missing",
            ViolationKind::Stale => "stale block",
            ViolationKind::OutsideDisk => "write outside the disk",
        }
    }
}

/// The first rule a block broke.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub disk: usize,
    /// Byte offset of the block.
    pub offset: u64,
    pub kind: ViolationKind,
    /// Write ids that would have been acceptable (empty: zero or none).
    pub expected: Vec<u64>,
    /// The write id the block shows, if it shows a valid one.
    pub found_write: Option<u64>,
    pub message: String,
}

/// Per disk.
#[derive(Clone, Debug, Serialize)]
pub struct DiskReport {
    pub name: String,
    pub size: u64,
    pub blocks_checked: u64,
    pub written_blocks: u64,
}

/// Everything `verify` checked and found.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// `planned` or `point`.
    pub mode: &'static str,
    pub point_time: Option<u64>,
    pub disks: Vec<DiskReport>,
    pub blocks_checked: u64,
    /// Blocks that are not zero.
    pub written_blocks: u64,
    pub writes_in_log: u64,
    /// Writes with an `acked` record.
    pub acked_writes: u64,
    /// Writes that must be visible (acknowledged before their cut).
    pub required_writes: u64,
    /// Writes issued after their cut (epoch cut or point): must not be visible.
    pub voided_writes: u64,
    /// Writes straddling their cut: may or may not be visible.
    pub uncertain_writes: u64,
    pub epochs: usize,
    pub log_torn_tail: bool,
    /// Blocks showing exactly their last required write.
    pub blocks_at_last_required: u64,
    /// Blocks showing a write later than their last required one.
    pub blocks_newer: u64,
    /// What was checked, in words.
    pub checks: Vec<String>,
    pub violations: u64,
    pub first_violation: Option<Violation>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.violations == 0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Voided,
    Required,
    Uncertain,
}

struct Rules<'a> {
    log: &'a Log,
    /// (epoch, min cut_ns of this and every later epoch record).
    suffix: Vec<(u32, u64)>,
    point: Option<u64>,
}

impl<'a> Rules<'a> {
    fn new(log: &'a Log, mode: Mode) -> Rules<'a> {
        let mut suffix: Vec<(u32, u64)> = log.cuts.iter().map(|c| (c.epoch, c.cut_ns)).collect();
        for i in (0..suffix.len().saturating_sub(1)).rev() {
            suffix[i].1 = suffix[i].1.min(suffix[i + 1].1);
        }
        Rules {
            log,
            suffix,
            point: match mode {
                Mode::Planned => None,
                Mode::Point(t) => Some(t),
            },
        }
    }

    /// The time after which `w` is voided and before which its ack counts.
    fn cut(&self, w: &WriteEntry) -> Option<u64> {
        let i = self.suffix.partition_point(|&(e, _)| e <= w.epoch);
        let epoch_cut = self.suffix.get(i).map(|&(_, t)| t);
        match (epoch_cut, self.point) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn status(&self, w: &WriteEntry) -> Status {
        match self.cut(w) {
            None => {
                if w.t_acked.is_some() {
                    Status::Required
                } else {
                    Status::Uncertain
                }
            }
            Some(cut) => {
                if w.t_issued > cut {
                    Status::Voided
                } else if w.t_acked.is_some_and(|a| a < cut) {
                    Status::Required
                } else {
                    Status::Uncertain
                }
            }
        }
    }

    /// Why `w` is voided, in words.
    fn voided_reason(&self, w: &WriteEntry) -> (ViolationKind, String) {
        let i = self.suffix.partition_point(|&(e, _)| e <= w.epoch);
        match (self.suffix.get(i), self.point) {
            (Some(&(_, t)), p) if p.is_none_or(|p| t <= p) && w.t_issued > t => (
                ViolationKind::Voided,
                format!(
                    "write {} (epoch {}, issued at {}) was voided by an epoch cut at {t} but is visible",
                    w.id, w.epoch, w.t_issued
                ),
            ),
            (_, Some(p)) => (
                ViolationKind::IssuedAfterPoint,
                format!(
                    "write {} was issued at {}, after the point {p}, but is visible",
                    w.id, w.t_issued
                ),
            ),
            _ => (ViolationKind::Voided, format!("write {} is voided", w.id)),
        }
    }

    /// Every acceptable write id for a block whose last required write is
    /// `last` (for messages).
    fn acceptable(&self, disk: u16, offset: u64, last: Option<u64>) -> Vec<u64> {
        self.log
            .writes
            .range(last.unwrap_or(0)..)
            .filter(|(_, w)| w.covers(disk, offset) && self.status(w) != Status::Voided)
            .map(|(&id, _)| id)
            .take(16)
            .collect()
    }
}

struct Checker<'a> {
    rules: Rules<'a>,
    required: HashMap<(u16, u64), u64>,
    violations: u64,
    first: Option<Violation>,
    at_last: u64,
    newer: u64,
}

impl Checker<'_> {
    fn violate(&mut self, v: impl FnOnce(&Rules) -> Violation, disk: usize, offset: u64) {
        self.violations += 1;
        if self
            .first
            .as_ref()
            .is_none_or(|f| (disk, offset) < (f.disk, f.offset))
        {
            self.first = Some(v(&self.rules));
        }
    }

    fn check_block(&mut self, disk: usize, offset: u64, block: &[u8]) -> bool {
        let d = disk as u16;
        let last = self.required.get(&(d, offset)).copied();
        let found = match classify(block) {
            Content::Zero => {
                if let Some(l) = last {
                    self.violate(
                        |r| Violation {
                            disk,
                            offset,
                            kind: ViolationKind::Missing,
                            expected: r.acceptable(d, offset, Some(l)),
                            found_write: None,
                            message: format!(
                                "block is zero but acknowledged write {l} (or a later write to it) must be visible"
                            ),
                        },
                        disk,
                        offset,
                    );
                }
                return false;
            }
            Content::Pattern(h) => h,
            other => {
                let (kind, what) = match other {
                    Content::Foreign => {
                        (ViolationKind::Foreign, "foreign data (no pattern header)")
                    }
                    Content::BadPayload(_) => (
                        ViolationKind::Torn,
                        "damaged pattern block (payload does not match its header)",
                    ),
                    _ => (
                        ViolationKind::Torn,
                        "torn or damaged pattern block (checksum mismatch)",
                    ),
                };
                self.violate(
                    |r| Violation {
                        disk,
                        offset,
                        kind,
                        expected: r.acceptable(d, offset, last),
                        found_write: None,
                        message: format!("block holds {what}"),
                    },
                    disk,
                    offset,
                );
                return true;
            }
        };
        let bad = |kind, message: String| {
            move |r: &Rules| Violation {
                disk,
                offset,
                kind,
                expected: r.acceptable(d, offset, last),
                found_write: Some(found.write_id),
                message,
            }
        };
        if found.disk != d || found.offset != offset {
            let m = format!(
                "block holds write {} for disk {} offset {}",
                found.write_id, found.disk, found.offset
            );
            self.violate(bad(ViolationKind::Misplaced, m), disk, offset);
            return true;
        }
        let Some(w) = self.rules.log.writes.get(&found.write_id).copied() else {
            let m = format!(
                "block holds write {}, which is not in the log",
                found.write_id
            );
            self.violate(bad(ViolationKind::UnknownWrite, m), disk, offset);
            return true;
        };
        if !w.covers(d, offset) || w.epoch != found.epoch {
            let m = format!(
                "block holds write {} (epoch {}), but the log has it at disk {} offset {} for {} block(s) in epoch {}",
                w.id, found.epoch, w.disk, w.offset, w.blocks, w.epoch
            );
            self.violate(bad(ViolationKind::Misplaced, m), disk, offset);
            return true;
        }
        if self.rules.status(&w) == Status::Voided {
            let (kind, m) = self.rules.voided_reason(&w);
            self.violate(bad(kind, m), disk, offset);
            return true;
        }
        match last {
            Some(l) if w.id < l => {
                let m = format!(
                    "block holds write {}, older than acknowledged write {l} to it",
                    w.id
                );
                self.violate(bad(ViolationKind::Stale, m), disk, offset);
            }
            Some(l) if w.id == l => self.at_last += 1,
            _ => self.newer += 1,
        }
        true
    }
}

/// Check `disks` (in `--disk` order) against `log`.
pub fn verify(
    disks: &mut [DiskSource],
    log: &Log,
    mode: Mode,
) -> Result<VerifyReport, TestkitError> {
    let rules = Rules::new(log, mode);
    let mut sizes = Vec::with_capacity(disks.len());
    for d in disks.iter() {
        sizes.push(d.size()?);
    }
    let (mut required_writes, mut voided, mut uncertain) = (0u64, 0u64, 0u64);
    let mut required: HashMap<(u16, u64), u64> = HashMap::new();
    let mut outside = Vec::new();
    for w in log.writes.values() {
        let Some(&size) = sizes.get(usize::from(w.disk)) else {
            return Err(TestkitError::Invalid(format!(
                "the log has writes to disk {} but only {} disk(s) were given",
                w.disk,
                disks.len()
            )));
        };
        let status = rules.status(w);
        match status {
            Status::Voided => voided += 1,
            Status::Required => required_writes += 1,
            Status::Uncertain => uncertain += 1,
        }
        if w.end() > size && status != Status::Voided {
            outside.push(*w);
        }
        if status == Status::Required {
            for b in 0..u64::from(w.blocks) {
                let e = required
                    .entry((w.disk, w.offset + b * BLOCK as u64))
                    .or_insert(w.id);
                *e = (*e).max(w.id);
            }
        }
    }
    let mut checker = Checker {
        rules,
        required,
        violations: 0,
        first: None,
        at_last: 0,
        newer: 0,
    };
    for w in outside {
        checker.violate(
            |_| Violation {
                disk: usize::from(w.disk),
                offset: w.offset,
                kind: ViolationKind::OutsideDisk,
                expected: vec![],
                found_write: None,
                message: format!(
                    "write {} ends at byte {}, beyond the disk's {} bytes",
                    w.id,
                    w.end(),
                    sizes[usize::from(w.disk)]
                ),
            },
            usize::from(w.disk),
            w.offset,
        );
    }

    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    let mut reports = Vec::with_capacity(disks.len());
    for (i, d) in disks.iter_mut().enumerate() {
        let size = sizes[i];
        let blocks = size / BLOCK as u64;
        let mut written = 0u64;
        let mut off = 0u64;
        let end = blocks * BLOCK as u64;
        while off < end {
            let n = ((end - off) as usize).min(CHUNK);
            d.read_at(off, &mut buf[..n])?;
            for (j, block) in buf[..n].chunks_exact(BLOCK).enumerate() {
                if checker.check_block(i, off + (j * BLOCK) as u64, block) {
                    written += 1;
                }
            }
            off += n as u64;
        }
        reports.push(DiskReport {
            name: d.name().to_string(),
            size,
            blocks_checked: blocks,
            written_blocks: written,
        });
    }

    let mut checks = vec![
        "nothing torn or foreign: every block is zero or a valid pattern block of a logged write that covers it".to_string(),
    ];
    if !log.cuts.is_empty() {
        checks.push(format!(
            "{} epoch cut(s): writes issued after a later epoch's cut are not visible",
            log.cuts.len()
        ));
    }
    match mode {
        Mode::Planned => checks.push(
            "planned: every acknowledged write is visible or replaced by a later write to the same block".into(),
        ),
        Mode::Point(t) => checks.push(format!(
            "point {t}: nothing issued after it is visible; every write acknowledged before it is visible or replaced by a later write issued before it"
        )),
    }
    Ok(VerifyReport {
        mode: match mode {
            Mode::Planned => "planned",
            Mode::Point(_) => "point",
        },
        point_time: match mode {
            Mode::Planned => None,
            Mode::Point(t) => Some(t),
        },
        blocks_checked: reports.iter().map(|r| r.blocks_checked).sum(),
        written_blocks: reports.iter().map(|r| r.written_blocks).sum(),
        disks: reports,
        writes_in_log: log.writes.len() as u64,
        acked_writes: log.acked() as u64,
        required_writes,
        voided_writes: voided,
        uncertain_writes: uncertain,
        epochs: log.cuts.len(),
        log_torn_tail: log.torn_tail,
        blocks_at_last_required: checker.at_last,
        blocks_newer: checker.newer,
        checks,
        violations: checker.violations,
        first_violation: checker.first,
    })
}

/// Open `specs` (paths or NBD URIs) and `log_path`, and check them.
pub fn verify_paths(
    specs: &[String],
    log_path: &Path,
    mode: Mode,
) -> Result<VerifyReport, TestkitError> {
    if !log_path.exists() {
        return Err(TestkitError::LogIo {
            path: log_path.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    let log = Log::read(log_path)?;
    let mut disks = specs
        .iter()
        .map(|s| DiskSource::open(s))
        .collect::<Result<Vec<_>, _>>()?;
    verify(&mut disks, &log, mode)
}
