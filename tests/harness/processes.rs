//! The other `baton` commands as processes, as [`Server`] constructors and helpers: managers alone
//! or as an etcd-elected pair, workers, schedulers, intakes.

use std::time::Duration;

use baton_mesh::proto::v1 as pb;

use crate::server::rand_hex;
use crate::{ADMIN_TOKEN, Etcd, Server, TempDir, eventually};

impl Server {
    /// Starts `baton manager serve` alone (no etcd), journaling under `dir`, with extra flags.
    pub fn manager_alone(dir: &TempDir, extra: &[&str]) -> Server {
        let journal = dir.path().join("journal");
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
        let journal = dir.path().join("journal");
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
