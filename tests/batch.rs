//! Batches end to end, on the real binary, SQLite and PostgreSQL: staged, divided into chunks,
//! released by policy, run by workers (in `baton dev`, or `baton worker` processes) through the
//! session manager; exactly once across a killed worker, killed primary managers and a killed
//! scheduler.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use baton_mesh::proto::v1 as pb;
use baton_scheduler::client::submit_batch;
use baton_store::Backend;
use baton_tests::{
    ManagerPair, Server, TempDir, TestOrg, authed, backends, create_org, eventually, intake_process, record,
    scheduler_process, scheduler_process_with_env, worker, worker_process, worker_with_env,
};
use sqlx::Row;

fn accounts(prefix: &str, range: std::ops::Range<usize>) -> Vec<pb::RecordFields> {
    range
        .map(|i| record(serde_json::json!({"code": format!("{prefix}{i:06}"), "name": format!("n{i}"), "amount": i})))
        .collect()
}

fn header(chunk_size: u32) -> pb::BatchHeader {
    pb::BatchHeader {
        object: "account".into(),
        operation: pb::BatchOperation::Upsert as i32,
        chunk_size,
        ..Default::default()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

async fn submit(
    server: &Server,
    org: &TestOrg,
    header: pb::BatchHeader,
    records: Vec<pb::RecordFields>,
) -> pb::SubmitBatchResponse {
    submit_batch(server.channel().await, &org.key, header, records, |_| {}).await.unwrap()
}

/// Follows WatchBatch until the stream ends (the batch is done), at most `within`; the last
/// batch state and every chunk status seen.
async fn watch(server: &Server, org: &TestOrg, id: &str, within: Duration) -> (pb::Batch, Vec<pb::ChunkStatus>) {
    let mut client = pb::scheduler_client::SchedulerClient::new(server.channel().await);
    let mut stream =
        client.watch_batch(authed(pb::WatchBatchRequest { batch_id: id.into() }, &org.key)).await.unwrap().into_inner();
    let (mut last, mut seen) = (None, Vec::new());
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => panic!("batch {id} not done within {within:?}: {last:?}"),
            Ok(Ok(Some(event))) => {
                seen.extend(event.chunks);
                last = event.batch;
            }
            Ok(Ok(None)) => break,
            Ok(Err(status)) => panic!("watch failed: {status:?}"),
        }
    }
    (last.expect("at least one event"), seen)
}

async fn results(server: &Server, org: &TestOrg, id: &str) -> Vec<pb::ChunkResult> {
    let mut client = pb::scheduler_client::SchedulerClient::new(server.channel().await);
    let request = pb::ListChunkResultsRequest { batch_id: id.into(), page_size: 1000, ..Default::default() };
    client.list_chunk_results(authed(request, &org.key)).await.unwrap().into_inner().results
}

fn state(c: &pb::ChunkStatus) -> pb::ChunkState {
    pb::ChunkState::try_from(c.state).unwrap()
}

/// What the store holds for an org: live records, the largest version, and change events.
async fn stored(url: &str, org: &str) -> (i64, i64, i64) {
    sqlx::any::install_default_drivers();
    let pool = sqlx::any::AnyPoolOptions::new().max_connections(1).connect(url).await.unwrap();
    let row = sqlx::query("SELECT COUNT(*), COALESCE(MAX(version), 0) FROM records WHERE org_id = $1 AND deleted = 0")
        .bind(org)
        .fetch_one(&pool)
        .await
        .unwrap();
    let events =
        sqlx::query("SELECT COUNT(*) FROM change_events WHERE org_id = $1").bind(org).fetch_one(&pool).await.unwrap();
    let out = (row.get::<i64, _>(0), row.get::<i64, _>(1), events.get::<i64, _>(0));
    pool.close().await;
    out
}

/// Chunk rows straight from the store: (index, state, attempts, worker, sent).
async fn chunk_rows(url: &str, batch: &str) -> Vec<(i64, String, i64, String, bool)> {
    sqlx::any::install_default_drivers();
    let pool = sqlx::any::AnyPoolOptions::new().max_connections(1).connect(url).await.unwrap();
    let rows =
        sqlx::query("SELECT idx, state, attempts, worker, sent_at_ms FROM chunks WHERE batch_id = $1 ORDER BY idx")
            .bind(batch)
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get::<i64, _>(4) > 0)).collect()
}

/// A transaction that holds up the chunks of an org: on SQLite the whole database's write lock,
/// on PostgreSQL the org's records (so they must exist), until [`Blocker::release`].
struct Blocker {
    pool: sqlx::AnyPool,
    conn: sqlx::pool::PoolConnection<sqlx::Any>,
}

impl Blocker {
    async fn hold(url: &str, backend: Backend, org_id: &str) -> Self {
        use sqlx::Executor;
        sqlx::any::install_default_drivers();
        let pool = sqlx::any::AnyPoolOptions::new().max_connections(1).connect(url).await.unwrap();
        let mut conn = pool.acquire().await.unwrap();
        match backend {
            Backend::Sqlite => conn.execute("BEGIN IMMEDIATE").await.map(|_| ()).unwrap(),
            Backend::Postgres => {
                conn.execute("BEGIN").await.unwrap();
                sqlx::query("SELECT id FROM records WHERE org_id = $1 FOR UPDATE")
                    .bind(org_id)
                    .fetch_all(&mut *conn)
                    .await
                    .unwrap();
            }
        }
        Self { pool, conn }
    }

    async fn release(mut self) {
        use sqlx::Executor;
        self.conn.execute("COMMIT").await.unwrap();
        drop(self.conn);
        self.pool.close().await;
    }
}

/// Every chunk's status, in index order.
async fn chunk_statuses(server: &Server, org: &TestOrg, id: &str) -> Vec<pb::ChunkStatus> {
    results(server, org, id).await.into_iter().map(|r| r.chunk.unwrap()).collect()
}

/// When a chunk's last attempt started, in ms since the Unix epoch (0: not yet).
fn started_ms(c: &pb::ChunkStatus) -> i64 {
    baton_mesh::proto::unix_ms(c.start_time.as_ref())
}

/// When a chunk got its outcome, in ms since the Unix epoch (0: not yet).
fn finished_ms(c: &pb::ChunkStatus) -> i64 {
    baton_mesh::proto::unix_ms(c.finish_time.as_ref())
}

/// The most `chunks` that ran at once, from their start and finish times.
fn peak_running<'a>(chunks: impl IntoIterator<Item = &'a pb::ChunkStatus>) -> i32 {
    let mut events = Vec::new();
    for c in chunks {
        let (started, finished) = (started_ms(c), finished_ms(c));
        assert!(started > 0 && finished >= started, "{c:?}");
        events.push((started, 1));
        events.push((finished, -1));
    }
    // a finish and a start at the same millisecond: the finish first
    events.sort_unstable();
    events
        .iter()
        .scan(0, |running, &(_, d)| {
            *running += d;
            Some(*running)
        })
        .max()
        .unwrap_or(0)
}

