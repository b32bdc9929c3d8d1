//! Delta sync over random images, locally and over TCP, against a model that
//! compares the two images leaf by leaf.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use rebound_delta::{Options, RemoteAddr, SyncError, Tuning};
use rebound_disk::Disk;
use rebound_types::{Coded, ErrorCode, LEAF_SIZE};
use rebound_wire::Token;
use std::net::TcpListener;
use std::path::{Path, PathBuf};

/// One region of an image.
#[derive(Clone, Debug)]
enum Region {
    Random(usize),
    Zeros(usize),
    Hole(usize),
}

fn region() -> impl Strategy<Value = Region> {
    prop_oneof![
        (1usize..600_000).prop_map(Region::Random),
        (1usize..300_000).prop_map(Region::Zeros),
        (1usize..2_000_000).prop_map(Region::Hole),
    ]
}

/// Changes applied to a copy: scattered 4 KiB blocks, long runs, zeroed runs.
#[derive(Clone, Debug)]
enum Change {
    Block(u64),
    Run(u64, usize),
    Zero(u64, usize),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        4 => any::<u64>().prop_map(Change::Block),
        1 => (any::<u64>(), 1usize..400_000).prop_map(|(o, l)| Change::Run(o, l)),
        1 => (any::<u64>(), 1usize..200_000).prop_map(|(o, l)| Change::Zero(o, l)),
    ]
}

fn write_image(path: &Path, regions: &[Region], seed: u64) -> u64 {
    let d = Disk::open_write(path, true).unwrap();
    let mut off = 0u64;
    let mut x = seed | 1;
    for r in regions {
        match r {
            Region::Random(n) => {
                let buf: Vec<u8> = (0..*n)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                d.write_at(&buf, off).unwrap();
                off += *n as u64;
            }
            Region::Zeros(n) => {
                d.write_at(&vec![0u8; *n], off).unwrap();
                off += *n as u64;
            }
            Region::Hole(n) => off += *n as u64,
        }
    }
    d.set_len(off).unwrap();
    off
}

fn apply(path: &Path, changes: &[Change], size: u64) {
    if size == 0 {
        return;
    }
    let d = Disk::open_write(path, false).unwrap();
    for (i, c) in changes.iter().enumerate() {
        match c {
            Change::Block(o) => {
                let off = (o % size) / LEAF_SIZE * LEAF_SIZE;
                let len = LEAF_SIZE.min(size - off) as usize;
                d.write_at(&vec![0xA0 ^ i as u8; len], off).unwrap();
            }
            Change::Run(o, l) => {
                let off = o % size;
                let len = (*l as u64).min(size - off) as usize;
                d.write_at(&vec![0x5B ^ i as u8; len], off).unwrap();
            }
            Change::Zero(o, l) => {
                let off = o % size;
                let len = (*l as u64).min(size - off);
                d.zero_range(off..off + len).unwrap();
            }
        }
    }
}

/// The model: leaves that differ, and how many of them are zero at the source.
fn model_diff(a: &Path, b: &Path) -> (u64, u64) {
    let a = std::fs::read(a).unwrap();
    let mut b = std::fs::read(b).unwrap_or_default();
    b.resize(a.len(), 0);
    let (mut diff, mut zero) = (0, 0);
    for (x, y) in a
        .chunks(LEAF_SIZE as usize)
        .zip(b.chunks(LEAF_SIZE as usize))
    {
        if x != y {
            diff += 1;
            if x.iter().all(|&v| v == 0) {
                zero += 1;
            }
        }
    }
    (diff, zero)
}

/// A source image `a` from `regions`, and `b`: a copy with `changes` applied.
fn changed_pair(
    regions: &[Region],
    changes: &[Change],
    seed: u64,
) -> (tempfile::TempDir, PathBuf, PathBuf, u64) {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let size = write_image(&a, regions, seed);
    std::fs::copy(&a, &b).unwrap();
    apply(&b, changes, size);
    (dir, a, b, size)
}

