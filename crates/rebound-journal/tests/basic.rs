//! Behaviour of the journal: points and catalogue queries, views, materialise,
//! segments and their indexes, torn tails, corruption, retention and pins,
//! a full retention volume.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use common::*;
use rebound_journal::fs::{Fault, FaultFs};
use rebound_journal::{Changeset, Journal, JournalError, PointKind, Target};
use rebound_types::{Coded, ErrorCode};
use std::sync::Arc;

const S: u64 = 1_000_000_000;

#[test]
fn points_views_and_catalogue() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::create(dir.path(), "vm1", &specs(2), real(64 << 20)).unwrap();
    let mut m = Model::new(2);
    let cs1 = Changeset::new()
        .write(0, 0, data(1, 2))
        .write(1, 8192, data(2, 1))
        .at(10 * S)
        .point(PointKind::CrashConsistent);
    m.apply(&cs1);
    let p1 = j.append(&cs1).unwrap().point.unwrap();
    m.points.insert(p1, m.disks.clone());
    // A changeset without a point, then an app-consistent point.
    let cs2 = Changeset::new().write(0, 4096, data(3, 3)).at(20 * S);
    m.apply(&cs2);
    assert_eq!(j.append(&cs2).unwrap().point, None);
    let cs3 = Changeset::new()
        .write(1, 0, data(4, 1))
        .at(30 * S)
        .point(PointKind::AppConsistent);
    m.apply(&cs3);
    let p3 = j.append(&cs3).unwrap().point.unwrap();
    m.points.insert(p3, m.disks.clone());
    let cs4 = Changeset::new()
        .write(0, 60 * 4096, data(5, 4))
        .at(40 * S)
        .group_point("g7");
    m.apply(&cs4);
    let p4 = j.append(&cs4).unwrap().point.unwrap();
    m.points.insert(p4, m.disks.clone());

    assert_eq!(j.points().len(), 3);
    assert_eq!(j.latest().unwrap().id, p4);
    assert_eq!(j.latest_app_consistent().unwrap().id, p3);
    assert_eq!(j.latest_at_or_before(35 * S).unwrap().id, p3);
    assert!(j.latest_at_or_before(5 * S).is_none());
    assert_eq!(j.group_point("g7").unwrap().id, p4);
    assert_eq!(
        j.point(p3).unwrap().bytes,
        4 * 4096,
        "size counts the changesets since the previous point"
    );
    assert!(j.latest_processed().is_none(), "nothing sealed yet");
    assert_eq!(j.point(999).unwrap_err().code(), ErrorCode::PointNotFound);
    for (id, want) in &m.points {
        check_point(&j, *id, want);
    }
    // Unaligned read through the view.
    let v = j.view(p1).unwrap();
    let mut b = vec![0u8; 100];
    v.read_at(0, &mut b, 4000).unwrap();
    assert_eq!(b[..], m.points[&p1][0][4000..4100]);

    // Reopen: same catalogue, same content.
    drop(v);
    drop(j);
    let mut j = Journal::open(dir.path(), "vm1", real(64 << 20)).unwrap();
    assert_eq!(
        j.points().iter().map(|p| p.id).collect::<Vec<_>>(),
        vec![p1, p3, p4]
    );
    for (id, want) in &m.points {
        check_point(&j, *id, want);
    }
    j.seal().unwrap();
    assert_eq!(j.latest_processed().unwrap().id, p4);
    // Invalid changesets are refused with their code.
    let e = j
        .append(&Changeset::new().write(0, 100, data(1, 1)))
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::ChangesetInvalid);
    let e = j
        .append(&Changeset::new().write(5, 0, data(1, 1)))
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::ChangesetInvalid);
    let e = j
        .append(&Changeset::new().write(0, DISK, data(1, 1)))
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::ChangesetInvalid);
    // A second writer is refused.
    let e = Journal::open(dir.path(), "vm1", real(64 << 20)).unwrap_err();
    assert_eq!(e.code(), ErrorCode::JournalLocked);
    // A reader is not.
    let r = Journal::open_read_only(dir.path(), "vm1", real(64 << 20)).unwrap();
    assert_eq!(r.points().len(), 3);
    let e = Journal::open(dir.path(), "nope", real(64 << 20)).unwrap_err();
    assert_eq!(e.code(), ErrorCode::JournalMissing);
}

