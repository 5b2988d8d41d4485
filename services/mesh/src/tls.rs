//! TLS for every baton server and client (rustls, on the aws-lc-rs provider).
//!
//! - A server given `--tls-cert` and `--tls-key` serves gRPC over TLS only: a plaintext
//!   connection fails its handshake. With `--tls-client-ca` it also requires each client to
//!   present a certificate signed by that CA (mTLS, as inside the mesh).
//! - The files are read again when they change (checked every second) or on SIGHUP; a new
//!   certificate applies to the connections made after it, and one that cannot be loaded (a
//!   half-written pair, a key that does not match) is refused with a warning while the last
//!   good one goes on serving.
//! - A client reaches an `https://` endpoint over TLS, trusting `--tls-ca` and presenting
//!   `--tls-client-cert` and `--tls-client-key` when given; `http://` stays plaintext. A server
//!   process's own calls (to the manager, a standby's to its primary, a link's to its target)
//!   default to its server certificate as their client certificate and to `--tls-client-ca` as
//!   the CA they trust, so one CA and one certificate per process make a mesh with mTLS. The
//!   files are read at each new connection, so a rotated client certificate is used from the
//!   next connection on.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// The TLS options of a process: what its server presents and requires, and what its own calls
/// trust and present.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsOptions {
    /// The PEM certificate chain the gRPC server presents; with --tls-key it serves TLS only
    /// (plaintext refused). Reloaded when the file changes or on SIGHUP.
    #[arg(long, env = "BATON_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The PEM private key of --tls-cert.
    #[arg(long, env = "BATON_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificates: every client must present a certificate they signed (mutual TLS).
    /// Also the CA this process's own calls trust when --tls-ca is not given.
    #[arg(long, env = "BATON_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// What this process's own calls trust and present.
    #[command(flatten)]
    pub client: ClientTlsArgs,
}

/// What a client's calls to `https://` endpoints trust and present (the CLI's, and a server
/// process's own calls).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClientTlsArgs {
    /// PEM CA certificates trusted for `https://` endpoints (a server process: by default its
    /// --tls-client-ca).
    #[arg(long, env = "BATON_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// The PEM certificate presented to `https://` endpoints that require one (a server process:
    /// by default its --tls-cert).
    #[arg(long, env = "BATON_TLS_CLIENT_CERT", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,

    /// The PEM private key of --tls-client-cert.
    #[arg(long, env = "BATON_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// What these options trust and present.
    pub fn client(&self) -> ClientTls {
        ClientTls { ca: self.tls_ca.clone(), identity: self.tls_client_cert.clone().zip(self.tls_client_key.clone()) }
    }
}

impl TlsOptions {
    /// Whether the server serves TLS.
    pub fn serves_tls(&self) -> bool {
        self.tls_cert.is_some() && self.tls_key.is_some()
    }

    /// The scheme of this server's own URL: `https` when it serves TLS.
    pub fn scheme(&self) -> &'static str {
        if self.serves_tls() { "https" } else { "http" }
    }

    /// What this process's own calls trust and present (see the module's documentation).
    pub fn client(&self) -> ClientTls {
        let own = self.client.client();
        ClientTls {
            ca: own.ca.or_else(|| self.tls_client_ca.clone()),
            identity: own.identity.or_else(|| self.tls_cert.clone().zip(self.tls_key.clone())),
        }
    }
}

/// What a client trusts and presents on `https://` endpoints. Cheap to clone: it holds paths,
/// and the files are read at each [`ClientTls::endpoint`].
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// The CA certificates trusted.
    pub ca: Option<PathBuf>,
    /// The client certificate and key presented.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ClientTls {
    /// No TLS options: `https://` endpoints are refused with a message naming `--tls-ca`.
    pub fn none() -> Self {
        Self::default()
    }

    /// An endpoint for `https://` `url` trusting the CA certificates `ca_pem` (not these
    /// options' CA), presenting these options' client certificate if any.
    pub fn endpoint_with_ca(&self, url: &str, ca_pem: &[u8]) -> Result<Endpoint, String> {
        let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| format!("invalid endpoint {url:?}: {e}"))?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint.tls_config(config).map_err(|e| format!("TLS for {url}: {e}"))
    }

    /// An endpoint for `url`: over TLS when it is `https://`, plaintext when `http://`.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, String> {
        let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| format!("invalid endpoint {url:?}: {e}"))?;
        if !url.starts_with("https://") {
            return Ok(endpoint);
        }
        let Some(ca) = &self.ca else {
            return Err(format!("{url} is an https:// endpoint: give the CA that signed its certificate (--tls-ca)"));
        };
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint.tls_config(config).map_err(|e| format!("TLS for {url}: {e}"))
    }
}

