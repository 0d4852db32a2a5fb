//! The coordinator's answers, as the client reads them.

use serde::{Deserialize, Serialize};
use twopc_shared::msg::StmtResult;

/// When a commit is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ack {
    /// Once every participant applied it (bounded by the coordinator's commit wait;
    /// `pending` names those that had not).
    Applied,
    /// Once the decision is durable.
    Durable,
}

/// Where a transaction without an outcome is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Active,
    Preparing,
    Committing,
    /// Its commit may have happened; recovery will say.
    InDoubt,
    /// The coordinator restarted and is still reading the participants' decision rows.
    Recovering,
}

/// How a transaction ended, as far as the coordinator knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Committed,
    Aborted,
    /// Not remembered (beyond the coordinator's retention): it may have committed.
    Unknown,
}

/// What `GET /v1/transactions/{id}` answers.
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    pub txn_id: String,
    pub state: Option<State>,
    pub outcome: Option<Outcome>,
    pub gid: Option<String>,
    #[serde(default)]
    pub pending: Vec<String>,
    pub message: Option<String>,
}

/// A committed transaction.
#[derive(Debug, Clone, Deserialize)]
pub struct Committed {
    pub txn_id: String,
    pub outcome: Outcome,
    /// Each branch's statement results; empty for a replayed answer (results are not
    /// recorded).
    pub branches: Vec<BranchResults>,
    /// Participants that had not applied the commit when it was answered (they will).
    #[serde(default)]
    pub pending: Vec<String>,
    /// The answer of a retry: the txn id had committed before, nothing ran now.
    #[serde(default)]
    pub replayed: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BranchResults {
    pub participant: String,
    pub results: Vec<StmtResult>,
}
