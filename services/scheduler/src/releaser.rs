//! The releaser: queued chunks out to the workers, by policy, through the session manager.
//!
//! Each tick (every `--release-interval`, or sooner when a worker answers) it asks the store to
//! release what the policy allows ([`Store::release_chunks`]), and sends each released chunk as a
//! [`internal::ChunkWork`] request on the least busy of its client sessions; once the manager has
//! journaled a request the chunk is marked sent. Workers answer [`internal::ChunkDone`]; an answer that
//! says the database was overloaded defers releases for a moment, as the store does by itself
//! after a chunk committed after a workload retry.
//!
//! Exports are planned and released here too: each tick plans more parts of producing exports
//! (for a bounded time) and releases planned parts, at most `--export-parallel` of an export at a
//! time, as [`internal::ExportPartWork`] requests on the same sessions; workers answer
//! [`internal::ExportPartDone`]. Every few seconds it deletes the parts of exports past their retention.
//!
//! The store knows where every chunk is: chunks in flight count against the caps through their
//! state, so a restarted or second scheduler sees them. What it cannot know is whether a chunk
//! released just before its scheduler died had reached the manager; the manager keeps that for
//! the scheduler, as client restart data. The sessions are named after the scheduler id (`ID/0`
//! to `ID/N-1`, `--scheduler-id`), so a restarted scheduler resumes them, with the answers queued
//! meanwhile; and each request carries, as its session's restart data, what the scheduler has
//! sent on that session and not seen answered ([`RestartData`]). On start, before releasing
//! anything, the releaser reads it back ([`Store::recover_chunks`], [`Store::recover_parts`]):
//! its chunks and parts released and not marked sent are marked sent when listed (the manager
//! holds them: they are never sent again) and released again at once when not (they never
//! reached it). A chunk of a scheduler that does not come back is released again by any
//! scheduler after the store's unsent-release timeout.

use std::collections::{HashSet, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use baton_api::work::{CHUNK_DONE, CHUNK_WORK, EXPORT_PART_DONE, EXPORT_PART_WORK};
use baton_manager_client::{ClientResponse, ClientSender, ClientSession, Connector};
use baton_mesh::proto::internal::v1 as internal;
use baton_mesh::proto::{from_any, to_any, type_url};
use baton_store::Store;
use baton_store::batches::ReleaseCaps;
use baton_store::blobs::Blobs;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Code;
use tracing::Instrument;

use crate::SchedulerOptions;

/// How long releases pause after a worker reports an overloaded database (its chunk met a busy
/// database), or a release fails. The store also defers releases by itself after a chunk
/// committed after a workload retry (see [`Store::release_chunks`]); this covers the rest, such as
/// a chunk aborted after its busy retries ran out.
const OVERLOAD_PAUSE: Duration = Duration::from_millis(baton_store::batches::OVERLOAD_PAUSE_MS as u64);
/// How long a tick may spend planning export parts.
const PLAN_BUDGET: Duration = Duration::from_millis(100);
/// How often exports past their retention are looked for.
const EXPIRY_SWEEP: Duration = Duration::from_secs(5);
/// How long a failed open of a session, or a failed recovery, waits before it is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// How often a surplus session asks again to be closed while answers are still to come on it.
const SURPLUS_CLOSE_RETRY: Duration = Duration::from_secs(1);
/// The most sessions `--sessions` allows (a bound on what restart data may claim).
const MAX_SESSIONS: u32 = 1024;
/// How often the chunk and export gauges are sampled (one grouped store read).
const GAUGES_EVERY: Duration = Duration::from_secs(10);

/// What a request is about, as restart data lists it: a chunk or an export part.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
enum Work {
    /// A chunk ([`internal::ChunkWork`], answered by [`internal::ChunkDone`]).
    Chunk {
        /// Its batch.
        batch_id: String,
        /// Its number in the batch.
        chunk_index: u32,
    },
    /// An export part ([`internal::ExportPartWork`], answered by [`internal::ExportPartDone`]).
    Part {
        /// Its export.
        export_id: String,
        /// Its number in the export.
        part: u32,
    },
}

impl Work {
    /// The request a worker is sent for it.
    fn payload(&self, org_id: &str, traceparent: String) -> prost_types::Any {
        let org_id = org_id.to_owned();
        match self.clone() {
            Work::Chunk { batch_id, chunk_index } => {
                to_any(CHUNK_WORK, &internal::ChunkWork { org_id, batch_id, chunk_index, traceparent })
            }
            Work::Part { export_id, part } => {
                to_any(EXPORT_PART_WORK, &internal::ExportPartWork { org_id, export_id, part, traceparent })
            }
        }
    }
}

impl std::fmt::Display for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Work::Chunk { batch_id, chunk_index } => write!(f, "chunk {chunk_index} of batch {batch_id}"),
            Work::Part { export_id, part } => write!(f, "part {part} of export {export_id}"),
        }
    }
}

