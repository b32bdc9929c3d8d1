//! Delta sync (DESIGN.md §3, primitive 1): make a destination disk equal to a
//! source disk, moving only what differs.
//!
//! Each side reads its disk once, in 4 MiB chunks, and hashes every chunk into
//! a tree (4 KiB leaves, 64 KiB nodes, the chunk on top) with a keyed
//! XXH3-128. The destination streams its top hashes; the source asks for the
//! nodes of the chunks that differ, then for the leaves of the nodes that
//! differ, and sends the leaves that differ — zero leaves as holes. All of
//! this is pipelined: many chunks are in flight, so the number of round trips
//! is the depth of the tree, not the number of differences. Every chunk ends
//! with the source's BLAKE3 of it, which the destination checks against what
//! it wrote; the sync ends with both BLAKE3 roots compared. The destination
//! fsyncs and records a resume cursor every 256 MiB, so a sync killed at any
//! moment continues where it was.
//!
//! The two sides always talk through `rebound-wire` frames, also for a local
//! sync (over a socket pair), so there is one code path to test.

mod dest;
mod error;
pub mod pipeline;
mod remote;
mod source;
pub mod state;
pub mod tree;

pub use error::SyncError;
pub use remote::{
    Quota, RemoteAddr, ServeOptions, pull, push, serve, serve_connection, serve_with,
};

use rebound_disk::Disk;
use rebound_types::CHUNK_SIZE;
use rebound_wire::{Compression, Counters, FrameWriter, SyncStats, spawn_reader, spawn_writer};
use serde::Serialize;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

/// What a sync should do.
#[derive(Clone, Debug)]
pub struct Options {
    /// Copy every non-zero block without comparing ("full download").
    pub full: bool,
    /// Compare and count, write nothing.
    pub dry_run: bool,
    /// Allow a destination larger than the source to be cut to its size.
    pub allow_shrink: bool,
    pub compression: Compression,
    /// Where the client keeps resume state; `None` disables resuming.
    pub state_dir: Option<PathBuf>,
    pub tuning: Tuning,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            full: false,
            dry_run: false,
            allow_shrink: false,
            compression: Compression::Lz4,
            state_dir: None,
            tuning: Tuning::default(),
        }
    }
}

/// Resources of one side.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// Chunk buffers in flight (4 MiB each): bounds memory.
    pub buffers: usize,
    /// Threads that read and hash chunks (more than the cores: they also
    /// wait on the disk). Also the number of encoding and finishing threads.
    pub hashers: usize,
    /// The destination fsyncs and advances the resume cursor every this many
    /// chunks (`REBOUND_SYNC_DURABLE_CHUNKS`, default 64 = 256 MiB).
    pub durable_every: u64,
    /// Fault injection for tests: the source sleeps this long after reading
    /// each chunk (`REBOUND_FAULT_CHUNK_DELAY_MS`), so that a test can kill a
    /// sync in the middle.
    pub chunk_delay: Duration,
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

impl Default for Tuning {
    fn default() -> Tuning {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        Tuning {
            buffers: 16,
            hashers: (cores * 2).clamp(2, 8),
            durable_every: env_u64("REBOUND_SYNC_DURABLE_CHUNKS").unwrap_or(64).max(1),
            chunk_delay: Duration::from_millis(
                env_u64("REBOUND_FAULT_CHUNK_DELAY_MS").unwrap_or(0),
            ),
        }
    }
}

/// Progress of a running sync, for a progress bar.
#[derive(Debug, Default)]
pub struct Progress {
    pub total: AtomicU64,
    pub done: AtomicU64,
}

/// What the source found and sent.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Counts {
    pub chunks: u64,
    pub chunks_resumed: u64,
    /// Source bytes read (holes are not read).
    pub bytes_read: u64,
    pub leaves_differing: u64,
    pub bytes_differing: u64,
    /// Differing bytes sent as data (before compression).
    pub data_bytes: u64,
    /// Differing bytes that are zero on the source (sent as holes).
    pub zero_bytes: u64,
}

