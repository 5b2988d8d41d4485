//! `baton export`: an export to a file. The first portion is written at once; then the parts are
//! downloaded in parallel as the workers produce them, with a progress bar, and the file is
//! assembled in id order (NDJSON, or CSV by the file's `.csv` extension or `--format`).
//!
//! Downloads survive interruption: everything received is kept under `FILE.parts/` (the token,
//! the first portion, each part once complete), and `baton export --token TOKEN --out FILE`
//! fetches only the parts still missing, producing the same file.

use std::collections::{BTreeSet, HashSet};
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use baton_api::convert;
use baton_mesh::proto::v1 as pb;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::Semaphore;

use crate::client::{OptionalOrgConn, OrgConn, PageArgs, channel, count, explain, time_json, with_bearer};
use crate::exit::{Exit, fail};
use crate::output::{Column, Output, Printer, col, time};

/// How often the export's progress is looked at.
const POLL: Duration = Duration::from_millis(200);

/// The output format.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// One JSON object per line: `{"id", "version", "update_time", "fields"}`.
    Ndjson,
    /// A header (`id` then every field name, sorted) and a row per record.
    Csv,
}

/// `baton export`: an export to a file, or `baton export list`.
#[derive(clap::Args, Debug)]
#[command(subcommand_negates_reqs = true)]
pub struct ExportArgs {
    #[command(flatten)]
    conn: OptionalOrgConn,
    #[command(subcommand)]
    command: Option<ExportCommand>,
    /// The object to export (not needed with `--token`). An object named `list` goes after `--`:
    /// `baton export --out FILE -- list`.
    #[arg(required_unless_present = "token")]
    object: Option<String>,
    /// The filter, for example `amount > 10 AND status IN ('open', 'late')`.
    #[arg(long, default_value = "")]
    filter: String,
    /// Fields to export (comma-separated); all by default.
    #[arg(long, value_delimiter = ',')]
    fields: Vec<String>,
    /// The file to write.
    #[arg(long, required = true)]
    out: Option<PathBuf>,
    /// The format; by default CSV for a `.csv` file, NDJSON otherwise.
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// Rows answered at once (0: the server's default, 1,000).
    #[arg(long, default_value_t = 0)]
    sync_rows: u32,
    /// Rows per part (0: the server's default, 50,000).
    #[arg(long, default_value_t = 0)]
    part_rows: u32,
    /// Parts downloaded at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    parallel: u32,
    /// Resume the download of this export (its first portion is under `OUT.parts/`).
    #[arg(long)]
    token: Option<String>,
    /// An id for idempotent retry of the Export request.
    #[arg(long, default_value = "")]
    request_id: String,
    /// Where the export's completion is POSTed when it finishes, if it goes asynchronous (an
    /// http or https URL; see the README's "Completion webhooks").
    #[arg(long)]
    webhook: Option<String>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// The export subcommands.
#[derive(clap::Subcommand, Debug)]
enum ExportCommand {
    /// Lists the org's exports whose retention is not over, newest first, with their progress
    /// (not their tokens: only Export answers a token, and `baton export` keeps it under
    /// `FILE.parts/` until the file is written).
    List {
        #[command(flatten)]
        page: PageArgs,
    },
}

/// The columns of an export.
const EXPORT_COLUMNS: &[Column] = &[
    col("EXPORT", "export_id"),
    col("OBJECT", "object"),
    col("STATE", "state"),
    col("ROWS", "estimated_total"),
    col("PARTS", "parts_total"),
    col("READY", "parts_ready"),
    time("CREATED", "create_time"),
    time("EXPIRES", "expire_time"),
    col("ERROR", "error"),
];

/// An export's progress as JSON (without its parts).
fn export_json(e: &pb::ExportStatus) -> serde_json::Value {
    let name = |s: &str, prefix: &str| s.trim_start_matches(prefix).to_owned();
    serde_json::json!({
        "export_id": e.export_id, "object": e.object,
        "state": pb::ExportState::try_from(e.state).map_or("?".to_owned(), |s| name(s.as_str_name(), "EXPORT_STATE_")),
        "reason": pb::ExportReason::try_from(e.reason).map_or("?".to_owned(), |r| name(r.as_str_name(), "EXPORT_REASON_")),
        "first_rows": e.first_rows, "parts_total": e.parts_total, "parts_ready": e.parts_ready,
        "rows_ready": e.rows_ready, "estimated_total": e.estimated_total, "total_known": e.total_known,
        "as_of_seq": e.as_of_seq, "create_time": time_json(e.create_time.as_ref()),
        "expire_time": time_json(e.expire_time.as_ref()), "finish_time": time_json(e.finish_time.as_ref()),
        "error": e.error,
    })
}

/// `baton export list`.
async fn list(conn: &OrgConn, page: PageArgs, output: Output) -> anyhow::Result<()> {
    let mut client = pb::intake_client::IntakeClient::new(channel(&conn.conn).await?);
    let mut printer = Printer::new(output, EXPORT_COLUMNS);
    let (mut page_token, mut listed) = (page.page_token.clone(), 0);
    loop {
        let request = pb::ListExportsRequest { page_size: page.page_size, page_token };
        let exports = client.list_exports(with_bearer(request, &conn.api_key)?).await.map_err(explain)?.into_inner();
        for e in &exports.exports {
            printer.print(&export_json(e))?;
        }
        listed += exports.exports.len();
        if !page.go_on(&exports.next_page_token, listed, ("export", "exports")) {
            break;
        }
        page_token = exports.next_page_token;
    }
    printer.finish()
}

fn parts_dir(out: &Path) -> PathBuf {
    let mut name = out.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".parts");
    out.with_file_name(name)
}

