//! The agent: one PostgreSQL database behind a connection pool, driven by
//! [`Request`]s. The branch table is the agent's state machine:
//!
//! ```text
//!   (none) --Execute--> Busy --finish=Keep--> Idle(session) --Execute--> Busy ...
//!                        |--finish=Prepare--> (prepared in PostgreSQL; session back to pool)
//!                        |--finish=Commit---> (committed; session back to pool)
//!                        |--finish=CommitDecision--> (committed with its decision row)
//!                        `--error/timeout---> rolled back, tombstone
//!   Abort: Idle -> ROLLBACK; Busy -> rolled back when the statements finish;
//!          none -> ROLLBACK PREPARED if prepared; always leaves a tombstone so a late
//!          Execute for the same GID cannot prepare it again.
//!   Reaper: Idle past both the idle rule and its transaction's lifetime -> Abort.
//!   Handshake with a newer epoch of a coordinator id: that id's older-epoch branches
//!          are aborted (Idle at once, Busy when they finish); prepared ones are left
//!          to the new incarnation's recovery.
//! ```
//!
//! Prepared branches live in PostgreSQL (`pg_prepared_xacts`), not in this table: the
//! agent keeps no state that a restart would lose.
//!
//! Last-agent commit: the agent keeps a decision table (`twopc.decisions`) in its
//! database. `CommitDecision` inserts the transaction's row (committed) in the branch's
//! own local transaction, so that commit is the decision; `Fence` inserts an aborted row
//! unless one exists (the primary key makes it wait for a commit in flight, and makes a
//! later one fail), and reads the row back.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, TimeoutType,
};
use futures::future::{join_all, BoxFuture, FutureExt};
use futures::TryStreamExt;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::NoTls;
use tracing::{debug, info, warn, Instrument};
use twopc_shared::gid::Gid;
use twopc_shared::msg::{
    AgentError, BranchOutcome, CommitAck, DecisionRow, ErrorKind, ExecuteBranch, Finish, Isolation,
    PreparedBranch, Request, Response, StmtResult, FORGET_MAX_GIDS, LIST_DECISIONS_MAX,
};
use twopc_shared::sql::{starts_with_dml, transaction_control};
use twopc_shared::{BUILD_VERSION, PROTOCOL_VERSION};

use crate::convert::{check_params, ConvertError, JsonParam};
use crate::decode::{decode_row, resolve_pending, Plan};

mod epochs;
mod schema;
pub use epochs::{EPOCH_TABLE, MAX_EPOCH_STEP};

/// SQLSTATE `undefined_object`: `COMMIT/ROLLBACK PREPARED` of a GID that is not prepared.
const SQLSTATE_UNDEFINED_OBJECT: &str = "42704";

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Name the agent reports in the handshake (the participant name).
    pub name: String,
    /// `postgresql://user@host:port/db` of the database this agent fronts. Client
    /// statements run as this role.
    pub database_url: String,
    /// The same database as the role that owns schema `twopc` (the decision and epoch
    /// tables; see `agent::schema`). None: the client role keeps them, and client
    /// statements can then read and write them (warned at start).
    pub system_database_url: Option<String>,
    /// Password for `database_url` (and `system_database_url` if `system_password` is
    /// None), when it is not in the URL: read from a file or the environment, so it
    /// need not appear on a command line.
    pub password: Option<String>,
    /// Password for `system_database_url`, when it is not in that URL.
    pub system_password: Option<String>,
    /// Sessions in the pool (open interactive branches each hold one).
    pub pool_size: usize,
    /// Branches with an open session at once; more get [`ErrorKind::Limit`].
    pub max_open_branches: usize,
    /// Prepared statements cached per session before the cache is cleared.
    pub statement_cache_max: usize,
    /// Statements in one `Execute`.
    pub max_statements_per_request: usize,
    /// How long `Agent::connect` keeps trying to reach the database.
    pub connect_timeout_ms: u64,
    /// Waiting for a free session from the pool.
    pub pool_wait_timeout_ms: u64,
    /// Aborted GIDs remembered so a late `Execute` cannot resurrect them.
    pub tombstones_max: usize,
    /// An open (unprepared) branch with no request for this long is rolled back: its
    /// coordinator is gone or forgot it. Keep it above the coordinator's idle timeout.
    /// A branch whose transaction's lifetime (`ExecuteBranch::expires_in_ms`) ends later
    /// is kept until then.
    pub idle_branch_timeout_ms: u64,
    /// Longest transaction lifetime the agent honours for an open branch (a longer
    /// `expires_in_ms` is cut to this). Keep it at the coordinator's `max_timeout_ms`.
    pub max_branch_lifetime_ms: u64,
    /// Session settings (0 = PostgreSQL's default, no limit): a runaway statement, a
    /// lock wait, or a session left idle in a transaction is cut off by the server.
    pub statement_timeout_ms: u64,
    pub lock_timeout_ms: u64,
    pub idle_in_transaction_timeout_ms: u64,
    /// Branches this agent keeps prepared at once; 0 = the server's
    /// `max_prepared_transactions` (which is server-wide: lower it if other software
    /// prepares transactions too).
    pub max_prepared_branches: u64,
    /// Keep the decision table (`twopc.decisions`, created if missing) so this agent can
    /// commit last. Without it, or without the privilege to create or write it, the
    /// agent tells the coordinator in the handshake and is never chosen to commit last.
    pub decision_table: bool,
    /// Aborted (fence) rows of the decision table are kept this long, then deleted: a
    /// commit of the same GID arriving later would succeed. Keep it far above the
    /// coordinator's longest transaction timeout.
    pub decision_retention_ms: u64,
    /// Result rows of one request are counted as they are read, and the request fails
    /// once they pass this many bytes (as JSON): the answer must fit in a frame.
    pub max_result_bytes: u64,
}

/// The decision table (see [`schema`]).
pub const DECISION_TABLE: &str = "twopc.decisions";
/// Prepared transactions of this agent's database and role: the facts behind
/// `Inner::prepared`.
const COUNT_PREPARED: &str = "SELECT count(*) FROM pg_prepared_xacts \
     WHERE database = current_database() AND owner = current_user";
/// How long a request waits for a free session before it is refused with `Limit`
/// (retryable; nothing ran): long enough to ride out a burst of one-shot branches, short
/// enough that a pool held by open interactive branches answers at once rather than near
/// the request's deadline.
pub const DEFAULT_POOL_WAIT_TIMEOUT_MS: u64 = 500;
/// Sessions of the system role at most (see `Inner::system`).
const SYSTEM_POOL_MAX: usize = 8;
/// How often `Inner::prepared` is reset from [`COUNT_PREPARED`].
const PREPARED_RECOUNT_INTERVAL: Duration = Duration::from_secs(5);
/// `idle_in_transaction_session_timeout` of a branch whose transaction outlives the
/// session's setting: its lifetime plus this, so the agent's own reaper (which runs at
/// most 5 s late) ends it first and the server's cut-off stays a backstop.
const IDLE_IN_TRANSACTION_MARGIN_MS: u64 = 10_000;
/// Runs right before PREPARE TRANSACTION. A prepared transaction belongs to the role
/// current at PREPARE, and only that role (or a superuser) may finish it or see it in
/// the agent's listings: a branch that ran `SET ROLE other` would leave a prepared
/// transaction the agent can neither commit nor recover. The role goes back to the
/// agent's own for the rest of the transaction (PREPARE itself), and only when it was
/// changed, so the common case changes no setting (see `begin_sql`).
const OWN_ROLE_BEFORE_PREPARE: &str =
    "SELECT CASE WHEN current_user OPERATOR(pg_catalog.<>) session_user \
     THEN pg_catalog.set_config('role', 'none', true) END";
/// Whether the branch wrote nothing (so a read-only vote may commit it at once).
const READ_ONLY_CHECK: &str = "SELECT pg_catalog.txid_current_if_assigned() IS NULL";
/// Runs right before a one-phase COMMIT: it fails in an aborted transaction, so its
/// success and COMMIT's together prove the commit (`decision_outcome`).
const COMMIT_PROBE: &str = "SELECT 1";
const DECISION_FENCE: &str = "INSERT INTO twopc.decisions (gid, committed) VALUES ($1, false) \
     ON CONFLICT (gid) DO NOTHING";
const DECISION_READ: &str =
    "SELECT committed, txn_id, participants FROM twopc.decisions WHERE gid = $1";
const DECISION_FORGET: &str = "DELETE FROM twopc.decisions WHERE committed AND gid = ANY($1)";
const DECISION_EXPIRE: &str = "DELETE FROM twopc.decisions \
     WHERE NOT committed AND decided_at < now() - make_interval(secs => $1)";

impl AgentConfig {
    pub fn new(name: impl Into<String>, database_url: impl Into<String>) -> AgentConfig {
        AgentConfig {
            name: name.into(),
            database_url: database_url.into(),
            system_database_url: None,
            password: None,
            system_password: None,
            pool_size: 32,
            max_open_branches: 256,
            statement_cache_max: 512,
            max_statements_per_request: 1000,
            connect_timeout_ms: 10_000,
            pool_wait_timeout_ms: DEFAULT_POOL_WAIT_TIMEOUT_MS,
            tombstones_max: 100_000,
            idle_branch_timeout_ms: 300_000,
            max_branch_lifetime_ms: 600_000,
            statement_timeout_ms: 60_000,
            lock_timeout_ms: 30_000,
            idle_in_transaction_timeout_ms: 360_000,
            max_prepared_branches: 0,
            decision_table: true,
            decision_retention_ms: 3_600_000,
            max_result_bytes: twopc_shared::codec::DEFAULT_MAX_FRAME_BYTES as u64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentStartError {
    #[error("invalid database URL: {0}")]
    Url(#[source] tokio_postgres::Error),
    #[error("cannot reach the database: {0}")]
    Connect(String),
    #[error(
        "max_prepared_transactions is 0 on the database: PREPARE TRANSACTION would fail. \
         Set max_prepared_transactions (e.g. 100) in postgresql.conf and restart PostgreSQL"
    )]
    NoPreparedTransactions,
}

/// One branch with an open local transaction.
enum Branch {
    /// Waiting for more statements: its session, idle since `since`, and the end of its
    /// transaction's lifetime if the coordinator said (it is kept at least that long).
    Idle {
        session: Box<Object>,
        since: Instant,
        expires_at: Option<Instant>,
    },
    /// A request is running statements on it.
    Busy { abort_requested: bool },
}

impl Branch {
    /// An idle branch is rolled back once it has been idle past the idle rule and its
    /// transaction's lifetime is over, whichever ends later.
    fn expired(&self, now: Instant, idle: Duration) -> bool {
        match self {
            Branch::Idle {
                since, expires_at, ..
            } => {
                now.saturating_duration_since(*since) > idle
                    && expires_at.is_none_or(|end| now > end)
            }
            Branch::Busy { .. } => false,
        }
    }
}

/// Whether a branch being forgotten may be prepared in PostgreSQL, and if so whether
/// `Inner::prepared` counted it (it did exactly when the agent saw its PREPARE succeed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MaybePrepared {
    No,
    Counted,
    /// The request was cut off around its PREPARE: it may have happened, uncounted.
    Uncounted,
}

struct Tombstones {
    set: HashSet<Gid>,
    order: VecDeque<Gid>,
    max: usize,
}

impl Tables {
    /// Takes the idle branches of `coordinator_id` from epochs before `epoch` out of the
    /// table, and marks its busy ones so their running request rolls them back when it
    /// ends. Both leave a tombstone.
    fn take_older_branches(&mut self, coordinator_id: &str, epoch: u64) -> Vec<(Gid, Box<Object>)> {
        let older: Vec<Gid> = self
            .branches
            .keys()
            .filter(|g| g.coordinator_id() == coordinator_id && g.epoch() < epoch)
            .cloned()
            .collect();
        let mut idle = Vec::new();
        for gid in older {
            self.tombstones.insert(gid.clone());
            match self.branches.remove(&gid) {
                Some(Branch::Idle { session, .. }) => idle.push((gid, session)),
                Some(Branch::Busy { .. }) => {
                    self.branches.insert(
                        gid,
                        Branch::Busy {
                            abort_requested: true,
                        },
                    );
                }
                None => {}
            }
        }
        idle
    }

