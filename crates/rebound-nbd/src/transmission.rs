//! The transmission phase. One task reads requests in order; each request
//! runs on the blocking pool (device calls are blocking IO) and sends its
//! reply to a writer task, so replies go out as requests complete, matched by
//! cookie. A byte budget bounds what one connection holds in memory.

use crate::device::{DeviceError, ZeroFlags};
use crate::error::NbdError;
use crate::handshake::Transmit;
use crate::proto::*;
use crate::server::{Export, ServerConfig};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::{Instrument, debug, warn};

/// Budget unit: the semaphore counts KiB so 32-bit permits cover large budgets.
const UNIT: usize = 1024;
/// Extents per BLOCK_STATUS reply; the client asks again for the rest.
const MAX_EXTENTS: usize = 1024;

pub(crate) struct Request {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

type Reply = (Vec<u8>, Option<OwnedSemaphorePermit>);

fn simple_reply(cookie: u64, error: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(16);
    b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b
}

fn structured_header(b: &mut Vec<u8>, flags: u16, typ: u16, cookie: u64, len: u32) {
    b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
}

fn structured_error(cookie: u64, error: u32, msg: &str) -> Vec<u8> {
    let msg = &msg.as_bytes()[..msg.len().min(256)];
    let mut b = Vec::with_capacity(20 + 6 + msg.len());
    structured_header(
        &mut b,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

/// An error reply in the form the command's reply must take.
pub(crate) fn error_reply(structured: bool, req: &Request, error: u32, msg: &str) -> Vec<u8> {
    // READ and BLOCK_STATUS must be answered with structured replies once
    // they are negotiated; other commands may use simple replies.
    if structured && (req.typ == CMD_READ || req.typ == CMD_BLOCK_STATUS) {
        structured_error(req.cookie, error, msg)
    } else {
        simple_reply(req.cookie, error)
    }
}

fn in_range(offset: u64, len: u64, size: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}

/// Check a request against the export and the negotiated features. Returns
/// the errno to answer with, if any.
pub(crate) fn validate(t: &Transmit, req: &Request) -> Option<(u32, &'static str)> {
    let caps = t.export.device.caps();
    let size = t.export.device.size();
    let allowed = match req.typ {
        CMD_READ => {
            if t.structured {
                CMD_FLAG_DF
            } else {
                0
            }
        }
        CMD_WRITE | CMD_TRIM | CMD_FLUSH => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => {
            CMD_FLAG_FUA
                | CMD_FLAG_NO_HOLE
                | if caps.fast_zero {
                    CMD_FLAG_FAST_ZERO
                } else {
                    0
                }
        }
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => return Some((EINVAL, "unknown command")),
    };
    if req.flags & !allowed != 0 {
        return Some((EINVAL, "flag not allowed for this command"));
    }
    let writes = matches!(req.typ, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && caps.read_only {
        return Some((EPERM, "export is read-only"));
    }
    match req.typ {
        CMD_TRIM if !caps.trim => return Some((EINVAL, "trim not supported")),
        CMD_WRITE_ZEROES if !caps.write_zeroes => {
            return Some((EINVAL, "write zeroes not supported"));
        }
        CMD_BLOCK_STATUS if !t.base_allocation => {
            return Some((EINVAL, "no metadata context negotiated"));
        }
        CMD_BLOCK_STATUS if req.len == 0 => return Some((EINVAL, "zero-length block status")),
        CMD_READ if req.len > MAX_PAYLOAD => {
            return Some((
                if t.structured { EOVERFLOW } else { EINVAL },
                "read larger than the maximum block size",
            ));
        }
        _ => {}
    }
    if req.typ != CMD_FLUSH && !in_range(req.offset, req.len as u64, size) {
        return Some((EINVAL, "request beyond the end of the export"));
    }
    None
}

/// Run a device call, turning a panic into EIO so one bad request cannot
/// leave its client waiting forever.
fn guarded<T>(f: impl FnOnce() -> Result<T, DeviceError>) -> Result<T, DeviceError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => Err(DeviceError::Io("device panicked".into())),
    }
}

/// Execute a validated request (write payload in `payload`) and build its reply.
pub(crate) fn execute(
    export: &Export,
    structured: bool,
    req: &Request,
    payload: Vec<u8>,
) -> Vec<u8> {
    let dev = &export.device;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let range = req.offset..req.offset + req.len as u64;
    let fail = |e: DeviceError| {
        warn!(export = %export.name, cookie = req.cookie, cmd = req.typ, offset = req.offset, len = req.len, error = %e, "request failed");
        error_reply(structured, req, e.errno(), &e.to_string())
    };
    match req.typ {
        CMD_READ => {
            let len = req.len as usize;
            if structured {
                if len == 0 {
                    let mut b = Vec::with_capacity(20);
                    structured_header(&mut b, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0);
                    return b;
                }
                let mut b = Vec::with_capacity(28 + len);
                structured_header(
                    &mut b,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    req.cookie,
                    8 + req.len,
                );
                b.extend_from_slice(&req.offset.to_be_bytes());
                b.resize(28 + len, 0);
                match guarded(|| dev.read(req.offset, &mut b[28..])) {
                    Ok(()) => b,
                    Err(e) => fail(e),
                }
            } else {
                let mut b = simple_reply(req.cookie, 0);
                b.resize(16 + len, 0);
                match guarded(|| dev.read(req.offset, &mut b[16..])) {
                    Ok(()) => b,
                    Err(e) => fail(e),
                }
            }
        }
        CMD_WRITE => match guarded(|| dev.write(req.offset, &payload, fua)) {
            Ok(()) => simple_reply(req.cookie, 0),
            Err(e) => fail(e),
        },
        CMD_FLUSH => match guarded(|| dev.flush()) {
            Ok(()) => simple_reply(req.cookie, 0),
            Err(e) => fail(e),
        },
        CMD_TRIM => match guarded(|| dev.trim(range, fua)) {
            Ok(()) => simple_reply(req.cookie, 0),
            Err(e) => fail(e),
        },
        CMD_WRITE_ZEROES => {
            let flags = ZeroFlags {
                no_hole: req.flags & CMD_FLAG_NO_HOLE != 0,
                fast: req.flags & CMD_FLAG_FAST_ZERO != 0,
                fua,
            };
            match guarded(|| dev.write_zeroes(range, flags)) {
                Ok(()) => simple_reply(req.cookie, 0),
                // A refused fast zero is an expected answer, not a failure.
                Err(DeviceError::NotSupported) if flags.fast => simple_reply(req.cookie, ENOTSUP),
                Err(e) => fail(e),
            }
        }
        CMD_BLOCK_STATUS => {
            let max = if req.flags & CMD_FLAG_REQ_ONE != 0 {
                1
            } else {
                MAX_EXTENTS
            };
            match guarded(|| dev.block_status(range.clone(), max)) {
                Ok(extents) => block_status_reply(req, &extents, max),
                Err(e) => fail(e),
            }
        }
        _ => error_reply(structured, req, EINVAL, "unknown command"),
    }
}

fn block_status_reply(req: &Request, extents: &[crate::device::Extent], max: usize) -> Vec<u8> {
    let mut descs: Vec<(u32, u32)> = Vec::with_capacity(extents.len().min(max));
    let mut left = req.len as u64;
    for e in extents {
        if left == 0 || descs.len() == max {
            break;
        }
        let len = e.len.min(left);
        if len == 0 {
            continue;
        }
        let flags = if e.hole { STATE_HOLE | STATE_ZERO } else { 0 };
        // Merge neighbours with the same status: fewer bytes on the wire.
        match descs.last_mut() {
            Some((l, f)) if *f == flags => *l += len as u32,
            _ => descs.push((len as u32, flags)),
        }
        left -= len;
    }
    if descs.is_empty() {
        // The device reported nothing: say "allocated", which is always true enough.
        descs.push((req.len, 0));
    }
    let payload_len = 4 + 8 * descs.len() as u32;
    let mut b = Vec::with_capacity(20 + payload_len as usize);
    structured_header(
        &mut b,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        req.cookie,
        payload_len,
    );
    b.extend_from_slice(&META_BASE_ALLOCATION_ID.to_be_bytes());
    for (l, f) in descs {
        b.extend_from_slice(&l.to_be_bytes());
        b.extend_from_slice(&f.to_be_bytes());
    }
    b
}

/// Read a request header. `Ok(None)` on a clean end of stream between
/// requests; an error if the stream ends inside a header.
async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Request>, NbdError> {
    let mut h = [0u8; 28];
    let mut got = 0;
    while got < h.len() {
        let n = r.read(&mut h[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(NbdError::Protocol(format!(
                "stream ended inside a request header ({got} of 28 bytes)"
            )));
        }
        got += n;
    }
    parse_header(&h).map(Some)
}

/// Decode a 28-byte request header.
pub(crate) fn parse_header(h: &[u8; 28]) -> Result<Request, NbdError> {
    let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    if magic != REQUEST_MAGIC {
        return Err(NbdError::Protocol(format!("bad request magic {magic:#x}")));
    }
    let be64 = |b: &[u8]| u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    Ok(Request {
        flags: u16::from_be_bytes([h[4], h[5]]),
        typ: u16::from_be_bytes([h[6], h[7]]),
        cookie: be64(&h[8..16]),
        offset: be64(&h[16..24]),
        len: u32::from_be_bytes([h[24], h[25], h[26], h[27]]),
    })
}

async fn writer_task<W: AsyncWrite + Unpin>(
    w: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(256 << 10, w);
    while let Some((buf, permit)) = rx.recv().await {
        w.write_all(&buf).await?;
        drop(permit);
        // Batch replies that are already waiting into one flush.
        while let Ok((buf, permit)) = rx.try_recv() {
            w.write_all(&buf).await?;
            drop(permit);
        }
        w.flush().await?;
    }
    w.shutdown().await
}

pub(crate) async fn run<R, W>(
    mut r: R,
    w: W,
    t: Transmit,
    config: &ServerConfig,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let t = Arc::new(t);
    let budget_units = (config
        .max_in_flight_bytes
        .max(MAX_PAYLOAD as usize + 64 * UNIT)
        / UNIT) as u32;
    let budget = Arc::new(Semaphore::new(budget_units as usize));
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer = tokio::spawn(writer_task(w, rx).in_current_span());

    let result = loop {
        let req = match read_request(&mut r).await {
            Ok(Some(req)) => req,
            Ok(None) => {
                debug!("client closed the connection");
                break Ok(());
            }
            Err(e) => break Err(e),
        };
        if req.typ == CMD_DISC {
            debug!("client disconnected (NBD_CMD_DISC)");
            break Ok(());
        }
        // A write's payload follows its header whatever we think of it.
        if req.typ == CMD_WRITE && req.len > MAX_PAYLOAD {
            break Err(NbdError::Protocol(format!(
                "write of {} bytes exceeds the maximum payload",
                req.len
            )));
        }
        let carries = match req.typ {
            CMD_READ | CMD_WRITE => (req.len as usize).min(MAX_PAYLOAD as usize),
            _ => 0,
        };
        let units = (carries / UNIT + 1) as u32;
        let Ok(permit) = budget.clone().acquire_many_owned(units).await else {
            break Ok(());
        };
        let mut payload = Vec::new();
        if req.typ == CMD_WRITE {
            payload = vec![0u8; req.len as usize];
            if let Err(e) = r.read_exact(&mut payload).await {
                // Never apply a write whose data did not arrive in full.
                warn!(
                    cookie = req.cookie,
                    offset = req.offset,
                    len = req.len,
                    "client vanished mid-write; write dropped unapplied"
                );
                break Err(e.into());
            }
        }
        if let Some((errno, msg)) = validate(&t, &req) {
            debug!(
                cookie = req.cookie,
                cmd = req.typ,
                errno,
                msg,
                "request refused"
            );
            let _ = tx.send((error_reply(t.structured, &req, errno, msg), Some(permit)));
            continue;
        }
        let t2 = t.clone();
        let tx2 = tx.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _g = span.enter();
            let reply = execute(&t2.export, t2.structured, &req, payload);
            // The receiver is gone only if the connection already failed.
            let _ = tx2.send((reply, Some(permit)));
        });
    };
    // Replies of requests still running go out before we close (NBD_CMD_DISC
    // requires it; for a dead peer the writes just fail).
    drop(tx);
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "writing replies failed"),
        Err(e) => warn!(error = %e, "reply writer failed"),
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Extent;

