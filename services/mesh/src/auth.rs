//! Who is calling. The admin API takes the admin token; the session manager takes the mesh token
//! (when one is configured); every other baton API takes an org API key, resolved to its org by a
//! [`KeyResolver`] (the store). Health and reflection are open.

use std::sync::Arc;

use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use tonic::Status;

/// The caller of a request, put in the request's extensions by the mesh layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The holder of the admin token.
    Admin,
    /// An org, through one of its API keys.
    Org(String),
    /// Another baton service, through the mesh token.
    Mesh,
}

/// What an API key resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyLookup {
    /// A live key of this org.
    Org(String),
    /// A key that was revoked.
    Revoked,
    /// No such key.
    Unknown,
}

/// Resolves API keys to orgs (`baton_api::keys::StoreKeys` over the store, which keeps only a
/// hash of each key).
pub trait KeyResolver: Send + Sync + 'static {
    /// Looks up the key the caller presented.
    fn resolve(&self, key: String) -> BoxFuture<'_, Result<KeyLookup, String>>;
}

/// How long a caller whose API key could not be checked (the store did not answer) is asked to
/// wait before retrying.
const KEY_CHECK_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// How a server authenticates its callers.
#[derive(Clone, Default)]
pub struct AuthConfig {
    /// The admin token; `None` disables the admin API.
    pub admin_token: Option<Arc<str>>,
    /// The API key resolver; `None` refuses every org call.
    pub keys: Option<Arc<dyn KeyResolver>>,
    /// The mesh token the session manager requires; `None` lets any caller in.
    pub mesh_token: Option<Arc<str>>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<redacted>"))
            .field("keys", &self.keys.is_some())
            .field("mesh_token", &self.mesh_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// What a gRPC path needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Health and reflection: anyone.
    Open,
    /// The admin API.
    Admin,
    /// The session manager and every `baton.internal` service: the mesh token.
    Mesh,
    /// Everything else: an org API key.
    Org,
}

pub(crate) fn access_for(path: &str) -> Access {
    if path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.") {
        Access::Open
    } else if path.starts_with("/baton.v1.SessionManager/") || path.starts_with("/baton.internal.") {
        // reached by baton's own services only; it takes no org key
        Access::Mesh
    } else if path.starts_with("/baton.v1.Admin/") {
        Access::Admin
    } else {
        Access::Org
    }
}

fn bearer(headers: &http::HeaderMap) -> Result<&str, Status> {
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or_else(|| Status::unauthenticated("missing authorization header: send `Bearer <key>`"))?;
    let value = value.to_str().map_err(|_| Status::unauthenticated("authorization header is not ASCII"))?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| Status::unauthenticated("authorization header must be `Bearer <key>`"))
}

/// Constant-time comparison, so the admin token cannot be guessed byte by byte from timings.
fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl AuthConfig {
    /// Authenticates a request for `path`; `None` for open paths.
    pub(crate) async fn authenticate(
        &self,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Result<Option<Principal>, Status> {
        match access_for(path) {
            Access::Open => Ok(None),
            Access::Admin => {
                let token = bearer(headers)?;
                let Some(admin) = &self.admin_token else {
                    return Err(Status::unauthenticated("the admin API is disabled: no admin token is configured"));
                };
                if same_secret(token, admin) {
                    Ok(Some(Principal::Admin))
                } else {
                    Err(Status::unauthenticated("invalid admin token"))
                }
            }
            Access::Mesh => {
                let Some(mesh) = &self.mesh_token else { return Ok(None) };
                if same_secret(bearer(headers)?, mesh) {
                    Ok(Some(Principal::Mesh))
                } else {
                    Err(Status::unauthenticated("invalid mesh token"))
                }
            }
            Access::Org => {
                let key = bearer(headers)?;
                let Some(keys) = &self.keys else {
                    return Err(Status::unauthenticated("this server accepts no API keys"));
                };
                match keys.resolve(key.to_owned()).await {
                    Ok(KeyLookup::Org(org)) => Ok(Some(Principal::Org(org))),
                    Ok(KeyLookup::Revoked) => Err(Status::unauthenticated("api key revoked")),
                    Ok(KeyLookup::Unknown) => Err(Status::unauthenticated("invalid api key")),
                    Err(e) => {
                        tracing::error!(error = %e, "api key lookup failed");
                        Err(crate::status::retry_later(
                            tonic::Code::Unavailable,
                            "cannot check the api key now; retry",
                            KEY_CHECK_RETRY_AFTER,
                        ))
                    }
                }
            }
        }
    }
}

/// The org of a request authenticated with an API key. Handlers call this first.
pub fn org_of<T>(request: &tonic::Request<T>) -> Result<String, Status> {
    match request.extensions().get::<Principal>() {
        Some(Principal::Org(org)) => Ok(org.clone()),
        _ => Err(Status::unauthenticated("this call needs an org api key")),
    }
}

/// Checks that a request was made with the admin token.
pub fn require_admin<T>(request: &tonic::Request<T>) -> Result<(), Status> {
    match request.extensions().get::<Principal>() {
        Some(Principal::Admin) => Ok(()),
        _ => Err(Status::unauthenticated("this call needs the admin token")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_access() {
        assert_eq!(access_for("/grpc.health.v1.Health/Check"), Access::Open);
        assert_eq!(access_for("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"), Access::Open);
        assert_eq!(access_for("/baton.v1.Admin/CreateOrg"), Access::Admin);
        assert_eq!(access_for("/baton.v1.Intake/Upsert"), Access::Org);
        assert_eq!(access_for("/baton.v1.SessionManager/ClientSession"), Access::Mesh);
        assert_eq!(access_for("/baton.internal.v1.Replication/Replicate"), Access::Mesh);
    }

    #[tokio::test]
    async fn the_manager_takes_the_mesh_token_when_one_is_set() {
        let path = "/baton.v1.SessionManager/Status";
        let headers = |value: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::AUTHORIZATION, value.parse().unwrap());
            h
        };
        let open = AuthConfig::default();
        assert_eq!(open.authenticate(path, &http::HeaderMap::new()).await.unwrap(), None);
        let guarded = AuthConfig { mesh_token: Some("s3cret".into()), ..AuthConfig::default() };
        assert_eq!(guarded.authenticate(path, &headers("Bearer s3cret")).await.unwrap(), Some(Principal::Mesh));
        for (sent, why) in [
            (None, "missing authorization header"),
            (Some("Bearer wrong"), "invalid mesh token"),
            (Some("s3cret"), "must be `Bearer <key>`"),
        ] {
            let sent = sent.map(headers).unwrap_or_default();
            let status = guarded.authenticate(path, &sent).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
            assert!(status.message().contains(why), "{}", status.message());
        }
        // the mesh token opens the manager only
        let status = guarded.authenticate("/baton.v1.Admin/CreateOrg", &headers("Bearer s3cret")).await.unwrap_err();
        assert_eq!(status.message(), "the admin API is disabled: no admin token is configured");
    }

    #[test]
    fn secrets_compare_exactly() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }
}
