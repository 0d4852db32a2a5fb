//! Model checking: every interleaving of a small configuration, explored exhaustively
//! over the same core (`twopc_core::commit`, `twopc_core::recovery`) the coordinator
//! runs. Time is abstracted away: a message in flight can be delivered or lost at any
//! point, a forced append can become durable at any point, a retry timer can fire at
//! any point, a recovery pass can run at any point, and the coordinator can crash at any
//! point (its forced appends in flight then reach the disk or not: both are explored),
//! a branch can fail when it runs (a NO vote).
//! Each distinct state is visited once; the oracle's invariants are checked on every
//! transition and on every state where nothing is left to happen.
//!
//! With [`Bounds::last_agent`] the second transaction is a last-agent commit
//! (`twopc_core::last_agent`): a0 prepares, a1 commits with the decision row; the
//! COMMIT record that follows is lazy (written with a later write, or lost in a crash),
//! END is forced and then the row is forgotten; recovery fences the last agent for a
//! prepared branch and completes committed rows nobody drives.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use twopc_core::commit::{self, AckMode, CommitAnswer, Effect, Request, Timer, Vote};
use twopc_core::last_agent::{self, LastAgent, LastAnswer, Settled, SettledAction};
use twopc_core::mutation::{Mutation, Mutations};
use twopc_core::recovery::{self, BranchAction, Replayed};

use crate::world::{Branch, Row};
use crate::{known, recovery_action};

/// How big the explored world is.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub participants: usize,
    pub txns: usize,
    /// Coordinator crashes along one path.
    pub crashes: u8,
    /// Messages lost along one path.
    pub losses: u8,
    /// Branches that fail (vote NO) along one path.
    pub failures: u8,
    /// The second transaction is a last-agent commit (a0 prepares, a1 is the last
    /// agent) instead of a two-phase one whose last branch only reads.
    pub last_agent: bool,
    /// States explored at most (the search stops and says so beyond it).
    pub states_max: usize,
}

impl Bounds {
    /// Two participants, two transactions on both (the second's last branch only
    /// reads), one crash, one lost message and one failing branch on any path.
    pub fn small() -> Bounds {
        Bounds {
            participants: 2,
            txns: 2,
            crashes: 1,
            losses: 1,
            failures: 1,
            last_agent: false,
            states_max: 20_000_000,
        }
    }

    /// As [`Bounds::small`], the second transaction a last-agent commit.
    pub fn small_last_agent() -> Bounds {
        Bounds {
            last_agent: true,
            ..Bounds::small()
        }
    }
}

/// What the exploration found.
#[derive(Debug, Clone)]
pub struct Report {
    pub states: usize,
    pub transitions: u64,
    pub terminal: usize,
    /// The first violation and the path (transition labels) that leads to it.
    pub violation: Option<(String, Vec<String>)>,
    /// The search stopped at `states_max` before it was complete.
    pub truncated: bool,
}

/// A transaction's GID in the model: the epoch it began in, its number.
type Txn = (u64, u8);

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Msg {
    /// To participant `p`: run the branch and PREPARE.
    Prepare(usize, Txn),
    /// Sent by the incarnation of the given epoch (only it hears the answer).
    CommitPrepared(usize, Txn, u64),
    /// `true`: a recovery pass's rollback, which nobody awaits; else the transaction's
    /// own, sent by the incarnation of the given epoch.
    Abort(usize, Txn, bool, u64),
    /// To the coordinator: `p`'s answer, or the call failed (`None`; the request may
    /// have been applied).
    Vote(usize, Txn, Option<Vote>),
    Committed(usize, Txn, Option<CommitAnswer>),
    Aborted(usize, Txn, bool),
    /// To the last agent `p`: its branch, COMMIT and the decision row naming these.
    CommitLast(usize, Txn, u64, Vec<String>),
    LastAnswered(usize, Txn, Option<LastAnswer>),
    /// To the last agent `p`: settle the row; `Some(q)`: recovery asks for the branch
    /// `q` listed prepared (else the transaction's own fence).
    Fence(usize, Txn, u64, Option<usize>),
    Fenced(usize, Txn, Option<Settled>, Option<usize>),
    /// To the last agent `p`: delete the committed row.
    Forget(usize, Txn),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Told {
    Committed,
    Aborted,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct State {
    epoch: u64,
    started: u8,
    machines: BTreeMap<Txn, MachineKey>,
    lasts: BTreeMap<Txn, LastKey>,
    /// Messages in flight (a multiset, kept sorted).
    net: Vec<Msg>,
    durable: Vec<Replayed<Txn>>,
    /// Forced COMMIT appends in flight, with the participants they name.
    in_flight: BTreeMap<Txn, Vec<String>>,
    /// Forced END or one-phase records of last-agent transactions in flight (then the
    /// row is forgotten).
    ends_in_flight: BTreeMap<Txn, Replayed<Txn>>,
    /// Lazy COMMIT records not yet written.
    lazy: Vec<Replayed<Txn>>,
    /// Decision tables.
    rows: Vec<BTreeMap<Txn, Row>>,
    retry_timers: BTreeSet<(Txn, usize)>,
    dbs: Vec<BTreeMap<Txn, Branch>>,
    told: BTreeMap<Txn, Told>,
    crashes_left: u8,
    losses_left: u8,
    failures_left: u8,
}

/// A machine and a canonical form of it for hashing (its Debug text: the machines hold
/// only ordered collections, so equal machines print alike).
#[derive(Debug, Clone)]
struct Keyed<M>(M, String);

impl<M> PartialEq for Keyed<M> {
    fn eq(&self, other: &Self) -> bool {
        self.1 == other.1
    }
}
impl<M> Eq for Keyed<M> {}
impl<M> std::hash::Hash for Keyed<M> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.1.hash(h)
    }
}

