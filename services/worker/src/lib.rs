//! Workers: server sessions of the session manager's worker pool. A request a worker receives is
//! a [`pb::ChunkWork`] — the worker runs that chunk in one database transaction and answers a
//! [`pb::ChunkDone`] with the chunk's outcome — or a [`pb::ExportPartWork`]: the worker produces
//! that export part ([`export`]) and answers a [`pb::ExportPartDone`].
//!
//! A worker keeps no state of its own: a chunk's state lives in the store, and its outcome is
//! committed with its records (the commit marker). So a chunk delivered again — the worker was
//! killed and the manager rebound the session to another worker, or the manager failed over —
//! commits once: the second run finds the outcome and answers it.
//!
//! Retries: a busy database (lock timeout, `SQLITE_BUSY`, serialization failure, too many
//! connections) is retried after a backoff with jitter, and a commit after it is
//! COMMITTED_AFTER_RETRY_WORKLOAD; a resource limit (the attempt's time budget, a statement
//! timeout, memory) is retried with an eight times larger budget, and a commit after it is
//! COMMITTED_AFTER_RETRY_RESOURCES (when both happened, resources wins: it is the rarer and the
//! more telling). Invalid records abort the chunk at once with every failing index; retries
//! exhausted abort it with the last cause.

pub mod export;

use std::sync::Arc;
use std::time::Duration;

use baton_manager::client::{Connector, ServerEvent, ServerSession};
use baton_mesh::config::parse_duration;
use baton_mesh::proto::{from_any, to_any, type_url, v1 as pb};
use baton_store::Store;
use baton_store::batches::{ChunkRun, ChunkStart, ChunkState};
use baton_store::blobs::Blobs;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The full name of the work message.
pub const CHUNK_WORK: &str = "baton.v1.ChunkWork";
/// The full name of the answer message.
pub const CHUNK_DONE: &str = "baton.v1.ChunkDone";
/// The full name of the export part work message.
pub const EXPORT_PART_WORK: &str = "baton.v1.ExportPartWork";
/// The full name of its answer.
pub const EXPORT_PART_DONE: &str = "baton.v1.ExportPartDone";
/// The manager pool workers register in by default.
pub const DEFAULT_POOL: &str = "workers";

/// How long a store call outside a chunk's own budget (marking it started, noting a retry,
/// aborting it, committing) may go unanswered before it is given up and the chunk attempted again.
/// A PostgreSQL connection can wait for an answer that never comes: `scripts/bench.sh batch` once
/// left a chunk RUNNING for good, its worker waiting and every server connection idle. No chunk
/// may hang on one call: giving the call up drops its connection.
const STORE_CALL_LIMIT: Duration = Duration::from_secs(30);

/// `call`, given up as [`baton_store::Error::unanswered`] after `limit`.
async fn bounded<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, baton_store::Error>>,
) -> Result<T, baton_store::Error> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| Err(baton_store::Error::unanswered(limit)))
}

/// The worker options, as flags and `BATON_*` variables.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerOptions {
    /// The session manager: `http://host:port`, or several comma-separated (the primary is
    /// found and followed on failover).
    #[arg(long, env = "BATON_MANAGER")]
    pub manager: String,

    /// The mesh token the manager requires.
    #[command(flatten)]
    pub mesh: baton_mesh::config::MeshToken,

    /// The manager pool this worker serves.
    #[arg(long, env = "BATON_WORKER_POOL", default_value = DEFAULT_POOL)]
    pub pool: String,

    /// This worker's id in the pool (a restarted worker with the same id takes its sessions
    /// back); by default the host name and process id.
    #[arg(long, env = "BATON_WORKER_ID")]
    pub worker_id: Option<String>,

    /// How chunks are run.
    #[command(flatten)]
    pub chunks: ChunkOptions,
}

/// How a worker runs chunks, as flags and `BATON_*` variables.
#[derive(clap::Args, Debug, Clone)]
pub struct ChunkOptions {
    /// Chunks run at once by this worker.
    #[arg(long, env = "BATON_WORKER_CONCURRENCY", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub concurrency: u32,

    /// The time budget of a chunk's first attempt; each resource retry has eight times more.
    #[arg(long, env = "BATON_CHUNK_BUDGET", default_value = "60s", value_parser = parse_duration)]
    pub chunk_budget: Duration,

    /// How long a chunk waits for a database lock before the attempt fails as busy (PostgreSQL
    /// `lock_timeout`; on SQLite the store's busy timeout, `--lock-timeout` of the store).
    #[arg(long, env = "BATON_LOCK_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub lock_timeout: Duration,

    /// Attempts at a chunk before it is aborted with its last cause.
    #[arg(long, env = "BATON_CHUNK_ATTEMPTS", default_value_t = 6,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: u32,