    #[test]
    fn block_status_merges_and_clips() {
        let req = Request {
            flags: 0,
            typ: CMD_BLOCK_STATUS,
            cookie: 7,
            offset: 0,
            len: 10_000,
        };
        let ext = [
            Extent {
                len: 4096,
                hole: true,
            },
            Extent {
                len: 4096,
                hole: true,
            },
            Extent {
                len: 8192,
                hole: false,
            },
        ];
        let b = block_status_reply(&req, &ext, 16);
        // header 20 + ctx 4 + two descriptors
        assert_eq!(b.len(), 20 + 4 + 16);
        assert_eq!(u32::from_be_bytes([b[24], b[25], b[26], b[27]]), 8192);
        assert_eq!(
            u32::from_be_bytes([b[28], b[29], b[30], b[31]]),
            STATE_HOLE | STATE_ZERO
        );
        assert_eq!(
            u32::from_be_bytes([b[32], b[33], b[34], b[35]]),
            10_000 - 8192
        );
        let one = block_status_reply(&req, &ext[2..], 1);
        assert_eq!(one.len(), 20 + 4 + 8);
    }

    #[test]
    fn ranges() {
        assert!(in_range(0, 10, 10));
        assert!(!in_range(1, 10, 10));
        assert!(!in_range(u64::MAX, 2, u64::MAX));
    }
}
