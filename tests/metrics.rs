//! The metrics contract: after a little of every kind of work (a batch with an aborted chunk,
//! an export in parts, a sync link), `/metrics` of a real `baton dev` exports every metric of the
//! catalog (`baton_mesh::telemetry::METRICS`) with its HELP and its type (histograms as
//! histograms), and every metric the Grafana dashboard and the alert rules in `deploy/` name.

use std::collections::BTreeSet;
use std::time::Duration;

use baton_mesh::proto::v1 as pb;
use baton_mesh::telemetry::{Kind, METRICS};
use baton_scheduler::client::submit_batch;
use baton_store::Backend;
use baton_tests::{Server, authed, create_org, eventually, record};

/// The metric names in `text`: every word that starts `baton_` or `process_`.
fn named(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("baton_") || w.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

/// The sample names of a Prometheus text (`name{…} value` or `name value`).
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_the_catalog_the_dashboard_and_the_alerts_is_exported_with_its_help() {
    let server = Server::start(Backend::Sqlite, &[]).await;
    let a = create_org(&server, "metrics-a").await;
    let b = create_org(&server, "metrics-b").await;

    // a batch of 50 in chunks of 10, one record invalid: committed chunks and an aborted one
    let mut records: Vec<_> =
        (0..50).map(|i| record(serde_json::json!({"code": format!("m{i:03}"), "name": format!("n{i}")}))).collect();
    records[3] = record(serde_json::json!({"code": "bad"}));
    let header = pb::BatchHeader {
        object: "account".into(),
        operation: pb::BatchOperation::Upsert as i32,
        chunk_size: 10,
        ..Default::default()
    };
    let batch = submit_batch(server.channel().await, &a.key, header, records, |_| {}).await.unwrap().batch_id;
    let scheduler = pb::scheduler_client::SchedulerClient::new(server.channel().await);
    eventually(Duration::from_secs(60), "the batch done", || {
        let (mut scheduler, id, key) = (scheduler.clone(), batch.clone(), a.key.clone());
        async move {
            let batch =
                scheduler.get_batch(authed(pb::GetBatchRequest { batch_id: id }, &key)).await.ok()?.into_inner();
            (batch.state == pb::BatchState::Done as i32).then_some(())
        }
    })
    .await;

    // an export in parts of 10, one part fetched
    let mut intake = server.intake().await;
    let request = pb::ExportRequest { object: "account".into(), sync_rows: 10, part_rows: 10, ..Default::default() };
    let token = intake.export(authed(request, &a.key)).await.unwrap().into_inner().token;
    let request = authed(pb::FetchPartRequest { token: token.clone(), part: 0 }, &a.key);
    let mut part = intake.fetch_part(request).await.unwrap().into_inner();
    while part.message().await.unwrap().is_some() {}
    // and watched to its end
    let request = authed(pb::WatchExportRequest { token: token.clone() }, &a.key);
    let mut watch = intake.watch_export(request).await.unwrap().into_inner();
    let watched = async { while watch.message().await.unwrap().is_some() {} };
    tokio::time::timeout(Duration::from_secs(60), watched).await.expect("the export ends within 60 s");

    // a link from a to b
    let link = pb::CreateLinkRequest {
        target_endpoint: format!("http://{}", server.addr),
        target_api_key: b.key.clone(),
        ..Default::default()
    };
    server.sync().await.create_link(authed(link, &a.key)).await.unwrap();

    // every catalog metric once the samplers have run (links every 5 s, chunks every 10 s)
    let text = eventually(Duration::from_secs(30), "every catalog metric exported", || async {
        let text = server.metrics_text();
        let names = exported(&text);
        let missing: Vec<_> = METRICS
            .iter()
            .filter(|m| {
                let sample = match m.kind {
                    Kind::Histogram(_) => format!("{}_bucket", m.name),
                    _ => m.name.to_owned(),
                };
                !names.contains(&sample)
            })
            .map(|m| m.name)
            .collect();
        if missing.is_empty() {
            Some(text)
        } else {
            eprintln!("not yet exported: {missing:?}");
            None
        }
    })
    .await;
    for m in METRICS {
        assert!(text.contains(&format!("# HELP {} ", m.name)), "{} has no HELP", m.name);
        let kind = match m.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram(_) => "histogram",
        };
        assert!(text.contains(&format!("# TYPE {} {kind}", m.name)), "{} is not a {kind}", m.name);
    }
    for process in ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"] {
        assert!(text.contains(&format!("# HELP {process} ")), "{process} missing");
    }

    // what the dashboard and the alert rules name is exported (a histogram by its series)
    let names = exported(&text);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for file in ["deploy/grafana/baton-dashboard.json", "deploy/prometheus/alerts.yaml"] {
        let used = named(&std::fs::read_to_string(root.join(file)).unwrap());
        assert!(used.len() >= 8, "{file} names {used:?}");
        for name in used {
            assert!(names.contains(&name), "{file} names {name}, which /metrics does not export");
        }
    }
}
