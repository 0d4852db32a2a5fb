//! The transaction engine: runs client transactions across participants with two-phase
//! commit, presumed abort.
//!
//! One transaction goes: branches execute and PREPARE (in parallel) → every vote YES or
//! READ-ONLY → the COMMIT record is forced to the decision log → COMMIT PREPARED on every
//! YES voter (phase 2, retried until acknowledged) → END record (lazy). Any NO vote,
//! error, timeout or unreachable participant before the decision → ROLLBACK everywhere,
//! with nothing logged (presumed abort).
//!
//! Invariant 1 lives in [`Engine::decide_and_commit`]: no `CommitPrepared` is sent before
//! `append_forced(Commit)` has returned.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn, Instrument};
use twopc_core::backoff::Backoff;
use twopc_core::commit::{self, Commit, CommitAnswer, Effect, Timer, Vote};
use twopc_core::last_agent::{self, LastAgent, LastAnswer, SettledAction};
use twopc_core::mutation::Mutations;
use twopc_core::outcomes::{self, Admission, Outcome, Outcomes};
use twopc_core::recovery::{
    in_doubt_after_replay, prepared_branch_action, BranchAction, Incarnation, Known, Listed,
    Replayed,
};
use twopc_core::resolve::{self, Decision as Logged, Refusal};
use twopc_shared::gid::{gid_prefix, validate_txn_id, Gid};
use twopc_shared::msg::{
    AgentError, BranchOutcome, CommitAck, Decision, ErrorKind, ExecuteBranch, Finish, Isolation,
    Request, Response, Statement, StmtResult, FORGET_MAX_GIDS, LIST_DECISIONS_MAX,
};

use crate::api::{DecisionName, InDoubtState, TxnOutcome, TxnState as State};
use crate::decision_log::{DecisionLog, LogError, Record, Replay};
use crate::participant::{describe, CallError, Participant};

/// When the client gets its answer for a committed transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AckMode {
    /// After every participant acknowledged COMMIT PREPARED (bounded by `commit_wait_ms`;
    /// the answer lists the participants still pending).
    #[default]
    Applied,
    /// As soon as the decision is durable; phase 2 runs in the background.
    Durable,
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub coordinator_id: String,
    /// One-phase commit when a single participant is involved (no PREPARE, no log).
    pub one_phase: bool,
    /// Read-only branches vote READ-ONLY and drop out of phase 2.
    pub read_only: bool,
    /// Fan out to participants in parallel (otherwise one after another).
    pub parallel: bool,
    pub default_ack: AckMode,
    /// `applied` mode waits at most this long for acknowledgements.
    pub commit_wait_ms: u64,
    /// Transaction lifetime when the client gives none.
    pub default_timeout_ms: u64,
    /// Longest lifetime a client may ask for.
    pub max_timeout_ms: u64,
    /// An interactive transaction with no statement for this long is rolled back.
    pub idle_timeout_ms: u64,
    /// Deadline of one phase-2 or abort call to an agent.
    pub call_timeout_ms: u64,
    /// Phase-2 retry backoff bounds.
    pub retry_min_ms: u64,
    pub retry_max_ms: u64,
    pub max_open_txns: usize,
    pub max_statements_per_txn: usize,
    /// Outcomes of finished transactions stay answerable in memory this long.
    pub outcome_retention_ms: u64,
    /// How often recovery asks every participant for prepared branches of ours.
    pub recovery_interval_ms: u64,
    /// Most outcomes kept in memory for `GET` (oldest forgotten first; ~100 bytes each).
    pub outcome_index_max: usize,
    /// Last-agent commit for one-shot transactions with two or more participants: all
    /// but one prepare, then the last commits with the decision in its own transaction
    /// (no forced record of ours, one round trip less). Needs the last participant's
    /// agent to keep a decision table.
    pub last_agent: bool,
}

impl EngineConfig {
    pub fn new(coordinator_id: impl Into<String>) -> EngineConfig {
        EngineConfig {
            coordinator_id: coordinator_id.into(),
            one_phase: true,
            read_only: true,
            parallel: true,
            default_ack: AckMode::Applied,
            commit_wait_ms: 5_000,
            default_timeout_ms: 30_000,
            max_timeout_ms: 600_000,
            idle_timeout_ms: 60_000,
            call_timeout_ms: 10_000,
            retry_min_ms: 50,
            retry_max_ms: 5_000,
            max_open_txns: 4096,
            max_statements_per_txn: 10_000,
            outcome_retention_ms: 3_600_000,
            recovery_interval_ms: 5_000,
            outcome_index_max: 1_000_000,
            last_agent: false,
        }
    }
}

/// Errors a client can tell apart (each maps to one HTTP status).
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    #[error("{0}")]
    BadRequest(String),
    #[error("unknown participant {0:?}")]
    UnknownParticipant(String),
    #[error("unknown transaction {0:?}")]
    UnknownTxn(String),
    #[error("{0}")]
    Conflict(String),
    /// The txn id committed: a retry answers its recorded outcome instead of running.
    #[error("txn_id {0:?} already committed; choose a new txn_id")]
    AlreadyCommitted(String),
    #[error("{0}")]
    Limit(String),
    /// The transaction was rolled back everywhere.
    #[error("transaction {} aborted: {}", .0.txn_id, .0.message)]
    Aborted(AbortInfo),
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    Unavailable(String),
    /// The commit's outcome could not be learnt in time (last-agent commit whose last
    /// participant did not answer, and could not be fenced yet). Recovery settles it;
    /// `GET` says `in_doubt` until then.
    #[error("transaction {txn_id}: outcome unknown: {message}")]
    OutcomeUnknown {
        txn_id: String,
        gid: String,
        message: String,
    },
}

/// Why a transaction aborted.
#[derive(Debug, Clone, Serialize)]
pub struct AbortInfo {
    pub txn_id: String,
    pub participant: Option<String>,
    /// SQLSTATE of the failure (for non-SQL failures the closest class: 08006 for an
    /// unreachable participant, 57014 for a timeout, 22023 for a bad parameter).
    pub code: Option<String>,
    pub message: String,
    /// The client's input was at fault (a bad parameter): answered with 400, not 409.
    #[serde(skip)]
    pub client_fault: bool,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct BranchResults {
    pub participant: String,
    pub results: Vec<StmtResult>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Committed {
    pub txn_id: String,
    pub outcome: TxnOutcome,
    pub branches: Vec<BranchResults>,
    /// Participants that had not acknowledged COMMIT PREPARED when the answer was sent
    /// (they will: phase 2 retries until they do).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<String>,
    /// The answer of a retry: its txn id had committed, nothing ran, and `branches` is
    /// empty (results are not recorded).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
}

/// What a `POST /v1/transactions` without branches did.
#[derive(Debug, Clone)]
pub enum Begun {
    /// The interactive transaction runs under this txn id.
    Active(String),
    /// Its txn id had committed: nothing runs, the recorded outcome answers.
    Replayed(Committed),
}

#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BranchSpec {
    pub participant: String,
    pub statements: Vec<Statement>,
}

/// `POST /v1/transactions`: with `branches`, a one-shot transaction; without, the begin
/// of an interactive one.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"txn_id": "transfer-1", "branches": [
    {"participant": "a", "statements": [
        {"sql": "UPDATE acct SET bal = bal - $1 WHERE id = $2", "params": [5, 1]}]},
    {"participant": "b", "statements": [
        {"sql": "UPDATE acct SET bal = bal + $1 WHERE id = $2", "params": [5, 1]}]}]}))]
pub struct TxnRequest {
    /// The client's id for the transaction (generated if absent); a retry with the id
    /// of a committed transaction answers its outcome and runs nothing.
    #[schema(pattern = "^(?!\\.+$)[A-Za-z0-9_.-]{1,128}$")]
    pub txn_id: Option<String>,
    pub branches: Option<Vec<BranchSpec>>,
    pub isolation: Option<Isolation>,
    /// The transaction's deadline: not prepared everywhere by then, it aborts.
    pub timeout_ms: Option<u64>,
    /// When a commit is answered (one-shot only; an interactive one gives it at commit).
    pub ack: Option<AckMode>,
}

/// What `GET /v1/transactions/{id}` answers.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TxnStatus {
    pub txn_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<State>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<TxnOutcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<String>,
    /// Why the outcome is `unknown`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub message: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct InDoubtEntry {
    pub txn_id: String,
    pub gid: String,
    /// `committed`: decided, waiting for acknowledgements; `unknown`: a last-agent
    /// commit whose outcome is not known yet (`pending` names the last agent).
    pub state: InDoubtState,
    pub pending: Vec<String>,
    pub age_ms: u64,
}

/// What a recovery pass did.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct RecoveryReport {
    /// Prepared branches of ours seen on the participants.
    pub prepared_seen: usize,
    pub rolled_back: usize,
    /// Participants that could not be asked.
    pub unreachable: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Active,
    Preparing,
    Committing,
}

impl Phase {
    fn state(self) -> State {
        match self {
            Phase::Active => State::Active,
            Phase::Preparing => State::Preparing,
            Phase::Committing => State::Committing,
        }
    }
}

/// A transaction of this incarnation that has not finished.
struct LiveTxn {
    txn_id: String,
    gid: Gid,
    isolation: Isolation,
    deadline: Instant,
    interactive: bool,
    /// Serializes the requests of one transaction.
    state: tokio::sync::Mutex<TxnState>,
    /// Mirror of `state.phase` readable without awaiting.
    phase: Mutex<Phase>,
}

struct TxnState {
    /// Participants with an open branch, in first-use order.
    branches: Vec<String>,
    statements: usize,
    last_activity: Instant,
    /// Set once the transaction ended; later requests find it gone.
    finished: bool,
}

/// What a last agent said about a last-agent transaction (answer to `Fence`).
#[derive(Debug, Clone)]
struct Settled {
    committed: bool,
    txn_id: String,
    participants: Vec<String>,
}

impl Settled {
    /// What the core's machine is told of it.
    fn row(self) -> last_agent::Settled {
        if self.committed {
            last_agent::Settled::Committed {
                participants: self.participants,
            }
        } else {
            last_agent::Settled::Aborted
        }
    }
}

/// A locally committed transaction (last-agent or one-phase) waiting to be settled.
#[derive(Debug, Clone)]
struct Unsettled {
    txn_id: String,
    /// The participant whose local commit decides it (its decision row).
    last: String,
}

/// Decision rows queued for deletion per agent, at most.
const FORGET_QUEUE_MAX: usize = 1_000_000;

struct InDoubt {
    txn_id: String,
    /// Phase 2: the core's machine (`twopc_core::commit`), its decision durable.
    phase2: Commit,
    decided_at: SystemTime,
}

impl InDoubt {
    /// The participants still to acknowledge, in a stable order for answers.
    fn pending_sorted(&self) -> Vec<String> {
        self.phase2.pending().cloned().collect()
    }
}

#[derive(Default)]
pub struct Counters {
    pub committed: AtomicU64,
    pub committed_one_phase: AtomicU64,
    /// Committed by a last agent's commit (no forced record of ours).
    pub committed_last_agent: AtomicU64,
    pub aborted: AtomicU64,
    pub read_only_branches: AtomicU64,
    pub phase2_retries: AtomicU64,
    /// Recovery passes completed.
    pub recovery_passes: AtomicU64,
    /// Recovery passes that could not ask some participant (list its branches or rows,
    /// or fence it).
    pub recovery_failures: AtomicU64,
    /// How long the latest recovery pass took, and all of them, in ms.
    pub recovery_pass_ms_last: AtomicU64,
    pub recovery_pass_ms_total: AtomicU64,
}

struct Inner {
    config: EngineConfig,
    epoch: u64,
    seq: AtomicU64,
    participants: HashMap<String, Participant>,
    log: DecisionLog,
    live: Mutex<HashMap<String, Arc<LiveTxn>>>,
    outcomes: Mutex<Outcomes<String>>,
    in_doubt: Mutex<HashMap<Gid, InDoubt>>,
    /// Transactions committed by one participant's local commit (last-agent or
    /// one-phase) whose outcome this incarnation could not learn (the participant
    /// neither answered nor could be fenced). Recovery fences them.
    unresolved: Mutex<HashMap<Gid, Unsettled>>,
    /// Decision rows to delete, per last agent: their transactions are finished.
    forget: Mutex<HashMap<String, VecDeque<Gid>>>,
    /// GIDs an operator aborted by hand (`Abort` records, from the log and this
    /// incarnation). They override any commit: a committed decision row of one is not
    /// adopted again (it is forgotten), and its prepared branches are rolled back.
    operator_aborted: Mutex<HashSet<Gid>>,
    /// Held by a whole recovery pass and by an operator's resolve: each checks what is
    /// decided and then acts on it, and neither may act between the other's check and
    /// act (a resolve's COMMIT of a GID a pass has just found undecided would split it).
    resolving: tokio::sync::Mutex<()>,
    /// Participants whose decision rows were read since this incarnation started (or
    /// that keep none): a transaction this coordinator does not know was not committed
    /// by one of them either. A client's txn id that is not known may not run again
    /// on a participant not read yet: its earlier attempt may have committed there.
    decisions_read: Mutex<HashSet<String>>,
    /// Every participant is in `decisions_read`: `GET` may presume abort.
    all_decisions_read: std::sync::atomic::AtomicBool,
    /// The log had deleted segments (past retention) before this incarnation opened
    /// it: a txn id unknown here may have committed in one of them.
    log_forgot: bool,
    /// Woken whenever `decisions_read` grows.
    decisions_notify: tokio::sync::Notify,
    counters: Counters,
    started: Instant,
    /// Set by [`Engine::drain`]: a shutdown has begun, new transactions are refused.
    draining: AtomicBool,
    /// Cancelled by [`Engine::shutdown`]: background loops (phase 2, aborts, reaper,
    /// recovery) stop; what they did not finish, the next incarnation's recovery does.
    shutdown: tokio_util::sync::CancellationToken,
}

/// The coordinator's transaction engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// A failpoint set to `skip` that builds a deliberately broken coordinator (only with
/// the `failpoints` feature; always false otherwise).
fn broken(name: &str) -> bool {
    twopc_participant::failpoint::check(name) == Some(twopc_participant::failpoint::Action::Skip)
}