/// 100,000 records in ten chunks of 10,000: every chunk COMMITTED, every record stored once at
/// version 1 with one change event. The same request id again answers the same batch; and an
/// upsert over the real-time limit with `--auto-batch` becomes a batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_batch_commits_every_record_once() {
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        let server = Server::in_process(backend, &[]).await;
        let org = create_org(&server, "acme").await;
        let mut h = header(0);
        h.request_id = "load-1".into();
        let started = Instant::now();
        let staged = submit(&server, &org, h.clone(), accounts("a", 0..100_000)).await;
        assert_eq!((staged.records, staged.chunks, staged.duplicate), (100_000, 10, false));
        let (batch, _) = watch(&server, &org, &staged.batch_id, Duration::from_secs(240)).await;
        eprintln!("100,000 records committed in {:?} on {backend:?}", started.elapsed());
        let totals = batch.totals.unwrap();
        assert_eq!(pb::BatchState::try_from(batch.state).unwrap(), pb::BatchState::Done);
        assert_eq!((totals.committed, totals.records_committed, totals.aborted), (10, 100_000, 0));
        assert_eq!(stored(&server.store_url, &org.id).await, (100_000, 1, 100_000));

        // the same request id: the same batch, nothing staged again
        let again = submit(&server, &org, h, accounts("b", 0..10)).await;
        assert_eq!(
            (again.batch_id.as_str(), again.duplicate, again.records),
            (staged.batch_id.as_str(), true, 100_000)
        );
        assert_eq!(stored(&server.store_url, &org.id).await.0, 100_000);

        // the CLI turns a "resubmit as batch" rejection into a batch
        let file = TempDir::new();
        let path = file.path().join("records.ndjson");
        let lines: Vec<String> =
            (0..250).map(|i| format!(r#"{{"code":"cli{i:03}","name":"c","amount":{i}}}"#)).collect();
        std::fs::write(&path, lines.join("\n")).unwrap();
        let out = std::process::Command::new(baton_tests::baton_bin())
            .args(["upsert", "account", "--auto-batch", "--file", path.to_str().unwrap()])
            .env("BATON_ENDPOINT", format!("http://{}", server.addr))
            .env("BATON_API_KEY", &org.key)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "baton upsert --auto-batch: {stderr}");
        assert!(stderr.contains("resubmit as batch"), "{stderr}");
        let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(id.starts_with("bat_"), "a batch id: {id:?}");
        let (batch, _) = watch(&server, &org, &id, Duration::from_secs(60)).await;
        assert_eq!(batch.totals.unwrap().records_committed, 250);
        assert_eq!(stored(&server.store_url, &org.id).await.0, 100_250);
    }
}

/// Bad records in two chunks: exactly those chunks ABORTED, with every failing index; none of
/// their records committed; the other chunks committed. Bad input to SubmitBatch itself stages
/// nothing and says what is wrong; another org cannot see the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_records_abort_exactly_their_chunks() {
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        let server = Server::in_process(backend, &[]).await;
        let org = create_org(&server, "acme").await;
        let mut records = accounts("a", 0..50);
        records[13] = record(serde_json::json!({"code": "a000013", "name": "n", "amount": "thirteen"}));
        records[41] = record(serde_json::json!({"code": "a000041", "amount": 41}));
        records[44] = record(serde_json::json!({"code": "a000044", "name": "n", "colour": "red"}));
        let staged = submit(&server, &org, header(10), records).await;
        let (batch, _) = watch(&server, &org, &staged.batch_id, Duration::from_secs(60)).await;
        let totals = batch.totals.unwrap();
        assert_eq!((totals.committed, totals.aborted, totals.records_committed), (3, 2, 30));
        let results = results(&server, &org, &staged.batch_id).await;
        let aborted: BTreeMap<u32, Vec<(u64, String)>> = results
            .iter()
            .filter(|r| state(r.chunk.as_ref().unwrap()) == pb::ChunkState::Aborted)
            .map(|r| (r.chunk.as_ref().unwrap().index, r.errors.iter().map(|e| (e.index, e.field.clone())).collect()))
            .collect();
        let expected: BTreeMap<u32, Vec<(u64, String)>> =
            [(1, vec![(13, "amount".to_owned())]), (4, vec![(41, "name".to_owned()), (44, "colour".to_owned())])]
                .into();
        assert_eq!(aborted, expected);
        let kept = server.records(&org.key, "account").await;
        assert_eq!(kept.len(), 30);
        assert!(kept.keys().all(|id| {
            let i: usize = id[1..].parse().unwrap();
            !(10..20).contains(&i) && !(40..50).contains(&i)
        }));

        // bad input to SubmitBatch: precise statuses, nothing staged
        let mut scheduler = pb::scheduler_client::SchedulerClient::new(server.channel().await);
        let frames = |frames: Vec<pb::SubmitBatchRequest>| authed(tokio_stream::iter(frames), &org.key);
        let head =
            |h: pb::BatchHeader| pb::SubmitBatchRequest { frame: Some(pb::submit_batch_request::Frame::Header(h)) };
        let recs = |r: Vec<pb::RecordFields>| pb::SubmitBatchRequest {
            frame: Some(pb::submit_batch_request::Frame::Records(pb::BatchRecords { records: r })),
        };
        let cases = [
            (vec![recs(accounts("x", 0..2))], "the first frame must be the header"),
            (vec![head(pb::BatchHeader { object: "account".into(), ..Default::default() })], "header.operation"),
            (vec![head(pb::BatchHeader { chunk_size: 200_000, ..header(0) })], "header.chunk_size"),
            (vec![head(header(0))], "at least one record"),
            (vec![head(header(0)), recs(accounts("x", 0..2)), head(header(0))], "a second header"),
        ];
        for (frames_sent, says) in cases {
            let status = scheduler.submit_batch(frames(frames_sent)).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            let text = format!("{} {:?}", status.message(), status.details());
            assert!(
                text.contains(says)
                    || tonic_types::StatusExt::get_details_bad_request(&status).is_some_and(|b| b
                        .field_violations
                        .iter()
                        .any(|v| v.field.contains(says) || v.description.contains(says))),
                "{says}: {status:?}"
            );
        }
        let unknown = scheduler
            .submit_batch(frames(vec![
                head(pb::BatchHeader { object: "nope".into(), ..header(0) }),
                recs(accounts("x", 0..1)),
            ]))
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound);
        let other = create_org(&server, "other").await;
        let hidden = scheduler
            .get_batch(authed(pb::GetBatchRequest { batch_id: staged.batch_id.clone() }, &other.key))
            .await
            .unwrap_err();
        assert_eq!(hidden.code(), tonic::Code::NotFound);
        let count: i64 = {
            sqlx::any::install_default_drivers();
            let pool = sqlx::any::AnyPoolOptions::new().max_connections(1).connect(&server.store_url).await.unwrap();
            let row = sqlx::query("SELECT COUNT(*) FROM batches").fetch_one(&pool).await.unwrap();
            row.get(0)
        };
        assert_eq!(count, 1, "a rejected submission left a batch behind");
    }
}

