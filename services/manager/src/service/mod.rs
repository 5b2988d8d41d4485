//! The manager's runtime: one actor task owns the state and the journal. gRPC stream handlers turn
//! frames into commands; the actor applies a batch of commands, journals their entries with one
//! fsync (group commit), and only then sends what they produce (acknowledgments, deliveries,
//! responses). Nothing is acknowledged before it is durable.
//!
//! Here is the handle the rest of the process holds ([`ManagerService`]); its parts are the
//! options (`options`), the outbox that carries events to the streams (`outbox`), the actor and
//! its one method per command (`actor`), replication to and from standbys (`replication`), and
//! the gRPC handlers (`grpc`).

mod actor;
mod grpc;
mod options;
mod outbox;
mod replication;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::Duration;

use baton_mesh::proto::internal::v1 as internal;
use baton_mesh::proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::Status;

pub use options::ManagerOptions;

use crate::Error;
use crate::failover::Publisher;
use crate::journal::Journal;
use crate::state::State;
use actor::{Actor, Command};

pub use baton_manager_client::LEADER_METADATA;

/// How often the actor is ticked (moving the sessions of lost servers, expiry, gauges).
const TICK_EVERY: Duration = Duration::from_millis(100);
/// The longest an in-sync standby may take to acknowledge a batch before the primary drops it
/// from the set (half the lease when that is shorter): the primary must be able to shrink the
/// set and go on well before its lease is in doubt.
const STANDBY_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether this manager is the primary, and the leader it knows if not: kept by the actor, read
/// by the stream handlers, which refuse a standby's opens themselves. A standby refusing 100,000
/// sessions through its actor queued its election behind them (`bench sessions`: elected 5 s
/// after a SIGKILL of the primary, with a 2 s lease).
#[derive(Default)]
pub(crate) struct Role {
    primary: std::sync::atomic::AtomicBool,
    leader: std::sync::Mutex<String>,
}

impl Role {
    /// Records the actor's role.
    pub(super) fn set(&self, primary: bool, leader: &str) {
        *self.leader.lock().unwrap_or_else(|e| e.into_inner()) = leader.to_owned();
        self.primary.store(primary, std::sync::atomic::Ordering::SeqCst);
    }

    /// None while primary; a standby's refusal otherwise (the actor refuses too, should the
    /// role change in between).
    pub(super) fn refusal(&self) -> Option<Status> {
        if self.primary.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        let leader = self.leader.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Some(Error::NotPrimary { leader }.into())
    }
}

/// Opens the journal in `dir` and replays it: the journal, the state it holds, and the term (a
/// single manager's next one; 0 for an elected one, which takes the journal's).
fn replay(dir: &std::path::Path, single: bool) -> Result<(Journal, State, u64), Error> {
    let (journal, entries) = Journal::open(dir)?;
    let term = if single { journal.next_term()? } else { 0 };
    let mut state = State::default();
    for entry in &entries {
        state.apply(entry);
    }
    tracing::info!(term, entries = entries.len(), sessions = state.sessions.len(), "manager journal replayed");
    Ok((journal, state, term))
}

/// Ticks the actor every [`TICK_EVERY`] until `shutdown` or the actor stops.
async fn tick(ticker: mpsc::Sender<Command>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(TICK_EVERY) => {}
        }
        if ticker.send(Command::Tick).await.is_err() {
            return;
        }
    }
}

/// The actor's task: applies the commands in batches, each made durable before what it produced
/// is sent, until `shutdown`, or until the journal cannot be written or the manager failed.
async fn run_actor(mut actor: Actor, mut rx: mpsc::Receiver<Command>, shutdown: CancellationToken) {
    loop {
        let command = tokio::select! {
            () = shutdown.cancelled() => return,
            c = rx.recv() => match c { Some(c) => c, None => return },
        };
        actor.handle(command);
        // group commit: everything already queued joins this batch
        for _ in 0..1024 {
            match rx.try_recv() {
                Ok(c) => actor.handle(c),
                Err(_) => break,
            }
        }
        if let Err(e) = actor.flush().await {
            // A journal that cannot be written must not acknowledge anything more.
            actor.fail(format!("journal write failed: {e}"));
            return;
        }
        if actor.failed.is_cancelled() {
            return;
        }
    }
}

