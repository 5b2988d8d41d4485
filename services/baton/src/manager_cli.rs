//! `baton manager`: runs the session manager, or inspects one.

use std::time::Duration;

use baton_manager::{ManagerOptions, ManagerService};
use baton_manager_client::Connector;
use baton_mesh::auth::AuthConfig;
use baton_mesh::config::{MeshToken, ServeOptions, exit_bad_config};
use baton_mesh::proto::internal::v1 as internal;
use baton_mesh::proto::v1 as pb;
use baton_mesh::server::MeshServer;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::client::{Conn, channel, duration_json, explain, time_json, with_bearer};
use crate::node::Node;
use crate::output::{Column, Output, Printer, col, time};

/// `baton manager`.
#[derive(clap::Args, Debug)]
pub struct ManagerArgs {
    #[command(subcommand)]
    command: ManagerCommand,
}

/// The manager subcommands.
#[derive(clap::Subcommand, Debug)]
// parsed once at start: the size of the serve options does not matter
#[allow(clippy::large_enum_variant)]
enum ManagerCommand {
    /// Runs a session manager.
    Serve {
        #[command(flatten)]
        serve: ServeOptions,
        #[command(flatten)]
        manager: ManagerOptions,
    },
    /// Prints the manager's role, term and journal position.
    Status {
        #[command(flatten)]
        conn: ManagerConn,
    },
    /// Lists the client-server sessions.
    Sessions {
        #[command(flatten)]
        conn: ManagerConn,
    },
    /// Shows one session.
    Session {
        #[command(flatten)]
        conn: ManagerConn,
        /// The session id.
        id: String,
    },
}

/// Where the inspected manager is, and the mesh token it requires.
#[derive(clap::Args, Debug)]
struct ManagerConn {
    #[command(flatten)]
    conn: Conn,
    #[command(flatten)]
    mesh: MeshToken,
}

impl ManagerConn {
    async fn client(
        &self,
    ) -> anyhow::Result<pb::session_manager_client::SessionManagerClient<tonic::transport::Channel>> {
        Ok(pb::session_manager_client::SessionManagerClient::new(channel(&self.conn).await?))
    }

    /// `message` with the mesh token, if one is set.
    fn request<T>(&self, message: T) -> anyhow::Result<tonic::Request<T>> {
        match self.mesh.get() {
            Some(token) => with_bearer(message, token),
            None => Ok(tonic::Request::new(message)),
        }
    }
}

/// The columns of a manager's status.
const STATUS_COLUMNS: &[Column] = &[
    col("ROLE", "role"),
    col("TERM", "term"),
    col("LEADER", "leader"),
    col("JOURNAL", "journal_index"),
    col("STANDBY LAG", "standby_lag"),
    col("IN SYNC", "in_sync"),
    col("SESSIONS", "sessions"),
    col("SERVERS", "servers"),
];

/// The columns of a session.
const SESSION_COLUMNS: &[Column] = &[
    col("SESSION", "session_id"),
    col("POOL", "pool"),
    col("SERVER", "bound_server"),
    col("CONNECTED", "client_connected"),
    col("REQUESTS", "request_queue"),
    col("RESPONSES", "response_queue"),
    col("STATE", "state"),
    time("OPENED", "open_time"),
    col("IDLE", "idle"),
];

fn session_json(s: &pb::SessionInfo) -> serde_json::Value {
    serde_json::json!({
        "session_id": s.session_id, "pool": s.pool, "bound_server": s.bound_server,
        "client_connected": s.client_connected, "request_queue": s.request_queue,
        "response_queue": s.response_queue, "last_request_seq": s.last_request_seq,
        "client_restart_bytes": s.client_restart_bytes, "server_restart_bytes": s.server_restart_bytes,
        "state": s.state, "open_time": time_json(s.open_time.as_ref()), "idle": duration_json(s.idle.as_ref()),
    })
}

/// The name the manager's health is reported under.
const NAME: &str = "baton.v1.SessionManager";

/// Runs a manager subcommand.
pub async fn run(args: ManagerArgs, output: Output) -> anyhow::Result<()> {
    match args.command {
        ManagerCommand::Serve { serve, manager } => serve_manager(serve, manager).await,
        ManagerCommand::Status { conn } => {
            let s = conn
                .client()
                .await?
                .status(conn.request(pb::ManagerStatusRequest {})?)
                .await
                .map_err(explain)?
                .into_inner();
            let mut printer = Printer::new(output, STATUS_COLUMNS);
            printer.print(&serde_json::json!({
                "role": s.role, "term": s.term, "leader": s.leader, "journal_index": s.journal_index,
                "standby_lag": s.standby_lag, "in_sync": s.in_sync, "sessions": s.sessions, "servers": s.servers,
            }))?;
            printer.finish()
        }
        ManagerCommand::Sessions { conn } => {
            // every page, one session per line
            let mut client = conn.client().await?;
            let mut printer = Printer::new(output, SESSION_COLUMNS);
            let mut page_token = String::new();
            loop {
                let request = conn.request(pb::ListSessionsRequest { page_size: 1000, page_token })?;
                let page = client.list_sessions(request).await.map_err(explain)?.into_inner();
                for s in &page.sessions {
                    printer.print(&session_json(s))?;
                }
                if page.next_page_token.is_empty() {
                    return printer.finish();
                }
                page_token = page.next_page_token;
            }
        }
        ManagerCommand::Session { conn, id } => {
            let request = conn.request(pb::GetSessionRequest { session_id: id })?;
            let s = conn.client().await?.get_session(request).await.map_err(explain)?.into_inner();
            let mut printer = Printer::new(output, SESSION_COLUMNS);
            printer.print(&session_json(&s))?;
            printer.finish()
        }
    }
}

