//! Exports end to end, on the real binary, SQLite and PostgreSQL: the first portion at once, the
//! rest produced by workers as parts (through the session manager) and fetched; exactly once
//! across writes, a killed worker and a killed primary manager; tokens bound to their org,
//! expiry, cancellation; the CLI's resumable download.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use baton_mesh::proto::v1 as pb;
use baton_scheduler::client::submit_batch;
use baton_store::Backend;
use baton_tests::mirror::{Mirror, apply, apply_change, live};
use baton_tests::{
    ManagerPair, S3, Server, TempDir, TestOrg, authed, backends, baton_bin, create_org, eventually, fields_json,
    intake_process, record, scheduler_process, worker, worker_process,
};
use tonic::Code;
use tonic_types::StatusExt;

/// Loads `range` accounts through a batch, waiting until it is committed.
async fn load(server: &Server, org: &TestOrg, range: std::ops::Range<usize>) {
    let records: Vec<_> = range
        .clone()
        .map(|i| record(serde_json::json!({"code": format!("a{i:06}"), "name": format!("n{i}"), "amount": i})))
        .collect();
    let header = pb::BatchHeader {
        object: "account".into(),
        operation: pb::BatchOperation::Upsert as i32,
        chunk_size: 10_000,
        ..Default::default()
    };
    let staged = submit_batch(server.channel().await, &org.key, header, records, |_| {}).await.unwrap();
    let client = pb::scheduler_client::SchedulerClient::new(server.channel().await);
    let total = range.len() as u64;
    eventually(Duration::from_secs(180), "the load batch", || {
        let mut client = client.clone();
        let id = staged.batch_id.clone();
        async move {
            let batch = client.get_batch(authed(pb::GetBatchRequest { batch_id: id }, &org.key)).await.unwrap();
            let totals = batch.into_inner().totals.unwrap();
            assert_eq!(totals.aborted, 0, "{totals:?}");
            (totals.records_committed == total).then_some(())
        }
    })
    .await;
}

fn export_request(filter: &str, sync_rows: u32, part_rows: u32) -> pb::ExportRequest {
    pb::ExportRequest { object: "account".into(), filter: filter.into(), sync_rows, part_rows, ..Default::default() }
}

/// Follows WatchExport to its end (at most `within`); the last status.
async fn watch(server: &Server, org: &TestOrg, token: &str, within: Duration) -> pb::ExportStatus {
    let mut client = server.intake().await;
    let request = authed(pb::WatchExportRequest { token: token.into() }, &org.key);
    let mut stream = client.watch_export(request).await.unwrap().into_inner();
    let deadline = tokio::time::Instant::now() + within;
    let mut last = None;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => panic!("export not done within {within:?}: {last:?}"),
            Ok(Ok(Some(status))) => last = Some(status),
            Ok(Ok(None)) => return last.expect("at least one status"),
            Ok(Err(status)) => panic!("watch failed: {status:?}"),
        }
    }
}

/// Every row of part `n`.
async fn fetch(server: &Server, org: &TestOrg, token: &str, n: u32) -> Result<Vec<pb::Record>, tonic::Status> {
    let mut client = server.intake().await.max_decoding_message_size(64 * 1024 * 1024);
    let request = authed(pb::FetchPartRequest { token: token.into(), part: n }, &org.key);
    let mut stream = client.fetch_part(request).await?.into_inner();
    let mut rows = Vec::new();
    while let Some(frame) = stream.message().await? {
        rows.extend(frame.records);
    }
    Ok(rows)
}

/// The ids of the first portion and of every part, in order.
async fn all_ids(server: &Server, org: &TestOrg, first: &[pb::Record], token: &str, parts: u32) -> Vec<String> {
    let mut ids: Vec<String> = first.iter().map(|r| r.id.clone()).collect();
    for n in 0..parts {
        ids.extend(fetch(server, org, token, n).await.unwrap().into_iter().map(|r| r.id));
    }
    ids
}

fn expect_exactly(ids: &[String], expected: impl IntoIterator<Item = usize>) {
    let mut seen = BTreeSet::new();
    for id in ids {
        assert!(seen.insert(id.clone()), "{id} exported twice");
    }
    let expected: BTreeSet<String> = expected.into_iter().map(|i| format!("a{i:06}")).collect();
    assert_eq!(seen.len(), expected.len(), "exported {} records, expected {}", seen.len(), expected.len());
    assert!(seen == expected, "the exported set differs from the matching set");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "not in id order");
}

