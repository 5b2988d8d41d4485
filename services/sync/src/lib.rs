//! The sync service: bulk extraction of an org with a high-water hand-off to its changes
//! ([`extract`]), and links that replicate an org to a target org through the target's
//! `Intake/ApplyChanges` ([`links`]), suspending on connection failures and resuming only after a
//! threshold of consecutive successful probes. It also trims the change log past its retention.

mod error;
pub mod extract;
pub mod links;
mod service;

use std::sync::Arc;
use std::time::Duration;

use baton_mesh::config::parse_duration;
use baton_mesh::proto::v1 as pb;
use baton_mesh::server::MeshServer;
use baton_store::Store;
use baton_store::sync::TrimmedPolicy;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How often the links' gauges are sampled (state and lag, one store read).
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// The longest wait between two trims of the change log, whatever the retention: a trim is one
/// indexed delete, and a long retention should not leave a day's events past it.
const TRIM_AT_MOST_EVERY: Duration = Duration::from_secs(60);

pub use error::Error;
pub use service::SyncService;

/// The sync options, as flags and `BATON_*` variables.
#[derive(clap::Args, Debug, Clone)]
pub struct SyncOptions {
    /// How long change events are kept; an Extract or link behind that answers OUT_OF_RANGE.
    #[arg(long, env = "BATON_CHANGE_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub change_retention: Duration,

    /// Changes per ApplyChanges call of a link.
    #[arg(long, env = "BATON_LINK_BATCH", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub link_batch: u32,

    /// How long a caught-up link or extraction waits for a commit to be announced before it
    /// reads the change log anyway. Commits are pushed (an in-process signal, and LISTEN/NOTIFY
    /// on PostgreSQL), so this is only the fallback for what no notification tells of: another
    /// process writing the same SQLite file, a notification lost with its connection.
    #[arg(long, env = "BATON_CHANGE_POLL", default_value = "1s", value_parser = parse_duration)]
    pub change_poll: Duration,

    /// What links trust and present when their target is `https://` (the process's TLS
    /// options, set by whoever starts the service).
    #[arg(skip)]
    pub tls: baton_mesh::tls::ClientTls,

    /// What a link does when its cursor falls behind the trimmed change log, unless its
    /// CreateLink request says: bootstrap again by itself, or fail and wait for a person.
    #[arg(long, env = "BATON_LINK_ON_TRIMMED", value_enum, default_value_t = OnTrimmed::Rebootstrap)]
    pub link_on_trimmed: OnTrimmed,
}

/// `--link-on-trimmed`: the policy of links created without one.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnTrimmed {
    /// A new high-water mark, the snapshot, then the changes after it.
    Rebootstrap,
    /// FAILED, until ResumeLink.
    Fail,
}

impl From<OnTrimmed> for TrimmedPolicy {
    fn from(value: OnTrimmed) -> Self {
        match value {
            OnTrimmed::Rebootstrap => TrimmedPolicy::Rebootstrap,
            OnTrimmed::Fail => TrimmedPolicy::Fail,
        }
    }
}

impl SyncOptions {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.change_retention < Duration::from_secs(1) {
            return Err(format!("--change-retention must be at least 1s, got {:?}", self.change_retention));
        }
        if self.change_poll < Duration::from_millis(1) || self.change_poll > Duration::from_secs(10) {
            return Err(format!("--change-poll must be between 1ms and 10s, got {:?}", self.change_poll));
        }
        Ok(())
    }
}

/// Adds the Sync service to a server and starts, in `tasks`, the link runners, the change-log
/// trimmer and the link gauges, which stop with `shutdown` (the link manager once every runner
/// has given its lease up).
pub fn add_services(
    server: MeshServer,
    store: &Store,
    options: &SyncOptions,
    max_message_bytes: usize,
    shutdown: CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) -> MeshServer {
    let wake = Arc::new(Notify::new());
    let owner = format!("sync_{}", hex::encode(rand::random::<[u8; 6]>()));
    let manager = links::LinkManager::new(store.clone(), owner, options.clone(), wake.clone(), shutdown.clone());
    tasks.spawn(manager.run());
    tasks.spawn(trim_loop(store.clone(), options.change_retention, shutdown.clone()));
    tasks.spawn(sample_links(store.clone(), shutdown.clone()));
    // exported from the start, so that an idle server shows its reads at 0
    for follower in ["extract", "link"] {
        metrics::counter!("baton_change_log_reads_total", "follower" => follower).increment(0);
    }
    let service = SyncService::new(store.clone(), options.clone(), wake, shutdown);
    server.add_service(
        pb::sync_server::SyncServer::new(service)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(64 * 1024 * 1024),
    )
}

/// Counts a read of the change log by a follower (`extract`, `link`).
fn count_change_log_read(follower: &'static str) {
    metrics::counter!("baton_change_log_reads_total", "follower" => follower).increment(1);
}

/// Sets `baton_links{state}` and `baton_link_lag_events{link}` every 5 s, until `shutdown`.
async fn sample_links(store: Store, shutdown: CancellationToken) {
    use baton_store::sync::LinkState;
    let mut shown = std::collections::HashSet::new();
    loop {
        match store.link_lags().await {
            Ok(links) => {
                for &state in LinkState::ALL {
                    let n = links.iter().filter(|(_, s, _)| *s == state).count();
                    metrics::gauge!("baton_links", "state" => state.as_str().to_lowercase()).set(n as f64);
                }
                let now: std::collections::HashSet<String> = links.iter().map(|(id, _, _)| id.clone()).collect();
                // a deleted link's series reads 0 rather than its last lag for ever
                for gone in shown.difference(&now) {
                    metrics::gauge!("baton_link_lag_events", "link" => gone.clone()).set(0.0);
                }
                for (id, _, lag) in &links {
                    metrics::gauge!("baton_link_lag_events", "link" => id.clone()).set(*lag as f64);
                }
                shown = now;
            }
            Err(e) => tracing::debug!(error = %e, "cannot sample the link gauges"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(SAMPLE_EVERY) => {}
        }
    }
}

/// Deletes change events older than the retention, every half retention (at most every minute).
async fn trim_loop(store: Store, retention: Duration, shutdown: CancellationToken) {
    let every = (retention / 2).min(TRIM_AT_MOST_EVERY);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let cutoff = std::time::SystemTime::now()
            .checked_sub(retention)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as i64);
        match store.trim_changes(cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "trimmed the change log"),
            Err(e) => tracing::warn!(error = %e, "cannot trim the change log"),
        }
    }
}
