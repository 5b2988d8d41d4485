//! End-to-end tests of sync on the real binary: extraction under concurrent writes, and links
//! between two `baton dev` deployments through suspension, verification, flapping, rejection and
//! a killed sync process.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use baton_mesh::proto::v1 as pb;
use baton_store::Backend;
use baton_tests::mirror::{Mirror, apply, apply_change, live};
use baton_tests::{ADMIN_TOKEN, Server, TestOrg, authed, backends, create_org, eventually, fields_json, record};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tonic::Code;
use tonic_types::StatusExt;

async fn upsert(server: &Server, org: &TestOrg, records: Vec<serde_json::Value>) -> i64 {
    let request = pb::UpsertRequest { object: "account".into(), records: records.into_iter().map(record).collect() };
    server.intake().await.upsert(authed(request, &org.key)).await.unwrap().into_inner().last_seq
}

async fn delete(server: &Server, org: &TestOrg, ids: Vec<String>) {
    let request = pb::DeleteRequest { object: "account".into(), ids };
    server.intake().await.delete(authed(request, &org.key)).await.unwrap();
}

/// Writers upsert, update and delete during the whole extraction; the snapshot plus the changes
/// after the high-water mark, applied with the version guard, equal the source at the end, and
/// the changes after the mark come without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn extraction_under_concurrent_writes_has_no_gap() {
    for backend in backends() {
        let server = Arc::new(Server::in_process(backend, &[]).await);
        let org = Arc::new(create_org(&server, "acme").await);
        for batch in 0..10 {
            let records =
                (0..100).map(|i| json!({"code": format!("r{:04}", batch * 100 + i), "name": "initial"})).collect();
            upsert(&server, &org, records).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..3 {
            let (server, org, stop) = (server.clone(), org.clone(), stop.clone());
            writers.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) && n < 2_000 {
                    let id = format!("r{:04}", (n * 37 + w * 101) % 1200);
                    if n % 7 == 3 {
                        delete(&server, &org, vec![id]).await;
                    } else {
                        upsert(&server, &org, vec![json!({"code": id, "name": format!("w{w}n{n}")})]).await;
                    }
                    n += 1;
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let request = pb::ExtractRequest { objects: vec![], after_seq: None, chunk_size: 20 };
        let mut stream = server.sync().await.extract(authed(request, &org.key)).await.unwrap().into_inner();
        let mut mirror = Mirror::new();
        let mut high_water = None;
        let mut snapshot_done = false;
        let mut next_seq = 0;
        let mut sentinel = None;
        let mut chunks = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            assert!(tokio::time::Instant::now() < deadline, "extraction did not catch up within 60s");
            let message =
                tokio::time::timeout(Duration::from_secs(20), stream.message()).await.unwrap().unwrap().unwrap();
            match message.kind.unwrap() {
                pb::extract_response::Kind::HighWater(hw) => {
                    assert!(high_water.is_none(), "one high-water mark, first");
                    high_water = Some(hw.seq);
                    next_seq = hw.seq + 1;
                }
                pb::extract_response::Kind::Snapshot(chunk) => {
                    assert!(high_water.is_some() && !snapshot_done);
                    chunks += 1;
                    // a consumer slower than the writers, so that the snapshot overlaps them
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    for r in chunk.records {
                        apply(&mut mirror, &r.id, r.version, Some(fields_json(&r.fields)));
                    }
                }
                pb::extract_response::Kind::SnapshotDone(_) => {
                    snapshot_done = true;
                    // the snapshot is over: stop the writers, then mark the end with one last write
                    stop.store(true, Ordering::Relaxed);
                    for w in std::mem::take(&mut writers) {
                        w.await.unwrap();
                    }
                    sentinel = Some(upsert(&server, &org, vec![json!({"code": "sentinel", "name": "end"})]).await);
                }
                pb::extract_response::Kind::Changes(batch) => {
                    assert!(snapshot_done, "changes come after the snapshot");
                    for c in batch.changes {
                        assert_eq!(c.seq, next_seq, "no gap and no repeat in the changes after the mark");
                        next_seq += 1;
                        apply_change(&mut mirror, &c);
                    }
                    if sentinel.is_some_and(|s| next_seq > s) {
                        break;
                    }
                }
            }
        }
        assert!(chunks > 5, "the snapshot came in chunks while writers ran ({chunks})");
        assert!(next_seq - 1 > high_water.unwrap() + 10, "writes happened during the extraction");
        assert_eq!(
            live(&mirror),
            server.records(&org.key, "account").await,
            "the mirror equals the source ({backend:?})"
        );
    }
}

