//! Every message of the protocol, and its body encoding.
//!
//! Bodies are hand-encoded, little-endian, with bounds-checked decoding: a
//! peer's bytes are never trusted to be well-formed.

use crate::WireError;
use std::ops::Range;
use std::sync::Arc;

/// A 128-bit keyed hash of a tree node. `0` means "all zeros" (holes and zero
/// blocks are never hashed).
pub type Hash128 = u128;

/// The bytes of a `Data` message: owned (as received), or a range of a
/// buffer the sender shares with its own work, so that sending block data
/// does not first copy it out of the chunk it was read into.
#[derive(Clone)]
pub enum Payload {
    Owned(Vec<u8>),
    Shared(Arc<dyn AsRef<[u8]> + Send + Sync>, Range<usize>),
}

impl Payload {
    /// The bytes as an owned vector (a copy only for a shared payload).
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            Payload::Owned(v) => v,
            Payload::Shared(..) => self.to_vec(),
        }
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Payload::Owned(v) => v,
            Payload::Shared(buf, r) => &(**buf).as_ref()[r.clone()],
        }
    }
}

impl From<Vec<u8>> for Payload {
    fn from(v: Vec<u8>) -> Payload {
        Payload::Owned(v)
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        **self == **other
    }
}

impl Eq for Payload {}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Payload({} bytes)", self.len())
    }
}

/// Which way data flows on a sync connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The client is the source; the server's disk is the destination.
    Push,
    /// The server's disk is the source; the client is the destination.
    Pull,
}

/// The client's request to sync a disk of the server's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open {
    pub mode: Mode,
    /// Disk name, relative to the server's root.
    pub name: String,
    /// With `Push`, the source's size; with `Pull`, 0.
    pub source_size: u64,
    pub full: bool,
    pub dry_run: bool,
    pub allow_shrink: bool,
    /// Session to resume (all zero: none) and how many chunks the client
    /// side has durably finished in it.
    pub resume_session: [u8; 16],
    pub resume_chunks: u64,
}

/// The server's answer to [`Open`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    /// The server disk's size (the destination's before the sync with `Push`,
    /// the source's with `Pull`).
    pub size: u64,
    /// The session id both sides persist for resuming.
    pub session: [u8; 16],
    /// Chunks both sides have finished: the sync starts after them.
    pub resume_chunks: u64,
}

/// What the destination did, reported at the end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    // --- handshake ---
    Hello {
        magic: [u8; 8],
        min_version: u16,
        max_version: u16,
        nonce: [u8; 32],
    },
    Challenge {
        version: u16,
        nonce: [u8; 32],
    },
    Auth {
        proof: [u8; 32],
    },
    Welcome {
        proof: [u8; 32],
    },
    /// Either side gives up, with a stable error code.
    Error {
        code: u32,
        message: String,
    },

    // --- session ---
    Open(Open),
    Opened(Opened),

    // --- comparison, destination → source, level by level ---
    /// Top-level (chunk) hashes of consecutive chunks.
    TopHashes {
        first_chunk: u64,
        hashes: Vec<Hash128>,
    },
    /// Source asks for the node hashes of a chunk whose top hash differs.
    WantNodes {
        chunk: u64,
    },
    NodeHashes {
        chunk: u64,
        hashes: Vec<Hash128>,
    },
    /// Source asks for the leaf hashes under the nodes set in `mask`.
    WantLeaves {
        chunk: u64,
        mask: u64,
    },
    /// Leaf hashes of the nodes in `mask`, in node order.
    LeafHashes {
        chunk: u64,
        mask: u64,
        hashes: Vec<Hash128>,
    },

    // --- data, source → destination ---
    Data {
        offset: u64,
        bytes: Payload,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    /// No more data for `chunk`; `blake3` is the source's hash of it.
    ChunkEnd {
        chunk: u64,
        blake3: [u8; 32],
    },
    /// Destination: chunks `[0, chunks)` are durable.
    Durable {
        chunks: u64,
    },
    Finish {
        root: [u8; 32],
    },
    Finished {
        root: [u8; 32],
        stats: SyncStats,
    },
}

pub(crate) mod tag {
    pub const HELLO: u8 = 0x01;
    pub const CHALLENGE: u8 = 0x02;
    pub const AUTH: u8 = 0x03;
    pub const WELCOME: u8 = 0x04;
    pub const ERROR: u8 = 0x05;
    pub const OPEN: u8 = 0x10;
    pub const OPENED: u8 = 0x11;
    pub const TOP_HASHES: u8 = 0x20;
    pub const WANT_NODES: u8 = 0x21;
    pub const NODE_HASHES: u8 = 0x22;
    pub const WANT_LEAVES: u8 = 0x23;
    pub const LEAF_HASHES: u8 = 0x24;
    pub const DATA: u8 = 0x30;
    pub const ZERO: u8 = 0x31;
    pub const CHUNK_END: u8 = 0x32;
    pub const DURABLE: u8 = 0x33;
    pub const FINISH: u8 = 0x40;
    pub const FINISHED: u8 = 0x41;
}

