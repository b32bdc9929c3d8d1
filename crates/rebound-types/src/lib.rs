//! Shared vocabulary of rebound (DESIGN.md §1): disk geometry, stable error
//! codes with their remedies, and small value types. This crate does no IO so
//! that every other crate, the API and the CLI can depend on it.

pub mod codes;
pub mod geometry;

pub use codes::{Coded, ErrorCode};
pub use geometry::{
    CHUNK_SIZE, LEAF_SIZE, LEAVES_PER_CHUNK, LEAVES_PER_NODE, NODE_SIZE, NODES_PER_CHUNK,
    chunk_count, leaf_count,
};
