//! `baton sync`: runs the sync service, or talks to one (extraction and links).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use baton_mesh::config::{ServeOptions, parse_duration};
use baton_mesh::proto::v1 as pb;
use baton_sync::SyncOptions;

use crate::StoreArgs;
use crate::client::{OptionalOrgConn, channel, duration_json, explain, record_json, time_json, with_bearer};
use crate::output::{Column, Output, Printer, col, time};

/// `baton sync`.
#[derive(clap::Args, Debug)]
pub struct SyncArgs {
    #[command(flatten)]
    pub(crate) conn: OptionalOrgConn,
    #[command(subcommand)]
    pub(crate) command: SyncCommand,
}

/// The sync subcommands.
#[derive(clap::Subcommand, Debug)]
// parsed once at start: the size of the serve options does not matter
#[allow(clippy::large_enum_variant)]
pub enum SyncCommand {
    /// Runs the sync service: the Sync API, the link runners, change-log trimming.
    Serve {
        #[command(flatten)]
        serve: ServeOptions,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        sync: SyncOptions,
    },
    /// Extracts the org to NDJSON: the snapshot, then (with --follow) every change after it.
    Extract {
        /// Objects to extract (comma-separated); all by default.
        #[arg(long, value_delimiter = ',')]
        objects: Vec<String>,
        /// Resume: only the changes after this seq.
        #[arg(long)]
        after_seq: Option<i64>,
        /// Keep streaming changes after the snapshot until interrupted.
        #[arg(long)]
        follow: bool,
        /// Where to write; standard output by default.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Links to other orgs.
    #[command(subcommand)]
    Link(LinkCommand),
}

/// The link subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum LinkCommand {
    /// Creates a link from this org to a target org.
    Create {
        /// The target's gRPC endpoint, `http://host:port`.
        #[arg(long)]
        target: String,
        /// An API key of the target org.
        #[arg(long, env = "BATON_TARGET_API_KEY", hide_env_values = true)]
        target_key: String,
        /// Objects to replicate (comma-separated); all by default.
        #[arg(long, value_delimiter = ',')]
        objects: Vec<String>,
        /// Consecutive successful probes needed to resume after a suspension.
        #[arg(long, default_value_t = 3)]
        threshold: i32,
        /// Time between probes.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        probe_interval: Duration,
        /// Stop the link (FAILED) when the target rejects a change, instead of dead-lettering it.
        #[arg(long)]
        stop_on_reject: bool,
        /// When the link's cursor falls behind the trimmed change log: bootstrap again by itself,
        /// or fail and wait for `resume`; the sync server's `--link-on-trimmed` by default.
        #[arg(long, value_enum)]
        on_trimmed: Option<baton_sync::OnTrimmed>,
        /// For an `https://` target whose certificate another CA signed than the sync server
        /// trusts: a PEM file of that CA's certificates.
        #[arg(long)]
        target_ca: Option<PathBuf>,
    },
    /// Lists this org's links.
    List,
    /// Shows one link.
    Get {
        /// The link id.
        id: String,
    },
    /// Follows a link's state transitions until interrupted.
    Watch {
        /// The link id.
        id: String,
    },
    /// Pauses a link.
    Pause {
        /// The link id.
        id: String,
    },
    /// Resumes a paused or failed link.
    Resume {
        /// The link id.
        id: String,
    },
    /// Deletes a link.
    Delete {
        /// The link id.
        id: String,
    },
    /// Lists a link's state transitions.
    History {
        /// The link id.
        id: String,
    },
    /// Lists the changes the target rejected.
    DeadLetters {
        /// The link id.
        id: String,
    },
}

fn state_name(state: i32) -> &'static str {
    match pb::LinkState::try_from(state) {
        Ok(s) => s.as_str_name().trim_start_matches("LINK_STATE_"),
        Err(_) => "?",
    }
}

