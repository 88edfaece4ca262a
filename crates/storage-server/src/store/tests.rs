use duplex_proto::v1::Chunk;
use duplex_types::sealed::{PAYLOAD_FORMAT_V1, payload_hash};
use duplex_types::{AccountId, ChunkId};

use super::snapshots::NewSnapshot;
use super::{Store, StoreError};

/// A chunk whose payload has the sealed shape (the server cannot tell
/// real ciphertext from any other bytes, and need not).
pub(super) fn chunk(name: &[u8]) -> Chunk {
    let mut data = vec![PAYLOAD_FORMAT_V1];
    data.extend_from_slice(&[7; 40]);
    data.extend_from_slice(name);
    Chunk {
        id: ChunkId::of(name).to_vec(),
        data_hash: payload_hash(&data).to_vec(),
        data: data.into(),
    }
}

pub(super) fn put(
    store: &Store,
    account: AccountId,
    chunks: &[Chunk],
) -> Result<super::PutStats, StoreError> {
    let mut w = store.begin_pack()?;
    for c in chunks {
        w.add(account, c)?;
    }
    store.commit_pack(&mut w, account, None)
}

#[test]
fn chunks_are_durable_scoped_and_verified() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = AccountId(1);
    let b = AccountId(2);
    {
        let store = Store::open(dir.path()).expect("open");
        let stats = put(&store, a, &[chunk(b"one"), chunk(b"two")]).expect("put");
        assert_eq!(stats.stored, 2);
        assert_eq!(put(&store, a, &[chunk(b"one")]).expect("put").already_present, 1);
        let mut bad = chunk(b"three");
        bad.data = b"\x01tampered with, and long enough to be sealed".to_vec().into();
        let mut w = store.begin_pack().expect("pack");
        assert!(matches!(w.add(a, &bad), Err(StoreError::HashMismatch { .. })));
        let mut unknown = chunk(b"four");
        unknown.data = vec![9u8; 64].into();
        unknown.data_hash = payload_hash(&unknown.data).to_vec();
        let err = w.add(a, &unknown).expect_err("unknown format");
        assert!(err.to_string().contains("format 9"), "{err}");
    }
    let store = Store::open(dir.path()).expect("reopen");
    assert_eq!(store.last_seq().0, 2);
    // "one" and "two", stored once each, survive the reopen in the counter.
    assert_eq!(store.status().expect("status").stored_bytes, 2 * 44);
    let ids = [ChunkId::of(b"one"), ChunkId::of(b"two"), ChunkId::of(b"three")];
    assert_eq!(store.missing(a, &ids).expect("missing"), vec![ids[2]]);
    // Another account sees none of them.
    assert_eq!(store.missing(b, &ids).expect("missing").len(), 3);
    assert!(store.read_chunk(b, ids[0]).expect("read").is_none());
    assert!(store.verify(a, None).expect("verify").is_clean());
}

#[test]
fn a_run_of_chunks_reads_in_order_across_packs_and_stops_when_told() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let a = AccountId(1);
    // Two packs, so the reader moves from one to the other and back.
    put(&store, a, &[chunk(b"p1-a"), chunk(b"p1-b")]).expect("put");
    put(&store, a, &[chunk(b"p2-a")]).expect("put");
    let names: [&[u8]; 5] = [b"p1-a", b"p2-a", b"absent", b"p1-b", b"p2-a"];
    let ids: Vec<ChunkId> = names.iter().map(|n| ChunkId::of(n)).collect();
    let mut seen = Vec::new();
    store
        .read_chunks(a, &ids, |id, found| {
            let found = found.expect("read");
            if let Some(c) = &found {
                assert_eq!(c.id, id);
                assert_eq!(c.data, chunk(names[seen.len()]).data.to_vec());
            }
            seen.push(found.is_some());
            true
        })
        .expect("read_chunks");
    assert_eq!(seen, [true, true, false, true, true]);
    // Another account reads none of them; `false` stops at once.
    let mut calls = 0;
    store
        .read_chunks(AccountId(2), &ids, |_, found| {
            assert!(found.expect("read").is_none());
            calls += 1;
            false
        })
        .expect("read_chunks");
    assert_eq!(calls, 1);
}