/// A session's client restart data, JSON sent with each request on it: the manager keeps the
/// last, and hands it back when the session is resumed, for example
/// `{"sessions":8,"in_flight":[{"batch_id":"bat_…","chunk_index":3},{"export_id":"exp_…","part":2}]}`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct RestartData {
    /// The sessions the scheduler holds, counting those of an earlier start still draining: a
    /// scheduler restarted with fewer finds its surplus sessions from this.
    #[serde(default)]
    sessions: u32,
    /// Requests sent on the session and not seen answered, oldest first: at most
    /// `--max-parallel` chunks and as many parts, which is all this scheduler can have in flight.
    #[serde(default)]
    in_flight: Vec<Work>,
}

impl RestartData {
    /// The restart data `session` was resumed with (none for a new session).
    fn of(session: &ClientSession) -> Self {
        let data = &session.opened().restart_data;
        if data.is_empty() {
            return Self::default();
        }
        serde_json::from_slice(data).unwrap_or_else(|e| {
            // listing nothing is safe: what it held is sent again, and a second delivery of a
            // chunk reads its outcome
            tracing::warn!(session = session.session_id(), error = %e, "unreadable restart data; ignored");
            Self::default()
        })
    }
}

/// Releases held back while the database is overloaded: for [`OVERLOAD_PAUSE`] after the last
/// report, on tokio's clock.
#[derive(Debug, Default)]
struct Overload {
    until: Mutex<Option<tokio::time::Instant>>,
}

impl Overload {
    /// Holds releases back for [`OVERLOAD_PAUSE`] from now; a pause in progress is never
    /// shortened.
    fn report(&self) {
        let until = tokio::time::Instant::now() + OVERLOAD_PAUSE;
        let mut held = self.until.lock().unwrap_or_else(|e| e.into_inner());
        *held = Some(held.map_or(until, |t| t.max(until)));
    }

    /// Whether releases are held back now.
    fn holding(&self) -> bool {
        let held = self.until.lock().unwrap_or_else(|e| e.into_inner());
        held.is_some_and(|t| tokio::time::Instant::now() < t)
    }
}

struct Shared {
    wake: Notify,
    /// Requests sent and not seen answered, per session: what its restart data lists.
    in_flight: Vec<Mutex<VecDeque<Work>>>,
    /// Chunks, and parts, listed per session at most (`--max-parallel`).
    listed: usize,
    /// The sessions the restart data records ([`RestartData::sessions`]).
    sessions: AtomicU32,
    /// Releases held back while the database is overloaded.
    overload: Overload,
}

impl Shared {
    /// Defers releases for [`OVERLOAD_PAUSE`].
    fn pause(&self) {
        self.overload.report();
    }

    fn in_flight(&self, k: usize) -> MutexGuard<'_, VecDeque<Work>> {
        self.in_flight[k].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session with the fewest requests in flight.
    fn least_busy(&self) -> usize {
        (0..self.in_flight.len()).min_by_key(|&k| self.in_flight(k).len()).unwrap_or(0)
    }

    /// Notes `work` as sent on session `k`: the restart data to send it with.
    fn sending(&self, k: usize, work: Work) -> Vec<u8> {
        let mut in_flight = self.in_flight(k);
        let kind = std::mem::discriminant(&work);
        if in_flight.iter().filter(|w| std::mem::discriminant(*w) == kind).count() >= self.listed {
            // an answer lost (or a response not understood): the oldest of its kind goes. Only
            // the newest request can be between its send and its mark, and one left unlisted is
            // at worst sent again
            if let Some(oldest) = in_flight.iter().position(|w| std::mem::discriminant(w) == kind) {
                in_flight.remove(oldest);
            }
        }
        in_flight.push_back(work);
        let data = RestartData {
            sessions: self.sessions.load(Ordering::Relaxed),
            in_flight: in_flight.iter().cloned().collect(),
        };
        serde_json::to_vec(&data).unwrap_or_default()
    }

