//! The client CLI: admin commands and real-time record requests against a running mesh.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use baton_api::convert;
use baton_mesh::proto::v1 as pb;
use baton_store::model::ObjectSchema;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic_types::StatusExt;

use crate::exit::{Exit, fail};
use crate::output::{Column, Kind, Output, Printer, col, shown, time};

/// Where the mesh is.
#[derive(clap::Args, Debug, Clone)]
pub struct Conn {
    /// The baton endpoint.
    #[arg(long, env = "BATON_ENDPOINT", default_value = "http://127.0.0.1:7400")]
    pub(crate) endpoint: String,
    /// TLS for an `https://` endpoint.
    #[command(flatten)]
    pub(crate) tls: baton_mesh::tls::ClientTlsArgs,
}

/// Connection and credentials of the admin commands.
#[derive(clap::Args, Debug, Clone)]
pub struct AdminConn {
    #[command(flatten)]
    conn: Conn,
    /// The admin token.
    #[arg(long, env = "BATON_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
}

/// Connection and credentials of the record commands.
#[derive(clap::Args, Debug, Clone)]
pub struct OrgConn {
    #[command(flatten)]
    pub(crate) conn: Conn,
    /// The org's API key.
    #[arg(long, env = "BATON_API_KEY", hide_env_values = true)]
    pub(crate) api_key: String,
}

/// The connection of commands whose subcommands share it, given before or after the
/// subcommand (`baton sync --api-key K link list`, `baton sync link list --api-key K`); not needed
/// by the subcommands that serve.
#[derive(clap::Args, Debug, Clone)]
pub struct OptionalOrgConn {
    /// The baton endpoint.
    #[arg(long, env = "BATON_ENDPOINT", default_value = "http://127.0.0.1:7400", global = true)]
    endpoint: String,
    /// The org's API key.
    #[arg(long, env = "BATON_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    /// TLS for an `https://` endpoint (before a subcommand: `baton sync --tls-ca CA link list`).
    #[command(flatten)]
    tls: baton_mesh::tls::ClientTlsArgs,
}

impl OptionalOrgConn {
    /// The connection, once an API key is known (exits 64 without one).
    pub(crate) fn org(&self) -> anyhow::Result<OrgConn> {
        let api_key = self.api_key.clone().ok_or_else(|| fail(Exit::Usage, "set --api-key or BATON_API_KEY"))?;
        Ok(OrgConn { conn: Conn { endpoint: self.endpoint.clone(), tls: self.tls.clone() }, api_key })
    }
}

/// Which page of a list to print: the first by default, or from `--page-token`, or every page
/// with `--all`. When more remain, the next page's token is said on stderr.
#[derive(clap::Args, Debug, Clone)]
pub struct PageArgs {
    /// Items per page (0: the server's default, 100; at most 1,000).
    #[arg(long, default_value_t = 0)]
    pub(crate) page_size: u32,
    /// Start at this page: the token a previous page ended with.
    #[arg(long, default_value = "")]
    pub(crate) page_token: String,
    /// Follow every page rather than stopping after the first.
    #[arg(long)]
    pub(crate) all: bool,
}

impl PageArgs {
    /// Whether to ask for the page after the one that answered `next_page_token`, `listed`
    /// items so far (`noun`: singular, plural); when not and more remain, says how to get them.
    pub(crate) fn go_on(&self, next_page_token: &str, listed: usize, noun: (&str, &str)) -> bool {
        if next_page_token.is_empty() {
            return false;
        }
        if self.all {
            return true;
        }
        let listed = count(listed as u64, noun.0, noun.1);
        eprintln!("{listed} listed; more remain: --page-token {next_page_token} (or --all)");
        false
    }
}

/// The admin commands.
#[derive(clap::Subcommand, Debug)]
pub enum AdminCommand {
    /// Orgs.
    #[command(subcommand)]
    Org(OrgCommand),
    /// API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Object schemas.
    #[command(subcommand)]
    Object(ObjectCommand),
}

/// Org commands.
#[derive(clap::Subcommand, Debug)]
pub enum OrgCommand {
    /// Creates an org and prints its id.
    Create {
        /// The org's name.
        name: String,
    },
    /// Lists the orgs.
    List,
}

