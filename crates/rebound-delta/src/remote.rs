//! Syncs across the network: the client (`rebound sync`) and the receiver
//! (`rebound sync-server`). The client pushes a local source to a server disk
//! or pulls a server disk into a local destination.

use crate::state::{self, SideState};
use crate::{
    Options, Progress, Report, Side, SyncError, dest, open_dest, source, state_subdir,
    tree::TreeHasher,
};
use rebound_disk::Disk;
use rebound_wire::{
    Compression, Counters, FrameReader, FrameWriter, MIN_PROTOCOL_VERSION, Mode, Msg, Open, Opened,
    PROTOCOL_VERSION, Token, WireError, client_handshake, server_handshake, spawn_reader,
    spawn_writer,
};
use std::collections::HashSet;
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `rebound://HOST:PORT/NAME`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteAddr {
    pub host: String,
    pub port: u16,
    pub name: String,
}

impl RemoteAddr {
    /// Parse a `rebound://` address; `None` when `s` is not one at all.
    pub fn parse(s: &str) -> Option<Result<RemoteAddr, SyncError>> {
        let rest = s.strip_prefix("rebound://")?;
        let bad = |why: &str| {
            Some(Err(SyncError::Invalid(format!(
                "{s:?}: {why}; expected rebound://HOST:PORT/NAME"
            ))))
        };
        let Some((hostport, name)) = rest.split_once('/') else {
            return bad("no disk name");
        };
        let Some((host, port)) = hostport.rsplit_once(':') else {
            return bad("no port");
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let Ok(port) = port.parse::<u16>() else {
            return bad("invalid port");
        };
        if host.is_empty() || name.is_empty() {
            return bad("empty host or name");
        }
        Some(Ok(RemoteAddr {
            host: host.into(),
            port,
            name: name.into(),
        }))
    }

    fn connect(&self) -> Result<TcpStream, SyncError> {
        let failed = |e: std::io::Error| SyncError::Remote {
            code: rebound_types::ErrorCode::ConnectFailed,
            message: format!("cannot connect to {}:{}: {e}", self.host, self.port),
        };
        let addrs = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(failed)?;
        let mut last = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, Duration::from_secs(10)) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(failed(
            last.unwrap_or_else(|| std::io::Error::other("no address")),
        ))
    }
}

struct Conn {
    tx: FrameWriter,
    rx: FrameReader,
    counters: Arc<Counters>,
    stream: Closing,
}

fn split(stream: TcpStream, compression: Compression, threads: usize) -> Result<Conn, SyncError> {
    let counters = Arc::new(Counters::default());
    let r = stream.try_clone().map_err(|e| WireError::Io {
        during: "setting up",
        source: e,
    })?;
    let w = stream.try_clone().map_err(|e| WireError::Io {
        during: "setting up",
        source: e,
    })?;
    Ok(Conn {
        tx: spawn_writer(w, compression, threads, counters.clone()),
        rx: spawn_reader(r, counters.clone()),
        counters,
        stream: Closing(stream),
    })
}

fn handshake_client(addr: &RemoteAddr, token: &Token) -> Result<(TcpStream, [u8; 32]), SyncError> {
    let mut s = addr.connect()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let hs = client_handshake(&mut s, token, (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION))?;
    s.set_read_timeout(None).ok();
    Ok((s, hs.session_key))
}

fn expect_opened(rx: &FrameReader) -> Result<Opened, SyncError> {
    match rx.recv()? {
        Msg::Opened(o) => Ok(o),
        Msg::Error { code, message } => Err(SyncError::from_remote(code, message)),
        m => Err(SyncError::Wire(WireError::Protocol(format!(
            "expected opened, got {}",
            m.name()
        )))),
    }
}

