//! WatchBatch and WatchExport are woken by the store on commit, on `baton dev` in-process (the
//! binary's library), SQLite and PostgreSQL: with the fallback poll (`--watch-poll`) far out of reach, a watch still sees each
//! chunk outcome within 100 ms of its commit (the streams polled every 250 ms and 100 ms before),
//! whether the worker runs in `baton dev` or, on PostgreSQL, in a process of its own (then
//! LISTEN/NOTIFY carries the commit); and an idle watch reads nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use baton_mesh::proto::v1 as pb;
use baton_scheduler::client::submit_batch;
use baton_store::Backend;
use baton_tests::{Server, TestOrg, authed, backends, create_org, record, worker};
use tokio::time::Instant;

/// The fallback of every watch here: a watch that depended on it would not end in time.
const OUT_OF_REACH: &str = "10m";

/// The latest a watch may show a commit.
const PROMPTLY: Duration = Duration::from_millis(100);

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn ms_of(t: Option<&prost_types::Timestamp>) -> i64 {
    t.map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

fn accounts(prefix: &str, n: usize) -> Vec<pb::RecordFields> {
    (0..n)
        .map(|i| record(serde_json::json!({"code": format!("{prefix}{i:05}"), "name": format!("n{i}"), "amount": i})))
        .collect()
}

/// Submits `n` accounts in chunks of `chunk_size`, released by `policy`; the batch id.
async fn submit(server: &Server, org: &TestOrg, n: usize, chunk_size: u32, policy: pb::ReleasePolicy) -> String {
    let header = pb::BatchHeader {
        object: "account".into(),
        operation: pb::BatchOperation::Upsert as i32,
        chunk_size,
        policy: Some(policy),
        ..Default::default()
    };
    let prefix = format!("{:x}-", now_ms());
    submit_batch(server.channel().await, &org.key, header, accounts(&prefix, n), |_| {}).await.unwrap().batch_id
}

fn timestamp_in(d: Duration) -> prost_types::Timestamp {
    let at = now_ms() + d.as_millis() as i64;
    prost_types::Timestamp { seconds: at / 1000, nanos: ((at % 1000) * 1_000_000) as i32 }
}

async fn watch_batch(server: &Server, org: &TestOrg, id: &str) -> tonic::Streaming<pb::BatchEvent> {
    let mut client = pb::scheduler_client::SchedulerClient::new(server.channel().await);
    let request = authed(pb::WatchBatchRequest { batch_id: id.into() }, &org.key);
    client.watch_batch(request).await.unwrap().into_inner()
}

async fn watch_export(server: &Server, org: &TestOrg, token: &str) -> tonic::Streaming<pb::ExportStatus> {
    let request = authed(pb::WatchExportRequest { token: token.into() }, &org.key);
    server.intake().await.watch_export(request).await.unwrap().into_inner()
}

/// The reads of batches and exports by their watches, summed (`baton_watch_reads_total`).
fn watch_reads(server: &Server) -> f64 {
    server
        .metrics_text()
        .lines()
        .filter(|l| l.starts_with("baton_watch_reads_total"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Each chunk of a batch run one at a time shows on WatchBatch within [`PROMPTLY`] of the commit
/// of its outcome (its finish time), though the watch's fallback is out of reach: with the
/// workers of `baton dev`, on both backends, and on PostgreSQL with a worker in another process.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_batch_shows_each_chunk_outcome_promptly_with_its_fallback_out_of_reach() {
    let mut runs: Vec<(Backend, bool)> = backends().into_iter().map(|b| (b, false)).collect();
    if backends().contains(&Backend::Postgres) {
        runs.push((Backend::Postgres, true));
    }
    for (backend, worker_process) in runs {
        let label = format!("{backend:?}, {}", if worker_process { "a worker process" } else { "baton dev's workers" });
        eprintln!("-- {label}");
        let workers = if worker_process { "0" } else { "2" };
        let server = Server::in_process(backend, &["--watch-poll", OUT_OF_REACH, "--workers", workers]).await;
        let _worker = worker_process.then(|| worker(&server, "w1", &[]));
        let org = create_org(&server, "acme").await;
        // one chunk at a time, one every 200 ms, from 1.5 s on: the watch is there before any
        let policy = pb::ReleasePolicy {
            not_before_time: Some(timestamp_in(Duration::from_millis(1500))),
            max_parallel_chunks: 1,
            records_per_second: 2500,
        };
        let chunks = 6u32;
        let id = submit(&server, &org, 500 * chunks as usize, 500, policy).await;
        let mut stream = watch_batch(&server, &org, &id).await;
        let mut outcomes: BTreeMap<u32, (pb::ChunkState, Duration)> = BTreeMap::new();
        let mut last = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let event = match tokio::time::timeout_at(deadline, stream.message()).await {
                Err(_) => panic!("{label}: batch not done within 60 s (outcomes seen: {outcomes:?})"),
                Ok(event) => event.unwrap(),
            };
            let Some(event) = event else { break };
            let received = now_ms();
            for chunk in event.chunks {
                let state = chunk.state();
                let finished = ms_of(chunk.finish_time.as_ref());
                if finished > 0 {
                    let late = Duration::from_millis((received - finished).max(0) as u64);
                    assert!(
                        outcomes.insert(chunk.index, (state, late)).is_none(),
                        "{label}: chunk {} shown with its outcome twice",
                        chunk.index
                    );
                }
            }
            last = event.batch;
        }
        let totals = last.expect("an event").totals.unwrap();
        assert_eq!((totals.committed, totals.records_committed), (chunks, 500 * u64::from(chunks)), "{label}");
        eprintln!("{label}: outcome shown after {:?}", outcomes.values().map(|o| o.1).collect::<Vec<_>>());
        assert_eq!(outcomes.len(), chunks as usize, "{label}: every chunk's outcome shown: {outcomes:?}");
        for (index, (state, late)) in &outcomes {
            assert_eq!(*state, pb::ChunkState::Committed, "{label}: chunk {index}");
            assert!(*late <= PROMPTLY, "{label}: chunk {index} shown {late:?} after its commit");
        }
    }
}

/// With the fallback out of reach and nothing happening (a batch not yet due, an export whose
/// parts no worker takes), a WatchBatch and a WatchExport read nothing for 3 s. Then a worker
/// process produces the export (PostgreSQL: NOTIFY wakes the watch; on SQLite another process's
/// commits are not announced, so the export is cancelled through the API instead) and the batch
/// is cancelled: both streams end within [`PROMPTLY`] of the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_watches_read_nothing_and_end_promptly() {
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        let server = Server::in_process(backend, &["--watch-poll", OUT_OF_REACH, "--workers", "0"]).await;
        let org = create_org(&server, "acme").await;
        let mut intake = server.intake().await;
        for n in 0..2 {
            let request = pb::UpsertRequest { object: "account".into(), records: accounts(&format!("e{n}-"), 150) };
            intake.upsert(authed(request, &org.key)).await.unwrap();
        }
        let policy =
            pb::ReleasePolicy { not_before_time: Some(timestamp_in(Duration::from_secs(3600))), ..Default::default() };
        let batch = submit(&server, &org, 20, 10, policy).await;
        let request =
            pb::ExportRequest { object: "account".into(), sync_rows: 100, part_rows: 100, ..Default::default() };
        let export = intake.export(authed(request, &org.key)).await.unwrap().into_inner();
        assert!(!export.complete, "an asynchronous export");
        let mut batches = watch_batch(&server, &org, &batch).await;
        let mut exports = watch_export(&server, &org, &export.token).await;
        let first = batches.message().await.unwrap().expect("the batch's first event");
        assert_eq!(first.batch.unwrap().state(), pb::BatchState::Running);
        // the export's parts are planned (and released to a worker pool that has no worker)
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = tokio::time::timeout_at(deadline, exports.message()).await.unwrap().unwrap().unwrap();
            if status.total_known {
                assert_eq!((status.parts_total, status.parts_ready), (2, 0), "{status:?}");
                break;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = watch_reads(&server);
        assert!(before > 0.0, "{backend:?}: the watches' reads are counted");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle = watch_reads(&server) - before;
        assert_eq!(idle, 0.0, "{backend:?}: the watches read {idle} times in 3 s of idleness");

        let _worker;
        if backend == Backend::Postgres {
            // its parts in the server's blob directory, as a deployment shares one
            let blobs = server.data_dir().join("blobs");
            _worker = worker(&server, "w1", &["--blobs", blobs.to_str().unwrap()]);
        } else {
            let request = pb::CancelExportRequest { token: export.token.clone() };
            intake.cancel_export(authed(request, &org.key)).await.unwrap();
        }
        let mut last = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Some(status) = tokio::time::timeout_at(deadline, exports.message()).await.unwrap().unwrap() {
            last = Some((status, now_ms()));
        }
        let (status, received) = last.expect("a status after the wait");
        let expected =
            if backend == Backend::Postgres { pb::ExportState::Complete } else { pb::ExportState::Cancelled };
        assert_eq!(status.state(), expected, "{status:?}");
        let late = Duration::from_millis((received - ms_of(status.finish_time.as_ref())).max(0) as u64);
        eprintln!("{backend:?}: the export's end shown after {late:?}");
        assert!(late <= PROMPTLY, "{backend:?}: the export's end shown {late:?} after its commit");

        let mut client = pb::scheduler_client::SchedulerClient::new(server.channel().await);
        client.cancel_batch(authed(pb::CancelBatchRequest { batch_id: batch.clone() }, &org.key)).await.unwrap();
        let cancelled = Instant::now();
        let mut last = None;
        while let Some(event) = tokio::time::timeout(Duration::from_secs(10), batches.message()).await.unwrap().unwrap()
        {
            last = event.batch;
        }
        let late = cancelled.elapsed();
        assert_eq!(last.expect("an event after the cancel").state(), pb::BatchState::Cancelled);
        eprintln!("{backend:?}: the batch's cancel shown after {late:?}");
        assert!(late <= PROMPTLY, "{backend:?}: the batch's cancel shown {late:?} after CancelBatch was sent");
    }
}
