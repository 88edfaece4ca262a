use duplex_proto::v1::log_entry::Mutation;
use duplex_proto::v1::{
    CreateAccount, LogEntry, MoveHomesRequest, ServerInfo, SetGroup, SetTicketKey, StateSnapshot,
};
use duplex_types::Epoch;

use super::{AccountStore, NewAccount};
use crate::error::AccountError;

const E: Epoch = Epoch(1);

fn open(dir: &tempfile::TempDir, name: &str) -> AccountStore {
    AccountStore::open(&dir.path().join(name)).unwrap()
}

fn server(n: u8, name: &str) -> ServerInfo {
    ServerInfo {
        id: format!("00000000-0000-4000-8000-0000000000{n:02}"),
        name: name.into(),
        site: "a".into(),
        kind: "storage".into(),
        addr: format!("http://127.0.0.1:{n}"),
        public_addr: String::new(),
    }
}

fn new_account(name: &str, home: &str) -> NewAccount {
    NewAccount {
        name: name.into(),
        group: "default".into(),
        token_hash: *blake3::hash(name.as_bytes()).as_bytes(),
        home: Some(home.into()),
        quota_bytes: 0,
    }
}

/// A store holding storage-a and one account homed on it.
fn with_account(dir: &tempfile::TempDir, file: &str, account: &str) -> AccountStore {
    let store = open(dir, file);
    store.put_storage_server(E, server(1, "storage-a")).unwrap();
    store
        .create_account(E, new_account(account, "storage-a"))
        .unwrap();
    store
}

fn moves(from: &str, to: &str, returning: bool, retire: bool, previous: &str) -> MoveHomesRequest {
    MoveHomesRequest {
        from: from.into(),
        to: to.into(),
        returning,
        retire,
        previous: previous.into(),
    }
}

fn home_of(store: &AccountStore, account: &str) -> String {
    let record = store
        .accounts()
        .unwrap()
        .into_iter()
        .find(|a| a.name == account)
        .unwrap();
    let names = store.storage_server_names().unwrap();
    names[&record.home_id].clone()
}

/// A site lost, then rebuilt under a new name: failback names the retired
/// server as the previous home, and moves only the accounts that came from it.
#[test]
fn failback_to_a_rebuilt_server_finds_accounts_by_their_retired_home() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, "a.redb");
    store.put_storage_server(E, server(1, "storage-a")).unwrap();
    store.put_storage_server(E, server(2, "storage-b")).unwrap();
    store
        .create_account(E, new_account("alice", "storage-a"))
        .unwrap();
    store.create_account(E, new_account("bob", "storage-b")).unwrap();
    let failover = moves("storage-a", "storage-b", false, true, "");
    assert_eq!(store.move_homes(E, &failover).unwrap().0, 1);
    assert!(
        store
            .storage_servers()
            .unwrap()
            .iter()
            .all(|s| s.name != "storage-a")
    );
    store.put_storage_server(E, server(3, "storage-c")).unwrap();

    let unknown = moves("storage-b", "storage-c", true, false, "storage-x");
    let err = store.move_homes(E, &unknown).unwrap_err();
    assert!(
        matches!(&err, AccountError::NotFound(m) if m.contains("storage-x")),
        "{err}"
    );
    let by_default = moves("storage-b", "storage-c", true, false, "");
    assert_eq!(
        store.move_homes(E, &by_default).unwrap().0,
        0,
        "nobody came from storage-c"
    );

    let failback = moves("storage-b", "storage-c", true, false, "storage-a");
    assert_eq!(
        store.move_homes(E, &failback).unwrap(),
        (1, vec!["default".into()])
    );
    assert_eq!(home_of(&store, "alice"), "storage-c");
    assert_eq!(home_of(&store, "bob"), "storage-b");
    let lsn = store.last_lsn().unwrap();
    assert_eq!(store.move_homes(E, &failback).unwrap().0, 0);
    assert_eq!(store.last_lsn().unwrap(), lsn, "a repeated move logs nothing");

    // A slave bootstrapped from a snapshot still knows the retired server.
    let slave = open(&dir, "b.redb");
    slave.install_snapshot(&store.state_snapshot().unwrap()).unwrap();
    assert_eq!(slave.state_hash().unwrap(), store.state_hash().unwrap());
    assert_eq!(
        slave.retired_storage_servers().unwrap(),
        vec![server(1, "storage-a")]
    );
}

fn entry(lsn: u64, mutation: Mutation) -> LogEntry {
    LogEntry {
        lsn,
        epoch: 0,
        time_unix_ms: 0,
        mutation: Some(mutation),
    }
}

