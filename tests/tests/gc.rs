//! Garbage collection with the real binaries: forget and prune reclaim
//! space on both sites while the kept snapshots restore bit for bit; a
//! commit racing a collection never names a collected chunk; a server
//! killed in the middle of a compaction recovers; a backup killed at
//! every step, with collections between, loses nothing; and compound
//! faults: in active-active, site a lost mid-compaction, deletions on
//! site b meanwhile, then failback; the coordinator killed mid-round,
//! then a failover.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use duplex_proto::v1::storage_admin_client::StorageAdminClient;
use duplex_proto::v1::storage_service_client::StorageServiceClient;
use duplex_proto::v1::{
    Chunk, CollectGarbageRequest, CommitSnapshotRequest, DeleteSnapshotsRequest, GcReport,
    MissingChunksRequest, Purpose, VerifyRequest,
};
use duplex_tests::tree::{assert_same_tree, random_bytes};
use duplex_tests::twosite::{Options, TwoSites};
use duplex_tests::{Cluster, WithTicket, opaque_chunk, runtime, wait_for};
use duplex_types::ChunkId;
use duplex_types::sealed::payload_hash;

const LONG: Duration = Duration::from_secs(60);
const EAGER: &[&str] = duplex_tests::GC_EAGER;

/// Bytes of pack files under a storage server's data dir.
fn pack_bytes(data_dir: &Path) -> u64 {
    std::fs::read_dir(data_dir.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// Runs `start` (which starts a collection) and returns once the
/// compaction on the server with `data_dir` has begun writing its new
/// pack: killing something then lands in the middle of the copy.
fn start_compaction<T>(data_dir: &Path, start: impl FnOnce() -> T) -> T {
    let packs = data_dir.join("packs");
    let before: Vec<_> = std::fs::read_dir(&packs)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let started = start();
    // A round runs at nice 19: on two cores busy with other tests it gets
    // a sliver of one, and its marking can take a while before the copy.
    wait_for("the compaction to start writing", 3 * LONG, || {
        std::fs::read_dir(&packs)
            .unwrap()
            .any(|e| !before.contains(&e.unwrap().file_name()))
            .then_some(())
    });
    started
}

/// Prunes until both sites hold at most 1.3x `live` bytes in packs, then
/// checks that every chunk a snapshot names is there and intact.
fn prune_down_to(sites: &TwoSites, live: f64) {
    wait_for("both sites to be within 1.3x of the live data", LONG, || {
        sites.ctl_json(&["prune", "--wait"]);
        ["storage-a", "storage-b"]
            .iter()
            .all(|s| pack_bytes(&sites.path(s)) as f64 <= 1.3 * live)
            .then_some(())
    });
    assert_eq!(sites.ctl_json(&["verify"])["ok"], true);
}

fn write_tree(root: &Path, files: &[(&str, u64, usize)]) -> PathBuf {
    std::fs::create_dir_all(root).unwrap();
    for (name, seed, len) in files {
        std::fs::write(root.join(name), random_bytes(*seed, *len)).unwrap();
    }
    root.to_path_buf()
}

/// Bytes of one half of a [`HalfDead`] file.
const HALF: usize = 4_000_000;

/// A directory whose first backup leaves its packs half dead once it is
/// forgotten. One file, `data`, holds a half that stays then a half that a
/// second backup no longer has. Being one file, its chunks are sent in
/// order by one thread, alternating across the agent's upload streams, so
/// every pack the first backup writes holds chunks of both halves and is
/// compacted. (Two files, one dropped, raced for the streams: a pack could
/// hold one file alone and be left whole or deleted whole.) Each half
/// spans several chunks, so chunks wholly within the kept half exist.
struct HalfDead {
    dir: PathBuf,
    seed: u64,
}

impl HalfDead {
    fn write(dir: &Path, seed: u64) -> HalfDead {
        std::fs::create_dir_all(dir).unwrap();
        let mut both = random_bytes(seed, HALF);
        both.extend(random_bytes(seed + 1, HALF));
        std::fs::write(dir.join("data"), both).unwrap();
        HalfDead {
            dir: dir.to_path_buf(),
            seed,
        }
    }

    /// Cuts `data` down to the half that stays.
    fn drop_half(&self) {
        std::fs::write(self.dir.join("data"), random_bytes(self.seed, HALF)).unwrap();
    }
}

#[test]
fn forget_and_prune_reclaim_space_on_both_sites_and_the_kept_snapshot_restores() {
    let sites = TwoSites::start(Options {
        storage: EAGER,
        ..Options::default()
    });
    let root = sites.path("trees");
    // Three generations of one directory: each rewrites "changing" and
    // keeps "stable", so the kept snapshot shares packs with the forgotten.
    let mut last = (String::new(), PathBuf::new());
    for generation in 0..3u64 {
        let tree = write_tree(
            &root.join(format!("gen-{generation}")),
            &[
                ("stable", 1, 1_500_000),
                ("changing", 100 + generation, 1_500_000),
            ],
        );
        last = (sites.backup(&sites.token, &tree), tree);
    }
    let (kept, kept_tree) = last;
    let live_bytes = 3_000_000.0;
    let out = sites.duplex(&sites.token, &["forget", "--keep-last", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for storage in ["storage-a", "storage-b"] {
        let dir = sites.path(storage);
        let addr = if storage == "storage-a" {
            sites.storage_a.addr.clone()
        } else {
            sites.storage_b.addr.clone()
        };
        wait_for(&format!("{storage} to hold one snapshot"), LONG, || {
            let out = sites.duplex(&sites.token, &["--storage", &addr, "snapshots", "--json"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (v["snapshots"].as_array()?.len() == 1).then_some(())
        });
        assert!(
            pack_bytes(&dir) as f64 > 1.8 * live_bytes,
            "nothing to reclaim on {storage}"
        );
    }

    let pruned = sites.ctl_json(&["prune", "--wait"]);
    let servers = pruned["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 2, "{pruned}");
    for server in servers {
        assert!(server["swept_bytes"].as_u64().unwrap() > 2_000_000, "{pruned}");
        assert!(
            server["reclaimed_bytes"].as_u64().unwrap() > 2_000_000,
            "{pruned}"
        );
    }
    for storage in ["storage-a", "storage-b"] {
        let on_disk = pack_bytes(&sites.path(storage)) as f64;
        assert!(
            on_disk <= 1.3 * live_bytes,
            "{storage} keeps {on_disk} bytes for {live_bytes} live"
        );
    }
    let usage = sites.ctl_json(&["accounts", "usage"]);
    let demo = usage["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "demo")
        .unwrap();
    assert!(demo["reclaimed_bytes"].as_u64().unwrap() > 2_000_000, "{usage}");
    let metrics = sites.scrape(&sites.storage_b.addr);
    assert!(metrics.contains("duplex_gc_reclaimed_bytes_total"), "{metrics}");

    // A deleted account's data goes on both sites: the deletion is a feed
    // record, mirrored like a backup.
    let leaving = sites.create_account("leaving", None, None);
    let tree = write_tree(&root.join("leaving"), &[("data", 7, 1_000_000)]);
    sites.backup(&leaving, &tree);
    let deleted = sites.ctl_json(&["accounts", "delete", "leaving"]);
    assert_eq!(deleted["snapshots_deleted"], 1, "{deleted}");
    let mut swept_on_b = 0;
    wait_for("storage-b to collect the deleted account's chunks", LONG, || {
        let pruned = sites.ctl_json(&["prune", "--wait"]);
        let b = pruned["servers"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == "storage-b")?;
        swept_on_b += b["swept_bytes"].as_u64()?;
        (swept_on_b > 1_000_000).then_some(())
    });
    let out = sites.duplex(&leaving, &["snapshots"]);
    assert!(!out.status.success(), "the deleted account's token still works");

    let name = kept_tree.file_name().unwrap();
    let target = sites.restore(&sites.token, &kept, "restored-a");
    assert_same_tree(&kept_tree, &target.join(name));
    // The replica collected from the deletions mirrored to it: it restores
    // the kept snapshot too once it has taken over.
    sites.storage_a.signal(libc::SIGKILL);
    sites.wait_roles(&[("storage-b", "primary")]);
    let target = sites.restore(&sites.token, &kept, "restored-b");
    assert_same_tree(&kept_tree, &target.join(name));
}

type Storage = StorageServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, WithTicket>,
>;

async fn storage_client(cluster: &Cluster, token: &str) -> Storage {
    let ticket = duplex_tests::login(&cluster.account.addr, token, Purpose::Backup)
        .await
        .ticket;
    StorageServiceClient::with_interceptor(
        duplex_rpc::channel(&cluster.storage.addr).unwrap(),
        WithTicket::new(&ticket),
    )
}

async fn collect(cluster: &Cluster) -> GcReport {
    duplex_tests::collect_garbage(&cluster.storage.addr).await
}

/// Everything a snapshot naming `data` needs: the chunk, its reference
/// blob and a manifest chunk; and the commit naming them.
fn snapshot_of(data: &[u8]) -> (Vec<Chunk>, CommitSnapshotRequest) {
    let (blob_id, blob) = duplex_types::refs::encode(&[ChunkId::of(data)]).remove(0);
    let blob_chunk = Chunk {
        id: blob_id.to_vec(),
        data_hash: payload_hash(&blob).to_vec(),
        data: blob.into(),
    };
    let manifest = opaque_chunk(b"the manifest");
    let commit = CommitSnapshotRequest {
        manifest_chunks: vec![manifest.id.clone()],
        reference_blobs: vec![blob_id.to_vec()],
        references_listed: true,
        ..Default::default()
    };
    (vec![opaque_chunk(data), blob_chunk, manifest], commit)
}

#[test]
fn a_commit_after_a_collection_took_its_chunks_is_refused_and_succeeds_once_they_are_sent_again() {
    let cluster = Cluster::start_with(EAGER);
    let token = cluster.create_account("racer", None);
    runtime().block_on(async {
        let mut storage = storage_client(&cluster, &token).await;
        let (chunks, commit) = snapshot_of(b"a chunk two snapshots share");
        storage
            .put_chunks(futures::stream::iter(chunks.clone()))
            .await
            .unwrap();
        let first = storage
            .commit_snapshot(commit.clone())
            .await
            .unwrap()
            .into_inner();
        storage
            .delete_snapshots(DeleteSnapshotsRequest { ids: vec![first.id] })
            .await
            .unwrap();
        // The race, injected: a second backup is told every chunk is
        // present (deduplicated against the forgotten snapshot), then a
        // collection runs before it commits. With no grace period, the
        // collection takes them.
        let ids: Vec<Vec<u8>> = chunks.iter().map(|c| c.id.clone()).collect();
        let missing = storage
            .missing_chunks(MissingChunksRequest { ids: ids.clone() })
            .await
            .unwrap()
            .into_inner()
            .missing;
        assert!(missing.is_empty(), "the chunks were not deduplicated");
        assert_eq!(collect(&cluster).await.swept_chunks, 3);
        // The commit does not go through naming chunks that are gone...
        let err = storage.commit_snapshot(commit.clone()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
        assert!(duplex_rpc::client::is_missing_chunks(&err), "{err:?}");
        // ...and does once the backup has sent what the server now lacks.
        let missing = storage
            .missing_chunks(MissingChunksRequest { ids })
            .await
            .unwrap()
            .into_inner()
            .missing;
        assert_eq!(missing.len(), 3);
        storage.put_chunks(futures::stream::iter(chunks)).await.unwrap();
        let second = storage.commit_snapshot(commit).await.unwrap().into_inner();
        assert_eq!(collect(&cluster).await.swept_chunks, 0);
        let verified = storage
            .verify(VerifyRequest {
                snapshot_id: second.id,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            verified.missing.is_empty() && verified.corrupt.is_empty(),
            "{verified:?}"
        );
    });
}

#[test]
fn a_storage_server_killed_mid_compaction_recovers_and_the_kept_backup_restores() {
    // Compaction copies at 1 MiB/s, so it is still copying when killed.
    let mut flags = EAGER.to_vec();
    flags.extend(["--gc-rate", "1048576"]);
    let mut cluster = Cluster::start_with(&flags);
    let token = cluster.create_account("crashy", None);
    let tree = HalfDead::write(&cluster.path("tree"), 1);
    let dir = tree.dir.clone();
    let first = cluster.backup(&token, &dir)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    tree.drop_half();
    let second = cluster.backup(&token, &dir)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let forgot = cluster.duplex(&token, &["forget", &first]);
    assert!(
        forgot.status.success(),
        "{}",
        String::from_utf8_lossy(&forgot.stderr)
    );

    let data_dir = cluster.path("storage-a");
    let started = start_compaction(&data_dir, || {
        runtime().block_on(async {
            StorageAdminClient::new(duplex_rpc::channel(&cluster.storage.addr).unwrap())
                .collect_garbage(CollectGarbageRequest { wait: false })
                .await
                .unwrap()
                .into_inner()
                .started
        })
    });
    assert!(started);
    cluster.storage.signal(libc::SIGKILL);
    cluster.storage.restart();

    let target = cluster.restore(&token, &second, "restored");
    assert_same_tree(&dir, &target.join(dir.file_name().unwrap()));
    // The rerun finishes the job: the dropped file's bytes are gone.
    runtime().block_on(async {
        let report = collect(&cluster).await;
        assert!(report.reclaimed_bytes > 3 * HALF as u64 / 4, "{report:?}");
    });
    let on_disk = pack_bytes(&data_dir) as f64;
    assert!(
        on_disk <= 1.3 * HALF as f64,
        "{on_disk} bytes on disk for {HALF} live"
    );
    let verify = cluster.duplex(&token, &["verify", &second]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

#[test]
fn a_deleted_accounts_tickets_are_refused_at_once_and_its_name_is_free_again() {
    let cluster = Cluster::start_with(EAGER);
    let token = cluster.create_account("leaving", None);
    let tree = write_tree(&cluster.path("tree"), &[("data", 5, 1_000_000)]);
    cluster.backup(&token, &tree);
    let deleted = runtime().block_on(async {
        // A ticket issued before the deletion.
        let mut storage = storage_client(&cluster, &token).await;
        let out = cluster.ctl(&["accounts", "delete", "leaving", "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let deleted: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(deleted["snapshots_deleted"], 1, "{deleted}");
        let err = storage
            .list_snapshots(duplex_proto::v1::ListSnapshotsRequest {})
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
        assert!(err.message().contains("deleted"), "{err}");
        // Its chunks go with the next collection.
        let report = collect(&cluster).await;
        assert!(report.swept_bytes > 1_000_000, "{report:?}");
        deleted
    });
    let out = cluster.duplex(&token, &["snapshots"]);
    assert!(!out.status.success(), "the deleted account's token still works");
    // Deleting it again names the problem; the name can be given again,
    // to a new account with a new id and nothing of the old one.
    let out = cluster.ctl(&["accounts", "delete", "leaving"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    let again = cluster.create_account("leaving", None);
    let listed = cluster.duplex_json(&again, &["snapshots"]);
    assert_eq!(listed["snapshots"].as_array().unwrap().len(), 0, "{listed}");
    let out = cluster.ctl(&["accounts", "delete", "leaving", "--json"]);
    let second: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(second["id"], deleted["id"], "an id was reused");
}

/// The snapshot ids `token`'s account lists on `storage`, once it answers.
fn listed(sites: &TwoSites, token: &str, storage: &str) -> Option<Vec<String>> {
    let out = sites.duplex(token, &["--storage", storage, "snapshots", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let mut ids: Vec<String> = v["snapshots"]
        .as_array()?
        .iter()
        .filter_map(|s| s["id"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    Some(ids)
}

fn wait_listed(sites: &TwoSites, token: &str, storage: &str, want: &[&str]) {
    let mut want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
    want.sort();
    wait_for(&format!("{storage} to list {want:?}"), LONG, || {
        (listed(sites, token, storage)? == want).then_some(())
    });
}

fn forget(sites: &TwoSites, token: &str, snapshot: &str) {
    let out = sites.duplex(token, &["forget", snapshot]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn active_active_deletions_are_collected_on_both_sites_through_a_site_lost_mid_compaction_and_a_failback() {
    // Compaction copies at 1 MiB/s, so site a is lost while it copies.
    let mut flags = EAGER.to_vec();
    flags.extend(["--gc-rate", "1048576"]);
    let mut sites = TwoSites::start(Options {
        mode: "active-active",
        storage: &flags,
        ..Options::default()
    });
    let alice = sites.create_account("alice", None, Some("storage-a"));
    let bob = sites.create_account("bob", None, Some("storage-b"));
    let root = sites.path("trees");
    // Each account backs up a file, then half of it, and forgets the
    // first snapshot: its packs are left half dead, to be compacted.
    let mut kept = Vec::new();
    for (i, token) in [&alice, &bob].into_iter().enumerate() {
        let tree = HalfDead::write(&root.join(format!("account-{i}")), 10 * i as u64);
        let dir = tree.dir.clone();
        let first = sites.backup(token, &dir);
        tree.drop_half();
        let second = sites.backup(token, &dir);
        forget(&sites, token, &first);
        kept.push((token.clone(), second, dir));
    }
    let (a, b) = (sites.storage_a.addr.clone(), sites.storage_b.addr.clone());
    // Each deletion reaches the other site, and the reverse link does not
    // bring the snapshot back.
    for (token, second, _) in &kept {
        for storage in [&a, &b] {
            wait_listed(&sites, token, storage, &[second]);
        }
    }

    // Site a is lost while both sites compact.
    let started = start_compaction(&sites.path("storage-a"), || sites.ctl_json(&["prune"]));
    assert_eq!(started["servers"].as_array().unwrap().len(), 2, "{started}");
    for service in [&sites.storage_a, &sites.account_a, &sites.mirror_a] {
        service.signal(libc::SIGKILL);
    }
    sites.wait_roles(&[("account-b", "master"), ("storage-b", "primary")]);
    // Alice, moved to site b, writes and deletes there while a is down.
    let (alice_token, alice_second, alice_dir) = kept.remove(0);
    wait_for("alice to move to storage-b", LONG, || {
        (sites.home_of("alice") == "storage-b").then_some(())
    });
    std::fs::write(alice_dir.join("after"), random_bytes(99, 500_000)).unwrap();
    let alice_third = sites.backup(&alice_token, &alice_dir);
    forget(&sites, &alice_token, &alice_second);
    kept.insert(0, (alice_token, alice_third, alice_dir));

    for service in [&mut sites.account_a, &mut sites.storage_a, &mut sites.mirror_a] {
        service.restart();
    }
    sites.wait_roles(&[("account-a", "slave"), ("storage-a", "replica")]);
    sites.ctl_ok(&["failback", "--wait"]);
    sites.wait_roles(&[("storage-a", "primary"), ("storage-b", "primary")]);
    // What was deleted on either site, before or during the loss, stays
    // deleted on both.
    for (token, snapshot, _) in &kept {
        for storage in [&a, &b] {
            wait_listed(&sites, token, storage, &[snapshot]);
        }
    }
    // A prune after the failback finishes the interrupted compaction and
    // collects what was deleted on b; both sites hold little beyond the live
    // data (each site holds both accounts' copies).
    let live = (HALF + 500_000 + HALF) as f64;
    prune_down_to(&sites, live);
    for (i, (token, snapshot, dir)) in kept.iter().enumerate() {
        let target = sites.restore(token, snapshot, &format!("restored-{i}"));
        assert_same_tree(dir, &target.join(dir.file_name().unwrap()));
    }
}

fn stored_chunks(cluster: &Cluster) -> Option<u64> {
    runtime().block_on(async {
        let mut admin = StorageAdminClient::new(duplex_rpc::channel(&cluster.storage.addr).ok()?);
        let status = admin
            .get_status(duplex_proto::v1::GetStorageStatusRequest {})
            .await
            .ok()?;
        Some(status.into_inner().chunks)
    })
}

/// Waits until the storage server has ended every upload stream: a killed
/// agent's stream ends only when the server reads the broken connection,
/// and a batch it was storing may still commit chunks until then.
fn wait_uploads_ended(cluster: &Cluster) {
    wait_for("the storage server to end every upload stream", LONG, || {
        let count = series(
            cluster,
            "duplex_rpc_in_flight_calls{method=\"/duplex.v1.StorageService/PutChunks\"}",
        )?;
        (count == 0).then_some(())
    });
}

/// Chunks the storage server has told backups it already holds.
fn dedup_hits(cluster: &Cluster) -> u64 {
    const SERIES: &str = "duplex_storage_dedup_hits_total{server=\"storage-a\"}";
    series(cluster, SERIES).unwrap_or_else(|| panic!("no {SERIES} in the storage server's metrics"))
}

/// The value of one metric series of the storage server, if it has it.
fn series(cluster: &Cluster, series: &str) -> Option<u64> {
    let metrics = duplex_tests::scrape(&cluster.storage.addr);
    let value = metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))?;
    value.parse().ok()
}

fn spawn_backup(cluster: &Cluster, token: &str, tree: &Path) -> std::process::Child {
    std::process::Command::new(duplex_tests::bin("duplex"))
        .args(["backup", tree.to_str().unwrap(), "--json"])
        .env("DUPLEX_ENDPOINT", &cluster.account.addr)
        .env("DUPLEX_TOKEN", token)
        .env("DUPLEX_INSECURE_PLAINTEXT", "1")
        .env("DUPLEX_PASSWORD", duplex_tests::cluster::TEST_PASSPHRASE)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_backup_killed_at_every_step_with_collections_between_and_one_racing_it_loses_nothing() {
    let cluster = Cluster::start_with(EAGER);
    let token = cluster.create_account("interrupted", None);
    let small = write_tree(&cluster.path("small"), &[("kept", 1, 2_000_000)]);
    let kept = cluster.backup(&token, &small)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let live = stored_chunks(&cluster).unwrap();
    // About 200 chunks, made durable 32 MiB at a time while uploading:
    // room for every kill below to land before the upload ends.
    let big = write_tree(
        &cluster.path("big"),
        &[
            ("a", 2, 40 << 20),
            ("b", 3, 40 << 20),
            ("c", 4, 40 << 20),
            ("d", 5, 40 << 20),
            ("e", 6, 40 << 20),
        ],
    );
    // Killed once one, two and three periodic commits are durable; each
    // time a collection then takes every chunk the dead attempt left.
    for step in 1..=3u64 {
        let mut agent = spawn_backup(&cluster, &token, &big);
        wait_for(&format!("commit {step} of the upload"), LONG, || {
            stored_chunks(&cluster).filter(|n| *n >= live + 25 * step)
        });
        agent.kill().unwrap();
        agent.wait().unwrap();
        // The server still commits what the dead stream had sent when it
        // notices the stream is gone, so a round may run before that lands.
        let mut swept = 0;
        wait_for(&format!("step {step}'s chunks to be collected"), LONG, || {
            swept += runtime().block_on(collect(&cluster)).swept_chunks;
            (stored_chunks(&cluster) == Some(live)).then_some(())
        });
        assert!(swept >= 25 * step, "step {step}: {swept} chunks swept");
    }
    // Killed once more, then resumed with a collection racing it: the
    // chunks it is told are present, and the ones it has just sent, are
    // collected before it commits. The commit is refused, naming them,
    // and the agent backs up again.
    let mut agent = spawn_backup(&cluster, &token, &big);
    wait_for("the first commit of the upload", LONG, || {
        stored_chunks(&cluster).filter(|n| *n >= live + 25)
    });
    agent.kill().unwrap();
    agent.wait().unwrap();
    // Counted once the dead stream has stored all it ever will, so that
    // only the resumed upload can add to the count.
    wait_uploads_ended(&cluster);
    let orphans = stored_chunks(&cluster).unwrap() - live;
    let hits = dedup_hits(&cluster);
    let agent = spawn_backup(&cluster, &token, &big);
    // Collected once the resumed backup has been told every orphan is
    // there (so it will not send them), and before it commits.
    wait_for("the resumed backup to be told of every orphan", LONG, || {
        (dedup_hits(&cluster) >= hits + orphans).then_some(())
    });
    let report = runtime().block_on(collect(&cluster));
    assert!(report.swept_chunks > 25, "{report:?}");
    let out = agent.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("collected as garbage meanwhile"), "{stderr}");
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let snapshot = done["snapshot"].as_str().unwrap();

    runtime().block_on(collect(&cluster));
    for (id, tree) in [(kept.as_str(), &small), (snapshot, &big)] {
        let target = cluster.restore(&token, id, &format!("restored-{id}"));
        assert_same_tree(tree, &target.join(tree.file_name().unwrap()));
        let verify = cluster.duplex(&token, &["verify", id]);
        assert!(
            verify.status.success(),
            "{}",
            String::from_utf8_lossy(&verify.stderr)
        );
    }
}

#[test]
fn a_collection_survives_a_coordinator_killed_in_its_middle_and_the_replica_serves_after_a_failover() {
    // Compaction copies at 1 MiB/s, so it is still copying when the
    // coordinator dies.
    let mut flags = EAGER.to_vec();
    flags.extend(["--gc-rate", "1048576"]);
    let mut sites = TwoSites::start(Options {
        storage: &flags,
        ..Options::default()
    });
    let token = sites.token.clone();
    let tree = HalfDead::write(&sites.path("tree"), 1);
    let dir = tree.dir.clone();
    let first = sites.backup(&token, &dir);
    tree.drop_half();
    let second = sites.backup(&token, &dir);
    forget(&sites, &token, &first);
    let (a, b) = (sites.storage_a.addr.clone(), sites.storage_b.addr.clone());
    for storage in [&a, &b] {
        wait_listed(&sites, &token, storage, &[&second]);
    }

    start_compaction(&sites.path("storage-a"), || sites.ctl_json(&["prune"]));
    // restart_coordinator SIGKILLs it first.
    sites.restart_coordinator(None);
    sites.wait_roles(&[("storage-a", "primary"), ("storage-b", "replica")]);
    // Rounds are each server's own: they finish, and the next prune finds
    // both sites down to about the live data.
    let live = HALF as f64;
    prune_down_to(&sites, live);
    sites.storage_a.signal(libc::SIGKILL);
    sites.wait_roles(&[("storage-b", "primary")]);
    let target = sites.restore(&token, &second, "restored");
    assert_same_tree(&dir, &target.join(dir.file_name().unwrap()));
}
