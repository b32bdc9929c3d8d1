//! The block pattern: every 4 KiB block the workload writes names the write
//! that produced it and can be checked on its own.
//!
//! Layout (little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `RBWLBLK1` |
//! | 8..16 | write id |
//! | 16..18 | disk index |
//! | 18..20 | index of this block within its write |
//! | 20..24 | epoch |
//! | 24..32 | byte offset of this block on its disk |
//! | 32..4088 | payload: pseudo-random words from (write id, disk, offset) |
//! | 4088..4096 | XXH3-64 of bytes 0..4088 |

use serde::Serialize;
use xxhash_rust::xxh3::xxh3_64;

/// Size of one pattern block.
pub const BLOCK: usize = 4096;
/// `RBWLBLK1`.
pub const MAGIC: [u8; 8] = *b"RBWLBLK1";
const PAYLOAD: std::ops::Range<usize> = 32..BLOCK - 8;

/// What a block's header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Header {
    pub write_id: u64,
    pub disk: u16,
    pub index: u16,
    pub epoch: u32,
    pub offset: u64,
}

/// What one block read from a disk holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// All zero: never written.
    Zero,
    /// A complete, self-consistent pattern block.
    Pattern(Header),
    /// Not zero and not a pattern block (no magic): foreign data.
    Foreign,
    /// The magic is there but the checksum is not: torn or damaged.
    BadChecksum,
    /// The checksum holds but the payload is not the one its header implies.
    BadPayload(Header),
}

/// The 64-bit word generator of the payload (SplitMix64).
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0); the bias is negligible for our ranges.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

fn seed(write_id: u64, disk: u16, offset: u64) -> u64 {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&write_id.to_le_bytes());
    b[8..10].copy_from_slice(&disk.to_le_bytes());
    b[10..18].copy_from_slice(&offset.to_le_bytes());
    xxh3_64(&b)
}

fn fill_payload(out: &mut [u8], write_id: u64, disk: u16, offset: u64) {
    let mut rng = SplitMix64(seed(write_id, disk, offset));
    for w in out.chunks_exact_mut(8) {
        w.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    let mut x = [0u8; 2];
    x.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(x)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Write the pattern block `h` into `out` (exactly [`BLOCK`] bytes).
pub fn fill_block(out: &mut [u8], h: &Header) {
    debug_assert_eq!(out.len(), BLOCK);
    out[0..8].copy_from_slice(&MAGIC);
    out[8..16].copy_from_slice(&h.write_id.to_le_bytes());
    out[16..18].copy_from_slice(&h.disk.to_le_bytes());
    out[18..20].copy_from_slice(&h.index.to_le_bytes());
    out[20..24].copy_from_slice(&h.epoch.to_le_bytes());
    out[24..32].copy_from_slice(&h.offset.to_le_bytes());
    fill_payload(&mut out[PAYLOAD], h.write_id, h.disk, h.offset);
    let sum = xxh3_64(&out[..BLOCK - 8]);
    out[BLOCK - 8..].copy_from_slice(&sum.to_le_bytes());
}

/// The content of one write: `blocks` pattern blocks starting at `offset`.
pub fn write_buffer(write_id: u64, disk: u16, offset: u64, blocks: u32, epoch: u32) -> Vec<u8> {
    let mut buf = vec![0u8; blocks as usize * BLOCK];
    for (i, b) in buf.chunks_exact_mut(BLOCK).enumerate() {
        fill_block(
            b,
            &Header {
                write_id,
                disk,
                index: i as u16,
                epoch,
                offset: offset + (i * BLOCK) as u64,
            },
        );
    }
    buf
}

/// Classify one block read from a disk (exactly [`BLOCK`] bytes).
pub fn classify(block: &[u8]) -> Content {
    if block.len() != BLOCK {
        return Content::Foreign;
    }
    if block.iter().all(|&b| b == 0) {
        return Content::Zero;
    }
    if block[0..8] != MAGIC {
        return Content::Foreign;
    }
    if xxh3_64(&block[..BLOCK - 8]) != le_u64(block, BLOCK - 8) {
        return Content::BadChecksum;
    }
    let h = Header {
        write_id: le_u64(block, 8),
        disk: le_u16(block, 16),
        index: le_u16(block, 18),
        epoch: le_u32(block, 20),
        offset: le_u64(block, 24),
    };
    let mut expect = [0u8; BLOCK];
    fill_payload(&mut expect[PAYLOAD], h.write_id, h.disk, h.offset);
    if block[PAYLOAD] != expect[PAYLOAD] {
        return Content::BadPayload(h);
    }
    Content::Pattern(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let buf = write_buffer(42, 1, 8192, 3, 2);
        assert_eq!(buf.len(), 3 * BLOCK);
        for i in 0..3 {
            assert_eq!(
                classify(&buf[i * BLOCK..(i + 1) * BLOCK]),
                Content::Pattern(Header {
                    write_id: 42,
                    disk: 1,
                    index: i as u16,
                    epoch: 2,
                    offset: 8192 + (i * BLOCK) as u64
                })
            );
        }
        assert_eq!(classify(&[0u8; BLOCK]), Content::Zero);
        assert_eq!(classify(&[1u8; BLOCK]), Content::Foreign);
        let mut torn = buf[..BLOCK].to_vec();
        torn[2048..].copy_from_slice(&buf[BLOCK + 2048..2 * BLOCK]);
        assert_eq!(classify(&torn), Content::BadChecksum);
        let mut flipped = buf[..BLOCK].to_vec();
        flipped[100] ^= 1;
        assert_eq!(classify(&flipped), Content::BadChecksum);
        // Distinct writes give distinct payloads.
        assert_ne!(
            write_buffer(1, 0, 0, 1, 0)[32..64],
            write_buffer(2, 0, 0, 1, 0)[32..64]
        );
    }
}
