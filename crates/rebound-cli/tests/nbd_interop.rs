//! `rebound agent export` against real NBD clients: nbdinfo, qemu-img,
//! qemu-io, nbdcopy and fio. A missing client fails the test with the
//! package to install (scripts/install-deps installs them); nothing is
//! skipped silently.
#![allow(clippy::unwrap_used)]

mod common;

use common::Agent;

use rebound_agent::{DirtyTracker, Marker};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: install the Debian package {package} (scripts/install-deps does)"
    );
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A deterministic image: 4 KiB blocks of varying bytes, with zero stretches
/// so that holes and zero detection are exercised.
fn make_image(path: &Path, size: u64, seed: u8) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut block = vec![0u8; 4096];
    for b in 0..size / 4096 {
        if (b / 64) % 3 == 1 {
            block.fill(0);
        } else {
            for (i, x) in block.iter_mut().enumerate() {
                *x = (b as u8)
                    .wrapping_mul(31)
                    .wrapping_add(i as u8)
                    .wrapping_add(seed)
                    | 1;
            }
        }
        f.write_all(&block).unwrap();
    }
}

fn sparse(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(data, offset)
        .unwrap();
}

fn same_files(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

#[test]
fn nbdinfo_lists_exports_and_maps_holes() {
    require("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    sparse(&a, 64 * MIB);
    sparse(&b, 8 * MIB);
    write_at(&a, MIB, &[0x42; 65536]);
    write_at(&a, 40 * MIB, &[0x43; 4096]);
    let agent = Agent::start(
        dir.path(),
        &[&a, &b],
        &["--state-dir", dir.path().join("st").to_str().unwrap()],
    );
    let out = run(Command::new("nbdinfo").arg("--list").arg(agent.uri("")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("export=\"a.img\"") && text.contains("export=\"b.img\""),
        "{text}"
    );
    assert!(
        text.contains("67108864") && text.contains("8388608"),
        "{text}"
    );
    assert!(text.contains("base:allocation"), "{text}");
    assert!(text.contains("can_multi_conn: true"), "{text}");

    let out = run(Command::new("nbdinfo").arg("--map").arg(agent.uri("a.img")));
    let map: Vec<(u64, u64, u32)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    let total: u64 = map.iter().map(|e| e.1).sum();
    assert_eq!(total, 64 * MIB);
    let status_at = |off: u64| {
        map.iter()
            .find(|e| e.0 <= off && off < e.0 + e.1)
            .map(|e| e.2)
    };
    assert_eq!(status_at(0), Some(3), "start is a hole: {map:?}");
    assert_eq!(status_at(MIB), Some(0), "data at 1 MiB: {map:?}");
    assert_eq!(status_at(20 * MIB), Some(3), "hole at 20 MiB: {map:?}");
    assert_eq!(status_at(40 * MIB), Some(0), "data at 40 MiB: {map:?}");
    agent.stop();
}

#[test]
fn qemu_img_convert_into_the_export_then_compare() {
    require("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("disk.img"));
    make_image(&src, 48 * MIB, 3);
    sparse(&dst, 48 * MIB);
    let agent = Agent::start(dir.path(), &[&dst], &[]);
    let uri = agent.uri("disk.img");
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&uri));
    let out = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&uri));
    assert!(String::from_utf8_lossy(&out.stdout).contains("identical"));
    agent.stop();
    assert!(
        same_files(&src, &dst),
        "the backing file differs from the source"
    );
}

