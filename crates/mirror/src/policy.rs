//! Who may call a mirror: the coordinator sets its links; anyone with a
//! viewer role or a server certificate may read its status.

use duplex_rpc::auth::{ANY_SERVER, Rule};
use duplex_types::{OperatorRole, ServerKind};

pub fn rule(path: &str) -> Rule {
    match path {
        "/duplex.v1.Mirror/SetLinks" => Rule::servers(&[ServerKind::Coordinator]),
        "/duplex.v1.Mirror/GetStatus" => Rule::servers_or(ANY_SERVER, OperatorRole::Viewer),
        _ => Rule::Deny,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_method_has_a_rule() {
        let missing = duplex_rpc::auth::methods_without_rule(super::rule, &["duplex.v1.Mirror"]);
        assert!(missing.is_empty(), "no rule for {missing:?}");
    }
}