impl<M: std::fmt::Debug> Keyed<M> {
    fn new(m: M) -> Keyed<M> {
        let key = format!("{m:?}");
        Keyed(m, key)
    }
}

type MachineKey = Keyed<commit::Commit>;
type LastKey = Keyed<LastAgent>;

fn name(p: usize) -> String {
    format!("a{p}")
}

/// Whether the model explores what `m` breaks: it has no client txn ids, so the outcome
/// index's mutations are left to the simulator.
pub fn covers(m: Mutation) -> bool {
    !matches!(m, Mutation::EvictByTxnId | Mutation::ReplayAnAbort)
}

/// The configurations `twopc-sim --model-check` explores: two-phase commits only, and
/// with a last-agent commit.
pub fn configurations() -> [Bounds; 2] {
    [Bounds::small(), Bounds::small_last_agent()]
}

/// The exploration over `bounds` with `mutations`.
pub fn check(bounds: Bounds, mutations: Mutations) -> Report {
    let start = State {
        epoch: 1,
        started: 0,
        machines: BTreeMap::new(),
        lasts: BTreeMap::new(),
        net: vec![],
        durable: vec![],
        in_flight: BTreeMap::new(),
        ends_in_flight: BTreeMap::new(),
        lazy: vec![],
        rows: vec![BTreeMap::new(); bounds.participants],
        retry_timers: BTreeSet::new(),
        dbs: vec![BTreeMap::new(); bounds.participants],
        told: BTreeMap::new(),
        crashes_left: bounds.crashes,
        losses_left: bounds.losses,
        failures_left: bounds.failures,
    };
    let mut report = Report {
        states: 0,
        transitions: 0,
        terminal: 0,
        violation: None,
        truncated: false,
    };
    let mut seen: HashSet<State> = HashSet::new();
    // Depth-first, with the path to each state for the report.
    let mut stack: Vec<(State, Vec<String>)> = vec![(start.clone(), vec![])];
    seen.insert(start);
    let m = Model { bounds, mutations };
    while let Some((state, path)) = stack.pop() {
        report.states += 1;
        if report.states >= bounds.states_max {
            report.truncated = true;
            break;
        }
        let next = m.successors(&state);
        if next.is_empty() {
            report.terminal += 1;
            if let Err(v) = m.at_quiescence(&state) {
                report.violation = Some((v, path));
                return report;
            }
        }
        for (label, result) in next {
            report.transitions += 1;
            match result {
                Err(v) => {
                    let mut p = path.clone();
                    p.push(label);
                    report.violation = Some((v, p));
                    return report;
                }
                Ok(s) => {
                    if !seen.contains(&s) {
                        seen.insert(s.clone());
                        let mut p = path.clone();
                        p.push(label);
                        stack.push((s, p));
                    }
                }
            }
        }
    }
    report
}

struct Model {
    bounds: Bounds,
    mutations: Mutations,
}

type Step = (String, Result<State, String>);

impl Model {
    fn config(&self, ack: AckMode) -> commit::Config {
        let mut c = commit::Config::new(ack);
        c.mutations = self.mutations;
        c
    }

