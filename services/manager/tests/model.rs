//! An exhaustive, bounded model check of the manager failover protocol (`failover.rs`, and
//! `Actor::sync_standbys` in `service.rs`): every interleaving of the steps below within small
//! bounds, breadth first over the distinct states, with the invariants checked in every state; a
//! violation comes with a shortest trace.
//!
//! # The system
//!
//! Three managers M0, M1, M2 share one etcd. The state ([`State`]): the etcd leader key (holder
//! and term, or none), the term counter, and the in-sync key `{term, members, journals, index}`,
//! which names each member with the journal id of its journal directory (or none: a new cluster
//! has none, and then every manager is eligible, as `eligible` in `failover.rs` has it); per
//! manager ([`Manager`]): whether its process is alive, its durable journal of `(message, term)`
//! entries and the journal's id (created with the directory: a restart keeps it, a wiped disk
//! comes back with a new one), the highest term it has seen, its role (a standby following at
//! most one primary's stream, or a primary of a term, with its in-sync set and journal ids as it
//! last wrote them, the durable length and journal id each standby reported on its stream, and
//! its write of the set in flight), and the history: each acknowledged message with the term and
//! manager that acknowledged it.
//!
//! The steps ([`Action`]), in every order: an alive standby that is eligible wins the election when
//! no one holds the leader key (eligible: named by the set, with journal identity under the journal
//! id it has now, and with the position check holding at least `set.index` entries); a client
//! message arrives at a primary, deposed or not; a standby connects to the leader, reporting its
//! journal id, and is reset to a copy of its journal; the next entry on a standby's stream is made
//! durable and reported; a primary drops a standby from its set, adds a caught-up one under the
//! journal id it reported, or (with journal identity) removes a member that reconnected with
//! another journal id than its set gives it, and etcd applies (or refuses) the write as a later
//! step, racing elections; a manager is killed; a dead manager restarts with its journal, or with
//! a wiped disk and a new journal id; the leader's lease expires, whether its process is dead or
//! alive (paused, cut off from etcd: it goes on acting as primary; only etcd's fencing stops it,
//! and its standbys leave it for the next leader).
//!
//! [`Protocol::FIXED`] publishes `{term, {self with its journal id}, own length}` on election and
//! acknowledges nothing before that write succeeded, fences every write of the set on the writer's
//! leader key (a refused writer exits, as `EXIT_FENCED`), checks the candidate's position, and
//! checks its journal identity (the set must name it with the journal id it has now; a primary
//! removes a member that reconnects under another id, which joins again once caught up). Each fix
//! can be turned off to get today's behaviour: the new primary acknowledges alone at once and
//! leaves the etcd set as it was; writes are plain puts; any member of the set may win; journal
//! ids are carried but never compared.
//!
//! # Invariants
//!
//! - I1, no acknowledged message is lost ([`Invariant::NoAcknowledgedMessageLost`]): every
//!   primary holds every message acknowledged under an earlier term (the loss itself), and every
//!   manager that could win the next election holds every acknowledged message (the early
//!   warning: every eligible manager, dead ones included as they may restart with their journal,
//!   but not primaries, which do not campaign). Being named by the set alone is not enough to be
//!   checked, or every wiped member would be a violation even where the journal identity or the
//!   position check keeps it out; with no set in etcd every manager is eligible. [`Bounds::early_warning`] turns the
//!   early warning off to search for the loss itself.
//! - I2, one acknowledger per term ([`Invariant::OneAcknowledgerPerTerm`]). It holds by
//!   construction here (each election hands out a new term and only its winner acknowledges under
//!   it); it is checked to guard the model.
//!
//! # What is abstracted away, and why it is sound enough
//!
//! - Time. Any lease may expire at any moment, and a deposed primary acts until it is killed or
//!   etcd refuses its fenced write: a stronger adversary than the code's watchdog.
//! - Delivery and the durable report are one step. The report travels on the standby's own stream,
//!   so it only arrives late, never early or out of order, and a primary that knows less can do
//!   nothing that one knowing more cannot (acknowledging and adding a standby need a high enough
//!   report; dropping a standby is allowed at any time): every state of the finer model is
//!   simulated by one of this model with the primary knowing at least as much, and the invariants
//!   only get harder with more acknowledged. Stale reports are kept: a primary keeps a dead
//!   standby's last report until the standby reconnects, as the code learns late that a stream
//!   ended.
//! - A stream delivers one entry per step, in order; a frame of several entries is several steps
//!   with nothing in between, which the interleavings include. A lost frame is one never
//!   delivered; a delayed one is delivered later.
//! - A standby follows one stream, opened to the manager that holds the leader key when it
//!   connects (`follow` asks etcd for the leader and connects to it); reading the leader earlier
//!   and connecting once it has been deposed is covered by connecting while it led and receiving
//!   its later frames. Terms only grow, so the standby's term check never refuses here (a search
//!   that kept the seen term in the visited set and asserted that found no refusal); it is
//!   modelled all the same.
//! - A stream ends at once when either end dies and when the primary drops the standby from its
//!   set; a frame still in flight then is delivered before or never (it would only extend the
//!   standby's journal with the primary's entries, which it can receive earlier here).
//! - A primary whose write of the set is in flight does nothing else (the actor awaits the put in
//!   `sync_standbys`): it appends, acknowledges and decides nothing until the write is applied
//!   or refused. Connections are accepted (its journal cannot change meanwhile). This matters: a
//!   primary that went on acknowledging under its last written set while adding a standby would
//!   let the standby join without the entries acknowledged meanwhile, at an index it passes (a
//!   variant of this model finds that in five steps).
//! - Acknowledgements are made as soon as allowed ([`Model::acknowledge`]): once allowed an
//!   acknowledgement stays allowed until the primary awaits a write or dies, no step depends on
//!   the history, and the invariants only get harder with more acknowledged. Only the primary that
//!   appended a message acknowledges it (a new primary does not acknowledge older entries: clients
//!   send those again, which is a new message here).
//! - An election is one step: the eligibility check, the win and the check after winning see one
//!   set. With fenced writes nothing can change the set between the win and the re-check (the
//!   winner holds the key); with plain puts the model misses that window, which only makes the
//!   bug hunt harder.
//! - A dead process's write of the set stays in flight (etcd may apply it while its lease holds
//!   the key); a restart drops it (it was applied before, or never). With fenced writes that is
//!   exact: while the dead leader's lease holds the key no one is elected and the restarted
//!   manager has no one to follow, and after it the write is refused.
//! - Journal ids are random in the code; here a manager's ids are `j0`, `j1`, ... (the number of
//!   wipes it went through), as only ids given to one address are ever compared. The visited set
//!   keeps each recorded id as its age (how many wipes of its manager ago it was current), which
//!   is exact: an id never comes back.
//! - The removal of a member that reconnected under another id is the primary's next change of the
//!   set: while it stands the primary decides no other drop or add (messages still arrive), and
//!   its acknowledgements go on counting the member's reports on its new stream, so nothing is
//!   acknowledged without it before the removal is written. The check is against the set as the
//!   primary last wrote it, so a standby that reconnects under a new id while the write naming it
//!   under the old one is in flight is removed once that write is applied. The stream stays; the
//!   standby joins again as any caught-up standby does. Within the model the removal matters for
//!   liveness (a set that names a wiped member under its old id never lets it take over), and
//!   safety comes from the eligibility check.
//! - Not modelled: payloads and session state, snapshots, the catch-up window, a disk that loses
//!   only part of its journal (and keeps its directory and id), more managers or messages than the
//!   bounds allow.
//! - The visited set ([`Model::key`]) merges states that behave alike: up to renaming the managers,
//!   renumbering the terms, and forgetting what can no longer matter.
//!
//! # Results
//!
//! States explored by each test (`cargo test -p baton-manager --test model -- --nocapture` prints
//! each count, time and trace). In a debug build on two cores, with another build competing for
//! them (load average 5), the whole run took 44 to 48 s of wall time (29 to 32 s of CPU): the
//! running and fresh-without-wipe searches 10 to 13 s side by side, then the fresh search with a
//! wiped disk 34 to 36 s (about 25 s of CPU on its own), the others milliseconds.
//!
//! | test | start, bounds | states | result |
//! |---|---|---|---|
//! | `the_fixed_protocol_loses_nothing_in_any_bounded_history` | fresh, defaults | 2,514,684 | safe |
//! | `the_fixed_protocol_loses_nothing_from_a_running_cluster` | running, [`RUNNING`] | 452,235 | safe |
//! | `the_fixed_protocol_loses_nothing_from_a_fresh_cluster_without_disk_loss` | fresh, no wipe | 476,114 | safe |
//! | `without_journal_identity_…` | fresh, defaults / to the loss | 142 / 655 | I1 violated |
//! | `without_publishing_on_election_…` | running, crashes only / running / fresh | 2,678 / 172 / 9 | I1 violated |
//! | `without_fenced_writes_…` | running | 598 | I1 violated |
//! | `without_the_position_check_…` (nor journal identity) | running / to the loss | 10 / 166 | I1 violated |
//!
//! The position check alone does not keep a wiped manager out. It compares a candidate's journal
//! with the index recorded when the set was last written, and that index is 0 when the writer's
//! journal was empty then: the first primary of a new cluster publishes itself at index 0, and a
//! set that has not changed since keeps that index. Without journal identity the shortest trace:
//! M0 wins the first election with an empty journal `j0` and etcd applies its set `{M0:j0}`
//! (term 1, index 0); m0 arrives and M0 acknowledges it alone; M0 is killed and restarts on a wiped
//! disk (journal `j1`), and can win the next election without m0 (named by the set, 0 >= 0); two
//! steps on (the lease expires, M0 wins with `[]`) it is primary without m0. With journal identity
//! the set names `M0:j0` and M0 now has `j1`: it is out until a primary adds it again under `j1`,
//! once caught up.
//!
//! With journal identity the model finds no violation without the position check either
//! (2,589,259 states from a fresh cluster at the default bounds, 466,062 from the running one at
//! [`RUNNING`]; not kept as tests, for the time they take): where a disk keeps all of its journal
//! or none of it, the journal id does the work. The position check is left for a journal that
//! loses entries but keeps its directory and id, which this model leaves out, and it covers that
//! only down to the set's index, which may be stale-low: in the trace above a journal of M0 cut
//! back to `[]` under `j0` would pass both checks.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Instant;

