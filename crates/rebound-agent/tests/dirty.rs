//! Dirty tracking: exact marks, markers, acknowledgement, restart, crash
//! recovery, torn state, locking, and no lost marks under concurrency.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use rebound_agent::{AgentError, DirtyTracker, DiskExport, ExportSpec, Marker, REGION_SIZE};
use rebound_nbd::{BlockDevice, ZeroFlags};
use std::collections::BTreeSet;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const MIB: u64 = 1 << 20;

fn write(t: &DirtyTracker, range: Range<u64>) {
    let g = t.begin_write(range).unwrap();
    drop(g);
}

/// Open a fresh tracker with nothing marked.
fn clean_tracker(path: &Path, size: u64) -> DirtyTracker {
    let (t, r) = DirtyTracker::open(path, size).unwrap();
    assert!(r.all_marked, "a new state marks everything");
    assert_eq!(r.dirty_leaves, t.leaf_count());
    let m = t.barrier().unwrap();
    let all = t.changed_since(Marker::ORIGIN);
    assert_eq!(all, vec![0..t.leaf_count()]);
    assert_eq!(t.acknowledge(m, &all), t.leaf_count());
    assert_eq!(t.dirty_count(), 0);
    t
}

fn leaves(runs: &[Range<u64>]) -> BTreeSet<u64> {
    runs.iter().flat_map(|r| r.clone()).collect()
}

#[test]
fn marks_exactly_the_touched_leaves_and_answers_since_marker() {
    let dir = tempfile::tempdir().unwrap();
    let t = clean_tracker(&dir.path().join("d.dirty"), 64 * MIB + 1000);
    assert_eq!(t.leaf_count(), 64 * 256 + 1);
    write(&t, 5000..5001); // leaf 1
    write(&t, 8192..16384); // leaves 2, 3
    write(&t, 64 * MIB..64 * MIB + 1000); // the partial last leaf
    assert_eq!(
        t.changed_since(Marker::ORIGIN),
        vec![1..4, 64 * 256..64 * 256 + 1]
    );
    let m1 = t.barrier().unwrap();
    assert!(t.changed_since(m1).is_empty());
    write(&t, 2000 * 4096..2001 * 4096); // leaf 2000, chunk 1
    assert_eq!(t.changed_since(m1), vec![2000..2001]);
    assert_eq!(leaves(&t.changed_since(Marker::ORIGIN)).len(), 5);

    // Acknowledge at m2 while leaf 2 is rewritten after m2: chunk 0 stays
    // marked (4 MiB precision), chunk 1 and the last chunk are cleared.
    let m2 = t.barrier().unwrap();
    let shipped = t.changed_since(Marker::ORIGIN);
    write(&t, 2 * 4096..3 * 4096);
    t.acknowledge(m2, &shipped);
    assert!(t.is_dirty(2));
    assert!(t.is_dirty(1) && t.is_dirty(3));
    assert!(!t.is_dirty(2000));
    assert!(!t.is_dirty(64 * 256));
    // The next round clears the rest.
    let m3 = t.barrier().unwrap();
    let shipped = t.changed_since(m2);
    assert_eq!(shipped, vec![1..4]);
    t.acknowledge(m3, &shipped);
    assert_eq!(t.dirty_count(), 0);
    assert!(m1 < m2 && m2 < m3);
}

#[test]
fn clean_restart_keeps_marks_and_markers_keep_increasing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.dirty");
    let t = clean_tracker(&p, 256 * MIB);
    write(&t, 100 * MIB..100 * MIB + 4096);
    let m = t.barrier().unwrap();
    write(&t, 200 * MIB..200 * MIB + 8192);
    let before = t.changed_since(Marker::ORIGIN);
    t.close().unwrap();
    assert!(matches!(t.begin_write(0..1), Err(AgentError::Closed)));
    drop(t);
    let (t, r) = DirtyTracker::open(&p, 256 * MIB).unwrap();
    assert!(!r.all_marked && !r.unclean);
    assert_eq!(r.regions_recovered, 0);
    assert_eq!(t.changed_since(Marker::ORIGIN), before);
    assert_eq!(t.changed_since(m), vec![200 * 256..200 * 256 + 2]);
    assert!(t.barrier().unwrap() > m);
}

