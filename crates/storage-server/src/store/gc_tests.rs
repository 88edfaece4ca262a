//! Garbage collection on one store: what it keeps, what it reclaims, a
//! commit racing it, and a crash in the middle.

use std::time::Duration;

use duplex_proto::v1::Chunk;
use duplex_types::sealed::payload_hash;
use duplex_types::{AccountId, ChunkId, SnapshotId};

use super::gc::GcSettings;
use super::snapshots::{NewSnapshot, now_ms};
use super::tests::{chunk, put};
use super::{Store, StoreError};

const A: AccountId = AccountId(1);

/// Collect everything dead at once: no grace, no retire delay.
fn eager() -> GcSettings {
    GcSettings {
        grace: Duration::ZERO,
        max_unused: 0.1,
        retire_delay: Duration::ZERO,
        rate_bytes_per_s: 0,
    }
}

/// A round run a minute from now, so everything written so far is past
/// the (zero) grace period.
fn collect(store: &Store, raced: &dyn Fn()) -> super::gc::GcReport {
    store
        .collect_garbage_at(&eager(), now_ms() + 60_000, raced)
        .expect("gc")
}

/// The reference blob listing `names`' chunks, as an agent uploads it.
fn refs_of(names: &[&[u8]]) -> (ChunkId, Chunk) {
    let ids: Vec<ChunkId> = names.iter().map(|n| ChunkId::of(n)).collect();
    let (id, blob) = duplex_types::refs::encode(&ids).remove(0);
    let chunk = Chunk {
        id: id.to_vec(),
        data_hash: payload_hash(&blob).to_vec(),
        data: blob.into(),
    };
    (id, chunk)
}

/// Uploads `names` and a manifest, then commits a snapshot naming them.
fn backup(store: &Store, manifest: &[u8], names: &[&[u8]]) -> Result<SnapshotId, StoreError> {
    let mut chunks: Vec<Chunk> = names.iter().map(|n| chunk(n)).collect();
    chunks.push(chunk(manifest));
    put(store, A, &chunks)?;
    commit(store, manifest, names)
}

fn commit(store: &Store, manifest: &[u8], names: &[&[u8]]) -> Result<SnapshotId, StoreError> {
    let (blob, blob_chunk) = refs_of(names);
    put(store, A, &[blob_chunk])?;
    let info = store.commit_snapshot(
        A,
        NewSnapshot {
            manifest_chunks: vec![ChunkId::of(manifest)],
            summary: vec![],
            reference_blobs: vec![blob],
        },
    )?;
    Ok(SnapshotId::parse(&info.id).expect("id"))
}

fn held(store: &Store, name: &[u8]) -> bool {
    store
        .missing(A, &[ChunkId::of(name)])
        .expect("missing")
        .is_empty()
}

fn stored(store: &Store) -> u64 {
    store.usage().expect("usage")[0].stored_bytes
}

#[test]
fn collection_keeps_what_live_snapshots_name_and_reclaims_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let old = backup(&store, b"manifest-1", &[b"gone", b"shared"]).expect("first");
    backup(&store, b"manifest-2", &[b"shared", b"new"]).expect("second");
    store.delete_snapshots(A, &[old]).expect("forget");
    let before = store.pack_bytes().expect("packs");

    let report = collect(&store, &|| {});
    // "gone", the first manifest and the first reference blob.
    assert_eq!(report.swept_chunks, 3, "{report:?}");
    assert!(!held(&store, b"gone") && !held(&store, b"manifest-1"));
    for name in [&b"shared"[..], b"new", b"manifest-2"] {
        assert!(
            held(&store, name),
            "{} was collected",
            String::from_utf8_lossy(name)
        );
    }
    assert!(store.verify(A, None).expect("verify").is_clean());
    // On disk: exactly the live bytes, every dead byte reclaimed.
    assert_eq!(store.pack_bytes().expect("packs"), stored(&store));
    assert_eq!(report.reclaimed_bytes, before - stored(&store));
    assert_eq!(
        store.reclaimed_by_account().expect("reclaimed")[&A.0],
        report.swept_bytes
    );
    assert_eq!(
        store.gc_totals().expect("totals"),
        (report.swept_bytes, report.reclaimed_bytes)
    );

    // A second round finds nothing more, and a reopen changes nothing.
    assert_eq!(collect(&store, &|| {}).swept_chunks, 0);
    drop(store);
    let store = Store::open(dir.path()).expect("reopen");
    assert!(store.verify(A, None).expect("verify").is_clean());
    assert_eq!(store.pack_bytes().expect("packs"), stored(&store));
}

#[test]
fn a_snapshot_committed_while_collecting_keeps_its_chunks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let old = backup(&store, b"manifest-1", &[b"reused"]).expect("first");
    store.delete_snapshots(A, &[old]).expect("forget");
    // "reused" is dead when the round marks, and a backup that was told it
    // is present commits a snapshot naming it before the sweep.
    let raced = std::cell::Cell::new(None);
    collect(&store, &|| {
        if raced.get().is_none() {
            raced.set(Some(commit(&store, b"manifest-1", &[b"reused"]).expect("commit")));
        }
    });
    let id = raced.get().expect("the racing commit ran");
    assert!(
        held(&store, b"reused"),
        "a chunk a committed snapshot names was collected"
    );
    assert!(store.verify(A, Some(&id.to_string())).expect("verify").is_clean());

    // The other order: the sweep first, and the commit is refused, naming
    // what is gone, so the agent uploads it again.
    store.delete_snapshots(A, &[id]).expect("forget");
    collect(&store, &|| {});
    assert!(!held(&store, b"reused"));
    let err = commit(&store, b"manifest-1", &[b"reused"]).expect_err("refused");
    assert!(matches!(err, StoreError::MissingChunks { .. }), "{err}");
    assert!(backup(&store, b"manifest-1", &[b"reused"]).is_ok());
}

