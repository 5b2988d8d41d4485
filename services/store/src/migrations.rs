//! The schema migrations: embedded per backend (`migrations/{sqlite,postgres}`), run in order by
//! sqlx, under a lock ([`lock`] on SQLite, where sqlx takes none).

use std::borrow::Cow;

use futures::future::BoxFuture;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};

use crate::{Backend, Error, Store, redact};

/// Migrations embedded in the binary, per backend.
#[derive(Debug)]
struct Embedded(Backend);

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(self) -> BoxFuture<'s, Result<Vec<Migration>, sqlx::error::BoxDynError>> {
        let sources: [(i64, &'static str, &'static str); 13] = match self.0 {
            Backend::Sqlite => [
                (1, "init", include_str!("../migrations/sqlite/0001_init.sql")),
                (2, "sync", include_str!("../migrations/sqlite/0002_sync.sql")),
                (3, "batches", include_str!("../migrations/sqlite/0003_batches.sql")),
                (4, "exports", include_str!("../migrations/sqlite/0004_exports.sql")),
                (5, "overload", include_str!("../migrations/sqlite/0005_overload.sql")),
                (6, "chunk_records", include_str!("../migrations/sqlite/0006_chunk_records.sql")),
                (7, "schema_versions", include_str!("../migrations/sqlite/0007_schema_versions.sql")),
                (8, "lists", include_str!("../migrations/sqlite/0008_lists.sql")),
                (9, "link_on_trimmed", include_str!("../migrations/sqlite/0009_link_on_trimmed.sql")),
                (10, "link_target_ca", include_str!("../migrations/sqlite/0010_link_target_ca.sql")),
                (11, "chunk_parts", include_str!("../migrations/sqlite/0011_chunk_parts.sql")),
                (12, "completions", include_str!("../migrations/sqlite/0012_completions.sql")),
                (14, "traceparent", include_str!("../migrations/sqlite/0014_traceparent.sql")),
            ],
            Backend::Postgres => [
                (1, "init", include_str!("../migrations/postgres/0001_init.sql")),
                (2, "sync", include_str!("../migrations/postgres/0002_sync.sql")),
                (3, "batches", include_str!("../migrations/postgres/0003_batches.sql")),
                (4, "exports", include_str!("../migrations/postgres/0004_exports.sql")),
                (5, "overload", include_str!("../migrations/postgres/0005_overload.sql")),
                (6, "chunk_records", include_str!("../migrations/postgres/0006_chunk_records.sql")),
                (7, "schema_versions", include_str!("../migrations/postgres/0007_schema_versions.sql")),
                (8, "lists", include_str!("../migrations/postgres/0008_lists.sql")),
                (9, "link_on_trimmed", include_str!("../migrations/postgres/0009_link_on_trimmed.sql")),
                (10, "link_target_ca", include_str!("../migrations/postgres/0010_link_target_ca.sql")),
                (11, "chunk_parts", include_str!("../migrations/postgres/0011_chunk_parts.sql")),
                (12, "completions", include_str!("../migrations/postgres/0012_completions.sql")),
                (14, "traceparent", include_str!("../migrations/postgres/0014_traceparent.sql")),
            ],
        };
        Box::pin(async move {
            Ok(sources
                .into_iter()
                .map(|(version, name, sql)| {
                    Migration::new(version, Cow::Borrowed(name), MigrationType::Simple, Cow::Borrowed(sql), false)
                })
                .collect())
        })
    }
}

/// The file path of a SQLite store URL (`sqlite://PATH` or `sqlite:PATH`, options after a `?`
/// left out); None for another backend.
pub(crate) fn sqlite_path(url: &str) -> Option<&str> {
    let path = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    Some(path.split('?').next().unwrap_or_default())
}

/// Takes the migration lock of the SQLite database at `path` (`PATH.migrate-lock`, an exclusive
/// lock on the open file, given up when the file is closed), waiting for another process that
/// holds it.
pub(crate) async fn lock(url: &str, path: &str) -> Result<std::fs::File, Error> {
    let lock_path = format!("{path}.migrate-lock");
    let cannot = |e: std::io::Error| Error::Url { url: redact(url), reason: format!("cannot lock {lock_path}: {e}") };
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(cannot)?;
    tokio::task::spawn_blocking(move || file.lock().map(|()| file))
        .await
        .map_err(|e| Error::Corrupt(format!("the migration lock task failed: {e}")))?
        .map_err(cannot)
}

impl Store {
    /// Runs the embedded migrations not yet run, up to `version` (all when None).
    pub(crate) async fn migrate(&self, version: Option<i64>) -> Result<(), Error> {
        let mut migrator = Migrator::new(Embedded(self.backend)).await?;
        if let Some(version) = version {
            migrator.migrations = migrator.migrations.iter().filter(|m| m.version <= version).cloned().collect();
        }
        migrator.run(&self.writer).await?;
        Ok(())
    }
}