#[test]
fn snapshot_commits_only_when_its_manifest_is_held() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let a = AccountId(1);
    let m = chunk(b"manifest");
    let id = ChunkId::from_bytes(&m.id).expect("id");
    let new = |ids: Vec<ChunkId>| NewSnapshot {
        manifest_chunks: ids,
        summary: vec![1, 2, 3],
        reference_blobs: vec![],
    };
    assert!(matches!(
        store.commit_snapshot(a, new(vec![id])),
        Err(StoreError::MissingChunks { count: 1, .. })
    ));
    assert!(store.list_snapshots(a).expect("list").is_empty());
    put(&store, a, std::slice::from_ref(&m)).expect("put manifest");
    // Naming one chunk many times costs one lookup, and the order is kept.
    let info = store.commit_snapshot(a, new(vec![id; 256])).expect("commit");
    assert_eq!(info.manifest_chunks.len(), 256);
    assert_eq!(info.summary, vec![1, 2, 3]);
    assert_eq!(store.get_snapshot(a, &info.id[..8]).expect("prefix").id, info.id);
    assert_eq!(store.get_snapshot(a, "latest").expect("latest").id, info.id);
    assert!(store.get_snapshot(AccountId(2), &info.id).is_err());
    assert!(store.verify(a, Some(&info.id)).expect("verify").is_clean());
    assert!(matches!(
        store.commit_snapshot(a, new(Vec::new())),
        Err(StoreError::Invalid(_))
    ));
}

#[test]
fn a_data_dir_of_another_format_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(Store::open(dir.path()).expect("open"));
    {
        let db = redb::Database::create(dir.path().join("meta.redb")).expect("db");
        let txn = db.begin_write().expect("txn");
        txn.open_table(super::tables::META)
            .expect("meta")
            .insert(super::tables::FORMAT_KEY, 1u64.to_le_bytes().as_slice())
            .expect("insert");
        txn.commit().expect("commit");
    }
    let err = Store::open(dir.path()).err().expect("refused");
    assert!(err.to_string().contains("data format 1"), "{err}");
}

#[test]
fn usage_counts_each_accounts_new_bytes_and_newest_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (AccountId(1), AccountId(2));
    let info = {
        let store = Store::open(dir.path()).expect("open");
        put(&store, a, &[chunk(b"one"), chunk(b"two")]).expect("put");
        // A repeat adds nothing; the same bytes under another account count there.
        put(&store, a, &[chunk(b"one")]).expect("put");
        put(&store, b, &[chunk(b"one")]).expect("put");
        let m = ChunkId::of(b"one");
        store
            .commit_snapshot(
                a,
                NewSnapshot {
                    manifest_chunks: vec![m],
                    summary: vec![],
                    reference_blobs: vec![],
                },
            )
            .expect("commit")
    };
    let store = Store::open(dir.path()).expect("reopen");
    let usage = store.usage().expect("usage");
    assert_eq!(usage.len(), 2);
    assert_eq!((usage[0].account, usage[0].stored_bytes), (a, 2 * 44));
    assert_eq!(usage[0].last_backup_unix_ms, info.time_unix_ms);
    assert_eq!((usage[1].account, usage[1].stored_bytes), (b, 44));
    assert_eq!(usage[1].last_backup_unix_ms, 0);
}

#[test]
fn usage_is_rebuilt_for_a_data_dir_written_before_it_was_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = AccountId(7);
    {
        let store = Store::open(dir.path()).expect("open");
        put(&store, a, &[chunk(b"one"), chunk(b"two")]).expect("put");
        // What an older build left: chunks indexed, no usage rows.
        let txn = store.db.begin_write().expect("txn");
        txn.delete_table(super::usage::ACCOUNTS).expect("drop usage");
        txn.commit().expect("commit");
    }
    let store = Store::open(dir.path()).expect("reopen");
    let usage = store.usage().expect("usage");
    assert_eq!(usage.len(), 1);
    assert_eq!((usage[0].account, usage[0].stored_bytes), (a, 2 * 44));
}

/// A committed snapshot as a mirror brings it to another server.
fn mirrored(store: &Store, account: AccountId, manifest: &Chunk) -> duplex_proto::v1::ChangeRecord {
    put(store, account, std::slice::from_ref(manifest)).expect("put manifest");
    let id = ChunkId::from_bytes(&manifest.id).expect("id");
    let info = store
        .commit_snapshot(
            account,
            NewSnapshot {
                manifest_chunks: vec![id],
                summary: vec![1],
                reference_blobs: vec![],
            },
        )
        .expect("commit");
    let (records, _) = store.feed_after(duplex_types::Seq(0), "", 1000).expect("feed");
    records
        .into_iter()
        .find(|r| matches!(&r.change, Some(duplex_proto::v1::change_record::Change::Snapshot(s)) if s.id == info.id))
        .expect("the snapshot's feed record")
}

fn apply(store: &Store, records: &[duplex_proto::v1::ChangeRecord], seq: u64) {
    let mut w = store.begin_pack().expect("pack");
    let checkpoint = duplex_proto::v1::Checkpoint {
        source_id: "source".into(),
        seq,
    };
    store.commit_mirror(&mut w, records, &checkpoint).expect("apply");
}