/// Push the local disk `src` to the server's disk `addr.name`.
pub fn push(
    src: &Path,
    addr: &RemoteAddr,
    token: &Token,
    opts: &Options,
    progress: Option<Arc<Progress>>,
) -> Result<Report, SyncError> {
    let started = Instant::now();
    let disk = Arc::new(Disk::open_read(src)?);
    let size = disk.size()?;
    let sname = src.display().to_string();
    let dname = format!("rebound://{}:{}/{}", addr.host, addr.port, addr.name);
    let sid = state::identity("source", &sname, disk.file(), size, opts.full, true);
    let sdir = opts
        .state_dir
        .as_ref()
        .map(|b| state_subdir(b, "source", &sname, &dname));
    let mut st = match (&sdir, opts.dry_run) {
        (Some(d), false) => SideState::load(d, &sid)?,
        _ => None,
    };
    let (stream, key) = handshake_client(addr, token)?;
    let mut c = split(stream, opts.compression, opts.tuning.hashers)?;
    c.tx.send(Msg::Open(Open {
        mode: Mode::Push,
        name: addr.name.clone(),
        source_size: size,
        full: opts.full,
        dry_run: opts.dry_run,
        allow_shrink: opts.allow_shrink,
        resume_session: st.as_ref().map(|s| s.session).unwrap_or_default(),
        resume_chunks: st.as_ref().map(|s| s.chunks()).unwrap_or(0),
    }))?;
    let opened = expect_opened(&c.rx)?;
    let start = opened.resume_chunks;
    st = reconcile(st, sdir.as_deref(), &sid, &opened, opts.dry_run)?;
    let hasher = Arc::new(TreeHasher::new(&key));
    let mut side = Side::new(disk, size, opts, (st, start), hasher, progress);
    let out = source::run(&mut side, &mut c.tx, &c.rx);
    let (sent, received) = finish(c);
    let out = out?;
    if !opts.dry_run && out.root != out.dest_root {
        return Err(SyncError::Mismatch(
            "the BLAKE3 roots of source and destination differ".into(),
        ));
    }
    if let Some(s) = side.state.take() {
        s.remove()?;
    }
    Ok(Report::new(
        size,
        opened.size,
        opts,
        out.counts,
        out.dest,
        (out.root, out.dest_root),
        (sent, received),
        started.elapsed(),
    ))
}

/// Pull the server's disk `addr.name` into the local disk `dst`.
pub fn pull(
    addr: &RemoteAddr,
    dst: &Path,
    token: &Token,
    opts: &Options,
    progress: Option<Arc<Progress>>,
) -> Result<Report, SyncError> {
    let started = Instant::now();
    let sname = format!("rebound://{}:{}/{}", addr.host, addr.port, addr.name);
    let dname = dst.display().to_string();
    let ddir = opts
        .state_dir
        .as_ref()
        .map(|b| state_subdir(b, "destination", &sname, &dname));
    // The destination's identity needs its file; a missing one has no state.
    let existing = std::fs::metadata(dst)
        .ok()
        .and_then(|_| Disk::open_read(dst).ok());
    let (stream, key) = handshake_client(addr, token)?;
    let mut c = split(stream, Compression::None, 1)?;
    let mut st = None;
    if let (Some(d), Some(disk), false) = (&ddir, &existing, opts.dry_run) {
        // The size is checked once the source's is known.
        let size = disk.size()?;
        st = SideState::load(
            d,
            &state::identity("destination", &dname, disk.file(), size, opts.full, false),
        )?;
    }
    c.tx.send(Msg::Open(Open {
        mode: Mode::Pull,
        name: addr.name.clone(),
        source_size: 0,
        full: opts.full,
        dry_run: opts.dry_run,
        allow_shrink: opts.allow_shrink,
        resume_session: st.as_ref().map(|s| s.session).unwrap_or_default(),
        resume_chunks: st.as_ref().map(|s| s.chunks()).unwrap_or(0),
    }))?;
    let opened = expect_opened(&c.rx)?;
    let size = opened.size;
    let (disk, before) = match open_dest(dst, size, opts) {
        Ok(d) => d,
        Err(e) => {
            let _ = c.tx.send(e.to_msg());
            finish(c);
            return Err(e);
        }
    };
    let did = disk
        .as_ref()
        .map(|d| state::identity("destination", &dname, d.file(), size, opts.full, false));
    if let Some(did) = &did {
        st = reconcile(
            st.filter(|s| s.session == opened.session),
            ddir.as_deref(),
            did,
            &opened,
            opts.dry_run,
        )?;
    }
    let hasher = Arc::new(TreeHasher::new(&key));
    let resume = (st, opened.resume_chunks);
    let mut side = Side::new(disk, size, opts, resume, hasher, progress);
    let out = dest::run(&mut side, &mut c.tx, &c.rx);
    // The source sends its counts last; the destination's view is what we have.
    let (sent, received) = finish(c);
    let out = out?;
    Ok(Report::new(
        size,
        before,
        opts,
        out.received,
        out.stats,
        (out.root, out.root),
        (sent, received),
        started.elapsed(),
    ))
}

