//! Protocol tests with a hand-written client over a real unix socket against
//! an in-memory device: handshake options and their errors, structured and
//! simple replies, pipelining, validation, and hostile clients.
#![allow(clippy::unwrap_used)]

use rebound_nbd::proto::*;
use rebound_nbd::{
    BlockDevice, Caps, DeviceError, Extent, ListenAddr, Listener, Server, ServerConfig, ZeroFlags,
};
use std::io::{Read, Write};
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SIZE: u64 = 1 << 20;

/// Memory-backed device; zeroed 4 KiB blocks count as holes. Writes can be
/// slowed down to force out-of-order completion.
struct Mem {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    slow_offset: Option<u64>,
}

impl BlockDevice for Mem {
    fn size(&self) -> u64 {
        SIZE
    }
    fn caps(&self) -> Caps {
        Caps {
            read_only: self.read_only,
            multi_conn: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            block_status: true,
        }
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        if Some(offset) == self.slow_offset {
            std::thread::sleep(Duration::from_millis(300));
        }
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), DeviceError> {
        self.data.lock().unwrap()[offset as usize..offset as usize + data.len()]
            .copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    fn trim(&self, range: Range<u64>, _fua: bool) -> Result<(), DeviceError> {
        self.data.lock().unwrap()[range.start as usize..range.end as usize].fill(0);
        Ok(())
    }
    fn write_zeroes(&self, range: Range<u64>, flags: ZeroFlags) -> Result<(), DeviceError> {
        if flags.fast && flags.no_hole {
            return Err(DeviceError::NotSupported);
        }
        self.trim(range, false)
    }
    fn block_status(&self, range: Range<u64>, max: usize) -> Result<Vec<Extent>, DeviceError> {
        let d = self.data.lock().unwrap();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = range.start;
        while pos < range.end && out.len() < max {
            let end = ((pos / 4096 + 1) * 4096).min(range.end);
            let hole = d[pos as usize..end as usize].iter().all(|&b| b == 0);
            match out.last_mut() {
                Some(e) if e.hole == hole => e.len += end - pos,
                _ => out.push(Extent {
                    len: end - pos,
                    hole,
                }),
            }
            pos = end;
        }
        Ok(out)
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take() {
            let _ = self.rt.block_on(d);
        }
    }
}

fn start() -> Fixture {
    start_with(false)
}

/// `async_path`: serve through `Server::serve_halves` (the all-async path a
/// TLS stream would take) instead of the threaded socket path.
fn start_with(async_path: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut server = Server::new(ServerConfig {
        handshake_timeout: Duration::from_secs(2),
        ..Default::default()
    });
    let rw = Arc::new(Mem {
        data: Mutex::new(vec![0; SIZE as usize]),
        read_only: false,
        slow_offset: Some(8192),
    });
    let ro = Arc::new(Mem {
        data: Mutex::new(vec![7; SIZE as usize]),
        read_only: true,
        slow_offset: None,
    });
    server.add_export("rw", "writable", rw).unwrap();
    server.add_export("ro", "", ro).unwrap();
    assert!(
        server
            .add_export(
                "ro",
                "",
                Arc::new(Mem {
                    data: Mutex::new(vec![]),
                    read_only: true,
                    slow_offset: None
                })
            )
            .is_err()
    );
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    if async_path {
        let l = rt
            .block_on(async { tokio::net::UnixListener::bind(&sock) })
            .unwrap();
        let server = Arc::new(server);
        let done = rt.spawn(async move {
            tokio::select! {
                _ = rx => {}
                _ = async {
                    while let Ok((s, _)) = l.accept().await {
                        let server = server.clone();
                        tokio::spawn(async move {
                            let (r, w) = s.into_split();
                            let _ = server.serve_halves(r, w).await;
                        });
                    }
                } => {}
            }
        });
        return Fixture {
            _dir: dir,
            sock,
            rt,
            stop: Some(tx),
            done: Some(done),
        };
    }
    let listener = rt
        .block_on(Listener::bind(&ListenAddr::Unix(sock.clone())))
        .unwrap();
    let done = rt.spawn(async move {
        Arc::new(server)
            .serve(listener, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    Fixture {
        _dir: dir,
        sock,
        rt,
        stop: Some(tx),
        done: Some(done),
    }
}

struct Client {
    s: UnixStream,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

impl Client {
    /// Connect and read the greeting; send client flags.
    fn connect(sock: &Path, client_flags: u32) -> Client {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Client { s };
        let g = c.read_n(18);
        assert_eq!(be64(&g), NBDMAGIC);
        assert_eq!(be64(&g[8..]), IHAVEOPT);
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        c.s.write_all(&client_flags.to_be_bytes()).unwrap();
        c
    }
    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }
    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }
    /// One option reply: (type, data).
    fn opt_reply(&mut self, opt: u32) -> (u32, Vec<u8>) {
        let h = self.read_n(20);
        assert_eq!(be64(&h), OPT_REPLY_MAGIC);
        assert_eq!(be32(&h[8..]), opt);
        let len = be32(&h[16..]) as usize;
        (be32(&h[12..]), self.read_n(len))
    }
    /// Replies up to and including the final ACK or error.
    fn opt_replies(&mut self, opt: u32) -> Vec<(u32, Vec<u8>)> {
        let mut all = Vec::new();
        loop {
            let r = self.opt_reply(opt);
            let last = r.0 == REP_ACK || r.0 & (1 << 31) != 0;
            all.push(r);
            if last {
                return all;
            }
        }
    }
    fn info_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }
    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }
    /// Negotiate up to transmission: structured replies + base:allocation + GO.
    /// Returns (size, transmission flags).
    fn go(&mut self, name: &str, structured: bool) -> (u64, u16) {
        if structured {
            self.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(self.opt_reply(OPT_STRUCTURED_REPLY).0, REP_ACK);
            self.option(
                OPT_SET_META_CONTEXT,
                &Self::meta_data(name, &["base:allocation"]),
            );
            let r = self.opt_replies(OPT_SET_META_CONTEXT);
            assert_eq!(r.len(), 2);
            assert_eq!(r[0].0, REP_META_CONTEXT);
            assert_eq!(be32(&r[0].1), META_BASE_ALLOCATION_ID);
        }
        self.option(OPT_GO, &Self::info_data(name, &[INFO_BLOCK_SIZE]));
        let r = self.opt_replies(OPT_GO);
        assert_eq!(r.last().unwrap().0, REP_ACK, "GO failed: {r:?}");
        let exp = r
            .iter()
            .find(|(t, d)| *t == REP_INFO && d[..2] == [0, 0])
            .expect("NBD_INFO_EXPORT");
        let bs = r
            .iter()
            .find(|(t, d)| *t == REP_INFO && d[..2] == [0, 3])
            .expect("NBD_INFO_BLOCK_SIZE");
        assert_eq!(be32(&bs.1[2..]), 1);
        assert_eq!(be32(&bs.1[6..]), 4096);
        assert_eq!(be32(&bs.1[10..]), 32 << 20);
        (
            be64(&exp.1[2..]),
            u16::from_be_bytes([exp.1[10], exp.1[11]]),
        )
    }
    fn request(&mut self, typ: u16, flags: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }
    /// A simple reply: (cookie, error).
    fn simple(&mut self) -> (u64, u32) {
        let h = self.read_n(16);
        assert_eq!(be32(&h), SIMPLE_REPLY_MAGIC);
        (be64(&h[8..]), be32(&h[4..]))
    }
    /// Any reply: Simple(cookie, error) or Structured(cookie, flags, type, payload).
    fn any(&mut self) -> Reply {
        let m = be32(&self.read_n(4));
        if m == SIMPLE_REPLY_MAGIC {
            let h = self.read_n(12);
            Reply::Simple(be64(&h[4..]), be32(&h))
        } else {
            assert_eq!(m, STRUCTURED_REPLY_MAGIC);
            let h = self.read_n(16);
            let len = be32(&h[12..]) as usize;
            let flags = u16::from_be_bytes([h[0], h[1]]);
            let typ = u16::from_be_bytes([h[2], h[3]]);
            Reply::Structured(be64(&h[4..]), flags, typ, self.read_n(len))
        }
    }
    /// The server closed the connection (EOF, or reset).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

#[derive(Debug, PartialEq)]
enum Reply {
    Simple(u64, u32),
    Structured(u64, u16, u16, Vec<u8>),
}

#[test]
fn handshake_options_and_errors() {
    let f = start();
    let mut c = Client::connect(&f.sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    // LIST: both exports then ACK; with data: INVALID.
    c.option(OPT_LIST, &[]);
    let r = c.opt_replies(OPT_LIST);
    let names: Vec<String> = r
        .iter()
        .filter(|(t, _)| *t == REP_SERVER)
        .map(|(_, d)| String::from_utf8(d[4..4 + be32(d) as usize].to_vec()).unwrap())
        .collect();
    assert_eq!(names, vec!["ro", "rw"]);
    c.option(OPT_LIST, b"x");
    assert_eq!(c.opt_reply(OPT_LIST).0, REP_ERR_INVALID);
    // Unknown options, STARTTLS (not configured): UNSUP, connection stays.
    c.option(4242, b"whatever");
    assert_eq!(c.opt_reply(4242).0, REP_ERR_UNSUP);
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.opt_reply(OPT_STARTTLS).0, REP_ERR_UNSUP);
    // Meta contexts need structured replies first.
    c.option(
        OPT_SET_META_CONTEXT,
        &Client::meta_data("rw", &["base:allocation"]),
    );
    assert_eq!(c.opt_reply(OPT_SET_META_CONTEXT).0, REP_ERR_INVALID);
    c.option(OPT_STRUCTURED_REPLY, b"junk");
    assert_eq!(c.opt_reply(OPT_STRUCTURED_REPLY).0, REP_ERR_INVALID);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.opt_reply(OPT_STRUCTURED_REPLY).0, REP_ACK);
    // LIST_META_CONTEXT: no query lists base:allocation; foreign namespaces are ignored.
    c.option(OPT_LIST_META_CONTEXT, &Client::meta_data("rw", &[]));
    let r = c.opt_replies(OPT_LIST_META_CONTEXT);
    assert_eq!(r.len(), 2);
    assert_eq!(&r[0].1[4..], b"base:allocation");
    c.option(
        OPT_LIST_META_CONTEXT,
        &Client::meta_data("rw", &["qemu:dirty-bitmap:x"]),
    );
    assert_eq!(
        c.opt_replies(OPT_LIST_META_CONTEXT),
        vec![(REP_ACK, vec![])]
    );
    c.option(OPT_LIST_META_CONTEXT, &Client::meta_data("nope", &[]));
    assert_eq!(c.opt_reply(OPT_LIST_META_CONTEXT).0, REP_ERR_UNKNOWN);
    // Truncated meta data.
    let mut bad = Client::meta_data("rw", &["base:allocation"]);
    bad.truncate(bad.len() - 3);
    c.option(OPT_SET_META_CONTEXT, &bad);
    assert_eq!(c.opt_reply(OPT_SET_META_CONTEXT).0, REP_ERR_INVALID);
    // INFO: unknown export, malformed, then a good one with the name.
    c.option(OPT_INFO, &Client::info_data("nope", &[]));
    assert_eq!(c.opt_reply(OPT_INFO).0, REP_ERR_UNKNOWN);
    c.option(OPT_INFO, &[0, 0, 0, 9, b'r']);
    assert_eq!(c.opt_reply(OPT_INFO).0, REP_ERR_INVALID);
    c.option(
        OPT_INFO,
        &Client::info_data("ro", &[INFO_NAME, INFO_DESCRIPTION]),
    );
    let r = c.opt_replies(OPT_INFO);
    assert_eq!(r.last().unwrap().0, REP_ACK);
    let exp = r
        .iter()
        .find(|(t, d)| *t == REP_INFO && d[..2] == [0, 0])
        .unwrap();
    let flags = u16::from_be_bytes([exp.1[10], exp.1[11]]);
    assert_ne!(flags & TF_READ_ONLY, 0);
    assert_eq!(flags & TF_SEND_TRIM, 0);
    assert!(
        r.iter()
            .any(|(t, d)| *t == REP_INFO && d[..2] == [0, 1] && &d[2..] == b"ro")
    );
    // A huge option is skipped and refused, not fatal.
    c.option(77, &vec![0u8; 100_000]);
    assert_eq!(c.opt_reply(77).0, REP_ERR_TOO_BIG);
    // GO still works after all that.
    let (size, flags) = c.go("rw", true);
    assert_eq!(size, SIZE);
    for f in [
        TF_HAS_FLAGS,
        TF_SEND_FLUSH,
        TF_SEND_FUA,
        TF_SEND_TRIM,
        TF_SEND_WRITE_ZEROES,
        TF_CAN_MULTI_CONN,
        TF_SEND_DF,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x}");
    }
    c.request(CMD_DISC, 0, 1, 0, 0, &[]);
    assert!(c.closed());

