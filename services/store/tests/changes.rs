//! Pushed changes: a follower waiting on `Store::changes_watch` is woken by a commit, in the same
//! store and (PostgreSQL, LISTEN/NOTIFY) in another one on the same database, and its fallback
//! still finds a change that no one announced. Every test runs on SQLite and, when
//! `BATON_TEST_POSTGRES_URL` is set, on PostgreSQL too.

use std::time::Duration;

use baton_store::changes::Woken;
use baton_store::model::{FieldSpec, FieldType, Fields, ObjectSchema};
use baton_store::testing;
use baton_store::{Backend, Store, StoreOptions};
use serde_json::json;
use sqlx::Executor;
use tokio::time::Instant;

fn account() -> ObjectSchema {
    ObjectSchema {
        name: "account".into(),
        external_id_field: "code".into(),
        fields: vec![FieldSpec {
            name: "code".into(),
            field_type: FieldType::String,
            required: true,
            unique: true,
            deprecated: false,
        }],
        dropped_fields: vec![],
        version: 0,
    }
}

fn rec(code: &str) -> Fields {
    json!({ "code": code }).as_object().unwrap().clone()
}

/// Upserts one record into `org`'s accounts; the org's last seq afterwards.
async fn write(store: &Store, org: &str, code: &str) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    store.upsert(org, "account", vec![rec(code)], deadline).await.unwrap().1
}

/// Waits on a watch of `org` in `follower` for a commit after `after` (at most 10 wake-ups, each
/// bounded by `fallback`), and answers when it was woken by one.
async fn woken_after(follower: Store, org: String, after: i64, fallback: Duration) -> (Instant, Woken) {
    let mut watch = follower.changes_watch(&org);
    for _ in 0..10 {
        match watch.wait(after, fallback).await {
            // a wake-up without a newer seq: the listener (re)started and asks everyone to read
            Woken::Notified if watch.latest() <= after => continue,
            woken => return (Instant::now(), woken),
        }
    }
    panic!("woken ten times without a commit after seq {after}");
}