fn lost_account(id: u64, name: &str, home: &ServerInfo, group: &str) -> Mutation {
    Mutation::CreateAccount(CreateAccount {
        id,
        name: name.into(),
        group: group.into(),
        token_hash: blake3::hash(format!("token of {name}").as_bytes())
            .as_bytes()
            .to_vec(),
        home_id: home.id.clone(),
        quota_bytes: 5,
    })
}

#[test]
fn reapply_recreates_what_still_fits_and_says_why_not_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let store = with_account(&dir, "a.redb", "taken");
    let gone = server(9, "storage-gone");
    let entries = [
        entry(10, lost_account(1, "lost", &server(1, "storage-a"), "g")),
        entry(11, lost_account(1, "taken", &server(1, "storage-a"), "g")),
        entry(12, lost_account(2, "moved", &gone, "g")),
        entry(13, lost_account(3, "twin", &gone, "g")),
        entry(
            14,
            Mutation::SetGroup(SetGroup {
                name: "g".into(),
                enabled: false,
            }),
        ),
        entry(15, Mutation::SetTicketKey(SetTicketKey { secret: vec![1; 32] })),
    ];
    // "twin" carries the token of "lost": refused once "lost" has it back.
    let mut entries = entries.to_vec();
    if let Some(Mutation::CreateAccount(twin)) = &mut entries[3].mutation {
        twin.token_hash = blake3::hash(b"token of lost").as_bytes().to_vec();
    }

    let before = (store.last_lsn().unwrap(), store.state_hash().unwrap());
    let dry = store.reapply(E, &entries, true).unwrap();
    assert_eq!((store.last_lsn().unwrap(), store.state_hash().unwrap()), before);
    let done = store.reapply(E, &entries, false).unwrap();
    let verdicts =
        |outcomes: &[super::reapply::Outcome]| -> Vec<bool> { outcomes.iter().map(|o| o.applied).collect() };
    assert_eq!(verdicts(&dry), [true, false, true, false, true, false]);
    assert_eq!(verdicts(&done), verdicts(&dry));
    assert!(done[1].reason.contains("exists already"), "{:?}", done[1]);
    assert!(done[2].reason.contains("no longer registered"), "{:?}", done[2]);
    assert!(done[3].reason.contains("\"lost\""), "{:?}", done[3]);
    assert!(done[5].reason.contains("ticket keys"), "{:?}", done[5]);
    assert_eq!(done[0].kind, "create-account");
    assert!(done[0].new_lsn > before.0.0 && dry[0].new_lsn == 0);

    let lost = store
        .account_by_token(blake3::hash(b"token of lost").as_bytes())
        .unwrap();
    assert_eq!(
        (lost.name.as_str(), lost.group.as_str(), lost.quota_bytes),
        ("lost", "g", 5)
    );
    assert_ne!(lost.id, 1, "the old id belongs to another account here");
    assert_eq!(home_of(&store, "moved"), "storage-a");
    assert!(!store.group_enabled("g").unwrap());
    assert!(store.ticket_secret().unwrap().is_none());
}

fn key(id: &str) -> duplex_proto::v1::KeyRecord {
    duplex_proto::v1::KeyRecord {
        id: id.into(),
        created_unix_ms: 1,
        salt: vec![1; 16],
        m_cost_kib: 65536,
        t_cost: 3,
        p_cost: 4,
        nonce: vec![2; 24],
        wrapped: vec![3; 48],
        format_version: 1,
    }
}

/// The first key is created once; the last is never removed; keys travel
/// in the log and in snapshots, so a slave holds what the master holds.
#[test]
fn account_keys_converge_and_the_last_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let master = open(&dir, "master.redb");
    master.put_storage_server(E, server(1, "storage-a")).unwrap();
    let id = master
        .create_account(E, new_account("demo", "storage-a"))
        .unwrap()
        .id;

    assert!(matches!(
        master.put_key(E, id, key("aa"), false),
        Err(AccountError::Precondition(_))
    ));
    master.put_key(E, id, key("aa"), true).unwrap();
    // The loser of a first-use race is told the key exists.
    assert!(matches!(
        master.put_key(E, id, key("bb"), true),
        Err(AccountError::Exists(_))
    ));
    master.put_key(E, id, key("bb"), false).unwrap();
    assert!(matches!(
        master.put_key(E, 999, key("cc"), false),
        Err(AccountError::Precondition(_) | AccountError::NotFound(_))
    ));
    let mut bad = key("dd");
    bad.wrapped.pop();
    assert!(matches!(
        master.put_key(E, id, bad, false),
        Err(AccountError::Invalid(_))
    ));
    assert_eq!(master.remove_key(E, id, "aa").unwrap().len(), 1);
    assert!(matches!(
        master.remove_key(E, id, "bb"),
        Err(AccountError::Precondition(_))
    ));
    assert!(matches!(
        master.remove_key(E, id, "zz"),
        Err(AccountError::NotFound(_))
    ));

    // A slave replaying the log, and one installing a snapshot, agree.
    let slave = open(&dir, "slave.redb");
    slave
        .append_entries(&master.entries_after(duplex_types::Lsn(0), 1000).unwrap())
        .unwrap();
    let fresh = open(&dir, "fresh.redb");
    fresh.install_snapshot(&master.state_snapshot().unwrap()).unwrap();
    for other in [&slave, &fresh] {
        assert_eq!(other.keys_of(id).unwrap(), master.keys_of(id).unwrap());
        assert_eq!(other.state_hash().unwrap(), master.state_hash().unwrap());
    }
    assert_eq!(master.keys_of(id).unwrap()[0].id, "bb");
}

