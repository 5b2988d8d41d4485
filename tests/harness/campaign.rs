//! A seeded fault campaign against the session manager, over real processes: a real etcd (Debian's
//! etcd-server), two or three `baton manager serve` processes each reaching etcd through a
//! [`FaultProxy`] of its own, a client session process and server session processes
//! (`baton-bench chaos-client`, `chaos-server`). A schedule drawn from a seed injects faults one
//! after another — SIGKILL of the primary or a standby, the double failure, SIGSTOP of the
//! primary past its lease, etcd stalled or restarted, one manager cut from, blackholed from or
//! slowed on its way to etcd, a journal write error, slow fsyncs, server session kills — and
//! every process records what it saw ([`history`](crate::history)). Afterwards the history is
//! checked: every acknowledged request answered exactly once, terms never going back, one
//! acknowledger per term, restart data never stale.
//!
//! The same seed gives the same schedule (which faults, in which order, with which durations and
//! targets); what the processes do between the faults is real and varies from run to run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use baton_mesh::proto::v1 as pb;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::fault_proxy::{FaultProxy, Mode};
use crate::history::{self, Event, HistoryWriter, Report, now_ms};
use crate::{Etcd, Server, TempDir};

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// SIGKILL the primary; restart it on its journal once the standby took over.
    KillPrimary,
    /// SIGKILL a standby; restart it a moment later.
    KillStandby,
    /// SIGKILL the primary; once the standby serves and has acknowledged alone, SIGKILL it too
    /// and restart the first on its older journal (which must not take over); then the second.
    DoubleFailure,
    /// SIGSTOP the primary for longer than its lease, then SIGCONT (it must fence).
    PausePrimary,
    /// SIGSTOP etcd for 3-6 s, then SIGCONT.
    EtcdStall,
    /// SIGKILL etcd and restart it on its data directory.
    EtcdRestart,
    /// The primary's way to etcd refuses and resets connections for longer than the lease.
    CutPrimary,
    /// The primary's way to etcd swallows everything for longer than the lease.
    BlackholePrimary,
    /// The primary's way to etcd is slow (100-400 ms each way) for a few seconds.
    DelayPrimary,
    /// The standby is restarted with a failpoint that fails its journal write once it is primary
    /// and has written some batches; then the primary hands over to it (SIGTERM).
    JournalError,
    /// A standby's fsyncs take 20-300 ms for a few seconds.
    SlowFsync,
    /// SIGKILL a server session process; start it again (same id or a new one).
    KillServer,
}

impl Kind {
    /// Every kind, in the order a short campaign takes them.
    pub const ALL: [Kind; 12] = [
        Kind::KillPrimary,
        Kind::DoubleFailure,
        Kind::KillStandby,
        Kind::PausePrimary,
        Kind::EtcdStall,
        Kind::EtcdRestart,
        Kind::CutPrimary,
        Kind::BlackholePrimary,
        Kind::DelayPrimary,
        Kind::JournalError,
        Kind::SlowFsync,
        Kind::KillServer,
    ];

    /// The kind named `name` (as [`Kind::name`] gives it).
    pub fn named(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Kind::KillPrimary => "kill-primary",
            Kind::KillStandby => "kill-standby",
            Kind::DoubleFailure => "double-failure",
            Kind::PausePrimary => "pause-primary",
            Kind::EtcdStall => "etcd-stall",
            Kind::EtcdRestart => "etcd-restart",
            Kind::CutPrimary => "etcd-cut-primary",
            Kind::BlackholePrimary => "etcd-blackhole-primary",
            Kind::DelayPrimary => "etcd-delay-primary",
            Kind::JournalError => "journal-error",
            Kind::SlowFsync => "slow-fsync",
            Kind::KillServer => "kill-server",
        }
    }

    /// Whether the fault makes the standby take over (its figure is the takeover time; for the
    /// others it is the time until the managers are whole again).
    pub fn takes_over(self) -> bool {
        matches!(
            self,
            Kind::KillPrimary
                | Kind::DoubleFailure
                | Kind::PausePrimary
                | Kind::EtcdStall
                | Kind::CutPrimary
                | Kind::BlackholePrimary
                | Kind::JournalError
        )
    }
}

