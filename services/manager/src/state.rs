//! The manager's state: client-server sessions with their restart data and their request and
//! response queues. It changes only by applying journal entries, so the primary, a standby and a
//! restarted manager replaying its journal all reach the same state.

use std::collections::{BTreeMap, HashMap};

use crate::journal::{BindOp, Entry, Op, OpenOp, ReplyOp, RequestOp};

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
            Op::Bind(b) => {
                if let Some(s) = self.sessions.get_mut(&b.session_id) {
                    s.bound = (!b.server_id.is_empty()).then(|| b.server_id.clone());
                }
            }
        }
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
                })
            };
            out.push(at(open(0)));
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
            out.push(at(open(s.last_request_seq)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::AckOp;

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
