//! Failover through etcd. Every manager campaigns on one election key with a lease (TTL 2 s by
//! default) and its address as the value; the leader key's revision is the term. While it is not
//! the leader a manager is a standby: it follows the primary's Replicate stream, and it campaigns
//! only while it is in the in-sync set the primary keeps in etcd (so a stale standby never takes
//! over). The primary self-fences — it stops acknowledging and exits, to come back as a standby —
//! when it cannot renew its lease in time, and resigns at once on SIGTERM.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use baton_mesh::proto::v1 as pb;
use etcd_client::{Client, ConnectOptions, ResignOptions};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use baton_mesh::now_ms;

use crate::service::{ManagerService, Publisher};

/// The exit code of a primary that fenced itself (lost its lease): restart it, and it rejoins
/// as a standby.
pub const EXIT_FENCED: i32 = 75;

/// The etcd key holding the in-sync set: beside the election key, not under it (every key under
/// `election/` is a candidate).
pub fn in_sync_key(election: &str) -> String {
    format!("{election}.in-sync")
}

/// Connects to etcd.
pub async fn connect(endpoints: &[String]) -> Result<Client, etcd_client::Error> {
    // No per-request timeout: a campaign waits as long as the election takes (cancelling it would
    // give up the place in line). Other calls are bounded with tokio timeouts where they are made.
    let options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
    Client::connect(endpoints, Some(options)).await
}

/// A publisher of the in-sync set into etcd.
pub fn publisher(client: Client, election: String) -> Publisher {
    Arc::new(move |members: Vec<String>, term: u64| {
        let mut client = client.clone();
        let key = in_sync_key(&election);
        Box::pin(async move {
            let value = serde_json::json!({"term": term, "members": members}).to_string();
            match tokio::time::timeout(Duration::from_secs(2), client.put(key, value, None)).await {
                Ok(r) => r.map(|_| ()).map_err(|e| e.to_string()),
                Err(_) => Err("etcd put timed out".to_owned()),
            }
        })
    })
}

async fn eligible(client: &mut Client, election: &str, node: &str) -> bool {
    let got = tokio::time::timeout(Duration::from_secs(2), client.get(in_sync_key(election), None)).await;
    match got.unwrap_or_else(|_| Err(etcd_client::Error::InvalidArgs("etcd get timed out".into()))) {
        Ok(resp) => match resp.kvs().first() {
            None => true,
            Some(kv) => serde_json::from_slice::<serde_json::Value>(kv.value())
                .ok()
                .and_then(|v| v["members"].as_array().map(|m| m.iter().any(|x| x.as_str() == Some(node))))
                .unwrap_or(false),
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the in-sync set");
            false
        }
    }
}

/// Follows the current primary's Replicate stream until cancelled.
async fn follow(
    mut client: Client,
    election: String,
    me: String,
    service: ManagerService,
    epoch: u64,
    cancel: CancellationToken,
) {
    while !cancel.is_cancelled() {
        let leader = match tokio::time::timeout(Duration::from_secs(2), client.leader(election.clone())).await {
            Ok(Ok(resp)) => resp.kv().and_then(|kv| kv.value_str().ok()).map(str::to_owned),
            _ => None,
        };
        let Some(leader) = leader.filter(|l| *l != me) else {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(100)) => continue,
            }
        };
        let _ = service.follow_leader(leader.clone(), epoch).await;
        if let Err(e) = replicate_from(&leader, &me, &service, &cancel).await {
            tracing::debug!(%leader, error = %e, "replication stream ended");
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

async fn replicate_from(
    leader: &str,
    me: &str,
    service: &ManagerService,
    cancel: &CancellationToken,
) -> Result<(), tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(leader.to_owned())
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client =
        pb::session_manager_client::SessionManagerClient::new(channel).max_decoding_message_size(256 * 1024 * 1024);
    let (acks, acks_rx) = mpsc::channel(64);
    let status = service.current_status().await?;
    let _ = acks.send(pb::ReplicaAck { node_id: me.to_owned(), durable_index: status.journal_index }).await;
    let mut frames = client.replicate(crate::client::authorized(ReceiverStream::new(acks_rx))).await?.into_inner();
    loop {
        let frame = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            f = frames.message() => f?,
        };
        let Some(frame) = frame else { return Ok(()) };
        let durable = service.replica_apply(frame).await?;
        if acks.send(pb::ReplicaAck { node_id: String::new(), durable_index: durable }).await.is_err() {
            return Ok(());
        }
    }
}

