//! Completions pushed to webhooks, end to end, on the real binary, SQLite and PostgreSQL: a
//! receiver in the test (an axum server on a loopback port) that fails the first two deliveries
//! gets each completion (a batch's, an export's) signed, with the same body and delivery id at
//! every attempt, and acknowledges it once; a receiver that never acknowledges is given up; a bad
//! webhook URL is refused before anything is created; a delivery carries on across a
//! scheduler killed and restarted; and a completion awaited on a manager session is answered once,
//! across the service going away and the scheduler and manager restarting.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use baton_api::completion::{AWAIT_COMPLETION, POOL};
use baton_manager_client::{ClientResponse, ClientSession, Connector};
use baton_mesh::proto::v1 as pb;
use baton_scheduler::client::{await_completion, completion_notice, submit_batch};
use baton_tests::{Server, TestOrg, authed, backends, create_org, eventually, record};
use hmac::{Hmac, Mac};
use sqlx::Row;
use tonic::Code;
use tonic_types::StatusExt;

/// The scheduler's webhook secret.
const SECRET: &str = "e2e-webhook-secret-0123456789";

/// Fast deliveries (looked for every 100 ms, retried after 200 ms doubling to 1 s), to the
/// receiver on loopback.
const FAST: [&str; 7] = [
    "--webhook-poll",
    "100ms",
    "--webhook-backoff",
    "200ms",
    "--webhook-backoff-max",
    "1s",
    "--webhook-allow-internal",
];

/// One request the receiver got, and its answer.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    delivery: String,
    event: String,
    attempt: String,
    signature: String,
    body: String,
    status: u16,
    /// When it arrived.
    at: std::time::Instant,
}

#[derive(Default)]
struct Log {
    requests: Vec<Received>,
    /// Whether `/gate` acknowledges.
    gate_open: bool,
}

/// The webhook receiver: `/flaky` fails the first two deliveries of each delivery id (503) and
/// acknowledges the rest, `/down` always fails (500), `/gate` fails (503) until opened.
struct Receiver {
    addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    task: tokio::task::JoinHandle<()>,
}

async fn receive(
    State(log): State<Arc<Mutex<Log>>>,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, String) {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let mut log = log.lock().unwrap();
    let delivery = header("baton-delivery");
    let path = uri.path().to_owned();
    let earlier = log.requests.iter().filter(|r| r.path == path && r.delivery == delivery).count();
    let (status, answer) = match path.as_str() {
        "/flaky" if earlier < 2 => (StatusCode::SERVICE_UNAVAILABLE, "try later"),
        "/flaky" => (StatusCode::OK, "ok"),
        "/gate" if log.gate_open => (StatusCode::NO_CONTENT, ""),
        "/gate" => (StatusCode::SERVICE_UNAVAILABLE, "gate closed"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "receiver down"),
    };
    log.requests.push(Received {
        path,
        delivery,
        event: header("baton-event"),
        attempt: header("baton-attempt"),
        signature: header("baton-signature"),
        body,
        status: status.as_u16(),
        at: std::time::Instant::now(),
    });
    (status, answer.to_owned())
}

