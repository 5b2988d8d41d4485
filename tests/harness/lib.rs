//! The end-to-end harness: starts the real `baton` binary on free loopback ports (on SQLite with
//! `baton dev`, or as `baton intake` on a fresh PostgreSQL database), and gives gRPC clients and
//! helpers to the tests. Every wait here is bounded. By concern:
//! - [`server`]: a `baton` process ([`Server`]) and its gRPC clients, and [`TempDir`];
//! - [`processes`]: the other commands as processes (managers alone or as an etcd-elected pair,
//!   workers, schedulers, intakes);
//! - [`api`]: requests as an org or the admin ([`authed`], [`create_org`], [`record`]) and
//!   grpcurl;
//! - [`etcd`], [`s3`], [`postgres`]: the real components tests run against;
//! - [`campaign`], [`fault_proxy`], [`history`]: the fault campaign, its proxy and its history
//!   check; [`mirror`] and [`tls`]: helpers of those tests.

pub mod api;
pub mod campaign;
pub mod etcd;
pub mod fault_proxy;
pub mod history;
pub mod mirror;
pub mod postgres;
pub mod processes;
pub mod s3;
pub mod server;
pub mod tls;

use std::time::{Duration, Instant};

use baton_store::Backend;

pub use api::{TestOrg, account_schema, authed, create_org, create_org_on, fields_json, grpcurl, record};
pub use etcd::Etcd;
pub use processes::{
    ManagerPair, intake_process, scheduler_process, scheduler_process_with_env, wait_for_pair, wait_for_pair_with,
    worker, worker_process, worker_process_with_env, worker_with_env,
};
pub use s3::S3;
pub use server::{ADMIN_TOKEN, Server, TempDir, baton_bin};

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

/// A free port on 127.0.0.1 (taken again by whoever binds it next).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
