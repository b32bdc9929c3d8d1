//! The destination side of a sync: hashes its disk, answers the source's
//! questions level by level, applies what the source sends, verifies every
//! chunk against the source's BLAKE3 and moves the durable resume cursor.

use crate::pipeline::{self, Buf, BufPool, Chunk, Want, chunk_len};
use crate::state::SideState;
use crate::tree::ChunkTree;
use crate::{SyncError, root_of};
use crossbeam_channel::{Receiver, Sender, bounded, select, unbounded};
use rebound_disk::{Disk, DiskError};
use rebound_types::{CHUNK_SIZE, chunk_count};
use rebound_wire::{FrameReader, FrameWriter, Msg, Spares, SyncStats, WireError};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;

/// Send top hashes in batches of at most this many chunks.
const TOP_BATCH: usize = 256;

/// The destination side; `None`: a dry run against a destination that does
/// not exist (all zeros).
pub(crate) type Dest = crate::Side<Option<Arc<Disk>>>;

pub(crate) struct DestOutcome {
    pub root: [u8; 32],
    pub stats: SyncStats,
    /// What arrived, counted here too: with a pull, the source's counts
    /// stay on the server.
    pub received: crate::Counts,
}

struct Pending {
    buf: Buf,
    tree: Option<ChunkTree>,
    /// Data received for the chunk, laid into `buf` by a finalizer: the
    /// thread that reads the connection only keeps accounts.
    data: Vec<(usize, Vec<u8>)>,
    writes: Vec<Range<usize>>,
    zeros: Vec<Range<usize>>,
    /// A full copy's chunk: `buf` starts with unspecified bytes.
    full: bool,
}

struct Job {
    idx: u64,
    p: Pending,
    expected: [u8; 32],
}

struct Done {
    idx: u64,
    blake3: [u8; 32],
    expected: [u8; 32],
    written: u64,
    zeroed: u64,
}

pub(crate) fn run(
    dst: &mut Dest,
    tx: &mut FrameWriter,
    rx: &FrameReader,
) -> Result<DestOutcome, SyncError> {
    // Chunks finished in an earlier run count in the root.
    let resumed: Vec<[u8; 32]> = dst
        .state
        .as_ref()
        .map(|s| s.hashes.iter().take(dst.start as usize).copied().collect())
        .unwrap_or_default();
    if resumed.len() as u64 != dst.start {
        return Err(SyncError::State(format!(
            "resuming at chunk {} without its hashes",
            dst.start
        )));
    }
    let (sync_tx, synced_rx, syncer) = spawn_syncer(dst.disk.clone(), dst.state.take());
    let result = run_inner(dst, tx, rx, resumed, sync_tx, &synced_rx);
    // The loop dropped its sender: the syncer finishes what it was given
    // (so that a failed sync keeps every durable chunk for the next run)
    // and hands the resume state back.
    let state = syncer
        .join()
        .map_err(|_| SyncError::Invalid("syncer panicked".into()));
    let result = match (result, state) {
        (Ok(out), Ok(state)) => {
            // Finished: the state is no longer needed.
            if let (false, Some(state)) = (dst.dry_run, state) {
                state.remove()?;
            }
            Ok(out)
        }
        (Ok(_), Err(e)) | (Err(e), _) => Err(e),
    };
    if let Err(e) = &result
        && !matches!(e, SyncError::Wire(_) | SyncError::Remote { .. })
    {
        let _ = tx.send(e.to_msg());
    }
    result
}