/// The first portion's rows, kept beside the parts until the file is put together.
fn first_file(dir: &Path) -> PathBuf {
    dir.join("first.ndjson")
}

fn part_file(dir: &Path, number: u32) -> PathBuf {
    dir.join(format!("part-{number:06}.ndjson"))
}

/// Writes NDJSON `lines` to `path`, through a temporary file renamed at the end (a part file is
/// either complete or absent).
fn write_part(path: &Path, lines: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut out = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    out.write_all(lines)?;
    out.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Records as NDJSON lines: `id`, `version`, `update_time`, `fields`, in that order, with the
/// fields as [`convert::pb_fields_to_json`] writes them (integers exact, decimals as strings).
fn ndjson_lines(records: &[pb::Record]) -> anyhow::Result<Vec<u8>> {
    #[derive(serde::Serialize)]
    struct Line<'a> {
        id: &'a str,
        version: i64,
        update_time: serde_json::Value,
        fields: serde_json::Map<String, serde_json::Value>,
    }
    let mut out = Vec::new();
    for r in records {
        let fields = convert::pb_fields_to_json(&r.fields);
        serde_json::to_writer(
            &mut out,
            &Line {
                id: &r.id,
                version: r.version,
                update_time: crate::client::time_json(r.update_time.as_ref()),
                fields,
            },
        )?;
        out.push(b'\n');
    }
    Ok(out)
}

/// The intake's client, for exports.
type IntakeClient = pb::intake_client::IntakeClient<tonic::transport::Channel>;

/// Runs `baton export`.
pub async fn run(args: ExportArgs, output: Output) -> anyhow::Result<()> {
    let conn = args.conn.org()?;
    if let Some(ExportCommand::List { page }) = args.command {
        return list(&conn, page, output).await;
    }
    let out = args.out.clone().ok_or_else(|| fail(Exit::Usage, "--out FILE is required"))?;
    let format =
        args.format.unwrap_or(if out.extension().is_some_and(|e| e == "csv") { Format::Csv } else { Format::Ndjson });
    let dir = parts_dir(&out);
    let key = conn.api_key.as_str();
    let mut client =
        pb::intake_client::IntakeClient::new(channel(&conn.conn).await?).max_decoding_message_size(64 * 1024 * 1024);
    let token = match &args.token {
        Some(token) => resumed_token(token, &dir, &out)?,
        None => match start_export(&mut client, key, &args, &out, format, &dir).await? {
            Some(token) => token,
            None => return Ok(()),
        },
    };
    let status = download(&mut client, key, &token, &dir, args.parallel, args.quiet).await?;
    let mut sources = vec![first_file(&dir)];
    sources.extend((0..status.parts_total).map(|n| part_file(&dir, n)));
    assemble(&out, format, &sources)?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    eprintln!(
        "wrote {} ({}: {} at once, {} in {}; as of seq {})",
        out.display(),
        count((status.first_rows + status.rows_ready) as u64, "row", "rows"),
        status.first_rows,
        status.rows_ready,
        count(status.parts_total, "part", "parts"),
        status.as_of_seq
    );
    eprintln!("{}", continue_hint(&status.object, status.as_of_seq));
    Ok(())
}

