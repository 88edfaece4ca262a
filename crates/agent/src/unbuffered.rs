//! Restored files written around the page cache (`O_DIRECT`).
//!
//! A restore writes gigabytes that nobody reads soon. Through the page
//! cache every byte is first copied into a cache page, which evicts the
//! machine's working set and, on a host that lends guest memory lazily,
//! costs far more than the copy (a 320 MiB write took 0.5 to 0.9 s of
//! system time buffered against 0.05 s direct on the bench machine). So a
//! large file is written direct: whole aligned blocks from an aligned
//! buffer, the last block padded and the file cut back to its length.
//! A file system that refuses `O_DIRECT` (tmpfs on older kernels, some
//! network file systems) gets the same bytes written through the cache.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::path::Path;

use rustix::fs::{Mode, OFlags};

/// Offsets, lengths and the buffer's address are multiples of this: the
/// largest logical block size in common use.
const ALIGN: usize = 4096;
/// Bytes handed to the kernel per write.
const BLOCK: usize = 4 * 1024 * 1024;

/// Files at least this large are written direct; below it the padding,
/// the extra truncate and a wait on the device per file cost more than
/// the cache copy saves.
pub const DIRECT_MIN: u64 = 1024 * 1024;

/// Opens the file `name` in the directory `dir` for a restore's writes:
/// new or truncated, never through a symlink, direct when `size` is at
/// least [`DIRECT_MIN`] and the file system allows it.
pub fn create_at(dir: impl AsFd, name: &Path, size: u64) -> std::io::Result<UnbufferedWriter> {
    let open = |extra| rustix::fs::openat(&dir, name, extra, Mode::from_raw_mode(0o600));
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    if size >= DIRECT_MIN {
        match open(flags | OFlags::DIRECT) {
            Ok(fd) => return Ok(UnbufferedWriter::new(File::from(fd), true, size)),
            Err(rustix::io::Errno::INVAL) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(UnbufferedWriter::new(File::from(open(flags)?), false, size))
}

/// Appends to a file, through an aligned buffer when the file was opened
/// with `O_DIRECT`, straight through the cache otherwise.
pub struct UnbufferedWriter {
    file: File,
    buf: Vec<u8>,
    /// Where the aligned region starts in `buf`.
    start: usize,
    /// The aligned region's length: whole blocks.
    block: usize,
    /// Bytes waiting in the aligned region.
    filled: usize,
    len: u64,
    direct: bool,
}

impl UnbufferedWriter {
    /// `file` must be open for writing and empty; `direct` says whether
    /// it was opened with `O_DIRECT`, `size` what will be written.
    fn new(file: File, direct: bool, size: u64) -> UnbufferedWriter {
        let block = if direct {
            (size.min(BLOCK as u64) as usize)
                .next_multiple_of(ALIGN)
                .max(ALIGN)
        } else {
            0
        };
        let buf = if direct {
            vec![0u8; block + ALIGN]
        } else {
            Vec::new()
        };
        let start = buf.as_ptr().align_offset(ALIGN).min(ALIGN);
        UnbufferedWriter {
            file,
            buf,
            start,
            block,
            filled: 0,
            len: 0,
            direct,
        }
    }

    pub fn write(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            if !self.direct {
                self.file.write_all(data)?;
                self.len += data.len() as u64;
                return Ok(());
            }
            let n = data.len().min(self.block - self.filled);
            let at = self.start + self.filled;
            self.buf[at..at + n].copy_from_slice(&data[..n]);
            self.filled += n;
            self.len += n as u64;
            data = &data[n..];
            if self.filled == self.block {
                self.flush_region(self.block)?;
            }
        }
        Ok(())
    }

    /// Writes what is buffered, the last block padded, and cuts the file
    /// back to the bytes written.
    pub fn finish(mut self) -> std::io::Result<File> {
        if self.filled > 0 {
            let padded = if self.direct {
                self.filled.next_multiple_of(ALIGN)
            } else {
                self.filled
            };
            let (from, to) = (self.start + self.filled, self.start + padded);
            self.buf[from..to].fill(0);
            self.flush_region(padded)?;
        }
        if self.direct {
            self.file.set_len(self.len)?;
        }
        Ok(self.file)
    }

    fn flush_region(&mut self, n: usize) -> std::io::Result<()> {
        let region = &self.buf[self.start..self.start + n];
        match self.file.write_all(region) {
            Err(e) if self.direct && e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                // The file system took the open but not the write: go on
                // through the cache. The failed write wrote nothing, and
                // every earlier one was whole blocks, so the offset is
                // where this region belongs.
                self.direct = false;
                self.file.seek(SeekFrom::Start(self.len - self.filled as u64))?;
                let flags = rustix::fs::fcntl_getfl(self.file.as_fd())?;
                rustix::fs::fcntl_setfl(self.file.as_fd(), flags - OFlags::DIRECT)?;
                let region = &self.buf[self.start..self.start + self.filled];
                self.file.write_all(region)?;
            }
            other => other?,
        }
        self.filled = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether this file system takes `O_DIRECT` at all.
    fn direct_supported(dir: &Path) -> bool {
        create(&dir.join("probe"), DIRECT_MIN).unwrap().direct
    }

    fn create(path: &Path, size: u64) -> std::io::Result<UnbufferedWriter> {
        create_at(rustix::fs::CWD, path, size)
    }

    fn write_through(path: &Path, sizes: &[usize], declared: u64) {
        let mut w = create(path, declared).unwrap();
        if declared >= DIRECT_MIN && direct_supported(path.parent().unwrap()) {
            assert!(
                w.direct,
                "a large file is written direct where the file system allows it"
            );
        }
        let want = fill(&mut w, sizes);
        w.finish().unwrap();
        assert_eq!(
            std::fs::read(path).unwrap(),
            want,
            "{sizes:?} declared {declared}"
        );
    }

    /// Writes pieces of `sizes` bytes; all that was written.
    fn fill(w: &mut UnbufferedWriter, sizes: &[usize]) -> Vec<u8> {
        let mut want = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let piece: Vec<u8> = (0..n).map(|j| (i * 31 + j * 7) as u8).collect();
            w.write(&piece).unwrap();
            want.extend_from_slice(&piece);
        }
        want
    }

    #[test]
    fn every_length_reads_back_exactly_direct_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [&[usize]; 7] = [
            &[],
            &[1],
            &[ALIGN],
            &[ALIGN + 1, 3],
            &[BLOCK - 1, 1, 1],
            &[BLOCK, BLOCK, 5000],
            &[700_001, 3 * BLOCK + 17, 12],
        ];
        for (k, sizes) in cases.iter().enumerate() {
            let total = sizes.iter().sum::<usize>() as u64;
            // Declared sizes below and above the direct threshold, and
            // one smaller than what is written.
            for declared in [0, total, DIRECT_MIN.max(total), total / 2 + DIRECT_MIN] {
                write_through(&dir.path().join(format!("{k}-{declared}")), sizes, declared);
            }
        }
    }

    #[test]
    fn an_existing_file_is_truncated_and_a_symlink_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![9u8; 3 * BLOCK]).unwrap();
        write_through(&path, &[10, DIRECT_MIN as usize], DIRECT_MIN + 10);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(create(&link, DIRECT_MIN).is_err());
        assert!(create(&link, 1).is_err());
    }

    #[test]
    fn a_write_the_file_system_refuses_direct_goes_through_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        if !direct_supported(dir.path()) {
            return;
        }
        let path = dir.path().join("f");
        let mut w = create(&path, 3 * BLOCK as u64).unwrap();
        // A region off the alignment is what the kernel refuses with
        // EINVAL, as a file system with larger blocks would.
        w.start += 1;
        let want = fill(&mut w, &[BLOCK + 3, 2 * BLOCK]);
        assert!(!w.direct, "the refused write switched the file to the cache");
        w.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }
}
