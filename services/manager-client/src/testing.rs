//! Managers for the tests of the client library, each on a runtime (thread) of its own.

use baton_mesh::proto::v1 as pb;

/// A single manager on its own runtime (thread), at the returned endpoint.
pub(super) fn manager(dir: &std::path::Path) -> String {
    manager_until(dir, Default::default())
}

/// A single manager whose actor stops at `shutdown` (its gRPC server goes on).
pub(super) fn manager_until(dir: &std::path::Path, shutdown: tokio_util::sync::CancellationToken) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let options = baton_manager::ManagerOptions::single(dir.to_owned());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let service = baton_manager::ManagerService::start(options, shutdown).unwrap();
            tonic::transport::Server::builder()
                .add_service(pb::session_manager_server::SessionManagerServer::new(service.clone()))
                .add_service(baton_mesh::proto::internal::v1::replication_server::ReplicationServer::new(service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
    });
    endpoint
}
