//! The simulated world: one coordinator running the real core (`twopc_core::commit`,
//! `twopc_core::recovery`), agents in front of databases with PostgreSQL's
//! prepared-transaction semantics, a network of per-agent connections, a decision log,
//! clients, crashes and restarts. One thread; every choice is drawn from the seed.
//!
//! What is simulated, and how faithfully:
//! - A database keeps each GID's branch: open, prepared, committed or rolled back. A crash
//!   rolls back open branches and keeps prepared ones (PREPARE is durable). COMMIT or
//!   ROLLBACK PREPARED of a GID that is not prepared answers "not prepared" (42704). The
//!   agent's tombstones (a late PREPARE after an abort is refused) live as long as the
//!   agent does.
//! - A connection between the coordinator and an agent delivers in order (TCP), each
//!   message after a random delay. It breaks (a fault, or either end crashing): every
//!   call in flight on it fails, and the caller cannot tell whether the request arrived.
//!   A partition makes new calls fail at once (nothing sent).
//! - The decision log is one file appended in order: a forced record is durable, with
//!   every record before it, after a random fsync delay; a lazy record is written with
//!   the next flush. A crash keeps a prefix of what was not yet synced (any length, so
//!   a forced record in flight may survive and lazy ones may be lost, never a record
//!   without those before it). The device can fail an append, which may have reached
//!   the disk all the same; the coordinator then exits.
//! - A coordinator crash loses everything in memory; the restart takes the next epoch,
//!   replays the log (`in_doubt_after_replay`) and drives the in-doubt transactions, and
//!   recovery passes list every agent's prepared branches (`prepared_branch_action`).
//!
//! - Last-agent and one-phase commits (`twopc_core::last_agent`): the last agent
//!   commits its statements with the transaction's decision row in one step; a fence
//!   inserts an aborted row unless a committed one exists; committed rows are listed
//!   for recovery and forgotten once the log knows the outcome.
//!
//! - Clients name a `txn_id` for most requests and retry it (after `aborted`,
//!   `unknown`, a refusal, or a lost `committed`); the coordinator admits each by the
//!   core's `outcomes::admit` with an outcome index it rebuilds after a crash from the
//!   log and the decision rows.
//!
//! Not simulated yet: interactive transactions, GET, operator resolve, a read-only
//! commit's forced record.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use twopc_core::commit::{self, AckMode, CommitAnswer, Effect, Request, Timer, Vote};
use twopc_core::last_agent::{self, LastAgent, LastAnswer, Settled, SettledAction};
use twopc_core::mutation::Mutations;
use twopc_core::outcomes::{Admission, Outcome, Outcomes};
use twopc_core::recovery::{self, BranchAction, Replayed};
use twopc_core::Participant;

use crate::oracle::{Oracle, Violation, RETENTION_US};
use crate::rng::Rng;
use crate::{known, recovery_action};

/// Simulated time, in microseconds.
pub type Micros = u64;

/// The lines of trace kept for a failing seed's report.
const TRACE_LINES_MAX: usize = 400;
/// Transactions open at once, at most (the coordinator's limit).
const OPEN_TXNS_MAX: usize = 8;
/// Per mille of calls (while faults are injected) whose caller's deadline fires before
/// the answer: the request still arrives and runs.
const CALL_TIMEOUT_PER_MILLE: u64 = 20;
/// The outcome index's size limit (never reached in a seed: retention decides).
const OUTCOMES_MAX: usize = 100_000;
/// Client txn ids waiting to be retried, at most.
const RETRIES_MAX: usize = 64;

/// A transaction's GID: the coordinator's epoch, a sequence number and, for a
/// last-agent or one-phase commit, the last agent (as the real GID names it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gid {
    pub epoch: u64,
    pub seq: u64,
    pub last: Option<usize>,
    /// The client's txn id (0: none given). Every record and decision row of the
    /// transaction carries it, as the real ones do.
    pub txn: u32,
}

impl std::fmt::Display for Gid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "g{}.{}", self.epoch, self.seq)?;
        if let Some(l) = self.last {
            write!(f, "@a{l}")?;
        }
        match self.txn {
            0 => Ok(()),
            t => write!(f, "#t{t}"),
        }
    }
}

/// A row of an agent's decision table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Row {
    /// Committed with the last agent's branch; names the prepared participants.
    Committed(Vec<Participant>),
    /// Inserted by a fence: a later commit of the GID fails on the key.
    Aborted,
}

/// A branch in a simulated database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Branch {
    Prepared,
    Committed,
    /// Finished without writing (voted READ-ONLY).
    ReadOnlyDone,
    RolledBack,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum AgentRequest {
    /// The branch's statements, then PREPARE TRANSACTION (one pipelined request).
    Prepare {
        writes: bool,
        fails: bool,
    },
    CommitPrepared,
    Abort,
    ListPrepared,
    /// The last agent's statements, then COMMIT with the decision row naming `prepared`
    /// (the row only if something was written or prepared).
    CommitLast {
        writes: bool,
        fails: bool,
        prepared: Vec<Participant>,
    },
    /// Settle the decision row: an aborted one goes in unless a committed one exists.
    Fence,
    /// Delete a committed decision row.
    Forget,
    ListDecisions,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum AgentReply {
    Vote(Vote),
    Commit(CommitAnswer),
    Aborted,
    Prepared(Vec<Gid>),
    Last(LastAnswer),
    Row(Settled),
    Forgotten,
    Decisions(Vec<(Gid, Vec<Participant>)>),
    /// Not now (try again).
    Busy,
}

/// What a forced append is for, once durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// The transaction's COMMIT: tell its machine.
    Machine,
    /// A last-agent transaction's END or one-phase record: forget its decision row.
    Forget,
}

/// Why a call was made, to route its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// For the transaction's machine.
    Txn,
    /// A recovery pass's listing, or its rollback of what it found.
    Recovery,
}

#[derive(Debug, Clone)]
struct Call {
    participant: usize,
    gid: Option<Gid>,
    request: AgentRequest,
    purpose: Purpose,
    incarnation: u64,
    /// A recovery fence: the agent that listed the branch prepared.
    listed_on: Option<usize>,
}

#[derive(Debug, Clone)]
enum Event {
    ClientArrives,
    /// A request reaches an agent over connection `conn` (it runs even if its caller
    /// gave up meanwhile).
    Request {
        call: u64,
        conn: u64,
        request: Call,
    },
    /// The last agent's commit, started when its request arrived, finishes (unless the
    /// agent crashed since: `boot`).
    Execute {
        call: u64,
        conn: u64,
        boot: u64,
        request: Call,
    },
    Reply {
        call: u64,
        conn: u64,
        reply: AgentReply,
    },
    /// The call failed; `sent`: the request may have reached the agent.
    CallFailed {
        call: u64,
        sent: bool,
    },
    Durable {
        incarnation: u64,
        record: Replayed<Gid>,
        then: Then,
    },
    /// A forced append for `gid` failed (the record may be on disk).
    AppendFailed {
        incarnation: u64,
        gid: Gid,
        then: Then,
    },
    /// The log device fails the next forced append.
    LogDeviceFails,
    LazyFlush {
        incarnation: u64,
    },
    Timer {
        incarnation: u64,
        gid: Gid,
        timer: Timer,
    },
    RecoveryPass {
        incarnation: u64,
    },
    CrashCoordinator,
    RestartCoordinator,
    CrashAgent(usize),
    RestartAgent(usize),
    BreakConnection(usize),
    Partition {
        agent: usize,
        for_us: Micros,
    },
}