/// The result of a sync (or of a dry run).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub size: u64,
    pub dest_size_before: u64,
    pub full: bool,
    pub dry_run: bool,
    pub chunks: u64,
    pub chunks_resumed: u64,
    pub leaves_differing: u64,
    pub bytes_differing: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub source_bytes_read: u64,
    pub dest_bytes_read: u64,
    pub dest_bytes_written: u64,
    pub dest_bytes_zeroed: u64,
    pub wire_bytes_sent: u64,
    pub wire_bytes_received: u64,
    pub elapsed_secs: f64,
    pub throughput_bytes_per_sec: f64,
    pub source_root: String,
    pub dest_root: String,
    /// Both roots are equal: after a sync, the destination is verified equal;
    /// after a dry run, the disks are already identical.
    pub identical: bool,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        size: u64,
        dest_size_before: u64,
        opts: &Options,
        counts: Counts,
        dest: SyncStats,
        roots: ([u8; 32], [u8; 32]),
        wire: (u64, u64),
        elapsed: Duration,
    ) -> Report {
        let secs = elapsed.as_secs_f64();
        Report {
            size,
            dest_size_before,
            full: opts.full,
            dry_run: opts.dry_run,
            chunks: counts.chunks,
            chunks_resumed: counts.chunks_resumed,
            leaves_differing: counts.leaves_differing,
            bytes_differing: counts.bytes_differing,
            data_bytes: counts.data_bytes,
            zero_bytes: counts.zero_bytes,
            source_bytes_read: counts.bytes_read,
            dest_bytes_read: dest.bytes_read,
            dest_bytes_written: dest.bytes_written,
            dest_bytes_zeroed: dest.bytes_zeroed,
            wire_bytes_sent: wire.0,
            wire_bytes_received: wire.1,
            elapsed_secs: secs,
            throughput_bytes_per_sec: if secs > 0.0 { size as f64 / secs } else { 0.0 },
            source_root: hex(&roots.0),
            dest_root: hex(&roots.1),
            identical: roots.0 == roots.1,
        }
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The BLAKE3 root of a disk: the hash of its chunks' BLAKE3 hashes and its size.
pub fn root_of(chunks: impl Iterator<Item = [u8; 32]>, size: u64) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("rebound disk root 2026-11 v1");
    for c in chunks {
        h.update(&c);
    }
    h.update(&size.to_le_bytes());
    *h.finalize().as_bytes()
}

/// BLAKE3 root of a whole disk, read from the start (used by tests and `rebound verify`-like checks).
pub fn disk_root(path: &Path) -> Result<[u8; 32], SyncError> {
    let disk = Disk::open_read(path)?;
    let size = disk.size()?;
    let chunks = rebound_types::chunk_count(size);
    let mut hashes = Vec::with_capacity(chunks as usize);
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    for i in 0..chunks {
        let len = pipeline::chunk_len(size, i);
        disk.read_at(&mut buf[..len], i * CHUNK_SIZE)?;
        hashes.push(*blake3::hash(&buf[..len]).as_bytes());
    }
    Ok(root_of(hashes.into_iter(), size))
}

fn random_key() -> [u8; 32] {
    let a = state::new_session_id();
    let b = state::new_session_id();
    let mut k = [0u8; 32];
    k[..16].copy_from_slice(&a);
    k[16..].copy_from_slice(&b);
    k
}

/// Where a side keeps its resume state under a client state directory.
pub(crate) fn state_subdir(base: &Path, role: &str, src: &str, dst: &str) -> PathBuf {
    let key = blake3::hash(format!("{role}\0{src}\0{dst}").as_bytes());
    base.join("sync")
        .join(format!("{}-{role}", &hex(key.as_bytes())[..24]))
}

/// One side of a sync: its disk and what both roles need to run.
/// [`source::Source`] reads an existing disk; [`dest::Dest`] may have none (a
/// dry run against a destination that does not exist reads as zeros).
pub(crate) struct Side<D> {
    pub disk: D,
    /// The source's size, which is the destination's after the sync.
    pub size: u64,
    pub full: bool,
    pub dry_run: bool,
    pub state: Option<state::SideState>,
    /// Chunks already finished in an earlier run.
    pub start: u64,
    pub hasher: Arc<tree::TreeHasher>,
    pub tuning: Tuning,
    pub progress: Option<Arc<Progress>>,
}

impl<D> Side<D> {
    pub(crate) fn new(
        disk: D,
        size: u64,
        opts: &Options,
        resume: (Option<state::SideState>, u64),
        hasher: Arc<tree::TreeHasher>,
        progress: Option<Arc<Progress>>,
    ) -> Side<D> {
        let (state, start) = resume;
        Side {
            disk,
            size,
            full: opts.full,
            dry_run: opts.dry_run,
            state,
            start,
            hasher,
            tuning: opts.tuning,
            progress,
        }
    }
}

/// Open (or create) the destination for a sync from a source of `size` bytes.
/// Refuses to shrink unless asked; grows it sparse. Returns the disk (`None`
/// for a dry run against a missing destination) and its size before.
pub(crate) fn open_dest(
    path: &Path,
    size: u64,
    opts: &Options,
) -> Result<(Option<Arc<Disk>>, u64), SyncError> {
    let exists = std::fs::symlink_metadata(path).is_ok();
    if opts.dry_run {
        if !exists {
            return Ok((None, 0));
        }
        let d = Disk::open_read(path)?;
        let before = d.size()?;
        return Ok((Some(Arc::new(d)), before));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        return Err(SyncError::Invalid(format!(
            "{}: the directory does not exist",
            parent.display()
        )));
    }
    let d = Disk::open_write(path, true)?;
    let before = d.size()?;
    if before > size && !opts.allow_shrink {
        return Err(SyncError::Shrink {
            src: size,
            dest: before,
        });
    }
    if before != size {
        d.set_len(size)?;
    }
    Ok((Some(Arc::new(d)), before))
}