/// The latency from a commit (its upsert's return) to the wake-up of a follower of `follower`,
/// five times; every wake-up by a notification, none by the fallback.
async fn commit_wakes(writer: &Store, follower: &Store, org: &str, label: &str) {
    for round in 0..5 {
        let cursor = follower.high_water(org).await.unwrap();
        let waiting = tokio::spawn(woken_after(follower.clone(), org.to_owned(), cursor, Duration::from_secs(10)));
        // the follower waits (and a new PostgreSQL listener listens) before the commit
        tokio::time::sleep(Duration::from_millis(300)).await;
        let seq = write(writer, org, &format!("{label}-{round}")).await;
        let committed = Instant::now();
        let (woken_at, woken) = tokio::time::timeout(Duration::from_secs(15), waiting).await.unwrap().unwrap();
        assert_eq!(woken, Woken::Notified, "{label}: round {round} woken by the fallback");
        let latency = woken_at.saturating_duration_since(committed);
        eprintln!("{label}: round {round}: seq {seq} woke the follower {latency:?} after the commit returned");
        assert!(latency <= Duration::from_millis(50), "{label}: round {round}: woken {latency:?} after the commit");
        // the hint is only a hint: the follower finds the change by reading from its cursor
        let events = follower.changes_since(org, cursor, 100).await.unwrap();
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![seq]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_wakes_a_waiting_follower_within_50ms() {
    for backend in testing::backends() {
        let test = testing::open(backend).await.unwrap();
        let store = &test.store;
        let org = store.create_org("acme").await.unwrap().id;
        store.define_object(&org, &account()).await.unwrap();
        commit_wakes(store, store, &org, &format!("{backend:?}, same store")).await;
        if backend == Backend::Postgres {
            // another store on the database (another process, as far as the store can tell):
            // woken by LISTEN/NOTIFY
            let other = Store::open(&StoreOptions::new(test.url.clone())).await.unwrap();
            commit_wakes(store, &other, &org, "Postgres, another store").await;
            other.close().await;
        }
    }
}

/// Commits a change event through a connection of its own, as another process would (a SQLite
/// file shared by processes, a writer killed before its notification): nothing announces it.
async fn commit_unannounced(url: &str, org: &str) -> i64 {
    sqlx::any::install_default_drivers();
    let pool = sqlx::any::AnyPoolOptions::new().max_connections(1).connect(url).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let row: (i64,) = sqlx::query_as("UPDATE orgs SET last_seq = last_seq + 1 WHERE id = $1 RETURNING last_seq")
        .bind(org)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO change_events (org_id, seq, object, record_id, op, fields, version, committed_at_ms) \
         VALUES ($1, $2, 'account', 'ghost', 'DELETE', NULL, 1, 0)",
    )
    .bind(org)
    .bind(row.0)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    pool.close().await;
    row.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_finds_a_change_no_one_announced() {
    for backend in testing::backends() {
        let test = testing::open(backend).await.unwrap();
        let store = &test.store;
        let org = store.create_org("acme").await.unwrap().id;
        store.define_object(&org, &account()).await.unwrap();
        let cursor = write(store, &org, "a").await;
        let fallback = Duration::from_millis(400);
        let waiting = tokio::spawn(woken_after(store.clone(), org.clone(), cursor, fallback));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let seq = commit_unannounced(&test.url, &org).await;
        let (_, woken) = tokio::time::timeout(Duration::from_secs(10), waiting).await.unwrap().unwrap();
        assert_eq!(woken, Woken::Fallback, "{backend:?}: a change committed by another connection was announced");
        // what the follower reads next, from its cursor
        let events = store.changes_since(&org, cursor, 100).await.unwrap();
        assert_eq!(events.iter().map(|e| (e.seq, e.record_id.as_str())).collect::<Vec<_>>(), vec![(seq, "ghost")]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_listen_connection_listens_again_and_wakes_its_followers() {
    if !testing::backends().contains(&Backend::Postgres) {
        eprintln!("note: PostgreSQL only; skipped");
        return;
    }
    let test = testing::open(Backend::Postgres).await.unwrap();
    let store = &test.store;
    let org = store.create_org("acme").await.unwrap().id;
    store.define_object(&org, &account()).await.unwrap();
    let follower = Store::open(&StoreOptions::new(test.url.clone())).await.unwrap();
    // listening, and woken once by a commit
    commit_wakes(store, &follower, &org, "before the loss").await;
    // the listener's connection is killed by the server
    let pool = sqlx::any::AnyPoolOptions::new().max_connections(1).connect(&test.url).await.unwrap();
    let killed: Vec<(bool,)> = sqlx::query_as(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(!killed.is_empty(), "no LISTEN connection found");
    pool.execute("SELECT 1").await.unwrap();
    pool.close().await;
    // the follower listens again by itself, and commits wake it as before
    tokio::time::sleep(Duration::from_secs(1)).await;
    commit_wakes(store, &follower, &org, "after the loss").await;
    follower.close().await;
}

/// Progress: a watch of a batch or an export is woken by each commit that changes it, in the same
/// store and (PostgreSQL) in another one, and not by the commits of another batch.
mod progress {
    use std::future::Future;

    use super::*;
    use baton_store::batches::{BatchOp, BatchStart, ChunkStart, ChunkState, NewBatch};
    use baton_store::changes::{ProgressWatch, Topic};
    use baton_store::exports::{ExportSpec, ExportStart, ExportState};

    /// Stages a batch of two 1-record chunks and queues it; its id.
    async fn queued_batch(store: &Store, org: &str, prefix: &str) -> String {
        let new = NewBatch {
            object: "account".into(),
            operation: BatchOp::Upsert,
            chunk_size: 1,
            not_before_ms: 0,
            max_parallel: 0,
            records_per_second: 0,
            request_id: None,
            traceparent: String::new(),
            webhook: None,
        };
        let BatchStart::New(id) = store.begin_batch(org, &new).await.unwrap() else { panic!("a new batch") };
        for i in 0..2u32 {
            store.stage_chunk(org, &id, i, u64::from(i), &[rec(&format!("{prefix}{i}"))]).await.unwrap();
        }
        store.finish_staging(org, &id, 2, 2).await.unwrap();
        id
    }

    /// Runs `step` (a commit of a batch's or an export's progress) while `watch` waits: `watch`
    /// is woken by an announcement, not before the step began and within 50 ms of its return,
    /// and `quiet`, a watch of another topic, is not woken.
    async fn step_wakes(
        watch: &mut ProgressWatch,
        quiet: &mut ProgressWatch,
        label: &str,
        step: impl Future<Output = ()>,
    ) {
        let waiter = async {
            let woken = watch.wait().await;
            (Instant::now(), woken)
        };
        let stepper = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let began = Instant::now();
            step.await;
            (began, Instant::now())
        };
        // shorter than the fallback of every watch here (1 s at least)
        let quiet_wait = tokio::time::timeout(Duration::from_millis(700), quiet.wait());
        let ((woken_at, woken), (began, returned), quiet_woken) = tokio::join!(waiter, stepper, quiet_wait);
        assert_eq!(woken, Woken::Notified, "{label}: woken by the fallback");
        assert!(woken_at >= began, "{label}: woken before the step");
        let latency = woken_at.saturating_duration_since(returned);
        eprintln!("{label}: woken {latency:?} after the step returned");
        assert!(latency <= Duration::from_millis(50), "{label}: woken {latency:?} after the step returned");
        assert!(quiet_woken.is_err(), "{label}: a watch of another topic was woken");
        // a step of several commits (parts planned one by one) is announced as many times: what
        // it announced after the wake-up is taken now, not in the next step
        let _ = tokio::time::timeout(Duration::from_millis(200), watch.wait()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_commit_of_a_batch_or_an_export_wakes_its_watchers_and_no_others_within_50ms() {
        for backend in testing::backends() {
            let test = testing::open(backend).await.unwrap();
            let store = &test.store;
            let org = store.create_org("acme").await.unwrap().id;
            store.define_object(&org, &account()).await.unwrap();
            for code in ["x1", "x2", "x3"] {
                write(store, &org, code).await;
            }
            let mut watchers = vec![(store.clone(), format!("{backend:?}, same store"))];
            if backend == Backend::Postgres {
                // another store on the database (another process, as far as the store can tell):
                // woken by LISTEN/NOTIFY, its fallback out of the test's reach
                let mut options = StoreOptions::new(test.url.clone());
                options.watch_poll = Duration::from_secs(60);
                watchers.push((Store::open(&options).await.unwrap(), "Postgres, another store".into()));
            }
            for (n, (watcher, label)) in watchers.iter().enumerate() {
                // a PostgreSQL listener that starts wakes every watch once: it listens first
                let warm_up = watcher.progress_watch(Topic::Batch("warm-up"));
                tokio::time::sleep(Duration::from_millis(500)).await;
                drop(warm_up);
                let batch = queued_batch(store, &org, &format!("b{n}-")).await;
                let other = queued_batch(store, &org, &format!("o{n}-")).await;
                // their staging is announced too (on PostgreSQL a few ms later): before the watches
                tokio::time::sleep(Duration::from_millis(200)).await;
                let mut watch = watcher.progress_watch(Topic::Batch(&batch));
                let mut quiet = watcher.progress_watch(Topic::Batch(&other));
                step_wakes(&mut watch, &mut quiet, &format!("{label}: a chunk started"), async {
                    assert_eq!(store.start_chunk(&batch, 0, "w1").await.unwrap(), ChunkStart::Run);
                })
                .await;
                step_wakes(&mut watch, &mut quiet, &format!("{label}: a chunk committed"), async {
                    let (budget, lock) = (Duration::from_secs(10), Duration::from_secs(1));
                    store.run_chunk(&batch, 0, ChunkState::Committed, "", budget, lock).await.unwrap();
                })
                .await;
                step_wakes(&mut watch, &mut quiet, &format!("{label}: the batch cancelled"), async {
                    store.cancel_batch(&org, &batch).await.unwrap();
                })
                .await;

                let spec = ExportSpec {
                    object: "account".into(),
                    filter: String::new(),
                    fields: vec![],
                    sync_rows: 1,
                    part_rows: 1,
                    request_id: None,
                    traceparent: String::new(),
                    webhook: None,
                };
                let deadline = Instant::now() + Duration::from_secs(10);
                let started = store.start_export(&org, &spec, deadline, Duration::from_secs(600)).await.unwrap();
                let ExportStart::Started { export, .. } = started else { panic!("{label}: an asynchronous export") };
                let mut watch = watcher.progress_watch(Topic::Export(&export.id));
                step_wakes(&mut watch, &mut quiet, &format!("{label}: export parts planned"), async {
                    assert!(store.plan_exports(Duration::from_secs(5)).await.unwrap() > 0);
                })
                .await;
                step_wakes(&mut watch, &mut quiet, &format!("{label}: the export cancelled"), async {
                    store.end_export(&export.id, ExportState::Cancelled, "").await.unwrap();
                })
                .await;
            }
        }
    }

    /// A commit no one announced (another process writing the SQLite file) is found after the
    /// fallback interval.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_an_announcement_a_watch_returns_after_its_fallback() {
        for backend in testing::backends() {
            let test = testing::open(backend).await.unwrap();
            let mut options = StoreOptions::new(test.url.clone());
            options.watch_poll = Duration::from_millis(300);
            let store = Store::open(&options).await.unwrap();
            // a PostgreSQL listener that starts wakes every watch once: it listens first
            let warm_up = store.progress_watch(Topic::Batch("warm-up"));
            tokio::time::sleep(Duration::from_millis(500)).await;
            drop(warm_up);
            let mut watch = store.progress_watch(Topic::Batch("unannounced"));
            let began = Instant::now();
            let woken = tokio::time::timeout(Duration::from_secs(10), watch.wait()).await.unwrap();
            let waited = began.elapsed();
            assert_eq!(woken, Woken::Fallback, "{backend:?}");
            assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(5), "{backend:?}: {waited:?}");
            store.close().await;
        }
    }
}