/// What a run is made of.
#[derive(Debug, Clone)]
pub struct Settings {
    pub agents: usize,
    /// Events processed while faults are injected; then the world heals and settles.
    pub steps: u64,
    /// Simulated time the healed world gets to resolve everything.
    pub settle_us: Micros,
    /// Per mille of events after which a fault is injected.
    pub fault_per_mille: u64,
    pub mutations: Mutations,
}

impl Settings {
    pub fn new(steps: u64, mutations: Mutations) -> Settings {
        Settings {
            agents: 3,
            steps,
            settle_us: 5_000_000,
            fault_per_mille: 15,
            mutations,
        }
    }
}

struct Agent {
    up: bool,
    /// Connection generation: a message of an older one is never delivered.
    conn: u64,
    partitioned_until: Micros,
    /// Incremented by every crash: work started before it is lost.
    boot: u64,
    /// The time the last message on the current connection arrives (in order).
    last_delivery: Micros,
    db: BTreeMap<Gid, Branch>,
    /// The decision table (in the database: survives a crash).
    rows: BTreeMap<Gid, Row>,
    /// Last-agent commits running (started, not finished).
    executing: BTreeSet<Gid>,
    tombstones: BTreeSet<Gid>,
}

struct Log {
    /// The next forced append fails.
    fail_next: bool,
    durable: Vec<Replayed<Gid>>,
    /// Appended, not yet synced, in append order.
    unsynced: Vec<Replayed<Gid>>,
}

impl Log {
    /// Syncs every record up to `record` (all of them if it is not there).
    fn sync_through(&mut self, record: Option<&Replayed<Gid>>) {
        let end = record
            .and_then(|r| self.unsynced.iter().position(|u| u == r))
            .map_or(self.unsynced.len(), |pos| pos + 1);
        self.durable.extend(self.unsynced.drain(..end));
    }
}

/// A last-agent transaction: its machine and the last agent's work.
struct LastTxn {
    machine: LastAgent,
    writes: bool,
    fails: bool,
}

struct Coordinator {
    up: bool,
    epoch: u64,
    incarnation: u64,
    next_seq: u64,
    machines: BTreeMap<Gid, commit::Commit>,
    lasts: BTreeMap<Gid, LastTxn>,
    /// Last-agent transactions whose END or one-phase record is being forced.
    appending: BTreeSet<Gid>,
    calls: BTreeMap<u64, Call>,
    /// The outcome index by client txn id (lost in a crash, rebuilt from the log and the
    /// decision rows).
    outcomes: Outcomes<Gid>,
    /// Agents whose decision rows this incarnation has read.
    rows_read: BTreeSet<usize>,
}

/// Counters for the report.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub steps: u64,
    pub faults: u64,
    pub txns: u64,
    pub told_committed: u64,
    pub told_aborted: u64,
    pub told_unknown: u64,
    pub last_agent_txns: u64,
    /// Requests naming a txn id an earlier attempt used.
    pub retries: u64,
    /// Requests refused by the txn-id rule (committed, in doubt, rows not read, running).
    pub refused: u64,
    /// Of those, retries of a committed txn id answered its outcome (replayed).
    pub replayed: u64,
    pub recovery_rollbacks: u64,
}

pub struct World {
    pub settings: Settings,
    rng: Rng,
    now: Micros,
    queue: BinaryHeap<Reverse<(Micros, u64, usize)>>,
    events: Vec<Option<Event>>,
    seq: u64,
    next_call: u64,
    agents: Vec<Agent>,
    log: Log,
    coord: Coordinator,
    oracle: Oracle,
    pub stats: Stats,
    trace: VecDeque<String>,
    faults_on: bool,
    /// Client txn ids to try again (after `aborted`, `unknown`, a refusal, or a
    /// `committed` whose answer the client did not get).
    retries: VecDeque<(Micros, u32)>,
    next_txn: u32,
}

fn name(i: usize) -> Participant {
    format!("a{i}")
}

fn index(p: &str) -> usize {
    p[1..].parse().unwrap_or(usize::MAX)
}

impl World {
    pub fn new(seed: u64, settings: Settings) -> World {
        let agents = (0..settings.agents)
            .map(|_| Agent {
                up: true,
                conn: 0,
                partitioned_until: 0,
                boot: 0,
                last_delivery: 0,
                db: BTreeMap::new(),
                rows: BTreeMap::new(),
                executing: BTreeSet::new(),
                tombstones: BTreeSet::new(),
            })
            .collect();
        let mutations = settings.mutations;
        let mut w = World {
            settings,
            rng: Rng::new(seed),
            now: 0,
            queue: BinaryHeap::new(),
            events: Vec::new(),
            seq: 0,
            next_call: 0,
            agents,
            log: Log {
                fail_next: false,
                durable: vec![],
                unsynced: vec![],
            },
            coord: Coordinator {
                up: false,
                epoch: 0,
                incarnation: 0,
                next_seq: 0,
                machines: BTreeMap::new(),
                lasts: BTreeMap::new(),
                appending: BTreeSet::new(),
                calls: BTreeMap::new(),
                outcomes: Outcomes::new(OUTCOMES_MAX, mutations),
                rows_read: BTreeSet::new(),
            },
            oracle: Oracle::default(),
            stats: Stats::default(),
            trace: VecDeque::new(),
            faults_on: true,
            retries: VecDeque::new(),
            next_txn: 0,
        };
        w.start_coordinator();
        w.schedule(0, Event::ClientArrives);
        w
    }

    fn schedule(&mut self, after_us: Micros, e: Event) {
        self.seq += 1;
        self.events.push(Some(e));
        let at = self.now + after_us;
        self.queue
            .push(Reverse((at, self.seq, self.events.len() - 1)));
    }

    fn note(&mut self, line: String) {
        if self.trace.len() == TRACE_LINES_MAX {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("{:>12} µs  {line}", self.now));
    }

    /// The last lines of the trace.
    pub fn trace(&self) -> impl Iterator<Item = &String> {
        self.trace.iter()
    }

