//! The tower layer in front of every baton gRPC server: it gives each request an id (taken from
//! `x-request-id` or made up, and echoed back), runs it in a tracing span, authenticates it into a
//! [`Principal`](crate::auth::Principal) and counts it in the metrics.

use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use http::HeaderValue;
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::auth::AuthConfig;

/// The header carrying a request id across hops.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The request id of a request, put in its extensions by the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

/// Builds [`MeshService`]s.
#[derive(Debug, Clone)]
pub struct MeshLayer {
    auth: AuthConfig,
}

impl MeshLayer {
    /// A layer authenticating with `auth`.
    pub fn new(auth: AuthConfig) -> Self {
        Self { auth }
    }
}

impl<S> Layer<S> for MeshLayer {
    type Service = MeshService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MeshService { inner, auth: self.auth.clone() }
    }
}

/// The service [`MeshLayer`] wraps around the gRPC routes.
#[derive(Debug, Clone)]
pub struct MeshService<S> {
    inner: S,
    auth: AuthConfig,
}

fn new_request_id() -> String {
    hex::encode(rand::random::<[u8; 8]>())
}

impl<S> Service<http::Request<Body>> for MeshService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The clone is the one that was not polled ready; swap so the ready one serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        let path = request.uri().path().to_owned();
        let request_id = request
            .headers()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map(str::to_owned)
            .unwrap_or_else(new_request_id);
        let span = tracing::info_span!("grpc", method = %path, request_id = %request_id);
        Box::pin(
            async move {
                let started = Instant::now();
                let mut response = match auth.authenticate(&path, request.headers()).await {
                    Ok(principal) => {
                        if let Some(principal) = principal {
                            request.extensions_mut().insert(principal);
                        }
                        request.extensions_mut().insert(RequestId(request_id.clone()));
                        inner.call(request).await?
                    }
                    Err(status) => {
                        tracing::debug!(message = status.message(), "request not authenticated");
                        status.into_http()
                    }
                };
                if let Ok(value) = HeaderValue::from_str(&request_id) {
                    response.headers_mut().insert(REQUEST_ID_HEADER, value);
                }
                let code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map(|c| format!("{:?}", tonic::Code::from(c)))
                    .unwrap_or_else(|| "Ok".to_owned());
                let elapsed = started.elapsed();
                metrics::counter!("baton_grpc_requests_total", "method" => path.clone(), "code" => code).increment(1);
                metrics::histogram!("baton_grpc_request_duration_seconds", "method" => path)
                    .record(elapsed.as_secs_f64());
                Ok(response)
            }
            .instrument(span),
        )
    }
}
