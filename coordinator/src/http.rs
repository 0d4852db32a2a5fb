//! The client API: HTTP/JSON over [`Engine`].
//!
//! Every error is a JSON body `{"error": {"message", ...}}` with a 4xx/5xx status; an
//! aborted transaction is `{"txn_id", "outcome": "aborted", "error": {"participant",
//! "code", "message"}}` with 409 (400 when the client's input was at fault).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use twopc_shared::gid::validate_txn_id;
use twopc_shared::msg::Statement;
use utoipa::openapi::OpenApi;
use utoipa::{IntoParams, OpenApi as _, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::{
    AbortError, AbortedBody, AdminListBody, ApiDoc, BegunBody, DecisionName, ErrorBody,
    ErrorMessage, Errors, HealthBody, HealthStatus, InDoubtState, ListBody, ListState, Listed,
    ParticipantHealth, RolledBackBody, TxnOutcome, TxnState, UnknownBody,
};
use crate::engine::{
    AckMode, Begun, Committed, Engine, InDoubtEntry, RecoveryReport, ResolveAction, ResolveReport,
    TxnError, TxnRequest, TxnStatus, TxnView,
};
use crate::participant::CallErrorKind;

#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Bearer token every request but `/healthz` and `/v1/admin` must carry; `None`: no
    /// authentication.
    pub api_token: Option<String>,
    /// Bearer token `/v1/admin` (operator resolve and recovery) must carry. The client
    /// token never opens it: with a client token and no admin token, the admin API is
    /// closed (403).
    pub admin_token: Option<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body_bytes: 1024 * 1024,
            api_token: None,
            admin_token: None,
        }
    }
}

/// Reads a token file: the first line, trimmed; refuses an empty or short token.
pub fn read_token_file(path: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read API token file {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    anyhow::ensure!(
        token.len() >= 16,
        "API token in {} is shorter than 16 characters",
        path.display()
    );
    Ok(token)
}

/// Compares in time independent of where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The tokens the API checks (see [`HttpConfig`]).
#[derive(Debug)]
struct Tokens {
    api: Option<String>,
    admin: Option<String>,
}

async fn require_token(
    axum::extract::State(tokens): axum::extract::State<std::sync::Arc<Tokens>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    if path == "/healthz" {
        return next.run(req).await;
    }
    let admin = path == "/v1/admin" || path.starts_with("/v1/admin/");
    let needed = match (admin, &tokens.api, &tokens.admin) {
        (true, _, Some(t)) | (false, Some(t), _) => t,
        (false, None, _) => return next.run(req).await,
        (true, Some(_), None) => {
            return error(
                StatusCode::FORBIDDEN,
                "the admin API is closed: start the coordinator with --admin-token-file \
                 (the client token does not open it)"
                    .into(),
            )
        }
        (true, None, None) => return next.run(req).await,
    };
    let presented = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(p) if constant_time_eq(p.as_bytes(), needed.as_bytes()) => next.run(req).await,
        _ => error(
            StatusCode::UNAUTHORIZED,
            format!(
                "missing or wrong bearer token (Authorization: Bearer ...; {} token)",
                if admin { "the admin" } else { "the client" }
            ),
        ),
    }
}

pub fn router(engine: Engine, config: HttpConfig) -> Router {
    let app = routes(engine, &config);
    if config.api_token.is_none() && config.admin_token.is_none() {
        return app;
    }
    let tokens = Tokens {
        api: config.api_token,
        admin: config.admin_token,
    };
    app.layer(axum::middleware::from_fn_with_state(
        std::sync::Arc::new(tokens),
        require_token,
    ))
}

/// Every route, and the OpenAPI document of the very same handlers (`routes!` reads
/// each handler's `#[utoipa::path]`): a route cannot be added without being documented.
fn api_routes() -> (Router<Engine>, OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(create_txn, list_txns))
        .routes(routes!(get_txn))
        .routes(routes!(statement))
        .routes(routes!(commit))
        .routes(routes!(rollback))
        .routes(routes!(admin_list))
        .routes(routes!(admin_show))
        .routes(routes!(admin_resolve))
        .routes(routes!(admin_recover))
        .routes(routes!(healthz))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .split_for_parts()
}