fn run_inner(
    dst: &mut Dest,
    tx: &mut FrameWriter,
    rx: &FrameReader,
    mut hashes: Vec<[u8; 32]>,
    sync_tx: Sender<(u64, Vec<[u8; 32]>)>,
    synced_rx: &Receiver<Result<u64, SyncError>>,
) -> Result<DestOutcome, SyncError> {
    let n = chunk_count(dst.size);
    let pool = BufPool::new(dst.tuning.buffers);
    let never = crossbeam_channel::never();
    let chunks = if dst.full {
        never.clone()
    } else {
        pipeline::spawn(
            dst.disk.clone(),
            dst.size,
            dst.start..n,
            pool.clone(),
            Want {
                tree: Some(dst.hasher.clone()),
                blake3: false,
            },
            dst.tuning.hashers,
        )
    };
    let (jobs_tx, results) = spawn_finalizers(
        dst.disk.clone(),
        dst.dry_run,
        dst.tuning.hashers,
        rx.spares(),
    );

    hashes.reserve(n as usize);
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut tops: BTreeMap<u64, u128> = BTreeMap::new();
    let mut next_top = dst.start;
    let mut done: BTreeMap<u64, [u8; 32]> = BTreeMap::new();
    // Chunks handed to the syncer, and chunks it has made durable.
    let mut queued = dst.start;
    let mut synced = dst.start;
    let mut source_root: Option<[u8; 32]> = None;
    let mut stats = SyncStats::default();
    let mut received = crate::Counts {
        chunks: n,
        chunks_resumed: dst.start,
        ..Default::default()
    };
    let leaves = |len: u64| len.div_ceil(rebound_types::LEAF_SIZE);
    let mut chunks_open = !dst.full;
    let mut jobs_tx = Some(jobs_tx);
    let mut results_open = true;
    let never_done = crossbeam_channel::never();

    loop {
        let cursor = hashes.len() as u64;
        if let Some(root) = source_root
            && cursor == n
            && (dst.dry_run || synced == n)
        {
            let ours = root_of(hashes.iter().copied(), dst.size);
            tx.send(Msg::Finished { root: ours, stats })?;
            if ours != root && !dst.dry_run {
                return Err(SyncError::Mismatch(
                    "the destination's BLAKE3 root differs from the source's".into(),
                ));
            }
            return Ok(DestOutcome {
                root: ours,
                stats,
                received,
            });
        }
        let results_rx = if results_open { &results } else { &never_done };
        let chunk_rx: &Receiver<Result<Chunk, DiskError>> =
            if chunks_open { &chunks } else { &never };
        select! {
            recv(chunk_rx) -> c => match c {
                Ok(c) => {
                    let c = c?;
                    stats.bytes_read += c.data.iter().map(|r| (r.end - r.start) as u64).sum::<u64>();
                    let tree = c.tree.ok_or_else(|| SyncError::Invalid("chunk not hashed".into()))?;
                    tops.insert(c.idx, tree.top);
                    pending.insert(c.idx, Pending { buf: c.buf, tree: Some(tree), data: vec![], writes: vec![], zeros: vec![], full: false });
                    // Batch top hashes, but never sit on them while the reader is idle.
                    if chunks.is_empty() || tops.len() >= TOP_BATCH {
                        let mut batch = Vec::new();
                        while let Some(h) = tops.remove(&next_top) {
                            batch.push(h);
                            next_top += 1;
                        }
                        if !batch.is_empty() {
                            tx.send(Msg::TopHashes { first_chunk: next_top - batch.len() as u64, hashes: batch })?;
                        }
                    }
                }
                Err(_) => chunks_open = false,
            },
            recv(results_rx) -> r => {
                let d = match r {
                    Ok(d) => d?,
                    // Finalizers end once Finish closed their queue and every
                    // chunk is written: only the syncer is left to wait for.
                    Err(_) if jobs_tx.is_none() => {
                        results_open = false;
                        continue;
                    }
                    Err(_) => return Err(SyncError::Invalid("finalizer stopped".into())),
                };
                if d.blake3 != d.expected && !dst.dry_run {
                    return Err(SyncError::Mismatch(format!(
                        "chunk {} (offset {}) differs from the source after writing",
                        d.idx, d.idx * CHUNK_SIZE
                    )));
                }
                stats.bytes_written += d.written;
                stats.bytes_zeroed += d.zeroed;
                done.insert(d.idx, d.blake3);
                while let Some(h) = done.remove(&(hashes.len() as u64)) {
                    hashes.push(h);
                    if let Some(p) = &dst.progress {
                        p.done.fetch_add(chunk_len(dst.size, hashes.len() as u64 - 1) as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                let cursor = hashes.len() as u64;
                if !dst.dry_run && (cursor - queued >= dst.tuning.durable_every || (cursor == n && cursor > queued)) {
                    let fresh = hashes[queued as usize..cursor as usize].to_vec();
                    sync_tx.send((cursor, fresh)).map_err(|_| SyncError::Invalid("syncer stopped".into()))?;
                    queued = cursor;
                }
            },
            recv(*synced_rx) -> r => {
                synced = r.map_err(|_| SyncError::Invalid("syncer stopped".into()))??;
                tx.send(Msg::Durable { chunks: synced })?;
            },
            recv(rx.rx) -> m => {
                let m = m.map_err(|_| WireError::Closed { during: "receiving" })??;
                match m {
                    Msg::WantNodes { chunk } => {
                        let t = tree_of(&pending, chunk)?;
                        tx.send(Msg::NodeHashes { chunk, hashes: t.nodes.clone() })?;
                    }
                    Msg::WantLeaves { chunk, mask } => {
                        let t = tree_of(&pending, chunk)?;
                        tx.send(Msg::LeafHashes { chunk, mask, hashes: t.leaves_under(mask) })?;
                    }
                    Msg::Data { offset, bytes } => {
                        let (p, r) = target(&mut pending, &pool, dst, offset, bytes.len() as u64)?;
                        received.leaves_differing += leaves(bytes.len() as u64);
                        received.bytes_differing += bytes.len() as u64;
                        received.data_bytes += bytes.len() as u64;
                        p.data.push((r.start, bytes.into_vec()));
                        push_run(&mut p.writes, r);
                    }
                    Msg::Zero { offset, len } => {
                        let (p, r) = target(&mut pending, &pool, dst, offset, len)?;
                        received.leaves_differing += leaves(len);
                        received.bytes_differing += len;
                        received.zero_bytes += len;
                        push_run(&mut p.zeros, r);
                    }
                    Msg::ChunkEnd { chunk, blake3 } => {
                        if chunk >= n || chunk < dst.start {
                            return Err(violation(format!("end of chunk {chunk}, outside the sync")));
                        }
                        let p = match pending.remove(&chunk) {
                            Some(p) => p,
                            None if dst.full => {
                                let buf = pool.take(chunk_len(dst.size, chunk));
                                Pending { buf, tree: None, data: vec![], writes: vec![], zeros: vec![], full: true }
                            }
                            None => return Err(violation(format!("end of chunk {chunk}, which is not pending"))),
                        };
                        if let Some(j) = &jobs_tx {
                            j.send(Job { idx: chunk, p, expected: blake3 }).map_err(|_| SyncError::Invalid("finalizer stopped".into()))?;
                        }
                    }
                    Msg::Finish { root } => {
                        source_root = Some(root);
                        jobs_tx.take();
                    }
                    Msg::Error { code, message } => return Err(SyncError::from_remote(code, message)),
                    other => return Err(violation(format!("unexpected {} at the destination", other.name()))),
                }
            }
        }
    }
}

fn violation(s: String) -> SyncError {
    SyncError::Wire(WireError::Protocol(s))
}

/// A full copy's chunk: every byte no `Data` or `Zero` covered becomes a zero
/// run too, on the disk as in the buffer. Our sources cover every byte; a
/// peer that does not still cannot leave old data under a matching hash.
fn cover_gaps(p: &mut Pending) {
    let mut covered: Vec<Range<usize>> = p.writes.iter().chain(&p.zeros).cloned().collect();
    covered.sort_by_key(|r| r.start);
    let mut pos = 0;
    let mut gaps = Vec::new();
    for r in covered {
        if r.start > pos {
            gaps.push(pos..r.start);
        }
        pos = pos.max(r.end);
    }
    if pos < p.buf.len() {
        gaps.push(pos..p.buf.len());
    }
    p.zeros.extend(gaps);
}

/// Append `r`, merged into the last run when it continues it: a chunk sent
/// as several frames is written with one call.
fn push_run(runs: &mut Vec<Range<usize>>, r: Range<usize>) {
    match runs.last_mut() {
        Some(last) if last.end == r.start => last.end = r.end,
        _ => runs.push(r),
    }
}

fn tree_of(pending: &HashMap<u64, Pending>, chunk: u64) -> Result<&ChunkTree, SyncError> {
    pending
        .get(&chunk)
        .and_then(|p| p.tree.as_ref())
        .ok_or_else(|| {
            violation(format!(
                "hashes asked for chunk {chunk}, which is not pending"
            ))
        })
}

/// The pending chunk a `Data`/`Zero` of `len` bytes at `offset` lands in, and
/// the range inside it. A range outside the disk or across chunks is refused.
fn target<'a>(
    pending: &'a mut HashMap<u64, Pending>,
    pool: &BufPool,
    dst: &Dest,
    offset: u64,
    len: u64,
) -> Result<(&'a mut Pending, Range<usize>), SyncError> {
    let chunk = offset / CHUNK_SIZE;
    let end = offset
        .checked_add(len)
        .ok_or_else(|| violation("range overflows".into()))?;
    if end > dst.size || end > (chunk + 1) * CHUNK_SIZE || chunk < dst.start {
        return Err(violation(format!(
            "write of {len} bytes at {offset} is outside its chunk"
        )));
    }
    if let std::collections::hash_map::Entry::Vacant(e) = pending.entry(chunk) {
        if !dst.full {
            return Err(violation(format!(
                "data for chunk {chunk}, which is not pending"
            )));
        }
        // Not zeroed: a full copy covers every byte of the chunk with `Data`
        // and `Zero`, and `cover_gaps` zeroes whatever a peer left out.
        let buf = pool.take(chunk_len(dst.size, chunk));
        e.insert(Pending {
            buf,
            tree: None,
            data: vec![],
            writes: vec![],
            zeros: vec![],
            full: true,
        });
    }
    let p = pending
        .get_mut(&chunk)
        .ok_or_else(|| violation("chunk vanished".into()))?;
    let s = (offset - chunk * CHUNK_SIZE) as usize;
    Ok((p, s..s + len as usize))
}

type Syncer = (
    Sender<(u64, Vec<[u8; 32]>)>,
    Receiver<Result<u64, SyncError>>,
    std::thread::JoinHandle<Option<SideState>>,
);

/// A thread that makes written chunks durable (fdatasync, then the resume
/// log) off the main loop, so that reading, comparing and writing go on while
/// the disk flushes. It reports each cursor it made durable, and gives the
/// resume state back when it ends.
fn spawn_syncer(disk: Option<Arc<Disk>>, mut state: Option<SideState>) -> Syncer {
    let (tx, rx) = unbounded::<(u64, Vec<[u8; 32]>)>();
    let (done_tx, done_rx) = unbounded();
    let handle = std::thread::spawn(move || {
        for (cursor, hashes) in rx {
            let r = (|| {
                if let Some(d) = &disk {
                    d.sync_data()?;
                }
                if let Some(s) = &mut state {
                    s.append(&hashes)?;
                }
                Ok(cursor)
            })();
            let failed = r.is_err();
            if done_tx.send(r).is_err() || failed {
                break;
            }
        }
        state
    });
    (tx, done_rx, handle)
}

/// Writes at least this long go to the disk directly (see `finalize`).
const DIRECT_WRITE_MIN: usize = 1 << 20;

/// Threads that write a finished chunk's changes and hash its final content.
fn spawn_finalizers(
    disk: Option<Arc<Disk>>,
    dry_run: bool,
    threads: usize,
    spares: Spares,
) -> (Sender<Job>, Receiver<Result<Done, SyncError>>) {
    let (jtx, jrx) = bounded::<Job>(threads * 2);
    let (rtx, rrx) = bounded(threads * 4);
    for _ in 0..threads.max(1) {
        let jrx = jrx.clone();
        let rtx = rtx.clone();
        let disk = disk.clone();
        let spares = spares.clone();
        std::thread::spawn(move || {
            for job in jrx {
                let r = finalize(disk.as_deref(), dry_run, &spares, job);
                let failed = r.is_err();
                if rtx.send(r).is_err() || failed {
                    return;
                }
            }
        });
    }
    (jtx, rrx)
}

fn finalize(
    disk: Option<&Disk>,
    dry_run: bool,
    spares: &Spares,
    mut job: Job,
) -> Result<Done, SyncError> {
    let base = job.idx * CHUNK_SIZE;
    let p = &mut job.p;
    // The chunk's final content: what the destination had (or zeros, for a
    // full copy's gaps), with the zero runs and the data received laid over.
    if p.full {
        cover_gaps(p);
    }
    for z in &p.zeros {
        p.buf[z.clone()].fill(0);
    }
    for (at, bytes) in p.data.drain(..) {
        p.buf[at..at + bytes.len()].copy_from_slice(&bytes);
        spares.give(bytes);
    }
    let (mut written, mut zeroed) = (0, 0);
    if !dry_run {
        let disk = disk.ok_or_else(|| SyncError::Invalid("no destination disk".into()))?;
        // Zeros first: where a (faulty) peer overlapped the two, the disk
        // ends as `buf` does, and `buf` is what gets hashed.
        for z in &job.p.zeros {
            disk.zero_range(base + z.start as u64..base + z.end as u64)?;
            zeroed += (z.end - z.start) as u64;
        }
        for w in &job.p.writes {
            // Long runs (full copies, big changes) bypass the page cache; a
            // direct write waits for the disk, so scattered leaves do not.
            if w.len() >= DIRECT_WRITE_MIN {
                disk.write_aligned(&job.p.buf[w.clone()], base + w.start as u64)?;
            } else {
                disk.write_at(&job.p.buf[w.clone()], base + w.start as u64)?;
            }
            written += (w.end - w.start) as u64;
        }
    }
    let blake3 = *blake3::hash(&job.p.buf).as_bytes();
    Ok(Done {
        idx: job.idx,
        blake3,
        expected: job.expected,
        written,
        zeroed,
    })
}
