//! Helpers for the bench binaries: generated trees, timing, and writing
//! a results section into docs/BENCHMARKS.md.

use std::path::{Path, PathBuf};

use crate::tree::{random_bytes, text};

/// A tree of `total_mib` MiB: 60 % incompressible data in large files,
/// 30 % compressible text, 10 % small files, like a real home directory.
pub fn generate_tree(root: &Path, total_mib: usize) {
    const MIB: usize = 1024 * 1024;
    std::fs::create_dir_all(root.join("media")).unwrap();
    std::fs::create_dir_all(root.join("docs")).unwrap();
    let random_mib = total_mib * 6 / 10;
    for i in 0..random_mib.div_ceil(32) {
        let len = 32.min(random_mib - i * 32) * MIB;
        std::fs::write(
            root.join(format!("media/blob{i:03}.bin")),
            random_bytes(1000 + i as u64, len),
        )
        .unwrap();
    }
    let text_mib = total_mib * 3 / 10;
    for i in 0..text_mib.div_ceil(8) {
        let len = 8.min(text_mib - i * 8) * MIB;
        std::fs::write(
            root.join(format!("docs/log{i:03}.txt")),
            text(2000 + i as u64, len),
        )
        .unwrap();
    }
    let small_bytes = total_mib * MIB / 10;
    let mut written = 0;
    let mut i = 0u64;
    while written < small_bytes {
        let dir = root.join(format!("src/m{}", i % 50));
        std::fs::create_dir_all(&dir).unwrap();
        let len = (i as usize * 7919) % 64_000 + 100;
        let data = if i.is_multiple_of(2) {
            text(i, len)
        } else {
            random_bytes(i, len)
        };
        std::fs::write(dir.join(format!("f{i}")), data).unwrap();
        written += len;
        i += 1;
    }
}

/// Replaces the section between `<!-- NAME:start -->` and `<!-- NAME:end -->`
/// in docs/BENCHMARKS.md (appending it if absent).
pub fn write_section(name: &str, body: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/BENCHMARKS.md");
    let start = format!("<!-- {name}:start -->");
    let end = format!("<!-- {name}:end -->");
    let existing = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".to_owned());
    let section = format!("{start}\n{body}\n{end}");
    let updated = match (existing.find(&start), existing.find(&end)) {
        (Some(s), Some(e)) if e > s => format!("{}{section}{}", &existing[..s], &existing[e + end.len()..]),
        _ => format!("{}\n{section}\n", existing.trim_end()),
    };
    std::fs::write(&path, updated).unwrap();
    path
}

pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    format!("{cores} cores, {cpu}")
}
