//! Model-based property test (after vector's disk buffer model tests): random
//! sequences of append / close point / seal / retention / pin / crash (power
//! loss) / reopen / materialise, checked after every step against an
//! in-memory model of the changesets.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use common::*;
use proptest::prelude::*;
use rebound_journal::fs::{Fault, FaultFs};
use rebound_journal::{Changeset, Journal, PointKind, Target};
use rebound_types::{Coded, ErrorCode};
use std::sync::Arc;

const S: u64 = 1_000_000_000;
const SEG: u64 = 20 * 1024;

#[derive(Clone, Debug)]
enum Op {
    Append {
        disk: u16,
        block: u64,
        blocks: usize,
        zero: bool,
        point: Option<u8>,
        sync: bool,
    },
    Seal,
    Fold {
        window: u64,
    },
    Pin(usize),
    Unpin,
    Crash {
        seed: u64,
        after_ops: Option<u64>,
    },
    Reopen,
    Materialise(usize),
    Full(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (0u16..2, 0u64..64, 1usize..5, prop::bool::weighted(0.1), prop::option::of(0u8..3), any::<bool>())
            .prop_map(|(disk, block, blocks, zero, point, sync)| Op::Append { disk, block, blocks, zero, point, sync }),
        1 => Just(Op::Seal),
        2 => (1u64..20).prop_map(|w| Op::Fold { window: w * S }),
        1 => (0usize..50).prop_map(Op::Pin),
        1 => Just(Op::Unpin),
        2 => (any::<u64>(), prop::option::of(1u64..12)).prop_map(|(seed, after_ops)| Op::Crash { seed, after_ops }),
        1 => Just(Op::Reopen),
        2 => (0usize..50).prop_map(Op::Materialise),
        1 => (1u64..6).prop_map(Op::Full),
    ]
}

/// The model: every complete changeset with its commit seq, and how far the
/// journal has acknowledged durability.
struct State {
    log: Vec<(u64, u64, Option<PointKind>, Changeset)>,
    acked: u64,
    pins: Vec<u64>,
}

impl State {
    fn disks_at(&self, seq: u64) -> Vec<Vec<u8>> {
        let mut m = Model::new(2);
        for (s, _, _, cs) in &self.log {
            if *s <= seq {
                m.apply(cs);
            }
        }
        m.disks
    }
    fn points(&self) -> Vec<(u64, u64)> {
        self.log
            .iter()
            .filter(|l| l.2.is_some())
            .map(|l| (l.0, l.1))
            .collect()
    }
}

fn check(j: &Journal, st: &State, ctx: &str) {
    let want: Vec<u64> = st
        .points()
        .iter()
        .map(|p| p.0)
        .filter(|p| *p > j.base_seq())
        .collect();
    let got: Vec<u64> = j.points().iter().map(|p| p.id).collect();
    assert_eq!(got, want, "{ctx}: catalogue differs from the model");
    assert!(j.points().iter().all(|p| p.usable), "{ctx}");
    for p in &st.pins {
        assert!(j.point(*p).is_ok(), "{ctx}: pinned point {p} was removed");
    }
    if let Some(l) = j.latest() {
        check_point(j, l.id, &st.disks_at(l.id));
    }
}

