//! A Jepsen-style history of a manager fault campaign, and its checker.
//!
//! Every process of a campaign (client session processes, server session processes, the driver)
//! appends [`Event`]s as JSON lines to its own file through a [`HistoryWriter`]. Afterwards
//! [`read`] merges the files and [`check`] verifies the guarantees the session manager gives
//! across failovers: no acknowledged request lost or answered twice, terms never going back for a
//! client, one acknowledging manager per term, and server restart data never going stale.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// One thing that happened in a campaign, as one JSON line tagged by `"kind"` (`"sent"`,
/// `"acked"`, ...). `at_ms` is the wall clock of the recording process, in milliseconds since
/// the Unix epoch (see [`now_ms`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// The client library was given request `seq` of `session`.
    Sent {
        /// When, in ms since the Unix epoch.
        at_ms: i64,
        /// The client process.
        client: String,
        /// The session.
        session: String,
        /// The request number.
        seq: u64,
    },
    /// The manager acknowledged (accepted) request `seq` of `session` under `term`.
    Acked {
        /// When, in ms since the Unix epoch.
        at_ms: i64,
        /// The client process.
        client: String,
        /// The session.
        session: String,
        /// The request number.
        seq: u64,
        /// The manager term of the acknowledgment.
        term: u64,
        /// The acknowledging manager's address when known, else empty.
        manager: String,
    },
    /// A server session received request `seq` (redelivery may repeat this).
    Delivered {
        /// When, in ms since the Unix epoch.
        at_ms: i64,
        /// The server process.
        server: String,
        /// The session.
        session: String,
        /// The request number.
        seq: u64,
        /// The manager term of the delivery.
        term: u64,
    },
    /// The manager accepted the server's reply to `seq` under `term`.
    Replied {
        /// When, in ms since the Unix epoch.
        at_ms: i64,
        /// The server process.
        server: String,
        /// The session.
        session: String,
        /// The request number.
        seq: u64,
        /// The server restart data the reply carried: a counter that only grows per session.
        restart: u64,
        /// The manager term of the acceptance.
        term: u64,
    },
    /// A server was (re)bound to `session` and received that server restart data.
    Bound {
        /// When, in ms since the Unix epoch.
        at_ms: i64,
        /// The server process.
        server: String,
        /// The session.
        session: String,
        /// The server restart data received (0 = none yet).
        restart: u64,
        /// The manager term of the binding.
        term: u64,
    },
    /// The client library handed the response to `seq` to the application.
    Answered {
        /// When, in ms since the Unix epoch.
        at_ms: i64,
        /// The client process.
        client: String,
        /// The session.
        session: String,
        /// The request number.
        seq: u64,
        /// The manager term the response came under.
        term: u64,
    },
    /// The driver observed `manager` serving as primary under `term`.
    Primary {
        /// When, in ms since the Unix epoch.
        at_ms: i64,
        /// The manager's address.
        manager: String,
        /// Its term.
        term: u64,
    },
    /// The driver injected a fault; its kind is `what` up to the first space or colon.
    Fault {
        /// When, in ms since the Unix epoch.
        at_ms: i64,
        /// What, e.g. `kill 127.0.0.1:7001` or `cut: manager b from etcd`.
        what: String,
    },
}

impl Event {
    /// When it happened, in ms since the Unix epoch.
    pub fn at_ms(&self) -> i64 {
        match self {
            Event::Sent { at_ms, .. }
            | Event::Acked { at_ms, .. }
            | Event::Delivered { at_ms, .. }
            | Event::Replied { at_ms, .. }
            | Event::Bound { at_ms, .. }
            | Event::Answered { at_ms, .. }
            | Event::Primary { at_ms, .. }
            | Event::Fault { at_ms, .. } => *at_ms,
        }
    }
}

