//! The journal's IO layer. Every write, fsync, rename and removal the journal
//! makes goes through [`Fs`], so that tests can inject a failure at any one of
//! them ([`FaultFs`]) and simulate a power loss that drops unsynced data.

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// An open file of the journal (segment, index, state file or base disk).
pub trait FsFile: Send + Sync + fmt::Debug {
    /// Read up to `buf.len()` bytes at `offset`; returns how many were read
    /// (short only at end of file).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn sync(&self) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    /// Make `len` bytes at `offset` read as zeros (punch a hole where possible).
    fn zero(&self, offset: u64, len: u64) -> io::Result<()>;

    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Read exactly `buf.len()` bytes; past the end reads as zeros.
    fn read_full(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.read_at(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                buf[done..].fill(0);
                break;
            }
            done += n;
        }
        Ok(())
    }
}

/// The filesystem operations the journal needs. Renames and removals are
/// durable (parent directory fsynced) when they return.
pub trait Fs: Send + Sync + fmt::Debug {
    fn open(&self, path: &Path, write: bool, create: bool) -> io::Result<Box<dyn FsFile>>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    fn fsync_dir(&self, path: &Path) -> io::Result<()>;
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    /// Replace `path` atomically and durably: write a temporary file, fsync
    /// it, rename it over `path`, fsync the directory.
    fn write_durable(&self, path: &Path, contents: &[u8]) -> io::Result<()> {
        let tmp = rebound_disk::crashsafe::temp_path(path);
        {
            let f = self.open(&tmp, true, true)?;
            f.set_len(0)?;
            f.write_at(contents, 0)?;
            f.sync()?;
        }
        self.rename(&tmp, path)
    }

    fn read_all(&self, path: &Path) -> io::Result<Vec<u8>> {
        let f = self.open(path, false, false)?;
        let len = usize::try_from(f.len()?).map_err(io::Error::other)?;
        let mut buf = vec![0u8; len];
        f.read_full(&mut buf, 0)?;
        Ok(buf)
    }
}

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

#[derive(Debug)]
struct RealFile(File);

impl FsFile for RealFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        loop {
            match self.0.read_at(buf, offset) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::FallocateFlags;
        if len == 0 {
            return Ok(());
        }
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.0, flags, offset, len) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::NOSYS) => {}
            Err(e) => return Err(e.into()),
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut off = offset;
        while off < offset + len {
            let n = (offset + len - off).min(zeros.len() as u64) as usize;
            self.0.write_all_at(&zeros[..n], off)?;
            off += n as u64;
        }
        Ok(())
    }
}

impl Fs for RealFs {
    fn open(&self, path: &Path, write: bool, create: bool) -> io::Result<Box<dyn FsFile>> {
        let f = OpenOptions::new()
            .read(true)
            .write(write)
            .create(create && write)
            .open(path)?;
        Ok(Box::new(RealFile(f)))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        rebound_disk::crashsafe::durable_rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        rebound_disk::crashsafe::remove_file_durable(path)
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        rebound_disk::crashsafe::create_dir_all_durable(path)
    }
    fn fsync_dir(&self, path: &Path) -> io::Result<()> {
        rebound_disk::crashsafe::fsync_dir(path)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir)? {
            if let Some(n) = e?.file_name().to_str() {
                out.push(n.to_string());
            }
        }
        out.sort();
        Ok(out)
    }
}

/// What an injected fault returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// EIO; the process is considered dead: every later operation fails too.
    Crash,
    /// ENOSPC on this and every later write until [`FaultFs::clear`].
    NoSpace,
}

#[derive(Debug, Default)]
struct Track {
    /// Writes since the last fsync: (offset, bytes that were there before
    /// (zeros past the old end), file length before).
    unsynced: Vec<(u64, Vec<u8>, u64)>,
    /// Created since its directory was last fsynced.
    new_entry: bool,
}

#[derive(Debug, Default)]
struct FaultState {
    ops: u64,
    fail_at: Option<(u64, Fault)>,
    failing: Option<Fault>,
    files: HashMap<PathBuf, Track>,
}

/// A fault-injecting layer over the real filesystem for tests: counts every
/// mutating operation (write, fsync, truncate, create, rename, remove,
/// directory fsync), fails the N-th, and can simulate a power loss that
/// forgets unsynced writes (all or some of them, leaving zero-filled holes as
/// a real filesystem may). Durability is simulated: it tracks what an fsync
/// would have made durable and never calls the real fsync, so that tests
/// that crash at every operation stay fast.
#[derive(Debug, Clone, Default)]
pub struct FaultFs {
    state: Arc<Mutex<FaultState>>,
}

#[derive(Debug)]
struct FaultFile {
    inner: RealFile,
    path: PathBuf,
    state: Arc<Mutex<FaultState>>,
}

fn lock(state: &Mutex<FaultState>) -> MutexGuard<'_, FaultState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl FaultState {
    /// Count one mutating operation; fail it if it is the chosen one. A full
    /// volume only fails operations that allocate space (truncate, fsync and
    /// unlink still work, as on a real filesystem).
    fn step_alloc(&mut self, allocates: bool) -> io::Result<()> {
        if let Some(f) = self.failing
            && (f == Fault::Crash || allocates)
        {
            return Err(fault_error(f));
        }
        self.ops += 1;
        if let Some((n, f)) = self.fail_at
            && self.ops >= n
            && (f == Fault::Crash || allocates)
        {
            self.failing = Some(f);
            return Err(fault_error(f));
        }
        Ok(())
    }

    fn step(&mut self) -> io::Result<()> {
        self.step_alloc(false)
    }
}

