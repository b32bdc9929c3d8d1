//! Reading a segment record by record: used to open the active segment (and
//! truncate its torn tail), to rebuild a lost index and to verify checksums.

use crate::format::{
    self, BLOCK, IdxEntry, KIND_COMMIT, KIND_WRITE, PointRec, REC_HEADER_LEN, RecHeader,
};
use crate::fs::FsFile;

/// What a scan found.
#[derive(Debug, Default)]
pub struct Scan {
    pub first_seq: u64,
    /// End of the last complete changeset: the segment's valid length.
    pub end: u64,
    /// Sequence number of the last commit (first_seq - 1 when none).
    pub last_seq: u64,
    pub first_time: u64,
    pub last_time: u64,
    /// Every block write of complete changesets, in append order.
    pub entries: Vec<IdxEntry>,
    pub points: Vec<PointRec>,
    pub data_bytes: u64,
    pub tail_bytes: u64,
    pub records: u64,
    pub file_len: u64,
    /// Offset and description of a corrupt record that durable records follow.
    pub damage: Option<(u64, String)>,
    /// Points found after the damage; never usable.
    pub damaged_points: Vec<PointRec>,
}

/// Parse the record at `pos`; `expect_seq` None skips the sequence check.
fn parse(buf: &[u8], pos: usize, expect_seq: Option<u64>) -> Result<(RecHeader, usize), String> {
    if pos + REC_HEADER_LEN > buf.len() {
        return Err("record header past the end".into());
    }
    let h = RecHeader::decode(&buf[pos..]).ok_or("bad record header")?;
    let total = usize::try_from(h.total_len()).map_err(|_| "record too long")?;
    if pos + total > buf.len() {
        return Err("record past the end".into());
    }
    let meta = &buf[pos + REC_HEADER_LEN..pos + REC_HEADER_LEN + h.meta_len as usize];
    if !format::check_crc(&buf[pos..pos + REC_HEADER_LEN], meta) {
        return Err("record header checksum mismatch".into());
    }
    if let Some(s) = expect_seq
        && h.seq != s
    {
        return Err(format!("sequence {} where {s} was expected", h.seq));
    }
    if h.kind == KIND_WRITE {
        let data = &buf[pos + REC_HEADER_LEN + meta.len()..pos + total];
        for (i, block) in data.chunks(BLOCK as usize).enumerate() {
            if crc32c::crc32c(block) != format::get_u32(meta, i * 4) {
                return Err(format!("data checksum mismatch in block {i}"));
            }
        }
    }
    Ok((h, total))
}

/// Scan a whole segment. `durable_len` is a length known to have been made
/// durable (a sealed segment's length); a bad record before it is damage.
/// Past it, a bad record is a torn tail unless a later good record proves
/// (by its `synced_len`) that the bad one had been synced.
pub fn scan(file: &dyn FsFile, durable_len: u64) -> std::io::Result<Result<Scan, String>> {
    let len = file.len()?;
    let mut buf = vec![0u8; usize::try_from(len).map_err(std::io::Error::other)?];
    file.read_full(&mut buf, 0)?;
    Ok(scan_buf(&buf, durable_len))
}

