//! The facts a site node reports about its datastores, retention volumes and
//! master target (DESIGN.md §1, §5, §6). The configuration server's
//! prechecks decide eligibility from these facts; this module only observes.
//!
//! Filesystem observations go through [`FsProbe`] so that tests can make a
//! directory look like FAT or like a zero-capacity volume ([`OverrideFs`]).
//!
//! Relations between directories ("is this retention volume inside a
//! datastore?", "is it the install volume?") are decided on paths, after
//! canonicalising the parts that exist, never on device numbers: in a
//! one-machine lab every directory is on the same filesystem.

use rebound_api::{Datastore, MasterTargetFacts, OsType, RetentionVolume};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A file in a retention volume that marks it locked.
pub const LOCK_FILE: &str = ".rebound-locked";

/// A file in a host directory that stands for "snapshots exist on the
/// master target's disks". The local driver has no real master target
/// disks, so this marker is its stand-in.
pub const SNAPSHOT_MARKER: &str = ".rebound-snapshot";

/// Prefix of the hidden files [`RealFs::write_probe`] creates and removes.
pub const PROBE_PREFIX: &str = ".rebound-probe-";

/// Size of the probe file written by [`RealFs::write_probe`].
pub const PROBE_SIZE: usize = 4096;

/// The datastore kind of a directory on a filesystem (the local driver's
/// only kind).
pub const LOCAL_DIR: &str = "local-dir";

/// Filesystem types a datastore cannot use (besides any `unknown(..)` type).
const UNSUPPORTED_DATASTORE_FS: &[&str] = &["vfat", "fat", "fat16", "fat32", "msdos", "exfat"];

/// What `statfs` and `stat` say about a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsInfo {
    /// `ext4`, `xfs`, `tmpfs`, `vfat`, `btrfs`, `overlay`, `nfs`, ... from
    /// the statfs magic; `unknown(0x..)` otherwise (see [`fs_type_name`]).
    pub fs_type: String,
    pub capacity_bytes: u64,
    /// Bytes available to an unprivileged user.
    pub free_bytes: u64,
    /// `st_dev` of the path.
    pub dev: u64,
}

/// How a node observes its filesystems.
pub trait FsProbe: Send + Sync {
    /// The filesystem facts of `path` (which must exist).
    fn statfs(&self, path: &Path) -> io::Result<FsInfo>;
    /// Prove that files can be created, written, synced and removed in `dir`.
    fn write_probe(&self, dir: &Path) -> io::Result<()>;
}

/// The real filesystem.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealFs;

static PROBE_COUNTER: AtomicU64 = AtomicU64::new(0);

impl FsProbe for RealFs {
    fn statfs(&self, path: &Path) -> io::Result<FsInfo> {
        let st = rustix::fs::statfs(path).map_err(io::Error::from)?;
        let dev = fs::metadata(path)?.dev();
        // f_blocks and f_bavail count fragments of f_frsize bytes; older
        // kernels leave f_frsize zero and mean f_bsize.
        #[allow(clippy::unnecessary_cast)]
        let frsize = u64::try_from(st.f_frsize as i64).unwrap_or(0);
        #[allow(clippy::unnecessary_cast)]
        let bsize = u64::try_from(st.f_bsize as i64).unwrap_or(0);
        let unit = if frsize != 0 { frsize } else { bsize };
        // f_type is a signed word on most targets; the magic is its low 32 bits.
        #[allow(clippy::unnecessary_cast)]
        let magic = (st.f_type as i64 as u64) & 0xffff_ffff;
        Ok(FsInfo {
            fs_type: fs_type_name(magic),
            capacity_bytes: st.f_blocks.saturating_mul(unit),
            free_bytes: st.f_bavail.saturating_mul(unit),
            dev,
        })
    }

    fn write_probe(&self, dir: &Path) -> io::Result<()> {
        let n = PROBE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{PROBE_PREFIX}{}-{n}", std::process::id()));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        let written = file
            .write_all(&[0u8; PROBE_SIZE])
            .and_then(|()| file.sync_data());
        drop(file);
        let removed = fs::remove_file(&path);
        written?;
        removed
    }
}