    // ABORT is acknowledged; EXPORT_NAME of an unknown export closes.
    let mut c = Client::connect(&f.sock, FLAG_C_FIXED_NEWSTYLE);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.opt_reply(OPT_ABORT).0, REP_ACK);
    assert!(c.closed());
    let mut c = Client::connect(&f.sock, FLAG_C_FIXED_NEWSTYLE);
    c.option(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed());
    // Unknown client flags close the connection.
    let mut c = Client::connect(&f.sock, 1 << 7);
    assert!(c.closed());
}

#[test]
fn export_name_with_and_without_zeroes() {
    let f = start();
    for (flags, tail) in [
        (FLAG_C_FIXED_NEWSTYLE, 124),
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 0),
    ] {
        let mut c = Client::connect(&f.sock, flags);
        c.option(OPT_EXPORT_NAME, b"rw");
        let b = c.read_n(10 + tail);
        assert_eq!(be64(&b), SIZE);
        assert!(b[10..].iter().all(|&x| x == 0));
        // Simple replies: write then read back.
        c.request(CMD_WRITE, 0, 5, 4096, 4, b"abcd");
        assert_eq!(c.simple(), (5, 0));
        c.request(CMD_READ, 0, 6, 4096, 4, &[]);
        assert_eq!(c.simple(), (6, 0));
        assert_eq!(c.read_n(4), b"abcd");
        // BLOCK_STATUS without a negotiated context: EINVAL.
        c.request(CMD_BLOCK_STATUS, 0, 7, 0, 4096, &[]);
        assert_eq!(c.simple(), (7, EINVAL));
        c.request(CMD_DISC, 0, 8, 0, 0, &[]);
        assert!(c.closed());
    }
}

