//! The store suite: every test runs on SQLite and, when `BATON_TEST_POSTGRES_URL` is set (as
//! `scripts/test.sh` does), on PostgreSQL too.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use baton_store::admin::{KeyLookup, hash_key};
use baton_store::model::{ChangeOp, FieldSpec, FieldType, Fields, ObjectSchema, Record};
use baton_store::testing::{self, TestStore};
use baton_store::{Backend, Error, Store};
use serde_json::json;
use sqlx::Executor;
use tokio::time::Instant;

fn account() -> ObjectSchema {
    let f = |name: &str, field_type, required, unique| FieldSpec {
        name: name.into(),
        field_type,
        required,
        unique,
        deprecated: false,
    };
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
        dropped_fields: vec![],
        version: 0,
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
        // the same definition again (a retry) answers the object; another one is ALREADY_EXISTS
        assert_eq!(s.define_object(&org, &account()).await.unwrap().version, 1);
        let mut other = account();
        other.fields.pop();
        assert!(matches!(s.define_object(&org, &other).await, Err(Error::AlreadyExists(_))));
        let mut bad = account();
        bad.external_id_field = "nope".into();
        match s.define_object(&org, &bad).await {
            Err(Error::Invalid(errors)) => assert_eq!(errors[0].field, "schema.external_id_field"),
            other => panic!("expected invalid, got {other:?}"),
        }
        assert_eq!(s.list_objects(&org).await.unwrap(), vec![ObjectSchema { version: 1, ..account() }]);
        assert!(matches!(s.object(&org, "missing").await, Err(Error::NotFound(_))));
    })
    .await;
}

fn member() -> ObjectSchema {
    let f = |name: &str, field_type, required, unique| FieldSpec {
        name: name.into(),
        field_type,
        required,
        unique,
        deprecated: false,
    };
    ObjectSchema {
        name: "member".into(),
        external_id_field: "code".into(),
        fields: vec![
            f("code", FieldType::String, true, true),
            f("name", FieldType::String, true, false),
            f("age", FieldType::Integer, false, false),
            f("email", FieldType::String, false, true),
        ],
        dropped_fields: vec![],
        version: 0,
    }
}

fn field<'a>(schema: &'a mut ObjectSchema, name: &str) -> &'a mut FieldSpec {
    schema.fields.iter_mut().find(|f| f.name == name).unwrap()
}

/// The paths of an invalid request's problems.
fn problem_paths<T: std::fmt::Debug>(result: Result<T, Error>) -> Vec<String> {
    match result {
        Err(Error::Invalid(errors)) => errors.into_iter().map(|e| format!("{}: {}", e.field, e.description)).collect(),
        other => panic!("expected invalid, got {other:?}"),
    }
}

