//! `twopc-client`: run transactions across PostgreSQL databases through a twopc
//! coordinator, with the retry rule done right.
//!
//! ```no_run
//! # async fn example() -> Result<(), twopc_client::Error> {
//! use serde_json::json;
//! use twopc_client::{Client, Transaction};
//!
//! let client = Client::builder("http://127.0.0.1:7000").build()?;
//! // One-shot: every branch's statements, then two-phase commit.
//! let txn = Transaction::new()
//!     .statement("a", "UPDATE acct SET bal = bal - $1 WHERE id = $2", vec![json!(5), json!(1)])
//!     .statement("b", "UPDATE acct SET bal = bal + $1 WHERE id = $2", vec![json!(5), json!(1)]);
//! let committed = client.run(&txn).await?;
//! println!("{} committed", committed.txn_id);
//!
//! // Interactive: statements one by one, then commit (or rollback).
//! let t = client.begin().await?;
//! let rows = t.execute("a", "SELECT bal FROM acct WHERE id = $1", vec![json!(1)]).await?;
//! println!("{:?}", rows.rows);
//! t.commit().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Retries
//!
//! Every transaction has a `txn_id` (generated unless given), so a retry is safe: the
//! coordinator runs a txn id at most once to a commit, and answers a retry of a committed
//! one with its recorded outcome (`replayed`) without running anything. The client
//! retries by one rule ([`next_step`]):
//! - refused by the coordinator before anything ran (its JSON 429 or 503), or not
//!   connected: wait and send the same request again;
//! - the answer was lost (a network error, a timeout, 504, a proxy's 5xx) or another
//!   attempt of the txn id is still running (409): ask `GET /v1/transactions/{id}` until
//!   it has an outcome; committed → that is the answer (`replayed`, without results);
//!   aborted → a one-shot transaction is sent again; an interactive commit is sent again
//!   only if `GET` says the transaction is still active (the commit never arrived);
//!   unknown → the error says so;
//! - aborted, or bad input: the answer, at once.
//!
//! After a lost answer, a one-shot transaction is never reported aborted: the lost
//! request may still reach the coordinator and run (a txn id that aborted may run
//! again), so anything short of a commit is [`Error::OutcomeUnknown`]; ask
//! [`Client::status`] later. An interactive statement whose answer was lost ends its
//! transaction: the client rolls it back and will not commit it.
//!
//! One [`Client`] keeps its connections alive (HTTP/1.1 keep-alive) and is cheap to
//! clone; share it.

mod answer;
mod types;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use tracing::debug;
use twopc_core::backoff::Backoff;

pub use answer::{next_step, Answer, Expect, Step};
pub use twopc_shared::msg::{Isolation, Statement, StmtResult};
pub use types::{Ack, BranchResults, Committed, Outcome, State, Status};

/// What can go wrong; the variants tell apart what the caller must.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The transaction aborted: nothing of it committed anywhere.
    #[error("transaction {txn_id} aborted: {message}")]
    Aborted {
        txn_id: String,
        /// The participant whose branch failed, if one did.
        participant: Option<String>,
        /// Its SQLSTATE (for non-SQL failures the closest class).
        code: Option<String>,
        message: String,
    },
    /// Whether the transaction committed is not known, and cannot be learnt now: do not
    /// assume either way (ask [`Client::status`] later).
    #[error("transaction {txn_id}: outcome unknown: {message}")]
    OutcomeUnknown { txn_id: String, message: String },
    /// The coordinator refused the request (bad input, unknown transaction, a conflict):
    /// nothing ran for it.
    #[error("refused ({status}): {message}")]
    Refused { status: u16, message: String },
    /// The coordinator kept refusing for now (429, 503) until the retries ran out:
    /// nothing ran.
    #[error("coordinator busy or unavailable ({status}): {message}")]
    Unavailable { status: u16, message: String },
    /// The coordinator could not be reached, before anything could have run.
    #[error("cannot reach the coordinator: {0}")]
    Transport(#[source] reqwest::Error),
    /// An answer this client does not understand.
    #[error("unexpected answer ({status}): {body}")]
    Protocol { status: u16, body: String },
    /// The client could not be built (a bad certificate, URL or token).
    #[error("client configuration: {0}")]
    Config(String),
}

