//! The client and admin API's wire types that are not the engine's own, and its OpenAPI
//! document.
//!
//! The document is generated: every handler in [`crate::http`] carries a
//! `#[utoipa::path]` that names its request and response types, the router is built
//! from those same handlers (`utoipa_axum::routes!`), so a route cannot exist without
//! being documented. The types here and in [`crate::engine`] derive their schemas from
//! the structs serde serializes: a field added to an answer is in the document.

use serde::Serialize;
use utoipa::ToSchema;

use crate::engine::{InDoubtEntry, TxnStatus, TxnView};

/// Where a transaction that has no outcome yet is (`GET`'s `state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TxnState {
    /// Interactive: taking statements.
    Active,
    /// Its branches are being prepared.
    Preparing,
    /// Prepared everywhere; the commit decision is being made durable.
    Committing,
    /// Its commit may have happened; recovery will say (ask again).
    InDoubt,
    /// The coordinator restarted and has not read every participant's decision rows
    /// yet (ask again).
    Recovering,
}

/// How a transaction ended, as far as the coordinator knows (`outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TxnOutcome {
    Committed,
    Aborted,
    /// Not remembered (beyond retention), or the answer was lost: it may have committed.
    Unknown,
}

/// What an entry of `GET /v1/transactions?state=in_doubt` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InDoubtState {
    /// Decided committed; `pending` have not acknowledged COMMIT PREPARED.
    Committed,
    /// A last-agent or one-phase commit whose outcome recovery has yet to learn from
    /// `pending`.
    Unknown,
    /// Not committed; prepared branches on `pending` that recovery will roll back.
    PreparedAwaitingRecovery,
}

/// What the decision log says of a GID (operator view; the core's
/// `resolve::Decision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DecisionName {
    /// A transaction of this incarnation is still running under it.
    Running,
    /// No record: presumed abort.
    None,
    /// Logged committed, acknowledgements pending.
    Committed,
    /// Committed and acknowledged everywhere.
    CommittedDone,
    /// A last-agent commit (its decision is the last agent's own commit).
    CommittedLastAgent,
    /// Aborted (explicit record or known to this incarnation).
    Aborted,
}

impl From<twopc_core::resolve::Decision> for DecisionName {
    fn from(d: twopc_core::resolve::Decision) -> DecisionName {
        use twopc_core::resolve::Decision as D;
        match d {
            D::Running => DecisionName::Running,
            D::None => DecisionName::None,
            D::Committed => DecisionName::Committed,
            D::CommittedDone => DecisionName::CommittedDone,
            D::CommittedLastAgent => DecisionName::CommittedLastAgent,
            D::Aborted => DecisionName::Aborted,
        }
    }
}

/// Every error that is not an aborted or unknown outcome. (`deny_unknown_fields` only
/// tells the document that an aborted body is not one of these.)
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: ErrorMessage,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorMessage {
    /// What is wrong, in plain words.
    pub message: String,
}

/// A transaction that aborted: 409, or 400 when the client's input was at fault.
#[derive(Debug, Serialize, ToSchema)]
pub struct AbortedBody {
    pub txn_id: String,
    /// Always `aborted`.
    pub outcome: TxnOutcome,
    pub error: AbortError,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AbortError {
    /// The participant whose branch failed, if one did.
    pub participant: Option<String>,
    /// SQLSTATE of the failure (for non-SQL failures the closest class).
    pub code: Option<String>,
    pub message: String,
}

/// 504: the answer was lost; the transaction may have committed. Ask `GET` later.
#[derive(Debug, Serialize, ToSchema)]
pub struct UnknownBody {
    pub txn_id: String,
    pub gid: String,
    /// Always `unknown`.
    pub outcome: TxnOutcome,
    pub error: ErrorMessage,
}

/// 201: an interactive transaction began.
#[derive(Debug, Serialize, ToSchema)]
pub struct BegunBody {
    pub txn_id: String,
    /// Always `active`.
    pub state: TxnState,
}

/// A rollback's answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct RolledBackBody {
    pub txn_id: String,
    /// Always `aborted`.
    pub outcome: TxnOutcome,
}

/// `GET /v1/transactions`'s filter.
#[derive(Debug, Clone, Copy, serde::Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ListState {
    /// Decided but not acknowledged everywhere, and prepared branches awaiting recovery.
    InDoubt,
}

