//! Account servers as master and slaves, without storage servers: a
//! storage server is registered by record so accounts can be homed.

use std::path::Path;
use std::time::Duration;

use duplex_proto::v1::account_admin_client::AccountAdminClient;
use duplex_proto::v1::{
    AccountServerStatus, CreateAccountRequest, CreateAccountsRequest, GetAccountStatusRequest,
    RegisterStorageServerRequest, ServerInfo,
};

use crate::{Service, bin, wait_for};

pub fn start(dir: &Path, name: &str, extra: &[&str]) -> Service {
    let mut cmd = vec![
        bin("duplex-account-server").display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        dir.join(name).display().to_string(),
        "--name".into(),
        name.into(),
        "--insecure-plaintext".into(),
    ];
    cmd.extend(extra.iter().map(|s| s.to_string()));
    Service::start(name, cmd, &dir.join(format!("{name}.log")))
}

pub fn admin(addr: &str) -> AccountAdminClient<crate::Conn> {
    AccountAdminClient::new(crate::connect(addr))
}

pub async fn status(addr: &str) -> AccountServerStatus {
    admin(addr)
        .get_status(GetAccountStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Registers a storage server record so accounts can be created.
pub async fn register_storage(master: &str) {
    let server = ServerInfo {
        id: "00000000-0000-4000-8000-000000000001".into(),
        name: "storage-a".into(),
        site: "a".into(),
        kind: "storage".into(),
        addr: "http://127.0.0.1:9".into(),
        public_addr: String::new(),
    };
    admin(master)
        .register_storage_server(RegisterStorageServerRequest { server: Some(server) })
        .await
        .unwrap();
}

pub fn account(name: &str) -> CreateAccountRequest {
    CreateAccountRequest {
        name: name.into(),
        group: String::new(),
        home: String::new(),
        quota_bytes: 0,
    }
}

/// Creates `count` accounts named `{prefix}{i}` in bulk calls.
pub async fn bulk_create(master: &str, prefix: &str, count: usize) {
    let mut client = admin(master);
    let mut i = 0;
    while i < count {
        let n = (count - i).min(20_000);
        let accounts = (i..i + n).map(|j| account(&format!("{prefix}{j}"))).collect();
        client
            .create_accounts(CreateAccountsRequest { accounts })
            .await
            .unwrap();
        i += n;
    }
}

/// Waits until `slave` has applied everything `master` has, with the same state.
pub fn wait_in_sync(
    rt: &tokio::runtime::Runtime,
    master: &str,
    slave: &str,
    deadline: Duration,
) -> AccountServerStatus {
    wait_for("the slave to catch up", deadline, || {
        let (m, s) = rt.block_on(async { (status(master).await, status(slave).await) });
        (m.lsn == s.lsn && m.state_hash == s.state_hash).then_some(s)
    })
}
