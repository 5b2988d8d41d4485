//! `baton`: runs any baton service (`baton intake`), all of them in one process on embedded
//! defaults (`baton dev`), and is the client CLI (`baton admin …`, `baton upsert …`). The binary
//! is [`main`]; [`dev::start`] runs `baton dev` inside another process (the tests' in-process
//! harness).

mod batch_cli;
mod client;
pub mod dev;
mod exit;
mod export_cli;
mod manager_cli;
pub mod node;
mod output;
mod sync_cli;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use baton_intake::IntakeOptions;
use baton_mesh::config::{ServeOptions, TelemetryOptions, exit_bad_config};
use baton_store::blobs::Blobs;
use baton_store::{Store, StoreOptions};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use exit::Exit;
use output::Output;

/// baton: a gRPC service mesh that hands work off without losing it.
#[derive(Parser, Debug)]
#[command(name = "baton", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    telemetry: TelemetryOptions,

    /// How the client commands print records and statuses: JSON lines, or a table for people
    /// (times as `2026-12-07 12:00:03Z`).
    #[arg(long, short = 'o', env = "BATON_OUTPUT", value_enum, default_value_t = Output::Json, global = true)]
    output: Output,

    #[command(subcommand)]
    command: Command,
}

/// Where the store is.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct StoreArgs {
    /// The store: `sqlite://PATH` (embedded) or `postgres://USER:PASSWORD@HOST:PORT/DB`.
    #[arg(long = "store", env = "BATON_STORE")]
    url: String,

    /// Connections in the store's pool.
    #[arg(long, env = "BATON_STORE_CONNECTIONS", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    store_connections: u32,

    /// How long a WatchBatch or WatchExport stream waits for a commit of its batch or export to
    /// be announced before it reads it anyway. Commits are pushed (an in-process signal, and
    /// LISTEN/NOTIFY on PostgreSQL), so this is only the fallback for what no notification tells
    /// of: a worker in another process writing the same SQLite file, a notification lost with
    /// its connection.
    #[arg(long, env = "BATON_WATCH_POLL", default_value = "1s", value_parser = parse_watch_poll)]
    watch_poll: Duration,

    /// Where export parts are kept: a directory, `file:///DIR`, or `s3://BUCKET/PREFIX` (an
    /// S3-compatible store, configured by the `AWS_*` variables). Intake, scheduler and workers
    /// must share it.
    #[arg(long, env = "BATON_BLOBS", default_value = ".baton-blobs")]
    blobs: String,
}

/// `--watch-poll`: a duration from 1ms to 10m.
pub(crate) fn parse_watch_poll(value: &str) -> Result<Duration, String> {
    let poll = baton_mesh::config::parse_duration(value)?;
    if poll < Duration::from_millis(1) || poll > Duration::from_secs(600) {
        return Err(format!("between 1ms and 10m, got {poll:?}"));
    }
    Ok(poll)
}

impl StoreArgs {
    pub(crate) async fn open(&self) -> anyhow::Result<Store> {
        self.open_with(StoreOptions::new(self.url.clone())).await
    }

    /// Opens the store with `options` (its URL and pool size replaced by these arguments).
    pub(crate) async fn open_with(&self, mut options: StoreOptions) -> anyhow::Result<Store> {
        options.url = self.url.clone();
        options.max_connections = self.store_connections;
        options.watch_poll = self.watch_poll;
        Ok(Store::open(&options).await?)
    }

    /// Opens the blob store (export parts).
    pub(crate) fn open_blobs(&self) -> anyhow::Result<Blobs> {
        Ok(Blobs::open(&self.blobs)?)
    }

