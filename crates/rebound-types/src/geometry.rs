//! Block geometry shared by the delta-sync tree, dirty tracking and the
//! journal. The finest level is 4 KiB because that is what machines write in.

/// Finest unit of comparison, dirty tracking and transfer.
pub const LEAF_SIZE: u64 = 4096;
/// Middle level of the hash tree.
pub const NODE_SIZE: u64 = 64 * 1024;
/// Top level of the hash tree; also the unit of IO and of the resume cursor.
pub const CHUNK_SIZE: u64 = 4 * 1024 * 1024;

pub const LEAVES_PER_NODE: usize = (NODE_SIZE / LEAF_SIZE) as usize;
pub const NODES_PER_CHUNK: usize = (CHUNK_SIZE / NODE_SIZE) as usize;
pub const LEAVES_PER_CHUNK: usize = (CHUNK_SIZE / LEAF_SIZE) as usize;

/// Number of `unit`-sized pieces needed to cover `len` bytes.
pub const fn div_ceil(len: u64, unit: u64) -> u64 {
    len.div_ceil(unit)
}

/// Number of chunks of a disk of `size` bytes (the last may be partial).
pub const fn chunk_count(size: u64) -> u64 {
    div_ceil(size, CHUNK_SIZE)
}

/// Number of leaves of a disk of `size` bytes (the last may be partial).
pub const fn leaf_count(size: u64) -> u64 {
    div_ceil(size, LEAF_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_nest() {
        assert_eq!(LEAVES_PER_NODE * NODES_PER_CHUNK, LEAVES_PER_CHUNK);
        assert_eq!(chunk_count(0), 0);
        assert_eq!(chunk_count(1), 1);
        assert_eq!(chunk_count(CHUNK_SIZE), 1);
        assert_eq!(chunk_count(CHUNK_SIZE + 1), 2);
        assert_eq!(leaf_count(4097), 2);
    }
}
