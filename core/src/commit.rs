//! One transaction's two-phase commit once its statements ran: the votes, the decision,
//! phase 2 and the END record (presumed abort: only a commit is logged, forced; END is
//! lazy).
//!
//! ```text
//!   Voting --every vote YES or READ-ONLY, one YES or more--> Deciding (COMMIT appended)
//!     |                           |--durable--> Committing (answer; COMMIT PREPARED each)
//!     |                           `--log failed--> Unknown (the record may be on disk:
//!     |                                             the process stops, recovery decides)
//!     |--every vote READ-ONLY--> Ended (committed: nothing to commit)
//!     `--a NO or an unknown vote--> Aborted (answer; Abort every branch that may be prepared)
//!   Committing --every YES acknowledged--> Ended (END appended)
//! ```
//!
//! Invariants asserted where they are established: COMMIT PREPARED is sent, and a client
//! told `committed`, only once the decision is durable (DESIGN invariants 1 and 3).

use std::collections::{BTreeMap, BTreeSet};

use crate::backoff::Backoff;
use crate::mutation::{Mutation, Mutations};
use crate::Participant;

/// Attempts to roll back a branch before it is left to recovery (presumed abort finds it
/// there).
pub const ABORT_ATTEMPTS_MAX: u32 = 20;

/// A branch's answer to its PREPARE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Vote {
    /// Prepared.
    Yes,
    /// Wrote nothing and is finished: out of phase 2.
    ReadOnly,
    /// Failed and rolled back, or refused before it ran.
    No,
    /// The answer was lost (timeout, connection lost): the branch may be prepared.
    Unknown,
}

/// An agent's answer to COMMIT PREPARED.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CommitAnswer {
    Committed,
    /// The GID is not prepared: with our decision durable, an earlier attempt whose
    /// answer was lost committed it.
    NotPrepared,
    /// No answer, or an error: try again.
    Failed,
}

/// When the client hears `committed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// After every participant acknowledged, or after the ack wait (naming the pending).
    Applied,
    /// As soon as the decision is durable.
    Durable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    CommitPrepared,
    Abort,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Timer {
    /// Try `participant`'s request again.
    Retry(Participant),
    /// Applied mode: answer with whatever is still pending.
    AckWait,
}

/// Why a transaction aborted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AbortCause {
    VotedNo(Participant),
    /// The vote was lost: presumed NO (the branch is rolled back).
    VoteUnknown(Participant),
    /// The COMMIT record could not be made durable (only the mutation
    /// `log-failure-aborts` says so: the record may be on disk all the same).
    LogFailed,
}

/// What the client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `pending`: participants that had not acknowledged yet (phase 2 goes on).
    Committed {
        pending: Vec<Participant>,
    },
    Aborted(AbortCause),
}

/// What the runtime must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Append the COMMIT record naming these participants, forced; report
    /// [`Commit::on_durable`] or [`Commit::on_log_failed`].
    AppendCommit {
        participants: Vec<Participant>,
    },
    /// Append the END record, lazily (losing it only means phase 2 runs again).
    AppendEnd,
    Send {
        to: Participant,
        request: Request,
    },
    SetTimer {
        timer: Timer,
        after_ms: u64,
    },
    Answer(Answer),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Voting,
    /// The COMMIT record is being forced.
    Deciding,
    /// Decided commit, durable: phase 2 runs.
    Committing,
    Aborted,
    Ended,
    /// The forced append failed: whether the COMMIT record is on disk is unknown, so
    /// nothing more is said or done here; the runtime stops and the next incarnation's
    /// replay and recovery decide from what is durable.
    Unknown,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub ack: AckMode,
    pub ack_wait_ms: u64,
    pub retry_min_ms: u64,
    pub retry_max_ms: u64,
    pub mutations: Mutations,
}

impl Config {
    pub fn new(ack: AckMode) -> Config {
        Config {
            ack,
            ack_wait_ms: 5_000,
            retry_min_ms: 50,
            retry_max_ms: 5_000,
            mutations: Mutations::none(),
        }
    }
}

/// One transaction's commit. Feed it every event about the transaction; it appends the
/// effects to carry out to `out`.
#[derive(Debug, Clone)]
pub struct Commit {
    config: Config,
    phase: Phase,
    votes: BTreeMap<Participant, Option<Vote>>,
    /// Phase 2: participants that voted YES and have not acknowledged COMMIT PREPARED;
    /// when aborting: those whose rollback was not acknowledged.
    pending: BTreeSet<Participant>,
    retries: BTreeMap<Participant, Backoff>,
    durable: bool,
    answered: bool,
    end_appended: bool,
}