    /// Every transition enabled in `s`, each with its label and the state it leads to
    /// (or the invariant it breaks).
    fn successors(&self, s: &State) -> Vec<Step> {
        let mut out = Vec::new();
        if (s.started as usize) < self.bounds.txns {
            out.push(("client begins a transaction".to_owned(), self.begin(s)));
        }
        let mut delivered = BTreeSet::new();
        for (i, msg) in s.net.iter().enumerate() {
            if !delivered.insert(msg.clone()) {
                continue; // the same message twice: one successor is enough
            }
            out.push((format!("deliver {msg:?}"), self.deliver(s, i)));
            if let Msg::Prepare(p, t) | Msg::CommitLast(p, t, ..) = msg {
                if s.failures_left > 0 {
                    let label = format!("deliver {msg:?}: the branch fails");
                    out.push((label, self.prepare_fails(s, i, *p, *t)));
                }
            }
            if s.losses_left > 0 {
                if let Some(r) = self.lose(s, i) {
                    out.push((format!("lose {msg:?}"), r));
                }
            }
        }
        for t in s.in_flight.keys() {
            out.push((format!("log: COMMIT {t:?} durable"), self.durable(s, *t)));
            if s.crashes_left > 0 {
                for on_disk in [false, true] {
                    let label = format!("log: COMMIT {t:?} append fails (on disk: {on_disk}); the coordinator exits");
                    out.push((label, self.append_fails(s, *t, on_disk)));
                }
            }
        }
        for t in s.ends_in_flight.keys() {
            out.push((
                format!("log: END of {t:?} durable"),
                self.end_durable(s, *t),
            ));
        }
        if !s.lazy.is_empty() {
            out.push((
                "log: lazy records written".to_owned(),
                Ok(self.write_lazy(s)),
            ));
        }
        for (t, p) in &s.retry_timers {
            out.push((format!("retry timer {t:?} a{p}"), self.retry(s, *t, *p)));
        }
        for p in 0..self.bounds.participants {
            if let Some(r) = self.recovery_pass(s, p) {
                out.push((format!("recovery pass lists a{p}"), r));
            }
        }
        if s.crashes_left > 0 && !(s.machines.is_empty() && s.lasts.is_empty()) {
            for keep in [false, true] {
                let label = format!("coordinator crashes (in-flight appends kept: {keep})");
                out.push((label, Ok(self.crash(s, keep))));
            }
        }
        out
    }

    fn begin(&self, s: &State) -> Result<State, String> {
        let mut n = s.clone();
        let txn = (n.epoch, n.started);
        n.started += 1;
        let ack = if txn.1.is_multiple_of(2) {
            AckMode::Durable
        } else {
            AckMode::Applied
        };
        if self.is_last_agent(txn) {
            let last = self.bounds.participants - 1;
            let mut out = Vec::new();
            let m = LastAgent::new((0..last).map(name), name(last), self.mutations, &mut out);
            n.lasts.insert(txn, LastKey::new(m));
            for p in 0..last {
                n.net.push(Msg::Prepare(p, txn));
            }
            n.net.sort();
            return Ok(n);
        }
        let m = commit::Commit::new((0..self.bounds.participants).map(name), self.config(ack));
        n.machines.insert(txn, MachineKey::new(m));
        for p in 0..self.bounds.participants {
            n.net.push(Msg::Prepare(p, txn));
        }
        n.net.sort();
        Ok(n)
    }

    /// The second transaction of a last-agent configuration.
    fn is_last_agent(&self, t: Txn) -> bool {
        self.bounds.last_agent && t.1 == 1
    }

    fn lose(&self, s: &State, i: usize) -> Option<Result<State, String>> {
        let mut n = s.clone();
        let msg = n.net.remove(i);
        n.losses_left -= 1;
        // A lost request or answer: the caller's call fails (it cannot tell which).
        let failed = match msg {
            Msg::Prepare(p, t) => Msg::Vote(p, t, None),
            Msg::CommitPrepared(p, t, _) => Msg::Committed(p, t, None),
            Msg::Abort(p, t, false, _) => Msg::Aborted(p, t, false),
            Msg::Vote(p, t, Some(_)) => Msg::Vote(p, t, None),
            Msg::Committed(p, t, Some(_)) => Msg::Committed(p, t, None),
            Msg::Aborted(p, t, true) => Msg::Aborted(p, t, false),
            Msg::CommitLast(p, t, _, _) | Msg::LastAnswered(p, t, Some(_)) => {
                Msg::LastAnswered(p, t, None)
            }
            Msg::Fence(p, t, _, q) | Msg::Fenced(p, t, Some(_), q) => Msg::Fenced(p, t, None, q),
            // Nothing waits for it: the next pass lists the row again.
            Msg::Forget(..) => {
                n.net.sort();
                return Some(Ok(n));
            }
            // A recovery rollback: nothing waits for it.
            Msg::Abort(_, _, true, _) => {
                n.net.sort();
                return Some(Ok(n));
            }
            // A failure is the caller's own timeout: it cannot be lost.
            _ => return None,
        };
        n.net.push(failed);
        n.net.sort();
        Some(Ok(n))
    }

