//! Pushed changes: followers of an org's change log (Extract, links) are woken by the store when
//! a write commits, instead of polling the log; so are watchers of a batch's or an export's
//! progress (WatchBatch, WatchExport), through [`Topic`]s.
//!
//! Every writer that moves an org's last seq calls [`Changes::committed`] after its commit. That
//! sets the org's hint, a `tokio::sync::watch` of the latest seq known to be committed, which
//! wakes the followers of this process at once. On PostgreSQL it also queues the seq for the
//! notifier task, which sends `pg_notify('baton_changes', 'ORG SEQ')` on a connection of its own,
//! after the commit and off the writer's path (at most one statement every 5 ms, carrying the
//! latest seq of each org committed meanwhile); every store of every process LISTENs on that channel (a connection
//! opened with the first follower) and sets the same hints.
//!
//! A hint is only a hint: a follower always reads the log from its own cursor, so a duplicate or
//! late notification costs one empty read, and a missed one (another process writing a SQLite
//! file, a writer killed between its commit and its notification, a LISTEN connection lost and
//! opened again) is found by the follower's fallback poll. A lost LISTEN connection also wakes
//! every follower once it listens again, since anything may have been committed meanwhile.
//!
//! Progress goes the same way with a generation counter instead of a seq: every write that
//! changes what a watcher of a batch or an export is shown calls [`Changes::touched`] with its
//! [`Topic`] after its commit; watchers in this process are woken at once, and on PostgreSQL the
//! notifier sends the topic on [`PROGRESS_CHANNEL`] in its next statement (workers, which commit
//! chunk outcomes and export parts, usually run in other processes than the API that watches).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgConnection, PgListener};
use tokio::sync::{mpsc, watch};

/// The PostgreSQL notification channel; a payload is `ORG SEQ`.
pub const CHANNEL: &str = "baton_changes";

/// The PostgreSQL channel of progress; a payload is the sending store's origin (see
/// [`Changes::origin`]) and a [`Topic`]'s key: `ORIGIN batch ID`, `ORIGIN export ID`.
pub const PROGRESS_CHANNEL: &str = "baton_progress";

/// What a watcher of progress follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic<'a> {
    /// A batch and its chunks (WatchBatch), by batch id.
    Batch(&'a str),
    /// An export and its parts (WatchExport, FetchPart of a part not yet produced), by export id.
    Export(&'a str),
}

impl Topic<'_> {
    /// The topic as a map key and a notification payload.
    fn key(self) -> String {
        match self {
            Topic::Batch(id) => format!("batch {id}"),
            Topic::Export(id) => format!("export {id}"),
        }
    }
}

/// What the notifier sends.
#[derive(Debug)]
enum Note {
    /// An org's last seq after a commit ([`CHANNEL`]).
    Seq(String, i64),
    /// A topic's progress committed: the payload ([`PROGRESS_CHANNEL`]).
    Progress(String),
}

/// What a follower is told: the latest seq known committed, and how many times every follower
/// was asked to read again whatever the seq (a notification may have been missed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Hint {
    seq: i64,
    kicks: u64,
}

/// The hints of one store and its clones.
#[derive(Debug)]
pub(crate) struct Changes {
    /// The hint of each org that has followers in this process.
    orgs: Mutex<HashMap<String, watch::Sender<Hint>>>,
    /// Every org's hints are kicked this many times (a new hint starts there).
    kicks: Mutex<u64>,
    /// The generation of each topic that has watchers in this process: how many commits of its
    /// progress were announced since its first watcher.
    progress: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// PostgreSQL only.
    postgres: Option<Postgres>,
    /// A random name of this store in the progress it notifies: its own notifications come back
    /// to its listener, and its watchers were woken already.
    origin: String,
}

#[derive(Debug)]
struct Postgres {
    url: String,
    /// The notifier task's queue, started with the first commit.
    outbox: OnceLock<mpsc::UnboundedSender<Note>>,
    /// The listener task, started with the first follower; it ends when this is dropped.
    listening: OnceLock<watch::Sender<()>>,
}

impl Changes {
    /// Hints for a SQLite store (None) or a PostgreSQL one at `postgres_url`.
    pub(crate) fn new(postgres_url: Option<String>) -> Arc<Self> {
        Arc::new(Self {
            orgs: Mutex::new(HashMap::new()),
            kicks: Mutex::new(0),
            progress: Mutex::new(HashMap::new()),
            origin: hex::encode(rand::random::<[u8; 6]>()),
            postgres: postgres_url.map(|url| Postgres { url, outbox: OnceLock::new(), listening: OnceLock::new() }),
        })
    }

    /// A write of `org` committed with `seq` as the org's last seq: wakes its followers here and
    /// (PostgreSQL) tells every other process. Call only after the commit.
    pub(crate) fn committed(&self, org: &str, seq: i64) {
        self.hint(org, seq);
        self.notify(|| Note::Seq(org.to_owned(), seq));
    }

    /// A write that changed `topic`'s progress committed: wakes its watchers here and
    /// (PostgreSQL) tells every other process. Call only after the commit.
    pub(crate) fn touched(&self, topic: Topic<'_>) {
        let key = topic.key();
        self.bump(&key);
        self.notify(|| Note::Progress(format!("{} {key}", self.origin)));
    }

