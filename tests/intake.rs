//! End-to-end tests of the intake: `baton dev` on SQLite and PostgreSQL, over real gRPC. The round
//! trip, SIGTERM and exit-code tests run the real binary; the others run `baton dev` in-process
//! (`Server::in_process`: the same library the binary runs, on a port of its own).

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use baton_mesh::proto::v1 as pb;
use baton_store::Backend;
use baton_tests::{ADMIN_TOKEN, Server, TempDir, TestOrg, authed, backends, baton_bin, create_org, record};
use serde_json::json;
use sqlx::Executor;
use tonic::Code;
use tonic_types::StatusExt;

async fn upsert(
    server: &Server,
    org: &TestOrg,
    records: Vec<serde_json::Value>,
) -> Result<pb::UpsertResponse, tonic::Status> {
    let request = pb::UpsertRequest { object: "account".into(), records: records.into_iter().map(record).collect() };
    server.intake().await.upsert(authed(request, &org.key)).await.map(tonic::Response::into_inner)
}

async fn get(server: &Server, org: &TestOrg, id: &str) -> Result<pb::Record, tonic::Status> {
    let request = pb::GetRequest { object: "account".into(), id: id.into() };
    server.intake().await.get(authed(request, &org.key)).await.map(tonic::Response::into_inner)
}

async fn query(server: &Server, org: &TestOrg, filter: &str) -> Result<Vec<pb::Record>, tonic::Status> {
    let request = pb::QueryRequest { object: "account".into(), filter: filter.into(), ..Default::default() };
    server.intake().await.query(authed(request, &org.key)).await.map(|r| r.into_inner().records)
}

fn ids(records: &[pb::Record]) -> Vec<String> {
    records.iter().map(|r| r.id.clone()).collect()
}

fn field_violations(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("no BadRequest details in {status:?}"))
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

#[tokio::test]
async fn records_round_trip_through_the_real_binary() {
    for backend in backends() {
        let server = Server::start(backend, &[]).await;
        let org = create_org(&server, "acme").await;
        let out = upsert(
            &server,
            &org,
            vec![
                json!({"code": "a1", "name": "Ada", "amount": 10, "email": "ada@x"}),
                json!({"code": "a2", "name": "Bob", "amount": 20}),
                json!({"code": "a3", "name": "Cy"}),
            ],
        )
        .await
        .unwrap();
        assert_eq!(out.last_seq, 3);
        assert!(out.results.iter().all(|r| r.created && r.version == 1));
        let a1 = get(&server, &org, "a1").await.unwrap();
        let fields = a1.fields;
        assert_eq!(fields["name"].kind, Some(pb::value::Kind::StringValue("Ada".into())));
        assert_eq!(fields["amount"].kind, Some(pb::value::Kind::IntegerValue(10)));
        assert_eq!(ids(&query(&server, &org, "amount >= 15 OR amount IS NULL").await.unwrap()), ["a2", "a3"]);
        let out = upsert(&server, &org, vec![json!({"code": "a3", "name": "Cy", "amount": 30})]).await.unwrap();
        assert_eq!((out.results[0].version, out.results[0].created, out.last_seq), (2, false, 4));
        let request = pb::DeleteRequest { object: "account".into(), ids: vec!["a2".into()] };
        let deleted = server.intake().await.delete(authed(request, &org.key)).await.unwrap().into_inner();
        assert!(deleted.results[0].deleted);
        assert_eq!(get(&server, &org, "a2").await.unwrap_err().code(), Code::NotFound);
        assert_eq!(ids(&query(&server, &org, "").await.unwrap()), ["a1", "a3"]);
    }
}