/// Make the client's resume state agree with the session the server chose.
fn reconcile(
    st: Option<SideState>,
    dir: Option<&Path>,
    ident: &state::Identity,
    opened: &Opened,
    dry_run: bool,
) -> Result<Option<SideState>, SyncError> {
    if dry_run {
        return Ok(None);
    }
    let Some(dir) = dir else { return Ok(None) };
    match st {
        Some(mut s) if s.session == opened.session => {
            s.truncate(opened.resume_chunks)?;
            Ok(Some(s))
        }
        _ => {
            if opened.resume_chunks != 0 {
                return Err(SyncError::Wire(WireError::Protocol(
                    "server resumes a session we do not have".into(),
                )));
            }
            Ok(Some(SideState::create(dir, ident, opened.session)?))
        }
    }
}

fn finish(c: Conn) -> (u64, u64) {
    let Conn {
        tx,
        rx,
        counters,
        stream,
    } = c;
    let _ = tx.close();
    drop(stream); // shuts the socket down
    drop(rx);
    (counters.sent(), counters.received())
}

/// The socket of a connection; dropping it (a panic included) shuts the
/// socket down, or the peer would wait forever: the reader thread holds it open.
struct Closing(TcpStream);

impl Drop for Closing {
    fn drop(&mut self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

/// Names a client may use: relative, no `..`, not inside our state directory.
fn resolve_name(root: &Path, name: &str) -> Result<PathBuf, SyncError> {
    let p = Path::new(name);
    let ok = !name.is_empty()
        && p.components().all(|c| matches!(c, Component::Normal(_)))
        && !name.starts_with(".rebound");
    if !ok {
        return Err(SyncError::Invalid(format!(
            "disk name {name:?} must be a relative path without '..'"
        )));
    }
    Ok(root.join(p))
}

/// Serve syncs on `listener` for disks under `root`, one thread per connection.
pub fn serve(listener: TcpListener, root: PathBuf, token: Token) -> std::io::Result<()> {
    serve_with(listener, root, token, ServeOptions::default())
}

/// What a server allows beyond plain [`serve`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ServeOptions {
    /// Refuse pushes: an agent lets master targets pull (read) its
    /// machine's live disks but never write them.
    pub read_only: bool,
    /// Create missing directories under the root for a pushed disk (a
    /// node's cache and incoming queues have one directory per item).
    pub create_dirs: bool,
    /// The served disks are live (a running machine's, written while
    /// served) and their writes are tracked elsewhere (the agent's dirty
    /// bitmap, from a barrier taken before the sync): an interrupted pull
    /// resumes even though the source changed since, instead of starting
    /// over. Chunks sent before the interruption and written since stay
    /// marked and are shipped by replication.
    pub live_sources: bool,
    /// Bound the bytes pushed under one directory of the root (a process
    /// server's cache): a push of a new disk that would pass it is refused
    /// with `cache-full`, unless the directory is empty (so one oversized
    /// changeset still gets through, alone).
    pub quota: Option<Quota>,
}

/// See [`ServeOptions::quota`].
#[derive(Clone, Copy, Debug)]
pub struct Quota {
    /// A directory directly under the served root.
    pub dir: &'static str,
    pub bytes: u64,
}

/// Refuse a push that would take `quota`'s directory past its bound.
fn check_quota(root: &Path, quota: &Quota, open: &Open) -> Result<(), SyncError> {
    if open.mode != Mode::Push || open.dry_run || !Path::new(&open.name).starts_with(quota.dir) {
        return Ok(());
    }
    // A disk already there is a resume: its bytes are counted already.
    if resolve_name(root, &open.name).is_ok_and(|p| p.exists()) {
        return Ok(());
    }
    let used = rebound_disk::tree_bytes(&root.join(quota.dir));
    if used > 0 && used.saturating_add(open.source_size) > quota.bytes {
        return Err(SyncError::QuotaFull {
            dir: quota.dir,
            used,
            limit: quota.bytes,
            size: open.source_size,
        });
    }
    Ok(())
}

/// [`serve`] with [`ServeOptions`].
pub fn serve_with(
    listener: TcpListener,
    root: PathBuf,
    token: Token,
    opts: ServeOptions,
) -> std::io::Result<()> {
    let busy: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut next_id = 0u64;
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        next_id += 1;
        let (root, token, busy) = (root.clone(), token.clone(), busy.clone());
        let id = next_id;
        std::thread::spawn(move || {
            let peer = stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let span = tracing::info_span!("sync_conn", conn = id, peer = %peer);
            let _g = span.enter();
            match serve_connection(stream, &root, &token, &busy, opts) {
                Ok(()) => tracing::info!("sync finished"),
                Err(e) => {
                    tracing::warn!(code = %rebound_types::Coded::code(&e), error = %e, "sync failed")
                }
            }
        });
    }
    Ok(())
}

