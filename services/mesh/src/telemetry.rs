//! Tracing and metrics set-up, done once per process.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, TelemetryOptions};

/// Installs the tracing subscriber (text or JSON lines on stderr). A bad filter is bad config.
pub fn init_tracing(options: &TelemetryOptions) -> Result<(), String> {
    let filter = EnvFilter::try_new(&options.log).map_err(|e| format!("invalid log filter {:?}: {e}", options.log))?;
    // colours only for a person at a terminal, never in a file or a pipe
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let result = match options.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    // A second initialisation (tests starting several servers in one process) keeps the first.
    let _ = result;
    Ok(())
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (by an embedding program); ours then only
        // renders what it recorded, which is nothing, rather than failing the server.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}
