//! An operator's resolve by hand (`txns resolve ID --commit|--abort [--force]`): which
//! requests contradict what twopc has decided, or may already have answered, and so are
//! refused unless forced.
//!
//! The decision log and the last agent's decision row are the decision. Under presumed
//! abort a GID with neither is already aborted: recovery rolls it back, and `GET` answers
//! `aborted` for it. Committing it by hand overrides that decision (and a GID does not
//! name its txn id, so nothing can tell whether a retry of it committed meanwhile): it
//! is the tool for a lost log, and takes `--force`.

/// What twopc knows of a GID's outcome, as the operator's view shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Live in this coordinator: it resolves itself.
    Running,
    /// No decision anywhere: presumed aborted.
    None,
    /// A COMMIT is logged and some participant has not acknowledged it.
    Committed,
    /// Committed, and every participant acknowledged it.
    CommittedDone,
    /// The last agent's decision row says committed.
    CommittedLastAgent,
    /// Recorded as aborted (an operator's ABORT, or a fence's row).
    Aborted,
}

impl Decision {
    /// The name the operator's view and API show.
    pub fn name(self) -> &'static str {
        match self {
            Decision::Running => "running",
            Decision::None => "none",
            Decision::Committed => "committed",
            Decision::CommittedDone => "committed_done",
            Decision::CommittedLastAgent => "committed_last_agent",
            Decision::Aborted => "aborted",
        }
    }

    /// Whether the decision is a commit.
    pub fn is_commit(self) -> bool {
        matches!(
            self,
            Decision::Committed | Decision::CommittedDone | Decision::CommittedLastAgent
        )
    }
}

/// The operator's choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Commit,
    Abort,
}

/// Why a resolve is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Live here: never, forced or not.
    Running,
    /// An abort of a commit (logged or by the last agent) would split the transaction.
    WouldSplit,
    /// A commit of what is recorded as aborted.
    RecordedAborted,
    /// A commit of what has no decision: presumed aborted already.
    PresumedAborted,
}

impl Refusal {
    /// Whether `--force` overrides it.
    pub fn forceable(self) -> bool {
        self != Refusal::Running
    }
}

/// The rule: a resolve may not contradict the decision, unless forced; never a live one.
pub fn check(decision: Decision, action: Action, force: bool) -> Result<(), Refusal> {
    let refusal = match (decision, action) {
        (Decision::Running, _) => Refusal::Running,
        (d, Action::Abort) if d.is_commit() => Refusal::WouldSplit,
        (Decision::Aborted, Action::Commit) => Refusal::RecordedAborted,
        (Decision::None, Action::Commit) => Refusal::PresumedAborted,
        _ => return Ok(()),
    };
    if force && refusal.forceable() {
        return Ok(());
    }
    Err(refusal)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Decision; 6] = [
        Decision::Running,
        Decision::None,
        Decision::Committed,
        Decision::CommittedDone,
        Decision::CommittedLastAgent,
        Decision::Aborted,
    ];

    #[test]
    fn only_what_agrees_with_the_decision_runs_unforced() {
        for d in ALL {
            let commit_ok = d.is_commit();
            let abort_ok = matches!(d, Decision::None | Decision::Aborted);
            assert_eq!(check(d, Action::Commit, false).is_ok(), commit_ok, "{d:?}");
            assert_eq!(check(d, Action::Abort, false).is_ok(), abort_ok, "{d:?}");
        }
        assert_eq!(
            check(Decision::None, Action::Commit, false),
            Err(Refusal::PresumedAborted)
        );
    }

    #[test]
    fn force_overrides_all_but_a_live_transaction() {
        for d in ALL {
            for a in [Action::Commit, Action::Abort] {
                assert_eq!(
                    check(d, a, true).is_ok(),
                    d != Decision::Running,
                    "{d:?} {a:?}"
                );
            }
        }
    }
}
