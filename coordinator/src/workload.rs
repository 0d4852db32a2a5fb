//! The bank transfer workload, driven through the coordinator's HTTP API: each transfer
//! debits a random account on one database and credits one on another, with a ledger row
//! on each side keyed by the transfer's `txn_id`. Used by `demo`, the tests and the
//! bench; what each client was told is kept so the checker can compare.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use twopc_client::Transaction;

use crate::bank::{credit_statements, debit_statements, Expectation};

/// A client that got no answer waits this long before its next transfer.
const NO_ANSWER_BACKOFF_MS: u64 = 100;

#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// Base URL of the coordinator, e.g. `http://127.0.0.1:7000`.
    pub base_url: String,
    /// Participant names (at least two).
    pub participants: Vec<String>,
    pub accounts_per_db: u32,
    pub clients: usize,
    /// Stop after this many transfers in all, or after `duration`, whichever is first.
    pub max_transfers: u64,
    pub duration: Duration,
    pub max_amount: i64,
    /// Prefix of the client-chosen txn ids (so runs do not collide).
    pub txn_prefix: String,
    /// Per-request HTTP timeout.
    pub request_timeout: Duration,
    /// A client stops at its first request with no answer (the coordinator died).
    pub stop_on_no_answer: bool,
    /// Cancelled: every client stops after its current transfer.
    pub stop: Option<CancellationToken>,
    /// The kinds of transaction to send, chosen at random for each (empty: transfers
    /// only). Shapes needing more participants than there are are left out.
    pub shapes: Vec<Shape>,
    /// After an answer that leaves the outcome open, ask `GET` and, if it says
    /// `aborted`, send a one-shot transaction again with the same txn id.
    pub retry_unknown: bool,
    /// Counts acknowledged commits as they happen (for a driver watching progress).
    pub committed_counter: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

#[derive(Debug, Default)]
pub struct WorkloadReport {
    pub committed: u64,
    /// Rolled back (e.g. insufficient funds): the coordinator said `aborted`.
    pub aborted: u64,
    /// No definite answer (network error, 5xx): the outcome must be asked for later.
    pub unknown: u64,
    pub elapsed: Duration,
    /// Latencies of committed transfers, in microseconds.
    pub latencies_us: Vec<u64>,
    pub expectation: Expectation,
    pub unknown_ids: Vec<String>,
    /// The SQLSTATE codes of the error answers clients got (a failed statement of an
    /// interactive transaction, an aborted one-shot), counted: a fault test proves its
    /// fault hit transactions by the connection errors here (class 08).
    pub error_codes: std::collections::BTreeMap<String, u64>,
}

impl WorkloadReport {
    /// Error answers whose SQLSTATE is of `class` (e.g. "08", connection exceptions).
    pub fn errors_of_class(&self, class: &str) -> u64 {
        self.error_codes
            .iter()
            .filter(|(code, _)| code.starts_with(class))
            .map(|(_, n)| n)
            .sum()
    }
}

impl WorkloadReport {
    pub fn throughput(&self) -> f64 {
        self.committed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency percentile in milliseconds (0 if nothing committed).
    pub fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let mut v = self.latencies_us.clone();
        v.sort_unstable();
        let idx = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        v[idx.min(v.len() - 1)] as f64 / 1000.0
    }
}

/// The JSON body of one transfer.
pub fn transfer_body(txn_id: &str, from: (&str, i32), to: (&str, i32), amount: i64) -> Value {
    let stmts = |v: Vec<(String, Vec<Value>)>| {
        v.into_iter()
            .map(|(sql, params)| json!({ "sql": sql, "params": params }))
            .collect::<Vec<_>>()
    };
    json!({
        "txn_id": txn_id,
        "branches": [
            { "participant": from.0, "statements": stmts(debit_statements(txn_id, from.1, amount)) },
            { "participant": to.0, "statements": stmts(credit_statements(txn_id, to.1, amount)) },
        ]
    })
}

/// The kinds of transaction the workload sends. Every one moves money between accounts
/// and writes a ledger row per leg keyed by its txn id, so the bank audit can check it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Debit on one database, credit on another (one-shot).
    Transfer,
    /// Both legs on one database, and a read-only branch on another.
    WriterAndReader,
    /// Both legs on one database (one-phase).
    SingleDatabase,
    /// A debit on one database, split into credits on two others.
    ThreeWay,
    /// A transfer statement by statement, then `/commit`.
    Interactive,
    /// A transfer statement by statement, then `/rollback`.
    InteractiveRolledBack,
    /// A debit, then a statement that fails (the transaction aborts).
    InteractiveFailing,
}

impl Shape {
    /// Every shape, for workloads that should look like what users send.
    pub const ALL: [Shape; 7] = [
        Shape::Transfer,
        Shape::WriterAndReader,
        Shape::SingleDatabase,
        Shape::ThreeWay,
        Shape::Interactive,
        Shape::InteractiveRolledBack,
        Shape::InteractiveFailing,
    ];