/// A campaign's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// How many faults.
    pub faults: usize,
    /// The schedule's seed.
    pub seed: u64,
    /// Managers (2 or 3).
    pub managers: usize,
    /// The lease TTL in seconds (1 starts etcd with a 10 ms heartbeat and a 100 ms election
    /// timeout, whose minimum TTL is then 1 s).
    pub ttl_secs: u64,
    /// Client sessions in the client process.
    pub sessions: usize,
    /// Server session processes.
    pub servers: usize,
    /// The pause between a client session's requests.
    pub pace: Duration,
    /// The `baton-bench` binary (the client and server session processes).
    pub bench_bin: PathBuf,
    /// The kinds to draw from (all of them by default).
    pub kinds: Vec<Kind>,
    /// Take the kinds in order first, then at random (a short campaign covers every kind).
    pub every_kind_first: bool,
}

/// What a campaign found.
#[derive(Debug)]
pub struct Outcome {
    /// The history's check.
    pub report: Report,
    /// Per kind, the takeover (or recovery) time of each fault.
    pub figures: BTreeMap<Kind, Vec<Duration>>,
    /// What the driver itself saw go wrong (a manager without the latest acknowledgments taking
    /// over, a process that died, no recovery in time).
    pub violations: Vec<String>,
    /// Events in the history, and torn lines skipped.
    pub events: usize,
    /// Torn lines skipped in the history files.
    pub skipped: usize,
    /// Where the histories were kept, when the campaign found something (otherwise they are
    /// removed).
    pub kept: Option<PathBuf>,
}

impl Outcome {
    /// Whether nothing went wrong.
    pub fn ok(&self) -> bool {
        self.report.ok() && self.violations.is_empty() && self.report.acked > 0
    }

    /// How many faults.
    pub fn faults(&self) -> usize {
        self.figures.values().map(Vec::len).sum()
    }

    /// The p99 of the SIGKILL takeovers (kill-primary and the first kill of a double failure).
    pub fn kill_takeover_p99(&self) -> Option<Duration> {
        let mut all: Vec<Duration> = [Kind::KillPrimary, Kind::DoubleFailure]
            .iter()
            .flat_map(|k| self.figures.get(k).cloned().unwrap_or_default())
            .collect();
        all.sort();
        (!all.is_empty()).then(|| percentile(&all, 0.99))
    }