fn fault_error(f: Fault) -> io::Error {
    match f {
        Fault::Crash => io::Error::from_raw_os_error(rustix::io::Errno::IO.raw_os_error()),
        Fault::NoSpace => io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error()),
    }
}

impl FaultFs {
    pub fn new() -> FaultFs {
        FaultFs::default()
    }

    /// Mutating operations counted so far.
    pub fn ops(&self) -> u64 {
        lock(&self.state).ops
    }

    /// Fail the `n`-th mutating operation from now on (1 = the next one).
    pub fn fail_at(&self, n: u64, fault: Fault) {
        let mut s = lock(&self.state);
        s.fail_at = Some((s.ops + n, fault));
    }

    /// Stop failing (space was freed, or the process "restarted").
    pub fn clear(&self) {
        let mut s = lock(&self.state);
        s.fail_at = None;
        s.failing = None;
    }

    /// Simulate a power loss: unsynced writes are undone (every one when
    /// `seed` is 0, otherwise a pseudo-random subset), files created in a
    /// directory that was not fsynced afterwards disappear. Then clear faults.
    pub fn power_loss(&self, seed: u64) {
        let mut s = lock(&self.state);
        let mut rng = seed;
        let files = std::mem::take(&mut s.files);
        for (path, track) in files {
            if track.new_entry {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Ok(f) = OpenOptions::new().write(true).open(&path) else {
                continue;
            };
            let all = track.unsynced.iter().map(|(_, _, l)| *l).min();
            let mut undone_all = true;
            for (off, old, _) in track.unsynced.iter().rev() {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                if seed != 0 && rng.is_multiple_of(3) {
                    undone_all = false;
                    continue; // this write reached the disk
                }
                let _ = f.write_all_at(old, *off);
            }
            if undone_all && let Some(len) = all {
                let _ = f.set_len(len);
            }
        }
        s.fail_at = None;
        s.failing = None;
    }

    fn track<'a>(s: &'a mut FaultState, path: &Path) -> &'a mut Track {
        s.files.entry(path.to_path_buf()).or_default()
    }
}

impl FsFile for FaultFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = lock(&self.state);
        s.step_alloc(true)?;
        let len = self.inner.len()?;
        let mut old = vec![0u8; buf.len()];
        if offset < len {
            let n = ((len - offset) as usize).min(buf.len());
            self.inner.read_full(&mut old[..n], offset)?;
        }
        FaultFs::track(&mut s, &self.path)
            .unsynced
            .push((offset, old, len));
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        let mut s = lock(&self.state);
        s.step()?;
        FaultFs::track(&mut s, &self.path).unsynced.clear();
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = lock(&self.state);
        s.step()?;
        let cur = self.inner.len()?;
        // Model a truncate as a write of what it removes, so a power loss
        // can bring the bytes back (it is not durable until fsync either).
        let mut old = vec![0u8; cur.saturating_sub(len) as usize];
        if !old.is_empty() {
            self.inner.read_full(&mut old, len)?;
        }
        FaultFs::track(&mut s, &self.path)
            .unsynced
            .push((len, old, cur));
        self.inner.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut s = lock(&self.state);
        s.step()?;
        let flen = self.inner.len()?;
        let mut old = vec![0u8; len as usize];
        if offset < flen {
            let n = ((flen - offset) as usize).min(old.len());
            self.inner.read_full(&mut old[..n], offset)?;
        }
        FaultFs::track(&mut s, &self.path)
            .unsynced
            .push((offset, old, flen));
        self.inner.zero(offset, len)
    }
}

impl Fs for FaultFs {
    fn open(&self, path: &Path, write: bool, create: bool) -> io::Result<Box<dyn FsFile>> {
        let existed = path.exists();
        if write && create && !existed {
            let mut s = lock(&self.state);
            s.step_alloc(true)?;
            FaultFs::track(&mut s, path).new_entry = true;
        }
        let inner = RealFile(
            OpenOptions::new()
                .read(true)
                .write(write)
                .create(create && write)
                .open(path)?,
        );
        Ok(Box::new(FaultFile {
            inner,
            path: path.to_path_buf(),
            state: self.state.clone(),
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = lock(&self.state);
        s.step()?; // fsync of the file
        s.step()?; // the rename itself
        std::fs::rename(from, to)?;
        let mut t = s.files.remove(from).unwrap_or_default();
        t.unsynced.clear();
        s.step()?; // the directory fsync
        t.new_entry = false;
        s.files.insert(to.to_path_buf(), t);
        Ok(())
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut s = lock(&self.state);
        s.step()?;
        s.files.remove(path);
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut s = lock(&self.state);
        s.step_alloc(true)?;
        RealFs.create_dir_all(path)
    }
    fn fsync_dir(&self, path: &Path) -> io::Result<()> {
        let mut s = lock(&self.state);
        s.step()?;
        for (p, t) in s.files.iter_mut() {
            if p.parent() == Some(path) {
                t.new_entry = false;
            }
        }
        Ok(())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        RealFs.list(dir)
    }
}