pub fn scan_buf(buf: &[u8], durable_len: u64) -> Result<Scan, String> {
    let first_seq = format::parse_seg_header(buf)?;
    let mut s = Scan {
        first_seq,
        end: format::SEG_HEADER_LEN,
        last_seq: first_seq.wrapping_sub(1),
        file_len: buf.len() as u64,
        ..Scan::default()
    };
    let mut pos = format::SEG_HEADER_LEN as usize;
    let mut expect = first_seq;
    let mut pending: Vec<IdxEntry> = Vec::new();
    let mut pending_first = 0u64;
    let mut pending_records = 0u32;
    let mut pending_bytes = 0u64;
    let mut since_point = 0u64;
    let mut bad: Option<(usize, String)> = None;
    while pos < buf.len() {
        let (h, total) = match parse(buf, pos, Some(expect)) {
            Ok(r) => r,
            Err(why) => {
                bad = Some((pos, why));
                break;
            }
        };
        s.records += 1;
        if h.kind == KIND_WRITE {
            if pending_records == 0 {
                pending_first = h.seq;
            }
            pending_records += 1;
            pending_bytes += h.len as u64;
            let meta_at = pos + REC_HEADER_LEN;
            let data_at = (meta_at + h.meta_len as usize) as u64;
            for i in 0..(h.len as u64 / BLOCK) {
                pending.push(IdxEntry {
                    disk: h.disk as u32,
                    block: h.offset / BLOCK + i,
                    seq: h.seq,
                    data_off: data_at + i * BLOCK,
                    crc: format::get_u32(buf, meta_at + i as usize * 4),
                });
            }
        } else if h.kind == KIND_COMMIT {
            let consistent = h.count == pending_records
                && (pending_records == 0 || h.offset == pending_first)
                && h.extra == pending_bytes;
            if !consistent {
                bad = Some((pos, "commit does not match its changeset".into()));
                break;
            }
            s.entries.append(&mut pending);
            s.data_bytes += pending_bytes;
            since_point += pending_bytes;
            if s.first_time == 0 {
                s.first_time = h.time_ns;
            }
            s.last_time = h.time_ns;
            if let Some(kind) = format::point_kind_of(h.point) {
                let marker = (h.meta_len > 0).then(|| {
                    let m = &buf[pos + REC_HEADER_LEN..pos + REC_HEADER_LEN + h.meta_len as usize];
                    String::from_utf8_lossy(m).into_owned()
                });
                s.points.push(PointRec {
                    seq: h.seq,
                    time_ns: h.time_ns,
                    kind,
                    marker,
                    bytes: since_point,
                });
                since_point = 0;
            }
            pending_records = 0;
            pending_bytes = 0;
            s.end = (pos + total) as u64;
            s.last_seq = h.seq;
        }
        expect = h.seq + 1;
        pos += total;
    }
    s.tail_bytes = since_point;
    if let Some((at, why)) = bad {
        let proof = if (at as u64) < durable_len {
            Some(at)
        } else {
            find_proof(buf, at)
        };
        if let Some(next) = proof {
            s.damage = Some((at as u64, why));
            s.damaged_points = points_after(buf, next.max(at + 1));
        }
    }
    Ok(s)
}

/// A good record after `bad` whose synced_len covers `bad`.
fn find_proof(buf: &[u8], bad: usize) -> Option<usize> {
    let magic = format::REC_MAGIC.to_le_bytes();
    let mut p = bad + 1;
    while p + REC_HEADER_LEN <= buf.len() {
        if buf[p..p + 4] == magic
            && let Some(h) = RecHeader::decode(&buf[p..])
        {
            let mend = p + REC_HEADER_LEN + h.meta_len as usize;
            if mend <= buf.len()
                && format::check_crc(&buf[p..p + REC_HEADER_LEN], &buf[p + REC_HEADER_LEN..mend])
                && h.synced_len > bad as u64
            {
                return Some(p);
            }
        }
        p += 1;
    }
    None
}

/// Points recorded from `from` on, parsed loosely (they are reported as
/// unusable, never applied).
fn points_after(buf: &[u8], from: usize) -> Vec<PointRec> {
    let magic = format::REC_MAGIC.to_le_bytes();
    let mut out = Vec::new();
    let mut p = from;
    while p + REC_HEADER_LEN <= buf.len() {
        if buf[p..p + 4] == magic
            && let Ok((h, total)) = parse(buf, p, None)
        {
            if h.kind == KIND_COMMIT
                && let Some(kind) = format::point_kind_of(h.point)
            {
                out.push(PointRec {
                    seq: h.seq,
                    time_ns: h.time_ns,
                    kind,
                    marker: None,
                    bytes: 0,
                });
            }
            p += total;
            continue;
        }
        p += 1;
    }
    out
}
