//! `rebound journal …` against a real journal, through the real binary.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use rebound_journal::{Changeset, DiskSpec, Journal, Options, PointKind};
use std::path::Path;
use std::process::{Command, Output};

fn rebound(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rebound"))
        .args(args)
        .output()
        .unwrap()
}

fn block(seed: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// An item with two disks and three points; returns the expected disk 0
/// content at the second point.
fn setup(vol: &Path) -> (Vec<u8>, Vec<u64>) {
    let disks: Vec<DiskSpec> = ["sda", "sdb"]
        .iter()
        .map(|n| DiskSpec {
            name: n.to_string(),
            size: 1 << 20,
            base: None,
        })
        .collect();
    let opts = Options {
        segment_bytes: 16 * 1024,
        ..Options::default()
    };
    let mut j = Journal::create(vol, "web01", &disks, opts).unwrap();
    let mut disk0 = vec![0u8; 1 << 20];
    let mut ids = Vec::new();
    for i in 0..3u8 {
        let off = i as u64 * 8192;
        let cs = Changeset::new()
            .write(0, off, block(i))
            .write(1, 4096, block(100 + i))
            .at((i as u64 + 1) * 1_000_000_000)
            .point(if i == 1 {
                PointKind::AppConsistent
            } else {
                PointKind::CrashConsistent
            });
        ids.push(j.append(&cs).unwrap().point.unwrap());
        if i < 2 {
            disk0[off as usize..off as usize + 4096].copy_from_slice(&block(i));
        }
    }
    (disk0, ids)
}

#[test]
fn points_inspect_materialize_verify() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("vol");
    let (disk0, ids) = setup(&vol);
    let v = vol.to_str().unwrap();

    let out = rebound(&["journal", "points", "--volume", v, "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: Vec<u64> = pts
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    assert_eq!(got, ids);
    assert_eq!(pts[1]["kind"], "app-consistent");
    assert_eq!(pts[0]["time"], "1970-01-01T00:00:01Z");

    let out = rebound(&["journal", "points", "--volume", v]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("app-consistent"));

    let out = rebound(&["journal", "inspect", "--volume", v, "--output", "json"]);
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["items"][0]["item"], "web01");
    assert_eq!(doc["items"][0]["latest"], ids[2]);
    assert_eq!(doc["items"][0]["latest_app_consistent"], ids[1]);
    assert!(doc["free_bytes"].as_u64().unwrap() > 0);

    let dest = dir.path().join("out");
    let p1 = ids[1].to_string();
    let out = rebound(&[
        "journal",
        "materialize",
        "--volume",
        v,
        "--point",
        &p1,
        "--out",
        dest.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read(dest.join("sda.raw")).unwrap() == disk0);
    // In place to the latest point: only the blocks that differ are written.
    let a = dest.join("sda.raw");
    let b = dest.join("sdb.raw");
    let list = format!("{},{}", a.display(), b.display());
    let out = rebound(&[
        "journal",
        "materialize",
        "--volume",
        v,
        "--in-place",
        &list,
        "--output",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["stats"]["blocks_written"], 2);

    let out = rebound(&[
        "journal",
        "materialize",
        "--volume",
        v,
        "--point",
        "999",
        "--out",
        dest.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("E2005"));

    let out = rebound(&["journal", "verify", "--volume", v]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Damage a sealed segment: verify reports it with its code.
    let item = vol.join("items/web01");
    let mut segs: Vec<_> = std::fs::read_dir(&item)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rjs"))
        .collect();
    segs.sort();
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    bytes[64 + 64 + 4 + 100] ^= 0xff;
    std::fs::write(&segs[0], &bytes).unwrap();
    let out = rebound(&["journal", "verify", "--volume", v, "--output", "json"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("E2003"));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc[0]["report"]["problems"].as_array().unwrap().len(), 1);

    let out = rebound(&[
        "journal",
        "points",
        "--volume",
        dir.path().to_str().unwrap(),
        "--item",
        "nope",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("E2001"));
}