#[test]
fn materialise_new_and_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::create(dir.path(), "vm", &specs(2), real(64 * 1024)).unwrap();
    let mut m = Model::new(2);
    let mut ids = Vec::new();
    for i in 0..40u64 {
        let blk = (i * 7) % 60;
        let cs = Changeset::new()
            .write((i % 2) as u16, blk * 4096, data(i, 1 + (i % 3) as usize))
            .at(i * S);
        let cs = if i % 4 == 3 {
            cs.point(PointKind::CrashConsistent)
        } else {
            cs
        };
        m.apply(&cs);
        if let Some(p) = j.append(&cs).unwrap().point {
            m.points.insert(p, m.disks.clone());
            ids.push(p);
        }
    }
    // Zero writes must be materialised as zeros too.
    let cs = Changeset::new()
        .write(0, 0, vec![0u8; 8192])
        .at(100 * S)
        .point(PointKind::CrashConsistent);
    m.apply(&cs);
    let pz = j.append(&cs).unwrap().point.unwrap();
    m.points.insert(pz, m.disks.clone());
    assert!(j.usage().segments > 3, "small segments roll over");
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let target_paths = vec![out.join("a.raw"), out.join("b.raw")];
    j.materialise(ids[3], &Target::NewFiles(target_paths.clone()))
        .unwrap();
    for (d, path) in target_paths.iter().enumerate() {
        assert!(std::fs::read(path).unwrap() == m.points[&ids[3]][d]);
    }
    let e = j
        .materialise(ids[3], &Target::NewFiles(target_paths.clone()))
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::MaterialiseTarget);
    // In place to a later point: only blocks that differ are written.
    let st = j
        .materialise(pz, &Target::InPlace(target_paths.clone()))
        .unwrap();
    for (d, path) in target_paths.iter().enumerate() {
        assert!(std::fs::read(path).unwrap() == m.points[&pz][d]);
    }
    let differing: u64 = (0..2)
        .map(|d| {
            m.points[&ids[3]][d]
                .chunks(4096)
                .zip(m.points[&pz][d].chunks(4096))
                .filter(|(a, b)| a != b)
                .count() as u64
        })
        .sum();
    assert_eq!(st.blocks_written, differing);
    let again = j
        .materialise(pz, &Target::InPlace(target_paths.clone()))
        .unwrap();
    assert_eq!(again.blocks_written, 0);
}

#[test]
fn lost_index_is_rebuilt_and_torn_tail_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::create(dir.path(), "vm", &specs(1), real(32 * 1024)).unwrap();
    let mut m = Model::new(1);
    for i in 0..30u64 {
        let cs = Changeset::new()
            .write(0, (i % 64) * 4096, data(i, 2.min(64 - (i % 64) as usize)))
            .at(i * S)
            .point(PointKind::CrashConsistent);
        m.apply(&cs);
        let p = j.append(&cs).unwrap().point.unwrap();
        m.points.insert(p, m.disks.clone());
    }
    let item = j.dir().to_path_buf();
    drop(j);
    let mut idx: Vec<_> = std::fs::read_dir(&item)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "idx"))
        .collect();
    idx.sort();
    std::fs::remove_file(&idx[0]).unwrap();
    // Tear the active segment: a partial record at its end.
    let mut segs: Vec<_> = std::fs::read_dir(&item)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rjs"))
        .collect();
    segs.sort();
    let last = segs.last().unwrap();
    let len = file_len(last);
    let mut junk = std::fs::read(last).unwrap();
    let head = junk[64..64 + 100].to_vec();
    junk.extend_from_slice(&head);
    std::fs::write(last, &junk).unwrap();
    let j = Journal::open(dir.path(), "vm", real(32 * 1024)).unwrap();
    assert!(idx[0].exists(), "index rebuilt");
    assert_eq!(file_len(last), len, "torn tail truncated");
    assert!(j.problems().is_empty());
    assert_eq!(j.points().len(), 30);
    for (id, want) in &m.points {
        check_point(&j, *id, want);
    }
}

