//! Disk IO for rebound: raw image files and block devices read and written at
//! offsets, sparse-aware (SEEK_DATA/SEEK_HOLE, punch-hole), and the durable
//! filesystem helpers every crate that persists state uses.

pub mod crashsafe;
mod disk;
mod error;
pub mod zeroing;

pub use disk::{DIRECT_ALIGN, Disk, DiskKind, is_zero};

/// Bytes of the files under `dir`, recursively (apparent sizes: what a
/// cache bound counts). Unreadable entries count as empty.
pub fn tree_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => total += tree_bytes(&e.path()),
                Ok(_) => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                Err(_) => {}
            }
        }
    }
    total
}
pub use error::DiskError;
