//! The store suite: every test runs on SQLite and, when `BATON_TEST_POSTGRES_URL` is set (as
//! `scripts/test.sh` does), on PostgreSQL too.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use baton_mesh::auth::{KeyLookup, hash_key};
use baton_store::model::{ChangeOp, FieldSpec, FieldType, Fields, ObjectSchema};
use baton_store::testing::{self, TestStore};
use baton_store::{Backend, Error, Store};
use serde_json::json;
use sqlx::Executor;
use tokio::time::Instant;

fn account() -> ObjectSchema {
    let f = |name: &str, field_type, required, unique| FieldSpec { name: name.into(), field_type, required, unique };
    ObjectSchema {
        name: "account".into(),
        external_id_field: "code".into(),
        fields: vec![
            f("code", FieldType::String, true, true),
            f("email", FieldType::String, false, true),
            f("amount", FieldType::Integer, false, false),
            f("score", FieldType::Number, false, false),
            f("active", FieldType::Boolean, false, false),
            f("status", FieldType::String, false, false),
        ],
    }
}

fn rec(v: serde_json::Value) -> Fields {
    v.as_object().unwrap().clone()
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

async fn org_with_account(store: &Store) -> String {
    let org = store.create_org("acme").await.unwrap();
    store.define_object(&org.id, &account()).await.unwrap();
    org.id
}

async fn each_backend<F, Fut>(test: F)
where
    F: Fn(TestStore) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for backend in testing::backends() {
        eprintln!("-- on {backend:?}");
        test(testing::open(backend).await.unwrap()).await;
    }
}

#[tokio::test]
async fn keys_resolve_to_their_org_until_revoked() {
    each_backend(|t| async move {
        let s = &t.store;
        let org = s.create_org("acme").await.unwrap();
        let key = s.create_api_key(&org.id, "svc").await.unwrap();
        assert!(key.api_key.starts_with("bk_"));
        assert_eq!(s.lookup_key(&hash_key(&key.api_key)).await.unwrap(), KeyLookup::Org(org.id.clone()));
        assert_eq!(s.lookup_key(&hash_key("bk_guess")).await.unwrap(), KeyLookup::Unknown);
        s.revoke_api_key(&key.key_id).await.unwrap();
        s.revoke_api_key(&key.key_id).await.unwrap();
        assert_eq!(s.lookup_key(&hash_key(&key.api_key)).await.unwrap(), KeyLookup::Revoked);
        assert!(matches!(s.revoke_api_key("key_nope").await, Err(Error::NotFound(_))));
        assert!(matches!(s.create_api_key("org_nope", "").await, Err(Error::NotFound(_))));
        assert!(matches!(s.create_org("  ").await, Err(Error::Invalid(_))));
    })
    .await;
}

#[tokio::test]
async fn objects_are_defined_once_and_validated() {
    each_backend(|t| async move {
        let s = &t.store;
        let org = org_with_account(s).await;
        assert!(matches!(s.define_object(&org, &account()).await, Err(Error::AlreadyExists(_))));
        let mut bad = account();
        bad.external_id_field = "nope".into();
        match s.define_object(&org, &bad).await {
            Err(Error::Invalid(errors)) => assert_eq!(errors[0].field, "schema.external_id_field"),
            other => panic!("expected invalid, got {other:?}"),
        }
        assert_eq!(s.list_objects(&org).await.unwrap(), vec![account()]);
        assert!(matches!(s.object(&org, "missing").await, Err(Error::NotFound(_))));
    })
    .await;
}

