//! Finding the primary: the managers a session tries in turn, the leader a standby names, how
//! long to wait before the next try, and the refusal of a deposed primary's frames (a term that
//! goes back).

use std::time::Duration;

use tonic::Status;

use super::connector::Primary;

/// Takes a frame's term; a term older than one already seen (a deposed primary's) is refused.
pub(super) fn advance_term(seen: &mut u64, term: u64) -> Result<(), Status> {
    if term < *seen {
        return Err(Status::unavailable(format!("a frame of term {term} after term {seen}")));
    }
    *seen = term;
    Ok(())
}

/// The managers to try, in order, and the leader a standby pointed to.
pub(super) struct Endpoints {
    all: Vec<String>,
    current: usize,
    hint: Option<String>,
    last_tried: String,
    /// The manager that failed, without naming a leader, while the session was open on it, or
    /// that a standby had named as the primary (a primary that went away), and since when: for
    /// [`GONE_WAIT`] a standby that still names it as the leader is asked again instead of
    /// followed.
    gone: Option<(String, std::time::Instant)>,
    /// Whether the session is open on `last_tried`.
    open: bool,
    /// Whether `last_tried` is the leader a standby named.
    named: bool,
    /// Failed attempts since the last successful open: the backoff grows with them.
    attempt: u32,
    /// The first standby answer since the last successful open: for [`GONE_WAIT`] after it, each
    /// standby answer is followed by a [`TAKEOVER_POLL`], then by the backoff.
    polling_since: Option<std::time::Instant>,
    /// The newest primary the process knows of (the connector's).
    primary: Primary,
    /// The term of the known primary last tried: a session does not go back to it.
    followed: u64,
    /// Whether the last failure was a standby's answer that names no leader to follow yet (a
    /// takeover under way): the session waits for the process to learn of a new primary.
    takeover: bool,
}

/// How long a standby that names a gone primary as the leader is asked again before the client
/// tries that primary anyway, and how long standby answers are polled for: enough for a takeover
/// (a 2 s lease), and then the client finds a primary restarted where it was, which a standby
/// left out of the in-sync set keeps naming and never replaces. A count of asks would stretch
/// with the delay between them (200 asks took 5 s at the poll, 50 s at the backoff).
const GONE_WAIT: Duration = Duration::from_secs(5);

/// How soon a manager is asked again after a standby answered (a takeover may be under way): a
/// standby takes over within milliseconds of a primary's resignation (SIGTERM), so the client's
/// wait is this poll. With the growing backoff instead, a handover took 58 to 291 ms, and server
/// sessions that fell one takeover behind kept a 250 ms pace and could miss a short-lived
/// primary altogether.
const TAKEOVER_POLL: Duration = Duration::from_millis(25);

/// How long a session that a standby refused during a takeover waits for the new primary's
/// notice ([`Primary`]) before it asks again, when it is its process's turn to ask (one session
/// per process each time): the fallback when no notice comes, for example when another
/// standby than the one asked was elected. Each session asking every [`TAKEOVER_POLL`] instead
/// cost a takeover forty opens per session per second, at the moment the new primary was
/// busiest.
const FALLBACK_POLL: Duration = Duration::from_millis(500);

/// How long the other sessions of the process wait for the notice, or for what the one asking
/// learns, before they ask themselves.
const FALLBACK_WAIT: Duration = Duration::from_secs(5);

impl Endpoints {
    /// `endpoints`: one address or several, comma-separated (`http://m1:7700,http://m2:7700`).
    pub(super) fn new(endpoints: &str, primary: Primary) -> Self {
        let all = endpoints.split(',').map(|e| e.trim().to_owned()).filter(|e| !e.is_empty()).collect();
        Self {
            all,
            current: 0,
            hint: None,
            last_tried: String::new(),
            gone: None,
            open: false,
            named: false,
            attempt: 0,
            polling_since: None,
            primary,
            followed: 0,
            takeover: false,
        }
    }

    /// The manager to try next, for a session that has seen frames of `seen_term`: a primary of
    /// a newer term among this session's managers, if the process knows of one, else the leader
    /// a standby named, else the next in turn.
    pub(super) fn next(&mut self, seen_term: u64) -> String {
        if let Some((term, endpoint)) = self.primary.above(seen_term.max(self.followed))
            && self.all.contains(&endpoint)
        {
            self.followed = term;
            self.hint = None;
            self.last_tried = endpoint.clone();
            // the managers after it come next in turn, should it fail
            self.current = self.all.iter().position(|e| *e == endpoint).unwrap_or(self.current);
            return endpoint;
        }
        let next = self.hint.take().unwrap_or_else(|| self.all[self.current % self.all.len().max(1)].clone());
        self.last_tried = next.clone();
        next
    }

