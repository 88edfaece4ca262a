//! The backup data path end to end: agent → account server → storage
//! server and back, bit for bit, with deduplication.

#![allow(clippy::unwrap_used)]

use duplex_tests::Cluster;
use duplex_tests::tree::{assert_same_tree, mixed_tree, random_bytes};

const MIB: usize = 1024 * 1024;

#[test]
fn mixed_tree_restores_bit_for_bit_with_modes_and_mtimes() {
    let cluster = Cluster::start();
    let token = cluster.create_account("alice", None);
    let src = cluster.path("data");
    mixed_tree(&src, 24 * MIB);

    let report = cluster.backup(&token, &src);
    assert_eq!(report["files"], 306, "{report}");
    let snapshot = report["snapshot"].as_str().unwrap().to_owned();

    let listed = cluster.duplex_json(&token, &["snapshots"]);
    let snaps = listed["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0]["id"], snapshot.as_str());
    assert_eq!(snaps[0]["files"], report["files"]);
    assert_eq!(snaps[0]["bytes"], report["bytes"]);

    let target = cluster.restore(&token, &snapshot, "restored");
    assert_same_tree(&src, &target.join("data"));

    let verify = cluster.duplex_json(&token, &["verify", &snapshot]);
    assert_eq!(verify["ok"], true, "{verify}");
}

#[test]
fn unchanged_backup_uploads_almost_nothing_and_a_small_change_few_chunks() {
    let cluster = Cluster::start();
    let token = cluster.create_account("bob", None);
    let src = cluster.path("data");
    std::fs::create_dir_all(&src).unwrap();
    let mut big = random_bytes(7, 24 * MIB);
    std::fs::write(src.join("big"), &big).unwrap();
    std::fs::write(src.join("other"), random_bytes(8, 4 * MIB)).unwrap();

    let first = cluster.backup(&token, &src);
    let bytes = first["bytes"].as_u64().unwrap();
    assert!(first["uploaded_bytes"].as_u64().unwrap() >= bytes, "{first}");

    let second = cluster.backup(&token, &src);
    let uploaded = second["uploaded_bytes"].as_u64().unwrap();
    assert!(
        uploaded * 100 < bytes,
        "unchanged backup uploaded {uploaded} of {bytes} bytes"
    );

    // Overwrite 1 MiB in the middle of the 24 MiB file.
    let mid = 12 * MIB;
    big[mid..mid + MIB].copy_from_slice(&random_bytes(9, MIB));
    std::fs::write(src.join("big"), &big).unwrap();
    let third = cluster.backup(&token, &src);
    let uploaded = third["uploaded_bytes"].as_u64().unwrap();
    assert!(uploaded >= MIB as u64, "the changed MiB must be sent: {third}");
    assert!(
        uploaded <= 6 * MIB as u64,
        "a 1 MiB change sent {uploaded} bytes: {third}"
    );

    let target = cluster.path("restored");
    let snapshot = third["snapshot"].as_str().unwrap();
    let out = cluster.duplex(
        &token,
        &["restore", snapshot, "--target", target.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(target.join("data/big")).unwrap(), big);
}

/// Every path under `root`, relative, sorted.
fn listing(root: &std::path::Path) -> Vec<String> {
    fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            out.push(path.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            if path.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

#[test]
fn excluded_paths_cache_directories_and_other_file_systems_are_left_out() {
    let cluster = Cluster::start();
    let token = cluster.create_account("selective", None);
    let src = cluster.path("home");
    for dir in ["docs", "build", "docs/build", "cache", "fake-cache", "mnt"] {
        std::fs::create_dir_all(src.join(dir)).unwrap();
    }
    for file in [
        "docs/a.txt",
        "docs/b.tmp",
        "docs/keep.tmp",
        "docs/build/out.o",
        "build/out.o",
        "cache/blob",
        "fake-cache/data",
        "notes.txt",
    ] {
        std::fs::write(src.join(file), random_bytes(file.len() as u64, 1000)).unwrap();
    }
    let signature = b"Signature: 8a477f597d28d172789f06886806bc55\n# a cache\n";
    std::fs::write(src.join("cache/CACHEDIR.TAG"), signature).unwrap();
    std::fs::write(src.join("fake-cache/CACHEDIR.TAG"), b"Signature: wrong\n").unwrap();
    // Patterns from a file: comments, a directory-only rule anchored at
    // the tree, and a rule taking one match back.
    let patterns = cluster.path("excludes");
    let anchored = format!("{}/build/", src.display());
    std::fs::write(&patterns, format!("# build output\n{anchored}\n!keep.tmp\n")).unwrap();
    // Another file system below the tree, where the machine lets us mount
    // one (root in CI): --one-file-system leaves it out.
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "duplex-test", src.join("mnt").to_str().unwrap()])
        .status()
        .is_ok_and(|s| s.success());
    if mounted {
        std::fs::write(src.join("mnt/elsewhere"), b"on another file system").unwrap();
    } else {
        eprintln!("cannot mount a tmpfs here: --one-file-system is not exercised");
    }

    let out = cluster.duplex(
        &token,
        &[
            "backup",
            src.to_str().unwrap(),
            "--exclude",
            "*.tmp",
            "--exclude-file",
            patterns.to_str().unwrap(),
            "--exclude-caches",
            "--one-file-system",
            "--json",
        ],
    );
    if mounted {
        let _ = std::process::Command::new("umount").arg(src.join("mnt")).status();
    }
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["skipped"], 0, "{report}");
    let restored = cluster.restore(&token, report["snapshot"].as_str().unwrap(), "restored");
    assert_eq!(
        listing(&restored.join("home")),
        [
            "cache",
            "cache/CACHEDIR.TAG",
            "docs",
            "docs/a.txt",
            "docs/build",
            "docs/build/out.o",
            "docs/keep.tmp",
            "fake-cache",
            "fake-cache/CACHEDIR.TAG",
            "fake-cache/data",
            "mnt",
            "notes.txt",
        ]
    );

    // An exclude file that is not there stops the backup before anything
    // is sent: backing up what was meant to be left out is the worse error.
    let out = cluster.duplex(
        &token,
        &[
            "backup",
            src.to_str().unwrap(),
            "--exclude-file",
            "/nonexistent/excludes",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/nonexistent/excludes"), "{stderr}");
}

#[test]
fn ls_dump_diff_and_a_partial_restore_read_only_what_they_name() {
    let cluster = Cluster::start();
    let token = cluster.create_account("browser", None);
    let src = cluster.path("home");
    std::fs::create_dir_all(src.join("docs/deep")).unwrap();
    std::fs::create_dir_all(src.join("docs2")).unwrap();
    let big = random_bytes(7, 3 * MIB);
    std::fs::write(src.join("docs/big.bin"), &big).unwrap();
    std::fs::write(src.join("docs/deep/note.txt"), b"deep note").unwrap();
    std::fs::write(src.join("docs2/other.txt"), b"other").unwrap();
    std::fs::write(src.join("gone.txt"), b"to be removed").unwrap();
    let first = cluster.backup(&token, &src)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();

    let listed = cluster.duplex_json(&token, &["ls", &first, "/home/docs/"]);
    let entries = listed["entries"].as_array().unwrap();
    let paths: Vec<&str> = entries.iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        [
            "home/docs",
            "home/docs/big.bin",
            "home/docs/deep",
            "home/docs/deep/note.txt"
        ]
    );
    let big_entry = &entries[1];
    assert_eq!(big_entry["kind"], "file");
    assert_eq!(big_entry["size"], 3 * MIB);
    assert!(big_entry["mtime"].as_str().unwrap().ends_with('Z'), "{big_entry}");
    assert_eq!(entries[0]["kind"], "dir");

    let dumped = cluster.duplex(&token, &["dump", "latest", "home/docs/big.bin"]);
    assert!(
        dumped.status.success(),
        "{}",
        String::from_utf8_lossy(&dumped.stderr)
    );
    assert!(dumped.stdout == big, "dump is not the file's bytes");
    let missing = cluster.duplex(&token, &["dump", &first, "home/nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("home/nope"));
    // A file is also named by its path on the machine backed up.
    let note = src.join("docs/deep/note.txt");
    let dumped = cluster.duplex(&token, &["dump", &first, note.to_str().unwrap()]);
    assert!(
        dumped.status.success(),
        "{}",
        String::from_utf8_lossy(&dumped.stderr)
    );
    assert_eq!(dumped.stdout, b"deep note");
    let listed = cluster.duplex_json(&token, &["ls", &first, src.join("docs2").to_str().unwrap()]);
    let paths: Vec<&str> = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["home/docs2", "home/docs2/other.txt"]);

    // One subtree and one file (named by its path on the machine), with
    // the directories above them.
    let target = cluster.path("partial");
    let gone = src.join("gone.txt");
    let out = cluster.duplex(
        &token,
        &[
            "restore",
            &first[..20],
            "--target",
            target.to_str().unwrap(),
            "--include",
            "home/docs/deep",
            "--include",
            gone.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        listing(&target),
        [
            "home",
            "home/docs",
            "home/docs/deep",
            "home/docs/deep/note.txt",
            "home/gone.txt"
        ]
    );
    assert_eq!(
        std::fs::read(target.join("home/docs/deep/note.txt")).unwrap(),
        b"deep note"
    );

    std::fs::remove_file(src.join("gone.txt")).unwrap();
    std::fs::write(src.join("docs2/other.txt"), b"changed").unwrap();
    std::fs::write(src.join("new.txt"), b"new").unwrap();
    let second = cluster.backup(&token, &src)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let diff = cluster.duplex_json(&token, &["diff", &first, &second]);
    assert_eq!(diff["added"], serde_json::json!(["home/new.txt"]), "{diff}");
    assert_eq!(diff["removed"], serde_json::json!(["home/gone.txt"]), "{diff}");
    // The directories whose contents changed have new mtimes too.
    let modified = diff["modified"].as_array().unwrap();
    assert!(
        modified.contains(&serde_json::json!("home/docs2/other.txt")),
        "{diff}"
    );
    assert!(
        !modified.contains(&serde_json::json!("home/docs/big.bin")),
        "{diff}"
    );
}

fn backed_up(cluster: &Cluster, token: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["backup"];
    all.extend(args);
    cluster.duplex_json(token, &all)
}

#[test]
fn the_file_cache_skips_unchanged_files_and_never_a_changed_one() {
    let cluster = Cluster::start_with(duplex_tests::GC_EAGER);
    let token = cluster.create_account("cached", None);
    let src = cluster.path("data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a"), random_bytes(1, MIB)).unwrap();
    std::fs::write(src.join("b"), random_bytes(2, 2 * MIB)).unwrap();
    let path = src.to_str().unwrap();
    // A file changed in the second before a scan is always read again, so
    // let both settle first.
    let written = std::time::SystemTime::now();
    duplex_tests::wait_for(
        "the files to be over a second old",
        std::time::Duration::from_secs(10),
        || (written.elapsed().ok()? > std::time::Duration::from_millis(1100)).then_some(()),
    );
    let all = 3 * MIB;

    assert_eq!(backed_up(&cluster, &token, &[path])["read_bytes"], all);
    let again = backed_up(&cluster, &token, &[path]);
    assert_eq!(again["read_bytes"], 0, "{again}");
    assert_eq!(again["files"], 2, "{again}");
    assert_eq!(again["bytes"], all, "{again}");

    // New bytes, same size, the mtime put back: only the ctime tells.
    let b = src.join("b");
    let mtime = std::fs::metadata(&b).unwrap().modified().unwrap();
    let changed = random_bytes(3, 2 * MIB);
    std::fs::write(&b, &changed).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&b)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let third = backed_up(&cluster, &token, &[path]);
    assert_eq!(third["read_bytes"], 2 * MIB, "{third}");
    let restored = cluster.restore(&token, third["snapshot"].as_str().unwrap(), "restored");
    assert!(std::fs::read(restored.join("data/b")).unwrap() == changed);

    assert_eq!(
        backed_up(&cluster, &token, &[path, "--force-read"])["read_bytes"],
        all
    );

    // Chunks the cache names but the server no longer holds (every
    // snapshot forgotten and collected): the files are read again.
    let listed = cluster.duplex_json(&token, &["snapshots"]);
    for snapshot in listed["snapshots"].as_array().unwrap() {
        let out = cluster.duplex(&token, &["forget", snapshot["id"].as_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let report = duplex_tests::runtime().block_on(duplex_tests::collect_garbage(&cluster.storage.addr));
    assert!(report.swept_chunks > 0, "{report:?}");
    let after_gc = backed_up(&cluster, &token, &[path]);
    assert_eq!(after_gc["read_bytes"], all, "{after_gc}");
    let restored = cluster.restore(&token, after_gc["snapshot"].as_str().unwrap(), "after-gc");
    assert_same_tree(&src, &restored.join("data"));

    // A damaged cache costs only speed.
    for entry in std::fs::read_dir(cluster.path("agent-cache")).unwrap() {
        std::fs::write(entry.unwrap().path(), b"not a cache").unwrap();
    }
    let out = cluster.duplex(&token, &["backup", path, "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("file cache"), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["read_bytes"], all, "{report}");
}

#[test]
fn special_files_and_names_that_are_not_utf8_come_back_as_they_were() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let cluster = Cluster::start();
    let token = cluster.create_account("odd-names", None);
    let src = cluster.path("odd");
    let latin1 = OsStr::from_bytes(b"caf\xe9.txt");
    let odd_dir = OsStr::from_bytes(b"dir-\xff");
    std::fs::create_dir_all(src.join(odd_dir)).unwrap();
    std::fs::write(src.join(latin1), b"latin-1 name").unwrap();
    std::fs::write(src.join(odd_dir).join("inside"), b"inside").unwrap();
    // Two names that differ only in bytes that are not UTF-8 show the
    // same display form: they must still be two files.
    std::fs::write(src.join(OsStr::from_bytes(b"twin-\xfe")), b"one").unwrap();
    std::fs::write(src.join(OsStr::from_bytes(b"twin-\xfd")), b"two").unwrap();
    std::os::unix::fs::symlink(latin1, src.join("link-to-latin1")).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(src.join("pipe"))
        .status()
        .unwrap();
    assert!(made.success());
    let _socket = std::os::unix::net::UnixListener::bind(src.join("socket")).unwrap();
    // A device needs CAP_MKNOD, which CI's root has.
    let root = std::process::Command::new("mknod")
        .arg(src.join("null-device"))
        .args(["c", "1", "3"])
        .status()
        .unwrap()
        .success();
    std::fs::set_permissions(src.join("pipe"), std::fs::Permissions::from_mode(0o640)).unwrap();
    // An old mtime, set without opening the FIFO (that would block).
    let touched = std::process::Command::new("touch")
        .args(["-m", "-d", "@1400000000.5"])
        .arg(src.join("pipe"))
        .status()
        .unwrap();
    assert!(touched.success());

    let report = cluster.backup(&token, &src);
    assert_eq!(report["skipped"], 0, "{report}");
    let snapshot = report["snapshot"].as_str().unwrap().to_owned();
    let listed = cluster.duplex_json(&token, &["ls", &snapshot]);
    let kind_of = |name: &str| {
        listed["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["path"] == format!("odd/{name}"))
            .map(|e| e["kind"].as_str().unwrap().to_owned())
    };
    assert_eq!(kind_of("pipe").as_deref(), Some("fifo"), "{listed}");
    assert_eq!(kind_of("socket").as_deref(), Some("socket"), "{listed}");
    if root {
        assert_eq!(kind_of("null-device").as_deref(), Some("chardev"), "{listed}");
    }
    // The display form replaces what is not UTF-8.
    assert_eq!(kind_of("caf\u{FFFD}.txt").as_deref(), Some("file"), "{listed}");

    let target = cluster.restore(&token, &snapshot, "restored");
    assert_same_tree(&src, &target.join("odd"));

    // dump and --include take the exact bytes of a name.
    let dumped = cluster.duplex_os(
        &token,
        &[
            OsStr::new("dump"),
            OsStr::new("latest"),
            OsStr::from_bytes(b"odd/caf\xe9.txt"),
        ],
    );
    assert!(
        dumped.status.success(),
        "{}",
        String::from_utf8_lossy(&dumped.stderr)
    );
    assert_eq!(dumped.stdout, b"latin-1 name");
    let partial = cluster.path("partial");
    let out = cluster.duplex_os(
        &token,
        &[
            OsStr::new("restore"),
            OsStr::new("latest"),
            OsStr::new("--target"),
            partial.as_os_str(),
            OsStr::new("--include"),
            OsStr::from_bytes(b"odd/dir-\xff"),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        std::fs::read(partial.join("odd").join(odd_dir).join("inside")).unwrap(),
        b"inside"
    );
    assert!(!partial.join("odd").join(latin1).exists());

    // A change to one twin is one modified path, not a confusion of two.
    std::fs::write(src.join(OsStr::from_bytes(b"twin-\xfd")), b"changed").unwrap();
    let second = cluster.backup(&token, &src)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let diff = cluster.duplex_json(&token, &["diff", &snapshot, &second]);
    assert_eq!(diff["added"], serde_json::json!([]), "{diff}");
    assert_eq!(diff["removed"], serde_json::json!([]), "{diff}");
    let modified = diff["modified"].as_array().unwrap();
    assert!(
        modified.contains(&serde_json::json!("odd/twin-\u{FFFD}")),
        "{diff}"
    );
}

#[test]
fn a_limited_upload_never_runs_above_its_rate() {
    let cluster = Cluster::start();
    let token = cluster.create_account("slow-link", None);
    let src = cluster.path("data");
    std::fs::create_dir_all(&src).unwrap();
    // Small files, one chunk each, so no single send is large.
    const SMALL: usize = 64 * 1024;
    for i in 0..48 {
        std::fs::write(src.join(format!("f{i:02}")), random_bytes(100 + i, SMALL)).unwrap();
    }
    let rate = MIB as u64;
    let started = std::time::Instant::now();
    let report = backed_up(
        &cluster,
        &token,
        &["--limit-upload", &rate.to_string(), src.to_str().unwrap()],
    );
    let took = started.elapsed().as_secs_f64();
    let uploaded = report["uploaded_bytes"].as_u64().unwrap();
    assert!(uploaded >= 48 * SMALL as u64, "{report}");
    // The limiter sends a chunk once the bytes before it are due, so the
    // last one leaves no sooner than all but it take at the rate. A lower
    // bound: no machine is too fast for it.
    let largest_send = 2 * SMALL as u64;
    let floor = (uploaded - largest_send) as f64 / rate as f64;
    assert!(
        took >= floor,
        "{uploaded} bytes at {rate} B/s took {took:.2} s, under {floor:.2} s"
    );
    let restored = cluster.restore(&token, report["snapshot"].as_str().unwrap(), "restored");
    assert_same_tree(&src, &restored.join("data"));

    let zero = cluster.duplex(&token, &["backup", "--limit-upload", "0", src.to_str().unwrap()]);
    assert_eq!(zero.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&zero.stderr).contains("--limit-upload"));
}

#[test]
fn a_tree_wider_than_the_pipeline_window_comes_back_in_order() {
    // More files than the chunking threads may run ahead (8,192), behind
    // a large file at the front of the walk that holds the window back,
    // with a name that sorts before '/' to test the walk order the file
    // cache relies on ("a-b" after "a/...").
    let cluster = Cluster::start();
    let token = cluster.create_account("wide", None);
    let src = cluster.path("wide");
    std::fs::create_dir_all(src.join("a")).unwrap();
    std::fs::write(src.join("a/0-big"), random_bytes(5, 48 * MIB)).unwrap();
    for d in 0..10 {
        let dir = src.join(format!("a/d{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..1000 {
            std::fs::write(dir.join(format!("f{f}")), format!("{d}/{f}")).unwrap();
        }
    }
    std::fs::write(src.join("a-b"), b"after a/ in the walk").unwrap();
    let written = std::time::SystemTime::now();
    duplex_tests::wait_for(
        "the files to be over a second old",
        std::time::Duration::from_secs(10),
        || (written.elapsed().ok()? > std::time::Duration::from_millis(1100)).then_some(()),
    );

    let first = backed_up(&cluster, &token, &[src.to_str().unwrap()]);
    assert_eq!(first["files"], 10_002, "{first}");
    let restored = cluster.restore(&token, first["snapshot"].as_str().unwrap(), "restored");
    assert_same_tree(&src, &restored.join("wide"));
    let again = backed_up(&cluster, &token, &[src.to_str().unwrap()]);
    assert_eq!(again["read_bytes"], 0, "every file found in the cache: {again}");
    assert_eq!(again["files"], 10_002, "{again}");
}