    /// The first backoff after a busy database; it doubles (with jitter) up to 10 s.
    #[arg(long, env = "BATON_RETRY_BACKOFF", default_value = "200ms", value_parser = parse_duration)]
    pub retry_backoff: Duration,
}

impl Default for ChunkOptions {
    fn default() -> Self {
        Self {
            concurrency: 2,
            chunk_budget: Duration::from_secs(60),
            lock_timeout: Duration::from_secs(5),
            max_attempts: 6,
            retry_backoff: Duration::from_millis(200),
        }
    }
}

impl ChunkOptions {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.chunk_budget < Duration::from_millis(1) {
            return Err("--chunk-budget must be at least 1ms".into());
        }
        Ok(())
    }
}

impl WorkerOptions {
    /// Options for worker `worker_id` of `manager`, running chunks as `chunks` says.
    pub fn new(manager: String, worker_id: String, chunks: ChunkOptions) -> Self {
        Self { manager, mesh: Default::default(), pool: DEFAULT_POOL.to_owned(), worker_id: Some(worker_id), chunks }
    }

    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.manager.trim().is_empty() {
            return Err("--manager is empty: name the session manager (http://host:port)".into());
        }
        self.chunks.validate()
    }

    /// The worker id: the one given, or host name and process id.
    pub fn id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "worker".into());
            format!("{}-{}", host.trim(), std::process::id())
        })
    }
}

/// Runs a worker until `shutdown`: registers in the pool and runs the chunks and export parts it
/// is sent, through `connector`.
pub async fn run(
    options: WorkerOptions,
    connector: Connector,
    store: Store,
    blobs: Blobs,
    shutdown: CancellationToken,
) {
    let id = options.id();
    let mut session = ServerSession::register(&connector, &options.manager, &options.pool, &id);
    let replier = session.replier();
    let slots = Arc::new(Semaphore::new(options.chunks.concurrency as usize));
    let options = Arc::new(options);
    tracing::info!(worker = %id, pool = %options.pool, manager = %options.manager, "worker registered");
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            event = session.next() => event,
        };
        let Some(event) = event else { break };
        let ServerEvent::Request { session_id, seq, payload, .. } = event else { continue };
        let Ok(slot) = slots.clone().acquire_owned().await else { break };
        let (store, blobs, options, replier, id, shutdown) =
            (store.clone(), blobs.clone(), options.clone(), replier.clone(), id.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let Some(payload) = payload else {
                tracing::error!(session = %session_id, seq, "an empty request; left unanswered");
                return;
            };
            let answer = if payload.type_url == type_url(EXPORT_PART_WORK) {
                match from_any::<pb::ExportPartWork>(EXPORT_PART_WORK, &payload) {
                    Ok(work) => export::produce(&store, &blobs, &options.chunks, &id, &work, &shutdown)
                        .await
                        .map(|done| to_any(EXPORT_PART_DONE, &done)),
                    Err(e) => {
                        tracing::error!(session = %session_id, seq, error = %e, "a bad export part; left unanswered");
                        return;
                    }
                }
            } else {
                match from_any::<pb::ChunkWork>(CHUNK_WORK, &payload) {
                    Ok(work) => {
                        execute(&store, &options, &id, &work, &shutdown).await.map(|done| to_any(CHUNK_DONE, &done))
                    }
                    Err(e) => {
                        tracing::error!(session = %session_id, seq, error = %e, "not a chunk; left unanswered");
                        return;
                    }
                }
            };
            let Some(answer) = answer else { return };
            if let Err(e) = replier.reply(&session_id, seq, answer, Vec::new()).await {
                tracing::warn!(error = %e, "cannot answer (the manager delivers the request again)");
            }
        });
    }
    tracing::info!(worker = %id, "worker stopped");
}

