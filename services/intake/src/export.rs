//! Export, semi-synchronous: the first portion at once, then a token to follow the export
//! (GetExport, WatchExport), read its parts (FetchPart) and cancel it (CancelExport).
//!
//! The intake only reads: it creates the export record before answering, and the scheduler plans
//! and releases the parts to the workers, which write them to the blob store.

use std::pin::Pin;

use baton_mesh::auth::org_of;
use baton_mesh::proto::v1 as pb;
use baton_mesh::status::{self, RESUBMIT_AS_EXPORT};
use baton_store::FieldError;
use baton_store::changes::Topic;
use baton_store::exports::{self, ExportSpec, ExportStart, PartRead};
use tokio_stream::Stream;
use tonic::{Code, Request, Status};

use baton_api::exports::export_to_pb;
use baton_api::{paging, part_rows};
use baton_store::model::Cursor;

use crate::{Error, IntakeService, convert, require};

/// Rows per FetchPart frame, at most.
const FRAME_ROWS: usize = 1_000;
/// A FetchPart frame is sent once it holds this many bytes of rows, even with fewer than
/// [`FRAME_ROWS`]: frames of large records stay well under a client's 4 MiB default limit.
const FRAME_BYTES: usize = 256 * 1024;
/// The longest request id.
const MAX_REQUEST_ID: usize = 128;

/// A stream of gRPC messages.
pub type GrpcStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Checks an export request and fills in the defaults.
fn spec_of(request: pb::ExportRequest) -> Result<ExportSpec, Error> {
    let mut errors = Vec::new();
    if request.object.is_empty() {
        errors.push(FieldError::new("object", "required"));
    }
    if request.sync_rows > exports::MAX_SYNC_ROWS {
        errors.push(FieldError::new(
            "sync_rows",
            format!("at most {}, got {}", exports::MAX_SYNC_ROWS, request.sync_rows),
        ));
    }
    if request.part_rows > exports::MAX_PART_ROWS {
        errors.push(FieldError::new(
            "part_rows",
            format!("at most {}, got {}", exports::MAX_PART_ROWS, request.part_rows),
        ));
    }
    if request.request_id.len() > MAX_REQUEST_ID {
        errors.push(FieldError::new("request_id", format!("at most {MAX_REQUEST_ID} characters")));
    }
    let webhook = baton_api::completion::webhook_of(request.completion.as_ref(), "completion").unwrap_or_else(|e| {
        errors.push(e);
        None
    });
    if !errors.is_empty() {
        return Err(Error::Invalid(errors));
    }
    Ok(ExportSpec {
        object: request.object,
        filter: request.filter,
        fields: request.fields,
        sync_rows: if request.sync_rows == 0 { exports::DEFAULT_SYNC_ROWS } else { request.sync_rows },
        part_rows: if request.part_rows == 0 { exports::DEFAULT_PART_ROWS } else { request.part_rows },
        request_id: (!request.request_id.is_empty()).then_some(request.request_id),
        // the request's span continues its caller's trace; the parts continue this one
        traceparent: baton_mesh::trace::current(),
        webhook,
    })
}