    /// `work` sent on session `k` is answered (or was never sent).
    fn answered(&self, k: usize, work: &Work) {
        let mut in_flight = self.in_flight(k);
        if let Some(i) = in_flight.iter().position(|w| w == work) {
            in_flight.remove(i);
        }
    }

    /// What an answer is about; an answer that says the database is overloaded pauses releases.
    fn answer(&self, response: &ClientResponse) -> Option<Work> {
        match response.payload.as_ref() {
            Some(p) if p.type_url == type_url(EXPORT_PART_DONE) => {
                match from_any::<internal::ExportPartDone>(EXPORT_PART_DONE, p) {
                    Ok(done) => {
                        tracing::debug!(export = %done.export_id, part = done.part, rows = done.rows, "part answered");
                        Some(Work::Part { export_id: done.export_id, part: done.part })
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "a bad ExportPartDone");
                        None
                    }
                }
            }
            Some(p) => match from_any::<internal::ChunkDone>(CHUNK_DONE, p) {
                Ok(done) => {
                    if done.overloaded {
                        self.pause();
                    }
                    tracing::debug!(batch = %done.batch_id, chunk = done.chunk_index, outcome = done.outcome, "chunk answered");
                    Some(Work::Chunk { batch_id: done.batch_id, chunk_index: done.chunk_index })
                }
                Err(e) => {
                    tracing::warn!(error = %e, "an answer that is neither a ChunkDone nor an ExportPartDone");
                    None
                }
            },
            None => {
                tracing::warn!("an empty answer");
                None
            }
        }
    }
}

/// Opens the sessions `{me}/{k}` for `k` in `numbers` (creating them, or resuming those of an
/// earlier start), retrying until the manager answers or `shutdown`.
async fn open_sessions(
    connector: &Connector,
    options: &SchedulerOptions,
    me: &str,
    numbers: Range<u32>,
    shutdown: &CancellationToken,
) -> Option<Vec<ClientSession>> {
    let mut sessions = Vec::new();
    for k in numbers {
        let id = format!("{me}/{k}");
        loop {
            // no restart data: a non-empty one would replace the one the session holds
            let open = ClientSession::open_named(connector, &options.manager, &options.pool, &id, Vec::new());
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                opened = open => match opened {
                    Ok(session) => {
                        sessions.push(session);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(manager = %options.manager, session = %id, error = %e, "cannot open a session; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return None,
                            _ = tokio::time::sleep(RETRY) => {}
                        }
                    }
                }
            }
        }
    }
    Some(sessions)
}

