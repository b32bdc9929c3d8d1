//! A machine's raw disk exported over NBD, with dirty tracking in the write
//! path.

use crate::capture::Capture;
use crate::dirty::{DirtyTracker, Marker, OpenReport};
use crate::error::AgentError;
use rebound_disk::{Disk, DiskError, DiskKind, zeroing};
use rebound_nbd::{BlockDevice, Caps, DeviceError, Extent, ZeroFlags};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;
use tracing::{info, warn};

/// What to export.
#[derive(Clone, Debug)]
pub struct ExportSpec {
    /// Export name clients ask for.
    pub name: String,
    pub path: PathBuf,
    pub read_only: bool,
    /// Where the dirty-tracking state lives; `None`: beside an image file as
    /// `<image>.dirty` (block devices need a directory).
    pub state_dir: Option<PathBuf>,
}

impl ExportSpec {
    /// The default export name of a disk: its file name.
    pub fn default_name(path: &Path) -> String {
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string())
    }

    fn state_path(&self, kind: DiskKind) -> Result<PathBuf, AgentError> {
        match (&self.state_dir, kind) {
            (Some(dir), _) => Ok(dir.join(format!("{}.dirty", self.name))),
            (None, DiskKind::Image) => {
                let mut p = self.path.clone().into_os_string();
                p.push(".dirty");
                Ok(p.into())
            }
            (None, DiskKind::Block) => Err(AgentError::NoStateDir(self.path.clone())),
        }
    }
}

/// One exported disk.
pub struct DiskExport {
    name: String,
    disk: Disk,
    size: u64,
    read_only: bool,
    tracker: Option<Arc<DirtyTracker>>,
    /// The change stream, once the agent replicates: (capture, disk index).
    capture: OnceLock<(Arc<Capture>, u16)>,
}

fn dev_err(e: DiskError) -> DeviceError {
    match e {
        DiskError::NoSpace { .. } => DeviceError::NoSpace,
        DiskError::ReadOnly { .. } => DeviceError::NotPermitted(e.to_string()),
        other => DeviceError::Io(other.to_string()),
    }
}

fn agent_err(e: AgentError) -> DeviceError {
    match e {
        AgentError::Closed => DeviceError::Shutdown,
        // Untracked writes are refused: replication would miss them.
        other => DeviceError::Io(other.to_string()),
    }
}

impl DiskExport {
    /// Open the disk (and, for a writable export, its dirty tracking).
    pub fn open(spec: &ExportSpec) -> Result<(DiskExport, Option<OpenReport>), AgentError> {
        let disk = if spec.read_only {
            Disk::open_read(&spec.path)?
        } else {
            Disk::open_write(&spec.path, false)?
        };
        let size = disk.size()?;
        let (tracker, report) = if spec.read_only {
            (None, None)
        } else {
            let state = spec.state_path(disk.kind())?;
            let (t, r) = DirtyTracker::open(&state, size)?;
            (Some(Arc::new(t)), Some(r))
        };
        info!(export = %spec.name, path = %spec.path.display(), size, read_only = spec.read_only, "export opened");
        Ok((
            DiskExport {
                name: spec.name.clone(),
                disk,
                size,
                read_only: spec.read_only,
                tracker,
                capture: OnceLock::new(),
            },
            report,
        ))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The dirty tracker (writable exports only).
    pub fn tracker(&self) -> Option<&Arc<DirtyTracker>> {
        self.tracker.as_ref()
    }

    /// Copy every change into `capture` as disk `index` from now on (once).
    pub fn attach_capture(&self, capture: Arc<Capture>, index: u16) -> bool {
        self.capture.set((capture, index)).is_ok()
    }

    /// Capture the whole leaves around `range` as they are on disk now
    /// (an unaligned write: its partial leaves are read back).
    fn capture_readback(
        &self,
        c: &Capture,
        disk: u16,
        range: Range<u64>,
    ) -> Result<(), DeviceError> {
        let span = Capture::leaf_span(&range);
        let end = span
            .end
            .min(self.size.next_multiple_of(rebound_types::LEAF_SIZE));
        let mut buf = vec![0u8; (end - span.start) as usize];
        let avail = self.size.saturating_sub(span.start).min(buf.len() as u64) as usize;
        self.disk
            .read_at(&mut buf[..avail], span.start)
            .map_err(dev_err)?;
        c.write(disk, span.start, &buf);
        Ok(())
    }

    /// Capture a changed range: whole leaves of data, or of zeros.
    fn capture_change(&self, range: Range<u64>, data: Option<&[u8]>) -> Result<(), DeviceError> {
        let Some((c, disk)) = self.capture.get() else {
            return Ok(());
        };
        let leaf = rebound_types::LEAF_SIZE;
        let aligned = range.start.is_multiple_of(leaf) && range.end.is_multiple_of(leaf);
        match data {
            Some(d) if aligned => c.write(*disk, range.start, d),
            Some(_) => self.capture_readback(c, *disk, range)?,
            None => {
                // Zeros: the aligned interior as a zero range, the edges read back.
                let inner = range.start.next_multiple_of(leaf)..(range.end / leaf) * leaf;
                if inner.start >= inner.end {
                    return self.capture_readback(c, *disk, range);
                }
                if range.start < inner.start {
                    self.capture_readback(c, *disk, range.start..inner.start)?;
                }
                c.zero(*disk, inner.clone());
                if inner.end < range.end {
                    self.capture_readback(c, *disk, inner.end..range.end)?;
                }
            }
        }
        Ok(())
    }

    /// A group point's hold (see `Capture::group_barrier`), outside the
    /// locks of the write.
    fn ack_wait(&self) {
        if let Some((c, _)) = self.capture.get() {
            c.ack_wait();
        }
    }

    fn order(&self, range: &Range<u64>) -> Option<crate::capture::Ordered<'_>> {
        self.capture
            .get()
            .map(|(c, disk)| c.order(*disk, Capture::leaf_span(range)))
    }

