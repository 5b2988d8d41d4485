//! A real S3 protocol server (moto) on loopback for the S3 blob store.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

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