    /// Runs the faulty phase, heals the world, lets it settle, and checks the end state.
    pub fn run(&mut self) -> Result<(), Violation> {
        while self.stats.steps < self.settings.steps {
            if !self.step()? {
                break;
            }
        }
        self.heal();
        let end = self.now + self.settings.settle_us;
        while self
            .queue
            .peek()
            .is_some_and(|Reverse((at, _, _))| *at <= end)
        {
            self.step()?;
        }
        let dbs: Vec<&BTreeMap<Gid, Branch>> = self.agents.iter().map(|a| &a.db).collect();
        let unfinished = self.coord.machines.len() + self.coord.lasts.len();
        self.oracle.at_quiescence(&dbs, unfinished)?;
        for (i, a) in self.agents.iter().enumerate() {
            let left = a.rows.iter().find(|(_, r)| matches!(r, Row::Committed(_)));
            if let Some((g, _)) = left {
                return Err(Violation {
                    invariant: 8,
                    what: format!("a{i} keeps {g}'s decision row after the world healed"),
                });
            }
        }
        Ok(())
    }

    fn heal(&mut self) {
        self.faults_on = false;
        self.note("faults stop; every node restarts, every partition heals".into());
        if !self.coord.up {
            self.start_coordinator();
        }
        for i in 0..self.agents.len() {
            self.agents[i].partitioned_until = 0;
            if !self.agents[i].up {
                self.restart_agent(i);
            }
        }
    }

    /// One event. False when nothing is left to happen.
    fn step(&mut self) -> Result<bool, Violation> {
        let Some(Reverse((at, _, slot))) = self.queue.pop() else {
            return Ok(false);
        };
        self.now = at;
        self.stats.steps += 1;
        let Some(event) = self.events[slot].take() else {
            return Ok(true);
        };
        self.handle(event)?;
        if self.faults_on && self.rng.chance(self.settings.fault_per_mille) {
            self.inject_fault();
        }
        Ok(true)
    }

    fn handle(&mut self, event: Event) -> Result<(), Violation> {
        match event {
            Event::ClientArrives => self.client_arrives(),
            Event::Request {
                call,
                conn,
                request,
            } => self.deliver_request(call, conn, request)?,
            Event::Execute {
                call,
                conn,
                boot,
                request,
            } => self.execute(call, conn, boot, request)?,
            Event::Reply { call, conn, reply } => self.deliver_reply(call, conn, reply)?,
            Event::CallFailed { call, sent } => self.call_failed(call, sent)?,
            Event::Durable {
                incarnation,
                record,
                then,
            } => self.durable(incarnation, record, then)?,
            Event::AppendFailed {
                incarnation,
                gid,
                then,
            } => self.append_failed(incarnation, gid, then)?,
            Event::LogDeviceFails => {
                self.note("the log device will fail the next forced append".into());
                self.log.fail_next = true;
            }
            Event::LazyFlush { incarnation } => {
                if incarnation == self.coord.incarnation && self.coord.up {
                    self.log.sync_through(None);
                }
            }
            Event::Timer {
                incarnation,
                gid,
                timer,
            } => self.timer(incarnation, gid, timer)?,
            Event::RecoveryPass { incarnation } => self.recovery_pass(incarnation),
            Event::CrashCoordinator => self.crash_coordinator(),
            Event::RestartCoordinator => self.start_coordinator(),
            Event::CrashAgent(i) => self.crash_agent(i),
            Event::RestartAgent(i) => self.restart_agent(i),
            Event::BreakConnection(i) => self.break_connection(i),
            Event::Partition { agent, for_us } => {
                self.note(format!(
                    "partition: {} unreachable for {for_us} µs",
                    name(agent)
                ));
                self.agents[agent].partitioned_until = self.now + for_us;
            }
        }
        Ok(())
    }

    fn inject_fault(&mut self) {
        self.stats.faults += 1;
        let n = self.agents.len();
        let fault = match self.rng.range(0, 10) {
            0 | 1 if self.coord.up => Event::CrashCoordinator,
            10 => Event::LogDeviceFails,
            2 | 3 => Event::CrashAgent(self.rng.range(0, n as u64 - 1) as usize),
            4..=6 => Event::BreakConnection(self.rng.range(0, n as u64 - 1) as usize),
            _ => Event::Partition {
                agent: self.rng.range(0, n as u64 - 1) as usize,
                for_us: self.rng.range(1_000, 50_000),
            },
        };
        let after = self.rng.range(0, 2_000);
        self.schedule(after, fault);
    }

    // ---- clients ----

    fn client_arrives(&mut self) {
        if self.faults_on {
            let gap = self.rng.range(200, 3_000);
            self.schedule(gap, Event::ClientArrives);
        }
        let open = self.coord.machines.len() + self.coord.lasts.len();
        if !self.coord.up || open >= OPEN_TXNS_MAX {
            return;
        }
        let n = self.agents.len() as u64;
        let count = self.rng.range(1, n.min(3)) as usize;
        let mut chosen = BTreeSet::new();
        while chosen.len() < count {
            chosen.insert(self.rng.range(0, n - 1) as usize);
        }
        // One branch: one-phase (a last agent with nobody else) or 2PC; several: a
        // last-agent commit now and then.
        let last_agent = self.rng.chance(if count == 1 { 700 } else { 350 });
        let last = last_agent.then(|| {
            let pick = self.rng.range(0, count as u64 - 1) as usize;
            *chosen.iter().nth(pick).expect("chosen has count agents")
        });
        let Some(txn) = self.client_txn_id() else {
            return;
        };
        self.coord.next_seq += 1;
        let gid = Gid {
            epoch: self.coord.epoch,
            seq: self.coord.next_seq,
            last,
            txn,
        };
        self.stats.txns += 1;
        let plan: Vec<(usize, bool, bool)> = chosen
            .iter()
            .map(|i| (*i, self.rng.chance(800), self.rng.chance(30)))
            .collect();
        self.note(format!(
            "client begins {gid} on {plan:?} (agent, writes, fails)"
        ));
        let branches = plan.iter().map(|(i, w, _)| (name(*i), *w)).collect();
        self.oracle.planned(gid, branches, self.now);
        match last {
            Some(l) => self.begin_last_agent(gid, l, plan),
            None => self.begin_two_phase(gid, plan),
        }
    }

    /// The txn id of a new request (0: none), if the coordinator admits it: a retry of
    /// an earlier one now and then, else a fresh id or none.
    fn client_txn_id(&mut self) -> Option<u32> {
        let due = self.retries.iter().position(|(at, _)| *at <= self.now);
        let txn = match due.and_then(|i| self.retries.remove(i)) {
            Some((_, t)) => {
                self.stats.retries += 1;
                t
            }
            None => self.fresh_txn_id(),
        };
        if txn == 0 {
            return Some(0);
        }
        // Live: deciding or committing (an aborted one whose rollbacks are retried has
        // left the live table, as in the engine).
        let running = self
            .coord
            .machines
            .iter()
            .any(|(g, m)| g.txn == txn && m.phase() != commit::Phase::Aborted)
            || self
                .coord
                .lasts
                .iter()
                .any(|(g, t)| g.txn == txn && t.machine.deciding());
        let key = txn.to_string();
        let unsettled = self
            .coord
            .lasts
            .iter()
            .any(|(g, t)| g.txn == txn && t.machine.unsettled());
        // Every agent's rows were read, not only those the request touches: a retry may
        // name other agents than the attempt that committed (this found the engine's
        // old rule applying a txn id twice).
        let known = self.coord.rows_read.len() == self.agents.len();
        let admission = self.coord.outcomes.admission(&key, unsettled, known);
        if running || admission != Admission::Run {
            self.note(format!(
                "txn id t{txn} refused (running: {running}, {admission:?})"
            ));
            self.stats.refused += 1;
            if admission == Admission::AlreadyCommitted {
                // The retry is answered its recorded outcome: committed, replayed.
                self.oracle.told_replayed(txn);
                self.stats.replayed += 1;
            } else {
                self.retry_later(txn);
            }
            return None;
        }
        Some(txn)
    }