    fn deliver(&self, s: &State, i: usize) -> Result<State, String> {
        let mut n = s.clone();
        let msg = n.net.remove(i);
        match msg {
            Msg::Prepare(p, t) => {
                let writes = self.writes(p, t);
                let vote = match n.dbs[p].entry(t) {
                    // Aborted first: the tombstone refuses it.
                    std::collections::btree_map::Entry::Occupied(_) => Vote::No,
                    std::collections::btree_map::Entry::Vacant(slot) if writes => {
                        slot.insert(Branch::Prepared);
                        Vote::Yes
                    }
                    std::collections::btree_map::Entry::Vacant(slot) => {
                        slot.insert(Branch::ReadOnlyDone);
                        Vote::ReadOnly
                    }
                };
                if t.0 == n.epoch {
                    n.net.push(Msg::Vote(p, t, Some(vote)));
                }
            }
            Msg::CommitPrepared(p, t, sender) => {
                let answer = if n.dbs[p].get(&t) == Some(&Branch::Prepared) {
                    let durable = decision_durable(&n, t);
                    if !durable {
                        return Err(format!(
                            "invariant 1: a{p} commits {t:?} before its decision is durable"
                        ));
                    }
                    if n.told.get(&t) == Some(&Told::Aborted) {
                        return Err(format!("invariant 6: a{p} commits {t:?}, told aborted"));
                    }
                    n.dbs[p].insert(t, Branch::Committed);
                    CommitAnswer::Committed
                } else {
                    CommitAnswer::NotPrepared
                };
                if sender == n.epoch {
                    n.net.push(Msg::Committed(p, t, Some(answer)));
                }
            }
            Msg::Abort(p, t, recovery, sender) => {
                if recovery {
                    let live = n.machines.get(&t).is_some_and(|m| m.0.deciding())
                        || n.lasts.get(&t).is_some_and(|m| m.0.deciding());
                    if live && t.0 == n.epoch {
                        return Err(format!(
                            "invariant 5: recovery rolls back {t:?} on a{p} while it is live"
                        ));
                    }
                }
                if matches!(n.dbs[p].get(&t), Some(Branch::Prepared) | None) {
                    n.dbs[p].insert(t, Branch::RolledBack);
                    if n.told.get(&t) == Some(&Told::Committed) {
                        return Err(format!(
                            "invariant 3: a{p} rolls back {t:?}, told committed"
                        ));
                    }
                    if n.dbs
                        .iter()
                        .any(|db| db.get(&t) == Some(&Branch::Committed))
                    {
                        return Err(format!(
                            "invariant 2: a{p} rolls back {t:?}, committed elsewhere"
                        ));
                    }
                }
                if !recovery && sender == n.epoch {
                    n.net.push(Msg::Aborted(p, t, true));
                }
            }
            Msg::Vote(p, t, v) if n.lasts.contains_key(&t) => {
                let vote = v.unwrap_or(Vote::Unknown);
                self.feed_last(&mut n, t, |m, out| m.on_vote(&name(p), vote, out))?;
            }
            Msg::Vote(p, t, v) => {
                let vote = v.unwrap_or(Vote::Unknown);
                self.feed(&mut n, t, |m, out| m.on_vote(&name(p), vote, out))?;
            }
            Msg::CommitLast(p, t, sender, prepared) => {
                let answer = self.commit_last(&mut n, p, t, prepared)?;
                if sender == n.epoch {
                    n.net.push(Msg::LastAnswered(p, t, Some(answer)));
                }
            }
            Msg::LastAnswered(_, t, a) => {
                let a = a.unwrap_or(LastAnswer::Uncertain);
                self.feed_last(&mut n, t, |m, out| m.on_last_answer(a, out))?;
            }
            Msg::Fence(p, t, sender, listed) => {
                let row = n.rows[p].entry(t).or_insert(Row::Aborted);
                let settled = match row {
                    Row::Committed(ps) => Settled::Committed {
                        participants: ps.clone(),
                    },
                    Row::Aborted => Settled::Aborted,
                };
                if sender == n.epoch {
                    n.net.push(Msg::Fenced(p, t, Some(settled), listed));
                }
            }
            Msg::Fenced(_, t, settled, None) => {
                self.feed_last(&mut n, t, |m, out| m.on_fence_answer(settled, out))?;
            }
            Msg::Fenced(_, t, Some(settled), Some(listed)) => {
                self.recovery_settled(&mut n, t, listed, settled)?;
            }
            // Recovery's fence went unanswered: the next pass asks again.
            Msg::Fenced(_, _, None, Some(_)) => {}
            Msg::Forget(p, t) => {
                if matches!(n.rows[p].get(&t), Some(Row::Committed(_))) {
                    if !says_commit(&n.durable, t) {
                        return Err(format!(
                            "invariant 3: a{p} forgets {t:?}'s committed row, the log does not hold the commit"
                        ));
                    }
                    n.rows[p].remove(&t);
                }
            }
            Msg::Committed(p, t, a) => {
                let answer = a.unwrap_or(CommitAnswer::Failed);
                self.feed(&mut n, t, |m, out| {
                    m.on_commit_answer(&name(p), answer, 0, out)
                })?;
            }
            Msg::Aborted(p, t, ok) => {
                self.feed(&mut n, t, |m, out| m.on_abort_answer(&name(p), ok, 0, out))?;
            }
        }
        n.net.sort();
        Ok(n)
    }

