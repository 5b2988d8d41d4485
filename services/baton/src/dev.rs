//! `baton dev`: the whole mesh in one process, on embedded defaults: SQLite under the data
//! directory, one gRPC port, an admin token kept in the data directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use baton_intake::IntakeOptions;
use baton_manager_client::Connector;
use baton_mesh::auth::AuthConfig;
use baton_mesh::config::{ServeOptions, exit_bad_config};
use baton_mesh::server::MeshServer;
use baton_store::blobs::Blobs;
use baton_store::{Store, StoreOptions};
use tokio_util::sync::CancellationToken;

use crate::node::Node;

/// The scheduler id of `baton dev` (its sessions are `dev/0`, `dev/1`, …).
pub const DEV_SCHEDULER_ID: &str = "dev";

/// How long the manager of `baton dev` may make no progress before the process steps down (exit
/// 75): with no standby to hand over to, a hung actor gets this rather than a lease.
const HANG_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The options of `baton dev`: every server's, with `/metrics` on a fixed port and a shorter
/// grace.
#[derive(clap::Args, Debug)]
#[command(mut_arg("metrics_listen", |a| a.default_value("127.0.0.1:9400")))]
#[command(mut_arg("shutdown_grace", |a| a.default_value("5s")))]
pub struct DevArgs {
    /// Where the SQLite store and the admin token are kept.
    #[arg(long, env = "BATON_DATA_DIR", default_value_os_t = super::default_data_dir())]
    data_dir: PathBuf,

    /// The store; by default a SQLite file under the data directory. A PostgreSQL URL runs the
    /// same single-process mesh on PostgreSQL.
    #[arg(long = "store", env = "BATON_STORE")]
    store: Option<String>,

    /// Where export parts are kept; by default a directory under the data directory. An
    /// `s3://BUCKET/PREFIX` URL uses an S3-compatible store (the `AWS_*` variables configure it).
    #[arg(long = "blobs", env = "BATON_BLOBS")]
    blobs: Option<String>,

    #[command(flatten)]
    serve: ServeOptions,

    /// How long a WatchBatch or WatchExport stream waits for a commit of its batch or export to
    /// be announced before it reads it anyway (see `baton intake --help`).
    #[arg(long, env = "BATON_WATCH_POLL", default_value = "1s", value_parser = super::parse_watch_poll)]
    watch_poll: std::time::Duration,

    /// The admin token; by default one is made up on first start and kept in the data directory.
    /// (Its variable is not BATON_ADMIN_TOKEN, the CLI's: a shell set up to talk to one
    /// `baton dev` must not hand its token to a second one started from it.)
    #[arg(long, env = "BATON_DEV_ADMIN_TOKEN")]
    admin_token: Option<String>,

    /// The mesh token the manager requires (the scheduler and workers of `baton dev` send it).
    #[command(flatten)]
    mesh: baton_mesh::config::MeshToken,

    #[command(flatten)]
    limits: IntakeOptions,

    #[command(flatten)]
    sync: baton_sync::SyncOptions,

    #[command(flatten)]
    release: baton_scheduler::ReleaseOptions,

    #[command(flatten)]
    webhooks: baton_scheduler::completions::WebhookOptions,

    /// Workers run in this process (0: none; `baton worker` processes may serve instead).
    #[arg(long, env = "BATON_DEV_WORKERS", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(0..=64))]
    workers: u32,

    #[command(flatten)]
    chunks: baton_worker::ChunkOptions,
}

fn admin_token(args: &DevArgs) -> anyhow::Result<String> {
    if let Some(token) = &args.admin_token {
        return Ok(token.clone());
    }
    let path = args.data_dir.join("admin-token");
    if let Ok(token) = std::fs::read_to_string(&path) {
        let token = token.trim().to_owned();
        if !token.is_empty() {
            return Ok(token);
        }
    }
    let token = format!("adm_{}", hex::encode(rand::random::<[u8; 16]>()));
    std::fs::write(&path, format!("{token}\n")).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(token)
}

/// Runs the mesh until SIGTERM or SIGINT.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let node = Node::on_signals(args.serve.shutdown_grace);
    compose(args, node).await?.serve().await
}

