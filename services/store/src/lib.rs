//! baton's data layer: orgs, API keys, object schemas, records and the per-org change log, on
//! SQLite (the embedded default) or PostgreSQL (for several replicas), through one API.
//!
//! Every query is scoped by org. Every change to a record writes its change event in the same
//! transaction, with a per-org sequence number allocated under the org's write lock (the `orgs` row:
//! a row lock on PostgreSQL, the database write lock on SQLite), so that seqs are dense and
//! commit-ordered: a reader that has seen seq N has seen every seq below it.
//!
//! Both backends go through sqlx's `Any` driver with SQL written once where the dialects agree
//! (`$n` placeholders work on both) and per backend where they do not (JSON access, `::jsonb`).
//! On SQLite, writes go through a pool of one connection: SQLite has one writer anyway, and a
//! single in-process writer never meets `SQLITE_BUSY` from its own process.

/// `as_str` and `parse` of an enum stored by name, from one list of variants and their names:
/// `stored_names!(ChunkState, "chunk state" { Pending => "PENDING", … })`. A name not in the
/// list is corrupt data ([`Error::Corrupt`] naming `what`). A macro rather than a derive crate:
/// it is the only string mapping the store needs, and it stays readable where it is used.
macro_rules! stored_names {
    ($ty:ident, $what:literal { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The stored name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name,)+
                }
            }

            /// The value stored as `s`.
            pub(crate) fn parse(s: &str) -> Result<Self, crate::Error> {
                match s {
                    $($name => Ok($ty::$variant),)+
                    other => Err(crate::Error::Corrupt(format!("{} {other:?}", $what))),
                }
            }
        }
    };
}

pub mod admin;
pub mod batches;
pub mod blobs;
pub mod changes;
pub mod completions;
pub mod exports;
pub mod filter;
mod migrations;
pub mod model;
mod records;
mod release;
pub mod schema;
pub mod sync;
pub mod testing;
mod writer;

use std::borrow::Cow;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Executor};

pub use schema::FieldError;

/// Which database a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite, bundled: one file, one writer.
    Sqlite,
    /// PostgreSQL: several replicas may share it.
    Postgres,
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The named thing does not exist in the caller's org.
    #[error("{0} not found")]
    NotFound(NotFound),
    /// The named thing exists already.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The request is invalid; every problem is listed.
    #[error("invalid request: {}", .0.first().map(|e| format!("{}: {}", e.field, e.description)).unwrap_or_default())]
    Invalid(Vec<FieldError>),
    /// A schema change that is not compatible with the object's current version; every problem
    /// is listed, and nothing was changed.
    #[error("incompatible change of object {object}'s schema (version {version}): {}", .problems.first().map(|e| format!("{}: {}", e.field, e.description)).unwrap_or_default())]
    Incompatible {
        /// The object.
        object: String,
        /// Its current version, which stays.
        version: i64,
        /// Every incompatible difference, at its path in the requested schema.
        problems: Vec<FieldError>,
    },
    /// The work did not finish before its deadline; its transaction was rolled back.
    #[error("deadline of {limit:?} exceeded after {elapsed:?}; nothing was committed")]
    DeadlineExceeded {
        /// The deadline the work had.
        limit: Duration,
        /// How long it ran.
        elapsed: Duration,
    },
    /// The database is busy (lock timeout, SQLITE_BUSY, serialization failure, too many
    /// connections): retrying later can succeed.
    #[error("database busy: {0}")]
    Busy(#[source] sqlx::Error),
    /// The database hit a resource limit (statement timeout, out of memory or disk).
    #[error("database resource limit: {0}")]
    Resource(#[source] sqlx::Error),
    /// The database cannot be reached: a connection lost or refused, the server restarting or
    /// shutting down, a failover. Nothing of the call committed, and retrying later can succeed.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// Any other database failure.
    #[error("database: {0}")]
    Database(#[source] sqlx::Error),
    /// The schema migrations failed.
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The store URL is not usable.
    #[error("invalid store url {url:?}: {reason}")]
    Url {
        /// The URL given.
        url: String,
        /// Why it is not usable.
        reason: String,
    },
    /// The change log no longer holds every change after `after_seq`: it was trimmed (retention)
    /// up to `trimmed`.
    #[error("changes up to seq {trimmed} were trimmed (retention); the changes after seq {after_seq} are not all kept")]
    Trimmed {
        /// The seq asked to continue after.
        after_seq: i64,
        /// The seq the log is trimmed up to.
        trimmed: i64,
    },
    /// Stored data could not be decoded (a bug or a corrupted database).
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// The blob store failed.
    #[error("blob store: {0}")]
    Blob(String),
    /// The named thing existed but is past its retention: it answers NOT_FOUND, saying so.
    #[error("{0} has expired")]
    Expired(String),
}

impl Error {
    /// [`Error::NotFound`] of a `missing` thing described by `what` (`object "account"`).
    pub(crate) fn not_found(missing: Missing, what: impl Into<String>) -> Self {
        Error::NotFound(NotFound { missing, what: what.into() })
    }
}

/// What was not found, and its description for the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotFound {
    /// The kind of thing, which clients tell apart by its ErrorInfo reason.
    pub missing: Missing,
    /// The thing, as the message names it (`object "account"`).
    pub what: String,
}

impl std::fmt::Display for NotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.what)
    }
}