    fn fresh_txn_id(&mut self) -> u32 {
        if self.rng.chance(300) {
            return 0;
        }
        self.next_txn += 1;
        self.next_txn
    }

    /// The client tries `txn` again some time within twice the retention.
    fn retry_later(&mut self, txn: u32) {
        let queued = self.retries.iter().any(|(_, t)| *t == txn);
        if txn != 0 && self.retries.len() < RETRIES_MAX && !queued {
            let at = self.now + self.rng.range(0, 2 * RETENTION_US);
            self.retries.push_back((at, txn));
        }
    }

    fn begin_two_phase(&mut self, gid: Gid, plan: Vec<(usize, bool, bool)>) {
        let mut config = commit::Config::new(if self.rng.chance(500) {
            AckMode::Applied
        } else {
            AckMode::Durable
        });
        config.ack_wait_ms = 20;
        config.retry_min_ms = 1;
        config.retry_max_ms = 50;
        config.mutations = self.settings.mutations;
        let machine = commit::Commit::new(plan.iter().map(|(i, _, _)| name(*i)), config);
        self.coord.machines.insert(gid, machine);
        for (i, writes, fails) in plan {
            let request = AgentRequest::Prepare { writes, fails };
            self.call(i, Some(gid), request, Purpose::Txn);
        }
    }

    fn begin_last_agent(&mut self, gid: Gid, last: usize, plan: Vec<(usize, bool, bool)>) {
        self.stats.last_agent_txns += 1;
        let others: Vec<(usize, bool, bool)> = plan
            .iter()
            .copied()
            .filter(|(i, _, _)| *i != last)
            .collect();
        let (_, writes, fails) = plan
            .into_iter()
            .find(|(i, _, _)| *i == last)
            .expect("the last agent is in the plan");
        let mut out = Vec::new();
        let names = others.iter().map(|(i, _, _)| name(*i));
        let machine = LastAgent::new(names, name(last), self.settings.mutations, &mut out);
        let txn = LastTxn {
            machine,
            writes,
            fails,
        };
        self.coord.lasts.insert(gid, txn);
        for (i, writes, fails) in others {
            let request = AgentRequest::Prepare { writes, fails };
            self.call(i, Some(gid), request, Purpose::Txn);
        }
        // A one-phase commit's CommitLast: nothing the oracle checks yet.
        let _ = self.carry_out_last(gid, out);
    }

    // ---- the network ----

    fn call(&mut self, agent: usize, gid: Option<Gid>, request: AgentRequest, purpose: Purpose) {
        self.call_for(agent, gid, request, purpose, None);
    }

    fn call_for(
        &mut self,
        agent: usize,
        gid: Option<Gid>,
        request: AgentRequest,
        purpose: Purpose,
        listed_on: Option<usize>,
    ) {
        self.next_call += 1;
        let id = self.next_call;
        let call = Call {
            participant: agent,
            gid,
            request,
            purpose,
            incarnation: self.coord.incarnation,
            listed_on,
        };
        self.coord.calls.insert(id, call.clone());
        let a = &self.agents[agent];
        if !a.up || a.partitioned_until > self.now {
            self.schedule(
                1,
                Event::CallFailed {
                    call: id,
                    sent: false,
                },
            );
            return;
        }
        let conn = a.conn;
        let at = self.delivery_time(agent);
        let ev = Event::Request {
            call: id,
            conn,
            request: call,
        };
        self.schedule(at - self.now, ev);
        if self.faults_on && self.rng.chance(CALL_TIMEOUT_PER_MILLE) {
            // The caller's deadline fires first; the request still arrives and runs.
            let after = self.rng.range(0, 4_000);
            let ev = Event::CallFailed {
                call: id,
                sent: true,
            };
            self.schedule(after, ev);
        }
    }

    /// When a message sent now on `agent`'s connection arrives: after a random delay,
    /// never before the one sent before it.
    fn delivery_time(&mut self, agent: usize) -> Micros {
        let delay = self.rng.range(50, 3_000);
        let at = (self.now + delay).max(self.agents[agent].last_delivery);
        self.agents[agent].last_delivery = at;
        at
    }

    fn deliver_request(&mut self, call: u64, conn: u64, c: Call) -> Result<(), Violation> {
        let i = c.participant;
        if !self.agents[i].up || self.agents[i].conn != conn {
            return Ok(());
        }
        if matches!(c.request, AgentRequest::CommitLast { .. }) {
            // It may wait on a lock for a while; other requests (a fence) run meanwhile.
            let boot = self.agents[i].boot;
            if let Some(g) = c.gid {
                self.agents[i].executing.insert(g);
            }
            let after = self.rng.range(0, 5_000);
            let ev = Event::Execute {
                call,
                conn,
                boot,
                request: c,
            };
            self.schedule(after, ev);
            return Ok(());
        }
        let reply = self.agent_handles(i, c.gid, &c.request, c.purpose)?;
        let at = self.delivery_time(i);
        self.schedule(at - self.now, Event::Reply { call, conn, reply });
        Ok(())
    }

    fn execute(&mut self, call: u64, conn: u64, boot: u64, c: Call) -> Result<(), Violation> {
        let i = c.participant;
        if !self.agents[i].up || self.agents[i].boot != boot {
            return Ok(()); // the crash rolled it back
        }
        if let Some(g) = c.gid {
            self.agents[i].executing.remove(&g);
        }
        let reply = self.agent_handles(i, c.gid, &c.request, c.purpose)?;
        if self.agents[i].conn == conn {
            let at = self.delivery_time(i);
            self.schedule(at - self.now, Event::Reply { call, conn, reply });
        }
        Ok(())
    }

    fn deliver_reply(&mut self, call: u64, conn: u64, reply: AgentReply) -> Result<(), Violation> {
        let Some(c) = self.coord.calls.get(&call) else {
            return Ok(());
        };
        if self.agents[c.participant].conn != conn {
            return Ok(());
        }
        let c = self.coord.calls.remove(&call).expect("present");
        self.answer(c, Ok(reply))
    }

    fn call_failed(&mut self, call: u64, sent: bool) -> Result<(), Violation> {
        match self.coord.calls.remove(&call) {
            Some(c) => self.answer(c, Err(sent)),
            None => Ok(()),
        }
    }

