//! `duplex forget`: delete snapshots by name or by keep rules (restic's,
//! on the server's snapshot times; see `duplex_types::retention`). The
//! deletion is a change-feed record on the storage server, so it reaches
//! the other site like a backup; the space the snapshots alone held is
//! reclaimed by the servers' garbage collection.

use duplex_proto::v1::{DeleteSnapshotsRequest, ListSnapshotsRequest};
use duplex_types::retention::{self, KeepPolicy};

use crate::AgentError;
use crate::session::Session;

/// Ids one deletion call carries at most (the server's limit).
const DELETE_BATCH: usize = 10_000;

/// What to forget: named snapshots, or what a policy does not keep.
pub enum Selection {
    Named(Vec<String>),
    Policy(KeepPolicy),
}

impl Selection {
    /// Exactly one of the two, or a message saying what is wrong.
    pub fn new(named: Vec<String>, policy: KeepPolicy) -> Result<Selection, AgentError> {
        match (named.is_empty(), policy.is_empty()) {
            (false, false) => Err(AgentError::Invalid(
                "name snapshots or give --keep-* rules, not both".into(),
            )),
            (true, true) => Err(AgentError::Invalid(
                "nothing to forget: name snapshots, or give --keep-last/-hourly/-daily/-weekly/-monthly/-yearly"
                    .into(),
            )),
            (false, true) => Ok(Selection::Named(named)),
            (true, false) => Ok(Selection::Policy(policy)),
        }
    }
}

#[derive(Debug)]
pub struct ForgetReport {
    /// Newest first.
    pub removed: Vec<String>,
    pub kept: Vec<String>,
    pub dry_run: bool,
}

pub async fn forget(
    session: &Session,
    selection: Selection,
    dry_run: bool,
) -> Result<ForgetReport, AgentError> {
    let mut storage = session.storage.clone();
    let snapshots = storage
        .list_snapshots(ListSnapshotsRequest {})
        .await
        .map_err(AgentError::rpc("listing snapshots"))?
        .into_inner()
        .snapshots;
    let all: Vec<(String, i64)> = snapshots.into_iter().map(|s| (s.id, s.time_unix_ms)).collect();
    let (kept, removed) = match selection {
        Selection::Policy(policy) => retention::apply(&policy, &all),
        Selection::Named(queries) => {
            let mut named = Vec::new();
            for query in &queries {
                named.push(crate::restore::find(session, query).await?.id);
            }
            let (mut removed, mut kept): (Vec<_>, Vec<_>) =
                all.into_iter().partition(|(id, _)| named.contains(id));
            removed.sort_by_key(|(_, t)| std::cmp::Reverse(*t));
            kept.sort_by_key(|(_, t)| std::cmp::Reverse(*t));
            (
                kept.into_iter().map(|(id, _)| id).collect(),
                removed.into_iter().map(|(id, _)| id).collect(),
            )
        }
    };
    if !dry_run {
        for batch in removed.chunks(DELETE_BATCH) {
            storage
                .delete_snapshots(DeleteSnapshotsRequest { ids: batch.to_vec() })
                .await
                .map_err(AgentError::rpc("deleting snapshots"))?;
        }
    }
    Ok(ForgetReport {
        removed,
        kept,
        dry_run,
    })
}
