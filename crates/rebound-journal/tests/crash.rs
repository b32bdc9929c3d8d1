//! Fault injection at every write, fsync, truncate, create, rename, removal
//! and directory fsync of a scenario (appends, seals, pins, retention), each
//! followed by a simulated power loss; then the journal must open, keep every
//! acknowledged point, and list only points whose content matches the model.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use common::*;
use rebound_journal::fs::{Fault, FaultFs};
use rebound_journal::{Changeset, Journal, PointKind, Result};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

const S: u64 = 1_000_000_000;
const SEG: u64 = 24 * 1024;

struct Outcome {
    /// Points acknowledged (durable) before the fault.
    acked: Vec<u64>,
    /// Expected content of every point the scenario tried to create.
    snapshots: BTreeMap<u64, Vec<Vec<u8>>>,
    /// Time cutoff of the last retention pass that was started.
    fold_cutoff: u64,
}

fn scenario(j: &mut Journal, out: &mut Outcome) -> Result<()> {
    let mut m = Model::new(2);
    for i in 0..14u64 {
        let mut cs = Changeset::new()
            .write(
                (i % 2) as u16,
                (i * 11 % 60) * 4096,
                data(i, 1 + (i % 4) as usize),
            )
            .at((i + 1) * S);
        if i % 5 == 2 {
            cs = cs.write(1, 63 * 4096, vec![0u8; 4096]);
        }
        if i % 3 != 1 {
            cs = cs.point(if i % 4 == 0 {
                PointKind::AppConsistent
            } else {
                PointKind::CrashConsistent
            });
        }
        m.apply(&cs);
        // Record what the point would contain before trying: a failed
        // append may still leave a complete record behind.
        let next_point = j.last_seq()
            + cs.writes
                .iter()
                .map(|w| w.data.len().div_ceil(1 << 20) as u64)
                .sum::<u64>()
            + 1;
        if cs.close.is_some() {
            out.snapshots.insert(next_point, m.disks.clone());
        }
        let a = j.append(&cs)?;
        if let Some(p) = a.point {
            assert_eq!(p, next_point);
            out.acked.push(p);
        }
        if i == 6 {
            j.pin(out.acked[2], "drill")?;
        }
        if i == 9 {
            out.fold_cutoff = 5 * S;
            j.fold(8 * S, 3 * S)?;
        }
        if i == 11 {
            j.unpin(out.acked[2], "drill")?;
            j.seal()?;
            out.fold_cutoff = 8 * S;
            j.fold(11 * S, 3 * S)?;
        }
    }
    Ok(())
}

fn fresh(dir: &Path, fs: &FaultFs) -> Journal {
    Journal::create(dir, "vm", &specs(2), opts(Arc::new(fs.clone()), SEG)).unwrap()
}

fn check_after_crash(dir: &Path, out: &Outcome, what: &str) {
    let mut j = Journal::open(dir, "vm", opts(Arc::new(FaultFs::new()), SEG))
        .unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
    assert!(j.problems().is_empty(), "{what}: {:?}", j.problems());
    for p in &out.acked {
        let folded = j.base_seq() >= *p;
        if folded {
            let t = (*p / 2) * S; // at most this old; folds only touch old points
            assert!(
                out.fold_cutoff > 0 && t <= out.fold_cutoff + 2 * S,
                "{what}: acked point {p} folded too early"
            );
            continue;
        }
        assert!(j.point(*p).is_ok(), "{what}: acknowledged point {p} lost");
    }
    for p in j.points() {
        assert!(
            p.usable,
            "{what}: point {} unusable after a clean crash",
            p.id
        );
        let want = out
            .snapshots
            .get(&p.id)
            .unwrap_or_else(|| panic!("{what}: unknown point {}", p.id));
        check_point(&j, p.id, want);
    }
    // Still writable.
    let cs = Changeset::new()
        .write(0, 0, data(777, 1))
        .at(100 * S)
        .point(PointKind::CrashConsistent);
    j.append(&cs)
        .unwrap_or_else(|e| panic!("{what}: append after reopen failed: {e}"));
}

