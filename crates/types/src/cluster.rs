//! The control plane's vocabulary: kinds of server, roles, modes, kinds of
//! operation, their phases and states. On the wire they travel as strings
//! (the proto and the CLI's JSON are a public contract); this module is the
//! one place those strings become enums and back, so nothing inside the
//! coordinator compares a role or a phase as a literal.

use std::fmt;
use std::str::FromStr;

use crate::InvalidInput;

macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $what:literal { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The wire and CLI spelling.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = InvalidInput;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(InvalidInput::Malformed {
                        what: $what,
                        value: s.chars().take(64).collect(),
                        reason: concat!("expected one of: ", $($text, " "),+),
                    }),
                }
            }
        }

        impl TryFrom<&str> for $name {
            type Error = InvalidInput;

            fn try_from(s: &str) -> Result<Self, Self::Error> {
                s.parse()
            }
        }

        impl TryFrom<&String> for $name {
            type Error = InvalidInput;

            fn try_from(s: &String) -> Result<Self, Self::Error> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.as_str().to_owned()
            }
        }
    };
}

wire_enum! {
    /// What a server does.
    ServerKind, "server kind" {
        Account = "account",
        Storage = "storage",
        Mirror = "mirror",
        Coordinator = "coordinator",
    }
}

wire_enum! {
    /// A server's role. Masters and primaries take writes under a lease.
    Role, "role" {
        Master = "master",
        Slave = "slave",
        Primary = "primary",
        Replica = "replica",
        /// Mirrors and the coordinator, which hold no data role.
        Running = "running",
    }
}

wire_enum! {
    /// How accounts are spread over the sites.
    Mode, "mode" {
        /// Every account homed on one site; the other mirrors it.
        ActivePassive = "active-passive",
        /// Each site homes part of the accounts and mirrors the other's.
        ActiveActive = "active-active",
    }
}

wire_enum! {
    /// Operations the coordinator runs, and the one-off events it records.
    OperationKind, "operation kind" {
        Failover = "failover",
        Switchover = "switchover",
        Failback = "failback",
        Resync = "resync",
        /// A failover the guard refused (too lossy, or no standby).
        FailoverRefused = "failover-refused",
        /// A holder that reports itself fenced.
        Fenced = "fenced",
        /// Sync replication or mirroring degraded to async.
        Degraded = "degraded",
        /// Account writes that never reached the new master.
        Divergence = "divergence",
        /// A server forgotten by the operator.
        ServerRemoved = "server-removed",
        /// A replica, slave or mirror stopped heartbeating.
        StandbyLost = "standby-lost",
        /// A standby reported lost is heartbeating again.
        StandbyRegained = "standby-regained",
        /// A mirroring link stopped copying.
        LinkLost = "link-lost",
        /// A link reported lost is copying again.
        LinkRegained = "link-regained",
        /// A state-changing operator action (who, with which role, from where).
        Audit = "audit",
    }
}

wire_enum! {
    /// How an operation or event stands.
    OperationState, "operation state" {
        Running = "running",
        Done = "done",
        Failed = "failed",
        Cancelled = "cancelled",
        Refused = "refused",
        Reported = "reported",
    }
}

wire_enum! {
    /// A step of an operation. Each is persisted as started before it acts
    /// and is idempotent, so a restarted coordinator runs it again.
    Phase, "phase" {
        Fence = "fence",
        PromoteAccount = "promote-account",
        StopLinks = "stop-links",
        PromoteStorage = "promote-storage",
        RepointHomes = "repoint-homes",
        Resume = "resume",
        Drain = "drain",
        SwitchRoles = "switch-roles",
        RestoreMirroring = "restore-mirroring",
        Rejoin = "rejoin",
        ReverseMirroring = "reverse-mirroring",
        BlockBackups = "block-backups",
        UnblockBackups = "unblock-backups",
        Verify = "verify",
        Release = "release",
    }
}

impl Role {
    /// Takes writes (under a lease).
    pub fn is_holder(self) -> bool {
        matches!(self, Role::Master | Role::Primary)
    }

    /// The writing role of a kind of data server.
    pub fn holder_of(kind: ServerKind) -> Option<Role> {
        match kind {
            ServerKind::Account => Some(Role::Master),
            ServerKind::Storage => Some(Role::Primary),
            _ => None,
        }
    }

