//! Who may call what. Every server routes each call through a [`Guard`]
//! holding its policy: a table from method to [`Rule`], denying anything
//! it does not name. A call is let in on a server certificate of an
//! allowed kind (mutual TLS) or an operator token (`authorization: Bearer
//! T`) whose role covers the method; the caller is then attached to the
//! request for handlers that record or check it (audit, heartbeats).

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use duplex_types::{OperatorRole, ServerKind};
use tonic::Status;

use crate::tls::{Peer, ServerIdentity};

/// Metadata key of an operator token.
pub const AUTHORIZATION: &str = "authorization";

/// What a method requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// No credential: health, reflection, login, enrollment (its token is
    /// the credential), and the data API (its ticket is checked per call).
    Open,
    /// A server certificate of one of these kinds, or an operator whose
    /// role covers `operator` (none: no operator may).
    Allow {
        servers: &'static [ServerKind],
        operator: Option<OperatorRole>,
    },
    Deny,
}

impl Rule {
    pub const fn servers(servers: &'static [ServerKind]) -> Rule {
        Rule::Allow {
            servers,
            operator: None,
        }
    }

    pub const fn operators(role: OperatorRole) -> Rule {
        Rule::Allow {
            servers: &[],
            operator: Some(role),
        }
    }

    pub const fn servers_or(servers: &'static [ServerKind], role: OperatorRole) -> Rule {
        Rule::Allow {
            servers,
            operator: Some(role),
        }
    }
}

/// Every kind of server.
pub const ANY_SERVER: &[ServerKind] = &[
    ServerKind::Coordinator,
    ServerKind::Account,
    ServerKind::Storage,
    ServerKind::Mirror,
];

/// A server's policy: its own methods; the shared ones (health,
/// reflection, metrics) are handled before it is asked.
pub type Policy = fn(&str) -> Rule;

/// Who made a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Who {
    Server(ServerIdentity),
    Operator {
        name: String,
        role: OperatorRole,
    },
    /// An open method, or `--insecure-plaintext`.
    Anonymous,
}

#[derive(Clone, Debug)]
pub struct Caller {
    pub who: Who,
    /// The peer's address, for the audit trail.
    pub addr: String,
}

impl Caller {
    /// How the audit trail names this caller: `operator NAME (ROLE) from ADDR`.
    pub fn describe(&self) -> String {
        match &self.who {
            Who::Server(id) => format!("{id} from {}", self.addr),
            Who::Operator { name, role } => format!("{name} ({role}) from {}", self.addr),
            Who::Anonymous => format!("unauthenticated caller from {}", self.addr),
        }
    }

    /// The name recorded as `by` in history.
    pub fn name(&self) -> String {
        match &self.who {
            Who::Server(id) => id.name.clone(),
            Who::Operator { name, .. } => name.clone(),
            Who::Anonymous => "anonymous".into(),
        }
    }

    pub fn server(&self) -> Option<&ServerIdentity> {
        match &self.who {
            Who::Server(id) => Some(id),
            _ => None,
        }
    }
}

/// The caller of a request, as the guard attached it.
pub fn caller<T>(request: &tonic::Request<T>) -> Caller {
    request.extensions().get::<Caller>().cloned().unwrap_or(Caller {
        who: Who::Anonymous,
        addr: "unknown".into(),
    })
}

/// An operator token's hash and what it may do.
#[derive(Clone, Debug)]
pub struct OperatorKey {
    pub name: String,
    pub role: OperatorRole,
    pub hash: blake3::Hash,
}

/// The hash under which an operator token is kept.
pub fn token_hash(token: &str) -> blake3::Hash {
    blake3::hash(token.as_bytes())
}

/// What a guard checks against: operator token hashes and revoked
/// certificate serials, replaced whole when the coordinator pushes a new
/// version.
#[derive(Debug, Default)]
pub struct Gate {
    /// `--insecure-plaintext`: no certificates, so nothing to check.
    insecure: bool,
    state: RwLock<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    version: u64,
    operators: Vec<OperatorKey>,
    revoked: HashSet<String>,
}

impl Gate {
    pub fn new(insecure: bool) -> Arc<Gate> {
        Arc::new(Gate {
            insecure,
            state: RwLock::default(),
        })
    }