/// 100,000 records on each backend: the first 1,000 at once and the rest in parts, each record
/// once; a small export completes synchronously; a filtered export is exactly the filtered set;
/// writes during an export neither duplicate nor drop a record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exports_answer_the_first_rows_at_once_and_every_record_once() {
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        let server = Server::in_process(backend, &["--workers", "2", "--export-parallel", "2"]).await;
        let org = create_org(&server, "acme").await;
        let n = 100_000;
        load(&server, &org, 0..n).await;
        let mut client = server.intake().await.max_decoding_message_size(64 * 1024 * 1024);

        // a small export: complete, no token
        let small = client.export(authed(export_request("amount < 50", 0, 0), &org.key)).await.unwrap().into_inner();
        assert!(small.complete && small.token.is_empty() && small.export_id.is_empty(), "{:?}", small.status);
        assert_eq!(small.records.len(), 50);

        // the whole object: 1,000 rows at once, then parts
        let started = Instant::now();
        let big = client.export(authed(export_request("", 0, 20_000), &org.key)).await.unwrap().into_inner();
        let first_latency = started.elapsed();
        assert!(!big.complete && big.token.starts_with("xt_"), "{big:?}");
        assert_eq!(big.records.len(), 1000);
        assert_eq!(big.reason, pb::ExportReason::LargeResults as i32);
        assert_eq!(big.as_of_seq, n as i64);
        assert!(big.estimated_total >= 1000, "{}", big.estimated_total);
        eprintln!("first portion of {n} in {first_latency:?}");
        let done = watch(&server, &org, &big.token, Duration::from_secs(180)).await;
        assert_eq!(done.state, pb::ExportState::Complete as i32, "{done:?}");
        assert!(done.total_known && done.parts_total == 5, "{done:?}");
        assert_eq!((done.estimated_total, done.first_rows + done.rows_ready), (n as i64, n as i64));
        let ids = all_ids(&server, &org, &big.records, &big.token, done.parts_total).await;
        expect_exactly(&ids, 0..n);
        // a part is stable: read again, the same rows
        assert_eq!(
            fetch(&server, &org, &big.token, 3).await.unwrap(),
            fetch(&server, &org, &big.token, 3).await.unwrap()
        );
        // every row typed as the schema says: the integer field as an integer, never a double
        let part = fetch(&server, &org, &big.token, 3).await.unwrap();
        assert_eq!(part.len(), 20_000);
        assert!(
            part.iter().all(|r| matches!(r.fields["amount"].kind, Some(pb::value::Kind::IntegerValue(_)))),
            "{:?}",
            part.first()
        );
        let beyond = fetch(&server, &org, &big.token, 5).await.unwrap_err();
        assert_eq!(beyond.code(), Code::OutOfRange, "{beyond:?}");

        // a filter: exactly the matching set, across parts
        let filter = "amount >= 25000 AND amount < 75000 AND NOT code IN ('a030000', 'a030001')";
        let filtered = client.export(authed(export_request(filter, 500, 7_000), &org.key)).await.unwrap().into_inner();
        let done = watch(&server, &org, &filtered.token, Duration::from_secs(180)).await;
        let ids = all_ids(&server, &org, &filtered.records, &filtered.token, done.parts_total).await;
        expect_exactly(&ids, (25_000..75_000).filter(|i| *i != 30_000 && *i != 30_001));

        // writes during an export: updates on both sides of the cursor, and new records
        let during = client.export(authed(export_request("", 1000, 2_000), &org.key)).await.unwrap().into_inner();
        let mut writer = server.intake().await;
        for round in 0..20usize {
            let records = (0..50)
                .map(|k| {
                    let i = (round * 4_999 + k * 1_973) % n;
                    record(
                        serde_json::json!({"code": format!("a{i:06}"), "name": format!("changed{round}"), "amount": i}),
                    )
                })
                .chain((0..5).map(|k| {
                    let i = n + round * 5 + k;
                    record(serde_json::json!({"code": format!("a{i:06}"), "name": "new", "amount": i}))
                }))
                .collect();
            writer.upsert(authed(pb::UpsertRequest { object: "account".into(), records }, &org.key)).await.unwrap();
        }
        let done = watch(&server, &org, &during.token, Duration::from_secs(180)).await;
        assert_eq!(done.state, pb::ExportState::Complete as i32);
        let ids = all_ids(&server, &org, &during.records, &during.token, done.parts_total).await;
        let mut seen = BTreeSet::new();
        for id in &ids {
            assert!(seen.insert(id.as_str()), "{id} exported twice during writes");
        }
        for i in 0..n {
            assert!(seen.contains(format!("a{i:06}").as_str()), "a{i:06} dropped during writes");
        }
    }
}