#[tokio::test]
async fn a_request_over_the_record_limit_is_rejected_as_a_batch_and_commits_nothing() {
    for backend in backends() {
        let server = Server::in_process(backend, &[]).await;
        let org = create_org(&server, "acme").await;
        let records = (0..201).map(|i| json!({"code": format!("r{i}"), "name": "n"})).collect();
        let status = upsert(&server, &org, records).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted);
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "RESUBMIT_AS_BATCH");
        assert_eq!(info.metadata["limit_name"], "max_records");
        assert_eq!(info.metadata["limit"], "200");
        assert_eq!(info.metadata["observed"], "201");
        assert!(status.get_details_retry_info().is_none(), "the request's size, not load, caused this");
        assert!(query(&server, &org, "").await.unwrap().is_empty());
        // exactly the limit is accepted
        let records = (0..200).map(|i| json!({"code": format!("r{i}"), "name": "n"})).collect();
        assert_eq!(upsert(&server, &org, records).await.unwrap().last_seq, 200);
        // a page larger than the limit is an export's job
        let request = pb::QueryRequest { object: "account".into(), page_size: 201, ..Default::default() };
        let status = server.intake().await.query(authed(request, &org.key)).await.unwrap_err();
        assert_eq!(status.get_details_error_info().unwrap().reason, "RESUBMIT_AS_EXPORT");
    }
}

/// Another connection holds the lock the upsert needs, past the intake's deadline: the upsert is
/// rolled back and rejected with RESUBMIT_AS_BATCH and RetryInfo, and nothing is committed.
#[tokio::test]
async fn a_deadline_overrun_is_rejected_as_a_batch_and_commits_nothing() {
    for backend in backends() {
        let server = Server::in_process(backend, &["--deadline", "400ms"]).await;
        let org = create_org(&server, "acme").await;
        upsert(&server, &org, vec![json!({"code": "before", "name": "n"})]).await.unwrap();
        sqlx::any::install_default_drivers();
        let blocker = sqlx::any::AnyPoolOptions::new().max_connections(1).connect(&server.store_url).await.unwrap();
        let mut conn = blocker.acquire().await.unwrap();
        match backend {
            Backend::Sqlite => {
                conn.execute("BEGIN IMMEDIATE").await.unwrap();
            }
            Backend::Postgres => {
                conn.execute("BEGIN").await.unwrap();
                conn.execute(format!("SELECT 1 FROM orgs WHERE id = '{}' FOR UPDATE", org.id).as_str()).await.unwrap();
            }
        }
        let started = std::time::Instant::now();
        let status = upsert(&server, &org, vec![json!({"code": "late", "name": "n"})]).await.unwrap_err();
        let elapsed = started.elapsed();
        conn.execute("ROLLBACK").await.unwrap();
        drop(conn);
        blocker.close().await;
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "RESUBMIT_AS_BATCH");
        assert_eq!(info.metadata["limit_name"], "deadline_ms");
        assert!(info.metadata["observed"].parse::<u64>().unwrap() >= 390, "{info:?}");
        assert!(status.get_details_retry_info().is_some(), "load caused this: RetryInfo expected");
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
        assert_eq!(get(&server, &org, "late").await.unwrap_err().code(), Code::NotFound);
        // the next write gets the next seq: the rolled-back one consumed none
        let out = upsert(&server, &org, vec![json!({"code": "after", "name": "n"})]).await.unwrap();
        assert_eq!(out.last_seq, 2);
    }
}

