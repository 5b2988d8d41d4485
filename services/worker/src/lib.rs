//! Workers: server sessions of the session manager's worker pool. A request a worker receives is
//! a [`internal::ChunkWork`] — the worker runs that chunk in one database transaction and answers a
//! [`internal::ChunkDone`] with the chunk's outcome — or a [`internal::ExportPartWork`]: the worker produces
//! that export part ([`export`]) and answers a [`internal::ExportPartDone`].
//!
//! A worker keeps no state of its own: a chunk's state lives in the store, and its outcome is
//! committed with its records (the commit marker). So a chunk delivered again — the worker was
//! killed and the manager rebound the session to another worker, or the manager failed over —
//! commits once: the second run finds the outcome and answers it.
//!
//! What the store does not hold is how the attempts at a chunk still running failed (a resource
//! limit, a busy database) and the budget grown since: that is the session's server restart data
//! ([`restart`]). After each failed attempt the worker saves
//! it with the session manager, which hands it to the worker that takes the session over; that
//! worker continues the chunk's attempts (the retry flags, the budget, the attempt count) instead
//! of starting afresh, so the chunk's outcome still says it was retried.
//!
//! Retries: a busy database (lock timeout, `SQLITE_BUSY`, serialization failure, too many
//! connections) is retried after a backoff with jitter, and a commit after it is
//! COMMITTED_AFTER_RETRY_WORKLOAD; a resource limit (the attempt's time budget, a statement
//! timeout, memory) is retried with an eight times larger budget, and a commit after it is
//! COMMITTED_AFTER_RETRY_RESOURCES (when both happened, resources wins: it is the rarer and the
//! more telling). Invalid records abort the chunk at once with every failing index; retries
//! exhausted abort it with the last cause.
//!
//! Splits: past one retry with a larger budget, or at once when its records are over the size
//! budget (`--chunk-max-bytes`), a chunk that fails on a resource limit is split in halves, each
//! its own transaction, and a half that fails the same way again, down to `--chunk-split-floor`
//! records. The parts and their commit markers live in the store
//! ([`Store::split_chunk`], [`Store::attempt_chunk`]), so a redelivered chunk skips the parts that
//! committed. The chunk is COMMITTED_AFTER_RETRY_RESOURCES when every part committed, else ABORTED
//! with the aborted parts' causes — and the committed parts stay committed.

pub mod export;
pub mod restart;

use std::sync::Arc;
use std::time::Duration;

use baton_api::batches::chunk_state_to_pb;
use baton_api::work::{CHUNK_DONE, CHUNK_WORK, DEFAULT_POOL, EXPORT_PART_DONE, EXPORT_PART_WORK};
use baton_manager_client::{Connector, ServerEvent, ServerReplier, ServerSession};
use baton_mesh::config::parse_duration;
use baton_mesh::proto::internal::v1 as internal;
use baton_mesh::proto::{from_any, to_any, type_url};
use baton_store::Store;
use baton_store::batches::{Attempt, ChunkRun, ChunkStart, ChunkState, Split};
use baton_store::blobs::Blobs;
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::restart::{ChunkHistory, RAISES_BEFORE_SPLIT, Restarts};

/// How long a store call outside a chunk's own budget (marking it started, noting a retry,
/// aborting it, committing) may go unanswered before it is given up and the chunk attempted again.
/// A PostgreSQL connection can wait for an answer that never comes: `scripts/bench.sh batch` once
/// left a chunk RUNNING for good, its worker waiting and every server connection idle. No chunk
/// may hang on one call: giving the call up drops its connection.
const STORE_CALL_LIMIT: Duration = Duration::from_secs(30);
/// How long a worker waits to try the store again when it is unreachable.
const STORE_RETRY: Duration = Duration::from_secs(1);
/// The longest backoff after a busy database (it doubles from `--retry-backoff`): a busy spell
/// rarely outlasts it, and a longer wait only delays the chunk.
const MAX_BUSY_BACKOFF: Duration = Duration::from_secs(10);

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

    /// Attempts at a chunk before it is aborted with its last cause (for a chunk split after a
    /// resource limit, attempts at each part, before that part is aborted).
    #[arg(long, env = "BATON_CHUNK_ATTEMPTS", default_value_t = 6,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: u32,

    /// The first backoff after a busy database; it doubles (with jitter) up to 10 s.
    #[arg(long, env = "BATON_RETRY_BACKOFF", default_value = "200ms", value_parser = parse_duration)]
    pub retry_backoff: Duration,

    /// The size budget of one transaction: the most bytes of record text (JSON) a chunk, or a
    /// part of one, writes. A chunk over it is split in halves at once (a resource limit), down
    /// to `--chunk-split-floor` records.
    #[arg(long, env = "BATON_CHUNK_MAX_BYTES", default_value_t = DEFAULT_CHUNK_MAX_BYTES,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub chunk_max_bytes: u64,

    /// The fewest records a chunk split after a resource limit is split down to: a part this
    /// small that still fails on a resource limit is aborted (the chunk's other parts go on).
    #[arg(long, env = "BATON_CHUNK_SPLIT_FLOOR", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub chunk_split_floor: u32,
}

