//! `baton-bench`: the benchmarks behind `scripts/bench.sh`. Each starts the real (release)
//! `baton` binary, drives it over gRPC, and prints its figures; its last lines are a summary and
//! the table of its headline figures against their peers and targets (`figures`); `all` runs
//! every area and prints one table.

mod figures;

use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_mesh::proto::v1 as pb;
use baton_store::Backend;
use baton_tests::{Server, authed, create_org, record};
use figures::Target;
use serde_json::json;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// The median of `values` (the upper one of an even count), sorting them.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Figures {
    /// Requests rejected RESOURCE_EXHAUSTED (resubmit as batch): counted, not fatal.
    rejected: usize,
    requests_per_s: f64,
    records_per_s: f64,
    p50: Duration,
    p99: Duration,
}

/// Upserts `size`-record requests from `clients` concurrent clients for `seconds`.
async fn upsert_load(server: &Server, size: usize, clients: usize, seconds: f64) -> Figures {
    let org = Arc::new(create_org(server, "bench").await);
    let stop = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let org = org.clone();
        let mut intake = server.intake().await;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut rejected = 0usize;
            let mut n = 0usize;
            while Instant::now() < stop {
                let records = (0..size)
                    .map(|k| {
                        record(
                            json!({"code": format!("c{c}-{}", (n * size + k) % 20_000), "name": "bench", "amount": n}),
                        )
                    })
                    .collect();
                let started = Instant::now();
                match intake.upsert(authed(pb::UpsertRequest { object: "account".into(), records }, &org.key)).await {
                    Ok(_) => latencies.push(started.elapsed()),
                    Err(status) if status.code() == tonic::Code::ResourceExhausted => rejected += 1,
                    Err(status) => panic!("upsert: {status:?}"),
                }
                n += 1;
            }
            (latencies, rejected)
        }));
    }
    let started = Instant::now();
    let mut all = Vec::new();
    let mut rejected = 0;
    for t in tasks {
        let (latencies, r) = t.await.unwrap();
        all.extend(latencies);
        rejected += r;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    Figures {
        rejected,
        requests_per_s: all.len() as f64 / elapsed,
        records_per_s: (all.len() * size) as f64 / elapsed,
        p50: percentile(&all, 0.50),
        p99: percentile(&all, 0.99),
    }
}

async fn intake(seconds: f64) {
    let mut summary = Vec::new();
    for backend in baton_store::testing::backends() {
        let name = match backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        };
        for size in [1usize, 200] {
            let server = Server::start(backend, &["--max-in-flight-per-org", "64"]).await;
            let f = upsert_load(&server, size, 8, seconds).await;
            println!(
                "intake {name:8} {size:3}-record upserts, 8 clients, {seconds}s: {:8.0} req/s {:9.0} records/s  p50 {:6.2} ms  p99 {:6.2} ms  rejected {}",
                f.requests_per_s,
                f.records_per_s,
                ms(f.p50),
                ms(f.p99),
                f.rejected
            );
            summary.push(format!("{name} {size}rec {:.0} req/s p99 {:.1}ms", f.requests_per_s, ms(f.p99)));
            let what = format!("intake {name} {size}-record upserts, 8 clients");
            figures::record(format!("{what}: records"), f.records_per_s, "records/s", None, Target::None);
            figures::record(format!("{what}: p99"), ms(f.p99), "ms", None, Target::None);
        }
    }
    println!("summary: intake upserts: {}", summary.join("; "));
}

async fn get_link(server: &Server, key: &str, id: &str) -> pb::Link {
    let request = pb::GetLinkRequest { link_id: id.into() };
    server.sync().await.get_link(authed(request, key)).await.expect("get link").into_inner()
}

/// The drain on PostgreSQL (two deployments, each on a database of the shared cluster) and its
/// peer: PostgreSQL's own logical replication of the same changes between two clusters of the
/// bench's own, measured the same way (the subscription disabled while the backlog is written,
/// then timed from its enabling until the last change is applied).
async fn sync_on_postgres(events: usize, runs: usize) {
    let pair = linked_pair(Backend::Postgres).await;
    let baton = median(&mut drain_runs(&pair, " (PostgreSQL)", events, runs).await);
    drop(pair);
    println!("sync backlog (PostgreSQL): median of {runs}: {baton:.0} events/s applied");
    let peer = logical_replication(events, runs);
    let what = "sync (PostgreSQL): events applied between two deployments";
    match peer {
        Some(peer) => {
            println!(
                "PostgreSQL logical replication of the same changes: {peer:.0} rows/s applied; baton/peer {:.2}×",
                baton / peer
            );
            figures::record(
                what,
                baton,
                "events/s",
                Some(("PostgreSQL logical replication", peer)),
                Target::OfPeer(1.0),
            );
        }
        None => figures::record_unmeasured_peer(what, baton, "events/s", "PostgreSQL logical replication", 1.0),
    }
}

/// PostgreSQL 15 logical replication between two clusters of the bench's own (`wal_level=logical`
/// on the publisher): `runs` rounds of `events` row changes written as 200-row upserts over 10,000
/// rows of about 100 bytes (baton's backlog), each statement its own transaction, while the
/// subscription is disabled; then the subscription is enabled and timed from its apply worker's
/// start until a marker row written last is on the subscriber. The median rate; None when no cluster can be made.
fn logical_replication(events: usize, runs: usize) -> Option<f64> {
    use baton_tests::postgres::Cluster;
    let publisher = Cluster::create("bench_pub", &["wal_level=logical"])?;
    // the launcher looks for enabled subscriptions every wal_retrieve_retry_interval (5 s)
    let subscriber = Cluster::create("bench_sub", &["wal_retrieve_retry_interval=100ms"])?;
    let table = "CREATE TABLE account (code text PRIMARY KEY, name text NOT NULL, amount bigint, \
                 note text NOT NULL DEFAULT repeat('x', 60))";
    publisher.psql(table);
    subscriber.psql(table);
    publisher.psql("CREATE PUBLICATION bench FOR TABLE account");
    subscriber.psql(&format!(
        "CREATE SUBSCRIPTION bench CONNECTION 'host=127.0.0.1 port={} user=postgres dbname=postgres' PUBLICATION bench",
        publisher.port()
    ));
    let mut rates = Vec::new();
    for run in 1..=runs {
        subscriber.psql("ALTER SUBSCRIPTION bench DISABLE");
        let statements: String = (0..events.div_ceil(200))
            .map(|n| {
                format!(
                    "INSERT INTO account (code, name, amount) SELECT 'r' || ((g % 10000)::text), 'backlog', {} \
                     FROM generate_series({}, {}) g ON CONFLICT (code) DO UPDATE SET name = excluded.name, \
                     amount = excluded.amount;\n",
                    n + run,
                    n * 200,
                    n * 200 + 199
                )
            })
            .collect();
        let script = std::env::temp_dir().join(format!("baton_bench_logical_{}.sql", std::process::id()));
        std::fs::write(&script, statements).expect("write the statements");
        let out = std::process::Command::new("psql")
            .args([&publisher.url(), "-v", "ON_ERROR_STOP=1", "-q", "-f"])
            .arg(&script)
            .output()
            .expect("psql runs");
        let _ = std::fs::remove_file(&script);
        assert!(out.status.success(), "the backlog: {}", String::from_utf8_lossy(&out.stderr));
        publisher.psql(&format!(
            "INSERT INTO account (code, name, amount) VALUES ('marker', 'marker', {run}) \
             ON CONFLICT (code) DO UPDATE SET amount = excluded.amount"
        ));
        subscriber.psql("ALTER SUBSCRIPTION bench ENABLE");
        // timed from its apply worker's start, as baton's drain is from the link's STREAMING
        let asked = Instant::now();
        while subscriber.psql("SELECT count(pid) FROM pg_stat_subscription WHERE subname = 'bench'") == "0" {
            assert!(asked.elapsed() < Duration::from_secs(60), "no apply worker within 60 s");
            std::thread::sleep(Duration::from_millis(5));
        }
        let enabled = Instant::now();
        loop {
            let seen = subscriber.psql("SELECT amount FROM account WHERE code = 'marker'");
            if seen == run.to_string() {
                break;
            }
            assert!(enabled.elapsed() < Duration::from_secs(600), "logical replication did not catch up in 10 minutes");
            std::thread::sleep(Duration::from_millis(20));
        }
        let drained = enabled.elapsed().as_secs_f64();
        let rate = events as f64 / drained;
        println!("logical replication, run {run}: {events} row changes applied in {drained:.2}s: {rate:.0} rows/s");
        rates.push(rate);
    }
    subscriber.psql("DROP SUBSCRIPTION bench");
    Some(median(&mut rates))
}

