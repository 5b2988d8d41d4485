//! The error contract, on `baton dev` in-process (the binary's library, real gRPC): every NOT_FOUND, FAILED_PRECONDITION and
//! RESOURCE_EXHAUSTED of every service carries a `google.rpc.ErrorInfo` (domain `baton.dev`) with
//! a stable reason, and a request message over the size limit gets the one answer
//! (RESOURCE_EXHAUSTED `MESSAGE_TOO_LARGE`, with the limit and the observed size) at any size, on
//! every service, unary or streaming.

use baton_mesh::proto::v1 as pb;
use baton_store::Backend;
use baton_tests::{ADMIN_TOKEN, Server, authed, create_org, record};
use serde_json::json;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// The status's code and ErrorInfo reason; fails when the ErrorInfo is missing or not baton's.
fn reason_of(status: &Status) -> (Code, String) {
    let info = status.get_details_error_info().unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "baton.dev", "{status:?}");
    (status.code(), info.reason)
}

/// Asserts `status` is RESOURCE_EXHAUSTED `MESSAGE_TOO_LARGE` with `limit` and an observed size
/// over it; the observed size.
fn assert_too_large(status: &Status, limit: u64, what: &str) -> u64 {
    assert_eq!(reason_of(status), (Code::ResourceExhausted, "MESSAGE_TOO_LARGE".to_owned()), "{what}: {status:?}");
    let info = status.get_details_error_info().unwrap();
    assert_eq!(info.metadata["limit"], limit.to_string(), "{what}");
    assert_eq!(info.metadata["limit_name"], "max_message_bytes", "{what}");
    let observed: u64 = info.metadata["observed"].parse().unwrap();
    assert!(observed > limit, "{what}: observed {observed}");
    observed
}

/// Records of about `bytes` bytes in all.
fn big_records(bytes: usize) -> Vec<pb::RecordFields> {
    let each = 256 * 1024;
    (0..bytes.div_ceil(each)).map(|i| record(json!({"code": format!("big{i}"), "name": "x".repeat(each)}))).collect()
}

/// A message over the limit gets RESOURCE_EXHAUSTED MESSAGE_TOO_LARGE at every size (between the
/// limit and four times it, where the intake used to answer INVALID_ARGUMENT, and above, where
/// the transport answered OUT_OF_RANGE with its own text), on every service, including a frame of
/// a client stream (SubmitBatch) and of a bidirectional one (a manager session).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_over_the_size_limit_is_resource_exhausted_everywhere() {
    const LIMIT: u64 = 4 * 1024 * 1024; // the default --max-message-bytes
    let server = Server::in_process(Backend::Sqlite, &[]).await;
    let org = create_org(&server, "acme").await;
    let mut intake = server.intake().await;

    // Upsert: 5 MiB (between the limit and the old 16 MiB transport cap) and 17 MiB (above it)
    for mib in [5usize, 17] {
        let request = pb::UpsertRequest { object: "account".into(), records: big_records(mib << 20) };
        let status = intake.upsert(authed(request, &org.key)).await.unwrap_err();
        let observed = assert_too_large(&status, LIMIT, &format!("upsert of {mib} MiB"));
        assert!(observed >= (mib as u64) << 20, "{observed}");
        assert!(status.message().contains(&format!("over the {LIMIT}-byte limit")), "{}", status.message());
    }
    // a Query and an ApplyChanges too, and a message just under the limit is served
    let request = pb::QueryRequest { object: "account".into(), filter: "x".repeat(5 << 20), ..Default::default() };
    assert_too_large(&intake.query(authed(request, &org.key)).await.unwrap_err(), LIMIT, "query");
    let request = pb::UpsertRequest { object: "account".into(), records: big_records(3 << 20) };
    intake.upsert(authed(request, &org.key)).await.unwrap();

    // SubmitBatch: a records frame over the limit, after a good header
    let mut scheduler = pb::scheduler_client::SchedulerClient::new(server.channel().await);
    let header = pb::BatchHeader {
        object: "account".into(),
        operation: pb::BatchOperation::Upsert as i32,
        ..Default::default()
    };
    let frames = vec![
        pb::SubmitBatchRequest { frame: Some(pb::submit_batch_request::Frame::Header(header)) },
        pb::SubmitBatchRequest {
            frame: Some(pb::submit_batch_request::Frame::Records(pb::BatchRecords { records: big_records(5 << 20) })),
        },
    ];
    let status = scheduler.submit_batch(authed(tokio_stream::iter(frames), &org.key)).await.unwrap_err();
    assert_too_large(&status, LIMIT, "a SubmitBatch frame");

    // Admin and Sync
    let mut admin = server.admin().await;
    let request = pb::CreateOrgRequest { name: "x".repeat(5 << 20) };
    assert_too_large(&admin.create_org(authed(request, ADMIN_TOKEN)).await.unwrap_err(), LIMIT, "admin");
    let mut sync = server.sync().await;
    let request = pb::CreateLinkRequest { target_api_key: "x".repeat(5 << 20), ..Default::default() };
    assert_too_large(&sync.create_link(authed(request, &org.key)).await.unwrap_err(), LIMIT, "sync");

    // a manager session: the stream ends with the answer
    let mut manager = pb::session_manager_client::SessionManagerClient::new(server.channel().await);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let open = pb::OpenSession { pool: "echo".into(), ..Default::default() };
    tx.send(pb::ClientFrame { kind: Some(pb::client_frame::Kind::Open(open)) }).await.unwrap();
    let mut events =
        manager.client_session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let opened = events.message().await.unwrap().unwrap();
    assert!(matches!(opened.kind, Some(pb::client_event::Kind::Opened(_))), "{opened:?}");
    let payload = prost_types::Any { type_url: "type.googleapis.com/x".into(), value: vec![7; 5 << 20] };
    let request = pb::ClientRequest { seq: 1, payload: Some(payload), ..Default::default() };
    tx.send(pb::ClientFrame { kind: Some(pb::client_frame::Kind::Request(request)) }).await.unwrap();
    let status = loop {
        match events.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the session stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_too_large(&status, LIMIT, "a manager session frame");
}