/// Settles the releases this scheduler left unsent when it last stopped, from the restart data
/// of its sessions (see the module doc), retrying until the store answers or `shutdown`: the
/// listed work still in flight.
async fn recover(
    store: &Store,
    me: &str,
    restart: &[RestartData],
    shutdown: &CancellationToken,
) -> Option<HashSet<Work>> {
    let listed: HashSet<&Work> = restart.iter().flat_map(|r| &r.in_flight).collect();
    let (mut chunks, mut parts) = (Vec::new(), Vec::new());
    for work in listed {
        match work {
            Work::Chunk { batch_id, chunk_index } => chunks.push((batch_id.clone(), *chunk_index)),
            Work::Part { export_id, part } => parts.push((export_id.clone(), *part)),
        }
    }
    loop {
        let recovered = async {
            let c = store.recover_chunks(me, &chunks).await?;
            let p = store.recover_parts(me, &parts).await?;
            Ok::<_, baton_store::Error>((c, p))
        };
        match recovered.await {
            Ok((c, p)) => {
                tracing::info!(
                    scheduler = %me,
                    chunks_marked_sent = c.marked_sent,
                    chunks_released_again = c.released_again,
                    parts_marked_sent = p.marked_sent,
                    parts_released_again = p.released_again,
                    "releases of the last run settled"
                );
                let chunks =
                    c.in_flight.into_iter().map(|(batch_id, chunk_index)| Work::Chunk { batch_id, chunk_index });
                let parts = p.in_flight.into_iter().map(|(export_id, part)| Work::Part { export_id, part });
                return Some(chunks.chain(parts).collect());
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot settle the releases of the last run; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }
}

/// Drains a surplus session (one of an earlier start with more `--sessions`), then closes it. No
/// request goes on it; the answers still to come on it are received, and it is closed once the
/// manager holds nothing of it: the manager refuses the close (FAILED_PRECONDITION) while
/// requests are unanswered or answers unreceived, so it is asked again every
/// [`SURPLUS_CLOSE_RETRY`] in between. Closing at once, dropping what is queued, would be
/// simpler, but the store counts those chunks as sent and nobody would send them again.
async fn drain(mut session: ClientSession, shared: Arc<Shared>, draining: Arc<AtomicU32>, sessions: u32) {
    let id = session.session_id().to_owned();
    loop {
        match session.close(false).await {
            Ok(()) => break,
            Err(status) if status.code() == Code::FailedPrecondition => {}
            Err(status) => tracing::warn!(session = %id, error = %status, "cannot close a surplus session"),
        }
        let next = tokio::time::sleep(SURPLUS_CLOSE_RETRY);
        tokio::pin!(next);
        loop {
            tokio::select! {
                response = session.recv() => {
                    // None: the session has stopped (the process is stopping)
                    let Some(response) = response else { return };
                    shared.answer(&response);
                    shared.wake.notify_one();
                }
                () = &mut next => break,
            }
        }
    }
    tracing::info!(session = %id, "surplus session drained and closed");
    if draining.fetch_sub(1, Ordering::Relaxed) == 1 {
        // the restart data stops counting them
        shared.sessions.store(sessions, Ordering::Relaxed);
    }
}

/// Runs the releaser until `shutdown`, with client sessions opened through `connector`.
pub async fn run(
    store: Store,
    blobs: Blobs,
    options: SchedulerOptions,
    connector: Connector,
    shutdown: CancellationToken,
) {
    let me = options.id();
    if let Some(releaser) = Releaser::start(store, blobs, options, &connector, me.clone(), shutdown).await {
        releaser.run().await;
    }
    tracing::info!(scheduler = %me, "releaser stopped");
}

/// A started releaser: its sessions' senders, and what their answers update.
struct Releaser {
    store: Store,
    blobs: Blobs,
    options: SchedulerOptions,
    me: String,
    senders: Vec<ClientSender>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    /// The tasks that take the sessions' answers, drain surplus sessions and sample the gauges.
    tasks: TaskTracker,
}

impl Releaser {
    /// Opens (or resumes) the sessions, settles what an earlier start released and did not send,
    /// and starts the tasks that take the answers. None when shutdown comes first.
    async fn start(
        store: Store,
        blobs: Blobs,
        options: SchedulerOptions,
        connector: &Connector,
        me: String,
        shutdown: CancellationToken,
    ) -> Option<Self> {
        let count = options.release.sessions;
        let sessions = open_sessions(connector, &options, &me, 0..count, &shutdown).await?;
        let mut restart: Vec<RestartData> = sessions.iter().map(RestartData::of).collect();
        // Started before with more sessions: the ones above `count` are resumed too, to drain
        // and close (see `drain`), and their restart data is read like the others'.
        let before = restart.iter().map(|r| r.sessions).max().unwrap_or(0).min(MAX_SESSIONS);
        let surplus = open_sessions(connector, &options, &me, count..before.max(count), &shutdown).await?;
        restart.extend(surplus.iter().map(RestartData::of));
        let flying = recover(&store, &me, &restart, &shutdown).await?;
        tracing::info!(
            scheduler = %me,
            sessions = sessions.len(),
            surplus = surplus.len(),
            manager = %options.manager,
            "releaser started"
        );
        let in_flight = restart
            .iter()
            .take(sessions.len())
            .map(|r| Mutex::new(r.in_flight.iter().filter(|w| flying.contains(*w)).cloned().collect()))
            .collect();
        let shared = Arc::new(Shared {
            wake: Notify::new(),
            in_flight,
            listed: options.release.max_parallel as usize,
            sessions: AtomicU32::new(count.max(before)),
            overload: Overload::default(),
        });
        let tasks = TaskTracker::new();
        tasks.spawn(sample_gauges(store.clone(), shutdown.clone()));
        let draining = Arc::new(AtomicU32::new(surplus.len() as u32));
        for session in surplus {
            let drained = drain(session, shared.clone(), draining.clone(), count);
            tasks.spawn(until(shutdown.clone(), drained));
        }
        let mut senders: Vec<ClientSender> = Vec::new();
        for (k, mut session) in sessions.into_iter().enumerate() {
            senders.push(session.sender());
            let shared = shared.clone();
            let answers = async move {
                while let Some(response) = session.recv().await {
                    if let Some(work) = shared.answer(&response) {
                        shared.answered(k, &work);
                    }
                    shared.wake.notify_one();
                }
            };
            tasks.spawn(until(shutdown.clone(), answers));
        }
        Some(Self { store, blobs, options, me, senders, shared, shutdown, tasks })
    }

    /// Releases until shutdown, then waits for the tasks [`Releaser::start`] started (each ends
    /// on the shutdown).
    async fn run(self) {
        self.release().await;
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Releases, every `--release-interval` or sooner when a worker answers, until shutdown.
    async fn release(&self) {
        let mut next_sweep = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.shared.wake.notified() => {}
                _ = tokio::time::sleep(self.options.release.release_interval) => {}
            }
            if self.shared.overload.holding() {
                continue;
            }
            if tokio::time::Instant::now() >= next_sweep {
                next_sweep = tokio::time::Instant::now() + EXPIRY_SWEEP;
                match self.store.expire_exports(&self.blobs, 100).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(exports = n, "expired exports deleted"),
                    Err(e) => tracing::warn!(error = %e, "cannot expire exports"),
                }
            }
            if let Err(e) = self.store.plan_exports(PLAN_BUDGET).await {
                tracing::warn!(error = %e, "cannot plan export parts");
            }
            if self.release_parts().await.is_none() || self.release_chunks().await.is_none() {
                return;
            }
        }
    }

    /// Releases export parts and sends them. None when shutdown comes first.
    async fn release_parts(&self) -> Option<()> {
        let release = &self.options.release;
        let parts = match self.store.release_parts(&self.me, release.export_parallel, release.max_parallel).await {
            Ok(parts) => parts,
            Err(e) => {
                tracing::warn!(error = %e, "cannot release export parts");
                Vec::new()
            }
        };
        for part in parts {
            // the release continues the trace of the request that created the export
            let span = tracing::info_span!("release", otel.name = "release part", export = %part.export_id, part = part.number);
            baton_mesh::trace::continue_from(&span, &part.traceparent);
            let key = Work::Part { export_id: part.export_id.clone(), part: part.number };
            self.hand_over(key, &part.org_id, span, || self.store.mark_part_sent(&part)).await?;
        }
        Some(())
    }

    /// Releases chunks and sends them; a failed release pauses releases (the database itself is
    /// the overloaded one). None when shutdown comes first.
    async fn release_chunks(&self) -> Option<()> {
        let caps =
            ReleaseCaps { overall: self.options.release.max_parallel, per_org: self.options.release.org_parallel };
        let released = match self.store.release_chunks(&self.me, caps).await {
            Ok(released) => released,
            Err(e) => {
                tracing::warn!(error = %e, "cannot release chunks; pausing");
                self.shared.pause();
                return Some(());
            }
        };
        for chunk in released {
            // the release continues the trace of the request that submitted the batch
            let span = tracing::info_span!("release", otel.name = "release chunk", batch = %chunk.batch_id, chunk = chunk.index);
            baton_mesh::trace::continue_from(&span, &chunk.traceparent);
            let key = Work::Chunk { batch_id: chunk.batch_id.clone(), chunk_index: chunk.index };
            self.hand_over(key, &chunk.org_id, span, || self.store.mark_sent(&chunk)).await?;
        }
        Some(())
    }

    /// Sends the work of a released chunk or part (`key`, of `org_id`, in the trace of `span`) on
    /// the least busy session and, once the manager has journaled it, marks it sent (`mark`). A
    /// send that fails leaves it to be released again later. None when shutdown comes first.
    async fn hand_over<M, F>(&self, key: Work, org_id: &str, span: tracing::Span, mark: M) -> Option<()>
    where
        M: FnOnce() -> F,
        F: std::future::Future<Output = Result<(), baton_store::Error>>,
    {
        let payload = key.payload(org_id, baton_mesh::trace::of(&span));
        let chunk = matches!(key, Work::Chunk { .. });
        let what = key.to_string();
        match send(&self.senders, &self.shared, key, payload, &self.shutdown).instrument(span).await? {
            Ok(()) => {
                if chunk {
                    metrics::counter!("baton_chunks_released_total").increment(1);
                    // fault tests stop here and kill the process: the chunk journaled, not marked
                    fail::fail_point!("releaser-chunk-sent");
                } else {
                    metrics::counter!("baton_export_parts_released_total").increment(1);
                }
                if let Err(e) = mark().await {
                    tracing::warn!(work = %what, error = %e, "cannot mark it sent");
                }
            }
            Err(e) => tracing::error!(work = %what, error = %e, "cannot send it; it is released again later"),
        }
        Some(())
    }
}