#[tokio::test]
async fn schemas_evolve_by_compatible_versions_and_old_records_stay_valid() {
    each_backend(|t| async move {
        let s = &t.store;
        let org = s.create_org("acme").await.unwrap().id;
        let mut schema = member();
        assert_eq!(s.define_object(&org, &schema).await.unwrap().version, 1);
        let m1 = rec(json!({"code": "m1", "name": "Ann", "age": 30, "email": "ann@x"}));
        s.upsert(&org, "member", vec![m1.clone()], soon()).await.unwrap();

        // v2: a new optional field, which writes may carry from then on
        schema.fields.push(FieldSpec {
            name: "nickname".into(),
            field_type: FieldType::String,
            required: false,
            unique: false,
            deprecated: false,
        });
        let v2 = s.update_object(&org, &schema).await.unwrap();
        assert_eq!((v2.version, s.object(&org, "member").await.unwrap()), (2, v2.clone()));
        s.upsert(&org, "member", vec![rec(json!({"code": "m2", "name": "Bob", "nickname": "bo"}))], soon())
            .await
            .unwrap();
        // the same schema again changes nothing
        assert_eq!(s.update_object(&org, &schema).await.unwrap().version, 2);
        assert_eq!(
            problem_paths(s.upsert(&org, "member", vec![rec(json!({"code": "m3"}))], soon()).await),
            ["records[0].name: required field is missing"]
        );

        // v3: `name` relaxed to optional
        field(&mut schema, "name").required = false;
        assert_eq!(s.update_object(&org, &schema).await.unwrap().version, 3);
        s.upsert(&org, "member", vec![rec(json!({"code": "m3"}))], soon()).await.unwrap();

        // v4: `age` and the unique `email` deprecated: still stored, answered and written
        field(&mut schema, "age").deprecated = true;
        field(&mut schema, "email").deprecated = true;
        let v4 = s.update_object(&org, &schema).await.unwrap();
        assert!(v4.version == 4 && v4.field("age").unwrap().deprecated);
        s.upsert(&org, "member", vec![rec(json!({"code": "m4", "age": 5, "email": "d@x"}))], soon()).await.unwrap();
        assert!(
            !problem_paths(s.upsert(&org, "member", vec![rec(json!({"code": "m5", "email": "d@x"}))], soon()).await)
                .is_empty(),
            "a deprecated unique field is still unique"
        );

        // v5: both dropped; a write carrying one is an unknown field, a filter on one too
        schema.fields.retain(|f| !f.deprecated);
        let v5 = s.update_object(&org, &schema).await.unwrap();
        assert_eq!((v5.version, v5.dropped_fields.clone()), (5, vec!["age".to_owned(), "email".to_owned()]));
        assert_eq!(
            problem_paths(s.upsert(&org, "member", vec![rec(json!({"code": "m5", "age": 1}))], soon()).await),
            ["records[0].age: unknown field of object member (dropped by an earlier schema version)"]
        );
        assert!(s.query(&org, "member", "age = 30", &[], 10, None, soon()).await.is_err());
        // records written under v1 stay readable and writable under v5; their dropped values stay
        // stored (the gRPC answers leave them out)
        let (old, _) = s.get(&org, "member", "m1", soon()).await.unwrap();
        assert_eq!((old.fields, old.version), (m1, 1));
        s.upsert(&org, "member", vec![rec(json!({"code": "m1", "name": "Ann B"}))], soon()).await.unwrap();
        let (rewritten, _) = s.get(&org, "member", "m1", soon()).await.unwrap();
        assert_eq!(rewritten.fields, rec(json!({"code": "m1", "name": "Ann B"})), "a rewrite sheds the dropped value");
        let page = s.query(&org, "member", "name IS NULL", &[], 10, None, soon()).await.unwrap();
        assert_eq!(page.records.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["m3", "m4"]);
        assert_eq!(page.schema.version, 5);

        // every version is kept
        let versions = s.object_versions(&org, "member").await.unwrap();
        assert_eq!(versions.iter().map(|(v, _)| v.version).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        assert_eq!(versions[0].0, ObjectSchema { version: 1, ..member() });
        assert_eq!(versions[4].0, v5);
        assert!(matches!(s.object_versions(&org, "nope").await, Err(Error::NotFound(_))));
        assert!(matches!(
            s.update_object(&org, &ObjectSchema { name: "nope".into(), ..member() }).await,
            Err(Error::NotFound(_))
        ));
    })
    .await;
}

#[tokio::test]
async fn an_incompatible_schema_change_lists_every_problem_and_changes_nothing() {
    each_backend(|t| async move {
        let s = &t.store;
        let org = s.create_org("acme").await.unwrap().id;
        let mut schema = member();
        s.define_object(&org, &schema).await.unwrap();
        field(&mut schema, "age").deprecated = true;
        s.update_object(&org, &schema).await.unwrap();
        schema.fields.retain(|f| f.name != "age");
        let v3 = s.update_object(&org, &schema).await.unwrap();

        let f = |name: &str, field_type, required, unique| FieldSpec {
            name: name.into(),
            field_type,
            required,
            unique,
            deprecated: false,
        };
        let bad = ObjectSchema {
            fields: vec![
                f("code", FieldType::String, true, true),
                // `name` renamed: left out without a deprecation, and a new field
                f("full_name", FieldType::String, false, false),
                f("email", FieldType::Integer, true, false),
                f("age", FieldType::Integer, false, false),
                f("region", FieldType::String, true, false),
            ],
            ..member()
        };
        let problems = match s.update_object(&org, &bad).await {
            Err(Error::Incompatible { object, version, problems }) => {
                assert_eq!((object.as_str(), version), ("member", 3));
                problems.into_iter().map(|p| p.field).collect::<Vec<_>>()
            }
            other => panic!("expected incompatible, got {other:?}"),
        };
        assert_eq!(
            problems,
            [
                "schema.fields[2].type",
                "schema.fields[2].required",
                "schema.fields[2].unique",
                "schema.fields[3].name",
                "schema.fields[4].required",
                "schema.fields",
            ]
        );
        let mut other_id = ObjectSchema { external_id_field: "email".into(), ..v3.clone() };
        field(&mut other_id, "email").required = true;
        match s.update_object(&org, &other_id).await {
            Err(Error::Incompatible { problems, .. }) => assert_eq!(
                problems.iter().map(|p| p.field.as_str()).collect::<Vec<_>>(),
                ["schema.external_id_field", "schema.fields[2].required"]
            ),
            other => panic!("expected incompatible, got {other:?}"),
        }
        let mut unique = v3.clone();
        field(&mut unique, "name").unique = true;
        assert!(matches!(s.update_object(&org, &unique).await, Err(Error::Incompatible { .. })));
        // invalid schemas are refused as in a definition: a required deprecated field
        let mut required_deprecated = v3.clone();
        field(&mut required_deprecated, "name").deprecated = true;
        assert_eq!(
            problem_paths(s.update_object(&org, &required_deprecated).await),
            ["schema.fields[1].deprecated: a deprecated field cannot be required: relax `required` in the same change"]
        );
        assert_eq!(s.object(&org, "member").await.unwrap(), v3);
        assert_eq!(s.object_versions(&org, "member").await.unwrap().len(), 3);
    })
    .await;
}

/// Defines `account` in a database migrated to before schema versions (0007), as a release of
/// then did.
async fn define_before_versions(pool: &sqlx::AnyPool, org: &str) {
    sqlx::query("INSERT INTO objects (org_id, name, schema_json, created_at_ms) VALUES ($1, 'account', $2, 7)")
        .bind(org.to_owned())
        .bind(json!({"name": "account", "external_id_field": "code", "fields": account().fields}).to_string())
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_object_defined_before_schema_versions_is_at_version_1() {
    for backend in testing::backends() {
        eprintln!("-- on {backend:?}");
        let old = testing::open_at(backend, 6).await.unwrap();
        let org = old.store.create_org("acme").await.unwrap().id;
        let pool = sqlx::any::AnyPoolOptions::new().max_connections(1).connect(&old.url).await.unwrap();
        define_before_versions(&pool, &org).await;
        pool.close().await;
        old.store.close().await;

        let s = Store::open(&baton_store::StoreOptions::new(old.url.clone())).await.unwrap();
        assert_eq!(s.object(&org, "account").await.unwrap(), ObjectSchema { version: 1, ..account() });
        let versions = s.object_versions(&org, "account").await.unwrap();
        assert_eq!((versions.len(), versions[0].1), (1, 7));
        let mut next = account();
        field(&mut next, "status").deprecated = true;
        assert_eq!(s.update_object(&org, &next).await.unwrap().version, 2);
        s.close().await;
    }
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
        let a = s.get(&org, "account", "a", soon()).await.unwrap().0;
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

/// Ids and values with the characters that SQL text, JSON and PostgreSQL array literals treat
/// specially are written and read back exactly (the writer sends rows as array literals on
/// PostgreSQL).
#[tokio::test]
async fn awkward_ids_and_values_are_stored_exactly() {
    each_backend(|t| async move {
        let s = &t.store;
        let org = org_with_account(s).await;
        let ids = ["q\"uo'te", "back\\slash", "new\nline", "{braces,comma}", "NULL", "uni é ✓", " padded "];
        let records: Vec<Fields> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| rec(json!({"code": id, "status": format!("{id} \\ \" {{}} , NULL"), "amount": i})))
            .collect();
        s.upsert(&org, "account", records.clone(), soon()).await.unwrap();
        for (id, fields) in ids.iter().zip(&records) {
            let got = s.get(&org, "account", id, soon()).await.unwrap().0;
            assert_eq!((got.id.as_str(), &got.fields), (*id, fields));
        }
        s.delete(&org, "account", vec![ids[0].to_owned()], soon()).await.unwrap();
        let events = s.changes_after(&org, 0, 100).await.unwrap();
        assert_eq!(events.len(), ids.len() + 1);
        for (e, (id, fields)) in events.iter().zip(ids.iter().zip(&records)) {
            assert_eq!((e.record_id.as_str(), e.op, e.fields.as_ref()), (*id, ChangeOp::Upsert, Some(fields)));
        }
        let tombstone = events.last().unwrap();
        assert_eq!(
            (tombstone.record_id.as_str(), tombstone.op, tombstone.fields.as_ref()),
            (ids[0], ChangeOp::Delete, None)
        );
        assert!(events.iter().zip(1..).all(|(e, seq)| e.seq == seq), "seqs dense from 1");

        // one request mixing new records (sent as an object of id to fields on SQLite) with
        // existing ones and a re-created one (rows with their versions)
        let mixed: Vec<Fields> = [ids[0], ids[1], "fresh \"one\"", ids[2], "fresh ✓"]
            .iter()
            .map(|id| rec(json!({"code": id, "status": format!("again {id}")})))
            .collect();
        let (out, last) = s.upsert(&org, "account", mixed.clone(), soon()).await.unwrap();
        let versions: Vec<i64> = out.iter().map(|o| o.version).collect();
        assert_eq!((versions, last), (vec![3, 2, 1, 2, 1], ids.len() as i64 + 6));
        for fields in &mixed {
            let id = fields["code"].as_str().unwrap();
            assert_eq!(&s.get(&org, "account", id, soon()).await.unwrap().0.fields, fields);
        }
        let events = s.changes_after(&org, ids.len() as i64 + 1, 100).await.unwrap();
        let summary: Vec<_> = events.iter().map(|e| (e.seq, e.record_id.as_str(), e.version)).collect();
        let first = ids.len() as i64 + 2;
        assert_eq!(
            summary,
            vec![
                (first, ids[0], 3),
                (first + 1, ids[1], 2),
                (first + 2, "fresh \"one\"", 1),
                (first + 3, ids[2], 2),
                (first + 4, "fresh ✓", 1)
            ]
        );
        assert!(events.iter().zip(&mixed).all(|(e, fields)| e.fields.as_ref() == Some(fields)));
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
        assert_eq!(s.get(&a, "account", "secret", soon()).await.unwrap().0.version, 1);
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
            assert_eq!(s.get(&org, "account", id, soon()).await.unwrap().0.version, v);
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

mod batches {
    use super::*;
    use baton_store::batches::{
        Attempt, BatchOp, BatchStart, BatchState, ChunkRun, ChunkStart, ChunkState, NewBatch, PartRange, PartState,
        Recovered, ReleaseCaps, Split,
    };

    fn new_batch(op: BatchOp, chunk_size: u32) -> NewBatch {
        NewBatch {
            object: "account".into(),
            operation: op,
            chunk_size,
            not_before_ms: 0,
            max_parallel: 0,
            records_per_second: 0,
            request_id: None,
            traceparent: String::new(),
            webhook: None,
        }
    }

    /// Stages `records` in chunks of `size` and queues the batch.
    async fn submit(s: &Store, org: &str, new: &NewBatch, records: &[Fields]) -> String {
        let BatchStart::New(id) = s.begin_batch(org, new).await.unwrap() else { panic!("a new batch") };
        for (i, chunk) in records.chunks(new.chunk_size as usize).enumerate() {
            s.stage_chunk(org, &id, i as u32, (i * new.chunk_size as usize) as u64, chunk).await.unwrap();
        }
        let chunks = records.len().div_ceil(new.chunk_size as usize) as u32;
        s.finish_staging(org, &id, records.len() as u64, chunks).await.unwrap();
        id
    }

    fn accounts(prefix: &str, n: usize) -> Vec<Fields> {
        (0..n).map(|i| rec(json!({"code": format!("{prefix}{i:03}"), "amount": i}))).collect()
    }

    async fn run(s: &Store, batch: &str, index: u32) -> ChunkRun {
        assert_eq!(s.start_chunk(batch, index, "w1").await.unwrap(), ChunkStart::Run);
        s.run_chunk(batch, index, ChunkState::Committed, "", Duration::from_secs(10), Duration::from_secs(1))
            .await
            .unwrap()
    }

    /// A chunk staged by a release before migration 0006 (its records in the chunk's row) runs
    /// after the upgrade: the migration moves its records to `chunk_records`.
    #[tokio::test]
    async fn a_chunk_staged_before_the_chunk_records_migration_runs_after_it() {
        for backend in testing::backends() {
            eprintln!("-- on {backend:?}");
            let old = testing::open_at(backend, 5).await.unwrap();
            let org = old.store.create_org("acme").await.unwrap().id;
            let pool = sqlx::any::AnyPoolOptions::new().max_connections(1).connect(&old.url).await.unwrap();
            // defined as that release did, without a schema version
            define_before_versions(&pool, &org).await;
            // the batch and its chunk as that release staged them (today's columns are not there)
            let batch = "bat_staged_by_0005".to_owned();
            sqlx::query(
                "INSERT INTO batches (id, org_id, object, operation, chunk_size, not_before_ms, max_parallel, \
                 records_per_second, state, created_at_ms) VALUES ($1, $2, 'account', 'upsert', 10, 0, 0, 0, 'STAGING', 1)",
            )
            .bind(batch.clone())
            .bind(org.clone())
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO chunks (batch_id, idx, org_id, first_record, record_count, records, state) \
                 VALUES ($1, 0, $2, 0, 3, $3, 'PENDING')",
            )
            .bind(batch.clone())
            .bind(org.clone())
            .bind(serde_json::to_string(&accounts("m", 3)).unwrap())
            .execute(&pool)
            .await
            .unwrap();
            pool.close().await;
            old.store.finish_staging(&org, &batch, 3, 1).await.unwrap();
            old.store.close().await;

            let s = Store::open(&baton_store::StoreOptions::new(old.url.clone())).await.unwrap();
            assert_eq!(run(&s, &batch, 0).await, ChunkRun::Committed(ChunkState::Committed));
            let page = s.query(&org, "account", "", &[], 100, None, soon()).await.unwrap();
            let ids: Vec<&str> = page.records.iter().map(|r| r.id.as_str()).collect();
            assert_eq!(ids, ["m000", "m001", "m002"]);
            let info = s.batch(&org, &batch).await.unwrap();
            assert_eq!((info.state, info.totals.records_committed), (BatchState::Done, 3));
            s.close().await;
        }
    }

    /// A batch's completion webhook, through the states the scheduler's delivery loop moves it
    /// by: WAITING while the batch runs, PENDING once it is done, claimed by one of two claimers,
    /// retried after a failure, FAILED or DELIVERED; a broken upload leaves no delivery behind.
    #[tokio::test]
    async fn a_completion_waits_for_its_batch_and_is_claimed_by_one_scheduler() {
        use baton_store::completions::{Attempted, DeliveryState, Kind};
        each_backend(|t| async move {
            let s = &t.store;
            let org = org_with_account(s).await;
            let hook = |url: &str| NewBatch { webhook: Some(url.into()), ..new_batch(BatchOp::Upsert, 2) };
            let id = submit(s, &org, &hook("http://receiver/a"), &accounts("c", 3)).await;
            let plain = submit(s, &org, &new_batch(BatchOp::Upsert, 2), &accounts("p", 1)).await;
            assert_eq!(s.completion(&org, &plain).await.unwrap(), None);
            // another org sees none
            let other = s.create_org("other").await.unwrap().id;
            assert_eq!(s.completion(&other, &id).await.unwrap(), None);
            let d = s.completion(&org, &id).await.unwrap().unwrap();
            assert_eq!(
                (d.kind, d.state, d.attempts, d.url.as_str()),
                (Kind::Batch, DeliveryState::Waiting, 0, "http://receiver/a")
            );
            // not finished: nothing to deliver
            assert!(s.finished_waiting(10).await.unwrap().is_empty());
            assert_eq!(run(s, &id, 0).await, ChunkRun::Committed(ChunkState::Committed));
            assert!(s.finished_waiting(10).await.unwrap().is_empty());
            assert_eq!(run(s, &id, 1).await, ChunkRun::Committed(ChunkState::Committed));
            assert_eq!(s.finished_waiting(10).await.unwrap(), vec![(Kind::Batch, id.clone(), org.clone())]);
            assert!(s.ready_completion(&id, "{\"body\":1}").await.unwrap());
            assert!(!s.ready_completion(&id, "{\"body\":2}").await.unwrap(), "made ready once");
            assert!(s.finished_waiting(10).await.unwrap().is_empty());

            // two claimers: one wins
            let lease = Duration::from_secs(30);
            let a = s.claim_completions("a", lease, 10).await.unwrap();
            let b = s.claim_completions("b", lease, 10).await.unwrap();
            assert_eq!((a.len(), b.len()), (1, 0), "{a:?} {b:?}");
            assert_eq!((a[0].attempts, a[0].body.as_str(), a[0].org_id.as_str()), (1, "{\"body\":1}", org.as_str()));
            let retry = baton_store::now_ms() - 1;
            let failed = Attempted::Failed { error: "HTTP 503".into(), retry_at_ms: Some(retry) };
            s.record_delivery(&id, "a", &failed).await.unwrap();
            let d = s.completion(&org, &id).await.unwrap().unwrap();
            assert_eq!(
                (d.state, d.attempts, d.last_error.as_str(), d.next_attempt_ms),
                (DeliveryState::Pending, 1, "HTTP 503", retry)
            );
            // due again, and the lease given up: the other claimer takes it
            let b = s.claim_completions("b", lease, 10).await.unwrap();
            assert_eq!(b.iter().map(|c| c.attempts).collect::<Vec<_>>(), [2]);
            s.record_delivery(&id, "b", &Attempted::Acknowledged).await.unwrap();
            let d = s.completion(&org, &id).await.unwrap().unwrap();
            assert_eq!(
                (d.state, d.attempts, d.acknowledgments, d.last_error.as_str()),
                (DeliveryState::Delivered, 2, 1, "HTTP 503")
            );
            assert!(d.delivered_at_ms > 0);
            // a late failure of a stalled claimer does not undo it
            s.record_delivery(&id, "a", &failed).await.unwrap();
            assert_eq!(s.completion(&org, &id).await.unwrap().unwrap().state, DeliveryState::Delivered);
            assert!(s.claim_completions("a", lease, 10).await.unwrap().is_empty());

            // given up
            let gone = submit(s, &org, &hook("https://receiver/b"), &accounts("g", 1)).await;
            s.cancel_batch(&org, &gone).await.unwrap();
            assert_eq!(s.finished_waiting(10).await.unwrap(), vec![(Kind::Batch, gone.clone(), org.clone())]);
            assert!(s.ready_completion(&gone, "{}").await.unwrap());
            assert_eq!(s.claim_completions("a", lease, 10).await.unwrap().len(), 1);
            let give_up = Attempted::Failed { error: "connection refused".into(), retry_at_ms: None };
            s.record_delivery(&gone, "a", &give_up).await.unwrap();
            let d = s.completion(&org, &gone).await.unwrap().unwrap();
            assert_eq!((d.state, d.attempts, d.last_error.as_str()), (DeliveryState::Failed, 1, "connection refused"));

            // a broken upload: its delivery goes with it
            let BatchStart::New(broken) = s.begin_batch(&org, &hook("http://receiver/c")).await.unwrap() else {
                panic!("a new batch")
            };
            assert!(s.completion(&org, &broken).await.unwrap().is_some());
            s.abandon_batch(&org, &broken).await.unwrap();
            assert_eq!(s.completion(&org, &broken).await.unwrap(), None);
        })
        .await;
    }

    /// One attempt at a part of chunk `index` (None: the whole chunk) under a size budget.
    async fn attempt(s: &Store, batch: &str, index: u32, part: Option<PartRange>, max_bytes: u64) -> ChunkRun {
        assert_eq!(s.start_chunk(batch, index, "w1").await.unwrap(), ChunkStart::Run);
        let attempt = Attempt {
            outcome: ChunkState::Committed,
            cause: "",
            budget: Duration::from_secs(10),
            lock_timeout: Duration::from_secs(1),
            max_bytes,
            part,
        };
        s.attempt_chunk(batch, index, &attempt).await.unwrap()
    }

    fn range(first: u32, records: u32) -> PartRange {
        PartRange { first, records }
    }

    /// A chunk split after a resource limit: the split replaces only a pending part (or the whole
    /// chunk, once) by its halves, the whole chunk no longer runs, each part commits once (a part
    /// run again, or split, once committed does nothing), a part at the floor is not split, and
    /// the chunk's outcome follows its parts: ABORTED with the aborted part's records and cause
    /// while the committed parts stay committed (counted in `records_committed`), or
    /// COMMITTED_AFTER_RETRY_RESOURCES when every part committed.
    #[tokio::test]
    async fn a_split_chunk_commits_each_part_once_and_its_outcome_follows_its_parts() {
        each_backend(|t| async move {
            let s = &t.store;
            let org = org_with_account(s).await;
            let batch = submit(s, &org, &new_batch(BatchOp::Upsert, 8), &accounts("p", 16)).await;
            let caps = ReleaseCaps { overall: 8, per_org: 8 };
            assert_eq!(s.release_chunks("sched", caps).await.unwrap().len(), 2);

            let over = attempt(s, &batch, 0, None, 50).await;
            assert!(matches!(over, ChunkRun::OverSize { limit: 50, bytes } if bytes > 50), "{over:?}");
            assert_eq!(s.split_chunk(&batch, 0, None, 1).await.unwrap(), Split::Halves);
            assert_eq!(s.split_chunk(&batch, 0, None, 1).await.unwrap(), Split::Gone, "split once");
            assert_eq!(attempt(s, &batch, 0, None, u64::MAX).await, ChunkRun::Split, "the whole no longer runs");
            assert_eq!(s.high_water(&org).await.unwrap(), 0);
            assert_eq!(s.next_part(&batch, 0).await.unwrap(), Some(range(0, 4)));
            assert_eq!(attempt(s, &batch, 0, Some(range(0, 4)), u64::MAX).await, ChunkRun::PartCommitted);
            assert_eq!(attempt(s, &batch, 0, Some(range(0, 4)), u64::MAX).await, ChunkRun::PartGone, "once");
            assert_eq!(s.split_chunk(&batch, 0, Some(range(0, 4)), 1).await.unwrap(), Split::Gone);
            assert_eq!(s.next_part(&batch, 0).await.unwrap(), Some(range(4, 4)));
            assert_eq!(s.split_chunk(&batch, 0, Some(range(4, 4)), 4).await.unwrap(), Split::AtFloor);
            assert_eq!(s.split_chunk(&batch, 0, Some(range(4, 4)), 1).await.unwrap(), Split::Halves);
            assert_eq!(s.finish_split_chunk(&batch, 0).await.unwrap(), None, "parts pending");
            assert_eq!(attempt(s, &batch, 0, Some(range(4, 2)), u64::MAX).await, ChunkRun::PartCommitted);
            s.abort_part(&batch, 0, range(6, 2), &[], "too big").await.unwrap();
            assert_eq!(s.next_part(&batch, 0).await.unwrap(), None);
            assert_eq!(s.finish_split_chunk(&batch, 0).await.unwrap(), Some(ChunkState::Aborted));
            assert_eq!(s.finish_split_chunk(&batch, 0).await.unwrap(), Some(ChunkState::Aborted), "recorded");
            assert_eq!(s.start_chunk(&batch, 0, "w2").await.unwrap(), ChunkStart::Finished(ChunkState::Aborted));

            // the other chunk: both halves commit
            assert_eq!(s.split_chunk(&batch, 1, None, 1).await.unwrap(), Split::Halves);
            for part in [range(0, 4), range(4, 4)] {
                assert_eq!(attempt(s, &batch, 1, Some(part), u64::MAX).await, ChunkRun::PartCommitted);
            }
            assert_eq!(s.finish_split_chunk(&batch, 1).await.unwrap(), Some(ChunkState::CommittedAfterRetryResources));

            let chunks = s.chunks(&org, &batch, None, 10, false, true).await.unwrap();
            let (aborted, errors) = &chunks[0];
            assert_eq!((aborted.state, aborted.records_committed, errors.len()), (ChunkState::Aborted, 6, 0));
            let parts: Vec<_> = aborted.parts.iter().map(|p| (p.range, p.state, p.cause.as_str())).collect();
            assert_eq!(
                parts,
                [
                    (range(0, 4), PartState::Committed, ""),
                    (range(4, 2), PartState::Committed, ""),
                    (range(6, 2), PartState::Aborted, "too big")
                ]
            );
            assert!(aborted.last_cause.contains("records 6-7: too big"), "{aborted:?}");
            let (whole, _) = &chunks[1];
            assert_eq!(
                (whole.state, whole.records_committed, whole.parts.len()),
                (ChunkState::CommittedAfterRetryResources, 8, 2)
            );
            let info = s.batch(&org, &batch).await.unwrap();
            assert_eq!(
                (
                    info.state,
                    info.totals.aborted,
                    info.totals.committed_after_retry_resources,
                    info.totals.records_committed
                ),
                (BatchState::Done, 1, 1, 14)
            );
            let page = s.query(&org, "account", "", &[], 100, None, soon()).await.unwrap();
            let ids: Vec<&str> = page.records.iter().map(|r| r.id.as_str()).collect();
            assert_eq!(
                ids,
                [
                    "p000", "p001", "p002", "p003", "p004", "p005", "p008", "p009", "p010", "p011", "p012", "p013",
                    "p014", "p015"
                ]
            );
            assert!(page.records.iter().all(|r| r.version == 1), "a record written twice");
            assert_eq!(s.high_water(&org).await.unwrap(), 14, "one change event a record");
        })
        .await;
    }

    #[tokio::test]
    async fn a_chunk_commits_once_and_a_second_delivery_reads_its_outcome() {
        each_backend(|t| async move {
            let s = &t.store;
            let org = org_with_account(s).await;
            // the submitting request's trace context goes with every chunk released
            let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned();
            let new = NewBatch { traceparent: traceparent.clone(), ..new_batch(BatchOp::Upsert, 4) };
            let batch = submit(s, &org, &new, &accounts("a", 10)).await;
            let info = s.batch(&org, &batch).await.unwrap();
            assert_eq!(
                (info.state, info.totals.chunks, info.totals.records, info.totals.pending),
                (BatchState::Running, 3, 10, 3)
            );
            assert_eq!(info.spec.traceparent, traceparent);
            let caps = ReleaseCaps { overall: 8, per_org: 8 };
            let released = s.release_chunks("sched", caps).await.unwrap();
            assert_eq!(released.iter().map(|c| c.index).collect::<Vec<_>>(), [0, 1, 2]);
            assert!(released.iter().all(|c| c.traceparent == traceparent));
            assert!(s.release_chunks("sched", caps).await.unwrap().is_empty(), "released twice");
            for c in &released {
                assert_eq!(run(s, &batch, c.index).await, ChunkRun::Committed(ChunkState::Committed));
            }
            // delivered again: nothing runs twice
            assert_eq!(s.start_chunk(&batch, 1, "w2").await.unwrap(), ChunkStart::Finished(ChunkState::Committed));
            let again =
                s.run_chunk(&batch, 1, ChunkState::Committed, "", Duration::from_secs(5), Duration::from_secs(1));
            assert_eq!(again.await.unwrap(), ChunkRun::Finished(ChunkState::Committed));
            let page = s.query(&org, "account", "", &[], 100, None, soon()).await.unwrap();
            assert_eq!(page.records.len(), 10);
            assert!(page.records.iter().all(|r| r.version == 1), "a record written twice");
            assert_eq!(s.high_water(&org).await.unwrap(), 10);
            let info = s.batch(&org, &batch).await.unwrap();
            assert_eq!((info.state, info.totals.committed, info.totals.records_committed), (BatchState::Done, 3, 10));
            assert!(info.is_finished() && info.finished_at_ms > 0);
        })
        .await;
    }

    /// Chunks that are not all new records are written right: on PostgreSQL a chunk is first
    /// inserted as all new (no version lookup), and a record that exists (first, last or between
    /// new ones) or a unique value sends it back to the general path with nothing left of the
    /// attempt. Versions continue, seqs stay dense, every write has one change event, and a
    /// unique value written by a batch is held.
    #[tokio::test]
    async fn chunks_of_new_existing_and_unique_records_keep_versions_and_seqs() {
        each_backend(|t| async move {
            let s = &t.store;
            let org = org_with_account(s).await;
            s.upsert(&org, "account", accounts("x", 2), soon()).await.unwrap(); // x000, x001: seqs 1, 2
            s.delete(&org, "account", vec!["x001".into()], soon()).await.unwrap(); // seq 3, a tombstone
            let mut records = accounts("n", 3); // chunk 0: all new
            records.extend(accounts("m", 2)); // chunk 1: new, then an existing record last
            records.push(rec(json!({"code": "x000", "amount": 7})));
            records.extend(accounts("t", 2)); // chunk 2: new, then the tombstone re-created
            records.push(rec(json!({"code": "x001", "amount": 8})));
            records.push(rec(json!({"code": "d000"}))); // chunk 3: an existing record between new ones
            records.push(rec(json!({"code": "n000", "amount": 9})));
            records.push(rec(json!({"code": "d001"})));
            records.extend(accounts("u", 2)); // chunk 4: a unique value
            records.push(rec(json!({"code": "u9", "email": "u9@x"})));
            let batch = submit(s, &org, &new_batch(BatchOp::Upsert, 3), &records).await;
            s.release_chunks("sched", ReleaseCaps { overall: 8, per_org: 8 }).await.unwrap();
            for index in 0..5 {
                assert_eq!(run(s, &batch, index).await, ChunkRun::Committed(ChunkState::Committed), "chunk {index}");
            }
            let org = org.as_str();
            let get = |id: &'static str| async move { s.get(org, "account", id, soon()).await.unwrap().0 };
            assert_eq!(get("n002").await.version, 1);
            let x0 = get("x000").await;
            assert_eq!((x0.version, x0.fields["amount"].as_i64()), (2, Some(7)));
            assert_eq!(get("x001").await.version, 3, "re-created after its delete");
            let n0 = get("n000").await;
            assert_eq!((n0.version, n0.fields["amount"].as_i64()), (2, Some(9)));
            assert_eq!(get("u9").await.fields["email"], json!("u9@x"));
            // the unique value is held: another record cannot take it
            let taken = s.upsert(org, "account", vec![rec(json!({"code": "v", "email": "u9@x"}))], soon()).await;
            assert!(matches!(taken, Err(Error::Invalid(_))), "{taken:?}");

            let events = s.changes_after(org, 3, 100).await.unwrap();
            let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
            assert_eq!(seqs, (4..=18).collect::<Vec<_>>(), "dense seqs, one event a write");
            let ids: Vec<(&str, i64)> = events.iter().map(|e| (e.record_id.as_str(), e.version)).collect();
            let expected = [
                ("n000", 1),
                ("n001", 1),
                ("n002", 1),
                ("m000", 1),
                ("m001", 1),
                ("x000", 2),
                ("t000", 1),
                ("t001", 1),
                ("x001", 3),
                ("d000", 1),
                ("n000", 2),
                ("d001", 1),
                ("u000", 1),
                ("u001", 1),
                ("u9", 1),
            ];
            assert_eq!(ids, expected);
            assert_eq!(s.high_water(org).await.unwrap(), 18);
            assert_eq!(s.count_records(org, "account").await.unwrap(), 14);
        })
        .await;
    }

    #[tokio::test]
    async fn an_invalid_chunk_commits_nothing_and_names_batch_indexes() {
        each_backend(|t| async move {
            let s = &t.store;
            let org = org_with_account(s).await;
            let mut records = accounts("a", 8);
            records[5] = rec(json!({"code": "a005", "amount": "five"}));
            let batch = submit(s, &org, &new_batch(BatchOp::Upsert, 4), &records).await;
            s.release_chunks("sched", ReleaseCaps { overall: 8, per_org: 8 }).await.unwrap();
            assert_eq!(run(s, &batch, 0).await, ChunkRun::Committed(ChunkState::Committed));
            let ChunkRun::Invalid(problems) = run(s, &batch, 1).await else { panic!("chunk 1 is invalid") };
            assert_eq!(problems.len(), 1);
            assert_eq!((problems[0].index, problems[0].field.as_str()), (5, "amount"));
            assert_eq!(s.abort_chunk(&batch, 1, &problems, "invalid records").await.unwrap(), ChunkState::Aborted);
            assert_eq!(s.count_records(&org, "account").await.unwrap(), 4, "only chunk 0 is committed");
            let results = s.chunks(&org, &batch, None, 10, true, true).await.unwrap();
            assert_eq!(results.len(), 1);
            assert_eq!((results[0].0.index, results[0].0.error_count, results[0].1.clone()), (1, 1, problems));

            // insert of an existing record, update of a missing one: per-record problems
            let existing = vec![rec(json!({"code": "a001"})), rec(json!({"code": "new1"}))];
            let insert = submit(s, &org, &new_batch(BatchOp::Insert, 10), &existing).await;
            let missing = vec![rec(json!({"code": "a002"})), rec(json!({"code": "nope"}))];
            let update = submit(s, &org, &new_batch(BatchOp::Update, 10), &missing).await;
            s.release_chunks("sched", ReleaseCaps { overall: 8, per_org: 8 }).await.unwrap();
            let ChunkRun::Invalid(p) = run(s, &insert, 0).await else { panic!("insert of an existing record") };
            assert_eq!(p.iter().map(|p| p.index).collect::<Vec<_>>(), [0]);
            let ChunkRun::Invalid(p) = run(s, &update, 0).await else { panic!("update of a missing record") };
            assert_eq!(p.iter().map(|p| p.index).collect::<Vec<_>>(), [1]);
            assert_eq!(s.count_records(&org, "account").await.unwrap(), 4);
            // and a delete batch removes what it names, ignoring the missing
            let gone = vec![rec(json!({"code": "a000"})), rec(json!({"code": "nope"}))];
            let delete = submit(s, &org, &new_batch(BatchOp::Delete, 10), &gone).await;
            s.release_chunks("sched", ReleaseCaps { overall: 8, per_org: 8 }).await.unwrap();
            assert_eq!(run(s, &delete, 0).await, ChunkRun::Committed(ChunkState::Committed));
            assert_eq!(s.count_records(&org, "account").await.unwrap(), 3);
        })
        .await;
    }

    #[tokio::test]
    async fn releases_keep_caps_times_rates_and_share_between_orgs() {
        each_backend(|t| async move {
            let s = &t.store;
            let a = org_with_account(s).await;
            let b = s.create_org("beta").await.unwrap().id;
            s.define_object(&b, &account()).await.unwrap();
            let big = submit(s, &a, &new_batch(BatchOp::Upsert, 2), &accounts("a", 12)).await;
            // created in a later millisecond: within one, the older of two batches is a coin toss
            // (their random ids break the tie)
            tokio::time::sleep(Duration::from_millis(5)).await;
            let small = submit(s, &b, &new_batch(BatchOp::Upsert, 2), &accounts("b", 4)).await;
            let caps = ReleaseCaps { overall: 3, per_org: 2 };
            let first = s.release_chunks("sched", caps).await.unwrap();
            let of =
                |batch: &str, cs: &[baton_store::batches::ChunkRef]| cs.iter().filter(|c| c.batch_id == batch).count();
            assert_eq!((of(&big, &first), of(&small, &first)), (2, 1), "org b waits for nothing: {first:?}");
            assert!(s.release_chunks("sched", caps).await.unwrap().is_empty(), "over the overall cap");

            // not before its time; no faster than its rate
            let mut later = new_batch(BatchOp::Upsert, 2);
            later.not_before_ms = 4_000_000_000_000;
            let c = s.create_org("gamma").await.unwrap().id;
            s.define_object(&c, &account()).await.unwrap();
            let timed = submit(s, &c, &later, &accounts("c", 2)).await;
            let mut slow = new_batch(BatchOp::Upsert, 2);
            slow.records_per_second = 1;
            let paced = submit(s, &c, &slow, &accounts("d", 6)).await;
            let caps = ReleaseCaps { overall: 50, per_org: 50 };
            let next = s.release_chunks("sched", caps).await.unwrap();
            assert_eq!(of(&timed, &next), 0, "released before its time");
            assert_eq!(of(&paced, &next), 1, "two records at one a second: one chunk now");
            assert_eq!(of(&paced, &s.release_chunks("sched", caps).await.unwrap()), 0, "faster than its rate");

            // a batch's own cap
            let mut narrow = new_batch(BatchOp::Upsert, 1);
            narrow.max_parallel = 1;
            let d = s.create_org("delta").await.unwrap().id;
            s.define_object(&d, &account()).await.unwrap();
            let capped = submit(s, &d, &narrow, &accounts("e", 3)).await;
            assert_eq!(of(&capped, &s.release_chunks("sched", caps).await.unwrap()), 1);

            // cancelled: pending chunks never run, a released one is not started
            let cancelled = s.cancel_batch(&d, &capped).await.unwrap();
            assert_eq!(
                (cancelled.state, cancelled.totals.cancelled, cancelled.totals.in_flight),
                (BatchState::Cancelled, 2, 1)
            );
            assert_eq!(s.start_chunk(&capped, 0, "w").await.unwrap(), ChunkStart::Finished(ChunkState::Cancelled));
            assert!(s.batch(&d, &capped).await.unwrap().is_finished());
            // org isolation: another org's batch is not found
            assert!(matches!(s.batch(&a, &capped).await, Err(Error::NotFound(_))));
        })
        .await;
    }

    #[tokio::test]
    async fn a_release_time_and_a_rate_hold_until_the_store_clock_reaches_them() {
        each_backend(|t| async move {
            let s = &t.store;
            let org = org_with_account(s).await;
            let caps = ReleaseCaps { overall: 50, per_org: 50 };
            let of =
                |batch: &str, cs: &[baton_store::batches::ChunkRef]| cs.iter().filter(|c| c.batch_id == batch).count();
            // not before a minute from now (the margins allow a slow machine 5 s of real time)
            let mut later = new_batch(BatchOp::Upsert, 2);
            later.not_before_ms = baton_store::now_ms() + 60_000;
            let timed = submit(s, &org, &later, &accounts("t", 2)).await;
            // ten records a chunk at one record a second: a chunk every 10 s
            let mut slow = new_batch(BatchOp::Upsert, 10);
            slow.records_per_second = 1;
            let paced = submit(s, &org, &slow, &accounts("p", 30)).await;

            let first = s.release_chunks("sched", caps).await.unwrap();
            assert_eq!((of(&timed, &first), of(&paced, &first)), (0, 1), "{first:?}");
            t.advance_clock(Duration::from_secs(5));
            assert_eq!(of(&paced, &s.release_chunks("sched", caps).await.unwrap()), 0, "faster than its rate");
            t.advance_clock(Duration::from_secs(5));
            let second = s.release_chunks("sched", caps).await.unwrap();
            assert_eq!((of(&timed, &second), of(&paced, &second)), (0, 1), "the rate's spacing is over: {second:?}");
            t.advance_clock(Duration::from_secs(45));
            let third = s.release_chunks("sched", caps).await.unwrap();
            assert_eq!((of(&timed, &third), of(&paced, &third)), (0, 1), "5 s before its time: {third:?}");
            t.advance_clock(Duration::from_secs(5));
            let fourth = s.release_chunks("sched", caps).await.unwrap();
            assert_eq!((of(&timed, &fourth), of(&paced, &fourth)), (1, 0), "its time has come: {fourth:?}");
        })
        .await;
    }

    #[tokio::test]
    async fn a_chunk_committed_after_a_busy_database_defers_releases_for_the_overload_pause() {
        each_backend(|t| async move {
            let s = &t.store;
            let org = org_with_account(s).await;
            let caps = ReleaseCaps { overall: 50, per_org: 50 };
            let busy = submit(s, &org, &new_batch(BatchOp::Upsert, 2), &accounts("w", 2)).await;
            assert_eq!(s.release_chunks("sched", caps).await.unwrap().len(), 1);
            let waiting = submit(s, &org, &new_batch(BatchOp::Upsert, 2), &accounts("x", 2)).await;
            assert_eq!(s.start_chunk(&busy, 0, "w1").await.unwrap(), ChunkStart::Run);
            let outcome = ChunkState::CommittedAfterRetryWorkload;
            let ran = s.run_chunk(&busy, 0, outcome, "busy", Duration::from_secs(10), Duration::from_secs(1));
            assert_eq!(ran.await.unwrap(), ChunkRun::Committed(outcome));
            // the pause is 1 s from the commit: half of it (a slow machine's margin) holds
            t.advance_clock(Duration::from_millis(500));
            assert!(s.release_chunks("sched", caps).await.unwrap().is_empty(), "released while overloaded");
            t.advance_clock(Duration::from_millis(600));
            let after = s.release_chunks("sched", caps).await.unwrap();
            assert_eq!(after.iter().map(|c| c.batch_id.as_str()).collect::<Vec<_>>(), [waiting.as_str()]);
        })
        .await;
    }

    #[tokio::test]
    async fn a_chunk_released_and_never_sent_is_released_again_after_the_unsent_timeout() {
        each_backend(|t| async move {
            let s = &t.store;
            let org = org_with_account(s).await;
            let caps = ReleaseCaps { overall: 50, per_org: 50 };
            let batch = submit(s, &org, &new_batch(BatchOp::Upsert, 2), &accounts("u", 4)).await;
            let claimed = s.release_chunks("dead", caps).await.unwrap();
            assert_eq!(claimed.len(), 2);
            // one handed to the manager, one not: its scheduler died between the claim and the send
            s.mark_sent(&claimed[0]).await.unwrap();
            t.advance_clock(Duration::from_secs(29));
            assert!(s.release_chunks("alive", caps).await.unwrap().is_empty(), "released again too soon");
            t.advance_clock(Duration::from_secs(2));
            let again = s.release_chunks("alive", caps).await.unwrap();
            assert_eq!(
                again.iter().map(|c| (c.batch_id.as_str(), c.index)).collect::<Vec<_>>(),
                vec![(batch.as_str(), claimed[1].index)],
                "only the unsent chunk is released again"
            );
        })
        .await;
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_org_with_the_fewest_chunks_in_flight() {
        each_backend(|t| async move {
            let s = &t.store;
            let a = org_with_account(s).await;
            let b = s.create_org("beta").await.unwrap().id;
            s.define_object(&b, &account()).await.unwrap();
            let big = submit(s, &a, &new_batch(BatchOp::Upsert, 1), &accounts("a", 6)).await;
            // batches of one millisecond are ordered by their (random) ids: make `big` the older
            tokio::time::sleep(Duration::from_millis(5)).await;
            let small = submit(s, &b, &new_batch(BatchOp::Upsert, 1), &accounts("b", 2)).await;
            // the per-org cap is the overall cap: only fair sharing keeps org b from waiting
            let caps = ReleaseCaps { overall: 2, per_org: 2 };
            let first = s.release_chunks("sched", caps).await.unwrap();
            let batches: Vec<_> = first.iter().map(|c| c.batch_id.as_str()).collect();
            assert_eq!(batches, [big.as_str(), small.as_str()], "one each, in turn");
            // org b's chunk finishes: the slot is b's again (a still has one in flight)
            assert_eq!(run(s, &small, first[1].index).await, ChunkRun::Committed(ChunkState::Committed));
            let next = s.release_chunks("sched", caps).await.unwrap();
            assert_eq!(next.iter().map(|c| c.batch_id.as_str()).collect::<Vec<_>>(), [small.as_str()]);
        })
        .await;
    }

    /// A restarted scheduler's releases: of its chunks released and not marked sent, the one its
    /// sessions' restart data lists (the manager journaled it) is marked sent and never released
    /// again, even after the unsent-release timeout; the one not listed is released again at
    /// once. Chunks a worker took, and another scheduler's releases, are left alone.
    #[tokio::test]
    async fn a_restarted_scheduler_keeps_what_the_manager_holds_and_releases_the_rest_at_once() {
        each_backend(|t| async move {
            let s = &t.store;
            let org = org_with_account(s).await;
            let batch = submit(s, &org, &new_batch(BatchOp::Upsert, 2), &accounts("a", 10)).await;
            let indexes = |cs: &[baton_store::batches::ChunkRef]| cs.iter().map(|c| c.index).collect::<Vec<_>>();
            let released = s.release_chunks("sched-a", ReleaseCaps { overall: 4, per_org: 4 }).await.unwrap();
            assert_eq!(indexes(&released), [0, 1, 2, 3]);
            // 0 sent and committed, 1 sent and running; 2 journaled by the manager but the
            // scheduler died before marking it sent; 3 never sent
            s.mark_sent(&released[0]).await.unwrap();
            assert_eq!(run(s, &batch, 0).await, ChunkRun::Committed(ChunkState::Committed));
            s.mark_sent(&released[1]).await.unwrap();
            assert_eq!(s.start_chunk(&batch, 1, "w1").await.unwrap(), ChunkStart::Run);
            // another scheduler's release, not sent
            let other = s.release_chunks("sched-b", ReleaseCaps { overall: 5, per_org: 5 }).await.unwrap();
            assert_eq!(indexes(&other), [4]);

            let held = [(batch.clone(), 0), (batch.clone(), 1), (batch.clone(), 2), ("bat_gone".to_owned(), 7)];
            let recovered = s.recover_chunks("sched-a", &held).await.unwrap();
            assert_eq!(
                recovered,
                Recovered {
                    marked_sent: 1,
                    released_again: 1,
                    in_flight: vec![(batch.clone(), 1), (batch.clone(), 2)]
                }
            );
            let again = s.recover_chunks("sched-a", &held).await.unwrap();
            assert_eq!((again.marked_sent, again.released_again), (0, 0), "a second recovery changes nothing");
            // chunk 3 goes out now, not after the timeout; 2 is the manager's, 4 sched-b's
            let caps = ReleaseCaps { overall: 8, per_org: 8 };
            let next = s.release_chunks("sched-a", caps).await.unwrap();
            assert_eq!(indexes(&next), [3]);
            s.mark_sent(&next[0]).await.unwrap();
            // past the unsent-release timeout: only sched-b's unsent chunk is released again
            let pool = sqlx::any::AnyPoolOptions::new().max_connections(1).connect(&t.url).await.unwrap();
            sqlx::query("UPDATE chunks SET released_at_ms = released_at_ms - 60000 WHERE batch_id = $1")
                .bind(batch.clone())
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
            assert_eq!(indexes(&s.release_chunks("sched-c", caps).await.unwrap()), [4]);
            let info = s.batch(&org, &batch).await.unwrap();
            assert_eq!((info.totals.pending, info.totals.in_flight, info.totals.committed), (0, 4, 1));
        })
        .await;
    }

    #[tokio::test]
    async fn the_same_request_id_gives_the_same_batch() {
        each_backend(|t| async move {
            let s = &t.store;
            let org = org_with_account(s).await;
            let mut new = new_batch(BatchOp::Upsert, 4);
            new.request_id = Some("req-1".into());
            // a broken upload is replaced by the next one
            let BatchStart::New(broken) = s.begin_batch(&org, &new).await.unwrap() else { panic!() };
            s.stage_chunk(&org, &broken, 0, 0, &accounts("x", 2)).await.unwrap();
            let first = submit(s, &org, &new, &accounts("a", 6)).await;
            assert_ne!(first, broken);
            assert!(matches!(s.batch(&org, &broken).await, Err(Error::NotFound(_))));
            let BatchStart::Existing(again) = s.begin_batch(&org, &new).await.unwrap() else { panic!("a duplicate") };
            assert_eq!((again.id, again.totals.records), (first, 6));
            assert!(matches!(
                s.begin_batch(&org, &NewBatch { object: "nope".into(), ..new }).await,
                Err(Error::NotFound(_))
            ));
        })
        .await;
    }

    /// An org's batches page newest first and its keys oldest first, each exactly once, even
    /// when they were made in the same millisecond (the id orders them then), each batch with its
    /// totals; another org's never show.
    #[tokio::test]
    async fn batches_and_keys_page_by_creation_time_even_within_one_millisecond() {
        use baton_store::model::Cursor;
        each_backend(|t| async move {
            let s = &t.store;
            let (org, other) = (org_with_account(s).await, org_with_account(s).await);
            let mut batches = Vec::new();
            for n in 1..=5 {
                batches.push(submit(s, &org, &new_batch(BatchOp::Upsert, 2), &accounts("a", 2 * n)).await);
            }
            let theirs = submit(s, &other, &new_batch(BatchOp::Upsert, 2), &accounts("b", 2)).await;
            let mut keys = Vec::new();
            for _ in 0..5 {
                keys.push(s.create_api_key(&org, "k").await.unwrap().key_id);
            }
            let their_key = s.create_api_key(&other, "k").await.unwrap().key_id;
            // two batches and three keys share a millisecond
            let pool = sqlx::any::AnyPoolOptions::new().max_connections(1).connect(&t.url).await.unwrap();
            for (id, ms) in batches.iter().zip([1_000i64, 2_000, 2_000, 3_000, 4_000]) {
                sqlx::query("UPDATE batches SET created_at_ms = $2 WHERE id = $1")
                    .bind(id.clone())
                    .bind(ms)
                    .execute(&pool)
                    .await
                    .unwrap();
            }
            for (id, ms) in keys.iter().zip([7_000i64, 7_000, 7_000, 8_000, 9_000]) {
                sqlx::query("UPDATE api_keys SET created_at_ms = $2 WHERE id = $1")
                    .bind(id.clone())
                    .bind(ms)
                    .execute(&pool)
                    .await
                    .unwrap();
            }
            pool.close().await;

            // pages of two: newest first, the tie by id, descending
            let (mut seen, mut after) = (Vec::new(), None::<Cursor>);
            for _ in 0..10 {
                let page = s.list_batches(&org, after.as_ref(), 2).await.unwrap();
                let Some(last) = page.last() else { break };
                after = Some(Cursor { created_at_ms: last.created_at_ms, id: last.id.clone() });
                seen.extend(page.into_iter().map(|b| (b.id, b.totals.chunks, b.totals.records, b.state)));
            }
            let (mut tie_high, mut tie_low) = (batches[1].clone(), batches[2].clone());
            if tie_high < tie_low {
                std::mem::swap(&mut tie_high, &mut tie_low);
            }
            let order = [batches[4].clone(), batches[3].clone(), tie_high, tie_low, batches[0].clone()];
            assert_eq!(seen.iter().map(|b| b.0.clone()).collect::<Vec<_>>(), order);
            for (id, chunks, records, state) in &seen {
                let n = batches.iter().position(|b| b == id).unwrap() as u32 + 1;
                assert_eq!((*chunks, *records, *state), (n, 2 * u64::from(n), BatchState::Running), "{id}");
            }
            assert!(seen.iter().all(|b| b.0 != theirs));

            // keys: oldest first, the tie by id, ascending; one org's or every org's
            let (mut seen, mut after) = (Vec::new(), None::<Cursor>);
            for _ in 0..10 {
                let page = s.list_api_keys(Some(&org), after.as_ref(), 2).await.unwrap();
                let Some(last) = page.last() else { break };
                after = Some(Cursor { created_at_ms: last.created_at_ms, id: last.key_id.clone() });
                seen.extend(page.into_iter().map(|k| k.key_id));
            }
            let mut tied = keys[..3].to_vec();
            tied.sort();
            let org_keys: Vec<String> = tied.into_iter().chain(keys[3..].iter().cloned()).collect();
            assert_eq!(seen, org_keys);
            let every = s.list_api_keys(None, None, 100).await.unwrap();
            assert_eq!(every.len(), 6);
            assert!(every.iter().any(|k| k.key_id == their_key && k.org_id == other && k.revoked_at_ms.is_none()));
            assert!(matches!(s.list_api_keys(Some("org_none"), None, 10).await, Err(Error::NotFound(_))));
        })
        .await;
    }
}

mod exports {
    use super::*;
    use baton_store::blobs::Blobs;
    use baton_store::exports::{ExportReason, ExportSpec, ExportStart, ExportState, PartOutcome, PartRead};

    fn spec(filter: &str, sync_rows: u32, part_rows: u32) -> ExportSpec {
        ExportSpec {
            object: "account".into(),
            filter: filter.into(),
            fields: Vec::new(),
            sync_rows,
            part_rows,
            request_id: None,
            traceparent: String::new(),
            webhook: None,
        }
    }

    async fn load(s: &Store, org: &str, n: usize) {
        let records: Vec<Fields> =
            (0..n).map(|i| rec(json!({"code": format!("r{i:04}"), "amount": i, "status": "open"}))).collect();
        for batch in records.chunks(200) {
            s.upsert(org, "account", batch.to_vec(), soon()).await.unwrap();
        }
    }

    /// Plans and produces every part (each released part produced by `produce`), answering the
    /// ids of every part read back.
    async fn produce_all(s: &Store, blobs: &Blobs, org: &str, token: &str) -> Vec<String> {
        produce_all_records(s, blobs, org, token).await.into_iter().map(|r| r.id).collect()
    }

    /// [`produce_all`], answering the records read back.
    async fn produce_all_records(s: &Store, blobs: &Blobs, org: &str, token: &str) -> Vec<Record> {
        for _ in 0..100 {
            s.plan_exports(Duration::from_secs(5)).await.unwrap();
            let released = s.release_parts("sched", 4, 16).await.unwrap();
            for part in &released {
                assert!(matches!(
                    s.produce_part(blobs, &part.export_id, part.number, "w1").await.unwrap(),
                    PartOutcome::Produced(_)
                ));
            }
            if s.export(org, token).await.unwrap().state.is_final() {
                break;
            }
        }
        let info = s.export(org, token).await.unwrap();
        assert_eq!(info.state, ExportState::Complete);
        let mut records = Vec::new();
        for n in 1..=info.parts_total {
            let PartRead::Rows(rows) = s.read_part(blobs, org, token, n).await.unwrap() else { panic!("part {n}") };
            records.extend(rows.records().map(|r| r.unwrap()));
        }
        records
    }

    #[tokio::test]
    async fn parts_hold_the_records_as_stored_whole_or_projected() {
        each_backend(|t| async move {
            let s = &t.store;
            let dir = tempfile::tempdir().unwrap();
            let blobs = Blobs::open(dir.path().to_str().unwrap()).unwrap();
            let org = org_with_account(s).await;
            // ids and values that need escaping in JSON, numbers, booleans, absent fields
            let mut records: Vec<Fields> = (0..120)
                .map(|i| {
                    rec(json!({"code": format!("r{i:03} \"q\" \\ é ✓ \t"), "amount": i * 7 - 300,
                        "score": f64::from(i) / 3.0, "active": i % 2 == 0, "status": format!("line\nbreak {i}")}))
                })
                .collect();
            records.push(rec(json!({"code": "r999 bare"})));
            // stored in reverse: the table's own order is not the id order parts must follow
            records.reverse();
            s.upsert(&org, "account", records, soon()).await.unwrap();
            let stored = s.query(&org, "account", "", &[], 1000, None, soon()).await.unwrap().records;
            assert_eq!(stored.len(), 121);

            let started = s.start_export(&org, &spec("", 10, 25), soon(), Duration::from_secs(60)).await.unwrap();
            let ExportStart::Started { first, token, .. } = started else { panic!("async") };
            let mut exported = first;
            exported.extend(produce_all_records(s, &blobs, &org, &token).await);
            assert_eq!(exported, stored, "the parts hold the records exactly as stored");

            let fields = vec!["amount".to_owned(), "active".to_owned()];
            let projected = ExportSpec { fields: fields.clone(), ..spec("score >= 10", 5, 25) };
            let started = s.start_export(&org, &projected, soon(), Duration::from_secs(60)).await.unwrap();
            let ExportStart::Started { first, token, .. } = started else { panic!("async") };
            let mut exported = first;
            exported.extend(produce_all_records(s, &blobs, &org, &token).await);
            let expected = s.query(&org, "account", "score >= 10", &fields, 1000, None, soon()).await.unwrap().records;
            assert_eq!(expected.len(), 90);
            assert!(expected.iter().all(|r| r.fields.keys().all(|k| fields.contains(k))));
            assert_eq!(exported, expected, "a projected export holds only the fields asked for");
        })
        .await;
    }

    #[tokio::test]
    async fn every_matching_record_is_exported_once_across_the_first_portion_and_the_parts() {
        each_backend(|t| async move {
            let s = &t.store;
            let dir = tempfile::tempdir().unwrap();
            let blobs = Blobs::open(dir.path().to_str().unwrap()).unwrap();
            let org = org_with_account(s).await;
            load(s, &org, 430).await;
            // small: complete at once, nothing created
            let small = spec("amount < 5", 10, 100);
            let ExportStart::Complete { records: rows, as_of_seq } =
                s.start_export(&org, &small, soon(), Duration::from_secs(60)).await.unwrap()
            else {
                panic!("a small export completes")
            };
            assert_eq!(rows.len(), 5);
            assert_eq!(as_of_seq, s.high_water(&org).await.unwrap(), "a complete export says its as_of_seq too");

            let started = s.start_export(&org, &spec("", 30, 100), soon(), Duration::from_secs(60)).await.unwrap();
            let ExportStart::Started { first, export, token, estimate_exact } = started else { panic!("async") };
            assert_eq!(
                (first.len(), export.reason, export.state),
                (30, ExportReason::LargeResults, ExportState::Producing)
            );
            assert_eq!((export.estimated_total, estimate_exact, export.as_of_seq), (430, true, 430));
            // writes during the export: updates of records on both sides of the cursor, new
            // records; none is duplicated or dropped
            s.upsert(
                &org,
                "account",
                vec![rec(json!({"code": "r0001", "amount": -1})), rec(json!({"code": "r0300", "amount": -1}))],
                soon(),
            )
            .await
            .unwrap();
            let mut ids: Vec<String> = first.iter().map(|r| r.id.clone()).collect();
            ids.extend(produce_all(s, &blobs, &org, &token).await);
            let info = s.export(&org, &token).await.unwrap();
            assert!(info.total_known && info.parts_total == 4, "{info:?}");
            assert_eq!(info.rows_ready + 30, 430);
            let mut sorted = ids.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), ids.len(), "a record exported twice");
            assert_eq!(ids, (0..430).map(|i| format!("r{i:04}")).collect::<Vec<_>>());

            // a filter selects exactly, and a redelivered part is recorded once; the part carries
            // the trace context of the request that created the export
            let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned();
            let filtered =
                ExportSpec { traceparent: traceparent.clone(), ..spec("amount >= 100 AND amount < 390", 7, 40) };
            let started = s.start_export(&org, &filtered, soon(), Duration::from_secs(60)).await.unwrap();
            let ExportStart::Started { first, token, .. } = started else { panic!("async") };
            s.plan_exports(Duration::from_secs(5)).await.unwrap();
            let part = s.release_parts("sched", 1, 1).await.unwrap().remove(0);
            assert_eq!(part.traceparent, traceparent);
            let once = s.produce_part(&blobs, &part.export_id, part.number, "w1").await.unwrap();
            let twice = s.produce_part(&blobs, &part.export_id, part.number, "w2").await.unwrap();
            assert_eq!((once, twice), (PartOutcome::Produced(40), PartOutcome::Produced(40)));
            let mut ids: Vec<String> = first.iter().map(|r| r.id.clone()).collect();
            ids.extend(produce_all(s, &blobs, &org, &token).await);
            // r0300 was updated to amount -1 above: it no longer matches
            assert_eq!(ids, (100..390).filter(|&i| i != 300).map(|i| format!("r{i:04}")).collect::<Vec<_>>());
            let blob_files = walk(dir.path()).into_iter().filter(|p| p.contains(&part.export_id)).count();
            assert_eq!(blob_files as u32, s.export(&org, &token).await.unwrap().parts_total, "one blob per part");
        })
        .await;
    }

    /// [`Store::recover_parts`]: a part the manager holds is marked sent, one that never reached
    /// it is released again at once.
    #[tokio::test]
    async fn a_restarted_scheduler_keeps_the_parts_the_manager_holds_and_releases_the_rest() {
        each_backend(|t| async move {
            let s = &t.store;
            let org = org_with_account(s).await;
            load(s, &org, 300).await;
            let started = s.start_export(&org, &spec("", 10, 50), soon(), Duration::from_secs(60)).await.unwrap();
            let ExportStart::Started { export, .. } = started else { panic!("async") };
            s.plan_exports(Duration::from_secs(5)).await.unwrap();
            let parts = s.release_parts("sched-a", 3, 3).await.unwrap();
            assert_eq!(parts.len(), 3);
            s.mark_part_sent(&parts[0]).await.unwrap();
            // parts[1] journaled by the manager, parts[2] never sent
            let held = [(export.id.clone(), parts[1].number)];
            let recovered = s.recover_parts("sched-a", &held).await.unwrap();
            assert_eq!((recovered.marked_sent, recovered.released_again), (1, 1));
            assert_eq!(recovered.in_flight, held);
            let next = s.release_parts("sched-a", 3, 3).await.unwrap();
            assert_eq!(next.iter().map(|p| p.number).collect::<Vec<_>>(), [parts[2].number]);
        })
        .await;
    }

    fn walk(dir: &std::path::Path) -> Vec<String> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path.to_string_lossy().into_owned());
            }
        }
        out
    }

    #[tokio::test]
    async fn tokens_are_bound_to_their_org_cancel_stops_parts_and_expiry_deletes_them() {
        each_backend(|t| async move {
            let s = &t.store;
            let dir = tempfile::tempdir().unwrap();
            let blobs = Blobs::open(dir.path().to_str().unwrap()).unwrap();
            let org = org_with_account(s).await;
            let other = s.create_org("other").await.unwrap().id;
            load(s, &org, 300).await;
            let started = s.start_export(&org, &spec("", 10, 50), soon(), Duration::from_secs(60)).await.unwrap();
            let ExportStart::Started { token, export, .. } = started else { panic!("async") };
            assert!(matches!(s.export(&other, &token).await, Err(Error::NotFound(_))));
            assert!(matches!(s.export(&org, "xt_guessed").await, Err(Error::NotFound(_))));
            assert!(matches!(s.read_part(&blobs, &other, &token, 1).await, Err(Error::NotFound(_))));
            assert_eq!(s.read_part(&blobs, &org, &token, 1).await.unwrap(), PartRead::NotReady);

            // one part produced, then cancelled: nothing more is released or recorded
            s.plan_exports(Duration::from_secs(5)).await.unwrap();
            let parts = s.release_parts("sched", 2, 2).await.unwrap();
            assert_eq!(parts.len(), 2);
            s.produce_part(&blobs, &export.id, parts[0].number, "w1").await.unwrap();
            let cancelled = s.cancel_export(&org, &token).await.unwrap();
            assert_eq!((cancelled.state, cancelled.parts_ready), (ExportState::Cancelled, 1));
            assert_eq!(
                s.produce_part(&blobs, &export.id, parts[1].number, "w1").await.unwrap(),
                PartOutcome::NotProduced
            );
            assert!(s.release_parts("sched", 8, 8).await.unwrap().is_empty());
            assert!(matches!(s.read_part(&blobs, &org, &token, 1).await.unwrap(), PartRead::Rows(r) if r.clone().records().count() == 50));
            assert_eq!(s.read_part(&blobs, &org, &token, 2).await.unwrap(), PartRead::Never(ExportState::Cancelled));
            assert_eq!(walk(dir.path()).len(), 1, "the refused part's blob is deleted");

            // retention 0: expired at once, its blobs deleted by the sweep
            let started = s.start_export(&org, &spec("", 10, 50), soon(), Duration::ZERO).await.unwrap();
            let ExportStart::Started { token: gone, .. } = started else { panic!("async") };
            assert!(matches!(s.export(&org, &gone).await, Err(Error::Expired(_))));
            assert_eq!(s.expire_exports(&blobs, 10).await.unwrap(), 1);
            assert!(matches!(s.export(&org, &gone).await, Err(Error::Expired(_))));
            assert!(matches!(s.read_part(&blobs, &org, &gone, 1).await, Err(Error::Expired(_))));
        })
        .await;
    }

    #[tokio::test]
    async fn an_export_lives_its_retention_by_the_store_clock_and_then_its_parts_are_deleted() {
        each_backend(|t| async move {
            let s = &t.store;
            let dir = tempfile::tempdir().unwrap();
            let blobs = Blobs::open(dir.path().to_str().unwrap()).unwrap();
            let org = org_with_account(s).await;
            load(s, &org, 110).await;
            let hour = Duration::from_secs(3600);
            let started = s.start_export(&org, &spec("", 10, 50), soon(), hour).await.unwrap();
            let ExportStart::Started { token, .. } = started else { panic!("async") };
            assert_eq!(produce_all(s, &blobs, &org, &token).await.len(), 100);
            assert_eq!(walk(dir.path()).len(), 2);

            // 10 s before the end of its retention (a slow machine's margin): all there
            t.advance_clock(hour - Duration::from_secs(10));
            assert_eq!(s.expire_exports(&blobs, 10).await.unwrap(), 0);
            assert!(s.export(&org, &token).await.is_ok());
            assert!(matches!(s.read_part(&blobs, &org, &token, 2).await.unwrap(), PartRead::Rows(_)));
            assert_eq!(s.list_exports(&org, None, 10).await.unwrap().len(), 1);

            // over: expired at once for readers, its blobs deleted by the sweep, once
            t.advance_clock(Duration::from_secs(10));
            assert!(matches!(s.export(&org, &token).await, Err(Error::Expired(_))));
            assert!(matches!(s.read_part(&blobs, &org, &token, 1).await, Err(Error::Expired(_))));
            assert!(s.list_exports(&org, None, 10).await.unwrap().is_empty());
            assert_eq!(s.expire_exports(&blobs, 10).await.unwrap(), 1);
            assert_eq!(walk(dir.path()).len(), 0, "the parts' blobs are deleted");
            assert_eq!(s.expire_exports(&blobs, 10).await.unwrap(), 0);
        })
        .await;
    }

    #[tokio::test]
    async fn a_request_id_answers_the_same_export_with_a_new_token() {
        each_backend(|t| async move {
            let s = &t.store;
            let org = org_with_account(s).await;
            load(s, &org, 120).await;
            let mut with_id = spec("", 25, 50);
            with_id.request_id = Some("exp-1".into());
            let ExportStart::Started { first: a, export: ea, token: ta, .. } =
                s.start_export(&org, &with_id, soon(), Duration::from_secs(60)).await.unwrap()
            else {
                panic!("async")
            };
            let ExportStart::Started { first: b, export: eb, token: tb, .. } =
                s.start_export(&org, &with_id, soon(), Duration::from_secs(60)).await.unwrap()
            else {
                panic!("async")
            };
            assert_eq!(ea.id, eb.id);
            assert_ne!(ta, tb);
            assert_eq!(a, b);
            assert_eq!(s.export(&org, &tb).await.unwrap().id, ea.id);
        })
        .await;
    }

    #[tokio::test]
    async fn bad_input_creates_nothing() {
        each_backend(|t| async move {
            let s = &t.store;
            let org = org_with_account(s).await;
            load(s, &org, 20).await;
            let mut bad = spec("amount >", 5, 5);
            bad.fields = vec!["nope".into()];
            let Err(Error::Invalid(errors)) = s.start_export(&org, &bad, soon(), Duration::from_secs(60)).await else {
                panic!("invalid")
            };
            let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
            assert_eq!(fields, ["fields[0]", "filter"], "{errors:?}");
            let Err(Error::Invalid(errors)) =
                s.start_export(&org, &spec("amount >", 5, 5), soon(), Duration::from_secs(60)).await
            else {
                panic!("invalid")
            };
            assert_eq!(errors[0].field, "filter");
            assert!(matches!(
                s.start_export(
                    &org,
                    &ExportSpec { object: "nope".into(), ..spec("", 5, 5) },
                    soon(),
                    Duration::from_secs(60)
                )
                .await,
                Err(Error::NotFound(_))
            ));
            let pool = sqlx::any::AnyPoolOptions::new().max_connections(1).connect(&t.url).await.unwrap();
            let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM exports").fetch_one(&pool).await.unwrap();
            assert_eq!(count, 0);
        })
        .await;
    }
}

