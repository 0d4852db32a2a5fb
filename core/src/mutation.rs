//! Known bugs, compiled in only under the `mutations` feature: the simulator runs the
//! core with one of them switched on and must report a broken invariant, which proves its
//! oracle is not vacuous. Without the feature [`Mutations::none`] is the only value and
//! every check is `false`.

/// One deliberately broken behaviour of the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mutation {
    /// Sends COMMIT PREPARED as soon as the votes are in, with the forced append.
    CommitBeforeDurable,
    /// Never writes the COMMIT record: phase 2 starts on the votes alone.
    SkipDecisionLog,
    /// Tells the client `committed` before the decision is durable.
    AnswerBeforeDurable,
    /// Counts a vote whose answer was lost (the branch may or may not be prepared) as YES.
    UnknownVoteIsYes,
    /// Writes END after the first acknowledgement instead of the last.
    EndBeforeAllAcks,
    /// A restarted coordinator ignores the COMMIT records its log replays.
    ReplayForgetsDecisions,
    /// Recovery rolls back prepared branches of the current incarnation's live
    /// transactions too.
    RecoveryActsOnLiveEpoch,
    /// Recovery rolls back a prepared branch whose transaction is decided commit and
    /// still in phase 2 (presumed abort where a decision exists).
    RecoveryIgnoresDecisions,
    /// A failed forced append of the COMMIT record is taken as "not decided": the client
    /// is told `aborted` and the branches rolled back, though the record may be on disk.
    LogFailureAborts,
    /// Issue 14, defect 1: a transaction with one writer and read-only others commits
    /// that writer with nothing logged (its COMMIT PREPARED alone decides).
    SingleWriterUnlogged,
    /// Issue 14, defect 4: a last-agent or one-phase commit whose answer was lost is
    /// taken as not committed (aborted), without asking the last agent.
    UncertainLastCommitAborts,
    /// Recovery presumes abort for a prepared branch of a last-agent transaction instead
    /// of asking the last agent, whose decision row may say committed.
    PresumedAbortOfLastAgent,
    /// Issue 14, defect 2: an expiring outcome removes whatever its txn id holds now, so
    /// a reused txn id's newer commit goes with its older abort (and the txn id may run
    /// again).
    EvictByTxnId,
    /// A retry of a txn id whose remembered attempt aborted is answered with the
    /// recorded outcome of a commit (`"replayed": true`) instead of running.
    ReplayAnAbort,
}

impl Mutation {
    pub const ALL: [Mutation; 14] = [
        Mutation::CommitBeforeDurable,
        Mutation::SkipDecisionLog,
        Mutation::AnswerBeforeDurable,
        Mutation::UnknownVoteIsYes,
        Mutation::EndBeforeAllAcks,
        Mutation::ReplayForgetsDecisions,
        Mutation::RecoveryActsOnLiveEpoch,
        Mutation::RecoveryIgnoresDecisions,
        Mutation::LogFailureAborts,
        Mutation::SingleWriterUnlogged,
        Mutation::UncertainLastCommitAborts,
        Mutation::PresumedAbortOfLastAgent,
        Mutation::EvictByTxnId,
        Mutation::ReplayAnAbort,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mutation::CommitBeforeDurable => "commit-before-durable",
            Mutation::SkipDecisionLog => "skip-decision-log",
            Mutation::AnswerBeforeDurable => "answer-before-durable",
            Mutation::UnknownVoteIsYes => "unknown-vote-is-yes",
            Mutation::EndBeforeAllAcks => "end-before-all-acks",
            Mutation::ReplayForgetsDecisions => "replay-forgets-decisions",
            Mutation::RecoveryActsOnLiveEpoch => "recovery-acts-on-live-epoch",
            Mutation::RecoveryIgnoresDecisions => "recovery-ignores-decisions",
            Mutation::LogFailureAborts => "log-failure-aborts",
            Mutation::SingleWriterUnlogged => "single-writer-unlogged",
            Mutation::UncertainLastCommitAborts => "uncertain-last-commit-aborts",
            Mutation::PresumedAbortOfLastAgent => "presumed-abort-of-last-agent",
            Mutation::EvictByTxnId => "evict-by-txn-id",
            Mutation::ReplayAnAbort => "replay-an-abort",
        }
    }

    pub fn from_name(name: &str) -> Option<Mutation> {
        Mutation::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// Which mutation (if any) a machine runs with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mutations(Option<Mutation>);

impl Mutations {
    /// The correct core.
    pub const fn none() -> Mutations {
        Mutations(None)
    }

    /// The core with `m` switched on.
    #[cfg(feature = "mutations")]
    pub const fn of(m: Mutation) -> Mutations {
        Mutations(Some(m))
    }

    /// Whether `m` is switched on (never, without the `mutations` feature).
    #[inline]
    pub fn on(self, m: Mutation) -> bool {
        cfg!(feature = "mutations") && self.0 == Some(m)
    }
}
