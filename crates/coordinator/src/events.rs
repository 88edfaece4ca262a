//! Operations as JSON: the webhook body and `duplexctl history --json`.

use duplex_proto::v1::Operation;

/// RFC 3339 time of a unix-milliseconds timestamp.
pub fn rfc3339(unix_ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// One operation: what it was, why, how it ended, and its phases with
/// their start and finish times.
pub fn operation_json(op: &Operation) -> serde_json::Value {
    serde_json::json!({
        "id": op.id,
        "time": rfc3339(op.started_unix_ms),
        "kind": op.kind,
        "state": op.state,
        "detail": op.detail,
        "automatic": op.automatic,
        "forced": op.forced,
        "by": if op.by.is_empty() { None } else { Some(&op.by) },
        "by_role": if op.by_role.is_empty() { None } else { Some(&op.by_role) },
        "from": if op.by_addr.is_empty() { None } else { Some(&op.by_addr) },
        "finished": (op.finished_unix_ms > 0).then(|| rfc3339(op.finished_unix_ms)),
        "error": if op.error.is_empty() { None } else { Some(&op.error) },
        "phases": op.phases.iter().map(|p| serde_json::json!({
            "name": p.name,
            "started": rfc3339(p.started_unix_ms),
            "finished": (p.finished_unix_ms > 0).then(|| rfc3339(p.finished_unix_ms)),
            "duration_ms": (p.finished_unix_ms > 0).then(|| p.finished_unix_ms - p.started_unix_ms),
        })).collect::<Vec<_>>(),
    })
}
