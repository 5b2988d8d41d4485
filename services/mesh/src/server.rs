//! The bootstrap every baton server goes through: the given gRPC services plus gRPC health and
//! reflection, behind the [`MeshLayer`], with `/metrics` on its own listener and a graceful
//! shutdown bounded by the configured grace.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::auth::AuthConfig;
use crate::config::ServeOptions;
use crate::layer::MeshLayer;

/// Errors of the bootstrap.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The gRPC transport failed.
    #[error("grpc server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not be built from the descriptor set.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The TLS certificate, key or CA cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The metrics listener failed.
    #[error("metrics server failed: {0}")]
    Metrics(std::io::Error),
}

/// Binds a TCP listener, mapping the failure to [`Error::Bind`].
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })
}

/// Binds a TCP listener, or ends the process as a configuration error (exit 64, one line: `baton:
/// bad config: cannot listen on ADDR: …`): a port in use is the operator's to fix, not a crash.
pub async fn bind_or_exit(addr: SocketAddr) -> TcpListener {
    bind(addr).await.unwrap_or_else(|e| crate::config::exit_bad_config(e))
}

/// A gRPC server under construction: add services, then [`MeshServer::serve`].
pub struct MeshServer {
    options: ServeOptions,
    auth: AuthConfig,
    routes: RoutesBuilder,
    names: Vec<(&'static str, bool)>,
    health: HealthReporter,
    /// The health service, shared by gRPC and `/health`.
    health_service: Arc<tonic_health::server::HealthService>,
}

impl MeshServer {
    /// A server with no services yet.
    pub fn new(options: ServeOptions, auth: AuthConfig) -> Self {
        // The recorder is installed now, before any request or background task records: a metric
        // recorded before it exists is lost (the `/metrics` task used to install it when it first
        // ran, which under load could be after the first requests).
        crate::telemetry::metrics();
        let health = HealthReporter::new();
        let health_service = Arc::new(tonic_health::server::HealthService::from_health_reporter(health.clone()));
        Self { options, auth, routes: RoutesBuilder::default(), names: Vec::new(), health, health_service }
    }

    /// The reporter of this server's gRPC health, for services whose readiness changes.
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    /// Adds a service, reported SERVING once the server runs.
    pub fn add_service<S>(self, service: S) -> Self
    where
        S: tower::Service<http::Request<Body>, Error = Infallible> + NamedService + Clone + Send + Sync + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.add_service_with_health(service, true)
    }

    /// Adds a service whose health starts SERVING or NOT_SERVING; the service updates it through
    /// [`MeshServer::health`].
    pub fn add_service_with_health<S>(mut self, service: S, serving: bool) -> Self
    where
        S: tower::Service<http::Request<Body>, Error = Infallible> + NamedService + Clone + Send + Sync + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.names.push((S::NAME, serving));
        self.routes.add_service(service);
        self
    }

    /// Serves until `shutdown` is cancelled, then drains for at most the shutdown grace.
    /// `/metrics` is served on `metrics` until then too.
    pub async fn serve(
        self,
        listener: TcpListener,
        metrics: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let Self { options, auth, mut routes, names, health, health_service } = self;
        for (name, serving) in &names {
            let status = if *serving { ServingStatus::Serving } else { ServingStatus::NotServing };
            health.set_service_status(*name, status).await;
        }
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        routes.add_service(tonic_health::pb::health_server::HealthServer::from_arc(health_service.clone()));
        routes.add_service(reflection_v1);
        routes.add_service(reflection_v1alpha);

        let tls = crate::tls::ServerTls::load(&options.tls).map_err(Error::Tls)?;
        // served through the drain (probes see NOT_SERVING), ended when the server is
        let metrics_task = tokio::spawn(serve_metrics(metrics, health_service.clone()));
        let grace = options.shutdown_grace;
        let router = tonic::transport::Server::builder().layer(MeshLayer::new(auth)).add_routes(routes.routes());
        let stop = shutdown.clone().cancelled_owned();
        let server: std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> = match tls {
            Some(tls) => Box::pin(router.serve_with_incoming_shutdown(tls.incoming(listener, shutdown.clone()), stop)),
            None => Box::pin(router.serve_with_incoming_shutdown(incoming(listener), stop)),
        };
        let drain_deadline = async {
            shutdown.cancelled().await;
            // Report NOT_SERVING while draining, so load balancers stop sending new work.
            for (name, _) in &names {
                health.set_service_status(*name, ServingStatus::NotServing).await;
            }
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            result = server => result?,
            () = drain_deadline => tracing::warn!(?grace, "shutdown grace elapsed with requests in flight"),
        }
        metrics_task.abort();
        Ok(())
    }
}

/// Accepted connections with TCP_NODELAY: without it, small gRPC frames wait on Nagle's algorithm
/// and the peer's delayed ACK (about 40 ms a round trip on Linux).
fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|stream| {
        if let Ok(s) = &stream
            && let Err(e) = s.set_nodelay(true)
        {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        stream
    })
}

/// The gRPC health service.
type HealthService = Arc<tonic_health::server::HealthService>;

/// Serves `/metrics`, and `/health` (`?service=NAME` for one service): the gRPC health status as
/// plain HTTP, 200 when SERVING and 503 otherwise, for probes that cannot speak gRPC over TLS
/// (the kubelet's gRPC probe is plaintext only).
async fn serve_metrics(listener: TcpListener, health: HealthService) -> Result<(), Error> {
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(|| async {
                tokio::task::spawn_blocking(crate::telemetry::render).await.unwrap_or_default()
            }),
        )
        .route(
            "/health",
            axum::routing::get(move |query: axum::extract::RawQuery| http_health(health.clone(), query.0)),
        );
    axum::serve(listener, app).await.map_err(Error::Metrics)
}

/// The health of the service named in `query` (`service=NAME`; the server as a whole without
/// it) as an HTTP status and one word.
async fn http_health(health: HealthService, query: Option<String>) -> (http::StatusCode, String) {
    use tonic_health::pb::health_server::Health;
    let service = query
        .as_deref()
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("service="))
        .unwrap_or_default()
        .to_owned();
    let request = tonic::Request::new(tonic_health::pb::HealthCheckRequest { service: service.clone() });
    match health.check(request).await {
        Ok(answer) if answer.get_ref().status == ServingStatus::Serving as i32 => {
            (http::StatusCode::OK, "SERVING\n".into())
        }
        Ok(_) => (http::StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING\n".into()),
        Err(status) => (http::StatusCode::NOT_FOUND, format!("{}\n", status.message())),
    }
}
