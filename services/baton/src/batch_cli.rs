//! `baton scheduler`, `baton worker` and `baton batch …`: running the batch services, and
//! submitting, following and reading batches.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use baton_api::convert;
use baton_mesh::proto::v1 as pb;
use baton_store::model::Fields;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::client::{OrgConn, PageArgs, channel, count, explain, time_json, with_bearer};
use crate::exit::{Exit, fail};
use crate::output::{Column, Kind, Output, Printer, col, shown, time};

/// `baton batch`.
#[derive(clap::Args, Debug)]
pub struct BatchArgs {
    #[command(flatten)]
    conn: OrgConn,
    #[command(subcommand)]
    command: BatchCommand,
}

/// What a batch does to each record.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum Operation {
    Upsert,
    Insert,
    Update,
    Delete,
}

/// The batch subcommands.
#[derive(clap::Subcommand, Debug)]
enum BatchCommand {
    /// Submits a file of records as a batch (NDJSON, or CSV by its `.csv` extension), shows
    /// upload and chunk progress, and ends with a summary per outcome; exits 2 when chunks
    /// aborted, 130 when the batch was cancelled.
    Submit {
        /// The file; `-` reads NDJSON from standard input. A CSV header names the fields, each
        /// optionally typed (`amount:integer`, `score:number`, `active:boolean`, `code:string`,
        /// `price:decimal`); untyped cells are read as integer, number or boolean when they look
        /// like one, and as strings otherwise; empty cells are left out.
        file: PathBuf,
        /// The object.
        #[arg(long)]
        object: String,
        /// What to do with each record.
        #[arg(long, value_enum, default_value = "upsert")]
        op: Operation,
        /// Records per chunk (default 10,000).
        #[arg(long, default_value_t = 0)]
        chunk_size: u32,
        /// Release no chunk before this much time from now (for example `10m`).
        #[arg(long, value_parser = baton_mesh::config::parse_duration)]
        not_before: Option<Duration>,
        /// At most this many chunks at once (0: the scheduler's per-org cap).
        #[arg(long, default_value_t = 0)]
        max_parallel: u32,
        /// At most this many records per second (0: no limit).
        #[arg(long, default_value_t = 0)]
        records_per_second: u32,
        /// An id for idempotent resubmission: the same id again answers the first batch.
        #[arg(long, default_value = "")]
        request_id: String,
        /// Where the batch's completion is POSTed when it is done (an http or https URL; see
        /// the README's "Completion webhooks").
        #[arg(long)]
        webhook: Option<String>,
        /// Print the batch id once staged, without following the chunks.
        #[arg(long)]
        no_wait: bool,
    },
    /// Follows a batch until it is done, then prints the summary; exits 2 when chunks aborted,
    /// 130 when the batch was cancelled.
    Watch {
        /// The batch id.
        id: String,
    },
    /// Prints a batch's state and totals as JSON.
    Get {
        /// The batch id.
        id: String,
    },
    /// Prints every chunk's outcome as JSON lines, with the record errors of aborted chunks.
    Results {
        /// The batch id.
        id: String,
        /// Only aborted chunks.
        #[arg(long)]
        aborted: bool,
    },
    /// Cancels a batch: chunks not yet released never run.
    Cancel {
        /// The batch id.
        id: String,
    },
    /// Lists the org's batches, newest first, with their states and totals.
    List {
        #[command(flatten)]
        page: PageArgs,
    },
}

/// Reads records: NDJSON, or CSV when the path ends in `.csv`.
pub(crate) fn read_records(path: &Path) -> anyhow::Result<Vec<Fields>> {
    let mut reader: Box<dyn Read> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::fs::File::open(path).map_err(|e| crate::client::input_error(path, e))?)
    };
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")) {
        return read_csv(&mut reader);
    }
    let mut records = Vec::new();
    for (n, line) in std::io::BufReader::new(reader).lines().enumerate() {
        let line = line.with_context(|| format!("line {}", n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(Value::Object(map)) => records.push(map),
            Ok(_) => return Err(fail(Exit::InvalidArgument, format!("line {}: not a JSON object", n + 1))),
            Err(e) => return Err(fail(Exit::InvalidArgument, format!("line {}: {e}", n + 1))),
        }
    }
    Ok(records)
}

/// Records read from a file as protobuf fields, exactly (see [`convert::json_to_pb`]).
pub(crate) fn records_to_pb(records: &[Fields]) -> anyhow::Result<Vec<pb::RecordFields>> {
    records
        .iter()
        .enumerate()
        .map(|(i, r)| convert::json_to_pb(r).map_err(|e| fail(Exit::InvalidArgument, format!("record {}: {e}", i + 1))))
        .collect()
}

