//! The block-device trait the server exports. Storage lives behind it; the
//! protocol crate never touches a file.

use crate::proto;
use std::ops::Range;

/// What a device can do; the server advertises exactly these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    pub read_only: bool,
    /// Flush and FUA on one connection cover writes made on every other
    /// connection (one shared backing file, no private caches).
    pub multi_conn: bool,
    pub trim: bool,
    pub write_zeroes: bool,
    /// `write_zeroes` can report quickly that zeroing would be slow.
    pub fast_zero: bool,
    /// `block_status` reports holes (`base:allocation`).
    pub block_status: bool,
}

/// Flags of a WRITE_ZEROES request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Keep the range allocated (no hole may be punched).
    pub no_hole: bool,
    /// Fail with [`DeviceError::NotSupported`] rather than write zeros slowly.
    pub fast: bool,
    pub fua: bool,
}

/// One extent of `base:allocation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// Unallocated; reads as zeros.
    pub hole: bool,
}

/// Failure of a device operation; each maps to the NBD errno the client sees.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("input/output error: {0}")]
    Io(String),
    #[error("no space left")]
    NoSpace,
    #[error("operation not supported quickly")]
    NotSupported,
    #[error("not permitted: {0}")]
    NotPermitted(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("export is shutting down")]
    Shutdown,
}

impl DeviceError {
    pub fn errno(&self) -> u32 {
        match self {
            DeviceError::Io(_) => proto::EIO,
            DeviceError::NoSpace => proto::ENOSPC,
            DeviceError::NotSupported => proto::ENOTSUP,
            DeviceError::NotPermitted(_) => proto::EPERM,
            DeviceError::Invalid(_) => proto::EINVAL,
            DeviceError::Shutdown => proto::ESHUTDOWN,
        }
    }
}

/// A byte-addressed device. Calls are blocking and may come from several
/// threads at once (requests are pipelined and connections are parallel);
/// the server runs them off the async reactor. The server has already checked
/// that every range lies inside `size()` and that writes are allowed.
pub trait BlockDevice: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn caps(&self) -> Caps;
    /// Fill `buf` from `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError>;
    /// Return only once `data` is in the backing store (and durable with `fua`).
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError>;
    /// Make every completed write durable; a consistency barrier.
    fn flush(&self) -> Result<(), DeviceError>;
    /// The client no longer needs `range`; contents afterwards are unspecified
    /// by the protocol (we make them read as zeros).
    fn trim(&self, range: Range<u64>, fua: bool) -> Result<(), DeviceError>;
    /// Make `range` read as zeros.
    fn write_zeroes(&self, range: Range<u64>, flags: ZeroFlags) -> Result<(), DeviceError>;
    /// Allocation status from `range.start`; may cover less than `range` but
    /// at least one byte, and at most `max_extents` extents.
    fn block_status(
        &self,
        range: Range<u64>,
        max_extents: usize,
    ) -> Result<Vec<Extent>, DeviceError>;
}
