//! Traces across the mesh, on the real binary: every process exports its spans over OTLP to a
//! collector (here a tonic server for the collector's trace service, in the test), and the W3C
//! trace context goes with the work on every hop, so that one batch, one export or one link
//! delivery is one trace whatever processes it crossed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_mesh::proto::v1 as pb;
use baton_tests::{
    ADMIN_TOKEN, Server, TempDir, TestOrg, authed, create_org, eventually, record, scheduler_process_with_env,
    worker_process_with_env,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// A span as the collector received it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    trace_id: String,
    span_id: String,
    parent_id: String,
    name: String,
}

/// The collector: keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(Received {
                    service: service.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_id: hex(&span.parent_span_id),
                    name: span.name,
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Collector {
    /// Serves the trace service on a port of its own; its `http://` endpoint.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        format!("http://{addr}")
    }

    /// The spans of trace `trace_id` received so far.
    fn trace(&self, trace_id: &str) -> Vec<Received> {
        self.spans.lock().unwrap().iter().filter(|s| s.trace_id == trace_id).cloned().collect()
    }

    /// Waits (at most a minute) until trace `trace_id` holds a span named each of `names` (span
    /// name and service), and answers the whole trace.
    async fn wait_for(&self, trace_id: &str, names: &[(&str, &str)]) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let trace = self.trace(trace_id);
            let have: BTreeSet<(&str, &str)> = trace.iter().map(|s| (s.name.as_str(), s.service.as_str())).collect();
            if names.iter().all(|n| have.contains(n)) {
                return trace;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("no spans {names:?} in trace {trace_id} after a minute; received:\n{}", self.summary());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What was received, a line per service and span name, with its count and trace ids.
    fn summary(&self) -> String {
        let mut seen: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
        for s in self.spans.lock().unwrap().iter() {
            seen.entry((s.service.clone(), s.name.clone())).or_default().insert(s.trace_id.clone());
        }
        seen.iter().map(|((service, name), traces)| format!("  {service} {name:?} in {traces:?}\n")).collect()
    }
}

/// Every span of `trace` but its root has its parent in the trace, or is the root's child: one
/// tree, not pieces that happen to share an id.
fn assert_one_tree(trace: &[Received], root_parent: &str) {
    let ids: BTreeSet<&str> = trace.iter().map(|s| s.span_id.as_str()).collect();
    for span in trace {
        assert!(
            ids.contains(span.parent_id.as_str()) || span.parent_id == root_parent,
            "span {:?} of {} has a parent outside the trace: {trace:#?}",
            span.name,
            span.service
        );
    }
}

/// A trace context a caller would send: a fresh trace id and its own span id.
fn caller_context() -> (String, String, String) {
    let trace_id = hex(&rand::random::<[u8; 16]>());
    let span_id = hex(&rand::random::<[u8; 8]>());
    let traceparent = format!("00-{trace_id}-{span_id}-01");
    (trace_id, span_id, traceparent)
}

fn traced<T>(message: T, key: &str, traceparent: &str) -> tonic::Request<T> {
    let mut request = authed(message, key);
    request.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
    request
}

/// Submits `n` accounts as a batch in chunks of 10, with `traceparent` on the call.
async fn submit(scheduler: &Server, org: &TestOrg, n: usize, traceparent: &str) -> String {
    let header = pb::BatchHeader {
        object: "account".into(),
        operation: pb::BatchOperation::Upsert as i32,
        chunk_size: 10,
        ..Default::default()
    };
    let records: Vec<_> = (0..n)
        .map(|i| record(serde_json::json!({"code": format!("a{i:04}"), "name": format!("n{i}"), "amount": i})))
        .collect();
    let frames = vec![
        pb::SubmitBatchRequest { frame: Some(pb::submit_batch_request::Frame::Header(header)) },
        pb::SubmitBatchRequest { frame: Some(pb::submit_batch_request::Frame::Records(pb::BatchRecords { records })) },
    ];
    let mut client = pb::scheduler_client::SchedulerClient::new(scheduler.channel().await);
    let request = traced(tokio_stream::iter(frames), &org.key, traceparent);
    let submitted = client.submit_batch(request).await.unwrap().into_inner();
    let id = submitted.batch_id.clone();
    eventually(Duration::from_secs(60), "the batch committed", || {
        let (mut client, id, key) = (client.clone(), id.clone(), org.key.clone());
        async move {
            let batch = client.get_batch(authed(pb::GetBatchRequest { batch_id: id }, &key)).await.unwrap();
            let totals = batch.into_inner().totals.unwrap();
            assert_eq!(totals.aborted, 0, "{totals:?}");
            (totals.records_committed == n as u64).then_some(())
        }
    })
    .await;
    submitted.batch_id
}

