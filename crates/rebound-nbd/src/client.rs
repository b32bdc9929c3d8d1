//! A small synchronous NBD client: fixed newstyle handshake, `NBD_OPT_GO`
//! with an export name, simple replies only (structured replies are never
//! negotiated), and the commands READ, WRITE (optionally FUA), FLUSH and
//! DISC. One request is in flight per connection; parallelism comes from
//! several connections. Used by `rebound workload` and `rebound verify`.
//!
//! Nothing read from the wire is trusted: option replies are bounded, the
//! cookie and magic of every reply are checked, and read payloads are only
//! ever as long as what we asked for.

use crate::proto::*;
use rebound_types::{Coded, ErrorCode};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// The default NBD TCP port.
pub const DEFAULT_PORT: u16 = 10809;
/// Largest option reply we accept during the handshake.
const MAX_OPTION_REPLY: u32 = 1 << 20;
/// Largest single request we send; bigger reads and writes are split.
const MAX_CHUNK: u32 = 4 << 20;
/// The oldstyle negotiation's second magic (not supported).
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;

/// Failures of the NBD client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid NBD URI {uri:?}: {reason}")]
    BadUri { uri: String, reason: String },
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("the NBD server refused export {export:?}: {message}")]
    ExportRefused { export: String, message: String },
    #[error("the NBD server broke the protocol: {0}")]
    Protocol(String),
    #[error("NBD {command} of {len} bytes at offset {offset} failed with errno {errno}")]
    Request {
        command: &'static str,
        offset: u64,
        len: u64,
        errno: u32,
    },
    #[error("request of {len} bytes at offset {offset} is outside the export ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the export is read-only")]
    ReadOnly,
    #[error("NBD connection: {0}")]
    Io(#[from] io::Error),
}

impl ClientError {
    /// True when the connection is unusable (the server went away or broke
    /// the protocol), as opposed to one request failing.
    pub fn is_disconnect(&self) -> bool {
        matches!(self, ClientError::Io(_) | ClientError::Protocol(_))
    }
}

impl Coded for ClientError {
    fn code(&self) -> ErrorCode {
        match self {
            ClientError::BadUri { .. } | ClientError::OutOfRange { .. } => {
                ErrorCode::InvalidArgument
            }
            ClientError::Connect { .. } => ErrorCode::ConnectFailed,
            ClientError::ExportRefused { .. } => ErrorCode::NbdExportRefused,
            ClientError::Protocol(_) => ErrorCode::NbdServerProtocol,
            ClientError::Request { .. } => ErrorCode::NbdRequestFailed,
            ClientError::ReadOnly => ErrorCode::DestinationReadOnly,
            ClientError::Io(_) => ErrorCode::PeerClosed,
        }
    }
}

/// Where an NBD server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddr {
    Unix(PathBuf),
    /// `HOST:PORT` (an IPv6 host in brackets).
    Tcp(String),
}

/// An export on a server: `nbd+unix:///EXPORT?socket=PATH` or
/// `nbd://HOST[:PORT]/EXPORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    pub addr: NbdAddr,
    pub export: String,
}

impl NbdUri {
    /// Whether `s` looks like an NBD URI (as opposed to a file path).
    pub fn is_uri(s: &str) -> bool {
        s.starts_with("nbd://") || s.starts_with("nbd+unix://") || s.starts_with("nbd+tcp://")
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl FromStr for NbdUri {
    type Err = ClientError;
    fn from_str(s: &str) -> Result<NbdUri, ClientError> {
        let bad = |reason: &str| ClientError::BadUri {
            uri: s.to_string(),
            reason: reason.to_string(),
        };
        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            bad("expected nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH")
        })?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export =
            percent_decode(path).ok_or_else(|| bad("bad percent-encoding in the export name"))?;
        match scheme {
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(bad(
                        "nbd+unix takes no host: nbd+unix:///EXPORT?socket=PATH",
                    ));
                }
                let mut socket = None;
                for param in query.unwrap_or("").split('&') {
                    if let Some(v) = param.strip_prefix("socket=") {
                        socket = Some(
                            percent_decode(v)
                                .ok_or_else(|| bad("bad percent-encoding in socket"))?,
                        );
                    }
                }
                let socket = socket
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| bad("missing ?socket=PATH"))?;
                Ok(NbdUri {
                    addr: NbdAddr::Unix(PathBuf::from(socket)),
                    export,
                })
            }
            "nbd" | "nbd+tcp" => {
                if authority.is_empty() {
                    return Err(bad("missing host"));
                }
                // A port is present when the text after the last ':' is not
                // inside IPv6 brackets.
                let has_port = match authority.rfind(':') {
                    Some(i) => !authority[i..].contains(']'),
                    None => false,
                };
                let hostport = if has_port {
                    let (host, port) = authority
                        .rsplit_once(':')
                        .ok_or_else(|| bad("missing host"))?;
                    if host.is_empty() || port.parse::<u16>().is_err() {
                        return Err(bad("invalid host or port"));
                    }
                    authority.to_string()
                } else {
                    format!("{authority}:{DEFAULT_PORT}")
                };
                Ok(NbdUri {
                    addr: NbdAddr::Tcp(hostport),
                    export,
                })
            }
            _ => Err(bad("unknown scheme (nbd, nbd+unix)")),
        }
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.addr {
            NbdAddr::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
            NbdAddr::Tcp(a) => write!(f, "nbd://{a}/{}", self.export),
        }
    }
}

enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Conn {
    fn shutdown(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Conn::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

/// What the server told us about the export in the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub transmission_flags: u16,
    /// (minimum, preferred, maximum) block sizes, when the server sent them.
    pub block_size: Option<(u32, u32, u32)>,
}

/// One connection to one export, in the transmission phase.
pub struct NbdClient {
    conn: Conn,
    info: ExportInfo,
    export: String,
    next_cookie: u64,
    max_chunk: u32,
    broken: bool,
    closed: bool,
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    let mut x = [0u8; 2];
    x.copy_from_slice(&b[at..at + 2]);
    u16::from_be_bytes(x)
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(x)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_FLUSH => "FLUSH",
        CMD_DISC => "DISC",
        _ => "command",
    }
}

impl NbdClient {
    /// Connect to `uri` and negotiate its export with `NBD_OPT_GO`.
    pub fn connect(uri: &NbdUri) -> Result<NbdClient, ClientError> {
        let conn = match &uri.addr {
            NbdAddr::Unix(p) => {
                Conn::Unix(
                    UnixStream::connect(p).map_err(|source| ClientError::Connect {
                        addr: format!("unix:{}", p.display()),
                        source,
                    })?,
                )
            }
            NbdAddr::Tcp(a) => {
                let s = TcpStream::connect(a.as_str()).map_err(|source| ClientError::Connect {
                    addr: a.clone(),
                    source,
                })?;
                s.set_nodelay(true)?;
                Conn::Tcp(s)
            }
        };
        Self::handshake(conn, &uri.export)
    }