    /// The manager [`Endpoints::next`] would try now.
    fn upcoming(&self, seen_term: u64) -> String {
        if let Some((_, endpoint)) = self.primary.above(seen_term.max(self.followed))
            && self.all.contains(&endpoint)
        {
            return endpoint;
        }
        self.hint.clone().unwrap_or_else(|| self.all[self.current % self.all.len().max(1)].clone())
    }

    /// After a successful open: the next failure is retried soon again.
    pub(super) fn connected(&mut self) {
        self.gone = None;
        self.open = true;
        self.named = false;
        self.attempt = 0;
        self.polling_since = None;
    }

    /// After a failed connection or a broken channel: follow the leader a standby named, or try
    /// the next manager. Returns how long to wait before [`Endpoints::next`]: [`TAKEOVER_POLL`]
    /// after a standby's answer, else a backoff that grows from 20 to 250 ms with the failures
    /// since the last open.
    pub(super) fn failed(&mut self, status: &Status) -> Duration {
        self.failed_at(status, std::time::Instant::now())
    }

    /// After a failure: waits as [`Endpoints::failed`] says, except during a takeover, when it
    /// waits for the process to learn of a primary newer than `seen_term` (at most
    /// [`FALLBACK_POLL`]).
    pub(super) async fn pause(&mut self, status: &Status, seen_term: u64) {
        let delay = self.failed(status);
        // a notice comes only on a stream the process holds: the manager asked next is asked
        // soon when there is none to it yet (a primary stepping down, say, ends its streams
        // naming no leader, and the process may hold no stream to the standby)
        if self.takeover && !self.primary.streams_to(&self.upcoming(seen_term)) {
            tokio::time::sleep(TAKEOVER_POLL).await;
        } else if self.takeover {
            let wait = if self.primary.take_turn(FALLBACK_POLL) { FALLBACK_POLL } else { FALLBACK_WAIT };
            let learnt = self.primary.wait_above(seen_term.max(self.followed), wait).await;
            if wait == FALLBACK_POLL && learnt.is_some() {
                // the process learnt of the primary: the next takeover's first ask is not kept waiting
                self.primary.end_turn();
            }
        } else {
            tokio::time::sleep(delay).await;
        }
    }

