//! The hash tree of a chunk: 4 KiB leaves, 64 KiB nodes, one 4 MiB top.
//!
//! Leaves are hashed with XXH3-128 keyed by a per-session secret, so that a
//! peer cannot craft blocks that collide. Zero leaves (holes included) are
//! never hashed: their hash is the sentinel [`ZERO`], and a node whose
//! children are all zero is zero too. A real hash that happens to be zero is
//! mapped to 1.

use rebound_types::{LEAF_SIZE, LEAVES_PER_NODE, NODES_PER_CHUNK};
use rebound_wire::Hash128;
use std::ops::Range;

pub const ZERO: Hash128 = 0;
/// XXH3's default secret length; any secret of at least 136 bytes works.
const SECRET_LEN: usize = 192;

/// The per-session key of the comparison hashes.
pub struct TreeHasher {
    secret: Vec<u8>,
}

impl TreeHasher {
    /// Derive the XXH3 secret from a session key.
    pub fn new(session_key: &[u8; 32]) -> TreeHasher {
        let mut secret = vec![0u8; SECRET_LEN];
        let mut xof = blake3::Hasher::new_derive_key("rebound delta leaf secret 2026-11 v1")
            .update(session_key)
            .finalize_xof();
        xof.fill(&mut secret);
        TreeHasher { secret }
    }

    fn hash(&self, bytes: &[u8]) -> Hash128 {
        match xxhash_rust::xxh3::xxh3_128_with_secret(bytes, &self.secret) {
            ZERO => 1,
            h => h,
        }
    }

    /// Hash of one leaf's bytes, [`ZERO`] when they are all zero.
    pub fn leaf(&self, bytes: &[u8]) -> Hash128 {
        if rebound_disk::is_zero(bytes) {
            ZERO
        } else {
            self.hash(bytes)
        }
    }

    /// Hash of a parent over its children's hashes.
    pub fn parent(&self, children: &[Hash128]) -> Hash128 {
        if children.iter().all(|&h| h == ZERO) {
            return ZERO;
        }
        let mut raw = Vec::with_capacity(children.len() * 16);
        for h in children {
            raw.extend_from_slice(&h.to_le_bytes());
        }
        self.hash(&raw)
    }

    /// The whole tree of a chunk held in `buf`, whose byte ranges `data` may
    /// hold data (the rest is known to be holes and is not scanned).
    pub fn chunk(&self, buf: &[u8], data: &[Range<usize>]) -> ChunkTree {
        let nleaves = buf.len().div_ceil(LEAF_SIZE as usize);
        let mut leaves = vec![ZERO; nleaves];
        for r in data {
            let first = r.start / LEAF_SIZE as usize;
            let last = r.end.div_ceil(LEAF_SIZE as usize);
            for (i, leaf) in leaves.iter_mut().enumerate().take(last).skip(first) {
                let start = i * LEAF_SIZE as usize;
                let end = (start + LEAF_SIZE as usize).min(buf.len());
                *leaf = self.leaf(&buf[start..end]);
            }
        }
        ChunkTree::from_leaves(self, leaves)
    }
}

/// Hashes of one chunk, every level.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkTree {
    pub leaves: Vec<Hash128>,
    pub nodes: Vec<Hash128>,
    pub top: Hash128,
}

impl ChunkTree {
    pub fn from_leaves(h: &TreeHasher, leaves: Vec<Hash128>) -> ChunkTree {
        let nodes: Vec<Hash128> = leaves
            .chunks(LEAVES_PER_NODE)
            .map(|c| h.parent(c))
            .collect();
        debug_assert!(nodes.len() <= NODES_PER_CHUNK);
        let top = h.parent(&nodes);
        ChunkTree { leaves, nodes, top }
    }

