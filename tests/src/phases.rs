//! The phases of a failover and a failback, in order, as history names them.

pub const FAILOVER: [&str; 6] = [
    "fence",
    "promote-account",
    "stop-links",
    "promote-storage",
    "repoint-homes",
    "resume",
];

pub const FAILBACK: [&str; 10] = [
    "rejoin",
    "reverse-mirroring",
    "block-backups",
    "fence",
    "drain",
    "switch-roles",
    "repoint-homes",
    "restore-mirroring",
    "unblock-backups",
    "verify",
];