#[test]
fn qemu_io_patterns_write_read_discard_zero() {
    require("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    make_image(&disk, 16 * MIB, 9);
    let agent = Agent::start(dir.path(), &[&disk], &[]);
    let cmds = [
        "write -P 0xab 0 64k",
        "read -P 0xab 0 64k",
        "write -P 0xcd -f 1m 12k",
        "read -P 0xcd 1m 12k",
        "aio_write -P 0x11 2m 4k",
        "aio_write -P 0x22 3m 4k",
        "aio_flush",
        "read -P 0x11 2m 4k",
        "read -P 0x22 3m 4k",
        "discard 4m 1m",
        "read -P 0 4m 1m",
        "write -z 6m 256k",
        "read -P 0 6m 256k",
        "write -z -u 7m 64k",
        "read -P 0 7m 64k",
        "write -P 0x5e 5000 3",
        "read -P 0x5e 5000 3",
        "flush",
    ];
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = run(cmd.arg(agent.uri("disk.img")));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "{text}"
    );
    assert_eq!(text.matches("read ").count(), 8, "{text}");
    agent.stop();
    let data = std::fs::read(&disk).unwrap();
    assert!(data[..5000].iter().all(|&b| b == 0xab));
    assert_eq!(&data[5000..5003], &[0x5e; 3]);
    assert!(
        data[(4 * MIB) as usize..(5 * MIB) as usize]
            .iter()
            .all(|&b| b == 0)
    );
    assert!(
        data[(6 * MIB) as usize..(6 * MIB + 256 * 1024) as usize]
            .iter()
            .all(|&b| b == 0)
    );
}

#[test]
fn nbdcopy_both_ways_over_several_connections() {
    require("nbdcopy", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let (src, disk, back) = (
        dir.path().join("src.img"),
        dir.path().join("disk.img"),
        dir.path().join("back.img"),
    );
    make_image(&src, 40 * MIB, 5);
    sparse(&disk, 40 * MIB);
    let agent = Agent::start(dir.path(), &[&disk], &[]);
    run(Command::new("nbdcopy")
        .arg("--connections=4")
        .arg(&src)
        .arg(agent.uri("disk.img")));
    run(Command::new("nbdcopy")
        .arg("--connections=4")
        .arg(agent.uri("disk.img"))
        .arg(&back));
    agent.stop();
    assert!(same_files(&src, &disk), "nbdcopy into the export");
    assert!(same_files(&src, &back), "nbdcopy out of the export");
}

#[test]
fn fio_random_writes_verify_across_jobs_and_connections() {
    require("fio", "fio");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    sparse(&disk, 64 * MIB);
    let agent = Agent::start(dir.path(), &[&disk], &[]);
    let out = run(Command::new("fio")
        .args([
            "--name=verify",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
        ])
        .args([
            "--numjobs=4",
            "--size=16m",
            "--offset_increment=16m",
            "--verify=crc32c",
            "--verify_state_save=0",
        ])
        .args(["--verify_fatal=1", "--do_verify=1", "--group_reporting"])
        .arg(format!("--uri={}", agent.uri("disk.img"))));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("err= 0"), "{text}");
    // Mixed sizes with FUA-free overwrites, then a verifying read pass.
    let out = run(Command::new("fio")
        .args([
            "--name=mixed",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bsrange=512-64k",
            "--iodepth=8",
        ])
        .args([
            "--numjobs=2",
            "--size=8m",
            "--offset_increment=32m",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--verify_fatal=1",
        ])
        .arg(format!("--uri={}", agent.uri("disk.img"))));
    assert!(String::from_utf8_lossy(&out.stdout).contains("err= 0"));
    agent.stop();
}

#[test]
fn read_only_export_refuses_writes() {
    require("qemu-io", "qemu-utils");
    require("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    make_image(&disk, 4 * MIB, 1);
    let before = std::fs::read(&disk).unwrap();
    let agent = Agent::start(dir.path(), &[&disk], &["--read-only"]);
    let out = run(Command::new("nbdinfo").arg(agent.uri("disk.img")));
    assert!(String::from_utf8_lossy(&out.stdout).contains("is_read_only: true"));
    // qemu refuses to open a read-only export for writing (it sees the flag).
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k"])
        .arg(agent.uri("disk.img"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("Permission denied"),
        "{text}"
    );
    agent.stop();
    assert_eq!(std::fs::read(&disk).unwrap(), before);
    assert!(
        !dir.path().join("disk.img.dirty").exists(),
        "read-only exports keep no dirty state"
    );
}

fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = run(cmd.arg(uri));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("failed"), "{text}");
}