/// SQLite: the WAL is copied into the database file off the writer's thread. A few hundred KiB
/// of writes stay far below the writer's own checkpoint threshold (4,096 pages), so without the
/// background checkpoints the database file would not grow until thousands more pages came.
#[tokio::test]
async fn sqlite_wal_pages_reach_the_database_file_without_the_writer_checkpointing() {
    let t = testing::open(Backend::Sqlite).await.unwrap();
    let s = &t.store;
    let org = org_with_account(s).await;
    let path = std::path::PathBuf::from(t.url.trim_start_matches("sqlite://").split('?').next().unwrap());
    let before = std::fs::metadata(&path).unwrap().len();
    for batch in 0..10 {
        let records = (0..200)
            .map(|i| rec(json!({"code": format!("c{batch}-{i}"), "status": "x".repeat(200), "amount": i})))
            .collect();
        s.upsert(&org, "account", records, soon()).await.unwrap();
    }
    let wal = path.with_extension("db-wal");
    assert!(std::fs::metadata(&wal).unwrap().len() > 400_000, "the writes are in the WAL");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut grown = std::fs::metadata(&path).unwrap().len();
    while grown < before + 400_000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        grown = std::fs::metadata(&path).unwrap().len();
    }
    assert!(grown >= before + 400_000, "the database file grew from {before} to only {grown} bytes in 5 s");
}

