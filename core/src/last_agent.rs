//! A last-agent (or one-phase) commit: the other participants PREPARE; then the last
//! agent runs its statements and commits them together with the transaction's decision
//! row, in one local transaction of its database. That commit *is* the decision, durable
//! where it happens, so nothing is forced to our log before it. With no other
//! participant this is the one-phase commit: its row makes its outcome knowable after a
//! lost answer or a crash (issue 14, defect 4).
//!
//! ```text
//!   Preparing --a NO or an unknown vote--> Ended(aborted) (answer; roll back the rest)
//!      `--every other vote YES or READ-ONLY--> Committing (CommitLast naming the YES)
//!   Committing --committed--> Ended(committed) (answer; one-phase record, or phase 2)
//!      |--read-only, nobody prepared--> Ended(committed) (nothing written anywhere)
//!      |--did not commit (refused before it ran, or failed)--> Ended(aborted)
//!      `--no clear answer--> Fencing (ask the last agent: its fence makes a commit still
//!                            in flight fail, so its answer is final)
//!   Fencing --row committed--> Ended(committed) | --row aborted--> Ended(aborted)
//!      `--no answer within the wait--> Unsettled (answer `unknown`; recovery fences
//!                                      again and [`LastAgent::on_fence_answer`] ends it)
//! ```
//!
//! Once committed, the decision row is forgotten only when our log knows the outcome for
//! good: the forced one-phase record, or (with participants prepared) the forced END
//! after phase 2. At every moment one of the two says `committed`.

use std::collections::BTreeMap;

use crate::commit::{AbortCause, Vote};
use crate::mutation::{Mutation, Mutations};
use crate::Participant;

/// The last agent's answer to its statements with COMMIT and the decision row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LastAnswer {
    /// Committed, the decision row with it.
    Committed,
    /// Wrote nothing, so no row either; finished.
    ReadOnly,
    /// Refused before it ran, never sent, or failed and rolled back: not committed.
    DidNotCommit,
    /// No clear answer (lost, timed out after it was sent): it may have committed.
    Uncertain,
}

/// What the last agent's decision row says once fenced (a fence inserts an aborted row
/// unless a committed one exists, so the answer is final).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Settled {
    /// Committed; the row names the participants that were prepared.
    Committed {
        participants: Vec<Participant>,
    },
    Aborted,
}

/// What the client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Committed,
    Aborted(AbortCause),
    /// The commit may or may not have happened and the last agent could not be asked:
    /// recovery settles it, `GET` tells later.
    Unknown,
}

/// What the runtime must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send the last agent its statements, COMMIT, and the decision row naming
    /// `prepared`; report [`LastAgent::on_last_answer`].
    CommitLast {
        prepared: Vec<Participant>,
    },
    /// Ask the last agent for the row (fence), within the commit wait; report
    /// [`LastAgent::on_fence_answer`] (`None`: no answer in time).
    Fence,
    /// Roll back `participant`'s branch (retrying is the runtime's; what is left
    /// prepared, recovery settles through the last agent).
    Abort(Participant),
    /// Committed with nobody prepared: force the one-phase record, then forget the row.
    AppendOnePhase,
    /// Committed with `prepared` waiting for COMMIT PREPARED: log the COMMIT (lazily:
    /// the row is the decision) and run phase 2 (`commit::Commit::decided`); its END is
    /// forced, then the row forgotten.
    Phase2 {
        prepared: Vec<Participant>,
    },
    Answer(Answer),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Preparing,
    /// CommitLast sent.
    Committing,
    /// The answer was unclear; the fence is asked.
    Fencing,
    /// Answered `unknown`; waits for recovery's fence.
    Unsettled,
    Committed,
    Aborted,
}

/// One last-agent transaction, from the others' votes to its outcome.
#[derive(Debug, Clone)]
pub struct LastAgent {
    last: Participant,
    phase: Phase,
    votes: BTreeMap<Participant, Option<Vote>>,
    mutations: Mutations,
}

