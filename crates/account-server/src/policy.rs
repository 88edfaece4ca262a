//! Who may call the account server. Login and the agent's own calls are
//! open at this layer (the account token is their credential); the log,
//! snapshots (which carry the ticket signing key) and role changes are for
//! servers of the right kind only.

use duplex_rpc::auth::{ANY_SERVER, Rule};
use duplex_types::{OperatorRole, ServerKind};

const COORDINATOR: &[ServerKind] = &[ServerKind::Coordinator];
const ACCOUNT: &[ServerKind] = &[ServerKind::Account];

pub fn rule(path: &str) -> Rule {
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return Rule::Deny;
    };
    match (service, method) {
        ("duplex.v1.AccountService", "GetTicketKeys") => Rule::servers(ANY_SERVER),
        ("duplex.v1.AccountService", _) => Rule::Open,
        ("duplex.v1.AccountAdmin", "ListAccounts" | "ListGroups" | "ListStorageServers" | "GetStatus") => {
            Rule::servers_or(ANY_SERVER, OperatorRole::Viewer)
        }
        (
            "duplex.v1.AccountAdmin",
            "CreateAccount" | "CreateAccounts" | "SetGroupEnabled" | "Reapply" | "SetQuota" | "RotateToken"
            | "DeleteAccount" | "SetGroupPolicy",
        ) => Rule::servers_or(COORDINATOR, OperatorRole::Operator),
        // A storage server registers itself (the handler checks the name
        // against its certificate); the coordinator re-registers on failback.
        ("duplex.v1.AccountAdmin", "RegisterStorageServer") => {
            Rule::servers(&[ServerKind::Coordinator, ServerKind::Storage])
        }
        ("duplex.v1.AccountAdmin", "MoveHomes") => Rule::servers(COORDINATOR),
        ("duplex.v1.AccountReplication", "Replicate" | "GetStateSnapshot" | "GetEpochHistory") => {
            Rule::servers(ACCOUNT)
        }
        ("duplex.v1.AccountReplication", "Promote" | "Demote") => Rule::servers(COORDINATOR),
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
                "duplex.v1.AccountService",
                "duplex.v1.AccountAdmin",
                "duplex.v1.AccountReplication",
            ],
        );
        assert!(missing.is_empty(), "no rule for {missing:?}");
    }
}