/// A chunk with a record the schema refuses and a record whose unique value another record
/// already holds lists both: a stored conflict is listed whatever else is wrong in the chunk (it
/// used to be listed only when it was the chunk's sole problem).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_aborted_chunk_lists_stored_unique_conflicts_beside_invalid_records() {
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        let server = Server::in_process(backend, &[]).await;
        let org = create_org(&server, "acme").await;
        let held = record(serde_json::json!({"code": "held", "name": "h", "email": "taken@example.com"}));
        let upsert = pb::UpsertRequest { object: "account".into(), records: vec![held] };
        server.intake().await.upsert(authed(upsert, &org.key)).await.unwrap();

        let records = vec![
            record(serde_json::json!({"code": "b0", "name": "n", "amount": "zero"})),
            record(serde_json::json!({"code": "b1", "name": "n", "email": "taken@example.com"})),
            record(serde_json::json!({"code": "b2", "name": "n", "amount": 2})),
        ];
        let staged = submit(&server, &org, header(10), records).await;
        let (batch, _) = watch(&server, &org, &staged.batch_id, Duration::from_secs(60)).await;
        let totals = batch.totals.unwrap();
        assert_eq!((totals.committed, totals.aborted, totals.records_committed), (0, 1, 0));
        let results = results(&server, &org, &staged.batch_id).await;
        let errors: Vec<(u64, String)> =
            results.iter().flat_map(|r| &r.errors).map(|e| (e.index, e.field.clone())).collect();
        assert_eq!(errors, [(0, "amount".to_owned()), (1, "email".to_owned())], "{results:?}");
        let reason = &results[0].errors[1].reason;
        assert!(reason.contains("already used by record \"held\""), "{reason}");
        assert_eq!(server.records(&org.key, "account").await.len(), 1, "nothing of the chunk committed");
    }
}

/// A lock held on the target (the whole database on SQLite, the target rows on PostgreSQL) while
/// a worker takes its chunk: COMMITTED_AFTER_RETRY_WORKLOAD. A time budget forced below what a
/// chunk needs: COMMITTED_AFTER_RETRY_RESOURCES.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn busy_and_resource_limits_are_retried_into_their_outcomes() {
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        // no workers in the mesh: the chunks wait in the manager until a worker process comes
        let server = Server::start(backend, &["--workers", "0"]).await;
        let org = create_org(&server, "acme").await;
        // records the batch will update, so that PostgreSQL has target rows to lock
        let mut intake = server.intake().await;
        let request = pb::UpsertRequest { object: "account".into(), records: accounts("a", 0..20) };
        intake.upsert(authed(request, &org.key)).await.unwrap();
        let staged = submit(&server, &org, header(10), accounts("a", 0..20)).await;
        eventually(Duration::from_secs(20), "both chunks released and sent", || async {
            chunk_rows(&server.store_url, &staged.batch_id).await.iter().all(|c| c.4).then_some(())
        })
        .await;
        let blocker = Blocker::hold(&server.store_url, backend, &org.id).await;
        let busy = worker(&server, "w-busy", &["--lock-timeout", "100ms", "--retry-backoff", "100ms"]);
        eventually(Duration::from_secs(20), "the sessions bound to w-busy", || async {
            let mut client = pb::session_manager_client::SessionManagerClient::new(server.channel().await);
            let sessions = client.list_sessions(pb::ListSessionsRequest::default()).await.ok()?.into_inner().sessions;
            sessions.iter().any(|s| s.bound_server == "w-busy").then_some(())
        })
        .await;
        // the worker has its chunks now, and meets the lock for a while
        tokio::time::sleep(Duration::from_millis(1500)).await;
        blocker.release().await;
        let (batch, _) = watch(&server, &org, &staged.batch_id, Duration::from_secs(60)).await;
        let totals = batch.totals.unwrap();
        assert_eq!(totals.records_committed, 20);
        assert!(totals.committed_after_retry_workload >= 1, "{totals:?}");
        for r in results(&server, &org, &staged.batch_id).await {
            let c = r.chunk.unwrap();
            if state(&c) == pb::ChunkState::CommittedAfterRetryWorkload {
                assert!(c.worker == "w-busy" && c.last_cause.contains("busy"), "{c:?}");
            }
        }
        drop(busy);

        // a budget no chunk can meet at first: retried with more
        let _tight = worker(&server, "w-tight", &["--chunk-budget", "1ms"]);
        let staged = submit(&server, &org, header(2000), accounts("r", 0..4000)).await;
        let (batch, _) = watch(&server, &org, &staged.batch_id, Duration::from_secs(120)).await;
        let totals = batch.totals.unwrap();
        assert_eq!((totals.committed_after_retry_resources, totals.records_committed), (2, 4000), "{totals:?}");
        for r in results(&server, &org, &staged.batch_id).await {
            let c = r.chunk.unwrap();
            assert!(c.attempts >= 2, "{c:?}");
        }
        assert_eq!(stored(&server.store_url, &org.id).await.0, 4020);
    }
}

/// A chunk that met a busy database (committed after a workload retry) makes the scheduler defer
/// the next release for a second; a chunk that did not, does not. One chunk of the batch runs at
/// a time, so each release is the start of the next chunk.
/// (Without the pause after an overloaded chunk the first gap is a few milliseconds on both
/// backends: SQLite's lock holds up the releaser's own release too, but not past its busy
/// timeout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn releases_are_deferred_while_the_database_is_overloaded() {
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        let server = Server::start(backend, &["--workers", "0"]).await;
        let org = create_org(&server, "acme").await;
        // the first chunk's records exist, so that PostgreSQL has rows to lock
        let mut intake = server.intake().await;
        let request = pb::UpsertRequest { object: "account".into(), records: accounts("o", 0..10) };
        intake.upsert(authed(request, &org.key)).await.unwrap();
        let mut one_at_a_time = header(10);
        one_at_a_time.policy = Some(pb::ReleasePolicy { max_parallel_chunks: 1, ..Default::default() });
        let staged = submit(&server, &org, one_at_a_time, accounts("o", 0..40)).await;
        eventually(Duration::from_secs(20), "the first chunk released and sent", || async {
            chunk_rows(&server.store_url, &staged.batch_id).await[0].4.then_some(())
        })
        .await;
        let blocker = Blocker::hold(&server.store_url, backend, &org.id).await;
        let _worker = worker(&server, "w", &["--lock-timeout", "100ms", "--retry-backoff", "100ms"]);
        // the worker meets the lock for a while, then commits the chunk after a workload retry
        tokio::time::sleep(Duration::from_millis(1500)).await;
        blocker.release().await;
        let (batch, _) = watch(&server, &org, &staged.batch_id, Duration::from_secs(60)).await;
        assert_eq!(batch.totals.unwrap().records_committed, 40);
        let chunks = chunk_statuses(&server, &org, &staged.batch_id).await;
        assert_eq!(state(&chunks[0]), pb::ChunkState::CommittedAfterRetryWorkload, "{:?}", chunks[0]);
        for c in &chunks[1..] {
            assert_eq!(state(c), pb::ChunkState::Committed, "{c:?}");
        }
        assert_eq!(peak_running(&chunks), 1);
        let gaps: Vec<i64> = chunks.windows(2).map(|w| started_ms(&w[1]) - finished_ms(&w[0])).collect();
        eprintln!("gaps between chunks: {gaps:?} ms");
        {
            sqlx::any::install_default_drivers();
            let pool = sqlx::any::AnyPoolOptions::new().max_connections(1).connect(&server.store_url).await.unwrap();
            let rows = sqlx::query("SELECT idx, released_at_ms, sent_at_ms, started_at_ms, finished_at_ms FROM chunks WHERE batch_id = $1 ORDER BY idx").bind(staged.batch_id.clone()).fetch_all(&pool).await.unwrap();
            for r in rows {
                eprintln!(
                    "DBG {} rel {} sent {} start {} fin {}",
                    r.get::<i64, _>(0),
                    r.get::<i64, _>(1),
                    r.get::<i64, _>(2),
                    r.get::<i64, _>(3),
                    r.get::<i64, _>(4)
                );
            }
        }
        // after the overloaded chunk: at least the 1 s pause (less a millisecond of rounding)
        assert!(gaps[0] >= 999, "released {} ms after an overloaded chunk: {chunks:?}", gaps[0]);
        // after a chunk that met no busy database: released when it answered, well within the pause
        assert!(gaps[1..].iter().all(|g| *g < 900), "gaps {gaps:?}: {chunks:?}");
    }
}

