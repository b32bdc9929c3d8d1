//! The checker against hand-made disks and logs.
#![allow(clippy::unwrap_used)]

use crate::log::Record;
use crate::pattern::{BLOCK, write_buffer};
use crate::verify::{DiskSource, Mode, VerifyReport, ViolationKind, verify};
use crate::{Log, TestkitError};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const SIZE: u64 = 1 << 20;
const B: u64 = BLOCK as u64;

/// One write of the model: what the log says.
#[derive(Clone, Copy)]
struct W {
    id: u64,
    disk: u16,
    block: u64,
    blocks: u32,
    epoch: u32,
    t_issued: u64,
    t_acked: Option<u64>,
}

fn w(id: u64, block: u64, blocks: u32, t_issued: u64, t_acked: Option<u64>) -> W {
    W {
        id,
        disk: 0,
        block,
        blocks,
        epoch: 0,
        t_issued,
        t_acked,
    }
}

struct Model {
    dir: tempfile::TempDir,
    disks: Vec<PathBuf>,
    log: Vec<Record>,
}

impl Model {
    fn new(ndisks: usize) -> Model {
        let dir = tempfile::tempdir().unwrap();
        let disks = (0..ndisks)
            .map(|i| {
                let p = dir.path().join(format!("d{i}.img"));
                std::fs::File::create(&p).unwrap().set_len(SIZE).unwrap();
                p
            })
            .collect();
        Model {
            dir,
            disks,
            log: vec![Record::Run {
                t: 1,
                disks: vec![SIZE; ndisks],
                inflight: 1,
            }],
        }
    }

    /// Log the write (issued, and acked when it was).
    fn log(&mut self, w: W) -> &mut Self {
        self.log.push(Record::Issued {
            id: w.id,
            disk: w.disk,
            offset: w.block * B,
            blocks: w.blocks,
            epoch: w.epoch,
            t_issued: w.t_issued,
        });
        if let Some(t) = w.t_acked {
            self.log.push(Record::Acked {
                id: w.id,
                t_acked: t,
            });
        }
        self
    }

    fn epoch(&mut self, epoch: u32, cut_ns: u64) -> &mut Self {
        self.log.push(Record::Epoch { epoch, cut_ns });
        self
    }

    /// Put the write's blocks on its disk.
    fn apply(&mut self, w: W) -> &mut Self {
        let data = write_buffer(w.id, w.disk, w.block * B, w.blocks, w.epoch);
        self.write_raw(w.disk, w.block * B, &data);
        self
    }

    /// Log and apply.
    fn both(&mut self, w: W) -> &mut Self {
        self.log(w).apply(w)
    }

    fn write_raw(&self, disk: u16, offset: u64, data: &[u8]) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&self.disks[usize::from(disk)])
            .unwrap()
            .write_all_at(data, offset)
            .unwrap();
    }

    fn log_path(&self) -> PathBuf {
        let p = self.dir.path().join("w.log");
        let mut f = std::fs::File::create(&p).unwrap();
        for r in &self.log {
            serde_json::to_writer(&mut f, r).unwrap();
            f.write_all(b"\n").unwrap();
        }
        p
    }

    fn verify_log(&self, log_path: &Path, mode: Mode) -> Result<VerifyReport, TestkitError> {
        let log = Log::read(log_path)?;
        let mut disks: Vec<DiskSource> = self
            .disks
            .iter()
            .map(|p| DiskSource::open(&p.display().to_string()))
            .collect::<Result<_, _>>()?;
        verify(&mut disks, &log, mode)
    }

    fn check(&self, mode: Mode) -> VerifyReport {
        self.verify_log(&self.log_path(), mode).unwrap()
    }
}

fn assert_ok(r: &VerifyReport) {
    assert!(r.ok(), "unexpected violation: {:?}", r.first_violation);
}

fn assert_violation(r: &VerifyReport, kind: ViolationKind, disk: usize, offset: u64) {
    let v = r
        .first_violation
        .as_ref()
        .unwrap_or_else(|| panic!("no violation found: {r:?}"));
    assert_eq!(
        (v.kind, v.disk, v.offset),
        (kind, disk, offset),
        "wrong violation: {v:?}"
    );
}

/// Two disks, overlapping writes, one unacknowledged write visible and one
/// not: everything holds in planned mode.
#[test]
fn clean_pass() {
    let mut m = Model::new(2);
    m.both(w(1, 0, 2, 100, Some(110)))
        .both(w(2, 1, 2, 120, Some(130)))
        .both(W {
            disk: 1,
            ..w(3, 7, 8, 140, Some(150))
        })
        // Unacknowledged: may be visible...
        .both(w(4, 20, 1, 160, None))
        // ...or not.
        .log(w(5, 30, 3, 170, None));
    let r = m.check(Mode::Planned);
    assert_ok(&r);
    assert_eq!(r.blocks_checked, 2 * SIZE / B);
    assert_eq!(r.written_blocks, 3 + 8 + 1);
    assert_eq!(r.writes_in_log, 5);
    assert_eq!(r.acked_writes, 3);
    assert_eq!(r.required_writes, 3);
    assert_eq!(r.voided_writes, 0);
    assert_eq!(r.blocks_at_last_required, 3 + 8);
    assert_eq!(r.blocks_newer, 1);
}