/// Runs one delivered chunk to its outcome. The store being unreachable is waited out (the chunk
/// is not answered until its outcome is known); None when shutdown comes first.
pub async fn execute(
    store: &Store,
    options: &WorkerOptions,
    worker: &str,
    work: &pb::ChunkWork,
    shutdown: &CancellationToken,
) -> Option<pb::ChunkDone> {
    let started = std::time::Instant::now();
    loop {
        match attempts(store, &options.chunks, worker, work).await {
            Ok((outcome, overloaded)) => {
                metrics::counter!("baton_chunks_total", "outcome" => outcome.as_str()).increment(1);
                metrics::histogram!("baton_chunk_duration_seconds").record(started.elapsed().as_secs_f64());
                tracing::debug!(batch = %work.batch_id, chunk = work.chunk_index, outcome = outcome.as_str(), "chunk done");
                return Some(pb::ChunkDone {
                    batch_id: work.batch_id.clone(),
                    chunk_index: work.chunk_index,
                    outcome: chunk_state_to_pb(outcome) as i32,
                    overloaded,
                });
            }
            Err(e) => {
                tracing::warn!(batch = %work.batch_id, chunk = work.chunk_index, error = %e, "store unavailable; trying again");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// The chunk's attempts: its outcome, and whether the database reported overload.
async fn attempts(
    store: &Store,
    options: &ChunkOptions,
    worker: &str,
    work: &pb::ChunkWork,
) -> Result<(ChunkState, bool), baton_store::Error> {
    use baton_store::Error as E;
    let (batch, index) = (work.batch_id.as_str(), work.chunk_index);
    let (mut resources, mut workload) = (false, false);
    let mut budget = options.chunk_budget;
    let mut backoff = options.retry_backoff;
    let mut cause = String::new();
    for attempt in 1..=options.max_attempts {
        if attempt > 1
            && let Err(e) = bounded(STORE_CALL_LIMIT, store.note_chunk_retry(batch, index, &cause)).await
        {
            tracing::debug!(error = %e, "cannot note the retry's cause");
        }
        let outcome = if resources {
            ChunkState::CommittedAfterRetryResources
        } else if workload {
            ChunkState::CommittedAfterRetryWorkload
        } else {
            ChunkState::Committed
        };
        // marking the chunk RUNNING is part of the attempt: a busy database fails it the same way;
        // the transaction has the budget, the calls around it (start, commit) a limit of their own
        let run = async {
            match store.start_chunk(batch, index, worker).await? {
                ChunkStart::Finished(outcome) => Ok(ChunkRun::Finished(outcome)),
                ChunkStart::Run => store.run_chunk(batch, index, outcome, &cause, budget, options.lock_timeout).await,
            }
        };
        match bounded(budget + STORE_CALL_LIMIT, run).await {
            Ok(ChunkRun::Committed(outcome) | ChunkRun::Finished(outcome)) => return Ok((outcome, workload)),
            Ok(ChunkRun::Invalid(problems)) => {
                let cause = format!("{} invalid record(s); nothing committed", problems.len());
                return Ok((
                    bounded(STORE_CALL_LIMIT, store.abort_chunk(batch, index, &problems, &cause)).await?,
                    workload,
                ));
            }
            Err(e @ E::Busy(_)) => {
                workload = true;
                cause = format!("attempt {attempt}: {e}");
                let jitter = rand::random_range(0.5..1.5);
                tokio::time::sleep(backoff.mul_f64(jitter)).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(e @ (E::Resource(_) | E::DeadlineExceeded { .. })) => {
                resources = true;
                cause = format!("attempt {attempt} with a budget of {budget:?}: {e}");
                budget = (budget * 8).min(Duration::from_secs(3600));
            }
            Err(e @ (E::NotFound(_) | E::Corrupt(_) | E::Invalid(_))) => {
                let cause = format!("cannot run: {e}");
                return Ok((bounded(STORE_CALL_LIMIT, store.abort_chunk(batch, index, &[], &cause)).await?, workload));
            }
            Err(e) => return Err(e),
        }
        tracing::info!(batch, chunk = index, %cause, "chunk attempt failed; retrying");
    }
    let cause = format!("retries exhausted after {} attempts; last cause: {cause}", options.max_attempts);
    Ok((bounded(STORE_CALL_LIMIT, store.abort_chunk(batch, index, &[], &cause)).await?, workload))
}

/// The wire form of a chunk state (in ChunkDone here, in the scheduler's chunk statuses).
pub fn chunk_state_to_pb(state: ChunkState) -> pb::ChunkState {
    match state {
        ChunkState::Pending => pb::ChunkState::Pending,
        ChunkState::Released => pb::ChunkState::Released,
        ChunkState::Running => pb::ChunkState::Running,
        ChunkState::Committed => pb::ChunkState::Committed,
        ChunkState::CommittedAfterRetryResources => pb::ChunkState::CommittedAfterRetryResources,
        ChunkState::CommittedAfterRetryWorkload => pb::ChunkState::CommittedAfterRetryWorkload,
        ChunkState::Aborted => pb::ChunkState::Aborted,
        ChunkState::Cancelled => pb::ChunkState::Cancelled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_store_call_that_never_answers_is_given_up_as_busy() {
        let hung = std::future::pending::<Result<(), baton_store::Error>>();
        let started = std::time::Instant::now();
        let result = bounded(Duration::from_millis(50), hung).await;
        assert!(matches!(result, Err(baton_store::Error::Busy(_))), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(result.unwrap_err().to_string().contains("no answer from the database within 50ms"));
        // an answer in time is passed through
        assert!(bounded(Duration::from_secs(5), async { Ok(7) }).await.is_ok_and(|n| n == 7));
    }
}
