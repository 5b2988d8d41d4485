//! PostgreSQL 15 clusters of a test's (or a benchmark's) own: made with `pg_createcluster` on a
//! free port, trust authentication, dropped with their data at the end.

use std::process::Command;

/// A cluster of our own, running; dropped (stopped, its data deleted) with the value.
pub struct Cluster {
    name: String,
    port: u16,
}

impl Cluster {
    /// A new running cluster named after `purpose` and this process, with `settings`
    /// (`wal_level=logical`) in its configuration; `None` where `pg_createcluster` is not
    /// installed (an error under CI, where scripts/test.sh installs PostgreSQL).
    pub fn create(purpose: &str, settings: &[&str]) -> Option<Cluster> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let name = format!("baton_{purpose}_{}", std::process::id());
        let mut command = Command::new("pg_createcluster");
        command.args(["15", &name, "-p", &port.to_string(), "--start"]);
        for setting in settings {
            command.args(["-o", setting]);
        }
        match command.args(["--", "-A", "trust"]).output() {
            Ok(out) if out.status.success() => Some(Cluster { name, port }),
            Ok(out) => panic!("pg_createcluster failed: {}", String::from_utf8_lossy(&out.stderr)),
            Err(e) => {
                assert!(std::env::var_os("CI").is_none(), "pg_createcluster is not installed under CI: {e}");
                eprintln!("note: pg_createcluster not found ({e}); skipping");
                None
            }
        }
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of its `postgres` database as the `postgres` user.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs `sql` with `psql` (stopping at the first error); its output.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .args([&self.url(), "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql])
            .output()
            .expect("psql runs");
        assert!(out.status.success(), "psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `pg_ctlcluster 15 NAME ACTION` (`stop` is a fast shutdown: sessions are ended).
    pub fn ctl(&self, action: &str) {
        let mut command = Command::new("pg_ctlcluster");
        command.args(["15", &self.name, action]);
        if action == "stop" {
            command.args(["-m", "fast"]);
        }
        let out = command.output().unwrap();
        assert!(out.status.success(), "pg_ctlcluster {action}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("pg_dropcluster").args(["15", &self.name, "--stop"]).output();
    }
}