/// A token works only with its org's key; a guessed one is NOT_FOUND; an expired export is
/// NOT_FOUND `EXPIRED` and its blobs are deleted; a cancelled export produces no further part.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_are_bound_to_their_org_expire_and_cancel() {
    let flags = ["--workers", "1", "--concurrency", "1", "--export-parallel", "1", "--export-retention", "8s"];
    let server = Server::in_process(Backend::Sqlite, &flags).await;
    let (a, b) = (create_org(&server, "a").await, create_org(&server, "b").await);
    load(&server, &a, 0..40_000).await;
    let mut client = server.intake().await;
    let export = client.export(authed(export_request("", 100, 500), &a.key)).await.unwrap().into_inner();
    for (token, key, what) in [(&export.token, &b.key, "another org's key"), (&"xt_00ff".to_owned(), &a.key, "a guess")]
    {
        let status = client.get_export(authed(pb::GetExportRequest { token: token.clone() }, key)).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{what}: {status:?}");
        let status = fetch(&server, &TestOrg { key: key.clone(), ..a.clone() }, token, 0).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{what}: {status:?}");
    }

    // cancel once a few parts are out: no part is produced after
    let get = |token: String| {
        let mut client = client.clone();
        let key = a.key.clone();
        async move { client.get_export(authed(pb::GetExportRequest { token }, &key)).await.unwrap().into_inner() }
    };
    eventually(Duration::from_secs(60), "a few parts", || async {
        (get(export.token.clone()).await.parts_ready >= 3).then_some(())
    })
    .await;
    let cancelled = client
        .clone()
        .cancel_export(authed(pb::CancelExportRequest { token: export.token.clone() }, &a.key))
        .await
        .unwrap();
    assert_eq!(cancelled.get_ref().state, pb::ExportState::Cancelled as i32);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = get(export.token.clone()).await;
    assert!(after.parts_ready <= cancelled.get_ref().parts_ready + 1, "parts after the cancel: {after:?}");
    assert!(after.parts_ready < after.parts_total, "{after:?}");
    let never = fetch(&server, &a, &export.token, after.parts_total - 1).await.unwrap_err();
    assert_eq!(never.code(), Code::FailedPrecondition, "{never:?}");
    assert_eq!(fetch(&server, &a, &export.token, 0).await.unwrap().len(), 500, "produced parts stay readable");

    // past its retention: NOT_FOUND, reason EXPIRED; the sweep deletes the blobs (which are
    // there until then: an empty or wrong directory would prove nothing)
    let blobs = server.data_dir().join("blobs").join("exports").join(&export.export_id);
    let before = std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0);
    assert!(before as u32 >= after.parts_ready, "{before} blobs under {} for {after:?}", blobs.display());
    let status = eventually(Duration::from_secs(20), "expiry", || {
        let mut client = client.clone();
        let request = authed(pb::GetExportRequest { token: export.token.clone() }, &a.key);
        async move { client.get_export(request).await.err() }
    })
    .await;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(status.get_details_error_info().map(|i| i.reason).as_deref(), Some("EXPIRED"));
    assert!(status.message().contains("expired"), "{status:?}");
    eventually(Duration::from_secs(20), "the parts deleted", || async {
        let left = std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0);
        (left == 0).then_some(())
    })
    .await;
}

