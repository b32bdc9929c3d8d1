//! On-disk format of segments and segment indexes. All integers little-endian.
//!
//! Segment `seg-<first seq>.rjs`: a 64-byte header (magic, version, first
//! sequence number, creation time, crc32c) then records. A record is a
//! 64-byte header, a "meta" part and, for writes, the data:
//!
//! ```text
//!  0 magic u32 | 4 kind u8 | 5 point kind u8 | 6 disk u16 | 8 seq u64
//! 16 time_ns u64 | 24 offset u64 | 32 data len u32 | 36 count u32
//! 40 synced_len u64 | 48 extra u64 | 56 crc32c u32 | 60 meta len u32
//! ```
//!
//! The header crc covers the header (crc field zeroed) and the meta part. A
//! write's meta is one crc32c per 4 KiB block of its data, so one block can
//! be read and verified alone. A commit record ends a changeset (`offset` =
//! first seq of the changeset, `count` = its write records, `extra` = its
//! data bytes) and may close a recovery point (`point kind`, meta = group
//! marker). `synced_len` is how many bytes of the segment were known durable
//! when the record was written: after a crash, a bad record followed by a
//! good one whose `synced_len` lies beyond it is corruption, not a torn tail.

use crate::PointKind;
use rebound_types::LEAF_SIZE;

pub const SEG_MAGIC: [u8; 8] = *b"RBJSEG\0\x01";
pub const IDX_MAGIC: [u8; 8] = *b"RBJIDX\0\x01";
pub const VERSION: u32 = 1;
pub const SEG_HEADER_LEN: u64 = 64;
pub const REC_MAGIC: u32 = 0x4443_4552; // "RECD"
pub const REC_HEADER_LEN: usize = 64;
pub const KIND_WRITE: u8 = 1;
pub const KIND_COMMIT: u8 = 2;
/// Largest data part of one write record; larger writes are split.
pub const MAX_RECORD_DATA: usize = 1 << 20;
pub const MAX_MARKER: usize = 4096;
pub const BLOCK: u64 = LEAF_SIZE;
pub const IDX_HEADER_LEN: usize = 128;
pub const ENTRY_LEN: usize = 32;

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
pub fn get_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}
pub fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
pub fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

pub fn seg_header(first_seq: u64, created_ns: u64) -> [u8; SEG_HEADER_LEN as usize] {
    let mut b = [0u8; SEG_HEADER_LEN as usize];
    b[0..8].copy_from_slice(&SEG_MAGIC);
    put_u32(&mut b, 8, VERSION);
    put_u64(&mut b, 16, first_seq);
    put_u64(&mut b, 24, created_ns);
    let crc = crc32c::crc32c(&b[..60]);
    put_u32(&mut b, 60, crc);
    b
}

/// Decode a segment header: `Ok(first_seq)`, or why not.
pub fn parse_seg_header(b: &[u8]) -> Result<u64, String> {
    if b.len() < SEG_HEADER_LEN as usize || b[0..8] != SEG_MAGIC {
        return Err("not a journal segment (bad magic)".into());
    }
    if crc32c::crc32c(&b[..60]) != get_u32(b, 60) {
        return Err("segment header checksum mismatch".into());
    }
    let v = get_u32(b, 8);
    if v != VERSION {
        return Err(format!(
            "segment format version {v}, this release reads {VERSION}"
        ));
    }
    Ok(get_u64(b, 16))
}

/// A decoded record header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecHeader {
    pub kind: u8,
    pub point: u8,
    pub disk: u16,
    pub seq: u64,
    pub time_ns: u64,
    pub offset: u64,
    pub len: u32,
    pub count: u32,
    pub synced_len: u64,
    pub extra: u64,
    pub meta_len: u32,
}

impl RecHeader {
    pub fn total_len(&self) -> u64 {
        REC_HEADER_LEN as u64 + self.meta_len as u64 + self.len as u64
    }

    /// Encode the header followed by `meta` into `out`.
    pub fn encode_into(&self, meta: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + REC_HEADER_LEN, 0);
        let b = &mut out[start..];
        put_u32(b, 0, REC_MAGIC);
        b[4] = self.kind;
        b[5] = self.point;
        put_u16(b, 6, self.disk);
        put_u64(b, 8, self.seq);
        put_u64(b, 16, self.time_ns);
        put_u64(b, 24, self.offset);
        put_u32(b, 32, self.len);
        put_u32(b, 36, self.count);
        put_u64(b, 40, self.synced_len);
        put_u64(b, 48, self.extra);
        put_u32(b, 60, meta.len() as u32);
        let mut crc = crc32c::crc32c(b);
        crc = crc32c::crc32c_append(crc, meta);
        put_u32(b, 56, crc);
        out.extend_from_slice(meta);
    }

    /// Decode a header whose magic matches; the crc is checked by [`check_crc`].
    pub fn decode(b: &[u8]) -> Option<RecHeader> {
        if b.len() < REC_HEADER_LEN || get_u32(b, 0) != REC_MAGIC {
            return None;
        }
        let h = RecHeader {
            kind: b[4],
            point: b[5],
            disk: get_u16(b, 6),
            seq: get_u64(b, 8),
            time_ns: get_u64(b, 16),
            offset: get_u64(b, 24),
            len: get_u32(b, 32),
            count: get_u32(b, 36),
            synced_len: get_u64(b, 40),
            extra: get_u64(b, 48),
            meta_len: get_u32(b, 60),
        };
        let sane = match h.kind {
            KIND_WRITE => {
                h.len > 0
                    && h.len as usize <= MAX_RECORD_DATA
                    && (h.len as u64).is_multiple_of(BLOCK)
                    && h.meta_len as u64 == h.len as u64 / BLOCK * 4
            }
            KIND_COMMIT => h.len == 0 && h.meta_len as usize <= MAX_MARKER,
            _ => false,
        };
        sane.then_some(h)
    }
}