fn small_tuning() -> Tuning {
    Tuning {
        buffers: 4,
        hashers: 2,
        durable_every: 1,
        ..Tuning::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn local_sync_makes_identical_and_sends_only_differences(
        regions in proptest::collection::vec(region(), 0..12),
        changes in proptest::collection::vec(change(), 0..40),
        dest_extra in 0u64..3,
        seed in any::<u64>(),
    ) {
        let (dir, a, b, size) = changed_pair(&regions, &changes, seed);
        // A destination a little smaller than the source must be grown.
        if dest_extra == 1 && size > 5000 {
            std::fs::OpenOptions::new().write(true).open(&b).unwrap().set_len(size - 5000).unwrap();
        }
        let (want_diff, want_zero) = model_diff(&a, &b);

        let opts = Options { tuning: small_tuning(), state_dir: Some(dir.path().join("state")), ..Options::default() };
        let dry = rebound_delta::sync_local(&a, &b, &Options { dry_run: true, ..opts.clone() }, None).unwrap();
        prop_assert_eq!(dry.leaves_differing, want_diff);
        prop_assert_eq!(dry.identical, want_diff == 0);

        let r = rebound_delta::sync_local(&a, &b, &opts, None).unwrap();
        prop_assert!(r.identical);
        prop_assert_eq!(r.leaves_differing, want_diff);
        // Bytes sent as data are bounded by the differing non-zero leaves.
        prop_assert!(r.data_bytes <= (want_diff - want_zero) * LEAF_SIZE);
        prop_assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        // Nothing left to do, and no resume state left behind.
        let again = rebound_delta::sync_local(&a, &b, &opts, None).unwrap();
        prop_assert_eq!(again.leaves_differing, 0);
        prop_assert!(std::fs::read_dir(dir.path().join("state/sync")).map(|d| d.count()).unwrap_or(0) == 0);
    }

    #[test]
    fn full_copy_over_a_different_destination_makes_identical(
        regions in proptest::collection::vec(region(), 0..12),
        changes in proptest::collection::vec(change(), 1..40),
        seed in any::<u64>(),
    ) {
        // The destination has data where the source has holes and zero runs:
        // a full copy must overwrite all of it, not only what it sends as data.
        let (_dir, a, b, _) = changed_pair(&regions, &changes, seed);
        write_image(&b, &regions, seed ^ 0x5555);
        let opts = Options { tuning: small_tuning(), full: true, ..Options::default() };
        let r = rebound_delta::sync_local(&a, &b, &opts, None).unwrap();
        prop_assert!(r.identical);
        prop_assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    }
}

fn server(root: &Path) -> (u16, Token) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let token = Token::new("test-token-0123456789").unwrap();
    let (root, t) = (root.to_path_buf(), token.clone());
    std::thread::spawn(move || rebound_delta::serve(listener, root, t));
    (port, token)
}

fn addr(port: u16, name: &str) -> RemoteAddr {
    RemoteAddr::parse(&format!("rebound://127.0.0.1:{port}/{name}"))
        .unwrap()
        .unwrap()
}

#[test]
fn push_and_pull_over_tcp_with_holes_and_compression() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let (port, token) = server(&root);
    let a = dir.path().join("a");
    let regions = [
        Region::Random(3 << 20),
        Region::Hole(9 << 20),
        Region::Zeros(1 << 20),
        Region::Random(777_777),
    ];
    let size = write_image(&a, &regions, 42);
    for compression in [
        rebound_wire::Compression::Lz4,
        rebound_wire::Compression::Zstd,
        rebound_wire::Compression::None,
    ] {
        let opts = Options {
            compression,
            state_dir: Some(dir.path().join("state")),
            ..Options::default()
        };
        let name = format!("disk-{compression:?}");
        let r = rebound_delta::push(&a, &addr(port, &name), &token, &opts, None).unwrap();
        assert!(r.identical);
        assert_eq!(
            std::fs::read(&a).unwrap(),
            std::fs::read(root.join(&name)).unwrap()
        );
        // Holes and zero blocks were not sent: the wire carried about the data.
        assert!(
            r.wire_bytes_sent < (3 << 20) + 777_777 + 65_536,
            "{} bytes on the wire",
            r.wire_bytes_sent
        );
        // The destination stays sparse: the zero megabyte is a hole there.
        let d = Disk::open_read(&root.join(&name)).unwrap();
        let allocated: u64 = d
            .data_extents(0..size)
            .unwrap()
            .iter()
            .map(|r| r.end - r.start)
            .sum();
        assert!(allocated < 4_500_000, "{allocated} bytes allocated");
    }
    // Change a few blocks on the server copy and pull it back into a copy of `a`.
    let remote = root.join("disk-Lz4");
    apply(
        &remote,
        &[
            Change::Block(12345),
            Change::Block(99 << 20),
            Change::Zero(1 << 20, 8192),
        ],
        size,
    );
    let (want, _) = model_diff(&remote, &a);
    let b = dir.path().join("b");
    std::fs::copy(&a, &b).unwrap();
    let opts = Options {
        state_dir: Some(dir.path().join("state")),
        ..Options::default()
    };
    let r = rebound_delta::pull(&addr(port, "disk-Lz4"), &b, &token, &opts, None).unwrap();
    assert!(r.identical);
    assert_eq!(r.leaves_differing, want);
    assert_eq!(std::fs::read(&remote).unwrap(), std::fs::read(&b).unwrap());
    // Pull into a missing file creates it.
    let c = dir.path().join("c");
    rebound_delta::pull(&addr(port, "disk-Lz4"), &c, &token, &opts, None).unwrap();
    assert_eq!(std::fs::read(&remote).unwrap(), std::fs::read(&c).unwrap());
}