/// How long the client keeps trying.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Most sends of one request (the first included; at least 1).
    pub attempts_max: u32,
    /// How long to ask `GET` for an outcome after a lost answer.
    pub settle_timeout: Duration,
    /// The first wait between attempts; it doubles up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts_max: 10,
            settle_timeout: Duration::from_secs(30),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
        }
    }
}

/// Builds a [`Client`].
#[derive(Debug)]
pub struct ClientBuilder {
    base_url: String,
    token: Option<String>,
    ca_pem: Option<Vec<u8>>,
    identity_pem: Option<Vec<u8>>,
    request_timeout: Duration,
    retry: RetryPolicy,
}

impl ClientBuilder {
    /// The bearer token the coordinator was started with (`--api-token-file`).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Trust this CA (PEM) for an `https://` coordinator.
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Present this certificate and key (one PEM) to a coordinator that asks for one.
    pub fn identity_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.identity_pem = Some(pem.into());
        self
    }

    /// How long one request may take before its answer counts as lost (default 60 s;
    /// keep it above the coordinator's transaction timeout and commit wait).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn build(self) -> Result<Client, Error> {
        let mut http = reqwest::Client::builder()
            .timeout(self.request_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60));
        if let Some(pem) = &self.ca_pem {
            let ca = reqwest::Certificate::from_pem(pem)
                .map_err(|e| Error::Config(format!("CA certificate: {e}")))?;
            http = http.add_root_certificate(ca);
        }
        if let Some(pem) = &self.identity_pem {
            let id = reqwest::Identity::from_pem(pem)
                .map_err(|e| Error::Config(format!("client certificate: {e}")))?;
            http = http.identity(id);
        }
        let http = http
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        let base_url = self.base_url.trim_end_matches('/').to_owned();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(Error::Config(format!(
                "coordinator URL {base_url:?} must start with http:// or https://"
            )));
        }
        Ok(Client {
            http,
            base_url,
            token: self.token,
            retry: self.retry,
        })
    }
}

/// A handle on one coordinator. Clone it freely: clones share the connections.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base_url: String,
    token: Option<String>,
    retry: RetryPolicy,
}

/// A one-shot transaction: every branch's statements, sent in one request.
#[derive(Debug, Clone, Serialize)]
pub struct Transaction {
    txn_id: String,
    branches: Vec<Branch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    isolation: Option<Isolation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ack: Option<Ack>,
}

#[derive(Debug, Clone, Serialize)]
struct Branch {
    participant: String,
    statements: Vec<Statement>,
}

/// A fresh txn id: `c-` and 128 random bits in hex.
pub fn generate_txn_id() -> String {
    format!("c-{:032x}", rand::random::<u128>())
}

impl Default for Transaction {
    fn default() -> Self {
        Transaction::new()
    }
}

impl Transaction {
    /// A transaction with a generated txn id.
    pub fn new() -> Transaction {
        Transaction::with_id(generate_txn_id())
    }

    /// A transaction with the caller's txn id (letters, digits, `_`, `-`, `.`; at most
    /// 128 bytes), e.g. one derived from the business operation, so that a retry after
    /// a crash of the caller is recognised.
    pub fn with_id(txn_id: impl Into<String>) -> Transaction {
        Transaction {
            txn_id: txn_id.into(),
            branches: vec![],
            isolation: None,
            timeout_ms: None,
            ack: None,
        }
    }

    /// Adds a statement on `participant` (its branch is created on first use; the
    /// statements of a branch run in the order given).
    pub fn statement(mut self, participant: &str, sql: &str, params: Vec<Value>) -> Self {
        let stmt = Statement {
            sql: sql.to_owned(),
            params,
        };
        match self
            .branches
            .iter_mut()
            .find(|b| b.participant == participant)
        {
            Some(b) => b.statements.push(stmt),
            None => self.branches.push(Branch {
                participant: participant.to_owned(),
                statements: vec![stmt],
            }),
        }
        self
    }

    pub fn isolation(mut self, isolation: Isolation) -> Self {
        self.isolation = Some(isolation);
        self
    }