/// Check the crc of a header `b` (64 bytes) with its `meta`.
pub fn check_crc(b: &[u8], meta: &[u8]) -> bool {
    let mut h = [0u8; REC_HEADER_LEN];
    h.copy_from_slice(&b[..REC_HEADER_LEN]);
    let want = get_u32(&h, 56);
    put_u32(&mut h, 56, 0);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h), meta);
    crc == want
}

pub fn point_kind_code(k: Option<PointKind>) -> u8 {
    match k {
        None => 0,
        Some(PointKind::CrashConsistent) => 1,
        Some(PointKind::AppConsistent) => 2,
        Some(PointKind::Group) => 3,
    }
}

pub fn point_kind_of(c: u8) -> Option<PointKind> {
    match c {
        1 => Some(PointKind::CrashConsistent),
        2 => Some(PointKind::AppConsistent),
        3 => Some(PointKind::Group),
        _ => None,
    }
}

/// Where the latest copy of one 4 KiB block sits in a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct IdxEntry {
    pub disk: u32,
    pub block: u64,
    pub seq: u64,
    /// File offset of the block's data in the segment.
    pub data_off: u64,
    pub crc: u32,
}

impl IdxEntry {
    pub fn key(&self) -> (u32, u64, u64) {
        (self.disk, self.block, self.seq)
    }
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut b = [0u8; ENTRY_LEN];
        put_u64(&mut b, 0, self.block);
        put_u64(&mut b, 8, self.seq);
        put_u64(&mut b, 16, self.data_off);
        put_u32(&mut b, 24, self.disk);
        put_u32(&mut b, 28, self.crc);
        out.extend_from_slice(&b);
    }
    pub fn decode(b: &[u8]) -> IdxEntry {
        IdxEntry {
            block: get_u64(b, 0),
            seq: get_u64(b, 8),
            data_off: get_u64(b, 16),
            disk: get_u32(b, 24),
            crc: get_u32(b, 28),
        }
    }
}

/// A point as recorded in a segment (its commit record).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointRec {
    pub seq: u64,
    pub time_ns: u64,
    pub kind: PointKind,
    pub marker: Option<String>,
    /// Data bytes of the changesets since the previous point of the segment.
    pub bytes: u64,
}

/// Summary of a sealed segment, stored in its index file's header.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SegSummary {
    pub first_seq: u64,
    pub last_seq: u64,
    pub seg_len: u64,
    pub first_time: u64,
    pub last_time: u64,
    pub data_bytes: u64,
    /// Data bytes after the segment's last point.
    pub tail_bytes: u64,
}

/// Index file: 128-byte header, points, entries sorted by (disk, block, seq).
pub fn encode_index(sum: &SegSummary, points: &[PointRec], entries: &[IdxEntry]) -> Vec<u8> {
    let mut pts = Vec::new();
    for p in points {
        let mut b = [0u8; 35];
        put_u64(&mut b, 0, p.seq);
        put_u64(&mut b, 8, p.time_ns);
        put_u64(&mut b, 16, p.bytes);
        b[24] = point_kind_code(Some(p.kind));
        let m = p.marker.as_deref().unwrap_or("").as_bytes();
        put_u16(&mut b, 25, m.len() as u16);
        b[27] = u8::from(p.marker.is_some());
        pts.extend_from_slice(&b);
        pts.extend_from_slice(m);
    }
    let mut ents = Vec::with_capacity(entries.len() * ENTRY_LEN);
    for e in entries {
        e.encode(&mut ents);
    }
    let mut h = vec![0u8; IDX_HEADER_LEN];
    h[0..8].copy_from_slice(&IDX_MAGIC);
    put_u32(&mut h, 8, VERSION);
    put_u64(&mut h, 16, sum.first_seq);
    put_u64(&mut h, 24, sum.last_seq);
    put_u64(&mut h, 32, sum.seg_len);
    put_u64(&mut h, 40, entries.len() as u64);
    put_u64(&mut h, 48, points.len() as u64);
    put_u64(&mut h, 56, pts.len() as u64);
    put_u64(&mut h, 64, sum.first_time);
    put_u64(&mut h, 72, sum.last_time);
    put_u64(&mut h, 80, sum.data_bytes);
    put_u64(&mut h, 88, sum.tail_bytes);
    put_u32(&mut h, 96, crc32c::crc32c(&pts));
    put_u32(&mut h, 100, crc32c::crc32c(&ents));
    let crc = crc32c::crc32c(&h[..124]);
    put_u32(&mut h, 124, crc);
    h.extend_from_slice(&pts);
    h.extend_from_slice(&ents);
    h
}