#[test]
fn refusals_come_with_codes_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let (port, token) = server(&root);
    let a = dir.path().join("a");
    write_image(&a, &[Region::Random(100_000)], 1);
    let opts = Options::default();
    let code = |r: Result<rebound_delta::Report, SyncError>| r.unwrap_err().code();

    let wrong = Token::new("not-the-right-token!").unwrap();
    assert_eq!(
        code(rebound_delta::push(
            &a,
            &addr(port, "x"),
            &wrong,
            &opts,
            None
        )),
        ErrorCode::AuthFailed
    );
    assert!(!root.join("x").exists(), "a refused client created a disk");
    assert_eq!(
        code(rebound_delta::push(
            &a,
            &addr(port, "../x"),
            &token,
            &opts,
            None
        )),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(rebound_delta::pull(
            &addr(port, "nope"),
            &dir.path().join("n"),
            &token,
            &opts,
            None
        )),
        ErrorCode::ExportNotFound
    );
    assert!(!dir.path().join("n").exists());
    assert_eq!(
        code(rebound_delta::sync_local(
            &dir.path().join("missing"),
            &dir.path().join("b"),
            &opts,
            None
        )),
        ErrorCode::SourceMissing
    );
    assert_eq!(
        code(rebound_delta::sync_local(
            dir.path(),
            &dir.path().join("b"),
            &opts,
            None
        )),
        ErrorCode::NotADisk
    );
    assert!(!dir.path().join("b").exists());
    // A larger destination is not cut without --allow-shrink.
    let big = dir.path().join("big");
    write_image(&big, &[Region::Random(200_000)], 2);
    let before = std::fs::read(&big).unwrap();
    assert_eq!(
        code(rebound_delta::sync_local(&a, &big, &opts, None)),
        ErrorCode::ShrinkRefused
    );
    assert_eq!(std::fs::read(&big).unwrap(), before);
    let shrink = Options {
        allow_shrink: true,
        ..Options::default()
    };
    assert!(
        rebound_delta::sync_local(&a, &big, &shrink, None)
            .unwrap()
            .identical
    );
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&big).unwrap());
    // Unreachable server.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert_eq!(
        code(rebound_delta::push(
            &a,
            &addr(closed, "x"),
            &token,
            &opts,
            None
        )),
        ErrorCode::ConnectFailed
    );
}

/// A fake source that misbehaves after the handshake.
fn evil_server(behaviour: fn(&mut std::net::TcpStream)) -> u16 {
    use rebound_wire::*;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let token = Token::new("test-token-0123456789").unwrap();
        server_handshake(&mut s, &token, (1, 1)).unwrap();
        let _open = read_frame(&mut s).unwrap();
        let opened = Msg::Opened(Opened {
            size: 8 << 20,
            session: [1; 16],
            resume_chunks: 0,
        });
        std::io::Write::write_all(&mut s, &encode_frame(&opened, Compression::None)).unwrap();
        behaviour(&mut s);
    });
    port
}

#[test]
fn corrupt_or_cut_frames_stop_the_sync_without_damage() {
    let dir = tempfile::tempdir().unwrap();
    let token = Token::new("test-token-0123456789").unwrap();
    let b = dir.path().join("b");
    write_image(&b, &[Region::Random(8 << 20)], 7);
    let before = std::fs::read(&b).unwrap();
    let opts = Options {
        state_dir: Some(dir.path().join("state")),
        ..Options::default()
    };

    let corrupt = evil_server(|s| {
        let mut f = rebound_wire::encode_frame(
            &rebound_wire::Msg::WantNodes { chunk: 0 },
            rebound_wire::Compression::None,
        );
        let last = f.len() - 1;
        f[last] ^= 0xff;
        let _ = std::io::Write::write_all(s, &f);
        std::thread::sleep(std::time::Duration::from_millis(500));
    });
    let e = rebound_delta::pull(&addr(corrupt, "d"), &b, &token, &opts, None).unwrap_err();
    assert_eq!(e.code(), ErrorCode::CorruptFrame, "{e}");
    assert_eq!(std::fs::read(&b).unwrap(), before);

    let cut = evil_server(|s| {
        let f = rebound_wire::encode_frame(
            &rebound_wire::Msg::Data {
                offset: 0,
                bytes: vec![1; 4096].into(),
            },
            rebound_wire::Compression::None,
        );
        let _ = std::io::Write::write_all(s, &f[..100]);
    });
    let e = rebound_delta::pull(&addr(cut, "d"), &b, &token, &opts, None).unwrap_err();
    assert_eq!(e.code(), ErrorCode::PeerClosed, "{e}");
    assert_eq!(std::fs::read(&b).unwrap(), before);
}