/// The kinds of things the store can answer "not found" for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// An org.
    Org,
    /// An API key.
    ApiKey,
    /// An object (schema) of the org.
    Object,
    /// A record of an object.
    Record,
    /// A batch.
    Batch,
    /// A chunk of a batch.
    Chunk,
    /// An export (an unknown token; an expired one is [`Error::Expired`]).
    Export,
    /// A part of an export.
    Part,
    /// A sync link.
    Link,
}

/// Now, in milliseconds since the Unix epoch: the time of every stored timestamp. The mesh has the
/// same one-liner; the store keeps its own rather than depend on the mesh (and so on tonic).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Sorts a database error into busy (workload), resource, or other.
pub(crate) fn classify(e: sqlx::Error) -> Error {
    match &e {
        sqlx::Error::PoolTimedOut => Error::Busy(e),
        // the connection itself failed: refused, reset, closed by a restarting server
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
            Error::Unavailable(e)
        }
        sqlx::Error::Database(db) => {
            let code = db.code().map(Cow::into_owned).unwrap_or_default();
            match code.as_str() {
                // SQLite: BUSY, LOCKED and their extended codes (primary code in the low byte).
                c if c.parse::<i32>().is_ok_and(|n| matches!(n & 0xff, 5 | 6)) => Error::Busy(e),
                // SQLite: NOMEM, FULL, TOOBIG.
                c if c.parse::<i32>().is_ok_and(|n| matches!(n & 0xff, 7 | 13 | 18)) => Error::Resource(e),
                // PostgreSQL: serialization failure, deadlock, lock not available, too many connections.
                "40001" | "40P01" | "55P03" | "53300" => Error::Busy(e),
                // PostgreSQL: statement timeout / cancel, out of memory, disk full, program limit.
                "57014" | "53200" | "53100" | "54000" => Error::Resource(e),
                // PostgreSQL: connection exceptions (class 08), administrator or crash shutdown,
                // cannot connect now (starting up, recovering), a read-only standby after a
                // failover.
                c if c.starts_with("08") => Error::Unavailable(e),
                "57P01" | "57P02" | "57P03" | "25006" => Error::Unavailable(e),
                _ => Error::Database(e),
            }
        }
        _ => Error::Database(e),
    }
}

impl Error {
    /// A store call given up after `limit` without an answer, as busy (retried like a lock wait):
    /// the connection it ran on is dropped with it.
    pub fn unanswered(limit: Duration) -> Self {
        Error::Busy(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer from the database within {limit:?}"),
        )))
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        classify(e)
    }
}