/// The wall clock in milliseconds since the Unix epoch, for [`Event`]'s `at_ms`.
pub fn now_ms() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// Appends events to one history file, one JSON line each, written with one `write` call so a
/// killed process leaves whole lines behind (or at worst a torn last line, which [`read`] skips).
/// Cheap to clone; clones share the file.
#[derive(Debug, Clone)]
pub struct HistoryWriter {
    file: Arc<Mutex<File>>,
    path: Arc<PathBuf>,
}

impl HistoryWriter {
    /// Opens `path` for appending, creating it if missing. A torn last line left by a killed
    /// process is terminated first, so the events of a restarted process start on a line of
    /// their own.
    pub fn create(path: impl AsRef<Path>) -> std::io::Result<HistoryWriter> {
        let path = path.as_ref().to_path_buf();
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(&path)?;
        if file.metadata()?.len() > 0 {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::End(-1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                file.write_all(b"\n")?;
            }
        }
        Ok(HistoryWriter { file: Arc::new(Mutex::new(file)), path: Arc::new(path) })
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `event` as one line. Panics when the file cannot be written: a history with
    /// holes would make the checker's findings meaningless.
    pub fn record(&self, event: Event) {
        let mut line = serde_json::to_string(&event).expect("an event serializes");
        line.push('\n');
        let mut file = self.file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(e) = file.write_all(line.as_bytes()).and_then(|()| file.flush()) {
            panic!("history: write to {}: {e}", self.path.display());
        }
    }
}

/// Merged history files: their events, and how many lines were skipped as torn.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// All events, stable-sorted by `at_ms` (events of one file keep their order on ties).
    pub events: Vec<Event>,
    /// Lines skipped because they are not whole JSON (torn by a killed process).
    pub skipped: usize,
}

/// Reads and merges history files. A line that is not whole JSON (torn by a killed process) is
/// skipped and counted; a whole JSON line that is not an [`Event`] is an error (a format mismatch
/// must not pass as an empty history), as is a missing file.
pub fn read(paths: &[PathBuf]) -> anyhow::Result<History> {
    let mut history = History::default();
    for path in paths {
        let file = File::open(path).with_context(|| format!("open history {}", path.display()))?;
        for (n, line) in BufReader::new(file).split(b'\n').enumerate() {
            let line = line.with_context(|| format!("read history {}", path.display()))?;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(&line) else {
                history.skipped += 1;
                continue;
            };
            let event = serde_json::from_value(value)
                .with_context(|| format!("history {} line {}: not an event", path.display(), n + 1))?;
            history.events.push(event);
        }
    }
    history.events.sort_by_key(Event::at_ms);
    Ok(history)
}

/// What [`check`] found. See [`Report::ok`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Distinct acknowledged requests (session, seq).
    pub acked: usize,
    /// Distinct requests answered to the application at least once.
    pub answered: usize,
    /// Acknowledged requests never answered, as (session, seq), sorted.
    pub lost: Vec<(String, u64)>,
    /// Requests answered more than once, as (session, seq), sorted.
    pub duplicated: Vec<(String, u64)>,
    /// Every other broken guarantee, one sentence each.
    pub violations: Vec<String>,
    /// The `what` of every fault injected, in order.
    pub faults: Vec<String>,
}

impl Report {
    /// Nothing lost, duplicated or violated. (A history with nothing acknowledged is ok too:
    /// callers should also check that `acked` is large enough to mean something.)
    pub fn ok(&self) -> bool {
        self.lost.is_empty() && self.duplicated.is_empty() && self.violations.is_empty()
    }