    fn break_connection(&mut self, i: usize) {
        self.note(format!("connection to {} breaks", name(i)));
        self.agents[i].conn += 1;
        self.agents[i].last_delivery = self.now;
        let broken: Vec<u64> = self
            .coord
            .calls
            .iter()
            .filter(|(_, c)| c.participant == i)
            .map(|(id, _)| *id)
            .collect();
        for id in broken {
            self.schedule(
                1,
                Event::CallFailed {
                    call: id,
                    sent: true,
                },
            );
        }
    }

    // ---- the agents and their databases ----

    fn agent_handles(
        &mut self,
        i: usize,
        gid: Option<Gid>,
        request: &AgentRequest,
        purpose: Purpose,
    ) -> Result<AgentReply, Violation> {
        let a = name(i);
        let reply = match (request, gid) {
            (AgentRequest::ListPrepared, _) => AgentReply::Prepared(
                self.agents[i]
                    .db
                    .iter()
                    .filter(|(_, b)| **b == Branch::Prepared)
                    .map(|(g, _)| *g)
                    .collect(),
            ),
            // A commit of an older incarnation still running could commit its row after
            // this listing, when the new one took "no row" for "not committed": the
            // agent answers once such commits ended (the real one waits for them).
            (AgentRequest::ListDecisions, _)
                if self.agents[i]
                    .executing
                    .iter()
                    .any(|g| g.epoch < self.coord.epoch) =>
            {
                AgentReply::Busy
            }
            (AgentRequest::ListDecisions, _) => AgentReply::Decisions(
                self.agents[i]
                    .rows
                    .iter()
                    .filter_map(|(g, r)| match r {
                        Row::Committed(ps) => Some((*g, ps.clone())),
                        Row::Aborted => None,
                    })
                    .collect(),
            ),
            (AgentRequest::Prepare { writes, fails }, Some(g)) => {
                self.prepare(i, g, *writes, *fails)
            }
            (
                AgentRequest::CommitLast {
                    writes,
                    fails,
                    prepared,
                },
                Some(g),
            ) => self.commit_last(i, g, *writes, *fails, prepared.clone())?,
            (AgentRequest::Fence, Some(g)) => {
                self.agents[i].tombstones.insert(g);
                let row = self.agents[i].rows.entry(g).or_insert(Row::Aborted);
                AgentReply::Row(match row {
                    Row::Committed(ps) => Settled::Committed {
                        participants: ps.clone(),
                    },
                    Row::Aborted => Settled::Aborted,
                })
            }
            (AgentRequest::Forget, Some(g)) => {
                if matches!(self.agents[i].rows.get(&g), Some(Row::Committed(_))) {
                    let known = self.log_says_commit(g);
                    self.oracle.row_forgotten(g, known)?;
                    self.agents[i].rows.remove(&g);
                }
                AgentReply::Forgotten
            }
            (AgentRequest::CommitPrepared, Some(g)) => {
                if self.agents[i].db.get(&g) == Some(&Branch::Prepared) {
                    let durable = self.decision_durable(g);
                    self.oracle.commit_prepared(g, &a, durable, self.now)?;
                    self.agents[i].db.insert(g, Branch::Committed);
                    AgentReply::Commit(CommitAnswer::Committed)
                } else {
                    AgentReply::Commit(CommitAnswer::NotPrepared)
                }
            }
            (AgentRequest::Abort, Some(g)) => {
                if purpose == Purpose::Recovery {
                    let live = self
                        .coord
                        .machines
                        .get(&g)
                        .is_some_and(commit::Commit::deciding)
                        || self
                            .coord
                            .lasts
                            .get(&g)
                            .is_some_and(|t| t.machine.deciding());
                    self.oracle
                        .recovery_rollback(g, &a, live && g.epoch == self.coord.epoch)?;
                }
                self.agents[i].tombstones.insert(g);
                let db = &mut self.agents[i].db;
                if matches!(db.get(&g), Some(Branch::Prepared) | None) {
                    db.insert(g, Branch::RolledBack);
                    self.oracle.rolled_back(g, &a)?;
                }
                AgentReply::Aborted
            }
            (_, None) => AgentReply::Aborted,
        };
        self.note(format!("{a} answers {request:?} {gid:?}: {reply:?}"));
        Ok(reply)
    }

    fn prepare(&mut self, i: usize, g: Gid, writes: bool, fails: bool) -> AgentReply {
        let agent = &mut self.agents[i];
        if agent.tombstones.contains(&g) || agent.db.contains_key(&g) {
            return AgentReply::Vote(Vote::No);
        }
        let (branch, vote) = if fails {
            (Branch::RolledBack, Vote::No)
        } else if !writes {
            (Branch::ReadOnlyDone, Vote::ReadOnly)
        } else {
            (Branch::Prepared, Vote::Yes)
        };
        agent.db.insert(g, branch);
        AgentReply::Vote(vote)
    }

    /// The last agent's statements, COMMIT and decision row, as one local transaction.
    fn commit_last(
        &mut self,
        i: usize,
        g: Gid,
        writes: bool,
        fails: bool,
        prepared: Vec<Participant>,
    ) -> Result<AgentReply, Violation> {
        let agent = &mut self.agents[i];
        let seen = agent.db.contains_key(&g) || agent.rows.contains_key(&g);
        if agent.tombstones.contains(&g) || seen {
            // Refused before it ran, or (a fence's row) failed on the key.
            return Ok(AgentReply::Last(LastAnswer::DidNotCommit));
        }
        if fails {
            agent.db.insert(g, Branch::RolledBack);
            return Ok(AgentReply::Last(LastAnswer::DidNotCommit));
        }
        if !writes && prepared.is_empty() {
            agent.db.insert(g, Branch::ReadOnlyDone);
            return Ok(AgentReply::Last(LastAnswer::ReadOnly));
        }
        let branch = if writes {
            Branch::Committed
        } else {
            Branch::ReadOnlyDone
        };
        agent.db.insert(g, branch);
        agent.rows.insert(g, Row::Committed(prepared));
        self.oracle.last_committed(g, &name(i), self.now)?;
        Ok(AgentReply::Last(LastAnswer::Committed))
    }

    /// The log durably holds `g`'s COMMIT (or one-phase) record.
    fn log_says_commit(&self, g: Gid) -> bool {
        self.log
            .durable
            .iter()
            .any(|r| matches!(r, Replayed::Commit { gid, .. } if *gid == g))
    }

    /// The log durably knows `g` is finished: END, or a one-phase record.
    fn log_says_finished(&self, g: Gid) -> bool {
        self.log.durable.iter().any(|r| match r {
            Replayed::End { gid } => *gid == g,
            Replayed::Commit { gid, participants } => *gid == g && participants.is_empty(),
            Replayed::OperatorAbort { .. } => false,
        })
    }

    /// Something durable says `g` committed: its COMMIT record, or its last agent's
    /// committed decision row.
    fn decision_durable(&self, g: Gid) -> bool {
        let row = g
            .last
            .is_some_and(|l| matches!(self.agents[l].rows.get(&g), Some(Row::Committed(_))));
        row || self.log_says_commit(g)
    }

