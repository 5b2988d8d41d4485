//! End-to-end tests of the session lifecycle on the real binary (`baton manager serve`): sessions
//! closed by their client or expired by the manager leave its state, its journal and its
//! snapshots; a session a client names is found again by a restarted client process with what
//! was queued meanwhile and its restart data; a server's restart data saved without a reply goes
//! to the server that takes its session over.

use std::time::Duration;

use baton_manager_client::{ClientSession, Connector, ServerEvent, ServerSession};
use baton_mesh::proto::v1 as pb;
use baton_tests::{Server, TempDir};

fn payload(n: u64) -> prost_types::Any {
    prost_types::Any { type_url: "baton.test/echo".into(), value: n.to_be_bytes().to_vec() }
}

fn start_manager(dir: &TempDir, extra: &[&str]) -> Server {
    let mut args = vec!["--server-grace", "300ms"];
    args.extend_from_slice(extra);
    Server::manager_alone(dir, &args)
}

async fn manager_client(
    server: &Server,
) -> pb::session_manager_client::SessionManagerClient<tonic::transport::Channel> {
    pb::session_manager_client::SessionManagerClient::new(server.channel().await)
}

async fn get_session(server: &Server, id: &str) -> Result<pb::SessionInfo, tonic::Status> {
    let request = pb::GetSessionRequest { session_id: id.into() };
    manager_client(server).await.get_session(request).await.map(tonic::Response::into_inner)
}

async fn session_count(server: &Server) -> u64 {
    manager_client(server).await.status(pb::ManagerStatusRequest {}).await.unwrap().into_inner().sessions
}

/// An echo server in pool `pool` that answers each request after `delay`.
fn echo_server(
    connector: &Connector,
    endpoint: &str,
    pool: &str,
    id: &str,
    delay: Duration,
) -> tokio::task::JoinHandle<()> {
    let mut session = ServerSession::register(connector, endpoint, pool, id);
    tokio::spawn(async move {
        while let Some(event) = session.next().await {
            if let ServerEvent::Request { session_id, seq, payload, .. } = event {
                tokio::time::sleep(delay).await;
                session.reply(&session_id, seq, payload.unwrap(), Vec::new()).await.unwrap();
            }
        }
    })
}

/// A client closes its session: the manager forgets it and says why when asked. A close with
/// requests unanswered is refused (FAILED_PRECONDITION, saying what is queued) and the session
/// goes on, until it is closed dropping them. A restart of the manager (its journal replayed over
/// snapshots taken meanwhile) brings back only the live sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_closed_session_is_gone_with_its_queues_and_says_why() {
    let dir = TempDir::new();
    let manager = start_manager(&dir, &["--snapshot-every", "10"]);
    let endpoint = format!("http://{}", manager.addr);
    let connector = Connector::new(None).unwrap();
    let _server = echo_server(&connector, &endpoint, "echo", "w1", Duration::ZERO);

    // opened, used, closed
    let mut used = ClientSession::open(&connector, &endpoint, "echo", Vec::new()).await.unwrap();
    used.send(payload(1), Vec::new()).await.unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), used.recv()).await.unwrap().unwrap();
    assert_eq!(response.seq, 1);
    tokio::time::timeout(Duration::from_secs(10), used.close(false)).await.unwrap().unwrap();
    let gone = get_session(&manager, used.session_id()).await.unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
    assert!(gone.message().contains("closed by the client"), "{}", gone.message());

    // a request nobody answers (no server in its pool): the close is refused, the session stays
    let mut waiting = ClientSession::open(&connector, &endpoint, "nobody", Vec::new()).await.unwrap();
    waiting.send(payload(7), Vec::new()).await.unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), waiting.close(false)).await.unwrap().unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("1 request(s) unanswered"), "{}", refused.message());
    let reason = tonic_types::StatusExt::get_details_error_info(&refused).map(|i| i.reason);
    assert_eq!(reason.as_deref(), Some("STILL_QUEUED"), "the reason crosses the Multiplex channel: {refused:?}");
    let info = get_session(&manager, waiting.session_id()).await.unwrap();
    assert_eq!(info.request_queue, 1);
    // the session goes on after the refusal
    assert_eq!(waiting.send(payload(8), Vec::new()).await.unwrap(), 2);
    tokio::time::timeout(Duration::from_secs(10), waiting.close(true)).await.unwrap().unwrap();
    assert_eq!(get_session(&manager, waiting.session_id()).await.unwrap_err().code(), tonic::Code::NotFound);

    // churn across snapshots (one every 10 entries), one session kept
    let kept = ClientSession::open(&connector, &endpoint, "echo", b"kept".to_vec()).await.unwrap();
    for _ in 0..30 {
        let mut s = ClientSession::open(&connector, &endpoint, "echo", Vec::new()).await.unwrap();
        s.send(payload(1), Vec::new()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), s.recv()).await.unwrap().unwrap();
        tokio::time::timeout(Duration::from_secs(10), s.close(false)).await.unwrap().unwrap();
    }
    assert_eq!(session_count(&manager).await, 1);
    let manager = manager.restart(&[]);
    assert_eq!(session_count(&manager).await, 1, "only the live session comes back");
    let info = get_session(&manager, kept.session_id()).await.unwrap();
    assert_eq!((info.pool.as_str(), info.client_restart_bytes), ("echo", 4));
    assert!(baton_mesh::proto::unix_ms(info.open_time.as_ref()) > 1_700_000_000_000, "{info:?}");
    let snapshot = std::fs::metadata(dir.path().join("journal").join("snapshot")).unwrap().len();
    assert!(snapshot < 1024, "the snapshot holds one session: {snapshot} bytes");
}