/// A link's dead letters and history come a page at a time, in order, each row once.
/// A link to an unreachable target, dead-lettering rejections and re-bootstrapping when trimmed.
fn new_link() -> baton_store::sync::NewLink {
    baton_store::sync::NewLink {
        target_endpoint: "http://127.0.0.1:1".into(),
        target_api_key: "bk_x".into(),
        objects: vec![],
        verify_threshold: 3,
        probe_interval: Duration::from_secs(1),
        on_reject: baton_store::sync::RejectPolicy::DeadLetter,
        on_trimmed: baton_store::sync::TrimmedPolicy::Rebootstrap,
        target_ca_pem: String::new(),
    }
}

#[tokio::test]
async fn a_link_lease_holds_until_it_lapses_and_a_renewal_extends_it() {
    each_backend(|t| async move {
        let s = &t.store;
        let org = org_with_account(s).await;
        let link = s.create_link(&org, &new_link()).await.unwrap().id;
        let lease = Duration::from_secs(60);
        assert_eq!(s.claim_links("a", lease).await.unwrap(), vec![link.clone()]);
        assert!(s.claim_links("b", lease).await.unwrap().is_empty(), "a's lease holds");
        t.advance_clock(Duration::from_secs(50));
        assert_eq!(s.claim_links("a", lease).await.unwrap(), vec![link.clone()], "a renews");
        t.advance_clock(Duration::from_secs(50));
        assert!(s.claim_links("b", lease).await.unwrap().is_empty(), "the renewal holds past the first lease");
        t.advance_clock(Duration::from_secs(11));
        assert_eq!(s.claim_links("b", lease).await.unwrap(), vec![link.clone()], "a's lease lapsed");
        assert!(s.claim_links("a", lease).await.unwrap().is_empty(), "b holds it now");
        s.release_links("b").await.unwrap();
        assert_eq!(s.claim_links("a", lease).await.unwrap(), vec![link], "given up on shutdown: at once");
    })
    .await;
}

