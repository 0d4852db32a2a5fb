//! Coordinator ↔ agent messages.
//!
//! Every request travels in a [`RequestFrame`] with an id (many transactions share one
//! connection; responses may come back in any order) and a deadline. The first request on
//! a connection must be [`Request::Hello`]; the agent answers [`Response::Hello`] or
//! [`ErrorKind::VersionMismatch`] and closes.
//!
//! With a shared key (see [`crate::auth`]) the agent answers the Hello with
//! [`Response::Challenge`], the coordinator proves it holds the key with
//! [`Request::Authenticate`], and only then does the agent answer [`Response::Hello`]
//! (with its own proof). A connection acts only for the coordinator id it authenticated
//! as: every GID and prefix it names must be of that id.
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

/// Internally tagged (`{"type": "execute", ...}`). Deserialized by hand (see
/// [`tagged`]): serde's derive for internally tagged enums buffers the whole message
/// into a generic tree first, which was most of the agents' decoding cost.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Handshake: must be first on a connection. `nonce`: the coordinator's half of the
    /// challenge ([`crate::auth::NONCE_BYTES`] random bytes, hex), required by an agent
    /// with a key.
    Hello {
        protocol_version: u32,
        coordinator_id: String,
        epoch: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<String>,
    },
    /// Answer to [`Response::Challenge`]: `proof` is
    /// `AuthKey::proof(Role::Coordinator, transcript)` (see [`crate::auth`]).
    Authenticate {
        proof: String,
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
    /// Last-agent commit: settle the outcome of `gid` on the agent that commits last.
    /// The agent inserts an ABORT row for it unless a decision row exists (waiting for a
    /// commit of the same GID in flight), so a late commit fails, and answers `Decision`.
    Fence {
        gid: Gid,
    },
    /// Delete the decision rows of finished last-agent transactions (every other
    /// participant acknowledged), at most [`FORGET_MAX_GIDS`] per request.
    Forget {
        gids: Vec<Gid>,
    },
    /// Committed decision rows of this coordinator id (oldest first, at most
    /// [`LIST_DECISIONS_MAX`]): recovery completes and forgets those whose `Forget` was
    /// lost in a crash.
    ListDecisions {
        gid_prefix: String,
    },
    Ping,
}

/// Most rows in one `Decisions` answer.
pub const LIST_DECISIONS_MAX: usize = 10_000;

/// Deepest nesting of arrays and objects a statement parameter or a result value may
/// have. Both sides enforce it (the coordinator on parameters, the agent on results), so
/// a message carrying one stays well inside the JSON decoder's own limit of 128 levels on
/// the other side: one bad value fails its request, never the connection it shares.
pub const MAX_VALUE_DEPTH: usize = 64;

/// How deeply `v` nests arrays and objects (a scalar is 0). Stops counting past
/// `MAX_VALUE_DEPTH + 1`.
pub fn value_depth(v: &serde_json::Value) -> usize {
    fn walk(v: &serde_json::Value, depth: usize) -> usize {
        if depth > MAX_VALUE_DEPTH {
            return depth;
        }
        match v {
            serde_json::Value::Array(items) => items
                .iter()
                .map(|i| walk(i, depth + 1))
                .max()
                .unwrap_or(depth + 1),
            serde_json::Value::Object(map) => map
                .values()
                .map(|i| walk(i, depth + 1))
                .max()
                .unwrap_or(depth + 1),
            _ => depth,
        }
    }
    walk(v, 0)
}

/// A committed decision row (answer to `ListDecisions`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRow {
    pub gid: String,
    pub txn_id: String,
    pub participants: Vec<String>,
    pub age_ms: u64,
}

/// Most GIDs in one `Forget`.
pub const FORGET_MAX_GIDS: usize = 4096;

/// What a last-agent commit records beside its own data, in the same local transaction:
/// the decision row that recovery reads back with `Fence`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub txn_id: String,
    /// The prepared participants this commit decides for (not the last agent itself).
    pub participants: Vec<String>,
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
    /// With [`Finish::CommitDecision`]: the decision row to commit with the branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// What is left of the transaction's lifetime when the request is sent. An open
    /// branch waiting for its transaction's next statement is kept at least this long
    /// (beyond the agent's idle rule), and rolled back after it: the transaction may
    /// still be active on another participant. `None`: the idle rule alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_ms: Option<u64>,
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
    /// Last-agent commit: insert the `decision` row (committed) and `COMMIT`, in the same
    /// round trip. That commit is the transaction's decision. Fails (and rolls back) if
    /// the GID was fenced.
    CommitDecision,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Statement {
    pub sql: String,
    #[serde(default)]
    pub params: Vec<serde_json::Value>,
}

