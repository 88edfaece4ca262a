//! Who may call the storage server. The data API is open at this layer
//! because every call carries a ticket, checked per call and scoped to its
//! account; everything else needs a server certificate or an operator.

use duplex_rpc::auth::{ANY_SERVER, Rule};
use duplex_types::{OperatorRole, ServerKind};

const COORDINATOR: &[ServerKind] = &[ServerKind::Coordinator];
const MIRROR: &[ServerKind] = &[ServerKind::Mirror];
const STORAGE: &[ServerKind] = &[ServerKind::Storage];

pub fn rule(path: &str) -> Rule {
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return Rule::Deny;
    };
    match (service, method) {
        ("duplex.v1.StorageService", _) => Rule::Open,
        ("duplex.v1.StorageAdmin", "GetStatus" | "ListUsage") => {
            Rule::servers_or(ANY_SERVER, OperatorRole::Viewer)
        }
        ("duplex.v1.StorageAdmin", "SetRole") => Rule::servers(COORDINATOR),
        (
            "duplex.v1.StorageAdmin",
            "VerifyAccounts" | "RepairChunks" | "CollectGarbage" | "DeleteAccount",
        ) => Rule::servers_or(COORDINATOR, OperatorRole::Operator),
        // Only a mirror reads the feed and has mirrored data written.
        ("duplex.v1.StorageReplication", "ChangeFeed" | "PullBatch" | "GetCheckpoint" | "ReportProgress") => {
            Rule::servers(MIRROR)
        }
        // A destination pulling a batch reads the chunks itself. Any storage
        // server may: each already holds any account's sealed chunks that a
        // link sends it, and no server holds a key that opens them.
        ("duplex.v1.StorageReplication", "ReadChunks") => Rule::servers(STORAGE),
        _ => Rule::Deny,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_method_has_a_rule() {
        let missing = duplex_rpc::auth::methods_without_rule(
            super::rule,
            &[
                "duplex.v1.StorageService",
                "duplex.v1.StorageAdmin",
                "duplex.v1.StorageReplication",
            ],
        );
        assert!(missing.is_empty(), "no rule for {missing:?}");
    }
}