/// The default size budget of one transaction: 64 MiB of record text.
pub const DEFAULT_CHUNK_MAX_BYTES: u64 = 64 << 20;

impl Default for ChunkOptions {
    fn default() -> Self {
        Self {
            concurrency: 2,
            chunk_budget: Duration::from_secs(60),
            lock_timeout: Duration::from_secs(5),
            max_attempts: 6,
            retry_backoff: Duration::from_millis(200),
            chunk_max_bytes: DEFAULT_CHUNK_MAX_BYTES,
            chunk_split_floor: 1,
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
        baton_manager_client::check_managers(&self.manager)?;
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
    let slots = Arc::new(Semaphore::new(options.chunks.concurrency as usize));
    let running = tokio_util::task::TaskTracker::new();
    tracing::info!(worker = %id, pool = %options.pool, manager = %options.manager, "worker registered");
    let worker = Arc::new(Worker {
        store,
        blobs,
        options,
        replier: session.replier(),
        restarts: Mutex::new(Restarts::default()),
        id,
        shutdown,
    });
    loop {
        let event = tokio::select! {
            _ = worker.shutdown.cancelled() => break,
            event = session.next() => event,
        };
        let (session_id, seq, payload) = match event {
            None => break,
            // before the session's requests: they find the histories it brings
            Some(ServerEvent::Bound { session_id, server_restart_data, .. }) => {
                worker.restarts.lock().await.bound(&session_id, &server_restart_data);
                continue;
            }
            Some(ServerEvent::Request { session_id, seq, payload, .. }) => (session_id, seq, payload),
            Some(ServerEvent::Accepted { .. }) => continue,
        };
        let Ok(slot) = slots.clone().acquire_owned().await else { break };
        let worker = worker.clone();
        running.spawn(async move {
            let _slot = slot;
            let Some(payload) = payload else {
                tracing::error!(session = %session_id, seq, "an empty request; left unanswered");
                return;
            };
            if payload.type_url == type_url(EXPORT_PART_WORK) {
                worker.produce_part(&session_id, seq, &payload).await;
            } else {
                worker.run_chunk(&session_id, seq, &payload).await;
            }
        });
    }
    // the chunks and parts in hand are answered (each ends on the shutdown, after its attempt)
    running.close();
    running.wait().await;
    tracing::info!(worker = %worker.id, "worker stopped");
}

/// What a worker's requests are served with.
struct Worker {
    store: Store,
    blobs: Blobs,
    options: WorkerOptions,
    replier: ServerReplier,
    /// The chunk histories of the sessions bound to this worker.
    restarts: Mutex<Restarts>,
    id: String,
    shutdown: CancellationToken,
}

impl Worker {
    /// Produces an export part and answers it. An export part's history is not saved: nothing
    /// in a part's outcome depends on it (ExportPartDone says produced or not, never after what
    /// retries), so a replacement worker producing the part afresh answers the same; only its
    /// attempt count starts over.
    async fn produce_part(&self, session_id: &str, seq: u64, payload: &prost_types::Any) {
        let work = match from_any::<internal::ExportPartWork>(EXPORT_PART_WORK, payload) {
            Ok(work) => work,
            Err(e) => {
                tracing::error!(session = %session_id, seq, error = %e, "a bad export part; left unanswered");
                return;
            }
        };
        // the part continues the trace of its release (and so of its export)
        let span = tracing::info_span!("part", otel.name = "produce part", export = %work.export_id, part = work.part);
        baton_mesh::trace::continue_from(&span, &work.traceparent);
        let producing =
            export::produce(&self.store, &self.blobs, &self.options.chunks, &self.id, &work, &self.shutdown);
        let Some(done) = producing.instrument(span).await else { return };
        // empty restart data: the manager keeps the session's stored data, which names chunks only
        if let Err(e) = self.replier.reply(session_id, seq, to_any(EXPORT_PART_DONE, &done), Vec::new()).await {
            tracing::warn!(error = %e, "cannot answer (the manager delivers the request again)");
        }
    }

    /// Runs a chunk, continuing the attempts of the session's previous server, and answers it.
    async fn run_chunk(&self, session_id: &str, seq: u64, payload: &prost_types::Any) {
        let work = match from_any::<internal::ChunkWork>(CHUNK_WORK, payload) {
            Ok(work) => work,
            Err(e) => {
                tracing::error!(session = %session_id, seq, error = %e, "not a chunk; left unanswered");
                return;
            }
        };
        let history = self.restarts.lock().await.take(session_id, &work.batch_id, work.chunk_index);
        if let Some(h) = &history {
            tracing::info!(session = %session_id, batch = %work.batch_id, chunk = work.chunk_index,
                attempts = h.attempts, cause = %h.cause, "continuing the attempts of the session's previous server");
        }
        let history = history
            .unwrap_or_else(|| ChunkHistory::new(&work.batch_id, work.chunk_index, self.options.chunks.chunk_budget));
        let saver = Saver { restarts: &self.restarts, replier: &self.replier, session_id };
        // the chunk continues the trace of its release (and so of its batch)
        let span =
            tracing::info_span!("chunk", otel.name = "run chunk", batch = %work.batch_id, chunk = work.chunk_index);
        baton_mesh::trace::continue_from(&span, &work.traceparent);
        let running = execute(&self.store, &self.options, &self.id, &work, history, &saver, &self.shutdown);
        let Some(done) = running.instrument(span).await else { return };
        // The reply's restart data is what is left of the session's histories once this chunk's
        // is dropped: explicit (an empty list clears the stored data) when this worker has a
        // history on the session, else empty, which keeps the stored data. What is kept names
        // only chunks that have finished or that this worker has not been delivered yet; each is
        // looked up by batch and chunk, and a finished chunk answers its stored outcome whatever
        // its history says.
        let mut restarts = self.restarts.lock().await;
        let data = restarts.finished(session_id, &work.batch_id, work.chunk_index);
        if let Err(e) = self.replier.reply(session_id, seq, to_any(CHUNK_DONE, &done), data).await {
            tracing::warn!(error = %e, "cannot answer (the manager delivers the request again)");
        }
    }
}

/// Runs one delivered chunk to its outcome, continuing from `history` (the attempts made so far,
/// by this worker or the session's previous server), saving the history with `saver` after every
/// failed attempt. The store being unreachable is waited out (the chunk is not answered until its
/// outcome is known); None when shutdown comes first.
pub async fn execute(
    store: &Store,
    options: &WorkerOptions,
    worker: &str,
    work: &internal::ChunkWork,
    mut history: ChunkHistory,
    saver: &Saver<'_>,
    shutdown: &CancellationToken,
) -> Option<internal::ChunkDone> {
    let started = std::time::Instant::now();
    loop {
        match attempts(store, &options.chunks, worker, work, &mut history, saver).await {
            Ok((outcome, overloaded)) => {
                metrics::counter!("baton_chunks_total", "outcome" => outcome.as_str()).increment(1);
                metrics::histogram!("baton_chunk_duration_seconds").record(started.elapsed().as_secs_f64());
                tracing::debug!(batch = %work.batch_id, chunk = work.chunk_index, outcome = outcome.as_str(), "chunk done");
                return Some(internal::ChunkDone {
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
                    _ = tokio::time::sleep(STORE_RETRY) => {}
                }
            }
        }
    }
}

/// The chunk's attempts after those in `history`, which each failed one is added to (and saved
/// with `saver`): its outcome, and whether the database reported overload.
///
/// The unit of an attempt is the whole chunk until a resource limit splits it, then each of its
/// pending parts in record order (`history.part`). A resource failure raises the time budget
/// eight times; past [`RAISES_BEFORE_SPLIT`] such retries of the unit (at once when the records
/// are over the size budget, which no time helps) the unit is split in halves, each its own
/// transaction, down to `--chunk-split-floor` records. A part that cannot commit (invalid, at the
/// floor, retries exhausted) is aborted alone and the other parts go on; once none is pending,
/// the chunk's outcome is COMMITTED_AFTER_RETRY_RESOURCES if every part committed, else ABORTED.
async fn attempts(
    store: &Store,
    options: &ChunkOptions,
    worker: &str,
    work: &internal::ChunkWork,
    history: &mut ChunkHistory,
    saver: &Saver<'_>,
) -> Result<(ChunkState, bool), baton_store::Error> {
    let mut run = Attempts {
        store,
        options,
        worker,
        batch: &work.batch_id,
        index: work.chunk_index,
        history,
        backoff: options.retry_backoff,
        busy: false,
    };
    loop {
        let step =
            if run.history.attempts >= options.max_attempts { run.exhausted().await? } else { run.attempt().await? };
        let (resources, size) = match step {
            Step::Done(outcome) => return Ok((outcome, run.history.workload)),
            Step::NextUnit => {
                (run.busy, run.backoff) = (false, options.retry_backoff);
                continue;
            }
            Step::Failed { resources, size } => (resources, size),
        };
        if let Some(outcome) = run.after_failure(resources, size).await? {
            return Ok((outcome, run.history.workload));
        }
        saver.save(run.history).await;
        // fault tests: hold the chunk here, its restart data saved, to kill the worker (a sleep
        // or pause blocks its thread, so it runs on the blocking pool and the save goes out)
        #[cfg(feature = "failpoints")]
        let _ = tokio::task::spawn_blocking(|| fail::fail_point!("worker-before-retry")).await;
        tracing::info!(batch = run.batch, chunk = run.index, cause = %run.history.cause, "chunk attempt failed; retrying");
    }
}

/// Where an attempt left a chunk.
enum Step {
    /// The chunk's outcome.
    Done(ChunkState),
    /// The unit ended (committed, aborted, gone) and the next pending part is the unit now: its
    /// attempts start without a backoff.
    NextUnit,
    /// The unit's attempt failed (counted in the history): on a resource limit (`resources`),
    /// the size budget among them (`size`), or on a busy database.
    Failed { resources: bool, size: bool },
}

/// A chunk's attempts in progress (see [`attempts`]).
struct Attempts<'a> {
    store: &'a Store,
    options: &'a ChunkOptions,
    worker: &'a str,
    batch: &'a str,
    index: u32,
    history: &'a mut ChunkHistory,
    /// The wait before an attempt after a busy database: doubling, at most 10 s.
    backoff: Duration,
    /// Whether the last attempt found the database busy.
    busy: bool,
}

impl Attempts<'_> {
    /// Where the unit's failures are told: the whole chunk (nothing), or a part (offsets in the
    /// chunk).
    fn unit(&self) -> String {
        match self.history.part {
            None => String::new(),
            Some(p) => format!("part {}..{} of the chunk: ", p.first, p.first + p.records),
        }
    }

    /// The unit's retries are exhausted: it is aborted.
    async fn exhausted(&mut self) -> Result<Step, baton_store::Error> {
        let cause = format!(
            "{}retries exhausted after {} attempts; last cause: {}",
            self.unit(),
            self.history.attempts,
            self.history.cause
        );
        let part = self.history.part;
        Ok(match abort_unit(self.store, self.batch, self.index, part, &cause, self.history).await? {
            Some(outcome) => Step::Done(outcome),
            None => Step::NextUnit,
        })
    }

    /// The unit's next attempt, after the backoff when the database was busy.
    async fn attempt(&mut self) -> Result<Step, baton_store::Error> {
        let (store, batch, index, worker) = (self.store, self.batch, self.index, self.worker);
        let attempt = self.history.attempts + 1;
        if self.busy {
            let jitter = rand::random_range(0.5..1.5);
            tokio::time::sleep(self.backoff.mul_f64(jitter)).await;
            self.backoff = (self.backoff * 2).min(MAX_BUSY_BACKOFF);
        }
        if attempt > 1
            && let Err(e) = bounded(STORE_CALL_LIMIT, store.note_chunk_retry(batch, index, &self.history.cause)).await
        {
            tracing::debug!(error = %e, "cannot note the retry's cause");
        }
        let budget = self.history.budget();
        let try_it = Attempt {
            outcome: self.history.outcome(),
            cause: &self.history.cause,
            budget,
            lock_timeout: self.options.lock_timeout,
            max_bytes: self.options.chunk_max_bytes,
            part: self.history.part,
        };
        // marking the chunk RUNNING is part of the attempt: a busy database fails it the same way;
        // the transaction has the budget, the calls around it (start, commit) a limit of their own
        let run = async {
            match store.start_chunk(batch, index, worker).await? {
                ChunkStart::Finished(outcome) => Ok(ChunkRun::Finished(outcome)),
                ChunkStart::Run => {
                    // fault tests: the attempt fails as over its budget
                    fail::fail_point!("worker-chunk-attempt", |_| Err(baton_store::Error::DeadlineExceeded {
                        limit: budget,
                        elapsed: budget
                    }));
                    store.attempt_chunk(batch, index, &try_it).await
                }
            }
        };
        let run = run.instrument(tracing::info_span!("attempt", otel.name = "store transaction", attempt));
        let result = bounded(budget + STORE_CALL_LIMIT, run).await;
        self.settle(result, attempt, budget).await
    }

    /// What attempt number `attempt` (with `budget`) came to.
    async fn settle(
        &mut self,
        result: Result<ChunkRun, baton_store::Error>,
        attempt: u32,
        budget: Duration,
    ) -> Result<Step, baton_store::Error> {
        use baton_store::Error as E;
        let (store, batch, index, part, unit) = (self.store, self.batch, self.index, self.history.part, self.unit());
        let history = &mut *self.history;
        let (resources, size) = match result {
            Ok(ChunkRun::Committed(outcome) | ChunkRun::Finished(outcome)) => return Ok(Step::Done(outcome)),
            Ok(run @ (ChunkRun::Split | ChunkRun::PartCommitted | ChunkRun::PartGone)) => {
                if run == ChunkRun::PartCommitted {
                    tracing::debug!(batch, chunk = index, part = ?part, "part committed");
                    // fault tests: hold the chunk after a part committed, to kill the worker
                    #[cfg(feature = "failpoints")]
                    let _ = tokio::task::spawn_blocking(|| fail::fail_point!("worker-after-part")).await;
                }
                return next_unit(store, batch, index, history).await.map(Step::from);
            }
            Ok(ChunkRun::Invalid(problems)) => {
                let cause = format!("{unit}{} invalid record(s); nothing committed", problems.len());
                let Some(p) = part else {
                    return Ok(Step::Done(
                        bounded(STORE_CALL_LIMIT, store.abort_chunk(batch, index, &problems, &cause)).await?,
                    ));
                };
                bounded(STORE_CALL_LIMIT, store.abort_part(batch, index, p, &problems, &cause)).await?;
                return next_unit(store, batch, index, history).await.map(Step::from);
            }
            Ok(ChunkRun::OverSize { bytes, limit }) => {
                history.resources = true;
                history.cause =
                    format!("{unit}attempt {attempt}: {bytes} bytes of records, over the size budget of {limit} bytes");
                (true, true)
            }
            Err(e @ E::Busy(_)) => {
                history.workload = true;
                history.cause = format!("{unit}attempt {attempt}: {e}");
                (false, false)
            }
            Err(e @ (E::Resource(_) | E::DeadlineExceeded { .. })) => {
                history.resources = true;
                history.cause = format!("{unit}attempt {attempt} with a budget of {budget:?}: {e}");
                history.budget_ms = history.budget_ms.saturating_mul(8).min(3_600_000);
                (true, false)
            }
            Err(e @ (E::NotFound(_) | E::Corrupt(_) | E::Invalid(_))) => {
                let cause = format!("cannot run: {e}");
                return Ok(Step::Done(bounded(STORE_CALL_LIMIT, store.abort_chunk(batch, index, &[], &cause)).await?));
            }
            Err(e) => return Err(e),
        };
        self.busy = !resources;
        history.attempts = attempt;
        Ok(Step::Failed { resources, size })
    }

    /// After a failed attempt: past its raised budget (or over the size budget) the unit is split
    /// in halves, or aborted at the split floor; the chunk's outcome when that ended it.
    async fn after_failure(&mut self, resources: bool, size: bool) -> Result<Option<ChunkState>, baton_store::Error> {
        let (store, batch, index, part) = (self.store, self.batch, self.index, self.history.part);
        if !resources {
            return Ok(None);
        }
        if !size && self.history.raises < RAISES_BEFORE_SPLIT {
            self.history.raises += 1;
            return Ok(None);
        }
        let floor = self.options.chunk_split_floor;
        match bounded(STORE_CALL_LIMIT, store.split_chunk(batch, index, part, floor)).await? {
            Split::Halves | Split::Gone => {
                tracing::info!(batch, chunk = index, part = ?part, cause = %self.history.cause, "split after a resource limit");
                next_unit(store, batch, index, self.history).await
            }
            Split::AtFloor => {
                let cause = format!("{} (at the split floor of {floor} record(s))", self.history.cause);
                abort_unit(store, batch, index, part, &cause, self.history).await
            }
        }
    }
}

impl From<Option<ChunkState>> for Step {
    /// The outcome of a chunk that ended, or the next unit.
    fn from(outcome: Option<ChunkState>) -> Self {
        outcome.map_or(Step::NextUnit, Step::Done)
    }
}

/// Moves `history` to the chunk's next pending part (its attempts start afresh, with the budget
/// reached so far): None when there is one; else the chunk's outcome, recorded now from its
/// parts' (or the one recorded before).
/// Aborts the unit in hand with `cause`: the whole chunk (its outcome), or a part, after which
/// the chunk goes on with its next pending part (None) or ends with its outcome.
async fn abort_unit(
    store: &Store,
    batch: &str,
    index: u32,
    part: Option<baton_store::batches::PartRange>,
    cause: &str,
    history: &mut ChunkHistory,
) -> Result<Option<ChunkState>, baton_store::Error> {
    let Some(p) = part else {
        return Ok(Some(bounded(STORE_CALL_LIMIT, store.abort_chunk(batch, index, &[], cause)).await?));
    };
    bounded(STORE_CALL_LIMIT, store.abort_part(batch, index, p, &[], cause)).await?;
    next_unit(store, batch, index, history).await
}

async fn next_unit(
    store: &Store,
    batch: &str,
    index: u32,
    history: &mut ChunkHistory,
) -> Result<Option<ChunkState>, baton_store::Error> {
    (history.attempts, history.raises) = (0, 0);
    if let Some(part) = bounded(STORE_CALL_LIMIT, store.next_part(batch, index)).await? {
        history.part = Some(part);
        return Ok(None);
    }
    let outcome = bounded(STORE_CALL_LIMIT, store.finish_split_chunk(batch, index)).await?;
    if outcome.is_none() {
        // not split after all (or a part appeared since): the whole chunk's attempt finds out
        history.part = None;
    }
    Ok(outcome)
}

/// Saves the restart data of a chunk's session after a failed attempt.
pub struct Saver<'a> {
    /// The worker's chunk histories.
    pub restarts: &'a Mutex<Restarts>,
    /// The worker's server session.
    pub replier: &'a ServerReplier,
    /// The chunk's session.
    pub session_id: &'a str,
}

impl Saver<'_> {
    /// Saves the session's restart data with `history` in it.
    async fn save(&self, history: &ChunkHistory) {
        // the lock is held until the data is handed to the replier: saves go out in order
        let mut restarts = self.restarts.lock().await;
        let data = restarts.failed(self.session_id, history);
        if let Err(e) = self.replier.save_restart(self.session_id, data).await {
            tracing::warn!(error = %e, "cannot save the chunk's attempts as restart data");
        }
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
