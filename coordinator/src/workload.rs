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

/// A GET after an unknown answer polls this many times, 100 ms apart.
const GET_POLLS_MAX: u32 = 30;

/// One transaction's plan: databases (indexes into `participants`), accounts, amount.
struct Plan {
    dbs: [usize; 3],
    accounts: [i32; 2],
    amount: i64,
}

fn stmt_values(v: Vec<(String, Vec<Value>)>) -> Vec<Value> {
    v.into_iter()
        .map(|(sql, params)| json!({ "sql": sql, "params": params }))
        .collect()
}

/// The one-shot body of `shape` (interactive shapes have none).
fn one_shot_body(shape: Shape, txn_id: &str, names: &[String], plan: &Plan) -> Option<Value> {
    let [i, j, k] = plan.dbs.map(|d| names[d].as_str());
    let [from, to] = plan.accounts;
    let amount = plan.amount;
    let both_legs = || {
        let mut v = stmt_values(debit_statements(txn_id, from, amount));
        v.extend(stmt_values(credit_statements(txn_id, to, amount)));
        v
    };
    let branches = match shape {
        Shape::Transfer => return Some(transfer_body(txn_id, (i, from), (j, to), amount)),
        Shape::WriterAndReader => json!([
            { "participant": i, "statements": both_legs() },
            { "participant": j, "statements": [{"sql": "SELECT count(*) FROM acct WHERE bal >= 0", "params": []}] },
        ]),
        Shape::SingleDatabase => json!([{ "participant": i, "statements": both_legs() }]),
        Shape::ThreeWay => {
            let part = (amount / 2).max(1);
            json!([
                { "participant": i, "statements": stmt_values(debit_statements(txn_id, from, amount)) },
                { "participant": j, "statements": stmt_values(credit_statements(txn_id, to, part)) },
                { "participant": k, "statements": stmt_values(credit_statements(txn_id, to, amount - part)) },
            ])
        }
        Shape::Interactive | Shape::InteractiveRolledBack | Shape::InteractiveFailing => {
            return None
        }
    };
    Some(json!({ "txn_id": txn_id, "branches": branches }))
}

/// What a client learns from a POST's answer.
pub fn told_by(status: u16, v: &Value) -> Told {
    match (status, v.get("outcome").and_then(Value::as_str)) {
        (200, Some("committed")) => Told::Committed,
        (409 | 400, Some("aborted")) => Told::Aborted,
        // Refused before anything ran: a limit, or a coordinator that is shutting down
        // or has not read its decision rows yet.
        (429 | 503, _) => Told::Aborted,
        _ => Told::Unknown,
    }
}

struct Client {
    http: reqwest::Client,
    config: Arc<WorkloadConfig>,
    /// SQLSTATE of every error answer, counted (see `WorkloadReport::error_codes`).
    error_codes: Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>,
}

impl Client {
    async fn post(&self, path: &str, body: &Value) -> Option<(u16, Value)> {
        let resp = self
            .http
            .post(format!("{}{path}", self.config.base_url))
            .json(body)
            .send()
            .await
            .ok()?;
        let status = resp.status().as_u16();
        let v = resp.json().await.unwrap_or(Value::Null);
        if let Some(code) = v.pointer("/error/code").and_then(Value::as_str) {
            let mut codes = self
                .error_codes
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            *codes.entry(code.to_owned()).or_insert(0) += 1;
        }
        Some((status, v))
    }

    /// Asks the coordinator what happened to `txn_id` until it says (bounded).
    async fn ask(&self, txn_id: &str) -> Told {
        for _ in 0..GET_POLLS_MAX {
            let url = format!("{}/v1/transactions/{txn_id}", self.config.base_url);
            if let Ok(resp) = self.http.get(url).send().await {
                let v: Value = resp.json().await.unwrap_or(Value::Null);
                match v.get("outcome").and_then(Value::as_str) {
                    Some("committed") => return Told::Committed,
                    Some("aborted") => return Told::Aborted,
                    _ => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Told::Unknown
    }

    /// A one-shot transaction; after an unknown answer, `GET`, and if that says
    /// `aborted`, the same request again (the same txn id: a retry is safe).
    async fn one_shot(&self, txn_id: &str, body: &Value) -> Told {
        let first = match self.post("/v1/transactions", body).await {
            Some((status, v)) => told_by(status, &v),
            None => Told::Unknown,
        };
        if !matches!(first, Told::Unknown) || !self.config.retry_unknown {
            return first;
        }
        match self.ask(txn_id).await {
            Told::Aborted => match self.post("/v1/transactions", body).await {
                Some((status, v)) => told_by(status, &v),
                None => Told::Unknown,
            },
            told => told,
        }
    }

    /// An interactive transaction of `shape`. Until `/commit` is sent it cannot commit,
    /// so any failure before it is an abort (the rollback is best effort: the
    /// coordinator's timeouts end what it misses).
    async fn interactive(&self, shape: Shape, txn_id: &str, names: &[String], plan: &Plan) -> Told {
        let Some((201, _)) = self
            .post("/v1/transactions", &json!({ "txn_id": txn_id }))
            .await
        else {
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
        let path = format!("/v1/transactions/{txn_id}");
        for (participant, (sql, params)) in steps {
            let body = json!({ "participant": participant, "sql": sql, "params": params });
            match self.post(&format!("{path}/statements"), &body).await {
                Some((200, _)) => {}
                _ => {
                    let _ = self.post(&format!("{path}/rollback"), &json!({})).await;
                    return Told::Aborted;
                }
            }
        }
        if shape == Shape::InteractiveRolledBack {
            let _ = self.post(&format!("{path}/rollback"), &json!({})).await;
            return Told::Aborted;
        }
        let first = match self.post(&format!("{path}/commit"), &json!({})).await {
            Some((status, v)) => told_by(status, &v),
            None => Told::Unknown,
        };
        match first {
            Told::Unknown if self.config.retry_unknown => self.ask(txn_id).await,
            told => told,
        }
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
    let http = reqwest::Client::builder()
        .timeout(config.request_timeout)
        .pool_max_idle_per_host(config.clients)
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
            http: http.clone(),
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
                let told = match one_shot_body(shape, &txn_id, &config.participants, &plan) {
                    Some(body) => c.one_shot(&txn_id, &body).await,
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
