//! One heartbeat (from a server its certificate already named, checked by
//! the service): let the owner register it if
//! it is new, record what it reports and answer with its assignment and,
//! for a converged holder, a lease. Nothing here writes the desired state
//! or waits on a lock held across I/O.

use duplex_proto::v1 as pb;
use duplex_types::OperationKind;
use tonic::Status;

use crate::decide::roles;
use crate::engine::Shared;
use crate::model::Report;
use crate::observed::Seen;

impl Shared {
    pub async fn heartbeat(&self, request: pb::HeartbeatRequest) -> Result<pb::HeartbeatResponse, Status> {
        let report = Report::try_from(&request).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let name = report.member.name.clone();
        let desired = self.desired();
        let newcomer = desired.servers.get(&name) != Some(&report.member)
            || (report.member.kind.holds_data() && desired.role(&name).is_none())
            || report.epoch > desired.epoch;
        if newcomer {
            self.join(report.clone()).await?;
        }
        let (response, events, was_down) = self.observe(report)?;
        for (kind, detail) in events {
            self.event(kind, detail);
        }
        if was_down {
            self.wake();
        }
        Ok(response)
    }

    /// Records the report and decides the answer, under the observed lock
    /// (see `Shared::observed`).
    #[allow(clippy::type_complexity)]
    fn observe(
        &self,
        report: Report,
    ) -> Result<(pb::HeartbeatResponse, Vec<(OperationKind, String)>, bool), Status> {
        let mut observed = self
            .observed
            .lock()
            .map_err(|_| Status::internal("observed state poisoned"))?;
        let desired = self.desired();
        let now = self.clock.now();
        let name = report.member.name.clone();
        let was_down = !observed.healthy(&name, now, self.config.failover_timeout);
        if was_down {
            tracing::info!(server = %name, role = %report.role, "server is up");
        }
        let lease = roles::lease_for(&desired, &name, report.role);
        let before = observed.get(&name).map(|s| s.report.clone());
        let mut events = transitions(before.as_ref(), &report);
        // A holder that restarts reports itself fenced until this answer
        // grants its lease: only a fence that lasts is news.
        events.retain(|(kind, _)| *kind != OperationKind::Fenced || !lease);
        let assignment = {
            let view = self.view(&desired, &observed, now);
            roles::assignment(&view, &report.member)
        };
        let granted_at = if lease {
            Some(now)
        } else {
            observed.get(&name).and_then(|o| o.granted_at)
        };
        observed.record(Seen {
            report,
            at: now,
            wall_ms: self.clock.wall_ms_at(now),
            granted_at,
            leased: lease,
        });
        let response = pb::HeartbeatResponse {
            epoch: desired.epoch,
            interval_ms: self.config.heartbeat_interval.as_millis() as u64,
            lease_ms: if lease {
                self.config.lease.as_millis() as u64
            } else {
                0
            },
            assignment,
            security: None,
            // Set by the service once it has recorded what the heartbeat reported.
            audit_acknowledged: 0,
        };
        Ok((response, events, was_down))
    }
}

/// Events worth a history entry and a notification: a server that starts
/// reporting itself fenced, its sync replication degraded to async, or
/// account writes found divergent when it rejoined.
fn transitions(before: Option<&Report>, now: &Report) -> Vec<(OperationKind, String)> {
    let name = &now.member.name;
    let mut events = Vec::new();
    if now.fenced && !before.is_some_and(|b| b.fenced) {
        events.push((
            OperationKind::Fenced,
            format!(
                "{name} ({}) is fenced: its lease lapsed, so it refuses writes (it lost the coordinator, \
                 or its role moved)",
                now.role
            ),
        ));
    }
    if now.degraded && !before.is_some_and(|b| b.degraded) {
        events.push((
            OperationKind::Degraded,
            format!(
                "{name}: sync replication degraded to async; writes are acknowledged before they are on the other site"
            ),
        ));
    }
    let known = before.map_or(0, |b| b.divergent_entries);
    if now.divergent_entries > known && before.is_some() {
        events.push((
            OperationKind::Divergence,
            format!(
                "{name} rejoined with {} account writes the new master never received; they are listed in \
                 {} (JSON lines) on {name}: review them and re-apply with `duplexctl accounts reapply FILE`",
                now.divergent_entries - known,
                now.divergence_report
            ),
        ));
    }
    events
}