    /// How many faults of each kind were injected; the kind is a fault's `what` up to its first
    /// space or colon.
    pub fn faults_by_kind(&self) -> BTreeMap<String, usize> {
        let mut kinds = BTreeMap::new();
        for what in &self.faults {
            let kind = what.split([' ', ':']).next().unwrap_or_default();
            *kinds.entry(kind.to_owned()).or_insert(0) += 1;
        }
        kinds
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: acked {}, answered {}, lost {}, duplicated {}, violations {}, faults",
            if self.ok() { "ok" } else { "failed" },
            self.acked,
            self.answered,
            self.lost.len(),
            self.duplicated.len(),
            self.violations.len(),
        )?;
        let kinds = self.faults_by_kind();
        if kinds.is_empty() {
            write!(f, " none")?;
        }
        for (kind, count) in kinds {
            write!(f, " {kind}={count}")?;
        }
        for (name, list) in [("lost", &self.lost), ("duplicated", &self.duplicated)] {
            if list.is_empty() {
                continue;
            }
            write!(f, "\n{name}:")?;
            for (session, seq) in list.iter().take(20) {
                write!(f, " {session}/{seq}")?;
            }
            if list.len() > 20 {
                write!(f, " and {} more", list.len() - 20)?;
            }
        }
        for violation in &self.violations {
            write!(f, "\n{violation}")?;
        }
        Ok(())
    }
}

