//! The tower layer in front of every baton gRPC server: it gives each request an id (taken from
//! `x-request-id` or made up, and echoed back), runs it in a tracing span (which continues the
//! caller's trace from its `traceparent` header when traces are exported), authenticates it into a
//! [`Principal`](crate::auth::Principal) and counts it in the metrics. It also gives every
//! request message over the transport's size limit the one answer of
//! [`status::from_transport`](crate::status::from_transport), wherever the transport's status
//! appears (in the response headers or in the trailers of a stream).

use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue};
use http_body_util::BodyExt;
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
        let span = if crate::trace::enabled() {
            // an OpenTelemetry server span named by the method, continuing the caller's trace
            let span = tracing::info_span!(
                "grpc",
                method = %path,
                request_id = %request_id,
                otel.name = path.trim_start_matches('/'),
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.grpc.status_code = tracing::field::Empty,
            );
            if let Some(parent) = request.headers().get(crate::trace::TRACEPARENT).and_then(|v| v.to_str().ok()) {
                crate::trace::continue_from(&span, parent);
            }
            span
        } else {
            tracing::info_span!("grpc", method = %path, request_id = %request_id)
        };
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
                rewrite_status(response.headers_mut());
                let mut response = response.map(|body| Body::new(body.map_frame(rewrite_trailers)));
                if let Ok(value) = HeaderValue::from_str(&request_id) {
                    response.headers_mut().insert(REQUEST_ID_HEADER, value);
                }
                let status = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .unwrap_or(0);
                tracing::Span::current().record("rpc.grpc.status_code", status);
                let code = format!("{:?}", tonic::Code::from(status));
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

/// Replaces the transport's answer to a request message over its size limit (OUT_OF_RANGE with
/// tonic's text) in `headers` by RESOURCE_EXHAUSTED `MESSAGE_TOO_LARGE`; leaves any other status.
fn rewrite_status(headers: &mut HeaderMap) {
    // cheap test first: only OUT_OF_RANGE (11) can be the transport's size error
    if headers.get("grpc-status").map(HeaderValue::as_bytes) != Some(b"11") {
        return;
    }
    let Some(status) = tonic::Status::from_header_map(headers) else { return };
    let Some(answer) = crate::status::from_transport(status.code(), status.message()) else { return };
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        headers.remove(name);
    }
    if let Err(e) = answer.add_header(headers) {
        tracing::warn!(error = %e, "cannot write the message-too-large status");
    }
}

/// [`rewrite_status`] on the trailers of a response body (a stream ended by the status).
fn rewrite_trailers(frame: http_body::Frame<bytes::Bytes>) -> http_body::Frame<bytes::Bytes> {
    match frame.into_trailers() {
        Ok(mut trailers) => {
            rewrite_status(&mut trailers);
            http_body::Frame::trailers(trailers)
        }
        Err(frame) => frame,
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;
    use tonic_types::StatusExt;

    use super::*;

    #[test]
    fn the_transports_size_error_is_rewritten_in_headers_and_trailers() {
        let transport = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 5000 bytes, the limit is: 4096 bytes",
        );
        let mut headers = HeaderMap::new();
        transport.add_header(&mut headers).unwrap();
        let frame = rewrite_trailers(http_body::Frame::trailers(headers.clone()));
        rewrite_status(&mut headers);
        for headers in [headers, frame.into_trailers().unwrap()] {
            let status = tonic::Status::from_header_map(&headers).unwrap();
            assert_eq!(status.code(), Code::ResourceExhausted);
            let info = status.get_details_error_info().unwrap();
            assert_eq!((info.reason.as_str(), info.metadata["observed"].as_str()), ("MESSAGE_TOO_LARGE", "5000"));
        }

        // any other status is left as it is
        let mut headers = HeaderMap::new();
        tonic::Status::out_of_range("part 3 does not exist").add_header(&mut headers).unwrap();
        let before = headers.clone();
        rewrite_status(&mut headers);
        assert_eq!(headers, before);
    }
}
