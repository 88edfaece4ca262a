//! Authentication, isolation between accounts, disabled groups, chunk
//! payload verification, bounded commits and restore path safety.

#![allow(clippy::unwrap_used)]

use std::pin::Pin;

use duplex_agent::crypto::Keys;
use duplex_proto::v1::account_service_client::AccountServiceClient;
use duplex_proto::v1::storage_service_client::StorageServiceClient;
use duplex_proto::v1::storage_service_server::{StorageService, StorageServiceServer};
use duplex_proto::v1::{
    Chunk, CommitSnapshotRequest, EntryKind, FileEntry, GetChunksRequest, GetKeysRequest, GetSnapshotRequest,
    ListSnapshotsRequest, ListSnapshotsResponse, Manifest, MissingChunksRequest, MissingChunksResponse,
    Purpose, PutChunksResponse, SnapshotInfo, VerifyRequest, VerifyResponse,
};
use duplex_tests::cluster::TEST_PASSPHRASE;
use duplex_tests::tree::random_bytes;
use duplex_tests::{Cluster, WithTicket, opaque_chunk, runtime};
use duplex_types::ChunkId;
use duplex_types::sealed::payload_hash;
use prost::Message;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bogus_token_is_unauthenticated() {
    let cluster = Cluster::start();
    let out = cluster.duplex("dpx_not-a-real-token", &["snapshots"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("Unauthenticated"), "{}", stderr(&out));

    // And straight at the storage server: no ticket, or a forged one.
    runtime().block_on(async {
        let mut storage = StorageServiceClient::new(duplex_rpc::channel(&cluster.storage.addr).unwrap());
        let err = storage.list_snapshots(ListSnapshotsRequest {}).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let mut req = Request::new(ListSnapshotsRequest {});
        req.metadata_mut().insert_bin(
            duplex_proto::TICKET_METADATA_KEY,
            MetadataValue::from_bytes(b"forged"),
        );
        let err = storage.list_snapshots(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    });
}

#[test]
fn one_account_cannot_see_or_restore_anothers_snapshot() {
    let cluster = Cluster::start();
    let alice = cluster.create_account("alice", None);
    let mallory = cluster.create_account("mallory", None);
    let src = cluster.path("secret");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("diary"), random_bytes(1, 300_000)).unwrap();
    let snapshot = cluster.backup(&alice, &src)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();

    let listed = cluster.duplex_json(&mallory, &["snapshots"]);
    assert_eq!(listed["snapshots"].as_array().unwrap().len(), 0, "{listed}");

    let target = cluster.path("stolen");
    let out = cluster.duplex(
        &mallory,
        &["restore", &snapshot, "--target", target.to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("NotFound"), "{}", stderr(&out));
    assert!(!target.join("secret/diary").exists());

    // Even knowing alice's chunk ids, mallory's account holds none of them.
    let id = ChunkId::of(&random_bytes(1, 300_000));
    runtime().block_on(async {
        let (mut storage, _) = login(&cluster, &mallory, Purpose::Read).await;
        let missing = storage
            .missing_chunks(MissingChunksRequest {
                ids: vec![id.to_vec()],
            })
            .await
            .unwrap()
            .into_inner()
            .missing;
        assert_eq!(missing.len(), 1);
        let err = storage
            .get_chunks(GetChunksRequest {
                ids: vec![id.to_vec()],
            })
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
    });
}

#[test]
fn disabled_group_refuses_backups_naming_the_group() {
    let cluster = Cluster::start();
    let token = cluster.create_account("carol", Some("finance"));
    let src = cluster.path("data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"ledger").unwrap();
    cluster.backup(&token, &src);

    let out = cluster.ctl(&["groups", "disable", "finance"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cluster.duplex(&token, &["backup", src.to_str().unwrap()]);
    assert!(!out.status.success(), "backup of a disabled group succeeded");
    assert!(stderr(&out).contains("\"finance\""), "{}", stderr(&out));
    // Reads still work while backups are blocked.
    assert_eq!(
        cluster.duplex_json(&token, &["snapshots"])["snapshots"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let groups: serde_json::Value =
        serde_json::from_slice(&cluster.ctl(&["groups", "list", "--json"]).stdout).unwrap();
    let finance = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "finance")
        .unwrap()
        .clone();
    assert_eq!(finance["enabled"], false);

    assert!(cluster.ctl(&["groups", "enable", "finance"]).status.success());
    cluster.backup(&token, &src);
}

async fn login(
    cluster: &Cluster,
    token: &str,
    purpose: Purpose,
) -> (
    StorageServiceClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, WithTicket>,
    >,
    Vec<u8>,
) {
    let ticket = duplex_tests::login(&cluster.account.addr, token, purpose)
        .await
        .ticket;
    let storage = StorageServiceClient::with_interceptor(
        duplex_rpc::channel(&cluster.storage.addr).unwrap(),
        WithTicket::new(&ticket),
    );
    (storage, ticket)
}

#[test]
fn a_chunk_that_does_not_match_its_hash_is_refused_and_not_stored() {
    let cluster = Cluster::start();
    let token = cluster.create_account("dave", None);
    runtime().block_on(async {
        let (mut storage, _) = login(&cluster, &token, Purpose::Backup).await;
        let mut lie = opaque_chunk(b"what the client claims");
        lie.data = b"\x01 other data, long enough to look like a sealed payload"
            .to_vec()
            .into();
        let claimed = lie.id.clone();
        let err = storage
            .put_chunks(futures::stream::iter(vec![lie]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::DataLoss, "{err}");
        assert!(
            err.message()
                .contains(&ChunkId::from_bytes(&claimed).unwrap().to_string()),
            "{err}"
        );
        let missing = storage
            .missing_chunks(MissingChunksRequest {
                ids: vec![claimed.clone()],
            })
            .await
            .unwrap()
            .into_inner()
            .missing;
        assert_eq!(missing, vec![claimed], "the refused chunk was stored");

        // A payload of a format the server does not know is refused clearly.
        let mut future = opaque_chunk(b"from a future agent");
        let mut data = future.data.to_vec();
        data[0] = 42;
        future.data_hash = payload_hash(&data).to_vec();
        future.data = data.into();
        let err = storage
            .put_chunks(futures::stream::iter(vec![future]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        assert!(err.message().contains("format 42"), "{err}");
    });
}

#[test]
fn a_commit_checks_every_reference_and_stays_bounded() {
    let cluster = Cluster::start();
    let token = cluster.create_account("erin", None);
    runtime().block_on(async {
        let (mut storage, _) = login(&cluster, &token, Purpose::Backup).await;
        let held = opaque_chunk(b"a manifest piece");
        let id = held.id.clone();
        storage
            .put_chunks(futures::stream::iter(vec![held]))
            .await
            .unwrap();
        // The attack: one chunk named many times. The server never
        // loads chunk data for a commit, so this costs one index lookup.
        let info = storage
            .commit_snapshot(CommitSnapshotRequest {
                manifest_chunks: vec![id.clone(); 100_000],
                summary: vec![9; 100],
                references_listed: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.manifest_chunks.len(), 100_000);
        let stored = storage
            .get_snapshot(GetSnapshotRequest { id: info.id.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stored.summary, vec![9; 100], "the summary is stored opaque");
        // A chunk it does not hold is refused, naming it.
        let absent = ChunkId::of(b"never uploaded");
        let err = storage
            .commit_snapshot(CommitSnapshotRequest {
                manifest_chunks: vec![id.clone(), absent.to_vec()],
                summary: vec![],
                references_listed: true,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
        assert!(err.message().contains(&absent.to_string()), "{err}");
        // So is one whose reference blob lists a chunk it does not hold:
        // the server reads the blob and checks every id in it.
        let (blob_id, blob) = duplex_types::refs::encode(&[absent]).remove(0);
        storage
            .put_chunks(futures::stream::iter(vec![Chunk {
                id: blob_id.to_vec(),
                data_hash: payload_hash(&blob).to_vec(),
                data: blob.into(),
            }]))
            .await
            .unwrap();
        let err = storage
            .commit_snapshot(CommitSnapshotRequest {
                manifest_chunks: vec![id.clone()],
                reference_blobs: vec![blob_id.to_vec()],
                references_listed: true,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
        assert!(err.message().contains(&absent.to_string()), "{err}");
        assert!(duplex_rpc::client::is_missing_chunks(&err), "{err:?}");
        // An agent that lists no references could not have its chunks
        // kept by garbage collection: refused, saying why.
        let err = storage
            .commit_snapshot(CommitSnapshotRequest {
                manifest_chunks: vec![id.clone()],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(err.message().contains("upgrade the agent"), "{err}");
        // An oversized summary is refused, naming the limit.
        let err = storage
            .commit_snapshot(CommitSnapshotRequest {
                manifest_chunks: vec![id],
                summary: vec![0; 2 * 1024 * 1024],
                references_listed: true,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    });
}

fn manifest_with(entries: Vec<FileEntry>) -> Vec<u8> {
    Manifest { entries }.encode_to_vec()
}

fn file_entry(keys: &Keys, path: &str, data: &[u8]) -> FileEntry {
    FileEntry {
        path: path.into(),
        kind: EntryKind::File as i32,
        mode: 0o644,
        size: data.len() as u64,
        mtime_ns: 0,
        chunks: vec![keys.chunk_id(data).to_vec()],
        ..Default::default()
    }
}

fn symlink_entry(path: &str, target: &str) -> FileEntry {
    FileEntry {
        path: path.into(),
        kind: EntryKind::Symlink as i32,
        mode: 0o777,
        size: 0,
        mtime_ns: 0,
        symlink_target: target.into(),
        ..Default::default()
    }
}

fn dir_entry(path: &str) -> FileEntry {
    FileEntry {
        path: path.into(),
        kind: EntryKind::Dir as i32,
        mode: 0o755,
        ..Default::default()
    }
}

/// The account's keys, opened with the harness's passphrase: what a
/// rogue server would need (and does not have) to forge a manifest.
fn account_keys(cluster: &Cluster, token: &str) -> Keys {
    runtime().block_on(async {
        let mut account = AccountServiceClient::new(duplex_rpc::channel(&cluster.account.addr).unwrap());
        let records = account
            .get_keys(GetKeysRequest {
                token: token.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .keys;
        duplex_agent::crypto::unwrap(&records[0], TEST_PASSPHRASE.as_bytes())
            .unwrap()
            .unwrap()
    })
}

/// A compromised storage server that serves whatever manifest it is given
/// (sealed with the account's key, as if the key had leaked too).
struct RogueStorage {
    chunks: Vec<Chunk>,
}

type ChunkStream = Pin<Box<dyn futures::Stream<Item = Result<Chunk, Status>> + Send>>;

#[tonic::async_trait]
impl StorageService for RogueStorage {
    async fn missing_chunks(
        &self,
        _: Request<MissingChunksRequest>,
    ) -> Result<Response<MissingChunksResponse>, Status> {
        Err(Status::unimplemented("rogue"))
    }
    async fn put_chunks(&self, _: Request<Streaming<Chunk>>) -> Result<Response<PutChunksResponse>, Status> {
        Err(Status::unimplemented("rogue"))
    }
    type GetChunksStream = ChunkStream;
    async fn get_chunks(&self, request: Request<GetChunksRequest>) -> Result<Response<ChunkStream>, Status> {
        let wanted = request.into_inner().ids;
        let found: Vec<Result<Chunk, Status>> = wanted
            .iter()
            .map(|id| {
                self.chunks
                    .iter()
                    .find(|c| c.id == *id)
                    .cloned()
                    .ok_or_else(|| Status::not_found("no such chunk"))
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(found))))
    }
    async fn commit_snapshot(
        &self,
        _: Request<CommitSnapshotRequest>,
    ) -> Result<Response<SnapshotInfo>, Status> {
        Err(Status::unimplemented("rogue"))
    }
    async fn list_snapshots(
        &self,
        _: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        Err(Status::unimplemented("rogue"))
    }
    async fn get_snapshot(&self, _: Request<GetSnapshotRequest>) -> Result<Response<SnapshotInfo>, Status> {
        let manifest = self.chunks.last().unwrap();
        Ok(Response::new(SnapshotInfo {
            id: "0".repeat(32),
            manifest_chunks: vec![manifest.id.clone()],
            ..Default::default()
        }))
    }
    async fn delete_snapshots(
        &self,
        _: Request<duplex_proto::v1::DeleteSnapshotsRequest>,
    ) -> Result<Response<duplex_proto::v1::DeleteSnapshotsResponse>, Status> {
        Err(Status::unimplemented("rogue"))
    }
    async fn verify(&self, _: Request<VerifyRequest>) -> Result<Response<VerifyResponse>, Status> {
        Err(Status::unimplemented("rogue"))
    }
}

/// Every path the restore wrote under `dir`, relative.
fn listing(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn restore_refuses_manifests_that_escape_the_target() {
    let cluster = Cluster::start();
    let token = cluster.create_account("frank", None);
    // A first backup creates the account's key.
    let first = cluster.path("first");
    std::fs::create_dir_all(&first).unwrap();
    std::fs::write(first.join("f"), b"x").unwrap();
    cluster.backup(&token, &first);
    let keys = account_keys(&cluster, &token);
    let rt = runtime();
    let outside = cluster.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let cases: Vec<(&str, Vec<FileEntry>)> = vec![
        ("parent", vec![file_entry(&keys, "../x", b"payload")]),
        (
            "absolute",
            vec![file_entry(&keys, &format!("{}/x", outside.display()), b"payload")],
        ),
        (
            "symlink",
            vec![
                symlink_entry("a", outside.to_str().unwrap()),
                file_entry(&keys, "a/x", b"payload"),
            ],
        ),
        (
            "dir-and-symlink-of-one-name",
            vec![
                dir_entry("a"),
                file_entry(&keys, "a/y", b"payload"),
                symlink_entry("a", outside.to_str().unwrap()),
                file_entry(&keys, "a/x", b"payload"),
            ],
        ),
    ];
    for (name, entries) in cases {
        let manifest = manifest_with(entries);
        let seal = |data: &[u8]| keys.seal_chunk(keys.chunk_id(data), data).unwrap();
        let rogue = RogueStorage {
            chunks: vec![seal(b"payload"), seal(&manifest)],
        };
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let server = rt.spawn(
            tonic::transport::Server::builder()
                .add_service(StorageServiceServer::new(rogue))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let case_dir = cluster.path(&format!("case-{name}"));
        let target = case_dir.join("target");
        let out = cluster.duplex(
            &token,
            &[
                "--storage",
                &format!("http://{addr}"),
                "restore",
                "latest",
                "--target",
                target.to_str().unwrap(),
            ],
        );
        server.abort();
        assert!(
            !out.status.success(),
            "{name}: restore of an escaping manifest succeeded"
        );
        assert!(
            stderr(&out).contains("refusing to restore"),
            "{name}: {}",
            stderr(&out)
        );
        assert!(
            listing(&outside).is_empty(),
            "{name}: wrote outside the target: {:?}",
            listing(&outside)
        );
        assert!(!cluster.path("x").exists(), "{name}: wrote ../x");
        let written: Vec<String> = if case_dir.exists() {
            listing(&case_dir)
        } else {
            vec![]
        };
        // The whole manifest is checked first: nothing at all is written.
        assert!(written.is_empty(), "{name}: unexpected files {written:?}");
    }
}