fn read_csv(reader: &mut dyn Read) -> anyhow::Result<Vec<Fields>> {
    let mut csv = csv::Reader::from_reader(reader);
    let mut columns = Vec::new();
    let headers = csv.headers().map_err(|e| fail(Exit::InvalidArgument, format!("the CSV header: {e}")))?;
    for (i, name) in headers.iter().enumerate() {
        let (name, kind) = match name.split_once(':') {
            Some((name, kind)) => (name, Some(kind)),
            None => (name, None),
        };
        if !matches!(kind, None | Some("string" | "integer" | "number" | "boolean" | "decimal")) {
            return Err(fail(
                Exit::InvalidArgument,
                format!(
                    "CSV column {}: type {:?} is not string, integer, number, boolean or decimal",
                    i + 1,
                    kind.unwrap_or("")
                ),
            ));
        }
        columns.push((name.trim().to_owned(), kind.map(str::to_owned)));
    }
    let mut records = Vec::new();
    for (n, row) in csv.records().enumerate() {
        let row = row.map_err(|e| fail(Exit::InvalidArgument, format!("CSV record {}: {e}", n + 1)))?;
        let mut fields = Fields::new();
        for ((name, kind), cell) in columns.iter().zip(row.iter()) {
            if cell.is_empty() {
                continue;
            }
            let bad = || {
                let kind = kind.as_deref().unwrap_or("");
                fail(Exit::InvalidArgument, format!("CSV record {}, column {name}: {cell:?} is not {kind}", n + 1))
            };
            let value = match kind.as_deref() {
                // decimal text goes as it is; the server checks it against the schema
                Some("string" | "decimal") => Value::from(cell),
                Some("integer") => Value::from(cell.parse::<i64>().map_err(|_| bad())?),
                Some("number") => cell
                    .parse::<f64>()
                    .ok()
                    .and_then(|f| serde_json::Number::from_f64(f).map(Value::Number))
                    .ok_or_else(bad)?,
                Some("boolean") => Value::from(cell.parse::<bool>().map_err(|_| bad())?),
                _ => infer(cell),
            };
            fields.insert(name.clone(), value);
        }
        records.push(fields);
    }
    Ok(records)
}

/// An untyped CSV cell: integer, number or boolean when it reads as one, otherwise a string.
fn infer(cell: &str) -> Value {
    if let Ok(n) = cell.parse::<i64>() {
        return Value::from(n);
    }
    if let Some(n) = cell.parse::<f64>().ok().filter(|f| f.is_finite()).and_then(serde_json::Number::from_f64) {
        return Value::Number(n);
    }
    match cell {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => Value::from(cell),
    }
}

fn state_name(state: i32) -> String {
    pb::ChunkState::try_from(state)
        .map_or_else(|_| format!("{state}"), |s| s.as_str_name().trim_start_matches("CHUNK_STATE_").to_owned())
}

fn batch_json(b: &pb::Batch) -> Value {
    let t = b.totals.unwrap_or_default();
    serde_json::json!({
        "batch_id": b.batch_id, "object": b.object,
        "state": pb::BatchState::try_from(b.state).map(|s| s.as_str_name().trim_start_matches("BATCH_STATE_")).unwrap_or("?"),
        "request_id": b.request_id, "chunk_size": b.chunk_size,
        "chunks": t.chunks, "records": t.records, "records_committed": t.records_committed,
        "pending": t.pending, "in_flight": t.in_flight, "committed": t.committed,
        "committed_after_retry_resources": t.committed_after_retry_resources,
        "committed_after_retry_workload": t.committed_after_retry_workload,
        "aborted": t.aborted, "cancelled": t.cancelled,
        "create_time": time_json(b.create_time.as_ref()), "finish_time": time_json(b.finish_time.as_ref()),
        "completion": b.completion.as_ref().map(|c| serde_json::json!({
            "webhook_url": c.webhook_url,
            "state": pb::CompletionDeliveryState::try_from(c.state)
                .map(|s| s.as_str_name().trim_start_matches("COMPLETION_DELIVERY_STATE_")).unwrap_or("?"),
            "attempts": c.attempts, "acknowledgments": c.acknowledgments, "last_error": c.last_error,
            "last_attempt_time": time_json(c.last_attempt_time.as_ref()),
            "delivered_time": time_json(c.delivered_time.as_ref()),
        })),
    })
}

fn summary(b: &pb::Batch) -> String {
    let t = b.totals.unwrap_or_default();
    format!(
        "batch {}: {} of {} committed in {} — committed {}, after resource retry {}, \
         after workload retry {}, aborted {}, cancelled {}",
        b.batch_id,
        t.records_committed,
        count(t.records, "record", "records"),
        count(t.chunks, "chunk", "chunks"),
        t.committed,
        t.committed_after_retry_resources,
        t.committed_after_retry_workload,
        t.aborted,
        t.cancelled
    )
}