    /// `p` runs `t`'s branch and it fails (a constraint, a serialization failure): the
    /// agent rolls it back and votes NO (a last agent: did not commit).
    fn prepare_fails(&self, s: &State, i: usize, p: usize, t: Txn) -> Result<State, String> {
        let mut n = s.clone();
        n.net.remove(i);
        n.failures_left -= 1;
        let last = matches!(s.net[i], Msg::CommitLast(..));
        n.dbs[p].entry(t).or_insert(Branch::RolledBack);
        if t.0 == n.epoch {
            n.net.push(if last {
                Msg::LastAnswered(p, t, Some(LastAnswer::DidNotCommit))
            } else {
                Msg::Vote(p, t, Some(Vote::No))
            });
        }
        n.net.sort();
        Ok(n)
    }

    /// Whether `p`'s branch of `t` writes: the second transaction's last participant only
    /// reads (it votes READ-ONLY).
    fn writes(&self, p: usize, t: Txn) -> bool {
        self.bounds.last_agent || !(t.1 == 1 && p + 1 == self.bounds.participants)
    }

    /// The last agent `p` runs `t`'s branch and commits it with the decision row, or
    /// refuses (a fence's row or a rollback came first).
    fn commit_last(
        &self,
        n: &mut State,
        p: usize,
        t: Txn,
        prepared: Vec<String>,
    ) -> Result<LastAnswer, String> {
        if n.dbs[p].contains_key(&t) || n.rows[p].contains_key(&t) {
            return Ok(LastAnswer::DidNotCommit);
        }
        if n.told.get(&t) == Some(&Told::Aborted) {
            return Err(format!(
                "invariant 6: a{p} commits {t:?} as its last agent, told aborted"
            ));
        }
        n.dbs[p].insert(t, Branch::Committed);
        n.rows[p].insert(t, Row::Committed(prepared));
        Ok(LastAnswer::Committed)
    }

    fn durable(&self, s: &State, t: Txn) -> Result<State, String> {
        let mut n = s.clone();
        let participants = n.in_flight.remove(&t).unwrap_or_default();
        n.durable.push(Replayed::Commit {
            gid: t,
            participants,
        });
        self.feed(&mut n, t, |m, out| m.on_durable(out))?;
        n.net.sort();
        Ok(n)
    }

    /// The forced append of `t`'s COMMIT fails; it reached the disk or not. The machine
    /// says what the client hears; the coordinator exits (nothing else it asked for
    /// happens) and restarts.
    fn append_fails(&self, s: &State, t: Txn, on_disk: bool) -> Result<State, String> {
        let mut n = s.clone();
        let participants = n.in_flight.remove(&t).unwrap_or_default();
        if on_disk {
            n.durable.push(Replayed::Commit {
                gid: t,
                participants,
            });
        }
        if let Some(mut key) = n.machines.remove(&t) {
            let mut out = Vec::new();
            key.0.on_log_failed(&mut out);
            for e in out {
                if let Effect::Answer(a) = e {
                    self.told(&mut n, t, &a)?;
                }
            }
        }
        Ok(self.crash(&n, false))
    }

    /// A last-agent transaction's forced END (or one-phase record) is durable, with the
    /// lazy records before it: its row may go.
    fn end_durable(&self, s: &State, t: Txn) -> Result<State, String> {
        let mut n = self.write_lazy(s);
        if let Some(r) = n.ends_in_flight.remove(&t) {
            n.durable.push(r);
            n.net.push(Msg::Forget(self.bounds.participants - 1, t));
        }
        n.net.sort();
        Ok(n)
    }

    fn write_lazy(&self, s: &State) -> State {
        let mut n = s.clone();
        let lazy = std::mem::take(&mut n.lazy);
        n.durable.extend(lazy);
        n
    }