/// A worker SIGKILLed in the middle of a chunk: the manager rebinds its sessions to the other
/// worker, which runs the chunk again; it commits exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunk_of_a_killed_worker_commits_once_on_another() {
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        let server = Server::start(backend, &["--workers", "0"]).await;
        let org = create_org(&server, "acme").await;
        // the first worker to register gets the scheduler's sessions
        let first = worker(&server, "w1", &["--concurrency", "1"]);
        eventually(Duration::from_secs(20), "w1 bound", || async {
            let mut client = pb::session_manager_client::SessionManagerClient::new(server.channel().await);
            let sessions = client.list_sessions(pb::ListSessionsRequest::default()).await.ok()?.into_inner().sessions;
            (!sessions.is_empty() && sessions.iter().all(|s| s.bound_server == "w1")).then_some(())
        })
        .await;
        let _second = worker(&server, "w2", &["--concurrency", "1"]);
        let n = 60_000;
        let staged = submit(&server, &org, header(20_000), accounts("a", 0..n)).await;
        let running = eventually(Duration::from_secs(60), "a chunk running on w1", || async {
            chunk_rows(&server.store_url, &staged.batch_id)
                .await
                .into_iter()
                .find(|c| c.1 == "RUNNING" && c.3 == "w1")
                .map(|c| c.0)
        })
        .await;
        drop(first); // SIGKILL
        let (batch, _) = watch(&server, &org, &staged.batch_id, Duration::from_secs(180)).await;
        let totals = batch.totals.unwrap();
        assert_eq!((totals.committed, totals.records_committed), (3, n as u64), "{totals:?}");
        let rows = chunk_rows(&server.store_url, &staged.batch_id).await;
        let rerun = &rows[running as usize];
        assert!(rerun.2 >= 2 && rerun.3 == "w2", "the killed chunk ran again on w2: {rerun:?}");
        assert_eq!(stored(&server.store_url, &org.id).await, (n as i64, 1, n as i64), "committed exactly once");
    }
}

/// A worker SIGKILLed in a chunk it is retrying after a resource limit: the worker that takes the
/// session over continues the chunk's attempts from the restart data the first one saved with the
/// session manager, so the chunk commits as COMMITTED_AFTER_RETRY_RESOURCES with the first
/// attempt's cause, not as a plain COMMITTED, and exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resource_retry_of_a_killed_worker_carries_over_to_the_next() {
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        let server = Server::start(backend, &["--workers", "0"]).await;
        let org = create_org(&server, "acme").await;
        // w1's first attempt at a chunk fails as over its budget; w1 saves the chunk's restart
        // data and then holds the chunk instead of retrying
        let failpoints = "worker-chunk-attempt=1*return->off;worker-before-retry=sleep(60000)";
        let first = worker_with_env(&server, "w1", &["--concurrency", "1"], &[("FAILPOINTS", failpoints)]);
        eventually(Duration::from_secs(20), "w1 bound", || async {
            let mut client = pb::session_manager_client::SessionManagerClient::new(server.channel().await);
            let sessions = client.list_sessions(pb::ListSessionsRequest::default()).await.ok()?.into_inner().sessions;
            (!sessions.is_empty() && sessions.iter().all(|s| s.bound_server == "w1")).then_some(())
        })
        .await;
        let n = 500;
        let staged = submit(&server, &org, header(1000), accounts("a", 0..n)).await;
        assert_eq!(staged.chunks, 1);
        let saved = eventually(Duration::from_secs(30), "w1's restart data journaled", || async {
            let mut client = pb::session_manager_client::SessionManagerClient::new(server.channel().await);
            let sessions = client.list_sessions(pb::ListSessionsRequest::default()).await.ok()?.into_inner().sessions;
            sessions.into_iter().find(|s| s.server_restart_bytes > 0)
        })
        .await;
        assert_eq!((saved.bound_server.as_str(), saved.request_queue), ("w1", 1), "{saved:?}");
        let rows = chunk_rows(&server.store_url, &staged.batch_id).await;
        assert_eq!((rows[0].1.as_str(), rows[0].2, rows[0].3.as_str()), ("RUNNING", 1, "w1"), "{rows:?}");
        drop(first); // SIGKILL, in the chunk after its failed attempt
        let _second = worker(&server, "w2", &["--concurrency", "1"]);
        let (batch, _) = watch(&server, &org, &staged.batch_id, Duration::from_secs(60)).await;
        let totals = batch.totals.unwrap();
        assert_eq!(
            (totals.committed, totals.committed_after_retry_resources, totals.records_committed, totals.aborted),
            (0, 1, n as u64, 0),
            "{totals:?}"
        );
        let chunk = chunk_statuses(&server, &org, &staged.batch_id).await.remove(0);
        assert_eq!(
            (state(&chunk), chunk.attempts, chunk.worker.as_str()),
            (pb::ChunkState::CommittedAfterRetryResources, 2, "w2"),
            "{chunk:?}"
        );
        assert!(
            chunk.last_cause.starts_with("attempt 1 with a budget of 60s") && chunk.last_cause.contains("deadline"),
            "w1's cause carried over: {chunk:?}"
        );
        assert_eq!(stored(&server.store_url, &org.id).await, (n as i64, 1, n as i64), "committed exactly once");
    }
}

