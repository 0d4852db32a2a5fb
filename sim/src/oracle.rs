//! The oracle: DESIGN's invariants, checked at the moment an event could break them and
//! once more when the healed world has settled. It sees what really happened in the
//! simulated databases and log, and what each client was told, never the core's own
//! state, so a broken core cannot talk it out of a violation.

use std::collections::{BTreeMap, BTreeSet};

use twopc_core::commit::Answer;
use twopc_core::Participant;

use crate::world::{Branch, Gid, Micros};

/// How long the coordinator must remember a commit by its client txn id (its outcome
/// retention): a retry beginning within it must not run again (invariant 7).
pub const RETENTION_US: Micros = 100_000;

/// An invariant that did not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// DESIGN's number for it.
    pub invariant: u8,
    pub what: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invariant {} broken: {}", self.invariant, self.what)
    }
}

fn broken(invariant: u8, what: String) -> Result<(), Violation> {
    Err(Violation { invariant, what })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Told {
    Committed,
    Aborted,
}

#[derive(Debug, Default)]
pub struct Oracle {
    /// Each transaction's branches and whether each writes.
    plans: BTreeMap<Gid, Vec<(Participant, bool)>>,
    told: BTreeMap<Gid, Told>,
    committed_on: BTreeMap<Gid, BTreeSet<Participant>>,
    /// Writers whose branch was rolled back.
    rolled_back_on: BTreeMap<Gid, BTreeSet<Participant>>,
    /// When each transaction began.
    began: BTreeMap<Gid, Micros>,
    /// When each committed transaction was decided (its first commit anywhere, or its
    /// client told `committed`, whichever came first).
    decided: BTreeMap<Gid, Micros>,
    /// Per client txn id, the attempt that committed writes.
    applied: BTreeMap<u32, Gid>,
    /// Client txn ids whose retry was answered `committed` (replayed) without running.
    replayed: BTreeSet<u32>,
}

impl Oracle {
    pub fn planned(&mut self, gid: Gid, plan: Vec<(Participant, bool)>, now: Micros) {
        self.plans.insert(gid, plan);
        self.began.insert(gid, now);
    }

    /// `gid` is decided commit (now, or earlier).
    fn decided_commit(&mut self, gid: Gid, now: Micros) {
        self.decided.entry(gid).or_insert(now);
    }

    /// Writer `p` of `gid` commits: if another attempt of its txn id committed writes
    /// and this one began within the retention after that one was decided, the txn id
    /// was applied twice.
    fn applied_once(&mut self, gid: Gid, p: &str) -> Result<(), Violation> {
        if gid.txn == 0 || !self.writes(gid, p) {
            return Ok(());
        }
        let first = *self.applied.entry(gid.txn).or_insert(gid);
        if first == gid {
            return Ok(());
        }
        let decided = self.decided.get(&first).copied().unwrap_or(0);
        let began = self.began.get(&gid).copied().unwrap_or(0);
        if began < decided + RETENTION_US {
            return broken(
                7,
                format!(
                    "txn id {} applied twice: {first} (decided at {decided} µs) and {gid} (began at {began} µs)",
                    gid.txn
                ),
            );
        }
        // Outside the retention window: this attempt is the one a later retry must see.
        self.applied.insert(gid.txn, gid);
        Ok(())
    }

    fn writes(&self, gid: Gid, p: &str) -> bool {
        self.plans
            .get(&gid)
            .is_some_and(|plan| plan.iter().any(|(q, w)| q == p && *w))
    }

    fn has_writer(&self, gid: Gid) -> bool {
        self.plans
            .get(&gid)
            .is_some_and(|plan| plan.iter().any(|(_, w)| *w))
    }

    /// A prepared branch is about to commit. `durable`: the log holds its COMMIT.
    pub fn commit_prepared(
        &mut self,
        gid: Gid,
        p: &str,
        durable: bool,
        now: Micros,
    ) -> Result<(), Violation> {
        if !durable {
            return broken(
                1,
                format!("{p} commits {gid} before its COMMIT decision is durable"),
            );
        }
        if self.told.get(&gid) == Some(&Told::Aborted) {
            return broken(
                6,
                format!("{p} commits {gid}, whose client was told aborted"),
            );
        }
        self.split(gid, p)?;
        self.decided_commit(gid, now);
        self.applied_once(gid, p)?;
        self.committed_on
            .entry(gid)
            .or_default()
            .insert(p.to_owned());
        Ok(())
    }

    /// A commit of `gid` on `p` while one of its writers was rolled back.
    fn split(&self, gid: Gid, p: &str) -> Result<(), Violation> {
        match self.rolled_back_on.get(&gid).filter(|s| !s.is_empty()) {
            Some(on) => broken(2, format!("{p} commits {gid}, rolled back on {on:?}")),
            None => Ok(()),
        }
    }

    /// A last agent committed `gid` with its decision row: the decision is commit.
    pub fn last_committed(&mut self, gid: Gid, p: &str, now: Micros) -> Result<(), Violation> {
        self.split(gid, p)?;
        self.decided_commit(gid, now);
        self.applied_once(gid, p)?;
        if self.told.get(&gid) == Some(&Told::Aborted) {
            return broken(
                6,
                format!("{p} commits {gid} as its last agent, whose client was told aborted"),
            );
        }
        self.committed_on
            .entry(gid)
            .or_default()
            .insert(p.to_owned());
        Ok(())
    }

    /// `gid`'s committed decision row is deleted; `logged`: the log durably holds its
    /// COMMIT. Without it nothing durable would say committed (recovery and `GET` would
    /// presume abort).
    pub fn row_forgotten(&mut self, gid: Gid, logged: bool) -> Result<(), Violation> {
        if !logged {
            return broken(
                3,
                format!("{gid}'s decision row is forgotten while the log does not hold its commit"),
            );
        }
        Ok(())
    }

    /// A branch was rolled back (or an abort left its tombstone).
    pub fn rolled_back(&mut self, gid: Gid, p: &str) -> Result<(), Violation> {
        if !self.writes(gid, p) {
            return Ok(());
        }
        if self.told.get(&gid) == Some(&Told::Committed) {
            return broken(
                3,
                format!("{p} rolls back {gid}, whose client was told committed"),
            );
        }
        if let Some(on) = self.committed_on.get(&gid).filter(|s| !s.is_empty()) {
            return broken(2, format!("{p} rolls back {gid}, committed on {on:?}"));
        }
        self.rolled_back_on
            .entry(gid)
            .or_default()
            .insert(p.to_owned());
        Ok(())
    }

    /// Recovery rolls back `gid` on `p`; `live`: a live transaction of the current
    /// incarnation, still deciding.
    pub fn recovery_rollback(&mut self, gid: Gid, p: &str, live: bool) -> Result<(), Violation> {
        if live {
            return broken(
                5,
                format!("recovery rolls back {gid} on {p} while it is live"),
            );
        }
        Ok(())
    }

    /// The client of `gid` is told `answer`; `durable`: the log holds its COMMIT.
    pub fn told(
        &mut self,
        gid: Gid,
        answer: &Answer,
        durable: bool,
        now: Micros,
    ) -> Result<(), Violation> {
        match answer {
            Answer::Committed { .. } => {
                self.decided_commit(gid, now);
                if !durable && self.has_writer(gid) {
                    return broken(
                        3,
                        format!("client told {gid} committed before anything durable said so"),
                    );
                }
                self.told.insert(gid, Told::Committed);
            }
            Answer::Aborted(why) => {
                if let Some(on) = self.committed_on.get(&gid).filter(|s| !s.is_empty()) {
                    return broken(
                        6,
                        format!("client told {gid} aborted ({why:?}), committed on {on:?}"),
                    );
                }
                self.told.insert(gid, Told::Aborted);
            }
        }
        Ok(())
    }

    /// A retry of client txn id `txn` is answered `committed` (replayed, nothing run):
    /// true only if some attempt of it committed, checked once the world has settled.
    pub fn told_replayed(&mut self, txn: u32) {
        self.replayed.insert(txn);
    }

    /// The healed world has settled: nothing is left prepared or in doubt, every
    /// transaction has one outcome, and every answer is true.
    pub fn at_quiescence(
        &self,
        dbs: &[&BTreeMap<Gid, Branch>],
        unfinished: usize,
    ) -> Result<(), Violation> {
        for (i, db) in dbs.iter().enumerate() {
            if let Some((g, _)) = db.iter().find(|(_, b)| **b == Branch::Prepared) {
                return broken(
                    4,
                    format!("a{i} still has {g} prepared after the world healed"),
                );
            }
        }
        if unfinished > 0 {
            return broken(
                4,
                format!("{unfinished} transactions still unfinished after the world healed"),
            );
        }
        if let Some(txn) = self
            .replayed
            .iter()
            .find(|t| !self.decided.keys().any(|g| g.txn == **t))
        {
            return broken(
                6,
                format!(
                    "a retry of txn id {txn} was told committed, and no attempt of it committed"
                ),
            );
        }
        for (gid, plan) in &self.plans {
            let writers: Vec<&Participant> =
                plan.iter().filter(|(_, w)| *w).map(|(p, _)| p).collect();
            let committed: Vec<&&Participant> = writers
                .iter()
                .filter(|p| {
                    let i: usize = p[1..].parse().unwrap_or(usize::MAX);
                    dbs.get(i).and_then(|db| db.get(gid)) == Some(&Branch::Committed)
                })
                .collect();
            let told = self.told.get(gid);
            if !committed.is_empty() && committed.len() < writers.len() {
                return broken(
                    2,
                    format!("{gid} committed on {committed:?} of its writers {writers:?}"),
                );
            }
            if told == Some(&Told::Committed) && committed.len() < writers.len() {
                return broken(
                    3,
                    format!(
                        "{gid} was told committed but committed on {committed:?} of {writers:?}"
                    ),
                );
            }
            if told == Some(&Told::Aborted) && !committed.is_empty() {
                return broken(
                    6,
                    format!("{gid} was told aborted but committed on {committed:?}"),
                );
            }
        }
        Ok(())
    }
}