impl IntakeService {
    pub(crate) async fn serve_export(&self, request: Request<pb::ExportRequest>) -> Result<pb::ExportResponse, Status> {
        let org = org_of(&request)?;
        let request = request.into_inner();
        let wait = request.wait;
        let spec = spec_of(request)?;
        let permit = self.limits.admit(&org, RESUBMIT_AS_EXPORT)?;
        let schema = self.store.object(&org, &spec.object).await.map_err(Error::from)?;
        let started = self
            .store
            .start_export(&org, &spec, self.deadline(), self.export_retention)
            .await
            .map_err(|e| Error::from(e).deadline_as(RESUBMIT_AS_EXPORT))?;
        // `wait` below is not a real-time request: it does not hold an admission slot
        drop(permit);
        let (first, export, token, estimate_exact) = match started {
            ExportStart::Complete { records, as_of_seq } => {
                metrics::counter!("baton_exports_total", "mode" => "sync").increment(1);
                return Ok(pb::ExportResponse {
                    as_of_seq,
                    estimated_total: records.len() as i64,
                    estimate_exact: true,
                    records: records.iter().map(|r| convert::record_to_pb(r, &schema)).collect(),
                    complete: true,
                    schema_version: schema.version,
                    ..Default::default()
                });
            }
            ExportStart::Started { first, export, token, estimate_exact } => (first, export, token, estimate_exact),
        };
        metrics::counter!("baton_exports_total", "mode" => "async").increment(1);
        tracing::info!(export = %export.id, org = %org, object = %export.object, reason = export.reason.as_str(), "export started");
        let mut status = export_to_pb(&export);
        if wait {
            // woken by the commits of the export's progress (see WatchExport)
            let mut progress = self.store.progress_watch(Topic::Export(&export.id));
            loop {
                let current = self.store.export(&org, &token).await.map_err(Error::from)?;
                if current.state.is_final() {
                    status = export_to_pb(&current);
                    break;
                }
                progress.wait().await;
            }
        }
        Ok(pb::ExportResponse {
            records: first.iter().map(|r| convert::record_to_pb(r, &schema)).collect(),
            complete: false,
            export_id: status.export_id.clone(),
            token,
            reason: status.reason,
            as_of_seq: status.as_of_seq,
            estimated_total: status.estimated_total,
            estimate_exact: estimate_exact || status.total_known,
            status: Some(status),
            schema_version: schema.version,
        })
    }

    pub(crate) async fn serve_get_export(
        &self,
        request: Request<pb::GetExportRequest>,
    ) -> Result<pb::ExportStatus, Status> {
        let org = org_of(&request)?;
        require(&request.get_ref().token, "token")?;
        let export = self.store.export(&org, &request.get_ref().token).await.map_err(Error::from)?;
        let completion = self.store.completion(&org, &export.id).await.map_err(Error::from)?;
        Ok(pb::ExportStatus {
            completion: completion.as_ref().map(baton_api::completion::delivery_to_pb),
            ..export_to_pb(&export)
        })
    }

    pub(crate) async fn serve_cancel_export(
        &self,
        request: Request<pb::CancelExportRequest>,
    ) -> Result<pb::ExportStatus, Status> {
        let org = org_of(&request)?;
        require(&request.get_ref().token, "token")?;
        let export = self.store.cancel_export(&org, &request.get_ref().token).await.map_err(Error::from)?;
        tracing::info!(export = %export.id, org = %org, "export cancelled");
        Ok(export_to_pb(&export))
    }

    pub(crate) async fn serve_list_exports(
        &self,
        request: Request<pb::ListExportsRequest>,
    ) -> Result<pb::ListExportsResponse, Status> {
        let org = org_of(&request)?;
        let r = request.into_inner();
        let size = paging::page_size(r.page_size)?;
        let after = paging::cursor_of(&r.page_token)?;
        let exports = self.store.list_exports(&org, after.as_ref(), size + 1).await.map_err(Error::from)?;
        let (exports, next_page_token) =
            paging::page(exports, size, |e| Cursor { created_at_ms: e.created_at_ms, id: e.id.clone() });
        Ok(pb::ListExportsResponse { exports: exports.iter().map(export_to_pb).collect(), next_page_token })
    }