/// The SessionManager gRPC service; cheap to clone.
#[derive(Clone)]
pub struct ManagerService {
    commands: mpsc::Sender<Command>,
    /// The actor's role, for the stream handlers.
    role: Arc<Role>,
    next_conn: Arc<AtomicU64>,
    /// Cancelled when the manager must step down (see `Actor::fail`).
    failed: CancellationToken,
    failure: Arc<std::sync::Mutex<Option<String>>>,
    /// The etcd lease the election holds now (0: none), given up on a local fault.
    lease: Arc<AtomicI64>,
    /// The journal directory's id.
    journal_id: Arc<str>,
    /// When this standby's replication stream from the primary last ended without a newer
    /// one bringing frames since: a takeover is timed from it (`baton_manager_takeover_seconds`).
    primary_lost: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl ManagerService {
    /// Opens the journal, replays it, and starts the actor (until `shutdown`).
    pub fn start(options: ManagerOptions, shutdown: CancellationToken) -> Result<Self, Error> {
        Self::start_with(options, String::new(), false, shutdown)
    }

    /// Starts a manager; `elected` (etcd mode): it starts as a standby named `node_id`, and the
    /// failover task makes it primary.
    pub fn start_with(
        options: ManagerOptions,
        node_id: String,
        elected: bool,
        shutdown: CancellationToken,
    ) -> Result<Self, Error> {
        let single = !elected;
        let (journal, state, term) = replay(&options.journal_dir, single)?;
        let journal_id: Arc<str> = journal.id().into();
        let actor = Actor::new(options, node_id, single, journal, state, term);
        let (failed, failure, role) = (actor.failed.clone(), actor.failure.clone(), actor.role.clone());
        let (tx, rx) = mpsc::channel::<Command>(4096);
        tokio::spawn(tick(tx.clone(), shutdown.clone()));
        tokio::spawn(run_actor(actor, rx, shutdown));
        // exported from the start, empty until the first takeover
        let _ = metrics::histogram!("baton_manager_takeover_seconds");
        Ok(Self {
            commands: tx,
            role,
            next_conn: Arc::new(AtomicU64::new(1)),
            failed,
            failure,
            lease: Default::default(),
            journal_id,
            primary_lost: Default::default(),
        })
    }

    async fn command(&self, command: Command) -> Result<(), Status> {
        self.commands.send(command).await.map_err(|_| Error::Stopping.into())
    }

    /// Makes this manager the primary of `term`; `publisher` writes the in-sync set for it.
    pub async fn become_primary(&self, term: u64, publisher: Option<Publisher>) -> Result<(), Status> {
        let (done, rx) = oneshot::channel();
        self.command(Command::BecomePrimary { term, publisher, done }).await?;
        rx.await.map_err(|_| Error::Stopping.into())
    }

    /// Makes this manager a standby of `leader` (empty when unknown): it stops acknowledging and
    /// closes every client, server and standby stream.
    pub async fn become_standby(&self, leader: String) -> Result<(), Status> {
        self.command(Command::BecomeStandby { leader, epoch: None }).await
    }

    /// Follows `leader` as a standby, unless this manager has been elected since `epoch` (the
    /// number of elections it had won when the caller looked the leader up).
    pub async fn follow_leader(&self, leader: String, epoch: u64) -> Result<(), Status> {
        self.command(Command::BecomeStandby { leader, epoch: Some(epoch) }).await
    }

    /// Applies a frame from the primary; returns the durable index.
    pub async fn replica_apply(&self, frame: internal::ReplicaFrame) -> Result<u64, Status> {
        let (done, rx) = oneshot::channel();
        self.command(Command::ReplicaApply { frame, done }).await?;
        rx.await.map_err(|_| Error::Stopping)?
    }

    /// Cancelled when this manager must step down: its journal cannot be written, or it found
    /// itself deposed ([`ManagerService::failure`] says why).
    pub fn failed(&self) -> CancellationToken {
        self.failed.clone()
    }

    /// Why the manager failed, once it has.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Notes that the replication stream from the primary ended (`true`: the first time since
    /// frames last came, so that failed reconnections do not move it), or brings frames again
    /// (`false`).
    pub(crate) fn primary_lost(&self, lost: bool) {
        let mut at = self.primary_lost.lock().unwrap_or_else(|e| e.into_inner());
        if !lost {
            *at = None;
        } else if at.is_none() {
            *at = Some(std::time::Instant::now());
        }
    }

    /// Records the takeover just made: from the primary's stream lost to serving, if it was.
    pub(crate) fn took_over(&self) {
        if let Some(lost) = self.primary_lost.lock().unwrap_or_else(|e| e.into_inner()).take() {
            metrics::histogram!("baton_manager_takeover_seconds").record(lost.elapsed().as_secs_f64());
        }
    }

    /// The id of this manager's journal directory (see `Journal::identify`).
    pub fn journal_id(&self) -> &str {
        &self.journal_id
    }

    /// The etcd lease the election holds now (0: none): the failover task keeps it here, so
    /// that a local fault gives it up.
    pub fn lease_slot(&self) -> Arc<AtomicI64> {
        self.lease.clone()
    }

    /// The manager's status.
    pub async fn current_status(&self) -> Result<pb::ManagerStatus, Status> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Status { reply }).await?;
        rx.await.map_err(|_| Error::Stopping.into())
    }
}