/// Result of one statement.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StmtResult {
    pub rows_affected: u64,
    #[serde(default)]
    pub rows: Vec<serde_json::Map<String, serde_json::Value>>,
    /// Why this statement has no rows although its transaction committed: it failed and
    /// a later `ROLLBACK TO SAVEPOINT` repaired the transaction (PostgreSQL's error), or
    /// its rows could not be returned (too many bytes, nested too deep). Never an empty
    /// result without a word.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Internally tagged like [`Request`], and deserialized by hand for the same reason.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Hello {
        protocol_version: u32,
        agent_name: String,
        database: String,
        build_version: String,
        /// The agent keeps a decision table, so it can commit last (`CommitDecision`,
        /// `Fence`, `Forget`).
        #[serde(default)]
        decisions: bool,
        /// The newest epoch per coordinator id is kept in the agent's database
        /// (`twopc.epochs`), so fencing survives an agent restart; false: in memory only.
        #[serde(default)]
        epochs_durable: bool,
        /// With a shared key: the agent's proof (`Role::Agent`) over the same transcript.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        proof: Option<String>,
    },
    /// The agent's half of the challenge: [`crate::auth::NONCE_BYTES`] random bytes, hex.
    Challenge {
        nonce: String,
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
    /// The settled outcome of a last-agent transaction (answer to `Fence`). An aborted
    /// one has no `txn_id` or participants.
    Decision {
        committed: bool,
        txn_id: String,
        participants: Vec<String>,
    },
    Forgotten {
        rows: u64,
    },
    Decisions {
        rows: Vec<DecisionRow>,
    },
    Pong,
}

impl Response {
    /// The answer's kind, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Response::Hello { .. } => "hello",
            Response::Challenge { .. } => "challenge",
            Response::Executed { .. } => "executed",
            Response::Failed(_) => "failed",
            Response::CommitPrepared(_) => "commit prepared",
            Response::Aborted => "aborted",
            Response::Prepared { .. } => "prepared branches",
            Response::Decision { .. } => "decision",
            Response::Forgotten { .. } => "forgotten",
            Response::Decisions { .. } => "decision rows",
            Response::Pong => "pong",
        }
    }
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// A limit was hit (open branches, prepared branches, no free database session in
    /// time); nothing of the request ran, and a retry may succeed.
    Limit,
    /// The request's deadline passed.
    Timeout,
    /// The connection to the database failed while the request ran: what it did is
    /// unknown (a commit may or may not have happened).
    Unavailable,
    /// No database session could be opened (the database is down, unreachable, or
    /// refuses connections): the request was refused before anything of it ran.
    DatabaseUnreachable,
    /// The peer speaks another protocol version, or skipped the handshake.
    VersionMismatch,
    /// The request comes from an older epoch of a coordinator than one the agent has
    /// already seen: a stale incarnation must not command the agent.
    Fenced,
    /// The handshake did not authenticate (no key proof, a wrong one, or a certificate
    /// that does not name the coordinator id).
    Unauthenticated,
    /// The connection's coordinator id may not do this: a GID or prefix of another
    /// coordinator id, or an id the agent does not serve.
    Forbidden,
    /// An epoch further ahead of the newest seen for its coordinator id than the agent
    /// accepts (`MAX_EPOCH_STEP` in the agent).
    EpochOutOfRange,
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

/// Deserializing the internally tagged [`Request`] and [`Response`] without buffering.
///
/// Our serializer writes `type` first, so the visitor reads the tag and then hands the
/// rest of the same map straight to the variant's fields. A message from elsewhere with
/// `type` later in the object is still accepted: it is buffered into a JSON value, `type`
/// moved to the front, and decoded again (slowly, but correctly).
mod tagged {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::value::MapAccessDeserializer;
    use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
    use serde::Deserialize;

    use super::*;

    #[derive(Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum RequestTag {
        Hello,
        Authenticate,
        Execute,
        CommitPrepared,
        Abort,
        ListPrepared,
        Fence,
        Forget,
        ListDecisions,
        Ping,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum ResponseTag {
        Hello,
        Challenge,
        Executed,
        Failed,
        CommitPrepared,
        Aborted,
        Prepared,
        Decision,
        Forgotten,
        Decisions,
        Pong,
    }

