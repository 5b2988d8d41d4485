//! The manager's options: where it journals, how it elects, and the timings it keeps.

use std::path::PathBuf;
use std::time::Duration;

/// The manager's options.
#[derive(clap::Args, Debug, Clone)]
pub struct ManagerOptions {
    /// Where the journal and snapshot are kept.
    #[arg(long, env = "BATON_JOURNAL_DIR", default_value = "./baton-journal")]
    pub journal_dir: PathBuf,

    /// How long a lost server session keeps its sessions before they move to another server.
    #[arg(long, env = "BATON_SERVER_GRACE", default_value = "2s", value_parser = baton_mesh::config::parse_duration)]
    pub server_grace: Duration,

    /// How long a session without a client (DETACHED) and without activity is kept before the
    /// manager closes it, dropping its queues (`0s`: never). A client process down longer than
    /// this loses its sessions; abandoned sessions stop weighing on memory and snapshots.
    #[arg(long, env = "BATON_SESSION_EXPIRY", default_value = "24h", value_parser = baton_mesh::config::parse_duration)]
    pub session_expiry: Duration,

    /// Journal entries between snapshots (which truncate the journal).
    #[arg(long, env = "BATON_SNAPSHOT_EVERY", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(10..))]
    pub snapshot_every: u64,

    /// etcd endpoints (comma-separated). With them the manager runs as primary or standby,
    /// elected through etcd; without them it runs alone.
    #[arg(long = "etcd", env = "BATON_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd: Vec<String>,

    /// The etcd election key every manager of one cluster campaigns on.
    #[arg(long, env = "BATON_ELECTION_KEY", default_value = "/baton/manager")]
    pub election_key: String,

    /// The TTL of the election lease, whole seconds: etcd grants at least its minimum (2s with
    /// its default timings, 1s with `--heartbeat-interval 10 --election-timeout 100`).
    #[arg(long, env = "BATON_LEASE_TTL", default_value = "2s", value_parser = baton_mesh::config::parse_duration)]
    pub lease_ttl: Duration,

    /// The address other managers and clients reach this one at (`http://host:port`); published
    /// as the election value. Defaults to `http://` and the listen address.
    #[arg(long, env = "BATON_ADVERTISE")]
    pub advertise: Option<String>,

    /// The mesh token callers must send (a standby sends it to the primary too).
    #[command(flatten)]
    pub mesh: baton_mesh::config::MeshToken,
}

impl ManagerOptions {
    /// Options for one manager without etcd, journaling in `journal_dir`.
    pub fn single(journal_dir: PathBuf) -> Self {
        Self {
            journal_dir,
            server_grace: Duration::from_secs(2),
            snapshot_every: 100_000,
            session_expiry: Duration::from_secs(24 * 3600),
            etcd: Vec::new(),
            election_key: "/baton/manager".into(),
            lease_ttl: Duration::from_secs(2),
            advertise: None,
            mesh: Default::default(),
        }
    }
}