#[test]
fn torn_block_is_detected() {
    let mut m = Model::new(1);
    m.both(w(1, 4, 3, 100, Some(110)));
    // Tear the middle block: its second half from the next block.
    let data = write_buffer(1, 0, 4 * B, 3, 0);
    m.write_raw(0, 5 * B + 2048, &data[2 * BLOCK + 2048..3 * BLOCK]);
    let r = m.check(Mode::Planned);
    assert_violation(&r, ViolationKind::Torn, 0, 5 * B);
    assert_eq!(r.violations, 1);
    assert_eq!(r.first_violation.as_ref().unwrap().expected, vec![1]);
    // A single flipped byte, too.
    let mut m = Model::new(1);
    m.both(w(1, 4, 1, 100, Some(110)));
    m.write_raw(0, 4 * B + 1000, &[0xff]);
    assert_violation(&m.check(Mode::Planned), ViolationKind::Torn, 0, 4 * B);
}

#[test]
fn foreign_and_unknown_blocks_are_detected() {
    let mut m = Model::new(1);
    m.both(w(1, 0, 1, 100, Some(110)));
    m.write_raw(0, 9 * B, &[7u8; BLOCK]);
    assert_violation(&m.check(Mode::Planned), ViolationKind::Foreign, 0, 9 * B);

    // A valid pattern block of a write the log never issued.
    let mut m = Model::new(1);
    m.both(w(1, 0, 1, 100, Some(110)))
        .apply(w(9, 3, 1, 0, None));
    assert_violation(
        &m.check(Mode::Planned),
        ViolationKind::UnknownWrite,
        0,
        3 * B,
    );

    // A block copied to the wrong place.
    let mut m = Model::new(2);
    m.both(w(1, 0, 1, 100, Some(110)));
    m.write_raw(1, 0, &write_buffer(1, 0, 0, 1, 0));
    assert_violation(&m.check(Mode::Planned), ViolationKind::Misplaced, 1, 0);
}

#[test]
fn missing_acked_write_is_detected_in_planned_mode() {
    let mut m = Model::new(1);
    m.both(w(1, 0, 2, 100, Some(110)))
        .log(w(2, 10, 2, 120, Some(130)));
    let r = m.check(Mode::Planned);
    assert_violation(&r, ViolationKind::Missing, 0, 10 * B);
    assert_eq!(r.violations, 2);
    let v = r.first_violation.unwrap();
    assert_eq!(v.expected, vec![2]);
    assert!(v.message.contains("acknowledged write 2"), "{}", v.message);

    // An older write visible where a later acknowledged one must be.
    let mut m = Model::new(1);
    m.both(w(1, 0, 2, 100, Some(110)))
        .log(w(2, 1, 1, 120, Some(130)));
    let r = m.check(Mode::Planned);
    assert_violation(&r, ViolationKind::Stale, 0, B);
    assert_eq!(r.first_violation.unwrap().found_write, Some(1));

    // A later unacknowledged write replacing the acknowledged one is fine.
    let mut m = Model::new(1);
    m.both(w(1, 0, 2, 100, Some(110)))
        .both(w(2, 1, 1, 120, None));
    assert_ok(&m.check(Mode::Planned));
}

#[test]
fn point_mode() {
    // Point T = 200: write 1 acknowledged before, write 2 straddles, write 3
    // issued after.
    let base = || {
        let mut m = Model::new(1);
        m.both(w(1, 0, 1, 100, Some(110)))
            .log(w(2, 1, 1, 190, Some(210)))
            .log(w(3, 2, 1, 220, Some(230)));
        m
    };
    // The point's state: 1 visible, 2 either, 3 not.
    assert_ok(&base().check(Mode::Point(200)));
    let mut m = base();
    m.apply(w(2, 1, 1, 190, None));
    let r = m.check(Mode::Point(200));
    assert_ok(&r);
    assert_eq!(r.voided_writes, 1);
    assert_eq!(r.required_writes, 1);
    assert_eq!(r.uncertain_writes, 1);

    // A write issued after T is visible.
    let mut m = base();
    m.apply(w(3, 2, 1, 220, None));
    let r = m.check(Mode::Point(200));
    assert_violation(&r, ViolationKind::IssuedAfterPoint, 0, 2 * B);
    assert_eq!(r.first_violation.unwrap().found_write, Some(3));
    // ...which planned mode accepts once write 2 (acknowledged) is there too.
    assert_violation(&m.check(Mode::Planned), ViolationKind::Missing, 0, B);
    m.apply(w(2, 1, 1, 190, None));
    assert_ok(&m.check(Mode::Planned));

    // A write acknowledged before T is missing.
    let mut m = Model::new(1);
    m.log(w(1, 0, 1, 100, Some(110)));
    assert_violation(&m.check(Mode::Point(200)), ViolationKind::Missing, 0, 0);
    // ...but not when T is before its acknowledgement.
    assert_ok(&m.check(Mode::Point(105)));

    // Replaced by a later write issued before T: fine; by one issued after
    // T: not.
    let mut m = Model::new(1);
    m.log(w(1, 0, 1, 100, Some(110)))
        .both(w(2, 0, 1, 150, None));
    assert_ok(&m.check(Mode::Point(200)));
    assert_violation(
        &m.check(Mode::Point(140)),
        ViolationKind::IssuedAfterPoint,
        0,
        0,
    );
}

