//! Per-account limits on the storage server's data API
//! (`--max-streams-per-account`, `--max-requests-per-account`): an account
//! over a limit is refused with RESOURCE_EXHAUSTED naming it and the flag
//! while another account is served; a forged ticket naming an account
//! spends nothing of its budget; the agent waits out a tight limit; and a
//! normal backup and restore never meet the defaults.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use duplex_proto::TICKET_METADATA_KEY;
use duplex_proto::v1::storage_service_client::StorageServiceClient;
use duplex_proto::v1::{Chunk, ListSnapshotsRequest, Purpose, PutChunksResponse, Ticket, TicketClaims};
use duplex_tests::tree::{assert_same_tree, mixed_tree};
use duplex_tests::{Cluster, runtime, scrape, wait_for};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

const MIB: usize = 1024 * 1024;
const DEADLINE: Duration = Duration::from_secs(30);

/// Logs in as the account with `token`: its id and ticket.
async fn login(cluster: &Cluster, token: &str, purpose: Purpose) -> (u64, Vec<u8>) {
    let response = duplex_tests::login(&cluster.account.addr, token, purpose).await;
    (response.account.unwrap().id, response.ticket)
}

fn with_ticket<T>(message: T, ticket: &[u8]) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert_bin(TICKET_METADATA_KEY, MetadataValue::from_bytes(ticket));
    request
}

async fn list_snapshots(cluster: &Cluster, ticket: &[u8]) -> Result<(), Status> {
    let channel = duplex_rpc::channel(&cluster.storage.addr).unwrap();
    StorageServiceClient::new(channel)
        .list_snapshots(with_ticket(ListSnapshotsRequest {}, ticket))
        .await
        .map(|_| ())
}

/// `duplex_account_limited_total{limit=LIMIT}` from the storage server's `/metrics`.
fn limited(cluster: &Cluster, limit: &str) -> u64 {
    let metrics = scrape(&cluster.storage.addr);
    let series = format!("duplex_account_limited_total{{limit=\"{limit}\",server=\"storage-a\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{metrics}"))
        .parse()
        .unwrap()
}

/// An upload that holds one of the account's places until its sender is
/// dropped: the server waits for chunks that do not come.
fn hold_upload(
    rt: &tokio::runtime::Runtime,
    cluster: &Cluster,
    ticket: &[u8],
) -> (
    mpsc::Sender<Chunk>,
    tokio::task::JoinHandle<Result<tonic::Response<PutChunksResponse>, Status>>,
) {
    let (tx, rx) = mpsc::channel::<Chunk>(1);
    let request = with_ticket(ReceiverStream::new(rx), ticket);
    let addr = cluster.storage.addr.clone();
    let upload = rt.spawn(async move {
        let channel = duplex_rpc::channel(&addr).unwrap();
        StorageServiceClient::new(channel).put_chunks(request).await
    });
    (tx, upload)
}

#[test]
fn an_account_at_its_stream_limit_is_refused_while_another_is_served() {
    let cluster = Cluster::start_with(&["--max-streams-per-account", "2"]);
    let alice = cluster.create_account("alice", None);
    let bob = cluster.create_account("bob", None);
    let rt = runtime();
    let (alice_id, alice_ticket) = rt.block_on(login(&cluster, &alice, Purpose::Backup));
    let (_, bob_ticket) = rt.block_on(login(&cluster, &bob, Purpose::Read));

    // Two uploads held open: the server waits for chunks that do not come.
    let hold = || hold_upload(&rt, &cluster, &alice_ticket);
    let mut held = vec![hold(), hold()];
    // The probe is one of alice's calls too: while an upload is still on
    // its way, the probe may take its place and the upload be the one
    // refused. Such an upload is sent again; a refused probe means both
    // uploads are in.
    let refusal = wait_for("alice's third call to be refused", DEADLINE, || {
        for slot in &mut held {
            if slot.1.is_finished() {
                let refused = rt
                    .block_on(&mut slot.1)
                    .unwrap()
                    .expect_err("an upload with no end");
                assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
                *slot = hold();
            }
        }
        rt.block_on(list_snapshots(&cluster, &alice_ticket)).err()
    });
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    let message = refusal.message();
    assert!(
        message.starts_with(&format!("account {alice_id} has 2 calls in flight"))
            && message.contains("--max-streams-per-account"),
        "{message}"
    );
    // At the same moment, bob is served: alice's calls are hers alone.
    for _ in 0..5 {
        rt.block_on(list_snapshots(&cluster, &bob_ticket))
            .expect("bob is not limited by alice's calls");
    }
    assert!(
        rt.block_on(list_snapshots(&cluster, &alice_ticket)).is_err(),
        "alice still holds both places"
    );
    assert!(limited(&cluster, "streams") >= 1);
    assert_eq!(limited(&cluster, "rate"), 0);

    // An upload that finishes gives its place back.
    let (tx, upload) = held.pop().unwrap();
    drop(tx);
    rt.block_on(upload).unwrap().expect("an empty upload succeeds");
    wait_for("alice to be served again", DEADLINE, || {
        rt.block_on(list_snapshots(&cluster, &alice_ticket)).ok()
    });
    drop(held);
}

