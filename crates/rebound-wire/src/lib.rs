//! The wire protocol between rebound peers (sync client and server today;
//! agent, process server and master target later).
//!
//! A connection starts with a handshake that negotiates the protocol version
//! and authenticates both sides with a shared token (challenge–response: the
//! token never crosses the wire). After it, every message travels in one
//! frame:
//!
//! ```text
//! 0      4      5      6      8          12         16
//! | len  | tag  | codec| rsv  | raw_len  | crc32c   | body (len bytes) ...
//! ```
//!
//! `len` is the body's length on the wire, `raw_len` its length once
//! decompressed, `codec` 0 = none, 1 = lz4, 2 = zstd, and `crc32c` covers the
//! first 12 header bytes and the body. A frame is checked before any of its
//! content is used. Integers are little-endian.
//!
//! Changing the encoding of any message or of the frame means bumping
//! [`PROTOCOL_VERSION`]; the golden-byte tests in `tests/golden.rs` fail
//! otherwise.

mod codec;
mod conn;
mod error;
mod frame;
mod handshake;
mod msg;

pub use codec::Compression;
pub use conn::{Counters, FrameReader, FrameWriter, Spares, spawn_reader, spawn_writer};
pub use error::WireError;
pub use frame::{FRAME_HEADER_LEN, MAX_FRAME_BODY, decode_frame_header, encode_frame, read_frame};
pub use handshake::{HELLO_MAGIC, Handshake, Token, client_handshake, server_handshake};
pub use msg::{Hash128, Mode, Msg, Open, Opened, Payload, SyncStats};

/// The protocol version this build speaks by default. Bump it on any change to
/// the encoding of a frame or a message.
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