#[test]
fn chunks_written_or_answered_present_within_the_grace_period_are_spared() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path()).expect("open");
    // As if the server had been up for a day, so the sweep is not deferred.
    store.opened_ms -= 24 * 3600 * 1000;
    put(&store, A, &[chunk(b"uploading"), chunk(b"answered")]).expect("put");
    let grace = GcSettings {
        grace: Duration::from_secs(3600),
        ..eager()
    };
    // Written just now: an upload whose snapshot is not committed yet.
    let report = store.collect_garbage(&grace).expect("gc");
    assert_eq!(report.swept_chunks, 0, "{report:?}");
    // Two hours on, only the one a backup was told is present half an
    // hour ago stays.
    let now = now_ms();
    super::packs::lock(&store.touched).expect("touched").note(
        A,
        &[ChunkId::of(b"answered")],
        now + 5400 * 1000,
    );
    let report = store
        .collect_garbage_at(&grace, now + 7200 * 1000, &|| {})
        .expect("gc");
    assert_eq!(report.swept_chunks, 1, "{report:?}");
    assert!(held(&store, b"answered") && !held(&store, b"uploading"));

    // A server that has just started remembers no answers: it sweeps nothing.
    drop(store);
    let store = Store::open(dir.path()).expect("reopen");
    let report = store.collect_garbage(&grace).expect("gc");
    assert!(report.sweep_deferred && report.swept_chunks == 0, "{report:?}");
}

#[test]
fn an_account_with_a_snapshot_older_than_reference_blobs_keeps_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    put(&store, A, &[chunk(b"data"), chunk(b"manifest")]).expect("put");
    let legacy = duplex_proto::v1::SnapshotInfo {
        id: SnapshotId::generate().to_string(),
        time_unix_ms: now_ms(),
        manifest_chunks: vec![ChunkId::of(b"manifest").to_vec()],
        origin: "an older server".into(),
        ..Default::default()
    };
    let record = duplex_proto::v1::ChangeRecord {
        seq: 1,
        origin: "an older server".into(),
        account_id: A.0,
        change: Some(duplex_proto::v1::change_record::Change::Snapshot(legacy)),
        time_unix_ms: now_ms(),
    };
    let mut w = store.begin_pack().expect("pack");
    let checkpoint = duplex_proto::v1::Checkpoint {
        source_id: "source".into(),
        seq: 1,
    };
    store
        .commit_mirror(&mut w, &[record], &checkpoint)
        .expect("apply");
    let report = collect(&store, &|| {});
    assert_eq!(
        (report.accounts_skipped, report.swept_chunks),
        (1, 0),
        "{report:?}"
    );
    assert!(held(&store, b"data"));
}

#[test]
fn a_crash_mid_upload_or_mid_compaction_leaves_only_indexed_packs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    backup(&store, b"manifest", &[b"kept"]).expect("backup");
    // An upload cut short: bytes in a pack, never indexed.
    let mut w = store.begin_pack().expect("pack");
    w.add(A, &chunk(b"never committed")).expect("add");
    // A pack a compaction retired whose delay has not passed.
    let dead = backup(&store, b"manifest-2", &[b"dead"]).expect("backup");
    store.delete_snapshots(A, &[dead]).expect("forget");
    let lazy = GcSettings {
        retire_delay: Duration::from_secs(3600),
        ..eager()
    };
    let report = store
        .collect_garbage_at(&lazy, now_ms() + 60_000, &|| {})
        .expect("gc");
    assert!(report.packs_deleted == 0 && report.swept_chunks > 0, "{report:?}");
    assert!(store.pack_bytes().expect("packs") > stored(&store));
    drop((w, store));

    let store = Store::open(dir.path()).expect("reopen");
    assert_eq!(store.pack_bytes().expect("packs"), stored(&store));
    assert!(store.verify(A, None).expect("verify").is_clean());
    assert!(held(&store, b"kept"));
}

#[test]
fn verify_checks_every_chunk_a_snapshot_names_through_its_reference_blobs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let id = backup(&store, b"manifest", &[b"data"]).expect("backup");
    assert!(store.verify(A, Some(&id.to_string())).expect("verify").is_clean());
    // Lose the data chunk, which only the reference blob names.
    let txn = store.db.begin_write().expect("txn");
    txn.open_table(super::tables::CHUNKS)
        .expect("chunks")
        .remove((A.0, *ChunkId::of(b"data").as_bytes()))
        .expect("remove");
    txn.commit().expect("commit");
    let report = store.verify(A, Some(&id.to_string())).expect("verify");
    assert_eq!(report.missing, vec![ChunkId::of(b"data")]);
    let (all, snapshots) = store.verify_snapshots(A).expect("verify all");
    assert_eq!((all.missing.len(), snapshots), (1, 1));
}