/// API key commands.
#[derive(clap::Subcommand, Debug)]
pub enum KeyCommand {
    /// Issues an API key for an org and prints it (it is shown only once).
    Create {
        /// The org.
        #[arg(long)]
        org: String,
        /// A label for the key.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Revokes an API key.
    Revoke {
        /// The key id (`key_…`).
        key_id: String,
    },
    /// Lists API keys, oldest first: ids, orgs, labels and times, never the keys themselves.
    List {
        /// Only this org's keys (default: every org's).
        #[arg(long)]
        org: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
}

/// Object schema commands.
#[derive(clap::Subcommand, Debug)]
pub enum ObjectCommand {
    /// Defines an object from a JSON schema:
    /// `{"name":"account","external_id_field":"code","fields":[{"name":"code","type":"string","required":true,"unique":true}]}`.
    Define {
        /// The org.
        #[arg(long)]
        org: String,
        /// The schema as JSON, or `@FILE` to read it from a file.
        schema: String,
    },
    /// Changes an object's schema to the whole new schema given, in the same JSON shape as
    /// `define`, as its next version. Compatible changes only: add an optional field, relax
    /// `required`, set `"deprecated": true` on a field, leave out a field deprecated by an
    /// earlier version (dropping it). Anything else is refused, listing every problem, and
    /// nothing changes.
    Update {
        /// The org.
        #[arg(long)]
        org: String,
        /// The new schema as JSON, or `@FILE` to read it from a file.
        schema: String,
    },
    /// Lists an org's objects as JSON, each at its current version (`version`,
    /// `dropped_fields`).
    List {
        /// The org.
        #[arg(long)]
        org: String,
    },
    /// Lists every version of an object's schema as JSON lines, oldest first.
    Versions {
        /// The org.
        #[arg(long)]
        org: String,
        /// The object.
        object: String,
    },
}

/// `baton upsert`.
#[derive(clap::Args, Debug)]
pub struct UpsertArgs {
    #[command(flatten)]
    conn: OrgConn,
    /// The object.
    object: String,
    /// NDJSON records to read (one JSON object per line); `-` for standard input.
    #[arg(long, default_value = "-")]
    file: PathBuf,
    /// When the intake answers "resubmit as batch" (too many records, or its deadline), submit
    /// the same records as an upsert batch and print the batch id.
    #[arg(long)]
    auto_batch: bool,
    /// With --auto-batch: the batch's request id, so that running the command again does not
    /// stage the records twice (default: a new one each time).
    #[arg(long, requires = "auto_batch")]
    request_id: Option<String>,
}

/// `baton get`.
#[derive(clap::Args, Debug)]
pub struct GetArgs {
    #[command(flatten)]
    conn: OrgConn,
    /// The object.
    object: String,
    /// The record id.
    id: String,
}

/// `baton query`.
#[derive(clap::Args, Debug)]
pub struct QueryArgs {
    #[command(flatten)]
    conn: OrgConn,
    /// The object.
    object: String,
    /// The filter, for example `amount > 10 AND status IN ('open', 'late')`.
    #[arg(long, default_value = "")]
    filter: String,
    /// Fields to return (comma-separated); all by default.
    #[arg(long, value_delimiter = ',')]
    fields: Vec<String>,
    /// Records per page; 0 for the server's limit.
    #[arg(long, default_value_t = 0)]
    page_size: i32,
    /// Follow every page rather than stopping after the first.
    #[arg(long)]
    all: bool,
}

/// `baton delete`.
#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    #[command(flatten)]
    conn: OrgConn,
    /// The object.
    object: String,
    /// The ids to delete.
    #[arg(required = true)]
    ids: Vec<String>,
}

/// How long the CLI waits to connect before it says nothing answers (exit 69).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// The longest a CLI request waits for its answer to begin (tonic's per-request timeout).
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A channel to the endpoint: a usage error (64) when it is not a URL, unavailable (69) when
/// nothing answers there.
pub(crate) async fn channel(conn: &Conn) -> anyhow::Result<Channel> {
    let invalid = |why: String| fail(Exit::Usage, format!("invalid endpoint {:?}: {why}", conn.endpoint));
    let endpoint = Endpoint::from_shared(conn.endpoint.clone()).map_err(|e| invalid(e.to_string()))?;
    if !matches!(endpoint.uri().scheme_str(), Some("http" | "https")) || endpoint.uri().host().is_none() {
        return Err(invalid("not an http:// or https:// URL".to_owned()));
    }
    // an https:// endpoint over TLS with the CLI's --tls-* files (a file missing: usage)
    let endpoint = conn.tls.client().endpoint(&conn.endpoint).map_err(|e| fail(Exit::Usage, e))?;
    let endpoint = endpoint.connect_timeout(CONNECT_TIMEOUT).timeout(CALL_TIMEOUT);
    endpoint
        .connect()
        .await
        .map_err(|e| fail(Exit::Unavailable, format!("cannot connect to {}: {}", conn.endpoint, causes(&e))))
}

pub(crate) fn with_bearer<T>(message: T, secret: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {secret}")
        .parse()
        .map_err(|_| fail(Exit::Usage, "the key or token is not valid header text"))?;
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

/// An error and its causes, `: `-separated, each said once (tonic's transport errors repeat
/// their source's text in their own).
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let said = c.to_string();
        if !text.ends_with(&said) {
            text = format!("{text}: {said}");
        }
        cause = c.source();
    }
    text
}