/// The number of managers.
const N: usize = 3;
/// Room for messages in a journal: the pre-existing one of [`Start::Running`] plus the bound.
const MAX_MSGS: usize = 4;

/// Which of the three fixes are in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Protocol {
    /// A new primary writes `{term, {self}, own length}` to etcd and acknowledges nothing until
    /// that write succeeded; without it the new primary acknowledges alone at once and the etcd
    /// set keeps naming the old members.
    publish_on_election: bool,
    /// Every write of the set is an etcd transaction conditioned on the writer still holding its
    /// leader key with its term; without it writes are plain puts that always succeed.
    fenced_set_writes: bool,
    /// A candidate must also hold at least `set.index` entries; without it any manager named by
    /// the set may win.
    position_check: bool,
    /// The set names each member with the journal id of its journal directory (a wiped disk
    /// restarts with a new one) and a candidate must still have that journal; a primary removes
    /// a member that reconnects with another id. Without it the ids are carried but never
    /// compared: a manager named by the set is eligible whatever journal it has now.
    journal_identity: bool,
}

impl Protocol {
    /// The protocol with all three fixes.
    const FIXED: Protocol =
        Protocol { publish_on_election: true, fenced_set_writes: true, position_check: true, journal_identity: true };
}

/// Where a search starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    /// A new cluster, as `baton manager serve` starts one: three alive standbys with empty
    /// journals, no leader key and no in-sync key (so every manager is eligible).
    Fresh,
    /// A cluster that has served: M0 is primary of term 1 with M1 in sync (the set
    /// `{M0, M1}` of term 1 at index 1 in etcd), message m0 is acknowledged and in both
    /// journals; M2 is a standby outside the set with an empty journal.
    Running,
}

/// The bounds of a search (and two choices of what to search for).
#[derive(Clone, Copy, Debug)]
struct Bounds {
    /// Where the search starts.
    start: Start,
    /// Client messages that arrive (at most [`MAX_MSGS`] - 1).
    messages: u8,
    /// Managers killed (SIGKILL, crash, power loss; the journal survives).
    kills: u8,
    /// Dead managers restarted with their journal.
    restarts: u8,
    /// Dead managers restarted with a wiped disk (an empty journal).
    wipes: u8,
    /// Expiries of the leader's lease.
    expiries: u8,
    /// Whether the lease of a leader whose process is alive may expire (a paused or partitioned
    /// primary, which goes on acting as primary); when false only a dead leader's lease expires.
    pauses: bool,
    /// Whether to check the early warning of I1 (no manager that could be elected next lacks an
    /// acknowledged message) besides the loss itself (a primary that lacks one).
    early_warning: bool,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            start: Start::Fresh,
            messages: 2,
            kills: 2,
            restarts: 1,
            wipes: 1,
            expiries: 3,
            pauses: true,
            early_warning: true,
        }
    }
}

/// A journal entry: a message and the term of the primary that appended it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Entry {
    /// The message id.
    msg: u8,
    /// The term under which it was appended.
    term: u8,
}

/// A journal (fixed capacity so that states are `Copy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Journal {
    /// The number of entries.
    len: u8,
    /// The entries; those past `len` are zero.
    slots: [Entry; MAX_MSGS],
}

impl Journal {
    /// The entries.
    fn entries(&self) -> &[Entry] {
        &self.slots[..usize::from(self.len)]
    }

    /// Appends an entry.
    fn push(&mut self, entry: Entry) {
        self.slots[usize::from(self.len)] = entry;
        self.len += 1;
    }

    /// Whether it holds message `msg`.
    fn holds(&self, msg: u8) -> bool {
        for e in self.entries() {
            if e.msg == msg {
                return true;
            }
        }
        false
    }
}

impl fmt::Display for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries: Vec<String> = self.entries().iter().map(|e| format!("m{}@{}", e.msg, e.term)).collect();
        write!(f, "[{}]", entries.join(", "))
    }
}

/// A set of managers, as a bit mask.
type Members = u8;

/// The bit of manager `m`.
fn bit(m: usize) -> Members {
    1 << m
}

/// Renders a set of managers as `{M0, M2}`.
fn members(set: Members) -> String {
    let names: Vec<String> = (0..N).filter(|m| set & bit(*m) != 0).map(|m| format!("M{m}")).collect();
    format!("{{{}}}", names.join(", "))
}

