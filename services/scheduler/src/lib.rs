//! The scheduler: batches in, chunks out; exports planned into parts, parts out.
//!
//! [`SchedulerService`] is the gRPC API (SubmitBatch, GetBatch, WatchBatch, ListChunkResults,
//! CancelBatch): it stages a batch's records durably as chunks before answering its id. The
//! [`releaser`] releases queued chunks by policy (caps, not-before, rate, fairness across orgs;
//! deferral while the database reports overload) and sends each to the workers as a request on
//! one of its client sessions of the session manager. Workers answer with the chunk's outcome,
//! which they have already recorded in the store: the store, not the scheduler, knows where every
//! chunk is, so scheduler replicas share the queue and a scheduler restart loses nothing. A
//! scheduler's `--scheduler-id` names its sessions, so a restarted scheduler resumes them (see
//! [`releaser`]). The [`completions`] loop pushes a finished batch's or export's completion to the
//! webhook it named; [`awaiting`] answers services that await one on a manager session.

pub mod awaiting;
pub mod client;
pub mod completions;
pub mod releaser;
mod service;

use std::time::Duration;

use baton_mesh::config::parse_duration;
use baton_mesh::proto::v1 as pb;
use baton_mesh::server::MeshServer;
use baton_store::Store;

pub use service::SchedulerService;

/// The release options, as flags and `BATON_*` variables.
#[derive(clap::Args, Debug, Clone)]
pub struct SchedulerOptions {
    /// The session manager: `http://host:port`, or several comma-separated (the primary is
    /// found and followed on failover).
    #[arg(long, env = "BATON_MANAGER")]
    pub manager: String,

    /// The mesh token the manager requires.
    #[command(flatten)]
    pub mesh: baton_mesh::config::MeshToken,

    /// The manager pool of the workers.
    #[arg(long, env = "BATON_WORKER_POOL", default_value = baton_api::work::DEFAULT_POOL)]
    pub pool: String,

    /// This scheduler's id, stable across restarts: its client sessions are named after it
    /// (`ID/0`, `ID/1`, …), so a restarted scheduler resumes them, and the store records it as
    /// the releaser of its chunks. 1 to 100 printable ASCII characters, no `/`; unique among
    /// the schedulers of a manager and a store. By default the host name.
    #[arg(long, env = "BATON_SCHEDULER_ID")]
    pub scheduler_id: Option<String>,

    /// How chunks are released.
    #[command(flatten)]
    pub release: ReleaseOptions,

    /// How completions are pushed to webhooks.
    #[command(flatten)]
    pub webhooks: completions::WebhookOptions,
}

/// How the scheduler releases chunks, as flags and `BATON_*` variables.
#[derive(clap::Args, Debug, Clone)]
pub struct ReleaseOptions {
    /// Chunks in flight (released or running) at most, over every org.
    #[arg(long, env = "BATON_MAX_PARALLEL", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_parallel: u32,

    /// Chunks in flight at most per org (and per batch, unless its policy asks for fewer).
    #[arg(long, env = "BATON_ORG_PARALLEL", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub org_parallel: u32,

    /// How often the queue is looked at when nothing else wakes the releaser.
    #[arg(long, env = "BATON_RELEASE_INTERVAL", default_value = "200ms", value_parser = parse_duration)]
    pub release_interval: Duration,

    /// Client sessions the scheduler holds with the manager; each is bound to one worker, so
    /// this many workers at most receive chunks from this scheduler.
    #[arg(long, env = "BATON_SCHEDULER_SESSIONS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub sessions: u32,

    /// Parts of one export produced at once (each by a worker slot). Three keep two cores busy:
    /// while a part is being recorded and the next released, two others are being read.
    #[arg(long, env = "BATON_EXPORT_PARALLEL", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub export_parallel: u32,
}

