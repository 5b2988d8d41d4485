//! Tracing and metrics set-up, done once per process.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, TelemetryOptions};

/// Installs the tracing subscriber: text or JSON lines on stderr and, when an OTLP endpoint is
/// configured, spans exported as the process `service` (see [`crate::trace`]; call it inside a
/// Tokio runtime then). A bad filter or endpoint is bad config.
pub fn init_tracing(options: &TelemetryOptions, service: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(&options.log).map_err(|e| format!("invalid log filter {:?}: {e}", options.log))?;
    // colours only for a person at a terminal, never in a file or a pipe
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let lines = match options.log_format {
        LogFormat::Text => lines.boxed(),
        LogFormat::Json => lines.json().boxed(),
    };
    // Spans are exported whatever the log level: baton's own at info and above (every span
    // baton makes), with the events inside them; other crates' are left out.
    let otlp = match options.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        Some(endpoint) => Some(
            crate::trace::otlp_layer(endpoint, service)?.with_filter(Targets::new().with_target("baton", Level::INFO)),
        ),
        None => None,
    };
    // A second initialisation (tests starting several servers in one process) keeps the first.
    let _ = tracing_subscriber::registry().with(lines.with_filter(filter)).with(otlp).try_init();
    Ok(())
}

/// The process-wide Prometheus recorder, installed on first use, with every metric of
/// [`METRICS`] described (its `# HELP`) and each histogram given its buckets.
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let mut builder = PrometheusBuilder::new();
        for metric in METRICS {
            if let Kind::Histogram(buckets) = metric.kind {
                builder = builder
                    .set_buckets_for_metric(Matcher::Full(metric.name.to_owned()), buckets)
                    .expect("histogram buckets are not empty");
            }
        }
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (by an embedding program); ours then only
        // renders what it recorded, which is nothing, rather than failing the server.
        if metrics::set_global_recorder(recorder).is_ok() {
            for metric in METRICS {
                match metric.kind {
                    Kind::Counter => metrics::describe_counter!(metric.name, metric.help),
                    Kind::Gauge => metrics::describe_gauge!(metric.name, metric.help),
                    Kind::Histogram(_) => metrics::describe_histogram!(metric.name, metric.help),
                }
            }
            metrics::gauge!("baton_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            process_collector().describe();
        }
        handle
    })
}

/// The `process_*` metrics (CPU, memory, file descriptors, threads, start time).
fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// The Prometheus text of every metric, the `process_*` ones read now.
pub fn render() -> String {
    let handle = metrics();
    process_collector().collect();
    handle.render()
}

/// What kind of metric, and a histogram's bucket bounds.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// Only goes up (`_total`).
    Counter,
    /// A value now.
    Gauge,
    /// Observations counted into buckets (aggregatable across replicas, unlike summaries).
    Histogram(&'static [f64]),
}

/// A metric baton exports.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// Its name.
    pub name: &'static str,
    /// Its kind.
    pub kind: Kind,
    /// Its `# HELP` text (labels named in it).
    pub help: &'static str,
}