/// How long the broken build `coordinator.answer_before_durable` waits after answering
/// before it forces the decision: wide enough that a kill lands inside it.
const BROKEN_ANSWER_EARLY_MS: u64 = 200;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A lazy record could not be queued. `Closed` means the engine is shutting down (the
/// record is only an optimization: recovery re-derives it); anything else is fatal.
fn lazy_log_error(e: &LogError) {
    if matches!(e, LogError::Closed) {
        debug!("decision log closed; lazy record dropped (shutting down)");
        return;
    }
    fatal_log_error(e)
}

/// The decision log failed: the process cannot know what is durable, so it stops and
/// lets recovery decide from what the log holds.
fn fatal_log_error(e: &LogError) -> ! {
    error!(error = %e, "decision log failed; exiting so recovery can decide from what is durable");
    std::process::exit(70)
}

/// A forced record failed: fatal, unless the log was closed by a shutdown, in which case
/// the decision was not made and the client is told so (the prepared branches are
/// rolled back by the next incarnation's recovery: no record, presumed abort).
fn forced_log_error(e: &LogError) -> TxnError {
    if matches!(e, LogError::Closed) {
        return TxnError::Unavailable(
            "the coordinator is shutting down; nothing was committed".into(),
        );
    }
    fatal_log_error(e)
}

impl Engine {
    /// Builds the engine over an opened log. `replay` is what the log held at open: every
    /// committed transaction without an END record is in doubt and phase 2 resumes for it.
    pub fn new(
        config: EngineConfig,
        epoch: u64,
        participants: Vec<Participant>,
        log: DecisionLog,
        replay: &Replay,
    ) -> Engine {
        let participants = participants
            .into_iter()
            .map(|p| (p.name().to_owned(), p))
            .collect();
        let outcomes = Outcomes::new(config.outcome_index_max, Mutations::none());
        let engine = Engine {
            inner: Arc::new(Inner {
                config,
                epoch,
                seq: AtomicU64::new(1),
                participants,
                log,
                live: Mutex::new(HashMap::new()),
                outcomes: Mutex::new(outcomes),
                in_doubt: Mutex::new(HashMap::new()),
                unresolved: Mutex::new(HashMap::new()),
                forget: Mutex::new(HashMap::new()),
                operator_aborted: Mutex::new(HashSet::new()),
                resolving: tokio::sync::Mutex::new(()),
                decisions_read: Mutex::new(HashSet::new()),
                all_decisions_read: std::sync::atomic::AtomicBool::new(false),
                log_forgot: replay.earlier_segments_deleted,
                decisions_notify: tokio::sync::Notify::new(),
                counters: Counters::default(),
                started: Instant::now(),
                draining: AtomicBool::new(false),
                shutdown: tokio_util::sync::CancellationToken::new(),
            }),
        };
        engine.load_replay(replay);
        engine
    }

    fn load_replay(&self, replay: &Replay) {
        // What recovery needs of each record, for the core's replay rule; the outcome
        // index and the operator's aborts are filled in on the way.
        let mut decided: HashMap<String, (String, u64)> = HashMap::new();
        let mut replayed = Vec::with_capacity(replay.records.len());
        for rec in &replay.records {
            match rec {
                Record::Commit {
                    gid,
                    txn_id,
                    participants,
                    decided_at_ms,
                } => {
                    decided.insert(gid.clone(), (txn_id.clone(), *decided_at_ms));
                    self.remember(txn_id, gid, Outcome::Committed);
                    replayed.push(Replayed::Commit {
                        gid: gid.clone(),
                        participants: participants.clone(),
                    });
                }
                Record::End { gid } => replayed.push(Replayed::End { gid: gid.clone() }),
                Record::OnePhaseCommitted { gid, txn_id, .. } => {
                    self.remember(txn_id, gid, Outcome::Committed)
                }
                Record::Abort { gid, txn_id, .. } => {
                    if let Ok(g) = Gid::parse(gid) {
                        lock(&self.inner.operator_aborted).insert(g);
                    }
                    self.remember(txn_id, gid, Outcome::Aborted);
                    replayed.push(Replayed::OperatorAbort { gid: gid.clone() });
                }
            }
        }
        let mut in_doubt = lock(&self.inner.in_doubt);
        for (gid, participants) in in_doubt_after_replay(replayed, Mutations::none()) {
            let Some((txn_id, decided_at_ms)) = decided.remove(&gid) else {
                continue;
            };
            let Ok(gid) = Gid::parse(&gid) else {
                error!(%gid, "commit record with an invalid GID; ignoring it");
                continue;
            };
            let phase2 = self.decided(&participants);
            in_doubt.insert(
                gid,
                InDoubt {
                    txn_id,
                    phase2,
                    decided_at: UNIX_EPOCH + Duration::from_millis(decided_at_ms),
                },
            );
        }
        info!(
            records = replay.records.len(),
            in_doubt = in_doubt.len(),
            "decision log replayed"
        );
    }

    /// Starts the background work: phase 2 for transactions decided before a restart,
    /// and the reaper of expired transactions. Call once, inside the runtime.
    pub fn spawn_background(&self) {
        let pending: Vec<(Gid, Vec<String>)> = lock(&self.inner.in_doubt)
            .iter()
            .map(|(g, d)| (g.clone(), d.pending_sorted()))
            .collect();
        // `skip` here builds a deliberately broken recovery (it rolls back the branches
        // of committed transactions) for the chaos driver's can-it-tell run.
        let roll_back = broken("coordinator.recovery_rolls_back_committed");
        for (gid, participants) in pending {
            info!(%gid, participants = %participants.join(","), "resuming phase 2 of a committed transaction");
            for p in participants {
                let engine = self.clone();
                let gid = gid.clone();
                match self.inner.participants.get(&p).cloned() {
                    Some(participant) if roll_back => {
                        tokio::spawn(async move {
                            engine.drive_abort(participant, gid.clone()).await;
                            // The broken build's lie: counted as committed.
                            engine
                                .phase2_answer(&gid, &p, CommitAnswer::Committed)
                                .await;
                        });
                    }
                    _ => {
                        tokio::spawn(async move { engine.drive_commit(gid, p).await });
                    }
                }
            }
        }
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let Some(inner) = weak.upgrade() else { return };
                let engine = Engine { inner };
                if engine.inner.shutdown.is_cancelled() {
                    return;
                }
                engine.reap().await;
            }
        });
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Some(inner) = weak.upgrade() else { return };
                let engine = Engine { inner };
                if engine.inner.shutdown.is_cancelled() {
                    return;
                }
                engine.flush_forget().await;
            }
        });
        let weak = Arc::downgrade(&self.inner);
        let interval = Duration::from_millis(self.inner.config.recovery_interval_ms.max(10));
        tokio::spawn(async move {
            // First pass at once: orphans of the previous incarnation hold locks.
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let engine = Engine { inner };
                if engine.inner.shutdown.is_cancelled() {
                    return;
                }
                let report = engine.recover_once().await;
                // An unreachable participant is logged once per outage, by its handle.
                if report.rolled_back > 0 {
                    info!(
                        rolled_back = report.rolled_back,
                        "recovery pass rolled back prepared branches"
                    );
                }
                if !report.unreachable.is_empty() {
                    debug!(unreachable = ?report.unreachable, "recovery pass incomplete");
                }
                if !engine.pause(interval).await {
                    return;
                }
                drop(engine);
            }
        });
    }

    /// One recovery pass: asks every participant for its prepared branches with our GID
    /// prefix and rolls back those that are neither running nor committed (presumed
    /// abort). Committed ones are in `in_doubt` and phase 2 is already driving them.
    ///
    /// Invariant 5: a branch is only touched if its transaction is not live. The order
    /// of the checks matters: a transaction enters `in_doubt` before it leaves `live`,
    /// and leaves `in_doubt` only once no branch of it is prepared; so checking `live`
    /// first, then `in_doubt`, can never see a committed, prepared branch as neither.
    pub async fn recover_once(&self) -> RecoveryReport {
        let _resolving = self.inner.resolving.lock().await;
        let started = Instant::now();
        let prefix = self.gid_prefix();
        let timeout = Duration::from_millis(self.inner.config.call_timeout_ms);
        let mut report = RecoveryReport::default();
        let me = Incarnation {
            coordinator_id: &self.inner.config.coordinator_id,
            epoch: self.inner.epoch,
        };
        // Last-agent transactions of this incarnation whose outcome is still unknown.
        // One failed fence per last agent per pass: the rest would wait as long.
        let mut silent: HashSet<String> = HashSet::new();
        let unresolved: Vec<(Gid, String)> = lock(&self.inner.unresolved)
            .iter()
            .map(|(g, u)| (g.clone(), u.last.clone()))
            .collect();
        for (gid, last) in unresolved {
            if silent.contains(&last) {
                continue;
            }
            match self.inner.participants.get(&last) {
                Some(p) => match self.settle(p, &gid, Duration::ZERO).await {
                    Some(settled) => self.adopt(&gid, &settled, &last),
                    None => {
                        report
                            .unreachable
                            .push(format!("{last}: cannot settle {gid}"));
                        silent.insert(last);
                    }
                },
                None => {
                    error!(%gid, %last, "the last agent of an unsettled transaction is not configured")
                }
            }
        }
        let mut settled: HashMap<Gid, Option<bool>> = HashMap::new();
        let listings = join_all(self.inner.participants.values().map(|p| {
            let prefix = prefix.clone();
            async move {
                let r = p
                    .call(Request::ListPrepared { gid_prefix: prefix }, timeout)
                    .await;
                (p.clone(), r)
            }
        }))
        .await;
        // Participants that answered this pass (their handshake says whether they keep
        // decisions).
        let mut reached: HashSet<String> = HashSet::new();
        for (p, listing) in listings {
            let branches = match listing {
                Ok(Response::Prepared { branches }) => {
                    reached.insert(p.name().to_owned());
                    p.health().set_prepared(branches.len() as u64);
                    branches
                }
                Ok(other) => {
                    report.unreachable.push(format!("{}: {other:?}", p.name()));
                    continue;
                }
                Err(e) => {
                    report.unreachable.push(e.to_string());
                    continue;
                }
            };
            for b in branches {
                let Ok(gid) = Gid::parse(&b.gid) else {
                    warn!(participant = p.name(), gid = %b.gid, "prepared transaction with our prefix but not our GID format; leaving it alone");
                    continue;
                };
                let last_agent = gid.last_agent();
                let listed = Listed {
                    coordinator_id: gid.coordinator_id(),
                    epoch: gid.epoch(),
                    last_agent: last_agent.as_deref(),
                };
                let known = Known {
                    live: self.is_live_gid(&gid),
                    in_doubt: lock(&self.inner.in_doubt).contains_key(&gid),
                    operator_aborted: lock(&self.inner.operator_aborted).contains(&gid),
                };
                let action = prepared_branch_action(me, listed, known, Mutations::none());
                if action == BranchAction::NotOurs {
                    continue;
                }
                report.prepared_seen += 1;
                match action {
                    BranchAction::NotOurs
                    | BranchAction::LeaveLive
                    | BranchAction::LeaveToPhase2 => continue,
                    BranchAction::RollBack => {}
                    BranchAction::AskLastAgent(last) => {
                        // No presumption here: the last agent's row is the decision.
                        let committed = match settled.get(&gid) {
                            Some(c) => *c,
                            None => {
                                let c = match self.inner.participants.get(&last) {
                                    _ if silent.contains(&last) => None,
                                    Some(l) => {
                                        self.settle(l, &gid, Duration::ZERO).await.map(|s| {
                                            self.adopt(&gid, &s, &last);
                                            s.committed
                                        })
                                    }
                                    None => {
                                        error!(%gid, %last, "the last agent of a prepared branch is not configured; resolve it by hand");
                                        None
                                    }
                                };
                                if c.is_none() {
                                    silent.insert(last.clone());
                                }
                                settled.insert(gid.clone(), c);
                                c
                            }
                        };
                        match committed {
                            Some(false) => {}
                            // Committed: phase 2 is driving it now.
                            Some(true) => continue,
                            None => {
                                report
                                    .unreachable
                                    .push(format!("{last}: cannot settle {gid}"));
                                continue;
                            }
                        }
                    }
                }
                info!(%gid, participant = p.name(), age_ms = b.age_ms, "rolling back a prepared branch with no commit decision (presumed abort)");
                // Between the check above and the rollback (a resolve racing a pass).
                twopc_participant::failpoint!("coordinator.recovery_before_rollback");
                match p.call(Request::Abort { gid: gid.clone() }, timeout).await {
                    Ok(Response::Aborted) => report.rolled_back += 1,
                    other => {
                        warn!(%gid, participant = p.name(), result = %describe(&other), "recovery could not roll back; next pass retries")
                    }
                }
            }
        }
        self.complete_decision_rows(&prefix, &reached, &mut report)
            .await;
        let counters = &self.inner.counters;
        let took_ms = started.elapsed().as_millis() as u64;
        counters
            .recovery_pass_ms_last
            .store(took_ms, Ordering::Relaxed);
        counters
            .recovery_pass_ms_total
            .fetch_add(took_ms, Ordering::Relaxed);
        if !report.unreachable.is_empty() {
            counters.recovery_failures.fetch_add(1, Ordering::Relaxed);
        }
        counters.recovery_passes.fetch_add(1, Ordering::Relaxed);
        report
    }

    /// Completes last-agent transactions known only by their committed decision row:
    /// the coordinator crashed after the last agent committed and before the log had
    /// the outcome (or before the row's `Forget`). Phase 2 runs for the participants the
    /// row names (already committed ones answer "not prepared", fine since the row says
    /// commit), then the row is forgotten. Rows of this incarnation are left to the live
    /// path for a minute. Marks the participants whose rows were all read (or that keep
    /// none: `reached` answered this pass, so their handshake said so) in
    /// `decisions_read`.
    async fn complete_decision_rows(
        &self,
        prefix: &str,
        reached: &HashSet<String>,
        report: &mut RecoveryReport,
    ) {
        let timeout = Duration::from_millis(self.inner.config.call_timeout_ms);
        for p in self.inner.participants.values() {
            if !reached.contains(p.name()) {
                continue;
            }
            if !p.can_commit_last() {
                self.decisions_read(p.name());
                continue;
            }
            let req = Request::ListDecisions {
                gid_prefix: prefix.to_owned(),
            };
            let rows = match p.call(req, timeout).await {
                Ok(Response::Decisions { rows }) => rows,
                other => {
                    let why = match other {
                        Ok(Response::Failed(e)) => e.to_string(),
                        Ok(r) => format!("unexpected answer {r:?}"),
                        Err(e) => e.to_string(),
                    };
                    report
                        .unreachable
                        .push(format!("{}: cannot list decisions: {why}", p.name()));
                    continue;
                }
            };
            // The oldest rows come first, at most LIST_DECISIONS_MAX: a full answer may
            // have left some unread (the next pass reads them once these are forgotten).
            let all_read = rows.len() < LIST_DECISIONS_MAX;
            for row in rows {
                let Ok(gid) = Gid::parse(&row.gid) else {
                    continue;
                };
                // A one-phase commit of an interactive transaction has a GID that names
                // no participant: the row's place says who committed it.
                let ours = gid.coordinator_id() == self.inner.config.coordinator_id
                    && !matches!(gid.last_agent(), Some(l) if l != p.name());
                let stale = gid.epoch() < self.inner.epoch || row.age_ms > 60_000;
                if !ours || !stale || self.is_live_gid(&gid) {
                    continue;
                }
                if lock(&self.inner.in_doubt).contains_key(&gid) {
                    continue;
                }
                self.adopt(
                    &gid,
                    &Settled {
                        committed: true,
                        txn_id: row.txn_id,
                        participants: row.participants,
                    },
                    p.name(),
                );
            }
            if all_read {
                self.decisions_read(p.name());
            }
        }
    }

    /// `name`'s decision rows were all read (or it keeps none).
    fn decisions_read(&self, name: &str) {
        let mut read = lock(&self.inner.decisions_read);
        if !read.insert(name.to_owned()) {
            return;
        }
        if read.len() == self.inner.participants.len() {
            self.inner.all_decisions_read.store(true, Ordering::Relaxed);
        }
        drop(read);
        self.inner.decisions_notify.notify_waiters();
    }

    /// Waits (at most `commit_wait_ms`) until `decisions_known()`, for a request with a
    /// client txn id arriving before the start-up recovery pass read the decision rows
    /// (it takes milliseconds when every participant answers). `register` refuses the
    /// request if they are still unknown.
    async fn await_decisions(&self, txn_id: Option<&String>) {
        let Some(txn_id) = txn_id else { return };
        let committed = lock(&self.inner.outcomes)
            .get(txn_id)
            .is_some_and(|(_, o)| o == Outcome::Committed);
        if committed {
            return;
        }
        let deadline = Instant::now() + Duration::from_millis(self.inner.config.commit_wait_ms);
        loop {
            let notified = self.inner.decisions_notify.notified();
            if self.decisions_known() {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                return;
            }
        }
    }

    /// Every participant had its decision rows read since this incarnation started: a
    /// txn id this coordinator does not know did not commit anywhere. Every participant,
    /// not only those a request touches: a retry may name other participants than the
    /// attempt that committed (found by the simulator: a one-phase commit on `a` whose
    /// answer was lost, a restart while `a` was down, and the same txn id on `b` alone
    /// ran again).
    fn decisions_known(&self) -> bool {
        self.inner.all_decisions_read.load(Ordering::Relaxed)
    }

    fn is_live_gid(&self, gid: &Gid) -> bool {
        lock(&self.inner.live).values().any(|t| &t.gid == gid)
    }

    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    /// Stops the background work. Transactions in phase 2 stay in the log and are
    /// resumed by the next start.
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
        // In-process agents' sessions end now rather than when the process does; what
        // phase 2 did not finish, the next start resumes from the log.
        for p in self.inner.participants.values() {
            if let Some(agent) = p.local_agent() {
                agent.close();
            }
        }
    }

    /// The next wait of `backoff` (the core's one retry rule), jittered here: the core
    /// draws no random numbers.
    fn next_wait(backoff: &mut Backoff) -> Duration {
        Duration::from_millis(backoff.next_delay_ms(rand::random()))
    }

    /// The core's commit machine configured from ours.
    fn commit_config(&self, ack: AckMode) -> commit::Config {
        let c = &self.inner.config;
        let mut config = commit::Config::new(match ack {
            AckMode::Applied => commit::AckMode::Applied,
            AckMode::Durable => commit::AckMode::Durable,
        });
        config.ack_wait_ms = c.commit_wait_ms;
        config.retry_min_ms = c.retry_min_ms;
        config.retry_max_ms = c.retry_max_ms;
        config
    }

    /// Phase 2 of a commit decided and durable elsewhere (the log's replay, a last
    /// agent's commit, an operator): the machine; its sends are carried out by the
    /// `drive_commit` tasks the caller spawns for `participants`.
    fn decided(&self, participants: &[String]) -> Commit {
        let config = self.commit_config(AckMode::Durable);
        Commit::decided(participants.iter().cloned(), config, &mut Vec::new())
    }

    /// Feeds `gid`'s phase-2 machine one input; its effects, and whether it finished
    /// (then it leaves `in_doubt`). None if it is not in doubt any more (finished, or
    /// resolved by an operator).
    fn phase2_input(
        &self,
        gid: &Gid,
        input: impl FnOnce(&mut Commit, &mut Vec<Effect>),
    ) -> Option<(Vec<Effect>, bool)> {
        let mut in_doubt = lock(&self.inner.in_doubt);
        let entry = in_doubt.get_mut(gid)?;
        let mut out = Vec::new();
        input(&mut entry.phase2, &mut out);
        let finished = entry.phase2.finished();
        if finished {
            in_doubt.remove(gid);
        }
        Some((out, finished))
    }

    fn backoff(&self) -> Backoff {
        let c = &self.inner.config;
        Backoff::new(c.retry_min_ms, c.retry_max_ms)
    }

    /// Sleeps `d`; false if the engine is shutting down.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.inner.shutdown.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    pub fn participant_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.inner.participants.keys().cloned().collect();
        v.sort();
        v
    }

    /// The participants, by name.
    pub fn participants(&self) -> Vec<&Participant> {
        let mut v: Vec<&Participant> = self.inner.participants.values().collect();
        v.sort_by(|a, b| a.name().cmp(b.name()));
        v
    }

    /// Per participant, the age in ms of the oldest committed transaction it has not
    /// acknowledged yet (absent: none).
    pub fn oldest_in_doubt_ms(&self) -> HashMap<String, u64> {
        let now = SystemTime::now();
        let mut oldest: HashMap<String, u64> = HashMap::new();
        for d in lock(&self.inner.in_doubt).values() {
            let age_ms = now
                .duration_since(d.decided_at)
                .map(|a| a.as_millis() as u64)
                .unwrap_or(0);
            for p in d.phase2.pending() {
                let e = oldest.entry(p.clone()).or_insert(0);
                *e = (*e).max(age_ms);
            }
        }
        oldest
    }

    /// Why the coordinator cannot take transactions now; empty when it can.
    pub fn not_ready(&self) -> Vec<String> {
        let mut why = Vec::new();
        if self.inner.draining.load(Ordering::Relaxed) || self.inner.shutdown.is_cancelled() {
            why.push("shutting down".to_owned());
        }
        let (open, max) = (self.open_txns(), self.inner.config.max_open_txns);
        if open >= max {
            why.push(format!("open-transaction limit reached ({open} of {max})"));
        }
        if self.inner.log.is_poisoned() {
            why.push("the decision log failed".to_owned());
        }
        why
    }

    /// Refuses new transactions from now on (a shutdown has begun); those running
    /// finish.
    pub fn drain(&self) {
        self.inner.draining.store(true, Ordering::Relaxed);
    }

    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    pub fn log(&self) -> &DecisionLog {
        &self.inner.log
    }

    pub fn open_txns(&self) -> usize {
        lock(&self.inner.live).len()
    }

    /// This incarnation's clock for the outcome index.
    fn uptime_ms(&self) -> u64 {
        u64::try_from(self.uptime().as_millis()).unwrap_or(u64::MAX)
    }

    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    // ---- client operations -------------------------------------------------------

    /// Runs a one-shot transaction (`branches` given).
    pub async fn run(&self, req: TxnRequest) -> Result<Committed, TxnError> {
        let this = self.clone();
        match detached(async move { this.run_inner(req).await }).await {
            Err(TxnError::AlreadyCommitted(txn_id)) => Ok(self.replayed(&txn_id)),
            result => result,
        }
    }

    async fn run_inner(&self, mut req: TxnRequest) -> Result<Committed, TxnError> {
        let branches = req.branches.take().unwrap_or_default();
        if branches.is_empty() {
            return Err(TxnError::BadRequest("branches is empty".into()));
        }
        // Merge branches of the same participant, keeping statement order.
        let mut plan: Vec<(String, Vec<Statement>)> = Vec::new();
        let mut total = 0usize;
        for b in branches {
            self.participant(&b.participant)?;
            b.statements.iter().try_for_each(check_statement)?;
            total += b.statements.len();
            match plan.iter_mut().find(|(p, _)| *p == b.participant) {
                Some((_, stmts)) => stmts.extend(b.statements),
                None => plan.push((b.participant, b.statements)),
            }
        }
        if total > self.inner.config.max_statements_per_txn {
            return Err(TxnError::Limit(format!(
                "{total} statements; the limit is {}",
                self.inner.config.max_statements_per_txn
            )));
        }
        let ack = req.ack.unwrap_or(self.inner.config.default_ack);
        // Before choosing who commits last: right after a start this waits for the
        // recovery pass, whose handshakes say which agents keep decisions.
        self.await_decisions(req.txn_id.as_ref()).await;
        // Last-agent commit: the last branch (in the client's order) whose agent keeps a
        // decision table commits last. One-phase: the only participant commits with its
        // decision row, if its agent keeps a decision table.
        let config = &self.inner.config;
        let last_agent =
            if (config.last_agent && plan.len() >= 2) || (config.one_phase && plan.len() == 1) {
                plan.iter()
                    .rev()
                    .map(|(name, _)| name.as_str())
                    .find(|name| self.may_commit_last(name))
            } else {
                None
            };
        let txn = self.register(&req, false, last_agent)?;
        let span = tracing::info_span!("txn", txn_id = %txn.txn_id, gid = %txn.gid);
        let result = async {
            let mut state = txn.state.lock().await;
            state.branches = plan.iter().map(|(p, _)| p.clone()).collect();
            self.finish(&txn, &mut state, plan, false, ack).await
        }
        .instrument(span)
        .await;
        self.unregister(&txn);
        result
    }

    /// Begins an interactive transaction, unless its txn id committed already.
    pub async fn begin(&self, req: TxnRequest) -> Result<Begun, TxnError> {
        self.await_decisions(req.txn_id.as_ref()).await;
        let txn = match self.register(&req, true, None) {
            Ok(txn) => txn,
            Err(TxnError::AlreadyCommitted(txn_id)) => {
                return Ok(Begun::Replayed(self.replayed(&txn_id)))
            }
            Err(e) => return Err(e),
        };
        debug!(txn_id = %txn.txn_id, gid = %txn.gid, "interactive transaction begun");
        Ok(Begun::Active(txn.txn_id.clone()))
    }

    /// Runs one statement of an interactive transaction. Any failure rolls the whole
    /// transaction back (as PostgreSQL does with a failed statement).
    pub async fn statement(
        &self,
        txn_id: &str,
        participant: &str,
        stmt: Statement,
    ) -> Result<StmtResult, TxnError> {
        let (this, txn_id, participant) = (self.clone(), txn_id.to_owned(), participant.to_owned());
        detached(async move { this.statement_inner(&txn_id, &participant, stmt).await }).await
    }

    async fn statement_inner(
        &self,
        txn_id: &str,
        participant: &str,
        stmt: Statement,
    ) -> Result<StmtResult, TxnError> {
        check_statement(&stmt)?;
        let txn = self.live(txn_id)?;
        let p = self.participant(participant)?.clone();
        let span = tracing::info_span!("txn", txn_id = %txn.txn_id, gid = %txn.gid);
        async {
            let mut state = txn.state.lock().await;
            if state.finished {
                return Err(self.not_live(txn_id));
            }
            if state.statements >= self.inner.config.max_statements_per_txn {
                return Err(TxnError::Limit(format!(
                    "the transaction already ran {} statements, the limit",
                    state.statements
                )));
            }
            let remaining = txn.deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                let info = abort_info(&txn.txn_id, None, "57014", "transaction timed out", false);
                self.abort_txn(&txn, &mut state).await;
                return Err(TxnError::Aborted(info));
            }
            let continues = state.branches.iter().any(|b| b == participant);
            if !continues {
                state.branches.push(participant.to_owned());
            }
            state.statements += 1;
            state.last_activity = Instant::now();
            let exec = ExecuteBranch {
                gid: txn.gid.clone(),
                isolation: txn.isolation,
                statements: vec![stmt],
                finish: Finish::Keep,
                read_only_vote: false,
                continues,
                decision: None,
                expires_in_ms: u64::try_from(remaining.as_millis()).ok(),
            };
            let resp = p.call(Request::Execute(exec), remaining).await;
            state.last_activity = Instant::now();
            match classify(participant, &txn.txn_id, resp) {
                Ok((mut results, _)) => Ok(results.pop().unwrap_or_default()),
                Err(info) => {
                    self.abort_txn(&txn, &mut state).await;
                    Err(TxnError::Aborted(info))
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Commits an interactive transaction.
    pub async fn commit(&self, txn_id: &str, ack: Option<AckMode>) -> Result<Committed, TxnError> {
        let (this, txn_id) = (self.clone(), txn_id.to_owned());
        match detached(async move { this.commit_inner(&txn_id, ack).await }).await {
            Err(TxnError::AlreadyCommitted(txn_id)) => Ok(self.replayed(&txn_id)),
            result => result,
        }
    }

    async fn commit_inner(
        &self,
        txn_id: &str,
        ack: Option<AckMode>,
    ) -> Result<Committed, TxnError> {
        let txn = match self.live(txn_id) {
            Ok(txn) => txn,
            // A retried commit right after a restart: wait (at most commit_wait_ms) for
            // the decision rows, which may say it committed; until then it is not
            // "unknown" (a local commit's row may not be read yet).
            Err(TxnError::UnknownTxn(_)) => {
                self.await_decisions(Some(&txn_id.to_owned())).await;
                if self.known(txn_id).0 == outcomes::Known::Recovering {
                    return Err(TxnError::Unavailable(format!(
                        "txn_id {txn_id:?}: the coordinator restarted and has not yet read \
                         the decision rows of every participant; retry shortly"
                    )));
                }
                return Err(self.not_live(txn_id));
            }
            Err(e) => return Err(e),
        };
        let ack = ack.unwrap_or(self.inner.config.default_ack);
        let span = tracing::info_span!("txn", txn_id = %txn.txn_id, gid = %txn.gid);
        let result = async {
            let mut state = txn.state.lock().await;
            if state.finished {
                return Err(self.not_live(txn_id));
            }
            let plan = state
                .branches
                .iter()
                .map(|p| (p.clone(), Vec::new()))
                .collect();
            self.finish(&txn, &mut state, plan, true, ack).await
        }
        .instrument(span)
        .await;
        self.unregister(&txn);
        result
    }

    /// Rolls back an interactive transaction.
    pub async fn rollback(&self, txn_id: &str) -> Result<(), TxnError> {
        let (this, txn_id) = (self.clone(), txn_id.to_owned());
        detached(async move { this.rollback_inner(&txn_id).await }).await
    }

    async fn rollback_inner(&self, txn_id: &str) -> Result<(), TxnError> {
        let txn = self.live(txn_id)?;
        let span = tracing::info_span!("txn", txn_id = %txn.txn_id, gid = %txn.gid);
        async {
            let mut state = txn.state.lock().await;
            if state.finished {
                return Err(self.not_live(txn_id));
            }
            debug!("rollback asked by the client");
            self.abort_txn(&txn, &mut state).await;
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Like [`Engine::status`], but a transaction it does not know right after a start
    /// waits (at most `commit_wait_ms`) for the recovery pass that reads the decision
    /// rows, instead of answering `recovering` at once.
    pub async fn status_settled(&self, txn_id: &str) -> TxnStatus {
        let status = self.status(txn_id);
        if status.state != Some(State::Recovering) {
            return status;
        }
        self.await_decisions(Some(&txn_id.to_owned())).await;
        self.status(txn_id)
    }

    /// What happened to `txn_id`: live state, a remembered or logged outcome, or
    /// presumed abort (the core's `outcomes::known`).
    pub fn status(&self, txn_id: &str) -> TxnStatus {
        let mut status = TxnStatus {
            txn_id: txn_id.to_owned(),
            state: None,
            outcome: None,
            gid: None,
            pending: vec![],
            message: None,
        };
        if let Some(t) = lock(&self.inner.live).get(txn_id) {
            status.state = Some(lock(&t.phase).state());
            status.gid = Some(t.gid.to_string());
            return status;
        }
        let (known, gid) = self.known(txn_id);
        match known {
            outcomes::Known::Committed => {
                status.pending = self.pending_of(gid.as_deref());
                status.outcome = Some(TxnOutcome::Committed);
                status.gid = gid;
            }
            outcomes::Known::InDoubt => status.state = Some(State::InDoubt),
            // A transaction the log does not know, or knows only an aborted attempt of,
            // may have been committed by a participant's local commit (one-phase or last
            // agent) whose row recovery has not read yet.
            outcomes::Known::Recovering => status.state = Some(State::Recovering),
            outcomes::Known::Aborted => {
                status.outcome = Some(TxnOutcome::Aborted);
                status.gid = gid;
            }
            outcomes::Known::Unknown => {
                status.outcome = Some(TxnOutcome::Unknown);
                status.message = Some(
                    "not remembered: outcomes are kept for the retention window \
                     (--log-retention-ms) and at most outcome_index_max of them, and this \
                     one may have committed before that",
                );
            }
        }
        status
    }

    /// What is known of `txn_id`, which is not live, and the GID of its remembered
    /// attempt (the core's `outcomes::known`).
    fn known(&self, txn_id: &str) -> (outcomes::Known, Option<String>) {
        // An attempt whose local commit is not settled yet (it wins over a remembered
        // abort: that one may be an earlier attempt of the same txn id). Read before the
        // outcomes: `adopt` remembers an outcome before it removes the attempt from
        // `unresolved`, so this order cannot miss both.
        let unsettled = lock(&self.inner.unresolved)
            .values()
            .any(|u| u.txn_id == txn_id);
        let (remembered, forgot_a_commit) = {
            let outcomes = lock(&self.inner.outcomes);
            let remembered = outcomes.get(txn_id).map(|(gid, o)| (gid.clone(), o));
            (remembered, outcomes.forgot_a_commit())
        };
        let known = outcomes::known(
            remembered.as_ref().map(|(_, o)| *o),
            unsettled,
            self.inner.all_decisions_read.load(Ordering::Relaxed),
            forgot_a_commit || self.inner.log_forgot,
        );
        (known, remembered.map(|(gid, _)| gid))
    }

    /// The participants that have not acknowledged committed `gid` yet.
    fn pending_of(&self, gid: Option<&str>) -> Vec<String> {
        gid.and_then(|g| Gid::parse(g).ok())
            .and_then(|g| {
                lock(&self.inner.in_doubt)
                    .get(&g)
                    .map(InDoubt::pending_sorted)
            })
            .unwrap_or_default()
    }

    /// The answer to a retry of committed `txn_id`: its recorded outcome, nothing run
    /// (invariant 7).
    fn replayed(&self, txn_id: &str) -> Committed {
        let (_, gid) = self.known(txn_id);
        debug!(
            txn_id,
            gid = gid.as_deref().unwrap_or(""),
            "retry of a committed txn_id answered"
        );
        Committed {
            txn_id: txn_id.to_owned(),
            outcome: TxnOutcome::Committed,
            branches: vec![],
            pending: self.pending_of(gid.as_deref()),
            replayed: true,
        }
    }

    /// Why `txn_id`, which is not live, cannot take a statement, commit or rollback: it
    /// committed, it may have, or it is not known (ended, or never begun).
    fn not_live(&self, txn_id: &str) -> TxnError {
        match self.known(txn_id).0 {
            outcomes::Known::Committed => TxnError::AlreadyCommitted(txn_id.to_owned()),
            outcomes::Known::InDoubt => TxnError::Conflict(format!(
                "txn_id {txn_id:?} is in doubt (its commit may have happened); ask GET \
                 /v1/transactions/{txn_id} until it has an outcome"
            )),
            outcomes::Known::Recovering | outcomes::Known::Aborted | outcomes::Known::Unknown => {
                TxnError::UnknownTxn(txn_id.to_owned())
            }
        }
    }

    /// At most `limit` transactions, each as `GET` answers it: those running, then the
    /// latest finished ones the outcome index remembers, newest first.
    pub fn recent(&self, limit: usize) -> Vec<TxnStatus> {
        let mut ids: Vec<String> = lock(&self.inner.live).keys().take(limit).cloned().collect();
        ids.sort();
        let left = limit - ids.len();
        ids.extend(
            lock(&self.inner.outcomes)
                .recent(left)
                .map(|(txn_id, _, _)| txn_id.to_owned()),
        );
        ids.iter().map(|id| self.status(id)).collect()
    }

    /// Committed transactions some participant has not acknowledged yet.
    pub fn in_doubt(&self) -> Vec<InDoubtEntry> {
        let now = SystemTime::now();
        let mut v: Vec<InDoubtEntry> = lock(&self.inner.in_doubt)
            .iter()
            .map(|(gid, d)| {
                let pending = d.pending_sorted();
                InDoubtEntry {
                    txn_id: d.txn_id.clone(),
                    gid: gid.to_string(),
                    state: InDoubtState::Committed,
                    pending,
                    age_ms: now
                        .duration_since(d.decided_at)
                        .map(|a| a.as_millis() as u64)
                        .unwrap_or(0),
                }
            })
            .collect();
        // Last-agent transactions whose outcome recovery has yet to learn.
        v.extend(
            lock(&self.inner.unresolved)
                .iter()
                .map(|(gid, u)| InDoubtEntry {
                    txn_id: u.txn_id.clone(),
                    gid: gid.to_string(),
                    state: InDoubtState::Unknown,
                    pending: vec![u.last.clone()],
                    age_ms: 0,
                }),
        );
        v.sort_by_key(|e| std::cmp::Reverse(e.age_ms));
        v
    }

    // ---- internals ---------------------------------------------------------------

    fn participant(&self, name: &str) -> Result<&Participant, TxnError> {
        self.inner
            .participants
            .get(name)
            .ok_or_else(|| TxnError::UnknownParticipant(name.to_owned()))
    }

    /// The running interactive transaction `txn_id`, or why there is none.
    fn live(&self, txn_id: &str) -> Result<Arc<LiveTxn>, TxnError> {
        let live = lock(&self.inner.live)
            .get(txn_id)
            .filter(|t| t.interactive)
            .cloned();
        live.ok_or_else(|| self.not_live(txn_id))
    }

    /// The core's txn-id rule (invariant 7) for `txn_id`. Called with the live table
    /// locked: an attempt remembers its outcome before it leaves the table, so one that
    /// ends meanwhile is seen either live or remembered, never neither (a review found
    /// the checks done before the lock: an attempt finishing in between let its retry
    /// run). An attempt whose local commit could not be settled yet may have committed.
    /// A client's txn id may be a retry of one that an earlier incarnation committed by
    /// a participant's local commit (one-phase, last agent) whose row recovery has not
    /// read yet (it reads them at start).
    fn admit(&self, txn_id: &str, named: bool) -> Result<(), TxnError> {
        // `unresolved` before `outcomes`, as in `known` (see `adopt`).
        let unsettled = lock(&self.inner.unresolved)
            .values()
            .any(|u| u.txn_id == txn_id);
        let decisions_known = !named || self.decisions_known();
        let admission = lock(&self.inner.outcomes).admission(txn_id, unsettled, decisions_known);
        match admission {
            Admission::Run => Ok(()),
            Admission::AlreadyCommitted => Err(TxnError::AlreadyCommitted(txn_id.to_owned())),
            Admission::InDoubt => Err(TxnError::Conflict(format!(
                "txn_id {txn_id:?} is in doubt (an earlier attempt may have committed); \
                 ask GET /v1/transactions/{txn_id} until it has an outcome"
            ))),
            Admission::NotYetKnown => Err(TxnError::Unavailable(format!(
                "txn_id {txn_id:?}: the coordinator restarted and has not yet read the \
                 decision rows of every participant; retry shortly"
            ))),
        }
    }

    /// `last_agent`: the participant that will commit last (named in the GID), if any.
    fn register(
        &self,
        req: &TxnRequest,
        interactive: bool,
        last_agent: Option<&str>,
    ) -> Result<Arc<LiveTxn>, TxnError> {
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let (cid, epoch) = (&self.inner.config.coordinator_id, self.inner.epoch);
        let gid = match last_agent.and_then(|l| Gid::with_last_agent(cid, epoch, seq, l)) {
            Some(g) => g,
            None => Gid::new(cid, epoch, seq).map_err(|e| TxnError::Internal(e.to_string()))?,
        };
        let txn_id = match &req.txn_id {
            Some(id) => {
                validate_txn_id(id).map_err(|e| TxnError::BadRequest(e.to_string()))?;
                id.clone()
            }
            None => gid.to_string(),
        };
        let timeout_ms = req
            .timeout_ms
            .unwrap_or(self.inner.config.default_timeout_ms);
        if timeout_ms == 0 || timeout_ms > self.inner.config.max_timeout_ms {
            return Err(TxnError::BadRequest(format!(
                "timeout_ms must be between 1 and {}",
                self.inner.config.max_timeout_ms
            )));
        }
        let now = Instant::now();
        let txn = Arc::new(LiveTxn {
            txn_id: txn_id.clone(),
            gid,
            isolation: req.isolation.unwrap_or_default(),
            deadline: now + Duration::from_millis(timeout_ms),
            interactive,
            state: tokio::sync::Mutex::new(TxnState {
                branches: Vec::new(),
                statements: 0,
                last_activity: now,
                finished: false,
            }),
            phase: Mutex::new(if interactive {
                Phase::Active
            } else {
                Phase::Preparing
            }),
        });
        // Between the outcome index and the live table, were they checked apart.
        twopc_participant::failpoint::check_sync("coordinator.before_admission");
        if self.inner.draining.load(Ordering::Relaxed) {
            return Err(TxnError::Unavailable(
                "the coordinator is shutting down; nothing ran".into(),
            ));
        }
        let mut live = lock(&self.inner.live);
        self.admit(&txn_id, req.txn_id.is_some())?;
        if live.len() >= self.inner.config.max_open_txns {
            return Err(TxnError::Limit(format!(
                "{} transactions open; the limit is {}",
                live.len(),
                self.inner.config.max_open_txns
            )));
        }
        if live.contains_key(&txn_id) {
            return Err(TxnError::Conflict(format!(
                "txn_id {txn_id:?} is already running"
            )));
        }
        live.insert(txn_id, txn.clone());
        Ok(txn)
    }

    fn unregister(&self, txn: &LiveTxn) {
        let mut live = lock(&self.inner.live);
        if live.get(&txn.txn_id).is_some_and(|t| t.gid == txn.gid) {
            live.remove(&txn.txn_id);
        }
    }

    fn remember(&self, txn_id: &str, gid: &str, outcome: Outcome) {
        // Bounded by `outcome_index_max`: a busy coordinator must not grow without limit
        // between reaper passes.
        let now_ms = self.uptime_ms();
        lock(&self.inner.outcomes).remember(txn_id, gid.to_owned(), outcome, now_ms);
    }

    fn set_phase(&self, txn: &LiveTxn, phase: Phase) {
        *lock(&txn.phase) = phase;
    }

    /// Prepares every branch of `plan` (running its statements first), decides, and
    /// commits or aborts. `continues`: the branches are already open on their agents (an
    /// interactive transaction's commit), so an agent that lost one must refuse.
    async fn finish(
        &self,
        txn: &Arc<LiveTxn>,
        state: &mut TxnState,
        mut plan: Vec<(String, Vec<Statement>)>,
        continues: bool,
        ack: AckMode,
    ) -> Result<Committed, TxnError> {
        let remaining = txn.deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            let info = abort_info(&txn.txn_id, None, "57014", "transaction timed out", false);
            return Err(self.aborted(txn, state, info).await);
        }
        self.set_phase(txn, Phase::Preparing);

        if plan.is_empty() {
            // Nothing ran anywhere. Committed all the same, so a retry of its txn id must
            // not run after a restart either: recorded like a read-only commit.
            state.finished = true;
            self.record_read_only(txn, "").await?;
            self.remember(&txn.txn_id, txn.gid.as_str(), Outcome::Committed);
            self.inner
                .counters
                .committed
                .fetch_add(1, Ordering::Relaxed);
            return Ok(Committed {
                txn_id: txn.txn_id.clone(),
                outcome: TxnOutcome::Committed,
                replayed: false,
                branches: vec![],
                pending: vec![],
            });
        }

        twopc_participant::failpoint!("coordinator.before_prepare");
        if let Some(pos) = self.commits_locally(txn, &plan, continues) {
            let last = plan.remove(pos);
            return self
                .finish_last_agent(txn, state, plan, last, continues, ack)
                .await;
        }
        // Two-phase commit. With one participant this is also the path for an agent
        // that keeps no decision table: its plain COMMIT would leave nothing to ask if
        // the answer were lost. The votes go to the core's machine, which decides.
        let names: Vec<String> = plan.iter().map(|(n, _)| n.clone()).collect();
        let answers = self
            .fan_out(txn, plan, continues, Finish::Prepare, remaining)
            .await;
        let (branches, votes, failure) = self.tally(txn, answers);
        let mut machine = Commit::new(names.iter().cloned(), self.commit_config(ack));
        let mut decided = Vec::new();
        for name in &names {
            machine.on_vote(name, vote_of(&votes, name), &mut decided);
        }
        let aborted = decided
            .iter()
            .any(|e| matches!(e, Effect::Answer(commit::Answer::Aborted(_))));
        // A failed branch is a NO vote (`tally`), so the machine aborted; checked again
        // here all the same, in every build.
        if aborted || failure.is_some() {
            // Rolls back every branch, those the machine names and the rest.
            let info = voted_no(&txn.txn_id, failure);
            return Err(self.aborted(txn, state, info).await);
        }
        twopc_participant::failpoint!("coordinator.after_prepare");

        state.finished = true;
        self.set_phase(txn, Phase::Committing);
        let pending = self.decide_and_commit(txn, machine, decided).await?;
        Ok(Committed {
            txn_id: txn.txn_id.clone(),
            outcome: TxnOutcome::Committed,
            replayed: false,
            branches,
            pending,
        })
    }

    /// Which branch of `plan` (if any) commits locally, with the decision row in its own
    /// transaction: the GID's last agent of a one-shot last-agent plan, or the only
    /// branch of a one-phase plan whose agent keeps decisions (one-shot: named in the
    /// GID by `run_inner`; interactive: chosen now, its GID names nobody).
    fn commits_locally(
        &self,
        txn: &LiveTxn,
        plan: &[(String, Vec<Statement>)],
        continues: bool,
    ) -> Option<usize> {
        let config = &self.inner.config;
        if let Some(last) = txn.gid.last_agent() {
            let pos = plan.iter().position(|(n, _)| *n == last)?;
            let last_agent = config.last_agent && plan.len() >= 2 && !continues;
            let one_phase = config.one_phase && plan.len() == 1;
            return (last_agent || one_phase).then_some(pos);
        }
        let only = plan.first().filter(|_| plan.len() == 1)?;
        (config.one_phase && continues && self.may_commit_last(&only.0)).then_some(0)
    }

    /// Sends every branch of `plan` its statements with `finish`, in parallel (or one
    /// after another, stopping at the first failure), and returns the answers in plan
    /// order.
    async fn fan_out(
        &self,
        txn: &LiveTxn,
        plan: Vec<(String, Vec<Statement>)>,
        continues: bool,
        finish: Finish,
        remaining: Duration,
    ) -> Vec<(String, Result<Response, CallError>)> {
        let config = &self.inner.config;
        let calls = plan.into_iter().map(|(name, statements)| {
            let p = self.inner.participants.get(&name).cloned();
            let exec = ExecuteBranch {
                gid: txn.gid.clone(),
                isolation: txn.isolation,
                statements,
                finish,
                read_only_vote: config.read_only,
                continues,
                decision: None,
                expires_in_ms: u64::try_from(remaining.as_millis()).ok(),
            };
            async move {
                let resp = match p {
                    Some(p) => p.call(Request::Execute(exec), remaining).await,
                    None => Err(CallError::Unreachable {
                        participant: name.clone(),
                        message: "not configured".into(),
                    }),
                };
                (name, resp)
            }
        });
        if config.parallel {
            return join_all(calls).await;
        }
        let mut v = Vec::new();
        for c in calls {
            // Boxed: a call future is large, and holding it inline would make every
            // transaction's future (moved on each spawn and poll hand-off) as large.
            let vote = Box::pin(c).await;
            let failed = !matches!(vote.1, Ok(Response::Executed { .. }));
            v.push(vote);
            if failed {
                break;
            }
        }
        v
    }

    /// Counts the answers to PREPARE: each branch's results, each participant's vote
    /// for the core's machine, and the first failure (in plan order), if any.
    fn tally(
        &self,
        txn: &LiveTxn,
        answers: Vec<(String, Result<Response, CallError>)>,
    ) -> (Vec<BranchResults>, HashMap<String, Vote>, Option<AbortInfo>) {
        let mut branches = Vec::with_capacity(answers.len());
        let mut votes = HashMap::with_capacity(answers.len());
        let mut failure: Option<AbortInfo> = None;
        for (name, resp) in answers {
            // A PREPARE whose answer was lost may have prepared.
            let unknown = commit_may_have_happened(&resp);
            match classify(&name, &txn.txn_id, resp) {
                Ok((results, outcome)) => {
                    let vote = match outcome {
                        BranchOutcome::Prepared => Vote::Yes,
                        BranchOutcome::ReadOnly => {
                            self.inner
                                .counters
                                .read_only_branches
                                .fetch_add(1, Ordering::Relaxed);
                            Vote::ReadOnly
                        }
                        // Not an answer to PREPARE (the agent never gives it): nothing
                        // prepared, out of phase 2, as a finished branch is.
                        BranchOutcome::Committed | BranchOutcome::Active => Vote::ReadOnly,
                    };
                    // A failure of the same name (never in a plan today) stays.
                    votes.entry(name.clone()).or_insert(vote);
                    branches.push(BranchResults {
                        participant: name,
                        results,
                    });
                }
                Err(info) => {
                    votes.insert(name, if unknown { Vote::Unknown } else { Vote::No });
                    // Branches run independently, so every failure is a participant's
                    // own; report the first (in plan order).
                    if failure.is_none() {
                        failure = Some(info);
                    }
                }
            }
        }
        (branches, votes, failure)
    }

    /// Last-agent commit (ARCHITECTURE, "Last-agent commit"): every branch but `last`
    /// prepares; then `last` runs its statements and commits them together with the
    /// decision row, in one round trip. That commit is the decision, so no forced record
    /// of ours is needed. If its answer is lost, the outcome is learnt by fencing.
    /// A one-phase commit is the case with no `others`: the row makes its outcome
    /// knowable after a lost answer or a crash. `continues`: `last`'s branch is already
    /// open (an interactive transaction's commit).
    async fn finish_last_agent(
        &self,
        txn: &Arc<LiveTxn>,
        state: &mut TxnState,
        others: Vec<(String, Vec<Statement>)>,
        last: (String, Vec<Statement>),
        continues: bool,
        ack: AckMode,
    ) -> Result<Committed, TxnError> {
        let one_phase = others.is_empty();
        let remaining = txn.deadline.saturating_duration_since(Instant::now());
        let names: Vec<String> = others.iter().map(|(n, _)| n.clone()).collect();
        let (name, statements) = last;
        // The core's machine decides; with nobody else it asks for the commit at once.
        let mut effects = Vec::new();
        let mut machine = LastAgent::new(
            names.iter().cloned(),
            name.clone(),
            Mutations::none(),
            &mut effects,
        );
        let answers = self
            .fan_out(txn, others, false, Finish::Prepare, remaining)
            .await;
        let (mut branches, votes, failure) = self.tally(txn, answers);
        for n in &names {
            machine.on_vote(n, vote_of(&votes, n), &mut effects);
        }
        // A failed branch is a NO vote (`tally`), so the machine aborted; checked again
        // here all the same, in every build.
        if machine.phase() == last_agent::Phase::Aborted || failure.is_some() {
            let info = voted_no(&txn.txn_id, failure);
            return Err(self.aborted(txn, state, info).await);
        }
        let prepared = effects.iter().find_map(|e| match e {
            last_agent::Effect::CommitLast { prepared } => Some(prepared.clone()),
            _ => None,
        });
        let Some(prepared) = prepared else {
            error!("the last-agent machine asked for no commit after every vote was in");
            let info = abort_info(&txn.txn_id, None, "XX000", "no commit", false);
            return Err(self.aborted(txn, state, info).await);
        };
        twopc_participant::failpoint!("coordinator.after_prepare");
        let remaining = txn.deadline.saturating_duration_since(Instant::now());
        let p = match self.inner.participants.get(&name) {
            Some(p) if !remaining.is_zero() => p.clone(),
            _ => {
                let info = abort_info(&txn.txn_id, None, "57014", "transaction timed out", false);
                return Err(self.aborted(txn, state, info).await);
            }
        };
        self.set_phase(txn, Phase::Committing);
        let exec = ExecuteBranch {
            gid: txn.gid.clone(),
            isolation: txn.isolation,
            statements,
            finish: Finish::CommitDecision,
            read_only_vote: false,
            continues,
            decision: Some(Decision {
                txn_id: txn.txn_id.clone(),
                participants: prepared.clone(),
            }),
            expires_in_ms: u64::try_from(remaining.as_millis()).ok(),
        };
        let resp = Box::pin(p.call(Request::Execute(exec), remaining)).await;
        let (answer, mut results, info) = last_answer(&name, &txn.txn_id, resp);
        effects.clear();
        machine.on_last_answer(answer, &mut effects);
        if effects.contains(&last_agent::Effect::Fence) {
            // The commit may or may not have happened: ask the last agent, which also
            // makes sure a commit still in flight can no longer succeed.
            let why = info
                .as_ref()
                .map_or("no clear answer", |i| i.message.as_str());
            warn!(participant = %name, error = %why, "no clear answer from the last agent; fencing");
            let budget = Duration::from_millis(self.inner.config.commit_wait_ms);
            let settled = Box::pin(self.settle(&p, &txn.gid, budget)).await;
            // Committed or not, its results went with the lost answer.
            results = Vec::new();
            effects.clear();
            machine.on_fence_answer(settled.map(|s| s.row()), &mut effects);
        }
        let info = || {
            info.clone().unwrap_or_else(|| {
                abort_info(&txn.txn_id, Some(&name), "XX000", "no commit", false)
            })
        };
        match machine.phase() {
            last_agent::Phase::Committed => {}
            last_agent::Phase::Unsettled => {
                state.finished = true;
                lock(&self.inner.unresolved).insert(
                    txn.gid.clone(),
                    Unsettled {
                        txn_id: txn.txn_id.clone(),
                        last: name.clone(),
                    },
                );
                return Err(TxnError::OutcomeUnknown {
                    txn_id: txn.txn_id.clone(),
                    gid: txn.gid.to_string(),
                    message: format!(
                        "the last participant {name} did not answer its commit ({}) and \
                         could not be asked since; recovery settles it, ask GET later",
                        info().message
                    ),
                });
            }
            // Aborted (or, never, still deciding: nothing committed that we know of).
            _ => return Err(self.aborted(txn, state, info()).await),
        }
        let logged = effects.iter().find_map(|e| match e {
            last_agent::Effect::AppendOnePhase => Some(Vec::new()),
            last_agent::Effect::Phase2 { prepared } => Some(prepared.clone()),
            _ => None,
        });
        let Some(prepared) = logged else {
            // Nothing prepared elsewhere and nothing written here (the agent inserts the
            // row only for a transaction that wrote): finished, nothing to record.
            state.finished = true;
            self.record_read_only(txn, &name).await?;
            self.inner
                .counters
                .committed
                .fetch_add(1, Ordering::Relaxed);
            self.remember(&txn.txn_id, txn.gid.as_str(), Outcome::Committed);
            branches.push(BranchResults {
                participant: name,
                results,
            });
            branches.sort_by_key(|b| state.branches.iter().position(|n| *n == b.participant));
            return Ok(Committed {
                txn_id: txn.txn_id.clone(),
                outcome: TxnOutcome::Committed,
                replayed: false,
                branches,
                pending: vec![],
            });
        };
        twopc_participant::failpoint!("coordinator.after_last_commit");
        // Committed everywhere that matters: the decision is durable in `name`'s database.
        state.finished = true;
        let counters = &self.inner.counters;
        counters.committed.fetch_add(1, Ordering::Relaxed);
        let path = if one_phase {
            &counters.committed_one_phase
        } else {
            &counters.committed_last_agent
        };
        path.fetch_add(1, Ordering::Relaxed);
        self.remember(&txn.txn_id, txn.gid.as_str(), Outcome::Committed);
        branches.push(BranchResults {
            participant: name.clone(),
            results,
        });
        // Answer in the client's order.
        branches.sort_by_key(|b| state.branches.iter().position(|n| *n == b.participant));
        let pending = self
            .record_last_agent_commit(&txn.gid, &txn.txn_id, &name, prepared)
            .await;
        let wait_ms = match ack {
            AckMode::Applied => self.inner.config.commit_wait_ms,
            AckMode::Durable => 0,
        };
        let pending = match pending {
            Some(handles) => self.await_acks(txn, handles, wait_ms).await,
            None => vec![],
        };
        Ok(Committed {
            txn_id: txn.txn_id.clone(),
            outcome: TxnOutcome::Committed,
            replayed: false,
            branches,
            pending,
        })
    }

    /// After a last-agent commit: logs it and starts phase 2 for the prepared
    /// participants (see `commit_others`). The record is not forced: the last agent's row
    /// is the decision. But the row is only forgotten once the log has the outcome
    /// (forced END, or a forced one-phase record if nothing was prepared), so at every
    /// moment one of the two knows it, for `GET` and recovery after a crash.
    async fn record_last_agent_commit(
        &self,
        gid: &Gid,
        txn_id: &str,
        last: &str,
        prepared: Vec<String>,
    ) -> Option<Vec<tokio::task::JoinHandle<()>>> {
        if prepared.is_empty() {
            // A COMMIT naming nobody would stay in doubt forever after a restart.
            let record = Record::OnePhaseCommitted {
                gid: gid.to_string(),
                txn_id: txn_id.to_owned(),
                participant: last.to_owned(),
                decided_at_ms: now_ms(),
            };
            let (engine, gid, last) = (self.clone(), gid.clone(), last.to_owned());
            tokio::spawn(async move {
                match engine.inner.log.append_forced(record).await {
                    Ok(()) => engine.queue_forget(last, gid),
                    Err(e) => lazy_log_error(&e),
                }
            });
            return None;
        }
        let record = Record::Commit {
            gid: gid.to_string(),
            txn_id: txn_id.to_owned(),
            participants: prepared.clone(),
            decided_at_ms: now_ms(),
        };
        if let Err(e) = self.inner.log.append_lazy(record).await {
            lazy_log_error(&e);
        }
        self.commit_others(gid, txn_id, prepared)
    }

    /// Phase 2 of a last-agent transaction that committed: the prepared participants
    /// get COMMIT PREPARED (the decision row is forgotten once they all acknowledged,
    /// in `append_end`). `prepared` is not empty. `None` if another driver has it.
    fn commit_others(
        &self,
        gid: &Gid,
        txn_id: &str,
        prepared: Vec<String>,
    ) -> Option<Vec<tokio::task::JoinHandle<()>>> {
        {
            let mut in_doubt = lock(&self.inner.in_doubt);
            if in_doubt.contains_key(gid) {
                return None; // already being driven
            }
            in_doubt.insert(
                gid.clone(),
                InDoubt {
                    txn_id: txn_id.to_owned(),
                    phase2: self.decided(&prepared),
                    decided_at: SystemTime::now(),
                },
            );
        }
        Some(self.spawn_phase2(gid, prepared))
    }

    /// Starts phase 2 (`drive_commit`) for `participants`: in parallel, or one after
    /// another with `parallel` off.
    fn spawn_phase2(
        &self,
        gid: &Gid,
        participants: Vec<String>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        if self.inner.config.parallel {
            return participants
                .into_iter()
                .map(|p| {
                    let (engine, gid) = (self.clone(), gid.clone());
                    tokio::spawn(async move { engine.drive_commit(gid, p).await })
                })
                .collect();
        }
        let (engine, gid) = (self.clone(), gid.clone());
        vec![tokio::spawn(async move {
            for p in participants {
                engine.drive_commit(gid.clone(), p).await;
            }
        })]
    }

    /// Asks `last` for the settled outcome of `gid` (`Fence`), retrying within `budget`
    /// (at least one attempt). `None`: no answer.
    async fn settle(&self, last: &Participant, gid: &Gid, budget: Duration) -> Option<Settled> {
        let deadline = Instant::now() + budget;
        let call_timeout = Duration::from_millis(self.inner.config.call_timeout_ms);
        let mut backoff = self.backoff();
        loop {
            let timeout = call_timeout
                .min(deadline.saturating_duration_since(Instant::now()))
                .max(Duration::from_millis(500));
            match last
                .call(Request::Fence { gid: gid.clone() }, timeout)
                .await
            {
                Ok(Response::Decision {
                    committed,
                    txn_id,
                    participants,
                }) => {
                    info!(%gid, participant = last.name(), committed, "fenced");
                    return Some(Settled {
                        committed,
                        txn_id,
                        participants,
                    });
                }
                other => {
                    let wait = Engine::next_wait(&mut backoff);
                    if backoff.worth_reporting() {
                        let attempt = backoff.attempts();
                        warn!(%gid, participant = last.name(), attempt, result = %describe(&other), "fence not answered");
                    }
                    if Instant::now() + wait >= deadline || !self.pause(wait).await {
                        return None;
                    }
                }
            }
        }
    }

    /// `name` may be the last agent of a new transaction: its agent keeps a decision
    /// table, and none of its last-agent transactions is waiting to be settled (an agent
    /// that just failed to answer one is not trusted with more until recovery reaches it;
    /// this also bounds `unresolved` by the transactions in flight when it failed).
    fn may_commit_last(&self, name: &str) -> bool {
        self.participant(name)
            .is_ok_and(Participant::can_commit_last)
            && !lock(&self.inner.unresolved)
                .values()
                .any(|u| u.last == name)
    }

    /// Acts on a last-agent transaction's settled outcome found after the fact
    /// (recovery, or a commit whose answer was lost): a commit is logged (lazily) and
    /// phase 2 starts for its prepared participants; an abort is remembered, and the
    /// prepared branches are left to the recovery pass that rolls them back.
    fn adopt(&self, gid: &Gid, settled: &Settled, last: &str) {
        // Read here, removed only once the outcome is remembered: `admit` and `GET` read
        // `unresolved`, then `outcomes`, so they see the txn id in one or the other at
        // every moment (a review found the entry removed first: in between, a retry ran
        // again and `GET` presumed abort for a commit).
        let known_txn_id = lock(&self.inner.unresolved)
            .get(gid)
            .map(|u| u.txn_id.clone());
        let txn_id = match (&known_txn_id, settled.txn_id.is_empty()) {
            (_, false) => settled.txn_id.clone(),
            (Some(t), true) => t.clone(),
            (None, true) => gid.to_string(),
        };
        let in_doubt = lock(&self.inner.in_doubt).contains_key(gid);
        let operator_aborted = lock(&self.inner.operator_aborted).contains(gid);
        let row = settled.clone().row();
        let participants = match last_agent::settled_action(&row, in_doubt, operator_aborted) {
            // What is still prepared, the recovery pass rolls back.
            SettledAction::RollBack => {
                if known_txn_id.is_some() {
                    self.remember(&txn_id, gid.as_str(), Outcome::Aborted);
                }
                lock(&self.inner.unresolved).remove(gid);
                return;
            }
            SettledAction::Forget => {
                // An operator aborted it by hand (with --force): the row must not bring
                // the commit back. It goes; what is still prepared is rolled back by
                // recovery.
                info!(%gid, "committed decision row of a transaction an operator aborted; forgetting it");
                self.queue_forget(last.to_owned(), gid.clone());
                lock(&self.inner.unresolved).remove(gid);
                return;
            }
            SettledAction::Nothing => {
                lock(&self.inner.unresolved).remove(gid);
                return;
            }
            SettledAction::AppendOnePhase => Vec::new(),
            SettledAction::Phase2(participants) => participants,
        };
        info!(%gid, %txn_id, participants = %participants.join(","), "the last agent committed: completing phase 2");
        self.remember(&txn_id, gid.as_str(), Outcome::Committed);
        twopc_participant::failpoint::check_sync("coordinator.adopt_before_settled");
        lock(&self.inner.unresolved).remove(gid);
        let last = last.to_owned();
        let (engine, gid) = (self.clone(), gid.clone());
        tokio::spawn(async move {
            let _ = engine
                .record_last_agent_commit(&gid, &txn_id, &last, participants)
                .await;
        });
    }

    /// Queues the deletion of a finished last-agent transaction's decision row.
    fn queue_forget(&self, last: String, gid: Gid) {
        let mut forget = lock(&self.inner.forget);
        let q = forget.entry(last).or_default();
        if q.len() >= FORGET_QUEUE_MAX {
            // The agent has been unreachable for long: drop the oldest. A decision row
            // left behind costs a row, nothing else.
            if let Some(dropped) = q.pop_front() {
                debug!(gid = %dropped, "forget queue full; leaving a decision row behind");
            }
        }
        q.push_back(gid);
    }

    /// Sends the queued `Forget`s, in batches, per agent; an agent's first failure puts
    /// what is left back in its queue for the next flush.
    async fn flush_forget(&self) {
        let queued: Vec<(String, VecDeque<Gid>)> = lock(&self.inner.forget).drain().collect();
        let timeout = Duration::from_millis(self.inner.config.call_timeout_ms);
        for (name, mut gids) in queued {
            let Some(p) = self.inner.participants.get(&name).cloned() else {
                continue;
            };
            while !gids.is_empty() {
                let n = gids.len().min(FORGET_MAX_GIDS);
                let batch: Vec<Gid> = gids.iter().take(n).cloned().collect();
                match p.call(Request::Forget { gids: batch }, timeout).await {
                    Ok(Response::Forgotten { rows }) => {
                        debug!(participant = %name, rows, "decision rows forgotten");
                        gids.drain(..n);
                    }
                    other => {
                        let left = gids.len();
                        if left >= FORGET_QUEUE_MAX / 2 {
                            warn!(participant = %name, left, result = %describe(&other), "decision rows to forget are piling up");
                        } else {
                            debug!(participant = %name, left, result = ?other, "forget failed; retrying later");
                        }
                        let mut forget = lock(&self.inner.forget);
                        let q = forget.entry(name.clone()).or_default();
                        // Older first; those queued meanwhile after them.
                        gids.extend(q.drain(..));
                        while gids.len() > FORGET_QUEUE_MAX {
                            gids.pop_front();
                        }
                        *q = gids;
                        break;
                    }
                }
            }
        }
    }

    /// Every vote was YES or READ-ONLY and `machine` decided commit (`decided`: its
    /// effects): log the decision (forced) and run phase 2. Returns the participants
    /// that have not acknowledged when the client is answered.
    async fn decide_and_commit(
        &self,
        txn: &LiveTxn,
        mut machine: Commit,
        decided: Vec<Effect>,
    ) -> Result<Vec<String>, TxnError> {
        let yes = decided.into_iter().find_map(|e| match e {
            Effect::AppendCommit { participants } => Some(participants),
            _ => None,
        });
        let Some(yes) = yes else {
            // Every branch was read-only and is finished already: the machine answered
            // `committed` with nothing to log.
            self.record_read_only(txn, "").await?;
            self.inner
                .counters
                .committed
                .fetch_add(1, Ordering::Relaxed);
            self.remember(&txn.txn_id, txn.gid.as_str(), Outcome::Committed);
            return Ok(vec![]);
        };
        // Forced even when only one branch wrote (the others voted READ-ONLY): the client
        // is told `committed`, and recovery and `GET` after a crash must know it. The
        // writer's COMMIT PREPARED alone would decide, but nothing durable of ours would
        // say so (recovery would presume abort for a branch still prepared, and `GET`
        // would answer `aborted` for one that committed).
        let record = Record::Commit {
            gid: txn.gid.to_string(),
            txn_id: txn.txn_id.clone(),
            participants: yes.clone(),
            decided_at_ms: now_ms(),
        };
        // `skip` at these two builds a deliberately broken coordinator for the chaos
        // driver's can-it-tell runs: one commits with no durable decision, the other
        // tells the client before its decision is durable.
        if broken("coordinator.answer_before_durable") {
            return Ok(self.commit_after_answering(txn, yes, record));
        }
        if !broken("coordinator.skip_decision_log") {
            if let Err(e) = self.inner.log.append_forced(record).await {
                // The machine stops without an effect (the record may be on disk).
                machine.on_log_failed(&mut Vec::new());
                return Err(forced_log_error(&e));
            }
        }
        twopc_participant::failpoint!("coordinator.after_decision");
        // The decision is durable: from here on the transaction is committed.
        let mut effects = Vec::new();
        machine.on_durable(&mut effects);
        self.inner
            .counters
            .committed
            .fetch_add(1, Ordering::Relaxed);
        self.remember(&txn.txn_id, txn.gid.as_str(), Outcome::Committed);
        lock(&self.inner.in_doubt).insert(
            txn.gid.clone(),
            InDoubt {
                txn_id: txn.txn_id.clone(),
                phase2: machine,
                decided_at: SystemTime::now(),
            },
        );
        let mut sends = Vec::new();
        let mut answer = None;
        let mut ack_wait_ms = None;
        for e in effects {
            match e {
                Effect::Send { to, .. } => sends.push(to),
                Effect::Answer(commit::Answer::Committed { pending }) => answer = Some(pending),
                Effect::SetTimer {
                    timer: Timer::AckWait,
                    after_ms,
                } => ack_wait_ms = Some(after_ms),
                other => debug!(effect = ?other, "unexpected effect of a durable decision"),
            }
        }
        let handles = self.spawn_phase2(&txn.gid, sends);
        match (answer, ack_wait_ms) {
            (Some(pending), _) => Ok(pending),
            (None, Some(ms)) => Ok(self.await_acks(txn, handles, ms).await),
            (None, None) => Ok(self.still_pending(&txn.gid)),
        }
    }

    /// The broken build `coordinator.answer_before_durable`: counts the transaction
    /// committed and answers at once, and only later (after
    /// `BROKEN_ANSWER_EARLY_MS`) forces the decision and runs phase 2. A crash in between
    /// loses a commit its client was told of; the chaos audit must say so.
    fn commit_after_answering(
        &self,
        txn: &LiveTxn,
        yes: Vec<String>,
        record: Record,
    ) -> Vec<String> {
        self.inner
            .counters
            .committed
            .fetch_add(1, Ordering::Relaxed);
        self.remember(&txn.txn_id, txn.gid.as_str(), Outcome::Committed);
        let (engine, gid, txn_id) = (self.clone(), txn.gid.clone(), txn.txn_id.clone());
        let pending = yes.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(BROKEN_ANSWER_EARLY_MS)).await;
            if let Err(e) = engine.inner.log.append_forced(record).await {
                lazy_log_error(&e);
                return;
            }
            lock(&engine.inner.in_doubt).insert(
                gid.clone(),
                InDoubt {
                    txn_id,
                    phase2: engine.decided(&yes),
                    decided_at: SystemTime::now(),
                },
            );
            engine.spawn_phase2(&gid, yes);
        });
        pending
    }

    /// A transaction that wrote nothing committed. If the client named it, the outcome
    /// is forced to the log before the client is told: a retry of the same txn id after
    /// a restart must not run again (it could write, where the first attempt found
    /// nothing to do). Without a client txn id nobody can retry it.
    async fn record_read_only(&self, txn: &LiveTxn, participant: &str) -> Result<(), TxnError> {
        if txn.txn_id == txn.gid.as_str() {
            return Ok(());
        }
        let record = Record::OnePhaseCommitted {
            gid: txn.gid.to_string(),
            txn_id: txn.txn_id.clone(),
            participant: participant.to_owned(),
            decided_at_ms: now_ms(),
        };
        self.inner
            .log
            .append_forced(record)
            .await
            .map_err(|e| forced_log_error(&e))
    }

    /// Applied mode: waits up to `wait_ms` for phase 2, then the machine's ack-wait
    /// timer fires and it answers with whatever is still pending (nothing, once every
    /// participant acknowledged and it left `in_doubt`).
    async fn await_acks(
        &self,
        txn: &LiveTxn,
        handles: Vec<tokio::task::JoinHandle<()>>,
        wait_ms: u64,
    ) -> Vec<String> {
        let wait = Duration::from_millis(wait_ms);
        let _ = tokio::time::timeout(wait, join_all(handles)).await;
        let answered = self.phase2_input(&txn.gid, |m, out| m.on_timer(&Timer::AckWait, out));
        let pending = answered.and_then(|(effects, _)| {
            effects.into_iter().find_map(|e| match e {
                Effect::Answer(commit::Answer::Committed { pending }) => Some(pending),
                _ => None,
            })
        });
        pending.unwrap_or_else(|| self.still_pending(&txn.gid))
    }

    /// The participants of `gid` that have not acknowledged COMMIT PREPARED.
    fn still_pending(&self, gid: &Gid) -> Vec<String> {
        lock(&self.inner.in_doubt)
            .get(gid)
            .map(InDoubt::pending_sorted)
            .unwrap_or_default()
    }

    /// Phase 2 for one participant: carries out the machine's `Send { CommitPrepared }`
    /// to it, feeds the answer back, and waits its retry timer, until the participant
    /// is acknowledged (or the transaction resolved by an operator).
    async fn drive_commit(&self, gid: Gid, participant: String) {
        let span = tracing::info_span!("phase2", %gid, %participant);
        async {
            let Some(p) = self.inner.participants.get(&participant).cloned() else {
                error!("participant of a committed transaction is not configured; it stays in doubt until it is");
                return;
            };
            let timeout = Duration::from_millis(self.inner.config.call_timeout_ms);
            let mut attempt = 0u64;
            loop {
                let still_pending = lock(&self.inner.in_doubt)
                    .get(&gid)
                    .is_some_and(|d| d.phase2.is_pending(&participant));
                if !still_pending {
                    // Acknowledged by a concurrent driver, or resolved by an operator.
                    return;
                }
                attempt += 1;
                let resp = p
                    .call(Request::CommitPrepared { gid: gid.clone() }, timeout)
                    .await;
                let (answer, problem) = match resp {
                    Ok(Response::CommitPrepared(CommitAck::Committed)) => {
                        (CommitAnswer::Committed, None)
                    }
                    Ok(Response::CommitPrepared(CommitAck::NotPrepared)) => {
                        // Our log says commit, so the branch was committed by an earlier
                        // attempt whose acknowledgement got lost.
                        debug!("branch no longer prepared: already committed");
                        (CommitAnswer::NotPrepared, None)
                    }
                    Ok(Response::Failed(e)) => (CommitAnswer::Failed, Some(e.to_string())),
                    Ok(other) => (CommitAnswer::Failed, Some(format!("unexpected answer {other:?}"))),
                    Err(e) => (CommitAnswer::Failed, Some(e.to_string())),
                };
                let Some(retry_ms) = self.phase2_answer(&gid, &participant, answer).await else {
                    return;
                };
                self.inner.counters.phase2_retries.fetch_add(1, Ordering::Relaxed);
                if attempt == 1 || attempt.is_power_of_two() {
                    let error = problem.unwrap_or_default();
                    warn!(attempt, %error, "COMMIT PREPARED not acknowledged; retrying");
                }
                if !self.pause(Duration::from_millis(retry_ms)).await {
                    return;
                }
                // The retry timer fired: the machine sends again unless the participant
                // was acknowledged meanwhile (the loop's check above).
                let _ = self.phase2_input(&gid, |m, out| {
                    m.on_timer(&Timer::Retry(participant.clone()), out)
                });
            }
        }
        .instrument(span)
        .await
    }

    /// Feeds `participant`'s answer to COMMIT PREPARED to `gid`'s machine and carries
    /// out its effects: the END record when every participant acknowledged. Returns the
    /// retry delay if the machine wants another attempt.
    async fn phase2_answer(
        &self,
        gid: &Gid,
        participant: &str,
        answer: CommitAnswer,
    ) -> Option<u64> {
        let (effects, finished) = self.phase2_input(gid, |m, out| {
            m.on_commit_answer(participant, answer, rand::random(), out)
        })?;
        let mut retry_ms = None;
        for e in effects {
            match e {
                Effect::SetTimer {
                    timer: Timer::Retry(_),
                    after_ms,
                } => retry_ms = Some(after_ms),
                Effect::AppendEnd => self.append_end(gid).await,
                // The committing request answers from what is pending (`await_acks`).
                _ => {}
            }
        }
        if answer != CommitAnswer::Failed && !finished {
            // One participant committed, another has not yet.
            twopc_participant::failpoint!("coordinator.mid_commit");
        }
        retry_ms
    }

    /// Every participant acknowledged: the END record (lazy), or for a last-agent
    /// transaction forced, then its decision row may go.
    async fn append_end(&self, gid: &Gid) {
        debug!(%gid, "every participant acknowledged");
        let end = Record::End {
            gid: gid.to_string(),
        };
        if let Some(last) = gid.last_agent() {
            // The decision row may go once the log has the outcome for good (END
            // durable, hence the COMMIT before it too). Off the caller's path.
            let (engine, gid) = (self.clone(), gid.clone());
            tokio::spawn(async move {
                match engine.inner.log.append_forced(end).await {
                    Ok(()) => engine.queue_forget(last, gid),
                    Err(e) => lazy_log_error(&e),
                }
            });
            return;
        }
        if let Err(e) = self.inner.log.append_lazy(end).await {
            lazy_log_error(&e);
        }
    }

    /// Rolls back every branch of `txn` (`abort_txn`) and gives the client's error.
    async fn aborted(&self, txn: &LiveTxn, state: &mut TxnState, info: AbortInfo) -> TxnError {
        self.abort_txn(txn, state).await;
        TxnError::Aborted(info)
    }

    /// Rolls back every branch of `txn` and marks it aborted.
    async fn abort_txn(&self, txn: &LiveTxn, state: &mut TxnState) {
        state.finished = true;
        self.inner.counters.aborted.fetch_add(1, Ordering::Relaxed);
        self.remember(&txn.txn_id, txn.gid.as_str(), Outcome::Aborted);
        let timeout = Duration::from_millis(self.inner.config.call_timeout_ms);
        let calls = state.branches.iter().filter_map(|name| {
            let p = self.inner.participants.get(name)?.clone();
            let gid = txn.gid.clone();
            Some(async move {
                let r = p.call(Request::Abort { gid: gid.clone() }, timeout).await;
                (p, gid, r)
            })
        });
        for (p, gid, r) in join_all(calls).await {
            if !matches!(r, Ok(Response::Aborted)) {
                // Keep trying in the background; a branch left prepared must not hold
                // its locks forever.
                let engine = self.clone();
                tokio::spawn(async move { engine.drive_abort(p, gid).await });
            }
        }
        info!(branches = state.branches.len(), "transaction aborted");
        // Ended: it leaves the live table (its outcome is remembered above), whichever
        // path aborted it (a failing statement, `/rollback`, a timeout, the reaper).
        self.unregister(txn);
    }

    async fn drive_abort(&self, p: Participant, gid: Gid) {
        let timeout = Duration::from_millis(self.inner.config.call_timeout_ms);
        let mut backoff = self.backoff();
        // Bounded: after this, the branch (if it is prepared at all) is left to recovery.
        while backoff.attempts() < twopc_core::commit::ABORT_ATTEMPTS_MAX {
            let other = match p.call(Request::Abort { gid: gid.clone() }, timeout).await {
                Ok(Response::Aborted) => return,
                other => other,
            };
            let wait = Engine::next_wait(&mut backoff);
            if backoff.worth_reporting() {
                let attempt = backoff.attempts();
                warn!(%gid, participant = p.name(), attempt, result = %describe(&other), "abort not acknowledged; retrying");
            }
            if !self.pause(wait).await {
                return;
            }
        }
        error!(%gid, participant = p.name(), "abort still not acknowledged; leaving the branch to recovery");
    }

    /// Rolls back interactive transactions past their deadline or idle too long, and
    /// forgets outcomes past retention.
    async fn reap(&self) {
        let now = Instant::now();
        let idle = Duration::from_millis(self.inner.config.idle_timeout_ms);
        let candidates: Vec<Arc<LiveTxn>> = lock(&self.inner.live)
            .values()
            .filter(|t| t.interactive)
            .cloned()
            .collect();
        for txn in candidates {
            let Ok(mut state) = txn.state.try_lock() else {
                continue; // busy: its own request enforces the deadline
            };
            if state.finished {
                continue;
            }
            let expired = now >= txn.deadline;
            let idle_too_long = now.duration_since(state.last_activity) >= idle;
            if expired || idle_too_long {
                warn!(txn_id = %txn.txn_id, gid = %txn.gid, expired, idle_too_long, "rolling back an expired transaction");
                self.abort_txn(&txn, &mut state).await;
                drop(state);
                self.unregister(&txn);
            }
        }
        let retention_ms = self.inner.config.outcome_retention_ms;
        let now_ms = self.uptime_ms();
        // Bounded work per pass.
        lock(&self.inner.outcomes).expire(now_ms, retention_ms, 10_000);
    }

    /// Prefix of every GID this coordinator creates.
    pub fn gid_prefix(&self) -> String {
        gid_prefix(&self.inner.config.coordinator_id)
    }
}

