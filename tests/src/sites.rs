//! Two storage servers with a mirror between them (and one account
//! server), as real processes on loopback.

use std::path::Path;

use duplex_proto::v1::storage_admin_client::StorageAdminClient;
use duplex_proto::v1::{GetStorageStatusRequest, SetRoleRequest, StorageServerStatus};

use crate::{Service, bin};

pub fn storage(dir: &Path, name: &str, site: &str, account: &str, extra: &[&str]) -> Service {
    let mut cmd = vec![
        bin("duplex-storage-server").display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        dir.join(name).display().to_string(),
        "--name".into(),
        name.into(),
        "--site".into(),
        site.into(),
        "--account-servers".into(),
        account.into(),
        "--insecure-plaintext".into(),
    ];
    cmd.extend(extra.iter().map(|s| s.to_string()));
    Service::start(name, cmd, &dir.join(format!("{name}.log")))
}

/// A mirror running `links` (each "SRC=DST").
pub fn mirror(dir: &Path, name: &str, links: &[String], extra: &[&str]) -> Service {
    let mut cmd = vec![
        bin("duplex-mirror").display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--name".into(),
        name.into(),
        "--insecure-plaintext".into(),
    ];
    for l in links {
        cmd.extend(["--link".to_owned(), l.clone()]);
    }
    cmd.extend(extra.iter().map(|s| s.to_string()));
    Service::start(name, cmd, &dir.join(format!("{name}.log")))
}

pub async fn status(addr: &str) -> Option<StorageServerStatus> {
    let mut admin = StorageAdminClient::new(duplex_rpc::channel(addr).ok()?);
    admin
        .get_status(GetStorageStatusRequest {})
        .await
        .ok()
        .map(|s| s.into_inner())
}

pub async fn set_role(addr: &str, role: &str, epoch: u64, primary: &str) -> StorageServerStatus {
    let mut admin = StorageAdminClient::new(duplex_rpc::channel(addr).unwrap());
    admin
        .set_role(SetRoleRequest {
            role: role.into(),
            epoch,
            primary: primary.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Total size of the pack files under a storage server's data dir: every
/// chunk byte it ever received, committed or not.
pub fn pack_bytes(data_dir: &Path) -> u64 {
    std::fs::read_dir(data_dir.join("packs"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
