//! The source side of a sync: reads and hashes its disk, compares with the
//! destination's hashes level by level, and sends what differs.

use crate::pipeline::{self, Buf, BufPool, Chunk, Want};
use crate::tree::{ChunkTree, ZERO};
use crate::{Counts, SyncError, root_of};
use crossbeam_channel::{Receiver, select};
use rebound_disk::{Disk, DiskError};
use rebound_types::{CHUNK_SIZE, LEAF_SIZE, chunk_count};
use rebound_wire::{FrameReader, FrameWriter, Msg, Payload, SyncStats};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Largest `Data` message body.
const MAX_DATA: usize = 1 << 20;

/// The source side: an existing disk, read in chunks.
pub(crate) type Source = crate::Side<Arc<Disk>>;

pub(crate) struct SourceOutcome {
    pub counts: Counts,
    pub root: [u8; 32],
    pub dest_root: [u8; 32],
    pub dest: SyncStats,
}

struct Run<'a> {
    src: &'a mut Source,
    tx: &'a mut FrameWriter,
    pending: HashMap<u64, Held>,
    tops: HashMap<u64, u128>,
    /// BLAKE3 of every chunk, resumed ones first.
    hashes: Vec<Option<[u8; 32]>>,
    ended: u64,
    counts: Counts,
}

/// A chunk read and hashed, held until resolved. Its buffer is shared with
/// the `Data` frames sent from it (no copy), and goes back to the pool when
/// the last of them has been encoded.
struct Held {
    buf: Arc<Buf>,
    tree: Option<ChunkTree>,
    blake3: Option<[u8; 32]>,
}

pub(crate) fn run(
    src: &mut Source,
    tx: &mut FrameWriter,
    rx: &FrameReader,
) -> Result<SourceOutcome, SyncError> {
    let n = chunk_count(src.size);
    let mut hashes = vec![None; n as usize];
    if let Some(state) = &src.state {
        for (i, h) in state.hashes.iter().take(src.start as usize).enumerate() {
            hashes[i] = Some(*h);
        }
    }
    // A full copy compares nothing: finding the zero leaves is enough.
    let want = Want {
        tree: (!src.full).then(|| src.hasher.clone()),
        blake3: true,
    };
    let chunks = pipeline::spawn(
        Some(src.disk.clone()),
        src.size,
        src.start..n,
        BufPool::new(src.tuning.buffers),
        want,
        src.tuning.hashers,
    );
    let start = src.start;
    if let Some(p) = &src.progress {
        p.total.store(src.size, Ordering::Relaxed);
        p.done
            .store((start * CHUNK_SIZE).min(src.size), Ordering::Relaxed);
    }
    let mut run = Run {
        src,
        tx,
        pending: HashMap::new(),
        tops: HashMap::new(),
        hashes,
        ended: start,
        counts: Counts::default(),
    };
    run.counts.chunks = n;
    run.counts.chunks_resumed = start;
    let result = run.main_loop(&chunks, rx, n);
    // Whatever happened, keep what is known for the next run.
    let logged = run.log_ended(true);
    let result = result.and_then(|o| logged.map(|_| o));
    if let Err(e) = &result
        && !matches!(e, SyncError::Wire(_) | SyncError::Remote { .. })
    {
        let _ = run.tx.send(e.to_msg());
    }
    result
}