    /// Feeds `t`'s last-agent machine one input and carries out its effects on `n`.
    fn feed_last(
        &self,
        n: &mut State,
        t: Txn,
        input: impl FnOnce(&mut LastAgent, &mut Vec<last_agent::Effect>),
    ) -> Result<(), String> {
        use last_agent::Effect as E;
        let Some(mut key) = n.lasts.remove(&t) else {
            return Ok(());
        };
        let last = self.bounds.participants - 1;
        let mut out = Vec::new();
        input(&mut key.0, &mut out);
        for e in out {
            match e {
                E::CommitLast { prepared } => {
                    n.net.push(Msg::CommitLast(last, t, n.epoch, prepared))
                }
                E::Fence => n.net.push(Msg::Fence(last, t, n.epoch, None)),
                E::Abort(p) => {
                    let p: usize = p[1..].parse().unwrap_or(0);
                    n.net.push(Msg::Abort(p, t, false, n.epoch));
                }
                E::AppendOnePhase => self.append_one_phase(n, t),
                E::Phase2 { prepared } => self.start_phase2(n, t, prepared),
                E::Answer(last_agent::Answer::Committed) => {
                    let a = commit::Answer::Committed { pending: vec![] };
                    self.told(n, t, &a)?
                }
                E::Answer(last_agent::Answer::Aborted(cause)) => {
                    self.told(n, t, &commit::Answer::Aborted(cause))?
                }
                E::Answer(last_agent::Answer::Unknown) => {}
            }
        }
        if !key.0.finished() {
            n.lasts.insert(t, LastKey::new(key.0));
        }
        Ok(())
    }

    fn append_one_phase(&self, n: &mut State, t: Txn) {
        let record = Replayed::Commit {
            gid: t,
            participants: vec![],
        };
        n.ends_in_flight.insert(t, record);
    }

    /// A last-agent commit with `prepared` waiting: the COMMIT record, lazily, and phase
    /// 2 on a decided machine.
    fn start_phase2(&self, n: &mut State, t: Txn, prepared: Vec<String>) {
        if n.machines.contains_key(&t) {
            return;
        }
        n.lazy.push(Replayed::Commit {
            gid: t,
            participants: prepared.clone(),
        });
        let mut out = Vec::new();
        let m = commit::Commit::decided(prepared, self.config(AckMode::Durable), &mut out);
        n.machines.insert(t, MachineKey::new(m));
        for e in out {
            if let Effect::Send { to, .. } = e {
                let p: usize = to[1..].parse().unwrap_or(0);
                n.net.push(Msg::CommitPrepared(p, t, n.epoch));
            }
        }
    }

    /// Recovery's fence for the branch `listed` listed prepared: an unsettled machine
    /// ends with it; then the core's rule for a settled outcome.
    fn recovery_settled(
        &self,
        n: &mut State,
        t: Txn,
        listed: usize,
        settled: Settled,
    ) -> Result<(), String> {
        if n.lasts.get(&t).is_some_and(|m| m.0.unsettled()) {
            let row = settled.clone();
            self.feed_last(n, t, |m, out| m.on_fence_answer(Some(row), out))?;
        }
        let in_doubt = n.machines.get(&t).is_some_and(|m| m.0.decided_commit());
        match last_agent::settled_action(&settled, in_doubt, false) {
            SettledAction::RollBack => {
                let abort = Msg::Abort(listed, t, true, n.epoch);
                if !n.net.contains(&abort) {
                    n.net.push(abort);
                }
            }
            SettledAction::Phase2(prepared) => self.start_phase2(n, t, prepared),
            SettledAction::AppendOnePhase => self.append_one_phase(n, t),
            SettledAction::Forget | SettledAction::Nothing => {}
        }
        Ok(())
    }

    fn retry(&self, s: &State, t: Txn, p: usize) -> Result<State, String> {
        let mut n = s.clone();
        n.retry_timers.remove(&(t, p));
        self.feed(&mut n, t, |m, out| m.on_timer(&Timer::Retry(name(p)), out))?;
        n.net.sort();
        Ok(n)
    }

