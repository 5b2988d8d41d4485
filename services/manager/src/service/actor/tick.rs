//! The periodic work of a tick: the gauges, closing sessions idle past `--session-expiry`, and
//! moving the sessions of servers lost past their grace.

use tokio::time::Instant;

use super::{Actor, MOVES_PER_TICK, SWEEP_EVERY};
use crate::journal::{BindOp, Op};

impl Actor {
    /// A primary moves the sessions of servers lost past their grace (a standby does nothing).
    pub(super) fn tick(&mut self) {
        self.gauges();
        if !self.primary {
            return;
        }
        self.expire();
        let grace = self.options.server_grace;
        let expired: Vec<String> =
            self.lost.iter().filter(|(_, at)| at.elapsed() >= grace).map(|(id, _)| id.clone()).collect();
        for server in expired {
            self.lost.remove(&server);
            let bound = self.sessions_bound_to(&server);
            tracing::info!(%server, sessions = bound.len(), "server lost past its grace: moving its sessions");
            self.moving.insert(server, bound);
        }
        let mut budget = MOVES_PER_TICK;
        let servers: Vec<String> = self.moving.keys().cloned().collect();
        for server in servers {
            let Some(left) = self.moving.get_mut(&server) else { continue };
            let now = left.split_off(left.len().saturating_sub(budget));
            if left.is_empty() {
                self.moving.remove(&server);
            }
            budget -= now.len();
            for session in now {
                // still bound there (not closed or moved meanwhile)
                if self.state.sessions.get(&session).is_some_and(|s| s.bound.as_deref() == Some(server.as_str())) {
                    tracing::debug!(%session, %server, "moving the session");
                    self.journal(Op::Bind(BindOp { session_id: session.clone(), server_id: String::new() }));
                    self.bind(&session);
                }
            }
            if budget == 0 {
                break;
            }
        }
    }