/// The name of a filesystem from its `statfs` magic (`linux/magic.h`);
/// `unknown(0x..)` for one not in the table. ext2/3/4 share a magic and
/// are all reported as `ext4`; vfat and msdos as `vfat`.
pub fn fs_type_name(magic: u64) -> String {
    let name = match magic {
        0xEF53 => "ext4",
        0x5846_5342 => "xfs",
        0x0102_1994 => "tmpfs",
        0x4d44 => "vfat",
        0x2011_BAB0 => "exfat",
        0x9123_683E => "btrfs",
        0x794c_7630 => "overlay",
        0x6969 => "nfs",
        0x2fc1_2fc1 => "zfs",
        0xF2F5_2010 => "f2fs",
        0x5265_4973 => "reiserfs",
        0x3153_464a => "jfs",
        0x5346_544e => "ntfs",
        0xFF53_4D42 => "cifs",
        0xFE53_4D42 => "smb2",
        0x6573_5546 => "fuse",
        0x8584_58f6 => "ramfs",
        0x0102_1997 => "9p",
        0x00c3_6400 => "ceph",
        0x7371_7368 => "squashfs",
        0x9660 => "iso9660",
        0x9fa0 => "proc",
        0x6265_6572 => "sysfs",
        _ => return format!("unknown({magic:#x})"),
    };
    name.to_string()
}

/// Whether a datastore may live on a filesystem of this type: not FAT-like
/// and not unknown.
pub fn datastore_fs_supported(fs_type: &str) -> bool {
    let fs = fs_type.to_ascii_lowercase();
    !(fs.is_empty() || fs.starts_with("unknown") || UNSUPPORTED_DATASTORE_FS.contains(&fs.as_str()))
}

// ---------------------------------------------------------------- overrides

/// An [`FsProbe`] that reports chosen facts for chosen directories and
/// otherwise asks an inner probe. An override applies to its directory and
/// to everything inside it (like a mount point); the deepest one wins.
#[derive(Clone, Debug, Default)]
pub struct OverrideFs<P = RealFs> {
    inner: P,
    fs_types: Vec<(PathBuf, String)>,
    capacities: Vec<(PathBuf, u64)>,
    unwritable: Vec<PathBuf>,
}

impl<P: FsProbe> OverrideFs<P> {
    pub fn new(inner: P) -> Self {
        OverrideFs {
            inner,
            fs_types: Vec::new(),
            capacities: Vec::new(),
            unwritable: Vec::new(),
        }
    }

    /// Report `fs_type` for `path` and everything inside it.
    pub fn with_fs_type(mut self, path: impl AsRef<Path>, fs_type: &str) -> Self {
        self.fs_types
            .push((resolve(path.as_ref()), fs_type.to_string()));
        self
    }

    /// Report `capacity_bytes` for `path` and everything inside it; the free
    /// bytes reported are clamped to it.
    pub fn with_capacity(mut self, path: impl AsRef<Path>, capacity_bytes: u64) -> Self {
        self.capacities
            .push((resolve(path.as_ref()), capacity_bytes));
        self
    }

    /// Make the write probe fail (permission denied) in `path` and
    /// everything inside it, even for root.
    pub fn with_unwritable(mut self, path: impl AsRef<Path>) -> Self {
        self.unwritable.push(resolve(path.as_ref()));
        self
    }

    pub fn inner(&self) -> &P {
        &self.inner
    }
}

/// The value of the deepest override that covers `path`.
fn deepest<'a, T>(overrides: &'a [(PathBuf, T)], path: &Path) -> Option<&'a T> {
    overrides
        .iter()
        .filter(|(p, _)| path.starts_with(p))
        .max_by_key(|(p, _)| p.components().count())
        .map(|(_, v)| v)
}

impl<P: FsProbe> FsProbe for OverrideFs<P> {
    fn statfs(&self, path: &Path) -> io::Result<FsInfo> {
        let mut info = self.inner.statfs(path)?;
        let resolved = resolve(path);
        if let Some(fs_type) = deepest(&self.fs_types, &resolved) {
            info.fs_type.clone_from(fs_type);
        }
        if let Some(&capacity) = deepest(&self.capacities, &resolved) {
            info.capacity_bytes = capacity;
            info.free_bytes = info.free_bytes.min(capacity);
        }
        Ok(info)
    }