impl Run<'_> {
    fn main_loop(
        &mut self,
        chunks: &Receiver<Result<Chunk, DiskError>>,
        rx: &FrameReader,
        n: u64,
    ) -> Result<SourceOutcome, SyncError> {
        let mut chunks_open = true;
        let never = crossbeam_channel::never();
        while self.ended < n {
            let chunk_rx = if chunks_open { chunks } else { &never };
            select! {
                recv(chunk_rx) -> c => match c {
                    Ok(c) => self.on_chunk(c?)?,
                    Err(_) => chunks_open = false,
                },
                recv(rx.rx) -> m => {
                    let m = m.map_err(|_| rebound_wire::WireError::Closed { during: "receiving" })??;
                    self.on_msg(m)?;
                }
            }
        }
        let root = root_of(
            self.hashes.iter().map(|h| h.unwrap_or_default()),
            self.src.size,
        );
        self.tx.send(Msg::Finish { root })?;
        loop {
            match rx.recv()? {
                Msg::Finished {
                    root: dest_root,
                    stats,
                } => {
                    return Ok(SourceOutcome {
                        counts: self.counts,
                        root,
                        dest_root,
                        dest: stats,
                    });
                }
                m => self.on_msg(m)?,
            }
        }
    }

    fn on_chunk(&mut self, c: Chunk) -> Result<(), SyncError> {
        self.counts.bytes_read += c.data.iter().map(|r| (r.end - r.start) as u64).sum::<u64>();
        let idx = c.idx;
        if !self.src.tuning.chunk_delay.is_zero() {
            std::thread::sleep(self.src.tuning.chunk_delay);
        }
        let held = Held {
            buf: Arc::new(c.buf),
            tree: c.tree,
            blake3: c.blake3,
        };
        if self.src.full {
            let all: Vec<usize> = (0..held.buf.len().div_ceil(LEAF_SIZE as usize)).collect();
            self.pending.insert(idx, held);
            self.send_leaves(idx, &all)?;
            return self.end(idx);
        }
        self.pending.insert(idx, held);
        self.resolve(idx)
    }

    fn chunk(&self, idx: u64) -> Result<&Held, SyncError> {
        self.pending.get(&idx).ok_or_else(|| {
            SyncError::Wire(rebound_wire::WireError::Protocol(format!(
                "hashes for chunk {idx}, which is not pending"
            )))
        })
    }

    fn tree(&self, idx: u64) -> Result<&ChunkTree, SyncError> {
        self.chunk(idx)?
            .tree
            .as_ref()
            .ok_or_else(|| SyncError::Invalid(format!("chunk {idx} was not hashed")))
    }

    /// Compare the top hashes once both sides have the chunk.
    fn resolve(&mut self, idx: u64) -> Result<(), SyncError> {
        let (Some(c), Some(&top)) = (self.pending.get(&idx), self.tops.get(&idx)) else {
            return Ok(());
        };
        let Some(tree) = &c.tree else {
            return Err(SyncError::Invalid(format!("chunk {idx} was not hashed")));
        };
        if top == tree.top {
            self.end(idx)
        } else if top == ZERO {
            // The destination's chunk is all zeros: every non-zero leaf of
            // ours differs, no need to ask for its hashes.
            let diff: Vec<usize> = (0..tree.leaves.len())
                .filter(|&i| tree.leaves[i] != ZERO)
                .collect();
            self.send_leaves(idx, &diff)?;
            self.end(idx)
        } else {
            self.tx.send(Msg::WantNodes { chunk: idx })?;
            Ok(())
        }
    }

    fn on_msg(&mut self, m: Msg) -> Result<(), SyncError> {
        match m {
            Msg::TopHashes {
                first_chunk,
                hashes,
            } => {
                for (i, h) in hashes.into_iter().enumerate() {
                    let idx = first_chunk + i as u64;
                    self.tops.insert(idx, h);
                    self.resolve(idx)?;
                }
            }
            Msg::NodeHashes { chunk, hashes } => {
                let tree = self.tree(chunk)?;
                if hashes.len() != tree.nodes.len() {
                    return Err(violation(format!(
                        "chunk {chunk}: {} node hashes, expected {}",
                        hashes.len(),
                        tree.nodes.len()
                    )));
                }
                let mask = (0..hashes.len())
                    .filter(|&i| hashes[i] != tree.nodes[i])
                    .fold(0u64, |m, i| m | 1 << i);
                if mask == 0 {
                    self.end(chunk)?;
                } else {
                    self.tx.send(Msg::WantLeaves { chunk, mask })?;
                }
            }
            Msg::LeafHashes {
                chunk,
                mask,
                hashes,
            } => {
                let tree = self.tree(chunk)?;
                let idxs = tree.leaf_indexes_under(mask);
                if hashes.len() != idxs.len() {
                    return Err(violation(format!(
                        "chunk {chunk}: {} leaf hashes, expected {}",
                        hashes.len(),
                        idxs.len()
                    )));
                }
                let diff: Vec<usize> = idxs
                    .iter()
                    .zip(&hashes)
                    .filter(|&(&i, &h)| tree.leaves[i] != h)
                    .map(|(&i, _)| i)
                    .collect();
                self.send_leaves(chunk, &diff)?;
                self.end(chunk)?;
            }
            // Progress only: our own log does not wait for the destination.
            Msg::Durable { .. } => {}
            Msg::Error { code, message } => return Err(SyncError::from_remote(code, message)),
            other => {
                return Err(violation(format!(
                    "unexpected {} at the source",
                    other.name()
                )));
            }
        }
        Ok(())
    }

    /// Send the leaves `diff` (sorted) of chunk `idx`: data runs as `Data`,
    /// zero runs as `Zero` (holes on the destination).
    fn send_leaves(&mut self, idx: u64, diff: &[usize]) -> Result<(), SyncError> {
        let c = self
            .pending
            .get(&idx)
            .ok_or_else(|| SyncError::Invalid(format!("chunk {idx} not pending")))?;
        let Some(tree) = &c.tree else {
            return Err(SyncError::Invalid(format!("chunk {idx} was not hashed")));
        };
        let len = c.buf.len();
        let base = idx * CHUNK_SIZE;
        let leaf = LEAF_SIZE as usize;
        let mut msgs = Vec::new();
        let mut i = 0;
        while i < diff.len() {
            let zero = tree.leaves[diff[i]] == ZERO;
            let mut j = i + 1;
            while j < diff.len()
                && diff[j] == diff[j - 1] + 1
                && (tree.leaves[diff[j]] == ZERO) == zero
            {
                j += 1;
            }
            let start = diff[i] * leaf;
            let end = ((diff[j - 1] + 1) * leaf).min(len);
            let bytes = (end - start) as u64;
            self.counts.leaves_differing += (j - i) as u64;
            self.counts.bytes_differing += bytes;
            if zero {
                self.counts.zero_bytes += bytes;
                msgs.push(Msg::Zero {
                    offset: base + start as u64,
                    len: bytes,
                });
            } else {
                self.counts.data_bytes += bytes;
                let mut s = start;
                while s < end {
                    let e = (s + MAX_DATA).min(end);
                    msgs.push(Msg::Data {
                        offset: base + s as u64,
                        bytes: Payload::Shared(c.buf.clone(), s..e),
                    });
                    s = e;
                }
            }
            i = j;
        }
        if !self.src.dry_run {
            for m in msgs {
                self.tx.send(m)?;
            }
        }
        Ok(())
    }

    fn end(&mut self, idx: u64) -> Result<(), SyncError> {
        let c = self
            .pending
            .remove(&idx)
            .ok_or_else(|| SyncError::Invalid(format!("chunk {idx} not pending")))?;
        self.tops.remove(&idx);
        let b3 = c
            .blake3
            .ok_or_else(|| SyncError::Invalid(format!("chunk {idx} has no BLAKE3")))?;
        self.hashes[idx as usize] = Some(b3);
        self.ended += 1;
        if let Some(p) = &self.src.progress {
            p.done.fetch_add(c.buf.len() as u64, Ordering::Relaxed);
        }
        self.tx.send(Msg::ChunkEnd {
            chunk: idx,
            blake3: b3,
        })?;
        self.log_ended(false)
    }

    /// Record the hashes of the chunks ended so far, in order, in the resume
    /// log. They are facts about the source alone, so the log may run ahead
    /// of the destination's: a resume starts at the shorter of the two.
    fn log_ended(&mut self, force: bool) -> Result<(), SyncError> {
        let Some(state) = self.src.state.as_mut() else {
            return Ok(());
        };
        let from = state.chunks() as usize;
        let fresh: Vec<[u8; 32]> = self.hashes[from..].iter().map_while(|h| *h).collect();
        if fresh.is_empty() || (!force && (fresh.len() as u64) < self.src.tuning.durable_every) {
            return Ok(());
        }
        state.append(&fresh)
    }
}

fn violation(s: String) -> SyncError {
    SyncError::Wire(rebound_wire::WireError::Protocol(s))
}
