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
//! - The decision log: a forced record is durable after a random fsync delay; a crash
//!   before that keeps it or not (either may happen on a real disk). A lazy record is
//!   written with the next flush and a crash may lose it. The device can fail an append,
//!   which may have reached the disk all the same; the coordinator then exits.
//! - A coordinator crash loses everything in memory; the restart takes the next epoch,
//!   replays the log (`in_doubt_after_replay`) and drives the in-doubt transactions, and
//!   recovery passes list every agent's prepared branches (`prepared_branch_action`).
//!
//! Not simulated yet (the runtime has them; the core does not): interactive
//! transactions, one-phase and last-agent commits, `txn_id` retries and GET, operator
//! resolve.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use twopc_core::commit::{self, AckMode, CommitAnswer, Effect, Request, Timer, Vote};
use twopc_core::mutation::Mutations;
use twopc_core::recovery::{self, BranchAction, Replayed};
use twopc_core::Participant;

use crate::oracle::{Oracle, Violation};
use crate::recovery_action;
use crate::rng::Rng;

/// Simulated time, in microseconds.
pub type Micros = u64;

/// The lines of trace kept for a failing seed's report.
const TRACE_LINES_MAX: usize = 400;
/// Transactions open at once, at most (the coordinator's limit).
const OPEN_TXNS_MAX: usize = 8;

/// A transaction's GID: the coordinator's epoch and a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gid {
    pub epoch: u64,
    pub seq: u64,
}