struct ShutdownOnDrop(UnixStream);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

/// Sync two local disks.
pub fn sync_local(
    src: &Path,
    dst: &Path,
    opts: &Options,
    progress: Option<Arc<Progress>>,
) -> Result<Report, SyncError> {
    let started = Instant::now();
    let sdisk = Arc::new(Disk::open_read(src)?);
    let size = sdisk.size()?;
    if let (Ok(a), Ok(b)) = (std::fs::canonicalize(src), std::fs::canonicalize(dst))
        && a == b
    {
        return Err(SyncError::Invalid(
            "source and destination are the same disk".into(),
        ));
    }
    let (ddisk, before) = open_dest(dst, size, opts)?;
    let (sname, dname) = (src.display().to_string(), dst.display().to_string());

    // Resume state of both sides, only when both agree on the session.
    let (mut sstate, mut dstate, start) = (None, None, 0);
    let mut start = start;
    if let (Some(base), false, Some(dd)) = (&opts.state_dir, opts.dry_run, &ddisk) {
        let sid = state::identity("source", &sname, sdisk.file(), size, opts.full, true);
        let did = state::identity("destination", &dname, dd.file(), size, opts.full, false);
        let sdir = state_subdir(base, "source", &sname, &dname);
        let ddir = state_subdir(base, "destination", &sname, &dname);
        match (
            state::SideState::load(&sdir, &sid)?,
            state::SideState::load(&ddir, &did)?,
        ) {
            (Some(mut s), Some(mut d)) if s.session == d.session => {
                start = s.chunks().min(d.chunks());
                s.truncate(start)?;
                d.truncate(start)?;
                sstate = Some(s);
                dstate = Some(d);
            }
            _ => {
                let session = state::new_session_id();
                sstate = Some(state::SideState::create(&sdir, &sid, session)?);
                dstate = Some(state::SideState::create(&ddir, &did, session)?);
            }
        }
    }
    let hasher = Arc::new(tree::TreeHasher::new(&random_key()));
    let (a, b) = UnixStream::pair().map_err(|e| SyncError::Invalid(format!("socketpair: {e}")))?;
    let (sc, dc) = (Arc::new(Counters::default()), Arc::new(Counters::default()));
    let link = |s: UnixStream,
                c: Arc<Counters>|
     -> Result<(FrameWriter, rebound_wire::FrameReader), SyncError> {
        let r = s
            .try_clone()
            .map_err(|e| SyncError::Invalid(format!("socket: {e}")))?;
        Ok((
            spawn_writer(s, Compression::None, 1, c.clone()),
            spawn_reader(r, c),
        ))
    };
    let (mut stx, srx) = link(a, sc.clone())?;
    let b_shut = b
        .try_clone()
        .map_err(|e| SyncError::Invalid(format!("socket: {e}")))?;
    let (mut dtx, drx) = link(b, dc)?;

    let mut dest = Side::new(ddisk, size, opts, (dstate, start), hasher.clone(), None);
    let guard = ShutdownOnDrop(b_shut);
    let dthread = std::thread::spawn(move || {
        // Closes the destination's socket however the thread ends (a panic
        // included), so the source never waits for a peer that is gone.
        let _guard = guard;
        let r = dest::run(&mut dest, &mut dtx, &drx);
        let _ = dtx.close();
        r
    });
    let mut source = Side::new(sdisk, size, opts, (sstate, start), hasher, progress);
    let sres = source::run(&mut source, &mut stx, &srx);
    let _ = stx.close();
    let dres = dthread
        .join()
        .map_err(|_| SyncError::Invalid("destination thread panicked".into()))?;
    // The destination's own error is the more precise one when both failed.
    let out = match (sres, dres) {
        (Ok(o), Ok(_)) => o,
        (_, Err(e)) => return Err(e),
        (Err(e), Ok(_)) => return Err(e),
    };
    if !opts.dry_run && out.root != out.dest_root {
        return Err(SyncError::Mismatch(
            "the BLAKE3 roots of source and destination differ".into(),
        ));
    }
    if let Some(s) = source.state.take() {
        s.remove()?;
    }
    Ok(Report::new(
        size,
        before,
        opts,
        out.counts,
        out.dest,
        (out.root, out.dest_root),
        (sc.sent(), sc.received()),
        started.elapsed(),
    ))
}