/// The API's OpenAPI 3 document, as `GET /v1/openapi.json` serves it.
pub fn openapi() -> OpenApi {
    versioned(api_routes().1)
}

fn versioned(mut doc: OpenApi) -> OpenApi {
    doc.info.version = twopc_shared::BUILD_VERSION.to_owned();
    doc
}

fn routes(engine: Engine, config: &HttpConfig) -> Router {
    // One build of the routes gives both the router and its document.
    let (router, doc) = api_routes();
    let doc = Arc::new(versioned(doc));
    router
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint (see /v1/openapi.json)".into(),
            )
        })
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .with_state(engine)
        .layer(axum::Extension(doc))
}

fn error(status: StatusCode, message: String) -> Response {
    let body = ErrorBody {
        error: ErrorMessage { message },
    };
    (status, Json(body)).into_response()
}

impl IntoResponse for TxnError {
    fn into_response(self) -> Response {
        match self {
            TxnError::BadRequest(m) => error(StatusCode::BAD_REQUEST, m),
            e @ TxnError::UnknownParticipant(_) => error(StatusCode::BAD_REQUEST, e.to_string()),
            e @ TxnError::UnknownTxn(_) => error(StatusCode::NOT_FOUND, e.to_string()),
            TxnError::Conflict(m) => error(StatusCode::CONFLICT, m),
            e @ TxnError::AlreadyCommitted(_) => error(StatusCode::CONFLICT, e.to_string()),
            TxnError::Limit(m) => error(StatusCode::TOO_MANY_REQUESTS, m),
            TxnError::Internal(m) => error(StatusCode::INTERNAL_SERVER_ERROR, m),
            TxnError::Unavailable(m) => error(StatusCode::SERVICE_UNAVAILABLE, m),
            TxnError::OutcomeUnknown {
                txn_id,
                gid,
                message,
            } => {
                let body = UnknownBody {
                    txn_id,
                    gid,
                    outcome: TxnOutcome::Unknown,
                    error: ErrorMessage { message },
                };
                (StatusCode::GATEWAY_TIMEOUT, Json(body)).into_response()
            }
            TxnError::Aborted(info) => {
                let status = if info.client_fault {
                    StatusCode::BAD_REQUEST
                } else {
                    StatusCode::CONFLICT
                };
                let body = AbortedBody {
                    txn_id: info.txn_id,
                    outcome: TxnOutcome::Aborted,
                    error: AbortError {
                        participant: info.participant,
                        code: info.code,
                        message: info.message,
                    },
                };
                (status, Json(body)).into_response()
            }
        }
    }
}

/// Parses a JSON body whatever its content type; an empty body reads as `{}`. A body
/// that could not be read (over `max_body_bytes`: 413) is a JSON error like any other.
#[allow(clippy::result_large_err)] // axum responses are large; errors are rare
fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, Response> {
    let body = body.map_err(|e| error(e.status(), e.body_text()))?;
    let bytes: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &body
    };
    serde_json::from_slice(bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("malformed JSON body: {e}")))
}

/// The `{id}` of a path, its rejection a JSON error like any other.
struct PathId(String);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<PathId, Response> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| PathId(id))
            .map_err(|e: PathRejection| error(e.status(), e.body_text()))
    }
}

/// The `{id}` of a client route: a txn id, checked.
#[allow(clippy::result_large_err)]
fn txn_id_of(id: PathId) -> Result<String, Response> {
    validate_txn_id(&id.0).map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(id.0)
}

/// A client route's txn id and its JSON body.
#[allow(clippy::result_large_err)]
fn txn_id_and_body<T: DeserializeOwned>(
    id: PathId,
    body: Result<Bytes, BytesRejection>,
) -> Result<(String, T), Response> {
    Ok((txn_id_of(id)?, parse_body(body)?))
}