/// Longest hash list a message may carry (a whole chunk's leaves).
const MAX_HASHES: usize = 1 << 16;
const MAX_STRING: usize = 4096;

struct Out(Vec<u8>);

impl Out {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
    fn string(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.bytes(s.as_bytes());
    }
    fn hashes(&mut self, hs: &[Hash128]) {
        self.u32(hs.len() as u32);
        for h in hs {
            self.0.extend_from_slice(&h.to_le_bytes());
        }
    }
}

struct In<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> In<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Corrupt(format!(
                "{} body is truncated",
                self.what
            )));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn bool(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(WireError::Corrupt(format!(
                "{}: invalid boolean {v}",
                self.what
            ))),
        }
    }
    fn string(&mut self) -> Result<String, WireError> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return Err(WireError::Corrupt(format!(
                "{}: string of {n} bytes",
                self.what
            )));
        }
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| WireError::Corrupt(format!("{}: string is not UTF-8", self.what)))
    }
    fn hashes(&mut self) -> Result<Vec<Hash128>, WireError> {
        let n = self.u32()? as usize;
        if n > MAX_HASHES {
            return Err(WireError::Corrupt(format!("{}: {n} hashes", self.what)));
        }
        let raw = self.take(n * 16)?;
        Ok(raw
            .chunks_exact(16)
            .map(|c| {
                let mut a = [0u8; 16];
                a.copy_from_slice(c);
                u128::from_le_bytes(a)
            })
            .collect())
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    fn end(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Corrupt(format!(
                "{}: {} trailing bytes",
                self.what,
                self.buf.len()
            )))
        }
    }
}

