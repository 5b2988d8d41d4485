//! The manager's state: client-server sessions with their restart data and their request and
//! response queues. It changes only by applying journal entries, so the primary, a standby and a
//! restarted manager replaying its journal all reach the same state.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::journal::{BindOp, Entry, Op, OpenOp, ReplyOp, RequestOp};

/// How many closed sessions the state remembers, with why they were closed (for GetSession).
const CLOSED_KEPT: usize = 1024;

/// A queued request.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedRequest {
    /// The request.
    pub payload: Option<prost_types::Any>,
    /// The client restart data sent with it.
    pub client_restart: Vec<u8>,
}

/// A client-server session.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Session {
    /// Its id.
    pub id: String,
    /// Its pool.
    pub pool: String,
    /// The client restart data.
    pub client_restart: Vec<u8>,
    /// The server restart data.
    pub server_restart: Vec<u8>,
    /// The bound server, if any.
    pub bound: Option<String>,
    /// The highest request number journaled.
    pub last_request_seq: u64,
    /// Requests not yet answered, by number.
    pub requests: BTreeMap<u64, QueuedRequest>,
    /// Responses not yet acknowledged, by number.
    pub responses: BTreeMap<u64, Option<prost_types::Any>>,
    /// When it was opened, ms since the Unix epoch (0: not recorded).
    pub opened_at_unix_ms: i64,
}

/// Every session, and the journal position.
#[derive(Debug, Default)]
pub struct State {
    /// The sessions by id.
    pub sessions: HashMap<String, Session>,
    /// The index of the last entry applied.
    pub index: u64,
    /// The highest term seen in the journal.
    pub term: u64,
    /// How many sessions each server has bound: kept as bindings change, so that binding a
    /// session does not count every session (which made opening N sessions cost N²).
    pub load: HashMap<String, usize>,
    /// The last sessions closed, with why, oldest first (at most [`CLOSED_KEPT`]; snapshots do
    /// not carry them).
    pub closed: VecDeque<(String, String)>,
}

impl State {
    /// Applies one entry. Entries have set semantics, so replaying a suffix twice is harmless.
    pub fn apply(&mut self, entry: &Entry) {
        self.index = self.index.max(entry.index);
        self.term = self.term.max(entry.term);
        let Some(op) = &entry.op else { return };
        match op {
            Op::Open(o) => {
                let session = self.sessions.entry(o.session_id.clone()).or_insert_with(|| Session {
                    id: o.session_id.clone(),
                    pool: o.pool.clone(),
                    ..Session::default()
                });
                if !o.restart_data.is_empty() {
                    session.client_restart = o.restart_data.clone();
                }
                if o.opened_at_unix_ms != 0 {
                    session.opened_at_unix_ms = o.opened_at_unix_ms;
                }
                session.last_request_seq = session.last_request_seq.max(o.last_request_seq);
            }
            Op::Request(r) => {
                if let Some(s) = self.sessions.get_mut(&r.session_id) {
                    for seq in &r.acks {
                        s.responses.remove(seq);
                    }
                    if r.seq > s.last_request_seq {
                        s.requests.insert(
                            r.seq,
                            QueuedRequest { payload: r.payload.clone(), client_restart: r.restart_data.clone() },
                        );
                        s.last_request_seq = r.seq;
                    }
                    if !r.restart_data.is_empty() {
                        s.client_restart = r.restart_data.clone();
                    }
                }
            }
            Op::Reply(r) => {
                if let Some(s) = self.sessions.get_mut(&r.session_id) {
                    if s.requests.remove(&r.seq).is_some() {
                        s.responses.insert(r.seq, r.payload.clone());
                    }
                    if !r.restart_data.is_empty() {
                        s.server_restart = r.restart_data.clone();
                    }
                }
            }
            Op::Ack(a) => {
                if let Some(s) = self.sessions.get_mut(&a.session_id) {
                    s.responses.remove(&a.seq);
                }
            }
            Op::Close(c) => {
                if let Some(s) = self.sessions.remove(&c.session_id) {
                    self.count(s.bound, None);
                    if self.closed.len() == CLOSED_KEPT {
                        self.closed.pop_front();
                    }
                    self.closed.push_back((c.session_id.clone(), c.reason.clone()));
                }
            }
            Op::Bind(b) => {
                if let Some(s) = self.sessions.get_mut(&b.session_id) {
                    let new = (!b.server_id.is_empty()).then(|| b.server_id.clone());
                    let old = std::mem::replace(&mut s.bound, new.clone());
                    self.count(old, new);
                }
            }
        }
    }