    /// Negotiate `export` over an already connected stream.
    fn handshake(mut conn: Conn, export: &str) -> Result<NbdClient, ClientError> {
        // A server that accepts but never speaks must not hang us forever.
        conn.set_timeout(Some(Duration::from_secs(30)))?;
        let mut greet = [0u8; 18];
        conn.read_exact(&mut greet)?;
        if be_u64(&greet, 0) != NBDMAGIC {
            return Err(ClientError::Protocol(
                "not an NBD server (bad magic)".into(),
            ));
        }
        match be_u64(&greet, 8) {
            IHAVEOPT => {}
            OLDSTYLE_MAGIC => {
                return Err(ClientError::Protocol(
                    "oldstyle negotiation is not supported".into(),
                ));
            }
            m => return Err(ClientError::Protocol(format!("bad option magic {m:#x}"))),
        }
        let server_flags = be_u16(&greet, 16);
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(ClientError::Protocol(
                "server does not speak fixed newstyle".into(),
            ));
        }
        let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
        if server_flags & FLAG_NO_ZEROES != 0 {
            client_flags |= FLAG_C_NO_ZEROES;
        }
        let name = export.as_bytes();
        let name_len = u32::try_from(name.len())
            .ok()
            .filter(|&n| n <= 4096)
            .ok_or_else(|| ClientError::ExportRefused {
                export: export.to_string(),
                message: "export name longer than 4096 bytes".into(),
            })?;
        let mut msg = Vec::with_capacity(32 + name.len());
        msg.extend_from_slice(&client_flags.to_be_bytes());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&OPT_GO.to_be_bytes());
        msg.extend_from_slice(&(4 + name_len + 2 + 2).to_be_bytes());
        msg.extend_from_slice(&name_len.to_be_bytes());
        msg.extend_from_slice(name);
        msg.extend_from_slice(&1u16.to_be_bytes());
        msg.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        conn.write_all(&msg)?;

        let mut size_flags: Option<(u64, u16)> = None;
        let mut block_size = None;
        loop {
            let mut hdr = [0u8; 20];
            conn.read_exact(&mut hdr)?;
            if be_u64(&hdr, 0) != OPT_REPLY_MAGIC {
                return Err(ClientError::Protocol("bad option reply magic".into()));
            }
            if be_u32(&hdr, 8) != OPT_GO {
                return Err(ClientError::Protocol(format!(
                    "reply to option {} while negotiating GO",
                    be_u32(&hdr, 8)
                )));
            }
            let kind = be_u32(&hdr, 12);
            let len = be_u32(&hdr, 16);
            if len > MAX_OPTION_REPLY {
                return Err(ClientError::Protocol(format!(
                    "option reply of {len} bytes exceeds the limit"
                )));
            }
            let mut data = vec![0u8; len as usize];
            conn.read_exact(&mut data)?;
            match kind {
                REP_ACK => break,
                REP_INFO => {
                    if data.len() < 2 {
                        return Err(ClientError::Protocol("short NBD_REP_INFO".into()));
                    }
                    match be_u16(&data, 0) {
                        INFO_EXPORT => {
                            if data.len() != 12 {
                                return Err(ClientError::Protocol(
                                    "NBD_INFO_EXPORT of the wrong length".into(),
                                ));
                            }
                            size_flags = Some((be_u64(&data, 2), be_u16(&data, 10)));
                        }
                        INFO_BLOCK_SIZE => {
                            if data.len() != 14 {
                                return Err(ClientError::Protocol(
                                    "NBD_INFO_BLOCK_SIZE of the wrong length".into(),
                                ));
                            }
                            block_size =
                                Some((be_u32(&data, 2), be_u32(&data, 6), be_u32(&data, 10)));
                        }
                        _ => {} // other information is optional; ignore it
                    }
                }
                k if k & (1 << 31) != 0 => {
                    let text = String::from_utf8_lossy(&data).into_owned();
                    let what = match k {
                        REP_ERR_UNKNOWN => "unknown export",
                        REP_ERR_UNSUP => "NBD_OPT_GO not supported",
                        REP_ERR_POLICY => "refused by policy",
                        REP_ERR_INVALID => "invalid request",
                        REP_ERR_TOO_BIG => "request too big",
                        _ => "error",
                    };
                    return Err(ClientError::ExportRefused {
                        export: export.to_string(),
                        message: if text.is_empty() {
                            what.to_string()
                        } else {
                            format!("{what}: {text}")
                        },
                    });
                }
                k => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected option reply type {k} to NBD_OPT_GO"
                    )));
                }
            }
        }
        let (size, transmission_flags) = size_flags.ok_or_else(|| {
            ClientError::Protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into())
        })?;
        let max_chunk = match block_size {
            Some((_, _, max)) if max >= 4096 => max.min(MAX_CHUNK),
            _ => MAX_CHUNK,
        };
        conn.set_timeout(None)?;
        Ok(NbdClient {
            conn,
            info: ExportInfo {
                size,
                transmission_flags,
                block_size,
            },
            export: export.to_string(),
            next_cookie: 1,
            max_chunk,
            broken: false,
            closed: false,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// What the handshake told us.
    pub fn info(&self) -> ExportInfo {
        self.info
    }

    /// The export's name.
    pub fn export(&self) -> &str {
        &self.export
    }

    pub fn read_only(&self) -> bool {
        self.info.transmission_flags & TF_READ_ONLY != 0
    }

    /// Bound the time one request may take (None: wait forever).
    pub fn set_timeout(&self, t: Option<Duration>) -> Result<(), ClientError> {
        Ok(self.conn.set_timeout(t)?)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.info.size => Ok(()),
            _ => Err(ClientError::OutOfRange {
                offset,
                len,
                size: self.info.size,
            }),
        }
    }

    fn send(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<u64, ClientError> {
        if self.broken {
            return Err(ClientError::Protocol(
                "the connection failed earlier".into(),
            ));
        }
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let mut req = [0u8; 28];
        req[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req[4..6].copy_from_slice(&flags.to_be_bytes());
        req[6..8].copy_from_slice(&cmd.to_be_bytes());
        req[8..16].copy_from_slice(&cookie.to_be_bytes());
        req[16..24].copy_from_slice(&offset.to_be_bytes());
        req[24..28].copy_from_slice(&len.to_be_bytes());
        let r = if data.is_empty() {
            self.conn.write_all(&req)
        } else {
            let mut buf = Vec::with_capacity(req.len() + data.len());
            buf.extend_from_slice(&req);
            buf.extend_from_slice(data);
            self.conn.write_all(&buf)
        };
        if let Err(e) = r {
            self.broken = true;
            return Err(e.into());
        }
        Ok(cookie)
    }

    /// Read the simple reply to `cookie`; for a successful READ, its payload
    /// into `payload` (exactly the length requested).
    fn reply(
        &mut self,
        cmd: u16,
        cookie: u64,
        offset: u64,
        payload: &mut [u8],
    ) -> Result<(), ClientError> {
        let r = self.reply_inner(cmd, cookie, offset, payload);
        if let Err(e) = &r
            && e.is_disconnect()
        {
            self.broken = true;
        }
        r
    }

    fn reply_inner(
        &mut self,
        cmd: u16,
        cookie: u64,
        offset: u64,
        payload: &mut [u8],
    ) -> Result<(), ClientError> {
        let mut hdr = [0u8; 16];
        self.conn.read_exact(&mut hdr)?;
        match be_u32(&hdr, 0) {
            SIMPLE_REPLY_MAGIC => {}
            STRUCTURED_REPLY_MAGIC => {
                return Err(ClientError::Protocol(
                    "structured reply although none was negotiated".into(),
                ));
            }
            m => return Err(ClientError::Protocol(format!("bad reply magic {m:#x}"))),
        }
        let errno = be_u32(&hdr, 4);
        let got = be_u64(&hdr, 8);
        if got != cookie {
            return Err(ClientError::Protocol(format!(
                "reply for cookie {got}, expected {cookie}"
            )));
        }
        if errno != 0 {
            return Err(ClientError::Request {
                command: command_name(cmd),
                offset,
                len: payload.len() as u64,
                errno,
            });
        }
        if cmd == CMD_READ {
            self.conn.read_exact(payload)?;
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(self.max_chunk as usize);
            let at = offset + done as u64;
            let cookie = self.send(CMD_READ, 0, at, n as u32, &[])?;
            self.reply(CMD_READ, cookie, at, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Write `data` at `offset`; with `fua`, the data is durable when this
    /// returns (FUA when the server offers it, else a FLUSH after).
    pub fn write_at(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        if self.read_only() {
            return Err(ClientError::ReadOnly);
        }
        self.check_range(offset, data.len() as u64)?;
        let use_fua = fua && self.info.transmission_flags & TF_SEND_FUA != 0;
        let flags = if use_fua { CMD_FLAG_FUA } else { 0 };
        let mut done = 0usize;
        while done < data.len() {
            let n = (data.len() - done).min(self.max_chunk as usize);
            let at = offset + done as u64;
            let cookie = self.send(CMD_WRITE, flags, at, n as u32, &data[done..done + n])?;
            self.reply(CMD_WRITE, cookie, at, &mut [])
                .map_err(|e| match e {
                    ClientError::Request {
                        command,
                        errno,
                        offset,
                        ..
                    } => ClientError::Request {
                        command,
                        offset,
                        len: n as u64,
                        errno,
                    },
                    e => e,
                })?;
            done += n;
        }
        if fua && !use_fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Make every completed write durable (a no-op when the server says it
    /// needs no flushes).
    pub fn flush(&mut self) -> Result<(), ClientError> {
        if self.info.transmission_flags & TF_SEND_FLUSH == 0 {
            return Ok(());
        }
        let cookie = self.send(CMD_FLUSH, 0, 0, 0, &[])?;
        self.reply(CMD_FLUSH, cookie, 0, &mut [])
    }

    /// Send NBD_CMD_DISC and close the connection.
    pub fn disconnect(mut self) -> Result<(), ClientError> {
        self.closed = true;
        let r = self.send(CMD_DISC, 0, 0, 0, &[]);
        self.conn.shutdown();
        r.map(|_| ())
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        if !self.closed && !self.broken {
            let _ = self.send(CMD_DISC, 0, 0, 0, &[]);
        }
        self.conn.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NbdUri, ClientError> {
        s.parse()
    }

    #[test]
    fn uris() -> Result<(), ClientError> {
        assert_eq!(
            parse("nbd+unix:///disk0?socket=/run/a.sock")?,
            NbdUri {
                addr: NbdAddr::Unix("/run/a.sock".into()),
                export: "disk0".into()
            }
        );
        assert_eq!(
            parse("nbd://host:1234/d%20x")?,
            NbdUri {
                addr: NbdAddr::Tcp("host:1234".into()),
                export: "d x".into()
            }
        );
        assert_eq!(
            parse("nbd://host")?,
            NbdUri {
                addr: NbdAddr::Tcp("host:10809".into()),
                export: String::new()
            }
        );
        assert_eq!(
            parse("nbd://[::1]/e")?.addr,
            NbdAddr::Tcp("[::1]:10809".into())
        );
        assert_eq!(
            parse("nbd://[::1]:99/e")?.addr,
            NbdAddr::Tcp("[::1]:99".into())
        );
        for bad in [
            "nbd+unix:///x",
            "nbd+unix://host/x?socket=/a",
            "nbd:///x",
            "nbd://h:notaport/x",
            "http://h/x",
            "/dev/sda",
            "nbd://h/%zz",
        ] {
            assert!(parse(bad).is_err(), "{bad} parsed");
        }
        assert!(NbdUri::is_uri("nbd://h/x"));
        assert!(!NbdUri::is_uri("/tmp/x.img"));
        Ok(())
    }
}