/// The change-log reads of `server`'s links so far (`baton_change_log_reads_total{follower="link"}`).
fn link_reads(server: &Server) -> f64 {
    let text = server.metrics_text();
    text.lines()
        .filter(|l| l.starts_with("baton_change_log_reads_total") && l.contains("follower=\"link\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Two deployments on `backend` with a STREAMING link from the first (org `source`) to the
/// second (org `target`).
struct LinkedPair {
    source: Server,
    _target: Server,
    org: baton_tests::TestOrg,
    link: String,
}

async fn linked_pair(backend: Backend) -> LinkedPair {
    let source = Server::start(backend, &["--max-in-flight-per-org", "64"]).await;
    let target = Server::start(backend, &["--max-in-flight-per-org", "64"]).await;
    let a = create_org(&source, "source").await;
    let b = create_org(&target, "target").await;
    let request = pb::CreateLinkRequest {
        target_endpoint: format!("http://{}", target.addr),
        target_api_key: b.key.clone(),
        verify_threshold: 3,
        probe_interval: Some(baton_mesh::proto::duration(200)),
        ..Default::default()
    };
    let id = source.sync().await.create_link(authed(request, &a.key)).await.expect("create link").into_inner().id;
    for _ in 0..200 {
        if get_link(&source, &a.key, &id).await.state == pb::LinkState::Streaming as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    LinkedPair { source, _target: target, org: a, link: id }
}

/// `runs` rounds of: pause the link, write a backlog of `events` changes (200-record upserts
/// over 10,000 records), resume it and time the drain; the rate of each round.
async fn drain_runs(p: &LinkedPair, label: &str, events: usize, runs: usize) -> Vec<f64> {
    let (source, a, id) = (&p.source, &p.org, &p.link);
    let mut rates = Vec::new();
    let mut intake = source.intake().await;
    let mut sync = source.sync().await;
    for run in 1..=runs {
        sync.pause_link(authed(pb::PauseLinkRequest { link_id: id.clone() }, &a.key)).await.expect("pause");
        let started = Instant::now();
        for n in 0..events.div_ceil(200) {
            let records = (0..200)
                .map(|k| {
                    record(
                        json!({"code": format!("r{}", (n * 200 + k) % 10_000), "name": "backlog", "amount": n + run}),
                    )
                })
                .collect();
            intake
                .upsert(authed(pb::UpsertRequest { object: "account".into(), records }, &a.key))
                .await
                .expect("upsert");
        }
        let loaded = started.elapsed();
        let backlog = get_link(source, &a.key, id).await.lag_seq;
        eprintln!("sync backlog{label}, run {run}: {backlog} events written; draining");
        let resumed = Instant::now();
        sync.resume_link(authed(pb::ResumeLinkRequest { link_id: id.clone() }, &a.key)).await.expect("resume");
        // a resumed link that must verify the target first is timed from its return to STREAMING,
        // when it starts sending changes
        let mut streaming = None;
        loop {
            let link = get_link(source, &a.key, id).await;
            if streaming.is_none() && link.state == pb::LinkState::Streaming as i32 {
                streaming = Some(Instant::now());
            }
            if link.lag_seq == 0 {
                break;
            }
            assert!(resumed.elapsed() < Duration::from_secs(600), "the backlog did not drain in 10 minutes");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let started = streaming.unwrap_or(resumed);
        let (verified, drained) = (started - resumed, started.elapsed().as_secs_f64());
        let rate = backlog as f64 / drained;
        println!(
            "sync backlog{label}, run {run}: {backlog} events written in {:.1}s; streaming {:.2}s after the resume, \
             then applied between two deployments in {drained:.2}s: {rate:.0} events/s",
            loaded.as_secs_f64(),
            verified.as_secs_f64()
        );
        rates.push(rate);
    }
    rates
}

/// Sync between two deployments: events applied per second (a backlog drained by a resumed link),
/// then replication lag while a writer runs at a fixed rate, then the link's reads while idle; on
/// PostgreSQL too (when BATON_TEST_POSTGRES_URL is set), the drain beside PostgreSQL's own logical
/// replication of the same changes.
async fn sync(seconds: f64) {
    let events: usize = std::env::var("BENCH_SYNC_EVENTS").ok().and_then(|s| s.parse().ok()).unwrap_or(300_000);
    let rate: f64 = std::env::var("BENCH_SYNC_RATE").ok().and_then(|s| s.parse().ok()).unwrap_or(10_000.0);
    let runs: usize = std::env::var("BENCH_SYNC_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    if std::env::var_os("BATON_TEST_POSTGRES_URL").is_some() {
        sync_on_postgres(events, runs).await;
    }
    let pair = linked_pair(Backend::Sqlite).await;
    let apply_rate = median(&mut drain_runs(&pair, "", events, runs).await);
    println!("sync backlog: median of {runs}: {apply_rate:.0} events/s applied");
    let (source, a, id) = (&pair.source, &pair.org, &pair.link);

    // lag at a fixed write rate: 4 writers of 100-record upserts, each paced to a quarter of `rate`
    let per_request = 100usize;
    let writers = 4usize;
    let interval = Duration::from_secs_f64((per_request * writers) as f64 / rate);
    let stop = Instant::now() + Duration::from_secs_f64(seconds.max(5.0));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut intake = source.intake().await;
        let key = a.key.clone();
        tasks.push(tokio::spawn(async move {
            let mut next = Instant::now();
            let mut written = 0usize;
            let mut n = 0usize;
            while Instant::now() < stop {
                let records = (0..per_request)
                    .map(|k| {
                        let code = format!("w{w}-{}", (n * per_request + k) % 2_500);
                        record(json!({"code": code, "name": "live", "amount": n}))
                    })
                    .collect();
                intake
                    .upsert(authed(pb::UpsertRequest { object: "account".into(), records }, &key))
                    .await
                    .expect("upsert");
                written += per_request;
                n += 1;
                next += interval;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    tokio::time::sleep(wait).await;
                }
            }
            written
        }));
    }
    let mut lags = Vec::new();
    let begun = Instant::now();
    while Instant::now() < stop {
        lags.push(Duration::from_millis(
            baton_mesh::proto::duration_ms(get_link(source, &a.key, id).await.lag.as_ref()).unwrap(),
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut written = 0;
    for t in tasks {
        written += t.await.unwrap();
    }
    let achieved = written as f64 / begun.elapsed().as_secs_f64();
    lags.sort();
    let (p50, p99) = (percentile(&lags, 0.5), percentile(&lags, 0.99));
    println!(
        "sync lag: writer at {achieved:.0} events/s (asked {rate:.0}): lag p50 {:.0} ms, p99 {:.0} ms over {} samples",
        ms(p50),
        ms(p99),
        lags.len()
    );
    println!(
        "summary: sync applies {apply_rate:.0} events/s; lag p50 {:.0} ms p99 {:.0} ms at {achieved:.0} events/s",
        ms(p50),
        ms(p99)
    );
    // idle: how often the caught-up link reads the change log with nothing written (pushed
    // changes wake it on a commit; otherwise it reads only at the --change-poll fallback)
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = Duration::from_secs(5);
    let before = link_reads(source);
    tokio::time::sleep(idle).await;
    let idle_reads = link_reads(source) - before;
    println!(
        "sync idle: {idle_reads} change-log reads by the caught-up link in {}s with nothing written",
        idle.as_secs()
    );
    // at most the fallback's one read a second (--change-poll, 1s); polling read 20 a second
    let fallback = idle.as_secs_f64();
    figures::record(
        format!("sync: change-log reads by an idle link in {}s", idle.as_secs()),
        idle_reads,
        "reads",
        None,
        Target::AtMost(fallback),
    );
    figures::record(
        "sync (SQLite): events applied between two deployments",
        apply_rate,
        "events/s",
        None,
        Target::None,
    );
    figures::record(format!("sync: link lag p99 at {achieved:.0} events/s"), ms(p99), "ms", None, Target::AtMost(20.0));
}

/// The connector of this process's sessions (no mesh token): all of them share its streams, one
/// per manager, as a service's sessions do.
fn connector() -> &'static baton_manager_client::Connector {
    static CONNECTOR: std::sync::OnceLock<baton_manager_client::Connector> = std::sync::OnceLock::new();
    CONNECTOR.get_or_init(|| baton_manager_client::Connector::new(None).expect("a connector without a token"))
}

/// Echo servers for the manager benchmarks: answer each request with its payload.
fn echo_servers(endpoint: &str, pool: &str, n: usize) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|i| {
            let mut session =
                baton_manager_client::ServerSession::register(connector(), endpoint, pool, &format!("echo{i}"));
            tokio::spawn(async move {
                while let Some(event) = session.next().await {
                    if let baton_manager_client::ServerEvent::Request { session_id, seq, payload, .. } = event {
                        let _ = session.reply(&session_id, seq, payload.unwrap_or_default(), Vec::new()).await;
                    }
                }
            })
        })
        .collect()
}

/// One echo server session in this process, until it is killed: answers each request with its
/// payload and the restart data `SERVER_ID:COUNT` (how many requests it answered). The manager's
/// end-to-end tests SIGKILL it; by hand, it answers a client session of its pool.
async fn echo_server(endpoint: &str, pool: &str, id: &str) {
    let mut session = baton_manager_client::ServerSession::register(connector(), endpoint, pool, id);
    eprintln!("echo server {id}: registering in pool {pool} at {endpoint}");
    let mut count = 0u64;
    while let Some(event) = session.next().await {
        if let baton_manager_client::ServerEvent::Request { session_id, seq, payload, .. } = event {
            count += 1;
            let restart = format!("{id}:{count}").into_bytes();
            if session.reply(&session_id, seq, payload.unwrap_or_default(), restart).await.is_err() {
                return;
            }
        }
    }
}

async fn manager_status(server: &Server) -> Option<pb::ManagerStatus> {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr)).ok()?.connect().await.ok()?;
    let mut client = pb::session_manager_client::SessionManagerClient::new(channel);
    client.status(pb::ManagerStatusRequest {}).await.ok().map(tonic::Response::into_inner)
}

/// Waits (at most 60 s) for a primary with an in-sync standby; returns the primary's position.
async fn wait_for_pair(members: &[Server]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for (i, m) in members.iter().enumerate() {
            if let Some(s) = manager_status(m).await
                && s.role == "PRIMARY"
                && s.in_sync.len() == 2
            {
                return i;
            }
        }
        assert!(Instant::now() < deadline, "no primary with an in-sync standby within 60s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A primary and an in-sync standby on a real etcd, two echo server sessions.
struct Pair {
    _etcd: baton_tests::Etcd,
    _dirs: Vec<baton_tests::TempDir>,
    members: Vec<Server>,
    endpoints: String,
    _servers: Vec<tokio::task::JoinHandle<()>>,
}

async fn pair(pool: &str) -> Pair {
    let etcd = baton_tests::Etcd::start();
    let dirs = vec![baton_tests::TempDir::new(), baton_tests::TempDir::new()];
    let members: Vec<Server> = dirs.iter().map(|d| Server::manager_member(d, &etcd, "/baton-bench/manager")).collect();
    let endpoints = members.iter().map(|m| format!("http://{}", m.addr)).collect::<Vec<_>>().join(",");
    wait_for_pair(&members).await;
    let servers = echo_servers(&endpoints, pool, 2);
    Pair { _etcd: etcd, _dirs: dirs, members, endpoints, _servers: servers }
}

/// Relayed request/response round trips per second through a primary with sync replication to
/// its standby (both journals fsynced before every acknowledgment), with closed-loop clients; then
/// the handover time on SIGTERM of the primary.
async fn manager(seconds: f64) {
    let mut p = pair("bench").await;
    let clients: usize = std::env::var("BENCH_MANAGER_CLIENTS").ok().and_then(|s| s.parse().ok()).unwrap_or(256);
    let rounds: usize = std::env::var("BENCH_MANAGER_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let mut sessions = Vec::new();
    for _ in 0..clients {
        sessions.push(
            baton_manager_client::ClientSession::open(connector(), &p.endpoints, "bench", Vec::new())
                .await
                .expect("open"),
        );
    }
    // Rounds of `seconds` each on the same sessions; the figures are the median round's (this
    // machine's neighbours move a single round by ±10%).
    let mut results = Vec::new();
    for round in 1..=rounds {
        // the clock starts once every session is open
        let stop = Instant::now() + Duration::from_secs_f64(seconds);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for mut session in sessions {
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                let sender = session.sender();
                while Instant::now() < stop {
                    let started = Instant::now();
                    let payload = prost_types::Any { type_url: "bench".into(), value: vec![0u8; 64] };
                    sender.send(payload, Vec::new()).await.expect("send");
                    session.recv().await.expect("response");
                    latencies.push(started.elapsed());
                }
                (session, latencies)
            }));
        }
        sessions = Vec::new();
        let mut all = Vec::new();
        for t in tasks {
            let (session, latencies) = t.await.unwrap();
            sessions.push(session);
            all.extend(latencies);
        }
        let elapsed = started.elapsed().as_secs_f64();
        all.sort();
        let rate = all.len() as f64 / elapsed;
        let (p50, p99) = (percentile(&all, 0.5), percentile(&all, 0.99));
        eprintln!("round {round}: {rate:.0} round trips/s, p50 {:.2} ms, p99 {:.2} ms", ms(p50), ms(p99));
        results.push((rate, p50, p99));
    }
    results.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (rate, p50, p99) = results[results.len() / 2];
    println!(
        "manager relay: {clients} closed-loop client sessions, 2 server sessions, sync replication to an in-sync standby: \
         {rate:.0} round trips/s, p50 {:.2} ms, p99 {:.2} ms (the median of {rounds} rounds of {seconds} s: {})",
        ms(p50),
        ms(p99),
        results.iter().map(|r| format!("{:.0}", r.0)).collect::<Vec<_>>().join(", ")
    );

    // handover: SIGTERM the primary while a client sends; time until a request is accepted by
    // the next primary (stamped with a newer term)
    let mut session =
        baton_manager_client::ClientSession::open(connector(), &p.endpoints, "bench", Vec::new()).await.expect("open");
    let sender = session.sender();
    // responses must be read: an unread response queue holds the session back
    let drain = tokio::spawn(async move { while session.recv().await.is_some() {} });
    let term = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let last = term.clone();
    let pump = tokio::spawn(async move {
        loop {
            let payload = prost_types::Any { type_url: "handover".into(), value: vec![1u8; 32] };
            match sender.send_stamped(payload, Vec::new()).await {
                Ok(accepted) => last.store(accepted.term, std::sync::atomic::Ordering::SeqCst),
                Err(_) => return,
            }
        }
    });
    let mut handovers = Vec::new();
    for _ in 0..env_number("BENCH_MANAGER_HANDOVERS", 50) {
        let primary = wait_for_pair(&p.members).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = term.load(std::sync::atomic::Ordering::SeqCst);
        let signalled = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p.members[primary].pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        while term.load(std::sync::atomic::Ordering::SeqCst) <= before {
            assert!(signalled.elapsed() < Duration::from_secs(30), "no handover within 30s");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        handovers.push(signalled.elapsed());
        eprintln!("handover {}: {:.0} ms", handovers.len(), ms(signalled.elapsed()));
        let old = p.members.remove(primary);
        p.members.insert(primary, old.restart(&[]));
    }
    pump.abort();
    drain.abort();
    let each = handovers.iter().map(|h| format!("{:.0}", ms(*h))).collect::<Vec<_>>().join(", ");
    handovers.sort();
    let (h50, hmax) = (percentile(&handovers, 0.5), handovers.last().copied().unwrap_or_default());
    println!(
        "manager handover on SIGTERM of the primary: p50 {:.0} ms, max {:.0} ms over {} handovers ({each} ms)",
        ms(h50),
        ms(hmax),
        handovers.len()
    );
    println!(
        "summary: manager relays {rate:.0} round trips/s (p50 {:.2} ms, p99 {:.2} ms) with sync replication; SIGTERM handover p50 {:.0} ms",
        ms(p50),
        ms(p99),
        ms(h50)
    );
    let relay = format!("manager: durable round trips, {clients} client sessions");
    figures::record(relay.clone(), rate, "round trips/s", None, Target::AtLeast(100_000.0));
    // the peer, measured in the same run: core NATS request/reply (no disk, no replication)
    match nats_relay(seconds, clients, rounds).await {
        Some((nats, n50, n99)) => {
            println!(
                "core NATS request/reply (nats-server on loopback, {clients} closed-loop requesters on one \
                 connection, 2 responders in a queue group): {nats:.0} round trips/s, p50 {:.2} ms, p99 {:.2} ms; \
                 baton/NATS {:.2}×",
                ms(n50),
                ms(n99),
                rate / nats
            );
            let peer = ("core NATS request/reply", nats);
            figures::record(relay, rate, "round trips/s", Some(peer), Target::OfPeer(1.0));
        }
        None => figures::record_unmeasured_peer(relay, rate, "round trips/s", "core NATS request/reply", 1.0),
    }
    figures::record(format!("manager: relay p99 at {rate:.0} round trips/s"), ms(p99), "ms", None, Target::None);
    let over = format!("manager: SIGTERM handover, max of {}", handovers.len());
    figures::record(over, ms(hmax), "ms", None, Target::AtMost(150.0));
}

/// A `nats-server` on a free loopback port, killed when dropped.
struct NatsServer {
    child: std::process::Child,
    url: String,
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NatsServer {
    /// Starts one (None, with the reason printed, when it cannot: not installed, never listening).
    async fn start() -> Option<NatsServer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let child = std::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                eprintln!("core NATS: cannot start nats-server ({e}); scripts/setup.sh's baton_setup_nats installs it");
                return None;
            }
        };
        let server = NatsServer { child, url: format!("nats://127.0.0.1:{port}") };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Some(server);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("core NATS: nats-server did not listen on {port} within 5 s");
        None
    }
}

