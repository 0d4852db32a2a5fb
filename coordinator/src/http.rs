//! The client API: HTTP/JSON over [`Engine`].
//!
//! Every error is a JSON body `{"error": {"message", ...}}` with a 4xx/5xx status; an
//! aborted transaction is `{"txn_id", "outcome": "aborted", "error": {"participant",
//! "code", "message"}}` with 409 (400 when the client's input was at fault).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use twopc_shared::gid::validate_txn_id;
use twopc_shared::msg::Statement;

use crate::engine::{AckMode, Begun, Engine, ResolveAction, TxnError, TxnRequest};
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

fn routes(engine: Engine, config: &HttpConfig) -> Router {
    Router::new()
        .route("/v1/transactions", post(create_txn).get(list_txns))
        .route("/v1/transactions/{id}", get(get_txn))
        .route("/v1/transactions/{id}/statements", post(statement))
        .route("/v1/transactions/{id}/commit", post(commit))
        .route("/v1/transactions/{id}/rollback", post(rollback))
        .route("/v1/admin/txns", get(admin_list))
        .route("/v1/admin/txns/{id}", get(admin_show))
        .route("/v1/admin/txns/{id}/resolve", post(admin_resolve))
        .route("/v1/admin/recover", post(admin_recover))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .with_state(engine)
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": { "message": message } }))).into_response()
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
            } => (
                StatusCode::GATEWAY_TIMEOUT,
                Json(json!({
                    "txn_id": txn_id,
                    "gid": gid,
                    "outcome": "unknown",
                    "error": { "message": message },
                })),
            )
                .into_response(),
            TxnError::Aborted(info) => {
                let status = if info.client_fault {
                    StatusCode::BAD_REQUEST
                } else {
                    StatusCode::CONFLICT
                };
                (
                    status,
                    Json(json!({
                        "txn_id": info.txn_id,
                        "outcome": "aborted",
                        "error": {
                            "participant": info.participant,
                            "code": info.code,
                            "message": info.message,
                        }
                    })),
                )
                    .into_response()
            }
        }
    }
}

/// Parses a JSON body whatever its content type; an empty body reads as `{}`.
#[allow(clippy::result_large_err)] // axum responses are large; errors are rare
fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, Response> {
    let bytes: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("malformed JSON body: {e}")))
}

#[allow(clippy::result_large_err)]
fn check_path_id(id: &str) -> Result<(), Response> {
    validate_txn_id(id).map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))
}