/// Renders a set of managers with their journal ids as `{M0:j0, M2:j1}`.
fn named(set: Members, journals: &[u8; N]) -> String {
    let names: Vec<String> = (0..N).filter(|m| set & bit(*m) != 0).map(|m| format!("M{m}:j{}", journals[m])).collect();
    format!("{{{}}}", names.join(", "))
}

/// `journals` of the members of `set`, the others zero (so that equal sets compare equal).
fn only(set: Members, journals: [u8; N]) -> [u8; N] {
    let mut kept = [0; N];
    for m in 0..N {
        if set & bit(m) != 0 {
            kept[m] = journals[m];
        }
    }
    kept
}

/// The in-sync set as stored in etcd (and as carried by a write in flight).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct InSync {
    /// The writer's term.
    term: u8,
    /// The members.
    members: Members,
    /// The journal id of each member (see [`Manager::journal_id`]); zero for the others.
    journals: [u8; N],
    /// The writer's journal length when it decided the write.
    index: u8,
}

impl fmt::Display for InSync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (term {}, index {})", named(self.members, &self.journals), self.term, self.index)
    }
}

/// What a manager process believes it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// A standby, following at most one primary's Replicate stream.
    Standby {
        /// The primary whose stream it follows.
        link: Option<u8>,
    },
    /// A primary (possibly deposed without knowing it).
    Primary {
        /// Its term (the revision of its leader key).
        term: u8,
        /// The in-sync set as it last wrote it successfully; acknowledgements wait for these.
        view: Members,
        /// The journal ids that set gave its members (zero for the others).
        journals: [u8; N],
        /// The durable length each standby last reported on its stream, if it has one; kept
        /// after the standby dies (the primary learns of that late), reset when it reconnects.
        known: [Option<u8>; N],
        /// The journal id each standby reported when it connected (the first message of its
        /// stream), read with `known`.
        ids: [u8; N],
    },
}

/// One manager: the process (if alive) and its disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Manager {
    /// Whether its process runs.
    alive: bool,
    /// Its durable journal.
    journal: Journal,
    /// The id of its journal directory, created with the directory: the number of times this
    /// manager restarted on a wiped disk (random in the code; here `j0`, `j1`, ... per manager,
    /// which compare the same way, as only a manager's own ids are ever compared).
    journal_id: u8,
    /// The highest term of the frames it applied (in memory: 0 after a restart, as in the code).
    /// Frames of an older term are refused; here that never happens, as a standby follows one
    /// stream, opened to the leader of the moment, and terms only grow. Left out of
    /// [`Model::key`] for that reason.
    seen_term: u8,
    /// Standby or primary (a dead manager is a standby without a link).
    role: Role,
    /// Its write of the set that etcd has not applied yet: the primary awaits it and does nothing
    /// else meanwhile; it stays in flight when the process dies (etcd may still apply it).
    put: Option<InSync>,
}

/// The whole system.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct State {
    /// The etcd leader key: holder and term.
    leader: Option<(u8, u8)>,
    /// The last term handed out (the revision counter).
    last_term: u8,
    /// The in-sync key.
    set: Option<InSync>,
    /// The managers.
    managers: [Manager; N],
    /// The history: per message, the term and manager that acknowledged it.
    acked: [Option<(u8, u8)>; MAX_MSGS],
    /// The next message id.
    next_msg: u8,
    /// Kills so far.
    kills: u8,
    /// Restarts with the journal so far.
    restarts: u8,
    /// Restarts with a wiped disk so far.
    wipes: u8,
    /// Lease expiries so far.
    expiries: u8,
}

/// One step of the system.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// An alive, eligible standby wins the election (no one holds the leader key). One step: the
    /// check before campaigning and the check after winning see one set (with fenced writes
    /// nothing can change it in between, as the winner holds the key).
    Elect(u8),
    /// A client message arrives at a (possibly deposed) primary, which appends it.
    Message(u8),
    /// A standby reads the leader from etcd, connects to it and applies the reset (a copy of the
    /// primary's journal), reporting its durable length.
    Connect(u8),
    /// The next entry on a standby's stream is applied and made durable, and the standby's
    /// report of its durable length reaches the primary.
    Deliver(u8),
    /// A primary decides to drop a standby from the set (it stopped acknowledging); the write
    /// follows as [`Action::Write`].
    Shrink(u8, u8),
    /// A primary decides to add a caught-up standby to the set; the write follows.
    Grow(u8, u8),
    /// A primary removes from the set a member that reconnected with another journal id than
    /// the set gives it (it was wiped and restarted); the stream stays, and the standby joins
    /// again by [`Action::Grow`] under its new id. The write follows.
    Evict(u8, u8),
    /// etcd applies (or, fenced, refuses) a manager's write of the set.
    Write(u8),
    /// A manager's process dies.
    Kill(u8),
    /// A dead manager restarts with its journal.
    Restart(u8),
    /// A dead manager restarts with a wiped disk.
    Wipe(u8),
    /// The leader's lease expires: etcd deletes the leader key.
    Expire,
}

/// The invariants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Invariant {
    /// No acknowledged message is lost: every manager that could win the next election holds
    /// every acknowledged message (the early warning), and every primary holds every message
    /// acknowledged under an earlier term (the loss).
    NoAcknowledgedMessageLost,
    /// No two different managers acknowledged under the same term.
    OneAcknowledgerPerTerm,
}

/// A violation found by [`explore`].
#[derive(Debug)]
struct Violation {
    /// Which invariant failed.
    invariant: Invariant,
    /// How it failed, in the last state.
    detail: String,
    /// The shortest path to it from the start, one line per step.
    trace: Vec<String>,
}

/// What [`explore`] found.
#[derive(Debug)]
struct Outcome {
    /// The number of distinct states reached.
    states: usize,
    /// The first violation (at the smallest depth), if any.
    violation: Option<Violation>,
}

/// A fast hasher (after FxHash) for the visited set, so that the debug build keeps to its budget.
#[derive(Default)]
struct Fx(u64);

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }

    fn write_isize(&mut self, i: isize) {
        self.write_u64(i as u64);
    }

    fn finish(&self) -> u64 {
        // the table indexes by the low bits, which the multiplications leave weak
        self.0 ^ (self.0 >> 29)
    }
}

/// Every renaming of the managers: manager `i` becomes `pi[i]`.
const PERMUTATIONS: [[usize; N]; 6] = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];

/// The inverse of each renaming of [`PERMUTATIONS`]: `INVERSES[p][new]` is the manager that
/// `PERMUTATIONS[p]` renames `new`.
const INVERSES: [[usize; N]; 6] = {
    let mut inverses = [[0; N]; 6];
    let mut p = 0;
    while p < 6 {
        let mut old = 0;
        while old < N {
            inverses[p][PERMUTATIONS[p][old]] = old;
            old += 1;
        }
        p += 1;
    }
    inverses
};

/// `RENAMED[p][set]`: `set` with manager `i` renamed `PERMUTATIONS[p][i]`.
const RENAMED: [[u8; 1 << N]; 6] = {
    let mut renamed = [[0; 1 << N]; 6];
    let mut p = 0;
    while p < 6 {
        let mut set = 0;
        while set < 1 << N {
            let mut i = 0;
            while i < N {
                if set & (1 << i) != 0 {
                    renamed[p][set] |= 1 << PERMUTATIONS[p][i];
                }
                i += 1;
            }
            set += 1;
        }
        p += 1;
    }
    renamed
};

