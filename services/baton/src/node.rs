//! The composition root of a server process: the services a command runs share one shutdown
//! token (cancelled by SIGTERM or SIGINT) and one task tracker, in which every background task
//! they start is spawned (releaser, workers, link manager, change-log trimmer, samplers, the
//! manager's fault watch). When the gRPC server has drained, the node waits for those tasks —
//! each stops on the token, finishing what it holds (a link runner gives its lease up, a worker
//! answers the chunk it runs) — for at most the shutdown grace, then closes the store.

use std::future::Future;
use std::time::Duration;

use baton_mesh::server::MeshServer;
use baton_store::Store;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One process's services under one shutdown.
pub struct Node {
    shutdown: CancellationToken,
    tasks: TaskTracker,
    grace: Duration,
}

impl Node {
    /// A node stopped by SIGTERM or SIGINT, whose background tasks get `grace` to end once the
    /// server has drained.
    pub fn on_signals(grace: Duration) -> Self {
        Self { shutdown: baton_mesh::shutdown::on_signals(), tasks: TaskTracker::new(), grace }
    }

    /// A node stopped by cancelling `shutdown` (a node run inside another process: the tests'
    /// in-process harness), with `grace` as in [`Node::on_signals`].
    pub fn with_shutdown(shutdown: CancellationToken, grace: Duration) -> Self {
        Self { shutdown, tasks: TaskTracker::new(), grace }
    }

    /// The token that stops the node, for the services to watch.
    pub fn shutdown(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The tracker the services spawn their background tasks in.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Runs `task` in the background until it ends; it must end on [`Node::shutdown`].
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// Serves `server` until shutdown (or until it fails), then waits for the background tasks
    /// for at most the grace and closes `store`.
    pub async fn serve(
        self,
        server: MeshServer,
        listener: TcpListener,
        metrics: TcpListener,
        store: Option<&Store>,
    ) -> anyhow::Result<()> {
        let served = server.serve(listener, metrics, self.shutdown.clone()).await;
        // a server that failed stops the tasks too
        self.shutdown.cancel();
        self.join().await;
        if let Some(store) = store {
            store.close().await;
        }
        Ok(served?)
    }

    /// Waits for every background task, for at most the grace (after [`Node::shutdown`]).
    pub async fn join(&self) {
        self.tasks.close();
        if tokio::time::timeout(self.grace, self.tasks.wait()).await.is_err() {
            tracing::warn!(grace = ?self.grace, tasks = self.tasks.len(), "background tasks still running after the grace");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn background_tasks_are_joined_and_a_stuck_one_is_left_after_the_grace() {
        let node =
            Node { shutdown: CancellationToken::new(), tasks: TaskTracker::new(), grace: Duration::from_secs(5) };
        let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (token, done) = (node.shutdown(), stopped.clone());
        node.spawn(async move {
            token.cancelled().await;
            // what a task does on its way out (a lease given up) is waited for
            tokio::time::sleep(Duration::from_secs(1)).await;
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        node.shutdown().cancel();
        let started = tokio::time::Instant::now();
        node.join().await;
        assert!(stopped.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(started.elapsed(), Duration::from_secs(1));

        // a task that ignores the token holds the node up for the grace, not for ever
        let node =
            Node { shutdown: CancellationToken::new(), tasks: TaskTracker::new(), grace: Duration::from_secs(5) };
        node.spawn(std::future::pending());
        node.shutdown().cancel();
        let started = tokio::time::Instant::now();
        node.join().await;
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }
}