    fn write_probe(&self, dir: &Path) -> io::Result<()> {
        let resolved = resolve(dir);
        if self.unwritable.iter().any(|p| resolved.starts_with(p)) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{} is made unwritable by an override", dir.display()),
            ));
        }
        self.inner.write_probe(dir)
    }
}

// ---------------------------------------------------------------- paths

/// `path` made absolute, with its longest existing prefix canonicalised
/// (symlinks resolved) and the rest normalised lexically.
pub fn resolve(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let comps: Vec<Component<'_>> = abs.components().collect();
    for i in (1..=comps.len()).rev() {
        let prefix: PathBuf = comps[..i].iter().collect();
        if let Ok(mut out) = fs::canonicalize(&prefix) {
            push_lexically(&mut out, &comps[i..]);
            return out;
        }
    }
    let mut out = PathBuf::new();
    push_lexically(&mut out, &comps);
    out
}

fn push_lexically(out: &mut PathBuf, comps: &[Component<'_>]) {
    for c in comps {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
}

/// Whether two resolved paths are equal or one contains the other.
fn nested(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// The filesystem type of `path`, or of its nearest existing ancestor when
/// `path` cannot be examined (a directory that would be created there
/// would land on that filesystem); `unknown` when nothing can be examined.
fn fs_type_near<P: FsProbe + ?Sized>(probe: &P, path: &Path) -> String {
    if let Ok(info) = probe.statfs(path) {
        return info.fs_type;
    }
    let resolved = resolve(path);
    resolved
        .ancestors()
        .skip(1)
        .find_map(|p| probe.statfs(p).ok())
        .map_or_else(|| "unknown".to_string(), |info| info.fs_type)
}

// ---------------------------------------------------------------- facts

/// The facts of the datastore `name` at `path` (a directory).
///
/// - `kind`: `local-dir`; for a filesystem a datastore cannot use it names
///   the filesystem too, e.g. `local-dir (vfat)`, so that the precheck
///   message (8061, "unsupported type ...") says why.
/// - `supported`: false on vfat/msdos/exfat and on unknown filesystems. For
///   a missing directory, the filesystem of its nearest existing ancestor.
/// - `accessible`: the directory exists, is a directory, and the write
///   probe succeeds in it.
/// - capacity and free bytes from statfs; 0 when not accessible.
pub fn datastore_facts<P: FsProbe + ?Sized>(probe: &P, name: &str, path: &Path) -> Datastore {
    let is_dir = fs::metadata(path).is_ok_and(|m| m.is_dir());
    let info = if is_dir {
        match probe.statfs(path) {
            Ok(info) => Some(info),
            Err(e) => {
                tracing::debug!(datastore = name, path = %path.display(), error = %e, "statfs failed");
                None
            }
        }
    } else {
        tracing::debug!(datastore = name, path = %path.display(), "not a directory");
        None
    };
    let fs_type = match &info {
        Some(info) => info.fs_type.clone(),
        None => fs_type_near(probe, path),
    };
    let supported = datastore_fs_supported(&fs_type);
    let writable = info.is_some()
        && match probe.write_probe(path) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(datastore = name, path = %path.display(), error = %e, "write probe failed");
                false
            }
        };
    let (capacity_bytes, free_bytes) = match (&info, writable) {
        (Some(info), true) => (info.capacity_bytes, info.free_bytes),
        _ => (0, 0),
    };
    Datastore {
        name: name.to_string(),
        kind: if supported {
            LOCAL_DIR.to_string()
        } else {
            format!("{LOCAL_DIR} ({fs_type})")
        },
        supported,
        capacity_bytes,
        free_bytes,
        accessible: writable,
    }
}

/// What a retention volume is judged against.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeContext {
    /// Datastore directories of the node.
    pub datastores: Vec<PathBuf>,
    /// The node's install directory and its cache directory.
    pub system_dirs: Vec<PathBuf>,
    /// Replication target directories in use.
    pub other_targets: Vec<PathBuf>,
}