/// `set` renamed by `PERMUTATIONS[p]`.
fn rename(set: Members, p: usize) -> u64 {
    u64::from(RENAMED[p][usize::from(set)])
}

/// Term `t` renumbered: the number of terms in use (the bits of `terms`) up to it.
fn rank(terms: u32, t: u8) -> u64 {
    u64::from((terms & ((2u32 << t) - 1)).count_ones())
}

/// A state packed into 256 bits: the visited set holds these.
#[derive(Clone, Copy, Debug, Default, PartialOrd, Ord)]
struct Key([u64; 4]);

// By hand, word by word: the derived ones hash the bytes and compare with memcmp, which the debug
// build pays for on every state reached.
impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        let (a, b) = (&self.0, &other.0);
        a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
    }
}

impl Eq for Key {}

impl std::hash::Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        for word in self.0 {
            state.write_u64(word);
        }
    }
}

/// Packs small numbers into a [`Key`].
#[derive(Default)]
struct Packer {
    /// The bits so far.
    words: Key,
    /// How many bits are used.
    used: u32,
}

impl Packer {
    /// Appends `value` in `width` bits.
    fn push(&mut self, value: u64, width: u32) {
        assert!(value < 1 << width, "{value} does not fit in {width} bits: lower the bounds");
        let (word, offset) = ((self.used / 64) as usize, self.used % 64);
        self.words.0[word] |= value << offset;
        if offset + width > 64 {
            self.words.0[word + 1] |= value >> (64 - offset);
        }
        self.used += width;
    }
}

/// The transition system of one protocol variant within bounds.
struct Model {
    /// The protocol variant.
    protocol: Protocol,
    /// The bounds.
    bounds: Bounds,
    /// The first message id that is not acknowledged at the start.
    first_msg: u8,
}

impl Model {
    /// A model of `protocol` within `bounds`.
    fn new(protocol: Protocol, bounds: Bounds) -> Model {
        let first_msg = match bounds.start {
            Start::Fresh => 0,
            Start::Running => 1,
        };
        assert!(usize::from(first_msg + bounds.messages) <= MAX_MSGS, "raise MAX_MSGS for this many messages");
        Model { protocol, bounds, first_msg }
    }

    /// The start state.
    fn initial(&self) -> State {
        let standby = Manager {
            alive: true,
            journal: Journal::default(),
            journal_id: 0,
            seen_term: 0,
            role: Role::Standby { link: None },
            put: None,
        };
        let mut state = State {
            leader: None,
            last_term: 0,
            set: None,
            managers: [standby; N],
            acked: [None; MAX_MSGS],
            next_msg: 0,
            kills: 0,
            restarts: 0,
            wipes: 0,
            expiries: 0,
        };
        if self.bounds.start == Start::Running {
            let mut journal = Journal::default();
            journal.push(Entry { msg: 0, term: 1 });
            state.leader = Some((0, 1));
            state.last_term = 1;
            state.set = Some(InSync { term: 1, members: bit(0) | bit(1), journals: [0; N], index: 1 });
            state.managers[0].journal = journal;
            state.managers[0].role = Role::Primary {
                term: 1,
                view: bit(0) | bit(1),
                journals: [0; N],
                known: [None, Some(1), None],
                ids: [0; N],
            };
            state.managers[1].journal = journal;
            state.managers[1].seen_term = 1;
            state.managers[1].role = Role::Standby { link: Some(0) };
            state.acked[0] = Some((1, 0));
            state.next_msg = 1;
        }
        state
    }

    /// Whether manager `m` passes the eligibility check against the etcd set (before
    /// campaigning and again after winning: see [`Action::Elect`] for why once is enough here):
    /// the set names it, with the journal id it has now (with [`Protocol::journal_identity`]),
    /// and its journal reaches the set's index (with [`Protocol::position_check`]).
    fn eligible(&self, state: &State, m: usize) -> bool {
        let manager = &state.managers[m];
        match state.set {
            None => true,
            Some(set) => {
                set.members & bit(m) != 0
                    && (!self.protocol.journal_identity || set.journals[m] == manager.journal_id)
                    && (!self.protocol.position_check || manager.journal.len >= set.index)
            }
        }
    }

    /// The member of primary `p`'s in-sync set (`role`) that reconnected with another journal
    /// id than the set gives it, if any: the primary must remove it (with
    /// [`Protocol::journal_identity`]).
    fn renamed_member(&self, p: usize, role: &Role) -> Option<usize> {
        let Role::Primary { view, journals, known, ids, .. } = role else { return None };
        if !self.protocol.journal_identity {
            return None;
        }
        (0..N).find(|o| *o != p && view & bit(*o) != 0 && known[*o].is_some() && ids[*o] != journals[*o])
    }

    /// Whether the process that holds the leader key is alive and still primary of that term.
    fn leader_alive(state: &State) -> bool {
        state.leader.is_some_and(|(holder, term)| {
            let m = &state.managers[usize::from(holder)];
            m.alive && matches!(m.role, Role::Primary { term: t, .. } if t == term)
        })
    }

    /// The actions enabled in `state`, into `out`.
    fn actions(&self, state: &State, out: &mut Vec<Action>) {
        let bounds = &self.bounds;
        for (i, m) in state.managers.iter().enumerate() {
            let id = i as u8;
            if m.put.is_some() {
                out.push(Action::Write(id));
            }
            if !m.alive {
                if state.restarts < bounds.restarts {
                    out.push(Action::Restart(id));
                }
                if state.wipes < bounds.wipes {
                    out.push(Action::Wipe(id));
                }
                continue;
            }
            if state.kills < bounds.kills {
                out.push(Action::Kill(id));
            }
            match m.role {
                Role::Standby { link } => {
                    if state.leader.is_none() && self.eligible(state, i) {
                        out.push(Action::Elect(id));
                    }
                    if let Some((holder, term)) = state.leader
                        && usize::from(holder) != i
                        && term >= m.seen_term
                        && Self::leader_alive(state)
                    {
                        out.push(Action::Connect(id));
                    }
                    if let Some(p) = link {
                        let primary = &state.managers[usize::from(p)];
                        if let Role::Primary { term, .. } = primary.role
                            && primary.alive
                            && term >= m.seen_term
                            && m.journal.len < primary.journal.len
                        {
                            out.push(Action::Deliver(id));
                        }
                    }
                }
                Role::Primary { view, known, .. } => {
                    if m.put.is_some() {
                        continue;
                    }
                    if state.next_msg < self.first_msg + bounds.messages {
                        out.push(Action::Message(id));
                    }
                    // a member that reconnected under a new journal id is the next change of the set
                    if let Some(o) = self.renamed_member(i, &m.role) {
                        out.push(Action::Evict(id, o as u8));
                        continue;
                    }
                    for (o, k) in known.iter().enumerate() {
                        if o == i {
                            continue;
                        }
                        if view & bit(o) != 0 {
                            out.push(Action::Shrink(id, o as u8));
                        } else if *k == Some(m.journal.len) {
                            out.push(Action::Grow(id, o as u8));
                        }
                    }
                }
            }
        }
        if state.leader.is_some() && state.expiries < bounds.expiries && (bounds.pauses || !Self::leader_alive(state)) {
            out.push(Action::Expire);
        }
    }