/// Parse the header (first 128 bytes) of an index file; returns it and the
/// length of the points section that follows.
pub fn parse_index_header(h: &[u8]) -> Result<(SegSummary, u64, u64, u64, u32, u32), String> {
    if h.len() < IDX_HEADER_LEN || h[0..8] != IDX_MAGIC {
        return Err("not a segment index (bad magic)".into());
    }
    if crc32c::crc32c(&h[..124]) != get_u32(h, 124) {
        return Err("index header checksum mismatch".into());
    }
    if get_u32(h, 8) != VERSION {
        return Err(format!("index format version {}", get_u32(h, 8)));
    }
    let sum = SegSummary {
        first_seq: get_u64(h, 16),
        last_seq: get_u64(h, 24),
        seg_len: get_u64(h, 32),
        first_time: get_u64(h, 64),
        last_time: get_u64(h, 72),
        data_bytes: get_u64(h, 80),
        tail_bytes: get_u64(h, 88),
    };
    Ok((
        sum,
        get_u64(h, 40),
        get_u64(h, 48),
        get_u64(h, 56),
        get_u32(h, 96),
        get_u32(h, 100),
    ))
}

pub fn parse_points(b: &[u8], count: u64) -> Result<Vec<PointRec>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    for _ in 0..count {
        if at + 35 > b.len() {
            return Err("points section truncated".into());
        }
        let r = &b[at..at + 35];
        let mlen = get_u16(r, 25) as usize;
        let has = r[27] != 0;
        let kind = point_kind_of(r[24]).ok_or("unknown point kind")?;
        at += 35;
        if at + mlen > b.len() {
            return Err("points section truncated".into());
        }
        let marker = has.then(|| String::from_utf8_lossy(&b[at..at + mlen]).into_owned());
        at += mlen;
        out.push(PointRec {
            seq: get_u64(r, 0),
            time_ns: get_u64(r, 8),
            bytes: get_u64(r, 16),
            kind,
            marker,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_header_round_trip_and_crc() {
        let h = RecHeader {
            kind: KIND_WRITE,
            point: 0,
            disk: 3,
            seq: 42,
            time_ns: 7,
            offset: 8192,
            len: 8192,
            count: 0,
            synced_len: 64,
            extra: 0,
            meta_len: 8,
        };
        let mut out = Vec::new();
        h.encode_into(&[1, 2, 3, 4, 5, 6, 7, 8], &mut out);
        assert_eq!(out.len(), 72);
        let d = RecHeader::decode(&out).unwrap();
        assert_eq!(d, h);
        assert!(check_crc(&out, &out[64..72]));
        out[65] ^= 1;
        assert!(!check_crc(&out, &out[64..72]));
        assert!(parse_seg_header(&seg_header(9, 1)).unwrap() == 9);
        let mut sh = seg_header(9, 1);
        sh[20] ^= 1;
        assert!(parse_seg_header(&sh).is_err());
    }

    #[test]
    fn index_round_trip() {
        let sum = SegSummary {
            first_seq: 1,
            last_seq: 9,
            seg_len: 999,
            first_time: 1,
            last_time: 2,
            data_bytes: 3,
            tail_bytes: 0,
        };
        let pts = vec![
            PointRec {
                seq: 4,
                time_ns: 5,
                kind: PointKind::Group,
                marker: Some("g1".into()),
                bytes: 4096,
            },
            PointRec {
                seq: 9,
                time_ns: 6,
                kind: PointKind::AppConsistent,
                marker: None,
                bytes: 0,
            },
        ];
        let ents = vec![IdxEntry {
            disk: 0,
            block: 1,
            seq: 2,
            data_off: 3,
            crc: 4,
        }];
        let b = encode_index(&sum, &pts, &ents);
        let (s, n, pc, plen, _, _) = parse_index_header(&b).unwrap();
        assert_eq!((s, n, pc), (sum, 1, 2));
        let p = parse_points(&b[IDX_HEADER_LEN..IDX_HEADER_LEN + plen as usize], pc).unwrap();
        assert_eq!(p, pts);
        assert_eq!(
            IdxEntry::decode(&b[IDX_HEADER_LEN + plen as usize..]),
            ents[0]
        );
    }
}