/// The facts of the retention volume at `path` (a directory).
///
/// - `path`: as given (the configuration server matches on it).
/// - `filesystem`: from statfs (of the nearest existing ancestor if the
///   directory is missing); capacity and free bytes from statfs, 0 when it
///   cannot be examined.
/// - `locked`: [`LOCK_FILE`] exists in it, or it is not writable (the write
///   probe fails, which includes a missing directory).
/// - `in_use`: it equals, contains or is inside a datastore or another
///   replication target.
/// - `system_volume`: it equals, contains or is inside one of the system
///   directories.
pub fn retention_volume_facts<P: FsProbe + ?Sized>(
    probe: &P,
    path: &Path,
    ctx: &VolumeContext,
) -> RetentionVolume {
    let info = probe.statfs(path);
    let filesystem = match &info {
        Ok(info) => info.fs_type.clone(),
        Err(_) => fs_type_near(probe, path),
    };
    let (capacity_bytes, free_bytes) = match &info {
        Ok(info) => (info.capacity_bytes, info.free_bytes),
        Err(_) => (0, 0),
    };
    let lock_file = path.join(LOCK_FILE);
    let lock_present = fs::symlink_metadata(&lock_file).is_ok();
    let is_dir = fs::metadata(path).is_ok_and(|m| m.is_dir());
    let writable = is_dir
        && match probe.write_probe(path) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "retention volume write probe failed");
                false
            }
        };
    let resolved = resolve(path);
    let related = |dirs: &[PathBuf]| dirs.iter().any(|d| nested(&resolved, &resolve(d)));
    RetentionVolume {
        path: path.to_string_lossy().into_owned(),
        filesystem,
        capacity_bytes,
        free_bytes,
        locked: lock_present || !writable,
        in_use: related(&ctx.datastores) || related(&ctx.other_targets),
        system_volume: related(&ctx.system_dirs),
    }
}

/// A machine on the master target's host, as the node's driver lists it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MachineSummary {
    pub name: String,
    pub disks: u32,
    pub disk_uuids: Vec<String>,
    pub running: bool,
    pub snapshots: bool,
}

/// What the node knows about its master target role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MasterTargetInputs {
    pub os: OsType,
    pub host: String,
    /// The host's directory (local driver: machines are directories in it).
    pub host_dir: PathBuf,
    /// Datastores attached to the host: (name, directory).
    pub datastores: Vec<(String, PathBuf)>,
    pub retention_volumes: Vec<PathBuf>,
    /// The node's install and cache directories.
    pub system_dirs: Vec<PathBuf>,
    pub disk_slot_limit: u32,
}

/// The facts of a master target, given the machines its host holds.
///
/// - `disk_slots_used`: the sum of the disks of those machines.
/// - `machines`: their names.
/// - `disk_uuids`: empty; in the local driver the master target has no
///   disks of its own.
/// - `snapshots_present`: [`SNAPSHOT_MARKER`] exists in the host
///   directory (the local driver's stand-in for snapshots on the master
///   target's disks).
/// - `host_running`: the host directory exists.
/// - retention volumes are judged against the datastores and the system
///   directories of `inputs` (no other replication targets).
pub fn master_target_facts<P: FsProbe + ?Sized>(
    probe: &P,
    inputs: &MasterTargetInputs,
    machines: &[MachineSummary],
) -> MasterTargetFacts {
    let ctx = VolumeContext {
        datastores: inputs.datastores.iter().map(|(_, p)| p.clone()).collect(),
        system_dirs: inputs.system_dirs.clone(),
        other_targets: Vec::new(),
    };
    MasterTargetFacts {
        os: inputs.os,
        host: inputs.host.clone(),
        host_running: fs::metadata(&inputs.host_dir).is_ok_and(|m| m.is_dir()),
        disk_slots_used: machines
            .iter()
            .fold(0u32, |sum, m| sum.saturating_add(m.disks)),
        disk_slot_limit: inputs.disk_slot_limit,
        retention_volumes: inputs
            .retention_volumes
            .iter()
            .map(|p| retention_volume_facts(probe, p, &ctx))
            .collect(),
        datastores: inputs
            .datastores
            .iter()
            .map(|(name, p)| datastore_facts(probe, name, p))
            .collect(),
        disk_uuids: Vec::new(),
        snapshots_present: fs::symlink_metadata(inputs.host_dir.join(SNAPSHOT_MARKER)).is_ok(),
        machines: machines.iter().map(|m| m.name.clone()).collect(),
    }
}

/// The OS type of this node.
pub const fn os_type() -> OsType {
    if cfg!(windows) {
        OsType::Windows
    } else {
        OsType::Linux
    }
}

#[cfg(test)]
mod tests;
