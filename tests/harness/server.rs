//! A `baton` server under test ([`Server`]): started on free loopback ports, its gRPC clients
//! and `/metrics`, signalled, restarted where it was, killed when dropped; and [`TempDir`]. A
//! server is a process of the real binary, or (`Server::in_process`) `baton dev` composed by the
//! same library inside the test process, for tests that need no process of their own.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use baton_mesh::proto::v1 as pb;
use baton_store::Backend;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::transport::Channel;

use crate::{authed, fields_json};

/// The admin token the harness starts servers with.
pub const ADMIN_TOKEN: &str = "adm_e2e_token";

/// The `baton` binary under test: `$BATON_BIN`, or the workspace's debug build.
pub fn baton_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("BATON_BIN") {
        return bin.into();
    }
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/baton");
    assert!(bin.exists(), "{} is missing: run `cargo build -p baton` (scripts/test.sh does)", bin.display());
    bin
}

/// A running `baton` server, stopped (a process SIGKILLed, an in-process node shut down) when
/// dropped.
pub struct Server {
    run: Running,
    /// The gRPC address.
    pub addr: SocketAddr,
    /// The `/metrics` address.
    pub metrics: SocketAddr,
    /// The store URL it runs on.
    pub store_url: String,
    /// The backend it runs on.
    pub backend: Backend,
    _dir: Option<TempDir>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// How a server runs.
enum Running {
    /// A process of the `baton` binary.
    Process(Child),
    /// `baton dev` in this process (held for its `Drop`, which stops it).
    InProcess { _node: InProcess },
}

/// `baton dev` run by the `baton` library in this process (`baton::dev::start`), on a runtime of
/// its own on a thread of its own, so that it serves whatever runtime flavour the test uses;
/// told to stop (its token cancelled) when dropped. Process-wide state (the `/metrics` recorder) is the test process's: nextest runs each
/// test in a process of its own.
struct InProcess {
    shutdown: tokio_util::sync::CancellationToken,
    /// The node's thread, detached when dropped.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for InProcess {
    fn drop(&mut self) {
        // Like a SIGKILLed process, the node is not waited for: its drain would wait for the
        // test's own connections, whose tasks run on the test's runtime, blocked here. It stops
        // on the token, or with the test process.
        self.shutdown.cancel();
        drop(self.thread.take());
    }
}

/// A new store on `backend`: a SQLite file in `dir`, or a fresh PostgreSQL database.
async fn store_url(backend: Backend, dir: &TempDir) -> String {
    match backend {
        Backend::Sqlite => format!("sqlite://{}/baton.db", dir.path().display()),
        Backend::Postgres => baton_store::testing::fresh_url(Backend::Postgres).await.unwrap().0,
    }
}

pub(crate) fn rand_hex() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{}_{nanos:x}", std::process::id())
}

impl Server {
    /// Starts the mesh (`baton dev`) on `backend` with extra flags: a SQLite store in a new
    /// temporary data directory, or a fresh PostgreSQL database.
    pub async fn start(backend: Backend, extra: &[&str]) -> Server {
        Self::start_with_env(backend, extra, &[]).await
    }

    /// [`Server::start`] with environment variables set for the process.
    pub async fn start_with_env(backend: Backend, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let dir = TempDir::new();
        let url = store_url(backend, &dir).await;
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Self::launch(backend, dir, &url, "127.0.0.1:0", extra, env)
    }