    pub fn insecure(&self) -> bool {
        self.insecure
    }

    pub fn version(&self) -> u64 {
        self.state.read().map_or(0, |s| s.version)
    }

    /// Replaces what the gate checks against.
    pub fn update(&self, version: u64, operators: Vec<OperatorKey>, revoked: HashSet<String>) {
        if let Ok(mut state) = self.state.write() {
            *state = GateState {
                version,
                operators,
                revoked,
            };
        }
    }

    /// The operator a token belongs to. Every stored hash is compared (in
    /// constant time, `blake3::Hash`'s equality), so timing tells nothing.
    fn operator(&self, token: &str) -> Option<(String, OperatorRole)> {
        let hash = token_hash(token);
        let state = self.state.read().ok()?;
        let mut found = None;
        for key in &state.operators {
            if key.hash == hash {
                found = Some((key.name.clone(), key.role));
            }
        }
        found
    }

    fn revoked(&self, serial: &str) -> bool {
        self.state.read().is_ok_and(|s| s.revoked.contains(serial))
    }

    /// Decides one call.
    pub fn check(
        &self,
        path: &str,
        rule: Rule,
        peer: Option<&Peer>,
        token: Option<&str>,
    ) -> Result<Caller, Status> {
        let addr = peer
            .and_then(|p| p.addr)
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let anonymous = Caller {
            who: Who::Anonymous,
            addr: addr.clone(),
        };
        if self.insecure || rule == Rule::Open {
            return Ok(self.identify(peer, token, anonymous));
        }
        let Rule::Allow { servers, operator } = rule else {
            return Err(Status::permission_denied(format!(
                "{path} is not served to anyone"
            )));
        };
        if let Some(cert) = peer.and_then(|p| p.cert.as_ref()) {
            if self.revoked(&cert.serial) {
                return Err(Status::unauthenticated(format!(
                    "the certificate of {} (serial {}) has been revoked",
                    cert.identity, cert.serial
                )));
            }
            if servers.contains(&cert.identity.kind) {
                return Ok(Caller {
                    who: Who::Server(cert.identity.clone()),
                    addr,
                });
            }
            if token.is_none() {
                return Err(Status::permission_denied(format!(
                    "a {} server may not call {path}",
                    cert.identity.kind
                )));
            }
        }
        let Some(token) = token else {
            let needs = match operator {
                Some(role) => format!("an operator token with role {role} or higher (--operator-token)"),
                None => "a server certificate of the right kind".to_owned(),
            };
            return Err(Status::unauthenticated(format!("{path} needs {needs}")));
        };
        let Some((name, role)) = self.operator(token) else {
            return Err(Status::unauthenticated(
                "unknown or revoked operator token".to_owned(),
            ));
        };
        match operator {
            Some(needed) if role.covers(needed) => Ok(Caller {
                who: Who::Operator { name, role },
                addr,
            }),
            Some(needed) => Err(Status::permission_denied(format!(
                "operator {name} has role {role}; {path} needs {needed}"
            ))),
            None => Err(Status::permission_denied(format!(
                "{path} is for servers only, not operators"
            ))),
        }
    }

    /// On an open method, still say who called when a credential was shown.
    fn identify(&self, peer: Option<&Peer>, token: Option<&str>, anonymous: Caller) -> Caller {
        if let Some(cert) = peer
            .and_then(|p| p.cert.as_ref())
            .filter(|c| !self.revoked(&c.serial))
        {
            return Caller {
                who: Who::Server(cert.identity.clone()),
                addr: anonymous.addr,
            };
        }
        if let Some((name, role)) = token.and_then(|t| self.operator(t)) {
            return Caller {
                who: Who::Operator { name, role },
                addr: anonymous.addr,
            };
        }
        anonymous
    }
}