    /// The process of manager `m` is gone (killed, or exited after a refused fenced write): its
    /// streams end; its write in flight stays in flight; its disk stays.
    fn exit(state: &mut State, m: usize) {
        let manager = &mut state.managers[m];
        manager.alive = false;
        manager.seen_term = 0;
        manager.role = Role::Standby { link: None };
        for other in &mut state.managers {
            if other.role == (Role::Standby { link: Some(m as u8) }) {
                other.role = Role::Standby { link: None };
            }
        }
    }

    /// The state after `action` (which must be enabled in `state`).
    fn apply(&self, state: &State, action: Action) -> State {
        let mut next = *state;
        match action {
            Action::Elect(m) => {
                let m = usize::from(m);
                next.last_term += 1;
                let term = next.last_term;
                next.leader = Some((m as u8, term));
                let manager = &mut next.managers[m];
                let mut journals = [0; N];
                journals[m] = manager.journal_id;
                manager.role = Role::Primary { term, view: bit(m), journals, known: [None; N], ids: [0; N] };
                if self.protocol.publish_on_election {
                    manager.put = Some(InSync { term, members: bit(m), journals, index: manager.journal.len });
                }
            }
            Action::Message(p) => {
                let manager = &mut next.managers[usize::from(p)];
                let Role::Primary { term, .. } = manager.role else { unreachable!() };
                manager.journal.push(Entry { msg: next.next_msg, term });
                next.next_msg += 1;
            }
            Action::Connect(s) => {
                let s = usize::from(s);
                let (p, term) = next.leader.unwrap();
                let p = usize::from(p);
                let journal = next.managers[p].journal;
                let standby = &mut next.managers[s];
                standby.journal = journal;
                standby.seen_term = term;
                standby.role = Role::Standby { link: Some(p as u8) };
                let id = standby.journal_id;
                if let Role::Primary { known, ids, .. } = &mut next.managers[p].role {
                    known[s] = Some(journal.len);
                    ids[s] = id;
                }
            }
            Action::Deliver(s) => {
                let s = usize::from(s);
                let Role::Standby { link: Some(p) } = next.managers[s].role else { unreachable!() };
                let p = usize::from(p);
                let primary = next.managers[p];
                let Role::Primary { term, .. } = primary.role else { unreachable!() };
                let standby = &mut next.managers[s];
                debug_assert!(primary.journal.entries().starts_with(standby.journal.entries()));
                standby.journal.push(primary.journal.entries()[usize::from(standby.journal.len)]);
                standby.seen_term = term;
                let len = standby.journal.len;
                if let Role::Primary { known, .. } = &mut next.managers[p].role {
                    known[s] = Some(len);
                }
            }
            Action::Shrink(p, s) => {
                let (pu, su) = (usize::from(p), usize::from(s));
                let len = next.managers[pu].journal.len;
                let Role::Primary { term, view, journals, known, ids } = &mut next.managers[pu].role else {
                    unreachable!()
                };
                let members = *view & !bit(su);
                next.managers[pu].put =
                    Some(InSync { term: *term, members, journals: only(members, *journals), index: len });
                // the code drops the standby's stream with it (it reconnects and is reset)
                known[su] = None;
                ids[su] = 0;
                if next.managers[su].role == (Role::Standby { link: Some(p) }) {
                    next.managers[su].role = Role::Standby { link: None };
                }
            }
            Action::Grow(p, s) => {
                let s = usize::from(s);
                let manager = &mut next.managers[usize::from(p)];
                let Role::Primary { term, view, mut journals, ids, .. } = manager.role else { unreachable!() };
                // under the journal id it reported when it connected
                journals[s] = ids[s];
                manager.put = Some(InSync { term, members: view | bit(s), journals, index: manager.journal.len });
            }
            Action::Evict(p, s) => {
                let manager = &mut next.managers[usize::from(p)];
                let Role::Primary { term, view, journals, .. } = manager.role else { unreachable!() };
                let members = view & !bit(usize::from(s));
                manager.put =
                    Some(InSync { term, members, journals: only(members, journals), index: manager.journal.len });
            }
            Action::Write(w) => {
                let w = usize::from(w);
                let put = next.managers[w].put.take().unwrap();
                let accepted = !self.protocol.fenced_set_writes || next.leader == Some((w as u8, put.term));
                let writer = &mut next.managers[w];
                let current = writer.alive && matches!(writer.role, Role::Primary { term, .. } if term == put.term);
                if accepted {
                    next.set = Some(put);
                    if current && let Role::Primary { view, journals, .. } = &mut writer.role {
                        *view = put.members;
                        *journals = put.journals;
                    }
                } else if current {
                    // deposed: it fences itself and exits, to come back as a standby
                    Self::exit(&mut next, w);
                }
            }
            Action::Kill(m) => {
                next.kills += 1;
                Self::exit(&mut next, usize::from(m));
            }
            Action::Restart(m) => {
                next.restarts += 1;
                let manager = &mut next.managers[usize::from(m)];
                manager.alive = true;
                manager.put = None;
            }
            Action::Wipe(m) => {
                next.wipes += 1;
                let manager = &mut next.managers[usize::from(m)];
                manager.alive = true;
                manager.put = None;
                manager.journal = Journal::default();
                manager.journal_id += 1;
            }
            Action::Expire => {
                next.expiries += 1;
                next.leader = None;
            }
        }
        Self::acknowledge(&mut next);
        next
    }

    /// Every primary that awaits no write acknowledges every message of its term that every
    /// other member of its in-sync set has reported durable. Acknowledging as soon as allowed
    /// loses no violation: once allowed, an acknowledgement stays allowed until the primary awaits
    /// a write or dies, and no step depends on what was acknowledged, so a history that
    /// acknowledges later is matched step by step by this one with at least as much acknowledged,
    /// and the invariants only get harder to keep with more acknowledged.
    fn acknowledge(state: &mut State) {
        for (i, m) in state.managers.iter().enumerate() {
            let Role::Primary { term, view, known, .. } = m.role else { continue };
            if !m.alive || m.put.is_some() {
                continue;
            }
            // the length every member has made durable
            let mut durable = m.journal.len;
            for (o, k) in known.iter().enumerate() {
                if o != i && view & bit(o) != 0 {
                    durable = durable.min(k.unwrap_or(0));
                }
            }
            for e in &m.journal.entries()[..usize::from(durable)] {
                if e.term == term && state.acked[usize::from(e.msg)].is_none() {
                    state.acked[usize::from(e.msg)] = Some((term, i as u8));
                }
            }
        }
    }