/// Checks a merged history (in any order: it is stable-sorted by `at_ms` first):
/// 1. every acknowledged request is answered exactly once at the client (none: lost; more than
///    one: duplicated, which also applies to requests answered without a recorded
///    acknowledgment), and nothing is answered that was never sent;
/// 2. per client, over its `Acked` and `Answered` events in time order, terms never go back;
/// 3. no term has two managers across `Acked` (with a manager) and `Primary` events;
/// 4. every `Bound` of a session carries restart data at least the largest `restart` of the
///    session's `Replied` events strictly before it (by `at_ms`);
/// 5. faults are listed for [`Report::faults_by_kind`].
///
/// Check 4 compares clocks of different processes, so it needs them on one machine, and it
/// assumes the manager accepts no reply for a session from its old server once it has sent the
/// new binding.
pub fn check(events: &[Event]) -> Report {
    let mut events: Vec<&Event> = events.iter().collect();
    events.sort_by_key(|e| e.at_ms());
    let mut report = Report::default();

    let mut sent = BTreeSet::new();
    let mut acked = BTreeSet::new();
    let mut answers: BTreeMap<(&str, u64), usize> = BTreeMap::new();
    let mut client_term: HashMap<&str, u64> = HashMap::new();
    let mut term_managers: BTreeMap<u64, BTreeSet<&str>> = BTreeMap::new();
    // Largest replied restart per session, of events strictly before the current `at_ms`, and
    // of the events at the current `at_ms` (folded in once time moves on).
    let mut replied: HashMap<&str, u64> = HashMap::new();
    let mut replied_now: Vec<(&str, u64)> = Vec::new();
    let mut now = i64::MIN;

    for event in events {
        if event.at_ms() != now {
            for (session, restart) in replied_now.drain(..) {
                let max = replied.entry(session).or_insert(0);
                *max = (*max).max(restart);
            }
            now = event.at_ms();
        }
        match event {
            Event::Sent { session, seq, .. } => {
                sent.insert((session.as_str(), *seq));
            }
            Event::Acked { at_ms, client, session, seq, term, manager } => {
                acked.insert((session.as_str(), *seq));
                if !manager.is_empty() {
                    term_managers.entry(*term).or_default().insert(manager.as_str());
                }
                let seen = client_term.entry(client.as_str()).or_insert(*term);
                if *term < *seen {
                    report.violations.push(format!(
                        "client {client} got ack {session}/{seq} under term {term} at {at_ms} after term {seen}"
                    ));
                }
                *seen = (*seen).max(*term);
            }
            Event::Answered { at_ms, client, session, seq, term } => {
                *answers.entry((session.as_str(), *seq)).or_insert(0) += 1;
                if !sent.contains(&(session.as_str(), *seq)) {
                    report
                        .violations
                        .push(format!("client {client} was answered {session}/{seq} at {at_ms}, which was never sent"));
                }
                let seen = client_term.entry(client.as_str()).or_insert(*term);
                if *term < *seen {
                    report.violations.push(format!(
                        "client {client} got answer {session}/{seq} under term {term} at {at_ms} after term {seen}"
                    ));
                }
                *seen = (*seen).max(*term);
            }
            Event::Replied { session, restart, .. } => replied_now.push((session.as_str(), *restart)),
            Event::Bound { at_ms, server, session, restart, term } => {
                let latest = replied.get(session.as_str()).copied().unwrap_or(0);
                if *restart < latest {
                    report.violations.push(format!(
                        "server {server} bound to {session} under term {term} at {at_ms} \
                         with stale restart data {restart} (replied: {latest})"
                    ));
                }
            }
            Event::Primary { manager, term, .. } => {
                term_managers.entry(*term).or_default().insert(manager.as_str());
            }
            Event::Fault { what, .. } => report.faults.push(what.clone()),
            Event::Delivered { .. } => {}
        }
    }

    for (term, managers) in term_managers {
        if managers.len() > 1 {
            let managers: Vec<&str> = managers.into_iter().collect();
            report.violations.push(format!("term {term} has two acknowledging managers: {}", managers.join(", ")));
        }
    }
    report.acked = acked.len();
    report.answered = answers.len();
    for &(session, seq) in &acked {
        if !answers.contains_key(&(session, seq)) {
            report.lost.push((session.to_owned(), seq));
        }
    }
    for ((session, seq), count) in answers {
        if count > 1 {
            report.duplicated.push((session.to_owned(), seq));
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(at_ms: i64, client: &str, session: &str, seq: u64) -> Event {
        Event::Sent { at_ms, client: client.into(), session: session.into(), seq }
    }

    fn acked(at_ms: i64, client: &str, session: &str, seq: u64, term: u64, manager: &str) -> Event {
        Event::Acked { at_ms, client: client.into(), session: session.into(), seq, term, manager: manager.into() }
    }

    fn delivered(at_ms: i64, server: &str, session: &str, seq: u64, term: u64) -> Event {
        Event::Delivered { at_ms, server: server.into(), session: session.into(), seq, term }
    }

    fn replied(at_ms: i64, server: &str, session: &str, seq: u64, term: u64) -> Event {
        // the servers send the highest seq they answered as restart data
        Event::Replied { at_ms, server: server.into(), session: session.into(), seq, restart: seq, term }
    }

    fn bound(at_ms: i64, server: &str, session: &str, restart: u64, term: u64) -> Event {
        Event::Bound { at_ms, server: server.into(), session: session.into(), restart, term }
    }

    fn answered(at_ms: i64, client: &str, session: &str, seq: u64, term: u64) -> Event {
        Event::Answered { at_ms, client: client.into(), session: session.into(), seq, term }
    }

    /// Two clients (c1 on session alpha, c2 on beta), two servers, a failover from manager m1
    /// (term 1) to m2 (term 2) with alpha/2 in flight: alpha is rebound from srv-a to srv-b,
    /// which gets alpha/2 again (a redelivery). alpha/3 is sent but never acknowledged.
    fn clean() -> Vec<Event> {
        vec![
            Event::Primary { at_ms: 1000, manager: "m1".into(), term: 1 },
            bound(1010, "srv-a", "alpha", 0, 1),
            bound(1011, "srv-b", "beta", 0, 1),
            sent(1020, "c1", "alpha", 1),
            acked(1021, "c1", "alpha", 1, 1, "m1"),
            delivered(1022, "srv-a", "alpha", 1, 1),
            replied(1023, "srv-a", "alpha", 1, 1),
            answered(1024, "c1", "alpha", 1, 1),
            sent(1030, "c2", "beta", 1),
            acked(1031, "c2", "beta", 1, 1, "m1"),
            delivered(1032, "srv-b", "beta", 1, 1),
            replied(1033, "srv-b", "beta", 1, 1),
            answered(1034, "c2", "beta", 1, 1),
            sent(1040, "c1", "alpha", 2),
            acked(1041, "c1", "alpha", 2, 1, ""),
            delivered(1042, "srv-a", "alpha", 2, 1),
            Event::Fault { at_ms: 1043, what: "kill m1".into() },
            Event::Primary { at_ms: 1100, manager: "m2".into(), term: 2 },
            bound(1110, "srv-b", "alpha", 1, 2),
            delivered(1111, "srv-b", "alpha", 2, 2),
            replied(1112, "srv-b", "alpha", 2, 2),
            answered(1113, "c1", "alpha", 2, 2),
            sent(1120, "c2", "beta", 2),
            acked(1121, "c2", "beta", 2, 2, "m2"),
            delivered(1122, "srv-b", "beta", 2, 2),
            replied(1123, "srv-b", "beta", 2, 2),
            answered(1124, "c2", "beta", 2, 2),
            Event::Fault { at_ms: 1130, what: "cut: m2 from etcd".into() },
            sent(1140, "c1", "alpha", 3),
            sent(1150, "c2", "beta", 3),
            acked(1151, "c2", "beta", 3, 2, "m2"),
            delivered(1152, "srv-b", "beta", 3, 2),
            replied(1153, "srv-b", "beta", 3, 2),
            answered(1154, "c2", "beta", 3, 2),
        ]
    }

    fn is_answer(session: &'static str, n: u64) -> impl Fn(&Event) -> bool {
        move |e| matches!(e, Event::Answered { session: s, seq, .. } if s == session && *seq == n)
    }

    fn is_ack(session: &'static str, n: u64) -> impl Fn(&Event) -> bool {
        move |e| matches!(e, Event::Acked { session: s, seq, .. } if s == session && *seq == n)
    }

    /// Index of the only event matching `pred`.
    fn find(events: &[Event], pred: impl Fn(&Event) -> bool) -> usize {
        let found: Vec<usize> = (0..events.len()).filter(|&i| pred(&events[i])).collect();
        assert_eq!(found.len(), 1, "expected one match, got {found:?}");
        found[0]
    }

    #[test]
    fn clean_history_passes() {
        let report = check(&clean());
        assert!(report.ok(), "{report}");
        assert_eq!((report.acked, report.answered), (5, 5));
        let kinds: Vec<(String, usize)> = report.faults_by_kind().into_iter().collect();
        assert_eq!(kinds, [("cut".to_owned(), 1), ("kill".to_owned(), 1)]);
        assert_eq!(
            report.to_string(),
            "ok: acked 5, answered 5, lost 0, duplicated 0, violations 0, faults cut=1 kill=1"
        );
        // the order events are given in does not matter
        let mut reversed = clean();
        reversed.reverse();
        assert_eq!(check(&reversed), report);
    }

    #[test]
    fn checker_self_test_catches_doctored_histories() {
        // (a) an answer dropped: lost
        let mut events = clean();
        events.remove(find(&events, is_answer("alpha", 2)));
        let report = check(&events);
        println!("(a) {report}");
        assert_eq!(report.lost, [("alpha".to_owned(), 2)]);
        assert!(report.duplicated.is_empty() && report.violations.is_empty(), "{report}");
        assert_eq!((report.acked, report.answered), (5, 4));

        // (b) an answer given twice: duplicated
        let mut events = clean();
        let i = find(&events, is_answer("beta", 1));
        events.insert(i + 1, events[i].clone());
        let report = check(&events);
        println!("(b) {report}");
        assert_eq!(report.duplicated, [("beta".to_owned(), 1)]);
        assert!(report.lost.is_empty() && report.violations.is_empty(), "{report}");

        // (c) two managers acknowledging in term 2
        let mut events = clean();
        let i = find(&events, is_ack("beta", 2));
        let Event::Acked { manager, .. } = &mut events[i] else { unreachable!() };
        *manager = "m1".into();
        let report = check(&events);
        println!("(c) {report}");
        assert_eq!(report.violations, ["term 2 has two acknowledging managers: m1, m2"]);
        assert!(report.lost.is_empty() && report.duplicated.is_empty(), "{report}");

        // (d) the rebinding of alpha carries stale restart data
        let mut events = clean();
        let i = find(&events, |e| matches!(e, Event::Bound { session, term: 2, .. } if session == "alpha"));
        let Event::Bound { restart, .. } = &mut events[i] else { unreachable!() };
        *restart = 0;
        let report = check(&events);
        println!("(d) {report}");
        assert_eq!(report.violations.len(), 1, "{report}");
        assert!(report.violations[0].starts_with("server srv-b bound to alpha under term 2 at 1110"), "{report}");
        assert!(report.violations[0].ends_with("with stale restart data 0 (replied: 1)"), "{report}");
        assert!(report.lost.is_empty() && report.duplicated.is_empty(), "{report}");

        // (e) c2 gets an ack under term 1 after seeing term 2
        let mut events = clean();
        let i = find(&events, is_ack("beta", 3));
        let Event::Acked { term, manager, .. } = &mut events[i] else { unreachable!() };
        (*term, *manager) = (1, "m1".into());
        let report = check(&events);
        println!("(e) {report}");
        assert_eq!(report.violations, ["client c2 got ack beta/3 under term 1 at 1151 after term 2"], "{report}");
        assert!(report.lost.is_empty() && report.duplicated.is_empty(), "{report}");
        assert!(report.to_string().starts_with("failed: acked 5, answered 5, lost 0, duplicated 0, violations 1"));
    }

    #[test]
    fn writers_leave_whole_lines_and_reader_skips_torn_ones() {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let dir = std::env::temp_dir().join(format!("baton_history_{}_{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (clients, others) = (dir.join("clients.jsonl"), dir.join("others.jsonl"));

        // client events from two threads sharing one writer, the rest through another writer
        let events = clean();
        let client_writer = HistoryWriter::create(&clients).unwrap();
        let other_writer = HistoryWriter::create(&others).unwrap();
        let is_client = |e: &Event| matches!(e, Event::Sent { .. } | Event::Acked { .. } | Event::Answered { .. });
        std::thread::scope(|scope| {
            for parity in 0..2 {
                let (writer, events) = (client_writer.clone(), &events);
                scope.spawn(move || {
                    for event in events.iter().filter(|e| is_client(e)).skip(parity).step_by(2) {
                        writer.record(event.clone());
                    }
                });
            }
            for event in events.iter().filter(|e| !is_client(e)) {
                other_writer.record(event.clone());
            }
        });
        drop(client_writer);
        std::fs::OpenOptions::new().append(true).open(&clients).unwrap().write_all(br#"{"kind":"sent","at_m"#).unwrap();

        let history = read(&[clients.clone(), others.clone()]).unwrap();
        assert_eq!(history.skipped, 1);
        assert_eq!(history.events, events);
        let line = std::fs::read_to_string(&others).unwrap().lines().next().unwrap().to_owned();
        assert_eq!(line, r#"{"kind":"primary","at_ms":1000,"manager":"m1","term":1}"#);

        // a restarted process appends to its torn file: its events start on a line of their own
        let restarted = HistoryWriter::create(&clients).unwrap();
        restarted.record(sent(2000, "c1", "alpha", 4));
        let history = read(&[clients, others]).unwrap();
        assert_eq!(history.skipped, 1);
        assert_eq!(history.events.len(), events.len() + 1);
        assert_eq!(history.events.last(), Some(&sent(2000, "c1", "alpha", 4)));

        // a whole line that is not an event is an error, not a skip
        let bad = dir.join("bad.jsonl");
        std::fs::write(&bad, "{\"kind\":\"nope\",\"at_ms\":1}\n").unwrap();
        let err = read(&[bad]).unwrap_err();
        assert!(format!("{err:#}").contains("line 1: not an event"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