/// Renders a status with its details, for the terminal, as an error ending the command with the
/// status's exit code.
pub(crate) fn explain(status: tonic::Status) -> anyhow::Error {
    let exit = Exit::of_status(&status);
    let mut text = format!("{:?}: {}", status.code(), status.message());
    if let Some(bad) = status.get_details_bad_request() {
        for v in bad.field_violations {
            text.push_str(&format!("\n  {}: {}", v.field, v.description));
        }
    }
    if let Some(failure) = status.get_details_precondition_failure() {
        for v in failure.violations {
            text.push_str(&format!("\n  {}: {}", v.subject, v.description));
        }
    }
    if let Some(info) = status.get_details_error_info() {
        text.push_str(&format!("\n  reason: {}", info.reason));
        let mut meta: Vec<_> = info.metadata.into_iter().collect();
        meta.sort();
        for (k, v) in meta {
            text.push_str(&format!("\n  {k}: {v}"));
        }
    }
    if let Some(retry) = status.get_details_retry_info().and_then(|r| r.retry_delay) {
        text.push_str(&format!("\n  retry after: {retry:?}"));
    }
    // what a transport failure most likely means, since its own words do not say
    if crate::exit::transport_failure(&status) {
        text.push_str(
            "\n  hint: the connection failed under the call. A server that serves TLS needs an https:// \
             endpoint and --tls-ca; one that requires client certificates closes the connection of a \
             client without one (--tls-client-cert, --tls-client-key)",
        );
    }
    fail(exit, text)
}

pub(crate) fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// `n` and the noun, singular or plural: `1 chunk`, `3 chunks`.
pub(crate) fn count(n: impl Into<u64>, singular: &str, plural: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { singular } else { plural })
}

/// A time as JSON: RFC 3339 text in UTC, or null when unset.
pub(crate) fn time_json(time: Option<&prost_types::Timestamp>) -> serde_json::Value {
    time.map_or(serde_json::Value::Null, |t| t.to_string().into())
}

/// A duration as JSON: text such as `1.5s`, or null when unset.
pub(crate) fn duration_json(duration: Option<&prost_types::Duration>) -> serde_json::Value {
    duration.map_or(serde_json::Value::Null, |d| d.to_string().into())
}

pub(crate) fn record_json(record: &pb::Record) -> serde_json::Value {
    serde_json::json!({
        "id": record.id,
        "version": record.version,
        "update_time": time_json(record.update_time.as_ref()),
        "fields": convert::pb_fields_to_json(&record.fields),
    })
}

/// The columns of an org.
const ORG_COLUMNS: &[Column] = &[col("ID", "id"), col("NAME", "name"), time("CREATED", "create_time")];

/// The columns of an API key.
const KEY_COLUMNS: &[Column] = &[
    col("KEY", "key_id"),
    col("ORG", "org_id"),
    col("LABEL", "label"),
    time("CREATED", "create_time"),
    time("REVOKED", "revoke_time"),
];