    /// The key of `state` in the visited set: equal for states that behave alike, up to renaming
    /// the managers (the protocol treats them alike) and renumbering the terms (only their order
    /// matters). It leaves out what can no longer matter: the terms standbys have seen (the check
    /// never refuses: see [`Manager::seen_term`]); a primary's knowledge of a standby outside its
    /// set unless it makes the standby look caught up (only then is it read, and the next report
    /// or reset overwrites it); a dead writer's fenced write that etcd will refuse (refusing it
    /// changes nothing); and journal ids, when they are never compared. Recorded journal ids are
    /// kept as ages (see [`Model::pack_journals`]). (Written with plain loops and tables: the debug
    /// build runs it millions of times.)
    fn key(&self, state: &State) -> Key {
        let mut puts = [None; N];
        for (i, m) in state.managers.iter().enumerate() {
            if let Some(put) = m.put
                && !(self.protocol.fenced_set_writes && !m.alive && state.leader != Some((i as u8, put.term)))
            {
                puts[i] = Some(put);
            }
        }
        // each message's term (a message is appended once: its copies all have that term)
        let mut msg_terms = [0u8; MAX_MSGS];
        for (msg, a) in state.acked.iter().enumerate() {
            if let Some((t, _)) = a {
                msg_terms[msg] = *t;
            }
        }
        // the terms in use
        let mut terms = 0u32;
        for (m, put) in state.managers.iter().zip(&puts) {
            if let Role::Primary { term, .. } = m.role {
                terms |= 1 << term;
            }
            if let Some(put) = put {
                terms |= 1 << put.term;
            }
            for e in m.journal.entries() {
                msg_terms[usize::from(e.msg)] = e.term;
            }
        }
        for t in msg_terms {
            terms |= 1 << t;
        }
        if let Some((_, t)) = state.leader {
            terms |= 1 << t;
        }
        if let Some(set) = state.set {
            terms |= 1 << set.term;
        }
        let terms = terms & !1;
        // each term renumbered
        let mut ranks = [0u64; 8];
        for (t, r) in ranks.iter_mut().enumerate() {
            *r = rank(terms, t as u8);
        }
        // what a manager is, apart from which others it names: the renamings to try are those that
        // put these in order
        let mut codes = [0u64; N];
        for (i, code) in codes.iter_mut().enumerate() {
            let m = &state.managers[i];
            *code = u64::from(m.alive);
            for e in m.journal.entries() {
                *code = *code * 8 + u64::from(e.msg) + 1;
            }
            if let Role::Primary { term, .. } = m.role {
                *code = *code * 8 + ranks[usize::from(term)];
            }
            if let Some(put) = puts[i] {
                *code = *code * 8 + ranks[usize::from(put.term)] + 1;
            }
            if let Some((h, _)) = state.leader
                && usize::from(h) == i
            {
                *code = *code * 2 + 1;
            }
            if let Some(set) = state.set
                && set.members & bit(i) != 0
            {
                *code = *code * 4 + 1;
            }
        }
        let mut best: Option<Key> = None;
        for (p, inv) in INVERSES.iter().enumerate() {
            // after renaming, the managers named 0, 1 and 2 must come in the order of their codes
            if codes[inv[0]] > codes[inv[1]] || codes[inv[1]] > codes[inv[2]] {
                continue;
            }
            let key = self.pack(state, p, &ranks, &msg_terms, &puts);
            if best.is_none_or(|b| key < b) {
                best = Some(key);
            }
        }
        best.unwrap()
    }

    /// The bits a journal id takes in a [`Key`], as an age (see [`Model::pack`]): none when the
    /// ids are never compared.
    fn id_width(&self) -> u32 {
        if self.protocol.journal_identity { u8::BITS - self.bounds.wipes.leading_zeros() } else { 0 }
    }

    /// Packs the journal ids `journals` that a set (or a primary's view of it) gives its members
    /// `set`, each as its age: how many wipes of its manager ago it was current (two ids of one
    /// manager are equal if and only if their ages are). Nothing when the ids are never compared.
    fn pack_journals(&self, k: &mut Packer, state: &State, inv: &[usize; N], set: Members, journals: &[u8; N]) {
        let width = self.id_width();
        if width == 0 {
            return;
        }
        for &o in inv {
            let age = if set & bit(o) != 0 { state.managers[o].journal_id - journals[o] } else { 0 };
            k.push(u64::from(age), width);
        }
    }

    /// Packs `state` with manager `i` renamed `PERMUTATIONS[p][i]`, terms renumbered by `ranks`,
    /// and `puts` for the writes in flight (see [`Model::key`]).
    fn pack(
        &self,
        state: &State,
        p: usize,
        ranks: &[u64; 8],
        msg_terms: &[u8; MAX_MSGS],
        puts: &[Option<InSync>; N],
    ) -> Key {
        let (pi, inv) = (&PERMUTATIONS[p], &INVERSES[p]);
        let width = self.id_width();
        let mut k = Packer::default();
        match state.leader {
            Some((h, t)) => {
                k.push(pi[usize::from(h)] as u64, 2);
                k.push(ranks[usize::from(t)], 3);
            }
            None => k.push(3, 2),
        }
        match state.set {
            Some(set) => {
                k.push(1, 1);
                k.push(ranks[usize::from(set.term)], 3);
                k.push(rename(set.members, p), 3);
                self.pack_journals(&mut k, state, inv, set.members, &set.journals);
                k.push(u64::from(set.index), 3);
            }
            None => k.push(0, 1),
        }
        for (msg, t) in msg_terms.iter().enumerate() {
            k.push(ranks[usize::from(*t)], 3);
            k.push(if let Some((_, by)) = state.acked[msg] { pi[usize::from(by)] as u64 + 1 } else { 0 }, 2);
        }
        k.push(u64::from(state.next_msg), 3);
        k.push(u64::from(state.kills), 2);
        k.push(u64::from(state.restarts), 2);
        k.push(u64::from(state.wipes), 2);
        k.push(u64::from(state.expiries), 2);
        for &old in inv {
            let m = &state.managers[old];
            k.push(u64::from(m.alive), 1);
            k.push(u64::from(m.journal.len), 3);
            for e in m.journal.entries() {
                k.push(u64::from(e.msg), 2);
            }
            match &m.role {
                Role::Standby { link } => {
                    k.push(0, 1);
                    k.push(if let Some(l) = *link { pi[usize::from(l)] as u64 } else { 3 }, 2);
                }
                Role::Primary { term, view, journals, known, ids } => {
                    let view = *view;
                    k.push(1, 1);
                    k.push(ranks[usize::from(*term)], 3);
                    k.push(rename(view, p), 3);
                    self.pack_journals(&mut k, state, inv, view, journals);
                    for &o in inv {
                        match known[o] {
                            Some(len) if view & bit(o) != 0 || len == m.journal.len => {
                                k.push(u64::from(len), 3);
                                if width > 0 {
                                    k.push(u64::from(state.managers[o].journal_id - ids[o]), width);
                                }
                            }
                            _ => k.push(7, 3 + width),
                        }
                    }
                }
            }
            match &puts[old] {
                Some(put) => {
                    k.push(1, 1);
                    k.push(ranks[usize::from(put.term)], 3);
                    k.push(rename(put.members, p), 3);
                    self.pack_journals(&mut k, state, inv, put.members, &put.journals);
                    k.push(u64::from(put.index), 3);
                }
                None => k.push(0, 1),
            }
        }
        k.words
    }

    /// A line of a trace: `action` taken in `before`, giving `after`.
    fn describe(&self, before: &State, action: Action, after: &State) -> String {
        let mut line = self.describe_action(before, action, after);
        for (msg, (old, new)) in before.acked.iter().zip(&after.acked).enumerate() {
            if let (None, Some((term, by))) = (old, new) {
                let Role::Primary { view, .. } = after.managers[usize::from(*by)].role else { unreachable!() };
                let leader = if after.leader == Some((*by, *term)) { "" } else { " (deposed)" };
                line += &format!(
                    "; M{by}{leader} acknowledges m{msg} under term {term}, its in-sync set being {}",
                    members(view)
                );
            }
        }
        line
    }