    /// `gid` comes from an epoch of its coordinator older than the newest seen.
    fn is_of_an_older_epoch(&self, gid: &Gid) -> bool {
        self.epochs
            .get(gid.coordinator_id())
            .is_some_and(|&newest| gid.epoch() < newest)
    }
}

impl Tombstones {
    fn insert(&mut self, gid: Gid) {
        if self.set.insert(gid.clone()) {
            self.order.push_back(gid);
            while self.order.len() > self.max {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

struct Tables {
    branches: HashMap<Gid, Branch>,
    /// Open branches that ran a statement changing session state (see
    /// `twopc_shared::sql::changes_session`): their session is closed, not pooled, when
    /// the branch ends, so the change cannot reach another transaction.
    tainted: HashSet<Gid>,
    tombstones: Tombstones,
    /// Newest epoch seen per coordinator id (fencing), loaded at start from
    /// [`EPOCH_TABLE`] and written there before a newer one is accepted (see
    /// `epochs::admit`); memory only if the table is unusable (`Inner::epochs_durable`).
    epochs: HashMap<String, u64>,
}

struct Inner {
    config: AgentConfig,
    /// Prepared transactions of this database and role, as far as the agent saw them
    /// begin and end: a cheap hint for the limit check, not the truth. Some ends are
    /// unseen (a COMMIT PREPARED that ran but timed out, someone else's ROLLBACK
    /// PREPARED) and some beginnings too (a PREPARE cut off by a deadline), so it is
    /// reset from `pg_prepared_xacts` periodically (`spawn_prepared_recount`) and before
    /// any refusal (`check_prepared_limit`).
    prepared: AtomicU64,
    prepared_limit: u64,
    /// Sessions of the client role: branches run here.
    pool: Pool,
    /// Sessions of the system role, which owns schema `twopc` (the same pool when no
    /// system role is configured): fences, listings and the epoch table run here, never
    /// a client statement.
    system: Pool,
    database: String,
    owner: String,
    /// The decision table is usable: this agent can commit last.
    decisions: bool,
    /// The secret `twopc.record_commit_v1` demands (see [`schema`]).
    decision_token: String,
    /// Why client statements can reach the `twopc` schema, if they can.
    unprotected: Option<String>,
    /// The epoch table is usable: fencing survives a restart of the agent.
    epochs_durable: bool,
    tables: Mutex<Tables>,
}

/// The participant agent. Cheap to clone; embed it in any tokio program or serve it over
/// TCP with [`crate::server::serve`].
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

impl Agent {
    /// Builds the pools and checks the database: reachable, and prepared transactions
    /// enabled; sets up the `twopc` schema (see [`schema`]).
    pub async fn connect(config: AgentConfig) -> Result<Agent, AgentStartError> {
        let pool = build_pool(
            &config.database_url,
            config.password.as_deref(),
            &config,
            config.pool_size,
            "",
        )?;
        let system_pool = match &config.system_database_url {
            Some(url) => Some(build_pool(
                url,
                config
                    .system_password
                    .as_deref()
                    .or(config.password.as_deref()),
                &config,
                config.pool_size.clamp(1, SYSTEM_POOL_MAX),
                // Whatever the database's or a role's default: the system role's
                // queries must not resolve a name through a schema a client owns.
                " -c search_path=pg_catalog",
            )?),
            None => None,
        };
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(config.connect_timeout_ms);
        let client = first_session(&pool, deadline).await?;
        let row = client
            .query_one(
                "SELECT current_database()::text, current_user::text, \
                 current_setting('max_prepared_transactions')::int",
                &[],
            )
            .await
            .map_err(|e| AgentStartError::Connect(e.to_string()))?;
        let database: String = row.get(0);
        let owner: String = row.get(1);
        let max_prepared: i32 = row.get(2);
        if max_prepared == 0 {
            return Err(AgentStartError::NoPreparedTransactions);
        }
        let already: i64 = client
            .query_one(COUNT_PREPARED, &[])
            .await
            .map_err(|e| AgentStartError::Connect(e.to_string()))?
            .get(0);
        let prepared_limit = match config.max_prepared_branches {
            0 => max_prepared as u64,
            n => n.min(max_prepared as u64),
        };
        let system = match &system_pool {
            Some(p) => first_session(p, deadline).await?,
            None => client,
        };
        let schema = if config.decision_table {
            schema::set_up(&system, &owner).await
        } else {
            schema::Schema::none()
        };
        let decisions = schema.decisions;
        let (epochs, epochs_durable) = match epochs::load(&system).await {
            Some(epochs) => (epochs, true),
            None => (HashMap::new(), false),
        };
        drop(system);
        info!(
            name = %config.name,
            %database,
            %owner,
            max_prepared,
            decisions,
            schema_protected = schema.unprotected.is_none(),
            "agent connected"
        );
        let tombstones_max = config.tombstones_max;
        let agent = Agent {
            inner: Arc::new(Inner {
                config,
                prepared: AtomicU64::new(already.max(0) as u64),
                prepared_limit,
                system: system_pool.unwrap_or_else(|| pool.clone()),
                pool,
                database,
                owner,
                decisions,
                decision_token: schema.token,
                unprotected: schema.unprotected,
                epochs_durable,
                tables: Mutex::new(Tables {
                    branches: HashMap::new(),
                    tainted: HashSet::new(),
                    tombstones: Tombstones {
                        set: HashSet::new(),
                        order: VecDeque::new(),
                        max: tombstones_max,
                    },
                    epochs,
                }),
            }),
        };
        agent.spawn_idle_reaper();
        agent.spawn_prepared_recount();
        if decisions {
            agent.spawn_decision_expiry();
        }
        Ok(agent)
    }

    /// Deletes aborted (fence) rows older than `decision_retention_ms`, every minute.
    fn spawn_decision_expiry(&self) {
        let weak = Arc::downgrade(&self.inner);
        let retention_s = self.inner.config.decision_retention_ms as f64 / 1000.0;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                let Some(inner) = weak.upgrade() else { return };
                let agent = Agent { inner };
                let Ok(session) = agent.system_session().await else {
                    continue;
                };
                match session.execute(DECISION_EXPIRE, &[&retention_s]).await {
                    Ok(0) => {}
                    Ok(rows) => debug!(rows, "expired aborted decision rows"),
                    Err(e) => warn!(error = %e, "expiring aborted decision rows failed"),
                }
            }
        });
    }

    /// This agent can commit last (it has a usable decision table).
    pub fn keeps_decisions(&self) -> bool {
        self.inner.decisions
    }

    /// Rolls back open branches idle for longer than `idle_branch_timeout_ms` whose
    /// transaction's lifetime is over too (see [`Branch::expired`]). The task holds only
    /// a weak reference and ends with the agent.
    fn spawn_idle_reaper(&self) {
        let weak = Arc::downgrade(&self.inner);
        let idle = Duration::from_millis(self.inner.config.idle_branch_timeout_ms);
        let period = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(inner) = weak.upgrade() else { return };
                let agent = Agent { inner };
                let now = Instant::now();
                let expired: Vec<(Gid, Duration)> = agent
                    .tables()
                    .branches
                    .iter()
                    .filter_map(|(gid, b)| match b {
                        Branch::Idle { since, .. } if b.expired(now, idle) => {
                            Some((gid.clone(), now - *since))
                        }
                        _ => None,
                    })
                    .collect();
                for (gid, idle_for) in expired {
                    warn!(%gid, idle_ms = idle_for.as_millis() as u64,
                        "rolling back an open branch: no statement within the idle timeout, and its transaction's lifetime is over");
                    let _ = agent.abort(gid, Duration::from_secs(10)).await;
                }
            }
        });
    }

    /// Resets the prepared-branch count from `pg_prepared_xacts` every
    /// [`PREPARED_RECOUNT_INTERVAL`], so an end or a beginning the agent did not see
    /// cannot skew the limit check for long.
    fn spawn_prepared_recount(&self) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PREPARED_RECOUNT_INTERVAL).await;
                let Some(inner) = weak.upgrade() else { return };
                let agent = Agent { inner };
                if let Err(e) = agent.recount_prepared().await {
                    debug!(error = %e, "could not recount prepared branches; next period retries");
                }
            }
        });
    }

    /// Reads the number of prepared transactions of this database and role and makes it
    /// the count. A PREPARE or COMMIT PREPARED finishing during the query may leave it one
    /// off until the next recount; refusals re-read it first (`check_prepared_limit`).
    async fn recount_prepared(&self) -> Result<u64, AgentError> {
        let session = self.session().await?;
        let row = session
            .query_one(COUNT_PREPARED, &[])
            .await
            .map_err(|e| agent_error(&e, None))?;
        let counted: i64 = row.try_get(0).map_err(|e| agent_error(&e, None))?;
        let counted = counted.max(0) as u64;
        let before = self.inner.prepared.swap(counted, Ordering::Relaxed);
        if before != counted {
            debug!(
                before,
                counted, "prepared-branch count corrected from pg_prepared_xacts"
            );
        }
        Ok(counted)
    }

    /// Refuses a PREPARE only when the database really holds `prepared_limit` prepared
    /// transactions of ours: the count is a hint, so reaching the limit by it costs one
    /// query to check (a normal PREPARE costs nothing extra).
    async fn check_prepared_limit(&self, timeout: Duration) -> Result<(), Response> {
        let limit = self.inner.prepared_limit;
        if self.inner.prepared.load(Ordering::Relaxed) < limit {
            return Ok(());
        }
        let counted = match tokio::time::timeout(timeout, self.recount_prepared()).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(Response::Failed(e)),
            Err(_) => {
                return Err(failed(
                    ErrorKind::Timeout,
                    "counting prepared branches did not finish in time",
                ))
            }
        };
        if counted >= limit {
            return Err(failed(
                ErrorKind::Limit,
                format!(
                    "{counted} branches prepared; the limit is {limit} (max_prepared_branches, \
                     or the server's max_prepared_transactions)"
                ),
            ));
        }
        Ok(())
    }

    /// Closes the session pool: idle sessions end at once (cleanly, with a Terminate
    /// message), sessions in use end when their request finishes, and later requests
    /// fail. For an orderly stop, before the database goes away.
    pub fn close(&self) {
        self.inner.pool.close();
        self.inner.system.close();
    }

    /// Why client statements can read or write the `twopc` schema (one role for both,
    /// a superuser client role, ...), or None when they cannot.
    pub fn schema_unprotected(&self) -> Option<&str> {
        self.inner.unprotected.as_deref()
    }

    pub fn name(&self) -> &str {
        &self.inner.config.name
    }

    /// Fencing: records `epoch` for `coordinator_id` if it is the newest seen, and
    /// refuses an epoch older than the newest (a stale incarnation of that coordinator).
    ///
    /// A newer epoch means the older incarnations of that coordinator id are dead or
    /// fenced, so none of their open branches can ever commit: they are rolled back now
    /// (in the background), not after the idle timeout, which would hold their locks for
    /// minutes. Prepared ones are left to the new incarnation's recovery, which resolves
    /// them by its log.
    pub fn check_epoch(&self, coordinator_id: &str, epoch: u64) -> Result<(), AgentError> {
        let stale = {
            let mut t = self.tables();
            match t.epochs.get(coordinator_id) {
                Some(&newest) if epoch < newest => {
                    return Err(AgentError::new(
                        ErrorKind::Fenced,
                        format!(
                            "coordinator {coordinator_id} epoch {epoch} is older than epoch \
                             {newest} already seen; a newer incarnation is running"
                        ),
                    ));
                }
                Some(&newest) if epoch == newest => return Ok(()),
                _ => {}
            }
            t.epochs.insert(coordinator_id.to_owned(), epoch);
            t.take_older_branches(coordinator_id, epoch)
        };
        if !stale.is_empty() {
            self.roll_back_older_incarnation(coordinator_id, epoch, stale);
        }
        Ok(())
    }

    /// Rolls back the idle branches an older incarnation of `coordinator_id` left open
    /// (taken from the table by [`Tables::take_older_branches`]).
    fn roll_back_older_incarnation(
        &self,
        coordinator_id: &str,
        epoch: u64,
        stale: Vec<(Gid, Box<Object>)>,
    ) {
        warn!(
            coordinator_id,
            epoch,
            branches = stale.len(),
            "a newer incarnation of this coordinator connected; rolling back the open branches of its older epochs"
        );
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to roll back on: closing the sessions makes PostgreSQL roll the
            // transactions back.
            for (gid, session) in stale {
                self.retire(&gid, None);
                drop(Object::take(*session));
            }
            return;
        };
        let agent = self.clone();
        runtime.spawn(async move {
            for (gid, session) in stale {
                let span = tracing::info_span!("stale_branch", gid = %gid);
                agent
                    .roll_back_and_retire(&gid, *session)
                    .instrument(span)
                    .await;
            }
        });
    }

    pub fn database(&self) -> &str {
        &self.inner.database
    }

    /// Number of branches holding an open session.
    pub fn open_branches(&self) -> usize {
        self.tables().branches.len()
    }

    /// Handles one request within `timeout`. This is the whole agent: the TCP server and
    /// in-process callers both come through here.
    pub async fn handle(&self, request: Request, timeout: Duration) -> Response {
        match request {
            Request::Hello {
                protocol_version,
                coordinator_id,
                epoch,
                ..
            } => {
                if protocol_version != PROTOCOL_VERSION {
                    return failed(
                        ErrorKind::VersionMismatch,
                        format!(
                            "protocol version {protocol_version} not supported; this agent speaks {PROTOCOL_VERSION}"
                        ),
                    );
                }
                if let Err(e) = self.admit_epoch(&coordinator_id, epoch, timeout).await {
                    return Response::Failed(e);
                }
                Response::Hello {
                    protocol_version: PROTOCOL_VERSION,
                    agent_name: self.inner.config.name.clone(),
                    database: self.inner.database.clone(),
                    build_version: BUILD_VERSION.to_owned(),
                    decisions: self.inner.decisions,
                    epochs_durable: self.inner.epochs_durable,
                    proof: None,
                }
            }
            Request::Authenticate { .. } => failed(
                ErrorKind::BadRequest,
                "Authenticate belongs to the handshake of a TCP connection",
            ),
            Request::Ping => Response::Pong,
            Request::Execute(exec) => {
                let span = tracing::info_span!("execute", gid = %exec.gid, finish = ?exec.finish);
                self.execute(exec, timeout).instrument(span).await
            }
            Request::CommitPrepared { gid } => {
                let span = tracing::info_span!("commit_prepared", gid = %gid);
                self.commit_prepared(gid, timeout).instrument(span).await
            }
            Request::Abort { gid } => {
                let span = tracing::info_span!("abort", gid = %gid);
                self.abort(gid, timeout).instrument(span).await
            }
            Request::ListPrepared { gid_prefix } => self.list_prepared(&gid_prefix, timeout).await,
            Request::Fence { gid } => {
                let span = tracing::info_span!("fence", gid = %gid);
                self.fence(gid, timeout).instrument(span).await
            }
            Request::Forget { gids } => self.forget(gids, timeout).await,
            Request::ListDecisions { gid_prefix } => {
                self.list_decisions(&gid_prefix, timeout).await
            }
        }
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        // A panic while holding this lock is a bug; the table itself stays consistent
        // (every mutation is a single insert/remove), so carry on with it.
        self.inner
            .tables
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The branch `gid` ended: its taint mark goes, and its session (if it still has one,
    /// with no transaction open) goes back to the pool, or is closed if the branch
    /// changed session state.
    fn retire(&self, gid: &Gid, session: Option<Object>) {
        let tainted = self.tables().tainted.remove(gid);
        match session {
            Some(s) if tainted => {
                debug!(%gid, "branch changed session state; closing its session instead of pooling it");
                drop(Object::take(s));
            }
            session => drop(session),
        }
    }

    /// Rolls back the open transaction on a branch's session, then retires it; a session
    /// whose ROLLBACK failed is closed.
    async fn roll_back_and_retire(&self, gid: &Gid, session: Object) {
        let cached = session.statement_cache.size();
        match reset_session(&session, cached, true).await {
            Step::Reset(Ok(true)) => self.retire(gid, Some(session)),
            Step::Reset(Err(e)) => {
                warn!(error = %e, "rollback failed; discarding session");
                self.retire(gid, None);
                drop(Object::take(session));
            }
            _ => {
                debug!(%gid, "session not clean after its branch; closing it");
                self.retire(gid, None);
                drop(Object::take(session));
            }
        }
    }

    /// A prepared branch of ours was seen to end (COMMIT or ROLLBACK PREPARED succeeded).
    fn prepared_done(&self) {
        let _ = self
            .inner
            .prepared
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
    }

    async fn execute(&self, exec: ExecuteBranch, timeout: Duration) -> Response {
        let deadline = tokio::time::Instant::now() + timeout;
        if exec.finish == Finish::Prepare {
            if let Err(refused) = self.check_prepared_limit(timeout).await {
                return refused;
            }
        }
        if exec.finish == Finish::CommitDecision {
            if !self.inner.decisions {
                return failed(
                    ErrorKind::BadRequest,
                    "this agent keeps no decision table, so it cannot commit last",
                );
            }
            if exec.decision.is_none() {
                return failed(ErrorKind::BadRequest, "commit_decision without a decision");
            }
        }
        if exec.statements.len() > self.inner.config.max_statements_per_request {
            return failed(
                ErrorKind::Limit,
                format!(
                    "{} statements in one request; the limit is {}",
                    exec.statements.len(),
                    self.inner.config.max_statements_per_request
                ),
            );
        }
        if let Some((index, what)) = exec
            .statements
            .iter()
            .enumerate()
            .find_map(|(i, s)| transaction_control(&s.sql).map(|w| (i, w)))
        {
            let mut err = AgentError::new(
                ErrorKind::BadRequest,
                format!("{what} in a statement: the agent begins and finishes each branch itself"),
            );
            err.statement_index = Some(index);
            return Response::Failed(err);
        }
        let lifetime_ms = exec
            .expires_in_ms
            .map(|ms| ms.min(self.inner.config.max_branch_lifetime_ms));
        let mut expires_at =
            lifetime_ms.and_then(|ms| Instant::now().checked_add(Duration::from_millis(ms)));
        // Claim the branch.
        let existing = {
            let mut t = self.tables();
            match t.branches.remove(&exec.gid) {
                Some(Branch::Idle {
                    session,
                    expires_at: before,
                    ..
                }) => {
                    let session = *session;
                    expires_at = expires_at.or(before);
                    t.branches.insert(
                        exec.gid.clone(),
                        Branch::Busy {
                            abort_requested: false,
                        },
                    );
                    Some(session)
                }
                Some(busy @ Branch::Busy { .. }) => {
                    t.branches.insert(exec.gid.clone(), busy);
                    return failed(
                        ErrorKind::BadRequest,
                        "branch is busy with another request; statements of one branch run one at a time",
                    );
                }
                None => {
                    if t.tombstones.set.contains(&exec.gid) {
                        return failed(
                            ErrorKind::UnknownBranch,
                            "branch was already aborted or finished",
                        );
                    }
                    if exec.continues {
                        return failed(
                            ErrorKind::UnknownBranch,
                            "branch is not open here (the agent restarted or its session was lost); its earlier statements are gone",
                        );
                    }
                    // Checked under the same lock `check_epoch` takes the older
                    // incarnation's branches under, so none can slip in after it.
                    if t.is_of_an_older_epoch(&exec.gid) {
                        return failed(
                            ErrorKind::Fenced,
                            "the branch belongs to an older epoch of its coordinator; a newer incarnation is running",
                        );
                    }
                    if t.branches.len() >= self.inner.config.max_open_branches {
                        return failed(
                            ErrorKind::Limit,
                            format!(
                                "{} branches open; the limit is {}",
                                t.branches.len(),
                                self.inner.config.max_open_branches
                            ),
                        );
                    }
                    t.branches.insert(
                        exec.gid.clone(),
                        Branch::Busy {
                            abort_requested: false,
                        },
                    );
                    None
                }
            }
        };
        let is_new = existing.is_none();

        let result =
            tokio::time::timeout_at(deadline, self.run_branch(existing, &exec, lifetime_ms)).await;
        let (session, result) = match result {
            Ok(r) => r,
            Err(_elapsed) => {
                // The statements were cut off mid-flight: the session's state is unknown,
                // so it was dropped (closing it makes PostgreSQL roll back an open
                // transaction). A PREPARE that raced the deadline is rolled back by
                // `forget_branch`.
                warn!(timeout_ms = timeout.as_millis() as u64, "branch timed out");
                Box::pin(self.forget_branch(&exec.gid, None, MaybePrepared::Uncounted)).await;
                return failed(
                    ErrorKind::Timeout,
                    format!("branch did not finish within {} ms", timeout.as_millis()),
                );
            }
        };

        let abort_requested = {
            let mut t = self.tables();
            match t.branches.remove(&exec.gid) {
                Some(Branch::Busy { abort_requested }) => abort_requested,
                _ => false,
            }
        };

        match result {
            Err(err) => {
                // The branch is rolled back: a NO vote. Rows that could not be returned
                // (BadRequest) fail after the pipeline's PREPARE ran: that is rolled back
                // too.
                let after_prepare =
                    matches!(&err, Response::Failed(e) if e.kind == ErrorKind::BadRequest);
                let maybe = if exec.finish == Finish::Prepare && after_prepare {
                    MaybePrepared::Uncounted
                } else {
                    MaybePrepared::No
                };
                Box::pin(self.forget_branch(&exec.gid, session, maybe)).await;
                err
            }
            Ok(ran) => {
                let prepared = ran.outcome == BranchOutcome::Prepared;
                if prepared {
                    // Counted as soon as its PREPARE is seen to succeed, whatever comes
                    // next: the ROLLBACK or COMMIT PREPARED that ends it uncounts it.
                    self.inner.prepared.fetch_add(1, Ordering::Relaxed);
                }
                let committed = matches!(
                    ran.outcome,
                    BranchOutcome::Committed | BranchOutcome::ReadOnly
                );
                // An abort that arrives while the branch commits comes too late: the
                // commit stands and is what we report.
                if abort_requested && !committed {
                    let maybe_prepared = if prepared {
                        MaybePrepared::Counted
                    } else {
                        MaybePrepared::No
                    };
                    Box::pin(self.forget_branch(&exec.gid, session, maybe_prepared)).await;
                    return failed(ErrorKind::UnknownBranch, "branch was aborted while it ran");
                }
                match ran.outcome {
                    BranchOutcome::Active => {
                        if let Some(s) = session {
                            self.tables().branches.insert(
                                exec.gid.clone(),
                                Branch::Idle {
                                    session: Box::new(s),
                                    since: Instant::now(),
                                    expires_at,
                                },
                            );
                        }
                    }
                    BranchOutcome::Prepared
                    | BranchOutcome::ReadOnly
                    | BranchOutcome::Committed => {
                        // No transaction is open on it any more.
                        self.retire(&exec.gid, session);
                    }
                }
                if prepared
                    && crate::failpoint::check("participant.commit_voted_no")
                        == Some(crate::failpoint::Action::Skip)
                {
                    // A deliberately broken agent for the chaos driver's can-it-tell run:
                    // it votes NO and commits the branch all the same.
                    let _ = Box::pin(self.commit_prepared(exec.gid.clone(), timeout)).await;
                    return failed(
                        ErrorKind::Internal,
                        "failpoint participant.commit_voted_no: voting no",
                    );
                }
                if prepared {
                    crate::failpoint!("participant.after_prepare");
                }
                if exec.finish == Finish::CommitDecision {
                    crate::failpoint!("participant.after_commit_decision");
                }
                debug!(new = is_new, outcome = ?ran.outcome, "branch executed");
                Response::Executed {
                    results: ran.results,
                    outcome: ran.outcome,
                }
            }
        }
    }

    /// Runs the statements of `exec` on the branch's session (a fresh one from the pool if
    /// `existing` is `None`), pipelined with `BEGIN` and the finishing command in one round
    /// trip. Returns the session (if it is still usable) and the result. `lifetime_ms`:
    /// what is left of the transaction's lifetime (already capped).
    async fn run_branch(
        &self,
        existing: Option<Object>,
        exec: &ExecuteBranch,
        lifetime_ms: Option<u64>,
    ) -> (Option<Object>, Result<Ran, Response>) {
        let is_new = existing.is_none();
        let session = match existing {
            Some(s) => s,
            None => match self.session().await {
                Ok(s) => s,
                Err(e) => return (None, Err(Response::Failed(e))),
            },
        };
        // If this future is dropped (deadline), the session is mid-transaction: the guard
        // closes it instead of returning it to the pool.
        let session = DiscardOnDrop(Some(session));
        if session.statement_cache.size() > self.inner.config.statement_cache_max {
            session.statement_cache.clear();
        }

        // Parse/describe every statement first (cached per session) so parameters are
        // checked against their types before anything runs.
        // A branch with a data-changing statement almost surely wrote: skip the check
        // statement and vote YES (if it matched no row, it is merely prepared for nothing).
        let read_only_check = exec.finish == Finish::Prepare
            && exec.read_only_vote
            && !exec.statements.iter().any(|s| starts_with_dml(&s.sql));
        // One boxed future for all the lookups (deadpool's `prepare_cached` future is
        // large; inline, it would grow this whole future by as much).
        let lookups = Box::pin(async {
            let mut prepared = Vec::with_capacity(exec.statements.len());
            for (index, stmt) in exec.statements.iter().enumerate() {
                let st = session
                    .prepare_cached(&stmt.sql)
                    .await
                    .map_err(|e| sql_failure(&e, Some(index)))?;
                if let Err(e) = check_params(st.params(), &stmt.params) {
                    let mut err = AgentError::new(ErrorKind::BadParam, e.to_string());
                    err.statement_index = Some(index);
                    return Err(Response::Failed(err));
                }
                let plan = Plan::new(st.columns());
                prepared.push((st, plan));
            }
            Ok(prepared)
        })
        .await;
        let prepared = match lookups {
            Ok(x) => x,
            Err(resp) => return (session.release(), Err(resp)),
        };
        let client: &tokio_postgres::Client = &session;
        let prepare_sql = format!("PREPARE TRANSACTION {}", exec.gid.sql_literal());
        let idle_sql = match (is_new, exec.finish, lifetime_ms) {
            (true, Finish::Keep, Some(ms)) => {
                idle_in_transaction_sql(self.inner.config.idle_in_transaction_timeout_ms, ms)
            }
            _ => None,
        };
        // Result bytes, shared by every statement of the request (their rows are read
        // concurrently).
        // Values shown as the server's text output are asked for after their rows were
        // read, one statement at a time, in a read-only savepoint rolled back at once
        // (`resolve_pending_in_transaction`): the text is the branch's own, and nothing
        // a type's input function runs (a domain's CHECK can call any function) writes
        // or stays. A branch that finishes here and has a column of such a type sends
        // its finishing steps only once its statements' rows are complete (`split`: one
        // more round trip). Rare values of other types (a timestamp outside years
        // 1–9999, an array whose lower bound is not 1) come after the pipeline's
        // PREPARE or COMMIT: in a READ ONLY transaction rolled back at once.
        let split = exec.finish != Finish::Keep
            && prepared.iter().any(|(_, plan)| plan.may_need_server_text());
        let outside_transaction = exec.finish != Finish::Keep && !split;
        let text_lock = tokio::sync::Mutex::new(());
        let text_lock = &text_lock;
        // Set by the finishing step as it sends PREPARE or COMMIT (on its first poll):
        // the read-only transaction above must never start inside the client's, whose
        // ROLLBACK it would be.
        let finish_sent_flag = std::sync::atomic::AtomicBool::new(false);
        let finish_sent = &finish_sent_flag;
        let result_bytes_counter = AtomicU64::new(0);
        let result_bytes = &result_bytes_counter;
        let max_result_bytes = self.inner.config.max_result_bytes;
        let mut steps: Vec<BoxFuture<'_, Step>> = Vec::with_capacity(prepared.len() + 4);
        if is_new {
            steps.push(
                async move { Step::Done(client.batch_execute(begin_sql(exec.isolation)).await) }
                    .boxed(),
            );
        }
        if let Some(sql) = idle_sql.as_deref() {
            steps.push(async move { Step::Done(client.batch_execute(sql).await) }.boxed());
        }
        for ((st, plan), stmt) in prepared.iter().zip(&exec.statements) {
            steps.push(
                async move {
                    let params: Vec<JsonParam<'_>> = stmt.params.iter().map(JsonParam).collect();
                    let stream = match client
                        .query_raw(st, params.iter().map(|p| p as &dyn ToSql))
                        .await
                    {
                        Ok(s) => s,
                        Err(e) => return Step::Rows(Err(StepError::Sql(e))),
                    };
                    futures::pin_mut!(stream);
                    let mut rows = Vec::new();
                    // Values shown as the server's text output, asked for once every
                    // row is read: (row, where in it, value).
                    let mut pending = Vec::new();
                    let mut row_pending = Vec::new();
                    loop {
                        match stream.try_next().await {
                            Ok(Some(row)) => match decode_row(&row, plan, &mut row_pending) {
                                Ok(obj) => {
                                    // Counted while read: the answer must fit in a frame,
                                    // and memory must not hold more than that first (a
                                    // value still to be shown as text, at twice its bytes).
                                    let size = approx_json_bytes_of_row(&obj)
                                        + row_pending
                                            .iter()
                                            .map(|p| 2 * p.raw.len() as u64)
                                            .sum::<u64>();
                                    pending.extend(row_pending.drain(..).map(|p| (rows.len(), p)));
                                    let total =
                                        result_bytes.fetch_add(size, Ordering::Relaxed) + size;
                                    if total > max_result_bytes {
                                        return Step::Rows(Err(StepError::Convert(format!(
                                            "the results exceed {max_result_bytes} bytes; \
                                             select fewer rows (LIMIT, a narrower WHERE)"
                                        ))));
                                    }
                                    rows.push(obj)
                                }
                                Err((i, e)) => {
                                    let column = st.columns()[i].name().to_owned();
                                    let err = ConvertError::Decode {
                                        column,
                                        message: e.to_string(),
                                    };
                                    return Step::Rows(Err(StepError::Convert(err.to_string())));
                                }
                            },
                            Ok(None) => break,
                            Err(e) => return Step::Rows(Err(StepError::Sql(e))),
                        }
                    }
                    if !pending.is_empty() {
                        let _one_at_a_time = text_lock.lock().await;
                        let resolved = if outside_transaction {
                            // This step's rows can all arrive before a later step had its
                            // first poll (the connection runs on another thread): yield
                            // until the finishing step was sent, bounded.
                            let mut yields = 0u32;
                            while !finish_sent.load(Ordering::Acquire) {
                                if yields == FINISH_WAIT_YIELDS_MAX {
                                    return Step::Rows(Err(StepError::Convert(
                                        "the branch's finishing step was not sent; no value's text was asked for".into(),
                                    )));
                                }
                                yields += 1;
                                tokio::task::yield_now().await;
                            }
                            resolve_pending_read_only(client, &mut rows, pending).await
                        } else {
                            resolve_pending_in_transaction(client, &mut rows, pending).await
                        };
                        if let Err(e) = resolved {
                            let why = match e.as_db_error() {
                                Some(d) => d.message().to_owned(),
                                // The connection failed, not the value: say so (Unavailable).
                                None => return Step::Rows(Err(StepError::Sql(e))),
                            };
                            return Step::Rows(Err(StepError::Convert(format!(
                                "the text form of a value could not be had from the server: {why}"
                            ))));
                        }
                    }
                    if let Some(err) = too_deep(st.columns(), plan, &rows) {
                        return Step::Rows(Err(StepError::Convert(err.to_string())));
                    }
                    let rows_affected = stream.rows_affected().unwrap_or(rows.len() as u64);
                    Step::Rows(Ok(StmtResult {
                        rows_affected,
                        rows,
                        error: None,
                    }))
                }
                .boxed(),
            );
        }
        let statements_end = steps.len();
        if read_only_check {
            // Sent in order with the others, Parse included (no round trip first, so
            // PREPARE TRANSACTION cannot overtake it).
            steps.push(
                async move {
                    Step::ReadOnly(
                        client
                            .query_typed_one(READ_ONLY_CHECK, &[])
                            .await
                            .and_then(|r| r.try_get::<_, bool>(0)),
                    )
                }
                .boxed(),
            );
        }
        // The agent's own steps around the client's statements (the read-only check
        // above, and below: right before PREPARE the role back to the agent's own; right
        // before COMMIT the statement whose success proves the commit, see
        // `decision_outcome`: a probe, or the decision row) are unnamed statements parsed
        // in the pipeline after the client's (`query_typed`), every name in them
        // qualified: a client statement can neither replace them (`DEALLOCATE` and
        // `PREPARE` of a named statement it can see in `pg_prepared_statements`) nor
        // redirect their names through `search_path`. See `agent::schema`.
        match exec.finish {
            Finish::Keep => {}
            Finish::Prepare => {
                // Its success also proves the transaction is not aborted, so that the
                // PREPARE after it prepares (it would roll back an aborted one).
                steps.push(
                    async move {
                        Step::BeforePrepare(
                            client
                                .query_typed(OWN_ROLE_BEFORE_PREPARE, &[])
                                .await
                                .map(drop),
                        )
                    }
                    .boxed(),
                );
                let sql = prepare_sql.as_str();
                steps.push(finishing_step(client, sql, finish_sent));
            }
            Finish::Commit => {
                steps.push(
                    async move {
                        Step::Decision(
                            client
                                .query_typed(COMMIT_PROBE, &[])
                                .await
                                .map(|rows| rows.len() as u64),
                        )
                    }
                    .boxed(),
                );
                steps.push(finishing_step(client, "COMMIT", finish_sent));
            }
            Finish::CommitDecision => {
                // The decision must be durable whatever the database, the role or the
                // branch's own statements set: the other participants commit on it, and
                // a client is told `committed` on it (a one-phase commit under the
                // server's `synchronous_commit = off` was lost by an immediate stop of
                // PostgreSQL after its client was told; PREPARE and COMMIT PREPARED
                // flush whatever the setting). A transaction that wrote nothing has
                // nothing to flush.
                steps.push(
                    async move {
                        Step::Done(
                            client
                                .batch_execute("SET LOCAL synchronous_commit = on")
                                .await,
                        )
                    }
                    .boxed(),
                );
                // Checked in `execute`: a decision is present.
                // The row goes in only if the transaction wrote, when nothing is
                // prepared elsewhere (a one-phase commit): one that wrote nothing needs
                // no row (nor a WAL flush at commit) and answers `ReadOnly`.
                if let Some(d) = &exec.decision {
                    let (gid, token) = (exec.gid.as_str(), self.inner.decision_token.as_str());
                    let only_if_wrote = d.participants.is_empty();
                    steps.push(
                        async move {
                            let params: [(&(dyn ToSql + Sync), Type); 5] = [
                                (&token, Type::TEXT),
                                (&gid, Type::TEXT),
                                (&d.txn_id, Type::TEXT),
                                (&d.participants, Type::TEXT_ARRAY),
                                (&only_if_wrote, Type::BOOL),
                            ];
                            let inserted = client
                                .query_typed_one(schema::RECORD_COMMIT_CALL, &params)
                                .await
                                .and_then(|row| row.try_get::<_, bool>(0));
                            Step::Decision(inserted.map(u64::from))
                        }
                        .boxed(),
                    );
                }
                steps.push(finishing_step(client, "COMMIT", finish_sent));
            }
        }

        if exec.finish != Finish::Keep {
            // The branch ends here: the session goes back to the pool as it came out.
            let cached = session.statement_cache.size();
            steps.push(reset_session(client, cached, false).boxed());
        }

        // All steps are polled together: tokio-postgres writes their messages in order
        // without waiting, so the whole branch costs one network round trip (two when
        // `split`: a value that cannot be returned then fails the branch before it
        // prepares or commits).
        let mut outcomes = if split {
            let finishing = steps.split_off(statements_end);
            let mut outcomes = join_all(steps).await;
            if let Some(err) = unreturnable_before_finish(&outcomes) {
                // The finishing steps were never polled, so never sent: the transaction
                // is open, and rolled back with the session.
                drop(finishing);
                return (session.release(), Err(err));
            }
            outcomes.extend(join_all(finishing).await);
            outcomes
        } else {
            join_all(steps).await
        };
        let reset = match outcomes.last() {
            Some(Step::Reset(_)) => outcomes.pop(),
            _ => None,
        };
        if let Some(Step::Reset(reset)) = reset {
            if !matches!(reset, Ok(true)) {
                // Closed instead of pooled when the branch retires.
                debug!(result = ?reset.as_ref().err(), "session not clean after its branch; it will be closed");
                self.tables().tainted.insert(exec.gid.clone());
            }
        }
        if matches!(exec.finish, Finish::Commit | Finish::CommitDecision) {
            let ran = decision_outcome(outcomes, exec.statements.len());
            return (session.release(), ran);
        }

        let mut results = Vec::with_capacity(exec.statements.len());
        let mut read_only = false;
        let mut stmt_index = 0usize;
        let mut unreturnable: Option<(String, usize)> = None;
        // A statement's error in a branch that prepares: it may have been repaired by a
        // later `ROLLBACK TO SAVEPOINT`, and then PREPARE prepared the transaction (the
        // vote must say so, as a one-phase commit reports its commit); otherwise the
        // transaction is aborted, PREPARE rolled it back, and this error is the answer.
        let mut statement_error: Option<Response> = None;
        let mut healthy_before_prepare = false;
        for step in outcomes {
            let failed = match step {
                Step::Done(Err(e)) | Step::Decision(Err(e)) | Step::BeforePrepare(Err(e)) => {
                    Some(sql_failure(&e, None))
                }
                Step::Done(Ok(())) | Step::Decision(Ok(_)) => None,
                Step::BeforePrepare(Ok(())) => {
                    healthy_before_prepare = true;
                    None
                }
                Step::Rows(Ok(r)) => {
                    results.push(r);
                    stmt_index += 1;
                    None
                }
                Step::Rows(Err(StepError::Sql(e))) => {
                    let failure = sql_failure(&e, Some(stmt_index));
                    if exec.finish != Finish::Prepare || e.as_db_error().is_none() {
                        return (session.release(), Err(failure));
                    }
                    results.push(StmtResult {
                        error: Some(failure_text(&failure)),
                        ..StmtResult::default()
                    });
                    stmt_index += 1;
                    statement_error.get_or_insert(failure);
                    None
                }
                // Reported after the loop, unless a later step's SQL error explains it
                // (a statement that failed aborted the transaction, so the server could
                // not give an earlier value's text).
                Step::Rows(Err(StepError::Convert(m))) => {
                    if unreturnable.is_none() {
                        unreturnable = Some((m, stmt_index));
                    }
                    results.push(StmtResult::default());
                    stmt_index += 1;
                    None
                }
                Step::ReadOnly(Ok(ro)) => {
                    read_only = ro;
                    None
                }
                Step::ReadOnly(Err(e)) | Step::Finish(Err(e)) => Some(sql_failure(&e, None)),
                // In an aborted transaction block PREPARE TRANSACTION does not fail (it
                // rolls back); the step before it tells (`healthy_before_prepare`).
                Step::Finish(Ok(())) => None,
                // Taken out of the outcomes above.
                Step::Reset(_) => None,
            };
            if let Some(failure) = failed {
                // A statement's error explains the failures after it (an aborted
                // transaction fails them with 25P02).
                return (session.release(), Err(statement_error.unwrap_or(failure)));
            }
        }
        if let Some(failure) = statement_error {
            if !healthy_before_prepare {
                return (session.release(), Err(failure));
            }
            warn!(error = %failure_text(&failure), "a statement failed but a savepoint repaired the branch and it prepared; its result says so");
        }
        if let Some((m, index)) = unreturnable {
            let mut err = AgentError::new(ErrorKind::BadRequest, m);
            err.statement_index = Some(index);
            return (session.release(), Err(Response::Failed(err)));
        }
        let outcome = match exec.finish {
            Finish::Keep => BranchOutcome::Active,
            Finish::Commit | Finish::CommitDecision => BranchOutcome::Committed,
            Finish::Prepare if read_only => {
                // Wrote nothing: finish it now and drop out of phase 2.
                let sql = format!("COMMIT PREPARED {}", exec.gid.sql_literal());
                if let Err(e) = client.batch_execute(&sql).await {
                    // Still prepared, and never counted: roll it back here (the vote is
                    // NO), on another session in case this one broke.
                    if let Err(rb) = self.rollback_prepared(&exec.gid, false).await {
                        warn!(error = %rb, "rollback of a read-only branch whose commit failed did not succeed; recovery will retry");
                    }
                    return (session.release(), Err(sql_failure(&e, None)));
                }
                BranchOutcome::ReadOnly
            }
            Finish::Prepare => BranchOutcome::Prepared,
        };
        (session.release(), Ok(Ran { results, outcome }))
    }

    /// Rolls back whatever is left of a branch and leaves a tombstone. `session` (if any)
    /// is rolled back and returned to the pool, or discarded if that fails. A branch that
    /// may be prepared is also `ROLLBACK PREPARED`.
    async fn forget_branch(
        &self,
        gid: &Gid,
        session: Option<Object>,
        maybe_prepared: MaybePrepared,
    ) {
        {
            let mut t = self.tables();
            t.branches.remove(gid);
            t.tombstones.insert(gid.clone());
        }
        match session {
            Some(s) => self.roll_back_and_retire(gid, s).await,
            None => self.retire(gid, None),
        }
        let counted = match maybe_prepared {
            MaybePrepared::No => return,
            MaybePrepared::Counted => true,
            MaybePrepared::Uncounted => false,
        };
        if let Err(e) = self.rollback_prepared(gid, counted).await {
            warn!(error = %e, "rollback of a prepared branch failed; recovery will retry");
        }
    }

    /// `ROLLBACK PREPARED`; `counted`: the count holds this branch (its PREPARE was seen).
    async fn rollback_prepared(&self, gid: &Gid, counted: bool) -> Result<(), AgentError> {
        let session = self.session().await?;
        let sql = format!("ROLLBACK PREPARED {}", gid.sql_literal());
        match session.batch_execute(&sql).await {
            Ok(()) => {
                if counted {
                    self.prepared_done();
                }
                Ok(())
            }
            Err(e) if sqlstate(&e) == Some(SQLSTATE_UNDEFINED_OBJECT) => Ok(()),
            Err(e) => Err(agent_error(&e, None)),
        }
    }

    /// A pooled session. Every request takes its session before it runs anything, so a
    /// failure here says that nothing ran: `Limit` when the pool stayed exhausted (retry),
    /// `DatabaseUnreachable` when no session could be opened. Neither is "outcome
    /// unknown", which the coordinator must treat very differently for a commit.
    async fn session(&self) -> Result<Object, AgentError> {
        self.session_of(&self.inner.pool).await
    }

    /// A session of the system role (see `Inner::system`), for the `twopc` schema.
    async fn system_session(&self) -> Result<Object, AgentError> {
        self.session_of(&self.inner.system).await
    }

    async fn session_of(&self, pool: &Pool) -> Result<Object, AgentError> {
        // Boxed: deadpool's future is large, and every future that awaits it inline grows
        // by as much (and is copied whole on each spawn).
        Box::pin(pool.get()).await.map_err(|e| match e {
            PoolError::Timeout(TimeoutType::Wait) => AgentError::new(
                ErrorKind::Limit,
                format!(
                    "no free database session within {} ms (all {} in use); nothing ran; retry",
                    self.inner.config.pool_wait_timeout_ms,
                    pool.status().max_size
                ),
            ),
            e => AgentError::new(
                ErrorKind::DatabaseUnreachable,
                format!("could not open a database session: {e}; nothing ran"),
            ),
        })
    }

    async fn commit_prepared(&self, gid: Gid, timeout: Duration) -> Response {
        let work = async {
            let session = self.session().await?;
            crate::failpoint!(
                "participant.before_commit_prepared",
                AgentError::new(
                    ErrorKind::Internal,
                    "failpoint participant.before_commit_prepared"
                )
            );
            let sql = format!("COMMIT PREPARED {}", gid.sql_literal());
            match session.batch_execute(&sql).await {
                Ok(()) => {
                    self.prepared_done();
                    crate::failpoint!("participant.after_commit_prepared");
                    Ok(CommitAck::Committed)
                }
                Err(e) if sqlstate(&e) == Some(SQLSTATE_UNDEFINED_OBJECT) => {
                    Ok(CommitAck::NotPrepared)
                }
                Err(e) => Err(agent_error(&e, None)),
            }
        };
        within(
            timeout,
            work,
            Response::CommitPrepared,
            "COMMIT PREPARED did not finish in time",
        )
        .await
    }

    async fn abort(&self, gid: Gid, timeout: Duration) -> Response {
        let idle = {
            let mut t = self.tables();
            t.tombstones.insert(gid.clone());
            match t.branches.remove(&gid) {
                Some(Branch::Idle { session, .. }) => Some(*session),
                Some(Branch::Busy { .. }) => {
                    // The running request rolls it back when it finishes.
                    t.branches.insert(
                        gid.clone(),
                        Branch::Busy {
                            abort_requested: true,
                        },
                    );
                    return Response::Aborted;
                }
                None => None,
            }
        };
        let work = async {
            if let Some(s) = idle {
                self.roll_back_and_retire(&gid, s).await;
                return Ok(());
            }
            self.rollback_prepared(&gid, true).await
        };
        within(
            timeout,
            work,
            |()| Response::Aborted,
            "ROLLBACK did not finish in time",
        )
        .await
    }

    /// Settles a last-agent transaction's outcome: an aborted row goes in unless a row
    /// exists. If this agent's commit of `gid` is in flight, the insert waits for it (the
    /// primary key), so the answer is final either way, and a commit arriving later fails
    /// on the key and rolls back.
    async fn fence(&self, gid: Gid, timeout: Duration) -> Response {
        if !self.inner.decisions {
            return failed(
                ErrorKind::BadRequest,
                "this agent keeps no decision table, so it cannot settle a last-agent transaction",
            );
        }
        // A late `Execute` of this GID is refused before it runs anything.
        self.tables().tombstones.insert(gid.clone());
        let work = async {
            let session = self.system_session().await?;
            let inserted = session
                .execute(DECISION_FENCE, &[&gid.as_str()])
                .await
                .map_err(|e| agent_error(&e, None))?;
            let row = session
                .query_opt(DECISION_READ, &[&gid.as_str()])
                .await
                .map_err(|e| agent_error(&e, None))?
                .ok_or_else(|| {
                    AgentError::new(ErrorKind::Internal, "decision row vanished after the fence")
                })?;
            let bad_row = |e: tokio_postgres::Error| {
                AgentError::new(
                    ErrorKind::Internal,
                    format!("{DECISION_TABLE} does not have the expected columns: {e}"),
                )
            };
            let committed: bool = row.try_get(0).map_err(bad_row)?;
            debug!(inserted, committed, "fenced");
            Ok::<_, AgentError>(Response::Decision {
                committed,
                txn_id: row.try_get(1).map_err(bad_row)?,
                participants: row.try_get(2).map_err(bad_row)?,
            })
        };
        within(timeout, work, |r| r, "fence did not finish in time").await
    }

    /// Deletes the committed decision rows of finished transactions.
    async fn forget(&self, gids: Vec<Gid>, timeout: Duration) -> Response {
        if !self.inner.decisions {
            return failed(ErrorKind::BadRequest, "this agent keeps no decision table");
        }
        if gids.len() > FORGET_MAX_GIDS {
            return failed(
                ErrorKind::Limit,
                format!("{} GIDs; the limit is {FORGET_MAX_GIDS}", gids.len()),
            );
        }
        let gids: Vec<&str> = gids.iter().map(Gid::as_str).collect();
        let work = async {
            let session = self.system_session().await?;
            session
                .execute(DECISION_FORGET, &[&gids])
                .await
                .map_err(|e| agent_error(&e, None))
        };
        within(
            timeout,
            work,
            |rows| Response::Forgotten { rows },
            "forget did not finish in time",
        )
        .await
    }

    /// Committed decision rows with `gid_prefix`, oldest first.
    /// A request is running on a branch with `gid_prefix` of an epoch older than the
    /// newest seen for its coordinator.
    fn older_branch_running(&self, gid_prefix: &str) -> bool {
        let t = self.tables();
        t.branches.iter().any(|(gid, b)| {
            matches!(b, Branch::Busy { .. })
                && gid.as_str().starts_with(gid_prefix)
                && t.is_of_an_older_epoch(gid)
        })
    }

    async fn list_decisions(&self, gid_prefix: &str, timeout: Duration) -> Response {
        if !self.inner.decisions {
            return Response::Decisions { rows: vec![] };
        }
        if !valid_gid_prefix(gid_prefix) {
            return failed(ErrorKind::BadRequest, "invalid GID prefix");
        }
        // A branch of an older incarnation still running (a commit blocked on a lock, say)
        // could commit its decision row after this listing, when the new incarnation
        // already took "no row" for "not committed". Wait for such branches to end first,
        // within the request's deadline.
        let deadline = Instant::now() + timeout;
        while self.older_branch_running(gid_prefix) {
            if Instant::now() >= deadline {
                return failed(
                    ErrorKind::Timeout,
                    "a branch of an older incarnation of this coordinator is still running; \
                     its decision row is not final yet",
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let work = async {
            let session = self.system_session().await?;
            let rows = session
                .query(
                    "SELECT gid, txn_id, participants, \
                     (extract(epoch FROM now() - decided_at) * 1000)::bigint \
                     FROM twopc.decisions WHERE committed AND starts_with(gid, $1) \
                     ORDER BY decided_at LIMIT $2",
                    &[&gid_prefix, &(LIST_DECISIONS_MAX as i64)],
                )
                .await
                .map_err(|e| agent_error(&e, None))?;
            rows.iter()
                .map(|r| {
                    Ok(DecisionRow {
                        gid: r.try_get(0)?,
                        txn_id: r.try_get(1)?,
                        participants: r.try_get(2)?,
                        age_ms: r.try_get::<_, i64>(3)?.max(0) as u64,
                    })
                })
                .collect::<Result<Vec<_>, tokio_postgres::Error>>()
                .map_err(|e| agent_error(&e, None))
        };
        within(
            timeout,
            work,
            |rows| Response::Decisions { rows },
            "listing decisions timed out",
        )
        .await
    }

    async fn list_prepared(&self, gid_prefix: &str, timeout: Duration) -> Response {
        if !valid_gid_prefix(gid_prefix) {
            return failed(ErrorKind::BadRequest, "invalid GID prefix");
        }
        let work = async {
            let session = self.session().await?;
            let rows = session
                .query(
                    "SELECT gid, database::text, owner::text, \
                     to_char(prepared AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
                     (extract(epoch FROM now() - prepared) * 1000)::bigint \
                     FROM pg_prepared_xacts \
                     WHERE database = current_database() AND owner = current_user \
                     AND starts_with(gid, $1) ORDER BY prepared",
                    &[&gid_prefix],
                )
                .await
                .map_err(|e| agent_error(&e, None))?;
            Ok::<_, AgentError>(
                rows.iter()
                    .map(|r| PreparedBranch {
                        gid: r.get(0),
                        database: r.get(1),
                        owner: r.get(2),
                        prepared_at: r.get(3),
                        age_ms: r.get::<_, i64>(4).max(0) as u64,
                    })
                    .collect(),
            )
        };
        within(
            timeout,
            work,
            |branches| Response::Prepared { branches },
            "listing prepared branches timed out",
        )
        .await
    }

    /// The database role the agent runs as (owner of its prepared transactions).
    pub fn owner(&self) -> &str {
        &self.inner.owner
    }
}

fn valid_gid_prefix(p: &str) -> bool {
    !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A pool of sessions to `url` as its role, with the agent's session settings.
fn build_pool(
    url: &str,
    password: Option<&str>,
    config: &AgentConfig,
    size: usize,
    extra_options: &str,
) -> Result<Pool, AgentStartError> {
    let mut pg_config = tokio_postgres::Config::from_str(url).map_err(AgentStartError::Url)?;
    if let (None, Some(pw)) = (pg_config.get_password(), password) {
        pg_config.password(pw);
    }
    let mut options = pg_config.get_options().unwrap_or("").to_owned();
    for (name, ms) in [
        ("statement_timeout", config.statement_timeout_ms),
        ("lock_timeout", config.lock_timeout_ms),
        (
            "idle_in_transaction_session_timeout",
            config.idle_in_transaction_timeout_ms,
        ),
    ] {
        if ms > 0 {
            options.push_str(&format!(" -c {name}={ms}"));
        }
    }
    // Pinned (a startup option outranks database and role defaults), so a plain
    // BEGIN is read committed: see `begin_sql`.
    options.push_str(" -c default_transaction_isolation=read\\ committed");
    options.push_str(extra_options);
    pg_config.options(options.trim());
    let manager = Manager::from_config(
        pg_config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        // Most recently used first: under partial load the same few backends stay
        // hot instead of every session taking turns.
        .queue_mode(deadpool_postgres::QueueMode::Lifo)
        .wait_timeout(Some(Duration::from_millis(config.pool_wait_timeout_ms)))
        .create_timeout(Some(Duration::from_millis(config.connect_timeout_ms)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| AgentStartError::Connect(e.to_string()))
}

/// The first session of `pool`, retried until `deadline` (the database may be starting).
async fn first_session(
    pool: &Pool,
    deadline: tokio::time::Instant,
) -> Result<Object, AgentStartError> {
    loop {
        match pool.get().await {
            Ok(c) => return Ok(c),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(AgentStartError::Connect(e.to_string()))
            }
            Err(e) => {
                debug!(error = %e, "database not reachable yet, retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// `BEGIN` for a branch. Read committed, the default and the common case, is a plain
/// `BEGIN`: sessions start with it as their default (`Agent::connect`), and a session
/// whose branch changed that is closed, not pooled (`retire`). Naming the level would SET
/// a setting, after which PostgreSQL walks every setting at the end of the transaction
/// (`AtEOXact_GUC`, ~6 µs of its CPU per branch in the bench's profile).
fn begin_sql(isolation: Isolation) -> &'static str {
    match isolation {
        Isolation::ReadCommitted => "BEGIN",
        other => other.begin_sql(),
    }
}

/// `SET LOCAL idle_in_transaction_session_timeout` for a new interactive branch whose
/// transaction (`lifetime_ms` left) may stay idle here longer than the session's setting
/// (`session_ms`, 0 = none) allows: the agent's reaper keeps the branch that long, and the
/// server must not cut it off first. `None` in the ordinary case, which then costs no
/// setting change (see `begin_sql`).
fn idle_in_transaction_sql(session_ms: u64, lifetime_ms: u64) -> Option<String> {
    let needed_ms = lifetime_ms.saturating_add(IDLE_IN_TRANSACTION_MARGIN_MS);
    if session_ms == 0 || needed_ms <= session_ms {
        return None;
    }
    // The setting is an int of milliseconds.
    let needed_ms = needed_ms.min(i32::MAX as u64);
    Some(format!(
        "SET LOCAL idle_in_transaction_session_timeout = {needed_ms}"
    ))
}

/// A pooled session that is closed (not returned to the pool) unless released.
struct DiscardOnDrop(Option<Object>);

impl DiscardOnDrop {
    fn release(mut self) -> Option<Object> {
        self.0.take()
    }
}

impl std::ops::Deref for DiscardOnDrop {
    type Target = Object;
    fn deref(&self) -> &Object {
        // Always Some until `release` consumes self.
        self.0.as_ref().expect("session present until released")
    }
}

impl Drop for DiscardOnDrop {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            drop(Object::take(s));
        }
    }
}

struct Ran {
    results: Vec<StmtResult>,
    outcome: BranchOutcome,
}

enum StepError {
    Sql(tokio_postgres::Error),
    Convert(String),
}

enum Step {
    Done(Result<(), tokio_postgres::Error>),
    /// The decision row (or probe) and how many rows it wrote or read (0: a one-phase
    /// transaction that wrote nothing, see `schema::RECORD_COMMIT_CALL`).
    Decision(Result<u64, tokio_postgres::Error>),
    Rows(Result<StmtResult, StepError>),
    ReadOnly(Result<bool, tokio_postgres::Error>),
    Finish(Result<(), tokio_postgres::Error>),
    /// The step right before PREPARE TRANSACTION (the role back to the agent's own): its
    /// success proves the transaction is not aborted.
    BeforePrepare(Result<(), tokio_postgres::Error>),
    /// [`SESSION_RESET`] after the branch ended: whether the session is clean again.
    Reset(Result<bool, tokio_postgres::Error>),
}

/// About how many bytes `row` takes as JSON (an upper-ish estimate, cheap to compute).
fn approx_json_bytes_of_row(row: &serde_json::Map<String, serde_json::Value>) -> u64 {
    fn value(v: &serde_json::Value) -> u64 {
        match v {
            serde_json::Value::Null | serde_json::Value::Bool(_) => 5,
            serde_json::Value::Number(_) => 24,
            serde_json::Value::String(s) => s.len() as u64 + 2,
            serde_json::Value::Array(items) => 2 + items.iter().map(|i| value(i) + 1).sum::<u64>(),
            serde_json::Value::Object(map) => {
                2 + map
                    .iter()
                    .map(|(k, v)| k.len() as u64 + 4 + value(v))
                    .sum::<u64>()
            }
        }
    }
    2 + row
        .iter()
        .map(|(k, v)| k.len() as u64 + 4 + value(v))
        .sum::<u64>()
}

/// Puts a pooled session back as it was, whatever a branch's statements did to it:
/// settings (`RESET ALL`, also what a `DO` block or `set_config` set), the role and
/// session authorization, `WITH HOLD` cursors, `LISTEN`, session advisory locks, temporary
/// tables (a `pg_temp.acct` would shadow the real `acct` for the next client: a lost
/// write) and sequence caches. Runs outside any transaction, pipelined right after the
/// branch's PREPARE or COMMIT (or its ROLLBACK), so it costs no round trip. What it cannot
/// undo without also dropping the agent's own cached statements — SQL-level `PREPARE`d
/// statements, or a `DEALLOCATE` of the agent's — the last query reports, and such a
/// session is closed instead of pooled ([`session_is_clean`]).
const SESSION_RESET: &str = "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; \
     UNLISTEN *; SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES; \
     SELECT count(*) FILTER (WHERE from_sql), count(*) FILTER (WHERE NOT from_sql) \
     FROM pg_prepared_statements";

/// The answer to [`SESSION_RESET`]: no client-made prepared statement remains and none of
/// the agent's `cached` statements is gone.
fn session_is_clean(messages: &[tokio_postgres::SimpleQueryMessage], cached: usize) -> bool {
    let Some(row) = messages.iter().rev().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    }) else {
        return false;
    };
    let count = |i: usize| row.get(i).and_then(|v| v.parse::<usize>().ok());
    matches!((count(0), count(1)), (Some(0), Some(ours)) if ours >= cached)
}

/// Runs [`SESSION_RESET`] on `client` (after ROLLBACK, when `rollback`).
async fn reset_session(client: &tokio_postgres::Client, cached: usize, rollback: bool) -> Step {
    let sql = if rollback {
        Cow::Owned(format!("ROLLBACK; {SESSION_RESET}"))
    } else {
        Cow::Borrowed(SESSION_RESET)
    };
    Step::Reset(
        client
            .simple_query(&sql)
            .await
            .map(|m| session_is_clean(&m, cached)),
    )
}

/// What a committing branch (last-agent or one-phase) did, from every step's result:
/// `Committed` exactly when it committed, a definite failure (the branch is rolled back)
/// only when it did not, and `Unavailable` when that cannot be known. The coordinator
/// aborts the other participants on a definite failure and fences (or, one-phase,
/// answers "unknown") on anything else, so the difference matters.
///
/// The first error alone does not tell: a failed statement may be repaired by a later
/// `ROLLBACK TO SAVEPOINT`, and a row the agent cannot convert to JSON fails here after
/// PostgreSQL ran everything. The step right before COMMIT does tell (the decision insert,
/// or for a plain commit [`COMMIT_PROBE`]): it succeeds only in a transaction that is not
/// aborted, and a COMMIT right after it commits.
fn decision_outcome(outcomes: Vec<Step>, statements: usize) -> Result<Ran, Response> {
    let unknown = |e: &tokio_postgres::Error| {
        Response::Failed(AgentError::new(
            ErrorKind::Unavailable,
            format!("the commit's outcome is unknown: {e}"),
        ))
    };
    let mut results = Vec::with_capacity(statements);
    let mut first_error: Option<Response> = None;
    let mut decision: Option<Result<u64, tokio_postgres::Error>> = None;
    let mut commit: Option<Result<(), tokio_postgres::Error>> = None;
    let mut stmt_index = 0usize;
    for step in outcomes {
        let error = match step {
            Step::Done(Ok(())) | Step::ReadOnly(Ok(_)) | Step::BeforePrepare(Ok(())) => None,
            Step::Done(Err(e)) | Step::ReadOnly(Err(e)) | Step::BeforePrepare(Err(e)) => {
                // No database error: the connection broke, and what the server did with
                // the rest of the pipeline is unknown.
                if e.as_db_error().is_none() {
                    return Err(unknown(&e));
                }
                Some(sql_failure(&e, None))
            }
            Step::Rows(Ok(r)) => {
                results.push(r);
                stmt_index += 1;
                None
            }
            Step::Rows(Err(StepError::Sql(e))) => {
                if e.as_db_error().is_none() {
                    return Err(unknown(&e));
                }
                let failure = sql_failure(&e, Some(stmt_index));
                results.push(StmtResult {
                    error: Some(failure_text(&failure)),
                    ..StmtResult::default()
                });
                stmt_index += 1;
                Some(failure)
            }
            Step::Rows(Err(StepError::Convert(m))) => {
                results.push(StmtResult {
                    error: Some(format!("its rows could not be returned: {m}")),
                    ..StmtResult::default()
                });
                let mut err = AgentError::new(ErrorKind::BadRequest, m);
                err.statement_index = Some(stmt_index);
                stmt_index += 1;
                Some(Response::Failed(err))
            }
            Step::Decision(r) => {
                decision = Some(r);
                None
            }
            Step::Finish(r) => {
                commit = Some(r);
                None
            }
            // Not part of the branch's outcome (taken out by `run_branch`).
            Step::Reset(_) => None,
        };
        if first_error.is_none() {
            first_error = error;
        }
    }
    match (decision, commit) {
        // No row: a one-phase transaction that wrote nothing, so committing it changed
        // nothing, and a statement's failure (a row it could not convert) is the answer:
        // an empty result in its place would drop rows without a word.
        (Some(Ok(0)), Some(Ok(()))) if first_error.is_some() => {
            Err(first_error.unwrap_or_else(|| failed(ErrorKind::Internal, "no error")))
        }
        (Some(Ok(rows)), Some(Ok(()))) => {
            if let Some(Response::Failed(e)) = &first_error {
                warn!(error = %e, "a statement failed but the branch committed (a savepoint repaired it, or its rows could not be returned); its result says so");
            }
            let outcome = if rows == 0 {
                BranchOutcome::ReadOnly
            } else {
                BranchOutcome::Committed
            };
            Ok(Ran { results, outcome })
        }
        // The decision row went in but COMMIT failed: a database error here (a deferred
        // constraint, a serialization failure) means rolled back, but one raised as the
        // connection is terminated may come after the commit. Not worth guessing.
        (Some(Ok(_)), Some(Err(e))) => Err(unknown(&e)),
        (Some(Ok(_)), None) => Err(failed(
            ErrorKind::Unavailable,
            "the commit's outcome is unknown: no answer to COMMIT",
        )),
        // The insert failed, so the transaction was aborted and COMMIT rolled it back.
        (Some(Err(e)), _) if e.as_db_error().is_some() => {
            Err(first_error.unwrap_or_else(|| sql_failure(&e, None)))
        }
        (Some(Err(e)), _) => Err(unknown(&e)),
        (None, _) => Err(first_error.unwrap_or_else(|| {
            failed(ErrorKind::BadRequest, "commit_decision without a decision")
        })),
    }
}

/// The step that finishes a branch (`PREPARE TRANSACTION ...` or `COMMIT`), marking
/// that it was sent (values' text is asked for outside the branch only after it).
fn finishing_step<'a>(
    client: &'a tokio_postgres::Client,
    sql: &'a str,
    sent: &'a std::sync::atomic::AtomicBool,
) -> BoxFuture<'a, Step> {
    async move {
        sent.store(true, Ordering::Release);
        Step::Finish(client.batch_execute(sql).await)
    }
    .boxed()
}

/// How many times a step waiting to ask for values' text yields for the finishing step
/// to be sent (each yield lets every other step of the pipeline be polled once).
const FINISH_WAIT_YIELDS_MAX: u32 = 10_000;

/// The answer of a branch whose statements all ran without an SQL error but one's rows
/// cannot be returned (the first such): BadRequest naming the statement.
fn unreturnable_before_finish(outcomes: &[Step]) -> Option<Response> {
    let mut first = None;
    let mut stmt_index = 0usize;
    for step in outcomes {
        match step {
            Step::Done(Err(_)) | Step::Rows(Err(StepError::Sql(_))) => return None,
            Step::Rows(Err(StepError::Convert(m))) => {
                if first.is_none() {
                    let mut err = AgentError::new(ErrorKind::BadRequest, m.clone());
                    err.statement_index = Some(stmt_index);
                    first = Some(Response::Failed(err));
                }
                stmt_index += 1;
            }
            Step::Rows(Ok(_)) => stmt_index += 1,
            _ => {}
        }
    }
    first
}

/// [`resolve_pending`] inside the branch's transaction, in a savepoint made read-only
/// and rolled back at once: the text is what PostgreSQL prints there (the settings the
/// branch made, the objects it created), and whatever a type's input function runs
/// neither writes nor stays.
async fn resolve_pending_in_transaction(
    client: &tokio_postgres::Client,
    rows: &mut [serde_json::Map<String, serde_json::Value>],
    pending: Vec<(usize, crate::decode::Pending)>,
) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(TEXT_SAVEPOINT).await?;
    let resolved = resolve_pending(client, rows, pending).await;
    let rolled_back = client.batch_execute(TEXT_SAVEPOINT_END).await;
    resolved.and(rolled_back)
}

/// Around [`resolve_pending_in_transaction`]'s lookups. The innermost savepoint of a
/// name is the one `ROLLBACK TO` and `RELEASE` act on, so a client's savepoint of the
/// same name is untouched.
const TEXT_SAVEPOINT: &str = "SAVEPOINT twopc_text; SET LOCAL transaction_read_only = on";
const TEXT_SAVEPOINT_END: &str = "ROLLBACK TO SAVEPOINT twopc_text; RELEASE SAVEPOINT twopc_text";

/// [`resolve_pending`] inside `BEGIN READ ONLY` ... `ROLLBACK` (the session is outside a
/// transaction: the branch has finished).
async fn resolve_pending_read_only(
    client: &tokio_postgres::Client,
    rows: &mut [serde_json::Map<String, serde_json::Value>],
    pending: Vec<(usize, crate::decode::Pending)>,
) -> Result<(), tokio_postgres::Error> {
    client.batch_execute("BEGIN READ ONLY").await?;
    let resolved = resolve_pending(client, rows, pending).await;
    let rolled_back = client.batch_execute("ROLLBACK").await;
    resolved.and(rolled_back)
}

/// The error a failed step's answer carries, as text for a statement's result.
fn failure_text(r: &Response) -> String {
    match r {
        Response::Failed(e) => e.to_string(),
        other => format!("{other:?}"),
    }
}

/// The first column of `rows` nesting arrays and objects deeper than the protocol
/// carries (see `MAX_VALUE_DEPTH`).
fn too_deep(
    columns: &[tokio_postgres::Column],
    plan: &Plan,
    rows: &[serde_json::Map<String, serde_json::Value>],
) -> Option<ConvertError> {
    let max = twopc_shared::msg::MAX_VALUE_DEPTH;
    for row in rows {
        for (i, (key, _)) in plan.columns.iter().enumerate() {
            if row
                .get(key)
                .is_some_and(|v| twopc_shared::msg::value_depth(v) > max)
            {
                return Some(ConvertError::TooDeep {
                    column: columns[i].name().to_owned(),
                    max,
                });
            }
        }
    }
    None
}

/// Runs `work` within `timeout` and answers `ok(value)`, its error, or `Timeout` with
/// `timed_out` as the message.
async fn within<T>(
    timeout: Duration,
    work: impl std::future::Future<Output = Result<T, AgentError>>,
    ok: impl FnOnce(T) -> Response,
    timed_out: &str,
) -> Response {
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(v)) => ok(v),
        Ok(Err(e)) => Response::Failed(e),
        Err(_) => failed(ErrorKind::Timeout, timed_out),
    }
}

fn failed(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Failed(AgentError::new(kind, message))
}

fn sqlstate(e: &tokio_postgres::Error) -> Option<&str> {
    e.code().map(|c| c.code())
}

fn agent_error(e: &tokio_postgres::Error, statement_index: Option<usize>) -> AgentError {
    match e.as_db_error() {
        Some(db) => match bound_parameter(db) {
            // The type's input function refused a parameter while binding it: the
            // client's value does not fit (a 400), with PostgreSQL's own SQLSTATE.
            Some(n) => AgentError {
                kind: ErrorKind::BadParam,
                sqlstate: Some(db.code().code().to_owned()),
                message: format!("parameter ${n}: {}", db.message()),
                statement_index,
            },
            None => AgentError {
                kind: ErrorKind::Sql,
                sqlstate: Some(db.code().code().to_owned()),
                message: db.message().to_owned(),
                statement_index,
            },
        },
        None => AgentError {
            kind: if e.is_closed() {
                ErrorKind::Unavailable
            } else {
                ErrorKind::Internal
            },
            sqlstate: None,
            message: e.to_string(),
            statement_index,
        },
    }
}

/// The parameter PostgreSQL was converting when it raised `db`, if it was binding one:
/// its error context then reads `unnamed portal parameter $N = '...'` (or `portal "p"
/// parameter $N`).
fn bound_parameter(db: &tokio_postgres::error::DbError) -> Option<u32> {
    // A value that does not fit its type (data exceptions, a domain's CHECK), not a
    // serialization failure or a timeout raised meanwhile (those are worth a retry).
    let code = db.code().code();
    if !(code.starts_with("22") || code == "23514") {
        return None;
    }
    // The outermost context only (the last line), and only PostgreSQL's own wording: a
    // portal line deeper down, or one a function printed, is a statement that ran.
    let context = db.where_()?.lines().last()?.trim();
    let rest = match context.strip_prefix("unnamed portal parameter $") {
        Some(rest) => rest,
        None => {
            let named = context.strip_prefix("portal \"")?;
            &named[named.find("\" parameter $")? + 13..]
        }
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn sql_failure(e: &tokio_postgres::Error, statement_index: Option<usize>) -> Response {
    Response::Failed(agent_error(e, statement_index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_transactions_change_no_setting() {
        // The defaults: 360 s on the session, transactions of 30 s.
        assert_eq!(idle_in_transaction_sql(360_000, 30_000), None);
        assert_eq!(
            idle_in_transaction_sql(0, 600_000),
            None,
            "0: no server limit"
        );
        assert_eq!(
            idle_in_transaction_sql(360_000, 360_000 - IDLE_IN_TRANSACTION_MARGIN_MS),
            None
        );
    }

    #[test]
    fn a_transaction_outliving_the_session_setting_raises_it_for_itself() {
        assert_eq!(
            idle_in_transaction_sql(2_000, 20_000).as_deref(),
            Some("SET LOCAL idle_in_transaction_session_timeout = 30000")
        );
        assert_eq!(
            idle_in_transaction_sql(1, u64::MAX).as_deref(),
            Some("SET LOCAL idle_in_transaction_session_timeout = 2147483647")
        );
    }
}