fn link_json(link: &pb::Link) -> serde_json::Value {
    serde_json::json!({
        "id": link.id, "state": state_name(link.state), "target": link.target_endpoint, "objects": link.objects,
        "cursor_seq": link.cursor_seq, "lag_seq": link.lag_seq, "lag": duration_json(link.lag.as_ref()),
        "verify_threshold": link.verify_threshold, "consecutive_ok": link.consecutive_ok,
        "dead_letters": link.dead_letters, "last_cause": link.last_cause,
        "on_trimmed": pb::TrimmedPolicy::try_from(link.on_trimmed)
            .map_or("?", |p| p.as_str_name().trim_start_matches("TRIMMED_POLICY_")),
    })
}

/// The columns of a link.
const LINK_COLUMNS: &[Column] = &[
    col("LINK", "id"),
    col("STATE", "state"),
    col("TARGET", "target"),
    col("OBJECTS", "objects"),
    col("CURSOR", "cursor_seq"),
    col("LAG SEQ", "lag_seq"),
    col("LAG", "lag"),
    col("DEAD LETTERS", "dead_letters"),
    col("CAUSE", "last_cause"),
];

/// The columns of a link's state transition.
const EVENT_COLUMNS: &[Column] =
    &[time("TIME", "event_time"), col("FROM", "from"), col("TO", "to"), col("CAUSE", "cause")];

/// The columns of a followed link's state transition.
const WATCH_COLUMNS: &[Column] = &[
    time("TIME", "event_time"),
    col("FROM", "from"),
    col("TO", "to"),
    col("CURSOR", "cursor_seq"),
    col("LAG SEQ", "lag_seq"),
    col("CAUSE", "cause"),
];

/// The columns of a dead letter.
const DEAD_LETTER_COLUMNS: &[Column] = &[
    col("SEQ", "seq"),
    col("OBJECT", "object"),
    col("ID", "id"),
    time("REJECTED", "reject_time"),
    col("REASON", "reason"),
];

/// Prints one link.
fn print_link(link: &pb::Link, output: Output) -> anyhow::Result<()> {
    let mut printer = Printer::new(output, LINK_COLUMNS);
    printer.print(&link_json(link))?;
    printer.finish()
}

fn event_json(e: &pb::LinkEvent) -> serde_json::Value {
    serde_json::json!({"event_time": time_json(e.event_time.as_ref()), "from": state_name(e.from), "to": state_name(e.to), "cause": e.cause})
}

/// The Sync API's client.
type SyncClient = pb::sync_client::SyncClient<tonic::transport::Channel>;

/// Runs a client subcommand.
pub async fn run(conn: OptionalOrgConn, command: SyncCommand, output: Output) -> anyhow::Result<()> {
    let org = conn.org()?;
    let mut client =
        pb::sync_client::SyncClient::new(channel(&org.conn).await?).max_decoding_message_size(64 * 1024 * 1024);
    let key = org.api_key.as_str();
    match command {
        SyncCommand::Serve { .. } => unreachable!("served by main"),
        SyncCommand::Extract { objects, after_seq, follow, out } => {
            let writer: Box<dyn Write> = match &out {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout())),
            };
            let request = pb::ExtractRequest { objects, after_seq, chunk_size: 0 };
            extract(&mut client, key, request, follow, writer).await?;
        }
        SyncCommand::Link(command) => link(&mut client, key, command, output).await?,
    }
    Ok(())
}

