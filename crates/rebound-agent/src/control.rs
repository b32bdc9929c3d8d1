//! The change stream's control: what the agent does with its [`Capture`] and
//! [`Spool`] on every tick of its loop, given what it knows of the item
//! (should it replicate, how far the master target applied, a gap), of the
//! outbox and of the shipper. It starts and stops the stream, climbs down
//! and up the overload ladder, closes recovery points at their intervals and
//! clears the marks of applied points. No IO of its own beyond the spool's:
//! the node feeds it and runs the freeze/thaw hooks it asks for.

use crate::capture::{Capture, Mode};
use crate::changeset::Closes;
use crate::spool::Spool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Which rung of the overload ladder the stream is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rung {
    Streaming,
    Backlogged,
    Resyncing,
}

/// The master target's progress on this agent's stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub applied_seq: u64,
    /// The apply stopped: it expected this sequence number next.
    pub gap_expected: Option<u64>,
    /// What it found instead.
    pub gap_found: Option<u64>,
}

/// What the agent knows this tick.
#[derive(Clone, Debug)]
pub struct Inputs {
    /// The agent replicates its item now (it is the item's source).
    pub want: bool,
    pub progress: Option<Progress>,
    pub outbox_bytes: u64,
    pub outbox_limit: u64,
    /// The shipper's last push failed.
    pub shipping_failed: bool,
    pub crash_every: Duration,
    /// App-consistent interval; `None` when the machine has no hooks.
    pub app_every: Option<Duration>,
    /// The item belongs to a replication group: points close at multiples
    /// of `crash_every` on the wall clock, as group points.
    pub group: bool,
    /// Now on the wall clock (ns since the epoch).
    pub wall_ns: u64,
}

/// A member closes a group point at most this late after the agreed time;
/// later, it closes a plain point (the marker is then not common).
pub const GROUP_LATE: Duration = Duration::from_millis(25);

/// Clock difference allowed between the members' hosts
/// (`REBOUND_CLOCK_SKEW_MS`, default 5 ms: hosts on one site's NTP).
pub fn clock_skew() -> Duration {
    Duration::from_millis(
        std::env::var("REBOUND_CLOCK_SKEW_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5),
    )
}

/// Why the stream (re)started with a resync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    /// Replication begins (or resumes after a pause or a sync).
    Start,
    /// The outbox drained after an overflow.
    Drained,
    /// The master target found a gap at this sequence number.
    Gap(u64),
}

/// What a tick did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tick {
    pub restarted: Option<Restart>,
    pub paused: bool,
    /// The point whose marks were cleared.
    pub acked: Option<u64>,
    /// A crash-consistent point was closed.
    pub point: bool,
    /// An app-consistent point is due: run freeze, [`StreamControl::app_point`], thaw.
    pub app_due: bool,
    pub rung_changed: Option<(Rung, Rung)>,
}

pub struct StreamControl {
    capture: Arc<Capture>,
    spool: Spool,
    /// A gap reported at or below this was made before the last restart,
    /// which covers it (the restart's first file is at least this).
    restart_floor: u64,
    restarted_at: Option<Instant>,
    last_point: Option<Instant>,
    last_app: Option<Instant>,
    /// The last agreed group time handled.
    last_group_ns: u64,
    rung: Rung,
    /// The master target's last applied sequence number, and since when.
    applied: (u64, Instant),
}

/// A gap still reported this long after a restart is a new one.
const GAP_RETRY: Duration = Duration::from_secs(30);

/// Backlog under which the stream counts as streaming.
pub const STREAMING_BACKLOG: u64 = 128 << 20;

impl StreamControl {
    pub fn new(capture: Arc<Capture>, spool: Spool) -> StreamControl {
        StreamControl {
            capture,
            spool,
            restart_floor: 0,
            restarted_at: None,
            last_point: None,
            last_app: None,
            last_group_ns: 0,
            rung: Rung::Resyncing,
            applied: (0, Instant::now()),
        }
    }