#[test]
fn corrupt_record_marks_later_points_unusable() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::create(dir.path(), "vm", &specs(1), real(32 * 1024)).unwrap();
    let mut m = Model::new(1);
    let mut ids = Vec::new();
    for i in 0..20u64 {
        let cs = Changeset::new()
            .write(0, (i % 60) * 4096, data(i, 1))
            .at(i * S)
            .point(PointKind::CrashConsistent);
        m.apply(&cs);
        let p = j.append(&cs).unwrap().point.unwrap();
        m.points.insert(p, m.disks.clone());
        ids.push(p);
    }
    let item = j.dir().to_path_buf();
    drop(j);
    let mut segs: Vec<_> = std::fs::read_dir(&item)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rjs"))
        .collect();
    segs.sort();
    assert!(segs.len() >= 3);
    // Flip one data byte in the middle of the second (sealed) segment.
    let mut b = std::fs::read(&segs[1]).unwrap();
    let at = b.len() / 2;
    b[at] ^= 0x40;
    std::fs::write(&segs[1], &b).unwrap();
    let mut j = Journal::open(dir.path(), "vm", real(32 * 1024)).unwrap();
    let rep = j.verify().unwrap();
    assert_eq!(rep.problems.len(), 1, "{rep:?}");
    let good = rep.usable_through.unwrap();
    assert!(good < *ids.last().unwrap());
    let bad = j.points().iter().find(|p| !p.usable).unwrap().id;
    assert!(bad > good);
    assert_eq!(j.view(bad).unwrap_err().code(), ErrorCode::PointUnusable);
    assert!(j.latest().unwrap().id <= good);
    for (id, want) in m.points.range(..=good) {
        check_point(&j, *id, want);
    }
    // Corruption in the active segment followed by durable records is
    // damage, not a torn tail: nothing is truncated.
    drop(j);
    let last = segs.last().unwrap();
    let len = file_len(last);
    let mut b = std::fs::read(last).unwrap();
    b[64 + 70] ^= 1;
    std::fs::write(last, &b).unwrap();
    let j = Journal::open(dir.path(), "vm", real(32 * 1024)).unwrap();
    assert_eq!(file_len(last), len, "damaged segment kept as evidence");
    assert!(!j.problems().is_empty());
    assert!(j.points().iter().any(|p| !p.usable));
}

#[test]
fn retention_folds_old_changesets_and_respects_pins() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::create(dir.path(), "vm", &specs(1), real(16 * 1024)).unwrap();
    let mut m = Model::new(1);
    let mut ids = Vec::new();
    for i in 0..40u64 {
        let cs = Changeset::new()
            .write(0, (i * 5 % 60) * 4096, data(i, 2))
            .at(i * S)
            .point(PointKind::CrashConsistent);
        m.apply(&cs);
        let p = j.append(&cs).unwrap().point.unwrap();
        m.points.insert(p, m.disks.clone());
        ids.push(p);
    }
    // Pin point 10 durably; fold with a window keeping only the last 10 s.
    j.pin(ids[10], "failover-1").unwrap();
    let view = j.view(ids[5]).unwrap();
    let rep = j.fold(40 * S, 10 * S).unwrap();
    assert_eq!(
        rep.held_by_pin,
        Some(ids[5]),
        "the open view holds retention"
    );
    assert!(j.point(ids[5]).is_ok());
    for (d, w) in m.points[&ids[5]].iter().enumerate() {
        assert!(read_view(&view, d) == *w);
    }
    drop(view);
    let rep = j.fold(40 * S, 10 * S).unwrap();
    assert_eq!(rep.held_by_pin, Some(ids[10]));
    assert!(rep.segments > 0 && rep.points_removed > 0);
    assert!(j.point(ids[10]).is_ok(), "pinned point kept");
    assert_eq!(
        j.point(ids[0]).unwrap_err().code(),
        ErrorCode::PointNotFound
    );
    for (id, want) in m.points.range(ids[10]..) {
        check_point(&j, *id, want);
    }
    assert!(j.unpin(ids[10], "failover-1").unwrap());
    let rep = j.fold(40 * S, 10 * S).unwrap();
    assert!(rep.segments > 0);
    assert!(
        j.points()
            .iter()
            .all(|p| p.time_ns + 10 * S >= 40 * S || p.id == j.points()[0].id),
        "no point inside the window is removed"
    );
    for p in j.points() {
        assert!(p.time_ns >= 20 * S, "fold only removes whole old segments");
    }
    drop(j);
    let j = Journal::open(dir.path(), "vm", real(16 * 1024)).unwrap();
    assert!(j.base_seq() > 0);
    for p in j.points() {
        check_point(&j, p.id, &m.points[&p.id]);
    }
}

