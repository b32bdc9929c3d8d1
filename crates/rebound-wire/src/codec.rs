//! Body compression. Each frame says which codec it used, so a sender may
//! fall back to `None` for a body that does not shrink.

use crate::WireError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Compression {
    None,
    #[default]
    Lz4,
    Zstd,
}

/// zstd level: fast enough to keep up with a gigabit link on one core.
const ZSTD_LEVEL: i32 = 3;
/// Bodies smaller than this are not worth compressing.
const MIN_COMPRESS: usize = 512;

impl Compression {
    pub fn id(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => 1,
            Compression::Zstd => 2,
        }
    }

    pub fn from_id(id: u8) -> Option<Compression> {
        match id {
            0 => Some(Compression::None),
            1 => Some(Compression::Lz4),
            2 => Some(Compression::Zstd),
            _ => None,
        }
    }

    pub fn parse(s: &str) -> Option<Compression> {
        match s {
            "none" => Some(Compression::None),
            "lz4" => Some(Compression::Lz4),
            "zstd" => Some(Compression::Zstd),
            _ => None,
        }
    }

    /// Compress `raw`; `None` when the codec is `None`, the body is small, or
    /// compression would save less than 1/16 (not worth the receiver's time).
    pub(crate) fn compress(self, raw: &[u8]) -> Option<Vec<u8>> {
        if raw.len() < MIN_COMPRESS {
            return None;
        }
        let out = match self {
            Compression::None => return None,
            Compression::Lz4 => lz4_flex::block::compress(raw),
            Compression::Zstd => zstd::bulk::compress(raw, ZSTD_LEVEL).ok()?,
        };
        (out.len() <= raw.len() - raw.len() / 16).then_some(out)
    }

    pub(crate) fn decompress(self, body: &[u8], raw_len: usize) -> Result<Vec<u8>, WireError> {
        let out = match self {
            Compression::None => return Ok(body.to_vec()),
            Compression::Lz4 => lz4_flex::block::decompress(body, raw_len)
                .map_err(|e| WireError::Corrupt(format!("lz4: {e}")))?,
            Compression::Zstd => zstd::bulk::decompress(body, raw_len)
                .map_err(|e| WireError::Corrupt(format!("zstd: {e}")))?,
        };
        if out.len() != raw_len {
            return Err(WireError::Corrupt(format!(
                "decompressed {} bytes, header says {raw_len}",
                out.len()
            )));
        }
        Ok(out)
    }
}