/// A slave validates what it replays as the master validates requests: an
/// entry no handler could have written stops the batch, and nothing of the
/// batch is applied, not even the valid entries before it.
#[test]
fn a_slave_refuses_log_entries_that_fail_validation() {
    let dir = tempfile::tempdir().unwrap();
    let master = with_account(&dir, "master.redb", "demo");
    let good = master.entries_after(duplex_types::Lsn(0), 1000).unwrap();
    let home_id = server(1, "storage-a").id;
    let next = good.len() as u64 + 1;
    let entry = |mutation| LogEntry {
        lsn: next,
        epoch: E.0,
        time_unix_ms: 0,
        mutation: Some(mutation),
    };
    let account = |name: &str, group: &str, home_id: &str| {
        Mutation::CreateAccount(CreateAccount {
            id: 99,
            name: name.into(),
            group: group.into(),
            token_hash: vec![7; 32],
            home_id: home_id.into(),
            quota_bytes: 0,
        })
    };
    let mut bad_server = server(2, "storage-b");
    bad_server.kind = "coordinator".into();
    let huge = "n".repeat(1 << 20);
    let hostile = [
        entry(account("../etc", "default", &home_id)),
        entry(account(&huge, "default", &home_id)),
        entry(account("fine", "no spaces", &home_id)),
        entry(account("fine", "default", "not-a-uuid")),
        entry(Mutation::SetGroup(SetGroup {
            name: String::new(),
            enabled: true,
        })),
        entry(Mutation::PutStorageServer(duplex_proto::v1::PutStorageServer {
            server: Some(bad_server),
        })),
        entry(Mutation::SetTicketKey(SetTicketKey { secret: vec![1; 3] })),
    ];
    for bad in hostile {
        let slave = open(&dir, "slave.redb");
        let mut batch = good.clone();
        batch.push(bad);
        let err = slave.append_entries(&batch).unwrap_err();
        assert!(matches!(err, AccountError::Invalid(_)), "{err}");
        assert!(err.to_string().contains(&format!("log entry {next}")), "{err}");
        assert!(
            err.to_string().len() < 300,
            "the error echoes the input: {} bytes",
            err.to_string().len()
        );
        assert_eq!(slave.account_count().unwrap(), 0, "nothing of the batch applied");
        drop(slave);
        std::fs::remove_file(dir.path().join("slave.redb")).unwrap();
    }
    // The valid batch alone replays.
    let slave = open(&dir, "slave.redb");
    slave.append_entries(&good).unwrap();
    assert_eq!(slave.state_hash().unwrap(), master.state_hash().unwrap());
}

/// A snapshot is held to the checks a log entry is: a slave bootstrapping
/// from a bad master's snapshot keeps the state it had.
#[test]
fn a_slave_refuses_snapshots_that_fail_validation() {
    let dir = tempfile::tempdir().unwrap();
    let master = with_account(&dir, "master.redb", "demo");
    let good = master.state_snapshot().unwrap();
    let mut bad_server = server(2, "storage-b");
    bad_server.addr = "file:///etc/passwd".into();
    type Spoil = Box<dyn Fn(&mut StateSnapshot)>;
    let hostile: [(&str, Spoil); 6] = [
        ("account name", Box::new(|s| s.accounts[0].name = "../etc".into())),
        ("group", Box::new(|s| s.accounts[0].group = "n".repeat(1 << 20))),
        ("home", Box::new(|s| s.accounts[0].home_id = "not-a-uuid".into())),
        ("token hash", Box::new(|s| s.accounts[0].token_hash = vec![1; 5])),
        (
            "server",
            Box::new(move |s| s.storage_servers.push(bad_server.clone())),
        ),
        ("ticket secret", Box::new(|s| s.ticket_secret = vec![1; 3])),
    ];
    let slave = open(&dir, "slave.redb");
    slave.install_snapshot(&good).unwrap();
    for (what, spoil) in hostile {
        let mut bad = good.clone();
        spoil(&mut bad);
        let err = slave.install_snapshot(&bad).unwrap_err();
        assert!(matches!(err, AccountError::Invalid(_)), "{what}: {err}");
        assert!(err.to_string().len() < 300, "{what}: the error echoes the input");
        assert_eq!(
            slave.state_hash().unwrap(),
            master.state_hash().unwrap(),
            "{what}: the slave's state is untouched"
        );
    }
}