/// Extracts to `writer`: the snapshot's records, then the changes after it as they come with
/// `follow`, one JSON object a line; the progress goes to stderr.
async fn extract(
    client: &mut SyncClient,
    key: &str,
    request: pb::ExtractRequest,
    follow: bool,
    mut writer: Box<dyn Write>,
) -> anyhow::Result<()> {
    let after_seq = request.after_seq;
    let mut stream = client.extract(with_bearer(request, key)?).await.map_err(explain)?.into_inner();
    let mut high_water = after_seq.unwrap_or(0);
    let mut last_seq = high_water;
    while let Some(message) = stream.message().await.map_err(explain)? {
        match message.kind {
            Some(pb::extract_response::Kind::HighWater(hw)) => {
                high_water = hw.seq;
                last_seq = hw.seq;
                eprintln!("high-water mark: seq {}", hw.seq);
            }
            Some(pb::extract_response::Kind::Snapshot(chunk)) => {
                for r in &chunk.records {
                    let mut line = record_json(r);
                    line["object"] = chunk.object.clone().into();
                    serde_json::to_writer(&mut writer, &line)?;
                    writeln!(writer)?;
                }
                eprint!(
                    "\rsnapshot: {} rows ({} .. {} of {})   ",
                    chunk.rows_so_far, chunk.from_id, chunk.to_id, chunk.object
                );
            }
            Some(pb::extract_response::Kind::SnapshotDone(done)) => {
                writer.flush()?;
                eprintln!("\rsnapshot done: {} rows; changes follow after seq {high_water}", done.rows);
                if !follow {
                    eprintln!("resume later with: baton sync extract --after-seq {high_water} --follow");
                    break;
                }
            }
            Some(pb::extract_response::Kind::Changes(batch)) => {
                for c in &batch.changes {
                    write_change(&mut writer, c)?;
                    last_seq = c.seq;
                }
                writer.flush()?;
                eprint!("\rchanges through seq {last_seq}   ");
            }
            None => {}
        }
    }
    writer.flush()?;
    Ok(())
}

/// Writes one change as a JSON line: its seq, op, object, record id, version, and the fields of
/// an upsert.
fn write_change(writer: &mut dyn Write, c: &pb::Change) -> anyhow::Result<()> {
    let op = pb::ChangeOp::try_from(c.op).map_or("?", |o| o.as_str_name().trim_start_matches("CHANGE_OP_"));
    let fields = (c.op == pb::ChangeOp::Upsert as i32).then(|| baton_api::convert::pb_fields_to_json(&c.fields));
    let line = serde_json::json!({"seq": c.seq, "op": op, "object": c.object, "id": c.record_id,
                                  "version": c.version, "fields": fields});
    serde_json::to_writer(&mut *writer, &line)?;
    writeln!(writer)?;
    Ok(())
}

/// Runs a link subcommand.
async fn link(client: &mut SyncClient, key: &str, command: LinkCommand, output: Output) -> anyhow::Result<()> {
    match command {
        LinkCommand::Create {
            target,
            target_key,
            objects,
            threshold,
            probe_interval,
            stop_on_reject,
            on_trimmed,
            target_ca,
        } => {
            let target_ca_pem = read_target_ca(target_ca)?;
            let request = pb::CreateLinkRequest {
                target_endpoint: target,
                target_api_key: target_key,
                objects,
                verify_threshold: threshold,
                probe_interval: Some(baton_mesh::proto::duration(probe_interval.as_millis() as u64)),
                on_reject: if stop_on_reject { pb::RejectPolicy::Stop } else { pb::RejectPolicy::DeadLetter } as i32,
                on_trimmed: trimmed_policy(on_trimmed) as i32,
                target_ca_pem,
            };
            let link = client.create_link(with_bearer(request, key)?).await.map_err(explain)?.into_inner();
            print_link(&link, output)?;
        }
        LinkCommand::List => {
            let links =
                client.list_links(with_bearer(pb::ListLinksRequest {}, key)?).await.map_err(explain)?.into_inner();
            let mut printer = Printer::new(output, LINK_COLUMNS);
            for link in &links.links {
                printer.print(&link_json(link))?;
            }
            printer.finish()?;
        }
        LinkCommand::Get { id } => {
            let link = client.get_link(with_bearer(pb::GetLinkRequest { link_id: id }, key)?).await.map_err(explain)?;
            print_link(link.get_ref(), output)?;
        }
        LinkCommand::Watch { id } => watch_link(client, key, id, output).await?,
        LinkCommand::Pause { id } => {
            let link =
                client.pause_link(with_bearer(pb::PauseLinkRequest { link_id: id }, key)?).await.map_err(explain)?;
            print_link(link.get_ref(), output)?;
        }
        LinkCommand::Resume { id } => {
            let link =
                client.resume_link(with_bearer(pb::ResumeLinkRequest { link_id: id }, key)?).await.map_err(explain)?;
            print_link(link.get_ref(), output)?;
        }
        LinkCommand::Delete { id } => {
            client
                .delete_link(with_bearer(pb::DeleteLinkRequest { link_id: id.clone() }, key)?)
                .await
                .map_err(explain)?;
            eprintln!("deleted {id}");
        }
        LinkCommand::History { id } => link_history(client, key, id, output).await?,
        LinkCommand::DeadLetters { id } => dead_letters(client, key, id, output).await?,
    }
    Ok(())
}