#[tokio::test]
async fn orgs_cannot_read_update_or_detect_each_other() {
    for backend in backends() {
        let server = Server::in_process(backend, &[]).await;
        let a = create_org(&server, "a").await;
        let b = create_org(&server, "b").await;
        upsert(&server, &a, vec![json!({"code": "secret", "name": "A's", "email": "ceo@a"})]).await.unwrap();

        let theirs = get(&server, &b, "secret").await.unwrap_err();
        let nobodys = get(&server, &b, "nothing").await.unwrap_err();
        assert_eq!((theirs.code(), nobodys.code()), (Code::NotFound, Code::NotFound));
        assert_eq!(theirs.message().replace("secret", "X"), nobodys.message().replace("nothing", "X"));
        assert!(query(&server, &b, "").await.unwrap().is_empty());
        assert!(query(&server, &b, "email = 'ceo@a'").await.unwrap().is_empty());
        let request = pb::DeleteRequest { object: "account".into(), ids: vec!["secret".into()] };
        assert!(!server.intake().await.delete(authed(request, &b.key)).await.unwrap().into_inner().results[0].deleted);
        // B writing the same id and unique value makes B's own record, A's is untouched
        let out = upsert(&server, &b, vec![json!({"code": "secret", "name": "B's", "email": "ceo@a"})]).await.unwrap();
        assert!(out.results[0].created);
        let theirs = get(&server, &a, "secret").await.unwrap();
        assert_eq!(theirs.version, 1);
        assert_eq!(theirs.fields["name"].kind, Some(pb::value::Kind::StringValue("A's".into())));
        // an org without the object cannot tell whether another org has it
        let mut admin = server.admin().await;
        let c = admin
            .create_org(authed(pb::CreateOrgRequest { name: "c".into() }, ADMIN_TOKEN))
            .await
            .unwrap()
            .into_inner();
        let c_key = admin
            .create_api_key(authed(pb::CreateApiKeyRequest { org_id: c.id, label: String::new() }, ADMIN_TOKEN))
            .await
            .unwrap()
            .into_inner()
            .api_key;
        let request = pb::GetRequest { object: "account".into(), id: "secret".into() };
        let status = server.intake().await.get(authed(request, &c_key)).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        // an org key cannot use the admin API
        let status = admin.list_orgs(authed(pb::ListOrgsRequest {}, &a.key)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
}

#[tokio::test]
async fn bad_input_gets_a_precise_status_and_changes_nothing() {
    for backend in backends() {
        let server = Server::in_process(backend, &["--max-message-bytes", "65536"]).await;
        let org = create_org(&server, "acme").await;
        upsert(&server, &org, vec![json!({"code": "a", "name": "A", "email": "a@x", "amount": 1})]).await.unwrap();

        let cases: Vec<(Vec<serde_json::Value>, Vec<&str>)> = vec![
            (vec![json!({"code": "b", "name": "B", "colour": "red"})], vec!["records[0].colour"]),
            (vec![json!({"code": "b", "name": "B", "amount": "ten"})], vec!["records[0].amount"]),
            (vec![json!({"code": "b", "name": "B", "amount": 1.5})], vec!["records[0].amount"]),
            (vec![json!({"code": "b"}), json!({"name": "C"})], vec!["records[0].name", "records[1].code"]),
            (
                vec![json!({"code": "b", "name": "B"}), json!({"code": "c", "name": "C", "email": "a@x"})],
                vec!["records[1].email"],
            ),
            (vec![json!({"code": "b", "name": "B"}), json!({"code": "b", "name": "B2"})], vec!["records[1].code"]),
        ];
        for (records, expected) in cases {
            let status = upsert(&server, &org, records.clone()).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{records:?}: {status:?}");
            assert_eq!(field_violations(&status), expected, "{records:?}");
        }
        // a filter that does not parse, and one over an unknown field
        for filter in ["amount >", "colour = 'red'", "amount = 'x'"] {
            let status = query(&server, &org, filter).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument);
            assert_eq!(field_violations(&status), ["filter"], "{filter}");
        }
        // a message over the size limit
        let big: Vec<_> = (0..100).map(|i| json!({"code": format!("big{i}"), "name": "x".repeat(1000)})).collect();
        let status = upsert(&server, &org, big).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted);
        let info = tonic_types::StatusExt::get_details_error_info(&status).unwrap();
        assert_eq!((info.reason.as_str(), info.metadata["limit"].as_str()), ("MESSAGE_TOO_LARGE", "65536"));
        assert!(status.message().contains("65536"), "{}", status.message());

        // bad, missing and revoked keys
        let request = || pb::GetRequest { object: "account".into(), id: "a".into() };
        let mut intake = server.intake().await;
        assert_eq!(intake.get(authed(request(), "bk_guessed")).await.unwrap_err().code(), Code::Unauthenticated);
        assert_eq!(intake.get(tonic::Request::new(request())).await.unwrap_err().code(), Code::Unauthenticated);
        let mut admin = server.admin().await;
        admin
            .revoke_api_key(authed(pb::RevokeApiKeyRequest { key_id: org.key_id.clone() }, ADMIN_TOKEN))
            .await
            .unwrap();
        let status = upsert(&server, &org, vec![json!({"code": "z", "name": "Z"})]).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert!(status.message().contains("revoked"), "{}", status.message());
        assert_eq!(
            admin.list_orgs(authed(pb::ListOrgsRequest {}, "wrong")).await.unwrap_err().code(),
            Code::Unauthenticated
        );

        // nothing of any of it was committed: one record, one change
        let key = admin
            .create_api_key(authed(
                pb::CreateApiKeyRequest { org_id: org.id.clone(), label: String::new() },
                ADMIN_TOKEN,
            ))
            .await
            .unwrap()
            .into_inner()
            .api_key;
        let fresh = TestOrg { id: org.id.clone(), key, key_id: String::new() };
        assert_eq!(ids(&query(&server, &fresh, "").await.unwrap()), ["a"]);
        assert_eq!(get(&server, &fresh, "a").await.unwrap().version, 1);
        let out = upsert(&server, &fresh, vec![json!({"code": "next", "name": "N"})]).await.unwrap();
        assert_eq!(out.last_seq, 2);

        // bad schemas are field violations too
        let mut schema = baton_tests::account_schema();
        schema.name = "Bad Name".into();
        schema.fields[1].r#type = 0;
        let status = admin
            .define_object(authed(
                pb::DefineObjectRequest { org_id: org.id.clone(), schema: Some(schema) },
                ADMIN_TOKEN,
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(field_violations(&status), ["schema.fields[1].type"]);
    }
}

/// Parallel upserts through the binary: the `last_seq` of every response ends a distinct block of
/// seqs, and the blocks tile 1..N exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_upserts_get_dense_distinct_seqs() {
    for backend in backends() {
        let server = std::sync::Arc::new(Server::in_process(backend, &[]).await);
        let org = std::sync::Arc::new(create_org(&server, "acme").await);
        let mut tasks = Vec::new();
        for w in 0..16 {
            let (server, org) = (server.clone(), org.clone());
            tasks.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for r in 0..8 {
                    let records = (0..4)
                        .map(|k| json!({"code": format!("k{}", (w * 7 + r + k) % 10), "name": format!("w{w}r{r}")}))
                        .collect();
                    seqs.push(upsert(&server, &org, records).await.unwrap().last_seq);
                }
                seqs
            }));
        }
        let mut covered = BTreeSet::new();
        for task in tasks {
            for last in task.await.unwrap() {
                for seq in last - 3..=last {
                    assert!(covered.insert(seq), "seq {seq} allocated twice");
                }
            }
        }
        assert_eq!(covered, (1..=16 * 8 * 4).collect::<BTreeSet<i64>>());
    }
}