/// How to open a store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// `sqlite://path/to/file.db` or `postgres://user:pass@host/db`.
    pub url: String,
    /// Connections in the pool (readers on SQLite).
    pub max_connections: u32,
    /// How long a SQLite statement waits for a lock held by another process.
    pub busy_timeout: Duration,
    /// How long a watcher of a batch's or an export's progress ([`Store::progress_watch`])
    /// waits for a commit to be announced before it reads anyway: the fallback for what no
    /// announcement tells of (another process writing the same SQLite file, a notification lost
    /// with its connection).
    pub watch_poll: Duration,
}

impl StoreOptions {
    /// Options with default pool sizes for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_connections: 16,
            busy_timeout: Duration::from_secs(5),
            watch_poll: DEFAULT_WATCH_POLL,
        }
    }
}

/// The default of [`StoreOptions::watch_poll`].
pub const DEFAULT_WATCH_POLL: Duration = Duration::from_secs(1);

/// The store: a handle to pools on one database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    backend: Backend,
    /// Writes. On SQLite a pool of one connection; on PostgreSQL the same pool as `reader`.
    writer: AnyPool,
    /// Reads.
    reader: AnyPool,
    /// On SQLite, the task that checkpoints the WAL off the writer's thread; it ends when the
    /// last clone of the store is dropped.
    _checkpoints: Option<std::sync::Arc<Checkpointer>>,
    /// The last probe of whether PostgreSQL takes connections (see `Store::by_deadline`): when,
    /// and what it found. Requests whose deadlines pass together share one probe a second.
    reachability: std::sync::Arc<tokio::sync::Mutex<Option<(tokio::time::Instant, bool)>>>,
    /// The commits announced to the change log's followers ([`Store::changes_watch`]) and to
    /// the watchers of progress ([`Store::progress_watch`]).
    changes: std::sync::Arc<changes::Changes>,
    /// [`StoreOptions::watch_poll`].
    watch_poll: Duration,
    /// The time of every timestamp this store writes or compares: release times, rates, leases,
    /// expiries.
    clock: Clock,
}