    /// Participants the shape needs.
    fn participants_needed(self) -> usize {
        match self {
            Shape::SingleDatabase => 1,
            Shape::ThreeWay => 3,
            _ => 2,
        }
    }
}

/// What a client learned of its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Told {
    Committed,
    Aborted,
    Unknown,
}

/// How long a client asks `GET` for an outcome after an unknown answer.
const GET_POLL_MS: u64 = 3_000;

/// One transaction's plan: databases (indexes into `participants`), accounts, amount.
struct Plan {
    dbs: [usize; 3],
    accounts: [i32; 2],
    amount: i64,
}

/// Adds `statements` on `participant` to `txn`.
fn with(txn: Transaction, participant: &str, statements: Vec<(String, Vec<Value>)>) -> Transaction {
    statements.into_iter().fold(txn, |t, (sql, params)| {
        t.statement(participant, &sql, params)
    })
}

/// The one-shot transaction of `shape` (interactive shapes have none).
fn one_shot(shape: Shape, txn_id: &str, names: &[String], plan: &Plan) -> Option<Transaction> {
    let [i, j, k] = plan.dbs.map(|d| names[d].as_str());
    let [from, to] = plan.accounts;
    let amount = plan.amount;
    let debit = || debit_statements(txn_id, from, amount);
    let credit = |n| credit_statements(txn_id, to, n);
    let t = Transaction::with_id(txn_id);
    Some(match shape {
        Shape::Transfer => with(with(t, i, debit()), j, credit(amount)),
        Shape::WriterAndReader => {
            let read = vec![(
                "SELECT count(*) FROM acct WHERE bal >= 0".to_owned(),
                vec![],
            )];
            with(with(with(t, i, debit()), i, credit(amount)), j, read)
        }
        Shape::SingleDatabase => with(with(t, i, debit()), i, credit(amount)),
        Shape::ThreeWay => {
            let part = (amount / 2).max(1);
            with(
                with(with(t, i, debit()), j, credit(part)),
                k,
                credit(amount - part),
            )
        }
        Shape::Interactive | Shape::InteractiveRolledBack | Shape::InteractiveFailing => {
            return None
        }
    })
}

/// What an application learns from the client's result.
pub fn told_of<T>(r: &Result<T, twopc_client::Error>) -> Told {
    use twopc_client::Error as E;
    match r {
        Ok(_) => Told::Committed,
        // Nothing ran: aborted, refused, or never sent.
        Err(E::Aborted { .. } | E::Refused { .. } | E::Unavailable { .. } | E::Transport(_)) => {
            Told::Aborted
        }
        Err(E::OutcomeUnknown { .. } | E::Protocol { .. } | E::Config(_)) => Told::Unknown,
    }
}

/// One workload client: the application's client crate, and what it was told.
struct Client {
    client: twopc_client::Client,
    config: Arc<WorkloadConfig>,
    /// SQLSTATE of every abort, counted (see `WorkloadReport::error_codes`).
    error_codes: Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>,
}

impl Client {
    /// What the application learns from a result, with an abort's SQLSTATE counted.
    fn told<T>(&self, r: &Result<T, twopc_client::Error>) -> Told {
        if let Err(twopc_client::Error::Aborted {
            code: Some(code), ..
        }) = r
        {
            let mut codes = self
                .error_codes
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            *codes.entry(code.clone()).or_insert(0) += 1;
        }
        told_of(r)
    }

    /// An interactive transaction of `shape`. Until `/commit` is sent it cannot commit,
    /// so any failure before it is an abort (the rollback is best effort: the
    /// coordinator's timeouts end what it misses).
    async fn interactive(&self, shape: Shape, txn_id: &str, names: &[String], plan: &Plan) -> Told {
        let Ok(t) = self.client.begin_with(txn_id, None, None).await else {
            return Told::Aborted;
        };
        let [i, j, _] = plan.dbs.map(|d| names[d].as_str());
        let [from, to] = plan.accounts;
        let mut steps: Vec<(&str, (String, Vec<Value>))> = Vec::new();
        steps.extend(
            debit_statements(txn_id, from, plan.amount)
                .into_iter()
                .map(|s| (i, s)),
        );
        if shape == Shape::InteractiveFailing {
            steps.push((j, ("SELECT 1 / 0".to_owned(), vec![])));
        }
        steps.extend(
            credit_statements(txn_id, to, plan.amount)
                .into_iter()
                .map(|s| (j, s)),
        );
        for (participant, (sql, params)) in steps {
            let r = t.execute(participant, &sql, params).await;
            if r.is_err() {
                self.told(&r);
                let _ = t.rollback().await;
                return Told::Aborted;
            }
        }
        if shape == Shape::InteractiveRolledBack {
            let _ = t.rollback().await;
            return Told::Aborted;
        }
        let r = t.commit().await;
        self.told(&r)
    }
}