#[tokio::test]
async fn a_trimmed_seq_answers_out_of_range() {
    let server = Server::in_process(Backend::Sqlite, &["--change-retention", "1s"]).await;
    let org = create_org(&server, "acme").await;
    upsert(&server, &org, vec![json!({"code": "a", "name": "A"})]).await;
    let status = eventually(Duration::from_secs(10), "the change log to be trimmed", || async {
        let request = pb::ExtractRequest { objects: vec![], after_seq: Some(0), chunk_size: 0 };
        server.sync().await.extract(authed(request, &org.key)).await.err()
    })
    .await;
    assert_eq!(status.code(), Code::OutOfRange);
    assert_eq!(status.get_details_error_info().unwrap().reason, "CHANGES_TRIMMED");
    // a fresh extraction still works, from a new high-water mark
    let request = pb::ExtractRequest { objects: vec![], after_seq: None, chunk_size: 0 };
    let mut stream = server.sync().await.extract(authed(request, &org.key)).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(first.kind, Some(pb::extract_response::Kind::HighWater(pb::HighWater { seq: 1 }))));
}

async fn link(server: &Server, org: &TestOrg, id: &str) -> pb::Link {
    server
        .sync()
        .await
        .get_link(authed(pb::GetLinkRequest { link_id: id.into() }, &org.key))
        .await
        .unwrap()
        .into_inner()
}

async fn wait_state(server: &Server, org: &TestOrg, id: &str, state: pb::LinkState, within: Duration) -> pb::Link {
    eventually(within, &format!("link state {state:?}"), || async {
        let l = link(server, org, id).await;
        (l.state == state as i32).then_some(l)
    })
    .await
}