    fn crash_agent(&mut self, i: usize) {
        if !self.agents[i].up {
            return;
        }
        self.note(format!(
            "{} crashes (its open branches roll back; prepared ones stay)",
            name(i)
        ));
        self.break_connection(i);
        let agent = &mut self.agents[i];
        agent.up = false;
        agent.boot += 1;
        agent.executing.clear();
        agent.tombstones.clear();
        let after = self.rng.range(1_000, 200_000);
        self.schedule(after, Event::RestartAgent(i));
    }

    fn restart_agent(&mut self, i: usize) {
        if !self.agents[i].up {
            self.note(format!("{} restarts", name(i)));
            self.agents[i].up = true;
        }
    }

    // ---- the coordinator, running the core ----

    fn answer(&mut self, c: Call, result: Result<AgentReply, bool>) -> Result<(), Violation> {
        if c.incarnation != self.coord.incarnation || !self.coord.up {
            return Ok(());
        }
        if c.purpose == Purpose::Recovery {
            return self.recovery_answer(c, result);
        }
        let Some(gid) = c.gid else { return Ok(()) };
        if self.coord.lasts.contains_key(&gid) && !self.coord.machines.contains_key(&gid) {
            return self.last_answer(gid, &c, result);
        }
        let p = name(c.participant);
        let jitter = self.rng.next_u64();
        let mut out = Vec::new();
        let Some(m) = self.coord.machines.get_mut(&gid) else {
            return Ok(());
        };
        match (c.request, result) {
            (AgentRequest::Prepare { .. }, Ok(AgentReply::Vote(v))) => m.on_vote(&p, v, &mut out),
            (AgentRequest::Prepare { .. }, Err(sent)) => m.on_vote(&p, lost_vote(sent), &mut out),
            (AgentRequest::CommitPrepared, Ok(AgentReply::Commit(a))) => {
                m.on_commit_answer(&p, a, jitter, &mut out)
            }
            (AgentRequest::CommitPrepared, _) => {
                m.on_commit_answer(&p, CommitAnswer::Failed, jitter, &mut out)
            }
            (AgentRequest::Abort, r) => {
                m.on_abort_answer(&p, r == Ok(AgentReply::Aborted), jitter, &mut out)
            }
            _ => {}
        }
        self.carry_out(gid, out)
    }

    /// An answer for a last-agent transaction's machine.
    fn last_answer(
        &mut self,
        gid: Gid,
        c: &Call,
        result: Result<AgentReply, bool>,
    ) -> Result<(), Violation> {
        let p = name(c.participant);
        let mut out = Vec::new();
        let Some(t) = self.coord.lasts.get_mut(&gid) else {
            return Ok(());
        };
        let m = &mut t.machine;
        match (&c.request, result) {
            (AgentRequest::Prepare { .. }, Ok(AgentReply::Vote(v))) => m.on_vote(&p, v, &mut out),
            (AgentRequest::Prepare { .. }, Err(sent)) => m.on_vote(&p, lost_vote(sent), &mut out),
            (AgentRequest::CommitLast { .. }, Ok(AgentReply::Last(a))) => {
                m.on_last_answer(a, &mut out)
            }
            (AgentRequest::CommitLast { .. }, Err(sent)) => {
                let a = if sent {
                    LastAnswer::Uncertain
                } else {
                    LastAnswer::DidNotCommit
                };
                m.on_last_answer(a, &mut out)
            }
            (AgentRequest::Fence, Ok(AgentReply::Row(settled))) => {
                m.on_fence_answer(Some(settled), &mut out)
            }
            (AgentRequest::Fence, Err(_)) => m.on_fence_answer(None, &mut out),
            // Rollbacks are tried once; what stays prepared, recovery settles.
            _ => {}
        }
        self.carry_out_last(gid, out)
    }

    fn carry_out_last(
        &mut self,
        gid: Gid,
        effects: Vec<last_agent::Effect>,
    ) -> Result<(), Violation> {
        use last_agent::Effect as E;
        let Some(last) = gid.last else { return Ok(()) };
        for e in effects {
            self.note(format!("coordinator {gid}: {e:?}"));
            match e {
                E::CommitLast { prepared } => {
                    let t = &self.coord.lasts[&gid];
                    let request = AgentRequest::CommitLast {
                        writes: t.writes,
                        fails: t.fails,
                        prepared,
                    };
                    self.call(last, Some(gid), request, Purpose::Txn);
                }
                E::Fence => self.call(last, Some(gid), AgentRequest::Fence, Purpose::Txn),
                E::Abort(p) => self.call(index(&p), Some(gid), AgentRequest::Abort, Purpose::Txn),
                E::AppendOnePhase => self.append_one_phase(gid),
                E::Phase2 { prepared } => self.start_phase2(gid, prepared)?,
                E::Answer(a) => {
                    let told = match a {
                        last_agent::Answer::Committed => {
                            commit::Answer::Committed { pending: vec![] }
                        }
                        last_agent::Answer::Aborted(cause) => commit::Answer::Aborted(cause),
                        last_agent::Answer::Unknown => {
                            self.stats.told_unknown += 1;
                            self.retry_later(gid.txn);
                            continue;
                        }
                    };
                    self.tell(gid, &told)?;
                }
            }
        }
        if self
            .coord
            .lasts
            .get(&gid)
            .is_some_and(|t| t.machine.finished())
        {
            self.coord.lasts.remove(&gid);
        }
        Ok(())
    }

    /// A last-agent commit with nobody prepared: its one-phase record (a COMMIT naming
    /// nobody), forced, then the row is forgotten.
    fn append_one_phase(&mut self, gid: Gid) {
        if self.coord.appending.insert(gid) {
            let record = Replayed::Commit {
                gid,
                participants: vec![],
            };
            self.append_forced(gid, record, Then::Forget);
        }
    }

    /// A last-agent commit with `prepared` participants: the COMMIT record, lazily (the
    /// row is the decision), and phase 2 on a decided machine.
    fn start_phase2(&mut self, gid: Gid, prepared: Vec<Participant>) -> Result<(), Violation> {
        if self.coord.machines.contains_key(&gid) {
            return Ok(());
        }
        self.log.unsynced.push(Replayed::Commit {
            gid,
            participants: prepared.clone(),
        });
        let flush = self.rng.range(1_000, 20_000);
        let incarnation = self.coord.incarnation;
        self.schedule(flush, Event::LazyFlush { incarnation });
        let mut out = Vec::new();
        let m = commit::Commit::decided(prepared, self.phase2_config(), &mut out);
        self.coord.machines.insert(gid, m);
        self.carry_out(gid, out)
    }

    fn phase2_config(&self) -> commit::Config {
        let mut config = commit::Config::new(AckMode::Durable);
        config.retry_min_ms = 1;
        config.retry_max_ms = 50;
        config.mutations = self.settings.mutations;
        config
    }