    /// What `action` did, without the acknowledgements it allowed.
    fn describe_action(&self, before: &State, action: Action, after: &State) -> String {
        let journal = |m: u8| after.managers[usize::from(m)].journal;
        let set = |s: &State| s.set.map_or("none".to_owned(), |s| s.to_string());
        match action {
            Action::Elect(m) => {
                let Role::Primary { term, .. } = after.managers[usize::from(m)].role else { unreachable!() };
                let publish = if self.protocol.publish_on_election {
                    "; it will publish itself alone before acknowledging"
                } else {
                    "; it acknowledges alone from now on, the etcd set unchanged"
                };
                format!(
                    "M{m} wins the election with journal {} j{} (etcd set {}): primary of term {term}{publish}",
                    journal(m),
                    after.managers[usize::from(m)].journal_id,
                    set(before)
                )
            }
            Action::Message(p) => {
                format!("client message m{} arrives at M{p}: journal {}", before.next_msg, journal(p))
            }
            Action::Connect(s) => {
                let (p, term) = before.leader.unwrap();
                let id = after.managers[usize::from(s)].journal_id;
                let renamed = match after.managers[usize::from(p)].role {
                    Role::Primary { view, journals, .. }
                        if view & bit(usize::from(s)) != 0 && journals[usize::from(s)] != id =>
                    {
                        format!(" (its in-sync set names M{s}:j{})", journals[usize::from(s)])
                    }
                    _ => String::new(),
                };
                format!(
                    "M{s} connects to M{p} (term {term}) with journal id j{id}{renamed} and is reset to {}",
                    journal(s)
                )
            }
            Action::Deliver(s) => {
                let Role::Standby { link: Some(p) } = before.managers[usize::from(s)].role else { unreachable!() };
                format!("M{p} -> M{s}: M{s} makes {} durable and reports it", journal(s))
            }
            Action::Shrink(p, s) => format!(
                "M{p} drops M{s} from its in-sync set and writes {}",
                after.managers[usize::from(p)].put.unwrap()
            ),
            Action::Grow(p, s) => {
                format!("M{p} finds M{s} caught up and writes {}", after.managers[usize::from(p)].put.unwrap())
            }
            Action::Evict(p, s) => format!(
                "M{p} removes M{s}, reconnected with another journal id, from its in-sync set and writes {}",
                after.managers[usize::from(p)].put.unwrap()
            ),
            Action::Write(w) => {
                let writer = &before.managers[usize::from(w)];
                let put = writer.put.unwrap();
                let who = if !writer.alive {
                    " (its writer is dead)"
                } else if before.leader == Some((w, put.term)) {
                    ""
                } else {
                    " (its writer is deposed)"
                };
                if !self.protocol.fenced_set_writes {
                    format!("etcd applies M{w}'s plain put{who}: the set is {put}")
                } else if after.set == Some(put) && before.leader == Some((w, put.term)) {
                    format!("etcd applies M{w}'s fenced write{who}: the set is {put}")
                } else if writer.alive {
                    format!("etcd refuses M{w}'s write of {put}{who}: M{w} fences itself and exits")
                } else {
                    format!("etcd refuses M{w}'s write of {put}{who}")
                }
            }
            Action::Kill(m) => format!("M{m} is killed"),
            Action::Restart(m) => {
                format!("M{m} restarts with its journal {} j{}", journal(m), after.managers[usize::from(m)].journal_id)
            }
            Action::Wipe(m) => format!(
                "M{m} restarts with a wiped disk: an empty journal, new journal id j{}",
                after.managers[usize::from(m)].journal_id
            ),
            Action::Expire => {
                let (holder, term) = before.leader.unwrap();
                let how =
                    if Self::leader_alive(before) { "alive and unaware, still acting as primary" } else { "dead" };
                format!("the lease of M{holder} (term {term}) expires: M{holder} is {how}")
            }
        }
    }