async fn history(server: &Server, org: &TestOrg, id: &str) -> Vec<(pb::LinkState, pb::LinkState, String)> {
    // a page of one transition at a time, so that every call follows the pages
    let (mut events, mut page_token) = (Vec::new(), String::new());
    for _ in 0..1000 {
        let request = pb::ListLinkHistoryRequest { link_id: id.into(), page_size: 1, page_token };
        let page = server.sync().await.list_link_history(authed(request, &org.key)).await.unwrap().into_inner();
        assert!(page.events.len() <= 1, "a page holds at most page_size: {page:?}");
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    events
        .into_iter()
        .map(|e| (pb::LinkState::try_from(e.from).unwrap(), pb::LinkState::try_from(e.to).unwrap(), e.cause))
        .collect()
}

async fn converge(source: &Server, a: &TestOrg, target: &Server, b: &TestOrg) {
    let expected = source.records(&a.key, "account").await;
    eventually(Duration::from_secs(30), "the target to converge", || async {
        (target.records(&b.key, "account").await == expected).then_some(())
    })
    .await;
}

async fn create_link(
    source: &Server,
    a: &TestOrg,
    target: std::net::SocketAddr,
    key: &str,
    threshold: i32,
    interval_ms: i64,
) -> String {
    create_link_with(source, a, target, key, threshold, interval_ms, pb::TrimmedPolicy::Unspecified).await
}

/// [`create_link`] naming what the link does behind the trimmed change log.
async fn create_link_with(
    source: &Server,
    a: &TestOrg,
    target: std::net::SocketAddr,
    key: &str,
    threshold: i32,
    interval_ms: i64,
    on_trimmed: pb::TrimmedPolicy,
) -> String {
    let request = pb::CreateLinkRequest {
        target_endpoint: format!("http://{target}"),
        target_api_key: key.into(),
        objects: vec![],
        verify_threshold: threshold,
        probe_interval: Some(baton_mesh::proto::duration(interval_ms as u64)),
        on_reject: 0,
        on_trimmed: on_trimmed as i32,
        target_ca_pem: String::new(),
    };
    source.sync().await.create_link(authed(request, &a.key)).await.unwrap().into_inner().id
}

/// A link converges; the target is killed: SUSPENDED while writes go on; the target comes back:
/// VERIFYING, then STREAMING after exactly the threshold of successful probes; it converges.
#[tokio::test]
async fn a_link_suspends_while_the_target_is_down_and_resumes_after_the_threshold() {
    let source = Server::start(Backend::Sqlite, &[]).await;
    let target = Server::start(Backend::Sqlite, &[]).await;
    let a = create_org(&source, "a").await;
    let b = create_org(&target, "b").await;
    for batch in 0..3 {
        upsert(
            &source,
            &a,
            (0..150).map(|i| json!({"code": format!("r{batch}-{i}"), "name": "v1", "amount": i})).collect(),
        )
        .await;
    }
    let id = create_link(&source, &a, target.addr, &b.key, 3, 200).await;
    wait_state(&source, &a, &id, pb::LinkState::Streaming, Duration::from_secs(20)).await;
    converge(&source, &a, &target, &b).await;

    let (dir, url, addr) = target.kill();
    upsert(&source, &a, (0..50).map(|i| json!({"code": format!("r0-{i}"), "name": "v2"})).collect()).await;
    delete(&source, &a, (0..20).map(|i| format!("r1-{i}")).collect()).await;
    upsert(&source, &a, (0..30).map(|i| json!({"code": format!("new-{i}"), "name": "v1"})).collect()).await;
    let suspended = wait_state(&source, &a, &id, pb::LinkState::Suspended, Duration::from_secs(20)).await;
    assert!(suspended.last_cause.starts_with("connection failure"), "{}", suspended.last_cause);
    assert!(suspended.lag_seq > 0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        link(&source, &a, &id).await.state,
        pb::LinkState::Suspended as i32,
        "no resume while the target is down"
    );

    let target = Server::start_at(Backend::Sqlite, dir, &url, &addr.to_string(), &[]);
    wait_state(&source, &a, &id, pb::LinkState::Streaming, Duration::from_secs(30)).await;
    converge(&source, &a, &target, &b).await;
    let h = history(&source, &a, &id).await;
    let n = h.len();
    use pb::LinkState::*;
    assert_eq!((h[n - 3].0, h[n - 3].1), (Streaming, Suspended), "{h:?}");
    assert_eq!((h[n - 2].0, h[n - 2].1), (Suspended, Verifying), "{h:?}");
    assert_eq!(h[n - 2].2, "the target answered probe 1/3");
    assert_eq!((h[n - 1].0, h[n - 1].1), (Verifying, Streaming), "{h:?}");
    assert_eq!(h[n - 1].2, "3 consecutive successful probes (threshold 3)");
    assert_eq!(link(&source, &a, &id).await.lag_seq, 0);
}

/// A TCP proxy the test can take down (refusing connections and cutting open ones) and up again.
struct Proxy {
    addr: std::net::SocketAddr,
    task: Option<JoinHandle<()>>,
    upstream: std::net::SocketAddr,
}

impl Proxy {
    async fn start(upstream: std::net::SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut proxy = Proxy { addr, task: None, upstream };
        proxy.serve(listener);
        proxy
    }

    fn serve(&mut self, listener: TcpListener) {
        let upstream = self.upstream;
        self.task = Some(tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { return };
                connections.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }

    /// Refuses new connections and cuts the open ones (dropping the task drops them all).
    async fn down(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    async fn up(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }
}

/// A target that comes up for less than the threshold and goes down again, several times, never
/// lets the link resume; each time the history shows SUSPENDED → VERIFYING → SUSPENDED. Once it
/// stays up, the link resumes and converges.
#[tokio::test]
async fn a_flapping_target_never_resumes_until_it_stays_up() {
    let source = Server::start(Backend::Sqlite, &[]).await;
    let target = Server::start(Backend::Sqlite, &[]).await;
    let a = create_org(&source, "a").await;
    let b = create_org(&target, "b").await;
    let mut proxy = Proxy::start(target.addr).await;
    upsert(&source, &a, (0..50).map(|i| json!({"code": format!("r{i}"), "name": "v1"})).collect()).await;
    let id = create_link(&source, &a, proxy.addr, &b.key, 4, 150).await;
    wait_state(&source, &a, &id, pb::LinkState::Streaming, Duration::from_secs(20)).await;
    converge(&source, &a, &target, &b).await;

    proxy.down().await;
    upsert(&source, &a, (0..10).map(|i| json!({"code": format!("r{i}"), "name": "v2"})).collect()).await;
    wait_state(&source, &a, &id, pb::LinkState::Suspended, Duration::from_secs(20)).await;
    for _ in 0..3 {
        proxy.up().await;
        // up only until the link starts verifying: fewer successes than the threshold of 4
        let verifying = wait_state(&source, &a, &id, pb::LinkState::Verifying, Duration::from_secs(30)).await;
        proxy.down().await;
        assert!(verifying.consecutive_ok < 4, "{verifying:?}");
        wait_state(&source, &a, &id, pb::LinkState::Suspended, Duration::from_secs(20)).await;
    }
    let h = history(&source, &a, &id).await;
    use pb::LinkState::*;
    let after_first_suspension: Vec<_> =
        h.iter().skip_while(|(_, to, _)| *to != Suspended).map(|(from, to, _)| (*from, *to)).collect();
    assert_eq!(
        after_first_suspension,
        vec![
            (Streaming, Suspended),
            (Suspended, Verifying),
            (Verifying, Suspended),
            (Suspended, Verifying),
            (Verifying, Suspended),
            (Suspended, Verifying),
            (Verifying, Suspended),
        ],
        "{h:?}"
    );
    proxy.up().await;
    wait_state(&source, &a, &id, pb::LinkState::Streaming, Duration::from_secs(30)).await;
    converge(&source, &a, &target, &b).await;
    let h = history(&source, &a, &id).await;
    assert_eq!(h.last().unwrap().2, "4 consecutive successful probes (threshold 4)");
}

/// A change the target's schema rejects becomes a dead letter and the link goes on; a revoked
/// target key makes the link FAILED, not SUSPENDED.
#[tokio::test]
async fn rejections_dead_letter_and_a_revoked_key_fails_the_link() {
    let source = Server::in_process(Backend::Sqlite, &[]).await;
    let target = Server::in_process(Backend::Sqlite, &[]).await;
    let a = create_org(&source, "a").await;
    let b = create_org(&target, "b").await;
    upsert(
        &source,
        &a,
        vec![json!({"code": "ok1", "name": "fine"}), json!({"code": "taken", "name": "x", "email": "e@x"})],
    )
    .await;
    // the target already has another record holding that email: the replicated one is rejected
    upsert(&target, &b, vec![json!({"code": "local", "name": "target's own", "email": "e@x"})]).await;
    let id = create_link(&source, &a, target.addr, &b.key, 3, 200).await;
    wait_state(&source, &a, &id, pb::LinkState::Streaming, Duration::from_secs(20)).await;
    upsert(&source, &a, vec![json!({"code": "ok2", "name": "fine"})]).await;
    eventually(Duration::from_secs(20), "ok2 on the target", || async {
        target.records(&b.key, "account").await.contains_key("ok2").then_some(())
    })
    .await;
    let request = pb::ListDeadLettersRequest { link_id: id.clone(), ..Default::default() };
    let letters =
        source.sync().await.list_dead_letters(authed(request, &a.key)).await.unwrap().into_inner().dead_letters;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!((letters[0].record_id.as_str(), letters[0].object.as_str()), ("taken", "account"));
    assert!(letters[0].reason.contains("already used by record \"local\""), "{}", letters[0].reason);
    assert_eq!(link(&source, &a, &id).await.dead_letters, 1);

    let mut admin = target.admin().await;
    admin.revoke_api_key(authed(pb::RevokeApiKeyRequest { key_id: b.key_id.clone() }, ADMIN_TOKEN)).await.unwrap();
    upsert(&source, &a, vec![json!({"code": "ok3", "name": "fine"})]).await;
    let failed = wait_state(&source, &a, &id, pb::LinkState::Failed, Duration::from_secs(20)).await;
    assert!(failed.last_cause.contains("Unauthenticated"), "{}", failed.last_cause);
    assert!(history(&source, &a, &id).await.iter().all(|(_, to, _)| *to != pb::LinkState::Suspended));
}

/// The source adds a field (UpdateObject) that the target's schema lacks: a change carrying it is
/// dead-lettered with a reason naming the field, the link keeps STREAMING (a schema mismatch is
/// not a link failure), and changes without it still apply. Once the target adds the field too,
/// the next change carrying it applies.
#[tokio::test]
async fn a_field_the_target_lacks_dead_letters_the_change_naming_it() {
    let source = Server::in_process(Backend::Sqlite, &[]).await;
    let target = Server::in_process(Backend::Sqlite, &[]).await;
    let a = create_org(&source, "a").await;
    let b = create_org(&target, "b").await;
    upsert(&source, &a, vec![json!({"code": "before", "name": "old"})]).await;
    let id = create_link(&source, &a, target.addr, &b.key, 3, 200).await;
    wait_state(&source, &a, &id, pb::LinkState::Streaming, Duration::from_secs(20)).await;
    converge(&source, &a, &target, &b).await;

    let mut schema = baton_tests::account_schema();
    schema.fields.push(pb::FieldSpec {
        name: "nickname".into(),
        r#type: pb::FieldType::String as i32,
        ..Default::default()
    });
    let update = |org: &TestOrg| pb::UpdateObjectRequest { org_id: org.id.clone(), schema: Some(schema.clone()) };
    let v2 = source.admin().await.update_object(authed(update(&a), ADMIN_TOKEN)).await.unwrap().into_inner();
    assert_eq!(v2.version, 2);
    upsert(&source, &a, vec![json!({"code": "nick", "name": "n", "nickname": "nicky"})]).await;
    upsert(&source, &a, vec![json!({"code": "plain", "name": "p"})]).await;
    eventually(Duration::from_secs(20), "plain on the target", || async {
        target.records(&b.key, "account").await.contains_key("plain").then_some(())
    })
    .await;
    async fn letters(source: &Server, a: &TestOrg, id: &str) -> Vec<pb::DeadLetter> {
        let request = pb::ListDeadLettersRequest { link_id: id.into(), ..Default::default() };
        source.sync().await.list_dead_letters(authed(request, &a.key)).await.unwrap().into_inner().dead_letters
    }
    let dead = letters(&source, &a, &id).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!((dead[0].record_id.as_str(), dead[0].object.as_str()), ("nick", "account"));
    assert!(dead[0].reason.contains("nickname: unknown field of object account"), "{}", dead[0].reason);
    let l = link(&source, &a, &id).await;
    assert_eq!((l.state, l.dead_letters), (pb::LinkState::Streaming as i32, 1));
    assert!(!target.records(&b.key, "account").await.contains_key("nick"));

    // the target catches up with the source's schema: the next change carrying the field applies
    let v2 = target.admin().await.update_object(authed(update(&b), ADMIN_TOKEN)).await.unwrap().into_inner();
    assert_eq!(v2.version, 2);
    upsert(&source, &a, vec![json!({"code": "nick", "name": "n", "nickname": "nick 2"})]).await;
    eventually(Duration::from_secs(20), "nick on the target", || async {
        let records = target.records(&b.key, "account").await;
        records.get("nick").filter(|(_, fields)| fields["nickname"] == "nick 2").map(|_| ())
    })
    .await;
    assert_eq!(letters(&source, &a, &id).await.len(), 1);
    assert!(
        history(&source, &a, &id)
            .await
            .iter()
            .all(|(_, to, _)| *to == pb::LinkState::Streaming || *to == pb::LinkState::Bootstrapping)
    );
}

/// The sync process (here the whole source deployment) SIGKILLed while streaming: restarted, the
/// link resumes from its cursor; the target converges, and no change was applied twice (each
/// record's versions rise strictly in the target's own change log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_sync_process_resumes_from_its_cursor() {
    let source = Server::start(Backend::Sqlite, &[]).await;
    let target = Server::start(Backend::Sqlite, &[]).await;
    let a = create_org(&source, "a").await;
    let b = create_org(&target, "b").await;
    upsert(&source, &a, (0..100).map(|i| json!({"code": format!("r{i}"), "name": "v0"})).collect()).await;
    let id = create_link(&source, &a, target.addr, &b.key, 3, 200).await;
    wait_state(&source, &a, &id, pb::LinkState::Streaming, Duration::from_secs(20)).await;
    for round in 1..=20 {
        upsert(&source, &a, (0..100).map(|i| json!({"code": format!("r{i}"), "name": format!("v{round}")})).collect())
            .await;
    }
    let source = source.restart(&[]);
    for round in 21..=25 {
        upsert(&source, &a, (0..100).map(|i| json!({"code": format!("r{i}"), "name": format!("v{round}")})).collect())
            .await;
    }
    converge(&source, &a, &target, &b).await;
    assert_eq!(link(&source, &a, &id).await.state, pb::LinkState::Streaming as i32);
    // the target's own change log: every record's versions strictly rise, none applied twice
    let request = pb::ExtractRequest { objects: vec![], after_seq: Some(0), chunk_size: 0 };
    let mut stream = target.sync().await.extract(authed(request, &b.key)).await.unwrap().into_inner();
    let mut versions: BTreeMap<String, i64> = BTreeMap::new();
    let mut seen = 0;
    while seen < 100 * 26 {
        let Ok(Some(Ok(message))) =
            tokio::time::timeout(Duration::from_secs(5), stream.message()).await.map(|m| m.transpose())
        else {
            break;
        };
        if let Some(pb::extract_response::Kind::Changes(batch)) = message.kind {
            for c in batch.changes {
                let last = versions.entry(c.record_id.clone()).or_insert(0);
                assert!(c.version > *last, "record {} applied version {} after {}", c.record_id, c.version, last);
                *last = c.version;
                seen += 1;
            }
        }
    }
    assert!(versions.values().all(|v| *v == 26), "every record reached version 26: {versions:?}");
}

/// Waits until the source's change log no longer holds every change after `seq` (Extract from
/// there answers OUT_OF_RANGE `CHANGES_TRIMMED`).
async fn wait_trimmed_past(source: &Server, a: &TestOrg, seq: i64) {
    eventually(Duration::from_secs(20), &format!("the change log trimmed past seq {seq}"), || async {
        let request = pb::ExtractRequest { objects: vec![], after_seq: Some(seq), chunk_size: 0 };
        match source.sync().await.extract(authed(request, &a.key)).await {
            Err(status) if status.code() == Code::OutOfRange => {
                assert_eq!(status.get_details_error_info().unwrap().reason, "CHANGES_TRIMMED");
                Some(())
            }
            _ => None,
        }
    })
    .await;
}

/// The oldest seq the log kept, from the cause a link records when its cursor `cursor` fell
/// behind it (`cursor C is behind the trimmed change log (oldest kept seq N)` + `tail`).
fn oldest_kept(cause: &str, cursor: i64, tail: &str) -> i64 {
    let head = format!("cursor {cursor} is behind the trimmed change log (oldest kept seq ");
    let rest = cause.strip_prefix(&head).unwrap_or_else(|| panic!("{cause:?} does not start with {head:?}"));
    let rest = rest.strip_suffix(tail).unwrap_or_else(|| panic!("{cause:?} does not end with {tail:?}"));
    rest.strip_suffix(')').and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no seq in {cause:?}"))
}

/// While the target is down, the source trims its change log past the link's cursor (updates,
/// deletes and new records among the trimmed changes). When the target is back the link, by
/// default, bootstraps again by itself: a new high-water mark, the snapshot with its tombstones,
/// then the changes after the mark. The history says why; the target equals the source (the
/// records deleted meanwhile deleted there too), and later changes stream as before. Both
/// backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_behind_the_trimmed_log_bootstraps_again_and_converges() {
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        let source = Server::start(backend, &["--change-retention", "1s"]).await;
        let target = Server::start(backend, &[]).await;
        let a = create_org(&source, "a").await;
        let b = create_org(&target, "b").await;
        for batch in 0..3 {
            let records = (0..150).map(|i| json!({"code": format!("r{batch}-{i}"), "name": "v1", "amount": i}));
            upsert(&source, &a, records.collect()).await;
        }
        let id = create_link(&source, &a, target.addr, &b.key, 3, 200).await;
        let created = link(&source, &a, &id).await;
        assert_eq!(created.on_trimmed, pb::TrimmedPolicy::Rebootstrap as i32, "the server's default");
        wait_state(&source, &a, &id, pb::LinkState::Streaming, Duration::from_secs(20)).await;
        converge(&source, &a, &target, &b).await;

        let (dir, url, addr) = target.kill();
        upsert(&source, &a, (0..50).map(|i| json!({"code": format!("r0-{i}"), "name": "v2"})).collect()).await;
        delete(&source, &a, (0..20).map(|i| format!("r1-{i}")).collect()).await;
        let high_water =
            upsert(&source, &a, (0..30).map(|i| json!({"code": format!("new-{i}"), "name": "v1"})).collect()).await;
        let suspended = wait_state(&source, &a, &id, pb::LinkState::Suspended, Duration::from_secs(20)).await;
        let cursor = suspended.cursor_seq;
        assert!(cursor < high_water, "{suspended:?}");
        wait_trimmed_past(&source, &a, cursor).await;

        let target = Server::start_at(backend, dir, &url, &addr.to_string(), &[]);
        converge(&source, &a, &target, &b).await;
        let streaming = wait_state(&source, &a, &id, pb::LinkState::Streaming, Duration::from_secs(30)).await;
        assert_eq!((streaming.cursor_seq, streaming.lag_seq), (high_water, 0));
        let gone = target.records(&b.key, "account").await;
        assert!((0..20).all(|i| !gone.contains_key(&format!("r1-{i}"))), "the deletes reached the target");
        let h = history(&source, &a, &id).await;
        use pb::LinkState::*;
        let since: Vec<_> = h.iter().skip_while(|(_, to, _)| *to != Suspended).collect();
        let states: Vec<_> = since.iter().map(|(from, to, _)| (*from, *to)).collect();
        assert_eq!(
            states,
            [
                (Streaming, Suspended),
                (Suspended, Verifying),
                (Verifying, Streaming),
                (Streaming, Bootstrapping),
                (Bootstrapping, Streaming)
            ],
            "{h:?}"
        );
        let oldest = oldest_kept(&since[3].2, cursor, ": re-bootstrapping");
        assert!(oldest > cursor + 1 && oldest <= high_water + 1, "{h:?}");
        assert_eq!(
            since[4].2,
            format!("snapshot of 460 rows and 20 tombstones applied; streaming after seq {high_water}")
        );

        // streaming again after the new mark
        upsert(&source, &a, (0..10).map(|i| json!({"code": format!("r2-{i}"), "name": "v3"})).collect()).await;
        delete(&source, &a, vec!["new-0".into()]).await;
        converge(&source, &a, &target, &b).await;
        assert_eq!(link(&source, &a, &id).await.state, pb::LinkState::Streaming as i32);
    }
}

