//! Disk IO for rebound: raw image files and block devices read and written at
//! offsets, sparse-aware (SEEK_DATA/SEEK_HOLE, punch-hole), and the durable
//! filesystem helpers every crate that persists state uses.

pub mod crashsafe;
mod disk;
mod error;
pub mod zeroing;

pub use disk::{DIRECT_ALIGN, Disk, DiskKind, is_zero};
pub use error::DiskError;