/// The methods of these services (fully qualified names) that `policy`
/// denies: a test of each server's policy, so a new RPC cannot ship
/// unreachable (or be forgotten in the table).
pub fn methods_without_rule(policy: Policy, services: &[&str]) -> Vec<String> {
    use prost::Message;
    let Ok(set) = prost_types::FileDescriptorSet::decode(duplex_proto::FILE_DESCRIPTOR_SET) else {
        return vec!["<the descriptor set does not decode>".into()];
    };
    let mut missing = Vec::new();
    for file in &set.file {
        for service in &file.service {
            let full = format!("{}.{}", file.package(), service.name());
            if !services.contains(&full.as_str()) {
                continue;
            }
            for method in &service.method {
                let path = format!("/{full}/{}", method.name());
                if policy(&path) == Rule::Deny {
                    missing.push(path);
                }
            }
        }
    }
    missing
}

/// Methods every server serves to anyone.
fn shared_rule(path: &str) -> Option<Rule> {
    if path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.") {
        return Some(Rule::Open);
    }
    if path == "/metrics" {
        return Some(Rule::servers_or(&[ServerKind::Coordinator], OperatorRole::Viewer));
    }
    None
}

/// The bearer token of a request, if it carries one.
fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?;
    Some(token.trim()).filter(|t| !t.is_empty())
}

/// The tower layer that applies a policy to every call.
#[derive(Clone)]
pub struct Guard {
    policy: Policy,
    gate: Arc<Gate>,
}

impl Guard {
    pub fn new(policy: Policy, gate: Arc<Gate>) -> Self {
        Self { policy, gate }
    }
}

impl<S> tower::Layer<S> for Guard {
    type Service = Guarded<S>;