/// A `baton dev` started in this process by [`start`]: where it listens, and the task that serves
/// until its shutdown token is cancelled (then drains, joins its tasks within the grace and
/// closes the store).
pub struct Started {
    /// The gRPC address.
    pub addr: SocketAddr,
    /// The `/metrics` address.
    pub metrics: SocketAddr,
    /// The node, serving.
    pub served: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Starts `baton dev` with `args` in this process, stopped by `shutdown` rather than by signals:
/// the in-process harness of the end-to-end tests. Bad options exit the process (64), as the
/// command does.
pub async fn start(args: DevArgs, shutdown: CancellationToken) -> anyhow::Result<Started> {
    let node = Node::with_shutdown(shutdown, args.serve.shutdown_grace);
    let composed = compose(args, node).await?;
    let (addr, metrics) = (composed.addr, composed.metrics_addr);
    Ok(Started { addr, metrics, served: tokio::spawn(composed.serve()) })
}

/// [`DevArgs`] from `baton dev`'s flags (without the command's name), defaults and `BATON_*`
/// variables as the command takes them.
pub fn parse_args<I, T>(flags: I) -> Result<DevArgs, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    #[derive(clap::Parser)]
    struct Dev {
        #[command(flatten)]
        args: DevArgs,
    }
    use clap::Parser;
    let name = std::iter::once(std::ffi::OsString::from("baton-dev"));
    Ok(Dev::try_parse_from(name.chain(flags.into_iter().map(Into::into)))?.args)
}

/// The mesh composed and bound, not yet serving.
struct Composed {
    node: Node,
    server: MeshServer,
    listener: tokio::net::TcpListener,
    metrics: tokio::net::TcpListener,
    store: Store,
    addr: SocketAddr,
    metrics_addr: SocketAddr,
}

impl Composed {
    /// Serves until the node's shutdown.
    async fn serve(self) -> anyhow::Result<()> {
        self.node.serve(self.server, self.listener, self.metrics, Some(&self.store)).await
    }
}

/// Opens the store and the blobs, binds the listeners, prints the banner and composes every
/// service and task on `node`.
async fn compose(args: DevArgs, node: Node) -> anyhow::Result<Composed> {
    validate(&args);
    if let Err(e) = std::fs::create_dir_all(&args.data_dir) {
        exit_bad_config(format!("cannot create data dir {}: {e}", args.data_dir.display()));
    }
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let token = admin_token(&args)?;
    let url = args.store.clone().unwrap_or_else(|| format!("sqlite://{}/baton.db", data_dir.display()));
    let mut store_options = StoreOptions::new(url.clone());
    // on SQLite, a chunk's lock wait ends as busy after the workers' lock timeout
    store_options.busy_timeout = args.chunks.lock_timeout;
    store_options.watch_poll = args.watch_poll;
    let store = Store::open(&store_options).await.unwrap_or_else(|e| exit_bad_config(e));
    let blobs_at = args.blobs.clone().unwrap_or_else(|| data_dir.join("blobs").display().to_string());
    let blobs = baton_store::blobs::Blobs::open(&blobs_at).unwrap_or_else(|e| exit_bad_config(e));
    let serve = args.serve.clone();
    baton_mesh::tls::check_or_exit(&serve.tls);
    if serve.tls.serves_tls() && serve.tls.client().ca.is_none() {
        exit_bad_config(
            "--tls-cert: give --tls-ca (or --tls-client-ca), the CA the scheduler and workers of baton dev trust \
             when they call its manager over https",
        );
    }
    let scheme = serve.tls.scheme();
    let listener = baton_mesh::server::bind_or_exit(serve.listen).await;
    let metrics = baton_mesh::server::bind_or_exit(serve.metrics_listen).await;
    let shown = if url.starts_with("sqlite:") { url.clone() } else { "postgres (from --store)".to_owned() };
    let addr = listener.local_addr()?;
    let metrics_addr = metrics.local_addr()?;
    print_banner(&serve, addr, metrics_addr, &shown, &blobs_at, &token);
    // the scheduler and workers below send the mesh token to the manager of this same process
    let (connector, mesh_token) = crate::mesh_connector(&args.mesh, &serve.tls);
    let auth =
        AuthConfig { admin_token: Some(token.into()), keys: Some(baton_api::keys::StoreKeys::of(&store)), mesh_token };
    let server = MeshServer::new(serve.clone(), auth);
    let server = add_services(server, &args, &serve, &store, &blobs, &data_dir, &node)?;
    let me = format!("{scheme}://{addr}");
    spawn_batch_tasks(&args, &node, &store, &blobs, &connector, me);
    Ok(Composed { node, server, listener, metrics, store, addr, metrics_addr })
}

/// Checks the options of every service; a bad one exits 64.
fn validate(args: &DevArgs) {
    let checked = args.limits.validate().and_then(|()| args.sync.validate());
    let checked = checked.and_then(|()| args.webhooks.validate());
    if let Err(e) = checked.and_then(|()| args.release.validate()).and_then(|()| args.chunks.validate()) {
        exit_bad_config(e);
    }
}

