//! Driver for `bench/journal.sh` (not a test): timed appends, materialise
//! and fold on a real retention volume. Prints `key=value` lines.
//!
//! ```text
//! rebound-journal-bench append VOLUME MIB WRITE_KIB
//! rebound-journal-bench prepare VOLUME DISK_GIB BASE_MIB JOURNAL_MIB
//! rebound-journal-bench materialise VOLUME OUT_FILE
//! rebound-journal-bench fold VOLUME
//! ```

use rebound_journal::{Changeset, DiskSpec, Journal, Options, PointKind, Target};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

const POINT_EVERY: u64 = 4 << 20;

/// Append `mib` MiB in writes of `write_kib` KiB at random places of a
/// `disk` byte disk, closing a crash-consistent point every 4 MiB.
fn append(
    j: &mut Journal,
    disk: u64,
    mib: u64,
    write_kib: u64,
    rng: &mut Rng,
    t0: u64,
) -> Res<(u64, u64)> {
    let wlen = write_kib * 1024;
    let per_cs = POINT_EVERY / wlen;
    let mut buf = vec![0u8; wlen as usize];
    let (mut bytes, mut points) = (0u64, 0u64);
    while bytes < mib << 20 {
        let mut cs = Changeset::new().at(t0 + points);
        for _ in 0..per_cs {
            rng.fill(&mut buf);
            let off = rng.next() % (disk / wlen) * wlen;
            cs = cs.write(0, off, buf.clone());
        }
        bytes += per_cs * wlen;
        j.append(&cs.point(PointKind::CrashConsistent))?;
        points += 1;
    }
    Ok((bytes, points))
}

fn opts() -> Options {
    Options::default()
}

fn main() -> Res<()> {
    let a: Vec<String> = std::env::args().collect();
    let arg = |i: usize| -> Res<String> {
        a.get(i)
            .cloned()
            .ok_or_else(|| "missing argument (see the source)".into())
    };
    let vol = PathBuf::from(arg(2)?);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    match arg(1)?.as_str() {
        "append" => {
            let (mib, kib): (u64, u64) = (arg(3)?.parse()?, arg(4)?.parse()?);
            let disk = 64u64 << 30;
            let mut j = Journal::create(
                &vol,
                "append",
                &[DiskSpec {
                    name: "d0".into(),
                    size: disk,
                    base: None,
                }],
                opts(),
            )?;
            let t = Instant::now();
            let (bytes, points) = append(&mut j, disk, mib, kib, &mut rng, 1)?;
            let secs = t.elapsed().as_secs_f64();
            println!(
                "bytes={bytes} points={points} seconds={secs:.3} mib_s={:.1}",
                bytes as f64 / secs / 1048576.0
            );
        }
        "prepare" => {
            let (gib, base_mib, jmib): (u64, u64, u64) =
                (arg(3)?.parse()?, arg(4)?.parse()?, arg(5)?.parse()?);
            let disk = gib << 30;
            let mut j = Journal::create(
                &vol,
                "mat",
                &[DiskSpec {
                    name: "d0".into(),
                    size: disk,
                    base: None,
                }],
                opts(),
            )?;
            // Base data: 1 MiB extents spread over the disk.
            let base = std::fs::OpenOptions::new()
                .write(true)
                .open(&j.disks()[0].base)?;
            let mut buf = vec![0u8; 1 << 20];
            let stride = disk / base_mib.max(1);
            for i in 0..base_mib {
                rng.fill(&mut buf);
                base.write_all_at(&buf, (i * stride) & !((1 << 20) - 1))?;
            }
            base.sync_all()?;
            let t = Instant::now();
            let (bytes, points) = append(&mut j, disk, jmib, 64, &mut rng, 1)?;
            j.seal()?;
            println!(
                "journal_bytes={bytes} points={points} append_seconds={:.3}",
                t.elapsed().as_secs_f64()
            );
        }
        "materialise" => {
            let out = PathBuf::from(arg(3)?);
            let j = Journal::open_read_only(&vol, "mat", opts())?;
            let p = j.latest().ok_or("no point")?.id;
            let t = Instant::now();
            let st = j.materialise(p, &Target::NewFiles(vec![out.clone()]))?;
            println!(
                "seconds={:.3} bytes_written={}",
                t.elapsed().as_secs_f64(),
                st.bytes_written
            );
        }
        "fold" => {
            let mut j = Journal::open(&vol, "mat", opts())?;
            let t = Instant::now();
            let r = j.fold(u64::MAX / 2, 0)?;
            let secs = t.elapsed().as_secs_f64();
            let gib = r.bytes as f64 / (1u64 << 30) as f64;
            println!(
                "changed_bytes={} segments={} seconds={secs:.3} s_per_changed_gib={:.2}",
                r.bytes,
                r.segments,
                secs / gib.max(1e-9)
            );
        }
        other => return Err(format!("unknown mode {other}").into()),
    }
    Ok(())
}
