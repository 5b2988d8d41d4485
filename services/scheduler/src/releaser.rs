//! The releaser: queued chunks out to the workers, by policy, through the session manager.
//!
//! Each tick (every `--release-interval`, or sooner when a worker answers) it asks the store to
//! release what the policy allows ([`Store::release_chunks`]), and sends each released chunk as a
//! [`pb::ChunkWork`] request on the least busy of its client sessions; once the manager has
//! journaled a request the chunk is marked sent. Workers answer [`pb::ChunkDone`]; an answer that
//! says the database was overloaded defers releases for a moment, as the store does by itself
//! after a chunk committed after a workload retry.
//!
//! Exports are planned and released here too: each tick plans more parts of producing exports
//! (for a bounded time) and releases planned parts, at most `--export-parallel` of an export at a
//! time, as [`pb::ExportPartWork`] requests on the same sessions; workers answer
//! [`pb::ExportPartDone`]. Every few seconds it deletes the parts of exports past their retention.
//!
//! The releaser keeps nothing the store does not: chunks in flight count against the caps through
//! their state, so a restarted or second scheduler sees them. A chunk released but never sent (its
//! scheduler died in between) is released again after a timeout by any scheduler.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::time::Duration;

use baton_manager::client::{ClientSender, ClientSession, Connector};
use baton_mesh::now_ms;
use baton_mesh::proto::{from_any, to_any, type_url, v1 as pb};
use baton_store::Store;
use baton_store::batches::ReleaseCaps;
use baton_store::blobs::Blobs;
use baton_worker::{CHUNK_DONE, CHUNK_WORK, EXPORT_PART_DONE, EXPORT_PART_WORK};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

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

struct Shared {
    wake: Notify,
    /// Requests sent and not answered, per session.
    outstanding: Vec<AtomicU32>,
    /// No release before this time (ms), while the database is overloaded.
    paused_until: AtomicI64,
}

impl Shared {
    /// Defers releases for [`OVERLOAD_PAUSE`].
    fn pause(&self) {
        self.paused_until.fetch_max(now_ms() + OVERLOAD_PAUSE.as_millis() as i64, Ordering::Relaxed);
    }
}