/// The token of an export whose download resumes into `out`: `dir` must hold it and the first
/// portion.
fn resumed_token(token: &str, dir: &Path, out: &Path) -> anyhow::Result<String> {
    let kept = std::fs::read_to_string(dir.join("token")).unwrap_or_default();
    if kept.trim() != token || !first_file(dir).exists() {
        bail!(
            "{} does not hold this export's first portion (it is only ever answered by Export, and \
             kept there by the download that started it); run the export again without --token",
            dir.display()
        );
    }
    eprintln!("resuming the export into {}", out.display());
    Ok(token.to_owned())
}

/// Starts the export: writes `out` when the first portion is all of it (and returns `None`),
/// otherwise keeps the token and the first portion under `dir` and returns the token.
async fn start_export(
    client: &mut IntakeClient,
    key: &str,
    args: &ExportArgs,
    out: &Path,
    format: Format,
    dir: &Path,
) -> anyhow::Result<Option<String>> {
    let object = args.object.clone().unwrap_or_default();
    let request = pb::ExportRequest {
        object,
        filter: args.filter.clone(),
        fields: args.fields.clone(),
        sync_rows: args.sync_rows,
        part_rows: args.part_rows,
        wait: false,
        request_id: args.request_id.clone(),
        completion: args
            .webhook
            .clone()
            .map(|url| pb::CompletionTarget { target: Some(pb::completion_target::Target::WebhookUrl(url)) }),
    };
    let response = client.export(with_bearer(request, key)?).await.map_err(explain)?.into_inner();
    let rows = count(response.records.len() as u64, "row", "rows");
    eprintln!("first portion: {rows}");
    if response.complete {
        write_output(out, format, &ndjson_lines(&response.records)?)?;
        eprintln!("wrote {} ({rows}, complete; as of seq {})", out.display(), response.as_of_seq);
        eprintln!("{}", continue_hint(args.object.as_deref().unwrap_or_default(), response.as_of_seq));
        return Ok(None);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join("token"), format!("{}\n", response.token))?;
    write_part(&first_file(dir), &ndjson_lines(&response.records)?)?;
    eprintln!(
        "export {} continues in parts ({}; {} {} rows); token: {}",
        response.export_id,
        pb::ExportReason::try_from(response.reason).map(|r| r.as_str_name()).unwrap_or("?"),
        // past its probe the estimate is a lower bound; the progress bar learns the total
        if response.estimate_exact { "exactly" } else { "at least" },
        response.estimated_total,
        response.token
    );
    Ok(Some(response.token))
}

/// How to follow the changes after an export's `as_of_seq` (a mirror's hand-off).
fn continue_hint(object: &str, as_of_seq: i64) -> String {
    format!("the changes since: baton sync extract --objects {object} --after-seq {as_of_seq} --follow")
}

/// Downloads every part not yet under `dir`, as they become ready, until the export is complete.
async fn download(
    client: &mut IntakeClient,
    key: &str,
    token: &str,
    dir: &Path,
    parallel: u32,
    quiet: bool,
) -> anyhow::Result<pb::ExportStatus> {
    let bar = parts_bar(quiet)?;
    let slots = Arc::new(Semaphore::new(parallel as usize));
    let mut tasks: tokio::task::JoinSet<anyhow::Result<(u32, i64)>> = tokio::task::JoinSet::new();
    let mut started: HashSet<u32> = HashSet::new();
    let mut done: BTreeSet<u32> = BTreeSet::new();
    loop {
        let status = client
            .get_export(with_bearer(pb::GetExportRequest { token: token.to_owned() }, key)?)
            .await
            .map_err(explain)?
            .into_inner();
        bar.set_length(status.estimated_total.max(0) as u64);
        for part in &status.parts {
            if started.contains(&part.number) {
                continue;
            }
            started.insert(part.number);
            if part_file(dir, part.number).exists() {
                done.insert(part.number);
                bar.inc(part.rows as u64);
                continue;
            }
            let slot = slots.clone().acquire_owned().await?;
            let (client, key, token, path, number) =
                (client.clone(), key.to_owned(), token.to_owned(), part_file(dir, part.number), part.number);
            tasks.spawn(async move {
                let _slot = slot;
                fetch_part(client, key, token, path, number).await
            });
        }
        while let Some(finished) = tasks.try_join_next() {
            let (number, rows) = finished??;
            done.insert(number);
            bar.inc(rows as u64);
        }
        bar.set_message(format!("{}/{}", done.len(), status.parts_total));
        bar.set_position(bar.position().max(status.first_rows as u64));
        let state = pb::ExportState::try_from(status.state).unwrap_or(pb::ExportState::Unspecified);
        match state {
            pb::ExportState::Complete if done.len() as u32 == status.parts_total => {
                bar.finish_and_clear();
                return Ok(status);
            }
            pb::ExportState::Failed | pb::ExportState::Cancelled if tasks.is_empty() => {
                bar.abandon();
                return Err(ended(&status, state, done.len(), dir));
            }
            _ => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            Some(finished) = tasks.join_next(), if !tasks.is_empty() => {
                let (number, rows) = finished??;
                done.insert(number);
                bar.inc(rows as u64);
            }
        }
    }
}

