//! Listening, accepting and the per-connection task.

use crate::device::BlockDevice;
use crate::error::NbdError;
use crate::handshake::{self, Outcome};
use crate::threaded;
use crate::transmission;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

/// Limits of the server; the defaults suit an agent serving a few machines.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// A client must finish option haggling within this time.
    pub handshake_timeout: Duration,
    /// Request and reply payload bytes one connection may hold at once. Reads
    /// stop until replies drain, so memory does not grow with the queue depth.
    pub max_in_flight_bytes: usize,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Threads serving one unix or TCP connection (requests in parallel).
    pub workers_per_connection: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(30),
            max_in_flight_bytes: 64 << 20,
            max_connections: 256,
            workers_per_connection: 8,
        }
    }
}

pub(crate) struct Export {
    pub name: String,
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
}

/// An NBD server: a set of named exports and its limits.
pub struct Server {
    exports: BTreeMap<String, Arc<Export>>,
    pub(crate) config: ServerConfig,
    next_conn: AtomicU64,
}

/// Where to listen: `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    Tcp(String),
}

impl FromStr for ListenAddr {
    type Err = NbdError;
    fn from_str(s: &str) -> Result<Self, NbdError> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(NbdError::BadAddress(s.into()));
            }
            Ok(ListenAddr::Unix(PathBuf::from(p)))
        } else if let Some(a) = s.strip_prefix("tcp:") {
            if !a.contains(':') {
                return Err(NbdError::BadAddress(s.into()));
            }
            Ok(ListenAddr::Tcp(a.to_string()))
        } else {
            Err(NbdError::BadAddress(s.into()))
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// A bound listening socket.
pub enum Listener {
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
    Tcp(TcpListener),
}

impl Listener {
    /// Bind `addr`. A stale unix socket (nobody accepts on it) is replaced.
    pub async fn bind(addr: &ListenAddr) -> Result<Listener, NbdError> {
        let err = |source| NbdError::Listen {
            addr: addr.to_string(),
            source,
        };
        match addr {
            ListenAddr::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if meta.file_type().is_socket()
                        && std::os::unix::net::UnixStream::connect(path).is_err()
                    {
                        std::fs::remove_file(path).map_err(err)?;
                    }
                }
                let listener = UnixListener::bind(path).map_err(err)?;
                Ok(Listener::Unix {
                    listener,
                    path: path.clone(),
                })
            }
            ListenAddr::Tcp(a) => Ok(Listener::Tcp(
                TcpListener::bind(a.as_str()).await.map_err(err)?,
            )),
        }
    }

    /// The address actually bound (a TCP port 0 becomes the real port).
    pub fn local_addr(&self) -> ListenAddr {
        match self {
            Listener::Unix { path, .. } => ListenAddr::Unix(path.clone()),
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => ListenAddr::Tcp(a.to_string()),
                Err(_) => ListenAddr::Tcp("?".into()),
            },
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Server {
    pub fn new(config: ServerConfig) -> Server {
        Server {
            exports: BTreeMap::new(),
            config,
            next_conn: AtomicU64::new(1),
        }
    }

    /// Add an export under `name` (what clients pass as the export name).
    pub fn add_export(
        &mut self,
        name: &str,
        description: &str,
        device: Arc<dyn BlockDevice>,
    ) -> Result<(), NbdError> {
        if self.exports.contains_key(name) {
            return Err(NbdError::DuplicateExport(name.into()));
        }
        let export = Export {
            name: name.into(),
            description: description.into(),
            device,
        };
        self.exports.insert(name.into(), Arc::new(export));
        Ok(())
    }

    pub(crate) fn exports(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.exports.values()
    }

    /// The export a client named. The empty name (the protocol's "default
    /// export") means the only export when there is exactly one.
    pub(crate) fn find(&self, name: &str) -> Option<Arc<Export>> {
        if let Some(e) = self.exports.get(name) {
            return Some(e.clone());
        }
        if name.is_empty() && self.exports.len() == 1 {
            return self.exports.values().next().cloned();
        }
        None
    }

    /// Accept connections until `shutdown` completes, then close every
    /// connection. Requests already handed to a device finish on their own
    /// (device calls are not cancelled half-way).
    pub async fn serve(
        self: Arc<Self>,
        listener: Listener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), NbdError> {
        let mut conns = JoinSet::new();
        let limit = Arc::new(tokio::sync::Semaphore::new(self.config.max_connections));
        tokio::pin!(shutdown);
        info!(listen = %listener.local_addr(), exports = self.exports.len(), "nbd server listening");
        loop {
            let permit = tokio::select! {
                _ = &mut shutdown => break,
                p = limit.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                _ = &mut shutdown => break,
                a = accept(&listener) => a,
            };
            // Reap finished connections so the set does not grow.
            while conns.try_join_next().is_some() {}
            match accepted {
                Ok((stream, peer)) => {
                    let server = self.clone();
                    conns.spawn(async move {
                        server.serve_stream(stream, peer).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        info!("nbd server stopping");
        conns.shutdown().await;
        Ok(())
    }

    /// Serve one connected client to the end.
    pub async fn serve_stream(self: Arc<Self>, stream: Stream, peer: String) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("nbd_conn", conn = id, peer = %peer, export = tracing::field::Empty);
        async move {
            let result = match stream {
                Stream::Unix(s) => {
                    let (r, w) = s.into_split();
                    match self.handshake(r, w).await {
                        Ok(Some((t, r, w))) => {
                            let prefix = r.buffer().to_vec();
                            match r.into_inner().reunite(w).map(|s| s.into_std()) {
                                Ok(Ok(s)) => self.transmit_blocking(s, prefix, t).await,
                                Ok(Err(e)) => Err(e.into()),
                                Err(e) => Err(NbdError::Io(std::io::Error::other(e.to_string()))),
                            }
                        }
                        Ok(None) => Ok(()),
                        Err(e) => Err(e),
                    }
                }
                Stream::Tcp(s) => {
                    let _ = s.set_nodelay(true);
                    let (r, w) = s.into_split();
                    match self.handshake(r, w).await {
                        Ok(Some((t, r, w))) => {
                            let prefix = r.buffer().to_vec();
                            match r.into_inner().reunite(w).map(|s| s.into_std()) {
                                Ok(Ok(s)) => self.transmit_blocking(s, prefix, t).await,
                                Ok(Err(e)) => Err(e.into()),
                                Err(e) => Err(NbdError::Io(std::io::Error::other(e.to_string()))),
                            }
                        }
                        Ok(None) => Ok(()),
                        Err(e) => Err(e),
                    }
                }
            };
            match result {
                Ok(()) => debug!("connection closed"),
                Err(e) => warn!(error = %e, "connection ended"),
            }
        }
        .instrument(span)
        .await
    }

    /// Negotiate; on success returns what to serve and the halves back.
    async fn handshake<R, W>(
        self: &Arc<Self>,
        r: R,
        mut w: W,
    ) -> Result<Option<(handshake::Transmit, tokio::io::BufReader<R>, W)>, NbdError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut r = tokio::io::BufReader::with_capacity(64 << 10, r);
        let outcome = match tokio::time::timeout(
            self.config.handshake_timeout,
            handshake::negotiate(&mut r, &mut w, self),
        )
        .await
        {
            Ok(o) => o?,
            Err(_) => return Err(NbdError::Protocol("handshake timed out".into())),
        };
        match outcome {
            Outcome::Close => Ok(None),
            Outcome::Transmit(t) => {
                tracing::Span::current().record("export", t.export.name.as_str());
                info!(
                    structured = t.structured,
                    flags = t.flags,
                    "transmission phase"
                );
                Ok(Some((t, r, w)))
            }
        }
    }

    /// Transmission on a plain socket, served by worker threads.
    async fn transmit_blocking<S: threaded::Sock + SetBlocking>(
        self: &Arc<Self>,
        sock: S,
        prefix: Vec<u8>,
        t: handshake::Transmit,
    ) -> Result<(), NbdError> {
        sock.set_blocking()?;
        let sock = Arc::new(sock);
        // Cancelling this future (server shutdown) closes the socket, which
        // ends the worker threads.
        let _close = threaded::CloseOnDrop(sock.clone());
        let server = self.clone();
        let span = tracing::Span::current();
        let workers = self.config.workers_per_connection;
        match tokio::task::spawn_blocking(move || {
            let _g = span.enter();
            threaded::run(sock, prefix, t, &server.config, workers)
        })
        .await
        {
            Ok(r) => r,
            Err(e) => Err(NbdError::Io(std::io::Error::other(e.to_string()))),
        }
    }

    /// Serve a client over any byte stream split in two halves, all in async
    /// tasks (room for TLS: a TLS stream is split the same way).
    pub async fn serve_halves<R, W>(self: &Arc<Self>, r: R, w: W) -> Result<(), NbdError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        match self.handshake(r, w).await? {
            None => Ok(()),
            Some((t, r, w)) => transmission::run(r, w, t, &self.config).await,
        }
    }
}

/// Switch a socket taken from tokio back to blocking mode.
trait SetBlocking {
    fn set_blocking(&self) -> std::io::Result<()>;
}

impl SetBlocking for std::os::unix::net::UnixStream {
    fn set_blocking(&self) -> std::io::Result<()> {
        self.set_nonblocking(false)
    }
}

impl SetBlocking for std::net::TcpStream {
    fn set_blocking(&self) -> std::io::Result<()> {
        self.set_nonblocking(false)
    }
}

/// An accepted connection.
pub enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

async fn accept(l: &Listener) -> std::io::Result<(Stream, String)> {
    match l {
        Listener::Unix { listener, .. } => {
            let (s, _) = listener.accept().await?;
            Ok((Stream::Unix(s), "unix".into()))
        }
        Listener::Tcp(listener) => {
            let (s, a) = listener.accept().await?;
            Ok((Stream::Tcp(s), a.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            "unix:/tmp/x.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/tmp/x.sock".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:10809".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("127.0.0.1:10809".into())
        );
        assert!("tcp:noport".parse::<ListenAddr>().is_err());
        assert!("unix:".parse::<ListenAddr>().is_err());
        assert!("/tmp/x.sock".parse::<ListenAddr>().is_err());
    }
}
