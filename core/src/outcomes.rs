//! What the coordinator remembers of finished transactions, by client `txn_id`, and the
//! rule that keeps a `txn_id` from being applied twice (DESIGN invariant 7).
//!
//! A `txn_id` may be reused after an abort, so the index holds, per `txn_id`, the
//! outcome of its latest attempt (its GID); entries expire oldest first, after the
//! retention or beyond the size limit, and an expiring entry removes the `txn_id` only if
//! it still holds that attempt's outcome: a reused `txn_id`'s newer commit must not go
//! with its older abort (issue 14, defect 2).

use std::collections::{BTreeMap, VecDeque};

use crate::mutation::{Mutation, Mutations};

/// A finished attempt's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Committed,
    Aborted,
}

/// The outcome index: `txn_id` → (GID of its latest attempt, outcome).
#[derive(Debug, Clone)]
pub struct Outcomes<K> {
    by_txn: BTreeMap<String, (K, Outcome)>,
    /// In the order remembered: (when, in ms of the caller's clock; txn id; GID).
    order: VecDeque<(u64, String, K)>,
    max: usize,
    /// A committed outcome has been forgotten (expired or evicted): a txn id the index
    /// does not hold may be one of them, so presumed abort no longer answers for it.
    forgot_a_commit: bool,
    mutations: Mutations,
}

impl<K: Clone + PartialEq> Outcomes<K> {
    /// An index of at most `max` entries (at least one).
    pub fn new(max: usize, mutations: Mutations) -> Outcomes<K> {
        Outcomes {
            by_txn: BTreeMap::new(),
            order: VecDeque::new(),
            max: max.max(1),
            forgot_a_commit: false,
            mutations,
        }
    }

    /// `txn_id`'s attempt `gid` ended with `outcome` (at `now_ms`).
    pub fn remember(&mut self, txn_id: &str, gid: K, outcome: Outcome, now_ms: u64) {
        self.by_txn
            .insert(txn_id.to_owned(), (gid.clone(), outcome));
        self.order.push_back((now_ms, txn_id.to_owned(), gid));
        while self.order.len() > self.max {
            self.expire_oldest();
        }
        debug_assert!(self.by_txn.len() <= self.order.len());
    }

    /// The latest remembered attempt of `txn_id`.
    pub fn get(&self, txn_id: &str) -> Option<(&K, Outcome)> {
        self.by_txn.get(txn_id).map(|(g, o)| (g, *o))
    }

    /// [`admit`] for `txn_id` with what this index remembers of it.
    pub fn admission(&self, txn_id: &str, unsettled: bool, decisions_known: bool) -> Admission {
        let mut remembered = self.get(txn_id).map(|(_, o)| o);
        if remembered == Some(Outcome::Aborted) && self.mutations.on(Mutation::ReplayAnAbort) {
            remembered = Some(Outcome::Committed);
        }
        admit(remembered, unsettled, decisions_known)
    }

    /// The txn id whose latest attempt is `gid`, and its outcome (a scan: for the
    /// operator's tools, not a request path).
    pub fn by_gid(&self, gid: &K) -> Option<(&str, Outcome)> {
        self.by_txn
            .iter()
            .find(|(_, (g, _))| g == gid)
            .map(|(t, (_, o))| (t.as_str(), *o))
    }

    /// Forgets entries remembered `retention_ms` or more before `now_ms`, at most
    /// `budget` of them (bounded work per call).
    pub fn expire(&mut self, now_ms: u64, retention_ms: u64, budget: usize) {
        for _ in 0..budget {
            match self.order.front() {
                Some((at, _, _)) if now_ms.saturating_sub(*at) > retention_ms => {
                    self.expire_oldest()
                }
                _ => break,
            }
        }
    }

    /// Entries remembered (an entry superseded by a newer attempt counts until it
    /// expires).
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The latest `limit` remembered attempts, newest first: (txn id, GID, outcome). An
    /// attempt a newer one of its txn id superseded is left out.
    pub fn recent(&self, limit: usize) -> impl Iterator<Item = (&str, &K, Outcome)> + '_ {
        self.order
            .iter()
            .rev()
            .filter_map(|(_, txn_id, gid)| {
                let (g, o) = self.by_txn.get(txn_id)?;
                (g == gid).then_some((txn_id.as_str(), gid, *o))
            })
            .take(limit)
    }

    /// Whether a committed outcome has been forgotten since the index was made.
    pub fn forgot_a_commit(&self) -> bool {
        self.forgot_a_commit
    }

    /// Forgets the oldest entry, if its `txn_id` still holds that attempt's outcome.
    fn expire_oldest(&mut self) {
        let Some((_, txn_id, gid)) = self.order.pop_front() else {
            return;
        };
        let current = self.by_txn.get(&txn_id).is_some_and(|(g, _)| *g == gid);
        if current || self.mutations.on(Mutation::EvictByTxnId) {
            if let Some((_, Outcome::Committed)) = self.by_txn.remove(&txn_id) {
                self.forgot_a_commit = true;
            }
        }
    }
}

/// May a request naming a client `txn_id` run?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Run,
    /// An attempt committed: it must not run again (answer the recorded outcome).
    AlreadyCommitted,
    /// An attempt's outcome is unknown (its local commit is not settled yet): it may have
    /// committed, so nothing runs until recovery learns what it did.
    InDoubt,
    /// After a restart, not every participant's decision rows have been read: an
    /// attempt may have committed by a local commit nobody has read yet.
    NotYetKnown,
}

