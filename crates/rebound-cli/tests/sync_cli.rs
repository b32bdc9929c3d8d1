//! The real `rebound` binary in temporary directories: sync, diff,
//! sync-server, SIGKILL and resume, full and read-only destinations, and the
//! result checked by `qemu-img compare`.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_rebound");

fn rebound(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).env(
        "REBOUND_STATE_DIR",
        std::env::temp_dir().join("rebound-cli-tests-state"),
    );
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A deterministic image: random-looking data with holes and zero runs.
fn make_image(path: &Path, mib: u64, seed: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut x = seed | 1;
    for m in 0..mib {
        if m % 5 == 3 {
            continue; // hole
        }
        let buf: Vec<u8> = (0..1 << 20)
            .map(|i| {
                if m % 7 == 2 && i > 500_000 {
                    return 0;
                }
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::os::unix::fs::FileExt::write_all_at(&f, &buf, m << 20).unwrap();
    }
    f.set_len((mib << 20) + 1234).unwrap();
    f.flush().unwrap();
}

fn qemu_compare(a: &Path, b: &Path) {
    let o = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .expect("qemu-img must be installed (scripts/install-deps)");
    assert!(
        o.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

fn scribble(path: &Path, offsets: &[u64]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for (i, o) in offsets.iter().enumerate() {
        std::os::unix::fs::FileExt::write_all_at(&f, &[0xEE ^ i as u8; 4096], *o).unwrap();
    }
}

#[test]
fn sync_diff_and_json_summary() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    make_image(&a, 20, 1);
    let o = rebound(&["sync", a.to_str().unwrap(), b.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("verified: BLAKE3 roots equal"));
    qemu_compare(&a, &b);

    scribble(&a, &[0, 5 << 20, (9 << 20) + 4096]);
    let o = rebound(
        &[
            "diff",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
            "--output",
            "json",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "diff exits 1 when disks differ");
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["leaves_differing"], 3);
    assert_eq!(j["bytes_differing"], 3 * 4096);
    assert_eq!(j["identical"], false);

    let o = rebound(
        &[
            "sync",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
            "--output",
            "json",
        ],
        &[],
    );
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["leaves_differing"], 3);
    assert_eq!(j["dest_bytes_written"], 3 * 4096);
    assert_eq!(j["identical"], true);
    qemu_compare(&a, &b);
    let o = rebound(&["diff", a.to_str().unwrap(), b.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(0));

    // --full copies everything but still skips holes.
    let c = dir.path().join("c.img");
    let o = rebound(
        &[
            "sync",
            "--full",
            a.to_str().unwrap(),
            c.to_str().unwrap(),
            "--output",
            "json",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    qemu_compare(&a, &c);
}

#[test]
fn a_closed_stdout_does_not_turn_a_finished_sync_into_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    make_image(&a, 4, 2);
    for output in ["text", "json"] {
        let _ = std::fs::remove_file(&b);
        let o = common::output_with_closed_stdout(
            Command::new(BIN)
                .args(["sync", "--output", output])
                .arg(&a)
                .arg(&b)
                .env(
                    "REBOUND_STATE_DIR",
                    std::env::temp_dir().join("rebound-cli-tests-state"),
                ),
        );
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        qemu_compare(&a, &b);
    }
}

#[test]
fn bad_input_gets_codes_and_exit_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    let o = rebound(&["sync", a.to_str().unwrap(), b.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("E1001"), "{}", stderr(&o));
    assert!(stderr(&o).contains("remedy:"));
    let o = rebound(
        &["sync", dir.path().to_str().unwrap(), b.to_str().unwrap()],
        &[],
    );
    assert!(stderr(&o).contains("E1002"), "{}", stderr(&o));
    let o = rebound(&["sync", "rebound://nohost/x", b.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(!b.exists());
}

#[test]
fn sigkill_at_any_moment_then_resume_ends_identical() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    let state = dir.path().join("state");
    make_image(&a, 48, 3);
    let slow = [
        ("REBOUND_FAULT_CHUNK_DELAY_MS", "60"),
        ("REBOUND_SYNC_DURABLE_CHUNKS", "2"),
        ("REBOUND_STATE_DIR", state.to_str().unwrap()),
    ];
    // Kill once both sides have made some chunks durable (polling their
    // resume logs), plus a different extra delay each round.
    for extra_ms in [0u64, 35, 170] {
        let mut child = Command::new(BIN)
            .args(["sync", a.to_str().unwrap(), b.to_str().unwrap()])
            .envs(slow)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !both_logs_started(&state) {
            assert!(
                std::time::Instant::now() < deadline,
                "the sync made no chunk durable in 30 s"
            );
            assert!(
                child.try_wait().unwrap().is_none(),
                "the sync ended before it could be killed"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(extra_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let o = Command::new(BIN)
            .args([
                "sync",
                a.to_str().unwrap(),
                b.to_str().unwrap(),
                "--output",
                "json",
            ])
            .env("REBOUND_STATE_DIR", &state)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(j["identical"], true);
        assert!(
            j["chunks_resumed"].as_u64().unwrap() > 0,
            "did not resume: {j}"
        );
        qemu_compare(&a, &b);
        // Start again from a missing destination for the next round.
        std::fs::remove_file(&b).unwrap();
    }
}

/// True when the source's and the destination's resume logs both hold a record.
fn both_logs_started(state: &Path) -> bool {
    let Ok(dirs) = std::fs::read_dir(state.join("sync")) else {
        return false;
    };
    let sizes: Vec<u64> = dirs
        .filter_map(|d| d.ok())
        .map(|d| {
            std::fs::metadata(d.path().join("chunks.log"))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .collect();
    sizes.len() == 2 && sizes.iter().all(|&s| s >= 44)
}

fn start_server(root: &Path, token_file: &Path) -> (Child, u16) {
    let mut child = Command::new(BIN)
        .args(["sync-server", "--listen", "127.0.0.1:0", "--root"])
        .arg(root)
        .arg("--token-file")
        .arg(token_file)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap()
        .parse()
        .unwrap();
    (child, port)
}

#[test]
fn server_push_pull_and_wrong_token() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let tok = dir.path().join("token");
    std::fs::write(&tok, "a-very-secret-token-42\n").unwrap();
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "another-secret-token-99\n").unwrap();
    let (mut server, port) = start_server(&root, &tok);
    let a = dir.path().join("a.img");
    make_image(&a, 12, 5);
    let url = format!("rebound://127.0.0.1:{port}/vm1.img");

    let o = rebound(
        &[
            "sync",
            a.to_str().unwrap(),
            &url,
            "--token-file",
            bad.to_str().unwrap(),
        ],
        &[],
    );
    assert!(stderr(&o).contains("E1101"), "{}", stderr(&o));
    assert!(
        !root.join("vm1.img").exists(),
        "refused before any data moved"
    );

    let o = rebound(
        &[
            "sync",
            a.to_str().unwrap(),
            &url,
            "--token-file",
            tok.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    qemu_compare(&a, &root.join("vm1.img"));
    scribble(&root.join("vm1.img"), &[8192, 11 << 20]);
    let b = dir.path().join("b.img");
    std::fs::copy(&a, &b).unwrap();
    let o = rebound(
        &[
            "sync",
            &url,
            b.to_str().unwrap(),
            "--token-file",
            tok.to_str().unwrap(),
            "--output",
            "json",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["leaves_differing"], 2);
    qemu_compare(&root.join("vm1.img"), &b);
    server.kill().unwrap();
    server.wait().unwrap();
}

fn is_root() -> bool {
    // SAFETY-free check: /proc/self/status names the effective uid.
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn full_filesystem_then_resume_after_freeing_space() {
    assert!(
        is_root(),
        "this test mounts a small tmpfs and needs root (CI runs as root)"
    );
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs failed");
    let a = dir.path().join("a.img");
    make_image(&a, 48, 9);
    let filler = mnt.join("filler");
    // 24 MiB free for ~34 MiB of data: the filesystem fills several chunks
    // in, so that chunks finalised in parallel before it are made durable
    // first and the second run has something to resume from.
    std::fs::write(&filler, vec![1u8; 40 << 20]).unwrap();
    let b = mnt.join("b.img");
    let state = dir.path().join("state");
    let env = [
        ("REBOUND_STATE_DIR", state.to_str().unwrap()),
        ("REBOUND_SYNC_DURABLE_CHUNKS", "1"),
    ];
    let o = rebound(&["sync", a.to_str().unwrap(), b.to_str().unwrap()], &env);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("E1004"), "{err}");
    std::fs::remove_file(&filler).unwrap();
    let o = rebound(
        &[
            "sync",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
            "--output",
            "json",
        ],
        &env,
    );
    let ok = o.status.success();
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    if ok {
        qemu_compare(&a, &b);
    }
    let _ = Command::new("umount").arg(&mnt).status();
    assert!(ok, "{}", stderr(&o));
    assert_eq!(j["identical"], true);
    assert!(
        j["chunks_resumed"].as_u64().unwrap() > 0,
        "the second run should resume: {j}"
    );
}

#[test]
fn read_only_destination_is_refused_and_untouched() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let a = dir.path().join("a.img");
    make_image(&a, 2, 11);
    let b = dir.path().join("b.img");
    std::fs::write(&b, vec![7u8; 3 << 20]).unwrap();
    for p in [&a, &b] {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
    }
    // As root, permissions do not apply: run as nobody.
    let mut cmd = if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN]);
        c
    } else {
        Command::new(BIN)
    };
    let o = cmd
        .args(["sync", "--no-resume"])
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("E1003"), "{err}");
    assert_eq!(std::fs::read(&b).unwrap(), vec![7u8; 3 << 20]);
}

/// A loop device over a file, detached when dropped.
struct LoopDevice(String);

impl LoopDevice {
    /// `None` where this machine gives no loop devices (not root, no
    /// /dev/loop-control, a container without them).
    fn attach(backing: &Path) -> Option<LoopDevice> {
        let o = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output()
            .ok()?;
        let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
        (o.status.success() && dev.starts_with("/dev/")).then_some(LoopDevice(dev))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn block_devices_as_source_and_destination() {
    let dir = tempfile::tempdir().unwrap();
    let (a, backing, c) = (
        dir.path().join("a.img"),
        dir.path().join("backing.img"),
        dir.path().join("c.img"),
    );
    // Whole sectors: a loop device's size is its backing file's, rounded down.
    for (path, seed) in [(&a, 5), (&backing, 9)] {
        make_image(path, 16, seed);
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.set_len(16 << 20).unwrap();
    }
    let Some(dev) = LoopDevice::attach(&backing) else {
        eprintln!("skipped: no loop device on this machine (losetup failed)");
        return;
    };
    let (a_s, dev_s, c_s) = (a.to_str().unwrap(), dev.0.as_str(), c.to_str().unwrap());

    // Image → block device: every differing leaf written, then identical.
    let o = rebound(&["sync", a_s, dev_s, "--output", "json"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["identical"], true);
    assert!(j["leaves_differing"].as_u64().unwrap() > 0);
    qemu_compare(&a, Path::new(dev_s));

    // A few changed blocks: diff counts exactly them, sync sends exactly them.
    scribble(&a, &[4096, 7 << 20, (15 << 20) + 8192]);
    let o = rebound(&["diff", a_s, dev_s, "--output", "json"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["leaves_differing"], 3);
    let o = rebound(&["sync", a_s, dev_s, "--output", "json"], &[]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["dest_bytes_written"], 3 * 4096, "{j}");
    qemu_compare(&a, Path::new(dev_s));

    // Block device → image.
    let o = rebound(&["sync", dev_s, c_s], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    qemu_compare(Path::new(dev_s), &c);

    // A block device cannot grow: a bigger source is refused, nothing written.
    let big = dir.path().join("big.img");
    make_image(&big, 20, 3);
    let before = std::fs::read(&backing).unwrap();
    let o = rebound(&["sync", big.to_str().unwrap(), dev_s], &[]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("cannot change size"), "{err}");
    assert_eq!(std::fs::read(&backing).unwrap(), before);
}