    /// Closes the detached sessions idle for `--session-expiry` (looked at once a second).
    fn expire(&mut self) {
        let expiry = self.options.session_expiry;
        if expiry.is_zero() || Instant::now() < self.next_expiry {
            return;
        }
        self.next_expiry = Instant::now() + SWEEP_EVERY;
        let expired: Vec<String> = self
            .activity
            .iter()
            .filter(|(id, at)| at.elapsed() >= expiry && !self.clients.contains_key(*id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            if self.state.sessions.contains_key(&id) {
                let reason = format!("expired: no client and no activity for {}", humantime::format_duration(expiry));
                self.close(&id, reason);
            } else {
                self.activity.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The time-driven rules of a tick on tokio's paused clock, ticked every
    //! [`TICK_EVERY`](crate::service::TICK_EVERY) as the ticker does.

    use std::time::Duration;

    use baton_mesh::proto::v1 as pb;
    use tokio::sync::mpsc;
    use tokio::time::Instant;

    use super::super::{Actor, Command};
    use crate::journal::Journal;
    use crate::service::outbox::Out;
    use crate::service::{ManagerOptions, TICK_EVERY};
    use crate::state::State;

    /// A single manager (so the primary) journaling in `dir`.
    fn actor(dir: &std::path::Path, session_expiry: Duration, server_grace: Duration) -> Actor {
        let mut options = ManagerOptions::single(dir.to_owned());
        options.session_expiry = session_expiry;
        options.server_grace = server_grace;
        let (journal, _) = Journal::open(dir).unwrap();
        Actor::new(options, String::new(), true, journal, State::default(), 1)
    }

    /// Opens session `id` of pool `p` on the stream `conn` (nothing is flushed: its events are
    /// not sent).
    fn open(actor: &mut Actor, id: &str, conn: u64) {
        let (tx, _) = mpsc::channel(1);
        let open = pb::OpenSession { pool: "p".into(), session_id: id.into(), create: true, ..Default::default() };
        let tx = Out::Stream(tx);
        actor.handle(Command::ClientOpen { open, session: id.into(), fresh: false, conn, tx, reply: None });
        assert!(actor.state.sessions.contains_key(id), "{id} is open");
    }

    /// Registers server `id` of pool `p` on the stream `conn`.
    fn register(actor: &mut Actor, id: &str, conn: u64) {
        let (tx, _) = mpsc::channel(1);
        let register = pb::RegisterServer { pool: "p".into(), server_id: id.into(), seen_term: 0 };
        actor.handle(Command::ServerRegister { register, conn, tx: Out::Stream(tx) });
    }

    /// Advances the clock tick by tick, ticking the actor, until `at` after `start`.
    async fn tick_until(actor: &mut Actor, start: Instant, at: Duration) {
        while start.elapsed() < at {
            tokio::time::advance(TICK_EVERY).await;
            actor.handle(Command::Tick);
        }
        assert_eq!(start.elapsed(), at, "ticked to the instant asked");
    }

    fn is_open(actor: &Actor, id: &str) -> bool {
        actor.state.sessions.contains_key(id)
    }

    fn bound(actor: &Actor, session: &str) -> Option<String> {
        actor.state.sessions[session].bound.clone()
    }

    #[tokio::test(start_paused = true)]
    async fn a_detached_session_closes_once_idle_for_the_expiry_and_not_a_tick_before() {
        let dir = tempfile::tempdir().unwrap();
        let expiry = Duration::from_secs(10);
        let mut actor = actor(dir.path(), expiry, Duration::from_secs(2));
        let t0 = Instant::now();
        actor.handle(Command::Tick); // sweeps at 0 s: the next sweeps come at 1 s, 2 s, ...
        open(&mut actor, "idle", 1);
        actor.handle(Command::ClientGone { session: "idle".into(), conn: 1 });
        open(&mut actor, "attached", 2); // its client stays: never expires
        open(&mut actor, "busy", 3);
        tick_until(&mut actor, t0, TICK_EVERY).await;
        open(&mut actor, "late", 4);
        actor.handle(Command::ClientGone { session: "late".into(), conn: 4 });
        tick_until(&mut actor, t0, Duration::from_secs(5)).await;
        // a request is activity: the session's idle time starts again
        let request = pb::ClientRequest { seq: 1, ..Default::default() };
        actor.handle(Command::ClientRequest { session: "busy".into(), conn: 3, request });
        actor.handle(Command::ClientGone { session: "busy".into(), conn: 3 });

        tick_until(&mut actor, t0, expiry - TICK_EVERY).await;
        for id in ["idle", "attached", "busy", "late"] {
            assert!(is_open(&actor, id), "{id} is kept before the expiry");
        }
        // idle for exactly the expiry: closed, with the reason GetSession gives
        tick_until(&mut actor, t0, expiry).await;
        assert!(!is_open(&actor, "idle"));
        let reason = "expired: no client and no activity for 10s";
        assert_eq!(actor.state.closed_reason("idle"), Some(reason));
        let status = actor.session("idle").unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert!(status.message().contains(reason), "{status:?}");
        // idle one tick short of the expiry at that sweep: kept until the next one
        assert!(is_open(&actor, "late"), "late: idle for the expiry less a tick");
        tick_until(&mut actor, t0, expiry + Duration::from_secs(1) - TICK_EVERY).await;
        assert!(is_open(&actor, "late"), "late: swept once a second");
        tick_until(&mut actor, t0, expiry + Duration::from_secs(1)).await;
        assert!(!is_open(&actor, "late"), "late: idle past the expiry at the next sweep");
        // active 5 s in: closed 10 s after that
        tick_until(&mut actor, t0, Duration::from_secs(15) - TICK_EVERY).await;
        assert!(is_open(&actor, "busy"), "busy: idle since its request at 5 s");
        tick_until(&mut actor, t0, Duration::from_secs(15)).await;
        assert!(!is_open(&actor, "busy"));
        tick_until(&mut actor, t0, Duration::from_secs(30)).await;
        assert!(is_open(&actor, "attached"), "a session with its client never expires");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_servers_sessions_move_once_its_grace_is_over() {
        let dir = tempfile::tempdir().unwrap();
        let grace = Duration::from_secs(2);
        let mut actor = actor(dir.path(), Duration::from_secs(3600), grace);
        let t0 = Instant::now();
        register(&mut actor, "s1", 1);
        register(&mut actor, "s2", 2);
        open(&mut actor, "a", 3); // the least loaded server, the first by id on a tie
        open(&mut actor, "b", 4);
        assert_eq!((bound(&actor, "a").as_deref(), bound(&actor, "b").as_deref()), (Some("s1"), Some("s2")));
        actor.handle(Command::ServerGone { server: "s1".into(), conn: 99 }); // another stream's: ignored
        actor.handle(Command::ServerGone { server: "s1".into(), conn: 1 });

        tick_until(&mut actor, t0, grace - TICK_EVERY).await;
        assert_eq!(bound(&actor, "a").as_deref(), Some("s1"), "kept within the grace");
        tick_until(&mut actor, t0, grace).await;
        assert_eq!(bound(&actor, "a").as_deref(), Some("s2"), "moved at the end of the grace");
        assert_eq!(bound(&actor, "b").as_deref(), Some("s2"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_back_within_its_grace_keeps_its_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let grace = Duration::from_secs(2);
        let mut actor = actor(dir.path(), Duration::from_secs(3600), grace);
        let t0 = Instant::now();
        register(&mut actor, "s2", 1);
        open(&mut actor, "a", 2);
        // s1 would take the session if it moved (the least loaded, and the first by id)
        register(&mut actor, "s1", 3);
        actor.handle(Command::ServerGone { server: "s2".into(), conn: 1 });
        tick_until(&mut actor, t0, grace - TICK_EVERY).await;
        register(&mut actor, "s2", 4);
        tick_until(&mut actor, t0, grace * 3).await;
        assert_eq!(bound(&actor, "a").as_deref(), Some("s2"));
    }
}