#[test]
fn epoch_cut_voids_writes() {
    // Epoch 0: A (acked before the cut), B (issued after it) on one block;
    // failover to the point 150 starts epoch 1; C is written in epoch 1.
    let a = w(1, 0, 1, 100, Some(110));
    let b = w(2, 0, 1, 200, Some(210));
    let straddle = w(3, 5, 1, 140, Some(160));
    let c = W {
        epoch: 1,
        ..w(4, 9, 2, 300, Some(310))
    };
    let base = || {
        let mut m = Model::new(1);
        m.log(a).log(b).log(straddle).epoch(1, 150).log(c);
        m
    };
    // The rolled-back disk shows A, and C was written after.
    let mut m = base();
    m.apply(a).apply(c);
    let r = m.check(Mode::Planned);
    assert_ok(&r);
    assert_eq!(r.epochs, 1);
    assert_eq!(r.voided_writes, 1);
    assert_eq!(r.required_writes, 2);
    assert_eq!(r.uncertain_writes, 1);
    // The straddling write may have survived the rollback.
    m.apply(straddle);
    assert_ok(&m.check(Mode::Planned));

    // B survived the rollback: a voided write is visible.
    let mut m = base();
    m.apply(a).apply(b).apply(c);
    let r = m.check(Mode::Planned);
    assert_violation(&r, ViolationKind::Voided, 0, 0);
    assert_eq!(r.first_violation.unwrap().found_write, Some(2));

    // A is missing after the rollback.
    let mut m = base();
    m.apply(c);
    assert_violation(&m.check(Mode::Planned), ViolationKind::Missing, 0, 0);

    // C is missing (acknowledged in epoch 1).
    let mut m = base();
    m.apply(a);
    assert_violation(&m.check(Mode::Planned), ViolationKind::Missing, 0, 9 * B);

    // A block carrying the wrong epoch in its header.
    let mut m = base();
    m.apply(a).apply(W { epoch: 0, ..c });
    assert_violation(&m.check(Mode::Planned), ViolationKind::Misplaced, 0, 9 * B);
}

#[test]
fn torn_last_log_record_is_tolerated() {
    let mut m = Model::new(1);
    m.both(w(1, 0, 1, 100, Some(110)))
        .both(w(2, 3, 1, 120, None));
    let p = m.log_path();
    let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
    f.write_all(b"{\"type\":\"acked\",\"id\":2,\"t_ack")
        .unwrap();
    drop(f);
    let r = m.verify_log(&p, Mode::Planned).unwrap();
    assert_ok(&r);
    assert!(r.log_torn_tail);
    assert_eq!(r.acked_writes, 1);

    // Damage before the end is an error, not a verdict.
    let mut bytes = std::fs::read(&p).unwrap();
    bytes.extend_from_slice(b"\n{\"type\":\"acked\",\"id\":2,\"t_acked\":130}\n");
    std::fs::write(&p, &bytes).unwrap();
    assert!(matches!(
        m.verify_log(&p, Mode::Planned),
        Err(TestkitError::LogCorrupt { .. })
    ));
}

#[test]
fn log_naming_more_disks_than_given_is_an_error() {
    let mut m = Model::new(1);
    m.log(W {
        disk: 1,
        ..w(1, 0, 1, 100, Some(110))
    });
    assert!(matches!(
        m.verify_log(&m.log_path(), Mode::Planned),
        Err(TestkitError::Invalid(_))
    ));
    // A write beyond the end of the disk.
    let mut m = Model::new(1);
    m.log(w(1, SIZE / B - 1, 2, 100, Some(110)));
    assert_violation(
        &m.check(Mode::Planned),
        ViolationKind::OutsideDisk,
        0,
        SIZE - B,
    );
}