impl std::fmt::Display for Gid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "g{}.{}", self.epoch, self.seq)
    }
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AgentRequest {
    /// The branch's statements, then PREPARE TRANSACTION (one pipelined request).
    Prepare {
        writes: bool,
        fails: bool,
    },
    CommitPrepared,
    Abort,
    ListPrepared,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum AgentReply {
    Vote(Vote),
    Commit(CommitAnswer),
    Aborted,
    Prepared(Vec<Gid>),
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
}

#[derive(Debug, Clone)]
enum Event {
    ClientArrives,
    /// A request reaches an agent over connection `conn`.
    Request {
        call: u64,
        conn: u64,
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
        gid: Gid,
    },
    /// The forced append of `gid`'s COMMIT failed (the record may be on disk).
    AppendFailed {
        incarnation: u64,
        gid: Gid,
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
    /// The time the last message on the current connection arrives (in order).
    last_delivery: Micros,
    db: BTreeMap<Gid, Branch>,
    tombstones: BTreeSet<Gid>,
}

struct Log {
    /// The next forced append fails.
    fail_next: bool,
    durable: Vec<Replayed<Gid>>,
    in_flight: Vec<Replayed<Gid>>,
    lazy: Vec<Replayed<Gid>>,
}

struct Coordinator {
    up: bool,
    epoch: u64,
    incarnation: u64,
    next_seq: u64,
    machines: BTreeMap<Gid, commit::Commit>,
    calls: BTreeMap<u64, Call>,
}

/// Counters for the report.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub steps: u64,
    pub faults: u64,
    pub txns: u64,
    pub told_committed: u64,
    pub told_aborted: u64,
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
                last_delivery: 0,
                db: BTreeMap::new(),
                tombstones: BTreeSet::new(),
            })
            .collect();
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
                in_flight: vec![],
                lazy: vec![],
            },
            coord: Coordinator {
                up: false,
                epoch: 0,
                incarnation: 0,
                next_seq: 0,
                machines: BTreeMap::new(),
                calls: BTreeMap::new(),
            },
            oracle: Oracle::default(),
            stats: Stats::default(),
            trace: VecDeque::new(),
            faults_on: true,
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
        self.oracle.at_quiescence(&dbs, self.coord.machines.len())
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
            Event::Request { call, conn } => self.deliver_request(call, conn)?,
            Event::Reply { call, conn, reply } => self.deliver_reply(call, conn, reply)?,
            Event::CallFailed { call, sent } => self.call_failed(call, sent)?,
            Event::Durable { incarnation, gid } => self.durable(incarnation, gid)?,
            Event::AppendFailed { incarnation, gid } => self.append_failed(incarnation, gid)?,
            Event::LogDeviceFails => {
                self.note("the log device will fail the next forced append".into());
                self.log.fail_next = true;
            }
            Event::LazyFlush { incarnation } => {
                if incarnation == self.coord.incarnation && self.coord.up {
                    let lazy = std::mem::take(&mut self.log.lazy);
                    self.log.durable.extend(lazy);
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
        if !self.coord.up || self.coord.machines.len() >= OPEN_TXNS_MAX {
            return;
        }
        let n = self.agents.len() as u64;
        let count = self.rng.range(1, n.min(3)) as usize;
        let mut chosen = BTreeSet::new();
        while chosen.len() < count {
            chosen.insert(self.rng.range(0, n - 1) as usize);
        }
        self.coord.next_seq += 1;
        let gid = Gid {
            epoch: self.coord.epoch,
            seq: self.coord.next_seq,
        };
        self.stats.txns += 1;
        let mut config = commit::Config::new(if self.rng.chance(500) {
            AckMode::Applied
        } else {
            AckMode::Durable
        });
        config.ack_wait_ms = 20;
        config.retry_min_ms = 1;
        config.retry_max_ms = 50;
        config.mutations = self.settings.mutations;
        let machine = commit::Commit::new(chosen.iter().map(|i| name(*i)), config);
        self.coord.machines.insert(gid, machine);
        let mut plan = Vec::new();
        for i in chosen {
            let writes = self.rng.chance(800);
            let fails = self.rng.chance(30);
            plan.push((name(i), writes));
            self.call(
                i,
                Some(gid),
                AgentRequest::Prepare { writes, fails },
                Purpose::Txn,
            );
        }
        self.note(format!("client begins {gid} on {plan:?}"));
        self.oracle.planned(gid, plan);
    }

    // ---- the network ----

    fn call(&mut self, agent: usize, gid: Option<Gid>, request: AgentRequest, purpose: Purpose) {
        self.next_call += 1;
        let id = self.next_call;
        self.coord.calls.insert(
            id,
            Call {
                participant: agent,
                gid,
                request,
                purpose,
                incarnation: self.coord.incarnation,
            },
        );
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
        self.schedule(at - self.now, Event::Request { call: id, conn });
    }

    /// When a message sent now on `agent`'s connection arrives: after a random delay,
    /// never before the one sent before it.
    fn delivery_time(&mut self, agent: usize) -> Micros {
        let delay = self.rng.range(50, 3_000);
        let at = (self.now + delay).max(self.agents[agent].last_delivery);
        self.agents[agent].last_delivery = at;
        at
    }

    fn deliver_request(&mut self, call: u64, conn: u64) -> Result<(), Violation> {
        let Some(c) = self.coord.calls.get(&call).cloned() else {
            return Ok(());
        };
        let i = c.participant;
        if !self.agents[i].up || self.agents[i].conn != conn {
            return Ok(());
        }
        let reply = self.agent_handles(i, c.gid, c.request, c.purpose)?;
        let at = self.delivery_time(i);
        self.schedule(at - self.now, Event::Reply { call, conn, reply });
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
        request: AgentRequest,
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
            (AgentRequest::Prepare { writes, fails }, Some(g)) => self.prepare(i, g, writes, fails),
            (AgentRequest::CommitPrepared, Some(g)) => {
                if self.agents[i].db.get(&g) == Some(&Branch::Prepared) {
                    let durable = self.log_says_commit(g);
                    self.oracle.commit_prepared(g, &a, durable)?;
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
                        .is_some_and(commit::Commit::deciding);
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

    fn log_says_commit(&self, g: Gid) -> bool {
        self.log
            .durable
            .iter()
            .any(|r| matches!(r, Replayed::Commit { gid, .. } if *gid == g))
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
            if let Ok(AgentReply::Prepared(gids)) = result {
                self.recover_listed(c.participant, gids);
            }
            return Ok(());
        }
        let Some(gid) = c.gid else { return Ok(()) };
        let p = name(c.participant);
        let jitter = self.rng.next_u64();
        let mut out = Vec::new();
        let Some(m) = self.coord.machines.get_mut(&gid) else {
            return Ok(());
        };
        match (c.request, result) {
            (AgentRequest::Prepare { .. }, Ok(AgentReply::Vote(v))) => m.on_vote(&p, v, &mut out),
            (AgentRequest::Prepare { .. }, Err(sent)) => {
                let v = if sent { Vote::Unknown } else { Vote::No };
                m.on_vote(&p, v, &mut out)
            }
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

    fn carry_out(&mut self, gid: Gid, effects: Vec<Effect>) -> Result<(), Violation> {
        for e in effects {
            self.note(format!("coordinator {gid}: {e:?}"));
            match e {
                Effect::AppendCommit { participants } => {
                    let record = Replayed::Commit { gid, participants };
                    let fsync = self.rng.range(100, 4_000);
                    let incarnation = self.coord.incarnation;
                    if std::mem::take(&mut self.log.fail_next) {
                        // The write may have reached the disk before the failed fsync.
                        if self.rng.chance(500) {
                            self.log.durable.push(record);
                        }
                        self.schedule(fsync, Event::AppendFailed { incarnation, gid });
                    } else {
                        self.log.in_flight.push(record);
                        self.schedule(fsync, Event::Durable { incarnation, gid });
                    }
                }
                Effect::AppendEnd => {
                    self.log.lazy.push(Replayed::End { gid });
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
                Effect::Answer(a) => {
                    let durable = self.log_says_commit(gid);
                    match &a {
                        commit::Answer::Committed { .. } => self.stats.told_committed += 1,
                        commit::Answer::Aborted(_) => self.stats.told_aborted += 1,
                    }
                    self.oracle.told(gid, &a, durable)?;
                }
            }
        }
        if self.coord.machines.get(&gid).is_some_and(|m| m.finished()) {
            self.coord.machines.remove(&gid);
        }
        Ok(())
    }

    fn durable(&mut self, incarnation: u64, gid: Gid) -> Result<(), Violation> {
        if incarnation != self.coord.incarnation || !self.coord.up {
            return Ok(());
        }
        // The commit record, and the lazy records before it (one write).
        if let Some(pos) = self
            .log
            .in_flight
            .iter()
            .position(|r| matches!(r, Replayed::Commit { gid: g, .. } if *g == gid))
        {
            let lazy = std::mem::take(&mut self.log.lazy);
            self.log.durable.extend(lazy);
            let r = self.log.in_flight.remove(pos);
            self.log.durable.push(r);
        }
        let mut out = Vec::new();
        if let Some(m) = self.coord.machines.get_mut(&gid) {
            m.on_durable(&mut out);
        }
        self.carry_out(gid, out)
    }

    /// The coordinator learns its forced append failed: the core says what (if anything)
    /// the client hears, and the process exits (as `twopc-coordinator` does), so nothing
    /// else the core asked for happens.
    fn append_failed(&mut self, incarnation: u64, gid: Gid) -> Result<(), Violation> {
        if incarnation != self.coord.incarnation || !self.coord.up {
            return Ok(());
        }
        let mut out = Vec::new();
        if let Some(m) = self.coord.machines.get_mut(&gid) {
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
        self.coord.calls.clear();
        // A forced write in flight may or may not have reached the disk; so may a lazy one.
        let in_flight = std::mem::take(&mut self.log.in_flight);
        let lazy = std::mem::take(&mut self.log.lazy);
        for r in in_flight.into_iter().chain(lazy) {
            if self.rng.chance(500) {
                self.log.durable.push(r);
            }
        }
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
            let mut config = commit::Config::new(AckMode::Durable);
            config.retry_min_ms = 1;
            config.retry_max_ms = 50;
            config.mutations = self.settings.mutations;
            let mut out = Vec::new();
            let m = commit::Commit::decided(participants, config, &mut out);
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
        for i in 0..self.agents.len() {
            self.call(i, None, AgentRequest::ListPrepared, Purpose::Recovery);
        }
        let every = self.rng.range(5_000, 20_000);
        self.schedule(every, Event::RecoveryPass { incarnation });
    }

    fn recover_listed(&mut self, agent: usize, gids: Vec<Gid>) {
        for g in gids {
            let machine = self.coord.machines.get(&g);
            let action =
                recovery_action(self.coord.epoch, g.epoch, machine, self.settings.mutations);
            if action == BranchAction::RollBack {
                self.note(format!(
                    "recovery rolls back {g} on {} (presumed abort)",
                    name(agent)
                ));
                self.stats.recovery_rollbacks += 1;
                self.call(agent, Some(g), AgentRequest::Abort, Purpose::Recovery);
            }
        }
    }
}
