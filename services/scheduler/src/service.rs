//! The Scheduler gRPC service: batches staged, watched, read and cancelled. Releasing chunks is
//! the [`crate::releaser`]'s work.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use baton_api::batches::{batch_to_pb, chunk_to_pb};
use baton_api::convert::records_from_pb;
use baton_api::{Error, paging};
use baton_mesh::auth::org_of;
use baton_mesh::proto::unix_ms;
use baton_mesh::proto::v1 as pb;
use baton_mesh::status::{Violation, invalid_argument};
use baton_store::batches::{BatchOp, BatchStart, ChunkInfo, MAX_CHUNK_SIZE, NewBatch};
use baton_store::changes::Topic;
use baton_store::model::{Cursor, Fields};
use baton_store::{FieldError, Store};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

/// Records per chunk when the header leaves it unset.
pub const DEFAULT_CHUNK_SIZE: u32 = 10_000;
/// The least time between two reads of a watched batch: the commits of a burst (a chunk
/// released, started and committed; many chunks finishing together) are read once. Reading a
/// large batch's chunks on each commit competes with the workers for the cores (an earlier
/// experiment, docs/performance.md).
const WATCH_SPACING: Duration = Duration::from_millis(20);
/// The longest request id.
const MAX_REQUEST_ID: usize = 128;

/// The Scheduler gRPC service.
#[derive(Debug, Clone)]
pub struct SchedulerService {
    store: Store,
}