    /// The transaction's deadline on the coordinator.
    pub fn timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.timeout_ms = Some(timeout_ms);
        self
    }

    /// When the commit is answered (default: applied everywhere).
    pub fn ack(mut self, ack: Ack) -> Self {
        self.ack = Some(ack);
        self
    }

    pub fn txn_id(&self) -> &str {
        &self.txn_id
    }
}

/// An interactive transaction: statements one by one, then [`commit`](Self::commit) or
/// [`rollback`](Self::rollback). One dropped without either is rolled back by the
/// coordinator when its timeout passes.
#[derive(Debug)]
pub struct Interactive {
    client: Client,
    txn_id: String,
    /// A statement's answer was lost: it may have run, so the transaction may only be
    /// rolled back.
    interrupted: AtomicBool,
}

impl Client {
    /// A builder for a coordinator at `base_url` (`http://HOST:PORT` or `https://...`).
    pub fn builder(base_url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            base_url: base_url.into(),
            token: None,
            ca_pem: None,
            identity_pem: None,
            request_timeout: Duration::from_secs(60),
            retry: RetryPolicy::default(),
        }
    }

    /// Runs a one-shot transaction to its outcome, retrying by [`next_step`].
    pub async fn run(&self, txn: &Transaction) -> Result<Committed, Error> {
        check_txn_id(&txn.txn_id)?;
        let body = serde_json::to_value(txn).map_err(|e| Error::Config(e.to_string()))?;
        self.until_outcome(&txn.txn_id, "/v1/transactions", &body, true)
            .await
    }

    /// Begins an interactive transaction with a generated txn id.
    pub async fn begin(&self) -> Result<Interactive, Error> {
        self.begin_with(&generate_txn_id(), None, None).await
    }

    /// Begins an interactive transaction with the caller's txn id, isolation and
    /// deadline. A begin is not retried after a lost answer (nothing of it matters yet:
    /// the coordinator rolls back what it began).
    pub async fn begin_with(
        &self,
        txn_id: &str,
        isolation: Option<Isolation>,
        timeout_ms: Option<u64>,
    ) -> Result<Interactive, Error> {
        let mut body = json!({ "txn_id": txn_id });
        if let Some(i) = isolation {
            body["isolation"] = json!(i);
        }
        if let Some(t) = timeout_ms {
            body["timeout_ms"] = json!(t);
        }
        check_txn_id(txn_id)?;
        let attempts_max = self.retry.attempts_max.max(1);
        let mut backoff = self.backoff();
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .send(
                    reqwest::Method::POST,
                    "/v1/transactions",
                    Some(&body),
                    Expect::Committed,
                )
                .await
            {
                Answer::Begun => {
                    return Ok(Interactive {
                        client: self.clone(),
                        txn_id: txn_id.to_owned(),
                        interrupted: AtomicBool::new(false),
                    })
                }
                Answer::Busy { status, message } if attempt < attempts_max => {
                    debug!(txn_id, status, %message, "begin refused for now; retrying");
                    sleep(&mut backoff).await;
                }
                Answer::Committed(_) => {
                    return Err(Error::Refused {
                        status: 409,
                        message: format!("txn_id {txn_id:?} has already committed"),
                    })
                }
                other => return Err(other.into_error(txn_id)),
            }
        }
    }

    /// What the coordinator knows of `txn_id` now.
    pub async fn status(&self, txn_id: &str) -> Result<Status, Error> {
        check_txn_id(txn_id)?;
        let path = format!("/v1/transactions/{txn_id}");
        match self
            .send(reqwest::Method::GET, &path, None, Expect::Status)
            .await
        {
            Answer::Status(s) => Ok(s),
            other => Err(other.into_error(txn_id)),
        }
    }

    /// Sends `body` to `path` until it has an outcome, by [`next_step`]. `one_shot`: an
    /// abort learnt after a lost answer may be sent again; otherwise (an interactive
    /// commit) only a commit that never arrived (`GET` says still active) is.
    ///
    /// After a lost answer an abort is never reported as final for a one-shot: the lost
    /// request may still reach the coordinator and run (a txn id that aborted may run
    /// again), so the error is `OutcomeUnknown` and `status` tells later.
    async fn until_outcome(
        &self,
        txn_id: &str,
        path: &str,
        body: &Value,
        one_shot: bool,
    ) -> Result<Committed, Error> {
        let attempts_max = self.retry.attempts_max.max(1);
        let mut backoff = self.backoff();
        let mut lost = false;
        let mut last = None;
        for attempt in 1..=attempts_max {
            let answer = self
                .send(reqwest::Method::POST, path, Some(body), Expect::Committed)
                .await;
            let step = next_step(&answer, attempt < attempts_max);
            debug!(txn_id, attempt, ?step, "answer");
            lost |= matches!(answer, Answer::Lost(_));
            match step {
                Step::Done => return self.finally(txn_id, answer, lost && one_shot),
                Step::Wait => sleep(&mut backoff).await,
                Step::Ask => match self.settle(txn_id, !one_shot).await? {
                    Settled::Outcome(Outcome::Committed, pending) => {
                        return Ok(replayed(txn_id, pending))
                    }
                    // A one-shot that aborted may run again under its txn id; a commit
                    // that never arrived may be sent again.
                    Settled::Outcome(Outcome::Aborted, _) if one_shot && attempt < attempts_max => {
                    }
                    Settled::Outcome(Outcome::Aborted, _) if one_shot => {
                        return Err(Error::OutcomeUnknown {
                            txn_id: txn_id.to_owned(),
                            message: "aborted as far as the coordinator knows, but an attempt \
                                      whose answer was lost may still run: ask status later"
                                .into(),
                        })
                    }
                    Settled::Active => {}
                    Settled::Outcome(Outcome::Aborted, _) => {
                        return Err(Error::Aborted {
                            txn_id: txn_id.to_owned(),
                            participant: None,
                            code: None,
                            message: "aborted (learnt after the commit's answer was lost)".into(),
                        })
                    }
                    Settled::Outcome(Outcome::Unknown, _) => {
                        return Err(Error::OutcomeUnknown {
                            txn_id: txn_id.to_owned(),
                            message: "the coordinator no longer remembers it".into(),
                        })
                    }
                },
            }
            last = Some(answer);
        }
        let answer = last.unwrap_or(Answer::Lost("no attempt was made".into()));
        self.finally(txn_id, answer, lost && one_shot)
    }

    /// The result of the last answer; `after_loss`: an earlier request's answer was lost,
    /// so nothing short of a commit is final.
    fn finally(&self, txn_id: &str, answer: Answer, after_loss: bool) -> Result<Committed, Error> {
        match answer.into_result(txn_id) {
            Ok(c) => Ok(c),
            Err(Error::OutcomeUnknown { txn_id, message }) => {
                Err(Error::OutcomeUnknown { txn_id, message })
            }
            Err(e) if after_loss => Err(Error::OutcomeUnknown {
                txn_id: txn_id.to_owned(),
                message: format!(
                    "{e}; but an earlier attempt's answer was lost and it may still run: \
                     ask status later"
                ),
            }),
            Err(e) => Err(e),
        }
    }

    /// Asks `GET` until `txn_id` has an outcome (or, `active_counts`, is still active:
    /// a commit that never arrived), at most `settle_timeout`.
    async fn settle(&self, txn_id: &str, active_counts: bool) -> Result<Settled, Error> {
        let started = tokio::time::Instant::now();
        let mut backoff = self.backoff();
        let mut last = String::from("no answer");
        while started.elapsed() < self.retry.settle_timeout {
            match self.status(txn_id).await {
                Ok(Status {
                    outcome: Some(o),
                    pending,
                    ..
                }) => return Ok(Settled::Outcome(o, pending)),
                Ok(Status {
                    state: Some(State::Active),
                    ..
                }) if active_counts => return Ok(Settled::Active),
                Ok(s) => last = format!("still {:?}", s.state),
                Err(e) => last = e.to_string(),
            }
            sleep(&mut backoff).await;
        }
        Err(Error::OutcomeUnknown {
            txn_id: txn_id.to_owned(),
            message: format!(
                "no outcome within {} ms of asking ({last})",
                self.retry.settle_timeout.as_millis()
            ),
        })
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(
            self.retry.backoff_min.as_millis() as u64,
            self.retry.backoff_max.as_millis() as u64,
        )
    }

    /// One request, its answer classified.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        expect: Expect,
    ) -> Answer {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base_url));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Answer::from_transport(e),
        };
        let status = resp.status().as_u16();
        match resp.bytes().await {
            Ok(bytes) => Answer::classify(status, &bytes, expect),
            Err(e) => Answer::Lost(format!("reading the answer: {e}")),
        }
    }
}