#[tokio::test]
async fn dead_letters_and_link_history_page_in_order() {
    use baton_store::sync::{DeadLetter, RejectPolicy, TrimmedPolicy};
    each_backend(|t| async move {
        let s = &t.store;
        let org = org_with_account(s).await;
        let new = baton_store::sync::NewLink {
            on_trimmed: TrimmedPolicy::Fail,
            target_ca_pem: "-----BEGIN CERTIFICATE-----\n…".into(),
            ..new_link()
        };
        let link = s.create_link(&org, &new).await.unwrap();
        assert_eq!((link.on_reject, link.on_trimmed), (RejectPolicy::DeadLetter, TrimmedPolicy::Fail));
        assert_eq!(s.link(&org, &link.id).await.unwrap().target_ca_pem, new.target_ca_pem);
        for seq in 1..=5 {
            let letter = DeadLetter {
                seq,
                object: "account".into(),
                record_id: format!("r{seq}"),
                reason: "no".into(),
                at_ms: 1,
            };
            s.add_dead_letter(&link.id, &letter).await.unwrap();
        }
        let (mut seen, mut after) = (Vec::new(), 0);
        for _ in 0..10 {
            let page = s.dead_letters(&link.id, after, 2).await.unwrap();
            assert!(page.len() <= 2, "{page:?}");
            let Some((last, _)) = page.last() else { break };
            after = *last;
            seen.extend(page.into_iter().map(|(_, d)| d.seq));
        }
        assert_eq!(seen, [1, 2, 3, 4, 5]);
        let all = s.link_history(&link.id, 0, None).await.unwrap();
        assert!(!all.is_empty());
        let first = s.link_history(&link.id, 0, Some(1)).await.unwrap();
        assert_eq!(first, all[..1]);
        assert_eq!(s.link_history(&link.id, first[0].id, None).await.unwrap(), all[1..]);
    })
    .await;
}

