//! Export parts: a worker reads a part's id range, writes it to the blob store and records it
//! ([`Store::produce_part`]), then answers [`internal::ExportPartDone`].
//!
//! A part delivered twice (a worker killed, a manager failover) is recorded once: the second run
//! finds it READY and answers it. A busy database or an unavailable blob store is retried with
//! backoff; when the attempts run out, or the export cannot be read at all (its object's schema
//! changed), the export fails with the cause, and its token reports it.

use baton_mesh::proto::internal::v1 as internal;
use baton_store::Store;
use baton_store::blobs::Blobs;
use baton_store::exports::{ExportState, PartOutcome};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::ChunkOptions;

/// Produces one delivered part; None when shutdown comes first (the part is left to be delivered
/// again).
pub async fn produce(
    store: &Store,
    blobs: &Blobs,
    options: &ChunkOptions,
    worker: &str,
    work: &internal::ExportPartWork,
    shutdown: &CancellationToken,
) -> Option<internal::ExportPartDone> {
    use baton_store::Error as E;
    let started = std::time::Instant::now();
    let mut backoff = options.retry_backoff;
    let mut cause = String::new();
    let done = |produced: bool, rows: i64| internal::ExportPartDone {
        export_id: work.export_id.clone(),
        part: work.part,
        produced,
        rows,
    };
    for attempt in 1..=options.max_attempts {
        let produce = store.produce_part(blobs, &work.export_id, work.part, worker);
        let produce = produce.instrument(tracing::info_span!("attempt", otel.name = "store produce part", attempt));
        let run = tokio::time::timeout(options.chunk_budget, produce);
        let failed = match run.await {
            Ok(Ok(PartOutcome::Produced(rows))) => {
                metrics::counter!("baton_export_parts_total", "outcome" => "produced").increment(1);
                metrics::counter!("baton_export_rows_produced_total").increment(rows as u64);
                metrics::histogram!("baton_export_part_duration_seconds").record(started.elapsed().as_secs_f64());
                tracing::debug!(export = %work.export_id, part = work.part, rows, "part produced");
                return Some(done(true, rows));
            }
            Ok(Ok(PartOutcome::NotProduced)) => {
                metrics::counter!("baton_export_parts_total", "outcome" => "not_produced").increment(1);
                return Some(done(false, 0));
            }
            Ok(Err(E::NotFound(what))) => {
                tracing::warn!(export = %work.export_id, part = work.part, %what, "part not found; not produced");
                return Some(done(false, 0));
            }
            Ok(Err(e @ (E::Invalid(_) | E::Corrupt(_)))) => {
                // retrying cannot help: the export fails with the cause
                cause = format!("part {}: {e}", work.part);
                break;
            }
            Ok(Err(e)) => format!("attempt {attempt}: {e}"),
            Err(_) => format!("attempt {attempt}: over the budget of {:?}", options.chunk_budget),
        };
        tracing::info!(export = %work.export_id, part = work.part, cause = %failed, "part attempt failed; retrying");
        cause = failed;
        let jitter = rand::random_range(0.5..1.5);
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
        }
        backoff = (backoff * 2).min(crate::MAX_BUSY_BACKOFF);
    }
    tracing::error!(export = %work.export_id, part = work.part, %cause, "part failed; the export fails");
    metrics::counter!("baton_export_parts_total", "outcome" => "failed").increment(1);
    let error = format!("part {} failed: {cause}", work.part);
    loop {
        match store.end_export(&work.export_id, ExportState::Failed, &error).await {
            Ok(()) => return Some(done(false, 0)),
            Err(e) => {
                tracing::warn!(export = %work.export_id, error = %e, "cannot record the failure; trying again");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(crate::STORE_RETRY) => {}
                }
            }
        }
    }
}