/// A representative error of each service, each answered with its documented reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_not_found_failed_precondition_and_resource_exhausted_has_a_reason() {
    let server = Server::in_process(Backend::Sqlite, &["--max-records", "2"]).await;
    let org = create_org(&server, "acme").await;
    let mut intake = server.intake().await;
    let mut admin = server.admin().await;
    let mut scheduler = pb::scheduler_client::SchedulerClient::new(server.channel().await);
    let mut sync = server.sync().await;
    let mut manager = pb::session_manager_client::SessionManagerClient::new(server.channel().await);
    let key = org.key.as_str();
    let records = |n: usize| -> Vec<pb::RecordFields> {
        (0..n).map(|i| record(json!({"code": format!("r{i}"), "name": "n"}))).collect()
    };

    let mut seen: Vec<(&str, Status)> = Vec::new();
    let mut push = |what, result: Result<(), Status>| seen.push((what, result.unwrap_err()));
    let request = pb::GetRequest { object: "account".into(), id: "none".into() };
    push("intake get", intake.get(authed(request, key)).await.map(drop));
    let request = pb::UpsertRequest { object: "nope".into(), records: records(1) };
    push("intake upsert", intake.upsert(authed(request, key)).await.map(drop));
    push(
        "get export",
        intake.get_export(authed(pb::GetExportRequest { token: "xt_none".into() }, key)).await.map(drop),
    );
    push(
        "cancel export",
        intake.cancel_export(authed(pb::CancelExportRequest { token: "xt_none".into() }, key)).await.map(drop),
    );
    let part = pb::FetchPartRequest { token: "xt_none".into(), part: 0 };
    push("fetch part", intake.fetch_part(authed(part, key)).await.map(drop));
    let over = pb::UpsertRequest { object: "account".into(), records: records(3) };
    push("upsert over max_records", intake.upsert(authed(over, key)).await.map(drop));
    let page = pb::QueryRequest { object: "account".into(), page_size: 3, ..Default::default() };
    push("query over max_records", intake.query(authed(page, key)).await.map(drop));
    let request = pb::CreateApiKeyRequest { org_id: "org_none".into(), label: String::new() };
    push("admin create key", admin.create_api_key(authed(request, ADMIN_TOKEN)).await.map(drop));
    let request = pb::RevokeApiKeyRequest { key_id: "key_none".into() };
    push("admin revoke key", admin.revoke_api_key(authed(request, ADMIN_TOKEN)).await.map(drop));
    let request = pb::GetBatchRequest { batch_id: "bat_none".into() };
    push("get batch", scheduler.get_batch(authed(request, key)).await.map(drop));
    let request = pb::CancelBatchRequest { batch_id: "bat_none".into() };
    push("cancel batch", scheduler.cancel_batch(authed(request, key)).await.map(drop));
    let request = pb::GetLinkRequest { link_id: "lnk_none".into() };
    push("get link", sync.get_link(authed(request, key)).await.map(drop));
    let request = pb::GetSessionRequest { session_id: "none".into() };
    push("get session", manager.get_session(request).await.map(drop));
    let open = pb::OpenSession { pool: "echo".into(), seen_term: u64::MAX / 2, ..Default::default() };
    let frames = tokio_stream::iter([pb::ClientFrame { kind: Some(pb::client_frame::Kind::Open(open)) }]);
    push("open session, newer term seen", manager.client_session(frames).await.map(drop));

    let reasons: Vec<(&str, Code, String)> = seen
        .iter()
        .map(|(what, status)| {
            let (code, reason) = reason_of(status);
            (*what, code, reason)
        })
        .collect();
    let expected = [
        ("intake get", Code::NotFound, "RECORD_NOT_FOUND"),
        ("intake upsert", Code::NotFound, "OBJECT_NOT_FOUND"),
        ("get export", Code::NotFound, "EXPORT_NOT_FOUND"),
        ("cancel export", Code::NotFound, "EXPORT_NOT_FOUND"),
        ("fetch part", Code::NotFound, "EXPORT_NOT_FOUND"),
        ("upsert over max_records", Code::ResourceExhausted, "RESUBMIT_AS_BATCH"),
        ("query over max_records", Code::ResourceExhausted, "RESUBMIT_AS_EXPORT"),
        ("admin create key", Code::NotFound, "ORG_NOT_FOUND"),
        ("admin revoke key", Code::NotFound, "API_KEY_NOT_FOUND"),
        ("get batch", Code::NotFound, "BATCH_NOT_FOUND"),
        ("cancel batch", Code::NotFound, "BATCH_NOT_FOUND"),
        ("get link", Code::NotFound, "LINK_NOT_FOUND"),
        ("get session", Code::NotFound, "SESSION_NOT_FOUND"),
        ("open session, newer term seen", Code::FailedPrecondition, "OLDER_TERM"),
    ]
    .map(|(what, code, reason)| (what, code, reason.to_owned()));
    assert_eq!(reasons, expected);
}
