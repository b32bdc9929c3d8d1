use super::*;
use std::os::unix::fs::PermissionsExt;
use tempfile::TempDir;

fn tmp() -> TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn mkdir(base: &Path, rel: &str) -> PathBuf {
    let p = base.join(rel);
    fs::create_dir_all(&p).expect("create dir");
    p
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Make `dir` read-only for the test's duration and restore it on drop so
/// the tempdir can be removed.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn new(dir: &Path) -> Self {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o555)).expect("chmod 555");
        ReadOnly(dir.to_path_buf())
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = fs::set_permissions(&self.0, fs::Permissions::from_mode(0o755));
    }
}

fn no_probe_files_left(dir: &Path) {
    let left: Vec<_> = fs::read_dir(dir)
        .expect("read dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(PROBE_PREFIX))
        .collect();
    assert!(left.is_empty(), "probe files left behind: {left:?}");
}

// ---------------------------------------------------------------- probe

#[test]
fn fs_type_names() {
    assert_eq!(fs_type_name(0xEF53), "ext4");
    assert_eq!(fs_type_name(0x5846_5342), "xfs");
    assert_eq!(fs_type_name(0x0102_1994), "tmpfs");
    assert_eq!(fs_type_name(0x4d44), "vfat");
    assert_eq!(fs_type_name(0x9123_683E), "btrfs");
    assert_eq!(fs_type_name(0x794c_7630), "overlay");
    assert_eq!(fs_type_name(0x6969), "nfs");
    assert_eq!(fs_type_name(0x1234), "unknown(0x1234)");
}

#[test]
fn supported_datastore_filesystems() {
    for fs in ["ext4", "xfs", "btrfs", "tmpfs", "overlay", "nfs", "zfs"] {
        assert!(datastore_fs_supported(fs), "{fs}");
    }
    for fs in [
        "vfat",
        "VFAT",
        "msdos",
        "exfat",
        "fat32",
        "unknown(0x1234)",
        "unknown",
        "",
    ] {
        assert!(!datastore_fs_supported(fs), "{fs}");
    }
}

#[test]
fn real_statfs_reports_the_filesystem() {
    let t = tmp();
    let info = RealFs.statfs(t.path()).expect("statfs");
    assert!(!info.fs_type.is_empty());
    assert!(info.capacity_bytes > 0);
    assert!(info.free_bytes <= info.capacity_bytes);
    assert_eq!(info.dev, fs::metadata(t.path()).expect("stat").dev());
    assert!(RealFs.statfs(&t.path().join("missing")).is_err());
}

#[test]
fn real_write_probe_cleans_up() {
    let t = tmp();
    RealFs.write_probe(t.path()).expect("probe");
    RealFs.write_probe(t.path()).expect("probe again");
    no_probe_files_left(t.path());
    assert!(RealFs.write_probe(&t.path().join("missing")).is_err());
}

#[test]
fn real_write_probe_fails_in_read_only_dir() {
    if is_root() {
        eprintln!("skipped: root ignores directory permissions");
        return;
    }
    let t = tmp();
    let dir = mkdir(t.path(), "ro");
    let _ro = ReadOnly::new(&dir);
    assert!(RealFs.write_probe(&dir).is_err());
}

#[test]
fn overrides_apply_to_the_path_and_inside_it() {
    let t = tmp();
    let a = mkdir(t.path(), "a");
    let inner = mkdir(t.path(), "a/b/c");
    let other = mkdir(t.path(), "other");
    let probe = OverrideFs::new(RealFs)
        .with_fs_type(&a, "vfat")
        .with_fs_type(a.join("b"), "xfs")
        .with_capacity(&other, 0)
        .with_unwritable(&other);
    let real = RealFs.statfs(t.path()).expect("statfs");
    assert_eq!(probe.statfs(&a).expect("statfs").fs_type, "vfat");
    assert_eq!(probe.statfs(&inner).expect("statfs").fs_type, "xfs");
    let o = probe.statfs(&other).expect("statfs");
    assert_eq!(o.fs_type, real.fs_type);
    assert_eq!((o.capacity_bytes, o.free_bytes), (0, 0));
    assert_eq!(
        probe.statfs(t.path()).expect("statfs").fs_type,
        real.fs_type
    );
    assert!(probe.write_probe(&other).is_err());
    probe.write_probe(&a).expect("a stays writable");
    // A spelling through `..` reaches the same override.
    let detour = a.join("b").join("..").join("..").join("other");
    assert!(probe.write_probe(&detour).is_err());
}

#[test]
fn resolve_canonicalises_what_exists() {
    let t = tmp();
    let real = mkdir(t.path(), "real");
    let link = t.path().join("link");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    let canon = fs::canonicalize(&real).expect("canonicalize");
    assert_eq!(resolve(&link), canon);
    assert_eq!(resolve(&link.join("x/./y/../z")), canon.join("x/z"));
    assert!(resolve(Path::new("relative/dir")).is_absolute());
}

// ---------------------------------------------------------------- datastore

#[test]
fn datastore_on_a_local_directory() {
    let t = tmp();
    let dir = mkdir(t.path(), "ds1");
    let ds = datastore_facts(&RealFs, "ds1", &dir);
    let info = RealFs.statfs(&dir).expect("statfs");
    assert_eq!(ds.name, "ds1");
    assert_eq!(ds.supported, datastore_fs_supported(&info.fs_type));
    if ds.supported {
        assert_eq!(ds.kind, LOCAL_DIR);
    }
    assert!(ds.accessible);
    assert!(ds.capacity_bytes > 0);
    assert!(ds.free_bytes <= ds.capacity_bytes);
    no_probe_files_left(&dir);
}

#[test]
fn datastore_on_ext4_is_local_dir() {
    let t = tmp();
    let dir = mkdir(t.path(), "ds1");
    let probe = OverrideFs::new(RealFs).with_fs_type(&dir, "ext4");
    let ds = datastore_facts(&probe, "ds1", &dir);
    assert_eq!(ds.kind, "local-dir");
    assert!(ds.supported);
    assert!(ds.accessible);
}

#[test]
fn datastore_on_vfat_is_unsupported() {
    let t = tmp();
    let dir = mkdir(t.path(), "ds1");
    let probe = OverrideFs::new(RealFs).with_fs_type(&dir, "vfat");
    let ds = datastore_facts(&probe, "ds1", &dir);
    assert!(!ds.supported);
    assert!(
        ds.kind.starts_with(LOCAL_DIR) && ds.kind.contains("vfat"),
        "{}",
        ds.kind
    );
    assert!(ds.accessible, "type and access are separate facts");
}

#[test]
fn datastore_on_unknown_filesystem_is_unsupported() {
    let t = tmp();
    let dir = mkdir(t.path(), "ds1");
    let probe = OverrideFs::new(RealFs).with_fs_type(&dir, "unknown(0xabcd)");
    assert!(!datastore_facts(&probe, "ds1", &dir).supported);
}

#[test]
fn missing_datastore_is_inaccessible() {
    let t = tmp();
    let dir = t.path().join("nope");
    let ds = datastore_facts(&RealFs, "ds1", &dir);
    assert!(!ds.accessible);
    assert_eq!((ds.capacity_bytes, ds.free_bytes), (0, 0));
    // Its type is the one of the filesystem it would be created on.
    let parent = RealFs.statfs(t.path()).expect("statfs");
    assert_eq!(ds.supported, datastore_fs_supported(&parent.fs_type));
    assert!(!dir.exists(), "facts never create the directory");
}

#[test]
fn missing_datastore_under_vfat_is_unsupported() {
    let t = tmp();
    let probe = OverrideFs::new(RealFs).with_fs_type(t.path(), "vfat");
    let ds = datastore_facts(&probe, "ds1", &t.path().join("nope/deeper"));
    assert!(!ds.accessible);
    assert!(!ds.supported);
}

#[test]
fn datastore_that_is_a_file_is_inaccessible() {
    let t = tmp();
    let file = t.path().join("file");
    fs::write(&file, b"x").expect("write");
    let ds = datastore_facts(&RealFs, "ds1", &file);
    assert!(!ds.accessible);
    assert_eq!(ds.capacity_bytes, 0);
}

#[test]
fn unwritable_datastore_is_inaccessible() {
    let t = tmp();
    let dir = mkdir(t.path(), "ds1");
    let probe = OverrideFs::new(RealFs).with_unwritable(&dir);
    let ds = datastore_facts(&probe, "ds1", &dir);
    assert!(!ds.accessible);
    assert_eq!((ds.capacity_bytes, ds.free_bytes), (0, 0));
}

#[test]
fn read_only_datastore_is_inaccessible() {
    if is_root() {
        eprintln!("skipped: root ignores directory permissions");
        return;
    }
    let t = tmp();
    let dir = mkdir(t.path(), "ds1");
    let _ro = ReadOnly::new(&dir);
    assert!(!datastore_facts(&RealFs, "ds1", &dir).accessible);
}

// ---------------------------------------------------------------- retention

#[test]
fn eligible_retention_volume() {
    let t = tmp();
    let dir = mkdir(t.path(), "retention");
    let ds = mkdir(t.path(), "ds1");
    let install = mkdir(t.path(), "install");
    let ctx = VolumeContext {
        datastores: vec![ds],
        system_dirs: vec![install],
        other_targets: vec![mkdir(t.path(), "target")],
    };
    let v = retention_volume_facts(&RealFs, &dir, &ctx);
    let info = RealFs.statfs(&dir).expect("statfs");
    assert_eq!(v.path, dir.to_string_lossy());
    assert_eq!(v.filesystem, info.fs_type);
    assert!(v.capacity_bytes > 0);
    assert!(!v.locked);
    assert!(!v.in_use);
    assert!(!v.system_volume);
    no_probe_files_left(&dir);
}

#[test]
fn retention_volume_on_vfat() {
    let t = tmp();
    let dir = mkdir(t.path(), "retention");
    let probe = OverrideFs::new(RealFs).with_fs_type(&dir, "vfat");
    let v = retention_volume_facts(&probe, &dir, &VolumeContext::default());
    assert_eq!(v.filesystem, "vfat");
}

#[test]
fn retention_volume_with_zero_capacity() {
    let t = tmp();
    let dir = mkdir(t.path(), "retention");
    let probe = OverrideFs::new(RealFs).with_capacity(&dir, 0);
    let v = retention_volume_facts(&probe, &dir, &VolumeContext::default());
    assert_eq!((v.capacity_bytes, v.free_bytes), (0, 0));
}

#[test]
fn retention_volume_with_lock_file_is_locked() {
    let t = tmp();
    let dir = mkdir(t.path(), "retention");
    fs::write(dir.join(LOCK_FILE), b"").expect("lock");
    assert!(retention_volume_facts(&RealFs, &dir, &VolumeContext::default()).locked);
}

#[test]
fn unwritable_retention_volume_is_locked() {
    let t = tmp();
    let dir = mkdir(t.path(), "retention");
    let probe = OverrideFs::new(RealFs).with_unwritable(&dir);
    assert!(retention_volume_facts(&probe, &dir, &VolumeContext::default()).locked);
}

#[test]
fn read_only_retention_volume_is_locked() {
    if is_root() {
        eprintln!("skipped: root ignores directory permissions");
        return;
    }
    let t = tmp();
    let dir = mkdir(t.path(), "retention");
    let _ro = ReadOnly::new(&dir);
    assert!(retention_volume_facts(&RealFs, &dir, &VolumeContext::default()).locked);
}

#[test]
fn missing_retention_volume() {
    let t = tmp();
    let dir = t.path().join("nope");
    let v = retention_volume_facts(&RealFs, &dir, &VolumeContext::default());
    assert_eq!(v.capacity_bytes, 0);
    assert!(v.locked);
    assert_eq!(
        v.filesystem,
        RealFs.statfs(t.path()).expect("statfs").fs_type
    );
}

#[test]
fn retention_volume_inside_a_datastore_is_in_use() {
    let t = tmp();
    let ds = mkdir(t.path(), "ds1");
    let dir = mkdir(t.path(), "ds1/retention");
    let ctx = VolumeContext {
        datastores: vec![ds],
        ..VolumeContext::default()
    };
    assert!(retention_volume_facts(&RealFs, &dir, &ctx).in_use);
}

#[test]
fn retention_volume_containing_a_datastore_is_in_use() {
    let t = tmp();
    let dir = mkdir(t.path(), "retention");
    let ds = mkdir(t.path(), "retention/ds1");
    let ctx = VolumeContext {
        datastores: vec![ds],
        ..VolumeContext::default()
    };
    assert!(retention_volume_facts(&RealFs, &dir, &ctx).in_use);
}

#[test]
fn retention_volume_equal_to_a_datastore_is_in_use() {
    let t = tmp();
    let dir = mkdir(t.path(), "shared");
    let ctx = VolumeContext {
        datastores: vec![dir.join(".")],
        ..VolumeContext::default()
    };
    assert!(retention_volume_facts(&RealFs, &dir, &ctx).in_use);
}

#[test]
fn retention_volume_and_other_targets() {
    let t = tmp();
    let target = mkdir(t.path(), "target");
    let inside = mkdir(t.path(), "target/retention");
    let sibling = mkdir(t.path(), "target-retention");
    let ctx = VolumeContext {
        other_targets: vec![target],
        ..VolumeContext::default()
    };
    assert!(retention_volume_facts(&RealFs, &inside, &ctx).in_use);
    // A common name prefix is not nesting.
    assert!(!retention_volume_facts(&RealFs, &sibling, &ctx).in_use);
}

#[test]
fn nesting_is_decided_after_resolving_symlinks() {
    let t = tmp();
    let ds = mkdir(t.path(), "ds1");
    let link = t.path().join("ds-link");
    std::os::unix::fs::symlink(&ds, &link).expect("symlink");
    let dir = mkdir(&ds, "retention");
    let ctx = VolumeContext {
        datastores: vec![link.clone()],
        ..VolumeContext::default()
    };
    assert!(retention_volume_facts(&RealFs, &dir, &ctx).in_use);
    let ctx = VolumeContext {
        datastores: vec![ds],
        ..VolumeContext::default()
    };
    assert!(retention_volume_facts(&RealFs, &link.join("retention"), &ctx).in_use);
}

#[test]
fn nesting_with_a_missing_datastore() {
    let t = tmp();
    let dir = mkdir(t.path(), "retention");
    let ctx = VolumeContext {
        datastores: vec![dir.join("not-yet/ds1")],
        ..VolumeContext::default()
    };
    assert!(retention_volume_facts(&RealFs, &dir, &ctx).in_use);
}

#[test]
fn retention_volume_in_system_dirs() {
    let t = tmp();
    let install = mkdir(t.path(), "install");
    let cache_parent = mkdir(t.path(), "var");
    let cache = mkdir(t.path(), "var/cache");
    let ctx = VolumeContext {
        system_dirs: vec![install.clone(), cache],
        ..VolumeContext::default()
    };
    let inside_install = mkdir(&install, "journal");
    assert!(retention_volume_facts(&RealFs, &inside_install, &ctx).system_volume);
    assert!(retention_volume_facts(&RealFs, &install, &ctx).system_volume);
    assert!(retention_volume_facts(&RealFs, &cache_parent, &ctx).system_volume);
    let elsewhere = mkdir(t.path(), "retention");
    let v = retention_volume_facts(&RealFs, &elsewhere, &ctx);
    assert!(!v.system_volume);
    assert!(!v.in_use, "system dirs are not replication targets");
}

// ---------------------------------------------------------------- master target

fn machine(name: &str, disks: u32) -> MachineSummary {
    MachineSummary {
        name: name.into(),
        disks,
        disk_uuids: (0..disks).map(|i| format!("{name}-{i}")).collect(),
        running: true,
        snapshots: false,
    }
}

fn inputs(base: &Path) -> MasterTargetInputs {
    MasterTargetInputs {
        os: OsType::Linux,
        host: "host1".into(),
        host_dir: mkdir(base, "host1"),
        datastores: vec![
            ("ds1".into(), mkdir(base, "ds1")),
            ("gone".into(), base.join("gone")),
        ],
        retention_volumes: vec![mkdir(base, "retention"), mkdir(base, "ds1/journal")],
        system_dirs: vec![mkdir(base, "install")],
        disk_slot_limit: 60,
    }
}

#[test]
fn master_target_facts_from_host_and_machines() {
    let t = tmp();
    let inputs = inputs(t.path());
    let machines = [machine("web", 2), machine("db", 3)];
    let f = master_target_facts(&RealFs, &inputs, &machines);
    assert_eq!(f.os, OsType::Linux);
    assert_eq!(f.host, "host1");
    assert!(f.host_running);
    assert_eq!(f.disk_slots_used, 5);
    assert_eq!(f.disk_slot_limit, 60);
    assert_eq!(f.machines, vec!["web".to_string(), "db".to_string()]);
    assert!(f.disk_uuids.is_empty());
    assert!(!f.snapshots_present);

    assert_eq!(f.datastores.len(), 2);
    assert_eq!(f.datastores[0].name, "ds1");
    assert!(f.datastores[0].accessible);
    assert_eq!(f.datastores[1].name, "gone");
    assert!(!f.datastores[1].accessible);

    assert_eq!(f.retention_volumes.len(), 2);
    let [free, nested] = [&f.retention_volumes[0], &f.retention_volumes[1]];
    assert!(!free.in_use && !free.system_volume && !free.locked);
    assert!(nested.in_use, "a journal inside a datastore is in use");
}

#[test]
fn master_target_snapshot_marker_and_missing_host() {
    let t = tmp();
    let mut inputs = inputs(t.path());
    fs::write(inputs.host_dir.join(SNAPSHOT_MARKER), b"").expect("marker");
    let f = master_target_facts(&RealFs, &inputs, &[]);
    assert!(f.snapshots_present);
    assert_eq!(f.disk_slots_used, 0);
    assert!(f.machines.is_empty());

    inputs.host_dir = t.path().join("no-host");
    let f = master_target_facts(&RealFs, &inputs, &[]);
    assert!(!f.host_running);
    assert!(!f.snapshots_present);
}

#[test]
fn master_target_with_a_dyn_probe() {
    let t = tmp();
    let inputs = inputs(t.path());
    let probe: std::sync::Arc<dyn FsProbe> =
        std::sync::Arc::new(OverrideFs::new(RealFs).with_fs_type(t.path(), "vfat"));
    let f = master_target_facts(&*probe, &inputs, &[]);
    assert!(!f.datastores[0].supported);
    assert_eq!(f.retention_volumes[0].filesystem, "vfat");
}

#[test]
fn this_node_is_linux() {
    assert_eq!(os_type(), OsType::Linux);
}