/// The columns of an object schema.
const OBJECT_COLUMNS: &[Column] = &[
    col("OBJECT", "name"),
    col("VERSION", "version"),
    col("EXTERNAL ID", "external_id_field"),
    shown("FIELDS", "fields", Kind::Names),
    col("DROPPED", "dropped_fields"),
];

/// The columns of an object schema's version.
const VERSION_COLUMNS: &[Column] = &[
    col("OBJECT", "name"),
    col("VERSION", "version"),
    time("CREATED", "create_time"),
    shown("FIELDS", "fields", Kind::Names),
    col("DROPPED", "dropped_fields"),
];

/// An API key as listed, as JSON: never the key itself.
fn key_json(key: &pb::ApiKey) -> serde_json::Value {
    serde_json::json!({
        "key_id": key.key_id, "org_id": key.org_id, "label": key.label,
        "create_time": time_json(key.create_time.as_ref()), "revoke_time": time_json(key.revoke_time.as_ref()),
    })
}

/// The Admin API's client.
type AdminClient = pb::admin_client::AdminClient<Channel>;

/// Runs an admin command.
pub async fn admin(conn: AdminConn, command: AdminCommand, output: Output) -> anyhow::Result<()> {
    let mut client = pb::admin_client::AdminClient::new(channel(&conn.conn).await?);
    let token = conn.admin_token.as_str();
    match command {
        AdminCommand::Org(command) => admin_org(&mut client, token, command, output).await,
        AdminCommand::Key(command) => admin_key(&mut client, token, command, output).await,
        AdminCommand::Object(command) => admin_object(&mut client, token, command, output).await,
    }
}

/// Runs an org command: creates an org (its id on stdout), or lists them.
async fn admin_org(client: &mut AdminClient, token: &str, command: OrgCommand, output: Output) -> anyhow::Result<()> {
    match command {
        OrgCommand::Create { name } => {
            let org = client.create_org(with_bearer(pb::CreateOrgRequest { name }, token)?).await.map_err(explain)?;
            println!("{}", org.get_ref().id);
        }
        OrgCommand::List => {
            let orgs = client.list_orgs(with_bearer(pb::ListOrgsRequest {}, token)?).await.map_err(explain)?;
            let mut printer = Printer::new(output, ORG_COLUMNS);
            for org in &orgs.get_ref().orgs {
                printer.print(
                    &serde_json::json!({"id": org.id, "name": org.name, "create_time": time_json(org.create_time.as_ref())}),
                )?;
            }
            printer.finish()?;
        }
    }
    Ok(())
}

/// Runs an API key command: creates a key (the key on stdout, once), revokes one, or lists them
/// page by page.
async fn admin_key(client: &mut AdminClient, token: &str, command: KeyCommand, output: Output) -> anyhow::Result<()> {
    match command {
        KeyCommand::Create { org, label } => {
            let key = client
                .create_api_key(with_bearer(pb::CreateApiKeyRequest { org_id: org, label }, token)?)
                .await
                .map_err(explain)?;
            eprintln!("key id: {} (shown once; keep the key below)", key.get_ref().key_id);
            println!("{}", key.get_ref().api_key);
        }
        KeyCommand::Revoke { key_id } => {
            client
                .revoke_api_key(with_bearer(pb::RevokeApiKeyRequest { key_id: key_id.clone() }, token)?)
                .await
                .map_err(explain)?;
            eprintln!("revoked {key_id}");
        }
        KeyCommand::List { org, page } => {
            let mut printer = Printer::new(output, KEY_COLUMNS);
            let (mut page_token, mut listed) = (page.page_token.clone(), 0);
            loop {
                let request = pb::ListApiKeysRequest {
                    org_id: org.clone().unwrap_or_default(),
                    page_size: page.page_size,
                    page_token,
                };
                let keys = client.list_api_keys(with_bearer(request, token)?).await.map_err(explain)?.into_inner();
                for key in &keys.api_keys {
                    printer.print(&key_json(key))?;
                }
                listed += keys.api_keys.len();
                if !page.go_on(&keys.next_page_token, listed, ("key", "keys")) {
                    break;
                }
                page_token = keys.next_page_token;
            }
            printer.finish()?;
        }
    }
    Ok(())
}

