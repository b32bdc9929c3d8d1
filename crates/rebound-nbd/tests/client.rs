//! The synchronous NBD client against our own server (in-memory device over
//! a unix socket and TCP) and against qemu-nbd serving a raw file.
#![allow(clippy::unwrap_used)]

use rebound_nbd::{
    BlockDevice, Caps, ClientError, DeviceError, Extent, ListenAddr, Listener, NbdClient, NbdUri,
    Server, ServerConfig, ZeroFlags,
};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SIZE: u64 = 8 << 20;

struct Mem {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    flushes: Mutex<u64>,
    fua_writes: Mutex<u64>,
}

impl Mem {
    fn new(read_only: bool) -> Arc<Mem> {
        Arc::new(Mem {
            data: Mutex::new(vec![0; SIZE as usize]),
            read_only,
            flushes: Mutex::new(0),
            fua_writes: Mutex::new(0),
        })
    }
}

impl BlockDevice for Mem {
    fn size(&self) -> u64 {
        SIZE
    }
    fn caps(&self) -> Caps {
        Caps {
            read_only: self.read_only,
            multi_conn: true,
            trim: false,
            write_zeroes: false,
            fast_zero: false,
            block_status: false,
        }
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError> {
        if fua {
            *self.fua_writes.lock().unwrap() += 1;
        }
        self.data.lock().unwrap()[offset as usize..offset as usize + data.len()]
            .copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), DeviceError> {
        *self.flushes.lock().unwrap() += 1;
        Ok(())
    }
    fn trim(&self, _range: Range<u64>, _fua: bool) -> Result<(), DeviceError> {
        Err(DeviceError::NotSupported)
    }
    fn write_zeroes(&self, _range: Range<u64>, _flags: ZeroFlags) -> Result<(), DeviceError> {
        Err(DeviceError::NotSupported)
    }
    fn block_status(&self, _range: Range<u64>, _max: usize) -> Result<Vec<Extent>, DeviceError> {
        Err(DeviceError::NotSupported)
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    addr: ListenAddr,
    rw: Arc<Mem>,
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl Fixture {
    fn uri(&self, export: &str) -> NbdUri {
        match &self.addr {
            ListenAddr::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
            ListenAddr::Tcp(a) => format!("nbd://{a}/{export}"),
        }
        .parse()
        .unwrap()
    }

    fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take() {
            let _ = self.rt.block_on(d);
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.stop();
    }
}

fn start(tcp: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let addr = if tcp {
        ListenAddr::Tcp("127.0.0.1:0".into())
    } else {
        ListenAddr::Unix(dir.path().join("nbd.sock"))
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut server = Server::new(ServerConfig::default());
    let rw = Mem::new(false);
    server.add_export("rw", "writable", rw.clone()).unwrap();
    server.add_export("ro", "", Mem::new(true)).unwrap();
    let listener = rt.block_on(Listener::bind(&addr)).unwrap();
    let addr = listener.local_addr();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
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
        addr,
        rw,
        rt,
        stop: Some(tx),
        done: Some(done),
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

/// Writes, reads (also larger than one request), FUA, flush, read-only and
/// out-of-range refusals, an unknown export, a clean disconnect.
fn exercise(f: &Fixture) {
    let mut c = NbdClient::connect(&f.uri("rw")).unwrap();
    assert_eq!(c.size(), SIZE);
    assert!(!c.read_only());
    assert_eq!(c.export(), "rw");

    let data = pattern(64 << 10, 3);
    c.write_at(4096, &data, false).unwrap();
    c.write_at(1 << 20, &data[..4096], true).unwrap();
    c.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    c.read_at(4096, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(
        &f.rw.data.lock().unwrap()[4096..4096 + data.len()],
        &data[..]
    );
    assert!(*f.rw.flushes.lock().unwrap() >= 1);
    assert_eq!(*f.rw.fua_writes.lock().unwrap(), 1);

    // A read of the whole export is split into several requests.
    let big = pattern(SIZE as usize, 9);
    c.write_at(0, &big, false).unwrap();
    let mut all = vec![0u8; SIZE as usize];
    c.read_at(0, &mut all).unwrap();
    assert!(all == big);

    // Out of range: refused locally, the connection stays usable.
    assert!(matches!(
        c.read_at(SIZE - 4096, &mut [0u8; 8192]),
        Err(ClientError::OutOfRange { .. })
    ));
    let mut one = [0u8; 4096];
    c.read_at(SIZE - 4096, &mut one).unwrap();
    assert_eq!(&one[..], &big[SIZE as usize - 4096..]);

    // A second connection sees the first one's writes.
    let mut c2 = NbdClient::connect(&f.uri("rw")).unwrap();
    c2.read_at(0, &mut one).unwrap();
    assert_eq!(&one[..], &big[..4096]);
    c2.disconnect().unwrap();

    let mut ro = NbdClient::connect(&f.uri("ro")).unwrap();
    assert!(ro.read_only());
    assert!(matches!(
        ro.write_at(0, &one, false),
        Err(ClientError::ReadOnly)
    ));
    ro.read_at(0, &mut one).unwrap();
    assert_eq!(one, [0u8; 4096]);

    match NbdClient::connect(&f.uri("nosuch")) {
        Err(ClientError::ExportRefused { export, .. }) => assert_eq!(export, "nosuch"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("unknown export accepted"),
    }
    c.disconnect().unwrap();
}

#[test]
fn own_server_over_unix_socket() {
    exercise(&start(false));
}

#[test]
fn own_server_over_tcp() {
    exercise(&start(true));
}

#[test]
fn server_going_away_is_a_disconnect() {
    let mut f = start(false);
    let mut c = NbdClient::connect(&f.uri("rw")).unwrap();
    c.write_at(0, &[1u8; 4096], false).unwrap();
    f.stop();
    // The server closes idle connections on shutdown; the next request fails
    // as a disconnect, and so does every later one.
    let mut failed = None;
    for _ in 0..50 {
        match c.write_at(0, &[2u8; 4096], false) {
            Ok(()) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let e = failed.expect("writes kept succeeding after the server stopped");
    assert!(e.is_disconnect(), "{e}");
    assert!(c.read_at(0, &mut [0u8; 4096]).unwrap_err().is_disconnect());
}

#[test]
fn connect_to_nothing_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let uri: NbdUri = format!(
        "nbd+unix:///x?socket={}",
        dir.path().join("none.sock").display()
    )
    .parse()
    .unwrap();
    assert!(matches!(
        NbdClient::connect(&uri),
        Err(ClientError::Connect { .. })
    ));
}

fn find_tool(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

struct QemuNbd(Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_socket(sock: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("qemu-nbd exited early: {st}");
        }
        assert!(Instant::now() < deadline, "qemu-nbd did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn against_qemu_nbd() {
    let Some(qemu) = find_tool("qemu-nbd") else {
        eprintln!("skipping: qemu-nbd is not installed (Debian package qemu-utils)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    std::fs::File::create(&img).unwrap().set_len(SIZE).unwrap();
    let sock = dir.path().join("qemu.sock");
    let mut child = Command::new(qemu)
        .args(["-f", "raw", "-x", "disk0", "--persistent", "-e", "4", "-k"])
        .arg(&sock)
        .arg(&img)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn qemu-nbd");
    wait_for_socket(&sock, &mut child);
    let _guard = QemuNbd(child);
    let uri: NbdUri = format!("nbd+unix:///disk0?socket={}", sock.display())
        .parse()
        .unwrap();

    let mut c = NbdClient::connect(&uri).unwrap();
    assert_eq!(c.size(), SIZE);
    let data = pattern(256 << 10, 5);
    c.write_at(3 << 20, &data, false).unwrap();
    c.write_at(8192, &data[..4096], true).unwrap();
    c.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    c.read_at(3 << 20, &mut back).unwrap();
    assert_eq!(back, data);
    // A second connection (several writers are several connections).
    let mut c2 = NbdClient::connect(&uri).unwrap();
    let mut all = vec![0u8; SIZE as usize];
    c2.read_at(0, &mut all).unwrap();
    assert_eq!(&all[3 << 20..(3 << 20) + data.len()], &data[..]);
    assert_eq!(&all[8192..12288], &data[..4096]);
    c2.disconnect().unwrap();
    c.disconnect().unwrap();
    match NbdClient::connect(
        &format!("nbd+unix:///other?socket={}", sock.display())
            .parse()
            .unwrap(),
    ) {
        Err(ClientError::ExportRefused { .. }) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("unknown export accepted"),
    }
    // The data reached the file.
    let file = std::fs::read(&img).unwrap();
    assert_eq!(&file[3 << 20..(3 << 20) + data.len()], &data[..]);
}