/// Two managers on a real etcd, intake, scheduler and two `baton worker` processes: a worker is
/// SIGKILLed while producing parts, then the primary manager; the export completes, every record
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_export_completes_across_a_killed_worker_and_a_killed_primary_manager() {
    let etcd = baton_tests::Etcd::start();
    let mut pair = ManagerPair::start(&etcd, &format!("/baton-export-test/{}", std::process::id())).await;
    let managers = pair.endpoints.clone();
    let data = TempDir::new();
    let url = format!("sqlite://{}/baton.db", data.path().display());
    let blobs = data.path().join("blobs");
    let blob_flag = ["--blobs", blobs.to_str().unwrap()];
    let intake = intake_process(&url, &blob_flag);
    let scheduler = scheduler_process(&url, &managers, &[&blob_flag[..], &["--export-parallel", "2"]].concat());
    let mut workers: BTreeMap<&str, Server> =
        ["w1", "w2"].into_iter().map(|id| (id, worker_process(&url, &managers, id, &blob_flag))).collect();
    let org = create_org(&intake, "acme").await;
    let n = 60_000;
    load(&scheduler, &org, 0..n).await;
    let mut client = intake.intake().await.max_decoding_message_size(64 * 1024 * 1024);
    let export = client.export(authed(export_request("", 1000, 1_000), &org.key)).await.unwrap().into_inner();
    let ready = |at_least: u32| {
        let mut client = client.clone();
        let (key, token) = (org.key.clone(), export.token.clone());
        async move {
            let status = client.get_export(authed(pb::GetExportRequest { token }, &key)).await.unwrap().into_inner();
            (status.parts_ready >= at_least).then_some(())
        }
    };
    eventually(Duration::from_secs(60), "parts under way", || ready(4)).await;
    // SIGKILL a worker while it is producing a part (it has started one and not recorded it)
    sqlx::any::install_default_drivers();
    let pool = sqlx::any::AnyPoolOptions::new().max_connections(1).connect(&url).await.unwrap();
    let producing = "SELECT number, worker FROM export_parts WHERE worker <> '' AND state = 'RELEASED'";
    let deadline = Instant::now() + Duration::from_secs(60);
    let (part, victim) = loop {
        let row: Option<(i64, String)> = sqlx::query_as(producing).fetch_optional(&pool).await.unwrap();
        if let Some((part, worker)) = row {
            let victim: &str = if worker == "w1" { "w1" } else { "w2" };
            drop(workers.remove(victim));
            // the worker may have recorded the part between the query and its death: then the
            // kill interrupted nothing, and the next part it starts is tried
            let state: String = sqlx::query_scalar("SELECT state FROM export_parts WHERE number = $1")
                .bind(part)
                .fetch_one(&pool)
                .await
                .unwrap();
            if state == "RELEASED" {
                break (part, victim);
            }
            workers.insert(victim, worker_process(&url, &managers, victim, &blob_flag));
        }
        assert!(Instant::now() < deadline, "no worker caught producing a part");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    eventually(Duration::from_secs(60), "parts after the worker kill", || ready(15)).await;
    pair.kill_primary().await;
    workers.insert(victim, worker_process(&url, &managers, victim, &blob_flag));
    let done = watch(&intake, &org, &export.token, Duration::from_secs(240)).await;
    assert_eq!(done.state, pb::ExportState::Complete as i32, "{done:?}");
    assert_eq!(done.parts_total, 59);
    let ids = all_ids(&intake, &org, &export.records, &export.token, done.parts_total).await;
    expect_exactly(&ids, 0..n);
    let attempts: i64 = sqlx::query_scalar("SELECT attempts FROM export_parts WHERE number = $1")
        .bind(part)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(attempts >= 2, "part {part}, interrupted by the kill, was produced again ({attempts} attempts)");
}

/// `baton export` killed mid-download and run again with the token writes the same file as an
/// uninterrupted run; CSV output has a header and a row per record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_resumes_a_download_from_its_token() {
    let flags = ["--workers", "1", "--concurrency", "1", "--export-parallel", "1"];
    let server = Server::in_process(Backend::Sqlite, &flags).await;
    let org = create_org(&server, "acme").await;
    let n = 30_000;
    load(&server, &org, 0..n).await;
    let out = TempDir::new();
    let endpoint = format!("http://{}", server.addr);
    let export = |file: &str, extra: &[&str]| {
        let mut command = std::process::Command::new(baton_bin());
        command
            .args(["export", "--endpoint", &endpoint, "--api-key", &org.key, "--quiet", "--parallel", "1"])
            .arg("--out")
            .arg(out.path().join(file))
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        command
    };
    // interrupted: killed once a few parts are down
    let mut child = export("resumed.ndjson", &["account", "--part-rows", "400"]).spawn().unwrap();
    let parts = out.path().join("resumed.ndjson.parts");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let count = std::fs::read_dir(&parts).map(|d| d.count()).unwrap_or(0);
        if count >= 6 {
            break;
        }
        assert!(Instant::now() < deadline, "no parts downloaded");
        assert!(child.try_wait().unwrap().is_none(), "the export finished before it could be interrupted");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out.path().join("resumed.ndjson").exists(), "killed after it finished");
    let token = std::fs::read_to_string(parts.join("token")).unwrap().trim().to_owned();
    let resumed = export("resumed.ndjson", &["--token", &token]).output().unwrap();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert!(String::from_utf8_lossy(&resumed.stderr).contains("resuming"));
    let whole = export("whole.ndjson", &["account", "--part-rows", "5000"]).output().unwrap();
    assert!(whole.status.success(), "{}", String::from_utf8_lossy(&whole.stderr));
    let (a, b) = (
        std::fs::read(out.path().join("resumed.ndjson")).unwrap(),
        std::fs::read(out.path().join("whole.ndjson")).unwrap(),
    );
    assert_eq!(a.iter().filter(|c| **c == b'\n').count(), n, "one line per record");
    assert!(a == b, "the resumed download differs from an uninterrupted one");
    assert!(!parts.exists(), "the parts directory is removed once the file is written");
    // a token that this directory did not start is refused with a clear message
    let stranger = export("other.ndjson", &["--token", &token]).output().unwrap();
    assert!(!stranger.status.success());
    assert!(String::from_utf8_lossy(&stranger.stderr).contains("first portion"));

    let csv = export("accounts.csv", &["account", "--filter", "amount < 1500", "--sync-rows", "100"]).output().unwrap();
    assert!(csv.status.success(), "{}", String::from_utf8_lossy(&csv.stderr));
    let text = std::fs::read_to_string(out.path().join("accounts.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("id,amount,code,name"));
    assert_eq!(lines.count(), 1500);
}

/// A first portion that cannot be read within the real-time deadline: the export goes
/// asynchronous at once with reason LONG_RUNNING and no rows, and its parts hold every matching
/// record. With `wait`, Export answers once the export is complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_first_portion_goes_long_running_and_wait_answers_the_finished_export() {
    // the records are loaded by a batch, which the real-time deadline does not bound
    let server = Server::in_process(Backend::Sqlite, &["--deadline", "1ms"]).await;
    let org = create_org(&server, "acme").await;
    load(&server, &org, 0..30_000).await;
    let mut client = server.intake().await.max_decoding_message_size(64 * 1024 * 1024);
    // a filter on a field with no index: the first portion means scanning the whole object
    let filter = "amount >= 29000";
    let slow = client.export(authed(export_request(filter, 0, 400), &org.key)).await.unwrap().into_inner();
    assert_eq!(slow.reason, pb::ExportReason::LongRunning as i32, "{slow:?}");
    assert!(slow.records.is_empty() && !slow.complete && slow.token.starts_with("xt_"), "{slow:?}");
    let done = watch(&server, &org, &slow.token, Duration::from_secs(120)).await;
    assert_eq!(done.state, pb::ExportState::Complete as i32, "{done:?}");
    assert_eq!((done.first_rows, done.rows_ready, done.parts_total), (0, 1000, 3), "{done:?}");
    expect_exactly(&all_ids(&server, &org, &slow.records, &slow.token, done.parts_total).await, 29_000..30_000);

    let request = pb::ExportRequest { wait: true, ..export_request(filter, 0, 400) };
    let waited = client.export(authed(request, &org.key)).await.unwrap().into_inner();
    let status = waited.status.clone().expect("a status with wait");
    assert_eq!(status.state, pb::ExportState::Complete as i32, "wait answers the finished export: {status:?}");
    assert_eq!((status.rows_ready, status.parts_total, status.parts.len()), (1000, 3, 3), "{status:?}");
    expect_exactly(&all_ids(&server, &org, &waited.records, &waited.token, 3).await, 29_000..30_000);
}

