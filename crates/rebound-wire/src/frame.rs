//! Frames: a 16-byte header (length, tag, codec, raw length, crc32c) and a body.

use crate::msg::tag;
use crate::{Compression, Msg, WireError};
use std::io::Read;

pub const FRAME_HEADER_LEN: usize = 16;
/// Largest body, compressed or not: a chunk of data plus its header with room.
pub const MAX_FRAME_BODY: u32 = 16 << 20;

/// The parsed fixed part of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub len: u32,
    pub tag: u8,
    pub codec: Compression,
    pub raw_len: u32,
    pub crc: u32,
}

fn header_bytes(len: u32, tag: u8, codec: u8, raw_len: u32) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0..4].copy_from_slice(&len.to_le_bytes());
    h[4] = tag;
    h[5] = codec;
    // h[6..8] reserved, zero.
    h[8..12].copy_from_slice(&raw_len.to_le_bytes());
    h
}

/// Encode `msg` into one frame, compressing its body with `compression` when
/// the message is compressible and compression helps.
pub fn encode_frame(msg: &Msg, compression: Compression) -> Vec<u8> {
    encode_frame_reporting(msg, compression).0
}

/// [`encode_frame`], also telling whether the body was compressed. The body
/// is encoded straight after room for the header, so block data is copied
/// once on its way to the socket.
pub fn encode_frame_reporting(msg: &Msg, compression: Compression) -> (Vec<u8>, bool) {
    encode_frame_in(msg, compression, Vec::new())
}

/// [`encode_frame_reporting`] into `out`'s memory (its content is dropped):
/// a sender that recycles frames does not fault in fresh pages per frame.
pub(crate) fn encode_frame_in(
    msg: &Msg,
    compression: Compression,
    mut out: Vec<u8>,
) -> (Vec<u8>, bool) {
    out.clear();
    out.reserve(FRAME_HEADER_LEN + msg.encoded_len_hint());
    out.resize(FRAME_HEADER_LEN, 0);
    let tag = msg.encode_into(&mut out);
    let raw_len = out.len() - FRAME_HEADER_LEN;
    let packed = if msg.compressible() {
        compression.compress(&out[FRAME_HEADER_LEN..])
    } else {
        None
    };
    let codec = match &packed {
        Some(c) => {
            out.truncate(FRAME_HEADER_LEN);
            out.extend_from_slice(c);
            compression
        }
        None => Compression::None,
    };
    let body_len = out.len() - FRAME_HEADER_LEN;
    let head = header_bytes(body_len as u32, tag, codec.id(), raw_len as u32);
    let mut crc = crc32c::crc32c(&head);
    crc = crc32c::crc32c_append(crc, &out[FRAME_HEADER_LEN..]);
    out[..12].copy_from_slice(&head);
    out[12..FRAME_HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    (out, packed.is_some())
}

/// Parse and sanity-check a frame header (not yet its checksum, which covers the body).
pub fn decode_frame_header(h: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, WireError> {
    let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let len = word(0);
    let raw_len = word(8);
    if len > MAX_FRAME_BODY || raw_len > MAX_FRAME_BODY {
        return Err(WireError::TooLarge {
            len: u64::from(len.max(raw_len)),
            limit: u64::from(MAX_FRAME_BODY),
        });
    }
    let codec = Compression::from_id(h[5])
        .ok_or_else(|| WireError::Corrupt(format!("unknown codec {}", h[5])))?;
    if h[6] != 0 || h[7] != 0 {
        return Err(WireError::Corrupt(
            "reserved header bytes are not zero".into(),
        ));
    }
    if codec == Compression::None && raw_len != len {
        return Err(WireError::Corrupt(
            "uncompressed frame with two lengths".into(),
        ));
    }
    Ok(FrameHeader {
        len,
        tag: h[4],
        codec,
        raw_len,
        crc: word(12),
    })
}

/// Read one frame and decode its message. Returns the message and the number
/// of bytes the frame took on the wire.
pub fn read_frame(r: &mut impl Read) -> Result<(Msg, usize), WireError> {
    read_frame_into(r, None)
}

/// [`read_frame`], receiving block data into a buffer from `spares` when one
/// is there (see [`crate::Spares`]).
pub(crate) fn read_frame_into(
    r: &mut impl Read,
    spares: Option<&crossbeam_channel::Receiver<Vec<u8>>>,
) -> Result<(Msg, usize), WireError> {
    let mut h = [0u8; FRAME_HEADER_LEN];
    read_exact(r, &mut h, "between frames", "inside a frame header")?;
    let fh = decode_frame_header(&h)?;
    let mut crc = crc32c::crc32c(&h[..12]);
    if fh.tag == tag::DATA && fh.codec == Compression::None && fh.len >= 8 {
        // Block data lands in a buffer of its own, not copied out of the body.
        let mut offset = [0u8; 8];
        read_exact(r, &mut offset, "inside a frame", "inside a frame")?;
        let spare = spares.and_then(|s| s.try_recv().ok()).unwrap_or_default();
        let bytes = read_vec(r, fh.len as usize - 8, spare)?;
        crc = crc32c::crc32c_append(crc32c::crc32c_append(crc, &offset), &bytes);
        check_crc(crc, &fh)?;
        let msg = Msg::Data {
            offset: u64::from_le_bytes(offset),
            bytes: bytes.into(),
        };
        return Ok((msg, FRAME_HEADER_LEN + fh.len as usize));
    }
    let body = read_vec(r, fh.len as usize, Vec::new())?;
    crc = crc32c::crc32c_append(crc, &body);
    check_crc(crc, &fh)?;
    let raw = match fh.codec {
        Compression::None => body,
        c => c.decompress(&body, fh.raw_len as usize)?,
    };
    let msg = Msg::decode_owned(fh.tag, raw)?;
    Ok((msg, FRAME_HEADER_LEN + fh.len as usize))
}

fn check_crc(crc: u32, fh: &FrameHeader) -> Result<(), WireError> {
    if crc != fh.crc {
        return Err(WireError::Corrupt(format!(
            "checksum mismatch on a frame of tag {:#04x}",
            fh.tag
        )));
    }
    Ok(())
}

/// Read exactly `len` bytes into `v`'s memory (its content is dropped),
/// without zeroing it first.
fn read_vec(r: &mut impl Read, len: usize, mut v: Vec<u8>) -> Result<Vec<u8>, WireError> {
    v.clear();
    v.reserve_exact(len);
    loop {
        match r.by_ref().take((len - v.len()) as u64).read_to_end(&mut v) {
            Ok(_) if v.len() == len => return Ok(v),
            Ok(_) => {
                return Err(WireError::Closed {
                    during: "inside a frame",
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::io("inside a frame", e)),
        }
    }
}

/// Like `read_exact`, telling apart a clean close before the first byte from
/// a close in the middle.
fn read_exact(
    r: &mut impl Read,
    buf: &mut [u8],
    at_start: &'static str,
    in_middle: &'static str,
) -> Result<(), WireError> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => {
                return Err(WireError::Closed {
                    during: if done == 0 { at_start } else { in_middle },
                });
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::io(in_middle, e)),
        }
    }
    Ok(())
}