/// Runs a one-shot transaction (with `branches`) or begins an interactive one (without).
#[utoipa::path(post, path = "/v1/transactions", tag = "transactions",
    request_body = TxnRequest,
    responses(
        (status = 200, description = "Committed (or, `replayed`, a retry of a committed txn id: nothing ran)", body = Committed,
            links(("status" = (operation_id = "get_txn", parameters(("id" = "$response.body#/txn_id")))))),
        (status = 201, description = "An interactive transaction began", body = BegunBody,
            links(
                ("statement" = (operation_id = "statement",
                    parameters(("id" = "$response.body#/txn_id")),
                    request_body = json!({"participant": "a", "sql": "SELECT 1", "params": []}))),
                ("commit" = (operation_id = "commit", parameters(("id" = "$response.body#/txn_id")))),
                ("rollback" = (operation_id = "rollback", parameters(("id" = "$response.body#/txn_id")))),
                ("status" = (operation_id = "get_txn", parameters(("id" = "$response.body#/txn_id")))),
            )),
        Errors,
    ))]
async fn create_txn(State(engine): State<Engine>, body: Result<Bytes, BytesRejection>) -> Response {
    let req: TxnRequest = match parse_body(body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    if req.branches.is_some() {
        return answer(engine.run(req).await);
    }
    if req.ack.is_some() {
        return error(
            StatusCode::BAD_REQUEST,
            "ack is given at commit for an interactive transaction".into(),
        );
    }
    match engine.begin(req).await {
        Ok(Begun::Active(txn_id)) => {
            let body = BegunBody {
                txn_id,
                state: TxnState::Active,
            };
            (StatusCode::CREATED, Json(body)).into_response()
        }
        Ok(Begun::Replayed(c)) => Json(c).into_response(),
        Err(e) => e.into_response(),
    }
}

/// 200 with the engine's answer, or its error.
fn answer<T: serde::Serialize>(r: Result<T, TxnError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// One statement of an interactive transaction.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct StatementRequest {
    participant: String,
    sql: String,
    /// Positional parameters (`$1`, ...), bound to the types PostgreSQL reports.
    #[serde(default)]
    params: Vec<Value>,
}

/// Runs one statement of interactive transaction `id` on one participant.
#[utoipa::path(post, path = "/v1/transactions/{id}/statements", tag = "transactions",
    params(("id" = String, Path, description = "The txn id", pattern = "^(?!\\.+$)[A-Za-z0-9_.-]{1,128}$")),
    request_body = StatementRequest,
    responses((status = 200, description = "The statement ran", body = twopc_shared::msg::StmtResult), Errors))]
async fn statement(
    State(engine): State<Engine>,
    id: PathId,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (id, req): (String, StatementRequest) = match txn_id_and_body(id, body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let stmt = Statement {
        sql: req.sql,
        params: req.params,
    };
    answer(engine.statement(&id, &req.participant, stmt).await)
}

/// A commit's options (the body may be empty).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CommitRequest {
    ack: Option<AckMode>,
}

/// Commits interactive transaction `id` (again after a lost answer: `replayed`).
#[utoipa::path(post, path = "/v1/transactions/{id}/commit", tag = "transactions",
    params(("id" = String, Path, description = "The txn id", pattern = "^(?!\\.+$)[A-Za-z0-9_.-]{1,128}$")),
    request_body = Option<CommitRequest>,
    responses((status = 200, description = "Committed", body = Committed), Errors))]
async fn commit(
    State(engine): State<Engine>,
    id: PathId,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (id, req): (String, CommitRequest) = match txn_id_and_body(id, body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    answer(engine.commit(&id, req.ack).await)
}

/// Rolls back interactive transaction `id`.
#[utoipa::path(post, path = "/v1/transactions/{id}/rollback", tag = "transactions",
    params(("id" = String, Path, description = "The txn id", pattern = "^(?!\\.+$)[A-Za-z0-9_.-]{1,128}$")),
    responses((status = 200, description = "Rolled back", body = RolledBackBody), Errors))]
async fn rollback(State(engine): State<Engine>, id: PathId) -> Response {
    let id = match txn_id_of(id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let r = engine.rollback(&id).await.map(|()| RolledBackBody {
        txn_id: id.clone(),
        outcome: TxnOutcome::Aborted,
    });
    answer(r)
}

/// What happened to `id`: its state while it runs, then its outcome (also after a
/// restart, from the log; unknown to the log and not live: presumed abort).
#[utoipa::path(get, path = "/v1/transactions/{id}", tag = "transactions",
    params(("id" = String, Path, description = "The txn id", pattern = "^(?!\\.+$)[A-Za-z0-9_.-]{1,128}$")),
    responses((status = 200, description = "Its state or outcome", body = TxnStatus), Errors))]
