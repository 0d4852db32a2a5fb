//! Coordinator ↔ agent messages.
//!
//! Every request travels in a [`RequestFrame`] with an id (many transactions share one
//! connection; responses may come back in any order) and a deadline. The first request on
//! a connection must be [`Request::Hello`]; the agent answers [`Response::Hello`] or
//! [`ErrorKind::VersionMismatch`] and closes.
//!
//! A branch is driven by [`Request::Execute`]: the first `Execute` for a GID opens a local
//! transaction (`BEGIN` with the isolation level) on a pooled session; `finish` says what
//! happens after the statements: keep the session open for more (interactive), `PREPARE
//! TRANSACTION` and vote, or plain `COMMIT` (one-phase). After PREPARE the session goes
//! back to the pool; `CommitPrepared` / `Abort` run on any pooled session.

use serde::{Deserialize, Serialize};

use crate::gid::Gid;

/// A request with its correlation id and deadline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestFrame {
    pub id: u64,
    /// The agent gives up on the request after this many milliseconds and answers
    /// [`ErrorKind::Timeout`] (rolling back whatever the request had started).
    pub timeout_ms: u64,
    pub body: Request,
}

/// A response; `id` is the id of the request it answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResponseFrame {
    pub id: u64,
    pub body: Response,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Handshake: must be first on a connection.
    Hello {
        protocol_version: u32,
        coordinator_id: String,
        epoch: u64,
    },
    /// Run statements in the branch `gid` (opening it if new), then `finish`.
    Execute(ExecuteBranch),
    /// `COMMIT PREPARED` (phase 2 of a committed transaction).
    CommitPrepared {
        gid: Gid,
    },
    /// Roll the branch back, whatever state it is in: an open session gets `ROLLBACK`,
    /// a prepared branch `ROLLBACK PREPARED`, a branch still executing is rolled back as
    /// soon as it finishes. Unknown GIDs are fine (presumed abort): the answer is `Aborted`.
    Abort {
        gid: Gid,
    },
    /// The prepared branches of this coordinator id in the agent's database.
    ListPrepared {
        gid_prefix: String,
    },
    Ping,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecuteBranch {
    pub gid: Gid,
    #[serde(default)]
    pub isolation: Isolation,
    pub statements: Vec<Statement>,
    pub finish: Finish,
    /// If true, a branch that wrote nothing (`txid_current_if_assigned()` IS NULL) does
    /// not stay prepared: the agent commits it at once and votes [`BranchOutcome::ReadOnly`].
    #[serde(default)]
    pub read_only_vote: bool,
    /// The branch must already be open on the agent (earlier statements of an
    /// interactive transaction ran on it). If the agent does not have it — it restarted,
    /// or the session was lost — it answers `UnknownBranch` instead of starting a new,
    /// empty branch: the earlier statements' work (and locks) are gone, so the
    /// transaction must abort.
    #[serde(default)]
    pub continues: bool,
}

/// What the agent does after the statements of an `Execute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// Keep the local transaction open for more statements (interactive transactions).
    Keep,
    /// `PREPARE TRANSACTION` in the same round trip as the statements, and vote.
    Prepare,
    /// Plain `COMMIT` (one-phase commit: this is the only participant).
    Commit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    #[default]
    ReadCommitted,
    RepeatableRead,
    Serializable,
}

impl Isolation {
    pub fn begin_sql(self) -> &'static str {
        match self {
            Isolation::ReadCommitted => "BEGIN ISOLATION LEVEL READ COMMITTED",
            Isolation::RepeatableRead => "BEGIN ISOLATION LEVEL REPEATABLE READ",
            Isolation::Serializable => "BEGIN ISOLATION LEVEL SERIALIZABLE",
        }
    }
}

/// One SQL statement with positional parameters (`$1`, `$2`, ...), bound to the types
/// PostgreSQL reports for them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Statement {
    pub sql: String,
    #[serde(default)]
    pub params: Vec<serde_json::Value>,
}