#[test]
fn dirty_leaves_survive_clean_stops_and_crashes() {
    require("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let st = dir.path().join("state");
    let state_file = st.join("disk.img.dirty");
    sparse(&disk, 128 * MIB);
    let st_arg = ["--state-dir", st.to_str().unwrap()];
    // First run creates the state (everything marked); the replicator then
    // ships everything and acknowledges.
    Agent::start(dir.path(), &[&disk], &st_arg).stop();
    {
        let (t, r) = DirtyTracker::open(&state_file, 128 * MIB).unwrap();
        assert!(!r.unclean);
        assert_eq!(
            t.dirty_count(),
            t.leaf_count(),
            "a new state marks everything"
        );
        let m = t.barrier().unwrap();
        t.acknowledge(m, &t.changed_since(Marker::ORIGIN));
        t.close().unwrap();
    }
    // Writes through NBD, clean stop: exactly the written leaves.
    let agent = Agent::start(dir.path(), &[&disk], &st_arg);
    qemu_io(
        &agent.uri("disk.img"),
        &[
            "write -P 0x11 5m 4k",
            "write -P 0x22 33m 8k",
            "write -z 70m 4k",
            "flush",
        ],
    );
    agent.stop();
    let marker = {
        let (t, r) = DirtyTracker::open(&state_file, 128 * MIB).unwrap();
        assert!(!r.unclean);
        assert_eq!(
            t.changed_since(Marker::ORIGIN),
            vec![1280..1281, 8448..8450, 17920..17921]
        );
        let m = t.barrier().unwrap();
        t.close().unwrap();
        m
    };
    // A write, no flush, then the agent is killed: the region of the write
    // (64 MiB) comes back marked; the untouched region does not.
    let agent = Agent::start(dir.path(), &[&disk], &st_arg);
    qemu_io(&agent.uri("disk.img"), &["write -P 0x33 100m 4k"]);
    agent.kill();
    let (t, r) = DirtyTracker::open(&state_file, 128 * MIB).unwrap();
    assert!(r.unclean);
    let changed = t.changed_since(marker);
    let leaf = 100 * 256;
    assert!(
        changed.iter().any(|r| r.contains(&leaf)),
        "the crashed write is marked: {changed:?}"
    );
    assert!(
        changed.iter().all(|r| r.start >= 16384),
        "only the second region: {changed:?}"
    );
    assert!(
        t.changed_since(Marker::ORIGIN)
            .iter()
            .any(|r| r.contains(&1280)),
        "older marks kept"
    );
    drop(t);
    let data = std::fs::read(&disk).unwrap();
    assert_eq!(data[(5 * MIB) as usize], 0x11);
}

/// Raw-socket misbehaviour against the binary, then real clients still work
/// and the disk holds exactly what was acknowledged.
#[test]
fn garbage_truncation_and_mid_write_disconnects_leave_server_and_disk_intact() {
    require("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let (src, disk) = (dir.path().join("src.img"), dir.path().join("disk.img"));
    make_image(&src, 8 * MIB, 7);
    std::fs::copy(&src, &disk).unwrap();
    let agent = Agent::start(dir.path(), &[&disk], &[]);
    let connect = || {
        let mut s = UnixStream::connect(agent.socket()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        s
    };
    // Pure garbage.
    let mut s = connect();
    let _ = s.write_all(&[0x17; 4096]);
    drop(s);
    // Handshake to transmission with EXPORT_NAME, then half a header.
    let go = |s: &mut UnixStream| {
        s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle + no zeroes
        let mut opt = b"IHAVEOPT".to_vec();
        opt.extend_from_slice(&1u32.to_be_bytes());
        opt.extend_from_slice(&8u32.to_be_bytes());
        opt.extend_from_slice(b"disk.img");
        s.write_all(&opt).unwrap();
        let mut reply = [0u8; 10];
        s.read_exact(&mut reply).unwrap();
        assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), 8 * MIB);
    };
    let mut s = connect();
    go(&mut s);
    s.write_all(&[0x25, 0x60, 0x95, 0x13, 0, 0, 0, 1]).unwrap();
    drop(s);
    // A write of 64 KiB whose payload stops after 10 KiB.
    let mut s = connect();
    go(&mut s);
    let mut req = 0x2560_9513u32.to_be_bytes().to_vec();
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&1u16.to_be_bytes());
    req.extend_from_slice(&9u64.to_be_bytes());
    req.extend_from_slice(&(2 * MIB).to_be_bytes());
    req.extend_from_slice(&65536u32.to_be_bytes());
    req.extend_from_slice(&[0xee; 10240]);
    s.write_all(&req).unwrap();
    drop(s);
    // A bad magic after a good request: the good one is still answered.
    let mut s = connect();
    go(&mut s);
    let mut req = 0x2560_9513u32.to_be_bytes().to_vec();
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&3u16.to_be_bytes()); // flush
    req.extend_from_slice(&77u64.to_be_bytes());
    req.extend_from_slice(&0u64.to_be_bytes());
    req.extend_from_slice(&0u32.to_be_bytes());
    req.extend_from_slice(&[0xde; 28]);
    s.write_all(&req).unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(u64::from_be_bytes(reply[8..].try_into().unwrap()), 77);
    assert_eq!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), 0);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "connection closed after the bad magic");
    // Still serving, and nothing of the truncated write was applied.
    let uri = agent.uri("disk.img");
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&uri));
    agent.stop();
    assert!(same_files(&src, &disk));
}

