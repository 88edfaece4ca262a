use duplex_proto::v1::{Chunk, Compression, EntryKind, FileEntry, Manifest};
use duplex_types::{AccountId, ChunkId};
use prost::Message;

use super::snapshots::NewSnapshot;
use super::{Store, StoreError};

fn chunk(data: &[u8]) -> Chunk {
    Chunk {
        id: ChunkId::of(data).to_vec(),
        compression: Compression::None as i32,
        raw_len: data.len() as u32,
        data: data.to_vec().into(),
    }
}

fn put(store: &Store, account: AccountId, chunks: &[Chunk]) -> Result<super::PutStats, StoreError> {
    let mut w = store.begin_pack()?;
    for c in chunks {
        w.add(account, c)?;
    }
    store.commit_pack(&mut w)
}

fn manifest_chunk(entries: Vec<FileEntry>) -> Chunk {
    chunk(&Manifest { entries }.encode_to_vec())
}

fn file(path: &str, data: &[u8]) -> FileEntry {
    FileEntry {
        path: path.into(),
        kind: EntryKind::File as i32,
        mode: 0o644,
        size: data.len() as u64,
        mtime_ns: 0,
        chunks: vec![ChunkId::of(data).to_vec()],
        symlink_target: String::new(),
    }
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
        bad.data = b"tampered".to_vec().into();
        bad.raw_len = 8;
        let mut w = store.begin_pack().expect("pack");
        assert!(matches!(w.add(a, &bad), Err(StoreError::HashMismatch { .. })));
    }
    let store = Store::open(dir.path()).expect("reopen");
    assert_eq!(store.last_seq().0, 2);
    // "one" and "two", stored once each, survive the reopen in the counter.
    assert_eq!(store.status().expect("status").stored_bytes, 6);
    let ids = [ChunkId::of(b"one"), ChunkId::of(b"two"), ChunkId::of(b"three")];
    assert_eq!(store.missing(a, &ids).expect("missing"), vec![ids[2]]);
    // Another account sees none of them.
    assert_eq!(store.missing(b, &ids).expect("missing").len(), 3);
    assert!(store.read_chunk(b, ids[0]).expect("read").is_none());
}

#[test]
fn snapshot_commits_only_when_complete_and_clean() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let a = AccountId(1);
    let m = manifest_chunk(vec![file("x/data", b"payload")]);
    put(&store, a, std::slice::from_ref(&m)).expect("put manifest");
    let new = |m: &Chunk| NewSnapshot {
        manifest_chunks: vec![ChunkId::from_bytes(&m.id).expect("id")],
        paths: vec!["/src".into()],
        hostname: "h".into(),
    };
    assert!(matches!(
        store.commit_snapshot(a, new(&m)),
        Err(StoreError::MissingChunks { count: 1, .. })
    ));
    assert!(store.list_snapshots(a).expect("list").is_empty());
    put(&store, a, &[chunk(b"payload")]).expect("put data");
    let info = store.commit_snapshot(a, new(&m)).expect("commit");
    assert_eq!((info.files, info.bytes), (1, 7));
    assert_eq!(store.get_snapshot(a, &info.id[..8]).expect("prefix").id, info.id);
    assert_eq!(store.get_snapshot(a, "latest").expect("latest").id, info.id);
    assert!(store.get_snapshot(AccountId(2), &info.id).is_err());
    assert!(store.verify(a, Some(&info.id)).expect("verify").is_clean());

    let evil = manifest_chunk(vec![file("../x", b"payload")]);
    put(&store, a, std::slice::from_ref(&evil)).expect("put evil manifest");
    assert!(matches!(
        store.commit_snapshot(a, new(&evil)),
        Err(StoreError::Invalid(_))
    ));
}