#[test]
fn crash_marks_every_region_that_may_hold_unpersisted_writes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.dirty");
    let t = clean_tracker(&p, 4 * REGION_SIZE);
    t.close().unwrap();
    drop(t);
    let (t, _) = DirtyTracker::open(&p, 4 * REGION_SIZE).unwrap();
    let m = t.barrier().unwrap();
    // Written after the last persist, then the agent dies (no close).
    write(&t, REGION_SIZE + 12_288..REGION_SIZE + 16_384);
    assert_eq!(t.intent_regions(), 1);
    drop(t);
    let (t, r) = DirtyTracker::open(&p, 4 * REGION_SIZE).unwrap();
    assert!(r.unclean && !r.all_marked);
    assert_eq!(r.regions_recovered, 1);
    let per_region = REGION_SIZE / 4096;
    assert_eq!(
        t.changed_since(Marker::ORIGIN),
        vec![per_region..2 * per_region]
    );
    assert_eq!(t.changed_since(m), vec![per_region..2 * per_region]);
}

#[test]
fn idle_regions_leave_the_intent_and_persisted_marks_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.dirty");
    let t = clean_tracker(&p, 4 * REGION_SIZE);
    write(&t, 3 * REGION_SIZE..3 * REGION_SIZE + 4096);
    // Flush-driven persists never release intent.
    t.persist().unwrap();
    t.persist().unwrap();
    assert_eq!(t.intent_regions(), 1);
    t.checkpoint().unwrap();
    // Touched in the interval that just ended: kept one more interval.
    assert_eq!(t.intent_regions(), 1);
    t.checkpoint().unwrap();
    assert_eq!(t.intent_regions(), 0);
    drop(t); // crash
    let (t, r) = DirtyTracker::open(&p, 4 * REGION_SIZE).unwrap();
    assert!(r.unclean);
    assert_eq!(r.regions_recovered, 0);
    let first = 3 * REGION_SIZE / 4096;
    assert_eq!(t.changed_since(Marker::ORIGIN), vec![first..first + 1]);
}

#[test]
fn torn_or_foreign_state_marks_everything() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.dirty");
    let t = clean_tracker(&p, 16 * MIB);
    let old_marker = t.barrier().unwrap();
    t.close().unwrap();
    drop(t);
    // Damage both header slots.
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&[0xee; 16], 40).unwrap();
    f.write_all_at(&[0xee; 16], 4096 + 40).unwrap();
    drop(f);
    let (t, r) = DirtyTracker::open(&p, 16 * MIB).unwrap();
    assert!(r.all_marked);
    assert_eq!(t.dirty_count(), t.leaf_count());
    // Markers from before the loss still see everything as changed.
    assert_eq!(t.changed_since(old_marker), vec![0..t.leaf_count()]);
    assert!(t.barrier().unwrap() > old_marker);
    t.close().unwrap();
    drop(t);
    // Another disk size: the state is not ours.
    let (t, r) = DirtyTracker::open(&p, 32 * MIB).unwrap();
    assert!(r.all_marked);
    assert_eq!(t.dirty_count(), 32 * 256);
}

#[test]
fn one_tracker_per_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.dirty");
    let (_t, _) = DirtyTracker::open(&p, MIB).unwrap();
    let err = DirtyTracker::open(&p, MIB)
        .err()
        .expect("second open must fail");
    assert!(matches!(err, AgentError::StateLocked { .. }));
    assert_eq!(
        rebound_types::Coded::code(&err),
        rebound_types::ErrorCode::DirtyStateLocked
    );
}