    /// Starts `baton dev` on `backend` with extra flags as [`Server::start`] does, but in this
    /// process (no process to signal, kill or restart: those panic). The flags are parsed as the
    /// command parses them, `BATON_*` variables included.
    pub async fn in_process(backend: Backend, extra: &[&str]) -> Server {
        let dir = TempDir::new();
        let url = store_url(backend, &dir).await;
        let data_dir = dir.path().to_str().unwrap().to_owned();
        let mut flags = vec!["--data-dir", &data_dir, "--store", &url, "--listen", "127.0.0.1:0"];
        flags.extend_from_slice(&["--admin-token", ADMIN_TOKEN, "--metrics-listen", "127.0.0.1:0"]);
        flags.extend_from_slice(extra);
        let args = baton::dev::parse_args(&flags).unwrap_or_else(|e| panic!("baton dev's flags {flags:?}: {e}"));
        let shutdown = tokio_util::sync::CancellationToken::new();
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let token = shutdown.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            runtime.block_on(async move {
                match baton::dev::start(args, token).await {
                    Ok(node) => {
                        let _ = started_tx.send(Ok((node.addr, node.metrics)));
                        if let Ok(Err(e)) = node.served.await {
                            eprintln!("the in-process baton dev failed: {e:#}");
                        }
                    }
                    Err(e) => {
                        let _ = started_tx.send(Err(format!("{e:#}")));
                    }
                }
            });
        });
        let (addr, metrics) = started.await.expect("the node's thread").expect("baton dev started in-process");
        let run = Running::InProcess { _node: InProcess { shutdown, thread: Some(thread) } };
        Server { run, addr, metrics, store_url: url, backend, _dir: Some(dir), args: Vec::new(), env: Vec::new() }
    }

    /// The process, for what only a process can be told.
    fn process(&mut self) -> &mut Child {
        match &mut self.run {
            Running::Process(child) => child,
            Running::InProcess { .. } => panic!("an in-process server has no process: start it with Server::start"),
        }
    }

    /// Starts `baton dev` on a given data directory, store and address (to restart a server
    /// where it was).
    pub fn start_at(backend: Backend, dir: TempDir, url: &str, listen: &str, extra: &[&str]) -> Server {
        Self::launch(backend, dir, url, listen, extra, Vec::new())
    }

    fn launch(
        backend: Backend,
        dir: TempDir,
        url: &str,
        listen: &str,
        extra: &[&str],
        env: Vec<(String, String)>,
    ) -> Server {
        let data_dir = dir.path().to_str().unwrap().to_owned();
        let mut args =
            vec!["dev", "--data-dir", &data_dir, "--store", url, "--listen", listen, "--admin-token", ADMIN_TOKEN];
        // tests run side by side: not the fixed default /metrics port
        args.extend_from_slice(&["--metrics-listen", "127.0.0.1:0"]);
        args.extend_from_slice(extra);
        Self::spawn(&args, url.to_owned(), backend, Some(dir), env)
    }

    /// SIGKILLs the server and starts it again with the same arguments, on the same address (and
    /// data directory, store and flags), adding `extra`.
    pub fn restart(mut self, extra: &[&str]) -> Server {
        let child = self.process();
        let _ = child.kill();
        let _ = child.wait();
        let dir = self._dir.take();
        let addr = self.addr.to_string();
        let mut args = self.args.clone();
        if let Some(i) = args.iter().position(|a| a == "--listen") {
            args[i + 1] = addr;
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let (backend, url, env) = (self.backend, self.store_url.clone(), std::mem::take(&mut self.env));
        drop(self);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::spawn(&args, url, backend, dir, env)
    }

    /// SIGKILLs the server, keeping its data directory for [`Server::start_at`].
    pub fn kill(mut self) -> (TempDir, String, SocketAddr) {
        let child = self.process();
        let _ = child.kill();
        let _ = child.wait();
        (self._dir.take().expect("a data directory"), self.store_url.clone(), self.addr)
    }

    /// Starts `baton` with any arguments; the process must print its `endpoint:` and `metrics:`
    /// lines (every server does).
    pub fn spawn_raw(args: &[&str]) -> Server {
        Self::spawn(args, String::new(), Backend::Sqlite, None, Vec::new())
    }

    /// [`Server::spawn_raw`] with environment variables (kept across [`Server::restart`] until
    /// [`Server::clear_env`]).
    pub fn spawn_raw_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Self::spawn(args, String::new(), Backend::Sqlite, None, env)
    }

    /// Forgets the environment variables it was started with, for the next restart (a failpoint
    /// that should not fire again).
    pub fn clear_env(&mut self) {
        self.env.clear();
    }

    fn spawn(
        args: &[&str],
        store_url: String,
        backend: Backend,
        dir: Option<TempDir>,
        env: Vec<(String, String)>,
    ) -> Server {
        let mut child = Command::new(baton_bin())
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("BATON_LOG", std::env::var("BATON_E2E_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start baton");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Drain stdout for the process's whole life, so that it never writes to a closed pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut addr, mut metrics) = (None, None);
        while addr.is_none() || metrics.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    panic!("baton {args:?} did not print its endpoint within 30s");
                }
            };
            let line = line.trim();
            if let Some(a) = line.strip_prefix("endpoint:") {
                addr = Some(a.trim().parse().unwrap());
            } else if let Some(m) = line.strip_prefix("metrics:") {
                let m = m.trim().trim_start_matches("http://").trim_end_matches("/metrics");
                metrics = Some(m.parse().unwrap());
            }
        }
        let args = args.iter().map(|s| s.to_string()).collect();
        Server {
            run: Running::Process(child),
            addr: addr.unwrap(),
            metrics: metrics.unwrap(),
            store_url,
            backend,
            _dir: dir,
            args,
            env,
        }
    }

    /// The data directory of a `baton dev` server.
    pub fn data_dir(&self) -> &std::path::Path {
        self._dir.as_ref().expect("a data directory").path()
    }

    /// A channel to the server.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.unwrap()
    }

    /// An Admin client.
    pub async fn admin(&self) -> pb::admin_client::AdminClient<Channel> {
        pb::admin_client::AdminClient::new(self.channel().await)
    }

    /// An Intake client.
    pub async fn intake(&self) -> pb::intake_client::IntakeClient<Channel> {
        pb::intake_client::IntakeClient::new(self.channel().await)
    }

    /// A Sync client.
    pub async fn sync(&self) -> pb::sync_client::SyncClient<Channel> {
        pb::sync_client::SyncClient::new(self.channel().await).max_decoding_message_size(64 * 1024 * 1024)
    }

    /// Every live record of `object` in `org`, by id: (version, fields as JSON).
    pub async fn records(
        &self,
        key: &str,
        object: &str,
    ) -> std::collections::BTreeMap<String, (i64, serde_json::Value)> {
        let mut out = std::collections::BTreeMap::new();
        let mut token = String::new();
        let mut intake = self.intake().await;
        for _ in 0..100_000 {
            let request = pb::QueryRequest { object: object.into(), page_token: token.clone(), ..Default::default() };
            let page = intake.query(authed(request, key)).await.unwrap().into_inner();
            for r in page.records {
                out.insert(r.id, (r.version, fields_json(&r.fields)));
            }
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        out
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        match &self.run {
            Running::Process(child) => child.id(),
            Running::InProcess { .. } => panic!("an in-process server has no process: start it with Server::start"),
        }
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.process().try_wait().unwrap()
    }

    /// Sends SIGTERM and waits (at most `within`) for the exit status.
    pub async fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.process().try_wait().unwrap() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// GET `/metrics` as text.
    pub fn metrics_text(&self) -> String {
        self.metrics_get("/metrics")
    }

    /// The whole HTTP answer (status line, headers, body) to `GET path` on the `/metrics`
    /// listener.
    pub fn metrics_get(&self, path: &str) -> String {
        let mut stream = std::net::TcpStream::connect(self.metrics).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.metrics).unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // an in-process node stops when its `InProcess` is dropped
        if let Running::Process(child) = &mut self.run {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A temporary directory (`baton_e2e_…` under the system's), removed on drop: `tempfile`'s, with
/// the one thing the tests add, [`TempDir::keep`] to look at it afterwards.
#[derive(Debug)]
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    /// A new, empty temporary directory.
    pub fn new() -> Self {
        TempDir(tempfile::Builder::new().prefix("baton_e2e_").tempdir().expect("a temporary directory"))
    }

    /// Where it is.
    pub fn path(&self) -> &std::path::Path {
        self.0.path()
    }

    /// Keeps the directory (it is not removed when this is dropped): where it is.
    pub fn keep(self) -> PathBuf {
        self.0.keep()
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}