    pub fn capture(&self) -> &Arc<Capture> {
        &self.capture
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    pub fn rung(&self) -> Rung {
        self.rung
    }

    /// Last sequence number the master target reported applied.
    pub fn applied_seq(&self) -> u64 {
        self.applied.0
    }

    /// Bytes captured and not yet handed to the process server.
    pub fn backlog(&self, outbox_bytes: u64) -> u64 {
        self.capture.queued_bytes() + outbox_bytes
    }

    fn restart(&mut self, now: Instant, why: Restart) -> Option<Restart> {
        self.restart_floor = self.spool.assigned() + 1;
        self.restarted_at = Some(now);
        self.capture.start();
        Some(why)
    }

    pub fn tick(&mut self, now: Instant, i: &Inputs) -> Tick {
        let mut t = Tick::default();
        match (i.want, self.capture.mode()) {
            (false, Mode::Off) => {}
            (false, _) => {
                info!("replication paused: writes are only marked");
                self.capture.stop();
                t.paused = true;
            }
            (true, Mode::Off) => {
                info!("change stream starts: resync of the marked leaves, then every write");
                t.restarted = self.restart(now, Restart::Start);
            }
            (true, Mode::Overflowed) if i.outbox_bytes <= i.outbox_limit / 2 => {
                info!("the outbox drained: resync of the leaves marked meanwhile");
                t.restarted = self.restart(now, Restart::Drained);
            }
            (true, _) => {}
        }
        if let Some(p) = i.progress {
            if p.applied_seq != self.applied.0 {
                self.applied = (p.applied_seq, now);
            }
            if let Some(seq) = self.spool.applied(p.applied_seq) {
                for tr in self.capture.trackers() {
                    if let Err(e) = tr.persist() {
                        warn!(error = %e, "persisting the dirty state failed");
                    }
                }
                debug!(seq, "marks cleared up to an applied point");
                t.acked = Some(seq);
            }
            // A gap at or below the floor predates the last restart, unless
            // the master target found files of the restart after it (the
            // restart's first files were lost), or it outlives the restart.
            let retry = self
                .restarted_at
                .is_none_or(|r| now.duration_since(r) > GAP_RETRY);
            let after_restart = p.gap_found.is_some_and(|f| f >= self.restart_floor);
            if let Some(g) = p.gap_expected
                && i.want
                && t.restarted.is_none()
                && (g > self.restart_floor || after_restart || retry)
            {
                warn!(
                    expected = g,
                    "the master target found a gap in the stream: resync of every leaf not applied"
                );
                t.restarted = self.restart(now, Restart::Gap(g));
            }
        }
        if i.want {
            let ready = self.capture.mode() == Mode::On && !self.capture.resync_pending();
            let due = |last: Option<Instant>, every: Duration| {
                last.is_none_or(|l| now.duration_since(l) >= every)
            };
            if ready && i.app_every.is_some_and(|a| due(self.last_app, a)) {
                t.app_due = true;
            } else if i.group {
                let every = i.crash_every.as_nanos().max(1) as u64;
                let at = i.wall_ns / every * every;
                if at > self.last_group_ns {
                    self.last_group_ns = at;
                    let closed = self
                        .capture
                        .group_barrier(at, GROUP_LATE, clock_skew())
                        .or_else(|| {
                            // Too late for the group (or not ready): a
                            // point of this item alone.
                            self.capture.barrier(Closes::CrashConsistent)
                        });
                    if closed.is_some() {
                        self.last_point = Some(now);
                        t.point = true;
                    }
                }
            } else if due(self.last_point, i.crash_every)
                && self.capture.barrier(Closes::CrashConsistent).is_some()
            {
                self.last_point = Some(now);
                t.point = true;
            }
        }
        let rung = self.rung_now(now, i);
        if rung != self.rung {
            info!(from = ?self.rung, to = ?rung, backlog = self.backlog(i.outbox_bytes), "replication state changed");
            t.rung_changed = Some((self.rung, rung));
            self.rung = rung;
        }
        t
    }

    /// Close an app-consistent point (`closes` is crash-consistent when the
    /// freeze hook failed). Returns whether a point closed.
    pub fn app_point(&mut self, now: Instant, closes: Closes) -> bool {
        self.last_app = Some(now);
        let closed = self.capture.barrier(closes).is_some();
        if closed {
            self.last_point = Some(now);
        }
        closed
    }

    fn rung_now(&self, now: Instant, i: &Inputs) -> Rung {
        if self.capture.mode() == Mode::Overflowed || self.capture.resync_pending() {
            return Rung::Resyncing;
        }
        // Points close but none is applied for a while: the backlog is past
        // the process server (its cache holds it).
        let lags = self.spool.last_closed() > self.applied.0 + 2
            && now.duration_since(self.applied.1)
                > (i.crash_every * 3).max(Duration::from_secs(10));
        if self.backlog(i.outbox_bytes) > STREAMING_BACKLOG || i.shipping_failed || lags {
            Rung::Backlogged
        } else {
            Rung::Streaming
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::SpoolConfig;
    use crate::{DiskExport, ExportSpec, Marker};
    use rebound_nbd::BlockDevice;

    const SIZE: u64 = 1 << 20;

    struct Fixture {
        _dir: tempfile::TempDir,
        export: Arc<DiskExport>,
        ctl: StreamControl,
        outbox: std::path::PathBuf,
    }

    fn fixture(queue: u64) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d0");
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(SIZE))
            .expect("disk");
        let (e, _) = DiskExport::open(&ExportSpec {
            name: "d0".into(),
            path: path.clone(),
            read_only: false,
            state_dir: Some(dir.path().to_path_buf()),
        })
        .expect("export");
        let e = Arc::new(e);
        let t = e.tracker().cloned().expect("tracker");
        t.acknowledge(Marker(u64::MAX), std::slice::from_ref(&(0..t.leaf_count())));
        let capture = Capture::new(vec![t], queue);
        e.attach_capture(capture.clone(), 0);
        let outbox = dir.path().join("outbox");
        let spool = Spool::start(
            SpoolConfig {
                outbox: outbox.clone(),
                disks: vec![path],
                disk_sizes: vec![SIZE],
                file_cap: 1 << 20,
                outbox_limit: 1 << 20,
                last_seq: 0,
            },
            capture.clone(),
        )
        .expect("spool");
        Fixture {
            _dir: dir,
            export: e,
            ctl: StreamControl::new(capture, spool),
            outbox,
        }
    }

    fn inputs(f: &Fixture) -> Inputs {
        Inputs {
            want: true,
            progress: None,
            outbox_bytes: crate::changeset::queued_bytes(&f.outbox),
            outbox_limit: 1 << 20,
            shipping_failed: false,
            crash_every: Duration::from_secs(1),
            app_every: None,
            group: false,
            wall_ns: 0,
        }
    }

    /// Tick until `cond` or a deadline (the spooler works on its thread).
    fn until(f: &mut Fixture, mut now: Instant, cond: impl Fn(&StreamControl) -> bool) -> Instant {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond(&f.ctl) {
            assert!(Instant::now() < deadline, "condition never held");
            std::thread::sleep(Duration::from_millis(5));
            now += Duration::from_millis(5);
            let i = inputs(f);
            f.ctl.tick(now, &i);
        }
        now
    }

    #[test]
    fn starts_with_a_resync_then_streams_and_closes_points() {
        let mut f = fixture(64 << 20);
        let t0 = Instant::now();
        let i = inputs(&f);
        let t = f.ctl.tick(t0, &i);
        assert_eq!(t.restarted, Some(Restart::Start));
        assert_eq!(f.ctl.rung(), Rung::Resyncing);
        let now = until(&mut f, t0, |c| c.rung() == Rung::Streaming);
        // Points at the interval, none before it.
        let i = inputs(&f);
        let t = f.ctl.tick(now + Duration::from_secs(2), &i);
        assert!(t.point);
        let t = f.ctl.tick(now + Duration::from_millis(2100), &i);
        assert!(!t.point, "no second point within the interval");
        // Not replicating any more: paused, writes only marked.
        let mut i = inputs(&f);
        i.want = false;
        assert!(f.ctl.tick(now + Duration::from_secs(3), &i).paused);
        assert_eq!(f.ctl.capture().mode(), Mode::Off);
    }

    #[test]
    fn an_applied_point_clears_its_marks_and_a_gap_restarts_once() {
        let mut f = fixture(64 << 20);
        let t0 = Instant::now();
        let i = inputs(&f);
        f.ctl.tick(t0, &i);
        let now = until(&mut f, t0, |c| c.rung() == Rung::Streaming);
        f.export.write(8192, &[1; 4096], false).expect("write");
        let tr = f.ctl.capture().trackers()[0].clone();
        assert!(tr.is_dirty(2));
        let i = inputs(&f);
        let now = now + Duration::from_secs(2);
        assert!(f.ctl.tick(now, &i).point);
        let now = until(&mut f, now, |c| c.spool().floor() > c.spool().assigned());
        let seq = f.ctl.spool().last_closed();
        let mut i = inputs(&f);
        i.progress = Some(Progress {
            applied_seq: seq,
            gap_expected: None,
            gap_found: None,
        });
        assert_eq!(f.ctl.tick(now, &i).acked, Some(seq));
        assert!(!tr.is_dirty(2), "applied: the mark is cleared");
        // A gap after the last restart restarts the stream; the same report
        // again does not (the restart covers it).
        i.progress = Some(Progress {
            applied_seq: seq,
            gap_expected: Some(seq + 1),
            gap_found: Some(seq + 1),
        });
        assert_eq!(f.ctl.tick(now, &i).restarted, Some(Restart::Gap(seq + 1)));
        // Reported again from before the restart (nothing found past it).
        i.progress = Some(Progress {
            applied_seq: seq,
            gap_expected: Some(seq + 1),
            gap_found: None,
        });
        assert_eq!(f.ctl.tick(now, &i).restarted, None);
        // Unless files after the restart are found past the gap (the
        // restart's first files were lost), or it outlives the restart.
        let floor = f.ctl.restart_floor;
        i.progress = Some(Progress {
            applied_seq: seq,
            gap_expected: Some(seq + 1),
            gap_found: Some(floor + 1),
        });
        assert_eq!(f.ctl.tick(now, &i).restarted, Some(Restart::Gap(seq + 1)));
        i.progress = Some(Progress {
            applied_seq: seq,
            gap_expected: Some(seq + 1),
            gap_found: None,
        });
        let later = now + GAP_RETRY + Duration::from_secs(1);
        assert_eq!(f.ctl.tick(later, &i).restarted, Some(Restart::Gap(seq + 1)));
    }

    #[test]
    fn the_ladder_overflows_into_the_bitmap_and_climbs_back() {
        let mut f = fixture(16 << 10);
        let t0 = Instant::now();
        let i = inputs(&f);
        f.ctl.tick(t0, &i);
        let mut now = until(&mut f, t0, |c| c.rung() == Rung::Streaming);
        // A write larger than the queue: it overflows, the write is only
        // marked.
        f.export.write(0, &[9; 65536], false).expect("write");
        assert!(f.ctl.capture().trackers()[0].is_dirty(15));
        // The outbox is full (the process server is away).
        let mut i = inputs(&f);
        i.outbox_bytes = i.outbox_limit;
        let t = f.ctl.tick(now, &i);
        assert_eq!(f.ctl.capture().mode(), Mode::Overflowed, "{t:?}");
        assert_eq!(f.ctl.rung(), Rung::Resyncing);
        assert!(f.ctl.capture().barrier(Closes::CrashConsistent).is_none());
        // Still full: no restart yet.
        assert_eq!(f.ctl.tick(now, &i).restarted, None);
        // The shipper drains the outbox: a resync, then streaming again.
        for (_, p) in crate::changeset::queued(&f.outbox).expect("queued") {
            std::fs::remove_file(p).expect("rm");
        }
        let i = inputs(&f);
        assert_eq!(f.ctl.tick(now, &i).restarted, Some(Restart::Drained));
        now = until(&mut f, now, |c| c.rung() == Rung::Streaming);
        // A failing shipper shows as backlogged.
        let mut i = inputs(&f);
        i.shipping_failed = true;
        let t = f.ctl.tick(now, &i);
        assert_eq!(t.rung_changed, Some((Rung::Streaming, Rung::Backlogged)));
    }
}