    /// PostgreSQL: queues a notification for the notifier task (started with the first).
    fn notify(&self, note: impl FnOnce() -> Note) {
        if let Some(pg) = &self.postgres {
            let outbox = pg.outbox.get_or_init(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(notifier(pg.url.clone(), rx));
                tx
            });
            let _ = outbox.send(note());
        }
    }

    /// Wakes the watchers of the topic `key` in this process, if it has any.
    fn bump(&self, key: &str) {
        let progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(generation) = progress.get(key) {
            generation.send_modify(|g| *g += 1);
        }
    }

    /// Sets `org`'s hint to `seq` if that is newer, waking its followers.
    fn hint(&self, org: &str, seq: i64) {
        let orgs = self.orgs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hint) = orgs.get(org) {
            hint.send_if_modified(|h| {
                let newer = seq > h.seq;
                h.seq = h.seq.max(seq);
                newer
            });
        }
    }

    /// Wakes every follower: something may have been committed unseen.
    fn kick_all(&self) {
        let mut kicks = self.kicks.lock().unwrap_or_else(|e| e.into_inner());
        *kicks += 1;
        let orgs = self.orgs.lock().unwrap_or_else(|e| e.into_inner());
        for hint in orgs.values() {
            hint.send_modify(|h| h.kicks += 1);
        }
        drop(orgs);
        let progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        for generation in progress.values() {
            generation.send_modify(|g| *g += 1);
        }
    }

    /// PostgreSQL: the listener task, started with the first follower or watcher.
    fn listen(self: &Arc<Self>) {
        if let Some(pg) = &self.postgres {
            pg.listening.get_or_init(|| {
                let (alive, dropped) = watch::channel(());
                tokio::spawn(listen(pg.url.clone(), Arc::downgrade(self), dropped));
                alive
            });
        }
    }

    /// A watch of `topic`'s progress, waiting at most `fallback` for an announcement.
    pub(crate) fn progress_watch(self: &Arc<Self>, topic: Topic<'_>, fallback: Duration) -> ProgressWatch {
        self.listen();
        let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        progress.retain(|_, generation| generation.receiver_count() > 0);
        let rx = progress.entry(topic.key()).or_insert_with(|| watch::channel(0).0).subscribe();
        ProgressWatch { rx, fallback }
    }

    /// A follower's watch of `org`.
    pub(crate) fn watch(self: &Arc<Self>, org: &str) -> ChangeWatch {
        self.listen();
        let kicks = *self.kicks.lock().unwrap_or_else(|e| e.into_inner());
        let mut orgs = self.orgs.lock().unwrap_or_else(|e| e.into_inner());
        orgs.retain(|_, hint| hint.receiver_count() > 0);
        let rx = orgs.entry(org.to_owned()).or_insert_with(|| watch::channel(Hint { seq: 0, kicks }).0).subscribe();
        ChangeWatch { rx }
    }
}

/// How a [`ChangeWatch::wait`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// A commit after the cursor was announced (or a notification may have been missed).
    Notified,
    /// The fallback interval passed without one.
    Fallback,
}

/// A follower's view of an org's commits ([`crate::Store::changes_watch`]).
#[derive(Debug)]
pub struct ChangeWatch {
    rx: watch::Receiver<Hint>,
}

impl ChangeWatch {
    /// Waits until a commit with a seq above `after` (the follower's cursor, as of a read of the
    /// log that found nothing more) is announced, or until `fallback` has passed. Either way the
    /// follower reads the log from its cursor next: the announcement is only a hint.
    pub async fn wait(&mut self, after: i64, fallback: Duration) -> Woken {
        let kicks = self.rx.borrow().kicks;
        let woken = tokio::time::timeout(fallback, async {
            self.rx.wait_for(|h| h.seq > after || h.kicks != kicks).await.is_ok()
        })
        .await;
        match woken {
            Ok(true) => Woken::Notified,
            // the store is gone: nothing more will be announced
            Ok(false) => {
                tokio::time::sleep(fallback).await;
                Woken::Fallback
            }
            Err(_) => Woken::Fallback,
        }
    }

    /// The latest seq announced for the org (0 before any).
    pub fn latest(&self) -> i64 {
        self.rx.borrow().seq
    }
}

/// A watcher's view of the commits of a batch's or an export's progress
/// ([`crate::Store::progress_watch`]).
///
/// Made before the watcher's first read, it holds every announcement after that: the watcher
/// reads, answers what changed, then [`ProgressWatch::wait`]s, which returns at once if
/// something was committed since it last returned (or since the watch was made).
#[derive(Debug)]
pub struct ProgressWatch {
    rx: watch::Receiver<u64>,
    fallback: Duration,
}