/// The relay's peer: core NATS request/reply through one `nats-server` on loopback (no disk, no
/// replication), the same closed loop as the manager's: `clients` requesters sharing one
/// connection (as baton's client sessions share one stream), 64-byte payloads, answered by 2
/// responders on connections of their own in a queue group (as the 2 echo server sessions);
/// `rounds` rounds of `seconds`, the median round's rate, p50 and p99. None when no server runs.
async fn nats_relay(seconds: f64, clients: usize, rounds: usize) -> Option<(f64, Duration, Duration)> {
    use tokio_stream::StreamExt;
    let server = NatsServer::start().await?;
    let mut responders = Vec::new();
    for _ in 0..2 {
        let responder = async_nats::connect(&server.url).await.expect("connect a responder");
        let mut requests = responder.queue_subscribe("bench", "echo".into()).await.expect("subscribe");
        responder.flush().await.expect("flush the subscription");
        responders.push(tokio::spawn(async move {
            while let Some(request) = requests.next().await {
                if let Some(reply) = request.reply {
                    let _ = responder.publish(reply, request.payload).await;
                }
            }
        }));
    }
    let requester = async_nats::connect(&server.url).await.expect("connect the requesters");
    let mut results = Vec::new();
    for round in 1..=rounds {
        let stop = Instant::now() + Duration::from_secs_f64(seconds);
        let started = Instant::now();
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let requester = requester.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while Instant::now() < stop {
                        let sent = Instant::now();
                        requester.request("bench", vec![0u8; 64].into()).await.expect("a NATS request answered");
                        latencies.push(sent.elapsed());
                    }
                    latencies
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let rate = all.len() as f64 / started.elapsed().as_secs_f64();
        all.sort();
        let (p50, p99) = (percentile(&all, 0.5), percentile(&all, 0.99));
        eprintln!("core NATS round {round}: {rate:.0} round trips/s, p50 {:.2} ms, p99 {:.2} ms", ms(p50), ms(p99));
        results.push((rate, p50, p99));
    }
    for r in responders {
        r.abort();
    }
    results.sort_by(|a, b| a.0.total_cmp(&b.0));
    Some(results[results.len() / 2])
}