impl Msg {
    /// A short name for logs and error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "hello",
            Msg::Challenge { .. } => "challenge",
            Msg::Auth { .. } => "auth",
            Msg::Welcome { .. } => "welcome",
            Msg::Error { .. } => "error",
            Msg::Open(_) => "open",
            Msg::Opened(_) => "opened",
            Msg::TopHashes { .. } => "top-hashes",
            Msg::WantNodes { .. } => "want-nodes",
            Msg::NodeHashes { .. } => "node-hashes",
            Msg::WantLeaves { .. } => "want-leaves",
            Msg::LeafHashes { .. } => "leaf-hashes",
            Msg::Data { .. } => "data",
            Msg::Zero { .. } => "zero",
            Msg::ChunkEnd { .. } => "chunk-end",
            Msg::Durable { .. } => "durable",
            Msg::Finish { .. } => "finish",
            Msg::Finished { .. } => "finished",
        }
    }

    /// Whether the body is worth compressing (only block data is).
    pub fn compressible(&self) -> bool {
        matches!(self, Msg::Data { .. })
    }

    /// The frame tag and the encoded body.
    pub fn encode(&self) -> (u8, Vec<u8>) {
        let mut body = Vec::with_capacity(self.encoded_len_hint());
        let t = self.encode_into(&mut body);
        (t, body)
    }

    /// About how many bytes the body takes (exact for block data).
    pub(crate) fn encoded_len_hint(&self) -> usize {
        match self {
            Msg::Data { bytes, .. } => bytes.len() + 8,
            _ => 64,
        }
    }

    /// Append the encoded body to `out`; returns the frame tag. Lets a frame
    /// be built in one buffer, header room first, without copying the body.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) -> u8 {
        let mut o = Out(std::mem::take(out));
        let t = match self {
            Msg::Hello {
                magic,
                min_version,
                max_version,
                nonce,
            } => {
                o.bytes(magic);
                o.u16(*min_version);
                o.u16(*max_version);
                o.bytes(nonce);
                tag::HELLO
            }
            Msg::Challenge { version, nonce } => {
                o.u16(*version);
                o.bytes(nonce);
                tag::CHALLENGE
            }
            Msg::Auth { proof } => {
                o.bytes(proof);
                tag::AUTH
            }
            Msg::Welcome { proof } => {
                o.bytes(proof);
                tag::WELCOME
            }
            Msg::Error { code, message } => {
                o.u32(*code);
                o.string(message);
                tag::ERROR
            }
            Msg::Open(op) => {
                o.u8(match op.mode {
                    Mode::Push => 0,
                    Mode::Pull => 1,
                });
                o.string(&op.name);
                o.u64(op.source_size);
                o.u8(op.full as u8);
                o.u8(op.dry_run as u8);
                o.u8(op.allow_shrink as u8);
                o.bytes(&op.resume_session);
                o.u64(op.resume_chunks);
                tag::OPEN
            }
            Msg::Opened(op) => {
                o.u64(op.size);
                o.bytes(&op.session);
                o.u64(op.resume_chunks);
                tag::OPENED
            }
            Msg::TopHashes {
                first_chunk,
                hashes,
            } => {
                o.u64(*first_chunk);
                o.hashes(hashes);
                tag::TOP_HASHES
            }
            Msg::WantNodes { chunk } => {
                o.u64(*chunk);
                tag::WANT_NODES
            }
            Msg::NodeHashes { chunk, hashes } => {
                o.u64(*chunk);
                o.hashes(hashes);
                tag::NODE_HASHES
            }
            Msg::WantLeaves { chunk, mask } => {
                o.u64(*chunk);
                o.u64(*mask);
                tag::WANT_LEAVES
            }
            Msg::LeafHashes {
                chunk,
                mask,
                hashes,
            } => {
                o.u64(*chunk);
                o.u64(*mask);
                o.hashes(hashes);
                tag::LEAF_HASHES
            }
            Msg::Data { offset, bytes } => {
                o.u64(*offset);
                o.bytes(bytes);
                tag::DATA
            }
            Msg::Zero { offset, len } => {
                o.u64(*offset);
                o.u64(*len);
                tag::ZERO
            }
            Msg::ChunkEnd { chunk, blake3 } => {
                o.u64(*chunk);
                o.bytes(blake3);
                tag::CHUNK_END
            }
            Msg::Durable { chunks } => {
                o.u64(*chunks);
                tag::DURABLE
            }
            Msg::Finish { root } => {
                o.bytes(root);
                tag::FINISH
            }
            Msg::Finished { root, stats } => {
                o.bytes(root);
                o.u64(stats.bytes_read);
                o.u64(stats.bytes_written);
                o.u64(stats.bytes_zeroed);
                tag::FINISHED
            }
        };
        *out = o.0;
        t
    }

    /// Decode a body received with frame tag `t`, taking it: block data keeps
    /// the body's buffer instead of copying it.
    pub(crate) fn decode_owned(t: u8, mut body: Vec<u8>) -> Result<Msg, WireError> {
        if t != tag::DATA {
            return Msg::decode(t, &body);
        }
        let offset = In {
            buf: &body,
            what: "data",
        }
        .u64()?;
        body.drain(..8);
        Ok(Msg::Data {
            offset,
            bytes: body.into(),
        })
    }

    /// Decode a body received with frame tag `t`.
    pub fn decode(t: u8, body: &[u8]) -> Result<Msg, WireError> {
        let mut i = In {
            buf: body,
            what: "message",
        };
        let msg = match t {
            tag::HELLO => {
                i.what = "hello";
                Msg::Hello {
                    magic: i.array()?,
                    min_version: i.u16()?,
                    max_version: i.u16()?,
                    nonce: i.array()?,
                }
            }
            tag::CHALLENGE => Msg::Challenge {
                version: i.u16()?,
                nonce: i.array()?,
            },
            tag::AUTH => Msg::Auth { proof: i.array()? },
            tag::WELCOME => Msg::Welcome { proof: i.array()? },
            tag::ERROR => Msg::Error {
                code: i.u32()?,
                message: i.string()?,
            },
            tag::OPEN => {
                i.what = "open";
                let mode = match i.u8()? {
                    0 => Mode::Push,
                    1 => Mode::Pull,
                    m => return Err(WireError::Corrupt(format!("open: unknown mode {m}"))),
                };
                Msg::Open(Open {
                    mode,
                    name: i.string()?,
                    source_size: i.u64()?,
                    full: i.bool()?,
                    dry_run: i.bool()?,
                    allow_shrink: i.bool()?,
                    resume_session: i.array()?,
                    resume_chunks: i.u64()?,
                })
            }
            tag::OPENED => Msg::Opened(Opened {
                size: i.u64()?,
                session: i.array()?,
                resume_chunks: i.u64()?,
            }),
            tag::TOP_HASHES => Msg::TopHashes {
                first_chunk: i.u64()?,
                hashes: i.hashes()?,
            },
            tag::WANT_NODES => Msg::WantNodes { chunk: i.u64()? },
            tag::NODE_HASHES => Msg::NodeHashes {
                chunk: i.u64()?,
                hashes: i.hashes()?,
            },
            tag::WANT_LEAVES => Msg::WantLeaves {
                chunk: i.u64()?,
                mask: i.u64()?,
            },
            tag::LEAF_HASHES => Msg::LeafHashes {
                chunk: i.u64()?,
                mask: i.u64()?,
                hashes: i.hashes()?,
            },
            tag::DATA => Msg::Data {
                offset: i.u64()?,
                bytes: i.rest().to_vec().into(),
            },
            tag::ZERO => Msg::Zero {
                offset: i.u64()?,
                len: i.u64()?,
            },
            tag::CHUNK_END => Msg::ChunkEnd {
                chunk: i.u64()?,
                blake3: i.array()?,
            },
            tag::DURABLE => Msg::Durable { chunks: i.u64()? },
            tag::FINISH => Msg::Finish { root: i.array()? },
            tag::FINISHED => Msg::Finished {
                root: i.array()?,
                stats: SyncStats {
                    bytes_read: i.u64()?,
                    bytes_written: i.u64()?,
                    bytes_zeroed: i.u64()?,
                },
            },
            other => {
                return Err(WireError::Corrupt(format!(
                    "unknown message tag {other:#04x}"
                )));
            }
        };
        i.end()?;
        Ok(msg)
    }
}