/// The PEM text of `--target-ca`, empty without it; a file that cannot be read exits 66.
fn read_target_ca(target_ca: Option<PathBuf>) -> anyhow::Result<String> {
    Ok(match target_ca {
        Some(path) => std::fs::read_to_string(&path).map_err(|e| {
            crate::exit::fail(crate::exit::Exit::NotFound, format!("--target-ca {}: {e}", path.display()))
        })?,
        None => String::new(),
    })
}

/// `--on-trimmed` on the wire: unspecified (the server's default) without it.
fn trimmed_policy(on_trimmed: Option<baton_sync::OnTrimmed>) -> pb::TrimmedPolicy {
    match on_trimmed {
        None => pb::TrimmedPolicy::Unspecified,
        Some(baton_sync::OnTrimmed::Rebootstrap) => pb::TrimmedPolicy::Rebootstrap,
        Some(baton_sync::OnTrimmed::Fail) => pb::TrimmedPolicy::Fail,
    }
}

/// Prints a link's state transitions, with its cursor and lag, as they come.
async fn watch_link(client: &mut SyncClient, key: &str, id: String, output: Output) -> anyhow::Result<()> {
    let mut stream =
        client.watch_link(with_bearer(pb::WatchLinkRequest { link_id: id }, key)?).await.map_err(explain)?.into_inner();
    let mut printer = Printer::streaming(output, WATCH_COLUMNS);
    while let Some(event) = stream.message().await.map_err(explain)? {
        let mut line = event_json(&event);
        if let Some(link) = &event.link {
            line["lag_seq"] = link.lag_seq.into();
            line["cursor_seq"] = link.cursor_seq.into();
        }
        printer.print(&line)?;
    }
    Ok(())
}

/// Prints a link's state transitions, every page.
async fn link_history(client: &mut SyncClient, key: &str, id: String, output: Output) -> anyhow::Result<()> {
    let mut printer = Printer::new(output, EVENT_COLUMNS);
    let mut page_token = String::new();
    loop {
        let request = pb::ListLinkHistoryRequest { link_id: id.clone(), page_size: 0, page_token };
        let page = client.list_link_history(with_bearer(request, key)?).await.map_err(explain)?.into_inner();
        for e in &page.events {
            printer.print(&event_json(e))?;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    printer.finish()
}

/// Prints the changes a link's target rejected, every page.
async fn dead_letters(client: &mut SyncClient, key: &str, id: String, output: Output) -> anyhow::Result<()> {
    let mut printer = Printer::new(output, DEAD_LETTER_COLUMNS);
    let mut page_token = String::new();
    loop {
        let request = pb::ListDeadLettersRequest { link_id: id.clone(), page_size: 0, page_token };
        let page = client.list_dead_letters(with_bearer(request, key)?).await.map_err(explain)?.into_inner();
        for d in &page.dead_letters {
            printer.print(&serde_json::json!({"seq": d.seq, "object": d.object, "id": d.record_id,
                "reason": d.reason, "reject_time": time_json(d.reject_time.as_ref())}))?;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    printer.finish()
}