#[tokio::test]
async fn upsert_get_delete_keep_versions_and_change_events() {
    each_backend(|t| async move {
        let s = &t.store;
        let org = org_with_account(s).await;
        let (out, last) = s
            .upsert(
                &org,
                "account",
                vec![rec(json!({"code": "a", "amount": 1})), rec(json!({"code": "b", "email": "b@x"}))],
                soon(),
            )
            .await
            .unwrap();
        assert_eq!(last, 2);
        assert!(out.iter().all(|o| o.created && o.version == 1));
        let (out, last) =
            s.upsert(&org, "account", vec![rec(json!({"code": "a", "amount": 2}))], soon()).await.unwrap();
        assert_eq!((out[0].version, out[0].created, last), (2, false, 3));
        let a = s.get(&org, "account", "a", soon()).await.unwrap();
        assert_eq!((a.version, a.fields["amount"].as_i64()), (2, Some(2)));

        let (del, last) = s.delete(&org, "account", vec!["b".into(), "zz".into()], soon()).await.unwrap();
        assert_eq!((del[0].deleted, del[0].version, del[1].deleted, last), (true, 2, false, 4));
        assert!(matches!(s.get(&org, "account", "b", soon()).await, Err(Error::NotFound(_))));
        // the deleted record's unique email is free again, and re-creating continues its versions
        let (out, _) = s
            .upsert(&org, "account", vec![rec(json!({"code": "c", "email": "b@x"})), rec(json!({"code": "b"}))], soon())
            .await
            .unwrap();
        assert_eq!((out[1].version, out[1].created), (3, true));

        let events = s.changes_after(&org, 0, 100).await.unwrap();
        let summary: Vec<_> = events.iter().map(|e| (e.seq, e.record_id.as_str(), e.op, e.version)).collect();
        assert_eq!(
            summary,
            vec![
                (1, "a", ChangeOp::Upsert, 1),
                (2, "b", ChangeOp::Upsert, 1),
                (3, "a", ChangeOp::Upsert, 2),
                (4, "b", ChangeOp::Delete, 2),
                (5, "c", ChangeOp::Upsert, 1),
                (6, "b", ChangeOp::Upsert, 3),
            ]
        );
        assert_eq!(events[2].fields.as_ref().unwrap()["amount"], json!(2));
        assert_eq!(s.high_water(&org).await.unwrap(), 6);
    })
    .await;
}

#[tokio::test]
async fn invalid_records_commit_nothing_and_list_every_problem() {
    each_backend(|t| async move {
        let s = &t.store;
        let org = org_with_account(s).await;
        s.upsert(&org, "account", vec![rec(json!({"code": "a", "email": "taken@x"}))], soon()).await.unwrap();
        let before = s.high_water(&org).await.unwrap();
        let bad = vec![
            rec(json!({"code": "b", "amount": "ten"})),
            rec(json!({"code": "c", "colour": "red"})),
            rec(json!({"amount": 3})),
        ];
        match s.upsert(&org, "account", bad, soon()).await {
            Err(Error::Invalid(errors)) => {
                let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
                assert_eq!(fields, ["records[0].amount", "records[1].colour", "records[2].code"]);
            }
            other => panic!("expected invalid, got {other:?}"),
        }
        // a unique value held by another record fails the whole request, the valid record too
        let clash = vec![rec(json!({"code": "d"})), rec(json!({"code": "e", "email": "taken@x"}))];
        match s.upsert(&org, "account", clash, soon()).await {
            Err(Error::Invalid(errors)) => {
                assert_eq!(errors.len(), 1);
                assert_eq!(errors[0].field, "records[1].email");
                assert!(errors[0].description.contains("already used by record \"a\""), "{}", errors[0].description);
            }
            other => panic!("expected invalid, got {other:?}"),
        }
        assert_eq!(s.high_water(&org).await.unwrap(), before);
        assert!(matches!(s.get(&org, "account", "d", soon()).await, Err(Error::NotFound(_))));
        assert_eq!(s.count_records(&org, "account").await.unwrap(), 1);
        assert!(matches!(
            s.upsert(&org, "nope", vec![rec(json!({"code": "x"}))], soon()).await,
            Err(Error::NotFound(_))
        ));
    })
    .await;
}