/// The peak RSS a server may reach in a bench: 300 MB.
const RSS_TARGET_MIB: f64 = 300e6 / (1024.0 * 1024.0);

/// A number from the environment variable `name`, or `default`.
fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Resident memory of a process now, in MiB (VmRSS).
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

/// Bytes of a manager's journal directory: (the journal file, the snapshot).
fn journal_bytes(dir: &baton_tests::TempDir) -> (u64, u64) {
    let size = |name: &str| std::fs::metadata(dir.path().join("journal").join(name)).map(|m| m.len()).unwrap_or(0);
    (size("journal"), size("snapshot"))
}

/// `count` sessions opened through `connectors` in turn, in waves of `wave` opened at once;
/// returns them, and how long each wave took.
async fn open_sessions(
    connectors: &[baton_manager_client::Connector],
    endpoints: &str,
    pool: &str,
    count: usize,
    wave: usize,
) -> (Vec<baton_manager_client::ClientSession>, Vec<Duration>) {
    let mut sessions = Vec::with_capacity(count);
    let mut waves = Vec::new();
    while sessions.len() < count {
        let started = Instant::now();
        let tasks: Vec<_> = (sessions.len()..count.min(sessions.len() + wave))
            .map(|k| {
                let (connector, endpoints, pool) =
                    (connectors[k % connectors.len()].clone(), endpoints.to_owned(), pool.to_owned());
                tokio::spawn(async move {
                    baton_manager_client::ClientSession::open(&connector, &endpoints, &pool, Vec::new())
                        .await
                        .expect("open")
                })
            })
            .collect();
        for t in tasks {
            sessions.push(t.await.expect("open task"));
        }
        waves.push(started.elapsed());
    }
    (sessions, waves)
}

/// One round trip on each session, `parallel` at a time; returns the sessions.
async fn round_trip_each(
    sessions: Vec<baton_manager_client::ClientSession>,
    parallel: usize,
) -> Vec<baton_manager_client::ClientSession> {
    let gate = Arc::new(tokio::sync::Semaphore::new(parallel));
    let tasks: Vec<_> = sessions
        .into_iter()
        .map(|mut session| {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.expect("the gate");
                let payload = prost_types::Any { type_url: "bench".into(), value: vec![0u8; 64] };
                session.send(payload, Vec::new()).await.expect("send");
                tokio::time::timeout(Duration::from_secs(60), session.recv())
                    .await
                    .expect("a response in 60s")
                    .expect("response");
                session
            })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("round trip task"));
    }
    out
}