    #[derive(Deserialize)]
    struct HelloRequest {
        protocol_version: u32,
        coordinator_id: String,
        epoch: u64,
        #[serde(default)]
        nonce: Option<String>,
    }

    #[derive(Deserialize)]
    struct AuthenticateRequest {
        proof: String,
    }

    #[derive(Deserialize)]
    struct ChallengeResponse {
        nonce: String,
    }

    #[derive(Deserialize)]
    struct ByGid {
        gid: Gid,
    }

    #[derive(Deserialize)]
    struct ByGids {
        gids: Vec<Gid>,
    }

    #[derive(Deserialize)]
    struct DecisionResponse {
        committed: bool,
        txn_id: String,
        participants: Vec<String>,
    }

    #[derive(Deserialize)]
    struct ForgottenResponse {
        rows: u64,
    }

    #[derive(Deserialize)]
    struct DecisionsResponse {
        rows: Vec<DecisionRow>,
    }

    #[derive(Deserialize)]
    struct ByPrefix {
        gid_prefix: String,
    }

    #[derive(Deserialize)]
    struct HelloResponse {
        protocol_version: u32,
        agent_name: String,
        database: String,
        build_version: String,
        #[serde(default)]
        decisions: bool,
        #[serde(default)]
        epochs_durable: bool,
        #[serde(default)]
        proof: Option<String>,
    }

    #[derive(Deserialize)]
    struct Executed {
        results: Vec<StmtResult>,
        outcome: BranchOutcome,
    }

    #[derive(Deserialize)]
    struct PreparedList {
        branches: Vec<PreparedBranch>,
    }

