//! Appending to a file through one aligned buffer, around the page cache
//! (`O_DIRECT`) where the file system allows it.
//!
//! Bytes nobody reads soon (a restored file, a replica's pack) need not
//! pass through the page cache: the copy into cache pages evicts the
//! machine's working set and, on a host that lends guest memory lazily,
//! costs far more than the copy itself (perf put 38 % of a replica's
//! samples and 40 % of a restoring agent's in it). Written direct, whole
//! aligned blocks go from the buffer to the disk; at each flush the last
//! partial block is written padded, the file is cut back to its length,
//! and the partial block stays in the buffer to be written whole again
//! once it fills. A file system that refuses `O_DIRECT` at open (tmpfs on
//! older kernels, some network file systems) gets the same bytes written
//! through the cache, and one that takes the open but refuses a write has
//! the file switched to the cache where it stands.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

/// File offsets, lengths and the buffer's address of direct writes are
/// multiples of this, the largest logical block size in common use.
pub const ALIGN: usize = 4096;

pub struct Appender {
    file: File,
    buf: Vec<u8>,
    /// Where the aligned region starts in `buf`.
    start: usize,
    /// The region's length: bytes gathered before a write, so that small
    /// appends reach the kernel in large pieces.
    capacity: usize,
    /// Bytes in the region, which holds the file from `base` on.
    filled: usize,
    /// The file offset of the region's first byte: aligned when direct.
    base: u64,
    direct: bool,
}

