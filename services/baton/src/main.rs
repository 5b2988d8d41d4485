//! `baton`: runs any baton service (`baton intake`), all of them in one process on embedded
//! defaults (`baton dev`), and is the client CLI (`baton admin …`, `baton upsert …`).

mod batch_cli;
mod client;
mod dev;
mod export_cli;
mod manager_cli;
mod sync_cli;

use std::path::PathBuf;
use std::process::ExitCode;

use baton_intake::IntakeOptions;
use baton_mesh::config::{ServeOptions, TelemetryOptions, exit_bad_config};
use baton_store::blobs::Blobs;
use baton_store::{Store, StoreOptions};
use clap::{Parser, Subcommand};

/// baton: a gRPC service mesh that hands work off without losing it.
#[derive(Parser, Debug)]
#[command(name = "baton", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    telemetry: TelemetryOptions,

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

    /// Where export parts are kept: a directory, `file:///DIR`, or `s3://BUCKET/PREFIX` (an
    /// S3-compatible store, configured by the `AWS_*` variables). Intake, scheduler and workers
    /// must share it.
    #[arg(long, env = "BATON_BLOBS", default_value = ".baton-blobs")]
    blobs: String,
}

impl StoreArgs {
    pub(crate) async fn open(&self) -> anyhow::Result<Store> {
        self.open_with(StoreOptions::new(self.url.clone())).await
    }

    /// Opens the store with `options` (its URL and pool size replaced by these arguments).
    pub(crate) async fn open_with(&self, mut options: StoreOptions) -> anyhow::Result<Store> {
        options.url = self.url.clone();
        options.max_connections = self.store_connections;
        Ok(Store::open(&options).await?)
    }

    /// Opens the blob store (export parts).
    pub(crate) fn open_blobs(&self) -> anyhow::Result<Blobs> {
        Ok(Blobs::open(&self.blobs)?)
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
    Dev(dev::DevArgs),
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
}

fn parse() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp
                    | clap::error::ErrorKind::DisplayVersion
                    | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            e.exit()
        }
        Err(e) => {
            let text = e.to_string();
            let line = text.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            exit_bad_config(line)
        }
    }
}

fn main() -> ExitCode {
    let cli = parse();
    if let Err(e) = baton_mesh::telemetry::init_tracing(&cli.telemetry) {
        exit_bad_config(e);
    }
    if let Err(e) = baton_manager::setup_failpoints() {
        exit_bad_config(e);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("baton: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli.command));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // the reader went away (`baton … | head`): what it wanted it has, nothing to say
        Err(e) if closed_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baton: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether `e` is a write to a pipe whose reader has gone.
fn closed_pipe(e: &anyhow::Error) -> bool {
    let broken = Some(std::io::ErrorKind::BrokenPipe);
    e.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().map(std::io::Error::kind) == broken
            || cause.downcast_ref::<serde_json::Error>().and_then(serde_json::Error::io_error_kind) == broken
    })
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Intake { serve, store, limits, admin_token } => {
            if let Err(e) = limits.validate() {
                exit_bad_config(e);
            }
            let blobs = store.open_blobs().unwrap_or_else(|e| exit_bad_config(format!("{e:#}")));
            let store = store.open().await.unwrap_or_else(|e| exit_bad_config(format!("{e:#}")));
            let (listener, metrics) = bind_and_announce(&serve).await?;
            let shutdown = baton_mesh::shutdown::on_signals();
            baton_intake::run(serve, limits, store.clone(), blobs, admin_token, listener, metrics, shutdown).await?;
            store.close().await;
            Ok(())
        }
        Command::Scheduler { serve, store, scheduler } => {
            if let Err(e) = scheduler.validate() {
                exit_bad_config(e);
            }
            let (connector, _) = mesh_connector(&scheduler.mesh, &serve.tls);
            let blobs = store.open_blobs().unwrap_or_else(|e| exit_bad_config(format!("{e:#}")));
            let store = store.open().await.unwrap_or_else(|e| exit_bad_config(format!("{e:#}")));
            let (listener, metrics) = bind_and_announce(&serve).await?;
            let shutdown = baton_mesh::shutdown::on_signals();
            let auth = baton_mesh::auth::AuthConfig {
                admin_token: None,
                keys: Some(std::sync::Arc::new(store.clone())),
                ..Default::default()
            };
            let server = baton_scheduler::add_services(
                baton_mesh::server::MeshServer::new(serve.clone(), auth),
                &store,
                serve.max_message_bytes(),
            );
            let releaser = tokio::spawn(baton_scheduler::releaser::run(
                store.clone(),
                blobs,
                scheduler,
                connector,
                shutdown.clone(),
            ));
            server.serve(listener, metrics, shutdown).await?;
            let _ = releaser.await;
            store.close().await;
            Ok(())
        }
        Command::Worker { serve, store, worker } => {
            if let Err(e) = worker.validate() {
                exit_bad_config(e);
            }
            let (connector, _) = mesh_connector(&worker.mesh, &serve.tls);
            // on SQLite, a lock wait ends as busy after the worker's lock timeout
            let mut options = StoreOptions::new(String::new());
            options.busy_timeout = worker.chunks.lock_timeout;
            let blobs = store.open_blobs().unwrap_or_else(|e| exit_bad_config(format!("{e:#}")));
            let store = store.open_with(options).await.unwrap_or_else(|e| exit_bad_config(format!("{e:#}")));
            let (listener, metrics) = bind_and_announce(&serve).await?;
            let shutdown = baton_mesh::shutdown::on_signals();
            // gRPC health and /metrics only: the worker's work comes through the manager
            let server = baton_mesh::server::MeshServer::new(serve, baton_mesh::auth::AuthConfig::default());
            let work = tokio::spawn(baton_worker::run(worker, connector, store.clone(), blobs, shutdown.clone()));
            server.serve(listener, metrics, shutdown).await?;
            let _ = work.await;
            store.close().await;
            Ok(())
        }
        Command::Batch(args) => batch_cli::run(args).await,
        Command::Export(args) => export_cli::run(args).await,
        Command::Dev(args) => dev::run(args).await,
        Command::Manager(args) => manager_cli::run(args).await,
        Command::Sync(args) => match args.command {
            sync_cli::SyncCommand::Serve { serve, store, mut sync } => {
                if let Err(e) = sync.validate() {
                    exit_bad_config(e);
                }
                sync.tls = serve.tls.client();
                let store = store.open().await.unwrap_or_else(|e| exit_bad_config(format!("{e:#}")));
                let (listener, metrics) = bind_and_announce(&serve).await?;
                let shutdown = baton_mesh::shutdown::on_signals();
                let auth = baton_mesh::auth::AuthConfig {
                    admin_token: None,
                    keys: Some(std::sync::Arc::new(store.clone())),
                    ..Default::default()
                };
                let server = baton_mesh::server::MeshServer::new(serve.clone(), auth);
                let server =
                    baton_sync::add_services(server, &store, &sync, serve.max_message_bytes(), shutdown.clone());
                server.serve(listener, metrics, shutdown).await?;
                // let the link runners give their leases up
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                store.close().await;
                Ok(())
            }
            command => sync_cli::run(args.conn, command).await,
        },
        Command::Admin { conn, command } => client::admin(conn, command).await,
        Command::Upsert(args) => client::upsert(args).await,
        Command::Get(args) => client::get(args).await,
        Command::Query(args) => client::query(args).await,
        Command::Delete(args) => client::delete(args).await,
    }
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