impl ProgressWatch {
    /// Waits until a commit of the topic's progress is announced after the last return (or the
    /// watch's making), or until the fallback interval has passed. Either way the watcher reads
    /// its batch or export next: the announcement is only a hint.
    pub async fn wait(&mut self) -> Woken {
        let woken = match tokio::time::timeout(self.fallback, self.rx.changed()).await {
            Ok(Ok(())) => Woken::Notified,
            // the store is gone: nothing more will be announced
            Ok(Err(_)) => {
                tokio::time::sleep(self.fallback).await;
                Woken::Fallback
            }
            Err(_) => Woken::Fallback,
        };
        // what was announced up to now is what the next read sees
        self.rx.borrow_and_update();
        woken
    }
}

/// The least time between two notification statements: commits queued meanwhile go in the
/// next one. `scripts/bench.sh intake` on PostgreSQL (1-record upserts, 8 clients, about 600
/// commits/s on 2 cores) lost a third of its rate with a statement per commit.
const NOTIFY_EVERY: Duration = Duration::from_millis(5);
/// How long a failed LISTEN waits before it is tried again (followers fall back to reading the
/// log meanwhile).
const LISTEN_RETRY: Duration = Duration::from_secs(1);

/// Sends the queued commits as notifications, each burst (at most one every [`NOTIFY_EVERY`]) as
/// one statement carrying the latest seq of each org, on a connection of its own with
/// asynchronous commit (a notification needs no durability: a lost one is found by the
/// followers' fallback). Ends with the store.
async fn notifier(url: String, mut queue: mpsc::UnboundedReceiver<Note>) {
    let mut conn: Option<PgConnection> = None;
    let mut next = tokio::time::Instant::now();
    while let Some(note) = queue.recv().await {
        tokio::time::sleep_until(next).await;
        next = tokio::time::Instant::now() + NOTIFY_EVERY;
        let mut latest: HashMap<String, i64> = HashMap::new();
        let mut topics: HashSet<String> = HashSet::new();
        let mut add = |note| match note {
            Note::Seq(org, seq) => {
                let at = latest.entry(org).or_insert(seq);
                *at = (*at).max(seq);
            }
            Note::Progress(key) => {
                topics.insert(key);
            }
        };
        add(note);
        while let Ok(note) = queue.try_recv() {
            add(note);
        }
        let mut channels = Vec::with_capacity(latest.len() + topics.len());
        let mut payloads = Vec::with_capacity(latest.len() + topics.len());
        for (org, seq) in latest {
            channels.push(CHANNEL);
            payloads.push(format!("{org} {seq}"));
        }
        for payload in topics {
            channels.push(PROGRESS_CHANNEL);
            payloads.push(payload);
        }
        if conn.is_none() {
            conn = match connect(&url).await {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot connect to notify followers of the change log");
                    None
                }
            };
        }
        let Some(c) = conn.as_mut() else { continue };
        let sent = sqlx::query(
            "SELECT pg_notify(channel, payload) FROM unnest($1::text[], $2::text[]) AS n(channel, payload)",
        )
        .bind(channels)
        .bind(payloads)
        .execute(&mut *c)
        .await;
        if let Err(e) = sent {
            tracing::warn!(error = %e, "cannot notify followers of the change log");
            conn = None;
        }
    }
}

async fn connect(url: &str) -> Result<PgConnection, sqlx::Error> {
    use sqlx::Executor;
    let mut conn = PgConnection::connect(url).await?;
    conn.execute("SET synchronous_commit = off").await?;
    Ok(conn)
}

/// LISTENs for the commits of every process and sets the hints, until the store is dropped. The
/// connection is opened again when lost; once it listens again every follower is woken.
async fn listen(url: String, changes: Weak<Changes>, mut dropped: watch::Receiver<()>) {
    loop {
        let listener = async {
            let mut listener = PgListener::connect(&url).await?;
            listener.listen_all([CHANNEL, PROGRESS_CHANNEL]).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            _ = dropped.changed() => return,
            listener = listener => match listener {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for change log notifications; retrying in 1s");
                    tokio::select! {
                        _ = dropped.changed() => return,
                        () = tokio::time::sleep(LISTEN_RETRY) => continue,
                    }
                }
            },
        };
        // anything committed before the LISTEN took effect was not announced
        match changes.upgrade() {
            Some(c) => c.kick_all(),
            None => return,
        }
        loop {
            let received = tokio::select! {
                _ = dropped.changed() => return,
                received = listener.try_recv() => received,
            };
            let Some(changes) = changes.upgrade() else { return };
            match received {
                Ok(Some(notification)) if notification.channel() == PROGRESS_CHANNEL => {
                    match notification.payload().split_once(' ') {
                        Some((origin, _)) if origin == changes.origin => {}
                        Some((_, key)) => changes.bump(key),
                        None => {}
                    }
                }
                Ok(Some(notification)) => {
                    let parsed =
                        notification.payload().rsplit_once(' ').and_then(|(org, seq)| Some((org, seq.parse().ok()?)));
                    if let Some((org, seq)) = parsed {
                        changes.hint(org, seq);
                    }
                }
                // the connection was lost: connect and listen again (and wake every follower
                // then, since whatever was committed meanwhile was not announced)
                Ok(None) => {
                    tracing::warn!("change log notifications: connection lost; listening again");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "change log notifications failed; listening again");
                    break;
                }
            }
        }
    }
}
