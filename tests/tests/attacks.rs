//! The attack suite: what an attacker on the network tries against a
//! running two-site platform (real processes, TLS and enrollment as
//! deployed), each attempt's result asserted, and a table of what was
//! tried and refused printed at the end.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use duplex_tests::runtime;
use duplex_tests::twosite::{Options, TwoSites};
use tonic::Code;
use tonic::transport::Channel;

/// Every code but OK.
const ANY_FAILURE: &[Code] = &[
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

/// One attempt and what came of it.
struct Row {
    attack: String,
    got: String,
    refused: bool,
}

#[derive(Default)]
struct Suite {
    rows: Vec<Row>,
}

impl Suite {
    /// Records an attempt that must fail with one of `codes`.
    fn expect(&mut self, attack: impl Into<String>, codes: &[Code], result: Result<(), tonic::Status>) {
        let (got, refused) = match &result {
            Ok(()) => ("OK".to_owned(), false),
            Err(s) => (format!("{:?}", s.code()), codes.contains(&s.code())),
        };
        self.rows.push(Row {
            attack: attack.into(),
            got,
            refused,
        });
    }

    fn report(&self) {
        println!("\n{:<96} RESULT", "ATTEMPT");
        for r in &self.rows {
            println!(
                "{:<96} {} ({})",
                r.attack,
                if r.refused { "refused" } else { "NOT REFUSED" },
                r.got
            );
        }
        let refused = self.rows.iter().filter(|r| r.refused).count();
        println!("\n{} attempts, {refused} refused\n", self.rows.len());
        let open: Vec<_> = self
            .rows
            .iter()
            .filter(|r| !r.refused)
            .map(|r| &r.attack)
            .collect();
        assert!(open.is_empty(), "not refused as expected: {open:#?}");
    }
}

/// Who an attempt is made as.
#[derive(Clone)]
enum As {
    Nobody,
    Token(String),
    /// A server certificate and key (PEM).
    Cert(String, String),
}

/// Calls `path` with an empty request message, as `who`.
async fn call(sites: &TwoSites, addr: &str, path: &str, who: &As) -> Result<(), tonic::Status> {
    let channel = channel_as(sites, addr, who);
    let mut request = tonic::Request::new(());
    if let As::Token(t) = who {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    raw_unary(channel, path, request).await
}

/// A TLS channel to `addr`, presenting `who`'s certificate if it is one.
fn channel_as(sites: &TwoSites, addr: &str, who: &As) -> Channel {
    match who {
        As::Cert(cert, key) => {
            let roots = duplex_rpc::tls::roots(Some(&sites.ca)).unwrap();
            let creds = Arc::new(duplex_rpc::tls::Credentials::from_pem(cert, key).unwrap());
            let config = duplex_rpc::tls::client_config(roots, Some(creds)).unwrap();
            duplex_rpc::client::channel_with(addr, config).unwrap()
        }
        _ => duplex_rpc::channel(addr).unwrap(),
    }
}

/// An empty message: every request decodes from it (all fields default),
/// and any answer decodes into it.
#[derive(Clone, PartialEq, prost::Message)]
struct Nothing {}

async fn raw_unary(channel: Channel, path: &str, request: tonic::Request<()>) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    let (metadata, extensions, ()) = request.into_parts();
    let request = tonic::Request::from_parts(metadata, extensions, Nothing {});
    let codec = tonic_prost::ProstCodec::<Nothing, Nothing>::default();
    let path = http::uri::PathAndQuery::from_str(path).unwrap();
    let attempt = async {
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        grpc.unary(request, path, codec).await.map(|_| ())
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer")))
}

/// Every method of these services, from the descriptor set the servers serve.
fn methods(services: &[&str]) -> Vec<String> {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(duplex_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut out = Vec::new();
    for file in &set.file {
        for service in &file.service {
            let full = format!("{}.{}", file.package(), service.name());
            if services.contains(&full.as_str()) {
                out.extend(service.method.iter().map(|m| format!("/{full}/{}", m.name())));
            }
        }
    }
    out
}

/// Methods an anonymous caller may reach at all (their own credential is
/// in the request: a ticket, an account token, an enrollment token).
fn open_by_design(path: &str) -> bool {
    path.starts_with("/duplex.v1.StorageService/")
        || path.starts_with("/duplex.v1.AccountService/") && !path.ends_with("/GetTicketKeys")
        || matches!(
            path,
            "/duplex.v1.Coordinator/Enroll"
                | "/duplex.v1.Coordinator/GetTopology"
                | "/duplex.v1.Coordinator/WatchTopology"
        )
}

/// State-changing methods and those only servers may call: what a viewer must never do.
fn beyond_viewer(path: &str) -> bool {
    let read_only = [
        "/GetStatus",
        "/GetOperation",
        "/History",
        "/ListAccounts",
        "/ListGroups",
        "/ListStorageServers",
        "/ListUsage",
        "/GetTopology",
        "/WatchTopology",
    ];
    !open_by_design(path) && !read_only.iter().any(|m| path.ends_with(m))
}

/// What an `operator` must not do: credentials, the CA, and server-only calls.
fn beyond_operator(path: &str) -> bool {
    let operator_may = [
        "/Failover",
        "/Switchover",
        "/Failback",
        "/Resync",
        "/Cancel",
        "/CreateAccount",
        "/CreateAccounts",
        "/SetGroupEnabled",
        "/Reapply",
        "/VerifyAccounts",
        "/RepairChunks",
        "/CollectGarbage",
        "/DeleteAccount",
        "/SetQuota",
        "/RotateToken",
        "/SetGroupPolicy",
    ];
    beyond_viewer(path) && !operator_may.iter().any(|m| path.ends_with(m))
}

fn tls_material(dir: &Path) -> (String, String) {
    (
        std::fs::read_to_string(dir.join("tls/server.pem")).unwrap(),
        std::fs::read_to_string(dir.join("tls/server.key")).unwrap(),
    )
}

#[test]
fn network_attacks_are_refused() {
    let sites = TwoSites::start(Options::default());
    let rt = runtime();
    let mut suite = Suite::default();
    let servers: Vec<(&str, &str, Vec<&str>)> = vec![
        (
            "coordinator",
            &sites.coordinator.addr,
            vec!["duplex.v1.Coordinator"],
        ),
        (
            "account-a",
            &sites.account_a.addr,
            vec![
                "duplex.v1.AccountService",
                "duplex.v1.AccountAdmin",
                "duplex.v1.AccountReplication",
            ],
        ),
        (
            "account-b",
            &sites.account_b.addr,
            vec!["duplex.v1.AccountAdmin", "duplex.v1.AccountReplication"],
        ),
        (
            "storage-a",
            &sites.storage_a.addr,
            vec!["duplex.v1.StorageAdmin", "duplex.v1.StorageReplication"],
        ),
        (
            "storage-b",
            &sites.storage_b.addr,
            vec!["duplex.v1.StorageAdmin", "duplex.v1.StorageReplication"],
        ),
        ("mirror-a", &sites.mirror_a.addr, vec!["duplex.v1.Mirror"]),
        ("mirror-b", &sites.mirror_b.addr, vec!["duplex.v1.Mirror"]),
    ];

    let addr_of = |name: &str| servers.iter().find(|s| s.0 == name).unwrap().1.to_owned();

    // Plaintext on every port: the TLS handshake never happens.
    for (name, addr, _) in &servers {
        let plain = addr.replacen("https://", "http://", 1);
        let result = rt.block_on(async {
            let channel = tonic::transport::Endpoint::from_shared(plain)
                .unwrap()
                .connect_lazy();
            raw_unary(channel, "/grpc.health.v1.Health/Check", tonic::Request::new(())).await
        });
        // Any failure will do (how a broken handshake surfaces varies);
        // an answer would not.
        suite.expect(format!("plaintext gRPC to {name}"), ANY_FAILURE, result);
    }

    // Every method of every service without any credential.
    for (name, addr, services) in &servers {
        for path in methods(services).into_iter().filter(|p| !open_by_design(p)) {
            let result = rt.block_on(call(&sites, addr, &path, &As::Nobody));
            suite.expect(
                format!("{path} on {name}, no credential"),
                &[Code::Unauthenticated],
                result,
            );
        }
    }

    // A viewer and an operator beyond their roles; a revoked operator.
    let viewer = sites.create_operator("vera", "viewer");
    let oper = sites.create_operator("otto", "operator");
    // New operators reach every server with its next heartbeat answer.
    for (name, addr, services) in &servers {
        let read = methods(services)
            .into_iter()
            .find(|p| p.ends_with("/GetStatus"))
            .unwrap();
        duplex_tests::wait_for(
            &format!("{name} to know the new operators"),
            Duration::from_secs(10),
            // Both: they were created one after the other, and a heartbeat
            // answer between the two carries only the first.
            || {
                let knows = |token: &str| {
                    rt.block_on(call(&sites, addr, &read, &As::Token(token.to_owned())))
                        .is_ok()
                };
                (knows(&viewer) && knows(&oper)).then_some(())
            },
        );
    }
    for (name, addr, services) in &servers {
        for path in methods(services) {
            if beyond_viewer(&path) {
                let result = rt.block_on(call(&sites, addr, &path, &As::Token(viewer.clone())));
                suite.expect(
                    format!("{path} on {name} as a viewer"),
                    &[Code::PermissionDenied],
                    result,
                );
            }
            if beyond_operator(&path) {
                let result = rt.block_on(call(&sites, addr, &path, &As::Token(oper.clone())));
                suite.expect(
                    format!("{path} on {name} as an operator"),
                    &[Code::PermissionDenied],
                    result,
                );
            }
        }
    }
    let forged = As::Token("0".repeat(64));
    let result = rt.block_on(call(
        &sites,
        &sites.coordinator.addr,
        "/duplex.v1.Coordinator/GetStatus",
        &forged,
    ));
    suite.expect(
        "GetStatus with a made-up operator token",
        &[Code::Unauthenticated],
        result,
    );
    sites.ctl_ok(&["operators", "revoke", "otto"]);
    duplex_tests::wait_for(
        "storage-a to forget the revoked operator",
        Duration::from_secs(10),
        || {
            let r = rt.block_on(call(
                &sites,
                &addr_of("storage-a"),
                "/duplex.v1.StorageAdmin/VerifyAccounts",
                &As::Token(oper.clone()),
            ));
            matches!(r, Err(s) if s.code() == Code::Unauthenticated).then_some(())
        },
    );
    let result = rt.block_on(call(
        &sites,
        &addr_of("storage-a"),
        "/duplex.v1.StorageAdmin/VerifyAccounts",
        &As::Token(oper.clone()),
    ));
    suite.expect(
        "VerifyAccounts on storage-a with a revoked operator token",
        &[Code::Unauthenticated],
        result,
    );
    let revoked = sites.ctl_as(&oper, &["failover", "--force"]);
    suite.expect(
        "duplexctl failover --force with a revoked operator token",
        &[Code::Unauthenticated],
        refused_if(
            !revoked.status.success()
                && String::from_utf8_lossy(&revoked.stderr).contains("unknown or revoked"),
        )
        .map_err(|_| tonic::Status::unauthenticated("refused")),
    );

    // Certificates of the wrong kind, and one from another CA.
    let mirror = {
        let (c, k) = tls_material(&sites.path("mirror-a"));
        As::Cert(c, k)
    };
    let storage_b = {
        let (c, k) = tls_material(&sites.path("storage-b"));
        As::Cert(c, k)
    };
    let account_b = {
        let (c, k) = tls_material(&sites.path("account-b"));
        As::Cert(c, k)
    };
    let wrong_kind: Vec<(&str, &str, &str, &As)> = vec![
        (
            "mirror-a",
            "storage-a",
            "/duplex.v1.StorageAdmin/SetRole",
            &mirror,
        ),
        (
            "mirror-a",
            "account-a",
            "/duplex.v1.AccountReplication/Promote",
            &mirror,
        ),
        (
            "mirror-a",
            "account-a",
            "/duplex.v1.AccountReplication/Demote",
            &mirror,
        ),
        (
            "mirror-a",
            "account-a",
            "/duplex.v1.AccountReplication/GetStateSnapshot",
            &mirror,
        ),
        (
            "mirror-a",
            "account-a",
            "/duplex.v1.AccountAdmin/MoveHomes",
            &mirror,
        ),
        (
            "mirror-a",
            "coordinator",
            "/duplex.v1.Coordinator/Failover",
            &mirror,
        ),
        (
            "storage-b",
            "storage-a",
            "/duplex.v1.StorageReplication/ChangeFeed",
            &storage_b,
        ),
        (
            "storage-b",
            "storage-a",
            "/duplex.v1.StorageReplication/PullBatch",
            &storage_b,
        ),
        (
            "mirror-a",
            "storage-a",
            "/duplex.v1.StorageReplication/ReadChunks",
            &mirror,
        ),
        (
            "account-b",
            "storage-a",
            "/duplex.v1.StorageReplication/ReadChunks",
            &account_b,
        ),
        (
            "storage-b",
            "account-a",
            "/duplex.v1.AccountReplication/GetStateSnapshot",
            &storage_b,
        ),
        (
            "storage-b",
            "account-a",
            "/duplex.v1.AccountReplication/Replicate",
            &storage_b,
        ),
        ("account-b", "mirror-a", "/duplex.v1.Mirror/SetLinks", &account_b),
        (
            "account-b",
            "storage-a",
            "/duplex.v1.StorageAdmin/SetRole",
            &account_b,
        ),
        (
            "account-b",
            "coordinator",
            "/duplex.v1.Coordinator/IssueEnrollmentToken",
            &account_b,
        ),
    ];
    for (cert, target, path, who) in wrong_kind {
        let result = rt.block_on(call(&sites, &addr_of(target), path, who));
        suite.expect(
            format!("{path} on {target} with {cert}'s certificate"),
            &[Code::PermissionDenied],
            result,
        );
    }
    // A heartbeat in another server's name, and a storage server
    // registering itself as another (the "backups redirected" attack).
    let result = rt.block_on(heartbeat_as(&sites, &storage_b, "storage-a"));
    suite.expect(
        "heartbeat for storage-a with storage-b's certificate",
        &[Code::PermissionDenied],
        result,
    );
    let result = rt.block_on(register_as(
        &sites,
        &addr_of("account-a"),
        &storage_b,
        "storage-a",
    ));
    suite.expect(
        "RegisterStorageServer of storage-a with storage-b's certificate",
        &[Code::PermissionDenied],
        result,
    );

    // A certificate naming the coordinator, signed by another CA.
    let rogue_dir = sites.path("rogue-ca");
    let rogue = duplex_rpc::pki::Ca::init(&rogue_dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let identity = duplex_rpc::security::identity(duplex_types::ServerKind::Coordinator, "a", "coordinator");
    let issued = rogue
        .issue_for_key(&key, &identity, &["127.0.0.1".into()], Duration::from_secs(3600))
        .unwrap();
    let foreign = As::Cert(issued.cert_pem, key.serialize_pem());
    let result = rt.block_on(call(
        &sites,
        &addr_of("storage-a"),
        "/duplex.v1.StorageAdmin/SetRole",
        &foreign,
    ));
    suite.expect(
        "SetRole on storage-a with a coordinator certificate from another CA",
        ANY_FAILURE,
        result,
    );

    // Identity takeover: a token for a name that is enrolled.
    let out = sites.ctl(&[
        "servers",
        "token",
        "storage-a",
        "--site",
        "a",
        "--kind",
        "storage",
    ]);
    suite.expect(
        "enrollment token for the enrolled name storage-a",
        &[Code::PermissionDenied],
        refused_if(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("already enrolled"),
        ),
    );

    // A rogue process enrolling over the wire: without a token, with a
    // made-up one, and with one already spent.
    let (_key, csr) = duplex_rpc::pki::key_and_csr(&["127.0.0.1".into()]).unwrap();
    for (what, token) in [("no", String::new()), ("a made-up", "7".repeat(64))] {
        let result = rt.block_on(enroll_as(&sites, &token, &csr, "rogue-1"));
        suite.expect(
            format!("Enroll rogue-1 with {what} enrollment token"),
            &[Code::Unauthenticated, Code::PermissionDenied],
            result,
        );
    }
    let issued = sites.ctl_json(&["servers", "token", "rogue-2", "--site", "a", "--kind", "storage"]);
    let token = issued["token"].as_str().unwrap().to_owned();
    rt.block_on(enroll_as(&sites, &token, &csr, "rogue-2"))
        .expect("the first use of a token enrolls");
    let result = rt.block_on(enroll_as(&sites, &token, &csr, "rogue-2"));
    suite.expect(
        "Enroll rogue-2 again with its spent token",
        &[Code::PermissionDenied],
        result,
    );

    one_account_against_another(&sites, &rt, &mut suite);

    // At rest: data dirs, keys, tokens and databases are their owner's only.
    for name in [
        "coordinator",
        "account-a",
        "account-b",
        "storage-a",
        "storage-b",
        "mirror-a",
        "mirror-b",
    ] {
        let dir = sites.path(name);
        suite.expect(
            format!("{name}'s data dir readable by others"),
            &[Code::PermissionDenied],
            refused_if(mode(&dir) == 0o700),
        );
    }
    for file in [
        "coordinator/admin-token",
        "coordinator/ca/ca.key",
        "coordinator/coordinator.redb",
        "account-a/accounts.redb",
        "storage-a/meta.redb",
        "account-a/tls/server.key",
        "storage-a/tls/server.key",
        "mirror-a/tls/server.key",
        "tokens/storage-a",
    ] {
        suite.expect(
            format!("{file} readable by others"),
            &[Code::PermissionDenied],
            refused_if(mode(&sites.path(file)) == 0o600),
        );
    }
    // No server's argv holds a secret.
    for service in [&sites.account_a, &sites.storage_a, &sites.mirror_a] {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", service.pid())).unwrap();
        let token = std::fs::read(sites.path(&format!("tokens/{}", service.name))).unwrap();
        let leaked = cmdline.windows(token.len()).any(|w| w == token.as_slice());
        suite.expect(
            format!("{}'s enrollment token in /proc/PID/cmdline", service.name),
            &[Code::PermissionDenied],
            refused_if(!leaked),
        );
    }
    suite.report();
}

/// A refusal when `refused`, else a success (recorded as not refused).
fn refused_if(refused: bool) -> Result<(), tonic::Status> {
    if refused {
        Err(tonic::Status::permission_denied("refused"))
    } else {
        Ok(())
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

async fn heartbeat_as(sites: &TwoSites, who: &As, name: &str) -> Result<(), tonic::Status> {
    use duplex_proto::v1::coordinator_client::CoordinatorClient;
    use duplex_proto::v1::{HeartbeatRequest, ServerInfo};
    let channel = channel_as(sites, &sites.coordinator.addr, who);
    CoordinatorClient::new(channel)
        .heartbeat(HeartbeatRequest {
            server: Some(ServerInfo {
                id: "00000000-0000-4000-8000-00000000000a".into(),
                name: name.into(),
                site: "a".into(),
                kind: "storage".into(),
                addr: "https://127.0.0.1:9".into(),
                public_addr: String::new(),
            }),
            role: "primary".into(),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

async fn register_as(sites: &TwoSites, account: &str, who: &As, name: &str) -> Result<(), tonic::Status> {
    use duplex_proto::v1::account_admin_client::AccountAdminClient;
    use duplex_proto::v1::{RegisterStorageServerRequest, ServerInfo};
    let channel = channel_as(sites, account, who);
    AccountAdminClient::new(channel)
        .register_storage_server(RegisterStorageServerRequest {
            server: Some(ServerInfo {
                id: "00000000-0000-4000-8000-00000000000b".into(),
                name: name.into(),
                site: "a".into(),
                kind: "storage".into(),
                addr: "https://127.0.0.1:9".into(),
                public_addr: String::new(),
            }),
        })
        .await
        .map(|_| ())
}

async fn enroll_as(sites: &TwoSites, token: &str, csr: &str, name: &str) -> Result<(), tonic::Status> {
    use duplex_proto::v1::EnrollRequest;
    use duplex_proto::v1::coordinator_client::CoordinatorClient;
    CoordinatorClient::new(channel_as(sites, &sites.coordinator.addr, &As::Nobody))
        .enroll(EnrollRequest {
            token: token.into(),
            csr_pem: csr.into(),
            name: name.into(),
            site: "a".into(),
            kind: "storage".into(),
        })
        .await
        .map(|_| ())
}

type Storage = duplex_proto::v1::storage_service_client::StorageServiceClient<
    tonic::service::interceptor::InterceptedService<Channel, duplex_tests::WithTicket>,
>;

/// The storage data API of `token`'s home, with a ticket for `purpose`.
async fn storage_as(sites: &TwoSites, token: &str, purpose: duplex_proto::v1::Purpose) -> Storage {
    let ticket = duplex_tests::login(&sites.account_a.addr, token, purpose)
        .await
        .ticket;
    duplex_proto::v1::storage_service_client::StorageServiceClient::with_interceptor(
        duplex_rpc::channel(&sites.storage_a.addr).unwrap(),
        duplex_tests::WithTicket::new(&ticket),
    )
}

/// One account holder against another's data: listing, restoring,
/// fetching by chunk id, and overwriting a chunk it knows the id of.
fn one_account_against_another(sites: &TwoSites, rt: &tokio::runtime::Runtime, suite: &mut Suite) {
    use duplex_proto::v1::{Chunk, GetChunksRequest, ListSnapshotsRequest, Purpose};
    let alice = sites.create_account("alice", None, Some("storage-a"));
    let mallory = sites.create_account("mallory", None, Some("storage-a"));
    let src = sites.path("alice-files");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("diary"), duplex_tests::tree::random_bytes(7, 300_000)).unwrap();
    let snapshot = sites.backup(&alice, &src);

    let listed = sites.duplex(&mallory, &["snapshots", "--json"]);
    let seen = String::from_utf8_lossy(&listed.stdout).contains(&snapshot);
    suite.expect(
        "mallory lists alice's snapshots",
        &[Code::PermissionDenied],
        refused_if(!seen),
    );
    let target = sites.path("stolen");
    let out = sites.duplex(
        &mallory,
        &["restore", &snapshot, "--target", target.to_str().unwrap()],
    );
    suite.expect(
        "mallory restores alice's snapshot by id",
        &[Code::PermissionDenied],
        refused_if(!out.status.success() && !target.join("alice-files/diary").exists()),
    );

    // The ids of alice's manifest chunks, as the server sees them.
    let ids = rt.block_on(async {
        let mut storage = storage_as(sites, &alice, Purpose::Read).await;
        let list = storage.list_snapshots(ListSnapshotsRequest {}).await.unwrap();
        list.into_inner().snapshots[0].manifest_chunks.clone()
    });
    let fetched = rt.block_on(async {
        let mut storage = storage_as(sites, &mallory, Purpose::Read).await;
        let mut stream = storage
            .get_chunks(GetChunksRequest { ids: ids.clone() })
            .await?
            .into_inner();
        stream.message().await.map(|_| ())
    });
    suite.expect("mallory fetches alice's chunks by id", &[Code::NotFound], fetched);

    // Mallory uploads garbage under alice's chunk id: it lands in
    // mallory's account only, and alice's restore is untouched.
    let garbage = {
        let mut data = vec![1u8];
        data.extend_from_slice(&[0; 64]);
        Chunk {
            id: ids[0].clone(),
            data_hash: duplex_types::sealed::payload_hash(&data).to_vec(),
            data: data.into(),
        }
    };
    rt.block_on(async {
        let mut storage = storage_as(sites, &mallory, Purpose::Backup).await;
        storage.put_chunks(futures::stream::iter(vec![garbage])).await
    })
    .expect("mallory may store any chunk in her own account");
    let restored = sites.restore(&alice, &snapshot, "alice-restored");
    let intact = std::fs::read(restored.join("alice-files/diary")).unwrap()
        == duplex_tests::tree::random_bytes(7, 300_000);
    suite.expect(
        "mallory overwrites alice's chunk by id",
        &[Code::PermissionDenied],
        refused_if(intact),
    );
}