/// Every live record of `object`, by id: (version, fields).
async fn live_records(s: &Store, org: &str) -> BTreeMap<String, (i64, Fields)> {
    let page = s.query(org, "account", "", &[], 1_000, None, soon()).await.unwrap();
    assert!(page.next_after.is_none());
    page.records.into_iter().map(|r| (r.id, (r.version, r.fields))).collect()
}

/// A link's snapshot, page by page, as the changes a link sends (tombstones as deletes).
async fn snapshot_changes(s: &Store, org: &str, page_size: usize) -> Vec<baton_store::model::ChangeEvent> {
    let (mut changes, mut after) = (Vec::new(), None::<String>);
    for _ in 0..100 {
        let page = s.snapshot_page(org, "account", after.as_deref(), page_size).await.unwrap();
        assert!(page.rows.len() <= page_size);
        changes.extend(page.rows.into_iter().map(|r| baton_store::model::ChangeEvent {
            seq: 0,
            object: "account".into(),
            record_id: r.record.id,
            op: if r.deleted { ChangeOp::Delete } else { ChangeOp::Upsert },
            fields: (!r.deleted).then_some(r.record.fields),
            version: r.record.version,
            committed_at_ms: r.record.updated_at_ms,
        }));
        match page.next_after {
            Some(next) => after = Some(next),
            None => return changes,
        }
    }
    panic!("the snapshot did not end within 100 pages");
}