impl Receiver {
    async fn start() -> Receiver {
        let log = Arc::new(Mutex::new(Log::default()));
        let app = axum::Router::new().fallback(receive).with_state(log.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver { addr, log, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The requests of delivery `id`, in order.
    fn of(&self, id: &str) -> Vec<Received> {
        self.log.lock().unwrap().requests.iter().filter(|r| r.delivery == id).cloned().collect()
    }

    fn open_gate(&self) {
        self.log.lock().unwrap().gate_open = true;
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn hmac_hex(key: &[u8], message: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(message);
    hex::encode(mac.finalize().into_bytes())
}

/// Checks a request's `Baton-Signature` as a receiver of org `org` does (README, "Completion
/// webhooks"): the org's secret is the hex HMAC-SHA256 of its id under the scheduler's secret;
/// the signature is the hex HMAC-SHA256 of "<t>.<body>" under it; `t` is recent.
fn assert_signed(r: &Received, org: &str) {
    let org_secret = hmac_hex(SECRET.as_bytes(), org.as_bytes());
    let (t, v1) = r
        .signature
        .split_once(',')
        .and_then(|(t, v1)| Some((t.strip_prefix("t=")?, v1.strip_prefix("v1=")?)))
        .unwrap_or_else(|| panic!("a Baton-Signature of the form t=…,v1=…: {r:?}"));
    assert_eq!(v1, hmac_hex(org_secret.as_bytes(), format!("{t}.{}", r.body).as_bytes()), "{r:?}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let t: i64 = t.parse().unwrap();
    assert!((now - t).abs() < 120, "a signature time of now: {t} against {now}");
    // another org's secret does not verify it
    let other = hmac_hex(SECRET.as_bytes(), b"org_other");
    assert_ne!(v1, hmac_hex(other.as_bytes(), format!("{t}.{}", r.body).as_bytes()));
}

fn hook(url: &str) -> Option<pb::CompletionTarget> {
    Some(pb::CompletionTarget { target: Some(pb::completion_target::Target::WebhookUrl(url.into())) })
}

fn accounts(range: std::ops::Range<usize>) -> Vec<pb::RecordFields> {
    range
        .map(|i| record(serde_json::json!({"code": format!("a{i:06}"), "name": format!("n{i}"), "amount": i})))
        .collect()
}

fn header(completion: Option<pb::CompletionTarget>) -> pb::BatchHeader {
    pb::BatchHeader {
        object: "account".into(),
        operation: pb::BatchOperation::Upsert as i32,
        chunk_size: 10,
        completion,
        ..Default::default()
    }
}

async fn submit(server: &Server, org: &TestOrg, url: &str, records: Vec<pb::RecordFields>) -> String {
    submit_batch(server.channel().await, &org.key, header(hook(url)), records, |_| {}).await.unwrap().batch_id
}

async fn get_batch(server: &Server, org: &TestOrg, id: &str) -> pb::Batch {
    let mut client = pb::scheduler_client::SchedulerClient::new(server.channel().await);
    client.get_batch(authed(pb::GetBatchRequest { batch_id: id.into() }, &org.key)).await.unwrap().into_inner()
}

fn state(d: &pb::CompletionDelivery) -> pb::CompletionDeliveryState {
    pb::CompletionDeliveryState::try_from(d.state).unwrap()
}

/// Waits (at most `within`) until the batch's delivery is in `want`; the delivery.
async fn batch_delivery(
    server: &Server,
    org: &TestOrg,
    id: &str,
    want: pb::CompletionDeliveryState,
    within: Duration,
) -> pb::CompletionDelivery {
    eventually(within, &format!("batch {id}'s completion {want:?}"), || async move {
        let delivery = get_batch(server, org, id).await.completion.expect("a delivery");
        (state(&delivery) == want).then_some(delivery)
    })
    .await
}

/// Rows of the store: `sql` with the org id as `$1`, counted.
async fn count(server: &Server, sql: &str, org: &str) -> i64 {
    sqlx::any::install_default_drivers();
    let pool = sqlx::any::AnyPoolOptions::new().max_connections(1).connect(&server.store_url).await.unwrap();
    let n = sqlx::query(sql).bind(org).fetch_one(&pool).await.unwrap().get::<i64, _>(0);
    pool.close().await;
    n
}

/// The requests of one delivery: three, the first two answered 503 and the third 200, each
/// signed, all with the same body and event, numbered 1 to 3; the body.
fn assert_three_attempts(requests: &[Received], org: &str, event: &str) -> serde_json::Value {
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 503, 200], "{requests:#?}");
    let attempts: Vec<&str> = requests.iter().map(|r| r.attempt.as_str()).collect();
    assert_eq!(attempts, ["1", "2", "3"]);
    for r in requests {
        assert_signed(r, org);
        assert_eq!(
            (r.event.as_str(), r.body.as_str()),
            (event, requests[0].body.as_str()),
            "the same document each time"
        );
    }
    serde_json::from_str(&requests[0].body).unwrap()
}

#[tokio::test]
async fn completions_are_pushed_signed_and_acknowledged_once_after_two_failures() {
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        let receiver = Receiver::start().await;
        let mut flags = FAST.to_vec();
        flags.extend(["--webhook-give-up", "6s"]);
        let server = Server::start_with_env(backend, &flags, &[("BATON_WEBHOOK_SECRET", SECRET)]).await;
        let org = create_org(&server, "acme").await;

        // a bad webhook URL: INVALID_ARGUMENT naming the field, and nothing created
        let mut scheduler = pb::scheduler_client::SchedulerClient::new(server.channel().await);
        let mut intake = pb::intake_client::IntakeClient::new(server.channel().await);
        for bad in ["ftp://127.0.0.1/hook", "not a url", "http://:8080/hook", "https://user:pw@example.com/"] {
            let frames = vec![
                pb::SubmitBatchRequest { frame: Some(pb::submit_batch_request::Frame::Header(header(hook(bad)))) },
                pb::SubmitBatchRequest {
                    frame: Some(pb::submit_batch_request::Frame::Records(pb::BatchRecords { records: accounts(0..3) })),
                },
            ];
            let status = scheduler.submit_batch(authed(tokio_stream::iter(frames), &org.key)).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{bad}: {status:?}");
            let violations = status.get_details_bad_request().expect("a BadRequest").field_violations;
            assert_eq!(violations.len(), 1, "{violations:?}");
            assert_eq!(violations[0].field, "header.completion.webhook_url", "{bad}");
            let request = pb::ExportRequest {
                object: "account".into(),
                sync_rows: 1,
                completion: hook(bad),
                ..Default::default()
            };
            let status = intake.export(authed(request, &org.key)).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{bad}: {status:?}");
            let violations = status.get_details_bad_request().expect("a BadRequest").field_violations;
            assert_eq!(violations.iter().map(|v| v.field.as_str()).collect::<Vec<_>>(), ["completion.webhook_url"]);
        }
        for table in ["batches", "exports", "completions"] {
            let n = count(&server, &format!("SELECT COUNT(*) FROM {table} WHERE org_id = $1"), &org.id).await;
            assert_eq!(n, 0, "nothing in {table} after refused requests");
        }

        // a batch whose receiver fails twice, and one whose receiver never acknowledges
        let flaky = submit(&server, &org, &receiver.url("/flaky"), accounts(0..50)).await;
        let down = submit(&server, &org, &receiver.url("/down"), accounts(50..53)).await;
        let delivery =
            batch_delivery(&server, &org, &flaky, pb::CompletionDeliveryState::Delivered, Duration::from_secs(60))
                .await;
        assert_eq!((delivery.attempts, delivery.acknowledgments), (3, 1), "{delivery:?}");
        assert_eq!(delivery.webhook_url, receiver.url("/flaky"));
        assert!(delivery.last_error.starts_with("HTTP 503"), "the last failure kept: {delivery:?}");
        assert!(delivery.delivered_time.is_some() && delivery.last_attempt_time.is_some(), "{delivery:?}");
        assert!(delivery.next_attempt_time.is_none(), "{delivery:?}");

        // an export that goes asynchronous, over the first batch's records
        let request = pb::ExportRequest {
            object: "account".into(),
            filter: "amount < 50".into(),
            sync_rows: 5,
            part_rows: 20,
            completion: hook(&receiver.url("/flaky")),
            ..Default::default()
        };
        let started = intake.export(authed(request, &org.key)).await.unwrap().into_inner();
        assert!(!started.complete && !started.token.is_empty(), "{started:?}");
        let export_delivery = eventually(Duration::from_secs(60), "the export's completion delivered", || {
            let (mut intake, token, key) = (intake.clone(), started.token.clone(), org.key.clone());
            async move {
                let status =
                    intake.get_export(authed(pb::GetExportRequest { token }, &key)).await.unwrap().into_inner();
                let delivery = status.completion.expect("a delivery");
                (state(&delivery) == pb::CompletionDeliveryState::Delivered).then_some((status.state, delivery))
            }
        })
        .await;
        assert_eq!(export_delivery.0, pb::ExportState::Complete as i32);
        assert_eq!((export_delivery.1.attempts, export_delivery.1.acknowledgments), (3, 1), "{export_delivery:?}");

        // the receiver that never answers 2xx: given up after 6 s
        let failed =
            batch_delivery(&server, &org, &down, pb::CompletionDeliveryState::Failed, Duration::from_secs(30)).await;
        assert!(failed.attempts >= 2, "retried: {failed:?}");
        assert_eq!(failed.acknowledgments, 0);
        assert_eq!(failed.last_error, "HTTP 500 Internal Server Error: receiver down");
        assert!(failed.delivered_time.is_none() && failed.next_attempt_time.is_none(), "{failed:?}");

        // a few polls more: nothing else is sent
        tokio::time::sleep(Duration::from_millis(800)).await;
        let body = assert_three_attempts(&receiver.of(&flaky), &org.id, "batch.completed");
        assert_eq!(body["event"], "batch.completed");
        assert_eq!(body["delivery_id"], flaky.as_str());
        assert_eq!(body["org_id"], org.id.as_str());
        let b = &body["batch"];
        assert_eq!((b["batch_id"].as_str(), b["state"].as_str()), (Some(flaky.as_str()), Some("DONE")), "{body}");
        assert_eq!((b["records"].as_u64(), b["records_committed"].as_u64()), (Some(50), Some(50)), "{body}");
        assert_eq!((b["chunks"].as_u64(), b["committed"].as_u64(), b["aborted"].as_u64()), (Some(5), Some(5), Some(0)));
        assert!(b["finish_time"].as_str().is_some_and(|t| t.ends_with('Z')), "{body}");

        let body = assert_three_attempts(&receiver.of(&started.export_id), &org.id, "export.completed");
        let e = &body["export"];
        assert_eq!(
            (e["export_id"].as_str(), e["state"].as_str()),
            (Some(started.export_id.as_str()), Some("COMPLETE"))
        );
        let rows = e["first_rows"].as_i64().unwrap() + e["rows_ready"].as_i64().unwrap();
        assert_eq!((rows, e["parts_ready"].as_u64()), (50, Some(3)), "{body}");

        let down_requests = receiver.of(&down);
        assert_eq!(down_requests.len() as u32, failed.attempts, "{down_requests:#?}");
        assert!(down_requests.iter().all(|r| r.status == 500));
        // the waits between attempts grow: 200 ms, 400 ms, 800 ms, then 1 s (the bound), so at
        // most 8 attempts start within 6 s (at 0, 0.2, 0.6, 1.4, 2.4, 3.4, 4.4 and 5.4 s)
        assert!(failed.attempts <= 8, "{failed:?}");
        let starts: Vec<_> = down_requests.iter().map(|r| r.at).collect();
        for (k, pair) in starts.windows(2).enumerate() {
            let wait = pair[1] - pair[0];
            let least = Duration::from_millis(200 << k.min(3)).min(Duration::from_secs(1));
            assert!(wait >= least - Duration::from_millis(50), "wait {k} of {wait:?}, less than {least:?}");
        }
    }
}

#[tokio::test]
async fn a_delivery_carries_on_across_a_killed_scheduler() {
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        let receiver = Receiver::start().await;
        let mut flags = FAST.to_vec();
        flags.extend(["--webhook-give-up", "5m"]);
        let server = Server::start_with_env(backend, &flags, &[("BATON_WEBHOOK_SECRET", SECRET)]).await;
        let org = create_org(&server, "acme").await;
        let id = submit(&server, &org, &receiver.url("/gate"), accounts(0..20)).await;
        let (s, o, i) = (&server, &org, id.as_str());
        let pending = eventually(Duration::from_secs(60), "two failed attempts", || async move {
            let delivery = get_batch(s, o, i).await.completion.expect("a delivery");
            (delivery.attempts >= 2).then_some(delivery)
        })
        .await;
        assert_eq!(state(&pending), pb::CompletionDeliveryState::Pending, "{pending:?}");
        assert_eq!(pending.last_error, "HTTP 503 Service Unavailable: gate closed");

        // SIGKILL, and the same process started again (same store, flags and secret)
        let server = server.restart(&[]);
        receiver.open_gate();
        let delivered =
            batch_delivery(&server, &org, &id, pb::CompletionDeliveryState::Delivered, Duration::from_secs(60)).await;
        assert_eq!(delivered.acknowledgments, 1, "{delivered:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let requests = receiver.of(&id);
        assert_eq!(requests.iter().filter(|r| r.status == 204).count(), 1, "acknowledged once: {requests:#?}");
        assert_eq!(requests.last().map(|r| r.status), Some(204), "{requests:#?}");
        // an attempt counted before the kill may never have been sent
        assert!(delivered.attempts as usize >= requests.len() && requests.len() >= 3, "{delivered:?} {requests:#?}");
        for r in &requests {
            assert_signed(r, &org.id);
            assert_eq!(r.body, requests[0].body);
        }
    }
}

/// Without `--webhook-allow-internal`, a webhook reaches public addresses only: a loopback
/// address, literal or behind a name, is refused before anything is sent, with that cause, and
/// retried (an operator may allow it, or the org fix its URL).
#[tokio::test]
async fn webhooks_do_not_reach_internal_addresses_unless_allowed() {
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        let receiver = Receiver::start().await;
        let server = Server::start_with_env(backend, &FAST[..6], &[("BATON_WEBHOOK_SECRET", SECRET)]).await;
        let org = create_org(&server, "acme").await;
        let literal = submit(&server, &org, &receiver.url("/flaky"), accounts(0..3)).await;
        let named = format!("http://localhost:{}/flaky", receiver.addr.port());
        let named = submit(&server, &org, &named, accounts(3..6)).await;
        for (id, says) in [
            (&literal, "127.0.0.1 is an internal address (--webhook-allow-internal allows it)"),
            (&named, "localhost resolves to internal addresses only"),
        ] {
            let (s, o, i) = (&server, &org, id.as_str());
            let refused = eventually(Duration::from_secs(60), "a refused attempt", || async move {
                let delivery = get_batch(s, o, i).await.completion.expect("a delivery");
                (delivery.attempts >= 2).then_some(delivery)
            })
            .await;
            assert_eq!(state(&refused), pb::CompletionDeliveryState::Pending, "{refused:?}");
            assert!(refused.last_error.contains(says), "{says}: {refused:?}");
            assert!(refused.next_attempt_time.is_some(), "retried: {refused:?}");
        }
        assert!(receiver.log.lock().unwrap().requests.is_empty(), "nothing sent");
    }
}

/// The next response on `session` within `within`.
async fn next_response(session: &mut ClientSession, within: Duration) -> ClientResponse {
    tokio::time::timeout(within, session.recv())
        .await
        .unwrap_or_else(|_| panic!("no response within {within:?}"))
        .expect("the session is open")
}

/// A completion awaited on a manager session (the pool `completions`, served by the scheduler):
/// a bad request, an unknown batch and another org's batch are answered at once with the status;
/// a batch held back by its policy is answered once it is done, even though the service went away
/// and the whole `baton dev` (manager and scheduler) was SIGKILLed and restarted meanwhile: the
/// resumed session gets the notice exactly once (and, again, only answers it had not acknowledged). A finished batch and an export are answered too.
#[tokio::test]
async fn a_completion_awaited_on_a_manager_session_survives_the_service_and_the_scheduler_going_away() {
    use pb::await_completion_request::Subject;
    use pb::completion_notice::Result as Notice;
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        let server = Server::start(backend, &["--webhook-poll", "100ms"]).await;
        let org = create_org(&server, "acme").await;
        let other = create_org(&server, "other").await;
        let endpoint = format!("http://{}", server.addr);
        let connector = Connector::new(None).unwrap();
        let mut session = ClientSession::open(&connector, &endpoint, POOL, Vec::new()).await.unwrap();

        // held back 4 s: it is not done before the restart below
        let mut held = header(None);
        held.policy = Some(pb::ReleasePolicy {
            not_before_time: baton_mesh::proto::timestamp(baton_mesh::now_ms() + 4_000),
            ..Default::default()
        });
        let batch =
            submit_batch(server.channel().await, &org.key, held, accounts(0..30), |_| {}).await.unwrap().batch_id;
        let awaited = await_completion(&session, &org.id, Subject::BatchId(batch.clone())).await.unwrap();
        let unknown = await_completion(&session, &org.id, Subject::BatchId("b_unknown".into())).await.unwrap();
        let foreign = await_completion(&session, &other.id, Subject::BatchId(batch.clone())).await.unwrap();
        let bad = pb::AwaitCompletionRequest { org_id: org.id.clone(), subject: None };
        let bad = session.send(baton_mesh::proto::to_any(AWAIT_COMPLETION, &bad), Vec::new()).await.unwrap();
        let mut refused = std::collections::BTreeMap::new();
        for _ in 0..3 {
            let response = next_response(&mut session, Duration::from_secs(10)).await;
            let status = completion_notice(&response).expect_err("refused");
            refused.insert(response.seq, (status.code(), status.message().to_owned()));
        }
        assert_eq!(refused.len(), 3, "one answer each: {refused:?}");
        assert_eq!(refused[&unknown].0, Code::NotFound, "{refused:?}");
        assert_eq!(refused[&foreign].0, Code::NotFound, "another org's batch is not found: {refused:?}");
        assert_eq!(refused[&bad], (Code::InvalidArgument, "batch_id or export_id is required".into()));
        assert!(refused[&unknown].1.contains("b_unknown"), "{refused:?}");

        // the service goes away without closing its session; baton dev is SIGKILLed and started
        // again: the request, journaled, is delivered again to the restarted scheduler
        let session_id = session.session_id().to_owned();
        drop(session);
        let server = server.restart(&[]);
        let mut session = ClientSession::resume(&connector, &endpoint, &session_id, Vec::new(), bad).await.unwrap();
        // answers handed over but not yet acknowledged when the service went away come again
        // (at least once across a client restart: a client deduplicates by request number)
        let mut answers = Vec::new();
        while !answers.iter().any(|r: &ClientResponse| r.seq == awaited) {
            answers.push(next_response(&mut session, Duration::from_secs(60)).await);
        }
        while let Ok(Some(more)) = tokio::time::timeout(Duration::from_millis(700), session.recv()).await {
            answers.push(more);
        }
        let seqs: Vec<u64> = answers.iter().map(|r| r.seq).collect();
        assert_eq!(seqs.iter().filter(|&&s| s == awaited).count(), 1, "the awaited answer once: {seqs:?}");
        assert!(seqs.iter().all(|s| *s == awaited || refused.contains_key(s)), "nothing else: {seqs:?}");
        let response = answers.into_iter().find(|r| r.seq == awaited).unwrap();
        let Notice::Batch(done) = completion_notice(&response).unwrap() else { panic!("a batch: {response:?}") };
        assert_eq!((done.batch_id.as_str(), done.state), (batch.as_str(), pb::BatchState::Done as i32), "{done:?}");
        let totals = done.totals.unwrap();
        assert_eq!((totals.chunks, totals.committed, totals.records_committed), (3, 3, 30), "{totals:?}");
        assert!(done.finish_time.is_some(), "{done:?}");

        // a finished batch is answered at once; an export once it is complete
        let again = await_completion(&session, &org.id, Subject::BatchId(batch.clone())).await.unwrap();
        let response = next_response(&mut session, Duration::from_secs(10)).await;
        assert_eq!(response.seq, again);
        assert!(matches!(completion_notice(&response), Ok(Notice::Batch(b)) if b.batch_id == batch));
        let mut intake = pb::intake_client::IntakeClient::new(server.channel().await);
        let request = pb::ExportRequest { object: "account".into(), sync_rows: 5, part_rows: 10, ..Default::default() };
        let started = intake.export(authed(request, &org.key)).await.unwrap().into_inner();
        assert!(!started.complete, "asynchronous: {started:?}");
        let export = await_completion(&session, &org.id, Subject::ExportId(started.export_id.clone())).await.unwrap();
        let response = next_response(&mut session, Duration::from_secs(60)).await;
        assert_eq!(response.seq, export);
        let Notice::Export(status) = completion_notice(&response).unwrap() else { panic!("an export: {response:?}") };
        assert_eq!(
            (status.export_id.as_str(), status.state),
            (started.export_id.as_str(), pb::ExportState::Complete as i32)
        );
        assert_eq!(status.first_rows + status.rows_ready, 30, "{status:?}");
        session.close(false).await.unwrap();
    }
}