#[test]
fn forged_tickets_spend_nothing_of_the_account_they_name() {
    let cluster = Cluster::start_with(&["--max-requests-per-account", "5"]);
    let mallory = cluster.create_account("mallory", None);
    let bob = cluster.create_account("bob", None);
    let rt = runtime();
    let (_, mallory_ticket) = rt.block_on(login(&cluster, &mallory, Purpose::Read));
    let (bob_id, bob_ticket) = rt.block_on(login(&cluster, &bob, Purpose::Read));

    // Mallory's own ticket rewritten to name bob: the signature no longer
    // matches, so it is not bob's, and must not count as bob's.
    let mut forged = Ticket::decode(mallory_ticket.as_slice()).unwrap();
    let mut claims = TicketClaims::decode(forged.claims.as_slice()).unwrap();
    claims.account_id = bob_id;
    claims.account_name = "bob".into();
    forged.claims = claims.encode_to_vec();
    let forged = forged.encode_to_vec();
    for i in 0..50 {
        let refused = rt
            .block_on(list_snapshots(&cluster, &forged))
            .expect_err("a forged ticket");
        assert_eq!(
            refused.code(),
            Code::Unauthenticated,
            "forged call {i}: {refused:?}"
        );
    }
    assert_eq!(limited(&cluster, "rate"), 0);

    // Bob's whole burst is still his; then the rate limit names him.
    let mut served = 0;
    let refusal = wait_for("bob's calls to reach the rate limit", DEADLINE, || {
        match rt.block_on(list_snapshots(&cluster, &bob_ticket)) {
            Ok(()) => {
                served += 1;
                None
            }
            Err(status) => Some(status),
        }
    });
    assert!(served >= 5, "only {served} calls before the limit");
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert!(
        refusal
            .message()
            .starts_with(&format!("account {bob_id} made 5 requests")),
        "{}",
        refusal.message()
    );
    assert!(refusal.message().contains("--max-requests-per-account"));
    // Mallory's own budget is untouched by bob's.
    rt.block_on(list_snapshots(&cluster, &mallory_ticket))
        .expect("mallory has her own budget");
    assert!(limited(&cluster, "rate") >= 1);
}

#[test]
fn a_backup_and_restore_never_meet_the_default_limits() {
    let cluster = Cluster::start();
    let token = cluster.create_account("carol", None);
    let src = cluster.path("data");
    mixed_tree(&src, 24 * MIB);
    let snapshot = cluster.backup(&token, &src)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let target = cluster.restore(&token, &snapshot, "restored");
    assert_same_tree(&src, &target.join("data"));
    assert_eq!(limited(&cluster, "streams"), 0);
    assert_eq!(limited(&cluster, "rate"), 0);
}

#[test]
fn a_throttled_agent_waits_and_still_restores_bit_for_bit() {
    // Three places: two upload streams and one chunk query at a time, so
    // the agent's other chunking threads are refused and must wait; two
    // requests a second (a burst of two), so the restore's three quick
    // calls (the snapshot, the manifest, the files' chunks, which small
    // files share) meet the rate too.
    let cluster = Cluster::start_with(&[
        "--max-streams-per-account",
        "3",
        "--max-requests-per-account",
        "2",
    ]);
    let token = cluster.create_account("dan", None);
    let src = cluster.path("data");
    mixed_tree(&src, 4 * MIB);
    let snapshot = cluster.backup(&token, &src)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = limited(&cluster, "rate");
    let target = cluster.restore(&token, &snapshot, "restored");
    assert_same_tree(&src, &target.join("data"));
    assert!(
        limited(&cluster, "rate") > before,
        "the restore never met 2 requests a second"
    );
}

#[test]
fn an_agent_whose_upload_stream_is_refused_tries_again_and_the_backup_restores() {
    // Three places, two of them held by uploads that never end: the
    // agent's first upload stream takes the last place and its second is
    // refused, each attempt, until the held ones are let go.
    let cluster = Cluster::start_with(&["--max-streams-per-account", "3"]);
    let token = cluster.create_account("erin", None);
    let rt = runtime();
    let (_, ticket) = rt.block_on(login(&cluster, &token, Purpose::Backup));
    let hold = || hold_upload(&rt, &cluster, &ticket);
    // Held until a probe is refused: then all three places are taken,
    // and letting one go leaves exactly one for the agent.
    let mut held = vec![hold(), hold(), hold()];
    wait_for("erin's three places to be taken", DEADLINE, || {
        for slot in &mut held {
            if slot.1.is_finished() {
                *slot = hold();
            }
        }
        rt.block_on(list_snapshots(&cluster, &ticket)).err()
    });
    drop(held.pop());
    let src = cluster.path("data");
    mixed_tree(&src, 4 * MIB);
    let before = limited(&cluster, "streams");
    let snapshot = std::thread::scope(|scope| {
        let backup = scope.spawn(|| cluster.backup(&token, &src));
        wait_for("the agent to meet the stream limit", DEADLINE, || {
            (limited(&cluster, "streams") > before).then_some(())
        });
        assert!(
            !backup.is_finished(),
            "the backup ended while the account was at its limit"
        );
        drop(held);
        backup.join().unwrap()["snapshot"].as_str().unwrap().to_owned()
    });
    let target = cluster.restore(&token, &snapshot, "restored");
    assert_same_tree(&src, &target.join("data"));
}