#[test]
fn fault_at_every_operation_then_power_loss() {
    // Count the operations of a clean run.
    let total = {
        let dir = tempfile::tempdir().unwrap();
        let fs = FaultFs::new();
        let mut j = fresh(dir.path(), &fs);
        let start = fs.ops();
        let mut out = Outcome {
            acked: Vec::new(),
            snapshots: BTreeMap::new(),
            fold_cutoff: 0,
        };
        scenario(&mut j, &mut out).unwrap();
        assert!(out.acked.len() >= 8);
        fs.ops() - start
    };
    assert!(total > 50, "scenario too small: {total} operations");
    for k in 1..=total {
        for (mode, seed) in [
            ("all unsynced lost", 0u64),
            ("some unsynced kept", k * 7919 + 1),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let fs = FaultFs::new();
            let mut j = fresh(dir.path(), &fs);
            fs.fail_at(k, Fault::Crash);
            let mut out = Outcome {
                acked: Vec::new(),
                snapshots: BTreeMap::new(),
                fold_cutoff: 0,
            };
            let r = scenario(&mut j, &mut out);
            assert!(r.is_err(), "operation {k} of {total} was not hit");
            drop(j);
            fs.power_loss(seed);
            check_after_crash(
                dir.path(),
                &out,
                &format!("fault at op {k}/{total}, {mode}"),
            );
        }
    }
}

#[test]
fn no_space_at_every_operation_keeps_data() {
    let total = {
        let dir = tempfile::tempdir().unwrap();
        let fs = FaultFs::new();
        let mut j = fresh(dir.path(), &fs);
        let start = fs.ops();
        let mut out = Outcome {
            acked: Vec::new(),
            snapshots: BTreeMap::new(),
            fold_cutoff: 0,
        };
        scenario(&mut j, &mut out).unwrap();
        fs.ops() - start
    };
    for k in (1..=total).step_by(3) {
        let dir = tempfile::tempdir().unwrap();
        let fs = FaultFs::new();
        let mut j = fresh(dir.path(), &fs);
        fs.fail_at(k, Fault::NoSpace);
        let mut out = Outcome {
            acked: Vec::new(),
            snapshots: BTreeMap::new(),
            fold_cutoff: 0,
        };
        if let Err(e) = scenario(&mut j, &mut out) {
            use rebound_types::{Coded, ErrorCode};
            assert!(
                matches!(
                    e.code(),
                    ErrorCode::RetentionVolumeFull | ErrorCode::JournalIo
                ),
                "op {k}: unexpected {e}"
            );
        }
        // Existing data intact in the running journal...
        for p in j.points().to_vec() {
            if p.usable && out.snapshots.contains_key(&p.id) {
                check_point(&j, p.id, &out.snapshots[&p.id]);
            }
        }
        drop(j);
        fs.clear();
        // ...and after a restart.
        check_after_crash(dir.path(), &out, &format!("ENOSPC at op {k}/{total}"));
    }
}

/// The scenario without faults, checked live and after a clean reopen (the
/// fold of a two-disk item once wrote one disk's blocks into the other).
#[test]
fn clean_scenario_live_and_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultFs::new();
    let mut j = fresh(dir.path(), &fs);
    let mut out = Outcome {
        acked: Vec::new(),
        snapshots: BTreeMap::new(),
        fold_cutoff: 0,
    };
    scenario(&mut j, &mut out).unwrap();
    assert!(j.base_seq() > 0, "retention folded something");
    for p in j.points().to_vec() {
        check_point(&j, p.id, &out.snapshots[&p.id]);
    }
    let before = j.points().to_vec();
    drop(j);
    let j = Journal::open(dir.path(), "vm", real(SEG)).unwrap();
    assert_eq!(j.points(), &before[..]);
    for p in j.points().to_vec() {
        check_point(&j, p.id, &out.snapshots[&p.id]);
    }
}