/// Runs the election loop for `service` until `shutdown`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: Client,
    election: String,
    ttl: Duration,
    me: String,
    service: ManagerService,
    health: HealthReporter,
    service_name: &'static str,
    shutdown: CancellationToken,
) {
    let mut client = client;
    let ttl_secs = ttl.as_secs().max(2) as i64;
    // A primary never comes back to this loop (it resigns and returns, or fences and exits), so
    // followers always run before this process's only election: epoch 0.
    let elections = 0u64;
    'lease: loop {
        if shutdown.is_cancelled() {
            return;
        }
        let lease = match tokio::time::timeout(Duration::from_secs(2), client.lease_grant(ttl_secs, None)).await {
            Ok(Ok(l)) => l.id(),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot grant an etcd lease; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot grant an etcd lease; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let renewed = Arc::new(AtomicI64::new(now_ms()));
        let mut keepalive = {
            let mut client = client.clone();
            let renewed = renewed.clone();
            tokio::spawn(async move {
                let Ok((mut keeper, mut stream)) = client.lease_keep_alive(lease).await else { return };
                loop {
                    if keeper.keep_alive().await.is_err() {
                        return;
                    }
                    match tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
                        Ok(Ok(Some(resp))) if resp.ttl() > 0 => renewed.store(now_ms(), Ordering::SeqCst),
                        Ok(Ok(Some(_))) => return, // the lease expired
                        _ => {}
                    }
                    tokio::time::sleep(Duration::from_millis((ttl_secs as u64 * 1000) / 6)).await;
                }
            })
        };
        let following = shutdown.child_token();
        tokio::spawn(follow(
            client.clone(),
            election.clone(),
            me.clone(),
            service.clone(),
            elections,
            following.clone(),
        ));
        // campaign only while in the in-sync set, and check again after winning
        let leader_key = loop {
            while !eligible(&mut client, &election, &me).await {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            let won = tokio::select! {
                () = shutdown.cancelled() => return,
                _ = &mut keepalive => {
                    // the lease can no longer be kept alive: campaign again with a new one
                    tracing::warn!("lease keepalive ended while campaigning; starting over");
                    following.cancel();
                    continue 'lease;
                }
                r = client.campaign(election.clone(), me.clone(), lease) => r,
            };
            match won {
                Ok(resp) => {
                    let Some(key) = resp.leader().cloned() else { continue };
                    if eligible(&mut client, &election, &me).await {
                        break key;
                    }
                    tracing::warn!("won the election but fell out of the in-sync set: resigning");
                    let _ = client.resign(Some(ResignOptions::new().with_leader(key))).await;
                }
                Err(e) => {
                    // the lease may be gone with the connection: start over with a new one
                    tracing::warn!(error = %e, "campaign failed; retrying with a new lease");
                    keepalive.abort();
                    following.cancel();
                    let _ = tokio::time::timeout(Duration::from_secs(1), client.lease_revoke(lease)).await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue 'lease;
                }
            }
        };
        following.cancel();
        let term = leader_key.rev() as u64;
        if service.become_primary(term).await.is_err() {
            return;
        }
        health.set_service_status(service_name, ServingStatus::Serving).await;
        tracing::info!(term, %me, "elected primary");
        // the watchdog: fence before the lease can run out
        let fence_after = (ttl_secs * 1000) * 6 / 10;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    // SIGTERM: hand over at once
                    let _ = service.become_standby(String::new()).await;
                    health.set_service_status(service_name, ServingStatus::NotServing).await;
                    let _ = client.resign(Some(ResignOptions::new().with_leader(leader_key))).await;
                    let _ = client.lease_revoke(lease).await;
                    tracing::info!(term, "resigned");
                    return;
                }
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            if now_ms() - renewed.load(Ordering::SeqCst) > fence_after {
                let _ = service.become_standby(String::new()).await;
                health.set_service_status(service_name, ServingStatus::NotServing).await;
                tracing::error!(term, "cannot renew the etcd lease: fenced, exiting to rejoin as a standby");
                keepalive.abort();
                std::process::exit(EXIT_FENCED);
            }
        }
    }
}