/// Runs an object schema command: defines or updates a schema, lists the schemas, or lists one
/// object's versions.
async fn admin_object(
    client: &mut AdminClient,
    token: &str,
    command: ObjectCommand,
    output: Output,
) -> anyhow::Result<()> {
    match command {
        ObjectCommand::Define { org, schema } => {
            let schema = read_schema(schema)?;
            let request = pb::DefineObjectRequest { org_id: org, schema: Some(convert::schema_to_pb(&schema)) };
            let defined = client.define_object(with_bearer(request, token)?).await.map_err(explain)?;
            eprintln!("defined object {} (version {})", defined.get_ref().name, defined.get_ref().version);
        }
        ObjectCommand::Update { org, schema } => {
            let schema = read_schema(schema)?;
            let request = pb::UpdateObjectRequest { org_id: org, schema: Some(convert::schema_to_pb(&schema)) };
            let updated = client.update_object(with_bearer(request, token)?).await.map_err(explain)?;
            eprintln!("object {} is at version {}", updated.get_ref().name, updated.get_ref().version);
            let mut printer = Printer::new(output, OBJECT_COLUMNS);
            printer.print(&schema_json(updated.get_ref())?)?;
            printer.finish()?;
        }
        ObjectCommand::List { org } => {
            let objects = client
                .list_objects(with_bearer(pb::ListObjectsRequest { org_id: org }, token)?)
                .await
                .map_err(explain)?;
            let mut printer = Printer::new(output, OBJECT_COLUMNS);
            for o in &objects.get_ref().objects {
                printer.print(&schema_json(o)?)?;
            }
            printer.finish()?;
        }
        ObjectCommand::Versions { org, object } => {
            let versions = client
                .list_object_versions(with_bearer(pb::ListObjectVersionsRequest { org_id: org, object }, token)?)
                .await
                .map_err(explain)?;
            let mut printer = Printer::new(output, VERSION_COLUMNS);
            for v in &versions.get_ref().versions {
                let mut json = schema_json(v.schema.as_ref().context("a version without its schema")?)?;
                json["create_time"] = time_json(v.create_time.as_ref());
                printer.print(&json)?;
            }
            printer.finish()?;
        }
    }
    Ok(())
}

/// A schema given on the command line: JSON, or `@FILE`.
fn read_schema(arg: String) -> anyhow::Result<ObjectSchema> {
    let text = match arg.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|e| input_error(path.as_ref(), e))?,
        None => arg,
    };
    serde_json::from_str(&text)
        .map_err(|e| fail(Exit::InvalidArgument, format!("the schema is not valid JSON of the expected shape: {e}")))
}

/// An input file that cannot be read: not found (66) when it does not exist, a failure (1)
/// otherwise.
pub(crate) fn input_error(path: &std::path::Path, e: std::io::Error) -> anyhow::Error {
    let exit = if e.kind() == std::io::ErrorKind::NotFound { Exit::NotFound } else { Exit::Failure };
    fail(exit, format!("cannot read {}: {e}", path.display()))
}

/// A schema from the server as JSON, in the shape `define` and `update` read, with its
/// `version` and `dropped_fields`.
fn schema_json(schema: &pb::ObjectSchema) -> anyhow::Result<serde_json::Value> {
    let parsed =
        convert::schema_from_pb(schema).map_err(|e| anyhow::anyhow!("unexpected schema from server: {e:?}"))?;
    let mut json = serde_json::to_value(&parsed)?;
    json["version"] = schema.version.into();
    if !schema.dropped_fields.is_empty() {
        json["dropped_fields"] = schema.dropped_fields.clone().into();
    }
    Ok(json)
}

/// The columns of a record.
const RECORD_COLUMNS: &[Column] =
    &[col("ID", "id"), col("VERSION", "version"), time("UPDATED", "update_time"), col("FIELDS", "fields")];

/// The columns of an upserted record.
const UPSERTED_COLUMNS: &[Column] = &[col("ID", "id"), col("VERSION", "version"), col("CREATED", "created")];

/// The columns of a deleted record.
const DELETED_COLUMNS: &[Column] = &[col("ID", "id"), col("DELETED", "deleted"), col("VERSION", "version")];