    /// The variant's fields: the rest of the same map.
    fn rest<'de, A: MapAccess<'de>, T: Deserialize<'de>>(map: A) -> Result<T, A::Error> {
        T::deserialize(MapAccessDeserializer::new(map))
    }

    fn drain<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }

    /// The slow path: the first key was not `type`.
    fn reordered<'de, A: MapAccess<'de>, T: serde::de::DeserializeOwned>(
        first_key: String,
        mut map: A,
    ) -> Result<T, A::Error> {
        let mut rest = serde_json::Map::new();
        rest.insert(first_key, map.next_value::<serde_json::Value>()?);
        while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
            rest.insert(k, v);
        }
        let tag = rest
            .remove("type")
            .ok_or_else(|| de::Error::missing_field("type"))?;
        let mut ordered = serde_json::Map::with_capacity(rest.len() + 1);
        ordered.insert("type".to_owned(), tag);
        ordered.extend(rest);
        T::deserialize(serde_json::Value::Object(ordered)).map_err(de::Error::custom)
    }

    struct TaggedVisitor<T>(PhantomData<T>);

    impl<'de> Visitor<'de> for TaggedVisitor<Request> {
        type Value = Request;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a request object with a \"type\"")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Request, A::Error> {
            let first: String = map
                .next_key()?
                .ok_or_else(|| de::Error::missing_field("type"))?;
            if first != "type" {
                return reordered(first, map);
            }
            Ok(match map.next_value::<RequestTag>()? {
                RequestTag::Hello => {
                    let h: HelloRequest = rest(map)?;
                    Request::Hello {
                        protocol_version: h.protocol_version,
                        coordinator_id: h.coordinator_id,
                        epoch: h.epoch,
                        nonce: h.nonce,
                    }
                }
                RequestTag::Authenticate => Request::Authenticate {
                    proof: rest::<_, AuthenticateRequest>(map)?.proof,
                },
                RequestTag::Execute => Request::Execute(rest(map)?),
                RequestTag::CommitPrepared => Request::CommitPrepared {
                    gid: rest::<_, ByGid>(map)?.gid,
                },
                RequestTag::Abort => Request::Abort {
                    gid: rest::<_, ByGid>(map)?.gid,
                },
                RequestTag::ListPrepared => Request::ListPrepared {
                    gid_prefix: rest::<_, ByPrefix>(map)?.gid_prefix,
                },
                RequestTag::Fence => Request::Fence {
                    gid: rest::<_, ByGid>(map)?.gid,
                },
                RequestTag::Forget => Request::Forget {
                    gids: rest::<_, ByGids>(map)?.gids,
                },
                RequestTag::ListDecisions => Request::ListDecisions {
                    gid_prefix: rest::<_, ByPrefix>(map)?.gid_prefix,
                },
                RequestTag::Ping => {
                    drain(map)?;
                    Request::Ping
                }
            })
        }
    }

    impl<'de> Visitor<'de> for TaggedVisitor<Response> {
        type Value = Response;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a response object with a \"type\"")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Response, A::Error> {
            let first: String = map
                .next_key()?
                .ok_or_else(|| de::Error::missing_field("type"))?;
            if first != "type" {
                return reordered(first, map);
            }
            Ok(match map.next_value::<ResponseTag>()? {
                ResponseTag::Hello => {
                    let h: HelloResponse = rest(map)?;
                    Response::Hello {
                        protocol_version: h.protocol_version,
                        agent_name: h.agent_name,
                        database: h.database,
                        build_version: h.build_version,
                        decisions: h.decisions,
                        epochs_durable: h.epochs_durable,
                        proof: h.proof,
                    }
                }
                ResponseTag::Challenge => Response::Challenge {
                    nonce: rest::<_, ChallengeResponse>(map)?.nonce,
                },
                ResponseTag::Executed => {
                    let e: Executed = rest(map)?;
                    Response::Executed {
                        results: e.results,
                        outcome: e.outcome,
                    }
                }
                ResponseTag::Failed => Response::Failed(rest(map)?),
                // serde writes this newtype around a unit enum as
                // `{"type":"commit_prepared","committed":null}`: the rest of the map is the
                // inner enum, keyed by its variant.
                ResponseTag::CommitPrepared => Response::CommitPrepared(rest(map)?),
                ResponseTag::Aborted => {
                    drain(map)?;
                    Response::Aborted
                }
                ResponseTag::Prepared => Response::Prepared {
                    branches: rest::<_, PreparedList>(map)?.branches,
                },
                ResponseTag::Decision => {
                    let d: DecisionResponse = rest(map)?;
                    Response::Decision {
                        committed: d.committed,
                        txn_id: d.txn_id,
                        participants: d.participants,
                    }
                }
                ResponseTag::Forgotten => Response::Forgotten {
                    rows: rest::<_, ForgottenResponse>(map)?.rows,
                },
                ResponseTag::Decisions => Response::Decisions {
                    rows: rest::<_, DecisionsResponse>(map)?.rows,
                },
                ResponseTag::Pong => {
                    drain(map)?;
                    Response::Pong
                }
            })
        }
    }

    impl<'de> Deserialize<'de> for Request {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Request, D::Error> {
            d.deserialize_map(TaggedVisitor::<Request>(PhantomData))
        }
    }

    impl<'de> Deserialize<'de> for Response {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Response, D::Error> {
            d.deserialize_map(TaggedVisitor::<Response>(PhantomData))
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
                decision: None,
                expires_in_ms: None,
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

    fn every_request() -> Vec<Request> {
        let gid = Gid::new("c1", 1, 2).unwrap();
        vec![
            Request::Hello {
                protocol_version: 1,
                coordinator_id: "c1".into(),
                epoch: 3,
                nonce: None,
            },
            Request::Hello {
                protocol_version: 4,
                coordinator_id: "c1".into(),
                epoch: 3,
                nonce: Some("ab".repeat(32)),
            },
            Request::Authenticate {
                proof: "cd".repeat(32),
            },
            Request::Execute(ExecuteBranch {
                gid: gid.clone(),
                isolation: Isolation::RepeatableRead,
                statements: vec![Statement {
                    sql: "UPDATE t SET v = $1".into(),
                    params: vec![serde_json::json!({"a": [1, "x"]})],
                }],
                finish: Finish::Keep,
                read_only_vote: false,
                continues: true,
                decision: None,
                expires_in_ms: Some(30_000),
            }),
            Request::CommitPrepared { gid: gid.clone() },
            Request::Execute(ExecuteBranch {
                gid: gid.clone(),
                isolation: Isolation::ReadCommitted,
                statements: vec![],
                finish: Finish::CommitDecision,
                read_only_vote: false,
                continues: false,
                decision: Some(Decision {
                    txn_id: "t-1".into(),
                    participants: vec!["a".into()],
                }),
                expires_in_ms: None,
            }),
            Request::Abort { gid: gid.clone() },
            Request::Fence { gid: gid.clone() },
            Request::Forget {
                gids: vec![gid.clone(), Gid::with_last_agent("c", 1, 3, "b").unwrap()],
            },
            Request::ListPrepared {
                gid_prefix: "twopc_c1_".into(),
            },
            Request::ListDecisions {
                gid_prefix: "twopc_c1_".into(),
            },
            Request::Ping,
        ]
    }

    fn every_response() -> Vec<Response> {
        vec![
            Response::Hello {
                protocol_version: 1,
                agent_name: "a".into(),
                database: "db".into(),
                build_version: "0.1.0".into(),
                decisions: true,
                epochs_durable: true,
                proof: Some("ef".repeat(32)),
            },
            Response::Hello {
                protocol_version: 4,
                agent_name: "a".into(),
                database: "db".into(),
                build_version: "0.1.0".into(),
                decisions: false,
                epochs_durable: false,
                proof: None,
            },
            Response::Challenge {
                nonce: "01".repeat(32),
            },
            Response::Executed {
                results: vec![StmtResult {
                    rows_affected: 1,
                    rows: vec![serde_json::from_str(r#"{"k": 1, "s": "x"}"#).unwrap()],
                    error: None,
                }],
                outcome: BranchOutcome::ReadOnly,
            },
            Response::Failed(AgentError {
                kind: ErrorKind::Sql,
                sqlstate: Some("40001".into()),
                message: "m".into(),
                statement_index: Some(2),
            }),
            Response::Failed(AgentError::new(
                ErrorKind::DatabaseUnreachable,
                "no database session: connection refused",
            )),
            Response::CommitPrepared(CommitAck::Committed),
            Response::CommitPrepared(CommitAck::NotPrepared),
            Response::Aborted,
            Response::Prepared {
                branches: vec![PreparedBranch {
                    gid: "g".into(),
                    database: "db".into(),
                    owner: "o".into(),
                    prepared_at: "2026-01-01T00:00:00Z".into(),
                    age_ms: 5,
                }],
            },
            Response::Decision {
                committed: true,
                txn_id: "t-1".into(),
                participants: vec!["a".into(), "c".into()],
            },
            Response::Forgotten { rows: 2 },
            Response::Decisions {
                rows: vec![DecisionRow {
                    gid: "twopc_c_1_3_l62".into(),
                    txn_id: "t".into(),
                    participants: vec!["a".into()],
                    age_ms: 7,
                }],
            },
            Response::Pong,
        ]
    }

    #[test]
    fn every_message_roundtrips_through_the_hand_written_decoder() {
        for r in every_request() {
            let json = serde_json::to_string(&r).unwrap();
            assert!(json.starts_with(r#"{"type":"#), "{json}");
            let back: Request = serde_json::from_str(&json).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), json);
        }
        for r in every_response() {
            let json = serde_json::to_string(&r).unwrap();
            assert!(json.starts_with(r#"{"type":"#), "{json}");
            let back: Response = serde_json::from_str(&json).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), json);
        }
    }

    #[test]
    fn the_tag_may_come_last() {
        // Another producer may order keys differently: the slow path still decodes it.
        let moved = |json: &str| {
            let v: serde_json::Value = serde_json::from_str(json).unwrap();
            let mut obj = v.as_object().unwrap().clone();
            let tag = obj.remove("type").unwrap();
            obj.insert("type".into(), tag);
            serde_json::to_string(&obj).unwrap()
        };
        for r in every_request() {
            let json = serde_json::to_string(&r).unwrap();
            let back: Request = serde_json::from_str(&moved(&json)).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), json);
        }
        for r in every_response() {
            let json = serde_json::to_string(&r).unwrap();
            let back: Response = serde_json::from_str(&moved(&json)).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), json);
        }
    }

    #[test]
    fn malformed_tags_are_errors() {
        for bad in [
            r#"{}"#,
            r#"{"type":"nope"}"#,
            r#"{"gid":"twopc_c1_1_2"}"#,
            r#"{"type":"commit_prepared"}"#,
            r#"{"type":"execute","gid":"twopc_c1_1_2","statements":"x"}"#,
            r#"[1]"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<Response>(r#"{"type":"commit_prepared"}"#).is_err());
        assert!(serde_json::from_str::<Response>(r#"{"type":"failed","kind":"sql"}"#).is_err());
    }
}