/// The columns of a batch.
const BATCH_COLUMNS: &[Column] = &[
    col("BATCH", "batch_id"),
    col("OBJECT", "object"),
    col("STATE", "state"),
    col("RECORDS", "records"),
    col("COMMITTED", "records_committed"),
    col("CHUNKS", "chunks"),
    col("ABORTED", "aborted"),
    col("CANCELLED", "cancelled"),
    time("CREATED", "create_time"),
    time("FINISHED", "finish_time"),
];

/// The columns of a chunk's result.
const RESULT_COLUMNS: &[Column] = &[
    col("CHUNK", "chunk"),
    col("FIRST", "first_record"),
    col("RECORDS", "records"),
    col("STATE", "state"),
    col("ATTEMPTS", "attempts"),
    col("CAUSE", "last_cause"),
    shown("ERRORS", "errors", Kind::RecordErrors),
];

/// How a followed batch ended, as the command's result: an error with its exit code when chunks
/// aborted (2) or the batch was cancelled (130).
fn outcome(b: &pb::Batch) -> anyhow::Result<()> {
    let t = b.totals.unwrap_or_default();
    if t.aborted > 0 {
        return Err(fail(
            Exit::BatchAborted,
            format!(
                "batch {id}: {} aborted; `baton batch results {id} --aborted` lists why",
                count(t.aborted, "chunk", "chunks"),
                id = b.batch_id
            ),
        ));
    }
    if b.state == pb::BatchState::Cancelled as i32 {
        return Err(fail(
            Exit::Cancelled,
            format!("batch {} was cancelled: {} never ran", b.batch_id, count(t.cancelled, "chunk", "chunks")),
        ));
    }
    Ok(())
}

fn bar(len: u64, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template(&format!("{{msg:>9}} [{{bar:40}}] {{pos}}/{{len}} {unit} ({{elapsed}})"))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar
}

/// Follows a batch with a progress bar of chunks with an outcome; returns it when done.
async fn watch(conn: &OrgConn, id: &str) -> anyhow::Result<pb::Batch> {
    let mut client = pb::scheduler_client::SchedulerClient::new(channel(&conn.conn).await?);
    let mut stream = client
        .watch_batch(with_bearer(pb::WatchBatchRequest { batch_id: id.to_owned() }, &conn.api_key)?)
        .await
        .map_err(explain)?
        .into_inner();
    let mut progress: Option<ProgressBar> = None;
    let mut last = None;
    while let Some(event) = stream.message().await.map_err(explain)? {
        let Some(batch) = event.batch else { continue };
        let t = batch.totals.unwrap_or_default();
        let bar = progress.get_or_insert_with(|| bar(u64::from(t.chunks), "chunks"));
        bar.set_message("chunks");
        bar.set_position(u64::from(t.chunks - t.pending - t.in_flight));
        last = Some(batch);
    }
    if let Some(bar) = progress {
        bar.finish();
    }
    last.context("the watch ended without news of the batch")
}

/// The scheduler's client.
type SchedulerClient = pb::scheduler_client::SchedulerClient<tonic::transport::Channel>;

/// Runs a batch subcommand.
pub async fn run(args: BatchArgs, output: Output) -> anyhow::Result<()> {
    let conn = args.conn;
    let mut client = pb::scheduler_client::SchedulerClient::new(channel(&conn.conn).await?);
    match args.command {
        BatchCommand::Submit {
            file,
            object,
            op,
            chunk_size,
            not_before,
            max_parallel,
            records_per_second,
            request_id,
            webhook,
            no_wait,
        } => {
            let records = read_records(&file)?;
            if records.is_empty() {
                return Err(fail(Exit::InvalidArgument, format!("{}: no records", file.display())));
            }
            let not_before_time = not_before.and_then(|d| {
                let at = std::time::SystemTime::now().checked_add(d)?;
                baton_mesh::proto::timestamp(at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as i64)
            });
            let header = pb::BatchHeader {
                object,
                operation: batch_operation(op) as i32,
                chunk_size,
                policy: Some(pb::ReleasePolicy {
                    not_before_time,
                    max_parallel_chunks: max_parallel,
                    records_per_second,
                }),
                request_id,
                completion: webhook
                    .map(|url| pb::CompletionTarget { target: Some(pb::completion_target::Target::WebhookUrl(url)) }),
            };
            submit(&conn, header, &records, no_wait).await?;
        }
        BatchCommand::Watch { id } => {
            let batch = watch(&conn, &id).await?;
            eprintln!("{}", summary(&batch));
            outcome(&batch)?;
        }
        BatchCommand::Get { id } => {
            let batch = client
                .get_batch(with_bearer(pb::GetBatchRequest { batch_id: id }, &conn.api_key)?)
                .await
                .map_err(explain)?;
            let mut printer = Printer::new(output, BATCH_COLUMNS);
            printer.print(&batch_json(batch.get_ref()))?;
            printer.finish()?;
        }
        BatchCommand::List { page } => list(&mut client, &conn, page, output).await?,
        BatchCommand::Results { id, aborted } => results(&mut client, &conn, id, aborted, output).await?,
        BatchCommand::Cancel { id } => {
            let batch = client
                .cancel_batch(with_bearer(pb::CancelBatchRequest { batch_id: id }, &conn.api_key)?)
                .await
                .map_err(explain)?;
            let mut printer = Printer::new(output, BATCH_COLUMNS);
            printer.print(&batch_json(batch.get_ref()))?;
            printer.finish()?;
        }
    }
    Ok(())
}