    /// The first invariant `state` violates, with details. (Plain loops: the debug build runs it
    /// for every state reached.)
    fn check(&self, state: &State) -> Option<(Invariant, String)> {
        // the history as (message, term, acknowledger)
        let mut history = [(0u8, 0u8, 0u8); MAX_MSGS];
        let mut count = 0;
        for (msg, a) in state.acked.iter().enumerate() {
            if let Some((term, by)) = *a {
                history[count] = (msg as u8, term, by);
                count += 1;
            }
        }
        let history = &history[..count];
        for (i, &(m1, t1, by1)) in history.iter().enumerate() {
            for &(m2, t2, by2) in &history[i + 1..] {
                if t1 == t2 && by1 != by2 {
                    return Some((
                        Invariant::OneAcknowledgerPerTerm,
                        format!("m{m1} was acknowledged by M{by1} and m{m2} by M{by2}, both under term {t1}"),
                    ));
                }
            }
        }
        for (i, m) in state.managers.iter().enumerate() {
            match m.role {
                Role::Primary { term, .. } if m.alive => {
                    for &(msg, t, by) in history {
                        if t < term && !m.journal.holds(msg) {
                            return Some((
                                Invariant::NoAcknowledgedMessageLost,
                                format!(
                                    "M{i} is primary of term {term} without m{msg}, which M{by} acknowledged under \
                                     term {t}: its journal is {}",
                                    m.journal
                                ),
                            ));
                        }
                    }
                }
                _ if self.bounds.early_warning && self.eligible(state, i) => {
                    for &(msg, t, by) in history {
                        if !m.journal.holds(msg) {
                            let alive = if m.alive { "" } else { ", once restarted," };
                            return Some((
                                Invariant::NoAcknowledgedMessageLost,
                                format!(
                                    "M{i}{alive} can win the next election (etcd set {}; journal {} j{}) without \
                                     m{msg}, which M{by} acknowledged under term {t}",
                                    state.set.map_or("none".to_owned(), |s| s.to_string()),
                                    m.journal,
                                    m.journal_id
                                ),
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
        None
    }
}

/// Explores every state of `protocol` reachable within `bounds`, breadth first, checking the
/// invariants in each; stops at the first violation (so its trace is a shortest one).
fn explore(protocol: Protocol, bounds: Bounds) -> Outcome {
    let model = Model::new(protocol, bounds);
    let initial = model.initial();
    // per state reached: the number of the state it was reached from, and the action
    let mut parents: Vec<(u32, Option<Action>)> = vec![(0, None)];
    let mut seen: HashSet<Key, BuildHasherDefault<Fx>> = HashSet::default();
    seen.insert(model.key(&initial));
    let trace = |parents: &[(u32, Option<Action>)], mut at: u32| {
        let mut actions = Vec::new();
        while let (parent, Some(action)) = parents[at as usize] {
            actions.push(action);
            at = parent;
        }
        let mut state = model.initial();
        let mut lines = Vec::new();
        for action in actions.into_iter().rev() {
            let next = model.apply(&state, action);
            lines.push(model.describe(&state, action, &next));
            state = next;
        }
        lines
    };
    if let Some((invariant, detail)) = model.check(&initial) {
        return Outcome { states: 1, violation: Some(Violation { invariant, detail, trace: Vec::new() }) };
    }
    let mut queue = VecDeque::from([(initial, 0u32)]);
    let mut actions = Vec::new();
    while let Some((state, at)) = queue.pop_front() {
        actions.clear();
        model.actions(&state, &mut actions);
        for action in &actions {
            let next = model.apply(&state, *action);
            if !seen.insert(model.key(&next)) {
                continue;
            }
            let number = u32::try_from(parents.len()).unwrap();
            parents.push((at, Some(*action)));
            if let Some((invariant, detail)) = model.check(&next) {
                let trace = trace(&parents, number);
                return Outcome { states: seen.len(), violation: Some(Violation { invariant, detail, trace }) };
            }
            queue.push_back((next, number));
        }
    }
    Outcome { states: seen.len(), violation: None }
}

/// Runs [`explore`] and prints what it found under `title`: the states explored, the time it
/// took, and the violation with its trace.
fn run(title: &str, protocol: Protocol, bounds: Bounds) -> Outcome {
    let started = Instant::now();
    let outcome = explore(protocol, bounds);
    println!("== {title}\n   {protocol:?}\n   {bounds:?}");
    match &outcome.violation {
        None => println!(
            "model: {} states explored in {:.1?}, no acknowledged entry lost, one acknowledger per term",
            outcome.states,
            started.elapsed()
        ),
        Some(v) => {
            println!("model: {} states explored in {:.1?}", outcome.states, started.elapsed());
            println!("violation of {:?}: {}", v.invariant, v.detail);
            for (i, line) in v.trace.iter().enumerate() {
                println!("  {:2}. {line}", i + 1);
            }
        }
    }
    outcome
}

/// The bounds of the searches from [`Start::Running`]: the fixed protocol keeps both invariants
/// within them, and each of its fixes is needed for that.
const RUNNING: Bounds = Bounds {
    start: Start::Running,
    messages: 1,
    kills: 2,
    restarts: 2,
    wipes: 1,
    expiries: 2,
    pauses: true,
    early_warning: true,
};

/// The violation `outcome` must hold, with its trace as one string.
fn violation(outcome: &Outcome) -> (&Violation, String) {
    let v = outcome.violation.as_ref().expect("the checker finds no violation: the fix looks unnecessary");
    (v, v.trace.join("\n"))
}

#[test]
fn the_fixed_protocol_loses_nothing_in_any_bounded_history() {
    let outcome = run("the fixed protocol, from a fresh cluster", Protocol::FIXED, Bounds::default());
    if let Some(v) = &outcome.violation {
        panic!("the fixed protocol violates {:?}: {} (the trace is printed above)", v.invariant, v.detail);
    }
    assert!(outcome.states > 100_000, "only {} states: the bounds are too small to mean much", outcome.states);
}

#[test]
fn the_fixed_protocol_loses_nothing_from_a_running_cluster() {
    let outcome = run("the fixed protocol, from a running cluster", Protocol::FIXED, RUNNING);
    assert!(outcome.violation.is_none(), "the fixed protocol violates an invariant (the trace is printed above)");
    assert!(outcome.states > 100_000, "only {} states: the bounds are too small to mean much", outcome.states);
}

#[test]
fn the_fixed_protocol_loses_nothing_from_a_fresh_cluster_without_disk_loss() {
    let bounds = Bounds { wipes: 0, ..Bounds::default() };
    let outcome = run("the fixed protocol, from a fresh cluster, no disk wiped", Protocol::FIXED, bounds);
    assert!(outcome.violation.is_none(), "the fixed protocol violates an invariant (the trace is printed above)");
    assert!(outcome.states > 100_000, "only {} states: the bounds are too small to mean much", outcome.states);
}

#[test]
fn without_publishing_on_election_a_double_failure_loses_acknowledged_entries() {
    let protocol = Protocol { publish_on_election: false, ..Protocol::FIXED };
    // the shortest path to a loss itself, with crashes only (no paused primary)
    let crashes = Bounds { pauses: false, early_warning: false, ..RUNNING };
    let outcome = run("without publish on election: crashes only, until a primary lacks an ack", protocol, crashes);
    let (v, trace) = violation(&outcome);
    assert_eq!(v.invariant, Invariant::NoAcknowledgedMessageLost);
    assert!(trace.matches("is killed").count() >= 2, "not a double failure:\n{trace}");
    assert!(v.trace.last().unwrap().contains("wins the election"), "the loss is not an election:\n{trace}");
    assert!(trace.contains("acknowledges alone"), "no primary acknowledged alone:\n{trace}");
    // the first state from which a loss can follow
    let outcome = run("without publish on election: the early warning", protocol, RUNNING);
    assert_eq!(violation(&outcome).0.invariant, Invariant::NoAcknowledgedMessageLost);
    // and a new cluster, before any standby has joined, needs no failure at all
    let outcome = run("without publish on election: from a fresh cluster", protocol, Bounds::default());
    assert_eq!(violation(&outcome).0.invariant, Invariant::NoAcknowledgedMessageLost);
}

#[test]
fn without_fenced_writes_a_deposed_primary_overwrites_the_set() {
    let protocol = Protocol { fenced_set_writes: false, ..Protocol::FIXED };
    let outcome = run("without fenced writes", protocol, RUNNING);
    let (v, trace) = violation(&outcome);
    assert_eq!(v.invariant, Invariant::NoAcknowledgedMessageLost);
    assert!(trace.contains("plain put (its writer is deposed)"), "no deposed primary wrote the set:\n{trace}");
}

#[test]
fn without_the_position_check_a_wiped_member_takes_over() {
    // Without journal identity too. With it, a wiped member is out already (its set entry names
    // the journal it lost), and this model, where a disk keeps all of its journal or none of it,
    // finds no violation without the position check (466,062 states from the running cluster):
    // the check is left for a journal that loses entries but keeps its directory, and only below
    // the set's index, which may be stale-low.
    let protocol = Protocol { position_check: false, journal_identity: false, ..Protocol::FIXED };
    let outcome = run("without the position check", protocol, RUNNING);
    let (v, trace) = violation(&outcome);
    assert_eq!(v.invariant, Invariant::NoAcknowledgedMessageLost);
    assert!(trace.contains("wiped disk"), "no wiped disk:\n{trace}");
    // and on to the takeover
    let bounds = Bounds { early_warning: false, ..RUNNING };
    let outcome = run("without the position check: until a primary lacks an ack", protocol, bounds);
    let (v, trace) = violation(&outcome);
    assert_eq!(v.invariant, Invariant::NoAcknowledgedMessageLost);
    assert!(trace.contains("wiped disk"), "no wiped disk:\n{trace}");
    assert!(v.trace.last().unwrap().contains("wins the election with journal []"), "no takeover:\n{trace}");
}

#[test]
fn without_journal_identity_a_wiped_manager_takes_over() {
    // today's hole: a set written at index 0 (the first primary of a new cluster publishes itself
    // with an empty journal) lets a manager restarted on a wiped disk pass the position check
    let protocol = Protocol { journal_identity: false, ..Protocol::FIXED };
    let outcome = run("without journal identity", protocol, Bounds::default());
    let (v, trace) = violation(&outcome);
    assert_eq!(v.invariant, Invariant::NoAcknowledgedMessageLost);
    assert!(trace.contains("wiped disk"), "no wiped disk:\n{trace}");
    assert!(v.detail.contains("index 0)"), "not a set at index 0: {}\n{trace}", v.detail);
    // and on to the takeover
    let bounds = Bounds { early_warning: false, ..Bounds::default() };
    let outcome = run("without journal identity: until a primary lacks an ack", protocol, bounds);
    let (v, trace) = violation(&outcome);
    assert_eq!(v.invariant, Invariant::NoAcknowledgedMessageLost);
    assert!(trace.contains("wiped disk"), "no wiped disk:\n{trace}");
    assert!(v.trace.last().unwrap().contains("wins the election with journal []"), "no takeover:\n{trace}");
}
