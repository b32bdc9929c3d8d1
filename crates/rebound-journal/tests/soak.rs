//! Long soak test (ignored by default): a large journal of 4 KiB writes,
//! reopened, viewed and read, with the process's peak resident memory
//! checked against the bound (256 MiB for 100 GiB; this scales the
//! journal down, the memory must stay far below the bound and must not grow
//! with the journal's bytes).
//!
//! `SOAK_MIB=8192 cargo nextest run -p rebound-journal --run-ignored only soak`
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use rebound_journal::{Changeset, DiskSpec, Journal, Options, PointKind};

fn vm_hwm_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
#[ignore]
fn soak_memory_is_bounded_by_points_not_bytes() {
    let mib: u64 = std::env::var("SOAK_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let dir =
        tempfile::tempdir_in(std::env::var("SOAK_DIR").unwrap_or_else(|_| "/tmp".into())).unwrap();
    let disk = 256u64 << 30;
    let spec = DiskSpec {
        name: "d0".into(),
        size: disk,
        base: None,
    };
    let mut j = Journal::create(dir.path(), "vm", &[spec], Options::default()).unwrap();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let blocks = mib * 256;
    let mut cs = Changeset::new();
    for b in 0..blocks {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut data = vec![0u8; 4096];
        data[..8].copy_from_slice(&x.to_le_bytes());
        cs = cs.write(0, (x % (disk / 4096)) * 4096, data);
        if b % 1024 == 1023 {
            j.append(
                &std::mem::take(&mut cs)
                    .at(b)
                    .point(PointKind::CrashConsistent),
            )
            .unwrap();
        }
    }
    drop(j);
    let j = Journal::open(dir.path(), "vm", Options::default()).unwrap();
    let latest = j.latest().unwrap().id;
    let v = j.view(latest).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..256u64 {
        v.read_at(0, &mut buf, (i * 7919 % (disk >> 20)) << 20)
            .unwrap();
    }
    let hwm = vm_hwm_kib();
    eprintln!(
        "journal {mib} MiB, {} changed blocks, peak RSS {} MiB",
        v.changed_blocks(),
        hwm / 1024
    );
    assert!(hwm < 256 * 1024, "peak RSS {hwm} KiB");
}
