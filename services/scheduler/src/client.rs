//! The client side of batches: submitting records as a batch, turning a real-time request
//! rejected with `RESUBMIT_AS_BATCH` into one, and awaiting a batch's or export's completion on a
//! manager client session.

use baton_api::completion::{AWAIT_COMPLETION, COMPLETION_NOTICE};
use baton_manager_client::{ClientResponse, ClientSession};
use baton_mesh::proto::v1 as pb;
use baton_mesh::proto::{from_any, to_any};
use baton_mesh::status::RESUBMIT_AS_BATCH;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// Records per SubmitBatch frame: well under the default 4 MiB message limit for records of a
/// few hundred bytes.
pub const RECORDS_PER_FRAME: usize = 1_000;

/// Whether `status` rejects a real-time request with "resubmit as batch".
pub fn is_resubmit_as_batch(status: &Status) -> bool {
    status.code() == Code::ResourceExhausted
        && status.get_details_error_info().is_some_and(|info| info.reason == RESUBMIT_AS_BATCH)
}

fn authed<T>(message: T, api_key: &str) -> Result<tonic::Request<T>, Status> {
    let mut request = tonic::Request::new(message);
    let value: MetadataValue<_> =
        format!("Bearer {api_key}").parse().map_err(|_| Status::invalid_argument("the API key is not header text"))?;
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

/// Submits `records` as a batch described by `header`, in frames of [`RECORDS_PER_FRAME`];
/// `progress` is called with the records handed to the transport so far.
pub async fn submit_batch(
    channel: Channel,
    api_key: &str,
    header: pb::BatchHeader,
    records: Vec<pb::RecordFields>,
    mut progress: impl FnMut(usize) + Send + 'static,
) -> Result<pb::SubmitBatchResponse, Status> {
    let mut client = pb::scheduler_client::SchedulerClient::new(channel)
        .max_encoding_message_size(64 * 1024 * 1024)
        .max_decoding_message_size(64 * 1024 * 1024);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let header = pb::SubmitBatchRequest { frame: Some(pb::submit_batch_request::Frame::Header(header)) };
        if tx.send(header).await.is_err() {
            return;
        }
        let mut sent = 0;
        let mut records = records.into_iter().peekable();
        while records.peek().is_some() {
            let frame: Vec<_> = records.by_ref().take(RECORDS_PER_FRAME).collect();
            sent += frame.len();
            let frame = pb::BatchRecords { records: frame };
            let frame = pb::SubmitBatchRequest { frame: Some(pb::submit_batch_request::Frame::Records(frame)) };
            if tx.send(frame).await.is_err() {
                return;
            }
            progress(sent);
        }
    });
    let response = client.submit_batch(authed(tokio_stream::wrappers::ReceiverStream::new(rx), api_key)?).await?;
    Ok(response.into_inner())
}

/// What [`upsert_or_batch`] did.
#[derive(Debug, Clone)]
pub enum Upserted {
    /// The real-time upsert committed.
    RealTime(pb::UpsertResponse),
    /// It was rejected with "resubmit as batch" and resubmitted: the batch.
    Batch(pb::SubmitBatchResponse),
}

/// Upserts in real time; when the intake answers "resubmit as batch", submits the same records
/// as an upsert batch (with `request_id`, so that retrying this call does not stage twice).
pub async fn upsert_or_batch(
    channel: Channel,
    api_key: &str,
    object: &str,
    records: Vec<pb::RecordFields>,
    request_id: &str,
) -> Result<Upserted, Status> {
    let mut intake = pb::intake_client::IntakeClient::new(channel.clone())
        .max_encoding_message_size(64 * 1024 * 1024)
        .max_decoding_message_size(64 * 1024 * 1024);
    let request = pb::UpsertRequest { object: object.to_owned(), records };
    match intake.upsert(authed(request.clone(), api_key)?).await {
        Ok(response) => Ok(Upserted::RealTime(response.into_inner())),
        Err(status) if is_resubmit_as_batch(&status) => {
            tracing::info!(reason = %status.message(), "rejected in real time; resubmitting as a batch");
            let header = pb::BatchHeader {
                object: object.to_owned(),
                operation: pb::BatchOperation::Upsert as i32,
                request_id: request_id.to_owned(),
                ..Default::default()
            };
            Ok(Upserted::Batch(submit_batch(channel, api_key, header, request.records, |_| {}).await?))
        }
        Err(status) => Err(status),
    }
}

/// Asks, on `session` (a client session opened in the pool
/// [`POOL`](baton_api::completion::POOL)), to be told when `subject` of org `org_id` has
/// finished. Answers the request's number once the manager has journaled it; the notice comes
/// later as the response to that number (read it with [`completion_notice`]), even if this
/// process goes away and resumes the session meanwhile.
pub async fn await_completion(
    session: &ClientSession,
    org_id: &str,
    subject: pb::await_completion_request::Subject,
) -> Result<u64, Status> {
    let request = pb::AwaitCompletionRequest { org_id: org_id.to_owned(), subject: Some(subject) };
    session.send(to_any(AWAIT_COMPLETION, &request), Vec::new()).await
}

/// The completion notice a response carries: the finished batch or export, or (as a status)
/// why none will come.
pub fn completion_notice(response: &ClientResponse) -> Result<pb::completion_notice::Result, Status> {
    let payload = response.payload.as_ref().ok_or_else(|| Status::internal("a completion response without payload"))?;
    let notice: pb::CompletionNotice = from_any(COMPLETION_NOTICE, payload).map_err(Status::internal)?;
    match notice.result {
        Some(pb::completion_notice::Result::Error(e)) => Err(Status::with_details(
            Code::from_i32(e.code),
            e.message.clone(),
            prost::Message::encode_to_vec(&e).into(),
        )),
        Some(result) => Ok(result),
        None => Err(Status::internal("an empty completion notice")),
    }
}