async fn create_txn(State(engine): State<Engine>, body: Bytes) -> Response {
    let req: TxnRequest = match parse_body(&body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    if req.branches.is_some() {
        match engine.run(req).await {
            Ok(c) => (StatusCode::OK, Json(c)).into_response(),
            Err(e) => e.into_response(),
        }
    } else {
        if req.ack.is_some() {
            return error(
                StatusCode::BAD_REQUEST,
                "ack is given at commit for an interactive transaction".into(),
            );
        }
        match engine.begin(req).await {
            Ok(Begun::Active(txn_id)) => (
                StatusCode::CREATED,
                Json(json!({ "txn_id": txn_id, "state": "active" })),
            )
                .into_response(),
            Ok(Begun::Replayed(c)) => (StatusCode::OK, Json(c)).into_response(),
            Err(e) => e.into_response(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StatementRequest {
    participant: String,
    sql: String,
    #[serde(default)]
    params: Vec<Value>,
}

async fn statement(State(engine): State<Engine>, Path(id): Path<String>, body: Bytes) -> Response {
    if let Err(r) = check_path_id(&id) {
        return r;
    }
    let req: StatementRequest = match parse_body(&body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let stmt = Statement {
        sql: req.sql,
        params: req.params,
    };
    match engine.statement(&id, &req.participant, stmt).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitRequest {
    ack: Option<AckMode>,
}

async fn commit(State(engine): State<Engine>, Path(id): Path<String>, body: Bytes) -> Response {
    if let Err(r) = check_path_id(&id) {
        return r;
    }
    let req: CommitRequest = match parse_body(&body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    match engine.commit(&id, req.ack).await {
        Ok(c) => Json(c).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn rollback(State(engine): State<Engine>, Path(id): Path<String>) -> Response {
    if let Err(r) = check_path_id(&id) {
        return r;
    }
    match engine.rollback(&id).await {
        Ok(()) => Json(json!({ "txn_id": id, "outcome": "aborted" })).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn get_txn(State(engine): State<Engine>, Path(id): Path<String>) -> Response {
    if let Err(r) = check_path_id(&id) {
        return r;
    }
    Json(engine.status_settled(&id).await).into_response()
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    state: Option<String>,
    /// Without `state`: how many transactions to list (default 100, at most 1000).
    limit: Option<usize>,
}

/// Most transactions `GET /v1/transactions` lists without a filter.
const LIST_LIMIT_MAX: usize = 1000;

async fn list_txns(
    State(engine): State<Engine>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    match q.state.as_deref() {
        None => {
            let limit = q.limit.unwrap_or(100);
            if limit == 0 || limit > LIST_LIMIT_MAX {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("limit must be between 1 and {LIST_LIMIT_MAX}"),
                );
            }
            Json(json!({ "transactions": engine.recent(limit) })).into_response()
        }
        Some("in_doubt") => {
            // Decided but not acknowledged everywhere (from the log), then prepared
            // branches that recovery has yet to roll back.
            let mut list: Vec<Value> = engine
                .in_doubt()
                .into_iter()
                .filter_map(|e| serde_json::to_value(e).ok())
                .collect();
            for v in engine.inspect_all().await {
                if v.decision == "committed" || v.decision == "running" {
                    continue;
                }
                let on: Vec<&str> = v
                    .branches
                    .iter()
                    .filter(|b| b.prepared.is_some())
                    .map(|b| b.participant.as_str())
                    .collect();
                if on.is_empty() {
                    continue;
                }
                list.push(json!({
                    "txn_id": v.txn_id.clone().unwrap_or_else(|| v.gid.clone()),
                    "gid": v.gid,
                    "state": "prepared_awaiting_recovery",
                    "pending": on,
                    "age_ms": v.age_ms,
                }));
            }
            Json(json!({ "transactions": list })).into_response()
        }
        Some(other) => error(
            StatusCode::BAD_REQUEST,
            format!(
                "unsupported state filter {other:?}: use ?state=in_doubt, or no filter for \
                 the latest transactions (?limit=N)"
            ),
        ),
    }
}

async fn admin_list(State(engine): State<Engine>) -> Response {
    Json(json!({ "transactions": engine.inspect_all().await })).into_response()
}

async fn admin_show(State(engine): State<Engine>, Path(id): Path<String>) -> Response {
    match engine.inspect(&id).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolveRequest {
    action: ResolveAction,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    force: bool,
}

async fn admin_resolve(
    State(engine): State<Engine>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let req: ResolveRequest = match parse_body(&body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    match engine
        .resolve(&id, req.action, req.dry_run, req.force)
        .await
    {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn admin_recover(State(engine): State<Engine>) -> Response {
    Json(engine.recover_once().await).into_response()
}

/// Liveness and readiness: 503 when the coordinator cannot take transactions (the
/// `reasons` say why); each participant with whether its latest call got an answer and
/// since when.
async fn healthz(State(engine): State<Engine>) -> Response {
    let reasons = engine.not_ready();
    let now = std::time::SystemTime::now();
    let participants: Vec<Value> = engine
        .participants()
        .into_iter()
        .map(|p| {
            let reach = p.health().reach();
            json!({
                "name": p.name(),
                "reachable": reach.reachable,
                "since_unix_ms": unix_ms(reach.since),
                "for_ms": now.duration_since(reach.since).map(|d| d.as_millis() as u64).unwrap_or(0),
            })
        })
        .collect();
    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if reasons.is_empty() { "ok" } else { "unavailable" },
        "reasons": reasons,
        "coordinator_id": engine.config().coordinator_id,
        "epoch": engine.epoch(),
        "version": twopc_shared::BUILD_VERSION,
        "uptime_s": engine.uptime().as_secs(),
        "open_txns": engine.open_txns(),
        "max_open_txns": engine.config().max_open_txns,
        "recovery_passes": engine.counters().recovery_passes.load(Ordering::Relaxed),
        "participants": participants,
    });
    (status, Json(body)).into_response()
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
