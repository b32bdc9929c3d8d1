//! Durable filesystem operations. A rename or a new file is only durable once
//! the file's data and its parent directory have both been fsynced; these
//! helpers do the whole dance so that callers cannot forget a step.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// fsync a directory so that entries created, renamed or removed in it survive a crash.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Rename `from` to `to` and make the rename durable (fsync of the file and of
/// both parent directories).
pub fn durable_rename(from: &Path, to: &Path) -> io::Result<()> {
    File::open(from)?.sync_all()?;
    fs::rename(from, to)?;
    fsync_dir(parent_of(to))?;
    let from_parent = parent_of(from);
    if from_parent != parent_of(to) {
        fsync_dir(from_parent)?;
    }
    Ok(())
}

/// The temporary name used while `path` is being replaced.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replace the content of `path` atomically and durably: after a crash the file
/// holds either the old content or the new one, never a mix.
pub fn write_file_durable(path: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = temp_path(path);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fsync_dir(parent_of(path))
}

/// Create a directory and all its parents, fsyncing each directory whose
/// entries changed.
pub fn create_dir_all_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = parent_of(dir);
    if dir.parent().is_some() && !parent.exists() {
        create_dir_all_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(e),
    }
    fsync_dir(parent)
}

/// Remove a file durably; a missing file is not an error.
pub fn remove_file_durable(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => fsync_dir(parent_of(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Remove a directory tree durably; a missing directory is not an error.
pub fn remove_dir_all_durable(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => fsync_dir(parent_of(dir)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_and_rename() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/state.json");
        create_dir_all_durable(p.parent().unwrap()).unwrap();
        write_file_durable(&p, b"one").unwrap();
        write_file_durable(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert!(!temp_path(&p).exists());
        let q = dir.path().join("moved");
        durable_rename(&p, &q).unwrap();
        assert_eq!(fs::read(&q).unwrap(), b"two");
        remove_file_durable(&q).unwrap();
        remove_file_durable(&q).unwrap();
        remove_dir_all_durable(&dir.path().join("a")).unwrap();
    }
}