/// Refuses a txn id the coordinator would (or that no URL path can carry: `.`, `..`).
fn check_txn_id(txn_id: &str) -> Result<(), Error> {
    twopc_shared::gid::validate_txn_id(txn_id).map_err(|e| Error::Refused {
        status: 400,
        message: e.to_string(),
    })
}

/// The answer to a commit learnt by `GET`: like the coordinator's replayed answer,
/// with the participants still `pending`.
fn replayed(txn_id: &str, pending: Vec<String>) -> Committed {
    Committed {
        txn_id: txn_id.to_owned(),
        outcome: Outcome::Committed,
        branches: vec![],
        pending,
        replayed: true,
    }
}

/// What `GET` said after a lost answer (with the participants still pending).
enum Settled {
    Outcome(Outcome, Vec<String>),
    /// An interactive transaction still taking statements: its commit never arrived.
    Active,
}

async fn sleep(backoff: &mut Backoff) {
    let ms = backoff.next_delay_ms(rand::random());
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

impl Interactive {
    pub fn txn_id(&self) -> &str {
        &self.txn_id
    }

    /// Runs one statement on `participant`. Not retried: a statement whose answer was
    /// lost may have run, and the transaction must then be rolled back.
    pub async fn execute(
        &self,
        participant: &str,
        sql: &str,
        params: Vec<Value>,
    ) -> Result<StmtResult, Error> {
        if self.interrupted.load(Ordering::Relaxed) {
            return Err(self.interrupted_error());
        }
        let path = format!("/v1/transactions/{}/statements", self.txn_id);
        let body = json!({ "participant": participant, "sql": sql, "params": params });
        let answer = self
            .client
            .send(reqwest::Method::POST, &path, Some(&body), Expect::Statement)
            .await;
        match answer {
            Answer::Statement(r) => Ok(r),
            Answer::Lost(why) => {
                // Never committed now: no commit is sent, and the coordinator rolls back
                // what the rollback below misses when the transaction's timeout passes.
                self.interrupted.store(true, Ordering::Relaxed);
                debug!(txn_id = %self.txn_id, %why, "statement answer lost; rolling back");
                let _ = self.send_rollback().await;
                Err(self.interrupted_error())
            }
            other => Err(other.into_error(&self.txn_id)),
        }
    }

    async fn send_rollback(&self) -> Answer {
        let path = format!("/v1/transactions/{}/rollback", self.txn_id);
        let body = json!({});
        self.client
            .send(
                reqwest::Method::POST,
                &path,
                Some(&body),
                Expect::RolledBack,
            )
            .await
    }

    fn interrupted_error(&self) -> Error {
        Error::Aborted {
            txn_id: self.txn_id.clone(),
            participant: None,
            code: None,
            message: "a statement's answer was lost, so the transaction was rolled back \
                      (it is never committed)"
                .into(),
        }
    }

    /// Commits (answered when applied everywhere).
    pub async fn commit(self) -> Result<Committed, Error> {
        self.commit_with(None).await
    }

    /// Commits; after a lost answer, asks `GET` for the outcome.
    pub async fn commit_with(self, ack: Option<Ack>) -> Result<Committed, Error> {
        if self.interrupted.load(Ordering::Relaxed) {
            return Err(self.interrupted_error());
        }
        let path = format!("/v1/transactions/{}/commit", self.txn_id);
        let body = match ack {
            Some(a) => json!({ "ack": a }),
            None => json!({}),
        };
        self.client
            .until_outcome(&self.txn_id, &path, &body, false)
            .await
    }

    /// Rolls back.
    pub async fn rollback(self) -> Result<(), Error> {
        match self.send_rollback().await {
            Answer::RolledBack => Ok(()),
            other => Err(other.into_error(&self.txn_id)),
        }
    }
}