/// The release policy, observed: no chunk starts before its batch's not-before time; chunks
/// running at once never exceed the cap; a second org's batch interleaves with a big one that
/// was queued first instead of waiting for it (the per-org cap alone would let org a take every
/// slot). The per-org cap below the overall one is shown in the store suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn release_policy_holds_times_caps_and_fairness() {
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        // a cap per org as large as the overall one: only fair sharing lets org b in early
        let server = Server::in_process(
            backend,
            &["--max-parallel", "2", "--org-parallel", "2", "--workers", "2", "--concurrency", "4"],
        )
        .await;
        let (a, b) = (create_org(&server, "a").await, create_org(&server, "b").await);
        let not_before = now_ms() + 1500;
        let mut timed = header(500);
        timed.policy =
            Some(pb::ReleasePolicy { not_before_time: baton_mesh::proto::timestamp(not_before), ..Default::default() });
        let early = submit(&server, &a, timed, accounts("t", 0..1000)).await;
        let big = submit(&server, &a, header(1000), accounts("a", 0..12_000)).await;
        let small = submit(&server, &b, header(1000), accounts("b", 0..3000)).await;
        let (_, _) = watch(&server, &a, &big.batch_id, Duration::from_secs(180)).await;
        let (_, _) = watch(&server, &b, &small.batch_id, Duration::from_secs(60)).await;
        let (_, _) = watch(&server, &a, &early.batch_id, Duration::from_secs(60)).await;
        let early_chunks = chunk_statuses(&server, &a, &early.batch_id).await;
        assert!(
            early_chunks.iter().all(|c| started_ms(c) >= not_before),
            "started before not-before: {early_chunks:?}"
        );
        let big_chunks = chunk_statuses(&server, &a, &big.batch_id).await;
        let small_chunks = chunk_statuses(&server, &b, &small.batch_id).await;
        let peak = peak_running(big_chunks.iter().chain(&early_chunks).chain(&small_chunks));
        let peak_a = peak_running(big_chunks.iter().chain(&early_chunks));
        assert!(peak <= 2 && peak_a <= 2, "caps exceeded: {peak} overall, {peak_a} in org a");
        let last_big_start = big_chunks.iter().map(started_ms).max().unwrap();
        let last_small_start = small_chunks.iter().map(started_ms).max().unwrap();
        assert!(
            last_small_start < last_big_start,
            "org b waited for org a's whole batch: b's last start {last_small_start}, a's {last_big_start}"
        );
    }
}

/// Two managers on a real etcd, a `baton scheduler` and two `baton worker` processes: the primary
/// manager is SIGKILLed twice during a batch; the batch completes, every chunk committed exactly
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_completes_across_primary_manager_kills() {
    let etcd = baton_tests::Etcd::start();
    let mut pair = ManagerPair::start(&etcd, &format!("/baton-batch-test/{}", std::process::id())).await;
    let managers = pair.endpoints.clone();
    let data = TempDir::new();
    let url = format!("sqlite://{}/baton.db", data.path().display());
    let intake = intake_process(&url, &[]);
    let scheduler = scheduler_process(&url, &managers, &["--max-parallel", "4"]);
    let _workers: Vec<Server> = ["w1", "w2"].iter().map(|id| worker_process(&url, &managers, id, &[])).collect();
    let org = create_org(&intake, "acme").await;
    let n = 40_000;
    let staged = submit(&scheduler, &org, header(1000), accounts("a", 0..n)).await;
    for kill in 0..2 {
        eventually(Duration::from_secs(60), "chunks committing", || async {
            let rows = chunk_rows(&url, &staged.batch_id).await;
            let done = rows.iter().filter(|c| c.1 == "COMMITTED").count();
            (done >= 8 * (kill + 1)).then_some(())
        })
        .await;
        pair.kill_primary().await;
    }
    let (batch, _) = watch(&scheduler, &org, &staged.batch_id, Duration::from_secs(180)).await;
    let totals = batch.totals.unwrap();
    assert_eq!((totals.committed, totals.records_committed, totals.aborted), (40, n as u64, 0), "{totals:?}");
    assert_eq!(stored(&url, &org.id).await, (n as i64, 1, n as i64), "committed exactly once");
}

/// Two `baton scheduler` replicas on one PostgreSQL database share the queue: every chunk is sent
/// to the workers exactly once (the manager's request counts add up to the chunks), and the
/// overall cap holds across both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_schedulers_on_postgres_release_each_chunk_once() {
    if !backends().contains(&Backend::Postgres) {
        eprintln!("note: no PostgreSQL; skipped");
        return;
    }
    let url = baton_store::testing::fresh_url(Backend::Postgres).await.unwrap().0;
    let journal = TempDir::new();
    let manager = Server::manager_alone(&journal, &[]);
    let endpoint = format!("http://{}", manager.addr);
    let intake = intake_process(&url, &[]);
    let release = ["--max-parallel", "3", "--org-parallel", "3", "--release-interval", "5ms", "--sessions", "2"];
    let schedulers: Vec<Server> = (0..2).map(|_| scheduler_process(&url, &endpoint, &release)).collect();
    let _workers: Vec<Server> =
        ["w1", "w2"].iter().map(|id| worker_process(&url, &endpoint, id, &["--concurrency", "4"])).collect();
    let org = create_org(&intake, "acme").await;
    let staged = submit(&schedulers[0], &org, header(100), accounts("a", 0..6000)).await;
    let (batch, _) = watch(&schedulers[1], &org, &staged.batch_id, Duration::from_secs(120)).await;
    let totals = batch.totals.unwrap();
    assert_eq!((totals.committed, totals.records_committed), (60, 6000), "{totals:?}");
    let mut client = pb::session_manager_client::SessionManagerClient::new(manager.channel().await);
    let sessions = client.list_sessions(pb::ListSessionsRequest::default()).await.unwrap().into_inner().sessions;
    assert_eq!(sessions.len(), 4, "two sessions per scheduler: {sessions:?}");
    let sent: u64 = sessions.iter().map(|s| s.last_request_seq).sum();
    assert_eq!(sent, 60, "every chunk sent once, by one of the two schedulers");
    let peak = peak_running(&chunk_statuses(&schedulers[1], &org, &staged.batch_id).await);
    assert!(peak <= 3, "{peak} chunks ran at once across the two schedulers; the cap is 3");
    assert_eq!(stored(&url, &org.id).await, (6000, 1, 6000));
}

/// The client sessions the manager at `server` holds whose ids start with `prefix`, by id.
async fn sessions_of(server: &Server, prefix: &str) -> Vec<pb::SessionInfo> {
    let mut client = pb::session_manager_client::SessionManagerClient::new(server.channel().await);
    let sessions = client.list_sessions(pb::ListSessionsRequest::default()).await.unwrap().into_inner().sessions;
    let mut sessions: Vec<_> = sessions.into_iter().filter(|s| s.session_id.starts_with(prefix)).collect();
    sessions.sort_by(|a, b| a.session_id.cmp(&b.session_id));
    sessions
}

fn ids(sessions: &[pb::SessionInfo]) -> Vec<&str> {
    sessions.iter().map(|s| s.session_id.as_str()).collect()
}