/// Checks that the server's certificate, key and client CA can be used, or ends the process as a
/// configuration error (exit 64, one line), before it listens.
pub fn check_or_exit(options: &TlsOptions) {
    if let Err(e) = ServerTls::load(options) {
        crate::config::exit_bad_config(format!("TLS: {e}"));
    }
}

/// Checks that `pem` holds at least one certificate (a CA given inline, as a link's target CA).
pub fn check_ca_pem(pem: &[u8]) -> Result<(), String> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if certificates.is_empty() {
        return Err("no PEM certificate".into());
    }
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// A server's TLS configuration, swapped when its files change.
#[derive(Clone)]
pub struct ServerTls {
    options: TlsOptions,
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The wait before accepting again after `accept` failed (out of file descriptors and the like).
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// How often the certificate files are checked for a change.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

impl ServerTls {
    /// The server's TLS, when `options` turn it on; an error names the file that cannot be used.
    pub fn load(options: &TlsOptions) -> Result<Option<Self>, String> {
        if !options.serves_tls() {
            return Ok(None);
        }
        let config = server_config(options)?;
        Ok(Some(Self { options: options.clone(), current: Arc::new(RwLock::new(Arc::new(config))) }))
    }

    fn current(&self) -> Arc<ServerConfig> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The modification times of the files, to tell a change.
    fn stamps(&self) -> Vec<Option<SystemTime>> {
        [&self.options.tls_cert, &self.options.tls_key, &self.options.tls_client_ca]
            .into_iter()
            .flatten()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }

    /// Loads the files again; the last good configuration stays when they cannot be used.
    fn reload(&self, why: &str) {
        match server_config(&self.options) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
                tracing::info!(why, "TLS certificate reloaded: new connections use it");
            }
            Err(e) => tracing::warn!(why, error = %e, "TLS certificate not reloaded: the previous one stays"),
        }
    }

    /// Reloads on a change of the files or on SIGHUP, until `shutdown`.
    async fn watch(self, shutdown: CancellationToken) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signal) => Some(signal),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP: TLS files are reloaded on change only");
                None
            }
        };
        let mut seen = self.stamps();
        loop {
            let hup = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = hup => self.reload("SIGHUP"),
                () = tokio::time::sleep(RELOAD_EVERY) => {
                    let now = self.stamps();
                    if now != seen {
                        seen = now;
                        self.reload("the files changed");
                    }
                }
            }
        }
    }

    /// The TLS connections accepted on `listener`, each handshake in a task of its own (a slow or
    /// plaintext client holds up no other); a failed handshake is logged and dropped. Ends with
    /// `shutdown`, as does the reloading.
    pub fn incoming(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> impl tokio_stream::Stream<Item = std::io::Result<TlsStream<TcpStream>>> + Send + 'static {
        let (accepted, stream) = tokio::sync::mpsc::channel(64);
        tokio::spawn(self.clone().watch(shutdown.clone()));
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    () = shutdown.cancelled() => return,
                    next = listener.accept() => match next {
                        Ok(next) => next,
                        Err(e) => {
                            // out of file descriptors and the like: try again shortly
                            tracing::warn!(error = %e, "cannot accept a connection");
                            tokio::time::sleep(ACCEPT_RETRY).await;
                            continue;
                        }
                    },
                };
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
                let acceptor = tokio_rustls::TlsAcceptor::from(self.current());
                let accepted = accepted.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = accepted.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake refused"),
                        Err(_) => tracing::info!(%peer, "TLS handshake not finished in time"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(stream)
    }
}

/// The rustls configuration `options` describe: the certificate chain and key, client
/// certificates required when a client CA is given, HTTP/2 (gRPC) by ALPN.
fn server_config(options: &TlsOptions) -> Result<ServerConfig, String> {
    let (Some(cert), Some(key)) = (&options.tls_cert, &options.tls_key) else {
        return Err("--tls-cert and --tls-key go together".into());
    };
    let chain = certificates(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--tls-key {}: no usable PEM private key: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &options.tls_client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for certificate in certificates(ca)? {
                roots.add(certificate).map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config =
        builder.with_single_cert(chain, key).map_err(|e| format!("--tls-cert {} with its key: {e}", cert.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The PEM certificates of `path`, at least one.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!("{}: no PEM certificate", path.display()));
    }
    Ok(certificates)
}