#[allow(clippy::too_many_arguments)]
fn append(
    jr: &mut Journal,
    st: &mut State,
    fs: &FaultFs,
    now: u64,
    disk: u16,
    block: u64,
    blocks: usize,
    zero: bool,
    point: Option<u8>,
    sync: bool,
    ctx: &str,
) {
    let blocks = blocks.min(64 - block as usize);
    let d = if zero {
        vec![0u8; blocks * 4096]
    } else {
        data(now, blocks)
    };
    let mut cs = Changeset::new().write(disk, block * 4096, d).at(now);
    cs.sync = sync;
    let kind = point.map(|k| {
        [
            PointKind::CrashConsistent,
            PointKind::AppConsistent,
            PointKind::Group,
        ][k as usize]
    });
    if let Some(k) = kind {
        cs.close = Some((k, (k == PointKind::Group).then(|| format!("g{now}"))));
    }
    match jr.append(&cs) {
        Ok(a) => {
            assert_eq!(a.point.is_some(), kind.is_some());
            if kind.is_some() || sync {
                st.acked = a.seq;
            }
            st.log.push((a.seq, now, kind, cs));
        }
        Err(e) => {
            assert_eq!(e.code(), ErrorCode::RetentionVolumeFull, "{ctx}: {e}");
            fs.clear();
        }
    }
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultFs::new();
    let o = opts(Arc::new(fs.clone()), SEG);
    let mut j = Some(Journal::create(dir.path(), "vm", &specs(2), o.clone()).unwrap());
    let mut st = State {
        log: Vec::new(),
        acked: 0,
        pins: Vec::new(),
    };
    let mut now = 0u64;
    let mut out_n = 0;
    for (i, op) in ops.into_iter().enumerate() {
        let ctx = format!("step {i} {op:?}");
        let jr = j.as_mut().unwrap();
        match op {
            Op::Append {
                disk,
                block,
                blocks,
                zero,
                point,
                sync,
            } => {
                now += S;
                append(
                    jr, &mut st, &fs, now, disk, block, blocks, zero, point, sync, &ctx,
                );
            }
            Op::Full(n) => {
                // The volume fills up during the next append.
                fs.fail_at(n, Fault::NoSpace);
                now += S;
                append(
                    jr,
                    &mut st,
                    &fs,
                    now,
                    0,
                    n * 3,
                    3,
                    false,
                    Some(0),
                    false,
                    &ctx,
                );
                fs.clear();
            }
            Op::Seal => jr.seal().unwrap(),
            Op::Fold { window } => {
                let before: Vec<(u64, u64)> =
                    jr.points().iter().map(|p| (p.id, p.time_ns)).collect();
                jr.fold(now, window).unwrap();
                for (id, t) in before {
                    if t + window >= now {
                        assert!(
                            jr.point(id).is_ok(),
                            "{ctx}: point {id} inside the window removed"
                        );
                    }
                }
            }
            Op::Pin(k) => {
                if !jr.points().is_empty() {
                    let p = jr.points()[k % jr.points().len()].id;
                    jr.pin(p, "op").unwrap();
                    st.pins.push(p);
                }
            }
            Op::Unpin => {
                if let Some(p) = st.pins.pop() {
                    jr.unpin(p, "op").unwrap();
                    st.pins.retain(|q| *q != p);
                }
            }
            Op::Crash { seed, after_ops } => {
                // Optionally the crash interrupts a burst of appends and a fold.
                if let Some(n) = after_ops {
                    fs.fail_at(n, Fault::Crash);
                    for _ in 0..3 {
                        now += S;
                        let cs = Changeset::new()
                            .write(0, (now / S % 60) * 4096, data(now, 2))
                            .at(now)
                            .point(PointKind::CrashConsistent);
                        match jr.append(&cs) {
                            Ok(a) => {
                                st.acked = a.seq;
                                st.log
                                    .push((a.seq, now, Some(PointKind::CrashConsistent), cs));
                            }
                            Err(_) => {
                                // Not acknowledged: it may or may not survive.
                                let seq = jr.last_seq() + 2;
                                st.log
                                    .push((seq, now, Some(PointKind::CrashConsistent), cs));
                                break;
                            }
                        }
                    }
                    let _ = jr.fold(now, 5 * S);
                }
                drop(j.take());
                fs.power_loss(seed);
                let nj = Journal::open(dir.path(), "vm", o.clone())
                    .unwrap_or_else(|e| panic!("{ctx}: reopen: {e}"));
                assert!(nj.problems().is_empty(), "{ctx}: {:?}", nj.problems());
                assert!(
                    nj.last_seq() >= st.acked,
                    "{ctx}: acknowledged seq {} lost (last {})",
                    st.acked,
                    nj.last_seq()
                );
                st.log.retain(|l| l.0 <= nj.last_seq());
                st.acked = nj.last_seq();
                j = Some(nj);
            }
            Op::Reopen => {
                drop(j.take());
                j = Some(Journal::open(dir.path(), "vm", o.clone()).unwrap());
            }
            Op::Materialise(k) => {
                if !jr.points().is_empty() {
                    let p = jr.points()[k % jr.points().len()].id;
                    out_n += 1;
                    let paths = vec![
                        dir.path().join(format!("m{out_n}a")),
                        dir.path().join(format!("m{out_n}b")),
                    ];
                    jr.materialise(p, &Target::NewFiles(paths.clone())).unwrap();
                    let want = st.disks_at(p);
                    for (d, path) in paths.iter().enumerate() {
                        assert!(
                            std::fs::read(path).unwrap() == want[d],
                            "{ctx}: materialised point {p} disk {d}"
                        );
                    }
                }
            }
        }
        check(j.as_ref().unwrap(), &st, &ctx);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(32),
        ..ProptestConfig::default()
    })]
    #[test]
    fn journal_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        run(ops);
    }
}
