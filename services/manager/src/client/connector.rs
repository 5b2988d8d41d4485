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
}

impl Connector {
    /// A connector whose calls carry mesh token `token` (the `--mesh-token` the scheduler,
    /// workers and standby managers were started with; `None`: no token).
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        let token = token
            .map(|t| format!("Bearer {t}").parse().map_err(|_| "the mesh token must be printable ASCII".to_owned()))
            .transpose()?;
        Ok(Self(Arc::new(Inner { token, muxes: Mutex::default() })))
    }

    /// `message` as a request to a manager, with the mesh token if there is one.
    pub fn authorized<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(value) = self.0.token.clone() {
            request.metadata_mut().insert("authorization", value);
        }
        request
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