/// Serve one connection: handshake, open, run the asked role.
pub fn serve_connection(
    mut stream: TcpStream,
    root: &Path,
    token: &Token,
    busy: &Mutex<HashSet<String>>,
    opts: ServeOptions,
) -> Result<(), SyncError> {
    let _ = stream.set_nodelay(true);
    // A silent peer may not hold a thread forever during the handshake.
    stream.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let hs = server_handshake(&mut stream, token, (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION))?;
    stream.set_read_timeout(None).ok();
    let mut c = split(
        stream,
        Compression::Lz4,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2),
    )?;
    let open = match c.rx.recv()? {
        Msg::Open(o) => o,
        m => {
            return Err(SyncError::Wire(WireError::Protocol(format!(
                "expected open, got {}",
                m.name()
            ))));
        }
    };
    if opts.read_only && open.mode == Mode::Push && !open.dry_run {
        let e = SyncError::Invalid(format!(
            "disk {:?} is served read-only: pull from it instead",
            open.name
        ));
        let _ = c.tx.send(e.to_msg());
        finish(c);
        return Err(e);
    }
    if let Some(q) = &opts.quota
        && let Err(e) = check_quota(root, q, &open)
    {
        tracing::info!(disk = %open.name, error = %e, "push refused");
        let _ = c.tx.send(e.to_msg());
        finish(c);
        return Err(e);
    }
    let guard = BusyGuard::take(busy, &open.name);
    let r = match guard {
        Some(_) => {
            if opts.create_dirs
                && open.mode == Mode::Push
                && !open.dry_run
                && let Ok(path) = resolve_name(root, &open.name)
                && let Some(parent) = path.parent()
            {
                let _ = rebound_disk::crashsafe::create_dir_all_durable(parent);
            }
            run_open(&mut c, root, &open, &hs.session_key, opts.live_sources)
        }
        None => Err(SyncError::Remote {
            code: rebound_types::ErrorCode::ExportBusy,
            message: format!("disk {:?} is already being synced", open.name),
        }),
    };
    if let Err(e) = &r
        && !matches!(e, SyncError::Wire(_))
    {
        let _ = c.tx.send(e.to_msg());
    }
    finish(c);
    r
}

