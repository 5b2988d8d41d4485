//! The end-to-end harness: starts the real `baton` binary on free loopback ports (on SQLite with
//! `baton dev`, or as `baton intake` on a fresh PostgreSQL database), and gives gRPC clients and
//! helpers to the tests. Every wait here is bounded.

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

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_hex() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{}_{nanos:x}", std::process::id())
}

impl Server {
    /// Starts the mesh on `backend` with extra intake flags: `baton dev` for SQLite, `baton intake`
    /// on a fresh database for PostgreSQL.
    pub async fn start(backend: Backend, extra: &[&str]) -> Server {
        match backend {
            Backend::Sqlite => {
                let dir = TempDir::new();
                let data_dir = dir.0.to_str().unwrap().to_owned();
                let mut args =
                    vec!["dev", "--data-dir", &data_dir, "--listen", "127.0.0.1:0", "--admin-token", ADMIN_TOKEN];
                args.extend_from_slice(extra);
                let url = format!("sqlite://{data_dir}/baton.db");
                Self::spawn(&args, url, backend, Some(dir))
            }
            Backend::Postgres => {
                let (url, _) = baton_store::testing::fresh_url(Backend::Postgres).await.unwrap();
                let mut args = vec!["intake", "--store", &url, "--listen", "127.0.0.1:0", "--admin-token", ADMIN_TOKEN];
                args.extend_from_slice(extra);
                Self::spawn(&args, url.clone(), backend, None)
            }
        }
    }

    fn spawn(args: &[&str], store_url: String, backend: Backend, dir: Option<TempDir>) -> Server {
        let mut child = Command::new(baton_bin())
            .args(args)
            .env("BATON_LOG", "warn")
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
        Server { child, addr: addr.unwrap(), metrics: metrics.unwrap(), store_url, backend, _dir: dir }
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

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
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
        let mut stream = std::net::TcpStream::connect(self.metrics).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(stream, "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.metrics).unwrap();
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
    }
}

/// Creates an org, a key and the `account` object.
pub async fn create_org(server: &Server, name: &str) -> TestOrg {
    let mut admin = server.admin().await;
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

/// A protobuf Struct from a JSON object.
pub fn record(value: serde_json::Value) -> prost_types::Struct {
    use prost_types::value::Kind;
    fn convert(v: &serde_json::Value) -> prost_types::Value {
        let kind = match v {
            serde_json::Value::Null => Kind::NullValue(0),
            serde_json::Value::Bool(b) => Kind::BoolValue(*b),
            serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
            serde_json::Value::String(s) => Kind::StringValue(s.clone()),
            serde_json::Value::Array(a) => {
                Kind::ListValue(prost_types::ListValue { values: a.iter().map(convert).collect() })
            }
            serde_json::Value::Object(o) => Kind::StructValue(prost_types::Struct {
                fields: o.iter().map(|(k, v)| (k.clone(), convert(v))).collect(),
            }),
        };
        prost_types::Value { kind: Some(kind) }
    }
    match convert(&value).kind {
        Some(prost_types::value::Kind::StructValue(s)) => s,
        _ => panic!("a record is a JSON object"),
    }
}

/// The backends end-to-end tests run on (see [`baton_store::testing::backends`]).
pub fn backends() -> Vec<Backend> {
    baton_store::testing::backends()
}