async fn get_txn(State(engine): State<Engine>, id: PathId) -> Response {
    match txn_id_of(id) {
        Ok(id) => Json(engine.status_settled(&id).await).into_response(),
        Err(r) => r,
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Only transactions in this state; without it, the latest transactions.
    state: Option<ListState>,
    /// Without `state`: how many transactions to list (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// Most transactions `GET /v1/transactions` lists without a filter.
const LIST_LIMIT_MAX: usize = 1000;

/// The latest transactions (running, then finished, newest first), or those in doubt.
#[utoipa::path(get, path = "/v1/transactions", tag = "transactions",
    params(ListQuery),
    responses((status = 200, description = "The transactions", body = ListBody), Errors))]
async fn list_txns(
    State(engine): State<Engine>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => {
            let message = format!(
                "{}: use ?state=in_doubt, or no filter for the latest transactions \
                 (?limit=N)",
                e.body_text()
            );
            return error(StatusCode::BAD_REQUEST, message);
        }
    };
    let transactions = match q.state {
        None => {
            let limit = q.limit.unwrap_or(100);
            if limit == 0 || limit > LIST_LIMIT_MAX {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("limit must be between 1 and {LIST_LIMIT_MAX}"),
                );
            }
            engine
                .recent(limit)
                .into_iter()
                .map(Listed::Status)
                .collect()
        }
        Some(ListState::InDoubt) => in_doubt_listing(&engine).await,
    };
    Json(ListBody { transactions }).into_response()
}

/// Decided but not acknowledged everywhere (from the log), then prepared branches that
/// recovery has yet to roll back.
async fn in_doubt_listing(engine: &Engine) -> Vec<Listed> {
    let mut list: Vec<Listed> = engine.in_doubt().into_iter().map(Listed::InDoubt).collect();
    for v in engine.inspect_all().await {
        if matches!(v.decision, DecisionName::Committed | DecisionName::Running) {
            continue;
        }
        let pending: Vec<String> = v
            .branches
            .iter()
            .filter(|b| b.prepared.is_some())
            .map(|b| b.participant.clone())
            .collect();
        if pending.is_empty() {
            continue;
        }
        list.push(Listed::InDoubt(InDoubtEntry {
            txn_id: v.txn_id.clone().unwrap_or_else(|| v.gid.clone()),
            gid: v.gid,
            state: InDoubtState::PreparedAwaitingRecovery,
            pending,
            age_ms: v.age_ms.unwrap_or(0),
        }));
    }
    list
}

/// The operator's view: every GID some participant holds prepared or the log has not
/// finished, with the log's decision beside each participant's `pg_prepared_xacts` row.
#[utoipa::path(get, path = "/v1/admin/txns", tag = "admin",
    responses((status = 200, description = "Every open GID", body = AdminListBody), Errors))]
async fn admin_list(State(engine): State<Engine>) -> Response {
    let transactions = engine.inspect_all().await;
    Json(AdminListBody { transactions }).into_response()
}

/// The operator's view of one GID (or of a txn id's latest attempt).
#[utoipa::path(get, path = "/v1/admin/txns/{id}", tag = "admin",
    params(("id" = String, Path, description = "A GID or a txn id")),
    responses((status = 200, description = "What the log and the participants say", body = TxnView), Errors))]
async fn admin_show(State(engine): State<Engine>, id: PathId) -> Response {
    answer(engine.inspect(&id.0).await)
}

/// An operator's resolve of one GID.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ResolveRequest {
    action: ResolveAction,
    /// Say what would be done, do nothing.
    #[serde(default)]
    dry_run: bool,
    /// Contradict the log's decision (or commit a GID with none).
    #[serde(default)]
    force: bool,
}

/// Commits or rolls back a GID by hand; refuses to contradict the log without `force`.
#[utoipa::path(post, path = "/v1/admin/txns/{id}/resolve", tag = "admin",
    params(("id" = String, Path, description = "The GID")),
    request_body = ResolveRequest,
    responses((status = 200, description = "What was (or would be) done", body = ResolveReport), Errors))]
