//! The coordinator's write rate on each store, written to
//! docs/BENCHMARKS.md: state commits (one per phase start and end of an
//! operation) and enrollments (a token granted, then spent for a
//! certificate) per second, on the embedded redb file and on a one-member
//! etcd on loopback (Debian's `etcd-server`, started here). Both fsync
//! before they answer.
//!
//!     cargo bench -p duplex-coordinator --bench store

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::{Duration, Instant};

use duplex_coordinator::store::etcd::LEADER_KEY;
use duplex_coordinator::store::{Commit, EnrollOutcome, EnrollmentGrant, EtcdStore, Store};
use duplex_etcd::{Etcd, absent, put};
use duplex_proto::v1::{ClusterState, Operation};
use duplex_tests::bench::{machine, write_section};
use duplex_types::ServerKind;

const COMMITS: u64 = 1_000;
const ENROLLMENTS: u64 = 300;

fn commits(store: &Store) -> f64 {
    let start = Instant::now();
    for i in 1..=COMMITS {
        store
            .commit(&Commit {
                cluster: Some(ClusterState {
                    epoch: i,
                    ..Default::default()
                }),
                operations: vec![Operation {
                    id: i,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .unwrap();
    }
    COMMITS as f64 / start.elapsed().as_secs_f64()
}

fn enrollments(store: &Store) -> f64 {
    let start = Instant::now();
    for i in 0..ENROLLMENTS {
        let token = format!("token-{i}");
        let grant = EnrollmentGrant {
            name: format!("storage-{i}"),
            site: "a".into(),
            kind: ServerKind::Storage,
            expires_unix_ms: i64::MAX,
        };
        store.add_grant(&token, &grant).unwrap();
        let spent = store
            .enroll(&token, 0, |_| Ok(((), format!("serial-{i}"))))
            .unwrap();
        assert!(matches!(spent, EnrollOutcome::Issued(..)), "{spent:?}");
    }
    ENROLLMENTS as f64 / start.elapsed().as_secs_f64()
}

async fn leading_etcd_store(url: &str) -> Store {
    let etcd = Etcd::connect(&[url.to_owned()]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while etcd.get(b"/ready").await.is_err() {
        assert!(Instant::now() < deadline, "etcd never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lease = etcd.grant(Duration::from_secs(600)).await.unwrap();
    etcd.txn(
        vec![absent(LEADER_KEY.as_bytes())],
        vec![put(LEADER_KEY.as_bytes(), b"bench".to_vec(), lease)],
        Vec::new(),
    )
    .await
    .unwrap();
    let fence = etcd
        .get(LEADER_KEY.as_bytes())
        .await
        .unwrap()
        .unwrap()
        .create_revision;
    Store::Etcd(Box::new(EtcdStore::new(etcd, Arc::new(AtomicI64::new(fence)))))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let embedded = Store::open(dir.path()).unwrap();
    let redb = (commits(&embedded), enrollments(&embedded));
    let server = duplex_tests::etcd::start().expect("etcd installed (apt-get install etcd-server)");
    let on_etcd = leading_etcd_store(&server.url).await;
    let etcd = (commits(&on_etcd), enrollments(&on_etcd));
    eprintln!("redb {redb:?}, etcd {etcd:?}");
    let body = format!(
        "## Coordinator write rate: redb and etcd\n\n\
         `cargo bench -p duplex-coordinator --bench store` on {machine}: one writer, each call\n\
         durable before it returns ({COMMITS} state commits, {ENROLLMENTS} enrollments, each a token\n\
         granted and then spent for a certificate serial). etcd is one member on loopback, its WAL\n\
         fsynced; a three-member cluster adds a network round trip per write.\n\n\
         | store | state commits per second | enrollments per second |\n\
         | --- | ---: | ---: |\n\
         | embedded (redb) | {:.0} | {:.0} |\n\
         | etcd | {:.0} | {:.0} |\n\n\
         A failover commits about a dozen times and enrollment happens once per server, so either\n\
         rate is far above what the control plane asks.\n",
        redb.0,
        redb.1,
        etcd.0,
        etcd.1,
        machine = machine(),
    );
    let path = write_section("coordinator-store", &body);
    eprintln!("wrote {}", path.display());
}
