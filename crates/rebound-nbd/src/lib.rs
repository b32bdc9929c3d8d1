//! An NBD server (protocol only) for rebound's agent: fixed newstyle
//! handshake, `NBD_OPT_GO`/`INFO`/`EXPORT_NAME`/`LIST`/`ABORT`, structured
//! replies, `base:allocation` block status, pipelined requests answered out of
//! order, several connections per export. Storage sits behind
//! [`BlockDevice`]; the server only validates, dispatches and frames.
//!
//! Written from the NBD project's protocol document (`doc/proto.md`).

pub mod client;
mod device;
mod error;
mod handshake;
pub mod proto;
mod server;
mod threaded;
mod transmission;

pub use client::{ClientError, ExportInfo, NbdAddr, NbdClient, NbdUri};
pub use device::{BlockDevice, Caps, DeviceError, Extent, ZeroFlags};
pub use error::NbdError;
pub use server::{ListenAddr, Listener, Server, ServerConfig, Stream};