/// The other setting: a server started with `BATON_LINK_ON_TRIMMED=fail` makes its links
/// (those that name no policy) FAILED behind the trimmed log, and they stay FAILED until a person
/// resumes them; a link of the same server that asks to re-bootstrap does, side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_the_trimmed_log_a_link_set_to_fail_fails_and_waits_for_a_person() {
    let source =
        Server::start_with_env(Backend::Sqlite, &["--change-retention", "1s"], &[("BATON_LINK_ON_TRIMMED", "fail")])
            .await;
    let target = Server::start(Backend::Sqlite, &[]).await;
    let a = create_org(&source, "a").await;
    let (b1, b2) = (create_org(&target, "b1").await, create_org(&target, "b2").await);
    upsert(&source, &a, (0..100).map(|i| json!({"code": format!("r{i}"), "name": "v1"})).collect()).await;
    let failing = create_link(&source, &a, target.addr, &b1.key, 3, 200).await;
    let healing = create_link_with(&source, &a, target.addr, &b2.key, 3, 200, pb::TrimmedPolicy::Rebootstrap).await;
    assert_eq!(link(&source, &a, &failing).await.on_trimmed, pb::TrimmedPolicy::Fail as i32);
    assert_eq!(link(&source, &a, &healing).await.on_trimmed, pb::TrimmedPolicy::Rebootstrap as i32);
    for id in [&failing, &healing] {
        wait_state(&source, &a, id, pb::LinkState::Streaming, Duration::from_secs(20)).await;
    }
    converge(&source, &a, &target, &b1).await;
    converge(&source, &a, &target, &b2).await;

    let (dir, url, addr) = target.kill();
    upsert(&source, &a, (0..20).map(|i| json!({"code": format!("r{i}"), "name": "v2"})).collect()).await;
    delete(&source, &a, (90..100).map(|i| format!("r{i}")).collect()).await;
    let high_water = upsert(&source, &a, vec![json!({"code": "late", "name": "v1"})]).await;
    let mut cursors = Vec::new();
    for id in [&failing, &healing] {
        cursors.push(wait_state(&source, &a, id, pb::LinkState::Suspended, Duration::from_secs(20)).await.cursor_seq);
    }
    wait_trimmed_past(&source, &a, *cursors.iter().max().unwrap()).await;

    let target = Server::start_at(Backend::Sqlite, dir, &url, &addr.to_string(), &[]);
    let failed = wait_state(&source, &a, &failing, pb::LinkState::Failed, Duration::from_secs(30)).await;
    let oldest = oldest_kept(&failed.last_cause, cursors[0], "; resume the link to bootstrap again");
    assert!(oldest > cursors[0] + 1 && oldest <= high_water + 1, "{}", failed.last_cause);
    converge(&source, &a, &target, &b2).await;
    let h = history(&source, &a, &healing).await;
    assert!(
        h.iter().any(|(from, to, cause)| (*from, *to) == (pb::LinkState::Streaming, pb::LinkState::Bootstrapping)
            && cause.ends_with(": re-bootstrapping")),
        "{h:?}"
    );
    // the failed link stays failed: nothing of the trimmed changes reaches its target
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(link(&source, &a, &failing).await.state, pb::LinkState::Failed as i32);
    let stale = target.records(&b1.key, "account").await;
    assert!(stale.contains_key("r95") && !stale.contains_key("late"), "{stale:?}");

    // a person resumes it: it bootstraps again and converges
    let request = pb::ResumeLinkRequest { link_id: failing.clone() };
    let resumed = source.sync().await.resume_link(authed(request, &a.key)).await.unwrap().into_inner();
    assert_ne!(resumed.state, pb::LinkState::Failed as i32);
    converge(&source, &a, &target, &b1).await;
    wait_state(&source, &a, &failing, pb::LinkState::Streaming, Duration::from_secs(20)).await;
    let h = history(&source, &a, &failing).await;
    let tail: Vec<_> = h[h.len() - 3..].iter().map(|(from, to, cause)| (*from, *to, cause.as_str())).collect();
    use pb::LinkState::*;
    assert_eq!(tail[0], (Streaming, Failed, failed.last_cause.as_str()), "{h:?}");
    assert_eq!(tail[1], (Failed, Bootstrapping, "resumed by hand"), "{h:?}");
    assert_eq!((tail[2].0, tail[2].1), (Bootstrapping, Streaming), "{h:?}");
}

