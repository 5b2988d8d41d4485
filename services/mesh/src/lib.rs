//! baton's shared runtime, used by every service and by the `baton` binary.
//!
//! - [`proto`]: the generated `baton.v1` code and the descriptor set served by reflection;
//! - [`config`]: the options every server shares, duration parsing, the exit-64 rule;
//! - [`telemetry`]: tracing (text or JSON) and the Prometheus recorder;
//! - [`auth`] and [`layer`]: who is calling (admin token or org API key) and the tower layer that
//!   authenticates, numbers and measures every request;
//! - [`server`]: the bootstrap that serves a set of gRPC services with health, reflection, the
//!   layer, `/metrics` and a bounded graceful shutdown;
//! - [`status`]: `tonic::Status` with google.rpc details (ErrorInfo, RetryInfo, BadRequest);
//! - [`tls`]: TLS and mTLS for servers (reloaded on change) and clients (`https://` endpoints);
//! - [`shutdown`]: SIGTERM/SIGINT to a cancellation token;
//! - [`now_ms`]: wall-clock time as stored and sent (milliseconds since the Unix epoch).

pub mod auth;
pub mod config;
pub mod layer;
pub mod proto;
pub mod server;
pub mod shutdown;
pub mod status;
pub mod telemetry;
pub mod tls;
pub mod trace;

/// Now, in milliseconds since the Unix epoch: the time format of every stored and sent timestamp.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
