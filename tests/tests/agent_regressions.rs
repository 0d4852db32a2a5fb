//! Regression tests for agent defects, each against real PostgreSQL:
//!
//! 1. a dead coordinator's open branches held their row locks until the agent's idle
//!    timeout (300 s) instead of being rolled back when its successor connected;
//! 3. a one-phase commit refused before anything ran (no database session) was answered
//!    504 "outcome unknown" instead of 409 aborted;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use twopc_participant::server::ServerConfig;
use twopc_participant::AgentConfig;
use twopc_testkit::procs::{wait_for, Bins, ProcHarness};
use twopc_testkit::{serve_agent_on, AgentMode, Harness, StopMode, BALANCE};

fn bins() -> Bins {
    Bins {
        coordinator: env!("CARGO_BIN_EXE_twopc-coordinator-fp").into(),
        participant: env!("CARGO_BIN_EXE_twopc-participant-fp").into(),
    }
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// Whether another session can update row `id` of `acct` right now: true if no one holds
/// its lock (the update, a no-op, commits), false if it waits past a short lock_timeout.
async fn row_lock_free(url: &str, id: i32) -> bool {
    let client = connect(url).await;
    client
        .batch_execute("SET lock_timeout = '100ms'")
        .await
        .unwrap();
    match client
        .execute("UPDATE acct SET bal = bal WHERE id = $1", &[&id])
        .await
    {
        Ok(_) => true,
        Err(e) if e.code().map(|c| c.code()) == Some("55P03") => false,
        Err(e) => panic!("probe update of row {id}: {e}"),
    }
}

async fn scalar(url: &str, sql: &str) -> i64 {
    connect(url).await.query_one(sql, &[]).await.unwrap().get(0)
}

/// Defect 1. An interactive transaction's branch holds a row lock; the coordinator
/// process is killed (-9) and started again on the same data directory (epoch + 1). The
/// new incarnation's first recovery pass connects to the agent, whose handshake learns the
/// newer epoch and rolls back the older epoch's open branch: the lock is gone within
/// seconds, not after the agent's 300 s idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_coordinators_open_branch_is_rolled_back_when_its_successor_connects() {
    let mut h = ProcHarness::start(bins(), 1).await.unwrap();
    // The agent runs in this test process (this build's agent code, default settings:
    // 300 s idle timeout), on the port the coordinator process is given.
    let url = h.url(0);
    let listen = format!("127.0.0.1:{}", h.agent_ports[0]);
    let (_addr, agent, stop) = serve_agent_on(
        &listen,
        AgentConfig::new("a", url.clone()),
        ServerConfig::default(),
    )
    .await
    .unwrap();
    h.start_coordinator("").await.unwrap();

    let base = h.base_url();
    let begun = h
        .http
        .post(format!("{base}/v1/transactions"))
        .json(&json!({"txn_id": "held", "timeout_ms": 600_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(begun.status().as_u16(), 201);
    let stmt = h
        .http
        .post(format!("{base}/v1/transactions/held/statements"))
        .json(&json!({"participant": "a", "sql": "UPDATE acct SET bal = bal - 1 WHERE id = $1", "params": [1]}))
        .send()
        .await
        .unwrap();
    assert_eq!(stmt.status().as_u16(), 200);
    assert!(!row_lock_free(&url, 1).await, "the branch holds its lock");
    assert_eq!(agent.open_branches(), 1);

    h.coordinator.as_mut().unwrap().kill9();
    h.coordinator = None;
    assert!(
        !row_lock_free(&url, 1).await,
        "nothing has told the agent yet: the lock is still held"
    );

    let restarted = Instant::now();
    h.start_coordinator("").await.unwrap();
    wait_for(Duration::from_secs(5), || row_lock_free(&url, 1))
        .await
        .unwrap_or_else(|e| {
            panic!("the dead incarnation's branch still holds its lock 5 s after the restart: {e}")
        });
    eprintln!(
        "lock released {:?} after the new incarnation was started",
        restarted.elapsed()
    );
    wait_for(Duration::from_secs(5), || async {
        agent.open_branches() == 0
    })
    .await
    .unwrap();
    assert_eq!(
        scalar(&url, "SELECT bal FROM acct WHERE id = 1").await,
        BALANCE,
        "the dead transaction's update was rolled back"
    );
    assert_eq!(
        scalar(
            &url,
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'"
        )
        .await,
        0
    );
    stop.cancel();
}

async fn ledger_rows(url: &str, txn_id: &str) -> i64 {
    let client = connect(url).await;
    client
        .query_one("SELECT count(*) FROM ledger WHERE txn_id = $1", &[&txn_id])
        .await
        .unwrap()
        .get(0)
}

fn one_shot(txn_id: &str) -> Value {
    json!({"txn_id": txn_id, "branches": [{"participant": "a", "statements": [
        {"sql": "INSERT INTO ledger(txn_id, acct, delta) VALUES ($1, $2, $3)", "params": [txn_id, 1, 5]}
    ]}]})
}

/// Defect 3, pool exhausted. The agent's only session is held by an open interactive
/// branch; a one-phase transaction then gets no session within `pool_wait_timeout_ms`.
/// Nothing ran, so the answer is a definite 409 aborted (not 504 outcome unknown), `GET`
/// agrees, and the same `txn_id` may run again once a session is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_phase_commit_without_a_free_session_is_aborted_not_unknown() {
    let h = Harness::start_with_agents(
        1,
        AgentMode::Remote,
        |c| {
            c.pool_size = 1;
            c.pool_wait_timeout_ms = 300;
        },
        |_| {},
    )
    .await
    .unwrap();
    let url = h.dbs[0].url.clone();
    let (status, _) = h
        .post("/v1/transactions", &json!({"txn_id": "holder"}))
        .await
        .unwrap();
    assert_eq!(status, 201);
    let (status, r) = h
        .post(
            "/v1/transactions/holder/statements",
            &json!({"participant": "a", "sql": "SELECT bal FROM acct WHERE id = 1"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{r}");

    let (status, r) = h
        .post("/v1/transactions", &one_shot("starved"))
        .await
        .unwrap();
    assert_eq!(status, 409, "{r}");
    assert_eq!(r["outcome"], "aborted", "{r}");
    assert_eq!(r["error"]["code"], "53000", "{r}");
    let message = r["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("no free database session"), "{r}");
    let (_, st) = h.get("/v1/transactions/starved").await.unwrap();
    assert_eq!(st["outcome"], "aborted", "{st}");
    assert_eq!(ledger_rows(&url, "starved").await, 0);

    // The session is free again: the retry runs and commits.
    let (status, r) = h
        .post("/v1/transactions/holder/rollback", &json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{r}");
    let (status, r) = h
        .post("/v1/transactions", &one_shot("starved"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["outcome"], "committed", "{r}");
    assert_eq!(ledger_rows(&url, "starved").await, 1);
    h.shutdown().await.unwrap();
}

/// Defect 3, database down. No session can be opened, so nothing ran: 409 aborted, and
/// `GET` says aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_phase_commit_to_a_database_that_is_down_is_aborted_not_unknown() {
    let mut h = Harness::start(1, AgentMode::Remote).await.unwrap();
    tokio::task::block_in_place(|| h.dbs[0].cluster.stop(StopMode::Fast)).unwrap();

    let (status, r) = h.post("/v1/transactions", &one_shot("down")).await.unwrap();
    assert_eq!(status, 409, "{r}");
    assert_eq!(r["outcome"], "aborted", "{r}");
    assert_eq!(r["error"]["code"], "08001", "{r}");
    let (_, st) = h.get("/v1/transactions/down").await.unwrap();
    assert_eq!(st["outcome"], "aborted", "{st}");

    tokio::task::block_in_place(|| h.dbs[0].cluster.start_again()).unwrap();
    let url = h.dbs[0].url.clone();
    assert_eq!(ledger_rows(&url, "down").await, 0);
    h.shutdown().await.unwrap();
}