/// Sessions at scale on one manager pair (primary, in-sync standby, real etcd, two echo server
/// sessions). Churn: `BENCH_SESSIONS_CHURN` (10,000) sessions opened, used once and closed per
/// round, `BENCH_SESSIONS_ROUNDS` (20) rounds, the primary's journal and memory printed each
/// round. Scale: `BENCH_SESSIONS_SCALE` (100,000) sessions held open through
/// `BENCH_SESSIONS_CONNECTORS` (4) connectors — each a Multiplex stream, as a process of its
/// own has — the open rate per thousand, the manager's memory, round trips/s through 256 of them
/// with all open, then a SIGKILL of the primary: how long until each session has a response from
/// the new primary, and that every session gets one.
async fn sessions(seconds: f64) {
    let churn = env_number("BENCH_SESSIONS_CHURN", 10_000);
    let rounds = env_number("BENCH_SESSIONS_ROUNDS", 20);
    let scale = env_number("BENCH_SESSIONS_SCALE", 100_000);
    let connectors: Vec<_> = (0..env_number("BENCH_SESSIONS_CONNECTORS", 4).max(1))
        .map(|_| baton_manager_client::Connector::new(None).expect("a connector"))
        .collect();
    let mut summary = Vec::new();

    if churn > 0 && rounds > 0 {
        let p = pair("churn").await;
        let primary = wait_for_pair(&p.members).await;
        let mut journal = Vec::new();
        let mut snapshots = Vec::new();
        let mut rss = Vec::new();
        for round in 1..=rounds {
            let started = Instant::now();
            let (opened, _) = open_sessions(&connectors, &p.endpoints, "churn", churn, 1000).await;
            let used = round_trip_each(opened, 1000).await;
            let closes: Vec<_> = used
                .into_iter()
                .map(|mut s| tokio::spawn(async move { s.close(false).await.expect("close") }))
                .collect();
            for c in closes {
                c.await.expect("close task");
            }
            let status = manager_status(&p.members[primary]).await.expect("the primary's status");
            let (file, snapshot) = journal_bytes(&p._dirs[primary]);
            let mib = rss_mib(p.members[primary].pid());
            println!(
                "churn round {round:2}: {churn} sessions opened, used and closed in {:.1} s; sessions left {}; journal file {:.1} MiB, snapshot {:.1} KiB; primary RSS {mib:.0} MiB",
                started.elapsed().as_secs_f64(),
                status.sessions,
                file as f64 / 1048576.0,
                snapshot as f64 / 1024.0,
            );
            journal.push(file as f64);
            snapshots.push(snapshot as f64);
            rss.push(mib);
        }
        // flat after the first rounds: the spread of the later half around its median
        let spread = |values: &[f64]| {
            let mut later = values[values.len() / 2..].to_vec();
            let mid = median(&mut later);
            later.iter().map(|v| (v - mid).abs() / mid * 100.0).fold(0.0, f64::max)
        };
        let (j, r) = (spread(&journal), spread(&rss));
        // a snapshot holds the sessions open when it was taken (up to a round's), not more
        let largest = snapshots.iter().copied().fold(0.0, f64::max);
        println!(
            "churn: over the last {} of {rounds} rounds the journal file stays within ±{j:.1}% and the primary's RSS within ±{r:.1}% of their medians; the largest snapshot {:.0} KiB",
            rounds - rounds / 2,
            largest / 1024.0
        );
        summary.push(format!(
            "churn of {churn} sessions × {rounds} rounds: journal file ±{j:.1}%, RSS ±{r:.1}%, snapshots ≤ {:.0} KiB",
            largest / 1024.0
        ));
    }

    if scale > 0 {
        let p = pair("scale").await;
        let primary = wait_for_pair(&p.members).await;
        let started = Instant::now();
        let (opened, waves) = open_sessions(&connectors, &p.endpoints, "scale", scale, 1000).await;
        let total = started.elapsed();
        let rate = |d: Duration| 1000.0 / d.as_secs_f64().max(1e-9);
        // the first wave also connects the streams: the second is the first at steady state
        let (first, last) = (waves[1.min(waves.len() - 1)], waves[waves.len() - 1]);
        let mut all: Vec<f64> = waves.iter().map(|d| rate(*d)).collect();
        let median_rate = median(&mut all);
        println!(
            "scale: {scale} sessions opened in {:.1} s ({:.0}/s), in waves of 1,000: the second wave (1,000-2,000 open) {:.0}/s, median {median_rate:.0}/s, the last {:.0}/s",
            total.as_secs_f64(),
            scale as f64 / total.as_secs_f64(),
            rate(first),
            rate(last)
        );
        let mut sessions = round_trip_each(opened, 2000).await;
        let status = manager_status(&p.members[primary]).await.expect("the primary's status");
        let (primary_rss, standby_rss) = (rss_mib(p.members[primary].pid()), rss_mib(p.members[1 - primary].pid()));
        println!(
            "scale: {} sessions open on the primary; RSS primary {primary_rss:.0} MiB, standby {standby_rss:.0} MiB",
            status.sessions
        );
        // round trips through 256 of them, all open
        let stop = Instant::now() + Duration::from_secs_f64(seconds);
        let busy: Vec<_> = sessions.drain(..256.min(scale)).collect();
        let tasks: Vec<_> = busy
            .into_iter()
            .map(|mut session| {
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while Instant::now() < stop {
                        let at = Instant::now();
                        let payload = prost_types::Any { type_url: "bench".into(), value: vec![0u8; 64] };
                        session.send(payload, Vec::new()).await.expect("send");
                        session.recv().await.expect("response");
                        latencies.push(at.elapsed());
                    }
                    (session, latencies)
                })
            })
            .collect();
        let relay_started = Instant::now();
        let mut all = Vec::new();
        for t in tasks {
            let (session, latencies) = t.await.expect("relay task");
            sessions.push(session);
            all.extend(latencies);
        }
        all.sort();
        let relayed = all.len() as f64 / relay_started.elapsed().as_secs_f64();
        println!(
            "scale: {relayed:.0} round trips/s through 256 sessions with {scale} open, p50 {:.2} ms, p99 {:.2} ms",
            ms(percentile(&all, 0.5)),
            ms(percentile(&all, 0.99))
        );
        // SIGKILL the primary; every session sends one request and waits for its response
        let killed = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p.members[primary].pid() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("SIGKILL");
        // when the standby serves as primary (the lease's part of the takeover)
        let standby_addr = p.members[1 - primary].addr;
        let elected = tokio::spawn(async move {
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://{standby_addr}")).ok()?.connect().await.ok()?;
            let mut client = pb::session_manager_client::SessionManagerClient::new(channel);
            while killed.elapsed() < Duration::from_secs(60) {
                if let Ok(s) = client.status(pb::ManagerStatusRequest {}).await
                    && s.get_ref().role == "PRIMARY"
                {
                    return Some(killed.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            None
        });
        let tasks: Vec<_> = sessions
            .into_iter()
            .map(|mut session| {
                tokio::spawn(async move {
                    let payload = prost_types::Any { type_url: "after-kill".into(), value: vec![1u8; 16] };
                    let sent = tokio::time::timeout(Duration::from_secs(60), session.send(payload, Vec::new())).await;
                    if !matches!(sent, Ok(Ok(_))) {
                        return None;
                    }
                    let accepted = killed.elapsed();
                    let response = tokio::time::timeout(Duration::from_secs(60), session.recv()).await;
                    matches!(response, Ok(Some(_))).then(|| (accepted, killed.elapsed()))
                })
            })
            .collect();
        let mut resumed = Vec::new();
        let mut accepted = Vec::new();
        let mut lost = 0usize;
        for t in tasks {
            match t.await.expect("takeover task") {
                Some((a, took)) => {
                    accepted.push(a);
                    resumed.push(took);
                }
                None => lost += 1,
            }
        }
        resumed.sort();
        accepted.sort();
        println!(
            "scale: the request sent after the kill accepted p50 {:.0} ms, p99 {:.0} ms after the kill",
            ms(percentile(&accepted, 0.5)),
            ms(percentile(&accepted, 0.99))
        );
        let elected = elected.await.ok().flatten().unwrap_or_default();
        println!("scale: the standby served as primary {:.0} ms after the kill", ms(elected));
        let ttl = 2.0;
        let (t50, t99, tmax) =
            (percentile(&resumed, 0.5), percentile(&resumed, 0.99), resumed.last().copied().unwrap_or_default());
        println!(
            "scale: SIGKILL of the primary with {scale} sessions: {} resumed with a response, {lost} without; from the kill p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (lease TTL {ttl:.0} s: target p99 ≤ {:.0} ms)",
            resumed.len(),
            ms(t50),
            ms(t99),
            ms(tmax),
            (ttl + 0.5) * 1000.0
        );
        figures::record(
            format!("sessions: takeover after SIGKILL with {scale} sessions, p99 ({lost} lost)"),
            ms(t99),
            "ms",
            None,
            Target::AtMost((ttl + 0.5) * 1000.0),
        );
        summary.push(format!(
            "{scale} sessions: opened at {median_rate:.0}/s (waves of 1,000: second {:.0}/s, last {:.0}/s), primary RSS {primary_rss:.0} MiB, {relayed:.0} round trips/s, takeover p99 {:.0} ms with {} of {scale} resumed",
            rate(first),
            rate(last),
            ms(t99),
            resumed.len()
        ));
    }
    println!("summary: sessions: {}", summary.join("; "));
}

/// The seeded fault campaign (`baton_tests::campaign`): `chaos-manager --faults N --seed S
/// [--managers M] [--ttl SECONDS] [--sessions K] [--servers K]`. Prints one line per fault, one
/// per kind, then the `chaos:` summary; exits 1 if anything acknowledged was lost or answered
/// twice, or the history or the driver found a violation.
async fn chaos_manager(args: &[String]) {
    let mut flags = std::collections::HashMap::new();
    for pair in args.chunks(2) {
        let [flag, value] = pair else {
            eprintln!("baton-bench chaos-manager: {pair:?} needs a value");
            std::process::exit(64)
        };
        flags.insert(flag.trim_start_matches("--").to_owned(), value.clone());
    }
    let number = |name: &str, default: u64| -> u64 {
        flags.get(name).map_or(default, |v| {
            v.parse().unwrap_or_else(|_| {
                eprintln!("baton-bench chaos-manager: --{name} {v:?} is not a number");
                std::process::exit(64)
            })
        })
    };
    let seed = number("seed", rand::random::<u32>() as u64);
    let config = baton_tests::campaign::Config {
        faults: number("faults", 50) as usize,
        seed,
        managers: number("managers", 2) as usize,
        ttl_secs: number("ttl", 2),
        sessions: number("sessions", 4) as usize,
        servers: number("servers", 2) as usize,
        pace: Duration::from_millis(number("pace-ms", 20)),
        bench_bin: std::env::current_exe().expect("the baton-bench binary"),
        kinds: flags.get("kinds").map_or_else(Vec::new, |v| {
            v.split(',')
                .map(|k| {
                    baton_tests::campaign::Kind::named(k).unwrap_or_else(|| {
                        eprintln!("baton-bench chaos-manager: no fault kind {k:?}");
                        std::process::exit(64)
                    })
                })
                .collect()
        }),
        every_kind_first: flags.get("every-kind-first").is_some_and(|v| v == "true"),
    };
    println!(
        "chaos: seed={seed} faults={} managers={} ttl={}s sessions={} servers={}",
        config.faults, config.managers, config.ttl_secs, config.sessions, config.servers
    );
    let dir = baton_tests::TempDir::new();
    println!("chaos: histories in {}", dir.path().display());
    let outcome = baton_tests::campaign::run(config, dir).await;
    for line in outcome.lines(seed) {
        println!("{line}");
    }
    if !outcome.ok() {
        std::process::exit(1);
    }
}

/// Peak resident memory of a process, in MiB (VmHWM).
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

/// The same rows inserted by the database's own tool: `sqlite3 .import` or `psql \copy` of a
/// CSV (id, fields as JSON) into a plain table, in one transaction. Records per second.
fn raw_insert(backend: Backend, url: &str, csv: &std::path::Path, n: usize) -> f64 {
    let started = Instant::now();
    let status = match backend {
        Backend::Sqlite => {
            let path = url.trim_start_matches("sqlite://").replace("baton.db", "raw.db");
            std::process::Command::new("sqlite3")
                .arg(&path)
                .arg("CREATE TABLE raw (id TEXT PRIMARY KEY, fields TEXT NOT NULL)")
                .arg(".mode csv")
                .arg("BEGIN")
                .arg(format!(".import {} raw", csv.display()))
                .arg("COMMIT")
                .status()
        }
        Backend::Postgres => std::process::Command::new("psql")
            .arg(url)
            .arg("-qc")
            .arg("CREATE TABLE raw (id TEXT PRIMARY KEY, fields JSONB NOT NULL)")
            .arg("-c")
            .arg(format!("\\copy raw FROM '{}' CSV", csv.display()))
            .status(),
    };
    assert!(status.expect("run the raw database tool").success(), "the raw insert failed");
    n as f64 / started.elapsed().as_secs_f64()
}

/// A batch of `BENCH_BATCH_RECORDS` (default 1,000,000) records through `baton dev`: staged,
/// divided into chunks of 10,000, run by the workers; records committed per second beside the
/// raw tool's insert of the same rows, the medians of `BENCH_BATCH_RUNS` (3) runs.
/// `BENCH_BATCH_BACKENDS` (`sqlite`, `postgres`; both when unset) picks the stores.
async fn batch() {
    let n: usize = std::env::var("BENCH_BATCH_RECORDS").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    // BENCH_BATCH_BACKENDS: `sqlite`, `postgres` or both (the default), comma-separated
    let only = std::env::var("BENCH_BATCH_BACKENDS").unwrap_or_default().to_lowercase();
    // BENCH_BATCH_RUNS (3) batches on a fresh `baton dev` each; the figures are the medians
    let runs: usize = std::env::var("BENCH_BATCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
    let mut summary = Vec::new();
    for backend in [Backend::Sqlite, Backend::Postgres] {
        if !only.is_empty() && !only.split(',').any(|b| b.trim() == format!("{backend:?}").to_lowercase()) {
            continue;
        }
        let (mut rates, mut raws, mut rsses, mut ends) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 1..=runs {
            let server = Server::start(backend, &[]).await;
            let org = create_org(&server, "bench").await;
            let records: Vec<_> = (0..n)
                .map(|i| record(json!({"code": format!("c{i:08}"), "name": format!("name {i}"), "amount": i})))
                .collect();
            let header = pb::BatchHeader {
                object: "account".into(),
                operation: pb::BatchOperation::Upsert as i32,
                ..Default::default()
            };
            let started = Instant::now();
            let staged =
                baton_scheduler::client::submit_batch(server.channel().await, &org.key, header, records, |_| {})
                    .await
                    .expect("submit");
            let upload = started.elapsed();
            let staged_at_ms =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
            let mut scheduler = pb::scheduler_client::SchedulerClient::new(server.channel().await);
            let mut stream = scheduler
                .watch_batch(authed(pb::WatchBatchRequest { batch_id: staged.batch_id.clone() }, &org.key))
                .await
                .expect("watch")
                .into_inner();
            let mut last = None;
            while let Some(event) = stream.message().await.expect("watch") {
                last = event.batch;
            }
            let total = started.elapsed();
            // The run ends at the last chunk's commit (the batch's finished_at_ms). The watch polls
            // (every 250 ms), so it learns of that a little later: that delay is shown apart, and
            // counted in the end-to-end figure.
            let watched = total - upload;
            let finished_at_ms = last.as_ref().map_or(0, |b| baton_mesh::proto::unix_ms(b.finish_time.as_ref()));
            let run = Duration::from_millis(
                u64::try_from(finished_at_ms - staged_at_ms).expect("the batch finished after staging"),
            );
            let totals = last.and_then(|b| b.totals).unwrap_or_default();
            assert_eq!(totals.records_committed, n as u64, "every record committed: {totals:?}");
            let rss = peak_rss_mib(server.pid());
            let dir = baton_tests::TempDir::new();
            let csv = dir.path().join("rows.csv");
            {
                use std::io::Write;
                let mut out = std::io::BufWriter::new(std::fs::File::create(&csv).unwrap());
                for i in 0..n {
                    writeln!(
                        out,
                        "c{i:08},\"{{\"\"code\"\":\"\"c{i:08}\"\",\"\"name\"\":\"\"name {i}\"\",\"\"amount\"\":{i}}}\""
                    )
                    .unwrap();
                }
            }
            let raw = raw_insert(backend, &server.store_url, &csv, n);
            let committed = n as f64 / run.as_secs_f64();
            println!(
                "batch {backend:?}, run {round}: {n} records in {} chunks: upload+staging {:.1}s, run to the last commit {:.2}s \
                 (the watch saw it {:.2}s after) -> {committed:.0} records/s committed ({:.0}/s end to end); \
                 raw {} insert of the same rows {raw:.0} records/s ({:.0}%); baton dev peak RSS {rss:.0} MiB",
                totals.chunks,
                upload.as_secs_f64(),
                run.as_secs_f64(),
                watched.as_secs_f64() - run.as_secs_f64(),
                n as f64 / total.as_secs_f64(),
                if backend == Backend::Sqlite { "sqlite3 .import" } else { "psql \\copy" },
                committed / raw * 100.0
            );
            rates.push(committed);
            raws.push(raw);
            rsses.push(rss);
            ends.push(n as f64 / total.as_secs_f64());
        }
        let (committed, raw) = (median(&mut rates), median(&mut raws));
        let rss = rsses.iter().copied().fold(0.0, f64::max);
        println!(
            "batch {backend:?}: median of {runs}: {committed:.0} records/s committed, raw {raw:.0} records/s; \
             baton dev peak RSS at most {rss:.0} MiB"
        );
        summary.push(format!("{backend:?} {committed:.0}/s (raw {raw:.0}/s)"));
        let (loader, whole) =
            (if backend == Backend::Sqlite { "raw sqlite3 .import" } else { "raw psql \\copy" }, median(&mut ends));
        let what = format!("batch {backend:?}, {n} records, end to end");
        figures::record(what, whole, "records/s", Some((loader, raw)), Target::OfPeer(0.5));
        figures::record(
            format!("batch {backend:?}: baton dev peak RSS"),
            rss,
            "MiB",
            None,
            Target::AtMost(RSS_TARGET_MIB),
        );
    }
    println!(
        "summary: batch of {n} records committed: {} (targets: SQLite >= 200000/s, PostgreSQL >= 100000/s)",
        summary.join(", ")
    );
}

/// Loads `n` account records of `org` straight into a SQLite store with `sqlite3` (a read
/// benchmark's fixture: going through a batch would take minutes and measure the batch), then
/// checkpoints the WAL: a store at rest, rather than one whose next commit must first copy the
/// whole load from the WAL into the database.
fn load_sqlite(path: &str, org: &str, n: usize) {
    let sql = format!(
        "PRAGMA busy_timeout = 10000; BEGIN IMMEDIATE; WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i < {last}) \
         INSERT INTO records (org_id, object, id, fields, version, updated_at_ms, deleted) \
         SELECT '{org}', 'account', printf('c%08d', i), \
         json_object('code', printf('c%08d', i), 'name', 'name ' || i, 'amount', i), 1, 0, 0 FROM seq; \
         UPDATE orgs SET last_seq = {n} WHERE id = '{org}'; COMMIT; PRAGMA wal_checkpoint(TRUNCATE);",
        last = n - 1
    );
    let status = std::process::Command::new("sqlite3").arg(path).arg(&sql).status().expect("run sqlite3");
    assert!(status.success(), "loading the records failed");
}

/// Every row of a part (fetched as typed records, as `baton export` does), counted.
async fn fetch_rows(
    mut client: pb::intake_client::IntakeClient<tonic::transport::Channel>,
    key: String,
    token: String,
    part: u32,
) -> usize {
    let request = authed(pb::FetchPartRequest { token, part }, &key);
    let mut stream = client.fetch_part(request).await.expect("fetch").into_inner();
    let mut rows = 0;
    while let Some(frame) = stream.message().await.expect("fetch") {
        rows += frame.records.len();
    }
    rows
}

/// An export of `BENCH_EXPORT_RECORDS` (default 10,000,000) records from `baton dev` on SQLite:
/// time to the first portion over repeated exports (each cancelled at once), then
/// `BENCH_EXPORT_RUNS` (3) whole exports, their parts fetched four at a time as they
/// are produced, each followed by a raw `sqlite3` scan of the same rows: the medians of both
/// rates; then one `baton export` to a file, timed; and peak RSS.
async fn export() {
    let n: usize = std::env::var("BENCH_EXPORT_RECORDS").ok().and_then(|s| s.parse().ok()).unwrap_or(10_000_000);
    let repeats: usize = std::env::var("BENCH_EXPORT_REPEATS").ok().and_then(|s| s.parse().ok()).unwrap_or(50);
    let server = Server::start(Backend::Sqlite, &[]).await;
    let org = create_org(&server, "bench").await;
    let path = server.store_url.trim_start_matches("sqlite://").to_owned();
    let started = Instant::now();
    load_sqlite(&path, &org.id, n);
    println!("export: loaded {n} records with sqlite3 in {:.1}s", started.elapsed().as_secs_f64());
    // the server's own writes (its releaser) waited on the load's lock: let them through, so the
    // first export measures an export, not the tail of the load
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut client = server.intake().await.max_decoding_message_size(64 * 1024 * 1024);
    let mut latencies = Vec::new();
    for _ in 0..repeats {
        let request = pb::ExportRequest { object: "account".into(), ..Default::default() };
        let started = Instant::now();
        let response = client.export(authed(request, &org.key)).await.expect("export").into_inner();
        latencies.push(started.elapsed());
        assert_eq!(response.records.len(), 1000);
        client
            .cancel_export(authed(pb::CancelExportRequest { token: response.token }, &org.key))
            .await
            .expect("cancel");
    }
    let first = latencies[0];
    latencies.sort();
    let (p50, p99) = (percentile(&latencies, 0.50), percentile(&latencies, 0.99));
    let slowest: Vec<String> = latencies.iter().rev().take(3).map(|d| format!("{:.1}", ms(*d))).collect();
    println!(
        "export: the first export (cold caches) took {:.1} ms; the slowest three: {} ms",
        ms(first),
        slowest.join(", ")
    );
    println!(
        "export: first portion (1,000 rows of {n}) over {repeats} exports: p50 {:.1} ms, p99 {:.1} ms",
        ms(p50),
        ms(p99)
    );

    // whole exports alternating with raw scans (both vary from run to run): medians of each
    let runs: usize = std::env::var("BENCH_EXPORT_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let (mut rates, mut raws) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        let (produced, total) = export_all(&mut client, &org, n).await;
        let scan = Instant::now();
        let status = std::process::Command::new("sqlite3")
            .arg(&path)
            .arg(format!(
                "SELECT id, fields, version, updated_at_ms FROM records WHERE org_id = '{}' AND object = 'account' \
                 AND deleted = 0 ORDER BY id",
                org.id
            ))
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run sqlite3");
        assert!(status.success());
        let raw = n as f64 / scan.elapsed().as_secs_f64();
        let rate = n as f64 / total.as_secs_f64();
        println!(
            "export: run {run}: {n} rows produced in {:.1}s ({:.0} rows/s) and fetched by {:.1}s: {rate:.0} rows/s \
             end to end; raw sqlite3 scan of the same rows {raw:.0} rows/s",
            produced.as_secs_f64(),
            n as f64 / produced.as_secs_f64(),
            total.as_secs_f64(),
        );
        rates.push(rate);
        raws.push(raw);
    }
    let (rate, raw) = (median(&mut rates), median(&mut raws));
    // the whole path once more as a user takes it: `baton export` writing the file
    let cli = export_cli(&server, &org, n);
    println!(
        "export: `baton export` wrote the {n} rows to a file in {:.1}s: {:.0} rows/s ({:.0}% of the raw scan's median)",
        cli.as_secs_f64(),
        n as f64 / cli.as_secs_f64(),
        n as f64 / cli.as_secs_f64() / raw * 100.0
    );
    let rss = peak_rss_mib(server.pid());
    let own_rss = peak_rss_mib(std::process::id());
    println!(
        "export: median of {runs}: {rate:.0} rows/s end to end, raw sqlite3 scan {raw:.0} rows/s ({:.0}%); \
         peak RSS: baton dev {rss:.0} MiB, client {own_rss:.0} MiB",
        rate / raw * 100.0
    );
    println!(
        "summary: export of {n}: first portion p50 {:.1} ms p99 {:.1} ms (target p99 <= 20 ms); {rate:.0} rows/s \
         = {:.0}% of the raw scan (target >= 80%); peak RSS {rss:.0} MiB (target < 300 MB)",
        ms(p50),
        ms(p99),
        rate / raw * 100.0
    );
    figures::record(format!("export of {n}: first portion p99"), ms(p99), "ms", None, Target::AtMost(20.0));
    let what = format!("export of {n}: rows fetched end to end");
    figures::record(what, rate, "rows/s", Some(("raw sqlite3 scan", raw)), Target::OfPeer(0.8));
    // the measure: as `baton export` writes the file
    let what = format!("export of {n}: `baton export` to a file");
    let cli_rate = n as f64 / cli.as_secs_f64();
    figures::record(what, cli_rate, "rows/s", Some(("raw sqlite3 scan", raw)), Target::OfPeer(0.8));
    figures::record(format!("export of {n}: baton dev peak RSS"), rss, "MiB", None, Target::AtMost(RSS_TARGET_MIB));
}

/// `baton export account --out FILE` run to its end against `server`: how long it took (the file
/// is checked to hold the `n` rows, then removed).
fn export_cli(server: &Server, org: &baton_tests::TestOrg, n: usize) -> Duration {
    let dir = baton_tests::TempDir::new();
    let out = dir.path().join("accounts.ndjson");
    let started = Instant::now();
    let status = std::process::Command::new(baton_tests::baton_bin())
        .args(["export", "account", "--quiet", "--out"])
        .arg(&out)
        .env("BATON_ENDPOINT", format!("http://{}", server.addr))
        .env("BATON_API_KEY", &org.key)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run baton export");
    let took = started.elapsed();
    assert!(status.success(), "baton export failed: {status}");
    let file = std::fs::File::open(&out).expect("the exported file");
    let lines = std::io::BufRead::split(std::io::BufReader::new(file), b'\n').count();
    assert_eq!(lines, n, "every record written once");
    took
}

/// One whole export of the `n` records: the Export call, then its parts fetched four at a time
/// as they are produced. Answers when every part was produced and when every row was fetched.
async fn export_all(
    client: &mut pb::intake_client::IntakeClient<tonic::transport::Channel>,
    org: &baton_tests::TestOrg,
    n: usize,
) -> (Duration, Duration) {
    let started = Instant::now();
    let request = pb::ExportRequest { object: "account".into(), ..Default::default() };
    let response = client.export(authed(request, &org.key)).await.expect("export").into_inner();
    let token = response.token.clone();
    let mut rows = response.records.len();
    let mut fetching: tokio::task::JoinSet<usize> = tokio::task::JoinSet::new();
    let mut asked = std::collections::HashSet::new();
    let mut produced_at = None;
    loop {
        let status = client
            .get_export(authed(pb::GetExportRequest { token: token.clone() }, &org.key))
            .await
            .expect("get")
            .into_inner();
        for part in &status.parts {
            if asked.insert(part.number) {
                while fetching.len() >= 4 {
                    rows += fetching.join_next().await.unwrap().unwrap();
                }
                fetching.spawn(fetch_rows(client.clone(), org.key.clone(), token.clone(), part.number));
            }
        }
        if status.state == pb::ExportState::Complete as i32 && produced_at.is_none() {
            produced_at = Some(started.elapsed());
        }
        if produced_at.is_some() && asked.len() as u32 == status.parts_total {
            break;
        }
        assert!(status.state <= pb::ExportState::Complete as i32, "the export ended: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while let Some(done) = fetching.join_next().await {
        rows += done.unwrap();
    }
    let total = started.elapsed();
    assert_eq!(rows, n, "every record exported once");
    (produced_at.unwrap_or(total), total)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let area = args.next().unwrap_or_default();
    let seconds: f64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5.0);
    // the driver's own logs (the client library's reconnects, say), off unless asked for
    if let Ok(log) = std::env::var("BENCH_LOG") {
        let options = baton_mesh::config::TelemetryOptions {
            log,
            log_format: baton_mesh::config::LogFormat::Text,
            otlp_endpoint: None,
        };
        baton_mesh::telemetry::init_tracing(&options, "baton-bench").expect("BENCH_LOG is a log filter");
    }
    match area.as_str() {
        "intake" => intake(seconds).await,
        "sync" => sync(seconds).await,
        "manager" => manager(seconds).await,
        "sessions" => sessions(seconds).await,
        "batch" => batch().await,
        "export" => export().await,
        "all" => {
            // every area in turn, one table at the end
            intake(seconds).await;
            sync(seconds).await;
            manager(seconds).await;
            sessions(seconds).await;
            batch().await;
            export().await;
        }
        "echo-server" => {
            let mut arg = |what: &str| {
                args.next().unwrap_or_else(|| {
                    eprintln!("baton-bench echo-server ENDPOINT POOL SERVER_ID: {what} is missing");
                    std::process::exit(64)
                })
            };
            let (endpoint, pool, id) = (arg("ENDPOINT"), arg("POOL"), arg("SERVER_ID"));
            echo_server(&endpoint, &pool, &id).await
        }
        "chaos-manager" => chaos_manager(&args.collect::<Vec<_>>()).await,
        "chaos-client" => {
            let a: Vec<String> = args.collect();
            let [endpoints, sessions, pace_ms, history, stop] = a.as_slice() else {
                eprintln!("baton-bench chaos-client ENDPOINTS SESSIONS PACE_MS HISTORY STOP_FILE");
                std::process::exit(64)
            };
            let (sessions, pace) = (sessions.parse().unwrap_or(1), pace_ms.parse().unwrap_or(20));
            baton_tests::campaign::client_process(
                endpoints,
                sessions,
                Duration::from_millis(pace),
                std::path::Path::new(history),
                std::path::Path::new(stop),
            )
            .await
        }
        "chaos-server" => {
            let a: Vec<String> = args.collect();
            let [endpoints, id, history] = a.as_slice() else {
                eprintln!("baton-bench chaos-server ENDPOINTS SERVER_ID HISTORY");
                std::process::exit(64)
            };
            baton_tests::campaign::server_process(endpoints, id, std::path::Path::new(history)).await
        }
        other => {
            eprintln!(
                "baton-bench: unknown area {other:?}; areas: intake, sync, manager, sessions, batch, export, all, \
                 chaos-manager --faults N --seed S, echo-server ENDPOINT POOL SERVER_ID, chaos-client …, chaos-server …"
            );
            std::process::exit(64);
        }
    }
    if let Some(table) = figures::table() {
        println!("\n{table}");
    }
}