/// Parts in an S3-compatible store (moto on loopback): written there by the workers, read from
/// there by FetchPart, deleted from the bucket when the export expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parts_go_through_an_s3_compatible_store() {
    let Some(s3) = S3::start("baton-parts") else { return };
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let flags = ["--blobs", "s3://baton-parts/exports", "--export-retention", "8s"];
    let server = Server::start_with_env(Backend::Sqlite, &flags, &env).await;
    let org = create_org(&server, "acme").await;
    load(&server, &org, 0..30_000).await;
    let mut client = server.intake().await.max_decoding_message_size(64 * 1024 * 1024);
    let export = client.export(authed(export_request("", 1000, 10_000), &org.key)).await.unwrap().into_inner();
    let done = watch(&server, &org, &export.token, Duration::from_secs(120)).await;
    assert_eq!((done.state, done.parts_total), (pb::ExportState::Complete as i32, 3), "{done:?}");
    let prefix = format!("exports/exports/{}/", export.export_id);
    let keys = s3.keys(&prefix);
    assert_eq!(keys.len(), 3, "one object per part in the bucket: {keys:?}");
    assert!(!server.data_dir().join("blobs").exists(), "nothing written to the local default");
    expect_exactly(&all_ids(&server, &org, &export.records, &export.token, 3).await, 0..30_000);

    let status = eventually(Duration::from_secs(20), "expiry", || {
        let mut client = client.clone();
        let request = authed(pb::GetExportRequest { token: export.token.clone() }, &org.key);
        async move { client.get_export(request).await.err() }
    })
    .await;
    assert_eq!(status.get_details_error_info().map(|i| i.reason).as_deref(), Some("EXPIRED"));
    eventually(Duration::from_secs(20), "the objects deleted", || async { s3.keys(&prefix).is_empty().then_some(()) })
        .await;
}

