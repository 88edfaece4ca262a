//! The coordinator's etcd store against a real etcd: a state write holds
//! only while its coordinator still leads, so a deposed leader's late write
//! changes nothing, whatever it still believes; security records are
//! compare-and-swap, and the security version only grows.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::{Duration, Instant};

use duplex_coordinator::store::etcd::LEADER_KEY;
use duplex_coordinator::store::{Commit, EtcdStore, Store, StoreError};
use duplex_etcd::{Etcd, absent, put};
use duplex_proto::v1::{ClusterState, Operation};
use duplex_tests::etcd::{EtcdServer, start};

async fn ready(server: &EtcdServer) -> Etcd {
    let etcd = Etcd::connect(std::slice::from_ref(&server.url)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while etcd.get(b"/ready").await.is_err() {
        assert!(Instant::now() < deadline, "etcd at {} never answered", server.url);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    etcd
}

/// Takes the leader key under a new lease: (the lease, the fence).
async fn lead(etcd: &Etcd, who: &str) -> (i64, i64) {
    let lease = etcd.grant(Duration::from_secs(30)).await.unwrap();
    let won = etcd
        .txn(
            vec![absent(LEADER_KEY.as_bytes())],
            vec![put(LEADER_KEY.as_bytes(), who.as_bytes().to_vec(), lease)],
            Vec::new(),
        )
        .await
        .unwrap();
    assert!(won.succeeded, "{who} finds the leader key free");
    let fence = etcd
        .get(LEADER_KEY.as_bytes())
        .await
        .unwrap()
        .unwrap()
        .create_revision;
    (lease, fence)
}

fn store(etcd: &Etcd, fence: i64) -> Store {
    Store::Etcd(Box::new(EtcdStore::new(
        etcd.clone(),
        Arc::new(AtomicI64::new(fence)),
    )))
}

fn epoch(epoch: u64, op: u64) -> Commit {
    Commit {
        cluster: Some(ClusterState {
            epoch,
            ..Default::default()
        }),
        operations: vec![Operation {
            id: op,
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deposed_leaders_write_is_refused_and_changes_nothing() {
    let Some(server) = start() else { return };
    let etcd = ready(&server).await;
    let (lease_a, fence_a) = lead(&etcd, "a").await;
    let a = store(&etcd, fence_a);
    a.commit(&epoch(1, 1)).unwrap();

    // a's lease ends (as when it stops renewing): b wins the key.
    etcd.revoke(lease_a).await.unwrap();
    let (_, fence_b) = lead(&etcd, "b").await;
    assert!(fence_b > fence_a);
    let b = store(&etcd, fence_b);

    // a still believes it leads; etcd refuses its write, whole.
    assert!(matches!(a.commit(&epoch(99, 2)), Err(StoreError::NotLeader)));
    let loaded = b.load().unwrap();
    assert_eq!(
        loaded.cluster.epoch, 1,
        "the deposed leader's epoch was not written"
    );
    assert_eq!(loaded.next_operation_id, 2, "nor its operation");

    // The new leader goes on from what it loaded.
    b.commit(&epoch(2, 2)).unwrap();
    assert_eq!(
        a.load().unwrap().cluster.epoch,
        2,
        "every coordinator reads the same state"
    );

    // A coordinator that does not lead never writes.
    let follower = store(&etcd, 0);
    assert!(matches!(
        follower.commit(&epoch(3, 3)),
        Err(StoreError::NotLeader)
    ));
    assert_eq!(b.load().unwrap().cluster.epoch, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn security_records_are_compare_and_swap_and_their_version_only_grows() {
    use duplex_coordinator::store::OperatorRecord;
    let Some(server) = start() else { return };
    let etcd = ready(&server).await;
    let (_, fence) = lead(&etcd, "a").await;
    let (one, other) = (store(&etcd, fence), store(&etcd, 0));
    let version = |s: &Store| s.security_records().unwrap().version;
    let record = |name: &str| OperatorRecord {
        name: name.to_owned(),
        role: duplex_types::OperatorRole::Viewer,
        token_hash: [7; 32],
        created_unix_ms: 1,
    };
    let v0 = version(&one);
    assert!(one.add_operator(&record("alice")).unwrap());
    // The same name from another coordinator: refused, not overwritten.
    assert!(!other.add_operator(&record("alice")).unwrap());
    let v1 = version(&other);
    assert!(v1 > v0, "adding an operator is news to every server");
    assert!(other.remove_operator("alice").unwrap());
    assert!(!one.remove_operator("alice").unwrap(), "removed once only");
    let v2 = version(&one);
    assert!(v2 > v1, "a removal raises the version too");
    assert!(one.security_records().unwrap().operators.is_empty());
}