/// Request latencies: 1 ms to 30 s.
const LATENCY: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// A relayed round trip through the manager: 0.5 ms to 10 s.
const RELAY: &[f64] = &[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
/// A takeover: 0.1 s to 60 s.
const TAKEOVER: &[f64] = &[0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 20.0, 60.0];
/// A chunk's or a part's work: 10 ms to 5 minutes.
const WORK: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// Every metric baton exports besides the `process_*` ones: the contract with dashboards and
/// alert rules (`deploy/grafana`, `deploy/prometheus`; `tests/metrics.rs` checks that those name
/// only metrics a running mesh exports, and that each has its HELP).
pub const METRICS: &[Metric] = &[
    Metric { name: "baton_build_info", kind: Kind::Gauge, help: "1, labelled with the version of the running binary." },
    Metric {
        name: "baton_grpc_requests_total",
        kind: Kind::Counter,
        help: "gRPC requests answered, by method and status code.",
    },
    Metric {
        name: "baton_grpc_request_duration_seconds",
        kind: Kind::Histogram(LATENCY),
        help: "How long gRPC requests took to answer (a stream: until it ended), by method.",
    },
    Metric { name: "baton_exports_total", kind: Kind::Counter, help: "Exports started, by mode (sync, async)." },
    Metric { name: "baton_export_rows_fetched_total", kind: Kind::Counter, help: "Export rows sent by FetchPart." },
    Metric {
        name: "baton_batch_records_staged_total",
        kind: Kind::Counter,
        help: "Batch records staged by SubmitBatch.",
    },
    Metric {
        name: "baton_chunks_released_total",
        kind: Kind::Counter,
        help: "Chunks released to the workers by the scheduler.",
    },
    Metric {
        name: "baton_export_parts_released_total",
        kind: Kind::Counter,
        help: "Export parts released to the workers by the scheduler.",
    },
    Metric {
        name: "baton_chunks",
        kind: Kind::Gauge,
        help: "Chunks not yet finished, by state (pending, released, running), sampled by the scheduler.",
    },
    Metric {
        name: "baton_exports_producing",
        kind: Kind::Gauge,
        help: "Exports still producing parts, sampled by the scheduler.",
    },
    Metric {
        name: "baton_chunks_total",
        kind: Kind::Counter,
        help: "Chunks finished by the workers, by outcome (committed, committed_after_retry_resources, \
               committed_after_retry_workload, aborted).",
    },
    Metric {
        name: "baton_chunk_duration_seconds",
        kind: Kind::Histogram(WORK),
        help: "How long a worker took over a chunk, from delivery to its outcome.",
    },
    Metric {
        name: "baton_export_parts_total",
        kind: Kind::Counter,
        help: "Export parts finished by the workers, by outcome (produced, not_produced, failed).",
    },
    Metric { name: "baton_export_rows_produced_total", kind: Kind::Counter, help: "Export rows written into parts." },
    Metric {
        name: "baton_export_part_duration_seconds",
        kind: Kind::Histogram(WORK),
        help: "How long a worker took to produce an export part.",
    },
    Metric {
        name: "baton_manager_primary",
        kind: Kind::Gauge,
        help: "1 while this manager is the primary, 0 while it is a standby.",
    },
    Metric { name: "baton_manager_term", kind: Kind::Gauge, help: "The term this manager serves or follows." },
    Metric {
        name: "baton_manager_journal_index",
        kind: Kind::Gauge,
        help: "The index of the last journal entry this manager holds.",
    },
    Metric {
        name: "baton_manager_standby_lag_entries",
        kind: Kind::Gauge,
        help: "On the primary: journal entries its furthest standby has not acknowledged.",
    },
    Metric {
        name: "baton_manager_in_sync_members",
        kind: Kind::Gauge,
        help: "On the primary: members in the in-sync set (the primary included; 2 in a healthy pair).",
    },
    Metric { name: "baton_manager_sessions", kind: Kind::Gauge, help: "Client sessions held, connected or not." },
    Metric { name: "baton_manager_servers", kind: Kind::Gauge, help: "Server sessions registered." },
    Metric {
        name: "baton_manager_queued_requests",
        kind: Kind::Gauge,
        help: "Requests journaled and not yet answered, over every session.",
    },
    Metric {
        name: "baton_manager_queued_responses",
        kind: Kind::Gauge,
        help: "Responses journaled and not yet acknowledged by their client, over every session.",
    },
    Metric {
        name: "baton_manager_relay_seconds",
        kind: Kind::Histogram(RELAY),
        help: "On the primary: from a request journaled to its reply journaled (requests journaled by \
               an earlier primary are not counted).",
    },
    Metric {
        name: "baton_manager_takeover_seconds",
        kind: Kind::Histogram(TAKEOVER),
        help: "From a standby's replication stream from the primary lost to its serving as the new \
               primary.",
    },
    Metric {
        name: "baton_links",
        kind: Kind::Gauge,
        help: "Sync links of every org, by state (bootstrapping, streaming, suspended, verifying, paused, failed), sampled by the sync service.",
    },
    Metric {
        name: "baton_link_lag_events",
        kind: Kind::Gauge,
        help: "Changes its org logged after the link's cursor, by link (an upper bound of its lag when it carries only some objects).",
    },
    Metric {
        name: "baton_change_log_reads_total",
        kind: Kind::Counter,
        help: "Reads of the change log by its followers, by follower (extract, link); a caught-up follower reads again when a commit is announced, or after --change-poll.",
    },
    Metric {
        name: "baton_scheduler_completions_awaited",
        kind: Kind::Gauge,
        help: "Completions awaited on manager sessions (the pool completions) that this scheduler holds unanswered.",
    },
    Metric {
        name: "baton_watch_reads_total",
        kind: Kind::Counter,
        help: "Reads of a batch or an export by the streams watching it, by watch (batch, export); a stream reads again when a commit of its batch or export is announced, or after --watch-poll.",
    },
];