    /// The following role of a kind of data server.
    pub fn standby_of(kind: ServerKind) -> Option<Role> {
        match kind {
            ServerKind::Account => Some(Role::Slave),
            ServerKind::Storage => Some(Role::Replica),
            _ => None,
        }
    }

    /// Whether a server of `kind` may hold this role.
    pub fn fits(self, kind: ServerKind) -> bool {
        matches!(
            (kind, self),
            (ServerKind::Account, Role::Master | Role::Slave)
                | (ServerKind::Storage, Role::Primary | Role::Replica)
                | (ServerKind::Mirror | ServerKind::Coordinator, Role::Running)
        )
    }
}

wire_enum! {
    /// What an operator token may do, weakest first: each role can do
    /// everything the ones before it can.
    OperatorRole, "operator role" {
        /// Status, history, watch, metrics.
        Viewer = "viewer",
        /// Failover, switchover, failback, cancel, resync, accounts, groups.
        Operator = "operator",
        /// Everything, including operators, the CA and enrollment tokens.
        Admin = "admin",
    }
}

impl OperatorRole {
    /// Whether this role covers what `needed` may do.
    pub fn covers(self, needed: OperatorRole) -> bool {
        self >= needed
    }
}

impl ServerKind {
    /// Kinds that hold data roles and can be failed over.
    pub fn holds_data(self) -> bool {
        matches!(self, ServerKind::Account | ServerKind::Storage)
    }
}

impl OperationKind {
    /// The phases an operation runs, in order; empty for one-off events.
    pub fn phases(self) -> &'static [Phase] {
        use Phase::*;
        match self {
            OperationKind::Failover => &[
                Fence,
                PromoteAccount,
                StopLinks,
                PromoteStorage,
                RepointHomes,
                Resume,
            ],
            OperationKind::Switchover => &[Fence, Drain, SwitchRoles, RepointHomes, RestoreMirroring],
            OperationKind::Failback => &[
                Rejoin,
                ReverseMirroring,
                BlockBackups,
                Fence,
                Drain,
                SwitchRoles,
                RepointHomes,
                RestoreMirroring,
                UnblockBackups,
                Verify,
            ],
            OperationKind::Resync => &[Release],
            _ => &[],
        }
    }

    /// An operation with phases, rather than a one-off event.
    pub fn is_operation(self) -> bool {
        !self.phases().is_empty()
    }
}

impl Phase {
    /// Phases before any role has moved: stopping there changes nothing
    /// that must be rolled forward.
    pub fn cancellable(self) -> bool {
        matches!(
            self,
            Phase::Rejoin | Phase::ReverseMirroring | Phase::BlockBackups | Phase::Fence | Phase::Drain
        )
    }
}

impl OperationState {
    pub fn is_finished(self) -> bool {
        !matches!(self, OperationState::Running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_round_trips_through_its_wire_spelling() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(*r));
        }
        for p in Phase::ALL {
            assert_eq!(Phase::try_from(p.as_str()), Ok(*p));
        }
        for k in OperationKind::ALL {
            assert_eq!(k.as_str().parse::<OperationKind>(), Ok(*k));
        }
        for m in Mode::ALL {
            assert_eq!(m.as_str().parse::<Mode>(), Ok(*m));
        }
    }

    #[test]
    fn unknown_values_name_what_was_expected() {
        let e = "boss".parse::<Role>().expect_err("not a role");
        let text = e.to_string();
        assert!(
            text.contains("role") && text.contains("\"boss\"") && text.contains("master"),
            "{text}"
        );
    }

    #[test]
    fn roles_fit_their_kinds() {
        assert!(Role::Master.fits(ServerKind::Account));
        assert!(!Role::Primary.fits(ServerKind::Account));
        assert!(Role::Replica.fits(ServerKind::Storage));
        assert!(!Role::Running.fits(ServerKind::Storage));
        assert_eq!(Role::holder_of(ServerKind::Storage), Some(Role::Primary));
        assert_eq!(Role::standby_of(ServerKind::Account), Some(Role::Slave));
    }

    #[test]
    fn only_phases_before_a_role_move_can_be_cancelled() {
        assert!(Phase::Rejoin.cancellable());
        assert!(!Phase::SwitchRoles.cancellable());
        assert!(!Phase::RepointHomes.cancellable());
    }
}