    /// A forced append: durable after an fsync delay, or failed (the device's fault).
    fn append_forced(&mut self, gid: Gid, record: Replayed<Gid>, then: Then) {
        let fsync = self.rng.range(100, 4_000);
        let incarnation = self.coord.incarnation;
        if std::mem::take(&mut self.log.fail_next) {
            // The write may have reached the disk before the failed fsync.
            if self.rng.chance(500) {
                self.log.unsynced.push(record);
            }
            let ev = Event::AppendFailed {
                incarnation,
                gid,
                then,
            };
            self.schedule(fsync, ev);
        } else {
            self.log.unsynced.push(record.clone());
            let ev = Event::Durable {
                incarnation,
                record,
                then,
            };
            self.schedule(fsync, ev);
        }
    }

    /// The client of `gid` is told `answer`; the oracle checks it is true.
    fn tell(&mut self, gid: Gid, answer: &commit::Answer) -> Result<(), Violation> {
        let (outcome, retry_per_mille) = match answer {
            commit::Answer::Committed { .. } => {
                self.stats.told_committed += 1;
                // The answer did not reach the client: it tries again.
                (Outcome::Committed, 300)
            }
            commit::Answer::Aborted(_) => {
                self.stats.told_aborted += 1;
                (Outcome::Aborted, 500)
            }
        };
        let durable = self.decision_durable(gid);
        self.oracle.told(gid, answer, durable, self.now)?;
        self.remember(gid, outcome);
        if self.faults_on && self.rng.chance(retry_per_mille) {
            self.retry_later(gid.txn);
        }
        Ok(())
    }

    /// The coordinator remembers `gid`'s outcome by its txn id.
    fn remember(&mut self, gid: Gid, outcome: Outcome) {
        if gid.txn != 0 {
            let now_ms = self.now / 1_000;
            let key = gid.txn.to_string();
            self.coord.outcomes.remember(&key, gid, outcome, now_ms);
        }
    }

    fn carry_out(&mut self, gid: Gid, effects: Vec<Effect>) -> Result<(), Violation> {
        for e in effects {
            self.note(format!("coordinator {gid}: {e:?}"));
            match e {
                Effect::AppendCommit { participants } => {
                    let record = Replayed::Commit { gid, participants };
                    self.append_forced(gid, record, Then::Machine);
                }
                // A last-agent transaction's END is forced: then its row may go.
                Effect::AppendEnd if gid.last.is_some() => {
                    if self.coord.appending.insert(gid) {
                        self.append_forced(gid, Replayed::End { gid }, Then::Forget);
                    }
                }
                Effect::AppendEnd => {
                    self.log.unsynced.push(Replayed::End { gid });
                    let flush = self.rng.range(1_000, 20_000);
                    let incarnation = self.coord.incarnation;
                    self.schedule(flush, Event::LazyFlush { incarnation });
                }
                Effect::Send { to, request } => {
                    let r = match request {
                        Request::CommitPrepared => AgentRequest::CommitPrepared,
                        Request::Abort => AgentRequest::Abort,
                    };
                    self.call(index(&to), Some(gid), r, Purpose::Txn);
                }
                Effect::SetTimer { timer, after_ms } => {
                    let incarnation = self.coord.incarnation;
                    let ev = Event::Timer {
                        incarnation,
                        gid,
                        timer,
                    };
                    self.schedule(after_ms * 1_000, ev);
                }
                Effect::Answer(a) => self.tell(gid, &a)?,
            }
        }
        if self.coord.machines.get(&gid).is_some_and(|m| m.finished()) {
            self.coord.machines.remove(&gid);
        }
        Ok(())
    }

    fn durable(
        &mut self,
        incarnation: u64,
        record: Replayed<Gid>,
        then: Then,
    ) -> Result<(), Violation> {
        if incarnation != self.coord.incarnation || !self.coord.up {
            return Ok(());
        }
        // The record, and the lazy records before it (one write).
        if self.log.unsynced.contains(&record) {
            self.log.sync_through(Some(&record));
        }
        let gid = match record {
            Replayed::Commit { gid, .. } | Replayed::End { gid } => gid,
            Replayed::OperatorAbort { gid } => gid,
        };
        match then {
            Then::Machine => {
                let mut out = Vec::new();
                if let Some(m) = self.coord.machines.get_mut(&gid) {
                    m.on_durable(&mut out);
                }
                self.carry_out(gid, out)
            }
            Then::Forget => {
                self.coord.appending.remove(&gid);
                if let Some(last) = gid.last {
                    self.call(last, Some(gid), AgentRequest::Forget, Purpose::Recovery);
                }
                Ok(())
            }
        }
    }

    /// The coordinator learns a forced append failed: for a COMMIT the core says what
    /// (if anything) the client hears; then the process exits (as `twopc-coordinator`
    /// does), so nothing else the core asked for happens.
    fn append_failed(&mut self, incarnation: u64, gid: Gid, then: Then) -> Result<(), Violation> {
        if incarnation != self.coord.incarnation || !self.coord.up {
            return Ok(());
        }
        let mut out = Vec::new();
        if let (Then::Machine, Some(m)) = (then, self.coord.machines.get_mut(&gid)) {
            m.on_log_failed(&mut out);
        }
        let answers = out
            .into_iter()
            .filter(|e| matches!(e, Effect::Answer(_)))
            .collect();
        self.carry_out(gid, answers)?;
        self.note("the coordinator exits: its decision log failed".into());
        self.crash_coordinator();
        Ok(())
    }

    fn timer(&mut self, incarnation: u64, gid: Gid, timer: Timer) -> Result<(), Violation> {
        if incarnation != self.coord.incarnation || !self.coord.up {
            return Ok(());
        }
        let mut out = Vec::new();
        if let Some(m) = self.coord.machines.get_mut(&gid) {
            m.on_timer(&timer, &mut out);
        }
        self.carry_out(gid, out)
    }

    fn crash_coordinator(&mut self) {
        if !self.coord.up {
            return;
        }
        self.note("coordinator crashes".into());
        self.coord.up = false;
        self.coord.machines.clear();
        self.coord.lasts.clear();
        self.coord.appending.clear();
        self.coord.calls.clear();
        // What was not synced reached the disk up to some point (a torn tail is cut).
        let kept = self.rng.range(0, self.log.unsynced.len() as u64) as usize;
        self.log.unsynced.truncate(kept);
        self.log.sync_through(None);
        for i in 0..self.agents.len() {
            self.break_connection(i);
        }
        let after = self.rng.range(1_000, 100_000);
        self.schedule(after, Event::RestartCoordinator);
    }