/// With `--session-expiry 1s`, a session whose client went away is closed once idle that long,
/// with the reason recorded; a connected session, idle as long, stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_detached_session_idle_past_the_expiry_is_closed() {
    let dir = TempDir::new();
    let manager = start_manager(&dir, &["--session-expiry", "1s"]);
    let endpoint = format!("http://{}", manager.addr);
    let connector = Connector::new(None).unwrap();
    let detached = ClientSession::open(&connector, &endpoint, "idle", Vec::new()).await.unwrap();
    let detached_id = detached.session_id().to_owned();
    let connected = ClientSession::open(&connector, &endpoint, "idle", Vec::new()).await.unwrap();
    drop(detached);
    let mut expired = None;
    for _ in 0..100 {
        match get_session(&manager, &detached_id).await {
            Ok(info) => assert!(info.state == "DETACHED" || info.state == "CONNECTED", "{info:?}"),
            Err(status) => {
                expired = Some(status);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expired = expired.expect("the detached session expired within 10s");
    assert_eq!(expired.code(), tonic::Code::NotFound);
    assert!(expired.message().contains("expired: no client and no activity for 1s"), "{}", expired.message());
    let info = get_session(&manager, connected.session_id()).await.unwrap();
    assert_eq!(info.state, "CONNECTED");
    assert!(baton_mesh::proto::duration_ms(info.idle.as_ref()).unwrap() >= 1000, "idle as long: {info:?}");
}

/// A client process names its session; killed (its session object dropped without a close) and
/// started again, it opens the same name and finds the session: the same id, its restart data,
/// the responses answered while it was away, and numbering that goes on. The manager holds one
/// session, not two.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_named_session_is_found_again_by_a_restarted_client() {
    let dir = TempDir::new();
    let manager = start_manager(&dir, &[]);
    let endpoint = format!("http://{}", manager.addr);
    let servers = Connector::new(None).unwrap();
    let _server = echo_server(&servers, &endpoint, "echo", "w1", Duration::from_millis(300));

    let first = Connector::new(None).unwrap();
    let session = ClientSession::open_named(&first, &endpoint, "echo", "scheduler-a/0", b"r0".to_vec()).await.unwrap();
    assert_eq!(session.session_id(), "scheduler-a/0");
    assert_eq!((session.opened().restart_data.as_slice(), session.opened().last_request_seq), (&b"r0"[..], 0));
    session.send(payload(1), b"r1".to_vec()).await.unwrap();
    session.send(payload(2), b"r2".to_vec()).await.unwrap();
    // the process dies before the answers (300 ms away) come
    drop(session);
    drop(first);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let info = get_session(&manager, "scheduler-a/0").await.unwrap();
    assert_eq!((info.state.as_str(), info.response_queue), ("DETACHED", 2), "{info:?}");

    let second = Connector::new(None).unwrap();
    let mut again = ClientSession::open_named(&second, &endpoint, "echo", "scheduler-a/0", Vec::new()).await.unwrap();
    assert_eq!(again.session_id(), "scheduler-a/0");
    assert_eq!((again.opened().restart_data.as_slice(), again.opened().last_request_seq), (&b"r2"[..], 2));
    let mut answered = Vec::new();
    for _ in 0..2 {
        let r = tokio::time::timeout(Duration::from_secs(10), again.recv()).await.unwrap().unwrap();
        answered.push(r.seq);
    }
    assert_eq!(answered, [1, 2]);
    assert_eq!(again.send(payload(3), Vec::new()).await.unwrap(), 3, "numbering goes on");
    assert_eq!(session_count(&manager).await, 1);
    // a name that is not one is refused
    let Err(bad) = ClientSession::open_named(&second, &endpoint, "echo", "has space", Vec::new()).await else {
        panic!("a session id with a space was accepted")
    };
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
}

/// A server saves restart data for a request in hand and dies before answering: the server that
/// takes the session over is bound with that restart data, gets the request again, and answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_that_dies_hands_over_its_saved_restart_data() {
    let dir = TempDir::new();
    let manager = start_manager(&dir, &[]);
    let endpoint = format!("http://{}", manager.addr);
    let connector = Connector::new(None).unwrap();
    let mut dying = ServerSession::register(&connector, &endpoint, "work", "w-dying");
    let mut client = ClientSession::open(&connector, &endpoint, "work", Vec::new()).await.unwrap();
    client.send(payload(1), Vec::new()).await.unwrap();
    let session_id = loop {
        match tokio::time::timeout(Duration::from_secs(10), dying.next()).await.unwrap().unwrap() {
            ServerEvent::Request { session_id, .. } => break session_id,
            _ => continue,
        }
    };
    dying.replier().save_restart(&session_id, b"attempt 1 failed: resources".to_vec()).await.unwrap();
    let mut saved = 0;
    for _ in 0..100 {
        saved = get_session(&manager, &session_id).await.unwrap().server_restart_bytes;
        if saved > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(saved, b"attempt 1 failed: resources".len() as u64);
    drop(dying);
    // another server takes the session after the grace, with the saved restart data
    let mut taking = ServerSession::register(&connector, &endpoint, "work", "w-taking");
    let mut bound = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), taking.next()).await.unwrap().unwrap() {
            ServerEvent::Bound { server_restart_data, .. } => bound = Some(server_restart_data),
            ServerEvent::Request { session_id: s, seq, payload, .. } => {
                taking.reply(&s, seq, payload.unwrap(), Vec::new()).await.unwrap();
                break;
            }
            ServerEvent::Accepted { .. } => {}
        }
    }
    assert_eq!(bound.as_deref(), Some(&b"attempt 1 failed: resources"[..]));
    let response = tokio::time::timeout(Duration::from_secs(10), client.recv()).await.unwrap().unwrap();
    assert_eq!(response.seq, 1);
}

