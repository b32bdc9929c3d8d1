#![allow(dead_code, clippy::unwrap_used)]
//! Helpers shared by the journal's integration tests: an in-memory model of
//! the disks and deterministic block contents.

use rebound_journal::{Changeset, DiskSpec, Journal, Options, PointView};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub const DISK: u64 = 64 * 4096;

pub fn specs(n: usize) -> Vec<DiskSpec> {
    (0..n)
        .map(|i| DiskSpec {
            name: format!("d{i}"),
            size: DISK,
            base: None,
        })
        .collect()
}

/// Deterministic 4 KiB-multiple content for (seed, blocks).
pub fn data(seed: u64, blocks: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = vec![0u8; blocks * 4096];
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    v
}

/// What the disks must contain: current state plus a snapshot per point.
#[derive(Clone, Debug)]
pub struct Model {
    pub disks: Vec<Vec<u8>>,
    pub points: BTreeMap<u64, Vec<Vec<u8>>>,
}

impl Model {
    pub fn new(n: usize) -> Model {
        Model {
            disks: vec![vec![0u8; DISK as usize]; n],
            points: BTreeMap::new(),
        }
    }
    pub fn apply(&mut self, cs: &Changeset) {
        for w in &cs.writes {
            let d = &mut self.disks[w.disk as usize];
            d[w.offset as usize..w.offset as usize + w.data.len()].copy_from_slice(&w.data);
        }
    }
}

pub fn read_view(v: &PointView, disk: usize) -> Vec<u8> {
    let mut buf = vec![0u8; v.disks()[disk].size as usize];
    v.read_at(disk, &mut buf, 0).unwrap();
    buf
}

pub fn check_point(j: &Journal, id: u64, want: &[Vec<u8>]) {
    let v = j.view(id).unwrap();
    for (d, w) in want.iter().enumerate() {
        let got = read_view(&v, d);
        assert!(got == *w, "point {id} disk {d} differs from the model");
    }
}

pub fn opts(fs: Arc<dyn rebound_journal::fs::Fs>, segment_bytes: u64) -> Options {
    Options { segment_bytes, fs }
}

pub fn real(segment_bytes: u64) -> Options {
    Options {
        segment_bytes,
        ..Options::default()
    }
}

pub fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}
