//! Generating test trees and comparing them bit for bit, with modes,
//! mtimes and symlinks.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use rand::{Rng, RngCore, SeedableRng};

pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; len];
    rng.fill_bytes(&mut buf);
    buf
}

/// Text that compresses well but does not repeat exactly.
pub fn text(seed: u64, len: usize) -> Vec<u8> {
    let words = [
        "backup", "mirror", "failover", "chunk", "snapshot", "epoch", "lease", "site", "restore",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        out.extend_from_slice(words[rng.gen_range(0..words.len())].as_bytes());
        out.push(if rng.gen_ratio(1, 12) { b'\n' } else { b' ' });
    }
    out.truncate(len);
    out
}

fn set_mtime(path: &Path, secs: u64) {
    let f = fs::File::open(path).unwrap();
    f.set_modified(UNIX_EPOCH + Duration::new(secs, 123_456_789))
        .unwrap();
}

/// The tree the foundation issue names: a large random file, compressible
/// text, hundreds of small files, an empty file, an executable, nested
/// directories, a symlink, unusual modes and old mtimes.
pub fn mixed_tree(root: &Path, big_len: usize) {
    fs::create_dir_all(root.join("nested/deeper/deepest")).unwrap();
    fs::write(root.join("big.bin"), random_bytes(1, big_len)).unwrap();
    fs::write(root.join("notes.txt"), text(2, 3 * 1024 * 1024)).unwrap();
    for i in 0..300 {
        let dir = root.join(format!("small/d{}", i % 7));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join(format!("f{i}.dat")),
            random_bytes(100 + i, (i as usize * 37) % 5000 + 1),
        )
        .unwrap();
    }
    fs::write(root.join("empty"), b"").unwrap();
    let exe = root.join("nested/tool.sh");
    fs::write(&exe, b"#!/bin/sh\necho duplex\n").unwrap();
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    let secret = root.join("nested/deeper/secret");
    fs::write(&secret, b"private").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(root.join("nested/deeper/deepest/leaf"), text(3, 10_000)).unwrap();
    std::os::unix::fs::symlink("../notes.txt", root.join("nested/link")).unwrap();
    for (i, p) in [
        "big.bin",
        "notes.txt",
        "empty",
        "nested/tool.sh",
        "nested/deeper/secret",
    ]
    .iter()
    .enumerate()
    {
        set_mtime(&root.join(p), 1_500_000_000 + i as u64 * 1000);
    }
    fs::set_permissions(root.join("nested/deeper"), fs::Permissions::from_mode(0o750)).unwrap();
    set_mtime(&root.join("nested/deeper/deepest"), 1_400_000_000);
    set_mtime(&root.join("nested"), 1_300_000_000);
}

#[derive(Debug, PartialEq, Eq)]
enum Node {
    File {
        mode: u32,
        mtime_ns: i64,
        hash: String,
        len: u64,
    },
    Dir {
        mode: u32,
        mtime_ns: i64,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// A FIFO, socket or device: its type bits, mode, mtime and rdev.
    Special {
        format: u32,
        mode: u32,
        mtime_ns: i64,
        rdev: u64,
    },
}

/// Every entry below `root` by its exact name (bytes, as Unix names are).
fn describe(root: &Path) -> BTreeMap<Vec<u8>, Node> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, at: &Path, out: &mut BTreeMap<Vec<u8>, Node>) {
    let meta = fs::symlink_metadata(at).unwrap();
    let rel = at.strip_prefix(root).unwrap().as_os_str().as_bytes().to_vec();
    let mtime_ns = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
    let mode = meta.permissions().mode() & 0o7777;
    if meta.file_type().is_symlink() {
        let target = fs::read_link(at).unwrap().into_os_string().into_vec();
        out.insert(rel, Node::Symlink { target });
    } else if meta.is_dir() {
        out.insert(rel, Node::Dir { mode, mtime_ns });
        for entry in fs::read_dir(at).unwrap() {
            walk(root, &entry.unwrap().path(), out);
        }
    } else if !meta.is_file() {
        let node = Node::Special {
            format: meta.mode() & libc::S_IFMT,
            mode,
            mtime_ns,
            rdev: meta.rdev(),
        };
        out.insert(rel, node);
    } else {
        let data = fs::read(at).unwrap();
        let hash = format!("{:x?}", &blake(&data));
        out.insert(
            rel,
            Node::File {
                mode,
                mtime_ns,
                hash,
                len: data.len() as u64,
            },
        );
    }
}

fn blake(data: &[u8]) -> [u8; 32] {
    *duplex_types::ChunkId::of(data).as_bytes()
}

/// Asserts two trees are equal: every file bit for bit, every mode,
/// mtime and symlink target (the roots' own mtimes excepted).
pub fn assert_same_tree(expected: &Path, actual: &Path) {
    let mut a = describe(expected);
    let mut b = describe(actual);
    a.remove(b"".as_slice());
    b.remove(b"".as_slice());
    let shown = |keys: Vec<&Vec<u8>>| -> Vec<String> {
        keys.into_iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect()
    };
    let a_keys: Vec<_> = a.keys().collect();
    let b_keys: Vec<_> = b.keys().collect();
    assert!(
        a_keys == b_keys,
        "restored tree has different entries: {:?} vs {:?}",
        shown(a_keys),
        shown(b_keys)
    );
    for (path, node) in &a {
        assert_eq!(
            Some(node),
            b.get(path),
            "{} differs",
            String::from_utf8_lossy(path)
        );
    }
}
