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

enum Told {
    Committed,
    Aborted,
    Unknown,
}

/// Runs the workload to completion.
pub async fn run(config: WorkloadConfig) -> anyhow::Result<WorkloadReport> {
    anyhow::ensure!(
        config.participants.len() >= 2,
        "a transfer needs two participants"
    );
    let http = reqwest::Client::builder()
        .timeout(config.request_timeout)
        .pool_max_idle_per_host(config.clients)
        .build()?;
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + config.duration;
    let config = Arc::new(config);
    let mut tasks = Vec::new();
    for client in 0..config.clients {
        let http = http.clone();
        let issued = issued.clone();
        let config = config.clone();
        tasks.push(tokio::spawn(async move {
            let mut out: Vec<(String, Told, Duration)> = Vec::new();
            let mut rng = rand::rngs::StdRng::from_entropy();
            loop {
                let n = issued.fetch_add(1, Ordering::Relaxed);
                let stopped = config.stop.as_ref().is_some_and(|s| s.is_cancelled());
                if n >= config.max_transfers || Instant::now() >= deadline || stopped {
                    break;
                }
                let txn_id = format!("{}-{client}-{n}", config.txn_prefix);
                let i = rng.gen_range(0..config.participants.len());
                let mut j = rng.gen_range(0..config.participants.len() - 1);
                if j >= i {
                    j += 1;
                }
                let from = rng.gen_range(1..=config.accounts_per_db as i32);
                let to = rng.gen_range(1..=config.accounts_per_db as i32);
                let amount = rng.gen_range(1..=config.max_amount);
                let body = transfer_body(
                    &txn_id,
                    (&config.participants[i], from),
                    (&config.participants[j], to),
                    amount,
                );
                let t0 = Instant::now();
                let told = match http
                    .post(format!("{}/v1/transactions", config.base_url))
                    .json(&body)
                    .send()
                    .await
                {
                    Ok(resp) => {
                        let status = resp.status();
                        let v: Value = resp.json().await.unwrap_or(Value::Null);
                        match (status.as_u16(), v.get("outcome").and_then(Value::as_str)) {
                            (200, Some("committed")) => Told::Committed,
                            (409, Some("aborted")) | (400, Some("aborted")) => Told::Aborted,
                            _ => Told::Unknown,
                        }
                    }
                    Err(_) => Told::Unknown,
                };
                let no_answer = matches!(told, Told::Unknown);
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
    Ok(report)
}
