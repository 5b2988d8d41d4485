//! API keys resolved by the store: the mesh's [`KeyResolver`] over a [`Store`], so that neither
//! depends on the other (the mesh authenticates callers; the store keeps only each key's hash).

use baton_mesh::auth::{KeyLookup, KeyResolver};
use baton_store::Store;
use baton_store::admin::{self, hash_key};
use futures::future::BoxFuture;

/// The store as the mesh's API key resolver.
pub struct StoreKeys(pub Store);

impl StoreKeys {
    /// A resolver over `store`, as [`baton_mesh::auth::AuthConfig::keys`] takes it.
    pub fn of(store: &Store) -> std::sync::Arc<dyn KeyResolver> {
        std::sync::Arc::new(StoreKeys(store.clone()))
    }
}

impl KeyResolver for StoreKeys {
    fn resolve(&self, key: String) -> BoxFuture<'_, Result<KeyLookup, String>> {
        Box::pin(async move {
            match self.0.lookup_key(&hash_key(&key)).await {
                Ok(admin::KeyLookup::Org(org)) => Ok(KeyLookup::Org(org)),
                Ok(admin::KeyLookup::Revoked) => Ok(KeyLookup::Revoked),
                Ok(admin::KeyLookup::Unknown) => Ok(KeyLookup::Unknown),
                Err(e) => Err(e.to_string()),
            }
        })
    }
}
