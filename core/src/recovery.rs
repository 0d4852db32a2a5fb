//! What recovery does with what it finds: the in-doubt transactions a replayed log
//! leaves, and each prepared branch with our GID prefix an agent lists (presumed abort,
//! DESIGN invariants 4 and 5).

use std::collections::BTreeMap;

use crate::mutation::{Mutation, Mutations};
use crate::Participant;

/// A record of the decision log, as replayed (only what recovery needs).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Replayed<K> {
    /// The COMMIT decision naming the participants that voted YES.
    Commit {
        gid: K,
        participants: Vec<Participant>,
    },
    /// Every participant acknowledged.
    End { gid: K },
    /// An operator resolved the transaction as aborted: it overrides an earlier COMMIT.
    OperatorAbort { gid: K },
}

/// The transactions decided commit and not ended, by GID, with the participants phase 2
/// must drive again. Records come in log order; an END before its COMMIT (it cannot be
/// written before, but a torn or reordered log must not resurrect a finished
/// transaction) ends it all the same. A COMMIT naming no participant (every branch
/// finished without phase 2) leaves nothing in doubt.
pub fn in_doubt_after_replay<K: Ord + Clone>(
    records: impl IntoIterator<Item = Replayed<K>>,
    mutations: Mutations,
) -> BTreeMap<K, Vec<Participant>> {
    let mut in_doubt = BTreeMap::new();
    let mut ended = std::collections::BTreeSet::new();
    for r in records {
        match r {
            Replayed::Commit { gid, participants } => {
                let forgotten = mutations.on(Mutation::ReplayForgetsDecisions);
                if !ended.contains(&gid) && !participants.is_empty() && !forgotten {
                    in_doubt.insert(gid, participants);
                }
            }
            Replayed::End { gid } => {
                in_doubt.remove(&gid);
                ended.insert(gid);
            }
            Replayed::OperatorAbort { gid } => {
                in_doubt.remove(&gid);
            }
        }
    }
    in_doubt
}

/// Who we are: the coordinator id in our GIDs and this incarnation's epoch.
#[derive(Debug, Clone, Copy)]
pub struct Incarnation<'a> {
    pub coordinator_id: &'a str,
    pub epoch: u64,
}

/// A prepared branch an agent listed, by what its GID says.
#[derive(Debug, Clone, Copy)]
pub struct Listed<'a> {
    pub coordinator_id: &'a str,
    pub epoch: u64,
    /// The last agent the GID names (its decision row is the outcome).
    pub last_agent: Option<&'a str>,
}

/// What the coordinator knows of the branch's transaction.
#[derive(Debug, Clone, Copy, Default)]
pub struct Known {
    /// A live transaction of this incarnation: its own path decides it.
    pub live: bool,
    /// Decided commit and in phase 2: phase 2 commits it.
    pub in_doubt: bool,
    /// An operator resolved it as aborted.
    pub operator_aborted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BranchAction {
    /// Another coordinator's (or not a GID of ours).
    NotOurs,
    /// Its transaction is live here: leave it to that path.
    LeaveLive,
    /// Decided commit: phase 2 drives it.
    LeaveToPhase2,
    /// No presumption: the last agent's decision row is the outcome; settle it there.
    AskLastAgent(Participant),
    /// No commit decision exists and the transaction is not live: presumed abort.
    RollBack,
}

/// The action for one listed prepared branch. A branch of this incarnation that is not
/// live is finished here (its commit would be `in_doubt`), so presumed abort is safe for
/// it too (invariant 5: recovery acts only on earlier epochs or on transactions this
/// incarnation knows are finished).
pub fn prepared_branch_action(
    me: Incarnation<'_>,
    branch: Listed<'_>,
    known: Known,
    mutations: Mutations,
) -> BranchAction {
    if branch.coordinator_id != me.coordinator_id {
        return BranchAction::NotOurs;
    }
    let current = branch.epoch == me.epoch;
    if known.live && !(current && mutations.on(Mutation::RecoveryActsOnLiveEpoch)) {
        return BranchAction::LeaveLive;
    }
    if known.in_doubt && !mutations.on(Mutation::RecoveryIgnoresDecisions) {
        return BranchAction::LeaveToPhase2;
    }
    match branch.last_agent {
        Some(last)
            if !known.operator_aborted && !mutations.on(Mutation::PresumedAbortOfLastAgent) =>
        {
            BranchAction::AskLastAgent(last.to_owned())
        }
        _ => BranchAction::RollBack,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Incarnation<'static> = Incarnation {
        coordinator_id: "c1",
        epoch: 7,
    };

    fn listed(epoch: u64, last_agent: Option<&str>) -> Listed<'_> {
        Listed {
            coordinator_id: "c1",
            epoch,
            last_agent,
        }
    }

    #[test]
    fn presumed_abort_only_without_a_decision_and_outside_live_transactions() {
        let none = Mutations::none();
        let other = Listed {
            coordinator_id: "c2",
            ..listed(7, None)
        };
        assert_eq!(
            prepared_branch_action(ME, other, Known::default(), none),
            BranchAction::NotOurs
        );
        let live = Known {
            live: true,
            ..Known::default()
        };
        assert_eq!(
            prepared_branch_action(ME, listed(7, None), live, none),
            BranchAction::LeaveLive
        );
        let decided = Known {
            in_doubt: true,
            ..Known::default()
        };
        assert_eq!(
            prepared_branch_action(ME, listed(3, None), decided, none),
            BranchAction::LeaveToPhase2
        );
        assert_eq!(
            prepared_branch_action(ME, listed(3, Some("a")), Known::default(), none),
            BranchAction::AskLastAgent("a".into())
        );
        let resolved = Known {
            operator_aborted: true,
            ..Known::default()
        };
        assert_eq!(
            prepared_branch_action(ME, listed(3, Some("a")), resolved, none),
            BranchAction::RollBack
        );
        assert_eq!(
            prepared_branch_action(ME, listed(3, None), Known::default(), none),
            BranchAction::RollBack
        );
    }

    #[test]
    fn replay_keeps_commits_without_end() {
        let records = vec![
            Replayed::Commit {
                gid: 1,
                participants: vec!["a".into()],
            },
            Replayed::Commit {
                gid: 2,
                participants: vec!["a".into(), "b".into()],
            },
            Replayed::End { gid: 1 },
            Replayed::End { gid: 3 },
            Replayed::Commit {
                gid: 3,
                participants: vec!["b".into()],
            },
            Replayed::Commit {
                gid: 4,
                participants: vec!["b".into()],
            },
            Replayed::OperatorAbort { gid: 4 },
            Replayed::Commit {
                gid: 5,
                participants: vec![],
            },
        ];
        let in_doubt = in_doubt_after_replay(records, Mutations::none());
        assert_eq!(in_doubt.keys().copied().collect::<Vec<_>>(), vec![2]);
    }
}