#[test]
fn tcp_listener_and_bad_arguments() {
    require("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    sparse(&disk, MIB);
    let mut child = Command::new(env!("CARGO_BIN_EXE_rebound"))
        .args(["agent", "export"])
        .arg(&disk)
        .args(["--listen", "tcp:127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on tcp:")
        .expect("tcp address")
        .to_string();
    let out = run(Command::new("nbdinfo").arg(format!("nbd://{addr}/disk.img")));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1048576"));
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());

    // Usage errors carry codes: bad address (1007), duplicate names (3003),
    // a missing disk (1001).
    let code = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_rebound"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let d = disk.to_str().unwrap();
    let (st, err) = code(&["agent", "export", d, "--listen", "nowhere"]);
    assert_eq!(st, Some(2), "{err}");
    assert!(err.contains("E1007"), "{err}");
    let sock = format!("unix:{}", dir.path().join("s").display());
    let (st, err) = code(&["agent", "export", d, d, "--listen", &sock]);
    assert_eq!(st, Some(3), "{err}");
    assert!(err.contains("E3003"), "{err}");
    let (_, err) = code(&["agent", "export", "/nonexistent/x.img", "--listen", &sock]);
    assert!(err.contains("E1001"), "{err}");
}

/// Soak: a minute of mixed random IO with verification over 8 connections.
/// `cargo test -p rebound-cli --test nbd_interop -- --ignored`
#[test]
#[ignore = "soak test: about a minute"]
fn soak_mixed_io_with_verify() {
    require("fio", "fio");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    sparse(&disk, 512 * MIB);
    let agent = Agent::start(dir.path(), &[&disk], &[]);
    let out = run(Command::new("fio")
        .args([
            "--name=soak",
            "--ioengine=nbd",
            "--rw=randrw",
            "--bsrange=512-256k",
            "--iodepth=32",
        ])
        .args([
            "--numjobs=8",
            "--size=64m",
            "--offset_increment=64m",
            "--verify=crc32c",
            "--verify_state_save=0",
        ])
        .args([
            "--verify_fatal=1",
            "--time_based",
            "--runtime=60",
            "--verify_backlog=1024",
        ])
        .arg(format!("--uri={}", agent.uri("disk.img"))));
    assert!(String::from_utf8_lossy(&out.stdout).contains("err= 0"));
    agent.stop();
}
