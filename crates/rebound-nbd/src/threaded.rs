//! Transmission phase on plain sockets, the fast path: a few worker threads
//! per connection each take the socket's read side, read one request (and its
//! payload), let go, execute it, and write the reply under the write lock.
//! Requests still run concurrently and replies leave out of order, but no
//! request changes threads on its way (the async path costs two hand-offs
//! per request). A byte budget bounds the payload memory of a connection.

use crate::error::NbdError;
use crate::handshake::Transmit;
use crate::proto::*;
use crate::server::ServerConfig;
use crate::transmission::{error_reply, execute, parse_header, validate};
use std::io::{self, BufReader, Cursor, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use tracing::{debug, warn};

/// A blocking socket the workers share.
pub(crate) trait Sock: Send + Sync + 'static {
    fn read_some(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn write_all_bytes(&self, buf: &[u8]) -> io::Result<()>;
    fn shutdown_both(&self);
}

impl Sock for std::os::unix::net::UnixStream {
    fn read_some(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
    fn write_all_bytes(&self, buf: &[u8]) -> io::Result<()> {
        (&*self).write_all(buf)
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

impl Sock for std::net::TcpStream {
    fn read_some(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
    fn write_all_bytes(&self, buf: &[u8]) -> io::Result<()> {
        (&*self).write_all(buf)
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

struct SockReader<S: Sock>(Arc<S>);

impl<S: Sock> Read for SockReader<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read_some(buf)
    }
}

/// Bytes in flight on one connection.
struct Budget {
    left: Mutex<usize>,
    freed: Condvar,
}

impl Budget {
    fn take(&self, n: usize) {
        let mut left = self.left.lock().unwrap_or_else(|p| p.into_inner());
        while *left < n {
            left = self.freed.wait(left).unwrap_or_else(|p| p.into_inner());
        }
        *left -= n;
    }
    fn give(&self, n: usize) {
        *self.left.lock().unwrap_or_else(|p| p.into_inner()) += n;
        self.freed.notify_all();
    }
}

type Reader<S> = BufReader<std::io::Chain<Cursor<Vec<u8>>, SockReader<S>>>;

struct Conn<S: Sock> {
    sock: Arc<S>,
    reader: Mutex<Reader<S>>,
    writer: Mutex<()>,
    t: Transmit,
    budget: Budget,
    closing: AtomicBool,
    /// The first reason the connection ended (clean end: `None`).
    outcome: Mutex<Option<NbdError>>,
}

/// Closes the socket when dropped: the async side uses it so that a
/// cancelled connection (server shutdown) stops its worker threads.
pub(crate) struct CloseOnDrop<S: Sock>(pub Arc<S>);

impl<S: Sock> Drop for CloseOnDrop<S> {
    fn drop(&mut self) {
        self.0.shutdown_both();
    }
}

/// Serve the transmission phase with `workers` threads; `prefix` holds bytes
/// the handshake already read past its end. Blocks until the connection ends.
pub(crate) fn run<S: Sock>(
    sock: Arc<S>,
    prefix: Vec<u8>,
    t: Transmit,
    config: &ServerConfig,
    workers: usize,
) -> Result<(), NbdError> {
    let reader = BufReader::with_capacity(
        64 << 10,
        Cursor::new(prefix).chain(SockReader(sock.clone())),
    );
    let budget = config.max_in_flight_bytes.max(MAX_PAYLOAD as usize + 4096);
    let conn = Arc::new(Conn {
        sock,
        reader: Mutex::new(reader),
        writer: Mutex::new(()),
        t,
        budget: Budget {
            left: Mutex::new(budget),
            freed: Condvar::new(),
        },
        closing: AtomicBool::new(false),
        outcome: Mutex::new(None),
    });
    let span = tracing::Span::current();
    let mut handles = Vec::with_capacity(workers);
    for i in 0..workers.max(1) {
        let conn = conn.clone();
        let span = span.clone();
        let h = std::thread::Builder::new()
            .name(format!("nbd-worker-{i}"))
            .spawn(move || {
                let _g = span.enter();
                worker(&conn);
            })
            .map_err(NbdError::Io)?;
        handles.push(h);
    }
    for h in handles {
        if h.join().is_err() {
            warn!("an NBD worker thread panicked");
        }
    }
    conn.sock.shutdown_both();
    match conn
        .outcome
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Record the end of the connection. Workers waiting for the reader lock see
/// `closing` and stop; the one that noticed the end was the only reader.
fn finish<S: Sock>(conn: &Conn<S>, why: Option<NbdError>) {
    if !conn.closing.swap(true, Ordering::SeqCst)
        && let Some(e) = why
    {
        *conn.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }
}

impl<S: Sock> Conn<S> {
    fn send(&self, reply: &[u8]) {
        let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = self.sock.write_all_bytes(reply) {
            drop(w);
            debug!(error = %e, "writing a reply failed");
            finish(self, None);
            // Unblock the worker sitting in read.
            self.sock.shutdown_both();
        }
    }
}

/// Read one request (and a write's payload) under the reader lock.
/// `Ok(None)`: the connection ends normally.
fn next_request<S: Sock>(
    conn: &Conn<S>,
) -> Result<Option<(crate::transmission::Request, Vec<u8>, usize)>, NbdError> {
    let mut r = conn.reader.lock().unwrap_or_else(|p| p.into_inner());
    if conn.closing.load(Ordering::SeqCst) {
        return Ok(None);
    }
    let mut h = [0u8; 28];
    let mut got = 0;
    while got < h.len() {
        let n = match r.read(&mut h[got..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            if got == 0 {
                debug!("client closed the connection");
                return Ok(None);
            }
            return Err(NbdError::Protocol(format!(
                "stream ended inside a request header ({got} of 28 bytes)"
            )));
        }
        got += n;
    }
    let req = parse_header(&h)?;
    if req.typ == CMD_DISC {
        debug!("client disconnected (NBD_CMD_DISC)");
        return Ok(None);
    }
    if req.typ == CMD_WRITE && req.len > MAX_PAYLOAD {
        return Err(NbdError::Protocol(format!(
            "write of {} bytes exceeds the maximum payload",
            req.len
        )));
    }
    let cost = match req.typ {
        CMD_READ | CMD_WRITE => (req.len as usize).min(MAX_PAYLOAD as usize),
        _ => 0,
    };
    conn.budget.take(cost);
    let mut payload = Vec::new();
    if req.typ == CMD_WRITE {
        payload = vec![0u8; req.len as usize];
        if let Err(e) = r.read_exact(&mut payload) {
            conn.budget.give(cost);
            // Never apply a write whose data did not arrive in full.
            warn!(
                cookie = req.cookie,
                offset = req.offset,
                len = req.len,
                "client vanished mid-write; write dropped unapplied"
            );
            return Err(e.into());
        }
    }
    Ok(Some((req, payload, cost)))
}

fn worker<S: Sock>(conn: &Conn<S>) {
    loop {
        let (req, payload, cost) = match next_request(conn) {
            Ok(Some(x)) => x,
            Ok(None) => {
                finish(conn, None);
                return;
            }
            Err(e) => {
                finish(conn, Some(e));
                return;
            }
        };
        let reply = match validate(&conn.t, &req) {
            Some((errno, msg)) => {
                debug!(
                    cookie = req.cookie,
                    cmd = req.typ,
                    errno,
                    msg,
                    "request refused"
                );
                error_reply(conn.t.structured, &req, errno, msg)
            }
            None => execute(&conn.t.export, conn.t.structured, &req, payload),
        };
        conn.send(&reply);
        drop(reply);
        conn.budget.give(cost);
    }
}