#[tokio::test]
async fn bad_config_exits_64_with_one_line() {
    // a port in use is a configuration error too
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let dir = TempDir::new();
    let (db, data) = (format!("sqlite://{}/x.db", dir.path().display()), dir.path().join("dev").display().to_string());
    for args in [
        vec!["intake", "--store", db.as_str(), "--listen", taken.as_str()],
        vec!["dev", "--data-dir", data.as_str(), "--listen", taken.as_str()],
        vec!["intake", "--store", "ftp://nowhere"],
        vec!["intake", "--store", "sqlite:///tmp/x.db", "--deadline", "0ms"],
        vec!["dev", "--listen", "not-an-address"],
        vec!["dev", "--no-such-flag"],
        vec!["intake"],
        vec!["worker", "--store", db.as_str(), "--manager", "notaurl"],
        vec!["scheduler", "--store", db.as_str(), "--manager", "http://127.0.0.1:7400,ftp://x"],
    ] {
        let out = Command::new(baton_bin()).args(&args).env_remove("BATON_STORE").output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}: {out:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("baton: bad config: "), "{stderr}");
        if args.contains(&taken.as_str()) {
            assert!(stderr.contains(&format!("cannot listen on {taken}")), "{stderr}");
        }
    }
}

#[tokio::test]
async fn sigterm_drains_and_exits_cleanly_and_metrics_count_requests() {
    let mut server = Server::start(Backend::Sqlite, &[]).await;
    let org = create_org(&server, "acme").await;
    upsert(&server, &org, vec![json!({"code": "a", "name": "A"})]).await.unwrap();
    let text = server.metrics_text();
    assert!(text.contains("200 OK"), "{text}");
    assert!(text.contains("baton_grpc_requests_total{method=\"/baton.v1.Intake/Upsert\",code=\"Ok\"} 1"), "{text}");
    // idle connections close at once: the drain ends well before the 5 s grace
    let status = server.terminate(Duration::from_secs(3)).await.expect("exits within 3s of SIGTERM");
    assert!(status.success(), "{status:?}");
}