    fn layer(&self, inner: S) -> Guarded<S> {
        Guarded {
            inner,
            guard: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Guarded<S> {
    inner: S,
    guard: Guard,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Guarded<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Send,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let rule = shared_rule(&path).unwrap_or_else(|| (self.guard.policy)(&path));
        let peer = request.extensions().get::<Peer>();
        let decided = self
            .guard
            .gate
            .check(&path, rule, peer, bearer(request.headers()));
        match decided {
            Ok(caller) => {
                use tracing::Instrument;
                // Every log line a handler writes names the call and the caller.
                let span = tracing::info_span!("rpc", method = %path, from = %caller.addr);
                request.extensions_mut().insert(caller);
                let call = span.in_scope(|| self.inner.call(request));
                let started = std::time::Instant::now();
                let in_flight = crate::metrics::call_in_flight(&path);
                Box::pin(
                    async move {
                        let answered = call.await;
                        drop(in_flight);
                        crate::metrics::observe_rpc(&path, started.elapsed());
                        answered.map(|response| undecodable_is_invalid(&path, response))
                    }
                    .instrument(span),
                )
            }
            Err(status) => {
                crate::metrics::refused_call();
                let from = peer
                    .and_then(|p| p.addr)
                    .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
                tracing::warn!(method = %path, %from, code = ?status.code(), reason = status.message(), "call refused");
                let response = status.into_http();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

/// How tonic-prost 0.14 reports a request it cannot decode: it answers
/// `Internal` with prost's `DecodeError` text, which always starts so.
const DECODE_FAILURE: &str = "failed to decode Protobuf message: ";

/// A request the server cannot decode (a string field that is not UTF-8,
/// a truncated varint) is the caller's fault, yet tonic answers
/// `Internal`. Rewrite such an answer to `InvalidArgument` naming the
/// problem. tonic decodes a unary or server-streaming request before the
/// handler runs, and a client-streaming handler fails before it answers,
/// so the status is in the headers of a trailers-only response, which is
/// the only place looked at: a bidirectional stream that fails to decode
/// after it has started answering keeps tonic's `Internal` in its trailers.
fn undecodable_is_invalid(
    path: &str,
    response: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    let Some(detail) = status.message().strip_prefix(DECODE_FAILURE) else {
        return response;
    };
    if status.code() != tonic::Code::Internal {
        return response;
    }
    let hint = if detail.contains("not UTF-8") {
        " (string fields must be UTF-8)"
    } else {
        ""
    };
    // The path is `/duplex.v1.Service/Method`; prost names the message type.
    let method = path.trim_start_matches('/');
    tracing::debug!(method, detail, "undecodable request");
    Status::invalid_argument(format!(
        "the request to {method} is not a valid message: {detail}{hint}"
    ))
    .into_http()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::PeerCert;

    fn peer(kind: ServerKind, serial: &str) -> Peer {
        Peer {
            addr: None,
            cert: Some(PeerCert {
                identity: ServerIdentity {
                    site: "a".into(),
                    kind,
                    name: format!("{kind}-a"),
                },
                serial: serial.into(),
            }),
            unnamed_cert: false,
        }
    }

    fn gate() -> Arc<Gate> {
        let gate = Gate::new(false);
        gate.update(
            1,
            vec![
                OperatorKey {
                    name: "alice".into(),
                    role: OperatorRole::Admin,
                    hash: token_hash("alice-token"),
                },
                OperatorKey {
                    name: "vic".into(),
                    role: OperatorRole::Viewer,
                    hash: token_hash("vic-token"),
                },
            ],
            ["dead".to_owned()].into_iter().collect(),
        );
        gate
    }

    const SET_ROLE: Rule = Rule::servers(&[ServerKind::Coordinator]);
    const FAILOVER: Rule = Rule::operators(OperatorRole::Operator);

    #[test]
    fn servers_by_kind_operators_by_role() {
        let g = gate();
        let code = |r: Result<Caller, Status>| r.map(|_| ()).map_err(|s| s.code());
        use tonic::Code::{PermissionDenied, Unauthenticated};
        assert_eq!(
            code(g.check("/x", SET_ROLE, Some(&peer(ServerKind::Coordinator, "1")), None)),
            Ok(())
        );
        assert_eq!(
            code(g.check("/x", SET_ROLE, Some(&peer(ServerKind::Storage, "1")), None)),
            Err(PermissionDenied)
        );
        assert_eq!(
            code(g.check("/x", SET_ROLE, Some(&peer(ServerKind::Coordinator, "dead")), None)),
            Err(Unauthenticated)
        );
        assert_eq!(code(g.check("/x", SET_ROLE, None, None)), Err(Unauthenticated));
        assert_eq!(
            code(g.check("/x", SET_ROLE, None, Some("alice-token"))),
            Err(PermissionDenied)
        );
        assert_eq!(code(g.check("/x", FAILOVER, None, Some("alice-token"))), Ok(()));
        assert_eq!(
            code(g.check("/x", FAILOVER, None, Some("vic-token"))),
            Err(PermissionDenied)
        );
        assert_eq!(
            code(g.check("/x", FAILOVER, None, Some("nope"))),
            Err(Unauthenticated)
        );
        assert_eq!(code(g.check("/x", FAILOVER, None, None)), Err(Unauthenticated));
        assert_eq!(
            code(g.check("/x", Rule::Deny, None, Some("alice-token"))),
            Err(PermissionDenied)
        );
        assert_eq!(code(g.check("/x", Rule::Open, None, None)), Ok(()));
        let audited = g
            .check("/x", FAILOVER, None, Some("alice-token"))
            .expect("allowed");
        assert_eq!(audited.name(), "alice");
    }

    #[test]
    fn undecodable_requests_are_invalid_arguments() {
        let path = "/duplex.v1.AccountAdmin/CreateAccount";
        let tonic_says = Status::internal(
            "failed to decode Protobuf message: CreateAccountRequest.name: invalid string value: data is not UTF-8 encoded",
        );
        let rewritten = undecodable_is_invalid(path, tonic_says.into_http());
        let status = Status::from_header_map(rewritten.headers()).expect("a status");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("duplex.v1.AccountAdmin/CreateAccount"));
        assert!(status.message().contains("CreateAccountRequest.name"));
        assert!(status.message().ends_with("(string fields must be UTF-8)"));
        // A handler's own Internal error is left alone.
        let own = undecodable_is_invalid(path, Status::internal("disk full").into_http());
        let status = Status::from_header_map(own.headers()).expect("a status");
        assert_eq!(status.code(), tonic::Code::Internal);
    }

    #[test]
    fn insecure_mode_checks_nothing() {
        let g = Gate::new(true);
        assert!(g.check("/x", SET_ROLE, None, None).is_ok());
    }

    #[test]
    fn bearer_parsing() {
        let mut h = http::HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(AUTHORIZATION, "Bearer abc".parse().expect("header"));
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(AUTHORIZATION, "Basic abc".parse().expect("header"));
        assert_eq!(bearer(&h), None);
    }
}