/// A link's snapshot holds the tombstones too: applied again to a target that missed changes
/// (its cursor fell behind the trimmed log), it deletes what the source deleted meanwhile, and
/// the version guard skips what the target holds already; the target equals the source.
#[tokio::test]
async fn a_link_snapshot_with_tombstones_brings_a_stale_target_level() {
    each_backend(|t| async move {
        let s = &t.store;
        let (source, target) = (org_with_account(s).await, org_with_account(s).await);
        let records = (0..5).map(|i| rec(json!({"code": format!("r{i}"), "amount": i}))).collect();
        s.upsert(&source, "account", records, soon()).await.unwrap();
        s.delete(&source, "account", vec!["r4".into()], soon()).await.unwrap();
        let first = snapshot_changes(s, &source, 2).await;
        assert_eq!(first.len(), 5, "four live records and a tombstone: {first:?}");
        assert_eq!(first.iter().filter(|c| c.op == ChangeOp::Delete).count(), 1);
        s.apply_changes(&target, "lnk_1", &first, true).await.unwrap();
        assert_eq!(live_records(s, &target).await, live_records(s, &source).await);

        // what the target misses: a delete, an update, a new record, a delete then a re-create
        s.delete(&source, "account", vec!["r1".into(), "r2".into()], soon()).await.unwrap();
        s.upsert(&source, "account", vec![rec(json!({"code": "r0", "amount": 100}))], soon()).await.unwrap();
        s.upsert(&source, "account", vec![rec(json!({"code": "r5", "amount": 5}))], soon()).await.unwrap();
        s.upsert(&source, "account", vec![rec(json!({"code": "r2", "amount": 22}))], soon()).await.unwrap();
        let again = snapshot_changes(s, &source, 2).await;
        let outcome = s.apply_changes(&target, "lnk_1", &again, true).await.unwrap();
        assert_eq!((outcome.applied, outcome.rejected.len()), (4, 0), "{outcome:?}");
        let level = live_records(s, &source).await;
        assert_eq!(level.keys().collect::<Vec<_>>(), ["r0", "r2", "r3", "r5"]);
        assert_eq!(live_records(s, &target).await, level);
        // the same snapshot once more changes nothing
        let outcome = s.apply_changes(&target, "lnk_1", &again, true).await.unwrap();
        assert_eq!((outcome.applied, outcome.skipped), (0, 6), "{outcome:?}");
    })
    .await;
}

/// Processes started together on a new SQLite file (a worker and a scheduler on `baton dev`'s
/// database, say) each open the store: the migrations run once, and every open succeeds (sqlx
/// has no migration lock on SQLite; the store's lock file is it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stores_opened_together_on_a_new_sqlite_file_migrate_it_once() {
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/together.db", dir.path().display());
        let opens: Vec<_> = (0..8)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { baton_store::Store::open(&baton_store::StoreOptions::new(url)).await })
            })
            .collect();
        for open in opens {
            let store = open.await.unwrap().unwrap_or_else(|e| panic!("round {round}: an open failed: {e}"));
            store.close().await;
        }
    }
}