/// Writers bump a per-leaf version (the "data") inside their guard; a
/// replicator repeatedly takes a barrier, "ships" the versions of the dirty
/// leaves and acknowledges. Afterwards, every leaf that is not marked must
/// have been shipped at its final version: no write is ever lost.
#[test]
fn no_write_is_lost_between_marking_and_acknowledging() {
    let dir = tempfile::tempdir().unwrap();
    // 64 chunks, written sparsely: acknowledgements clear some chunks and
    // keep others, and writes keep landing between shipping and acknowledging.
    let size = 256 * MIB;
    let t = Arc::new(clean_tracker(&dir.path().join("d.dirty"), size));
    let n = (size / 4096) as usize;
    let version: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let shipped: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let cleared = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for seed in 0..3u64 {
        let (t, version) = (t.clone(), version.clone());
        writers.push(std::thread::spawn(move || {
            let mut x = seed * 7919 + 1;
            // Time-based so that writes overlap many replication rounds.
            let until = std::time::Instant::now() + std::time::Duration::from_millis(500);
            while std::time::Instant::now() < until {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let leaf = (x >> 33) as usize % n;
                let g = t
                    .begin_write(leaf as u64 * 4096..leaf as u64 * 4096 + 4096)
                    .unwrap();
                version[leaf].fetch_add(1, Ordering::SeqCst);
                drop(g);
                std::thread::sleep(std::time::Duration::from_micros(300));
            }
        }));
    }
    let replicator = {
        let (t, version, shipped, stop, cleared) = (
            t.clone(),
            version.clone(),
            shipped.clone(),
            stop.clone(),
            cleared.clone(),
        );
        std::thread::spawn(move || {
            let mut rounds = 0;
            while !stop.load(Ordering::SeqCst) || rounds < 2 {
                let m = t.barrier().unwrap();
                let runs = t.changed_since(Marker::ORIGIN);
                for l in leaves(&runs) {
                    shipped[l as usize]
                        .store(version[l as usize].load(Ordering::SeqCst), Ordering::SeqCst);
                }
                // Widen the window in which writes race the acknowledgement.
                std::thread::sleep(std::time::Duration::from_millis(3));
                cleared.fetch_add(t.acknowledge(m, &runs), Ordering::SeqCst);
                if stop.load(Ordering::SeqCst) {
                    rounds += 1;
                }
            }
        })
    };
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    replicator.join().unwrap();
    assert!(cleared.load(Ordering::SeqCst) > 0);
    // Once writes stop, replication rounds converge to nothing marked.
    assert_eq!(t.dirty_count(), 0);
    for l in 0..n {
        if !t.is_dirty(l as u64) {
            assert_eq!(
                shipped[l].load(Ordering::SeqCst),
                version[l].load(Ordering::SeqCst),
                "leaf {l} is clear but its last write was never shipped"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn marks_match_a_model(ranges in proptest::collection::vec((0u64..8 * MIB, 1u64..300_000), 1..20)) {
        let dir = tempfile::tempdir().unwrap();
        let size = 8 * MIB;
        let t = clean_tracker(&dir.path().join("d.dirty"), size);
        let mut model = BTreeSet::new();
        for (start, len) in ranges {
            let end = (start + len).min(size);
            write(&t, start..end);
            model.extend(start / 4096..end.div_ceil(4096));
        }
        prop_assert_eq!(leaves(&t.changed_since(Marker::ORIGIN)), model.clone());
        prop_assert_eq!(t.dirty_count(), model.len() as u64);
    }
}

#[test]
fn export_marks_writes_trims_and_zeroes_and_flush_is_a_barrier() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(32 * MIB).unwrap();
    drop(f);
    let spec = ExportSpec {
        name: "disk".into(),
        path: img.clone(),
        read_only: false,
        state_dir: None,
    };
    let (e, r) = DiskExport::open(&spec).unwrap();
    assert!(r.unwrap().all_marked);
    let t = e.tracker().unwrap();
    let m = t.barrier().unwrap();
    t.acknowledge(m, &t.changed_since(Marker::ORIGIN));
    e.write(4096, &[1u8; 100], false).unwrap();
    e.write_zeroes(
        MIB..MIB + 8192,
        ZeroFlags {
            no_hole: true,
            fast: false,
            fua: true,
        },
    )
    .unwrap();
    e.trim(2 * MIB..2 * MIB + 4096, false).unwrap();
    let barriers = t.barrier_count();
    e.flush().unwrap();
    assert_eq!(t.barrier_count(), barriers + 1);
    let mut expect = vec![1..2, 256..258];
    // Trim is advisory: marked only where the filesystem punched a hole.
    if t.is_dirty(512) {
        expect.push(512..513);
    }
    assert_eq!(t.changed_since(Marker::ORIGIN), expect);
    let mut buf = [0u8; 100];
    e.read(4096, &mut buf).unwrap();
    assert_eq!(buf, [1u8; 100]);
    // The state file sits beside the image by default.
    assert!(dir.path().join("disk.img.dirty").exists());
    e.close().unwrap();
    assert!(e.write(0, &[1], false).is_err());
}