/// The store's clock: the system's wall clock, which only tests move forward
/// ([`testing::TestStore::advance_clock`]), to reach release times, rates, leases and expiries
/// without waiting for them. Shared by the clones of a store.
#[derive(Debug, Clone, Default)]
struct Clock {
    offset_ms: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl Clock {
    fn now_ms(&self) -> i64 {
        now_ms() + self.offset_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn advance(&self, by: Duration) {
        self.offset_ms.fetch_add(by.as_millis() as i64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The page cache of the SQLite writer connection, in KiB. SQLite's default (2 MiB) did not
/// hold the pages a batch chunk's writes touch again and again (the b-trees' inner pages and
/// right edges, the WAL's recent pages), so the writer read them back from the file system.
const WRITER_CACHE_KIB: u32 = 64 * 1024;

/// The page cache of each SQLite reader connection, in KiB: SQLite's default.
const READER_CACHE_KIB: u32 = 2 * 1024;

/// WAL pages after which the SQLite writer checkpoints itself. The [`Checkpointer`] copies the
/// WAL into the database file on a reader connection (another thread, so another core), but its
/// passive checkpoints lag the writer by the transaction being written, and SQLite restarts the
/// WAL from its beginning only when a checkpoint has copied every frame: the writer's own
/// checkpoint, with little left to copy, bounds the WAL (16 MiB of 4 KiB pages).
/// `scripts/bench.sh batch` on SQLite, A/B of three runs each: 187k, 188k and 188k records/s
/// against 171k, 179k and 179k with SQLite's own checkpoints on the writer every 1,000 pages.
const WRITER_AUTOCHECKPOINT_PAGES: u32 = 4_096;

/// WAL pages after which a reader connection checkpoints (SQLite's default; readers commit
/// only the odd write of their own).
const READER_AUTOCHECKPOINT_PAGES: u32 = 1_000;

/// How often the [`Checkpointer`] runs while there are frames to copy, and while there are none.
const CHECKPOINT_BUSY: Duration = Duration::from_millis(50);
const CHECKPOINT_IDLE: Duration = Duration::from_millis(500);

/// Checkpoints a SQLite WAL (`PRAGMA wal_checkpoint(PASSIVE)`) on a reader connection, so that
/// copying pages into the database file and its fsyncs leave the single writer's thread, which
/// bounds write throughput. Aborted when dropped.
#[derive(Debug)]
struct Checkpointer(tokio::task::JoinHandle<()>);

impl Checkpointer {
    fn spawn(reader: AnyPool) -> Self {
        Self(tokio::spawn(async move {
            let (mut wait, mut last_frames) = (CHECKPOINT_IDLE, 0);
            loop {
                tokio::time::sleep(wait).await;
                if reader.is_closed() {
                    return;
                }
                // (busy, frames in the WAL, frames copied); busy when another checkpoint runs
                match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(&reader).await {
                    // the WAL changed since the last run: the writer is at work
                    Ok((_, frames, _)) => {
                        wait = if frames != last_frames { CHECKPOINT_BUSY } else { CHECKPOINT_IDLE };
                        last_frames = frames;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "WAL checkpoint");
                        wait = CHECKPOINT_IDLE;
                    }
                }
            }
        }))
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Store {
    /// Now by the store's clock, in milliseconds since the Unix epoch.
    pub(crate) fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Opens (creating a SQLite file if needed) and migrates a store.
    pub async fn open(options: &StoreOptions) -> Result<Self, Error> {
        let store = Self::open_unmigrated(options).await?;
        // sqlx locks migrations on PostgreSQL (an advisory lock) but not on SQLite: processes
        // started together on a new file (a worker and a scheduler) would both run a migration,
        // and the second fail ("duplicate column name"). A lock on a file beside the database
        // makes the others wait, then find everything applied.
        let _migrating = match migrations::sqlite_path(&options.url) {
            Some(path) => Some(migrations::lock(&options.url, path).await?),
            None => None,
        };
        store.migrate(None).await?;
        Ok(store)
    }

    /// Opens a store's pools, running no migration.
    pub(crate) async fn open_unmigrated(options: &StoreOptions) -> Result<Self, Error> {
        install_default_drivers();
        let url = options.url.as_str();
        if let Some(path) = migrations::sqlite_path(url) {
            Self::open_sqlite(options, path).await
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Self::open_postgres(options).await
        } else {
            Err(Error::Url {
                url: redact(url),
                reason: "expected sqlite://PATH or postgres://USER:PASSWORD@HOST/DB".into(),
            })
        }
    }

    /// Opens a store on the SQLite file at `path` (`options.url` without its scheme; options
    /// after a `?` are ignored), creating the file and its directory if needed: a writer pool of
    /// one connection, a reader pool, and the [`Checkpointer`].
    async fn open_sqlite(options: &StoreOptions, path: &str) -> Result<Self, Error> {
        let url = options.url.as_str();
        if path.is_empty() {
            return Err(Error::Url { url: url.to_owned(), reason: "no file path".into() });
        }
        if path == ":memory:" {
            return Err(Error::Url {
                url: url.to_owned(),
                reason: "in-memory SQLite is not supported; give a file".into(),
            });
        }
        if let Some(dir) = std::path::Path::new(path).parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::Url {
                url: url.to_owned(),
                reason: format!("cannot create {}: {e}", dir.display()),
            })?;
        }
        let full = format!("sqlite://{path}?mode=rwc");
        let busy_ms = options.busy_timeout.as_millis();
        let writer = Self::sqlite_pool(&full, busy_ms, 1, WRITER_CACHE_KIB, WRITER_AUTOCHECKPOINT_PAGES)
            .await
            .map_err(|e| Error::Url { url: url.to_owned(), reason: e.to_string() })?;
        let max = options.max_connections.max(1);
        let reader = Self::sqlite_pool(&full, busy_ms, max, READER_CACHE_KIB, READER_AUTOCHECKPOINT_PAGES)
            .await
            .map_err(|e| Error::Url { url: url.to_owned(), reason: e.to_string() })?;
        let checkpoints = Some(std::sync::Arc::new(Checkpointer::spawn(reader.clone())));
        Ok(Store {
            backend: Backend::Sqlite,
            writer,
            reader,
            _checkpoints: checkpoints,
            reachability: Default::default(),
            changes: changes::Changes::new(None),
            watch_poll: options.watch_poll,
            clock: Clock::default(),
        })
    }

    /// A pool of at most `max` connections to the SQLite file `full`, each set up with WAL,
    /// `busy_ms`, its page cache (`cache_kib`) and its WAL autocheckpoint (in pages).
    async fn sqlite_pool(
        full: &str,
        busy_ms: u128,
        max: u32,
        cache_kib: u32,
        autocheckpoint: u32,
    ) -> Result<AnyPool, sqlx::Error> {
        AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    conn.execute(
                        format!(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                             PRAGMA busy_timeout = {busy_ms}; PRAGMA foreign_keys = ON; \
                             PRAGMA cache_size = -{cache_kib}; PRAGMA wal_autocheckpoint = {autocheckpoint};"
                        )
                        .as_str(),
                    )
                    .await?;
                    Ok(())
                })
            })
            .connect_with(connect_options(full)?)
            .await
    }