#[test]
fn a_snapshot_round_trips_through_compression_and_garbage_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let master = open(&dir, "master.redb");
    master.put_storage_server(E, server(1, "storage-a")).unwrap();
    let snapshot = master.state_snapshot().unwrap();
    let bytes = super::snapshot::compress(&snapshot).unwrap();
    assert_eq!(super::snapshot::decompress(&bytes).unwrap(), snapshot);
    assert!(matches!(
        super::snapshot::decompress(b"not zstd at all"),
        Err(AccountError::Invalid(_))
    ));
}

#[test]
fn quota_token_and_group_policy_changes_replicate_and_survive_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let master = with_account(&dir, "master.redb", "demo");
    let old = *blake3::hash(b"demo").as_bytes();
    let new = *blake3::hash(b"new token").as_bytes();
    assert_eq!(master.set_quota(E, "demo", 5_000).unwrap().quota_bytes, 5_000);
    master.rotate_token(E, "demo", new).unwrap();
    assert!(
        master.account_by_token(&old).is_err(),
        "the old token still finds the account"
    );
    assert_eq!(master.account_by_token(&new).unwrap().name, "demo");
    let keep = duplex_proto::v1::KeepPolicy {
        daily: 7,
        ..Default::default()
    };
    master.set_group_policy(E, "default", keep).unwrap();
    assert!(matches!(
        master.set_group_policy(E, "nope", keep),
        Err(AccountError::NotFound(_))
    ));
    assert!(matches!(
        master.set_quota(E, "nobody", 1),
        Err(AccountError::NotFound(_))
    ));

    let slave = open(&dir, "slave.redb");
    slave
        .append_entries(&master.entries_after(duplex_types::Lsn(0), 1000).unwrap())
        .unwrap();
    let fresh = open(&dir, "fresh.redb");
    fresh.install_snapshot(&master.state_snapshot().unwrap()).unwrap();
    for other in [&slave, &fresh] {
        assert_eq!(other.state_hash().unwrap(), master.state_hash().unwrap());
        assert_eq!(other.account_by_token(&new).unwrap().quota_bytes, 5_000);
        assert!(other.account_by_token(&old).is_err());
        assert_eq!(other.group_policies().unwrap()["default"], keep);
    }

    // An all-zero policy removes the group's policy.
    master
        .set_group_policy(E, "default", duplex_proto::v1::KeepPolicy::default())
        .unwrap();
    assert!(master.group_policies().unwrap().is_empty());
}

#[test]
fn a_deleted_account_loses_its_name_token_and_keys_but_never_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let master = with_account(&dir, "master.redb", "leaving");
    let token = *blake3::hash(b"leaving").as_bytes();
    let first = master.account_by_token(&token).unwrap();
    let gone = master.delete_account(E, "leaving").unwrap();
    assert!(gone.deleted && gone.id == first.id);
    assert!(master.account_by_token(&token).is_err(), "the token still works");
    assert!(master.accounts().unwrap().is_empty());
    assert!(matches!(
        master.delete_account(E, "leaving"),
        Err(AccountError::NotFound(_))
    ));
    // The name is free; the id is not.
    let again = master
        .create_account(E, new_account("leaving", "storage-a"))
        .unwrap();
    assert!(again.id > first.id, "id {} was given again", again.id);

    let slave = open(&dir, "slave.redb");
    slave
        .append_entries(&master.entries_after(duplex_types::Lsn(0), 1000).unwrap())
        .unwrap();
    let fresh = open(&dir, "fresh.redb");
    fresh.install_snapshot(&master.state_snapshot().unwrap()).unwrap();
    for other in [&slave, &fresh] {
        assert_eq!(other.state_hash().unwrap(), master.state_hash().unwrap());
        assert_eq!(other.accounts().unwrap().len(), 1);
        let next = other
            .create_account(E, new_account("another", "storage-a"))
            .unwrap();
        assert!(next.id > again.id);
    }
}
