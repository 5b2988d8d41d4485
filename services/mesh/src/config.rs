//! Options shared by every server, and the rule for bad configuration: one line, exit code 64.

use std::net::SocketAddr;
use std::time::Duration;

/// The exit code of a process started with bad configuration (`EX_USAGE` from sysexits.h).
pub const EXIT_BAD_CONFIG: i32 = 64;

/// Prints one line about bad configuration and exits with [`EXIT_BAD_CONFIG`].
pub fn exit_bad_config(message: impl std::fmt::Display) -> ! {
    let message = message.to_string();
    let line = message.lines().next().unwrap_or("invalid configuration");
    eprintln!("baton: bad config: {line}");
    std::process::exit(EXIT_BAD_CONFIG)
}

/// Parses a duration such as `500ms`, `2s`, `10m` or `24h`.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value).map_err(|e| format!("invalid duration {value:?}: {e}"))
}

/// The mesh token: the shared secret of the calls between baton's own services, which the session
/// manager requires of every caller (scheduler, workers, standby managers, `baton manager status`)
/// as `authorization: Bearer <token>`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct MeshToken {
    /// The mesh token the session manager requires of its callers, and that this process sends
    /// to it. Unset (or empty), the manager takes any caller: keep it unreachable from outside
    /// the mesh (the Kubernetes NetworkPolicy does).
    #[arg(long = "mesh-token", env = "BATON_MESH_TOKEN", hide_env_values = true)]
    pub mesh_token: Option<String>,
}

impl MeshToken {
    /// The token, if one is set (an empty value counts as unset).
    pub fn get(&self) -> Option<&str> {
        self.mesh_token.as_deref().filter(|t| !t.is_empty())
    }
}

/// How a gRPC server listens, limits messages and shuts down. Every service takes these.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeOptions {
    /// The address the gRPC server listens on (port 0 picks a free port).
    #[arg(long = "listen", env = "BATON_LISTEN", default_value = "127.0.0.1:7400")]
    pub listen: SocketAddr,

    /// The address `/metrics` (Prometheus text format) is served on (port 0 picks a free port).
    #[arg(long = "metrics-listen", env = "BATON_METRICS_LISTEN", default_value = "127.0.0.1:0")]
    pub metrics_listen: SocketAddr,

    /// The largest request message accepted, in bytes.
    #[arg(long, env = "BATON_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..=256 * 1024 * 1024))]
    pub max_message_bytes: u32,

    /// How long a graceful shutdown waits for requests in flight before it stops anyway.
    #[arg(long, env = "BATON_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// TLS: what the server presents and requires, what the process's own calls trust.
    #[command(flatten)]
    pub tls: crate::tls::TlsOptions,
}

impl ServeOptions {
    /// The largest request message accepted, in bytes.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes as usize
    }
}

/// How the process logs.
#[derive(clap::Args, Debug, Clone)]
pub struct TelemetryOptions {
    /// The log format.
    #[arg(long, env = "BATON_LOG_FORMAT", value_enum, default_value = "text", global = true)]
    pub log_format: LogFormat,

    /// The log filter, in `tracing_subscriber::EnvFilter` syntax (for example `info,baton=debug`).
    #[arg(long, env = "BATON_LOG", default_value = "info", global = true)]
    pub log: String,

    /// Export traces over OTLP/gRPC to this collector (for example `http://127.0.0.1:4317`); no
    /// traces are exported without it. The process is `service.name` `baton-<command>` unless
    /// `OTEL_SERVICE_NAME` says otherwise; batching follows the standard `OTEL_BSP_*` variables.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
}

/// A log format.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert!(parse_duration("soon").unwrap_err().contains("soon"));
    }
}