/// `--op` on the wire.
fn batch_operation(op: Operation) -> pb::BatchOperation {
    match op {
        Operation::Upsert => pb::BatchOperation::Upsert,
        Operation::Insert => pb::BatchOperation::Insert,
        Operation::Update => pb::BatchOperation::Update,
        Operation::Delete => pb::BatchOperation::Delete,
    }
}

/// Submits `records` as a batch with a progress bar of the upload, prints the batch id on
/// stdout, then (unless `no_wait`) follows the batch and ends with its summary and outcome.
async fn submit(conn: &OrgConn, header: pb::BatchHeader, records: &[Fields], no_wait: bool) -> anyhow::Result<()> {
    let upload = bar(records.len() as u64, "records");
    upload.set_message("upload");
    let shown = upload.clone();
    let records = records_to_pb(records)?;
    let staged =
        baton_scheduler::client::submit_batch(channel(&conn.conn).await?, &conn.api_key, header, records, move |n| {
            shown.set_position(n as u64)
        })
        .await
        .map_err(explain)?;
    upload.finish();
    eprintln!(
        "batch {} staged: {} in {}{}",
        staged.batch_id,
        count(staged.records, "record", "records"),
        count(staged.chunks, "chunk", "chunks"),
        if staged.duplicate { " (submitted before with this request id)" } else { "" }
    );
    println!("{}", staged.batch_id);
    if !no_wait {
        let batch = watch(conn, &staged.batch_id).await?;
        eprintln!("{}", summary(&batch));
        outcome(&batch)?;
    }
    Ok(())
}

/// Prints the org's batches, page by page as `page` asks.
async fn list(client: &mut SchedulerClient, conn: &OrgConn, page: PageArgs, output: Output) -> anyhow::Result<()> {
    let mut printer = Printer::new(output, BATCH_COLUMNS);
    let (mut page_token, mut listed) = (page.page_token.clone(), 0);
    loop {
        let request = pb::ListBatchesRequest { page_size: page.page_size, page_token };
        let batches = client.list_batches(with_bearer(request, &conn.api_key)?).await.map_err(explain)?.into_inner();
        for b in &batches.batches {
            printer.print(&batch_json(b))?;
        }
        listed += batches.batches.len();
        if !page.go_on(&batches.next_page_token, listed, ("batch", "batches")) {
            break;
        }
        page_token = batches.next_page_token;
    }
    printer.finish()
}

/// Prints every chunk's outcome (only the aborted ones with `aborted`), every page.
async fn results(
    client: &mut SchedulerClient,
    conn: &OrgConn,
    id: String,
    aborted: bool,
    output: Output,
) -> anyhow::Result<()> {
    let mut printer = Printer::new(output, RESULT_COLUMNS);
    let mut page_token = String::new();
    loop {
        let request =
            pb::ListChunkResultsRequest { batch_id: id.clone(), aborted_only: aborted, page_token, page_size: 1000 };
        let page = client.list_chunk_results(with_bearer(request, &conn.api_key)?).await.map_err(explain)?.into_inner();
        for r in &page.results {
            printer.print(&chunk_result_json(r))?;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    printer.finish()
}

/// A chunk's outcome as JSON, with its record errors and the parts of a split chunk.
fn chunk_result_json(r: &pb::ChunkResult) -> Value {
    let c = r.chunk.clone().unwrap_or_default();
    serde_json::json!({
        "chunk": c.index, "first_record": c.first_record, "records": c.records,
        "state": state_name(c.state), "attempts": c.attempts, "worker": c.worker,
        "last_cause": c.last_cause, "errors": r.errors.iter().map(|e| serde_json::json!({
            "index": e.index, "field": e.field, "reason": e.reason})).collect::<Vec<_>>(),
        // a chunk split after a resource limit: which records committed
        "records_committed": c.records_committed,
        "parts": c.parts.iter().map(|p| serde_json::json!({
            "first_record": p.first_record, "records": p.records,
            "state": pb::ChunkPartState::try_from(p.state)
                .map_or("?", |s| s.as_str_name().trim_start_matches("CHUNK_PART_STATE_")),
            "cause": p.cause})).collect::<Vec<_>>(),
    })
}