/// Prints where the mesh is and how to try it, with grpcurl's and the CLI's TLS settings.
fn print_banner(
    serve: &ServeOptions,
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    shown: &str,
    blobs_at: &str,
    token: &str,
) {
    let scheme = serve.tls.scheme();
    // grpcurl's TLS flags: the CA, and the client certificate when one is required
    // (and the CLI's variables), with placeholders for the files
    let (grpcurl, cli_tls) = match (&serve.tls.tls_client_ca, serve.tls.serves_tls()) {
        (_, false) => ("-plaintext", ""),
        (None, true) => ("-cacert CA.pem", " BATON_TLS_CA=CA.pem"),
        (Some(_), true) => (
            "-cacert CA.pem -cert CLIENT.pem -key CLIENT.key",
            " BATON_TLS_CA=CA.pem BATON_TLS_CLIENT_CERT=CLIENT.pem BATON_TLS_CLIENT_KEY=CLIENT.key",
        ),
    };
    // Printed in one write, and a closed stdout is not an error: the mesh goes on running.
    let banner = format!(
        "baton dev is running\n\
         \x20 endpoint:    {addr}\n\
         \x20 metrics:     http://{metrics_addr}/metrics\n\
         \x20 store:       {shown}\n\
         \x20 blobs:       {blobs_at}\n\
         \x20 admin token: {token}\n\
         \n\
         try it:\n\
         \x20 export BATON_ENDPOINT={scheme}://{addr} BATON_ADMIN_TOKEN={token}{cli_tls}\n\
         \x20 baton admin org create acme                      # prints the org id\n\
         \x20 baton admin key create --org ORG_ID              # prints an API key\n\
         \x20 grpcurl {grpcurl} {addr} list\n\
         \x20 grpcurl {grpcurl} -H 'authorization: Bearer {token}' -d '{{\"name\": \"acme\"}}' {addr} baton.v1.Admin/CreateOrg\n\
         (see README.md for the rest; Ctrl-C stops)\n"
    );
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(banner.as_bytes()).and_then(|()| out.flush());
    }
}

/// Adds every service to `server`: intake, sync, the one session manager (started here, under
/// the data directory) and the scheduler's API.
fn add_services(
    server: MeshServer,
    args: &DevArgs,
    serve: &ServeOptions,
    store: &Store,
    blobs: &Blobs,
    data_dir: &Path,
    node: &Node,
) -> anyhow::Result<MeshServer> {
    let shutdown = node.shutdown();
    let server = baton_intake::add_services(server, store, blobs, &args.limits, serve);
    let sync = baton_sync::SyncOptions { tls: serve.tls.client(), ..args.sync.clone() };
    let server =
        baton_sync::add_services(server, store, &sync, serve.max_message_bytes(), shutdown.clone(), node.tasks());
    // one manager, without etcd or a standby, journaling under the data directory
    let manager_options = baton_manager::ManagerOptions::single(data_dir.join("manager"));
    let manager = baton_manager::ManagerService::start(manager_options, shutdown.clone())
        .map_err(|e| anyhow::anyhow!("cannot start the session manager: {e}"))?;
    // a manager that cannot write its journal or stops answering takes the process down (exit
    // 75, health NOT_SERVING first) rather than leave every batch stuck behind a dead actor; with
    // no standby to hand over to, a hung actor gets 10 s rather than a lease
    node.spawn(baton_manager::failover::step_down_on_fault(
        manager.clone(),
        None,
        server.health(),
        "baton.v1.SessionManager",
        HANG_LIMIT,
        shutdown.clone(),
    ));
    let server = server.add_service(baton_mesh::proto::v1::session_manager_server::SessionManagerServer::new(manager));
    // the scheduler and the workers reach the manager through this process's own port
    Ok(baton_scheduler::add_services(server, store, serve.max_message_bytes()))
}

/// Spawns the scheduler's tasks (the release of chunks, completions) and the in-process workers,
/// all reaching the manager at `me`.
fn spawn_batch_tasks(args: &DevArgs, node: &Node, store: &Store, blobs: &Blobs, connector: &Connector, me: String) {
    let shutdown = node.shutdown();
    // a fixed scheduler id: a restarted `baton dev` resumes its sessions (the manager and store
    // under the data directory are its own)
    let scheduler = baton_scheduler::SchedulerOptions {
        webhooks: args.webhooks.clone(),
        ..baton_scheduler::SchedulerOptions::new(me.clone(), DEV_SCHEDULER_ID.into(), args.release.clone())
    };
    crate::spawn_scheduler(node, store, blobs.clone(), scheduler, connector.clone());
    for n in 0..args.workers {
        let worker = baton_worker::WorkerOptions::new(me.clone(), format!("dev-worker-{n}"), args.chunks.clone());
        node.spawn(baton_worker::run(worker, connector.clone(), store.clone(), blobs.clone(), shutdown.clone()));
    }
}