/// `baton upsert`.
pub async fn upsert(args: UpsertArgs, output: Output) -> anyhow::Result<()> {
    let records = crate::batch_cli::read_records(&args.file)?;
    if records.is_empty() {
        return Err(fail(Exit::InvalidArgument, "no records to upsert"));
    }
    let records = crate::batch_cli::records_to_pb(&records)?;
    if args.auto_batch {
        use baton_scheduler::client::{Upserted, upsert_or_batch};
        let request_id = args.request_id.unwrap_or_else(|| format!("auto-{}", hex::encode(rand::random::<[u8; 8]>())));
        let channel = channel(&args.conn.conn).await?;
        match upsert_or_batch(channel, &args.conn.api_key, &args.object, records, &request_id).await.map_err(explain)? {
            Upserted::RealTime(response) => print_upserted(&response, output)?,
            Upserted::Batch(batch) => {
                eprintln!(
                    "rejected in real time (resubmit as batch): submitted as batch {} ({} in {}); \
                     follow it with `baton batch watch {}`",
                    batch.batch_id,
                    count(batch.records, "record", "records"),
                    count(batch.chunks, "chunk", "chunks"),
                    batch.batch_id
                );
                println!("{}", batch.batch_id);
            }
        }
        return Ok(());
    }
    let mut client = pb::intake_client::IntakeClient::new(channel(&args.conn.conn).await?);
    let request = pb::UpsertRequest { object: args.object, records };
    let response = client.upsert(with_bearer(request, &args.conn.api_key)?).await.map_err(explain)?;
    print_upserted(response.get_ref(), output)
}

fn print_upserted(response: &pb::UpsertResponse, output: Output) -> anyhow::Result<()> {
    let mut printer = Printer::new(output, UPSERTED_COLUMNS);
    for r in &response.results {
        printer.print(&serde_json::json!({"id": r.id, "version": r.version, "created": r.created}))?;
    }
    printer.finish()?;
    eprintln!(
        "upserted {} (last seq {})",
        count(response.results.len() as u64, "record", "records"),
        response.last_seq
    );
    Ok(())
}

/// `baton get`.
pub async fn get(args: GetArgs, output: Output) -> anyhow::Result<()> {
    let mut client = pb::intake_client::IntakeClient::new(channel(&args.conn.conn).await?);
    let request = pb::GetRequest { object: args.object, id: args.id };
    let record = client.get(with_bearer(request, &args.conn.api_key)?).await.map_err(explain)?;
    let mut printer = Printer::new(output, RECORD_COLUMNS);
    printer.print(&record_json(record.get_ref()))?;
    printer.finish()
}

/// `baton query`.
pub async fn query(args: QueryArgs, output: Output) -> anyhow::Result<()> {
    let mut client = pb::intake_client::IntakeClient::new(channel(&args.conn.conn).await?);
    let mut printer = Printer::new(output, RECORD_COLUMNS);
    let mut token = String::new();
    let mut total = 0usize;
    loop {
        let request = pb::QueryRequest {
            object: args.object.clone(),
            filter: args.filter.clone(),
            fields: args.fields.clone(),
            page_size: args.page_size,
            page_token: token.clone(),
        };
        let page = client.query(with_bearer(request, &args.conn.api_key)?).await.map_err(explain)?.into_inner();
        for r in &page.records {
            printer.print(&record_json(r))?;
        }
        total += page.records.len();
        if !args.all || page.next_page_token.is_empty() {
            if !page.next_page_token.is_empty() {
                eprintln!("{total} records; more remain (use --all)");
            }
            break;
        }
        token = page.next_page_token;
    }
    printer.finish()
}

/// `baton delete`.
pub async fn delete(args: DeleteArgs, output: Output) -> anyhow::Result<()> {
    let mut client = pb::intake_client::IntakeClient::new(channel(&args.conn.conn).await?);
    let request = pb::DeleteRequest { object: args.object, ids: args.ids };
    let response = client.delete(with_bearer(request, &args.conn.api_key)?).await.map_err(explain)?;
    let mut printer = Printer::new(output, DELETED_COLUMNS);
    for r in &response.get_ref().results {
        printer.print(&serde_json::json!({"id": r.id, "deleted": r.deleted, "version": r.version}))?;
    }
    printer.finish()
}
