//! redb table layout of the account server.

use redb::TableDefinition;

/// Local, unreplicated facts: server id, role, epoch, counters.
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// lsn → encoded `LogEntry`.
pub const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// account id → encoded `AccountRecord`.
pub const ACCOUNTS: TableDefinition<u64, &[u8]> = TableDefinition::new("accounts");
pub const ACCOUNT_NAMES: TableDefinition<&str, u64> = TableDefinition::new("account_names");
/// BLAKE3(token) → account id.
pub const TOKENS: TableDefinition<[u8; 32], u64> = TableDefinition::new("tokens");
/// group name → enabled.
pub const GROUPS: TableDefinition<&str, bool> = TableDefinition::new("groups");
/// group name → encoded `KeepPolicy`, for groups that have one.
pub const GROUP_POLICIES: TableDefinition<&str, &[u8]> = TableDefinition::new("group_policies");
/// storage server id → encoded `ServerInfo`.
pub const STORAGE: TableDefinition<&str, &[u8]> = TableDefinition::new("storage_servers");
/// storage server id → encoded `ServerInfo` of servers retired from
/// placement (a failover's `MoveHomes(retire)`), so a later failback can
/// still name them. Disjoint from STORAGE: registering again moves a
/// server back.
pub const RETIRED: TableDefinition<&str, &[u8]> = TableDefinition::new("retired_storage_servers");
/// "ticket_secret" → bytes. Replicated like the rest of the state.
pub const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");

/// epoch → first LSN written under it.
pub const EPOCHS: TableDefinition<u64, u64> = TableDefinition::new("epochs");
/// home storage server id → accounts homed there (derived, kept for O(1) placement).
pub const HOMES: TableDefinition<&str, u64> = TableDefinition::new("homes");
/// (account id, key id) → encoded `KeyRecord`: an account's master key
/// wrapped under one passphrase. Replicated like the rest of the state.
pub const ACCOUNT_KEYS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("account_keys");
