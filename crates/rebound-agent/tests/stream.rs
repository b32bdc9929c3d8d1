//! The change stream end to end inside the agent: writes through a real
//! export, barriers, overflows and live resyncs; the outbox's files applied
//! in order to a replica must give, at every point, exactly the source as
//! it was at that point's barrier.

use rebound_agent::changeset::{self, Closes, Record};
use rebound_agent::{
    Capture, CaptureMode, DiskExport, ExportSpec, Spool, SpoolConfig, StreamOwner,
};
use rebound_nbd::BlockDevice;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: u64 = 1 << 20;

type R = Result<(), Box<dyn std::error::Error>>;

fn export(dir: &Path, name: &str) -> Result<Arc<DiskExport>, Box<dyn std::error::Error>> {
    let path = dir.join(name);
    std::fs::File::create(&path)?.set_len(SIZE)?;
    let (e, _) = DiskExport::open(&ExportSpec {
        name: name.into(),
        path,
        read_only: false,
        state_dir: Some(dir.to_path_buf()),
    })?;
    Ok(Arc::new(e))
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// Apply files in sequence order as they become durable; check every point.
struct Applier {
    replicas: Vec<std::fs::File>,
    next: u64,
    points: u64,
    restarts: u64,
    last_point_at: u64,
    /// The spool's file cap: no file carries more data.
    cap: u64,
}

impl Applier {
    fn apply_ready(
        &mut self,
        outbox: &Path,
        floor: u64,
        snaps: &HashMap<u64, Vec<Vec<u8>>>,
        spool: &Spool,
    ) -> R {
        while self.next < floor {
            let p = outbox.join(changeset::file_name(self.next));
            let h = changeset::verify(&p)?;
            assert_eq!(h.seq, self.next, "contiguous sequence numbers");
            if h.restart {
                self.restarts += 1;
            }
            let mut data_bytes = 0u64;
            changeset::read_records(&p, |r| {
                match r {
                    Record::Data { disk, offset, data } => {
                        data_bytes += data.len() as u64;
                        self.replicas[disk as usize].write_all_at(&data, offset)?
                    }
                    Record::Zero { disk, offset, len } => self.replicas[disk as usize]
                        .write_all_at(&vec![0u8; len as usize], offset)?,
                }
                Ok(())
            })?;
            assert!(
                data_bytes <= self.cap,
                "file {} carries {data_bytes} bytes",
                h.seq
            );
            if h.closes != Closes::Nothing {
                let want = snaps
                    .get(&h.barrier_ns)
                    .ok_or("a point whose barrier the test did not take")?;
                for (d, w) in want.iter().enumerate() {
                    let mut got = vec![0u8; SIZE as usize];
                    self.replicas[d].read_exact_at(&mut got, 0)?;
                    assert!(
                        got == *w,
                        "point {} (disk {d}) differs from the source at its barrier",
                        h.seq
                    );
                }
                self.points += 1;
                self.last_point_at = h.barrier_ns;
                spool.applied(h.seq);
            }
            std::fs::remove_file(&p)?;
            self.next += 1;
        }
        Ok(())
    }
}

fn snapshot(dir: &Path) -> Result<Vec<Vec<u8>>, std::io::Error> {
    Ok(vec![
        std::fs::read(dir.join("d0"))?,
        std::fs::read(dir.join("d1"))?,
    ])
}

fn run(limit: u64, file_cap: u64, rounds: usize) -> R {
    let dir = tempfile::tempdir()?;
    let exports = [export(dir.path(), "d0")?, export(dir.path(), "d1")?];
    let trackers: Vec<_> = exports
        .iter()
        .filter_map(|e| e.tracker().cloned())
        .collect();
    // A new tracker marks everything; pretend an initial sync took it.
    for t in &trackers {
        let all = 0..t.leaf_count();
        t.acknowledge(rebound_agent::Marker(u64::MAX), std::slice::from_ref(&all));
    }
    let capture = Capture::new(trackers.clone(), limit);
    for (i, e) in exports.iter().enumerate() {
        assert!(e.attach_capture(capture.clone(), i as u16));
    }
    let outbox = dir.path().join("outbox");
    let spool = Spool::start(
        SpoolConfig {
            outbox: outbox.clone(),
            disks: vec![dir.path().join("d0"), dir.path().join("d1")],
            disk_sizes: vec![SIZE, SIZE],
            file_cap,
            outbox_limit: u64::MAX,
            last_seq: 0,
        },
        capture.clone(),
    )?;
    spool.set_owner(Some(StreamOwner {
        item: "vm".into(),
        agent: "a".into(),
    }));
    let mut ap = Applier {
        replicas: vec![
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join("r0"))?,
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join("r1"))?,
        ],
        next: 1,
        points: 0,
        restarts: 0,
        last_point_at: 0,
        cap: file_cap,
    };
    for r in &ap.replicas {
        r.set_len(SIZE)?;
    }
    // Some data before replication starts: the first resync ships it.
    exports[0].write(0, &[7u8; 65536], false)?;
    capture.start();
    let mut snaps = HashMap::new();
    let mut rng = Lcg(42);
    let mut overflows = 0;
    for round in 0..rounds {
        // With a small queue, bursts overflow it and quiet rounds let the
        // resync finish and points close again.
        let writes = match (limit < 1 << 20, round % 10) {
            (true, 0) => 400,
            (true, _) => 8,
            (false, _) => 64,
        };
        for _ in 0..writes {
            let d = (rng.next() % 2) as usize;
            let off = (rng.next() % (SIZE / 512 - 16)) * 512;
            let len = ((rng.next() % 16) + 1) * 512;
            match rng.next() % 10 {
                0 => exports[d].write_zeroes(off..off + len, Default::default())?,
                1 => exports[d].trim(off..off + len, false)?,
                _ => exports[d].write(off, &vec![(round % 250 + 1) as u8; len as usize], false)?,
            }
        }
        if capture.mode() == CaptureMode::Overflowed {
            overflows += 1;
            capture.start();
        }
        if writes < 64 {
            // A quiet moment: the spooler catches up (the test's writer is
            // faster than its fsyncs).
            let until = Instant::now() + Duration::from_millis(200);
            while (capture.queued_bytes() > 0 || capture.resync_pending()) && Instant::now() < until
            {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        // The snapshot is taken with no write in flight (one writer), so it
        // is the disks at the barrier.
        if let Some(at) = capture.barrier(Closes::CrashConsistent) {
            snaps.insert(at, snapshot(dir.path())?);
        }
        ap.apply_ready(&outbox, spool.floor(), &snaps, &spool)?;
    }
    // Quiesce: wait for the resync to finish, then close a last point.
    let deadline = Instant::now() + Duration::from_secs(20);
    let last = loop {
        if capture.mode() == CaptureMode::Overflowed {
            capture.start();
        }
        if let Some(at) = capture.barrier(Closes::CrashConsistent) {
            snaps.insert(at, snapshot(dir.path())?);
            break at;
        }
        ap.apply_ready(&outbox, spool.floor(), &snaps, &spool)?;
        assert!(
            Instant::now() < deadline,
            "the resync never finished: mode {:?}, spool failure {:?}",
            capture.mode(),
            spool.failure()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while ap.last_point_at != last {
        ap.apply_ready(&outbox, spool.floor(), &snaps, &spool)?;
        assert!(Instant::now() < deadline, "the last point never arrived");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(ap.points > 0);
    assert!(ap.restarts >= 1, "the first resync starts the stream");
    // Everything applied and acknowledged at the last point: no mark left.
    for t in &trackers {
        assert_eq!(
            t.dirty_count(),
            0,
            "marks left after the last point was applied"
        );
    }
    eprintln!(
        "points {} restarts {} overflows {overflows} files {}",
        ap.points,
        ap.restarts,
        ap.next - 1
    );
    if limit < 1 << 20 {
        assert!(overflows > 0, "the small queue never overflowed");
        assert!(
            ap.restarts > 1 && ap.points > 10,
            "points close between overflows"
        );
    }
    spool.stop();
    Ok(())
}

#[test]
fn every_point_is_the_source_at_its_barrier() -> R {
    run(64 << 20, 64 << 20, 300)
}

#[test]
fn small_files_split_stretches_without_closing_points() -> R {
    run(64 << 20, 16 << 10, 100)
}

#[test]
fn overflows_fall_back_to_the_bitmap_and_resync_live() -> R {
    run(128 << 10, 256 << 10, 300)
}

/// Acknowledgement races: writers keep writing while a barrier is taken and
/// acknowledged at once; every write the stream holds after the barrier
/// must still be marked (its leaves are not yet on the target).
#[test]
fn acknowledging_a_point_never_clears_a_later_write() -> R {
    use rebound_agent::capture::Entry;
    let dir = tempfile::tempdir()?;
    let e = export(dir.path(), "d0")?;
    let t = e.tracker().cloned().ok_or("tracker")?;
    let capture = Capture::new(vec![t.clone()], 1 << 30);
    e.attach_capture(capture.clone(), 0);
    capture.start();
    capture.resync_done(1);
    for round in 0..50u64 {
        let all = 0..t.leaf_count();
        t.acknowledge(rebound_agent::Marker(u64::MAX), std::slice::from_ref(&all));
        while capture.next(Duration::ZERO).is_some() {}
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for w in 0..3u64 {
                let (e, stop) = (&e, &stop);
                s.spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        let leaf = (w * 7919 + i * 104729 + round) % (SIZE / 4096);
                        let _ = e.write(leaf * 4096, &[w as u8 + 1; 4096], false);
                        i += 1;
                    }
                });
            }
            std::thread::sleep(Duration::from_millis(2));
            capture.barrier(Closes::CrashConsistent);
            std::thread::sleep(Duration::from_millis(2));
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        // Find the barrier's marker, acknowledge it, then check the writes
        // after it in the stream.
        let mut after = Vec::new();
        let mut marker = None;
        while let Some(x) = capture.next(Duration::ZERO) {
            match x {
                Entry::Barrier { markers, .. } => marker = markers.first().copied(),
                Entry::Write { offset, .. } if marker.is_some() => after.push(offset / 4096),
                _ => {}
            }
        }
        let m = marker.ok_or("no barrier")?;
        let all = 0..t.leaf_count();
        t.acknowledge(m, std::slice::from_ref(&all));
        for leaf in after {
            assert!(
                t.is_dirty(leaf),
                "round {round}: leaf {leaf} written after the point was cleared"
            );
        }
    }
    Ok(())
}

/// A restarted spool drops the half-written file a crash left and numbers
/// its files above everything the outbox may have used.
#[test]
fn a_restarted_spool_starts_above_its_ceiling_and_drops_torn_files() -> R {
    let dir = tempfile::tempdir()?;
    let e = export(dir.path(), "d0")?;
    let t = e.tracker().cloned().ok_or("tracker")?;
    let capture = Capture::new(vec![t], 1 << 20);
    let outbox = dir.path().join("outbox");
    std::fs::create_dir_all(&outbox)?;
    std::fs::write(outbox.join("00000000000000000007.cs.tmp"), b"torn")?;
    std::fs::write(rebound_agent::spool::seq_file(&outbox), b"9000")?;
    let last = rebound_agent::spool::last_seq(&outbox)?;
    assert_eq!(last, 9000);
    let spool = Spool::start(
        SpoolConfig {
            outbox: outbox.clone(),
            disks: vec![dir.path().join("d0")],
            disk_sizes: vec![SIZE],
            file_cap: 1 << 20,
            outbox_limit: u64::MAX,
            last_seq: last,
        },
        capture.clone(),
    )?;
    assert!(!outbox.join("00000000000000000007.cs.tmp").exists());
    capture.start();
    let deadline = Instant::now() + Duration::from_secs(10);
    while spool.last_closed() <= last {
        assert!(Instant::now() < deadline, "no file closed");
        std::thread::sleep(Duration::from_millis(5));
    }
    let q = changeset::queued(&outbox)?;
    assert!(q.first().is_some_and(|(s, _)| *s == 9001), "{q:?}");
    assert!(changeset::verify(&q[0].1)?.restart);
    spool.stop();
    Ok(())
}