impl SchedulerService {
    /// A scheduler API over `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

fn invalid(field: &str, description: impl Into<String>) -> Status {
    invalid_argument(&[Violation::new(field, description.into())])
}

fn store_error(e: baton_store::Error) -> Status {
    Error::Store(e).into()
}

/// Checks a header and turns it into the batch to stage.
fn new_batch(header: &pb::BatchHeader) -> Result<NewBatch, Status> {
    let mut errors = Vec::new();
    if header.object.is_empty() {
        errors.push(FieldError::new("header.object", "required"));
    }
    let operation = match pb::BatchOperation::try_from(header.operation) {
        Ok(pb::BatchOperation::Upsert) => Some(BatchOp::Upsert),
        Ok(pb::BatchOperation::Insert) => Some(BatchOp::Insert),
        Ok(pb::BatchOperation::Update) => Some(BatchOp::Update),
        Ok(pb::BatchOperation::Delete) => Some(BatchOp::Delete),
        _ => {
            errors.push(FieldError::new("header.operation", "one of UPSERT, INSERT, UPDATE, DELETE"));
            None
        }
    };
    let chunk_size = if header.chunk_size == 0 { DEFAULT_CHUNK_SIZE } else { header.chunk_size };
    if chunk_size > MAX_CHUNK_SIZE {
        errors.push(FieldError::new("header.chunk_size", format!("at most {MAX_CHUNK_SIZE}, got {chunk_size}")));
    }
    if header.request_id.len() > MAX_REQUEST_ID {
        errors.push(FieldError::new("header.request_id", format!("at most {MAX_REQUEST_ID} characters")));
    }
    let webhook =
        baton_api::completion::webhook_of(header.completion.as_ref(), "header.completion").unwrap_or_else(|e| {
            errors.push(e);
            None
        });
    let policy = header.policy.unwrap_or_default();
    let not_before_ms = unix_ms(policy.not_before_time.as_ref());
    if not_before_ms < 0 {
        errors.push(FieldError::new("header.policy.not_before_time", "a time after the Unix epoch"));
    }
    match operation {
        Some(operation) if errors.is_empty() => Ok(NewBatch {
            object: header.object.clone(),
            operation,
            chunk_size,
            not_before_ms,
            max_parallel: policy.max_parallel_chunks,
            records_per_second: policy.records_per_second,
            request_id: (!header.request_id.is_empty()).then(|| header.request_id.clone()),
            // the request's span continues its caller's trace; the chunks continue this one
            traceparent: baton_mesh::trace::current(),
            webhook,
        }),
        _ => Err(Error::Invalid(errors).into()),
    }
}

/// Stages the records of one SubmitBatch stream into batch `id`; the records and chunks staged.
async fn stage(
    store: &Store,
    org: &str,
    id: &str,
    chunk_size: usize,
    stream: &mut Streaming<pb::SubmitBatchRequest>,
) -> Result<(u64, u32), Status> {
    let mut pending: Vec<Fields> = Vec::with_capacity(chunk_size);
    let (mut staged, mut chunks, mut frame) = (0u64, 0u32, 0usize);
    loop {
        let message = stream.message().await?;
        let last = message.is_none();
        if let Some(message) = message {
            frame += 1;
            match message.frame {
                Some(pb::submit_batch_request::Frame::Records(records)) => {
                    let records = records_from_pb(&records.records).map_err(|errors| {
                        let errors = errors
                            .into_iter()
                            .map(|e| FieldError::new(format!("frames[{frame}].{}", e.field), e.description));
                        Status::from(Error::Invalid(errors.collect()))
                    })?;
                    pending.extend(records);
                }
                Some(pb::submit_batch_request::Frame::Header(_)) => {
                    return Err(invalid(
                        &format!("frames[{frame}]"),
                        "a second header; the header is the first frame only",
                    ));
                }
                None => return Err(invalid(&format!("frames[{frame}]"), "an empty frame")),
            }
        }
        while pending.len() >= chunk_size || (last && !pending.is_empty()) {
            let rest = pending.split_off(pending.len().min(chunk_size));
            store.stage_chunk(org, id, chunks, staged, &pending).await.map_err(store_error)?;
            staged += pending.len() as u64;
            chunks += 1;
            pending = rest;
        }
        if last {
            return Ok((staged, chunks));
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::BatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::scheduler_server::Scheduler for SchedulerService {
    async fn submit_batch(
        &self,
        request: Request<Streaming<pb::SubmitBatchRequest>>,
    ) -> Result<Response<pb::SubmitBatchResponse>, Status> {
        let org = org_of(&request)?;
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(pb::SubmitBatchRequest { frame: Some(pb::submit_batch_request::Frame::Header(h)) }) => h,
            _ => return Err(invalid("frames[0]", "the first frame must be the header")),
        };
        let new = new_batch(&header)?;
        let id = match self.store.begin_batch(&org, &new).await.map_err(store_error)? {
            BatchStart::Existing(batch) => {
                return Ok(Response::new(pb::SubmitBatchResponse {
                    batch_id: batch.id,
                    records: batch.totals.records,
                    chunks: batch.totals.chunks,
                    duplicate: true,
                }));
            }
            BatchStart::New(id) => id,
        };
        let staged = stage(&self.store, &org, &id, new.chunk_size as usize, &mut stream).await;
        let staged = match staged {
            Ok((0, _)) => Err(invalid("records", "a batch needs at least one record")),
            other => other,
        };
        let (records, chunks) = match staged {
            Ok(staged) => staged,
            Err(status) => {
                // nothing of a broken upload stays behind
                if let Err(e) = self.store.abandon_batch(&org, &id).await {
                    tracing::warn!(batch = %id, error = %e, "cannot drop a broken upload");
                }
                return Err(status);
            }
        };
        self.store.finish_staging(&org, &id, records, chunks).await.map_err(store_error)?;
        metrics::counter!("baton_batch_records_staged_total").increment(records);
        tracing::info!(batch = %id, org = %org, records, chunks, "batch queued");
        Ok(Response::new(pb::SubmitBatchResponse { batch_id: id, records, chunks, duplicate: false }))
    }

    async fn get_batch(&self, request: Request<pb::GetBatchRequest>) -> Result<Response<pb::Batch>, Status> {
        let org = org_of(&request)?;
        let batch = self.store.batch(&org, &request.get_ref().batch_id).await.map_err(store_error)?;
        let completion = self.store.completion(&org, &batch.id).await.map_err(store_error)?;
        Ok(Response::new(pb::Batch {
            completion: completion.as_ref().map(baton_api::completion::delivery_to_pb),
            ..batch_to_pb(&batch)
        }))
    }

    type WatchBatchStream = EventStream;

    async fn watch_batch(
        &self,
        request: Request<pb::WatchBatchRequest>,
    ) -> Result<Response<Self::WatchBatchStream>, Status> {
        let org = org_of(&request)?;
        let id = request.into_inner().batch_id;
        // NOT_FOUND before the stream starts
        self.store.batch(&org, &id).await.map_err(store_error)?;
        let store = self.store.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        // made before the first read: every commit after it wakes the stream (see `wait` below)
        let mut progress = store.progress_watch(Topic::Batch(&id));
        tokio::spawn(async move {
            let mut seen: HashMap<u32, ChunkInfo> = HashMap::new();
            let mut first = true;
            loop {
                let read_at = tokio::time::Instant::now();
                metrics::counter!("baton_watch_reads_total", "watch" => "batch").increment(1);
                let read = async {
                    let batch = store.batch(&org, &id).await?;
                    let chunks = store.chunks(&org, &id, None, u32::MAX, false, false).await?;
                    Ok::<_, baton_store::Error>((batch, chunks))
                };
                let (batch, chunks) = match read.await {
                    Ok(read) => read,
                    Err(e) => {
                        let _ = tx.send(Err(store_error(e))).await;
                        return;
                    }
                };
                let changed: Vec<pb::ChunkStatus> = chunks
                    .into_iter()
                    .filter_map(|(c, _)| {
                        (seen.get(&c.index) != Some(&c)).then(|| {
                            let status = chunk_to_pb(&c);
                            seen.insert(c.index, c);
                            status
                        })
                    })
                    .collect();
                let finished = batch.is_finished();
                if (first || !changed.is_empty() || finished)
                    && tx.send(Ok(pb::BatchEvent { chunks: changed, batch: Some(batch_to_pb(&batch)) })).await.is_err()
                {
                    return;
                }
                first = false;
                if finished {
                    return;
                }
                // the store announces each commit that changes the batch or a chunk (workers commit
                // outcomes, in this process or, on PostgreSQL, any); the fallback finds the others
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = async {
                        // what commits meanwhile is announced to the watch, which returns at once
                        tokio::time::sleep_until(read_at + WATCH_SPACING).await;
                        progress.wait().await;
                    } => {}
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn list_chunk_results(
        &self,
        request: Request<pb::ListChunkResultsRequest>,
    ) -> Result<Response<pb::ListChunkResultsResponse>, Status> {
        let org = org_of(&request)?;
        let r = request.into_inner();
        let page = match r.page_size {
            0 => 100,
            n if n > 1000 => return Err(invalid("page_size", "at most 1000")),
            n => n,
        };
        // the token is the index of the last chunk of the page before
        let after = match r.page_token.as_str() {
            "" => None,
            token => Some(token.parse::<u32>().map_err(|_| invalid("page_token", "not a token this RPC answered"))?),
        };
        let chunks =
            self.store.chunks(&org, &r.batch_id, after, page + 1, r.aborted_only, true).await.map_err(store_error)?;
        let more = chunks.len() > page as usize;
        let results: Vec<pb::ChunkResult> = chunks
            .into_iter()
            .take(page as usize)
            .map(|(c, errors)| pb::ChunkResult {
                chunk: Some(chunk_to_pb(&c)),
                errors: errors
                    .into_iter()
                    .map(|e| pb::RecordError { index: e.index as u64, field: e.field, reason: e.reason })
                    .collect(),
            })
            .collect();
        let next_page_token = match results.last().and_then(|r| r.chunk.as_ref()) {
            Some(last) if more => last.index.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListChunkResultsResponse { results, next_page_token }))
    }

    async fn list_batches(
        &self,
        request: Request<pb::ListBatchesRequest>,
    ) -> Result<Response<pb::ListBatchesResponse>, Status> {
        let org = org_of(&request)?;
        let r = request.into_inner();
        let size = paging::page_size(r.page_size)?;
        let after = paging::cursor_of(&r.page_token)?;
        let batches = self.store.list_batches(&org, after.as_ref(), size + 1).await.map_err(store_error)?;
        let (batches, next_page_token) =
            paging::page(batches, size, |b| Cursor { created_at_ms: b.created_at_ms, id: b.id.clone() });
        Ok(Response::new(pb::ListBatchesResponse {
            batches: batches.iter().map(batch_to_pb).collect(),
            next_page_token,
        }))
    }

    async fn cancel_batch(&self, request: Request<pb::CancelBatchRequest>) -> Result<Response<pb::Batch>, Status> {
        let org = org_of(&request)?;
        let batch = self.store.cancel_batch(&org, &request.get_ref().batch_id).await.map_err(store_error)?;
        tracing::info!(batch = %batch.id, org = %org, "batch cancelled");
        Ok(Response::new(batch_to_pb(&batch)))
    }
}