/// Runs `task` until it ends or `shutdown`.
async fn until(shutdown: CancellationToken, task: impl std::future::Future<Output = ()>) {
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = task => {}
    }
}

/// Sends a request about `work` on the least busy session, with the session's restart data;
/// returns once the manager has journaled it (it waits out a failover). None when shutdown comes
/// first.
async fn send(
    senders: &[ClientSender],
    shared: &Shared,
    work: Work,
    payload: prost_types::Any,
    shutdown: &CancellationToken,
) -> Option<Result<(), String>> {
    let k = shared.least_busy();
    let restart = shared.sending(k, work.clone());
    let sent = tokio::select! {
        _ = shutdown.cancelled() => return None,
        sent = senders[k].send(payload, restart) => sent,
    };
    Some(sent.map(|_| ()).map_err(|e| {
        shared.answered(k, &work);
        e.to_string()
    }))
}

/// Sets `baton_chunks{state}` and `baton_exports_producing` every 10 s, until `shutdown` (every
/// scheduler replica reports the same shared store's counts; dashboards take the max).
async fn sample_gauges(store: Store, shutdown: CancellationToken) {
    loop {
        match store.work_in_progress().await {
            Ok((chunks, exports)) => {
                for state in ["PENDING", "RELEASED", "RUNNING"] {
                    let n = chunks.iter().find(|(s, _)| s == state).map_or(0, |(_, n)| *n);
                    metrics::gauge!("baton_chunks", "state" => state.to_lowercase()).set(n as f64);
                }
                metrics::gauge!("baton_exports_producing").set(exports as f64);
            }
            Err(e) => tracing::debug!(error = %e, "cannot sample the chunk gauges"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(GAUGES_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    //! The releaser's time rules on paused time.
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn an_overload_holds_releases_back_for_the_pause_and_a_second_report_extends_it() {
        let overload = Overload::default();
        assert!(!overload.holding(), "nothing reported");
        overload.report();
        tokio::time::advance(OVERLOAD_PAUSE - MS).await;
        assert!(overload.holding(), "a millisecond before the pause ends");
        overload.report();
        tokio::time::advance(MS).await;
        assert!(overload.holding(), "the second report extends the pause");
        tokio::time::advance(OVERLOAD_PAUSE - MS * 2).await;
        assert!(overload.holding());
        tokio::time::advance(MS).await;
        assert!(!overload.holding(), "the pause after the last report is over");
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_report_never_shortens_a_pause_in_progress() {
        let overload = Overload::default();
        overload.report();
        let later = tokio::time::Instant::now() + OVERLOAD_PAUSE;
        // a report made "before" (its until earlier than the one held) keeps the later end
        *overload.until.lock().unwrap() = Some(later + OVERLOAD_PAUSE);
        overload.report();
        tokio::time::advance(OVERLOAD_PAUSE * 2 - MS).await;
        assert!(overload.holding());
        tokio::time::advance(MS).await;
        assert!(!overload.holding());
    }
}
