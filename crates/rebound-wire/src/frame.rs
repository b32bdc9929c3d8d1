//! Frames: a 16-byte header (length, tag, codec, raw length, crc32c) and a body.

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

/// [`encode_frame`], also telling whether the body was compressed.
pub fn encode_frame_reporting(msg: &Msg, compression: Compression) -> (Vec<u8>, bool) {
    let (tag, raw) = msg.encode();
    let packed = if msg.compressible() {
        compression.compress(&raw)
    } else {
        None
    };
    let (codec, body) = match &packed {
        Some(c) => (compression, c.as_slice()),
        None => (Compression::None, raw.as_slice()),
    };
    let head = header_bytes(body.len() as u32, tag, codec.id(), raw.len() as u32);
    let mut crc = crc32c::crc32c(&head);
    crc = crc32c::crc32c_append(crc, body);
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    out.extend_from_slice(&head);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(body);
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
    let mut h = [0u8; FRAME_HEADER_LEN];
    read_exact(r, &mut h, "between frames", "inside a frame header")?;
    let fh = decode_frame_header(&h)?;
    let mut body = vec![0u8; fh.len as usize];
    read_exact(r, &mut body, "inside a frame", "inside a frame")?;
    let mut crc = crc32c::crc32c(&h[..12]);
    crc = crc32c::crc32c_append(crc, &body);
    if crc != fh.crc {
        return Err(WireError::Corrupt(format!(
            "checksum mismatch on a frame of tag {:#04x}",
            fh.tag
        )));
    }
    let raw = match fh.codec {
        Compression::None => body,
        c => c.decompress(&body, fh.raw_len as usize)?,
    };
    let msg = Msg::decode(fh.tag, &raw)?;
    Ok((msg, FRAME_HEADER_LEN + fh.len as usize))
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