    /// [`Endpoints::failed`] at `now`.
    fn failed_at(&mut self, status: &Status, now: std::time::Instant) -> Duration {
        self.attempt += 1;
        self.takeover = false;
        let was_open = std::mem::take(&mut self.open);
        let was_named = std::mem::take(&mut self.named);
        // a standby answers with the leader it knows, empty when it knows none
        let leader = status.metadata().get(crate::LEADER_METADATA).and_then(|v| v.to_str().ok());
        let delay = if leader.is_some() && now - *self.polling_since.get_or_insert(now) < GONE_WAIT {
            TAKEOVER_POLL
        } else {
            Duration::from_millis((10u64 << self.attempt.min(5)).min(250))
        };
        match leader {
            Some(leader) if leader.starts_with("http://") || leader.starts_with("https://") => match &mut self.gone {
                Some((gone, since)) if gone == leader && now - *since < GONE_WAIT => {
                    // the standby has not noticed yet: ask it again, it is about to take over
                    self.hint = Some(self.last_tried.clone());
                    self.takeover = true;
                }
                _ => {
                    self.gone = None;
                    self.hint = Some(leader.to_owned());
                    self.named = true;
                }
            },
            _ => {
                // a standby that knows no primary: an election is under way
                self.takeover = leader.is_some();
                // A primary gone: its stream broke while the session was open on it, or a
                // standby named it and it is not the primary. Not a standby being asked that
                // ends its streams, as it does when it takes over: taking it for a gone primary
                // had the client ask the other manager, which names it as the new primary, again
                // and again for 5 s.
                if was_open || was_named {
                    self.gone = Some((self.last_tried.clone(), now));
                }
                let tried = self.all.iter().position(|e| *e == self.last_tried).unwrap_or(self.current);
                self.current = (tried + 1) % self.all.len().max(1);
            }
        }
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naming(leader: &str) -> Status {
        let mut status = Status::unavailable("a standby");
        status.metadata_mut().insert(crate::LEADER_METADATA, leader.parse().unwrap());
        status
    }

    /// A session that was open on a primary that went away asks the standby that still names it,
    /// every [`TAKEOVER_POLL`] for [`GONE_WAIT`]; then it tries the named primary (restarted
    /// where it was, a stale standby names it forever), and while that one is down, asks the
    /// standby again at the backoff's pace, for [`GONE_WAIT`] again, not for a number of asks.
    #[test]
    fn a_standby_naming_a_gone_primary_is_asked_again_then_the_primary_is_tried() {
        let (p, s) = ("http://p:1", "http://s:2");
        let mut endpoints = Endpoints::new(&format!("{p},{s}"), Primary::default());
        let mut now = std::time::Instant::now();
        assert_eq!(endpoints.next(0), p);
        endpoints.connected();
        assert_eq!(endpoints.failed_at(&Status::unavailable("the stream broke"), now), Duration::from_millis(20));
        let gone_at = now;
        // every 25 ms: the standby, until GONE_WAIT has passed; then the primary
        let mut asks = 0;
        while endpoints.next(0) == s {
            asks += 1;
            assert!(asks <= 201, "the standby was asked {asks} times");
            let delay = endpoints.failed_at(&naming(p), now);
            if now - gone_at < GONE_WAIT {
                assert_eq!(delay, TAKEOVER_POLL);
            }
            now += delay;
        }
        assert_eq!((asks, now - gone_at >= GONE_WAIT), (201, true));
        // the primary is still down: the standby again, every 250 ms now, for GONE_WAIT
        let backoff = Duration::from_millis(250);
        assert_eq!(endpoints.failed_at(&Status::unavailable("cannot connect"), now), backoff);
        let gone_at = now;
        let mut asks = 0;
        loop {
            now += backoff;
            if endpoints.next(0) == p {
                break;
            }
            asks += 1;
            assert!(asks <= 21, "the standby was asked {asks} times");
            assert_eq!(endpoints.failed_at(&naming(p), now), backoff);
        }
        assert_eq!((asks, now - gone_at >= GONE_WAIT), (20, true));
    }

    /// A standby that ends its streams as it takes over is not a primary gone: after the primary
    /// `p` went away, the session asks the standby `s` (which names `p`) until `s` closes its
    /// stream to become primary; then `p`, restarted as a standby, names `s`, and the session
    /// follows it at once. Taken for a gone primary, `s` was not followed for 5 s (`chaos.sh
    /// manager` saw takeovers of 7.4-7.9 s).
    #[test]
    fn a_standby_that_closes_its_stream_to_take_over_is_followed() {
        let (p, s) = ("http://p:1", "http://s:2");
        let mut endpoints = Endpoints::new(&format!("{p},{s}"), Primary::default());
        assert_eq!(endpoints.next(0), p);
        endpoints.connected();
        endpoints.failed(&Status::unavailable("the stream broke"));
        for _ in 0..3 {
            assert_eq!(endpoints.next(0), s);
            assert_eq!(endpoints.failed(&naming(p)), TAKEOVER_POLL);
        }
        assert_eq!(endpoints.next(0), s);
        endpoints.failed(&Status::unavailable("the manager closed the stream"));
        assert_eq!(endpoints.next(0), p);
        endpoints.failed(&naming(s));
        assert_eq!(endpoints.next(0), s, "the new primary is followed");
    }

    /// A session that was not open on the primary that went away (it fell a takeover behind)
    /// learns it is gone when the leader a standby named answers that it is a standby itself: it
    /// then asks the naming standby again, soon, rather than going back and forth between the two
    /// at the backoff's pace (250 ms), which could miss a short-lived primary.
    #[test]
    fn a_named_leader_that_is_a_standby_is_taken_for_gone() {
        let (x, s) = ("http://x:1", "http://s:2");
        let mut endpoints = Endpoints::new(&format!("{x},{s}"), Primary::default());
        let knows_none = || naming("");
        assert_eq!(endpoints.next(0), x);
        endpoints.failed(&Status::unavailable("cannot connect")); // x is down
        assert_eq!(endpoints.next(0), s);
        // s names x (its lease has not run out): x is followed, soon
        assert_eq!(endpoints.failed(&naming(x)), TAKEOVER_POLL);
        assert_eq!(endpoints.next(0), x);
        // x, restarted, is a standby that knows no primary yet: it is gone as a primary
        assert_eq!(endpoints.failed(&knows_none()), TAKEOVER_POLL);
        assert_eq!(endpoints.next(0), s);
        // s still names x: s is asked again until it takes over
        for _ in 0..3 {
            assert_eq!(endpoints.failed(&naming(x)), TAKEOVER_POLL);
            assert_eq!(endpoints.next(0), s);
        }
    }

    /// During a takeover a session does not ask every [`TAKEOVER_POLL`]: refused by the standby
    /// (which still names the gone primary), it waits for the process to learn of the new
    /// primary (the notice on the Multiplex stream), asking again only every [`FALLBACK_POLL`],
    /// and goes to the new primary as soon as the notice comes. New sessions go to the known
    /// primary first.
    #[tokio::test(start_paused = true)]
    async fn during_a_takeover_a_session_waits_for_the_new_primarys_notice() {
        let (p, s) = ("http://p:1", "http://s:2");
        let primary = Primary::default();
        let mut endpoints = Endpoints::new(&format!("{s},{p}"), primary.clone());
        primary.learn(3, p);
        // the process holds a stream to the standby (a notice can come on it)
        primary.stream(s, true);
        assert_eq!(endpoints.next(0), p, "the known primary first, not the first endpoint");
        endpoints.connected();
        endpoints.failed(&Status::unavailable("the stream broke"));
        let started = tokio::time::Instant::now();
        let notifier = primary.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1700)).await;
            notifier.learn(4, s);
        });
        let mut asks = 0;
        loop {
            assert_eq!(endpoints.next(3), s);
            if endpoints.followed == 4 {
                break;
            }
            asks += 1;
            assert!(asks <= 10, "asked {asks} times");
            endpoints.pause(&naming(p), 3).await;
        }
        // at 0, 500, 1000 and 1500 ms, then the notice at 1700 ms (at the 25 ms poll: 68 asks)
        assert_eq!(asks, 4);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(1700) && waited < Duration::from_millis(1750), "{waited:?}");
        // a primary of another cluster (not among the session's endpoints) is not followed
        primary.learn(9, "http://elsewhere:3");
        assert_eq!(endpoints.next(4), s);
    }

    /// A notice comes only on a stream the process holds: with none to the manager to ask next
    /// (a primary stepping down ended its streams naming no leader), a session asks it soon
    /// rather than wait for a notice that cannot come (it waited the 500 ms fallback, one
    /// SIGTERM handover in three in `bench manager`).
    #[tokio::test(start_paused = true)]
    async fn without_a_stream_to_the_next_manager_a_session_asks_it_soon() {
        let (p, s) = ("http://p:1", "http://s:2");
        let primary = Primary::default();
        let mut endpoints = Endpoints::new(&format!("{p},{s}"), primary.clone());
        primary.learn(3, p);
        primary.stream(p, true);
        assert_eq!(endpoints.next(0), p);
        endpoints.connected();
        let started = tokio::time::Instant::now();
        endpoints.pause(&naming(""), 3).await;
        assert_eq!(started.elapsed(), TAKEOVER_POLL);
        assert_eq!(endpoints.next(3), s);
        // once it holds one, it waits for the notice there
        primary.stream(s, true);
        let notifier = primary.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            notifier.learn(4, s);
        });
        endpoints.pause(&naming(p), 3).await;
        assert_eq!(started.elapsed(), TAKEOVER_POLL + Duration::from_millis(300));
        assert_eq!(endpoints.next(3), s);
        assert_eq!(endpoints.followed, 4);
    }

    /// A hundred sessions of one process refused during a takeover ask again one at a time,
    /// once per [`FALLBACK_POLL`] between them, not each on its own: 8 asks in 4 s, where each
    /// asking every [`TAKEOVER_POLL`] made 16,000.
    #[tokio::test(start_paused = true)]
    async fn one_session_per_process_asks_again_during_a_takeover() {
        let (p, s) = ("http://p:1", "http://s:2");
        let primary = Primary::default();
        primary.stream(s, true);
        let asks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let started = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let mut endpoints = Endpoints::new(&format!("{p},{s}"), primary.clone());
            let asks = asks.clone();
            tasks.push(tokio::spawn(async move {
                assert_eq!(endpoints.next(0), p);
                endpoints.connected();
                endpoints.failed(&Status::unavailable("the stream broke"));
                loop {
                    assert_eq!(endpoints.next(3), s);
                    endpoints.pause(&naming(p), 3).await;
                    if started.elapsed() >= Duration::from_secs(4) {
                        return;
                    }
                    asks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(asks.load(std::sync::atomic::Ordering::SeqCst), 7, "asks again within 4 s, after the first");
    }

    /// The backoff grows with failures in a row and starts again after a successful open: it
    /// had grown over a process's life, so each handover waited longer (58 ms, then 72, 109, 186
    /// and 280 ms from the fifth on, in `bench manager`).
    #[test]
    fn the_backoff_starts_again_after_each_successful_open() {
        let mut endpoints = Endpoints::new("http://a:1,http://b:2", Primary::default());
        let broke = || Status::unavailable("the stream broke");
        for round in 0..3 {
            let delays: Vec<u64> = (0..6)
                .map(|_| {
                    endpoints.next(0);
                    endpoints.failed(&broke()).as_millis() as u64
                })
                .collect();
            assert_eq!(delays, [20, 40, 80, 160, 250, 250], "round {round}");
            endpoints.connected();
        }
    }
}