/// One entry of `GET /v1/transactions`: without a filter, each as `GET
/// /v1/transactions/{id}` answers it; with `?state=in_doubt`, what it waits for.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Listed {
    Status(TxnStatus),
    InDoubt(InDoubtEntry),
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ListBody {
    pub transactions: Vec<Listed>,
}

/// The operator's view of every GID of this coordinator some participant holds
/// prepared or the log has not finished.
#[derive(Debug, Serialize, ToSchema)]
pub struct AdminListBody {
    pub transactions: Vec<TxnView>,
}

/// `/healthz`: 200 when the coordinator takes transactions, 503 with `reasons` when not.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthBody {
    pub status: HealthStatus,
    /// Why the coordinator cannot take transactions (empty when `ok`).
    pub reasons: Vec<String>,
    pub coordinator_id: String,
    pub epoch: u64,
    pub version: String,
    pub uptime_s: u64,
    pub open_txns: usize,
    pub max_open_txns: usize,
    pub recovery_passes: u64,
    pub participants: Vec<ParticipantHealth>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    Ok,
    Unavailable,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ParticipantHealth {
    pub name: String,
    /// Whether its latest call got an answer; `null` before the first call ends.
    pub reachable: Option<bool>,
    pub since_unix_ms: u64,
    pub for_ms: u64,
}

/// A 400 or 409: an aborted transaction, or a refusal that ran nothing.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Refused {
    Aborted(AbortedBody),
    Error(ErrorBody),
}

/// The error answers every route may give, for the document (`Errors` in each
/// handler's `responses`); [`crate::engine::TxnError`]'s `IntoResponse` and the token
/// check produce them.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // only its derived responses are used
pub enum Errors {
    /// Bad input (malformed JSON, unknown participant, a bad txn id or parameter); a
    /// transaction whose branch failed on the client's input is aborted.
    #[response(status = 400)]
    BadRequest(#[to_schema] Refused),
    /// Missing or wrong bearer token.
    #[response(status = 401)]
    Unauthorized(#[to_schema] ErrorBody),
    /// The admin API is closed (a client token is set, an admin token is not).
    #[response(status = 403)]
    Forbidden(#[to_schema] ErrorBody),
    /// Unknown transaction or endpoint.
    #[response(status = 404)]
    NotFound(#[to_schema] ErrorBody),
    /// The endpoint does not take this method.
    #[response(status = 405)]
    MethodNotAllowed(#[to_schema] ErrorBody),
    /// The transaction aborted (a branch failed or voted no), is still running, in
    /// doubt, or already committed.
    #[response(status = 409)]
    Conflict(#[to_schema] Refused),
    /// The body is larger than `max_body_bytes`.
    #[response(status = 413)]
    TooLarge(#[to_schema] ErrorBody),
    /// A limit was reached (open transactions, statements).
    #[response(status = 429)]
    Limit(#[to_schema] ErrorBody),
    /// The coordinator failed (its decision log).
    #[response(status = 500)]
    Internal(#[to_schema] ErrorBody),
    /// The coordinator cannot take transactions now (shutting down, log failed,
    /// recovering): retry later.
    #[response(status = 503)]
    Unavailable(#[to_schema] ErrorBody),
    /// The outcome is unknown (the answer was lost); ask `GET` later.
    #[response(status = 504)]
    OutcomeUnknown(#[to_schema] UnknownBody),
}

/// The document's frame; the paths come from the handlers (see [`crate::http`]).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "twopc coordinator",
        description = "Two-phase commit across PostgreSQL databases: one-shot and \
            interactive transactions, their outcomes, the operator's admin API, health \
            and metrics. Every request but /healthz carries `Authorization: Bearer` when \
            the coordinator has a client token; /v1/admin takes the admin token."
    ),
    // The types only error responses and query parameters name (the handlers' bodies
    // bring their own).
    components(schemas(
        ErrorBody, ErrorMessage, AbortedBody, AbortError, UnknownBody, Refused, ListState
    )),
    modifiers(&Bearer),
    tags(
        (name = "transactions", description = "The client API"),
        (name = "admin", description = "The operator's view and resolve (admin token)"),
        (name = "operations", description = "Health, metrics and this document"),
    )
)]
pub struct ApiDoc;

/// Adds the bearer scheme; a coordinator without tokens needs none, hence the empty
/// alternative.
struct Bearer;

impl utoipa::Modify for Bearer {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            utoipa::openapi::security::SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build(),
            ),
        );
        doc.security = Some(vec![
            SecurityRequirement::default(),
            SecurityRequirement::new("bearer", Vec::<String>::new()),
        ]);
    }
}
