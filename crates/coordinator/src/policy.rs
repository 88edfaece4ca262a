//! Who may call the coordinator. Enrollment is open (its one-time token is
//! the credential), and so is the topology agents follow to find their
//! servers; heartbeats and renewals need a server certificate (the handler
//! checks that it names the sender); operations need an operator, and
//! anything that creates credentials needs an admin.

use duplex_rpc::auth::{ANY_SERVER, Rule};
use duplex_types::OperatorRole;

pub fn rule(path: &str) -> Rule {
    let Some(method) = path.strip_prefix("/duplex.v1.Coordinator/") else {
        return Rule::Deny;
    };
    match method {
        "Enroll" | "GetTopology" | "WatchTopology" => Rule::Open,
        "Heartbeat" | "RenewCertificate" => Rule::servers(ANY_SERVER),
        "GetStatus" | "GetOperation" | "History" => Rule::servers_or(ANY_SERVER, OperatorRole::Viewer),
        "Failover" | "Switchover" | "Failback" | "Resync" | "Cancel" => {
            Rule::operators(OperatorRole::Operator)
        }
        "IssueEnrollmentToken" | "RemoveServer" | "CreateOperator" | "ListOperators" | "RevokeOperator" => {
            Rule::operators(OperatorRole::Admin)
        }
        _ => Rule::Deny,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_method_has_a_rule() {
        let missing = duplex_rpc::auth::methods_without_rule(super::rule, &["duplex.v1.Coordinator"]);
        assert!(missing.is_empty(), "no rule for {missing:?}");
    }
}
