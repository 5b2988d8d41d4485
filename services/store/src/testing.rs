//! Fresh stores for tests: a SQLite file in a new temporary directory, or a new PostgreSQL
//! database on the server named by `BATON_TEST_POSTGRES_URL` (an URL whose user may create
//! databases, for example `postgres://baton:baton@127.0.0.1:5432/postgres`).

use std::path::PathBuf;

use sqlx::Executor;
use sqlx::any::AnyPoolOptions;

use crate::{Backend, Error, Store, StoreOptions};

/// The environment variable naming the PostgreSQL server tests use.
pub const POSTGRES_URL_ENV: &str = "BATON_TEST_POSTGRES_URL";

/// A store for one test, and what to remove afterwards.
#[derive(Debug)]
pub struct TestStore {
    /// The store.
    pub store: Store,
    /// Its URL, for starting a binary on the same database.
    pub url: String,
    dir: Option<PathBuf>,
}

impl TestStore {
    /// Moves the store's clock (shared by its clones) `by` forward: a release time, a rate's
    /// spacing, a lease or an expiry is reached at once, and exactly.
    pub fn advance_clock(&self, by: std::time::Duration) {
        self.store.clock.advance(by);
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The backends tests should run on: SQLite always, PostgreSQL when `BATON_TEST_POSTGRES_URL`
/// is set. With `CI` set and no PostgreSQL URL, this panics: CI must test both.
pub fn backends() -> Vec<Backend> {
    if std::env::var_os(POSTGRES_URL_ENV).is_some() {
        vec![Backend::Sqlite, Backend::Postgres]
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "{POSTGRES_URL_ENV} is not set under CI: scripts/test.sh sets it after starting PostgreSQL"
        );
        eprintln!("note: {POSTGRES_URL_ENV} is not set; testing SQLite only");
        vec![Backend::Sqlite]
    }
}

/// A new, empty database URL for `backend`, and the temporary directory to remove (SQLite).
pub async fn fresh_url(backend: Backend) -> Result<(String, Option<PathBuf>), Error> {
    let name = format!("baton_test_{}", hex::encode(rand::random::<[u8; 6]>()));
    match backend {
        Backend::Sqlite => {
            let dir = std::env::temp_dir().join(&name);
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::Url { url: dir.display().to_string(), reason: e.to_string() })?;
            Ok((format!("sqlite://{}/baton.db", dir.display()), Some(dir)))
        }
        Backend::Postgres => {
            sqlx::any::install_default_drivers();
            let admin_url = std::env::var(POSTGRES_URL_ENV)
                .map_err(|_| Error::Url { url: String::new(), reason: format!("{POSTGRES_URL_ENV} is not set") })?;
            let admin = AnyPoolOptions::new().max_connections(1).connect(&admin_url).await?;
            admin.execute(format!("CREATE DATABASE {name}").as_str()).await?;
            admin.close().await;
            let base = admin_url.rsplit_once('/').map_or(admin_url.as_str(), |(b, _)| b);
            Ok((format!("{base}/{name}"), None))
        }
    }
}

/// Opens a fresh, migrated store on `backend`.
pub async fn open(backend: Backend) -> Result<TestStore, Error> {
    let (url, dir) = fresh_url(backend).await?;
    let store = Store::open(&StoreOptions::new(url.clone())).await?;
    Ok(TestStore { store, url, dir })
}

/// A fresh store on `backend` migrated only up to `version`, as an older release left it, for
/// testing a migration: the raw pool to fill it through, and the URL to open it with (which
/// runs the rest). Drop the [`TestStore`] last; it removes the SQLite directory.
pub async fn open_at(backend: Backend, version: i64) -> Result<TestStore, Error> {
    let (url, dir) = fresh_url(backend).await?;
    let mut options = StoreOptions::new(url.clone());
    options.max_connections = 2;
    let store = Store::open_unmigrated(&options).await?;
    store.migrate(Some(version)).await?;
    Ok(TestStore { store, url, dir })
}