/// A `baton scheduler` SIGKILLed mid-batch at the worst moment: a failpoint stops it after the
/// manager journaled its third chunk and before the store marked it sent, with a fourth chunk
/// released and never sent. Restarted with the same `--scheduler-id` on the same database, it
/// resumes its two sessions (the manager holds as many as before, no more), marks the journaled
/// chunk sent from its sessions' restart data, and releases the unsent one at once: the batch
/// completes within 20 s of the restart, well within the store's 30 s unsent-release timeout
/// (which alone would have held the fourth chunk back), every chunk sent once and committed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_scheduler_resumes_its_sessions_and_sends_at_once_what_it_had_not() {
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        let data = TempDir::new();
        let url = match backend {
            Backend::Sqlite => format!("sqlite://{}/baton.db", data.path().display()),
            Backend::Postgres => baton_store::testing::fresh_url(Backend::Postgres).await.unwrap().0,
        };
        let journal = TempDir::new();
        let manager = Server::manager_alone(&journal, &[]);
        let endpoint = format!("http://{}", manager.addr);
        let intake = intake_process(&url, &[]);
        let id = "sched-e2e";
        let release = ["--scheduler-id", id, "--sessions", "2", "--max-parallel", "4", "--org-parallel", "4"];
        // the first release takes chunks 0-3; the third send stops between journal and mark
        let failpoint = [("FAILPOINTS", "releaser-chunk-sent=2*off->sleep(60000)")];
        let mut scheduler = scheduler_process_with_env(&url, &endpoint, &release, &failpoint);
        let _worker = worker_process(&url, &endpoint, "w1", &["--concurrency", "1"]);
        let org = create_org(&intake, "acme").await;
        let n = 8_000;
        let staged = submit(&scheduler, &org, header(1000), accounts("a", 0..n)).await;
        let prefix = format!("{id}/");
        let before = eventually(Duration::from_secs(30), "three chunks journaled by the manager", || async {
            let sessions = sessions_of(&manager, &prefix).await;
            (sessions.iter().map(|s| s.last_request_seq).sum::<u64>() == 3).then_some(sessions)
        })
        .await;
        assert_eq!(ids(&before), ["sched-e2e/0", "sched-e2e/1"]);
        let rows = chunk_rows(&url, &staged.batch_id).await;
        assert!(!rows[2].4, "the third chunk is journaled, not marked sent: {rows:?}");
        assert_eq!((rows[3].1.as_str(), rows[3].4), ("RELEASED", false), "the fourth is released, not sent: {rows:?}");
        assert!(rows[4..].iter().all(|c| c.1 == "PENDING"), "{rows:?}");

        scheduler.clear_env();
        let restarted = Instant::now();
        let scheduler = scheduler.restart(&[]); // SIGKILL, then the same flags
        let (batch, _) = watch(&scheduler, &org, &staged.batch_id, Duration::from_secs(60)).await;
        let took = restarted.elapsed();
        eprintln!("the batch completed {took:?} after the scheduler's restart");
        assert!(took < Duration::from_secs(20), "{took:?} after the restart: the unsent chunk waited for the timeout?");
        let totals = batch.totals.unwrap();
        assert_eq!((totals.committed, totals.records_committed, totals.aborted), (8, n as u64, 0), "{totals:?}");
        let after = sessions_of(&manager, "").await;
        assert_eq!(ids(&after), ids(&before), "the same sessions, resumed, and no others");
        let sent: u64 = after.iter().map(|s| s.last_request_seq).sum();
        assert_eq!(sent, 8, "every chunk sent once: the journaled one not again, the unsent one once");
        assert_eq!(stored(&url, &org.id).await, (n as i64, 1, n as i64), "committed exactly once");
        // the store records the scheduler id as the releaser
        sqlx::any::install_default_drivers();
        let pool = sqlx::any::AnyPoolOptions::new().max_connections(1).connect(&url).await.unwrap();
        let claimers: Vec<String> = sqlx::query("SELECT DISTINCT claimed_by FROM chunks WHERE batch_id = $1")
            .bind(staged.batch_id.clone())
            .fetch_all(&pool)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        pool.close().await;
        assert_eq!(claimers, [id]);
    }
}

/// `baton dev` SIGKILLed and restarted five times on its data directory: its scheduler (id `dev`)
/// resumes the same sessions each time, `dev/0` to `dev/7`, all connected again, instead of
/// leaving eight more behind per start; and a batch goes through on them after each restart.
/// (The sessions live in the manager's journal under the data directory: SQLite only.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn baton_dev_restarted_holds_the_same_scheduler_sessions() {
    let mut server = Server::start(Backend::Sqlite, &[]).await;
    let org = create_org(&server, "acme").await;
    let expected: Vec<String> = (0..8).map(|k| format!("dev/{k}")).collect();
    for start in 0..=5 {
        if start > 0 {
            server = server.restart(&[]);
        }
        eventually(Duration::from_secs(30), "the scheduler's eight sessions connected", || async {
            let sessions = sessions_of(&server, "dev/").await;
            let connected = sessions.iter().filter(|s| s.client_connected).count();
            (connected == expected.len()).then_some(())
        })
        .await;
        // and no others, connected or left behind by an earlier start
        let sessions = sessions_of(&server, "dev/").await;
        assert_eq!(ids(&sessions), expected, "start {start}");
        assert!(sessions.iter().all(|s| s.client_connected), "start {start}: {sessions:?}");
        assert_eq!(sessions_of(&server, "").await.len(), 8, "start {start}: sessions besides the scheduler's");
        let staged = submit(&server, &org, header(10), accounts(&format!("s{start}-"), 0..20)).await;
        let (batch, _) = watch(&server, &org, &staged.batch_id, Duration::from_secs(60)).await;
        assert_eq!(batch.totals.unwrap().records_committed, 20, "start {start}");
    }
}

/// `baton dev` restarted with fewer `--sessions`: the scheduler resumes the sessions above the new
/// count only to drain them, and closes them (their queues are empty here), so the manager is left
/// with exactly the new count; batches go on through the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scheduler_restarted_with_fewer_sessions_closes_the_surplus() {
    let server = Server::start_with_env(Backend::Sqlite, &[], &[("BATON_SCHEDULER_SESSIONS", "4")]).await;
    let org = create_org(&server, "acme").await;
    let staged = submit(&server, &org, header(10), accounts("a", 0..80)).await;
    watch(&server, &org, &staged.batch_id, Duration::from_secs(60)).await;
    assert_eq!(ids(&sessions_of(&server, "").await), ["dev/0", "dev/1", "dev/2", "dev/3"]);
    let server = server.restart(&["--sessions", "2"]); // the flag wins over the variable
    eventually(Duration::from_secs(30), "the surplus sessions closed", || async {
        let sessions = sessions_of(&server, "").await;
        (ids(&sessions) == ["dev/0", "dev/1"] && sessions.iter().all(|s| s.client_connected)).then_some(())
    })
    .await;
    let staged = submit(&server, &org, header(10), accounts("b", 0..40)).await;
    let (batch, _) = watch(&server, &org, &staged.batch_id, Duration::from_secs(60)).await;
    assert_eq!(batch.totals.unwrap().records_committed, 40);
    assert_eq!(ids(&sessions_of(&server, "").await), ["dev/0", "dev/1"], "no session opened again");
}

/// A chunk's parts (after a split), checked to cover its records once, in order: (first record,
/// records, state, cause) of each.
fn parts_of(c: &pb::ChunkStatus) -> Vec<(u64, u32, pb::ChunkPartState, String)> {
    let mut next = c.first_record;
    for p in &c.parts {
        assert!(p.records > 0 && p.first_record == next, "the parts partition the chunk's records: {c:?}");
        next += u64::from(p.records);
    }
    if !c.parts.is_empty() {
        assert_eq!(next, c.first_record + u64::from(c.records), "the parts cover the chunk: {c:?}");
    }
    c.parts
        .iter()
        .map(|p| (p.first_record, p.records, pb::ChunkPartState::try_from(p.state).unwrap(), p.cause.clone()))
        .collect()
}