    /// Feeds `t`'s machine one input and carries out its effects on `n`.
    fn feed(
        &self,
        n: &mut State,
        t: Txn,
        input: impl FnOnce(&mut commit::Commit, &mut Vec<Effect>),
    ) -> Result<(), String> {
        let Some(mut key) = n.machines.remove(&t) else {
            return Ok(());
        };
        let mut out = Vec::new();
        input(&mut key.0, &mut out);
        for e in out {
            match e {
                Effect::AppendCommit { participants } => {
                    n.in_flight.insert(t, participants);
                }
                // A last-agent transaction's END is forced, then its row goes.
                Effect::AppendEnd if self.is_last_agent(t) => {
                    n.ends_in_flight.insert(t, Replayed::End { gid: t });
                }
                Effect::AppendEnd => n.durable.push(Replayed::End { gid: t }),
                Effect::Send { to, request } => {
                    let p: usize = to[1..].parse().unwrap_or(0);
                    n.net.push(match request {
                        Request::CommitPrepared => Msg::CommitPrepared(p, t, n.epoch),
                        Request::Abort => Msg::Abort(p, t, false, n.epoch),
                    });
                }
                Effect::SetTimer {
                    timer: Timer::Retry(to),
                    ..
                } => {
                    let p: usize = to[1..].parse().unwrap_or(0);
                    n.retry_timers.insert((t, p));
                }
                // Applied mode's ack wait: the answer comes when every acknowledgement
                // is in, or (here) never; time is not modelled.
                Effect::SetTimer { .. } => {}
                Effect::Answer(a) => self.told(n, t, &a)?,
            }
        }
        if !key.0.finished() {
            n.machines.insert(t, MachineKey::new(key.0));
        }
        Ok(())
    }

    fn told(&self, n: &mut State, t: Txn, a: &commit::Answer) -> Result<(), String> {
        match a {
            commit::Answer::Committed { .. } => {
                if !decision_durable(n, t) {
                    return Err(format!(
                        "invariant 3: told {t:?} committed before it was durable"
                    ));
                }
                n.told.insert(t, Told::Committed);
            }
            commit::Answer::Aborted(_) => {
                if n.dbs
                    .iter()
                    .any(|db| db.get(&t) == Some(&Branch::Committed))
                {
                    return Err(format!(
                        "invariant 6: told {t:?} aborted, committed somewhere"
                    ));
                }
                n.told.insert(t, Told::Aborted);
            }
        }
        Ok(())
    }

    /// A recovery pass over participant `p`: its prepared branches (roll back, or fence
    /// the last agent), its committed decision rows (forget, or complete) and the fence
    /// of a transaction told `unknown` whose last agent it is. Enabled only when it would
    /// do something not already under way.
    fn recovery_pass(&self, s: &State, p: usize) -> Option<Result<State, String>> {
        let mut n = s.clone();
        let mut sent = false;
        let last = self.bounds.participants - 1;
        for (t, b) in &s.dbs[p] {
            if *b != Branch::Prepared {
                continue;
            }
            let machine = s.machines.get(t).map(|m| &m.0);
            let last_live = s.lasts.get(t).is_some_and(|m| m.0.deciding());
            let last_name = self.is_last_agent(*t).then(|| name(last));
            let known = known(machine, last_live);
            if recovery_busy(s, *t, p) {
                continue;
            }
            let msg =
                match recovery_action(s.epoch, t.0, last_name.as_deref(), known, self.mutations) {
                    BranchAction::RollBack => Msg::Abort(p, *t, true, s.epoch),
                    BranchAction::AskLastAgent(_) => Msg::Fence(last, *t, s.epoch, Some(p)),
                    _ => continue,
                };
            n.net.push(msg);
            sent = true;
        }
        for (t, row) in &s.rows[p] {
            let Row::Committed(participants) = row else {
                continue;
            };
            if says_finished(&s.durable, *t) {
                if !s.net.contains(&Msg::Forget(p, *t)) {
                    n.net.push(Msg::Forget(p, *t));
                    sent = true;
                }
                continue;
            }
            let driven = s.machines.contains_key(t)
                || s.lasts.contains_key(t)
                || s.ends_in_flight.contains_key(t);
            if driven {
                continue;
            }
            let settled = Settled::Committed {
                participants: participants.clone(),
            };
            match last_agent::settled_action(&settled, false, false) {
                SettledAction::Phase2(prepared) => self.start_phase2(&mut n, *t, prepared),
                SettledAction::AppendOnePhase => self.append_one_phase(&mut n, *t),
                _ => continue,
            }
            sent = true;
        }
        for (t, m) in &s.lasts {
            let fence = Msg::Fence(last, *t, s.epoch, None);
            if p == last && m.0.unsettled() && !s.net.contains(&fence) {
                n.net.push(fence);
                sent = true;
            }
        }
        n.net.sort();
        sent.then_some(Ok(n))
    }