/// What the log and the participants say about one GID (operator view).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TxnView {
    pub gid: String,
    pub txn_id: Option<String>,
    /// `running`, `committed` (logged, acknowledgements pending), `committed_done`,
    /// `aborted` (explicit record or known to this incarnation), or `none` (no record:
    /// presumed abort).
    pub decision: DecisionName,
    pub pending: Vec<String>,
    pub age_ms: Option<u64>,
    /// Each participant's `pg_prepared_xacts` row for the GID (or why it is unknown).
    pub branches: Vec<BranchView>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct BranchView {
    pub participant: String,
    pub prepared: Option<twopc_shared::msg::PreparedBranch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResolveAction {
    Commit,
    Abort,
}

impl From<ResolveAction> for resolve::Action {
    fn from(action: ResolveAction) -> resolve::Action {
        match action {
            ResolveAction::Commit => resolve::Action::Commit,
            ResolveAction::Abort => resolve::Action::Abort,
        }
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ResolveReport {
    pub gid: String,
    pub action: ResolveAction,
    pub dry_run: bool,
    /// What was (or, dry run, would be) done, in order.
    pub steps: Vec<String>,
}

impl Engine {
    /// Every participant's prepared branches of ours: (participant, branches or error).
    async fn prepared_everywhere(
        &self,
    ) -> Vec<(
        String,
        Result<Vec<twopc_shared::msg::PreparedBranch>, String>,
    )> {
        let timeout = Duration::from_millis(self.inner.config.call_timeout_ms);
        let prefix = self.gid_prefix();
        let mut names = self.participant_names();
        names.sort();
        join_all(names.into_iter().map(|name| {
            let p = self.inner.participants.get(&name).cloned();
            let prefix = prefix.clone();
            async move {
                let r = match p {
                    Some(p) => match p
                        .call(Request::ListPrepared { gid_prefix: prefix }, timeout)
                        .await
                    {
                        Ok(Response::Prepared { branches }) => Ok(branches),
                        Ok(Response::Failed(e)) => Err(e.to_string()),
                        Ok(other) => Err(format!("unexpected answer {other:?}")),
                        Err(e) => Err(e.to_string()),
                    },
                    None => Err("not configured".into()),
                };
                (name, r)
            }
        }))
        .await
    }

    /// The GID a client txn id or GID names, if this coordinator knows it.
    fn find_gid(&self, id: &str) -> Option<Gid> {
        if let Ok(g) = Gid::parse(id) {
            return Some(g);
        }
        if let Some(t) = lock(&self.inner.live).get(id) {
            return Some(t.gid.clone());
        }
        if let Some((gid, _)) = lock(&self.inner.outcomes).get(id) {
            return Gid::parse(gid).ok();
        }
        if let Some((g, _)) = lock(&self.inner.unresolved)
            .iter()
            .find(|(_, u)| u.txn_id == id)
        {
            return Some(g.clone());
        }
        lock(&self.inner.in_doubt)
            .iter()
            .find(|(_, d)| d.txn_id == id)
            .map(|(g, _)| g.clone())
    }

    fn decision_of(&self, gid: &Gid) -> (Logged, Option<String>, Vec<String>, Option<u64>) {
        if let Some(t) = lock(&self.inner.live).values().find(|t| &t.gid == gid) {
            return (Logged::Running, Some(t.txn_id.clone()), vec![], None);
        }
        if let Some(d) = lock(&self.inner.in_doubt).get(gid) {
            let pending = d.pending_sorted();
            let age = SystemTime::now()
                .duration_since(d.decided_at)
                .map(|a| a.as_millis() as u64)
                .ok();
            return (Logged::Committed, Some(d.txn_id.clone()), pending, age);
        }
        let o = lock(&self.inner.outcomes);
        match o.by_gid(&gid.to_string()) {
            Some((txn, Outcome::Committed)) => {
                (Logged::CommittedDone, Some(txn.to_owned()), vec![], None)
            }
            Some((txn, _)) => (Logged::Aborted, Some(txn.to_owned()), vec![], None),
            None => (Logged::None, None, vec![], None),
        }
    }

    /// Operator view: every GID that is in doubt in the log or prepared somewhere.
    pub async fn inspect_all(&self) -> Vec<TxnView> {
        let listings = self.prepared_everywhere().await;
        let mut gids: Vec<Gid> = lock(&self.inner.in_doubt).keys().cloned().collect();
        for (_, r) in &listings {
            for b in r.iter().flatten() {
                if let Ok(g) = Gid::parse(&b.gid) {
                    if !gids.contains(&g) {
                        gids.push(g);
                    }
                }
            }
        }
        gids.sort_by_key(|g| (g.epoch(), g.seq()));
        gids.iter().map(|g| self.view(g, &listings)).collect()
    }

    /// Operator view of one transaction (by client txn id or GID).
    pub async fn inspect(&self, id: &str) -> Result<TxnView, TxnError> {
        let gid = self
            .find_gid(id)
            .ok_or_else(|| TxnError::UnknownTxn(id.to_owned()))?;
        let listings = self.prepared_everywhere().await;
        Ok(self.view(&gid, &listings))
    }

    fn view(
        &self,
        gid: &Gid,
        listings: &[(
            String,
            Result<Vec<twopc_shared::msg::PreparedBranch>, String>,
        )],
    ) -> TxnView {
        self.view_of(gid, listings).1
    }

    /// The view, and the decision it shows.
    fn view_of(
        &self,
        gid: &Gid,
        listings: &[(
            String,
            Result<Vec<twopc_shared::msg::PreparedBranch>, String>,
        )],
    ) -> (Logged, TxnView) {
        let (decision, txn_id, pending, age_ms) = self.decision_of(gid);
        let branches = listings
            .iter()
            .map(|(name, r)| match r {
                Ok(bs) => BranchView {
                    participant: name.clone(),
                    prepared: bs.iter().find(|b| b.gid == gid.as_str()).cloned(),
                    error: None,
                },
                Err(e) => BranchView {
                    participant: name.clone(),
                    prepared: None,
                    error: Some(e.clone()),
                },
            })
            .collect::<Vec<_>>();
        let age_ms = age_ms.or_else(|| {
            branches
                .iter()
                .filter_map(|b| b.prepared.as_ref().map(|p| p.age_ms))
                .max()
        });
        let view = TxnView {
            gid: gid.to_string(),
            txn_id,
            decision: decision.into(),
            pending,
            age_ms,
            branches,
        };
        (decision, view)
    }

    /// Resolves a transaction by hand. Refuses to race a running transaction, and to
    /// contradict a logged decision unless `force`. Records what it decided in the log
    /// (forced) before touching any participant.
    pub async fn resolve(
        &self,
        id: &str,
        action: ResolveAction,
        dry_run: bool,
        force: bool,
    ) -> Result<ResolveReport, TxnError> {
        let (this, id) = (self.clone(), id.to_owned());
        detached(async move { this.resolve_inner(&id, action, dry_run, force).await }).await
    }

    async fn resolve_inner(
        &self,
        id: &str,
        action: ResolveAction,
        dry_run: bool,
        force: bool,
    ) -> Result<ResolveReport, TxnError> {
        let gid = self
            .find_gid(id)
            .ok_or_else(|| TxnError::UnknownTxn(id.to_owned()))?;
        // No recovery pass between what we read here and what we do (see `resolving`).
        let _resolving = self.inner.resolving.lock().await;
        let listings = self.prepared_everywhere().await;
        let (logged, view) = self.view_of(&gid, &listings);
        let mut steps = Vec::new();
        let mut decision = logged;
        // Who decides by a local commit: the GID's last agent, or the participant of an
        // unsettled one-phase commit of an interactive transaction.
        let local_decider = gid.last_agent().or_else(|| {
            lock(&self.inner.unresolved)
                .get(&gid)
                .map(|u| u.last.clone())
        });
        let mut fenced_txn_id: Option<String> = None;
        if decision == Logged::None
            && local_decider.is_none()
            && !self.inner.all_decisions_read.load(Ordering::Relaxed)
        {
            // A GID naming nobody may be an interactive transaction's one-phase commit,
            // whose decision row only recovery's reading of the rows can find.
            return Err(TxnError::Conflict(format!(
                "recovery has not yet read every participant's decision rows, and {gid} may be \
                 among them; retry once every participant is reachable"
            )));
        }
        if let (Some(last), Logged::None) = (local_decider.clone(), decision) {
            // No record here: the last participant's decision row is the decision. The
            // fence settles it for good (a commit still in flight can no longer succeed).
            let settled = match self.inner.participants.get(&last) {
                Some(p) => self.settle(p, &gid, Duration::ZERO).await,
                None => None,
            };
            match settled {
                Some(s) => {
                    let what = if s.committed { "committed" } else { "aborted" };
                    steps.push(format!("fenced on {last} (the last participant): {what}"));
                    if !s.txn_id.is_empty() {
                        fenced_txn_id = Some(s.txn_id.clone());
                    }
                    // What the fence found is the outcome, recorded at once (the row may
                    // go, and a second fence would read it as aborted) — unless an
                    // operator is about to force an abort over it, which must not race
                    // a phase 2 that `adopt` would start.
                    let forcing_abort = s.committed && action == ResolveAction::Abort && force;
                    if !forcing_abort {
                        self.adopt(&gid, &s, &last);
                    } else {
                        lock(&self.inner.unresolved).remove(&gid);
                    }
                    if s.committed && action == ResolveAction::Commit {
                        steps.push(format!(
                            "{gid} is committed: phase 2 commits what is still prepared"
                        ));
                        return Ok(ResolveReport {
                            gid: gid.to_string(),
                            action,
                            dry_run,
                            steps,
                        });
                    }
                    decision = if s.committed {
                        Logged::CommittedLastAgent
                    } else {
                        Logged::Aborted
                    };
                }
                None if !force => {
                    return Err(TxnError::Conflict(format!(
                        "{gid} is decided by its last participant {last}, which could not be \
                         asked; bring it back, or use --force to decide without it"
                    )))
                }
                None => steps.push(format!(
                    "warning: could not ask {last}, whose commit decides {gid}"
                )),
            }
        }
        if let Err(refusal) = resolve::check(decision, action.into(), force) {
            return Err(TxnError::Conflict(refusal_message(refusal, &gid)));
        }
        let prepared_on: Vec<String> = view
            .branches
            .iter()
            .filter(|b| b.prepared.is_some())
            .map(|b| b.participant.clone())
            .collect();
        let unknown: Vec<String> = view
            .branches
            .iter()
            .filter(|b| b.error.is_some())
            .map(|b| b.participant.clone())
            .collect();
        if !unknown.is_empty() {
            steps.push(format!(
                "warning: could not ask {} whether the branch is prepared",
                unknown.join(", ")
            ));
        }
        let txn_id = fenced_txn_id
            .or_else(|| view.txn_id.clone())
            .unwrap_or_else(|| gid.to_string());
        match action {
            ResolveAction::Commit => {
                // A participant we could not ask may hold the branch prepared: include
                // it (COMMIT PREPARED of a GID that is not prepared is harmless).
                let mut pending = view.pending.clone();
                for p in prepared_on.iter().chain(&unknown) {
                    if !pending.contains(p) {
                        pending.push(p.clone());
                    }
                }
                if pending.is_empty() {
                    // A COMMIT naming nobody would be listed in doubt forever and pin its
                    // segment; and nothing is left to commit anyway.
                    if matches!(decision, Logged::CommittedDone | Logged::CommittedLastAgent) {
                        steps.push(format!(
                            "{gid} is already committed and no branch of it is prepared: nothing to do"
                        ));
                        return Ok(ResolveReport {
                            gid: gid.to_string(),
                            action,
                            dry_run,
                            steps,
                        });
                    }
                    return Err(TxnError::Conflict(format!(
                        "no branch of {gid} is prepared on any participant: there is nothing to \
                         commit (its branches were rolled back, or never prepared)"
                    )));
                }
                if logged != Logged::Committed {
                    steps.push(format!(
                        "log COMMIT {gid} (txn {txn_id}) for {}",
                        pending.join(", ")
                    ));
                }
                for p in &pending {
                    steps.push(format!("COMMIT PREPARED on {p}"));
                }
                if dry_run {
                    return Ok(ResolveReport {
                        gid: gid.to_string(),
                        action,
                        dry_run,
                        steps,
                    });
                }
                if logged != Logged::Committed {
                    let record = Record::Commit {
                        gid: gid.to_string(),
                        txn_id: txn_id.clone(),
                        participants: pending.clone(),
                        decided_at_ms: now_ms(),
                    };
                    if let Err(e) = self.inner.log.append_forced(record).await {
                        return Err(forced_log_error(&e));
                    }
                }
                warn!(%gid, %txn_id, pending = %pending.join(","), "operator resolved: COMMIT");
                self.remember(&txn_id, gid.as_str(), Outcome::Committed);
                {
                    let mut in_doubt = lock(&self.inner.in_doubt);
                    match in_doubt.get_mut(&gid) {
                        Some(d) => {
                            for p in &pending {
                                d.phase2.also_commit(p, &mut Vec::new());
                            }
                        }
                        None => {
                            let entry = InDoubt {
                                txn_id: txn_id.clone(),
                                phase2: self.decided(&pending),
                                decided_at: SystemTime::now(),
                            };
                            in_doubt.insert(gid.clone(), entry);
                        }
                    }
                }
                let wait = Duration::from_millis(self.inner.config.commit_wait_ms);
                let drivers = pending.into_iter().map(|p| {
                    let engine = self.clone();
                    let gid = gid.clone();
                    tokio::spawn(async move { engine.drive_commit(gid, p).await })
                });
                let _ = tokio::time::timeout(wait, join_all(drivers.collect::<Vec<_>>())).await;
            }
            ResolveAction::Abort => {
                steps.push(format!("log ABORT {gid} (txn {txn_id})"));
                for p in &prepared_on {
                    steps.push(format!("ROLLBACK PREPARED on {p}"));
                }
                if dry_run {
                    return Ok(ResolveReport {
                        gid: gid.to_string(),
                        action,
                        dry_run,
                        steps,
                    });
                }
                let record = Record::Abort {
                    gid: gid.to_string(),
                    txn_id: txn_id.clone(),
                    decided_at_ms: now_ms(),
                    reason: if force {
                        "operator (forced)".into()
                    } else {
                        "operator".into()
                    },
                };
                if let Err(e) = self.inner.log.append_forced(record).await {
                    return Err(forced_log_error(&e));
                }
                warn!(%gid, %txn_id, forced = force, "operator resolved: ABORT");
                lock(&self.inner.in_doubt).remove(&gid);
                lock(&self.inner.operator_aborted).insert(gid.clone());
                if let Some(last) = local_decider {
                    // A committed decision row would bring the commit back on the next
                    // recovery pass; the ABORT record is durable, so the row may go.
                    self.queue_forget(last, gid.clone());
                }
                self.remember(&txn_id, gid.as_str(), Outcome::Aborted);
                let timeout = Duration::from_millis(self.inner.config.call_timeout_ms);
                for name in &prepared_on {
                    if let Some(p) = self.inner.participants.get(name) {
                        match p.call(Request::Abort { gid: gid.clone() }, timeout).await {
                            Ok(Response::Aborted) => {}
                            other => steps.push(format!(
                                "warning: ROLLBACK PREPARED on {name} not acknowledged ({other:?}); recovery retries"
                            )),
                        }
                    }
                }
            }
        }
        Ok(ResolveReport {
            gid: gid.to_string(),
            action,
            dry_run,
            steps,
        })
    }
}

/// Runs `work` as its own task: a client that disconnects (dropping the request future)
/// must not cut a transaction off between two steps of the protocol, e.g. after its
/// decision is logged but before phase 2 starts, or before it leaves the live table.
///
/// The task is spawned at once, so the returned future holds only the join handle: the
/// request futures above it (axum's, hyper's) stay small instead of carrying the whole
/// transaction's state, which they would copy on every move.
fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, TxnError>> + Send + 'static,
) -> impl std::future::Future<Output = Result<T, TxnError>> {
    let handle = tokio::spawn(work);
    async move {
        match handle.await {
            Ok(r) => r,
            Err(e) => Err(TxnError::Internal(format!("transaction task failed: {e}"))),
        }
    }
}

/// A client statement may not end, start or prepare the transaction: twopc does that
/// (see `twopc_shared::sql::transaction_control`; the agent refuses them too). Nor may a
/// parameter nest deeper than `MAX_VALUE_DEPTH` (the agent's decoder would refuse the
/// whole frame, and with it the connection other transactions share).
fn check_statement(stmt: &Statement) -> Result<(), TxnError> {
    if let Some(i) = stmt
        .params
        .iter()
        .position(|p| twopc_shared::msg::value_depth(p) > twopc_shared::msg::MAX_VALUE_DEPTH)
    {
        return Err(TxnError::BadRequest(format!(
            "parameter ${}: nests arrays and objects deeper than {} levels",
            i + 1,
            twopc_shared::msg::MAX_VALUE_DEPTH
        )));
    }
    match twopc_shared::sql::transaction_control(&stmt.sql) {
        None => Ok(()),
        Some(what) => Err(TxnError::BadRequest(format!(
            "{what} is not allowed in a statement: twopc begins, prepares and finishes \
             the transaction itself (savepoints are allowed)"
        ))),
    }
}

/// The operator's message for a refused resolve.
fn refusal_message(refusal: Refusal, gid: &Gid) -> String {
    match refusal {
        Refusal::Running => format!("{gid} is running in this coordinator; it resolves itself"),
        Refusal::WouldSplit => format!(
            "{gid} is committed (in the decision log or on its last participant); aborting it \
             now would leave it committed on some participants and rolled back on others. \
             Use --force to do it anyway"
        ),
        Refusal::RecordedAborted => {
            format!("{gid} is recorded as aborted; use --force to commit it anyway")
        }
        Refusal::PresumedAborted => format!(
            "no COMMIT of {gid} is recorded anywhere, so it is already aborted (presumed \
             abort: recovery rolls it back, and GET answers aborted; its txn id may have \
             been retried and committed since). Use --force to commit it anyway, e.g. \
             after the decision log was lost"
        ),
    }
}

fn abort_info(
    txn_id: &str,
    participant: Option<&str>,
    code: &str,
    message: impl Into<String>,
    client_fault: bool,
) -> AbortInfo {
    AbortInfo {
        txn_id: txn_id.to_owned(),
        participant: participant.map(str::to_owned),
        code: Some(code.to_owned()),
        message: message.into(),
        client_fault,
    }
}

/// A branch's answer: its results and vote, or why the transaction must abort.
fn classify(
    participant: &str,
    txn_id: &str,
    resp: Result<Response, CallError>,
) -> Result<(Vec<StmtResult>, BranchOutcome), AbortInfo> {
    match resp {
        Ok(Response::Executed { results, outcome }) => Ok((results, outcome)),
        Ok(Response::Failed(e)) => Err(agent_abort(participant, txn_id, e)),
        Ok(other) => Err(abort_info(
            txn_id,
            Some(participant),
            "XX000",
            format!("unexpected answer from the agent: {other:?}"),
            false,
        )),
        Err(e @ CallError::TooLarge { .. }) => Err(abort_info(
            txn_id,
            Some(participant),
            "54000",
            e.to_string(),
            true,
        )),
        Err(e @ CallError::Timeout { .. }) => Err(abort_info(
            txn_id,
            Some(participant),
            "57014",
            e.to_string(),
            false,
        )),
        Err(e) => Err(abort_info(
            txn_id,
            Some(participant),
            "08006",
            e.to_string(),
            false,
        )),
    }
}

/// `name`'s vote as `tally` found it. No answer: the sequential fan-out stopped before
/// this branch was sent (a NO).
fn vote_of(votes: &HashMap<String, Vote>, name: &str) -> Vote {
    votes.get(name).copied().unwrap_or(Vote::No)
}

/// Why a transaction whose votes did not all say yes aborted: the failure `tally`
/// found, else a NO vote.
fn voted_no(txn_id: &str, failure: Option<AbortInfo>) -> AbortInfo {
    failure.unwrap_or_else(|| abort_info(txn_id, None, "XX000", "a branch voted no", false))
}

/// The last agent's answer to its commit, for the core's machine: what it says, the
/// results it carried, and (if it did not plainly commit) why, for the client.
fn last_answer(
    participant: &str,
    txn_id: &str,
    resp: Result<Response, CallError>,
) -> (LastAnswer, Vec<StmtResult>, Option<AbortInfo>) {
    // An answer of another kind than Executed or Failed proves nothing either way.
    let unclear = match &resp {
        Ok(Response::Failed(_)) | Err(_) => commit_may_have_happened(&resp),
        Ok(_) => true,
    };
    match classify(participant, txn_id, resp) {
        Ok((results, BranchOutcome::Committed)) => (LastAnswer::Committed, results, None),
        Ok((results, BranchOutcome::ReadOnly)) => (LastAnswer::ReadOnly, results, None),
        Ok((_, outcome)) => {
            let message = format!("unexpected outcome {outcome:?} of the last agent's commit");
            let info = abort_info(txn_id, Some(participant), "XX000", message, false);
            (LastAnswer::Uncertain, Vec::new(), Some(info))
        }
        Err(info) if unclear => (LastAnswer::Uncertain, Vec::new(), Some(info)),
        Err(info) => (LastAnswer::DidNotCommit, Vec::new(), Some(info)),
    }
}

/// The answer to a committing `Execute` (one-phase or last agent) leaves open whether the
/// commit happened.
fn commit_may_have_happened(resp: &Result<Response, CallError>) -> bool {
    match resp {
        Ok(Response::Failed(e)) => !refused_before_commit(e),
        Ok(_) => false,
        Err(CallError::Timeout { .. } | CallError::ConnectionLost { .. }) => true,
        Err(
            CallError::Unreachable { .. }
            | CallError::Handshake { .. }
            | CallError::TooLarge { .. },
        ) => false,
    }
}

/// The committing agent's answer proves its commit did not happen. The agent answers a
/// `commit`/`commit_decision` with a definite failure only when its probe or decision row
/// did not go in (`agent::decision_outcome`: a statement error a savepoint repaired does
/// not count), or when it refused the request before running it: `Limit` (including no
/// free database session in time) and `DatabaseUnreachable` (no session could be opened)
/// are such refusals. A timeout, a lost connection (`Unavailable`) or an unknown commit
/// outcome may hide a commit.
fn refused_before_commit(e: &AgentError) -> bool {
    match e.kind {
        ErrorKind::BadParam
        | ErrorKind::BadRequest
        | ErrorKind::UnknownBranch
        | ErrorKind::Limit
        | ErrorKind::DatabaseUnreachable
        | ErrorKind::VersionMismatch
        | ErrorKind::Fenced
        | ErrorKind::Unauthenticated
        | ErrorKind::Forbidden
        | ErrorKind::EpochOutOfRange
        | ErrorKind::Sql => true,
        ErrorKind::Timeout | ErrorKind::Unavailable | ErrorKind::Internal => false,
    }
}

fn agent_abort(participant: &str, txn_id: &str, e: AgentError) -> AbortInfo {
    let (code, client_fault) = match e.kind {
        ErrorKind::Sql => (e.sqlstate.clone().unwrap_or_else(|| "XX000".into()), false),
        // PostgreSQL's code when its input function refused the value, else ours.
        ErrorKind::BadParam => (e.sqlstate.clone().unwrap_or_else(|| "22023".into()), true),
        ErrorKind::Timeout => ("57014".to_owned(), false),
        ErrorKind::Unavailable => ("08006".to_owned(), false),
        ErrorKind::DatabaseUnreachable => ("08001".to_owned(), false),
        ErrorKind::Limit => ("53000".to_owned(), false),
        ErrorKind::BadRequest | ErrorKind::UnknownBranch => ("25000".to_owned(), false),
        // invalid_authorization_specification: the agent refused this coordinator.
        ErrorKind::Unauthenticated | ErrorKind::Forbidden => ("28000".to_owned(), false),
        ErrorKind::VersionMismatch
        | ErrorKind::Fenced
        | ErrorKind::EpochOutOfRange
        | ErrorKind::Internal => ("XX000".to_owned(), false),
    };
    let message = match e.statement_index {
        Some(i) => format!("statement {}: {}", i + 1, e.message),
        None => e.message,
    };
    AbortInfo {
        txn_id: txn_id.to_owned(),
        participant: Some(participant.to_owned()),
        code: Some(code),
        message,
        client_fault,
    }
}
