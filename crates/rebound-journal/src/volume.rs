//! A retention volume: the items whose journals it holds and its space.

use crate::error::{JournalError, Result};
use crate::journal::{allocated, item_dir};
use serde::Serialize;
use std::path::Path;

/// Space of one item, read from its files without opening the journal.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ItemSpace {
    pub item: String,
    pub segments: usize,
    pub journal_bytes: u64,
    pub index_bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct VolumeUsage {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub items: Vec<ItemSpace>,
}

/// Items with a journal on `volume`.
pub fn items(volume: &Path) -> Result<Vec<String>> {
    let dir = volume.join("items");
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(JournalError::io(&dir, "list", e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(|e| JournalError::io(&dir, "list", e))?;
        if e.path().join("item.json").exists() {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// Space used per item and free on the volume's filesystem.
pub fn usage(volume: &Path) -> Result<VolumeUsage> {
    let st =
        rustix::fs::statvfs(volume).map_err(|e| JournalError::io(volume, "statvfs", e.into()))?;
    let mut u = VolumeUsage {
        total_bytes: st.f_blocks * st.f_frsize,
        free_bytes: st.f_bavail * st.f_frsize,
        items: Vec::new(),
    };
    for item in items(volume)? {
        let dir = item_dir(volume, &item);
        let mut s = ItemSpace {
            item,
            ..Default::default()
        };
        let rd = std::fs::read_dir(&dir).map_err(|e| JournalError::io(&dir, "list", e))?;
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.ends_with(".rjs") {
                s.segments += 1;
                s.journal_bytes += allocated(&e.path());
            } else if n.ends_with(".idx") {
                s.index_bytes += allocated(&e.path());
            }
        }
        u.items.push(s);
    }
    Ok(u)
}

/// A replication group's point: the same group marker reached by every
/// member item, with each member's point id.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct GroupPoint {
    pub marker: String,
    /// (item, point id), in the order the items were given.
    pub members: Vec<(String, u64)>,
    /// The latest of the members' point times.
    pub time_ns: u64,
}

/// Group points usable on every one of `items`, oldest first.
pub fn group_points(
    volume: &Path,
    items: &[&str],
    opts: crate::Options,
) -> Result<Vec<GroupPoint>> {
    let mut per_item = Vec::new();
    for item in items {
        let j = crate::Journal::open_read_only(volume, item, opts.clone())?;
        let pts: std::collections::HashMap<String, (u64, u64)> = j
            .points()
            .iter()
            .filter(|p| p.usable)
            .filter_map(|p| Some((p.group.clone()?, (p.id, p.time_ns))))
            .collect();
        per_item.push(pts);
    }
    let Some(first) = per_item.first() else {
        return Ok(Vec::new());
    };
    let mut out: Vec<GroupPoint> = first
        .keys()
        .filter_map(|m| {
            let mut members = Vec::new();
            let mut time_ns = 0;
            for (item, pts) in items.iter().zip(&per_item) {
                let (id, t) = pts.get(m)?;
                members.push((item.to_string(), *id));
                time_ns = time_ns.max(*t);
            }
            Some(GroupPoint {
                marker: m.clone(),
                members,
                time_ns,
            })
        })
        .collect();
    out.sort_by(|a, b| (a.time_ns, &a.marker).cmp(&(b.time_ns, &b.marker)));
    Ok(out)
}