    /// A server command's blob store and store (opened with `options`), or exit 64 naming what
    /// cannot be opened.
    async fn open_both_or_exit(&self, options: StoreOptions) -> (Blobs, Store) {
        let blobs = self.open_blobs().unwrap_or_else(|e| exit_bad_config(format!("{e:#}")));
        let store = self.open_with(options).await.unwrap_or_else(|e| exit_bad_config(format!("{e:#}")));
        (blobs, store)
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs the intake service (real-time requests and the admin API).
    Intake {
        #[command(flatten)]
        serve: ServeOptions,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        limits: IntakeOptions,
        /// The admin token the Admin API requires; without it the Admin API is disabled.
        #[arg(long, env = "BATON_ADMIN_TOKEN")]
        admin_token: Option<String>,
    },
    /// Runs the sync service (extraction and links), or talks to one (`baton sync extract`,
    /// `baton sync link …`).
    Sync(sync_cli::SyncArgs),
    /// Runs the session manager (`baton manager serve`), or inspects one (`baton manager status`,
    /// `sessions`, `session ID`).
    Manager(manager_cli::ManagerArgs),
    /// Runs the scheduler: the batch API, and the release of chunks to the workers.
    Scheduler {
        #[command(flatten)]
        serve: ServeOptions,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        scheduler: baton_scheduler::SchedulerOptions,
    },
    /// Runs a worker: a server session of the manager's worker pool that runs batch chunks and
    /// produces export parts.
    Worker {
        #[command(flatten)]
        serve: ServeOptions,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        worker: baton_worker::WorkerOptions,
    },
    /// Exports the records matching a filter to a file: the first rows at once, the rest
    /// downloaded in parts as the workers produce them (resumable with `--token`).
    Export(export_cli::ExportArgs),
    /// Submits, follows, reads and cancels batches.
    Batch(batch_cli::BatchArgs),
    /// Runs the whole mesh in one process on embedded defaults (SQLite under --data-dir).
    Dev(Box<dev::DevArgs>),
    /// Administers orgs, API keys and object schemas (needs the admin token).
    Admin {
        #[command(flatten)]
        conn: client::AdminConn,
        #[command(subcommand)]
        command: client::AdminCommand,
    },
    /// Creates or updates records from NDJSON (one JSON object per line).
    Upsert(client::UpsertArgs),
    /// Reads one record by id.
    Get(client::GetArgs),
    /// Reads the records matching a filter.
    Query(client::QueryArgs),
    /// Deletes records by id.
    Delete(client::DeleteArgs),
    /// Prints the completion script of a shell: `source <(baton completions bash)`, or save it
    /// where the shell looks (`~/.local/share/bash-completion/completions/baton`,
    /// `~/.zfunc/_baton`, `~/.config/fish/completions/baton.fish`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The command line's grammar, with the exit codes after the commands in `--help`.
fn command() -> clap::Command {
    Cli::command().after_help(exit::table())
}

/// The parsed command line. A usage error exits 64 with one line that names what is wrong (every
/// missing argument, for one); `--help` and `--version` print and exit 0; a command given
/// without its subcommand prints its help on stderr and exits 64.
fn parse() -> Cli {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let error = match command().try_get_matches().and_then(|matches| Cli::from_arg_matches(&matches)) {
        Ok(cli) => return cli,
        Err(e) => e,
    };
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => error.exit(),
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = error.print();
            std::process::exit(i32::from(Exit::Usage.code()))
        }
        ErrorKind::MissingRequiredArgument => {
            let missing = match error.get(ContextKind::InvalidArg) {
                Some(ContextValue::Strings(args)) => args.join(", "),
                _ => String::new(),
            };
            exit_bad_config(format!("the following required arguments were not provided: {missing}"))
        }
        ErrorKind::MissingSubcommand => {
            let command = match error.get(ContextKind::InvalidSubcommand) {
                Some(ContextValue::String(name)) => name.clone(),
                _ => "the command".to_owned(),
            };
            let subcommands = match error.get(ContextKind::ValidSubcommand) {
                Some(ContextValue::Strings(names)) => names.join(", "),
                _ => String::new(),
            };
            exit_bad_config(format!("'{command}' requires a subcommand: {subcommands}"))
        }
        _ => {
            let text = error.to_string();
            let line = text.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            exit_bad_config(line)
        }
    }
}

/// The `service.name` of the process's spans: the server it runs, or the CLI.
fn service_name(command: &Command) -> &'static str {
    match command {
        Command::Intake { .. } => "baton-intake",
        Command::Sync(_) => "baton-sync",
        Command::Manager(_) => "baton-manager",
        Command::Scheduler { .. } => "baton-scheduler",
        Command::Worker { .. } => "baton-worker",
        Command::Dev(_) => "baton-dev",
        _ => "baton-cli",
    }
}

/// The `baton` command: parses the command line and runs it; the process's exit code.
pub fn main() -> ExitCode {
    let cli = parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("baton: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // the OTLP exporter's channel is made in the runtime
    let entered = runtime.enter();
    if let Err(e) = baton_mesh::telemetry::init_tracing(&cli.telemetry, service_name(&cli.command)) {
        exit_bad_config(e);
    }
    drop(entered);
    if let Err(e) = baton_manager::setup_failpoints() {
        exit_bad_config(e);
    }
    let result = runtime.block_on(run(cli.command, cli.output));
    baton_mesh::trace::shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // the reader went away (`baton … | head`): what it wanted it has, nothing to say
        Err(e) if closed_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baton: {e:#}");
            ExitCode::from(Exit::of_error(&e).code())
        }
    }
}

