//! Extract: the high-water mark, the snapshot in id order, then the changes after the mark.
//!
//! No gap: the high-water mark is read before the first snapshot page, and every change after it
//! is streamed afterwards, so a change made during the snapshot is either in it, or after the mark,
//! or both (the only duplicate, harmless under a version-guarded apply). Seqs are dense, so a
//! missing seq can only mean trimming, which is answered OUT_OF_RANGE, never skipped.
//!
//! Once caught up, the stream waits on the store's [`baton_store::changes::ChangeWatch`]: a
//! commit of the org wakes it, and it reads the log from its cursor again.

use std::time::Duration;

use baton_api::convert;
use baton_mesh::proto::v1 as pb;
use baton_store::Store;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::Error;

/// The deadline of each of Extract's store reads (a page of the snapshot or of the changes).
const READ_LIMIT: Duration = Duration::from_secs(60);

/// An extraction to run.
#[derive(Debug, Clone)]
pub struct Extraction {
    /// The org.
    pub org: String,
    /// The objects (never empty: resolved to all of the org's objects beforehand).
    pub objects: Vec<String>,
    /// Resume after this seq, skipping the snapshot.
    pub after_seq: Option<i64>,
    /// Records per snapshot chunk.
    pub chunk_size: usize,
    /// How long to wait, once caught up, for a commit to be announced before reading the log
    /// anyway (the fallback for a commit no notification told of).
    pub fallback: Duration,
}

type Tx = mpsc::Sender<Result<pb::ExtractResponse, Status>>;

async fn send(tx: &Tx, kind: pb::extract_response::Kind) -> Result<(), ()> {
    tx.send(Ok(pb::ExtractResponse { kind: Some(kind) })).await.map_err(|_| ())
}

/// Runs an extraction into `tx` until the client goes away, the server shuts down, or an error
/// (sent as the stream's last item).
pub async fn run(store: Store, x: Extraction, tx: Tx, shutdown: CancellationToken) {
    if let Err(e) = stream(&store, &x, &tx, &shutdown).await {
        let _ = tx.send(Err(e.into())).await;
    }
}

async fn stream(store: &Store, x: &Extraction, tx: &Tx, shutdown: &CancellationToken) -> Result<(), Error> {
    let far = || Instant::now() + READ_LIMIT;
    let mut watch = store.changes_watch(&x.org);
    let mut cursor = match x.after_seq {
        Some(after) => after,
        None => {
            let high_water = store.high_water(&x.org).await?;
            if send(tx, pb::extract_response::Kind::HighWater(pb::HighWater { seq: high_water })).await.is_err() {
                return Ok(());
            }
            let mut rows = 0i64;
            for object in &x.objects {
                let mut after: Option<String> = None;
                loop {
                    let page = store.query(&x.org, object, "", &[], x.chunk_size, after.as_deref(), far()).await?;
                    let (Some(first), Some(last)) = (page.records.first(), page.records.last()) else { break };
                    rows += page.records.len() as i64;
                    let chunk = pb::SnapshotChunk {
                        object: object.clone(),
                        from_id: first.id.clone(),
                        to_id: last.id.clone(),
                        rows_so_far: rows,
                        records: page.records.iter().map(|r| convert::record_to_pb(r, &page.schema)).collect(),
                        schema_version: page.schema.version,
                    };
                    if send(tx, pb::extract_response::Kind::Snapshot(chunk)).await.is_err() {
                        return Ok(());
                    }
                    match page.next_after {
                        Some(next) => after = Some(next),
                        None => break,
                    }
                }
            }
            if send(tx, pb::extract_response::Kind::SnapshotDone(pb::SnapshotDone { rows })).await.is_err() {
                return Ok(());
            }
            high_water
        }
    };
    loop {
        crate::count_change_log_read("extract");
        let events = store.changes_since(&x.org, cursor, 1000).await?;
        if events.is_empty() {
            // caught up: woken by the next commit after the cursor (or the fallback), then the
            // log is read from the cursor again
            tokio::select! {
                () = tx.closed() => return Ok(()),
                () = shutdown.cancelled() => return Err(Error::ShuttingDown),
                _ = watch.wait(cursor, x.fallback) => continue,
            }
        }
        // read after the events, so that every field they carry is in the schema (a field added
        // by a newer version is typed by it, a dropped one left out); one query per batch
        let schemas: std::collections::HashMap<_, _> = store
            .list_objects(&x.org)
            .await?
            .into_iter()
            .filter(|s| x.objects.contains(&s.name))
            .map(|s| (s.name.clone(), s))
            .collect();
        cursor = events.last().map_or(cursor, |e| e.seq);
        let changes: Vec<_> =
            events.iter().filter_map(|e| Some(convert::change_to_pb(e, schemas.get(e.object.as_str())?))).collect();
        if !changes.is_empty()
            && send(tx, pb::extract_response::Kind::Changes(pb::ChangeBatch { changes })).await.is_err()
        {
            return Ok(());
        }
    }
}