/// Result of one statement.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StmtResult {
    pub rows_affected: u64,
    #[serde(default)]
    pub rows: Vec<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Hello {
        protocol_version: u32,
        agent_name: String,
        database: String,
        build_version: String,
    },
    Executed {
        results: Vec<StmtResult>,
        outcome: BranchOutcome,
    },
    /// The request failed; for an `Execute` the branch is rolled back (a NO vote).
    Failed(AgentError),
    CommitPrepared(CommitAck),
    Aborted,
    Prepared {
        branches: Vec<PreparedBranch>,
    },
    Pong,
}

/// State of a branch after an `Execute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BranchOutcome {
    /// Local transaction still open (`Finish::Keep`).
    Active,
    /// Prepared: a YES vote.
    Prepared,
    /// Wrote nothing and is already finished: drops out of phase 2.
    ReadOnly,
    /// Committed in one phase (`Finish::Commit`).
    Committed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommitAck {
    Committed,
    /// No prepared transaction with this GID (SQLSTATE 42704): already resolved. The
    /// coordinator decides whether that is fine (only if its log says commit).
    NotPrepared,
}

/// A prepared transaction as `pg_prepared_xacts` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedBranch {
    pub gid: String,
    pub database: String,
    pub owner: String,
    /// When it was prepared, RFC 3339.
    pub prepared_at: String,
    pub age_ms: u64,
}

/// Why the agent refused or failed a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A statement failed in PostgreSQL (the SQLSTATE says why).
    Sql,
    /// A parameter does not fit its type, or the count is wrong; nothing ran.
    BadParam,
    /// The request makes no sense in the branch's state (e.g. unknown branch).
    BadRequest,
    /// The branch does not exist (never opened, or already finished or timed out).
    UnknownBranch,
    /// A limit was hit (open branches, pool exhausted).
    Limit,
    /// The request's deadline passed.
    Timeout,
    /// The database is unreachable.
    Unavailable,
    /// The peer speaks another protocol version, or skipped the handshake.
    VersionMismatch,
    /// The request comes from an older epoch of a coordinator than one the agent has
    /// already seen: a stale incarnation must not command the agent.
    Fenced,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}{}: {message}", sqlstate.as_deref().map(|s| format!(" ({s})")).unwrap_or_default())]
pub struct AgentError {
    pub kind: ErrorKind,
    pub sqlstate: Option<String>,
    pub message: String,
    /// Index of the statement that failed, within the `Execute`.
    pub statement_index: Option<usize>,
}

impl AgentError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> AgentError {
        AgentError {
            kind,
            sqlstate: None,
            message: message.into(),
            statement_index: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn execute_roundtrips_as_json() {
        let req = RequestFrame {
            id: 9,
            timeout_ms: 1000,
            body: Request::Execute(ExecuteBranch {
                gid: Gid::new("c1", 1, 2).unwrap(),
                isolation: Isolation::Serializable,
                statements: vec![Statement {
                    sql: "SELECT $1".into(),
                    params: vec![serde_json::json!(5)],
                }],
                finish: Finish::Prepare,
                read_only_vote: true,
                continues: false,
            }),
        };
        let bytes = serde_json::to_vec(&req).unwrap();
        let back: RequestFrame = serde_json::from_slice(&bytes).unwrap();
        match back.body {
            Request::Execute(e) => {
                assert_eq!(e.gid.as_str(), "twopc_c1_1_2");
                assert_eq!(e.finish, Finish::Prepare);
                assert_eq!(e.statements[0].params[0], serde_json::json!(5));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn bad_gid_is_rejected_at_decode() {
        let raw = r#"{"id":1,"timeout_ms":5,"body":{"type":"commit_prepared","gid":"x'; drop"}}"#;
        assert!(serde_json::from_str::<RequestFrame>(raw).is_err());
    }
}