#[test]
fn a_deleted_snapshot_is_mirrored_and_never_comes_back() {
    let (dir_a, dir_b) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let (a, b) = (
        Store::open(dir_a.path()).expect("a"),
        Store::open(dir_b.path()).expect("b"),
    );
    let account = AccountId(1);
    let created = mirrored(&a, account, &chunk(b"manifest"));
    let Some(duplex_proto::v1::change_record::Change::Snapshot(info)) = &created.change else {
        unreachable!("found as a snapshot record")
    };
    let id = duplex_types::SnapshotId::parse(&info.id).expect("id");
    put(&b, account, &[chunk(b"manifest")]).expect("put on b");
    apply(&b, std::slice::from_ref(&created), 1);
    assert_eq!(b.list_snapshots(account).expect("list").len(), 1);

    assert_eq!(a.delete_snapshots(account, &[id]).expect("delete"), vec![id]);
    assert!(a.list_snapshots(account).expect("list").is_empty());
    // Deleting again is not an error and deletes nothing; an unknown id is.
    assert!(a.delete_snapshots(account, &[id]).expect("again").is_empty());
    let unknown = duplex_types::SnapshotId::generate();
    assert!(matches!(
        a.delete_snapshots(account, &[unknown]),
        Err(StoreError::NotFound(_))
    ));

    let (records, _) = a.feed_after(duplex_types::Seq(0), "", 1000).expect("feed");
    let deletion: Vec<_> = records
        .into_iter()
        .filter(|r| {
            matches!(
                r.change,
                Some(duplex_proto::v1::change_record::Change::SnapshotDeleted(_))
            )
        })
        .collect();
    assert_eq!(deletion.len(), 1, "one deletion record, not one per call");
    assert_eq!(deletion[0].origin, a.server_id().to_string());
    apply(&b, &deletion, 2);
    assert!(b.list_snapshots(account).expect("list").is_empty());
    // A backlog replaying the creation (a link from an old checkpoint)
    // does not bring the snapshot back, on either server.
    apply(&b, std::slice::from_ref(&created), 3);
    assert!(b.list_snapshots(account).expect("list").is_empty());
    let before = b.last_seq();
    apply(&b, &deletion, 4);
    assert_eq!(
        b.last_seq(),
        before,
        "a deletion seen before is not recorded twice"
    );
}

/// A cold pack (a mirrored or compacted copy) is dropped from the page
/// cache after each sync: what it wrote in several commits reads back
/// whole, from disk, with nothing lost at the commit boundaries.
#[test]
fn a_cold_pack_reads_back_across_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let a = AccountId(1);
    let names: Vec<Vec<u8>> = (0..30).map(|i| format!("cold chunk {i}").into_bytes()).collect();
    let mut w = store.begin_cold_pack().expect("pack");
    for batch in names.chunks(7) {
        for name in batch {
            w.add(a, &chunk(name)).expect("add");
        }
        store.commit_pack(&mut w, a, None).expect("commit");
    }
    for name in &names {
        let stored = store
            .read_chunk(a, ChunkId::of(name))
            .expect("read")
            .expect("present");
        assert_eq!(stored.data, chunk(name).data, "{}", String::from_utf8_lossy(name));
    }
}

#[test]
fn a_full_upload_pack_is_closed_and_the_upload_goes_on_in_a_new_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = AccountId(1);
    let store = Store::open(dir.path()).expect("open");
    let mut w = store.begin_pack().expect("pack");
    let first = w.pack();
    w.add(a, &chunk(b"one")).expect("add");
    // Not rolled while anything appended is uncommitted.
    store.roll_at(&mut w, 1).expect("roll");
    assert_eq!(w.pack(), first);
    store.commit_pack(&mut w, a, None).expect("commit");
    store.roll_at(&mut w, u64::MAX).expect("roll");
    assert_eq!(w.pack(), first, "not rolled below the limit");
    store.roll_at(&mut w, 1).expect("roll");
    let second = w.pack();
    assert_ne!(second, first);
    let active = super::packs::lock(&store.active).expect("lock").clone();
    assert!(!active.contains(&first), "the full pack is left to compaction");
    assert!(active.contains(&second));
    w.add(a, &chunk(b"two")).expect("add");
    store.commit_pack(&mut w, a, None).expect("commit");
    drop(w);
    drop(store);
    let store = Store::open(dir.path()).expect("reopen");
    for name in [&b"one"[..], b"two"] {
        let read = store
            .read_chunk(a, ChunkId::of(name))
            .expect("read")
            .expect("found");
        assert_eq!(read.id, ChunkId::of(name));
    }
}