/// Upserts `records` of `account`; the last seq.
async fn upsert(
    intake: &mut pb::intake_client::IntakeClient<tonic::transport::Channel>,
    key: &str,
    records: Vec<serde_json::Value>,
) -> i64 {
    let request = pb::UpsertRequest { object: "account".into(), records: records.into_iter().map(record).collect() };
    intake.upsert(authed(request, key)).await.unwrap().into_inner().last_seq
}

/// The mirror hand-off, as a client builds it: an export of the object (its first portion, then
/// its parts through FetchPart) while writers upsert, update and delete, then Extract from the
/// export's `as_of_seq`, every change applied with the version guard until the last write. The
/// mirror equals the source exactly: ids, fields and versions. The parts are produced only after
/// writes past `as_of_seq` (their worker starts late), so parts hold rows newer than changes that
/// follow, which the guard skips. A complete export says its `as_of_seq` too. Both backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_export_then_extract_after_its_as_of_seq_builds_an_exact_mirror() {
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        let server = Arc::new(Server::start(backend, &["--workers", "0"]).await);
        let org = Arc::new(create_org(&server, "acme").await);
        let mut intake = server.intake().await.max_decoding_message_size(64 * 1024 * 1024);
        let n = 10_000;
        for start in (0..n).step_by(200) {
            let records = (start..start + 200)
                .map(|i| serde_json::json!({"code": format!("a{i:06}"), "name": "v1", "amount": i}));
            upsert(&mut intake, &org.key, records.collect()).await;
        }
        // the writers: updates, deletes and new records over the whole id range (but the two
        // records this test changes itself), until told to stop
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut writers = Vec::new();
        for w in 0..3u64 {
            let (server, org, stop, written) = (server.clone(), org.clone(), stop.clone(), written.clone());
            writers.push(tokio::spawn(async move {
                let mut intake = server.intake().await;
                let mut done = 0u64;
                for k in 0..5_000u64 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let i = (k * 7_919 + w * 3_001) % 11_000;
                    if i == 8_000 || i == 9_000 {
                        continue;
                    }
                    let id = format!("a{i:06}");
                    if k % 5 == 2 {
                        let request = pb::DeleteRequest { object: "account".into(), ids: vec![id] };
                        intake.delete(authed(request, &org.key)).await.unwrap();
                    } else {
                        let fields = serde_json::json!({"code": id, "name": format!("w{w}k{k}"), "amount": k});
                        let request = pb::UpsertRequest { object: "account".into(), records: vec![record(fields)] };
                        intake.upsert(authed(request, &org.key)).await.unwrap();
                    }
                    done += 1;
                    written.fetch_add(1, Ordering::Relaxed);
                }
                done
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;

        // the export: the first portion at once; no worker yet, so no part is produced
        let export = intake.export(authed(export_request("", 500, 1_000), &org.key)).await.unwrap().into_inner();
        assert!(!export.complete && export.records.len() == 500, "{:?}", export.status);
        let as_of_seq = export.as_of_seq;
        let written_at_mark = written.load(Ordering::Relaxed);
        assert!(as_of_seq >= (n / 200) as i64, "{as_of_seq}");
        let mut mirror = Mirror::new();
        let mut exported = BTreeSet::new();
        let mut take = |mirror: &mut Mirror, rows: &[pb::Record]| {
            for r in rows {
                assert!(exported.insert(r.id.clone()), "{} exported twice", r.id);
                apply(mirror, &r.id, r.version, Some(fields_json(&r.fields)));
            }
        };
        take(&mut mirror, &export.records);
        // past the mark, before any part is read: a record of a part's range updated, another deleted
        let changed =
            upsert(&mut intake, &org.key, vec![serde_json::json!({"code": "a009000", "name": "after the mark"})]).await;
        assert!(changed > as_of_seq);
        let request = pb::DeleteRequest { object: "account".into(), ids: vec!["a008000".into()] };
        intake.delete(authed(request, &org.key)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let blobs = server.data_dir().join("blobs");
        let _worker = worker(&server, "w-mirror", &["--blobs", blobs.to_str().unwrap()]);
        let done = watch(&server, &org, &export.token, Duration::from_secs(180)).await;
        assert_eq!(done.state, pb::ExportState::Complete as i32, "{done:?}");
        assert!(done.parts_total >= 5, "{done:?}");
        for part in 0..done.parts_total {
            take(&mut mirror, &fetch(&server, &org, &export.token, part).await.unwrap());
        }
        assert_eq!(mirror["a009000"].0, 2, "the part was read after the update");
        assert!(!mirror.contains_key("a008000"), "the part was read after the delete");

        // the writers stop once they wrote 150 more times after the mark (one in five a delete,
        // which may find nothing: more than 100 changes; the export, watched without polling,
        // may end sooner than that), then one last write marks the end
        let before = written_at_mark;
        eventually(Duration::from_secs(60), "150 writes past the mark", || {
            let written = written.load(Ordering::Relaxed);
            async move { (written >= before + 150).then_some(()) }
        })
        .await;
        stop.store(true, Ordering::Relaxed);
        let mut writes = 0;
        for w in writers {
            writes += w.await.unwrap();
        }
        let last = upsert(&mut intake, &org.key, vec![serde_json::json!({"code": "sentinel", "name": "end"})]).await;
        assert!(last - as_of_seq > 100, "writes went on during the export ({writes} writes)");

        // the changes after the mark, in order and without a gap, version-guarded
        let request = pb::ExtractRequest { objects: vec!["account".into()], after_seq: Some(as_of_seq), chunk_size: 0 };
        let mut stream = server.sync().await.extract(authed(request, &org.key)).await.unwrap().into_inner();
        let (mut next, mut written, mut skipped) = (as_of_seq + 1, 0, 0);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while next <= last {
            assert!(tokio::time::Instant::now() < deadline, "Extract did not reach seq {last} within 60s (at {next})");
            let message =
                tokio::time::timeout(Duration::from_secs(20), stream.message()).await.unwrap().unwrap().unwrap();
            let Some(pb::extract_response::Kind::Changes(batch)) = message.kind else {
                panic!("after_seq streams changes only: {message:?}")
            };
            for c in &batch.changes {
                assert_eq!(c.seq, next, "no gap and no repeat after as_of_seq");
                next += 1;
                if apply_change(&mut mirror, c) {
                    written += 1;
                } else {
                    skipped += 1;
                }
            }
        }
        drop(stream);
        eprintln!(
            "as_of_seq {as_of_seq}, {} parts, {writes} concurrent writes; after the mark {written} changes applied, \
             {skipped} older than the mirror",
            done.parts_total
        );
        assert!(written > 0 && skipped > 0, "changes applied ({written}) and older than the parts' rows ({skipped})");
        assert_eq!(
            live(&mirror),
            server.records(&org.key, "account").await,
            "the mirror equals the source ({backend:?})"
        );

        // a complete export carries its as_of_seq too
        let small = intake.export(authed(export_request("amount < 3", 0, 0), &org.key)).await.unwrap().into_inner();
        assert!(small.complete, "{small:?}");
        assert_eq!(small.as_of_seq, last);
    }
}