/// ListSessions answers a page at a time, in the order of the ids, each session once; the CLI
/// prints every page.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_are_listed_a_page_at_a_time() {
    let dir = TempDir::new();
    let manager = start_manager(&dir, &[]);
    let endpoint = format!("http://{}", manager.addr);
    let connector = Connector::new(None).unwrap();
    let mut opened = Vec::new();
    for _ in 0..25 {
        opened.push(ClientSession::open(&connector, &endpoint, "paged", Vec::new()).await.unwrap());
    }
    let mut ids: Vec<String> = opened.iter().map(|s| s.session_id().to_owned()).collect();
    ids.sort();
    let mut client = manager_client(&manager).await;
    let (mut listed, mut pages, mut page_token) = (Vec::new(), 0, String::new());
    loop {
        let request = pb::ListSessionsRequest { page_size: 10, page_token };
        let page = client.list_sessions(request).await.unwrap().into_inner();
        pages += 1;
        assert!(page.sessions.len() <= 10);
        listed.extend(page.sessions.into_iter().map(|s| s.session_id));
        if page.next_page_token.is_empty() {
            break;
        }
        assert!(pages < 10, "the pages do not end");
        page_token = page.next_page_token;
    }
    assert_eq!((pages, &listed), (3, &ids));
    let out = std::process::Command::new(baton_tests::baton_bin())
        .args(["manager", "sessions", "--endpoint", &endpoint])
        .output()
        .expect("run baton manager sessions");
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(printed.lines().count(), 25, "{printed}");
    assert!(printed.lines().all(|l| l.contains("\"state\":\"CONNECTED\"")), "{printed}");
}

/// Restart data for a session that is not bound to the server sending it (unknown, closed, or
/// moved to another server) is answered at once as dropped, so that the server library stops
/// sending it again after every reconnect; restart data for a bound session is journaled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_data_for_a_session_not_bound_here_is_answered_as_dropped() {
    use pb::server_event::Kind;
    let dir = TempDir::new();
    let manager = start_manager(&dir, &[]);
    let (frames, rx) = tokio::sync::mpsc::channel(8);
    let frame = |kind| pb::ServerFrame { kind: Some(kind) };
    let register = pb::RegisterServer { pool: "work".into(), server_id: "w-raw".into(), seen_term: 0 };
    frames.send(frame(pb::server_frame::Kind::Register(register))).await.unwrap();
    let mut events = manager_client(&manager)
        .await
        .server_session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let restart = pb::ServerRestart { session_id: "sess_nobody".into(), restart_data: b"x".to_vec() };
    frames.send(frame(pb::server_frame::Kind::Restart(restart))).await.unwrap();
    let saved = loop {
        let event = tokio::time::timeout(Duration::from_secs(5), events.message())
            .await
            .expect("an answer to the restart data within 5 s")
            .unwrap()
            .expect("the stream stays open");
        if let Some(Kind::RestartSaved(saved)) = event.kind {
            break saved;
        }
    };
    assert_eq!((saved.session_id.as_str(), saved.dropped), ("sess_nobody", true));
}