    /// Which leaves of a chunk are zero, without hashing: leaves are [`ZERO`]
    /// or 1. Enough for a full copy, which compares nothing.
    pub fn presence(buf: &[u8], data: &[Range<usize>]) -> ChunkTree {
        let leaf = LEAF_SIZE as usize;
        let mut leaves = vec![ZERO; buf.len().div_ceil(leaf)];
        for r in data {
            for (i, l) in leaves
                .iter_mut()
                .enumerate()
                .take(r.end.div_ceil(leaf))
                .skip(r.start / leaf)
            {
                let end = ((i + 1) * leaf).min(buf.len());
                if !rebound_disk::is_zero(&buf[i * leaf..end]) {
                    *l = 1;
                }
            }
        }
        let nodes: Vec<Hash128> = leaves
            .chunks(LEAVES_PER_NODE)
            .map(|c| c.iter().any(|&h| h != ZERO) as Hash128)
            .collect();
        let top = nodes.iter().any(|&h| h != ZERO) as Hash128;
        ChunkTree { leaves, nodes, top }
    }

    /// A chunk of `len` bytes that is all zeros.
    pub fn zero(len: usize) -> ChunkTree {
        let nleaves = len.div_ceil(LEAF_SIZE as usize);
        ChunkTree {
            leaves: vec![ZERO; nleaves],
            nodes: vec![ZERO; nleaves.div_ceil(LEAVES_PER_NODE)],
            top: ZERO,
        }
    }

    /// Leaf hashes under the nodes set in `mask`, in node order.
    pub fn leaves_under(&self, mask: u64) -> Vec<Hash128> {
        let mut out = Vec::new();
        for n in 0..self.nodes.len() {
            if mask & (1 << n) != 0 {
                let start = n * LEAVES_PER_NODE;
                let end = (start + LEAVES_PER_NODE).min(self.leaves.len());
                out.extend_from_slice(&self.leaves[start..end]);
            }
        }
        out
    }

    /// Leaf indexes under the nodes in `mask`, in the same order as [`Self::leaves_under`].
    pub fn leaf_indexes_under(&self, mask: u64) -> Vec<usize> {
        let mut out = Vec::new();
        for n in 0..self.nodes.len() {
            if mask & (1 << n) != 0 {
                let start = n * LEAVES_PER_NODE;
                out.extend(start..(start + LEAVES_PER_NODE).min(self.leaves.len()));
            }
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    #[test]
    fn zero_and_holes_hash_to_the_sentinel() {
        let h = TreeHasher::new(&[1; 32]);
        let buf = vec![0u8; 3 * 4096 + 100];
        let t = h.chunk(&buf, &[0..buf.len()]);
        assert_eq!(t.leaves.len(), 4);
        assert!(t.leaves.iter().all(|&l| l == ZERO));
        assert_eq!(t.top, ZERO);
        assert_eq!(t, ChunkTree::zero(buf.len()));
    }

    #[test]
    fn keys_change_hashes_and_changes_propagate() {
        let a = TreeHasher::new(&[1; 32]);
        let b = TreeHasher::new(&[2; 32]);
        let mut buf = vec![7u8; 1 << 20];
        assert_ne!(a.leaf(&buf[..4096]), b.leaf(&buf[..4096]));
        let t1 = a.chunk(&buf, &[0..buf.len()]);
        buf[70_000] ^= 1;
        let t2 = a.chunk(&buf, &[0..buf.len()]);
        let diff: Vec<_> = (0..t1.leaves.len())
            .filter(|&i| t1.leaves[i] != t2.leaves[i])
            .collect();
        assert_eq!(diff, vec![70_000 / 4096]);
        assert_ne!(t1.nodes[1], t2.nodes[1]);
        assert_eq!(t1.nodes[0], t2.nodes[0]);
        assert_ne!(t1.top, t2.top);
    }

    #[test]
    fn only_data_ranges_are_scanned() {
        let h = TreeHasher::new(&[3; 32]);
        let buf = vec![9u8; 16384];
        // Claiming leaf 1 is a hole makes it zero without reading it.
        let t = h.chunk(&buf, &[0..4096, 8192..16384]);
        assert_eq!(t.leaves[1], ZERO);
        assert_ne!(t.leaves[0], ZERO);
        assert_eq!(t.leaves_under(1).len(), 4);
        assert_eq!(t.leaf_indexes_under(1), vec![0, 1, 2, 3]);
    }
}
