//! The client side of batches: submitting records as a batch, and turning a real-time request
//! rejected with `RESUBMIT_AS_BATCH` into one.

use baton_mesh::proto::v1 as pb;
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