    pub(crate) async fn serve_watch_export(
        &self,
        request: Request<pb::WatchExportRequest>,
    ) -> Result<GrpcStream<pb::ExportStatus>, Status> {
        let org = org_of(&request)?;
        let token = request.into_inner().token;
        require(&token, "token")?;
        // NOT_FOUND before the stream starts
        metrics::counter!("baton_watch_reads_total", "watch" => "export").increment(1);
        let first = self.store.export(&org, &token).await.map_err(Error::from)?;
        let store = self.store.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        // The store announces each commit that changes the export (a part planned or produced,
        // by a scheduler and workers in this process or, on PostgreSQL, any; its end); the
        // fallback finds the others. Made after the first read, so the loop reads once more
        // before it waits.
        let mut progress = store.progress_watch(Topic::Export(&first.id));
        tokio::spawn(async move {
            let mut last = export_to_pb(&first);
            if tx.send(Ok(last.clone())).await.is_err() || first.state.is_final() {
                return;
            }
            let mut woken = true;
            loop {
                if !woken {
                    tokio::select! {
                        _ = tx.closed() => return,
                        _ = progress.wait() => {}
                    }
                }
                woken = false;
                metrics::counter!("baton_watch_reads_total", "watch" => "export").increment(1);
                let export = match store.export(&org, &token).await {
                    Ok(export) => export,
                    Err(e) => {
                        let _ = tx.send(Err(Error::from(e).into())).await;
                        return;
                    }
                };
                let status = export_to_pb(&export);
                if status != last {
                    if tx.send(Ok(status.clone())).await.is_err() {
                        return;
                    }
                    last = status;
                }
                if export.state.is_final() {
                    return;
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    pub(crate) async fn serve_fetch_part(
        &self,
        request: Request<pb::FetchPartRequest>,
    ) -> Result<GrpcStream<pb::ExportRows>, Status> {
        let org = org_of(&request)?;
        let request = request.into_inner();
        require(&request.token, "token")?;
        let rows = self.part_when_produced(&org, &request.token, request.part).await?;
        Ok(stream_part(rows))
    }

    /// Part `part` (counted from 0) of the export of `token`, waited for while it is being
    /// produced: woken by the commits of the export's progress (the watch is made at the first
    /// wait, then the part read again before waiting); the client's deadline bounds the wait.
    async fn part_when_produced(&self, org: &str, token: &str, part: u32) -> Result<exports::PartRows, Status> {
        // the API counts parts from 0, the store from 1 (its part numbers are internal)
        let number = part.saturating_add(1);
        let mut progress: Option<baton_store::changes::ProgressWatch> = None;
        loop {
            match self.store.read_part(&self.blobs, org, token, number).await.map_err(Error::from)? {
                PartRead::Rows(rows) => return Ok(rows),
                PartRead::NotReady => match progress.as_mut() {
                    Some(progress) => {
                        progress.wait().await;
                    }
                    None => {
                        let export = self.store.export(org, token).await.map_err(Error::from)?;
                        progress = Some(self.store.progress_watch(Topic::Export(&export.id)));
                    }
                },
                PartRead::OutOfRange(total) => {
                    return Err(Status::out_of_range(format!(
                        "part {part} does not exist: the export has {total} part(s)"
                    )));
                }
                PartRead::Never(state) => {
                    return Err(status::with_reason(
                        Code::FailedPrecondition,
                        status::PART_NOT_PRODUCED,
                        format!("part {part} was not produced: the export is {}", state.as_str().to_lowercase()),
                    ));
                }
            }
        }
    }
}

/// A part's rows as a stream of frames, each encoded as the client reads it, straight from the
/// part's lines: a part is held as its decompressed text, never as decoded rows.
fn stream_part(rows: exports::PartRows) -> GrpcStream<pb::ExportRows> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        let schema = &rows.schema;
        let mut lines = rows.lines();
        let (mut scratch, mut sent) = (Vec::new(), 0u64);
        loop {
            let (mut frame, mut count) = (Vec::with_capacity(FRAME_BYTES), 0);
            let mut failed = None;
            while count < FRAME_ROWS && frame.len() < FRAME_BYTES {
                let Some(line) = lines.next() else { break };
                if let Err(e) = part_rows::encode_line(line, schema, &mut scratch, &mut frame) {
                    failed = Some(baton_store::Error::Corrupt(format!("part {}: {e}", rows.number())));
                    break;
                }
                count += 1;
            }
            if count > 0 {
                sent += count as u64;
                let rows =
                    pb::ExportRows { encoded: frame.into(), schema_version: schema.version, ..Default::default() };
                if tx.send(Ok(rows)).await.is_err() {
                    break;
                }
            }
            if let Some(e) = failed {
                let _ = tx.send(Err(Status::from(Error::from(e)))).await;
                break;
            }
            if count == 0 {
                break;
            }
        }
        metrics::counter!("baton_export_rows_fetched_total").increment(sent);
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
