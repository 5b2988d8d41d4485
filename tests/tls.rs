//! TLS and mutual TLS end to end: `baton dev` serving only TLS, its own scheduler and workers
//! reaching its manager with its certificate (mTLS inside the mesh), clients refused without a
//! certificate or in plaintext, the CLI and grpcurl with certificates, and a certificate rotated
//! on disk served to new connections without a restart. Certificates are made at run time.

use std::sync::Arc;
use std::time::Duration;

use baton_mesh::proto::v1 as pb;
use baton_store::Backend;
use baton_tests::tls::{Ca, channel as tls_channel, replace};
use baton_tests::{
    ADMIN_TOKEN, Server, TempDir, account_schema, authed, baton_bin, create_org_on, eventually, grpcurl, record,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tonic::transport::Channel;
use tonic_types::StatusExt;

/// Whether an admin call through `channel` succeeds (the error otherwise).
async fn admin_call(channel: Channel) -> Result<(), tonic::Status> {
    let mut admin = pb::admin_client::AdminClient::new(channel);
    admin.list_orgs(authed(pb::ListOrgsRequest::default(), ADMIN_TOKEN)).await.map(|_| ())
}

#[tokio::test]
async fn mtls_serves_the_mesh_and_refuses_clients_without_a_certificate_or_in_plaintext() {
    let dir = TempDir::new();
    let ca = Ca::new(dir.path(), "ca");
    ca.issue("server");
    ca.issue("client");
    let (cert, key, client_cert, client_key, ca_pem) =
        (ca.path("server.pem"), ca.path("server.key"), ca.path("client.pem"), ca.path("client.key"), ca.path("ca.pem"));
    let server =
        Server::start(Backend::Sqlite, &["--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", &ca_pem]).await;

    // with the CA and a client certificate: served, and a batch runs through the dev's own
    // scheduler, manager and workers, which reach each other over mTLS with its certificate
    let channel = tls_channel(server.addr, &ca_pem, Some((&client_cert, &client_key))).await.expect("a TLS channel");
    admin_call(channel.clone()).await.expect("an admin call over mTLS");
    let org = create_org_on(channel.clone(), "tls").await;
    let records: Vec<_> =
        (0..50).map(|i| record(serde_json::json!({"code": format!("t{i:03}"), "name": format!("n{i}")}))).collect();
    let header = pb::BatchHeader {
        object: account_schema().name,
        operation: pb::BatchOperation::Upsert as i32,
        chunk_size: 10,
        ..Default::default()
    };
    let submitted = baton_scheduler::client::submit_batch(channel.clone(), &org.key, header, records, |_| {})
        .await
        .expect("submit");
    let scheduler = pb::scheduler_client::SchedulerClient::new(channel.clone());
    let batch = eventually(Duration::from_secs(60), "the batch done over mTLS", || {
        let (mut scheduler, id, key) = (scheduler.clone(), submitted.batch_id.clone(), org.key.clone());
        async move {
            let batch =
                scheduler.get_batch(authed(pb::GetBatchRequest { batch_id: id }, &key)).await.ok()?.into_inner();
            (batch.state == pb::BatchState::Done as i32).then_some(batch)
        }
    })
    .await;
    let totals = batch.totals.expect("totals");
    assert_eq!((totals.chunks, totals.records_committed), (5, 50), "every record committed: {totals:?}");

    // without a client certificate: refused (the handshake, or the first call after it)
    let refused = match tls_channel(server.addr, &ca_pem, None).await {
        Ok(channel) => admin_call(channel).await.err().map(|s| s.to_string()),
        Err(e) => Some(e),
    };
    assert!(refused.is_some(), "a client without a certificate was served");
    // in plaintext: refused
    let plain =
        Channel::from_shared(format!("http://{}", server.addr)).unwrap().connect_timeout(Duration::from_secs(5));
    let refused = match plain.connect().await {
        Ok(channel) => {
            tokio::time::timeout(Duration::from_secs(10), admin_call(channel)).await.ok().and_then(|r| r.err())
        }
        Err(e) => Some(tonic::Status::unavailable(e.to_string())),
    };
    assert!(refused.is_some(), "a plaintext client was served");

    // the CLI, as the README shows it
    let cli = |args: &[&str], tls: &[(&str, &str)]| {
        std::process::Command::new(baton_bin())
            .args(args)
            .env("BATON_ENDPOINT", format!("https://{}", server.addr))
            .env("BATON_ADMIN_TOKEN", ADMIN_TOKEN)
            .envs(tls.iter().copied())
            .output()
            .unwrap()
    };
    let out = cli(
        &["admin", "org", "create", "cli-tls"],
        &[("BATON_TLS_CA", &ca_pem), ("BATON_TLS_CLIENT_CERT", &client_cert), ("BATON_TLS_CLIENT_KEY", &client_key)],
    );
    assert!(out.status.success(), "the CLI over mTLS: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("org_"));
    let out = cli(&["admin", "org", "create", "no-ca"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-ca"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&["admin", "org", "create", "no-cert"], &[("BATON_TLS_CA", &ca_pem)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "the CLI without a client certificate: {stderr}");
    assert!(stderr.contains("--tls-client-cert"), "{stderr}");
    // plaintext to the TLS port: unavailable, with what to do
    let out = std::process::Command::new(baton_bin())
        .args(["admin", "org", "create", "plain"])
        .env("BATON_ENDPOINT", format!("http://{}", server.addr))
        .env("BATON_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "plaintext to a TLS server: {stderr}");
    assert!(stderr.contains("https://"), "{stderr}");

    // grpcurl, as the README shows it
    let addr = server.addr.to_string();
    if let Some((ok, text)) = grpcurl(&["-cacert", &ca_pem, "-cert", &client_cert, "-key", &client_key, &addr, "list"])
    {
        assert!(ok && text.contains("baton.v1.Intake"), "grpcurl over mTLS: {text}");
        let (ok, _) = grpcurl(&["-plaintext", "-max-time", "5", &addr, "list"]).unwrap();
        assert!(!ok, "grpcurl in plaintext was served");
    }
}

/// The certificate the server at `addr` presents to a new connection.
async fn served_certificate(addr: std::net::SocketAddr, ca_pem: &str) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(ca_pem).unwrap()).unwrap();
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn a_certificate_replaced_on_disk_is_served_without_a_restart() {
    let dir = TempDir::new();
    let ca = Ca::new(dir.path(), "ca");
    let first = ca.issue("server");
    let (cert, key, ca_pem) = (ca.path("server.pem"), ca.path("server.key"), ca.path("ca.pem"));
    let mut server =
        Server::start(Backend::Sqlite, &["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &ca_pem]).await;
    assert_eq!(served_certificate(server.addr, &ca_pem).await, first);
    let channel = tls_channel(server.addr, &ca_pem, None).await.unwrap();
    admin_call(channel.clone()).await.expect("served");

    // a new key and certificate replace the files: new connections get them
    let second = ca.issue("server");
    assert_ne!(first, second);
    eventually(Duration::from_secs(10), "the new certificate served", || async {
        (served_certificate(server.addr, &ca_pem).await == second).then_some(())
    })
    .await;
    // the connection made before goes on
    admin_call(channel).await.expect("the earlier connection still served");

    // a file that cannot be used is refused, and the last good certificate stays
    replace(&dir.path().join("server.pem"), b"not a certificate");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(served_certificate(server.addr, &ca_pem).await, second);

    // SIGHUP reloads (and does not end the process)
    let third = ca.issue("server");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(server.pid() as i32), nix::sys::signal::Signal::SIGHUP).unwrap();
    eventually(Duration::from_secs(10), "the third certificate served", || async {
        (served_certificate(server.addr, &ca_pem).await == third).then_some(())
    })
    .await;
    assert!(server.exited().is_none(), "SIGHUP ended the server");
}

#[test]
fn a_certificate_that_cannot_be_used_is_a_start_up_error() {
    let dir = TempDir::new();
    let missing = dir.path().join("missing.pem").display().to_string();
    let out = std::process::Command::new(baton_bin())
        .args(["dev", "--data-dir", &dir.path().display().to_string(), "--listen", "127.0.0.1:0"])
        .args(["--tls-cert", &missing, "--tls-key", &missing])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("TLS") && stderr.contains("missing.pem"), "{stderr}");
    // baton dev's own calls need a CA to trust its certificate
    let cert = dir.path().join("cert.pem").display().to_string();
    let ca = Ca::new(dir.path(), "ca");
    ca.issue("cert");
    let key = dir.path().join("cert.key").display().to_string();
    let out = std::process::Command::new(baton_bin())
        .args(["dev", "--data-dir", &dir.path().display().to_string(), "--listen", "127.0.0.1:0"])
        .args(["--tls-cert", &cert, "--tls-key", &key])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-ca"), "{}", String::from_utf8_lossy(&out.stderr));
    // a key without a certificate is a usage error
    let out = std::process::Command::new(baton_bin())
        .args(["dev", "--data-dir", &dir.path().display().to_string(), "--tls-key", &missing])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn a_tls_servers_health_is_plain_http_on_the_metrics_listener_for_probes() {
    // (the same statuses as gRPC health, which turns NOT_SERVING when a drain starts: the
    // drain tests check that through gRPC)
    let dir = TempDir::new();
    let ca = Ca::new(dir.path(), "ca");
    ca.issue("server");
    let (cert, key, ca_pem) = (ca.path("server.pem"), ca.path("server.key"), ca.path("ca.pem"));
    let mut server =
        Server::start(Backend::Sqlite, &["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &ca_pem]).await;
    for path in ["/health", "/health?service=baton.v1.Intake", "/health?service=baton.v1.SessionManager"] {
        let answer = server.metrics_get(path);
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("SERVING\n"), "{path}: {answer}");
    }
    let answer = server.metrics_get("/health?service=baton.v1.Nothing");
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    server.terminate(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_link_reaches_an_https_target_with_its_own_ca() {
    let dir = TempDir::new();
    let ca = Ca::new(dir.path(), "target-ca");
    ca.issue("target");
    let (cert, key, ca_pem) = (ca.path("target.pem"), ca.path("target.key"), ca.path("target-ca.pem"));
    // the target serves TLS with a CA the source knows nothing of; the source is plaintext
    let target = Server::start(Backend::Sqlite, &["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &ca_pem]).await;
    let source = Server::start(Backend::Sqlite, &[]).await;
    let a = baton_tests::create_org(&source, "source").await;
    let b = create_org_on(tls_channel(target.addr, &ca_pem, None).await.unwrap(), "target").await;
    let mut intake = source.intake().await;
    let upsert = pb::UpsertRequest {
        object: "account".into(),
        records: vec![record(serde_json::json!({"code": "c1", "name": "over tls"}))],
    };
    intake.upsert(authed(upsert, &a.key)).await.unwrap();

    let link = |ca: &str| pb::CreateLinkRequest {
        target_endpoint: format!("https://{}", target.addr),
        target_api_key: b.key.clone(),
        target_ca_pem: ca.to_owned(),
        ..Default::default()
    };
    let mut sync = source.sync().await;
    // a CA that is not PEM certificates, or one for an http:// target: refused, nothing created
    for (request, why) in [
        (link("not a certificate"), "not PEM"),
        (pb::CreateLinkRequest { target_endpoint: format!("http://{}", target.addr), ..link("x") }, "http://"),
    ] {
        let status = sync.create_link(authed(request, &a.key)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{why}: {status:?}");
        let bad = status.get_details_bad_request().expect("field violations");
        assert_eq!(bad.field_violations[0].field, "target_ca_pem", "{why}");
    }
    // with the target's CA: the link converges over TLS
    let pem = std::fs::read_to_string(&ca_pem).unwrap();
    let created = sync.create_link(authed(link(&pem), &a.key)).await.unwrap().into_inner();
    assert_eq!(created.target_ca_pem, pem);
    let mut target_intake =
        pb::intake_client::IntakeClient::new(tls_channel(target.addr, &ca_pem, None).await.unwrap());
    eventually(Duration::from_secs(30), "the record on the target, over TLS", || {
        let mut target_intake = target_intake.clone();
        let request = authed(pb::GetRequest { object: "account".into(), id: "c1".into() }, &b.key);
        async move { target_intake.get(request).await.ok() }
    })
    .await;
    let _ = &mut target_intake;
    // without it, the source cannot check the target's certificate: the link fails, saying why
    let plain = sync.create_link(authed(link(""), &a.key)).await.unwrap().into_inner();
    let failed = eventually(Duration::from_secs(30), "the link without the CA failed", || {
        let (mut sync, id, key) = (sync.clone(), plain.id.clone(), a.key.clone());
        async move {
            let link = sync.get_link(authed(pb::GetLinkRequest { link_id: id }, &key)).await.ok()?.into_inner();
            (link.state == pb::LinkState::Failed as i32).then_some(link)
        }
    })
    .await;
    assert!(failed.last_cause.contains("--tls-ca"), "{}", failed.last_cause);
}