async fn admin_resolve(
    State(engine): State<Engine>,
    id: PathId,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let req: ResolveRequest = match parse_body(body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    answer(
        engine
            .resolve(&id.0, req.action, req.dry_run, req.force)
            .await,
    )
}

/// Runs one recovery pass now.
#[utoipa::path(post, path = "/v1/admin/recover", tag = "admin",
    responses((status = 200, description = "What the pass did", body = RecoveryReport), Errors))]
async fn admin_recover(State(engine): State<Engine>) -> Response {
    Json(engine.recover_once().await).into_response()
}

/// Liveness and readiness: 503 when the coordinator cannot take transactions (the
/// `reasons` say why); each participant with whether its latest call got an answer and
/// since when.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses(
        (status = 200, description = "Takes transactions", body = HealthBody),
        (status = 503, description = "Cannot take transactions (see reasons)", body = HealthBody),
    ))]
async fn healthz(State(engine): State<Engine>) -> Response {
    let reasons = engine.not_ready();
    let now = std::time::SystemTime::now();
    let participants = engine
        .participants()
        .into_iter()
        .map(|p| {
            let reach = p.health().reach();
            ParticipantHealth {
                name: p.name().to_owned(),
                reachable: reach.reachable,
                since_unix_ms: unix_ms(reach.since),
                for_ms: now
                    .duration_since(reach.since)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
            }
        })
        .collect();
    let (status, health) = if reasons.is_empty() {
        (StatusCode::OK, HealthStatus::Ok)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, HealthStatus::Unavailable)
    };
    let body = HealthBody {
        status: health,
        reasons,
        coordinator_id: engine.config().coordinator_id.clone(),
        epoch: engine.epoch(),
        version: twopc_shared::BUILD_VERSION.to_owned(),
        uptime_s: engine.uptime().as_secs(),
        open_txns: engine.open_txns(),
        max_open_txns: engine.config().max_open_txns,
        recovery_passes: engine.counters().recovery_passes.load(Ordering::Relaxed),
        participants,
    };
    (status, Json(body)).into_response()
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "operations",
    responses((status = 200, description = "The API's OpenAPI 3 document", body = Object), Errors))]
async fn openapi_json(axum::Extension(doc): axum::Extension<Arc<OpenApi>>) -> Response {
    Json(doc.as_ref()).into_response()
}

fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Prometheus text, one family at a time.
#[derive(Default)]
struct Metrics(String);

impl Metrics {
    /// A family's HELP and TYPE lines.
    fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Metrics {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
        self
    }

    /// One sample; `labels` is `k="v",...` or empty.
    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) -> &mut Metrics {
        match labels {
            "" => writeln!(self.0, "{name} {value}"),
            _ => writeln!(self.0, "{name}{{{labels}}} {value}"),
        }
        .ok();
        self
    }

    /// A family with one unlabelled sample.
    fn one(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help).sample(name, "", value);
    }
}

fn seconds(ms: u64) -> String {
    format!("{:.3}", ms as f64 / 1000.0)
}

