//! Operator actions another server reports reach history through the real
//! engine and store: once each, however often they are sent, and only
//! from an account server.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use duplex_coordinator::audit::{self, Reported};
use duplex_coordinator::clock::Clock;
use duplex_coordinator::config::Config;
use duplex_coordinator::engine;
use duplex_coordinator::servers::{Call, Reply, Servers};
use duplex_coordinator::store::Store;
use duplex_proto::v1 as pb;
use duplex_types::{Mode, OperatorRole, ServerKind};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

/// No server answers: nothing here needs one.
struct Nobody;

impl Servers for Nobody {
    fn call(&self, _call: Call) -> BoxFuture<'static, Result<Reply, String>> {
        Box::pin(async { Err("no servers in this test".to_owned()) })
    }
}

const NOW_MS: i64 = 1_700_000_000_000;

fn record(seq: u64, detail: &str, at_ms: i64) -> pb::AuditRecord {
    pb::AuditRecord {
        seq,
        detail: detail.into(),
        by: "otto".into(),
        by_role: "operator".into(),
        by_addr: "10.0.0.7:51000".into(),
        at_unix_ms: at_ms,
    }
}

fn accepted(records: Vec<pb::AuditRecord>) -> Vec<Reported> {
    audit::accept(ServerKind::Account, records).records
}

#[tokio::test]
async fn reported_actions_are_recorded_once_with_who_and_where() {
    let store = Arc::new(Store::in_memory().unwrap());
    let info = pb::ServerInfo {
        id: "coordinator".into(),
        name: "coordinator".into(),
        site: "a".into(),
        kind: "coordinator".into(),
        addr: "http://coordinator".into(),
        public_addr: String::new(),
    };
    let stop = CancellationToken::new();
    let engine = engine::start(
        Config::new(Mode::ActivePassive),
        info,
        store.clone(),
        Arc::new(Nobody),
        Clock::starting_at(NOW_MS),
        stop.clone(),
    )
    .unwrap();

    let first = accepted(vec![
        record(1, "created account alice in group g", NOW_MS - 500),
        record(2, "disabled group g (1 accounts)", NOW_MS + 60_000),
    ]);
    engine
        .audit_reported("account-a", 7, first.clone())
        .await
        .unwrap();
    // The answer was lost: the same records come again, with one more.
    let mut again = first;
    again.extend(accepted(vec![record(3, "enabled group g (1 accounts)", 0)]));
    engine.audit_reported("account-a", 7, again).await.unwrap();

    let events: Vec<_> = store
        .operations()
        .unwrap()
        .into_iter()
        .filter(|o| o.kind == "audit")
        .collect();
    let details: Vec<_> = events.iter().map(|e| e.detail.as_str()).collect();
    assert_eq!(
        details,
        [
            "on account-a: created account alice in group g",
            "on account-a: disabled group g (1 accounts)",
            "on account-a: enabled group g (1 accounts)",
        ]
    );
    for e in &events {
        assert_eq!(e.by, "otto");
        assert_eq!(e.by_role, OperatorRole::Operator.as_str());
        assert_eq!(e.by_addr, "10.0.0.7:51000");
        assert_eq!(e.state, "done");
    }
    assert_eq!(events[0].started_unix_ms, NOW_MS - 500);
    // A server clock ahead of ours does not date an action in the future.
    assert!(events[1].started_unix_ms <= events[1].finished_unix_ms);

    // Another server kind reports nothing that is kept.
    let refused = audit::accept(ServerKind::Storage, vec![record(1, "created account x", 0)]);
    assert!(refused.records.is_empty());
    stop.cancel();
}