#[tokio::test]
async fn orgs_never_see_each_other() {
    each_backend(|t| async move {
        let s = &t.store;
        let a = org_with_account(s).await;
        let b = org_with_account(s).await;
        s.upsert(&a, "account", vec![rec(json!({"code": "secret", "email": "s@a"}))], soon()).await.unwrap();
        assert!(matches!(s.get(&b, "account", "secret", soon()).await, Err(Error::NotFound(_))));
        assert!(s.query(&b, "account", "", &[], 10, None, soon()).await.unwrap().records.is_empty());
        let (del, _) = s.delete(&b, "account", vec!["secret".into()], soon()).await.unwrap();
        assert!(!del[0].deleted);
        // the same id and unique value in org B are B's own
        let (out, _) =
            s.upsert(&b, "account", vec![rec(json!({"code": "secret", "email": "s@a"}))], soon()).await.unwrap();
        assert!(out[0].created);
        assert_eq!(s.get(&a, "account", "secret", soon()).await.unwrap().version, 1);
        assert_eq!(s.high_water(&a).await.unwrap(), 1);
        assert_eq!(s.high_water(&b).await.unwrap(), 1);
    })
    .await;
}

#[tokio::test]
async fn filters_select_exactly_and_pages_follow_id_order() {
    each_backend(|t| async move {
        let s = &t.store;
        let org = org_with_account(s).await;
        let records: Vec<Fields> = (0..30)
            .map(|i| {
                let status = ["open", "late", "done"][i as usize % 3];
                let mut r = json!({"code": format!("r{i:02}"), "amount": i, "score": f64::from(i) / 2.0,
                                   "active": i % 2 == 0, "status": status});
                if i % 5 == 0 {
                    r.as_object_mut().unwrap().remove("status");
                }
                rec(r)
            })
            .collect();
        s.upsert(&org, "account", records, soon()).await.unwrap();
        let ids = |filter: &'static str| {
            let s = s.clone();
            let org = org.clone();
            async move {
                let page = s.query(&org, "account", filter, &[], 200, None, soon()).await.unwrap();
                page.records.into_iter().map(|r| r.id[1..].parse::<i64>().unwrap()).collect::<Vec<_>>()
            }
        };
        let expect = |f: &dyn Fn(i64) -> bool| (0..30).filter(|i| f(*i)).collect::<Vec<_>>();
        assert_eq!(ids("amount >= 25").await, expect(&|i| i >= 25));
        assert_eq!(ids("amount < 3 OR amount = 29").await, expect(&|i| i < 3 || i == 29));
        assert_eq!(ids("active = true AND score > 10").await, expect(&|i| i % 2 == 0 && i > 20));
        assert_eq!(
            ids("status IN ('open', 'late') AND amount <= 6").await,
            expect(&|i| i <= 6 && i % 5 != 0 && i % 3 != 2)
        );
        assert_eq!(ids("status IS NULL").await, expect(&|i| i % 5 == 0));
        assert_eq!(ids("NOT status = 'open'").await, expect(&|i| i % 5 == 0 || i % 3 != 0));
        assert_eq!(
            ids("status NOT IN ('done') AND NOT (amount > 5)").await,
            expect(&|i| i <= 5 && i % 5 != 0 && i % 3 != 2)
        );
        assert_eq!(ids("id = 'r07' OR email IS NOT NULL").await, vec![7]);
        assert_eq!(ids("score = 2.5").await, vec![5]);

        let mut after = None;
        let mut seen = Vec::new();
        for _ in 0..10 {
            let page = s
                .query(&org, "account", "amount >= 10", &["amount".into()], 7, after.as_deref(), soon())
                .await
                .unwrap();
            assert!(page.records.iter().all(|r| r.fields.len() == 1));
            seen.extend(page.records.iter().map(|r| r.id.clone()));
            after = page.next_after;
            if after.is_none() {
                break;
            }
        }
        assert_eq!(seen, (10..30).map(|i| format!("r{i:02}")).collect::<Vec<_>>());

        for (filter, fragment) in
            [("amount > 'x'", "is integer"), ("colour = 1", "unknown field"), ("amount >", "expected a value")]
        {
            match s.query(&org, "account", filter, &[], 10, None, soon()).await {
                Err(Error::Invalid(errors)) => {
                    assert_eq!(errors[0].field, "filter");
                    assert!(errors[0].description.contains(fragment), "{filter}: {}", errors[0].description);
                }
                other => panic!("{filter}: expected invalid, got {other:?}"),
            }
        }
    })
    .await;
}

