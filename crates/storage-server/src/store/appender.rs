//! Appending to a pack through one buffer, either through the page cache
//! or around it (`O_DIRECT`).
//!
//! A cold pack (a mirrored batch, a repair, a compaction) is read by
//! nothing soon, so its bytes need not pass through the page cache at
//! all. Dropping them after each fsync (`posix_fadvise`) still paid the
//! copy into cache pages: perf put 38 % of storage-b's samples in it
//! during a mirrored backup. Written direct, whole aligned blocks go from
//! the buffer to the disk; at each sync the last partial block is written
//! padded, the file is cut back to its length, and the partial block
//! stays in the buffer to be written whole again once it fills.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};

/// File offsets, lengths and the buffer's address of direct writes are
/// multiples of this, the largest logical block size in common use.
const ALIGN: usize = 4096;
/// Bytes gathered before a write: small chunks go to the kernel in large
/// pieces, not one write each.
const BUFFER: usize = 1024 * 1024;

pub struct Appender {
    file: File,
    buf: Vec<u8>,
    /// Where the aligned region starts in `buf`.
    start: usize,
    /// Bytes in the region, which holds the file from `base` on.
    filled: usize,
    /// The file offset of the region's first byte: aligned when direct.
    base: u64,
    direct: bool,
}

impl Appender {
    /// Creates `path` (which must not exist), direct if `direct` and the
    /// file system allows it.
    pub fn create_new(path: &Path, direct: bool) -> std::io::Result<Appender> {
        let open = |flags: i32| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(flags)
                .open(path)
        };
        if direct {
            match open(libc::O_DIRECT) {
                Ok(file) => return Ok(Appender::new(file, true)),
                Err(e) if e.raw_os_error() == Some(Errno::EINVAL as i32) => {
                    // Refused after the file was made, or before: it is
                    // ours either way, since the name was free.
                    let file = OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .open(path)?;
                    return Ok(Appender::new(file, false));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Appender::new(open(0)?, false))
    }

    fn new(file: File, direct: bool) -> Appender {
        let buf = vec![0u8; BUFFER + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN).min(ALIGN);
        Appender {
            file,
            buf,
            start,
            filled: 0,
            base: 0,
            direct,
        }
    }

    /// Whether the file is written around the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn write_all(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let n = data.len().min(BUFFER - self.filled);
            let at = self.start + self.filled;
            self.buf[at..at + n].copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
            if self.filled == BUFFER {
                self.write_region(BUFFER)?;
                self.base += BUFFER as u64;
                self.filled = 0;
            }
        }
        Ok(())
    }

    /// Writes everything appended, with the file exactly as long as what
    /// was appended, ready for an fsync.
    pub fn flush(&mut self) -> std::io::Result<()> {
        if self.filled == 0 {
            return Ok(());
        }
        if !self.direct {
            self.write_region(self.filled)?;
            self.base += self.filled as u64;
            self.filled = 0;
            return Ok(());
        }
        let padded = self.filled.next_multiple_of(ALIGN);
        let (from, to) = (self.start + self.filled, self.start + padded);
        self.buf[from..to].fill(0);
        self.write_region(padded)?;
        let len = self.base + self.filled as u64;
        if self.direct {
            self.file.set_len(len)?;
            // The whole blocks are done with; the partial last one stays,
            // to be written again whole.
            let whole = self.filled / ALIGN * ALIGN;
            self.buf
                .copy_within(self.start + whole..self.start + self.filled, self.start);
            self.base += whole as u64;
            self.filled -= whole;
        } else {
            // A write refused direct switched the file to the cache, and
            // only the appended bytes were written.
            self.base = len;
            self.filled = 0;
        }
        Ok(())
    }

    /// Writes the first `n` bytes of the region at `base`.
    fn write_region(&mut self, n: usize) -> std::io::Result<()> {
        let region = &self.buf[self.start..self.start + n];
        match self.file.write_all_at(region, self.base) {
            Err(e) if self.direct && e.raw_os_error() == Some(Errno::EINVAL as i32) => {
                // The file system took the open but not this write: go on
                // through the cache, with exactly the appended bytes.
                self.direct = false;
                let flags = OFlag::from_bits_truncate(fcntl(self.file.as_fd(), FcntlArg::F_GETFL)?);
                fcntl(self.file.as_fd(), FcntlArg::F_SETFL(flags - OFlag::O_DIRECT))?;
                let exact = n.min(self.filled);
                self.file
                    .write_all_at(&self.buf[self.start..self.start + exact], self.base)?;
                // Padding an earlier sync wrote past the end goes.
                self.file.set_len(self.base + exact as u64)
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends `pieces`, flushing after the ones marked, and checks the
    /// file after every flush.
    fn check(dir: &Path, name: &str, direct: bool, pieces: &[(usize, bool)], misalign: bool) -> bool {
        let path = dir.join(name);
        let mut w = Appender::create_new(&path, direct).expect("create");
        if misalign && w.direct {
            w.start += 1;
        }
        let mut want = Vec::new();
        for (i, &(n, flush)) in pieces.iter().enumerate() {
            let piece: Vec<u8> = (0..n).map(|j| (i * 29 + j * 3) as u8).collect();
            w.write_all(&piece).expect("write");
            want.extend_from_slice(&piece);
            if flush {
                w.flush().expect("flush");
                assert_eq!(
                    std::fs::read(&path).expect("read"),
                    want,
                    "{name} after piece {i}"
                );
            }
        }
        w.flush().expect("flush");
        assert_eq!(std::fs::read(&path).expect("read"), want, "{name} at the end");
        w.is_direct()
    }

    const CASES: [&[(usize, bool)]; 6] = [
        &[],
        &[(1, true)],
        &[(10, true), (5000, true), (3, false), (ALIGN, true)],
        &[(BUFFER - 1, true), (1, true), (1, true)],
        &[(BUFFER + 17, false), (2 * BUFFER, true), (ALIGN * 3 + 5, true)],
        &[(700_001, true), (3 * BUFFER + 12, false), (1, true)],
    ];

    #[test]
    fn what_is_appended_reads_back_after_every_flush_direct_or_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (k, pieces) in CASES.iter().enumerate() {
            let direct = check(dir.path(), &format!("d{k}"), true, pieces, false);
            let probe = Appender::create_new(&dir.path().join(format!("p{k}")), true).expect("probe");
            assert_eq!(
                direct,
                probe.is_direct(),
                "direct where the file system allows it"
            );
            assert!(!check(dir.path(), &format!("b{k}"), false, pieces, false));
        }
    }

    #[test]
    fn a_write_refused_direct_goes_on_through_the_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        if !Appender::create_new(&dir.path().join("probe"), true)
            .expect("probe")
            .is_direct()
        {
            return;
        }
        for (k, pieces) in CASES.iter().enumerate().skip(1) {
            // A region off the alignment is what the kernel refuses with
            // EINVAL, as a file system with larger blocks would.
            assert!(!check(dir.path(), &format!("m{k}"), true, pieces, true));
        }
    }
}
