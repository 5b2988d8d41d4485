//! A real etcd (Debian's etcd-server) for the manager's elections.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{TempDir, free_port};

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
            dir.path().join("etcd").to_str().unwrap(),
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