impl Appender {
    /// Creates `path`, which must not exist, direct if `direct` and the
    /// file system allows it.
    pub fn create_new(path: &Path, direct: bool, capacity: usize) -> std::io::Result<Appender> {
        let open = |flags: OFlags| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(flags.bits() as i32)
                .open(path)
        };
        if direct {
            match open(OFlags::DIRECT) {
                Ok(file) => return Ok(Appender::new(file, true, capacity)),
                Err(e) if e.raw_os_error() == Some(Errno::INVAL.raw_os_error()) => {
                    // Refused after the file was made, or before: it is
                    // ours either way, since the name was free.
                    let file = OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .open(path)?;
                    return Ok(Appender::new(file, false, capacity));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Appender::new(open(OFlags::empty())?, false, capacity))
    }

    /// Creates or truncates the file `name` in the directory `dir`, never
    /// through a symlink, with mode 0600 if new; direct if `direct` and
    /// the file system allows it.
    pub fn create_at(
        dir: impl AsFd,
        name: &Path,
        direct: bool,
        capacity: usize,
    ) -> std::io::Result<Appender> {
        let open = |extra| rustix::fs::openat(&dir, name, extra, Mode::from_raw_mode(0o600));
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        if direct {
            match open(flags | OFlags::DIRECT) {
                Ok(fd) => return Ok(Appender::new(File::from(fd), true, capacity)),
                Err(Errno::INVAL) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Appender::new(File::from(open(flags)?), false, capacity))
    }

    /// `capacity` is rounded up to whole aligned blocks; a file written
    /// through the cache with none gets each append as its own write.
    fn new(file: File, direct: bool, capacity: usize) -> Appender {
        let capacity = if direct || capacity > 0 {
            capacity.next_multiple_of(ALIGN).max(ALIGN)
        } else {
            0
        };
        let buf = if capacity > 0 {
            vec![0u8; capacity + ALIGN]
        } else {
            Vec::new()
        };
        let start = buf.as_ptr().align_offset(ALIGN).min(ALIGN);
        Appender {
            file,
            buf,
            start,
            capacity,
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
        if self.capacity == 0 {
            self.file.write_all_at(data, self.base)?;
            self.base += data.len() as u64;
            return Ok(());
        }
        while !data.is_empty() {
            let n = data.len().min(self.capacity - self.filled);
            let at = self.start + self.filled;
            self.buf[at..at + n].copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
            if self.filled == self.capacity {
                self.write_region(self.capacity)?;
                self.base += self.capacity as u64;
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

    /// Flushes and hands back the file, exactly as long as what was
    /// appended (not yet fsynced).
    pub fn finish(mut self) -> std::io::Result<File> {
        self.flush()?;
        Ok(self.file)
    }

    /// Writes the first `n` bytes of the region at `base`.
    fn write_region(&mut self, n: usize) -> std::io::Result<()> {
        let region = &self.buf[self.start..self.start + n];
        match self.file.write_all_at(region, self.base) {
            Err(e) if self.direct && e.raw_os_error() == Some(Errno::INVAL.raw_os_error()) => {
                // The file system took the open but not this write: go on
                // through the cache, with exactly the appended bytes.
                self.direct = false;
                let flags = rustix::fs::fcntl_getfl(self.file.as_fd())?;
                rustix::fs::fcntl_setfl(self.file.as_fd(), flags - OFlags::DIRECT)?;
                let exact = n.min(self.filled);
                self.file
                    .write_all_at(&self.buf[self.start..self.start + exact], self.base)?;
                // Padding an earlier flush wrote past the end goes.
                self.file.set_len(self.base + exact as u64)
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPACITY: usize = 1024 * 1024;

    /// Appends `pieces` to a new file, flushing after the ones marked,
    /// and checks the file after every flush; whether it stayed direct.
    fn check(mut w: Appender, path: &Path, pieces: &[(usize, bool)], misalign: bool) -> bool {
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
                let got = std::fs::read(path).expect("read");
                assert!(got == want, "{} after piece {i}", path.display());
            }
        }
        let direct = w.is_direct();
        w.finish().expect("finish");
        let got = std::fs::read(path).expect("read");
        assert!(got == want, "{} at the end", path.display());
        direct
    }

    const CASES: [&[(usize, bool)]; 7] = [
        &[],
        &[(1, true)],
        &[(10, true), (5000, true), (3, false), (ALIGN, true)],
        &[(CAPACITY - 1, true), (1, true), (1, true)],
        &[
            (CAPACITY + 17, false),
            (2 * CAPACITY, true),
            (ALIGN * 3 + 5, true),
        ],
        &[(700_001, true), (3 * CAPACITY + 12, false), (1, true)],
        &[(ALIGN + 1, false), (3, false), (CAPACITY, false), (5000, false)],
    ];

    /// `check` on a new file `name` in `dir`.
    fn check_new(
        dir: &Path,
        name: &str,
        direct: bool,
        capacity: usize,
        pieces: &[(usize, bool)],
        misalign: bool,
    ) -> bool {
        let path = dir.join(name);
        let w = Appender::create_new(&path, direct, capacity).expect("create");
        check(w, &path, pieces, misalign)
    }

    #[test]
    fn what_is_appended_reads_back_after_every_flush_direct_or_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (k, pieces) in CASES.iter().enumerate() {
            let direct = check_new(dir.path(), &format!("d{k}"), true, CAPACITY, pieces, false);
            let probe =
                Appender::create_new(&dir.path().join(format!("p{k}")), true, CAPACITY).expect("probe");
            assert_eq!(
                direct,
                probe.is_direct(),
                "direct where the file system allows it"
            );
            for capacity in [CAPACITY, 0] {
                assert!(!check_new(
                    dir.path(),
                    &format!("b{k}-{capacity}"),
                    false,
                    capacity,
                    pieces,
                    false
                ));
            }
        }
    }

    #[test]
    fn a_write_refused_direct_goes_on_through_the_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        if !Appender::create_new(&dir.path().join("probe"), true, CAPACITY)
            .expect("probe")
            .is_direct()
        {
            return;
        }
        for (k, pieces) in CASES.iter().enumerate().skip(1) {
            // A region off the alignment is what the kernel refuses with
            // EINVAL, as a file system with larger blocks would.
            assert!(!check_new(
                dir.path(),
                &format!("m{k}"),
                true,
                CAPACITY,
                pieces,
                true
            ));
        }
    }

    #[test]
    fn create_at_truncates_an_existing_file_and_refuses_a_symlink() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, vec![9u8; 3 * CAPACITY]).expect("write");
        for direct in [true, false] {
            let w = Appender::create_at(rustix::fs::CWD, &path, direct, 4 * CAPACITY).expect("create");
            check(w, &path, &[(10, false), (CAPACITY, false)], false);
        }
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).expect("symlink");
        for direct in [true, false] {
            assert!(Appender::create_at(rustix::fs::CWD, &link, direct, CAPACITY).is_err());
        }
    }
}