/// Runs the workload to completion.
pub async fn run(config: WorkloadConfig) -> anyhow::Result<WorkloadReport> {
    anyhow::ensure!(
        config.participants.len() >= 2,
        "a transfer needs two participants"
    );
    let shapes: Vec<Shape> = match config.shapes.as_slice() {
        [] => vec![Shape::Transfer],
        s => s
            .iter()
            .copied()
            .filter(|s| s.participants_needed() <= config.participants.len())
            .collect(),
    };
    anyhow::ensure!(
        !shapes.is_empty(),
        "no shape fits {} participants",
        config.participants.len()
    );
    // Without retry_unknown the first answer is what the client is told.
    let retry = if config.retry_unknown {
        twopc_client::RetryPolicy {
            attempts_max: 2,
            settle_timeout: Duration::from_millis(GET_POLL_MS),
            ..twopc_client::RetryPolicy::default()
        }
    } else {
        twopc_client::RetryPolicy {
            attempts_max: 1,
            settle_timeout: Duration::ZERO,
            ..twopc_client::RetryPolicy::default()
        }
    };
    let api = twopc_client::Client::builder(&config.base_url)
        .request_timeout(config.request_timeout)
        .retry(retry)
        .build()?;
    let issued = Arc::new(AtomicU64::new(0));
    let error_codes = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
    let started = Instant::now();
    let deadline = started + config.duration;
    let config = Arc::new(config);
    let shapes = Arc::new(shapes);
    let mut tasks = Vec::new();
    for client in 0..config.clients {
        let issued = issued.clone();
        let shapes = shapes.clone();
        let c = Client {
            client: api.clone(),
            config: config.clone(),
            error_codes: error_codes.clone(),
        };
        tasks.push(tokio::spawn(async move {
            let config = &c.config;
            let mut out: Vec<(String, Told, Duration)> = Vec::new();
            let mut rng = rand::rngs::StdRng::from_entropy();
            let n_dbs = config.participants.len();
            loop {
                let n = issued.fetch_add(1, Ordering::Relaxed);
                let stopped = config.stop.as_ref().is_some_and(|s| s.is_cancelled());
                if n >= config.max_transfers || Instant::now() >= deadline || stopped {
                    break;
                }
                let txn_id = format!("{}-{client}-{n}", config.txn_prefix);
                let shape = shapes[rng.gen_range(0..shapes.len())];
                // Distinct databases (as many as there are), distinct accounts.
                let mut dbs: Vec<usize> = (0..n_dbs).collect();
                for a in 0..dbs.len().min(3) {
                    let b = rng.gen_range(a..dbs.len());
                    dbs.swap(a, b);
                }
                let from = rng.gen_range(1..=config.accounts_per_db as i32);
                let mut to = rng.gen_range(1..config.accounts_per_db.max(2) as i32);
                if to >= from {
                    to += 1;
                }
                let plan = Plan {
                    dbs: [dbs[0], dbs[1 % n_dbs], dbs[2 % n_dbs]],
                    accounts: [from, to],
                    amount: rng.gen_range(2..=config.max_amount.max(2)),
                };
                let t0 = Instant::now();
                let told = match one_shot(shape, &txn_id, &config.participants, &plan) {
                    Some(txn) => c.told(&c.client.run(&txn).await),
                    None => {
                        c.interactive(shape, &txn_id, &config.participants, &plan)
                            .await
                    }
                };
                let no_answer = matches!(told, Told::Unknown);
                if let (Told::Committed, Some(c)) = (&told, &config.committed_counter) {
                    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                out.push((txn_id, told, t0.elapsed()));
                if no_answer {
                    if config.stop_on_no_answer {
                        break;
                    }
                    // The coordinator is down or unreachable: do not spin against it.
                    tokio::time::sleep(Duration::from_millis(NO_ANSWER_BACKOFF_MS)).await;
                }
            }
            out
        }));
    }
    let mut report = WorkloadReport::default();
    let mut committed = HashSet::new();
    let mut aborted = HashSet::new();
    for t in tasks {
        for (id, told, latency) in t.await? {
            match told {
                Told::Committed => {
                    report.committed += 1;
                    report.latencies_us.push(latency.as_micros() as u64);
                    committed.insert(id);
                }
                Told::Aborted => {
                    report.aborted += 1;
                    aborted.insert(id);
                }
                Told::Unknown => {
                    report.unknown += 1;
                    report.unknown_ids.push(id);
                }
            }
        }
    }
    report.elapsed = started.elapsed();
    report.expectation = Expectation { committed, aborted };
    report.error_codes = std::mem::take(
        &mut *error_codes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    );
    Ok(report)
}