/// A manager, an intake, a scheduler and a worker, each its own process exporting to the test's
/// collector: a batch submitted with a caller's trace context is one trace from the scheduler's
/// SubmitBatch through the release of each chunk, the manager's relay and the worker's run and
/// store transaction; an export is one trace from the intake's Export through the scheduler,
/// the manager and the worker producing its parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_and_an_export_are_each_one_trace_across_the_processes() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    // spans leave each process every 100 ms rather than every 5 s
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let data = TempDir::new();
    let url = format!("sqlite://{}/baton.db", data.path().display());
    let blobs = data.path().join("blobs");
    let blobs = blobs.to_str().unwrap();
    let journal = data.path().join("journal");
    let manager = Server::spawn_raw_with_env(
        &["manager", "serve", "--listen", "127.0.0.1:0", "--journal-dir", journal.to_str().unwrap()],
        &env,
    );
    let managers = format!("http://{}", manager.addr);
    let intake = Server::spawn_raw_with_env(
        &["intake", "--listen", "127.0.0.1:0", "--store", &url, "--admin-token", ADMIN_TOKEN, "--blobs", blobs],
        &env,
    );
    let scheduler = scheduler_process_with_env(&url, &managers, &["--blobs", blobs], &env);
    let _worker = worker_process_with_env(&url, &managers, "w1", &["--blobs", blobs], &env);
    let org = create_org(&intake, "acme").await;

    // a batch of 3 chunks
    let (trace_id, caller, traceparent) = caller_context();
    submit(&scheduler, &org, 30, &traceparent).await;
    let trace = collector
        .wait_for(
            &trace_id,
            &[
                ("baton.v1.Scheduler/SubmitBatch", "baton-scheduler"),
                ("release chunk", "baton-scheduler"),
                ("manager relay", "baton-manager"),
                ("run chunk", "baton-worker"),
                ("store transaction", "baton-worker"),
            ],
        )
        .await;
    assert_one_tree(&trace, &caller);
    let count = |name: &str| trace.iter().filter(|s| s.name == name).count();
    assert_eq!((count("release chunk"), count("run chunk")), (3, 3), "one release and one run a chunk: {trace:#?}");
    let services: BTreeSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(services, BTreeSet::from(["baton-manager", "baton-scheduler", "baton-worker"]));
    // the submit's span is the caller's child; the releases are the submit's
    let by_id: BTreeMap<&str, &Received> = trace.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let parent_name = |s: &Received| by_id.get(s.parent_id.as_str()).map(|p| p.name.clone()).unwrap_or_default();
    for span in &trace {
        let expected = match span.name.as_str() {
            "baton.v1.Scheduler/SubmitBatch" => continue,
            "release chunk" => "baton.v1.Scheduler/SubmitBatch",
            "manager relay" | "run chunk" => "release chunk",
            "store transaction" => "run chunk",
            _ => continue,
        };
        assert_eq!(parent_name(span), expected, "the parent of {span:?}");
    }
    let submit = trace.iter().find(|s| s.name == "baton.v1.Scheduler/SubmitBatch").unwrap();
    assert_eq!(submit.parent_id, caller, "the submit continues the caller's trace");

    // an export of 30 rows: 5 at once, the rest in parts of 10
    let (trace_id, caller, traceparent) = caller_context();
    let request = pb::ExportRequest { object: "account".into(), sync_rows: 5, part_rows: 10, ..Default::default() };
    let export = intake.intake().await.export(traced(request, &org.key, &traceparent)).await.unwrap().into_inner();
    assert!(!export.token.is_empty(), "the export finished at once: {export:?}");
    let trace = collector
        .wait_for(
            &trace_id,
            &[
                ("baton.v1.Intake/Export", "baton-intake"),
                ("release part", "baton-scheduler"),
                ("manager relay", "baton-manager"),
                ("produce part", "baton-worker"),
                ("store produce part", "baton-worker"),
            ],
        )
        .await;
    assert_one_tree(&trace, &caller);
    let services: BTreeSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(services, BTreeSet::from(["baton-intake", "baton-manager", "baton-scheduler", "baton-worker"]));
}

/// A link's delivery and the target's handling of it are one trace across the two servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_link_delivery_and_its_application_on_the_target_are_one_trace() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let env = |service| {
        [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_SERVICE_NAME", service),
        ]
    };
    let source = Server::start_with_env(baton_store::Backend::Sqlite, &[], &env("source")).await;
    let target = Server::start_with_env(baton_store::Backend::Sqlite, &[], &env("target")).await;
    let a = create_org(&source, "a").await;
    let b = create_org(&target, "b").await;
    let upsert = pb::UpsertRequest {
        object: "account".into(),
        records: vec![record(serde_json::json!({"code": "r1", "name": "one", "amount": 1}))],
    };
    source.intake().await.upsert(authed(upsert, &a.key)).await.unwrap();
    let link = pb::CreateLinkRequest {
        target_endpoint: format!("http://{}", target.addr),
        target_api_key: b.key.clone(),
        verify_threshold: 1,
        probe_interval: Some(baton_mesh::proto::duration(200)),
        ..Default::default()
    };
    source.sync().await.create_link(authed(link, &a.key)).await.unwrap();
    let trace = eventually(Duration::from_secs(60), "a link delivery applied on the target", || async {
        let spans = collector.spans.lock().unwrap().clone();
        spans
            .iter()
            .filter(|s| s.service == "source" && s.name == "link delivery")
            .map(|delivery| collector.trace(&delivery.trace_id))
            .find(|trace| trace.iter().any(|s| s.service == "target" && s.name == "baton.v1.Intake/ApplyChanges"))
    })
    .await;
    let delivery = trace.iter().find(|s| s.name == "link delivery").unwrap();
    let applied = trace.iter().find(|s| s.name == "baton.v1.Intake/ApplyChanges").unwrap();
    assert_eq!(applied.parent_id, delivery.span_id, "the target's span is the delivery's child: {trace:#?}");
}
