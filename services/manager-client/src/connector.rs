//! The [`Connector`]: the mesh token and the Multiplex streams to the managers, shared by the
//! sessions opened through it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tonic::metadata::{Ascii, MetadataValue};

use super::mux::Mux;

/// How a process reaches the managers: the mesh token its calls carry, and its Multiplex streams,
/// one per manager endpoint, shared by the client and server sessions opened through it (or
/// through a clone: a clone is a handle on the same streams). Sessions of different connectors
/// do not share streams.
#[derive(Clone)]
pub struct Connector(Arc<Inner>);

struct Inner {
    /// The `authorization` value every call carries, if any.
    token: Option<MetadataValue<Ascii>>,
    /// The Multiplex streams, by manager endpoint.
    muxes: Mutex<HashMap<String, Mux>>,
    /// Per manager endpoint, the lock a session holds while it starts a stream, and the last
    /// start that failed (see `mux::connect`).
    starting: Mutex<HashMap<String, Starting>>,
    /// The newest primary this process knows of (see [`Primary`]).
    primary: Primary,
    /// What its calls to `https://` managers trust and present.
    tls: baton_mesh::tls::ClientTls,
}

/// See `Inner::starting`.
pub(super) type Starting = Arc<tokio::sync::Mutex<Option<(tokio::time::Instant, tonic::Status)>>>;

/// The newest primary a process knows of, `(term, endpoint)`: learnt from its sessions' opens
/// and from the notice a manager sends on each of its Multiplex streams when it is elected. New
/// sessions go to it first, and sessions that a standby refused during a takeover wait for it to
/// change instead of asking again and again: a takeover costs the new primary one notice per
/// process and one open per session, however long it takes.
///
/// Terms of managers of different clusters do not compare: a process reaching two clusters
/// through one connector gets hints that its sessions ignore (a session follows a primary only
/// among its own endpoints), and those sessions fall back to asking.
#[derive(Clone)]
pub(super) struct Primary(
    Arc<tokio::sync::watch::Sender<Option<(u64, String)>>>,
    /// When a session of the process last took its turn to ask ([`Primary::take_turn`]).
    Arc<Mutex<Option<tokio::time::Instant>>>,
    /// The managers the process holds a running Multiplex stream to, and how many (a notice
    /// can come only on one).
    Arc<Mutex<HashMap<String, usize>>>,
);

impl Default for Primary {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::watch::Sender::new(None)), Arc::default(), Arc::default())
    }
}

impl Primary {
    /// `endpoint` is the primary of `term`, if that is newer than what the process knew.
    pub(super) fn learn(&self, term: u64, endpoint: &str) {
        self.0.send_if_modified(|known| {
            if known.as_ref().is_some_and(|(t, e)| *t > term || (*t == term && e == endpoint)) {
                return false;
            }
            *known = Some((term, endpoint.to_owned()));
            true
        });
    }

    /// The newest primary known, if its term is above `floor`.
    pub(super) fn above(&self, floor: u64) -> Option<(u64, String)> {
        self.0.borrow().clone().filter(|(term, _)| *term > floor)
    }

    /// Whether the caller is the process's one session to ask the managers again now, at most
    /// once per `every` (the others wait for what it learns): a fallback poll per process, not
    /// per session.
    pub(super) fn take_turn(&self, every: std::time::Duration) -> bool {
        let now = tokio::time::Instant::now();
        let mut last = self.1.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|at| now - at < every) {
            return false;
        }
        *last = Some(now);
        true
    }

    /// A Multiplex stream to `endpoint` runs (`up`), or stopped.
    pub(super) fn stream(&self, endpoint: &str, up: bool) {
        let mut streams = self.2.lock().unwrap_or_else(|e| e.into_inner());
        let n = streams.entry(endpoint.to_owned()).or_default();
        if up {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                streams.remove(endpoint);
            }
        }
    }

    /// Whether the process holds a running stream to `endpoint`.
    pub(super) fn streams_to(&self, endpoint: &str) -> bool {
        self.2.lock().unwrap_or_else(|e| e.into_inner()).contains_key(endpoint)
    }

    /// Lets the next session that asks take its turn at once (the one asking learnt what it
    /// waited for).
    pub(super) fn end_turn(&self) {
        *self.1.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Waits at most `within` for a primary of a term above `floor`.
    pub(super) async fn wait_above(&self, floor: u64, within: std::time::Duration) -> Option<(u64, String)> {
        let mut rx = self.0.subscribe();
        let found = tokio::time::timeout(within, rx.wait_for(|p| p.as_ref().is_some_and(|(t, _)| *t > floor))).await;
        found.ok()?.ok().and_then(|p| p.clone())
    }
}

impl Connector {
    /// A connector whose calls carry mesh token `token` (the `--mesh-token` the scheduler,
    /// workers and standby managers were started with; `None`: no token).
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        Self::with_tls(token, baton_mesh::tls::ClientTls::none())
    }

    /// A connector whose calls carry mesh token `token` and reach `https://` managers with `tls`.
    pub fn with_tls(token: Option<&str>, tls: baton_mesh::tls::ClientTls) -> Result<Self, String> {
        let token = token
            .map(|t| format!("Bearer {t}").parse().map_err(|_| "the mesh token must be printable ASCII".to_owned()))
            .transpose()?;
        Ok(Self(Arc::new(Inner {
            token,
            muxes: Mutex::default(),
            starting: Mutex::default(),
            primary: Primary::default(),
            tls,
        })))
    }

    /// `message` as a request to a manager, with the mesh token if there is one.
    pub fn authorized<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(value) = self.0.token.clone() {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    /// An endpoint for the manager at `url`: over TLS when it is `https://`.
    pub fn endpoint(&self, url: &str) -> Result<tonic::transport::Endpoint, tonic::Status> {
        self.0.tls.endpoint(url).map_err(tonic::Status::invalid_argument)
    }

    /// The newest primary this process knows of.
    pub(super) fn primary(&self) -> &Primary {
        &self.0.primary
    }

    /// The lock of starting a stream to `endpoint`.
    pub(super) fn starting(&self, endpoint: &str) -> Starting {
        let mut starting = self.0.starting.lock().unwrap_or_else(|e| e.into_inner());
        starting.entry(endpoint.to_owned()).or_default().clone()
    }

    /// The Multiplex streams, by manager endpoint.
    pub(super) fn muxes(&self) -> MutexGuard<'_, HashMap<String, Mux>> {
        self.0.muxes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector").field("token", &self.0.token.as_ref().map(|_| "…")).finish_non_exhaustive()
    }
}