/// The change log's reads by the followers, summed (`baton_change_log_reads_total`).
fn change_log_reads(server: &Server) -> f64 {
    let text = server.metrics_text();
    text.lines()
        .filter(|l| l.starts_with("baton_change_log_reads_total"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Commits are pushed to the change log's followers: with the fallback poll at its longest
/// (10 s), a caught-up link and a caught-up Extract stream each carry a new change within a
/// second of its commit, ten times over; and while nothing is written, neither reads the change
/// log at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_are_woken_by_commits_and_read_nothing_while_idle() {
    for backend in backends() {
        let source = Server::start(backend, &["--change-poll", "10s"]).await;
        let target = Server::start(backend, &[]).await;
        let (a, b) = (create_org(&source, "source").await, create_org(&target, "target").await);
        let after_seq = upsert(&source, &a, vec![json!({"code": "r0", "name": "first"})]).await;
        let id = create_link(&source, &a, target.addr, &b.key, 1, 200).await;
        wait_state(&source, &a, &id, pb::LinkState::Streaming, Duration::from_secs(30)).await;
        converge(&source, &a, &target, &b).await;
        let request = pb::ExtractRequest { objects: vec![], after_seq: Some(after_seq), chunk_size: 100 };
        let mut stream = source.sync().await.extract(authed(request, &a.key)).await.unwrap().into_inner();
        // both followers caught up and waiting
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut worst = (Duration::ZERO, Duration::ZERO);
        for n in 1..=10 {
            let code = format!("r{n}");
            let seq = upsert(&source, &a, vec![json!({"code": code, "name": "pushed"})]).await;
            let committed = tokio::time::Instant::now();
            let message =
                tokio::time::timeout(Duration::from_secs(1), stream.message()).await.unwrap().unwrap().unwrap();
            let Some(pb::extract_response::Kind::Changes(batch)) = message.kind else {
                panic!("{backend:?}: expected changes, got {message:?}")
            };
            assert_eq!(batch.changes.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![seq], "{backend:?}");
            let extracted = committed.elapsed();
            let mut found = None;
            for _ in 0..200 {
                let request = pb::GetRequest { object: "account".into(), id: code.clone() };
                if target.intake().await.get(authed(request, &b.key)).await.is_ok() {
                    found = Some(committed.elapsed());
                    break;
                }
                if committed.elapsed() > Duration::from_secs(1) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let linked = found.unwrap_or_else(|| panic!("{backend:?}: {code} not on the target within 1s"));
            worst = (worst.0.max(extracted), worst.1.max(linked));
        }
        eprintln!("{backend:?}: slowest of 10: extract {:?}, link {:?} after the commit", worst.0, worst.1);
        // idle: the link's cursor moved past the last change, then nothing is read
        eventually(Duration::from_secs(10), "the link's lag to be 0", || async {
            (link(&source, &a, &id).await.lag_seq == 0).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = change_log_reads(&source);
        assert!(before > 0.0, "{backend:?}: the followers' reads are counted");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle = change_log_reads(&source) - before;
        assert_eq!(idle, 0.0, "{backend:?}: the change log was read {idle} times in 3 s of idleness");
        drop(stream);
    }
}