/// A chunk over the size budget (`--chunk-max-bytes`) is split in halves down to parts within
/// it, each its own transaction: COMMITTED_AFTER_RETRY_RESOURCES, every record stored once at
/// version 1 with one change event; WatchBatch and ListChunkResults show the parts. The batch's
/// other chunk, within the budget, commits whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunk_over_the_size_budget_splits_and_commits_every_record_once() {
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        // each record is about 45 bytes of JSON: 100 are about 4,500, 30 about 1,350
        let server = Server::in_process(backend, &["--chunk-max-bytes", "2000"]).await;
        let org = create_org(&server, "acme").await;
        let n = 130;
        let staged = submit(&server, &org, header(100), accounts("s", 0..n)).await;
        assert_eq!(staged.chunks, 2);
        let (batch, seen) = watch(&server, &org, &staged.batch_id, Duration::from_secs(60)).await;
        let totals = batch.totals.unwrap();
        assert_eq!(
            (totals.committed, totals.committed_after_retry_resources, totals.aborted, totals.records_committed),
            (1, 1, 0, n as u64),
            "{totals:?}"
        );
        let chunks = chunk_statuses(&server, &org, &staged.batch_id).await;
        let split = &chunks[0];
        assert_eq!(state(split), pb::ChunkState::CommittedAfterRetryResources, "{split:?}");
        assert_eq!(split.records_committed, 100, "{split:?}");
        let parts = parts_of(split);
        assert!(parts.len() >= 3, "100 records of ~4,500 bytes in parts of at most 2,000: {parts:?}");
        assert!(parts.iter().all(|p| p.2 == pb::ChunkPartState::Committed), "{parts:?}");
        assert!(split.last_cause.contains("size budget of 2000 bytes"), "{split:?}");
        assert!(split.parts.iter().all(|p| p.finish_time.is_some()), "{split:?}");
        let whole = &chunks[1];
        assert_eq!((state(whole), whole.parts.len(), whole.records_committed), (pb::ChunkState::Committed, 0, 30));
        // WatchBatch's last status of the split chunk shows its parts
        let watched = seen.iter().rev().find(|c| c.index == 0).unwrap();
        assert_eq!(parts_of(watched), parts, "{watched:?}");
        assert_eq!(stored(&server.store_url, &org.id).await, (n as i64, 1, n as i64), "committed exactly once");
    }
}

/// One record over the size budget by itself: its chunk is split down to that record, which
/// alone is aborted (at the floor of 1 record) while every other part commits once. The chunk is
/// ABORTED, its cause names the record and the budget, ListChunkResults shows which ranges
/// committed and which did not, and the batch's totals count the committed parts' records.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_part_that_keeps_failing_aborts_its_chunk_while_the_other_parts_commit_once() {
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        let server = Server::start(backend, &["--chunk-max-bytes", "2000"]).await;
        let org = create_org(&server, "acme").await;
        let mut records = accounts("p", 0..16);
        let huge = "x".repeat(3000);
        records[5] = record(serde_json::json!({"code": "p000005", "name": huge, "amount": 5}));
        let staged = submit(&server, &org, header(16), records).await;
        let (batch, _) = watch(&server, &org, &staged.batch_id, Duration::from_secs(60)).await;
        let totals = batch.totals.unwrap();
        assert_eq!(
            (totals.aborted, totals.committed, totals.committed_after_retry_resources, totals.records_committed),
            (1, 0, 0, 15),
            "{totals:?}"
        );
        let aborted = results(&server, &org, &staged.batch_id).await;
        assert_eq!(aborted.len(), 1);
        assert!(aborted[0].errors.is_empty(), "no record is invalid: {aborted:?}");
        let chunk = aborted[0].chunk.clone().unwrap();
        assert_eq!((state(&chunk), chunk.records_committed), (pb::ChunkState::Aborted, 15), "{chunk:?}");
        let parts = parts_of(&chunk);
        let failed: Vec<_> = parts.iter().filter(|p| p.2 != pb::ChunkPartState::Committed).collect();
        assert_eq!(failed.len(), 1, "{parts:?}");
        assert_eq!((failed[0].0, failed[0].1, failed[0].2), (5, 1, pb::ChunkPartState::Aborted), "{parts:?}");
        assert!(failed[0].3.contains("over the size budget of 2000 bytes"), "{parts:?}");
        assert!(
            chunk.last_cause.contains("1 aborted") && chunk.last_cause.contains("records 5-5:"),
            "the cause names the aborted part: {chunk:?}"
        );
        let kept = server.records(&org.key, "account").await;
        let mut expected: Vec<String> = (0..16).filter(|i| *i != 5).map(|i| format!("p{i:06}")).collect();
        expected.sort();
        assert_eq!(kept.keys().cloned().collect::<Vec<_>>(), expected);
        assert_eq!(stored(&server.store_url, &org.id).await, (15, 1, 15), "each committed part once");
    }
}

/// A worker SIGKILLed in the middle of a split chunk, right after one part committed: the worker
/// that takes the session over skips the committed part (its marker is in the store, written
/// with its records) and runs the others; the chunk ends COMMITTED_AFTER_RETRY_RESOURCES, every
/// record stored once at version 1 with one change event, and the part committed before the kill
/// keeps the commit time it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_split_chunk_of_a_killed_worker_completes_exactly_once() {
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        let server = Server::start(backend, &["--workers", "0"]).await;
        let org = create_org(&server, "acme").await;
        let budget = ["--concurrency", "1", "--chunk-max-bytes", "2000"];
        // w1 holds the chunk once its first part has committed
        let first = worker_with_env(&server, "w1", &budget, &[("FAILPOINTS", "worker-after-part=sleep(60000)")]);
        eventually(Duration::from_secs(20), "w1 bound", || async {
            let mut client = pb::session_manager_client::SessionManagerClient::new(server.channel().await);
            let sessions = client.list_sessions(pb::ListSessionsRequest::default()).await.ok()?.into_inner().sessions;
            (!sessions.is_empty() && sessions.iter().all(|s| s.bound_server == "w1")).then_some(())
        })
        .await;
        let n = 100;
        let staged = submit(&server, &org, header(1000), accounts("k", 0..n)).await;
        assert_eq!(staged.chunks, 1);
        let before = eventually(Duration::from_secs(30), "a part committed by w1", || async {
            let chunk = chunk_statuses(&server, &org, &staged.batch_id).await.remove(0);
            chunk.parts.iter().any(|p| p.state == pb::ChunkPartState::Committed as i32).then_some(chunk)
        })
        .await;
        assert_eq!((state(&before), before.worker.as_str()), (pb::ChunkState::Running, "w1"), "{before:?}");
        let committed: Vec<pb::ChunkPart> =
            before.parts.iter().filter(|p| p.state == pb::ChunkPartState::Committed as i32).cloned().collect();
        assert_eq!(committed.len(), 1, "w1 holds after its first part: {before:?}");
        assert!(before.parts.iter().any(|p| p.state == pb::ChunkPartState::Pending as i32), "{before:?}");
        assert_eq!(before.records_committed, committed[0].records, "{before:?}");
        let (records_then, _, _) = stored(&server.store_url, &org.id).await;
        assert_eq!(records_then, i64::from(committed[0].records));
        drop(first); // SIGKILL, mid-split
        let _second = worker(&server, "w2", &budget);
        let (batch, _) = watch(&server, &org, &staged.batch_id, Duration::from_secs(90)).await;
        let totals = batch.totals.unwrap();
        assert_eq!(
            (totals.committed_after_retry_resources, totals.aborted, totals.records_committed),
            (1, 0, n as u64),
            "{totals:?}"
        );
        let chunk = chunk_statuses(&server, &org, &staged.batch_id).await.remove(0);
        assert_eq!((state(&chunk), chunk.worker.as_str()), (pb::ChunkState::CommittedAfterRetryResources, "w2"));
        let parts = parts_of(&chunk);
        assert!(parts.iter().all(|p| p.2 == pb::ChunkPartState::Committed), "{parts:?}");
        let again = chunk.parts.iter().find(|p| p.first_record == committed[0].first_record).unwrap();
        assert_eq!(again, &committed[0], "the part committed before the kill was not run again");
        assert_eq!(stored(&server.store_url, &org.id).await, (n as i64, 1, n as i64), "committed exactly once");
    }
}

