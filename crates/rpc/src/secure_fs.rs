//! Files that hold secrets or data: directories only their owner can enter,
//! keys and databases only their owner can read, written durably.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and its parents) as 0700, or tightens an existing one to
/// 0700, and fsyncs its parent so the entry survives a crash.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Writes a secret readable by its owner only (0600).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically(path, bytes, 0o600)
}

/// Writes a file anyone may read (a certificate).
pub fn write_public(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically(path, bytes, 0o644)
}

/// Writes through a temporary file, fsyncs it and the directory: a crash
/// leaves the old file or the new one, never a torn one.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    // An existing tmp file keeps its old mode through `open`.
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("cannot prepare data dir {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(
        "data dir {path} can be written by other users (mode {mode:o}); refusing to start on it. \
         Fix it with: chmod 700 {path}"
    )]
    Writable { path: String, mode: u32 },
}

/// Prepares a server's data dir: created 0700 if missing; an existing one
/// that other users can write is refused (they could plant a key or a
/// database), and one they can only read is tightened to 0700.
pub fn prepare_data_dir(dir: &Path) -> Result<(), DataDirError> {
    let io = |source| DataDirError::Io {
        path: dir.display().to_string(),
        source,
    };
    match std::fs::metadata(dir) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o022 != 0 {
                return Err(DataDirError::Writable {
                    path: dir.display().to_string(),
                    mode,
                });
            }
            if mode & 0o077 != 0 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_private_dir(dir).map_err(io),
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_modes() {
        let root = tempfile::tempdir().expect("tempdir");
        let fresh = root.path().join("fresh");
        prepare_data_dir(&fresh).expect("created");
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&fresh), 0o700);

        let open = root.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = prepare_data_dir(&open).expect_err("world-writable refused");
        assert!(err.to_string().contains("chmod 700"), "{err}");

        let readable = root.path().join("readable");
        std::fs::create_dir(&readable).expect("mkdir");
        std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        prepare_data_dir(&readable).expect("tightened");
        assert_eq!(mode(&readable), 0o700);

        let secret = fresh.join("key");
        write_private(&secret, b"s").expect("write");
        assert_eq!(mode(&secret), 0o600);
    }
}