/// `baton completions SHELL`: the shell's completion script on stdout.
fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    use std::io::Write;
    // generated into memory first: the generator panics on a write error (a closed pipe)
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command(), "baton", &mut script);
    let mut out = std::io::stdout().lock();
    out.write_all(&script)?;
    out.flush()?;
    Ok(())
}

/// Whether `e` is a write to a pipe whose reader has gone.
fn closed_pipe(e: &anyhow::Error) -> bool {
    let broken = Some(std::io::ErrorKind::BrokenPipe);
    e.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().map(std::io::Error::kind) == broken
            || cause.downcast_ref::<serde_json::Error>().and_then(serde_json::Error::io_error_kind) == broken
    })
}

/// Runs the command: a server until SIGTERM or SIGINT, `baton dev`, or a client command.
async fn run(command: Command, output: Output) -> anyhow::Result<()> {
    match command {
        Command::Intake { serve, store, limits, admin_token } => serve_intake(serve, store, limits, admin_token).await,
        Command::Scheduler { serve, store, scheduler } => serve_scheduler(serve, store, scheduler).await,
        Command::Worker { serve, store, worker } => serve_worker(serve, store, worker).await,
        Command::Batch(args) => batch_cli::run(args, output).await,
        Command::Export(args) => export_cli::run(args, output).await,
        Command::Dev(args) => dev::run(*args).await,
        Command::Manager(args) => manager_cli::run(args, output).await,
        Command::Sync(args) => match args.command {
            sync_cli::SyncCommand::Serve { serve, store, sync } => serve_sync(serve, store, sync).await,
            command => sync_cli::run(args.conn, command, output).await,
        },
        Command::Admin { conn, command } => client::admin(conn, command, output).await,
        Command::Upsert(args) => client::upsert(args, output).await,
        Command::Get(args) => client::get(args, output).await,
        Command::Query(args) => client::query(args, output).await,
        Command::Delete(args) => client::delete(args, output).await,
        Command::Completions { shell } => completions(shell),
    }
}

/// `baton intake`: runs the intake service until SIGTERM or SIGINT.
async fn serve_intake(
    serve: ServeOptions,
    store: StoreArgs,
    limits: IntakeOptions,
    admin_token: Option<String>,
) -> anyhow::Result<()> {
    if let Err(e) = limits.validate() {
        exit_bad_config(e);
    }
    let (blobs, store) = store.open_both_or_exit(StoreOptions::new(String::new())).await;
    let (listener, metrics) = bind_and_announce(&serve).await?;
    let shutdown = baton_mesh::shutdown::on_signals();
    baton_intake::run(serve, limits, store.clone(), blobs, admin_token, listener, metrics, shutdown).await?;
    store.close().await;
    Ok(())
}

/// `baton scheduler`: runs the scheduler (the batch API, completions, the release of chunks)
/// until SIGTERM or SIGINT.
async fn serve_scheduler(
    serve: ServeOptions,
    store: StoreArgs,
    scheduler: baton_scheduler::SchedulerOptions,
) -> anyhow::Result<()> {
    if let Err(e) = scheduler.validate() {
        exit_bad_config(e);
    }
    let (connector, _) = mesh_connector(&scheduler.mesh, &serve.tls);
    let (blobs, store) = store.open_both_or_exit(StoreOptions::new(String::new())).await;
    let (listener, metrics) = bind_and_announce(&serve).await?;
    let node = node::Node::on_signals(serve.shutdown_grace);
    let auth = baton_mesh::auth::AuthConfig {
        admin_token: None,
        keys: Some(baton_api::keys::StoreKeys::of(&store)),
        ..Default::default()
    };
    let server = baton_scheduler::add_services(
        baton_mesh::server::MeshServer::new(serve.clone(), auth),
        &store,
        serve.max_message_bytes(),
    );
    spawn_scheduler(&node, &store, blobs, scheduler, connector);
    node.serve(server, listener, metrics, Some(&store)).await
}

/// Spawns a scheduler's background tasks on `node`: completion webhooks, the completions pool
/// of the manager, and the release of chunks and export parts (`baton scheduler`, `baton dev`).
pub(crate) fn spawn_scheduler(
    node: &node::Node,
    store: &Store,
    blobs: Blobs,
    scheduler: baton_scheduler::SchedulerOptions,
    connector: baton_manager_client::Connector,
) {
    node.spawn(baton_scheduler::completions::run(
        store.clone(),
        scheduler.webhooks.clone(),
        scheduler.id(),
        node.shutdown(),
    ));
    node.spawn(baton_scheduler::awaiting::serve(
        store.clone(),
        connector.clone(),
        scheduler.manager.clone(),
        scheduler.completions_server_id(),
        scheduler.webhooks.webhook_poll,
        node.shutdown(),
    ));
    node.spawn(baton_scheduler::releaser::run(store.clone(), blobs, scheduler, connector, node.shutdown()));
}