/// The per-participant families of `/metrics` (label `participant`).
fn participant_metrics(m: &mut Metrics, engine: &Engine) {
    let participants = engine.participants();
    let oldest = engine.oldest_in_doubt_ms();
    let label = |p: &crate::participant::Participant| format!("participant=\"{}\"", p.name());
    m.family(
        "twopc_participant_reachable",
        "gauge",
        "1 if the participant answered its latest call, 0 if it did not (no sample before the first call ends).",
    );
    for p in &participants {
        if let Some(up) = p.health().reach().reachable {
            m.sample("twopc_participant_reachable", &label(p), u8::from(up));
        }
    }
    m.family(
        "twopc_participant_calls_total",
        "counter",
        "Calls to the participant's agent.",
    );
    for p in &participants {
        m.sample(
            "twopc_participant_calls_total",
            &label(p),
            p.health().calls(),
        );
    }
    m.family(
        "twopc_participant_call_errors_total",
        "counter",
        "Calls that got no answer, by kind.",
    );
    for p in &participants {
        for kind in CallErrorKind::ALL {
            let labels = format!("{},kind=\"{}\"", label(p), kind.name());
            m.sample(
                "twopc_participant_call_errors_total",
                &labels,
                p.health().errors(kind),
            );
        }
    }
    m.family(
        "twopc_participant_prepared_branches",
        "gauge",
        "Prepared branches of this coordinator in the participant's latest recovery listing.",
    );
    for p in &participants {
        m.sample(
            "twopc_participant_prepared_branches",
            &label(p),
            p.health().prepared(),
        );
    }
    m.family(
        "twopc_participant_oldest_in_doubt_seconds",
        "gauge",
        "Age of the oldest committed transaction the participant has not acknowledged (0: none).",
    );
    for p in &participants {
        let ms = oldest.get(p.name()).copied().unwrap_or(0);
        m.sample(
            "twopc_participant_oldest_in_doubt_seconds",
            &label(p),
            seconds(ms),
        );
    }
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text", body = String, content_type = "text/plain"), Errors))]
async fn metrics(State(engine): State<Engine>) -> Response {
    let c = engine.counters();
    let log = engine.log().stats();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut m = Metrics::default();
    for (name, help, value) in [
        (
            "twopc_txns_committed_total",
            "Transactions committed.",
            load(&c.committed),
        ),
        (
            "twopc_txns_committed_one_phase_total",
            "Transactions committed without a forced decision record.",
            load(&c.committed_one_phase),
        ),
        (
            "twopc_txns_committed_last_agent_total",
            "Transactions whose decision was the last participant's own commit.",
            load(&c.committed_last_agent),
        ),
        (
            "twopc_txns_aborted_total",
            "Transactions rolled back.",
            load(&c.aborted),
        ),
        (
            "twopc_read_only_branches_total",
            "Branches that voted read-only.",
            load(&c.read_only_branches),
        ),
        (
            "twopc_phase2_retries_total",
            "COMMIT PREPARED attempts that were not acknowledged.",
            load(&c.phase2_retries),
        ),
        (
            "twopc_recovery_passes_total",
            "Recovery passes completed.",
            load(&c.recovery_passes),
        ),
        (
            "twopc_recovery_failures_total",
            "Recovery passes that could not ask some participant.",
            load(&c.recovery_failures),
        ),
        (
            "twopc_log_records_total",
            "Decision log records written.",
            log.records,
        ),
        (
            "twopc_log_fsyncs_total",
            "Decision log fdatasync calls.",
            log.fsyncs,
        ),
        (
            "twopc_log_bytes_total",
            "Decision log bytes written.",
            log.bytes_written,
        ),
    ] {
        m.one(name, "counter", help, value);
    }
    m.one(
        "twopc_recovery_pass_seconds_total",
        "counter",
        "Time spent in recovery passes.",
        seconds(load(&c.recovery_pass_ms_total)),
    );
    m.one(
        "twopc_recovery_last_pass_seconds",
        "gauge",
        "How long the latest recovery pass took.",
        seconds(load(&c.recovery_pass_ms_last)),
    );
    m.one(
        "twopc_txns_open",
        "gauge",
        "Transactions running now.",
        engine.open_txns(),
    );
    m.one(
        "twopc_txns_open_limit",
        "gauge",
        "Transactions that may be open at once (max_open_txns); more get 429.",
        engine.config().max_open_txns,
    );
    m.one(
        "twopc_txns_in_doubt",
        "gauge",
        "Committed transactions not yet acknowledged everywhere.",
        engine.in_doubt().len(),
    );
    m.one(
        "twopc_ready",
        "gauge",
        "1 if the coordinator takes transactions (/healthz answers 200), else 0.",
        u8::from(engine.not_ready().is_empty()),
    );
    participant_metrics(&mut m, &engine);
    (
        StatusCode::OK,
        [("content-type", "text/plain; version=0.0.4")],
        m.0,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `$ref` in `v`.
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r);
                }
                m.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn every_schema_the_document_names_is_in_it() {
        let doc = serde_json::to_value(openapi()).unwrap();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let mut named = Vec::new();
        refs(&doc, &mut named);
        assert!(named.len() > 20, "{named:?}");
        for r in named {
            let name = r.strip_prefix("#/components/schemas/").unwrap();
            assert!(schemas.contains_key(name), "{r} is not in the document");
        }
    }

    #[test]
    fn the_document_is_openapi_3_with_a_version() {
        let doc = serde_json::to_value(openapi()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
        assert_eq!(doc["info"]["version"], twopc_shared::BUILD_VERSION);
    }
}