    fn start_coordinator(&mut self) {
        if self.coord.up {
            return;
        }
        self.coord.up = true;
        self.coord.epoch += 1;
        self.coord.incarnation += 1;
        self.coord.next_seq = 0;
        self.coord.outcomes = Outcomes::new(OUTCOMES_MAX, self.settings.mutations);
        self.coord.rows_read.clear();
        let committed: Vec<Gid> = self
            .log
            .durable
            .iter()
            .filter_map(|r| match r {
                Replayed::Commit { gid, .. } => Some(*gid),
                _ => None,
            })
            .collect();
        for g in committed {
            self.remember(g, Outcome::Committed);
        }
        let in_doubt = recovery::in_doubt_after_replay(
            self.log.durable.iter().cloned(),
            self.settings.mutations,
        );
        self.note(format!(
            "coordinator starts, epoch {}; the log replays {} in doubt",
            self.coord.epoch,
            in_doubt.len()
        ));
        for (gid, participants) in in_doubt {
            let mut out = Vec::new();
            let m = commit::Commit::decided(participants, self.phase2_config(), &mut out);
            self.coord.machines.insert(gid, m);
            // Sends only (a replayed commit answers nobody): cannot break an invariant.
            let _ = self.carry_out(gid, out);
        }
        let incarnation = self.coord.incarnation;
        self.schedule(0, Event::RecoveryPass { incarnation });
    }

    fn recovery_pass(&mut self, incarnation: u64) {
        if incarnation != self.coord.incarnation || !self.coord.up {
            return;
        }
        let now_ms = self.now / 1_000;
        let retention_ms = RETENTION_US / 1_000;
        self.coord.outcomes.expire(now_ms, retention_ms, 10_000);
        for i in 0..self.agents.len() {
            self.call(i, None, AgentRequest::ListPrepared, Purpose::Recovery);
            self.call(i, None, AgentRequest::ListDecisions, Purpose::Recovery);
        }
        // Transactions told `unknown`: their last agent is asked again.
        let unsettled: Vec<Gid> = self
            .coord
            .lasts
            .iter()
            .filter(|(_, t)| t.machine.unsettled())
            .map(|(g, _)| *g)
            .collect();
        for g in unsettled {
            if let Some(last) = g.last {
                self.call(last, Some(g), AgentRequest::Fence, Purpose::Recovery);
            }
        }
        let every = self.rng.range(5_000, 20_000);
        self.schedule(every, Event::RecoveryPass { incarnation });
    }

    fn recovery_answer(
        &mut self,
        c: Call,
        result: Result<AgentReply, bool>,
    ) -> Result<(), Violation> {
        match (c.request, result, c.gid) {
            (AgentRequest::ListPrepared, Ok(AgentReply::Prepared(gids)), _) => {
                self.recover_listed(c.participant, gids);
                Ok(())
            }
            (AgentRequest::ListDecisions, Ok(AgentReply::Decisions(rows)), _) => {
                self.complete_rows(c.participant, rows)
            }
            (AgentRequest::Fence, Ok(AgentReply::Row(settled)), Some(g)) => {
                self.recovery_settled(g, c.listed_on, settled)
            }
            // Anything else: the next pass tries again.
            _ => Ok(()),
        }
    }

    fn recover_listed(&mut self, agent: usize, gids: Vec<Gid>) {
        for g in gids {
            let last_live = self
                .coord
                .lasts
                .get(&g)
                .is_some_and(|t| t.machine.deciding());
            let known = known(self.coord.machines.get(&g), last_live);
            let last = g.last.map(name);
            let action = recovery_action(
                self.coord.epoch,
                g.epoch,
                last.as_deref(),
                known,
                self.settings.mutations,
            );
            match action {
                BranchAction::RollBack => {
                    self.note(format!(
                        "recovery rolls back {g} on {} (presumed abort)",
                        name(agent)
                    ));
                    self.stats.recovery_rollbacks += 1;
                    self.call(agent, Some(g), AgentRequest::Abort, Purpose::Recovery);
                }
                BranchAction::AskLastAgent(l) => {
                    let request = AgentRequest::Fence;
                    self.call_for(index(&l), Some(g), request, Purpose::Recovery, Some(agent));
                }
                BranchAction::NotOurs | BranchAction::LeaveLive | BranchAction::LeaveToPhase2 => {}
            }
        }
    }

    /// A last agent's settled row, asked by recovery: an unsettled machine ends with
    /// it; then the core's rule for a settled outcome.
    fn recovery_settled(
        &mut self,
        g: Gid,
        listed_on: Option<usize>,
        settled: Settled,
    ) -> Result<(), Violation> {
        if let Some(t) = self.coord.lasts.get_mut(&g) {
            if t.machine.unsettled() {
                // Told `unknown`: the machine ends it (phase 2, or the rollbacks); its
                // outcome is remembered, as `adopt` does.
                let mut out = Vec::new();
                t.machine.on_fence_answer(Some(settled.clone()), &mut out);
                self.carry_out_last(g, out)?;
                let outcome = match settled {
                    Settled::Committed { .. } => Outcome::Committed,
                    Settled::Aborted => Outcome::Aborted,
                };
                self.remember(g, outcome);
            }
        }
        let in_doubt = self
            .coord
            .machines
            .get(&g)
            .is_some_and(commit::Commit::decided_commit);
        match last_agent::settled_action(&settled, in_doubt, false) {
            SettledAction::RollBack => {
                if let Some(agent) = listed_on {
                    self.note(format!(
                        "recovery rolls back {g} on {}: its row says aborted",
                        name(agent)
                    ));
                    self.stats.recovery_rollbacks += 1;
                    self.call(agent, Some(g), AgentRequest::Abort, Purpose::Recovery);
                }
                Ok(())
            }
            SettledAction::Phase2(prepared) => {
                self.remember(g, Outcome::Committed);
                self.start_phase2(g, prepared)
            }
            SettledAction::AppendOnePhase => {
                self.remember(g, Outcome::Committed);
                self.append_one_phase(g);
                Ok(())
            }
            SettledAction::Forget | SettledAction::Nothing => Ok(()),
        }
    }

    /// Committed decision rows `agent` lists: forgotten if the log knows the outcome,
    /// completed (one-phase record, or phase 2) if nobody drives them.
    fn complete_rows(
        &mut self,
        agent: usize,
        rows: Vec<(Gid, Vec<Participant>)>,
    ) -> Result<(), Violation> {
        for (g, participants) in rows {
            if self.log_says_finished(g) {
                self.call(agent, Some(g), AgentRequest::Forget, Purpose::Recovery);
                continue;
            }
            let c = &self.coord;
            if c.machines.contains_key(&g) || c.lasts.contains_key(&g) || c.appending.contains(&g) {
                continue;
            }
            let settled = Settled::Committed { participants };
            self.remember(g, Outcome::Committed);
            match last_agent::settled_action(&settled, false, false) {
                SettledAction::Phase2(prepared) => self.start_phase2(g, prepared)?,
                SettledAction::AppendOnePhase => self.append_one_phase(g),
                _ => {}
            }
        }
        self.coord.rows_read.insert(agent);
        Ok(())
    }
}

fn lost_vote(sent: bool) -> Vote {
    // Sent: the branch may be prepared. Not sent: it never ran.
    if sent {
        Vote::Unknown
    } else {
        Vote::No
    }
}