/// `baton` with the server's endpoint and the org's key, fed `stdin`: (success, stdout, stderr).
fn cli(server: &Server, org: &TestOrg, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(baton_bin())
        .args(args)
        .env("BATON_ENDPOINT", format!("http://{}", server.addr))
        .env("BATON_API_KEY", &org.key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Integers past 2^53 and decimals travel exactly through every way in and out: the CLI's
/// upsert, get, query and export, Upsert/Get over gRPC, and a batch; a value that does not fit
/// its field exactly is INVALID_ARGUMENT with a field violation, and nothing is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_are_exact_end_to_end_and_nothing_is_rounded() {
    use pb::value::Kind;
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        let server = Server::in_process(backend, &["--workers", "1"]).await;
        let org = create_org(&server, "acme").await;
        let f = |name: &str, t: pb::FieldType, unique| pb::FieldSpec {
            name: name.into(),
            r#type: t as i32,
            required: name == "code",
            unique,
            deprecated: false,
        };
        let schema = pb::ObjectSchema {
            name: "t".into(),
            external_id_field: "code".into(),
            fields: vec![
                f("code", pb::FieldType::String, true),
                f("n", pb::FieldType::Integer, false),
                f("x", pb::FieldType::Number, false),
                f("d", pb::FieldType::Decimal, true),
            ],
            ..Default::default()
        };
        let define = pb::DefineObjectRequest { org_id: org.id.clone(), schema: Some(schema) };
        server.admin().await.define_object(authed(define, ADMIN_TOKEN)).await.unwrap();

        // the CLI: in as JSON, out as JSON, exactly
        let line = r#"{"code": "big", "n": 9007199254740993, "x": 0.1, "d": "0012.3400"}"#;
        let (ok, _, err) = cli(&server, &org, &["upsert", "t"], line);
        assert!(ok, "{err}");
        let (ok, out, err) = cli(&server, &org, &["get", "t", "big"], "");
        assert!(ok, "{err}");
        assert!(out.contains(r#""n":9007199254740993"#) && out.contains(r#""d":"12.34""#), "{out}");
        let (ok, out, err) =
            cli(&server, &org, &["query", "t", "--filter", "n = 9007199254740993 AND d = '12.34'"], "");
        assert!(ok && out.contains(r#""n":9007199254740993"#), "{out}{err}");
        let (ok, out, _) = cli(&server, &org, &["query", "t", "--filter", "n = 9007199254740992"], "");
        assert!(ok && out.trim().is_empty(), "the neighbouring double does not match: {out}");
        let dir = TempDir::new();
        let file = dir.path().join("t.ndjson");
        let (ok, _, err) = cli(&server, &org, &["export", "t", "--out", file.to_str().unwrap()], "");
        assert!(ok, "{err}");
        let exported = std::fs::read_to_string(&file).unwrap();
        assert!(exported.contains(r#""n":9007199254740993"#) && exported.contains(r#""x":0.1"#), "{exported}");

        // out of range, or not representable in the field's type: refused, precisely
        let (ok, _, err) = cli(&server, &org, &["upsert", "t"], r#"{"code": "over", "n": 9300000000000000000}"#);
        assert!(!ok && err.contains("9300000000000000000 is outside the signed 64-bit integer range"), "{err}");
        assert!(err.contains("records[0].n"), "{err}");
        let v = |kind| pb::Value { kind: Some(kind) };
        let fields = |pairs: Vec<(&str, Kind)>| pb::RecordFields {
            fields: pairs.into_iter().map(|(k, kind)| (k.to_owned(), v(kind))).collect(),
        };
        let request = pb::UpsertRequest {
            object: "t".into(),
            records: vec![
                fields(vec![("code", Kind::StringValue("ok".into())), ("n", Kind::IntegerValue(i64::MAX))]),
                fields(vec![("code", Kind::StringValue("x".into())), ("x", Kind::IntegerValue((1 << 53) + 1))]),
                fields(vec![("code", Kind::StringValue("d".into())), ("d", Kind::NumberValue(0.1))]),
                fields(vec![("code", Kind::StringValue("e".into())), ("d", Kind::DecimalValue("1".repeat(39)))]),
            ],
        };
        let status = server.intake().await.upsert(authed(request, &org.key)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(field_violations(&status), ["records[1].x", "records[2].d", "records[3].d"]);
        let missing = get(&server, &org, "ok").await;
        assert!(missing.is_err(), "nothing of a refused request is committed: {missing:?}");

        // gRPC: typed in, typed out
        let request = pb::UpsertRequest {
            object: "t".into(),
            records: vec![fields(vec![
                ("code", Kind::StringValue("max".into())),
                ("n", Kind::DecimalValue("-9223372036854775808".into())),
                ("x", Kind::IntegerValue(1 << 53)),
                ("d", Kind::DecimalValue("-0.50".into())),
            ])],
        };
        server.intake().await.upsert(authed(request, &org.key)).await.unwrap();
        let get_t = pb::GetRequest { object: "t".into(), id: "max".into() };
        let got = server.intake().await.get(authed(get_t, &org.key)).await.unwrap().into_inner();
        assert_eq!(got.fields["n"], v(Kind::IntegerValue(i64::MIN)));
        assert_eq!(got.fields["x"], v(Kind::NumberValue(9_007_199_254_740_992.0)));
        assert_eq!(got.fields["d"], v(Kind::DecimalValue("-0.5".into())));

        // a batch: through staging and a chunk, the same exactness
        let path = dir.path().join("batch.ndjson");
        std::fs::write(&path, "{\"code\": \"b1\", \"n\": -9007199254740993, \"d\": \"99999999999999999999.99\"}\n")
            .unwrap();
        let (ok, id, err) = cli(&server, &org, &["batch", "submit", path.to_str().unwrap(), "--object", "t"], "");
        assert!(ok, "{id}{err}");
        let (ok, out, err) = cli(&server, &org, &["get", "t", "b1"], "");
        assert!(ok, "{err}");
        assert!(out.contains(r#""n":-9007199254740993"#) && out.contains(r#""d":"99999999999999999999.99""#), "{out}");
    }
}

/// `baton admin …` with the server's endpoint and the admin token: (success, stdout, stderr).
fn admin_cli(server: &Server, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(baton_bin())
        .args(args)
        .env("BATON_ENDPOINT", format!("http://{}", server.addr))
        .env("BATON_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// An object's schema evolves through the real binary: defined (again: the same answer), an
/// optional field added with the CLI and written, `required` relaxed, a field deprecated (still
/// written and answered) then dropped (a write carrying it is refused as unknown, answers leave
/// the stored value out); an incompatible change is FAILED_PRECONDITION listing every problem,
/// and changes nothing; an export and an extraction say the version their rows follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_evolve_by_compatible_versions_end_to_end() {
    for backend in backends() {
        eprintln!("-- on {backend:?}");
        let server = Server::in_process(backend, &["--workers", "1"]).await;
        let org = create_org(&server, "acme").await;
        let mut admin = server.admin().await;
        let f = |name: &str, t: pb::FieldType, required, unique| pb::FieldSpec {
            name: name.into(),
            r#type: t as i32,
            required,
            unique,
            deprecated: false,
        };
        let mut schema = pb::ObjectSchema {
            name: "member".into(),
            external_id_field: "code".into(),
            fields: vec![
                f("code", pb::FieldType::String, true, true),
                f("name", pb::FieldType::String, true, false),
                f("age", pb::FieldType::Integer, false, false),
            ],
            ..Default::default()
        };
        let define = || pb::DefineObjectRequest { org_id: org.id.clone(), schema: Some(schema.clone()) };
        assert_eq!(admin.define_object(authed(define(), ADMIN_TOKEN)).await.unwrap().into_inner().version, 1);
        // a retried definition answers the object, not ALREADY_EXISTS
        assert_eq!(admin.define_object(authed(define(), ADMIN_TOKEN)).await.unwrap().into_inner().version, 1);
        let write = |records: Vec<serde_json::Value>| {
            let request =
                pb::UpsertRequest { object: "member".into(), records: records.into_iter().map(record).collect() };
            let server = &server;
            let key = org.key.clone();
            async move { server.intake().await.upsert(authed(request, &key)).await.map(tonic::Response::into_inner) }
        };
        let read = |id: &str| {
            let request = pb::GetRequest { object: "member".into(), id: id.into() };
            let server = &server;
            let key = org.key.clone();
            async move {
                baton_tests::fields_json(
                    &server.intake().await.get(authed(request, &key)).await.unwrap().into_inner().fields,
                )
            }
        };
        write(vec![json!({"code": "m1", "name": "Ann", "age": 30})]).await.unwrap();

        // v2 with the CLI: an optional field, then written
        let dir = TempDir::new();
        let file = dir.path().join("member.json");
        std::fs::write(
            &file,
            r#"{"name": "member", "external_id_field": "code", "fields": [
                {"name": "code", "type": "string", "required": true, "unique": true},
                {"name": "name", "type": "string", "required": true},
                {"name": "age", "type": "integer"},
                {"name": "nickname", "type": "string"}]}"#,
        )
        .unwrap();
        let path = format!("@{}", file.display());
        let (ok, out, err) = admin_cli(&server, &["admin", "object", "update", "--org", &org.id, &path]);
        assert!(ok && out.contains(r#""version":2"#) && err.contains("member is at version 2"), "{out}{err}");
        schema.fields.push(f("nickname", pb::FieldType::String, false, false));
        write(vec![json!({"code": "m2", "name": "Bob", "nickname": "bo"})]).await.unwrap();
        assert_eq!(read("m2").await["nickname"], "bo");
        let update = |schema: &pb::ObjectSchema| pb::UpdateObjectRequest {
            org_id: org.id.clone(),
            schema: Some(schema.clone()),
        };

        // v3: `name` relaxed
        let missing = write(vec![json!({"code": "m3"})]).await.unwrap_err();
        assert_eq!(field_violations(&missing), ["records[0].name"]);
        schema.fields[1].required = false;
        assert_eq!(admin.update_object(authed(update(&schema), ADMIN_TOKEN)).await.unwrap().into_inner().version, 3);
        write(vec![json!({"code": "m3"})]).await.unwrap();

        // v4: `age` deprecated: still written and answered
        schema.fields[2].deprecated = true;
        let v4 = admin.update_object(authed(update(&schema), ADMIN_TOKEN)).await.unwrap().into_inner();
        assert!(v4.version == 4 && v4.fields[2].deprecated, "{v4:?}");
        write(vec![json!({"code": "m4", "age": 4})]).await.unwrap();
        assert_eq!(read("m4").await["age"], 4);

        // v5: `age` dropped: refused in writes, left out of answers (m1's value stays stored)
        schema.fields.remove(2);
        let v5 = admin.update_object(authed(update(&schema), ADMIN_TOKEN)).await.unwrap().into_inner();
        assert_eq!((v5.version, v5.dropped_fields.clone()), (5, vec!["age".to_owned()]));
        let dropped = write(vec![json!({"code": "m5", "age": 5})]).await.unwrap_err();
        assert_eq!(dropped.code(), Code::InvalidArgument);
        assert!(dropped.message().contains("records[0].age: unknown field of object member"), "{dropped:?}");
        assert_eq!(read("m1").await, json!({"code": "m1", "name": "Ann"}));

        // an incompatible change: every problem listed, nothing changed
        let mut bad = schema.clone();
        bad.fields[1].r#type = pb::FieldType::Integer as i32;
        bad.fields.push(f("region", pb::FieldType::String, true, false));
        bad.fields.push(f("age", pb::FieldType::Integer, false, false));
        let refused = admin.update_object(authed(update(&bad), ADMIN_TOKEN)).await.unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        let info = refused.get_details_error_info().unwrap();
        assert_eq!((info.reason.as_str(), info.metadata["version"].as_str()), ("SCHEMA_CHANGE_INCOMPATIBLE", "5"));
        let subjects: Vec<_> =
            refused.get_details_precondition_failure().unwrap().violations.into_iter().map(|v| v.subject).collect();
        assert_eq!(subjects, ["schema.fields[1].type", "schema.fields[3].required", "schema.fields[4].name"]);
        let objects = admin
            .list_objects(authed(pb::ListObjectsRequest { org_id: org.id.clone() }, ADMIN_TOKEN))
            .await
            .unwrap()
            .into_inner()
            .objects;
        assert_eq!(objects.iter().find(|o| o.name == "member"), Some(&v5));
        let (ok, out, err) = admin_cli(&server, &["admin", "object", "versions", "--org", &org.id, "member"]);
        assert!(ok, "{err}");
        let versions: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(versions.iter().map(|v| v["version"].as_i64().unwrap()).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        assert_eq!(versions[4]["dropped_fields"], json!(["age"]));
        let (ok, _, err) = admin_cli(&server, &["admin", "object", "update", "--org", &org.id, &path]);
        assert!(!ok && err.contains("FailedPrecondition") && err.contains("field \"age\" was dropped"), "{err}");

        // an export and an extraction carry the version their rows are typed under
        let mut intake = server.intake().await;
        let request = pb::ExportRequest {
            object: "member".into(),
            sync_rows: 1,
            part_rows: 10,
            wait: true,
            ..Default::default()
        };
        let export = intake.export(authed(request, &org.key)).await.unwrap().into_inner();
        assert!(!export.complete, "{export:?}");
        assert_eq!((export.schema_version, export.records[0].id.as_str()), (5, "m1"));
        assert!(!export.records[0].fields.contains_key("age"));
        let request = pb::FetchPartRequest { token: export.token.clone(), part: 0 };
        let mut part = intake.fetch_part(authed(request, &org.key)).await.unwrap().into_inner();
        let frame = part.message().await.unwrap().unwrap();
        assert_eq!(frame.schema_version, 5);
        assert_eq!(ids(&frame.records), ["m2", "m3", "m4"]);
        assert!(frame.records.iter().all(|r| !r.fields.contains_key("age")), "{frame:?}");

        let request = pb::ExtractRequest { objects: vec!["member".into()], ..Default::default() };
        let mut extract = server.sync().await.extract(authed(request, &org.key)).await.unwrap().into_inner();
        let mut snapshot = Vec::new();
        loop {
            match extract.message().await.unwrap().unwrap().kind {
                Some(pb::extract_response::Kind::Snapshot(chunk)) => snapshot.push(chunk),
                Some(pb::extract_response::Kind::SnapshotDone(_)) => break,
                _ => {}
            }
        }
        assert!(snapshot.iter().all(|c| c.schema_version == 5), "{snapshot:?}");
        assert!(snapshot.iter().flat_map(|c| &c.records).all(|r| !r.fields.contains_key("age")));
        write(vec![json!({"code": "m6", "nickname": "six"})]).await.unwrap();
        let changes = loop {
            if let Some(pb::extract_response::Kind::Changes(batch)) = extract.message().await.unwrap().unwrap().kind {
                break batch.changes;
            }
        };
        assert_eq!((changes[0].record_id.as_str(), changes[0].schema_version), ("m6", 5));
    }
}

/// `baton query … | head -1`: the CLI stops quietly when its reader goes away (no "Broken pipe"
/// message, exit 0).
#[tokio::test]
async fn the_cli_stops_quietly_when_its_reader_goes_away() {
    use std::io::BufRead;
    let server = Server::in_process(Backend::Sqlite, &[]).await;
    let org = create_org(&server, "acme").await;
    // more than a pipe's buffer (64 KiB) of output, so that the CLI writes after the reader left
    let name = "n".repeat(2_000);
    let records = (0..200).map(|i| json!({"code": format!("a{i:03}"), "name": name})).collect();
    upsert(&server, &org, records).await.unwrap();
    let mut child = Command::new(baton_bin())
        .args(["query", "account"])
        .env("BATON_ENDPOINT", format!("http://{}", server.addr))
        .env("BATON_API_KEY", &org.key)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.contains("a000"), "{first}");
    // the reader is dropped here: the pipe closes
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status.code());
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
}