/// `baton worker`: runs a worker of the manager's pool until SIGTERM or SIGINT.
async fn serve_worker(
    serve: ServeOptions,
    store: StoreArgs,
    worker: baton_worker::WorkerOptions,
) -> anyhow::Result<()> {
    if let Err(e) = worker.validate() {
        exit_bad_config(e);
    }
    let (connector, _) = mesh_connector(&worker.mesh, &serve.tls);
    // on SQLite, a lock wait ends as busy after the worker's lock timeout
    let mut options = StoreOptions::new(String::new());
    options.busy_timeout = worker.chunks.lock_timeout;
    let (blobs, store) = store.open_both_or_exit(options).await;
    let (listener, metrics) = bind_and_announce(&serve).await?;
    let node = node::Node::on_signals(serve.shutdown_grace);
    // gRPC health and /metrics only: the worker's work comes through the manager
    let server = baton_mesh::server::MeshServer::new(serve, baton_mesh::auth::AuthConfig::default());
    node.spawn(baton_worker::run(worker, connector, store.clone(), blobs, node.shutdown()));
    node.serve(server, listener, metrics, Some(&store)).await
}

/// `baton sync serve`: runs the sync service (the Sync API, the link runners, change-log
/// trimming) until SIGTERM or SIGINT.
async fn serve_sync(serve: ServeOptions, store: StoreArgs, mut sync: baton_sync::SyncOptions) -> anyhow::Result<()> {
    if let Err(e) = sync.validate() {
        exit_bad_config(e);
    }
    sync.tls = serve.tls.client();
    let store = store.open().await.unwrap_or_else(|e| exit_bad_config(format!("{e:#}")));
    let (listener, metrics) = bind_and_announce(&serve).await?;
    let node = node::Node::on_signals(serve.shutdown_grace);
    let auth = baton_mesh::auth::AuthConfig {
        admin_token: None,
        keys: Some(baton_api::keys::StoreKeys::of(&store)),
        ..Default::default()
    };
    let server = baton_mesh::server::MeshServer::new(serve.clone(), auth);
    let max = serve.max_message_bytes();
    let server = baton_sync::add_services(server, &store, &sync, max, node.shutdown(), node.tasks());
    // the link manager ends once its runners have given their leases up
    node.serve(server, listener, metrics, Some(&store)).await
}

/// A connector to the managers whose calls carry `token` (exits 64 on a token that cannot be
/// sent), and the token for a server that requires it.
pub(crate) fn mesh_connector(
    token: &baton_mesh::config::MeshToken,
    tls: &baton_mesh::tls::TlsOptions,
) -> (baton_manager_client::Connector, Option<std::sync::Arc<str>>) {
    let connector = baton_manager_client::Connector::with_tls(token.get(), tls.client())
        .unwrap_or_else(|e| exit_bad_config(format!("--mesh-token: {e}")));
    (connector, token.get().map(Into::into))
}

/// Binds a server's gRPC and `/metrics` listeners and prints where they are.
async fn bind_and_announce(serve: &ServeOptions) -> anyhow::Result<(tokio::net::TcpListener, tokio::net::TcpListener)> {
    baton_mesh::tls::check_or_exit(&serve.tls);
    let listener = baton_mesh::server::bind_or_exit(serve.listen).await;
    let metrics = baton_mesh::server::bind_or_exit(serve.metrics_listen).await;
    print_endpoints(&listener, &metrics)?;
    Ok((listener, metrics))
}

/// Prints where a server listens: `endpoint: ADDR` and `metrics: URL`, the contract with scripts
/// and tests that start servers on port 0. A closed stdout is not an error.
fn print_endpoints(listener: &tokio::net::TcpListener, metrics: &tokio::net::TcpListener) -> anyhow::Result<()> {
    use std::io::Write;
    let text = format!("endpoint: {}\nmetrics: http://{}/metrics\n", listener.local_addr()?, metrics.local_addr()?);
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    Ok(())
}

/// The default data directory of `baton dev`.
fn default_data_dir() -> PathBuf {
    PathBuf::from(".baton-dev")
}
