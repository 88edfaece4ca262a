//! Against a real etcd (Debian's `etcd-server`, started here on loopback):
//! the calls the coordinator's state and election rely on.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use duplex_etcd::{Etcd, absent, created_at, modified_at, put};
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

#[tokio::test]
async fn transactions_fence_writes_and_no_update_is_lost() {
    let Some(server) = start() else { return };
    let etcd = ready(&server).await;
    let leader = b"/duplex/v1/leader";
    // Two campaigns for one key: only the first wins.
    let first = etcd
        .txn(
            vec![absent(leader)],
            vec![put(leader, b"one".to_vec(), 0)],
            vec![],
        )
        .await
        .unwrap();
    assert!(first.succeeded);
    let second = etcd
        .txn(
            vec![absent(leader)],
            vec![put(leader, b"two".to_vec(), 0)],
            vec![],
        )
        .await
        .unwrap();
    assert!(!second.succeeded);
    let won = etcd.get(leader).await.unwrap().unwrap();
    assert_eq!(won.value, b"one");
    // A write fenced by the key the leader won with succeeds while it holds...
    let state = b"/duplex/v1/cluster";
    let fenced = |rev| vec![created_at(leader, rev)];
    let ok = etcd
        .txn(
            fenced(won.create_revision),
            vec![put(state, b"epoch 1".to_vec(), 0)],
            vec![],
        )
        .await
        .unwrap();
    assert!(ok.succeeded);
    // ...and not once the key was won again by someone else.
    etcd.txn(vec![], vec![duplex_etcd::delete(leader)], vec![])
        .await
        .unwrap();
    etcd.txn(
        vec![absent(leader)],
        vec![put(leader, b"three".to_vec(), 0)],
        vec![],
    )
    .await
    .unwrap();
    let stale = etcd
        .txn(
            fenced(won.create_revision),
            vec![put(state, b"epoch 0".to_vec(), 0)],
            vec![],
        )
        .await
        .unwrap();
    assert!(!stale.succeeded);
    // Read-modify-write against the revision read: a concurrent change wins.
    let read = etcd.get(state).await.unwrap().unwrap();
    etcd.txn(vec![], vec![put(state, b"epoch 2".to_vec(), 0)], vec![])
        .await
        .unwrap();
    let lost = etcd
        .txn(
            vec![modified_at(state, read.mod_revision)],
            vec![put(state, b"epoch 1b".to_vec(), 0)],
            vec![],
        )
        .await
        .unwrap();
    assert!(!lost.succeeded);
    assert_eq!(etcd.get(state).await.unwrap().unwrap().value, b"epoch 2");
}

#[tokio::test]
async fn a_key_on_a_lease_lives_while_renewed_and_goes_when_not() {
    let Some(server) = start() else { return };
    let etcd = ready(&server).await;
    let key = b"/duplex/v1/coordinators/c1";
    let lease = etcd.grant(Duration::from_secs(1)).await.unwrap();
    etcd.txn(vec![], vec![put(key, b"c1".to_vec(), lease)], vec![])
        .await
        .unwrap();
    let mut keep = etcd.keep_alive(lease).await.unwrap();
    let renewed_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < renewed_until {
        assert!(keep.renew().await.unwrap() > Duration::ZERO);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        etcd.get(key).await.unwrap().is_some(),
        "a renewed lease kept its key"
    );
    drop(keep);
    let deadline = Instant::now() + Duration::from_secs(10);
    while etcd.get(key).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the key outlived its lease");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone = etcd.grant(Duration::from_secs(30)).await.unwrap();
    etcd.txn(vec![], vec![put(b"/x", b"x".to_vec(), gone)], vec![])
        .await
        .unwrap();
    etcd.revoke(gone).await.unwrap();
    assert!(
        etcd.get(b"/x").await.unwrap().is_none(),
        "revoking a lease deletes its keys"
    );
}

#[tokio::test]
async fn a_watch_from_the_read_revision_misses_nothing() {
    let Some(server) = start() else { return };
    let etcd = ready(&server).await;
    let prefix = b"/duplex/v1/servers/";
    etcd.txn(
        vec![],
        vec![put(b"/duplex/v1/servers/a", b"a".to_vec(), 0)],
        vec![],
    )
    .await
    .unwrap();
    let (kvs, revision) = etcd.prefix(prefix).await.unwrap();
    assert_eq!(kvs.len(), 1);
    // Written after the read, before the watch opens: still seen.
    etcd.txn(
        vec![],
        vec![put(b"/duplex/v1/servers/b", b"b".to_vec(), 0)],
        vec![],
    )
    .await
    .unwrap();
    etcd.txn(
        vec![],
        vec![put(b"/duplex/v1/elsewhere", b"no".to_vec(), 0)],
        vec![],
    )
    .await
    .unwrap();
    let mut watch = etcd.watch(prefix, revision + 1).await.unwrap();
    let events = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap();
    let keys: Vec<Vec<u8>> = events
        .iter()
        .filter_map(|e| e.kv.as_ref().map(|kv| kv.key.clone()))
        .collect();
    assert_eq!(keys, vec![b"/duplex/v1/servers/b".to_vec()]);
}