    /// The coordinator crashes and restarts at once with the next epoch: machines,
    /// timers and every message to or from it are gone; appends in flight reach the
    /// disk (`keep`) or not; the log replays.
    fn crash(&self, s: &State, keep: bool) -> State {
        let mut n = s.clone();
        n.crashes_left -= 1;
        if keep {
            for (t, participants) in std::mem::take(&mut n.in_flight) {
                n.durable.push(Replayed::Commit {
                    gid: t,
                    participants,
                });
            }
        }
        if keep {
            let lazy = std::mem::take(&mut n.lazy);
            n.durable.extend(lazy);
            for (_, r) in std::mem::take(&mut n.ends_in_flight) {
                n.durable.push(r);
            }
        }
        n.in_flight.clear();
        n.lazy.clear();
        n.ends_in_flight.clear();
        n.machines.clear();
        n.lasts.clear();
        n.retry_timers.clear();
        // Requests already sent may still arrive (their answers go nowhere: they name
        // the old epoch); answers in flight have nobody to go to.
        n.net.retain(|m| {
            matches!(
                m,
                Msg::Prepare(..)
                    | Msg::CommitPrepared(..)
                    | Msg::Abort(..)
                    | Msg::CommitLast(..)
                    | Msg::Fence(..)
                    | Msg::Forget(..)
            )
        });
        n.epoch += 1;
        let in_doubt = recovery::in_doubt_after_replay(n.durable.iter().cloned(), self.mutations);
        for (t, participants) in in_doubt {
            let mut out = Vec::new();
            let m = commit::Commit::decided(participants, self.config(AckMode::Durable), &mut out);
            n.machines.insert(t, MachineKey::new(m));
            for e in out {
                if let Effect::Send { to, .. } = e {
                    let p: usize = to[1..].parse().unwrap_or(0);
                    n.net.push(Msg::CommitPrepared(p, t, n.epoch));
                }
            }
        }
        n.net.sort();
        n
    }

    /// Nothing is left to happen: nothing prepared, every transaction one outcome, every
    /// answer true.
    fn at_quiescence(&self, s: &State) -> Result<(), String> {
        for (p, db) in s.dbs.iter().enumerate() {
            if let Some((t, _)) = db.iter().find(|(_, b)| **b == Branch::Prepared) {
                return Err(format!("invariant 4: a{p} still has {t:?} prepared"));
            }
        }
        for (p, rows) in s.rows.iter().enumerate() {
            if let Some((t, _)) = rows.iter().find(|(_, r)| matches!(r, Row::Committed(_))) {
                return Err(format!("invariant 8: a{p} keeps {t:?}'s decision row"));
            }
        }
        if let Some(t) = s.lasts.keys().next() {
            return Err(format!("invariant 4: {t:?} is never settled"));
        }
        let txns: BTreeSet<Txn> = s.dbs.iter().flat_map(|db| db.keys().copied()).collect();
        for t in txns {
            let states: Vec<Option<&Branch>> = s.dbs.iter().map(|db| db.get(&t)).collect();
            let writers = (0..states.len()).filter(|p| self.writes(*p, t)).count();
            let committed = states
                .iter()
                .filter(|b| **b == Some(&Branch::Committed))
                .count();
            if committed > 0 && committed < writers {
                return Err(format!("invariant 2: {t:?} ends as {states:?}"));
            }
            match s.told.get(&t) {
                Some(Told::Committed) if committed < writers => {
                    return Err(format!(
                        "invariant 3: {t:?} told committed, ends as {states:?}"
                    ))
                }
                Some(Told::Aborted) if committed > 0 => {
                    return Err(format!(
                        "invariant 6: {t:?} told aborted, ends as {states:?}"
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Recovery of this incarnation is already acting on `t`'s prepared branch on `p`: a
/// fence for it or a rollback of it is in flight.
fn recovery_busy(s: &State, t: Txn, p: usize) -> bool {
    s.net.iter().any(|m| match m {
        Msg::Fence(_, u, e, Some(q)) | Msg::Abort(q, u, true, e) => (*u, *q, *e) == (t, p, s.epoch),
        Msg::Fenced(_, u, _, Some(q)) => (*u, *q) == (t, p),
        _ => false,
    })
}

/// Something durable says `t` committed: the log's COMMIT, or its last agent's row.
fn decision_durable(n: &State, t: Txn) -> bool {
    let row = n
        .rows
        .iter()
        .any(|r| matches!(r.get(&t), Some(Row::Committed(_))));
    row || says_commit(&n.durable, t)
}

/// The log knows `t` is finished: END, or a one-phase record (a COMMIT naming nobody).
fn says_finished(durable: &[Replayed<Txn>], t: Txn) -> bool {
    durable.iter().any(|r| match r {
        Replayed::End { gid } => *gid == t,
        Replayed::Commit { gid, participants } => *gid == t && participants.is_empty(),
        Replayed::OperatorAbort { .. } => false,
    })
}

fn says_commit(durable: &[Replayed<Txn>], t: Txn) -> bool {
    durable
        .iter()
        .any(|r| matches!(r, Replayed::Commit { gid, .. } if *gid == t))
}