/// The admission rule for `txn_id` (invariant 7), in this order: a remembered commit; an
/// unsettled attempt; decision rows not yet read (a remembered abort does not exempt it:
/// it proves only that one attempt aborted, not that a later one did not commit).
pub fn admit(remembered: Option<Outcome>, unsettled: bool, decisions_known: bool) -> Admission {
    if remembered == Some(Outcome::Committed) {
        return Admission::AlreadyCommitted;
    }
    if unsettled {
        return Admission::InDoubt;
    }
    if !decisions_known {
        return Admission::NotYetKnown;
    }
    Admission::Run
}

/// What `GET` answers for a txn id that is not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    Committed,
    Aborted,
    /// An attempt's local commit is not settled yet (the hedge `in_doubt`).
    InDoubt,
    /// After a restart, not every participant's decision rows have been read.
    Recovering,
    /// Not remembered, and a committed outcome has been forgotten (retention or the
    /// size limit): this may be one of them, so presumed abort cannot answer.
    Unknown,
}

/// The answer rule for a txn id that is not live (invariant 6), in `admit`'s order;
/// `forgotten`: some committed outcome may have been forgotten (by the index, or by the
/// log's retention before a restart).
pub fn known(
    remembered: Option<Outcome>,
    unsettled: bool,
    decisions_known: bool,
    forgotten: bool,
) -> Known {
    match admit(remembered, unsettled, decisions_known) {
        Admission::AlreadyCommitted => Known::Committed,
        Admission::InDoubt => Known::InDoubt,
        Admission::NotYetKnown => Known::Recovering,
        Admission::Run if remembered.is_some() => Known::Aborted,
        Admission::Run if forgotten => Known::Unknown,
        // Presumed abort: nothing committed is forgotten, so nothing unremembered did.
        Admission::Run => Known::Aborted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_txn_id_keeps_its_commit_when_its_older_abort_expires() {
        let mut o = Outcomes::new(10, Mutations::none());
        o.remember("t", 1, Outcome::Aborted, 0);
        o.remember("t", 2, Outcome::Committed, 50);
        o.expire(120, 100, 10);
        assert_eq!(o.get("t"), Some((&2, Outcome::Committed)));
        o.expire(200, 100, 10);
        assert_eq!(o.get("t"), None);
        assert!(o.is_empty());
    }

    #[test]
    fn recent_lists_the_latest_attempts_newest_first() {
        let mut o = Outcomes::new(10, Mutations::none());
        o.remember("t", 1, Outcome::Aborted, 0);
        o.remember("u", 2, Outcome::Committed, 1);
        o.remember("t", 3, Outcome::Committed, 2);
        let all: Vec<_> = o.recent(10).collect();
        assert_eq!(
            all,
            vec![("t", &3, Outcome::Committed), ("u", &2, Outcome::Committed)]
        );
        assert_eq!(o.recent(1).count(), 1);
    }

    #[test]
    fn the_size_limit_expires_the_oldest_first() {
        let mut o = Outcomes::new(2, Mutations::none());
        o.remember("a", 1, Outcome::Committed, 0);
        o.remember("b", 2, Outcome::Committed, 0);
        o.remember("c", 3, Outcome::Committed, 0);
        assert_eq!(o.get("a"), None);
        assert_eq!(o.get("c"), Some((&3, Outcome::Committed)));
        assert_eq!(o.len(), 2);
    }

    #[test]
    fn a_forgotten_commit_ends_presumed_abort() {
        let mut o = Outcomes::new(2, Mutations::none());
        o.remember("a", 1, Outcome::Aborted, 0);
        o.remember("b", 2, Outcome::Committed, 0);
        o.remember("c", 3, Outcome::Committed, 0);
        // The abort went: presumed abort still answers for it.
        assert!(!o.forgot_a_commit());
        assert_eq!(
            known(None, false, true, o.forgot_a_commit()),
            Known::Aborted
        );
        o.remember("d", 4, Outcome::Committed, 0);
        assert_eq!(o.get("b"), None);
        assert!(o.forgot_a_commit());
        assert_eq!(
            known(None, false, true, o.forgot_a_commit()),
            Known::Unknown
        );
        // What is remembered still answers as it was.
        let c = o.get("c").map(|(_, x)| x);
        assert_eq!(known(c, false, true, true), Known::Committed);
        assert_eq!(
            known(Some(Outcome::Aborted), false, true, true),
            Known::Aborted
        );
    }

    #[test]
    fn expiry_of_a_commit_ends_presumed_abort() {
        let mut o = Outcomes::new(10, Mutations::none());
        o.remember("a", 1, Outcome::Committed, 0);
        o.expire(50, 100, 10);
        assert!(!o.forgot_a_commit());
        o.expire(150, 100, 10);
        assert!(o.forgot_a_commit());
    }

    #[test]
    fn answers_in_order() {
        use Known::*;
        let c = Some(Outcome::Committed);
        let a = Some(Outcome::Aborted);
        assert_eq!(known(c, true, false, true), Committed);
        assert_eq!(known(a, true, true, false), InDoubt);
        assert_eq!(known(None, false, false, false), Recovering);
        assert_eq!(known(a, false, true, true), Aborted);
        assert_eq!(known(None, false, true, false), Aborted);
        assert_eq!(known(None, false, true, true), Unknown);
    }

    #[test]
    fn admission_in_order() {
        use Admission::*;
        let c = Some(Outcome::Committed);
        let a = Some(Outcome::Aborted);
        assert_eq!(admit(c, true, false), AlreadyCommitted);
        assert_eq!(admit(a, true, true), InDoubt);
        assert_eq!(admit(a, false, false), NotYetKnown);
        assert_eq!(admit(None, false, false), NotYetKnown);
        assert_eq!(admit(a, false, true), Run);
        assert_eq!(admit(None, false, true), Run);
    }
}