    /// The report: one line per kind, then `chaos: faults=… kinds=… acked=… lost=… duplicated=…
    /// takeover_p99=…ms seed=…`.
    pub fn lines(&self, seed: u64) -> Vec<String> {
        let mut out = Vec::new();
        for (kind, times) in &self.figures {
            let mut sorted = times.clone();
            sorted.sort();
            let what = if kind.takes_over() { "takeover" } else { "recovered" };
            out.push(format!(
                "{:<24} count={:<4} {what} p50={:.0}ms p99={:.0}ms max={:.0}ms",
                kind.name(),
                sorted.len(),
                ms(percentile(&sorted, 0.5)),
                ms(percentile(&sorted, 0.99)),
                ms(*sorted.last().unwrap_or(&Duration::ZERO)),
            ));
        }
        out.push(format!("history: {} events ({} torn lines skipped); {}", self.events, self.skipped, self.report));
        if let Some(dir) = &self.kept {
            out.push(format!("histories kept in {}", dir.display()));
        }
        for v in &self.violations {
            out.push(format!("violation: {v}"));
        }
        out.push(format!(
            "chaos: faults={} kinds={} acked={} lost={} duplicated={} takeover_p99={:.0}ms seed={seed}",
            self.faults(),
            self.figures.len(),
            self.report.acked,
            self.report.lost.len(),
            self.report.duplicated.len(),
            ms(self.kill_takeover_p99().unwrap_or_default()),
        ));
        out
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// One manager: its process (None while it is down), its journal and its way to etcd.
struct Member {
    server: Option<Server>,
    dir: TempDir,
    proxy: FaultProxy,
    addr: String,
}

/// A server session process.
struct ServerProc {
    child: Child,
    id: String,
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The running system and the driver's own history.
struct Cluster {
    config: Config,
    etcd: Etcd,
    election: String,
    members: Vec<Member>,
    endpoints: String,
    servers: Vec<ServerProc>,
    next_server: usize,
    client: Option<Child>,
    dir: TempDir,
    driver: HistoryWriter,
    /// (manager, term) pairs already recorded as `Primary`.
    seen_primaries: BTreeSet<(String, u64)>,
    violations: Vec<String>,
}

/// Status of the manager at `addr`, within a second.
async fn status_of(addr: &str) -> Option<pb::ManagerStatus> {
    tokio::time::timeout(Duration::from_secs(1), async {
        let channel = tonic::transport::Endpoint::from_shared(addr.to_owned()).ok()?.connect().await.ok()?;
        let mut client = pb::session_manager_client::SessionManagerClient::new(channel);
        client.status(pb::ManagerStatusRequest {}).await.ok().map(tonic::Response::into_inner)
    })
    .await
    .ok()
    .flatten()
}

impl Cluster {
    /// Starts member `i`'s process: on its own address (clients know the members by address),
    /// reaching etcd through its proxy.
    fn spawn_member(&self, i: usize, env: &[(&str, &str)]) -> Server {
        let m = &self.members[i];
        let (journal, ttl, etcd) = (m.dir.path().join("journal"), format!("{}s", self.config.ttl_secs), m.proxy.url());
        let args = [
            "manager",
            "serve",
            "--listen",
            m.addr.trim_start_matches("http://"),
            "--advertise",
            &m.addr,
            "--journal-dir",
            journal.to_str().unwrap(),
            "--etcd",
            &etcd,
            "--election-key",
            &self.election,
            "--lease-ttl",
            &ttl,
            "--snapshot-every",
            "20000",
            "--server-grace",
            "500ms",
        ];
        Server::spawn_raw_with_env(&args, env)
    }

    /// Starts member `i` again (it must be down), with `env`.
    fn start(&mut self, i: usize, env: &[(&str, &str)]) {
        let server = self.spawn_member(i, env);
        self.members[i].server = Some(server);
    }

    /// SIGKILLs member `i` (if it is up).
    fn kill(&mut self, i: usize) {
        if let Some(mut s) = self.members[i].server.take() {
            let _ = kill(Pid::from_raw(s.pid() as i32), Signal::SIGKILL);
            let _ = s.exited();
        }
    }

    fn signal(&self, i: usize, signal: Signal) {
        if let Some(s) = &self.members[i].server {
            let _ = kill(Pid::from_raw(s.pid() as i32), signal);
        }
    }

    /// Restarts every member that exited (a fenced primary, one that stepped down), without
    /// failpoints.
    fn restart_exited(&mut self) {
        for i in 0..self.members.len() {
            let exited = self.members[i].server.as_mut().is_none_or(|s| s.exited().is_some());
            if exited {
                self.members[i].server = None;
                self.start(i, &[]);
            }
        }
    }

    fn fault(&self, what: String) {
        self.driver.record(Event::Fault { at_ms: now_ms(), what });
    }

    /// Asks every live member; records every primary seen. Returns the statuses by member.
    async fn poll(&mut self) -> Vec<Option<pb::ManagerStatus>> {
        let mut out = Vec::new();
        for i in 0..self.members.len() {
            let up = self.members[i].server.is_some();
            let status = if up { status_of(&self.members[i].addr).await } else { None };
            if let Some(s) = &status
                && s.role == "PRIMARY"
                && self.seen_primaries.insert((self.members[i].addr.clone(), s.term))
            {
                self.driver.record(Event::Primary {
                    at_ms: now_ms(),
                    manager: self.members[i].addr.clone(),
                    term: s.term,
                });
            }
            out.push(status);
        }
        out
    }

    /// Waits (at most 60 s) until a primary has every member in its in-sync set and every other
    /// member follows it, caught up to where the primary was one poll before (the primary's own
    /// set still names a standby killed less than a second ago); restarts members that exited
    /// meanwhile. The primary's position and term, or None.
    async fn whole(&mut self) -> Option<(usize, u64)> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut before: Option<(usize, u64, u64)> = None; // primary, term, index at the last poll
        while Instant::now() < deadline {
            self.restart_exited();
            let statuses = self.poll().await;
            let primary = statuses.iter().enumerate().find_map(|(i, s)| {
                s.as_ref().filter(|s| s.role == "PRIMARY" && s.in_sync.len() == self.members.len()).map(|s| (i, s))
            });
            if let Some((i, p)) = primary {
                if let Some((was, term, index)) = before
                    && was == i
                    && term == p.term
                    && statuses.iter().enumerate().all(|(j, s)| {
                        j == i || s.as_ref().is_some_and(|s| s.role == "STANDBY" && s.journal_index >= index)
                    })
                {
                    return Some((i, p.term));
                }
                before = Some((i, p.term, p.journal_index));
            } else {
                before = None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Waits (at most `within`) for a primary of a term above `above`: its position, its term and
    /// the time since `since`. Each live member is asked in a loop of its own, so a stopped one
    /// (SIGSTOP, cut off) does not hold up finding the new primary.
    async fn takeover(&mut self, above: u64, since: Instant, within: Duration) -> Option<(usize, u64, Duration)> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(self.members.len());
        let mut askers = tokio::task::JoinSet::new();
        for (i, m) in self.members.iter().enumerate().filter(|(_, m)| m.server.is_some()) {
            let (addr, tx) = (m.addr.clone(), tx.clone());
            askers.spawn(async move {
                loop {
                    if let Some(s) = status_of(&addr).await
                        && s.role == "PRIMARY"
                        && s.term > above
                    {
                        let _ = tx.send((i, s.term, since.elapsed())).await;
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
        }
        drop(tx);
        let found = tokio::time::timeout(within, rx.recv()).await.ok().flatten();
        askers.abort_all();
        if let Some((i, term, _)) = found
            && self.seen_primaries.insert((self.members[i].addr.clone(), term))
        {
            self.driver.record(Event::Primary { at_ms: now_ms(), manager: self.members[i].addr.clone(), term });
        }
        found
    }

    fn start_server(&mut self, id: String) {
        let history = self.dir.path().join(format!("server-{id}-{}.jsonl", self.next_server));
        self.next_server += 1;
        let child = Command::new(&self.config.bench_bin)
            .args(["chaos-server", &self.endpoints, &id, history.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start baton-bench chaos-server");
        self.servers.push(ServerProc { child, id });
    }

    fn standby_of(&self, primary: usize, rng: &mut StdRng) -> usize {
        let others: Vec<usize> = (0..self.members.len()).filter(|i| *i != primary).collect();
        others[rng.random_range(0..others.len())]
    }

    /// Waits (at most `within`) for member `i` to exit.
    async fn exit_of(&mut self, i: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.members[i].server.as_mut().is_none_or(|s| s.exited().is_some()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// Injects one fault of `kind` into a whole cluster whose primary is `primary` (term
    /// `term`); returns the takeover or recovery time.
    async fn inject(&mut self, kind: Kind, primary: usize, term: u64, rng: &mut StdRng) -> Result<Duration, String> {
        let ttl = Duration::from_secs(self.config.ttl_secs);
        let takeover_within = ttl * 10 + Duration::from_secs(10);
        let no_takeover = || format!("{}: no takeover within {takeover_within:?}", kind.name());
        match kind {
            Kind::KillPrimary => {
                self.fault(format!("kill-primary {}", self.members[primary].addr));
                let t0 = Instant::now();
                self.kill(primary);
                let (_, _, took) = self.takeover(term, t0, takeover_within).await.ok_or_else(no_takeover)?;
                self.start(primary, &[]);
                Ok(took)
            }
            Kind::KillStandby => {
                let standby = self.standby_of(primary, rng);
                self.fault(format!("kill-standby {}", self.members[standby].addr));
                let t0 = Instant::now();
                self.kill(standby);
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..1000))).await;
                self.start(standby, &[]);
                self.whole().await.ok_or("kill-standby: not whole again within 60 s")?;
                Ok(t0.elapsed())
            }
            Kind::DoubleFailure => {
                let a = primary;
                self.fault(format!("double-failure kill {}", self.members[a].addr));
                let t0 = Instant::now();
                self.kill(a);
                let (b, b_term, took) = self.takeover(term, t0, takeover_within).await.ok_or_else(no_takeover)?;
                // B acknowledges alone for a moment, inside the window before A could catch up
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..800))).await;
                self.fault(format!("double-failure kill {}", self.members[b].addr));
                self.kill(b);
                self.start(a, &[]);
                // A lacks what B acknowledged: it must not take over while B is down
                let watch = Instant::now();
                while watch.elapsed() < ttl * 2 + Duration::from_millis(500) {
                    if let Some(s) = status_of(&self.members[a].addr).await
                        && s.role == "PRIMARY"
                        && s.term > b_term
                    {
                        self.violations.push(format!(
                            "double failure: {} took over (term {}) without the acknowledgments of {} (term {b_term})",
                            self.members[a].addr, s.term, self.members[b].addr
                        ));
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                self.start(b, &[]);
                Ok(took)
            }
            Kind::PausePrimary => {
                let pause = ttl + Duration::from_millis(rng.random_range(200..1500));
                self.fault(format!("pause-primary {} for {pause:?}", self.members[primary].addr));
                let t0 = Instant::now();
                self.signal(primary, Signal::SIGSTOP);
                let found = self.takeover(term, t0, pause + takeover_within).await;
                tokio::time::sleep(pause.saturating_sub(t0.elapsed())).await;
                self.signal(primary, Signal::SIGCONT);
                let (_, _, took) = found.ok_or_else(no_takeover)?;
                // resumed, it fences (its lease is gone) and exits
                if !self.exit_of(primary, Duration::from_secs(10)).await {
                    self.violations.push(format!(
                        "pause-primary: {} was still running 10 s after SIGCONT, past its lease",
                        self.members[primary].addr
                    ));
                }
                Ok(took)
            }
            Kind::EtcdStall => {
                let stall = Duration::from_millis(rng.random_range(3000..6000));
                self.fault(format!("etcd-stall for {stall:?}"));
                self.etcd.signal(Signal::SIGSTOP);
                tokio::time::sleep(stall).await;
                self.etcd.signal(Signal::SIGCONT);
                let back = Instant::now();
                // the old primary fenced during the stall (its lease ran out)
                let (_, _, took) = self.takeover(term, back, takeover_within).await.ok_or_else(no_takeover)?;
                Ok(took)
            }
            Kind::EtcdRestart => {
                self.fault("etcd-restart".to_owned());
                let t0 = Instant::now();
                self.etcd.restart();
                self.whole().await.ok_or("etcd-restart: not whole again within 60 s")?;
                Ok(t0.elapsed())
            }
            Kind::CutPrimary | Kind::BlackholePrimary => {
                let mode = if kind == Kind::CutPrimary { Mode::Cut } else { Mode::Blackhole };
                let hold = ttl + Duration::from_millis(rng.random_range(500..2000));
                self.fault(format!("{} {} for {hold:?}", kind.name(), self.members[primary].addr));
                let t0 = Instant::now();
                self.members[primary].proxy.set(mode);
                let found = self.takeover(term, t0, takeover_within).await;
                tokio::time::sleep(hold.saturating_sub(t0.elapsed())).await;
                self.members[primary].proxy.set(Mode::Pass);
                let (_, _, took) = found.ok_or_else(no_takeover)?;
                Ok(took)
            }
            Kind::DelayPrimary => {
                let delay = Duration::from_millis(rng.random_range(100..400));
                let hold = Duration::from_millis(rng.random_range(1000..4000));
                self.fault(format!("etcd-delay-primary {} {delay:?} for {hold:?}", self.members[primary].addr));
                let t0 = Instant::now();
                self.members[primary].proxy.set(Mode::Delay(delay));
                tokio::time::sleep(hold).await;
                self.members[primary].proxy.set(Mode::Pass);
                self.whole().await.ok_or("etcd-delay: not whole again within 60 s")?;
                Ok(t0.elapsed())
            }
            Kind::JournalError => {
                let standby = self.standby_of(primary, rng);
                // batches as primary before the write fails: some seconds of traffic, so that the
                // member it took over from is back in sync by then (almost always)
                let after = rng.random_range(1000..2000);
                let failpoint = format!("primary-journal-write={after}*off->return");
                self.fault(format!("journal-error {} after {after} batches", self.members[standby].addr));
                self.kill(standby);
                self.start(standby, &[("FAILPOINTS", &failpoint)]);
                let (_, whole_term) = self.whole().await.ok_or("journal-error: not whole with the armed standby")?;
                // hand over to the armed standby (the old primary starts again once it serves)
                self.signal(primary, Signal::SIGTERM);
                if !self.exit_of(primary, Duration::from_secs(10)).await {
                    return Err("journal-error: the SIGTERMed primary did not exit".to_owned());
                }
                self.members[primary].server = None;
                let taken = self.takeover(whole_term, Instant::now(), takeover_within).await;
                self.start(primary, &[]);
                let (_, armed_term, _) = taken.ok_or_else(no_takeover)?;
                // wait for the failure, remembering whether the other member was in sync and
                // when the armed one last answered as primary (the takeover counts from then)
                let deadline = Instant::now() + Duration::from_secs(60);
                let (mut others_in_sync, mut failed) = (false, Instant::now());
                while !self.exit_of(standby, Duration::from_millis(10)).await {
                    if Instant::now() > deadline {
                        return Err("journal-error: the armed primary did not fail within 60 s".to_owned());
                    }
                    if let Some(s) = status_of(&self.members[standby].addr).await
                        && s.role == "PRIMARY"
                    {
                        others_in_sync = s.in_sync.len() == self.members.len();
                        failed = Instant::now();
                    }
                }
                self.members[standby].server = None;
                if !others_in_sync {
                    // it failed before anyone else joined its in-sync set: only it may take over,
                    // so it is started again at once (availability given up, nothing lost)
                    self.fault(format!("journal-error {} failed alone: restarted", self.members[standby].addr));
                    self.start(standby, &[]);
                }
                let (_, _, took) = self.takeover(armed_term, failed, takeover_within).await.ok_or_else(no_takeover)?;
                if others_in_sync {
                    self.start(standby, &[]);
                }
                Ok(took)
            }
            Kind::SlowFsync => {
                let standby = self.standby_of(primary, rng);
                let sleep = rng.random_range(20..300);
                self.fault(format!("slow-fsync {} {sleep}ms", self.members[standby].addr));
                let t0 = Instant::now();
                self.kill(standby);
                let failpoint = format!("journal-fsync=sleep({sleep})");
                self.start(standby, &[("FAILPOINTS", &failpoint)]);
                tokio::time::sleep(Duration::from_millis(rng.random_range(1000..4000))).await;
                self.kill(standby);
                self.start(standby, &[]);
                self.whole().await.ok_or("slow-fsync: not whole again within 60 s")?;
                Ok(t0.elapsed())
            }
            Kind::KillServer => {
                let at = rng.random_range(0..self.servers.len());
                let victim = self.servers.remove(at);
                let same = rng.random_bool(0.5);
                let id = if same { victim.id.clone() } else { format!("s{}", self.next_server) };
                self.fault(format!("kill-server {} (back as {id})", victim.id));
                let t0 = Instant::now();
                drop(victim); // SIGKILL
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..1000))).await;
                self.start_server(id);
                Ok(t0.elapsed())
            }
        }
    }
}

/// Runs a campaign; the histories go under `dir`. Prints one line per fault as it goes.
pub async fn run(config: Config, dir: TempDir) -> Outcome {
    let mut rng = StdRng::seed_from_u64(config.seed);
    let etcd = if config.ttl_secs <= 1 {
        Etcd::start_with(&["--heartbeat-interval", "10", "--election-timeout", "100"])
    } else {
        Etcd::start()
    };
    let mut members = Vec::new();
    for _ in 0..config.managers {
        let proxy = FaultProxy::start(etcd.addr()).await.expect("start a fault proxy");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        members.push(Member { server: None, dir: TempDir::new(), proxy, addr: format!("http://127.0.0.1:{port}") });
    }
    let endpoints = members.iter().map(|m| m.addr.clone()).collect::<Vec<_>>().join(",");
    let driver = HistoryWriter::create(dir.path().join("driver.jsonl")).expect("create the driver's history");
    let mut cluster = Cluster {
        election: format!("/baton-chaos/{}-{}", std::process::id(), config.seed),
        config: config.clone(),
        etcd,
        members,
        endpoints,
        servers: Vec::new(),
        next_server: 0,
        client: None,
        dir,
        driver,
        seen_primaries: BTreeSet::new(),
        violations: Vec::new(),
    };
    for i in 0..config.managers {
        cluster.start(i, &[]);
    }
    for i in 0..config.servers {
        cluster.start_server(format!("s{i}"));
    }
    let client_history = cluster.dir.path().join("client.jsonl");
    let stop = cluster.dir.path().join("stop");
    cluster.client = Some(
        Command::new(&config.bench_bin)
            .args([
                "chaos-client",
                &cluster.endpoints,
                &config.sessions.to_string(),
                &config.pace.as_millis().to_string(),
                client_history.to_str().unwrap(),
                stop.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start baton-bench chaos-client"),
    );
    let mut figures: BTreeMap<Kind, Vec<Duration>> = BTreeMap::new();
    for n in 0..config.faults {
        let Some((primary, term)) = cluster.whole().await else {
            cluster.violations.push(format!("no whole cluster within 60 s before fault {}", n + 1));
            break;
        };
        // let traffic flow a moment
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..600))).await;
        let kinds = if config.kinds.is_empty() { &Kind::ALL[..] } else { &config.kinds[..] };
        let kind =
            if config.every_kind_first && n < kinds.len() { kinds[n] } else { kinds[rng.random_range(0..kinds.len())] };
        match cluster.inject(kind, primary, term, &mut rng).await {
            Ok(took) => {
                println!("fault {:>4}: {:<24} {:>6.0} ms", n + 1, kind.name(), ms(took));
                figures.entry(kind).or_default().push(took);
            }
            Err(e) => {
                println!("fault {:>4}: {:<24} failed: {e}", n + 1, kind.name());
                cluster.violations.push(e);
            }
        }
        if let Some(client) = cluster.client.as_mut()
            && let Ok(Some(status)) = client.try_wait()
        {
            cluster.violations.push(format!("the client process exited ({status}) during fault {}", n + 1));
            break;
        }
    }
    // heal, then let every acknowledged request be answered
    for m in &cluster.members {
        m.proxy.set(Mode::Pass);
    }
    cluster.etcd.signal(Signal::SIGCONT);
    for i in 0..cluster.members.len() {
        cluster.signal(i, Signal::SIGCONT);
    }
    if cluster.whole().await.is_none() {
        cluster.violations.push("no whole cluster within 60 s after the last fault".to_owned());
    }
    std::fs::write(&stop, b"").expect("write the stop file");
    let paths = history_files(cluster.dir.path());
    let drained = Instant::now();
    while drained.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Ok(h) = history::read(&paths_now(cluster.dir.path(), &paths)) else { continue };
        let r = history::check(&h.events);
        if r.acked > 0 && r.lost.is_empty() {
            break;
        }
    }
    if let Some(mut client) = cluster.client.take() {
        if let Ok(Some(status)) = client.try_wait() {
            cluster.violations.push(format!("the client process exited early ({status})"));
        }
        let _ = client.kill();
        let _ = client.wait();
    }
    cluster.servers.clear();
    let history = history::read(&history_files(cluster.dir.path())).expect("read the histories");
    let report = history::check(&history.events);
    let mut outcome = Outcome {
        report,
        figures,
        violations: std::mem::take(&mut cluster.violations),
        events: history.events.len(),
        skipped: history.skipped,
        kept: None,
    };
    if !outcome.ok() {
        outcome.kept = Some(std::mem::take(&mut cluster.dir).keep());
    }
    outcome
}

/// The history files under `dir`.
fn history_files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "jsonl")).collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The history files under `dir` now (server processes started since `known` add files).
fn paths_now(dir: &Path, known: &[PathBuf]) -> Vec<PathBuf> {
    let now = history_files(dir);
    if now.is_empty() { known.to_vec() } else { now }
}

fn payload(n: u64) -> prost_types::Any {
    prost_types::Any { type_url: "baton.chaos/n".into(), value: n.to_be_bytes().to_vec() }
}

/// The client session process (`baton-bench chaos-client ENDPOINTS SESSIONS PACE_MS HISTORY
/// STOP_FILE`): opens `sessions` client sessions in pool `chaos`, each sending numbered requests
/// one after another until `stop` exists, and records what it sent, what was acknowledged under
/// which term and what was answered. Exits 3 if a send fails: the library retries through
/// failovers, so a failure is a broken promise.
pub async fn client_process(endpoints: &str, sessions: usize, pace: Duration, history: &Path, stop: &Path) {
    let writer = HistoryWriter::create(history).expect("create the client history");
    let client = format!("client-{}", std::process::id());
    let connector = baton_manager_client::Connector::new(None).expect("a connector without a token");
    let mut tasks = Vec::new();
    for _ in 0..sessions {
        let mut session = loop {
            match baton_manager_client::ClientSession::open(&connector, endpoints, "chaos", Vec::new()).await {
                Ok(s) => break s,
                Err(e) => {
                    eprintln!("chaos-client: open: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        let id = session.session_id().to_owned();
        let sender = session.sender();
        let (w, c, s) = (writer.clone(), client.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            while let Some(r) = session.recv().await {
                let at_ms = now_ms();
                w.record(Event::Answered { at_ms, client: c.clone(), session: s.clone(), seq: r.seq, term: r.term });
            }
        }));
        let (w, c, stop) = (writer.clone(), client.clone(), stop.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.exists() {
                n += 1;
                w.record(Event::Sent { at_ms: now_ms(), client: c.clone(), session: id.clone(), seq: n });
                match sender.send_stamped(payload(n), Vec::new()).await {
                    Ok(a) => w.record(Event::Acked {
                        at_ms: now_ms(),
                        client: c.clone(),
                        session: id.clone(),
                        seq: a.seq,
                        term: a.term,
                        manager: String::new(),
                    }),
                    Err(e) => {
                        eprintln!("chaos-client: session {id} request {n} failed: {e}");
                        std::process::exit(3);
                    }
                }
                tokio::time::sleep(pace).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// A server session process (`baton-bench chaos-server ENDPOINTS SERVER_ID HISTORY`): serves pool
/// `chaos`, answers each request with its payload and the restart data `SEQ` (the number it
/// answered), and records every binding (with the restart data it got), every delivery, and every
/// reply the manager journaled (`Replied`, from the manager's acceptance). A binding and an
/// acceptance are recorded in the order the manager sent them on this server's stream, so a
/// `Bound` recorded after a `Replied` was sent after that reply was journaled. (Recording the
/// reply when the client got the answer instead raised false alarms: the library resends a
/// reply it kept on its own after a reconnect, which can be journaled and answered while a
/// `Bound` sent before it still waits in the server's event queue: 7 in 520 faults.)
pub async fn server_process(endpoints: &str, id: &str, history: &Path) {
    use baton_manager_client::{Connector, ServerEvent, ServerSession};
    let writer = HistoryWriter::create(history).expect("create the server history");
    let mut session = ServerSession::register_reporting_acceptances(
        &Connector::new(None).expect("a connector without a token"),
        endpoints,
        "chaos",
        id,
    );
    while let Some(event) = session.next().await {
        match event {
            ServerEvent::Bound { session_id, server_restart_data, term, .. } => {
                let restart = std::str::from_utf8(&server_restart_data).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
                writer.record(Event::Bound {
                    at_ms: now_ms(),
                    server: id.to_owned(),
                    session: session_id,
                    restart,
                    term,
                });
            }
            ServerEvent::Request { session_id, seq, payload, term, .. } => {
                writer.record(Event::Delivered {
                    at_ms: now_ms(),
                    server: id.to_owned(),
                    session: session_id.clone(),
                    seq,
                    term,
                });
                let restart = seq.to_string().into_bytes();
                if session.reply(&session_id, seq, payload.unwrap_or_default(), restart).await.is_err() {
                    return;
                }
            }
            ServerEvent::Accepted { session_id, seq, term } => {
                // the reply to `seq` carried the restart data `seq`
                writer.record(Event::Replied {
                    at_ms: now_ms(),
                    server: id.to_owned(),
                    session: session_id,
                    seq,
                    restart: seq,
                    term,
                });
            }
        }
    }
}
