//! Losing the store: a PostgreSQL cluster of the test's own is stopped and started again while
//! real-time writes go on. Every answer is OK or UNAVAILABLE with RetryInfo (never INTERNAL,
//! which tells clients not to retry), the mesh serves again once the database is back without
//! being restarted, and every acknowledged write is there afterwards.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_mesh::proto::v1 as pb;
use baton_store::Backend;
use baton_tests::postgres::Cluster;
use baton_tests::{Server, TempDir, authed, create_org, eventually, record};
use tonic::Code;
use tonic_types::StatusExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgresql_restart_under_load_answers_only_ok_or_unavailable_and_loses_nothing() {
    let Some(cluster) = Cluster::create("loss", &[]) else { return };
    let server = Server::start_at(Backend::Postgres, TempDir::new(), &cluster.url(), "127.0.0.1:0", &[]);
    let org = create_org(&server, "loss").await;

    // eight writers, each upserting its own records one at a time; every answer recorded
    let answers: Arc<Mutex<Vec<(Code, String, bool)>>> = Arc::default();
    let acknowledged: Arc<Mutex<BTreeMap<String, i64>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8 {
        let (mut intake, key) = (server.intake().await, org.key.clone());
        let (answers, acknowledged, stop) = (answers.clone(), acknowledged.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0u32;
            // bounded: the test stops it, and it never runs past a minute
            let until = Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < until {
                n += 1;
                let code = format!("w{w}-{n:05}");
                let request = pb::UpsertRequest {
                    object: "account".into(),
                    records: vec![record(serde_json::json!({"code": code, "name": "n", "amount": n}))],
                };
                let mut request = authed(request, &key);
                request.set_timeout(Duration::from_secs(10));
                match intake.upsert(request).await {
                    Ok(_) => {
                        acknowledged.lock().unwrap().insert(code, i64::from(n));
                        answers.lock().unwrap().push((Code::Ok, String::new(), false));
                    }
                    Err(status) => {
                        let retry = status.get_details_retry_info().is_some();
                        answers.lock().unwrap().push((status.code(), status.message().to_owned(), retry));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.ctl("stop");
    tokio::time::sleep(Duration::from_secs(8)).await;
    cluster.ctl("start");
    let restarted = answers.lock().unwrap().len();
    // the mesh serves again by itself: writes succeed after the restart
    eventually(Duration::from_secs(30), "writes acknowledged after the restart", || async {
        let answers = answers.lock().unwrap();
        (answers[restarted.min(answers.len())..].iter().filter(|(code, _, _)| *code == Code::Ok).count() >= 20)
            .then_some(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }

    let answers = answers.lock().unwrap().clone();
    let unavailable: Vec<_> = answers.iter().filter(|(code, _, _)| *code == Code::Unavailable).collect();
    let others: Vec<_> = answers.iter().filter(|(code, _, _)| !matches!(code, Code::Ok | Code::Unavailable)).collect();
    assert!(others.is_empty(), "answers other than OK or UNAVAILABLE: {others:?}");
    assert!(!unavailable.is_empty(), "the restart was never seen: {} answers, all OK", answers.len());
    assert!(unavailable.iter().all(|(_, _, retry)| *retry), "an UNAVAILABLE without RetryInfo: {unavailable:?}");

    // every acknowledged write is there
    let acknowledged = acknowledged.lock().unwrap().clone();
    let mut intake = server.intake().await;
    for (code, amount) in &acknowledged {
        let request = authed(pb::GetRequest { object: "account".into(), id: code.clone() }, &org.key);
        let got = intake.get(request).await.unwrap_or_else(|e| panic!("acknowledged {code} lost: {e:?}")).into_inner();
        let stored = got.fields["amount"].kind.clone();
        assert_eq!(stored, Some(pb::value::Kind::IntegerValue(*amount)), "{code}");
    }
    eprintln!(
        "{} answers: {} OK ({} records checked), {} UNAVAILABLE",
        answers.len(),
        answers.len() - unavailable.len(),
        acknowledged.len(),
        unavailable.len()
    );
}