    /// Moves one session of the load count from server `old` to server `new`.
    fn count(&mut self, old: Option<String>, new: Option<String>) {
        if old == new {
            return;
        }
        if let Some(old) = old
            && let Some(n) = self.load.get_mut(&old)
        {
            *n -= 1;
            if *n == 0 {
                self.load.remove(&old);
            }
        }
        if let Some(new) = new {
            *self.load.entry(new).or_default() += 1;
        }
    }

    /// Why session `id` was closed, if it is one of the last closed.
    pub fn closed_reason(&self, id: &str) -> Option<&str> {
        self.closed.iter().rev().find(|(c, _)| c == id).map(|(_, why)| why.as_str())
    }

    /// Entries that recreate this state from nothing (the snapshot), all at index `self.index`.
    pub fn to_entries(&self) -> Vec<Entry> {
        let at = |op| Entry { index: self.index, term: self.term, op: Some(op) };
        let mut out = Vec::new();
        let mut ids: Vec<&String> = self.sessions.keys().collect();
        ids.sort();
        for id in ids {
            let s = &self.sessions[id];
            let open = |last_request_seq| {
                Op::Open(OpenOp {
                    session_id: s.id.clone(),
                    pool: s.pool.clone(),
                    restart_data: s.client_restart.clone(),
                    last_request_seq,
                    opened_at_unix_ms: s.opened_at_unix_ms,
                })
            };
            // a session with nothing queued (most, at scale) is one open with its high-water
            // mark; with queues, the mark goes last, so that the requests replay under it
            let idle = s.requests.is_empty() && s.responses.is_empty();
            out.push(at(open(if idle { s.last_request_seq } else { 0 })));
            if let Some(server) = &s.bound {
                out.push(at(Op::Bind(BindOp { session_id: s.id.clone(), server_id: server.clone() })));
            }
            // every queued number in order as a request, then the answered ones as replies
            let mut seqs: Vec<u64> = s.requests.keys().chain(s.responses.keys()).copied().collect();
            seqs.sort_unstable();
            for seq in seqs {
                let (payload, restart_data) = match s.requests.get(&seq) {
                    Some(r) => (r.payload.clone(), r.client_restart.clone()),
                    None => (None, vec![]),
                };
                out.push(at(Op::Request(RequestOp {
                    session_id: s.id.clone(),
                    seq,
                    payload,
                    restart_data,
                    acks: vec![],
                })));
            }
            for (seq, payload) in &s.responses {
                out.push(at(Op::Reply(ReplyOp {
                    session_id: s.id.clone(),
                    seq: *seq,
                    payload: payload.clone(),
                    restart_data: vec![],
                })));
            }
            if !s.server_restart.is_empty() {
                out.push(at(Op::Reply(ReplyOp {
                    session_id: s.id.clone(),
                    seq: 0,
                    payload: None,
                    restart_data: s.server_restart.clone(),
                })));
            }
            // the client restart data and the request high-water mark as they are now
            if !idle {
                out.push(at(open(s.last_request_seq)));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{AckOp, CloseOp};

    fn e(index: u64, op: Op) -> Entry {
        Entry { index, term: 1, op: Some(op) }
    }

    fn any(v: &str) -> Option<prost_types::Any> {
        Some(prost_types::Any { type_url: "t".into(), value: v.as_bytes().to_vec() })
    }

    fn sample() -> Vec<Entry> {
        vec![
            e(
                1,
                Op::Open(OpenOp {
                    session_id: "s".into(),
                    pool: "p".into(),
                    restart_data: b"c0".to_vec(),
                    last_request_seq: 0,
                    opened_at_unix_ms: 1_700_000_000_000,
                }),
            ),
            e(2, Op::Bind(BindOp { session_id: "s".into(), server_id: "w1".into() })),
            e(
                3,
                Op::Request(RequestOp {
                    session_id: "s".into(),
                    seq: 1,
                    payload: any("r1"),
                    restart_data: b"c1".to_vec(),
                    acks: vec![],
                }),
            ),
            e(
                4,
                Op::Request(RequestOp {
                    session_id: "s".into(),
                    seq: 2,
                    payload: any("r2"),
                    restart_data: vec![],
                    acks: vec![],
                }),
            ),
            e(
                5,
                Op::Reply(ReplyOp { session_id: "s".into(), seq: 1, payload: any("a1"), restart_data: b"w".to_vec() }),
            ),
            e(
                6,
                Op::Request(RequestOp {
                    session_id: "s".into(),
                    seq: 3,
                    payload: any("r3"),
                    restart_data: vec![],
                    acks: vec![],
                }),
            ),
            e(7, Op::Reply(ReplyOp { session_id: "s".into(), seq: 3, payload: any("a3"), restart_data: vec![] })),
            e(8, Op::Ack(AckOp { session_id: "s".into(), seq: 1 })),
        ]
    }

    #[test]
    fn queues_follow_requests_replies_and_acks() {
        let mut state = State::default();
        for entry in sample() {
            state.apply(&entry);
        }
        let s = &state.sessions["s"];
        assert_eq!(s.requests.keys().copied().collect::<Vec<_>>(), [2]);
        assert_eq!(s.responses.keys().copied().collect::<Vec<_>>(), [3]);
        assert_eq!(
            (s.last_request_seq, s.client_restart.as_slice(), s.server_restart.as_slice()),
            (3, &b"c1"[..], &b"w"[..])
        );
        assert_eq!(s.bound.as_deref(), Some("w1"));
        // a duplicate request number does not queue again
        state.apply(&e(
            9,
            Op::Request(RequestOp {
                session_id: "s".into(),
                seq: 2,
                payload: any("again"),
                restart_data: vec![],
                acks: vec![],
            }),
        ));
        assert_eq!(state.sessions["s"].requests[&2].payload, any("r2"));
        // a request that acknowledges a response takes it out of the response queue
        state.apply(&e(
            10,
            Op::Request(RequestOp {
                session_id: "s".into(),
                seq: 4,
                payload: any("r4"),
                restart_data: vec![],
                acks: vec![3],
            }),
        ));
        let s = &state.sessions["s"];
        assert!(s.responses.is_empty());
        assert_eq!(s.requests.keys().copied().collect::<Vec<_>>(), [2, 4]);
    }

    fn open(index: u64, id: &str) -> Entry {
        e(
            index,
            Op::Open(OpenOp {
                session_id: id.into(),
                pool: "p".into(),
                restart_data: vec![],
                last_request_seq: 0,
                opened_at_unix_ms: 1,
            }),
        )
    }

    /// Bindings keep a count per server; closing a session takes it out of the count, of the
    /// state and of every later snapshot, and remembers why.
    #[test]
    fn closed_sessions_leave_the_state_the_load_and_the_snapshot() {
        let mut state = State::default();
        let mut index = 0;
        let mut next = || {
            index += 1;
            index
        };
        for k in 0..10 {
            let id = format!("s{k}");
            state.apply(&open(next(), &id));
            let server = if k % 2 == 0 { "w1" } else { "w2" };
            state.apply(&e(next(), Op::Bind(BindOp { session_id: id, server_id: server.into() })));
        }
        assert_eq!((state.load["w1"], state.load["w2"]), (5, 5));
        // a move counts once, on the new server
        state.apply(&e(next(), Op::Bind(BindOp { session_id: "s0".into(), server_id: "w2".into() })));
        assert_eq!((state.load["w1"], state.load["w2"]), (4, 6));
        for k in 0..8 {
            let close = CloseOp { session_id: format!("s{k}"), reason: "closed by the client".into() };
            state.apply(&e(next(), Op::Close(close)));
        }
        assert_eq!(state.sessions.len(), 2);
        assert_eq!((state.load.get("w1"), state.load["w2"]), (Some(&1), 1));
        assert_eq!(state.closed_reason("s3"), Some("closed by the client"));
        assert_eq!(state.closed_reason("s9"), None);
        let snapshot = state.to_entries();
        let mut restored = State::default();
        for entry in &snapshot {
            restored.apply(entry);
        }
        assert_eq!(restored.sessions, state.sessions);
        assert_eq!(restored.load, state.load);
        let named: std::collections::BTreeSet<&str> = snapshot
            .iter()
            .filter_map(|e| match &e.op {
                Some(Op::Open(o)) => Some(o.session_id.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(named, ["s8", "s9"].into());
        // a session with nothing queued is its open (with its high-water mark) and its binding
        assert_eq!(snapshot.len(), 4, "{snapshot:?}");
        // the closed sessions are remembered up to a bound
        for k in 0..(CLOSED_KEPT + 10) {
            state.apply(&open(next(), &format!("c{k}")));
            state.apply(&e(next(), Op::Close(CloseOp { session_id: format!("c{k}"), reason: "expired".into() })));
        }
        assert_eq!(state.closed.len(), CLOSED_KEPT);
        assert_eq!(state.sessions.len(), 2);
    }

    #[test]
    fn a_snapshot_recreates_the_state_and_replaying_over_it_is_harmless() {
        let mut state = State::default();
        for entry in sample() {
            state.apply(&entry);
        }
        let mut restored = State::default();
        for entry in state.to_entries() {
            restored.apply(&entry);
        }
        assert_eq!(restored.sessions, state.sessions);
        for entry in sample() {
            restored.apply(&entry);
        }
        assert_eq!(restored.sessions, state.sessions);
    }
}