    /// Opens a store on PostgreSQL at `options.url`: one pool for reads and writes.
    async fn open_postgres(options: &StoreOptions) -> Result<Self, Error> {
        let url = options.url.as_str();
        let pool = AnyPoolOptions::new()
            .max_connections(options.max_connections.max(2))
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    // Statements are prepared once per connection, and after five runs
                    // PostgreSQL may switch to a generic plan, which for `id IN ($3, …)` over
                    // a large org scans the org's whole index range: a 400-id version lookup
                    // took 230 ms at 40,000 records (log_min_duration_statement), growing with
                    // the table. Custom plans keep every lookup on the index.
                    conn.execute("SET plan_cache_mode = force_custom_plan").await?;
                    // A transaction whose future was dropped (a deadline, a budget) is rolled
                    // back only when its connection is next used, and until then holds its row
                    // locks: a chunk abandoned at its budget can keep the chunk's row locked,
                    // and then every later attempt at it waits on the lock (the worker gives a
                    // store call 30 s). The server ends such a session instead: no transaction
                    // of baton's sits idle between its statements for this long.
                    conn.execute("SET idle_in_transaction_session_timeout = '5s'").await?;
                    Ok(())
                })
            })
            .connect_with(connect_options(url).map_err(|e| Error::Url { url: redact(url), reason: e.to_string() })?)
            .await
            .map_err(|e| Error::Url { url: redact(url), reason: e.to_string() })?;
        Ok(Store {
            backend: Backend::Postgres,
            writer: pool.clone(),
            reader: pool,
            _checkpoints: None,
            reachability: Default::default(),
            changes: changes::Changes::new(Some(url.to_owned())),
            watch_poll: options.watch_poll,
            clock: Clock::default(),
        })
    }

    /// A follower's watch of `org_id`'s change log: [`changes::ChangeWatch::wait`] returns when
    /// a commit after the follower's cursor is announced (by this process, or on PostgreSQL by
    /// any), or after a fallback interval. Only a hint: the follower reads the log from its cursor
    /// either way (see [`changes`]).
    pub fn changes_watch(&self, org_id: &str) -> changes::ChangeWatch {
        self.changes.watch(org_id)
    }

    /// Announces a commit that left `org_id`'s last seq at `seq`; called after the commit.
    pub(crate) fn committed(&self, org_id: &str, seq: i64) {
        self.changes.committed(org_id, seq);
    }

    /// A watch of a batch's or an export's progress: [`changes::ProgressWatch::wait`] returns
    /// when a commit that changed it is announced (by this process, or on PostgreSQL by any), or
    /// after [`StoreOptions::watch_poll`]. Make it before the first read: only a hint, the
    /// watcher reads its batch or export either way (see [`changes`]).
    pub fn progress_watch(&self, topic: changes::Topic<'_>) -> changes::ProgressWatch {
        self.changes.progress_watch(topic, self.watch_poll)
    }

    /// Announces a commit that changed `topic`'s progress; called after the commit.
    pub(crate) fn touched(&self, topic: changes::Topic<'_>) {
        self.changes.touched(topic);
    }

    /// The backend this store runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes the pools.
    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }

    /// A JSON column read as text.
    pub(crate) fn json_column(&self, column: &str) -> String {
        match self.backend {
            Backend::Sqlite => column.to_owned(),
            Backend::Postgres => format!("{column}::text"),
        }
    }
}