#[test]
fn full_volume_fails_append_with_code_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultFs::new();
    let o = opts(Arc::new(fs.clone()), 64 * 1024);
    let mut j = Journal::create(dir.path(), "vm", &specs(1), o.clone()).unwrap();
    let mut m = Model::new(1);
    for i in 0..5u64 {
        let cs = Changeset::new()
            .write(0, i * 4096, data(i, 1))
            .at(i)
            .point(PointKind::CrashConsistent);
        m.apply(&cs);
        let p = j.append(&cs).unwrap().point.unwrap();
        m.points.insert(p, m.disks.clone());
    }
    fs.fail_at(1, Fault::NoSpace);
    let e = j
        .append(
            &Changeset::new()
                .write(0, 0, data(99, 4))
                .point(PointKind::CrashConsistent),
        )
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::RetentionVolumeFull);
    assert!(matches!(e, JournalError::VolumeFull { .. }));
    for (id, want) in &m.points {
        check_point(&j, *id, want);
    }
    // Space freed: the same handle appends again.
    fs.clear();
    let cs = Changeset::new()
        .write(0, 0, data(7, 1))
        .at(10)
        .point(PointKind::CrashConsistent);
    m.apply(&cs);
    let p = j.append(&cs).unwrap().point.unwrap();
    m.points.insert(p, m.disks.clone());
    drop(j);
    let j = Journal::open(dir.path(), "vm", o).unwrap();
    assert_eq!(j.points().len(), 6);
    for (id, want) in &m.points {
        check_point(&j, *id, want);
    }
}

#[test]
fn group_points_need_every_member() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Journal::create(dir.path(), "a", &specs(1), real(1 << 20)).unwrap();
    let mut b = Journal::create(dir.path(), "b", &specs(1), real(1 << 20)).unwrap();
    for (j, markers) in [(&mut a, ["g1", "g2", "g3"]), (&mut b, ["g1", "gx", "g3"])] {
        for (i, m) in markers.iter().enumerate() {
            j.append(
                &Changeset::new()
                    .write(0, 0, data(i as u64, 1))
                    .at((i as u64 + 1) * S)
                    .group_point(*m),
            )
            .unwrap();
        }
    }
    let g = rebound_journal::volume::group_points(dir.path(), &["a", "b"], real(1 << 20)).unwrap();
    let markers: Vec<&str> = g.iter().map(|p| p.marker.as_str()).collect();
    assert_eq!(markers, ["g1", "g3"]);
    assert_eq!(
        g[1].members,
        vec![
            ("a".to_string(), a.group_point("g3").unwrap().id),
            ("b".to_string(), b.group_point("g3").unwrap().id)
        ]
    );
    let u = rebound_journal::volume::usage(dir.path()).unwrap();
    assert_eq!(u.items.len(), 2);
    assert!(
        u.items
            .iter()
            .all(|i| i.segments == 1 && i.journal_bytes > 0)
    );
    assert!(u.total_bytes > 0);
}

/// A failed append can leave an empty active segment that starts right
/// after the last folded one; the fold must not take it along.
#[test]
fn fold_keeps_an_empty_active_segment() {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultFs::new();
    let o = opts(Arc::new(fs.clone()), 1 << 20);
    let mut j = Journal::create(dir.path(), "vm", &specs(1), o.clone()).unwrap();
    let mut m = Model::new(1);
    for i in 0..3u64 {
        let cs = Changeset::new()
            .write(0, i * 4096, data(i, 1))
            .at(i * S)
            .point(PointKind::CrashConsistent);
        m.apply(&cs);
        j.append(&cs).unwrap();
    }
    j.seal().unwrap();
    // create, truncate, header, directory fsync succeed; the record write fails.
    fs.fail_at(5, Fault::NoSpace);
    let e = j
        .append(
            &Changeset::new()
                .write(0, 0, data(50, 1))
                .at(5 * S)
                .point(PointKind::CrashConsistent),
        )
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::RetentionVolumeFull);
    fs.clear();
    let rep = j.fold(100 * S, S).unwrap();
    assert_eq!(rep.segments, 1);
    let cs = Changeset::new()
        .write(0, 9 * 4096, data(9, 1))
        .at(101 * S)
        .point(PointKind::CrashConsistent);
    m.apply(&cs);
    let p = j.append(&cs).unwrap().point.unwrap();
    drop(j);
    let j = Journal::open(dir.path(), "vm", o).unwrap();
    assert_eq!(j.latest().unwrap().id, p);
    check_point(&j, p, &m.disks);
}
