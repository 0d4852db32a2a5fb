//! Regression tests for agent defects, each against real PostgreSQL:
//!
//! - a one-phase commit refused before anything ran (no database session) was answered
//!   504 "outcome unknown" instead of 409 aborted;

use serde_json::{json, Value};
use twopc_testkit::{AgentMode, Harness, StopMode};

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
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