/// Opens the client sessions, retrying until the manager answers or `shutdown`.
async fn open_sessions(
    connector: &Connector,
    options: &SchedulerOptions,
    me: &str,
    shutdown: &CancellationToken,
) -> Option<Vec<ClientSession>> {
    let mut sessions = Vec::new();
    while sessions.len() < options.release.sessions as usize {
        let open = ClientSession::open(connector, &options.manager, &options.pool, me.as_bytes().to_vec());
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            opened = open => match opened {
                Ok(session) => sessions.push(session),
                Err(e) => {
                    tracing::warn!(manager = %options.manager, error = %e, "cannot open a session; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }
    Some(sessions)
}

/// Runs the releaser until `shutdown`, with client sessions opened through `connector`.
pub async fn run(
    store: Store,
    blobs: Blobs,
    options: SchedulerOptions,
    connector: Connector,
    shutdown: CancellationToken,
) {
    let me = format!("scheduler-{}", hex::encode(rand::random::<[u8; 6]>()));
    let Some(sessions) = open_sessions(&connector, &options, &me, &shutdown).await else { return };
    tracing::info!(scheduler = %me, sessions = sessions.len(), manager = %options.manager, "releaser started");
    let shared = Arc::new(Shared {
        wake: Notify::new(),
        outstanding: (0..sessions.len()).map(|_| AtomicU32::new(0)).collect(),
        paused_until: AtomicI64::new(0),
    });
    let mut senders: Vec<ClientSender> = Vec::new();
    for (k, mut session) in sessions.into_iter().enumerate() {
        senders.push(session.sender());
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Some(response) = session.recv().await {
                shared.outstanding[k].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).ok();
                match response.payload.as_ref() {
                    Some(p) if p.type_url == type_url(EXPORT_PART_DONE) => {
                        match from_any::<pb::ExportPartDone>(EXPORT_PART_DONE, p) {
                            Ok(done) => {
                                tracing::debug!(export = %done.export_id, part = done.part, rows = done.rows, "part answered")
                            }
                            Err(e) => tracing::warn!(error = %e, "a bad ExportPartDone"),
                        }
                    }
                    Some(p) => match from_any::<pb::ChunkDone>(CHUNK_DONE, p) {
                        Ok(done) => {
                            if done.overloaded {
                                shared.pause();
                            }
                            tracing::debug!(batch = %done.batch_id, chunk = done.chunk_index, outcome = done.outcome, "chunk answered");
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "an answer that is neither a ChunkDone nor an ExportPartDone")
                        }
                    },
                    None => tracing::warn!("an empty answer"),
                }
                shared.wake.notify_one();
            }
        });
    }
    let caps = ReleaseCaps { overall: options.release.max_parallel, per_org: options.release.org_parallel };
    let mut next_sweep = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(options.release.release_interval) => {}
        }
        if shared.paused_until.load(Ordering::Relaxed) > now_ms() {
            continue;
        }
        if tokio::time::Instant::now() >= next_sweep {
            next_sweep = tokio::time::Instant::now() + EXPIRY_SWEEP;
            match store.expire_exports(&blobs, 100).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(exports = n, "expired exports deleted"),
                Err(e) => tracing::warn!(error = %e, "cannot expire exports"),
            }
        }
        if let Err(e) = store.plan_exports(PLAN_BUDGET).await {
            tracing::warn!(error = %e, "cannot plan export parts");
        }
        let parts = match store.release_parts(&me, options.release.export_parallel, options.release.max_parallel).await
        {
            Ok(parts) => parts,
            Err(e) => {
                tracing::warn!(error = %e, "cannot release export parts");
                Vec::new()
            }
        };
        for part in parts {
            let work = pb::ExportPartWork {
                org_id: part.org_id.clone(),
                export_id: part.export_id.clone(),
                part: part.number,
            };
            let Some(sent) = send(&senders, &shared, to_any(EXPORT_PART_WORK, &work), &shutdown).await else { return };
            match sent {
                Ok(()) => {
                    metrics::counter!("baton_export_parts_released_total").increment(1);
                    if let Err(e) = store.mark_part_sent(&part).await {
                        tracing::warn!(export = %part.export_id, part = part.number, error = %e, "cannot mark a part sent");
                    }
                }
                Err(e) => {
                    tracing::error!(export = %part.export_id, part = part.number, error = %e, "cannot send a part; it is released again later")
                }
            }
        }
        let released = match store.release_chunks(&me, caps).await {
            Ok(released) => released,
            Err(e) => {
                // the database itself is the overloaded one: wait
                tracing::warn!(error = %e, "cannot release chunks; pausing");
                shared.pause();
                continue;
            }
        };
        for chunk in released {
            let work = pb::ChunkWork {
                org_id: chunk.org_id.clone(),
                batch_id: chunk.batch_id.clone(),
                chunk_index: chunk.index,
            };
            let Some(sent) = send(&senders, &shared, to_any(CHUNK_WORK, &work), &shutdown).await else { return };
            match sent {
                Ok(()) => {
                    metrics::counter!("baton_chunks_released_total").increment(1);
                    if let Err(e) = store.mark_sent(&chunk).await {
                        tracing::warn!(batch = %chunk.batch_id, chunk = chunk.index, error = %e, "cannot mark a chunk sent");
                    }
                }
                Err(e) => {
                    tracing::error!(batch = %chunk.batch_id, chunk = chunk.index, error = %e, "cannot send a chunk; it is released again later");
                }
            }
        }
    }
    tracing::info!(scheduler = %me, "releaser stopped");
}

/// Sends a request on the least busy session; returns once the manager has journaled it (it
/// waits out a failover). None when shutdown comes first.
async fn send(
    senders: &[ClientSender],
    shared: &Shared,
    payload: prost_types::Any,
    shutdown: &CancellationToken,
) -> Option<Result<(), String>> {
    let k = (0..senders.len()).min_by_key(|&k| shared.outstanding[k].load(Ordering::Relaxed)).unwrap_or(0);
    shared.outstanding[k].fetch_add(1, Ordering::Relaxed);
    let sent = tokio::select! {
        _ = shutdown.cancelled() => return None,
        sent = senders[k].send(payload, Vec::new()) => sent,
    };
    Some(sent.map(|_| ()).map_err(|e| {
        shared.outstanding[k].fetch_sub(1, Ordering::Relaxed);
        e.to_string()
    }))
}