/// The progress bar of the parts' rows (hidden with `quiet`).
fn parts_bar(quiet: bool) -> anyhow::Result<ProgressBar> {
    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(0) };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} parts {msg} [{bar:30}] {human_pos}/{human_len} rows ({per_sec}, {eta})",
        )?
        .progress_chars("=> "),
    );
    Ok(bar)
}

/// Fetches part `number` and writes it to `path`; returns its number and rows.
async fn fetch_part(
    mut client: IntakeClient,
    key: String,
    token: String,
    path: PathBuf,
    number: u32,
) -> anyhow::Result<(u32, i64)> {
    let request = with_bearer(pb::FetchPartRequest { token, part: number }, &key)?;
    let mut stream = client.fetch_part(request).await.map_err(explain)?.into_inner();
    let mut lines = Vec::new();
    let mut rows = 0i64;
    while let Some(frame) = stream.message().await.map_err(explain)? {
        rows += frame.records.len() as i64;
        lines.extend_from_slice(&ndjson_lines(&frame.records)?);
    }
    tokio::task::spawn_blocking(move || write_part(&path, &lines)).await??;
    Ok((number, rows))
}

/// The error of an export that failed or was cancelled (exit 1 or 130), with where the `done`
/// parts are kept.
fn ended(status: &pb::ExportStatus, state: pb::ExportState, done: usize, dir: &Path) -> anyhow::Error {
    let exit = if state == pb::ExportState::Cancelled { Exit::Cancelled } else { Exit::Failure };
    fail(
        exit,
        format!(
            "export {} is {}{}; {} of its parts are kept under {}",
            status.export_id,
            state.as_str_name().trim_start_matches("EXPORT_STATE_").to_lowercase(),
            if status.error.is_empty() { String::new() } else { format!(": {}", status.error) },
            done,
            dir.display()
        ),
    )
}

/// Writes the NDJSON lines of one response as the output.
fn write_output(out: &Path, format: Format, lines: &[u8]) -> anyhow::Result<()> {
    let part = out.with_extension("first");
    write_part(&part, lines)?;
    let assembled = assemble(out, format, std::slice::from_ref(&part));
    std::fs::remove_file(&part)?;
    assembled
}

/// Assembles the output from NDJSON part files, in order, through a temporary file.
fn assemble(out: &Path, format: Format, sources: &[PathBuf]) -> anyhow::Result<()> {
    let tmp = out.with_extension("assembling");
    let file = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut writer = BufWriter::new(file);
    match format {
        Format::Ndjson => {
            for source in sources {
                let mut input =
                    std::fs::File::open(source).with_context(|| format!("cannot read {}", source.display()))?;
                std::io::copy(&mut input, &mut writer)?;
            }
        }
        Format::Csv => {
            // the columns: every field name any record has, sorted (a first pass)
            let mut names = BTreeSet::new();
            for_each_record(sources, |record| {
                if let Some(fields) = record.get("fields").and_then(|f| f.as_object()) {
                    names.extend(fields.keys().cloned());
                }
                Ok(())
            })?;
            let mut csv = csv::Writer::from_writer(&mut writer);
            csv.write_record(std::iter::once("id".to_owned()).chain(names.iter().cloned()))?;
            for_each_record(sources, |record| {
                let fields = record.get("fields").and_then(|f| f.as_object());
                let mut row = vec![record.get("id").and_then(|v| v.as_str()).unwrap_or_default().to_owned()];
                for name in &names {
                    row.push(match fields.and_then(|f| f.get(name)) {
                        None | Some(serde_json::Value::Null) => String::new(),
                        Some(serde_json::Value::String(s)) => s.clone(),
                        Some(other) => other.to_string(),
                    });
                }
                csv.write_record(&row)?;
                Ok(())
            })?;
            csv.flush()?;
        }
    }
    writer.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

fn for_each_record(
    sources: &[PathBuf],
    mut each: impl FnMut(serde_json::Value) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    for source in sources {
        let input = std::io::BufReader::new(std::fs::File::open(source)?);
        for line in input.lines() {
            each(serde_json::from_str(&line?)?)?;
        }
    }
    Ok(())
}
