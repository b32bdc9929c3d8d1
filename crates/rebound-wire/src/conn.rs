//! A connection's two directions, each on its own threads, so that reading,
//! encoding (compression, checksums) and writing overlap with the caller's work.

use crate::frame::encode_frame_in;
use crate::frame::read_frame_into;
use crate::{Compression, Msg, WireError};

/// Frames sent uncompressed after one that did not compress.
const BACKOFF_FRAMES: u32 = 16;
/// Written frame buffers kept for reuse.
const RECYCLED_FRAMES: usize = 8;
use crossbeam_channel::{Receiver, Sender, TryRecvError, bounded};
use std::collections::BTreeMap;
use std::io::{BufWriter, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Bytes a connection moved, counted at the frame level (headers included).
#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

impl Counters {
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// The sending half: messages are encoded by a pool of threads and written in
/// the order they were sent.
pub struct FrameWriter {
    jobs: Option<Sender<(u64, Msg)>>,
    seq: u64,
    failure: Arc<Mutex<Option<WireError>>>,
    threads: Vec<JoinHandle<()>>,
}

/// Start the sending half on `stream` with `encoders` encoding threads.
pub fn spawn_writer(
    stream: impl Write + Send + 'static,
    compression: Compression,
    encoders: usize,
    counters: Arc<Counters>,
) -> FrameWriter {
    let encoders = encoders.max(1);
    let (job_tx, job_rx) = bounded::<(u64, Msg)>(4 * encoders + 16);
    let (frame_tx, frame_rx) = bounded::<(u64, Vec<u8>)>(4 * encoders + 16);
    // Written frames go back to the encoders (a few, to bound memory).
    let (spare_tx, spare_rx) = bounded::<Vec<u8>>(RECYCLED_FRAMES);
    let failure = Arc::new(Mutex::new(None));
    let mut threads = Vec::new();
    for _ in 0..encoders {
        let job_rx = job_rx.clone();
        let frame_tx = frame_tx.clone();
        let spare_rx = spare_rx.clone();
        threads.push(std::thread::spawn(move || {
            // Adaptive: after a body that did not compress, send the next
            // few as they are (random data would only burn CPU), then try again.
            let mut skip = 0u32;
            for (seq, msg) in job_rx {
                let try_codec = msg.compressible() && compression != Compression::None;
                let codec = if try_codec && skip == 0 {
                    compression
                } else {
                    Compression::None
                };
                let spare = spare_rx.try_recv().unwrap_or_default();
                let (frame, packed) = encode_frame_in(&msg, codec, spare);
                if try_codec {
                    skip = match (codec == compression, packed) {
                        (true, false) => BACKOFF_FRAMES,
                        (true, true) => 0,
                        (false, _) => skip - 1,
                    };
                }
                if frame_tx.send((seq, frame)).is_err() {
                    return;
                }
            }
        }));
    }
    drop(frame_tx);
    let fail = failure.clone();
    threads.push(std::thread::spawn(move || {
        if let Err(e) = write_loop(stream, frame_rx, spare_tx, &counters)
            && let Ok(mut slot) = fail.lock()
        {
            slot.get_or_insert(e);
        }
    }));
    FrameWriter {
        jobs: Some(job_tx),
        seq: 0,
        failure,
        threads,
    }
}

fn write_loop(
    stream: impl Write,
    frames: Receiver<(u64, Vec<u8>)>,
    spare: Sender<Vec<u8>>,
    counters: &Counters,
) -> Result<(), WireError> {
    let mut out = BufWriter::with_capacity(256 << 10, stream);
    let mut next = 0u64;
    let mut waiting: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    loop {
        // Block only when nothing is ready; flush before blocking so that a
        // small message (a request the peer waits for) never sits in a buffer.
        let item = match frames.try_recv() {
            Ok(item) => item,
            Err(TryRecvError::Empty) => {
                out.flush().map_err(|e| WireError::io("sending", e))?;
                match frames.recv() {
                    Ok(item) => item,
                    Err(_) => break,
                }
            }
            Err(TryRecvError::Disconnected) => break,
        };
        waiting.insert(item.0, item.1);
        while let Some(frame) = waiting.remove(&next) {
            out.write_all(&frame)
                .map_err(|e| WireError::io("sending", e))?;
            counters
                .sent
                .fetch_add(frame.len() as u64, Ordering::Relaxed);
            let _ = spare.try_send(frame);
            next += 1;
        }
    }
    out.flush().map_err(|e| WireError::io("sending", e))
}

impl FrameWriter {
    fn failure(&self) -> WireError {
        self.failure
            .lock()
            .ok()
            .and_then(|mut f| f.take())
            .unwrap_or(WireError::Closed { during: "sending" })
    }

    /// Queue a message. Fails once the connection has failed.
    pub fn send(&mut self, msg: Msg) -> Result<(), WireError> {
        let jobs = self
            .jobs
            .as_ref()
            .ok_or(WireError::Closed { during: "sending" })?;
        if jobs.send((self.seq, msg)).is_err() {
            return Err(self.failure());
        }
        self.seq += 1;
        Ok(())
    }

    /// Send everything queued, then stop the threads.
    pub fn close(mut self) -> Result<(), WireError> {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        match self.failure.lock().ok().and_then(|mut f| f.take()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for FrameWriter {
    fn drop(&mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The receiving half: a thread decodes frames into a channel.
pub struct FrameReader {
    pub rx: Receiver<Result<Msg, WireError>>,
    thread: Option<JoinHandle<()>>,
    spares: Spares,
}

/// Where a consumer of `Msg::Data` hands back the bytes' buffer once used:
/// the reader receives the next data into it instead of faulting in fresh
/// pages for every frame. Giving is optional and never blocks.
#[derive(Clone)]
pub struct Spares(Sender<Vec<u8>>);

impl Spares {
    pub fn give(&self, v: Vec<u8>) {
        let _ = self.0.try_send(v);
    }
}

/// Data buffers kept for the reader.
const SPARE_DATA: usize = 16;

/// Start the receiving half on `stream`. The channel yields each message, then
/// one error (a clean close shows as [`WireError::Closed`]) and ends.
pub fn spawn_reader(
    mut stream: impl Read + Send + 'static,
    counters: Arc<Counters>,
) -> FrameReader {
    let (tx, rx) = bounded(64);
    let (spare_tx, spare_rx) = bounded(SPARE_DATA);
    let thread = std::thread::spawn(move || {
        let mut stream = std::io::BufReader::with_capacity(256 << 10, &mut stream);
        loop {
            match read_frame_into(&mut stream, Some(&spare_rx)) {
                Ok((msg, n)) => {
                    counters.received.fetch_add(n as u64, Ordering::Relaxed);
                    if tx.send(Ok(msg)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
    });
    FrameReader {
        rx,
        thread: Some(thread),
        spares: Spares(spare_tx),
    }
}

impl FrameReader {
    /// A handle to give back data buffers (see [`Spares`]).
    pub fn spares(&self) -> Spares {
        self.spares.clone()
    }

    /// Wait for the next message.
    pub fn recv(&self) -> Result<Msg, WireError> {
        match self.rx.recv() {
            Ok(r) => r,
            Err(_) => Err(WireError::Closed {
                during: "receiving",
            }),
        }
    }
}

impl Drop for FrameReader {
    fn drop(&mut self) {
        // The thread ends when the peer closes or the socket is shut down;
        // don't block on it here.
        drop(self.thread.take());
    }
}