impl Default for ReleaseOptions {
    fn default() -> Self {
        Self {
            max_parallel: 16,
            org_parallel: 4,
            release_interval: Duration::from_millis(200),
            sessions: 8,
            export_parallel: 3,
        }
    }
}

impl ReleaseOptions {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.org_parallel > self.max_parallel {
            return Err("--org-parallel cannot exceed --max-parallel".into());
        }
        if self.release_interval < Duration::from_millis(1) || self.release_interval > Duration::from_secs(60) {
            return Err(format!("--release-interval must be between 1ms and 60s, got {:?}", self.release_interval));
        }
        Ok(())
    }
}

impl SchedulerOptions {
    /// Options for scheduler `scheduler_id` of `manager` releasing as `release` says.
    pub fn new(manager: String, scheduler_id: String, release: ReleaseOptions) -> Self {
        Self {
            manager,
            mesh: Default::default(),
            pool: baton_api::work::DEFAULT_POOL.to_owned(),
            scheduler_id: Some(scheduler_id),
            release,
            webhooks: Default::default(),
        }
    }

    /// The server id under which this scheduler serves the completions pool: its id and
    /// `/completions`, stable across restarts, so that a restarted scheduler gets the requests it
    /// had not answered back at once.
    pub fn completions_server_id(&self) -> String {
        format!("{}/completions", self.id())
    }

    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        baton_manager_client::check_managers(&self.manager)?;
        check_scheduler_id(&self.id())?;
        self.webhooks.validate()?;
        self.release.validate()
    }

    /// The scheduler id: the one given, or the host name.
    pub fn id(&self) -> String {
        self.scheduler_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            match host.trim() {
                "" => "scheduler".to_owned(),
                host => host.to_owned(),
            }
        })
    }
}

/// The longest scheduler id: with `/` and a session number (at most 4 digits) a session id
/// stays within the manager's 128 characters.
pub const MAX_SCHEDULER_ID: usize = 100;

/// Checks a scheduler id: 1 to [`MAX_SCHEDULER_ID`] printable ASCII characters (no space), no
/// `/` (the separator of its session ids, so `ID/` names this scheduler's sessions only).
pub fn check_scheduler_id(id: &str) -> Result<(), String> {
    let printable = id.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
    if id.is_empty() || id.len() > MAX_SCHEDULER_ID || !printable {
        return Err(format!(
            "--scheduler-id must be 1 to {MAX_SCHEDULER_ID} printable ASCII characters without spaces or '/', \
             got {id:?}"
        ));
    }
    Ok(())
}

/// Adds the Scheduler gRPC service over `store` to `server`.
pub fn add_services(server: MeshServer, store: &Store, max_message_bytes: usize) -> MeshServer {
    let service = SchedulerService::new(store.clone());
    server.add_service(
        pb::scheduler_server::SchedulerServer::new(service)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduler_ids_are_printable_ascii_without_slashes_and_short_enough_for_session_ids() {
        for good in ["dev", "sched-01.example.com", &"x".repeat(MAX_SCHEDULER_ID)] {
            assert_eq!(check_scheduler_id(good), Ok(()), "{good:?}");
        }
        for bad in ["", "a b", "a/b", "é", "tab\there", &"x".repeat(MAX_SCHEDULER_ID + 1)] {
            let error = check_scheduler_id(bad).unwrap_err();
            assert!(error.starts_with("--scheduler-id must be"), "{bad:?}: {error}");
        }
        // the longest id with the highest session number is a valid session id
        assert!(format!("{}/{}", "x".repeat(MAX_SCHEDULER_ID), 1023).len() <= 128);
    }

    #[test]
    fn the_default_id_is_the_host_name() {
        let options = SchedulerOptions {
            scheduler_id: None,
            ..SchedulerOptions::new("http://m:7400".into(), "x".into(), Default::default())
        };
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        if !host.trim().is_empty() {
            assert_eq!(options.id(), host.trim());
        }
        assert_eq!(options.validate(), Ok(()));
    }
}