#[test]
fn transmission_commands_structured() {
    transmission_commands(false);
    transmission_commands(true);
}

fn transmission_commands(async_path: bool) {
    let f = start_with(async_path);
    let mut c = Client::connect(&f.sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.go("rw", true);
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    c.request(CMD_WRITE, CMD_FLAG_FUA, 1, 65536, 8192, &data);
    assert_eq!(c.simple(), (1, 0));
    c.request(CMD_READ, 0, 2, 65536, 8192, &[]);
    match c.any() {
        Reply::Structured(2, fl, REPLY_TYPE_OFFSET_DATA, p) => {
            assert_eq!(fl, REPLY_FLAG_DONE);
            assert_eq!(be64(&p), 65536);
            assert_eq!(&p[8..], &data[..]);
        }
        other => panic!("unexpected {other:?}"),
    }
    // Block status: hole, data, hole.
    c.request(CMD_BLOCK_STATUS, 0, 3, 0, 131072, &[]);
    match c.any() {
        Reply::Structured(3, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, p) => {
            assert_eq!(be32(&p), META_BASE_ALLOCATION_ID);
            let d: Vec<(u32, u32)> = p[4..].chunks(8).map(|c| (be32(c), be32(&c[4..]))).collect();
            assert_eq!(
                d,
                vec![
                    (65536, STATE_HOLE | STATE_ZERO),
                    (8192, 0),
                    (57344, STATE_HOLE | STATE_ZERO)
                ]
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 4, 65536, 65536, &[]);
    match c.any() {
        Reply::Structured(4, _, REPLY_TYPE_BLOCK_STATUS, p) => assert_eq!(p.len(), 12),
        other => panic!("unexpected {other:?}"),
    }
    // Trim and write zeroes; fast zero the device cannot do: ENOTSUP.
    c.request(CMD_TRIM, 0, 5, 65536, 4096, &[]);
    assert_eq!(c.simple(), (5, 0));
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 6, 69632, 4096, &[]);
    assert_eq!(c.simple(), (6, 0));
    c.request(
        CMD_WRITE_ZEROES,
        CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        7,
        0,
        4096,
        &[],
    );
    assert_eq!(c.simple(), (7, ENOTSUP));
    c.request(CMD_FLUSH, 0, 8, 0, 0, &[]);
    assert_eq!(c.simple(), (8, 0));
    // Out of range: EINVAL (structured error for READ); payload still consumed.
    c.request(CMD_WRITE, 0, 9, SIZE - 2, 4, b"wxyz");
    assert_eq!(c.simple(), (9, EINVAL));
    c.request(CMD_READ, 0, 10, u64::MAX - 1, 4, &[]);
    match c.any() {
        Reply::Structured(10, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, p) => assert_eq!(be32(&p), EINVAL),
        other => panic!("unexpected {other:?}"),
    }
    // Unknown command and a flag not allowed: EINVAL, connection stays.
    c.request(99, 0, 11, 0, 0, &[]);
    assert_eq!(c.simple(), (11, EINVAL));
    c.request(CMD_WRITE, CMD_FLAG_REQ_ONE, 12, 0, 1, b"q");
    assert_eq!(c.simple(), (12, EINVAL));
    c.request(CMD_READ, 0, 13, 0, 0, &[]);
    assert_eq!(
        c.any(),
        Reply::Structured(13, REPLY_FLAG_DONE, REPLY_TYPE_NONE, vec![])
    );
    c.request(CMD_DISC, 0, 14, 0, 0, &[]);
    assert!(c.closed());
}

#[test]
fn pipelined_requests_complete_out_of_order() {
    pipelined(false);
    pipelined(true);
}

fn pipelined(async_path: bool) {
    let f = start_with(async_path);
    let mut c = Client::connect(&f.sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.go("rw", true);
    // The read at 8192 is slow; the ones after it must not wait for it.
    c.request(CMD_READ, 0, 100, 8192, 512, &[]);
    for i in 0..20u64 {
        c.request(
            CMD_WRITE,
            0,
            200 + i,
            200_000 + i * 512,
            512,
            &[i as u8; 512],
        );
    }
    let mut order = Vec::new();
    for _ in 0..21 {
        order.push(match c.any() {
            Reply::Simple(ck, 0) => ck,
            Reply::Structured(ck, _, REPLY_TYPE_OFFSET_DATA, _) => ck,
            other => panic!("unexpected {other:?}"),
        });
    }
    assert_eq!(
        order.last(),
        Some(&100),
        "slow read should be answered last: {order:?}"
    );
    let mut sorted = order.clone();
    sorted.sort();
    let mut expect: Vec<u64> = (200..220).collect();
    expect.insert(0, 100);
    assert_eq!(sorted, expect);
}

#[test]
fn read_only_export_refuses_writes() {
    let f = start();
    let mut c = Client::connect(&f.sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.go("ro", false);
    c.request(CMD_WRITE, 0, 1, 0, 3, b"abc");
    assert_eq!(c.simple(), (1, EPERM));
    c.request(CMD_TRIM, 0, 2, 0, 4096, &[]);
    assert_eq!(c.simple(), (2, EPERM));
    c.request(CMD_WRITE_ZEROES, 0, 3, 0, 4096, &[]);
    assert_eq!(c.simple(), (3, EPERM));
    c.request(CMD_READ, 0, 4, 0, 3, &[]);
    assert_eq!(c.simple(), (4, 0));
    assert_eq!(c.read_n(3), [7, 7, 7]);
}

#[test]
fn hostile_clients_leave_the_server_serving() {
    hostile(false);
    hostile(true);
}

fn hostile(async_path: bool) {
    let f = start_with(async_path);
    // Garbage instead of client flags / option magic.
    let mut s = UnixStream::connect(&f.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&[0xff; 64]).unwrap();
    let mut c = Client { s };
    assert!(c.closed());
    let mut c = Client::connect(&f.sock, FLAG_C_FIXED_NEWSTYLE);
    c.s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(c.closed());
    // Silence during the handshake: dropped after the timeout.
    let mut c = Client::connect(&f.sock, FLAG_C_FIXED_NEWSTYLE);
    assert!(c.closed());
    // Bad request magic in transmission.
    let mut c = Client::connect(&f.sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.go("rw", true);
    c.s.write_all(&[0xab; 28]).unwrap();
    assert!(c.closed());
    // Truncated header, then a write whose payload never fully arrives.
    let mut c = Client::connect(&f.sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.go("rw", true);
    c.s.write_all(&REQUEST_MAGIC.to_be_bytes()[..3]).unwrap();
    drop(c);
    let mut c = Client::connect(&f.sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.go("rw", true);
    c.request(CMD_WRITE, 0, 1, 300_000, 4096, &[0x5a; 1000]);
    drop(c);
    // An oversized write is a protocol error: closed without reading 4 GiB.
    let mut c = Client::connect(&f.sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.go("rw", true);
    c.request(CMD_WRITE, 0, 1, 0, u32::MAX, &[]);
    assert!(c.closed());
    // The server still serves, and the partial write was not applied.
    std::thread::sleep(Duration::from_millis(100));
    let mut c = Client::connect(&f.sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.go("rw", false);
    c.request(CMD_READ, 0, 2, 300_000, 4096, &[]);
    assert_eq!(c.simple(), (2, 0));
    assert!(
        c.read_n(4096).iter().all(|&b| b == 0),
        "a truncated write was applied"
    );
}