/// Many writers on one org: seqs are 1..N without gaps or repeats, and in commit order — the
/// versions of each record rise by one from seq to seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_leave_seqs_dense_and_commit_ordered() {
    each_backend(|t| async move {
        let s = t.store.clone();
        let org = org_with_account(&s).await;
        let writers = 24;
        let rounds = 10;
        let mut tasks = Vec::new();
        for w in 0..writers {
            let (s, org) = (s.clone(), org.clone());
            tasks.push(tokio::spawn(async move {
                for r in 0..rounds {
                    let records = (0..3)
                        .map(|k| rec(json!({"code": format!("shared{}", (w + r + k) % 5), "amount": w * 100 + r})))
                        .collect();
                    s.upsert(&org, "account", records, Instant::now() + Duration::from_secs(60)).await.unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let total = (writers * rounds * 3) as i64;
        let events = s.changes_after(&org, 0, 10_000).await.unwrap();
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=total).collect::<Vec<_>>());
        let mut versions: HashMap<&str, i64> = HashMap::new();
        for e in &events {
            let v = versions.entry(&e.record_id).or_insert(0);
            assert_eq!(e.version, *v + 1, "record {} at seq {}", e.record_id, e.seq);
            *v = e.version;
        }
        assert_eq!(s.high_water(&org).await.unwrap(), total);
        let final_versions: BTreeMap<_, _> = versions.into_iter().collect();
        for (id, v) in final_versions {
            assert_eq!(s.get(&org, "account", id, soon()).await.unwrap().version, v);
        }
    })
    .await;
}

/// A write that cannot finish before its deadline (another connection holds the lock it needs) is
/// rolled back: nothing of it is committed, even after the lock is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_past_its_deadline_commits_nothing() {
    each_backend(|t| async move {
        let s = &t.store;
        let org = org_with_account(s).await;
        sqlx::any::install_default_drivers();
        let blocker = sqlx::any::AnyPoolOptions::new().max_connections(1).connect(&t.url).await.unwrap();
        let mut conn = blocker.acquire().await.unwrap();
        match s.backend() {
            Backend::Sqlite => {
                conn.execute("BEGIN IMMEDIATE").await.unwrap();
            }
            Backend::Postgres => {
                conn.execute("BEGIN").await.unwrap();
                conn.execute(format!("SELECT 1 FROM orgs WHERE id = '{org}' FOR UPDATE").as_str()).await.unwrap();
            }
        }
        let started = Instant::now();
        let result = s
            .upsert(&org, "account", vec![rec(json!({"code": "late"}))], Instant::now() + Duration::from_millis(300))
            .await;
        match result {
            Err(Error::DeadlineExceeded { limit, elapsed }) => {
                assert!(limit <= Duration::from_millis(300));
                assert!(elapsed >= Duration::from_millis(290), "{elapsed:?}");
            }
            other => panic!("expected a deadline overrun, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(3));
        conn.execute("ROLLBACK").await.unwrap();
        drop(conn);
        blocker.close().await;
        // the rolled-back write left nothing, and the store works again
        assert!(matches!(s.get(&org, "account", "late", soon()).await, Err(Error::NotFound(_))));
        assert_eq!(s.high_water(&org).await.unwrap(), 0);
        let (_, last) = s.upsert(&org, "account", vec![rec(json!({"code": "next"}))], soon()).await.unwrap();
        assert_eq!(last, 1);
    })
    .await;
}