#[test]
fn a_push_past_the_quota_is_refused_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let token = Token::new("test-token-0123456789").unwrap();
    let serve_opts = rebound_delta::ServeOptions {
        create_dirs: true,
        quota: Some(rebound_delta::Quota {
            dir: "cache",
            bytes: 3 << 20,
        }),
        ..Default::default()
    };
    let (r, t) = (root.clone(), token.clone());
    std::thread::spawn(move || rebound_delta::serve_with(listener, r, t, serve_opts));

    let a = dir.path().join("a");
    write_image(&a, &[Region::Random(2 << 20)], 7);
    let opts = Options::default();
    // An empty cache takes a file even past its bound; then it is full.
    let big = dir.path().join("big");
    write_image(&big, &[Region::Random(4 << 20)], 8);
    rebound_delta::push(&big, &addr(port, "cache/item/1"), &token, &opts, None).unwrap();
    let e = rebound_delta::push(&a, &addr(port, "cache/item/2"), &token, &opts, None).unwrap_err();
    assert_eq!(e.code(), ErrorCode::CacheFull, "{e}");
    assert!(!root.join("cache/item/2").exists());
    // Outside the bounded directory, pushes go on.
    rebound_delta::push(&a, &addr(port, "incoming/item/2"), &token, &opts, None).unwrap();
    // Once the cache drains, the refused push goes through.
    std::fs::remove_file(root.join("cache/item/1")).unwrap();
    let r = rebound_delta::push(&a, &addr(port, "cache/item/2"), &token, &opts, None).unwrap();
    assert!(r.identical);
    // A second file that fits under the bound is taken too.
    let small = dir.path().join("small");
    write_image(&small, &[Region::Random(512 << 10)], 9);
    rebound_delta::push(&small, &addr(port, "cache/item/3"), &token, &opts, None).unwrap();
}

#[test]
fn a_full_copy_zeroes_on_disk_what_a_peer_left_uncovered() {
    // A source that sends one data block of an 8 MiB disk and no `Zero`
    // runs, with hashes of what the rest must then be: zeros. The old data
    // under the uncovered ranges must not survive under matching hashes.
    let dir = tempfile::tempdir().unwrap();
    let token = Token::new("test-token-0123456789").unwrap();
    let b = dir.path().join("b");
    write_image(&b, &[Region::Random(8 << 20)], 11);
    let port = evil_server(|s| {
        use rebound_wire::{Compression, Msg, encode_frame};
        let mut chunk0 = vec![0u8; 4 << 20];
        chunk0[..4096].fill(7);
        let h0 = *blake3::hash(&chunk0).as_bytes();
        let h1 = *blake3::hash(&vec![0u8; 4 << 20]).as_bytes();
        let msgs = [
            Msg::Data {
                offset: 0,
                bytes: vec![7; 4096].into(),
            },
            Msg::ChunkEnd {
                chunk: 0,
                blake3: h0,
            },
            Msg::ChunkEnd {
                chunk: 1,
                blake3: h1,
            },
            Msg::Finish {
                root: rebound_delta::root_of([h0, h1].into_iter(), 8 << 20),
            },
        ];
        for m in &msgs {
            std::io::Write::write_all(s, &encode_frame(m, Compression::None)).unwrap();
        }
        // Let the destination finish before the connection goes away.
        let _ = std::io::Read::read_to_end(s, &mut Vec::new());
    });
    let opts = Options {
        full: true,
        ..Options::default()
    };
    let r = rebound_delta::pull(&addr(port, "d"), &b, &token, &opts, None).unwrap();
    assert!(r.identical);
    let got = std::fs::read(&b).unwrap();
    assert!(got[..4096].iter().all(|&x| x == 7));
    assert!(
        got[4096..].iter().all(|&x| x == 0),
        "old data left under zero hashes"
    );
}