/// Runs a session manager until SIGTERM or SIGINT: alone, or with etcd as a primary or standby.
async fn serve_manager(serve: ServeOptions, manager: ManagerOptions) -> anyhow::Result<()> {
    baton_mesh::tls::check_or_exit(&serve.tls);
    let scheme = serve.tls.scheme();
    let listener = baton_mesh::server::bind_or_exit(serve.listen).await;
    let metrics = baton_mesh::server::bind(serve.metrics_listen).await?;
    let node = crate::node::Node::on_signals(serve.shutdown_grace);
    let shutdown = node.shutdown();
    let (connector, mesh_token) = crate::mesh_connector(&manager.mesh, &serve.tls);
    if mesh_token.is_none() && !manager.etcd.is_empty() {
        tracing::warn!("no --mesh-token: the manager takes any caller; keep it unreachable from outside the mesh");
    }
    let server = MeshServer::new(serve, AuthConfig { mesh_token, ..AuthConfig::default() });
    // a manager that cannot serve (its journal fails, it stops answering) steps down
    // within this: the lease TTL, or 2 s without etcd
    let stall_after = manager.lease_ttl;
    let (server, failover) = if manager.etcd.is_empty() {
        (add_alone(server, manager, &node, &shutdown, stall_after), None)
    } else {
        let me = manager.advertise.clone().unwrap_or_else(|| {
            let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
            format!("{scheme}://{addr}")
        });
        let (server, failover, ttl) =
            add_with_failover(server, manager, me, connector, &node, &shutdown, stall_after).await;
        (server, Some((failover, ttl)))
    };
    crate::print_endpoints(&listener, &metrics)?;
    let served = node.serve(server, listener, metrics, None).await;
    // A primary resigns on SIGTERM once it has stopped acknowledging, and its streams
    // close then too: the server can finish first. Exiting then would drop the
    // resignation, and the standby would wait out the lease (2 s instead of about 50 ms
    // in `bench manager`, one handover in ten).
    if let Some((failover, ttl)) = failover
        && tokio::time::timeout(ttl, failover).await.is_err()
    {
        tracing::warn!(?ttl, "the election did not end in time; the lease runs out instead");
    }
    served
}

/// Starts a manager without etcd (exits 64 when its journal cannot be opened) and adds it to
/// `server`; it steps down on a fault.
fn add_alone(
    server: MeshServer,
    manager: ManagerOptions,
    node: &Node,
    shutdown: &CancellationToken,
    stall_after: Duration,
) -> MeshServer {
    let service = ManagerService::start(manager, shutdown.clone())
        .unwrap_or_else(|e| exit_bad_config(format!("cannot open the journal: {e}")));
    node.spawn(baton_manager::failover::step_down_on_fault(
        service.clone(),
        None,
        server.health(),
        NAME,
        stall_after,
        shutdown.clone(),
    ));
    server
        .add_service(pb::session_manager_server::SessionManagerServer::new(service.clone()))
        .add_service(internal::replication_server::ReplicationServer::new(service))
}

/// Starts a manager that runs for election in etcd as `me` (exits 64 when etcd cannot be
/// reached or the journal cannot be opened) and adds it to `server`; returns the server, the
/// election task and the lease TTL.
async fn add_with_failover(
    server: MeshServer,
    manager: ManagerOptions,
    me: String,
    connector: Connector,
    node: &Node,
    shutdown: &CancellationToken,
    stall_after: Duration,
) -> (MeshServer, JoinHandle<()>, Duration) {
    let etcd = baton_manager::failover::connect(&manager.etcd)
        .await
        .unwrap_or_else(|e| exit_bad_config(format!("cannot reach etcd at {:?}: {e}", manager.etcd)));
    let (election, ttl) = (manager.election_key.clone(), manager.lease_ttl);
    let etcd_endpoints = manager.etcd.clone();
    let service = ManagerService::start_with(manager, me.clone(), true, shutdown.clone())
        .unwrap_or_else(|e| exit_bad_config(format!("cannot open the journal: {e}")));
    node.spawn(baton_manager::failover::step_down_on_fault(
        service.clone(),
        Some(etcd.clone()),
        server.health(),
        NAME,
        stall_after,
        shutdown.clone(),
    ));
    // the standby reports NOT_SERVING until elected, so readiness keeps it out of the Service
    let health = server.health();
    let server = server
        .add_service_with_health(pb::session_manager_server::SessionManagerServer::new(service.clone()), false)
        .add_service(internal::replication_server::ReplicationServer::new(service.clone()));
    let failover = tokio::spawn(baton_manager::failover::run(
        etcd,
        etcd_endpoints,
        connector,
        election,
        ttl,
        me,
        service,
        health,
        NAME,
        shutdown.clone(),
    ));
    (server, failover, ttl)
}