impl Commit {
    /// A transaction whose branches ran on `participants` and were each sent PREPARE.
    pub fn new(participants: impl IntoIterator<Item = Participant>, config: Config) -> Commit {
        let votes: BTreeMap<_, _> = participants.into_iter().map(|p| (p, None)).collect();
        assert!(!votes.is_empty(), "a commit without branches");
        Commit::with(config, Phase::Voting, votes)
    }

    /// A commit decided and durable elsewhere — replayed from the log (COMMIT without
    /// END), a last agent's local commit, an operator's resolve: phase 2 for
    /// `participants`; nobody waits for this machine's answer.
    pub fn decided(
        participants: impl IntoIterator<Item = Participant>,
        config: Config,
        out: &mut Vec<Effect>,
    ) -> Commit {
        let votes = participants
            .into_iter()
            .map(|p| (p, Some(Vote::Yes)))
            .collect();
        let mut c = Commit::with(config, Phase::Committing, votes);
        c.durable = true;
        c.answered = true;
        c.start_phase2(out);
        if c.pending.is_empty() {
            // Nobody to drive (a COMMIT naming no participant): finished, nothing to
            // end either.
            c.phase = Phase::Ended;
            c.end_appended = true;
        }
        c
    }

    fn with(config: Config, phase: Phase, votes: BTreeMap<Participant, Option<Vote>>) -> Commit {
        Commit {
            config,
            phase,
            votes,
            pending: BTreeSet::new(),
            retries: BTreeMap::new(),
            durable: false,
            answered: false,
            end_appended: false,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the COMMIT decision is durable (the transaction is committed).
    pub fn decided_commit(&self) -> bool {
        self.durable
    }

    /// Whether the transaction is still being decided (votes or the forced append
    /// outstanding): recovery must leave its prepared branches alone.
    pub fn deciding(&self) -> bool {
        matches!(self.phase, Phase::Voting | Phase::Deciding)
    }

    /// Participants still to acknowledge (phase 2) or to roll back (abort), in order.
    pub fn pending(&self) -> impl Iterator<Item = &Participant> {
        self.pending.iter()
    }

    pub fn is_pending(&self, participant: &str) -> bool {
        self.pending.contains(participant)
    }

    /// Phase 2 also for `participant` (an operator's resolve found it prepared too).
    pub fn also_commit(&mut self, participant: &str, out: &mut Vec<Effect>) {
        if self.phase != Phase::Committing || self.pending.contains(participant) {
            return;
        }
        self.votes.insert(participant.to_owned(), Some(Vote::Yes));
        self.pending.insert(participant.to_owned());
        self.send(participant.to_owned(), Request::CommitPrepared, out);
    }

    fn on(&self, m: Mutation) -> bool {
        self.config.mutations.on(m)
    }

    /// `participant`'s answer to PREPARE. Once every vote is in, the transaction is
    /// decided.
    pub fn on_vote(&mut self, participant: &str, vote: Vote, out: &mut Vec<Effect>) {
        if self.phase != Phase::Voting {
            return;
        }
        let vote = match vote {
            Vote::Unknown if self.on(Mutation::UnknownVoteIsYes) => Vote::Yes,
            v => v,
        };
        let Some(slot) = self.votes.get_mut(participant) else {
            return;
        };
        if slot.is_some() {
            return;
        }
        *slot = Some(vote);
        if self.votes.values().all(Option::is_some) {
            self.decide(out);
        }
    }

    fn decide(&mut self, out: &mut Vec<Effect>) {
        if let Some(cause) = self.abort_cause() {
            return self.abort(cause, out);
        }
        let yes = self.voted(Vote::Yes);
        if yes.is_empty() {
            // Every branch was read-only and has finished: committed, nothing to log.
            self.phase = Phase::Ended;
            self.durable = true;
            self.answer(Answer::Committed { pending: vec![] }, out);
            return;
        }
        self.phase = Phase::Deciding;
        let single_writer = yes.len() == 1 && self.votes.len() > 1;
        if self.on(Mutation::SkipDecisionLog)
            || (single_writer && self.on(Mutation::SingleWriterUnlogged))
        {
            return self.on_durable(out);
        }
        out.push(Effect::AppendCommit {
            participants: yes.clone(),
        });
        if self.on(Mutation::AnswerBeforeDurable) {
            self.answer(Answer::Committed { pending: yes }, out);
        } else if self.on(Mutation::CommitBeforeDurable) {
            self.phase = Phase::Committing;
            self.start_phase2(out);
        }
    }

    /// The first NO or unknown vote, in participant order.
    fn abort_cause(&self) -> Option<AbortCause> {
        self.votes.iter().find_map(|(p, v)| match v {
            Some(Vote::No) => Some(AbortCause::VotedNo(p.clone())),
            Some(Vote::Unknown) => Some(AbortCause::VoteUnknown(p.clone())),
            _ => None,
        })
    }

    fn voted(&self, vote: Vote) -> Vec<Participant> {
        self.votes
            .iter()
            .filter(|(_, v)| **v == Some(vote))
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// The forced COMMIT record is durable: the transaction is committed.
    pub fn on_durable(&mut self, out: &mut Vec<Effect>) {
        if self.phase != Phase::Deciding && !self.on(Mutation::CommitBeforeDurable) {
            return;
        }
        self.durable = true;
        if self.phase == Phase::Deciding {
            self.phase = Phase::Committing;
            self.start_phase2(out);
        }
        if self.config.ack == AckMode::Durable {
            self.answer_committed(out);
        } else if !self.answered {
            out.push(Effect::SetTimer {
                timer: Timer::AckWait,
                after_ms: self.config.ack_wait_ms,
            });
        }
        self.end_if_acknowledged(out);
    }

    /// The forced append of the COMMIT record failed. The record may be on disk all the
    /// same (a write that reached it before a failed fsync), so neither `aborted` nor a
    /// rollback would be safe: the machine stops without an effect (the client hears
    /// nothing definite; the runtime exits and recovery decides).
    pub fn on_log_failed(&mut self, out: &mut Vec<Effect>) {
        if self.phase != Phase::Deciding {
            return;
        }
        if self.on(Mutation::LogFailureAborts) {
            return self.abort(AbortCause::LogFailed, out);
        }
        self.phase = Phase::Unknown;
    }

    fn start_phase2(&mut self, out: &mut Vec<Effect>) {
        self.pending = self.voted(Vote::Yes).into_iter().collect();
        let targets: Vec<Participant> = self.pending.iter().cloned().collect();
        for p in targets {
            self.send(p, Request::CommitPrepared, out);
        }
    }

    fn send(&mut self, to: Participant, request: Request, out: &mut Vec<Effect>) {
        if request == Request::CommitPrepared {
            // Invariant 1: no participant commits before the decision is durable.
            assert!(
                self.durable
                    || self.on(Mutation::CommitBeforeDurable)
                    || self.on(Mutation::SkipDecisionLog),
                "COMMIT PREPARED before the decision is durable"
            );
        }
        out.push(Effect::Send { to, request });
    }

    /// `participant`'s answer to COMMIT PREPARED; `jitter` spreads the retry.
    pub fn on_commit_answer(
        &mut self,
        participant: &str,
        answer: CommitAnswer,
        jitter: u64,
        out: &mut Vec<Effect>,
    ) {
        if self.phase != Phase::Committing || !self.pending.contains(participant) {
            return;
        }
        match answer {
            CommitAnswer::Committed | CommitAnswer::NotPrepared => {
                self.pending.remove(participant);
                self.retries.remove(participant);
                self.end_if_acknowledged(out);
            }
            CommitAnswer::Failed => self.retry_later(participant, jitter, out),
        }
    }

    fn retry_later(&mut self, participant: &str, jitter: u64, out: &mut Vec<Effect>) {
        let (min, max) = (self.config.retry_min_ms, self.config.retry_max_ms);
        let backoff = self
            .retries
            .entry(participant.to_owned())
            .or_insert_with(|| Backoff::new(min, max));
        let after_ms = backoff.next_delay_ms(jitter);
        out.push(Effect::SetTimer {
            timer: Timer::Retry(participant.to_owned()),
            after_ms,
        });
    }

    fn end_if_acknowledged(&mut self, out: &mut Vec<Effect>) {
        if self.phase != Phase::Committing || !self.durable {
            return;
        }
        let early =
            self.on(Mutation::EndBeforeAllAcks) && self.pending.len() < self.voted(Vote::Yes).len();
        if !self.end_appended && (self.pending.is_empty() || early) {
            self.end_appended = true;
            out.push(Effect::AppendEnd);
        }
        if self.pending.is_empty() {
            self.phase = Phase::Ended;
            self.answer_committed(out);
        }
    }

    fn answer_committed(&mut self, out: &mut Vec<Effect>) {
        let pending = self.pending.iter().cloned().collect();
        self.answer(Answer::Committed { pending }, out);
    }

    fn answer(&mut self, answer: Answer, out: &mut Vec<Effect>) {
        if self.answered {
            return;
        }
        if matches!(answer, Answer::Committed { .. }) {
            // Invariant 3: a client told `committed` keeps it, whatever crashes after.
            assert!(
                self.durable
                    || self.on(Mutation::AnswerBeforeDurable)
                    || self.on(Mutation::SkipDecisionLog),
                "`committed` answered before the decision is durable"
            );
        }
        self.answered = true;
        out.push(Effect::Answer(answer));
    }

    fn abort(&mut self, cause: AbortCause, out: &mut Vec<Effect>) {
        self.phase = Phase::Aborted;
        self.answer(Answer::Aborted(cause), out);
        // Every branch that may be prepared (or still open) is rolled back; a read-only
        // one has finished.
        self.pending = self
            .votes
            .iter()
            .filter(|(_, v)| **v != Some(Vote::ReadOnly))
            .map(|(p, _)| p.clone())
            .collect();
        let targets: Vec<Participant> = self.pending.iter().cloned().collect();
        for p in targets {
            self.send(p, Request::Abort, out);
        }
    }

    /// `participant`'s answer to Abort: `rolled_back` when it acknowledged. After
    /// [`ABORT_ATTEMPTS_MAX`] the branch is left to recovery.
    pub fn on_abort_answer(
        &mut self,
        participant: &str,
        rolled_back: bool,
        jitter: u64,
        out: &mut Vec<Effect>,
    ) {
        if self.phase != Phase::Aborted || !self.pending.contains(participant) {
            return;
        }
        let attempts = self.retries.get(participant).map_or(0, Backoff::attempts);
        if rolled_back || attempts + 1 >= ABORT_ATTEMPTS_MAX {
            self.pending.remove(participant);
            self.retries.remove(participant);
            return;
        }
        self.retry_later(participant, jitter, out);
    }

    /// A timer set by an [`Effect::SetTimer`] fired.
    pub fn on_timer(&mut self, timer: &Timer, out: &mut Vec<Effect>) {
        match timer {
            Timer::AckWait => {
                if self.durable {
                    self.answer_committed(out);
                }
            }
            Timer::Retry(p) if self.pending.contains(p) => {
                let request = match self.phase {
                    Phase::Committing => Request::CommitPrepared,
                    Phase::Aborted => Request::Abort,
                    _ => return,
                };
                self.send(p.clone(), request, out);
            }
            Timer::Retry(_) => {}
        }
    }

    /// Whether nothing is left to do (ended, or aborted with every rollback answered or
    /// given up on).
    pub fn finished(&self) -> bool {
        match self.phase {
            Phase::Ended | Phase::Unknown => true,
            Phase::Aborted => self.pending.is_empty(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<Participant> {
        (0..n).map(|i| format!("p{i}")).collect()
    }

    fn sends(out: &[Effect], request: Request) -> Vec<&str> {
        out.iter()
            .filter_map(|e| match e {
                Effect::Send { to, request: r } if *r == request => Some(to.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn commit_waits_for_durability_then_phase2_then_end() {
        let mut c = Commit::new(names(2), Config::new(AckMode::Applied));
        let mut out = vec![];
        c.on_vote("p0", Vote::Yes, &mut out);
        assert!(out.is_empty());
        c.on_vote("p1", Vote::Yes, &mut out);
        assert_eq!(
            out,
            vec![Effect::AppendCommit {
                participants: names(2)
            }]
        );
        out.clear();
        c.on_durable(&mut out);
        assert_eq!(sends(&out, Request::CommitPrepared), vec!["p0", "p1"]);
        assert!(!out.iter().any(|e| matches!(e, Effect::Answer(_))));
        out.clear();
        c.on_commit_answer("p0", CommitAnswer::Failed, 0, &mut out);
        assert!(matches!(out[0], Effect::SetTimer { .. }));
        out.clear();
        c.on_timer(&Timer::Retry("p0".into()), &mut out);
        assert_eq!(sends(&out, Request::CommitPrepared), vec!["p0"]);
        out.clear();
        c.on_commit_answer("p0", CommitAnswer::NotPrepared, 0, &mut out);
        c.on_commit_answer("p1", CommitAnswer::Committed, 0, &mut out);
        assert_eq!(
            out,
            vec![
                Effect::AppendEnd,
                Effect::Answer(Answer::Committed { pending: vec![] })
            ]
        );
        assert!(c.finished());
    }

    #[test]
    fn a_lost_vote_aborts_and_rolls_back_every_branch_that_may_be_prepared() {
        let mut c = Commit::new(names(3), Config::new(AckMode::Durable));
        let mut out = vec![];
        c.on_vote("p0", Vote::ReadOnly, &mut out);
        c.on_vote("p1", Vote::Yes, &mut out);
        c.on_vote("p2", Vote::Unknown, &mut out);
        assert_eq!(
            out[0],
            Effect::Answer(Answer::Aborted(AbortCause::VoteUnknown("p2".into())))
        );
        assert_eq!(sends(&out, Request::Abort), vec!["p1", "p2"]);
        assert!(!c.finished());
        out.clear();
        c.on_abort_answer("p1", true, 0, &mut out);
        c.on_abort_answer("p2", false, 0, &mut out);
        assert!(matches!(out[0], Effect::SetTimer { .. }));
        for _ in 0..ABORT_ATTEMPTS_MAX {
            c.on_abort_answer("p2", false, 0, &mut out);
        }
        assert!(c.finished(), "left to recovery after the bounded attempts");
    }

    #[test]
    fn read_only_everywhere_commits_without_a_record() {
        let mut c = Commit::new(names(2), Config::new(AckMode::Applied));
        let mut out = vec![];
        c.on_vote("p0", Vote::ReadOnly, &mut out);
        c.on_vote("p1", Vote::ReadOnly, &mut out);
        assert_eq!(
            out,
            vec![Effect::Answer(Answer::Committed { pending: vec![] })]
        );
        assert!(c.finished());
    }

    #[test]
    fn a_failed_log_says_and_does_nothing_more() {
        let mut c = Commit::new(names(1), Config::new(AckMode::Durable));
        let mut out = vec![];
        c.on_vote("p0", Vote::Yes, &mut out);
        out.clear();
        c.on_log_failed(&mut out);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(c.phase(), Phase::Unknown);
        c.on_durable(&mut out);
        c.on_timer(&Timer::AckWait, &mut out);
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn durable_mode_answers_at_durability_and_applied_mode_after_the_wait() {
        for (ack, answered_at_once) in [(AckMode::Durable, true), (AckMode::Applied, false)] {
            let mut c = Commit::new(names(1), Config::new(ack));
            let mut out = vec![];
            c.on_vote("p0", Vote::Yes, &mut out);
            c.on_durable(&mut out);
            let answered = out.iter().any(|e| matches!(e, Effect::Answer(_)));
            assert_eq!(answered, answered_at_once, "{ack:?}");
            out.clear();
            c.on_timer(&Timer::AckWait, &mut out);
            if !answered_at_once {
                assert_eq!(
                    out,
                    vec![Effect::Answer(Answer::Committed {
                        pending: vec!["p0".into()]
                    })]
                );
            }
        }
    }

    #[test]
    fn a_decision_naming_nobody_is_finished_at_once() {
        let mut out = vec![];
        let c = Commit::decided(Vec::new(), Config::new(AckMode::Durable), &mut out);
        assert!(out.is_empty());
        assert!(c.finished());
    }

    #[test]
    fn a_replayed_commit_drives_phase2_without_answering() {
        let mut out = vec![];
        let mut c = Commit::decided(names(2), Config::new(AckMode::Applied), &mut out);
        assert_eq!(sends(&out, Request::CommitPrepared), vec!["p0", "p1"]);
        out.clear();
        c.on_commit_answer("p0", CommitAnswer::Committed, 0, &mut out);
        c.on_commit_answer("p1", CommitAnswer::Committed, 0, &mut out);
        assert_eq!(out, vec![Effect::AppendEnd]);
    }
}