    /// Clean stop: later writes fail; the tracker records a clean close.
    pub fn close(&self) -> Result<(), AgentError> {
        match &self.tracker {
            Some(t) => t.close(),
            None => Ok(()),
        }
    }

    fn guard(
        &self,
        range: Range<u64>,
    ) -> Result<Option<crate::dirty::WriteGuard<'_>>, DeviceError> {
        match &self.tracker {
            Some(t) => t.begin_write(range).map(Some).map_err(agent_err),
            None => Ok(None),
        }
    }

    fn sync_if(&self, fua: bool) -> Result<(), DeviceError> {
        if fua {
            self.disk.sync_data().map_err(dev_err)
        } else {
            Ok(())
        }
    }
}

impl BlockDevice for DiskExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        let w = !self.read_only;
        Caps {
            read_only: self.read_only,
            // All connections share one file descriptor and the kernel's page
            // cache; fdatasync on it covers every connection's writes.
            multi_conn: true,
            trim: w,
            write_zeroes: w,
            fast_zero: w,
            block_status: true,
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.disk.read_at(buf, offset).map_err(dev_err)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError> {
        let range = offset..offset + data.len() as u64;
        let g = self.guard(range.clone())?;
        // Overlapping writes reach the disk and the stream in one order.
        let o = self.order(&range);
        self.disk.write_at(data, offset).map_err(dev_err)?;
        // Captured before the guard marks the leaves: see capture.rs, Marks.
        self.capture_change(range, Some(data))?;
        drop(o);
        drop(g);
        self.ack_wait();
        self.sync_if(fua)
    }

    fn flush(&self) -> Result<(), DeviceError> {
        if self.read_only {
            return Ok(());
        }
        self.disk.sync_data().map_err(dev_err)?;
        if let Some(t) = &self.tracker {
            let m: Marker = t.barrier().map_err(agent_err)?;
            tracing::debug!(export = %self.name, marker = m.0, "flush barrier");
        }
        Ok(())
    }

    fn trim(&self, range: Range<u64>, fua: bool) -> Result<(), DeviceError> {
        let g = self.guard(range.clone())?;
        let o = self.order(&range);
        let punched = zeroing::punch_hole(&self.disk, range.clone()).map_err(dev_err)?;
        if !punched {
            // Trim is advisory: the data stays, nothing changed.
            if let Some(g) = g {
                g.nothing_written();
            }
            return Ok(());
        }
        self.capture_change(range, None)?;
        drop(o);
        drop(g);
        self.sync_if(fua)
    }

    fn write_zeroes(&self, range: Range<u64>, flags: ZeroFlags) -> Result<(), DeviceError> {
        let g = self.guard(range.clone())?;
        let o = self.order(&range);
        if !flags.no_hole && zeroing::punch_hole(&self.disk, range.clone()).map_err(dev_err)? {
            self.capture_change(range, None)?;
            drop(o);
            drop(g);
            return self.sync_if(flags.fua);
        }
        if zeroing::zero_allocated(&self.disk, range.clone()).map_err(dev_err)? {
            self.capture_change(range, None)?;
            drop(o);
            drop(g);
            return self.sync_if(flags.fua);
        }
        if flags.fast {
            if let Some(g) = g {
                g.nothing_written();
            }
            return Err(DeviceError::NotSupported);
        }
        zeroing::write_zeros(&self.disk, range.clone()).map_err(dev_err)?;
        self.capture_change(range, None)?;
        drop(o);
        drop(g);
        self.sync_if(flags.fua)
    }

    fn block_status(
        &self,
        range: Range<u64>,
        max_extents: usize,
    ) -> Result<Vec<Extent>, DeviceError> {
        let data = self.disk.data_extents(range.clone()).map_err(dev_err)?;
        let mut out = Vec::new();
        let mut pos = range.start;
        for d in data {
            if out.len() >= max_extents {
                return Ok(out);
            }
            if d.start > pos {
                out.push(Extent {
                    len: d.start - pos,
                    hole: true,
                });
                if out.len() >= max_extents {
                    return Ok(out);
                }
            }
            out.push(Extent {
                len: d.end - d.start,
                hole: false,
            });
            pos = d.end;
        }
        if pos < range.end && out.len() < max_extents {
            out.push(Extent {
                len: range.end - pos,
                hole: true,
            });
        }
        Ok(out)
    }
}

/// Checkpoints the dirty state of exports periodically, so that idle regions
/// leave the intent bitmap even when clients never flush.
pub struct Persister {
    stop: mpsc::Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl Persister {
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Persister {
    fn drop(&mut self) {
        self.halt();
    }
}

pub fn spawn_persister(exports: Vec<Arc<DiskExport>>, every: Duration) -> Persister {
    let (tx, rx) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("dirty-persist".into())
        .spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(every) {
                for e in &exports {
                    if let Some(t) = e.tracker()
                        && let Err(err) = t.checkpoint()
                    {
                        warn!(export = %e.name(), error = %err, "periodic persist of dirty state failed");
                    }
                }
            }
        })
        .ok();
    Persister { stop: tx, thread }
}