struct BusyGuard<'a> {
    set: &'a Mutex<HashSet<String>>,
    name: String,
}

impl<'a> BusyGuard<'a> {
    /// Claim `name`. A session that just ended may still be tearing down its
    /// connection, so wait a little for it before refusing.
    fn take(set: &'a Mutex<HashSet<String>>, name: &str) -> Option<BusyGuard<'a>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if set.lock().ok()?.insert(name.to_string()) {
                return Some(BusyGuard {
                    set,
                    name: name.to_string(),
                });
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.set.lock() {
            s.remove(&self.name);
        }
    }
}

fn server_state_dir(root: &Path, role: &str, name: &str) -> PathBuf {
    state_subdir(&root.join(".rebound"), role, "", name)
}

/// The server side's resume state: resumed when the client names the same
/// session, otherwise started afresh. Returns it and the chunks to skip.
fn server_state(
    root: &Path,
    role: &str,
    open: &Open,
    disk: &Disk,
    size: u64,
    source: bool,
) -> Result<(Option<SideState>, u64), SyncError> {
    let ident = state::identity(role, &open.name, disk.file(), size, open.full, source);
    let dir = server_state_dir(root, role, &open.name);
    Ok(match SideState::load(&dir, &ident)? {
        Some(mut s) if s.session == open.resume_session => {
            let start = s.chunks().min(open.resume_chunks);
            s.truncate(start)?;
            (Some(s), start)
        }
        _ => (
            Some(SideState::create(&dir, &ident, state::new_session_id())?),
            0,
        ),
    })
}

fn run_open(
    c: &mut Conn,
    root: &Path,
    open: &Open,
    key: &[u8; 32],
    live: bool,
) -> Result<(), SyncError> {
    let path = resolve_name(root, &open.name)?;
    let opts = Options {
        full: open.full,
        dry_run: open.dry_run,
        allow_shrink: open.allow_shrink,
        ..Options::default()
    };
    let hasher = Arc::new(TreeHasher::new(key));
    let span = tracing::info_span!("sync", disk = %open.name, mode = ?open.mode);
    let _g = span.enter();
    match open.mode {
        Mode::Push => {
            let size = open.source_size;
            let (disk, before) = open_dest(&path, size, &opts)?;
            let (st, start) = match (&disk, opts.dry_run) {
                (Some(d), false) => server_state(root, "destination", open, d, size, false)?,
                _ => (None, 0),
            };
            let session = st.as_ref().map(|s| s.session).unwrap_or_default();
            c.tx.send(Msg::Opened(Opened {
                size: before,
                session,
                resume_chunks: start,
            }))?;
            let mut side = Side::new(disk, size, &opts, (st, start), hasher, None);
            dest::run(&mut side, &mut c.tx, &c.rx).map(|_| ())
        }
        Mode::Pull => {
            let disk = Arc::new(Disk::open_read(&path).map_err(|e| match e {
                rebound_disk::DiskError::Missing { .. } => SyncError::NotFound(open.name.clone()),
                e => SyncError::Disk(e),
            })?);
            let size = disk.size()?;
            let (st, start) = match opts.dry_run {
                // A live source always has a new mtime: do not let it
                // discard the resume state (see `ServeOptions::live_sources`).
                false => server_state(root, "source", open, &disk, size, !live)?,
                true => (None, 0),
            };
            let session = st.as_ref().map(|s| s.session).unwrap_or_default();
            c.tx.send(Msg::Opened(Opened {
                size,
                session,
                resume_chunks: start,
            }))?;
            let mut side = Side::new(disk, size, &opts, (st, start), hasher, None);
            let out = source::run(&mut side, &mut c.tx, &c.rx)?;
            if !opts.dry_run
                && out.root == out.dest_root
                && let Some(s) = side.state.take()
            {
                s.remove()?;
            }
            Ok(())
        }
    }
}