impl LastAgent {
    /// `others` were sent PREPARE (none: a one-phase commit); `last` commits last. With
    /// no other participant the last agent is sent its commit at once.
    pub fn new(
        others: impl IntoIterator<Item = Participant>,
        last: Participant,
        mutations: Mutations,
        out: &mut Vec<Effect>,
    ) -> LastAgent {
        let votes: BTreeMap<_, _> = others.into_iter().map(|p| (p, None)).collect();
        assert!(!votes.contains_key(&last), "the last agent also prepares");
        let mut m = LastAgent {
            last,
            phase: Phase::Preparing,
            votes,
            mutations,
        };
        if m.votes.is_empty() {
            m.commit_last(out);
        }
        m
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Its outcome is not decided yet (recovery must leave its prepared branches alone
    /// while it is live).
    pub fn deciding(&self) -> bool {
        matches!(
            self.phase,
            Phase::Preparing | Phase::Committing | Phase::Fencing
        )
    }

    /// Told `unknown`: recovery fences the last agent again.
    pub fn unsettled(&self) -> bool {
        self.phase == Phase::Unsettled
    }

    pub fn finished(&self) -> bool {
        matches!(self.phase, Phase::Committed | Phase::Aborted)
    }

    /// The participants that voted YES (the decision row names them).
    fn prepared(&self) -> Vec<Participant> {
        self.votes
            .iter()
            .filter(|(_, v)| **v == Some(Vote::Yes))
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Another participant's answer to PREPARE.
    pub fn on_vote(&mut self, participant: &str, vote: Vote, out: &mut Vec<Effect>) {
        if self.phase != Phase::Preparing {
            return;
        }
        let Some(slot) = self.votes.get_mut(participant) else {
            return;
        };
        if slot.is_some() {
            return;
        }
        *slot = Some(vote);
        let cause = match vote {
            Vote::No => Some(AbortCause::VotedNo(participant.to_owned())),
            Vote::Unknown => Some(AbortCause::VoteUnknown(participant.to_owned())),
            Vote::Yes | Vote::ReadOnly => None,
        };
        if let Some(cause) = cause {
            return self.abort(cause, out);
        }
        if self.votes.values().all(Option::is_some) {
            self.commit_last(out);
        }
    }

    fn commit_last(&mut self, out: &mut Vec<Effect>) {
        self.phase = Phase::Committing;
        out.push(Effect::CommitLast {
            prepared: self.prepared(),
        });
    }

    /// The last agent's answer to CommitLast.
    pub fn on_last_answer(&mut self, answer: LastAnswer, out: &mut Vec<Effect>) {
        if self.phase != Phase::Committing {
            return;
        }
        let answer = match answer {
            LastAnswer::Uncertain if self.mutations.on(Mutation::UncertainLastCommitAborts) => {
                LastAnswer::DidNotCommit
            }
            // A row goes in whenever a participant is prepared, so READ-ONLY there is
            // not a clear answer.
            LastAnswer::ReadOnly if !self.prepared().is_empty() => LastAnswer::Uncertain,
            a => a,
        };
        match answer {
            LastAnswer::Committed => self.committed(true, out),
            LastAnswer::ReadOnly => {
                self.phase = Phase::Committed;
                out.push(Effect::Answer(Answer::Committed));
            }
            LastAnswer::DidNotCommit => {
                let cause = AbortCause::VotedNo(self.last.clone());
                self.abort(cause, out)
            }
            LastAnswer::Uncertain => {
                self.phase = Phase::Fencing;
                out.push(Effect::Fence);
            }
        }
    }

    /// The fence's answer: `None` when the last agent could not be asked in time.
    /// Also how recovery ends an unsettled transaction (nobody is answered then).
    pub fn on_fence_answer(&mut self, settled: Option<Settled>, out: &mut Vec<Effect>) {
        let answers = match self.phase {
            Phase::Fencing => true,
            Phase::Unsettled => false,
            _ => return,
        };
        match settled {
            Some(Settled::Committed { .. }) => self.committed(answers, out),
            Some(Settled::Aborted) if answers => {
                let cause = AbortCause::VotedNo(self.last.clone());
                self.abort(cause, out)
            }
            Some(Settled::Aborted) => self.roll_back(out),
            None if answers => {
                self.phase = Phase::Unsettled;
                out.push(Effect::Answer(Answer::Unknown));
            }
            None => {}
        }
    }

    fn committed(&mut self, answers: bool, out: &mut Vec<Effect>) {
        self.phase = Phase::Committed;
        let prepared = self.prepared();
        if prepared.is_empty() {
            out.push(Effect::AppendOnePhase);
        } else {
            out.push(Effect::Phase2 { prepared });
        }
        if answers {
            out.push(Effect::Answer(Answer::Committed));
        }
    }

    fn abort(&mut self, cause: AbortCause, out: &mut Vec<Effect>) {
        self.roll_back(out);
        out.push(Effect::Answer(Answer::Aborted(cause)));
    }

    /// Rolls back every branch that may be open or prepared: the others that did not
    /// answer NO or READ-ONLY, and the last agent's.
    fn roll_back(&mut self, out: &mut Vec<Effect>) {
        self.phase = Phase::Aborted;
        for (p, v) in &self.votes {
            if !matches!(v, Some(Vote::No | Vote::ReadOnly)) {
                out.push(Effect::Abort(p.clone()));
            }
        }
        out.push(Effect::Abort(self.last.clone()));
    }
}

/// What to do with a last-agent transaction's settled outcome found after the fact (by
/// recovery's fence, or a committed decision row of a transaction nobody is driving).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettledAction {
    /// Committed and nobody prepared: force the one-phase record, then forget the row.
    AppendOnePhase,
    /// Committed: log it (lazily) and run phase 2 for these; END forced, then forget.
    Phase2(Vec<Participant>),
    /// An operator aborted it (`--force`): the row must not bring the commit back;
    /// forget it (what is still prepared, recovery rolls back).
    Forget,
    /// Phase 2 already drives it.
    Nothing,
    /// Aborted: roll back the prepared branches.
    RollBack,
}

/// The rule for a settled outcome: `in_doubt`: phase 2 already drives it;
/// `operator_aborted`: an operator resolved it as aborted.
pub fn settled_action(settled: &Settled, in_doubt: bool, operator_aborted: bool) -> SettledAction {
    match settled {
        Settled::Aborted => SettledAction::RollBack,
        Settled::Committed { .. } if operator_aborted => SettledAction::Forget,
        Settled::Committed { .. } if in_doubt => SettledAction::Nothing,
        Settled::Committed { participants } if participants.is_empty() => {
            SettledAction::AppendOnePhase
        }
        Settled::Committed { participants } => SettledAction::Phase2(participants.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Participant {
        s.to_owned()
    }

    fn machine(others: &[&str], out: &mut Vec<Effect>) -> LastAgent {
        LastAgent::new(others.iter().map(|s| p(s)), p("z"), Mutations::none(), out)
    }

    #[test]
    fn one_phase_commits_at_once_and_logs_its_outcome() {
        let mut out = Vec::new();
        let mut m = machine(&[], &mut out);
        assert_eq!(out, vec![Effect::CommitLast { prepared: vec![] }]);
        out.clear();
        m.on_last_answer(LastAnswer::Committed, &mut out);
        assert_eq!(
            out,
            vec![Effect::AppendOnePhase, Effect::Answer(Answer::Committed)]
        );
        assert!(m.finished());
    }

    #[test]
    fn the_row_names_the_yes_votes_and_phase2_drives_them() {
        let mut out = Vec::new();
        let mut m = machine(&["a", "b"], &mut out);
        assert!(out.is_empty());
        m.on_vote("a", Vote::Yes, &mut out);
        m.on_vote("b", Vote::ReadOnly, &mut out);
        assert_eq!(
            out,
            vec![Effect::CommitLast {
                prepared: vec![p("a")]
            }]
        );
        out.clear();
        m.on_last_answer(LastAnswer::Committed, &mut out);
        assert_eq!(
            out,
            vec![
                Effect::Phase2 {
                    prepared: vec![p("a")]
                },
                Effect::Answer(Answer::Committed)
            ]
        );
    }

    #[test]
    fn a_no_vote_rolls_back_what_may_be_prepared() {
        let mut out = Vec::new();
        let mut m = machine(&["a", "b", "c"], &mut out);
        m.on_vote("a", Vote::Yes, &mut out);
        m.on_vote("b", Vote::No, &mut out);
        assert_eq!(
            out,
            vec![
                Effect::Abort(p("a")),
                Effect::Abort(p("c")),
                Effect::Abort(p("z")),
                Effect::Answer(Answer::Aborted(AbortCause::VotedNo(p("b"))))
            ]
        );
        out.clear();
        m.on_vote("c", Vote::Yes, &mut out);
        assert!(out.is_empty(), "decided: later votes change nothing");
    }

    #[test]
    fn an_unclear_answer_is_fenced_never_presumed() {
        let mut out = Vec::new();
        let mut m = machine(&["a"], &mut out);
        m.on_vote("a", Vote::Yes, &mut out);
        out.clear();
        m.on_last_answer(LastAnswer::Uncertain, &mut out);
        assert_eq!(out, vec![Effect::Fence]);
        out.clear();
        m.on_fence_answer(None, &mut out);
        assert_eq!(out, vec![Effect::Answer(Answer::Unknown)]);
        assert!(m.unsettled() && !m.deciding());
        out.clear();
        // Recovery's fence finds the row committed: phase 2, nobody answered again.
        let row = Settled::Committed {
            participants: vec![p("a")],
        };
        m.on_fence_answer(Some(row), &mut out);
        assert_eq!(
            out,
            vec![Effect::Phase2 {
                prepared: vec![p("a")]
            }]
        );
    }

    #[test]
    fn read_only_with_a_participant_prepared_is_not_clear() {
        let mut out = Vec::new();
        let mut m = machine(&["a"], &mut out);
        m.on_vote("a", Vote::Yes, &mut out);
        out.clear();
        m.on_last_answer(LastAnswer::ReadOnly, &mut out);
        assert_eq!(out, vec![Effect::Fence]);
    }

    #[test]
    fn settled_outcomes_found_later() {
        let none = Settled::Committed {
            participants: vec![],
        };
        let some = Settled::Committed {
            participants: vec![p("a")],
        };
        assert_eq!(
            settled_action(&none, false, false),
            SettledAction::AppendOnePhase
        );
        assert_eq!(
            settled_action(&some, false, false),
            SettledAction::Phase2(vec![p("a")])
        );
        assert_eq!(settled_action(&some, true, false), SettledAction::Nothing);
        assert_eq!(settled_action(&some, false, true), SettledAction::Forget);
        assert_eq!(
            settled_action(&Settled::Aborted, false, false),
            SettledAction::RollBack
        );
    }
}
