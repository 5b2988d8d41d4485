//! Traces across the mesh: the process's spans exported over OTLP/gRPC when an endpoint is
//! configured, and the W3C trace context (`traceparent`) carried on every hop so that one batch,
//! one export or one link delivery is one trace.
//!
//! The hops: a gRPC call carries the context in its `traceparent` header (the server side is
//! [`MeshLayer`](crate::layer::MeshLayer), the client side [`inject`]); work that waits in the
//! store (a batch's chunks, an export's parts) carries the context its request had, stored with
//! it; a request through the session manager carries it in `ClientRequest.traceparent`, and the
//! work messages inside carry their own for the worker. Only `traceparent` travels (no
//! `tracestate`: baton adds no vendor state and keeps none it was given).
//!
//! With no endpoint configured nothing here does any work: every function returns at once.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header (and gRPC metadata key) carrying a trace context.
pub const TRACEPARENT: &str = "traceparent";

static ENABLED: AtomicBool = AtomicBool::new(false);
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether spans are exported (an OTLP endpoint is configured).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The tracing layer exporting spans to the OTLP/gRPC collector at `endpoint` (for example
/// `http://127.0.0.1:4317`), the process named `service` unless `OTEL_SERVICE_NAME` names it.
/// Must be called inside a Tokio runtime (the exporter's channel is made there). Batching and
/// the exporter's other settings follow the standard `OTEL_BSP_*` and `OTEL_EXPORTER_OTLP_*`
/// variables.
pub(crate) fn otlp_layer<S>(
    endpoint: &str,
    service: &str,
) -> Result<tracing_opentelemetry::OpenTelemetryLayer<S, SdkTracer>, String>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let uri: http::Uri = endpoint.parse().map_err(|e| format!("invalid OTLP endpoint {endpoint:?}: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(format!("invalid OTLP endpoint {endpoint:?}: expected http(s)://host:port"));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| format!("cannot set up the OTLP exporter for {endpoint:?}: {e}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_owned());
    }
    let resource =
        resource.with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))).build();
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
    let tracer = provider.tracer("baton");
    if PROVIDER.set(provider).is_err() {
        return Err("the OTLP exporter is already set up".to_owned());
    }
    ENABLED.store(true, Ordering::Relaxed);
    Ok(tracing_opentelemetry::layer().with_tracer(tracer))
}

/// Sends the spans still buffered and stops the exporter (at the end of `main`; spans of a
/// process killed outright are lost, as they would be in any exporter).
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get()
        && let Err(e) = provider.shutdown()
    {
        eprintln!("baton: cannot flush the last spans: {e}");
    }
}

/// The `traceparent` of `span`; empty when tracing is off or the span is not sampled in.
pub fn of(span: &tracing::Span) -> String {
    if !enabled() {
        return String::new();
    }
    traceparent_of(span)
}

fn traceparent_of(span: &tracing::Span) -> String {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove(TRACEPARENT).unwrap_or_default()
}

/// The `traceparent` of the current span (see [`of`]).
pub fn current() -> String {
    of(&tracing::Span::current())
}

/// Makes the trace context `traceparent` (as [`of`] gives it) the parent of `span`. Nothing
/// happens when tracing is off or `traceparent` is empty or malformed: the span starts a trace.
pub fn continue_from(span: &tracing::Span, traceparent: &str) {
    if enabled() && !traceparent.is_empty() {
        set_parent(span, traceparent);
    }
}

fn set_parent(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    // the only error is a span that is already closed or not recorded by the layer
    let _ = span.set_parent(parent);
}

/// Puts the current span's trace context in the metadata of an outgoing call.
pub fn inject<T>(request: &mut tonic::Request<T>) {
    let traceparent = current();
    if traceparent.is_empty() {
        return;
    }
    if let Ok(value) = traceparent.parse() {
        request.metadata_mut().insert(TRACEPARENT, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_carried_when_tracing_is_off() {
        // no exporter is set up in unit tests
        let span = tracing::info_span!("off");
        assert_eq!(of(&span), "");
        continue_from(&span, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let mut request = tonic::Request::new(());
        inject(&mut request);
        assert!(request.metadata().get(TRACEPARENT).is_none());
    }

    #[test]
    fn a_span_continued_from_a_traceparent_is_in_its_trace() {
        use tracing_subscriber::layer::SubscriberExt;
        let provider = SdkTracerProvider::builder().build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let root = tracing::info_span!("root");
            let parent = traceparent_of(&root);
            let [version, trace_id, span_id, flags] = parent.split('-').collect::<Vec<_>>()[..] else {
                panic!("not a traceparent: {parent:?}")
            };
            assert_eq!((version, trace_id.len(), span_id.len(), flags), ("00", 32, 16, "01"));

            let child = tracing::info_span!("child");
            set_parent(&child, &parent);
            let continued = traceparent_of(&child);
            assert!(continued.starts_with(&format!("00-{trace_id}-")), "{continued} is not in {parent}");
            assert!(!continued.contains(span_id), "{continued} is not a span of its own");

            // a malformed context leaves the span a trace of its own
            let other = tracing::info_span!("other");
            set_parent(&other, "00-not-a-trace-01");
            assert!(!traceparent_of(&other).contains(trace_id));
        });
    }
}
