//! Serving a set of gRPC services the way every Duplex server does: bound
//! to `--listen` (port 0 allowed; the real address is printed), with the
//! standard health service and reflection (v1 and v1alpha), and a graceful
//! drain on SIGTERM / SIGINT that first reports NOT_SERVING.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic_health::ServingStatus;

use crate::metrics::MetricsFn;

/// How long in-flight calls may run after shutdown begins.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("transport error: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A bound listener whose real address is known before serving starts.
pub struct Bound {
    listener: TcpListener,
    pub addr: SocketAddr,
}

/// Binds `listen` and prints `listening on http://ADDR` on stdout, the line
/// test harnesses and the playground read to learn a port-0 address.
pub async fn bind(listen: &str) -> Result<Bound, ServeError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen.to_owned(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: listen.to_owned(),
        source,
    })?;
    let mut out = std::io::stdout().lock();
    // Stdout closed (daemonised) is no reason to fail: the log line says it too.
    let _ = writeln!(out, "listening on {}://{addr}", crate::tls::scheme());
    let _ = out.flush();
    tracing::info!(%addr, "listening");
    Ok(Bound { listener, addr })
}

/// How a server is reached and who may call what.
pub struct Access<'a> {
    pub secured: &'a crate::security::Secured,
    pub policy: crate::auth::Policy,
}

/// Serves `routes` (whose fully qualified service names are `names`, for
/// health) on `bound` until `shutdown` is cancelled, then reports
/// NOT_SERVING and drains in-flight calls for at most [`DRAIN_DEADLINE`].
/// Every call passes the access policy's guard first.
pub async fn serve(
    bound: Bound,
    names: &[&'static str],
    routes: Routes,
    metrics: Option<MetricsFn>,
    access: Access<'_>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let names = names.to_vec();
    for name in &names {
        reporter.set_service_status(*name, ServingStatus::Serving).await;
    }
    reporter.set_service_status("", ServingStatus::Serving).await;

    // Advertise only what this server serves, not every service in the
    // shared descriptor set.
    let reflection = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(duplex_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection");
        for name in &names {
            builder = builder.with_service_name(*name);
        }
        builder
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let mut routes = routes
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    if let Some(render) = metrics {
        let router = routes.into_axum_router().route(
            "/metrics",
            axum::routing::get(move || {
                let render = render.clone();
                async move {
                    let body = crate::metrics::render(&render().await);
                    ([(http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body)
                }
            }),
        );
        routes = Routes::from(router);
    }

    let drain_started = CancellationToken::new();
    let signal = {
        let shutdown = shutdown.clone();
        let drain_started = drain_started.clone();
        async move {
            shutdown.cancelled().await;
            // Probes and load balancers see NOT_SERVING before connections close.
            reporter.set_service_status("", ServingStatus::NotServing).await;
            for name in names {
                reporter.set_service_status(name, ServingStatus::NotServing).await;
            }
            tracing::info!("shutting down: draining in-flight calls");
            drain_started.cancel();
        }
    };
    let guard = crate::auth::Guard::new(access.policy, access.secured.gate.clone());
    let server = tonic::transport::Server::builder()
        .accept_http1(true)
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(4 * 1024 * 1024))
        .initial_connection_window_size(Some(16 * 1024 * 1024))
        .max_frame_size(crate::MAX_FRAME_SIZE)
        .layer(guard)
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            crate::tls::accept(bound.listener, access.secured.tls.clone()),
            signal,
        );
    tokio::pin!(server);
    tokio::select! {
        res = &mut server => return res.map_err(ServeError::from),
        () = drain_started.cancelled() => {}
    }
    match tokio::time::timeout(DRAIN_DEADLINE, server).await {
        Ok(res) => res.map_err(ServeError::from),
        Err(_) => {
            tracing::warn!("drain deadline passed; closing remaining calls");
            Ok(())
        }
    }
}

/// A token cancelled on the first SIGTERM or SIGINT. The handlers are
/// installed before this returns, so a signal that arrives right after a
/// server says it is listening cannot kill it the default way.
pub fn shutdown_on_signals() -> CancellationToken {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let child = token.clone();
    let handlers = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    tokio::spawn(async move {
        let signal = match handlers {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                }
            }
            _ => {
                tracing::warn!("cannot install signal handlers; stopping on ctrl-c only");
                let _ = tokio::signal::ctrl_c().await;
                "ctrl-c"
            }
        };
        // Stop first, then say so: nothing may stand between a signal and
        // the shutdown, not even a log line.
        child.cancel();
        tracing::info!("{signal} received");
    });
    token
}