/// How long a statement runs before sqlx logs it as slow (a warning). Not sqlx's default of
/// 1 s: a batch chunk waits on its org's write lock while the org's other chunks write, seconds
/// under load by design, and each such wait was a warning.
const SLOW_STATEMENT: Duration = Duration::from_secs(10);

/// The connection options of `url`, with the slow-statement threshold.
fn connect_options(url: &str) -> Result<sqlx::any::AnyConnectOptions, sqlx::Error> {
    use sqlx::ConnectOptions;
    let options: sqlx::any::AnyConnectOptions = url.parse()?;
    Ok(options.log_slow_statements(log::LevelFilter::Warn, SLOW_STATEMENT))
}

/// Hides the password of a URL for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..scheme + 3], &creds[..colon], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// A random id: `prefix` and 16 hex digits.
pub(crate) fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", hex::encode(rand::random::<[u8; 8]>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://baton:secret@127.0.0.1/db"), "postgres://baton:***@127.0.0.1/db");
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
    }

    #[test]
    fn stored_names_round_trip_and_an_unknown_name_is_corrupt() {
        fn round_trip<T: Copy + PartialEq + std::fmt::Debug>(
            all: &[T],
            as_str: fn(T) -> &'static str,
            parse: fn(&str) -> Result<T, Error>,
        ) {
            let names: std::collections::HashSet<&str> = all.iter().map(|v| as_str(*v)).collect();
            assert_eq!(names.len(), all.len(), "distinct names: {all:?}");
            for v in all {
                assert_eq!(parse(as_str(*v)).unwrap(), *v);
            }
        }
        use batches::{BatchOp, ChunkState, PartState};
        use completions::{DeliveryState, Kind};
        use exports::{ExportReason, ExportState};
        use sync::{LinkState, RejectPolicy, TrimmedPolicy};
        round_trip(ChunkState::ALL, ChunkState::as_str, ChunkState::parse);
        round_trip(BatchOp::ALL, BatchOp::as_str, BatchOp::parse);
        round_trip(PartState::ALL, PartState::as_str, PartState::parse);
        round_trip(ExportState::ALL, ExportState::as_str, ExportState::parse);
        round_trip(ExportReason::ALL, ExportReason::as_str, ExportReason::parse);
        round_trip(Kind::ALL, Kind::as_str, Kind::parse);
        round_trip(DeliveryState::ALL, DeliveryState::as_str, DeliveryState::parse);
        round_trip(LinkState::ALL, LinkState::as_str, LinkState::parse);
        round_trip(RejectPolicy::ALL, RejectPolicy::as_str, RejectPolicy::parse);
        round_trip(TrimmedPolicy::ALL, TrimmedPolicy::as_str, TrimmedPolicy::parse);
        assert_eq!((ChunkState::ALL.len(), LinkState::ALL.len()), (8, 6));
        // the names stored before the macro, kept
        assert_eq!(ChunkState::Aborted.as_str(), "ABORTED");
        assert_eq!(LinkState::Bootstrapping.as_str(), "BOOTSTRAPPING");
        assert_eq!(RejectPolicy::DeadLetter.as_str(), "DEAD_LETTER");
        assert_eq!(TrimmedPolicy::Rebootstrap.as_str(), "REBOOTSTRAP");
        match ChunkState::parse("aborted") {
            Err(Error::Corrupt(text)) => assert_eq!(text, r#"chunk state "aborted""#),
            other => panic!("{other:?}"),
        }
        match LinkState::parse("") {
            Err(Error::Corrupt(text)) => assert_eq!(text, r#"link state """#),
            other => panic!("{other:?}"),
        }
    }
}