/// The time path: a chunk whose attempts fail on their time budget (a failpoint: the first two
/// attempts end as over the budget) is retried once with an eight times larger budget, then
/// split in halves, each its own transaction; both commit: COMMITTED_AFTER_RETRY_RESOURCES with
/// two committed parts, four attempts (two whole, one per half), every record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunk_past_its_raised_time_budget_is_split_and_commits() {
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        let server = Server::start(backend, &["--workers", "0"]).await;
        let org = create_org(&server, "acme").await;
        let _worker = worker_with_env(&server, "w1", &[], &[("FAILPOINTS", "worker-chunk-attempt=2*return->off")]);
        let n = 300;
        let staged = submit(&server, &org, header(1000), accounts("t", 0..n)).await;
        let (batch, _) = watch(&server, &org, &staged.batch_id, Duration::from_secs(60)).await;
        let totals = batch.totals.unwrap();
        assert_eq!((totals.committed_after_retry_resources, totals.records_committed), (1, n as u64), "{totals:?}");
        let chunk = chunk_statuses(&server, &org, &staged.batch_id).await.remove(0);
        assert_eq!((state(&chunk), chunk.attempts), (pb::ChunkState::CommittedAfterRetryResources, 4), "{chunk:?}");
        let parts = parts_of(&chunk);
        assert_eq!(
            parts.iter().map(|p| (p.0, p.1, p.2)).collect::<Vec<_>>(),
            [(0, 150, pb::ChunkPartState::Committed), (150, 150, pb::ChunkPartState::Committed)],
            "{chunk:?}"
        );
        assert!(chunk.last_cause.contains("attempt 2 with a budget of 480s") && chunk.last_cause.contains("deadline"));
        assert_eq!(stored(&server.store_url, &org.id).await, (n as i64, 1, n as i64), "committed exactly once");
    }
}

/// Two managers on a real etcd, a `baton scheduler` and two `baton worker` processes with a size
/// budget that splits every chunk in eight: the primary manager is SIGKILLed twice while chunks
/// are split and their parts commit; the batch completes, every chunk
/// COMMITTED_AFTER_RETRY_RESOURCES and every record committed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn split_chunks_complete_exactly_once_across_primary_manager_kills() {
    let etcd = baton_tests::Etcd::start();
    let mut pair = ManagerPair::start(&etcd, &format!("/baton-split-test/{}", std::process::id())).await;
    let managers = pair.endpoints.clone();
    let data = TempDir::new();
    let url = format!("sqlite://{}/baton.db", data.path().display());
    let intake = intake_process(&url, &[]);
    let scheduler = scheduler_process(&url, &managers, &["--max-parallel", "4"]);
    // a chunk of 1,000 records is about 45,000 bytes: parts of 125 records
    let budget = ["--chunk-max-bytes", "8000"];
    let _workers: Vec<Server> = ["w1", "w2"].iter().map(|id| worker_process(&url, &managers, id, &budget)).collect();
    let org = create_org(&intake, "acme").await;
    let n = 40_000;
    let staged = submit(&scheduler, &org, header(1000), accounts("a", 0..n)).await;
    for kill in 0..2 {
        let done = eventually(Duration::from_secs(60), "chunks committing", || async {
            let rows = chunk_rows(&url, &staged.batch_id).await;
            let done = rows.iter().filter(|c| c.1 == "COMMITTED_AFTER_RETRY_RESOURCES").count();
            (done >= 8 * (kill + 1)).then_some(done)
        })
        .await;
        eprintln!("kill {kill}: {done} of 40 chunks done");
        pair.kill_primary().await;
    }
    let (batch, _) = watch(&scheduler, &org, &staged.batch_id, Duration::from_secs(180)).await;
    let totals = batch.totals.unwrap();
    assert_eq!(
        (totals.committed_after_retry_resources, totals.records_committed, totals.aborted),
        (40, n as u64, 0),
        "{totals:?}"
    );
    for c in chunk_statuses(&scheduler, &org, &staged.batch_id).await {
        let parts = parts_of(&c);
        assert!(parts.len() == 8 && parts.iter().all(|p| p.2 == pb::ChunkPartState::Committed), "{c:?}");
    }
    assert_eq!(stored(&url, &org.id).await, (n as i64, 1, n as i64), "committed exactly once");
}

/// The split floor: with `--chunk-split-floor 200`, a 300-record chunk whose first four attempts
/// fail on their time budget (a failpoint) is split once, into halves of 150; the first half
/// fails twice more and, at the floor, is aborted alone, while the second half commits. The
/// chunk is ABORTED with 150 records committed (once) and the cause names the floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_part_at_the_split_floor_that_keeps_failing_is_aborted_alone() {
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        let server = Server::start(backend, &["--workers", "0"]).await;
        let org = create_org(&server, "acme").await;
        let floor = ["--chunk-split-floor", "200"];
        let _worker = worker_with_env(&server, "w1", &floor, &[("FAILPOINTS", "worker-chunk-attempt=4*return->off")]);
        let n = 300;
        let staged = submit(&server, &org, header(1000), accounts("f", 0..n)).await;
        let (batch, _) = watch(&server, &org, &staged.batch_id, Duration::from_secs(60)).await;
        let totals = batch.totals.unwrap();
        assert_eq!((totals.aborted, totals.records_committed), (1, 150), "{totals:?}");
        let chunk = chunk_statuses(&server, &org, &staged.batch_id).await.remove(0);
        assert_eq!((state(&chunk), chunk.records_committed), (pb::ChunkState::Aborted, 150), "{chunk:?}");
        let parts = parts_of(&chunk);
        assert_eq!(
            parts.iter().map(|p| (p.0, p.1, p.2)).collect::<Vec<_>>(),
            [(0, 150, pb::ChunkPartState::Aborted), (150, 150, pb::ChunkPartState::Committed)],
            "{chunk:?}"
        );
        assert!(parts[0].3.contains("at the split floor of 200 record(s)"), "{chunk:?}");
        assert!(chunk.last_cause.contains("records 0-149:"), "{chunk:?}");
        let kept = server.records(&org.key, "account").await;
        assert!(kept.len() == 150 && kept.keys().all(|id| id.as_str() >= "f000150"), "{:?}", kept.keys());
        assert_eq!(stored(&server.store_url, &org.id).await, (150, 1, 150), "the committed half once");
    }
}
